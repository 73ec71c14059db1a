"""Regression tests for bugs that peer libraries had in top-k / top-p selection and sparse-teacher distillation.

Each test names the peer report it is modelled on and pins our behaviour on the same input. Three of them
found the same bug in our PyTorch code when they were written (top-p 1.0 dropping tokens, NaN gradients from
ignored rows, padding entries overwriting token 0's gradient); they were fixed with these tests.
"""

import pytest
import torch

from distill_ops._utils import triton_interpreter_enabled
from distill_ops.kernels import topk_select as topk_select_module
from distill_ops.topk_kl import DACKLLoss, kept_logprobs, topk_kl_div
from tests.conftest import DEVICE, IMPLS, assert_close
from tests.test_topk_kl import _labels, _logits, _run_and_compare, _sparse_from_dense

TAILS = ["renormalize", "bucket", "label"]


def _teacher_kwargs(form, teacher, k):
    """The teacher as topk_kl_div takes it: dense logits, or its own top-k as a sparse teacher."""
    if form == "dense":
        return dict(teacher_logits=teacher)
    indices, logprobs = _sparse_from_dense(teacher, k)
    return dict(teacher_topk_indices=indices, teacher_topk_logprobs=logprobs)


def _kept_tokens(grad_row):
    """Tokens that received gradient (with the renormalize tail: exactly the kept set)."""
    return set(grad_row.nonzero().flatten().tolist())


def _stable_order(row):
    """Vocabulary indices by descending value, lower index first among ties (float64)."""
    return torch.sort(row.detach().cpu().double(), dim=-1, descending=True, stable=True).indices


def _select(rows, count, **launch):
    # Looked up on the module at call time so that a mutation check can swap the kernel out.
    return topk_select_module.topk_select(rows, count, **launch)


def _expected_selection(rows, count):
    """Indices of the first ``count`` entries of a float64 stable descending sort, in index order."""
    return _stable_order(rows)[..., :count].sort(dim=-1).values


# ----------------------------------------------------------------------------------------------
# Cumulative-mass (top-p) bounds
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_top_p_exact_boundary_keeps_no_extra_token(impl):
    """https://github.com/huggingface/transformers/issues/18976: when the cumulative probability of the first
    tokens equalled top_p exactly, TopPLogitsWarper still kept the next token as well.

    Equal logits make every probability (and cumulative sum) exact in fp32, so c_before == upper really
    happens; the checks run on CPU tensors, where exp / log are deterministic.
    """
    if impl == "triton" and not triton_interpreter_enabled():
        pytest.skip("the exact-boundary arithmetic is checked with CPU tensors (Triton interpreter)")
    vocab = 40
    teacher = torch.full((3, vocab), float("-inf"))
    teacher[0, [3, 10, 17, 30]] = 0.0  # four tokens of mass 1/4
    teacher[1, [2, 5, 8, 11, 14, 20, 26, 33]] = 1.5  # eight tokens of mass 1/8
    teacher[2, [1, 4, 9, 12]] = -2.0  # four tokens of mass 1/4
    lower = torch.tensor([0.0, 0.0, 0.25])
    upper = torch.tensor([0.5, 0.375, 0.75])
    student = _logits((3, vocab), torch.float32, seed=100).cpu()
    _, grad = _run_and_compare(student, impl, teacher_logits=teacher, lower=lower, upper=upper, reduction="sum")
    # Row 0: 1/4 + 1/4 reaches 0.5 exactly: two tokens. Row 1: 3/8 reaches 0.375: three tokens.
    # Row 2: [0.25, 0.75] overlaps (open) the 2nd and 3rd quarter only.
    assert _kept_tokens(grad[0]) == {3, 10}
    assert _kept_tokens(grad[1]) == {2, 5, 8}
    assert _kept_tokens(grad[2]) == {4, 9}
    # The same rule, applied directly to sorted log-probabilities.
    sorted_logprobs = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]]))
    kept = kept_logprobs(sorted_logprobs, None, torch.tensor([0.75]))
    assert torch.isfinite(kept).tolist() == [[True, True, False, False]]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("form", ["dense", "sparse"])
def test_top_p_keeps_the_token_that_crosses_the_threshold(form, impl):
    """https://github.com/Biohub/esm/pull/360 (also https://github.com/ggml-org/llama.cpp/pull/1953): top-p kept
    the tokens with cumulative probability <= p, dropping the token that crosses p, so the nucleus held less
    than p of the mass.

    The kept set must be the smallest prefix (by descending probability) whose mass reaches p.
    """
    vocab = 80
    teacher = _logits((6, vocab), torch.float32, seed=101, scale=2.0)
    student = _logits((6, vocab), torch.float32, seed=102)
    upper = torch.tensor([0.3, 0.5, 0.7, 0.8, 0.9, 0.95])
    teacher_kwargs = _teacher_kwargs(form, teacher, 40)
    # The label tail (label = the least likely token, never kept) puts gradient on exactly the kept tokens and
    # the label, even when a single token is kept.
    labels = teacher.argmin(dim=-1)
    _, grad = _run_and_compare(student, impl, upper=upper.to(DEVICE), tail="label", labels=labels, reduction="sum",
                               **teacher_kwargs)
    probs = torch.softmax(teacher.cpu().double(), dim=-1)
    sizes = []
    for row in range(6):
        order = _stable_order(teacher[row])
        cumulative = probs[row][order].cumsum(0)
        size = int((cumulative < float(upper[row])).sum()) + 1  # first prefix whose mass reaches p
        assert cumulative[size - 1] >= upper[row] > (cumulative[size - 2] if size > 1 else 0.0)
        assert _kept_tokens(grad[row]) - {int(labels[row])} == set(order[:size].tolist()), row
        sizes.append(size)
    assert max(sizes) > 2


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("form", ["dense", "sparse"])
def test_upper_one_keeps_every_token_with_nonzero_mass(form, impl):
    """https://github.com/BlinkDL/ChatRWKV/pull/170: with top_p = 1 the filter kept only the most likely token
    instead of the whole distribution.

    upper = 1 (top-p 1.0) must keep every token of nonzero probability: here the teacher's head holds all
    but ~1e-8 of the mass, so fp32 cumulative sums reach 1.0 after one token.
    """
    vocab = 200
    teacher = _logits((2, vocab), torch.float32, seed=103)
    teacher[:, 0] += 25.0
    student = _logits((2, vocab), torch.float32, seed=104)
    teacher_kwargs = _teacher_kwargs(form, teacher, 32)
    _, grad = _run_and_compare(student, impl, upper=1.0, reduction="sum", **teacher_kwargs)
    expected = vocab if form == "dense" else 32
    assert len(_kept_tokens(grad[0])) == len(_kept_tokens(grad[1])) == expected


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("form", ["dense", "sparse"])
def test_tiny_upper_keeps_the_top_token(form, impl):
    """https://github.com/ml-explore/mlx-lm/pull/1912: a top_p small enough to round away (1 - top_p == 1.0 in the
    working dtype) masked every token, and sampling drew from an all -inf row.

    A tiny positive upper must behave like k = 1 (the top token alone), never like an empty kept set.
    """
    teacher = _logits((3, 50), torch.float32, seed=105)
    student = _logits((3, 50), torch.float32, seed=106)
    teacher_kwargs = _teacher_kwargs(form, teacher, 12)
    # The label tail (label = the least likely token) puts gradient on exactly the kept tokens and the label.
    labels = teacher.argmin(dim=-1)
    upper = torch.tensor([1e-8, 1e-30, 1e-45], device=DEVICE)  # the last one is an fp32 subnormal
    loss, grad = _run_and_compare(student, impl, upper=upper, tail="label", labels=labels, reduction="none",
                                  **teacher_kwargs)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    for row in range(3):
        assert _kept_tokens(grad[row]) == {int(teacher[row].argmax()), int(labels[row])}


@pytest.mark.parametrize("impl", IMPLS)
def test_half_precision_teacher_bounds_use_an_accurate_cumulative_sum(impl):
    """https://github.com/guoqingbao/attention.rs/pull/9: the top-p cumulative sum was accumulated in low precision,
    so with many small probabilities the running sum stalled and the kept set was wrong.

    A near-uniform bf16 teacher over 600 tokens (each ~1/600, below bf16's resolution near 0.5): the bounds
    must match the float64 cumulative mass.
    """
    vocab = 600
    teacher = (_logits((2, vocab), torch.float32, seed=107) * 0.05).to(torch.bfloat16)
    student = _logits((2, vocab), torch.float32, seed=108)
    _, grad = _run_and_compare(student, impl, teacher_logits=teacher, lower=0.2, upper=0.6, reduction="sum")
    probs = torch.softmax(teacher.cpu().double(), dim=-1)
    for row in range(2):
        order = _stable_order(teacher[row])
        after = probs[row][order].cumsum(0)
        before = after - probs[row][order]
        inside = order[(before < 0.6) & (after > 0.2)]
        assert 200 < inside.numel() < 280
        assert _kept_tokens(grad[row]) == set(inside.tolist())
    _run_and_compare(student, impl, teacher_logits=teacher, lower=0.2, upper=0.6, tail="bucket")


# ----------------------------------------------------------------------------------------------
# Sparse-teacher normalisation, padding and ignored positions
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("divergence", ["forward", "reverse"])
def test_renormalize_normalises_the_student_over_the_kept_set_too(divergence, impl):
    """https://github.com/AI-Hypercomputer/maxtext/pull/4056: the sparse KL normalised the teacher over its top-k but
    took the student's full-vocabulary log-softmax gathered at those indices, comparing different scales.

    With the renormalize tail a student whose kept logits equal the teacher's (up to a constant) has zero loss
    and zero gradient, whatever its other logits.
    """
    vocab = 64
    teacher = _logits((4, vocab), torch.float32, seed=109)
    indices, logprobs = _sparse_from_dense(teacher, 8)
    student = _logits((4, vocab), torch.float32, seed=110, scale=3.0)
    student = student.scatter(-1, indices, teacher.gather(-1, indices) + 2.5)  # off-set-only differences
    leaf = student.clone().requires_grad_(True)
    loss = topk_kl_div(leaf, teacher_topk_indices=indices, teacher_topk_logprobs=logprobs, divergence=divergence,
                       reduction="none", impl=impl)
    loss.sum().backward()
    assert_close(loss, torch.zeros(4, dtype=torch.float64), torch.float32)
    assert_close(leaf.grad, torch.zeros_like(leaf.grad, dtype=torch.float64), torch.float32)
    _run_and_compare(student, impl, teacher_topk_indices=indices, teacher_topk_logprobs=logprobs,
                     divergence=divergence)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "tail,form", [("renormalize", "sparse"), ("bucket", "sparse"), ("label", "sparse"), ("bucket", "dense")]
)
def test_ignored_rows_with_garbage_contribute_nothing(tail, form, impl):
    """https://github.com/huggingface/trl/pull/5594: -inf teacher sentinels at padding positions were masked out of
    the loss value, but still produced NaN in backward (grad_norm = nan on the first step).

    Ignored rows (label == ignore_index) holding NaN student logits, an all -inf teacher or NaN teacher
    entries must leave the loss and every gradient exactly as if they held clean values.
    """
    vocab = 60
    student = _logits((4, vocab), torch.float32, seed=111)
    teacher = _logits((4, vocab), torch.float32, seed=112)
    labels = _labels((4,), vocab, seed=113, ignored=(1, 3))
    dirty_student = student.clone()
    dirty_student[1] = float("nan")
    if form == "dense":
        dirty_teacher = teacher.clone()
        dirty_teacher[1] = float("nan")
        dirty_teacher[3] = float("-inf")
        clean_kwargs, dirty_kwargs = dict(teacher_logits=teacher, k=6), dict(teacher_logits=dirty_teacher, k=6)
    else:
        indices, logprobs = _sparse_from_dense(teacher, 6)
        dirty_logprobs = logprobs.clone()
        dirty_logprobs[1] = float("nan")
        dirty_logprobs[3] = float("-inf")  # a padding position stored as -inf sentinels
        clean_kwargs = dict(teacher_topk_indices=indices, teacher_topk_logprobs=logprobs)
        dirty_kwargs = dict(teacher_topk_indices=indices, teacher_topk_logprobs=dirty_logprobs)
    results = []
    for s, kwargs in ((student, clean_kwargs), (dirty_student, dirty_kwargs)):
        leaf = s.clone().requires_grad_(True)
        loss = topk_kl_div(leaf, labels=labels, tail=tail, impl=impl, **kwargs)
        loss.backward()
        results.append((loss.detach(), leaf.grad))
    (clean_loss, clean_grad), (dirty_loss, dirty_grad) = results
    assert torch.isfinite(dirty_grad).all()
    assert torch.all(dirty_grad[[1, 3]] == 0)
    assert_close(dirty_loss, clean_loss, torch.float32)
    assert_close(dirty_grad, clean_grad, torch.float32)


def test_dackl_training_ignores_garbage_rows():
    """https://github.com/huggingface/trl/pull/5594: masking padding positions after the divergence
    (torch.where / nan_to_num on the loss) does not stop their NaN from reaching the gradients.

    In training mode DACKLLoss must give the student and the bound network finite gradients, equal to those
    of a batch whose ignored row is clean.
    """
    vocab = 40
    student = _logits((3, vocab), torch.float32, seed=114)
    teacher = _logits((3, vocab), torch.float32, seed=115)
    labels = torch.tensor([3, -100, 5], device=DEVICE)
    dirty_student, dirty_teacher = student.clone(), teacher.clone()
    dirty_student[1] = float("nan")
    dirty_teacher[1] = float("nan")
    grads = []
    for s, t in ((student, teacher), (dirty_student, dirty_teacher)):
        torch.manual_seed(0)
        loss_fn = DACKLLoss(vocab_top_m=8, hidden=4, impl="torch").to(DEVICE).train()
        leaf = s.clone().requires_grad_(True)
        loss_fn(leaf, t, labels).backward()
        grads.append([leaf.grad] + [p.grad for p in loss_fn.parameters()])
    for clean, dirty in zip(*grads):
        assert torch.isfinite(dirty).all()
        assert_close(dirty, clean, torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("tail", TAILS)
def test_padding_entries_do_not_collide_with_token_zero(tail, impl):
    """https://github.com/openxla/xla/pull/31746: padded index slots were filled with 0, which then matched the
    valid index 0 and corrupted the scattered result.

    Sparse teachers are commonly padded with (index 0, log-prob -inf); when token 0 is also a real entry, its
    gradient must be the same as without the padding.
    """
    # The PyTorch path runs on CPU tensors: there duplicate scatter indices resolve in order (last write wins),
    # so the collision is deterministic; on CUDA it would be a race.
    device = DEVICE if impl == "triton" else torch.device("cpu")
    vocab = 30
    student = _logits((2, vocab), torch.float32, seed=116).to(device)
    teacher = _logits((2, vocab), torch.float32, seed=117).to(device)
    logprobs_full = torch.log_softmax(teacher.double(), dim=-1)
    real = torch.tensor([[0, 7, 3], [5, 9, 12]], device=device)  # row 0 really holds token 0
    indices = torch.cat([real, torch.zeros((2, 2), dtype=torch.int64, device=device)], dim=-1)
    logprobs = torch.cat(
        [logprobs_full.gather(-1, real), torch.full((2, 2), float("-inf"), dtype=torch.float64, device=device)], -1
    ).to(torch.float32)
    labels = torch.tensor([11, 9], device=device)
    _, padded_grad = _run_and_compare(student, impl, teacher_topk_indices=indices, teacher_topk_logprobs=logprobs,
                                      tail=tail, labels=labels)
    _, unpadded_grad = _run_and_compare(student, impl, teacher_topk_indices=indices[:, :3],
                                        teacher_topk_logprobs=logprobs[:, :3], tail=tail, labels=labels)
    assert_close(padded_grad, unpadded_grad, torch.float32)
    assert padded_grad[0, 0] != 0


# ----------------------------------------------------------------------------------------------
# Selection: ties, NaN, long tied rows
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_ties_at_the_kth_value_keep_exactly_k(impl):
    """https://github.com/vllm-project/vllm/pull/50979 (also the review of
    https://github.com/vllm-project/vllm/pull/15478): threshold-based top-k kept every token tied with the k-th
    largest logit (more than k), so vLLM's PyTorch and Triton paths disagreed.

    bf16 teacher logits with a handful of levels (huge tie groups, spanning the 4096-wide selection block):
    exactly k tokens are kept, the lowest indices of the boundary tie group, on both paths.
    """
    vocab, k = 4500, 50
    generator = torch.Generator().manual_seed(118)
    teacher = (torch.randint(-3, 3, (2, vocab), generator=generator).to(torch.float32) * 0.5).to(torch.bfloat16)
    teacher[1, teacher[1] == 1.0] = 0.5  # row 1: the top level is the 30 tokens set here, past the block edge
    top = torch.randperm(vocab - 4096, generator=generator)[:30] + 4096
    teacher[1, top] = 1.0
    teacher = teacher.to(DEVICE)
    student = _logits((2, vocab), torch.float32, seed=119)
    _, grad = _run_and_compare(student, impl, teacher_logits=teacher, k=k, reduction="sum")
    for row in range(2):
        kept = _kept_tokens(grad[row])
        assert len(kept) == k
        assert kept == set(_stable_order(teacher[row])[:k].tolist())
    assert set(top.tolist()) <= _kept_tokens(grad[1])


def test_selection_with_ties_is_consistent_across_k():
    """https://github.com/pytorch/pytorch/issues/27542 (also https://github.com/pytorch/pytorch/issues/88184):
    torch.topk picked different members of a tie group for different k (and not the first one), so top-k
    was not a prefix of top-(k+1).

    Our selection kernel must return, for every k, the first k entries of a stable descending order.
    """
    rows = torch.tensor([[3.0, 2.0, 3.0, 2.0, 1.0, 1.0, 3.0, 2.0],
                         [-1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0]], device=DEVICE)
    previous = [set(), set()]
    for count in (1, 2, 3, 5, 8):
        _, indices = _select(rows, count)
        assert torch.equal(indices.cpu(), _expected_selection(rows, count)), count
        for row in range(2):
            current = set(indices[row].tolist())
            assert previous[row] < current and len(current) == count
            previous[row] = current
        if count == 2:
            assert indices.tolist() == [[0, 2], [0, 1]]


@pytest.mark.parametrize("compiled", [False, True])
def test_torch_dense_candidates_follow_the_stable_order(compiled):
    """The PyTorch path's selection (topk for the cut value, the ties at the cut taken by index; it was a full stable
    sort of the vocabulary) returns the first ``count`` entries of a stable descending order for every count: heavy
    ties, ±inf, NaN (the largest, above +inf, as in a descending sort and the kernel; a row whose cut falls among
    NaN and +inf took them as tied), in several row chunks, eager and under torch.compile.
    Rows of distinct values (where the eager CPU path keeps topk's own choice) share chunks with tied rows (where it
    applies the tie rule), and one of them gets a tie across the cut of 50."""
    from distill_ops.topk_kl import dense_candidates

    generator = torch.Generator().manual_seed(120)
    rows = torch.randint(-2, 3, (1600, 700), generator=generator).to(torch.float32)  # two chunks of 2^20 entries
    rows[0, [3, 500]] = float("inf")
    rows[1, 10:20] = float("-inf")
    rows[2, [7, 650]] = float("nan")
    rows[3] = 1.0
    rows[4, [2, 600]], rows[4, [5, 9]] = float("inf"), float("nan")  # NaN ranks above +inf: 5 and 9 first
    rows[1000:1600:2] = torch.randn(300, 700, generator=generator)
    rows[1000, rows[1000].argsort(descending=True)[[50, 51]]] = rows[1000].sort(descending=True).values[49]
    select = dense_candidates
    if compiled:
        select = torch.compile(dense_candidates, fullgraph=True, dynamic=False)
        rows = rows[:8]
    for count in (2, 50) if compiled else (1, 2, 50, 699, 700):  # each count compiles anew
        values, indices = select(rows, count, need_order=False, backend="torch")
        assert torch.equal(indices.sort(-1).values, _expected_selection(rows, count)), count
        assert torch.allclose(values, rows.gather(-1, indices), rtol=0, atol=0, equal_nan=True)
        values, indices = select(rows, count, need_order=True, backend="torch")
        assert torch.equal(indices, _stable_order(rows)[:, :count]), count


@pytest.mark.parametrize("launch", [{}, dict(capacity=64), dict(block_v=1024)], ids=str)
def test_selection_of_long_periodic_bf16_rows(launch):
    """https://github.com/flashinfer-ai/flashinfer/issues/2604: flashinfer.top_k's filtered algorithm returned wrong
    values for long bf16 rows of a periodic pattern ((i % 64) / 64): every value heavily tied.

    The same pattern, scaled down: the candidate-list path, its overflow (radix select on the row) and
    several blocks must all give the first k of a stable sort.
    """
    vocab, count = 8192, 256
    pattern = (torch.arange(vocab, dtype=torch.float32) % 64) / 64.0
    rows = torch.stack([pattern, pattern.flip(0)]).to(torch.bfloat16).to(DEVICE)
    values, indices = _select(rows, count, **launch)
    assert torch.equal(indices.cpu(), _expected_selection(rows, count))
    assert values.min().item() == 62 / 64  # 128 copies each of 63/64 and 62/64
    assert torch.equal(values.cpu(), rows.cpu().gather(-1, indices.cpu()))


@pytest.mark.parametrize(
    "dtype,launch",
    [(torch.float32, {}), (torch.float32, dict(capacity=4)), (torch.bfloat16, dict(block_v=64))],
    ids=str,
)
def test_selection_of_nan_dominated_rows(dtype, launch):
    """https://github.com/vllm-project/vllm/pull/50201: top_k_per_row put its threshold bin on NaN for NaN-dominated
    rows and emitted uninitialised (out of range) indices when fewer than k entries were selectable.

    Rows with more NaNs than k, all NaN, only NaN and -inf, and fewer finite entries than k: valid, distinct
    indices equal to a stable sort in which NaN ranks above +inf.
    """
    vocab, count = 300, 16
    generator = torch.Generator().manual_seed(120)
    rows = torch.randn((4, vocab), generator=generator)
    rows[0, torch.randperm(vocab, generator=generator)[:40]] = float("nan")
    rows[1] = float("nan")
    rows[2, ::2] = float("nan")
    rows[2, 1::2] = float("-inf")
    rows[3] = float("-inf")
    rows[3, [7, 100]] = 1.0
    rows = rows.to(dtype).to(DEVICE)
    _, indices = _select(rows, count, **launch)
    assert torch.equal(indices.cpu(), _expected_selection(rows, count))
    assert all(len(set(row.tolist())) == count for row in indices)


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_dominated_teacher_rows_stay_local(impl):
    """https://github.com/vllm-project/vllm/pull/50201: NaN-dominated rows made the top-k kernel emit garbage
    indices that then crashed (or corrupted) the gather downstream.

    NaN-dominated teacher rows give a NaN loss for that row only; the other rows (one with fewer finite
    logits than k) keep their finite loss and gradient, and both paths agree.
    """
    vocab = 300
    generator = torch.Generator().manual_seed(121)
    teacher = torch.randn((3, vocab), generator=generator)
    teacher[0, torch.randperm(vocab, generator=generator)[:40]] = float("nan")
    teacher[2] = float("-inf")
    teacher[2, [7, 100, 250]] = torch.tensor([1.0, 2.0, 0.5])
    teacher = teacher.to(DEVICE)
    student = _logits((3, vocab), torch.float32, seed=122).requires_grad_(True)
    loss = topk_kl_div(student, teacher, k=16, reduction="none", impl=impl)
    loss.sum().backward()
    assert torch.isnan(loss[0]) and torch.isfinite(loss[1:]).all()
    assert torch.isfinite(student.grad[1:]).all()
    assert _kept_tokens(student.grad[2]) == {7, 100, 250}
    _run_and_compare(student.detach()[1:], impl, teacher_logits=teacher[1:], k=16, tail="bucket")
