"""FSPAD's partial-alignment distillation loss for a feature-level draft head: ``fspad_draft_loss``."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._utils import (
    Impl,
    INT_DTYPES, check_flag, check_number, check_reduction, check_same_device, check_tensor, reduce_rows,
)
from .fused_linear import fused_linear_kl_div, scale_linear_inputs


def fspad_draft_loss(
    draft_regress: Tensor,
    draft_predict: Tensor,
    target_next_features: Tensor,
    lm_head_weight: Tensor,
    *,
    regress_weight: float = 1.0,
    logit_weight: float = 0.1,
    lm_head_bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    smooth_l1_beta: float = 1.0,
    loss_mask: Optional[Tensor] = None,
    reduction: str = "mean",
    normalizer: float | Tensor | None = None,
    include_teacher_entropy: bool = True,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    impl: Impl = "auto",
) -> Tensor:
    """FSPAD partial alignment: ``regress_weight * SmoothL1 + logit_weight * soft cross-entropy``, per token.

    * regression: ``SmoothL1(draft_regress, target_next_features)`` averaged over the feature dim;
    * logits: ``-sum_v p_v log q_v`` with p = softmax(lm_head(target_next_features) / T) and
      q = softmax(lm_head(draft_predict) / T) through the frozen LM head, computed by
      :func:`distill_ops.fused_linear_kl_div` (no [N, V] logits) as KL(p || q) + H(p). H(p) does not
      depend on the draft; ``include_teacher_entropy=False`` skips the extra (no-grad, teacher-only)
      pass that computes it and returns the KL instead (same gradient, value lower by ``logit_weight * H(p)``).

    Args:
        draft_regress: ``[..., d]`` the head's regression half (receives a gradient).
        draft_predict: ``[..., d]`` the head's prediction half (receives a gradient through the LM head).
        target_next_features: ``[..., d]`` the target's next-position features (a constant).
        regress_weight, logit_weight: the weights of the regression and logit terms (>= 0).
        temperature: divides both sides' logits in the logit term (no T^2 factor, as in every loss).
        smooth_l1_beta: SmoothL1's ``beta`` (the L2-to-L1 switch point; 0 is L1), as in
            ``torch.nn.functional.smooth_l1_loss``.
        lm_head_weight: ``[V, d]`` the target's LM head (frozen: gets no gradient); ``lm_head_bias``
            optional ``[V]``. Cast to ``draft_predict``'s dtype for the draft side if they differ.
        loss_mask: optional ``[...]`` bool / integer, nonzero where a token counts.
        reduction: ``mean`` (over counted tokens), ``sum`` or ``none`` (shape ``[...]``).
        normalizer: replaces the count of ``mean`` (e.g. ``num_items_in_batch`` for gradient accumulation), as
            in every loss: a number or a one-element tensor, >= 0 (0 where nothing counts gives 0).
        include_teacher_entropy: add H(p), so that the logit term is the soft cross-entropy (``True``,
            default) or leave it out for the KL alone (see above).
        logit_scale, softcap: the target's logits are ``softcap(logit_scale * lm_head(feature))`` (Cohere's
            ``logit_scale``, Granite's ``1 / logits_scaling``; Gemma-2's ``final_logit_softcapping``): both
            sides go through the same map, so the head learns the target's own distribution (and drafts
            with it in :class:`~distill_ops.speculative.SpeculativeDecoder`). For a ``transformers`` target:
            ``distill_ops.integrations.hf.logit_scale(target)`` / ``logit_softcap(target)``.
        impl: backend of the logit term, as in :func:`distill_ops.fused_linear_kl_div`.

    Returns:
        fp32 scalar (``mean`` / ``sum``) or fp32 ``[...]``.
    """
    check_tensor("draft_regress", draft_regress, min_dim=1)
    check_tensor("draft_predict", draft_predict, min_dim=1)
    check_tensor("target_next_features", target_next_features, min_dim=1)
    check_tensor("lm_head_weight", lm_head_weight, ndim=2)
    for name, tensor in (("draft_regress", draft_regress), ("draft_predict", draft_predict)):
        if tensor.shape != target_next_features.shape:
            raise ValueError(
                f"{name} must have the shape of target_next_features {tuple(target_next_features.shape)}, "
                f"got {tuple(tensor.shape)}"
            )
    if lm_head_weight.shape[1] != target_next_features.shape[-1] or lm_head_weight.shape[0] < 1:
        raise ValueError(
            f"lm_head_weight must have shape [V >= 1, {target_next_features.shape[-1]}] (the features' width), "
            f"got {tuple(lm_head_weight.shape)}"
        )
    if target_next_features.shape[-1] < 1:  # named here: fused_linear_kl_div would name its student_hidden
        raise ValueError(f"target_next_features must have a feature width d >= 1, got shape "
                         f"{tuple(target_next_features.shape)}")
    if lm_head_bias is not None:
        check_tensor("lm_head_bias", lm_head_bias, ndim=1)
        if lm_head_bias.shape[0] != lm_head_weight.shape[0]:
            raise ValueError(
                f"lm_head_bias must have shape [{lm_head_weight.shape[0]}] (lm_head_weight's rows), "
                f"got {tuple(lm_head_bias.shape)}"
            )
    check_number("regress_weight", regress_weight, low=0.0)
    check_number("logit_weight", logit_weight, low=0.0)
    check_number("smooth_l1_beta", smooth_l1_beta, low=0.0)
    check_reduction(reduction, normalizer)
    check_flag("include_teacher_entropy", include_teacher_entropy)
    check_number("logit_scale", logit_scale, low=0.0, low_inclusive=False)
    if softcap is not None:
        check_number("softcap", softcap, low=0.0, low_inclusive=False)
    if loss_mask is not None:
        check_tensor("loss_mask", loss_mask, dtypes=(*INT_DTYPES, torch.bool))
    check_same_device(target_next_features=target_next_features, draft_regress=draft_regress,
                      draft_predict=draft_predict, lm_head_weight=lm_head_weight, lm_head_bias=lm_head_bias,
                      loss_mask=loss_mask)
    leading_shape = draft_regress.shape[:-1]
    labels = None
    if loss_mask is not None:
        if loss_mask.shape != leading_shape:
            raise ValueError(f"loss_mask must have shape {tuple(leading_shape)}, got {tuple(loss_mask.shape)}")
        labels = torch.where(loss_mask.bool(), 0, -100).to(torch.int64)

    target = target_next_features.detach()
    head_weight = lm_head_weight.detach()
    head_bias = None if lm_head_bias is None else lm_head_bias.detach()
    draft_weight = head_weight.to(draft_predict.dtype)
    draft_bias = None if head_bias is None else head_bias.to(draft_predict.dtype)
    draft_predict, draft_bias = scale_linear_inputs(draft_predict, draft_bias, logit_scale)
    teacher, head_bias = scale_linear_inputs(target.to(head_weight.dtype), head_bias, logit_scale)
    logit_rows = fused_linear_kl_div(
        draft_predict, draft_weight, teacher, head_weight, student_bias=draft_bias, teacher_bias=head_bias,
        divergence="forward", temperature=temperature, labels=labels, reduction="none",
        student_softcap=softcap, teacher_softcap=softcap, impl=impl,
    )
    if include_teacher_entropy:
        logit_rows = logit_rows + _teacher_entropy(teacher, head_weight, head_bias, temperature, labels, softcap,
                                                   impl)
    # Of the difference, so that autograd saves no target tensor (an inference-mode target cannot be saved).
    difference = draft_regress.float() - target.float()
    active = None if labels is None else labels.reshape(-1) != -100
    if active is not None:
        # Masked rows are selected out before the loss, not after: smooth L1's backward at a NaN / inf difference
        # times their zero gradient was NaN (a select passes exact zeros back).
        difference = torch.where(active.reshape(*leading_shape, 1), difference, 0.0)
    regression_rows = F.smooth_l1_loss(
        difference, torch.zeros_like(difference), reduction="none", beta=smooth_l1_beta
    ).mean(-1)
    rows = regress_weight * regression_rows + logit_weight * logit_rows
    return reduce_rows(rows.reshape(-1), active, reduction, normalizer, leading_shape)


@torch.no_grad()
def _teacher_entropy(features, weight, bias, temperature, labels, softcap, impl) -> Tensor:
    """H(p) per row as log V - KL(p || uniform): the fused op against a zero-width student (logits 0)."""
    vocab = weight.shape[0]
    zero_hidden = features.new_zeros((*features.shape[:-1], 1))
    zero_weight = weight.new_zeros((vocab, 1))
    to_uniform = fused_linear_kl_div(
        zero_hidden, zero_weight, features, weight, teacher_bias=bias, divergence="forward",
        temperature=temperature, labels=labels, reduction="none", teacher_softcap=softcap, impl=impl,
    )
    entropy = math.log(vocab) - to_uniform
    return entropy if labels is None else torch.where(labels != -100, entropy, 0.0)
