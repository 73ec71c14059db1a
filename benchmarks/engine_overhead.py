"""Per-step host overhead of the speculative engine: ops, launches and host time per phase.

    python -m benchmarks.engine_overhead [--new-tokens N] [--repeats R] [--impl torch|triton|both]
                                         [--configs tree-greedy,chain-sampling,...] [--top N] [--json PATH]

On a GPU at T = 32 the engine's own work (tree building, verification, compaction) is host-bound: every
small PyTorch op or Triton launch costs ~5-20 us of CPU time whatever its size. This script measures the
proxy on any machine: it decodes with the tiny synthetic pair of ``benchmarks/bench_speculative.py``
(CPU shape) and reports, per verification step and per phase of ``SpeculativeOutput.timings``:

* ``aten``: ATen ops dispatched (a ``TorchDispatchMode`` counter), split into ``kernel`` (ops that launch
  device work), ``alloc`` (``empty*``: allocator calls, no kernel) and ``meta`` (views, ``detach``,
  ``lift_fresh``, no-op ``to``: no device work);
* ``triton``: Triton kernel launches (counted at ``JITFunction.run``; under the CPU interpreter too);
* ``h2d``: tensors built from host data (``torch.tensor(...)``, ``torch.frombuffer``): one host-to-device
  copy each on a GPU (``torch.tensor(data, device="cuda")`` also synchronises the stream; the engine's
  ``int64_to_device`` copies from pinned memory without synchronising);
* ``reads``: host reads of tensor values (``tolist``, ``item``, ``bool``, ``int``, ``float``): one
  device synchronisation each on a GPU. On CPU the ops' own CPU-only value checks are included
  (``tree_attention``, ``verify`` and ``compact_kv_cache`` validate cache lengths and token ids only on
  CPU tensors); each read is also attributed to the function that made it (``read_sites``, listed with
  ``--top``), which separates those checks from the engine's own reads;
* ``ms``: host milliseconds per step (the engine's ``timings``, median of ``--repeats`` runs without the
  counters).

Phases: ``draft`` (draft-model forwards and the per-level top-k, ``tree`` excluded), ``tree`` (EAGLE-2
candidate bookkeeping and the tree specs), ``target`` (the target forward over the tree), ``verify``,
``compaction``; every step drafts the full tree here (the engine's cut of its last trees near
``max_new_tokens`` is switched off: ``python -m benchmarks.engine_tree_cut`` counts what it saves);
``overhead = tree + verify + compaction`` (issue 8's target: < 10 % of a target
forward at T = 32 on a GPU). Ops are attributed to the innermost phase.

``--impl torch`` runs the PyTorch paths (what the CPU runs); ``--impl triton`` runs the Triton kernels
(under the interpreter without CUDA: the op and launch counts are the GPU path's, the times are not
meaningful and are not printed). Counts and times here are CPU host-side numbers, never GPU numbers.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

PHASES = ("draft", "tree", "target", "verify", "compaction")
OVERHEAD_PHASES = ("tree", "verify", "compaction")
COUNTS = ("aten", "kernel", "alloc", "meta", "triton", "h2d", "reads")
TREE = dict(depth=5, topk=4, num_nodes=32)
CHAIN = dict(tree=[[0] * d for d in range(1, 6)])
CONFIGS = {
    "tree-greedy": (TREE, 0.0),
    "tree-sampling": (TREE, 1.0),
    "chain-greedy": (CHAIN, 0.0),
    "chain-sampling": (CHAIN, 1.0),
}
_ALLOC_OPS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}
_META_OPS = {"detach", "detach_", "lift_fresh", "resolve_conj", "resolve_neg", "alias", "_local_scalar_dense"}
_READ_METHODS = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__")
_TORCH_DIR = str(Path(torch.__file__).parent)


def _read_site() -> str:
    """``module:function`` of the innermost caller outside torch and this file (who read a tensor)."""
    frame = sys._getframe(2)
    while frame is not None and (frame.f_code.co_filename.startswith(_TORCH_DIR)
                                 or frame.f_code.co_filename == __file__):
        frame = frame.f_back
    if frame is None:
        return "?"
    return f"{frame.f_globals.get('__name__', '?')}:{frame.f_code.co_name}"


def _same_tensor(out: object, source: object) -> bool:
    """``Tensor.to`` that returned its input (same dtype and device: no copy, no kernel)."""
    return (isinstance(out, torch.Tensor) and isinstance(source, torch.Tensor) and out.dtype == source.dtype
            and out.device == source.device and out.data_ptr() == source.data_ptr())


class _OpCounter(TorchDispatchMode):
    """Counts dispatched ATen ops, Triton launches, host-built tensors and host reads per phase."""

    def __init__(self):
        super().__init__()
        self.stack: list[str] = ["outside"]
        self.counts: dict[str, dict[str, int]] = {}
        self.op_names: dict[str, collections.Counter] = {}
        self.read_sites: dict[str, collections.Counter] = {}
        self.paused = 0

    def add(self, kind: str, amount: int = 1) -> None:
        if self.paused:
            return
        phase = self.counts.setdefault(self.stack[-1], dict.fromkeys(COUNTS, 0))
        phase[kind] += amount

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if not self.paused:
            self.add("aten")
            self.op_names.setdefault(self.stack[-1], collections.Counter())[str(func)] += 1
            if name in _ALLOC_OPS:
                self.add("alloc")
            elif func.is_view or name in _META_OPS or (name == "to" and _same_tensor(out, args[0])):
                self.add("meta")
            else:
                self.add("kernel")
            if name == "lift_fresh":
                self.add("h2d")
        return out

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.stack.append(name)
        try:
            yield
        finally:
            self.stack.pop()


@contextmanager
def _counting(counter: _OpCounter) -> Iterator[None]:
    """Install the counter: the dispatch mode, Triton launch and host-read hooks, the phase timer."""
    import triton.runtime.jit as triton_jit

    import distill_ops.speculative as speculative

    launchers = [triton_jit.JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction

        launchers.append(InterpretedFunction)
    except ImportError:  # pragma: no cover - older Triton
        pass

    def counted_run(original):
        def run(self, *args, **kwargs):
            counter.add("triton")
            counter.paused += 1  # the interpreter's own tensor copies are not the engine's ops
            try:
                return original(self, *args, **kwargs)
            finally:
                counter.paused -= 1

        return run

    def counted_read(original):
        def read(self, *args, **kwargs):
            if not counter.paused:
                counter.read_sites.setdefault(counter.stack[-1], collections.Counter())[_read_site()] += 1
            counter.add("reads")
            counter.paused += 1
            try:
                return original(self, *args, **kwargs)
            finally:
                counter.paused -= 1

        return read

    class PhaseTimer(speculative._Timer):
        @contextmanager
        def __call__(self, phase: str) -> Iterator[None]:
            with counter.phase(phase), super().__call__(phase):
                yield

    def counted_frombuffer(*args, **kwargs):
        counter.add("h2d")  # the engine's host-built tensors (distill_ops.tree.int64_to_device)
        return original_frombuffer(*args, **kwargs)

    original_frombuffer = torch.frombuffer
    patches = [mock.patch.object(cls, "run", counted_run(cls.run)) for cls in launchers]
    patches.append(mock.patch.object(torch, "frombuffer", counted_frombuffer))
    patches += [mock.patch.object(torch.Tensor, name, counted_read(getattr(torch.Tensor, name)))
                for name in _READ_METHODS]
    patches.append(mock.patch.object(speculative, "_Timer", PhaseTimer))
    for patch in patches:
        patch.start()
    try:
        with counter:
            yield
    finally:
        for patch in reversed(patches):
            patch.stop()


def measure(
    config: str,
    *,
    impl: str = "torch",
    new_tokens: int = 32,
    repeats: int = 5,
    shape: dict | None = None,
    device: str = "cpu",
) -> dict:
    """Counts and host times per step and phase of one engine configuration (see the module docstring).

    Returns ``{"config", "impl", "steps", "new_tokens", "accepted_per_step", "counts": {phase: {kind: per
    step}}, "prefill_counts", "ops": {phase: {ATen op: per step}}, "read_sites": {phase: {"module:function":
    reads per step}}, "ms": {phase: per step} or None, "overhead_ms", "target_ms"}``.
    """
    from benchmarks.bench_speculative import CPU_SHAPE, PROMPT_LEN, _one_thread_on_cpu, build_pair
    from distill_ops.speculative import SpeculativeDecoder

    tree, temperature = CONFIGS[config]
    shape = shape or CPU_SHAPE
    target, draft = build_pair(shape, device, torch.float32)
    prompt = torch.randint(0, shape["vocab"], (1, PROMPT_LEN), generator=torch.Generator().manual_seed(0))
    prompt = prompt.to(device)

    def runner(profile: bool):
        engine = SpeculativeDecoder(target, draft, impl=impl, profile=profile, **tree)
        # Every step drafts the whole tree: the engine cuts its last trees near max_new_tokens (_plans_within),
        # and those smaller steps would be averaged in. The counts are those of a step at the full tree size.
        engine._cut_trees = False

        def generate():
            generator = torch.Generator(device=device).manual_seed(0) if temperature > 0 else None
            return engine.generate(prompt, max_new_tokens=new_tokens, temperature=temperature, eos_token_id=[],
                                   generator=generator)

        return _one_thread_on_cpu(device, generate)

    run = runner(profile=False)
    run()  # warm-up (kernel compilation / interpreter rewrites, lazy imports)
    counter = _OpCounter()
    with _counting(counter):
        out = run()
    steps = max(len(out.accept_lengths), 1)
    per_step = {}
    for phase in PHASES:
        totals = counter.counts.get(phase, dict.fromkeys(COUNTS, 0))
        per_step[phase] = {kind: totals[kind] / steps for kind in COUNTS}
    per_step["overhead"] = {kind: sum(per_step[p][kind] for p in OVERHEAD_PHASES) for kind in COUNTS}
    result = {
        "config": config, "impl": impl, "device": device, "steps": len(out.accept_lengths),
        "new_tokens": out.num_new_tokens, "accepted_per_step": sum(out.accept_lengths) / steps,
        "counts": per_step, "prefill_counts": counter.counts.get("prefill", {}), "ms": None,
        "ops": {phase: {name: count / steps for name, count in counter.op_names.get(phase, {}).items()}
                for phase in PHASES},
        "read_sites": {phase: {site: count / steps for site, count in counter.read_sites.get(phase, {}).items()}
                       for phase in PHASES},
        "overhead_ms": None, "target_ms": None,
    }
    timed = impl == "torch" or device == "cuda"
    if timed and repeats > 0:
        # On a GPU the phases are timed with profile=True (a synchronisation around each): without it the step's
        # one blocking read, inside "verify", absorbed the queued target forward, and "target" timed its launches
        # only (a harness review, 2026-12-07). The counts above come from the unsynchronised engine.
        if device == "cuda":
            run = runner(profile=True)
            run()
        runs = []
        for _ in range(repeats):
            timings = run().timings
            own = {phase: timings.get(phase, 0.0) for phase in PHASES}
            own["draft"] -= own["tree"]  # the engine's draft time includes its tree time
            runs.append({phase: 1e3 * seconds / steps for phase, seconds in own.items()})
        result["ms"] = {phase: statistics.median(run[phase] for run in runs) for phase in PHASES}
        result["overhead_ms"] = statistics.median(sum(run[p] for p in OVERHEAD_PHASES) for run in runs)
        result["target_ms"] = result["ms"]["target"]
    return result


def format_results(results: list[dict], top: int = 0) -> str:
    """A Markdown table per result: counts per step and phase, host ms per step when measured; with
    ``top`` the ``top`` most frequent ATen ops per step of each overhead phase and where each phase's
    host reads come from."""
    lines = []
    for res in results:
        where = "CPU host" if res["device"] == "cpu" else f"{res['device']} host"
        interpreted = res["impl"] == "triton" and res["device"] == "cpu"
        interp = " (Triton interpreter: launch counts only)" if interpreted else ""
        lines += [
            f"### {res['config']}, impl={res['impl']}{interp}: {res['steps']} steps, {res['new_tokens']} tokens, "
            f"{res['accepted_per_step']:.2f} accepted/step ({where} counts per step)",
            "",
            "| phase | " + " | ".join(COUNTS) + (" | host ms |" if res["ms"] else " |"),
            "|---" * (len(COUNTS) + 1 + (1 if res["ms"] else 0)) + "|",
        ]
        for phase in PHASES + ("overhead",):
            row = res["counts"][phase]
            cells = [f"{row[kind]:.1f}" for kind in COUNTS]
            if res["ms"]:
                ms = res["overhead_ms"] if phase == "overhead" else res["ms"][phase]
                cells.append(f"{ms:.3f}")
            lines.append(f"| {phase} | " + " | ".join(cells) + " |")
        lines.append("")
        for phase in OVERHEAD_PHASES if top else ():
            ranked = sorted(res["ops"][phase].items(), key=lambda item: -item[1])[:top]
            if ranked:
                lines.append(f"- {phase}: " + ", ".join(f"{name} {count:.1f}" for name, count in ranked))
        for phase in PHASES if top else ():
            sites = sorted(res["read_sites"][phase].items(), key=lambda item: -item[1])
            if sites:
                lines.append(f"- {phase} reads: " + ", ".join(f"{site} {count:.1f}" for site, count in sites))
        if top:
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.engine_overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {list(CONFIGS)}")
    parser.add_argument("--impl", choices=("torch", "triton", "both"), default="both")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (median) per config, torch impl")
    parser.add_argument("--top", type=int, default=0, help="list the N most frequent ATen ops per overhead phase")
    parser.add_argument("--json", default=None, help="also write the raw results to this file")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
    impls = ("torch", "triton") if args.impl == "both" else (args.impl,)
    if "triton" in impls and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        # The interpreter must be on before the kernels are imported: rerun in a fresh interpreter.
        import subprocess

        env = dict(os.environ, TRITON_INTERPRET="1")
        return subprocess.call([sys.executable, "-m", "benchmarks.engine_overhead", *(argv or sys.argv[1:])], env=env)
    results = []
    for impl in impls:
        for config in configs:
            start = time.perf_counter()
            results.append(measure(config, impl=impl, new_tokens=args.new_tokens, repeats=args.repeats,
                                   device=device))
            print(f"[{config} impl={impl}: {time.perf_counter() - start:.1f} s]", file=sys.stderr)
    print(f"# Engine overhead per step ({device}; torch {torch.__version__})\n")
    print(format_results(results, args.top))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
