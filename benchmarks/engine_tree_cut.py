"""What the speculative engine saves near ``max_new_tokens`` by cutting its trees to what can still be kept.

    python -m benchmarks.engine_tree_cut [--new-tokens 8,16,32] [--prompts 10]

A step that can keep at most r more tokens drafts no deeper than r - 1
(``SpeculativeDecoder._plans_within``). This script decodes greedily with the tiny synthetic CPU pair of
``benchmarks/bench_speculative.py`` (dynamic tree: depth 5, topk 4, 32 nodes; PyTorch paths) twice per
prompt: with the cut, and with full trees at every step (the engine before the cut). It counts the draft
model's level forwards and the target's tree rows (tokens of its tree forwards, the prefill excluded) and
checks that both runs produce the same tokens. Counts, not times: the saving in time depends on how the
device prices a shorter forward.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.bench_speculative import CPU_SHAPE, TREE, build_pair
from distill_ops import speculative
from distill_ops.speculative import SpeculativeDecoder


def count(engine: SpeculativeDecoder, prompts: list[torch.Tensor], new_tokens: int, cut: bool) -> dict:
    """Draft levels, target tree rows, steps and the sequences of greedy decoding of ``prompts``."""
    counts = dict(levels=0, rows=0, steps=0)
    expand, target_forward = engine._drafter.expand, speculative._Generation._target_forward

    def counted_expand(*args, **kwargs):
        counts["levels"] += 1
        return expand(*args, **kwargs)

    def counted_forward(self, tokens, positions, context, **extra):
        if context.tree is not None:  # the tree forwards (the prefill has none)
            counts["rows"] += tokens.numel()
        return target_forward(self, tokens, positions, context, **extra)

    engine._drafter.expand = counted_expand
    speculative._Generation._target_forward = counted_forward
    engine._cut_trees = cut
    try:
        sequences = []
        for prompt in prompts:
            out = engine.generate(prompt, max_new_tokens=new_tokens, eos_token_id=[])
            counts["steps"] += len(out.accept_lengths)
            sequences.append(out.sequences)
    finally:
        del engine._drafter.expand
        speculative._Generation._target_forward = target_forward
        engine._cut_trees = True
    return dict(counts, sequences=sequences)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", default="8,16,32", help="comma-separated max_new_tokens values")
    parser.add_argument("--prompts", type=int, default=10, help="random prompts of 16 tokens per value")
    args = parser.parse_args(argv)
    target, draft = build_pair(CPU_SHAPE, "cpu", torch.float32)
    engine = SpeculativeDecoder(target, draft, impl="torch", **TREE)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, CPU_SHAPE["vocab"], (1, 16), generator=generator) for _ in range(args.prompts)]
    rows = []
    for new_tokens in (int(value) for value in args.new_tokens.split(",")):
        full, cut = (count(engine, prompts, new_tokens, cut) for cut in (False, True))
        if not all(torch.equal(a, b) for a, b in zip(full["sequences"], cut["sequences"])):
            raise AssertionError(f"max_new_tokens={new_tokens}: the cut changed the output")
        row = dict(new_tokens=new_tokens, **{f"{key}_{name}": run[key] for name, run in (("full", full), ("cut", cut))
                                             for key in ("steps", "levels", "rows")})
        rows.append(row)
        print(f"max_new_tokens={new_tokens:4d}: steps {full['steps']} / {cut['steps']}, draft levels "
              f"{full['levels']} -> {cut['levels']}, target tree rows {full['rows']} -> {cut['rows']} "
              f"({args.prompts} prompts; full -> cut)")
    return rows


if __name__ == "__main__":
    main()
