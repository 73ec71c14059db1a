"""Benchmarks of ``distill_ops.fused_linear_kl_div`` (distillation from hidden states, no logits).

Impls per case (a full pass is loss forward + backward to the student's hidden states and LM head):

* ``ours_triton``: ``fused_linear_kl_div(..., impl="triton")`` (CUDA only), the default "tiles" strategy.
* ``ours_triton_gemm``: the same with ``distill_ops.fused_linear.TRITON_STRATEGY = "gemm"`` (cuBLAS logits chunks
  read by the same kernels; CUDA only).
* ``ours_triton_fp32acc``: the default strategy with ``GRAD_HIDDEN_ACCUMULATION = "fp32"`` (d_hidden through
  cuBLAS into an fp32 accumulator instead of the compensated bf16 pair: 2·N·H bytes more, CUDA only).
* ``ours_torch``: the chunked PyTorch fallback.
* ``ours_triton_entropy`` / ``ours_torch_entropy``: the same with ``return_entropy=True`` (the student's entropy,
  which TRL's loss below always computes; the Triton one at the target shape only).
* ``eager``: what a user writes: both logits materialised (``h @ W.T`` in the input dtype), fp32
  log-softmax of both, the divergence, the mean (:func:`eager_loss`).
* ``torch_compile``: ``torch.compile`` of that formula.
* ``liger``: Liger-Kernel's ``LigerFusedLinearJSD`` (chunked over tokens, logits materialised per
  chunk) when installed; JSD only, so every case uses ``divergence="jsd"``, beta = 0.5.
* ``trl_chunked``: TRL's own loss of its ``DistillationTrainer`` (``trl.trainer.distillation_trainer.
  _chunked_divergence_loss``: fp32 logits tiles of 4096 tokens x 32768 vocabulary entries from cuBLAS, folded by
  Triton kernels on CUDA, by PyTorch elsewhere; it also sums the student's entropy) when ``trl`` is installed.

FLOPs of a full pass (for the fraction of bf16 tensor-core peak): forward 2·N·V·(Hs+Ht) (student and
teacher logits; the mixture divergences recompute them once more: another 2·N·V·(Hs+Ht)), backward
2·N·V·(Hs+Ht) to recompute the tiles plus 2·2·N·V·Hs for the two gradients. The *model* counts the
work any implementation must do: 2·N·V·(Hs+Ht) + 4·N·V·Hs (logits once, two gradient GEMMs).

Block sweep (``fused_linear_block_sweep``, GPU only, at the target shape): forward-only launches of the two Triton
kernels per launch configuration (BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages): the statistics kernel
(forward KL, PASS 1: the whole forward of the plain KLs) and the dL/dz kernel of one backward chunk. Candidates are
the configurations the static check finds spill-free in the *aligned* variant on sm_90a (the one that runs at these
shapes), plus one that is not: the statistics kernel at 128 x 128 tiles, 16 warps (136 bytes of spills under
Triton 3.6; every 128 x 128 statistics configuration tried spills, the two sides' fp32 accumulators alone take 64
registers per thread at 16 warps). It is there to measure a hypothesis: at 64 x 64 tiles a program does 32 FLOP per
byte of operand tiles it loads (2·64·64·BLOCK_H FLOP per side for 2·(64+64)·BLOCK_H bytes), so 132 SMs at the
bf16 peak would need ~30 TB/s from L2, several times what L2 delivers; 128 x 128 tiles double the FLOP per byte
(an estimate, not a measurement). That bounds every schedule; it does not explain why the H200 measured the
statistics kernel at ~120 TFLOP/s while the backward, whose dL/dz kernel then ran the same 64 x 64 tile code,
reached ~390 TFLOP/s with its cuBLAS GEMMs. The statistics kernel's schedule does: under the previous split rule
its resident programs kept about a whole L2 of hidden-state blocks in flight (see ``kernels.fused_linear.
STATS_SPLITS``), so the ``splits=...,group=...`` rows time the default tiles under that rule and around the new
default. The defaults in ``kernels/fused_linear.py`` are to be picked from these measurements. Also one chunk's
d_hidden accumulation: the compensated Triton GEMM per configuration (GRAD_HIDDEN_SWEEP) and cuBLAS into fp32
(``addmm`` with an fp32 C matrix, what ``"fp32"`` accumulation runs).

GPU shapes: from N ∈ {4096, 8192, 16384}, H ∈ {2048, 4096} (student = teacher width), V ∈ {131072, 262144},
bf16, three points (the issue's target N=8192, H=4096, V=131072 first; then 4096/2048/128k and
16384/4096/256k, where the materialised-logits baselines are skipped: 16 GiB per fp32 [N, V] tensor). CPU: small
fp32 shapes and the memory case N=2048, V=65536, H=256 (ours_torch vs eager, peak RSS in a subprocess).
"""

from __future__ import annotations

import importlib.util
import math
from typing import Callable

import torch

from benchmarks.harness import Case
from distill_ops.fused_linear import fused_linear_kl_div, triton_strategy

OP = "fused_linear_kl_div"
SWEEP_OP = "fused_linear_block_sweep"
JSD_BETA = 0.5
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

TARGET_SHAPE = (8192, 4096, 131072)  # (N, H, V): the issue's >= 50 % tensor-core target
# Trimmed to about 1.5 minutes of GPU time: the target, a small and the largest corner of the grid.
GPU_SHAPES = (TARGET_SHAPE, (4096, 2048, 131072), (16384, 4096, 262144))
GPU_QUICK_SHAPES = ((4096, 2048, 131072),)
CPU_TIME_SHAPES = ((256, 128, 8192), (512, 256, 16384))
CPU_QUICK_TIME_SHAPES = ((128, 64, 4096),)
CPU_MEMORY_SHAPE = (2048, 256, 65536)
CPU_QUICK_MEMORY_SHAPE = (512, 256, 32768)
# (BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages) candidates per kernel, the default first.
STATS_SWEEP = ((64, 64, 32, 8, 3), (64, 128, 32, 8, 3), (64, 128, 64, 8, 3), (128, 64, 64, 8, 3), (64, 64, 64, 4, 3),
               (128, 128, 32, 16, 2))  # the last spills (see the module docstring): a measured hypothesis
# The statistics kernel's (vocabulary splits per token block, token blocks per group) against the default rule
# (kernels.stats_schedule: 32 splits, groups of 8 at this shape): the rule before it, and two neighbours.
STATS_SCHEDULE_SWEEP = {"splits=4,group=8 (the previous rule)": (4, 8), "splits=16,group=8": (16, 8),
                        "splits=32,group=16": (32, 16), "splits=128,group=8": (128, 8)}
GRAD_SWEEP = ((64, 128, 32, 8, 3), (64, 128, 64, 8, 3), (128, 64, 64, 8, 3), (128, 128, 64, 16, 3), (64, 64, 64, 4, 3))
# (BLOCK_N, BLOCK_H, BLOCK_K, num_warps, num_stages) of the compensated d_hidden accumulation (aligned tiles).
GRAD_HIDDEN_SWEEP = ((128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 64, 32, 8, 2))
# Eager / torch.compile at the largest GPU shapes materialise tens of GiB of fp32 logits.
EAGER_MAX_ELEMENTS = 16384 * 131072

NOTES = (
    "Distillation from hidden states: student h_s [N, H] @ W_s [V, H].T vs teacher h_t [N, H] @ W_t [V, H].T, "
    f"divergence jsd (beta={JSD_BETA}), gradients to h_s and W_s. FLOPs (the TFLOP/s column, every impl): the "
    "issue's count, 2·N·V·(Hs+Ht) forward + 2·N·V·(Hs+Ht) backward recompute + 4·N·V·Hs = 12·N·V·H, a common "
    "unit of work; what each impl does differs: ours 16·N·V·H (the JSD's two forward sweeps), eager and "
    "torch.compile 8·N·V·H (they keep the logits). "
    "Memory *floor* = inputs + gradients of h_s and W_s; [N, V] fp32 = 4·N·V bytes is the reference for the "
    "extra-memory target (< 2 %)."
)


def eager_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, beta: float = JSD_BETA):
    """mean over rows of beta KL(p || m) + (1 - beta) KL(q || m), logits materialised (TRL's formula)."""
    log_q = torch.log_softmax((student_hidden @ student_weight.T).float(), dim=-1)
    with torch.no_grad():
        log_p = torch.log_softmax((teacher_hidden @ teacher_weight.T).float(), dim=-1)
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)]), dim=0)
    kl_teacher = (log_p.exp() * (log_p - log_m)).sum(-1)
    kl_student = (log_q.exp() * (log_q - log_m)).sum(-1)
    return (beta * kl_teacher + (1 - beta) * kl_student).mean()


_COMPILED: list[Callable] = []


def compiled_loss() -> Callable:
    if not _COMPILED:
        _COMPILED.append(torch.compile(eager_loss, dynamic=False))
    return _COMPILED[0]


def ours_loss(impl: str, strategy: str = "tiles", accumulation: str = "compensated",
              entropy: bool = False) -> Callable:
    def loss(student_hidden, student_weight, teacher_hidden, teacher_weight):
        with triton_strategy(strategy, accumulation=accumulation):
            result = fused_linear_kl_div(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                         divergence="jsd", beta=JSD_BETA, impl=impl, return_entropy=entropy)
        return result[0] if entropy else result  # the entropy as TRL's loss also computes it

    return loss


def liger_loss() -> Callable:
    from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD

    # beta = 0.5: the symmetric JSD, whichever side each library's beta weighs.
    module = LigerFusedLinearJSD(jsd_beta=JSD_BETA, temperature=1.0)

    def loss(student_hidden, student_weight, teacher_hidden, teacher_weight):
        return module(student_hidden, student_weight, teacher_hidden, teacher_weight, None)

    return loss


def trl_chunked_loss() -> Callable:
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    def loss(student_hidden, student_weight, teacher_hidden, teacher_weight):
        mask = torch.ones(1, student_hidden.shape[0], device=student_hidden.device)
        return _chunked_divergence_loss(student_hidden[None], teacher_hidden[None], student_weight, teacher_weight,
                                        mask, JSD_BETA)[0]

    return loss


def _trl_chunked_unavailable() -> str | None:
    if importlib.util.find_spec("trl") is None:
        return "trl not installed (the `dev` extra)"
    try:
        module = importlib.import_module("trl.trainer.distillation_trainer")
    except ImportError as error:
        return f"this trl has no DistillationTrainer ({error})"
    if not hasattr(module, "_chunked_divergence_loss"):
        return "this trl's DistillationTrainer has no _chunked_divergence_loss"
    return None


def make_inputs(rows: int, hidden: int, vocab: int, dtype: torch.dtype, device: str, seed: int = 0):
    """h ~ N(0, 1), W ~ N(0, 4 / H): logits of std ~2 on both sides."""
    generator = torch.Generator(device=device).manual_seed(seed)
    scale = 2.0 / math.sqrt(hidden)
    student_hidden = torch.randn(rows, hidden, device=device, dtype=dtype, generator=generator)
    student_weight = torch.randn(vocab, hidden, device=device, dtype=dtype, generator=generator).mul_(scale)
    teacher_hidden = torch.randn(rows, hidden, device=device, dtype=dtype, generator=generator)
    teacher_weight = torch.randn(vocab, hidden, device=device, dtype=dtype, generator=generator).mul_(scale)
    return student_hidden, student_weight, teacher_hidden, teacher_weight


def _pass_setup(make_loss, rows, hidden, vocab, dtype, device, *, forward_only: bool):
    def setup() -> Callable[[], object]:
        loss_fn = make_loss()
        student_hidden, student_weight, teacher_hidden, teacher_weight = make_inputs(rows, hidden, vocab, dtype, device)
        student_hidden.requires_grad_(True)
        student_weight.requires_grad_(True)

        def forward_pass():
            return loss_fn(student_hidden, student_weight, teacher_hidden, teacher_weight)

        def full_pass():
            loss_fn(student_hidden, student_weight, teacher_hidden, teacher_weight).backward()
            student_hidden.grad = None
            student_weight.grad = None

        return forward_pass if forward_only else full_pass

    return setup


def _unavailable(device: str) -> dict[str, str]:
    skipped = {}
    if device != "cuda":
        skipped["ours_triton"] = "needs CUDA (the Triton interpreter is a test path, not a benchmark)"
        skipped["ours_triton_gemm"] = skipped["ours_triton_fp32acc"] = skipped["ours_triton"]
        skipped["ours_triton_entropy"] = skipped["ours_triton"]
        skipped["liger"] = "Liger-Kernel needs CUDA"
    elif importlib.util.find_spec("liger_kernel") is None:
        skipped["liger"] = "liger_kernel not installed (pip install liger-kernel, the `bench` extra)"
    trl_reason = _trl_chunked_unavailable()
    if trl_reason:
        skipped["trl_chunked"] = trl_reason
    return skipped


def fused_linear_case(rows, hidden, vocab, dtype, device, *, impls, skipped=None, measure_cpu_memory=False,
                      time_passes=True) -> Case:
    skipped = {**_unavailable(device), **(skipped or {})}
    makers = {
        "ours_triton": lambda: ours_loss("triton"),
        "ours_triton_gemm": lambda: ours_loss("triton", "gemm"),
        "ours_triton_fp32acc": lambda: ours_loss("triton", accumulation="fp32"),
        "ours_torch": lambda: ours_loss("torch"),
        "ours_triton_entropy": lambda: ours_loss("triton", entropy=True),
        "ours_torch_entropy": lambda: ours_loss("torch", entropy=True),
        "eager": lambda: eager_loss,
        "torch_compile": compiled_loss,
        "liger": liger_loss,
        "trl_chunked": trl_chunked_loss,
    }
    runnable = [name for name in impls if name not in skipped]
    itemsize = torch.finfo(dtype).bits // 8
    inputs_bytes = (2 * rows * hidden + 2 * vocab * hidden) * itemsize
    grads_bytes = (rows * hidden + vocab * hidden) * itemsize
    return Case(
        op=OP,
        params={"N": rows, "H": hidden, "V": vocab, "dtype": DTYPE_NAMES[dtype], "divergence": "jsd"},
        impls={name: _pass_setup(makers[name], rows, hidden, vocab, dtype, device, forward_only=False)
               for name in runnable},
        forward_impls={name: _pass_setup(makers[name], rows, hidden, vocab, dtype, device, forward_only=True)
                       for name in runnable},
        # One count for every impl, the issue's (12·N·V·H), as the Targets section uses it: a common unit of useful
        # work (ours does more: two forward sweeps for the JSD, 16·N·V·H; eager and compile keep the logits,
        # 8·N·V·H).
        flops=issue_flops(rows, hidden, vocab),
        bytes_moved=inputs_bytes + grads_bytes,
        memory_floor_bytes=inputs_bytes + grads_bytes,
        output_bytes=4 * rows * vocab,  # extra_memory_over_output = extra / one [N, V] fp32 tensor
        measure_cpu_memory=measure_cpu_memory,
        time_passes=time_passes,
        skipped={name: reason for name, reason in skipped.items() if name in impls},
        notes=NOTES,
    )


def _config_name(kernel: str, config: tuple[int, ...], default: tuple[int, ...]) -> str:
    block_n, block_v, block_h, num_warps, num_stages = config
    name = f"{kernel} {block_n}x{block_v}x{block_h},w{num_warps},s{num_stages}"
    return name + (" (default)" if config == default else "")


def sweep_case(rows: int, hidden: int, vocab: int, dtype: torch.dtype, device: str) -> Case:
    """Forward-only launches of the statistics kernel (forward KL) and of one backward dL/dz chunk per config."""
    from distill_ops.kernels import fused_linear as kernels

    def stats_setup(config, schedule=None):
        def setup() -> Callable[[], object]:
            student_hidden, student_weight, teacher_hidden, teacher_weight = make_inputs(
                rows, hidden, vocab, dtype, device)
            return lambda: kernels.fused_linear_stats(
                student_hidden, student_weight, None, teacher_hidden, teacher_weight, None, None, None,
                divergence="forward", coef=0.0, temperature=1.0, has_ce=False, configs=(config, config),
                schedule=schedule)

        return setup

    def grad_setup(config):
        def setup() -> Callable[[], object]:
            student_hidden, student_weight, teacher_hidden, teacher_weight = make_inputs(
                rows, hidden, vocab, dtype, device)
            _, _, row_stats = kernels.fused_linear_stats(
                student_hidden, student_weight, None, teacher_hidden, teacher_weight, None, None, None,
                divergence="forward", coef=0.0, temperature=1.0, has_ce=False)
            scale = torch.full((rows,), 1.0 / rows, device=device)
            chunk = min(kernels.grad_chunk_columns(rows, vocab, config[1]), vocab)
            grad = torch.empty(rows, chunk, device=device, dtype=dtype)
            def launch() -> torch.Tensor:
                kernels.fused_linear_grad_logits(
                    student_hidden, student_weight, None, teacher_hidden, teacher_weight, None, None, None,
                    row_stats, scale, None, grad, 0, divergence="forward", coef=0.0, temperature=1.0, config=config)
                return grad

            return launch

        return setup

    def accumulate_setup(config):
        """One chunk's d_hidden update (not the first, not the last): the compensated Triton GEMM with
        ``config``, or (``None``) cuBLAS into an fp32 accumulator."""
        def setup() -> Callable[[], object]:
            from distill_ops.fused_linear import _accumulate_mm

            student_hidden, student_weight, _, _ = make_inputs(rows, hidden, vocab, dtype, device)
            chunk = min(kernels.grad_chunk_columns(rows, vocab, kernels.default_config(dtype, "grad")[1]), vocab)
            grad = student_hidden.new_empty(rows, chunk).normal_(0.0, 1e-4)
            weight_chunk = student_weight[:chunk]
            # Each launch returns (running sum, its bf16 error half or None, the chunk's dz, its weight rows).
            if config is None:
                accumulator = torch.zeros(rows, hidden, dtype=torch.float32, device=device)

                def launch_cublas():
                    _accumulate_mm(accumulator, grad, weight_chunk)
                    return accumulator, None, grad, weight_chunk

                return launch_cublas
            hi = torch.zeros(rows, hidden, dtype=dtype, device=device)
            lo = torch.zeros(rows, hidden, dtype=torch.bfloat16, device=device)

            def launch_compensated():
                kernels.accumulate_grad_hidden(hi, lo, grad, weight_chunk, first=False, last=False, config=config)
                return hi, lo, grad, weight_chunk

            return launch_compensated

        return setup

    # The candidates are 16-bit configurations: mark the 16-bit defaults (also when a CPU test passes fp32).
    stats_default = kernels.default_config(torch.bfloat16, "stats")
    grad_default = kernels.default_config(torch.bfloat16, "grad")
    impls = {_config_name("stats", c, stats_default): stats_setup(c) for c in STATS_SWEEP}
    impls.update({f"stats {name} (default tiles)": stats_setup(stats_default, schedule)
                  for name, schedule in STATS_SCHEDULE_SWEEP.items()})
    impls.update({_config_name("grad chunk", c, grad_default): grad_setup(c) for c in GRAD_SWEEP})
    accumulate_default = kernels.GRAD_HIDDEN_CONFIGS["aligned"]
    impls.update({_config_name("d_hidden chunk", c, accumulate_default): accumulate_setup(c)
                  for c in GRAD_HIDDEN_SWEEP})
    impls["d_hidden chunk cuBLAS fp32"] = accumulate_setup(None)
    return Case(
        op=SWEEP_OP,
        params={"N": rows, "H": hidden, "V": vocab, "dtype": DTYPE_NAMES[dtype], "divergence": "forward"},
        impls=impls,
        forward_only=True,
        notes=("Launch-configuration sweep of the two Triton kernels (forward KL): `stats` = the statistics kernel "
               "over the whole vocabulary (both logits GEMMs: 4·N·V·H FLOPs; `splits=...,group=...` rows: the default "
               "tiles under another schedule of vocabulary splits per token block and token blocks per group), `grad chunk` = one backward dL/dz chunk "
               "(kernels.grad_chunk_columns columns). Config = BLOCK_N x BLOCK_V x BLOCK_H, warps, stages. "
               "`d_hidden chunk` = that chunk's d_hidden update (2·N·chunk·H FLOPs): the compensated Triton GEMM "
               "(BLOCK_N x BLOCK_H x BLOCK_K) or cuBLAS into fp32."),
    )


def issue_flops(rows: int, hidden: int, vocab: int) -> int:
    """The issue's FLOP count of a full pass (Hs = Ht = H): forward 2·N·V·(Hs+Ht), backward the recompute
    2·N·V·(Hs+Ht) plus the two gradient GEMMs 4·N·V·Hs."""
    return 2 * rows * vocab * (2 * hidden) * 2 + 4 * rows * vocab * hidden


def summarize_results(results: list[dict], meta: dict) -> str:
    """The issue's three GPU targets at the target shape, from the measured time and memory, per strategy."""
    if meta["device"] != "cuda":
        return ""
    rows_, hidden_, vocab_ = TARGET_SHAPE
    params = {"N": rows_, "H": hidden_, "V": vocab_, "dtype": "bf16", "divergence": "jsd"}
    by_impl = {r["impl"]: r for r in results if r["op"] == OP and r["params"] == params}
    lines = [f"**fused_linear_kl_div targets at N={rows_}, H={hidden_}, V={vocab_}, bf16, jsd "
             f"({meta.get('device_name', meta['device'])})**", "", "| impl | target | measured | status |",
             "|---|---|---|---|"]
    liger = by_impl.get("liger")
    for impl in ("ours_triton", "ours_triton_gemm", "ours_triton_fp32acc"):
        ours = by_impl.get(impl)
        if ours is None or ours.get("full_ms") is None:
            lines.append(f"| {impl} | all | not measured | - |")
            continue
        peak = meta.get("peak_bf16_flops")
        if peak:
            fraction = issue_flops(rows_, hidden_, vocab_) / (ours["full_ms"] * 1e-3) / peak
            status = "met" if fraction >= 0.5 else "**missed**"
            lines.append(f"| {impl} | ≥ 50 % of bf16 dense peak (issue FLOPs 12·N·V·H) | {100 * fraction:.1f} % | "
                         f"{status} |")
        else:
            lines.append(f"| {impl} | ≥ 50 % of bf16 dense peak (issue FLOPs 12·N·V·H) | not measured (no peak "
                         f"known for this device) | - |")
        if liger is not None and liger.get("full_ms") is not None:
            speedup = liger["full_ms"] / ours["full_ms"]
            lines.append(f"| {impl} | ≥ 2× faster than Liger's fused linear JSD | {speedup:.2f}× | "
                         f"{'met' if speedup >= 2 else '**missed**'} |")
        else:
            lines.append(f"| {impl} | ≥ 2× faster than Liger's fused linear JSD | not measured | - |")
        if ours.get("case_memory_bytes") is not None and ours.get("memory_floor_bytes"):
            over_floor = (ours["case_memory_bytes"] - ours["memory_floor_bytes"]) / (4 * rows_ * vocab_)
            lines.append(f"| {impl} | extra peak memory (case − floor) < 2 % of one [N, V] fp32 tensor | "
                         f"{100 * over_floor:.1f} % | {'met' if over_floor < 0.02 else '**missed**'} |")
    return "\n".join(lines + [""])


def cases(device: str, quick: bool) -> list[Case]:
    """fused_linear_kl_div cases for ``device`` (CPU always gets its small shapes)."""
    # Ours and the targets' baselines first (a module's share of the time budget can end within the target case),
    # then the variants to compare.
    all_impls = ("ours_triton", "liger", "torch_compile", "eager", "ours_triton_gemm", "ours_triton_fp32acc",
                 "ours_triton_entropy", "ours_torch", "trl_chunked")
    if device == "cuda":
        result = []
        for rows, hidden, vocab in GPU_QUICK_SHAPES if quick else GPU_SHAPES:
            skipped = {"ours_torch": "fallback is a correctness path: not timed at GPU shapes (time budget)"}
            if (rows, hidden, vocab) != TARGET_SHAPE or quick:
                skipped["torch_compile"] = "compiled at the target shape only (compile time, GPU time budget)"
                skipped["ours_triton_fp32acc"] = "the fp32 d_hidden accumulator is compared at the target shape only"
                skipped["ours_triton_entropy"] = "the entropy variant is compared at the target shape only"
            if rows * vocab > EAGER_MAX_ELEMENTS:
                skipped["eager"] = skipped["torch_compile"] = "materialised logits exceed the memory budget"
            result.append(fused_linear_case(rows, hidden, vocab, torch.bfloat16, device, impls=all_impls,
                                            skipped=skipped))
            if (rows, hidden, vocab) == TARGET_SHAPE:
                result.append(sweep_case(rows, hidden, vocab, torch.bfloat16, device))
        return result
    result = [
        fused_linear_case(rows, hidden, vocab, torch.float32, device,
                          impls=("ours_torch", "ours_torch_entropy", "eager", "trl_chunked"))
        for rows, hidden, vocab in (CPU_QUICK_TIME_SHAPES if quick else CPU_TIME_SHAPES)
    ]
    rows, hidden, vocab = CPU_QUICK_MEMORY_SHAPE if quick else CPU_MEMORY_SHAPE
    # Memory only: its passes take 10 to 20 s each on two cores (the smaller cases are timed).
    result.append(fused_linear_case(rows, hidden, vocab, torch.float32, device,
                                    impls=("ours_torch", "eager", "trl_chunked"), measure_cpu_memory=True,
                                    time_passes=False))
    return result
