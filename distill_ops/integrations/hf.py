"""Hugging Face ``transformers`` integration: distillation between causal LMs without logits.

Each model runs its body (``model.get_decoder()``) to the last hidden state; the loss takes the
``lm_head`` weight / bias and computes :func:`distill_ops.fused_linear_kl_div`, so neither model ever
produces [B, L, V] logits. Labels are shifted as ``transformers``' causal-LM loss shifts them: the
hidden state at position t is scored against the token at t + 1.

Use in a ``transformers.Trainer`` subclass (the teacher frozen, in eval mode, on the student's device)::

    from transformers import Trainer
    from distill_ops.integrations.hf import trainer_autocast, trainer_loss, trainer_normalizer

    class DistillationTrainer(Trainer):
        def __init__(self, *args, teacher_model, distill_kwargs=None, **kwargs):
            super().__init__(*args, **kwargs)
            # The fused loss always shifts the labels, so the Trainer's count must be of the shifted ones
            # (transformers counts them unshifted for students without a causal-LM loss_type, e.g. GPT-2).
            self._loss_shifts_labels = True
            self.teacher_model = teacher_model.eval().requires_grad_(False)
            self.distill_kwargs = distill_kwargs or {}   # divergence=, temperature=, ce_weight=, ...

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            with trainer_autocast(self):  # the Trainer's bf16 / fp16 mixed precision
                return trainer_loss(model, self.teacher_model, inputs, return_outputs,
                                    trainer_normalizer(self, num_items_in_batch), **self.distill_kwargs)

:func:`trainer_loss` is :func:`causal_lm_distillation_loss` on the collated batch, computed inside the
wrapper's forward when the Trainer wrapped the model (DDP) or sharded it (FSDP1 / FSDP2), returning
``(loss, {"loss": loss})`` for ``return_outputs`` (``Trainer.evaluate`` reads logits from the outputs' other
entries: a dict, never None).
:func:`trainer_normalizer` makes the mean over gradient-accumulation micro-batches and data-parallel ranks
exact, as the Trainer's own loss does (the Trainer's count covers every rank; DDP averages the ranks'
gradients). :func:`trainer_autocast` applies the Trainer's mixed precision (``bf16=True`` / ``fp16=True``), which
accelerate attaches to the model's own forward, never called here. :class:`FusedDistillationTrainer` is this
subclass, ready to use.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import sys
import weakref
from collections.abc import Mapping
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._utils import (
    FLOAT_DTYPES, IMPLS, INT_DTYPES, Impl, check_choice, check_flag, check_index, check_number, check_reduction,
    check_tensor, check_token_ids, check_vocab_size, resolve_vocab, text_config,
)
from ..fused_linear import fused_linear_kl_div, scale_linear_inputs
from ..kl_div import check_divergence_options


def causal_lm_hidden_states(
    model: nn.Module, input_ids: Tensor, attention_mask: Optional[Tensor] = None, **model_kwargs: Any
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(last hidden state [B, L, H], lm_head weight [V, H], lm_head bias [V] or None)`` of a causal LM.

    Runs ``model.get_decoder()`` (the transformer body, final norm included) instead of the full model,
    so no logits are computed; compiled as the model was when :func:`causal_lm_distillation_loss` was given a
    ``torch.compile``-d model (see ``_strip_compile``). A model that soft-caps its logits (Gemma-2) applies the
    cap after this linear map: see :func:`logit_softcap`.
    """
    outputs, weight, bias = _body_outputs(model, input_ids, attention_mask, **model_kwargs)
    return _last_hidden_state(outputs), weight, bias


def _body_outputs(model: nn.Module, input_ids: Tensor, attention_mask: Optional[Tensor], **model_kwargs: Any):
    """``(the body's outputs, lm_head weight, lm_head bias)``: :func:`causal_lm_hidden_states` with every output of
    the body (an MoE body's ``router_logits`` with ``output_router_logits=True``)."""
    head = model.get_output_embeddings()
    try:
        weight, bias = linear_head(head)
    except TypeError as error:
        raise TypeError(f"{type(model).__name__}'s output embedding: {error}") from None
    body = _COMPILED_BODIES.get(model, (None, None))[1]
    body = causal_lm_body(model) if body is None else body
    outputs = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **model_kwargs)
    return outputs, weight, bias


def causal_lm_body(model: nn.Module) -> nn.Module:
    """The transformer body of a causal LM: ``model.get_decoder()``, or, where that returns the model itself
    (transformers' fallback for a class whose ``base_model_prefix`` names no attribute, e.g. the text-only
    ``Llama4ForCausalLM``, whose body is ``.model``: the body's "hidden states" were then the logits, a review
    found, 2026-12-06), its ``.model``; a ``TypeError`` naming the class where neither is a separate module."""
    body = model.get_decoder()
    if body is model:
        body = getattr(model, "model", None)
    if not isinstance(body, nn.Module) or body is model:
        raise TypeError(f"{type(model).__name__}: get_decoder() returns the model itself and it has no .model body; "
                        "expected a transformers *ForCausalLM whose get_decoder() is its transformer body")
    return body


def _last_hidden_state(outputs) -> Tensor:
    return outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]


# The signature of transformers' Switch-style MoE load-balancing loss (Mixtral, Qwen2/3-MoE, OLMoE, gpt-oss, ...).
_AUX_LOSS_PARAMETERS = ("gate_logits", "num_experts", "top_k", "attention_mask")
_AUX_LOSS_ATTRIBUTES = ("num_experts", "num_experts_per_tok", "router_aux_loss_coef")


def router_aux_loss_function(model: nn.Module, requested: Optional[bool] = None):
    """The MoE load-balancing term the model's own forward adds to its loss, as a function
    ``(router_logits, attention_mask) -> router_aux_loss_coef * load_balancing_loss``, or None when none applies.

    ``requested=None`` follows the model's config: the term applies when ``output_router_logits`` is set, as in the
    model's own forward (``MixtralForCausalLM`` and the other ``transformers`` MoE causal LMs add
    ``router_aux_loss_coef`` times their module's ``load_balancing_loss_func`` to the loss when labels are given).
    ``True`` asks for it whatever the config says (``ValueError`` for a model without one), ``False`` never adds it.
    A model whose term has another form gets a ``NotImplementedError`` naming what is missing, rather than a loss
    without its load balancing."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model  # PEFT
    if requested is False or (requested is None and not getattr(text_config(base), "output_router_logits", False)):
        return None
    function = getattr(sys.modules.get(type(base).__module__), "load_balancing_loss_func", None)
    missing = [name for name in _AUX_LOSS_ATTRIBUTES if not hasattr(base, name)]
    if function is None and requested:
        raise ValueError(f"router_aux_loss=True, but {type(base).__name__} is not a transformers MoE causal LM "
                         f"(its module has no load_balancing_loss_func)")
    if function is None or missing or tuple(inspect.signature(function).parameters)[:4] != _AUX_LOSS_PARAMETERS:
        raise NotImplementedError(
            f"{type(base).__name__} adds a router load-balancing loss (output_router_logits=True) of a form the fused "
            f"loss does not reproduce (needs load_balancing_loss_func{_AUX_LOSS_PARAMETERS} and the attributes "
            f"{_AUX_LOSS_ATTRIBUTES}; missing: {missing or 'the function or its signature'}); pass "
            f"router_aux_loss=False to train without it"
        )

    def aux_loss(router_logits, attention_mask: Optional[Tensor]) -> Tensor:
        return base.router_aux_loss_coef * function(router_logits, base.num_experts, base.num_experts_per_tok,
                                                    attention_mask)

    return aux_loss


def _peft_active_adapters(wrapper: nn.Module) -> list:
    return [] if wrapper.disable_adapters else list(wrapper.active_adapters)


def linear_head(head: nn.Module) -> tuple[Tensor, Optional[Tensor]]:
    """``(weight [V, H], bias [V] or None)`` of an output embedding that maps hidden states linearly, as its
    forward computes them (gradients flow to the trainable tensors they are built from):

    - ``nn.Linear`` (or a ``torch.compile`` wrapper of one or of what follows);
    - PEFT's ``ModulesToSaveWrapper`` (``modules_to_save=["lm_head"]``): the active adapter's trainable copy, or
      the original head when adapters are disabled;
    - PEFT's LoRA layer on the head (``target_modules`` including ``lm_head``): ``W + scaling * B @ A`` summed
      over the active adapters (``B``'s bias too with ``lora_bias``), built per call (one ``[V, H]`` tensor;
      the fused loss's weight gradient reaches ``A`` and ``B`` through it); ``W`` alone when merged or disabled.
      Refused (``ValueError``): LoRA dropout active in training mode (dropout of the hidden state is not a linear
      map), LoRA variants (DoRA, ...), ``fan_in_fan_out``, and a merged-and-disabled layer.
    """
    if isinstance(head, nn.Linear):
        return head.weight, head.bias
    if _is_compiled(head):  # a compiled head (accelerate's regional compilation compiles it apart)
        return linear_head(head._orig_mod)
    if isinstance(getattr(head, "original_module", None), nn.Module) and isinstance(
        getattr(head, "modules_to_save", None), nn.ModuleDict
    ):
        active = _peft_active_adapters(head)
        known = getattr(head, "_adapters", head.modules_to_save.keys())
        if not active or any(name not in known for name in active) or active[0] not in head.modules_to_save:
            return linear_head(head.original_module)
        return linear_head(head.modules_to_save[active[0]])
    if all(isinstance(getattr(head, name, None), nn.Module) for name in ("base_layer", "lora_A", "lora_B")):
        return _lora_head(head)
    raise TypeError(
        f"must be an nn.Linear (or PEFT's LoRA / modules_to_save wrapper of one), got {type(head).__name__}"
    )


def _lora_head(head: nn.Module) -> tuple[Tensor, Optional[Tensor]]:
    weight, bias = linear_head(head.base_layer)
    if head.merged:
        if head.disable_adapters:
            raise ValueError("the LoRA LM head is merged but its adapters are disabled (PEFT unmerges it in its "
                             "next forward): call unmerge_adapter() or enable the adapters first")
        return weight, bias
    if getattr(head, "fan_in_fan_out", False):
        raise ValueError("a LoRA LM head with fan_in_fan_out=True is not supported (an nn.Linear head has False)")
    for name in _peft_active_adapters(head):
        if name not in head.lora_A:
            continue
        if name in getattr(head, "lora_variant", {}) or getattr(head, "use_dora", {}).get(name, False):
            raise ValueError(f"LoRA adapter {name!r} on the LM head is a variant (DoRA, ...): only plain LoRA "
                             f"is a linear map of the hidden state")
        dropout = head.lora_dropout[name]
        if dropout.training and getattr(dropout, "p", 0.0) > 0:
            raise ValueError(f"LoRA adapter {name!r} on the LM head has lora_dropout={dropout.p} and is in training "
                             f"mode: dropout of the hidden state is not a linear map; use lora_dropout=0 for the head")
        a, b, scaling = head.lora_A[name].weight, head.lora_B[name], head.scaling[name]
        weight = weight + (scaling * (b.weight @ a.to(b.weight.dtype))).to(weight.dtype)
        if b.bias is not None:
            bias = (scaling * b.bias) if bias is None else bias + (scaling * b.bias).to(bias.dtype)
    return weight, bias


def logit_softcap(model: nn.Module) -> Optional[float]:
    """The model's final-logit soft-cap (``config.final_logit_softcapping``, Gemma-2: 30.0), or None."""
    cap = getattr(text_config(model), "final_logit_softcapping", None)
    return None if cap is None else float(cap)


# Config attributes that models multiply or divide their LM head's output by (Cohere's ``logit_scale``,
# Granite's ``logits_scaling`` which divides and HyperCLOVA X's which multiplies, Falcon-H1's
# ``lm_head_multiplier``, Muse-Glimmer's ``output_multiplier``): candidates only; the probe decides.
_SCALE_ATTRIBUTES = ("logit_scale", "logits_scaling", "lm_head_multiplier", "output_multiplier")
_LOGIT_SCALES: "weakref.WeakKeyDictionary[nn.Module, float]" = weakref.WeakKeyDictionary()


def logit_scale(model: nn.Module) -> float:
    """The factor a causal LM multiplies its LM head's output by before any soft-cap: 1.0 for most models,
    Cohere's ``logit_scale``, ``1 / logits_scaling`` for Granite, ...

    Found once per model (cached) by a probe: a two-token forward of the model itself in eval mode, without
    gradient, compared with the LM head applied to :func:`causal_lm_hidden_states` under each candidate (1 and
    the scale-like config attributes and their inverses), soft-capped as the config says. The best candidate
    must reproduce the model's own logits; a model whose logits are any other function of the LM head's output
    (an offset, a vocabulary slice, ...) gets a ``ValueError`` instead of a silently different loss. The probe
    reads its comparison back to the host (once per model).
    """
    cached = _LOGIT_SCALES.get(model)
    if cached is not None:
        return cached
    config = text_config(model)
    candidates = [1.0]
    for name in _SCALE_ATTRIBUTES:
        value = getattr(config, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value != 0:
            candidates += [float(value), 1.0 / float(value)]
    cap = logit_softcap(model)
    head = model.get_output_embeddings()
    _refuse_unreadable_head(model)
    vocab = head.weight.shape[0]
    ids = (torch.arange(2, device=head.weight.device) % vocab).view(1, 2)
    # Each submodule's own mode is restored (model.train(mode) would set the root's on all of them).
    modes = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        # Eager: compiled bodies or layers (regional compilation) would compile once more for this 2-token input.
        with torch.no_grad(), _force_eager():
            # Inside run_inside_forward an FSDP2 root's parameters are gathered: its hooks must not run again.
            call = model.forward if model in _INSIDE_FORWARD else model
            own = call(input_ids=ids, use_cache=False).logits.float()
            hidden, weight, bias = causal_lm_hidden_states(model, ids)
            raw = F.linear(hidden.float(), weight.float(), None if bias is None else bias.float())
    finally:
        for module, training in modes:
            module.training = training
    if own.shape != raw.shape:
        raise ValueError(
            f"{type(model).__name__}'s logits have shape {tuple(own.shape)}, its LM head gives {tuple(raw.shape)}: "
            f"the fused loss cannot reproduce them"
        )
    errors = []
    for scale in candidates:
        predicted = raw * scale
        if cap is not None:
            predicted = cap * torch.tanh(predicted / cap)
        errors.append(float((predicted - own).abs().max()))
    best = min(range(len(candidates)), key=errors.__getitem__)
    # The model's own head runs in its dtype: allow its rounding, not a different scale.
    tolerance = 1e-2 * float(own.abs().max()) + 1e-5
    if errors[best] > tolerance:
        raise ValueError(
            f"{type(model).__name__}'s logits are not its LM head's output times one of {candidates} "
            f"(soft-capped: {cap}): max difference {errors[best]:.3g} > {tolerance:.3g}; the fused loss supports "
            f"logits = softcap(scale * lm_head(hidden)) only"
        )
    _LOGIT_SCALES[model] = candidates[best]
    return candidates[best]


def shift_labels(
    input_ids: Tensor, labels: Optional[Tensor], attention_mask: Optional[Tensor], ignore_index: int = -100
) -> Tensor:
    """Targets of positions 0 .. L-2 (``[B, L-1]``): ``labels[:, 1:]``, as ``transformers`` shifts them.

    Without ``labels`` the targets are ``input_ids[:, 1:]`` with padding (``attention_mask == 0``)
    ignored, which is what a data collator for causal LM would have produced.
    """
    check_tensor("input_ids", input_ids, dtypes=INT_DTYPES, ndim=2)
    for name, value in (("labels", labels), ("attention_mask", attention_mask)):
        if value is not None and value.shape != input_ids.shape:
            expected, received = tuple(input_ids.shape), tuple(value.shape)
            raise ValueError(f"{name} must have the shape of input_ids {expected}, got {received}")
    if labels is None:
        labels = input_ids
        if attention_mask is not None:
            labels = torch.where(attention_mask.bool(), input_ids, ignore_index)
    return labels[:, 1:]


def causal_lm_distillation_loss(
    student: nn.Module,
    teacher: nn.Module,
    input_ids: Tensor,
    labels: Optional[Tensor] = None,
    attention_mask: Optional[Tensor] = None,
    *,
    teacher_input_ids: Optional[Tensor] = None,
    divergence: str = "forward",
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    kl_weight: float = 1.0,
    ce_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: float | Tensor | None = None,
    vocab_size: int | None = None,
    impl: Impl = "auto",
    skip_ignored: bool = True,
    model_kwargs: Optional[dict] = None,
    router_aux_loss: Optional[bool] = None,
    return_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Distillation loss between two ``transformers`` causal LMs, from hidden states (no logits).

    Args:
        student, teacher: ``*ForCausalLM`` models (``get_decoder()`` / ``get_output_embeddings()``).
            The teacher runs under ``torch.no_grad()``. Either may be wrapped: ``DistributedDataParallel``
            and FSDP (``FullyShardedDataParallel`` or ``fully_shard``) models compute inside their forward
            (:func:`run_inside_forward`: DDP prepares its gradient reduction, FSDP gathers the root's
            parameters and hooks their backward); a sharded teacher's LM head is copied there (one ``[V, H]``
            copy per call). ``DataParallel`` is only unwrapped. DeepSpeed ZeRO-3 (a partitioned LM head) is
            refused with ``NotImplementedError``. A ``torch.compile``-d model (or wrapper, as accelerate builds
            for ``TrainingArguments(torch_compile=True)``) runs its body (never its LM head) compiled with
            the same settings; sharded models run theirs eagerly.
        input_ids: ``[B, L]`` tokens; ``teacher_input_ids`` if the teacher tokenizes identically but
            needs its own ids (same shape), otherwise the same ids feed both.
        labels: ``[B, L]`` as for ``transformers`` causal-LM training (``ignore_index`` where no loss);
            shifted here. ``None``: ``input_ids`` with padding ignored.
        attention_mask: ``[B, L]``, passed to both models.
        divergence, beta, alpha, temperature, kl_weight, ce_weight, reduction, normalizer, vocab_size,
            impl: as in :func:`distill_ops.fused_linear_kl_div` (``normalizer``: the Trainer's
            ``num_items_in_batch``). ``vocab_size`` compares the first k tokens when the two LM heads
            differ in size (e.g. padded Qwen vocabularies).
        model_kwargs: more keyword arguments of both models' bodies: ``position_ids`` and the flash-attention
            boundaries of packed sequences (``transformers.DataCollatorWithFlattening``: several sequences in
            one row, each restarting its positions; the separator label ``-100`` keeps the loss inside each).
        skip_ignored: only the positions whose target is not ``ignore_index`` go through the LM heads and the
            loss (the others contribute nothing either way; with prompts masked this is often half the work).
            It costs one host synchronisation (the count of scored positions). Ignored with
            ``reduction="none"``, which returns ``[B, L-1]``.
        router_aux_loss: an MoE student's load-balancing loss (``router_aux_loss_coef`` times its
            ``load_balancing_loss_func`` over the router logits, with ``attention_mask``) is added to the loss as the
            student's own forward adds it to its loss: by default when its config sets ``output_router_logits``
            (see :func:`router_aux_loss_function`); ``True`` / ``False`` force it on / off. Not added with
            ``reduction="none"`` (a per-batch term; ``True`` then raises ``ValueError``).
        return_entropy: also return the student's per-position entropy at ``temperature`` (``[B, L-1]`` fp32, 0
            where the shifted target is ignored, no gradient; :func:`distill_ops.fused_linear_kl_div`'s
            ``return_entropy``, computed in the same pass).

    Models that soft-cap their logits (``config.final_logit_softcapping``, Gemma-2) are scored on the
    capped logits, as their own forward computes them (``student_softcap`` / ``teacher_softcap`` of
    :func:`distill_ops.fused_linear_kl_div`). Models that scale them (Cohere's ``logit_scale``, Granite's
    ``logits_scaling``, ...: :func:`logit_scale`, probed once per model) get their hidden states (and LM-head
    bias) multiplied by the scale first, in their dtype: exact for power-of-two scales, otherwise rounded as
    the model's own scaled 16-bit logits are.

    Returns:
        fp32 loss: ``kl_weight * divergence + ce_weight * cross-entropy`` over the shifted targets; with
        ``return_entropy`` the pair ``(loss, entropy)``.
    """
    options = dict(divergence=divergence, beta=beta, alpha=alpha, temperature=temperature, ignore_index=ignore_index,
                   kl_weight=kl_weight, ce_weight=ce_weight, reduction=reduction, normalizer=normalizer,
                   vocab_size=vocab_size, impl=impl, return_entropy=return_entropy)
    for name, model in (("student", student), ("teacher", teacher)):
        inner = unwrap_model(model) if isinstance(model, nn.Module) else model  # inside DDP / FSDP / compile
        if not isinstance(inner, nn.Module) or not callable(getattr(inner, "get_output_embeddings", None)):
            raise TypeError(f"{name} must be a transformers causal LM (an nn.Module with get_output_embeddings()), "
                            f"got {type(model).__name__}")
    check_tensor("input_ids", input_ids, dtypes=INT_DTYPES, ndim=2)
    if model_kwargs is not None and not isinstance(model_kwargs, Mapping):
        raise TypeError(f"model_kwargs must be a dict of keyword arguments or None, got {type(model_kwargs).__name__}")
    for name, value, dtypes in (("labels", labels, INT_DTYPES), ("teacher_input_ids", teacher_input_ids, INT_DTYPES),
                                ("attention_mask", attention_mask, (*INT_DTYPES, torch.bool, *FLOAT_DTYPES))):
        if value is not None:
            check_tensor(name, value, dtypes=dtypes)
        if value is not None and value.shape != input_ids.shape:
            expected, received = tuple(input_ids.shape), tuple(value.shape)
            raise ValueError(f"{name} must have the shape of input_ids {expected}, got {received}")
    if input_ids.shape[1] < 1:  # (failed inside transformers' mask code)
        raise ValueError(f"input_ids must have shape [B, L] with L >= 1, got {tuple(input_ids.shape)}")
    if input_ids.shape[0] < 1:  # (failed inside the model's attention, reshaping 0 elements)
        raise ValueError(f"input_ids must have shape [B, L] with B >= 1, got {tuple(input_ids.shape)}")
    check_loss_options(options)
    check_flag("skip_ignored", skip_ignored)
    if router_aux_loss is not None:
        check_flag("router_aux_loss", router_aux_loss)
    teacher_ids = input_ids if teacher_input_ids is None else teacher_input_ids
    # Out-of-range ids failed inside a model's embedding (an IndexError naming neither argument nor model).
    for name, role, model, ids in (("input_ids", "student", student, input_ids),
                                   ("input_ids" if teacher_input_ids is None else "teacher_input_ids", "teacher",
                                    teacher, teacher_ids)):
        vocab = _embedding_rows(unwrap_model(model))
        if vocab is not None:
            check_token_ids(name, ids, vocab, note=f" (the {role} model's embedding rows)")
    student, teacher = _strip_compile(student), _strip_compile(teacher)
    module = unwrap_model(student)
    z_loss = getattr(module, "z_loss_coefficient", 0.0)
    if isinstance(z_loss, (int, float)) and z_loss > 0:  # Bamba: + coef * mean(logsumexp(logits)^2) in its forward
        raise NotImplementedError(
            f"{type(module).__name__} adds a z-loss (z_loss_coefficient={z_loss}) to its own loss, "
            f"which the fused loss does not compute: set z_loss_coefficient=0 to train without it"
        )
    if router_aux_loss and reduction == "none":
        raise ValueError("router_aux_loss=True needs a scalar reduction ('mean' or 'sum'), got reduction='none'")
    aux_loss = None if reduction == "none" else router_aux_loss_function(module, router_aux_loss)
    return run_inside_forward(student, _distillation_loss, module, teacher, input_ids, labels,
                              attention_mask, teacher_ids, skip_ignored, dict(model_kwargs or {}), options, aux_loss)


def check_loss_options(options: dict) -> None:
    """The options :func:`causal_lm_distillation_loss` passes to :func:`distill_ops.fused_linear_kl_div`, checked
    with its rules and messages before any forward (it checks them once both models have run: a bad temperature or
    divergence cost both forwards, and a trainer's ``distill_kwargs`` failed only at its first step)."""
    check_divergence_options(options["divergence"], options["beta"], options["alpha"])
    check_number("temperature", options["temperature"], low=0.0, low_inclusive=False)
    check_number("kl_weight", options["kl_weight"], low=0.0)
    check_number("ce_weight", options["ce_weight"], low=0.0)
    check_index("ignore_index", options["ignore_index"])
    check_reduction(options["reduction"], options["normalizer"])
    check_vocab_size(options["vocab_size"])
    check_choice("impl", options["impl"], IMPLS)
    check_flag("return_entropy", options["return_entropy"])


def _embedding_rows(model: nn.Module) -> Optional[int]:
    """The number of rows of ``model``'s input embedding, or None where it does not say."""
    try:
        embeddings = model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings", None)) else None
    except NotImplementedError:
        return None
    rows = getattr(embeddings, "num_embeddings", None)
    return rows if isinstance(rows, int) else None


def _frozen_head_inputs(teacher: nn.Module, input_ids: Tensor, attention_mask: Optional[Tensor], model_kwargs: dict):
    """``(scale, hidden, weight, bias)`` of the teacher (no gradient), computed inside its forward when it is
    sharded; a sharded teacher's LM head weight and bias are then copied, because FSDP frees its gathered
    parameters after that forward (no backward hook re-gathers a frozen model's) while the fused loss's backward
    reads them. A ``fully_shard``-ed teacher is resharded after the copy."""
    module = unwrap_model(teacher)
    _refuse_unreadable_head(module)
    sharded = is_sharded(teacher)

    def run():
        hidden, weight, bias = causal_lm_hidden_states(module, input_ids, attention_mask, **model_kwargs)
        if sharded:
            weight, bias = weight.clone(), None if bias is None else bias.clone()
        return logit_scale(module), hidden, weight, bias

    with torch.no_grad():
        outputs = run_inside_forward(teacher, run)
    if _is_fsdp2(teacher):
        teacher.reshard()  # the root's parameters stay gathered after a forward without backward
    return outputs


def _distillation_loss(student: nn.Module, teacher: nn.Module, input_ids: Tensor, labels: Optional[Tensor],
                       attention_mask: Optional[Tensor], teacher_input_ids: Tensor, skip_ignored: bool,
                       model_kwargs: dict, options: dict, aux_loss) -> Tensor:
    _refuse_unreadable_head(student)
    student_scale = logit_scale(student)
    student_kwargs = model_kwargs if aux_loss is None else dict(model_kwargs, output_router_logits=True)
    student_outputs, student_weight, student_bias = _body_outputs(student, input_ids, attention_mask,
                                                                  **student_kwargs)
    student_hidden = _last_hidden_state(student_outputs)
    teacher_scale, teacher_hidden, teacher_weight, teacher_bias = _frozen_head_inputs(
        teacher, teacher_input_ids, attention_mask, model_kwargs
    )
    ignore_index = options["ignore_index"]
    targets = shift_labels(input_ids, labels, attention_mask, ignore_index)
    student_hidden, teacher_hidden = student_hidden[:, :-1], teacher_hidden[:, :-1]
    scored = None
    if skip_ignored and options["reduction"] != "none":
        # Only the scored positions go through the LM heads (prompts and padding are often half the tokens).
        # Boolean indexing: one host synchronisation for the count.
        scored = targets != ignore_index
        student_hidden, teacher_hidden, targets = student_hidden[scored], teacher_hidden[scored], targets[scored]
    # The vocabulary rule checked here, to name the models' LM heads (not fused_linear_kl_div's argument names).
    resolve_vocab(student_weight.shape[0], teacher_weight.shape[0], options["vocab_size"],
                  student_name="the student model's LM head", teacher_name="the teacher model's LM head")
    # Scaled logits, after the selection: only the kept rows are scaled.
    student_hidden, student_bias = scale_linear_inputs(student_hidden, student_bias, student_scale)
    teacher_hidden, teacher_bias = scale_linear_inputs(teacher_hidden, teacher_bias, teacher_scale)
    loss = fused_linear_kl_div(
        student_hidden,
        student_weight,
        teacher_hidden.to(teacher_weight.dtype),
        teacher_weight.detach(),
        student_bias=student_bias,
        teacher_bias=None if teacher_bias is None else teacher_bias.detach(),
        labels=targets,
        student_softcap=logit_softcap(student),
        teacher_softcap=logit_softcap(unwrap_model(teacher)),
        **options,
    )
    entropy = None
    if options["return_entropy"]:
        loss, entropy = loss
        if scored is not None:  # back to [B, L-1], 0 at the skipped positions (no host synchronisation)
            entropy = entropy.new_zeros(scored.shape).masked_scatter_(scored, entropy)
    # The MoE student's load-balancing term, as its own forward adds it. Not scaled by trainer_normalizer's rank
    # count: its weight is router_aux_loss_coef whatever the world size (the Trainer's own loss multiplies it by the
    # number of ranks: huggingface/transformers#48690).
    if aux_loss is not None:
        loss = loss + aux_loss(student_outputs.router_logits, attention_mask).to(loss.dtype)
    return loss if entropy is None else (loss, entropy)


def _trainer_class():
    from transformers import Trainer

    class FusedDistillationTrainer(Trainer):
        """``transformers.Trainer`` whose loss is :func:`causal_lm_distillation_loss` against ``teacher_model``.

        ``FusedDistillationTrainer(model=student, teacher_model=teacher, args=..., train_dataset=...,
        distill_kwargs={"divergence": "jsd", "temperature": 2.0, "ce_weight": 0.5})``. The teacher is
        frozen and put in eval mode; move it to the student's device yourself.

        Besides the loss it logs ``entropy``: the student's mean entropy per scored token at the loss's
        temperature, over the training steps since the last log and every process, computed in the loss's own
        pass (as TRL's ``DistillationTrainer`` logs it; the sums stay on the device until the Trainer logs).
        ``evaluate()`` / ``predict()`` report ``{metric_key_prefix}_entropy`` (``eval_entropy``, ``test_entropy``)
        over that loop's tokens. ``log_entropy = False`` (class or instance attribute) turns it off.
        """

        log_entropy: bool = True

        def __init__(self, *args: Any, teacher_model: nn.Module, distill_kwargs: Optional[dict] = None, **kwargs: Any):
            if not isinstance(teacher_model, nn.Module):
                raise TypeError(
                    f"teacher_model must be a loaded causal LM (an nn.Module, e.g. "
                    f"AutoModelForCausalLM.from_pretrained(name)), got {type(teacher_model).__name__}: {teacher_model!r}"
                )
            if kwargs.get("compute_loss_func") is not None:  # the Trainer would also rescale the loss for it
                raise ValueError("FusedDistillationTrainer computes its own loss: compute_loss_func must be None")
            super().__init__(*args, **kwargs)
            if self.model is not None:
                # Freezing a teacher that is (or shares parameters with) the student froze the student too: the
                # first training step failed inside autograd ("element 0 of tensors does not require grad").
                student_params = {id(p): name for name, p in unwrap_model(self.model).named_parameters()
                                  if p.requires_grad}
                shared = [student_params[id(p)] for p in unwrap_model(teacher_model).parameters()
                          if id(p) in student_params]
                if shared:
                    what = "is the student model" if unwrap_model(teacher_model) is unwrap_model(self.model) else \
                        "shares parameters with the student model"
                    raise ValueError(
                        f"teacher_model {what} ({len(shared)} trainable parameters, e.g. {shared[0]}): the teacher "
                        f"is frozen (requires_grad_(False)), which would freeze them in the student; pass a "
                        f"separate teacher (e.g. copy.deepcopy(model))"
                    )
            # The fused loss always shifts the labels, so the Trainer's count must be of the shifted ones
            # (transformers counts them unshifted for students without a causal-LM loss_type, e.g. GPT-2).
            self._loss_shifts_labels = True
            self.teacher_model = teacher_model.eval().requires_grad_(False)
            self.distill_kwargs = checked_loss_kwargs("distill_kwargs", distill_kwargs or {},
                                                      "FusedDistillationTrainer", TRAINER_LOSS_ARGUMENTS)
            # Their values too (a bad temperature failed at the first training step, after both forwards).
            check_loss_options({name: self.distill_kwargs.get(name, default)
                                for name, default in _LOSS_DEFAULTS.items() if name in _LOSS_OPTIONS})
            smoothing = getattr(self.args, "label_smoothing_factor", 0.0)
            if smoothing and self.distill_kwargs.get("ce_weight", 0.0) > 0:
                # The Trainer smooths its own cross-entropy; the fused hard-label term has no smoothing.
                raise ValueError(
                    f"TrainingArguments(label_smoothing_factor={smoothing}) with distill_kwargs ce_weight="
                    f"{self.distill_kwargs['ce_weight']}: the fused cross-entropy term is not label-smoothed; set "
                    f"label_smoothing_factor=0 (or ce_weight=0)"
                )

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            totals = None
            if self.log_entropy:
                totals = self.__dict__.setdefault("_entropy_totals", {}).setdefault(
                    "train" if model.training else "eval",
                    torch.zeros(2, dtype=torch.float32, device=inputs["input_ids"].device))
            with trainer_autocast(self):
                return trainer_loss(model, self.teacher_model, inputs, return_outputs,
                                    trainer_normalizer(self, num_items_in_batch), totals, **self.distill_kwargs)

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            """The Trainer's step where the batch has its label columns. Without them (the fused loss then takes its
            targets from ``input_ids`` and the attention mask, as in training) the Trainer's own step would report
            no loss and run the student's plain forward, collecting its full [B, L, V] logits: here it computes the
            fused loss instead (a per-batch mean, as in training) and returns ``(loss, None, None)``."""
            if self.label_names and all(inputs.get(name) is not None for name in self.label_names):
                return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
            inputs = self._prepare_inputs(inputs)
            with torch.no_grad(), self.compute_loss_context_manager():
                loss = self.compute_loss(model, inputs)
            return loss.detach().mean(), None, None

        def _mean_entropy(self, split: str) -> Optional[float]:
            """The mean over every process of the entropy sums kept for ``split`` since they were last read."""
            totals = self.__dict__.get("_entropy_totals", {}).pop(split, None)
            if totals is None:
                return None
            # Every process reads at the same points (the Trainer gathers its loss there too): sum over them.
            entropy_sum, count = self.accelerator.reduce(totals, reduction="sum").tolist()
            return entropy_sum / count if count > 0 else None

        def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                            metric_key_prefix="eval"):
            """The Trainer's loop (``evaluate()`` and ``predict()``), with ``{metric_key_prefix}_entropy`` in its
            metrics: the entropy of this loop's tokens only (sums from an earlier loop are dropped first)."""
            self.__dict__.get("_entropy_totals", {}).pop("eval", None)
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                             metric_key_prefix)
            entropy = self._mean_entropy("eval")
            if entropy is not None and output.metrics is not None:
                output.metrics[f"{metric_key_prefix}_entropy"] = entropy
            return output

        def log(self, logs: dict, start_time: Optional[float] = None) -> None:
            if "loss" in logs:  # a training log (not an evaluation's, nor train()'s final summary)
                entropy = self._mean_entropy("train")
                if entropy is not None:
                    logs["entropy"] = entropy
            super().log(logs, start_time)

    return FusedDistillationTrainer


def _is_fsdp2(model: nn.Module) -> bool:
    """``fully_shard``-ed (FSDP2): the module itself gathers its parameters in forward pre-hooks."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


def _is_fsdp1(model: nn.Module) -> bool:
    """A ``FullyShardedDataParallel`` (FSDP1) wrapper."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # a torch built without distributed support
        return False
    return isinstance(model, FullyShardedDataParallel)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The causal LM inside ``DistributedDataParallel`` / ``DataParallel`` / ``FullyShardedDataParallel``
    wrappers (their ``.module``) and ``torch.compile`` wrappers (their ``_orig_mod``), or the model itself (an
    FSDP2 ``fully_shard``-ed model is not wrapped)."""
    return _unwrap(model)[0]


def _unwrap(model: nn.Module) -> tuple[nn.Module, Any]:
    """``(unwrap_model(model), the settings (dynamo context) of the outermost compile wrapper on the way, or
    None)``."""
    context = None
    while True:
        if _is_compiled(model):
            context, model = context or model.dynamo_ctx, model._orig_mod
        elif _is_fsdp1(model) or (
            not hasattr(model, "get_output_embeddings") and isinstance(getattr(model, "module", None), nn.Module)
        ):
            model = model.module
        else:
            return model, context


def _without_compile(model: nn.Module) -> nn.Module:
    """``model`` without its outer ``torch.compile`` wrappers."""
    while _is_compiled(model):
        model = model._orig_mod
    return model


def _force_eager():
    """Compiled modules run their original code inside (``torch.compiler.set_stance``, torch >= 2.6)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def _is_compiled(model: nn.Module) -> bool:
    """A ``torch.compile`` wrapper of a module (``OptimizedModule``: it forwards attribute reads to
    ``_orig_mod``, so it passes for the module it wraps everywhere except its forward)."""
    return isinstance(getattr(model, "_orig_mod", None), nn.Module) and hasattr(model, "dynamo_ctx")


# model -> (the compile context it was seen with, its body compiled with that context)
_COMPILED_BODIES: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _strip_compile(model: nn.Module) -> nn.Module:
    """``model`` without its outer ``torch.compile`` wrappers; when a compile wrapper was found (outside or
    inside a DDP wrapper), the causal LM's body (``get_decoder()``) is compiled with that wrapper's settings
    (backend, mode, options), once per model and settings, and :func:`causal_lm_hidden_states` runs it.

    The fused loss never calls the model's own forward (it computes logits), so without this a compiled
    student's body ran eagerly; and a compiled DDP wrapper was not recognised as DDP, so the loss ran outside
    DDP's forward and the ranks' gradients were never averaged. Sharded (FSDP) models are unwrapped but their
    body runs eagerly (compiling around FSDP's hooks is not attempted). Regional compilation (accelerate's
    ``compile_regions``: each decoder layer and the LM head compiled apart) leaves no outer wrapper and needs
    nothing here: the body calls the compiled layers, and :func:`linear_head` reads through the compiled head."""
    module, context = _unwrap(model)
    model = _without_compile(model)
    if context is not None and not is_sharded(model) and _COMPILED_BODIES.get(module, (None,))[0] is not context:
        _COMPILED_BODIES[module] = (context, context(causal_lm_body(module)))
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s own parameters are only whole inside its forward: an FSDP root
    (``FullyShardedDataParallel`` wrapper, or a ``fully_shard``-ed module)."""
    return _is_fsdp1(model) or _is_fsdp2(model)


def _refuse_unreadable_head(model: nn.Module) -> None:
    """A clear error, before any forward, for an LM head whose whole weight is not in memory outside the head's
    forward (the fused loss reads the weight itself): partitioned by DeepSpeed ZeRO-3, or on the meta device
    (accelerate's CPU / disk offloading with ``device_map``, or a model never loaded)."""
    weight = getattr(model.get_output_embeddings(), "weight", None)
    if weight is None:
        return
    if hasattr(weight, "ds_status"):
        raise NotImplementedError(
            f"{type(model).__name__}'s LM head weight is partitioned by DeepSpeed ZeRO-3 (shape "
            f"{tuple(weight.shape)}, full {tuple(getattr(weight, 'ds_shape', ()))}); the fused loss needs the whole "
            f"weight outside the head's forward: use ZeRO-1/2 or FSDP (FullyShardedDataParallel or fully_shard)"
        )
    if weight.device.type == "meta":
        raise NotImplementedError(
            f"{type(model).__name__}'s LM head weight is on the meta device (offloaded by accelerate's device_map, "
            f"or not loaded): the fused loss needs the weight itself outside the head's forward; load the model "
            f"without offloading its lm_head (device_map placing 'lm_head' on a GPU or on 'cpu')"
        )


# The FSDP2 modules whose forward is running through run_inside_forward (their parameters are gathered).
_INSIDE_FORWARD: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def run_inside_forward(wrapper: nn.Module, fn, *args: Any, **kwargs: Any):
    """``fn(*args, **kwargs)`` called from within ``wrapper``'s forward when ``wrapper`` does its work there:

    - ``DistributedDataParallel``: DDP's forward prepares its gradient reduction for the returned loss;
    - ``FullyShardedDataParallel`` (FSDP1) and a ``fully_shard``-ed module (FSDP2): the forward gathers the root's
      parameters (embeddings, final norm, LM head; the decoder layers gather theirs when called) and registers
      the hooks that gather them again for backward and reduce-scatter their gradients.

    ``fn`` runs the model's body and the fused loss instead of the model's own forward, and the model's forward is
    restored before ``fn`` runs. Otherwise (a bare model, or ``DataParallel``, whose forward would replicate the
    model and run ``fn`` once per device) ``fn`` is called directly."""
    from torch.nn.parallel import DistributedDataParallel

    wrapper = _without_compile(wrapper)  # the compiled forward would trace fn: call what it wraps
    if _is_fsdp2(wrapper):
        module = wrapper
    elif isinstance(wrapper, DistributedDataParallel) or _is_fsdp1(wrapper):
        module = wrapper.module  # what the wrapper's forward calls (a compile wrapper included: fn runs as is)
    else:
        return fn(*args, **kwargs)
    own = module.__dict__.get("forward")

    def forward(*_: Any, **__: Any):
        _restore_forward(module, own)
        _INSIDE_FORWARD.add(module)
        try:
            return fn(*args, **kwargs)
        finally:
            _INSIDE_FORWARD.discard(module)

    module.forward = forward
    try:
        return wrapper()
    finally:
        _restore_forward(module, own)


def _restore_forward(module: nn.Module, own) -> None:
    if own is None:
        module.__dict__.pop("forward", None)
    else:
        module.forward = own


def trainer_autocast(trainer):
    """The ``transformers.Trainer``'s mixed-precision context (``trainer.accelerator.autocast()``: bf16 / fp16
    autocast with ``bf16=True`` / ``fp16=True``, nothing otherwise), or a no-op context for an object whose
    accelerator has no ``autocast``.

    accelerate applies the Trainer's autocast by wrapping the model's own ``forward``; the fused loss runs the
    models' bodies and LM heads without that forward (and inside DDP / FSDP the wrapper's forward is replaced for the
    call), so a ``compute_loss`` override must enter it itself. Without it a ``bf16=True`` run computes in fp32."""
    autocast = getattr(getattr(trainer, "accelerator", None), "autocast", None)
    return autocast() if callable(autocast) else contextlib.nullcontext()


def trainer_normalizer(trainer, num_items_in_batch: float | Tensor | None) -> float | Tensor | None:
    """What a ``transformers.Trainer`` subclass's fused loss divides its sum by, given the ``num_items_in_batch``
    the Trainer passes to ``compute_loss`` (``None`` stays ``None``: a per-batch mean).

    With ``average_tokens_across_devices`` (the default) the Trainer counts the scored tokens of every
    data-parallel rank, and its own ``compute_loss`` multiplies each rank's loss by the number of ranks, because
    DDP averages the ranks' gradients: the count is divided by that number here (``num_processes`` over the
    tensor-parallel size, as the Trainer does). Under ``DataParallel`` (several GPUs, one process) the Trainer
    hands one count per GPU: the whole batch's with ``average_tokens_across_devices``, else that count floor-divided
    by the number of GPUs (each replica's share); the fused loss runs once on the whole batch, so it divides by the
    whole count: the first as is, the second times the number of GPUs (the sum over replicas of the Trainer's own
    per-replica normaliser). An MoE student's load-balancing term is added after the division and is not scaled: its
    weight stays ``router_aux_loss_coef`` whatever the number of ranks."""
    args = getattr(trainer, "args", None)
    if num_items_in_batch is None or args is None:  # no TrainingArguments: not a Trainer's call
        return num_items_in_batch
    if torch.is_tensor(num_items_in_batch) and num_items_in_batch.dim() > 0:
        num_items_in_batch = num_items_in_batch.reshape(-1)[0]  # DataParallel: the count repeated per GPU
    n_gpu = getattr(args, "n_gpu", 1)
    if n_gpu > 1:
        averaged = getattr(args, "average_tokens_across_devices", False)
        return num_items_in_batch if averaged else num_items_in_batch * n_gpu
    if not getattr(args, "average_tokens_across_devices", False):
        return num_items_in_batch
    get_tp_size = getattr(trainer, "get_tp_size", None)
    ranks = trainer.accelerator.num_processes // (get_tp_size() if callable(get_tp_size) else 1)
    return num_items_in_batch / ranks if ranks > 1 else num_items_in_batch


# The entries of a collated batch that describe packed sequences (``transformers.DataCollatorWithFlattening``):
# passed to both models' bodies by trainer_loss.
PACKING_KEYS = ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


# Batch entries trainer_loss refuses rather than drops (see its docstring): inputs of multimodal models.
# token_type_ids: GPT-2-family bodies add an embedding of them to the hidden states (a tokenizer that lists them in
# model_input_names puts them in the batch, and the Trainer keeps them for a model whose forward takes them).
_REFUSED_INPUT_PREFIXES = ("pixel_values", "pixel_attention_mask", "image_", "video_", "input_features", "audio",
                           "inputs_embeds", "mm_token_type_ids", "second_per_grid_ts", "token_type_ids")


def checked_loss_kwargs(name: str, kwargs: Any, owner: str, set_by_owner: dict[str, str]) -> dict:
    """``kwargs`` (a trainer's ``name``: keyword arguments it adds to :func:`causal_lm_distillation_loss`) as a
    dict, after a ``ValueError`` for a key that is not one of that function's keyword-only arguments (a typo would
    otherwise surface as a ``TypeError`` at the first training step) or that ``owner`` sets itself
    (``set_by_owner``: each such argument and where its value comes from; Python's "got multiple values for
    keyword argument" did not say)."""
    if not isinstance(kwargs, Mapping):
        raise TypeError(f"{name} must be a mapping of keyword arguments, got {type(kwargs).__name__}")
    unknown = sorted(key for key in kwargs if key not in _LOSS_KEYWORDS)
    if unknown:
        raise ValueError(
            f"{name} has {unknown}, not among the keyword-only arguments of causal_lm_distillation_loss it can pass "
            f"on (the models, ids, labels and attention mask come from the batch): {', '.join(_LOSS_KEYWORDS)}"
        )
    taken = [key for key in kwargs if key in set_by_owner]
    if taken:
        raise ValueError(
            f"{name} sets {taken}, which {owner} sets itself: "
            + "; ".join(f"{key} from {set_by_owner[key]}" for key in taken)
        )
    return dict(kwargs)


# What the trainers built on trainer_loss set themselves (from the Trainer's count of tokens, the batch, log_entropy).
TRAINER_LOSS_ARGUMENTS = {
    "normalizer": "the Trainer's num_items_in_batch", "model_kwargs": "the batch's packed-sequence entries",
    "return_entropy": "log_entropy",
}


def trainer_loss(student: nn.Module, teacher: nn.Module, inputs: dict, return_outputs: bool = False,
                 num_items_in_batch: float | Tensor | None = None, entropy_totals: Optional[Tensor] = None,
                 **distill_kwargs: Any):
    """A ``Trainer.compute_loss`` body: :func:`causal_lm_distillation_loss` on a collated batch
    (``input_ids``, optional ``labels`` / ``attention_mask``, and the packed-sequence entries of
    :data:`PACKING_KEYS`: ``position_ids``, flash-attention boundaries) with ``normalizer=num_items_in_batch``.
    Other entries are not passed to the models, and entries that would change what the models compute if they
    were are refused with a ``ValueError`` naming them, rather than silently left out: multimodal inputs
    (``pixel_values*``, ``image_*``, ``video_*``, ``input_features``, ``audio*``, ``inputs_embeds``, ...; the fused
    loss runs the language model's body on ``input_ids`` only), ``token_type_ids`` (GPT-2-family bodies embed them)
    and ``shift_labels`` (pre-shifted labels, as context-parallel training passes them; the fused loss shifts
    ``labels`` itself).

    Models wrapped by the Trainer for data parallelism (``DistributedDataParallel``) or sharded (FSDP1 / FSDP2)
    are handled by :func:`causal_lm_distillation_loss`.

    With ``return_outputs`` returns ``(loss, {"loss": loss})``: no logits exist to return, and the Trainer's
    evaluation reads the outputs' other entries as its logits (none here; ``None`` in their place fails
    ``Trainer.evaluate``).

    ``entropy_totals``: a float ``[2]`` tensor on the loss's device; when given, the student's entropy at the
    loss's temperature is computed in the same pass (``return_entropy``) and its sum over the scored positions and
    their count are added to it in place (no host synchronisation), for the Trainer to log."""
    refused = [key for key in inputs if key == "shift_labels" or key.startswith(_REFUSED_INPUT_PREFIXES)]
    if refused:
        raise ValueError(
            f"trainer_loss passes only input_ids, labels, attention_mask and {PACKING_KEYS} to the models' language "
            f"bodies; the batch also holds {refused}, which would change what they compute (multimodal inputs, "
            f"token_type_ids and pre-shifted labels are not supported): remove them from the batch if they are not "
            f"needed"
        )
    loss = causal_lm_distillation_loss(
        student,
        teacher,
        inputs["input_ids"],
        labels=inputs.get("labels"),
        attention_mask=inputs.get("attention_mask"),
        normalizer=num_items_in_batch,
        model_kwargs={key: inputs[key] for key in PACKING_KEYS if key in inputs},
        return_entropy=entropy_totals is not None,
        **distill_kwargs,
    )
    if entropy_totals is not None:
        loss, entropy = loss
        ignore_index = distill_kwargs.get("ignore_index", -100)
        scored = shift_labels(inputs["input_ids"], inputs.get("labels"), inputs.get("attention_mask"),
                              ignore_index) != ignore_index
        entropy_totals += torch.stack([entropy.sum(), scored.sum().to(entropy.dtype)]).to(entropy_totals.device)
    return (loss, {"loss": loss}) if return_outputs else loss


_LOSS_KEYWORDS = tuple(name for name, parameter in inspect.signature(causal_lm_distillation_loss).parameters.items()
                       if parameter.kind is inspect.Parameter.KEYWORD_ONLY)
_LOSS_DEFAULTS = {name: inspect.signature(causal_lm_distillation_loss).parameters[name].default
                  for name in _LOSS_KEYWORDS}
# The keys check_loss_options reads (the options causal_lm_distillation_loss passes to fused_linear_kl_div).
_LOSS_OPTIONS = ("divergence", "beta", "alpha", "temperature", "kl_weight", "ce_weight", "ignore_index", "reduction",
                 "normalizer", "vocab_size", "impl", "return_entropy")


def __getattr__(name: str):
    # transformers is imported on first use only (importing it takes seconds).
    if name == "FusedDistillationTrainer":
        trainer = _trainer_class()
        globals()[name] = trainer
        return trainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
