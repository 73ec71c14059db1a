"""Benchmarks of ``distill_ops.topk_kl_div`` (sparse and dense teachers) against the eager formulation.

Impls per case (a full pass is loss forward + backward to the student logits; forward KL):

* ``ours_triton_sparse``: stored sparse teacher (``teacher_topk_indices`` int64 + ``teacher_topk_logprobs``
  fp32), ``impl="triton"`` (CUDA only).
* ``ours_triton_dense``: dense teacher logits + ``k``; our radix-select kernel (``kernels/topk_select.py``,
  usually two reads of the teacher row) selects the kept set, then the same loss kernel (CUDA only).
* ``ours_torch_sparse``: the PyTorch fallback with the sparse teacher.
* ``eager_sparse`` / ``eager_dense``: what a user writes (DistillKit-style): ``gather`` the student logits at
  the teacher's indices (after ``topk`` of the teacher for the dense form), ``log_softmax`` of both in fp32,
  the KL, the mean. ``tail="bucket"`` cases use the full-vocabulary ``log_softmax`` of the student instead.
* ``torch_compile_sparse`` / ``torch_compile_dense``: ``torch.compile`` of those formulas (one case each:
  compiling costs more device time than the rest of the run).

GPU (bf16): renormalize tail at N=16384, V=131072, k in {16, 64, 256}; k=64 at (4096, 131072),
(4096, 262144), (16384, 262144); the bucket tail at N=16384, V=131072, k=64. The issue's full grid
N in {4k, 16k} x V in {128k, 256k} x k in {16, 64, 256} is trimmed to these so that the GPU run stays
short. CPU: small fp32 shapes.
"""

from __future__ import annotations

from typing import Callable

import torch

from benchmarks.harness import Case
from benchmarks.harness import target_status as _status
from distill_ops.topk_kl import topk_kl_div

OP = "topk_kl_div"
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

# (N, V, k, tail) on the GPU; the first entries carry the targets.
GPU_CASES = (
    (16384, 131072, 64, "renormalize"),
    (16384, 131072, 16, "renormalize"),
    (16384, 131072, 256, "renormalize"),
    (4096, 131072, 64, "renormalize"),
    (4096, 262144, 64, "renormalize"),
    (16384, 262144, 64, "renormalize"),
    (16384, 131072, 64, "bucket"),
)
GPU_QUICK_CASES = ((4096, 131072, 64, "renormalize"), (4096, 131072, 64, "bucket"))
TARGET_CASE = (16384, 131072, 64, "renormalize")
GPU_COMPILE_CASE = TARGET_CASE  # torch.compile is timed here only
GPU_FALLBACK_ROWS = 4096  # the fallback is a correctness path: timed at the smaller N only
CPU_CASES = ((256, 32000, 64, "renormalize"), (1024, 32000, 64, "renormalize"), (256, 32000, 64, "bucket"))
CPU_QUICK_CASES = ((128, 8192, 32, "renormalize"), (128, 8192, 32, "bucket"))

NOTES = (
    "Traffic models (itemsize = 2 in bf16): *% HBM* uses the issue's sparse roofline, bytes_moved = "
    "2·N·V·itemsize (student read once, gradient written once; 4·N·V bytes in bf16) + the teacher's N·k "
    "entries (12 bytes each: int64 index + fp32 log-prob). Our renormalize / label kernels do not read the "
    "student row at all (they gather k logits and write the gradient row), so they can exceed that "
    "'roofline'; *write-only* = N·V·itemsize + teacher entries is their floor. The bucket kernel streams the "
    "student twice (log-sum-exp, then gradient): *two-pass* = 3·N·V·itemsize. The dense forms also read the "
    "teacher (our selection kernel reads it about twice; one read in the model): *dense* = 3·N·V·itemsize. eager = gather + fp32 log_softmax (topk of the teacher first "
    "for the dense form), as a user writes it. Memory *floor* = student + gradient + the teacher's entries; the "
    "dense forms also hold the [N, V] teacher (N·V·itemsize more in their case memory)."
)


# --------------------------------------------------------------------------------------------------
# The baseline formulas, written as a user would
# --------------------------------------------------------------------------------------------------


def eager_sparse(student_logits: torch.Tensor, indices: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """mean over rows of KL(p || q) over the stored top-k, both renormalised over it, fp32."""
    log_q = torch.log_softmax(student_logits.gather(-1, indices).float(), dim=-1)
    log_p = torch.log_softmax(logprobs.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def eager_sparse_bucket(student_logits: torch.Tensor, indices: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """Top-k + one rest bucket, the student from its full-vocabulary log-softmax, fp32."""
    log_q = torch.log_softmax(student_logits.float(), dim=-1).gather(-1, indices)
    log_p = logprobs.float()
    rest_p = (1 - log_p.exp().sum(-1)).clamp_min(1e-30)
    rest_q = (1 - log_q.exp().sum(-1)).clamp_min(1e-30)
    kept = (log_p.exp() * (log_p - log_q)).sum(-1)
    return (kept + rest_p * (rest_p.log() - rest_q.log())).mean()


def eager_dense(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int) -> torch.Tensor:
    """topk of the teacher, then :func:`eager_sparse` on its renormalised top-k."""
    values, indices = teacher_logits.topk(k, dim=-1)
    return eager_sparse(student_logits, indices, values.float())


def eager_dense_bucket(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int) -> torch.Tensor:
    values, indices = teacher_logits.topk(k, dim=-1)
    logprobs = values.float() - torch.logsumexp(teacher_logits.float(), dim=-1, keepdim=True)
    return eager_sparse_bucket(student_logits, indices, logprobs)


_COMPILED: dict[str, Callable] = {}


def _compiled(name: str, fn: Callable) -> Callable:
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, dynamic=False)
    return _COMPILED[name]


# --------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------


def make_inputs(rows: int, vocab: int, k: int, dtype: torch.dtype, device: str, seed: int = 0):
    """Student and teacher logits [rows, vocab] (std 2) and the teacher's stored top-k (int64, fp32)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    student = torch.randn(rows, vocab, device=device, dtype=dtype, generator=generator).mul_(2.0)
    teacher = torch.randn(rows, vocab, device=device, dtype=dtype, generator=generator).mul_(2.0)
    values, indices = teacher.topk(k, dim=-1)
    logprobs = values.float() - torch.logsumexp(teacher.float(), dim=-1, keepdim=True)
    return student, teacher, indices, logprobs


def _loss_maker(impl_name: str, k: int, tail: str) -> Callable[[], Callable]:
    """impl name -> factory of loss(student, teacher, indices, logprobs)."""
    bucket = tail == "bucket"
    sparse_formula = eager_sparse_bucket if bucket else eager_sparse
    dense_formula = eager_dense_bucket if bucket else eager_dense

    def ours(backend: str, form: str) -> Callable:
        def loss(student, teacher, indices, logprobs):
            if form == "sparse":
                return topk_kl_div(student, teacher_topk_indices=indices, teacher_topk_logprobs=logprobs, tail=tail,
                                   impl=backend)
            return topk_kl_div(student, teacher, k=k, tail=tail, impl=backend)

        return loss

    makers = {
        "ours_triton_sparse": lambda: ours("triton", "sparse"),
        "ours_triton_dense": lambda: ours("triton", "dense"),
        "ours_torch_sparse": lambda: ours("torch", "sparse"),
        "eager_sparse": lambda: (lambda s, t, i, lp: sparse_formula(s, i, lp)),
        "eager_dense": lambda: (lambda s, t, i, lp: dense_formula(s, t, k)),
        "torch_compile_sparse": lambda: (
            lambda s, t, i, lp: _compiled(f"sparse-{tail}", sparse_formula)(s, i, lp)
        ),
        "torch_compile_dense": lambda: (lambda s, t, i, lp: _compiled(f"dense-{tail}-{k}", dense_formula)(s, t, k)),
    }
    return makers[impl_name]


def _setup(impl_name: str, rows: int, vocab: int, k: int, tail: str, dtype: torch.dtype, device: str,
           forward_only: bool) -> Callable[[], Callable[[], object]]:
    def setup() -> Callable[[], object]:
        loss_fn = _loss_maker(impl_name, k, tail)()
        student, teacher, indices, logprobs = make_inputs(rows, vocab, k, dtype, device)
        if impl_name.endswith("_sparse"):
            # The sparse forms read only the stored entries: holding the dense teacher they were taken from put
            # N·V·itemsize into their case memory (1.50x the floor on the H200; a harness review, 2026-12-07).
            teacher = None
        student.requires_grad_(True)

        def forward_pass():
            return loss_fn(student, teacher, indices, logprobs)

        def full_pass() -> None:
            loss_fn(student, teacher, indices, logprobs).backward()
            student.grad = None

        return forward_pass if forward_only else full_pass

    return setup


def topk_case(rows: int, vocab: int, k: int, tail: str, dtype: torch.dtype, device: str,
              impls: tuple[str, ...], skipped: dict[str, str]) -> Case:
    runnable = [name for name in impls if name not in skipped]
    itemsize = torch.finfo(dtype).bits // 8
    elements = rows * vocab
    teacher_entry_bytes = rows * k * 12
    return Case(
        op=OP,
        params={"N": rows, "V": vocab, "k": k, "tail": tail, "dtype": DTYPE_NAMES[dtype]},
        impls={name: _setup(name, rows, vocab, k, tail, dtype, device, False) for name in runnable},
        forward_impls={name: _setup(name, rows, vocab, k, tail, dtype, device, True) for name in runnable},
        bytes_moved=2 * elements * itemsize + teacher_entry_bytes,
        bytes_models={
            "write-only": elements * itemsize + teacher_entry_bytes,
            "two-pass": 3 * elements * itemsize + teacher_entry_bytes,
            "dense": 3 * elements * itemsize,
        },
        memory_floor_bytes=2 * elements * itemsize + teacher_entry_bytes,
        output_bytes=elements * itemsize,
        skipped={name: reason for name, reason in skipped.items() if name in impls},
        notes=NOTES,
    )


ALL_IMPLS = (
    "ours_triton_sparse", "ours_triton_dense", "ours_torch_sparse", "eager_sparse", "eager_dense",
    "torch_compile_sparse", "torch_compile_dense",
)


SELECT_OP = "topk_select"


def select_case(rows: int, vocab: int, k: int, dtype: torch.dtype, device: str) -> Case:
    """The dense teacher's selection alone: our radix-select kernel vs ``torch.topk`` (forward only)."""
    from distill_ops.kernels.topk_select import topk_select

    def setup(impl: str):
        def make() -> Callable[[], object]:
            _, teacher, _, _ = make_inputs(rows, vocab, k, dtype, device)
            if impl == "ours_triton":
                return lambda: topk_select(teacher, k)
            return lambda: torch.topk(teacher, k, dim=-1, sorted=False)

        return make

    itemsize = torch.finfo(dtype).bits // 8
    return Case(
        op=SELECT_OP,
        params={"N": rows, "V": vocab, "k": k, "dtype": DTYPE_NAMES[dtype]},
        impls={"ours_triton": setup("ours_triton"), "torch_topk": setup("torch_topk")},
        forward_only=True,
        bytes_moved=rows * vocab * itemsize,  # one read of the teacher (ours usually reads it twice)
        notes="Selection of the dense teacher's top-k alone: `distill_ops.kernels.topk_select.topk_select` (radix "
              "select, rows in ascending index order) vs `torch.topk(sorted=False)`. % HBM: one read of the teacher.",
    )


def cases(device: str, quick: bool) -> list[Case]:
    """topk_kl_div benchmark cases for ``device`` (``"cuda"`` or ``"cpu"``; CPU always gets its small shapes)."""
    if device == "cuda":
        dtype = torch.bfloat16
        shapes = GPU_QUICK_CASES if quick else GPU_CASES
        compile_case = None if quick else GPU_COMPILE_CASE
    else:
        dtype = torch.float32
        shapes = CPU_QUICK_CASES if quick else CPU_CASES
        compile_case = None
    result = []
    for rows, vocab, k, tail in shapes:
        skipped = {}
        if device != "cuda":
            reason = "needs CUDA (the Triton interpreter is a test path, not a benchmark)"
            skipped["ours_triton_sparse"] = reason
            skipped["ours_triton_dense"] = reason
        elif rows > GPU_FALLBACK_ROWS:
            skipped["ours_torch_sparse"] = f"fallback timed on GPU at N={GPU_FALLBACK_ROWS} only (time budget)"
        if (rows, vocab, k, tail) != compile_case:
            reason = "torch.compile timed at one case only (compile time)"
            skipped["torch_compile_sparse"] = reason
            skipped["torch_compile_dense"] = reason
        result.append(topk_case(rows, vocab, k, tail, dtype, device, ALL_IMPLS, skipped))
    if device == "cuda":
        rows, vocab, k, _ = shapes[0]
        result.append(select_case(rows, vocab, k, dtype, device))
    return result


# --------------------------------------------------------------------------------------------------
# Targets (issue 5), checked against the measured results
# --------------------------------------------------------------------------------------------------


def _find(results: list[dict], impl: str, **params) -> dict | None:
    for result in results:
        if result["op"] == OP and result["impl"] == impl and all(result["params"].get(k) == v for k, v in params.items()):
            return result
    return None


def _ms(result: dict | None) -> float | None:
    return result["full_ms"] if result and not result.get("skipped") and result.get("full_ms") else None


def summarize_results(results: list[dict], meta: dict) -> str:
    """Markdown table of the issue's GPU targets: measured value and met / missed / not measured."""
    if meta["device"] != "cuda":
        return ""
    n, v, k, tail = TARGET_CASE
    shape = dict(N=n, V=v, k=k, tail=tail, dtype="bf16")
    sparse = _find(results, "ours_triton_sparse", **shape)
    dense_ms = _ms(_find(results, "ours_triton_dense", **shape))
    sparse_ms = _ms(sparse)
    fraction = sparse["hbm_fraction"] if sparse_ms and sparse.get("hbm_fraction") is not None else None
    # renormalize / label do not read the student row: above 100 % of the model, so its floor is shown too.
    floor = (sparse.get("bytes_models", {}).get("write-only", {}).get("hbm_fraction")
             if fraction is not None and tail in ("renormalize", "label") else None)
    fraction_text = "-" if fraction is None else f"{100 * fraction:.0f} %"
    if floor is not None:
        fraction_text += (f" ({100 * floor:.0f} % of this kernel's floor, the gradient write alone: it does not read "
                          "the student row)")
    eager_sparse_ms = _ms(_find(results, "eager_sparse", **shape))
    eager_dense_ms = _ms(_find(results, "eager_dense", **shape))
    sparse_speedup = eager_sparse_ms / sparse_ms if eager_sparse_ms and sparse_ms else None
    dense_speedup = eager_dense_ms / dense_ms if eager_dense_ms and dense_ms else None
    rows = [
        ("sparse path ≥ 80 % of its roofline (4·N·V bytes + teacher entries)",
         fraction_text, _status(fraction, fraction is not None and fraction >= 0.8)),
        ("sparse path ≥ 3× faster than eager", "-" if sparse_speedup is None else f"{sparse_speedup:.2f}×",
         _status(sparse_speedup, sparse_speedup is not None and sparse_speedup >= 3.0)),
        ("dense path ≥ 2× faster than eager top-k + loss", "-" if dense_speedup is None else f"{dense_speedup:.2f}×",
         _status(dense_speedup, dense_speedup is not None and dense_speedup >= 2.0)),
    ]
    title = f"topk_kl_div targets at N={n}, V={v}, k={k}, {tail}, bf16 ({meta['device_name']})"
    lines = [f"**{title}**", "", "| target | measured | status |", "|---|---|---|"]
    lines += [f"| {target} | {value} | {status} |" for target, value, status in rows]
    return "\n".join(lines)
