"""``fused_linear_kl_div``'s PyTorch path (``impl="torch"``) with its forward's second sweep multiplying again (as
before 2026-12-07: ``TORCH_FORWARD_CACHE_ELEMENTS = 0``) and reading the first sweep's kept logits (the default),
against the benchmark suite's eager formula (logits materialised), on the CPU: forward alone and forward + backward
(gradients to the student's hidden states and weight), fp32. The three variants run in turn, repeat after repeat,
and each keeps its minimum (this shared machine's load moves single runs by up to 2x).

    python benchmarks/results/cpu-2026-12-07-fused-linear-fallback/measure.py   (from the repository root)

On a commit before ``TORCH_FORWARD_CACHE_ELEMENTS`` both of our columns run its one path (two sweeps).
"""
import time

import torch

from benchmarks import bench_fused_linear
from distill_ops import fused_linear as fused_linear_module
from distill_ops import fused_linear_kl_div

SHAPES = ((256, 128, 8192, 15), (512, 256, 16384, 7), (1024, 256, 32768, 4), (256, 256, 131072, 4),
          (256, 256, 262144, 3))
KEPT = getattr(fused_linear_module, "TORCH_FORWARD_CACHE_ELEMENTS", None)  # None: a commit before the setting


def interleaved_min_ms(fns: dict, repeats: int) -> dict:
    best = {name: float("inf") for name in fns}
    for name, fn in fns.items():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: seconds * 1e3 for name, seconds in best.items()}


def with_cache(elements: int, fn):
    if KEPT is None:  # both columns run the one path there is
        return fn

    def run() -> None:
        fused_linear_module.TORCH_FORWARD_CACHE_ELEMENTS = elements
        try:
            fn()
        finally:
            fused_linear_module.TORCH_FORWARD_CACHE_ELEMENTS = KEPT
    return run


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms, min of interleaved runs")
    print("| N | H | V | divergence | fwd, two sweeps | fwd, kept | fwd + bwd, two sweeps | fwd + bwd, kept "
          "| eager fwd + bwd |")
    print("|---|---|---|---|---|---|---|---|---|")
    for rows, hidden, vocab, repeats in SHAPES:
        s_hidden, s_weight, t_hidden, t_weight = bench_fused_linear.make_inputs(rows, hidden, vocab, torch.float32,
                                                                               "cpu")
        s_hidden.requires_grad_(True)
        s_weight.requires_grad_(True)

        def full(loss_fn):
            def run() -> None:
                loss_fn().backward()
                s_hidden.grad = s_weight.grad = None
            return run

        for divergence in ("forward", "jsd"):
            ours = lambda: fused_linear_kl_div(s_hidden, s_weight, t_hidden, t_weight, divergence=divergence,
                                               impl="torch")
            fns = {
                "fwd_old": with_cache(0, ours), "fwd_new": with_cache(KEPT, ours),
                "full_old": with_cache(0, full(ours)), "full_new": with_cache(KEPT, full(ours)),
            }
            if divergence == "jsd":  # the eager formula is the JSD's
                fns["eager"] = full(lambda: bench_fused_linear.eager_loss(s_hidden, s_weight, t_hidden, t_weight))
            ms = interleaved_min_ms(fns, repeats)
            eager = f"{ms['eager']:.1f}" if "eager" in ms else ""
            print(f"| {rows} | {hidden} | {vocab} | {divergence} | {ms['fwd_old']:.1f} | {ms['fwd_new']:.1f} "
                  f"| {ms['full_old']:.1f} | {ms['full_new']:.1f} | {eager} |", flush=True)


if __name__ == "__main__":
    main()
