"""verify_sampling's PyTorch path (impl="torch") on a binary draft tree of T nodes, B = 1, target logits of std 3
over V = 128256, temperature 0.8 with and without top-k = 50: minimum of 30 calls.

    python benchmarks/results/cpu-2026-12-07-fallbacks/verify-sampling/measure.py LABEL   (from the repository root)
"""

import sys

import torch

from distill_ops import verify_sampling
from distill_ops.tree import build_tree

import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location(  # its best_ms: a warm-up, then the minimum over the repeats
    "fallback_measure", pathlib.Path(__file__).parents[2] / "cpu-2026-12-06-fallback" / "measure.py"
)
_fallback = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fallback)


print("#", sys.argv[1] if len(sys.argv) > 1 else "run", "(ms)")
print("| T | V | top_k | ms |")
print("|---|---|---|---|")
generator = torch.Generator().manual_seed(0)
for num_nodes, vocab in ((32, 128256), (64, 32000)):
    tree = build_tree(torch.tensor([-1] + [(i - 1) // 2 for i in range(1, num_nodes)]))
    logits = torch.randn(1, num_nodes, vocab, generator=generator) * 3
    tokens = torch.randint(0, vocab, (1, num_nodes), generator=generator)
    for top_k in (None, 50):
        def call():
            verify_sampling(tree, tokens, logits, temperature=0.8, top_k=top_k,
                            generator=torch.Generator().manual_seed(1), impl="torch")

        print(f"| {num_nodes} | {vocab} | {top_k} | {_fallback.best_ms(call, 30):.2f} |", flush=True)
