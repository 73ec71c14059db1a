"""Benchmarks of ``distill_ops.aligndistil_kl`` against the official AlignDistil formulation.

Impls per case (a full pass is loss forward + backward to the student logits; contrastive mode, adaptive alpha,
beta0 = 0.1, r = 10, eps = 1e-3, T = 1):

* ``ours_triton``: ``aligndistil_kl(..., impl="triton")`` (CUDA only).
* ``ours_torch``: ``aligndistil_kl(..., impl="torch")``, the chunked PyTorch fallback.
* ``eager``: :func:`eager_aligndistil`, the official code's formula as it is written there (fp32 softmax /
  log-softmax of all three models, the TVD, the extrapolated teacher, its log-softmax, the weighted reverse KL):
  it materialises about ten fp32 [N, V] tensors.
* ``torch_compile``: ``torch.compile`` of that same function (static shapes, one graph per shape).

GPU: N in {4096, 16384}, V in {131072, 151936}, bf16; one fixed-alpha case; a (BLOCK_V, num_warps) sweep of our
kernel at N=4096, V=151936 (forward-only launches of ``aligndistil_forward``, which computes loss and gradient).
CPU: small fp32 shapes, plus one memory case (ours_torch vs eager, peak RSS measured in a subprocess).
"""

from __future__ import annotations

from typing import Callable

import torch

from benchmarks.harness import Case
from benchmarks.harness import target_status as _status
from distill_ops.aligndistil import aligndistil_kl

OP = "aligndistil"
SWEEP_OP = "aligndistil_block_sweep"
BETA0, R, EPS, FIXED_ALPHA = 0.1, 10.0, 1e-3, 2.0
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

GPU_ROWS = (4096, 16384)
GPU_VOCABS = (131072, 151936)
HEADLINE_SHAPE = (4096, 151936)  # first: a run cut short by its time budget still has these numbers
SWEEP_CONFIGS = ((1024, 4), (2048, 8), (4096, 8), (4096, 16))  # (BLOCK_V, num_warps)
GPU_FALLBACK_ROWS = 4096  # the fallback is a correctness path on GPU: timed at the smaller N only

CPU_TIME_SHAPES = ((256, 8192), (1024, 8192), (256, 32000))
CPU_QUICK_TIME_SHAPES = ((128, 4096), (512, 4096))
CPU_COMPILE_SHAPE = (256, 8192)  # torch.compile on CPU takes about a minute per graph: one case only
CPU_MEMORY_SHAPE = (2048, 32000)
CPU_QUICK_MEMORY_SHAPE = (512, 32000)

NOTES = (
    "Traffic models: *GB/s* and *% HBM* use bytes_moved = the floor 4·N·V·itemsize (three logit rows read once, "
    "the gradient written once); *3-pass* = 9·N·V·itemsize for adaptive alpha (DPO + other read for their "
    "log-sum-exps, all three for the TVD and the student statistics, all three again for the gradient and the "
    "teacher's log-sum-exp, plus the write) and 7·N·V·itemsize for a fixed alpha (no first pass). Memory *floor* "
    "= inputs + one gradient (4·N·V·itemsize); *output* = one gradient (N·V·itemsize). eager = the official "
    "AlignDistil code's formula (fp32 [N, V] temporaries)."
)
SWEEP_NOTES = (
    "Block-size sweep: forward-only launches of `distill_ops.kernels.aligndistil.aligndistil_forward` writing loss, "
    "alpha and gradient (into a preallocated buffer), adaptive alpha, per (BLOCK_V, num_warps)."
)


# --------------------------------------------------------------------------------------------------
# The baseline: the official formula (songmzhang/AlignDistil, reward_boost_type="aligndistil")
# --------------------------------------------------------------------------------------------------


def eager_aligndistil(
    student_logits: torch.Tensor, dpo_logits: torch.Tensor, other_logits: torch.Tensor, alpha: float | None = None
) -> torch.Tensor:
    """Mean over rows of (beta0 / w) KL(q || softmax(z_d + w (z_d - z_o))), w = r TVD + eps (or ``alpha``)."""
    stu_probs = torch.softmax(student_logits, dim=-1, dtype=torch.float32)
    stu_lprobs = torch.log_softmax(student_logits, dim=-1, dtype=torch.float32)
    tea_lprobs = torch.log_softmax(dpo_logits, dim=-1, dtype=torch.float32)
    ref_lprobs = torch.log_softmax(other_logits, dim=-1, dtype=torch.float32)
    if alpha is None:
        tvd = (tea_lprobs.exp() - ref_lprobs.exp()).abs().sum(-1)
        weight = tvd * R + EPS
    else:
        weight = torch.full(student_logits.shape[:-1], alpha, device=student_logits.device)
    final_tea_logits = weight.unsqueeze(-1) * (dpo_logits - other_logits) + dpo_logits
    final_tea_lprobs = torch.log_softmax(final_tea_logits, dim=-1, dtype=torch.float32)
    rlhf_loss = (stu_probs * (stu_lprobs - final_tea_lprobs)).sum(-1) * (BETA0 / weight)
    return rlhf_loss.mean()


_COMPILED: dict[bool, Callable] = {}


def compiled_loss(adaptive: bool) -> Callable[..., torch.Tensor]:
    if adaptive not in _COMPILED:
        _COMPILED[adaptive] = torch.compile(eager_aligndistil, dynamic=False)
    return _COMPILED[adaptive]


def _loss_maker(impl: str, adaptive: bool) -> Callable[[], Callable[..., torch.Tensor]]:
    alpha = None if adaptive else FIXED_ALPHA
    if impl in ("ours_triton", "ours_torch"):
        backend = impl.removeprefix("ours_")

        def make() -> Callable[..., torch.Tensor]:
            return lambda s, d, o: aligndistil_kl(s, d, o, beta0=BETA0, r=R, eps=EPS, alpha=alpha, impl=backend)

        return make
    if impl == "eager":
        return lambda: (lambda s, d, o: eager_aligndistil(s, d, o, alpha))
    return lambda: (lambda s, d, o, compiled=compiled_loss(adaptive): compiled(s, d, o, alpha))


# --------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------


def make_logits(rows: int, vocab: int, dtype: torch.dtype, device: str, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Student, DPO and other logits ``[rows, vocab]`` with a realistic spread (std 2)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return tuple(
        torch.randn(rows, vocab, device=device, dtype=dtype, generator=generator).mul_(2.0) for _ in range(3)
    )


def _pass_setup(
    make_loss: Callable[[], Callable], rows: int, vocab: int, dtype: torch.dtype, device: str, *, forward_only: bool
) -> Callable[[], Callable[[], object]]:
    def setup() -> Callable[[], object]:
        loss_fn = make_loss()
        student, dpo, other = make_logits(rows, vocab, dtype, device)
        student.requires_grad_(True)

        def forward_pass() -> torch.Tensor:
            return loss_fn(student, dpo, other)

        def full_pass() -> None:
            loss_fn(student, dpo, other).backward()
            student.grad = None  # every pass starts from the same state

        return forward_pass if forward_only else full_pass

    return setup


def aligndistil_case(
    rows: int,
    vocab: int,
    dtype: torch.dtype,
    device: str,
    *,
    impls: tuple[str, ...],
    adaptive: bool = True,
    skipped: dict[str, str] | None = None,
    measure_cpu_memory: bool = False,
    time_passes: bool = True,
) -> Case:
    """One (N, V, dtype, alpha) case with the given impls (unavailable ones recorded as skipped)."""
    skipped = dict(skipped or {})
    if device != "cuda" and "ours_triton" not in skipped:
        skipped["ours_triton"] = "needs CUDA (the Triton interpreter is a test path, not a benchmark)"
    runnable = [name for name in impls if name not in skipped]
    itemsize = torch.finfo(dtype).bits // 8
    elements = rows * vocab
    return Case(
        op=OP,
        params={"N": rows, "V": vocab, "dtype": DTYPE_NAMES[dtype], "alpha": "adaptive" if adaptive else "fixed"},
        impls={
            name: _pass_setup(_loss_maker(name, adaptive), rows, vocab, dtype, device, forward_only=False)
            for name in runnable
        },
        forward_impls={
            name: _pass_setup(_loss_maker(name, adaptive), rows, vocab, dtype, device, forward_only=True)
            for name in runnable
        },
        bytes_moved=4 * elements * itemsize,
        bytes_models={"3-pass": (9 if adaptive else 7) * elements * itemsize},
        memory_floor_bytes=4 * elements * itemsize,
        output_bytes=elements * itemsize,
        measure_cpu_memory=measure_cpu_memory,
        time_passes=time_passes,
        skipped={name: reason for name, reason in skipped.items() if name in impls},
        notes=NOTES,
    )


def sweep_case(rows: int, vocab: int, dtype: torch.dtype, device: str) -> Case:
    """Forward-only launches of our kernel per (BLOCK_V, num_warps)."""
    from distill_ops.kernels import aligndistil as kernel_module

    default = (kernel_module.BLOCK_V, kernel_module.NUM_WARPS)

    def launch_setup(block_v: int, num_warps: int) -> Callable[[], Callable[[], object]]:
        def setup() -> Callable[[], object]:
            student, dpo, other = make_logits(rows, vocab, dtype, device)
            grad = torch.empty_like(student)
            row_weight = torch.full((1,), 1.0 / rows, device=device)
            return lambda: kernel_module.aligndistil_forward(
                student, dpo, other, None, grad, row_weight, contrastive=True, beta0=BETA0, r=R, eps=EPS,
                fixed_alpha=None, temperature=1.0, ignore_index=-100, block_v=block_v, num_warps=num_warps,
            )

        return setup

    itemsize = torch.finfo(dtype).bits // 8
    elements = rows * vocab
    impls = {}
    for block_v, num_warps in SWEEP_CONFIGS:
        name = f"BLOCK_V={block_v},warps={num_warps}" + (" (default)" if (block_v, num_warps) == default else "")
        impls[name] = launch_setup(block_v, num_warps)
    return Case(
        op=SWEEP_OP,
        params={"N": rows, "V": vocab, "dtype": DTYPE_NAMES[dtype], "alpha": "adaptive"},
        impls=impls,
        forward_only=True,
        bytes_moved=4 * elements * itemsize,
        bytes_models={"3-pass": 9 * elements * itemsize},
        notes=SWEEP_NOTES,
    )


def _gpu_cases(device: str, quick: bool) -> list[Case]:
    all_impls = ("ours_triton", "ours_torch", "eager", "torch_compile")
    dtype = torch.bfloat16
    if quick:
        shapes = [HEADLINE_SHAPE]
    else:
        shapes = [HEADLINE_SHAPE] + [(n, v) for n in GPU_ROWS for v in GPU_VOCABS if (n, v) != HEADLINE_SHAPE]
    cases = []
    for rows, vocab in shapes:
        skipped = {}
        if rows > GPU_FALLBACK_ROWS:
            skipped["ours_torch"] = f"fallback timed on GPU at N={GPU_FALLBACK_ROWS} only (time budget)"
        cases.append(aligndistil_case(rows, vocab, dtype, device, impls=all_impls, skipped=skipped))
    # The target shapes first, so that a run cut short by its time budget measures them; the sweep and the
    # fixed-alpha case (no target) at the headline shape after.
    rows, vocab = HEADLINE_SHAPE
    cases.append(sweep_case(rows, vocab, dtype, device))
    cases.append(aligndistil_case(rows, vocab, dtype, device, impls=("ours_triton", "eager"), adaptive=False))
    return cases


def _cpu_cases(device: str, quick: bool) -> list[Case]:
    dtype = torch.float32
    cpu_impls = ("ours_triton", "ours_torch", "eager", "torch_compile")
    compile_reason = (
        "torch.compile on CPU is skipped in --quick runs (compile time)"
        if quick
        else "torch.compile on CPU is timed at one small case only (compile time)"
    )
    cases = []
    for rows, vocab in CPU_QUICK_TIME_SHAPES if quick else CPU_TIME_SHAPES:
        skipped = {}
        if quick or (rows, vocab) != CPU_COMPILE_SHAPE:
            skipped["torch_compile"] = compile_reason
        cases.append(aligndistil_case(rows, vocab, dtype, device, impls=cpu_impls, skipped=skipped))
    rows, vocab = CPU_QUICK_MEMORY_SHAPE if quick else CPU_MEMORY_SHAPE
    # Memory only: its timed passes took the memory measurement's time (the CPU times are the shapes above).
    cases.append(aligndistil_case(rows, vocab, dtype, device, impls=("ours_torch", "eager"), measure_cpu_memory=True,
                                  time_passes=False))
    return cases


def cases(device: str, quick: bool) -> list[Case]:
    """aligndistil benchmark cases for ``device`` (``"cuda"`` or ``"cpu"``; CPU always gets its small shapes)."""
    return _gpu_cases(device, quick) if device == "cuda" else _cpu_cases(device, quick)


# --------------------------------------------------------------------------------------------------
# Targets (issue 6), checked against the measured results
# --------------------------------------------------------------------------------------------------


def _find(results: list[dict], op: str, impl: str, **params) -> dict | None:
    for result in results:
        matches = all(result["params"].get(k) == v for k, v in params.items())
        if result["op"] == op and result["impl"] == impl and matches:
            return result
    return None


def _timed(result: dict | None) -> float | None:
    return result["full_ms"] if result and not result["skipped"] and result["full_ms"] else None


def summarize_results(results: list[dict], meta: dict) -> str:
    """Markdown table of the issue's targets per GPU shape: measured value and met / missed / not measured."""
    if meta["device"] != "cuda":
        return "aligndistil targets are GPU targets; this run is on the CPU (see the tables for the fallback)."
    lines = [
        f"**aligndistil targets, bf16, adaptive alpha ({meta['device_name']})**",
        "",
        "| N | V | vs eager (≥ 3×) | vs torch.compile (≥ 1.5×) | extra memory (≤ 1 gradient) "
        "| % HBM (3-pass model) |",
        "|---|---|---|---|---|---|",
    ]
    for rows in GPU_ROWS:
        for vocab in GPU_VOCABS:
            shape = dict(N=rows, V=vocab, dtype="bf16", alpha="adaptive")
            ours = _find(results, OP, "ours_triton", **shape)
            ours_ms = _timed(ours)
            if ours is None:
                continue
            cells = []
            for baseline, goal in (("eager", 3.0), ("torch_compile", 1.5)):
                other = _find(results, OP, baseline, **shape)
                other_ms = _timed(other)
                speedup = other_ms / ours_ms if other_ms and ours_ms else None
                if speedup:
                    text = f"{speedup:.2f}×"
                else:
                    text = f"- ({other['skipped']})" if other and other["skipped"] else "-"
                cells.append(f"{text} {_status(speedup, speedup is not None and speedup >= goal)}")
            extra = ours["extra_memory_over_output"] if ours_ms else None
            extra_text = f"{extra:.3f}×" if extra is not None else "-"
            cells.append(f"{extra_text} {_status(extra, extra is not None and extra <= 1.01)}")
            fraction = ours["bytes_models"]["3-pass"]["hbm_fraction"] if ours_ms else None
            cells.append("-" if fraction is None else f"{100 * fraction:.0f} %")
            lines.append(f"| {rows} | {vocab} | " + " | ".join(cells) + " |")
    timed = [r for r in results if r["op"] == SWEEP_OP and r["forward_ms"] is not None]
    if timed:
        best = min(timed, key=lambda r: r["forward_ms"])
        default = next((r for r in timed if "(default)" in r["impl"]), None)
        line = f"- block sweep: fastest {best['impl']} ({best['forward_ms']:.3f} ms)"
        if default:
            line += f"; default {default['impl']} ({default['forward_ms']:.3f} ms)"
        lines += ["", line]
    return "\n".join(lines)
