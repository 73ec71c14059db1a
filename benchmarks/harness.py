"""The shared benchmark harness: cases, timing, peak memory, raw JSON results.

A benchmark module ``benchmarks/bench_<op>.py`` exposes ``cases(device: str, quick: bool) -> list[Case]``.
On CPU a module returns its small CPU shapes whatever ``quick`` says (``make bench`` on a CPU-only
machine must finish in minutes); ``quick`` shrinks them further. Each :class:`Case` maps an impl name
to a *setup* function: setup allocates the inputs on the device and returns a zero-argument callable
that runs one full pass (forward + backward) and leaves nothing behind (it drops ``.grad``), so
every call does the same work.

What is measured, per case x impl:

* ``forward_ms``: the forward call with autograd enabled, as in training (from ``forward_impls``).
  Our losses compute the student gradient inside that forward call.
* ``full_ms``: forward + backward.
* ``backward_ms = full_ms - forward_ms``. Backward is not timed on its own: our ops consume their
  stored gradient in backward (it is scaled in place), so a graph cannot be re-run backward with
  ``retain_graph=True``, and the difference is the one number every impl can give.
* Timing: ``triton.testing.do_bench`` (median, L2 flushed between calls) on CUDA; the median of a few
  wall-clock runs after one warm-up run on CPU.
* Memory on CUDA (allocator statistics): ``peak_memory_bytes`` = ``torch.cuda.max_memory_allocated``
  during one pass (absolute), ``case_memory_bytes`` = that peak minus the memory held before setup
  (inputs + pass), ``extra_memory_bytes`` = the peak minus the memory held after setup (what the pass
  itself adds: gradients, temporaries, saved activations).
* Memory on CPU: only for cases flagged ``measure_cpu_memory`` (a fresh subprocess per measurement is
  slow): the subprocess builds the case, runs one warm-up pass (first calls page in library code),
  resets the kernel's RSS high-water mark, runs one pass and reports its peak RSS (``VmHWM``; the
  ``resource.getrusage`` maximum where /proc is missing); the same three numbers are derived from RSS
  (the inputs' size is the RSS growth during setup). glibc's mmap threshold is fixed in the
  subprocess so that RSS follows live allocations.

A failing impl (exception, out of memory) is recorded as skipped with the reason; it never stops
the run. A run can have a time budget (``--budget-s``; 450 s by default on CPU so that ``make bench``
ends within 10 minutes on two cores): each benchmark module gets an even share of what is left, a
measurement that outlives its module's share (by more than ``MIN_MEASUREMENT_S``) is stopped, and
what no longer fits is recorded as skipped. Impls that cannot run here at all (Liger not installed, Triton without CUDA) are listed in
``Case.skipped`` with the reason, and appear in the report.
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import json
import os
import platform
import re
import resource
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Callable, Optional

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent

# Peak HBM bandwidth (bytes/s) and dense bf16 tensor-core throughput (FLOP/s), from the vendor data
# sheets, matched against torch.cuda.get_device_name(); first match wins, so the more specific
# names come first. Unknown devices get None and the report shows no roofline fractions.
# Matched by substring in order (the more specific names first).
DEVICE_PEAKS: list[tuple[str, Optional[float], Optional[float]]] = [
    ("GH200", None, None),  # its HBM differs between variants (96 GB HBM3, 144 GB HBM3e): no fraction claimed
    ("H100 PCIe", 2.0e12, 756e12),
    ("H100 NVL", 3.9e12, 835e12),
    ("H100", 3.35e12, 989e12),  # SXM
    ("H200 NVL", 4.8e12, 835e12),
    ("H200", 4.8e12, 989e12),  # SXM
    # A100: 1.555 TB/s for the 40 GB parts, 2.039 (SXM4) / 1.935 (PCIe) for the 80 GB ones; another name claims no
    # fraction (a single 2.0 TB/s for every A100 read the 40 GB parts' fractions 22 % low; a harness review).
    ("A100-SXM4-40GB", 1.555e12, 312e12),
    ("A100-PCIE-40GB", 1.555e12, 312e12),
    ("A100-SXM4-80GB", 2.039e12, 312e12),
    ("A100 80GB PCIe", 1.935e12, 312e12),
    ("A100", None, None),
]

# CUDA timing defaults (milliseconds of warm-up / measurement per do_bench call): modest, because the
# GPU run has a hard time budget; do_bench still runs at least one warm-up and one timed call.
CUDA_WARMUP_MS = 5
CUDA_REP_MS = 20
CUDA_MIN_SAMPLES = 10
CUDA_MAX_REP_MS = 200.0
# CUDA passes at least this long (a warm call) skip do_bench (see time_pass).
CUDA_LONG_PASS_MS = 200.0
# CPU timing: one warm-up run, then as many runs as fit in this many seconds (1 to 7 runs).
CPU_SECONDS_PER_MEASUREMENT = 1.0
CPU_MAX_RUNS = 7
# Without --budget-s, a CPU run stops measuring after this many seconds (the rest is recorded as
# skipped): `make bench` on a 2-core machine must end within 10 minutes whatever the modules ask.
CPU_DEFAULT_BUDGET_S = 450.0
# With a budget, a measurement is stopped when its module's share of the budget runs out, but is
# always allowed this long (so the run ends within budget + this per module).
MIN_MEASUREMENT_S = 20.0
CHILD_TIMEOUT_S = 600
CHILD_MMAP_THRESHOLD = 128 * 1024


@dataclass
class Case:
    """One benchmark configuration of one op, run with every impl.

    Args:
        op: op name (the report groups tables and plots by it).
        params: shape / dtype / option values, JSON-serialisable; the report shows them as columns.
        impls: impl name -> setup function. Setup allocates inputs on the device and returns a
            zero-argument callable running one full pass (forward + backward), leaving no state
            behind (drop ``.grad`` at the end) so that passes are identical.
        bytes_moved: the minimal HBM traffic of a full pass in bytes (achieved GB/s and fraction of
            the device's peak bandwidth are derived from it).
        flops: floating-point operations of a full pass (TFLOP/s and fraction of the bf16 peak).
        forward_impls: impl name -> setup function returning a forward-only callable (same keys
            as ``impls``, or a subset); gives ``forward_ms`` and ``backward_ms``.
        forward_only: the ``impls`` callables are forward passes (e.g. a raw kernel launch in a
            block-size sweep): their time is reported as ``forward_ms`` and rates use it.
        bytes_models: further named traffic models (name -> bytes per pass), each reported as a
            fraction of the HBM peak (e.g. a two-pass streaming kernel's traffic).
        memory_floor_bytes: memory a pass cannot avoid (inputs + gradients); the report gives
            ``case_memory_bytes / memory_floor_bytes``.
        output_bytes: bytes of the pass's outputs (e.g. one gradient); the report gives
            ``extra_memory_bytes / output_bytes``.
        measure_cpu_memory: on CPU, measure peak RSS in a subprocess (slow; a few cases only).
        time_passes: False to measure memory only (e.g. a CPU memory case whose passes take seconds).
        skipped: impl name -> reason, for impls that cannot run here at all.
        notes: one line about the op's cases, printed under the op's heading in the report.
        budget_weight: the module's share of a time-budgeted run is proportional to the largest weight of
            its cases (1 by default; e.g. whole ``generate`` calls that compile kernels on first use need more).
    """

    op: str
    params: dict
    impls: dict[str, Callable[[], Callable[[], object]]]
    bytes_moved: Optional[int] = None
    flops: Optional[int] = None
    forward_impls: Optional[dict[str, Callable[[], Callable[[], object]]]] = None
    forward_only: bool = False
    bytes_models: Optional[dict[str, int]] = None
    memory_floor_bytes: Optional[int] = None
    output_bytes: Optional[int] = None
    measure_cpu_memory: bool = False
    time_passes: bool = True
    skipped: dict[str, str] = field(default_factory=dict)
    notes: str = ""
    budget_weight: float = 1.0
    # Set by discovery: where the case came from, so a subprocess can rebuild it.
    source: Optional[str] = None
    index: Optional[int] = None

    @property
    def wants_cpu_memory(self) -> bool:
        return self.measure_cpu_memory or bool(self.params.get("measure_cpu_memory", False))

    def label(self) -> str:
        shown = " ".join(f"{k}={v}" for k, v in self.params.items() if k != "measure_cpu_memory")
        return f"{self.op} {shown}".strip()


# --------------------------------------------------------------------------------------------------
# Device and environment
# --------------------------------------------------------------------------------------------------


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"CPU {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return f"CPU {platform.processor() or platform.machine()}"


def device_slug(device: str) -> str:
    """Folder-name form of the device: ``cpu`` or e.g. ``nvidia-h100-80gb-hbm3``."""
    if device != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def target_status(value: Optional[float], ok: bool) -> str:
    """A target's verdict in a report: ``not measured`` (no value), ``met`` or ``**missed**``."""
    return "not measured" if value is None else ("met" if ok else "**missed**")


def measured_status(value: Optional[float], fmt: str, ok: Callable[[float], bool]) -> str:
    """The value formatted by ``fmt`` and its verdict (``ok(value)``), or ``not measured``."""
    return target_status(None, False) if value is None else f"{fmt.format(value)} {target_status(value, ok(value))}"


def device_peaks(name: str) -> tuple[Optional[float], Optional[float]]:
    """(peak HBM bytes/s, peak dense bf16 FLOP/s) for a CUDA device name, or (None, None)."""
    for key, bandwidth, flops in DEVICE_PEAKS:
        if key in name:
            return bandwidth, flops
    return None, None


def git_commit() -> dict:
    """Commit of the working tree and whether it has uncommitted changes (env BENCH_GIT_COMMIT if no git)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        ).stdout
        return {"commit": commit, "dirty": bool(status.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": os.environ.get("BENCH_GIT_COMMIT"), "dirty": None}


def environment(device: str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = device_name(device)
    bandwidth, flops = device_peaks(name) if device == "cuda" else (None, None)
    return {
        "device": device,
        "device_name": name,
        "device_slug": device_slug(device),
        "peak_hbm_bytes_per_s": bandwidth,
        "peak_bf16_flops": flops,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        # Other processes' load makes CPU timings unreliable (OpenMP threads wait for descheduled peers).
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "git": git_commit(),
        "utc_time": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
    }


# --------------------------------------------------------------------------------------------------
# Timing and memory
# --------------------------------------------------------------------------------------------------


def _wall_seconds(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def module_share(weights: dict[str, float], left: list[str]) -> float:
    """Fraction of the remaining time budget for ``left[0]``, the module about to run: its weight (the largest
    ``Case.budget_weight`` of its cases) over the weights of every module still to run."""
    return weights[left[0]] / sum(weights[source] for source in left)


def time_pass(fn: Callable[[], object], device: str, warmup_ms: float, rep_ms: float) -> float:
    """Median milliseconds of one call of ``fn``.

    CUDA: ``triton.testing.do_bench``, except for passes longer than ``CUDA_LONG_PASS_MS`` (e.g. a whole
    ``generate``): do_bench calls those at least eight times (five of them only to estimate the time), so they
    are timed like CPU passes instead: a warm-up call, a warm call that decides, then as many synchronised calls
    as fit in ``CPU_SECONDS_PER_MEASUREMENT`` (1 to ``CPU_MAX_RUNS``), the median.
    """
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    first = _wall_seconds(fn, sync)  # warm-up: first-call costs (compilation, allocator growth) are not measured
    if device == "cuda":
        from triton.testing import do_bench

        first = _wall_seconds(fn, sync)  # a warm call decides which way to time
        if first * 1e3 < CUDA_LONG_PASS_MS:
            # do_bench takes rep / (its estimate) samples: at least CUDA_MIN_SAMPLES for passes up to 20 ms
            # (rep 20 ms gave a 5.7 ms pass 3 samples, the median of a verdict 1 % from its threshold).
            rep_ms = max(rep_ms, min(CUDA_MIN_SAMPLES * first * 1e3, CUDA_MAX_REP_MS))
            return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    runs = max(1, min(CPU_MAX_RUNS, int(CPU_SECONDS_PER_MEASUREMENT / max(first, 1e-6))))
    return statistics.median(_wall_seconds(fn, sync) for _ in range(runs)) * 1e3


def _free_device_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def create_library_workspaces(device: str) -> None:
    """cuBLAS allocates a workspace per handle and stream (32 MiB on Hopper) through PyTorch's caching allocator at
    a process's first GEMM, and keeps it: created here, before any case's baseline is read, so that it is not
    counted in the first impl's case memory (the H200 run of 2026-11-28 counted it in ``fused_linear_kl_div``'s
    ours_triton: 160 MiB above inputs + gradients for ~128; a harness review, 2026-12-07)."""
    if device != "cuda":
        return
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        square = torch.ones(64, 64, device=device, dtype=dtype)
        square @ square
    torch.cuda.synchronize()


def cuda_memory_of_pass(fn: Callable[[], object], allocated_before_setup: int) -> dict:
    """Allocator peak of one pass: absolute, above the pre-setup level, above the post-setup level."""
    torch.cuda.synchronize()
    gc.collect()
    held = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {
        "peak_memory_bytes": peak,
        "case_memory_bytes": peak - allocated_before_setup,
        "extra_memory_bytes": peak - held,
        "memory_source": "cuda allocator (max_memory_allocated)",
    }


def _current_rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_rss() -> tuple[int, str]:
    """The process' RSS high-water mark: VmHWM where /proc has it, else ``getrusage``'s ru_maxrss.

    ru_maxrss is not enough on Linux: it also keeps the maximum carried over exec from the forked
    parent (the harness process, often larger than the child), and clear_refs does not reset it.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024, "VmHWM"
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "getrusage ru_maxrss"


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM; Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _child_measure_cpu_memory(source: str, index: int, impl: str, quick: bool) -> dict:
    """Run in a fresh process: build case ``index`` of ``source``, run ``impl``, report peak RSS.

    The first pass pages in library code and one-time buffers (hundreds of MiB of libtorch kernels),
    which are not memory of the pass. Where the kernel lets us reset the RSS high-water mark, a warm-up
    pass runs first and the measured pass starts from the warm state; the inputs' size comes from the
    RSS growth during setup. Otherwise the single pass's peak is reported as is (an overestimate).
    """
    case = load_source(source).cases("cpu", quick)[index]
    gc.collect()
    rss_before_setup = _current_rss()
    fn = case.impls[impl]()
    gc.collect()
    rss_after_setup = _current_rss()
    warm = _reset_peak_rss()
    if warm:
        fn()
        gc.collect()
        rss_warm = _current_rss()
        _reset_peak_rss()
    else:
        rss_warm = rss_after_setup
    fn()
    peak, how = _peak_rss()
    extra = peak - rss_warm
    return {
        "peak_memory_bytes": peak,
        "case_memory_bytes": (rss_after_setup - rss_before_setup) + extra,
        "extra_memory_bytes": extra,
        "memory_source": f"peak RSS of a subprocess ({how}"
        + (", after a warm-up pass, high-water mark reset)" if warm else ", one cold pass: includes code paged in)"),
    }


def cpu_memory_of_pass(case: Case, impl: str, quick: bool) -> dict:
    if case.source is None or case.index is None:
        raise RuntimeError("CPU memory needs a case found by discovery (source and index unknown)")
    command = [
        sys.executable, "-m", "benchmarks.harness", "--child-memory", case.source, str(case.index), impl,
    ] + (["--quick"] if quick else [])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    # A fixed glibc mmap threshold (setting it disables the dynamic one) makes every large buffer its
    # own mapping, returned on free: RSS then follows live allocations instead of what the allocator
    # happened to keep from the warm-up pass (which made repeated measurements differ by 2x).
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(CHILD_MMAP_THRESHOLD))
    out = subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S
    )
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"memory subprocess failed (exit {out.returncode}): {last}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# Running one case x impl
# --------------------------------------------------------------------------------------------------


def _error_reason(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return "failed: " + text[:300]


def empty_result(case: Case, impl: str) -> dict:
    return {
        "op": case.op,
        "params": case.params,
        "impl": impl,
        "forward_only": case.forward_only,
        "forward_ms": None,
        "full_ms": None,
        "backward_ms": None,
        "peak_memory_bytes": None,
        "case_memory_bytes": None,
        "extra_memory_bytes": None,
        "memory_source": None,
        "memory_floor_bytes": case.memory_floor_bytes,
        "output_bytes": case.output_bytes,
        "case_memory_over_floor": None,
        "extra_memory_over_output": None,
        "bytes_moved": case.bytes_moved,
        "achieved_gb_per_s": None,
        "hbm_fraction": None,
        "bytes_models": {
            name: {"bytes": value, "achieved_gb_per_s": None, "hbm_fraction": None}
            for name, value in (case.bytes_models or {}).items()
        },
        "flops": case.flops,
        "achieved_tflop_per_s": None,
        "bf16_peak_fraction": None,
        "skipped": None,
        "notes": case.notes,
    }


def derive_rates(result: dict, peak_bandwidth: Optional[float], peak_flops: Optional[float]) -> None:
    """Fill achieved rates and roofline fractions from the pass time (forward time for forward-only cases)."""
    ms = result["forward_ms"] if result["forward_only"] else result["full_ms"]
    if ms is None or ms <= 0:
        return
    seconds = ms * 1e-3
    if result["bytes_moved"]:
        result["achieved_gb_per_s"] = result["bytes_moved"] / seconds / 1e9
        if peak_bandwidth:
            result["hbm_fraction"] = result["bytes_moved"] / seconds / peak_bandwidth
    for model in result["bytes_models"].values():
        model["achieved_gb_per_s"] = model["bytes"] / seconds / 1e9
        if peak_bandwidth:
            model["hbm_fraction"] = model["bytes"] / seconds / peak_bandwidth
    if result["flops"]:
        result["achieved_tflop_per_s"] = result["flops"] / seconds / 1e12
        if peak_flops:
            result["bf16_peak_fraction"] = result["flops"] / seconds / peak_flops


def _derive_memory_ratios(result: dict) -> None:
    if result["case_memory_bytes"] is not None and result["memory_floor_bytes"]:
        result["case_memory_over_floor"] = result["case_memory_bytes"] / result["memory_floor_bytes"]
    if result["extra_memory_bytes"] is not None and result["output_bytes"]:
        result["extra_memory_over_output"] = result["extra_memory_bytes"] / result["output_bytes"]


class MeasurementTimeout(Exception):
    """A measurement ran past its share of the time budget."""


class _Watchdog:
    """SIGALRM-based time limit for one measurement (main thread, POSIX; otherwise no limit).

    The alarm raises only while armed, i.e. inside the measurement's ``try`` block, so it can never
    escape from the bookkeeping around it. Once due, it raises again every ``RETRY_S`` until disarmed:
    an exception raised inside a finalizer or weakref callback (a garbage collection during the pass)
    is printed and dropped by Python, and a single alarm would let the pass run on unstopped.
    """

    RETRY_S = 0.25

    def __init__(self, seconds: Optional[float]):
        self.seconds = seconds
        self.armed = False
        self.previous = None

    def _fire(self, signum, frame):
        if self.armed:
            signal.setitimer(signal.ITIMER_REAL, self.RETRY_S)
            raise MeasurementTimeout(f"stopped after {self.seconds:.0f} s (its share of the time budget)")

    def arm(self) -> None:
        if self.seconds is None or not hasattr(signal, "setitimer"):
            return
        try:
            self.previous = signal.signal(signal.SIGALRM, self._fire)
        except ValueError:  # not the main thread
            return
        self.armed = True
        signal.setitimer(signal.ITIMER_REAL, max(self.seconds, 1e-3))

    def disarm(self) -> None:
        self.armed = False
        if self.previous is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.previous)
            self.previous = None


def run_impl(
    case: Case,
    impl: str,
    device: str,
    quick: bool,
    warmup_ms: float,
    rep_ms: float,
    env: dict,
    timeout_s: Optional[float] = None,
) -> dict:
    """Measure one impl of one case; exceptions (and running past ``timeout_s``) become a ``skipped`` reason."""
    result = empty_result(case, impl)
    if impl in case.skipped:
        result["skipped"] = case.skipped[impl]
        return result
    fn = None
    watchdog = _Watchdog(timeout_s)
    try:
        # Before the watchdog: gc.collect() runs finalizers and weakref callbacks, and an alarm raised inside one of
        # them is printed and dropped ("Exception ignored in"), so the measurement ran on past its limit unstopped.
        _free_device_memory(device)
        watchdog.arm()
        allocated_before_setup = torch.cuda.memory_allocated() if device == "cuda" else 0
        if not case.time_passes:
            fn = case.impls[impl]() if device == "cuda" else None
        elif case.forward_only:
            fn = case.impls[impl]()
            result["forward_ms"] = time_pass(fn, device, warmup_ms, rep_ms)
        else:
            forward_setup = (case.forward_impls or {}).get(impl)
            if forward_setup is not None:
                fn = forward_setup()
                result["forward_ms"] = time_pass(fn, device, warmup_ms, rep_ms)
                fn = None
                _free_device_memory(device)
            fn = case.impls[impl]()
            result["full_ms"] = time_pass(fn, device, warmup_ms, rep_ms)
            if result["forward_ms"] is not None:
                result["backward_ms"] = result["full_ms"] - result["forward_ms"]
        if device == "cuda":
            result.update(cuda_memory_of_pass(fn, allocated_before_setup))
        elif case.wants_cpu_memory:
            fn = None
            result.update(cpu_memory_of_pass(case, impl, quick))
        watchdog.disarm()
    except Exception as exc:  # noqa: BLE001 - a failing impl is a result, not a crash
        watchdog.disarm()
        result["skipped"] = _error_reason(exc)
        if not isinstance(exc, MeasurementTimeout):
            traceback.print_exc(file=sys.stderr)
    finally:
        watchdog.disarm()
        fn = None
        _free_device_memory(device)
    derive_rates(result, env.get("peak_hbm_bytes_per_s"), env.get("peak_bf16_flops"))
    _derive_memory_ratios(result)
    return result


# --------------------------------------------------------------------------------------------------
# Discovery and the run
# --------------------------------------------------------------------------------------------------


def default_sources() -> list[str]:
    """Module names of ``benchmarks/bench_*.py``, sorted."""
    return [f"benchmarks.{path.stem}" for path in sorted(BENCH_DIR.glob("bench_*.py"))]


def release_source(source: Optional[str]) -> None:
    """Call a benchmark module's optional ``release()`` once its cases are done: what it caches across cases (the
    speculative module's model pair, ~4 GiB at the GPU shape) otherwise stays held through every later module's
    measurements, in their absolute peaks (a harness review, 2026-12-07). A second pass rebuilds what it needs."""
    if source is None:
        return
    release = getattr(load_source(source), "release", None)
    if callable(release):
        release()
        gc.collect()


def load_source(source: str) -> ModuleType:
    """Import a benchmark module by dotted name or by ``.py`` file path."""
    if source.endswith(".py"):
        path = Path(source).resolve()
        name = "_bench_ext_" + re.sub(r"\W", "_", str(path))
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module
    return importlib.import_module(source)


def discover(
    device: str, quick: bool, only: Optional[str] = None, sources: Optional[list[str]] = None
) -> tuple[list[Case], list[dict]]:
    """Collect cases from every source; a module that fails to import or build is a skip, not a crash."""
    cases: list[Case] = []
    broken: list[dict] = []
    for source in sources if sources is not None else default_sources():
        stem = Path(source).stem if source.endswith(".py") else source.rsplit(".", 1)[-1]
        try:
            module = load_source(source)
            if not hasattr(module, "cases"):
                continue
            found = list(module.cases(device, quick))
        except Exception as exc:  # noqa: BLE001 - one broken module must not hide the others
            traceback.print_exc(file=sys.stderr)
            broken.append({"source": source, "reason": _error_reason(exc)})
            continue
        for index, case in enumerate(found):
            case.source, case.index = source, index
            if only is None or case.op.startswith(only) or stem == f"bench_{only}":
                cases.append(case)
    return cases, broken


def collect_summaries(cases: list[Case], document: dict) -> dict[str, str]:
    """Markdown from each source module's optional ``summarize_results(results, meta) -> str`` (its targets)."""
    summaries = {}
    for source in dict.fromkeys(case.source for case in cases):
        try:
            summarize_results = getattr(load_source(source), "summarize_results", None)
            if summarize_results is not None:
                summaries[source] = summarize_results(document["results"], document["meta"])
        except Exception as exc:  # noqa: BLE001 - a summary bug must not lose the results
            summaries[source] = f"`{source}` summary failed: {_error_reason(exc)}"
    return summaries


def _format_bytes(value: Optional[int]) -> str:
    if value is None:
        return "-"
    return f"{value / 2**20:.1f} MiB" if abs(value) < 2**30 else f"{value / 2**30:.2f} GiB"


def summarize(result: dict) -> str:
    if result["skipped"]:
        return f"skipped: {result['skipped']}"
    parts = []
    if result["full_ms"] is not None:
        parts.append(f"full {result['full_ms']:.3f} ms")
    if result["forward_ms"] is not None:
        parts.append(f"fwd {result['forward_ms']:.3f} ms")
    if result["extra_memory_bytes"] is not None:
        parts.append(f"extra mem {_format_bytes(result['extra_memory_bytes'])}")
    if result["case_memory_over_floor"] is not None:
        parts.append(f"mem/floor {result['case_memory_over_floor']:.2f}x")
    if result["hbm_fraction"] is not None:
        parts.append(f"{100 * result['hbm_fraction']:.0f}% HBM")
    return ", ".join(parts)


BUDGET_SKIP = "time budget exhausted"


class _Terminated(BaseException):
    """SIGTERM (the GPU check's timeout): a BaseException, so that no ``except Exception`` around one
    measurement records it as a failed impl and goes on; it reaches the runner, which writes the report."""


def _raise_terminated(signum, frame):
    raise _Terminated(f"signal {signum}")


def run_benchmarks(
    out_dir: Optional[str | Path] = None,
    *,
    quick: bool = False,
    only: Optional[str] = None,
    device: Optional[str] = None,
    sources: Optional[list[str]] = None,
    budget_s: Optional[float] = None,
    warmup_ms: float = CUDA_WARMUP_MS,
    rep_ms: float = CUDA_REP_MS,
    stream=None,
) -> dict:
    """Run every case x impl, write ``results.json`` (after every measurement) and ``report.md``.

    Returns the results document. ``budget_s`` bounds the run: once exceeded, the remaining
    measurements are recorded as skipped, so a caller's hard timeout still gets a full report
    (default on CPU: ``CPU_DEFAULT_BUDGET_S``; ``float("inf")`` for no limit).
    """
    from .report import write_report

    stream = stream or sys.stdout
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if budget_s is None and device == "cpu":
        budget_s = CPU_DEFAULT_BUDGET_S
    env = environment(device)
    out_dir = Path(out_dir) if out_dir else BENCH_DIR / "results" / f"{env['device_slug']}-latest"
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    cases, broken = discover(device, quick, only, sources)
    create_library_workspaces(device)
    pairs = [(case, impl) for case in cases for impl in [*case.impls, *(i for i in case.skipped if i not in case.impls)]]
    document = {
        "meta": {
            **env,
            "quick": quick,
            "only": only,
            "argv": sys.argv,
            "timing": (
                f"triton.testing.do_bench median, warmup={warmup_ms} ms, rep={rep_ms} ms (raised to at least "
                f"{CUDA_MIN_SAMPLES} samples, up to {CUDA_MAX_REP_MS:g} ms); passes of {CUDA_LONG_PASS_MS:g} ms "
                f"or more: wall-clock median of 1-{CPU_MAX_RUNS} synchronised runs after a warm-up run"
                if device == "cuda"
                else f"wall-clock median of 1-{CPU_MAX_RUNS} runs after one warm-up run"
            ),
            "budget_s": budget_s,
            "elapsed_s": None,
            "complete": False,
            "broken_sources": broken,
        },
        "results": [],
    }
    results_path = out_dir / "results.json"

    def save() -> None:
        document["meta"]["elapsed_s"] = round(time.monotonic() - start, 1)
        results_path.write_text(json.dumps(document, indent=1))

    print(
        f"benchmarks: {len(pairs)} measurements ({len(cases)} cases) on {env['device_name']} "
        f"[{'quick' if quick else 'full'}], writing {out_dir}",
        file=stream,
        flush=True,
    )
    for item in broken:
        print(f"  could not load {item['source']}: {item['reason']}", file=stream, flush=True)
    previous_handler = None
    try:
        try:
            previous_handler = signal.signal(signal.SIGTERM, _raise_terminated)
        except ValueError:  # not the main thread
            previous_handler = None
        sources = list(dict.fromkeys(case.source for case, _ in pairs))
        weights: dict[str, float] = {}
        for case, _ in pairs:
            weights[case.source] = max(weights.get(case.source, 0.0), case.budget_weight)
        source_deadline, current_source, previous_source = float("inf"), None, None
        for number, (case, impl) in enumerate(pairs, 1):
            if case.source != previous_source:
                release_source(previous_source)
                previous_source = case.source
            now = time.monotonic()
            if budget_s is not None and case.source != current_source:
                # Each module gets its weighted share of what is left, so a slow module early in the
                # order cannot starve the others; time a module does not use rolls over.
                current_source = case.source
                left = sources[sources.index(current_source):]
                source_deadline = now + max(0.0, start + budget_s - now) * module_share(weights, left)
            print(f"[{number}/{len(pairs)}] {case.label()} {impl} ...", end="", file=stream, flush=True)
            if now >= source_deadline and impl not in case.skipped:
                result = empty_result(case, impl)
                result["skipped"] = f"{BUDGET_SKIP} (run budget {budget_s:.0f} s, shared between modules)"
            else:
                # A single measurement may overrun its module's share by MIN_MEASUREMENT_S at most.
                timeout_s = None if budget_s is None else max(source_deadline - now, MIN_MEASUREMENT_S)
                result = run_impl(case, impl, device, quick, warmup_ms, rep_ms, env, timeout_s)
            document["results"].append(result)
            print(f" {summarize(result)} ({time.monotonic() - start:.0f} s)", file=stream, flush=True)
            save()
        if budget_s is not None:
            # Time the later modules left unused goes back, in order, to the measurements skipped for the budget or
            # stopped at their share (a module's share is fixed when it starts: an early module that ran out never
            # got it back).
            for position, (case, impl) in enumerate(pairs):
                reason = str(document["results"][position].get("skipped") or "")
                if not reason.startswith((BUDGET_SKIP, f"failed: {MeasurementTimeout.__name__}")):
                    continue
                left = start + budget_s - time.monotonic()
                if left < MIN_MEASUREMENT_S:
                    break
                print(f"[{position + 1}/{len(pairs)}, second pass] {case.label()} {impl} ...", end="", file=stream,
                      flush=True)
                result = run_impl(case, impl, device, quick, warmup_ms, rep_ms, env, left)
                document["results"][position] = result
                print(f" {summarize(result)} ({time.monotonic() - start:.0f} s)", file=stream, flush=True)
                save()
        document["meta"]["complete"] = True
    except (KeyboardInterrupt, _Terminated) as exc:
        print(f"\ninterrupted ({type(exc).__name__} {exc}): writing partial results", file=stream, flush=True)
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
        document["meta"]["budget_skipped"] = sum(
            str(r.get("skipped") or "").startswith(BUDGET_SKIP) for r in document["results"])
        document["meta"]["load_average_1min_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        document["summaries"] = collect_summaries(cases, document)
        save()
        report_path = write_report(document, out_dir)
        print(f"wrote {results_path} and {report_path} in {time.monotonic() - start:.0f} s", file=stream, flush=True)
    return document


def _child_main(argv: list[str]) -> int:
    source, index, impl = argv[1], int(argv[2]), argv[3]
    print(json.dumps(_child_measure_cpu_memory(source, index, impl, "--quick" in argv[4:])))
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 5 and sys.argv[1] == "--child-memory":
        sys.exit(_child_main(sys.argv[1:]))
    sys.exit("usage: python -m benchmarks (this module is the harness; see benchmarks/__main__.py)")
