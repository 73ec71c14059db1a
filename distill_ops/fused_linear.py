"""Fused linear divergence: ``fused_linear_kl_div`` / ``FusedLinearKLDivLoss``.

Distillation straight from hidden states: student logits ``z = h_s @ W_s.T (+ b_s)`` and teacher
logits ``h_t @ W_t.T (+ b_t)`` (or given densely) are computed tile by tile and folded into per-row
statistics; no [N, V] logits, probabilities or gradient ever exist. Per row (token):

    loss = kl_weight * D(p || q) + ce_weight * CE(z, label)

with D any divergence of :func:`distill_ops.kl_div` (same definitions, same temperature
convention: T divides both sides' logits, no T^2 factor) and CE the hard-label cross-entropy of the
student at temperature 1. ``student_softcap`` / ``teacher_softcap`` soft-cap that side's logits as Gemma-2
does (``cap * tanh(logits / cap)``, after the bias, before the temperature); the cross-entropy sees the capped
student logits and backward applies the cap's derivative ``1 - tanh^2`` to dL/dz.

Backends:

* ``triton``: a statistics kernel (plus a second sweep for the mixture divergences), then in backward
  a kernel that recomputes the logits of one vocabulary chunk and writes dL/dz for that chunk only
  (``[N, chunk]``, chunk <= V / 4 and <= 2^23 elements). cuBLAS turns it into that chunk's rows of
  ``d_weight`` (written once, fp32 accumulation over all tokens inside the GEMM), and a Triton GEMM adds
  its contribution to ``d_hidden``. Deterministic: no atomics.
  ``d_hidden`` sums over every chunk, so it needs a running sum of [N, H]. For bf16 inputs that sum
  is kept *compensated* (:data:`GRAD_HIDDEN_ACCUMULATION` = ``"compensated"``, the default): the gradient
  tensor itself holds the sum rounded to its dtype (``hi``) and a bf16 buffer holds the rounding error
  (``lo``); each chunk's GEMM epilogue forms ``hi + lo + partial`` in fp32 and splits it again, the last
  one writes the correctly rounded ``hi`` only. The pair carries ~16 significant bits between chunks
  (fp32 carries 24, the bf16 result 8): the error it adds is ~2^-17 relative per chunk, far below the
  final rounding, and unlike plain bf16 accumulation it does not grow with the chunk count. Memory beyond
  the gradient: 2·N·H bytes instead of the 4·N·H of an fp32 accumulator (``"fp32"``: cuBLAS into fp32,
  converted at the end), which at N = 8192, H = 4096, V = 128k puts the backward's extra memory at
  1.95 % of one fp32 [N, V] tensor instead of 3.9 % (the issue's target: < 2 %). Which of the two is
  faster is for the GPU benchmark to say (``ours_triton`` vs ``ours_triton_fp32acc``; not measured yet).
  fp32 inputs accumulate in their fp32 gradient directly (cuBLAS), no extra buffer. fp16 inputs keep the
  fp32 accumulator: an fp16 ``hi`` could overflow (65504) on a partial sum whose final value fits.
  ``TRITON_STRATEGY = "gemm"`` (a module setting, default ``"tiles"``; ``with triton_strategy("gemm"):`` for a
  block) keeps the same kernels and algorithm
  but lets cuBLAS compute each vocabulary chunk of both sides' logits into fp32 ``[N, chunk]`` buffers
  (``GEMM_CHUNK_ELEMENTS`` each, at least ~sqrt(4 V) columns: see ``gemm_chunk_columns``; bf16 operands,
  fp32 accumulation and output), which the kernels read
  instead of multiplying: logits do reach HBM, one chunk at a time, in exchange for cuBLAS's GEMM speed.
  Which one is faster is for the GPU benchmark to say (not measured yet).
* ``torch``: the same algorithm chunked over tokens and over the vocabulary (at most 2^18 fp32
  elements per logits chunk), fp32 math, using the divergence pieces of :mod:`distill_ops.kl_div`. Its forward
  keeps a token chunk's logits (both sides, every vocabulary chunk) from the first sweep for the second when they
  fit in :data:`TORCH_FORWARD_CACHE_ELEMENTS` (2^24 elements, 64 MiB in fp32: chunks of 64 tokens up to V = 128k,
  of 32 to 64 up to 256k), so each logit is computed once in forward and once in backward, as on the Triton path's
  forward and reverse KL; past that it multiplies again in the second sweep. Backward forms only dL/dz's pieces of
  each block, not the loss terms.

The loss is computed in forward with only [N]-sized statistics saved; backward recomputes the logits
(a per-row upstream gradient, ``reduction="none"`` included, is applied exactly).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional

import torch
from torch import Tensor

from ._utils import (
    Impl,
    LossModule,
    as_row_groups,
    autocast_linear_inputs,
    autocast_off,
    check_choice,
    check_flag,
    check_index,
    check_label_values,
    check_labels,
    check_leading_dims,
    check_number,
    check_reduction,
    check_same_device,
    check_tensor,
    flat_labels,
    group_rows,
    reduce_rows,
    resolve_impl,
    resolve_vocab,
    softcapped,
)
from ._scale import refuse_double_backward
from .kl_div import (
    _canonical_divergence,
    check_divergence_options,
    _divergence_elements,
    _divergence_grad,
    _divergence_row_loss,
    normalized_row_dot,
    temperature_scaled,
)

# PyTorch fallback: fp32 elements of one [token chunk, vocabulary chunk] logits block.
TORCH_CHUNK_ELEMENTS = 1 << 18
TORCH_VOCAB_CHUNK = 4096
# The forward's second sweep reads the first sweep's logits of a token chunk instead of multiplying again when both
# sides' [rows, V] logits fit in this many elements (64 MiB fp32) with rows at least half the usual token chunk. A
# bound whatever N (at N <= 64 tokens they are all of both sides' logits).
TORCH_FORWARD_CACHE_ELEMENTS = 1 << 24


# --------------------------------------------------------------------------------------------------
# PyTorch fallback (chunked over tokens and vocabulary; its memory does not grow with N * V)
# --------------------------------------------------------------------------------------------------


def _torch_chunks(num_rows: int, vocab: int) -> tuple[int, int]:
    vocab_chunk = min(vocab, TORCH_VOCAB_CHUNK)
    return max(1, TORCH_CHUNK_ELEMENTS // vocab_chunk), vocab_chunk


def _forward_rows(row_step: int, vocab: int) -> tuple[int, bool]:
    """``(token chunk, keep)`` of the fallback's forward: with ``keep``, each token chunk's logits (both sides, all
    vocabulary chunks) are computed once and kept for the second sweep, in token chunks of up to ``row_step`` rows
    and at least half that (each chunk reads the weights once per sweep: half the rows, one sweep, moves the same
    weight bytes as two sweeps at full rows, with half the multiplications). Otherwise two sweeps of ``row_step``."""
    rows = min(row_step, TORCH_FORWARD_CACHE_ELEMENTS // (2 * vocab))
    return (rows, True) if 2 * rows >= row_step else (row_step, False)


def _linear_chunk(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], start: int, stop: int) -> Tensor:
    """``hidden @ weight[start:stop].T (+ bias)`` in ``hidden``'s (compute) dtype."""
    logits = hidden @ weight[start:stop].to(hidden.dtype).T
    if bias is not None:
        logits = logits + bias[start:stop].to(hidden.dtype)
    return logits


class _Inputs:
    """The 2-D operands of one call, with chunk accessors for the PyTorch fallback. ``s_softcap`` / ``t_softcap``:
    each side's logit soft-cap (None: none; never set with ``t_logits``)."""

    def __init__(self, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, t_logits, s_softcap=None,
                 t_softcap=None):
        self.s_hidden, self.s_weight, self.s_bias = s_hidden, s_weight, s_bias
        self.t_hidden, self.t_weight, self.t_bias, self.t_logits = t_hidden, t_weight, t_bias, t_logits
        self.s_softcap, self.t_softcap = s_softcap, t_softcap
        self.compute_dtype = torch.float64 if s_hidden.dtype == torch.float64 else torch.float32

    def hidden_chunk(self, start: int, stop: int) -> tuple[Tensor, Optional[Tensor]]:
        student = self.s_hidden[start:stop].to(self.compute_dtype)
        teacher = None if self.t_hidden is None else self.t_hidden[start:stop].to(self.compute_dtype)
        return student, teacher

    def student_chunk(self, student_hidden: Tensor, start: int, stop: int) -> Tensor:
        """The student's (soft-capped) logits of columns [start, stop)."""
        return softcapped(_linear_chunk(student_hidden, self.s_weight, self.s_bias, start, stop), self.s_softcap)

    def teacher_chunk(self, teacher_hidden: Optional[Tensor], rows: slice, start: int, stop: int) -> Tensor:
        if self.t_logits is not None:
            return group_rows(self.t_logits, rows, slice(start, stop)).to(self.compute_dtype)
        return softcapped(_linear_chunk(teacher_hidden, self.t_weight, self.t_bias, start, stop), self.t_softcap)


def fused_linear_stats_torch(
    inputs: _Inputs, labels: Optional[Tensor], *, divergence: str, coef: float, temperature: float, has_ce: bool,
    entropy: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(divergence [N], cross_entropy [N], row_stats [4 (+ 1 with entropy), N])``, as
    ``kernels.fused_linear.fused_linear_stats``."""
    num_rows, vocab = inputs.s_hidden.shape[0], inputs.s_weight.shape[0]
    dtype = inputs.compute_dtype
    device = inputs.s_hidden.device
    row_stats = torch.zeros(4 + entropy, num_rows, dtype=dtype, device=device)
    divergence_rows = torch.zeros(num_rows, dtype=dtype, device=device)
    ce_rows = torch.zeros(num_rows, dtype=dtype, device=device)
    row_step, vocab_step = _torch_chunks(num_rows, vocab)
    row_step, keep = _forward_rows(row_step, vocab)
    for row_start in range(0, num_rows, row_step):
        rows = slice(row_start, min(row_start + row_step, num_rows))
        student_hidden, teacher_hidden = inputs.hidden_chunk(rows.start, rows.stop)
        count = student_hidden.shape[0]
        lse_s = torch.full((count,), float("-inf"), dtype=dtype, device=device)
        lse_t = lse_s.clone()
        lse_z = lse_s.clone()
        label_logit = torch.zeros(count, dtype=dtype, device=device)
        kept = []  # with keep: each vocabulary chunk's (student, teacher) logits, for pass 2
        # Pass 1: both log-sum-exps (and the cross-entropy's), streamed over the vocabulary.
        for start in range(0, vocab, vocab_step):
            stop = min(start + vocab_step, vocab)
            logits = _logits_chunk(inputs, student_hidden, teacher_hidden, rows, start, stop)
            chunk_lse_s, chunk_lse_t, chunk_lse_z, chunk_label = _lse_chunk(
                *logits, temperature, labels[rows] if has_ce else None, start, stop
            )
            if keep:
                kept.append(logits)
            del logits
            lse_s = torch.logaddexp(lse_s, chunk_lse_s)
            lse_t = torch.logaddexp(lse_t, chunk_lse_t)
            if has_ce:
                lse_z = torch.logaddexp(lse_z, chunk_lse_z)
                label_logit += chunk_label
        # Pass 2: the divergence's per-element terms and row statistic, given the log-sum-exps.
        term_sum = torch.zeros(count, 1, dtype=dtype, device=device)
        dot_sum = torch.zeros(count, 1, dtype=dtype, device=device)
        q_sum = torch.zeros(count, 1, dtype=dtype, device=device)
        mean_logit = torch.zeros(count, 1, dtype=dtype, device=device)  # E_q[z / T], for the entropy
        for index, start in enumerate(range(0, vocab, vocab_step)):
            stop = min(start + vocab_step, vocab)
            logits = kept[index] if keep else _logits_chunk(inputs, student_hidden, teacher_hidden, rows, start, stop)
            chunk_terms, chunk_dots, chunk_q, chunk_mean = _terms_chunk(
                *logits, temperature, lse_s, lse_t, divergence, coef, entropy
            )
            del logits
            if keep:
                kept[index] = None  # freed as soon as it is read
            term_sum += chunk_terms
            q_sum += chunk_q
            if chunk_dots is not None:
                dot_sum += chunk_dots
            if entropy:
                mean_logit += chunk_mean
        dot_sum = normalized_row_dot(dot_sum, q_sum)
        divergence_rows[rows] = _divergence_row_loss(
            term_sum, dot_sum, lse_s[:, None], lse_t[:, None], divergence
        ).squeeze(-1)
        row_stats[0, rows] = lse_s
        row_stats[1, rows] = lse_t
        row_stats[2, rows] = dot_sum.squeeze(-1)
        if entropy:
            row_stats[4, rows] = lse_s - mean_logit.squeeze(-1)
        if has_ce:
            row_stats[3, rows] = lse_z
            ce_rows[rows] = lse_z - label_logit
    return divergence_rows, ce_rows, row_stats


# The per-chunk steps live in functions so that a chunk's temporaries are freed before the next chunk's
# are allocated (peak memory = one chunk's working set).


def _logits_chunk(inputs, student_hidden, teacher_hidden, rows, start, stop) -> tuple[Tensor, Tensor]:
    """Both sides' logits of columns [start, stop) for the token chunk ``rows``."""
    return inputs.student_chunk(student_hidden, start, stop), inputs.teacher_chunk(teacher_hidden, rows, start, stop)


def _lse_chunk(z, t, temperature, labels, start, stop):
    lse_s = torch.logsumexp(temperature_scaled(z, temperature), dim=-1)
    lse_t = torch.logsumexp(temperature_scaled(t, temperature), dim=-1)
    if labels is None:
        return lse_s, lse_t, None, None
    return lse_s, lse_t, torch.logsumexp(z, dim=-1), _label_logits(z, labels, start, stop)


def _terms_chunk(z, t, temperature, lse_s, lse_t, divergence, coef, entropy=False):
    a = temperature_scaled(z, temperature)
    terms, dot_terms, q, _ = _divergence_elements(
        a, temperature_scaled(t, temperature), lse_s[:, None], lse_t[:, None], divergence, coef
    )
    dots = None if dot_terms is None else dot_terms.sum(-1, keepdim=True)
    mean = None
    if entropy:  # sum q a over the chunk (q = 0 where a = -inf contributes 0, not NaN)
        mean = torch.where(q == 0, 0.0, q * a).sum(-1, keepdim=True)
    return terms.sum(-1, keepdim=True), dots, q.sum(-1, keepdim=True), mean


def _grad_chunk(inputs, student_hidden, teacher_hidden, rows, start, stop, labels, row_stats, kl_scale, ce_scale,
                divergence, coef, temperature):
    """dL/dz of one [token chunk, vocabulary chunk] block (of the raw logits when soft-capped), scaled per row."""
    z = _linear_chunk(student_hidden, inputs.s_weight, inputs.s_bias, start, stop)
    cap_grad = None
    if inputs.s_softcap is not None:
        tanh = torch.tanh(z / inputs.s_softcap)
        z = inputs.s_softcap * tanh
        cap_grad = 1.0 - tanh * tanh  # d capped / d raw
        del tanh
    t = inputs.teacher_chunk(teacher_hidden, rows, start, stop)
    _, _, q, g = _divergence_elements(
        temperature_scaled(z, temperature), temperature_scaled(t, temperature), row_stats[0, rows, None],
        row_stats[1, rows, None], divergence, coef, with_terms=False,
    )
    grad = _divergence_grad(q, g, row_stats[2, rows, None], divergence)
    del q, g
    zero = grad.new_zeros(())
    scale = kl_scale[rows, None]
    grad = torch.where(scale == 0, zero, grad * scale)
    if ce_scale is not None:
        columns = torch.arange(start, stop, device=z.device)
        ce_grad = torch.exp(z - row_stats[3, rows, None]) - (columns[None, :] == labels[rows, None]).to(z.dtype)
        scale = ce_scale[rows, None]
        grad = grad + torch.where(scale == 0, zero, ce_grad * scale)
    return grad if cap_grad is None else grad * cap_grad


def _label_logits(z: Tensor, labels: Tensor, start: int, stop: int) -> Tensor:
    """z[label] for rows whose label falls in columns [start, stop), 0 otherwise (like the kernel)."""
    in_chunk = (labels >= start) & (labels < stop)
    index = (labels - start).clamp(0, stop - start - 1).unsqueeze(-1)
    return torch.where(in_chunk, z.gather(-1, index).squeeze(-1), 0.0)


def fused_linear_backward_torch(
    inputs: _Inputs,
    labels: Optional[Tensor],
    row_stats: Tensor,
    kl_scale: Tensor,
    ce_scale: Optional[Tensor],
    *,
    divergence: str,
    coef: float,
    temperature: float,
    need_weight_grad: bool,
    need_bias_grad: bool,
    need_hidden_grad: bool = True,
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """``(d_hidden [N, Hs] or None, d_weight [V, Hs] or None, d_bias [V] or None)`` in the compute dtype.

    The vocabulary chunk is the outer loop so each chunk's weight-gradient rows are accumulated over
    all tokens in a small buffer and written once.
    """
    num_rows, vocab = inputs.s_hidden.shape[0], inputs.s_weight.shape[0]
    dtype = inputs.compute_dtype
    device = inputs.s_hidden.device
    row_step, vocab_step = _torch_chunks(num_rows, vocab)
    d_hidden = torch.zeros(num_rows, inputs.s_hidden.shape[1], dtype=dtype, device=device) if need_hidden_grad else None
    d_weight = torch.zeros(vocab, inputs.s_weight.shape[1], dtype=dtype, device=device) if need_weight_grad else None
    d_bias = torch.zeros(vocab, dtype=dtype, device=device) if need_bias_grad else None
    for start in range(0, vocab, vocab_step):
        stop = min(start + vocab_step, vocab)
        weight_chunk = inputs.s_weight[start:stop].to(dtype)
        for row_start in range(0, num_rows, row_step):
            rows = slice(row_start, min(row_start + row_step, num_rows))
            student_hidden, teacher_hidden = inputs.hidden_chunk(rows.start, rows.stop)
            grad = _grad_chunk(
                inputs, student_hidden, teacher_hidden, rows, start, stop, labels, row_stats, kl_scale, ce_scale,
                divergence, coef, temperature,
            )
            if d_hidden is not None:
                d_hidden[rows].addmm_(grad, weight_chunk)
            if d_weight is not None:
                d_weight[start:stop].addmm_(grad.T, student_hidden)
            if d_bias is not None:
                d_bias[start:stop] += grad.sum(0)
    return d_hidden, d_weight, d_bias


# --------------------------------------------------------------------------------------------------
# Triton backward: dL/dz chunk by chunk, the two gradient GEMMs in cuBLAS
# --------------------------------------------------------------------------------------------------


def _accumulate_mm(accumulator: Tensor, left: Tensor, right: Tensor) -> None:
    """``accumulator (fp32) += left @ right`` with fp32 accumulation whatever the operands' dtype."""
    if left.dtype == accumulator.dtype:
        accumulator.addmm_(left, right)
    elif accumulator.is_cuda:
        # cuBLAS with bf16/fp16 operands and an fp32 C matrix (beta = 1): no fp32 copies of the operands.
        torch.ops.aten.addmm.dtype_out(accumulator, left, right, accumulator.dtype, out=accumulator)
    else:  # the interpreter path on CPU
        accumulator.addmm_(left.to(accumulator.dtype), right.to(accumulator.dtype))


def fused_linear_backward_triton(
    inputs: _Inputs,
    labels: Optional[Tensor],
    row_stats: Tensor,
    kl_scale: Tensor,
    ce_scale: Optional[Tensor],
    *,
    divergence: str,
    coef: float,
    temperature: float,
    need_weight_grad: bool,
    need_bias_grad: bool,
    need_hidden_grad: bool = True,
    strategy: str = "tiles",
    accumulation: str = "compensated",
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Triton dL/dz per vocabulary chunk, then ``d_hidden`` (``accumulation``: the compensated 16-bit pair, or
    fp32 via cuBLAS; see :data:`GRAD_HIDDEN_ACCUMULATION`) and ``d_weight`` (cuBLAS, the weight's dtype).

    ``strategy="gemm"``: each chunk's logits come from cuBLAS into fp32 buffers (see
    :data:`distill_ops.kernels.fused_linear.STRATEGIES`) and the dL/dz kernel reads them."""
    from .kernels.fused_linear import (
        GEMM_CHUNK_CONFIG,
        _GemmChunks,
        accumulate_grad_hidden,
        check_strategy,
        default_config,
        fused_linear_grad_logits,
        grad_chunk_columns,
    )

    check_strategy(strategy)
    s_hidden, s_weight = inputs.s_hidden, inputs.s_weight
    num_rows, vocab = s_hidden.shape[0], s_weight.shape[0]
    device = s_hidden.device
    chunks = None
    if strategy == "gemm":
        chunks = _GemmChunks(s_hidden, s_weight, inputs.t_hidden, inputs.t_weight, inputs.t_logits,
                             GEMM_CHUNK_CONFIG[1])
        chunk = min(chunks.columns, vocab)
    else:
        block_v = default_config(s_hidden.dtype, "grad", divergence,
                                 softcap=inputs.s_softcap is not None or inputs.t_softcap is not None)[1]
        chunk = min(grad_chunk_columns(num_rows, vocab, block_v), vocab)
    # dL/dz in the operands' dtype: what the GEMMs take (as every bf16 training step does).
    grad_buffer = torch.empty(num_rows, chunk, dtype=s_hidden.dtype, device=device)
    # bf16 only: an fp16 running sum could overflow where the final gradient fits (fp16 keeps the fp32 accumulator).
    compensated = s_hidden.dtype == torch.bfloat16 and accumulation == "compensated"
    if not need_hidden_grad:  # a frozen body (e.g. only the LM head trained): no d_hidden GEMM at all
        d_hidden = None
    elif compensated:  # d_hidden in the output dtype plus a bf16 rounding-error half (see the module docstring)
        d_hidden = torch.empty(s_hidden.shape, dtype=s_hidden.dtype, device=device)  # row-major
        d_hidden_lo = torch.empty(s_hidden.shape, dtype=torch.bfloat16, device=device) if chunk < vocab else None
    else:
        d_hidden = torch.zeros(num_rows, s_hidden.shape[1], dtype=torch.float32, device=device)
    d_weight = torch.empty_like(s_weight) if need_weight_grad else None
    d_bias = torch.empty(vocab, dtype=torch.float32, device=device) if need_bias_grad else None
    for start in range(0, vocab, chunk):
        stop = min(start + chunk, vocab)
        grad_chunk = grad_buffer[:, : stop - start]
        s_logits, t_logits = chunks.logits(start, stop) if chunks is not None else (None, inputs.t_logits)
        fused_linear_grad_logits(
            s_hidden, s_weight, inputs.s_bias, inputs.t_hidden, inputs.t_weight, inputs.t_bias, t_logits,
            labels, row_stats, kl_scale, ce_scale, grad_chunk, start,
            divergence=divergence, coef=coef, temperature=temperature, s_logits=s_logits,
            s_softcap=inputs.s_softcap, t_softcap=inputs.t_softcap,
        )
        if d_hidden is not None and compensated:
            accumulate_grad_hidden(d_hidden, d_hidden_lo, grad_chunk, s_weight[start:stop], first=start == 0,
                                   last=stop == vocab)
        elif d_hidden is not None:
            _accumulate_mm(d_hidden, grad_chunk, s_weight[start:stop])
        if d_weight is not None:
            torch.mm(grad_chunk.T, s_hidden, out=d_weight[start:stop])
        if d_bias is not None:
            torch.sum(grad_chunk, dim=0, dtype=torch.float32, out=d_bias[start:stop])
    return d_hidden, d_weight, d_bias


# --------------------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------------------


# The Triton path's strategy (``distill_ops.kernels.fused_linear.STRATEGIES``): "tiles" (the default: logit
# tiles with tl.dot inside the kernels, never written) or "gemm" (cuBLAS logits chunks read by the same
# kernels). Read when the op is called (a torch.compile'd graph keeps the value it was traced with). Which is
# faster is for the GPU benchmark to say (`fused_linear_kl_div` cases ours_triton / ours_triton_gemm).
TRITON_STRATEGY = "tiles"
TRITON_STRATEGIES = ("tiles", "gemm")  # = distill_ops.kernels.fused_linear.STRATEGIES (importing it needs triton)
# How the Triton backward accumulates d_hidden across vocabulary chunks for bf16 inputs (fp32 inputs accumulate in
# their fp32 gradient directly, fp16 inputs in an fp32 accumulator): "compensated" (the default: the gradient itself holds the running
# sum rounded to its dtype and a bf16 buffer the rounding error, updated in the epilogue of a Triton GEMM; 2·N·H
# bytes beyond the gradient) or "fp32" (a cuBLAS GEMM into an fp32 [N, H] accumulator, converted at the end; 4·N·H
# bytes). Read when the op is called, like TRITON_STRATEGY: backward uses the setting its forward ran with.
GRAD_HIDDEN_ACCUMULATION = "compensated"
GRAD_HIDDEN_ACCUMULATIONS = ("compensated", "fp32")


@contextlib.contextmanager
def triton_strategy(strategy: Optional[str] = None, *, accumulation: Optional[str] = None) -> Iterator[None]:
    """Inside the block, run the Triton path with ``strategy`` ("tiles" or "gemm") and / or the d_hidden
    ``accumulation`` ("compensated" or "fp32"); ``None`` keeps the current setting. Restored on exit."""
    global TRITON_STRATEGY, GRAD_HIDDEN_ACCUMULATION
    if strategy is not None:
        check_choice("strategy", strategy, TRITON_STRATEGIES)
    if accumulation is not None:
        check_choice("accumulation", accumulation, GRAD_HIDDEN_ACCUMULATIONS)
    saved = TRITON_STRATEGY, GRAD_HIDDEN_ACCUMULATION
    TRITON_STRATEGY = strategy or TRITON_STRATEGY
    GRAD_HIDDEN_ACCUMULATION = accumulation or GRAD_HIDDEN_ACCUMULATION
    try:
        yield
    finally:
        TRITON_STRATEGY, GRAD_HIDDEN_ACCUMULATION = saved


def _strategy(backend: str) -> str:
    """The Triton strategy a backend name carries ("triton[_gemm][_fp32acc]", see the public API)."""
    return "gemm" if backend.startswith("triton_gemm") else "tiles"


def _accumulation(backend: str) -> str:
    return "fp32" if backend.endswith("_fp32acc") else "compensated"


def _active_rows(labels: Optional[Tensor], ignore_index: int) -> Optional[Tensor]:
    return None if labels is None else labels != ignore_index


@torch.library.custom_op("distill_ops::fused_linear_kl_div_rows", mutates_args=())
def _fused_linear_rows_op(
    s_hidden: Tensor,
    s_weight: Tensor,
    s_bias: Optional[Tensor],
    t_hidden: Optional[Tensor],
    t_weight: Optional[Tensor],
    t_bias: Optional[Tensor],
    t_logits: Optional[Tensor],
    labels: Optional[Tensor],
    divergence: str,
    coef: float,
    temperature: float,
    ignore_index: int,
    kl_weight: float,
    ce_weight: float,
    backend: str,
    s_softcap: Optional[float],
    t_softcap: Optional[float],
    entropy: bool = False,
) -> tuple[Tensor, Tensor]:
    """Per-row loss (fp32 [N], 0 at ignored rows) and the [4, N] statistics backward needs (with ``entropy``
    [5, N], the last row the student's entropy at temperature T, 0 at ignored rows)."""
    has_ce = ce_weight != 0.0
    if backend.startswith("triton"):
        from .kernels.fused_linear import fused_linear_stats

        divergence_rows, ce_rows, row_stats = fused_linear_stats(
            s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, t_logits, labels,
            divergence=divergence, coef=coef, temperature=temperature, has_ce=has_ce,
            strategy=_strategy(backend), s_softcap=s_softcap, t_softcap=t_softcap, entropy=entropy,
        )
    else:
        inputs = _Inputs(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, t_logits, s_softcap, t_softcap)
        divergence_rows, ce_rows, row_stats = fused_linear_stats_torch(
            inputs, labels, divergence=divergence, coef=coef, temperature=temperature, has_ce=has_ce, entropy=entropy
        )
    # kl_weight = 0 drops the term, as backward does: 0 * D would be NaN where D is +inf (a -inf teacher logit
    # against student mass in the reverse KL) or NaN (a NaN teacher input).
    row_loss = kl_weight * divergence_rows if kl_weight != 0.0 else torch.zeros_like(divergence_rows)
    if has_ce:
        row_loss = row_loss + ce_weight * ce_rows
    active = _active_rows(labels, ignore_index)
    if active is not None:
        row_loss = torch.where(active, row_loss, 0.0)
        if entropy:
            row_stats[4] = torch.where(active, row_stats[4], 0.0)
    return row_loss.to(torch.float32), row_stats.to(torch.float32)


@_fused_linear_rows_op.register_fake
def _(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, t_logits, labels, divergence, coef, temperature,
      ignore_index, kl_weight, ce_weight, backend, s_softcap, t_softcap, entropy=False):
    num_rows = s_hidden.shape[0]
    return (
        s_hidden.new_empty((num_rows,), dtype=torch.float32),
        s_hidden.new_empty((4 + entropy, num_rows), dtype=torch.float32),
    )


@torch.library.custom_op("distill_ops::fused_linear_kl_div_backward", mutates_args=())
def _fused_linear_backward_op(
    grad_rows: Tensor,
    row_stats: Tensor,
    s_hidden: Tensor,
    s_weight: Tensor,
    s_bias: Optional[Tensor],
    t_hidden: Optional[Tensor],
    t_weight: Optional[Tensor],
    t_bias: Optional[Tensor],
    t_logits: Optional[Tensor],
    labels: Optional[Tensor],
    divergence: str,
    coef: float,
    temperature: float,
    ignore_index: int,
    kl_weight: float,
    ce_weight: float,
    backend: str,
    s_softcap: Optional[float],
    t_softcap: Optional[float],
    need_weight_grad: bool,
    need_bias_grad: bool,
    need_hidden_grad: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(d_hidden or empty, d_weight or empty, d_bias or empty)`` for an upstream gradient per row."""
    grad_rows = grad_rows.to(torch.float32)
    active = _active_rows(labels, ignore_index)
    if active is not None:
        grad_rows = torch.where(active, grad_rows, 0.0)
    kl_scale = grad_rows * (kl_weight / temperature)
    ce_scale = grad_rows * ce_weight if ce_weight != 0.0 else None
    if active is not None and (need_weight_grad or s_softcap is not None):
        # d_weight sums dL/dz^T h over every row: an ignored row's zero gradient times a NaN / inf hidden state
        # (e.g. a padding position whose attention saw no key) made the whole weight gradient NaN. Its hidden
        # state is read as 0 instead (a transient [N, Hs] copy; ignored rows' dL/dz is 0 whatever their logits).
        # So under a student soft-cap, whose factor 1 - tanh^2 of a NaN logit turned that zero dL/dz into NaN
        # (d_hidden's row and d_bias, with a frozen head too, as fspad_draft_loss's).
        s_hidden = torch.where(active.unsqueeze(-1), s_hidden, 0.0)
    inputs = _Inputs(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, t_logits, s_softcap, t_softcap)
    options = dict(divergence=divergence, coef=coef, temperature=temperature, need_weight_grad=need_weight_grad,
                   need_bias_grad=need_bias_grad, need_hidden_grad=need_hidden_grad)
    if backend.startswith("triton"):
        d_hidden, d_weight, d_bias = fused_linear_backward_triton(
            inputs, labels, row_stats, kl_scale, ce_scale, strategy=_strategy(backend),
            accumulation=_accumulation(backend), **options)
    else:
        d_hidden, d_weight, d_bias = fused_linear_backward_torch(inputs, labels, row_stats, kl_scale, ce_scale,
                                                                 **options)
    return (
        s_hidden.new_empty((0,)) if d_hidden is None else d_hidden.to(s_hidden.dtype),
        s_hidden.new_empty((0,)) if d_weight is None else d_weight.to(s_weight.dtype),
        s_hidden.new_empty((0,)) if d_bias is None else d_bias.to(s_bias.dtype),
    )


@_fused_linear_backward_op.register_fake
def _(grad_rows, row_stats, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, t_logits, labels, divergence,
      coef, temperature, ignore_index, kl_weight, ce_weight, backend, s_softcap, t_softcap, need_weight_grad,
      need_bias_grad, need_hidden_grad=True):
    return (
        torch.empty_like(s_hidden) if need_hidden_grad else s_hidden.new_empty((0,)),
        torch.empty_like(s_weight) if need_weight_grad else s_hidden.new_empty((0,)),
        torch.empty_like(s_bias) if need_bias_grad else s_hidden.new_empty((0,)),
    )


_OPTIONS = ("divergence", "coef", "temperature", "ignore_index", "kl_weight", "ce_weight", "backend", "s_softcap",
            "t_softcap")


def _setup_context(ctx, inputs, output):
    tensors = inputs[:8]  # student hidden, weight, bias; teacher hidden, weight, bias, logits; labels
    # A frozen teacher (or LM head) is often run under torch.inference_mode(), and inference tensors cannot be
    # saved for backward: those (never ones that need a gradient) are kept as plain references, without the
    # version check; the others are saved as usual.
    ctx.inference_inputs = [t if t is not None and t.is_inference() else None for t in tensors]
    ctx.save_for_backward(*[None if t is not None and t.is_inference() else t for t in tensors], output[1])
    ctx.options = inputs[8:8 + len(_OPTIONS)]  # not the trailing ``entropy`` flag (backward reads rows 0-3)


def _backward(ctx, grad_rows, grad_stats):
    # The backward op has no autograd formula: create_graph=True failed only at the second backward, generically.
    refuse_double_backward()
    *saved, row_stats = ctx.saved_tensors
    s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, t_logits, labels = [
        kept if kept is not None else tensor for kept, tensor in zip(ctx.inference_inputs, saved)
    ]
    need_hidden_grad = bool(ctx.needs_input_grad[0])
    need_weight_grad = bool(ctx.needs_input_grad[1])
    need_bias_grad = s_bias is not None and bool(ctx.needs_input_grad[2])
    # A backward run inside an autocast region (loss.backward() within it) keeps its fp32 accumulations fp32.
    with autocast_off(s_hidden.device.type):
        d_hidden, d_weight, d_bias = torch.ops.distill_ops.fused_linear_kl_div_backward(
            grad_rows, row_stats, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, t_logits, labels,
            *ctx.options, need_weight_grad, need_bias_grad, need_hidden_grad,
        )
    return (
        d_hidden if need_hidden_grad else None,
        d_weight if need_weight_grad else None,
        d_bias if need_bias_grad else None,
    ) + (None,) * (5 + len(_OPTIONS) + 1)


torch.library.register_autograd("distill_ops::fused_linear_kl_div_rows", _backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def scale_linear_inputs(hidden: Tensor, bias: Optional[Tensor], scale: float) -> tuple[Tensor, Optional[Tensor]]:
    """``(scale * hidden, scale * bias)``: logits ``scale * (h W^T + b)`` (Cohere's ``logit_scale``, Granite's
    ``1 / logits_scaling``) as the linear map of the scaled inputs, for :func:`fused_linear_kl_div`. Unchanged
    for ``scale == 1``."""
    if scale == 1.0:
        return hidden, bias
    return hidden * scale, None if bias is None else bias * scale


def _check_linear_side(side: str, hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    check_tensor(f"{side}_hidden", hidden, min_dim=1)
    check_tensor(f"{side}_weight", weight, ndim=2)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{side}_weight must have shape [vocab, {hidden.shape[-1]}] to match {side}_hidden's width "
            f"{hidden.shape[-1]}, got {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError(
            f"{side}_weight must have at least one row (a vocabulary of V >= 1), got {tuple(weight.shape)}"
        )
    if hidden.shape[-1] == 0:
        raise ValueError(f"{side}_hidden must have a width of at least 1, got shape {tuple(hidden.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"{side}_hidden and {side}_weight must share a dtype, got {hidden.dtype} and {weight.dtype}"
        )
    if bias is not None:
        check_tensor(f"{side}_bias", bias, ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(
                f"{side}_bias must have shape [{weight.shape[0]}] (the rows of {side}_weight), got {tuple(bias.shape)}"
            )


def _check_softcap(name: str, value: object) -> Optional[float]:
    """None, or a finite real number > 0 (a logit soft-cap), as a float."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be None or a finite number > 0 (the logit soft-cap), got {value!r} of type "
                        f"{type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be None or a finite number > 0 (the logit soft-cap), got {value!r}")
    return float(value)


def _weight_rows(weight: Tensor, vocab: int) -> Tensor:
    """The first ``vocab`` rows of an LM head weight ``[V, H]`` or entries of its bias ``[V]``, with unit stride along
    the last dim (the kernels index it so; a strided view, e.g. a bias that is one column of a packed parameter, is
    copied)."""
    # Slice only when needed: autograd records even a full-size slice, and its backward would
    # allocate a zero-filled copy of the whole weight gradient.
    rows = weight if vocab == weight.shape[0] else weight[:vocab]
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _hidden_rows(hidden: Tensor) -> Tensor:
    """``[..., H]`` as ``[N, H]`` with unit stride along H (a view when possible; no recorded slice)."""
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    return hidden.reshape(-1, hidden.shape[-1])


def fused_linear_kl_div(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Optional[Tensor] = None,
    teacher_weight: Optional[Tensor] = None,
    *,
    teacher_logits: Optional[Tensor] = None,
    student_bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    divergence: str = "forward",
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    labels: Optional[Tensor] = None,
    ignore_index: int = -100,
    kl_weight: float = 1.0,
    ce_weight: float = 0.0,
    reduction: str = "mean",
    normalizer: float | Tensor | None = None,
    vocab_size: int | None = None,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    impl: Impl = "auto",
    return_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Distillation loss from hidden states, without materialising logits.

    ``loss_row = kl_weight * D(softmax(t / T) || softmax(z / T)) + ce_weight * CE(z, label)`` with
    ``z = student_hidden @ student_weight.T (+ student_bias)`` and ``t`` the teacher's logits; D is the
    divergence of :func:`distill_ops.kl_div` named by ``divergence`` (same definitions and defaults),
    CE the hard-label cross-entropy of the student at temperature 1.

    Args:
        student_hidden: ``[..., Hs]`` fp32 / fp16 / bf16. Receives a gradient.
        student_weight: ``[V, Hs]``, same dtype as ``student_hidden`` (e.g. ``lm_head.weight``).
            Receives a gradient (fp32-accumulated over all tokens, returned in its dtype).
            Backward computes only the gradients autograd asks for: a frozen LM head costs no weight GEMM,
            a frozen body (hidden without ``requires_grad``, only the head trained) no hidden GEMM.
        teacher_hidden: ``[..., Ht]`` (same leading dims; Ht may differ from Hs), with
        teacher_weight: ``[Vt, Ht]`` of the same dtype. Or, instead of both,
        teacher_logits: dense ``[..., Vt]``. The teacher gets no gradient.
        student_bias: optional ``[V]`` (receives a gradient); teacher_bias: optional ``[Vt]``.
        divergence, beta, alpha, temperature: as in :func:`distill_ops.kl_div` (no T^2 factor).
        labels: integer ``[...]``: rows equal to ``ignore_index`` (default -100) contribute nothing; the targets of
            the cross-entropy term (required when ``ce_weight > 0``; must then lie in [0, V) elsewhere: a
            ``ValueError`` on CPU tensors, a NaN row loss where the values are not read (CUDA, compile)).
            Not shifted (see :mod:`distill_ops.integrations.hf` for causal-LM shifting).
        kl_weight, ce_weight: non-negative weights of the two terms. A weight of 0 drops its term (the loss
            stays finite where that term would be +inf or NaN, e.g. ``kl_weight=0`` with a reverse KL
            against a teacher's ``-inf`` logits: cross-entropy only).
        reduction: ``mean`` (over counted rows, 0.0 if none), ``sum`` or ``none`` (shape ``[...]``).
        normalizer: replaces the row count of ``mean`` (e.g. ``num_items_in_batch``).
        vocab_size: when V != Vt, compare (and take the cross-entropy over) the first ``vocab_size``
            rows of both weights / columns of ``teacher_logits``; other weight rows get zero gradient.
        student_softcap, teacher_softcap: final-logit soft-capping (Gemma-2's
            ``config.final_logit_softcapping``): that side's logits become ``cap * tanh(logits / cap)``, applied
            after the bias and before the temperature; the cross-entropy term uses the capped student logits,
            and the gradients go through the cap. ``None`` (default): no capping. ``teacher_softcap`` must be
            ``None`` with ``teacher_logits`` (those are final logits).
        impl: ``auto`` (Triton on CUDA, PyTorch otherwise), ``triton`` or ``torch``.
        return_entropy: also return the entropy of each row's student distribution at ``temperature``
            (``H(softmax(z / T))`` of the logits the divergence sees: soft-capped, in nats), a training metric
            computed in the same pass (one more running sum next to the student's log-sum-exp), as TRL's
            ``DistillationTrainer`` logs it. fp32 ``[...]`` (the tokens' shape), 0 at ignored rows, no gradient.

    Under ``torch.autocast`` (e.g. ``transformers.Trainer(bf16=True)`` with fp32 weights) the fp32 hidden states,
    weights and biases of both sides are cast to the autocast dtype, as autocast casts ``F.linear``'s inputs, so
    the logit tiles are 16-bit GEMMs; the gradients reach the fp32 tensors through the casts. The op itself then
    runs with autocast off: its fp32 statistics and accumulations stay fp32 on both impls.

    Returns:
        fp32 scalar (``mean`` / ``sum``) or fp32 ``[...]`` (``none``); with ``return_entropy`` the pair
        ``(loss, entropy)``.
    """
    (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
     teacher_bias), autocast_device = autocast_linear_inputs(
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias)
    check_index("ignore_index", ignore_index)
    _check_linear_side("student", student_hidden, student_weight, student_bias)
    leading_shape = student_hidden.shape[:-1]
    if teacher_logits is not None:
        if teacher_hidden is not None or teacher_weight is not None or teacher_bias is not None:
            raise ValueError(
                "the teacher was given twice: pass either teacher_logits or (teacher_hidden, teacher_weight"
                "[, teacher_bias]), not both"
            )
        check_tensor("teacher_logits", teacher_logits, min_dim=1)
        check_leading_dims("teacher_logits", teacher_logits, "student_hidden", leading_shape)
        teacher_vocab, teacher_name = teacher_logits.shape[-1], "teacher_logits"
    else:
        if teacher_hidden is None or teacher_weight is None:
            missing = "teacher_hidden" if teacher_hidden is None else "teacher_weight"
            raise ValueError(
                f"no teacher: {missing} is None; pass (teacher_hidden, teacher_weight) or teacher_logits"
            )
        _check_linear_side("teacher", teacher_hidden, teacher_weight, teacher_bias)
        check_leading_dims("teacher_hidden", teacher_hidden, "student_hidden", leading_shape)
        teacher_vocab, teacher_name = teacher_weight.shape[0], "teacher_weight"
    device = check_same_device(
        student_hidden=student_hidden, student_weight=student_weight, student_bias=student_bias,
        teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, teacher_bias=teacher_bias,
        teacher_logits=teacher_logits,
    )
    vocab = resolve_vocab(
        student_weight.shape[0], teacher_vocab, vocab_size, student_name="student_weight", teacher_name=teacher_name
    )
    check_divergence_options(divergence, beta, alpha)
    check_number("temperature", temperature, low=0.0, low_inclusive=False)
    kl_weight = check_number("kl_weight", kl_weight, low=0.0)
    ce_weight = check_number("ce_weight", ce_weight, low=0.0)
    check_reduction(reduction, normalizer)
    check_flag("return_entropy", return_entropy)
    student_softcap = _check_softcap("student_softcap", student_softcap)
    teacher_softcap = _check_softcap("teacher_softcap", teacher_softcap)
    if teacher_softcap is not None and teacher_logits is not None:
        raise ValueError(
            f"teacher_softcap={teacher_softcap} was given with teacher_logits: dense teacher logits are final "
            "(cap them before passing them); teacher_softcap applies to teacher_hidden @ teacher_weight.T only"
        )
    if labels is not None:
        check_labels(labels, leading_shape, device)
    elif ce_weight > 0.0:
        raise ValueError(f"ce_weight={ce_weight} > 0 needs labels (the cross-entropy targets), got labels=None")
    backend = resolve_impl(impl, device)
    if backend == "triton":
        check_choice("distill_ops.fused_linear.TRITON_STRATEGY", TRITON_STRATEGY, TRITON_STRATEGIES)
        check_choice("distill_ops.fused_linear.GRAD_HIDDEN_ACCUMULATION", GRAD_HIDDEN_ACCUMULATION,
                     GRAD_HIDDEN_ACCUMULATIONS)
        # The module settings travel with the call (as the backend's name), so backward uses its forward's.
        backend += "_gemm" if TRITON_STRATEGY == "gemm" else ""
        backend += "_fp32acc" if GRAD_HIDDEN_ACCUMULATION == "fp32" else ""
    divergence, coef = _canonical_divergence(divergence, beta, alpha)

    s_hidden = _hidden_rows(student_hidden)
    s_weight = _weight_rows(student_weight, vocab)
    s_bias = None if student_bias is None else _weight_rows(student_bias, vocab)
    t_hidden = t_weight = t_bias = t_logits = None
    if teacher_logits is not None:
        # Row groups [G, R, V]: a batch of shifted logits (logits[:, :-1]) is read in place, not copied.
        t_logits = as_row_groups((teacher_logits.detach(),), vocab)[0]
    else:
        t_hidden = _hidden_rows(teacher_hidden.detach())
        t_weight = _weight_rows(teacher_weight.detach(), vocab)
        t_bias = None if teacher_bias is None else _weight_rows(teacher_bias.detach(), vocab)
    label_rows = flat_labels(labels)
    # Checked before any kernel runs; where the values cannot be read (CUDA, compile), a row with an out-of-range
    # label gets a NaN loss on every impl (the kernel found no label logit (+inf), the PyTorch path took 0 for it).
    bad_label = check_label_values(label_rows, ignore_index, vocab, "when ce_weight > 0") if ce_weight > 0.0 else None
    with autocast_off(autocast_device):
        row_loss, row_stats = torch.ops.distill_ops.fused_linear_kl_div_rows(
            s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, t_logits, label_rows,
            divergence, coef, float(temperature), int(ignore_index), kl_weight, ce_weight, backend, student_softcap,
            teacher_softcap, bool(return_entropy),
        )
    active = _active_rows(label_rows, ignore_index)
    if bad_label is not None:
        row_loss = torch.where(bad_label, float("nan"), row_loss)
    loss = reduce_rows(row_loss, active, reduction, normalizer, leading_shape)
    if return_entropy:
        # A copy: row_stats is saved for backward, and a caller's in-place edit of the metric (entropy /= log V)
        # through a view of it failed the loss's backward (a review, 2026-12-07).
        return loss, row_stats[4].detach().clone().reshape(leading_shape)
    return loss


class FusedLinearKLDivLoss(LossModule):
    """Module form of :func:`fused_linear_kl_div` (the constructor takes its options, ``student_softcap`` /
    ``teacher_softcap`` and ``return_entropy`` included: with it ``forward`` returns ``(loss, entropy)``).

    ``forward(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, labels=None,
    teacher_logits=None, student_bias=None, teacher_bias=None, normalizer=None)``.
    """

    def __init__(
        self,
        divergence: str = "forward",
        beta: float = 0.5,
        alpha: float = 0.1,
        temperature: float = 1.0,
        ignore_index: int = -100,
        kl_weight: float = 1.0,
        ce_weight: float = 0.0,
        reduction: str = "mean",
        vocab_size: int | None = None,
        student_softcap: float | None = None,
        teacher_softcap: float | None = None,
        impl: Impl = "auto",
        return_entropy: bool = False,
    ) -> None:
        check_divergence_options(divergence, beta, alpha)
        check_number("kl_weight", kl_weight, low=0.0)
        check_number("ce_weight", ce_weight, low=0.0)
        check_choice("reduction", reduction, ("mean", "sum", "none"))
        check_flag("return_entropy", return_entropy)
        _check_softcap("student_softcap", student_softcap)
        _check_softcap("teacher_softcap", teacher_softcap)
        super().__init__(
            divergence=divergence,
            beta=beta,
            alpha=alpha,
            temperature=temperature,
            ignore_index=ignore_index,
            kl_weight=kl_weight,
            ce_weight=ce_weight,
            reduction=reduction,
            vocab_size=vocab_size,
            student_softcap=student_softcap,
            teacher_softcap=teacher_softcap,
            impl=impl,
            return_entropy=return_entropy,
        )

    def forward(
        self,
        student_hidden: Tensor,
        student_weight: Tensor,
        teacher_hidden: Optional[Tensor] = None,
        teacher_weight: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        teacher_logits: Optional[Tensor] = None,
        student_bias: Optional[Tensor] = None,
        teacher_bias: Optional[Tensor] = None,
        normalizer: float | Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        return fused_linear_kl_div(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            teacher_logits=teacher_logits,
            student_bias=student_bias,
            teacher_bias=teacher_bias,
            labels=labels,
            normalizer=normalizer,
            **self.options(),
        )
