"""The scripts in ``examples/`` run end to end at tiny sizes (each in seconds on a CPU)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_fspad_head_example(capsys):
    report = load_example("train_fspad_head").main([
        "--vocab-size", "256", "--hidden-size", "64", "--steps", "80", "--sequences", "64", "--seq-len", "48",
        "--batch-size", "16", "--eval-prompts", "3", "--max-new-tokens", "24",
    ])
    assert "tokens per target forward" in capsys.readouterr().out
    assert report["greedy_identical_to_generate"]
    assert report["loss_last"] < 0.6 * report["loss_first"]
    # The trained head drafts tokens the target accepts; the untrained one almost never does.
    assert report["trained_dynamic_tokens_per_forward"] > 2.0
    assert report["trained_chain_tokens_per_forward"] > 1.5
    assert report["untrained_dynamic_tokens_per_forward"] < report["trained_chain_tokens_per_forward"]


@pytest.mark.parametrize("chain", [False, True])
def test_speculative_decode_example(capsys, chain):
    report = load_example("speculative_decode").main(
        ["--device", "cpu", "--prompts", "2", "--max-new-tokens", "16", "--impl", "torch", "--num-layers", "2"]
        + (["--chain", "--depth", "3"] if chain else [])
    )
    assert "identical to generate: True" in capsys.readouterr().out
    assert report["greedy_identical"] and report["batch_identical"]
    assert report["target_forwards_per_token"] < 1.0  # the synthetic draft gets tokens accepted
    assert len(report["sampled_tokens"]) == 16
    assert {"draft", "target", "verify", "compaction", "total"} <= set(report["time_split_s"])


def test_distill_causal_lm_example(capsys):
    """The four training loops (plain PyTorch, transformers.Trainer, TRL's GKD and DistillationTrainer when trl is
    installed) each bring the student closer to the teacher on held-out sequences, scored from both models' own
    logits."""
    report = load_example("distill_causal_lm").main(["--steps", "15", "--sequences", "48"])
    runs = ["plain_pytorch", "hf_trainer"] + (["trl_gkd", "trl_distillation"] if importlib.util.find_spec("trl")
                                              else [])
    assert "held-out KL" in capsys.readouterr().out
    for name in runs:
        assert report[name]["loss_last"] < 0.8 * report[name]["loss_first"], name
        assert report[name]["held_out_kl_after"] < 0.8 * report["held_out_kl_before"], name
