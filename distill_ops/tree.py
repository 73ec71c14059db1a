"""Draft-tree utilities for speculative decoding (EAGLE / EAGLE-2 / FSPAD trees).

A draft tree of ``T`` nodes is a parent array: node 0 is the root (the last committed token, not yet in
the KV cache), ``parents[0] == -1`` and ``0 <= parents[i] < i`` for ``i > 0``. Everything the attention
and verification ops need is derived once from it by :func:`build_tree` into a :class:`TreeSpec`.

:func:`build_tree` and the converters are *setup code*: they read the parent array on the host (one
device-to-host copy when it lives on a GPU) to validate it and to compute host-side sizes (``max_depth``,
leaf count). Build such a tree once per tree shape, not inside the decoding step; the ops that take a
``TreeSpec`` never synchronise with the host.

:func:`tree_spec_from_parents_tensor` is the per-step builder for trees whose parent array is computed on
the device (the speculative engine's EAGLE-2 trees): device ops only, no host read, static shapes. It
cannot know the tree's exact depth, fan-out or leaf count without reading it, so the caller passes
upper bounds (``max_depth``, ``max_children``) and the spec is padded to them (see :class:`TreeSpec`:
every op accepts such a spec). Its ancestor matrix comes from one unit lower-triangular solve: with
``P[i, parents[i]] = 1`` (strictly below the diagonal: parents precede children), ``X = (I + P)^-1 =
I - P + P^2 - ...`` has ``X[i, j] = (-1)^(depth i - depth j)`` when ``j`` is ``i`` or one of its ancestors
and 0 otherwise. Forward substitution only ever adds or subtracts a row of ``X`` (entries -1, 0, 1), so
float32 is exact, and it is one ``solve_triangular`` launch whatever the depth (pointer doubling would
take ``2 log2(depth)`` gathers). That PyTorch path is still about 30 device ops per spec, each one a few
microseconds of host time on a GPU, so on CUDA tensors (``impl="auto"``) the builder is one Triton launch
into one allocation instead (``distill_ops.kernels.tree_spec``: a lockstep walk up the tree per node);
the PyTorch path stays as the CPU path and the kernel's reference, and the two return equal tensors.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ._utils import INT_DTYPES, Impl, check_device, check_int, check_tensor, resolve_impl, to_device_async

#: Largest tree the ops accept. The ancestor bitmask is packed in 64-bit words; up to 64 nodes use
#: one word (the common case pays nothing for the multi-word support).
MAX_TREE_NODES = 256
BITS_PER_WORD = 64


def int64_to_device(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """int64 ``[len(values)]`` tensor of host integers on ``device`` without a host synchronisation.

    ``torch.tensor(values, device="cuda")`` copies from pageable memory and then synchronises the stream;
    here the values are packed by ``array`` (no per-element tensor conversion), pinned and copied with
    ``non_blocking=True`` (the pinned buffer is recycled only after the copy has run). On other devices the
    tensor shares the packed buffer. ``values`` must not be empty.
    """
    host = torch.frombuffer(array("q", values), dtype=torch.int64)
    return host if device.type == "cpu" else to_device_async(host, device)


def _bit_value(bit: int) -> int:
    """The int64 value with only ``bit`` (0..63) set; bit 63 is the sign bit."""
    return -(1 << 63) if bit == 63 else 1 << bit


@dataclass(frozen=True)
class TreeSpec:
    """A validated batch of draft trees (one per sequence, or one shared by every sequence).

    Tensors have a leading tree-batch dim ``Bt`` (1 when built from a 1-D parent array: the tree is
    then shared by every sequence of a batch).

    Attributes:
        parents: int64 ``[Bt, T]``, ``-1`` at the root.
        depth: int64 ``[Bt, T]``, 0 at the root (position id = cache length + depth).
        ancestor_mask: int64 ``[Bt, T, W]`` with ``W = ceil(T / 64)``: bit ``j % 64`` of word ``j // 64``
            of row ``i`` is set iff ``j == i`` or ``j`` is an ancestor of ``i``.
        first_child, next_sibling: int64 ``[Bt, T]``, ``-1`` when none; siblings in node-index order.
        leaf_paths: int64 ``[Bt, L, max_depth + 1]``, ``L >=`` the number of leaves: the leaves' node
            indices root → leaf, one row per leaf in node-index order, then rows of ``-1`` (trees with
            fewer leaves; :func:`tree_spec_from_parents_tensor` always has ``L = T``); ``-1`` padded
            columns after each path.
        max_depth: deepest node's depth over the batch (host int), or an upper bound on it
            (:func:`tree_spec_from_parents_tensor`). Every consumer accepts a bound: the verifiers'
            results are ``[B, max_depth + 1]`` and ``-1`` padded past the accepted path either way, and
            KV compaction skips ``-1`` slots.
        max_children: largest number of children of one node over the batch (host int), or an upper
            bound on it; only sampling verification with ``draft_probs`` reads it (as the number of
            rejection rounds it tabulates; extra rounds are never reached).
    """

    parents: torch.Tensor
    depth: torch.Tensor
    ancestor_mask: torch.Tensor
    first_child: torch.Tensor
    next_sibling: torch.Tensor
    leaf_paths: torch.Tensor
    max_depth: int
    max_children: int

    @property
    def num_nodes(self) -> int:
        return self.parents.shape[1]

    @property
    def batch_size(self) -> int:
        return self.parents.shape[0]

    @property
    def num_words(self) -> int:
        return self.ancestor_mask.shape[2]

    @property
    def device(self) -> torch.device:
        return self.parents.device

    def to(self, device: torch.device | str) -> "TreeSpec":
        tensors = {
            name: getattr(self, name).to(device)
            for name in ("parents", "depth", "ancestor_mask", "first_child", "next_sibling", "leaf_paths")
        }
        return TreeSpec(**tensors, max_depth=self.max_depth, max_children=self.max_children)

    def dense_ancestors(self) -> torch.Tensor:
        """bool ``[Bt, T, T]``: entry ``[b, i, j]`` is bit ``j`` of row ``i`` of the ancestor mask."""
        return unpack_ancestor_mask(self.ancestor_mask, self.num_nodes)


def check_tree_spec(tree: object, name: str = "tree") -> TreeSpec:
    """``tree`` if it is a :class:`TreeSpec` whose kernel-facing tensors agree: int64 ``parents`` and
    ``depth`` ``[Bt, T]`` and ``ancestor_mask`` ``[Bt, T, ceil(T / 64)]``. Shapes and dtypes only (no host
    read of values); a hand-assembled spec with a short mask would otherwise be read past its end."""
    if not isinstance(tree, TreeSpec):
        raise TypeError(f"{name} must be a TreeSpec (see distill_ops.tree.build_tree), got {type(tree).__name__}")
    if tree.parents.dim() != 2:
        raise ValueError(f"{name}.parents must be [Bt, T], got shape {tuple(tree.parents.shape)}")
    batch, num_nodes = tree.parents.shape
    expected = {"parents": (batch, num_nodes), "depth": (batch, num_nodes),
                "ancestor_mask": (batch, num_nodes, (num_nodes + BITS_PER_WORD - 1) // BITS_PER_WORD)}
    for field, shape in expected.items():
        tensor = getattr(tree, field)
        if tensor.dtype != torch.int64 or tuple(tensor.shape) != shape:
            raise (ValueError if tensor.dtype == torch.int64 else TypeError)(
                f"{name}.{field} must be int64 of shape {list(shape)} (from {name}.parents [Bt, T]), got "
                f"{tensor.dtype} {tuple(tensor.shape)}"
            )
    return tree


def unpack_ancestor_mask(ancestor_mask: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """Expand packed int64 words ``[..., T, W]`` to a bool matrix ``[..., T, num_nodes]`` (device-side)."""
    columns = torch.arange(num_nodes, device=ancestor_mask.device)
    words = ancestor_mask[..., columns // BITS_PER_WORD]
    return ((words >> (columns % BITS_PER_WORD)) & 1).bool()


def _validate_parents(parents: object) -> torch.Tensor:
    check_tensor("parents", parents, dtypes=INT_DTYPES)
    if parents.dim() not in (1, 2):
        raise ValueError(f"parents must have shape [T] or [B, T], got {tuple(parents.shape)}")
    host = parents.detach().to("cpu", torch.int64)
    host = host.unsqueeze(0) if host.dim() == 1 else host
    batch, num_nodes = host.shape
    if batch < 1 or num_nodes < 1:
        raise ValueError(f"parents must hold at least one tree of at least one node, got shape {tuple(parents.shape)}")
    if num_nodes > MAX_TREE_NODES:
        raise ValueError(f"trees may have at most {MAX_TREE_NODES} nodes, got T={num_nodes}")
    if (host[:, 0] != -1).any():
        bad = int((host[:, 0] != -1).nonzero()[0, 0])
        raise ValueError(f"parents[..., 0] must be -1 (node 0 is the root), got {int(host[bad, 0])} in tree {bad}")
    index = torch.arange(num_nodes)
    invalid = (host[:, 1:] < 0) | (host[:, 1:] >= index[1:])
    if invalid.any():
        tree_idx, node = (int(x) for x in invalid.nonzero()[0])
        raise ValueError(
            f"parents[{node + 1}] must be in [0, {node + 1}) (a parent precedes its child, which also rules out "
            f"cycles), got {int(host[tree_idx, node + 1])} in tree {tree_idx}"
        )
    return host


def build_tree(parents: torch.Tensor, *, device: torch.device | str | None = None) -> TreeSpec:
    """Validate a parent array and derive everything the tree ops need.

    Args:
        parents: integer tensor ``[T]`` (one tree, shared by the batch) or ``[B, T]`` (one per sequence);
            ``parents[..., 0] == -1`` and ``0 <= parents[..., i] < i``. At most ``MAX_TREE_NODES`` nodes.
        device: where the spec's tensors live (default: ``parents.device``).

    Host-side setup code (see the module docstring). Raises ``ValueError`` / ``TypeError`` on an invalid tree.
    """
    host = _validate_parents(parents)
    device = parents.device if device is None else check_device("device", device)
    batch, num_nodes = host.shape
    num_words = (num_nodes + BITS_PER_WORD - 1) // BITS_PER_WORD
    rows = torch.arange(batch)

    depth = torch.zeros(batch, num_nodes, dtype=torch.int64)
    ancestor_mask = torch.zeros(batch, num_nodes, num_words, dtype=torch.int64)
    ancestor_mask[:, 0, 0] = 1
    for node in range(1, num_nodes):
        parent = host[:, node]
        depth[:, node] = depth[rows, parent] + 1
        ancestor_mask[:, node] = ancestor_mask[rows, parent]
        ancestor_mask[:, node, node // BITS_PER_WORD] |= _bit_value(node % BITS_PER_WORD)

    first_child = torch.full((batch, num_nodes), -1, dtype=torch.int64)
    next_sibling = torch.full((batch, num_nodes), -1, dtype=torch.int64)
    last_child = torch.full((batch, num_nodes), -1, dtype=torch.int64)
    num_children = torch.zeros(batch, num_nodes, dtype=torch.int64)
    for tree_idx in range(batch):
        for node in range(1, num_nodes):
            parent = int(host[tree_idx, node])
            if last_child[tree_idx, parent] < 0:
                first_child[tree_idx, parent] = node
            else:
                next_sibling[tree_idx, int(last_child[tree_idx, parent])] = node
            last_child[tree_idx, parent] = node
            num_children[tree_idx, parent] += 1

    max_depth = int(depth.max())
    is_leaf = num_children == 0
    num_leaves = int(is_leaf.sum(1).max())
    leaf_paths = torch.full((batch, num_leaves, max_depth + 1), -1, dtype=torch.int64)
    for tree_idx in range(batch):
        leaves = is_leaf[tree_idx].nonzero().flatten().tolist()
        for slot, leaf in enumerate(leaves):
            node = leaf
            while node >= 0:
                leaf_paths[tree_idx, slot, int(depth[tree_idx, node])] = node
                node = int(host[tree_idx, node])

    return TreeSpec(
        parents=host.to(device),
        depth=depth.to(device),
        ancestor_mask=ancestor_mask.to(device),
        first_child=first_child.to(device),
        next_sibling=next_sibling.to(device),
        leaf_paths=leaf_paths.to(device),
        max_depth=max_depth,
        max_children=int(num_children.max()),
    )


@torch.library.custom_op("distill_ops::tree_spec", mutates_args=())
def _tree_spec_op(parents: torch.Tensor, max_depth: int) -> torch.Tensor:
    """The Triton spec buffer as an opaque op, for ``torch.compile`` (``kernels/tree_spec.py``)."""
    from .kernels.tree_spec import tree_spec_forward

    return tree_spec_forward(parents, max_depth)


@_tree_spec_op.register_fake
def _(parents, max_depth):
    from .kernels.tree_spec import section_sizes

    return parents.new_empty(sum(section_sizes(*parents.shape, max_depth)))


def _check_device_parents(
    parents: object, max_depth: object, max_children: object
) -> tuple[torch.Tensor, int, int]:
    """The checks of :func:`tree_spec_from_parents_tensor` (no value is read); returns ``parents`` as ``[Bt, T]``,
    and the two bounds as Python ints."""
    check_tensor("parents", parents, dtypes=(torch.int64,))
    if parents.dim() not in (1, 2):
        raise ValueError(f"parents must have shape [T] or [Bt, T], got {tuple(parents.shape)}")
    tree_parents = parents.unsqueeze(0) if parents.dim() == 1 else parents
    batch, num_nodes = tree_parents.shape
    if batch < 1 or not 1 <= num_nodes <= MAX_TREE_NODES:
        raise ValueError(
            f"parents must hold at least one tree of 1 to {MAX_TREE_NODES} nodes, got shape {tuple(parents.shape)}"
        )
    bounds = []
    for name, bound in (("max_depth", max_depth), ("max_children", max_children)):
        bounds.append(check_int(name, bound))
        if not 0 <= bounds[-1] <= num_nodes - 1:
            raise ValueError(f"{name} must be in [0, T - 1 = {num_nodes - 1}] for T={num_nodes} nodes, got {bound}")
    return tree_parents, *bounds


def tree_spec_in_place(
    parents: torch.Tensor, max_depth: int, max_children: int
) -> tuple[TreeSpec, Callable[[], None]]:
    """A :class:`TreeSpec` over a buffer allocated once, and a function that rebuilds it in place (one Triton
    launch, nothing allocated, no view made) from the current values of ``parents``.

    For trees whose parent array is rewritten in place every step (the speculative engine's EAGLE-2 plan):
    the spec's tensors are views of the buffer, valid until the next rebuild, and ``spec.parents`` is
    ``parents`` itself (its ``[1, T]`` view for a 1-D ``parents``). Same arguments and checks as
    :func:`tree_spec_from_parents_tensor`; the Triton path
    only (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``). The spec is undefined until the first
    rebuild."""
    tree_parents, max_depth, max_children = _check_device_parents(parents, max_depth, max_children)
    resolve_impl("triton", tree_parents.device)  # raises for CPU tensors without the interpreter
    from .kernels.tree_spec import section_sizes, tree_spec_forward

    batch, num_nodes = tree_parents.shape
    buffer = torch.empty(sum(section_sizes(batch, num_nodes, max_depth)), dtype=torch.int64,
                         device=tree_parents.device)

    def rebuild() -> None:
        tree_spec_forward(tree_parents, max_depth, out=buffer)

    return _spec_over_buffer(tree_parents, buffer, max_depth, max_children), rebuild


def _spec_over_buffer(tree_parents: torch.Tensor, buffer: torch.Tensor, max_depth: int, max_children: int) -> TreeSpec:
    """The :class:`TreeSpec` whose derived tensors are views of the tree-spec kernel's int64 ``buffer``."""
    from .kernels.tree_spec import split_tree_spec

    batch, num_nodes = tree_parents.shape
    depth, ancestor_mask, first_child, next_sibling, leaf_paths = split_tree_spec(buffer, batch, num_nodes, max_depth)
    return TreeSpec(parents=tree_parents, depth=depth, ancestor_mask=ancestor_mask, first_child=first_child,
                    next_sibling=next_sibling, leaf_paths=leaf_paths, max_depth=max_depth, max_children=max_children)


def tree_spec_from_parents_tensor(
    parents: torch.Tensor, max_depth: int, max_children: int, *, impl: Impl = "auto"
) -> TreeSpec:
    """A :class:`TreeSpec` from a parent array that lives on the device, without reading it on the host.

    Args:
        parents: int64 ``[T]`` (one tree, shared by the batch) or ``[Bt, T]``, ``1 <= T <=
            MAX_TREE_NODES``, satisfying ``parents[..., 0] == -1`` and ``0 <= parents[..., i] < i``.
            The values are *not* validated (that would read them): an invalid array gives an invalid but
            memory-safe spec. Use :func:`build_tree` for untrusted input.
        max_depth: host int ``>=`` the deepest node's depth, ``<= T - 1``; the spec's ``max_depth`` and
            ``leaf_paths`` width (``max_depth + 1``) are this bound. The ops trust it (the verifiers write
            one result slot per depth): it must not understate the depth.
        max_children: host int ``>=`` the largest number of children of one node, ``<= T - 1``.
        impl: ``"triton"`` (one kernel launch and one allocation per call; CUDA tensors, or CPU tensors
            under ``TRITON_INTERPRET=1``), ``"torch"`` (about 30 device ops) or ``"auto"`` (Triton on CUDA
            tensors, PyTorch otherwise). Both return the same tensors.

    Returns a spec on ``parents``' device whose tensors equal :func:`build_tree`'s up to padding:
    ``leaf_paths`` has ``T`` rows (the leaves' paths in node order, then ``-1`` rows) and ``max_depth + 1``
    columns. The same work for every tree of ``T`` nodes; no host synchronisation, no host-to-device
    copy; traceable by ``torch.compile(fullgraph=True)`` (the Triton launch as one opaque op). On the
    Triton path the derived tensors are views of one buffer.
    """
    tree_parents, max_depth, max_children = _check_device_parents(parents, max_depth, max_children)
    batch, num_nodes = tree_parents.shape
    if resolve_impl(impl, tree_parents.device) == "triton":
        from .kernels.tree_spec import tree_spec_forward

        # Eager calls launch directly: the custom op that makes the launch traceable costs a dispatcher
        # round trip of host time (several ATen ops' worth), which this builder exists to save.
        launch = _tree_spec_op if torch.compiler.is_compiling() else tree_spec_forward
        return _spec_over_buffer(tree_parents, launch(tree_parents, max_depth), max_depth, max_children)
    device = tree_parents.device
    nodes = torch.arange(num_nodes, device=device)
    child_of = tree_parents[:, None, :] == nodes[:, None]  # [Bt, parent, child]

    # Ancestors (self included): X = (I + P)^-1, nonzero exactly at them (see the module docstring).
    parent_matrix = child_of.transpose(1, 2).to(torch.float32)  # [Bt, node, parent]
    identity = torch.eye(num_nodes, device=device).expand(batch, -1, -1)
    solution = torch.linalg.solve_triangular(parent_matrix, identity, upper=False, unitriangular=True)
    ancestors = solution != 0  # [Bt, node, ancestor]
    depth = ancestors.sum(-1) - 1

    # Distinct bits: their int64 sum is their bitwise or (bit 63 is the sign bit, -2**63).
    num_words = (num_nodes + BITS_PER_WORD - 1) // BITS_PER_WORD
    if num_words == 1:
        ancestor_mask = (ancestors * torch.bitwise_left_shift(1, nodes)).sum(-1, keepdim=True)
    else:
        padded = torch.nn.functional.pad(ancestors, (0, num_words * BITS_PER_WORD - num_nodes))
        bit_values = torch.bitwise_left_shift(1, torch.arange(BITS_PER_WORD, device=device))
        ancestor_mask = (padded.view(batch, num_nodes, num_words, BITS_PER_WORD) * bit_values).sum(-1)

    # First child and next sibling: the smallest qualifying node index (num_nodes for none, then -1).
    later_sibling = (tree_parents[:, :, None] == tree_parents[:, None, :]) & (nodes > nodes[:, None])
    links = torch.where(torch.stack([child_of, later_sibling]), nodes, num_nodes).amin(-1)
    links = torch.where(links == num_nodes, -1, links)

    # Every node's root path (the ancestor at each depth), then the leaves' paths moved to the top rows.
    # Non-ancestors (and, for a max_depth too small, anything deeper) go to a dump column / row.
    dump_column = max_depth + 1
    column = torch.where(ancestors, depth[:, None, :], dump_column).clamp_max(dump_column)
    paths = torch.full((batch, num_nodes, max_depth + 2), -1, dtype=torch.int64, device=device)
    paths.scatter_(2, column, nodes.expand(batch, num_nodes, num_nodes))
    is_leaf = links[0] < 0
    row = torch.where(is_leaf, is_leaf.cumsum(1) - 1, num_nodes)
    leaf_paths = torch.full((batch, num_nodes + 1, max_depth + 1), -1, dtype=torch.int64, device=device)
    leaf_paths.scatter_(1, row[:, :, None].expand(-1, -1, max_depth + 1), paths[:, :, : max_depth + 1])

    return TreeSpec(
        parents=tree_parents,
        depth=depth,
        ancestor_mask=ancestor_mask,
        first_child=links[0],
        next_sibling=links[1],
        leaf_paths=leaf_paths[:, :num_nodes],
        max_depth=max_depth,
        max_children=max_children,
    )


def tree_from_paths(paths: Sequence[Sequence[int]]) -> torch.Tensor:
    """EAGLE-style tree choices → parent array (int64 ``[T]``, ``T = len(paths) + 1``), breadth-first.

    Each path is a list of child ranks from the root, e.g. ``[[0], [1], [0, 0], [0, 1]]``; a rank orders
    siblings (smaller rank = earlier node). Nodes are numbered by (depth, path): the root is node 0, then
    the depth-1 nodes in rank order, and so on. Every proper prefix of a path must itself be a path.
    """
    index = {(): 0}
    parents = [-1]
    for path in ordered_paths(paths):
        if path[:-1] not in index:
            raise ValueError(f"path {list(path)} has no parent path {list(path[:-1])} in paths")
        index[path] = len(parents)
        parents.append(index[path[:-1]])
    if len(parents) > MAX_TREE_NODES:
        raise ValueError(f"trees may have at most {MAX_TREE_NODES} nodes, got T={len(parents)}")
    return torch.tensor(parents, dtype=torch.int64)


def ordered_paths(paths: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """The validated paths as tuples in :func:`tree_from_paths`' node order (node ``i + 1`` is entry ``i``): by
    depth, then by path. A node's rank, ``path[-1]``, picks the parent's ``rank``-th most likely token when a
    drafter fills the tree (ranks may skip values: ``[[0], [2]]`` drafts the top-1 and top-3 tokens)."""
    if not isinstance(paths, (list, tuple)):
        raise TypeError(f"paths must be a list of lists of ints, got {type(paths).__name__}")
    keys = []
    for path in paths:
        if not isinstance(path, (list, tuple)) or len(path) == 0:
            raise ValueError(f"each path must be a non-empty list of child ranks, got {path!r}")
        try:
            keys.append(tuple(check_int("child rank", rank, low=0) for rank in path))
        except (TypeError, ValueError):
            raise ValueError(f"child ranks must be non-negative ints, got {path!r}") from None
    if len(set(keys)) != len(keys):
        repeated = next(list(key) for key in keys if keys.count(key) > 1)
        raise ValueError(f"paths must be distinct, got {repeated} more than once")
    return sorted(keys, key=lambda p: (len(p), p))


def _single_tree_parents(tree: TreeSpec | torch.Tensor, batch_index: object) -> list[int]:
    trees = tree.parents if isinstance(tree, TreeSpec) else _validate_parents(tree)
    batch_index = check_int("batch_index", batch_index, low=0)
    if batch_index >= trees.shape[0]:
        raise ValueError(f"batch_index must be in [0, {trees.shape[0]}) (the number of trees), got {batch_index}")
    return trees[batch_index].tolist()


def paths_from_tree(tree: TreeSpec | torch.Tensor, batch_index: int = 0) -> list[list[int]]:
    """Inverse of :func:`tree_from_paths`: the child-rank path of every non-root node, in node order.

    A node's rank is its position among its parent's children in node-index order. For a tree that is
    already breadth-first with rank-ordered siblings, ``tree_from_paths(paths_from_tree(p))`` equals ``p``.
    ``batch_index`` picks one tree of a batch: an int in ``[0, number of trees)``.
    """
    parents = _single_tree_parents(tree, batch_index)
    paths: list[list[int]] = [[]]
    children_seen = [0] * len(parents)
    for node in range(1, len(parents)):
        parent = parents[node]
        paths.append(paths[parent] + [children_seen[parent]])
        children_seen[parent] += 1
    return paths[1:]


def tree_to_retrieve(tree: TreeSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SGLang-style retrieve arrays ``(retrive_index, retrive_next_token, retrive_next_sibling)``, each
    int64 ``[Bt, T]``: the flat index ``b * T + i`` of each draft token, each node's first child and each
    node's next sibling (``-1`` when none; siblings in node-index order). Device-side, no host sync."""
    check_tree_spec(tree)
    batch, num_nodes = tree.parents.shape
    index = torch.arange(batch * num_nodes, device=tree.device, dtype=torch.int64).view(batch, num_nodes)
    return index, tree.first_child.clone(), tree.next_sibling.clone()


def tree_from_retrieve(retrive_next_token: torch.Tensor, retrive_next_sibling: torch.Tensor) -> torch.Tensor:
    """Parent array (int64, same shape) from SGLang's first-child / next-sibling arrays ``[T]`` or ``[B, T]``.

    Host-side setup code. The sibling chains may list children in any order; the parent array (and so
    the verification order, which is node-index order) does not depend on it.
    """
    check_tensor("retrive_next_token", retrive_next_token, dtypes=INT_DTYPES)
    check_tensor("retrive_next_sibling", retrive_next_sibling, dtypes=INT_DTYPES)
    if retrive_next_token.shape != retrive_next_sibling.shape or retrive_next_token.dim() not in (1, 2):
        raise ValueError(
            "retrive_next_token and retrive_next_sibling must both have shape [T] or [B, T], got "
            f"{tuple(retrive_next_token.shape)} and {tuple(retrive_next_sibling.shape)}"
        )
    first = retrive_next_token.detach().to("cpu", torch.int64)
    sibling = retrive_next_sibling.detach().to("cpu", torch.int64)
    squeeze = first.dim() == 1
    first, sibling = (first.unsqueeze(0), sibling.unsqueeze(0)) if squeeze else (first, sibling)
    batch, num_nodes = first.shape
    if batch == 0 or num_nodes == 0:
        raise ValueError(
            "retrive_next_token and retrive_next_sibling must hold at least one tree of at least one node, got "
            f"shape {tuple(retrive_next_token.shape)}"
        )
    root_siblings = sibling[:, 0]
    if (root_siblings != -1).any():
        tree_idx = int((root_siblings != -1).nonzero()[0, 0])
        raise ValueError(
            f"retrive_next_sibling of tree {tree_idx}: the root (node 0) has no siblings, so its entry must be -1, "
            f"got {int(root_siblings[tree_idx])}"
        )
    parents = torch.full((batch, num_nodes), -2, dtype=torch.int64)
    for tree_idx in range(batch):
        parents[tree_idx, 0] = -1
        for node in range(num_nodes):
            child = int(first[tree_idx, node])
            steps = 0
            while child != -1:
                if not 0 < child < num_nodes or parents[tree_idx, child] != -2 or steps > num_nodes:
                    raise ValueError(
                        f"retrieve arrays of tree {tree_idx} do not describe a tree (node {child} reached "
                        f"twice or out of [1, {num_nodes}))"
                    )
                parents[tree_idx, child] = node
                child = int(sibling[tree_idx, child])
                steps += 1
    if (parents == -2).any():
        raise ValueError("retrieve arrays leave some nodes unreachable from the root")
    child_first = parents >= torch.arange(num_nodes)
    if child_first.any():
        tree_idx, node = (int(i) for i in child_first.nonzero()[0])
        raise ValueError(
            f"retrieve arrays of tree {tree_idx}: node {node} is a child of node {int(parents[tree_idx, node])}; "
            f"nodes must be numbered with every parent before its children (a parent array has parents[i] < i)"
        )
    _validate_parents(parents)
    return parents[0] if squeeze else parents
