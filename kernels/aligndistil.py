"""AlignDistil's token-adaptive extrapolated reverse KL, streamed over the vocabulary (one program per row).

Per row, with s / d / o the student / DPO / other logits (``other`` = reverse-DPO in contrastive mode, reference in
reference mode), ``base`` = d (contrastive) or o (reference), T the temperature:

    alpha = r * sum_j |softmax(d)_j - softmax(o)_j| + eps        (adaptive; or a fixed alpha)
    teacher z* = base + alpha (d - o)                              (-inf wherever d or o is -inf)
    loss = (beta0 / alpha) KL(q || p),  q = softmax(s / T),  p = softmax(z* / T)

Pass structure (each pass streams the row in BLOCK_V chunks with per-lane online statistics):

1. (adaptive only) reads d, o: log-sum-exps of both at temperature 1, and the DPO model's top token.
2. reads s, d, o: the TVD (needs pass 1's log-sum-exps, so it cannot share pass 1; summed as twice one side of
   p - p', the side that leaves the DPO model's top token out, where p - p' cancels) and the student's online
   statistics: its log-sum-exp and the two q-weighted sums E_q[s - base] and E_q[d - o]. Because a - b =
   ((s - base) - alpha (d - o)) / T is linear in alpha, E_q[a - b] = (E_q[s - base] - alpha E_q[d - o]) / T is
   known as soon as alpha is, without a pass over the teacher at alpha.
3. reads s, d, o: writes dL/dz_s = (beta0 / alpha) q ((a - b) - E_q[a - b]) / T (log-sum-exps cancelled, as in
   ``kl_div``'s reverse KL; the student's top token's entry, where that cancels, is rewritten after the pass as minus
   the others' sum) and, in the same pass, accumulates the teacher's log-sum-exp at alpha, which only the loss
   needs: loss = (beta0 / alpha) (E_q[a - b] - lse(a) + lse(b)).

Traffic per row: 9 V elements (adaptive: 2 + 3 + 3 reads and the gradient write) or 7 V (fixed alpha) against 12 V
for the unfused order (statistics, TVD, teacher statistics, gradient). Ignored rows (label == ignore_index) get loss
0, alpha 0 and a zero gradient row without reading the logits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._device import on_input_device
from ._launch import LAUNCH_OPTIONS
from .kl_div import zero_fill_row

# Default launch configuration (BLOCK_V elements of each tensor per loop iteration, warps): kl_div's measured
# best on an H200 (small blocks, several programs per SM). Pass 2 keeps five per-lane accumulators next to three
# loaded blocks; spill-free on sm_80 / sm_90a (benchmarks/compile_check.py). benchmarks/bench_aligndistil.py
# sweeps the alternatives.
BLOCK_V = 1024
NUM_WARPS = 4


@triton.jit
def _aligndistil_fwd_kernel(
    student_ptr,
    dpo_ptr,
    other_ptr,
    labels_ptr,
    loss_ptr,
    alpha_ptr,
    grad_ptr,
    weight_ptr,
    stride_student,
    stride_dpo,
    stride_other,
    stride_grad,
    stride_weight,
    rows_per_group,
    stride_student_group,
    stride_dpo_group,
    stride_other_group,
    stride_grad_group,
    V,
    ignore_index,
    inv_temperature,
    beta0,
    r,
    eps,
    fixed_alpha,
    CONTRASTIVE: tl.constexpr,
    ADAPTIVE: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    # Row i is row i % rows_per_group of group i // rows_per_group (e.g. logits[:, :-1] of a batch, in place).
    group = row // rows_per_group
    in_group = row - group * rows_per_group
    student_row = student_ptr + group * stride_student_group + in_group * stride_student
    dpo_row = dpo_ptr + group * stride_dpo_group + in_group * stride_dpo
    other_row = other_ptr + group * stride_other_group + in_group * stride_other
    grad_row = grad_ptr + group * stride_grad_group + in_group * stride_grad
    offsets = tl.arange(0, BLOCK_V)

    active = True
    if HAS_LABELS:
        active = tl.load(labels_ptr + row) != ignore_index

    if active:
        # Running maxima start at a finite floor so exp(m_old - m_new) is defined while a lane has only seen -inf.
        if ADAPTIVE:
            # Pass 1: log-sum-exps of the DPO and the other model at temperature 1, and the DPO model's top token.
            max_d = tl.full([BLOCK_V], -1.0e30, tl.float32)
            max_o = tl.full([BLOCK_V], -1.0e30, tl.float32)
            sum_d = tl.zeros([BLOCK_V], tl.float32)
            sum_o = tl.zeros([BLOCK_V], tl.float32)
            arg_d = tl.zeros([BLOCK_V], tl.int32)  # where the lane's max_d is (its first column)
            for start in range(0, V, BLOCK_V):
                cols = start + offsets
                mask = cols < V
                d = tl.load(dpo_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
                o = tl.load(other_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
                arg_d = tl.where(d > max_d, cols, arg_d)
                new_max_d = tl.maximum(max_d, d)
                new_max_o = tl.maximum(max_o, o)
                sum_d = sum_d * tl.exp(max_d - new_max_d) + tl.exp(d - new_max_d)
                sum_o = sum_o * tl.exp(max_o - new_max_o) + tl.exp(o - new_max_o)
                max_d = new_max_d
                max_o = new_max_o
            row_max_d = tl.max(max_d, axis=0)
            row_max_o = tl.max(max_o, axis=0)
            # log p = (d - row_max_d) - log_total_d: exact near the max (d - lse_d rounded lse_d at |d|).
            log_total_d = tl.log(tl.sum(sum_d * tl.exp(max_d - row_max_d), axis=0))
            log_total_o = tl.log(tl.sum(sum_o * tl.exp(max_o - row_max_o), axis=0))
            # The TVD (pass 2) is twice the sum of p - p' over one sign's terms (both distributions sum to 1): the
            # sign that leaves out the DPO model's top token, where p - p' is a difference of two numbers ~0.9988
            # for confident models near each other, with the rounding of their log-sums at 1 (~1e-7 against a TVD
            # of ~5e-5: alpha 1.6e-3 off, the gradient 1.7e-3 to 2e-3; a review, 2026-12-07). That difference's
            # own sign is known up to the same rounding; a wrong one (|p - p'| below it) costs 2 |p - p'|, at most
            # twice what the plain sum could lose there. Summing |p - p'| off that token plus |the others' sum of
            # p - p'| spilled 8 bytes (sm_90a, bf16, aligned); with a per-block reduction of that sum it did not,
            # at 113-123 registers where this form takes 96.
            top_d = tl.min(tl.where(max_d == row_max_d, arg_d, V), axis=0)
            o_top = tl.load(other_row + top_d, mask=top_d < V, other=float("-inf")).to(tl.float32)
            gap_top = tl.exp(-log_total_d) - tl.exp((o_top - row_max_o) - log_total_o)  # p - p' at top_d
            side = tl.where(gap_top > 0.0, -1.0, 1.0)

        # Pass 2: TVD (adaptive) and the student's statistics: lse(a), E_q[s - base], E_q[d - o].
        # Nothing is divided by T before its row max is subtracted: the student's running max is kept raw, per lane
        # (w = exp((s - m) / T), as in kl_div's kernel) in fixed mode, c the student's row max; in adaptive mode
        # both are shifted by c, the base model's row max from pass 1. The teacher is formed from base - c (the
        # two models' logits share their scale, as distillation has them; a teacher offset from the student by ~1e4
        # would round base - c at that size). Both lse's are then of logits shifted alike, and
        # KL = E_q[(s - base) - alpha gap] / T - lse(a') + lse(b'). Scaling first,
        # lse(a) - lse(b) rounded at |z / T|: a student near its teacher (loss 5e-6) at rows offset to 1e4 lost the
        # loss, the gradient 3e-4 (a review, 2026-12-06). (A first version shifted by the first block's max, which
        # a first block masked with -1e9 made useless: the next review.)
        tvd_acc = tl.zeros([BLOCK_V], tl.float32)  # sum max(side (p - p'), 0), off the DPO model's top token
        if ADAPTIVE:
            # The base model's row max from pass 1: the student is shifted by it before the division, and the
            # running max is kept in scaled units (the raw one, below, spilled 8 bytes here under Triton 3.9). It
            # counts the tokens the other model rules out too: a large logit there (a review put 1e4 on one) rounds
            # the row at that size (1e-3 of the loss at T = 0.05); a max over the teacher's support, and even the
            # scalar min of the two models' row maxima, spilled 8 bytes under Triton 3.6 on sm_90a (bf16, adaptive).
            if CONTRASTIVE:
                c = row_max_d
            else:
                c = row_max_o
            c = tl.where(c <= -1.0e30, 0.0, c)  # a base row of -inf only: no teacher (NaN), any shift will do
        max_s = tl.full([BLOCK_V], -1.0e30, tl.float32)  # of (s - c) / T (adaptive), of s (fixed)
        sum_a = tl.zeros([BLOCK_V], tl.float32)
        acc_shift = tl.zeros([BLOCK_V], tl.float32)  # sum w (s - base), w the student's rescaled exponentials
        acc_gap = tl.zeros([BLOCK_V], tl.float32)  # sum w (d - o)
        for start in range(0, V, BLOCK_V):
            cols = start + offsets
            mask = cols < V
            s = tl.load(student_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
            d = tl.load(dpo_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
            o = tl.load(other_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
            if ADAPTIVE:
                p_gap = tl.exp((d - row_max_d) - log_total_d) - tl.exp((o - row_max_o) - log_total_o)
                p_gap = tl.where(cols == top_d, 0.0, p_gap)
                # NaN-propagating: a NaN logit makes alpha NaN (the default maximum drops a NaN on the GPU).
                tvd_acc += tl.maximum(side * p_gap, 0.0, propagate_nan=tl.PropagateNan.ALL)
            # A token that is -inf in either model is -inf in the teacher: a - b = +inf there (KL is infinite
            # if the student gives it mass) and the (d - o) term does not apply (it would be -inf - -inf).
            teacher_masked = (d == float("-inf")) | (o == float("-inf"))
            if CONTRASTIVE:
                shift = tl.where(teacher_masked, float("inf"), s - d)
            else:
                shift = tl.where(teacher_masked, float("inf"), s - o)
            gap = tl.where(teacher_masked, 0.0, d - o)
            if ADAPTIVE:
                a = (s - c) * inv_temperature
                new_max_s = tl.maximum(max_s, a)
                scale_a = tl.exp(max_s - new_max_s)
                w_a = tl.exp(a - new_max_s)
            else:
                new_max_s = tl.maximum(max_s, s)
                scale_a = tl.exp((max_s - new_max_s) * inv_temperature)
                w_a = tl.exp((s - new_max_s) * inv_temperature)
            sum_a = sum_a * scale_a + w_a
            # A rescale that underflows to 0 drops the old terms, +inf shifts included (0 * inf would be NaN).
            acc_shift = tl.where(scale_a == 0.0, 0.0, acc_shift * scale_a) + tl.where(w_a == 0.0, 0.0, w_a * shift)
            acc_gap = acc_gap * scale_a + tl.where(w_a == 0.0, 0.0, w_a * gap)
            max_s = new_max_s
        if ADAPTIVE:
            alpha = r * (2.0 * tl.sum(tvd_acc, axis=0)) + eps  # TVD: twice one side's sum (pass 1)
        else:
            alpha = fixed_alpha
        if ADAPTIVE:
            row_max_a = tl.max(max_s, axis=0)
            lane_scale_a = tl.exp(max_s - row_max_a)
            total_a = tl.sum(sum_a * lane_scale_a, axis=0)
            lse_a = row_max_a + tl.log(total_a)  # of a' = (s - c) / T
        else:
            c = tl.max(max_s, axis=0)  # the student's row max
            lane_scale_a = tl.exp((max_s - c) * inv_temperature)
            total_a = tl.sum(sum_a * lane_scale_a, axis=0)
            lse_a = tl.log(total_a)  # of a' = (s - c) / T
        mean_shift = tl.sum(acc_shift * lane_scale_a, axis=0)
        if mean_shift != mean_shift:  # a lane holding +inf whose scale underflowed to 0: drop it (0 * inf is NaN)
            mean_shift = tl.sum(tl.where(lane_scale_a == 0.0, 0.0, acc_shift * lane_scale_a), axis=0)
        mean_shift = mean_shift / total_a
        mean_gap = tl.sum(acc_gap * lane_scale_a, axis=0) / total_a
        mean_diff = (mean_shift - alpha * mean_gap) * inv_temperature  # E_q[a - b]
        # beta0 / alpha and the reduction's weight (1/count for "mean", folded in so that backward usually
        # receives an incoming gradient of exactly 1 and has nothing to scale).
        loss_scale = (beta0 / alpha) * tl.load(weight_ptr + row * stride_weight)

        # Pass 3: the gradient (needs no teacher log-sum-exp) and the teacher's log-sum-exp for the loss.
        max_b = tl.full([BLOCK_V], -1.0e30, tl.float32)
        sum_b = tl.zeros([BLOCK_V], tl.float32)
        grad_scale = loss_scale * inv_temperature
        if COMPUTE_GRAD:
            others = tl.zeros([BLOCK_V], tl.float32)  # sum of the unscaled entries off the student's top token
            tops = tl.zeros([BLOCK_V], tl.int32)
            top_col = tl.full([BLOCK_V], V, tl.int32)
        for start in range(0, V, BLOCK_V):
            cols = start + offsets
            mask = cols < V
            d = tl.load(dpo_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
            o = tl.load(other_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
            teacher_masked = (d == float("-inf")) | (o == float("-inf"))
            gap = tl.where(teacher_masked, 0.0, d - o)
            if CONTRASTIVE:
                b = tl.where(teacher_masked, float("-inf"), (d - c) + alpha * gap) * inv_temperature
            else:
                b = tl.where(teacher_masked, float("-inf"), (o - c) + alpha * gap) * inv_temperature
            new_max_b = tl.maximum(max_b, b)
            sum_b = sum_b * tl.exp(max_b - new_max_b) + tl.exp(b - new_max_b)
            max_b = new_max_b
            if COMPUTE_GRAD:
                s = tl.load(student_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
                if CONTRASTIVE:
                    shift = tl.where(teacher_masked, float("inf"), s - d)
                else:
                    shift = tl.where(teacher_masked, float("inf"), s - o)
                a = (s - c) * inv_temperature  # as in pass 2 (adaptive), bit for bit: its max is row_max_a
                q = tl.exp(a - lse_a)
                diff = (shift - alpha * gap) * inv_temperature  # a - b, as accumulated in pass 2
                grad = tl.where(q == 0.0, 0.0, q * (diff - mean_diff))
                # The student's top token: its entry is rewritten after the loop (below).
                if ADAPTIVE:
                    at_top = mask & (a == row_max_a)
                else:
                    at_top = mask & (s == c)
                others += tl.where(mask & ~at_top, grad, 0.0)
                tops += at_top.to(tl.int32)
                top_col = tl.minimum(top_col, tl.where(at_top, cols, V))
                grad = grad * grad_scale
                tl.store(grad_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)
        if COMPUTE_GRAD:
            # At a confident student's top token q (diff - E_q[diff]) cancels (q ~ 1, diff ~ E_q[diff]): 1.1e-3 of
            # the row's largest gradient entry off for rows near their teacher (V = 1000, top logit +14), 6.6e-4
            # against unrelated ones, 7.3e-3 to 8.8e-3 in an 8-token row whose teacher rules the top nearly out (a
            # review, 2026-12-07). The gradient in the student's logits sums to 0 (they enter through the softmax),
            # so that entry is minus the other entries' sum, whose terms keep their digits (within 1.1e-6 after),
            # as in kl_div's kernel. Only for a single top token (ties keep theirs); after a barrier, since another
            # thread of the program wrote that entry in the loop. Spill-free, but the three accumulators take the
            # generic builds from 71-96 registers to 109-118 (the aligned ones: 80-96).
            if tl.sum(tops, axis=0) == 1:
                corrected = -tl.sum(others, axis=0) * grad_scale
                tl.debug_barrier()
                tl.store(grad_row + tl.min(top_col, axis=0), corrected.to(grad_ptr.dtype.element_ty))
        row_max_b = tl.max(max_b, axis=0)
        lse_b = row_max_b + tl.log(tl.sum(sum_b * tl.exp(max_b - row_max_b), axis=0))
        # E_q[a - b] - lse(a) + lse(b), with a = a' + c / T and b = b' + c / T: the shift cancels.
        tl.store(loss_ptr + row, loss_scale * (mean_diff - lse_a + lse_b))
        tl.store(alpha_ptr + row, alpha)
    else:
        tl.store(loss_ptr + row, 0.0)
        tl.store(alpha_ptr + row, 0.0)
        if COMPUTE_GRAD:
            zero_fill_row(grad_row, V, BLOCK_V)


@on_input_device
def aligndistil_forward(
    student: torch.Tensor,
    dpo: torch.Tensor,
    other: torch.Tensor,
    labels: torch.Tensor | None,
    grad_out: torch.Tensor | None,
    row_weight: torch.Tensor,
    *,
    contrastive: bool,
    beta0: float,
    r: float,
    eps: float,
    fixed_alpha: float | None,
    temperature: float,
    ignore_index: int,
    block_v: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the row kernel on ``[N, V]`` views of the three logit tensors (unit column stride), or on row groups
    ``[G, R, V]`` of all three (N = G·R; see :func:`distill_ops._utils.as_row_groups`); ``grad_out`` has the
    student's shape.

    ``row_weight`` (fp32, [N] or one element broadcast) multiplies each row's loss and gradient. Writes
    d(weighted row loss)/dz_s into ``grad_out`` ([N, V], student dtype) when given; returns the weighted per-row
    loss and the per-row alpha (both fp32 [N], 0 at ignored rows).
    """
    block_v = block_v or BLOCK_V
    num_warps = num_warps or NUM_WARPS
    if student.dim() == 2:
        student, dpo, other = student.unsqueeze(0), dpo.unsqueeze(0), other.unsqueeze(0)
        grad_out = None if grad_out is None else grad_out.unsqueeze(0)
    groups, rows_per_group, vocab = student.shape
    num_rows = groups * rows_per_group
    loss = torch.empty(num_rows, dtype=torch.float32, device=student.device)
    alpha = torch.empty(num_rows, dtype=torch.float32, device=student.device)
    if num_rows == 0:
        return loss, alpha
    _aligndistil_fwd_kernel[(num_rows,)](
        student,
        dpo,
        other,
        labels if labels is not None else loss,
        loss,
        alpha,
        grad_out if grad_out is not None else student,
        row_weight,
        student.stride(1),
        dpo.stride(1),
        other.stride(1),
        grad_out.stride(1) if grad_out is not None else 0,
        row_weight.stride(0) if row_weight.numel() > 1 else 0,
        rows_per_group,
        student.stride(0),
        dpo.stride(0),
        other.stride(0),
        grad_out.stride(0) if grad_out is not None else 0,
        vocab,
        ignore_index,
        1.0 / temperature,
        beta0,
        r,
        eps,
        fixed_alpha if fixed_alpha is not None else 0.0,
        CONTRASTIVE=contrastive,
        ADAPTIVE=fixed_alpha is None,
        HAS_LABELS=labels is not None,
        COMPUTE_GRAD=grad_out is not None,
        BLOCK_V=block_v,
        num_warps=num_warps, **LAUNCH_OPTIONS,
    )
    return loss, alpha


def aot_specs() -> list[dict]:
    specs = []
    for mode, contrastive in (("contrastive", True), ("reference", False)):
        for adaptive in (True, False):
            for dtype in ("bf16", "fp32"):
                specs.append(
                    {
                        "name": f"aligndistil_fwd[{mode},{'adaptive' if adaptive else 'fixed'},{dtype}]",
                        "fn": _aligndistil_fwd_kernel,
                        "signature": {
                            "student_ptr": f"*{dtype}",
                            "dpo_ptr": f"*{dtype}",
                            "other_ptr": f"*{dtype}",
                            "labels_ptr": "*i64",
                            "loss_ptr": "*fp32",
                            "alpha_ptr": "*fp32",
                            "grad_ptr": f"*{dtype}",
                            "weight_ptr": "*fp32",
                            "stride_student": "i64",
                            "stride_dpo": "i64",
                            "stride_other": "i64",
                            "stride_grad": "i64",
                            "stride_weight": "i64",
                            "rows_per_group": "i32",
                            "stride_student_group": "i64",
                            "stride_dpo_group": "i64",
                            "stride_other_group": "i64",
                            "stride_grad_group": "i64",
                            "V": "i32",
                            "ignore_index": "i64",
                            "inv_temperature": "fp32",
                            "beta0": "fp32",
                            "r": "fp32",
                            "eps": "fp32",
                            "fixed_alpha": "fp32",
                        },
                        "constexprs": {
                            "CONTRASTIVE": contrastive,
                            "ADAPTIVE": adaptive,
                            "HAS_LABELS": True,
                            "COMPUTE_GRAD": True,
                            "BLOCK_V": BLOCK_V,
                        },
                        "num_warps": NUM_WARPS,
                        "num_stages": 3,
                    }
                )
    return specs
