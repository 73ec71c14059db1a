"""Top-k / clipped divergences against a sparse teacher (one program per row), and a row log-sum-exp.

``_topk_kl_fwd_kernel`` receives, per row, the kept teacher entries: ``indices [N, K]`` (int64) and
``teacher_logprobs [N, K]`` (fp32 log-probabilities with full-vocabulary mass semantics, already at
the temperature; ``-inf`` marks an entry that is not kept). The K entries are loaded whole (K is
padded to ``BLOCK_K``, a power of two), the student logits are gathered at their indices, and:

* ``renormalize``: both sides renormalised over the kept set (K outcomes).
* ``label``: the label token is kept too; it receives the teacher mass that the other kept tokens
  leave (1 - sum of their probabilities); both sides renormalised over the K + 1 outcomes.
* ``bucket``: K kept outcomes plus one rest bucket; the student uses its full-vocabulary softmax,
  so the row is streamed once for its sum of exponentials relative to the largest kept logit (compensated
  per-lane sums, combined in fp64: the rest mass is that total minus the kept terms, bit-identical ones).

The gradient pass writes the whole student gradient row: zeros (``renormalize`` / ``label``) or the
rest bucket's share q_j * c (``bucket``), then, after a CTA barrier so that those stores are visible,
the kept entries' values are scattered over it. Ignored rows (label == ignore_index) get loss 0 and
a zero gradient row.

``_row_logsumexp_kernel`` streams a row once for its max m and log-sum-exp((x - m) / T) (the dense
teacher's normaliser).

Logits far from 0 (|z| ~ 1e4, where one fp32 step is 1e-3): every log-probability is formed from differences
of raw logits taken before the temperature divides them, never as (z / T) - lse of two large numbers; the
student side is shifted by its largest kept logit c (``(z - c) / T``), the teacher's log-probabilities come as
``(x - m) / T - log-sum``. With the plain form the rounding of lse (about 5e-4) exceeded small leftover masses,
which then rounded to 0 and made a reverse or forward KL infinite.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._device import on_input_device
from ._launch import LAUNCH_OPTIONS
from .kl_div import zero_fill_row

RENORMALIZE, BUCKET, LABEL = range(3)
TAIL_CODES = {"renormalize": RENORMALIZE, "bucket": BUCKET, "label": LABEL}
FORWARD, REVERSE = range(2)
DIVERGENCE_CODES = {"forward": FORWARD, "reverse": REVERSE}

# Streaming block over the vocabulary (gradient pass, bucket log-sum-exp) and warps. The kept
# entries live in registers: BLOCK_K up to 4096 needs 16 warps to stay spill-free (compile_check).
# Not yet tuned on a GPU (benchmarks/bench_topk_kl.py times the defaults).
BLOCK_V = 4096
MAX_BLOCK_K = 4096
LSE_BLOCK_V = 4096
LSE_NUM_WARPS = 8
# Floors of the leftover masses: the teacher's (1 - its kept mass) at TEACHER_RESOLUTION * sum p |log p| over its
# kept entries (the rounding of fp32 log-probabilities), the student's (fp64 rounding leaves ~1e-15 of the row's
# mass) and both at least REST_Q_FLOOR: distill_ops.topk_kl's constants (the same values; a test checks).
TEACHER_RESOLUTION = tl.constexpr(2.0**-20)
REST_Q_FLOOR = tl.constexpr(1e-10)
# Kept-set widths whose teacher leftover is summed from fp64 exponentials (see _teacher_leftover).
FP64_LEFTOVER_MAX_K = tl.constexpr(2048)


def block_k_for(k: int) -> int:
    return max(16, triton.next_power_of_2(max(k, 1)))


def num_warps_for(block_k: int, tail: str) -> int:
    # bucket streams the student row with per-lane statistics on top of the kept entries: 32 warps, the
    # only count spill-free at every BLOCK_K in both variants under Triton 3.6 and 3.9 (16 left ptxas
    # spilling 8-16 bytes at BLOCK_K 64 / 1024 and Triton 3.9 spilling at 4096; see
    # benchmarks/compile_check.py for the variants).
    if tail == "bucket":
        return 32
    return 16 if block_k >= 2048 else 8


@triton.jit
def _teacher_leftover(a, kept):
    """(leftover, floor) of the teacher's kept log-masses ``a`` (-inf where not ``kept``): 1 - sum p with every p
    exponentiated and summed in fp64 (as the PyTorch path does; up to FP64_LEFTOVER_MAX_K entries), so that a
    confident teacher's leftover (p_top = 1 - 1e-10, its log-probability -1e-10 exact in fp32) is resolved, not
    rounded to 0, and carries no fp32 rounding of the other masses (a 1.25e-6 leftover was 1.7e-4 off in a reverse
    bucket loss when they were summed in fp32); and its floor, the log-probabilities' own fp32 rounding
    (2^-24 |log p| each): TEACHER_RESOLUTION times sum p |log p| over the kept entries, at least REST_Q_FLOOR."""
    p_all = tl.where(kept, tl.exp(a), 0.0)
    if a.shape[0] <= FP64_LEFTOVER_MAX_K:
        leftover = (1.0 - tl.sum(tl.where(kept, tl.exp(a.to(tl.float64)), 0.0), axis=0)).to(tl.float32)
    else:
        # 4096 kept entries: fp64 exponentials of all of them spilled registers (the bucket tail under Triton 3.9);
        # the top mass in fp64, the others (the fp32 exponentials' rounding, ~2^-24 of their sum) in fp32.
        a_top = tl.max(a, axis=0)
        others = tl.sum(tl.where(a < a_top, p_all, 0.0), axis=0)
        others += (tl.sum(tl.where(a == a_top, 1.0, 0.0), axis=0) - 1.0) * tl.exp(a_top)
        leftover = ((1.0 - tl.exp(a_top.to(tl.float64))) - others.to(tl.float64)).to(tl.float32)
    mass = tl.sum(p_all, axis=0)
    leftover = tl.where(mass == mass, leftover, mass)  # a NaN entry reaches the loss, wherever it is
    leftover = tl.where(leftover < 0.0, 0.0, leftover)  # keeps NaN (NaN < 0 is false)
    # The tensor on the left: under the CPU interpreter a module-level constexpr on the left of an operator returns a
    # constexpr wrapping the tensor, which Triton 3.8's tl.maximum refuses ("cannot convert ... to tensor").
    floor = tl.maximum(tl.sum(tl.where(kept, p_all * tl.abs(a), 0.0), axis=0) * TEACHER_RESOLUTION, REST_Q_FLOOR)
    return leftover, floor


@triton.jit
def _topk_kl_fwd_kernel(
    student_ptr,
    indices_ptr,
    teacher_ptr,
    labels_ptr,
    weight_ptr,
    loss_ptr,
    grad_ptr,
    stride_student,
    stride_indices,
    stride_teacher,
    stride_weight,
    stride_grad,
    V,
    K,
    ignore_index,
    inv_temperature,
    TAIL: tl.constexpr,
    DIVERGENCE: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    student_row = student_ptr + row * stride_student
    grad_row = grad_ptr + row * stride_grad
    offsets_v = tl.arange(0, BLOCK_V)

    active = True
    label = 0
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        active = label != ignore_index

    if active:
        offsets_k = tl.arange(0, BLOCK_K)
        in_k = offsets_k < K
        log_p = tl.load(teacher_ptr + row * stride_teacher + offsets_k, mask=in_k, other=float("-inf"))
        index = tl.load(indices_ptr + row * stride_indices + offsets_k, mask=in_k, other=0).to(tl.int64)
        # NaN teacher entries stay "kept" (NaN != -inf) so that NaN reaches the loss.
        kept = log_p != float("-inf")
        if TAIL == 2:
            # The label's own entry moves to the label outcome (it gets the leftover mass there).
            kept = kept & (index != label)
        index_ok = (index >= 0) & (index < V)
        z_raw = tl.load(student_row + index, mask=kept & index_ok, other=float("-inf")).to(tl.float32)
        # Shift: the largest kept logit (0 when none is finite; NaN stays in z and so reaches the loss).
        shift = tl.max(z_raw, axis=0)
        shift = tl.where((shift > float("-inf")) & (shift < float("inf")), shift, 0.0)
        z = (z_raw - shift) * inv_temperature
        a = tl.where(kept, log_p, float("-inf"))  # teacher log-mass per kept outcome
        b = tl.where(kept, z, float("-inf"))  # student scaled logits per kept outcome

        # Extra scalar outcome: the label (label tail) or the rest bucket (bucket tail).
        max_b = tl.max(b, axis=0)
        sum_b = tl.sum(tl.exp(b - max_b), axis=0)
        # The log-sum-exp of the kept student logits: -inf when nothing is kept (a row of padding), not NaN.
        lse_b = tl.where(max_b == float("-inf"), float("-inf"), max_b + tl.log(sum_b))

        lse_all = 0.0
        live = 1.0  # 0.0: the bucket's student mass is floored, a constant the gradient leaves out
        if TAIL == 1:
            # Student full-vocabulary sum of exp(x), streamed once. The reference is the largest kept scaled
            # logit (x = 0 there), not a running max: each term exp(x) is then bit-identical to the same column's
            # term among the kept entries, so the rest mass is the difference of two sums of the same fp32 terms,
            # resolved to fp64 rounding (per-lane compensated sums, combined in fp64): ~1e-15 of the row's mass,
            # where 1 - (kept mass) in fp32 lost rest masses below ~1e-6. One exp per element (the running max
            # took two).
            run_sum = tl.zeros([BLOCK_V], tl.float32)
            run_comp = tl.zeros([BLOCK_V], tl.float32)  # Kahan: the lane's sum is run_sum - run_comp
            for start in range(0, V, BLOCK_V):
                cols = start + offsets_v
                x = tl.load(student_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
                term = tl.exp((x - shift) * inv_temperature) - run_comp
                new_sum = run_sum + term
                run_comp = (new_sum - run_sum) - term
                run_sum = new_sum
            total = tl.sum(run_sum.to(tl.float64) - run_comp.to(tl.float64), axis=0)
            # A finite, non-zero total (0: no kept logit is finite and every term underflowed; a row of padding).
            if (total > 0.0) & (total < 1.0e38):
                kept_total = tl.sum(tl.exp(b).to(tl.float64), axis=0)
                lse_all = tl.log(total.to(tl.float32))
                # The difference in fp64, the ratio in fp32 (fp64 division is a subroutine call: a stack frame).
                # Nothing kept: exactly 1 (a GPU's fp32 division, x * rcp(x), gives 1 - 2^-24 or 1 + 2^-23 for
                # some x, a loss of +-1e-7 where it is 0; a numerics audit, 2026-12-07).
                rest_q = tl.where(kept_total == 0.0, 1.0,
                                  (total - kept_total).to(tl.float32) / total.to(tl.float32))
            else:
                # exp overflowed (a logit ~88·T above every kept one; the kept set then holds less than K·e^-88 of
                # the mass, so 1 - that is exact) or underflowed to 0, or the row holds NaN / inf: the sum again,
                # relative to the row's max.
                run_max = tl.full([BLOCK_V], float("-inf"), tl.float32)
                for start in range(0, V, BLOCK_V):
                    cols = start + offsets_v
                    x = tl.load(student_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
                    run_max = tl.maximum(run_max, (x - shift) * inv_temperature)
                row_max = tl.max(run_max, axis=0)
                run_sum = tl.zeros([BLOCK_V], tl.float32)
                for start in range(0, V, BLOCK_V):
                    cols = start + offsets_v
                    x = tl.load(student_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
                    run_sum += tl.exp((x - shift) * inv_temperature - row_max)
                lse_all = row_max + tl.log(tl.sum(run_sum, axis=0))
                rest_q = 1.0 - tl.exp(lse_b - lse_all)
            log_q = b - lse_all
            p = tl.where(kept, tl.exp(a), 0.0)
            log_p_kept = a
            rest_q = tl.where(rest_q < 0.0, 0.0, rest_q)  # keeps NaN
            leftover_p, floor_p = _teacher_leftover(a, kept)
            # Both rest masses below their floors: the bucket is empty (e.g. k = V). Otherwise each reads as at
            # least its floor (a 0 against the other side's mass gave inf); a floored student mass is a constant:
            # the gradient leaves it out (``live``).
            negligible = (leftover_p < floor_p) & (rest_q < REST_Q_FLOOR)
            live = tl.where(negligible, 1.0, tl.where(rest_q < REST_Q_FLOOR, 0.0, 1.0))
            x_p = tl.where(negligible, 0.0, tl.where(leftover_p < floor_p, floor_p, leftover_p))
            x_q = tl.where(negligible, 0.0, tl.where(rest_q < REST_Q_FLOOR, REST_Q_FLOOR, rest_q))
            x_log_p = tl.log(x_p)
            x_log_q = tl.log(x_q)
        else:
            if TAIL == 2:
                label_ok = (label >= 0) & (label < V)
                z_label = tl.load(student_row + label, mask=label_ok, other=float("nan")).to(tl.float32)
                z_label = (z_label - shift) * inv_temperature
                leftover_p, floor_p = _teacher_leftover(a, kept)
                x_a = tl.log(tl.where(leftover_p < floor_p, floor_p, leftover_p))  # floored, as the bucket's
                max_a = tl.maximum(tl.max(a, axis=0), x_a)
                lse_a = max_a + tl.log(tl.sum(tl.exp(a - max_a), axis=0) + tl.exp(x_a - max_a))
                max_bl = tl.maximum(max_b, z_label)
                lse_b = max_bl + tl.log(tl.sum(tl.exp(b - max_bl), axis=0) + tl.exp(z_label - max_bl))
                x_log_p = x_a - lse_a
                x_log_q = z_label - lse_b
                x_p = tl.exp(x_log_p)
                x_q = tl.exp(x_log_q)
            else:
                max_a = tl.max(a, axis=0)
                lse_a = max_a + tl.log(tl.sum(tl.exp(a - max_a), axis=0))
                x_p = 0.0
                x_q = 0.0
                x_log_p = 0.0
                x_log_q = 0.0
            log_p_kept = a - lse_a
            log_q = b - lse_b
            p = tl.where(kept, tl.exp(log_p_kept), 0.0)
        q = tl.where(kept, tl.exp(log_q), 0.0)

        if DIVERGENCE == 0:  # KL(P || Q) over the outcomes
            total_p = tl.sum(p, axis=0) + live * x_p
            ratio = tl.where(p > 0.0, log_p_kept - log_q, 0.0)
            x_ratio = tl.where(x_p > 0.0, x_log_p - x_log_q, 0.0)
            loss = tl.sum(p * ratio, axis=0) + x_p * x_ratio
            # dL/dz_j = q_j (g_o - S) over the live outcomes, g_o = -P_o / Q_o, S = -sum P.
            grad_kept = q * total_p - p
            x_grad_coef = tl.where(x_q > 0.0, total_p - live * x_p / x_q, 0.0)  # per unit of student mass
            # The label's gradient as Q total_p - P (x_q times the coefficient was 0 or -inf once x_q underflowed).
            x_grad_mass = x_q * total_p - live * x_p
        else:  # KL(Q || P)
            ratio = tl.where(q > 0.0, log_q - log_p_kept, 0.0)
            x_ratio = tl.where(x_q > 0.0, x_log_q - x_log_p, 0.0)
            kept_sum = tl.sum(q * ratio, axis=0)
            loss = kept_sum + x_q * x_ratio
            # g_o = log Q_o - log P_o + 1, S = sum over the live outcomes of Q_o g_o = s + (their student mass),
            # that mass 1 - left_out: the +1 and the mass cancel in g_o - S = log-ratio - s + left_out (summed in,
            # they cost every entry ~6e-8 of q_j; a review, 2026-12-07). left_out: the bucket's rest mass where it is
            # floored or negligible, else 0 (the PyTorch path's form).
            s = kept_sum + live * x_q * x_ratio
            left_out = 0.0
            if TAIL == 1:
                left_out = tl.where((live == 0.0) | negligible, rest_q, 0.0)
            grad_kept = tl.where(q > 0.0, q * (ratio - (s - left_out)), 0.0)
            x_grad_coef = live * x_ratio - s + left_out + (live - 1.0)
            x_grad_mass = x_q * x_grad_coef
        # The top outcome (the largest student mass: a kept entry, or the bucket's rest / the label where larger) is
        # rewritten as minus the others' sum (a divergence's gradient in the student's logits sums to 0): its own
        # formula cancels for a confident student (q - p, q (g - S) with S ~ g: up to 3.6e-2 of the row's largest
        # entry; a review, 2026-12-07), where the others are small terms that keep their digits. A NaN stays NaN.
        top_q = tl.max(q, axis=0)
        top_pos = tl.argmax(q, axis=0)
        others = tl.sum(tl.where(offsets_k == top_pos, 0.0, grad_kept), axis=0)
        top_grad = tl.sum(tl.where(offsets_k == top_pos, grad_kept, 0.0), axis=0)
        if TAIL == 1:
            x_mass = rest_q
            x_total = rest_q * x_grad_coef
        elif TAIL == 2:
            x_mass = x_q
            x_total = x_grad_mass
        else:
            x_mass = 0.0
            x_total = 0.0
        kept_top = top_q >= x_mass
        # Nested, not kept_top & (...): a scalar comparison is typed fp32 by Triton 3.6's CPU interpreter, which
        # then cannot `&` it (a plain TRITON_INTERPRET=1 run crashed; the tests' conftest relabels comparisons).
        grad_kept = tl.where(offsets_k == top_pos, tl.where(kept_top, -(others + x_total), grad_kept), grad_kept)
        if TAIL == 1:  # the rest's columns get q_j c: c from the rewritten mass (rest_q >= 1 / (K + 1) there)
            x_grad_coef = tl.where(kept_top, x_grad_coef, -(others + top_grad) / rest_q)
        if TAIL == 2:
            x_grad_mass = tl.where(kept_top, x_grad_mass, -(others + top_grad))
        # The reduction's weight (1/count for "mean") is folded into loss and gradient, so that
        # backward usually receives an incoming gradient of exactly 1 and moves no [N, V] bytes.
        row_weight = tl.load(weight_ptr + row * stride_weight)
        tl.store(loss_ptr + row, loss * row_weight)
        grad_scale = inv_temperature * row_weight

        if COMPUTE_GRAD:
            for start in range(0, V, BLOCK_V):
                cols = start + offsets_v
                mask = cols < V
                if TAIL == 1:
                    x = tl.load(student_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
                    q_rest = tl.exp((x - shift) * inv_temperature - lse_all)
                    values = tl.where(q_rest == 0.0, 0.0, q_rest * x_grad_coef) * grad_scale
                else:
                    values = tl.zeros([BLOCK_V], tl.float32)
                tl.store(grad_row + cols, values.to(grad_ptr.dtype.element_ty), mask=mask)
            # The kept entries overwrite what the streaming pass wrote at their columns: make those
            # stores visible to every thread of the CTA first.
            tl.debug_barrier()
            tl.store(
                grad_row + index,
                (grad_kept * grad_scale).to(grad_ptr.dtype.element_ty),
                mask=kept & index_ok,
            )
            if TAIL == 2:
                x_grad = x_grad_mass * grad_scale
                tl.store(grad_row + label, x_grad.to(grad_ptr.dtype.element_ty), mask=label_ok)
    else:
        tl.store(loss_ptr + row, 0.0)
        if COMPUTE_GRAD:
            zero_fill_row(grad_row, V, BLOCK_V)


@triton.jit
def _row_logsumexp_kernel(x_ptr, max_ptr, logsum_ptr, stride_x, V, inv_temperature, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    offsets = tl.arange(0, BLOCK_V)
    # Per lane: the max of the raw logits (T > 0 keeps the order) and the sum of exp((x - max) / T) over the lane's
    # other elements, the max's own term (exactly 1) kept apart, so that log-sum = log(1 + rest) resolves a rest far
    # below fp32's step at 1 (a confident teacher's top log-probability -1e-10 read 0 and its leftover mass 0). One
    # exp per element. The max starts at -inf: a finite floor would count as a term of its own where a row's logits
    # do not rise above it (a floor of -1e30 against a row masked with finfo.min: log-sum -inf, a NaN loss); the
    # first finite logit's step from -inf is exp(-inf) = 0, and a -inf logit adds nothing.
    run_max = tl.full([BLOCK_V], float("-inf"), tl.float32)
    run_rest = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + offsets
        x = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        step = tl.where(x == float("-inf"), 0.0, tl.exp(-tl.abs(x - run_max) * inv_temperature))
        above = x > run_max
        run_rest = tl.where(above, (run_rest + 1.0) * step, run_rest + step)
        run_max = tl.where(above, x, run_max)
    row_max = tl.max(run_max, axis=0)
    lane_scale = tl.exp((run_max - row_max) * inv_temperature)
    # Every lane's rest, and every lane's max but one lane holding the row's (its term is the 1).
    rest = tl.sum(run_rest * lane_scale, axis=0)
    rest += tl.sum(tl.where(offsets != tl.argmax(run_max, axis=0), lane_scale, 0.0), axis=0)
    # log1p(rest) in fp64: its cubic below 2^-20 (relative error rest^3 / 4), where log(1 + rest) would keep only
    # ~1e-16 of rest (a rest of 1e-13 off by 3e-4, one of 1e-27 read 0); log(1 + rest) above (relative error < 1e-9).
    rest64 = rest.to(tl.float64)
    logsum = tl.where(rest64 < 0.00000095367431640625, rest64 * (1.0 - rest64 * (0.5 - rest64 / 3.0)),
                      tl.log(1.0 + rest64)).to(tl.float32)
    tl.store(max_ptr + row, row_max)
    tl.store(logsum_ptr + row, tl.where(row_max > float("-inf"), logsum, float("-inf")))  # a row of -inf: log 0


@on_input_device
def topk_kl_forward(
    student: torch.Tensor,
    indices: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    labels: torch.Tensor | None,
    grad_out: torch.Tensor | None,
    row_weight: torch.Tensor,
    *,
    tail: str,
    divergence: str,
    temperature: float,
    ignore_index: int,
    block_v: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Launch the sparse-teacher row kernel; returns the per-row loss (fp32 [N], 0 at ignored rows).

    ``student [N, V]`` (unit column stride), ``indices [N, K]`` int64 and ``teacher_logprobs [N, K]``
    fp32 (unit column stride, -inf = not kept, K <= MAX_BLOCK_K), ``labels [N]`` int64 or None
    (required for ``tail="label"``). ``row_weight`` (fp32, [N] or one element broadcast) multiplies each
    row's loss and gradient. Writes d(weighted row loss)/dz into ``grad_out [N, V]`` when given.
    """
    num_rows, vocab = student.shape
    k = indices.shape[1]
    block_k = block_k_for(k)
    if block_k > MAX_BLOCK_K:
        raise ValueError(f"the Triton top-k kernel supports k <= {MAX_BLOCK_K}, got {k}")
    loss = torch.empty(num_rows, dtype=torch.float32, device=student.device)
    if num_rows == 0:
        return loss
    _topk_kl_fwd_kernel[(num_rows,)](
        student,
        indices,
        teacher_logprobs,
        labels if labels is not None else indices,
        row_weight,
        loss,
        grad_out if grad_out is not None else student,
        student.stride(0),
        indices.stride(0),
        teacher_logprobs.stride(0),
        row_weight.stride(0) if row_weight.numel() > 1 else 0,
        grad_out.stride(0) if grad_out is not None else 0,
        vocab,
        k,
        ignore_index,
        1.0 / temperature,
        TAIL=TAIL_CODES[tail],
        DIVERGENCE=DIVERGENCE_CODES[divergence],
        HAS_LABELS=labels is not None,
        COMPUTE_GRAD=grad_out is not None,
        BLOCK_K=block_k,
        BLOCK_V=block_v or BLOCK_V,
        num_warps=num_warps or num_warps_for(block_k, tail), **LAUNCH_OPTIONS,
    )
    return loss


@on_input_device
def row_logsumexp(rows: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 ``[2, N]``: each row's max m of ``rows [N, V]`` (unit column stride) and log-sum-exp((x - m) / T),
    streamed once; log-sum-exp(x / T) = m / T + that, kept apart for accuracy at large |x|."""
    num_rows, vocab = rows.shape
    out = torch.empty(2, num_rows, dtype=torch.float32, device=rows.device)
    if num_rows == 0:
        return out
    _row_logsumexp_kernel[(num_rows,)](
        rows, out[0], out[1], rows.stride(0), vocab, 1.0 / temperature, BLOCK_V=LSE_BLOCK_V,
        num_warps=LSE_NUM_WARPS, **LAUNCH_OPTIONS,
    )
    return out


def aot_specs() -> list[dict]:
    specs = []
    configs = [(tail, divergence, 1024, "bf16") for tail in TAIL_CODES for divergence in DIVERGENCE_CODES]
    configs += [("bucket", "reverse", MAX_BLOCK_K, "bf16"), ("label", "forward", MAX_BLOCK_K, "fp32"),
                ("renormalize", "forward", 16, "bf16"), ("bucket", "forward", 64, "bf16")]
    for tail, divergence, block_k, dtype in configs:
        specs.append(
            {
                "name": f"topk_kl_fwd[{tail},{divergence},K{block_k},{dtype}]",
                "fn": _topk_kl_fwd_kernel,
                "signature": {
                    "student_ptr": f"*{dtype}",
                    "indices_ptr": "*i64",
                    "teacher_ptr": "*fp32",
                    "labels_ptr": "*i64",
                    "weight_ptr": "*fp32",
                    "loss_ptr": "*fp32",
                    "grad_ptr": f"*{dtype}",
                    "stride_student": "i64",
                    "stride_indices": "i64",
                    "stride_teacher": "i64",
                    "stride_weight": "i64",
                    "stride_grad": "i64",
                    "V": "i32",
                    "K": "i32",
                    "ignore_index": "i64",
                    "inv_temperature": "fp32",
                },
                "constexprs": {
                    "TAIL": TAIL_CODES[tail],
                    "DIVERGENCE": DIVERGENCE_CODES[divergence],
                    "HAS_LABELS": True,
                    "COMPUTE_GRAD": True,
                    "BLOCK_K": block_k,
                    "BLOCK_V": BLOCK_V,
                },
                "num_warps": num_warps_for(block_k, tail),
                "num_stages": 3,
            }
        )
    for dtype in ("bf16", "fp32"):
        specs.append(
            {
                "name": f"topk_kl_row_logsumexp[{dtype}]",
                "fn": _row_logsumexp_kernel,
                "signature": {"x_ptr": f"*{dtype}", "max_ptr": "*fp32", "logsum_ptr": "*fp32", "stride_x": "i64",
                              "V": "i32", "inv_temperature": "fp32"},
                "constexprs": {"BLOCK_V": LSE_BLOCK_V},
                "num_warps": LSE_NUM_WARPS,
                "num_stages": 3,
            }
        )
    return specs
