"""TRL integration: GKD (generalized knowledge distillation) with our fused losses.

TRL's ``GKDTrainer`` scores the student against the teacher with ``generalized_jsd_loss`` over both models'
``[B, L, V]`` logits, computed eagerly: a log-softmax of each side, their mixture, two element-wise KL
tensors, each ``[B, L, V]``. Two drop-ins:

* :func:`generalized_jsd_loss`: the same signature and the same numbers (``beta`` on the teacher side,
  ``temperature`` dividing both logits, ``labels == -100`` ignored, ``reduction`` ``"batchmean"`` / ``"sum"`` /
  ``"mean"``, ``num_items_in_batch``), computed by :func:`distill_ops.kl_div` (``divergence="jsd"``): one
  vocabulary-streamed pass, no ``[B, L, V]`` temporaries, the gradient stored in the forward.
* ``FusedGKDTrainer``: TRL's ``GKDTrainer`` (on-policy generation, ``lmbda``, ``beta``, ``seq_kd``: all TRL's)
  whose ``compute_loss`` never computes logits: both models run their bodies to the last hidden state and
  :func:`distill_ops.integrations.hf.causal_lm_distillation_loss` takes the LM heads' weights
  (``divergence="jsd"``, ``beta=self.beta``; labels shifted as TRL shifts them; ``num_items_in_batch`` as
  TRL's normalizer). Needs ``trl`` (``GKDTrainer`` from ``trl.experimental.gkd``, or ``trl`` before it moved
  there).

TRL's ``reduction="none"`` returns the element-wise ``[..., V]`` divergence terms, which a streamed loss never
forms: it is refused (``distill_ops.kl_div(..., divergence="jsd", reduction="none")`` gives per-token values).
Where every token is ignored, ``"mean"`` returns 0 (TRL's ``jsd.mean()`` of nothing is NaN); ``"batchmean"``
already returns 0 there in TRL.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

from torch import Tensor

from ..kl_div import kl_div
from .hf import trainer_autocast, trainer_loss, trainer_normalizer

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
    impl: str = "auto",
) -> Tensor:
    """TRL's ``GKDTrainer.generalized_jsd_loss``, fused: ``beta * KL(teacher || m) + (1 - beta) * KL(student || m)``
    with ``m = beta * teacher + (1 - beta) * student`` (``beta = 0``: forward KL(teacher || student),
    ``beta = 1``: reverse), both sides at ``temperature``, summed over the vocabulary.

    Args:
        student_logits, teacher_logits: ``[..., V]`` (TRL: ``[B, L, V]``, already shifted).
        labels: ``[...]``; positions equal to -100 are ignored.
        reduction: ``"batchmean"``: the sum over kept tokens divided by their number (by the first
            dimension, the batch, without labels), as TRL; ``"sum"``; ``"mean"``: divided by kept tokens × V.
        num_items_in_batch: when given, the sum divided by it whatever ``reduction`` is (TRL's gradient
            accumulation normaliser).
        impl: as in :func:`distill_ops.kl_div`.

    Returns:
        fp32 scalar.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(
            f"reduction must be one of {_REDUCTIONS}, got {reduction!r} (TRL's 'none' returns element-wise [..., V] "
            f"terms, which the fused loss never forms; distill_ops.kl_div(..., reduction='none') gives per-token values)"
        )
    if student_logits.dim() < 1:
        raise ValueError(f"student_logits must be [..., V], got shape {tuple(student_logits.shape)}")
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

    class FusedGKDTrainer(base):
        """TRL's ``GKDTrainer`` with the fused loss (see the module docstring); constructed exactly like it.

        ``compute_loss`` returns ``(loss, {"loss": loss})`` with ``return_outputs``: there are no student logits
        to return. ``generalized_jsd_loss`` is :func:`distill_ops.integrations.trl.generalized_jsd_loss`.
        ``fused_loss_kwargs`` (an instance or class attribute, default empty) adds keyword arguments of
        :func:`~distill_ops.integrations.hf.causal_lm_distillation_loss` (``impl``, ``vocab_size``, ...).
        """

        generalized_jsd_loss = staticmethod(generalized_jsd_loss)
        fused_loss_kwargs: dict = {}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self.teacher_model.eval()
            with trainer_autocast(self):
                return trainer_loss(model, self.teacher_model, inputs, return_outputs,
                                    trainer_normalizer(self, num_items_in_batch), divergence="jsd", beta=self.beta,
                                    **self.fused_loss_kwargs)

    return FusedGKDTrainer


def __getattr__(name: str) -> Any:
    # trl (and transformers) are imported on first use only.
    if name == "FusedGKDTrainer":
        trainer = _trainer_class()
        globals()[name] = trainer
        return trainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

