"""The vocabulary-chunked divergence family: ``kl_div`` / ``KLDivLoss``.

p = softmax(teacher_logits / T), q = softmax(student_logits / T), per row:

==============  ============================================================
forward         KL(p || q)
reverse         KL(q || p)
jsd (beta)      beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q;
                beta = 0 is ``forward`` and beta = 1 is ``reverse`` (TRL's / Liger's convention);
                the interior formula tends to 0 at both ends (~ beta KL(p || q) as beta -> 0,
                ~ (1 - beta) KL(q || p) as beta -> 1): beta near an end scales the loss. Not clamped.
skew_forward    KL(p || alpha p + (1 - alpha) q)   (DistiLLM)
skew_reverse    KL(q || alpha q + (1 - alpha) p)
tvd             0.5 sum |p - q|
==============  ============================================================

Temperature divides both sides' logits and no T^2 factor is applied (TRL / Liger convention);
multiply the loss by ``temperature ** 2`` for Hinton's scaling. The teacher gets no gradient.

Both backends compute the per-row loss and its gradient in one forward call, with the reduction's
weight (1/count for ``mean``) folded in. The gradient is stored; backward scales it in place by the
incoming gradient, and the Triton path skips rows whose incoming gradient is exactly 1 (decided on
the device), so a plain ``loss.backward()`` moves no [N, V] bytes.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ._scale import consume_stored_gradient, register_stored_gradient_autograd, saved_stored_gradient
from ._utils import (
    Impl,
    LossModule,
    FLOAT_DTYPES,
    as_row_groups,
    as_rows,
    check_choice,
    check_flag,
    check_index,
    check_labels,
    check_leading_dims,
    check_number,
    check_reduction,
    check_same_device,
    check_tensor,
    finish_deferred,
    finish_reduction,
    finite_or_zero,
    flat_labels,
    reduction_weight,
    resolve_impl,
    resolve_vocab,
    row_chunk,
    row_group_chunks,
    split_stored_weight,
)

DIVERGENCES = ("forward", "reverse", "jsd", "skew_forward", "skew_reverse", "tvd")


def _divergence_elements(
    scaled_student: Tensor,
    scaled_teacher: Tensor,
    lse_student: Tensor,
    lse_teacher: Tensor,
    divergence: str,
    coef: float,
    with_terms: bool = True,
) -> tuple[Optional[Tensor], Optional[Tensor], Tensor, Tensor]:
    """Per-element pieces of a divergence over any block of columns, given each row's log-sum-exps.

    ``scaled_*`` are logits already divided by the temperature, ``lse_*`` their full-row log-sum-exps
    (``[rows, 1]``). Returns ``(terms, dot_terms, q, g)``; every piece is additive over columns, so a
    caller may sum them chunk by chunk over the vocabulary (``fused_linear_kl_div`` does):

    * the row loss is :func:`_divergence_row_loss` of ``terms.sum(-1)`` and ``dot_terms.sum(-1)``;
    * the row statistic S = ``dot_terms.sum(-1)`` (E_q[a - b] for ``reverse``, sum_j q_j g_j for the
      mixture divergences; ``None`` for ``forward``, whose gradient needs none);
    * dL/dz (times the temperature) is :func:`_divergence_grad` of ``q``, ``g`` and S.

    ``with_terms=False`` (a backward that recomputes the block for its gradient, S already known): ``terms`` and
    ``dot_terms`` come back None and are not formed, nor p where g does without it (reverse, jsd, skew reverse).
    """
    log_q = scaled_student - lse_student
    log_p = scaled_teacher - lse_teacher
    q = log_q.exp()
    p = log_p.exp() if with_terms or divergence in ("forward", "tvd", "skew_forward") else None
    zero = log_q.new_zeros(())
    terms = None
    if divergence == "forward":
        if with_terms:
            terms = torch.where(p == 0, zero, p * (log_p - log_q))
        return terms, None, q, p  # dL/dz = q - p
    if divergence == "reverse":
        scaled_diff = scaled_student - scaled_teacher
        # KL = E_q[a - b] - lse_a + lse_b: the log-sum-exps are kept out of the per-element terms, so
        # the gradient q (a - b - E_q[a - b]) stays exact for |z| ~ 1e4.
        dot_terms = torch.where(q == 0, zero, q * scaled_diff) if with_terms else None
        return dot_terms, dot_terms, q, scaled_diff
    if divergence == "tvd":
        gap = q - p
        g = torch.where(torch.isnan(gap), gap, 0.5 * torch.sign(gap))  # sign() maps NaN to 0
        if with_terms:
            terms = 0.5 * gap.abs()
    else:
        # d_p = log(p / m), d_q = log(q / m) of the mixture m = c_p p + c_q q, from the log-ratio of the two sides
        # (as :func:`_mixture_rows`); the selects keep 0 * -inf (a side's zero) out of the sums.
        p_dominant = mixture_sides(divergence, coef)[0]
        d_p, d_q = mixture_log_ratios(log_p - log_q if p_dominant else log_q - log_p, divergence, coef)
        if divergence == "jsd":
            if with_terms:
                terms = torch.where(p == 0, zero, coef * p * d_p)
                terms = terms + torch.where(q == 0, zero, (1.0 - coef) * q * d_q)
            g = (1.0 - coef) * d_q
        # The skew KLs' g less a constant (it cancels in g - S): x / m - 1 = expm1(d_x), near 0 where x ~ m, so
        # S keeps the digits of g's spread (a confident student near its teacher: see :func:`_mixture_rows`).
        elif divergence == "skew_forward":  # g = -(1 - alpha) p / m
            if with_terms:
                terms = torch.where(p == 0, (1.0 - coef) * q, skew_terms(p, d_p, q, 1.0 - coef))
            g = -(1.0 - coef) * torch.where(p == 0, -1.0, torch.expm1(d_p))
        else:  # skew_reverse: g = d_q - alpha q / m
            if with_terms:
                terms = torch.where(q == 0, (1.0 - coef) * p, skew_terms(q, d_q, p, 1.0 - coef))
            g = skew_reverse_g(d_q, coef, q == 0)
    if not with_terms:
        return None, None, q, g
    return terms, torch.where(q == 0, zero, q * g), q, g


def temperature_scaled(values: Tensor, temperature: float) -> Tensor:
    """``values / temperature``, without the pass over the values at temperature 1."""
    return values if temperature == 1.0 else values / temperature


def mixture_sides(divergence: str, coef: float) -> tuple[bool, float, float]:
    """``(p_dominant, log c_x, K)`` of a mixture divergence, m = c_p p + c_q q with c_p = coef for ``jsd`` /
    ``skew_forward`` and c_q = coef for ``skew_reverse``: X is the side whose coefficient is at least 1/2 (p where
    ``p_dominant``), K = log(c_x / c_y) >= 0 (see :func:`mixture_log_ratios`). Each coefficient's log is taken from
    the coefficient it is made of (1 - (1 - alpha) is 0 in floating point for alpha < 2^-53), log(1 - coef) from
    log1p."""
    log_coef = math.log(coef) if coef > 0.0 else -math.inf
    log_rest = math.log1p(-coef) if coef < 1.0 else -math.inf
    log_c_p, log_c_q = (log_rest, log_coef) if divergence == "skew_reverse" else (log_coef, log_rest)
    p_dominant = log_c_p >= log_c_q
    log_c_x, log_c_y = (log_c_p, log_c_q) if p_dominant else (log_c_q, log_c_p)
    return p_dominant, log_c_x, log_c_x - log_c_y


def mixture_log_ratios(log_ratio: Tensor, divergence: str, coef: float) -> tuple[Tensor, Tensor]:
    """``(d_p, d_q)`` = (log(p / m), log(q / m)) of a mixture divergence's m = c_p p + c_q q (see
    :func:`mixture_sides`), from r = ``log_ratio`` = log(x / y) (consumed), X the side whose coefficient c_x is at
    least 1/2 and Y the other, with c_y = 1 - c_x.

    * d_x = -log(c_x + c_y e^-r) = -log1p(u), u = c_y expm1(-r) = m / x - 1 (the kernel's form): its own size's
      rounding wherever x ~ m, and log1p of a u >= -c_y >= -1/2 elsewhere. The JSD of p ~ q is second order in r:
      the logsigmoid form below, a difference of two numbers ~ log c_x there, carried ~1e-7 per element (1.6e-4 of
      a JSD at beta = 1e-6 in fp32; 2026-12-06).
    * d_y = d_x - r: no cancellation near 0 (d_x ~ c_y r, c_y <= 1/2) nor where x >> y; where y >> x it rounds at
      |r|, which is clamped at -80 (x below e^-80 y is 0 or subnormal in fp32, and d_x, held there, only multiplies
      x; d_y is -log c_y to ~80 eps).
    * At c_y <= 1e-30 (u would be subnormal in fp32; and e^d_x, which the skew forward KL's gradient reads at such
      a coefficient, must not be held at the clamp) with z = r + K, K = log(c_x / c_y), t = log1p(e^-|z|):
      d_x = min(z, 0) - t - log c_x and d_y = min(K, -r) - t - log c_x, where a tiny coefficient (K = 230 at
      1e-100) only enters z, whose rounding then moves d_x by a relative amount.

    log c_x (|log c_x| <= log 2) is subtracted from each element, never from the sums: that difference of two
    numbers ~ log 2 rounded the loss and, through the mean of d_q, the gradient (a confident student near its
    teacher: JSD gradient errors of 5e-2 of the row's largest entry). Only exp, expm1, log1p and exact operations:
    on the CPU they give each element the same bits wherever it lies in a tensor (sigmoid, softplus and logaddexp
    do not), so a row's result does not depend on the chunking. NaN passes through."""
    p_dominant, log_c_x, shift = mixture_sides(divergence, coef)
    c_y = min(coef, 1.0 - coef)
    if c_y > 1e-30:
        r = log_ratio.clamp_min_(-80.0)
        d_x = torch.neg(r).expm1_().mul_(c_y).log1p_().neg_()
        d_y = d_x - r
    else:
        z = log_ratio + shift
        tail = z.abs().neg_().exp_().log1p_()
        d_x = z.clamp_max_(0.0).sub_(tail).sub_(log_c_x)
        d_y = log_ratio.neg_().clamp_max_(shift).sub_(tail).sub_(log_c_x)
    return (d_x, d_y) if p_dominant else (d_y, d_x)


def skew_reverse_g(d_q: Tensor, alpha: float, q_zero: Optional[Tensor] = None) -> Tensor:
    """The skew reverse KL's g = d_q - alpha q / m up to a constant (it cancels in g - S), d_q = log(q / m):
    d_q - alpha expm1(d_q), near 0 where q ~ m, so that the mean keeps the digits of g's spread (a confident student
    near its teacher); at alpha <= 1e-30, d_q - e^(d_q + log alpha) (q / m reaches 1 / alpha, past fp32's range
    below 3e-39: alpha expm1(d_q) was alpha * inf, a NaN gradient). ``q_zero`` marks tokens with q = 0 (d_q = -inf
    there), whose q / m is 0."""
    if alpha <= 1e-30:
        share = (d_q + math.log(alpha)).exp_()
    else:
        share = torch.expm1(d_q).mul_(alpha)
        if q_zero is not None:
            share = torch.where(q_zero, -alpha, share)
    return d_q - share


def _excess_series(d: Tensor, neg_d: Tensor) -> Tensor:
    """psi(d) for |d| < 0.1, psi(d) = d + e^-d - 1 = sum_{k >= 2} (-d)^k / k!: d^2 times its Taylor polynomial, to
    (-d)^5 / 5! in fp32 (the next term is below 3e-7 of psi there) and to (-d)^16 / 16! in fp64."""
    last = 16 if d.dtype == torch.float64 else 5
    acc = neg_d * (1.0 / math.factorial(last)) + 1.0 / math.factorial(last - 1)
    for k in range(last - 2, 1, -1):
        acc.mul_(neg_d).add_(1.0 / math.factorial(k))
    return acc.mul_(d).mul_(d)


def skew_terms(x: Tensor, d_x: Tensor, other: Tensor, c_o: float) -> Tensor:
    """Per-element terms of a skew KL, KL(x || m) with m = (1 - c_o) x + c_o y (y = ``other``) and d_x =
    log(x / m), as x psi(d_x) = x d_x + m - x, psi(d) = d + e^-d - 1 >= 0: each term of sum x d_x is given its
    m - x, whose sum is 0. The terms are then second order in d_x, not first: the normalisation's rounding (sum q
    and the log-sum-exps miss by ~1e-7 in fp32, which shifts every log(p / q) alike) no longer enters the loss to
    first order. In plain sum x d_x it gave a skew KL of p ~ q a relative error of 3e-4 (alpha <= 1/2) to 0.3
    (alpha = 0.999), and could make it negative. psi(d) is d + expm1(-d), read from d_x alone so that it shifts
    with it: within 1.4e-6 of a 40-digit reference at c_o >= 0.1 for p ~ q in fp32, but its cancellation where d_x
    is near 0 grows as c_o shrinks (d_x ~ c_o log(p / q): 9e-5 at c_o = 1e-3), so below c_o = 0.25 psi is
    :func:`_excess_series` where |d| < 0.1 (>= 0.0048 elsewhere: no large cancellation). That costs ~10 passes
    over the chunk, which the usual coefficients (DistiLLM's alpha = 0.1) do without: the skew KL fallback takes
    1.1-1.5x its time before these terms (fwd + bwd on this CPU), and took 2-3x with the series everywhere. Where
    d_x < -10 (x below e^-10 m: a token the other side outweighs, whose psi is large) the
    term is x d_x + c_o (y - x), with m - x from the two sides: e^-d_x may be out of fp32's range there, x may
    have underflowed to 0 (its term is then c_o y), and :func:`mixture_log_ratios` may have held d_x at its clamp
    (which only moves x d_x, by less than e^-80 m). ``d_x`` must be finite where x is 0 (a caller whose d_x may
    be -inf there selects c_o y itself); it is not modified."""
    neg_d = -d_x
    series = _excess_series(d_x, neg_d) if c_o < 0.25 else None
    excess = neg_d.expm1_().add_(d_x)
    if series is not None:
        excess = torch.where(d_x.abs() < 0.1, series, excess)
    ruled_out = torch.mul(other, c_o).addcmul_(x, d_x - c_o)  # x (d_x - c_o) + c_o y
    return torch.where(d_x < -10.0, ruled_out, excess.mul_(x))


def _divergence_row_loss(
    term_sum: Tensor, row_dot: Optional[Tensor], lse_student: Tensor, lse_teacher: Tensor, divergence: str
) -> Tensor:
    """Row loss from the column sums of :func:`_divergence_elements`' ``terms`` and ``dot_terms``."""
    if divergence == "reverse":
        return row_dot - lse_student + lse_teacher
    return term_sum


def normalized_row_dot(dot_sum: Tensor, q_sum: Tensor) -> Tensor:
    """S = sum_j q_j g_j / sum_j q_j. With q from an fp32 log-sum-exp, sum q misses 1 by ~|lse| eps, and an
    unnormalised S is off by ~|lse| |S| eps: enough to flip the sign of a dominant token's q (g - S) (reverse KL at
    logits ~ 20). Dividing by the same sum makes sum_j q_j (g_j - S) vanish, as the kernels do."""
    return dot_sum / q_sum


def _divergence_grad(q: Tensor, g: Tensor, row_dot: Optional[Tensor], divergence: str) -> Tensor:
    """dL/dz times the temperature: q (g - S) (``forward``: q - p, with ``g`` = p)."""
    if divergence == "forward":
        return q - g
    return torch.where(q == 0, q.new_zeros(()), q * (g - row_dot))


def _shifted_scaled(values: Tensor, temperature: float, in_place: bool = False) -> Tensor:
    """``(values - row max) / T`` (a row whose max is not finite is not shifted), in a new buffer, or in ``values``'
    own when ``in_place`` (a caller's private temporary)."""
    shift = finite_or_zero(values.amax(-1, keepdim=True))
    shifted = values.sub_(shift) if in_place else values - shift
    return shifted if temperature == 1.0 else shifted.div_(temperature)


def _divergence_rows(
    student: Tensor, teacher: Tensor, divergence: str, coef: float, temperature: float, compute_grad: bool,
    own_teacher: bool = False,
) -> tuple[Tensor, Optional[Tensor]]:
    """Per-row divergence and dL/dz for one chunk of rows, in the dtype of the inputs (fp32 or fp64).

    Each side is shifted by its row max before the division by T: the softmax does not change, and the shift is
    exact where the logits are large (|z| ~ 1e4, or fp16 logits near its max at T = 0.05), while ``z / T`` would be
    rounded at that magnitude and the log-probabilities with it (up to 5 % of the loss in a reviewer's case).
    ``own_teacher``: ``teacher`` is the caller's temporary, shifted and scaled in place (and consumed)."""
    scaled_student = _shifted_scaled(student, temperature)
    scaled_teacher = _shifted_scaled(teacher, temperature, in_place=own_teacher)
    if divergence == "forward":
        return _forward_kl_rows(scaled_student, scaled_teacher, temperature, compute_grad)
    if divergence == "reverse":
        return _reverse_kl_rows(scaled_student, scaled_teacher, temperature, compute_grad)
    if divergence != "tvd":
        return _mixture_rows(scaled_student, scaled_teacher, divergence, coef, temperature, compute_grad)
    # Each row's max is now 0 (or the row has no distribution: NaN), so log S is the log-sum-exp.
    _, lse_student, top = _softmax_log_sum_and_top(scaled_student)
    lse_teacher = softmax_and_log_sum(scaled_teacher)[1]
    terms, dot_terms, q, g = _divergence_elements(
        scaled_student, scaled_teacher, lse_student, lse_teacher, divergence, coef
    )
    row_dot = None
    if dot_terms is not None:
        row_dot = normalized_row_dot(dot_terms.sum(-1, keepdim=True), q.sum(-1, keepdim=True))
    loss = _divergence_row_loss(terms.sum(-1, keepdim=True), row_dot, lse_student, lse_teacher, divergence)
    grad = None
    if compute_grad:
        grad = temperature_scaled(_top_as_minus_the_rest(_divergence_grad(q, g, row_dot, divergence), top),
                                  temperature)
    return loss.squeeze(-1), grad


def softmax_and_log_sum(rows: Tensor, dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """``(softmax(x), log S)`` over the last dim (computed in ``dtype`` when given), with S = sum_j exp(x_j - m) per
    row ``[n, 1]``, m the row's max (for rows shifted by it, S = sum_j exp(x_j)), read as 1 / (the largest
    probability): the max's own term is 1.

    ``torch.softmax``, not exp + sum + divide: one fused pass, and on the CPU ``torch.exp`` leaves its vectorized
    path for arguments below about -87, whose results underflow: 12x slower over a [256, 8192] fp32 block of logits
    of std 20 shifted by their max (rows spanning more than 87: a low temperature, AlignDistil's extrapolated
    teacher, masked columns), where softmax's own exponential keeps its speed. A row with no distribution (-inf
    only, or holding +inf or NaN) comes out NaN in both, so its loss and gradient are NaN (the fast paths' zeroing
    of 0 * inf products cannot make them finite or infinite; the general path, the kernels and ``F.kl_div`` give NaN
    there too)."""
    probs = torch.softmax(rows, dim=-1, dtype=dtype)
    return probs, probs.amax(-1, keepdim=True).log_().neg_()


def _softmax_log_sum_and_top(rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`softmax_and_log_sum` and where each row's largest probability is (``[n, 1]`` int64)."""
    probs = torch.softmax(rows, dim=-1)
    top_prob, top = probs.max(-1, keepdim=True)
    return probs, top_prob.log_().neg_(), top


def _top_as_minus_the_rest(grad: Tensor, top: Tensor) -> Tensor:
    """``grad`` (rows of a softmax's gradient, which sum to 0) with the entry at ``top`` (the student's largest
    probability) rewritten, in place, as minus the sum of the others: every divergence's own formula cancels there for
    a confident student (q - p, q (g - S) with S ~ g), where the others are small terms that keep their digits (the
    kernel rewrites the same entry)."""
    grad.scatter_(-1, top, 0.0)
    return grad.scatter_(-1, top, grad.sum(-1, keepdim=True).neg_())


def _forward_kl_rows(
    scaled_student: Tensor, scaled_teacher: Tensor, temperature: float, compute_grad: bool
) -> tuple[Tensor, Optional[Tensor]]:
    """:func:`_divergence_rows` for the forward KL, in fewer passes over the chunk (it is the most used divergence,
    and the general path's ~20 elementwise passes made the fallback several times slower than eager PyTorch).

    With a = z_s / T and b = z_t / T shifted by their row maxima, q = softmax(a) and p = softmax(b) (no second exp
    of log-probabilities; :func:`softmax_and_log_sum`), and
    KL(p || q) = sum p (b - a) + log S_a - log S_b. The product p (b - a) is NaN where p = 0 and b - a is infinite
    (a -inf logit on a side): 0 there, as in the general path. A NaN input also gives NaN there, which the loss keeps
    through log S (so all of the product's NaN can be zeroed in one pass). Buffers are reused in place; the inputs
    (the caller's shifted copies) are consumed."""
    q, log_sum_q, top = _softmax_log_sum_and_top(scaled_student)
    p, log_sum_p = softmax_and_log_sum(scaled_teacher)
    dot = scaled_teacher.sub_(scaled_student).mul_(p)  # p (b - a)
    dot = torch.nan_to_num_(dot, nan=0.0, posinf=math.inf, neginf=-math.inf).sum(-1, keepdim=True)
    loss = (dot + log_sum_q - log_sum_p).squeeze(-1)
    grad = None
    if compute_grad:
        # At the student's top token q - p is a difference of two close numbers for a confident student near its
        # teacher (both ~0.9988: 5e-2 of the row's largest gradient entry; a review, 2026-12-07), and log S from
        # the top probability rounds at 1 too.
        grad = temperature_scaled(_top_as_minus_the_rest(q.sub_(p), top), temperature)
    return loss, grad


def _reverse_kl_rows(
    scaled_student: Tensor, scaled_teacher: Tensor, temperature: float, compute_grad: bool
) -> tuple[Tensor, Optional[Tensor]]:
    """:func:`_divergence_rows` for the reverse KL in fewer passes, as :func:`_forward_kl_rows`: q = softmax(a),
    S = sum q (a - b) / sum q (the normalised statistic of :func:`normalized_row_dot`), KL(q || p) =
    S - log S_a + log S_b, dL/da = q (a - b - S), 0 where q = 0. The teacher's softmax only feeds log S_b (its
    buffer then takes the product). The product q (a - b) is NaN only where q = 0 (0 there) or where an input is NaN
    (the loss then is NaN through its sums)."""
    q, log_sum_q, top = _softmax_log_sum_and_top(scaled_student)
    product, log_sum_p = softmax_and_log_sum(scaled_teacher)
    diff = scaled_student.sub_(scaled_teacher)  # a - b
    dot = torch.nan_to_num_(torch.mul(q, diff, out=product), nan=0.0, posinf=math.inf, neginf=-math.inf)
    row_dot = normalized_row_dot(dot.sum(-1, keepdim=True), q.sum(-1, keepdim=True)) + (log_sum_p - log_sum_p)
    loss = (row_dot - log_sum_q + log_sum_p).squeeze(-1)  # (NaN with log S_b: a teacher row without a distribution)
    grad = None
    if compute_grad:
        grad = diff.sub_(row_dot).mul_(q).masked_fill_(q == 0, 0.0)
        # q (a - b - S) cancels at a confident student's top token against a teacher that disagrees (5e-4 of the
        # row's largest entry, 0.7 % in an 8-token row; a review, 2026-12-07).
        grad = temperature_scaled(_top_as_minus_the_rest(grad, top), temperature)
    return loss, grad


# Below this shifted, scaled logit exp() is 0 in fp32 and in fp64 (it underflows at -104 and -745).
_NEGLIGIBLE_LOGIT = -1e4


def _mixture_rows(
    scaled_student: Tensor, scaled_teacher: Tensor, divergence: str, coef: float, temperature: float,
    compute_grad: bool,
) -> tuple[Tensor, Optional[Tensor]]:
    """:func:`_divergence_rows` for the mixture divergences (``jsd``, ``skew_forward``, ``skew_reverse``) in
    fewer passes than the general path's (its log-probabilities, log-domain mixture and masking made the JSD
    fallback slower than eager PyTorch).

    With a, b the shifted scaled logits, q = softmax(a) and p = softmax(b) (one softmax each), and the mixture
    m = c_p p + c_q q, everything is read from the log-ratio of the two sides. Let X be the side whose coefficient
    is at least 1/2 (p for ``jsd`` with beta >= 1/2 and for ``skew_forward`` with alpha >= 1/2, ...; see
    :func:`mixture_sides`) and Y the other, r = log(x / y) from the logits' difference (b - a + log S_a - log S_b for
    X = p). Then :func:`mixture_log_ratios` gives d_p = log(p / m) and d_q = log(q / m) from r alone.

    No log-probability and no log m is formed (log p - log m, two numbers ~ -log V, lost the digits of a loss of
    1e-15 where p ~ q), and no large log of a coefficient is added and cancelled (at alpha = 1e-100 it is 230: its
    rounding was a relative 1e-2 of a skew loss in fp32). With these:

    * ``jsd``: loss = beta sum p d_p + (1 - beta) sum q d_q, dL/da = (1 - beta) q (d_q - mean_q d_q), with
      mean_q x = sum q x / sum q;
    * ``skew_forward``: loss = sum p d_p, dL/da = -(1 - alpha) q (e - mean_q e), e = expm1(d_p) = p / m - 1; at
      alpha <= 1e-30, where p / m (up to 1 / alpha) leaves fp32's range, -(p w - q sum p w / sum q) with
      w = c_q q / m (q g = -(1 - alpha) q p / m = -p w);
    * ``skew_reverse``: loss = sum q d_q, dL/da = q (h - mean_q h), h = d_q - c_q q / m, formed as
      d_q - c_q expm1(d_q) (less the constant c_q: near 0 where q ~ m, so the mean keeps the digits of h's spread).

    (dL/da = q (g - S) as in :func:`_divergence_elements`.) Only row-wise softmax, exp, expm1, log and log1p are
    used, so a row's result does not depend on the chunking. The logits are clamped at ``_NEGLIGIBLE_LOGIT`` (after
    the softmax): a -inf logit becomes
    one whose exp is still 0, so r is finite and no 0 * inf appears, with no masking pass; a token one side rules
    out gives the same bits whether its logit is -inf or merely far below the row (its d is the same). NaN
    passes through the clamp, and a row without a distribution on either side gets a NaN softmax
    (:func:`softmax_and_log_sum`), so such rows' loss and gradient are NaN as on the general path. The
    inputs (the caller's shifted copies) are consumed."""
    q, log_sum_q, top = _softmax_log_sum_and_top(scaled_student)  # before the clamp: a -inf row has no distribution
    p, log_sum_p = softmax_and_log_sum(scaled_teacher)
    a = scaled_student.clamp_min_(_NEGLIGIBLE_LOGIT)
    b = scaled_teacher.clamp_min_(_NEGLIGIBLE_LOGIT)
    q_sum = q.sum(-1, keepdim=True)
    if mixture_sides(divergence, coef)[0]:
        r = b.sub_(a).add_(log_sum_q - log_sum_p)  # log(p / q)
    else:
        r = a.sub_(b).add_(log_sum_p - log_sum_q)  # log(q / p)
    d_p, d_q = mixture_log_ratios(r, divergence, coef)
    # skew_forward at alpha <= 1e-30 (p / m reaches 1 / alpha, past fp32's range): its gradient is -(p w - q S')
    # with w = c_q q / m = (1 - alpha) e^d_q (q is the side whose coefficient is at least 1/2).
    share = None
    if divergence == "skew_forward" and coef <= 1e-30 and compute_grad:
        share = d_q.exp().mul_(1.0 - coef)

    if divergence == "skew_forward":
        loss = skew_terms(p, d_p, q, 1.0 - coef).sum(-1, keepdim=True)
        if share is not None:
            p_w = share.mul_(p)
            mean = normalized_row_dot(p_w.sum(-1, keepdim=True), q_sum)
            return loss.squeeze(-1), _top_as_minus_the_rest(p_w.sub_(q * mean).mul_(-1.0 / temperature), top)
        # g = -(1 - alpha) p / m = -(1 - alpha) (expm1(d_p) + 1): the constant drops out
        centred, scale = (torch.expm1(d_p) if compute_grad else None), -(1.0 - coef)
    elif divergence == "jsd":
        loss = coef * (p * d_p).sum(-1, keepdim=True) + (1.0 - coef) * (q * d_q).sum(-1, keepdim=True)
        centred, scale = d_q, 1.0 - coef
    else:  # skew_reverse: h = d_q - c_q q / m = d_q - c_q expm1(d_q) - c_q (the constant drops out)
        loss = skew_terms(q, d_q, p, 1.0 - coef).sum(-1, keepdim=True)
        centred, scale = (skew_reverse_g(d_q, coef) if compute_grad else None), 1.0
    grad = None
    if compute_grad:
        mean = normalized_row_dot((q * centred).sum(-1, keepdim=True), q_sum)
        grad = _top_as_minus_the_rest(centred.sub_(mean).mul_(q).mul_(scale / temperature), top)
    return loss.squeeze(-1), grad


def kl_div_rows_torch(
    student: Tensor,
    teacher: Tensor,
    labels: Optional[Tensor],
    row_weight: Optional[Tensor] = None,
    *,
    divergence: str,
    coef: float,
    temperature: float,
    ignore_index: int,
    compute_grad: bool,
    upcast: bool = False,
    out: Optional[Tensor] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    """PyTorch fallback on rows ``[N, V]`` or row groups ``[G, R, V]`` (see
    :func:`~distill_ops._utils.as_row_groups`): per-row loss (fp32, or fp64 with ``upcast``) and dL_row/dz
    (the student's shape), both multiplied by ``row_weight`` (one element or [N]) when given.

    Chunked over rows so temporaries stay bounded; math in fp32 (fp64 with ``upcast=True``, the
    reference the tests use). The gradient is returned in the student's dtype (fp64 with ``upcast``), written
    into ``out`` when given (e.g. the student's own buffer: each chunk is read before its rows are written).
    """
    compute_dtype = torch.float64 if upcast else torch.float32
    vocab = student.shape[-1]
    num_rows = math.prod(student.shape[:-1])
    losses = torch.empty(num_rows, dtype=compute_dtype, device=student.device)
    grad = out
    if compute_grad and grad is None:
        grad = torch.empty(student.shape, dtype=compute_dtype if upcast else student.dtype, device=student.device)
    step = row_chunk(num_rows, vocab)
    for rows, (student_chunk, teacher_chunk, grad_chunk) in row_group_chunks((student, teacher, grad), step):
        chunk_loss, chunk_grad = _divergence_rows(
            student_chunk.to(compute_dtype),
            teacher_chunk.to(compute_dtype),
            divergence,
            coef,
            temperature,
            compute_grad,
        )
        # Weight, then mask (a select): a zero tensor normalizer makes the weight inf, and inf * 0 at an
        # ignored row would be NaN.
        if row_weight is not None:
            weight = row_weight if row_weight.numel() == 1 else row_weight[rows]
            weight = weight.to(compute_dtype)
            chunk_loss = chunk_loss * weight
            if chunk_grad is not None:
                chunk_grad = chunk_grad.mul_(weight.unsqueeze(-1))  # a buffer of this chunk's own
        if labels is not None:
            active = (labels[rows] != ignore_index).unsqueeze(-1)
            chunk_loss = torch.where(active.squeeze(-1), chunk_loss, 0.0)
            if chunk_grad is not None:
                chunk_grad = torch.where(active, chunk_grad, 0.0)
        losses[rows] = chunk_loss
        if grad_chunk is not None:
            grad_chunk.copy_(chunk_grad)
    return losses, grad


# --------------------------------------------------------------------------------------------------
# torch.library registration: one op computing (row losses, stored gradient) with both backends.
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("distill_ops::kl_div_rows", mutates_args=())
def _kl_div_rows_op(
    student: Tensor,
    teacher: Tensor,
    labels: Optional[Tensor],
    row_weight: Tensor,
    divergence: str,
    coef: float,
    temperature: float,
    ignore_index: int,
    backend: str,
    compute_grad: bool,
) -> tuple[Tensor, Tensor]:
    if backend == "triton":
        from .kernels.kl_div import kl_div_forward

        grad = torch.empty(student.shape, dtype=student.dtype, device=student.device) if compute_grad else None
        loss = kl_div_forward(
            student,
            teacher,
            labels,
            grad,
            row_weight,
            divergence=divergence,
            coef=coef,
            temperature=temperature,
            ignore_index=ignore_index,
        )
    else:
        loss, grad = kl_div_rows_torch(
            student,
            teacher,
            labels,
            row_weight,
            divergence=divergence,
            coef=coef,
            temperature=temperature,
            ignore_index=ignore_index,
            compute_grad=compute_grad,
        )
    if grad is None:
        grad = student.new_empty((0,))
    return loss, grad


@_kl_div_rows_op.register_fake
def _(student, teacher, labels, row_weight, divergence, coef, temperature, ignore_index, backend, compute_grad):
    num_rows = math.prod(student.shape[:-1])
    loss = student.new_empty((num_rows,), dtype=torch.float32)
    grad = student.new_empty(student.shape) if compute_grad else student.new_empty((0,))
    return loss, grad


register_stored_gradient_autograd("distill_ops::kl_div_rows", backend_index=8, num_inputs=10)


@torch.library.custom_op("distill_ops::kl_div_rows_inplace", mutates_args=("student",))
def _kl_div_rows_inplace_op(
    student: Tensor,
    teacher: Tensor,
    labels: Optional[Tensor],
    row_weight: Tensor,
    divergence: str,
    coef: float,
    temperature: float,
    ignore_index: int,
    backend: str,
) -> Tensor:
    """Like ``kl_div_rows`` but writes the gradient over ``student`` (the caller gave its buffer away)."""
    if backend == "triton":
        from .kernels.kl_div import kl_div_forward

        return kl_div_forward(
            student, teacher, labels, student, row_weight, divergence=divergence, coef=coef,
            temperature=temperature, ignore_index=ignore_index,
        )
    loss, _ = kl_div_rows_torch(
        student, teacher, labels, row_weight, divergence=divergence, coef=coef, temperature=temperature,
        ignore_index=ignore_index, compute_grad=True, out=student,
    )
    return loss


@_kl_div_rows_inplace_op.register_fake
def _(student, teacher, labels, row_weight, divergence, coef, temperature, ignore_index, backend):
    return student.new_empty((student.shape[0],), dtype=torch.float32)


class _KLDivInplaceGradFunction(torch.autograd.Function):
    """Eager-mode wrapper for ``inplace_grad=True``: the student logits' buffer becomes the gradient."""

    @staticmethod
    def forward(ctx, student, teacher, labels, row_weight, divergence, coef, temperature, ignore_index, backend):
        loss = torch.ops.distill_ops.kl_div_rows_inplace(
            student, teacher, labels, row_weight, divergence, coef, temperature, ignore_index, backend
        )
        ctx.backend = backend
        ctx.save_for_backward(student)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        return consume_stored_gradient(saved_stored_gradient(ctx), grad_loss, ctx.backend), *([None] * 8)


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def _check_kl_div_args(
    student_logits,
    teacher_logits,
    divergence,
    beta,
    alpha,
    temperature,
    labels,
    reduction,
    normalizer,
    vocab_size,
    dtypes=FLOAT_DTYPES,
):
    check_tensor("student_logits", student_logits, dtypes=dtypes, min_dim=1)
    check_tensor("teacher_logits", teacher_logits, dtypes=dtypes, min_dim=1)
    check_leading_dims("teacher_logits", teacher_logits, "student_logits", student_logits.shape[:-1])
    check_same_device(student_logits=student_logits, teacher_logits=teacher_logits)
    vocab = resolve_vocab(
        student_logits.shape[-1],
        teacher_logits.shape[-1],
        vocab_size,
        student_name="student_logits",
        teacher_name="teacher_logits",
    )
    check_divergence_options(divergence, beta, alpha)
    check_number("temperature", temperature, low=0.0, low_inclusive=False)
    check_reduction(reduction, normalizer)
    if labels is not None:
        check_labels(labels, student_logits.shape[:-1], student_logits.device)
    return vocab


def check_divergence_options(divergence: object, beta: object, alpha: object) -> None:
    """The divergence's name and mixture coefficients (checked whichever divergence uses them)."""
    check_choice("divergence", divergence, DIVERGENCES)
    check_number("beta", beta, low=0.0, high=1.0)
    check_number("alpha", alpha, low=0.0, high=1.0, high_inclusive=False)


def _canonical_divergence(divergence: str, beta: float, alpha: float) -> tuple[str, float]:
    """Resolve the JSD / skew endpoints to the KLs they equal, and pick the mixture coefficient."""
    if divergence == "jsd":
        if beta == 0.0:
            return "forward", 0.0
        if beta == 1.0:
            return "reverse", 0.0
        return "jsd", float(beta)
    if divergence in ("skew_forward", "skew_reverse"):
        if alpha == 0.0:  # the mixture is the other side itself: plain KL
            return ("forward" if divergence == "skew_forward" else "reverse"), 0.0
        return divergence, float(alpha)
    return divergence, 0.0


def _overlaps_elsewhere(view: Tensor, dense: Tensor) -> bool:
    """Whether ``view`` shares memory with the contiguous ``dense`` without being the same view of it (metadata only:
    for a contiguous ``dense``, overlapping byte ranges mean shared elements)."""
    if view.numel() == 0 or dense.numel() == 0:
        return False
    if view.untyped_storage().data_ptr() != dense.untyped_storage().data_ptr():
        return False
    if view.data_ptr() == dense.data_ptr() and view.shape == dense.shape and view.stride() == dense.stride():
        return False
    span = 1 + sum((size - 1) * stride for size, stride in zip(view.shape, view.stride()))
    view_end = view.data_ptr() + span * view.element_size()
    return view.data_ptr() < dense.data_ptr() + dense.numel() * dense.element_size() and dense.data_ptr() < view_end


def kl_div(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    divergence: str = "forward",
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    labels: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: float | Tensor | None = None,
    vocab_size: int | None = None,
    inplace_grad: bool = False,
    impl: Impl = "auto",
) -> Tensor:
    """Divergence between student and teacher token distributions, streamed over the vocabulary.

    Args:
        student_logits: ``[..., V]`` fp32 / fp16 / bf16. Receives the gradient.
        teacher_logits: ``[..., Vt]`` fp32 / fp16 / bf16, same leading dims. Treated as a constant.
        divergence: ``forward`` | ``reverse`` | ``jsd`` | ``skew_forward`` | ``skew_reverse`` | ``tvd``.
        beta: JSD mixture weight in [0, 1] (0 = forward KL, 1 = reverse KL, as TRL defines it).
        alpha: skew coefficient in [0, 1) for the skew divergences.
        temperature: divides both sides' logits; no T^2 factor (multiply by ``temperature**2`` yourself).
        labels: optional integer ``[...]``; rows equal to ``ignore_index`` (default -100) contribute nothing.
        reduction: ``mean`` (over counted rows, 0.0 if none), ``sum`` or ``none`` (shape ``[...]``).
        normalizer: replaces the row count of ``mean`` (e.g. ``num_items_in_batch``).
        vocab_size: when V != Vt, read both as their first ``vocab_size`` columns.
        inplace_grad: when a gradient is recorded (``student_logits.requires_grad`` with grad mode on), write
            it over ``student_logits``' buffer (eager only; its values are destroyed, and autograd raises if
            anything else saved them for backward). Compute every other use of the logits first: a
            cross-entropy term or a metric read after this call reads the gradient. Needs contiguous
            ``student_logits`` (``ValueError`` otherwise; with ``vocab_size`` the columns past it keep their
            values and get a zero gradient) and a ``teacher_logits`` that is not another view of their buffer
            (shifted views of one tensor: ``ValueError``; the student's own detached view is fine); without a
            recorded gradient the flag does nothing and the logits are left as they are.
        impl: ``auto`` (Triton on CUDA, PyTorch otherwise), ``triton`` or ``torch``.

    Returns:
        fp32 scalar (``mean`` / ``sum``) or fp32 ``[...]`` (``none``).
    """
    check_index("ignore_index", ignore_index)
    vocab = _check_kl_div_args(
        student_logits, teacher_logits, divergence, beta, alpha, temperature, labels, reduction, normalizer, vocab_size
    )
    backend = resolve_impl(impl, student_logits.device)
    divergence, coef = _canonical_divergence(divergence, beta, alpha)
    leading_shape = student_logits.shape[:-1]
    label_rows = flat_labels(labels)
    temperature = float(temperature)
    active = None if label_rows is None else label_rows != ignore_index
    row_weight, deferred = split_stored_weight(
        reduction_weight(reduction, normalizer, active, math.prod(leading_shape), student_logits.device), reduction,
        student_logits.dtype,
    )
    check_flag("inplace_grad", inplace_grad)
    if inplace_grad and torch.compiler.is_compiling():
        raise ValueError("inplace_grad=True is for eager mode: under torch.compile leave it False (the default)")
    if inplace_grad and student_logits.requires_grad and torch.is_grad_enabled():
        student_rows = as_rows(student_logits, vocab)
        teacher_rows = as_rows(teacher_logits.detach(), vocab)
        if student_rows.data_ptr() != student_logits.data_ptr() or not student_logits.is_contiguous():
            raise ValueError(
                f"inplace_grad=True needs contiguous student_logits (the gradient is written over their buffer), "
                f"got shape {tuple(student_logits.shape)} with strides {student_logits.stride()}"
            )
        if _overlaps_elsewhere(teacher_rows, student_rows):
            raise ValueError(
                "inplace_grad=True writes the gradient over student_logits' buffer, which teacher_logits overlaps "
                "as another view (e.g. both shifted from one logits tensor): gradient rows would overwrite teacher "
                "rows still to be read (in an order a GPU does not fix); pass teacher_logits.clone() or leave "
                "inplace_grad False"
            )
        # Hand autograd a view, not the leaf itself: AccumulateGrad then keeps the returned buffer as
        # .grad instead of cloning a gradient that aliases the variable.
        row_loss = _KLDivInplaceGradFunction.apply(
            student_rows.view(student_rows.shape), teacher_rows, label_rows, row_weight, divergence, coef, temperature,
            int(ignore_index), backend,
        )
    else:
        # Row groups, not rows: shifted logits of a batch (logits[:, :-1]) are read in place, not copied.
        student_rows, teacher_rows = as_row_groups((student_logits, teacher_logits.detach()), vocab)
        compute_grad = student_logits.requires_grad and torch.is_grad_enabled()
        row_loss, _ = torch.ops.distill_ops.kl_div_rows(
            student_rows, teacher_rows, label_rows, row_weight, divergence, coef, temperature, int(ignore_index),
            backend, compute_grad,
        )
    return finish_deferred(row_loss, deferred, active, reduction, leading_shape)


def kl_div_reference(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    divergence: str = "forward",
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    labels: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: float | Tensor | None = None,
    vocab_size: int | None = None,
    upcast: bool = True,
) -> tuple[Tensor, Tensor]:
    """The PyTorch implementation evaluated without autograd: ``(loss, d loss / d student_logits)``.

    The arguments are :func:`kl_div`'s (no ``impl`` / ``inplace_grad``; float64 logits accepted too). With
    ``upcast=True`` (default) everything is float64: the oracle of the tests; ``False`` is the PyTorch path's
    own math (fp32, the gradient in the student's dtype). The gradient has the student's full shape (zero beyond
    ``vocab_size``).
    """
    check_index("ignore_index", ignore_index)
    vocab = _check_kl_div_args(
        student_logits,
        teacher_logits,
        divergence,
        beta,
        alpha,
        temperature,
        labels,
        reduction,
        normalizer,
        vocab_size,
        dtypes=FLOAT_DTYPES + (torch.float64,),
    )
    divergence, coef = _canonical_divergence(divergence, beta, alpha)
    leading_shape = student_logits.shape[:-1]
    label_rows = None if labels is None else labels.reshape(-1)
    active = None if label_rows is None else label_rows != ignore_index
    num_rows = label_rows.numel() if label_rows is not None else math.prod(leading_shape)
    row_weight = reduction_weight(reduction, normalizer, active, num_rows, student_logits.device,
                                  torch.float64 if upcast else torch.float32)
    row_loss, row_grad = kl_div_rows_torch(
        as_rows(student_logits.detach(), vocab),
        as_rows(teacher_logits.detach(), vocab),
        label_rows,
        row_weight,
        divergence=divergence,
        coef=coef,
        temperature=float(temperature),
        ignore_index=ignore_index,
        compute_grad=True,
        upcast=upcast,
    )
    grad = torch.zeros(student_logits.shape, dtype=row_grad.dtype, device=row_grad.device)
    grad[..., :vocab] = row_grad.reshape(*leading_shape, vocab)
    return finish_reduction(row_loss, reduction, leading_shape), grad


class KLDivLoss(LossModule):
    """Module form of :func:`kl_div`; ``forward(student_logits, teacher_logits, labels=None, normalizer=None)``.

    ``inplace_grad=True`` applies to every call, with :func:`kl_div`'s conditions (eager only; the student logits'
    values are destroyed by the call).
    """

    def __init__(
        self,
        divergence: str = "forward",
        beta: float = 0.5,
        alpha: float = 0.1,
        temperature: float = 1.0,
        ignore_index: int = -100,
        reduction: str = "mean",
        vocab_size: int | None = None,
        impl: Impl = "auto",
        inplace_grad: bool = False,
    ) -> None:
        check_divergence_options(divergence, beta, alpha)
        check_choice("reduction", reduction, ("mean", "sum", "none"))
        check_flag("inplace_grad", inplace_grad)
        super().__init__(
            divergence=divergence,
            beta=beta,
            alpha=alpha,
            temperature=temperature,
            ignore_index=ignore_index,
            reduction=reduction,
            vocab_size=vocab_size,
            impl=impl,
            inplace_grad=inplace_grad,
        )

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        labels: Optional[Tensor] = None,
        normalizer: float | Tensor | None = None,
    ) -> Tensor:
        return kl_div(student_logits, teacher_logits, labels=labels, normalizer=normalizer, **self.options())
