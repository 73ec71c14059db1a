"""A :class:`~distill_ops.tree.TreeSpec` from a device parent array in one launch (no host read).

``tree_spec_kernel`` runs one program per tree (grid ``Bt``) over ``parents [Bt, T]`` (int64, any
strides, valid by contract: ``parents[b, 0] == -1`` and ``0 <= parents[b, i] < i``; ``T <= 256``) and
writes every derived tensor of the spec into one int64 buffer that the launcher allocates: a spec costs
one allocation and one launch, where the PyTorch builder runs about 30 ops. The results equal
:func:`~distill_ops.tree.tree_spec_from_parents_tensor`'s PyTorch path exactly (same padding).

**Ancestors and depth by walking up.** Every node walks to the root in lockstep, vectorised over the
``BLOCK_T`` nodes: ``anc_0 = i`` and ``anc_d = parents[anc_{d-1}]`` for ``d = 1 .. max_depth``, one
gather from the (L1-resident) parent row per step. ``depth[i]`` is the number of steps that reach a
valid node and every valid ``anc_d`` sets its bit in the node's ancestor words (a ``[BLOCK_T, BLOCK_W]``
register tile; distinct bits, so ``|`` and ``+`` agree and bit 63 is the sign bit). ``max_depth`` is the
caller's host bound (``>=`` the true depth), a runtime loop bound: the depth needs no compilation of its
own. Pointer doubling would take ``log2`` steps but needs each level's ancestor table; the engine's
trees are five levels deep.

**First child and next sibling** are minima over node pairs: ``first_child[p] = min{j : parents[j] == p}``
and ``next_sibling[i] = min{j > i : parents[j] == parents[i]}`` (``-1`` when none), reduced over
``[BLOCK_T, CHUNK]`` comparison tiles, ``CHUNK = 4096 / BLOCK_T`` columns at a time (4096 int32 entries
per tile: no spills at 4 warps). ``O(T^2)`` comparisons, 2 * 65536 at ``T = 256``: nothing next to a
launch.

**Leaf paths without a fill.** Row ``r`` of ``leaf_paths [T, max_depth + 1]`` belongs to the ``r``-th
leaf in node order (an exclusive ``tl.cumsum`` of ``is_leaf``); the non-leaves take the rows after the
last leaf, in node order, and write ``-1`` across them. A second walk up writes, at step ``d``, leaf
``i``'s ancestor ``anc_d`` into column ``depth[i] - d`` (``d <= depth[i]``) and ``-1`` into column
``depth[i] + d`` (``1 <= d``, ``depth[i] + d <= max_depth``), and a non-leaf's ``-1`` into column ``d``:
over ``d = 0 .. max_depth`` every cell of every row is written exactly once. No ``-1`` fill followed by
scattered stores, so no write-after-write race inside the program and no barrier.

**Broken contracts stay memory-safe** (the values are not validated: that would read them): a parent
outside ``[0, T)`` ends a walk like the root's ``-1`` (every gather stays in the parent row), and a
``max_depth`` below the true depth stops the walk early, so every depth, row and column index stays in
its section.

**Layout.** The buffer is section-major: ``depth [Bt, T]``, ``ancestor_mask [Bt, T, W]``,
``first_child [Bt, T]``, ``next_sibling [Bt, T]``, ``leaf_paths [Bt, T, max_depth + 1]``, each
contiguous, returned as views. ``W = ceil(T / 64)``.

**Compilations.** ``BLOCK_T`` is ``T`` padded to 64, 128 or 256 (``BLOCK_W = BLOCK_T / 64`` words); the
sizes, the depth bound and the section offsets change with every tree shape and are excluded from
Triton's value specialisation (``do_not_specialize``), so three compilations cover every tree with a
unit-stride parent row (the engine's: at its default sizes every tree, T <= 32, uses the 64 one). 4 warps: 93-168
registers, no spills, under Triton 3.6 and 3.9 for sm_80 and sm_90a (``benchmarks/compile_check.py``).

**Host cost** (what this kernel is for; CPU counts of ``benchmarks/engine_overhead.py``, tiny tree-greedy
pair, depth 5, T = 32, Triton path under the interpreter): the tree phase of an engine step went from
293 ATen ops (183 device kernels, 0 Triton launches) to 103 (43 kernels, 5 allocations, 5 launches);
each spec is now an ``empty``, the launch, a ``split`` and five views. GPU time not measured.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._device import on_input_device
from ._launch import LAUNCH_OPTIONS

BITS_PER_WORD = 64
BLOCK_T_SIZES = (64, 128, 256)
TILE_ENTRIES = 4096
NUM_WARPS = 4


@triton.jit
def _step_up(parents_row, anc, stride_pt, num_nodes):
    """Each node's next ancestor (-1 past the root). A parent outside [0, T) (a broken contract) also
    ends the walk: every later gather stays inside the parent row."""
    up = tl.load(parents_row + anc * stride_pt, mask=anc >= 0, other=-1)
    return tl.where((up >= 0) & (up < num_nodes), up, -1)


@triton.jit
def _ancestor_bits(anc, words):
    """``[BLOCK_T, BLOCK_W]``: bit ``anc % 64`` in word ``anc // 64`` of each row (nothing for -1, whose
    word index -1 matches no word)."""
    one = tl.full(anc.shape, 1, tl.int64)
    return tl.where((anc >> 6)[:, None] == words[None, :], (one << (anc & 63))[:, None], 0)


@triton.jit
def _store_path_cells(row_base, anc, depth, is_leaf, valid, step, max_depth):
    """Step ``step`` of the leaf-path walk: a leaf's ``anc_step`` into column ``depth - step`` and ``-1``
    into column ``depth + step``; a non-leaf's ``-1`` into column ``step`` (disjoint cells over all steps)."""
    path_column = tl.where(is_leaf, depth - step, step)
    tl.store(row_base + path_column, tl.where(is_leaf, anc, -1), mask=valid & (path_column >= 0))
    pad_column = depth + step
    tl.store(row_base + pad_column, tl.full(anc.shape, -1, tl.int64),
             mask=is_leaf & (step > 0) & (pad_column <= max_depth))


# The sizes and offsets change with every tree shape: one compilation per BLOCK_T (module docstring).
@triton.jit(do_not_specialize=["stride_pb", "num_nodes", "num_words", "max_depth", "off_anc", "off_first", "off_next",
                               "off_paths"])
def tree_spec_kernel(
    PARENTS, OUT, stride_pb, stride_pt, num_nodes, num_words, max_depth,
    off_anc, off_first, off_next, off_paths,
    BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr, CHUNK: tl.constexpr,
):
    """One tree per program: depth, ancestor words, first child, next sibling and leaf paths into the
    sections of OUT (module docstring)."""
    tree = tl.program_id(0).to(tl.int64)
    nodes = tl.arange(0, BLOCK_T)
    valid = nodes < num_nodes
    parents_row = PARENTS + tree * stride_pb
    parents = tl.load(parents_row + nodes * stride_pt, mask=valid, other=-1)
    words = tl.arange(0, BLOCK_W)

    # Walk up max_depth steps from anc_0 = the node itself: depth and ancestor bits.
    start = tl.where(valid, nodes, -1).to(tl.int64)
    anc = start
    depth = tl.zeros([BLOCK_T], tl.int64)
    mask_words = _ancestor_bits(anc, words)
    for _ in range(0, max_depth):
        anc = _step_up(parents_row, anc, stride_pt, num_nodes)
        depth += (anc >= 0).to(tl.int64)
        mask_words = mask_words | _ancestor_bits(anc, words)

    # First child / next sibling: smallest matching index over [BLOCK_T, CHUNK] tiles (BLOCK_T: none).
    parents32 = parents.to(tl.int32)
    nodes32 = nodes.to(tl.int32)
    first_child = tl.full([BLOCK_T], BLOCK_T, tl.int32)
    next_sibling = tl.full([BLOCK_T], BLOCK_T, tl.int32)
    for chunk_start in range(0, BLOCK_T, CHUNK):
        cols = chunk_start + tl.arange(0, CHUNK)
        # -2 matches nothing: neither a node index nor the root's -1.
        col_parents = tl.load(parents_row + cols * stride_pt, mask=cols < num_nodes, other=-2).to(tl.int32)
        child = col_parents[None, :] == nodes32[:, None]
        first_child = tl.minimum(first_child, tl.min(tl.where(child, cols[None, :], BLOCK_T), axis=1))
        sibling = (col_parents[None, :] == parents32[:, None]) & (cols[None, :] > nodes32[:, None])
        next_sibling = tl.minimum(next_sibling, tl.min(tl.where(sibling, cols[None, :], BLOCK_T), axis=1))
    first_child = tl.where(first_child == BLOCK_T, -1, first_child).to(tl.int64)
    next_sibling = tl.where(next_sibling == BLOCK_T, -1, next_sibling).to(tl.int64)

    node_base = tree * num_nodes
    tl.store(OUT + node_base + nodes, depth, mask=valid)
    anc_offsets = (node_base + nodes)[:, None] * num_words + words[None, :]
    tl.store(OUT + off_anc + anc_offsets, mask_words, mask=valid[:, None] & (words[None, :] < num_words))
    tl.store(OUT + off_first + node_base + nodes, first_child, mask=valid)
    tl.store(OUT + off_next + node_base + nodes, next_sibling, mask=valid)

    # Leaf rows first (node order), then the non-leaves' rows; every cell written once (module docstring).
    is_leaf = valid & (first_child < 0)
    leaf_flags = is_leaf.to(tl.int32)
    leaf_rank = tl.cumsum(leaf_flags, axis=0) - leaf_flags
    row = tl.where(is_leaf, leaf_rank, tl.sum(leaf_flags, axis=0) + nodes - leaf_rank)
    row_base = OUT + off_paths + (node_base + row) * (max_depth + 1)
    anc = start
    _store_path_cells(row_base, anc, depth, is_leaf, valid, 0, max_depth)
    for step in range(1, max_depth + 1):
        anc = _step_up(parents_row, anc, stride_pt, num_nodes)
        _store_path_cells(row_base, anc, depth, is_leaf, valid, step, max_depth)


def block_sizes(num_nodes: int) -> tuple[int, int, int]:
    """``(BLOCK_T, BLOCK_W, CHUNK)`` for a tree of ``num_nodes <= 256`` nodes."""
    block_t = next(size for size in BLOCK_T_SIZES if size >= num_nodes)
    return block_t, block_t // BITS_PER_WORD, TILE_ENTRIES // block_t


def section_sizes(batch: int, num_nodes: int, max_depth: int) -> list[int]:
    """Elements of the buffer's sections: depth, ancestor_mask, first_child, next_sibling, leaf_paths."""
    nodes = batch * num_nodes
    return [nodes, nodes * ((num_nodes + BITS_PER_WORD - 1) // BITS_PER_WORD), nodes, nodes, nodes * (max_depth + 1)]


@on_input_device
def tree_spec_forward(parents: torch.Tensor, max_depth: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The int64 buffer of the spec of ``parents [Bt, T]`` (int64, any strides, ``1 <= T <= 256``, a valid
    parent array: not checked here) for the depth bound ``max_depth``: one ``torch.empty`` (none with ``out``,
    a buffer of ``sum(section_sizes(...))`` elements rewritten in place) and one launch.
    :func:`split_tree_spec` views it as the spec's tensors (module docstring)."""
    batch, num_nodes = parents.shape
    sizes = section_sizes(batch, num_nodes, max_depth)
    buffer = torch.empty(sum(sizes), dtype=torch.int64, device=parents.device) if out is None else out
    offsets = [sum(sizes[:section]) for section in range(1, len(sizes))]
    num_words = (num_nodes + BITS_PER_WORD - 1) // BITS_PER_WORD
    block_t, block_w, chunk = block_sizes(num_nodes)
    tree_spec_kernel[(batch,)](
        parents, buffer, parents.stride(0), parents.stride(1), num_nodes, num_words, max_depth, *offsets,
        BLOCK_T=block_t, BLOCK_W=block_w, CHUNK=chunk, num_warps=NUM_WARPS, **LAUNCH_OPTIONS,
    )
    return buffer


def split_tree_spec(
    buffer: torch.Tensor, batch: int, num_nodes: int, max_depth: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(depth [Bt, T], ancestor_mask [Bt, T, W], first_child [Bt, T], next_sibling [Bt, T],
    leaf_paths [Bt, T, max_depth + 1])``: views of :func:`tree_spec_forward`'s buffer."""
    depth, ancestor_mask, first_child, next_sibling, leaf_paths = buffer.split(
        section_sizes(batch, num_nodes, max_depth)
    )
    return (
        depth.view(batch, num_nodes),
        ancestor_mask.view(batch, num_nodes, -1),
        first_child.view(batch, num_nodes),
        next_sibling.view(batch, num_nodes),
        leaf_paths.view(batch, num_nodes, max_depth + 1),
    )


def aot_specs() -> list[dict]:
    """Every compilation the launcher makes: one per ``BLOCK_T`` bucket."""
    specs = []
    for block_t in BLOCK_T_SIZES:
        _, block_w, chunk = block_sizes(block_t)
        specs.append({
            "name": f"tree_spec_t{block_t}",
            "fn": tree_spec_kernel,
            "signature": {
                "PARENTS": "*i64", "OUT": "*i64", "stride_pb": "i32", "stride_pt": "i32", "num_nodes": "i32",
                "num_words": "i32", "max_depth": "i32", "off_anc": "i32", "off_first": "i32", "off_next": "i32",
                "off_paths": "i32",
            },
            "constexprs": {"BLOCK_T": block_t, "BLOCK_W": block_w, "CHUNK": chunk},
            "num_warps": NUM_WARPS,
            "num_stages": 3,
        })
    return specs
