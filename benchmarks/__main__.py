"""``python -m benchmarks``: run every ``benchmarks/bench_*.py`` case and write results + report.

    python -m benchmarks [--quick] [--only OP] [--out DIR] [--device cpu|cuda] [--budget-s S] [--list]

Default output folder: ``benchmarks/results/<device-slug>-latest/`` (``results.json``, ``report.md``,
``plots.png``). On a machine without CUDA the modules run their small CPU shapes, with or without
``--quick`` (the whole run stays within minutes on two cores); on CUDA they run the GPU shapes.
"""

from __future__ import annotations

import argparse
import sys

import torch

from .harness import CUDA_REP_MS, CUDA_WARMUP_MS, discover, run_benchmarks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smallest shapes only (seconds on CPU)")
    parser.add_argument("--only", default=None, help="only ops whose name starts with OP (and module bench_OP)")
    parser.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device>-latest)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="stop measuring after this many seconds, recording the rest as skipped "
        "(default: none on CUDA, 450 on CPU; 'inf' for no limit)",
    )
    parser.add_argument("--warmup-ms", type=float, default=CUDA_WARMUP_MS, help="do_bench warm-up (CUDA)")
    parser.add_argument("--rep-ms", type=float, default=CUDA_REP_MS, help="do_bench measurement time (CUDA)")
    parser.add_argument("--list", action="store_true", help="list the cases and impls, run nothing")
    args = parser.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.list:
        cases, broken = discover(device, args.quick, args.only)
        for case in cases:
            print(f"{case.label()}: {', '.join(case.impls)}" + (f" | skipped: {', '.join(case.skipped)}" if case.skipped else ""))
        for item in broken:
            print(f"could not load {item['source']}: {item['reason']}")
        return 0
    document = run_benchmarks(
        args.out,
        quick=args.quick,
        only=args.only,
        device=device,
        budget_s=args.budget_s,
        warmup_ms=args.warmup_ms,
        rep_ms=args.rep_ms,
    )
    return 0 if document["meta"]["complete"] else 130


if __name__ == "__main__":
    sys.exit(main())
