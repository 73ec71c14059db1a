"""Fused linear divergence: student (and teacher) logits computed tile by tile, never written to HBM.

Student logits are ``z = h_s @ W_s.T (+ b_s)``; teacher logits ``h_t @ W_t.T (+ b_t)`` or a dense
``teacher_logits`` matrix. Every program owns a [BLOCK_N tokens x BLOCK_V vocabulary] tile at a
time, computes its logits with ``tl.dot`` over the hidden dimension (fp32 accumulators) and folds
them into per-row statistics. Three launches:

* ``_fused_linear_stats_kernel`` (PASS 1): per (token block, vocabulary split), online running max /
  sum of exponentials of both sides, the forward / reverse KL accumulator, the hard-label
  cross-entropy's log-sum-exp (temperature 1) and label logit. Writes only ``[stats, splits, N]``
  partials; :func:`fused_linear_stats` merges them (a log-sum-exp merge, as flash-decoding does).
* the same kernel with PASS 2 (mixture divergences and TVD only): the loss terms and
  S = sum_j q_j g_j need both log-sum-exps first, so the tiles are recomputed once more.
* ``_fused_linear_grad_logits_kernel`` (backward): recomputes one vocabulary chunk of tiles and writes
  dL/dz for that chunk, ``[N, chunk]`` with ``chunk`` <= V / 4 and a fixed element budget, never
  [N, V]. The two gradient GEMMs (``d_hidden += dz @ W_chunk``, ``d_weight[chunk] = dz.T @ h``) run in
  cuBLAS on that chunk (see :func:`fused_linear_backward`).

Final-logit soft-capping (Gemma-2; ``s_softcap`` / ``t_softcap`` of the launchers): each side's tile becomes
``cap * tanh(tile / cap)`` right after it is formed (:func:`_both_logit_tiles`), and the dL/dz kernel multiplies by
``1 - tanh^2``; a compile-time branch, absent from uncapped launches.

Tiles are visited in a grouped order (a group = some token blocks x all splits / vocabulary tiles of the
group, as in Triton's matmul tutorial) so the hidden-state blocks and weight tiles that run concurrently
share L2; :func:`stats_schedule` explains the statistics kernel's choice.
"""

from __future__ import annotations

import itertools
import math
import os

import torch
import triton
import triton.language as tl

from ._device import on_input_device
from ._launch import LAUNCH_OPTIONS
from .kl_div import DIVERGENCE_CODES, _divergence_terms

# Per-row partial statistics written by PASS 1 (index into the first dim of the partial buffer).
STAT_MAX_S, STAT_SUM_S, STAT_MAX_T, STAT_SUM_T, STAT_KL, STAT_MAX_Z, STAT_SUM_Z, STAT_LABEL, STAT_ENTROPY = range(9)
NUM_PASS1_STATS = 8  # one more (STAT_ENTROPY) when the student's entropy is asked for
# PASS 2 writes the loss and S.
NUM_PASS2_STATS = 2

# Default tiles (BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages). The statistics kernel keeps both
# sides' fp32 logits tiles, eight running row statistics and the online-softmax temporaries live at
# once: 64 x 64 tiles (16 registers per thread per tile at 8 warps). The gradient kernel of the plain
# KLs has fewer live values and takes 64 x 128; the mixture / TVD gradient evaluates several logs /
# exps per element and stays at 64 x 64. A dense teacher-logits tile arrives in a load layout, not the
# dot's: the layout conversions cost registers, so that mode's statistics use 16-token tiles (32 left
# Triton 3.9 spilling 8 bytes in the TVD pass). fp32 inputs go through FMA (not tensor cores), whose operands live in registers: small tiles. All
# spill-free on sm_80 / sm_90a (benchmarks/compile_check.py).
# Triton 3.9's code generation needs more registers than 3.6's for some of these, so the tiles below
# are the ones spill-free under both (the floor and the newest release, both checked in CI): the
# mixture gradient takes 32-token tiles, the KL gradient with a dense teacher-logits tile 64-wide
# vocabulary tiles, fp32 smaller tiles. The static check also compiles the *aligned* variant (every integer
# argument a multiple of 16, as the JIT specialises at real shapes, which software-pipelines the H loops): the
# fp32 statistics kernel takes 16 x 16 tiles, BLOCK_H 16, two stages: the only nearby configuration spill-free in
# both variants under both releases (wider tiles, BLOCK_H 32 or other warp counts left ptxas spilling 8 bytes).
STATS_CONFIGS = {"16bit": (64, 64, 32, 8, 3), "fp32": (16, 16, 16, 4, 2)}
LOGITS_STATS_CONFIGS = {"16bit": (16, 32, 32, 4, 3), "fp32": (16, 16, 32, 4, 2)}
KL_GRAD_CONFIGS = {"16bit": (64, 128, 32, 8, 3), "fp32": (16, 64, 32, 4, 2)}
LOGITS_KL_GRAD_CONFIGS = {"16bit": (64, 64, 32, 8, 3), "fp32": (16, 64, 32, 4, 2)}
MIXTURE_GRAD_CONFIGS = {"16bit": (32, 64, 32, 8, 3), "fp32": (16, 16, 32, 4, 2)}
LOGITS_MIXTURE_GRAD_CONFIGS = {"16bit": (64, 64, 32, 8, 3), "fp32": (16, 16, 32, 4, 2)}
# Soft-capped logits (either side) take the configurations above, except the mixture / TVD statistics sweep (PASS 2)
# with a hidden-state teacher in 16 bits: with three stages Triton 3.6 left skew_forward's sm_80 aligned build
# spilling 16 bytes (ptxas held it to 128 registers); two stages keep the 64 x 64 tile spill-free in every capped
# PASS 2 build under both releases (32 x 64 tiles were spill-free too, but halve the tokens per weight tile).
CAPPED_MIXTURE_STATS_CONFIGS = {"16bit": (64, 64, 32, 8, 2), "fp32": STATS_CONFIGS["fp32"]}
# And the plain-KL gradient with a hidden-state teacher in fp32: BLOCK_H 32 left Triton 3.9's reverse-KL sm_80 aligned
# build with a 16-byte stack frame; BLOCK_H 16 (as the fp32 statistics take) is spill-free in every capped fp32 KL
# gradient build under both releases, and keeps BLOCK_V (the backward's chunk width).
CAPPED_KL_GRAD_CONFIGS = {"16bit": KL_GRAD_CONFIGS["16bit"], "fp32": (16, 64, 16, 4, 2)}
# The logit soft-cap the static check compiles the capped variants with (Gemma-2's final_logit_softcapping; the cap
# is a constexpr, see _common_args). Capping adds a sigmoid and two multiply-adds per logit; the capped launches take
# the configurations above but CAPPED_MIXTURE_STATS_CONFIGS / CAPPED_KL_GRAD_CONFIGS (default_config).
SPEC_SOFTCAP = 30.0
# Token blocks per group of the grouped program order (``_grouped_tile``: consecutive programs take the
# group's token blocks first, then the next split / vocabulary tile), for both kernels.
GROUP_N = 8
# The statistics kernel's vocabulary splits per token block (:func:`stats_schedule`). Each program walks
# ``tiles_per_split`` vocabulary tiles of one token block, and every tile re-streams that block's hidden states
# (BLOCK_N x (Hs + Ht) x 2 bytes: 1 MiB at 64 tokens and H = 4096) besides a new weight tile of the same size,
# so the hidden blocks of the resident programs should stay in L2 from one tile to the next. The 64 x 64
# bf16 configuration takes 169 registers per thread at 8 warps (sm_90a, aligned): one program per SM, R = 132
# resident on an H100/H200. With 32 splits a group is 8 x 32 = 256 programs, more than R: the resident programs
# hold 8 (at a group boundary 16) hidden blocks, re-read every tile, and about R / 8 = 17 weight tiles, each read
# from HBM once and by 8 programs at about the same time: ~25 MiB touched between two reads of a hidden block.
# The previous rule (about TARGET_PROGRAMS programs in all: 4 splits at N = 8192, groups of 32 programs) had
# R spanning ~4 groups: 33 hidden blocks + 16 weight tiles, ~49 MiB between two reads of a hidden block, about
# the whole 50 MB L2. That would fit what the H200 measured at commit 3680b54 with that rule: the statistics
# kernel at ~120 TFLOP/s (two sweeps, 294 ms), the backward at ~390 TFLOP/s (91 ms for the dL/dz kernel, then
# the same tile code and configuration, one tile per program in groups of 8 token blocks x a whole chunk, plus
# two cuBLAS GEMMs). A model, not a measurement: ``fused_linear_block_sweep`` times both rules.
STATS_SPLITS = 32
# Small N: at least this many programs (4 waves of one program per SM on a 132-SM H100), more splits.
TARGET_PROGRAMS = 528
# Each split covers at least this many vocabulary tiles, which bounds the [stats, splits, N] partials by
# 8 * N * V / (MIN_TILES_PER_SPLIT * BLOCK_V) fp32 elements (at most N * V / 8 with 16-wide tiles); at the target
# shape (N = 8192, V = 128k, 64-wide tiles) they are 8 x 32 x N fp32 = 8 MiB, freed before the backward.
MIN_TILES_PER_SPLIT = 4
# Backward: elements of one dL/dz chunk ([N, chunk]); the chunk is also at most a quarter of V. 2^23 16-bit
# elements (16 MiB): with the compensated d_hidden pair (2·N·H bytes beyond the gradient) the backward's extra memory
# at the target shape (N = 8192, H = 4096, V = 128k) is (2·N·H + 2·N·1024) / (4·N·V) = 1.95 % of one fp32
# [N, V] tensor (target: < 2 %). Each chunk's d_hidden GEMM has K = 1024 against 8 bytes of accumulator traffic per
# output element: 256 FLOP/byte, above an H100/H200's bf16 ridge (~200-300 FLOP/byte).
GRAD_CHUNK_ELEMENTS = 1 << 23
# The compensated d_hidden accumulation (``accumulate_grad_hidden``, bf16 inputs): (BLOCK_N tokens, BLOCK_H
# hidden columns per program, BLOCK_K chunk columns per step, warps, stages). A GEMM tile with a 16-bit pair
# epilogue. "aligned": when every stride, K and H are multiples of 16 (the JIT then vectorises and pipelines; the
# row count only masks); 128 x 128 tiles there, spill-free (<= 206 registers at 8 warps). "generic" (odd sizes,
# where loads are scalarised): 128 x 128 spills ~1 KiB, 64 x 64 x 32 at 8 warps does not (benchmarks/compile_check.py,
# Triton 3.6 and 3.9, sm_80 and sm_90a).
GRAD_HIDDEN_CONFIGS = {"aligned": (128, 128, 64, 8, 3), "generic": (64, 64, 32, 8, 2)}


# Strategies of the Triton path (``fused_linear_kl_div``'s ``distill_ops.fused_linear.TRITON_STRATEGY``):
# * "tiles": the kernels compute logit tiles with tl.dot and never write logits (the design's kernel).
# * "gemm": cuBLAS computes one vocabulary chunk of both sides' logits at a time into fp32 [N, chunk]
#   buffers (bf16 operands, fp32 accumulation and output, GEMM_CHUNK_ELEMENTS each) and the same kernels
#   read them (STUDENT_LOGITS / TEACHER_LOGITS) instead of multiplying: the GEMMs run at cuBLAS speed,
#   the price is 16 bytes per logit of chunk traffic and two chunk buffers of memory.
STRATEGIES = ("tiles", "gemm")
GEMM_CHUNK_ELEMENTS = 1 << 23
# Elementwise launches over logits buffers (no tl.dot; BLOCK_H unused): 16 x 64 tiles, the widest spill-free
# in the generic variant, where an unknown row alignment scalarises the loads (32 x 64 and 16 x 128 spill).
GEMM_CHUNK_CONFIG = (16, 64, 16, 4, 1)


def check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")


def gemm_chunk_columns(num_rows: int, vocab: int, block_v: int) -> int:
    """Columns of one GEMM-strategy logits chunk: a multiple of ``block_v`` within the element budget, and at
    least ~sqrt(4 V).

    Each chunk adds its own [stats, N] partial statistics (one set per split; a narrow chunk has one split), so
    the partials hold about 36 N V / columns bytes against the chunk buffers' 8 N columns: with the element budget
    alone (2^23 / N columns) they grew as N^2 V (2 GiB at N = 65536, V = 128k). About sqrt(4 V) columns balance
    the two, O(N sqrt(V)) in all; at the issue's shape (N = 8192, V = 128k) the budget's 1024 columns are wider."""
    columns = max(min(GEMM_CHUNK_ELEMENTS // max(num_rows, 1), vocab), math.isqrt(4 * vocab))
    return max(block_v, columns // block_v * block_v)


def logits_chunk(hidden: torch.Tensor, weight: torch.Tensor, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
    """``hidden @ weight[start:stop].T`` into ``out[:, :stop - start]`` in fp32 (fp32 accumulation; on CUDA
    cuBLAS takes the 16-bit operands directly and writes fp32)."""
    dest = out[:, : stop - start]
    rows = weight[start:stop].T
    if hidden.dtype == torch.float32:
        torch.mm(hidden, rows, out=dest)
    elif hidden.is_cuda:
        # 16-bit operands, fp32 accumulation and output (cuBLAS). mm's out-dtype overload has no `self` operand
        # (addmm's must match the out dtype in some releases). CUDA only: never run by the CPU tests.
        torch.ops.aten.mm.dtype_out(hidden, rows, torch.float32, out=dest)
    else:  # the interpreter path on CPU
        torch.mm(hidden.float(), rows.float(), out=dest)
    return dest


class _GemmChunks:
    """The GEMM strategy's two fp32 [N, columns] logits buffers (the teacher's only for a hidden teacher)."""

    def __init__(self, s_hidden, s_weight, t_hidden, t_weight, t_logits, block_v: int):
        num_rows, vocab = s_hidden.shape[0], s_weight.shape[0]
        self.columns = gemm_chunk_columns(num_rows, vocab, block_v)
        self.s_hidden, self.s_weight, self.t_hidden, self.t_weight, self.t_logits = (
            s_hidden, s_weight, t_hidden, t_weight, t_logits)
        width = min(self.columns, vocab)
        self.s_buffer = torch.empty(num_rows, width, dtype=torch.float32, device=s_hidden.device)
        self.t_buffer = None if t_logits is not None else torch.empty_like(self.s_buffer)

    def logits(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(student, teacher) logits of columns [start, stop): views of the buffers, or of teacher_logits."""
        student = logits_chunk(self.s_hidden, self.s_weight, start, stop, self.s_buffer)
        if self.t_logits is not None:
            return student, self.t_logits[..., start:stop]
        return student, logits_chunk(self.t_hidden, self.t_weight, start, stop, self.t_buffer)


def default_config(
    dtype: torch.dtype, kernel: str, divergence: str = "forward", teacher_logits: bool = False, softcap: bool = False
) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages) of ``kernel`` ("stats" | "stats_pass2" | "grad") for
    ``dtype`` inputs (``softcap``: either side's logits soft-capped)."""
    if kernel == "stats_pass2" and softcap and not teacher_logits:
        configs = CAPPED_MIXTURE_STATS_CONFIGS
    elif kernel == "grad":
        if is_mixture(divergence):
            configs = LOGITS_MIXTURE_GRAD_CONFIGS if teacher_logits else MIXTURE_GRAD_CONFIGS
        elif teacher_logits:
            configs = LOGITS_KL_GRAD_CONFIGS
        else:
            configs = CAPPED_KL_GRAD_CONFIGS if softcap else KL_GRAD_CONFIGS
    else:
        configs = LOGITS_STATS_CONFIGS if teacher_logits else STATS_CONFIGS
    return configs["fp32" if dtype == torch.float32 else "16bit"]


def is_mixture(divergence: str) -> bool:
    return divergence not in ("forward", "reverse")


@triton.jit
def _grouped_tile(pid, num_n_blocks, num_inner, GROUP: tl.constexpr):
    """(token block, inner index) of program ``pid``: GROUP token blocks x all inner indices per group."""
    per_group = GROUP * num_inner
    group = pid // per_group
    first_n = group * GROUP
    group_n = tl.minimum(num_n_blocks - first_n, GROUP)
    local = pid % per_group
    return first_n + local % group_n, local // group_n


@triton.jit
def _logit_tile(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    stride_hidden,
    stride_weight,
    rows,
    cols,
    row_mask,
    col_mask,
    H,
    HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """fp32 ``hidden[rows] @ weight[cols].T (+ bias[cols])``, [BLOCK_N, BLOCK_V]; H is masked, not padded."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    k_offsets = tl.arange(0, BLOCK_H)
    hidden_rows = hidden_ptr + rows[:, None] * stride_hidden
    weight_cols = weight_ptr + cols[None, :] * stride_weight
    for k_start in range(0, H, BLOCK_H):
        ks = k_start + k_offsets
        k_mask = ks < H
        h = tl.load(hidden_rows + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(weight_cols + ks[:, None], mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if INPUT_PRECISION == "interpreter_fp32":
            # Triton 3.6's CPU interpreter multiplies bf16 operands as raw bits: upcast there only.
            acc = tl.dot(h.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(h, w, acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _stored_logits(logits_ptr, row_offsets, bias_ptr, cols, row_mask, col_mask, col_offset, HAS_BIAS: tl.constexpr):
    """fp32 logits tile read from rows (element offsets ``row_offsets``) whose column 0 is vocabulary column
    ``col_offset`` (+ bias)."""
    tile = tl.load(
        logits_ptr + row_offsets[:, None] + (cols - col_offset)[None, :],
        mask=row_mask[:, None] & col_mask[None, :], other=float("-inf"),
    ).to(tl.float32)
    if HAS_BIAS:
        tile += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return tile


@triton.jit
def _softcapped(logits, CAP: tl.constexpr):
    """``CAP * tanh(logits / CAP)`` (Gemma-2's final-logit soft-capping), written ``CAP * (2 sigmoid(2 logits /
    CAP) - 1)`` as ``_base2_scores`` in tree_attention.py does: the other forms compiled there left ptxas stack
    frames. Saturates to -CAP / +CAP (a -inf logit becomes -CAP, as the model's own tanh makes it)."""
    return (2.0 * CAP) * tl.sigmoid(logits * (2.0 / CAP)) - CAP


@triton.jit
def _teacher_row_offsets(rows, stride_t_logits, t_rows_per_group, stride_t_group, TEACHER_LOGITS: tl.constexpr):
    """Element offsets of the teacher logits' rows: row i is row i % R of group i // R (a batch of shifted logits
    read in place; R = N for plain rows). Computed once per program, before its vocabulary loop (32-bit division:
    rows < 2^31)."""
    if TEACHER_LOGITS:
        group = rows.to(tl.int32) // t_rows_per_group
        return group.to(tl.int64) * stride_t_group + (rows - group * t_rows_per_group) * stride_t_logits
    return rows


@triton.jit
def _both_logit_tiles(
    s_hidden_ptr,
    s_weight_ptr,
    s_bias_ptr,
    t_hidden_ptr,
    t_weight_ptr,
    t_bias_ptr,
    t_logits_ptr,
    stride_s_hidden,
    stride_s_weight,
    stride_t_hidden,
    stride_t_weight,
    t_row_offsets,
    rows,
    cols,
    row_mask,
    col_mask,
    Hs,
    Ht,
    logits_col_offset,
    HAS_S_BIAS: tl.constexpr,
    STUDENT_LOGITS: tl.constexpr,
    TEACHER_LOGITS: tl.constexpr,
    HAS_T_BIAS: tl.constexpr,
    S_PRECISION: tl.constexpr,
    T_PRECISION: tl.constexpr,
    S_SOFTCAP: tl.constexpr,
    T_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Student logits z and teacher logits (both fp32, before the temperature; -inf outside the vocabulary).

    STUDENT_LOGITS / TEACHER_LOGITS: that side's logits are read from a matrix (``s_hidden_ptr`` /
    ``t_logits_ptr``, at rows ``rows * stride_s_hidden`` / ``t_row_offsets``) whose column 0 is vocabulary
    column ``logits_col_offset`` (a chunk buffer of the GEMM strategy), plus the bias if that side has one;
    otherwise they are computed with ``tl.dot``. S_SOFTCAP / T_SOFTCAP (0.0: none): that side's logits are
    soft-capped, ``cap * tanh(logits / cap)``, after the bias."""
    if STUDENT_LOGITS:
        z = _stored_logits(s_hidden_ptr, rows * stride_s_hidden, s_bias_ptr, cols, row_mask, col_mask,
                           logits_col_offset, HAS_S_BIAS)
    else:
        z = _logit_tile(
            s_hidden_ptr, s_weight_ptr, s_bias_ptr, stride_s_hidden, stride_s_weight, rows, cols, row_mask,
            col_mask, Hs, HAS_S_BIAS, S_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H,
        )
    if S_SOFTCAP > 0.0:
        z = _softcapped(z, S_SOFTCAP)
    if TEACHER_LOGITS:
        t = _stored_logits(t_logits_ptr, t_row_offsets, t_bias_ptr, cols, row_mask, col_mask, logits_col_offset,
                           HAS_T_BIAS)
    else:
        t = _logit_tile(
            t_hidden_ptr, t_weight_ptr, t_bias_ptr, stride_t_hidden, stride_t_weight, rows, cols, row_mask,
            col_mask, Ht, HAS_T_BIAS, T_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H,
        )
    if T_SOFTCAP > 0.0:
        t = _softcapped(t, T_SOFTCAP)
    z = tl.where(col_mask[None, :], z, float("-inf"))
    t = tl.where(col_mask[None, :], t, float("-inf"))
    return z, t


@triton.jit
def _fused_linear_stats_kernel(
    s_hidden_ptr,
    s_weight_ptr,
    s_bias_ptr,
    t_hidden_ptr,
    t_weight_ptr,
    t_bias_ptr,
    t_logits_ptr,
    labels_ptr,
    lse_ptr,
    partial_ptr,
    stride_s_hidden,
    stride_s_weight,
    stride_t_hidden,
    stride_t_weight,
    stride_t_logits,
    t_rows_per_group,
    stride_t_group,
    N,
    V,
    Hs,
    Ht,
    col_start,
    num_splits,
    tiles_per_split,
    split_base,
    partial_splits,
    inv_temperature,
    temperature,
    coef,
    DIVERGENCE: tl.constexpr,
    PASS: tl.constexpr,
    HAS_S_BIAS: tl.constexpr,
    STUDENT_LOGITS: tl.constexpr,
    TEACHER_LOGITS: tl.constexpr,
    HAS_T_BIAS: tl.constexpr,
    HAS_CE: tl.constexpr,
    S_PRECISION: tl.constexpr,
    T_PRECISION: tl.constexpr,
    S_SOFTCAP: tl.constexpr,
    T_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    GROUP: tl.constexpr,
    ENTROPY: tl.constexpr = False,
):
    num_n_blocks = tl.cdiv(N, BLOCK_N)
    n_block, split = _grouped_tile(tl.program_id(0), num_n_blocks, num_splits, GROUP)
    rows = (n_block * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_mask = rows < N
    t_row_offsets = _teacher_row_offsets(rows, stride_t_logits, t_rows_per_group, stride_t_group, TEACHER_LOGITS)
    col_offsets = tl.arange(0, BLOCK_V)
    # Columns [col_start, V) are split among the programs of this launch; logits buffers (STUDENT_LOGITS /
    # TEACHER_LOGITS) start at vocabulary column col_start.
    first_col = col_start + split * tiles_per_split * BLOCK_V
    last_col = tl.minimum(first_col + tiles_per_split * BLOCK_V, V)
    # [stats, partial_splits, N] partials, this launch's splits from slot split_base. The gemm strategy's many chunks
    # can take the buffer past 2^31 entries: int64 offsets there; the tiles strategy's stay far below (int32 keeps
    # its register budget: the int64 stride spilled the bf16 skew-forward pass 2 on sm_80).
    if STUDENT_LOGITS:
        partial_rows = partial_ptr + (split_base + split).to(tl.int64) * N + rows
        split_stride = partial_splits.to(tl.int64) * N
    else:
        partial_rows = partial_ptr + (split_base + split) * N + rows
        split_stride = partial_splits * N

    if PASS == 1:
        # Running maxima start at a finite floor so exp(m_old - m_new) is defined while a row has only
        # seen -inf (masked tokens, padding columns).
        max_s = tl.full([BLOCK_N], -1.0e30, tl.float32)
        sum_s = tl.zeros([BLOCK_N], tl.float32)
        max_t = tl.full([BLOCK_N], -1.0e30, tl.float32)
        sum_t = tl.zeros([BLOCK_N], tl.float32)
        kl_acc = tl.zeros([BLOCK_N], tl.float32)
        max_z = tl.full([BLOCK_N], -1.0e30, tl.float32)
        sum_z = tl.zeros([BLOCK_N], tl.float32)
        label_logit = tl.zeros([BLOCK_N], tl.float32)
        entropy_acc = tl.zeros([BLOCK_N], tl.float32)
        if HAS_CE:
            labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1)
        for tile_start in range(first_col, last_col, BLOCK_V):
            cols = (tile_start + col_offsets).to(tl.int64)
            col_mask = cols < last_col
            z, t = _both_logit_tiles(
                s_hidden_ptr, s_weight_ptr, s_bias_ptr, t_hidden_ptr, t_weight_ptr, t_bias_ptr, t_logits_ptr,
                stride_s_hidden, stride_s_weight, stride_t_hidden, stride_t_weight, t_row_offsets,
                rows, cols, row_mask, col_mask, Hs, Ht, col_start, HAS_S_BIAS,
                STUDENT_LOGITS, TEACHER_LOGITS, HAS_T_BIAS, S_PRECISION, T_PRECISION, S_SOFTCAP, T_SOFTCAP, BLOCK_N,
                BLOCK_V, BLOCK_H,
            )
            # Sides one after the other, so that few [BLOCK_N, BLOCK_V] temporaries are live at once.
            a = z * inv_temperature
            b = t * inv_temperature
            new_max_s = tl.maximum(max_s, tl.max(a, axis=1))
            scale_s = tl.exp(max_s - new_max_s)
            w_s = tl.exp(a - new_max_s[:, None])
            sum_s = sum_s * scale_s + tl.sum(w_s, axis=1)
            if DIVERGENCE == 1:  # sum q (a - b), weighted by the student's exponentials
                # A rescale that underflows to 0 drops the old terms, +inf ones included (0 * inf is NaN).
                kl_acc = tl.where(scale_s == 0.0, 0.0, kl_acc * scale_s) + tl.sum(
                    tl.where(w_s == 0.0, 0.0, w_s * (a - b)), axis=1)
            if ENTROPY:  # sum q a, weighted by the student's exponentials: H = lse_s - E_q[a]
                entropy_acc = entropy_acc * scale_s + tl.sum(tl.where(w_s == 0.0, 0.0, w_s * a), axis=1)
            max_s = new_max_s
            new_max_t = tl.maximum(max_t, tl.max(b, axis=1))
            scale_t = tl.exp(max_t - new_max_t)
            w_t = tl.exp(b - new_max_t[:, None])
            sum_t = sum_t * scale_t + tl.sum(w_t, axis=1)
            if DIVERGENCE == 0:  # sum p (b - a), weighted by the teacher's exponentials
                kl_acc = tl.where(scale_t == 0.0, 0.0, kl_acc * scale_t) + tl.sum(
                    tl.where(w_t == 0.0, 0.0, w_t * (b - a)), axis=1)
            max_t = new_max_t
            if HAS_CE:  # the hard-label term is at temperature 1; z is rebuilt from a (z is dead by now)
                z = a * temperature
                new_max_z = tl.maximum(max_z, tl.max(z, axis=1))
                sum_z = sum_z * tl.exp(max_z - new_max_z) + tl.sum(tl.exp(z - new_max_z[:, None]), axis=1)
                max_z = new_max_z
                label_logit += tl.sum(tl.where(cols[None, :] == labels[:, None], z, 0.0), axis=1)
        # Partial layout: the STAT_* indices above (Triton kernels cannot read module globals).
        tl.store(partial_rows + 0 * split_stride, max_s, mask=row_mask)
        tl.store(partial_rows + 1 * split_stride, sum_s, mask=row_mask)
        tl.store(partial_rows + 2 * split_stride, max_t, mask=row_mask)
        tl.store(partial_rows + 3 * split_stride, sum_t, mask=row_mask)
        tl.store(partial_rows + 4 * split_stride, kl_acc, mask=row_mask)
        tl.store(partial_rows + 5 * split_stride, max_z, mask=row_mask)
        tl.store(partial_rows + 6 * split_stride, sum_z, mask=row_mask)
        tl.store(partial_rows + 7 * split_stride, label_logit, mask=row_mask)
        if ENTROPY:
            tl.store(partial_rows + 8 * split_stride, entropy_acc, mask=row_mask)
    else:
        # Mixture divergences / TVD: loss terms and S = sum q g, with both log-sum-exps known.
        lse_s = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
        lse_t = tl.load(lse_ptr + N + rows, mask=row_mask, other=0.0)
        loss_acc = tl.zeros([BLOCK_N], tl.float32)
        dot_acc = tl.zeros([BLOCK_N], tl.float32)
        for tile_start in range(first_col, last_col, BLOCK_V):
            cols = (tile_start + col_offsets).to(tl.int64)
            col_mask = cols < last_col
            z, t = _both_logit_tiles(
                s_hidden_ptr, s_weight_ptr, s_bias_ptr, t_hidden_ptr, t_weight_ptr, t_bias_ptr, t_logits_ptr,
                stride_s_hidden, stride_s_weight, stride_t_hidden, stride_t_weight, t_row_offsets,
                rows, cols, row_mask, col_mask, Hs, Ht, col_start, HAS_S_BIAS,
                STUDENT_LOGITS, TEACHER_LOGITS, HAS_T_BIAS, S_PRECISION, T_PRECISION, S_SOFTCAP, T_SOFTCAP, BLOCK_N,
                BLOCK_V, BLOCK_H,
            )
            term, g, q = _divergence_terms(
                z * inv_temperature, t * inv_temperature, lse_s[:, None], lse_t[:, None], coef, DIVERGENCE,
                FROM_LOG_RATIO=False,
            )
            valid = col_mask[None, :]
            # fp32 sums: a coefficient below 2^-126 is typed fp64, and so are term and g (a loop-carried fp32 turned
            # fp64 failed to compile).
            loss_acc += tl.sum(tl.where(valid, term, 0.0), axis=1).to(tl.float32)
            dot_acc += tl.sum(tl.where(valid & (q != 0.0), q * g, 0.0), axis=1).to(tl.float32)
        tl.store(partial_rows, loss_acc, mask=row_mask)
        tl.store(partial_rows + split_stride, dot_acc, mask=row_mask)


@triton.jit
def _fused_linear_grad_logits_kernel(
    s_hidden_ptr,
    s_weight_ptr,
    s_bias_ptr,
    t_hidden_ptr,
    t_weight_ptr,
    t_bias_ptr,
    t_logits_ptr,
    labels_ptr,
    row_stats_ptr,
    kl_scale_ptr,
    ce_scale_ptr,
    grad_ptr,
    stride_s_hidden,
    stride_s_weight,
    stride_t_hidden,
    stride_t_weight,
    stride_t_logits,
    t_rows_per_group,
    stride_t_group,
    stride_grad,
    N,
    V,
    Hs,
    Ht,
    chunk_start,
    chunk_cols,
    logits_col_offset,
    inv_temperature,
    temperature,
    coef,
    DIVERGENCE: tl.constexpr,
    HAS_S_BIAS: tl.constexpr,
    STUDENT_LOGITS: tl.constexpr,
    TEACHER_LOGITS: tl.constexpr,
    HAS_T_BIAS: tl.constexpr,
    HAS_CE: tl.constexpr,
    S_PRECISION: tl.constexpr,
    T_PRECISION: tl.constexpr,
    S_SOFTCAP: tl.constexpr,
    T_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    GROUP: tl.constexpr,
):
    """dL/dz for columns [chunk_start, chunk_start + chunk_cols), times each row's upstream scale."""
    num_n_blocks = tl.cdiv(N, BLOCK_N)
    n_block, v_block = _grouped_tile(tl.program_id(0), num_n_blocks, tl.cdiv(chunk_cols, BLOCK_V), GROUP)
    rows = (n_block * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_mask = rows < N
    t_row_offsets = _teacher_row_offsets(rows, stride_t_logits, t_rows_per_group, stride_t_group, TEACHER_LOGITS)
    local_cols = (v_block * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    cols = chunk_start + local_cols
    col_mask = (local_cols < chunk_cols) & (cols < V)
    z, t = _both_logit_tiles(
        s_hidden_ptr, s_weight_ptr, s_bias_ptr, t_hidden_ptr, t_weight_ptr, t_bias_ptr, t_logits_ptr,
        stride_s_hidden, stride_s_weight, stride_t_hidden, stride_t_weight, t_row_offsets,
        rows, cols, row_mask, col_mask, Hs, Ht, logits_col_offset, HAS_S_BIAS,
        STUDENT_LOGITS, TEACHER_LOGITS, HAS_T_BIAS, S_PRECISION, T_PRECISION, S_SOFTCAP, T_SOFTCAP, BLOCK_N,
        BLOCK_V, BLOCK_H,
    )
    # row_stats: [4, N] = lse_s, lse_t (at temperature T), S, lse_z (temperature 1).
    lse_s = tl.load(row_stats_ptr + rows, mask=row_mask, other=0.0)[:, None]
    lse_t = tl.load(row_stats_ptr + N + rows, mask=row_mask, other=0.0)[:, None]
    s_dot = tl.load(row_stats_ptr + 2 * N + rows, mask=row_mask, other=0.0)[:, None]
    kl_scale = tl.load(kl_scale_ptr + rows, mask=row_mask, other=0.0)[:, None]
    a = z * inv_temperature
    b = t * inv_temperature
    if DIVERGENCE == 0:
        grad = tl.exp(a - lse_s) - tl.exp(b - lse_t)
    elif DIVERGENCE == 1:
        # q (log q - log p - KL) with the log-sum-exps cancelled analytically (exact for |z| ~ 1e4).
        q = tl.exp(a - lse_s)
        grad = tl.where(q == 0.0, 0.0, q * ((a - b) - s_dot))
    else:
        term, g, q = _divergence_terms(a, b, lse_s, lse_t, coef, DIVERGENCE, FROM_LOG_RATIO=False)
        grad = tl.where(q == 0.0, 0.0, q * (g - s_dot))
    # kl_scale = upstream * kl_weight / T, 0 at ignored rows (whose logits are not looked at).
    grad = tl.where(kl_scale == 0.0, 0.0, grad * kl_scale)
    if HAS_CE:
        lse_z = tl.load(row_stats_ptr + 3 * N + rows, mask=row_mask, other=0.0)[:, None]
        ce_scale = tl.load(ce_scale_ptr + rows, mask=row_mask, other=0.0)[:, None]
        labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1)
        z = a * temperature  # rebuilt: keeping z live through the divergence costs registers
        ce_grad = tl.exp(z - lse_z) - tl.where(cols[None, :] == labels[:, None], 1.0, 0.0)
        grad += tl.where(ce_scale == 0.0, 0.0, ce_grad * ce_scale)
    if S_SOFTCAP > 0.0:
        # Chain rule through the cap: d capped / d raw = 1 - tanh(raw / cap)^2, and tanh(raw / cap) = capped / cap,
        # the tanh this launch recomputed from the raw tile; rebuilt from a (T * a = capped) because keeping a
        # tile live through the divergence costs registers.
        tanh = a * (temperature / S_SOFTCAP)
        grad = grad * (1.0 - tanh * tanh)
    tl.store(
        grad_ptr + rows[:, None] * stride_grad + local_cols[None, :],
        grad.to(grad_ptr.dtype.element_ty),
        mask=row_mask[:, None] & col_mask[None, :],
    )


@triton.jit
def _grad_hidden_accumulate_kernel(
    grad_ptr,
    weight_ptr,
    hi_ptr,
    lo_ptr,
    stride_grad,
    stride_weight,
    stride_out,
    N,
    K,
    H,
    FIRST: tl.constexpr,
    LAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr,
):
    """``d_hidden += dz @ W_chunk`` into a compensated 16-bit pair: ``hi + lo`` is the running fp32 sum.

    ``dz`` [N, K] (one dL/dz chunk), ``W_chunk`` [K, H] (that chunk's weight rows). The tile's product is
    accumulated in fp32, added to ``hi + lo`` (exact in fp32: ``|lo| <= ulp(hi) / 2``), and split again:
    ``hi`` = the sum rounded to the output dtype, ``lo`` = the rounding error in bf16. FIRST: no previous
    sum (nothing read); LAST: ``hi`` alone, the correctly rounded final value (``lo`` not written)."""
    n_block, h_block = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(H, BLOCK_H), GROUP)
    rows = (n_block * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols = h_block * BLOCK_H + tl.arange(0, BLOCK_H)
    row_mask = rows < N
    col_mask = cols < H
    k_offsets = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_H], tl.float32)
    for k_start in range(0, K, BLOCK_K):
        ks = k_start + k_offsets
        k_mask = ks < K
        a = tl.load(grad_ptr + rows[:, None] * stride_grad + ks[None, :], mask=row_mask[:, None] & k_mask[None, :],
                    other=0.0)
        b = tl.load(weight_ptr + ks[:, None].to(tl.int64) * stride_weight + cols[None, :],
                    mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if PRECISION == "interpreter_fp32":
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
    out_offsets = rows[:, None] * stride_out + cols[None, :]
    out_mask = row_mask[:, None] & col_mask[None, :]
    if not FIRST:
        previous = tl.load(hi_ptr + out_offsets, mask=out_mask, other=0.0).to(tl.float32)
        previous += tl.load(lo_ptr + out_offsets, mask=out_mask, other=0.0).to(tl.float32)
        acc += previous
    hi = acc.to(hi_ptr.dtype.element_ty)
    tl.store(hi_ptr + out_offsets, hi, mask=out_mask)
    if not LAST:
        tl.store(lo_ptr + out_offsets, (acc - hi.to(tl.float32)).to(lo_ptr.dtype.element_ty), mask=out_mask)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


def _precision(dtype: torch.dtype, interpreter: bool = False) -> str:
    """``tl.dot`` precision: fp32 inputs must not silently drop to TF32 (10-bit mantissa)."""
    if dtype == torch.float32:
        return "ieee"
    if interpreter and dtype == torch.bfloat16:
        return "interpreter_fp32"
    return "tf32"  # ignored by tl.dot for 16-bit operands


def _teacher_rows_layout(t_logits: torch.Tensor | None, num_rows: int) -> tuple[int, int, int]:
    """``(row stride, rows per group, group stride)`` of teacher logits given as rows ``[N, V]`` or as row groups
    ``[G, R, V]`` (row i is row i % R of group i // R: shifted batch logits read in place)."""
    if t_logits is None:
        return 0, 1, 0
    if t_logits.dim() == 2:
        return t_logits.stride(0), max(num_rows, 1), 0
    return t_logits.stride(1), max(t_logits.shape[1], 1), t_logits.stride(0) if t_logits.shape[0] > 1 else 0


def _common_args(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, t_logits, s_logits=None, s_softcap=None,
                 t_softcap=None):
    """Kernel pointers, strides and flags. ``s_logits`` (GEMM strategy): the student's logits chunk, read in
    place of ``h_s @ W_s.T``; ``t_logits`` is then the teacher's chunk (its bias still added in-kernel).
    ``s_softcap`` / ``t_softcap``: each side's logit soft-cap or None. The cap is a compile-time constant (a model
    fixes it in its config, Gemma-2's is 30.0): ``2 / cap`` folds, and uncapped launches compile as before."""
    dummy = s_hidden
    interpreter = os.environ.get("TRITON_INTERPRET", "0") == "1"
    softcaps = dict(S_SOFTCAP=float(s_softcap or 0.0), T_SOFTCAP=float(t_softcap or 0.0))
    t_layout = _teacher_rows_layout(t_logits, s_hidden.shape[0])
    if s_logits is not None:
        return (
            (s_logits, s_weight, s_bias if s_bias is not None else dummy, dummy, dummy,
             t_bias if t_bias is not None else dummy, t_logits),
            (s_logits.stride(0), s_weight.stride(0), 0, 0, *t_layout),
            dict(HAS_S_BIAS=s_bias is not None, STUDENT_LOGITS=True, TEACHER_LOGITS=True, HAS_T_BIAS=t_bias is not None,
                 S_PRECISION=_precision(s_hidden.dtype, interpreter), T_PRECISION=_precision(s_hidden.dtype, interpreter),
                 **softcaps),
        )
    return (
        (
            s_hidden,
            s_weight,
            s_bias if s_bias is not None else dummy,
            t_hidden if t_hidden is not None else dummy,
            t_weight if t_weight is not None else dummy,
            t_bias if t_bias is not None else dummy,
            t_logits if t_logits is not None else dummy,
        ),
        (
            s_hidden.stride(0),
            s_weight.stride(0),
            t_hidden.stride(0) if t_hidden is not None else 0,
            t_weight.stride(0) if t_weight is not None else 0,
            *t_layout,
        ),
        dict(
            HAS_S_BIAS=s_bias is not None,
            STUDENT_LOGITS=False,
            TEACHER_LOGITS=t_logits is not None,
            HAS_T_BIAS=t_bias is not None,
            S_PRECISION=_precision(s_hidden.dtype, interpreter),
            T_PRECISION=_precision(t_hidden.dtype if t_hidden is not None else s_hidden.dtype, interpreter),
            **softcaps,
        ),
    )


#: The tiles strategy's statistics kernel indexes its [stats, splits, N] partials with int32 (an int64 stride spilled
#: a bf16 pass on sm_80): its splits are capped so the buffer stays below this many entries.
PARTIAL_INDEX_LIMIT = 2**31


def stats_schedule(num_n_blocks: int, num_tiles: int, schedule: tuple[int, int] | None = None, *,
                   min_splits: int = STATS_SPLITS, max_splits: int | None = None) -> tuple[int, int, int]:
    """``(splits, tiles_per_split, group)`` of one statistics launch over ``num_tiles`` vocabulary tiles.

    Splits per token block: ``min_splits`` (:data:`STATS_SPLITS`, the L2 model of the tiles strategy; the gemm
    strategy, which reads each logit once, passes 1), or more when the token blocks are too few for
    :data:`TARGET_PROGRAMS` programs, never with fewer than :data:`MIN_TILES_PER_SPLIT` tiles each; groups of
    :data:`GROUP_N` token blocks (see :data:`STATS_SPLITS` for the L2 model). ``schedule = (splits, group)``
    overrides both (splits capped at one tile each). ``max_splits`` caps either choice."""
    if schedule is None:
        wanted = max(min_splits, triton.cdiv(TARGET_PROGRAMS, num_n_blocks))
        splits = min(max(1, num_tiles // MIN_TILES_PER_SPLIT), wanted)
        group = GROUP_N
    else:
        splits, group = schedule
        if splits < 1 or group < 1:
            raise ValueError(f"schedule must be (splits >= 1, group >= 1), got {schedule}")
        splits = min(splits, num_tiles)
    if max_splits is not None:
        splits = max(1, min(splits, max_splits))
    tiles_per_split = triton.cdiv(num_tiles, splits)
    return triton.cdiv(num_tiles, tiles_per_split), tiles_per_split, group


def _rescaled(partial: torch.Tensor, rescale: torch.Tensor) -> torch.Tensor:
    """``partial * rescale`` with 0 where the rescale underflowed to 0 (a split's +inf sum dropped, not NaN)."""
    return torch.where(rescale == 0.0, 0.0, partial * rescale)


def _merge_lse(
    partial: torch.Tensor, max_index: int, sum_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row max, row sum at that max, per-split rescale factors) from [stats, splits, N] partials."""
    maxima = partial[max_index]
    row_max = maxima.max(dim=0).values
    rescale = torch.exp(maxima - row_max)
    return row_max, (partial[sum_index] * rescale).sum(dim=0), rescale


@on_input_device
def fused_linear_stats(
    s_hidden: torch.Tensor,
    s_weight: torch.Tensor,
    s_bias: torch.Tensor | None,
    t_hidden: torch.Tensor | None,
    t_weight: torch.Tensor | None,
    t_bias: torch.Tensor | None,
    t_logits: torch.Tensor | None,
    labels: torch.Tensor | None,
    *,
    divergence: str,
    coef: float,
    temperature: float,
    has_ce: bool,
    configs: tuple[tuple[int, int, int, int, int], tuple[int, int, int, int, int]] | None = None,
    strategy: str = "tiles",
    schedule: tuple[int, int] | None = None,
    s_softcap: float | None = None,
    t_softcap: float | None = None,
    entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward statistics on 2-D inputs (unit stride along H / V, ``V = s_weight.shape[0]``); ``t_logits`` may
    also be row groups ``[G, R, V]`` with ``G * R = N`` (see :func:`_teacher_rows_layout`).

    Returns ``(divergence [N], cross_entropy [N], row_stats [4, N])``, all fp32, for every row
    (ignored rows are the caller's business). ``row_stats`` = (lse_s, lse_t at temperature T, S,
    lse_z at temperature 1): what :func:`fused_linear_grad_logits` needs. ``configs``: the launch
    configurations of PASS 1 and PASS 2 (defaults: :func:`default_config`). ``strategy``: ``"tiles"``
    (logits with ``tl.dot`` in the kernel) or ``"gemm"`` (see :data:`STRATEGIES`). ``schedule``: ``(splits,
    group)`` instead of :func:`stats_schedule`'s choice (the block sweep; any value gives the same result).
    ``s_softcap`` / ``t_softcap``: soft-cap that side's logits (``cap * tanh(logits / cap)``, after the bias and
    before the temperature; the cross-entropy sees the capped student logits), None for none. ``entropy``:
    ``row_stats`` gets a fifth row, the entropy of the student's distribution at temperature T
    (``lse_s - E_q[z / T]``, accumulated in PASS 1 next to its log-sum-exp; a compile-time branch).
    """
    check_strategy(strategy)
    gemm = strategy == "gemm"
    if gemm:
        defaults = (GEMM_CHUNK_CONFIG, GEMM_CHUNK_CONFIG)
    else:
        defaults = tuple(default_config(s_hidden.dtype, kernel, teacher_logits=t_logits is not None,
                                        softcap=bool(s_softcap or t_softcap)) for kernel in ("stats", "stats_pass2"))
    pass1_config, pass2_config = configs or defaults
    num_rows, vocab = s_hidden.shape[0], s_weight.shape[0]
    device = s_hidden.device
    row_stats = torch.zeros(4 + entropy, num_rows, dtype=torch.float32, device=device)
    divergence_rows = torch.zeros(num_rows, dtype=torch.float32, device=device)
    ce_rows = torch.zeros(num_rows, dtype=torch.float32, device=device)
    if num_rows == 0:
        return divergence_rows, ce_rows, row_stats
    code = DIVERGENCE_CODES[divergence]
    hidden_widths = (s_hidden.shape[1], t_hidden.shape[1] if t_hidden is not None else 0)
    chunks = _GemmChunks(s_hidden, s_weight, t_hidden, t_weight, t_logits, pass1_config[1]) if gemm else None

    def launch(pass_index, config, lse, num_stats, has_ce_pass, has_entropy=False):
        block_n, block_v, block_h, num_warps, num_stages = config
        num_n_blocks = triton.cdiv(num_rows, block_n)
        # Columns per launch: the whole vocabulary (tiles), or one chunk of logits (gemm).
        span = chunks.columns if gemm else vocab
        num_tiles = triton.cdiv(span, block_v)
        # gemm: every chunk launch adds its splits' partials, so it splits only for parallelism (and indexes them
        # with int64); tiles: int32 partial offsets, so at most PARTIAL_INDEX_LIMIT entries (a race audit,
        # 2026-12-07: 32 splits wrapped past 2^31 from N = 8.4M rows).
        if not gemm and num_stats * num_rows >= PARTIAL_INDEX_LIMIT:
            raise ValueError(f"the Triton tiles strategy takes fewer than {PARTIAL_INDEX_LIMIT // num_stats} rows per "
                             f"call, got {num_rows}: split the tokens into several calls")
        num_splits, tiles_per_split, group = stats_schedule(
            num_n_blocks, num_tiles, schedule, min_splits=1 if gemm else STATS_SPLITS,
            max_splits=None if gemm else (PARTIAL_INDEX_LIMIT - 1) // (num_stats * num_rows))
        starts = range(0, vocab, span)
        partial = torch.empty(num_stats, num_splits * len(starts), num_rows, dtype=torch.float32, device=device)
        for index, start in enumerate(starts):
            stop = min(start + span, vocab)
            if gemm:
                s_logits, t_chunk = chunks.logits(start, stop)
                pointers, strides, flags = _common_args(
                    s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, t_chunk, s_logits=s_logits,
                    s_softcap=s_softcap, t_softcap=t_softcap)
            else:
                pointers, strides, flags = _common_args(
                    s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, t_logits, s_softcap=s_softcap,
                    t_softcap=t_softcap)
            _fused_linear_stats_kernel[(num_n_blocks * num_splits,)](
                *pointers, labels if labels is not None else row_stats, lse, partial, *strides,
                num_rows, stop, *hidden_widths, start, num_splits, tiles_per_split, index * num_splits,
                partial.shape[1], 1.0 / temperature, temperature, coef,
                DIVERGENCE=code, PASS=pass_index, HAS_CE=has_ce_pass, BLOCK_N=block_n, BLOCK_V=block_v,
                BLOCK_H=block_h, GROUP=group, ENTROPY=has_entropy, num_warps=num_warps, num_stages=num_stages,
                **LAUNCH_OPTIONS,
                **flags,
            )
        return partial

    partial = launch(1, pass1_config, row_stats, NUM_PASS1_STATS + entropy, has_ce, entropy)
    max_s, sum_s, rescale_s = _merge_lse(partial, STAT_MAX_S, STAT_SUM_S)
    max_t, sum_t, rescale_t = _merge_lse(partial, STAT_MAX_T, STAT_SUM_T)
    lse_s = max_s + torch.log(sum_s)
    lse_t = max_t + torch.log(sum_t)
    row_stats[0] = lse_s
    row_stats[1] = lse_t
    if entropy:
        row_stats[4] = lse_s - (partial[STAT_ENTROPY] * rescale_s).sum(dim=0) / sum_s
    if divergence == "forward":
        kl_sum = _rescaled(partial[STAT_KL], rescale_t).sum(dim=0)
        divergence_rows = kl_sum / sum_t - lse_t + lse_s
    elif divergence == "reverse":
        mean_diff = _rescaled(partial[STAT_KL], rescale_s).sum(dim=0) / sum_s  # E_q[a - b]
        row_stats[2] = mean_diff
        divergence_rows = mean_diff - lse_s + lse_t
    else:
        second = launch(2, pass2_config, row_stats, NUM_PASS2_STATS, False)
        divergence_rows = second[0].sum(dim=0)
        row_stats[2] = second[1].sum(dim=0)
    if has_ce:
        max_z, sum_z, _ = _merge_lse(partial, STAT_MAX_Z, STAT_SUM_Z)
        lse_z = max_z + torch.log(sum_z)
        row_stats[3] = lse_z
        ce_rows = lse_z - partial[STAT_LABEL].sum(dim=0)
    return divergence_rows, ce_rows, row_stats


def grad_chunk_columns(num_rows: int, vocab: int, block_v: int) -> int:
    """Columns of one backward dL/dz chunk: a multiple of ``block_v``, at most V / 4 and the element budget."""
    budget = min(GRAD_CHUNK_ELEMENTS // max(num_rows, 1), triton.cdiv(vocab, 4))
    return max(block_v, budget // block_v * block_v)


@on_input_device
def accumulate_grad_hidden(
    hi: torch.Tensor,
    lo: torch.Tensor | None,
    grad_chunk: torch.Tensor,
    weight_chunk: torch.Tensor,
    *,
    first: bool,
    last: bool,
    config: tuple[int, int, int, int, int] | None = None,
) -> None:
    """``hi + lo += grad_chunk @ weight_chunk`` (fp32 accumulation; see ``_grad_hidden_accumulate_kernel``).

    ``hi`` [N, H] (the bf16 d_hidden, written in place), ``lo`` [N, H] bf16 (its rounding error; ``None`` when
    ``first and last``), ``grad_chunk`` [N, K], ``weight_chunk`` [K, H], all row-major with unit inner stride.
    ``first``: ``hi`` / ``lo`` are not read (no zero fill needed); ``last``: ``hi`` gets the correctly rounded sum
    and ``lo`` is not written."""
    num_rows, hidden = hi.shape
    strides = (grad_chunk.stride(0), weight_chunk.stride(0), hi.stride(0), grad_chunk.shape[1], hidden)
    aligned = all(value % 16 == 0 for value in strides)
    block_n, block_h, block_k, num_warps, num_stages = config or GRAD_HIDDEN_CONFIGS[
        "aligned" if aligned else "generic"]
    if lo is None and not (first and last):
        raise ValueError("accumulate_grad_hidden: lo is required unless first and last")
    if num_rows == 0 or hidden == 0:
        return
    interpreter = os.environ.get("TRITON_INTERPRET", "0") == "1"
    grid = (triton.cdiv(num_rows, block_n) * triton.cdiv(hidden, block_h),)
    _grad_hidden_accumulate_kernel[grid](
        grad_chunk, weight_chunk, hi, lo if lo is not None else hi,
        grad_chunk.stride(0), weight_chunk.stride(0), hi.stride(0),
        num_rows, grad_chunk.shape[1], hidden,
        FIRST=first, LAST=last, PRECISION=_precision(hi.dtype, interpreter),
        BLOCK_N=block_n, BLOCK_H=block_h, BLOCK_K=block_k, GROUP=GROUP_N,
        num_warps=num_warps, num_stages=num_stages, **LAUNCH_OPTIONS,
    )


@on_input_device
def fused_linear_grad_logits(
    s_hidden: torch.Tensor,
    s_weight: torch.Tensor,
    s_bias: torch.Tensor | None,
    t_hidden: torch.Tensor | None,
    t_weight: torch.Tensor | None,
    t_bias: torch.Tensor | None,
    t_logits: torch.Tensor | None,
    labels: torch.Tensor | None,
    row_stats: torch.Tensor,
    kl_scale: torch.Tensor,
    ce_scale: torch.Tensor | None,
    grad_out: torch.Tensor,
    chunk_start: int,
    *,
    divergence: str,
    coef: float,
    temperature: float,
    config: tuple[int, int, int, int, int] | None = None,
    s_logits: torch.Tensor | None = None,
    s_softcap: float | None = None,
    t_softcap: float | None = None,
) -> None:
    """Write dL/dz for student columns [chunk_start, chunk_start + grad_out.shape[1]) into ``grad_out``.

    ``kl_scale`` / ``ce_scale`` ([N] fp32) are each row's upstream gradient times kl_weight / T and
    ce_weight (0 at ignored rows); ``ce_scale=None`` means no cross-entropy term. ``s_logits`` (GEMM
    strategy): this chunk's student logits, with ``t_logits`` this chunk's teacher logits (both [N, chunk]).
    ``s_softcap`` / ``t_softcap``: as in :func:`fused_linear_stats`; ``grad_out`` is then dL/dz of the raw
    (uncapped) student logits.
    """
    block_n, block_v, block_h, num_warps, num_stages = config or (
        GEMM_CHUNK_CONFIG if s_logits is not None
        else default_config(s_hidden.dtype, "grad", divergence, teacher_logits=t_logits is not None,
                            softcap=bool(s_softcap or t_softcap))
    )
    num_rows, vocab = s_hidden.shape[0], s_weight.shape[0]
    chunk_cols = grad_out.shape[1]
    if num_rows == 0 or chunk_cols == 0:
        return
    pointers, strides, flags = _common_args(
        s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, t_logits, s_logits=s_logits, s_softcap=s_softcap,
        t_softcap=t_softcap)
    grid = (triton.cdiv(num_rows, block_n) * triton.cdiv(chunk_cols, block_v),)
    _fused_linear_grad_logits_kernel[grid](
        *pointers,
        labels if labels is not None else row_stats,
        row_stats,
        kl_scale,
        ce_scale if ce_scale is not None else kl_scale,
        grad_out,
        *strides,
        grad_out.stride(0),
        num_rows,
        vocab,
        s_hidden.shape[1],
        t_hidden.shape[1] if t_hidden is not None else 0,
        chunk_start,
        chunk_cols,
        chunk_start if s_logits is not None else 0,
        1.0 / temperature,
        temperature,
        coef,
        DIVERGENCE=DIVERGENCE_CODES[divergence],
        HAS_CE=ce_scale is not None,
        BLOCK_N=block_n,
        BLOCK_V=block_v,
        BLOCK_H=block_h,
        GROUP=GROUP_N,
        num_warps=num_warps,
        num_stages=num_stages,
        **LAUNCH_OPTIONS,
        **flags,
    )


def aot_specs() -> list[dict]:
    """Launch configurations for the static check: both kernels, every divergence, bf16 and fp32, with the
    teacher as hidden states + weight ("linear"), as dense logits ("logits"), and the GEMM strategy's launches
    over fp32 logits chunks of both sides ("gemm", teacher bias added in-kernel); the soft-capped variants of all
    of them in bf16, fp16 and fp32; PASS 1 with the student's entropy (forward, reverse, JSD); the compensated
    d_hidden accumulation of bf16 inputs (every first / last combination, both tile layouts)."""
    specs = []
    for dtype_name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        precision = _precision(dtype)

        def signature(mode: str, **extra: str) -> dict:
            logits_type = "*fp32" if mode == "gemm" else f"*{dtype_name}"
            return {
                "s_hidden_ptr": logits_type,
                "s_weight_ptr": f"*{dtype_name}",
                "s_bias_ptr": f"*{dtype_name}",
                "t_hidden_ptr": f"*{dtype_name}",
                "t_weight_ptr": f"*{dtype_name}",
                "t_bias_ptr": f"*{dtype_name}",
                "t_logits_ptr": logits_type,
                "labels_ptr": "*i64",
                **{key: value for key, value in extra.items() if key.endswith("_ptr")},
                "stride_s_hidden": "i64",
                "stride_s_weight": "i64",
                "stride_t_hidden": "i64",
                "stride_t_weight": "i64",
                "stride_t_logits": "i64",
                "t_rows_per_group": "i32",
                "stride_t_group": "i64",
                **{key: value for key, value in extra.items() if key.startswith("stride_")},
                "N": "i32",
                "V": "i32",
                "Hs": "i32",
                "Ht": "i32",
                **{key: value for key, value in extra.items() if not key.endswith("_ptr") and not key.startswith("stride_")},
                "inv_temperature": "fp32",
                "temperature": "fp32",
                "coef": "fp32",
            }

        def constexprs(kernel: str, mode: str, divergence: str, softcap: bool, **extra) -> tuple[dict, dict]:
            if mode == "gemm":
                config = GEMM_CHUNK_CONFIG
            else:
                config = default_config(dtype, kernel, divergence, mode == "logits", softcap)
            block_n, block_v, block_h, num_warps, num_stages = config
            values = {
                "HAS_S_BIAS": True,
                "STUDENT_LOGITS": mode == "gemm",
                "TEACHER_LOGITS": mode != "linear",
                "HAS_T_BIAS": mode == "gemm",
                "S_PRECISION": precision,
                "T_PRECISION": precision,
                "GROUP": GROUP_N,
                "BLOCK_N": block_n,
                "BLOCK_V": block_v,
                "BLOCK_H": block_h,
                "DIVERGENCE": DIVERGENCE_CODES[divergence],
                # Gemma-2's cap; a dense teacher's logits are final (never capped).
                "S_SOFTCAP": SPEC_SOFTCAP if softcap else 0.0,
                "T_SOFTCAP": SPEC_SOFTCAP if softcap and mode != "logits" else 0.0,
                **extra,
            }
            return values, {"num_warps": num_warps, "num_stages": num_stages}

        # Soft-capped logits (Gemma-2): every dtype the launchers take them in, with default_config's capped tiles (fp16
        # the 16-bit ones). fp16: the capped launches only (its uncapped ones, on the bf16 tiles, are not in the check).
        softcaps = (True,) if dtype == torch.float16 else (False, True)
        for name, mode, softcap in itertools.product(DIVERGENCE_CODES, ("linear", "logits", "gemm"), softcaps):
            passes = (1,) if name in ("forward", "reverse") else (1, 2)
            suffix = ",softcap" if softcap else ""
            # PASS 1 also with the student's entropy (return_entropy, TRL's DistillationTrainer metric). PASS 1
            # depends on the divergence only through forward / reverse / the rest: those three suffice.
            with_entropy = [(1, True)] if name in ("forward", "reverse", "jsd") else []
            for pass_index, entropy in [(index, False) for index in passes] + with_entropy:
                kernel = "stats" if pass_index == 1 else "stats_pass2"
                values, launch = constexprs(kernel, mode, name, softcap, PASS=pass_index, HAS_CE=pass_index == 1,
                                            ENTROPY=entropy)
                specs.append({
                    "name": (f"fused_linear_stats[{name},pass{pass_index},{mode},{dtype_name}{suffix}"
                             f"{',entropy' if entropy else ''}]"),
                    "fn": _fused_linear_stats_kernel,
                    "signature": signature(
                        mode, lse_ptr="*fp32", partial_ptr="*fp32", col_start="i32", num_splits="i32",
                        tiles_per_split="i32", split_base="i32", partial_splits="i32",
                    ),
                    "constexprs": values,
                    **launch,
                })
            values, launch = constexprs("grad", mode, name, softcap, HAS_CE=True)
            specs.append({
                "name": f"fused_linear_grad_logits[{name},{mode},{dtype_name}{suffix}]",
                "fn": _fused_linear_grad_logits_kernel,
                "signature": signature(
                    mode, row_stats_ptr="*fp32", kl_scale_ptr="*fp32", ce_scale_ptr="*fp32",
                    grad_ptr=f"*{dtype_name}", stride_grad="i64", chunk_start="i32", chunk_cols="i32",
                    logits_col_offset="i32",
                ),
                "constexprs": values,
                **launch,
            })
    steps = [("bf16", first, last) for first in (False, True) for last in (False, True)]
    for (dtype_name, first, last), layout in itertools.product(steps, GRAD_HIDDEN_CONFIGS):
        block_n, block_h, block_k, num_warps, num_stages = GRAD_HIDDEN_CONFIGS[layout]
        specs.append({
            "name": f"grad_hidden_accumulate[{dtype_name},first={first},last={last},{layout}]",
            "fn": _grad_hidden_accumulate_kernel,
            "signature": {
                "grad_ptr": f"*{dtype_name}", "weight_ptr": f"*{dtype_name}", "hi_ptr": f"*{dtype_name}",
                "lo_ptr": "*bf16", "stride_grad": "i64", "stride_weight": "i64", "stride_out": "i64",
                "N": "i32", "K": "i32", "H": "i32",
            },
            "constexprs": {"FIRST": first, "LAST": last, "PRECISION": "tf32", "BLOCK_N": block_n, "BLOCK_H": block_h,
                           "BLOCK_K": block_k, "GROUP": GROUP_N},
            "num_warps": num_warps,
            "num_stages": num_stages,
            # The launcher picks the aligned tiles only when strides, K and H are multiples of 16; N only masks.
            "variants": ("aligned",) if layout == "aligned" else ("generic", "aligned"),
            "unaligned": ("N",),
        })
    return specs
