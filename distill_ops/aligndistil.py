"""AlignDistil (Zhang et al., ACL 2025): token-adaptive logit extrapolation distillation.

``aligndistil_kl`` / ``AlignDistilLoss``. Per token, with student / DPO / other logits z_s, z_d, z_o:

- ``mode="contrastive"`` (the paper's default): z_o are the reverse-DPO model's, z* = z_d + alpha (z_d - z_o).
  ``mode="reference"``: z_o are the reference model's, z* = z_o + alpha (z_d - z_o).
- alpha = r * TVD + eps with TVD = sum_v |softmax(z_d) - softmax(z_o)| at temperature 1, in [0, 2]: there is no
  1/2, as in the official code; so alpha is in [eps, 2 r + eps]. A fixed ``alpha`` replaces it.
- loss = (beta0 / alpha) KL(softmax(z_s / T) || softmax(z* / T)), a reverse KL, reduced as in ``kl_div``.

-inf logits: a token that is -inf in the DPO model or in the other model is -inf in the teacher (the teacher's
support is the intersection of the two models' supports). The literal formula would give NaN (-inf - -inf) or a +inf
teacher logit (contrastive, token ruled out by the reverse model only) there. A student that puts mass on a token
the teacher rules out gets an infinite loss, as KL(q || p) demands. A row that is -inf everywhere in one of the
models (or whose teacher support is empty) gives NaN, unless its label is ``ignore_index``. A mask must be -inf:
a large finite negative (``torch.finfo(dtype).min``) is a logit like any other, and alpha (d - o) then overflows to
+-inf (a NaN or +inf loss).

Differences from the official implementation (songmzhang/AlignDistil, ``reward_boost_type="aligndistil"`` and
``"theorem1_adaptive"``): it divides only the teacher by ``kd_temperature`` and keeps the student at temperature 1;
we divide both (identical at the default T = 1). It sums the loss over each sequence's tokens and averages over
sequences: ``normalizer=batch_size`` gives that; the default ``mean`` averages over counted tokens.

Both backends compute the per-row loss, its gradient and alpha in one forward call, with the reduction's weight
(1/count for ``mean``) folded into loss and gradient; backward scales the stored gradient in place (a no-op for the
usual incoming gradient of 1, on the Triton path). The DPO and other logits get no gradient (alpha depends on them
only).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ._scale import register_stored_gradient_autograd
from ._utils import (
    Impl,
    LossModule,
    FLOAT_DTYPES,
    as_row_groups,
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
    finite_or_zero,
    flat_labels,
    reduction_weight,
    resolve_impl,
    resolve_vocab,
    row_chunk,
    row_group_chunks,
    split_stored_weight,
)
from .kl_div import _divergence_rows

MODES = ("contrastive", "reference")


def _teacher_rows(dpo: Tensor, other: Tensor, alpha: Tensor, contrastive: bool) -> Tensor:
    """Extrapolated teacher logits for a chunk of rows, less a per-row constant (the base model's row max: the
    softmax does not change, and base - max is exact near the max, where base + alpha * gap would be rounded at
    |base|, e.g. 1e-3 at 1e4); -inf wherever either model is -inf. A new buffer, formed in place (three passes
    fewer than masking both models' -inf first): with alpha > 0, a -inf DPO logit against a finite other one
    already gives -inf (base - inf, or base + alpha (-inf)); every other case of a -inf (the other model's: +inf,
    or NaN from -inf - -inf or -inf + inf) has other == -inf, which is then masked."""
    base = dpo if contrastive else other
    teacher = base - finite_or_zero(base.amax(-1, keepdim=True))
    teacher.addcmul_(dpo - other, alpha)
    return teacher.masked_fill_(other == float("-inf"), float("-inf"))


def _tvd_rows(dpo: Tensor, other: Tensor) -> Tensor:
    """sum_v |softmax(dpo) - softmax(other)| per row (temperature 1, no 1/2), shape [rows, 1].

    Summed as twice the positive or the negative terms of softmax(dpo) - softmax(other) (both rows sum to 1): those
    that leave out the DPO model's top token, where the difference of two numbers ~0.9988 for confident models near
    each other carries their rounding (~1e-7) against a TVD of ~5e-5 (alpha 3.2e-3 off and the gradient 3.1e-3; a
    review, 2026-12-07). A wrong sign there (a difference below that rounding) costs twice that difference, at most
    twice what the plain sum could lose there. The kernel sums the same side."""
    gaps = torch.softmax(dpo, dim=-1).sub_(torch.softmax(other, dim=-1))
    top = dpo.argmax(-1, keepdim=True)
    side = torch.where(gaps.gather(-1, top) > 0, -2.0, 2.0).to(gaps.dtype)
    return gaps.scatter_(-1, top, 0.0).mul_(side).clamp_(min=0.0).sum(-1, keepdim=True)


def aligndistil_rows_torch(
    student: Tensor,
    dpo: Tensor,
    other: Tensor,
    labels: Optional[Tensor],
    row_weight: Optional[Tensor] = None,
    *,
    contrastive: bool,
    beta0: float,
    r: float,
    eps: float,
    fixed_alpha: Optional[float],
    temperature: float,
    ignore_index: int,
    compute_grad: bool,
    upcast: bool = False,
) -> tuple[Tensor, Optional[Tensor], Tensor]:
    """PyTorch fallback on rows ``[N, V]`` or row groups ``[G, R, V]`` (all three alike; see
    :func:`~distill_ops._utils.as_row_groups`): per-row loss, dL_row/dz_s (the student's shape) and alpha.

    Loss and gradient are multiplied by ``row_weight`` (one element or [N]) when given. Chunked over rows so
    temporaries stay bounded; math in fp32 (fp64 with ``upcast=True``). Builds each chunk's teacher logits
    explicitly and reuses ``kl_div``'s reverse-KL rows. Loss and alpha are fp32 (fp64 with ``upcast``), 0 at
    ignored rows; the gradient is in the student's dtype (fp64 with ``upcast``).
    """
    compute_dtype = torch.float64 if upcast else torch.float32
    vocab = student.shape[-1]
    num_rows = math.prod(student.shape[:-1])
    losses = torch.empty(num_rows, dtype=compute_dtype, device=student.device)
    alphas = torch.empty(num_rows, dtype=compute_dtype, device=student.device)
    grad = None
    if compute_grad:
        grad = torch.empty(student.shape, dtype=compute_dtype if upcast else student.dtype, device=student.device)
    step = row_chunk(num_rows, vocab)
    for rows, (student_chunk, dpo_chunk, other_chunk, grad_chunk) in row_group_chunks(
        (student, dpo, other, grad), step
    ):
        dpo_chunk = dpo_chunk.to(compute_dtype)
        other_chunk = other_chunk.to(compute_dtype)
        if fixed_alpha is None:
            alpha = r * _tvd_rows(dpo_chunk, other_chunk) + eps
        else:
            alpha = torch.full((rows.stop - rows.start, 1), fixed_alpha, dtype=compute_dtype, device=student.device)
        teacher = _teacher_rows(dpo_chunk, other_chunk, alpha, contrastive)
        del dpo_chunk, other_chunk
        chunk_loss, chunk_grad = _divergence_rows(
            student_chunk.to(compute_dtype), teacher, "reverse", 0.0, temperature, compute_grad, own_teacher=True
        )
        loss_scale = beta0 / alpha
        if row_weight is not None:
            weight = row_weight if row_weight.numel() == 1 else row_weight[rows]
            loss_scale = loss_scale * weight.to(compute_dtype).reshape(-1, 1)
        chunk_loss = chunk_loss * loss_scale.squeeze(-1)
        alpha = alpha.squeeze(-1)
        if labels is not None:
            active = labels[rows] != ignore_index
            chunk_loss = torch.where(active, chunk_loss, 0.0)
            alpha = torch.where(active, alpha, 0.0)
        losses[rows] = chunk_loss
        alphas[rows] = alpha
        if grad_chunk is not None:  # in place: the chunk's gradient is a buffer of its own
            chunk_grad = chunk_grad.mul_(loss_scale)
            if labels is not None:  # a select, not a product: an ignored row may hold NaN / inf
                chunk_grad = chunk_grad.masked_fill_(~active.unsqueeze(-1), 0.0)
            grad_chunk.copy_(chunk_grad)
    return losses, grad, alphas


# --------------------------------------------------------------------------------------------------
# torch.library registration: one op computing (row losses, stored gradient, row alphas) with both backends.
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("distill_ops::aligndistil_rows", mutates_args=())
def _aligndistil_rows_op(
    student: Tensor,
    dpo: Tensor,
    other: Tensor,
    labels: Optional[Tensor],
    row_weight: Tensor,
    contrastive: bool,
    beta0: float,
    r: float,
    eps: float,
    fixed_alpha: Optional[float],
    temperature: float,
    ignore_index: int,
    backend: str,
    compute_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    if backend == "triton":
        from .kernels.aligndistil import aligndistil_forward

        grad = torch.empty(student.shape, dtype=student.dtype, device=student.device) if compute_grad else None
        loss, alpha = aligndistil_forward(
            student,
            dpo,
            other,
            labels,
            grad,
            row_weight,
            contrastive=contrastive,
            beta0=beta0,
            r=r,
            eps=eps,
            fixed_alpha=fixed_alpha,
            temperature=temperature,
            ignore_index=ignore_index,
        )
    else:
        loss, grad, alpha = aligndistil_rows_torch(
            student,
            dpo,
            other,
            labels,
            row_weight,
            contrastive=contrastive,
            beta0=beta0,
            r=r,
            eps=eps,
            fixed_alpha=fixed_alpha,
            temperature=temperature,
            ignore_index=ignore_index,
            compute_grad=compute_grad,
        )
    if grad is None:
        grad = student.new_empty((0,))
    return loss, grad, alpha


@_aligndistil_rows_op.register_fake
def _(student, dpo, other, labels, row_weight, contrastive, beta0, r, eps, fixed_alpha, temperature, ignore_index,
      backend, compute_grad):
    num_rows = math.prod(student.shape[:-1])
    loss = student.new_empty((num_rows,), dtype=torch.float32)
    alpha = student.new_empty((num_rows,), dtype=torch.float32)
    grad = student.new_empty(student.shape) if compute_grad else student.new_empty((0,))
    return loss, grad, alpha


register_stored_gradient_autograd("distill_ops::aligndistil_rows", backend_index=12, num_inputs=14)


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def _check_aligndistil_args(
    student_logits, dpo_logits, other_logits, mode, beta0, r, eps, alpha, temperature, labels, reduction, normalizer,
    vocab_size,
) -> int:
    check_tensor("student_logits", student_logits, dtypes=FLOAT_DTYPES, min_dim=1)
    check_tensor("dpo_logits", dpo_logits, dtypes=FLOAT_DTYPES, min_dim=1)
    check_tensor("other_logits", other_logits, dtypes=FLOAT_DTYPES, min_dim=1)
    for name, tensor in (("dpo_logits", dpo_logits), ("other_logits", other_logits)):
        check_leading_dims(name, tensor, "student_logits", student_logits.shape[:-1])
    check_same_device(student_logits=student_logits, dpo_logits=dpo_logits, other_logits=other_logits)
    vocab = resolve_vocab(
        student_logits.shape[-1], dpo_logits.shape[-1], vocab_size, student_name="student_logits",
        teacher_name="dpo_logits",
    )
    resolve_vocab(
        student_logits.shape[-1], other_logits.shape[-1], vocab_size, student_name="student_logits",
        teacher_name="other_logits",
    )
    check_choice("mode", mode, MODES)
    check_number("beta0", beta0, low=0.0, low_inclusive=False)
    check_number("r", r, low=0.0)
    check_number("eps", eps, low=0.0, low_inclusive=False)
    if alpha is not None:
        check_number("alpha", alpha, low=0.0, low_inclusive=False)
    check_number("temperature", temperature, low=0.0, low_inclusive=False)
    check_reduction(reduction, normalizer)
    if labels is not None:
        check_labels(labels, student_logits.shape[:-1], student_logits.device)
    return vocab


def aligndistil_kl(
    student_logits: Tensor,
    dpo_logits: Tensor,
    other_logits: Tensor,
    *,
    mode: str = "contrastive",
    beta0: float = 0.1,
    r: float = 10.0,
    eps: float = 1e-3,
    alpha: float | None = None,
    temperature: float = 1.0,
    labels: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: float | Tensor | None = None,
    vocab_size: int | None = None,
    return_alpha: bool = False,
    impl: Impl = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """AlignDistil's loss: (beta0 / alpha_t) KL(softmax(z_s / T) || softmax(z* / T)) per token, reduced.

    Args:
        student_logits: ``[..., V]`` fp32 / fp16 / bf16. Receives the gradient.
        dpo_logits: ``[..., Vd]`` fp32 / fp16 / bf16, same leading dims: the DPO model. Constant.
        other_logits: ``[..., Vo]``, same leading dims: the reverse-DPO model (``contrastive``) or the reference
            model (``reference``). Constant.
        mode: ``contrastive`` (z* = z_d + alpha (z_d - z_o)) or ``reference`` (z* = z_o + alpha (z_d - z_o)).
        beta0: the loss weight numerator (> 0); tokens are weighted by beta0 / alpha_t.
        r: alpha_t = r * TVD_t + eps, TVD_t = sum_v |softmax(z_d) - softmax(z_o)| at temperature 1 (no 1/2).
        eps: > 0, keeps alpha_t and beta0 / alpha_t finite.
        alpha: a fixed extrapolation strength (> 0) instead of the adaptive one.
        temperature: divides the student's and the teacher's logits inside the KL (not the TVD).
        labels: optional integer ``[...]``; rows equal to ``ignore_index`` (default -100) contribute nothing (alpha 0).
        reduction: ``mean`` (over counted rows, 0.0 if none), ``sum`` or ``none`` (shape ``[...]``).
        normalizer: replaces the row count of ``mean`` (e.g. the number of sequences).
        vocab_size: when the vocabularies differ, read all three as their first ``vocab_size`` columns.
        return_alpha: also return alpha_t, fp32 ``[...]`` without gradient (0 at ignored rows), for logging.
        impl: ``auto`` (Triton on CUDA, PyTorch otherwise), ``triton`` or ``torch``.

    Returns:
        fp32 scalar (``mean`` / ``sum``) or fp32 ``[...]`` (``none``); with ``return_alpha``, ``(loss, alpha)``.
    """
    check_index("ignore_index", ignore_index)
    check_flag("return_alpha", return_alpha)
    vocab = _check_aligndistil_args(
        student_logits, dpo_logits, other_logits, mode, beta0, r, eps, alpha, temperature, labels, reduction,
        normalizer, vocab_size,
    )
    backend = resolve_impl(impl, student_logits.device)
    leading_shape = student_logits.shape[:-1]
    # Row groups: shifted logits of a batch (logits[:, :-1]) are read in place, not copied.
    student_rows, dpo_rows, other_rows = as_row_groups(
        (student_logits, dpo_logits.detach(), other_logits.detach()), vocab
    )
    label_rows = flat_labels(labels)
    active = None if label_rows is None else label_rows != ignore_index
    row_weight, deferred = split_stored_weight(
        reduction_weight(reduction, normalizer, active, math.prod(leading_shape), student_rows.device), reduction,
        student_rows.dtype,
    )
    compute_grad = student_logits.requires_grad and torch.is_grad_enabled()
    row_loss, _, row_alpha = torch.ops.distill_ops.aligndistil_rows(
        student_rows,
        dpo_rows,
        other_rows,
        label_rows,
        row_weight,
        mode == "contrastive",
        float(beta0),
        float(r),
        float(eps),
        None if alpha is None else float(alpha),
        float(temperature),
        int(ignore_index),
        backend,
        compute_grad,
    )
    loss = finish_deferred(row_loss, deferred, active, reduction, leading_shape)
    if return_alpha:
        return loss, row_alpha.reshape(leading_shape)
    return loss


class AlignDistilLoss(LossModule):
    """Module form of :func:`aligndistil_kl`; ``forward(student_logits, dpo_logits, other_logits, labels=None,
    normalizer=None)``."""

    def __init__(
        self,
        mode: str = "contrastive",
        beta0: float = 0.1,
        r: float = 10.0,
        eps: float = 1e-3,
        alpha: float | None = None,
        temperature: float = 1.0,
        ignore_index: int = -100,
        reduction: str = "mean",
        vocab_size: int | None = None,
        return_alpha: bool = False,
        impl: Impl = "auto",
    ) -> None:
        check_choice("mode", mode, MODES)
        check_choice("reduction", reduction, ("mean", "sum", "none"))
        check_flag("return_alpha", return_alpha)
        check_number("beta0", beta0, low=0.0, low_inclusive=False)
        check_number("r", r, low=0.0)
        check_number("eps", eps, low=0.0, low_inclusive=False)
        if alpha is not None:
            check_number("alpha", alpha, low=0.0, low_inclusive=False)
        super().__init__(
            mode=mode,
            beta0=beta0,
            r=r,
            eps=eps,
            alpha=alpha,
            temperature=temperature,
            ignore_index=ignore_index,
            reduction=reduction,
            vocab_size=vocab_size,
            return_alpha=return_alpha,
            impl=impl,
        )

    def forward(
        self,
        student_logits: Tensor,
        dpo_logits: Tensor,
        other_logits: Tensor,
        labels: Optional[Tensor] = None,
        normalizer: float | Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        return aligndistil_kl(
            student_logits, dpo_logits, other_logits, labels=labels, normalizer=normalizer, **self.options()
        )
