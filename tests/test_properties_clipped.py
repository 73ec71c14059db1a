"""Property-based tests (hypothesis) of ``aligndistil_kl`` and of ``topk_kl_div``'s cumulative-mass bounds.

The two ops ``tests/test_properties_losses.py`` leaves out: ``aligndistil_kl`` / ``AlignDistilLoss`` (token-adaptive
logit extrapolation: adaptive or fixed alpha, both modes, r / eps / beta0, temperature, labels and ignore_index,
reductions and normalizers, ``vocab_size`` with padded inputs, ``-inf`` logits, ignored rows that are all ``-inf``,
``return_alpha``) and ``topk_kl_div`` with ``lower`` / ``upper`` (numbers and per-row tensors, alone, together, with
``k`` or ``max_candidates``, every tail, both directions, dense and sparse teachers, ties, ignored rows holding NaN /
``-inf``). Each is compared, for both impls, with a plain-torch float64 formula of its documented semantics written in
this file (kept sets by a float64 stable sort and cumulative sums, gradients by float64 autograd); nothing here calls
``distill_ops``' own reference code. The tolerances are those of ``tests/conftest.py`` (``assert_close``), never
looser.

Examples are drawn with ``derandomize=True`` (the same examples on every run) and no example database. The tensors of
an example come from a ``torch.Generator`` seeded by a drawn integer. Every reference is computed (and every
``assume`` made) before the library runs, so rejected examples cost no kernel time. The PyTorch impl gets many more
examples than the Triton kernels, which run under the CPU interpreter (``*_EXAMPLES`` below).

Domain restrictions (precision, not semantics), each stated where it is applied:

* Bounds: the kept set is decided by comparing fp32 cumulative masses with the bounds, so a cumulative mass within
  fp32 rounding of a bound leaves the set ambiguous. Examples are dropped when, in a counted row, a bound strictly
  between 0 and 1 lies within ``BOUND_MARGIN`` of a cumulative mass it is compared with (``c_before`` of a token
  after the first for ``upper``, ``c_after`` for ``lower``; tokens without mass are never kept and do not count).
  Exact touching (a bound equal to a cumulative mass) is therefore only exercised where it is exact in fp32 too: the
  bounds 0 and 1, which are drawn often (``upper=0``, ``lower=0``, ``upper=1`` also after the fp32 running sum has
  rounded to 1, ``lower=1``, ``lower == upper``; a test of its own draws only those, on peaked teachers).
* ``bucket`` / ``label`` tails: every rest / label mass is either negligible on both sides (below the documented
  floors, e.g. everything kept) or at least ``MIN_MASS`` (as in ``tests/test_properties_losses.py``).
* Reverse KL: the gradient Q_o (log Q_o - log P_o - KL) cancels on the student's dominant outcomes, leaving an fp32
  error of a few eps Q_o (|log P_o| + |log Q_o| + KL). Reverse top-k examples keep ``scale / temperature`` at most
  ``REVERSE_MAX_SCALE`` and, since a lower bound keeps tail tokens whose log-masses lie far below the top-k ones,
  that error term at most ``REVERSE_MAX_LOG`` on every outcome.
* AlignDistil (a reverse KL weighted by beta0 / alpha, up to 2e4 here): examples keep the tempered logit range of
  the student and of the extrapolated teacher within ``ALIGN_MAX_RANGE``; the weight times the fp32 noise of the
  KL's log-ratios (one ulp of 1 + the largest tempered logit + log V) within a quarter of the absolute tolerance;
  and, with adaptive alpha, r times the TVD's fp32 noise (4 ulps of 1 + |log-sum-exp|) within a fifth of alpha's
  relative tolerance (the TVD of two nearly equal models is known only to ~1e-7 absolute in fp32, on both impls).

Each test was checked to fail on deliberately broken variants of the library, patched in-process one at a time:
AlignDistil on each impl (PyTorch path and Triton kernel) with a TVD with the 1/2, the weight beta0 * alpha, the
two modes swapped, alpha not zeroed at ignored rows, the student left at temperature 1, the ``-inf`` rule applied to
the DPO model only; the bounds with ``c_after >= lower``, ``upper`` compared with ``c_after``, no ``upper >= 1``
special case, no top-1 fallback, ``c_after`` not clamped to 1, ``lower`` / ``upper`` swapped (dense and sparse),
dense bounds read on temperature-1 masses, sparse entries not sorted before the bounds, and ties given to the higher
index (the CPU sort, the Triton path's re-sort, the sparse sort).
"""

import math

import pytest
import torch

# The dev extra installs hypothesis (CI, make test); a GPU machine without it skips this file instead of
# stopping the whole run at collection.
pytest.importorskip("hypothesis")
from hypothesis import assume, event, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from distill_ops import AlignDistilLoss, aligndistil_kl, topk_kl_div  # noqa: E402
from tests._definitions import kl_rows, reduce_rows  # noqa: E402
from tests.conftest import DEVICE, IMPLS, TOLERANCES, assert_close, property_settings as _settings  # noqa: E402
from tests.test_properties_losses import (  # noqa: E402  (the helpers both property files use)
    _complement_mass, _events, _labels, _randn, _stable_order, _topk_outcomes,
    _check_loss_and_grads, _topk_inputs, _upstream, top_k,
    vocab_sizes,
)

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
NEG_INF = float("-inf")
MIN_MASS = 1e-2  # smallest rest / label mass the top-k examples use (module docstring)
BOUND_MARGIN = 1e-4  # no cumulative mass this close to a bound in (0, 1) (module docstring)
REVERSE_MAX_SCALE = 4.0  # largest scale / temperature of reverse top-k examples (module docstring)
REVERSE_MAX_LOG = 20.0  # largest Q_o (|log P_o| + |log Q_o| + KL) over the outcomes, reverse (module docstring)
ALIGN_MAX_RANGE = 40.0  # largest tempered logit range (max - min) of AlignDistil examples (module docstring)
FP32_ULP = 2.0**-24  # unit roundoff of fp32: the noise models of the AlignDistil domain (module docstring)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BOUND_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
TAILS = ("renormalize", "bucket", "label")


# Examples per impl: the PyTorch impl costs milliseconds per example, the Triton kernels run under the CPU
# interpreter (~0.1 s per row). The kept-set rule is shared Python code, so most of its examples run on the PyTorch
# impl; each test draws its examples inside (one derandomized sequence per test, the Triton run takes its start).
ALIGNDISTIL_EXAMPLES = {"torch": 100, "triton": 30}
DENSE_EXAMPLES = {"torch": 100, "triton": 7}
SPARSE_EXAMPLES = {"torch": 100, "triton": 10}
EDGE_EXAMPLES = {"torch": 60, "triton": 4}


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------


def _normalizer(kind, value):
    """``normalizer=`` as drawn: None, a Python float or a 0-dim fp32 tensor (both documented)."""
    if kind == "none":
        return None
    return value if kind == "float" else torch.tensor(value, dtype=torch.float32)


TEMPERATURE = st.one_of(st.just(1.0), st.floats(0.5, 3.0))
UPSTREAM = st.sampled_from(["one", "const", "random"])
NORMALIZER = st.sampled_from(["none", "none", "float", "tensor"])


# ----------------------------------------------------------------------------------------------
# aligndistil_kl / AlignDistilLoss
# ----------------------------------------------------------------------------------------------


def _aligndistil_rows(student, dpo, other, case):
    """Per-row AlignDistil loss and alpha_t from float64 ``[N, V]`` logits, as the README / docstring define them:
    TVD at T = 1 without the 1/2, alpha = r TVD + eps (or the fixed alpha), teacher z* = z_d + alpha (z_d - z_o)
    (contrastive) or z_o + alpha (z_d - z_o) (reference), -inf wherever either model is -inf, and
    (beta0 / alpha) KL(softmax(z_s / T) || softmax(z* / T))."""
    if case["alpha"] is None:
        tvd = (torch.softmax(dpo, -1) - torch.softmax(other, -1)).abs().sum(-1)
        alpha = case["r"] * tvd + case["eps"]
    else:
        alpha = torch.full(dpo.shape[:-1], case["alpha"], dtype=F64)
    masked = torch.isneginf(dpo) | torch.isneginf(other)
    safe_dpo = torch.where(masked, 0.0, dpo)
    safe_other = torch.where(masked, 0.0, other)
    base = safe_dpo if case["mode"] == "contrastive" else safe_other
    teacher = torch.where(masked, NEG_INF, base + alpha.unsqueeze(-1) * (safe_dpo - safe_other))
    temperature = case["temperature"]
    kl = kl_rows(torch.log_softmax(student / temperature, -1), torch.log_softmax(teacher / temperature, -1))
    return case["beta0"] / alpha * kl, alpha, teacher


def _finite(logits):
    finite = logits[logits > NEG_INF].to(F64)
    return finite if finite.numel() else torch.zeros(1, dtype=F64)


def _aligndistil_in_domain(case, student, dpo, other, teacher, alpha, tolerance):
    """Whether one counted row lies in the precision domain of the module docstring: a tempered logit range of at
    most ALIGN_MAX_RANGE (reverse-KL cancellation), the loss weight beta0 / alpha times the fp32 noise of the KL's
    log-ratios within a quarter of the absolute tolerance, and (adaptive alpha) r times the TVD's fp32 noise
    within a fifth of the relative tolerance of alpha."""
    temperature = case["temperature"]
    student, teacher = _finite(student), _finite(teacher)
    spread = max(float(student.max() - student.min()), float(teacher.max() - teacher.min())) / temperature
    magnitude = max(float(student.abs().max()), float(teacher.abs().max())) / temperature
    kl_noise = FP32_ULP * (1.0 + magnitude + math.log(student.numel()))
    in_domain = spread <= ALIGN_MAX_RANGE and case["beta0"] / alpha * kl_noise <= 0.25 * TOLERANCES[tolerance]["atol"]
    if case["alpha"] is None:
        lse = max(abs(float(torch.logsumexp(dpo.to(F64), -1))), abs(float(torch.logsumexp(other.to(F64), -1))))
        tvd_noise = 4 * FP32_ULP * (1.0 + lse)
        in_domain = in_domain and case["r"] * tvd_noise <= 0.2 * TOLERANCES[tolerance]["rtol"] * alpha
    return in_domain


@st.composite
def aligndistil_cases(draw):
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    return dict(
        leading=draw(st.one_of(st.tuples(st.integers(1, 6)), st.tuples(st.integers(1, 3), st.integers(1, 3)))),
        vocab=draw(vocab_sizes()),
        # extra columns: "teacher" pads the DPO / other logits (read with vocab_size=V), "all" pads the student too
        pad=draw(st.sampled_from(["none", "none", "none", "teacher", "all"])),
        mode=draw(st.sampled_from(["contrastive", "reference"])),
        alpha=draw(st.one_of(st.none(), st.none(), st.floats(0.05, 4.0))),
        r=draw(st.one_of(st.just(10.0), st.floats(0.0, 12.0))),
        eps=draw(st.one_of(st.just(1e-3), st.floats(1e-4, 0.5))),
        beta0=draw(st.one_of(st.just(0.1), st.floats(0.01, 2.0))),
        temperature=draw(TEMPERATURE),
        reduction=reduction,
        normalizer=draw(NORMALIZER) if reduction == "mean" else "none",
        normalizer_value=draw(st.floats(0.5, 10.0)),
        labels=draw(st.sampled_from(["none", "some", "some", "all"])),
        ignore_index=draw(st.sampled_from([-100, -1])),
        # ignored rows whose DPO logits are all -inf (documented: NaN unless ignored)
        poison=draw(st.booleans()),
        student_dtype=draw(st.sampled_from(["fp32", "bf16"])),
        dpo_dtype=draw(st.sampled_from(["fp32", "bf16"])),
        other_dtype=draw(st.sampled_from(["fp32", "bf16"])),
        scale=draw(st.floats(0.1, 4.0)),  # the DPO model's logit scale
        student_scale=draw(st.floats(0.1, 4.0)),
        # the other model: the DPO logits plus noise of this size ("same": the DPO logits, TVD = 0) or independent
        gap=draw(st.one_of(st.floats(0.01, 1.5), st.sampled_from(["same", "independent"]))),
        # -inf logits: in the DPO model, the other model, both (different tokens), only the student, or none;
        # the student is -inf wherever the teacher is (otherwise the loss is +inf, as documented)
        mask=draw(st.sampled_from(["none", "none", "dpo", "other", "models", "student"])),
        api=draw(st.sampled_from(["function", "function", "module"])),
        return_alpha=draw(st.booleans()),
        upstream=draw(UPSTREAM),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _aligndistil_inputs(case, generator):
    leading, vocab = case["leading"], case["vocab"]
    shape = (*leading, vocab)
    student = _randn(generator, shape, case["student_scale"])
    dpo = _randn(generator, shape, case["scale"])
    if case["gap"] == "same":
        other = dpo.clone()
    elif case["gap"] == "independent":
        other = _randn(generator, shape, case["scale"])
    else:
        other = dpo + _randn(generator, shape, case["gap"])
    mask = case["mask"]
    if mask != "none":
        keep = torch.randint(0, vocab, (*leading, 1), generator=generator)  # a token every model keeps
        masks = []
        for _ in range(2):
            masked = torch.rand(shape, generator=generator) < 0.3
            masks.append(masked.scatter(-1, keep, False))
        if mask in ("dpo", "models"):
            dpo = dpo.masked_fill(masks[0], NEG_INF)
        if mask in ("other", "models"):
            other = other.masked_fill(masks[1] if mask == "models" else masks[0], NEG_INF)
        student_masked = masks[0] if mask == "student" else torch.zeros_like(masks[0])
        student = student.masked_fill(torch.isneginf(dpo) | torch.isneginf(other) | student_masked, NEG_INF)
    student = student.to(DTYPES[case["student_dtype"]])
    dpo = dpo.to(DTYPES[case["dpo_dtype"]])
    other = other.to(DTYPES[case["other_dtype"]])
    labels = _labels(generator, leading, vocab, case["labels"], case["ignore_index"])
    return student, dpo, other, labels


def _pad(tensor, generator, columns):
    """``columns`` extra columns of garbage (finite, large) after the vocabulary."""
    extra = _randn(generator, (*tensor.shape[:-1], columns), 50.0).to(tensor.dtype)
    return torch.cat([tensor, extra], dim=-1)


@pytest.mark.parametrize("impl", IMPLS)
def test_aligndistil_matches_float64_reference(impl):
    """Loss, alpha_t and student gradient of ``aligndistil_kl`` / ``AlignDistilLoss`` = the float64 formula."""

    @_settings(ALIGNDISTIL_EXAMPLES[impl])
    @given(data=st.data())
    def example(data):
        _aligndistil_example(impl, data)

    example()


def _aligndistil_example(impl, data):
    case = data.draw(aligndistil_cases(), label="case")
    _events(case, "mode", "mask", "labels", "student_dtype", "api", "pad")
    event("alpha fixed" if case["alpha"] is not None else "alpha adaptive")
    generator = torch.Generator().manual_seed(case["seed"])
    student, dpo, other, labels = _aligndistil_inputs(case, generator)
    leading, vocab = case["leading"], case["vocab"]
    ignore_index = case["ignore_index"]
    active = None if labels is None else labels.reshape(-1) != ignore_index
    if case["pad"] == "all":  # the student wider too: its extra columns must get a zero gradient
        student = _pad(student, generator, 2)

    # The float64 reference (on the clean inputs: ignored rows give 0 whatever they hold).
    student64 = student.to(F64).detach().requires_grad_(True)
    student_rows = student64[..., :vocab].reshape(-1, vocab)
    rows, alpha, teacher = _aligndistil_rows(
        student_rows, dpo.to(F64).reshape(-1, vocab), other.to(F64).reshape(-1, vocab), case
    )
    tolerance = DTYPES[case["student_dtype"]]
    for row in range(rows.shape[0]):
        if active is None or bool(active[row]):
            assume(_aligndistil_in_domain(case, student_rows[row].detach(), dpo.reshape(-1, vocab)[row],
                                          other.reshape(-1, vocab)[row], teacher[row], float(alpha[row]), tolerance))
    if active is not None:
        rows = torch.where(active, rows, 0.0)
        alpha = torch.where(active, alpha, 0.0)
    normalizer = _normalizer(case["normalizer"], case["normalizer_value"])
    expected = reduce_rows(rows, active, case["reduction"], normalizer)
    expected = expected.reshape(leading) if case["reduction"] == "none" else expected
    assert torch.isfinite(expected).all()  # the reference itself stays in the domain we meant to test

    if case["poison"] and labels is not None:  # ignored rows whose DPO row is all -inf
        dpo = dpo.masked_fill((labels == ignore_index).unsqueeze(-1), NEG_INF)
        event("poisoned ignored rows")
    vocab_size = None
    if case["pad"] != "none":  # the teacher models padded beyond the student (and each other)
        vocab_size = vocab
        dpo, other = _pad(dpo, generator, 3), _pad(other, generator, 5)
    options = dict(
        mode=case["mode"], beta0=case["beta0"], r=case["r"], eps=case["eps"], alpha=case["alpha"],
        temperature=case["temperature"], ignore_index=ignore_index, reduction=case["reduction"],
        vocab_size=vocab_size, return_alpha=case["return_alpha"], impl=impl,
    )
    student_in = student.clone().to(DEVICE).requires_grad_(True)
    label_in = None if labels is None else labels.to(DEVICE)
    if case["api"] == "module":
        out = AlignDistilLoss(**options)(student_in, dpo.to(DEVICE), other.to(DEVICE), label_in, normalizer=normalizer)
    else:
        out = aligndistil_kl(
            student_in, dpo.to(DEVICE), other.to(DEVICE), labels=label_in, normalizer=normalizer, **options
        )
    if case["return_alpha"]:
        loss, alpha_out = out
        assert alpha_out.dtype == torch.float32 and alpha_out.shape == leading and not alpha_out.requires_grad
        assert_close(alpha_out, alpha.reshape(leading), tolerance, f"aligndistil alpha {case}")
    else:
        loss = out
    upstream = _upstream(generator, case["upstream"], tuple(loss.shape))
    _check_loss_and_grads(loss, expected, upstream, [student_in], [student64], tolerance, f"aligndistil {case}")


# ----------------------------------------------------------------------------------------------
# topk_kl_div with lower / upper
# ----------------------------------------------------------------------------------------------


def _bounded_kept(tokens, probs, limit, lower, upper):
    """The documented kept set of one row, and whether it is ambiguous at fp32 (module docstring).

    ``tokens [m]`` candidate ids in the kept-set order, ``probs [m]`` float64 their teacher masses (what the bounds
    compare with), ``limit``: keep at most the first ``limit`` candidates (``k`` / ``max_candidates``), ``lower`` /
    ``upper``: floats or None. A token is kept when it has mass, is among the first ``limit``, and its interval
    [c_before, c_after] overlaps [lower, upper] in the open sense (c_before < upper, c_after > lower; c_after
    clamped to 1; upper >= 1 keeps every token with mass). Nothing kept: the first candidate.
    """
    c_after = probs.cumsum(-1).clamp_max(1.0)
    c_before = torch.cat([probs.new_zeros(1), probs.cumsum(-1)[:-1]])
    has_mass = probs > 0
    if limit is not None:
        has_mass = has_mass & (torch.arange(probs.numel()) < limit)
    kept = has_mass.clone()
    ambiguous = False
    if upper is not None and upper < 1.0:
        kept = kept & (c_before < upper)
        if upper > 0.0:  # the first token's c_before is exactly 0 on both sides
            near = (c_before - upper).abs() < BOUND_MARGIN
            ambiguous = bool((near & has_mass)[1:].any())
    if lower is not None:
        kept = kept & (c_after > lower)
        if 0.0 < lower < 1.0:  # lower = 1: c_after is clamped to 1, nothing passes; lower = 0: every token with mass
            ambiguous = ambiguous or bool(((c_after - lower).abs() < BOUND_MARGIN)[has_mass].any())
    if not bool(kept.any()):
        return tokens[:1], ambiguous
    return tokens[kept], ambiguous


def _clipped_row(log_q, kept, log_p_kept, rest_p, tail, divergence, label):
    """One row of the clipped divergence, from the docstring's outcome definitions: ``(loss, conditioned)``.

    ``log_q [V]``: student log-probabilities at T (differentiable); ``kept``: kept token ids; ``log_p_kept``: the
    teacher's log-masses of those tokens; ``rest_p``: the teacher mass outside the kept set. ``conditioned`` is
    False when a rest / label mass is near fp32's noise floor, or a reverse gradient cancels beyond fp32's
    resolution (module docstring).
    """
    log_P, log_Q, conditioned = _topk_outcomes(log_q, kept, log_p_kept, rest_p, tail, label)
    loss = kl_rows(log_P, log_Q) if divergence == "forward" else kl_rows(log_Q, log_P)
    if divergence == "reverse":  # fp32 cancellation of the reverse gradient (module docstring)
        log_P, log_Q = log_P.detach(), log_Q.detach()
        noise = log_Q.exp() * (log_P.abs() + log_Q.abs() + float(loss.detach()))
        conditioned = conditioned and float(noise.max()) <= REVERSE_MAX_LOG
    return loss, conditioned


@st.composite
def clipped_cases(draw, tail, sparse, edges=False):
    """``edges``: only the exact bounds 0 and 1 (numbers, or per-row tensors of 0 / 1) and lower == upper, with
    peaked teachers (whose fp32 running mass reaches 1 before the last tokens)."""
    vocab = draw(vocab_sizes())
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    # The first choice of each list is hypothesis' simplest, and the first examples (the Triton impl's only ones)
    # lean on it: a drawn bound on a flat, tied teacher keeps a partial set cut inside groups of ties.
    if edges:
        lower = draw(st.sampled_from(["none", "zero", "one", "equal"]))
        uppers = ["one", "zero", "none", "one", "edge_rows"]
    else:
        lower = draw(st.sampled_from(["value", "none", "zero", "one", "equal", "value", "rows"]))
        uppers = ["value", "rows", "none", "zero", "one", "one", "value"]
    # lower = 1 needs upper = 1 (or none): nothing passes, the top-1 token is kept
    upper = draw(st.sampled_from(["none", "one"] if lower == "one" else uppers))
    if upper == "none" and lower == "none":
        upper = "one" if edges else "value"
    if edges:
        scale = draw(st.floats(5.0, 8.0))
    else:  # flat teachers keep more tokens; peaked ones round the fp32 running mass to 1 early
        scale = draw(st.one_of(st.floats(0.1, 1.5), st.floats(0.1, 4.0), st.floats(4.0, 8.0)))
    case = dict(
        # Few rows: the Triton selection kernel costs ~0.1 s per row under the interpreter.
        leading=draw(st.one_of(st.tuples(st.integers(1, 3)), st.tuples(st.integers(1, 2), st.integers(1, 2)))),
        vocab=vocab,
        tail=tail,
        divergence=draw(st.sampled_from(["forward", "reverse"])),
        temperature=draw(TEMPERATURE),
        reduction=reduction,
        normalizer=draw(NORMALIZER) if reduction == "mean" else "none",
        normalizer_value=draw(st.floats(0.5, 10.0)),
        labels=draw(st.sampled_from(
            ["some"] if tail == "label" else ["none", "some"] if edges else ["none", "some", "all"]
        )),
        # ignored rows holding NaN / -inf in the student and the teacher (documented: anything goes there)
        poison=draw(st.booleans()),
        student_dtype=draw(st.sampled_from(["fp32", "bf16"])),
        scale=scale,
        # "ties": teacher logits on a grid of 0.5 (many exact ties, resolved by the documented lower-index rule)
        ties=draw(st.sampled_from([True, False])),
        # upper: None, 0, 1, a drawn number, or per-row values (some exactly 0 or 1; "edge_rows": only 0 or 1);
        # lower: None, 0, 1, equal to upper (1 without upper), a drawn fraction of upper, or per-row fractions
        upper=upper,
        upper_value=draw(st.one_of(st.floats(0.2, 0.9), st.floats(0.0, 1.0))),
        lower=lower,
        lower_fraction=draw(st.one_of(st.floats(0.1, 0.8), st.floats(0.0, 1.0))),
        bound_dtype=draw(st.sampled_from(["fp32", "fp64"])),
        upstream=draw(UPSTREAM),
        seed=draw(st.integers(0, 2**31 - 1)),
    )
    if sparse:
        stored = draw(st.one_of(st.integers(1, vocab), st.just(vocab)))
        case.update(stored=stored, padding=draw(st.integers(0, 3)), k=draw(st.one_of(st.none(), top_k(stored))))
    else:
        k = draw(st.one_of(st.none(), top_k(vocab)))
        case.update(
            k=k,
            # bounds without k search the teacher's top max_candidates tokens (documented; default 1024 > V)
            max_candidates=None if k is not None else draw(st.one_of(st.none(), st.integers(1, vocab))),
            teacher_dtype=draw(st.sampled_from(["fp32", "bf16"])),
            # -inf teacher logits: zero-mass tokens, never kept (renormalize: no leftover mass to resolve)
            masked=tail == "renormalize" and draw(st.booleans()),
        )
    return case


def _bounds(case, generator):
    """``(lower, upper)`` as passed to the op (None, floats or per-row tensors) and as float64 ``[N]`` rows."""
    leading = case["leading"]
    num_rows = math.prod(leading)
    dtype = BOUND_DTYPES[case["bound_dtype"]]
    kind = case["upper"]
    if kind == "rows":
        values = torch.rand(leading, generator=generator, dtype=F64)
        pick = torch.rand(leading, generator=generator)
        upper = torch.where(pick < 0.1, 0.0, torch.where(pick > 0.85, 1.0, values)).to(dtype)
    elif kind == "edge_rows":
        upper = (torch.rand(leading, generator=generator) > 0.3).to(dtype)
    else:
        upper = {"none": None, "zero": 0.0, "one": 1.0, "value": case["upper_value"]}[kind]
    ceiling = 1.0 if upper is None else upper  # lower <= upper in every row (fp32 rounding is monotone)
    kind = case["lower"]
    if kind == "none":
        lower = None
    elif kind in ("zero", "one"):
        lower = 0.0 if kind == "zero" else 1.0
    elif kind == "equal":
        lower = ceiling
    elif kind == "value":
        lower = case["lower_fraction"] * ceiling
    else:
        lower = (torch.rand(leading, generator=generator, dtype=F64) * ceiling).to(dtype)

    def rows(bound):
        if bound is None:
            return [None] * num_rows
        if isinstance(bound, torch.Tensor):
            return [float(value) for value in bound.reshape(-1)]
        return [float(bound)] * num_rows

    return lower, upper, rows(lower), rows(upper)


def _poison(tensor, labels, generator):
    """NaN and -inf in the ignored rows (the op must ignore whatever they hold)."""
    if labels is None:
        return tensor
    pick = torch.rand(tensor.shape, generator=generator)
    garbage = torch.where(pick < 0.5, float("nan"), NEG_INF).to(tensor.dtype)
    return torch.where((labels == -100).unsqueeze(-1) & (pick < 0.7), garbage, tensor)


def _clipped_expected(student, labels, case, kept_rows, log_p_rows, rest_rows):
    """``(student64, expected, normalizer)``: the float64 loss of the kept sets (``assume``s their conditioning).

    Label tail: a counted row whose label mass is below MIN_MASS gets its first kept token as label (module
    docstring); ``labels`` is changed in place."""
    vocab = case["vocab"]
    label_rows = None if labels is None else labels.view(-1)
    active = None if label_rows is None else label_rows != -100
    student64 = student.to(F64).detach().requires_grad_(True)
    log_q = torch.log_softmax(student64.reshape(-1, vocab) / case["temperature"], dim=-1)
    rows = []
    for row in range(log_q.shape[0]):
        if active is not None and not bool(active[row]):
            rows.append(log_q.new_zeros(()))
            continue
        label = None
        if case["tail"] == "label":
            label = int(label_rows[row])
            in_kept = kept_rows[row] == label
            if float(rest_rows[row]) + float(log_p_rows[row][in_kept].exp().sum()) < MIN_MASS:
                label = int(kept_rows[row][0])
                label_rows[row] = label
        loss, conditioned = _clipped_row(
            log_q[row], kept_rows[row], log_p_rows[row], rest_rows[row], case["tail"], case["divergence"], label
        )
        assume(conditioned)  # rest masses resolvable, reverse gradient not cancelled, in fp32 (module docstring)
        rows.append(loss)
    rows = torch.stack(rows)
    normalizer = _normalizer(case["normalizer"], case["normalizer_value"])
    expected = reduce_rows(rows, active, case["reduction"], normalizer)
    expected = expected.reshape(case["leading"]) if case["reduction"] == "none" else expected
    assert torch.isfinite(expected).all()
    return student64, expected, normalizer


def _run_clipped(student, labels, impl, case, normalizer, generator, lower, upper, **teacher):
    student_in = student.clone().to(DEVICE).requires_grad_(True)
    if case["poison"]:
        with torch.no_grad():
            student_in.copy_(_poison(student, labels, generator))
        teacher = {
            name: _poison(value, labels, generator) if value.is_floating_point() else value
            for name, value in teacher.items()
        }
        if labels is not None:
            event("poisoned ignored rows")
    options = {} if case.get("max_candidates") is None else dict(max_candidates=case["max_candidates"])
    loss = topk_kl_div(
        student_in,
        tail=case["tail"], divergence=case["divergence"], temperature=case["temperature"],
        labels=None if labels is None else labels.to(DEVICE), reduction=case["reduction"], normalizer=normalizer,
        lower=lower.to(DEVICE) if isinstance(lower, torch.Tensor) else lower,
        upper=upper.to(DEVICE) if isinstance(upper, torch.Tensor) else upper,
        k=case["k"], impl=impl, **options, **{name: value.to(DEVICE) for name, value in teacher.items()},
    )
    return student_in, loss


def _kept_event(kept_rows, vocab):
    sizes = [kept.numel() for kept in kept_rows]
    event("kept: all" if min(sizes) == vocab else "kept: one" if max(sizes) == 1 else "kept: some")


def _clipped_events(case):
    _events(case, "divergence", "upper", "lower", "ties", "student_dtype")
    event("k=None" if case["k"] is None else "k=1" if case["k"] == 1 else "k=V" if case["k"] == case["vocab"]
          else "1<k<V")


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("impl", IMPLS)
def test_topk_kl_div_bounds_dense_matches_float64_reference(impl, tail):
    """Dense teacher with lower / upper (floats, per-row tensors, 0, 1, lower == upper), alone or with k or
    max_candidates, every tail and direction, vs the float64 kept-set rule on the tempered masses."""

    @_settings(DENSE_EXAMPLES[impl])
    @given(data=st.data())
    def example(data):
        _dense_bounds_example(impl, tail, data)

    example()


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("impl", IMPLS)
def test_topk_kl_div_exact_bounds_dense_matches_float64_reference(impl, tail):
    """The same with only the exact bounds (0, 1, lower == upper) and peaked teachers: upper = 1 keeps every token
    with mass after the fp32 running sum has rounded to 1, lower = 1 and upper = 0 keep the top-1 token only."""

    @_settings(EDGE_EXAMPLES[impl])
    @given(data=st.data())
    def example(data):
        _dense_bounds_example(impl, tail, data, edges=True)

    example()


def _dense_bounds_example(impl, tail, data, edges=False):
    case = data.draw(clipped_cases(tail, sparse=False, edges=edges), label="case")
    _clipped_events(case)
    event(f"masked={case['masked']}")
    if case["divergence"] == "reverse":
        assume(case["scale"] / case["temperature"] <= REVERSE_MAX_SCALE)  # fp32 cancellation (module docstring)
    generator = torch.Generator().manual_seed(case["seed"])
    student, teacher, labels = _topk_inputs(case, generator)
    lower, upper, lower_rows, upper_rows = _bounds(case, generator)
    vocab = case["vocab"]
    teacher64 = teacher.to(F64).reshape(-1, vocab)
    log_p = torch.log_softmax(teacher64 / case["temperature"], dim=-1)  # the bounds see the tempered masses
    order = _stable_order(teacher64)
    active = None if labels is None else labels.reshape(-1) != -100
    limit = case["k"] if case["k"] is not None else case["max_candidates"]
    kept_rows, log_p_rows, rest_rows = [], [], []
    for row in range(teacher64.shape[0]):
        kept, ambiguous = _bounded_kept(order[row], log_p[row, order[row]].exp(), limit, lower_rows[row],
                                        upper_rows[row])
        if active is None or bool(active[row]):
            assume(not ambiguous)  # a bound within fp32 rounding of a cumulative mass (module docstring)
        kept_rows.append(kept)
        log_p_rows.append(log_p[row, kept])
        rest_rows.append(_complement_mass(log_p[row], kept))
    student64, expected, normalizer = _clipped_expected(student, labels, case, kept_rows, log_p_rows, rest_rows)
    _kept_event(kept_rows, vocab)
    student_in, loss = _run_clipped(student, labels, impl, case, normalizer, generator, lower, upper,
                                    teacher_logits=teacher)
    upstream = _upstream(generator, case["upstream"], tuple(loss.shape))
    _check_loss_and_grads(loss, expected, upstream, [student_in], [student64], DTYPES[case["student_dtype"]],
                          f"dense bounds {case}")


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("impl", IMPLS)
def test_topk_kl_div_bounds_sparse_matches_float64_reference(impl, tail):
    """Sparse teacher (the dense teacher's top-m fp32 log-probabilities, shuffled, with -inf padding on index 0)
    with lower / upper, alone or with k: the bounds select on the stored temperature-1 masses, the kept set is
    re-tempered (p_i = M softmax_kept(log p_i / T), leftover 1 - M); every tail and direction."""

    @_settings(SPARSE_EXAMPLES[impl])
    @given(data=st.data())
    def example(data):
        _sparse_bounds_example(impl, tail, data)

    example()


def _sparse_bounds_example(impl, tail, data):
    case = data.draw(clipped_cases(tail, sparse=True), label="case")
    _clipped_events(case)
    event("stored=V" if case["stored"] == case["vocab"] else "stored<V")
    if case["divergence"] == "reverse":
        assume(case["scale"] / case["temperature"] <= REVERSE_MAX_SCALE)  # fp32 cancellation (module docstring)
    generator = torch.Generator().manual_seed(case["seed"])
    student, teacher, labels = _topk_inputs(case, generator)
    lower, upper, lower_rows, upper_rows = _bounds(case, generator)
    vocab, stored, padding = case["vocab"], case["stored"], case["padding"]
    num_rows = teacher.reshape(-1, vocab).shape[0]
    # As a pipeline stores it: fp32 log-softmax at T = 1, top-`stored`, in a random order, plus padding.
    stored_logprobs = torch.log_softmax(teacher.reshape(-1, vocab).to(torch.float32), dim=-1)
    top = _stable_order(teacher.reshape(-1, vocab).to(F64))[:, :stored]
    indices = top.gather(-1, torch.argsort(torch.rand((num_rows, stored), generator=generator), dim=-1))
    logprobs = stored_logprobs.gather(-1, indices)
    indices = torch.cat([indices, torch.zeros((num_rows, padding), dtype=torch.int64)], dim=-1)
    logprobs = torch.cat([logprobs, torch.full((num_rows, padding), NEG_INF)], dim=-1)
    perm = torch.argsort(torch.rand(indices.shape, generator=generator), dim=-1)  # padding anywhere
    indices, logprobs = indices.gather(-1, perm), logprobs.gather(-1, perm)

    # The float64 sparse rule: the stored entries by (log-prob desc, index asc), padding last (zero mass); bounds
    # and k on the temperature-1 masses; kept entries re-tempered with their mass M; leftover 1 - M.
    active = None if labels is None else labels.reshape(-1) != -100
    kept_rows, log_p_rows, rest_rows = [], [], []
    for row in range(num_rows):
        by_index = torch.argsort(indices[row], stable=True)
        row_indices, row_logprobs = indices[row, by_index], logprobs[row, by_index].to(F64)
        order = _stable_order(row_logprobs)
        kept_at, ambiguous = _bounded_kept(order, row_logprobs[order].exp(), case["k"], lower_rows[row],
                                           upper_rows[row])
        if active is None or bool(active[row]):
            assume(not ambiguous)  # a bound within fp32 rounding of a cumulative mass (module docstring)
        kept_logprobs = row_logprobs[kept_at]
        log_mass = torch.logsumexp(kept_logprobs, -1)
        tempered = kept_logprobs / case["temperature"]
        kept_rows.append(row_indices[kept_at])
        log_p_rows.append(tempered - torch.logsumexp(tempered, -1) + log_mass)
        rest_rows.append((1.0 - log_mass.exp()).clamp_min(0.0))
    student64, expected, normalizer = _clipped_expected(student, labels, case, kept_rows, log_p_rows, rest_rows)
    _kept_event(kept_rows, vocab)
    student_in, loss = _run_clipped(
        student, labels, impl, case, normalizer, generator, lower, upper,
        teacher_topk_indices=indices.reshape(*case["leading"], -1),
        teacher_topk_logprobs=logprobs.reshape(*case["leading"], -1),
    )
    upstream = _upstream(generator, case["upstream"], tuple(loss.shape))
    _check_loss_and_grads(loss, expected, upstream, [student_in], [student64], DTYPES[case["student_dtype"]],
                          f"sparse bounds {case}")
