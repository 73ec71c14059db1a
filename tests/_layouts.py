"""The same values in other memory layouts, for the layout / input-immutability tests of every op family.

``in_layout(x, layout)`` returns ``(view, base, place)``: ``view`` holds ``x``'s values in ``layout``, a view of the
fresh tensor ``base`` (whose other elements hold NaN, or a huge integer, so that a read past the view shows),
and ``place(t)`` takes the same view of any tensor shaped like ``base`` (its gradient). Layouts:

* ``offset``: contiguous at a non-zero storage offset;
* ``padded_rows``: unit stride along the last dim, the dim before it padded (a column slice of a wider tensor);
* ``strided_last``: stride 2 along the last dim;
* ``transposed``: the last two dims swapped in memory (stride 1 on the dim before the last; 2-D and wider);
* ``permuted``: the leading dims in reverse order in memory (3-D and wider);
* ``expanded``: stride 0 along dim 0 (one row broadcast over the batch): only for ``x`` equal along dim 0.
"""

import torch

LAYOUTS = ("offset", "padded_rows", "strided_last", "transposed", "permuted", "expanded")


def _filler(x: torch.Tensor):
    if x.dtype.is_floating_point:
        return float("nan")
    return True if x.dtype == torch.bool else 2**20


def in_layout(x: torch.Tensor, layout: str):
    x = x.detach()
    shape, fill = x.shape, _filler(x)
    if layout == "offset":
        base = torch.full((x.numel() + 3,), fill, dtype=x.dtype, device=x.device)
        base[3:] = x.reshape(-1)
        def place(t):
            return t[3:].view(shape)
    elif layout == "padded_rows" and x.dim() >= 2:
        base = torch.full((*shape[:-2], shape[-2], shape[-1] + 5), fill, dtype=x.dtype, device=x.device)
        base[..., 2:shape[-1] + 2] = x
        def place(t):
            return t[..., 2:shape[-1] + 2]
    elif layout == "strided_last":
        base = torch.full((*shape[:-1], 2 * shape[-1]), fill, dtype=x.dtype, device=x.device)
        base[..., 1::2] = x
        def place(t):
            return t[..., 1::2]
    elif layout == "transposed" and x.dim() >= 2:
        base = x.transpose(-1, -2).contiguous()
        def place(t):
            return t.transpose(-1, -2)
    elif layout == "permuted" and x.dim() >= 3:
        order = list(range(x.dim() - 1))[::-1] + [x.dim() - 1]
        base = x.permute(*order).contiguous()
        def place(t):
            return t.permute(*order)  # (the order is its own inverse)
    elif layout == "expanded":
        assert shape[0] > 1 and torch.equal(x, x[:1].expand(shape)), "expanded: x must be equal along dim 0"
        base = x[:1].clone()
        def place(t):
            return t.expand(shape)
    else:  # the layout does not apply to this rank
        return None
    view = place(base)
    assert torch.equal(view, x) or torch.equal(torch.isnan(view), torch.isnan(x)), layout
    return view, base, place


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and bits (NaN equal to the same NaN)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.is_floating_point:
        ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
        return torch.equal(a.detach().contiguous().view(ints), b.detach().contiguous().view(ints))
    return torch.equal(a, b)


def layout_calls(inputs: dict, names, shared=()):
    """``(name, layout, args, base, place)`` for each argument of ``names`` in each layout that applies to it:
    ``args`` is ``inputs`` with that one argument replaced by its view (``expanded`` only for ``shared``
    arguments, those equal along dim 0)."""
    for name in names:
        for layout in LAYOUTS:
            if layout == "expanded" and name not in shared:
                continue
            made = in_layout(inputs[name], layout)
            if made is None:
                continue
            view, base, place = made
            yield name, layout, {**inputs, name: view}, base, place


def student_leaf(args: dict, key: str, name: str, student: torch.Tensor, base: torch.Tensor, place):
    """Make ``args[key]`` (the student) a leaf that requires grad, for one ``layout_calls`` case: the view of
    ``base`` when the student is the argument ``name`` in a layout, else a fresh contiguous copy of ``student``.
    Returns a function giving the student's gradient after backward, in the student's logical shape."""
    if name == key:
        base.requires_grad_(True)
        args[key] = place(base)
        return lambda: place(base.grad)
    leaf = args[key] = student.clone().requires_grad_(True)
    return lambda: leaf.grad
