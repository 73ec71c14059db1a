"""Benchmarks of ``distill_ops.kl_div`` against what a user would otherwise run.

Impls per case (a full pass is loss forward + backward to the student logits):

* ``ours_triton``: ``kl_div(..., impl="triton")`` (CUDA only).
* ``ours_torch``: ``kl_div(..., impl="torch")``, the chunked PyTorch fallback.
* ``eager``: the plain PyTorch formula below (:func:`eager_loss`): log-softmax of both sides in fp32,
  the divergence, the mean; it materialises fp32 [N, V] tensors as a user's code would.
* ``torch_compile``: ``torch.compile`` of that same formula (rows dynamic, vocabulary static); on the
  GPU at V=131072 only, not on the CPU (compile time).
* ``liger``: Liger-Kernel's ``LigerKLDIVLoss`` (forward KL) / ``LigerJSD`` (jsd) when installed; they
  take log-probabilities, so the log-softmax of both sides is part of their timed pass.
* ``trl``: TRL's own ``GKDTrainer.generalized_jsd_loss`` (jsd only) when ``trl`` is installed (the dev
  extra); its drop-in is ``distill_ops.integrations.trl.generalized_jsd_loss`` (= ``ours_*``).

GPU: N in {4096, 16384}, V in {32768, 131072, 262144}, bf16, divergences forward and jsd, plus a
(BLOCK_V, num_warps) sweep of our kernel at N=16384, V=131072 (forward-only launches of
``kl_div_forward``, which computes loss and gradient); the fallback is timed at N=4096 only. CPU:
small fp32 shapes, plus the memory target case N=4096, V=32000 fp32 (ours_torch vs eager, peak RSS
measured in a subprocess).
"""

from __future__ import annotations

import importlib.util
import math
from typing import Callable

import torch
import torch.nn.functional as F

from benchmarks.harness import Case
from benchmarks.harness import target_status as _status
from distill_ops import kl_div

OP = "kl_div"
SWEEP_OP = "kl_div_block_sweep"
JSD_BETA = 0.5
DIVERGENCES = ("forward", "jsd")
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

GPU_ROWS = (4096, 16384)
GPU_VOCABS = (32768, 131072, 262144)
TARGET_SHAPE = (16384, 131072)  # the performance target: N=16k, V=128k, bf16
SWEEP_CONFIGS = ((1024, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16))  # (BLOCK_V, num_warps)
# (programs, BLOCK_V, num_warps) of the persistent grid (kernels.kl_div.kl_div_forward's ``programs``): few rows in
# flight, so that a row's second read may come from L2 (66 rows of 512 KiB in bf16 at V = 128k: 33 MiB), against
# enough programs to draw the HBM bandwidth. An experiment, forward KL only; the configurations are in the static
# check (kernels.kl_div.PERSISTENT_AOT_CONFIGS).
PERSISTENT_SWEEP = ((66, 4096, 16), (132, 4096, 16), (132, 2048, 8), (264, 2048, 8))
# The fallback on a GPU is a correctness path, not a performance one: time it at the smaller N only.
GPU_FALLBACK_ROWS = 4096
# torch.compile costs tens of seconds per graph (one per divergence and V, rows are dynamic) out of
# a GPU run of a few minutes: compile at the target V only.
GPU_COMPILE_VOCAB = TARGET_SHAPE[1]

# A CPU run shares its 450 s budget between all benchmark modules: a few small shapes (two values of
# N at one V, two values of V at one N, for the plots), jsd at one of them.
CPU_TIME_SHAPES = ((256, 8192), (1024, 8192), (256, 32000))
CPU_QUICK_TIME_SHAPES = ((128, 4096), (512, 4096), (128, 16384))
CPU_MEMORY_SHAPE = (4096, 32000)  # the CPU memory target
CPU_QUICK_MEMORY_SHAPE = (512, 32000)

NOTES = (
    "Traffic models: *GB/s* and *% HBM* use bytes_moved = the floor 3·N·V·itemsize (6·N·V bytes in bf16: "
    "both logit rows read once, the gradient written once); *two-pass* = 5·N·V·itemsize (10·N·V in bf16: "
    "a statistics pass reading both rows, then a pass reading both again and writing the gradient). "
    "Memory *floor* = inputs + one gradient (3·N·V·itemsize); *output* = one gradient (N·V·itemsize). "
    f"jsd uses beta={JSD_BETA}. eager = fp32 log-softmax of both + the divergence + mean (as a user writes it); "
    "liger includes the log-softmax of both sides (in the input dtype) in its pass."
)
SWEEP_NOTES = (
    "Block-size sweep: forward-only launches of `distill_ops.kernels.kl_div.kl_div_forward` writing loss and "
    "gradient (into a preallocated buffer), i.e. the whole fused kernel, per (BLOCK_V, num_warps); `persistent` "
    "rows: a grid of that many programs looping over the rows (fewer rows in flight, an L2-reuse experiment)."
)


# --------------------------------------------------------------------------------------------------
# The baseline formula, written as a user would
# --------------------------------------------------------------------------------------------------


def eager_forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """mean over rows of KL(p || q), p = softmax(teacher), q = softmax(student), in fp32."""
    log_q = torch.log_softmax(student_logits.float(), dim=-1)
    log_p = torch.log_softmax(teacher_logits.float(), dim=-1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)


def eager_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = JSD_BETA) -> torch.Tensor:
    """mean over rows of beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q (TRL's formula)."""
    log_q = torch.log_softmax(student_logits.float(), dim=-1)
    log_p = torch.log_softmax(teacher_logits.float(), dim=-1)
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)]), dim=0)
    kl_teacher = F.kl_div(log_m, log_p, reduction="none", log_target=True).sum(-1)
    kl_student = F.kl_div(log_m, log_q, reduction="none", log_target=True).sum(-1)
    return (beta * kl_teacher + (1 - beta) * kl_student).mean()


EAGER_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "forward": eager_forward_kl,
    "jsd": eager_jsd,
}
_COMPILED: dict[str, Callable] = {}


def compiled_loss(divergence: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``torch.compile`` of the eager formula, one compiled function per divergence (graphs cached per V)."""
    if divergence not in _COMPILED:
        # Static shapes give inductor its best kernels; the rows are marked dynamic at setup so that
        # N=4096 and N=16384 share a graph (one compile per V instead of per shape).
        _COMPILED[divergence] = torch.compile(EAGER_LOSSES[divergence], dynamic=False)
    return _COMPILED[divergence]


def ours_loss(impl: str, divergence: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return kl_div(student_logits, teacher_logits, divergence=divergence, beta=JSD_BETA, impl=impl)

    return loss


def liger_loss(divergence: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    from liger_kernel.transformers.jsd import LigerJSD
    from liger_kernel.transformers.kl_div import LigerKLDIVLoss

    if divergence == "forward":
        module = LigerKLDIVLoss(reduction="batchmean", log_target=True)
    else:
        module = LigerJSD(beta=JSD_BETA)

    def loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return module(torch.log_softmax(student_logits, dim=-1), torch.log_softmax(teacher_logits, dim=-1))

    return loss


# --------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------


def make_logits(rows: int, vocab: int, dtype: torch.dtype, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher logits ``[rows, vocab]`` with a realistic spread (std 2)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    student = torch.randn(rows, vocab, device=device, dtype=dtype, generator=generator).mul_(2.0)
    teacher = torch.randn(rows, vocab, device=device, dtype=dtype, generator=generator).mul_(2.0)
    return student, teacher


def _pass_setup(
    make_loss: Callable[[], Callable],
    rows: int,
    vocab: int,
    dtype: torch.dtype,
    device: str,
    *,
    forward_only: bool,
    rows_dynamic: bool = False,
) -> Callable[[], Callable[[], object]]:
    def setup() -> Callable[[], object]:
        loss_fn = make_loss()
        student, teacher = make_logits(rows, vocab, dtype, device)
        if rows_dynamic:
            torch._dynamo.mark_dynamic(student, 0)
            torch._dynamo.mark_dynamic(teacher, 0)
        student.requires_grad_(True)

        def forward_pass() -> torch.Tensor:
            return loss_fn(student, teacher)

        def full_pass() -> None:
            loss_fn(student, teacher).backward()
            student.grad = None  # every pass starts from the same state

        return forward_pass if forward_only else full_pass

    return setup


def trl_loss(divergence: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """TRL's GKD loss as TRL calls it (``batchmean`` over the rows of ``[N, V]`` logits: the per-row mean)."""
    from distill_ops.integrations.trl import _gkd_base

    gkd_loss = _gkd_base().generalized_jsd_loss
    return lambda student, teacher: gkd_loss(student, teacher, beta=JSD_BETA)


def _trl_unavailable(divergence: str) -> str | None:
    if divergence != "jsd":
        return "TRL's GKD loss is the generalized JSD only"
    if importlib.util.find_spec("trl") is None:
        return "trl not installed (the `dev` extra)"
    # Imported here, when the cases are built: a memory subprocess counts the RSS growth of a case's setup as its
    # inputs, and TRL's first import there (~256 MiB of trl / transformers code) made TRL's inputs read 1260 MiB
    # for 1000 (its ratio 5.84x for ~5.67x; a harness review, 2026-12-07).
    from distill_ops.integrations.trl import _gkd_base

    try:
        _gkd_base()
    except ImportError as error:
        return f"this trl has no GKDTrainer ({error})"
    return None


def _liger_unavailable(device: str) -> str | None:
    if device != "cuda":
        return "Liger-Kernel needs CUDA"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger_kernel not installed (pip install liger-kernel, the `bench` extra)"
    return None


def kl_div_case(
    rows: int,
    vocab: int,
    dtype: torch.dtype,
    divergence: str,
    device: str,
    *,
    impls: tuple[str, ...],
    skipped: dict[str, str] | None = None,
    measure_cpu_memory: bool = False,
    time_passes: bool = True,
) -> Case:
    """One (N, V, dtype, divergence) case with the given impls (unavailable ones recorded as skipped).

    ``time_passes=False`` measures memory only (a slow CPU memory case).
    """
    skipped = dict(skipped or {})
    makers: dict[str, tuple[Callable[[], Callable], bool]] = {
        "ours_triton": (lambda: ours_loss("triton", divergence), False),
        "ours_torch": (lambda: ours_loss("torch", divergence), False),
        "eager": (lambda: EAGER_LOSSES[divergence], False),
        "torch_compile": (lambda: compiled_loss(divergence), True),
        "liger": (lambda: liger_loss(divergence), False),
        "trl": (lambda: trl_loss(divergence), False),
    }
    if device != "cuda" and "ours_triton" not in skipped:
        skipped["ours_triton"] = "needs CUDA (the Triton interpreter is a test path, not a benchmark)"
    liger_reason = _liger_unavailable(device)
    if liger_reason and "liger" not in skipped:
        skipped["liger"] = liger_reason
    trl_reason = _trl_unavailable(divergence)
    if trl_reason and "trl" not in skipped:
        skipped["trl"] = trl_reason
    runnable = [name for name in impls if name not in skipped]
    itemsize = torch.finfo(dtype).bits // 8
    elements = rows * vocab
    return Case(
        op=OP,
        params={"N": rows, "V": vocab, "dtype": DTYPE_NAMES[dtype], "divergence": divergence},
        impls={
            name: _pass_setup(makers[name][0], rows, vocab, dtype, device, forward_only=False, rows_dynamic=makers[name][1])
            for name in runnable
        },
        forward_impls={
            name: _pass_setup(makers[name][0], rows, vocab, dtype, device, forward_only=True, rows_dynamic=makers[name][1])
            for name in runnable
        },
        bytes_moved=3 * elements * itemsize,
        bytes_models={"two-pass": 5 * elements * itemsize},
        memory_floor_bytes=3 * elements * itemsize,
        output_bytes=elements * itemsize,
        measure_cpu_memory=measure_cpu_memory,
        time_passes=time_passes,
        skipped={name: reason for name, reason in skipped.items() if name in impls},
        notes=NOTES,
    )


def sweep_case(rows: int, vocab: int, dtype: torch.dtype, divergence: str, device: str) -> Case:
    """Forward-only launches of our kernel per (BLOCK_V, num_warps)."""
    from distill_ops.kernels import kl_div as kernel_module

    warps_by_divergence = getattr(kernel_module, "NUM_WARPS_BY_DIVERGENCE", {})
    default = (kernel_module.BLOCK_V, warps_by_divergence.get(divergence, kernel_module.NUM_WARPS))
    coef = JSD_BETA if divergence == "jsd" else 0.0

    def launch_setup(block_v: int, num_warps: int, programs: int | None = None) -> Callable[[], Callable[[], object]]:
        def setup() -> Callable[[], object]:
            student, teacher = make_logits(rows, vocab, dtype, device)
            grad = torch.empty_like(student)
            row_weight = torch.ones(1, dtype=torch.float32, device=device)
            extra = {} if programs is None else {"programs": programs}
            return lambda: kernel_module.kl_div_forward(
                student, teacher, None, grad, row_weight=row_weight, divergence=divergence, coef=coef,
                temperature=1.0, ignore_index=-100, block_v=block_v, num_warps=num_warps, **extra,
            )

        return setup

    itemsize = torch.finfo(dtype).bits // 8
    elements = rows * vocab
    impls = {}
    for block_v, num_warps in SWEEP_CONFIGS:
        name = f"BLOCK_V={block_v},warps={num_warps}" + (" (default)" if (block_v, num_warps) == default else "")
        impls[name] = launch_setup(block_v, num_warps)
    for programs, block_v, num_warps in PERSISTENT_SWEEP if divergence == "forward" else ():
        impls[f"persistent {programs} programs,BLOCK_V={block_v},warps={num_warps}"] = launch_setup(
            block_v, num_warps, programs)
    return Case(
        op=SWEEP_OP,
        params={"N": rows, "V": vocab, "dtype": DTYPE_NAMES[dtype], "divergence": divergence},
        impls=impls,
        forward_only=True,
        bytes_moved=3 * elements * itemsize,
        bytes_models={"two-pass": 5 * elements * itemsize},
        notes=SWEEP_NOTES,
    )


def _gpu_cases(device: str, quick: bool) -> list[Case]:
    all_impls = ("ours_triton", "ours_torch", "eager", "torch_compile", "liger", "trl")
    dtype = torch.bfloat16
    if quick:
        shapes = [(4096, 32768), (4096, 131072)]
        sweep_shape = (4096, 131072)
    else:
        # The target shape first: a run cut short by its time budget still has the headline numbers.
        shapes = [TARGET_SHAPE] + [(n, v) for n in GPU_ROWS for v in GPU_VOCABS if (n, v) != TARGET_SHAPE]
        sweep_shape = TARGET_SHAPE
    cases = []
    for index, (rows, vocab) in enumerate(shapes):
        for divergence in DIVERGENCES:
            skipped = {}
            if rows > GPU_FALLBACK_ROWS:
                skipped["ours_torch"] = f"fallback timed on GPU at N={GPU_FALLBACK_ROWS} only (time budget)"
            if vocab != GPU_COMPILE_VOCAB:
                skipped["torch_compile"] = f"torch.compile timed at V={GPU_COMPILE_VOCAB} only (compile time)"
            cases.append(kl_div_case(rows, vocab, dtype, divergence, device, impls=all_impls, skipped=skipped))
        if index == 0:
            cases += [sweep_case(*sweep_shape, dtype, divergence, device) for divergence in DIVERGENCES]
    return cases


def _cpu_cases(device: str, quick: bool) -> list[Case]:
    dtype = torch.float32
    cpu_impls = ("ours_triton", "ours_torch", "eager", "torch_compile", "liger", "trl")
    # Inductor's C++ compile of this graph takes about a minute on two cores: more than this module's
    # share of a CPU run. torch.compile is measured on the GPU.
    skipped = {"torch_compile": "torch.compile is not timed on CPU (about a minute of compile time per graph)"}
    # The timed cases first (small shapes, a few seconds in all), then the memory target case, the CPU result
    # the issue asks for, whose passes take seconds (memory only): with the memory cases first they used up the
    # module's share and every timing was skipped; a memory case cut short gets the run's leftover time in the
    # harness's second pass.
    cases = []
    time_shapes = CPU_QUICK_TIME_SHAPES if quick else CPU_TIME_SHAPES
    for rows, vocab in time_shapes:
        for divergence in DIVERGENCES:
            if divergence != "forward" and (rows, vocab) != time_shapes[0]:
                continue
            cases.append(kl_div_case(rows, vocab, dtype, divergence, device, impls=cpu_impls, skipped=skipped))
    rows, vocab = CPU_QUICK_MEMORY_SHAPE if quick else CPU_MEMORY_SHAPE
    cases += [
        kl_div_case(
            rows, vocab, dtype, "forward", device, impls=("ours_torch", "eager"), measure_cpu_memory=True,
            time_passes=False,
        ),
        # The same for the JSD against TRL's own GKD loss (and its eager formula): memory only.
        kl_div_case(
            rows, vocab, dtype, "jsd", device, impls=("ours_torch", "eager", "trl"), measure_cpu_memory=True,
            time_passes=False,
        ),
    ]
    return cases


def cases(device: str, quick: bool) -> list[Case]:
    """kl_div benchmark cases for ``device`` (``"cuda"`` or ``"cpu"``; CPU always gets its small shapes)."""
    return _gpu_cases(device, quick) if device == "cuda" else _cpu_cases(device, quick)


# --------------------------------------------------------------------------------------------------
# Targets (issue 2, section 4), checked against the measured results
# --------------------------------------------------------------------------------------------------


def _find(results: list[dict], op: str, impl: str, **params) -> dict | None:
    for result in results:
        if result["op"] == op and result["impl"] == impl and all(result["params"].get(k) == v for k, v in params.items()):
            return result
    return None


def summarize_results(results: list[dict], meta: dict) -> str:
    """Markdown table of the kl_div targets: measured value and met / missed / not measured."""
    rows = []
    if meta["device"] == "cuda":
        n, v = TARGET_SHAPE
        shape = dict(N=n, V=v, dtype="bf16", divergence="forward")
        ours = _find(results, OP, "ours_triton", **shape)
        ours_ms = ours["full_ms"] if ours and not ours["skipped"] else None
        fraction = ours["bytes_models"]["two-pass"]["hbm_fraction"] if ours_ms else None
        rows.append(
            ("full fwd+bwd ≥ 80 % of the 10·N·V two-pass roofline", _pct_or_dash(fraction),
             _status(fraction, fraction is not None and fraction >= 0.8))
        )
        for baseline in ("liger", "torch_compile"):
            other = _find(results, OP, baseline, **shape)
            speedup = other["full_ms"] / ours_ms if ours_ms and other and other["full_ms"] else None
            reason = f" ({other['skipped']})" if other and other["skipped"] else ""
            rows.append(
                (f"≥ 2× faster than {baseline}", (f"{speedup:.2f}×" if speedup else "-") + reason,
                 _status(speedup, speedup is not None and speedup >= 2.0))
            )
        extra = ours["extra_memory_over_output"] if ours_ms else None
        rows.append(
            ("peak extra memory ≤ one [N, V] gradient (input dtype)",
             "-" if extra is None else f"{extra:.3f}× gradient",
             _status(extra, extra is not None and extra <= 1.01))
        )
        title = f"kl_div targets at N={n}, V={v}, bf16, forward KL ({meta['device_name']})"
        sweep_lines = _sweep_summary(results)
    else:
        n, v = CPU_QUICK_MEMORY_SHAPE if meta.get("quick") else CPU_MEMORY_SHAPE  # the shape the run measured
        shape = dict(N=n, V=v, dtype="fp32", divergence="forward")
        fallback = _find(results, OP, "ours_torch", **shape)
        eager = _find(results, OP, "eager", **shape)
        ratio = fallback["case_memory_over_floor"] if fallback else None
        eager_ratio = eager["case_memory_over_floor"] if eager else None
        rows.append(
            ("fallback peak memory ≤ 1.5 × (inputs + gradient)", _ratio_or_dash(ratio),
             _status(ratio, ratio is not None and ratio <= 1.5))
        )
        rows.append(("eager formula (expected ≈ 2.3×)", _ratio_or_dash(eager_ratio), "reference"))
        for impl, label in (("ours_torch", "JSD: fallback"), ("eager", "JSD: eager formula"),
                            ("trl", "JSD: TRL's GKDTrainer.generalized_jsd_loss")):
            measured = _find(results, OP, impl, **dict(shape, divergence="jsd"))
            rows.append((f"{label} (same measure)",
                         _ratio_or_dash(measured["case_memory_over_floor"] if measured else None), "reference"))
        title = f"kl_div CPU memory target at N={n}, V={v}, fp32 (peak RSS above the pre-setup level)"
        sweep_lines = []
    lines = [f"**{title}**", "", "| target | measured | status |", "|---|---|---|"]
    lines += [f"| {target} | {value} | {status} |" for target, value, status in rows]
    return "\n".join(lines + [""] + sweep_lines)


def _sweep_summary(results: list[dict]) -> list[str]:
    lines = []
    for divergence in DIVERGENCES:
        timed = [
            r for r in results
            if r["op"] == SWEEP_OP and r["params"]["divergence"] == divergence and r["forward_ms"] is not None
        ]
        if timed:
            best = min(timed, key=lambda r: r["forward_ms"])
            default = next((r for r in timed if "(default)" in r["impl"]), None)
            line = f"- block sweep, {divergence}: fastest {best['impl']} ({best['forward_ms']:.3f} ms)"
            if default:
                line += f"; default {default['impl']} ({default['forward_ms']:.3f} ms)"
            lines.append(line)
    return lines


def _pct_or_dash(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f} %"


def _ratio_or_dash(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}×"
