"""Top-k and clipped divergences: ``topk_kl_div`` / ``TopKKLDivLoss`` (sparse or dense teacher) and ``DACKLLoss``.

The teacher is given either

* **sparse**, as distillation pipelines store it offline: ``teacher_topk_indices [..., k]`` and
  ``teacher_topk_logprobs [..., k]``, log-probabilities at temperature 1 over the teacher's full
  vocabulary (entries equal to ``-inf`` are padding and are never kept; indices must be distinct); or
* **dense**: ``teacher_logits [..., V]`` with ``k`` and/or ``lower`` / ``upper``.

**Kept set.** The teacher's tokens in descending probability; ties are broken by the lower vocabulary
index first (a stable sort). ``k`` keeps the first k. ``lower`` / ``upper`` (floats, or tensors shaped
like the leading dims, in [0, 1]) keep the tokens whose cumulative-mass interval [c_before, c_after]
overlaps [lower, upper] in the open sense: ``c_before < upper and c_after > lower``, with c_after
clamped to 1 against rounding (top-p is
``lower=0, upper=p``: tokens are added until their cumulative mass reaches p). Both together: the
intersection. Tokens with zero teacher probability are never kept (zero in fp32: -inf, or a logit or log-probability
masked with a large finite negative such as -1e4 or ``finfo.min``). **If nothing is kept** (e.g.
``upper=0``, or ``lower`` at or above the mass), the teacher's top-1 token is kept: a row is never
empty.

**Tails** (P = teacher, Q = student distributions over the outcomes, both at temperature T):

* ``renormalize``: both renormalised over the kept set. Gradient on the kept logits only.
* ``bucket``: the kept tokens plus one rest bucket holding each side's leftover mass (1 - kept mass);
  the student comes from its full-vocabulary softmax, so every logit gets gradient. When both leftover
  masses are below their floors (see ``TEACHER_RESOLUTION`` / ``REST_Q_FLOOR``, e.g. k = V) the bucket is empty.
* ``label`` (needs ``labels``): the label token is always kept and gets the teacher mass the other kept
  tokens leave, 1 - sum of their probabilities (so it keeps its own probability when it is in the top-k
  and receives the whole tail); both sides are renormalised over the kept set plus the label.

``divergence``: ``forward`` KL(P || Q) or ``reverse`` KL(Q || P) over those outcomes.

**Temperature.** The student is always softmax(z / T) over its full vocabulary (restricted and
renormalised as the tail says). Dense teacher: p = softmax(teacher_logits / T) over the full
vocabulary *before* selection (the bounds apply to the tempered masses; top-k does not depend on T).
Sparse teacher: the kept set is selected from the stored temperature-1 probabilities, then
re-tempered over the kept set: p_i = M * softmax_kept(log p_i / T), with M the kept mass at T = 1 (so
``bucket`` / ``label`` keep the temperature-1 leftover 1 - M). At T = 1 a sparse teacher equal to the
dense teacher's own top-k gives the same loss as the dense path for every tail; at T != 1 they still
agree for ``renormalize`` with ``k`` only (renormalised tempered probabilities depend only on logit
differences), while ``bucket`` / ``label`` (the tempered leftover mass is unknown to a sparse teacher)
and bounds (selected on T = 1 masses instead of tempered ones) differ. No T^2 factor is applied.

**Dense selection.** ``impl="triton"``: a radix-select kernel (``kernels/topk_select.py``) picks
each row's ``count`` largest teacher logits with our tie rule (lower index first; NaN above +inf,
-0.0 equal to +0.0), usually reading the row twice: a per-lane maximum bounds the threshold from
below, the few entries above the bound are copied to a small per-row scratch list, and the exact
radix select runs on that list (on the row itself when it overflows, e.g. heavily tied rows). No
sort of the vocabulary and no ``torch.topk``; the [N, count] result comes in index order and is
re-sorted by (logit desc, index asc) only when bounds need the order. ``impl="torch"``:
``torch.topk`` on CUDA (PyTorch's CUDA top-k fills boundary ties in index order, our tie rule),
elsewhere ``torch.topk`` with the ties at its cut taken by index (on CPU tensors only in the rows where a
tie crosses the cut: :func:`_largest_by_index`). With bounds and no ``k`` the kept set is searched
among the teacher's top ``max_candidates`` tokens (default 1024): mass beyond them is never kept (it
goes to the tail). The teacher's normaliser comes from one streaming pass (Triton) or a chunked
``logsumexp``, and is skipped for ``renormalize`` with ``k`` only (logit differences suffice). No full
sorted copy of the vocabulary is ever written on CUDA. ``impl="triton"`` keeps at most 4096 candidates
per row (``k`` or ``max_candidates``; ``ValueError`` before any kernel runs otherwise; ``impl="auto"`` takes
the PyTorch path past it, on CUDA as on the CPU). Measured on an
H200 before the kernel (N=16384, V=131072, k=64, bf16), the dense path's forward took 18.9 ms and the
sparse path's 1.3 ms: the difference is the teacher's ``torch.topk``. The kernel's time is not measured yet.

**Bad values** (indices outside [0, V) or repeated among the entries with probability, log-probabilities > 0,
bounds outside [0, 1] or lower > upper, out-of-range labels with ``tail="label"``) raise ``ValueError`` for CPU
tensors; for CUDA tensors they are not checked on the host (that would synchronise): the affected rows give NaN
loss and gradient. A dense teacher row with no distribution (-inf only, or holding +inf) gives NaN on every
tail, as in ``kl_div``; so does a NaN teacher logit (NaN ranks first, so it is always kept).

Both backends compute the per-row loss and dL_row/dz in one forward call; backward scales the stored
gradient in place. The teacher gets no gradient.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from ._scale import register_stored_gradient_autograd
from ._utils import (
    Impl,
    LossModule,
    FLOAT_DTYPES,
    IMPLS,
    INT_DTYPES,
    as_row_groups,
    as_rows,
    check_choice,
    check_index,
    check_int,
    check_label_values,
    check_labels,
    check_leading_dims,
    check_number,
    check_reduction,
    check_same_device,
    check_tensor,
    check_vocab_size,
    finish_deferred,
    finite_or_zero,
    flat_labels,
    host_readable,
    reduce_rows,
    reduction_weight,
    resolve_impl,
    resolve_vocab,
    row_chunk,
    row_group_chunks,
    split_stored_weight,
)
from .kl_div import softmax_and_log_sum

TAILS = ("renormalize", "bucket", "label")
TOPK_DIVERGENCES = ("forward", "reverse")
DEFAULT_MAX_CANDIDATES = 1024
# The Triton loss kernel holds the kept entries of a row in registers (see kernels/topk_kl.py); the
# selection kernel's candidate filter covers up to its BLOCK_V = 4096 (kernels/topk_select.py).
TRITON_MAX_K = 4096
# Leftover masses. The teacher's, 1 - (its kept mass), is formed in fp64 from the fp32 log-probabilities (a confident
# teacher's top log-probability -1e-10 is exact in fp32, its mass 1 - 1e-10 was not): resolved down to their own
# rounding, 2^-24 |log p| each; below TEACHER_RESOLUTION * sum p |log p| over the kept entries it reads as that floor,
# a constant (zero gradient through it); so does the label tail's teacher mass. The student's rest mass is its total
# minus its kept mass, both summed in fp64 over the same fp32 terms (not 1 - (kept mass) in fp32): ~1e-15 of the
# row's mass of absolute error, so every floor is at least REST_Q_FLOOR (relative error below ~1e-5 above it; at
# 1e-13 it reached 5e-3 in the gradient); the bucket is empty when
# both sides are below their floors (e.g. k = V). A 0 against the other side's mass made the forward KL of a
# confident student, or the reverse KL against a confident teacher, infinite; the fp32 forms floored at 1e-6.
TEACHER_RESOLUTION = 2.0**-20
REST_Q_FLOOR = 1e-10


def _floored(mass: Tensor, floor: float | Tensor) -> Tensor:
    """``mass`` with values below ``floor`` read as ``floor`` (NaN kept)."""
    return torch.where(mass < floor, floor, mass)


def _fine_logsumexp(values: Tensor) -> Tensor:
    """log-sum-exp over the last dim (kept), as max + log1p(the other terms' sum): the max's own term (1) is kept
    apart, so a sum 1 + s with s below fp32's step at 1 is resolved (``torch.logsumexp`` returns max + 0 there, and
    a confident teacher's leftover mass 1e-10 was lost). Rows whose max is not finite give the max (NaN kept)."""
    top = values.amax(-1, keepdim=True)
    terms = (values - finite_or_zero(top)).exp().scatter(-1, values.argmax(-1, keepdim=True), 0.0)
    return torch.where(top.isfinite(), top + torch.log1p(terms.sum(-1, keepdim=True)), top)


def _teacher_leftover(log_mass: Tensor, logprobs: Tensor) -> tuple[Tensor, Tensor]:
    """``(1 - sum exp(log_mass), floor)`` per row, ``[n, 1]`` fp32: the teacher's leftover mass summed in fp64
    (differentiable), and the floor below which it is not resolved (a constant, see ``TEACHER_RESOLUTION``): the
    masses' sum of ``p |logprobs|`` times TEACHER_RESOLUTION, at least REST_Q_FLOOR."""
    probs = log_mass.to(torch.float64).exp()
    leftover = (1.0 - probs.sum(-1, keepdim=True)).to(torch.float32)
    with torch.no_grad():
        spread = torch.where(probs > 0, probs * logprobs.to(torch.float64).abs(), 0.0).sum(-1, keepdim=True)
        floor = (TEACHER_RESOLUTION * spread).clamp_min(REST_Q_FLOOR).to(torch.float32)
    return torch.where(leftover < 0, 0.0, leftover), floor  # keeps NaN


def _outside_mass(probs: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
    """The mass of ``probs [n, V]`` outside the (soft) kept set whose columns ``indices [n, m]`` hold
    ``weights [n, m]`` of their mass: ``(sum_j p_j - sum_i w_i p_{indices_i}) / sum_j p_j``, both sums in fp64 over the
    same fp32 terms, so resolved to fp64 rounding where 1 - (kept mass) in fp32 rounds to 0 (a column kept twice
    counts twice; nothing kept gives exactly 1). ``[n, 1]`` in ``probs``' dtype, clamped at 0 (NaN kept)."""
    total = probs.sum(-1, keepdim=True, dtype=torch.float64)
    inside = (probs.gather(-1, indices).to(torch.float64) * weights.to(torch.float64)).sum(-1, keepdim=True)
    rest = ((total - inside) / total).to(probs.dtype)
    return torch.where(rest < 0, 0.0, rest)


# --------------------------------------------------------------------------------------------------
# Differentiable per-row math (the fallback, and DACKL's soft-mask training path)
# --------------------------------------------------------------------------------------------------


def _clipped_divergence_rows(
    student: Tensor,
    indices: Tensor,
    teacher_logprobs: Tensor,
    log_weights: Tensor,
    labels: Optional[Tensor],
    tail: str,
    divergence: str,
    temperature: float,
    active: Optional[Tensor] = None,
) -> Tensor:
    """Per-row divergence between the (soft-)clipped teacher and student distributions, differentiable.

    ``student [n, V]`` raw student logits (any float dtype), or row groups ``[G, R, V]`` with n = G·R (see
    :func:`~distill_ops._utils.as_row_groups`); ``indices [n, m]`` (valid columns);
    ``teacher_logprobs [n, m]`` full-vocabulary teacher log-probabilities at T (-inf = absent);
    ``log_weights [n, m]`` log of the membership in [0, 1], -inf at padding (:func:`log_soft_membership`);
    ``labels [n]`` valid columns (``label`` tail); ``active [n]``: rows that count (the others may hold anything,
    NaN included, and give a finite value and a zero gradient). Outcome c has teacher mass w_c p_c and student mass
    w_c q_c; ``renormalize`` / ``label`` normalise them, ``bucket`` adds the rest masses 1 - sum.

    The student's logits enter as ``(z - c) / T`` in fp32 (c as in :func:`_student_shift`), taken after the
    gather: ``renormalize`` and ``label`` touch only the m kept columns (and the label's), so autograd keeps no
    [n, V] tensor beyond the gradient itself; ``bucket`` needs the full row's log-sum-exp (fp32 [n, V] temporaries).
    """
    # One gather (one scatter in backward) for the kept columns and, with the label tail, the label's.
    columns = torch.cat([indices, labels.unsqueeze(-1)], dim=-1) if tail == "label" else indices
    raw = student.gather(-1, columns.view(*student.shape[:-1], columns.shape[-1])).reshape(columns.shape)
    raw = raw.to(torch.float32)
    if active is not None:
        raw = torch.where(active.unsqueeze(-1), raw, 0.0)
    raw_kept = raw[:, : indices.shape[-1]]
    shift = _student_shift(raw_kept, teacher_logprobs)

    def scaled(values: Tensor) -> Tensor:
        return (values.to(torch.float32) - shift) / temperature

    gathered = scaled(raw_kept)
    if tail == "label":
        # The label's own entry moves to the label outcome, which holds 1 - (the others' kept mass).
        is_label = indices == labels.unsqueeze(-1)
        log_weights = torch.where(is_label, float("-inf"), log_weights)
        label_mass = _floored(*_teacher_leftover(log_weights + teacher_logprobs, teacher_logprobs))
        teacher_log_mass = torch.cat([log_weights + teacher_logprobs, torch.log(label_mass)], dim=-1)
        student_log_mass = torch.cat([log_weights + gathered, scaled(raw[:, indices.shape[-1]:])], dim=-1)
    else:
        teacher_log_mass = log_weights + teacher_logprobs
        student_log_mass = log_weights + gathered
    if tail == "bucket":
        row_shape = (*student.shape[:-1], 1)
        full_row = student if active is None else torch.where(active.view(row_shape), student, 0.0)
        full_row = (full_row.to(torch.float32) - shift.view(row_shape)) / temperature
        lse_all = torch.logsumexp(full_row, dim=-1, keepdim=True).view(-1, 1)
        kept_log_q = student_log_mass - lse_all
        # The hard path's rules (see _hard_rows_and_grad): floors, and an empty bucket when both are below theirs.
        rest_p, floor_p = _teacher_leftover(teacher_log_mass, teacher_logprobs)
        in_set = log_weights.exp()  # 0 at padding: its log-weight is -inf (log_soft_membership)
        if active is not None:
            in_set = torch.where(active.unsqueeze(-1), in_set, 0.0)
        rest_q = _outside_mass(torch.softmax(full_row, -1).view(lse_all.shape[0], student.shape[-1]), indices, in_set)
        negligible = (rest_p < floor_p) & (rest_q < REST_Q_FLOOR)
        log_rest_p = torch.where(negligible, float("-inf"), torch.log(_floored(rest_p, floor_p)))
        log_rest_q = torch.where(negligible, float("-inf"), torch.log(_floored(rest_q, REST_Q_FLOOR)))
        log_p = torch.cat([teacher_log_mass, log_rest_p], dim=-1)
        log_q = torch.cat([kept_log_q, log_rest_q], dim=-1)
    else:
        log_p = teacher_log_mass - torch.logsumexp(teacher_log_mass, -1, keepdim=True)
        log_q = student_log_mass - torch.logsumexp(student_log_mass, -1, keepdim=True)
    p = log_p.exp()
    q = log_q.exp()
    # The where() on the log-ratio (not on the product) keeps 0 * inf out of both value and gradient.
    if divergence == "forward":
        ratio = torch.where(p > 0, log_p - log_q, 0.0)
        return (p * ratio).sum(-1)
    ratio = torch.where(q > 0, log_q - log_p, 0.0)
    return (q * ratio).sum(-1)


def _top_outcome_as_minus_the_rest(
    q: Tensor, grad_kept: Tensor, extra_mass: Tensor, extra_grad: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_kept, extra_grad, kept_top)`` with the top outcome's gradient rewritten as minus the others' sum: the
    kept entry of the largest student mass ``q [n, m]`` (the first one, at a tie), or, where its mass is larger
    (``kept_top`` false), the extra outcome (mass and gradient ``[n]``: the bucket's rest or the label; 0 for
    ``renormalize``). A NaN mass or gradient stays NaN."""
    top_q, top = q.max(-1, keepdim=True)
    kept_top = top_q.squeeze(-1) >= extra_mass
    top_grad = grad_kept.gather(-1, top).squeeze(-1)
    rewritten = grad_kept.scatter(-1, top, 0.0)
    others = rewritten.sum(-1)  # the kept entries but the top one
    rewritten.scatter_(-1, top, torch.where(kept_top, -(others + extra_grad), top_grad).unsqueeze(-1))
    return rewritten, torch.where(kept_top, extra_grad, -(others + top_grad)), kept_top


def _hard_rows_and_grad(
    student: Tensor, indices: Tensor, teacher_logprobs: Tensor, labels: Optional[Tensor], tail: str,
    divergence: str, temperature: float, compute_grad: bool,
) -> tuple[Tensor, Optional[tuple[Optional[Tensor], Tensor, Optional[Tensor]]]]:
    """Per-row loss and dL/d(scaled logits) with the hard kept set (-inf teacher entries are not kept), from the
    raw student rows ``[n, V]``.

    The same closed forms as the Triton kernel: with outcome masses P_o, Q_o (student full softmax q_j),
    dL/dz_j = q_j (g_o - S); forward g_o = -P_o / Q_o, reverse g_o = log Q_o - log P_o + 1.

    The gradient comes in parts, ``(full, kept, label)``: ``full`` the bucket tail's rest-outcome term on every
    column as ``(q [n, V], c [n, 1])``, q_j c (None for the other tails, whose gradient is zero outside the kept
    columns; q is zeroed at the kept columns, whose values are to be added; the caller forms the product where the
    gradient goes), ``kept [n, m]`` the kept entries' gradient (0 at entries that are not kept), ``label [n]`` the
    label outcome's (``label`` tail). ``renormalize`` and ``label`` thus never form an [n, V] temporary: they read
    the m kept logits (and the label's).
    """
    neg_inf = float("-inf")
    kept = teacher_logprobs != neg_inf  # NaN entries stay kept: NaN reaches the loss
    if tail == "label":
        kept = kept & (indices != labels.unsqueeze(-1))
    raw_kept = student.gather(-1, indices)  # one gather for the shift and the kept logits
    shift = _student_shift(raw_kept, teacher_logprobs)

    def scaled(values: Tensor) -> Tensor:
        return (values.to(torch.float32) - shift) / temperature

    gathered = scaled(raw_kept)
    a = torch.where(kept, teacher_logprobs, neg_inf)
    b = torch.where(kept, gathered, neg_inf)
    lse_b = torch.logsumexp(b, -1)
    leftover_p, floor_p = (x.squeeze(-1) for x in _teacher_leftover(a, a))
    zero = a.new_zeros(())
    extra_p = extra_q = extra_log_p = extra_log_q = zero
    if tail == "bucket":
        # The student's full softmax q_j in one fp32 [n, V] buffer (at T != 1 from the row shifted by its max m
        # first, a second one); its kept columns are then zeroed in place, and the student's rest mass is the sum of
        # what is left over the sum of all (exactly 1 where nothing is kept, e.g. a row of padding: its loss is then
        # exactly 0): summed directly, with no cancellation, so resolved to fp32's relative rounding at any size
        # (the test reference sums the outside columns too). The rest outcome's gradient on column j is then q_j c,
        # formed from the same buffer.
        row_max = finite_or_zero(student.amax(-1, keepdim=True).to(torch.float32))
        scaled_rows = student if temperature == 1.0 else torch.sub(student, row_max).div_(temperature)
        rest, log_sum = softmax_and_log_sum(scaled_rows, torch.float32)  # log sum_j exp((z_j - m) / T)
        del scaled_rows
        total = rest.sum(-1)
        rest.scatter_reduce_(-1, indices, torch.where(kept, 0.0, 1.0), reduce="prod")
        rest_q = rest.sum(-1) / total
        lse_all = ((row_max - shift) / temperature + log_sum).squeeze(-1)  # of the c-shifted scaled logits
        log_p = a
        log_q = b - lse_all.unsqueeze(-1)
        # Both rest masses below their floors: an empty bucket (e.g. k = V). Otherwise each reads as at least its
        # floor; a floored student mass is a constant (no gradient through it).
        negligible = (leftover_p < floor_p) & (rest_q < REST_Q_FLOOR)
        q_floored = ~negligible & (rest_q < REST_Q_FLOOR)
        extra_p = torch.where(negligible, 0.0, _floored(leftover_p, floor_p))
        extra_q = torch.where(negligible, 0.0, _floored(rest_q, REST_Q_FLOOR))
        extra_log_p, extra_log_q = extra_p.log(), extra_q.log()
    elif tail == "label":
        z_label = scaled(student.gather(-1, labels.unsqueeze(-1))).squeeze(-1)
        extra_a = _floored(leftover_p, floor_p).log()
        lse_a = torch.logsumexp(torch.cat([a, extra_a.unsqueeze(-1)], -1), -1)
        lse_b = torch.logsumexp(torch.cat([b, z_label.unsqueeze(-1)], -1), -1)
        log_p = a - lse_a.unsqueeze(-1)
        log_q = b - lse_b.unsqueeze(-1)
        extra_log_p, extra_log_q = extra_a - lse_a, z_label - lse_b
        extra_p, extra_q = extra_log_p.exp(), extra_log_q.exp()
    else:
        log_p = a - torch.logsumexp(a, -1, keepdim=True)
        log_q = b - lse_b.unsqueeze(-1)
    p = torch.where(kept, log_p.exp(), 0.0)
    q = torch.where(kept, log_q.exp(), 0.0)
    # The gradient leaves a floored student rest mass out (a constant outcome): its terms enter the loss only.
    live = 1.0 if tail != "bucket" else torch.where(q_floored, 0.0, 1.0)
    if divergence == "forward":
        total_p = p.sum(-1) + live * extra_p
        ratio = torch.where(p > 0, log_p - log_q, 0.0)
        extra_ratio = torch.where(extra_p > 0, extra_log_p - extra_log_q, 0.0)
        loss = (p * ratio).sum(-1) + extra_p * extra_ratio
        grad_kept = q * total_p.unsqueeze(-1) - p
        extra_coef = torch.where(extra_q > 0, total_p - live * extra_p / extra_q, 0.0)
        # The label outcome's gradient as Q total_p - P, like the kept entries': Q (total_p - P / Q) was 0 or
        # -inf once the student's label mass underflowed (Q denormal or 0), where the gradient is -P.
        extra_grad = extra_q * total_p - live * extra_p
    else:
        ratio = torch.where(q > 0, log_q - log_p, 0.0)
        extra_ratio = torch.where(extra_q > 0, extra_log_q - extra_log_p, 0.0)
        extra_term = extra_q * extra_ratio
        kept_sum = (q * ratio).sum(-1)
        loss = kept_sum + extra_term
        # S = sum over the live outcomes of Q_o g_o, g_o = log Q_o - log P_o + 1, is s + (their student mass), and
        # that mass is 1 - left_out: the +1 of g_o and the mass cancel in g_o - S (summed in, ~1 each, they cost
        # every entry ~6e-8 of q_j, 1.7e-2 of the row's largest entry for a student near its teacher; a review,
        # 2026-12-07), so g_o - S = log-ratio - s + left_out, where left_out is the student mass outside the live
        # outcomes: the bucket's rest when it is floored or negligible (below REST_Q_FLOOR), else 0.
        s = kept_sum + live * extra_term
        left_out = torch.where(q_floored | negligible, rest_q, 0.0) if tail == "bucket" else zero
        grad_kept = torch.where(q > 0, q * (ratio - (s - left_out).unsqueeze(-1)), 0.0)
        extra_coef = live * extra_ratio - s + left_out + (live - 1.0)  # a floored rest is not live: g_o = 0
        extra_grad = extra_q * extra_coef
    if not compute_grad:
        return loss, None
    # The top outcome (the largest student mass: a kept entry, the bucket's rest or the label) is rewritten as minus
    # the others' sum (a divergence's gradient in the student's logits sums to 0): its own formula cancels for a
    # confident student (q - p, q (g - S) with S ~ g: up to 3.1e-2 of the row's largest entry on both impls; a
    # review, 2026-12-07), where the others are small terms that keep their digits (as kl_div's top token).
    if tail == "bucket":
        grad_kept, rest_grad, kept_top = _top_outcome_as_minus_the_rest(q, grad_kept, rest_q, rest_q * extra_coef)
        # The rest's columns get q_j c: c from the rewritten mass where the rest is the top outcome (rest_q >= 1/m).
        extra_coef = torch.where(kept_top, extra_coef, rest_grad / rest_q)
    else:
        grad_kept, extra_grad, _ = _top_outcome_as_minus_the_rest(q, grad_kept, extra_q, extra_grad)
    # The kept columns' bucket share is zero: ``rest`` was zeroed there by a product (a padding entry that reuses a
    # kept token's index, e.g. index 0 with log-prob -inf, multiplies by 1, so it cannot win over the kept entry);
    # their values are added afterwards. Adding (value - share) instead lost the value where the share was large (a
    # student rest mass far below the teacher's makes the bucket's coefficient large).
    full = (rest, extra_coef.unsqueeze(-1)) if tail == "bucket" else None
    return loss, (full, torch.where(kept, grad_kept, 0.0), extra_grad if tail == "label" else None)


def topk_kl_rows_torch(
    student: Tensor,
    indices: Tensor,
    teacher_logprobs: Tensor,
    labels: Optional[Tensor],
    row_weight: Tensor,
    *,
    tail: str,
    divergence: str,
    temperature: float,
    ignore_index: int,
    compute_grad: bool,
) -> tuple[Tensor, Optional[Tensor]]:
    """PyTorch fallback on rows ``[N, V]`` or row groups ``[G, R, V]`` (see
    :func:`~distill_ops._utils.as_row_groups`): per-row loss (fp32) and dL_row/dz (student dtype and shape),
    chunked over rows, both multiplied by ``row_weight`` (fp32, one element or [N]).

    ``indices [N, K]`` int64 valid columns, ``teacher_logprobs [N, K]`` fp32 (-inf = not kept).
    """
    vocab = student.shape[-1]
    num_rows = math.prod(student.shape[:-1])
    losses = torch.empty(num_rows, dtype=torch.float32, device=student.device)
    grad = torch.empty_like(student, memory_format=torch.contiguous_format) if compute_grad else None
    # Only the bucket tail forms [rows, V] temporaries; the others' are [rows, K] (the gradient rows are written in
    # place), so their chunks are that much longer: fewer iterations of a few dozen small ops each.
    step = row_chunk(num_rows, vocab if tail == "bucket" else indices.shape[-1] + 2)
    for rows, (student_chunk, grad_chunk) in row_group_chunks((student, grad), step):
        chunk_indices = indices[rows]
        chunk_labels = None
        active = None
        if labels is not None:
            active = labels[rows] != ignore_index
            chunk_labels = torch.where(active, labels[rows], 0).clamp(0, vocab - 1)
        chunk_loss, parts = _hard_rows_and_grad(
            student_chunk, chunk_indices, teacher_logprobs[rows].to(torch.float32), chunk_labels, tail,
            divergence, temperature, compute_grad,
        )
        weight = row_weight if row_weight.numel() == 1 else row_weight[rows]
        chunk_loss = chunk_loss * weight
        if active is not None:  # after the weight: a zero tensor normalizer makes it inf (inf * 0 is NaN)
            chunk_loss = torch.where(active, chunk_loss, 0.0)
        losses[rows] = chunk_loss
        if compute_grad:
            scale = weight.reshape(-1, 1) / temperature

            def finish(values: Tensor) -> Tensor:
                """Scaled in place: every part is _hard_rows_and_grad's own buffer."""
                values = values.mul_(scale)
                if active is not None:  # a select, not a product: an ignored row may hold NaN / inf
                    values = values.masked_fill_(~active.unsqueeze(-1), 0.0)
                return values.to(grad_chunk.dtype)

            full, kept_grad, label_grad = parts
            if full is None:
                grad_chunk.zero_()
            else:  # the bucket's q_j c, scaled, written where it goes: one pass over [n, V]
                student_q, coef = full
                torch.mul(student_q, coef * scale, out=grad_chunk)
                if active is not None:
                    grad_chunk.masked_fill_(~active.unsqueeze(-1), 0.0)
            # Kept columns are distinct (padding entries add 0) and hold 0 in grad_chunk: adding the rounded values
            # gives what rounding the fp32 sums gave.
            grad_chunk.scatter_add_(-1, chunk_indices, finish(kept_grad))
            if label_grad is not None:
                grad_chunk.scatter_(-1, chunk_labels.unsqueeze(-1), finish(label_grad.unsqueeze(-1)))
    return losses, grad


# --------------------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("distill_ops::topk_kl_rows", mutates_args=())
def _topk_kl_rows_op(
    student: Tensor,
    indices: Tensor,
    teacher_logprobs: Tensor,
    labels: Optional[Tensor],
    row_weight: Tensor,
    tail: str,
    divergence: str,
    temperature: float,
    ignore_index: int,
    backend: str,
    compute_grad: bool,
) -> tuple[Tensor, Tensor]:
    if backend == "triton":
        from .kernels.topk_kl import topk_kl_forward

        grad = torch.empty_like(student, memory_format=torch.contiguous_format) if compute_grad else None
        # Row groups [G, R, V] (shifted logits of a batch, read in place): one launch per group, on its 2-D view.
        losses = []
        for rows, (student_rows, grad_rows) in row_group_chunks((student, grad), student.shape[-2] or 1):
            losses.append(topk_kl_forward(
                student_rows, indices[rows], teacher_logprobs[rows], None if labels is None else labels[rows],
                grad_rows, row_weight if row_weight.numel() == 1 else row_weight[rows], tail=tail,
                divergence=divergence, temperature=temperature, ignore_index=ignore_index,
            ))
        loss = torch.cat(losses) if losses else student.new_empty((0,), dtype=torch.float32)
    else:
        loss, grad = topk_kl_rows_torch(
            student, indices, teacher_logprobs, labels, row_weight, tail=tail, divergence=divergence, temperature=temperature,
            ignore_index=ignore_index, compute_grad=compute_grad,
        )
    if grad is None:
        grad = student.new_empty((0,))
    return loss, grad


@_topk_kl_rows_op.register_fake
def _(student, indices, teacher_logprobs, labels, row_weight, tail, divergence, temperature, ignore_index, backend,
      compute_grad):
    loss = student.new_empty((math.prod(student.shape[:-1]),), dtype=torch.float32)
    grad = student.new_empty(student.shape) if compute_grad else student.new_empty((0,))
    return loss, grad


register_stored_gradient_autograd("distill_ops::topk_kl_rows", backend_index=9, num_inputs=11)


@torch.library.custom_op("distill_ops::topk_kl_teacher_lse", mutates_args=())
def _teacher_lse_op(teacher: Tensor, temperature: float, backend: str) -> Tensor:
    """fp32 ``[2, N]``: each row's max m of ``teacher [N, V]`` and log-sum-exp((teacher - m) / temperature)."""
    if backend == "triton":
        from .kernels.topk_kl import row_logsumexp

        return row_logsumexp(teacher, temperature)
    out = torch.empty(2, teacher.shape[0], dtype=torch.float32, device=teacher.device)
    step = row_chunk(teacher.shape[0], teacher.shape[1])
    for start in range(0, teacher.shape[0], step):
        out[:, start : start + step] = _max_and_log_sum(teacher[start : start + step], temperature)
    return out


def _max_and_log_sum(rows: Tensor, temperature: float) -> Tensor:
    """fp32 ``[2, n]``: each row's max m of ``rows [n, V]`` and log sum_j exp((x_j - m) / T) as log(1 + rest), rest
    the other terms' sum over the max's own term, summed without it (resolved where it is far below fp32's step at
    1: a confident teacher's leftover mass; see :func:`_fine_logsumexp`). From one softmax (whose exponential keeps
    its vector speed where torch.exp's does not, see ``kl_div.softmax_and_log_sum``): rest = (its sum without the
    max's probability) / that probability. A row whose max is not finite gives it (NaN kept). 2.5x faster on the
    CPU (53 -> 21 ms at N=1024, V=32000) than shifting, exponentiating and summing in separate passes, as before."""
    row_max, at_max = rows.max(-1, keepdim=True)
    row_max = row_max.to(torch.float32)
    shifted = rows if temperature == 1.0 else torch.sub(rows, finite_or_zero(row_max)).div_(temperature)
    probs = torch.softmax(shifted, -1, dtype=torch.float32)
    top = probs.gather(-1, at_max)
    rest = probs.scatter_(-1, at_max, 0.0).sum(-1, keepdim=True) / top
    return torch.cat([row_max, torch.where(row_max.isfinite(), torch.log1p(rest), row_max)], -1).T


@_teacher_lse_op.register_fake
def _(teacher, temperature, backend):
    return teacher.new_empty((2, teacher.shape[0]), dtype=torch.float32)


def _teacher_logprobs(values: Tensor, stats: Tensor, temperature: float) -> Tensor:
    """Full-vocabulary teacher log-probabilities at T of the candidate logits ``values [N, m]``, from the
    :func:`_teacher_lse_op` statistics: ``(x - max) / T - log-sum``, differences of raw logits first, so they
    stay accurate for logits far from 0 (|x| ~ 1e4, where ``x / T - lse`` lost about 5e-4 to rounding)."""
    row_max = finite_or_zero(stats[0]).unsqueeze(-1)
    return (values.to(torch.float32) - row_max) / temperature - stats[1].unsqueeze(-1)


def _student_shift(candidate_logits: Tensor, teacher_logprobs: Tensor) -> Tensor:
    """``c [n, 1]`` fp32 from the student's logits at the teacher's entries (``candidate_logits [n, m]``): the
    largest among the kept entries (``teacher_logprobs`` not -inf; 0 where none is finite). The student enters as
    ``(z - c) / T``: every divergence here depends on logit differences only, and at |z| ~ 1e4 the unshifted
    ``z / T`` minus a log-sum-exp lost the small rest masses to rounding (a rest of 4e-4 rounded to 0)."""
    kept = torch.where(teacher_logprobs != float("-inf"), candidate_logits.to(torch.float32), float("-inf"))
    return finite_or_zero(kept.amax(-1, keepdim=True)).detach()


@torch.library.custom_op("distill_ops::topk_kl_dense_select", mutates_args=())
def _dense_select_op(teacher: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """The Triton selection kernel: the ``count`` largest of each row of ``teacher [N, V]``, in index order."""
    from .kernels.topk_select import topk_select

    return topk_select(teacher, count)


@_dense_select_op.register_fake
def _(teacher, count):
    shape = (teacher.shape[0], count)
    return teacher.new_empty(shape), teacher.new_empty(shape, dtype=torch.int64)


# --------------------------------------------------------------------------------------------------
# Teacher preparation: candidates, kept set, temperature (shared by every backend)
# --------------------------------------------------------------------------------------------------


def _sort_desc_stable(values: Tensor, indices: Tensor, *, index_sorted: bool = False) -> tuple[Tensor, Tensor]:
    """Order [N, m] entries by value descending, vocabulary index ascending among ties (``index_sorted``: the
    entries already come in ascending index order, so one stable sort by value does it)."""
    if not index_sorted:
        indices, by_index = indices.sort(dim=-1)
        values = values.gather(-1, by_index)
    values, by_value = values.sort(dim=-1, descending=True, stable=True)
    return values, indices.gather(-1, by_value)


def dense_candidates(teacher_rows: Tensor, count: int, *, need_order: bool, backend: str) -> tuple[Tensor, Tensor]:
    """The teacher's ``count`` most probable tokens per row: ``(logits [N, count], indices [N, count] int64)``.

    Ties: lower vocabulary index first. Sorted by (logit desc, index asc) when ``need_order``, otherwise
    in any order. ``backend="triton"`` selects with the radix-select kernel (also under the interpreter).
    """
    if backend == "triton":
        values, indices = torch.ops.distill_ops.topk_kl_dense_select(teacher_rows, count)
        if need_order:  # the kernel returns index order
            values, indices = _sort_desc_stable(values, indices, index_sorted=True)
        return values, indices
    if teacher_rows.device.type == "cuda":
        values, indices = torch.topk(teacher_rows, count, dim=-1, largest=True, sorted=False)
        if need_order:
            values, indices = _sort_desc_stable(values, indices)
        return values, indices
    # Elsewhere topk's tie order is unspecified: topk finds each row's cut value, the ties at the cut are taken by
    # index (a full stable sort of the vocabulary took 2/3 of the CPU fallback's time at k = 64). Row chunks (bounded
    # memory); all rows at once under torch.compile (the chunk loop fixed N: one recompilation per row count).
    if torch.compiler.is_compiling():
        values, indices = _largest_by_index(teacher_rows, count)
    else:
        num_rows, vocab = teacher_rows.shape
        values = teacher_rows.new_empty((num_rows, count))
        indices = torch.empty((num_rows, count), dtype=torch.int64, device=teacher_rows.device)
        step = row_chunk(num_rows, vocab, budget_elements=1 << 20)
        on_host = teacher_rows.device.type == "cpu"
        for start in range(0, num_rows, step):
            values[start : start + step], indices[start : start + step] = _largest_by_index(
                teacher_rows[start : start + step], count, host_ties=on_host)
    if need_order:
        values, indices = _sort_desc_stable(values, indices, index_sorted=True)
    return values, indices


def _ranked_above(values: Tensor, cut: Tensor, is_nan: Optional[Tensor] = None) -> Tensor:
    """``values`` ranked above ``cut`` in a descending sort's order: NaN above everything but NaN (``is_nan``:
    ``values.isnan()`` where the caller has it)."""
    return (values > cut) | ((values.isnan() if is_nan is None else is_nan) & ~cut.isnan())


def _tied(values: Tensor, cut: Tensor, cut_has_nan: bool = True, is_nan: Optional[Tensor] = None) -> Tensor:
    """``values`` tied with ``cut`` (NaN with NaN); ``cut_has_nan=False`` (read on the host) skips NaN's pass."""
    if not cut_has_nan:
        return values == cut
    return (values == cut) | ((values.isnan() if is_nan is None else is_nan) & cut.isnan())


def _largest_by_index(rows: Tensor, count: int, host_ties: bool = False) -> tuple[Tensor, Tensor]:
    """The ``count`` largest entries of each row of ``rows [n, V]``, ties at the cut broken by lower index (NaN
    ranks above +inf, as in a descending sort and in the selection kernel; until 2026-12-07 this path tied the
    two): ``(values, indices)`` in ascending index order.

    ``host_ties`` (CPU tensors, read on the host at no cost): ``topk``'s own selection is kept for the rows where
    it took every entry equal to its cut (it had no choice to make: fp32 logits, as a rule), and only the other
    rows (ties across the cut, most rows of a bf16 teacher) take their tied entries by index; without it every row
    takes the rule through a cumulative count of its tied entries (the form ``torch.compile`` traces: no
    data-dependent split of the rows). A ``topk`` of ``count + 1`` finds the rows with ties across the cut (the
    extra entry equals the cut); only those rows are read again."""
    vocab = rows.shape[-1]
    if host_ties and count < vocab:
        # The CPU's topk ranks NaN above +inf, as a sort does; its (count + 1)-th largest entry tells the rows where
        # entries tied with the cut were left out (it is tied with the cut), without a pass over the vocabulary.
        top_values, indices = rows.topk(count + 1, dim=-1, sorted=True)
        cut = top_values[:, count - 1:count]
        split = _tied(top_values[:, count:], cut).squeeze(-1).nonzero().squeeze(-1)
        top_values, indices = top_values[:, :count], indices[:, :count]
        if split.numel() > 0:
            # The entries above the cut (topk's) and the first tied ones by index; the vocabulary size pads.
            cut = cut[split]
            at_cut = _tied(rows[split], cut, bool(cut.isnan().any()))
            # int32 column numbers: the [rows, V] search for the lowest tied ones moves half the bytes of int64
            column = torch.arange(vocab, device=rows.device, dtype=torch.int32)
            tied = torch.where(at_cut, column, vocab).topk(count, dim=-1, largest=False, sorted=True).values.long()
            above = _ranked_above(top_values[split], cut)
            needed = count - above.sum(-1, keepdim=True)
            tied = torch.where(torch.arange(count, device=rows.device) < needed, tied, vocab)
            merged = torch.cat([torch.where(above, indices[split], vocab), tied], dim=-1)
            indices[split] = merged.sort(dim=-1).values[:, :count]
        indices = indices.sort(dim=-1).values
        return rows.gather(-1, indices), indices
    # The cut from a topk that never sees NaN (read as +inf: whatever a device's topk makes of NaN), then NaN itself
    # where the row holds count NaNs or more.
    is_nan = rows.isnan()
    cut = torch.where(is_nan, float("inf"), rows).topk(count, dim=-1).values[:, -1:]
    cut = torch.where(is_nan.sum(-1, keepdim=True) >= count, float("nan"), cut)
    above, at_cut = _ranked_above(rows, cut, is_nan), _tied(rows, cut, is_nan=is_nan)
    column = torch.arange(vocab, device=rows.device)
    keep = above | (at_cut & (at_cut.cumsum(-1) <= count - above.sum(-1, keepdim=True)))
    indices = torch.where(keep, column, vocab).topk(count, dim=-1, largest=False, sorted=True).values
    return rows.gather(-1, indices), indices


def kept_logprobs(sorted_logprobs: Tensor, lower: Optional[Tensor], upper: Optional[Tensor]) -> Tensor:
    """Apply the bounds to candidates sorted by probability descending: -inf where not kept.

    ``sorted_logprobs [N, m]`` full-vocabulary log-probabilities; ``lower`` / ``upper`` [N] or None.
    A row that keeps nothing keeps its first (most probable) candidate. NaN entries stay (NaN out).
    Entries of probability 0 in fp32 (exp underflows: masked with -1e4 or ``finfo.min`` rather than -inf, or
    padding written that way) are -inf, never kept: kept with a finite value, renormalisation gave them student
    mass and gradient (and a padding entry that repeats a real index counted that column twice).
    """
    probs = sorted_logprobs.exp()
    sorted_logprobs = torch.where(probs == 0, float("-inf"), sorted_logprobs)
    kept = sorted_logprobs != float("-inf")
    if lower is not None or upper is not None:
        mass_after = probs.cumsum(-1).clamp_max(1.0)  # rounding must not push a token past lower = 1
        mass_before = mass_after - probs
        if upper is not None:
            # upper >= 1 keeps everything: once the fp32 running sum has rounded to 1, the mass before each
            # later token reads exactly 1 and `< 1` would drop tokens that have probability.
            kept = kept & ((mass_before < upper.unsqueeze(-1)) | (upper.unsqueeze(-1) >= 1.0))
        if lower is not None:
            kept = kept & (mass_after > lower.unsqueeze(-1))
        kept = kept | sorted_logprobs.isnan()
    first = torch.zeros_like(kept)
    first[:, 0] = True
    kept = kept | (first & ~kept.any(-1, keepdim=True))
    return torch.where(kept, sorted_logprobs, float("-inf"))


def log_soft_membership(sorted_logprobs: Tensor, lower: Tensor, upper: Tensor, sharpness: float) -> Tensor:
    """Differentiable version of the bounds, as a log: log sigmoid(s (c_after - lower)) + log sigmoid(s (upper -
    c_before)) (-inf for tokens without mass). Tends to the hard rule of :func:`kept_logprobs` as ``sharpness``
    grows (away from the empty-set case). In log space because a weight that underflows to 0 (a confident teacher's
    tail at high sharpness) made log(weight) -inf and the bound network's gradient NaN (inf * 0)."""
    probs = sorted_logprobs.exp()
    mass_after = probs.cumsum(-1).clamp_max(1.0)
    mass_before = mass_after - probs
    log_weights = torch.nn.functional.logsigmoid(sharpness * (mass_after - lower.unsqueeze(-1)))
    log_weights = log_weights + torch.nn.functional.logsigmoid(sharpness * (upper.unsqueeze(-1) - mass_before))
    return torch.where(probs > 0, log_weights, float("-inf"))


def _retemper(kept_logprobs_t1: Tensor, temperature: float) -> Tensor:
    """Sparse teacher at T: p_i = M softmax_kept(log p_i / T), M = the kept mass at T = 1."""
    if temperature == 1.0:
        return kept_logprobs_t1
    kept_mass = _fine_logsumexp(kept_logprobs_t1)
    # Shifted by the top log-probability before the division (the softmax does not change): log p / T rounded at
    # |log p / T| (3e-5 at 500, amplified by 1/T in the gradient) where log p - top is exact near the top.
    scaled = (kept_logprobs_t1 - finite_or_zero(kept_logprobs_t1.amax(-1, keepdim=True))) / temperature
    # Padding stays -inf (a row of padding only gave -inf - -inf = NaN, which counts as kept).
    return torch.where(scaled == float("-inf"), scaled, scaled - _fine_logsumexp(scaled) + kept_mass)


# --------------------------------------------------------------------------------------------------
# Argument checking
# --------------------------------------------------------------------------------------------------


def _bound_rows(name: str, bound: object, leading_shape: torch.Size, device: torch.device) -> Optional[Tensor]:
    """A bound as fp32 [N] (None stays None); tensors are checked here where readable, Python numbers by
    :func:`_check_static_options`."""
    if bound is None:
        return None
    num_rows = math.prod(leading_shape)
    if isinstance(bound, Tensor):
        check_tensor(name, bound, dtypes=FLOAT_DTYPES + (torch.float64,))
        if bound.dim() != 0 and bound.shape != leading_shape:
            raise ValueError(
                f"{name} must be a number or a tensor shaped like the logits' leading dims {tuple(leading_shape)}, "
                f"got shape {tuple(bound.shape)}"
            )
        if bound.device != device:
            raise ValueError(f"{name} is on {bound.device} but the logits are on {device}")
        rows = bound.detach().to(torch.float32).reshape(-1).expand(num_rows)
        if host_readable(rows) and rows.numel() and not bool(((rows >= 0) & (rows <= 1)).all()):
            raise ValueError(f"{name} must be in [0, 1], got values from {rows.min().item()} to {rows.max().item()}")
        return rows
    return torch.full((num_rows,), float(bound), dtype=torch.float32, device=device)


def _check_own_vocab_size(vocab_size: int | None, vocab: int, name: str) -> int:
    """``vocab_size`` (None: all ``vocab``) read against one tensor's vocabulary, ``name``'s last dim."""
    if vocab < 1:  # (DACKLLoss.predict_bounds failed inside a reshape)
        raise ValueError(f"{name} must have a vocabulary of V >= 1 (a non-empty last dim), got {vocab}")
    if vocab_size is None:
        return vocab
    vocab_size = check_vocab_size(vocab_size)
    if vocab_size > vocab:
        raise ValueError(f"vocab_size must be in [1, {vocab}] ({name}' vocabulary), got {vocab_size}")
    return vocab_size


def _kept_backend(impl: str, backend: str, kept_columns: int, remedy: str) -> str:
    """The backend for ``kept_columns`` candidates per row: past ``TRITON_MAX_K`` the Triton path is refused when
    asked for by name, and ``impl="auto"`` takes the PyTorch path instead (as on the CPU), so the same call runs on
    both devices."""
    if backend != "triton" or kept_columns <= TRITON_MAX_K:
        return backend
    if impl == "auto":
        return "torch"
    raise ValueError(
            f"impl='triton' supports at most {TRITON_MAX_K} kept candidates per row, got {kept_columns}; "
            f"use impl='torch' (or 'auto') or {remedy}"
        )


def _check_static_options(
    k: object, lower: object, upper: object, max_candidates: object
) -> tuple[int | None, int]:
    """The options that need no tensor to check: by :func:`topk_kl_div`, and when ``TopKKLDivLoss`` is built.
    Returns ``k`` and ``max_candidates`` as Python ints (NumPy integers are accepted)."""
    k = check_int("k", k, low=1, optional=True)
    max_candidates = check_int("max_candidates", max_candidates, low=1)
    numbers = {name: value for name, value in (("lower", lower), ("upper", upper))
               if value is not None and not isinstance(value, Tensor)}
    for name, value in numbers.items():
        check_number(name, value, low=0.0, high=1.0)
    if len(numbers) == 2 and lower > upper:
        raise ValueError(f"lower must be <= upper, got lower={lower} and upper={upper}")
    return k, max_candidates


def _check_args(
    student_logits, teacher_logits, k, teacher_topk_indices, teacher_topk_logprobs, lower, upper, tail, divergence,
    temperature, labels, reduction, normalizer, max_candidates, vocab_size=None,
):
    """Argument checks; returns ``(lower rows, upper rows, vocab)``, vocab the number of columns read (the
    ``vocab_size`` rule of :func:`~distill_ops.kl_div`; a sparse teacher's vocabulary is the student's)."""
    check_tensor("student_logits", student_logits, min_dim=1)
    leading_shape = student_logits.shape[:-1]
    vocab = student_logits.shape[-1]
    sparse = teacher_topk_indices is not None or teacher_topk_logprobs is not None
    if teacher_logits is not None and sparse:
        raise ValueError(
            "give the teacher either dense (teacher_logits) or sparse (teacher_topk_indices + teacher_topk_logprobs), "
            "got both"
        )
    if teacher_logits is None and not sparse:
        raise ValueError(
            "no teacher given: pass teacher_logits (dense) or teacher_topk_indices + teacher_topk_logprobs (sparse)"
        )
    if sparse:
        vocab = _check_own_vocab_size(vocab_size, vocab, "student_logits")
        if teacher_topk_indices is None or teacher_topk_logprobs is None:
            missing = "teacher_topk_indices" if teacher_topk_indices is None else "teacher_topk_logprobs"
            raise ValueError(f"a sparse teacher needs both teacher_topk_indices and teacher_topk_logprobs, got "
                             f"{missing}=None")
        check_tensor("teacher_topk_indices", teacher_topk_indices, dtypes=INT_DTYPES, min_dim=1)
        check_tensor("teacher_topk_logprobs", teacher_topk_logprobs, dtypes=FLOAT_DTYPES, min_dim=1)
        if teacher_topk_indices.shape != teacher_topk_logprobs.shape:
            raise ValueError(
                f"teacher_topk_indices and teacher_topk_logprobs must have the same shape, got "
                f"{tuple(teacher_topk_indices.shape)} and {tuple(teacher_topk_logprobs.shape)}"
            )
        check_leading_dims("teacher_topk_indices", teacher_topk_indices, "student_logits", leading_shape)
        stored_k = teacher_topk_indices.shape[-1]
        if stored_k == 0:
            raise ValueError(f"teacher_topk_indices must hold k >= 1 entries per row, got shape "
                             f"{tuple(teacher_topk_indices.shape)}")
        if k is not None and k > stored_k:
            raise ValueError(f"k must be <= the {stored_k} stored teacher entries per row, got {k}")
        check_same_device(
            student_logits=student_logits, teacher_topk_indices=teacher_topk_indices,
            teacher_topk_logprobs=teacher_topk_logprobs,
        )
    else:
        check_tensor("teacher_logits", teacher_logits, min_dim=1)
        check_leading_dims("teacher_logits", teacher_logits, "student_logits", leading_shape)
        vocab = resolve_vocab(vocab, teacher_logits.shape[-1], vocab_size, student_name="student_logits",
                              teacher_name="teacher_logits")
        check_same_device(student_logits=student_logits, teacher_logits=teacher_logits)
        if k is None and lower is None and upper is None:
            raise ValueError(
                "a dense teacher needs k and/or lower/upper to select a kept set (use kl_div for the full vocabulary)"
            )
        if k is not None and k > vocab:
            raise ValueError(f"k must be <= the vocabulary size {vocab}, got {k}")
    check_choice("tail", tail, TAILS)
    check_choice("divergence", divergence, TOPK_DIVERGENCES)
    check_number("temperature", temperature, low=0.0, low_inclusive=False)
    check_reduction(reduction, normalizer)
    if labels is not None:
        check_labels(labels, leading_shape, student_logits.device)
    if tail == "label":
        if labels is None:
            raise ValueError("tail='label' needs labels (the label token receives the teacher's leftover mass)")
    lower_rows = _bound_rows("lower", lower, leading_shape, student_logits.device)
    upper_rows = _bound_rows("upper", upper, leading_shape, student_logits.device)
    if lower_rows is not None and upper_rows is not None and (isinstance(lower, Tensor) or isinstance(upper, Tensor)):
        if host_readable(lower_rows) and bool((lower_rows > upper_rows).any()):
            row = int((lower_rows > upper_rows).nonzero()[0, 0])
            raise ValueError(f"lower must be <= upper in every row, got row {row} with lower "
                             f"{float(lower_rows[row]):.6g} > upper {float(upper_rows[row]):.6g}")
    return lower_rows, upper_rows, vocab


def _check_sparse_values(
    indices: Tensor, logprobs: Tensor, vocab: int, labels: Optional[Tensor], ignore_index: int
) -> None:
    """A sparse teacher's indices lie in [0, vocab) and its log-probabilities are <= 0 in every counted row (checked
    where readable; ignored rows may hold anything, e.g. padding collated as index -1: refused on CPU tensors
    before, while CUDA's unchecked path gave those rows their 0)."""
    if not host_readable(indices) or indices.numel() == 0:
        return
    counted = None if labels is None else (labels != ignore_index).unsqueeze(-1).expand_as(indices)
    seen_indices, seen_logprobs = (values if counted is None else values[counted] for values in (indices, logprobs))
    if bool(((seen_indices < 0) | (seen_indices >= vocab)).any()):
        raise ValueError(
            f"teacher_topk_indices must be in [0, {vocab}) (the student vocabulary), got values from "
            f"{seen_indices.min().item()} to {seen_indices.max().item()}"
        )
    if bool((seen_logprobs > 0).any()):
        raise ValueError(
            f"teacher_topk_logprobs must be log-probabilities (<= 0), got a maximum of {seen_logprobs.max().item()}"
        )


def _repeated_entries(indices: Tensor, logprobs: Tensor) -> tuple[Tensor, Tensor]:
    """A sparse teacher's indices with probability, sorted per row (padding replaced by distinct negatives), and
    where each equals its predecessor (``[N, k - 1]``). Device-side; no host synchronisation."""
    real = logprobs.float().exp() > 0  # the loss's rule (kept_logprobs, fp32): fp16's exp is 0 below -17.4
    sentinel = -1 - torch.arange(indices.shape[-1], device=indices.device)  # distinct, below every index
    ordered = torch.where(real, indices.to(torch.int64), sentinel).sort(dim=-1).values
    return ordered, ordered[:, 1:] == ordered[:, :-1]


def _check_distinct_indices(indices: Tensor, logprobs: Tensor, labels: Optional[Tensor], ignore_index: int) -> None:
    """A sparse teacher's entries with probability are distinct in every counted row (checked where readable;
    padding, -inf or of zero probability, may repeat an index; ignored rows may hold anything)."""
    if not host_readable(indices) or indices.numel() == 0:
        return
    ordered, repeated = _repeated_entries(indices, logprobs)
    if labels is not None:
        repeated = repeated & (labels != ignore_index).unsqueeze(-1)
    if bool(repeated.any()):
        row = int(repeated.any(-1).nonzero()[0, 0])
        raise ValueError(
            f"teacher_topk_indices must be distinct within a row (padding aside), got index "
            f"{int(ordered[row, 1:][repeated[row]][0])} twice in row {row} (of the rows flattened)"
        )


#: How far above 1 a sparse teacher row's stored mass may sum (the rounding of 16-bit log-probabilities: at most
#: about ln(k) * 2^-9 of the mass, 1.6 % at k = 4096).
SPARSE_MASS_TOLERANCE = 2**-5


def _check_sparse_mass(logprobs: Tensor, labels: Optional[Tensor], ignore_index: int) -> None:
    """A sparse teacher's stored entries are log-probabilities of one distribution: each counted row's mass sums to
    at most 1 (checked where readable; ignored rows may hold anything). Unnormalised scores that are all <= 0 (e.g.
    logits less their row max) passed the sign check, and every tail then read a leftover mass below 0 as its
    floor: a silently wrong loss."""
    if not host_readable(logprobs) or logprobs.numel() == 0:
        return
    mass = logprobs.double().exp().sum(-1)
    if labels is not None:
        mass = torch.where(labels != ignore_index, mass, 0.0)
    over = mass > 1.0 + SPARSE_MASS_TOLERANCE
    if bool(over.any()):
        row = int(over.nonzero()[0, 0])
        raise ValueError(
            f"teacher_topk_logprobs must be log-probabilities of one distribution per row (their probabilities "
            f"summing to at most 1), got a sum of {float(mass[row]):.6g} in row {row} (of the rows flattened)"
        )


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def _sparse_teacher(
    indices: Tensor, logprobs: Tensor, k: Optional[int], lower: Optional[Tensor], upper: Optional[Tensor],
    temperature: float, vocab: int,
) -> tuple[Tensor, Tensor]:
    """Kept entries of a stored sparse teacher: ``(indices [N, k'] int64, log-probs at T [N, k'] fp32)``."""
    indices = indices.to(torch.int64)
    logprobs = logprobs.to(torch.float32)
    # Out-of-range entries become NaN (checked on the host for CPU tensors; see the module docstring).
    bad = (indices < 0) | (indices >= vocab) | (logprobs > 0)
    if not host_readable(indices) and indices.shape[-1] > 1:
        # An index repeated among the entries with probability makes the whole row NaN: the kernel's gradient
        # scatter would store one of the repeats' values, which one up to the GPU (a race audit, 2026-12-07).
        bad = bad | _repeated_entries(indices, logprobs)[1].any(-1, keepdim=True)
    logprobs = torch.where(bad, float("nan"), logprobs)
    indices = torch.where(bad, 0, indices)
    bounded = lower is not None or upper is not None
    if bounded or (k is not None and k < indices.shape[-1]):
        logprobs, indices = _sort_desc_stable(logprobs, indices)
        if k is not None:
            logprobs, indices = logprobs[:, :k], indices[:, :k]
    logprobs = kept_logprobs(logprobs, lower, upper)
    return indices.contiguous(), _retemper(logprobs, temperature).contiguous()


def _per_row_group(
    teacher_rows: Tensor, select: Callable[[Tensor, slice], tuple[Tensor, Tensor]]
) -> tuple[Tensor, Tensor]:
    """``select(group [R, V], its slice of the N rows)`` on each group of ``teacher_rows [G, R, V]`` (a 2-D view,
    read in place), its ``(indices, log-probs)`` concatenated over the groups.

    Under ``torch.compile`` the groups are flattened into one ``[N, V]`` copy instead: a Python loop over them is
    unrolled into the graph, one recompilation per batch size (``fullgraph=True`` failed at the recompile limit)."""
    if torch.compiler.is_compiling():
        return select(teacher_rows.reshape(-1, teacher_rows.shape[-1]), slice(None))
    per_group = teacher_rows.shape[1]
    kept = [select(group, slice(g * per_group, (g + 1) * per_group)) for g, group in enumerate(teacher_rows)]
    return torch.cat([indices for indices, _ in kept]), torch.cat([logprobs for _, logprobs in kept])


def _dense_teacher(
    teacher_rows: Tensor, k: Optional[int], lower: Optional[Tensor], upper: Optional[Tensor], temperature: float,
    max_candidates: int, tail: str, backend: str,
) -> tuple[Tensor, Tensor]:
    """Kept entries of a dense teacher ``[N, V]`` or row groups ``[G, R, V]`` (one group at a time, each a 2-D
    view read in place): ``(indices [N, m] int64, log-probs at T [N, m] fp32)``."""
    if teacher_rows.dim() == 3:
        return _per_row_group(teacher_rows, lambda group, rows: _dense_teacher(
            group, k, None if lower is None else lower[rows], None if upper is None else upper[rows], temperature,
            max_candidates, tail, backend))
    vocab = teacher_rows.shape[-1]
    bounded = lower is not None or upper is not None
    count = k if k is not None else min(vocab, max_candidates)
    values, indices = dense_candidates(teacher_rows, count, need_order=bounded, backend=backend)
    if bounded or tail != "renormalize":
        # The full-vocabulary normaliser (one streaming pass over the teacher) matters for the bounds'
        # masses and the leftover mass; renormalised top-k only needs logit differences.
        stats = torch.ops.distill_ops.topk_kl_teacher_lse(teacher_rows, temperature, backend)
        logprobs = _teacher_logprobs(values, stats, temperature)
    else:
        # Shifted by the row's max as it is: a row that is -inf only has no distribution and gives NaN (as in
        # kl_div and the other tails), not an empty kept set's 0. kept_logprobs's zero-probability test then reads
        # each token's probability relative to the top token, not to the full vocabulary (by choice, see the
        # README's kept-set rule: a token 92-104 T below the top stays kept; the normaliser is another pass).
        values = values.to(torch.float32)
        logprobs = (values - values.amax(-1, keepdim=True)) / temperature
    return indices.contiguous(), kept_logprobs(logprobs, lower, upper).contiguous()


def topk_kl_div(
    student_logits: Tensor,
    teacher_logits: Optional[Tensor] = None,
    *,
    k: Optional[int] = None,
    teacher_topk_indices: Optional[Tensor] = None,
    teacher_topk_logprobs: Optional[Tensor] = None,
    lower: float | Tensor | None = None,
    upper: float | Tensor | None = None,
    tail: str = "renormalize",
    divergence: str = "forward",
    temperature: float = 1.0,
    labels: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: float | Tensor | None = None,
    max_candidates: int = DEFAULT_MAX_CANDIDATES,
    vocab_size: Optional[int] = None,
    impl: Impl = "auto",
) -> Tensor:
    """Divergence between the student and a top-k / quantile-clipped teacher (see the module docstring).

    Args:
        student_logits: ``[..., V]`` fp32 / fp16 / bf16. Receives the gradient.
        teacher_logits: dense teacher ``[..., V]`` fp32 / fp16 / bf16 (with ``k`` and/or bounds), or None.
        k: keep the teacher's top-k tokens (dense: 1 <= k <= V; sparse: <= the stored entries, default all).
        teacher_topk_indices: sparse teacher ``[..., k]`` integer token ids in [0, V), distinct per row.
        teacher_topk_logprobs: sparse teacher ``[..., k]`` fp32 / fp16 / bf16 log-probabilities at T = 1
            over the full teacher vocabulary; ``-inf`` marks padding.
        lower, upper: cumulative-mass bounds in [0, 1]: Python numbers or tensors shaped ``[...]``.
        tail: ``renormalize`` | ``bucket`` | ``label`` (``label`` needs ``labels``).
        divergence: ``forward`` KL(P || Q) | ``reverse`` KL(Q || P).
        temperature: divides the student logits and tempers the teacher (rule in the module docstring);
            no T^2 factor (multiply by ``temperature ** 2`` for Hinton's scaling).
        labels: optional integer ``[...]``; rows equal to ``ignore_index`` (default -100) contribute nothing.
        reduction: ``mean`` (over counted rows, 0.0 if none), ``sum`` or ``none`` (shape ``[...]``).
        normalizer: replaces the row count of ``mean``.
        max_candidates: dense teacher with bounds and no ``k``: the bounds search this many top tokens.
        vocab_size: read only the first ``vocab_size`` columns of the student (and of a dense teacher): a
            dense teacher of another width is refused without it (:func:`~distill_ops.kl_div`'s rule); sparse
            indices must then be below it. The other columns get no gradient.
        impl: ``auto`` (Triton on CUDA, PyTorch otherwise), ``triton`` or ``torch``.

    Returns:
        fp32 scalar (``mean`` / ``sum``) or fp32 ``[...]`` (``none``).
    """
    check_index("ignore_index", ignore_index)
    k, max_candidates = _check_static_options(k, lower, upper, max_candidates)
    lower_rows, upper_rows, vocab = _check_args(
        student_logits, teacher_logits, k, teacher_topk_indices, teacher_topk_logprobs, lower, upper, tail,
        divergence, temperature, labels, reduction, normalizer, max_candidates, vocab_size,
    )
    backend = resolve_impl(impl, student_logits.device)
    leading_shape = student_logits.shape[:-1]
    temperature = float(temperature)
    if k is not None:
        kept_columns = k
    elif teacher_logits is not None:
        kept_columns = min(vocab, max_candidates)
    else:
        kept_columns = teacher_topk_indices.shape[-1]
    backend = _kept_backend(impl, backend, kept_columns, "a smaller k / max_candidates")
    label_rows = flat_labels(labels)
    # Checked before the selection kernel runs; rows the check cannot read (CUDA) give NaN (below).
    bad_label = check_label_values(label_rows, ignore_index, vocab, "with tail='label'") if tail == "label" else None
    # Row groups: shifted logits of a batch (logits[:, :-1]) are read in place, not copied.
    if teacher_logits is not None:
        student_rows, teacher_rows = as_row_groups((student_logits, teacher_logits.detach()), vocab)
        indices, teacher_logprobs = _dense_teacher(
            teacher_rows, k, lower_rows, upper_rows, temperature, max_candidates, tail, backend,
        )
    else:
        (student_rows,) = as_row_groups((student_logits,), vocab)
        stored_k = teacher_topk_indices.shape[-1]
        stored_indices = teacher_topk_indices.detach().reshape(-1, stored_k)
        stored_logprobs = teacher_topk_logprobs.detach().reshape(-1, stored_k)
        _check_sparse_values(stored_indices, stored_logprobs, vocab, label_rows, ignore_index)
        _check_distinct_indices(stored_indices, stored_logprobs, label_rows, ignore_index)
        _check_sparse_mass(stored_logprobs, label_rows, ignore_index)
        indices, teacher_logprobs = _sparse_teacher(
            stored_indices, stored_logprobs, k, lower_rows, upper_rows, temperature, vocab,
        )
    if bad_label is not None:
        teacher_logprobs = torch.where(bad_label.unsqueeze(-1), float("nan"), teacher_logprobs)
    return _reduce_op_rows(
        student_rows, indices, teacher_logprobs, label_rows, tail, divergence, temperature,
        ignore_index, backend, reduction, normalizer, leading_shape, student_logits.requires_grad,
    )


def _reduce_op_rows(
    student_rows, indices, teacher_logprobs, label_rows, tail, divergence, temperature, ignore_index, backend,
    reduction, normalizer, leading_shape, requires_grad,
) -> Tensor:
    compute_grad = requires_grad and torch.is_grad_enabled()
    active = None if label_rows is None else label_rows != ignore_index
    row_weight, deferred = split_stored_weight(
        reduction_weight(reduction, normalizer, active, math.prod(leading_shape), student_rows.device), reduction,
        student_rows.dtype,
    )
    row_loss, _ = torch.ops.distill_ops.topk_kl_rows(
        student_rows, indices, teacher_logprobs, label_rows, row_weight, tail, divergence, temperature,
        int(ignore_index), backend, compute_grad,
    )
    return finish_deferred(row_loss, deferred, active, reduction, leading_shape)


class TopKKLDivLoss(LossModule):
    """Module form of :func:`topk_kl_div`.

    ``forward(student_logits, teacher_logits=None, labels=None, *, teacher_topk_indices=None,
    teacher_topk_logprobs=None, lower=None, upper=None, normalizer=None)``; per-call bounds override
    the module's.
    """

    def __init__(
        self,
        k: Optional[int] = None,
        lower: Optional[float] = None,
        upper: Optional[float] = None,
        tail: str = "renormalize",
        divergence: str = "forward",
        temperature: float = 1.0,
        ignore_index: int = -100,
        reduction: str = "mean",
        max_candidates: int = DEFAULT_MAX_CANDIDATES,
        vocab_size: Optional[int] = None,
        impl: Impl = "auto",
    ) -> None:
        check_choice("tail", tail, TAILS)
        check_choice("divergence", divergence, TOPK_DIVERGENCES)
        check_choice("reduction", reduction, ("mean", "sum", "none"))
        k, max_candidates = _check_static_options(k, lower, upper, max_candidates)
        super().__init__(
            k=k,
            lower=lower,
            upper=upper,
            tail=tail,
            divergence=divergence,
            temperature=temperature,
            ignore_index=ignore_index,
            reduction=reduction,
            max_candidates=max_candidates,
            vocab_size=vocab_size,
            impl=impl,
        )

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        *,
        teacher_topk_indices: Optional[Tensor] = None,
        teacher_topk_logprobs: Optional[Tensor] = None,
        lower: float | Tensor | None = None,
        upper: float | Tensor | None = None,
        normalizer: float | Tensor | None = None,
    ) -> Tensor:
        bounds = {name: value for name, value in (("lower", lower), ("upper", upper)) if value is not None}
        return topk_kl_div(
            student_logits,
            teacher_logits,
            teacher_topk_indices=teacher_topk_indices,
            teacher_topk_logprobs=teacher_topk_logprobs,
            labels=labels,
            normalizer=normalizer,
            **self.options(**bounds),
        )


class DACKLLoss(torch.nn.Module):
    """Distribution-adaptive clipped KL: learned per-token bounds + the clipped divergence above.

    Our reading of "distribution-adaptive clipping" (DAC-KL, Multi-Granularity Semantic Revision for
    LLM Distillation, 2024): a small MLP maps each token's sorted top-m teacher probabilities (at the
    temperature, detached) to bounds ``upper = sigmoid(u)``, ``lower = upper * sigmoid(l)``, so
    0 <= lower <= upper <= 1 (strictly inside in exact arithmetic; the fp32 sigmoid saturates to 0 or 1 for large
    outputs, which the kept-set rule accepts); the teacher is clipped to the tokens whose cumulative-mass interval
    overlaps [lower, upper] within its top m (the dense-teacher rule of :func:`topk_kl_div` with ``k = m``).

    * ``train()``: the MLP learns through a soft membership weight
      w = sigmoid(s (c_after - lower)) * sigmoid(s (upper - c_before)) with sharpness s = ``sharpness``
      (default 50: each factor goes from 0.12 to 0.88 over 0.08 of cumulative mass, ±0.04 around its
      bound). Outcome masses are
      w p and w q (plus the rest / label outcome as the tail says). This path is plain PyTorch autograd
      (the bounds need gradients). The ``renormalize`` and ``label`` tails gather the student's kept
      columns before any arithmetic (no [N, V] tensor but the gradient; with labels, one zero-filled copy
      of the teacher rows masks ignored rows); ``tail="bucket"`` holds the student's fp32 [N, V] softmax.
    * ``eval()``: the hard mask and the fused kernel path (``impl``); bounds are not trained.

    The MLP's initial bounds are about [0.0025, 0.98]. Alone, the clipped loss favours narrow kept sets
    (a single renormalised token gives zero loss), so combine it with the full-vocabulary or hard-label
    loss, or a bound regulariser, as the training recipe requires.

    ``forward(student_logits [..., V], teacher_logits [..., V], labels=None, normalizer=None) -> fp32 loss``
    (``normalizer`` replaces the count of ``mean``, as in every loss, e.g. ``num_items_in_batch``).

    Args:
        vocab_top_m: m, the number of top teacher probabilities the MLP reads and the most tokens kept per row.
        hidden: the MLP's hidden width.
        tail, divergence, temperature, ignore_index, reduction, vocab_size, impl: as in :func:`topk_kl_div`
            (``impl`` applies in ``eval()``).
        sharpness: s of the soft membership weight in ``train()`` (above).
    """

    def __init__(
        self,
        vocab_top_m: int = 256,
        hidden: int = 64,
        tail: str = "renormalize",
        divergence: str = "forward",
        temperature: float = 1.0,
        sharpness: float = 50.0,
        ignore_index: int = -100,
        reduction: str = "mean",
        vocab_size: Optional[int] = None,
        impl: Impl = "auto",
    ) -> None:
        super().__init__()
        vocab_top_m = check_int("vocab_top_m", vocab_top_m, low=1)
        hidden = check_int("hidden", hidden, low=1)
        check_choice("tail", tail, TAILS)
        check_choice("divergence", divergence, TOPK_DIVERGENCES)
        check_choice("reduction", reduction, ("mean", "sum", "none"))
        check_number("temperature", temperature, low=0.0, low_inclusive=False)
        check_number("sharpness", sharpness, low=0.0, low_inclusive=False)
        check_index("ignore_index", ignore_index)
        check_choice("impl", impl, IMPLS)
        vocab_size = check_vocab_size(vocab_size)
        self._vocab_top_m = vocab_top_m
        self.tail = tail
        self.divergence = divergence
        self.temperature = float(temperature)
        self.sharpness = float(sharpness)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.vocab_size = vocab_size
        self.impl = impl
        self.bound_net = torch.nn.Sequential(
            torch.nn.Linear(vocab_top_m, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 2)
        )
        with torch.no_grad():
            self.bound_net[2].weight.mul_(0.1)
            self.bound_net[2].bias.copy_(torch.tensor([-6.0, 4.0]))  # (l, u): lower ~ 0.0025, upper ~ 0.98

    @property
    def vocab_top_m(self) -> int:
        """m: it sizes the bound MLP's input layer, so it is fixed at construction."""
        return self._vocab_top_m

    @vocab_top_m.setter
    def vocab_top_m(self, value: object) -> None:
        # (Assigning another m failed later in the MLP's matmul, "mat1 and mat2 shapes cannot be multiplied".)
        if value != self._vocab_top_m:
            raise ValueError(f"vocab_top_m sizes the bound MLP's input layer ({self._vocab_top_m} inputs) and cannot "
                             f"change after construction (build another DACKLLoss), got {value!r}")

    def _candidates(self, teacher_rows: Tensor, backend: str) -> tuple[Tensor, Tensor]:
        """Top-m teacher tokens sorted by probability: (indices [N, m], log-probs at T [N, m] fp32), from rows
        ``[N, V]`` or row groups ``[G, R, V]`` (one group at a time, each a 2-D view read in place)."""
        if teacher_rows.dim() == 3:
            return _per_row_group(teacher_rows, lambda group, rows: self._candidates(group, backend))
        count = min(self.vocab_top_m, teacher_rows.shape[-1])
        values, indices = dense_candidates(teacher_rows, count, need_order=True, backend=backend)
        stats = torch.ops.distill_ops.topk_kl_teacher_lse(teacher_rows, self.temperature, backend)
        return indices.contiguous(), _teacher_logprobs(values, stats, self.temperature)

    def _bounds(self, sorted_logprobs: Tensor) -> tuple[Tensor, Tensor]:
        features = sorted_logprobs.exp()
        if features.shape[-1] < self.vocab_top_m:  # vocabulary smaller than m: pad with zero mass
            features = torch.nn.functional.pad(features, (0, self.vocab_top_m - features.shape[-1]))
        raw = self.bound_net(features.to(self.bound_net[0].weight.dtype)).to(torch.float32)
        upper = torch.sigmoid(raw[:, 1])
        lower = upper * torch.sigmoid(raw[:, 0])
        return lower, upper

    def predict_bounds(self, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
        """The bounds the MLP predicts: ``(lower, upper)``, each fp32 ``[...]`` (the teacher's leading dims)."""
        check_tensor("teacher_logits", teacher_logits, min_dim=1)
        backend = resolve_impl(self.impl, teacher_logits.device)
        width = teacher_logits.shape[-1]
        width = _check_own_vocab_size(self.vocab_size, width, "teacher_logits")
        rows = as_rows(teacher_logits.detach(), width)
        _, sorted_logprobs = self._candidates(rows, backend)
        lower, upper = self._bounds(sorted_logprobs)
        return lower.reshape(teacher_logits.shape[:-1]), upper.reshape(teacher_logits.shape[:-1])

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        labels: Optional[Tensor] = None,
        normalizer: float | Tensor | None = None,
    ) -> Tensor:
        check_index("ignore_index", self.ignore_index)
        if self.training:  # an attribute set after the module was built (NaN made the loss NaN)
            check_number("sharpness", self.sharpness, low=0.0, low_inclusive=False)
        _, _, vocab = _check_args(
            student_logits, teacher_logits, None, None, None, 0.0, 1.0, self.tail, self.divergence,
            self.temperature, labels, self.reduction, normalizer, DEFAULT_MAX_CANDIDATES, self.vocab_size,
        )
        backend = resolve_impl(self.impl, student_logits.device)
        if not self.training:  # the hard mask's kernel (training runs PyTorch autograd)
            backend = _kept_backend(self.impl, backend, min(self.vocab_top_m, vocab), "a smaller vocab_top_m")
        leading_shape = student_logits.shape[:-1]
        label_rows = flat_labels(labels)
        if self.tail == "label":
            check_label_values(label_rows, self.ignore_index, vocab, "with tail='label'")
        active = None if label_rows is None else label_rows != self.ignore_index
        # Row groups: shifted logits of a batch (logits[:, :-1]) are read in place, not copied.
        student_rows, teacher_rows = as_row_groups((student_logits, teacher_logits.detach()), vocab)
        if self.training and active is not None:
            # Ignored rows (padding) may hold anything, NaN included; in the autograd path below a NaN there
            # would reach the bound network's and the student's gradients through 0 * NaN, so the teacher's are
            # replaced by zeros before anything is computed from them (the student's where they are read, by
            # _clipped_divergence_rows).
            teacher_rows = torch.where(active.view(*teacher_rows.shape[:-1], 1), teacher_rows, 0.0)
        indices, sorted_logprobs = self._candidates(teacher_rows, backend)
        lower, upper = self._bounds(sorted_logprobs)
        if not self.training:
            teacher_logprobs = kept_logprobs(sorted_logprobs, lower.detach(), upper.detach()).contiguous()
            return _reduce_op_rows(
                student_rows, indices, teacher_logprobs, label_rows, self.tail, self.divergence, self.temperature,
                self.ignore_index, backend, self.reduction, normalizer, leading_shape, student_logits.requires_grad,
            )
        log_weights = log_soft_membership(sorted_logprobs, lower, upper, self.sharpness)
        safe_labels = None
        if label_rows is not None:
            safe_labels = torch.where(active, label_rows, 0).clamp(0, vocab - 1)
        rows = _clipped_divergence_rows(
            student_rows, indices, sorted_logprobs, log_weights, safe_labels, self.tail, self.divergence,
            self.temperature, active,
        )
        # Selected after the weight: a zero normalizer makes it inf, and inf * 0 is NaN.
        return reduce_rows(rows, active, self.reduction, normalizer, leading_shape)

    def extra_repr(self) -> str:
        return (
            f"vocab_top_m={self.vocab_top_m}, tail={self.tail!r}, divergence={self.divergence!r}, "
            f"temperature={self.temperature}, sharpness={self.sharpness}, ignore_index={self.ignore_index}, "
            f"reduction={self.reduction!r}, vocab_size={self.vocab_size}, impl={self.impl!r}"
        )
