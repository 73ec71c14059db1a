"""tree_attention's PyTorch path (``tree_attention_ref``, fp32) before and after the query heads of each KV head were
stacked: minimum of 30 calls, a binary tree of T nodes after a prefix of L.

    python benchmarks/results/cpu-2026-12-07-fallbacks/tree-attention/measure.py LABEL   (from the repository root)
"""
import importlib.util
import pathlib
import sys

import torch

from distill_ops.tree import build_tree
from distill_ops.tree_attention import tree_attention_ref

_spec = importlib.util.spec_from_file_location(  # its best_ms: a warm-up, then the minimum over the repeats
    "fallback_measure", pathlib.Path(__file__).parents[2] / "cpu-2026-12-06-fallback" / "measure.py"
)
_fallback = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fallback)

torch.manual_seed(0)
print("#", sys.argv[1], "(ms, fp32)")
print("| B | Hq | Hkv | T | L | D | ms |")
print("|---|---|---|---|---|---|---|")
SHAPES = ((1, 4, 2, 26, 1024, 64), (1, 32, 8, 32, 4096, 128), (2, 32, 8, 32, 1024, 128), (4, 8, 8, 32, 1024, 64))
for (B, Hq, Hkv, T, L, D) in SHAPES:
    parents = torch.tensor([-1] + [max(0, (i - 1) // 2) for i in range(1, T)])
    tree = build_tree(parents)
    S = L + T
    q = torch.randn(B, Hq, T, D); k = torch.randn(B, Hkv, S, D); v = torch.randn(B, Hkv, S, D)
    lens = torch.full((B,), L)
    ms = _fallback.best_ms(lambda: tree_attention_ref(q, k, v, tree.ancestor_mask, lens, D ** -0.5), 30)
    print(f"| {B} | {Hq} | {Hkv} | {T} | {L} | {D} | {ms:.3f} |", flush=True)
