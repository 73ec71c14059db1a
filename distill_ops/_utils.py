"""Argument checking and backend dispatch shared by every public op.

All checks run before any kernel launches and never read tensor values (no host synchronisation):
they look at shapes, dtypes, devices and Python scalars only.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import math
import numbers
import operator
import os
import re
from typing import Iterable, Iterator, Literal, Optional, Sequence

import torch

#: The `impl=` argument of every public op, for type checkers and IDEs (`resolve_impl` checks the value at run time).
Impl = Literal["auto", "triton", "torch"]
IMPLS = ("auto", "triton", "torch")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def triton_interpreter_enabled() -> bool:
    """True when Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _minor_version(text: str) -> tuple[int, int]:
    """``(major, minor)`` of a version string; ``(0, 0)`` for one that does not start with a number."""
    match = re.match(r"(\d+)(?:\.(\d+))?", text)
    return (int(match.group(1)), int(match.group(2) or 0)) if match else (0, 0)


def _triton_problem() -> Optional[str]:
    """Why the Triton backend cannot run here (checked once, at import, without importing Triton), or None."""
    if importlib.util.find_spec("triton") is None:
        return ("Triton is not installed (it has wheels for Linux only: pip install 'triton>=3.6'); impl='auto' "
                "uses the PyTorch implementations without it")
    try:
        triton_version = importlib.metadata.version("triton")
        import numpy
    except (importlib.metadata.PackageNotFoundError, ImportError):
        return None
    if (_minor_version(triton_version) == (3, 6) and _minor_version(numpy.__version__) >= (2, 4)
            and triton_interpreter_enabled()):
        return (f"Triton {triton_version}'s CPU interpreter fails with NumPy {numpy.__version__} (a TypeError inside "
                f"the interpreter): pip install 'numpy<2.4', or a newer Triton")
    return None


TRITON_PROBLEM = _triton_problem()


def _rocm_problem(hip_version: str | None) -> str | None:
    """Why the Triton kernels do not run on this torch's "cuda" devices, or None: a ROCm build (``torch.version.hip``)
    names AMD GPUs "cuda" too, and the kernels are written, configured and tested for NVIDIA's."""
    if hip_version is None:
        return None
    return (f"the Triton kernels target NVIDIA GPUs and are not supported on ROCm (torch.version.hip = {hip_version}):"
            " compiled ahead of time for gfx942 (MI300), the fp32 tree attention asks for a dot precision AMD lacks "
            "(tf32x3) and the 16-bit one at head dim 128 needs 72 KiB of the 64 KiB LDS, and for gfx90a the fused "
            "linear kernels do not compile either (benchmarks/results/cpu-2026-12-07-compile-check-rocm/); "
            "impl='auto' runs the PyTorch implementations on ROCm")


ROCM_PROBLEM = _rocm_problem(getattr(torch.version, "hip", None))


def resolve_impl(impl: str, device: torch.device) -> str:
    """Map ``impl`` to the backend that will run: ``"triton"`` or ``"torch"``.

    ``auto`` is Triton on CUDA tensors and PyTorch otherwise (also on CUDA when Triton is not installed:
    Windows and macOS have no Triton wheels, and on a ROCm build's AMD GPUs, see ``ROCM_PROBLEM``). ``triton`` on
    non-CUDA tensors is only possible under Triton's interpreter (``TRITON_INTERPRET=1``, set before import).
    ``triton`` where it cannot run (see ``TRITON_PROBLEM``, ``ROCM_PROBLEM``) is an error saying why.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return "torch"
    if impl == "auto":
        return "triton" if device.type == "cuda" and TRITON_PROBLEM is None and ROCM_PROBLEM is None else "torch"
    if device.type == "cuda" and ROCM_PROBLEM is not None:
        raise RuntimeError(f"impl='triton': {ROCM_PROBLEM}")
    if device.type != "cuda" and not triton_interpreter_enabled():
        raise ValueError(
            f"impl='triton' needs CUDA tensors or Triton's CPU interpreter (set TRITON_INTERPRET=1 before "
            f"importing distill_ops); got tensors on device {device}"
        )
    if TRITON_PROBLEM is not None:
        raise RuntimeError(f"impl='triton': {TRITON_PROBLEM}")
    return "triton"


def _dims(count: int) -> str:
    return f"{count} dim" if count == 1 else f"{count} dims"


def check_tensor(
    name: str,
    tensor: object,
    *,
    dtypes: Sequence[torch.dtype] | None = FLOAT_DTYPES,
    min_dim: int = 0,
    ndim: int | None = None,
) -> torch.Tensor:
    """Type-check one tensor argument; returns it unchanged."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if dtypes is not None and tensor.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {tensor.dtype}")
    if ndim is not None and tensor.dim() != ndim:
        raise ValueError(f"{name} must have {_dims(ndim)}, got shape {tuple(tensor.shape)}")
    if tensor.dim() < min_dim:
        raise ValueError(f"{name} must have at least {_dims(min_dim)}, got shape {tuple(tensor.shape)}")
    return tensor


def check_leading_dims(name: str, tensor: torch.Tensor, reference: str, leading_shape: torch.Size) -> None:
    """``tensor`` is ``[*leading_shape, width]``: one row per token of ``reference`` (its own last dim is free)."""
    if tensor.shape[:-1] != leading_shape:
        owner = f"{reference}'" if reference.endswith("s") else f"{reference}'s"
        raise ValueError(
            f"{name} must have {owner} leading dims {tuple(leading_shape)} (one row per token), got shape "
            f"{tuple(tensor.shape)}"
        )


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    """All given (non-None) tensors live on one device; returns it."""
    items = [(n, t) for n, t in tensors.items() if t is not None]
    device = items[0][1].device
    for name, tensor in items[1:]:
        if tensor.device != device:
            raise ValueError(
                f"{name} is on {tensor.device} but {items[0][0]} is on {device}: all tensors must share a device"
            )
    return device


def check_choice(name: str, value: object, choices: Iterable[object]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_number(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """A finite real Python number within the given bounds (NumPy float64 is a Python float; other NumPy
    scalars are refused with the conversion to use, as are bools and tensors)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = f"{type(value).__module__}.{type(value).__name__}".replace("builtins.", "")
        hint = " (convert it with float())" if isinstance(value, numbers.Real) and not isinstance(value, bool) else ""
        raise TypeError(f"{name} must be a Python int or float, got {kind}: {value!r}{hint}")
    value = float(value)
    # x - x == 0 exactly for finite x (NaN for inf and NaN); unlike math.isfinite it also traces when
    # torch.compile(dynamic=True) makes a float argument symbolic.
    ok = value - value == 0
    if ok and low is not None:
        ok = value >= low if low_inclusive else value > low
    if ok and high is not None:
        ok = value <= high if high_inclusive else value < high
    if not ok:
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        opening = "[" if low_inclusive and low is not None else "("
        closing = "]" if high_inclusive and high is not None else ")"
        raise ValueError(f"{name} must be in {opening}{lo}, {hi}{closing}, got {value}")
    return value


def _integer_like(value: object) -> bool:
    """Python and NumPy integers (anything with ``__index__``), not bools or tensors."""
    return not isinstance(value, (bool, torch.Tensor)) and hasattr(type(value), "__index__")


def check_index(name: str, value: object) -> object:
    """An integer: a Python or NumPy int, or a symbolic one under ``torch.compile`` (not a bool, float or tensor)."""
    if not _integer_like(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}: {value!r}")
    if isinstance(value, int) and not -(2**63) <= value < 2**63:  # compared with int64 labels
        raise ValueError(f"{name} must fit in int64, got {value}")
    return value


def check_int(name: str, value: object, *, low: int | None = None, optional: bool = False) -> int | None:
    """A Python or NumPy integer (not a bool, float or tensor), at least ``low``, returned as a Python int.

    ``None`` passes when ``optional``. Every integer option of the package goes through here, so that
    ``k=np.int64(8)`` (a size read from a NumPy array or a config) means what ``k=8`` means.
    """
    if value is None and optional:
        return None
    if not _integer_like(value):
        expected = "an int or None" if optional else "an int"
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}: {value!r}")
    value = operator.index(value)
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def check_device(name: str, device: object) -> torch.device:
    """A ``torch.device``, a device string (``"cuda:1"``) or a device index, as a ``torch.device`` (an unknown
    string was PyTorch's RuntimeError, ``None`` or a float its argument-parser TypeError, neither naming ``name``)."""
    if isinstance(device, torch.device):
        return device
    if isinstance(device, str) or _integer_like(device):
        try:
            return torch.device(device)
        except (RuntimeError, ValueError):
            raise ValueError(f"{name} must name a device (e.g. 'cpu', 'cuda', 'cuda:1'), got {device!r}") from None
    raise TypeError(f"{name} must be a torch.device, a device string or index, got {type(device).__name__}: {device!r}")


def check_flag(name: str, value: object) -> bool:
    """A bool option (``1`` or ``"yes"`` would read as True and hide a misplaced argument)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}: {value!r}")
    return value


def check_labels(labels: object, leading_shape: torch.Size, device: torch.device) -> torch.Tensor:
    """``labels`` is an integer tensor shaped like the logits' leading dims, on their device."""
    check_tensor("labels", labels, dtypes=INT_DTYPES)
    if labels.shape != leading_shape:
        raise ValueError(
            f"labels must have shape {tuple(leading_shape)} (the logits' leading dims), got {tuple(labels.shape)}"
        )
    if labels.device != device:
        raise ValueError(f"labels is on {labels.device} but the logits are on {device}")
    return labels


def check_label_values(labels: torch.Tensor, ignore_index: int, vocab: int, when: str) -> torch.Tensor:
    """Labels used as class indices lie in ``[0, vocab)`` or equal ``ignore_index``: checked where the values can
    be read without a synchronisation (:func:`host_readable`); ``when`` says why they must (in the message).
    Returns the counted rows whose label is out of range (a device mask, for callers that make those rows NaN
    where the values were not read)."""
    if host_readable(labels):
        active = labels[labels != ignore_index]
        if active.numel() and bool(((active < 0) | (active >= vocab)).any()):
            raise ValueError(
                f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index} {when}, got values "
                f"from {active.min().item()} to {active.max().item()}"
            )
    return (labels != ignore_index) & ((labels < 0) | (labels >= vocab))


def check_token_ids(name: str, ids: torch.Tensor, vocab: int, *, vocab_name: str = "", note: str = "") -> None:
    """Token ids lie in ``[0, vocab)``: checked where the values can be read without a synchronisation
    (:func:`host_readable`). ``vocab_name`` prefixes the bound in the message (``V=5``), ``note`` follows it."""
    if host_readable(ids) and ids.numel() and bool(((ids < 0) | (ids >= vocab)).any()):
        bound = f"{vocab_name}={vocab}" if vocab_name else str(vocab)
        raise ValueError(f"{name} must be token ids in [0, {bound}){note}, got values from {int(ids.min())} to "
                         f"{int(ids.max())}")


def check_written_in_place(name: str, tensor: torch.Tensor, role: str = "") -> None:
    """A tensor an op writes into in place, outside autograd: no two elements may share memory (an ``expand()``ed
    buffer: one write lands on several elements) and it may not require grad where autograd records. ``role``
    follows the name in the messages (e.g. " is compacted in place and")."""
    if any(stride == 0 and size > 1 for size, stride in zip(tensor.shape, tensor.stride())):
        raise ValueError(
            f"{name}{role} must not have overlapping elements (a stride of 0 over a dim of size > 1, as from "
            f"expand()), got shape {tuple(tensor.shape)} strides {tensor.stride()}"
        )
    if tensor.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{name}{role} must not require grad (it is written in place, outside autograd): pass it "
                         f"without requires_grad (e.g. detach() it), or call under torch.no_grad()")


def flat_labels(labels: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Labels ``[...]`` as contiguous int64 ``[N]`` (the kernels index them by row; a strided view is copied)."""
    return None if labels is None else labels.reshape(-1).to(torch.int64).contiguous()


def check_vocab_size(vocab_size: object) -> int | None:
    """``vocab_size`` is None or an int >= 1 (its upper bound depends on the inputs: :func:`resolve_vocab`)."""
    return check_int("vocab_size", vocab_size, low=1, optional=True)


def resolve_vocab(
    student_vocab: int, teacher_vocab: int, vocab_size: int | None, *, student_name: str, teacher_name: str
) -> int:
    """The number of vocabulary columns both sides are read over (the design's ``vocab_size`` rule)."""
    if min(student_vocab, teacher_vocab) < 1:
        raise ValueError(
            f"{student_name} and {teacher_name} must have a vocabulary of V >= 1 (a non-empty last dim), got "
            f"{student_vocab} and {teacher_vocab}"
        )
    if vocab_size is None:
        if student_vocab != teacher_vocab:
            raise ValueError(
                f"{student_name} has vocabulary size {student_vocab} but {teacher_name} has {teacher_vocab}; "
                f"pass vocab_size=k to compare their first k columns"
            )
        return student_vocab
    vocab_size = check_vocab_size(vocab_size)
    if vocab_size > min(student_vocab, teacher_vocab):
        raise ValueError(
            f"vocab_size must be in [1, min({student_name} vocab {student_vocab}, {teacher_name} vocab "
            f"{teacher_vocab})], got {vocab_size}"
        )
    return vocab_size


def as_rows(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """View ``tensor[..., :width]`` as 2-D rows with unit stride along the last dim (copy only if needed: row
    groups of :func:`as_row_groups` that do not flatten)."""
    return as_row_groups((tensor,), width)[0].reshape(-1, width)


def _mergeable(tensor: torch.Tensor, stop: int, start: int = 0) -> bool:
    """Whether ``tensor``'s dims ``[start, stop)`` merge into one without a copy (each stride is the next one's
    stride times its size, size-1 dims aside). Decided from sizes and strides, not by trying ``view``: under
    ``torch.compile`` a failed view is not an exception the traced code can catch."""
    inner = None
    for size, stride in zip(reversed(tensor.shape[start:stop]), reversed(tensor.stride()[start:stop])):
        if size == 1:
            continue
        if inner is not None and stride != inner:
            return False
        inner = stride * size
    return True


def as_row_groups(tensors: Sequence[torch.Tensor], width: int) -> list[torch.Tensor]:
    """Views ``[G, R, width]`` (unit stride along the last dim) of tensors ``[..., >= width]`` that share their
    leading dims, for kernels that address row ``i`` as ``(i // R, i % R)`` with two strides.

    ``G = 1`` (plain rows) when every tensor's leading dims flatten without a copy. Otherwise the leading dims are
    split in two, G outer and R inner rows, at the innermost split where both parts of every tensor merge: a batch
    of shifted logits ``logits[:, :-1]`` ([B, L, V] whose rows are not evenly spaced) is read in place as B groups
    of L rows, where flattening it would copy all of it, and ``logits[:, 1:]`` of ``[A, B + 1, L, V]`` as A groups
    of B·L rows. Only a tensor that no split can express (e.g. a slice along two leading dims) is copied.
    """
    rows = []
    for tensor in tensors:
        # Slice only when truncating: autograd records even a full-width slice, and its backward would allocate
        # a zero-filled copy of the whole gradient. A last dim with a stride other than 1 is copied.
        view = tensor[..., :width] if width < tensor.shape[-1] else tensor
        rows.append(view if view.stride(-1) == 1 else view.contiguous())
    leading = rows[0].dim() - 1
    if rows[0].numel() == 0 or all(_mergeable(view, leading) for view in rows):  # (an empty tensor views as any)
        return [view.view(1, -1, width) for view in rows]

    def splits_at(view: torch.Tensor, split: int) -> bool:
        return _mergeable(view, split) and _mergeable(view, leading, split)

    split = leading - 1
    for candidate in range(leading - 1, 0, -1):  # a plain loop: torch.compile traces it
        if all(splits_at(view, candidate) for view in rows):
            split = candidate
            break
    shape = (math.prod(rows[0].shape[:split]), math.prod(rows[0].shape[split:leading]), width)
    return [view.view(shape) if splits_at(view, split) else view.reshape(shape) for view in rows]


def group_rows(tensor: torch.Tensor, rows: slice, columns: slice = slice(None)) -> torch.Tensor:
    """``rows`` (a slice of the N = G·R flattened rows) and ``columns`` of ``tensor`` [N, W] or of its row groups
    [G, R, W], 2-D: a view when the rows lie within one group, otherwise a copy of just those rows and columns."""
    if tensor.dim() == 2:
        return tensor[rows, columns]
    if rows.start >= rows.stop:
        return tensor[0, :0, columns]
    per_group = tensor.shape[1]
    first, last = rows.start // per_group, (rows.stop - 1) // per_group
    if first == last:
        return tensor[first, rows.start - first * per_group:rows.stop - first * per_group, columns]
    return torch.cat([
        tensor[group, max(rows.start - group * per_group, 0):min(rows.stop - group * per_group, per_group), columns]
        for group in range(first, last + 1)
    ])


def row_group_chunks(
    tensors: Sequence[Optional[torch.Tensor]], step: int
) -> Iterator[tuple[slice, list[Optional[torch.Tensor]]]]:
    """Chunks of at most ``step`` rows of tensors ``[N, ...]`` or row groups ``[G, R, ...]`` (all laid out alike;
    ``None`` entries stay ``None``): yields ``(rows, chunks)``, ``rows`` the chunk's slice of the N = G·R flattened
    rows and ``chunks`` each tensor's rows, 2-D. A chunk lies within one group, or, when a group is shorter than
    ``step``, spans whole groups: their rows flattened (a copy of at most ``step`` rows for an input whose groups do
    not flatten; a tensor written through its chunks must be contiguous, so that they are views of it)."""
    first = next(tensor for tensor in tensors if tensor is not None)
    groups, per_group = (first.shape[0], first.shape[1]) if first.dim() == 3 else (1, first.shape[0])
    if groups > 1 and 0 < per_group < step:  # many short sequences: whole groups per chunk, not one each
        per_chunk = step // per_group
        for start in range(0, groups, per_chunk):
            stop = min(start + per_chunk, groups)
            chunks = [None if t is None else t[start:stop].reshape(-1, *t.shape[2:]) for t in tensors]
            yield slice(start * per_group, stop * per_group), chunks
        return
    for group in range(groups):
        for start in range(0, per_group, step):
            stop = min(start + step, per_group)
            chunks = [None if t is None else (t[group, start:stop] if t.dim() == 3 else t[start:stop])
                      for t in tensors]
            yield slice(group * per_group + start, group * per_group + stop), chunks


def reduction_weight(
    reduction: str,
    normalizer: float | torch.Tensor | None,
    active: torch.Tensor | None,
    num_rows: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The per-row weight a reduction applies, as a one-element fp32 tensor (broadcast to all rows; ``dtype``
    float64 for the float64 reference).

    ``mean`` is 1 / (number of counted rows, at least 1), or 1 / ``normalizer`` (inf for 0: the losses then give 0
    where nothing counts, and select rather than multiply at ignored rows); ``sum`` and
    ``none`` are 1. Computed on the device: no host synchronisation. Kernels fold this weight into
    the loss and the stored gradient, so ``loss.backward()`` hands them an incoming gradient of 1.
    """
    if reduction != "mean":
        return torch.ones(1, dtype=dtype, device=device)
    if normalizer is not None:
        if isinstance(normalizer, torch.Tensor):
            # A CPU normalizer (e.g. a token count made on the host) beside GPU logits: no synchronising copy.
            normalizer = to_device_async(normalizer.detach(), torch.device(device))
            return normalizer.to(dtype=dtype).reshape(1).reciprocal()
        inverse = 1.0 / float(normalizer) if normalizer else float("inf")  # inf for 0, as a zero tensor's reciprocal
        return torch.full((1,), inverse, dtype=dtype, device=device)
    if active is None:
        return torch.full((1,), 1.0 / max(num_rows, 1), dtype=dtype, device=device)
    return active.sum().clamp_min(1).to(dtype).reshape(1).reciprocal()


def reduce_rows(
    row_values: torch.Tensor,
    active: torch.Tensor | None,
    reduction: str,
    normalizer: float | torch.Tensor | None,
    leading_shape: torch.Size,
) -> torch.Tensor:
    """Apply ``reduction`` to unweighted per-row values (0 at ignored rows), for ops whose kernels do
    not fold :func:`reduction_weight` in themselves. Ignored rows are selected to 0, in the weight and after
    it: a zero tensor ``normalizer`` (every row ignored) makes the weight inf, and inf * 0 would be NaN (in the
    product, or in its backward for whatever produced the rows: DACKLLoss's bound network)."""
    weight = reduction_weight(reduction, normalizer, active, row_values.numel(), row_values.device)
    if active is not None:  # the weight selected too: backward's 0 (from the select below) * inf would be NaN
        weight = torch.where(active, weight, 0.0)
    weighted = row_values * weight
    if active is not None:
        weighted = torch.where(active, weighted, 0.0)
    return finish_reduction(weighted, reduction, leading_shape)


def split_stored_weight(
    row_weight: torch.Tensor, reduction: str, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(folded, deferred)``: the part of :func:`reduction_weight` a stored-gradient kernel folds into the loss and
    the gradient it stores in the student's dtype, and the part applied after the op (:func:`finish_deferred`).

    fp16 defers a ``mean``'s weight: folded in, 1 / count (or 1 / ``normalizer``, e.g. the batch's token count)
    pushed the stored fp16 gradient below fp16's range before a loss scale (``torch.amp.GradScaler``) could lift
    it, since backward applies the scale to what was stored; deferred, the stored gradient is the unweighted
    d loss_row / dz and backward scales it by weight x loss scale in fp32 and rounds once. The cost is one pass over
    the stored gradient in backward (the Triton kernel otherwise skips rows whose incoming gradient is exactly 1).
    fp32 / bf16 (fp32's exponent range) and the other reductions (weight 1) fold everything, as before.
    """
    if dtype != torch.float16 or reduction != "mean":
        return row_weight, None
    return torch.ones_like(row_weight), row_weight


def finish_deferred(
    row_loss: torch.Tensor, deferred: torch.Tensor | None, active: torch.Tensor | None, reduction: str,
    leading_shape: torch.Size,
) -> torch.Tensor:
    """:func:`finish_reduction` of a stored-gradient op's rows, with the weight :func:`split_stored_weight`
    deferred (if any) applied first. Ignored rows are selected to 0 after it (inf for a zero ``normalizer``)."""
    if deferred is not None:
        if active is not None:  # selected before the product too: backward's 0 * inf would be NaN
            deferred = torch.where(active, deferred, 0.0)
        row_loss = row_loss * deferred
        if active is not None:
            row_loss = torch.where(active, row_loss, 0.0)
    return finish_reduction(row_loss, reduction, leading_shape)


def finish_reduction(weighted_rows: torch.Tensor, reduction: str, leading_shape: torch.Size) -> torch.Tensor:
    """Per-row values that already carry :func:`reduction_weight` → the reduced loss."""
    if reduction == "none":
        return weighted_rows.reshape(leading_shape)
    return weighted_rows.sum()


def check_reduction(reduction: str, normalizer: object, name: str = "normalizer") -> None:
    """``reduction`` and the ``normalizer`` of a mean (``name``: what the caller calls it, e.g. TRL's
    ``num_items_in_batch``)."""
    check_choice("reduction", reduction, ("mean", "sum", "none"))
    if normalizer is not None:
        if isinstance(normalizer, torch.Tensor):
            if normalizer.numel() != 1:
                raise ValueError(
                    f"{name} must be a number or a one-element tensor, got shape {tuple(normalizer.shape)}"
                )
            if normalizer.dtype == torch.bool or normalizer.is_complex():
                raise TypeError(f"{name} must be a real number or a one-element real tensor, got {normalizer.dtype}")
            # 0 stays legal for a tensor (num_items_in_batch of a batch that counts nothing: the loss is then 0).
            value = normalizer.detach()
            if host_readable(normalizer) and not bool((value >= 0) & (value < float("inf"))):
                raise ValueError(f"{name} must be finite and >= 0 (a count of tokens), got {value.item()}")
        else:
            # 0 is legal as for a tensor: an int num_items_in_batch of a window that counts nothing (loss 0).
            check_number(name, normalizer, low=0.0)
        if reduction != "mean":
            raise ValueError(f"normalizer only applies to reduction='mean', got reduction={reduction!r}")


def row_chunk(num_rows: int, width: int, budget_elements: int = 1 << 22) -> int:
    """Rows per chunk for the PyTorch fallbacks: about ``budget_elements`` fp32 values per temporary."""
    return max(1, min(num_rows, budget_elements // max(width, 1)))


class LossModule(torch.nn.Module):
    """``nn.Module`` form of a functional loss: keeps the constructor's options as attributes and hands
    them to the functional on every call (per-call overrides win)."""

    def __init__(self, **options: object) -> None:
        # The options every loss shares are checked here, when the module is built, not at its first call.
        if "temperature" in options:
            check_number("temperature", options["temperature"], low=0.0, low_inclusive=False)
        if "ignore_index" in options:
            check_index("ignore_index", options["ignore_index"])
        if "impl" in options:
            check_choice("impl", options["impl"], IMPLS)
        if "vocab_size" in options:
            options["vocab_size"] = check_vocab_size(options["vocab_size"])
        super().__init__()
        self._option_names = tuple(options)
        for name, value in options.items():
            setattr(self, name, value)

    def options(self, **overrides: object) -> dict:
        merged = {name: getattr(self, name) for name in self._option_names}
        merged.update(overrides)
        return merged

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={getattr(self, name)!r}" for name in self._option_names)


def to_device_async(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor.to(device)`` without a host synchronisation when a CPU tensor goes to a GPU.

    A copy from pageable host memory synchronises the stream; here the tensor is first copied into a fresh pinned
    buffer (also when it is pinned already: later changes to ``tensor`` do not race the copy, and the caching host
    allocator recycles the buffer only after the copy has run) and moved with ``non_blocking=True``. Other moves
    are plain ``.to(device)``.
    """
    if tensor.device.type == "cpu" and device.type == "cuda" and not torch.compiler.is_compiling():
        staging = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        return staging.copy_(tensor).to(device, non_blocking=True)
    return tensor.to(device)


def host_readable(tensor: torch.Tensor) -> bool:
    """Whether a value check may read ``tensor``'s contents on the host: eager CPU tensors only (on a GPU
    the read would synchronise; under ``torch.compile`` it would be a data-dependent branch)."""
    return tensor.device.type == "cpu" and not torch.compiler.is_compiling()


def softcapped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """``softcap * tanh(logits / softcap)`` (Gemma-2's logit soft-capping), or ``logits`` when None."""
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def sink_softmax(scores: torch.Tensor, sinks: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Softmax over the last dim of ``scores [..., Hq, q, S]`` in ``dtype``; with ``sinks [Hq]`` (gpt-oss's
    attention sinks) each head's denominator also holds ``exp(sinks[h])`` (the sink has no value)."""
    if sinks is None:
        return torch.softmax(scores, dim=-1, dtype=dtype)
    column = sinks.to(scores.dtype).view(-1, 1, 1).expand(*scores.shape[:-1], 1)
    return torch.softmax(torch.cat([scores, column], dim=-1), dim=-1, dtype=dtype)[..., :-1]


def autocast_linear_inputs(*tensors: Optional[torch.Tensor]) -> tuple[tuple, Optional[str]]:
    """Under ``torch.autocast`` for the tensors' device type: ``(tensors with every fp32 one cast to the autocast
    dtype, device type)``, as autocast casts a linear layer's inputs; otherwise ``(tensors, None)``. Non-tensors
    and ``None`` pass unchanged (validation names them later)."""
    first = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    if first is None:
        return tensors, None
    device_type = first.device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors, None
    dtype = torch.get_autocast_dtype(device_type)
    cast = tuple(
        t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype == torch.float32 else t for t in tensors
    )
    return cast, device_type


def autocast_off(device_type: Optional[str]):
    """A context that disables autocast for ``device_type`` (a no-op context for None)."""
    return contextlib.nullcontext() if device_type is None else torch.autocast(device_type, enabled=False)


def text_config(model: object):
    """A transformers model's text config (``config.get_text_config()`` for multimodal configs), or None."""
    config = getattr(model, "config", None)
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config() if callable(get_text_config) else config


def finite_or_zero(shift: torch.Tensor) -> torch.Tensor:
    """A per-row shift made safe: 0 where it is not finite (an all -inf row, or NaN, which then stays in the row)."""
    return torch.where(torch.isfinite(shift), shift, 0.0)
