"""Vocabulary-streamed divergences between student and teacher logits (one program per row).

Pass 1 streams the row once and keeps per-lane online statistics for both sides: running max and
sum of exponentials (hence both log-sum-exps) and, for ``forward`` / ``reverse``, the KL itself
(a weighted sum rescaled with the running max). The other divergences are not expressible as
online sums of raw logits, so they take a second streaming pass that accumulates the loss and
S = sum_j q_j g_j. The last pass writes the student gradient dL/dz = q (g - S) / T in the student's
dtype. Ignored rows (label == ignore_index) get loss 0 and a zero gradient row without reading
the logits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._device import on_input_device
from ._launch import LAUNCH_OPTIONS

# Divergence codes (compile-time constants of the kernel).
FORWARD, REVERSE, JSD, SKEW_FORWARD, SKEW_REVERSE, TVD = range(6)
# Where the online statistics' running maxima start: fp32's lowest finite value, so that every finite logit is at or
# above it and a row masked with torch.finfo(torch.float32).min (Hugging Face's masking value; bf16's and fp16's lie
# above it) keeps its own max (its terms exp(0) = 1: a uniform distribution, as the PyTorch path has it). The earlier
# floor of -1e30 stayed the max of such a row, every term underflowed to 0 and the row's loss was NaN.
RUNNING_MAX_FLOOR = tl.constexpr(-3.4028234663852886e38)

DIVERGENCE_CODES = {
    "forward": FORWARD,
    "reverse": REVERSE,
    "jsd": JSD,
    "skew_forward": SKEW_FORWARD,
    "skew_reverse": SKEW_REVERSE,
    "tvd": TVD,
}

# Default launch configuration: BLOCK_V elements of each side per loop iteration, and warps.
# Measured on an H200 (N=16384, V=131072, bf16; benchmarks/results/): (1024, 4) and (2048, 8) tie
# for forward KL at 5.65 ms, (1024, 4) is fastest for JSD, and larger blocks were slower; (1024, 4)
# is spill-free for every divergence on sm_80 / sm_90a (benchmarks/compile_check.py).
BLOCK_V = 1024
NUM_WARPS = 4
# skew_reverse in fp32 spills 8 bytes on sm_80 at 4 warps: it gets 2 elements per thread instead.
NUM_WARPS_BY_DIVERGENCE = {"skew_reverse": 8}


@triton.jit
def zero_fill_row(grad_row, V, BLOCK_V: tl.constexpr):
    """Write zeros over one gradient row of V elements (ignored rows read no logits)."""
    zeros = tl.zeros([BLOCK_V], tl.float32).to(grad_row.dtype.element_ty)
    offsets = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + offsets
        tl.store(grad_row + cols, zeros, mask=cols < V)


@triton.jit
def _log_weights(a, b, lse_a, lse_b, mix_log_coef_p, mix_log_coef_q):
    """log q, log p and log m where m = c_p * p + c_q * q (coefficients given as logs)."""
    log_q = a - lse_a
    log_p = b - lse_b
    x = log_p + mix_log_coef_p
    y = log_q + mix_log_coef_q
    # NaN must reach log m: the GPU's max / min instructions otherwise return the non-NaN operand
    # (the CPU interpreter propagates it either way).
    hi = tl.maximum(x, y, propagate_nan=tl.PropagateNan.ALL)
    lo = tl.minimum(x, y, propagate_nan=tl.PropagateNan.ALL)
    # log(e^x + e^y) without overflow; hi == -inf only when both terms vanish.
    log_m = tl.where(hi == float("-inf"), float("-inf"), hi + tl.log(1.0 + tl.exp(lo - hi)))
    return log_q, log_p, log_m


@triton.jit
def _expm1(x):
    """e^x - 1 with its relative precision where |x| is small (e^x - 1 there loses it: a difference of two numbers
    near 1): a degree-5 Taylor polynomial below |x| = 0.1 (its error, x^6 / 720, is below 2e-9 relative), e^x - 1
    above (relative error at most ~1e-6 there). Plain arithmetic, so it is as precise compiled as interpreted."""
    return _expm1_given_exp(x, tl.exp(x))


@triton.jit
def _expm1_given_exp(x, exp_x):
    """:func:`_expm1` of ``x`` whose e^x is at hand."""
    poly = x * (1.0 + x * (0.5 + x * (1.0 / 6.0 + x * (1.0 / 24.0 + x * (1.0 / 120.0)))))
    return tl.where(tl.abs(x) < 0.1, poly, exp_x - 1.0)


@triton.jit
def _log_ratio(a, b, lse_a, lse_b):
    """log(p / q) from the scaled logits and log-sum-exps: b - a is exact where the two logits are close."""
    return (b - a) + (lse_a - lse_b)


@triton.jit
def _mixture_log_ratio(r, c_s, c_o):
    """``(log(s / m), log(o / m))`` for m = c_s s + c_o o (c_s + c_o = 1, both > 0), read from r = log(s / o) alone,
    with their relative precision where s ~ o (no log-probability or log m is subtracted: log s - log m rounds at
    |log m|). log(s / m) = -log(w), w = c_s + c_o e^-r = 1 + u, u = c_o expm1(-r): a degree-8 Taylor polynomial of
    log1p(u) where |u| < 0.1 (relative error 0.1^8 / 9), log(w) elsewhere (w, a sum of two positive terms, is exact
    to an ulp or two and |log(w)| > 0.095). r is clamped at -88 (e^88 is finite in fp32): below, s <= e^-88 o is 0 or
    subnormal and log(s / m), held at its value there, only ever multiplies s. The second value, log(s / m) - r
    (-log(c_o) below -88, exact for c_o down to ~1e-31 c_s), keeps its relative precision only for a dominant s
    (c_s >= 1/2: near 0 it is at least half of r in magnitude). One exp and one log per element, as the
    log p - log m form took."""
    r_near = tl.maximum(r, -88.0, propagate_nan=tl.PropagateNan.ALL)
    exp_r = tl.exp(-r_near)
    u = c_o * _expm1_given_exp(-r_near, exp_r)
    w = c_s + c_o * exp_r  # = 1 + u, without 1 + u's rounding (which would lose a small c_s's digits)
    # log1p(u) = u - u^2 tail(u)
    tail = 0.5 - u * (1.0 / 3.0 - u * (0.25 - u * (0.2 - u * (1.0 / 6.0 - u * (1.0 / 7.0 - u * 0.125)))))
    near = tl.abs(u) < 0.1
    l_s = -tl.where(near, u * (1.0 - u * tail), tl.log(w))
    # psi = u - log1p(u) = m / s - 1 - log(m / s) >= 0, for the skew KLs' terms (:func:`_skew_term`)
    psi = tl.where(near, u * u * tail, u + l_s)
    return l_s, l_s - r_near, psi


@triton.jit
def _skew_term(s, o, l_s, psi, c_o, ruled_out):
    """The term of KL(s || m), m = (1 - c_o) s + c_o o, as s psi = s log(s / m) + m - s (the m - s sum to 0): second
    order in log(s / o) where s ~ o, so the normalisation's rounding (which shifts every log(s / o) alike by ~1e-7
    in fp32) does not enter the loss to first order, as it did in s log(s / m) (3e-4 of a skew KL of p ~ q at
    alpha <= 1/2, 0.3 at 0.999). Where ``ruled_out`` (o outweighs s so far that the caller's psi is not to be
    trusted) s log(s / m) + c_o (o - s); a zero s gives c_o o (0 where both sides are -inf and l_s is NaN)."""
    return tl.where(s == 0.0, c_o * o, tl.where(ruled_out, s * l_s + c_o * (o - s), s * psi))


@triton.jit
def _skew_term_from_log(s, o, l_s, c_o):
    """:func:`_skew_term` from l_s = log(s / m) of the log p - log m form: psi(d) = d + e^-d - 1 by its Taylor
    polynomial where |d| < 0.1 (to d^6 / 6!: 4e-9 of psi), d + (e^-d - 1) elsewhere; ruled out where l_s < -10 (e^-d
    may overflow; s may have underflowed). The ``kl_div`` kernel at a coefficient below 1e-30 (``SKEW_PSI``): its
    skew KL of p ~ q came out at +-1e-7, negative too, where 2e-30 gave 1e-14 (a review, 2026-12-06). Not in the
    fused-linear stats kernels: there it left 8-16-byte stack frames in 2-3 sm_80 variants (this form, and one
    reusing the g's expm1), at their 128-register budget."""
    series = l_s * l_s * (0.5 - l_s * (1.0 / 6.0 - l_s * (1.0 / 24.0 - l_s * (1.0 / 120.0 - l_s * (1.0 / 720.0)))))
    psi = tl.where(tl.abs(l_s) < 0.1, series, l_s + (tl.exp(-l_s) - 1.0))
    return _skew_term(s, o, l_s, psi, c_o, l_s < -10.0)


@triton.jit
def _divergence_terms(a, b, lse_a, lse_b, coef, DIVERGENCE: tl.constexpr, FROM_LOG_RATIO: tl.constexpr = True,
                      SKEW_PSI: tl.constexpr = False):
    """Per-element loss term and g = dL/dq for the mixture / TVD divergences (fp32). With ``FROM_LOG_RATIO`` (the
    ``kl_div`` kernel) the mixtures' log-ratios to m come from r = log(p / q) (:func:`_mixture_log_ratio`), so a JSD
    of p ~ q keeps its digits; otherwise (the fused-linear tile kernels, where that form's registers left 8-byte
    stack frames in some of their variants under Triton 3.6 and 3.9, and ``kl_div`` at a coefficient below 1e-30)
    from log p - log m (:func:`_log_weights`), with an absolute error of ~1e-7 per row; ``SKEW_PSI`` (the ``kl_div``
    kernel) gives the skew KLs' terms that form too (:func:`_skew_term_from_log`), else (the tile kernels) they are
    x log(x / m) + (1 - c_x)(y - x), whose second part sums to 0 and takes out the first order of the
    normalisation's rounding (~10x closer at c_x <= 1/2; log(x / m)'s rounding at |log m| is left). The skew KLs' g
    is formed less a constant (it cancels in g - S): x / m - 1 = expm1(log(x / m)), near 0 where x ~ m, so that S
    keeps the digits of g's spread (a confident student near its teacher: g ~ -(1 - alpha) everywhere, and the
    gradient was 1e-2 off of the row's largest entry)."""
    if DIVERGENCE == 2:  # jsd: beta KL(p||m) + (1-beta) KL(q||m), m = beta p + (1-beta) q
        if FROM_LOG_RATIO:
            p = tl.exp(b - lse_b)
            q = tl.exp(a - lse_a)
            # Both ratios from the dominant side X's (X = p where beta >= 1/2): selects on a scalar condition.
            p_dominant = coef >= 0.5
            c_y = tl.minimum(coef, 1.0 - coef)
            l_x, l_y, _ = _mixture_log_ratio(_log_ratio(a, b, lse_a, lse_b) * tl.where(p_dominant, 1.0, -1.0),
                                             1.0 - c_y, c_y)
            l_p = tl.where(p_dominant, l_x, l_y)
            l_q = tl.where(p_dominant, l_y, l_x)
        else:
            log_q, log_p, log_m = _log_weights(a, b, lse_a, lse_b, tl.log(coef), tl.log(1.0 - coef))
            p = tl.exp(log_p)
            q = tl.exp(log_q)
            l_p = log_p - log_m
            l_q = log_q - log_m
        term = tl.where(p == 0.0, 0.0, coef * p * l_p)
        term += tl.where(q == 0.0, 0.0, (1.0 - coef) * q * l_q)
        g = (1.0 - coef) * l_q
    elif DIVERGENCE == 3:  # skew_forward: KL(p || alpha p + (1-alpha) q)
        if FROM_LOG_RATIO:
            p = tl.exp(b - lse_b)
            q = tl.exp(a - lse_a)
            r = _log_ratio(a, b, lse_a, lse_b)
            l_p, _, psi = _mixture_log_ratio(r, coef, 1.0 - coef)
            term = _skew_term(p, q, l_p, psi, 1.0 - coef, r < -88.0)  # psi is held at the clamp below -88
        else:
            log_q, log_p, log_m = _log_weights(a, b, lse_a, lse_b, tl.log(coef), tl.log(1.0 - coef))
            p = tl.exp(log_p)
            q = tl.exp(log_q)
            l_p = log_p - log_m
            if SKEW_PSI:
                term = _skew_term_from_log(p, q, l_p, 1.0 - coef)
            else:  # + (m - p), which sums to 0 (docstring); r is NaN where both sides are -inf
                term = tl.where(p == 0.0, 0.0, p * l_p) + (1.0 - coef) * (q - p)
        g = -(1.0 - coef) * tl.where(p == 0.0, -1.0, _expm1(l_p))  # -(1 - alpha) (p / m - 1)
    elif DIVERGENCE == 4:  # skew_reverse: KL(q || alpha q + (1-alpha) p)
        if FROM_LOG_RATIO:
            r = -_log_ratio(a, b, lse_a, lse_b)
            l_q, _, psi = _mixture_log_ratio(r, coef, 1.0 - coef)
            q = tl.exp(a - lse_a)
            term = _skew_term(q, tl.exp(b - lse_b), l_q, psi, 1.0 - coef, r < -88.0)
        else:
            log_q, log_p, log_m = _log_weights(a, b, lse_a, lse_b, tl.log(1.0 - coef), tl.log(coef))
            q = tl.exp(log_q)
            p = tl.exp(log_p)
            l_q = log_q - log_m
            if SKEW_PSI:
                term = _skew_term_from_log(q, p, l_q, 1.0 - coef)
            else:  # + (m - q), which sums to 0 (docstring)
                term = tl.where(q == 0.0, 0.0, q * l_q) + (1.0 - coef) * (p - q)
        g = l_q - coef * tl.where(q == 0.0, -1.0, _expm1(l_q))  # d_q - alpha (q / m - 1)
    else:  # tvd: 0.5 sum |p - q|
        q = tl.exp(a - lse_a)
        p = tl.exp(b - lse_b)
        term = 0.5 * tl.abs(p - q)
        gap = q - p
        g = tl.where(gap > 0.0, 0.5, tl.where(gap < 0.0, -0.5, 0.0))
        g = tl.where(gap != gap, gap, g)  # keep NaN
    return term, g, q


@triton.jit
def _rebased(acc, weight_sum, old_x, new_x, old_y, new_y, inv_temperature):
    """The forward / reverse KL's per-lane sum acc = sum_j w_j d_j, d_j = ((x_j - old_x) - (y_j - old_y)) / T (x the
    weighting side), moved to references new_x, new_y: every d_j changes by ((old_x - new_x) - (old_y - new_y)) / T.
    Logits are taken relative to their running maxima, not as x_j - y_j: that difference rounds at its size, and a
    teacher offset by 1e4 from its student (the same softmax) lost 1e-3 of the loss and 3x the gradient's fp32
    tolerance; relative to the maxima they round at the logits' spread. A lane with no weight yet is left alone
    (its shift may be infinite from the running maxima's floor)."""
    shift = ((old_x - new_x) - (old_y - new_y)) * inv_temperature
    return tl.where(weight_sum == 0.0, acc, acc + weight_sum * shift)


@triton.jit
def _kl_div_fwd_kernel(
    student_ptr,
    teacher_ptr,
    labels_ptr,
    loss_ptr,
    grad_ptr,
    weight_ptr,
    stride_student,
    stride_teacher,
    stride_grad,
    stride_weight,
    rows_per_group,
    stride_student_group,
    stride_teacher_group,
    stride_grad_group,
    V,
    ignore_index,
    inv_temperature,
    coef,
    num_rows,
    DIVERGENCE: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
    PERSISTENT: tl.constexpr = False,
    FROM_LOG_RATIO: tl.constexpr = True,
):
    """One row per program (a grid of ``num_rows``: the loop runs once); PERSISTENT marks a grid of fewer programs,
    each taking rows pid, pid + grid, ... Row ``i`` of the logits and gradient is row ``i % rows_per_group`` of
    group ``i // rows_per_group`` (two strides: e.g. ``logits[:, :-1]`` of a batch, read in place)."""
    row = tl.program_id(0).to(tl.int64)
    step = tl.num_programs(0) if PERSISTENT else num_rows
    while row < num_rows:
        group = row // rows_per_group
        in_group = row - group * rows_per_group
        student_row = student_ptr + group * stride_student_group + in_group * stride_student
        teacher_row = teacher_ptr + group * stride_teacher_group + in_group * stride_teacher
        grad_row = grad_ptr + group * stride_grad_group + in_group * stride_grad
        offsets = tl.arange(0, BLOCK_V)

        active = True
        if HAS_LABELS:
            active = tl.load(labels_ptr + row) != ignore_index

        if active:
            # Pass 1: per-lane online statistics of both sides (and the KL for forward / reverse). The running maxima
            # (of the raw logits z) start at a finite floor so exp(m_old - m_new) is defined while a lane has only seen
            # -inf (masked tokens): fp32's lowest value, at or below every finite logit (a floor of -1e30 stayed the max
            # of a row masked with finfo.min, whose terms then all underflowed). Exponents are raw differences scaled
            # after, ((z - m) / T): z - m is exact near the max, where the mass is, so logits far from 0 keep fp32
            # precision at any T (z / T - m / T rounds each term at |z / T|: 4e-4 relative at 1e4, 10 % at 1e7).
            max_a = tl.full([BLOCK_V], RUNNING_MAX_FLOOR, tl.float32)
            max_b = tl.full([BLOCK_V], RUNNING_MAX_FLOOR, tl.float32)
            sum_a = tl.zeros([BLOCK_V], tl.float32)
            sum_b = tl.zeros([BLOCK_V], tl.float32)
            acc = tl.zeros([BLOCK_V], tl.float32)
            for start in range(0, V, BLOCK_V):
                cols = start + offsets
                mask = cols < V
                za = tl.load(student_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
                zb = tl.load(teacher_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
                new_max_a = tl.maximum(max_a, za)
                new_max_b = tl.maximum(max_b, zb)
                scale_a = tl.exp((max_a - new_max_a) * inv_temperature)
                scale_b = tl.exp((max_b - new_max_b) * inv_temperature)
                u_a = (za - new_max_a) * inv_temperature  # the logits relative to their running maxima
                u_b = (zb - new_max_b) * inv_temperature
                # u_b - u_a scaled after the difference: u_b - u_a contracts to fma(zb - new_max_b, 1/T, -u_a) on a
                # GPU, the rounding error of u_a (identical rows at T != 1 gave a KL of +-1e-8; a numerics audit).
                d_ba = ((zb - new_max_b) - (za - new_max_a)) * inv_temperature
                w_a = tl.exp(u_a)
                w_b = tl.exp(u_b)
                # A rescale that underflows to 0 drops the old terms, +inf ones included (0 * inf would be NaN):
                # their weights are 0 in fp32 against the new max, as p = exp(log p) is in the last pass.
                if DIVERGENCE == 0:  # sum p log(p / q) (less the log totals), weighted by the teacher's exponentials
                    acc = tl.where(scale_b == 0.0, 0.0, _rebased(acc, sum_b, max_b, new_max_b, max_a, new_max_a,
                                                                  inv_temperature) * scale_b) + tl.where(
                        w_b == 0.0, 0.0, w_b * d_ba)
                elif DIVERGENCE == 1:  # sum q log(q / p) (less the log totals), weighted by the student's exponentials
                    acc = tl.where(scale_a == 0.0, 0.0, _rebased(acc, sum_a, max_a, new_max_a, max_b, new_max_b,
                                                                  inv_temperature) * scale_a) + tl.where(
                        w_a == 0.0, 0.0, -(w_a * d_ba))
                sum_a = sum_a * scale_a + w_a
                sum_b = sum_b * scale_b + w_b
                max_a = new_max_a
                max_b = new_max_b
            row_max_a = tl.max(max_a, axis=0)
            row_max_b = tl.max(max_b, axis=0)
            lane_scale_a = tl.exp((max_a - row_max_a) * inv_temperature)
            lane_scale_b = tl.exp((max_b - row_max_b) * inv_temperature)
            total_a = tl.sum(sum_a * lane_scale_a, axis=0)
            total_b = tl.sum(sum_b * lane_scale_b, axis=0)
            # log q_j = (z_j - row_max_a) / T - log_total_a (and log p likewise).
            log_total_a = tl.log(total_a)
            log_total_b = tl.log(total_b)
            s_dot = 0.0  # sum_j q_j g_j for the mixture / TVD divergences; E_q[a - b] (shifted) for reverse
            if DIVERGENCE == 0:
                # A lane holding +inf whose scale underflowed to 0 is dropped (0 * inf is NaN). In a branch taken
                # only then: the select over every lane costs registers (8 bytes of spill on sm_80).
                lanes = _rebased(acc, sum_b, max_b, row_max_b, max_a, row_max_a, inv_temperature) * lane_scale_b
                kl_sum = tl.sum(lanes, axis=0)
                if kl_sum != kl_sum:
                    kl_sum = tl.sum(tl.where(lane_scale_b == 0.0, 0.0, lanes), axis=0)
                loss = kl_sum / total_b + (log_total_a - log_total_b)
            elif DIVERGENCE == 1:
                lanes = _rebased(acc, sum_a, max_a, row_max_a, max_b, row_max_b, inv_temperature) * lane_scale_a
                s_dot = tl.sum(lanes, axis=0)
                if s_dot != s_dot:
                    s_dot = tl.sum(tl.where(lane_scale_a == 0.0, 0.0, lanes), axis=0)
                s_dot = s_dot / total_a
                loss = s_dot - (log_total_a - log_total_b)
            else:
                # Pass 2: the loss and S need both log-sum-exps first.
                loss_acc = tl.zeros([BLOCK_V], tl.float32)
                s_acc = tl.zeros([BLOCK_V], tl.float32)
                for start in range(0, V, BLOCK_V):
                    cols = start + offsets
                    mask = cols < V
                    za = tl.load(student_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
                    zb = tl.load(teacher_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
                    a = (za - row_max_a) * inv_temperature
                    b = (zb - row_max_b) * inv_temperature
                    term, g, q = _divergence_terms(a, b, log_total_a, log_total_b, coef, DIVERGENCE, FROM_LOG_RATIO,
                                                   SKEW_PSI=True)
                    # fp32 accumulators: a coefficient below 2^-126 is typed fp64, and so are term and g (a loop-
                    # carried fp32 turned fp64 failed to compile; the interpreter let it through).
                    loss_acc += tl.where(mask, term, 0.0).to(tl.float32)
                    s_acc += tl.where(mask & (q != 0.0), q * g, 0.0).to(tl.float32)
                loss = tl.sum(loss_acc, axis=0)
                s_dot = tl.sum(s_acc, axis=0)
            # The reduction's weight (1/count for "mean") is folded in here, so that backward usually
            # receives an incoming gradient of exactly 1 and has nothing to scale.
            row_weight = tl.load(weight_ptr + row * stride_weight)
            tl.store(loss_ptr + row, loss * row_weight)

            if COMPUTE_GRAD:
                if DIVERGENCE <= 2:  # forward, reverse, JSD (the skew KLs' and TVD's variants spilled with these)
                    others = tl.zeros([BLOCK_V], tl.float32)
                    tops = tl.zeros([BLOCK_V], tl.int32)
                    top_col = tl.full([BLOCK_V], V, tl.int32)
                # Last pass: dL/dz = q (g - S) / T, written in the student's dtype.
                for start in range(0, V, BLOCK_V):
                    cols = start + offsets
                    mask = cols < V
                    za = tl.load(student_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
                    zb = tl.load(teacher_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
                    a = (za - row_max_a) * inv_temperature
                    b = (zb - row_max_b) * inv_temperature
                    if DIVERGENCE == 0:
                        grad = tl.exp(a - log_total_a) - tl.exp(b - log_total_b)
                    elif DIVERGENCE == 1:
                        # q (log q - log p - KL) with the log-sum-exps cancelled analytically, so that
                        # large logits (|z| ~ 1e4) do not lose the gradient to cancellation.
                        q = tl.exp(a - log_total_a)
                        grad = tl.where(q == 0.0, 0.0, q * ((a - b) - s_dot))  # a, b: shifted by the row maxima
                    else:
                        term, g, q = _divergence_terms(a, b, log_total_a, log_total_b, coef, DIVERGENCE,
                                                       FROM_LOG_RATIO)
                        grad = tl.where(q == 0.0, 0.0, q * (g - s_dot))
                    if DIVERGENCE <= 2:
                        # The top token's entry is rewritten after the loop (below): the others' sum, where it is.
                        at_top = mask & (a == 0.0)
                        others += tl.where(mask & (a != 0.0), grad, 0.0).to(tl.float32)
                        tops += at_top.to(tl.int32)
                        top_col = tl.minimum(top_col, tl.where(at_top, cols, V))
                    grad = grad * (inv_temperature * row_weight)
                    # Through fp32 (a no-op for fp32 math): a mixture coefficient below 2^-126 makes Triton type
                    # it, and so the math, fp64, whose direct cast to bf16 the CPU interpreter gets wrong.
                    tl.store(grad_row + cols, grad.to(tl.float32).to(grad_ptr.dtype.element_ty), mask=mask)
                # Forward, reverse KL, JSD: at the student's top token (a = 0 there) the forward KL's q - p is a
                # difference of two close numbers for a confident student near its teacher (both ~0.9988: 7e-3 of
                # the row's largest gradient entry; a review, 2026-12-07), and both log-sums round at 1; q (g - S)
                # cancels there against a teacher that disagrees (S ~ g at the top: 5e-4 for the reverse KL, up to
                # 0.7 %, 1e-3 for the JSD in an 8-token row). A divergence's gradient in the student's logits sums
                # to 0 (they enter through the softmax), so that entry is rewritten as minus the other entries' sum,
                # whose terms keep their digits. Only for a single top token (ties keep theirs); after a barrier,
                # since another thread of the program wrote that entry in the loop. The skew KLs and TVD keep their
                # own form in the kernel (8 bytes of spill with these accumulators; the fallback rewrites them too).
                if DIVERGENCE <= 2:
                    if tl.sum(tops, axis=0) == 1:
                        corrected = -tl.sum(others, axis=0) * (inv_temperature * row_weight)
                        tl.debug_barrier()
                        tl.store(grad_row + tl.min(top_col, axis=0),
                                 corrected.to(tl.float32).to(grad_ptr.dtype.element_ty))
        else:
            tl.store(loss_ptr + row, 0.0)
            if COMPUTE_GRAD:
                zero_fill_row(grad_row, V, BLOCK_V)
        row += step


@on_input_device
def kl_div_forward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    grad_out: torch.Tensor | None,
    row_weight: torch.Tensor,
    *,
    divergence: str,
    coef: float,
    temperature: float,
    ignore_index: int,
    block_v: int | None = None,
    num_warps: int | None = None,
    programs: int | None = None,
) -> torch.Tensor:
    """Launch the row kernel on ``student [N, V]``, ``teacher [N, V]`` (unit column stride), or on row groups
    ``[G, R, V]`` of both (N = G·R rows; see :func:`distill_ops._utils.as_row_groups`); ``grad_out`` has the
    student's shape.

    ``programs``: a persistent grid of at most that many programs, each taking every ``programs``-th row
    (default: one program per row). An experiment for the GPU block sweep, not a default: the two or three
    passes over a row re-read it right after the first, and with few rows in flight (~64 rows of 512 KiB at
    V = 128k in bf16, both sides, against a 50 MB L2) the re-reads could come from L2, the HBM traffic
    dropping from 10·N·V to 6·N·V bytes for the forward KL, if so few programs can still draw the HBM
    bandwidth (not measured).

    ``row_weight`` (fp32, [N] or one element broadcast) multiplies each row's loss and gradient.
    Writes d(weighted row loss)/dz into ``grad_out`` ([N, V], may alias ``student`` for an in-place
    gradient) when given, and returns the weighted per-row loss (fp32 [N], 0 at ignored rows).
    """
    if teacher.shape != student.shape or (grad_out is not None and grad_out.shape != student.shape):
        raise ValueError(f"teacher (and grad_out) must have student's shape {tuple(student.shape)}, got "
                         f"{tuple(teacher.shape)}{'' if grad_out is None else f' and {tuple(grad_out.shape)}'}")
    if divergence not in DIVERGENCE_CODES:
        raise ValueError(f"divergence must be one of {tuple(DIVERGENCE_CODES)}, got {divergence!r}")
    block_v = block_v or BLOCK_V
    num_warps = num_warps or NUM_WARPS_BY_DIVERGENCE.get(divergence, NUM_WARPS)
    if student.dim() == 2:
        student, teacher = student.unsqueeze(0), teacher.unsqueeze(0)
        grad_out = None if grad_out is None else grad_out.unsqueeze(0)
    groups, rows_per_group, vocab = student.shape
    num_rows = groups * rows_per_group
    loss = torch.empty(num_rows, dtype=torch.float32, device=student.device)
    if num_rows == 0:
        return loss
    grid = (num_rows if programs is None else max(1, min(programs, num_rows)),)
    _kl_div_fwd_kernel[grid](
        student,
        teacher,
        labels if labels is not None else loss,
        loss,
        grad_out if grad_out is not None else student,
        row_weight,
        student.stride(1),
        teacher.stride(1),
        grad_out.stride(1) if grad_out is not None else 0,
        row_weight.stride(0) if row_weight.numel() > 1 else 0,
        rows_per_group,
        student.stride(0),
        teacher.stride(0),
        grad_out.stride(0) if grad_out is not None else 0,
        vocab,
        ignore_index,
        1.0 / temperature,
        coef,
        num_rows,
        DIVERGENCE=DIVERGENCE_CODES[divergence],
        HAS_LABELS=labels is not None,
        COMPUTE_GRAD=grad_out is not None,
        BLOCK_V=block_v,
        PERSISTENT=programs is not None,
        # Below 1e-30 the smaller mixture coefficient (fp64 in the kernel below 2^-126) keeps the log p - log m form,
        # which works in the coefficient's log: e^-r clamped at 88 would lose it, and at alpha < 3e-39 the skew
        # KLs' p / m past fp32's range made the gradient inf / NaN.
        FROM_LOG_RATIO=not 0.0 < min(coef, 1.0 - coef) <= 1e-30,  # coef is 0 for forward / reverse / TVD
        num_warps=num_warps, **LAUNCH_OPTIONS,
    )
    return loss


# The persistent variants the GPU block sweep launches (benchmarks/bench_kl_div.py PERSISTENT_SWEEP): (BLOCK_V,
# num_warps), bf16, forward KL (the roofline target's case). Spill-free under Triton 3.6 and 3.9 on sm_80 / sm_90a;
# 8192 x 16 spills (generic variant), and the JSD at these two spills on sm_80 under 3.9, so the sweep leaves it out.
PERSISTENT_AOT_CONFIGS = ((4096, 16), (2048, 8))


def aot_specs() -> list[dict]:
    configs = [(name, dtype, BLOCK_V, NUM_WARPS_BY_DIVERGENCE.get(name, NUM_WARPS), False, "")
               for name in DIVERGENCE_CODES for dtype in ("bf16", "fp32")]
    configs += [("forward", "bf16", block_v, num_warps, True, "") for block_v, num_warps in PERSISTENT_AOT_CONFIGS]
    # The mixtures at a coefficient below 1e-30 (FROM_LOG_RATIO=False). Below 2^-126 Triton types it fp64 and the
    # mixture math runs in fp64 (p / m up to 1 / alpha leaves fp32's range): that variant compiles (it did not before
    # its sums were cast to fp32) but skew_reverse's takes an 8-byte stack frame on sm_80 (aligned; Triton 3.6), so
    # it is left out of the check (README).
    configs += [(name, "bf16", BLOCK_V, NUM_WARPS_BY_DIVERGENCE.get(name, NUM_WARPS), False, "fp32")
                for name in ("jsd", "skew_forward", "skew_reverse")]
    specs = []
    for name, dtype, block_v, num_warps, persistent, tiny_coef in configs:
        suffix = f",persistent,{block_v}x{num_warps}" if persistent else ""
        suffix += f",coef<1e-30:{tiny_coef}" if tiny_coef else ""
        specs.append({
            "name": f"kl_div_fwd[{name},{dtype}{suffix}]",
            "fn": _kl_div_fwd_kernel,
            "signature": {
                "student_ptr": f"*{dtype}", "teacher_ptr": f"*{dtype}", "labels_ptr": "*i64", "loss_ptr": "*fp32",
                "grad_ptr": f"*{dtype}", "weight_ptr": "*fp32", "stride_student": "i64", "stride_teacher": "i64",
                "stride_grad": "i64", "stride_weight": "i64", "rows_per_group": "i32", "stride_student_group": "i64",
                "stride_teacher_group": "i64", "stride_grad_group": "i64", "V": "i32", "ignore_index": "i64",
                "inv_temperature": "fp32", "coef": tiny_coef or "fp32", "num_rows": "i32",
            },
            "constexprs": {"DIVERGENCE": DIVERGENCE_CODES[name], "HAS_LABELS": True, "COMPUTE_GRAD": True,
                           "BLOCK_V": block_v, "PERSISTENT": persistent, "FROM_LOG_RATIO": not tiny_coef},
            "num_warps": num_warps,
            "num_stages": 3,
        })
    return specs
