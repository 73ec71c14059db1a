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
from benchmarks.compile_check import build, collect_specs  # noqa: E402

LDS_BYTES = 65536
SPECS = collect_specs()


def compile_for(job: tuple[int, str]) -> str:
    from triton.backends.compiler import GPUTarget

    index, arch = job
    spec = SPECS[index]
    try:
        shared = build(spec, GPUTarget("hip", arch, 64)).metadata.shared
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
