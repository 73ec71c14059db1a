"""TRL integration: GKD and on-policy distillation (``DistillationTrainer``) with our fused losses.

TRL's ``GKDTrainer`` scores the student against the teacher with ``generalized_jsd_loss`` over both models'
``[B, L, V]`` logits, computed eagerly: a log-softmax of each side, their mixture, two element-wise KL
tensors, each ``[B, L, V]``; TRL's ``DistillationTrainer`` has its own chunked loss. Three drop-ins:

* :func:`generalized_jsd_loss`: the same signature and the same numbers (``beta`` on the teacher side,
  ``temperature`` dividing both logits, ``labels == -100`` ignored, ``reduction`` ``"batchmean"`` / ``"sum"`` /
  ``"mean"``, ``num_items_in_batch``), computed by :func:`distill_ops.kl_div` (``divergence="jsd"``): one
  vocabulary-streamed pass, no ``[B, L, V]`` temporaries, the gradient stored in the forward.
* ``FusedGKDTrainer``: TRL's ``GKDTrainer`` (on-policy generation, ``lmbda``, ``beta``, ``seq_kd``: all TRL's)
  whose ``compute_loss`` never computes logits: both models run their bodies to the last hidden state and
  :func:`distill_ops.integrations.hf.causal_lm_distillation_loss` takes the LM heads' weights
  (``divergence="jsd"``, ``beta=self.beta``; labels shifted as TRL shifts them; ``num_items_in_batch`` as
  TRL's normalizer, except that on on-policy / ``seq_kd`` steps it counts the generated tokens, which TRL's
  does not: see ``FusedGKDTrainer.training_step``). Needs ``trl`` (``GKDTrainer`` from
  ``trl.experimental.gkd``, or ``trl`` before it moved there).
* ``FusedDistillationTrainer``: TRL's ``DistillationTrainer`` (on-policy distillation: the student generates the
  completions of the dataset's prompts, then matches the teacher's next-token distribution over them with the
  generalized JSD of ``beta``) with :func:`~distill_ops.integrations.hf.causal_lm_distillation_loss` in place of
  TRL's chunked divergence (``_chunked_divergence_loss``: cuBLAS logit tiles of both models in fp32 and TRL's
  statistics kernels). Generation, batching, the normaliser (``num_items_in_batch`` counted over the generated
  completions, divided by the number of processes) and the logged ``entropy`` metric are TRL's; the metric comes from
  ``causal_lm_distillation_loss(return_entropy=True)``, in the same pass (the student's entropy at
  ``temperature``). The student, bare or wrapped (DDP / FSDP), is routed by that helper as in
  :mod:`distill_ops.integrations.hf`. Scored tokens: the completion tokens (``completion_mask``, times
  ``tool_mask`` when present), as TRL scores them; ``beta``, ``temperature``, logit scaling and soft-capping as
  TRL applies them. Like TRL's, the loss does not enter the Trainer's autocast (``bf16=True``, the config's
  default, leaves fp32 models in fp32 there). Multimodal batches (vision-language students) are refused with a
  ``ValueError``, a trainer without a local ``teacher_model`` (TRL's server-teacher subclasses) with a
  ``NotImplementedError``. This ``FusedDistillationTrainer`` is TRL's on-policy trainer; the one of
  :mod:`distill_ops.integrations.hf` is a ``transformers.Trainer`` on a labelled dataset.

TRL's ``reduction="none"`` returns the element-wise ``[..., V]`` divergence terms, which a streamed loss never
forms: it is refused (``distill_ops.kl_div(..., divergence="jsd", reduction="none")`` gives per-token values).
Where every token is ignored, ``"mean"`` returns 0 (TRL's ``jsd.mean()`` of nothing is NaN); ``"batchmean"``
already returns 0 there in TRL.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import Tensor

from .._utils import INT_DTYPES, Impl, check_reduction, check_tensor
from ..kl_div import kl_div
from .hf import (
    _REFUSED_INPUT_PREFIXES,
    TRAINER_LOSS_ARGUMENTS,
    causal_lm_distillation_loss,
    checked_loss_kwargs,
    trainer_autocast,
    trainer_loss,
    trainer_normalizer,
)

_REDUCTIONS = ("batchmean", "sum", "mean")


def generalized_jsd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Optional[Tensor] = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    num_items_in_batch: float | Tensor | None = None,
    *,
    impl: Impl = "auto",
) -> Tensor:
    """TRL's ``GKDTrainer.generalized_jsd_loss``, fused: ``beta * KL(teacher || m) + (1 - beta) * KL(student || m)``
    with ``m = beta * teacher + (1 - beta) * student`` (``beta = 0``: forward KL(teacher || student),
    ``beta = 1``: reverse), both sides at ``temperature``, summed over the vocabulary.

    Args:
        student_logits, teacher_logits: ``[..., V]`` (TRL: ``[B, L, V]``, already shifted).
        beta: the mixture weight in [0, 1] (above; TRL's default 0.5).
        temperature: divides both sides' logits (no T^2 factor, as TRL).
        labels: ``[...]``; positions equal to -100 are ignored.
        reduction: ``"batchmean"``: the sum over kept tokens divided by their number (by the first
            dimension, the batch, without labels), as TRL; ``"sum"``; ``"mean"``: divided by kept tokens × V.
        num_items_in_batch: when given, the sum divided by it whatever ``reduction`` is (TRL's gradient
            accumulation normaliser).
        impl: as in :func:`distill_ops.kl_div`.

    Returns:
        fp32 scalar. Gradient flows to ``student_logits`` only: the teacher is read as a constant, as in every
        distill-ops loss (GKD runs it under ``no_grad``; TRL's formula would also differentiate a teacher that
        requires grad).
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(
            f"reduction must be one of {_REDUCTIONS}, got {reduction!r} (TRL's 'none' returns element-wise [..., V] "
            f"terms, which the fused loss never forms; distill_ops.kl_div(..., reduction='none') gives per-token values)"
        )
    check_tensor("student_logits", student_logits, dtypes=None)
    check_tensor("teacher_logits", teacher_logits, dtypes=None)
    if labels is not None:  # read here before kl_div checks it (reduction="mean" counts the kept tokens)
        check_tensor("labels", labels, dtypes=INT_DTYPES)
    if num_items_in_batch is not None:  # named as the caller passed it (kl_div would say normalizer)
        check_reduction("mean", num_items_in_batch, name="num_items_in_batch")
    if student_logits.dim() < 1:
        raise ValueError(f"student_logits must be [..., V], got shape {tuple(student_logits.shape)}")
    if student_logits.shape[-1:] != teacher_logits.shape[-1:]:  # kl_div's message names its own vocab_size=
        raise ValueError(
            f"student_logits and teacher_logits must have the same vocabulary size (as TRL's loss), got "
            f"{student_logits.shape[-1:]} and {teacher_logits.shape[-1:]}; distill_ops.kl_div(..., vocab_size=k) "
            f"compares their first k columns"
        )
    common = dict(divergence="jsd", beta=beta, temperature=temperature, labels=labels, ignore_index=-100, impl=impl)
    if num_items_in_batch is not None:
        return kl_div(student_logits, teacher_logits, reduction="mean", normalizer=num_items_in_batch, **common)
    if reduction == "sum":
        return kl_div(student_logits, teacher_logits, reduction="sum", **common)
    if reduction == "batchmean" and labels is not None:
        return kl_div(student_logits, teacher_logits, reduction="mean", **common)
    vocab = student_logits.shape[-1]
    if reduction == "batchmean":  # TRL divides by the first dimension here
        normalizer: float | Tensor = float(max(student_logits.shape[0], 1))
    elif labels is None:
        normalizer = float(max(student_logits.numel(), 1))
    else:
        normalizer = (labels != -100).sum().clamp_min(1).float() * vocab
    return kl_div(student_logits, teacher_logits, reduction="mean", normalizer=normalizer, **common)


def _gkd_base():
    with warnings.catch_warnings():
        # TRL 1.x warns on every import from trl.experimental (where GKD lives); the user chose GKD.
        warnings.filterwarnings("ignore", message=r".*trl\.experimental")
        try:
            from trl.experimental.gkd import GKDTrainer
        except ImportError:
            from trl import GKDTrainer
    return GKDTrainer


def _trainer_class():
    base = _gkd_base()
    after_gkd = base.__mro__[1]  # SFTTrainer: where GKDTrainer.training_step hands over after generating

    class _StopAfterGeneration(after_gkd):
        """Placed between ``GKDTrainer`` and its parent in ``FusedGKDTrainer``'s MRO: while ``_generating_only``,
        GKD's ``training_step`` stops once it has put its completions (on-policy or ``seq_kd``) in ``inputs``."""

        _generating_only = False

        def training_step(self, model, inputs, num_items_in_batch=None):
            if self._generating_only:
                return None
            return super().training_step(model, inputs, num_items_in_batch)

    class FusedGKDTrainer(base, _StopAfterGeneration):
        """TRL's ``GKDTrainer`` with the fused loss (see the module docstring); constructed exactly like it.

        ``compute_loss`` with ``return_outputs`` (asked only when predictions are wanted: ``predict()``,
        ``compute_metrics``) returns ``(loss, the student's outputs)``, as ``GKDTrainer`` does; only then does the
        student run its full forward. ``generalized_jsd_loss`` is
        :func:`distill_ops.integrations.trl.generalized_jsd_loss`.
        ``fused_loss_kwargs`` (an instance or class attribute, default empty) adds keyword arguments of
        :func:`~distill_ops.integrations.hf.causal_lm_distillation_loss` (``impl``, ``vocab_size``, ...).
        """

        generalized_jsd_loss = staticmethod(generalized_jsd_loss)
        fused_loss_kwargs: dict = {}
        _window: list = []  # this accumulation window's batches, until its completions are generated
        _window_count = None  # the token count over them, once generated

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            """The accumulation window's batches (see ``training_step``, which generates and counts them)."""
            batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
            counted = num_items_in_batch is not None and hasattr(self, "_get_num_items_in_batch")
            self._window, self._window_count = (list(batch_samples) if counted else []), None
            return batch_samples, num_items_in_batch

        def training_step(self, model, inputs, num_items_in_batch=None):
            """TRL's step, with the Trainer's token count taken over the tokens the loss scores.

            transformers counts ``num_items_in_batch`` in ``get_batch_samples``, from the dataset's labels; TRL's
            ``training_step`` then replaces the labels of an on-policy (or ``seq_kd``) micro-batch with a generated
            completion, so its loss divides a sum over the generated tokens by a count of other tokens (trl#4719:
            the on-policy loss and gradient scale with dataset length / completion length). Here the window's
            first step runs TRL's own ``training_step`` on every batch of the window, stopped after generation
            (the same ``lmbda`` draws and generation code, after the Trainer has restored its RNG state on a
            resume), counts the labels that are scored as transformers counts, and every step of the window
            divides by that count."""
            if not any(inputs is batch for batch in self._window):
                return super().training_step(model, inputs, num_items_in_batch)
            if self._window_count is None:
                self._generating_only = True
                try:
                    for batch in self._window:
                        base.training_step(self, model, batch)
                finally:
                    self._generating_only = False
                self._window_count = self._get_num_items_in_batch(self._window, self.args.device)
            count = self._window_count
            if inputs is self._window[-1]:  # the window's last step: drop the references
                self._window, self._window_count = [], None
            return after_gkd.training_step(self, model, inputs, count)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self.teacher_model.eval()
            with trainer_autocast(self):
                extra = checked_loss_kwargs("fused_loss_kwargs", self.fused_loss_kwargs, "FusedGKDTrainer", {
                    **TRAINER_LOSS_ARGUMENTS, "divergence": "GKD's loss ('jsd')",
                    "beta": f"GKDConfig.beta ({self.beta})", "return_entropy": "the trainer (it logs no entropy)"})
                loss = trainer_loss(model, self.teacher_model, inputs, False,
                                    trainer_normalizer(self, num_items_in_batch), divergence="jsd", beta=self.beta,
                                    **extra)
                if not return_outputs:
                    return loss
                # Asked for outputs only when predictions are wanted (predict(), compute_metrics): TRL's
                # prediction_step reads their logits, and GKDTrainer returns the student's outputs, so the
                # student runs its full forward here (and only here: never in training).
                with torch.no_grad():
                    outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
            return loss, outputs

    return FusedGKDTrainer


def distillation_trainer_loss(trainer, student, inputs: dict, num_items_in_batch, **fused_loss_kwargs):
    """``(loss, entropy sum, scored-token count)`` of one generated batch of TRL's ``DistillationTrainer`` (its
    ``prompt_ids`` / ``prompt_mask`` left-padded, ``completion_ids`` / ``completion_mask`` right-padded, optional
    ``tool_mask``): :func:`~distill_ops.integrations.hf.causal_lm_distillation_loss` of ``student`` (bare or wrapped
    for DDP / FSDP: the helper routes it) against ``trainer.teacher_model``."""
    refused = [key for key in inputs
               if key.startswith(_REFUSED_INPUT_PREFIXES) or key in ("spatial_shapes", "num_images",
                                                                     "num_tiles")]
    if refused:
        raise ValueError(
            f"FusedDistillationTrainer runs the models' language bodies on token ids only; the batch holds multimodal "
            f"inputs {refused} (a vision-language student): use TRL's DistillationTrainer for those"
        )
    if trainer.teacher_model is None:
        raise NotImplementedError(
            "FusedDistillationTrainer needs a local teacher_model (its hidden states and LM head); this trainer has "
            "none (a teacher served remotely gives no hidden states)"
        )
    prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
    scored = inputs["completion_mask"] if "tool_mask" not in inputs else inputs["completion_mask"] * inputs["tool_mask"]
    # Labels: none on the prompt, the completion tokens where scored (position i's target is token i + 1).
    labels = torch.cat([torch.full_like(prompt_ids, -100), torch.where(scored.bool(), completion_ids, -100)], dim=1)
    trainer.teacher_model.eval()
    loss, entropy = causal_lm_distillation_loss(
        student, trainer.teacher_model, torch.cat([prompt_ids, completion_ids], dim=1), labels,
        torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1), divergence="jsd", beta=trainer.beta,
        temperature=trainer.temperature, normalizer=num_items_in_batch, return_entropy=True, **fused_loss_kwargs,
    )
    return loss, entropy.sum(), (labels[:, 1:] != -100).sum()


def _distillation_trainer_class():
    try:
        from trl import DistillationTrainer
    except ImportError as error:
        raise ImportError(f"FusedDistillationTrainer needs trl's DistillationTrainer (trl >= 1.10): {error}") from None

    class FusedDistillationTrainer(DistillationTrainer):
        """TRL's ``DistillationTrainer`` with the fused loss (see the module docstring); constructed exactly like
        it. ``fused_loss_kwargs`` (an instance or class attribute, default empty) adds keyword arguments of
        :func:`~distill_ops.integrations.hf.causal_lm_distillation_loss` (``impl``, ``vocab_size``, ...).

        ``compute_loss`` is TRL's, with the loss computed by :func:`distillation_trainer_loss` on the Trainer's
        (possibly wrapped) model: the normaliser is the count of generated tokens TRL puts in the batch, divided
        by the number of processes (DDP averages the gradients), and the mean entropy over the scored tokens of
        every process is logged as TRL logs it (each step's value stays on the device until ``log``)."""

        fused_loss_kwargs: dict = {}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.model.training and inputs.get("num_items_in_batch") is not None:
                # transformers counted the dataset's tokens, before generation; TRL counts the completions.
                num_items_in_batch = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            extra = checked_loss_kwargs("fused_loss_kwargs", self.fused_loss_kwargs, "FusedDistillationTrainer", {
                "divergence": "the generalized JSD ('jsd')", "beta": f"the config's beta ({self.beta})",
                "temperature": f"the config's temperature ({self.temperature})",
                "normalizer": "TRL's count of generated tokens", "return_entropy": "the entropy metric",
                "ignore_index": "the labels it builds (-100 outside the scored completion tokens)"})
            loss, entropy_sum, count = distillation_trainer_loss(self, model, inputs, num_items_in_batch, **extra)
            # The metric's collectives run after the loss (never inside a wrapper's forward).
            count = self.accelerator.gather_for_metrics(count).sum()
            entropy_sum = self.accelerator.gather_for_metrics(entropy_sum.detach()).sum()
            mode = "train" if self.model.training else "eval"
            # Kept on the device (no host read per step): log() reads the step values once.
            self._metrics[mode]["entropy"].append(torch.where(count > 0, entropy_sum / count.clamp(min=1), 0.0))
            return (loss, None) if return_outputs else loss

        def log(self, logs, start_time=None):
            for metrics in self._metrics.values():
                # TRL's log averages floats and clears only the current mode's list: an eval log between two
                # train logs leaves the train list's floats followed by the next steps' tensors (one tensor
                # average in log_history broke the checkpoint's JSON; a review, 2026-12-07).
                values = metrics.get("entropy") or []
                tensors = [value for value in values if torch.is_tensor(value)]
                if tensors:
                    floats = iter(torch.stack(tensors).tolist())
                    metrics["entropy"] = [next(floats) if torch.is_tensor(value) else value for value in values]
            super().log(logs, start_time)

    return FusedDistillationTrainer


_TRAINERS = {"FusedGKDTrainer": _trainer_class, "FusedDistillationTrainer": _distillation_trainer_class}


def __getattr__(name: str) -> Any:
    # trl (and transformers) are imported on first use only.
    if name in _TRAINERS:
        trainer = _TRAINERS[name]()
        globals()[name] = trainer
        return trainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

