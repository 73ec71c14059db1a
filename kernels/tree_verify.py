"""Draft-tree verification (greedy and lossless sampling) and KV compaction: Triton kernels and launchers.

Each mode is two launches: a wide per-node kernel (grid ``B * T``) that streams the target logits once
and reduces every row to a few statistics, then a per-sequence kernel (grid ``B``) that walks the tree
with O(1) work per node and writes the result. The ``[B, T, V]`` logits never leave the device.

Top-k / top-p: the sampling statistics kernel first finds the node's raw-logit cut itself, by a search over
the fp32 key space (``_filter_cut``: each pass streams the row once and evaluates 15 pivot cuts, counting
the entries >= each for top-k or summing the tempered mass above each for top-p, so the key interval shrinks
about 16-fold per pass: at most 9 passes per filter; no sort, no scratch, no extra launch), writes it for the walk,
then computes the statistics over the kept tokens. Not timed on a GPU.

Sampling statistics per node ``i`` (``x = logit / temperature`` over the tokens kept by top-k / top-p,
``p = softmax(x)``): the max ``m`` and sum ``s`` of ``exp(x - m)``, the argmax (degenerate fallback)
and, with draft probabilities ``q``, the SpecInfer residual masses: after ``k`` rejected children the
residual is ``max(p - c_k q, 0) / N_k`` with ``c_0 = 0, N_0 = 1, c_{k+1} = c_k + N_k``; the sequence
does not depend on the random outcomes, so it is computed per node in the wide kernel.

Compaction moves the accepted rows of every layer of a cache in one launch (grid ``B * H`` by layers):
the layers are separate allocations, so their base addresses come from an int64 table and are cast to
pointers of K's element type (a transformers ``DynamicCache`` holds one K/V pair per layer: a launch per
layer would cost the host one launch per layer and step).
"""

import os
from typing import Sequence

import torch
import triton
import triton.language as tl

from ._device import on_input_device
from ._launch import LAUNCH_OPTIONS

VERIFY_BLOCK_V = 1024
# Greedy argmax: programs to aim for (about 4 per SM on a 132-SM H100 / H200; a fixed number, no device
# query) and the smallest slice of a row one program scans, in BLOCK_V blocks.
ARGMAX_TARGET_PROGRAMS = 512
ARGMAX_MIN_SPLIT_BLOCKS = 4
COMPACT_NUM_WARPS = 4
# The sampling walk scans the vocabulary for the bonus token: 8 warps (at 4 it spilled predicates to local
# memory under Triton 3.9), except with both a top-k/top-p cut and draft probabilities, where Triton 3.6's
# aligned variant leaves 8 bytes of stack at 8 warps and 4 are clean under both releases (checked by
# benchmarks/compile_check.py under 3.6 and the newest release; no warp count is clean for every variant).
WALK_NUM_WARPS = 8
# Entries per step of a top-k / top-p search pass ([16 pivots, SEARCH_BLOCK] comparison tiles): 128 is the only
# size tried (128 to 1024) that Triton 3.6 compiles without stack spills for every filter variant. Triton's CPU
# interpreter takes the vocabulary block instead (same results up to fp32 summation order; its cost is per step).
SEARCH_BLOCK = 128
WALK_NUM_WARPS_FILTERED_DRAFT = 4


def walk_num_warps(has_thresh: bool, has_draft_probs: bool) -> int:
    return WALK_NUM_WARPS_FILTERED_DRAFT if has_thresh and has_draft_probs else WALK_NUM_WARPS


@triton.jit
def node_argmax_kernel(LOGITS, PART_VAL, PART_IDX, stride_lb, stride_lt, num_nodes, vocab, split_len,
                       BLOCK_V: tl.constexpr):
    """Partial argmax of one slice of a node's logits row: program (row, split) scans columns
    [split * split_len, (split + 1) * split_len) of LOGITS[b, i, :] (row = b * T + i) and writes the slice's
    max (fp32, -inf when empty) and the first index reaching it to PART_VAL / PART_IDX[row, split]."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    batch = row // num_nodes
    node = row % num_nodes
    base = LOGITS + batch.to(tl.int64) * stride_lb + node.to(tl.int64) * stride_lt
    offs = tl.arange(0, BLOCK_V)
    first_col = split * split_len
    last_col = tl.minimum(first_col + split_len, vocab)
    best = tl.full([BLOCK_V], float("-inf"), tl.float32)
    best_idx = first_col + offs
    for start in range(first_col, last_col, BLOCK_V):
        cols = start + offs
        x = tl.load(base + cols, mask=cols < last_col, other=float("-inf")).to(tl.float32)
        better = x > best  # strict: an earlier chunk wins ties, as torch.argmax's first occurrence
        best_idx = tl.where(better, cols, best_idx)
        best = tl.where(better, x, best)
    top = tl.max(best, axis=0)
    first = tl.min(tl.where(best == top, best_idx, vocab), axis=0)
    out = row.to(tl.int64) * num_splits + split
    tl.store(PART_VAL + out, top)
    tl.store(PART_IDX + out, first)


@triton.jit
def greedy_walk_kernel(
    PARENTS, DEPTH, ANC, TOKENS, PART_VAL, PART_IDX, ARGMAX, ACCEPTED, ACCEPT_LEN, NEXT_TOKENS, EMITTED,
    stride_tree_b, stride_anc_b, stride_tok_b, num_nodes, num_words, out_width, num_splits, vocab,
    BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """Merge the partial argmaxes of this sequence's nodes into ARGMAX (the largest value, the smallest index
    among equal values: torch.argmax's first occurrence), then accept the deepest node whose whole root path
    matches the target argmax (EAGLE's longest matching path; ties to the smallest node index), vectorised
    over nodes with the ancestor bitmask."""
    batch = tl.program_id(0)
    nodes = tl.arange(0, BLOCK_T)
    valid = nodes < num_nodes
    tree_base = batch.to(tl.int64) * stride_tree_b
    parents = tl.load(PARENTS + tree_base + nodes, mask=valid, other=-1)
    depth = tl.load(DEPTH + tree_base + nodes, mask=valid, other=0)
    tokens = tl.load(TOKENS + batch.to(tl.int64) * stride_tok_b + nodes, mask=valid, other=-1)
    argmax_base = ARGMAX + batch.to(tl.int64) * num_nodes
    part_rows = (batch.to(tl.int64) * num_nodes + nodes) * num_splits
    best = tl.full([BLOCK_T], float("-inf"), tl.float32)
    best_idx = tl.full([BLOCK_T], 0, tl.int32)
    found = tl.zeros([BLOCK_T], tl.int32)
    for split in range(0, num_splits):  # splits in column order: strict > keeps the first occurrence
        value = tl.load(PART_VAL + part_rows + split, mask=valid, other=float("-inf"))
        index = tl.load(PART_IDX + part_rows + split, mask=valid, other=vocab)
        better = (value > best) | ((found == 0) & (index < vocab))
        best = tl.where(better, value, best)
        best_idx = tl.where(better, index, best_idx)
        found = found | (index < vocab).to(tl.int32)
    tl.store(argmax_base + nodes, best_idx.to(tl.int64), mask=valid)
    # The argmaxes are read back by other threads below (parents' and the final node's).
    tl.debug_barrier()
    # Bounded reads too: tree_spec_from_parents_tensor does not validate the parent values it is given.
    parent_target = tl.load(argmax_base + parents, mask=valid & (parents >= 0) & (parents < num_nodes), other=-2)
    match = valid & ((tokens == parent_target) | (nodes == 0))
    anc_base = ANC + batch.to(tl.int64) * stride_anc_b
    on_path = valid
    one = tl.full([BLOCK_T], 1, tl.int64)
    for word in range(0, num_words):
        in_word = (nodes // 64) == word
        packed = tl.sum(tl.where(match & in_word, one << (nodes % 64).to(tl.int64), 0), axis=0)
        anc = tl.load(anc_base + nodes.to(tl.int64) * num_words + word, mask=valid, other=0)
        on_path = on_path & ((anc & ~packed) == 0)
    key = tl.where(on_path, depth * BLOCK_T + (BLOCK_T - 1 - nodes), -1)
    best = tl.max(key, axis=0)
    final = tl.minimum(BLOCK_T - 1 - best % BLOCK_T, num_nodes - 1)  # best < 0 only for an invalid spec
    final_depth = best // BLOCK_T
    bonus = tl.load(argmax_base + final)

    final_words = tl.load(anc_base + final.to(tl.int64) * num_words + nodes // 64, mask=valid, other=0)
    in_path = valid & (((final_words >> (nodes % 64).to(tl.int64)) & 1) != 0)
    out_base = batch.to(tl.int64) * out_width
    slots = tl.arange(0, BLOCK_W)
    # Every slot is written: -1 first, then (after a barrier, other threads store the path) the path slots by node
    # depth and the bonus slot. A consistent spec's path fills the slots up to final_depth; one whose ancestor mask
    # disagrees with its parents / depths (a hand-built TreeSpec) left slots of the torch.empty result unwritten.
    # Only slots < out_width: a spec whose max_depth understates its depths (tree_spec_from_parents_tensor trusts
    # it) is truncated, not written past the result rows.
    tl.store(ACCEPTED + out_base + slots, tl.full([BLOCK_W], -1, tl.int64), mask=slots < out_width)
    tl.store(EMITTED + out_base + slots, tl.full([BLOCK_W], -1, tl.int64), mask=slots < out_width)
    tl.debug_barrier()
    tl.store(ACCEPTED + out_base + depth, nodes.to(tl.int64), mask=in_path & (depth < out_width))
    tl.store(EMITTED + out_base + depth - 1, tokens.to(tl.int64), mask=in_path & (nodes > 0) & (depth <= out_width))
    tl.store(EMITTED + out_base + final_depth, bonus, mask=final_depth < out_width)
    tl.store(ACCEPT_LEN + batch, final_depth.to(tl.int64))
    tl.store(NEXT_TOKENS + batch, bonus)


@triton.jit
def _node_probs(row_ptr, cols, vocab, threshold, inv_temp, row_max, row_sum):
    """Filtered target probabilities of one node at ``cols`` (0 outside the kept set)."""
    in_vocab = (cols >= 0) & (cols < vocab)
    logit = tl.load(row_ptr + cols, mask=in_vocab, other=float("-inf")).to(tl.float32)
    kept = in_vocab & (logit >= threshold)
    return tl.where(kept, tl.exp(logit * inv_temp - row_max) / row_sum, 0.0)


@triton.jit
def _float_key(x):
    """int32 with the order of the fp32 values (a negative value's magnitude bits flipped)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _key_float(key):
    """Inverse of :func:`_float_key`."""
    bits = tl.where(key < 0, key ^ 0x7FFFFFFF, key)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _pivots(lo, hi, NUM_PIVOTS: tl.constexpr):
    """Up to NUM_PIVOTS - 1 keys strictly inside (lo, hi), evenly spaced, and which of them exist."""
    step = tl.maximum((hi - lo) // NUM_PIVOTS, 1)
    keys = lo + (tl.arange(0, NUM_PIVOTS) + 1).to(tl.int64) * step
    return keys, keys < hi


@triton.jit
def _search_pass(row_ptr, vocab, pivot_values, floor, shift, inv_temp, MASS: tl.constexpr,
                 SEARCH_BLOCK: tl.constexpr, NUM_PIVOTS: tl.constexpr):
    """One stream over the row, every pivot at once: ``#{logit >= pivot}`` (not MASS), or the tempered mass
    ``sum exp(logit / T - shift)`` of the entries ``> pivot`` and ``>= floor`` (MASS)."""
    offs = tl.arange(0, SEARCH_BLOCK)
    totals = tl.zeros([NUM_PIVOTS], tl.float32)
    for start in range(0, vocab, SEARCH_BLOCK):
        cols = start + offs
        logit = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        logit = tl.where(logit == logit, logit, float("-inf"))  # NaN reads as -inf
        if MASS:
            weight = tl.where((cols < vocab) & (logit >= floor), tl.exp(logit * inv_temp - shift), 0.0)
            above = logit[None, :] > pivot_values[:, None]
        else:
            weight = tl.where(cols < vocab, 1.0, 0.0)
            above = logit[None, :] >= pivot_values[:, None]
        totals += tl.sum(tl.where(above, weight[None, :], 0.0), axis=1)
    return totals


@triton.jit
def _filter_cut(row_ptr, vocab, top_k, top_p, inv_temp, HAS_TOPK: tl.constexpr, HAS_TOPP: tl.constexpr,
                BLOCK_V: tl.constexpr, SEARCH_BLOCK: tl.constexpr):
    """The raw-logit cut of top-k then top-p for one row (a token is kept iff its logit is >= the cut), found by
    a search over the fp32 key space (monotone int32 keys): each pass streams the row once and evaluates 15
    evenly spaced pivots, so an interval of I keys becomes at most max(I // 16, I - 15 (I // 16)): 2^32 + 1 keys
    close in 9 passes. A static loop of MAX_PASSES = 10 whose passes are skipped once the interval is closed (a
    ``while`` loop left ptxas a few bytes of stack under Triton 3.6); no sort, no scratch.

    Top-k: the largest key ``t`` with ``#{logit >= t} >= k`` (the k-th largest logit; ties at the cut kept;
    counts are exact in fp32 below 2^24 entries). Top-p (over the top-k set, at temperature T): the smallest
    key ``t`` whose strictly larger kept entries hold less than ``top_p`` of the kept mass, i.e. the smallest
    logit whose descending-order mass before it is ``< top_p`` (ties at the cut kept):
    :func:`distill_ops.verify.filter_thresholds`'s rule, which sorts."""
    NUM_PIVOTS: tl.constexpr = 16
    MAX_PASSES: tl.constexpr = 10
    offs = tl.arange(0, BLOCK_V)
    lane_min = tl.full([BLOCK_V], float("inf"), tl.float32)
    lane_max = tl.full([BLOCK_V], float("-inf"), tl.float32)
    for start in range(0, vocab, BLOCK_V):
        cols = start + offs
        logit = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        logit = tl.where(logit == logit, logit, float("-inf"))  # NaN reads as -inf (min / max ignore it)
        lane_min = tl.minimum(lane_min, tl.where(cols < vocab, logit, float("inf")))
        lane_max = tl.maximum(lane_max, logit)
    row_min = tl.min(lane_min, axis=0)
    row_max = tl.max(lane_max, axis=0)
    cut = row_min
    if HAS_TOPK:
        # count(>= value(lo)) >= k > count(>= value(hi)); keys in int64 (hi - lo can exceed 2^31).
        lo = _float_key(row_min).to(tl.int64)
        hi = _float_key(row_max).to(tl.int64) + 1
        for _ in range(MAX_PASSES):
            if hi - lo > 1:
                keys, exists = _pivots(lo, hi, NUM_PIVOTS)
                counts = _search_pass(row_ptr, vocab, _key_float(keys.to(tl.int32)), 0.0, 0.0, 1.0, False,
                                      SEARCH_BLOCK, NUM_PIVOTS)
                enough = exists & (counts >= top_k)
                lo = tl.max(tl.where(enough, keys, lo), axis=0)
                hi = tl.min(tl.where(exists & (~enough), keys, hi), axis=0)
        cut = _key_float(lo.to(tl.int32))
    if HAS_TOPP:
        if (row_max > float("-inf")) & (row_max < float("inf")):
            shift = row_max * inv_temp
            everything = tl.full([NUM_PIVOTS], float("-inf"), tl.float32)
            target = top_p * tl.max(_search_pass(row_ptr, vocab, everything, cut, shift, inv_temp, True,
                                                 SEARCH_BLOCK, NUM_PIVOTS), axis=0)
            # mass(> value(lo)) >= target > mass(> value(hi)); lo = key(cut) - 1 stands for "everything kept".
            lo = _float_key(cut).to(tl.int64) - 1
            hi = _float_key(row_max).to(tl.int64)
            for _ in range(MAX_PASSES):
                if hi - lo > 1:
                    keys, exists = _pivots(lo, hi, NUM_PIVOTS)
                    mass = _search_pass(row_ptr, vocab, _key_float(keys.to(tl.int32)), cut, shift, inv_temp, True,
                                        SEARCH_BLOCK, NUM_PIVOTS)
                    below = exists & (mass < target)
                    hi = tl.min(tl.where(below, keys, hi), axis=0)
                    lo = tl.max(tl.where(exists & (~below), keys, lo), axis=0)
            cut = _key_float(hi.to(tl.int32))
    return cut


@triton.jit
def sampling_stats_kernel(
    LOGITS, THRESH, DRAFT_PROBS, PARENTS, ROW_MAX, ROW_SUM, ARGMAX, ROUND_C, ROUND_N, Q_SCALE,
    stride_lb, stride_lt, stride_qb, stride_qt, stride_tree_b, num_nodes, vocab, inv_temp, top_k, top_p,
    HAS_TOPK: tl.constexpr, HAS_TOPP: tl.constexpr, HAS_DRAFT_PROBS: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_T: tl.constexpr, SEARCH_BLOCK: tl.constexpr,
):
    """Per node row: the top-k / top-p cut (written to THRESH, read by the walk), then the filtered softmax
    statistics (and, with draft probabilities, the draft row's normaliser 1 / sum(q) and the SpecInfer residual
    masses of the normalised q)."""
    row = tl.program_id(0)
    batch = row // num_nodes
    node = row % num_nodes
    row_ptr = LOGITS + batch.to(tl.int64) * stride_lb + node.to(tl.int64) * stride_lt
    if HAS_TOPK or HAS_TOPP:
        threshold = _filter_cut(row_ptr, vocab, top_k, top_p, inv_temp, HAS_TOPK, HAS_TOPP, BLOCK_V, SEARCH_BLOCK)
        tl.store(THRESH + row, threshold)
    else:
        threshold = float("-inf")
    offs = tl.arange(0, BLOCK_V)
    # Per-lane online max / sum / argmax, reduced across lanes at the end.
    lane_max = tl.full([BLOCK_V], float("-inf"), tl.float32)
    lane_sum = tl.zeros([BLOCK_V], tl.float32)
    lane_idx = offs
    for start in range(0, vocab, BLOCK_V):
        cols = start + offs
        logit = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        x = tl.where((cols < vocab) & (logit >= threshold), logit * inv_temp, float("-inf"))
        better = x > lane_max
        new_max = tl.maximum(lane_max, x)
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        lane_sum = lane_sum * tl.exp(lane_max - shift) + tl.exp(x - shift)
        lane_idx = tl.where(better, cols, lane_idx)
        lane_max = new_max
    row_max = tl.max(lane_max, axis=0)
    row_sum = tl.sum(lane_sum * tl.exp(lane_max - row_max), axis=0)
    first = tl.min(tl.where(lane_max == row_max, lane_idx, vocab), axis=0)
    tl.store(ROW_MAX + row, row_max)
    tl.store(ROW_SUM + row, row_sum)
    tl.store(ARGMAX + row, tl.where(first < vocab, first, 0).to(tl.int64))
    if HAS_DRAFT_PROBS:
        nodes = tl.arange(0, BLOCK_T)
        parents = tl.load(PARENTS + batch.to(tl.int64) * stride_tree_b + nodes, mask=nodes < num_nodes, other=-1)
        num_children = tl.sum(tl.where(parents == node, 1, 0), axis=0)
        q_ptr = DRAFT_PROBS + batch.to(tl.int64) * stride_qb + node.to(tl.int64) * stride_qt
        round_base = row.to(tl.int64) * num_nodes
        # One reciprocal per row: a division per element costs range-check predicates in the hot loop.
        inv_sum = 1.0 / row_sum
        # The draft row is normalised as torch.multinomial does (16-bit rows miss 1 by their rounding, a truncated
        # draft distribution by its cut mass); only rows with children are read (a leaf's q is never used).
        lane_q = tl.zeros([BLOCK_V], tl.float32)
        if num_children > 0:
            for start in range(0, vocab, BLOCK_V):
                cols = start + offs
                lane_q += tl.load(q_ptr + cols, mask=cols < vocab, other=0.0).to(tl.float32)
        q_sum = tl.sum(lane_q, axis=0)
        q_scale = tl.where(q_sum > 0.0, 1.0 / q_sum, 0.0)
        tl.store(Q_SCALE + row, q_scale)
        c = tl.full([], 0.0, tl.float32)
        mass = tl.full([], 1.0, tl.float32)
        tl.store(ROUND_C + round_base, c)
        tl.store(ROUND_N + round_base, mass)
        for rnd in range(1, num_children + 1):
            c = c + mass
            lane_mass = tl.zeros([BLOCK_V], tl.float32)
            for start in range(0, vocab, BLOCK_V):
                cols = start + offs
                logit = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
                p = tl.where((cols < vocab) & (logit >= threshold), tl.exp(logit * inv_temp - row_max) * inv_sum, 0.0)
                q = tl.load(q_ptr + cols, mask=cols < vocab, other=0.0).to(tl.float32) * q_scale
                lane_mass += tl.maximum(p - c * q, 0.0)
            mass = tl.sum(lane_mass, axis=0)
            tl.store(ROUND_C + round_base + rnd, c)
            tl.store(ROUND_N + round_base + rnd, mass)


@triton.jit
def _residual(row_ptr, q_ptr, cols, vocab, threshold, inv_temp, row_max, row_sum, c, q_scale,
              HAS_DRAFT_PROBS: tl.constexpr):
    p = _node_probs(row_ptr, cols, vocab, threshold, inv_temp, row_max, row_sum)
    if HAS_DRAFT_PROBS:
        q = tl.load(q_ptr + cols, mask=(cols >= 0) & (cols < vocab), other=0.0).to(tl.float32) * q_scale
        p = tl.maximum(p - c * q, 0.0)
    return p


@triton.jit
def sampling_walk_kernel(
    LOGITS, THRESH, DRAFT_PROBS, PARENTS, TOKENS, UNIFORMS, ROW_MAX, ROW_SUM, ARGMAX, ROUND_C, ROUND_N, Q_SCALE,
    ACCEPTED, ACCEPT_LEN, NEXT_TOKENS, EMITTED,
    stride_lb, stride_lt, stride_qb, stride_qt, stride_tree_b, stride_tok_b, stride_ub,
    num_nodes, vocab, out_width, inv_temp,
    HAS_THRESH: tl.constexpr, HAS_DRAFT_PROBS: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """Walk one sequence's tree in node order (children of the current node are tried in index order,
    child j with uniform ``UNIFORMS[b, j]``), then sample the bonus token from the final residual by
    inverse CDF with ``UNIFORMS[b, 0]``."""
    batch = tl.program_id(0)
    nodes = tl.arange(0, BLOCK_T)
    valid = nodes < num_nodes
    tree_base = PARENTS + batch.to(tl.int64) * stride_tree_b
    token_base = TOKENS + batch.to(tl.int64) * stride_tok_b
    uniform_base = UNIFORMS + batch.to(tl.int64) * stride_ub
    logits_base = LOGITS + batch.to(tl.int64) * stride_lb
    q_base = DRAFT_PROBS + batch.to(tl.int64) * stride_qb
    parents = tl.load(tree_base + nodes, mask=valid, other=-1)
    tokens = tl.load(token_base + nodes, mask=valid, other=-1)
    slots = tl.arange(0, BLOCK_W)
    accepted = tl.where(slots == 0, 0, -1).to(tl.int64)
    emitted = tl.full([BLOCK_W], -1, tl.int64)

    cur = tl.full([], 0, tl.int32)
    depth = tl.full([], 0, tl.int32)
    rnd = tl.full([], 0, tl.int32)
    det_mass = tl.full([], 1.0, tl.float32)
    excluded = tl.zeros([BLOCK_T], tl.int32)
    for j in range(1, num_nodes):
        parent = tl.load(tree_base + j)
        token = tl.load(token_base + j)
        is_child = parent == cur
        row = batch * num_nodes + cur
        if HAS_THRESH:
            threshold = tl.load(THRESH + row)
        else:
            threshold = float("-inf")
        # _node_probs inlined: a jit helper called in a loop is slow under the CPU interpreter.
        in_vocab = (token >= 0) & (token < vocab)
        logit = tl.load(logits_base + cur.to(tl.int64) * stride_lt + token, mask=in_vocab,
                        other=float("-inf")).to(tl.float32)
        p = tl.where(in_vocab & (logit >= threshold),
                     tl.exp(logit * inv_temp - tl.load(ROW_MAX + row)) / tl.load(ROW_SUM + row), 0.0)
        u = tl.load(uniform_base + j)
        if HAS_DRAFT_PROBS:
            q = tl.load(q_base + cur.to(tl.int64) * stride_qt + token, mask=in_vocab, other=0.0).to(tl.float32)
            q = q * tl.load(Q_SCALE + row)
            c = tl.load(ROUND_C + row.to(tl.int64) * num_nodes + rnd)
            mass = tl.load(ROUND_N + row.to(tl.int64) * num_nodes + rnd)
            accept = is_child & (u * q * mass < tl.maximum(p - c * q, 0.0))
            rnd = tl.where(accept, 0, tl.where(is_child, rnd + 1, rnd))
        else:
            # A sibling repeating an already rejected token has residual probability 0.
            dup = tl.sum(tl.where((parents == cur) & (nodes < j) & (tokens == token), 1, 0), axis=0) > 0
            resid = tl.where(dup, 0.0, p)
            accept = is_child & (u * det_mass < resid)
            reject = is_child & (accept == 0)
            det_mass = tl.where(accept, 1.0, tl.where(reject, tl.maximum(det_mass - resid, 0.0), det_mass))
            excluded = tl.where(accept, 0, tl.where(reject & (dup == 0) & (nodes == j), 1, excluded))
        cur = tl.where(accept, j, cur)
        depth = tl.where(accept, depth + 1, depth)
        accepted = tl.where(accept & (slots == depth), j, accepted)
        emitted = tl.where(accept & (slots == depth - 1), token, emitted)

    # Bonus token from the residual at the last accepted node.
    row = batch * num_nodes + cur
    row_ptr = logits_base + cur.to(tl.int64) * stride_lt
    q_ptr = q_base + cur.to(tl.int64) * stride_qt
    if HAS_THRESH:
        threshold = tl.load(THRESH + row)
    else:
        threshold = float("-inf")
    row_max = tl.load(ROW_MAX + row)
    row_sum = tl.load(ROW_SUM + row)
    if HAS_DRAFT_PROBS:
        c = tl.load(ROUND_C + row.to(tl.int64) * num_nodes + rnd)
        total = tl.load(ROUND_N + row.to(tl.int64) * num_nodes + rnd)
        q_scale = tl.load(Q_SCALE + row)
    else:
        c = 0.0
        total = det_mass
        q_scale = 0.0
    excluded_tokens = tl.where(excluded != 0, tokens, -1)
    excluded_probs = _node_probs(row_ptr, excluded_tokens, vocab, threshold, inv_temp, row_max, row_sum)
    target = tl.load(uniform_base) * total
    offs = tl.arange(0, BLOCK_V)
    cum = tl.full([], 0.0, tl.float32)
    sel_start = tl.full([], -1, tl.int32)
    sel_target = tl.full([], 0.0, tl.float32)
    last_start = tl.full([], -1, tl.int32)
    last_mass = tl.full([], 0.0, tl.float32)
    for start in range(0, vocab, BLOCK_V):
        resid = _residual(row_ptr, q_ptr, start + offs, vocab, threshold, inv_temp, row_max, row_sum, c,
                          q_scale, HAS_DRAFT_PROBS)
        mass = tl.sum(resid, axis=0)
        if not HAS_DRAFT_PROBS:
            # Siblings already rejected at this node leave the residual (with draft probabilities the
            # round's c q term removes them instead and nothing is excluded).
            in_chunk = (excluded_tokens >= start) & (excluded_tokens < start + BLOCK_V)
            mass = mass - tl.sum(tl.where(in_chunk, excluded_probs, 0.0), axis=0)
        mass = tl.maximum(mass, 0.0)
        cross = (sel_start < 0) & (cum + mass > target)
        sel_target = tl.where(cross, target - cum, sel_target)
        sel_start = tl.where(cross, start, sel_start)
        last_mass = tl.where(mass > 0.0, mass, last_mass)
        last_start = tl.where(mass > 0.0, start, last_start)
        cum += mass
    # Rounding can leave the target just past the total: take the last token with mass.
    no_cross = sel_start < 0
    sel_target = tl.where(no_cross, last_mass, sel_target)
    sel_start = tl.where(no_cross, last_start, sel_start)
    cols = tl.maximum(sel_start, 0) + offs
    resid = _residual(row_ptr, q_ptr, cols, vocab, threshold, inv_temp, row_max, row_sum, c, q_scale,
                      HAS_DRAFT_PROBS)
    if not HAS_DRAFT_PROBS:
        for jj in range(1, num_nodes):
            is_excluded = tl.sum(tl.where(nodes == jj, excluded, 0), axis=0) != 0
            resid = tl.where(is_excluded & (cols == tl.load(token_base + jj)), 0.0, resid)
    cdf = tl.cumsum(resid, axis=0)
    hit = (cdf > sel_target) & (resid > 0.0)
    first = tl.min(tl.where(hit, cols, vocab), axis=0)
    last_positive = tl.max(tl.where(resid > 0.0, cols, -1), axis=0)
    bonus = tl.where(first < vocab, first, last_positive).to(tl.int64)
    bonus = tl.where((sel_start < 0) | (bonus < 0), tl.load(ARGMAX + row), bonus)

    emitted = tl.where(slots == depth, bonus, emitted)
    out_base = batch.to(tl.int64) * out_width
    tl.store(ACCEPTED + out_base + slots, accepted, mask=slots < out_width)
    tl.store(EMITTED + out_base + slots, emitted, mask=slots < out_width)
    tl.store(ACCEPT_LEN + batch, depth.to(tl.int64))
    tl.store(NEXT_TOKENS + batch, bonus)


@triton.jit
def compact_kv_kernel(
    K, V, KV_PTRS, ACCEPTED, CACHE_LENS, NEW_LENS,
    stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs, stride_ab,
    num_heads, out_width, head_dim, kv_len,
    FROM_TABLE: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Move row ``cache_len + accepted[d]`` to ``cache_len + d`` for each accepted slot d, in increasing d,
    for one (sequence, KV head) of layer ``program_id(1)``. In order this is safe in place:
    ``accepted[d] >= d`` (a node's index is at least its depth), so no row is overwritten before it is read.

    ``FROM_TABLE``: the layer's K / V start at the addresses ``KV_PTRS[2 l]`` / ``KV_PTRS[2 l + 1]`` (every
    layer of a model's cache in one launch; they share K's and V's dtype and strides, K / V being layer 0);
    otherwise at K / V. ``NEW_LENS[b] = CACHE_LENS[b] + 1 + accepted drafts``, written by one program.
    Rows at or past ``kv_len`` (S) are neither read nor written, nor is anything of a sequence whose cache_len is
    negative: the caller's ``0 <= cache_lens``, ``cache_lens + W <= S`` are checked on the host only for CPU
    tensors (on a GPU the check would synchronise), so a broken contract leaves rows unmoved instead of writing
    into another sequence, head or allocation."""
    pid = tl.program_id(0)
    layer = tl.program_id(1)
    batch = pid // num_heads
    head = pid % num_heads
    if FROM_TABLE:
        k_layer = tl.load(KV_PTRS + 2 * layer).to(tl.pointer_type(K.dtype.element_ty))
        v_layer = tl.load(KV_PTRS + 2 * layer + 1).to(tl.pointer_type(V.dtype.element_ty))
    else:
        k_layer = K
        v_layer = V
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    cache_len = tl.load(CACHE_LENS + batch).to(tl.int64)
    k_base = k_layer + batch.to(tl.int64) * stride_kb + head.to(tl.int64) * stride_kh + dims
    v_base = v_layer + batch.to(tl.int64) * stride_vb + head.to(tl.int64) * stride_vh + dims
    kept = cache_len + 1
    for slot in range(1, out_width):
        node = tl.load(ACCEPTED + batch.to(tl.int64) * stride_ab + slot).to(tl.int64)
        kept += tl.where(node > 0, 1, 0).to(tl.int64)
        src = cache_len + node
        dst = cache_len + slot
        move = dim_ok & (node > 0) & (cache_len >= 0) & (src < kv_len) & (dst < kv_len)
        tl.store(k_base + dst * stride_ks, tl.load(k_base + src * stride_ks, mask=move), mask=move)
        tl.store(v_base + dst * stride_vs, tl.load(v_base + src * stride_vs, mask=move), mask=move)
    # A branch, not a masked store: the predicated scalar store took an 8-byte stack frame on sm_80.
    if (head == 0) & (layer == 0):
        tl.store(NEW_LENS + batch, kept.to(NEW_LENS.dtype.element_ty))


def _interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pow2(n: int) -> int:
    return max(triton.next_power_of_2(n), 16)


def _block_v(vocab: int) -> int:
    """``min(VERIFY_BLOCK_V, next_pow2(V))``: real vocabularies always use the cap."""
    return min(VERIFY_BLOCK_V, _pow2(vocab))


def argmax_splits(rows: int, vocab: int, block_v: int) -> int:
    """Slices per logits row for the greedy argmax: enough programs for about ``ARGMAX_TARGET_PROGRAMS`` (a
    row per program leaves most SMs idle at B = 1, T = 64, and one program cannot keep enough loads in flight
    to stream a 128k-entry row at HBM speed), each slice at least ``ARGMAX_MIN_SPLIT_BLOCKS`` blocks."""
    max_splits = max(1, triton.cdiv(vocab, block_v * ARGMAX_MIN_SPLIT_BLOCKS))
    return max(1, min(triton.cdiv(ARGMAX_TARGET_PROGRAMS, max(rows, 1)), max_splits))  # rows = 0: an empty batch


@on_input_device
def verify_greedy_forward(
    parents: torch.Tensor, depth: torch.Tensor, ancestor_mask: torch.Tensor, draft_tokens: torch.Tensor,
    target_logits: torch.Tensor, out_width: int, num_splits: int | None = None, block_v: int | None = None,
):
    """Launch greedy verification. Tree tensors ``[Bt, T(, W)]`` contiguous (Bt 1 or B), draft_tokens
    ``[B, T]``, target_logits ``[B, T, V]`` with unit stride along V. Returns the four result tensors.

    Two launches: partial argmaxes over ``num_splits`` column slices per node row (default
    :func:`argmax_splits`), then one program per sequence merges them and walks the tree. ``block_v``
    overrides the argmax block (tests use small blocks to split small vocabularies)."""
    batch, num_nodes, vocab = target_logits.shape
    device = target_logits.device
    rows = batch * num_nodes
    block_v = block_v or _block_v(vocab)
    if num_splits is None:
        num_splits = argmax_splits(rows, vocab, block_v)
    split_len = triton.cdiv(triton.cdiv(vocab, num_splits), block_v) * block_v
    num_splits = triton.cdiv(vocab, split_len)
    part_val = torch.empty(rows * num_splits, device=device, dtype=torch.float32)
    part_idx = torch.empty(rows * num_splits, device=device, dtype=torch.int32)
    argmax = torch.empty(rows, device=device, dtype=torch.int64)
    node_argmax_kernel[(rows, num_splits)](
        target_logits, part_val, part_idx, target_logits.stride(0), target_logits.stride(1), num_nodes, vocab,
        split_len, BLOCK_V=block_v, num_warps=4, **LAUNCH_OPTIONS,
    )
    accepted = torch.empty(batch, out_width, device=device, dtype=torch.int64)
    emitted = torch.empty_like(accepted)
    accept_len = torch.empty(batch, device=device, dtype=torch.int64)
    next_tokens = torch.empty_like(accept_len)
    tree_stride = 0 if parents.shape[0] == 1 else parents.stride(0)
    anc_stride = 0 if ancestor_mask.shape[0] == 1 else ancestor_mask.stride(0)
    greedy_walk_kernel[(batch,)](
        parents, depth, ancestor_mask, draft_tokens, part_val, part_idx, argmax, accepted, accept_len, next_tokens,
        emitted, tree_stride, anc_stride, draft_tokens.stride(0), num_nodes, ancestor_mask.shape[2], out_width,
        num_splits, vocab, BLOCK_T=_pow2(num_nodes), BLOCK_W=_pow2(out_width), num_warps=1, **LAUNCH_OPTIONS,
    )
    return accepted, accept_len, next_tokens, emitted


@on_input_device
def sampling_stats(
    parents: torch.Tensor, target_logits: torch.Tensor, top_k: int | None, top_p: float | None,
    draft_probs: torch.Tensor | None, temperature: float,
) -> dict:
    """Launch the per-node statistics kernel; returns its outputs by name (``thresh``: each row's raw-logit cut,
    ``[B * T]`` fp32, only when ``top_k`` (< V) or ``top_p`` (< 1) is given)."""
    batch, num_nodes, vocab = target_logits.shape
    device = target_logits.device
    rows = batch * num_nodes
    has_topk, has_topp = top_k is not None, top_p is not None
    out = {"row_max": torch.empty(rows, device=device, dtype=torch.float32)}
    out["row_sum"] = torch.empty_like(out["row_max"])
    out["argmax"] = torch.empty(rows, device=device, dtype=torch.int64)
    if draft_probs is not None:
        out["round_c"] = torch.empty(rows * num_nodes, device=device, dtype=torch.float32)
        out["round_n"] = torch.empty_like(out["round_c"])
        out["q_scale"] = torch.empty_like(out["row_max"])
    else:  # never read or written without draft probabilities
        out["round_c"] = out["round_n"] = out["q_scale"] = out["row_max"]
    # Written by the stats kernel when filtering; otherwise a placeholder that is never read.
    out["thresh"] = torch.empty_like(out["row_max"]) if has_topk or has_topp else out["row_max"]
    q = draft_probs if draft_probs is not None else target_logits
    sampling_stats_kernel[(rows,)](
        target_logits, out["thresh"], q, parents, out["row_max"], out["row_sum"], out["argmax"], out["round_c"],
        out["round_n"], out["q_scale"], target_logits.stride(0), target_logits.stride(1), q.stride(0), q.stride(1),
        0 if parents.shape[0] == 1 else parents.stride(0), num_nodes, vocab, 1.0 / temperature,
        top_k if has_topk else 0, top_p if has_topp else 1.0, HAS_TOPK=has_topk, HAS_TOPP=has_topp,
        HAS_DRAFT_PROBS=draft_probs is not None, BLOCK_V=_block_v(vocab), BLOCK_T=_pow2(num_nodes),
        SEARCH_BLOCK=_block_v(vocab) if _interpreter() else SEARCH_BLOCK, num_warps=4, **LAUNCH_OPTIONS,
    )
    return out


@on_input_device
def verify_sampling_forward(
    parents: torch.Tensor, draft_tokens: torch.Tensor, target_logits: torch.Tensor,
    top_k: int | None, top_p: float | None, draft_probs: torch.Tensor | None, uniforms: torch.Tensor,
    temperature: float, out_width: int,
):
    """Launch sampling verification. ``top_k`` (< V) / ``top_p`` (< 1) or None: the stats kernel finds each
    row's cut itself; ``draft_probs`` ``[B, T, V]`` unit stride along V (or None), ``uniforms`` fp32 ``[B, T]``."""
    batch, num_nodes, vocab = target_logits.shape
    device = target_logits.device
    stats = sampling_stats(parents, target_logits, top_k, top_p, draft_probs, temperature)
    q = draft_probs if draft_probs is not None else target_logits
    flags = dict(HAS_THRESH=top_k is not None or top_p is not None, HAS_DRAFT_PROBS=draft_probs is not None,
                 BLOCK_V=_block_v(vocab))
    accepted = torch.empty(batch, out_width, device=device, dtype=torch.int64)
    emitted = torch.empty_like(accepted)
    accept_len = torch.empty(batch, device=device, dtype=torch.int64)
    next_tokens = torch.empty_like(accept_len)
    sampling_walk_kernel[(batch,)](
        target_logits, stats["thresh"], q, parents, draft_tokens, uniforms, stats["row_max"], stats["row_sum"],
        stats["argmax"], stats["round_c"], stats["round_n"], stats["q_scale"], accepted, accept_len, next_tokens,
        emitted,
        target_logits.stride(0), target_logits.stride(1), q.stride(0), q.stride(1),
        0 if parents.shape[0] == 1 else parents.stride(0), draft_tokens.stride(0), uniforms.stride(0), num_nodes,
        vocab, out_width, 1.0 / temperature, BLOCK_T=_pow2(num_nodes), BLOCK_W=_pow2(out_width),
        num_warps=walk_num_warps(flags["HAS_THRESH"], flags["HAS_DRAFT_PROBS"]), **flags, **LAUNCH_OPTIONS,
    )
    return accepted, accept_len, next_tokens, emitted


@on_input_device
def compact_kv_forward(
    keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], accepted: torch.Tensor, cache_lens: torch.Tensor,
    kv_ptrs: torch.Tensor | None = None,
) -> torch.Tensor:
    """In place on every layer's k / v ``[B, H, S, D]`` (unit stride along D; the layers share shape, dtype
    and k's and v's strides); accepted ``[B, W]`` int64 with unit stride along W (-1 padded); cache_lens
    integer ``[B]``. One launch for all layers: with several, ``kv_ptrs`` is the int64 device tensor of
    their addresses ``[k_0, v_0, k_1, v_1, ...]``. Returns ``cache_lens + 1 + accepted drafts`` (cache_lens'
    dtype)."""
    first_k, first_v = keys[0], values[0]
    batch, num_heads, _, head_dim = first_k.shape
    cache_lens = cache_lens if cache_lens.is_contiguous() else cache_lens.contiguous()  # read at CACHE_LENS + b
    new_lens = torch.empty_like(cache_lens)
    from_table = len(keys) > 1
    compact_kv_kernel[(batch * num_heads, len(keys))](
        first_k, first_v, kv_ptrs if from_table else accepted, accepted, cache_lens, new_lens,
        first_k.stride(0), first_k.stride(1), first_k.stride(2), first_v.stride(0), first_v.stride(1),
        first_v.stride(2), accepted.stride(0), num_heads, accepted.shape[1], head_dim, first_k.shape[2],
        FROM_TABLE=from_table, BLOCK_D=triton.next_power_of_2(head_dim), num_warps=COMPACT_NUM_WARPS, **LAUNCH_OPTIONS,
    )
    return new_lens


_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def aot_specs() -> list[dict]:
    """The launch configurations above, per logits dtype, at real vocabulary sizes (``BLOCK_V`` at its cap)
    and T = 64 (``BLOCK_T``); tiny test vocabularies run the same kernels with smaller blocks."""
    specs = []
    for dtype, ty in _TRITON_TYPES.items():
        specs.append({
            "name": f"tree_verify_argmax_{ty}",
            "fn": node_argmax_kernel,
            "signature": {"LOGITS": f"*{ty}", "PART_VAL": "*fp32", "PART_IDX": "*i32", "stride_lb": "i32",
                          "stride_lt": "i32", "num_nodes": "i32", "vocab": "i32", "split_len": "i32"},
            "constexprs": {"BLOCK_V": VERIFY_BLOCK_V},
            "num_warps": 4, "num_stages": 3,
        })
        # The pointers both sampling kernels take first.
        row_inputs = {"LOGITS": f"*{ty}", "THRESH": "*fp32", "DRAFT_PROBS": f"*{ty}", "PARENTS": "*i64"}
        for has_thresh in (False, True):
            for has_draft in (False, True):
                suffix = f"{ty}{'_filtered' if has_thresh else ''}{'_draftprobs' if has_draft else ''}"
                flags = {"HAS_THRESH": has_thresh, "HAS_DRAFT_PROBS": has_draft, "BLOCK_V": VERIFY_BLOCK_V,
                         "BLOCK_T": 64}
                # Filtered: the stats kernel finds the cut of top-k, top-p or both.
                for has_topk, has_topp in ((True, False), (False, True), (True, True)) if has_thresh else ((False, False),):
                    filters = ("_topk" if has_topk else "") + ("_topp" if has_topp else "")
                    specs.append({
                        "name": f"tree_verify_sampling_stats_{ty}{filters}{'_draftprobs' if has_draft else ''}",
                        "fn": sampling_stats_kernel,
                        "signature": {
                            **row_inputs, "ROW_MAX": "*fp32", "ROW_SUM": "*fp32", "ARGMAX": "*i64",
                            "ROUND_C": "*fp32", "ROUND_N": "*fp32", "Q_SCALE": "*fp32", "stride_lb": "i32",
                            "stride_lt": "i32",
                            "stride_qb": "i32", "stride_qt": "i32", "stride_tree_b": "i32", "num_nodes": "i32",
                            "vocab": "i32", "inv_temp": "fp32", "top_k": "i32", "top_p": "fp32",
                        },
                        "constexprs": {"HAS_TOPK": has_topk, "HAS_TOPP": has_topp, "HAS_DRAFT_PROBS": has_draft,
                                       "BLOCK_V": VERIFY_BLOCK_V, "BLOCK_T": 64, "SEARCH_BLOCK": SEARCH_BLOCK},
                        "num_warps": 4, "num_stages": 3,
                    })
                specs.append({
                    "name": f"tree_verify_sampling_walk_{suffix}",
                    "fn": sampling_walk_kernel,
                    "signature": {
                        **row_inputs, "TOKENS": "*i64", "UNIFORMS": "*fp32", "ROW_MAX": "*fp32", "ROW_SUM": "*fp32",
                        "ARGMAX": "*i64", "ROUND_C": "*fp32", "ROUND_N": "*fp32", "Q_SCALE": "*fp32",
                        "ACCEPTED": "*i64",
                        "ACCEPT_LEN": "*i64", "NEXT_TOKENS": "*i64", "EMITTED": "*i64",
                        "stride_lb": "i32", "stride_lt": "i32", "stride_qb": "i32", "stride_qt": "i32",
                        "stride_tree_b": "i32", "stride_tok_b": "i32", "stride_ub": "i32", "num_nodes": "i32",
                        "vocab": "i32", "out_width": "i32", "inv_temp": "fp32",
                    },
                    "constexprs": {**flags, "BLOCK_W": 64},
                    "num_warps": walk_num_warps(flags["HAS_THRESH"], flags["HAS_DRAFT_PROBS"]), "num_stages": 3,
                })
        for from_table in (False, True):
            specs.append({
                "name": f"tree_verify_compact_kv_{ty}_d128{'_layers' if from_table else ''}",
                "fn": compact_kv_kernel,
                "signature": {"K": f"*{ty}", "V": f"*{ty}", "KV_PTRS": "*i64", "ACCEPTED": "*i64",
                              "CACHE_LENS": "*i32", "NEW_LENS": "*i32", "stride_kb": "i32", "stride_kh": "i32",
                              "stride_ks": "i32", "stride_vb": "i32", "stride_vh": "i32", "stride_vs": "i32",
                              "stride_ab": "i32", "num_heads": "i32", "out_width": "i32", "head_dim": "i32", "kv_len": "i32"},
                "constexprs": {"FROM_TABLE": from_table, "BLOCK_D": 128}, "num_warps": COMPACT_NUM_WARPS,
                "num_stages": 3,
            })
    specs.append({
        "name": "tree_verify_greedy_walk",
        "fn": greedy_walk_kernel,
        "signature": {
            "PARENTS": "*i64", "DEPTH": "*i64", "ANC": "*i64", "TOKENS": "*i64", "PART_VAL": "*fp32",
            "PART_IDX": "*i32", "ARGMAX": "*i64", "ACCEPTED": "*i64", "ACCEPT_LEN": "*i64", "NEXT_TOKENS": "*i64",
            "EMITTED": "*i64", "stride_tree_b": "i32", "stride_anc_b": "i32", "stride_tok_b": "i32",
            "num_nodes": "i32", "num_words": "i32", "out_width": "i32", "num_splits": "i32", "vocab": "i32",
        },
        "constexprs": {"BLOCK_T": 64, "BLOCK_W": 64}, "num_warps": 1, "num_stages": 3,
    })
    return specs
