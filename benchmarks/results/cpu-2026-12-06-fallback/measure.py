"""kl_div's PyTorch fallback (``impl="torch"``) against the eager formulas on the CPU: forward + backward, fp32,
minimum over repeated runs (the minimum is the least disturbed by other load on a shared machine).

    python benchmarks/results/cpu-2026-12-06-fallback/measure.py LABEL   (from the repository root)
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from benchmarks.bench_kl_div import eager_forward_kl, eager_jsd, make_logits
from distill_ops import kl_div


def eager_reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """mean over rows of KL(q || p), in fp32."""
    log_q = torch.log_softmax(student_logits.float(), dim=-1)
    log_p = torch.log_softmax(teacher_logits.float(), dim=-1)
    return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True)


EAGER = {"forward": eager_forward_kl, "reverse": eager_reverse_kl, "jsd": eager_jsd}


def best_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def main(label: str, cases=(("forward", {}), ("reverse", {}), ("jsd", {"beta": 0.5}))) -> None:
    """One table row per shape and ``(divergence, options)`` case; the eager column is empty where ``EAGER`` has no
    formula for the divergence (its JSD is beta = 0.5)."""
    print(f"# {label}: torch {torch.__version__}, {torch.get_num_threads()} threads; ms, fwd + bwd, min of runs")
    print("| N | V | divergence | ours (impl=torch) | eager |")
    print("|---|---|---|---|---|")
    for rows, vocab, repeats in ((256, 8192, 25), (32, 131072, 25), (1024, 32000, 9)):
        student, teacher = make_logits(rows, vocab, torch.float32, "cpu")
        student.requires_grad_(True)
        for divergence, options in cases:
            def ours():
                kl_div(student, teacher, divergence=divergence, impl="torch", **options).backward()
                student.grad = None

            def eager():
                EAGER[divergence](student, teacher).backward()
                student.grad = None

            eager_ms = f"{best_ms(eager, repeats):.1f}" if divergence in EAGER else ""
            print(f"| {rows} | {vocab} | {divergence} | {best_ms(ours, repeats):.1f} | {eager_ms} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "run")
