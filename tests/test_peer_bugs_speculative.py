"""Regression tests for correctness bugs that peer speculative-decoding implementations have had.

Each test names the peer report it comes from (SGLang, FlashInfer, vLLM, Hugging Face transformers and other
speculative samplers) and pins our behaviour on the same semantics. Deterministic checks force the verifier's
random numbers (``draw_uniforms``, the one place the uniforms come from) to chosen values, so that boundary
cases (a coin of exactly 0, a coin just below 1) are tested directly rather than hoped for.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

import distill_ops.speculative as speculative
import distill_ops.verify as verify_module
from distill_ops.speculative import SpeculativeDecoder
from distill_ops.tree import build_tree
from distill_ops.verify import verify_greedy, verify_sampling

from .conftest import DEVICE, IMPLS, assert_close
from .test_speculative import make_models, prompts, reference_generate
from .test_verify import random_tree_and_tokens

# The largest float32 below 1: the top end of torch.rand's range [0, 1).
ALMOST_ONE = torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)).item()
FIELDS = ("accepted_nodes", "accept_len", "next_tokens", "emitted_tokens")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py


def force_uniforms(monkeypatch, table) -> None:
    """Make every verify_sampling call use ``table`` ([B, T], or a scalar for all) as its uniforms."""

    def fixed(batch, num_nodes, device, generator):
        return torch.as_tensor(table, dtype=torch.float32).expand(batch, num_nodes).contiguous().to(device)

    monkeypatch.setattr(verify_module, "draw_uniforms", fixed)


def assert_results_equal(actual, expected, msg=""):
    for field in FIELDS:
        assert torch.equal(getattr(actual, field).cpu(), getattr(expected, field).cpu()), (msg, field)


# --------------------------------------------------------------------------------------------------
# Verification at the random-number boundaries
# --------------------------------------------------------------------------------------------------

# One logits row for every node: top_k=3 and top_p=0.8 (temperature 1) both keep exactly tokens {1, 3, 6}
# (masses 0.45 / 0.27 / 0.17 of the unfiltered softmax; the mass before token 6 is 0.72 < 0.8, before
# token 2 it is 0.89). Token 0 (filtered) comes first in vocabulary order, token 7 (filtered) last.
BOUNDARY_ROW = [-2.0, 3.0, 1.0, 2.5, -1.0, 0.5, 2.0, -3.0]
BOUNDARY_PARENTS = [-1, 0, 0, 0, 3]
BOUNDARY_TOKENS = [5, 0, 7, 6, 4]  # nodes 1, 2 and 4 draft filtered tokens; node 3 drafts kept token 6
# A draft distribution (SpecInfer mode) that proposes the filtered tokens with high probability.
BOUNDARY_Q = [0.3, 0.05, 0.0, 0.05, 0.2, 0.0, 0.02, 0.38]


# Every combination on the PyTorch path; on the (slow) interpreted Triton path each filter and each mode once.
ZERO_COIN_CASES = [
    pytest.param(filters, with_draft_probs, impl, id=f"{name}-{mode}-{impl}")
    for name, filters in (("top_k", dict(top_k=3)), ("top_p", dict(top_p=0.8)))
    for mode, with_draft_probs in (("deterministic", False), ("draft_probs", True))
    for impl in IMPLS
    if impl == "torch" or (name == "top_p") != with_draft_probs
]


@pytest.mark.parametrize("filters, with_draft_probs, impl", ZERO_COIN_CASES)
def test_zero_probability_draft_is_never_accepted_at_a_zero_coin(monkeypatch, filters, with_draft_probs, impl):
    """https://github.com/sgl-project/sglang/issues/35771 -- SGLang's tree_speculative_sampling_target_only
    accepted with ``coin <= p / threshold``, so a draft token the target's top-k/top-p filter had removed
    (p = 0) was accepted whenever the coin was exactly 0; the same boundary also let the inverse-CDF bonus
    draw land on a zero-mass token. Here sequence 0 draws all coins 0, sequence 1 all coins just below 1."""
    vocab = len(BOUNDARY_ROW)
    num_nodes = len(BOUNDARY_PARENTS)
    tree = build_tree(torch.tensor(BOUNDARY_PARENTS, device=DEVICE))
    tokens = torch.tensor([BOUNDARY_TOKENS] * 2, device=DEVICE)
    logits = torch.tensor(BOUNDARY_ROW).expand(2, num_nodes, vocab).contiguous().to(DEVICE)
    draft_probs = None
    if with_draft_probs:
        draft_probs = torch.tensor(BOUNDARY_Q).expand(2, num_nodes, vocab).contiguous().to(DEVICE)
    force_uniforms(monkeypatch, [[0.0] * num_nodes, [ALMOST_ONE] * num_nodes])
    result = verify_sampling(tree, tokens, logits, draft_probs=draft_probs, impl=impl, **filters)
    # Coin 0: nodes 1 and 2 (p = 0) rejected, node 3 (token 6, p > 0) accepted, node 4 (p = 0) rejected;
    # the bonus at node 3 is the first token of positive mass (token 1), never the zero-mass token 0.
    assert result.accepted_nodes[0].tolist() == [0, 3, -1]
    assert result.emitted_tokens[0].tolist() == [6, 1, -1]
    if with_draft_probs:
        # SpecInfer: after two rejections node 3 is accepted with min(1, (p - 2q) / (q * mass)) = 1; the
        # bonus (coin ~1) is the last token of positive residual max(p - q, 0): token 6, never token 7.
        assert result.emitted_tokens[1].tolist() == [6, 6, -1]
    else:
        # Deterministic drafts: node 3 (p(6) = 0.19) is rejected at coin ~1, and the bonus is the last token of
        # positive residual mass (token 3; token 6 was rejected, tokens 4, 5 and 7 have no mass).
        assert result.accepted_nodes[1].tolist() == [0, -1, -1]
        assert result.emitted_tokens[1].tolist() == [3, -1, -1]


@pytest.mark.parametrize("impl", IMPLS)
def test_a_coin_on_a_cumulative_mass_boundary_takes_the_next_token(monkeypatch, impl):
    """The bonus draw is the first token whose cumulative mass exceeds the coin (u in [0, 1): a coin of 0 never
    lands on a token of no mass). Four equal logits put the cumulative masses at exactly 1/4, 1/2, 3/4: coins 0,
    1/4, 1/2 and 3/4 draw tokens 0, 1, 2 and 3 on both impls (a kernel with >= in place of > drew 0, 0, 1, 2)."""
    tree = build_tree(torch.tensor([-1], device=DEVICE))
    tokens = torch.zeros(4, 1, dtype=torch.int64, device=DEVICE)
    force_uniforms(monkeypatch, [[0.0], [0.25], [0.5], [0.75]])
    result = verify_sampling(tree, tokens, torch.zeros(4, 1, 4, device=DEVICE), impl=impl)
    assert result.next_tokens.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("impl", IMPLS)
def test_rejected_mass_that_rounds_to_an_all_zero_residual_still_emits_a_valid_token(monkeypatch, impl):
    """https://github.com/jaymody/speculative-sampling/issues/5 -- when the draft and target distributions are
    equal up to rounding, a rejection leaves the residual max(p - q, 0) all zero and normalising it gave NaNs
    (and so no valid token). Here the target puts fp32(1/3) on tokens 4-6; the draft row [1, 1, 1 + 2^-23] on the
    same tokens sums to 3 in fp32, so normalised (as both impls do) it is [fp32(1/3), fp32(1/3), one ulp more]:
    the coin just below 1 rejects the draft of token 6, and the residual is exactly zero. The bonus must still be a
    token of positive target mass (the target argmax, token 4), not -1, V, or a zero-mass token such as the last
    one."""
    vocab = 12
    logits = torch.full((1, 2, vocab), float("-inf"))
    logits[..., 4:7] = 0.5  # the last token has no mass: an inverse CDF falling off the end lands there
    draft_probs = torch.zeros(1, 2, vocab)
    draft_probs[..., 4:7] = torch.tensor([1.0, 1.0, torch.nextafter(torch.tensor(1.0), torch.tensor(2.0)).item()])
    q = draft_probs[0, 0, 4:7] * (1.0 / draft_probs[0, 0].sum())
    assert (q >= torch.softmax(logits[0, 0], -1)[4:7]).all() and q[2] > q[0]  # the premise: an all-zero residual
    tree = build_tree(torch.tensor([-1, 0], device=DEVICE))
    tokens = torch.tensor([[3, 6]], device=DEVICE)
    force_uniforms(monkeypatch, ALMOST_ONE)
    result = verify_sampling(tree, tokens, logits.to(DEVICE), draft_probs=draft_probs.to(DEVICE), impl=impl)
    assert result.accept_len.tolist() == [0]
    assert result.next_tokens.tolist() == [4]
    assert result.emitted_tokens.tolist() == [[4, -1]]


# --------------------------------------------------------------------------------------------------
# The filtered target distribution
# --------------------------------------------------------------------------------------------------


def hf_support(row: torch.Tensor, temperature: float, top_k, top_p) -> torch.Tensor:
    """Tokens that transformers' own warpers (temperature, then top-k, then top-p, the order generate uses)
    leave with a finite score: the support of ``generate(do_sample=True, ...)``."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores = TemperatureLogitsWarper(temperature)(None, row.double()[None])
    if top_k is not None:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p is not None:
        # No descending cumulative mass within 1e-6 of top_p: the kept set is not a question of rounding.
        masses = torch.softmax(scores[0], -1).sort(descending=True).values.cumsum(0)
        assert (masses - top_p).abs().min() > 1e-6
        scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.isfinite(scores[0])


def our_support(row: torch.Tensor, temperature: float, top_k, top_p, impl: str, monkeypatch,
                candidates: list[int] | None = None) -> torch.Tensor:
    """Token x is in our support iff a deterministic draft of x is accepted at coin 0 (u * 1 < p(x)): one
    sequence (a root with one child) per candidate token (default: every token)."""
    vocab = row.shape[0]
    candidates = list(range(vocab)) if candidates is None else candidates
    tree = build_tree(torch.tensor([-1, 0], device=DEVICE))
    tokens = torch.tensor([[0, token] for token in candidates], device=DEVICE)
    logits = row.float().expand(len(candidates), 2, vocab).contiguous().to(DEVICE)
    force_uniforms(monkeypatch, 0.0)
    result = verify_sampling(tree, tokens, logits, temperature=temperature, top_k=top_k, top_p=top_p, impl=impl)
    return (result.accept_len == 1).cpu()


SUPPORT_CASES = {  # temperature, top_k, top_p
    "tempered-top_p": (0.6, None, 0.9),
    "hot-top_p": (1.7, None, 0.7),
    "top_k-then-top_p": (1.3, 12, 0.85),
    "top_k": (0.8, 7, None),
}


@pytest.mark.parametrize("case", list(SUPPORT_CASES), ids=list(SUPPORT_CASES))
def test_filtered_support_equals_transformers_warpers(monkeypatch, case):
    """https://github.com/flashinfer-ai/flashinfer/issues/2202 -- FlashInfer's top_p_renorm_probs dropped the
    boundary token, the one whose probability makes the kept mass cross top_p, so the nucleus held less than
    top_p. Our kept set must be exactly what transformers' warpers keep (temperature first, then top-k, then
    the smallest descending prefix reaching top_p), on random rows whose cumulative masses are far from the
    cut: the boundary token included, temperature applied before the top-p mass is measured."""
    temperature, top_k, top_p = SUPPORT_CASES[case]
    vocab = 40
    generator = torch.Generator().manual_seed(len(case))
    rows = torch.randn(3, vocab, generator=generator, dtype=torch.float64) * 1.5
    for index, row in enumerate(rows):
        expected = hf_support(row, temperature, top_k, top_p)
        assert 1 < int(expected.sum()) < vocab  # the filter is active and keeps more than one token
        got = our_support(row, temperature, top_k, top_p, "torch", monkeypatch)
        assert torch.equal(got, expected), (index, got.nonzero().flatten(), expected.nonzero().flatten())
        if index == 0:
            # The interpreter is slow: on the Triton path only the tokens around the cut, in descending order
            # the last two kept (the boundary token last) and the first two dropped.
            order = torch.argsort(row, descending=True).tolist()
            kept = int(expected.sum())
            candidates = order[max(0, kept - 2) : kept + 2]
            got = our_support(row, temperature, top_k, top_p, "triton", monkeypatch, candidates)
            assert got.tolist() == expected[candidates].tolist(), candidates


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("with_draft_probs", [False, True], ids=["deterministic", "draft_probs"])
def test_filters_apply_to_verified_drafts_not_only_the_bonus_token(with_draft_probs, impl):
    """https://github.com/vllm-project/vllm/issues/42744 -- vLLM's rejection sampler applied some logits
    processors only to the bonus token (through the regular sampler), not to the target probabilities the
    draft tokens were verified against. With top_k=1 the filtered target is a point mass on the argmax, so
    sampling verification must accept exactly what greedy verification accepts, drafts and bonus alike,
    whatever the random numbers."""
    rng = random.Random(17)
    batch, num_nodes, vocab = 2, 9, 50
    generator = torch.Generator().manual_seed(17)
    logits = torch.randn(batch, num_nodes, vocab, generator=generator) * 3
    parents, tokens = random_tree_and_tokens(num_nodes, vocab, logits, rng)
    # Twice on the greedy paths an accepted node has an earlier sibling: a non-argmax draft is tried first.
    on_paths = [int(n) for n in verify_greedy(build_tree(parents), tokens, logits).accepted_nodes.flatten() if n > 0]
    assert sum(any(parents[j] == parents[n] for j in range(1, n)) for n in on_paths) >= 2
    tree = build_tree(parents.to(DEVICE))
    tokens, logits = tokens.to(DEVICE), logits.to(DEVICE)
    draft_probs = None
    if with_draft_probs:
        # Each drafted token gets a small draft probability, so that min(1, p / q) against an unfiltered
        # target would accept the non-argmax drafts.
        draft_probs = torch.softmax(torch.randn(batch, num_nodes, vocab, generator=generator), -1)
        for node in range(1, num_nodes):
            draft_probs[torch.arange(batch), parents[node], tokens[:, node]] = 1e-3
        draft_probs = (draft_probs / draft_probs.sum(-1, keepdim=True)).to(DEVICE)
    greedy = verify_greedy(tree, tokens, logits, impl="torch")
    assert greedy.accept_len.max() >= 2  # long accepted paths occur
    for seed in range(2 if impl == "torch" else 1):  # the interpreter is slow
        sampled = verify_sampling(tree, tokens, logits, temperature=1.7, top_k=1, draft_probs=draft_probs,
                                  generator=torch.Generator(DEVICE).manual_seed(seed), impl=impl)
        assert_results_equal(sampled, greedy, msg=seed)


# --------------------------------------------------------------------------------------------------
# Random numbers: the acceptance coin and the residual draw must be independent
# --------------------------------------------------------------------------------------------------

COUPLING_PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)


def coupling_case(batch: int):
    """Root -> one child drafting token 0 (p = 0.5); the first emitted token must follow COUPLING_PROBS."""
    tree = build_tree(torch.tensor([-1, 0], device=DEVICE))
    tokens = torch.zeros(batch, 2, dtype=torch.int64, device=DEVICE)
    logits = COUPLING_PROBS.log().float().expand(batch, 2, 4).contiguous().to(DEVICE)
    return tree, tokens, logits


@pytest.mark.parametrize("impl", IMPLS)
def test_residual_draw_does_not_reuse_the_acceptance_coin(monkeypatch, impl):
    """https://github.com/vllm-project/vllm-ascend/pull/16370 -- vLLM-Ascend's rejection sampler drew the
    residual resample from the same Philox value as the acceptance test of the rejected token, so after a
    rejection (coin >= p) the resample threshold was uniform on [p, 1) instead of [0, 1) and the emitted
    distribution was biased. Our bonus draw takes column 0, child j's test column j: explicit coins pin that
    (rejection at 0.95 then residual coin 0.1 must give token 1, a coupled draw token 3)."""
    tree, tokens, logits = coupling_case(2)
    # Sequence 0: child coin 0.95 (rejected), bonus coin 0.1 -> 0.1 * 0.5 = 0.05 < cdf 0.3: token 1.
    # Sequence 1: child coin 0.55 (rejected), bonus coin 0.7 -> 0.35 in (0.3, 0.45]: token 2.
    force_uniforms(monkeypatch, [[0.1, 0.95], [0.7, 0.55]])
    result = verify_sampling(tree, tokens, logits, impl=impl)
    assert result.accept_len.tolist() == [0, 0]
    assert result.next_tokens.tolist() == [1, 2]


def test_residual_draw_is_independent_chi_square(monkeypatch):
    """https://github.com/vllm-project/vllm-ascend/pull/16370 -- the same coupling bug seen statistically: the
    first emitted token must follow the target (chi-square over 20,000 sequences), and a verifier whose
    residual draw reuses the rejected child's coin must fail the same test (the test has power)."""
    num_samples = 20000
    tree, tokens, logits = coupling_case(num_samples)

    def first_tokens() -> torch.Tensor:
        result = verify_sampling(tree, tokens, logits, generator=torch.Generator(DEVICE).manual_seed(3), impl="torch")
        return result.emitted_tokens[:, 0].cpu()

    def pvalue(first: torch.Tensor) -> float:
        counts = torch.bincount(first, minlength=4).double()
        expected = COUPLING_PROBS * num_samples
        stat = ((counts - expected) ** 2 / expected).sum()
        return torch.special.gammaincc(torch.tensor(1.5, dtype=torch.float64), stat / 2).item()  # 3 dof

    first = first_tokens()
    assert pvalue(first) > 1e-3
    real_draw = verify_module.draw_uniforms

    def coupled(batch, num_nodes, device, generator):
        uniforms = real_draw(batch, num_nodes, device, generator)
        uniforms[:, 0] = uniforms[:, 1]
        return uniforms

    monkeypatch.setattr(verify_module, "draw_uniforms", coupled)
    assert pvalue(first_tokens()) < 1e-6


# --------------------------------------------------------------------------------------------------
# The engine: stopping, caches
# --------------------------------------------------------------------------------------------------

_MODELS = {}


def tiny_models():
    if "llama" not in _MODELS:
        _MODELS["llama"] = make_models("llama", vocab=96, seed=3)
    return _MODELS["llama"]


def perfect_chain_engine(depth: int = 5) -> tuple[SpeculativeDecoder, torch.nn.Module]:
    """The target drafting for itself on a chain: every step accepts the whole chain (depth + 1 tokens)."""
    target, _ = tiny_models()
    return SpeculativeDecoder(target, target, tree=[[0] * d for d in range(1, depth + 1)], impl="torch"), target


def free_run(target, prompt, length: int) -> list[int]:
    return reference_generate(target, prompt, length)[0, prompt.shape[1]:].tolist()


STOP_CASES = {  # max_new_tokens, index of the EOS in the free run (None: no EOS)
    "cap-inside-the-accepted-chunk": (4, None),
    "eos-before-the-cap-chunk-overshoots-both": (5, 2),
    "cap-before-the-eos": (3, 4),
}


@pytest.mark.parametrize("cut", [False, True], ids=["full-trees", "cut-trees"])
@pytest.mark.parametrize("case", list(STOP_CASES), ids=list(STOP_CASES))
def test_eos_and_max_new_tokens_when_one_step_overshoots_both(case, cut):
    """https://github.com/sgl-project/sglang/issues/31599 -- SGLang checked the max_new_tokens cap before the
    stop token after appending a whole accepted chunk, so a chunk crossing the cap masked an earlier stop and
    leaked the tokens after it (and a cap-only check let a chunk exceed the budget). With a perfect chain draft
    and full trees every step yields 6 tokens, so the step after the prefill overshoots the cap: the output must
    equal ``generate``'s, ending at the first EOS or at exactly max_new_tokens, whichever comes first. The
    engine cuts one sequence's trees to the tokens it can keep (then the chain ends at the cap), but a batch's
    sequence ahead of another still gets chunks that cross its cap: full trees are forced for that case."""
    engine, target = perfect_chain_engine()
    engine._cut_trees = cut
    prompt = prompts(96, [4], seed=5)[0]
    max_new_tokens, eos_index = STOP_CASES[case]
    run = free_run(target, prompt, 8)
    eos = [] if eos_index is None else run[eos_index]
    assert eos_index is None or eos not in run[:eos_index]
    out = engine.generate(prompt, max_new_tokens=max_new_tokens, eos_token_id=eos)
    expected = reference_generate(target, prompt, max_new_tokens, eos_token_id=eos if eos_index is not None else None)
    assert torch.equal(out.sequences, expected), (out.sequences, expected)
    assert out.num_new_tokens == (max_new_tokens if eos_index is None else min(max_new_tokens, eos_index + 1))
    # one speculative step, which accepted past the stop (cut: a chain that ends at the cap)
    assert out.accept_lengths == [max_new_tokens - 2 if cut else 5]


def test_cache_is_cut_back_with_the_output_at_an_eos_inside_an_accepted_path():
    """https://github.com/ggml-org/llama.cpp/issues/28049 -- llama.cpp's server computed the KV rollback from
    the accepted length before removing the tokens after an end-of-generation token, so its cache kept the
    accepted drafts past the EOS. After our step that ends at a mid-path EOS the target cache must hold exactly
    the committed tokens (all but the last) and equal a plain forward's cache."""
    engine, target = perfect_chain_engine()
    prompt = prompts(96, [4], seed=5)[0]
    run = free_run(target, prompt, 8)
    eos = run[2]
    checked = []

    def check(sequences, cache):
        committed = sequences[:, :-1]
        assert cache.get_seq_length() == committed.shape[1]
        with torch.no_grad():
            fresh = target(committed, use_cache=True).past_key_values
        for layer, expected in zip(cache.layers, fresh.layers):
            assert_close(layer.keys, expected.keys, torch.float32)
            assert_close(layer.values, expected.values, torch.float32)
        checked.append(sequences.shape[1])

    out = engine.generate(prompt, max_new_tokens=12, eos_token_id=eos, step_callback=check)
    assert out.sequences[0, -1].item() == eos and out.num_new_tokens == 3
    assert checked == [prompt.shape[1] + 1, prompt.shape[1] + 3]  # the prefill, then the step cut at the EOS


def test_draft_cache_holds_exactly_the_committed_tokens_before_each_draft(monkeypatch):
    """https://github.com/vllm-project/vllm/issues/14649 -- vLLM's EAGLE/MTP proposer never overwrote the KV
    entries it had written for speculative positions with those of the accepted tokens, so later drafts
    attended to stale entries (a silent acceptance-length loss the target's verification hides). Before every
    drafting step our draft LM's cache must equal a plain forward of the draft over the committed tokens up to
    the root: rejected tree nodes rolled back, the accepted path and the bonus token committed."""
    target, draft = tiny_models()
    engine = SpeculativeDecoder(target, draft, depth=3, topk=2, num_nodes=6, impl="torch")
    original = speculative._Generation._draft
    checked = []

    def checking(self, root_logits, root_state, roots, root_pos, caps):
        committed = torch.tensor(self.rows, device=DEVICE)  # through the root
        cache = self.drafter.cache
        assert cache.get_seq_length() == committed.shape[1] == root_pos + 1
        with torch.no_grad():
            fresh = draft(committed, use_cache=True)
        for layer, expected in zip(cache.layers, fresh.past_key_values.layers):
            assert_close(layer.keys, expected.keys, torch.float32)
            assert_close(layer.values, expected.values, torch.float32)
        assert_close(root_logits, fresh.logits[:, -1], torch.float32)
        checked.append(self.rows[0][-1])
        return original(self, root_logits, root_state, roots, root_pos, caps)

    monkeypatch.setattr(speculative._Generation, "_draft", checking)
    prompt = prompts(96, [5], seed=7)[0]
    out = engine.generate(prompt, max_new_tokens=14, eos_token_id=[])
    assert torch.equal(out.sequences, reference_generate(target, prompt, 14))
    assert len(checked) >= 4
    assert 0 < sum(out.accept_lengths) < 3 * len(out.accept_lengths)  # both acceptances and rejections occurred


def test_engine_sampling_with_top_k_one_is_greedy():
    """https://github.com/vllm-project/vllm/issues/42744 -- the engine-level view of filters skipped on the
    verified drafts: sampling with top_k=1 (any temperature) must reproduce ``generate(do_sample=False)``
    token for token, since every verified draft and every bonus token must come from the filtered target."""
    target, draft = tiny_models()
    engine = SpeculativeDecoder(target, draft, depth=3, topk=2, num_nodes=6, impl="torch")
    accepted = 0
    for prompt in prompts(96, [3, 5, 4], seed=9):
        out = engine.generate(prompt, max_new_tokens=12, temperature=1.5, top_k=1, eos_token_id=[],
                              generator=torch.Generator(DEVICE).manual_seed(0))
        assert torch.equal(out.sequences, reference_generate(target, prompt, 12))
        accepted += sum(out.accept_lengths)
    assert accepted > 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_top_p_equal_to_a_prefix_mass_keeps_that_prefix_only(monkeypatch, temperature, impl):
    """Top-p keeps the smallest descending prefix whose mass *reaches* top_p: logits 2 ln 2, ln 2, 0, 0 (times the
    temperature) give masses 1/2, 1/4, 1/8, 1/8, exact in fp32, so with top_p = 3/4 the first two tokens reach it
    and the two tokens of mass 1/8 are dropped (transformers' TopPLogitsWarper drops them too: their ascending
    cumulative mass is <= 1 - top_p). A cut that also keeps a token whose mass before equals top_p (<= in place of
    <) kept all four: the random-row tests keep every cumulative mass away from top_p."""
    row = torch.tensor([2 * math.log(2), math.log(2), 0.0, 0.0, float("-inf")], dtype=torch.float64) * temperature
    got = our_support(row, temperature, None, 0.75, impl, monkeypatch)
    assert got.tolist() == [True, True, False, False, False]


@pytest.mark.parametrize("impl", IMPLS)
def test_a_coin_past_the_rounded_total_mass_draws_the_last_token_of_positive_mass(monkeypatch, impl):
    """Inverse CDF at the top end: the fp32 probabilities of this row sum (cumulatively, in vocabulary order) to
    less than the largest coin below 1, so no token's cumulative mass exceeds the coin. The draw then falls back to
    the last token of positive mass (where the CDF ends), not the first one; the token after it has no mass and
    must not be drawn either. Only the all-zero residual was tested: a fallback to the first positive token passed."""
    row = torch.randn(6, generator=torch.Generator().manual_seed(11)) * 2
    row = torch.cat([row, torch.tensor([float("-inf")])])
    weights = torch.exp(row - row.max())
    assert torch.cumsum(weights / weights.sum(), -1)[-1].item() < ALMOST_ONE  # the case under test
    tree = build_tree(torch.tensor([-1], device=DEVICE))
    force_uniforms(monkeypatch, ALMOST_ONE)
    result = verify_sampling(tree, torch.zeros(1, 1, dtype=torch.int64, device=DEVICE), row.view(1, 1, -1).to(DEVICE),
                             impl=impl)
    assert result.next_tokens.tolist() == [5] and result.emitted_tokens.tolist() == [[5]]


@pytest.mark.parametrize("impl", IMPLS)
def test_deterministic_drafts_are_lossless_on_an_exact_uniform_grid(monkeypatch, impl):
    """https://github.com/apple/ml-recurrent-drafter/issues/6 and
    https://github.com/jaymody/speculative-sampling/issues/3: drafts chosen deterministically (beam search, argmax,
    EAGLE's top-k) must not be accepted with min(1, p / q) of the draft model's q; EAGLE
    (https://github.com/SafeAILab/EAGLE/issues/183) accepts child x with its residual probability and zeroes x
    before the next sibling. Every combination of midpoint uniforms on an n-point grid for (bonus draw, child 1,
    child 2) is one batch row, so the first emitted token's frequency is the target's p up to the grid's resolution
    (1 / n), also when both children hold the same token: not zeroing a rejected duplicate sibling accepts it twice
    (here off by 0.37: measured with that mutation)."""
    n = 6
    grid = [(index + 0.5) / n for index in range(n)]
    combos = torch.tensor(list(itertools.product(grid, repeat=3)), dtype=torch.float32)  # [n^3, 3]
    force_uniforms(monkeypatch, combos)
    batch = combos.shape[0]
    logits = torch.tensor([1.5, 1.0, 0.2, -0.5, -3.0], device=DEVICE)
    target = torch.softmax(logits.double(), -1).cpu()
    tree = build_tree(torch.tensor([-1, 0, 0]), device=DEVICE)
    for children in ([0, 1], [1, 1], [4, 0]):
        draft = torch.tensor([2] + children, device=DEVICE).expand(batch, 3).contiguous()
        result = verify_sampling(tree, draft, logits.expand(batch, 3, 5).contiguous(), impl=impl)
        frequency = torch.bincount(result.emitted_tokens[:, 0].cpu(), minlength=5).double() / batch
        assert (frequency - target).abs().max() < 1.0 / n, (children, frequency, target)
