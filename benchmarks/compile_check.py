"""Static kernel check: ahead-of-time compile every Triton kernel of the package for GPU targets.

Runs on a machine without a GPU (Triton bundles ``ptxas`` and ``cuobjdump``). For each launch configuration a kernel
module declares in ``aot_specs()``, each target (``sm_90a``, ``sm_80``) and each specialisation it compiles to a cubin,
reads registers / spills from the cubin with ``cuobjdump`` and shared memory from Triton's metadata, prints a table,
optionally writes JSON, and exits non-zero on a compile failure or any spill.

    python -m benchmarks.compile_check [--json PATH] [--targets 90a,80] [--only NAME_SUBSTRING]

``--targets`` also takes ``100a`` (Blackwell), ``89`` and ``120`` (not in the default, see ``TARGETS``).

Specialisations: at run time Triton's JIT specialises every integer argument whose value is a multiple of 16
(``tt.divisibility = 16``), which is the case of every stride and size at production shapes (H = 4096,
V = 131072, ...). That variant is the one that runs where performance matters, and it is a different program:
the compiler knows rows are 16-byte aligned, vectorises loads and software-pipelines ``tl.dot`` loops with
asynchronous copies (more shared memory, different register pressure). So each spec is compiled twice: *generic*
(only pointers aligned, as for odd sizes) and *aligned* (every integer argument a multiple of 16 as well).

Must run without ``TRITON_INTERPRET=1`` (the interpreter replaces ``@triton.jit`` functions).
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import traceback

# 100a (Blackwell) is compiled on request only (--targets 100a): we have no Blackwell GPU to measure on, and the
# check found 8-24-byte stack frames in 10 (Triton 3.6) / 15 (3.9) of its 1182 builds that sm_80 / sm_90a build
# without (benchmarks/results/cpu-2026-12-07-compile-check-more-targets/). 89 (Ada: L4, L40S) and 120 (consumer
# Blackwell) too, on request: they give a block 99 KiB of shared memory where sm_80 gives 163 KiB and sm_90a 227 KiB.
TARGETS = {"90a": 90, "80": 80, "100a": 100, "89": 89, "120": 120}


def _tool_path(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _cubin_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, spill bytes) of the cubin Triton built, read with the bundled ``cuobjdump``.

    Spilled registers live in the thread's local stack frame, so the frame size (STACK + LOCAL) is
    reported as spill bytes; our kernels make no calls that would need a frame otherwise.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([_tool_path("cuobjdump"), "-res-usage", path], capture_output=True, text=True, check=True)
    text = out.stdout + out.stderr
    regs = re.search(r"REG:(\d+)", text)
    stack = re.search(r"STACK:(\d+)", text)
    local = re.search(r"LOCAL:(\d+)", text)
    spills = (int(stack.group(1)) if stack else 0) + (int(local.group(1)) if local else 0)
    return (int(regs.group(1)) if regs else -1), spills


def collect_specs(only: str | None = None, modules: list[str] | None = None) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("compile_check must run without TRITON_INTERPRET=1")
    if modules is None:
        from distill_ops.kernels import KERNEL_MODULES

        modules = [f"distill_ops.kernels.{name}" for name in KERNEL_MODULES]
    specs = []
    for module_name in modules:
        module = importlib.import_module(module_name)
        for spec in module.aot_specs():
            if only is None or only in spec["name"]:
                specs.append(spec)
    return specs


VARIANTS = ("generic", "aligned")


def build(spec: dict, target, variant: str = "generic"):
    """Compile one spec for a ``triton.backends.compiler.GPUTarget`` as its launcher runs it; the compiled kernel."""
    import triton
    from triton.compiler import ASTSource

    from distill_ops.kernels._launch import LAUNCH_OPTIONS

    fn = spec["fn"]
    signature = dict(spec["signature"])
    constexprs = dict(spec.get("constexprs", {}))
    for name in constexprs:
        signature[name] = "constexpr"
    # Declare what the launchers guarantee at run time: 16-byte aligned pointers; for the aligned variant also
    # what the JIT infers from integer values that are multiples of 16 (see the module docstring).
    # A spec's ``unaligned`` names integer arguments its launcher never assumes divisible (e.g. a row count used
    # only in masks), ``variants`` restricts the specialisations it runs in (a config the launcher picks only
    # for aligned arguments).
    aligned = variant == "aligned"
    unaligned = set(spec.get("unaligned", ()))
    attrs = {
        (fn.arg_names.index(name),): [["tt.divisibility", 16]]
        for name, ty in signature.items()
        if ty.startswith("*") or (aligned and re.fullmatch(r"[iu]\d+", ty) and name not in unaligned)
    }
    source = ASTSource(fn, signature={n: signature[n] for n in fn.arg_names}, constexprs=constexprs, attrs=attrs)
    # The launchers' explicit options too (kernels/_launch.py), so the check builds what runs on every Triton.
    options = {"num_warps": spec.get("num_warps", 4), "num_stages": spec.get("num_stages", 3), **LAUNCH_OPTIONS}
    return triton.compile(source, target=target, options=options)


def compile_spec(spec: dict, arch: str, variant: str = "generic") -> dict:
    from triton.backends.compiler import GPUTarget

    compiled = build(spec, GPUTarget("cuda", TARGETS[arch], 32), variant)
    regs, spills = _cubin_usage(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    return {
        "kernel": spec["name"],
        "target": f"sm_{arch}",
        "variant": variant,
        "registers": regs,
        "shared_bytes": int(getattr(compiled.metadata, "shared", 0)),
        "spill_bytes": spills,
        "num_warps": compiled.metadata.num_warps,
        "num_stages": compiled.metadata.num_stages,
        "ok": spills == 0,
        "error": None,
        # Tensor-core instructions in the PTX (JSON only): Hopper's asynchronous wgmma, Blackwell's tcgen05.mma, or
        # Ampere-style mma.sync.
        "wgmma": ptx.count("wgmma.mma_async"),
        "tcgen05": ptx.count("tcgen05.mma"),
        "mma_sync": ptx.count("mma.sync"),
    }


_SPECS: list[dict] = []


def _compile_job(job: tuple[int, str, str]) -> dict:
    index, arch, variant = job
    spec = _SPECS[index]
    try:
        return compile_spec(spec, arch, variant)
    except Exception as exc:  # a compile failure is a reported result, not a crash
        traceback.print_exc(file=sys.stderr)
        return {
            "kernel": spec["name"],
            "target": f"sm_{arch}",
            "variant": variant,
            "registers": -1,
            "shared_bytes": -1,
            "spill_bytes": -1,
            "ok": False,
            "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300],
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", dest="json_path", default=None)
    parser.add_argument("--targets", default="90a,80")
    parser.add_argument("--only", default=None, help="compile only specs whose name contains this")
    parser.add_argument(
        "--modules", default=None, help="comma-separated modules to check instead of the package's kernels"
    )
    parser.add_argument("--jobs", type=int, default=None, help="parallel compilations (default: all cores)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="specialisations to compile (generic,aligned)")
    args = parser.parse_args(argv)

    import triton

    modules = args.modules.split(",") if args.modules else None
    global _SPECS
    _SPECS = collect_specs(args.only, modules)
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    jobs = [(index, arch, variant) for index in range(len(_SPECS)) for arch in args.targets.split(",")
            for variant in variants if variant in _SPECS[index].get("variants", VARIANTS)]
    # Compilation is CPU-bound and independent per (kernel, target): use every core. Forked workers
    # inherit the collected specs (the jitted functions themselves do not pickle).
    workers = max(1, min(args.jobs or (os.cpu_count() or 1), len(jobs)))
    if workers == 1:
        rows = [_compile_job(job) for job in jobs]
    else:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            rows = pool.map(_compile_job, jobs, chunksize=1)
    header = f"{'kernel':58s} {'target':8s} {'variant':8s} {'regs':>5s} {'smem':>8s} {'spill':>6s}  status"
    print(f"triton {triton.__version__}: {len(rows)} compilations")
    print(header)
    print("-" * len(header))
    for row in rows:
        status = "ok" if row["ok"] else (row["error"] or "SPILLS")
        print(
            f"{row['kernel']:58s} {row['target']:8s} {row['variant']:8s} {row['registers']:5d} {row['shared_bytes']:8d} "
            f"{row['spill_bytes']:6d}  {status}"
        )
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"triton": triton.__version__, "results": rows}, f, indent=2)
    failed = [r for r in rows if not r["ok"]]
    if not rows:
        print("no kernels found", file=sys.stderr)
        return 1
    if failed:
        print(f"{len(failed)} of {len(rows)} compilations failed or spilled", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
