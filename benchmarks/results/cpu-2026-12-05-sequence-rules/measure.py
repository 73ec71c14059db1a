"""Cost of the token-sequence rules (distill_ops/generation_rules.py) per verification step, against one pass over
the step's target logits (`logits.float()` copy, the cheapest thing a step does to them), on this CPU: each rule's
column is the copy plus the rule (medians of 41 runs).

Random trees of T nodes (EAGLE-like: depth <= 6), B sequences with L committed tokens, vocabulary V:
- ngram: node_tails + ban_repeated_ngrams (no_repeat_ngram_size=3)
- bias: node_tails + TokenSequenceRules.biased with 16 two- and three-token biases and 16 one-token ones
- bad: node_tails + TokenSequenceRules.ban with 16 two- and three-token bad words

    python benchmarks/results/cpu-2026-12-05-sequence-rules/measure.py   (from the repository root)
"""

import statistics
import sys
import time

import torch

sys.path.insert(0, ".")
from distill_ops.generation_rules import TokenSequenceRules, ban_repeated_ngrams, node_tails  # noqa: E402
from distill_ops.tree import build_tree  # noqa: E402


def median_ms(fn, repeats=41):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


torch.manual_seed(0)
torch.set_num_threads(2)
device = torch.device("cpu")
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
print("| B | T | V | L | logits.float() ms | + ngram ms | + bias ms | + bad ms |")
print("|---|---|---|---|---|---|---|---|")
for batch, nodes, vocab, length in ((1, 32, 32000, 512), (1, 32, 32000, 4096), (1, 64, 128256, 4096),
                                    (4, 32, 128256, 2048)):
    parents = [-1] + [int(torch.randint(max(0, i - 6), i, ())) for i in range(1, nodes)]
    tree = build_tree(torch.tensor(parents), device=device)
    tokens = torch.randint(0, vocab, (batch, nodes))
    history = torch.randint(0, vocab, (batch, length))
    tokens[:, 0] = history[:, -1]
    logits = torch.randn(batch, nodes, vocab, dtype=torch.bfloat16)
    biases = [[torch.randint(0, vocab, (m,)).tolist(), 1.5] for m in (1, 2, 3) for _ in range(16)]
    bias_rules = TokenSequenceRules(biases, None, [], vocab, device)
    bad_rules = TokenSequenceRules(None, [ids for ids, _ in biases[16:]], [], vocab, device)

    def tails(width):
        return node_tails(tree, tokens, history[:, -width:], width)

    copy = median_ms(lambda: logits.float())
    ngram = median_ms(lambda: ban_repeated_ngrams(logits.float(), 3, tails(3), history, tree, tokens))
    bias = median_ms(lambda: bias_rules.biased(logits, tails(bias_rules.width)))  # its own fp32 copy included
    bad = median_ms(lambda: bad_rules.ban(logits.float(), tails(bad_rules.width)))
    print(f"| {batch} | {nodes} | {vocab} | {length} | {copy:.2f} | {ngram:.2f} | {bias:.2f} | {bad:.2f} |")
