"""Benchmark cases for tree attention and tree verification (timed by the shared harness).

Each ``make_*_case`` returns ``dict(name=..., fns={label: zero-argument callable}, bytes_moved=int)``;
``bytes_moved`` is the roofline traffic (K and V read once for attention; the logits read once for
verification).
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from distill_ops.tree import build_tree, tree_from_paths
from distill_ops.tree_attention import tree_attention, tree_attention_mask
from distill_ops.verify import verify_greedy, verify_greedy_ref


def _eagle_like_tree(num_nodes: int) -> torch.Tensor:
    """A breadth-first tree of ``num_nodes`` nodes, at most 4 children per node (EAGLE-2 shaped)."""
    paths, frontier = [], [[]]
    while len(paths) < num_nodes - 1:
        grown = []
        for path in frontier:
            for rank in range(4):
                if len(paths) < num_nodes - 1:
                    paths.append(path + [rank])
                    grown.append(path + [rank])
        frontier = grown[: max(1, len(grown) // 2)]
    return tree_from_paths(paths)


def make_tree_attention_case(B, L, T, Hq, Hkv, D, dtype, device) -> dict:
    """Prefix L, tree T, GQA Hq/Hkv, head dim D: ours (Triton, torch) vs SDPA with a dense mask."""
    device = torch.device(device)
    tree = build_tree(_eagle_like_tree(T), device=device)
    kv_len = L + T
    q = torch.randn(B, Hq, T, D, device=device, dtype=dtype)
    k = torch.randn(B, Hkv, kv_len, D, device=device, dtype=dtype)
    v = torch.randn(B, Hkv, kv_len, D, device=device, dtype=dtype)
    cache_lens = torch.full((B,), L, device=device, dtype=torch.int32)
    mask = tree_attention_mask(tree.ancestor_mask, cache_lens, kv_len)[:, None]  # built once, outside the timing
    group = Hq // Hkv

    def sdpa_dense_mask():
        return F.scaled_dot_product_attention(
            q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), attn_mask=mask
        )

    return dict(
        name=f"tree_attention B={B} L={L} T={T} Hq/Hkv={Hq}/{Hkv} D={D} {str(dtype).replace('torch.', '')}",
        fns={
            "ours_triton": lambda: tree_attention(q, k, v, tree, cache_lens, impl="triton"),
            "ours_torch": lambda: tree_attention(q, k, v, tree, cache_lens, impl="torch"),
            "sdpa_dense_mask": sdpa_dense_mask,
        },
        bytes_moved=2 * k.numel() * k.element_size(),
    )


def make_verify_case(B, T, V, device) -> dict:
    """Greedy verification of a T-node tree over V-way bf16 logits: ours (Triton) vs the eager reference."""
    device = torch.device(device)
    tree = build_tree(_eagle_like_tree(T), device=device)
    logits = torch.randn(B, T, V, device=device, dtype=torch.bfloat16)
    rng = random.Random(0)
    tokens = torch.tensor([[rng.randrange(V) for _ in range(T)] for _ in range(B)], device=device)
    return dict(
        name=f"verify_greedy B={B} T={T} V={V} bf16",
        fns={
            "ours_triton": lambda: verify_greedy(tree, tokens, logits, impl="triton"),
            "eager_reference": lambda: verify_greedy_ref(tree, tokens, logits),
        },
        bytes_moved=logits.numel() * logits.element_size(),
    )


def gpu_cases(device) -> list[dict]:
    """The issue's GPU grid: L ∈ {1k, 4k, 16k}, T ∈ {8, 32, 64}, B ∈ {1, 8}, 32/8 heads, D=128, bf16;
    verification at T = 64, V ∈ {32k, 128k}."""
    cases = [
        make_tree_attention_case(B, L, T, 32, 8, 128, torch.bfloat16, device)
        for L in (1024, 4096, 16384) for T in (8, 32, 64) for B in (1, 8)
    ]
    cases += [make_verify_case(B, 64, V, device) for V in (32768, 131072) for B in (1, 8)]
    return cases
