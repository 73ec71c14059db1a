"""The PyTorch fallbacks (``impl="torch"``) of ``topk_kl_div``, ``aligndistil_kl`` and ``kl_div`` against the eager
formulas of the benchmark suite, on the CPU: forward + backward, fp32, minimum over repeated runs (the minimum is the
least disturbed by other load on a shared machine).

    python benchmarks/results/cpu-2026-12-07-fallbacks/measure.py LABEL [topk,selection,aligndistil,kl_div]
    (from the repository root)
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import torch

from benchmarks import bench_aligndistil, bench_kl_div, bench_topk_kl
from distill_ops import aligndistil_kl, kl_div, topk_kl_div

_spec = importlib.util.spec_from_file_location(  # its best_ms: a warm-up, then the minimum over the repeats
    "fallback_measure", pathlib.Path(__file__).parent.parent / "cpu-2026-12-06-fallback" / "measure.py"
)
_fallback = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fallback)
best_ms = _fallback.best_ms


def full_pass(student: torch.Tensor, loss_fn):
    def run() -> None:
        loss_fn().backward()
        student.grad = None

    return run


def topk_rows() -> None:
    print("| N | V | k | teacher | tail | ours (impl=torch) | eager |")
    print("|---|---|---|---|---|---|---|")
    for rows, vocab, k, repeats in ((256, 32000, 64, 15), (1024, 32000, 64, 5)):
        student, teacher, indices, logprobs = bench_topk_kl.make_inputs(rows, vocab, k, torch.float32, "cpu")
        student.requires_grad_(True)
        for form in ("sparse", "dense"):
            for tail in ("renormalize", "bucket"):
                if form == "sparse":
                    ours = lambda: topk_kl_div(student, teacher_topk_indices=indices, teacher_topk_logprobs=logprobs,
                                               tail=tail, impl="torch")
                    formula = bench_topk_kl.eager_sparse_bucket if tail == "bucket" else bench_topk_kl.eager_sparse
                    eager = lambda: formula(student, indices, logprobs)
                else:
                    ours = lambda: topk_kl_div(student, teacher, k=k, tail=tail, impl="torch")
                    formula = bench_topk_kl.eager_dense_bucket if tail == "bucket" else bench_topk_kl.eager_dense
                    eager = lambda: formula(student, teacher, k)
                ours_ms = best_ms(full_pass(student, ours), repeats)
                eager_ms = best_ms(full_pass(student, eager), repeats)
                print(f"| {rows} | {vocab} | {k} | {form} | {tail} | {ours_ms:.1f} | {eager_ms:.1f} |", flush=True)


def selection_rows() -> None:
    """The dense teacher's selection alone (``dense_candidates``, the PyTorch path on the CPU): fp32 logits (no
    ties across the cut) and the same rounded to bf16 (~1 % of the rows with ties across it at V=32000)."""
    from distill_ops.topk_kl import dense_candidates

    print("| N | V | k | teacher | selection (impl=torch) | torch.topk |")
    print("|---|---|---|---|---|---|")
    for rows, vocab, k, repeats in ((256, 32000, 64, 15), (1024, 32000, 64, 5), (32, 131072, 64, 15)):
        teacher = bench_topk_kl.make_inputs(rows, vocab, k, torch.float32, "cpu")[1]
        for dtype in (torch.float32, torch.bfloat16):
            logits = teacher.to(dtype)
            ours_ms = best_ms(lambda: dense_candidates(logits, k, need_order=False, backend="torch"), repeats)
            topk_ms = best_ms(lambda: logits.topk(k, dim=-1), repeats)
            name = str(dtype).removeprefix("torch.")
            print(f"| {rows} | {vocab} | {k} | {name} | {ours_ms:.1f} | {topk_ms:.1f} |", flush=True)


def aligndistil_rows() -> None:
    print("| N | V | alpha | ours (impl=torch) | eager (official formula) |")
    print("|---|---|---|---|---|")
    for rows, vocab, repeats in ((256, 8192, 15), (32, 131072, 15), (1024, 32000, 5)):
        student, dpo, other = bench_aligndistil.make_logits(rows, vocab, torch.float32, "cpu")
        student.requires_grad_(True)
        options = dict(beta0=bench_aligndistil.BETA0, r=bench_aligndistil.R, eps=bench_aligndistil.EPS)
        ours_ms = best_ms(full_pass(student, lambda: aligndistil_kl(student, dpo, other, impl="torch", **options)),
                          repeats)
        eager_ms = best_ms(full_pass(student, lambda: bench_aligndistil.eager_aligndistil(student, dpo, other)),
                           repeats)
        print(f"| {rows} | {vocab} | adaptive | {ours_ms:.1f} | {eager_ms:.1f} |", flush=True)


def kl_div_rows() -> None:
    """The benchmark suite's logits (std 2, rows spanning ~20) and wide ones (x10: rows spanning ~200, as logits
    at a low temperature or with masked columns), where exp's arguments leave its fast range."""
    print("| N | V | logits | divergence | ours (impl=torch) | eager |")
    print("|---|---|---|---|---|---|")
    eager = _fallback.EAGER
    for rows, vocab, repeats in ((256, 8192, 25), (32, 131072, 25), (1024, 32000, 9)):
        for spread in (1.0, 10.0):
            if spread != 1.0 and rows == 1024:
                continue
            student, teacher = (t.mul_(spread) for t in bench_kl_div.make_logits(rows, vocab, torch.float32, "cpu"))
            student.requires_grad_(True)
            for divergence in ("forward", "reverse", "jsd"):
                ours_ms = best_ms(full_pass(student, lambda: kl_div(student, teacher, divergence=divergence,
                                                                     impl="torch")), repeats)
                eager_ms = best_ms(full_pass(student, lambda: eager[divergence](student, teacher)), repeats)
                label = "std 2" if spread == 1.0 else "std 20"
                print(f"| {rows} | {vocab} | {label} | {divergence} | {ours_ms:.1f} | {eager_ms:.1f} |", flush=True)


if __name__ == "__main__":
    label = sys.argv[1] if len(sys.argv) > 1 else "run"
    parts = sys.argv[2].split(",") if len(sys.argv) > 2 else ["topk", "aligndistil", "kl_div"]
    print(f"# {label}: torch {torch.__version__}, {torch.get_num_threads()} threads; ms, fwd + bwd, min of runs")
    for part in parts:
        print()
        {"topk": topk_rows, "selection": selection_rows, "aligndistil": aligndistil_rows, "kl_div": kl_div_rows}[part]()
