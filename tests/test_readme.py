"""The README's Python examples run as written.

Every ```python block of README.md is executed verbatim (only the device string ``"cuda"`` is replaced by
this machine's device) after a prelude that defines the names the block takes as given (tensors, tiny
random models), and the names it produces are then checked. A block without a prelude here fails the
test, so a new README example cannot go unchecked.
"""

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import DEVICE, word_tokenizer

README = Path(__file__).resolve().parents[1] / "README.md"
V = 300  # DACKLLoss(vocab_top_m=256) needs at least 256 tokens


def readme_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _logits(*shape, grad=False):
    return torch.randn(*shape, device=DEVICE).requires_grad_(grad)


def _labels(rows):
    labels = torch.randint(0, V, (rows,), device=DEVICE)
    labels[1] = -100
    return labels


def _tiny_llama(layers, seed, init=0.02):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                                      initializer_range=init)
    return transformers.LlamaForCausalLM(config).float().eval().to(DEVICE)


def _kl_div():
    return dict(student_logits=_logits(6, V, grad=True), teacher_logits=_logits(6, V), labels=_labels(6))


def _fused_linear():
    head = lambda hidden: SimpleNamespace(lm_head=torch.nn.Linear(hidden, V, bias=False).to(DEVICE))  # noqa: E731
    student, teacher = head(16), head(24)
    student.lm_head.weight.requires_grad_(True)
    return dict(student=student, teacher=teacher, student_hidden=_logits(2, 3, 16, grad=True),
                teacher_hidden=_logits(2, 3, 24), labels=_labels(6).view(2, 3))


def _hf_trainer(tmp_path):
    transformers = pytest.importorskip("transformers")
    student, teacher = _tiny_llama(1, 0).train(), _tiny_llama(2, 1)
    input_ids = torch.randint(0, V, (2, 7), device=DEVICE)
    attention_mask = torch.ones_like(input_ids)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to="none", save_strategy="no",
                                          use_cpu=DEVICE.type == "cpu", dataloader_pin_memory=False)
    ds = [{"input_ids": row, "attention_mask": mask, "labels": row} for row, mask in zip(input_ids, attention_mask)]
    return dict(student=student, teacher=teacher, input_ids=input_ids, labels=input_ids.clone(),
                attention_mask=attention_mask, args=args, ds=ds)


def _topk():
    teacher_logits = _logits(6, V)
    logp, idx = torch.log_softmax(teacher_logits, -1).topk(16, dim=-1)
    return dict(student_logits=_logits(6, V, grad=True), teacher_logits=teacher_logits, idx=idx, logp=logp,
                labels=_labels(6))


def _aligndistil():
    return dict(student_logits=_logits(6, V, grad=True), dpo_logits=_logits(6, V), reverse_dpo_logits=_logits(6, V),
                labels=_labels(6))


def _tree():
    batch, heads, kv_heads, nodes, dim = 2, 4, 2, 6, 16
    cache_lens = torch.tensor([5, 9], device=DEVICE)
    return dict(q=_logits(batch, heads, nodes, dim), k=_logits(batch, kv_heads, 20, dim),
                v=_logits(batch, kv_heads, 20, dim), cache_lens=cache_lens,
                draft_tokens=torch.randint(0, V, (batch, nodes), device=DEVICE), target_logits=_logits(batch, nodes, V))


def _engine():
    # The target drafts for itself, with large random weights (peaked distributions): drafts are then
    # mostly accepted, greedy and sampled, so the example's 256 tokens take few steps on the CPU. Its
    # config's EOS (id 2) may end a sequence early, as it would end generate's.
    target = _tiny_llama(2, 0, init=1.0)
    batch_ids = torch.randint(0, V, (2, 6), device=DEVICE)
    batch_mask = torch.ones_like(batch_ids)
    batch_mask[1, :4] = 0  # a 2-token prompt, left padded as a tokenizer pads for generation
    return dict(target=target, draft=target, input_ids=torch.randint(0, V, (1, 5), device=DEVICE),
                g=torch.Generator(DEVICE).manual_seed(0), batch_ids=batch_ids, batch_mask=batch_mask,
                tokenizer=word_tokenizer(V), text="t5 t9 t30")


def _trl(tmp_path):
    pytest.importorskip("trl")
    import datasets

    from tests.test_integrations_trl import gkd_config_class, tiny_tokenizer

    student, teacher = _tiny_llama(1, 0).train(), _tiny_llama(2, 1)
    gkd_config = gkd_config_class()(output_dir=str(tmp_path), max_steps=1, report_to="none", save_strategy="no",
                                    use_cpu=DEVICE.type == "cpu", dataloader_pin_memory=False)
    ds = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "t5 t6"},
                                                   {"role": "assistant", "content": "t7"}]}])
    return dict(student=student, teacher=teacher, student_logits=_logits(2, 4, V, grad=True),
                teacher_logits=_logits(2, 4, V), labels=_labels(8).view(2, 4), gkd_config=gkd_config, ds=ds,
                tokenizer=tiny_tokenizer(V))


def _check_trl(ns, given):
    from distill_ops.integrations.trl import _gkd_base

    _loss_ok(ns)
    expected = _gkd_base().generalized_jsd_loss(given["student_logits"].detach().double(),
                                                given["teacher_logits"].double(), given["labels"], beta=0.5)
    assert abs(ns["loss"].item() - expected.item()) < 1e-5
    assert isinstance(ns["trainer"], _gkd_base()) and ns["trainer"].teacher_model is given["teacher"]


def _trl_distillation(tmp_path):
    pytest.importorskip("trl")
    from trl import DistillationConfig

    from tests.test_integrations_trl import _prompt_dataset, tiny_tokenizer

    student, teacher = _tiny_llama(1, 0).train(), _tiny_llama(2, 1)
    config = DistillationConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to="none",
                                save_strategy="no", use_cpu=DEVICE.type == "cpu", dataloader_pin_memory=False,
                                max_completion_length=3, logging_steps=1)
    return dict(student=student, teacher=teacher, distillation_config=config, prompts=_prompt_dataset(),
                tokenizer=tiny_tokenizer(V))


def _check_trl_distillation(ns, given):
    from trl import DistillationTrainer

    trainer = ns["trainer"]
    assert isinstance(trainer, DistillationTrainer) and trainer.teacher_model is given["teacher"]
    trainer.train()  # one on-policy step: generation, the fused loss, the entropy metric
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 1 and logged[0]["entropy"] > 0 and logged[0]["loss"] == logged[0]["loss"]


def _loss_ok(ns, name="loss"):
    loss = ns[name]
    assert loss.dim() == 0 and torch.isfinite(loss), name


def _check_kl_div(ns, given):
    _loss_ok(ns)
    assert given["student_logits"].grad is not None and torch.isfinite(given["student_logits"].grad).all()


def _check_fused_linear(ns, given):
    _loss_ok(ns)
    assert given["student_hidden"].grad is not None and given["student"].lm_head.weight.grad is not None


def _check_hf_trainer(ns, given):
    _loss_ok(ns)
    assert ns["trainer"].teacher_model is given["teacher"] and ns["trainer"].distill_kwargs["divergence"] == "jsd"


def _check_topk(ns, given):
    _loss_ok(ns)
    assert sum(p.numel() for p in ns["dackl"].parameters()) > 0


def _check_aligndistil(ns, given):
    _loss_ok(ns)
    assert ns["alpha"].shape == (6,) and given["student_logits"].grad is not None


def _check_tree(ns, given):
    assert ns["out"].shape == given["q"].shape and torch.isfinite(ns["out"]).all()
    assert ns["tree"].num_nodes == 6
    expected_lens = given["cache_lens"] + ns["res"].accept_len + 1
    assert torch.equal(ns["cache_lens"], expected_lens.to(ns["cache_lens"].dtype))


def _check_engine(ns, given):
    out, prompt = ns["out"], given["input_ids"]  # the sampled run (the block's last generate)
    new_tokens = out.sequences.shape[1] - prompt.shape[1]
    assert 1 <= new_tokens <= 256 and torch.equal(out.sequences[:, : prompt.shape[1]], prompt)
    ended_early = new_tokens < 256
    assert not ended_early or int(out.sequences[0, -1]) == given["target"].config.eos_token_id
    assert len(out.accept_lengths) == out.num_target_forwards - 1  # the prefill verifies nothing
    assert new_tokens <= sum(int(n) + 1 for n in out.accept_lengths) + 1
    target = given["target"]
    no_repeats = dict(no_repeat_ngram_size=2, bad_words_ids=[[7, 8]])
    for name, extra in (("penalized", dict(repetition_penalty=1.1)), ("streamed", {}), ("no_repeats", no_repeats)):
        expected = target.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=32,
                                   pad_token_id=0, **extra)
        assert torch.equal(ns[name].sequences, expected), name
    batch, ids, mask = ns["batch"], given["batch_ids"], given["batch_mask"]
    assert batch.sequences.shape[0] == 2 and torch.equal(batch.sequences[:, :6], ids)
    for row in range(2):  # each sequence as generated alone (greedy)
        alone = ns["engine"].generate(ids[row:row + 1, mask[row].bool()], max_new_tokens=64)
        new = alone.sequences[0, int(mask[row].sum()):]
        assert torch.equal(batch.sequences[row, 6: 6 + new.shape[0]], new)
    hf_like = ns["hf_like"].sequences  # sampled, from the tokenized text
    assert hf_like.shape[0] == 1 and 4 <= hf_like.shape[1] <= 3 + 64 and hf_like[0, :3].tolist() == [5, 9, 30]


# First import line of each README block -> (prelude, check).
EXAMPLES = {
    "from distill_ops import kl_div, KLDivLoss": (_kl_div, _check_kl_div),
    "from distill_ops import fused_linear_kl_div": (_fused_linear, _check_fused_linear),
    "from distill_ops.integrations.hf import causal_lm_distillation_loss, FusedDistillationTrainer":
        (_hf_trainer, _check_hf_trainer),
    "from distill_ops.integrations.trl import FusedGKDTrainer, generalized_jsd_loss": (_trl, _check_trl),
    "from distill_ops.integrations.trl import FusedDistillationTrainer": (_trl_distillation, _check_trl_distillation),
    "from distill_ops import topk_kl_div, DACKLLoss": (_topk, _check_topk),
    "from distill_ops import aligndistil_kl": (_aligndistil, _check_aligndistil),
    "from distill_ops import build_tree, tree_from_paths, tree_attention, verify_sampling, compact_kv_cache":
        (_tree, _check_tree),
    "from distill_ops import SpeculativeDecoder": (_engine, _check_engine),
}


def _key(block: str) -> str:
    return next(line for line in block.splitlines() if line.startswith("from distill_ops"))


def test_every_readme_example_is_checked():
    keys = [_key(block) for block in readme_blocks()]
    assert len(keys) == len(set(keys)), "two README examples start with the same import"
    assert sorted(keys) == sorted(EXAMPLES), "README examples and tests/test_readme.py disagree"


@pytest.mark.parametrize("block", readme_blocks(), ids=lambda block: _key(block).split(" import ")[1][:40])
def test_readme_example_runs(block, tmp_path):
    prelude, check = EXAMPLES[_key(block)]
    torch.manual_seed(0)
    given = prelude(tmp_path) if prelude in (_hf_trainer, _trl, _trl_distillation) else prelude()
    namespace = dict(given)
    exec(compile(block.replace('"cuda"', repr(DEVICE.type)), str(README), "exec"), namespace)
    check(namespace, given)
