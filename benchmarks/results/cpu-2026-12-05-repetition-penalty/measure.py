"""Mean accepted drafts per step with a repetition penalty, drafts ranked with and without the penalty on the
committed tokens (`_PenalizedDrafter`), on the tiny models of tests/test_speculative.py (CPU, greedy; every
output is checked equal to `target.generate(repetition_penalty=...)`).

    python benchmarks/results/cpu-2026-12-05-repetition-penalty/measure.py   (from the repository root)
"""

import contextlib
import sys
from unittest import mock

import torch

sys.path.insert(0, ".")
import distill_ops.speculative as speculative  # noqa: E402
from tests.test_speculative import STATIC_TREE, models, prompts  # noqa: E402

target, draft_lm = models("llama")
trees = {"dynamic": dict(depth=4, topk=4, num_nodes=16), "static": dict(tree=STATIC_TREE)}
print("| draft | tree | penalty | drafts unpenalised | drafts penalised |")
print("|---|---|---|---|---|")
for draft_name, draft in (("draft LM", draft_lm), ("target itself", target)):
    for tree_name, tree in trees.items():
        for penalty in (1.05, 1.3):
            means = []
            for penalised in (False, True):
                unpenalised = mock.patch.object(speculative, "_PenalizedDrafter", lambda drafter, penalize: drafter)
                with contextlib.nullcontext() if penalised else unpenalised:
                    engine = speculative.SpeculativeDecoder(target, draft, impl="torch", **tree)
                    accepted = []
                    for prompt in prompts(256, [1, 3, 5, 9, 12, 4, 7], seed=3):
                        out = engine.generate(prompt, max_new_tokens=48, eos_token_id=[], repetition_penalty=penalty)
                        expected = target.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                                   max_new_tokens=48, pad_token_id=0, repetition_penalty=penalty)
                        assert torch.equal(out.sequences, expected)
                        accepted += out.accept_lengths
                means.append(sum(accepted) / len(accepted))
            print(f"| {draft_name} | {tree_name} | {penalty} | {means[0]:.3f} | {means[1]:.3f} |")
