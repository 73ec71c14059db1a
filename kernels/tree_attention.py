"""Tree attention for speculative-decoding verification: Triton kernels and launchers.

One program owns one (sequence, KV head) pair and a block of ``BLOCK_M`` query rows, where a row is a
(query head of that KV group, tree node) pair: the ``Hq / Hkv`` query heads that share a KV head are
processed together, so each K/V tile is loaded once for all of them. With bf16 / fp16 inputs a block holds
up to 128 rows, so one program covers the whole group (and reads each K/V tile once per sequence, KV head
and split) whenever ``GROUP * T <= 128``, e.g. Hq/Hkv = 4 up to T = 32; larger groups take several row
blocks, adjacent in launch order so that their repeated reads can come from L2 (see ``_block_config``).
The program streams the prefix ``[0, cache_len)`` with no mask, software-pipelined, then the ``T`` tree
keys at ``[cache_len, cache_len + T)`` under the packed ancestor bitmask, in one online softmax (base 2).
In split-KV mode (``choose_num_splits``) the prefix is cut into ``num_splits`` chunks, each program writes
a normalised partial output and its log-sum-exp, split 0 also covers the tree block, and a second kernel
merges the partials.
"""

import itertools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._device import on_input_device
from ._launch import LAUNCH_OPTIONS

BITS_PER_WORD = 64
# Split-KV heuristic (see ``choose_num_splits``).
MIN_SPLIT_LEN = 512
MAX_SPLITS = 32
MAX_GRID_Y = 65535  # CUDA's limit on a launch grid's second dimension
# Query rows of the largest row block: a whole GQA group of up to 128 (head, node) rows per program.
MAX_BLOCK_M = 128
DEFAULT_SM_COUNT = 132
_LOG2E = 1.4426950408889634


@triton.jit
def _online_softmax_step(scores, m_i, l_i, acc, v_tile, FP32_DOT: tl.constexpr):
    """Fold one tile of base-2 scores (``-inf`` where masked) into the running max / sum / output."""
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    # A row whose every key so far is masked has m_new == -inf: shift by 0 so it stays exactly 0.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_shift)
    p = tl.exp2(scores - m_shift[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if FP32_DOT:
        acc = acc * alpha[:, None] + tl.dot(p, v_tile.to(tl.float32), input_precision="tf32x3")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v_tile.dtype), v_tile)
    return m_new, l_i, acc


@triton.jit
def _base2_scores(raw, score_scale, softcap_log2, SOFTCAP: tl.constexpr):
    """Base-2 softmax scores of raw ``q . k`` products. Without soft-capping ``score_scale`` is
    ``sm_scale * log2(e)``. With it (Gemma-2) the score is ``cap * tanh(x)``, ``x = sm_scale * raw / cap``,
    computed as ``cap * (2 sigmoid(2x) - 1)`` (saturates to -cap / +cap at either end; ``score_scale =
    2 sm_scale / cap``, ``softcap_log2 = cap log2(e)``). The other forms we compiled (an explicit exp2 and
    division, IEEE or approximate) left 8-byte stack frames in several configurations."""
    if SOFTCAP:
        return (2.0 * softcap_log2) * tl.sigmoid(raw * score_scale) - softcap_log2
    return raw * score_scale


@triton.jit
def tree_attention_fwd_kernel(
    Q, K, V, ANC, CACHE_LENS, OUT, LSE, DEPTH, SINKS,
    score_scale, softcap_log2,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os, stride_ot,
    stride_lb, stride_lh, stride_ls,
    stride_anc_b, stride_depth_b,
    num_kv_heads, num_row_blocks, num_nodes, num_words, kv_len, split_len, sliding_window,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    TREE_BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, FP32_DOT: tl.constexpr, SOFTCAP: tl.constexpr,
    WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    # Row blocks of one KV head are adjacent in launch order, so when a group needs several of them
    # (GROUP * T > BLOCK_M) they run together and their repeated K/V reads can hit L2.
    pid = tl.program_id(0)
    split = tl.program_id(1)
    pid_m = pid % num_row_blocks
    pid_bh = pid // num_row_blocks
    batch = pid_bh // num_kv_heads
    kv_head = pid_bh % num_kv_heads

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < GROUP * num_nodes
    node = rows % num_nodes
    head = kv_head * GROUP + rows // num_nodes
    dims = tl.arange(0, HEAD_DIM)
    cols = tl.arange(0, BLOCK_N)

    # The launcher guarantees 16-element-aligned strides. The hints go on computed offsets: triton 3.6
    # silently drops tl.multiple_of on a scalar kernel argument, which left every K/V element with its own
    # scalar load and 64-bit pointer (255 registers, spills). With them each 2-D load / store moves 16 bytes
    # per lane and each row costs one 64-bit base offset.
    q_rows = tl.multiple_of(head.to(tl.int64) * stride_qh + node.to(tl.int64) * stride_qt, 16)
    q_base = Q + tl.multiple_of(batch.to(tl.int64) * stride_qb, 16)
    q = tl.load(q_base + q_rows[:, None] + dims[None, :], mask=row_valid[:, None], other=0.0)
    if FP32_DOT:
        q = q.to(tl.float32)
    k_base = K + tl.multiple_of(batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh, 16)
    v_base = V + tl.multiple_of(batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh, 16)
    # Clamped at 0: values are checked only on the CPU, and a negative one (or an int64 >= 2^31 wrapped by the
    # launcher's int32 cast) must not address keys before the sequence's rows.
    cache_len = tl.maximum(tl.load(CACHE_LENS + batch).to(tl.int32), 0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if HAS_SINKS:
        # Attention sinks (gpt-oss): one extra logit per query head in the softmax's denominator and no value.
        # Split 0 starts from it (running max = the sink, sum = 1); the merge weighs the splits by their LSEs.
        sink = tl.load(SINKS + head, mask=row_valid, other=0.0).to(tl.float32) * 1.4426950408889634
        m_i = tl.where(split == 0, sink, m_i)
        l_i = tl.where(split == 0, 1.0, l_i)

    # Prefix: every query row sees every key, so the only mask is the tile's tail.
    if SPLIT:
        lo = split * split_len
        hi = tl.minimum(lo + split_len, cache_len)
    else:
        lo = 0
        hi = cache_len
    hi = tl.minimum(hi, kv_len)
    if WINDOW:
        # Sliding window: node i (position cache_len + depth_i) sees positions > its position - window. Every
        # row's window starts at or after cache_len - window + 1, so the keys before it are never read.
        depth_base = DEPTH + batch.to(tl.int64) * stride_depth_b
        node_depth = tl.load(depth_base + node, mask=row_valid, other=0).to(tl.int32)
        lowest = cache_len + node_depth - sliding_window + 1
        lo = tl.maximum(lo, cache_len - sliding_window + 1)
    for start in range(lo, hi, BLOCK_N):
        keys = start + cols
        key_valid = keys < hi
        k_rows = tl.multiple_of(keys * stride_ks, 16)
        k_tile = tl.load(k_base + k_rows[:, None] + dims[None, :], mask=key_valid[:, None], other=0.0)
        if FP32_DOT:
            scores = tl.dot(q, tl.trans(k_tile.to(tl.float32)), input_precision="tf32x3")
        else:
            scores = tl.dot(q, tl.trans(k_tile))
        visible = key_valid[None, :]
        if WINDOW:
            visible = visible & (keys[None, :] >= lowest[:, None])
        scores = tl.where(visible, _base2_scores(scores, score_scale, softcap_log2, SOFTCAP), float("-inf"))
        v_rows = tl.multiple_of(keys * stride_vs, 16)
        v_tile = tl.load(v_base + v_rows[:, None] + dims[None, :], mask=key_valid[:, None], other=0.0)
        m_i, l_i, acc = _online_softmax_step(scores, m_i, l_i, acc, v_tile, FP32_DOT)

    # Tree block (split 0 only): key j of the block is visible to row i iff bit j of i's ancestor mask.
    # Its own TREE_BLOCK_N-key tiles (32 or 64: never straddling two mask words). 16-bit inputs use 32 whatever
    # BLOCK_N: 64-key tree tiles cost 50 to 70 more registers per thread on sm_90a, which the 128-row tiles
    # cannot afford; fp32 keeps BLOCK_N (a second tile shape makes its 3xTF32 products spill).
    tree_hi = tl.where(split == 0, num_nodes, 0)
    anc_rows = ANC + batch.to(tl.int64) * stride_anc_b + node * num_words
    tree_cols_in_tile = tl.arange(0, TREE_BLOCK_N)
    # At most T / TREE_BLOCK_N tiles: software pipelining would only add buffers and registers.
    for start in tl.range(0, tree_hi, TREE_BLOCK_N, num_stages=1):
        tree_cols = start + tree_cols_in_tile
        keys = cache_len + tree_cols
        key_valid = (tree_cols < num_nodes) & (keys < kv_len)
        # Shift the row's word once (1-D) so the tile test is a narrow shift by the column in the tile.
        words = tl.load(anc_rows + start // 64, mask=row_valid, other=0) >> (start % 64)
        if TREE_BLOCK_N <= 32:
            bits = (words.to(tl.int32)[:, None] >> tree_cols_in_tile[None, :]) & 1
        else:
            # Pick each column's 32-bit half of the word, then shift in 32 bits: a 2-D 64-bit shift costs
            # about 100 more registers per thread.
            low = words.to(tl.int32)
            high = (words >> 32).to(tl.int32)
            half = tl.where(tree_cols_in_tile[None, :] < 32, low[:, None], high[:, None])
            bits = (half >> (tree_cols_in_tile[None, :] & 31)) & 1
        visible = (bits != 0) & key_valid[None, :]
        if WINDOW:  # tree node j sits at position cache_len + depth_j
            key_depth = tl.load(depth_base + tree_cols, mask=tree_cols < num_nodes, other=0).to(tl.int32)
            visible = visible & ((node_depth[:, None] - key_depth[None, :]) < sliding_window)
        k_rows = tl.multiple_of(keys * stride_ks, 16)
        k_tile = tl.load(k_base + k_rows[:, None] + dims[None, :], mask=key_valid[:, None], other=0.0)
        if FP32_DOT:
            scores = tl.dot(q, tl.trans(k_tile.to(tl.float32)), input_precision="tf32x3")
        else:
            scores = tl.dot(q, tl.trans(k_tile))
        scores = tl.where(visible, _base2_scores(scores, score_scale, softcap_log2, SOFTCAP), float("-inf"))
        v_rows = tl.multiple_of(keys * stride_vs, 16)
        v_tile = tl.load(v_base + v_rows[:, None] + dims[None, :], mask=key_valid[:, None], other=0.0)
        m_i, l_i, acc = _online_softmax_step(scores, m_i, l_i, acc, v_tile, FP32_DOT)

    has_mass = l_i > 0.0
    out = acc / tl.where(has_mass, l_i, 1.0)[:, None]
    out_rows = tl.multiple_of(head.to(tl.int64) * stride_oh + node.to(tl.int64) * stride_ot, 16)
    out_base = OUT + tl.multiple_of(batch.to(tl.int64) * stride_ob + split.to(tl.int64) * stride_os, 16)
    out_ptrs = out_base + out_rows[:, None] + dims[None, :]
    if SPLIT:
        tl.store(out_ptrs, out, mask=row_valid[:, None])
        lse = tl.where(has_mass, m_i + tl.log2(tl.where(has_mass, l_i, 1.0)), float("-inf"))
        lse_ptrs = (LSE + batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh
                    + split.to(tl.int64) * stride_ls + node)
        tl.store(lse_ptrs, lse, mask=row_valid)
    else:
        tl.store(out_ptrs, out.to(OUT.dtype.element_ty), mask=row_valid[:, None])


@triton.jit
def tree_attention_merge_kernel(
    PART, LSE, OUT,
    stride_pb, stride_ph, stride_ps, stride_pt,
    stride_lb, stride_lh, stride_ls,
    stride_ob, stride_oh, stride_ot,
    num_heads, num_nodes, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Combine the per-split normalised outputs with their base-2 log-sum-exps."""
    pid_bh = tl.program_id(0)
    batch = pid_bh // num_heads
    head = pid_bh % num_heads
    nodes = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    node_valid = nodes < num_nodes
    dims = tl.arange(0, HEAD_DIM)
    part_base = PART + batch.to(tl.int64) * stride_pb + head.to(tl.int64) * stride_ph
    lse_base = LSE + batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh

    m_i = tl.full([BLOCK_T], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_T], tl.float32)
    acc = tl.zeros([BLOCK_T, HEAD_DIM], tl.float32)
    for split in range(0, num_splits):
        lse = tl.load(lse_base + split * stride_ls + nodes, mask=node_valid, other=float("-inf"))
        part = tl.load(part_base + split * stride_ps + nodes.to(tl.int64)[:, None] * stride_pt + dims[None, :],
                       mask=node_valid[:, None], other=0.0)
        m_new = tl.maximum(m_i, lse)
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_shift)
        weight = tl.exp2(lse - m_shift)
        l_i = l_i * alpha + weight
        acc = acc * alpha[:, None] + weight[:, None] * part
        m_i = m_new
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    out_ptrs = (OUT + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
                + nodes.to(tl.int64)[:, None] * stride_ot + dims[None, :])
    tl.store(out_ptrs, out.to(OUT.dtype.element_ty), mask=node_valid[:, None])


class BlockConfig(NamedTuple):
    """Launch configuration of ``tree_attention_fwd_kernel``: query rows and keys per prefix tile, keys per
    tree-block tile, warps, and the software-pipelining depth of the prefix loop."""

    block_m: int
    block_n: int
    tree_block_n: int
    num_warps: int
    num_stages: int


# bf16 / fp16 configurations, (64 if D <= 64 else 128, BLOCK_M) -> (BLOCK_N, num_warps, num_stages), chosen
# with the compile check (registers, stack frames) under triton 3.6 and 3.9.
_HALF_CONFIGS = {
    (64, 16): (64, 4, 3),
    (64, 32): (64, 8, 3),  # 4 warps: an 8-byte stack frame on sm_80 (triton 3.6)
    (64, 64): (64, 8, 3),
    (64, 128): (64, 8, 3),
    (128, 16): (32, 4, 3),  # 64 keys: a stack frame on sm_90a (triton 3.6)
    (128, 32): (32, 4, 3),  # same
    (128, 64): (64, 8, 3),
    # 64 keys spill on sm_80: the two chained dots put all 8 warps along the rows, so every warp holds the
    # whole K and then V tile as mma operands. 32-key tiles streamed 3 ahead instead.
    (128, 128): (32, 8, 4),
}


def _block_config(rows_per_group: int, head_dim: int, dtype: torch.dtype, softcap: bool = False,
                  window: bool = False, sinks: bool = False) -> BlockConfig:
    """The fixed configurations listed in ``aot_specs``, every one spill-free on sm_80 and sm_90a under
    triton 3.6 and 3.9 (``python -m benchmarks.compile_check --modules distill_ops.kernels.tree_attention``).

    bf16 / fp16, D <= 128: one row block holds the whole KV group (its ``GROUP * T`` rows rounded up to a
    power of two, 16 to ``MAX_BLOCK_M``), so each K/V tile is read once per (sequence, KV head, split)
    whenever ``GROUP * T <= 128`` (Hq/Hkv = 4 up to T = 32); larger groups take several 128-row blocks,
    adjacent in launch order. 64-key prefix tiles where they compile clean, 32 elsewhere (``_HALF_CONFIGS``),
    with a 3- or 4-stage pipelined prefix loop. fp32 inputs take 3xTF32 products, whose operands are split
    into a high and a low TF32 half (four times the register footprint of a bf16 fragment), so they keep
    16-row (D = 128) / 32-row (D = 64) tiles whatever the number of rows. D > 128 keeps small tiles too (a
    128 x 256 fp32 accumulator alone would take 128 registers per thread at 8 warps). With soft-capping the
    32-row D = 128 configuration takes 8 warps: at 4 its split variant has an 8-byte stack frame on sm_80
    (triton 3.6). With a sliding window the 16- and 32-row 16-bit D = 128 configurations pipeline 2 stages (16
    rows: 32-key tiles; 32 rows: 64-key tiles), and with soft-capping as well they take 16-row blocks: the
    other settings we compiled (2 to 8 warps, 1 to 3 stages, 32 or 64 keys) left 8 to 24-byte stack frames
    under triton 3.6 or 3.9. fp32 D <= 64 with a sliding window or sinks takes 32-key tiles (prefix and tree
    block): with 64 keys its window / sink builds reached 255 registers and 40 to 64-byte stack frames on sm_80
    and sm_90a (triton 3.9); 16-row blocks spilled too, one stage compiled clean at up to 200 registers."""
    config = _base_block_config(rows_per_group, head_dim, dtype)
    if dtype == torch.float32 and head_dim <= 64 and (window or sinks):
        return config._replace(block_n=32, tree_block_n=32)
    if window and dtype != torch.float32 and head_dim == 128 and config.block_m <= 32:
        if softcap:
            return BlockConfig(16, 32, 32, 4, 2)
        return config._replace(num_stages=2, block_n=32 if config.block_m == 16 else 64)
    if softcap and head_dim == 128 and config.block_m == 32:
        return config._replace(num_warps=8)
    return config


def _base_block_config(rows_per_group: int, head_dim: int, dtype: torch.dtype) -> BlockConfig:
    if dtype == torch.float32:
        if head_dim == 32:  # 64-key tiles left an 8-byte stack frame on sm_80 and sm_90a (triton 3.6)
            return BlockConfig(32, 32, 32, 8, 2)
        return BlockConfig(16 if head_dim > 64 else 32, 64, 64, 8, 2)
    if head_dim > 128:
        block_m = 32 if rows_per_group <= 32 else 64
        return BlockConfig(block_m, 32, 32, 4 if block_m == 32 else 8, 2)
    block_m = min(MAX_BLOCK_M, max(16, triton.next_power_of_2(rows_per_group)))
    block_n, num_warps, num_stages = _HALF_CONFIGS[64 if head_dim <= 64 else 128, block_m]
    return BlockConfig(block_m, block_n, 32, num_warps, num_stages)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SM_COUNT


def _merge_block_t(head_dim: int) -> int:
    """Nodes per merge program: a [BLOCK_T, D] fp32 accumulator of at most 1024 elements (D = 256 at 8 nodes
    left 8 bytes of spills on sm_90a under Triton 3.6)."""
    return max(1, min(16, 1024 // head_dim))


def choose_num_splits(base_programs: int, max_prefix: int, device: torch.device,
                      partial_keys: int = 2 * MAX_BLOCK_M) -> int:
    """Split-KV heuristic, from host-known sizes only (``max_prefix = S - T``, never ``cache_lens`` values).

    ``base_programs`` is the unsplit grid, B * Hkv * row blocks; ``partial_keys`` what one split program
    adds in traffic (it writes its fp32 partial output, the merge reads it back), counted in prefix keys of
    K/V bytes: ``rows * 4 / element_size`` (256 keys for a 128-row bf16 block).

    The kernel streams K/V, and a program with the 8-warp 128-row D = 128 tiles (148 to 255 registers per
    thread, over half the register file) is alone on its SM, so the model is: the grid runs in waves of one program per SM, and a program costs
    the keys it streams plus, when split, ``partial_keys``. Among 1 to ``min(max_prefix // MIN_SPLIT_LEN,
    MAX_SPLITS)`` splits take the one with the smallest critical path ``waves * (max_prefix / splits +
    partial_keys)``, the fewest splits on a tie. Long prefixes at small batch split until every SM has a
    program (and no more: one more program than SMs is a second wave); a grid that already fills about one
    wave, or a short prefix, does not split, because splitting adds the partial traffic and can only
    shorten the last wave. On 132 SMs, Hq/Hkv = 32/8 and ``GROUP * T <= 128`` (one row block): B = 8,
    L = 4096 -> 64 programs, 2 splits (128 programs); B = 1, L = 16384 -> 8 programs, 16 splits; B = 16 ->
    128 programs, no split. A model, not a measurement: the constants want a GPU sweep."""
    sm_count = _sm_count(device)
    max_splits = max(1, min(max_prefix // MIN_SPLIT_LEN, MAX_SPLITS))

    def critical_path(splits: int) -> tuple[float, int]:
        waves = triton.cdiv(base_programs * splits, sm_count)
        keys = max_prefix + (partial_keys * splits if splits > 1 else 0)
        return waves * keys / splits, splits

    return min(range(1, max_splits + 1), key=critical_path)


@on_input_device
def tree_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ancestor_mask: torch.Tensor,
    cache_lens: torch.Tensor,
    sm_scale: float,
    num_kv_splits: int | None = None,
    softcap: float | None = None,
    depth: torch.Tensor | None = None,
    sliding_window: int | None = None,
    sinks: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch tree attention into ``out`` (``[B, Hq, T, D]``, any strides with a unit last one; default a new
    contiguous tensor) and return it. q ``[B, Hq, T, D]``, k/v ``[B, Hkv, S, D]`` (``S * stride(2) < 2**31``: key
    offsets within one head are int32), ancestor_mask int64 ``[Bt, T, W]`` (Bt 1 or B, contiguous),
    cache_lens int32 ``[B]``; ``softcap`` > 0 or None: scores ``softcap * tanh(sm_scale * q.k / softcap)``;
    ``sliding_window`` with the nodes' ``depth`` int64 ``[Bt, T]`` (contiguous): transformers' sliding window;
    ``sinks`` float ``[Hq]`` (contiguous, any float dtype: no host-side cast per layer) or None: one
    attention-sink logit per query head (gpt-oss)."""
    # The kernel promises the compiler 16-element-aligned strides (vectorised loads); copy otherwise.
    q, k, v = (t if t.stride(-1) == 1 and all(st % 16 == 0 for st in t.stride()[:-1]) else t.contiguous()
               for t in (q, k, v))
    batch, num_heads, num_nodes, head_dim = q.shape
    num_kv_heads, kv_len = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    config = _block_config(group * num_nodes, head_dim, q.dtype, softcap is not None, sliding_window is not None,
                           sinks is not None)
    row_blocks = triton.cdiv(group * num_nodes, config.block_m)
    max_prefix = kv_len - num_nodes
    if num_kv_splits is None:
        rows_per_program = min(group * num_nodes, config.block_m)
        num_kv_splits = choose_num_splits(batch * num_kv_heads * row_blocks, max_prefix, q.device,
                                          partial_keys=rows_per_program * 4 // q.element_size())
    num_kv_splits = min(num_kv_splits, MAX_GRID_Y)  # a caller's count goes on the grid's second dimension
    split_len = triton.cdiv(triton.cdiv(max(max_prefix, 1), num_kv_splits), config.block_n) * config.block_n
    num_kv_splits = max(1, triton.cdiv(max(max_prefix, 1), split_len))
    anc_stride_b = 0 if ancestor_mask.shape[0] == 1 else ancestor_mask.stride(0)
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    # FP32_DOT: fp32-accurate products (3xTF32 on tensor cores) for fp32 inputs; also bf16 under the CPU
    # interpreter, whose bf16 tl.dot is wrong in triton 3.6 (it multiplies the raw uint16 storage).
    fp32_dot = q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and q.device.type == "cpu")
    common = dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                  TREE_BLOCK_N=config.tree_block_n, FP32_DOT=fp32_dot, SOFTCAP=softcap is not None,
                  WINDOW=sliding_window is not None, HAS_SINKS=sinks is not None,
                  num_warps=config.num_warps,
                  num_stages=config.num_stages, **LAUNCH_OPTIONS)
    grid = (batch * num_kv_heads * row_blocks, num_kv_splits)
    # (DEPTH pointer, its batch stride, the window); the pointer is a placeholder never read without a window.
    if sliding_window is None:
        window_args = (cache_lens, 0, 0)
    else:
        window_args = (depth, 0 if depth.shape[0] == 1 else depth.stride(0), sliding_window)
    if softcap is None:
        scale_args = (sm_scale * _LOG2E, 0.0)
    else:
        scale_args = (2.0 * sm_scale / softcap, softcap * _LOG2E)
    if num_kv_splits == 1:
        tree_attention_fwd_kernel[grid](
            q, k, v, ancestor_mask, cache_lens, out, out, window_args[0], cache_lens if sinks is None else sinks,
            *scale_args,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), 0, out.stride(2),
            0, 0, 0,
            anc_stride_b, window_args[1],
            num_kv_heads, row_blocks, num_nodes, ancestor_mask.shape[2], kv_len, split_len, window_args[2],
            SPLIT=False, **common,
        )
        return out
    partial = torch.empty(batch, num_heads, num_kv_splits, num_nodes, head_dim, device=q.device, dtype=torch.float32)
    lse = torch.empty(batch, num_heads, num_kv_splits, num_nodes, device=q.device, dtype=torch.float32)
    tree_attention_fwd_kernel[grid](
        q, k, v, ancestor_mask, cache_lens, partial, lse, window_args[0], cache_lens if sinks is None else sinks,
        *scale_args,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        partial.stride(0), partial.stride(1), partial.stride(2), partial.stride(3),
        lse.stride(0), lse.stride(1), lse.stride(2),
        anc_stride_b, window_args[1],
        num_kv_heads, row_blocks, num_nodes, ancestor_mask.shape[2], kv_len, split_len, window_args[2],
        SPLIT=True, **common,
    )
    merge_block_t = _merge_block_t(head_dim)
    tree_attention_merge_kernel[(batch * num_heads, triton.cdiv(num_nodes, merge_block_t))](
        partial, lse, out,
        partial.stride(0), partial.stride(1), partial.stride(2), partial.stride(3),
        lse.stride(0), lse.stride(1), lse.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        num_heads, num_nodes, num_kv_splits,
        HEAD_DIM=head_dim, BLOCK_T=merge_block_t, num_warps=4, num_stages=1, **LAUNCH_OPTIONS,
    )
    return out


_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# Rows per KV group that reach every distinct ``_block_config`` for D <= 128: T = 1 at Hq/Hkv = 4 (16-row
# blocks), 32, 64 and 128 (larger groups reuse the 128-row blocks).
_AOT_ROWS = (4, 32, 64, 128)


def aot_specs() -> list[dict]:
    """Every configuration the launchers use for D in {16, 32, 64, 128} (the three dtypes) and D = 256 (16-bit;
    fp32 D > 128 runs on the PyTorch path, see ``distill_ops.tree_attention``): each distinct ``_block_config``,
    split and unsplit (GROUP is a specialisation value; 4 = Hq/Hkv 32/8 stands for all). D = 16 and 32 are the
    small heads of tiny test models and draft layers, plain attention only."""
    specs = []
    for dtype, ty in _TRITON_TYPES.items():
        for head_dim in (16, 32, 64, 128) if dtype == torch.float32 else (16, 32, 64, 128, 256):
            configs = sorted({_block_config(rows, head_dim, dtype) for rows in _AOT_ROWS})
            # Soft-capping (Gemma-2) and sliding windows (Mistral, Gemma-2/3 local layers): models with D = 128 or
            # 256, alone and together. Attention sinks (gpt-oss: D = 64, alternating full and sliding-window
            # layers): D = 64, with and without the window. Every dtype the launcher takes them in (fp32: D = 128
            # only for the soft-cap / window), each with its own _block_config.
            options = [(False, False, False)]
            if head_dim >= 128:
                options += [(True, False, False), (False, True, False), (True, True, False)]
            if head_dim == 64:
                options += [(False, False, True), (False, True, True)]
            for config, split, (softcap, window, sinks) in itertools.product(configs, (False, True), options):
                if softcap or window or sinks:
                    config = _block_config(config.block_m, head_dim, dtype, softcap, window, sinks)
                out_ty = "fp32" if split else ty
                signature = {
                    "Q": f"*{ty}", "K": f"*{ty}", "V": f"*{ty}", "ANC": "*i64", "CACHE_LENS": "*i32",
                    "OUT": f"*{out_ty}", "LSE": "*fp32", "DEPTH": "*i64", "SINKS": f"*{ty}", "score_scale": "fp32",
                    "softcap_log2": "fp32",
                }
                for name in ("stride_qb", "stride_qh", "stride_qt", "stride_kb", "stride_kh", "stride_ks",
                             "stride_vb", "stride_vh", "stride_vs", "stride_ob", "stride_oh", "stride_os",
                             "stride_ot", "stride_lb", "stride_lh", "stride_ls", "stride_anc_b", "stride_depth_b",
                             "num_kv_heads", "num_row_blocks", "num_nodes", "num_words", "kv_len", "split_len",
                             "sliding_window"):
                    signature[name] = "i32"
                name = (f"tree_attention_fwd_{ty}_d{head_dim}_m{config.block_m}{'_split' if split else ''}"
                        f"{'_softcap' if softcap else ''}{'_window' if window else ''}{'_sinks' if sinks else ''}")
                if any(spec["name"] == name for spec in specs):  # two row counts mapped to one configuration
                    continue
                specs.append({
                    "name": name,
                    "fn": tree_attention_fwd_kernel,
                    "signature": signature,
                    "constexprs": {"GROUP": 4, "HEAD_DIM": head_dim, "BLOCK_M": config.block_m,
                                   "BLOCK_N": config.block_n, "TREE_BLOCK_N": config.tree_block_n,
                                   "SPLIT": split, "FP32_DOT": dtype == torch.float32, "SOFTCAP": softcap,
                                   "WINDOW": window, "HAS_SINKS": sinks},
                    "num_warps": config.num_warps,
                    "num_stages": config.num_stages,
                })
            signature = {"PART": "*fp32", "LSE": "*fp32", "OUT": f"*{ty}"}
            for name in ("stride_pb", "stride_ph", "stride_ps", "stride_pt", "stride_lb", "stride_lh", "stride_ls",
                         "stride_ob", "stride_oh", "stride_ot", "num_heads", "num_nodes", "num_splits"):
                signature[name] = "i32"
            specs.append({
                "name": f"tree_attention_merge_{ty}_d{head_dim}",
                "fn": tree_attention_merge_kernel,
                "signature": signature,
                "constexprs": {"HEAD_DIM": head_dim, "BLOCK_T": _merge_block_t(head_dim)},
                "num_warps": 4,
                "num_stages": 1,
            })
    return specs
