"""Distil a tiny random teacher into a smaller student with the fused losses, four ways.

    python examples/distill_causal_lm.py              # about 10 s on a CPU (one thread)
    python examples/distill_causal_lm.py --steps 10   # seconds

1. A plain PyTorch loop with ``causal_lm_distillation_loss`` (JSD between the two models from their last hidden
   states and LM heads: neither model produces ``[batch, length, vocabulary]`` logits).
2. ``transformers.Trainer``: ``FusedDistillationTrainer`` (the same loss as its ``compute_loss``).
3. TRL's GKD: ``FusedGKDTrainer``, on-policy half of the time (the student samples completions of the prompts,
   the teacher scores them), when ``trl`` is installed.
4. TRL's on-policy ``DistillationTrainer``: ``integrations.trl.FusedDistillationTrainer`` (every step the student
   completes the prompts; it also logs the student's entropy, computed in the loss's pass), when ``trl`` is
   installed.

The data are sequences sampled from the teacher itself. Each run starts from the same student; the held-out
score is the forward KL(teacher || student) per token, computed from both models' own logits by ``kl_div`` (a
check independent of the fused path), before and after training.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import tempfile

import torch

from distill_ops import kl_div
from distill_ops.integrations.hf import causal_lm_distillation_loss


def build_model(vocab_size: int, hidden_size: int, num_layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, initializer_range=0.05,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float()
    with torch.no_grad():  # embeddings large next to the layers' updates: a teacher with a learnable structure
        model.get_input_embeddings().weight.mul_(20.0)
    return model


def sample_sequences(teacher, count: int, length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, teacher.config.vocab_size, (count, 2), generator=generator)
    torch.manual_seed(seed)
    with torch.no_grad():
        return teacher.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                                max_new_tokens=length - 2, min_new_tokens=length - 2, pad_token_id=0)


def held_out_kl(student, teacher, sequences: torch.Tensor) -> float:
    """Mean forward KL(teacher || student) per next-token position, from the models' own logits."""
    with torch.no_grad():
        student_logits = student(sequences).logits[:, :-1]
        teacher_logits = teacher(sequences).logits[:, :-1]
        return float(kl_div(student_logits, teacher_logits, divergence="forward", impl="torch"))


def train_plain(student, teacher, sequences, steps: int, batch_size: int, lr: float) -> list[float]:
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        batch = sequences[(step * batch_size) % len(sequences):][:batch_size]
        loss = causal_lm_distillation_loss(student, teacher, batch, divergence="jsd", beta=0.5)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _training_args(cls, output_dir: str, steps: int, batch_size: int, lr: float, **extra):
    return cls(output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr,
               lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, report_to="none", save_strategy="no",
               use_cpu=True, dataloader_pin_memory=False, seed=0, **extra)


def _logged_losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def train_trainer(student, teacher, sequences, steps: int, batch_size: int, lr: float) -> list[float]:
    from transformers import TrainingArguments

    from distill_ops.integrations.hf import FusedDistillationTrainer

    rows = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in sequences]
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = FusedDistillationTrainer(
            model=student, teacher_model=teacher, train_dataset=rows,
            args=_training_args(TrainingArguments, output_dir, steps, batch_size, lr),
            distill_kwargs={"divergence": "jsd", "beta": 0.5},
        )
        trainer.train()
    return _logged_losses(trainer)


def word_level_tokenizer(vocab_size: int):
    """A tokenizer over the tiny vocabulary (``t0 t1 ...``), built in memory: TRL's trainers need one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t2"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="t0", eos_token="t1", unk_token="t2")


def train_gkd(student, teacher, sequences, steps: int, batch_size: int, lr: float, prompt_length: int) -> list[float]:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import datasets

    from distill_ops.integrations.trl import FusedGKDTrainer

    try:
        from trl.experimental.gkd import GKDConfig
    except ImportError:
        from trl import GKDConfig
    labels = sequences.clone()
    labels[:, :prompt_length] = -100  # the prompt is not scored
    data = datasets.Dataset.from_dict({
        "input_ids": sequences.tolist(), "attention_mask": torch.ones_like(sequences).tolist(),
        "labels": labels.tolist(), "prompts": sequences[:, :prompt_length].tolist(),
        "prompt_attention_mask": torch.ones_like(sequences[:, :prompt_length]).tolist(),
    })

    def collate(examples):
        return {key: torch.tensor([example[key] for example in examples]) for key in examples[0]}

    with tempfile.TemporaryDirectory() as output_dir:
        args = _training_args(GKDConfig, output_dir, steps, batch_size, lr, lmbda=0.5, beta=0.5, temperature=1.0,
                              max_new_tokens=sequences.shape[1] - prompt_length, bf16=False,
                              gradient_checkpointing=False)
        trainer = FusedGKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                  data_collator=collate, processing_class=word_level_tokenizer(student.config.vocab_size))
        trainer.train()
    return _logged_losses(trainer)


def train_trl_distillation(student, teacher, sequences, steps: int, batch_size: int, lr: float,
                           prompt_length: int) -> list[float]:
    import datasets
    from trl import DistillationConfig

    from distill_ops.integrations.trl import FusedDistillationTrainer

    prompts = [" ".join(f"t{token}" for token in row) for row in sequences[:, :prompt_length].tolist()]
    with tempfile.TemporaryDirectory() as output_dir:
        args = _training_args(DistillationConfig, output_dir, steps, batch_size, lr, beta=0.5, temperature=1.0,
                              max_completion_length=sequences.shape[1] - prompt_length, bf16=False,
                              gradient_checkpointing=False)
        trainer = FusedDistillationTrainer(model=student, teacher_model=teacher, args=args,
                                           train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
                                           processing_class=word_level_tokenizer(student.config.vocab_size))
        trainer.train()
    entropy = [entry["entropy"] for entry in trainer.state.log_history if "entropy" in entry]
    print(f"trl_distillation: logged student entropy {entropy[0]:.3f} -> {entropy[-1]:.3f} nats per token")
    return _logged_losses(trainer)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab-size", type=int, default=256)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--sequences", type=int, default=96)
    parser.add_argument("--seq-len", type=int, default=24)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args(argv)

    teacher = build_model(args.vocab_size, 2 * args.hidden_size, 2, seed=0).eval()
    initial = build_model(args.vocab_size, args.hidden_size, 1, seed=1)
    sequences = sample_sequences(teacher, args.sequences + 16, args.seq_len, seed=2)
    train, held_out = sequences[16:], sequences[:16]
    report = {"held_out_kl_before": held_out_kl(initial, teacher, held_out)}
    print(f"held-out KL(teacher || student) per token before training: {report['held_out_kl_before']:.4f}")
    runs = {
        "plain_pytorch": lambda student: train_plain(student, teacher, train, args.steps, args.batch_size, args.lr),
        "hf_trainer": lambda student: train_trainer(student, teacher, train, args.steps, args.batch_size, args.lr),
    }
    if importlib.util.find_spec("trl") is not None:
        runs["trl_gkd"] = lambda student: train_gkd(student, teacher, train, args.steps, args.batch_size, args.lr,
                                                    prompt_length=args.seq_len // 3)
        runs["trl_distillation"] = lambda student: train_trl_distillation(
            student, teacher, train, args.steps, args.batch_size, args.lr, prompt_length=args.seq_len // 3)
    else:
        print("trl not installed: the GKD and DistillationTrainer runs are skipped")
    for name, run in runs.items():
        student = copy.deepcopy(initial).train()
        losses = run(student)
        after = held_out_kl(student.eval(), teacher, held_out)
        report[name] = {"loss_first": losses[0], "loss_last": losses[-1], "held_out_kl_after": after}
        print(f"{name}: training JSD {losses[0]:.4f} -> {losses[-1]:.4f}, held-out KL {after:.4f}")
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
