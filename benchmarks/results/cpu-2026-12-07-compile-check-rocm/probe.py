"""Compile every kernel spec of ``benchmarks/compile_check.py`` for AMD GPUs (Triton's HIP backend, on the CPU).

    env -u TRITON_INTERPRET python benchmarks/results/cpu-2026-12-07-compile-check-rocm/probe.py gfx942,gfx90a OUT.txt

One line per (spec, arch): ``ok`` with the shared memory (LDS) bytes Triton reports, ``OVER_LDS`` where that exceeds
the 64 KiB a workgroup gets on gfx90a / gfx942 (the launch would fail), or ``COMPILE_ERROR`` with the innermost
error's message. Only pointers are declared 16-byte aligned (compile_check's generic variant).
"""

import multiprocessing
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
from benchmarks.compile_check import collect_specs  # noqa: E402

LDS_BYTES = 65536
SPECS = collect_specs()


def compile_for(job: tuple[int, str]) -> str:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from distill_ops.kernels._launch import LAUNCH_OPTIONS

    index, arch = job
    spec = SPECS[index]
    fn, constexprs = spec["fn"], dict(spec.get("constexprs", {}))
    signature = {**spec["signature"], **{name: "constexpr" for name in constexprs}}
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name, ty in signature.items() if ty[0] == "*"}
    source = ASTSource(fn, signature={n: signature[n] for n in fn.arg_names}, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": spec.get("num_warps", 4), "num_stages": spec.get("num_stages", 3), **LAUNCH_OPTIONS}
    try:
        shared = triton.compile(source, target=GPUTarget("hip", arch, 64), options=options).metadata.shared
    except Exception as error:  # the innermost cause names what the backend refused
        while error.__cause__ is not None or error.__context__ is not None:
            error = error.__cause__ or error.__context__
        return f"{spec['name']} {arch} COMPILE_ERROR - {str(error).splitlines()[-1]}"
    return f"{spec['name']} {arch} {'ok' if shared <= LDS_BYTES else 'OVER_LDS'} {shared} -"


if __name__ == "__main__":
    archs, out = sys.argv[1].split(","), sys.argv[2]
    with multiprocessing.get_context("fork").Pool(os.cpu_count()) as pool:
        lines = pool.map(compile_for, [(index, arch) for index in range(len(SPECS)) for arch in archs])
    with open(out, "w") as f:
        f.write("kernel arch status shared_bytes error\n" + "\n".join(lines) + "\n")
    print(f"{len(lines)} compilations: {sum(' ok ' in line for line in lines)} ok, "
          f"{sum('OVER_LDS' in line for line in lines)} over the LDS, {sum('COMPILE_ERROR' in line for line in lines)} "
          "compile errors")
