"""Regression tests for correctness bugs that peer distillation libraries shipped in their losses.

Each test reproduces the situation of one peer bug report (Liger-Kernel, TRL, DistillKit, Apple's Cut
Cross-Entropy, verl, ms-swift) against our ops and pins our behaviour to a float64 reference written here from first
principles (explicit ``log_softmax`` / ``softmax`` compositions, autograd for the gradients), independent
of ``distill_ops``' own reference code. The tolerances are those of ``tests/conftest.py``.
"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import distill_ops
from tests.conftest import DEVICE, IMPLS, assert_close

F64 = torch.float64


# ----------------------------------------------------------------------------------------------
# Independent float64 reference
# ----------------------------------------------------------------------------------------------


def _randn(shape, seed, scale=1.0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator, dtype=F64) * scale).to(dtype).to(DEVICE)


def _kl(log_a, log_b):
    """KL(a || b) per row from log-probabilities, with 0 log 0 = 0."""
    a = log_a.exp()
    return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a)).sum(-1)


def _ref_rows(student_logits, teacher_logits, divergence="forward", beta=0.5, temperature=1.0):
    """Per-row divergence in float64; differentiable with respect to ``student_logits``.

    p = softmax(teacher / T), q = softmax(student / T); the JSD mixture is m = beta p + (1 - beta) q
    with beta = 0 / 1 meaning forward / reverse KL (TRL's ``generalized_jsd_loss`` convention).
    """
    log_q = F.log_softmax(student_logits.to(F64) / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.to(F64) / temperature, dim=-1)
    if divergence == "forward" or (divergence == "jsd" and beta == 0.0):
        return _kl(log_p, log_q)
    if divergence == "reverse" or (divergence == "jsd" and beta == 1.0):
        return _kl(log_q, log_p)
    if divergence == "jsd":
        log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1.0 - beta)]), dim=0)
        return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)
    if divergence == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    raise ValueError(divergence)


def _leaf64(tensor):
    return tensor.detach().to(F64).clone().requires_grad_(True)


def _leaf(tensor):
    return tensor.detach().clone().requires_grad_(True)


def _assert_matches(loss, expected, loss_msg, *grads):
    """Backpropagate the float64 reference, then compare the loss and each ``(ours, reference leaf, msg)``
    gradient pair."""
    expected.backward()
    assert_close(loss, expected, torch.float32, loss_msg)
    for ours, ref, msg in grads:
        assert_close(ours.grad, ref.grad, torch.float32, msg)


def _fused_rows_ref(z, teacher, divergence, labels, ce_weight, kl_weight=1.0, temperature=1.0):
    """Per-row float64 reference of fused_linear_kl_div from explicit logits: kl_weight * divergence +
    ce_weight * CE(labels), zero at ignored rows."""
    per_row = kl_weight * _ref_rows(z, teacher, divergence, temperature=temperature)
    return (per_row + ce_weight * F.cross_entropy(z, labels.clamp_min(0), reduction="none")) * _active(labels)


def _assert_fused_rows(loss, per_row, hidden, weight, bias, tag):
    """Per-row losses and the (ours, float64 leaf) gradients of hidden, weight and bias."""
    assert_close(loss, per_row, torch.float32, f"{tag} per-row loss")
    for name, (ours, ref) in (("d hidden", hidden), ("d weight", weight), ("d bias", bias)):
        assert_close(ours.grad, ref.grad, torch.float32, f"{tag} {name}")


def _active(labels, ignore_index=-100):
    return (labels != ignore_index).to(F64)


def _ref_aligndistil_rows(student, dpo, other, beta0=0.1, r=10.0, eps=1e-3, temperature=1.0):
    """AlignDistil (contrastive mode): (beta0 / alpha) KL(q_s || softmax(z* / T)), alpha = r TVD + eps."""
    dpo, other = dpo.to(F64), other.to(F64)
    tvd = (torch.softmax(dpo, -1) - torch.softmax(other, -1)).abs().sum(-1, keepdim=True)
    alpha = r * tvd + eps
    teacher = dpo + alpha * (dpo - other)
    return (beta0 / alpha.squeeze(-1)) * _ref_rows(student, teacher, "reverse", temperature=temperature)


# ----------------------------------------------------------------------------------------------
# 1. TRL: generalized JSD with the mixture weights on the wrong distribution
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("beta", [0.0, 0.2, 1.0])
def test_jsd_beta_weights_the_teacher_in_the_mixture(beta, impl):
    """https://github.com/huggingface/trl/pull/3043: GKDTrainer built the mixture as
    beta * student + (1 - beta) * teacher instead of beta * teacher + (1 - beta) * student, and its
    beta = 0 / 1 endpoints then gave 0 instead of forward / reverse KL.

    An asymmetric beta (0.2) tells the two mixtures apart; the endpoints must be the plain KLs.
    """
    student = _randn((12, 150), seed=1, scale=3.0)
    teacher = _randn((12, 150), seed=2, scale=3.0)
    x = _leaf(student)
    loss = distill_ops.kl_div(x, teacher, divergence="jsd", beta=beta, impl=impl)
    loss.backward()
    x64 = _leaf64(student)
    expected = _ref_rows(x64, teacher, "jsd", beta=beta).mean()
    _assert_matches(loss, expected, "loss", (x, x64, "gradient"))
    if beta in (0.0, 1.0):  # the endpoints are the plain KLs, not a vanishing mixture
        plain = _ref_rows(student, teacher, "forward" if beta == 0.0 else "reverse").mean()
        assert_close(loss, plain, torch.float32, "endpoint")
        assert loss.item() > 0.5


@pytest.mark.parametrize("impl", IMPLS)
def test_fused_linear_jsd_beta_weights_the_teacher_in_the_mixture(impl):
    """https://github.com/huggingface/trl/pull/3043: the generalized JSD's mixture put beta on the student
    instead of the teacher; the fused linear op must use the same mixture as kl_div (m = beta p + (1-beta) q).
    """
    hidden, teacher_hidden = _randn((10, 24), seed=3), _randn((10, 20), seed=4)
    weight, teacher_weight = _randn((130, 24), seed=5, scale=0.6), _randn((130, 20), seed=6, scale=0.6)
    h, w = _leaf(hidden), _leaf(weight)
    loss = distill_ops.fused_linear_kl_div(h, w, teacher_hidden, teacher_weight, divergence="jsd", beta=0.2,
                                           impl=impl)
    loss.backward()
    h64, w64 = _leaf64(hidden), _leaf64(weight)
    expected = _ref_rows(h64 @ w64.T, teacher_hidden.to(F64) @ teacher_weight.to(F64).T, "jsd", beta=0.2).mean()
    _assert_matches(loss, expected, "loss", (h, h64, "d hidden"), (w, w64, "d weight"))


# ----------------------------------------------------------------------------------------------
# 2. TRL: "batchmean" without labels divided by seq_len * vocab
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_mean_without_labels_divides_by_the_number_of_tokens(impl):
    """https://github.com/huggingface/trl/pull/4105: without labels, GKDTrainer's JSD "batchmean" divided
    the summed loss by (tokens x vocabulary) instead of by the number of tokens.

    Leading dims [B, L]: ``mean`` is the sum over the B*L token rows divided by B*L, for kl_div and for
    the fused linear op, loss and gradient.
    """
    batch, length, vocab, hidden_size = 2, 5, 96, 16
    student = _randn((batch, length, vocab), seed=7, scale=2.0)
    teacher = _randn((batch, length, vocab), seed=8, scale=2.0)
    x = _leaf(student)
    loss = distill_ops.kl_div(x, teacher, divergence="reverse", impl=impl)
    loss.backward()
    x64 = _leaf64(student)
    expected = _ref_rows(x64, teacher, "reverse").sum() / (batch * length)
    _assert_matches(loss, expected, "kl_div loss", (x, x64, "kl_div gradient"))

    hidden = _randn((batch, length, hidden_size), seed=9)
    weight = _randn((vocab, hidden_size), seed=10, scale=0.5)
    h = _leaf(hidden)
    loss = distill_ops.fused_linear_kl_div(h, weight, teacher_logits=teacher, divergence="forward", impl=impl)
    loss.backward()
    h64 = _leaf64(hidden)
    expected = _ref_rows(h64 @ weight.to(F64).T, teacher, "forward").sum() / (batch * length)
    _assert_matches(loss, expected, "fused loss", (h, h64, "fused d hidden"))


# ----------------------------------------------------------------------------------------------
# 3. Liger: ignore_index accepted but never applied in the fused linear JSD distillation loss
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_ignored_rows_contribute_nothing_and_are_not_counted(impl):
    """https://github.com/linkedin/Liger-Kernel/pull/974: LigerFusedLinearJSDLoss took ``ignore_index``
    but never applied it, so padding / prompt tokens entered the loss and the mean divided by all tokens.

    Ignored rows (given garbage logits) must change neither the loss nor the other rows' gradients, get a
    zero gradient, and the mean must divide by the counted rows only: fused linear JSD, kl_div JSD,
    aligndistil_kl and fspad_draft_loss (whose ``loss_mask`` plays the same role).
    """
    rows, hidden_size, vocab = 12, 20, 110
    labels = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(11)).to(DEVICE)
    labels[[0, 4, 5, 11]] = -100
    active = _active(labels)
    count = active.sum()

    # fused linear JSD (the peer's op)
    hidden, teacher_hidden = _randn((rows, hidden_size), seed=12), _randn((rows, hidden_size), seed=13)
    hidden[labels == -100] *= 50.0  # garbage at ignored rows
    weight, teacher_weight = _randn((vocab, hidden_size), seed=14, scale=0.5), _randn((vocab, hidden_size), seed=15)
    h, w = _leaf(hidden), _leaf(weight)
    loss = distill_ops.fused_linear_kl_div(h, w, teacher_hidden, teacher_weight, divergence="jsd", beta=0.5,
                                           labels=labels, impl=impl)
    loss.backward()
    h64, w64 = _leaf64(hidden), _leaf64(weight)
    per_row = _ref_rows(h64 @ w64.T, teacher_hidden.to(F64) @ teacher_weight.to(F64).T, "jsd", beta=0.5)
    expected = (per_row * active).sum() / count
    _assert_matches(loss, expected, "fused loss", (h, h64, "fused d hidden"), (w, w64, "fused d weight"))
    assert torch.all(h.grad[labels == -100] == 0)

    # kl_div JSD
    student, teacher = _randn((rows, vocab), seed=16, scale=3.0), _randn((rows, vocab), seed=17, scale=3.0)
    student[labels == -100] = 1e4
    x = _leaf(student)
    loss = distill_ops.kl_div(x, teacher, divergence="jsd", beta=0.5, labels=labels, impl=impl)
    loss.backward()
    x64 = _leaf64(student)
    expected = (torch.where(active > 0, _ref_rows(x64, teacher, "jsd", beta=0.5), 0.0)).sum() / count
    _assert_matches(loss, expected, "kl_div loss", (x, x64, "kl_div gradient"))

    # aligndistil_kl
    dpo, other = _randn((rows, vocab), seed=18, scale=2.0), _randn((rows, vocab), seed=19, scale=2.0)
    x = _leaf(student)
    loss = distill_ops.aligndistil_kl(x, dpo, other, labels=labels, impl=impl)
    loss.backward()
    x64 = _leaf64(student)
    expected = torch.where(active > 0, _ref_aligndistil_rows(x64, dpo, other), 0.0).sum() / count
    _assert_matches(loss, expected, "aligndistil loss", (x, x64, "aligndistil gradient"))

    # fspad_draft_loss: loss_mask instead of labels
    regress, predict = _randn((rows, hidden_size), seed=20), _randn((rows, hidden_size), seed=21)
    target = _randn((rows, hidden_size), seed=22)
    regress[labels == -100] *= 100.0
    predict[labels == -100] *= 100.0
    lm_head = _randn((vocab, hidden_size), seed=23, scale=0.5)
    mask = labels != -100
    xr, xp = _leaf(regress), _leaf(predict)
    loss = distill_ops.fspad_draft_loss(xr, xp, target, lm_head, loss_mask=mask, impl=impl)
    loss.backward()
    r64, p64 = _leaf64(regress), _leaf64(predict)
    head = lm_head.to(F64)
    soft_ce = -(torch.softmax(target.to(F64) @ head.T, -1) * F.log_softmax(p64 @ head.T, -1)).sum(-1)
    smooth = F.smooth_l1_loss(r64, target.to(F64), reduction="none", beta=1.0).mean(-1)
    expected = (torch.where(active > 0, 1.0 * smooth + 0.1 * soft_ce, 0.0)).sum() / count
    _assert_matches(loss, expected, "fspad loss", (xr, r64, "fspad d regress"), (xp, p64, "fspad d predict"))


# ----------------------------------------------------------------------------------------------
# 4. TRL: num_items_in_batch ignored under gradient accumulation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_normalizer_makes_micro_batches_add_up_to_the_full_batch(impl):
    """https://github.com/huggingface/trl/pull/6006: GKD / distillation trainers accepted
    ``num_items_in_batch`` but normalised each micro-batch by its own token count, so the accumulated
    loss and gradient depended on how the batch was split.

    Two micro-batches with different numbers of counted tokens, each reduced with
    ``normalizer = counted tokens of the whole batch``, must sum to the full-batch mean (loss and
    gradient), for kl_div, the fused linear op and aligndistil_kl.
    """
    rows, hidden_size, vocab = 14, 16, 100
    labels = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(24)).to(DEVICE)
    labels[[1, 2, 3, 9]] = -100  # 4 counted of 6 in the first micro-batch, 6 of 8 in the second
    total = int((labels != -100).sum())
    splits = [slice(0, 6), slice(6, rows)]
    student, teacher = _randn((rows, vocab), seed=25, scale=2.0), _randn((rows, vocab), seed=26, scale=2.0)
    dpo, other = _randn((rows, vocab), seed=27, scale=2.0), _randn((rows, vocab), seed=28, scale=2.0)
    hidden = _randn((rows, hidden_size), seed=29)
    weight = _randn((vocab, hidden_size), seed=30, scale=0.5)

    def accumulate(run, leaf):
        """Sum of the micro-batch losses and the accumulated gradient of ``leaf``."""
        grad, loss_sum = torch.zeros_like(leaf), 0.0
        for part in splits:
            x = _leaf(leaf[part])
            loss = run(x, part)
            loss.backward()
            grad[part] += x.grad
            loss_sum = loss_sum + loss.detach()
        return loss_sum, grad

    cases = {
        "kl_div": (student, lambda x, part: distill_ops.kl_div(
            x, teacher[part], divergence="jsd", beta=0.3, labels=labels[part], normalizer=total, impl=impl),
            lambda x: _ref_rows(x, teacher, "jsd", beta=0.3)),
        "fused_linear_kl_div": (hidden, lambda x, part: distill_ops.fused_linear_kl_div(
            x, weight, teacher_logits=teacher[part], divergence="forward", labels=labels[part], ce_weight=0.5,
            normalizer=torch.tensor(float(total)), impl=impl),
            lambda x: _ref_rows(x @ weight.to(F64).T, teacher, "forward")
            + 0.5 * F.cross_entropy(x @ weight.to(F64).T, labels.clamp_min(0), reduction="none")),
        "aligndistil_kl": (student, lambda x, part: distill_ops.aligndistil_kl(
            x, dpo[part], other[part], labels=labels[part], normalizer=total, impl=impl),
            lambda x: _ref_aligndistil_rows(x, dpo, other)),
    }
    active = _active(labels)
    for name, (leaf, run, ref) in cases.items():
        loss, grad = accumulate(run, leaf)
        x64 = _leaf64(leaf)
        expected = torch.where(active > 0, ref(x64), 0.0).sum() / total  # full-batch mean
        expected.backward()
        assert_close(loss, expected, torch.float32, f"{name} loss")
        assert_close(grad, x64.grad, torch.float32, f"{name} gradient")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("zero", ["tensor", "int", "float"])
def test_zero_tensor_normalizer_with_every_row_ignored_is_zero_not_nan(zero, dtype, impl):
    """Under gradient accumulation transformers passes ``num_items_in_batch`` as a tensor; when a batch counts no
    token (every label -100) it is 0. A tensor cannot be checked without a host sync, so the mean's weight is
    1 / 0 = inf: the PyTorch paths multiplied the ignored rows' zeros by it (NaN), fused_linear_kl_div on both
    impls. The loss must be 0 with zero gradients, as when nothing counts without a normalizer. Some transformers
    versions hand the count over as a Python int: 0 as a number is the same (it was a ValueError). In every dtype,
    under a loss scale, and for DACKLLoss's bound network too (a low-precision audit: fp16's deferred mean weight
    and DACKLLoss's training path selected after multiplying by inf, and backward's 0 * inf was NaN)."""
    labels = torch.full((2, 3), -100, device=DEVICE)
    zero = {"tensor": torch.tensor(0.0, device=DEVICE), "int": 0, "float": 0.0}[zero]
    student, teacher, other = (_randn((2, 3, 20), seed=s, dtype=dtype) for s in (60, 61, 62))
    hidden, weight = _randn((2, 3, 8), seed=63, dtype=dtype), _randn((20, 8), seed=64, dtype=dtype)
    torch.manual_seed(65)
    dackl = {mode: distill_ops.DACKLLoss(vocab_top_m=8, hidden=4, tail="bucket", impl=impl).to(DEVICE).to(dtype)
             for mode in ("train", "eval")}
    dackl["eval"].eval()
    cases = {
        "kl_div": (student, lambda x: distill_ops.kl_div(x, teacher, labels=labels, normalizer=zero, impl=impl)),
        "topk_kl_div": (student, lambda x: distill_ops.topk_kl_div(x, teacher, k=5, labels=labels, normalizer=zero,
                                                                   impl=impl)),
        "aligndistil_kl": (student, lambda x: distill_ops.aligndistil_kl(x, teacher, other, labels=labels,
                                                                         normalizer=zero, impl=impl)),
        "fused_linear_kl_div": (hidden, lambda x: distill_ops.fused_linear_kl_div(
            x, weight, teacher_logits=teacher, labels=labels, ce_weight=0.5, normalizer=zero, impl=impl)),
        "DACKLLoss train": (student, lambda x: dackl["train"](x, teacher, labels, normalizer=zero)),
        "DACKLLoss eval": (student, lambda x: dackl["eval"](x, teacher, labels, normalizer=zero)),
    }
    for name, (leaf, run) in cases.items():
        x = _leaf(leaf)
        loss = run(x)
        (loss * 2.0**16).backward()  # a GradScaler's loss scale
        assert loss.item() == 0.0, name
        assert torch.equal(x.grad, torch.zeros_like(x)), name
    for parameter in dackl["train"].parameters():  # the bound network trains through the soft mask
        assert torch.equal(parameter.grad, torch.zeros_like(parameter)), parameter.grad


@pytest.mark.parametrize("impl", IMPLS)
def test_create_graph_backward_is_refused_not_silently_first_order(impl):
    """The stored-gradient losses return a constant gradient: with create_graph=True it carried no graph, so a
    gradient penalty over cross_entropy + kl_div silently lost the KL's curvature (0.043 instead of 0.086 in a
    reviewer's case). Now a RuntimeError says the losses are not twice differentiable; first order is unchanged."""
    student, teacher, other = (_randn((4, 30), seed=s, scale=2.0) for s in (70, 71, 72))
    labels = torch.tensor([1, 2, 3, 4], device=DEVICE)
    runs = {
        "kl_div": lambda x: distill_ops.kl_div(x, teacher, impl=impl),
        "kl_div inplace_grad": lambda x: distill_ops.kl_div(x * 1.0, teacher, inplace_grad=True, impl=impl),
        "aligndistil_kl": lambda x: distill_ops.aligndistil_kl(x, teacher, other, impl=impl),
        "topk_kl_div": lambda x: distill_ops.topk_kl_div(x, teacher, k=5, impl=impl),
        # x as the hidden states of an identity head: the error came only at a second backward, generic
        "fused_linear_kl_div": lambda x: distill_ops.fused_linear_kl_div(
            x, torch.eye(30, device=DEVICE), teacher_logits=teacher, impl=impl),
    }
    for name, run in runs.items():
        x = _leaf(student)
        loss = F.cross_entropy(x, labels) + run(x)
        with pytest.raises(RuntimeError, match="not twice differentiable"):
            torch.autograd.grad(loss, x, create_graph=True)
        x = _leaf(student)
        (first,) = torch.autograd.grad(run(x), x)
        assert torch.isfinite(first).all() and first.abs().sum() > 0, name


# ----------------------------------------------------------------------------------------------
# 5. Liger: reduction="none" with a per-row upstream gradient scaled everything by grad_output[0]
# ----------------------------------------------------------------------------------------------


UPSTREAM = [1.0, 0.0, 2.5, 1.0, -0.7, 1.0, 3.0, 0.25, 1.0, -2.0]


@pytest.mark.parametrize("impl", IMPLS)
def test_reduction_none_applies_each_rows_upstream_gradient_to_weight_and_bias(impl):
    """https://github.com/linkedin/Liger-Kernel/pull/1298: with reduction='none' the fused linear
    cross-entropy loaded the per-token upstream gradient as a scalar, so grad_weight / grad_bias (and the
    input gradient) were all multiplied by grad_output[0]; and https://github.com/linkedin/Liger-Kernel/issues/968:
    with reduction='none' and ignored labels its gradients came out wrong, even all zero.

    A per-row upstream gradient mixing exact 1s (which our Triton backward skips), 0, negative and other
    values, with an ignored row and the CE term on: hidden, weight and bias gradients of the fused op.
    """
    rows, hidden_size, vocab = len(UPSTREAM), 16, 120
    labels = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(31)).to(DEVICE)
    labels[3] = -100
    upstream = torch.tensor(UPSTREAM, device=DEVICE)
    hidden, teacher_hidden = _randn((rows, hidden_size), seed=32), _randn((rows, hidden_size), seed=33)
    weight, teacher_weight = _randn((vocab, hidden_size), seed=34, scale=0.5), _randn((vocab, hidden_size), seed=35)
    bias = _randn((vocab,), seed=36)
    for divergence in ("forward", "jsd"):
        h, w, b = _leaf(hidden), _leaf(weight), _leaf(bias)
        loss = distill_ops.fused_linear_kl_div(h, w, teacher_hidden, teacher_weight, student_bias=b,
                                               divergence=divergence, labels=labels, ce_weight=0.5,
                                               reduction="none", impl=impl)
        loss.backward(upstream)
        h64, w64, b64 = _leaf64(hidden), _leaf64(weight), _leaf64(bias)
        z = h64 @ w64.T + b64
        per_row = _fused_rows_ref(z, teacher_hidden.to(F64) @ teacher_weight.to(F64).T, divergence, labels, 0.5)
        per_row.backward(upstream.to(F64))
        _assert_fused_rows(loss, per_row, (h, h64), (w, w64), (b, b64), divergence)


@pytest.mark.parametrize("impl", IMPLS)
def test_reduction_none_applies_each_rows_upstream_gradient_to_stored_gradients(impl):
    """https://github.com/linkedin/Liger-Kernel/pull/1298: reduction='none' backward multiplied every row's
    gradient by the first row's upstream gradient.

    kl_div and aligndistil_kl store dL/dz in forward and scale it per row in backward (the Triton kernel
    skips rows whose upstream is exactly 1): each row must get its own upstream value.
    """
    rows, vocab = len(UPSTREAM), 90
    upstream = torch.tensor(UPSTREAM, device=DEVICE)
    student, teacher = _randn((rows, vocab), seed=37, scale=2.0), _randn((rows, vocab), seed=38, scale=2.0)
    dpo, other = _randn((rows, vocab), seed=39, scale=2.0), _randn((rows, vocab), seed=40, scale=2.0)
    cases = {
        "kl_div": (lambda x: distill_ops.kl_div(x, teacher, divergence="tvd", reduction="none", impl=impl),
                   lambda x: _ref_rows(x, teacher, "tvd")),
        "aligndistil_kl": (lambda x: distill_ops.aligndistil_kl(x, dpo, other, reduction="none", impl=impl),
                           lambda x: _ref_aligndistil_rows(x, dpo, other)),
    }
    for name, (run, ref) in cases.items():
        x = _leaf(student)
        loss = run(x)
        loss.backward(upstream)
        x64 = _leaf64(student)
        expected = ref(x64)
        expected.backward(upstream.to(F64))
        assert_close(loss, expected, torch.float32, f"{name} per-row loss")
        assert_close(x.grad, x64.grad, torch.float32, f"{name} gradient")


# ----------------------------------------------------------------------------------------------
# 6. Liger: JSD mixture computed as log(exp + exp) underflows to log(0) and gives NaN
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_jsd_of_nearly_disjoint_distributions_is_finite(impl):
    """https://github.com/linkedin/Liger-Kernel/issues/769: LigerFusedLinearJSDLoss formed the mixture as
    log((1 - beta) exp(log q) + beta exp(log p)); where both probabilities underflow the log is -inf and the
    loss becomes NaN.

    Student and teacher peaked on different tokens with logit gaps in the thousands (every probability
    but one underflows in fp32): loss and gradient must be finite and match float64, for kl_div and the
    fused linear op.
    """
    rows, vocab, hidden_size = 8, 80, 16
    student = _randn((rows, vocab), seed=41, scale=1.0)
    teacher = _randn((rows, vocab), seed=42, scale=1.0)
    index = torch.arange(rows, device=DEVICE)
    student[index, index] += 3000.0
    teacher[index, index + 40] += 3000.0
    student[:, -5:] -= 2000.0  # tokens that both sides rule out
    teacher[:, -5:] -= 2500.0
    for beta in (0.1, 0.5):
        x = _leaf(student)
        loss = distill_ops.kl_div(x, teacher, divergence="jsd", beta=beta, impl=impl)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
        x64 = _leaf64(student)
        expected = _ref_rows(x64, teacher, "jsd", beta=beta).mean()
        _assert_matches(loss, expected, f"kl_div loss beta={beta}", (x, x64, f"kl_div gradient beta={beta}"))

    # fused: one-hot-like hidden states times a scaled identity-like head produce the same logits
    hidden = torch.eye(rows, hidden_size, device=DEVICE) * 60.0
    weight = _randn((vocab, hidden_size), seed=43, scale=0.02)
    weight[:rows, :rows] += torch.eye(rows, device=DEVICE) * 50.0  # student logit 3000 on token i
    teacher_weight = _randn((vocab, hidden_size), seed=44, scale=0.02)
    teacher_weight[40:40 + rows, :rows] += torch.eye(rows, device=DEVICE) * 50.0  # teacher on token i + 40
    h = _leaf(hidden)
    loss = distill_ops.fused_linear_kl_div(h, weight, hidden, teacher_weight, divergence="jsd", beta=0.5, impl=impl)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(h.grad).all()
    h64 = _leaf64(hidden)
    expected = _ref_rows(h64 @ weight.to(F64).T, hidden.to(F64) @ teacher_weight.to(F64).T, "jsd").mean()
    _assert_matches(loss, expected, "fused loss", (h, h64, "fused d hidden"))


# ----------------------------------------------------------------------------------------------
# 7. Liger: fused linear JSD rounded bf16 logits before its "fp32" computation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_fused_linear_bf16_gradient_uses_unrounded_logits(impl):
    """https://github.com/linkedin/Liger-Kernel/issues/1432: fused_linear_jsd ran the projection GEMM in
    bf16 and cast its rounded output to fp32, so the logits carried 8 mantissa bits and the JSD gradient
    (a difference of nearly equal distributions) was off by 4-23 %.

    bf16 inputs, logits of standard deviation ~30 (bf16 spacing 0.125-0.25 there) and a teacher head close
    to the student's: the gradient must match float64 computed from the exact products of the bf16
    operands. The upstream gradient of 1000 keeps the comparison relative (bf16 rtol) rather than
    absorbed by the bf16 atol.
    """
    rows, hidden_size, vocab = 16, 32, 256
    hidden = _randn((rows, hidden_size), seed=45, dtype=torch.bfloat16)
    base = _randn((vocab, hidden_size), seed=46, scale=5.0)
    weight = base.to(torch.bfloat16)
    teacher_weight = (base + _randn((vocab, hidden_size), seed=47, scale=0.05)).to(torch.bfloat16)
    upstream = torch.tensor(1000.0, device=DEVICE)
    h, w = _leaf(hidden), _leaf(weight)
    loss = distill_ops.fused_linear_kl_div(h, w, hidden, teacher_weight, divergence="jsd", beta=0.5, impl=impl)
    loss.backward(upstream)
    h64, w64 = _leaf64(hidden), _leaf64(weight)
    expected = _ref_rows(h64 @ w64.T, hidden.to(F64) @ teacher_weight.to(F64).T, "jsd", beta=0.5).mean()
    expected.backward(upstream.to(F64))
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    assert_close(loss, expected, torch.bfloat16, "loss")
    assert_close(h.grad, h64.grad, torch.bfloat16, "d hidden")
    assert_close(w.grad, w64.grad, torch.bfloat16, "d weight")


# ----------------------------------------------------------------------------------------------
# 8. Cut Cross-Entropy: the bias was added more than once to the correct (label) logit
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_bias_enters_the_label_logit_exactly_once(impl):
    """https://github.com/apple/ml-cross-entropy/issues/52: with a classifier bias, Cut Cross-Entropy added
    the bias several times to the correct-class logit, so losses came out far too low (even negative).

    Cross-entropy through the fused op with a large student bias (and a teacher bias for the KL term):
    loss and all gradients against float64 ``F.cross_entropy`` on ``h @ W.T + b``; CE alone must also
    stay non-negative.
    """
    rows, hidden_size, teacher_hidden_size, vocab = 12, 20, 24, 140
    labels = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(48)).to(DEVICE)
    labels[6] = -100
    hidden, teacher_hidden = _randn((rows, hidden_size), seed=49), _randn((rows, teacher_hidden_size), seed=50)
    weight = _randn((vocab, hidden_size), seed=51, scale=0.4)
    teacher_weight = _randn((vocab, teacher_hidden_size), seed=52, scale=0.4)
    bias, teacher_bias = _randn((vocab,), seed=53, scale=4.0), _randn((vocab,), seed=54, scale=4.0)
    bias[labels[labels >= 0]] += 6.0  # the label tokens carry the largest biases
    for kl_weight, ce_weight in ((0.0, 1.0), (0.6, 0.4)):
        h, w, b = _leaf(hidden), _leaf(weight), _leaf(bias)
        loss = distill_ops.fused_linear_kl_div(
            h, w, teacher_hidden, teacher_weight, student_bias=b, teacher_bias=teacher_bias, divergence="reverse",
            temperature=1.5, labels=labels, kl_weight=kl_weight, ce_weight=ce_weight, reduction="none", impl=impl)
        loss.sum().backward()
        h64, w64, b64 = _leaf64(hidden), _leaf64(weight), _leaf64(bias)
        z = h64 @ w64.T + b64
        t = teacher_hidden.to(F64) @ teacher_weight.to(F64).T + teacher_bias.to(F64)
        per_row = _fused_rows_ref(z, t, "reverse", labels, ce_weight, kl_weight=kl_weight, temperature=1.5)
        per_row.sum().backward()
        if kl_weight == 0.0:
            assert torch.all(loss >= 0)
        _assert_fused_rows(loss, per_row, (h, h64), (w, w64), (b, b64), f"kl={kl_weight}")


# ----------------------------------------------------------------------------------------------
# 9. TRL: the Liger fused JSD path silently added a CE term and used another temperature
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_fused_linear_defaults_are_the_pure_divergence_with_temperature_on_both_sides(impl):
    """https://github.com/huggingface/trl/pull/5731: LigerFusedLinearJSDLoss defaulted to
    0.5 * CE + 0.5 * JSD and GKD passed it the sampling temperature, so the fused path optimised another
    objective than the unfused one.

    With labels given and no weights passed, the fused op must be exactly the divergence (no CE), equal
    to kl_div on the materialised logits, with the temperature dividing both sides' logits and no T^2.
    """
    rows, hidden_size, vocab, temperature = 10, 16, 120, 2.0
    labels = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(55)).to(DEVICE)
    hidden, teacher_hidden = _randn((rows, hidden_size), seed=56), _randn((rows, hidden_size), seed=57)
    weight = _randn((vocab, hidden_size), seed=58, scale=0.8)
    teacher_weight = _randn((vocab, hidden_size), seed=59, scale=0.8)
    h = _leaf(hidden)
    fused = distill_ops.fused_linear_kl_div(h, weight, teacher_hidden, teacher_weight, divergence="jsd",
                                            temperature=temperature, labels=labels, impl=impl)
    fused.backward()
    module = distill_ops.FusedLinearKLDivLoss(divergence="jsd", temperature=temperature, impl=impl)
    module_loss = module(hidden, weight, teacher_hidden, teacher_weight, labels=labels)
    student_logits = _leaf(hidden @ weight.T)
    unfused = distill_ops.kl_div(student_logits, teacher_hidden @ teacher_weight.T, divergence="jsd",
                                 temperature=temperature, labels=labels, impl=impl)
    h64 = _leaf64(hidden)
    z, t = h64 @ weight.to(F64).T, teacher_hidden.to(F64) @ teacher_weight.to(F64).T
    expected = _ref_rows(z, t, "jsd", beta=0.5, temperature=temperature).mean()
    expected.backward()
    assert_close(fused, expected, torch.float32, "fused loss")
    assert_close(module_loss, expected, torch.float32, "module loss")
    assert_close(unfused, expected, torch.float32, "kl_div loss")
    assert_close(h.grad, h64.grad, torch.float32, "fused d hidden")
    # the temperature is applied to both sides: at T = 2 the value differs from the T = 1 divergence
    at_one = _ref_rows(z.detach(), t, "jsd", beta=0.5, temperature=1.0).mean()
    assert abs(expected.item() - at_one.item()) > 1e-2


# ----------------------------------------------------------------------------------------------
# 10. DistillKit: vocabulary mismatch "fixed" by zero-padding the smaller side's logits
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_vocab_size_compares_the_shared_columns_and_ignores_padding(impl):
    """https://github.com/arcee-ai/DistillKit/pull/37: DistillKit's ``pad_logits`` (from distil_logits.py)
    aligned Qwen-style vocabularies by appending zero logits to the smaller side, which gives the padding
    columns real probability mass (and reviewers found it built the student's padding with the teacher's
    dtype / device).

    Teacher padded beyond the student (Vt > V) with large logits in the padding: with ``vocab_size=V``
    both sides are read as their first V columns, whatever the padding holds, for kl_div and the fused
    linear op (teacher weight rows beyond V ignored, student weight rows beyond V get zero gradient);
    without ``vocab_size`` the mismatch is an error naming both sizes.
    """
    rows, vocab, padded, hidden_size = 8, 100, 128, 16
    student = _randn((rows, vocab), seed=60, scale=2.0)
    teacher = _randn((rows, padded), seed=61, scale=2.0)
    teacher[:, vocab:] = 8.0  # padding a zero-padder would turn into probability mass
    x = _leaf(student)
    loss = distill_ops.kl_div(x, teacher, divergence="forward", vocab_size=vocab, impl=impl)
    loss.backward()
    x64 = _leaf64(student)
    expected = _ref_rows(x64, teacher[:, :vocab], "forward").mean()
    _assert_matches(loss, expected, "kl_div loss", (x, x64, "kl_div gradient"))
    with pytest.raises(ValueError, match=rf"{vocab}.*{padded}"):
        distill_ops.kl_div(student, teacher, impl=impl)

    hidden = _randn((rows, hidden_size), seed=62)
    weight = _randn((padded, hidden_size), seed=63, scale=0.5)  # student head padded too (Qwen 151936 vs 152064)
    teacher_weight = _randn((padded + 16, hidden_size), seed=64, scale=0.5)
    teacher_weight[vocab:] = 3.0
    h, w = _leaf(hidden), _leaf(weight)
    loss = distill_ops.fused_linear_kl_div(h, w, hidden, teacher_weight, divergence="reverse", vocab_size=vocab,
                                           impl=impl)
    loss.backward()
    h64, w64 = _leaf64(hidden), _leaf64(weight)
    expected = _ref_rows(h64 @ w64[:vocab].T, hidden.to(F64) @ teacher_weight[:vocab].to(F64).T, "reverse").mean()
    _assert_matches(loss, expected, "fused loss", (h, h64, "fused d hidden"), (w, w64, "fused d weight"))
    assert torch.all(w.grad[vocab:] == 0)


# ----------------------------------------------------------------------------------------------
# 11. Liger: confident predictions lost the CE true-class gradient to bf16 cancellation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_cross_entropy_true_class_gradient_survives_bf16_for_confident_predictions(impl):
    """https://github.com/linkedin/Liger-Kernel/pull/1419 (CuTeDSL port of the Triton fix #1329): the
    cross-entropy backward stored softmax(x_y) in bf16 first and subtracted 1 afterwards, so for confident
    predictions (p_y ~ 0.99) the true-class gradient p_y - 1 was mostly bf16 rounding error.

    bf16 hidden states and head with label probabilities 0.91-0.996, the fused op's CE term alone: the
    hidden and weight gradients must match float64 ``F.cross_entropy`` (upstream gradient 1000 so that the
    bf16 rtol, not its atol, decides).
    """
    rows, hidden_size, vocab = 8, 32, 64
    generator = torch.Generator().manual_seed(70)
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    hidden = torch.randn(rows, hidden_size, generator=generator, dtype=F64)
    weight = torch.randn(vocab, hidden_size, generator=generator, dtype=F64) * 0.1
    weight[labels] += 0.3 * hidden  # each row's label logit ends up well above the rest
    hidden, weight = hidden.to(torch.bfloat16).to(DEVICE), weight.to(torch.bfloat16).to(DEVICE)
    labels = labels.to(DEVICE)
    upstream = torch.tensor(1000.0, device=DEVICE)
    h, w = _leaf(hidden), _leaf(weight)
    teacher = torch.zeros(rows, vocab, dtype=torch.bfloat16, device=DEVICE)
    loss = distill_ops.fused_linear_kl_div(h, w, teacher_logits=teacher, labels=labels, kl_weight=0.0, ce_weight=1.0,
                                           impl=impl)
    loss.backward(upstream)
    h64, w64 = _leaf64(hidden), _leaf64(weight)
    logits = h64 @ w64.T
    assert torch.softmax(logits.detach(), -1).gather(1, labels[:, None]).min() > 0.9
    expected = F.cross_entropy(logits, labels)
    expected.backward(upstream.to(F64))
    assert_close(loss, expected, torch.bfloat16, "loss")
    assert_close(h.grad, h64.grad, torch.bfloat16, "d hidden")
    assert_close(w.grad, w64.grad, torch.bfloat16, "d weight")


# ----------------------------------------------------------------------------------------------
# 12. verl / ms-swift: beta = 1 silently clamped to 1 - 1e-6, where the generalized JSD is ~0
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_jsd_endpoints_are_not_clamped_and_near_endpoint_betas_scale_the_loss(impl):
    """https://github.com/verl-project/verl-recipe/issues/151: the GKD recipe clamped beta to
    [1e-6, 1 - 1e-6], so ``beta=1.0`` gave a loss of ~1e-6 instead of the reverse KL, with no warning; and
    https://github.com/modelscope/ms-swift/issues/10078: the generalized JSD tends to 0 at both ends
    (about beta KL(p || q) as beta -> 0 and (1 - beta) KL(q || p) as beta -> 1), which users read as a
    direction knob. Our convention is TRL's: the interior formula is the GKD paper's (documented as
    vanishing at the ends) and beta = 0 / 1 are exactly the forward / reverse KL. Checked: the endpoints
    equal the KLs, and beta = 1e-4 / 1 - 1e-4 give 1e-4 times them to first order (float64 reference; the
    second-order term is -beta^2 chi^2(p || q) / 2, 0.04 % of the first here).
    """
    student = _randn((6, 200), seed=80)
    teacher = _randn((6, 200), seed=81)
    forward = _ref_rows(student, teacher, "forward").mean()
    reverse = _ref_rows(student, teacher, "reverse").mean()
    for beta, endpoint_kl in ((0.0, forward), (1.0, reverse), (1e-4, forward), (1.0 - 1e-4, reverse)):
        loss = distill_ops.kl_div(student, teacher, divergence="jsd", beta=beta, impl=impl)
        assert_close(loss, _ref_rows(student, teacher, "jsd", beta=beta).mean(), torch.float32, f"beta={beta}")
        scale = 1.0 if beta in (0.0, 1.0) else 1e-4
        ratio = loss.item() / (scale * endpoint_kl.item())
        assert abs(ratio - 1.0) < 0.01, (beta, ratio)


# ----------------------------------------------------------------------------------------------
# 13. ms-swift: JSD of an fp32 student and a bf16 teacher came out negative
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_jsd_of_an_fp32_student_and_a_bf16_teacher_is_not_negative(impl):
    """https://github.com/modelscope/ms-swift/issues/10156 (fix: PR 10175): Megatron GKD with an fp32 student and a
    bf16 teacher reported JSD = -1.7e-4 where float64 gives +5.1e-4 (the teacher was tempered and normalised in
    bf16). Ours reads each side in fp32: for a student close to its teacher (the case that went negative) every row
    is >= 0 and the loss and gradient equal float64's on the bf16-rounded teacher."""
    student = _randn((16, 3000), seed=90, scale=5.0)
    teacher = (student + _randn((16, 3000), seed=91, scale=0.05)).bfloat16()
    leaf = student.clone().requires_grad_(True)
    rows = distill_ops.kl_div(leaf, teacher, divergence="jsd", reduction="none", impl=impl)
    rows.mean().backward()
    reference = _leaf64(student)
    expected = _ref_rows(reference, teacher, "jsd")
    expected.mean().backward()
    assert torch.all(rows >= 0)
    assert_close(rows, expected, torch.float32)
    assert_close(leaf.grad, reference.grad, torch.float32)


# ----------------------------------------------------------------------------------------------
# 14. EasyDeL: identical bf16 logits at a large vocabulary gave a non-zero KL
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_identical_bf16_logits_at_a_large_vocabulary_give_exactly_zero(impl):
    """https://github.com/erfanzar/EasyDeL/pull/267: bit-identical bf16 student and teacher logits with peaked rows
    (logits 50-70) at V = 248,320 gave a forward KL of +0.025 (negative on other backends) from bf16 reductions.
    Here at Llama-3's V = 128,256: every divergence of ours is exactly 0, with an exactly zero gradient, also at
    T = 3 (the forward / reverse KL kernel's u_b - u_a contracted to an fma on a GPU, the rounding error of u_a:
    +-1e-8 there; a numerics audit, 2026-12-07)."""
    logits = _randn((2, 128_256), seed=92, scale=4.0, dtype=torch.bfloat16)
    logits[:, 7], logits[:, 9] = 60.0, 55.0
    for divergence, temperature in itertools.product(distill_ops.DIVERGENCES, (1.0, 3.0)):
        leaf = logits.clone().requires_grad_(True)
        rows = distill_ops.kl_div(leaf, logits, divergence=divergence, reduction="none", temperature=temperature,
                                  impl=impl)
        rows.sum().backward()
        assert torch.all(rows == 0), (divergence, temperature, rows)
        assert torch.all(leaf.grad == 0), (divergence, temperature)


# ----------------------------------------------------------------------------------------------
# 15. Liger: a loss summed in the inputs' 16-bit dtype overflows past 65504
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_summed_loss_of_half_precision_inputs_does_not_overflow(impl):
    """https://github.com/linkedin/Liger-Kernel/pull/300 (review: "torch.sum might overflow when BT size is large"):
    a loss summed in fp16 is inf past 65504. Ours is fp32 and summed in fp32: 128 fp16 rows of ~1000 nats each
    sum to ~1.3e5, finite and equal to float64 (and their mean too)."""
    student = torch.zeros(128, 8, device=DEVICE, dtype=torch.float16)
    teacher = torch.zeros(128, 8, device=DEVICE, dtype=torch.float16)
    student[:, 0], teacher[:, 1] = 1000.0, 1000.0
    rows = _ref_rows(student, teacher, "forward")
    assert rows.sum() > 65504
    for reduction, expected in (("sum", rows.sum()), ("mean", rows.mean())):
        loss = distill_ops.kl_div(student, teacher, reduction=reduction, impl=impl)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        assert_close(loss, expected, torch.float32, reduction)


# ----------------------------------------------------------------------------------------------
# 16. Liger: fused losses that store their gradient must scale it by a scalar upstream gradient
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_fused_linear_scales_every_gradient_by_a_scalar_upstream_gradient(impl):
    """Liger's fused linear losses compute the gradient in forward and must multiply it by ``grad_output`` in
    backward (gradient accumulation and loss scaling multiply the loss by a constant). ``3 * loss`` gives three
    times the hidden, weight and bias gradients."""
    hidden, teacher_hidden = _randn((8, 16), seed=93), _randn((8, 16), seed=94)
    weight, teacher_weight = _randn((100, 16), seed=95, scale=0.1), _randn((100, 16), seed=96, scale=0.1)
    bias = _randn((100,), seed=97, scale=0.1)
    grads = []
    for scale in (1.0, 3.0):
        leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
        loss = distill_ops.fused_linear_kl_div(leaves[0], leaves[1], teacher_hidden, teacher_weight,
                                               student_bias=leaves[2], divergence="jsd", impl=impl)
        (scale * loss).backward()
        grads.append([leaf.grad for leaf in leaves])
    for one, three in zip(*grads):
        assert one.abs().sum() > 0
        torch.testing.assert_close(three, 3 * one, rtol=1e-6, atol=1e-9)
