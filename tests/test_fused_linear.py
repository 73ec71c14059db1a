"""fused_linear_kl_div / FusedLinearKLDivLoss: parity with kl_div on explicit float64 logits, memory, bad input."""

import contextlib
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import distill_ops.fused_linear as fused_linear_module
import distill_ops.kernels.fused_linear as fused_linear_kernels
from distill_ops._utils import reduce_rows
from distill_ops.fused_linear import FusedLinearKLDivLoss, _Inputs, fused_linear_backward_triton, fused_linear_kl_div
from distill_ops.kl_div import DIVERGENCES, kl_div_reference
from tests.conftest import DEVICE, IMPLS, RecordTensorOps, assert_close

REPO_ROOT = Path(__file__).resolve().parents[1]


def _randn(shape, dtype, seed, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def _case(leading, hs, vocab, dtype, *, ht=None, teacher_vocab=None, biases=False, teacher_logits=False, seed=0):
    """Inputs of one call: logits of std ~2 (hidden ~N(0, 1), weights ~N(0, 4 / H))."""
    teacher_vocab = teacher_vocab or vocab
    case = {
        "student_hidden": _randn((*leading, hs), dtype, seed),
        "student_weight": _randn((vocab, hs), dtype, seed + 1, scale=2.0 / hs**0.5),
    }
    if biases:
        case["student_bias"] = _randn((vocab,), dtype, seed + 2)
    if teacher_logits:
        case["teacher_logits"] = _randn((*leading, teacher_vocab), dtype, seed + 3, scale=2.0)
    else:
        ht = ht or hs
        case["teacher_hidden"] = _randn((*leading, ht), dtype, seed + 4)
        case["teacher_weight"] = _randn((teacher_vocab, ht), dtype, seed + 5, scale=2.0 / ht**0.5)
        if biases:
            case["teacher_bias"] = _randn((teacher_vocab,), dtype, seed + 6)
    return case


def _labels(leading, vocab, seed, ignored=((0,), (3,))):
    labels = torch.randint(0, vocab, leading, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    flat = labels.view(-1)
    for index in ignored:
        flat[index[0] % flat.numel()] = -100
    return labels


GRAD_INPUTS = ("student_hidden", "student_weight", "student_bias")
# "triton_gemm": the Triton path with TRITON_STRATEGY = "gemm" and chunks small enough that every test shape
# spans several of them.
FL_IMPLS = IMPLS + ["triton_gemm"]


@contextlib.contextmanager
def _strategy(impl):
    if impl == "triton_fp32acc":  # 16-bit d_hidden through an fp32 accumulator instead of the compensated pair
        with fused_linear_module.triton_strategy(accumulation="fp32"):
            yield "triton"
        return
    if impl != "triton_gemm":
        yield impl
        return
    saved = fused_linear_kernels.GEMM_CHUNK_ELEMENTS
    # 37 * 128 elements: 128-column chunks of two 64-wide tiles at N = 37, several chunks at every test shape.
    fused_linear_kernels.GEMM_CHUNK_ELEMENTS = 37 * 128
    try:
        with fused_linear_module.triton_strategy("gemm"):
            yield "triton"
    finally:
        fused_linear_kernels.GEMM_CHUNK_ELEMENTS = saved


def _run(case, impl, upstream_seed=7, frozen=(), **kwargs):
    """Loss and gradients of the three student inputs (but those ``frozen``), backward with an upstream gradient
    != 1."""
    inputs = {k: (v.detach().clone().requires_grad_(k in GRAD_INPUTS and k not in frozen)) for k, v in case.items()}
    with _strategy(impl) as backend:
        loss = fused_linear_kl_div(
            inputs["student_hidden"], inputs["student_weight"], inputs.get("teacher_hidden"),
            inputs.get("teacher_weight"), teacher_logits=inputs.get("teacher_logits"),
            student_bias=inputs.get("student_bias"), teacher_bias=inputs.get("teacher_bias"), impl=backend, **kwargs,
        )
        upstream = 0.5 + torch.rand(loss.shape, generator=torch.Generator().manual_seed(upstream_seed),
                                    dtype=torch.float64)
        upstream = upstream.to(torch.float32).to(DEVICE)
        loss.backward(upstream)
    grads = {k: inputs[k].grad for k in GRAD_INPUTS if k in inputs}
    return loss, grads, upstream


def _reference(case, upstream, *, kl_weight=1.0, ce_weight=0.0, reduction="mean", normalizer=None, vocab_size=None,
               labels=None, ignore_index=-100, student_softcap=None, teacher_softcap=None, **divergence_kwargs):
    """float64: explicit logits (soft-capped: ``cap * tanh(logits / cap)``), kl_div_reference, autograd
    cross-entropy, the chain rule to each input (through the cap: ``1 - tanh^2``)."""
    hidden = case["student_hidden"].double().cpu()
    weight = case["student_weight"].double().cpu()
    vocab = vocab_size or weight.shape[0]
    leading = hidden.shape[:-1]
    student_logits = hidden @ weight[:vocab].T
    if "student_bias" in case:
        student_logits = student_logits + case["student_bias"].double().cpu()[:vocab]
    cap_grad = 1.0
    if student_softcap is not None:
        tanh = torch.tanh(student_logits / student_softcap)
        student_logits, cap_grad = student_softcap * tanh, (1.0 - tanh**2).reshape(-1, vocab)
    if "teacher_logits" in case:
        teacher_logits = case["teacher_logits"].double().cpu()[..., :vocab]
    else:
        teacher_logits = case["teacher_hidden"].double().cpu() @ case["teacher_weight"].double().cpu()[:vocab].T
        if "teacher_bias" in case:
            teacher_logits = teacher_logits + case["teacher_bias"].double().cpu()[:vocab]
        if teacher_softcap is not None:
            teacher_logits = teacher_softcap * torch.tanh(teacher_logits / teacher_softcap)
    labels = None if labels is None else labels.cpu()
    kl_rows, kl_grad = kl_div_reference(
        student_logits, teacher_logits, reduction="none", labels=labels, ignore_index=ignore_index,
        **divergence_kwargs,
    )
    rows = kl_weight * kl_rows
    grad_logits = kl_weight * kl_grad
    if ce_weight:
        logits = student_logits.detach().requires_grad_(True)
        ce_rows = F.cross_entropy(
            logits.reshape(-1, vocab), labels.reshape(-1), ignore_index=ignore_index, reduction="none"
        ).reshape(leading)
        (ce_grad,) = torch.autograd.grad(ce_rows.sum(), logits)
        rows = rows + ce_weight * ce_rows.detach()
        grad_logits = grad_logits + ce_weight * ce_grad
    active = None if labels is None else (labels != ignore_index).reshape(-1)
    row_leaf = rows.reshape(-1).detach().requires_grad_(True)
    loss = reduce_rows(row_leaf, active, reduction, normalizer, leading)
    (row_weight,) = torch.autograd.grad((loss * upstream.double().cpu()).sum(), row_leaf)
    grad_logits = grad_logits.reshape(-1, vocab) * row_weight[:, None] * cap_grad
    grads = {
        "student_hidden": (grad_logits @ weight[:vocab]).reshape(hidden.shape),
        "student_weight": torch.zeros_like(weight),
    }
    grads["student_weight"][:vocab] = grad_logits.T @ hidden.reshape(-1, hidden.shape[-1])
    if "student_bias" in case:
        grads["student_bias"] = torch.zeros(weight.shape[0], dtype=torch.float64)
        grads["student_bias"][:vocab] = grad_logits.sum(0)
    return loss.detach(), grads


def _check(case, impl, **kwargs):
    loss, grads, upstream = _run(case, impl, **kwargs)
    expected_loss, expected_grads = _reference(case, upstream, **kwargs)
    dtype = case["student_hidden"].dtype
    assert loss.dtype == torch.float32 and loss.shape == expected_loss.shape
    assert_close(loss, expected_loss, dtype, "loss")
    for name, expected in expected_grads.items():
        assert grads[name].dtype == case[name].dtype, name
        assert_close(grads[name], expected, dtype, name)


# ----------------------------------------------------------------------------------------------
# Parity with kl_div on explicit logits (float64)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", FL_IMPLS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_parity_linear_teacher_with_biases_and_ce(divergence, impl):
    """Hs != Ht (neither a multiple of 32), odd N and V, biases, ignored rows, ce_weight = 0.5, T = 1.5."""
    case = _case((37,), 48, 203, torch.float32, ht=40, biases=True, seed=1)
    _check(case, impl, divergence=divergence, temperature=1.5, labels=_labels((37,), 203, 2), ce_weight=0.5)


@pytest.mark.parametrize("impl", FL_IMPLS)
def test_second_backward_with_retain_graph_adds_the_same_gradients(impl):
    """Unlike the stored-gradient losses, the fused linear loss recomputes its tiles in backward from the saved
    row statistics: a second backward through the same graph (retain_graph=True) is supported and accumulates
    exactly the first one's gradients again (an in-place update of the saved statistics would break that)."""
    case = _case((11,), 24, 70, torch.float32, ht=20, biases=True, seed=5)
    inputs = {k: v.detach().clone().requires_grad_(k in GRAD_INPUTS) for k, v in case.items()}
    with _strategy(impl) as backend:
        loss = fused_linear_kl_div(
            inputs["student_hidden"], inputs["student_weight"], inputs["teacher_hidden"], inputs["teacher_weight"],
            student_bias=inputs["student_bias"], teacher_bias=inputs["teacher_bias"], labels=_labels((11,), 70, 3),
            ce_weight=0.5, divergence="jsd", impl=backend,
        )
        loss.backward(retain_graph=True)
        first = {k: inputs[k].grad.clone() for k in GRAD_INPUTS}
        loss.backward(torch.tensor(0.5, device=DEVICE))
    for name, grad in first.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(inputs[name].grad, 1.5 * grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("kept", [True, False])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_parity_of_the_pytorch_path_over_several_chunks(divergence, kept, monkeypatch):
    """The case above with the PyTorch path's chunks forced small (16 rows, 64 columns: 3 row chunks, the last
    partial, and 4 vocabulary chunks), labels at both sides of a chunk edge: every test above runs it in one chunk
    of each (at its default 2^18 elements and 4096 columns), and a chunk loop that skipped a row, counted a label in
    two chunks or kept only the last chunk's weight / bias gradient passed them. Both forwards: the second sweep
    reading the first one's kept logits and (``kept=False``: no room to keep them) multiplying again."""
    monkeypatch.setattr(fused_linear_module, "_torch_chunks", lambda rows, vocab: (16, 64))
    if not kept:
        monkeypatch.setattr(fused_linear_module, "TORCH_FORWARD_CACHE_ELEMENTS", 0)
    case = _case((37,), 48, 203, torch.float32, ht=40, biases=True, seed=1)
    labels = _labels((37,), 203, 2)
    labels[4:8] = torch.tensor([63, 64, 127, 202])
    _check(case, "torch", divergence=divergence, temperature=1.5, labels=labels, ce_weight=0.5)


@pytest.mark.parametrize("cache_elements, row_chunk, kept", [
    (1 << 24, 16, True),  # the default: both sides' [16, 203] logits fit
    (2 * 8 * 203, 8, True),  # room for 8 rows: half the token chunk, one sweep
    (2 * 8 * 203 - 1, 16, False),  # room for 7: two sweeps of 16 rows
    (0, 16, False),
])
@pytest.mark.parametrize("divergence", ["forward", "jsd"])
def test_torch_forward_multiplies_each_block_once_when_its_logits_fit(divergence, cache_elements, row_chunk, kept,
                                                                      monkeypatch):
    """The PyTorch path's forward computes each [token chunk, vocabulary chunk] block of both sides' logits once
    when the token chunk's logits fit in TORCH_FORWARD_CACHE_ELEMENTS (its second sweep reads them), in token chunks
    of at least half the usual; otherwise twice, in token chunks of the usual size. The loss is the same either
    way."""
    monkeypatch.setattr(fused_linear_module, "_torch_chunks", lambda rows, vocab: (16, 64))
    case = _case((37,), 48, 203, torch.float32, ht=40, biases=True, seed=1)
    labels = _labels((37,), 203, 2)

    def forward():
        return fused_linear_kl_div(
            case["student_hidden"], case["student_weight"], case["teacher_hidden"], case["teacher_weight"],
            student_bias=case["student_bias"], teacher_bias=case["teacher_bias"], labels=labels, ce_weight=0.5,
            divergence=divergence, temperature=1.5, reduction="none", impl="torch",
        )

    expected = forward()
    monkeypatch.setattr(fused_linear_module, "TORCH_FORWARD_CACHE_ELEMENTS", cache_elements)
    with RecordTensorOps() as recorder:
        loss = forward()
    # matmul (composite) as the dispatch mode sees it, or the mm beneath it where a build decomposes it first
    products = [shape for name, shape in recorder.records if name == "aten.matmul.default"] or [
        shape for name, shape in recorder.records if name == "aten.mm.default"]
    row_chunks, vocab_chunks = -(-37 // row_chunk), 4
    assert len(products) == row_chunks * vocab_chunks * 2 * (1 if kept else 2), products
    assert max(rows for rows, _ in products) == row_chunk
    assert_close(loss, expected, torch.float32, "loss")


@pytest.mark.parametrize("impl", FL_IMPLS)
def test_strided_biases_and_labels(impl):
    """Biases that are one column of a packed [V, 2] tensor and int64 labels that are one column of an [N, 2]
    tensor are read with their strides (the kernels indexed both as contiguous and read the wrong entries)."""
    case = _case((37,), 48, 203, torch.float32, ht=40, biases=True, seed=11)
    labels = _labels((37,), 203, 12)
    packed_labels = torch.stack([labels, torch.zeros_like(labels)], 1)
    student_packed = torch.stack([case["student_bias"], torch.zeros_like(case["student_bias"])], 1)
    student_packed.requires_grad_(True)
    teacher_packed = torch.stack([case["teacher_bias"], torch.ones_like(case["teacher_bias"])], 1)
    hidden = case["student_hidden"].clone().requires_grad_(True)
    weight = case["student_weight"].clone().requires_grad_(True)
    upstream = (0.5 + torch.rand(37, generator=torch.Generator().manual_seed(13))).to(DEVICE)
    with _strategy(impl) as backend:
        loss = fused_linear_kl_div(
            hidden, weight, case["teacher_hidden"], case["teacher_weight"], student_bias=student_packed[:, 0],
            teacher_bias=teacher_packed[:, 0], labels=packed_labels[:, 0], ce_weight=0.5, reduction="none",
            impl=backend,
        )
        loss.backward(upstream)
    expected_loss, expected = _reference(case, upstream, labels=labels, ce_weight=0.5, reduction="none")
    assert_close(loss, expected_loss, torch.float32, "loss")
    assert_close(hidden.grad, expected["student_hidden"], torch.float32, "student_hidden")
    assert_close(weight.grad, expected["student_weight"], torch.float32, "student_weight")
    assert_close(student_packed.grad[:, 0], expected["student_bias"], torch.float32, "student_bias")
    assert torch.all(student_packed.grad[:, 1] == 0)


@pytest.mark.parametrize("impl", FL_IMPLS)
@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd", "tvd"])
def test_parity_teacher_logits_vocab_size_reduction_none(divergence, impl):
    """Dense teacher logits padded beyond the student vocabulary, leading dims [3, 7], no bias, no CE."""
    case = _case((3, 7), 40, 203, torch.float32, teacher_vocab=211, teacher_logits=True, seed=3)
    _check(
        case, impl, divergence=divergence, vocab_size=203, reduction="none", labels=_labels((3, 7), 203, 4),
        beta=0.3,
    )


@pytest.mark.parametrize("impl", FL_IMPLS + ["triton_fp32acc"])
@pytest.mark.parametrize("divergence", ["forward", "jsd", "skew_reverse"])
def test_parity_bf16(divergence, impl):
    case = _case((2, 19), 48, 203, torch.bfloat16, ht=40, biases=True, seed=5)
    _check(case, impl, divergence=divergence, labels=_labels((2, 19), 203, 6), ce_weight=0.5, alpha=0.2)


@pytest.mark.parametrize("accumulation", ["fp32", "compensated"])
def test_backward_uses_the_strategy_its_forward_ran_with(accumulation, monkeypatch):
    """triton_strategy() around the forward call only (as a benchmark or a training step that calls backward
    outside the block): the backward runs that strategy and accumulation. The accumulation was read when
    backward ran, so the benchmark's ours_triton_fp32acc measured the compensated path."""
    from distill_ops.kernels import fused_linear as kernels

    calls = {"compensated": 0, "strategies": []}
    accumulate = kernels.accumulate_grad_hidden

    def counting_accumulate(*args, **kwargs):
        calls["compensated"] += 1
        return accumulate(*args, **kwargs)

    monkeypatch.setattr(kernels, "accumulate_grad_hidden", counting_accumulate)
    monkeypatch.setattr(kernels, "GEMM_CHUNK_ELEMENTS", 37 * 128)
    case = _case((37,), 48, 203, torch.bfloat16, seed=24)
    inputs = {k: v.detach().clone().requires_grad_(k in GRAD_INPUTS) for k, v in case.items()}
    with fused_linear_module.triton_strategy("gemm", accumulation=accumulation):
        loss = fused_linear_kl_div(inputs["student_hidden"], inputs["student_weight"], inputs["teacher_hidden"],
                                   inputs["teacher_weight"], impl="triton")
    monkeypatch.setattr(kernels, "_GemmChunks", _recording(kernels._GemmChunks, calls["strategies"]))
    loss.backward()
    assert (calls["compensated"] > 0) == (accumulation == "compensated"), calls  # bf16: compensated by default
    assert calls["strategies"], "backward ran the tiles strategy, its forward the gemm one"


def _recording(cls, log):
    def build(*args, **kwargs):
        log.append(cls.__name__)
        return cls(*args, **kwargs)

    return build


@pytest.mark.parametrize("impl", FL_IMPLS)
def test_parity_fp16(impl):
    """fp16 inputs (their d_hidden goes through the fp32 accumulator on the Triton path)."""
    case = _case((2, 19), 48, 203, torch.float16, ht=40, biases=True, seed=8)
    _check(case, impl, divergence="forward", labels=_labels((2, 19), 203, 9), ce_weight=0.5)


@pytest.mark.parametrize("beta", [1e-6, 1 - 1e-6])
def test_fallback_keeps_the_digits_of_a_small_jsd(beta):
    """A JSD at beta near 0 or 1 is ~1e-8 where the teacher is close to the student: the PyTorch path reads the
    log-ratios to the mixture from the two sides' log-ratio (``mixture_log_ratios``), and is within 1e-3 of float64
    (the log p - log m form, two numbers ~ -log V, was 3-5x off in fp32). The Triton kernels keep that form: their
    loss carries an absolute error of ~1e-7 per row (README)."""
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(8, 32, generator=generator)
    weight = torch.randn(300, 32, generator=generator) * 0.5
    teacher = hidden @ weight.T + torch.randn(8, 300, generator=generator) * 0.3
    loss = fused_linear_kl_div(hidden.to(DEVICE), weight.to(DEVICE), teacher_logits=teacher.to(DEVICE),
                               divergence="jsd", beta=beta, reduction="none", impl="torch")
    expected, _ = kl_div_reference(hidden.double() @ weight.double().T, teacher.double(), divergence="jsd", beta=beta,
                                   reduction="none")
    assert expected.abs().max() < 1e-6
    torch.testing.assert_close(loss.double().cpu(), expected, rtol=1e-3, atol=0.0)


def _small_skew_losses(divergence, alpha, impl):
    """Per-row skew KLs (fp32, H = 32, V = 300) of a teacher near the student, their 40-digit reference and the
    scale of the sum the tile kernels form, sum |x log(x / m)| + |(1 - alpha)(y - x)| (float64; x the distribution
    in front, y the other one, m = alpha x + (1 - alpha) y)."""
    from tests.test_kl_div import _decimal_mixture_rows

    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 32, generator=generator, dtype=torch.float64)
    weight = torch.randn(300, 32, generator=generator, dtype=torch.float64) * 0.05
    teacher_weight = weight + torch.randn(300, 32, generator=generator, dtype=torch.float64) * 0.01
    hidden, weight, teacher_weight = hidden.float(), weight.float(), teacher_weight.float()
    expected = _decimal_mixture_rows(hidden.double() @ weight.double().T, hidden.double() @ teacher_weight.double().T,
                                     divergence, alpha)
    with _strategy(impl) as backend:
        loss = fused_linear_kl_div(hidden.to(DEVICE), weight.to(DEVICE), hidden.to(DEVICE), teacher_weight.to(DEVICE),
                                   divergence=divergence, alpha=alpha, reduction="none", impl=backend)
    assert expected.max() < 3e-3
    student, teacher = (torch.softmax(hidden.double() @ w.double().T, -1) for w in (weight, teacher_weight))
    x, y = (student, teacher) if divergence == "skew_reverse" else (teacher, student)
    m = alpha * x + (1 - alpha) * y
    scale = ((x * torch.log(x / m)).abs() + ((1 - alpha) * (y - x)).abs()).sum(-1)
    return loss.double().cpu(), expected, scale


@pytest.mark.parametrize("divergence", ["skew_forward", "skew_reverse"])
@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9])
def test_small_skew_losses_keep_their_digits_on_the_pytorch_path(divergence, alpha):
    """A teacher near the student (skew KLs of 2e-5 to 2e-3): sum x log(x / m) is first order in the fp32
    normalisation's rounding. The PyTorch path sums x psi, psi = log(x / m) + m / x - 1 (``skew_terms``, shared with
    ``kl_div``): within 1e-5 of a 40-digit reference (measured 1e-6). The Triton tile kernels' form is weaker (README:
    their psi form left stack frames at their 128-register budget): the test below."""
    loss, expected, _ = _small_skew_losses(divergence, alpha, "torch")
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("impl", ["triton", "triton_gemm"])
@pytest.mark.parametrize("divergence", ["skew_forward", "skew_reverse"])
@pytest.mark.parametrize("alpha", [0.1, 0.5])
def test_small_skew_losses_on_the_triton_path(divergence, alpha, impl):
    """The case above on the tile kernels, which sum x log(x / m) + (1 - alpha)(y - x): the second term sums to 0
    and cancels the first order of the normalisation's rounding (sum x and sum y miss 1 by ~1e-7), so what is left
    is log(x / m)'s rounding, a few fp32 eps times the scale of that sum (sum of the terms' magnitudes) at
    alpha <= 1/2: within 6 eps times it per row. Measured (CPU interpreter, AMD EPYC): up to 2.1x on the tile
    strategy, 3.8x on the GEMM strategy (its 128-column chunks sum in another order); 17x to 32x on the rows that
    drive it without the second term. A fixed 5e-5 relative bound (measured up to 2.4e-5 on another CPU) failed the
    GEMM strategy here at 5.7e-5 (numpy's fp32 exp / log and summation differ between CPUs). Not at alpha -> 1
    (0.9: 1e-3 relative; 0.999: 80x), where log(x / m) ~ 1 - alpha rounds at |log m|."""
    loss, expected, scale = _small_skew_losses(divergence, alpha, impl)
    error = (loss - expected).abs()
    assert (error <= 6 * torch.finfo(torch.float32).eps * scale).all(), (error / scale).tolist()


@pytest.mark.parametrize("impl", FL_IMPLS)
@pytest.mark.parametrize("divergence", ["jsd", "skew_forward", "skew_reverse"])
def test_gradient_of_a_confident_student(divergence, impl):
    """A dominant token (the student's rows put most mass on it) and a teacher near the student: the true gradient is
    small while the skew KLs' g = -(1 - alpha) p / m (or d_q - alpha q / m) is near a constant; both impls form g
    less that constant (expm1), so the mean S keeps the digits of g's spread: d_hidden within 1e-3 of its largest
    entry (it was up to 7e-2 / 0.3 for skew_forward / skew_reverse on the PyTorch path, 0.8 / 1.0 on Triton's)."""
    kwargs = {"beta": 0.5} if divergence == "jsd" else {"alpha": 0.5}
    for seed in range(8):
        generator = torch.Generator().manual_seed(seed)
        hidden = torch.randn(4, 32, generator=generator)
        weight = torch.randn(1000, 32, generator=generator) * 0.3
        weight[0] = hidden.mean(0) * 3
        teacher = hidden @ weight.T + 0.3 * torch.randn(4, 1000, generator=generator)
        leaf = hidden.clone().to(DEVICE).requires_grad_(True)
        with _strategy(impl) as backend:
            fused_linear_kl_div(leaf, weight.to(DEVICE), teacher_logits=teacher.to(DEVICE), divergence=divergence,
                                reduction="sum", impl=backend, **kwargs).backward()
        _, grad_logits = kl_div_reference(hidden.double() @ weight.double().T, teacher.double(),
                                          divergence=divergence, reduction="sum", **kwargs)
        expected = grad_logits @ weight.double()
        error = (leaf.grad.double().cpu() - expected).abs().max() / expected.abs().max()
        assert error < 1e-3, (seed, error.item())


@pytest.mark.parametrize("impl", FL_IMPLS)
def test_parity_no_labels_sum_small_hidden(impl):
    """No labels (every row counts), kl_weight != 1, Hs = 20 (not a multiple of 16), one-row and 5-row inputs."""
    for rows in (1, 5):
        case = _case((rows,), 20, 77, torch.float32, ht=33, seed=7 + rows)
        _check(case, impl, divergence="reverse", kl_weight=2.5, reduction="sum", temperature=0.7)


@pytest.mark.parametrize("impl", FL_IMPLS)
def test_parity_cross_entropy_only_and_normalizer(impl):
    case = _case((29,), 24, 150, torch.float32, seed=9)
    _check(case, impl, kl_weight=0.0, ce_weight=1.0, labels=_labels((29,), 150, 10), normalizer=11.0)


@pytest.mark.parametrize("impl", FL_IMPLS)
@pytest.mark.parametrize("divergence", ["reverse", "forward"])
def test_zero_kl_weight_drops_an_infinite_or_nan_divergence(divergence, impl):
    """kl_weight = 0 is cross-entropy only: the loss must not be 0 * D where D is +inf (the reverse KL against a
    teacher's -inf logits, where the student has mass) or NaN (a NaN teacher logit). The forward pass gave NaN
    while backward already dropped the term."""
    case = _case((11,), 24, 70, torch.float32, teacher_logits=True, seed=15)
    masked = dict(case, teacher_logits=case["teacher_logits"].clone())
    masked["teacher_logits"][:, :5] = float("-inf")
    masked["teacher_logits"][4, 9] = float("nan")
    labels = _labels((11,), 70, 16)
    kwargs = dict(divergence=divergence, kl_weight=0.0, ce_weight=1.0, labels=labels, reduction="none")
    loss, grads, upstream = _run(masked, impl, **kwargs)
    expected_loss, expected_grads = _reference(case, upstream, **kwargs)  # the teacher does not enter it
    assert_close(loss, expected_loss, torch.float32, "loss")
    for name, expected in expected_grads.items():
        assert_close(grads[name], expected, torch.float32, name)


@pytest.mark.parametrize("impl", FL_IMPLS)
@pytest.mark.parametrize("divergence", ["forward", "jsd"])
def test_masked_vocabulary_minus_inf_bias(divergence, impl):
    """-inf biases (masked tokens) contribute exactly 0 and produce no NaN."""
    case = _case((13,), 32, 96, torch.float32, biases=True, seed=11)
    for name in ("student_bias", "teacher_bias"):
        case[name][::7] = float("-inf")
    labels = _labels((13,), 96, 12)
    labels[labels % 7 == 0] = 1  # targets are never masked tokens
    loss, grads, _ = _run(case, impl, divergence=divergence, labels=labels, ce_weight=0.5)
    assert torch.isfinite(loss).all() and all(torch.isfinite(g).all() for g in grads.values())
    _check(case, impl, divergence=divergence, labels=labels, ce_weight=0.5)


@pytest.mark.parametrize("impl", FL_IMPLS)
@pytest.mark.parametrize("divergence, masked", [("forward", "student"), ("reverse", "teacher")])
def test_masked_columns_against_far_negative_logits(divergence, masked, impl):
    """The first 128 columns (whole vocabulary tiles and splits) are -inf on one side (bias) and -1e4 on the other:
    probability 0 on both sides, so the loss is finite. The online KL sum held +inf for them and was rescaled by
    exp(old max - new max) == 0, in the tile loop and in the split merge: NaN (0 * inf)."""
    case = _case((9,), 32, 300, torch.float32, biases=True, seed=13)
    case[f"{masked}_bias"][:128] = float("-inf")
    case[f"{'teacher' if masked == 'student' else 'student'}_bias"][:128] = -1e4
    loss, grads, _ = _run(case, impl, divergence=divergence, reduction="none")
    assert torch.isfinite(loss).all() and all(torch.isfinite(g).all() for g in grads.values())
    _check(case, impl, divergence=divergence, reduction="none")


@pytest.mark.parametrize("impl", FL_IMPLS)
@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
def test_rows_masked_with_the_lowest_finite_value_are_ignored_by_labels(divergence, impl):
    """Dense teacher rows masked whole with torch.finfo(float32).min are not handled by either path (the README's
    documented limit: lse = max + log sum rounds to the max there, a wrong finite loss on the PyTorch path, NaN on
    the kernel's); with labels = ignore_index on them, the loss and gradients match float64 without them."""
    case = _case((7,), 24, 90, torch.float32, teacher_logits=True, seed=17)
    case["teacher_logits"][2] = torch.finfo(torch.float32).min
    case["teacher_logits"][5] = torch.finfo(torch.float32).min
    labels = _labels((7,), 90, 18, ignored=((2,), (5,)))
    _check(case, impl, divergence=divergence, labels=labels, temperature=1.5)


# Final-logit soft-capping (Gemma-2). Small caps (1.5, 2.0) against logits of std ~2 (biases add ~1): most logits
# sit in tanh's curved part or beyond, so the cap changes the loss and every gradient (test_softcap_changes_the_loss).
SOFTCAPS = {"student": dict(student_softcap=1.5), "teacher": dict(teacher_softcap=1.5),
            "both": dict(student_softcap=1.5, teacher_softcap=2.0)}


@pytest.mark.parametrize("impl", FL_IMPLS)
@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("caps", SOFTCAPS)
def test_softcap_parity(caps, divergence, impl):
    """Odd N / V / Hs / Ht, biases, ignored rows, ce_weight = 0.5 (on the capped student logits), T = 1.3."""
    case = _case((13,), 21, 75, torch.float32, ht=19, biases=True, seed=40)
    _check(case, impl, divergence=divergence, temperature=1.3, labels=_labels((13,), 75, 41), ce_weight=0.5,
           beta=0.3, **SOFTCAPS[caps])


@pytest.mark.parametrize("impl", FL_IMPLS)
@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
def test_softcap_parity_bf16(divergence, impl):
    case = _case((2, 9), 24, 75, torch.bfloat16, ht=19, biases=True, seed=42)
    _check(case, impl, divergence=divergence, labels=_labels((2, 9), 75, 43), ce_weight=0.5, **SOFTCAPS["both"])


@pytest.mark.parametrize("impl", FL_IMPLS)
@pytest.mark.parametrize("divergence", ["forward", "jsd"])
def test_softcap_student_with_teacher_logits(divergence, impl):
    """A capped student against dense (final) teacher logits, the teacher vocabulary padded."""
    case = _case((11,), 20, 75, torch.float32, teacher_vocab=80, teacher_logits=True, biases=True, seed=44)
    _check(case, impl, divergence=divergence, vocab_size=75, labels=_labels((11,), 75, 45), ce_weight=0.5,
           student_softcap=2.0)


def test_softcap_changes_the_loss():
    """The parity cases' caps matter: each moves the divergence and every gradient by over 10 % (no CE term here,
    which a teacher cap would not move), far beyond the tolerances a wrong cap or derivative could hide in."""
    case = _case((13,), 21, 75, torch.float32, ht=19, biases=True, seed=40)
    kwargs = dict(divergence="jsd", beta=0.3)
    plain, plain_grads, _ = _run(case, "torch", **kwargs)
    for caps in SOFTCAPS.values():
        capped, capped_grads, _ = _run(case, "torch", **kwargs, **caps)
        assert abs(capped.item() - plain.item()) > 0.1 * plain.item(), caps
        for name, grad in capped_grads.items():
            assert (grad - plain_grads[name]).norm() > 0.1 * plain_grads[name].norm(), (caps, name)


def test_softcap_module_and_none():
    case = _case((7,), 16, 40, torch.float32, seed=46)
    args = (case["student_hidden"], case["student_weight"], case["teacher_hidden"], case["teacher_weight"])
    module = FusedLinearKLDivLoss(divergence="reverse", student_softcap=3.0, teacher_softcap=2.5, impl="torch")
    assert "student_softcap=3.0" in repr(module)
    functional = fused_linear_kl_div(*args, divergence="reverse", student_softcap=3.0, teacher_softcap=2.5,
                                     impl="torch")
    assert torch.equal(module(*args), functional)
    assert torch.equal(fused_linear_kl_div(*args, student_softcap=None, teacher_softcap=None, impl="torch"),
                       fused_linear_kl_div(*args, impl="torch"))


def test_mixture_endpoints_equal_plain_kls():
    case = _case((9,), 16, 64, torch.float32, seed=13)
    for name, kwargs, plain in (
        ("jsd", {"beta": 0.0}, "forward"), ("jsd", {"beta": 1.0}, "reverse"),
        ("skew_forward", {"alpha": 0.0}, "forward"), ("skew_reverse", {"alpha": 0.0}, "reverse"),
    ):
        ends, _, _ = _run(case, "torch", divergence=name, **kwargs)
        plain_loss, _, _ = _run(case, "torch", divergence=plain)
        assert_close(ends, plain_loss, torch.float32, name)


# ----------------------------------------------------------------------------------------------
# Autograd behaviour
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", FL_IMPLS)
@pytest.mark.parametrize("teacher_form", ["linear", "logits"])
def test_teacher_and_labels_made_under_inference_mode(teacher_form, impl):
    """A frozen teacher run under torch.inference_mode() (and labels made there): its tensors cannot be saved for
    backward, and the op raised "Inference tensors cannot be saved for backward". Same loss and gradients as
    with ordinary tensors."""
    case = _case((11,), 32, 90, torch.float32, biases=True, teacher_logits=teacher_form == "logits", seed=17)
    labels = _labels((11,), 90, 18)
    expected_loss, expected_grads, _ = _run(case, impl, labels=labels, ce_weight=0.5)
    with torch.inference_mode():
        frozen = {name: (value.clone() if not name.startswith("student") else value) for name, value in case.items()}
        frozen_labels = labels.clone()
    assert frozen_labels.is_inference() and all(v.is_inference() for n, v in frozen.items() if n.startswith("teacher"))
    student = {k: v.detach().clone().requires_grad_(True) for k, v in frozen.items() if k in GRAD_INPUTS}
    with _strategy(impl) as backend:  # not _run: its clones would be ordinary tensors
        loss = fused_linear_kl_div(
            student["student_hidden"], student["student_weight"], frozen.get("teacher_hidden"),
            frozen.get("teacher_weight"), teacher_logits=frozen.get("teacher_logits"),
            student_bias=student["student_bias"], teacher_bias=frozen.get("teacher_bias"), impl=backend,
            labels=frozen_labels, ce_weight=0.5,
        )
        upstream = 0.5 + torch.rand(loss.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        loss.backward(upstream.to(torch.float32).to(DEVICE))
    assert torch.equal(loss, expected_loss)
    for name in GRAD_INPUTS:
        assert torch.equal(student[name].grad, expected_grads[name]), name


@pytest.mark.parametrize("impl", IMPLS)
def test_frozen_weight_gets_no_gradient_and_inputs_unchanged(impl):
    case = _case((11,), 24, 70, torch.float32, biases=True, seed=14)
    originals = {k: v.clone() for k, v in case.items()}
    hidden = case["student_hidden"].clone().requires_grad_(True)
    teacher_hidden = case["teacher_hidden"].clone().requires_grad_(True)
    loss = fused_linear_kl_div(
        hidden, case["student_weight"], teacher_hidden, case["teacher_weight"], student_bias=case["student_bias"],
        teacher_bias=case["teacher_bias"], divergence="jsd", impl=impl,
    )
    loss.backward()
    assert teacher_hidden.grad is None
    _, expected = _reference(case, torch.ones(()), divergence="jsd")
    assert_close(hidden.grad, expected["student_hidden"], torch.float32)
    for name, value in case.items():
        assert torch.equal(value, originals[name]), name


class _RecordShapes(TorchDispatchMode):
    """Records the output shapes of every op run inside it."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes += [tuple(t.shape) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", FL_IMPLS)
def test_frozen_hidden_computes_no_hidden_gradient(impl, dtype):
    """Only the LM head trained (a frozen body): the weight and bias gradients are right, and backward
    produces no ``[N, Hs]`` tensor at all (no d_hidden GEMM, accumulator or buffer)."""
    num_rows, hs = 13, 40
    case = _case((num_rows,), hs, 70, dtype, biases=True, seed=21)
    weight = case["student_weight"].clone().requires_grad_(True)
    bias = case["student_bias"].clone().requires_grad_(True)
    with _strategy(impl) as backend:
        loss = fused_linear_kl_div(
            case["student_hidden"], weight, case["teacher_hidden"], case["teacher_weight"], student_bias=bias,
            teacher_bias=case["teacher_bias"], divergence="jsd", impl=backend,
        )
        with _RecordShapes() as recorder:
            loss.backward()
    assert recorder.shapes and (num_rows, hs) not in recorder.shapes
    _, expected = _reference(case, torch.ones(()), divergence="jsd")
    assert_close(weight.grad, expected["student_weight"], dtype)
    assert_close(bias.grad, expected["student_bias"], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", FL_IMPLS)
def test_shifted_teacher_logits_are_read_in_place(impl, dtype, monkeypatch):
    """Teacher logits given as a batch's shifted logits (``logits[:, 1:]``: rows not evenly spaced, so not viewable
    as [N, V]) are read where they lie, as B groups of L rows, by every path: no tensor of the view's size is made in
    forward or backward (they were copied whole, and the copy kept alive until backward). Loss and gradients equal
    those of a contiguous copy exactly. The torch path's chunks are forced small (5 rows, 64 columns), so that some
    span two sequences and others end inside one."""
    batch, length, hs, vocab = 3, 7, 24, 301
    case = _case((batch, length), hs, vocab, dtype, biases=True, seed=31)
    full = _randn((batch, length + 1, vocab), dtype, 32, scale=2.0)
    labels = _labels((batch, length), vocab, seed=33)
    monkeypatch.setattr(fused_linear_module, "_torch_chunks", lambda rows, vocab: (5, 64))

    def run(teacher_logits, record):
        leaves = {name: case[name].clone().requires_grad_(True) for name in GRAD_INPUTS}
        with _strategy(impl) as backend, RecordTensorOps() as recorder:
            loss = fused_linear_kl_div(
                leaves["student_hidden"], leaves["student_weight"], teacher_logits=teacher_logits,
                student_bias=leaves["student_bias"], labels=labels, ce_weight=0.5, divergence="jsd", impl=backend,
            )
            loss.backward()
        if record:
            assert recorder.records and recorder.ops_with_numel(batch * length * vocab) == [], recorder.records
        return loss, {name: leaf.grad for name, leaf in leaves.items()}

    loss, grads = run(full[:, 1:], record=True)
    expected_loss, expected_grads = run(full[:, 1:].contiguous(), record=False)
    assert torch.equal(loss, expected_loss)
    for name in GRAD_INPUTS:
        assert torch.equal(grads[name], expected_grads[name]), name


@pytest.mark.parametrize("impl", IMPLS)
def test_all_rows_ignored_gives_zero(impl):
    case = _case((6,), 16, 50, torch.float32, seed=15)
    labels = torch.full((6,), -100, device=DEVICE)
    loss, grads, _ = _run(case, impl, labels=labels, ce_weight=1.0)
    assert loss.item() == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in grads.values())


@pytest.mark.parametrize("softcap, frozen", [(None, ()), (30.0, ()), (30.0, ("student_weight",))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", FL_IMPLS)
def test_non_finite_hidden_in_ignored_rows_leaves_every_gradient_alone(impl, dtype, softcap, frozen):
    """An ignored row may hold anything (a left-padding position whose attention saw no key gives NaN hidden states):
    loss and every gradient equal those with that row zeroed. The weight gradient (dL/dz^T h over every row) was NaN:
    the ignored row's zero gradient times its NaN hidden state; with a student soft-cap and a frozen head (as
    fspad_draft_loss's), d_hidden and d_bias were: the cap's factor 1 - tanh^2 of a NaN logit times that zero."""
    case = _case((7,), 16, 45, dtype, biases=True, seed=19)
    labels = _labels((7,), 45, 20)  # rows 0 and 3 ignored
    options = dict(labels=labels, ce_weight=0.5, student_softcap=softcap, frozen=frozen)
    clean = dict(case, student_hidden=case["student_hidden"].clone())
    clean["student_hidden"][[0, 3]] = 0.0
    expected_loss, expected_grads, _ = _run(clean, impl, **options)
    for bad in (float("nan"), float("inf")):
        dirty = dict(case, student_hidden=case["student_hidden"].clone())
        dirty["student_hidden"][0, 2] = bad
        dirty["student_hidden"][3] = -bad
        loss, grads, _ = _run(dirty, impl, **options)
        assert torch.equal(loss, expected_loss)
        assert set(grads) - {name for name in GRAD_INPUTS if grads[name] is not None} == set(frozen)
        for name in set(GRAD_INPUTS) - set(frozen):
            assert torch.isfinite(grads[name]).all(), (name, bad)
            if name == "student_hidden":
                assert torch.equal(grads[name][[0, 3]], torch.zeros_like(grads[name][[0, 3]]))
                assert torch.equal(grads[name][[1, 2, 4, 5, 6]], expected_grads[name][[1, 2, 4, 5, 6]])
            else:
                assert torch.equal(grads[name], expected_grads[name]), name


def test_no_grad_computes_loss_only():
    case = _case((8,), 16, 40, torch.float32, seed=16)
    with torch.no_grad():
        loss = fused_linear_kl_div(case["student_hidden"], case["student_weight"], case["teacher_hidden"],
                                   case["teacher_weight"], impl="torch")
    expected, _ = _reference(case, torch.ones(()))
    assert_close(loss, expected, torch.float32)


def test_module_matches_functional():
    case = _case((10,), 16, 40, torch.float32, seed=17)
    labels = _labels((10,), 40, 18)
    module = FusedLinearKLDivLoss(divergence="jsd", beta=0.25, temperature=2.0, ce_weight=0.3, impl="torch")
    assert "jsd" in repr(module)
    from_module = module(case["student_hidden"], case["student_weight"], case["teacher_hidden"],
                         case["teacher_weight"], labels)
    functional = fused_linear_kl_div(case["student_hidden"], case["student_weight"], case["teacher_hidden"],
                                     case["teacher_weight"], divergence="jsd", beta=0.25, temperature=2.0,
                                     ce_weight=0.3, labels=labels, impl="torch")
    assert torch.equal(from_module, functional)


# ----------------------------------------------------------------------------------------------
# return_entropy: the student's entropy at temperature T, a metric of the same pass
# ----------------------------------------------------------------------------------------------


def _reference_entropy(case, temperature, labels, student_softcap=None):
    """float64 H(softmax(z / T)) per row of the explicit (soft-capped) student logits, 0 at ignored rows."""
    logits = case["student_hidden"].double().cpu() @ case["student_weight"].double().cpu().T
    if "student_bias" in case:
        logits = logits + case["student_bias"].double().cpu()
    if student_softcap is not None:
        logits = student_softcap * torch.tanh(logits / student_softcap)
    log_q = torch.log_softmax(logits / temperature, dim=-1)
    entropy = -(log_q.exp() * log_q).sum(-1)
    return torch.where(labels.cpu() != -100, entropy, 0.0)


ENTROPY_CASES = {
    "linear_biases_ce": (dict(biases=True), dict(ce_weight=0.5)),
    "teacher_logits": (dict(teacher_logits=True), {}),
    "softcap": (dict(biases=True), dict(student_softcap=1.5, teacher_softcap=2.0)),
}


@pytest.mark.parametrize("impl", FL_IMPLS)
@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd", "tvd"])
@pytest.mark.parametrize("mode", ENTROPY_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_return_entropy(dtype, mode, divergence, impl):
    case_options, loss_options = ENTROPY_CASES[mode]
    case = _case((3, 7), 24, 70, dtype, seed=31, **case_options)
    labels = _labels((3, 7), 70, 32, ignored=((0,), (4,), (20,)))
    options = dict(divergence=divergence, temperature=1.7, labels=labels, **loss_options)
    loss, grads, upstream = _run(case, impl, **options)
    with _strategy(impl) as backend:
        pair_inputs = {k: v.detach().clone().requires_grad_(k in GRAD_INPUTS) for k, v in case.items()}
        pair_loss, entropy = fused_linear_kl_div(
            pair_inputs["student_hidden"], pair_inputs["student_weight"], pair_inputs.get("teacher_hidden"),
            pair_inputs.get("teacher_weight"), teacher_logits=pair_inputs.get("teacher_logits"),
            student_bias=pair_inputs.get("student_bias"), teacher_bias=pair_inputs.get("teacher_bias"),
            impl=backend, return_entropy=True, **options,
        )
        pair_loss.backward(upstream)
    # The metric changes neither the loss nor any gradient.
    assert torch.equal(pair_loss, loss)
    for name, grad in grads.items():
        assert torch.equal(pair_inputs[name].grad, grad), name
    assert entropy.shape == labels.shape and entropy.dtype == torch.float32 and not entropy.requires_grad
    expected = _reference_entropy(case, 1.7, labels, loss_options.get("student_softcap"))
    assert_close(entropy, expected, dtype, "entropy")
    assert (entropy.cpu()[labels.cpu() == -100] == 0).all()
    assert (expected[labels.cpu() != -100] > 0.5).all()  # far from the ignored rows' 0


@pytest.mark.parametrize("impl", IMPLS)
def test_return_entropy_without_labels_and_reductions(impl):
    case = _case((2, 5), 16, 40, torch.float32, seed=33)
    args = (case["student_hidden"], case["student_weight"], case["teacher_hidden"], case["teacher_weight"])
    expected = _reference_entropy(case, 1.0, torch.zeros(2, 5, dtype=torch.long))
    for reduction in ("mean", "sum", "none"):
        loss, entropy = fused_linear_kl_div(*args, reduction=reduction, return_entropy=True, impl=impl)
        assert_close(loss, fused_linear_kl_div(*args, reduction=reduction, impl=impl), torch.float32)
        assert_close(entropy, expected, torch.float32, reduction)
    module_loss, module_entropy = FusedLinearKLDivLoss(return_entropy=True, impl=impl)(*args)
    assert_close(module_loss, fused_linear_kl_div(*args, impl=impl), torch.float32)
    assert_close(module_entropy, expected, torch.float32, "module")
    with pytest.raises(TypeError, match="return_entropy must be a bool, got NoneType"):
        FusedLinearKLDivLoss(return_entropy=None)


@pytest.mark.parametrize("impl", IMPLS)
def test_returned_entropy_may_be_edited_in_place(impl):
    """The entropy is the caller's metric: normalising or clamping it in place leaves the loss's backward intact. It
    was a view of the statistics saved for backward, whose version check then failed "modified by an inplace
    operation" (a review, 2026-12-07)."""
    case = _case((6,), 8, 30, torch.float32, seed=34)
    hidden = case["student_hidden"].clone().requires_grad_(True)
    loss, entropy = fused_linear_kl_div(hidden, case["student_weight"], case["teacher_hidden"],
                                        case["teacher_weight"], return_entropy=True, impl=impl)
    expected = torch.autograd.grad(fused_linear_kl_div(hidden, case["student_weight"], case["teacher_hidden"],
                                                       case["teacher_weight"], impl=impl), hidden)[0]
    entropy /= math.log(30)
    entropy.clamp_(max=0.5)
    loss.backward()
    assert_close(hidden.grad, expected, torch.float32)


def test_return_entropy_traces_as_one_graph():
    case = _case((12,), 16, 40, torch.float32, seed=34)

    def loss_fn(hidden, weight, teacher_hidden, teacher_weight):
        return fused_linear_kl_div(hidden, weight, teacher_hidden, teacher_weight, divergence="jsd", temperature=2.0,
                                   impl="torch", return_entropy=True)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    hidden = case["student_hidden"].clone().requires_grad_(True)
    loss, entropy = compiled(hidden, case["student_weight"], case["teacher_hidden"], case["teacher_weight"])
    loss.backward()
    expected_loss, expected = _reference(case, torch.ones(()), divergence="jsd", temperature=2.0)
    assert_close(loss, expected_loss, torch.float32)
    assert_close(hidden.grad, expected["student_hidden"], torch.float32)
    assert_close(entropy, _reference_entropy(case, 2.0, torch.zeros(12, dtype=torch.long)), torch.float32)


def test_torch_compile_fullgraph():
    case = _case((12,), 16, 40, torch.float32, seed=19)

    def loss_fn(hidden, weight, teacher_hidden, teacher_weight):
        return fused_linear_kl_div(hidden, weight, teacher_hidden, teacher_weight, divergence="reverse", impl="torch")

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    hidden = case["student_hidden"].clone().requires_grad_(True)
    weight = case["student_weight"].clone().requires_grad_(True)
    loss = compiled(hidden, weight, case["teacher_hidden"], case["teacher_weight"])
    loss.backward()
    expected_loss, expected = _reference(case, torch.ones(()), divergence="reverse")
    assert_close(loss, expected_loss, torch.float32)
    assert_close(hidden.grad, expected["student_hidden"], torch.float32)
    assert_close(weight.grad, expected["student_weight"], torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_torch_compile_dynamic_shapes(impl):
    """``dynamic=True`` makes the float options symbolic too: the argument checks must still trace (they called
    ``math.isfinite`` on the temperature, which dynamo refused), and two token counts reuse one graph."""
    torch._dynamo.reset()

    def loss_fn(hidden, weight, teacher_logits):
        return fused_linear_kl_div(hidden, weight, teacher_logits=teacher_logits, divergence="jsd", beta=0.3,
                                   temperature=1.7, impl=impl)

    compiled = torch.compile(loss_fn, fullgraph=True, dynamic=True, backend="aot_eager")
    for tokens, seed in ((12, 23), (9, 24)):
        case = _case((tokens,), 16, 40, torch.float32, teacher_logits=True, seed=seed)
        hidden = case["student_hidden"].clone().requires_grad_(True)
        weight = case["student_weight"].clone().requires_grad_(True)
        loss = compiled(hidden, weight, case["teacher_logits"])
        loss.backward()
        expected_loss, expected = _reference(case, torch.ones(()), divergence="jsd", beta=0.3, temperature=1.7)
        assert_close(loss, expected_loss, torch.float32)
        assert_close(hidden.grad, expected["student_hidden"], torch.float32)
        assert_close(weight.grad, expected["student_weight"], torch.float32)


@pytest.mark.parametrize("impl", FL_IMPLS)
def test_autocast_casts_the_linear_inputs_and_keeps_fp32_statistics(impl):
    """Under ``torch.autocast`` (bf16 on the CPU; the Trainer's ``bf16=True`` with fp32 weights) the op computes on
    the bf16-rounded hidden states, weights and biases, as autocast's ``F.linear`` would, with fp32 statistics on
    both impls: the loss equals the float64 reference on the rounded inputs at fp32 tolerance, and the fp32 inputs
    get fp32 gradients (bf16-rounded, through the casts). A bf16 hidden state with an fp32 weight, refused outside
    autocast, works inside it. Before this the PyTorch path's internal fp32 matmuls ran in bf16 (0.7 % off on a
    tiny model) while the Triton path ignored autocast (fp32 logits): the two impls disagreed."""
    case = _case((23,), 24, 70, torch.float32, biases=True, seed=41)
    labels = torch.randint(0, 70, (23,), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    labels[::4] = -100
    kwargs = dict(divergence="jsd", beta=0.3, labels=labels, ce_weight=0.5)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss, grads, upstream = _run(case, impl, **kwargs)
    rounded = {key: value.to(torch.bfloat16) for key, value in case.items()}
    expected_loss, expected = _reference(rounded, upstream.double().cpu(), **kwargs)
    assert loss.dtype == torch.float32
    assert_close(loss, expected_loss, torch.float32, "loss")
    for name, grad in grads.items():
        assert grad.dtype == torch.float32, name
        assert_close(grad, expected[name], torch.bfloat16, name)
    mixed = dict(case, student_hidden=case["student_hidden"].to(torch.bfloat16))
    with pytest.raises(TypeError, match="must share a dtype"):
        _run(mixed, impl, **kwargs)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        mixed_loss, _, _ = _run(mixed, impl, **kwargs)
    assert_close(mixed_loss, expected_loss, torch.float32, "mixed-dtype loss")


def test_autocast_traces_as_one_graph():
    case = _case((12,), 16, 40, torch.float32, seed=23)

    def loss_fn(hidden, weight, teacher_hidden, teacher_weight):
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            return fused_linear_kl_div(hidden, weight, teacher_hidden, teacher_weight, impl="torch")

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    args = (case["student_hidden"], case["student_weight"], case["teacher_hidden"], case["teacher_weight"])
    rounded = {key: value.to(torch.bfloat16) for key, value in case.items()}
    expected_loss, _ = _reference(rounded, torch.ones(()))
    assert_close(compiled(*args), expected_loss, torch.float32)


# ----------------------------------------------------------------------------------------------
# The compensated d_hidden accumulation (16-bit inputs)
# ----------------------------------------------------------------------------------------------


def _accumulation_case(rows, hidden, chunk_cols, num_chunks, dtype, seed):
    """dL/dz chunks and weight chunks whose partial products cancel (the running sum is smaller than its terms)."""
    grads = [_randn((rows, chunk_cols), dtype, seed + 2 * c, scale=1.0 + c % 3) for c in range(num_chunks)]
    weights = [_randn((chunk_cols, hidden), dtype, seed + 2 * c + 1) for c in range(num_chunks)]
    partials = [g.double().cpu() @ w.double().cpu() for g, w in zip(grads, weights)]
    return grads, weights, partials


def _accumulate(grads, weights, dtype, hidden):
    hi = torch.full((grads[0].shape[0], hidden), float("nan"), dtype=dtype, device=DEVICE)  # FIRST must not read it
    lo = torch.full(hi.shape, float("nan"), dtype=torch.bfloat16, device=DEVICE) if len(grads) > 1 else None
    for index, (grad, weight) in enumerate(zip(grads, weights)):
        fused_linear_kernels.accumulate_grad_hidden(hi, lo, grad, weight, first=index == 0,
                                                    last=index == len(grads) - 1)
    return hi


def _rounding_bound(exact, partials, dtype):
    """One ulp of the exact sum in ``dtype`` (the final rounding: a GPU rounds fp32 -> bf16 to nearest, within
    half an ulp, and so does the CPU interpreter under tests/conftest.py; one ulp leaves room for the pair's last
    carried bits) plus 2^-14 of the summed partials' magnitude
    (what ~16 carried bits may add over the chunks); plain 16-bit accumulation errs by ~2^-9 of it."""
    ulp = torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(torch.finfo(dtype).tiny))))
    return ulp + 2.0**-14 * sum(p.abs() for p in partials)


@pytest.mark.parametrize("rows, hidden, chunk_cols", [(37, 24, 20), (32, 160, 64)])  # generic / aligned tiles
def test_compensated_grad_hidden_accumulation_is_correctly_rounded(rows, hidden, chunk_cols):
    """24 chunks: the result is the float64 sum rounded to the output dtype, up to the pair's carried precision;
    the same check rejects the plain 16-bit running sum (so it can fail)."""
    dtype = torch.bfloat16
    grads, weights, partials = _accumulation_case(rows, hidden, chunk_cols, 24, dtype, seed=40)
    exact = sum(partials)
    result = _accumulate(grads, weights, dtype, hidden).double().cpu()
    bound = _rounding_bound(exact, partials, dtype)
    excess = (result - exact).abs() - bound
    assert excess.max() <= 0, f"max error beyond the bound: {excess.max().item():.3g}"
    naive = torch.zeros(rows, hidden, dtype=dtype)
    for partial in partials:
        naive = (naive.double() + partial).to(dtype)
    assert ((naive.double() - exact).abs() > bound).any(), "the bound does not separate 16-bit accumulation"


def test_compensated_grad_hidden_accumulation_single_chunk_needs_no_lo():
    """first and last at once: hi = the chunk's product rounded once, no error buffer; lo is required otherwise."""
    grads, weights, partials = _accumulation_case(33, 40, 48, 1, torch.bfloat16, seed=60)
    result = _accumulate(grads, weights, torch.bfloat16, 40).double().cpu()
    assert (result - partials[0]).abs().le(_rounding_bound(partials[0], partials, torch.bfloat16)).all()
    hi = torch.empty(33, 40, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError, match="lo is required"):
        fused_linear_kernels.accumulate_grad_hidden(hi, None, grads[0], weights[0], first=True, last=False)


# ----------------------------------------------------------------------------------------------
# Memory: nothing [N, V]
# ----------------------------------------------------------------------------------------------


class _LargestAllocation(TorchDispatchMode):
    """Records the largest tensor (in bytes: the interpreter also makes untyped byte views) any ATen op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.largest_op = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor) and value.numel() * value.element_size() > self.largest:
                self.largest, self.largest_op = value.numel() * value.element_size(), str(func)
        return out


@pytest.mark.parametrize("divergence", ["forward", "jsd"])
def test_triton_path_allocates_no_n_by_v_tensor(divergence):
    """The Triton launchers (forward statistics, backward chunks + GEMMs) under a dispatch mode.

    The mode sees ATen ops only outside custom ops, so the implementation functions the custom ops
    call are run directly: everything they allocate (statistics, dL/dz chunks, gradients) is recorded.
    """
    from distill_ops.kernels.fused_linear import fused_linear_stats

    rows, vocab, hidden = 96, 320, 16  # the inputs (V x H, N x H) are below a quarter of N x V
    case = _case((rows,), hidden, vocab, torch.float32, seed=20)
    labels = _labels((rows,), vocab, 21)
    with _LargestAllocation() as recorder:
        _, _, row_stats = fused_linear_stats(
            case["student_hidden"], case["student_weight"], None, case["teacher_hidden"], case["teacher_weight"],
            None, None, labels, divergence=divergence, coef=0.5, temperature=1.0, has_ce=True,
        )
        scale = torch.full((rows,), 1.0 / rows, device=DEVICE)
        inputs = _Inputs(case["student_hidden"], case["student_weight"], None, case["teacher_hidden"],
                         case["teacher_weight"], None, None)
        d_hidden, d_weight, _ = fused_linear_backward_triton(
            inputs, labels, row_stats, scale, scale, divergence=divergence, coef=0.5, temperature=1.0,
            need_weight_grad=True, need_bias_grad=False,
        )
    assert d_weight.shape == (vocab, hidden) and d_hidden.shape == (rows, hidden)
    assert recorder.largest <= rows * vocab * 4 // 4, (recorder.largest, recorder.largest_op)


def test_stats_schedule_rule():
    """The statistics kernel's (splits, tiles per split, group): the L2 rule of kernels.fused_linear.STATS_SPLITS."""
    from distill_ops.kernels.fused_linear import GROUP_N, STATS_SPLITS, stats_schedule

    # The target shape (N = 8192, V = 131072, 64 x 64 tiles): 128 token blocks x 2048 vocabulary tiles.
    assert stats_schedule(128, 2048) == (STATS_SPLITS, 2048 // STATS_SPLITS, GROUP_N) == (32, 64, 8)
    # A group (GROUP_N token blocks x all splits) outnumbers the programs resident on a 132-SM GPU.
    assert GROUP_N * STATS_SPLITS > 132
    assert stats_schedule(2, 2048) == (256, 8, GROUP_N)  # few token blocks: more splits (>= ~TARGET_PROGRAMS)
    assert stats_schedule(128, 10) == (2, 5, GROUP_N)  # narrow vocabulary: >= MIN_TILES_PER_SPLIT tiles a split
    assert stats_schedule(128, 3) == (1, 3, GROUP_N)
    assert stats_schedule(128, 2048, (4, 8)) == (4, 512, 8)  # the previous rule at the target shape
    assert stats_schedule(5, 3, (7, 2)) == (3, 1, 2)
    with pytest.raises(ValueError, match="schedule"):
        stats_schedule(4, 4, (0, 8))
    # The gemm strategy splits a chunk only for parallelism (each chunk adds its splits' partials).
    assert stats_schedule(512, 16, min_splits=1) == (2, 8, GROUP_N)
    assert stats_schedule(4096, 11, min_splits=1) == (1, 11, GROUP_N)


def test_gemm_strategy_partials_stay_small_at_large_n():
    """The gemm strategy's [stats, splits, N] partials (one set per split of every logits chunk): with chunks of
    2^23 / N columns alone they grew as N^2 V, 2 GiB at N = 65536, V = 128k, past 2^31 entries at N = 131072,
    V = 152k (int32 offsets in the kernel, now int64). Chunks of at least ~sqrt(4 V) columns and no L2 splits keep
    partials + chunk buffers at a few % of one fp32 [N, V] tensor; the issue's shape keeps 1024-column chunks."""
    import triton

    from distill_ops.kernels.fused_linear import GEMM_CHUNK_CONFIG, gemm_chunk_columns, stats_schedule

    block_n, block_v = GEMM_CHUNK_CONFIG[:2]
    assert gemm_chunk_columns(8192, 131072, block_v) == 1024
    for rows, vocab in ((65536, 131072), (131072, 151936), (98304, 262144)):
        columns = gemm_chunk_columns(rows, vocab, block_v)
        splits = stats_schedule(triton.cdiv(rows, block_n), triton.cdiv(columns, block_v), min_splits=1)[0]
        partial_entries = 9 * splits * triton.cdiv(vocab, columns) * rows
        assert partial_entries < 2**31 / 8, (rows, vocab, partial_entries)
        assert 4 * partial_entries + 8 * rows * columns < 0.03 * 4 * rows * vocab, (rows, vocab, columns)


@pytest.fixture(scope="module")
def schedule_case():
    """fp32 tiles 16 x 16: 5 token blocks x 13 vocabulary tiles; the default schedule's statistics."""
    from distill_ops.kernels.fused_linear import fused_linear_stats

    rows, vocab, hidden = 70, 200, 24
    case = _case((rows,), hidden, vocab, torch.float32, seed=40)
    args = (case["student_hidden"], case["student_weight"], None, case["teacher_hidden"], case["teacher_weight"],
            None, None, _labels((rows,), vocab, 41))
    options = dict(divergence="jsd", coef=0.3, temperature=1.5, has_ce=True)
    return case, args, options, fused_linear_stats(*args, **options)


@pytest.mark.parametrize("schedule", [(1, 1), (3, 2), (13, 3), (2, 64)])
def test_stats_schedule_does_not_change_the_statistics(schedule, schedule_case):
    """Any (splits, group), including groups that do not divide the token blocks and splits that do not divide
    the tiles, gives the default schedule's statistics and the float64 log-sum-exps."""
    from distill_ops.kernels.fused_linear import fused_linear_stats

    case, args, options, default = schedule_case
    scheduled = fused_linear_stats(*args, **options, schedule=schedule)
    for got, want in zip(scheduled, default):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    z = case["student_hidden"].double() @ case["student_weight"].double().T
    t = case["teacher_hidden"].double() @ case["teacher_weight"].double().T
    row_stats = scheduled[2].double()
    torch.testing.assert_close(row_stats[0], torch.logsumexp(z / 1.5, dim=-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(row_stats[1], torch.logsumexp(t / 1.5, dim=-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(row_stats[3], torch.logsumexp(z, dim=-1), rtol=1e-5, atol=1e-5)


def test_tiles_strategy_partials_stay_within_int32(schedule_case, monkeypatch):
    """The tiles strategy indexes its [stats, splits, N] partials with int32: its splits are capped so the buffer
    stays below PARTIAL_INDEX_LIMIT entries (2^31; 32 splits wrapped from N = 8.4M rows, stores before the buffer on
    a GPU; a race audit, 2026-12-07), and past one split's worth of rows the call is refused. Checked with a lowered
    limit: fewer splits, the same statistics."""
    from distill_ops.kernels import fused_linear as module

    case, args, options, default = schedule_case
    rows = args[0].shape[0]
    chosen = []
    schedule = module.stats_schedule
    monkeypatch.setattr(module, "stats_schedule", lambda *a, **k: chosen.append(schedule(*a, **k)) or chosen[-1])
    monkeypatch.setattr(module, "PARTIAL_INDEX_LIMIT", 2 * module.NUM_PASS1_STATS * rows + 1)
    capped = module.fused_linear_stats(*args, **options)
    # Pass 1 (8 statistics) capped at 2 splits where the default takes 13; pass 2 (2 statistics) at 8.
    assert len(chosen) == 2 and chosen[0][0] == 2 and 1 <= chosen[1][0] <= 8
    for got, want in zip(capped, default):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(module, "PARTIAL_INDEX_LIMIT", module.NUM_PASS1_STATS * rows)
    with pytest.raises(ValueError, match=f"the Triton tiles strategy takes fewer than {rows} rows per call, got {rows}"):
        module.fused_linear_stats(*args, **options)


class _NewStorages(TorchDispatchMode):
    """Bytes of every storage the ops create, once each. In-place ops (``set_``, ``copy_``, ...) create none and are
    left out: through them Triton's CPU interpreter wraps each kernel argument in a host tensor of its own and
    copies it back (no such copy exists on a GPU)."""

    def __init__(self, existing=()):
        super().__init__()
        self.existing = {t.untyped_storage().data_ptr() for t in existing}  # views of these allocate nothing
        self.storages: dict[int, tuple[int, str]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.overloadpacket.__name__.endswith("_"):
            for value in tree_flatten(out)[0]:
                if isinstance(value, torch.Tensor):
                    storage = value.untyped_storage()
                    if storage.data_ptr() not in self.existing:
                        self.storages.setdefault(storage.data_ptr(), (storage.nbytes(), str(func)))
        return out

    def bytes_except(self, *tensors):
        kept = {t.untyped_storage().data_ptr() for t in tensors}
        return sum(nbytes for ptr, (nbytes, _) in self.storages.items() if ptr not in kept)


@pytest.mark.parametrize("dtype, accumulation", [(torch.bfloat16, "compensated"), (torch.bfloat16, "fp32"),
                                                  (torch.float16, "compensated")])
def test_triton_backward_extra_memory_16bit(dtype, accumulation):
    """16-bit backward: besides the two gradients it returns, the launcher allocates one dL/dz chunk and, for
    d_hidden, the bf16 error half of the compensated pair (2·N·H bytes; bf16 only) or an fp32 accumulator (4·N·H)
    converted at the end (fp16 always: its running sum could overflow). At the issue's target shape the
    compensated budget is < 2 % of one fp32 [N, V]."""
    from distill_ops.kernels.fused_linear import default_config, fused_linear_stats, grad_chunk_columns

    rows, vocab, hidden = 96, 1024, 64
    case = _case((rows,), hidden, vocab, dtype, seed=30)
    _, _, row_stats = fused_linear_stats(
        case["student_hidden"], case["student_weight"], None, case["teacher_hidden"], case["teacher_weight"],
        None, None, None, divergence="forward", coef=0.0, temperature=1.0, has_ce=False,
    )
    scale = torch.full((rows,), 1.0 / rows, device=DEVICE)
    inputs = _Inputs(case["student_hidden"], case["student_weight"], None, case["teacher_hidden"],
                     case["teacher_weight"], None, None)
    block_v = default_config(torch.bfloat16, "grad")[1]
    chunk = grad_chunk_columns(rows, vocab, block_v)
    existing = [*case.values(), row_stats, scale]
    with _NewStorages(existing) as recorder:
        d_hidden, d_weight, _ = fused_linear_backward_triton(
            inputs, None, row_stats, scale, None, divergence="forward", coef=0.0, temperature=1.0,
            need_weight_grad=True, need_bias_grad=False, accumulation=accumulation,
        )
        # What the custom op returns to autograd: the gradients in the inputs' dtype.
        d_hidden = d_hidden.to(dtype)
    assert chunk < vocab  # several chunks: the accumulation path runs
    extra = recorder.bytes_except(d_hidden, d_weight)
    compensated_budget = 2 * rows * chunk + 2 * rows * hidden
    if accumulation == "compensated" and dtype == torch.bfloat16:
        assert extra <= compensated_budget, (extra, recorder.storages)
    else:
        assert extra >= compensated_budget + 2 * rows * hidden, (extra, recorder.storages)
    target_rows, target_hidden, target_vocab = 8192, 4096, 131072
    target_chunk = grad_chunk_columns(target_rows, target_vocab, block_v)
    assert 2 * target_rows * (target_chunk + target_hidden) < 0.02 * 4 * target_rows * target_vocab


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import gc, json, os, resource, sys
    os.environ.pop("TRITON_INTERPRET", None)
    import torch
    from distill_ops import fused_linear as fl

    # One thread: the same memory, and no OpenMP spin-waiting on a shared, loaded CI machine.
    torch.set_num_threads(1)

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def make(rows, vocab, hidden):
        g = torch.Generator().manual_seed(0)
        return (torch.randn(rows, hidden, generator=g).requires_grad_(True),
                (torch.randn(vocab, hidden, generator=g) * 0.1).requires_grad_(True),
                torch.randn(rows, hidden, generator=g), torch.randn(vocab, hidden, generator=g) * 0.1)

    def step(tensors):
        fl.fused_linear_kl_div(*tensors, divergence="forward", impl="torch").backward()

    step(make(256, 8192, 256))  # pages in the code (and chunk-sized buffers) of every op the pass uses
    gc.collect()
    rows, vocab, hidden = map(int, sys.argv[1:4])
    tensors = make(rows, vocab, hidden)
    gc.collect()
    before = rss()
    def high_water_mark():
        # VmHWM, not ru_maxrss: ru_maxrss also remembers the parent's size inherited through
        # fork + exec (a large pytest worker with CUDA libraries loaded), which clear_refs does not reset.
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    try:  # reset the RSS high-water mark (Linux >= 4.0) so that VmHWM is this pass's peak
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    peak_before = high_water_mark()
    step(tensors)
    peak = high_water_mark()
    print(json.dumps({"before": before, "peak_before": peak_before, "peak": peak, "reset": reset}))
    """
)


def test_torch_fallback_peak_memory_below_quarter_of_one_n_by_v_tensor():
    """N=2048, V=65536, H=256 fp32 in a fresh process: peak RSS above the inputs < 25 % of [N, V] fp32.

    The gradients of the hidden states and of the weight (64 MiB) count against the budget too.
    """
    rows, vocab, hidden = 2048, 65536, 256
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, str(rows), str(vocab), str(hidden)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    # Without a high-water-mark reset, the process peak before the pass must lie below the level the
    # pass starts from, or ru_maxrss would not describe the pass.
    assert measured["reset"] or measured["peak_before"] <= measured["before"], measured
    extra = measured["peak"] - measured["before"]
    one_logits_tensor = rows * vocab * 4
    assert extra < 0.25 * one_logits_tensor, (
        f"extra {extra / 2**20:.1f} MiB vs [N, V] fp32 {one_logits_tensor / 2**20:.0f} MiB"
    )


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


def test_bad_inputs():
    case = _case((4,), 8, 10, torch.float32, seed=22)
    hs, w, ht, wt = case["student_hidden"], case["student_weight"], case["teacher_hidden"], case["teacher_weight"]
    labels = _labels((4,), 10, 23)
    with pytest.raises(ValueError, match="teacher_hidden must have student_hidden's leading dims"):
        fused_linear_kl_div(hs, w, ht[:3], wt)
    with pytest.raises(ValueError, match="student_weight must have shape"):
        fused_linear_kl_div(hs, w[:, :5], ht, wt)
    with pytest.raises(ValueError, match="teacher_weight must have shape"):
        fused_linear_kl_div(hs, w, ht, wt[:, :5])
    with pytest.raises(ValueError, match="given twice"):
        fused_linear_kl_div(hs, w, ht, wt, teacher_logits=torch.zeros(4, 10, device=hs.device))
    with pytest.raises(ValueError, match="no teacher"):
        fused_linear_kl_div(hs, w)
    with pytest.raises(ValueError, match="no teacher: teacher_weight"):
        fused_linear_kl_div(hs, w, ht)
    with pytest.raises(ValueError, match="teacher_logits must have student_hidden's leading dims"):
        fused_linear_kl_div(hs, w, teacher_logits=torch.zeros(5, 10, device=hs.device))
    with pytest.raises(ValueError, match="needs labels"):
        fused_linear_kl_div(hs, w, ht, wt, ce_weight=0.5)
    with pytest.raises(ValueError, match="ce_weight must be in"):
        fused_linear_kl_div(hs, w, ht, wt, labels=labels, ce_weight=-1.0)
    with pytest.raises(ValueError, match="kl_weight must be in"):
        fused_linear_kl_div(hs, w, ht, wt, kl_weight=-0.5)
    with pytest.raises(TypeError, match="share a dtype"):
        fused_linear_kl_div(hs, w.double().float().half(), ht, wt)
    with pytest.raises(TypeError, match="student_hidden must have dtype"):
        fused_linear_kl_div(hs.double(), w.double(), ht, wt)
    with pytest.raises(TypeError, match="labels must have dtype"):
        fused_linear_kl_div(hs, w, ht, wt, labels=labels.float())
    with pytest.raises(ValueError, match="student_bias must have shape"):
        fused_linear_kl_div(hs, w, ht, wt, student_bias=torch.zeros(9, device=hs.device))
    with pytest.raises(ValueError, match="vocabulary size 10 but teacher_weight has 12"):
        fused_linear_kl_div(hs, w, ht, torch.zeros(12, 8, device=hs.device))
    with pytest.raises(ValueError, match="divergence must be one of"):
        fused_linear_kl_div(hs, w, ht, wt, divergence="kl")
    with pytest.raises(ValueError, match="impl must be one of"):
        fused_linear_kl_div(hs, w, ht, wt, impl="cuda")
    with pytest.raises(TypeError, match="teacher_hidden must be a torch.Tensor"):
        fused_linear_kl_div(hs, w, ht.tolist(), wt)
    for flag in ("yes", 1):  # 1 == True passed the old check
        with pytest.raises(TypeError, match=f"return_entropy must be a bool, got {type(flag).__name__}"):
            fused_linear_kl_div(hs, w, ht, wt, return_entropy=flag)
    with pytest.raises(ValueError, match="student_weight must have at least one row"):  # was a ZeroDivisionError
        fused_linear_kl_div(hs, w[:0], teacher_logits=torch.zeros(4, 0, device=hs.device))
    with pytest.raises(ValueError, match="student_hidden must have a width of at least 1"):  # was a RuntimeError
        fused_linear_kl_div(hs[:, :0], w[:, :0], teacher_logits=torch.zeros(4, 10, device=hs.device))
    with pytest.raises(ValueError, match="teacher_hidden must have a width of at least 1"):
        fused_linear_kl_div(hs, w, ht[:, :0], wt[:, :0])


@pytest.mark.parametrize("impl", IMPLS)
def test_cross_entropy_labels_out_of_range(impl, monkeypatch):
    """A counted label outside [0, V) with ce_weight > 0: a ValueError on CPU tensors; where the values are not
    read (CUDA, compile: simulated by making them unreadable) the row's loss is NaN on every impl. It was a silent
    loss: the PyTorch path took 0 for the missing label logit, the kernel +inf (for labels >= V)."""
    case = _case((4,), 8, 10, torch.float32, seed=24)
    for bad in (10, -3):
        labels = torch.tensor([1, 2, bad, -100], device=DEVICE)
        with pytest.raises(ValueError, match=rf"labels must be in \[0, 10\) or equal ignore_index=-100 when "
                                             rf"ce_weight > 0, got values from {min(bad, 1)} to {max(bad, 2)}"):
            fused_linear_kl_div(**case, labels=labels, ce_weight=0.5, impl=impl)
        # Only the cross-entropy reads them as classes: with ce_weight=0 they only mark ignored rows.
        assert torch.isfinite(fused_linear_kl_div(**case, labels=labels, impl=impl))
        monkeypatch.setattr(sys.modules["distill_ops._utils"], "host_readable", lambda tensor: False)
        rows = fused_linear_kl_div(**case, labels=labels, ce_weight=0.5, reduction="none", impl=impl)
        monkeypatch.undo()
        assert rows[2].isnan() and torch.isfinite(rows[:2]).all() and rows[3] == 0


@pytest.mark.parametrize("name", ["student_softcap", "teacher_softcap"])
def test_bad_softcaps(name, monkeypatch):
    case = _case((4,), 8, 10, torch.float32, seed=25)
    args = (case["student_hidden"], case["student_weight"], case["teacher_hidden"], case["teacher_weight"])

    def no_kernel(*_, **__):
        raise AssertionError("a kernel ran before the arguments were checked")

    monkeypatch.setattr(fused_linear_module, "fused_linear_stats_torch", no_kernel)
    for value, shown in ((0.0, "got 0.0"), (-30.0, "got -30.0"), (float("inf"), "got inf"), (float("nan"), "got nan")):
        with pytest.raises(ValueError, match=f"{name} must be None or a finite number > 0.*{shown}"):
            fused_linear_kl_div(*args, impl="torch", **{name: value})
        with pytest.raises(ValueError, match=f"{name} must be None or a finite number > 0.*{shown}"):
            FusedLinearKLDivLoss(**{name: value})
    for value, shown in (("30", "got '30' of type str"), (True, "got True of type bool"),
                         (torch.tensor(30.0), "got tensor\\(30.\\) of type Tensor")):
        with pytest.raises(TypeError, match=f"{name} must be None or a finite number > 0.*{shown}"):
            fused_linear_kl_div(*args, impl="torch", **{name: value})
    with pytest.raises(ValueError, match="teacher_softcap=30.0 was given with teacher_logits"):
        fused_linear_kl_div(case["student_hidden"], case["student_weight"], teacher_logits=torch.zeros(4, 10),
                            teacher_softcap=30.0, impl="torch")


def test_bad_devices():
    case = _case((4,), 8, 10, torch.float32, seed=24)
    meta_weight = torch.empty(10, 8, device="meta")
    with pytest.raises(ValueError, match="student_weight is on meta"):
        fused_linear_kl_div(case["student_hidden"], meta_weight, case["teacher_hidden"], case["teacher_weight"])


def test_block_sweep_launches_compute_the_statistics_and_gradient():
    """Every swept launch configuration of the benchmark gives the forward-KL statistics and dL/dz of the
    reference (Triton interpreter on CPU; the configurations are the 16-bit GPU candidates)."""
    from benchmarks import bench_fused_linear as bench

    rows, hidden, vocab = 5, 24, 300
    case = bench.sweep_case(rows, hidden, vocab, torch.float32, DEVICE.type)
    assert sum("(default)" in name for name in case.impls) == 3 and case.forward_only
    s_hidden, s_weight, t_hidden, t_weight = bench.make_inputs(rows, hidden, vocab, torch.float32, DEVICE.type)
    z = s_hidden.double() @ s_weight.double().T
    t = t_hidden.double() @ t_weight.double().T
    expected, _ = kl_div_reference(z, t, reduction="none")
    _, expected_grad = kl_div_reference(z, t, reduction="mean")  # the sweep scales rows by 1 / N
    for name, setup in case.impls.items():
        out = setup()()
        if name.startswith("stats"):
            assert_close(out[0], expected, torch.float32, msg=name)
        elif name.startswith("d_hidden"):  # one chunk's update from zero: hi (+ lo) = dz @ W_chunk
            total, lo, grad, weight_chunk = out
            total = total.double() + (0.0 if lo is None else lo.double())
            assert_close(total, grad.double() @ weight_chunk.double(), torch.float32, msg=name)
        else:
            chunk = out.shape[1]
            assert_close(out, expected_grad[:, :chunk], torch.float32, msg=name)


def test_target_summary_reads_the_issue_definitions():
    """The target table uses the issue's FLOP count and the memory above the floor (synthetic inputs)."""
    from benchmarks import bench_fused_linear as bench

    rows, hidden, vocab = bench.TARGET_SHAPE
    params = {"N": rows, "H": hidden, "V": vocab, "dtype": "bf16", "divergence": "jsd"}
    flops = bench.issue_flops(rows, hidden, vocab)
    assert flops == 12 * rows * vocab * hidden
    floor = 1 << 30
    results = [
        {"op": bench.OP, "impl": "ours_triton", "params": params, "full_ms": flops / 0.6e15 * 1e3,
         "case_memory_bytes": floor + int(0.01 * 4 * rows * vocab), "memory_floor_bytes": floor},
        {"op": bench.OP, "impl": "liger", "params": params, "full_ms": 3 * flops / 0.6e15 * 1e3},
    ]
    meta = {"device": "cuda", "device_name": "test", "peak_bf16_flops": 1.0e15}
    text = bench.summarize_results(results, meta)
    assert "| ours_triton | ≥ 50 % of bf16 dense peak (issue FLOPs 12·N·V·H) | 60.0 % | met |" in text
    assert "3.00× | met" in text and "1.0 % | met" in text and "| ours_triton_gemm | all | not measured | - |" in text
    results[0]["full_ms"] *= 2
    results[0]["case_memory_bytes"] = floor + int(0.03 * 4 * rows * vocab)
    text = bench.summarize_results(results, meta)
    assert "30.0 % | **missed**" in text and "1.50× | **missed**" in text and "3.0 % | **missed**" in text
    text = bench.summarize_results(results, {"device": "cuda", "device_name": "an unknown GPU"})
    assert "| ours_triton | ≥ 50 % of bf16 dense peak (issue FLOPs 12·N·V·H) | not measured" in text  # was left out
    assert bench.summarize_results(results, {"device": "cpu"}) == ""


def test_gemm_strategy_runs_chunked_cublas_logits(monkeypatch):
    """With TRITON_STRATEGY = "gemm" the logits come from logits_chunk (one call per side and chunk and sweep),
    several chunks at this size, and the result matches the tiles strategy's."""
    calls = []
    original = fused_linear_kernels.logits_chunk

    def counting(hidden, weight, start, stop, out):
        calls.append((start, stop))
        return original(hidden, weight, start, stop, out)

    case = _case((37,), 48, 203, torch.float32, ht=40, biases=True, seed=21)
    kwargs = dict(divergence="jsd", labels=_labels((37,), 203, 22), ce_weight=0.5)
    tiles_loss, tiles_grads, _ = _run(case, "triton", **kwargs)
    monkeypatch.setattr(fused_linear_kernels, "logits_chunk", counting)
    gemm_loss, gemm_grads, _ = _run(case, "triton_gemm", **kwargs)
    # Two chunks ([0, 128), [128, 203)) of two tiles each; student and teacher; two forward sweeps (jsd) and the
    # backward.
    assert fused_linear_kernels.GEMM_CHUNK_CONFIG[1] == 64
    assert sorted(set(calls)) == [(0, 128), (128, 203)] and len(calls) == 2 * 2 * 3
    assert_close(gemm_loss, tiles_loss, torch.float32)
    for name in tiles_grads:
        assert_close(gemm_grads[name], tiles_grads[name], torch.float32, name)


# From a mutation audit of the Triton path: logits far below 0 (the running max must follow them down), and a
# padded student head with a bias (both cut to vocab_size).


@pytest.mark.parametrize("impl", FL_IMPLS)
def test_student_logits_far_below_zero_keep_their_log_sum_exp(impl):
    """Every student logit near -120 (a constant shift: softmax, divergence, CE and gradients are unchanged): the
    statistics kernel's running maximum must follow the logits down. A running max floored at 0 makes every
    exp(a - max) underflow to 0 in fp32 (log-sum-exp -inf); the suite's logits (std ~2, max > 0) cannot tell."""
    case = _case((21,), 24, 90, torch.float32, biases=True, seed=50)
    case["student_bias"] = case["student_bias"] - 120.0
    _check(case, impl, divergence="forward", labels=_labels((21,), 90, 51), ce_weight=0.5)


@pytest.mark.parametrize("impl", FL_IMPLS)
def test_student_head_and_bias_wider_than_vocab_size(impl):
    """vocab_size < the student's V with a student bias (a padded LM head with bias, dense teacher logits of the
    compared width): only the first vocab_size weight rows / bias entries are read, the others get zero gradient,
    and the bias gradient has the bias's shape. The suite's padded-student case (test_peer_bugs_losses) has no bias."""
    case = _case((13,), 24, 211, torch.float32, teacher_logits=True, teacher_vocab=203, biases=True, seed=54)
    _check(case, impl, divergence="jsd", vocab_size=203, labels=_labels((13,), 203, 55), ce_weight=0.5)


@pytest.mark.parametrize("impl", FL_IMPLS)
def test_return_entropy_with_masked_student_columns(impl):
    """return_entropy with -inf student bias entries (masked tokens, as test_masked_vocabulary_minus_inf_bias): those
    columns have q = 0 and contribute 0 to H = -sum q log q, not 0 * -inf = NaN. Every ENTROPY_CASES case has finite
    logits, so an entropy sum of q * (z / T) without the q == 0 guard passed them."""
    case = _case((2, 5), 24, 70, torch.float32, biases=True, seed=35)
    for name in ("student_bias", "teacher_bias"):  # masked on both sides: the loss stays finite
        case[name][::7] = float("-inf")
    labels = _labels((2, 5), 70, 36)
    labels[labels % 7 == 0] = 1  # targets are never masked tokens
    with _strategy(impl) as backend:
        loss, entropy = fused_linear_kl_div(**case, labels=labels, ce_weight=0.5, temperature=1.7,
                                            return_entropy=True, impl=backend)
    logits = case["student_hidden"].double().cpu() @ case["student_weight"].double().cpu().T
    logits = logits + case["student_bias"].double().cpu()
    expected = torch.special.entr(torch.softmax(logits / 1.7, dim=-1)).sum(-1)  # entr(0) = 0
    expected = torch.where(labels.cpu() != -100, expected, 0.0)
    assert torch.isfinite(loss)
    assert_close(entropy, expected, torch.float32, "entropy")
    assert (expected[labels.cpu() != -100] > 0.5).all()


def test_bad_inputs_teacher_bias_or_zero_temperature():
    """Two checks test_bad_inputs does not reach: a teacher_bias beside teacher_logits is the teacher given twice (it
    was silently dropped when only the bias came with the logits), and temperature 0 is refused as in kl_div (it would
    divide the logits by 0)."""
    case = _case((4,), 8, 10, torch.float32, seed=22)
    hs, w, ht, wt = case["student_hidden"], case["student_weight"], case["teacher_hidden"], case["teacher_weight"]
    logits = torch.zeros(4, 10, device=hs.device)
    with pytest.raises(ValueError, match="given twice"):
        fused_linear_kl_div(hs, w, teacher_logits=logits, teacher_bias=torch.zeros(10, device=hs.device))
    for temperature in (0.0, -1.0):
        with pytest.raises(ValueError, match=rf"temperature must be in \(0.0, inf\), got {temperature}"):
            fused_linear_kl_div(hs, w, ht, wt, temperature=temperature, impl="torch")
        with pytest.raises(ValueError, match=rf"temperature must be in \(0.0, inf\), got {temperature}"):
            fused_linear_kl_div(hs, w, teacher_logits=logits, temperature=temperature, impl="torch")


def test_bad_reduction_and_normalizer_are_refused():
    """fused_linear_kl_div checks reduction and normalizer as kl_div does: without the check an unknown reduction
    ("batchmean") silently summed the rows and a normalizer beside reduction="sum" or <= 0 was silently used or
    dropped."""
    case = _case((4,), 8, 10, torch.float32, seed=22)
    args = (case["student_hidden"], case["student_weight"], case["teacher_hidden"], case["teacher_weight"])
    with pytest.raises(ValueError, match="reduction must be one of"):
        fused_linear_kl_div(*args, reduction="batchmean", impl="torch")
    with pytest.raises(ValueError, match="normalizer only applies"):
        fused_linear_kl_div(*args, reduction="sum", normalizer=4.0, impl="torch")
    with pytest.raises(ValueError, match=r"normalizer must be in \[0.0, inf\), got -2.0"):
        fused_linear_kl_div(*args, normalizer=-2.0, impl="torch")


def test_target_summary_thresholds_and_shape():
    """Exactly 50 % of the peak and exactly 2x Liger are met (the issue says ≥); results at another shape are not
    the target shape's (here a faster Liger and a ours_triton_gemm at a smaller N)."""
    from benchmarks import bench_fused_linear as bench

    rows, hidden, vocab = bench.TARGET_SHAPE
    params = {"N": rows, "H": hidden, "V": vocab, "dtype": "bf16", "divergence": "jsd"}
    other = dict(params, N=4096)
    flops = bench.issue_flops(rows, hidden, vocab)
    ms = flops / 0.5e15 * 1e3
    assert flops / (ms * 1e-3) / 1.0e15 == 0.5  # exactly the threshold
    results = [
        {"op": bench.OP, "impl": "ours_triton", "params": params, "full_ms": ms},
        {"op": bench.OP, "impl": "liger", "params": params, "full_ms": 2 * ms},
        {"op": bench.OP, "impl": "liger", "params": other, "full_ms": ms / 4},
        {"op": bench.OP, "impl": "ours_triton_gemm", "params": other, "full_ms": ms / 4},
    ]
    text = bench.summarize_results(results, {"device": "cuda", "device_name": "test", "peak_bf16_flops": 1.0e15})
    assert "| ours_triton | ≥ 50 % of bf16 dense peak (issue FLOPs 12·N·V·H) | 50.0 % | met |" in text
    assert "| ours_triton | ≥ 2× faster than Liger's fused linear JSD | 2.00× | met |" in text
    assert "| ours_triton_gemm | all | not measured | - |" in text


def test_weights_and_biases_must_have_exactly_their_dims():
    """A weight with an extra trailing dim ([V, H, 1]: its width still matches) or a 2-D bias ([1, V]) is an error
    naming it, its expected number of dims and its shape."""
    case = _case((4,), 8, 10, torch.float32, seed=26)
    hs, w, ht, wt = case["student_hidden"], case["student_weight"], case["teacher_hidden"], case["teacher_weight"]
    with pytest.raises(ValueError, match=r"student_weight must have 2 dims, got shape \(10, 8, 1\)"):
        fused_linear_kl_div(hs, w.unsqueeze(-1), ht, wt)
    with pytest.raises(ValueError, match=r"teacher_weight must have 2 dims, got shape \(10, 8, 1\)"):
        fused_linear_kl_div(hs, w, ht, wt.unsqueeze(-1))
    with pytest.raises(ValueError, match=r"student_bias must have 1 dim, got shape \(10, 1\)"):
        fused_linear_kl_div(hs, w, ht, wt, student_bias=torch.zeros(10, 1, device=hs.device))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("teacher", ["hidden", "logits"])
def test_every_argument_in_every_layout(teacher, impl):
    """A layout audit (2026-12-07): each tensor argument (hidden states, LM-head weights and biases, teacher
    logits, labels) given at a storage offset, as a column slice (padded rows), with stride 2 along the last dim,
    transposed, leading dims permuted, and (the teacher's per-token tensors and labels, shared by the batch)
    expand()ed with stride 0 over the batch: loss and gradients are the float64 reference's, and no input's storage
    (the view's padding included) is written, in forward or backward."""
    from tests._layouts import bit_equal, layout_calls

    case = _case((2, 3), 19, 37, torch.float32, biases=teacher == "hidden", teacher_logits=teacher == "logits",
                 seed=90)
    for name in ("teacher_hidden", "teacher_logits"):
        if name in case:
            case[name] = case[name][:1].expand_as(case[name]).contiguous()
    labels = torch.tensor([[4, -100, 36]], device=DEVICE).expand(2, 3).contiguous()
    inputs = dict(case, labels=labels)
    upstream = 0.5 + torch.rand((2, 3), generator=torch.Generator().manual_seed(93)).to(DEVICE)
    options = dict(divergence="jsd", ce_weight=0.5, reduction="none")
    expected, expected_grads = _reference(case, upstream, labels=labels, **options)
    for name, layout, args, base, place in layout_calls(inputs, inputs, shared=("teacher_hidden", "teacher_logits",
                                                                                "labels")):
        before = base.clone()
        leaves = {k: args[k].detach().clone().requires_grad_(True) for k in GRAD_INPUTS if k in args and k != name}
        args.update(leaves)
        if name in GRAD_INPUTS:
            base.requires_grad_(True)
            args[name] = place(base)
        loss = fused_linear_kl_div(args.pop("student_hidden"), args.pop("student_weight"), args.pop("teacher_hidden",
                                   None), args.pop("teacher_weight", None), **args, **options, impl=impl)
        loss.backward(upstream)
        assert_close(loss, expected, torch.float32, f"{name} {layout}: loss")
        for key, expected_grad in expected_grads.items():
            grad = place(base.grad) if key == name else leaves[key].grad
            assert_close(grad, expected_grad, torch.float32, f"{name} {layout}: gradient of {key}")
        assert bit_equal(base.detach(), before), f"{name} {layout}: the input's storage was written"
