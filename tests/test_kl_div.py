"""kl_div / KLDivLoss: parity with the float64 reference, an independent formulation, edge cases, bad input."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

import distill_ops
from distill_ops import (
    DIVERGENCES,
    AlignDistilLoss,
    FusedLinearKLDivLoss,
    KLDivLoss,
    aligndistil_kl,
    fused_linear_kl_div,
    kl_div,
    kl_div_reference,
    topk_kl_div,
)
from tests._definitions import divergence_rows, reduce_rows
from tests.conftest import DEVICE, IMPLS, TOLERANCES, RecordTensorOps, assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _logits(shape, dtype, seed, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def _run(student, teacher, impl, upstream=None, **kwargs):
    """Loss and gradient of ``kl_div`` (backward with an upstream gradient that is not 1)."""
    student = student.detach().clone().requires_grad_(True)
    loss = kl_div(student, teacher, impl=impl, **kwargs)
    if upstream is None:
        upstream = torch.full_like(loss, 1.7)
    loss.backward(upstream)
    return loss, student.grad, upstream


def independent_reference(student, teacher, upstream, *, divergence="forward", beta=0.5, alpha=0.1, temperature=1.0,
                          labels=None, ignore_index=-100, reduction="mean", normalizer=None, vocab_size=None):
    """``(loss, d (loss . upstream) / d student)`` in float64, written from the definitions with autograd: no
    package code (``kl_div_reference`` runs the PyTorch path's own helpers, so it cannot be the torch impl's
    oracle)."""
    vocab = student.shape[-1] if vocab_size is None else vocab_size
    student64 = student.detach().double().cpu().requires_grad_(True)
    rows = divergence_rows(student64[..., :vocab], teacher.detach().double().cpu()[..., :vocab], divergence, beta,
                           alpha, temperature)
    active = None if labels is None else labels.cpu() != ignore_index
    if active is not None:
        rows = torch.where(active, rows, 0.0)
    flat_active = None if active is None else active.reshape(-1)
    loss = reduce_rows(rows.reshape(-1), flat_active, reduction, None if normalizer is None else float(normalizer))
    if reduction == "none":
        loss = loss.reshape(rows.shape)
    (grad,) = torch.autograd.grad((loss * upstream.detach().double().cpu()).sum(), student64)
    return loss.detach(), grad


def _check_against_reference(student, teacher, impl, **kwargs):
    loss, grad, upstream = _run(student, teacher, impl, **kwargs)
    ref_loss, expected_grad = independent_reference(student, teacher, upstream, **kwargs)
    dtype = student.dtype
    assert loss.dtype == torch.float32
    assert loss.shape == ref_loss.shape
    assert_close(loss, ref_loss, dtype, "loss")
    assert grad.dtype == student.dtype
    assert_close(grad, expected_grad, dtype, "gradient")


# ----------------------------------------------------------------------------------------------
# Parity
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_parity_divergence_reduction_dtype(divergence, reduction, dtype, impl):
    student = _logits((3, 5, 1000), dtype, seed=1)
    teacher = _logits((3, 5, 1000), dtype, seed=2)
    labels = torch.randint(0, 1000, (3, 5), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    labels[0, 1] = -100
    labels[2, 4] = -100
    _check_against_reference(
        student, teacher, impl, divergence=divergence, reduction=reduction, labels=labels, temperature=1.5,
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("vocab", [1, 7, 1000, 32003])
@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd", "tvd"])
def test_parity_vocab_sizes(divergence, vocab, impl):
    rows = 2 if vocab > 10000 else 4
    student = _logits((rows, vocab), torch.float32, seed=vocab)
    teacher = _logits((rows, vocab), torch.float32, seed=vocab + 1)
    _check_against_reference(student, teacher, impl, divergence=divergence)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("divergence", ["skew_forward", "skew_reverse", "jsd"])
@pytest.mark.parametrize("coef", [0.0, 0.3, 0.9])
def test_parity_mixture_coefficients(divergence, coef, impl):
    student = _logits((6, 300), torch.float32, seed=11)
    teacher = _logits((6, 300), torch.float32, seed=12)
    kwargs = {"beta": coef} if divergence == "jsd" else {"alpha": coef}
    _check_against_reference(student, teacher, impl, divergence=divergence, **kwargs)


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_inputs(impl):
    base_student = _logits((40, 2, 6), torch.float32, seed=5)
    base_teacher = _logits((6, 2, 40), torch.float32, seed=6)
    student = base_student.permute(2, 1, 0)  # [6, 2, 40], vocabulary stride != 1
    teacher = base_teacher[:, :, :]  # contiguous
    teacher_strided = _logits((6, 4, 40), torch.float32, seed=7)[:, ::2, :]  # row stride gaps
    for t in (teacher, teacher_strided):
        _check_against_reference(student, t, impl, divergence="jsd", reduction="none")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", IMPLS)
def test_shifted_batch_logits_are_read_in_place(impl, dtype, monkeypatch):
    """``student[:, :-1]`` / ``teacher[:, 1:]`` of a batch (the usual label shift; rows not evenly spaced, so not
    viewable as [N, V]) are read where they lie: the forward allocates one [N, V] tensor, the gradient (both inputs
    were copied whole before). Loss and gradient equal those of contiguous copies exactly; the torch path's row
    chunks stop at each sequence's end (forced to 2 rows) or, for sequences shorter than a chunk (16 rows), take
    whole sequences (two per chunk here)."""
    import sys

    batch, length, vocab = 3, 7, 301
    student_full = _logits((batch, length + 1, vocab), dtype, seed=50)
    teacher_full = _logits((batch, length + 1, vocab), dtype, seed=51)
    labels = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(52)).to(DEVICE)
    labels[1, 3] = -100
    for divergence, reduction, step in (("forward", "mean", 2), ("jsd", "none", 2), ("reverse", "none", 16)):
        monkeypatch.setattr(sys.modules["distill_ops.kl_div"], "row_chunk", lambda rows, vocab, step=step: step)
        leaf = student_full.clone().requires_grad_(True)
        with RecordTensorOps() as recorder:
            loss = kl_div(leaf[:, :-1], teacher_full[:, 1:], divergence=divergence, labels=labels,
                          reduction=reduction, impl=impl)
        assert recorder.ops_with_numel(batch * length * vocab) == ["aten.empty.memory_format"], recorder.records
        loss.backward(torch.ones_like(loss))
        expected, expected_grad, _ = _run(student_full[:, :-1].contiguous(), teacher_full[:, 1:].contiguous(), impl,
                                          upstream=torch.ones_like(loss), divergence=divergence, labels=labels,
                                          reduction=reduction)
        assert torch.equal(loss, expected)
        assert torch.equal(leaf.grad[:, :-1], expected_grad)
        assert torch.count_nonzero(leaf.grad[:, -1]) == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_shift_along_an_outer_leading_dim_is_read_in_place(impl, monkeypatch):
    """``logits[:, 1:]`` of ``[A, B + 1, L, V]`` (the leading dims merge only as A groups of B·L rows): read in place,
    as for the last-dim shift; it was copied whole, the row groups being formed only by splitting off the last
    leading dim (found by the review of the fused-linear teacher-logits change). Loss and gradient equal those of
    contiguous copies exactly. The torch path's row chunks are forced to 5 rows (smaller than [N, V])."""
    import sys

    monkeypatch.setattr(sys.modules["distill_ops.kl_div"], "row_chunk", lambda rows, vocab: 5)
    outer, inner, length, vocab = 2, 3, 4, 129
    student_full = _logits((outer, inner + 1, length, vocab), torch.float32, seed=55)
    teacher_full = _logits((outer, inner + 1, length, vocab), torch.float32, seed=56)
    leaf = student_full.clone().requires_grad_(True)
    with RecordTensorOps() as recorder:
        loss = kl_div(leaf[:, 1:], teacher_full[:, 1:], divergence="jsd", impl=impl)
    assert recorder.ops_with_numel(outer * inner * length * vocab) == ["aten.empty.memory_format"], recorder.records
    loss.backward()
    expected, expected_grad, _ = _run(student_full[:, 1:].contiguous(), teacher_full[:, 1:].contiguous(), impl,
                                      upstream=torch.ones_like(loss), divergence="jsd")
    assert torch.equal(loss, expected)
    assert torch.equal(leaf.grad[:, 1:], expected_grad)
    assert torch.count_nonzero(leaf.grad[:, 0]) == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_inplace_grad_allocates_no_gradient(impl, monkeypatch):
    """``inplace_grad=True`` writes the gradient straight over the student: no [N, V] buffer on either impl (the
    torch path allocated one and copied it over the student; its row chunks are forced to 2 rows here, so that its
    temporaries are smaller than [N, V])."""
    import sys

    monkeypatch.setattr(sys.modules["distill_ops.kl_div"], "row_chunk", lambda rows, vocab: 2)
    student = _logits((5, 211), torch.float32, seed=53).requires_grad_(True)
    teacher = _logits((5, 211), torch.float32, seed=54)
    with RecordTensorOps() as recorder:
        kl_div(student, teacher, divergence="jsd", inplace_grad=True, impl=impl)
    assert recorder.ops_with_numel(5 * 211) == [], recorder.records


@pytest.mark.parametrize("impl", IMPLS)
def test_vocab_size_truncation(impl):
    student = _logits((4, 1000), torch.float32, seed=8)
    teacher = _logits((4, 1037), torch.float32, seed=9)  # teacher vocabulary padded beyond the student's
    _check_against_reference(student, teacher, impl, divergence="forward", vocab_size=1000)
    loss, grad, _ = _run(teacher, student, impl, divergence="reverse", vocab_size=1000)
    assert torch.all(grad[:, 1000:] == 0)
    _check_against_reference(teacher, student, impl, divergence="reverse", vocab_size=1000)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mixed_student_teacher_dtypes(impl, dtype):
    student = _logits((5, 777), dtype, seed=10)
    teacher = _logits((5, 777), torch.float32 if dtype != torch.float32 else torch.bfloat16, seed=11)
    _check_against_reference(student, teacher, impl, divergence="jsd")


@pytest.mark.parametrize("impl", IMPLS)
def test_normalizer_replaces_count(impl):
    student = _logits((2, 3, 100), torch.float32, seed=12)
    teacher = _logits((2, 3, 100), torch.float32, seed=13)
    total = kl_div(student, teacher, reduction="sum", impl=impl)
    for normalizer in (7.0, torch.tensor(7.0, device=DEVICE)):
        loss = kl_div(student, teacher, normalizer=normalizer, impl=impl)
        assert_close(loss, total / 7.0, torch.float32)
    _check_against_reference(student, teacher, impl, normalizer=7.0)


# ----------------------------------------------------------------------------------------------
# The reference against an independent formulation (F.kl_div / log_softmax / TRL's JSD)
# ----------------------------------------------------------------------------------------------


def _independent_rows(student, teacher, divergence, beta=0.5, alpha=0.1, temperature=1.0):
    log_q = F.log_softmax(student.double() / temperature, -1)
    log_p = F.log_softmax(teacher.double() / temperature, -1)
    if divergence == "forward":
        return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    if divergence == "reverse":
        return F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)
    if divergence == "jsd":
        return _trl_style_jsd_rows(log_q, log_p, beta)
    if divergence == "skew_forward":
        mix = torch.log(alpha * log_p.exp() + (1 - alpha) * log_q.exp())
        return F.kl_div(mix, log_p, reduction="none", log_target=True).sum(-1)
    if divergence == "skew_reverse":
        mix = torch.log(alpha * log_q.exp() + (1 - alpha) * log_p.exp())
        return F.kl_div(mix, log_q, reduction="none", log_target=True).sum(-1)
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


def _trl_style_jsd_rows(log_q, log_p, beta):
    """TRL's generalized JSD, per row: endpoints are plain KLs; otherwise the log-space mixture."""
    if beta == 0:
        return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    if beta == 1:
        return F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)
    beta_t = torch.tensor(beta, dtype=log_q.dtype)
    log_mix = torch.logsumexp(torch.stack([log_q + torch.log1p(-beta_t), log_p + torch.log(beta_t)]), dim=0)
    kl_teacher = F.kl_div(log_mix, log_p, reduction="none", log_target=True).sum(-1)
    kl_student = F.kl_div(log_mix, log_q, reduction="none", log_target=True).sum(-1)
    return beta * kl_teacher + (1 - beta) * kl_student


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_reference_matches_independent_formulation(divergence):
    student = _logits((6, 257), torch.float64, seed=20).cpu()
    teacher = _logits((6, 257), torch.float64, seed=21).cpu()
    student.requires_grad_(True)
    expected = _independent_rows(student, teacher, divergence, temperature=2.0)
    (expected_grad,) = torch.autograd.grad(expected.sum(), student)
    loss, grad = kl_div_reference(student, teacher, divergence=divergence, temperature=2.0, reduction="sum")
    torch.testing.assert_close(loss, expected.sum().detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-8, atol=1e-10)
    # kl_div_reference is the oracle of other tests here and of the fused-linear tests: it equals the definitions
    # (independent_reference) for every reduction, labels, normalizer, vocab_size and mixture coefficient too.
    labels = torch.tensor([3, -100, 5, 7, -100, 1])
    coefficient = dict(beta=0.3) if divergence == "jsd" else dict(alpha=0.6) if divergence.startswith("skew") else {}
    for options in (dict(reduction="mean", labels=labels), dict(reduction="none", labels=labels, ignore_index=5),
                    dict(reduction="mean", normalizer=4.5, vocab_size=200), dict(reduction="sum", temperature=0.7)):
        kwargs = dict(divergence=divergence, **coefficient, **options)
        loss, grad = kl_div_reference(student, teacher, **kwargs)
        upstream = torch.ones_like(loss, dtype=torch.float64)
        expected, expected_grad = independent_reference(student, teacher, upstream, **kwargs)
        torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12, msg=str(options))
        torch.testing.assert_close(grad, expected_grad, rtol=1e-8, atol=1e-10, msg=str(options))


def _decimal_mixture_rows(student, teacher, divergence, coef):
    """Mixture divergences per row at 40 significant digits (the ``decimal`` module), from the definitions."""
    import decimal

    with decimal.localcontext() as context:
        context.prec = 40
        coef = decimal.Decimal(coef)

        def softmax(row):
            exps = [decimal.Decimal(value).exp() for value in row]
            total = sum(exps)
            return [value / total for value in exps]

        def kl(a, b):
            return sum(x * (x / y).ln() for x, y in zip(a, b))

        rows = []
        for student_row, teacher_row in zip(student.tolist(), teacher.tolist()):
            q, p = softmax(student_row), softmax(teacher_row)
            if divergence == "skew_reverse":
                rows.append(kl(q, [coef * x + (1 - coef) * y for x, y in zip(q, p)]))
                continue
            m = [coef * x + (1 - coef) * y for x, y in zip(p, q)]
            rows.append(coef * kl(p, m) + (1 - coef) * kl(q, m) if divergence == "jsd" else kl(p, m))
        return torch.tensor([float(row) for row in rows], dtype=torch.float64)


@pytest.mark.parametrize("divergence, coef", [("jsd", 1e-12), ("jsd", 0.5), ("skew_forward", 1 - 1e-6),
                                              ("skew_reverse", 1 - 1e-6), ("skew_reverse", 0.1)])
def test_reference_keeps_the_digits_of_tiny_mixture_losses(divergence, coef):
    """Where p ~ q and the mixture is nearly one side, the loss is ~1e-15: a formula through log-probabilities
    (log p - log m, each ~ -5) loses it to their rounding (the oracle and the fallback were 9-13 % off in float64).
    The fallback reads the log-ratios from the logits' difference: float64 keeps the digits up to the
    cancellation of sum p log(c p / m) against log c (relative 1e-6 at c = 1 - 1e-6)."""
    generator = torch.Generator().manual_seed(5)
    student = torch.randn(3, 200, generator=generator, dtype=torch.float64) * 0.1
    teacher = student + torch.randn(3, 200, generator=generator, dtype=torch.float64) * 0.05
    kwargs = {"beta": coef} if divergence == "jsd" else {"alpha": coef}
    loss, _ = kl_div_reference(student, teacher, divergence=divergence, reduction="none", **kwargs)
    expected = _decimal_mixture_rows(student, teacher, divergence, coef)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("coefficient", [1e-39, 1e-5, 1e-3, 0.3, 0.7, 0.999])
@pytest.mark.parametrize("divergence", ["jsd", "skew_forward", "skew_reverse"])
def test_mixtures_where_one_side_is_far_below_the_other(divergence, coefficient, impl):
    """Tokens whose log(p / q) is about +-60 and +-120 match float64 in loss and gradient, with either side dominant
    in m: the kernel clamps log(s / o) at -88, where e^-r would overflow in fp32 (without the clamp: NaN), and reads
    log(s / m) = -log(c_s + c_o e^-r) from the sum itself where s >> o (at a small coefficient c_s, 1 + c_o expm1(-r)
    loses c_s's digits: the skew KLs at 1e-5 fail without that branch). At 1e-39 the PyTorch path's skew reverse
    gradient was NaN (alpha expm1(d_q), q / m up to 1e39, past fp32's range)."""
    generator = torch.Generator().manual_seed(61)
    student = (torch.randn(4, 64, generator=generator, dtype=torch.float64) * 2).float()
    teacher = (torch.randn(4, 64, generator=generator, dtype=torch.float64) * 2).float()
    student[:, [3, 4]] += torch.tensor([60.0, 120.0])  # the student's heavy tokens, far up in the teacher's tail
    teacher[:, [9, 10]] += torch.tensor([60.0, 120.0])
    student[1:, 20] -= 120.0
    teacher[2:, 21] -= 120.0
    kwargs = {"beta": coefficient} if divergence == "jsd" else {"alpha": coefficient}
    _check_against_reference(student.to(DEVICE), teacher.to(DEVICE), impl, divergence=divergence, reduction="none",
                             **kwargs)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("divergence", ["skew_forward", "skew_reverse"])
def test_skew_kls_below_1e_30_at_a_temperature(divergence, impl):
    """The skew KLs at a coefficient <= 1e-30 take their own branches (the PyTorch path's skew forward gradient
    -(p w - q S') with w = c_q q / m): they carry the 1 / T of every other branch. The 1e-39 cases above run at
    T = 1 (a mutation audit: a skew forward gradient without its 1 / T there passed)."""
    generator = torch.Generator().manual_seed(61)
    student = (torch.randn(4, 64, generator=generator, dtype=torch.float64) * 2).float()
    teacher = (torch.randn(4, 64, generator=generator, dtype=torch.float64) * 2).float()
    for temperature in (0.5, 2.0):
        _check_against_reference(student.to(DEVICE), teacher.to(DEVICE), impl, divergence=divergence, alpha=1e-39,
                                 temperature=temperature, reduction="none")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("divergence, coefficient", [  # the JSD below 1e-30: see the docstring
    (divergence, coefficient) for divergence in ("jsd", "skew_forward", "skew_reverse")
    for coefficient in (1e-45, 1e-30, 1e-6, 1e-3, 0.01, 0.5, 0.9, 1 - 1e-3)
    if divergence != "jsd" or coefficient > 1e-30
])
def test_small_mixture_divergences_keep_their_digits_in_fp32(divergence, coefficient, impl):
    """Where p ~ q the mixture divergences are second order in log(p / q) (up to 2e-3 here).
    * JSD: the kernel's log p - log m form carried an absolute error of ~1e-7 per row (1.5 % of the loss at
      beta = 1e-3, 16x at 1e-6), and the fallback's log-ratio form, a difference of two numbers ~ log c_x, 1.6e-4 at
      beta = 1e-6. Both impls read log(x / m) as -log1p(c_y expm1(-r)).
    * Skew KLs: sum x log(x / m) is first order in the normalisation's rounding (a common shift of every
      log(p / q) by ~1e-7): 3e-4 relative at alpha <= 1/2, 0.3 at 0.999, on both impls. Each term is now
      x psi, psi = log(x / m) + m / x - 1 >= 0 (the m - x sum to 0), second order.
    Both impls measured within 3e-6 of float64; checked at 1e-5. The kernel's skew KLs at a coefficient of 1e-30 or
    below (its log p - log m form) take x psi too (``SKEW_PSI``): 1.3e-5 there before, 7e-7 now. Its JSD there keeps
    an absolute ~1e-7 per row (README; not parametrized)."""
    generator = torch.Generator().manual_seed(5)
    student = torch.randn(3, 200, generator=generator, dtype=torch.float64) * 0.1
    teacher = student + torch.randn(3, 200, generator=generator, dtype=torch.float64) * 0.05
    student, teacher = student.float(), teacher.float()
    kwargs = {"beta": coefficient} if divergence == "jsd" else {"alpha": coefficient}
    loss = kl_div(student.to(DEVICE), teacher.to(DEVICE), divergence=divergence, reduction="none", impl=impl,
                  **kwargs)
    expected = _decimal_mixture_rows(student.double(), teacher.double(), divergence, coefficient)
    assert expected.max() < 2e-3
    torch.testing.assert_close(loss.double().cpu(), expected, rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("divergence, coefficient", [("jsd", 0.5), ("jsd", 0.1), ("skew_forward", 0.5),
                                                     ("skew_forward", 0.1), ("skew_reverse", 0.5),
                                                     ("skew_reverse", 0.1), ("forward", None), ("reverse", None)])
def test_confident_student_near_its_teacher_keeps_the_gradient(divergence, coefficient, impl):
    """A confident student (top token ~0.9988) near its teacher, the usual late-training row: the true gradient is
    ~1e-6 while the log-ratios to the mixture are ~log 2, so a constant left in them before the sums and the mean
    costs the gradient its digits (up to 5e-2 of the row's largest entry for the JSD and 0.35 for the skew KLs in
    the mixture path's first form; 0.19 for the skew KLs on the general path before it; 1e-2 in the Triton kernel).
    The fallback subtracts the constants per element, and both impls write the skew KLs' c x / m as
    c expm1(log(x / m)) + c: within 1e-4 of the row's largest entry in fp32 (the kernel's JSD, in the log p - log m
    form, was 4e-4 off at beta = 0.1; its log-ratios now come from log(p / q), as the fallback's). The forward KL's
    q - p at the top token, two numbers ~0.9988, was 5.5e-2 off on the PyTorch path and 7.2e-3 in the kernel (a
    review, 2026-12-07): both take -q expm1(log(p / q)) there now."""
    kwargs = {} if coefficient is None else {"beta": coefficient} if divergence == "jsd" else {"alpha": coefficient}
    worst = 0.0
    for seed in range(20):
        generator = torch.Generator().manual_seed(seed)
        student = torch.randn(1, 1000, generator=generator, dtype=torch.float64)
        student[0, 0] += 14.0
        teacher = student + 0.3 * torch.randn(1, 1000, generator=generator, dtype=torch.float64)
        student, teacher = student.float(), teacher.float()
        _, grad, upstream = _run(student.to(DEVICE), teacher.to(DEVICE), impl, divergence=divergence,
                                 reduction="sum", **kwargs)
        _, expected = independent_reference(student, teacher, upstream, divergence=divergence, reduction="sum",
                                            **kwargs)
        worst = max(worst, ((grad.double().cpu() - expected).abs().max() / expected.abs().max()).item())
    assert worst < 1e-4, worst


@pytest.mark.parametrize("divergence, impl", [
    *((name, impl) for name in ("forward", "reverse", "jsd") for impl in IMPLS),
    # The kernel keeps the skew KLs' and TVD's own form (the rewrite's accumulators spilled those variants).
    ("skew_forward", "torch"), ("skew_reverse", "torch"), ("tvd", "torch"),
])
def test_confident_student_against_a_disagreeing_teacher_keeps_the_top_gradient(divergence, impl):
    """A confident student (top logit +14) against an unrelated teacher (std 3), and an 8-token row whose teacher
    rules the student's top token nearly out: q (g - S) cancels at the top token (S ~ g there): the reverse KL 5e-4
    of the row's largest entry off and 0.7 % in the 8-token row on both impls, the JSD 2.7e-3 and the skew KLs up
    to 4.6e-3 there on the PyTorch path (reviews, 2026-12-07); that entry is now written as minus the others' sum (a
    divergence's gradient in the student's logits sums to 0), as the forward KL's."""
    worst = 0.0
    rows = []
    for seed in range(20):
        generator = torch.Generator().manual_seed(seed)
        student = torch.randn(1, 1000, generator=generator, dtype=torch.float64)
        student[0, 0] += 14.0
        rows.append((student, 3.0 * torch.randn(1, 1000, generator=generator, dtype=torch.float64)))
    rows.append((torch.tensor([[0.0] + [-14.0] * 7], dtype=torch.float64),
                 torch.tensor([[-20.0] + [0.0] * 7], dtype=torch.float64)))
    for student, teacher in rows:
        student, teacher = student.float(), teacher.float()
        _, grad, upstream = _run(student.to(DEVICE), teacher.to(DEVICE), impl, divergence=divergence, reduction="sum")
        _, expected = independent_reference(student, teacher, upstream, divergence=divergence, reduction="sum")
        worst = max(worst, ((grad.double().cpu() - expected).abs().max() / expected.abs().max()).item())
    assert worst < 1e-5, worst


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 1.0])
def test_jsd_equals_trl_generalized_jsd(beta, impl):
    student = _logits((2, 4, 500), torch.float32, seed=22)
    teacher = _logits((2, 4, 500), torch.float32, seed=23)
    labels = torch.randint(0, 500, (2, 4), generator=torch.Generator().manual_seed(24)).to(DEVICE)
    labels[1, :2] = -100
    rows = _trl_style_jsd_rows(
        F.log_softmax(student.double().cpu() / 2.0, -1), F.log_softmax(teacher.double().cpu() / 2.0, -1), beta
    )
    mask = (labels != -100).cpu()
    expected = rows[mask].sum() / mask.sum()  # TRL's "batchmean" over non-ignored tokens
    loss = kl_div(student, teacher, divergence="jsd", beta=beta, temperature=2.0, labels=labels, impl=impl)
    assert_close(loss, expected, torch.float32)


# ----------------------------------------------------------------------------------------------
# Numerical edge cases
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_all_rows_ignored_gives_zero_loss_and_gradient(divergence, impl):
    student = _logits((3, 50), torch.float32, seed=30)
    teacher = _logits((3, 50), torch.float32, seed=31)
    labels = torch.full((3,), -100, device=DEVICE)
    loss, grad, _ = _run(student, teacher, impl, divergence=divergence, labels=labels)
    assert loss.item() == 0.0
    assert torch.all(grad == 0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_rows_all_minus_inf_but_one(divergence, impl):
    student = _logits((4, 300), torch.float32, seed=32)
    teacher = _logits((4, 300), torch.float32, seed=33)
    # Row 0: both sides a single token (the same). Row 1: masked tokens shared by both sides.
    student[0] = float("-inf")
    teacher[0] = float("-inf")
    student[0, 17] = 1.0
    teacher[0, 17] = 4.0
    student[1, 100:] = float("-inf")
    teacher[1, 100:] = float("-inf")
    loss, grad, _ = _run(student, teacher, impl, divergence=divergence, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert loss[0].item() == pytest.approx(0.0, abs=1e-6)
    assert torch.all(grad[1, 100:] == 0)
    _check_against_reference(student, teacher, impl, divergence=divergence, reduction="none")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("masked", ["student", "teacher"])
def test_masked_columns_against_far_negative_logits(masked, divergence, impl):
    """Padding columns: one side -inf, the other finite at -1e4 (probability 0 even in float64). The kernels'
    per-lane KL sums held +inf there and were rescaled by exp(lane max - row max) == 0: NaN (0 * inf) where
    the loss is finite."""
    student = _logits((3, 64), torch.float32, seed=38, scale=1.0)
    teacher = _logits((3, 64), torch.float32, seed=39, scale=1.0)
    (student if masked == "student" else teacher)[:, 56:] = float("-inf")
    (teacher if masked == "student" else student)[:, 56:] = -1e4
    loss, grad, _ = _run(student, teacher, impl, divergence=divergence, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    _check_against_reference(student, teacher, impl, divergence=divergence, reduction="none")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rows_masked_with_the_lowest_finite_value(dtype, divergence, impl):
    """Rows masked with torch.finfo(dtype).min (Hugging Face's masking value) on both sides, on the student's only
    and on the teacher's only are uniform distributions: finite loss and gradient, equal to float64's at T = 0.5,
    1 and 2. The kernel's running maxima started at -1e30, which stayed the max of such a row: every exponential
    underflowed and the row's loss and gradient were NaN (-inf for the forward KL of a masked student), on the
    Triton path only (found by a review, 2026-12-07)."""
    student = _logits((4, 77), dtype, seed=40)
    teacher = _logits((4, 77), dtype, seed=41)
    lowest = torch.finfo(dtype).min
    student[0] = lowest
    teacher[0] = lowest
    student[1] = lowest
    teacher[2] = lowest
    for temperature in (0.5, 1.0, 2.0):
        _check_against_reference(student, teacher, impl, divergence=divergence, temperature=temperature,
                                 reduction="none")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", ["forward_weight_rises", "reverse_weight_rises", "forward_lane_far_below"])
def test_kl_drops_an_infinite_term_whose_weight_underflows(case, impl):
    """A token one side rules out (-inf) where the other side's logit is 0 (forward KL: the student rules it out and
    the teacher's p weighs the term; reverse: the other way round). V = 2048: columns 0 and 1024 share a lane of the
    kernel's 1024-wide tiles. ``*_weight_rises``: a later tile where the weighting side's max rises to 200, so the
    token's weight e^-200 is 0 in fp32 and its term 0 * inf is dropped, as the PyTorch path does; the kernel's lane
    held +inf until the rescale by e^-200 (0) and must drop it, not form NaN. ``forward_lane_far_below``: the lane's
    teacher logits are all -200 while the teacher's row max is 0; the lane's sum holds +inf to the row's end, where
    the fallback drops the lanes whose teacher scale e^-200 is 0, though their student scale is 1 (column 1024's
    logit is the student's row max; a fallback keyed on the student's scale kept the NaN). Both impls equal float64
    with the token's weight at -inf, loss and gradient (mutation audits: the reverse twin and the student-keyed
    fallback each passed every test before)."""
    student = torch.zeros(2, 2048, device=DEVICE)
    teacher = torch.zeros(2, 2048, device=DEVICE)
    divergence = "reverse" if case.startswith("reverse") else "forward"
    ruled_out, weighting = (teacher, student) if divergence == "reverse" else (student, teacher)
    ruled_out[0, 0] = float("-inf")
    if case == "forward_lane_far_below":
        weighting[0, [0, 1024]] = -200.0
    else:
        weighting[0, 1024] = 200.0
    loss, grad, upstream = _run(student, teacher, impl, divergence=divergence, reduction="none")
    weighting[0, 0] = float("-inf")  # the reference: the token's weight is 0
    expected, expected_grad = independent_reference(student, teacher, upstream, divergence=divergence,
                                                    reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(expected).all()
    if case == "forward_weight_rises":
        assert expected[0] > 1.0
    assert_close(loss, expected, torch.float32, "loss")
    assert_close(grad, expected_grad, torch.float32, "gradient")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["kl_div", "aligndistil_kl", "topk_kl_div", "fused_linear_kl_div"])
def test_a_custom_ignore_index(op, impl):
    """``ignore_index=5`` (a vocabulary id): the rows labelled 5 are ignored and those labelled -100 are not, exactly
    as the same rows with the labels remapped to the default index. The kernels were tested with -100 only (a
    kernel that ignored negative labels instead passed every other test)."""
    import distill_ops

    student = _logits((6, 50), torch.float32, seed=61)
    teacher = _logits((6, 50), torch.float32, seed=62)
    other = _logits((6, 50), torch.float32, seed=63)
    hidden = _logits((6, 16), torch.float32, seed=64, scale=1.0)
    weight = _logits((50, 16), torch.float32, seed=65, scale=0.3)
    calls = {
        "kl_div": lambda rows, **kw: distill_ops.kl_div(student, teacher, labels=rows, **kw),
        "aligndistil_kl": lambda rows, **kw: distill_ops.aligndistil_kl(student, teacher, other, labels=rows, **kw),
        "topk_kl_div": lambda rows, **kw: distill_ops.topk_kl_div(student, teacher, k=5, labels=rows, **kw),
        "fused_linear_kl_div": lambda rows, **kw: distill_ops.fused_linear_kl_div(
            hidden, weight, teacher_logits=teacher, labels=rows, ce_weight=0.5, **kw),
    }
    labels = torch.tensor([5, 2, 5, 7, 0, 5], device=DEVICE)
    custom = calls[op](labels, ignore_index=5, reduction="none", impl=impl)
    default = calls[op](torch.where(labels == 5, -100, labels), reduction="none", impl=impl)
    assert torch.all(custom[labels == 5] == 0) and torch.all(custom[labels != 5] != 0)
    torch.testing.assert_close(custom, default, rtol=0, atol=0)
    mean = calls[op](labels, ignore_index=5, impl=impl)
    torch.testing.assert_close(mean, default.sum() / 3, rtol=1e-6, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("divergence, coefficient", [("jsd", 0.9), ("jsd", 0.3), ("skew_forward", 0.1),
                                                     ("skew_reverse", 0.1), ("skew_reverse", 0.9)])
def test_student_tokens_the_teacher_rules_out(divergence, coefficient, impl):
    """The student's heaviest tokens ruled out by the teacher (-inf, or -1e30: probability 0): the mixture
    divergences stay finite and match float64. On the PyTorch path such a token gives the same bits as one whose
    teacher logit is merely far below the row (300 under its max, e^-300 = 0 in fp32): its log-ratio to the mixture
    is the constant log(c_x / c_y), not l_x - r with r ~ -1e4 (rounded at 1e-3 in fp32)."""
    generator = torch.Generator().manual_seed(60)
    student = (torch.randn(4, 50, generator=generator, dtype=torch.float64) * 2).float().to(DEVICE)
    teacher = (torch.randn(4, 50, generator=generator, dtype=torch.float64) * 2).float().to(DEVICE)
    student[:, 3] = 8.0
    student[:, 11] = 7.5
    far_below = teacher.clone()
    far_below[:, [3, 11]] = teacher.amax(-1, keepdim=True) - 300.0
    teacher[:, [3, 11]] = float("-inf")
    teacher[1, 3] = -1e30
    kwargs = {"beta": coefficient} if divergence == "jsd" else {"alpha": coefficient}
    _check_against_reference(student, teacher, impl, divergence=divergence, reduction="none", **kwargs)
    loss, grad, _ = _run(student, teacher, impl, divergence=divergence, reduction="none", **kwargs)
    far_loss, far_grad, _ = _run(student, far_below, impl, divergence=divergence, reduction="none", **kwargs)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    if impl == "torch":
        assert torch.equal(loss, far_loss) and torch.equal(grad, far_grad)
    else:
        assert_close(loss, far_loss, torch.float32)
        assert_close(grad, far_grad, torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_support_mismatch_gives_inf_not_nan(impl):
    """Reverse KL with a one-hot teacher at T = 0.05: the student's mass off the teacher's token makes the loss
    +inf, on both impls (the kernel's lane merge gave NaN)."""
    student = _logits((2, 64), torch.float32, seed=40)
    teacher = torch.full((2, 64), float("-inf"), device=DEVICE)
    teacher[:, 7] = 2.0
    loss = kl_div(student, teacher, divergence="reverse", temperature=0.05, reduction="none", impl=impl)
    assert torch.equal(loss, torch.full_like(loss, float("inf")))


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_torch_path_shifts_by_the_row_max_before_the_temperature(divergence):
    """The PyTorch path at logits offset by +-1e4 (fp32) and fp16 logits near the fp16 max at T = 0.05: z / T was
    rounded at that magnitude (forward KL 7e-4 off at 1e4, 5.5 % in fp16); shifted by the row max first it matches
    the float64 formula of the same values at the fp32 tolerance. (The Triton kernels compute z / T - lse in fp32:
    about 4e-4 relative at 1e4, documented in the README.)"""
    generator = torch.Generator().manual_seed(41)
    teacher = 1e4 + torch.randn(4, 32, generator=generator) * 2
    teacher[:, :3] = 1e4 + 5.0
    student = -1e4 + torch.randn(4, 32, generator=generator) * 2
    half_teacher = torch.tensor([[60064.0, 60064.0, 60000.0, 59968.0]], dtype=torch.float16)
    half_student = torch.tensor([[60000.0, 60000.0, 60064.0, 59968.0]], dtype=torch.float16)
    cases = [(student, teacher, 1.0)]
    if not divergence.startswith("skew"):  # the independent skew formula is NaN where p or q underflow to 0
        cases.append((half_student, half_teacher, 0.05))
    for s, t, temperature in cases:
        kwargs = dict(divergence=divergence, temperature=temperature, reduction="none")
        loss = kl_div(s.to(DEVICE), t.to(DEVICE), impl="torch", **kwargs)
        expected = _independent_rows(s, t, divergence, temperature=temperature)
        assert_close(loss.cpu(), expected, torch.float32, f"loss at T={temperature}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_large_magnitude_logits_do_not_overflow(divergence, impl):
    student = _logits((3, 400), torch.float32, seed=34, scale=1.0) * 1e4
    teacher = _logits((3, 400), torch.float32, seed=35, scale=1.0) * 1e4
    loss, grad, _ = _run(student, teacher, impl, divergence=divergence, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    _check_against_reference(student, teacher, impl, divergence=divergence, reduction="none")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_offset_logits_at_small_temperatures(divergence, impl):
    """Rows of logits offset far from 0 (every logit near 1e4 or 6e4) at T = 1e-3 to 0.05: |z / T| up to 1e7 (fp16
    at T = 0.05: at 1e-3 the true reverse-KL gradient, 1e5, overflows fp16 on every impl). The
    kernel divided each logit by T before subtracting the row max, rounding z / T at its magnitude: the loss was
    10-15 % off (JSD, TVD, skew reverse) and tied bf16 rows got a gradient of -1.8 where it is 0. It now scales
    z - max, exact near the max, as the PyTorch path always did."""
    generator = torch.Generator().manual_seed(42)
    for dtype, offset, temperature in ((torch.float16, 1e4, 0.05), (torch.float16, 6e4, 0.05),
                                       (torch.float32, 1e4, 1e-3), (torch.bfloat16, 1e4, 1e-3)):
        student, teacher = ((torch.randn(3, 37, generator=generator, dtype=torch.float64) * 3 + offset).to(dtype)
                            for _ in range(2))
        _check_against_reference(student.to(DEVICE), teacher.to(DEVICE), impl, divergence=divergence,
                                 temperature=temperature, reduction="none")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_a_teacher_offset_from_its_student(divergence, impl):
    """A teacher whose logits sit 1e4 above its student's (the same softmax as without the offset), over two of the
    kernel's tiles, the first of which is masked with a finite -1e9 in the student: the forward / reverse KL kernel
    summed p (z_t - z_s) / T, each difference rounded at 1e4 (1e-3 of the loss, 3x the gradient's tolerance); it
    now takes both logits relative to their running maxima, as the PyTorch path does relative to its row maxima."""
    generator = torch.Generator().manual_seed(43)
    student = torch.randn(3, 2048, generator=generator, dtype=torch.float64) * 2
    teacher = student + torch.randn(3, 2048, generator=generator, dtype=torch.float64) * 0.5 + 1e4
    student[0, :1024] = -1e9
    _check_against_reference(student.float().to(DEVICE), teacher.float().to(DEVICE), impl, divergence=divergence,
                             reduction="none")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("side", ["student", "teacher"])
def test_nan_propagates(side, divergence, impl):
    student = _logits((3, 64), torch.float32, seed=36)
    teacher = _logits((3, 64), torch.float32, seed=37)
    (student if side == "student" else teacher)[1, 5] = float("nan")
    loss, grad, _ = _run(student, teacher, impl, divergence=divergence, reduction="none")
    assert torch.isnan(loss[1])
    assert torch.isfinite(loss[[0, 2]]).all()
    assert torch.isnan(grad[1]).any()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd", "skew_forward", "skew_reverse"])
@pytest.mark.parametrize("bad", ["nan", "inf", "all_neg_inf"])
def test_teacher_row_without_a_distribution_is_nan(bad, divergence, impl):
    """A teacher row holding NaN or +inf, or -inf only, has no distribution: its loss and its whole gradient row are
    NaN on every impl, the other rows untouched (the PyTorch fast paths zero 0 * inf products, which once turned such
    a row's loss into +-inf and left finite gradient entries beside a NaN)."""
    student = _logits((3, 64), torch.float32, seed=36)
    teacher = _logits((3, 64), torch.float32, seed=37)
    if bad == "all_neg_inf":
        teacher[1] = -float("inf")
    else:
        teacher[1, 5] = float(bad)
    loss, grad, _ = _run(student, teacher, impl, divergence=divergence, reduction="none")
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    assert torch.isfinite(grad[[0, 2]]).all() and not torch.isfinite(grad[1]).any()
    if impl == "torch":  # (the kernel's reverse KL leaves inf beside the NaN of a +inf teacher logit)
        assert torch.isnan(grad[1]).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_teacher_gets_no_gradient_and_inputs_unchanged(impl):
    student = _logits((3, 64), torch.float32, seed=38).requires_grad_(True)
    teacher = _logits((3, 64), torch.float32, seed=39).requires_grad_(True)
    student_before, teacher_before = student.detach().clone(), teacher.detach().clone()
    kl_div(student, teacher, divergence="jsd", impl=impl).backward()
    assert teacher.grad is None
    assert torch.equal(student.detach(), student_before) and torch.equal(teacher.detach(), teacher_before)


@pytest.mark.parametrize("impl", IMPLS)
def test_inplace_grad_writes_gradient_over_student_buffer(impl):
    student = _logits((4, 333), torch.float32, seed=40)
    teacher = _logits((4, 333), torch.float32, seed=41)
    ref_loss, ref_grad = kl_div_reference(student, teacher, divergence="reverse")
    leaf = student.clone().requires_grad_(True)
    loss = kl_div(leaf, teacher, divergence="reverse", inplace_grad=True, impl=impl)
    assert_close(loss, ref_loss, torch.float32)
    # The buffer now holds the gradient of the loss (the mean's 1/4 folded in).
    assert_close(leaf.detach(), ref_grad, torch.float32)
    loss.backward(torch.tensor(2.0, device=DEVICE))
    assert_close(leaf.grad, 2.0 * ref_grad, torch.float32)
    assert leaf.grad.data_ptr() == leaf.data_ptr()


@pytest.mark.parametrize("impl", IMPLS)
def test_inplace_grad_applies_as_documented(impl):
    """As the docstring says (a docstring audit found it silent on all three): with no gradient recorded (logits
    that do not require grad, or grad mode off) the flag does nothing; non-contiguous logits are a ValueError (its
    text named a vocab_size truncation, which works); with vocab_size the columns past it keep their values."""
    student = _logits((4, 33), torch.float32, seed=76)
    teacher = _logits((4, 33), torch.float32, seed=77)
    expected = kl_div(student, teacher, impl=impl)
    for leaf, grad_mode in ((student.clone(), True), (student.clone().requires_grad_(True), False)):
        with torch.set_grad_enabled(grad_mode):
            loss = kl_div(leaf, teacher, inplace_grad=True, impl=impl)
        assert torch.equal(leaf.detach(), student) and torch.equal(loss, expected)
    # With a gradient recorded, non-contiguous logits are refused before anything is written.
    wide = _logits((4, 40), torch.float32, seed=78).requires_grad_(True)
    transposed = _logits((33, 4), torch.float32, seed=79).requires_grad_(True).t()
    for logits in (wide[:, :33], transposed):
        before = logits.detach().clone()
        with pytest.raises(ValueError, match=r"inplace_grad=True needs contiguous student_logits .* got shape "
                                             r"\(4, 33\) with strides"):
            kl_div(logits, teacher, inplace_grad=True, impl=impl)
        assert torch.equal(logits.detach(), before)
    # vocab_size on contiguous logits: the first 33 columns hold the gradient, the rest keep their values and get 0.
    narrow = wide.detach()[:, :33].clone().requires_grad_(True)
    expected_grad, = torch.autograd.grad(kl_div(narrow, teacher, impl=impl), narrow)
    before = wide.detach().clone()
    padded_teacher = torch.cat([teacher, teacher[:, :7]], 1)
    kl_div(wide, padded_teacher, vocab_size=33, inplace_grad=True, impl=impl).backward()
    assert_close(wide.grad[:, :33], expected_grad, torch.float32)
    assert torch.all(wide.grad[:, 33:] == 0) and torch.equal(wide.detach()[:, 33:], before[:, 33:])
    assert_close(wide.detach()[:, :33], expected_grad, torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_inplace_grad_refuses_a_teacher_that_is_another_view_of_the_student_buffer(impl):
    """Shifted views of one logits buffer (student = buf[:-1], teacher = buf[1:], a next-token self-distillation
    idiom): the gradient written over student row r + 1 is teacher row r's memory, so the result depended on the
    order the rows ran in (right in the interpreter's order, off by 0.44 in the reverse one a GPU may take; the
    other shift was wrong on both impls; a race audit, 2026-12-07). Refused before anything is written; the teacher
    as the student's own detached view (each row read before it is written) stays allowed."""
    buf = _logits((5, 40), torch.float32, seed=80)
    for student_rows, teacher_rows in ((slice(0, 4), slice(1, 5)), (slice(1, 5), slice(0, 4))):
        leaf = buf.clone().requires_grad_(True)
        before = leaf.detach().clone()
        with pytest.raises(ValueError, match="inplace_grad=True writes the gradient over student_logits' buffer, "
                                             "which teacher_logits overlaps"):
            kl_div(leaf[student_rows], leaf.detach()[teacher_rows], inplace_grad=True, impl=impl)
        assert torch.equal(leaf.detach(), before)
    leaf = buf.clone().requires_grad_(True)
    expected_loss, expected_grad = kl_div_reference(buf, buf, divergence="reverse")
    loss = kl_div(leaf, leaf.detach(), divergence="reverse", inplace_grad=True, impl=impl)
    loss.backward()
    assert_close(loss, expected_loss, torch.float32)
    assert_close(leaf.grad, expected_grad, torch.float32)
    # A teacher in another part of the same storage (no shared elements) is read in place as before.
    both = torch.cat([buf[:2], buf[2:4]]).clone().requires_grad_(True)
    expected = kl_div(buf[:2], buf[2:4], impl=impl)
    assert_close(kl_div(both[:2], both.detach()[2:4], inplace_grad=True, impl=impl), expected, torch.float32)


def test_inplace_grad_under_torch_compile_says_it_is_eager_only():
    """Under torch.compile the option's data-pointer check failed with dynamo's 'Data pointer comparison'."""
    student = _logits((2, 10), torch.float32, seed=44).cpu().requires_grad_(True)
    teacher = _logits((2, 10), torch.float32, seed=45).cpu()
    compiled = torch.compile(lambda s, t: kl_div(s, t, inplace_grad=True, impl="torch"), fullgraph=True,
                             backend="aot_eager")
    with pytest.raises(Exception, match="inplace_grad=True is for eager mode"):
        compiled(student, teacher)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss_name", ["kl_div", "kl_div inplace_grad", "topk_kl_div", "aligndistil_kl"])
def test_second_backward_through_consumed_gradient_raises(loss_name, impl):
    """Every loss that stores its gradient: the first backward uses it up, so a second one (retain_graph=True)
    raises an error naming that cause, not autograd's bare "modified by an inplace operation" (whose hint sends
    users after their own in-place ops); it stays chained to autograd's."""
    student = _logits((2, 10), torch.float32, seed=42).requires_grad_(True)
    teacher = _logits((2, 10), torch.float32, seed=43)
    if loss_name == "aligndistil_kl":
        loss = aligndistil_kl(student, teacher, _logits((2, 10), torch.float32, seed=44), impl=impl)
    elif loss_name == "topk_kl_div":
        loss = topk_kl_div(student, teacher, k=3, impl=impl)
    else:
        inplace = loss_name == "kl_div inplace_grad"
        loss = kl_div(student.clone() if inplace else student, teacher, inplace_grad=inplace, impl=impl)
    loss.backward(retain_graph=True)
    first = student.grad.clone()
    with pytest.raises(RuntimeError, match=r"second backward through the same loss \(retain_graph=True\)") as error:
        loss.backward()
    assert "modified by an inplace operation" in str(error.value.__cause__)
    torch.testing.assert_close(student.grad, first, rtol=0, atol=0)  # nothing was added by the failed backward


@pytest.mark.parametrize("impl", IMPLS)
def test_inplace_grad_inside_an_activation_checkpoint_says_why_it_fails(impl):
    """A non-reentrant checkpoint recomputes the loss in backward from the logits given to it, which inplace_grad
    has overwritten with the gradient: autograd's version check stops it, and the error names that cause (it only
    named a second backward). A checkpoint around the logits' producer and the loss together recomputes the logits
    too, and works."""
    from torch.utils.checkpoint import checkpoint

    hidden = _logits((4, 8), torch.float32, seed=73).requires_grad_(True)
    weight = _logits((12, 8), torch.float32, seed=74)
    teacher = _logits((4, 12), torch.float32, seed=75)
    expected, = torch.autograd.grad(kl_div(hidden @ weight.T, teacher, impl=impl), hidden)
    loss = checkpoint(lambda h: kl_div(h @ weight.T, teacher, inplace_grad=True, impl=impl), hidden,
                      use_reentrant=False)
    assert_close(torch.autograd.grad(loss, hidden)[0], expected, torch.float32)
    logits = hidden @ weight.T
    loss = checkpoint(lambda z: kl_div(z, teacher, inplace_grad=True, impl=impl), logits, use_reentrant=False)
    with pytest.raises(RuntimeError, match="an activation checkpoint that recomputes the loss"):
        loss.backward()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss_name", ["kl_div", "kl_div inplace_grad", "topk_kl_div bucket", "topk_kl_div sparse",
                                       "aligndistil_kl", "DACKLLoss eval"])
def test_fp16_gradient_survives_loss_scaling(loss_name, impl):
    """fp16 logits, mean over a large normalizer (num_items_in_batch of an accumulated batch) and a GradScaler-style
    loss scale: the stored-gradient losses folded 1 / normalizer into the fp16 gradient they store, so it underflowed
    before backward applied the scale (kl_div: 1.2e-2 of the largest entry off, 70 of 512 entries 0; aligndistil_kl
    0.11, 376 of 512). The mean's weight is now applied in backward, in fp32 with the scale: the gradient is the
    fp32 run's rounded once to fp16, as plain PyTorch on upcast fp16 logits gives it (3.2e-4 here)."""
    import distill_ops

    normalizer, loss_scale = 2**18, 65536.0
    student = _logits((32, 16), torch.float16, seed=70, scale=1.0)
    teacher = _logits((32, 16), torch.float16, seed=71, scale=1.0)
    labels = torch.arange(32, device=DEVICE) % 16
    labels[::5] = -100  # ignored rows: zero gradient, nothing in the loss
    torch.manual_seed(72)
    dackl = distill_ops.DACKLLoss(vocab_top_m=8, tail="bucket", impl=impl).to(DEVICE).eval()
    indices = teacher.float().topk(4, dim=-1).indices
    logprobs = teacher.float().log_softmax(-1).gather(-1, indices)
    calls = {
        "kl_div": lambda s: kl_div(s, teacher, labels=labels, normalizer=normalizer, impl=impl),
        "kl_div inplace_grad": lambda s: kl_div(s * 1, teacher, labels=labels, normalizer=normalizer,
                                                inplace_grad=True, impl=impl),
        "topk_kl_div bucket": lambda s: topk_kl_div(s, teacher, k=4, tail="bucket", labels=labels,
                                                    normalizer=normalizer, impl=impl),
        "topk_kl_div sparse": lambda s: topk_kl_div(s, teacher_topk_indices=indices, teacher_topk_logprobs=logprobs,
                                                    labels=labels, normalizer=normalizer, impl=impl),
        "aligndistil_kl": lambda s: aligndistil_kl(s, teacher, teacher.flip(-1), labels=labels,
                                                   normalizer=normalizer, impl=impl),
        "DACKLLoss eval": lambda s: dackl(s, teacher, labels, normalizer=normalizer),
    }
    reference = student.float().requires_grad_(True)  # the same values: an fp32 gradient does not underflow
    expected = calls[loss_name](reference)
    (expected * loss_scale).backward()
    half = student.clone().requires_grad_(True)
    loss = calls[loss_name](half)
    (loss * loss_scale).backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    error = (half.grad.double() - reference.grad.double()).abs().max() / reference.grad.abs().max()
    assert error < 2e-3, (error.item(), (half.grad == 0).sum().item())  # fp16's half ulp is 4.9e-4
    assert torch.all(half.grad[::5] == 0)


def test_no_gradient_requested_computes_loss_only():
    student = _logits((2, 10), torch.float32, seed=44)
    teacher = _logits((2, 10), torch.float32, seed=45)
    with torch.no_grad():
        loss = kl_div(student, teacher, impl="torch")
    ref, _ = kl_div_reference(student, teacher)
    assert_close(loss, ref, torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_module_matches_functional(impl):
    student = _logits((2, 3, 90), torch.float32, seed=46)
    teacher = _logits((2, 3, 90), torch.float32, seed=47)
    labels = torch.tensor([[1, 2, -100], [4, -100, 6]], device=DEVICE)
    module = KLDivLoss(divergence="skew_reverse", alpha=0.2, temperature=0.7, reduction="sum", impl=impl)
    expected = kl_div(
        student, teacher, divergence="skew_reverse", alpha=0.2, temperature=0.7, reduction="sum", labels=labels,
        impl=impl,
    )
    assert_close(module(student, teacher, labels), expected, torch.float32)
    # inplace_grad as a module option: the same loss, the gradient written over the student's buffer.
    module = KLDivLoss(divergence="skew_reverse", alpha=0.2, temperature=0.7, reduction="sum", impl=impl,
                       inplace_grad=True)
    assert "inplace_grad=True" in repr(module)
    leaf = student.clone().requires_grad_(True)
    assert_close(module(leaf, teacher, labels), expected, torch.float32)
    expected_grad, = torch.autograd.grad(
        kl_div(student.requires_grad_(True), teacher, divergence="skew_reverse", alpha=0.2, temperature=0.7,
               reduction="sum", labels=labels, impl=impl), student)
    assert_close(leaf.detach(), expected_grad, torch.float32)
    with pytest.raises(TypeError, match="inplace_grad must be a bool, got str"):
        KLDivLoss(inplace_grad="yes")


def test_torch_compile_fullgraph():
    student = _logits((2, 3, 64), torch.float32, seed=48).cpu().requires_grad_(True)
    teacher = _logits((2, 3, 64), torch.float32, seed=49).cpu()
    labels = torch.tensor([[1, 2, -100], [4, 5, 6]])

    def loss_fn(s, t, y):
        return kl_div(s, t, divergence="jsd", labels=labels, temperature=2.0, impl="torch") * 3.0 + y.sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    y = torch.ones(2, requires_grad=True)
    loss = compiled(student, teacher, y)
    loss.backward()
    ref_loss, ref_grad = kl_div_reference(student, teacher, divergence="jsd", labels=labels, temperature=2.0)
    assert_close(loss, ref_loss * 3.0 + 2.0, torch.float32)
    assert_close(student.grad, ref_grad * 3.0, torch.float32)


@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph_with_shifted_batch_logits(dynamic):
    """``logits[:, :-1]`` / ``logits[:, 1:]`` of a batch traced with ``fullgraph=True``: whether the rows flatten
    without a copy is decided from strides (the traced code could not catch a failed ``view``, and every loss
    failed to trace on such inputs)."""
    student = _logits((3, 6, 64), torch.float32, seed=55).cpu().requires_grad_(True)
    teacher = _logits((3, 6, 64), torch.float32, seed=56).cpu()

    def loss_fn(s, t):
        return kl_div(s[:, :-1], t[:, 1:], divergence="jsd", temperature=2.0, impl="torch")

    loss = torch.compile(loss_fn, fullgraph=True, backend="aot_eager", dynamic=dynamic)(student, teacher)
    loss.backward()
    ref_loss, ref_grad = kl_div_reference(student[:, :-1], teacher[:, 1:], divergence="jsd", temperature=2.0)
    assert_close(loss, ref_loss, torch.float32)
    assert_close(student.grad[:, :-1], ref_grad, torch.float32)
    assert torch.count_nonzero(student.grad[:, -1]) == 0


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


def _bad(match, *args, error=ValueError, **kwargs):
    with pytest.raises(error, match=match):
        kl_div(*args, **kwargs)


def test_bad_inputs():
    s = torch.randn(2, 3, 10)
    t = torch.randn(2, 3, 10)
    _bad("leading dims", s, torch.randn(2, 4, 10))
    _bad(r"vocabulary size 10 .* has 12", s, torch.randn(2, 3, 12))
    _bad("vocab_size must be in", s, torch.randn(2, 3, 12), vocab_size=11)
    _bad(r"vocabulary of V >= 1 \(a non-empty last dim\), got 0 and 0", s[..., :0], t[..., :0])  # was 0 or NaN
    _bad("student_logits must have dtype", torch.randint(0, 5, (2, 3, 10)), t, error=TypeError)
    _bad("teacher_logits must have dtype", s, t.to(torch.int32), error=TypeError)
    _bad(r"labels must have shape \(2, 3\)", s, t, labels=torch.zeros(2, 4, dtype=torch.long))
    _bad("labels must have dtype", s, t, labels=torch.zeros(2, 3), error=TypeError)
    _bad("divergence must be one of", s, t, divergence="kl")
    _bad("reduction must be one of", s, t, reduction="batchmean")
    _bad(r"beta must be in \[0.0, 1.0\], got 1.5", s, t, divergence="jsd", beta=1.5)
    _bad(r"alpha must be in \[0.0, 1.0\), got 1.0", s, t, divergence="skew_forward", alpha=1.0)
    _bad("temperature must be in", s, t, temperature=0.0)
    _bad("temperature must be in", s, t, temperature=-1.0)
    _bad("impl must be one of", s, t, impl="cuda")
    _bad("normalizer only applies", s, t, reduction="sum", normalizer=4.0)
    for bad in (-2.0, float("nan"), float("inf")):  # inf gave a silent loss of 0
        _bad(rf"normalizer must be finite and >= 0 \(a count of tokens\), got {bad}", s, t,
             normalizer=torch.tensor([bad]))
    _bad("normalizer must be a real number or a one-element real tensor, got torch.bool", s, t,
         normalizer=torch.tensor(True), error=TypeError)
    _bad("inplace_grad must be a bool, got int", s, t, inplace_grad=1, error=TypeError)
    _bad(f"ignore_index must fit in int64, got {2**70}", s, t, ignore_index=2**70)  # was an OverflowError
    # The modules check vocab_size when built (it was first checked at the first call).
    for module in (KLDivLoss, FusedLinearKLDivLoss, AlignDistilLoss):
        with pytest.raises(ValueError, match="vocab_size must be >= 1, got 0"):
            module(vocab_size=0)
        with pytest.raises(TypeError, match="vocab_size must be an int or None, got str"):
            module(vocab_size="a")
    _bad("student_logits must be a torch.Tensor", s.numpy(), t, error=TypeError)


def test_bad_devices():
    s = torch.randn(2, 10)
    t = torch.randn(2, 10, device="meta")
    _bad("teacher_logits is on meta", s, t)


def test_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _bad("TRITON_INTERPRET=1", torch.randn(2, 10), torch.randn(2, 10), impl="triton")


def test_tolerance_table_is_not_loosened():
    # Guard against silently widening the shared tolerances: fp32 must stay tight.
    assert TOLERANCES[torch.float32]["rtol"] <= 1e-4 and TOLERANCES[torch.float32]["atol"] <= 1e-5


@pytest.mark.skipif(DEVICE.type != "cpu", reason="checks the interpreter wiring on CPU-only machines")
def test_interpreter_enabled_on_cpu():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert math.isfinite(kl_div(torch.randn(1, 5), torch.randn(1, 5), impl="triton").item())


@pytest.mark.parametrize("impl", IMPLS)
def test_backward_scales_only_rows_whose_incoming_gradient_is_not_one(impl):
    """Each row's stored gradient is scaled by its incoming gradient (the Triton kernel skips only rows whose scale
    is exactly 1; a scale of 0 zeroes its row): contiguous, as a strided view (every other column of a wider tensor)
    with zero, negative, fractional and unit entries, and as expanded scalars 0.75 and 0 (stride 0, as from
    loss.sum()). A kernel that also skipped rows of scale 0 (leaving the unscaled gradient there) passed before the
    zero entries."""
    student = _logits((6, 129), torch.float32, seed=60)
    teacher = _logits((6, 129), torch.float32, seed=61)
    _, ref_grad = kl_div_reference(student, teacher, divergence="forward", reduction="none")
    wide = torch.tensor([[0.0, 1.0, -2.0, 1.0, 0.5, 3.0], [7.0] * 6], device=DEVICE).t()
    for upstream in (torch.tensor([1.0, 2.5, 1.0, -0.5, 1.0, 1.0], device=DEVICE), wide[:, 0],
                     torch.tensor(0.75, device=DEVICE).expand(6), torch.zeros((), device=DEVICE).expand(6)):
        _, grad, _ = _run(student, teacher, impl, divergence="forward", reduction="none", upstream=upstream)
        assert_close(grad, ref_grad * upstream.double().unsqueeze(-1), torch.float32, str(upstream.stride()))
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
def test_persistent_grid_equals_one_program_per_row(divergence):
    """kernels.kl_div.kl_div_forward(programs=...): fewer programs than rows, each looping over rows pid, pid +
    grid, ...; (7 rows, 3 programs: uneven), ignored rows included. Same loss and gradient as the default grid."""
    from distill_ops.kernels.kl_div import kl_div_forward

    gen = torch.Generator().manual_seed(11)
    student = (torch.randn(7, 300, generator=gen) * 3).to(DEVICE)
    teacher = (torch.randn(7, 300, generator=gen) * 3).to(DEVICE)
    labels = torch.tensor([1, -100, 5, 7, -100, 2, 3], device=DEVICE)
    weight = torch.full((7,), 0.25, device=DEVICE)
    results = []
    for programs in (None, 3, 1, 100):
        grad = torch.full_like(student, float("nan"))
        loss = kl_div_forward(student, teacher, labels, grad, weight, divergence=divergence, coef=0.3,
                              temperature=1.5, ignore_index=-100, block_v=128, num_warps=4, programs=programs)
        results.append((loss, grad))
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])
    assert not torch.isnan(results[0][1]).any() and bool((results[0][1][1] == 0).all())
    ref_loss, ref_grad = kl_div_reference(student.double(), teacher.double(), divergence=divergence, beta=0.3,
                                          temperature=1.5, labels=labels, reduction="none")
    torch.testing.assert_close(results[0][0].double(), 0.25 * ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[0][1].double(), 0.25 * ref_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["kl_div", "aligndistil_kl", "topk_kl_div"])
def test_strided_int64_labels_are_read_with_their_stride(op, impl):
    """int64 labels that are one column of an [N, 2] tensor (a view with stride 2): every loss from logits gives
    what the same labels give contiguous. The kernels indexed them as contiguous and read the other column."""
    import distill_ops

    student = _logits((6, 50), torch.float32, seed=51)
    teacher = _logits((6, 50), torch.float32, seed=52)
    other = _logits((6, 50), torch.float32, seed=53)
    labels = torch.tensor([1, -100, 3, 4, -100, 6], device=DEVICE)
    packed = torch.stack([labels, torch.full_like(labels, -100)], 1)
    calls = {
        "kl_div": lambda rows: distill_ops.kl_div(student, teacher, labels=rows, reduction="none", impl=impl),
        "aligndistil_kl": lambda rows: distill_ops.aligndistil_kl(student, teacher, other, labels=rows,
                                                                  reduction="none", impl=impl),
        "topk_kl_div": lambda rows: distill_ops.topk_kl_div(student, teacher, k=5, tail="label", labels=rows,
                                                            reduction="none", impl=impl),
    }
    expected = calls[op](labels)
    assert torch.all(expected[labels != -100] != 0)
    assert torch.equal(calls[op](packed[:, 0]), expected)


@pytest.mark.parametrize("op", ["kl_div", "aligndistil_kl", "topk_kl_div", "fused_linear_kl_div", "DACKLLoss"])
def test_ignore_index_must_be_an_int(op):
    """A string, float, bool or tensor ``ignore_index`` is a TypeError naming it (a string crashed inside with an
    AttributeError; a float was compared with the int labels). NumPy ints are accepted."""
    import numpy as np

    import distill_ops

    student = _logits((3, 20), torch.float32, seed=61)
    teacher = _logits((3, 20), torch.float32, seed=62)
    labels = torch.tensor([1, -100, 3], device=DEVICE)
    weight = _logits((20, 8), torch.float32, seed=63)
    torch.manual_seed(64)
    dackl = distill_ops.DACKLLoss(vocab_top_m=8).to(DEVICE)

    def dackl_loss(index):
        dackl.ignore_index = index
        return dackl(student, teacher, labels)

    calls = {
        "kl_div": lambda index: distill_ops.kl_div(student, teacher, labels=labels, ignore_index=index),
        "aligndistil_kl": lambda index: distill_ops.aligndistil_kl(student, teacher, teacher + 1, labels=labels,
                                                                   ignore_index=index),
        "topk_kl_div": lambda index: distill_ops.topk_kl_div(student, teacher, k=4, labels=labels,
                                                             ignore_index=index),
        "fused_linear_kl_div": lambda index: distill_ops.fused_linear_kl_div(
            student[:, :8], weight, teacher_logits=teacher, labels=labels, ignore_index=index),
        "DACKLLoss": dackl_loss,
    }
    for bad in ("x", -100.0, True, torch.tensor(-100)):
        with pytest.raises(TypeError, match="ignore_index must be an int"):
            calls[op](bad)
    assert torch.equal(calls[op](np.int64(-100)), calls[op](-100))


def test_float_options_name_the_type_and_the_conversion():
    """A float option given as a NumPy float32 / int64, a bool or a tensor is a TypeError that names the option,
    the received type and (for NumPy scalars) the conversion; NumPy float64 is a Python float and is accepted."""
    import numpy as np

    import distill_ops

    student = _logits((3, 20), torch.float32, seed=65)
    teacher = _logits((3, 20), torch.float32, seed=66)
    for bad, shown in ((np.float32(2.0), "numpy.float32"), (np.int64(2), "numpy.int64")):
        with pytest.raises(TypeError, match=rf"temperature must be a Python int or float, got {shown}: .*float\(\)"):
            distill_ops.kl_div(student, teacher, temperature=bad)
    for bad, shown in ((True, "bool"), (torch.tensor(2.0), "torch.Tensor")):
        with pytest.raises(TypeError, match=rf"temperature must be a Python int or float, got {shown}") as info:
            distill_ops.kl_div(student, teacher, temperature=bad)
        assert "float()" not in str(info.value)
    assert torch.equal(distill_ops.kl_div(student, teacher, temperature=np.float64(2.0)),
                       distill_ops.kl_div(student, teacher, temperature=2.0))


@pytest.mark.parametrize("module", ["KLDivLoss", "AlignDistilLoss", "TopKKLDivLoss", "FusedLinearKLDivLoss",
                                    "DACKLLoss"])
def test_modules_check_the_shared_options_when_built(module):
    """A bad temperature, ignore_index or impl is an error naming it when the module is built (they were only
    caught at the first call)."""
    import distill_ops

    cls = getattr(distill_ops, module)
    with pytest.raises(ValueError, match="temperature must be in"):
        cls(temperature=-1.0)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        cls(ignore_index="x")
    with pytest.raises(ValueError, match="impl must be one of"):
        cls(impl="gpu")
    assert cls(temperature=2.0, ignore_index=-1, impl="torch").temperature == 2.0
    with pytest.raises(ValueError, match=r"temperature must be in \(0.0, inf\), got inf"):
        cls(temperature=float("inf"))  # the message said "(0.0, inf]"


@pytest.mark.parametrize("functional, module", [
    ("kl_div", "KLDivLoss"), ("fused_linear_kl_div", "FusedLinearKLDivLoss"), ("topk_kl_div", "TopKKLDivLoss"),
    ("aligndistil_kl", "AlignDistilLoss"),
])
def test_modules_take_every_option_of_their_functional(functional, module):
    """Every argument of a functional is a constructor option or a forward argument of its module, and the module
    has no argument the functional lacks (KLDivLoss had no inplace_grad)."""
    import inspect

    import distill_ops

    functional_args = set(inspect.signature(getattr(distill_ops, functional)).parameters)
    cls = getattr(distill_ops, module)
    module_args = set(inspect.signature(cls.__init__).parameters) | set(inspect.signature(cls.forward).parameters)
    assert functional_args == module_args - {"self"}


@pytest.mark.parametrize("module", ["KLDivLoss", "FusedLinearKLDivLoss"])
def test_divergence_modules_check_their_coefficients_when_built(module):
    """beta / alpha (and the fused-linear term weights) are errors naming them when the module is built, as the
    functionals check them (the modules accepted them until their first call)."""
    import distill_ops

    cls = getattr(distill_ops, module)
    with pytest.raises(ValueError, match=r"beta must be in \[0.0, 1.0\], got 2.0"):
        cls(divergence="jsd", beta=2.0)
    with pytest.raises(ValueError, match=r"alpha must be in \[0.0, 1.0\), got 1.0"):
        cls(divergence="skew_forward", alpha=1.0)
    if module == "FusedLinearKLDivLoss":
        for name in ("kl_weight", "ce_weight"):
            with pytest.raises(ValueError, match=f"{name} must be in"):
                cls(**{name: -1.0})
    assert cls(divergence="jsd", beta=0.25).beta == 0.25


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["kl_div_rows", "aligndistil_rows", "topk_kl_rows"])
@pytest.mark.parametrize("grouped", [False, True])
def test_row_ops_apply_a_weight_per_row(op, impl, grouped):
    """The row ops take a weight of one element (what every public reduction passes) or one per row: row i's loss and
    stored gradient are then those of a unit weight times weight[i], row groups [G, R, V] included (row i is group
    i // R). No public option passes [N] weights, so the ops are called directly."""
    vocab, shape = 37, ((2, 3) if grouped else (6,))
    student = _logits((*shape, vocab), torch.float32, 0)
    teacher = _logits((*shape, vocab), torch.float32, 1)
    labels = torch.tensor([3, -100, 5, 0, 7, 2], device=DEVICE)  # flat [N], as the public ops pass them
    weights = torch.linspace(0.25, 2.0, 6, device=DEVICE)
    if op == "kl_div_rows":
        def call(weight):
            return torch.ops.distill_ops.kl_div_rows(student, teacher, labels, weight, "jsd", 0.3, 1.5, -100, impl,
                                                     True)
    elif op == "aligndistil_rows":
        other = _logits((*shape, vocab), torch.float32, 2)

        def call(weight):
            return torch.ops.distill_ops.aligndistil_rows(student, teacher, other, labels, weight, False, 0.1, 10.0,
                                                          1e-3, None, 1.5, -100, impl, True)[:2]
    else:
        logprobs, indices = torch.log_softmax(teacher, -1).topk(5, dim=-1)

        def call(weight):
            return torch.ops.distill_ops.topk_kl_rows(student, indices.reshape(6, 5), logprobs.reshape(6, 5), labels,
                                                      weight, "bucket", "reverse", 1.5, -100, impl, True)
    unit_loss, unit_grad = call(torch.ones(1, device=DEVICE))
    loss, grad = call(weights)
    assert unit_loss[labels != -100].abs().min() > 0 and unit_loss[1] == 0  # row 1 is ignored
    assert_close(loss, unit_loss * weights, torch.float32)
    assert_close(grad.reshape(6, vocab), unit_grad.reshape(6, vocab) * weights[:, None], torch.float32)
    assert unit_grad.reshape(6, vocab)[0].abs().sum() > 0


def test_bad_shared_arguments_not_reached_by_test_bad_inputs():
    """Validation edges of the shared helpers that test_bad_inputs does not reach: labels with the right number of
    rows in the wrong shape (a [3, 2] label tensor against [2, 3] logits would pair the wrong tokens), a normalizer
    tensor with no element, a negative float normalizer (0 is legal, as for a tensor: see
    test_zero_tensor_normalizer_with_every_row_ignored_is_zero_not_nan) and an ignore_index just past int64, and
    0-dim logits (no vocabulary dim)."""
    s = torch.randn(2, 3, 10)
    t = torch.randn(2, 3, 10)
    _bad(r"labels must have shape \(2, 3\) \(the logits' leading dims\), got \(3, 2\)", s, t,
         labels=torch.zeros(3, 2, dtype=torch.long))
    _bad(r"normalizer must be a number or a one-element tensor, got shape \(0,\)", s, t, normalizer=torch.zeros(0))
    _bad(r"normalizer must be in \[0.0, inf\), got -1.0", s, t, normalizer=-1.0)
    _bad(f"ignore_index must fit in int64, got {2**63}", s, t, ignore_index=2**63)
    assert torch.isfinite(kl_div(s, t, ignore_index=2**63 - 1))  # the largest int64 is accepted
    _bad(r"student_logits must have at least 1 dim, got shape \(\)", torch.tensor(1.0), torch.tensor(1.0))


@pytest.mark.parametrize("impl", IMPLS)
def test_mean_over_no_rows_is_zero(impl):
    """reduction="mean" over an input with no rows (and no labels) is 0.0 with zero gradients, as documented ("0.0 if
    none"), for kl_div and fused_linear_kl_div: the row count in the mean's 1 / count is floored at 1 (1 / 0 was a
    ZeroDivisionError)."""
    student = torch.zeros(0, 10, device=DEVICE, requires_grad=True)
    loss = kl_div(student, torch.zeros(0, 10, device=DEVICE), impl=impl)
    loss.backward()
    assert loss.item() == 0.0 and student.grad.shape == (0, 10)
    hidden = torch.zeros(0, 8, device=DEVICE, requires_grad=True)
    weight = torch.randn(10, 8, device=DEVICE, requires_grad=True)
    loss = fused_linear_kl_div(hidden, weight, torch.zeros(0, 8, device=DEVICE), torch.randn(10, 8, device=DEVICE),
                               impl=impl)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(weight.grad) == 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("coefficient", [1e-45, 1e-31])
@pytest.mark.parametrize("divergence", ["skew_forward", "skew_reverse"])
def test_skew_kls_below_1e_30_stay_second_order_where_the_sides_nearly_agree(divergence, coefficient, impl):
    """The kernel's skew KLs at a coefficient <= 1e-30 (its log p - log m form) write each term as x psi, second order
    in log(x / m) (``SKEW_PSI``), not x log(x / m) + c (y - x), first order in the normalisation's rounding. The
    fp32-rounding test above (log-ratios ~0.05, loss ~1e-3) did not tell the two apart (a mutation audit: every
    term through the first form passed it); at log-ratios ~0.005 (loss ~1.5e-5) the first form is ~4e-4 off of
    the 40-digit loss, x psi ~2e-5. Relative to the loss (atol 0: the loss is below the fp32 atol)."""
    generator = torch.Generator().manual_seed(5)
    student = torch.randn(3, 200, generator=generator, dtype=torch.float64) * 0.1
    teacher = student + torch.randn(3, 200, generator=generator, dtype=torch.float64) * 0.005
    student, teacher = student.float(), teacher.float()
    loss = kl_div(student.to(DEVICE), teacher.to(DEVICE), divergence=divergence, alpha=coefficient,
                  reduction="none", impl=impl)
    expected = _decimal_mixture_rows(student.double(), teacher.double(), divergence, coefficient)
    assert expected.max() < 1e-4
    torch.testing.assert_close(loss.double().cpu(), expected, rtol=TOLERANCES[torch.float32]["rtol"], atol=0.0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("divergence", ["forward", "jsd"])
def test_row_groups_of_student_and_teacher_with_different_group_strides(divergence, impl):
    """Shifted logits of a batch on one side only (``student[:, :-1]`` beside a contiguous teacher, and the other way
    round): both are read as [B, L, V] row groups, whose group strides differ ((L + 1) V against L V). The in-place
    tests above shift both sides of tensors of one shape, where the two group strides are equal (a mutation audit:
    a kernel reading the teacher's group with the student's stride, or the student's with the teacher's, passed)."""
    from distill_ops._utils import as_row_groups

    batch, length, vocab = 3, 5, 130
    labels = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(72)).to(DEVICE)
    labels[2, 1] = -100
    shifted = _logits((batch, length + 1, vocab), torch.float32, seed=70)[:, :-1]
    contiguous = _logits((batch, length, vocab), torch.float32, seed=71)
    for student, teacher in ((shifted, contiguous), (contiguous, shifted)):
        groups = as_row_groups((student, teacher), vocab)
        assert groups[0].shape[0] == batch and groups[0].stride(0) != groups[1].stride(0)
        loss, grad, upstream = _run(student, teacher, impl, divergence=divergence, labels=labels, temperature=1.5,
                                    reduction="none")
        ref_loss, ref_grad = independent_reference(student, teacher, upstream, divergence=divergence, labels=labels,
                                                   temperature=1.5, reduction="none")
        assert_close(loss, ref_loss, torch.float32, "loss")
        assert_close(grad, ref_grad, torch.float32, "gradient")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("coefficient", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("divergence", ["skew_forward", "skew_reverse"])
def test_skew_kls_where_one_side_is_between_e_minus_103_and_e_minus_88_of_the_other(divergence, coefficient, impl):
    """Tokens whose log(x / y) is about -95: below the kernel's clamp of log(x / y) at -88 (psi is held at its
    value there, so the term is taken as x log(x / m) + c_y (y - x), ~c_y y), yet x (~e^-95, a subnormal fp32) is not
    0, so the x == 0 branch does not catch it either. The far-below test above puts its tokens at +-60 and +-120,
    on either side of that window (a mutation audit: a kernel that never took the ruled-out branch there passed)."""
    generator = torch.Generator().manual_seed(61)
    student = (torch.randn(4, 64, generator=generator, dtype=torch.float64) * 2).float()
    teacher = (torch.randn(4, 64, generator=generator, dtype=torch.float64) * 2).float()
    student[:, 3] += 95.0  # q ~ 1, p ~ e^-95 there (skew forward: log(p / q) ~ -95)
    teacher[:, 9] += 95.0  # p ~ 1, q ~ e^-95 there (skew reverse: log(q / p) ~ -95)
    _check_against_reference(student.to(DEVICE), teacher.to(DEVICE), impl, divergence=divergence, alpha=coefficient,
                             reduction="none")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("coefficient", [1e-45, 1e-31])
@pytest.mark.parametrize("divergence", ["skew_forward", "skew_reverse"])
def test_skew_kls_below_1e_30_with_tokens_ruled_out_by_e_minus_10(divergence, coefficient, impl):
    """The kernel's skew KLs at a coefficient <= 1e-30 take a term whose log(x / m) is below -10 as
    x log(x / m) + c_y (y - x) (psi's e^-d may overflow there): its - c_y x is e^-10 of c_y y, so 2 % of the mass
    (4 of 200 tokens) at log(x / y) = -10.2 is 4e-5 of the loss (~0.02), which the fp32 tolerance (1e-4) cannot see;
    the 40-digit loss at 1e-5, as in the fp32-rounding test above (measured 1.2e-7; a mutation audit: a kernel that
    dropped that - c_y x passed every test)."""
    generator = torch.Generator().manual_seed(5)
    student = torch.randn(3, 200, generator=generator, dtype=torch.float64) * 0.1
    teacher = student.clone()
    (teacher if divergence == "skew_forward" else student)[:, :4] -= 10.2  # x = p (forward) or q (reverse)
    student, teacher = student.float(), teacher.float()
    loss = kl_div(student.to(DEVICE), teacher.to(DEVICE), divergence=divergence, alpha=coefficient,
                  reduction="none", impl=impl)
    expected = _decimal_mixture_rows(student.double(), teacher.double(), divergence, coefficient)
    torch.testing.assert_close(loss.double().cpu(), expected, rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_tvd_subgradient_is_0_at_tokens_where_p_equals_q_in_rows_that_differ(impl):
    """TVD's documented subgradient is 0 where p = q. Rows that differ elsewhere (two tokens' logits swapped, one of
    them -inf on each side: the same normalisers, so the other tokens' p and q are equal, bit for bit) with ties at
    the other tokens: their g = 0 enters S = sum q g and every gradient entry. The suite's ties were whole rows
    (teacher = student), where g = +-1/2 at every tie cancels in g - S (a mutation audit: a kernel taking g = 1/2 at
    ties passed every test)."""
    neg_inf = float("-inf")
    student = torch.tensor([[0.0, 0.0, 1.5, neg_inf, -0.5], [2.0, -1.0, neg_inf, 0.7, 2.0]], device=DEVICE)
    teacher = torch.tensor([[0.0, 0.0, neg_inf, 1.5, -0.5], [2.0, -1.0, 0.7, neg_inf, 2.0]], device=DEVICE)
    loss, grad, upstream = _run(student, teacher, impl, divergence="tvd", reduction="none", temperature=1.3)
    ref_loss, ref_grad = independent_reference(student, teacher, upstream, divergence="tvd", reduction="none",
                                               temperature=1.3)
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(grad, ref_grad, torch.float32, "gradient")


def test_triton_without_the_interpreter_is_refused_on_every_non_cuda_device(monkeypatch):
    """impl='triton' off CUDA needs TRITON_INTERPRET=1: unset means off (not only "0"), and a device that is
    neither CPU nor CUDA (here meta) is refused too, with the device named."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _bad(r"impl='triton' needs CUDA tensors or Triton's CPU interpreter .* got tensors on device cpu",
         torch.randn(2, 10), torch.randn(2, 10), impl="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    meta = torch.empty(2, 10, device="meta")
    _bad("impl='triton' needs CUDA tensors or Triton's CPU interpreter .* got tensors on device meta", meta, meta,
         impl="triton")


def test_bad_inputs_name_what_they_received():
    """The shared checks name the argument and what was received: the dtype, the other tensor's name and device,
    the refused choice."""
    s = torch.randn(2, 3, 10)
    t = torch.randn(2, 3, 10)
    _bad(r"student_logits must have dtype in \(float32, float16, bfloat16\), got torch.int64",
         torch.randint(0, 5, (2, 3, 10)), t, error=TypeError)
    _bad(r"teacher_logits is on meta but student_logits is on cpu: all tensors must share a device", s,
         torch.empty(2, 3, 10, device="meta"))
    _bad(r"divergence must be one of \('forward', .*\), got 'kl'", s, t, divergence="kl")
    _bad(r"reduction must be one of \('mean', 'sum', 'none'\), got 'batchmean'", s, t, reduction="batchmean")


def test_bad_labels_and_vocabularies_not_reached_by_the_other_bad_input_tests():
    """Labels on another device than the logits, bool labels (a mask is not a label tensor), one side with an empty
    vocabulary beside a non-empty one, and the smallest int64 ignore_index (accepted, as the largest is)."""
    s = torch.randn(2, 3, 10)
    t = torch.randn(2, 3, 10)
    _bad("labels is on meta but the logits are on cpu", s, t,
         labels=torch.zeros(2, 3, dtype=torch.long, device="meta"))
    _bad(r"labels must have dtype in \(int64, int32, int16, int8, uint8\), got torch.bool", s, t,
         labels=torch.ones(2, 3, dtype=torch.bool), error=TypeError)
    for student, teacher in ((s[..., :0], t), (s, t[..., :0])):
        _bad(rf"must have a vocabulary of V >= 1 \(a non-empty last dim\), got {student.shape[-1]} and "
             rf"{teacher.shape[-1]}", student, teacher, vocab_size=5)
    assert torch.isfinite(kl_div(s, t, labels=torch.zeros(2, 3, dtype=torch.long), ignore_index=-(2**63)))


def test_functional_vocab_size_is_checked_like_the_modules():
    """vocab_size passed to the functional (not only to a module) is an int >= 1, with an error naming it."""
    s = torch.randn(2, 3, 10)
    t = torch.randn(2, 3, 12)
    _bad("vocab_size must be >= 1, got 0", s, t, vocab_size=0)
    _bad("vocab_size must be >= 1, got -3", s, t, vocab_size=-3)
    _bad("vocab_size must be an int or None, got float: 4.0", s, t, vocab_size=4.0, error=TypeError)
    _bad("vocab_size must be an int or None, got bool: True", s, t, vocab_size=True, error=TypeError)


@pytest.mark.parametrize("impl", IMPLS)
def test_uint8_labels_are_compared_with_ignore_index_as_integers(impl):
    """uint8 labels are compared with ignore_index as integers: label 156 is a token, not ignore_index=-100
    (156 is -100 modulo 256, which a comparison made in uint8 would equate). Same rows as int64 labels."""
    student = _logits((3, 200), torch.float32, seed=70)
    teacher = _logits((3, 200), torch.float32, seed=71)
    labels = torch.tensor([1, 156, -100], device=DEVICE)
    expected = kl_div(student, teacher, labels=labels, reduction="none", impl=impl)
    assert expected[1] > 0 and expected[2] == 0
    small = torch.tensor([1, 156, 7], dtype=torch.uint8, device=DEVICE)
    assert torch.equal(kl_div(student, teacher, labels=small, reduction="none", impl=impl)[:2], expected[:2])


def test_complex_normalizer_is_refused_and_module_vocab_size_is_a_python_int():
    """A complex one-element normalizer is a TypeError naming it and its dtype (as a bool one is); a module built
    with a NumPy vocab_size keeps it as a Python int (its repr shows vocab_size=5)."""
    import numpy as np

    s = torch.randn(2, 3, 10)
    t = torch.randn(2, 3, 10)
    _bad("normalizer must be a real number or a one-element real tensor, got torch.complex64", s, t,
         normalizer=torch.tensor(4.0 + 0.0j), error=TypeError)
    module = KLDivLoss(vocab_size=np.int64(5))
    assert type(module.vocab_size) is int and module.vocab_size == 5
    assert "vocab_size=5" in repr(module)


@pytest.mark.parametrize("impl", IMPLS)
def test_backward_allocates_no_gradient_for_the_stored_gradient_output(impl):
    """The row op's second output (the stored gradient) gets no incoming gradient: backward makes no zero [N, V]
    tensor for it, and no other [N, V] tensor (the stored gradient is scaled in place and handed on)."""
    student = _logits((5, 211), torch.float32, seed=72).requires_grad_(True)
    teacher = _logits((5, 211), torch.float32, seed=73)
    loss = kl_div(student, teacher, divergence="jsd", impl=impl)
    with RecordTensorOps() as recorder:
        loss.backward(torch.tensor(1.5, device=DEVICE))
    assert recorder.ops_with_numel(5 * 211) == [], recorder.records
    _, expected = kl_div_reference(student, teacher, divergence="jsd")
    assert_close(student.grad, 1.5 * expected, torch.float32)


def test_torch_backward_of_a_folded_mean_touches_no_row_on_cpu():
    """On the CPU the PyTorch path's backward reads and writes no [N, V] tensor when every row's incoming gradient is
    1 (``loss.backward()`` after a folded mean; a pass over the gradient that multiplied it by 1 was ~10 % of a
    small fallback loss), for each stored-gradient loss; with another incoming gradient it scales (and the values
    are right: the scaling tests above). CPU tensors on purpose: on a GPU the check would synchronise, so every row
    is multiplied there."""
    generator = torch.Generator().manual_seed(74)
    student = torch.randn(5, 211, generator=generator).requires_grad_(True)
    others = [torch.randn(5, 211, generator=generator) for _ in range(2)]
    losses = {
        "kl_div": lambda: kl_div(student, others[0], impl="torch"),
        "aligndistil_kl": lambda: distill_ops.aligndistil_kl(student, *others, impl="torch"),
        "topk_kl_div": lambda: distill_ops.topk_kl_div(student, others[0], k=7, tail="bucket", impl="torch"),
    }
    for name, make_loss in losses.items():
        for upstream, expect_pass in ((1.0, False), (0.5, True)):
            loss = make_loss()
            with RecordTensorOps() as recorder:
                loss.backward(torch.tensor(upstream))
            assert bool(recorder.ops_touching_numel(5 * 211)) == expect_pass, (name, upstream, recorder.touched)
            student.grad = None


def test_reference_divides_by_a_float64_tensor_normalizer_in_float64():
    """kl_div_reference in float64 divides by a tensor normalizer in float64 (as by a float one): its mean is
    its sum / normalizer to float64 precision."""
    student = _logits((4, 50), torch.float64, seed=76)
    teacher = _logits((4, 50), torch.float64, seed=77)
    total, total_grad = kl_div_reference(student, teacher, reduction="sum")
    for normalizer in (3.0, torch.tensor(3.0, dtype=torch.float64), torch.tensor([3.0], dtype=torch.float64)):
        loss, grad = kl_div_reference(student, teacher, normalizer=normalizer)
        assert_close(loss, total / 3.0, torch.float64, str(normalizer))
        assert_close(grad, total_grad / 3.0, torch.float64, str(normalizer))


@pytest.mark.parametrize("impl", IMPLS)
def test_every_argument_in_every_layout(impl):
    """A layout audit (2026-12-07): each tensor argument given at a storage offset, as a column slice (padded rows),
    with stride 2 along the vocabulary, transposed, leading dims permuted, and (the teacher and labels, shared by
    the batch) expand()ed with stride 0 over the batch: the loss and the gradient are the float64 reference's, and
    no input's storage (the view's padding included) is written, in forward or backward."""
    from tests._layouts import bit_equal, layout_calls, student_leaf

    student = _logits((2, 3, 37), torch.float32, seed=90)
    teacher = _logits((1, 3, 37), torch.float32, seed=91).expand(2, 3, 37).contiguous()
    labels = torch.tensor([[4, -100, 36]], device=DEVICE).expand(2, 3).contiguous()
    inputs = dict(student=student, teacher=teacher, labels=labels)
    upstream = 0.5 + torch.rand((2, 3), generator=torch.Generator().manual_seed(92)).to(DEVICE)
    expected, expected_grad = independent_reference(student, teacher, upstream, divergence="jsd", labels=labels,
                                                    reduction="none")
    for name, layout, args, base, place in layout_calls(inputs, inputs, shared=("teacher", "labels")):
        before = base.clone()
        student_grad = student_leaf(args, "student", name, student, base, place)
        loss = kl_div(args["student"], args["teacher"], labels=args["labels"], divergence="jsd", reduction="none",
                      impl=impl)
        loss.backward(upstream)
        grad = student_grad()
        assert_close(loss, expected, torch.float32, f"{name} {layout}: loss")
        assert_close(grad, expected_grad, torch.float32, f"{name} {layout}: gradient")
        assert bit_equal(base.detach(), before), f"{name} {layout}: the input's storage was written"


@pytest.mark.parametrize("coef", [0.3, 1e-31])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_divergence_elements_without_terms_give_the_same_gradient_pieces(divergence, coef):
    """``_divergence_elements(..., with_terms=False)`` (fused_linear_kl_div's backward, which recomputes each block
    for dL/dz only) returns the same q and g as the full call, bit for bit, -inf logits on either side included
    (p = 0, q = 0, both), and forms neither the loss terms nor the row statistic's."""
    from distill_ops.kl_div import _divergence_elements

    generator = torch.Generator().manual_seed(5)
    student = torch.randn(6, 40, generator=generator) * 3
    teacher = torch.randn(6, 40, generator=generator) * 3
    student[0, :5] = float("-inf")
    teacher[1, 3:9] = float("-inf")
    student[2, 7], teacher[2, 7] = float("-inf"), float("-inf")
    lse_s, lse_t = student.logsumexp(-1, keepdim=True), teacher.logsumexp(-1, keepdim=True)
    terms, dots, q, g = _divergence_elements(student, teacher, lse_s, lse_t, divergence, coef)
    assert terms is not None
    with RecordTensorOps() as recorder:
        no_terms, no_dots, q_only, g_only = _divergence_elements(student, teacher, lse_s, lse_t, divergence, coef,
                                                                 with_terms=False)
    assert no_terms is None and no_dots is None
    torch.testing.assert_close(q_only, q, rtol=0, atol=0)
    torch.testing.assert_close(g_only, g, rtol=0, atol=0, equal_nan=True)
    with RecordTensorOps() as full_recorder:
        _divergence_elements(student, teacher, lse_s, lse_t, divergence, coef)
    assert len(recorder.records) < len(full_recorder.records)
