"""distill_ops.integrations.hf and fspad_draft_loss against the same losses computed from explicit logits."""

import copy
import datetime
import os

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from distill_ops import kl_div  # noqa: E402
from distill_ops.fspad_loss import fspad_draft_loss  # noqa: E402
from distill_ops.integrations.hf import causal_lm_distillation_loss  # noqa: E402
from tests.conftest import DEVICE, IMPLS, assert_close  # noqa: E402

VOCAB = 96


def _tiny_models():
    common = dict(vocab_size=VOCAB, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                  initializer_range=0.2)
    torch.manual_seed(0)
    student = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, **common)
    ).float()
    teacher = transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(hidden_size=48, intermediate_size=64, num_hidden_layers=2, **common)
    ).float().eval()
    return student.to(DEVICE), teacher.to(DEVICE)


def _batch():
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (2, 11), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -3:] = 0  # right padding
    labels = torch.where(attention_mask.bool(), input_ids, -100)
    labels[0, :2] = -100  # a prompt without loss
    return input_ids.to(DEVICE), attention_mask.to(DEVICE), labels.to(DEVICE)


@pytest.mark.parametrize("impl", IMPLS)
def test_helper_equals_loss_from_the_models_own_logits(impl):
    student, teacher = _tiny_models()
    input_ids, attention_mask, labels = _batch()
    kwargs = dict(divergence="jsd", beta=0.3, temperature=2.0, ce_weight=0.5)

    loss = causal_lm_distillation_loss(student, teacher, input_ids, labels, attention_mask, impl=impl, **kwargs)
    loss.backward()
    fused_grads = {name: p.grad.clone() for name, p in student.named_parameters()}
    student.zero_grad()

    out = student(input_ids=input_ids, attention_mask=attention_mask, labels=labels)  # HF shifts inside
    with torch.no_grad():
        teacher_logits = teacher(input_ids=input_ids, attention_mask=attention_mask).logits
    shifted = labels[:, 1:]
    divergence = kl_div(out.logits[:, :-1], teacher_logits[:, :-1], labels=shifted, divergence="jsd", beta=0.3,
                        temperature=2.0, impl="torch")
    expected = divergence + 0.5 * out.loss
    expected.backward()
    assert_close(loss, expected, torch.float32, "loss")
    for name, param in student.named_parameters():
        assert_close(fused_grads[name], param.grad, torch.float32, name)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("skip_ignored, reduction", [(True, "mean"), (False, "mean"), (True, "none")])
def test_helper_returns_the_students_entropy(impl, skip_ignored, reduction):
    student, teacher = _tiny_models()
    input_ids, attention_mask, labels = _batch()
    kwargs = dict(divergence="jsd", beta=0.3, temperature=2.0, impl=impl, skip_ignored=skip_ignored,
                  reduction=reduction)
    loss, entropy = causal_lm_distillation_loss(student, teacher, input_ids, labels, attention_mask,
                                                return_entropy=True, **kwargs)
    assert_close(loss, causal_lm_distillation_loss(student, teacher, input_ids, labels, attention_mask, **kwargs),
                 torch.float32, "loss")
    with torch.no_grad():
        logits = student(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].double()
    log_q = torch.log_softmax(logits / 2.0, dim=-1)
    scored = labels[:, 1:] != -100
    expected = torch.where(scored, -(log_q.exp() * log_q).sum(-1), 0.0)
    assert entropy.shape == scored.shape and not entropy.requires_grad
    assert_close(entropy, expected, torch.float32, "entropy")
    assert (expected[scored] > 1.0).all()


def test_helper_without_labels_ignores_padding_and_uses_normalizer():
    student, teacher = _tiny_models()
    input_ids, attention_mask, _ = _batch()
    loss = causal_lm_distillation_loss(student, teacher, input_ids, attention_mask=attention_mask,
                                       reduction="sum", impl="torch")
    with torch.no_grad():
        student_logits = student(input_ids=input_ids, attention_mask=attention_mask).logits
        teacher_logits = teacher(input_ids=input_ids, attention_mask=attention_mask).logits
    targets = torch.where(attention_mask.bool(), input_ids, -100)[:, 1:]
    expected = kl_div(student_logits[:, :-1], teacher_logits[:, :-1], labels=targets, reduction="sum", impl="torch")
    assert_close(loss, expected, torch.float32)
    normalized = causal_lm_distillation_loss(student, teacher, input_ids, attention_mask=attention_mask,
                                             normalizer=7.0, impl="torch")
    assert_close(normalized, expected / 7.0, torch.float32)


def test_trainer_compute_loss():
    from distill_ops.integrations.hf import FusedDistillationTrainer

    assert issubclass(FusedDistillationTrainer, transformers.Trainer)
    student, teacher = _tiny_models()
    input_ids, attention_mask, labels = _batch()
    # Trainer.__init__ needs `accelerate` (TrainingArguments); compute_loss only reads these attributes.
    trainer = object.__new__(FusedDistillationTrainer)
    trainer.teacher_model = teacher
    trainer.distill_kwargs = {"divergence": "reverse", "impl": "torch"}
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    loss = trainer.compute_loss(student, inputs, num_items_in_batch=torch.tensor(5.0))
    expected = causal_lm_distillation_loss(student, teacher, input_ids, labels, attention_mask,
                                           divergence="reverse", normalizer=5.0, impl="torch")
    assert_close(loss, expected, torch.float32)
    loss, outputs = trainer.compute_loss(student, inputs, return_outputs=True)
    assert outputs.keys() == {"loss"} and outputs["loss"] is loss  # no logits to return


def test_trainer_loss_entropy_totals_with_a_custom_ignore_index():
    """``trainer_loss``'s entropy totals (the logged mean entropy's sum and count) count the positions scored under
    the loss's own ``ignore_index`` (-1 here; a count that compared with -100 took every position)."""
    from distill_ops.integrations.hf import trainer_loss

    student, teacher = _tiny_models()
    input_ids, attention_mask, labels = _batch()
    custom = torch.where(labels == -100, -1, labels)
    totals = torch.zeros(2, dtype=torch.float64, device=DEVICE)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": custom}
    trainer_loss(student, teacher, inputs, entropy_totals=totals, ignore_index=-1, impl="torch")
    assert totals[1].item() == int((labels[:, 1:] != -100).sum())
    expected = _mean_entropy(student, input_ids, attention_mask, labels)
    assert (totals[0] / totals[1]).item() == pytest.approx(expected, rel=1e-5)


def test_trainer_trains_with_the_fused_loss(tmp_path):
    """A real ``transformers.Trainer`` step: the logged loss is the distillation loss of the batch, the
    student's update is exactly one SGD step on its gradient, and the teacher does not move."""
    from distill_ops.integrations.hf import FusedDistillationTrainer

    student, teacher = _tiny_models()
    input_ids, attention_mask, labels = _batch()
    distill_kwargs = {"divergence": "jsd", "beta": 0.3, "ce_weight": 0.5}
    student.zero_grad()
    expected = causal_lm_distillation_loss(student, teacher, input_ids, labels, attention_mask, **distill_kwargs)
    expected.backward()
    lr = 0.05
    expected_weights = {name: (p - lr * p.grad).detach().clone() for name, p in student.named_parameters()}
    student.zero_grad(set_to_none=True)
    teacher_before = {name: p.detach().clone() for name, p in teacher.named_parameters()}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, learning_rate=lr, optim="sgd",
        lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, logging_steps=1, report_to="none",
        save_strategy="no", use_cpu=DEVICE.type == "cpu", dataloader_pin_memory=False,
    )
    rows = [{"input_ids": input_ids[i], "attention_mask": attention_mask[i], "labels": labels[i]} for i in range(2)]
    trainer = FusedDistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=rows,
                                       distill_kwargs=distill_kwargs)
    expected_entropy = _mean_entropy(student, input_ids, attention_mask, labels)
    trainer.train()
    logged = [(entry["loss"], entry["entropy"]) for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 1 and logged[0][0] == pytest.approx(float(expected), rel=1e-5)
    assert logged[0][1] == pytest.approx(expected_entropy, rel=1e-5)  # the step's student, before its update
    for name, p in student.named_parameters():
        assert_close(p, expected_weights[name], torch.float32, msg=name)
    assert all(torch.equal(p, teacher_before[name]) for name, p in teacher.named_parameters())
    # Evaluation (the Trainer asks compute_loss for outputs and reads logits from them; there are none).
    expected = causal_lm_distillation_loss(student, teacher, input_ids, labels, attention_mask, **distill_kwargs)
    expected_entropy = _mean_entropy(student, input_ids, attention_mask, labels)
    for loss_only in (True, False):
        trainer.args.prediction_loss_only = loss_only
        metrics = trainer.evaluate(eval_dataset=rows)
        assert metrics["eval_loss"] == pytest.approx(float(expected), rel=1e-5)
        assert metrics["eval_entropy"] == pytest.approx(expected_entropy, rel=1e-5)
    # predict() and an evaluate() under another prefix report their own loop's entropy and leave nothing for the
    # next evaluate() (their sums used to stay behind, predict() never logging, and joined the next eval_entropy).
    flipped = input_ids.flip(-1)
    other_rows = [{"input_ids": flipped[i], "attention_mask": torch.ones_like(flipped[i]), "labels": flipped[i]}
                  for i in range(2)]
    other_entropy = _mean_entropy(student, flipped, torch.ones_like(flipped), flipped)
    assert abs(other_entropy - expected_entropy) > 1e-3
    assert trainer.predict(other_rows).metrics["test_entropy"] == pytest.approx(other_entropy, rel=1e-5)
    other_metrics = trainer.evaluate(eval_dataset=other_rows, metric_key_prefix="other")
    assert other_metrics["other_entropy"] == pytest.approx(other_entropy, rel=1e-5)
    assert trainer.evaluate(eval_dataset=rows)["eval_entropy"] == pytest.approx(expected_entropy, rel=1e-5)
    assert not any("entropy" in entry for entry in trainer.state.log_history if "train_loss" in entry)
    trainer.log_entropy = False
    assert "eval_entropy" not in trainer.evaluate(eval_dataset=rows)


def test_trainer_evaluates_a_dataset_without_labels_with_the_fused_loss(tmp_path):
    """Without a labels column the fused loss takes its targets from input_ids and the attention mask (as in
    training): evaluate() reports that loss and predict() collects no logits (the Trainer's own step reported no
    eval_loss for such a batch and ran the student's plain forward, collecting its [B, L, V] logits). A teacher given
    by name is a TypeError (it failed with an AttributeError), a compute_loss_func a ValueError (it was unused)."""
    from distill_ops.integrations.hf import FusedDistillationTrainer

    student, teacher = _tiny_models()
    input_ids, attention_mask, _ = _batch()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_eval_batch_size=2, report_to="none", use_cpu=DEVICE.type == "cpu",
        dataloader_pin_memory=False,
    )
    rows = [{"input_ids": input_ids[i], "attention_mask": attention_mask[i]} for i in range(2)]
    with pytest.raises(TypeError, match="teacher_model must be a loaded causal LM .* got str: 'Qwen/Qwen2-0.5B'"):
        FusedDistillationTrainer(model=student, teacher_model="Qwen/Qwen2-0.5B", args=args)
    with pytest.raises(ValueError, match="compute_loss_func must be None"):  # it was silently unused
        FusedDistillationTrainer(model=student, teacher_model=teacher, args=args, compute_loss_func=lambda *a, **k: 0)
    # A teacher that is, or shares parameters with, the student is refused, the student left trainable (it was
    # frozen with the teacher, and training failed inside autograd; an audit of bad inputs).
    shared = copy.deepcopy(teacher)
    shared.lm_head = student.lm_head
    for other, match in ((student, "teacher_model is the student model .*e.g. model.embed_tokens.weight"),
                         (shared, "teacher_model shares parameters with the student model .*1 trainable parameters, "
                                  "e.g. lm_head.weight")):
        with pytest.raises(ValueError, match=match):
            FusedDistillationTrainer(model=student, teacher_model=other, args=args)
        assert student.training and all(p.requires_grad for p in student.parameters())
    trainer = FusedDistillationTrainer(model=student, teacher_model=teacher, args=args,
                                       distill_kwargs={"divergence": "reverse"})
    expected = causal_lm_distillation_loss(student, teacher, input_ids, None, attention_mask, divergence="reverse")
    expected_entropy = _mean_entropy(student, input_ids, attention_mask,
                                     torch.where(attention_mask.bool(), input_ids, -100))
    calls = []
    student.register_forward_pre_hook(lambda *args: calls.append(1))  # the plain forward (logits) never runs
    metrics = trainer.evaluate(eval_dataset=rows)
    assert metrics["eval_loss"] == pytest.approx(float(expected), rel=1e-5)
    assert metrics["eval_entropy"] == pytest.approx(expected_entropy, rel=1e-5)
    output = trainer.predict(rows)
    assert output.predictions is None and output.label_ids is None
    assert output.metrics["test_loss"] == pytest.approx(float(expected), rel=1e-5)
    assert calls == []


def test_trainer_counts_shifted_labels_for_a_student_without_a_causal_lm_loss_type(tmp_path):
    """A GPT-2 student (``loss_type`` None): transformers counts its labels unshifted, position 0 included, while
    the fused loss scores the shifted ones; the trainer makes the Trainer count those, so the logged loss is the
    loss of the batch (it was smaller by the ratio of the two counts, 17/18 on this batch)."""
    from distill_ops.integrations.hf import FusedDistillationTrainer

    _, teacher = _tiny_models()
    torch.manual_seed(3)
    student = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0)).to(DEVICE)
    input_ids, attention_mask, labels = _batch()
    assert (labels[:, 0] != -100).any() and student.loss_type is None
    expected = causal_lm_distillation_loss(student, teacher, input_ids, labels, attention_mask, impl="torch")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, learning_rate=0.0, logging_steps=1,
        report_to="none", save_strategy="no", use_cpu=DEVICE.type == "cpu", dataloader_pin_memory=False,
    )
    rows = [{"input_ids": input_ids[i], "attention_mask": attention_mask[i], "labels": labels[i]} for i in range(2)]
    trainer = FusedDistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=rows,
                                       distill_kwargs={"impl": "torch"})
    trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == [pytest.approx(float(expected), rel=1e-5)]


def _mean_entropy(student, input_ids, attention_mask, labels, temperature=1.0) -> float:
    """The student's mean entropy per scored (shifted-label) position, from its own logits (float64)."""
    with torch.no_grad():
        logits = student(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].double()
    log_q = torch.log_softmax(logits / temperature, dim=-1)
    scored = labels[:, 1:] != -100
    return float((-(log_q.exp() * log_q).sum(-1))[scored].mean())


def test_trainer_bf16_runs_the_loss_under_the_trainers_autocast(tmp_path):
    """``bf16=True``: accelerate applies the Trainer's autocast by wrapping the model's own forward, which the fused
    loss never calls. The trainer enters it itself: both models' layers run in bf16, and the logged loss is the one
    computed under ``torch.autocast(bf16)``. Before this a ``bf16=True`` run computed everything in fp32 (a
    different loss, 7e-4 relative on this pair, and no mixed-precision speed)."""
    from distill_ops.integrations.hf import FusedDistillationTrainer

    student, teacher = _tiny_models()
    input_ids, attention_mask, labels = _batch()
    with torch.no_grad(), torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        expected = causal_lm_distillation_loss(student, teacher, input_ids, labels, attention_mask, impl="torch")
    fp32 = causal_lm_distillation_loss(student, teacher, input_ids, labels, attention_mask, impl="torch")
    assert abs(float(fp32) - float(expected)) > 1e-4 * float(expected)  # the check can tell them apart
    dtypes = []
    hooks = [model.model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda module, args, output: dtypes.append(output.dtype)) for model in (student, teacher)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, learning_rate=0.0, optim="sgd",
        logging_steps=1, report_to="none", save_strategy="no", use_cpu=DEVICE.type == "cpu",
        dataloader_pin_memory=False, bf16=True,
    )
    rows = [{"input_ids": input_ids[i], "attention_mask": attention_mask[i], "labels": labels[i]} for i in range(2)]
    trainer = FusedDistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=rows,
                                       distill_kwargs={"impl": "torch"})
    trainer.train()
    for hook in hooks:
        hook.remove()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(dtypes) >= 2 and set(dtypes) == {torch.bfloat16}
    assert len(logged) == 1 and logged[0] == pytest.approx(float(expected), rel=1e-5)


def _tiny_gemma2_models(student_cap, teacher_cap):
    """Gemma-2 pair (tied embeddings, logit soft-capping): caps far below 30 so that they matter at this size."""
    common = dict(vocab_size=VOCAB, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                  max_position_embeddings=64, initializer_range=0.2, attn_implementation="eager")
    torch.manual_seed(2)
    student = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, final_logit_softcapping=student_cap, **common,
    )).float()
    teacher = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        hidden_size=48, intermediate_size=64, num_hidden_layers=2, final_logit_softcapping=teacher_cap, **common,
    )).float().eval()
    return student.to(DEVICE), teacher.to(DEVICE)


@pytest.mark.parametrize("impl", IMPLS)
def test_softcapped_gemma2_equals_loss_from_the_models_own_logits(impl):
    """Gemma-2 soft-caps its logits (config.final_logit_softcapping): the helper passes each model's cap to the
    fused loss, which then equals the loss (and gradients) computed from the models' own capped logits."""
    student, teacher = _tiny_gemma2_models(student_cap=2.0, teacher_cap=1.5)
    input_ids, attention_mask, labels = _batch()
    kwargs = dict(divergence="jsd", beta=0.3, temperature=2.0)

    loss = causal_lm_distillation_loss(student, teacher, input_ids, labels, attention_mask, ce_weight=0.5,
                                       impl=impl, **kwargs)
    loss.backward()
    fused_grads = {name: p.grad.clone() for name, p in student.named_parameters()}
    student.zero_grad()

    out = student(input_ids=input_ids, attention_mask=attention_mask, labels=labels)  # capped logits, HF's CE
    with torch.no_grad():
        teacher_logits = teacher(input_ids=input_ids, attention_mask=attention_mask).logits
    assert out.logits.abs().max() < 2.0 and teacher_logits.abs().max() < 1.5
    divergence = kl_div(out.logits[:, :-1], teacher_logits[:, :-1], labels=labels[:, 1:], impl="torch", **kwargs)
    expected = divergence + 0.5 * out.loss
    expected.backward()
    assert_close(loss, expected, torch.float32, "loss")
    for name, param in student.named_parameters():
        assert_close(fused_grads[name], param.grad, torch.float32, name)

    # The caps matter here: without them the divergence moves by far more than the tolerance.
    capped = causal_lm_distillation_loss(student, teacher, input_ids, labels, attention_mask, impl="torch", **kwargs)
    student.config.final_logit_softcapping = teacher.config.final_logit_softcapping = None
    uncapped = causal_lm_distillation_loss(student, teacher, input_ids, labels, attention_mask, impl="torch",
                                           **kwargs)
    assert abs(uncapped.item() - capped.item()) > 0.05 * capped.item()


# ----------------------------------------------------------------------------------------------
# FSPAD partial-alignment loss
# ----------------------------------------------------------------------------------------------


def _fspad_reference(regress, predict, target, weight, regress_weight, logit_weight, mask, scale=1.0, cap=None,
                     beta=1.0, temperature=1.0, bias=None, reduction="mean", with_entropy=True):
    """The formula written out (EAGLE / FSPAD training code): SmoothL1 + soft cross-entropy, in float64, with the
    target's logits ``cap * tanh(scale * lm_head(h) / cap)`` (over ``temperature``); without the teacher's entropy
    the logit term is KL(p || q) = soft CE - H(p). ``none`` returns the rows (``mask`` all True)."""
    def logits(hidden):
        z = scale * (hidden.double() @ weight.double().T + (0.0 if bias is None else bias.double()))
        return (z if cap is None else cap * torch.tanh(z / cap)) / temperature

    regression = F.smooth_l1_loss(regress.double(), target.double(), reduction="none", beta=beta).mean(-1)
    teacher = torch.softmax(logits(target), dim=-1)
    student = torch.log_softmax(logits(predict), dim=-1)
    logit_term = -(teacher * student).sum(-1) - (0.0 if with_entropy else torch.special.entr(teacher).sum(-1))
    rows = regress_weight * regression + logit_weight * logit_term
    if reduction == "none":
        return rows
    return rows[mask].sum() / (mask.sum() if reduction == "mean" else 1)


@pytest.mark.parametrize("impl", IMPLS)
def test_fspad_draft_loss_normalizer_makes_micro_batches_add_up(impl):
    """``normalizer`` (as every loss takes it; fspad_draft_loss had none, so gradient accumulation over micro-batches
    of different token counts could not be exact): two sequences as micro-batches, each divided by the whole
    batch's counted tokens, sum to the full-batch mean of the float64 formula, loss and both gradients. A
    micro-batch that counts nothing with a zero normalizer (tensor or number) gives 0 with zero gradients."""
    generator = torch.Generator().manual_seed(5)
    regress, predict, target = (torch.randn(2, 7, 24, generator=generator, dtype=torch.float64).float().to(DEVICE)
                                for _ in range(3))
    weight = (torch.randn(90, 24, generator=generator, dtype=torch.float64) * 0.3).float().to(DEVICE)
    mask = torch.ones(2, 7, dtype=torch.bool, device=DEVICE)
    mask[0, :4] = False  # 3 counted tokens, then 7
    total = int(mask.sum())
    grads, loss_sum = [torch.zeros_like(regress), torch.zeros_like(predict)], 0.0
    for row in range(2):
        r, p = regress[row:row + 1].clone().requires_grad_(True), predict[row:row + 1].clone().requires_grad_(True)
        loss = fspad_draft_loss(r, p, target[row:row + 1], weight, loss_mask=mask[row:row + 1], normalizer=total,
                                impl=impl)
        loss.backward()
        grads[0][row], grads[1][row] = r.grad[0], p.grad[0]
        loss_sum = loss_sum + loss.detach()
    regress64, predict64 = (t.detach().double().requires_grad_(True) for t in (regress, predict))
    expected = _fspad_reference(regress64, predict64, target, weight, 1.0, 0.1, mask, reduction="sum") / total
    expected.backward()
    assert_close(loss_sum, expected, torch.float32, "loss")
    assert_close(grads[0], regress64.grad, torch.float32, "regress grad")
    assert_close(grads[1], predict64.grad, torch.float32, "predict grad")
    for zero in (torch.tensor(0.0, device=DEVICE), 0):
        r = regress.clone().requires_grad_(True)
        loss = fspad_draft_loss(r, predict, target, weight, loss_mask=torch.zeros_like(mask), normalizer=zero,
                                impl=impl)
        loss.backward()
        assert loss.item() == 0.0 and not r.grad.any()
    with pytest.raises(ValueError, match="normalizer only applies to reduction='mean'"):
        fspad_draft_loss(regress, predict, target, weight, reduction="sum", normalizer=total)


@pytest.mark.parametrize("impl", IMPLS)
def test_fspad_draft_loss_masked_rows_may_hold_anything(impl):
    """Rows with loss_mask False may hold NaN / inf in any input: loss and gradients equal those with finite values
    there (the regression term's gradient was NaN: smooth L1's backward at a NaN difference times the masked row's
    zero gradient)."""
    generator = torch.Generator().manual_seed(4)
    shapes = {"regress": (5, 12), "predict": (5, 12), "target": (5, 12)}
    clean = {name: torch.randn(shape, generator=generator).to(DEVICE) for name, shape in shapes.items()}
    weight = (0.3 * torch.randn(30, 12, generator=generator)).to(DEVICE)
    mask = torch.tensor([True, False, True, True, False], device=DEVICE)

    def run(values):
        regress, predict = (values[name].clone().requires_grad_(True) for name in ("regress", "predict"))
        loss = fspad_draft_loss(regress, predict, values["target"], weight, loss_mask=mask, impl=impl)
        loss.backward()
        return loss, regress.grad, predict.grad

    expected = run(clean)
    for bad in (float("nan"), float("inf")):
        for name in shapes:
            dirty = dict(clean, **{name: clean[name].clone()})
            dirty[name][1, 3] = bad
            dirty[name][4] = -bad
            for got, want in zip(run(dirty), expected):
                assert torch.equal(got, want), (name, bad)


@pytest.mark.parametrize("scale, cap, options", [
    (1.0, None, {}), (0.25, None, {}), (3.0, 2.5, {}),
    # The other weights, SmoothL1's beta and a temperature (every test used the defaults: a loss that ignored them
    # passed).
    (1.0, None, dict(regress_weight=2.5, logit_weight=0.3, smooth_l1_beta=0.5, temperature=1.7)),
])
@pytest.mark.parametrize("impl", IMPLS)
def test_fspad_draft_loss_matches_formula(impl, scale, cap, options):
    generator = torch.Generator().manual_seed(3)
    regress = torch.randn(2, 9, 40, generator=generator, dtype=torch.float64).float().to(DEVICE).requires_grad_(True)
    predict = torch.randn(2, 9, 40, generator=generator, dtype=torch.float64).float().to(DEVICE).requires_grad_(True)
    target = torch.randn(2, 9, 40, generator=generator, dtype=torch.float64).float().to(DEVICE)
    weight = (torch.randn(150, 40, generator=generator, dtype=torch.float64) * 0.3).float().to(DEVICE)
    mask = torch.ones(2, 9, dtype=torch.bool, device=DEVICE)
    mask[1, 6:] = False
    transform = dict(logit_scale=scale, softcap=cap)
    options = dict(dict(regress_weight=1.0, logit_weight=0.1, smooth_l1_beta=1.0, temperature=1.0), **options)
    loss = fspad_draft_loss(regress, predict, target, weight, loss_mask=mask, impl=impl, **transform, **options)
    loss.backward()
    regress64 = regress.detach().double().requires_grad_(True)
    predict64 = predict.detach().double().requires_grad_(True)
    expected = _fspad_reference(regress64, predict64, target, weight, options["regress_weight"],
                                options["logit_weight"], mask, scale, cap, options["smooth_l1_beta"],
                                options["temperature"])
    expected.backward()
    assert_close(loss, expected, torch.float32, "loss")
    assert_close(regress.grad, regress64.grad, torch.float32, "regress grad")
    assert_close(predict.grad, predict64.grad, torch.float32, "predict grad")
    without_entropy = fspad_draft_loss(regress, predict, target, weight, loss_mask=mask, impl=impl,
                                       include_teacher_entropy=False, **transform, **options)
    assert without_entropy.item() < loss.item()  # KL = soft CE - H(p), H(p) > 0


@pytest.mark.parametrize("impl", IMPLS)
def test_fspad_draft_loss_with_a_target_made_under_inference_mode(impl):
    """The target model's features and LM head are usually produced under torch.inference_mode(): inference tensors
    cannot be saved for backward, and the loss raised (SmoothL1 saved the target, the fused op the head). Same loss
    and gradients as with ordinary tensors."""
    generator = torch.Generator().manual_seed(5)
    regress, predict, target = (torch.randn(2, 7, 32, generator=generator).to(DEVICE) for _ in range(3))
    weight = (torch.randn(90, 32, generator=generator) * 0.3).to(DEVICE)
    with torch.inference_mode():
        frozen_target, frozen_weight = target.clone(), weight.clone()
    results = []
    for t, w in ((target, weight), (frozen_target, frozen_weight)):
        leaves = [regress.clone().requires_grad_(True), predict.clone().requires_grad_(True)]
        loss = fspad_draft_loss(*leaves, t, w, impl=impl)
        loss.backward()
        results.append((loss.detach(), *(leaf.grad for leaf in leaves)))
    assert frozen_target.is_inference() and frozen_weight.is_inference()
    for got, expected in zip(results[1], results[0]):
        assert torch.equal(got, expected)


def test_fspad_bad_inputs():
    tensor = torch.zeros(2, 3, 8)
    with pytest.raises(ValueError, match="draft_predict must have the shape"):
        fspad_draft_loss(tensor, torch.zeros(2, 3, 7), tensor, torch.zeros(10, 8))
    with pytest.raises(ValueError, match="loss_mask must have shape"):
        fspad_draft_loss(tensor, tensor, tensor, torch.zeros(10, 8), loss_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="logit_weight must be in"):
        fspad_draft_loss(tensor, tensor, tensor, torch.zeros(10, 8), logit_weight=-1.0)
    with pytest.raises(ValueError, match="logit_scale must be in"):
        fspad_draft_loss(tensor, tensor, tensor, torch.zeros(10, 8), logit_scale=0.0)
    with pytest.raises(ValueError, match="softcap must be in"):
        fspad_draft_loss(tensor, tensor, tensor, torch.zeros(10, 8), softcap=-30.0)
    with pytest.raises(TypeError, match="loss_mask must be a torch.Tensor, got list"):  # an AttributeError before
        fspad_draft_loss(tensor, tensor, tensor, torch.zeros(10, 8), loss_mask=[[True] * 3] * 2)
    # The LM head's own names (they were reported as fused_linear_kl_div's student_weight / student_bias).
    with pytest.raises(ValueError, match=r"lm_head_weight must have shape \[V >= 1, 8\]"):
        fspad_draft_loss(tensor, tensor, tensor, torch.zeros(10, 9))
    with pytest.raises(ValueError, match=r"lm_head_weight must have shape \[V >= 1, 8\] .* got \(0, 8\)"):
        fspad_draft_loss(tensor, tensor, tensor, torch.zeros(0, 8))  # named student_weight (an audit)
    with pytest.raises(ValueError, match=r"target_next_features must have a feature width d >= 1, got shape"):
        empty = torch.zeros(2, 3, 0)
        fspad_draft_loss(empty, empty, empty, torch.zeros(10, 0))  # named student_hidden
    with pytest.raises(ValueError, match=r"lm_head_bias must have shape \[10\]"):
        fspad_draft_loss(tensor, tensor, tensor, torch.zeros(10, 8), lm_head_bias=torch.zeros(9))
    # Every tensor on one device (draft_regress and loss_mask were unchecked: a device error deep in the loss,
    # after the logit term's kernel had run); a float loss_mask (0.5 read as True) is refused.
    elsewhere = torch.zeros(2, 3, 8, device="meta")
    for name, call in (("draft_regress", lambda: fspad_draft_loss(elsewhere, tensor, tensor, torch.zeros(10, 8))),
                       ("loss_mask", lambda: fspad_draft_loss(tensor, tensor, tensor, torch.zeros(10, 8),
                                                              loss_mask=torch.ones(2, 3, dtype=torch.bool,
                                                                                   device="meta")))):
        with pytest.raises(ValueError, match=f"{name} is on meta but target_next_features is on cpu"):
            call()
    with pytest.raises(TypeError, match="include_teacher_entropy must be a bool, got str"):
        fspad_draft_loss(tensor, tensor, tensor, torch.zeros(10, 8), include_teacher_entropy="no")  # read as True
    with pytest.raises(TypeError, match=r"loss_mask must have dtype in \(int64, .*bool\), got torch.float32"):
        fspad_draft_loss(tensor, tensor, tensor, torch.zeros(10, 8), loss_mask=torch.full((2, 3), 0.5))


@pytest.mark.parametrize("impl", IMPLS)
def test_helper_with_a_padded_teacher_vocabulary(impl):
    """A teacher whose LM head is padded past the shared tokenizer (resize_token_embeddings to a multiple of 64):
    without vocab_size the error names the two models' LM heads (it named fused_linear_kl_div's student_weight /
    teacher_weight, arguments the caller never passed); with vocab_size=96 the loss equals kl_div over the first 96
    columns of the models' own logits."""
    student, teacher = _tiny_models()
    teacher.resize_token_embeddings(VOCAB, pad_to_multiple_of=64)
    assert teacher.get_output_embeddings().weight.shape[0] == 128
    input_ids, attention_mask, labels = _batch()
    with pytest.raises(ValueError, match="the student model's LM head has vocabulary size 96 but the teacher model's "
                                         "LM head has 128; pass vocab_size=k"):
        causal_lm_distillation_loss(student, teacher, input_ids, labels, attention_mask, impl=impl)
    with pytest.raises(ValueError, match=r"vocab_size must be in \[1, min\(the student model's LM head vocab 96"):
        causal_lm_distillation_loss(student, teacher, input_ids, labels, attention_mask, vocab_size=100, impl=impl)
    loss = causal_lm_distillation_loss(student, teacher, input_ids, labels, attention_mask, vocab_size=VOCAB,
                                       impl=impl)
    with torch.no_grad():
        student_logits = student(input_ids=input_ids, attention_mask=attention_mask).logits
        teacher_logits = teacher(input_ids=input_ids, attention_mask=attention_mask).logits
    expected = kl_div(student_logits[:, :-1], teacher_logits[:, :-1], labels=labels[:, 1:], vocab_size=VOCAB,
                      impl="torch")
    assert_close(loss, expected, torch.float32)


def test_helper_refuses_labels_and_teacher_ids_of_another_shape_before_any_forward():
    """Labels or teacher ids not shaped like ``input_ids`` are a ``ValueError`` naming them, raised before either
    model runs (they failed later inside a boolean-mask index, after both forwards)."""
    student, teacher = _tiny_models()
    input_ids, attention_mask, labels = _batch()
    calls = []
    handle = student.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match=r"labels must have the shape of input_ids \(2, 11\), got \(2, 10\)"):
        causal_lm_distillation_loss(student, teacher, input_ids, labels[:, 1:], attention_mask)
    with pytest.raises(ValueError, match=r"teacher_input_ids must have the shape of input_ids"):
        causal_lm_distillation_loss(student, teacher, input_ids, labels, attention_mask,
                                    teacher_input_ids=input_ids[:, :-1])
    # Not a tensor: a TypeError, as in the losses (it was a ValueError); bool options must be bools ("no" read as
    # True turned the MoE router term on).
    with pytest.raises(TypeError, match="labels must be a torch.Tensor, got list"):
        causal_lm_distillation_loss(student, teacher, input_ids, labels.tolist(), attention_mask)
    for option in ("skip_ignored", "router_aux_loss"):
        with pytest.raises(TypeError, match=f"{option} must be a bool, got str: 'no'"):
            causal_lm_distillation_loss(student, teacher, input_ids, labels, attention_mask, **{option: "no"})
    # The ids, the mask, the models and model_kwargs too (an error-message audit: each reached the model's forward,
    # shift_labels or transformers' mask code, some after a full forward of the other model).
    bad_calls = (
        (TypeError, "input_ids must be a torch.Tensor, got list", dict(input_ids=input_ids.tolist())),
        (TypeError, r"input_ids must have dtype in \(int64", dict(input_ids=input_ids.float())),
        (ValueError, r"input_ids must have 2 dims, got shape \(11,\)", dict(input_ids=input_ids[0])),
        (ValueError, r"attention_mask must have the shape of input_ids \(2, 11\), got \(2, 10\)",
         dict(attention_mask=attention_mask[:, 1:])),
        (TypeError, "attention_mask must be a torch.Tensor, got list", dict(attention_mask=attention_mask.tolist())),
        (TypeError, r"teacher_input_ids must have dtype in \(int64", dict(teacher_input_ids=input_ids.float())),
        (TypeError, r"labels must have dtype in \(int64", dict(labels=labels.float())),
        (TypeError, "teacher must be a transformers causal LM .* got NoneType", dict(teacher=None)),
        (TypeError, "student must be a transformers causal LM .* got Linear", dict(student=torch.nn.Linear(2, 2))),
        (TypeError, "model_kwargs must be a dict of keyword arguments or None, got list", dict(model_kwargs=[1])),
        # Empty or out-of-range ids failed inside transformers' mask code or a model's embedding (IndexError).
        (ValueError, r"input_ids must have shape \[B, L\] with L >= 1, got \(2, 0\)",
         dict(input_ids=input_ids[:, :0], labels=None, attention_mask=None)),
        (ValueError, rf"input_ids must be token ids in \[0, {VOCAB}\) \(the student model's embedding rows\)",
         dict(input_ids=input_ids + VOCAB)),
        (ValueError, rf"teacher_input_ids must be token ids in \[0, {VOCAB}\) \(the teacher model's embedding rows\)",
         dict(teacher_input_ids=input_ids - VOCAB)),
        # An empty batch failed inside the model's attention; the loss's options were checked by
        # fused_linear_kl_div only after both forwards (an audit of bad inputs).
        (ValueError, r"input_ids must have shape \[B, L\] with B >= 1, got \(0, 11\)",
         dict(input_ids=input_ids[:0], labels=None, attention_mask=None)),
        (ValueError, r"temperature must be in \(0.0, inf\), got -1.0", dict(temperature=-1.0)),
        (ValueError, r"divergence must be one of .* got 'kl'", dict(divergence="kl")),
        (ValueError, r"beta must be in \[0.0, 1.0\], got 2.0", dict(divergence="jsd", beta=2.0)),
        (TypeError, "ce_weight must be a Python int or float, got str", dict(ce_weight="0.5")),
        (ValueError, r"impl must be one of \('auto', 'triton', 'torch'\), got 'cuda'", dict(impl="cuda")),
        (ValueError, "normalizer only applies to reduction='mean'", dict(reduction="sum", normalizer=4.0)),
        (ValueError, "vocab_size must be >= 1, got 0", dict(vocab_size=0)),
        (TypeError, "return_entropy must be a bool", dict(return_entropy=1)),
    )
    arguments = dict(student=student, teacher=teacher, input_ids=input_ids, labels=labels,
                     attention_mask=attention_mask)
    for error, match, change in bad_calls:
        with pytest.raises(error, match=match):
            causal_lm_distillation_loss(**{**arguments, **change})
    handle.remove()
    assert not calls


def _scaled_model(kind: str, hidden: int, layers: int, seed: int):
    """Tiny causal LMs whose logits are scaled: Cohere multiplies by ``logit_scale``, Granite divides by
    ``logits_scaling``, HyperCLOVA X multiplies by it (scales that are not powers of two)."""
    common = dict(vocab_size=VOCAB, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                  initializer_range=0.2, hidden_size=hidden, intermediate_size=48, num_hidden_layers=layers)
    torch.manual_seed(seed)
    if kind == "cohere":
        model = transformers.CohereForCausalLM(transformers.CohereConfig(logit_scale=0.3, **common))
    elif kind == "granite":
        model = transformers.GraniteForCausalLM(transformers.GraniteConfig(logits_scaling=3.0, **common))
    else:
        model = transformers.AutoModelForCausalLM.from_config(transformers.HyperCLOVAXConfig(logits_scaling=0.7,
                                                                                             **common))
    return model.float().to(DEVICE)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("student_kind, teacher_kind", [("cohere", "granite"), ("granite", "hyperclovax")])
def test_scaled_logits_equal_loss_from_the_models_own_logits(impl, student_kind, teacher_kind):
    """Models that scale their LM head's output (TRL's chunked loss reads the same config fields; a helper that
    ignored them scored different distributions): loss and student gradients equal those of the models' own
    logits."""
    from distill_ops.integrations.hf import logit_scale

    student = _scaled_model(student_kind, 32, 1, 0)
    teacher = _scaled_model(teacher_kind, 48, 2, 1).eval()
    expected_scales = {"cohere": 0.3, "granite": 1 / 3.0, "hyperclovax": 0.7}
    assert logit_scale(student) == pytest.approx(expected_scales[student_kind], rel=1e-12)
    assert logit_scale(teacher) == pytest.approx(expected_scales[teacher_kind], rel=1e-12)
    input_ids, attention_mask, labels = _batch()
    loss = causal_lm_distillation_loss(student, teacher, input_ids, labels, attention_mask, divergence="reverse",
                                       temperature=1.5, ce_weight=0.5, impl=impl)
    loss.backward()
    fused_grads = {name: p.grad.clone() for name, p in student.named_parameters()}
    student.zero_grad()
    out = student(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    with torch.no_grad():
        teacher_logits = teacher(input_ids=input_ids, attention_mask=attention_mask).logits
    expected = kl_div(out.logits[:, :-1], teacher_logits[:, :-1], labels=labels[:, 1:], divergence="reverse",
                      temperature=1.5, impl="torch") + 0.5 * out.loss
    expected.backward()
    assert_close(loss, expected, torch.float32, "loss")
    for name, param in student.named_parameters():
        assert_close(fused_grads[name], param.grad, torch.float32, name)
    assert student.training and not teacher.training  # the probe restored each mode


def test_logit_scale_is_probed_once_and_refuses_other_transforms():
    from distill_ops.integrations.hf import logit_scale

    student, _ = _tiny_models()
    calls = []
    handle = student.register_forward_hook(lambda *args: calls.append(1))
    assert logit_scale(student) == 1.0 and logit_scale(student) == 1.0
    handle.remove()
    assert len(calls) == 1  # cached per model

    class OffsetLogits(transformers.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits + 1.0  # not softcap(scale * lm_head(hidden))
            return out

    torch.manual_seed(0)
    odd = OffsetLogits(student.config).to(DEVICE)
    with pytest.raises(ValueError, match="OffsetLogits's logits are not its LM head's output"):
        causal_lm_distillation_loss(odd, odd, _batch()[0], impl="torch")


def _destroy_group() -> None:
    """Tear down the default process group once the DDP wrappers on it are gone (the caller drops its references
    first): a DDP reducer freed after ``destroy_process_group`` destroys the gloo group itself, joining its worker
    threads while holding the GIL, which hung one CI run."""
    import gc

    import torch.distributed as dist

    gc.collect()
    dist.barrier()  # the group's queued work is done
    dist.destroy_process_group()


def test_trainer_loss_runs_inside_a_ddp_wrapper(tmp_path):
    """Under data parallelism the Trainer passes ``DistributedDataParallel(student)``: the loss is computed from
    the wrapped model inside DDP's forward (which prepares DDP's gradient reduction), with the same loss and
    gradients as the bare model (one-process gloo group on the CPU)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from distill_ops.integrations.hf import trainer_loss, unwrap_model

    student, teacher = (model.cpu() for model in _tiny_models())  # gloo: CPU tensors
    inputs = dict(zip(("input_ids", "attention_mask", "labels"), (tensor.cpu() for tensor in _batch())))
    kwargs = dict(divergence="jsd", beta=0.3, impl="torch")
    expected = trainer_loss(student, teacher, inputs, num_items_in_batch=9.0, **kwargs)
    expected.backward()
    expected_grads = {name: p.grad.clone() for name, p in student.named_parameters()}
    student.zero_grad(set_to_none=True)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(student)
        assert unwrap_model(wrapped) is student
        calls = []
        wrapped.register_forward_pre_hook(lambda *args: calls.append(1))
        loss, outputs = trainer_loss(wrapped, teacher, inputs, return_outputs=True, num_items_in_batch=9.0,
                                     **kwargs)
        loss.backward()
    finally:
        wrapped = None
        _destroy_group()
    assert calls == [1] and "forward" not in student.__dict__  # DDP's forward ran; the model's own is back
    assert outputs == {"loss": loss}
    assert_close(loss, expected, torch.float32)
    for name, p in student.named_parameters():
        assert_close(p.grad, expected_grads[name], torch.float32, msg=name)


def test_trainer_loss_unwraps_data_parallel_without_running_its_forward():
    """``DataParallel`` (the Trainer's choice for several GPUs in one process) would replicate the model and run
    the loss once per device inside its forward: the loss is computed once, on the unwrapped model."""
    from distill_ops.integrations.hf import trainer_loss

    student, teacher = _tiny_models()
    input_ids, attention_mask, labels = _batch()
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    expected = trainer_loss(student, teacher, inputs, impl="torch")
    wrapped = torch.nn.DataParallel(student, device_ids=[])  # any device list: its forward must not run
    calls = []
    wrapped.register_forward_pre_hook(lambda *args: calls.append(1))
    assert_close(trainer_loss(wrapped, teacher, inputs, impl="torch"), expected, torch.float32)
    assert calls == []


class _GraphRecorder:
    """A ``torch.compile`` backend that records the FX graphs dynamo hands it and runs them as they are."""

    def __init__(self):
        self.graphs, self.shapes = [], set()

    def __call__(self, graph_module, example_inputs):
        self.graphs.append(graph_module)
        self.shapes |= {tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)}
        return graph_module.forward

    def targets(self) -> str:
        return " ".join(str(node.target) for graph in self.graphs for node in graph.graph.nodes)

    def output_shapes(self) -> list:
        """Shapes of every tensor the graphs return (logits would end with the vocabulary)."""
        outputs = [node.args[0] for graph in self.graphs for node in graph.graph.nodes if node.op == "output"]
        values = [getattr(arg, "meta", {}).get("example_value") for args in outputs
                  for arg in (args if isinstance(args, (tuple, list)) else (args,))]
        return [tuple(value.shape) for value in values if isinstance(value, torch.Tensor)]


@pytest.mark.parametrize("where", ["student", "student-and-teacher", "inside-ddp", "regional"])
def test_compiled_models_run_their_bodies_compiled(tmp_path, where):
    """A ``torch.compile``-d student (and teacher; or a compiled student inside a DDP wrapper; or accelerate's
    regional compilation, which compiles each decoder layer and the LM head apart): the fused loss runs each body
    through the compile wrapper's own backend (here one that records the graphs), never the LM head, and gives the
    loss and gradients of the eager models. Before this the bodies ran eagerly (and a regionally compiled head
    was refused as not an ``nn.Linear``)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from distill_ops.integrations.hf import trainer_loss, unwrap_model

    torch._dynamo.reset()
    student, teacher = (model.cpu() for model in _tiny_models())
    inputs = dict(zip(("input_ids", "attention_mask", "labels"), (tensor.cpu() for tensor in _batch())))
    kwargs = dict(divergence="jsd", ce_weight=0.5, impl="torch")
    student_backend, teacher_backend = _GraphRecorder(), _GraphRecorder()
    if where == "regional":
        from accelerate.utils import compile_regions

        compiled = compile_regions(student, backend=student_backend)  # a copy sharing the parameters
    else:
        compiled = torch.compile(student, backend=student_backend)
    compiled_teacher = torch.compile(teacher, backend=teacher_backend) if where == "student-and-teacher" else teacher
    if where == "inside-ddp":
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
        compiled = DistributedDataParallel(compiled)
    runs = []
    try:
        assert (unwrap_model(compiled) is student) != (where == "regional")
        for _ in range(2):  # the second call reuses the compiled bodies
            student.zero_grad(set_to_none=True)
            loss = trainer_loss(compiled, compiled_teacher, inputs, **kwargs)
            loss.backward()
            runs.append((loss.detach(), {name: p.grad.clone() for name, p in student.named_parameters()},
                         len(student_backend.graphs), len(teacher_backend.graphs)))
    finally:
        if where == "inside-ddp":
            compiled = None
            _destroy_group()
    student.zero_grad(set_to_none=True)
    expected = trainer_loss(student, teacher, inputs, **kwargs)
    expected.backward()
    for loss, grads, student_graphs, teacher_graphs in runs:
        assert_close(loss, expected, torch.float32)
        for name, p in student.named_parameters():
            assert_close(grads[name], p.grad, torch.float32, msg=name)
        assert student_graphs >= 1 and (teacher_graphs >= 1) == (where == "student-and-teacher")
    assert runs[0][2:] == runs[1][2:]  # nothing recompiled
    # The bodies' graphs only: no logits (a regionally compiled head is compiled apart and never called).
    shapes = student_backend.output_shapes() + teacher_backend.output_shapes()
    assert shapes and not [shape for shape in shapes if shape[-1] == VOCAB]
    assert "embedding" in student_backend.targets() and "rsqrt" in student_backend.targets()
    # The one-time logit-scale probe (a [1, 2] input, in the first call) runs eagerly: no graph for it.
    assert (2, 11) in student_backend.shapes and (1, 2) not in student_backend.shapes | teacher_backend.shapes
    torch._dynamo.reset()


def test_trainer_torch_compile_runs_the_compiled_body(tmp_path):
    """``TrainingArguments(torch_compile=True)``: accelerate compiles the student; the fused Trainer's loss runs the
    student's body compiled with that backend and logs the eager models' loss."""
    from distill_ops.integrations import hf as hf_integration

    torch._dynamo.reset()
    student, teacher = (model.cpu() for model in _tiny_models())
    input_ids, attention_mask, labels = (tensor.cpu() for tensor in _batch())
    expected = causal_lm_distillation_loss(student, teacher, input_ids, labels, attention_mask, impl="torch")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, learning_rate=0.05, optim="sgd",
        logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, dataloader_pin_memory=False,
        torch_compile=True, torch_compile_backend="eager",
    )
    rows = [{"input_ids": input_ids[i], "attention_mask": attention_mask[i], "labels": labels[i]} for i in range(2)]
    trainer = hf_integration.FusedDistillationTrainer(model=student, teacher_model=teacher, args=args,
                                                      train_dataset=rows, distill_kwargs={"impl": "torch"})
    trainer.train()
    assert hf_integration._is_compiled(trainer.model_wrapped)
    context, body = hf_integration._COMPILED_BODIES[student]
    assert context is trainer.model_wrapped.dynamo_ctx and body._orig_mod is student.get_decoder()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == [pytest.approx(float(expected), rel=1e-5)]
    torch._dynamo.reset()


def _ddp_rank(rank: int, world: int, rendezvous: str, out_dir: str, compiled: bool = False) -> None:
    """One rank of ``test_ddp_averages_the_fused_loss_gradients_across_ranks``: row ``rank`` of the batch;
    ``compiled``: ``torch.compile(DistributedDataParallel(student))``, what accelerate builds for
    ``TrainingArguments(torch_compile=True)`` (the compile wrapper goes on last)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from distill_ops.integrations.hf import trainer_loss

    torch.set_num_threads(1)
    # A rank that fails makes the other wait in the teardown's barrier: a minute, not gloo's default half hour.
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        student, teacher = (model.cpu() for model in _tiny_models())
        batch = [tensor.cpu()[rank:rank + 1] for tensor in _batch()]
        inputs = dict(zip(("input_ids", "attention_mask", "labels"), batch))
        wrapped = DistributedDataParallel(student)
        if compiled:
            wrapped = torch.compile(wrapped, backend="eager")
        trainer_loss(wrapped, teacher, inputs, num_items_in_batch=15.0, divergence="reverse", impl="torch").backward()
        torch.save({name: p.grad for name, p in student.named_parameters()}, f"{out_dir}/rank{rank}.pt")
    finally:
        wrapped = None
        _destroy_group()


@pytest.mark.parametrize("compiled", [False, True])
def test_ddp_averages_the_fused_loss_gradients_across_ranks(tmp_path, compiled):
    """Two gloo ranks on the CPU, one sequence each: after backward through the DDP-wrapped student, both ranks
    hold the average of the two sequences' gradients (DDP's reduction ran for a loss computed by the fused path
    inside its forward), also when the DDP wrapper is itself ``torch.compile``-d."""
    import torch.multiprocessing as mp

    from distill_ops.integrations.hf import trainer_loss

    mp.start_processes(_ddp_rank, args=(2, str(tmp_path / "rendezvous"), str(tmp_path), compiled), nprocs=2,
                       start_method="spawn")
    student, teacher = (model.cpu() for model in _tiny_models())
    batch = [tensor.cpu() for tensor in _batch()]
    expected = {name: torch.zeros_like(p) for name, p in student.named_parameters()}
    for row in range(2):
        inputs = dict(zip(("input_ids", "attention_mask", "labels"), (tensor[row:row + 1] for tensor in batch)))
        student.zero_grad(set_to_none=True)
        trainer_loss(student, teacher, inputs, num_items_in_batch=15.0, divergence="reverse", impl="torch").backward()
        for name, p in student.named_parameters():
            expected[name] += p.grad / 2
    for rank in range(2):
        grads = torch.load(tmp_path / f"rank{rank}.pt")
        for name, grad in grads.items():
            assert_close(grad, expected[name], torch.float32, msg=f"rank {rank} {name}")


@pytest.mark.parametrize("impl, ignore_index", [(impl, -100) for impl in IMPLS] + [("torch", -1)])
def test_skip_ignored_scores_only_labelled_positions(impl, ignore_index, monkeypatch):
    """Only the scored positions reach the fused op (prompt and padding rows skipped): the same loss and
    gradients as sending every row; every row ignored gives 0 and zero gradients; ``reduction="none"`` keeps
    ``[B, L-1]``. Also with ``ignore_index=-1`` (a selection that compared with -100 sent every row)."""
    import distill_ops.integrations.hf as hf_integration

    student, teacher = _tiny_models()
    input_ids, attention_mask, labels = _batch()
    labels = torch.where(labels == -100, ignore_index, labels)
    kwargs = dict(divergence="jsd", beta=0.3, ce_weight=0.5, impl=impl, ignore_index=ignore_index)
    rows_seen = []
    original = hf_integration.fused_linear_kl_div

    def recording(student_hidden, *args, **kw):
        rows_seen.append(student_hidden.shape[:-1])
        return original(student_hidden, *args, **kw)

    monkeypatch.setattr(hf_integration, "fused_linear_kl_div", recording)
    results = []
    for skip in (True, False):
        student.zero_grad(set_to_none=True)
        loss = causal_lm_distillation_loss(student, teacher, input_ids, labels, attention_mask, skip_ignored=skip,
                                           **kwargs)
        loss.backward()
        results.append((loss.detach(), {name: p.grad.clone() for name, p in student.named_parameters()}))
    scored = int((labels[:, 1:] != ignore_index).sum())
    assert rows_seen == [(scored,), (2, labels.shape[1] - 1)] and scored < 2 * (labels.shape[1] - 1)
    (loss, grads), (expected, expected_grads) = results
    assert_close(loss, expected, torch.float32)
    for name, grad in grads.items():
        assert_close(grad, expected_grads[name], torch.float32, msg=name)
    per_token = causal_lm_distillation_loss(student, teacher, input_ids, labels, attention_mask, reduction="none",
                                            **kwargs)
    assert per_token.shape == (2, labels.shape[1] - 1)
    student.zero_grad(set_to_none=True)
    nothing = causal_lm_distillation_loss(student, teacher, input_ids, torch.full_like(labels, ignore_index),
                                          attention_mask, **kwargs)
    nothing.backward()
    assert nothing.item() == 0.0 and not any(p.grad.any() for p in student.parameters() if p.grad is not None)


def _losses_on_simulated_ranks(student, distill_kwargs, ranks=(1, 2)):
    """``FusedDistillationTrainer.compute_loss`` on one batch as each of ``ranks`` data-parallel processes would
    compute it (``average_tokens_across_devices``, the same count of 7 scored tokens), without a Trainer."""
    from types import SimpleNamespace

    from distill_ops.integrations.hf import FusedDistillationTrainer

    _, teacher = _tiny_models()
    input_ids, attention_mask, labels = _batch()
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    losses = []
    for processes in ranks:
        fused = object.__new__(FusedDistillationTrainer)
        fused.__dict__.update(args=SimpleNamespace(average_tokens_across_devices=True, n_gpu=1),
                              accelerator=SimpleNamespace(num_processes=processes), get_tp_size=lambda: 1,
                              teacher_model=teacher, distill_kwargs=distill_kwargs)
        losses.append(fused.compute_loss(student, dict(inputs), num_items_in_batch=torch.tensor(7.0)))
    return losses


def test_trainer_normalizer_undoes_ddp_averaging_like_the_trainers_own_loss():
    """With ``average_tokens_across_devices`` the Trainer's count covers every data-parallel rank and its own
    ``compute_loss`` multiplies the loss by the number of ranks (DDP averages gradients): ours divides the count
    by it (so W ranks get W times the loss of a bare normalizer); DataParallel's per-GPU copies of the count give
    the count; no TrainingArguments or no count: unchanged."""
    from types import SimpleNamespace

    from distill_ops.integrations.hf import trainer_normalizer

    def trainer(processes=1, n_gpu=1, average=True, tp=1):
        return SimpleNamespace(args=SimpleNamespace(average_tokens_across_devices=average, n_gpu=n_gpu),
                               accelerator=SimpleNamespace(num_processes=processes), get_tp_size=lambda: tp)

    count = torch.tensor(12.0)
    assert trainer_normalizer(trainer(processes=4), count).item() == 3.0
    assert trainer_normalizer(trainer(processes=4, tp=2), count).item() == 6.0
    assert trainer_normalizer(trainer(processes=4, average=False), count) is count
    assert trainer_normalizer(trainer(processes=1), count) is count
    assert trainer_normalizer(trainer(n_gpu=2), count.expand(2, 1)).item() == 12.0
    # DataParallel without averaging: the Trainer hands each GPU's share, count // n_gpu (it was used as is, so the
    # whole batch's sum was divided by half its count).
    assert trainer_normalizer(trainer(n_gpu=2, average=False), (count // 2).expand(2, 1)).item() == 12.0
    assert trainer_normalizer(trainer(processes=4), None) is None
    assert trainer_normalizer(SimpleNamespace(), count) is count
    # The Trainer subclass applies it: 2 ranks, the same count -> twice the single-process loss.
    losses = _losses_on_simulated_ranks(_tiny_models()[0], {"impl": "torch"})
    assert_close(losses[1], 2 * losses[0], torch.float32)


def test_trainer_gradient_accumulation_equals_one_batch(tmp_path):
    """Two micro-batches of one sequence each, accumulated (``gradient_accumulation_steps=2``), give the SGD update
    of the token mean over both sequences: the Trainer's ``num_items_in_batch`` reaches the fused loss and the
    Trainer does not divide the loss again (sequences with different numbers of scored tokens)."""
    from distill_ops.integrations.hf import FusedDistillationTrainer

    student, teacher = _tiny_models()
    input_ids, attention_mask, labels = _batch()
    assert (labels[0, 1:] != -100).sum() != (labels[1, 1:] != -100).sum()
    distill_kwargs = {"divergence": "reverse", "impl": "torch"}
    lr = 0.05
    student.zero_grad()
    causal_lm_distillation_loss(student, teacher, input_ids, labels, attention_mask, **distill_kwargs).backward()
    expected = {name: (p - lr * p.grad).detach().clone() for name, p in student.named_parameters()}
    student.zero_grad(set_to_none=True)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=1, gradient_accumulation_steps=2,
        learning_rate=lr, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0,
        report_to="none", save_strategy="no", use_cpu=DEVICE.type == "cpu", dataloader_pin_memory=False,
    )
    rows = [{"input_ids": input_ids[i], "attention_mask": attention_mask[i], "labels": labels[i]} for i in range(2)]
    FusedDistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=rows,
                             distill_kwargs=distill_kwargs).train()
    for name, p in student.named_parameters():
        assert_close(p, expected[name], torch.float32, msg=name)


def test_module_docstring_trainer_equals_fused_distillation_trainer():
    """The subclass the module docstring shows, executed as written, computes FusedDistillationTrainer's loss."""
    import textwrap

    import distill_ops.integrations.hf as hf_integration

    doc = hf_integration.__doc__
    start = doc.index("    from transformers import Trainer")
    code = textwrap.dedent(doc[start:doc.index("\n:func:`trainer_loss`", start)])
    namespace: dict = {}
    exec(compile(code, "distill_ops/integrations/hf.py docstring", "exec"), namespace)
    student, teacher = _tiny_models()
    input_ids, attention_mask, labels = _batch()
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    losses = []
    for cls in (namespace["DistillationTrainer"], hf_integration.FusedDistillationTrainer):
        trainer = object.__new__(cls)
        trainer.teacher_model, trainer.distill_kwargs = teacher, {"divergence": "jsd", "impl": "torch"}
        losses.append(trainer.compute_loss(student, inputs, return_outputs=True, num_items_in_batch=8.0))
    (loss, outputs), (expected, _) = losses
    assert torch.equal(loss, expected) and outputs == {"loss": loss}


def trainer_rank_group(rank: int, world: int, rendezvous: str) -> None:
    """The gloo group of one rank of a real Trainer run, set up through a file (accelerate uses an initialised group
    as it is, with the environment a launcher sets): no TCP port to pick, none to lose to another process between
    picking and binding. One intra-op thread per rank."""
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="1")  # never bound: the group exists already
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)


def _trainer_ddp_rank(rank: int, world: int, rendezvous: str, out_dir: str) -> None:
    """One rank of ``test_trainer_on_two_ddp_ranks_equals_one_process``: a real Trainer under DDP (gloo)."""
    trainer_rank_group(rank, world, rendezvous)
    from distill_ops.integrations.hf import FusedDistillationTrainer

    student, teacher = (model.cpu() for model in _tiny_models())
    input_ids, attention_mask, labels = (tensor.cpu() for tensor in _batch())
    rows = [{"input_ids": input_ids[i], "attention_mask": attention_mask[i], "labels": labels[i]} for i in range(2)]
    args = transformers.TrainingArguments(
        output_dir=out_dir, max_steps=1, per_device_train_batch_size=1, learning_rate=0.05, optim="sgd",
        lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, report_to="none", save_strategy="no",
        use_cpu=True, dataloader_pin_memory=False, ddp_backend="gloo", logging_steps=1,
    )
    trainer = FusedDistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=rows,
                                       distill_kwargs={"divergence": "reverse", "impl": "torch"})
    assert trainer.args.world_size == world
    trainer.train()
    entropy = [entry["entropy"] for entry in trainer.state.log_history if "entropy" in entry]
    torch.save({name: p.detach() for name, p in student.named_parameters()}, f"{out_dir}/weights{rank}.pt")
    torch.save(entropy, f"{out_dir}/entropy{rank}.pt")
    # The group torn down before the process exits: left to the interpreter's teardown, gloo's worker threads
    # once ended rank 0 in std::terminate (SIGABRT) after the test's work was done.
    del trainer
    _destroy_group()


def test_trainer_on_two_ddp_ranks_equals_one_process(tmp_path):
    """A real ``transformers.Trainer`` on two DDP ranks (gloo, CPU), one sequence per rank: both ranks end with the
    SGD update of the token mean over both sequences, as one process with the whole batch. (With the Trainer's
    all-rank count passed unscaled, the update was half of it.) Both log the mean entropy over both sequences'
    scored tokens."""
    import torch.multiprocessing as mp

    mp.start_processes(_trainer_ddp_rank, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    student, teacher = (model.cpu() for model in _tiny_models())
    input_ids, attention_mask, labels = (tensor.cpu() for tensor in _batch())
    expected_entropy = _mean_entropy(student, input_ids, attention_mask, labels)
    for rank in range(2):
        entropy = torch.load(tmp_path / f"entropy{rank}.pt")
        assert len(entropy) == 1 and entropy[0] == pytest.approx(expected_entropy, rel=1e-5), rank
    causal_lm_distillation_loss(student, teacher, input_ids, labels, attention_mask, divergence="reverse",
                                impl="torch").backward()
    for rank in range(2):
        weights = torch.load(tmp_path / f"weights{rank}.pt")
        for name, p in student.named_parameters():
            assert_close(weights[name], p - 0.05 * p.grad, torch.float32, msg=f"rank {rank} {name}")
            assert not torch.equal(weights[name], p.detach()) or p.grad.abs().max() == 0, name


# ----------------------------------------------------------------------------------------------
# PEFT students (LoRA adapters; a trainable copy of the LM head; LoRA on the LM head)
# ----------------------------------------------------------------------------------------------

PEFT_CASES = {  # LoraConfig arguments
    "lora-body": dict(target_modules=["q_proj", "v_proj"], lora_dropout=0.1),  # dropout in the body is fine
    "modules-to-save-head": dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
    "lora-head": dict(target_modules=["q_proj", "lm_head"]),
    "lora-head-two-adapters": dict(target_modules=["lm_head"]),
}


def _peft_student(case: str):
    peft = pytest.importorskip("peft")
    student, teacher = _tiny_models()
    model = peft.get_peft_model(student, peft.LoraConfig(r=4, lora_alpha=8, **PEFT_CASES[case]))
    if case == "lora-head-two-adapters":  # two active adapters on the head: their deltas add
        model.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=6, target_modules=["lm_head"]))
        model.base_model.set_adapter(["default", "second"])
    torch.manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero (no change, no gradient to A): move it
                param.normal_(0.0, 0.2)
            elif "modules_to_save" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model, teacher


@pytest.mark.parametrize("case", list(PEFT_CASES))
@pytest.mark.parametrize("impl", IMPLS)
def test_peft_student_equals_loss_from_its_own_logits(impl, case):
    """A PEFT-wrapped student (what TRL builds from ``peft_config``): the loss and every trainable parameter's
    gradient equal those from the PeftModel's own logits, for LoRA in the body, a trainable copy of the LM head
    (``modules_to_save``) and LoRA on the LM head (one or two active adapters). Before this the last two
    failed with a TypeError (the head is not an ``nn.Linear``)."""
    model, teacher = _peft_student(case)
    model.train()  # LoRA dropout in the body: the same draw both ways (fixed seed below)
    input_ids, attention_mask, labels = _batch()
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in name or "modules_to_save" in name for name in trainable)
    torch.manual_seed(11)
    loss = causal_lm_distillation_loss(model, teacher, input_ids, labels, attention_mask, divergence="jsd",
                                       impl=impl)
    fused = torch.autograd.grad(loss, list(trainable.values()))
    torch.manual_seed(11)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    with torch.no_grad():
        teacher_logits = teacher(input_ids=input_ids, attention_mask=attention_mask).logits
    expected = kl_div(logits[:, :-1], teacher_logits[:, :-1], labels=labels[:, 1:], divergence="jsd", impl="torch")
    reference = torch.autograd.grad(expected, list(trainable.values()))
    assert_close(loss, expected, torch.float32, "loss")
    head_grads = 0
    for (name, _), got, want in zip(trainable.items(), fused, reference):
        assert_close(got, want, torch.float32, name)
        head_grads += "lm_head" in name and want.abs().max() > 0
    # The head's trainable tensors all get a gradient: none, its copy, A and B, A and B of both adapters.
    assert head_grads == {"lora-body": 0, "modules-to-save-head": 1, "lora-head": 2, "lora-head-two-adapters": 4}[case]


def test_peft_head_that_is_not_a_linear_map_is_refused():
    """LoRA dropout on the LM head in training mode drops hidden-state entries before ``lora_A``: not a linear map
    of the hidden state, refused with an error naming it (in eval mode the same model is a linear map and
    works); so is a DoRA head."""
    peft = pytest.importorskip("peft")
    input_ids, attention_mask, labels = _batch()
    student, teacher = _tiny_models()
    model = peft.get_peft_model(student, peft.LoraConfig(r=4, target_modules=["lm_head"], lora_dropout=0.1))
    with pytest.raises(ValueError, match="lora_dropout=0.1"):
        causal_lm_distillation_loss(model.train(), teacher, input_ids, labels, attention_mask, impl="torch")
    causal_lm_distillation_loss(model.eval(), teacher, input_ids, labels, attention_mask, impl="torch")
    student, teacher = _tiny_models()
    model = peft.get_peft_model(student, peft.LoraConfig(r=4, target_modules=["lm_head"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        causal_lm_distillation_loss(model, teacher, input_ids, labels, attention_mask, impl="torch")
    with pytest.raises(TypeError, match="must be an nn.Linear .* got Embedding"):
        from distill_ops.integrations.hf import linear_head
        linear_head(torch.nn.Embedding(4, 4))


@pytest.mark.parametrize("impl", IMPLS)
def test_packed_sequences_equal_each_sequence_alone(impl):
    """A batch packed by ``transformers.DataCollatorWithFlattening`` (three sequences in one row, positions
    restarting at each, ``-100`` at each sequence's first label, no attention mask): ``trainer_loss`` passes the
    ``position_ids`` to both models, so the loss and gradients are those of the three sequences scored alone (their
    token mean). Before this the position ids were dropped and the packed sequences attended to each other."""
    from distill_ops.integrations.hf import trainer_loss

    student, teacher = _tiny_models()
    generator = torch.Generator().manual_seed(4)
    sequences = [torch.randint(0, VOCAB, (length,), generator=generator) for length in (5, 4, 6)]
    packed = transformers.DataCollatorWithFlattening(return_position_ids=True)(
        [{"input_ids": sequence.tolist()} for sequence in sequences])
    packed = {key: value.to(DEVICE) for key, value in packed.items()}
    assert packed["input_ids"].shape == (1, 15) and "attention_mask" not in packed
    loss = trainer_loss(student, teacher, packed, divergence="jsd", beta=0.3, ce_weight=0.5, impl=impl)
    grads = torch.autograd.grad(loss, list(student.parameters()))

    total = 0.0
    for sequence in sequences:
        ids = sequence[None].to(DEVICE)
        total = total + causal_lm_distillation_loss(student, teacher, ids, divergence="jsd", beta=0.3, ce_weight=0.5,
                                                    reduction="sum", impl="torch")
    expected = total / sum(len(sequence) - 1 for sequence in sequences)
    expected_grads = torch.autograd.grad(expected, list(student.parameters()))
    assert_close(loss, expected, torch.float32, "loss")
    for (name, _), got, want in zip(student.named_parameters(), grads, expected_grads):
        assert_close(got, want, torch.float32, name)
    # Without the position ids the sequences see each other: a different loss (the check can fail).
    unpacked = {key: value for key, value in packed.items() if key != "position_ids"}
    assert abs(float(trainer_loss(student, teacher, unpacked, impl="torch")) - float(
        trainer_loss(student, teacher, packed, impl="torch"))) > 1e-3


def _counting(forward, calls: list):
    def counted(hidden_states, *args, **kwargs):
        calls.append(hidden_states.shape[:2])
        return forward(hidden_states, *args, **kwargs)

    return counted


@pytest.mark.parametrize("peft_case", [None, "lora-body"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_student_equals_the_same_student_without(reentrant, peft_case):
    """Activation checkpointing on the student (``activation_checkpointing_enable``, formerly
    ``gradient_checkpointing_enable``; reentrant or not; with a LoRA student the usual recipe adds
    ``enable_input_require_grads`` for the reentrant form): the fused loss runs the checkpointed body, whose layers
    run again in backward, and gives the loss and trainable gradients of the same student without checkpointing."""
    input_ids, attention_mask, labels = _batch()

    def loss_and_grads(checkpointing: bool):
        model, teacher = _peft_student(peft_case) if peft_case else _tiny_models()
        model.train()
        if checkpointing:
            # transformers 5 renamed it (the old name warns); older versions have only the old one.
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            if peft_case and reentrant:
                model.enable_input_require_grads()
        calls = []
        layers = model.get_base_model().get_decoder().layers if peft_case else model.get_decoder().layers
        # MLP runs on the batch (the one-time logit-scale probe of a new model runs the layers on a 2-token input).
        # Counted in ``forward`` itself: forward hooks do not fire when non-reentrant checkpointing recomputes.
        for layer in layers:
            layer.mlp.forward = _counting(layer.mlp.forward, calls)
        torch.manual_seed(11)  # LoRA dropout in the body: the same draw both ways (checkpointing replays it)
        loss = causal_lm_distillation_loss(model, teacher, input_ids, labels, attention_mask, ce_weight=0.5,
                                           impl="torch")
        loss.backward()  # reentrant checkpointing does not support autograd.grad
        grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
        return loss, grads, calls.count(input_ids.shape) // len(layers)

    loss, grads, runs = loss_and_grads(checkpointing=True)
    expected, expected_grads, expected_runs = loss_and_grads(checkpointing=False)
    assert (runs, expected_runs) == (2, 1)  # checkpointed layers are recomputed in backward
    assert_close(loss, expected, torch.float32, "loss")
    assert set(grads) == set(expected_grads)
    for name, grad in grads.items():
        assert expected_grads[name].abs().max() > 0, name
        assert_close(grad, expected_grads[name], torch.float32, name)


# ----------------------------------------------------------------------------------------------
# MoE students: the router load-balancing loss their own forward adds
# ----------------------------------------------------------------------------------------------


def _moe_student(kind: str, output_router_logits: bool = True):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, num_experts_per_tok=2, output_router_logits=output_router_logits,
                  router_aux_loss_coef=0.5, initializer_range=0.2, max_position_embeddings=64)
    torch.manual_seed(3)
    if kind == "mixtral":
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(num_local_experts=4, **common))
    else:
        model = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
            num_experts=4, moe_intermediate_size=24, shared_expert_intermediate_size=24, **common))
    return model.float().to(DEVICE)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2-moe"])
@pytest.mark.parametrize("impl", IMPLS)
def test_moe_student_adds_its_router_load_balancing_loss(impl, kind):
    """An MoE student with ``output_router_logits=True`` (Mixtral, Qwen2-MoE): its own forward adds
    ``router_aux_loss_coef`` times the load-balancing loss to its loss; the fused loss adds the same term, so KL + CE
    equals the KL of its own logits plus its own loss, gradients included (the routers' among them). Before this the
    term was dropped: the routers trained without load balancing. ``router_aux_loss=False`` leaves it out."""
    student = _moe_student(kind)
    _, teacher = _tiny_models()
    input_ids, attention_mask, labels = _batch()
    params = dict(student.named_parameters())
    loss = causal_lm_distillation_loss(student, teacher, input_ids, labels, attention_mask, ce_weight=1.0, impl=impl)
    grads = torch.autograd.grad(loss, list(params.values()))

    out = student(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    with torch.no_grad():
        teacher_logits = teacher(input_ids=input_ids, attention_mask=attention_mask).logits
    expected = kl_div(out.logits[:, :-1], teacher_logits[:, :-1], labels=labels[:, 1:], impl="torch") + out.loss
    expected_grads = torch.autograd.grad(expected, list(params.values()))
    assert out.aux_loss > 0.1  # the term is not negligible here
    assert_close(loss, expected, torch.float32, "loss")
    for name, got, want in zip(params, grads, expected_grads):
        assert_close(got, want, torch.float32, name)

    without = causal_lm_distillation_loss(student, teacher, input_ids, labels, attention_mask, ce_weight=1.0,
                                          impl=impl, router_aux_loss=False)
    assert_close(without, expected - 0.5 * out.aux_loss, torch.float32, "without the term")
    router_grads = [grad for name, grad in zip(params, grads) if name.endswith("mlp.gate.weight")]
    router_grads_without = [grad for name, grad in zip(params, torch.autograd.grad(without, list(params.values())))
                            if name.endswith("mlp.gate.weight")]
    assert router_grads and not any(torch.allclose(a, b) for a, b in zip(router_grads, router_grads_without))


def test_router_aux_loss_keeps_its_weight_across_data_parallel_ranks():
    """Under DDP with ``average_tokens_across_devices`` the token-averaged part is scaled by the number of ranks (the
    count is divided by it; DDP averages the gradients back), the load-balancing term is not: its weight stays
    ``router_aux_loss_coef`` whatever the world size. transformers' Trainer multiplies the whole loss, the term
    included, so its router coefficient grows with the ranks (huggingface/transformers#48690, open; a review,
    2026-12-06, measured the difference at exactly (ranks - 1) * coef * aux)."""
    student = _moe_student("mixtral")
    losses = _losses_on_simulated_ranks(student, {"impl": "torch", "ce_weight": 1.0})
    input_ids, attention_mask, labels = _batch()
    aux = 0.5 * student(input_ids=input_ids, attention_mask=attention_mask, labels=labels).aux_loss
    assert aux > 0.05
    assert_close(losses[1], 2 * losses[0] - aux, torch.float32)


def test_router_aux_loss_follows_the_config_and_refuses_what_it_cannot_reproduce():
    """The term follows ``output_router_logits`` unless ``router_aux_loss`` says otherwise; asking for it on a dense
    model, or with ``reduction="none"``, is a ``ValueError``; a model flagged for a load-balancing loss of another
    form, or a z-loss on its logits (Bamba's ``z_loss_coefficient``), is refused (``NotImplementedError``) rather than
    trained without it."""
    from distill_ops.integrations.hf import router_aux_loss_function

    student, teacher = _moe_student("mixtral", output_router_logits=False), _tiny_models()[1]
    input_ids, attention_mask, labels = _batch()
    args = (student, teacher, input_ids, labels, attention_mask)
    plain = causal_lm_distillation_loss(*args, impl="torch")
    forced = causal_lm_distillation_loss(*args, impl="torch", router_aux_loss=True)
    aux = student(input_ids=input_ids, attention_mask=attention_mask, output_router_logits=True).aux_loss
    assert_close(forced - plain, 0.5 * aux, torch.float32)
    assert router_aux_loss_function(student) is None and router_aux_loss_function(student, True) is not None
    with pytest.raises(ValueError, match="reduction='none'"):
        causal_lm_distillation_loss(*args, impl="torch", router_aux_loss=True, reduction="none")
    dense, _ = _tiny_models()
    with pytest.raises(ValueError, match="LlamaForCausalLM is not a transformers MoE"):
        causal_lm_distillation_loss(dense, teacher, input_ids, labels, attention_mask, router_aux_loss=True)
    dense.z_loss_coefficient = 0.1  # Bamba's z-loss on its own logits: refused, not dropped
    with pytest.raises(NotImplementedError, match="z_loss_coefficient=0.1"):
        causal_lm_distillation_loss(dense, teacher, input_ids, labels, attention_mask, impl="torch")
    dense.z_loss_coefficient = 0.0
    dense.config.output_router_logits = True  # flagged, but no load-balancing function of the known form
    with pytest.raises(NotImplementedError, match="router_aux_loss=False"):
        causal_lm_distillation_loss(dense, teacher, input_ids, labels, attention_mask, impl="torch")
    causal_lm_distillation_loss(dense, teacher, input_ids, labels, attention_mask, impl="torch", router_aux_loss=False)


def test_offloaded_lm_head_is_refused_before_any_forward(tmp_path):
    """A model loaded with accelerate offloading its LM head (``device_map``; the weight is on the meta device
    outside the head's forward) is refused with an error naming the offloading, before any forward (the logit-scale
    probe failed inside accelerate with "Cannot copy out of meta tensor")."""
    pytest.importorskip("accelerate")
    student, teacher = _tiny_models()
    input_ids, attention_mask, labels = _batch()
    teacher.cpu().save_pretrained(tmp_path / "teacher")
    offloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "teacher", device_map={"model": "cpu", "lm_head": "disk"}, offload_folder=str(tmp_path / "off"),
        dtype=torch.float32).eval()
    assert offloaded.lm_head.weight.device.type == "meta"
    calls = []
    offloaded.model.register_forward_pre_hook(lambda *args: calls.append(1))
    student.cpu()
    with pytest.raises(NotImplementedError, match="meta device \\(offloaded by accelerate"):
        causal_lm_distillation_loss(student, offloaded, input_ids.cpu(), labels.cpu(), attention_mask.cpu(),
                                    impl="torch")
    with pytest.raises(NotImplementedError, match="Qwen2ForCausalLM's LM head weight is on the meta device"):
        causal_lm_distillation_loss(offloaded, student, input_ids.cpu(), labels.cpu(), attention_mask.cpu(),
                                    impl="torch")
    assert calls == []


def test_logit_scale_probe_keeps_each_submodules_mode():
    """The one-time logit-scale probe runs the model in eval mode and restores every submodule's own mode (it
    restored the root's mode on all of them: a part kept in eval mode was switched to training)."""
    from distill_ops.integrations.hf import logit_scale

    student, _ = _tiny_models()
    student.train()
    student.model.embed_tokens.eval()
    student.lm_head.eval()
    modes = {name: module.training for name, module in student.named_modules()}
    assert logit_scale(student) == 1.0
    assert {name: module.training for name, module in student.named_modules()} == modes


def test_trainer_loss_refuses_batch_entries_it_would_silently_drop():
    """Entries the fused loss does not pass to the models but that would change what they compute (multimodal
    inputs: the language body would score image placeholders as text; pre-shifted ``shift_labels``) are refused
    with an error naming them, before any forward; other entries (a collator's ``completion_mask``) are ignored."""
    from distill_ops.integrations.hf import trainer_loss

    student, teacher = _tiny_models()
    input_ids, attention_mask, labels = _batch()
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    calls = []
    for model in (student, teacher):
        model.register_forward_pre_hook(lambda *args: calls.append(1))
    for key, value in [("pixel_values", torch.zeros(2, 3, 8, 8)), ("image_grid_thw", torch.ones(2, 3)),
                       ("input_features", torch.zeros(2, 4)), ("shift_labels", labels[:, 1:]),
                       ("token_type_ids", torch.zeros_like(input_ids))]:
        with pytest.raises(ValueError, match=f"also holds \\['{key}'\\]"):
            trainer_loss(student, teacher, {**inputs, key: value}, impl="torch")
    assert calls == []
    expected = trainer_loss(student, teacher, inputs, impl="torch")
    extra = trainer_loss(student, teacher, {**inputs, "completion_mask": attention_mask}, impl="torch")
    assert_close(extra, expected, torch.float32)


@pytest.mark.parametrize("family, extra", [
    ("Qwen3", {}), ("Gemma3Text", dict(head_dim=16)), ("Olmo2", {}), ("Mistral", {}), ("Exaone4", {}),
    ("StableLm", {}), ("GptOss", dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16)),
    ("FalconH1", dict(lm_head_multiplier=0.37, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_d_state=8,
                      mamba_chunk_size=8)),
    ("Llama4Text", dict(intermediate_size_mlp=128, head_dim=16)),
], ids=lambda value: value if isinstance(value, str) else "")
def test_more_families_equal_loss_from_their_own_logits(family, extra):
    """Students of other ``transformers`` families (q/k norms, Gemma-3's scaled embeddings and local layers, a
    mixture-of-experts MLP, Falcon-H1's hybrid Mamba body and ``lm_head_multiplier``, the text-only Llama 4, whose
    ``get_decoder()`` returns the model itself: its body is ``.model``): the loss from hidden states equals the loss
    from the model's own logits."""
    config_cls = getattr(transformers, f"{family}Config")
    model_cls = getattr(transformers, f"{family.removesuffix('Text')}ForCausalLM")
    config = config_cls(**{**dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3,
                                  tie_word_embeddings=False), **extra})
    torch.manual_seed(0)
    student = model_cls(config).float().to(DEVICE)
    _, teacher = _tiny_models()
    input_ids, attention_mask, labels = _batch()
    loss = causal_lm_distillation_loss(student, teacher, input_ids, labels, attention_mask, divergence="reverse",
                                       impl="torch")
    logits = student(input_ids=input_ids, attention_mask=attention_mask).logits
    with torch.no_grad():
        teacher_logits = teacher(input_ids=input_ids, attention_mask=attention_mask).logits
    expected = kl_div(logits[:, :-1], teacher_logits[:, :-1], labels=labels[:, 1:], divergence="reverse",
                      impl="torch")
    assert_close(loss, expected, torch.float32)


def test_fused_trainer_refuses_label_smoothing_with_a_cross_entropy_term(tmp_path):
    """The Trainer's ``label_smoothing_factor`` smooths its own cross-entropy; the fused hard-label term is not
    smoothed, so asking for both is refused (naming the setting) instead of silently training unsmoothed. Without a
    cross-entropy term (``ce_weight=0``) the setting has nothing to act on and the trainer builds."""
    from distill_ops.integrations.hf import FusedDistillationTrainer

    student, teacher = _tiny_models()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), label_smoothing_factor=0.1, report_to="none",
                                          use_cpu=DEVICE.type == "cpu")
    with pytest.raises(ValueError, match="label_smoothing_factor=0.1"):
        FusedDistillationTrainer(model=student, teacher_model=teacher, args=args, distill_kwargs={"ce_weight": 0.5})
    FusedDistillationTrainer(model=student, teacher_model=teacher, args=args, distill_kwargs={"divergence": "jsd"})


def test_fused_trainer_refuses_distill_kwargs_it_cannot_pass(tmp_path):
    """``distill_kwargs`` (any mapping) is checked when the trainer is built: a key that is not a keyword argument of
    causal_lm_distillation_loss (a typo, or ``labels``, which comes from the batch) and one the trainer sets
    itself (``normalizer``: the Trainer's token count) are ValueErrors naming the key; they were a TypeError at
    the first training step."""
    from distill_ops.integrations.hf import FusedDistillationTrainer

    student, teacher = _tiny_models()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=DEVICE.type == "cpu")
    for kwargs, message in (({"temprature": 2.0}, r"distill_kwargs has \['temprature'\], not among the keyword-only"),
                            ({"labels": None}, r"has \['labels'\], not among the keyword-only .* come from the batch"),
                            ({"normalizer": 4.0}, r"distill_kwargs sets \['normalizer'\], which "
                                                  r"FusedDistillationTrainer sets itself: normalizer from the "
                                                  r"Trainer's num_items_in_batch"),
                            # Bad values too (they failed at the first training step, after both forwards).
                            ({"temperature": 0.0}, r"temperature must be in \(0.0, inf\), got 0.0"),
                            ({"divergence": "jsd", "beta": -0.5}, r"beta must be in \[0.0, 1.0\], got -0.5"),
                            ({"impl": "gpu"}, r"impl must be one of \('auto', 'triton', 'torch'\), got 'gpu'")):
        with pytest.raises(ValueError, match=message):
            FusedDistillationTrainer(model=student, teacher_model=teacher, args=args, distill_kwargs=kwargs)
    with pytest.raises(TypeError, match="distill_kwargs must be a mapping"):
        FusedDistillationTrainer(model=student, teacher_model=teacher, args=args, distill_kwargs=[("beta", 0.1)])


def test_a_model_whose_get_decoder_is_itself_and_has_no_body_is_refused():
    """``get_decoder()`` falls back to the model itself where ``base_model_prefix`` names no attribute: its output
    would be the logits, not the hidden states. ``.model`` is taken instead where there is one (Llama 4's text
    model, tested above); otherwise a ``TypeError`` naming the class."""
    from distill_ops.integrations.hf import causal_lm_body

    class HeadOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = torch.nn.Linear(8, VOCAB, bias=False)

        def get_decoder(self):
            return self

        def get_output_embeddings(self):
            return self.lm_head

    with pytest.raises(TypeError, match="HeadOnly: get_decoder\\(\\) returns the model itself"):
        causal_lm_body(HeadOnly())
    _, teacher = _tiny_models()
    assert causal_lm_body(teacher) is teacher.model


@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("scale, cap", [(1.0, None), (0.5, 3.0)])
@pytest.mark.parametrize("impl", IMPLS)
def test_fspad_draft_loss_with_a_bias_every_reduction_and_without_the_entropy(impl, scale, cap, reduction):
    """lm_head_bias (on both sides, scaled by logit_scale with the features, inside the softcap; in the teacher
    entropy too), reduction none / sum and no loss_mask, against the formula in float64; with
    include_teacher_entropy=False the value is KL(p || q) = soft CE - H(p) exactly (every other test passed no bias
    and checked only that this value is lower)."""
    generator = torch.Generator().manual_seed(8)
    regress, predict, target = (torch.randn(2, 5, 24, generator=generator, dtype=torch.float64).float().to(DEVICE)
                                for _ in range(3))
    weight = (torch.randn(70, 24, generator=generator, dtype=torch.float64) * 0.3).float().to(DEVICE)
    bias = (torch.randn(70, generator=generator, dtype=torch.float64) * 2.0).float().to(DEVICE)
    options = dict(regress_weight=1.5, logit_weight=0.4, smooth_l1_beta=0.7, temperature=1.3)
    leaves = [t.clone().requires_grad_(True) for t in (regress, predict)]
    leaves64 = [t.detach().double().requires_grad_(True) for t in (regress, predict)]
    mask = torch.ones(2, 5, dtype=torch.bool, device=DEVICE)
    for with_entropy in (True, False):
        expected = _fspad_reference(*leaves64, target, weight, 1.5, 0.4, mask, scale, cap, 0.7, 1.3, bias=bias,
                                    reduction=reduction, with_entropy=with_entropy)
        loss = fspad_draft_loss(*leaves, target, weight, lm_head_bias=bias, logit_scale=scale, softcap=cap,
                                reduction=reduction, include_teacher_entropy=with_entropy, impl=impl, **options)
        assert loss.shape == expected.shape
        assert_close(loss, expected, torch.float32, f"loss, include_teacher_entropy={with_entropy}")
    upstream = torch.linspace(-1.0, 2.0, 10, dtype=torch.float64, device=DEVICE).reshape(2, 5)
    if reduction == "sum":
        upstream = upstream[0, 1]  # one value: the sum's incoming gradient
    (loss.double() * upstream).sum().backward()
    (expected * upstream).sum().backward()
    assert_close(leaves[0].grad, leaves64[0].grad, torch.float32, "regress grad")
    assert_close(leaves[1].grad, leaves64[1].grad, torch.float32, "predict grad")


@pytest.mark.parametrize("impl", IMPLS)
def test_fspad_draft_loss_with_a_bf16_head_output_and_an_fp32_lm_head(impl):
    """A bf16 draft head trained against an fp32 target (features and LM head): the LM head is cast to the draft's
    dtype for the draft side, as documented. Every other test used one dtype throughout: without the cast the loss
    raised (student_hidden and student_weight must share a dtype)."""
    generator = torch.Generator().manual_seed(6)
    regress, predict, target = (torch.randn(2, 5, 24, generator=generator, dtype=torch.float64) for _ in range(3))
    weight = (torch.randn(70, 24, generator=generator, dtype=torch.float64) * 0.3).float().to(DEVICE)
    leaves = [t.to(DEVICE, torch.bfloat16).requires_grad_(True) for t in (regress, predict)]
    loss = fspad_draft_loss(*leaves, target.float().to(DEVICE), weight, impl=impl)
    loss.backward()
    leaves64 = [t.detach().double().requires_grad_(True) for t in leaves]
    mask = torch.ones(2, 5, dtype=torch.bool, device=DEVICE)
    expected = _fspad_reference(*leaves64, target.float().to(DEVICE), weight, 1.0, 0.1, mask)
    expected.backward()
    assert loss.dtype == torch.float32
    assert_close(loss, expected, torch.bfloat16, "loss")
    for leaf, leaf64 in zip(leaves, leaves64):
        assert leaf.grad.dtype == torch.bfloat16
        assert_close(leaf.grad, leaf64.grad, torch.bfloat16, "gradient")


# ----------------------------------------------------------------------------------------------
# From a mutation audit of distill_ops/integrations/hf.py: each test fails on the mutant named in its docstring
# ----------------------------------------------------------------------------------------------


def _reference_divergence(student, teacher, input_ids, attention_mask, targets, teacher_ids=None, **kwargs):
    """``kl_div`` of the two models' own logits (the teacher's without gradient) at the shifted ``targets``."""
    logits = student(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    with torch.no_grad():
        teacher_logits = teacher(input_ids=input_ids if teacher_ids is None else teacher_ids,
                                 attention_mask=attention_mask).logits[:, :-1]
    return kl_div(logits, teacher_logits, labels=targets, impl="torch", **kwargs)


def test_helper_feeds_teacher_input_ids_to_the_teacher():
    """``teacher_input_ids`` are the teacher's ids (the student reads ``input_ids``): the loss equals the one from
    the teacher's own logits on its ids (mutant: the teacher was run on the student's ids, and only the shape of
    ``teacher_input_ids`` was ever tested)."""
    student, teacher = _tiny_models()
    input_ids, attention_mask, labels = _batch()
    teacher_ids = (input_ids * 7 + 3) % VOCAB
    kwargs = dict(divergence="jsd", beta=0.3)
    loss = causal_lm_distillation_loss(student, teacher, input_ids, labels, attention_mask,
                                       teacher_input_ids=teacher_ids, impl="torch", **kwargs)
    expected = _reference_divergence(student, teacher, input_ids, attention_mask, labels[:, 1:], teacher_ids, **kwargs)
    assert_close(loss, expected, torch.float32)
    same_ids = _reference_divergence(student, teacher, input_ids, attention_mask, labels[:, 1:], **kwargs)
    assert abs(expected.item() - same_ids.item()) > 1e-3  # the check can tell the two apart


def _tiny_phi(hidden: int, layers: int, seed: int):
    """A tiny Phi causal LM: its LM head has a bias (zero-initialised by transformers; randomised here)."""
    torch.manual_seed(seed)
    model = transformers.PhiForCausalLM(transformers.PhiConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=2,
        max_position_embeddings=64, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0))
    with torch.no_grad():
        model.lm_head.bias.normal_(0.0, 1.0)
    return model.float().to(DEVICE)


@pytest.mark.parametrize("impl", IMPLS)
def test_lm_head_biases_equal_loss_from_the_models_own_logits(impl):
    """Phi's LM heads have a bias (every other tested family has none): the student's and the teacher's biases are
    part of their logits, and the student's bias gets its gradient (mutants: either bias dropped)."""
    student, teacher = _tiny_phi(32, 1, 0), _tiny_phi(48, 2, 1).eval()
    assert student.lm_head.bias.abs().max() > 0.5 and teacher.lm_head.bias.abs().max() > 0.5
    input_ids, attention_mask, labels = _batch()
    kwargs = dict(divergence="jsd", beta=0.3, temperature=2.0)
    loss = causal_lm_distillation_loss(student, teacher, input_ids, labels, attention_mask, ce_weight=0.5, impl=impl,
                                       **kwargs)
    grads = torch.autograd.grad(loss, list(student.parameters()))
    out = student(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    with torch.no_grad():
        teacher_logits = teacher(input_ids=input_ids, attention_mask=attention_mask).logits
    expected = kl_div(out.logits[:, :-1], teacher_logits[:, :-1], labels=labels[:, 1:], impl="torch",
                      **kwargs) + 0.5 * out.loss
    expected_grads = torch.autograd.grad(expected, list(student.parameters()))
    assert_close(loss, expected, torch.float32, "loss")
    for (name, _), got, want in zip(student.named_parameters(), grads, expected_grads):
        assert_close(got, want, torch.float32, name)


def test_teacher_body_runs_without_gradient():
    """The teacher runs under ``torch.no_grad()`` (documented): its body records no autograd graph, even for a
    teacher whose parameters require gradients (mutant: the no_grad was dropped; the fused op passes no gradient to
    the teacher, so the loss and the student's gradients did not change, only the memory the graph held)."""
    student, teacher = _tiny_models()
    assert all(p.requires_grad for p in teacher.parameters())
    input_ids, attention_mask, labels = _batch()
    grad_enabled = []
    teacher.model.register_forward_hook(
        lambda module, args, output: grad_enabled.append((torch.is_grad_enabled(), output[0].requires_grad)))
    loss = causal_lm_distillation_loss(student, teacher, input_ids, labels, attention_mask, impl="torch")
    loss.backward()
    assert grad_enabled and all(state == (False, False) for state in grad_enabled), grad_enabled
    assert all(p.grad is None for p in teacher.parameters())


def test_moe_student_reduction_none_has_no_router_term():
    """``reduction="none"`` returns the per-position divergence only: an MoE student's load-balancing term (a
    per-batch scalar, added by default to the scalar reductions) is not added to each position (mutant: it was)."""
    student = _moe_student("mixtral")
    _, teacher = _tiny_models()
    input_ids, attention_mask, labels = _batch()
    per_token = causal_lm_distillation_loss(student, teacher, input_ids, labels, attention_mask, reduction="none",
                                            impl="torch")
    expected = _reference_divergence(student, teacher, input_ids, attention_mask, labels[:, 1:], reduction="none")
    assert per_token.shape == expected.shape == labels[:, 1:].shape
    assert_close(per_token, expected, torch.float32)


@pytest.mark.parametrize("ce_weight", [0.0, 0.5])
def test_helper_without_labels_ignores_padding_under_a_custom_ignore_index(ce_weight):
    """Without labels the targets are ``input_ids`` with padding set to ``ignore_index``, whatever that is (mutant:
    padding was set to -100, which ``ignore_index=-1`` then scored as a token)."""
    student, teacher = _tiny_models()
    input_ids, attention_mask, _ = _batch()
    kwargs = dict(divergence="jsd", beta=0.3, ce_weight=ce_weight, impl="torch")
    loss = causal_lm_distillation_loss(student, teacher, input_ids, attention_mask=attention_mask, ignore_index=-1,
                                       **kwargs)
    expected = causal_lm_distillation_loss(student, teacher, input_ids, attention_mask=attention_mask, **kwargs)
    assert_close(loss, expected, torch.float32)
    with torch.no_grad():
        own = _reference_divergence(student, teacher, input_ids, attention_mask,
                                    torch.where(attention_mask.bool(), input_ids, -100)[:, 1:], divergence="jsd",
                                    beta=0.3)
    if ce_weight == 0.0:
        assert_close(loss, own, torch.float32)


def _lora_head_student(**lora):
    """The tiny student with one LoRA adapter on its LM head (``lora``: more ``LoraConfig`` arguments), its ``B``
    (and ``B``'s bias) moved away from PEFT's zero start."""
    peft = pytest.importorskip("peft")
    student, teacher = _tiny_models()
    model = peft.get_peft_model(student, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"], **lora))
    torch.manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    return model, teacher


@pytest.mark.parametrize("case", ["merged", "disabled", "lora-bias", "modules-to-save-disabled"])
def test_peft_head_states_equal_loss_from_the_models_own_logits(case):
    """A LoRA head merged into its base weight (``merge_adapter()``), adapters disabled (``disable_adapter()``: the
    base head, also for a ``modules_to_save`` copy), and a LoRA head with ``lora_bias=True``: the loss and the
    trainable gradients equal those of the PeftModel's own logits (mutants: the merged delta added a second time,
    disabled adapters still applied, B's bias dropped; none of these states was tested)."""
    import contextlib

    if case == "modules-to-save-disabled":
        model, teacher = _peft_student("modules-to-save-head")
    else:
        model, teacher = _lora_head_student(**({"lora_bias": True} if case == "lora-bias" else {}))
    model.eval()
    head = model.get_base_model().lm_head
    if case in ("merged", "lora-bias"):  # the adapter's delta (and bias) is not zero: the check can fail
        assert head.lora_B["default"].weight.abs().max() > 0.1
        assert case != "lora-bias" or head.lora_B["default"].bias.abs().max() > 0.1
    if case == "merged":
        model.merge_adapter()
    input_ids, attention_mask, labels = _batch()
    trainable = [p for p in model.parameters() if p.requires_grad]
    context = model.disable_adapter() if case.endswith("disabled") else contextlib.nullcontext()
    with context:
        loss = causal_lm_distillation_loss(model, teacher, input_ids, labels, attention_mask, ce_weight=0.5,
                                           impl="torch")
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        with torch.no_grad():
            teacher_logits = teacher(input_ids=input_ids, attention_mask=attention_mask).logits
        expected = kl_div(out.logits[:, :-1], teacher_logits[:, :-1], labels=labels[:, 1:], impl="torch")
        expected = expected + 0.5 * out.loss
    assert_close(loss, expected, torch.float32, "loss")
    assert loss.requires_grad == expected.requires_grad  # merged / disabled: no trainable tensor reaches the loss
    if not expected.requires_grad:
        return
    got = torch.autograd.grad(loss, trainable, allow_unused=True)
    want = torch.autograd.grad(expected, trainable, allow_unused=True)
    for index, (a, b) in enumerate(zip(got, want)):
        if b is None:
            assert a is None or not a.any(), index
        else:
            assert_close(a, b, torch.float32, f"trainable {index}")


def test_fused_trainer_freezes_the_teacher_and_puts_it_in_eval_mode(tmp_path):
    """The trainer puts ``teacher_model`` in eval mode and freezes it (documented): a teacher handed over in training
    mode with dropout gives the eval-mode teacher's loss, draw after draw (mutants: the teacher was left in training
    mode, or left trainable)."""
    from distill_ops.integrations.hf import FusedDistillationTrainer

    student, teacher = _tiny_models()
    for layer in teacher.model.layers:
        layer.self_attn.attention_dropout = 0.5
    input_ids, attention_mask, labels = _batch()
    expected = causal_lm_distillation_loss(student, teacher, input_ids, labels, attention_mask, impl="torch")
    teacher.train()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=DEVICE.type == "cpu")
    trainer = FusedDistillationTrainer(model=student, teacher_model=teacher, args=args,
                                       distill_kwargs={"impl": "torch"})
    assert trainer.teacher_model is teacher and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    for seed in range(2):
        torch.manual_seed(seed)
        assert_close(trainer.compute_loss(student, inputs), expected, torch.float32)


def test_trainer_evaluates_a_dataset_with_nothing_scored(tmp_path):
    """``evaluate()`` on rows whose labels are all ignored: the loss is 0 and no ``eval_entropy`` is reported (there
    is no scored token to average over; mutant: the mean was taken anyway and evaluate() raised
    ZeroDivisionError)."""
    from distill_ops.integrations.hf import FusedDistillationTrainer

    student, teacher = _tiny_models()
    input_ids, attention_mask, _ = _batch()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_eval_batch_size=2, report_to="none", use_cpu=DEVICE.type == "cpu",
        dataloader_pin_memory=False,
    )
    rows = [{"input_ids": input_ids[i], "attention_mask": attention_mask[i],
             "labels": torch.full_like(input_ids[i], -100)} for i in range(2)]
    trainer = FusedDistillationTrainer(model=student, teacher_model=teacher, args=args,
                                       distill_kwargs={"impl": "torch"})
    metrics = trainer.evaluate(eval_dataset=rows)
    assert metrics["eval_loss"] == 0.0 and "eval_entropy" not in metrics


def test_trainer_logs_the_entropy_of_every_step_since_the_last_training_log(tmp_path):
    """The logged ``entropy`` covers the training steps since the last training log: an evaluation in between (its log
    has ``eval_entropy``) neither takes nor drops them (mutant: every log read the training sums, so the evaluation
    log after step 1 took step 1's entropy and the training log at step 2 had step 2's only). learning_rate 0: both
    steps score the same student, whose mean over both sequences is the expected value."""
    from distill_ops.integrations.hf import FusedDistillationTrainer

    student, teacher = _tiny_models()
    input_ids, attention_mask, labels = _batch()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=1, per_device_eval_batch_size=2,
        learning_rate=0.0, optim="sgd", logging_steps=2, eval_strategy="steps", eval_steps=1, report_to="none",
        save_strategy="no", use_cpu=DEVICE.type == "cpu", dataloader_pin_memory=False,
    )
    rows = [{"input_ids": input_ids[i], "attention_mask": attention_mask[i], "labels": labels[i]} for i in range(2)]
    trainer = FusedDistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=rows,
                                       eval_dataset=rows, distill_kwargs={"impl": "torch"})
    trainer.train()
    expected = _mean_entropy(student, input_ids, attention_mask, labels)
    logged = [entry["entropy"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == [pytest.approx(expected, rel=1e-5)]
    evaluations = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert len(evaluations) == 2 and all("entropy" not in entry for entry in evaluations)
    assert all(entry["eval_entropy"] == pytest.approx(expected, rel=1e-5) for entry in evaluations)


def test_trainer_evaluation_entropy_leaves_out_earlier_eval_mode_sums(tmp_path):
    """``evaluate()`` reports the entropy of its own loop's tokens: sums left by a ``compute_loss`` call in eval mode
    outside the loop (here on other sequences) are dropped first (mutant: they joined the loop's mean)."""
    from distill_ops.integrations.hf import FusedDistillationTrainer

    student, teacher = _tiny_models()
    input_ids, attention_mask, labels = _batch()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_eval_batch_size=2, report_to="none", use_cpu=DEVICE.type == "cpu",
        dataloader_pin_memory=False,
    )
    rows = [{"input_ids": input_ids[i], "attention_mask": attention_mask[i], "labels": labels[i]} for i in range(2)]
    trainer = FusedDistillationTrainer(model=student, teacher_model=teacher, args=args,
                                       distill_kwargs={"impl": "torch"})
    flipped = input_ids.flip(-1)
    student.eval()
    trainer.compute_loss(student, {"input_ids": flipped, "labels": flipped})  # an eval-mode call outside a loop
    expected = _mean_entropy(student, input_ids, attention_mask, labels)
    assert abs(_mean_entropy(student, flipped, torch.ones_like(flipped), flipped) - expected) > 1e-3
    assert trainer.evaluate(eval_dataset=rows)["eval_entropy"] == pytest.approx(expected, rel=1e-5)


def test_shift_labels_refuses_what_it_cannot_shift():
    """``shift_labels`` (the helper's and the trainer's label shift, importable on its own): 1-D ids failed with
    "too many indices", a mask of another shape in a broadcast, float ids passed through (a validation audit,
    2026-12-07); each is refused naming the argument."""
    from distill_ops.integrations.hf import shift_labels

    ids = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 4]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert shift_labels(ids, None, mask).tolist() == [[6, 7, -100], [2, 3, 4]]
    with pytest.raises(ValueError, match=r"input_ids must have 2 dims, got shape \(4,\)"):
        shift_labels(ids[0], None, None)
    with pytest.raises(TypeError, match=r"input_ids must have dtype in \(int64"):
        shift_labels(ids.float(), None, None)
    with pytest.raises(ValueError, match=r"attention_mask must have the shape of input_ids \(2, 4\), got \(2, 3\)"):
        shift_labels(ids, None, mask[:, 1:])
    with pytest.raises(ValueError, match=r"labels must have the shape of input_ids \(2, 4\), got \(4,\)"):
        shift_labels(ids, ids[0], None)
