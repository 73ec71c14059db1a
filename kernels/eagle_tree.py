"""EAGLE-2 candidate bookkeeping on the device: one launch per drafting level and one for the final tree.

The speculative engine's dynamic trees (``distill_ops.speculative._DynamicPlan``) number every drafted
token as a *candidate* in creation order: 0 is the root, and every other candidate sits in a row of
``k`` (the ``k`` best children of one node of the draft model's tree, as ``torch.topk`` returned them):
candidate ``1 + r * k + p`` is position ``p`` of row ``r``, and row ``r`` belongs to draft-tree node ``r``
(node 0 the root; the nodes a level expands are numbered after the previous level's). A level's rows
are contiguous, so are its candidates. A candidate's score is its parent node's score plus its draft
log-probability, in float64 (``parent + float64(value)``: the sum the PyTorch path computes), and the
ranking is always "score descending, then candidate index ascending".

**Buffers.** Two workspaces per plan, allocated once (nothing is allocated per step): a float64 one
(``candidate_scores [C]``, ``node_scores [N]``) and an int64 one (``candidate_tokens [C]``,
``node_candidates [N]``, ``node_parents [N]``, ``node_tokens [N]``, ``node_positions [N]``,
``tree_parents [T]``, ``tree_tokens [T]``), ``C`` candidates, ``N`` draft-tree nodes, ``T`` verification
nodes. Node 0's entries (score 0, candidate 0, parent -1) are written once by the caller. What the
engine hands on is views of these: the draft tree's parent array is the prefix ``node_parents[:n]``
(grown in place, no ``cat``), a level's expanded tokens and position ids are ``node_tokens`` /
``node_positions`` slices, the verification tree is ``tree_parents`` / ``tree_tokens``. The kernels
take the workspaces' base pointers and section offsets (not views: a view's address may be only 8-byte
aligned, which Triton would compile separately).

**Level kernel** (``eagle_level_kernel``, one program): from the level's ``values [E, k]`` (float32
log-probabilities, rows sorted descending: ``torch.topk``'s order) and ``indices [E, k]``, and the
parents' ``node_scores``, it writes every candidate's score and token; then ranks the candidates
exactly, ``rank_i = #{j : s_j > s_i} + #{j < i : s_j == s_i}`` by pairwise comparisons over
``[BLOCK_I, BLOCK_J]`` tiles (no sort: ties and ``-inf`` need no special case), and each of the
``E_next`` best (``rank < E_next``) writes, at node ``node_base + rank``, its score, candidate index,
parent node (its row), token and position id (``root_pos + level``, a runtime argument).

**Final kernel** (``eagle_select_kernel``, one program): ranks every candidate the same way, the last
level's computed from its ``values`` / ``indices`` (so that level needs no launch of its own), keeps
the best ``T`` (the root first: score 0 is the highest, index 0 the lowest) and writes them in
candidate-index order (breadth-first: candidates are created level by level) into ``tree_parents`` /
``tree_tokens`` (the root's token a runtime argument). A kept candidate's parent is kept too (a child
scores ``<=`` its parent and comes later), and a kept candidate's node in the verification tree is the
number of kept candidates before it: so is its parent's. Two passes: the first finds the ``T``-th best
candidate (the threshold; ranks are distinct, so exactly one has rank ``T - 1``), the second counts,
for each kept candidate, the kept candidates before it and before its parent (``kept_j`` is "at least
as good as the threshold", recomputed per tile): no scratch memory, no barrier, every output written
once.

**Only contenders are ranked.** Row values are sorted, so position ``p`` of a row is beaten by the
``p`` before it. With ``m`` places to fill (``E_next`` at a level, ``T - 1`` after the root at the end),
positions ``p >= m`` cannot place, and leaving them out changes no rank below ``m``: if such a
candidate beat a contender, so would the ``m`` candidates before it in its row (and the root), all
contenders, so that contender cannot place either (this relies on ``torch.topk``'s sorted rows).
So ``E * min(k, m)`` candidates are ranked per level (``1 + N * min(k, T - 1)`` at the end):
``O(contenders^2)`` comparisons, ``69^2`` at the engine's default ``depth=5, topk=4, num_nodes=32``.

**Batches.** One program per sequence (``grid = (B,)``): the level inputs are ``[B, E, k]``, the
workspaces ``[B, size]`` (program ``b`` offsets every pointer by its row's strides), and with ``PER_ROW``
each sequence's position ids and root token are the scalar argument plus its own entry of an int64 ``[B]``
tensor (the engine's sequences have different lengths and roots). Without ``PER_ROW`` (one sequence) they are
host integers: the engine's batch-size-1 step copies nothing to the device for them.

**Compilations.** Two per kernel (``PER_ROW`` off and on): ``[BLOCK_I, BLOCK_J] = [64, 32]`` comparison tiles
(2048 entries; 64 x 64 tiles made the final kernel spill for sm_90a under Triton 3.6), loops over the sizes,
which are runtime arguments excluded from value specialisation (``do_not_specialize``) with the strides, the
offsets, the position and the root token. 4 warps, no spills, Triton 3.6 and 3.9, sm_80 and sm_90a
(``benchmarks/compile_check.py``): level kernel 80-96 registers, final kernel 128-164.

**Host cost** (what these kernels are for; CPU counts of ``benchmarks/engine_overhead.py --impl triton``,
tiny tree-greedy and tree-sampling pairs, depth 5, T = 32, under the interpreter): the tree phase of an
engine step went from 103 ATen ops (43 device kernels, 5 allocations, 55 metadata ops; 5 Triton
launches) to 40 (no device kernel, 5 allocations, 35 metadata ops: the five specs' ``empty``,
``split`` and views) and 10 Triton launches, then to no ATen op at all once the specs were rebuilt in place
over buffers and views the plan makes once (:func:`distill_ops.tree.tree_spec_in_place`). GPU time not
measured.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._device import on_input_device
from ._launch import LAUNCH_OPTIONS

BLOCK_I = 64
BLOCK_J = 32
NUM_WARPS = 4
FLOAT_SECTIONS = ("candidate_scores", "node_scores")
INT_SECTIONS = (
    "candidate_tokens", "node_candidates", "node_parents", "node_tokens", "node_positions", "tree_parents",
    "tree_tokens",
)


@triton.jit
def _beats(score_j, cand_j, score_i, cand_i):
    """``[I, J]``: candidate ``j`` ranks before candidate ``i`` (higher score, then lower index)."""
    same = score_j[None, :] == score_i[:, None]
    return (score_j[None, :] > score_i[:, None]) | (same & (cand_j[None, :] < cand_i[:, None]))


@triton.jit
def _level_contender(q, valid, keep, k, row_base, VALUES, stride_v, NODE_SCORES):
    """Contender ``q`` of a level (``keep`` per row): its row, position in the row, index in the level
    and score (parent + value, float64)."""
    row = q // keep
    position = q - row * keep
    value = tl.load(VALUES + row * stride_v + position, mask=valid, other=0.0)
    parent_score = tl.load(NODE_SCORES + row_base + row, mask=valid, other=0.0)
    return row, position, row * k + position, parent_score + value.to(tl.float64)


# Sizes, offsets and the position change with every level and plan: one compilation (module docstring).
@triton.jit
def _sequence(VALUES, INDICES, FLOATS, INTS, stride_vb, stride_ib, float_stride, int_stride, ROW_VALUES, scalar,
              PER_ROW: tl.constexpr):
    """Program ``b``'s sequence of a batch: its level inputs and workspace rows, and ``scalar`` plus its own
    ``ROW_VALUES[b]`` when ``PER_ROW`` (position ids, root tokens)."""
    b = tl.program_id(0)
    if PER_ROW:
        scalar = scalar + tl.load(ROW_VALUES + b)
    return (VALUES + b * stride_vb, INDICES + b * stride_ib, FLOATS + b * float_stride, INTS + b * int_stride,
            scalar)


@triton.jit(do_not_specialize=["stride_vb", "stride_v", "stride_ib", "stride_i", "float_stride", "int_stride",
                               "num_rows", "k", "num_expand", "keep", "row_base", "node_base", "position",
                               "off_scores", "off_node_scores", "off_tokens", "off_node_cand", "off_parents",
                               "off_node_tokens", "off_positions"])
def eagle_level_kernel(
    VALUES, INDICES, FLOATS, INTS, ROW_POSITIONS, stride_vb, stride_v, stride_ib, stride_i, float_stride, int_stride,
    num_rows, k, num_expand, keep, row_base, node_base, position,
    off_scores, off_node_scores, off_tokens, off_node_cand, off_parents, off_node_tokens, off_positions,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, PER_ROW: tl.constexpr,
):
    """One drafting level of sequence ``program_id(0)``: its candidates' scores and tokens, then its
    ``num_expand`` best as draft-tree nodes ``node_base ..`` (module docstring)."""
    VALUES, INDICES, FLOATS, INTS, position = _sequence(VALUES, INDICES, FLOATS, INTS, stride_vb, stride_ib,
                                                        float_stride, int_stride, ROW_POSITIONS, position, PER_ROW)
    node_scores = FLOATS + off_node_scores
    cand_base = 1 + row_base * k
    offsets_i = tl.arange(0, BLOCK_I)
    offsets_j = tl.arange(0, BLOCK_J)

    # Every candidate of the level: score (parent + value, float64) and token.
    level_size = num_rows * k
    for start in range(0, level_size, BLOCK_I):
        q = start + offsets_i
        valid = q < level_size
        row, column, _, score = _level_contender(q, valid, k, k, row_base, VALUES, stride_v, node_scores)
        token = tl.load(INDICES + row * stride_i + column, mask=valid, other=0)
        tl.store(FLOATS + off_scores + cand_base + q, score, mask=valid)
        tl.store(INTS + off_tokens + cand_base + q, token, mask=valid)

    # Exact ranks of the contenders (the first `keep` of each row); the best num_expand become nodes.
    num_contenders = num_rows * keep
    for start_i in range(0, num_contenders, BLOCK_I):
        q_i = start_i + offsets_i
        valid_i = q_i < num_contenders
        row_i, position_i, local_i, score_i = _level_contender(q_i, valid_i, keep, k, row_base, VALUES, stride_v,
                                                               node_scores)
        rank = tl.zeros([BLOCK_I], tl.int32)
        for start_j in range(0, num_contenders, BLOCK_J):
            q_j = start_j + offsets_j
            valid_j = q_j < num_contenders
            _row_j, _position_j, local_j, score_j = _level_contender(q_j, valid_j, keep, k, row_base, VALUES,
                                                                     stride_v, node_scores)
            beaten = _beats(score_j, local_j, score_i, local_i) & valid_j[None, :]
            rank += tl.sum(beaten.to(tl.int32), axis=1)
        chosen = valid_i & (rank < num_expand)
        node = node_base + rank
        token_i = tl.load(INDICES + row_i * stride_i + position_i, mask=chosen, other=0)
        tl.store(node_scores + node, score_i, mask=chosen)
        tl.store(INTS + off_node_cand + node, (cand_base + local_i).to(tl.int64), mask=chosen)
        tl.store(INTS + off_parents + node, (row_base + row_i).to(tl.int64), mask=chosen)
        tl.store(INTS + off_node_tokens + node, token_i, mask=chosen)
        tl.store(INTS + off_positions + node, tl.full([BLOCK_I], 0, tl.int64) + position, mask=chosen)


@triton.jit
def _final_contender(start, offsets, num_contenders, keep, k, last_row_base, VALUES, stride_v, SCORES, NODE_SCORES):
    """Contenders ``q = start + offsets`` of the whole tree (0: the root, then ``keep`` per row): ``q``, whether it
    exists, its row, position in the row, candidate index, score, and whether it belongs to the last level.
    Earlier candidates' scores come from the workspace, the last level's from ``VALUES`` and the parents' scores;
    the root's is 0."""
    q = start + offsets
    valid = q < num_contenders
    is_root = q == 0
    after_root = tl.maximum(q - 1, 0)
    row = after_root // keep
    position = after_root - row * keep
    cand = tl.where(is_root, 0, 1 + row * k + position)
    in_last = valid & (~is_root) & (row >= last_row_base)
    stored = valid & (~is_root) & (row < last_row_base)
    value = tl.load(VALUES + (row - last_row_base) * stride_v + position, mask=in_last, other=0.0)
    parent_score = tl.load(NODE_SCORES + row, mask=in_last, other=0.0)
    stored_score = tl.load(SCORES + cand, mask=stored, other=0.0)
    return q, valid, row, position, cand, tl.where(in_last, parent_score + value.to(tl.float64), stored_score), in_last


@triton.jit
def _at_least(score, cand, threshold_score, threshold_cand):
    """The candidate ranks no lower than the threshold candidate (is among the kept ones)."""
    return (score > threshold_score) | ((score == threshold_score) & (cand <= threshold_cand))


@triton.jit(do_not_specialize=["stride_vb", "stride_v", "stride_ib", "stride_i", "float_stride", "int_stride",
                               "num_rows", "last_row_base", "k", "keep", "num_keep", "root_token", "off_scores",
                               "off_node_scores", "off_tokens", "off_node_cand", "off_tree_parents",
                               "off_tree_tokens"])
def eagle_select_kernel(
    VALUES, INDICES, FLOATS, INTS, ROOT_TOKENS, stride_vb, stride_v, stride_ib, stride_i, float_stride, int_stride,
    num_rows, last_row_base, k, keep, num_keep, root_token,
    off_scores, off_node_scores, off_tokens, off_node_cand, off_tree_parents, off_tree_tokens,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, PER_ROW: tl.constexpr,
):
    """The verification tree of sequence ``program_id(0)``: the ``num_keep`` best candidates, breadth-first,
    as parents and tokens (module docstring)."""
    VALUES, INDICES, FLOATS, INTS, root_token = _sequence(VALUES, INDICES, FLOATS, INTS, stride_vb, stride_ib,
                                                          float_stride, int_stride, ROOT_TOKENS, root_token, PER_ROW)
    scores = FLOATS + off_scores
    node_scores = FLOATS + off_node_scores
    offsets_i = tl.arange(0, BLOCK_I)
    offsets_j = tl.arange(0, BLOCK_J)
    num_contenders = 1 + num_rows * keep

    # Pass 1: the threshold, the contender of rank num_keep - 1.
    threshold_score = tl.full([], float("-inf"), tl.float64)
    threshold_cand = tl.full([], -1, tl.int32)
    for start_i in range(0, num_contenders, BLOCK_I):
        _q_i, valid_i, _row_i, _position_i, cand_i, score_i, _last_i = _final_contender(
            start_i, offsets_i, num_contenders, keep, k, last_row_base, VALUES, stride_v, scores, node_scores)
        rank = tl.zeros([BLOCK_I], tl.int32)
        for start_j in range(0, num_contenders, BLOCK_J):
            _q_j, valid_j, _row_j, _position_j, cand_j, score_j, _last_j = _final_contender(
                start_j, offsets_j, num_contenders, keep, k, last_row_base, VALUES, stride_v, scores, node_scores)
            rank += tl.sum((_beats(score_j, cand_j, score_i, cand_i) & valid_j[None, :]).to(tl.int32), axis=1)
        at_threshold = valid_i & (rank == num_keep - 1)
        threshold_score = tl.maximum(threshold_score, tl.max(tl.where(at_threshold, score_i, float("-inf")), axis=0))
        threshold_cand = tl.maximum(threshold_cand, tl.max(tl.where(at_threshold, cand_i, -1), axis=0))

    # Pass 2: each kept candidate's node (kept ones before it) and its parent's (kept ones before that).
    for start_i in range(0, num_contenders, BLOCK_I):
        q_i, valid_i, row_i, position_i, cand_i, score_i, last_i = _final_contender(
            start_i, offsets_i, num_contenders, keep, k, last_row_base, VALUES, stride_v, scores, node_scores)
        is_root = q_i == 0
        kept_i = valid_i & _at_least(score_i, cand_i, threshold_score, threshold_cand)
        parent_cand = tl.load(INTS + off_node_cand + row_i, mask=kept_i & (~is_root), other=0).to(tl.int32)
        node = tl.zeros([BLOCK_I], tl.int32)
        parent_node = tl.zeros([BLOCK_I], tl.int32)
        for start_j in range(0, num_contenders, BLOCK_J):
            _q_j, valid_j, _row_j, _position_j, cand_j, score_j, _last_j = _final_contender(
                start_j, offsets_j, num_contenders, keep, k, last_row_base, VALUES, stride_v, scores, node_scores)
            kept_j = valid_j & _at_least(score_j, cand_j, threshold_score, threshold_cand)
            node += tl.sum((kept_j[None, :] & (cand_j[None, :] < cand_i[:, None])).to(tl.int32), axis=1)
            parent_node += tl.sum((kept_j[None, :] & (cand_j[None, :] < parent_cand[:, None])).to(tl.int32), axis=1)
        last_token = tl.load(INDICES + (row_i - last_row_base) * stride_i + position_i, mask=kept_i & last_i,
                             other=0)
        stored_token = tl.load(INTS + off_tokens + cand_i, mask=kept_i & (~last_i) & (~is_root), other=0)
        token = tl.where(is_root, root_token, tl.where(last_i, last_token, stored_token))
        tl.store(INTS + off_tree_parents + node, tl.where(is_root, -1, parent_node).to(tl.int64), mask=kept_i)
        tl.store(INTS + off_tree_tokens + node, token.to(tl.int64), mask=kept_i)


@functools.lru_cache(maxsize=None)
def section_offsets(num_candidates: int, num_nodes: int, num_tree_nodes: int) -> tuple[dict, dict, int, int]:
    """``(float offsets, int offsets, float size, int size)``: the workspaces' sections (module docstring)
    for ``num_candidates`` candidates, ``num_nodes`` draft-tree nodes and ``num_tree_nodes`` kept (the
    ``layout`` of the launchers). Cached: the launchers look it up on every call."""
    float_sizes = (num_candidates, num_nodes)
    int_sizes = (num_candidates,) + (num_nodes,) * 4 + (num_tree_nodes,) * 2
    float_offsets = {name: sum(float_sizes[:index]) for index, name in enumerate(FLOAT_SECTIONS)}
    int_offsets = {name: sum(int_sizes[:index]) for index, name in enumerate(INT_SECTIONS)}
    return float_offsets, int_offsets, sum(float_sizes), sum(int_sizes)


def _batch_args(values: torch.Tensor, indices: torch.Tensor, floats: torch.Tensor, ints: torch.Tensor,
                per_row: torch.Tensor | None) -> tuple[tuple[int, ...], tuple, bool]:
    """Grid, pointer-and-stride arguments and ``PER_ROW`` of a launch over one sequence (``values [E, k]``,
    1-D workspaces) or a batch (``values [B, E, k]``, workspaces ``[B, size]``, one program per sequence).
    Read from shapes and strides only: no tensor op (the engine's tree phase runs none)."""
    batched = values.dim() == 3
    args = (values, indices, floats, ints, ints if per_row is None else per_row,
            values.stride(0) if batched else 0, values.stride(-2), indices.stride(0) if batched else 0,
            indices.stride(-2), floats.stride(0) if floats.dim() == 2 else 0, ints.stride(0) if ints.dim() == 2 else 0)
    return (values.shape[0] if batched else 1,), args, per_row is not None


@on_input_device
def eagle_level_forward(
    values: torch.Tensor, indices: torch.Tensor, floats: torch.Tensor, ints: torch.Tensor,
    layout: tuple[int, int, int], row_base: int, node_base: int, num_expand: int, position: int,
    row_positions: torch.Tensor | None = None,
) -> None:
    """One launch for one drafting level (module docstring): ``values [E, k]`` float32 (rows sorted
    descending) and ``indices [E, k]`` int64, unit column stride, for draft-tree nodes ``row_base ..
    row_base + E - 1``; the ``num_expand`` best become nodes ``node_base ..`` at position id ``position``.
    Writes the float64 / int64 workspaces ``floats`` / ``ints`` of :func:`section_offsets` (``layout``: its
    arguments); allocates nothing. A batch: ``values`` / ``indices`` ``[B, E, k]``, workspaces ``[B, size]``
    (one program per sequence), and the position ids ``position + row_positions[b]`` (int64 ``[B]``)."""
    float_offsets, int_offsets, _, _ = section_offsets(*layout)
    num_rows, k = values.shape[-2:]
    grid, args, per_row = _batch_args(values, indices, floats, ints, row_positions)
    eagle_level_kernel[grid](
        *args, num_rows, k, num_expand, min(k, num_expand), row_base, node_base, position,
        float_offsets["candidate_scores"], float_offsets["node_scores"], int_offsets["candidate_tokens"],
        int_offsets["node_candidates"], int_offsets["node_parents"], int_offsets["node_tokens"],
        int_offsets["node_positions"],
        BLOCK_I=BLOCK_I, BLOCK_J=BLOCK_J, PER_ROW=per_row, num_warps=NUM_WARPS, **LAUNCH_OPTIONS,
    )


@on_input_device
def eagle_select_forward(
    values: torch.Tensor, indices: torch.Tensor, floats: torch.Tensor, ints: torch.Tensor,
    layout: tuple[int, int, int], num_rows: int, last_row_base: int, root_token: int,
    root_tokens: torch.Tensor | None = None,
) -> None:
    """One launch for the verification tree (module docstring): the last level's ``values [E, k]`` /
    ``indices [E, k]`` (rows ``last_row_base .. num_rows - 1``; with ``num_rows == 0`` nothing is read
    from them), the ``T`` best candidates into the ``tree_parents`` / ``tree_tokens`` sections. A batch
    as for :func:`eagle_level_forward`, each sequence's root token ``root_token + root_tokens[b]``."""
    float_offsets, int_offsets, _, _ = section_offsets(*layout)
    num_keep = layout[2]
    k = values.shape[-1]
    grid, args, per_row = _batch_args(values, indices, floats, ints, root_tokens)
    # keep >= 1 (no division by zero) also for the one-node tree, whose only contender is the root.
    eagle_select_kernel[grid](
        *args, num_rows, last_row_base, k, max(1, min(k, num_keep - 1)), num_keep, root_token,
        float_offsets["candidate_scores"], float_offsets["node_scores"], int_offsets["candidate_tokens"],
        int_offsets["node_candidates"], int_offsets["tree_parents"], int_offsets["tree_tokens"],
        BLOCK_I=BLOCK_I, BLOCK_J=BLOCK_J, PER_ROW=per_row, num_warps=NUM_WARPS, **LAUNCH_OPTIONS,
    )


def aot_specs() -> list[dict]:
    """Every compilation the launchers make: one per kernel."""
    strides = ("stride_vb", "stride_v", "stride_ib", "stride_i", "float_stride", "int_stride")
    level_ints = strides + ("num_rows", "k", "num_expand", "keep", "row_base", "node_base", "position", "off_scores",
                            "off_node_scores", "off_tokens", "off_node_cand", "off_parents", "off_node_tokens",
                            "off_positions")
    select_ints = strides + ("num_rows", "last_row_base", "k", "keep", "num_keep", "root_token", "off_scores",
                             "off_node_scores", "off_tokens", "off_node_cand", "off_tree_parents", "off_tree_tokens")
    pointers = {"VALUES": "*fp32", "INDICES": "*i64", "FLOATS": "*fp64", "INTS": "*i64"}
    return [
        {
            "name": f"{name}{'_batch' if per_row else ''}",
            "fn": fn,
            "signature": {**pointers, row_pointer: "*i64", **dict.fromkeys(ints, "i32")},
            "constexprs": {"BLOCK_I": BLOCK_I, "BLOCK_J": BLOCK_J, "PER_ROW": per_row},
            "num_warps": NUM_WARPS,
            "num_stages": 3,
        }
        for name, fn, row_pointer, ints in (("eagle_level", eagle_level_kernel, "ROW_POSITIONS", level_ints),
                                            ("eagle_select", eagle_select_kernel, "ROOT_TOKENS", select_ints))
        for per_row in (False, True)
    ]
