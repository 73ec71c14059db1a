"""distill_ops.integrations.trl against TRL's own GKD loss and trainer (the installed ``trl``)."""

import inspect
import os
import types

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")

from distill_ops.integrations.hf import causal_lm_distillation_loss, logit_scale  # noqa: E402
from distill_ops.integrations.trl import _gkd_base, generalized_jsd_loss  # noqa: E402
from tests.conftest import DEVICE, IMPLS, TOLERANCES, assert_close, word_tokenizer  # noqa: E402
from tests.test_integrations_hf import VOCAB, _batch, _tiny_models  # noqa: E402

GKDTrainer = _gkd_base()


def gkd_config_class():
    try:
        from trl.experimental.gkd import GKDConfig
    except ImportError:
        from trl import GKDConfig
    return GKDConfig


def _logits(shape, seed, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(DEVICE)


def _labels(shape, seed):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, VOCAB, shape, generator=generator)
    labels[0, :3] = -100  # a prompt
    labels[-1, -2:] = -100  # padding
    return labels.to(DEVICE)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("beta, temperature", [(0.0, 1.0), (0.3, 1.0), (0.5, 2.0), (1.0, 0.7)])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
@pytest.mark.parametrize("with_labels", [True, False])
def test_generalized_jsd_loss_equals_trl(impl, beta, temperature, reduction, with_labels):
    """Loss and student gradient equal TRL's ``GKDTrainer.generalized_jsd_loss`` in float64."""
    shape = (3, 7, VOCAB + 5)
    student, teacher = _logits(shape, 0), _logits(shape, 1, scale=4.0)
    labels = _labels(shape[:2], 2) if with_labels else None
    reference_input = student.clone().requires_grad_(True)
    expected = GKDTrainer.generalized_jsd_loss(reference_input, teacher, labels=labels, beta=beta,
                                               temperature=temperature, reduction=reduction)
    expected.backward()
    ours_input = student.float().requires_grad_(True)
    loss = generalized_jsd_loss(ours_input, teacher.float(), labels=labels, beta=beta, temperature=temperature,
                                reduction=reduction, impl=impl)
    loss.backward()
    assert_close(loss, expected, torch.float32)
    assert_close(ours_input.grad, reference_input.grad, torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_generalized_jsd_loss_num_items_in_batch_and_all_ignored(impl):
    shape = (2, 5, VOCAB)
    student, teacher = _logits(shape, 3), _logits(shape, 4)
    labels = _labels(shape[:2], 5)
    for items in (7, torch.tensor(7.0, device=DEVICE)):
        expected = GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=0.2,
                                                   num_items_in_batch=items)
        loss = generalized_jsd_loss(student.float(), teacher.float(), labels=labels, beta=0.2,
                                    num_items_in_batch=items, impl=impl)
        assert_close(loss, expected, torch.float32)
    # Every token ignored: 0 for batchmean (as TRL) and for mean (TRL: NaN), with a zero gradient.
    ignored = torch.full_like(labels, -100)
    for reduction in ("batchmean", "mean", "sum"):
        ours_input = student.float().requires_grad_(True)
        loss = generalized_jsd_loss(ours_input, teacher.float(), labels=ignored, reduction=reduction, impl=impl)
        loss.backward()
        assert loss.item() == 0.0 and not ours_input.grad.any()


def test_generalized_jsd_loss_bad_inputs():
    student, teacher = _logits((2, 3, 8), 0).float(), _logits((2, 3, 8), 1).float()
    with pytest.raises(ValueError, match="reduction.*'none'"):
        generalized_jsd_loss(student, teacher, reduction="none")
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd_loss(student, teacher, beta=1.5)
    with pytest.raises(ValueError, match="teacher_logits"):
        generalized_jsd_loss(student, teacher[:, :2])
    # kl_div's own message pointed to a vocab_size= argument this function does not take (a review, 2026-12-07).
    with pytest.raises(ValueError, match=r"same vocabulary size \(as TRL's loss\), got torch.Size\(\[8\]\) and "
                                         r"torch.Size\(\[6\]\); distill_ops.kl_div"):
        generalized_jsd_loss(student, teacher[..., :6])
    # Lists are a TypeError naming the argument (an AttributeError on .dim() before).
    with pytest.raises(TypeError, match="student_logits must be a torch.Tensor, got list"):
        generalized_jsd_loss(student.tolist(), teacher)
    with pytest.raises(TypeError, match="teacher_logits must be a torch.Tensor, got list"):
        generalized_jsd_loss(student, teacher.tolist())
    # Named as passed (an error-message audit: "normalizer must be ..."; list labels were an AttributeError).
    with pytest.raises(ValueError, match=r"num_items_in_batch must be in \[0.0, inf\), got -1"):
        generalized_jsd_loss(student, teacher, num_items_in_batch=-1)
    with pytest.raises(TypeError, match="labels must be a torch.Tensor, got list"):
        generalized_jsd_loss(student, teacher, labels=[[0, 0, 0]] * 2, reduction="mean")


def _gkd_attributes(cls, teacher, beta, **extra):
    """A trainer of ``cls`` with only what ``compute_loss`` reads (``Trainer.__init__`` is exercised below)."""
    trainer = object.__new__(cls)
    trainer.teacher_model = teacher
    trainer.beta = beta
    for name, value in extra.items():
        setattr(trainer, name, value)
    return trainer


@pytest.mark.parametrize("impl", IMPLS)
def test_fused_gkd_compute_loss_equals_trls(impl):
    """``FusedGKDTrainer.compute_loss`` (hidden states + LM heads, no logits) equals TRL's own
    ``GKDTrainer.compute_loss`` (both models' logits): loss and every student gradient."""
    from distill_ops.integrations.trl import FusedGKDTrainer as fused_cls

    assert issubclass(fused_cls, GKDTrainer)
    student, teacher = _tiny_models()
    input_ids, attention_mask, labels = _batch()
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    for beta, items in ((0.5, None), (0.1, torch.tensor(6.0))):
        student.zero_grad(set_to_none=True)
        expected = GKDTrainer.compute_loss(_gkd_attributes(GKDTrainer, teacher, beta), student, inputs,
                                           num_items_in_batch=items)
        expected.backward()
        expected_grads = {name: p.grad.clone() for name, p in student.named_parameters()}
        student.zero_grad(set_to_none=True)
        fused = _gkd_attributes(fused_cls, teacher, beta, fused_loss_kwargs={"impl": impl})
        loss, outputs = fused.compute_loss(student, inputs, return_outputs=True, num_items_in_batch=items)
        loss.backward()
        with torch.no_grad():  # the student's outputs, as GKDTrainer returns them (predictions read their logits)
            assert_close(outputs.logits, student(input_ids=input_ids, attention_mask=attention_mask).logits,
                         torch.float32)
        assert_close(loss, expected, torch.float32)
        for name, p in student.named_parameters():
            assert_close(p.grad, expected_grads[name], torch.float32, msg=name)


def test_fused_gkd_compute_loss_is_the_hf_helpers():
    from distill_ops.integrations.trl import FusedGKDTrainer

    student, teacher = _tiny_models()
    input_ids, attention_mask, labels = _batch()
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    loss = _gkd_attributes(FusedGKDTrainer, teacher, 0.4).compute_loss(student, inputs)
    expected = causal_lm_distillation_loss(student, teacher, input_ids, labels, attention_mask, divergence="jsd",
                                           beta=0.4)
    assert torch.equal(loss, expected)
    assert FusedGKDTrainer.generalized_jsd_loss is generalized_jsd_loss


def tiny_tokenizer(vocab: int = VOCAB):
    """A word-level tokenizer over a tiny model's vocabulary, built in memory (TRL's trainers need one)."""
    return word_tokenizer(vocab)


def _lora_head_copy() -> dict:
    """``peft_config`` of the trainer tests: LoRA on the attention and a trainable copy of the LM head (TRL refuses
    LoRA on the head), initialised under a fixed seed."""
    peft = pytest.importorskip("peft")
    # init_lora_weights=False: B starts random too, so that every adapter tensor moves in the step.
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"],
                             init_lora_weights=False)
    torch.manual_seed(3)  # the adapters' initialisation
    return {"peft_config": config}


def _gkd_data():
    """The tiny batch as a GKD dataset (prompts: the first three tokens) and a collator of whole tensors."""
    import datasets

    input_ids, attention_mask, labels = _batch()
    dataset = datasets.Dataset.from_dict({
        "input_ids": input_ids.tolist(), "attention_mask": attention_mask.tolist(), "labels": labels.tolist(),
        "prompts": input_ids[:, :3].tolist(), "prompt_attention_mask": attention_mask[:, :3].tolist(),
    })

    def collate(examples):
        return {key: torch.tensor([example[key] for example in examples]) for key in examples[0]}

    return dataset, collate


def test_fused_gkd_predict_and_compute_metrics_equal_trls(tmp_path):
    """``predict()`` and ``evaluate()`` with ``compute_metrics`` ask ``compute_loss`` for outputs and read their
    logits (TRL's ``prediction_step``): ours returns the student's outputs as ``GKDTrainer`` does, so both give
    TRL's loss, predictions and metrics (they failed with ``'dict' object has no attribute 'logits'``)."""
    from distill_ops.integrations.trl import FusedGKDTrainer

    student, teacher = _tiny_models()
    dataset, collate = _gkd_data()
    results = []
    for cls in (GKDTrainer, FusedGKDTrainer):
        args = gkd_config_class()(output_dir=str(tmp_path / cls.__name__), report_to="none", bf16=False,
                                  use_cpu=DEVICE.type == "cpu", per_device_eval_batch_size=2,
                                  dataloader_pin_memory=False)
        trainer = cls(model=student, teacher_model=teacher, args=args, train_dataset=dataset, eval_dataset=dataset,
                      data_collator=collate, processing_class=tiny_tokenizer(),
                      compute_metrics=lambda prediction: {"mean_logit": float(prediction.predictions.mean())})
        prediction = trainer.predict(dataset)
        results.append((prediction.metrics["test_loss"], prediction.predictions, trainer.evaluate()))
    (expected_loss, expected_logits, expected_metrics), (loss, logits, metrics) = results
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert_close(torch.as_tensor(logits), torch.as_tensor(expected_logits), torch.float32)
    assert metrics["eval_loss"] == pytest.approx(expected_metrics["eval_loss"], rel=1e-5)
    assert metrics["eval_mean_logit"] == pytest.approx(expected_metrics["eval_mean_logit"], rel=1e-5)


@pytest.mark.parametrize("lmbda, lora, bf16, accumulation", [
    (0.0, False, False, 1), (1.0, False, False, 1), (1.0, False, False, 2), (0.0, True, False, 1),
    (0.0, False, True, 1)], ids=["off", "on", "on-accumulated", "off-lora", "off-bf16"])
def test_fused_gkd_trainer_step_equals_trls(tmp_path, lmbda, lora, bf16, accumulation):
    """One real training step of ``FusedGKDTrainer`` and of TRL's ``GKDTrainer`` from the same student: the same
    logged loss and the same updated weights, off-policy (``lmbda=0``) and on-policy (``lmbda=1``: the student
    samples completions of the prompts, the same ones under the same seed); the teacher does not move. With
    ``peft_config`` (LoRA on the attention, a trainable copy of the LM head: TRL refuses LoRA on the head) TRL wraps
    the student in a ``PeftModel``: the same adapter and head-copy weights after the step. With ``bf16=True``
    (GKDConfig's default) both trainers run every layer of both models under the Trainer's bf16 autocast (before,
    ours ran in fp32: accelerate's autocast wraps the model's own forward, which the fused loss does not call); the
    losses then differ by bf16 rounding only (TRL's logits are bf16, ours fp32 from bf16 GEMM inputs).

    On-policy, the token count differs on purpose: transformers counts ``num_items_in_batch`` from the dataset's
    labels before TRL replaces them with the generated completion (trl#4719); ours counts the generated tokens
    it scores. With plain SGD the step is linear in the loss, so ours is TRL's scaled by the ratio of the counts
    (the loss, and the weights' move from where they started). With gradient accumulation (two micro-batches of
    one sequence) the count covers both micro-batches' completions."""
    import copy

    from distill_ops.integrations.trl import FusedGKDTrainer

    trl_config = gkd_config_class()
    student, teacher = _tiny_models()
    dataset, collate = _gkd_data()
    teacher_before = {name: p.detach().clone() for name, p in teacher.named_parameters()}
    results = []
    dtypes = {}
    for cls in (GKDTrainer, FusedGKDTrainer):
        model = copy.deepcopy(student)
        args = trl_config(
            output_dir=str(tmp_path / cls.__name__), max_steps=1, per_device_train_batch_size=2 // accumulation,
            gradient_accumulation_steps=accumulation, learning_rate=0.05,
            optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, logging_steps=1,
            report_to="none", save_strategy="no", use_cpu=DEVICE.type == "cpu", dataloader_pin_memory=False,
            lmbda=lmbda, beta=0.3, max_new_tokens=4, temperature=0.9, seed=7,
            # GKDConfig defaults to bf16 autocast (on the CPU too): fp32 unless testing it, so that both losses see
            # the same student (TRL's bf16 logits and our fp32 head GEMM differ at bf16's precision).
            bf16=bf16,
        )
        peft = _lora_head_copy() if lora else {}
        trainer = cls(model=model, teacher_model=teacher, args=args, train_dataset=dataset, data_collator=collate,
                      processing_class=tiny_tokenizer(), **peft)
        seen = dtypes.setdefault(cls.__name__, set())
        counts = []  # (num_items_in_batch, tokens the loss scores) of each compute_loss call

        def counting(model, inputs, *args, _real=trainer.compute_loss, _counts=counts, **kwargs):
            items = kwargs.get("num_items_in_batch", args[1] if len(args) > 1 else None)
            _counts.append((float(items), int((inputs["labels"][:, 1:] != -100).sum())))
            return _real(model, inputs, *args, **kwargs)

        trainer.compute_loss = counting
        hooks = [layer.register_forward_hook(lambda module, args, output: seen.add(output.dtype))
                 for layer in (model.model.layers[0].self_attn.q_proj, teacher.model.layers[0].self_attn.q_proj)]
        trainer.train()
        for hook in hooks:
            hook.remove()
        logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        results.append((logged, dict(trainer.model.named_parameters()), trainer.model, counts))
    (expected_loss, trl_weights, _, trl_counts), (loss, weights, trained, counts) = results
    assert len(counts) == len(trl_counts) == accumulation
    # Ours divides every micro-batch by the tokens scored over the accumulation window.
    assert all(items == sum(scored for _, scored in counts) for items, _ in counts)
    ratio = trl_counts[0][0] / counts[0][0]
    assert (ratio != 1.0) == (lmbda == 1.0)  # this data's completions are shorter than its labelled spans
    expected_loss, expected_weights = [value * ratio for value in expected_loss], trl_weights
    if ratio != 1.0:  # on-policy, no LoRA: parameter names are the student's
        start = dict(student.named_parameters())
        expected_weights = {name: start[name] + ratio * (p - start[name]) for name, p in trl_weights.items()}
    precision = torch.bfloat16 if bf16 else torch.float32
    assert all(seen == {precision} for seen in dtypes.values()), dtypes
    assert len(loss) == 1 and loss[0] == pytest.approx(expected_loss[0], **{"rel": 1e-5} if not bf16 else {
        "rel": TOLERANCES[torch.bfloat16]["rtol"]})
    assert set(weights) == set(expected_weights)
    for name, p in weights.items():
        assert_close(p, expected_weights[name], precision, msg=name)
    if lora:  # the adapters moved (TRL's initial ones equal ours: same seed), the base weights did not
        import peft

        assert isinstance(trained, peft.PeftModel)
        adapters = [name for name in weights if "lora_" in name]
        assert adapters and all(weights[name].requires_grad for name in adapters)
        assert torch.equal(trained.get_base_model().lm_head.original_module.weight, student.lm_head.weight)
        head_copy = next(name for name in weights if "lm_head.modules_to_save" in name)
        assert not torch.equal(weights[head_copy], student.lm_head.weight)
    else:
        assert not torch.equal(weights["lm_head.weight"], student.lm_head.weight)  # the step moved the student
    assert all(torch.equal(p, teacher_before[name]) for name, p in teacher.named_parameters())


def test_fused_gkd_trainer_resumes_reproducibly(tmp_path):
    """A run resumed from a checkpoint logs what the uninterrupted run logged (lmbda = 0.5: the on-policy draws and
    the sampled completions come from the RNG state the Trainer restores; generating inside get_batch_samples, before
    that restore, shifted every later window's draws)."""
    import copy

    from distill_ops.integrations.trl import FusedGKDTrainer

    student, teacher = _tiny_models()
    dataset, collate = _gkd_data()

    def trainer():
        args = gkd_config_class()(
            output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=1, learning_rate=0.05, optim="sgd",
            lr_scheduler_type="constant", max_grad_norm=0.0, logging_steps=1, report_to="none",
            save_strategy="steps", save_steps=1, use_cpu=DEVICE.type == "cpu", dataloader_pin_memory=False,
            lmbda=0.5, beta=0.3, max_new_tokens=4, temperature=0.9, seed=7, bf16=False,
        )
        return FusedGKDTrainer(model=copy.deepcopy(student), teacher_model=teacher, args=args, train_dataset=dataset,
                               data_collator=collate, processing_class=tiny_tokenizer())

    full = trainer()
    full.train()
    resumed = trainer()
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    losses = [[entry["loss"] for entry in run.state.log_history if "loss" in entry] for run in (full, resumed)]
    assert len(losses[0]) == 3 and losses[1] == losses[0], losses  # the resumed history holds the first step too


@pytest.mark.parametrize("reduction", ["batchmean", "mean"])
def test_generalized_jsd_loss_traces_as_one_graph(reduction):
    """The drop-in traces under ``torch.compile(fullgraph=True)`` (its normalisers are tensor / shape math)."""
    shape = (2, 4, 32)
    student = _logits(shape, 6).float().cpu().requires_grad_(True)
    teacher = _logits(shape, 7).float().cpu()
    labels = _labels(shape[:2], 8).cpu()

    def loss_fn(s, t, y):
        return generalized_jsd_loss(s, t, y, beta=0.4, reduction=reduction, impl="torch")

    loss = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(student, teacher, labels)
    loss.backward()
    reference = student.detach().double().requires_grad_(True)
    expected = GKDTrainer.generalized_jsd_loss(reference, teacher.double(), labels=labels, beta=0.4,
                                               reduction=reduction)
    expected.backward()
    assert_close(loss, expected, torch.float32)
    assert_close(student.grad, reference.grad, torch.float32)


def test_fused_gkd_scores_every_completion_token_whatever_the_prompt_lengths():
    """Peer bug (TRL's GKDTrainer before its labels-only masking): the completion was sliced after the batch's
    longest prompt, so a row with a shorter prompt lost its first completion tokens. Ours scores exactly the
    labelled tokens of each row."""
    from distill_ops.integrations.trl import FusedGKDTrainer

    student, teacher = _tiny_models()
    input_ids, attention_mask, _ = _batch()
    labels = input_ids.clone()
    labels[0, :2] = -100  # a 2-token prompt
    labels[1, :6] = -100  # a 6-token prompt
    labels[1, -3:] = -100  # padding
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    loss = _gkd_attributes(FusedGKDTrainer, teacher, 0.5, fused_loss_kwargs={"impl": "torch"}).compute_loss(
        student, inputs)
    with torch.no_grad():
        student_logits = student(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].double()
        teacher_logits = teacher(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].double()
    shifted = labels[:, 1:]
    expected = GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels=shifted, beta=0.5)
    assert_close(loss, expected, torch.float32)
    sliced = shifted.clone()
    sliced[:, :5] = -100  # what slicing after the longest prompt (6 tokens) keeps
    truncated = GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels=sliced, beta=0.5)
    assert abs(loss.item() - truncated.item()) > 1e-3  # the tokens it dropped count


def test_fused_gkd_compute_loss_uses_the_trainer_normalizer():
    """Two data-parallel ranks: the GKD loss is twice the single-process one for the same global count (DDP then
    averages the two ranks' gradients), as TRL's trainers scale theirs."""
    from types import SimpleNamespace

    from distill_ops.integrations.trl import FusedGKDTrainer

    student, teacher = _tiny_models()
    input_ids, attention_mask, labels = _batch()
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    losses = []
    for processes in (1, 2):
        fused = _gkd_attributes(FusedGKDTrainer, teacher, 0.5, fused_loss_kwargs={"impl": "torch"},
                                args=SimpleNamespace(average_tokens_across_devices=True, n_gpu=1),
                                accelerator=SimpleNamespace(num_processes=processes), get_tp_size=lambda: 1)
        losses.append(fused.compute_loss(student, inputs, num_items_in_batch=torch.tensor(9.0)))
    assert_close(losses[1], 2 * losses[0], torch.float32)


# ----------------------------------------------------------------------------------------------
# FusedDistillationTrainer: TRL's on-policy DistillationTrainer with the fused loss
# ----------------------------------------------------------------------------------------------


def _generated_batch(tool_mask=False):
    """A batch as TRL's DistillationTrainer builds it after generation: prompts left-padded, completions
    right-padded (the second completion ended early)."""
    generator = torch.Generator().manual_seed(11)
    prompt_ids = torch.randint(3, VOCAB, (2, 5), generator=generator)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[1, :2] = 0
    prompt_ids[1, :2] = 0  # left padding
    completion_ids = torch.randint(3, VOCAB, (2, 6), generator=generator)
    completion_mask = torch.ones_like(completion_ids)
    completion_mask[1, -2:] = 0
    completion_ids[1, -2:] = 0  # right padding
    batch = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
             "completion_mask": completion_mask}
    if tool_mask:  # a tool's output inside the first completion: not the student's tokens, not scored
        batch["tool_mask"] = torch.ones_like(completion_mask)
        batch["tool_mask"][0, 2:4] = 0
    return {key: value.to(DEVICE) for key, value in batch.items()}


def _distillation_attributes(cls, student, teacher, beta, temperature, processes=1, **extra):
    """A trainer of ``cls`` with only what ``compute_loss`` reads (``Trainer.__init__`` is exercised below)."""
    import collections
    from types import SimpleNamespace

    from trl.models.utils import _ForwardRedirection

    trainer = object.__new__(cls)
    trainer.teacher_model, trainer.beta, trainer.temperature, trainer.model = teacher, beta, temperature, student
    trainer.accelerator = SimpleNamespace(unwrap_model=lambda model: model, is_main_process=True,
                                          num_processes=processes, gather_for_metrics=lambda tensor: tensor)
    trainer._forward_redirection = _ForwardRedirection()
    trainer._metrics = collections.defaultdict(lambda: collections.defaultdict(list))
    trainer.model_kwarg_keys = set(inspect.signature(student.forward).parameters)
    trainer._is_vlm = False
    for name, value in extra.items():
        setattr(trainer, name, value)
    return trainer


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("beta, temperature, items, tool_mask", [
    (1.0, 1.0, None, False), (0.0, 0.8, 5.0, False), (0.5, 2.0, None, True), (0.3, 1.0, 7.0, True)])
def test_fused_distillation_compute_loss_equals_trls(impl, beta, temperature, items, tool_mask):
    """``FusedDistillationTrainer.compute_loss`` (our fused loss) equals TRL's own ``DistillationTrainer.compute_loss``
    (its chunked divergence): the loss, every student gradient and the logged mean entropy, for TRL's three
    divergences (beta 1 = its default reverse KL, 0, 0.5 and another mixture), its generated-token count as the
    normaliser on two processes, and a tool's tokens left out."""
    from trl import DistillationTrainer

    from distill_ops.integrations.trl import FusedDistillationTrainer

    assert issubclass(FusedDistillationTrainer, DistillationTrainer)
    student, teacher = _tiny_models()
    inputs = _generated_batch(tool_mask)
    if items is not None:
        inputs["num_items_in_batch"] = torch.tensor(items)
    results = []
    for cls, extra in ((DistillationTrainer, {}), (FusedDistillationTrainer, {"fused_loss_kwargs": {"impl": impl}})):
        student.zero_grad(set_to_none=True)
        trainer = _distillation_attributes(cls, student, teacher, beta, temperature, processes=2, **extra)
        loss = trainer.compute_loss(student, inputs)
        loss.backward()
        results.append((loss, trainer._metrics["train"]["entropy"],
                        {name: p.grad.clone() for name, p in student.named_parameters()}))
    (expected, expected_entropy, expected_grads), (loss, entropy, grads) = results
    assert_close(loss, expected, torch.float32, "loss")
    entropy = [float(value) for value in entropy]  # ours stays a device tensor until the Trainer logs
    assert len(entropy) == len(expected_entropy) == 1 and entropy[0] == pytest.approx(expected_entropy[0], rel=1e-5)
    assert entropy[0] > 1.0
    for name, grad in grads.items():
        assert_close(grad, expected_grads[name], torch.float32, name)
    if items is not None:  # the normaliser: TRL's count over the two processes
        scored = int((inputs["completion_mask"] * inputs.get("tool_mask", 1)).sum())
        unnormalised = FusedDistillationTrainer.compute_loss(
            _distillation_attributes(FusedDistillationTrainer, student, teacher, beta, temperature,
                                     fused_loss_kwargs={"impl": impl}), student,
            {key: value for key, value in inputs.items() if key != "num_items_in_batch"})
        assert_close(loss, unnormalised * scored / (items / 2), torch.float32, "normaliser")


def test_fused_distillation_entropy_of_a_batch_with_nothing_scored():
    """Every completion token masked (and TRL's count 0): the step's logged mean entropy is 0, as TRL logs it, not
    0 / 0 (a guard that was dropped passed every other test); the loss is 0."""
    from distill_ops.integrations.trl import FusedDistillationTrainer

    student, teacher = _tiny_models()
    inputs = _generated_batch()
    inputs["completion_mask"] = torch.zeros_like(inputs["completion_mask"])
    inputs["num_items_in_batch"] = torch.tensor(0.0)
    trainer = _distillation_attributes(FusedDistillationTrainer, student, teacher, 0.5, 1.0,
                                       fused_loss_kwargs={"impl": "torch"})
    loss = trainer.compute_loss(student, inputs)
    assert loss.item() == 0.0
    assert [float(value) for value in trainer._metrics["train"]["entropy"]] == [0.0]


def test_fused_gkd_compute_loss_runs_the_teacher_in_eval_mode():
    """A teacher left in training mode (attention dropout 0.5 here) is put in eval mode by ``compute_loss``, as TRL's
    GKDTrainer does: the loss equals the eval-mode teacher's, draw after draw (the tests' teachers were already in
    eval mode and had no dropout, so a compute_loss that skipped it passed)."""
    from distill_ops.integrations.trl import FusedGKDTrainer

    student, teacher = _tiny_models()
    for layer in teacher.model.layers:
        layer.self_attn.attention_dropout = 0.5
    input_ids, attention_mask, labels = _batch()
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    trainer = _gkd_attributes(FusedGKDTrainer, teacher, 0.5, fused_loss_kwargs={"impl": "torch"})
    expected = trainer.compute_loss(student, inputs)
    for seed in range(2):
        teacher.train()
        torch.manual_seed(seed)
        assert trainer.compute_loss(student, inputs).item() == expected.item()
        assert not teacher.training


def test_fused_trainers_refuse_loss_kwargs_they_set_themselves():
    """``fused_loss_kwargs`` may not set what the trainer sets from its own config (GKD's ``beta``, the on-policy
    trainer's ``temperature``), nor name an argument the loss does not have: a ValueError naming the key and where
    the trainer takes its value (Python's "got multiple values for keyword argument" did not say)."""
    from distill_ops.integrations.trl import FusedDistillationTrainer, FusedGKDTrainer

    student, teacher = _tiny_models()
    input_ids, attention_mask, labels = _batch()
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    gkd = _gkd_attributes(FusedGKDTrainer, teacher, 0.3, fused_loss_kwargs={"impl": "torch", "beta": 0.9})
    with pytest.raises(ValueError, match=r"fused_loss_kwargs sets \['beta'\], which FusedGKDTrainer sets itself: "
                                         r"beta from GKDConfig.beta \(0.3\)"):
        gkd.compute_loss(student, inputs)
    gkd.fused_loss_kwargs = {"impl": "torch", "temperature": 2.0}  # GKD's loss has no temperature of its own
    assert torch.isfinite(gkd.compute_loss(student, inputs))
    trainer = _distillation_attributes(FusedDistillationTrainer, student, teacher, 0.5, 1.5,
                                       fused_loss_kwargs={"temperature": 1.0})
    with pytest.raises(ValueError, match=r"sets \['temperature'\], which FusedDistillationTrainer sets itself: "
                                         r"temperature from the config's temperature \(1.5\)"):
        trainer.compute_loss(student, _generated_batch())
    trainer.fused_loss_kwargs = {"ignore_index": -1}  # it would score the prompt and padding it labels -100
    with pytest.raises(ValueError, match=r"sets \['ignore_index'\], which FusedDistillationTrainer sets itself"):
        trainer.compute_loss(student, _generated_batch())
    trainer.fused_loss_kwargs = types.MappingProxyType({"impl": "torch"})  # any mapping
    assert torch.isfinite(trainer.compute_loss(student, _generated_batch()))
    trainer.fused_loss_kwargs = {"betta": 0.1}
    with pytest.raises(ValueError, match=r"fused_loss_kwargs has \['betta'\], not among the keyword-only"):
        trainer.compute_loss(student, _generated_batch())


def test_fused_distillation_refuses_multimodal_batches_and_a_missing_teacher():
    from distill_ops.integrations.trl import FusedDistillationTrainer

    student, teacher = _tiny_models()
    trainer = _distillation_attributes(FusedDistillationTrainer, student, teacher, 0.5, 1.0)
    for key in ("pixel_values", "image_grid_thw", "mm_token_type_ids", "token_type_ids"):
        with pytest.raises(ValueError, match=f"multimodal inputs \\['{key}'\\]"):
            trainer.compute_loss(student, dict(_generated_batch(), **{key: torch.zeros(2, 3)}))
    trainer.teacher_model = None
    with pytest.raises(NotImplementedError, match="needs a local teacher_model"):
        trainer.compute_loss(student, _generated_batch())


def _prompt_dataset():
    import datasets

    return datasets.Dataset.from_dict({"prompt": ["t5 t9 t11", "t20 t3", "t7 t8 t9 t10", "t40"]})


@pytest.mark.parametrize("bf16, accumulation, lora", [(False, 1, False), (True, 2, False), (False, 1, True)],
                         ids=["fp32", "bf16-accumulation", "lora"])
def test_fused_distillation_trainer_step_equals_trls(tmp_path, bf16, accumulation, lora):
    """Real training steps of ``FusedDistillationTrainer`` and of TRL's ``DistillationTrainer`` from the same
    student, with the config's defaults where they matter (beta = 1, gradient checkpointing on, and ``bf16=True``,
    under which TRL generates in bf16 but its loss runs the fp32 models in fp32, as ours does): the student
    generates the same completions under the same seed, both log the same loss and entropy, end with the same
    weights and report the same evaluation loss and entropy (``evaluate``: the mean over generated tokens); with
    gradient accumulation TRL's normaliser counts the generated tokens of the accumulated batches; with
    ``peft_config`` (LoRA on the attention and a trainable copy of the LM head; TRL refuses LoRA on the head) the
    same adapter and head-copy weights."""
    import copy

    from trl import DistillationConfig, DistillationTrainer

    from distill_ops.integrations.trl import FusedDistillationTrainer

    student, teacher = _tiny_models()
    teacher_before = {name: p.detach().clone() for name, p in teacher.named_parameters()}
    results, dtypes = [], {}
    for cls in (DistillationTrainer, FusedDistillationTrainer):
        model = copy.deepcopy(student)
        args = DistillationConfig(
            output_dir=str(tmp_path / cls.__name__), max_steps=2, per_device_train_batch_size=2,
            gradient_accumulation_steps=accumulation, learning_rate=0.05, optim="sgd", lr_scheduler_type="constant",
            max_grad_norm=0.0, weight_decay=0.0, logging_steps=1, report_to="none", save_strategy="no",
            use_cpu=DEVICE.type == "cpu", dataloader_pin_memory=False, max_completion_length=5, temperature=0.9,
            seed=7, bf16=bf16,
        )
        peft = _lora_head_copy() if lora else {}
        trainer = cls(model=model, teacher_model=teacher, args=args, train_dataset=_prompt_dataset(),
                      eval_dataset=_prompt_dataset(), processing_class=tiny_tokenizer(), **peft)
        model = trainer.model
        logit_scale(model)  # our one-time probe (a no-grad forward), before the hook that tells generation apart
        seen = dtypes.setdefault(cls.__name__, set())  # (generating or scoring, dtype) of the student's layer
        hook = model.get_decoder().layers[0].self_attn.q_proj.register_forward_hook(
            lambda module, args, output: seen.add(("scoring" if torch.is_grad_enabled() else "generating",
                                                   output.dtype)))
        trainer.train()
        hook.remove()
        logged = [(entry["loss"], entry["entropy"]) for entry in trainer.state.log_history if "loss" in entry]
        evaluated = trainer.evaluate()  # prediction_step -> compute_loss on freshly generated completions
        logged.append((evaluated["eval_loss"], evaluated["eval_entropy"]))
        results.append((logged, dict(trainer.model.named_parameters())))
    (expected_logs, expected_weights), (logs, weights) = results
    generation = torch.bfloat16 if bf16 else torch.float32  # TRL generates under the Trainer's autocast
    assert all(seen == {("generating", generation), ("scoring", torch.float32)} for seen in dtypes.values()), dtypes
    assert len(logs) == len(expected_logs) == 3  # two training steps, one evaluation
    for (loss, entropy), (expected_loss, expected_entropy) in zip(logs, expected_logs):
        assert loss == pytest.approx(expected_loss, rel=1e-5) and entropy == pytest.approx(expected_entropy, rel=1e-5)
        assert entropy > 1.0
    assert set(weights) == set(expected_weights)
    for name, p in weights.items():
        assert_close(p, expected_weights[name], torch.float32, msg=name)
    head = next(name for name in weights if name.endswith("lm_head.weight") or "lm_head.modules_to_save" in name)
    assert not torch.equal(weights[head], student.lm_head.weight)  # the steps moved the student (its head copy)
    if lora:
        assert any("lora_" in name for name in weights)
    assert all(torch.equal(p, teacher_before[name]) for name, p in teacher.named_parameters())


def _distillation_ddp_rank(rank: int, world: int, rendezvous: str, out_dir: str) -> None:
    """One rank of ``test_fused_distillation_trainer_on_two_ddp_ranks_equals_trls``: TRL's trainer, then ours, from
    the same student, under DDP (gloo; the group set up through a file, as in the HF Trainer's two-rank test)."""
    import copy

    from trl import DistillationConfig, DistillationTrainer

    from distill_ops.integrations.trl import FusedDistillationTrainer
    from tests.test_integrations_hf import _destroy_group, trainer_rank_group

    trainer_rank_group(rank, world, rendezvous)
    student, teacher = (model.cpu() for model in _tiny_models())
    weights = {}
    for cls in (DistillationTrainer, FusedDistillationTrainer):
        model = copy.deepcopy(student)
        args = DistillationConfig(
            output_dir=f"{out_dir}/{cls.__name__}", max_steps=1, per_device_train_batch_size=2, learning_rate=0.05,
            optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, report_to="none",
            save_strategy="no", use_cpu=True, dataloader_pin_memory=False, ddp_backend="gloo", bf16=False,
            max_completion_length=4, temperature=0.9, seed=7, beta=0.5,
        )
        trainer = cls(model=model, teacher_model=teacher, args=args, train_dataset=_prompt_dataset(),
                      processing_class=tiny_tokenizer())
        assert trainer.args.world_size == world
        if cls is FusedDistillationTrainer:
            trainer.fused_loss_kwargs = {"impl": "torch"}
        trainer.train()
        weights[cls.__name__] = {name: p.detach().clone() for name, p in model.named_parameters()}
        del trainer
    torch.save(weights, f"{out_dir}/weights{rank}.pt")
    _destroy_group()  # before the process exits (see the HF Trainer's two-rank test)


def test_fused_distillation_trainer_on_two_ddp_ranks_equals_trls(tmp_path):
    """Both trainers on two DDP ranks (gloo, CPU), each rank generating its own completions: ours routes the loss
    through the DDP wrapper itself, so the ranks' gradients are averaged as TRL's are: the same weights as TRL's
    trainer on each rank, and the same on both ranks."""
    import torch.multiprocessing as mp

    mp.start_processes(_distillation_ddp_rank, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    student, _ = _tiny_models()
    ranks = [torch.load(tmp_path / f"weights{rank}.pt") for rank in range(2)]
    for rank, weights in enumerate(ranks):
        for name, p in weights["FusedDistillationTrainer"].items():
            assert_close(p, weights["DistillationTrainer"][name], torch.float32, msg=f"rank {rank} {name}")
            assert_close(p, ranks[0]["FusedDistillationTrainer"][name], torch.float32, msg=f"rank {rank} {name}")
    moved = ranks[0]["FusedDistillationTrainer"]["lm_head.weight"]
    assert not torch.equal(moved, student.lm_head.weight.cpu())


# ----------------------------------------------------------------------------------------------
# From a mutation audit of distill_ops/integrations/trl.py: each test fails on the mutant named in its docstring
# ----------------------------------------------------------------------------------------------


def test_fused_distillation_compute_loss_runs_the_teacher_in_eval_mode():
    """``FusedDistillationTrainer.compute_loss`` puts a teacher left in training mode (attention dropout 0.5 here) in
    eval mode: the loss equals the eval-mode teacher's, draw after draw, and equals TRL's loss with that teacher
    (mutant: ``distillation_trainer_loss`` skipped ``teacher_model.eval()``; only the GKD trainer's was tested)."""
    from trl import DistillationTrainer

    from distill_ops.integrations.trl import FusedDistillationTrainer

    student, teacher = _tiny_models()
    for layer in teacher.model.layers:
        layer.self_attn.attention_dropout = 0.5
    inputs = _generated_batch()
    expected = _distillation_attributes(DistillationTrainer, student, teacher.eval(), 0.5, 1.0).compute_loss(
        student, inputs)
    trainer = _distillation_attributes(FusedDistillationTrainer, student, teacher, 0.5, 1.0,
                                       fused_loss_kwargs={"impl": "torch"})
    for seed in range(2):
        teacher.train()
        torch.manual_seed(seed)
        assert_close(trainer.compute_loss(student, inputs), expected, torch.float32)
        assert not teacher.training


def test_fused_distillation_evaluation_loss_is_the_batch_mean_as_trls():
    """In evaluation (the student in eval mode) the batch's generated-token count, gathered over processes, is not the
    normaliser: TRL's loss is the mean over the batch's own scored tokens, and so is ours, on two processes (mutant: the
    count was used in evaluation too, scaling the loss by local tokens / (global tokens / processes); every test had
    one process or training mode there)."""
    from trl import DistillationTrainer

    from distill_ops.integrations.trl import FusedDistillationTrainer

    student, teacher = _tiny_models()
    student.eval()
    inputs = _generated_batch()
    inputs["num_items_in_batch"] = torch.tensor(13.0)  # this process's 10 completion tokens and another's 3
    losses = []
    for cls, extra in ((DistillationTrainer, {}), (FusedDistillationTrainer, {"fused_loss_kwargs": {"impl": "torch"}})):
        trainer = _distillation_attributes(cls, student, teacher, 0.5, 1.0, processes=2, **extra)
        with torch.no_grad():
            losses.append(trainer.compute_loss(student, inputs))
    expected, loss = losses
    assert_close(loss, expected, torch.float32)
    scored = int(inputs["completion_mask"].sum())
    assert abs(scored / (13.0 / 2) - 1.0) > 0.1  # the check can tell the two normalisers apart


def test_fused_distillation_entropy_metric_is_gathered_like_trls():
    """The logged entropy is the mean over every process's scored tokens: both the entropy sum and the token count are
    gathered (two processes with the same batch here, through the accelerator's ``gather_for_metrics``), and the
    value equals TRL's (mutant: only the sum was gathered, doubling the metric on two processes; the two-rank test
    compares weights only)."""
    from trl import DistillationTrainer

    from distill_ops.integrations.trl import FusedDistillationTrainer

    student, teacher = _tiny_models()
    inputs = _generated_batch()
    metrics = []
    for cls, extra in ((DistillationTrainer, {}), (FusedDistillationTrainer, {"fused_loss_kwargs": {"impl": "torch"}})):
        trainer = _distillation_attributes(cls, student, teacher, 0.5, 1.0, processes=2, **extra)
        trainer.accelerator.gather_for_metrics = lambda tensor: torch.stack([tensor, tensor])  # two equal processes
        trainer.compute_loss(student, inputs)
        metrics.append([float(value) for value in trainer._metrics["train"]["entropy"]])
    expected, entropy = metrics
    assert len(entropy) == len(expected) == 1 and entropy[0] == pytest.approx(expected[0], rel=1e-5)
    assert entropy[0] > 1.0


def test_fused_distillation_entropy_logs_stay_floats_when_evaluation_runs_between_train_logs(tmp_path):
    """An evaluation between two train logs (``eval_steps=1, logging_steps=2``): TRL's ``log`` clears only the current
    mode's metric lists, so the train list held the earlier log's floats followed by the next steps' tensors; ours
    converted a list only when its first value was a tensor, logged a tensor average, and the checkpoint's
    ``trainer_state.json`` failed ("Object of type Tensor is not JSON serializable"; a review, 2026-12-07). Both
    trainers now train and checkpoint, and log the same float entropies."""
    import copy

    from trl import DistillationConfig, DistillationTrainer

    from distill_ops.integrations.trl import FusedDistillationTrainer

    student, teacher = _tiny_models()
    logged = []
    for cls in (DistillationTrainer, FusedDistillationTrainer):
        args = DistillationConfig(
            output_dir=str(tmp_path / cls.__name__), max_steps=2, per_device_train_batch_size=2,
            per_device_eval_batch_size=2, learning_rate=0.01, report_to="none", use_cpu=DEVICE.type == "cpu",
            dataloader_pin_memory=False, max_completion_length=4, bf16=False, seed=0, logging_steps=2,
            eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=2,
        )
        trainer = cls(model=copy.deepcopy(student), teacher_model=teacher, args=args, train_dataset=_prompt_dataset(),
                      eval_dataset=_prompt_dataset(), processing_class=tiny_tokenizer())
        trainer.train()
        assert (tmp_path / cls.__name__ / "checkpoint-2" / "trainer_state.json").exists()
        logged.append([entry.get("entropy", entry.get("eval_entropy")) for entry in trainer.state.log_history
                       if "entropy" in entry or "eval_entropy" in entry])
    expected, entropies = logged
    assert len(entropies) == len(expected) == 3  # two evaluations and one train log
    assert all(type(value) is float for value in entropies)
    assert entropies == pytest.approx(expected, rel=1e-5)
