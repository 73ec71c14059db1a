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


def _harness_case(make, params: dict, labels: list[str], device: str, quick_skip: dict | None = None):
    """Wrap a ``make_*_case`` builder as a harness ``Case`` (inputs built per impl, inside setup)."""
    from benchmarks.harness import Case

    impls = {}
    for label in labels:
        def setup(label=label):
            return make(**params, device=device)["fns"][label]

        impls[label] = setup
    return Case(
        op="tree_attention" if make is make_tree_attention_case else "verify_greedy",
        params={k: (str(v).replace("torch.", "") if isinstance(v, torch.dtype) else v) for k, v in params.items()},
        impls=impls,
        bytes_moved=_bytes_moved(make, params),
        forward_only=True,
        skipped=quick_skip or {},
    )


def _bytes_moved(make, params: dict) -> int:
    if make is make_tree_attention_case:
        element = torch.finfo(params["dtype"]).bits // 8
        return 2 * params["B"] * params["Hkv"] * (params["L"] + params["T"]) * params["D"] * element
    return params["B"] * params["T"] * params["V"] * 2  # bf16 logits read once


def cases(device: str, quick: bool) -> list:
    """Harness entry point: the issue's GPU grid (trimmed to fit the GPU check's time budget) on CUDA,
    small fp32 shapes on CPU (where the Triton kernels run only under the interpreter, in the tests)."""
    attention_labels = ["ours_triton", "ours_torch", "sdpa_dense_mask"]
    verify_labels = ["ours_triton", "eager_reference"]
    if device == "cuda":
        grid = [(4096, 32, 1), (4096, 32, 8), (4096, 64, 8), (1024, 32, 8), (16384, 32, 1), (16384, 64, 8)]
        if quick:
            grid = grid[:2]
        out = [
            _harness_case(
                make_tree_attention_case,
                dict(B=B, L=L, T=T, Hq=32, Hkv=8, D=128, dtype=torch.bfloat16),
                attention_labels,
                device,
            )
            for L, T, B in grid
        ]
        out += [
            _harness_case(make_verify_case, dict(B=B, T=64, V=V), verify_labels, device)
            for V in ((32768,) if quick else (32768, 131072))
            for B in (1, 8)
        ]
        return out
    skip = {"ours_triton": "CPU: Triton kernels run only under the interpreter (covered by the tests)"}
    grid = [(256, 8, 1)] if quick else [(256, 8, 1), (1024, 26, 2)]
    out = [
        _harness_case(
            make_tree_attention_case,
            dict(B=B, L=L, T=T, Hq=4, Hkv=2, D=64, dtype=torch.float32),
            attention_labels[1:],
            device,
            skip,
        )
        for L, T, B in grid
    ]
    out.append(_harness_case(make_verify_case, dict(B=1, T=26, V=4096), verify_labels[1:], device, skip))
    return out
