"""``topk_kl_div``'s bucket tail with ``impl="torch"`` (dense and sparse teacher, fwd + bwd, fp32, V=32000, k=64,
minimum over repeats) and the dense teacher's normaliser op alone (teacher [N, 32000], T = 1), on the CPU.

    PYTHONPATH=. python benchmarks/results/cpu-2026-12-07-fallbacks/teacher-normaliser/measure.py LABEL

(from the repository root, with MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=8589934592: see the
parent folder's README).
"""

from __future__ import annotations

import sys
import time

import torch

from benchmarks import bench_topk_kl
from distill_ops import topk_kl_div


def best_ms(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main(label: str) -> None:
    parts = []
    for rows, repeats in ((256, 20), (1024, 8)):
        student, teacher, indices, logprobs = bench_topk_kl.make_inputs(rows, 32000, 64, torch.float32, "cpu")
        student.requires_grad_(True)

        def full_pass(loss_fn):
            def run() -> None:
                loss_fn().backward()
                student.grad = None

            return run

        dense = full_pass(lambda: topk_kl_div(student, teacher, k=64, tail="bucket", impl="torch"))
        sparse = full_pass(lambda: topk_kl_div(student, teacher_topk_indices=indices, teacher_topk_logprobs=logprobs,
                                               tail="bucket", impl="torch"))
        normaliser = lambda: torch.ops.distill_ops.topk_kl_teacher_lse(teacher, 1.0, "torch")
        parts.append(f"N={rows}: dense bucket {best_ms(dense, repeats):.1f}  sparse bucket "
                     f"{best_ms(sparse, repeats):.1f}  teacher normaliser {best_ms(normaliser, 2 * repeats):.1f} ms")
    print(label, " | ".join(parts), flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "run")
