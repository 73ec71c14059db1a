"""no_repeat_ngram_size, bad_words_ids, sequence_bias and forced_eos_token_id in the speculative engine: each tree
node's row equals transformers' own processor on that node's sequence, and greedy / sampled decoding equals
``generate`` with the same options."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    EncoderNoRepeatNGramLogitsProcessor,
    ExponentialDecayLengthPenalty,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    SequenceBiasLogitsProcessor,
)

from distill_ops import SpeculativeDecoder
from distill_ops.generation_rules import TokenSequenceRules, ban_repeated_ngrams, decay_eos, node_tails
from distill_ops.tree import build_tree

from .conftest import DEVICE
from .test_speculative_batch import left_padded
from .test_speculative import (
    DYNAMIC_TREE,
    STATIC_TREE,
    _node_path,
    _sequence_distribution,
    _sequence_sampling_pvalue,
    make_head,
    models,
    prompts,
    reference_generate,
)


def _random_trees(generator, vocab: int, batch: int, trials: int):
    """Random trees (one per sequence, or shared) with random tokens and committed prefixes of 1 to 6 tokens (the
    root last), over a small vocabulary so that n-grams and biased sequences repeat."""
    def draw(high, size=()):
        return torch.randint(0, high, size, generator=generator)

    for trial in range(trials):
        num_nodes = int(draw(16)) + 1
        parents = [[-1] + [int(draw(i)) for i in range(1, num_nodes)] for _ in range(1 if trial % 2 else batch)]
        tokens = draw(vocab, (batch, num_nodes))
        committed = [draw(vocab, (int(draw(6)),)).tolist() + [int(tokens[b, 0])] for b in range(batch)]
        sequences = [[committed[b] + [int(tokens[b, j]) for j in _node_path(parents[b % len(parents)], node)[1:]]
                      for node in range(num_nodes)] for b in range(batch)]
        logits = torch.randn(batch, num_nodes, vocab, generator=generator) * 3
        yield build_tree(torch.tensor(parents), device=DEVICE), tokens.to(DEVICE), committed, sequences, logits


def _tails(tree, tokens, committed, width):
    rows = [([-1] * width + row)[-width:] for row in committed]
    return node_tails(tree, tokens, torch.tensor(rows, device=DEVICE), width)


def _processed(processor, sequence, row):
    return processor(torch.tensor([sequence]), row.clone()[None])[0]


def test_node_tails_are_the_last_tokens_of_each_nodes_sequence():
    generator = torch.Generator().manual_seed(0)
    for tree, tokens, committed, sequences, _ in _random_trees(generator, 5, 3, 10):
        for width in (1, 3, 9):
            tails = _tails(tree, tokens, committed, width).cpu()
            for b, rows in enumerate(sequences):
                for node, sequence in enumerate(rows):
                    expected = ([-1] * width + sequence)[-width:]
                    assert tails[b, node].tolist() == expected, (b, node, width)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_repeated_ngrams_ban_equals_transformers_processor_at_every_node(size, dtype):
    """Every node row equals NoRepeatNGramLogitsProcessor on the node's sequence: n-grams among the committed
    tokens, through the root, and along the node's path (a vocabulary of 4 makes all three kinds occur), none
    banned below ``size`` tokens."""
    generator = torch.Generator().manual_seed(size)
    processor = NoRepeatNGramLogitsProcessor(size)
    banned_somewhere = 0
    for tree, tokens, committed, sequences, logits in _random_trees(generator, 4, 3, 40):
        width = max(size, 2)
        history = torch.full((len(committed), max(map(len, committed))), -1, dtype=torch.int64)
        for b, row in enumerate(committed):
            history[b, : len(row)] = torch.tensor(row)
        logits = logits.to(dtype)
        got = logits.to(DEVICE, copy=True)
        ban_repeated_ngrams(got, size, _tails(tree, tokens, committed, width), history.to(DEVICE), tree, tokens)
        got = got.cpu()
        for b, rows in enumerate(sequences):
            for node, sequence in enumerate(rows):
                expected = _processed(processor, sequence, logits[b, node])
                assert torch.equal(got[b, node], expected), (b, node, sequence)
                banned_somewhere += bool(torch.isinf(expected).any())
    assert banned_somewhere > 20


@pytest.mark.parametrize("size", [1, 2, 3])
def test_prompt_ngram_ban_and_eos_decay_equal_transformers_processors_at_every_node(size):
    """Every node row equals EncoderNoRepeatNGramLogitsProcessor with the sequence's prompt as its "encoder input"
    (``ban_repeated_ngrams`` without a tree: the prompt's n-grams only), and ExponentialDecayLengthPenalty (two EOS
    ids, one of them -inf somewhere) on the node's sequence, with the factors the engine computes."""
    generator = torch.Generator().manual_seed(10 + size)
    eos, start, decay = [1, 3], 2, 1.7
    banned_somewhere = decayed_somewhere = 0
    for tree, tokens, committed, sequences, logits in _random_trees(generator, 4, 3, 40):
        prompt_lens = [max(1, len(row) - 2) for row in committed]  # the prompt: all but the last two committed
        prompts_ = torch.full((len(committed), max(prompt_lens)), -1, dtype=torch.int64)
        for b, row in enumerate(committed):
            prompts_[b, : prompt_lens[b]] = torch.tensor(row[: prompt_lens[b]])
        logits[0, -1, eos[0]] = -float("inf")
        got = logits.to(DEVICE, copy=True)
        ban_repeated_ngrams(got, size, _tails(tree, tokens, committed, max(size, 2)), prompts_.to(DEVICE))
        depth = tree.depth.expand(len(committed), -1).cpu()
        factors = torch.tensor([[pow(decay, len(committed[b]) + int(d) - (start + prompt_lens[b])) - 1
                                 if len(committed[b]) + int(d) > start + prompt_lens[b] else 0.0
                                 for d in depth[b]] for b in range(len(committed))], dtype=torch.float32)
        decay_eos(got, torch.tensor(eos, device=DEVICE), factors.to(DEVICE))
        got = got.cpu()
        for b, rows in enumerate(sequences):
            prompt = prompts_[b, : prompt_lens[b]][None]
            banner = EncoderNoRepeatNGramLogitsProcessor(size, prompt)
            decayer = ExponentialDecayLengthPenalty((start, decay), eos, prompt_lens[b])
            for node, sequence in enumerate(rows):
                expected = _processed(decayer, sequence, _processed(banner, sequence, logits[b, node]))
                assert torch.equal(got[b, node], expected), (b, node, sequence)
                banned_somewhere += bool(torch.isinf(expected).sum() > (b == 0 and node == len(rows) - 1))
                decayed_somewhere += not torch.equal(expected[eos[1]], logits[b, node, eos[1]])
    assert banned_somewhere > 20 and decayed_somewhere > 20


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("one_token_biases", [True, False])
def test_sequence_bias_and_bad_words_equal_transformers_processors_at_every_node(one_token_biases, dtype):
    """Every node row equals SequenceBiasLogitsProcessor then NoBadWordsLogitsProcessor on the node's sequence:
    one-token entries everywhere, longer ones where the sequence ends with their first tokens (one to three
    tokens back, across the root), biases on one last token (3 ends four entries, 1 a one-token and a longer one)
    adding up in generate's order; a one-token bad word equal to an EOS id is dropped as generate drops it. The
    input logits are not modified; the result is fp32, as generate's processors see them."""
    vocab, eos = 5, 4
    bias = [[[1], 2.5], [[2, 3], -1.5], [[0, 2, 3], 4.0], [[3, 3], 0.75], [[1, 0, 3], -2.0], [[0, 0, 0, 1], 1.25],
            [[4], 0.3]]
    bias = bias if one_token_biases else [entry for entry in bias if len(entry[0]) > 1]
    bad = [[2], [4], [0, 1], [3, 2, 1], [1, 1]]
    rules = TokenSequenceRules(bias, bad, [eos], vocab, torch.device(DEVICE))
    assert rules.width == 3
    biaser = SequenceBiasLogitsProcessor(bias)
    banner = NoBadWordsLogitsProcessor(bad, eos_token_id=eos)
    generator = torch.Generator().manual_seed(1)
    matched = set()
    for tree, tokens, committed, sequences, logits in _random_trees(generator, vocab, 3, 16):
        tails = _tails(tree, tokens, committed, rules.width)
        given = logits.to(dtype).to(DEVICE)
        got = rules.ban(rules.biased(given, tails), tails).cpu()
        assert got.dtype == torch.float32 and torch.equal(given.cpu(), logits.to(dtype))
        for b, rows in enumerate(sequences):
            for node, sequence in enumerate(rows):
                row = logits[b, node].to(dtype).float()
                expected = _processed(banner, sequence, _processed(biaser, sequence, row))
                assert torch.equal(got[b, node], expected), (b, node, sequence)
                matched.update(tuple(entry[0]) for entry in bias if sequence[-len(entry[0]) + 1:] == entry[0][:-1]
                               and len(entry[0]) > 1 and len(sequence) >= len(entry[0]) - 1)
    assert len(matched) == 5  # every multi-token bias applied somewhere


def test_rules_longer_than_any_sequence_are_dropped():
    """An n-gram size, or a biased / banned entry, longer than the longest sequence of a call can never act: the
    engine drops it (its cost grows with its length) and keeps the rest."""
    from distill_ops.speculative import _LogitRules

    device = torch.device(DEVICE)
    sequences = TokenSequenceRules([[[1, 2], 1.0], [[3] * 9, 2.0]], [[4, 5], [6] * 12], [], 10, device)
    rules = _LogitRules(no_repeat_ngram_size=8, encoder_ngram_size=4, token_sequences=sequences).within(3, 8)
    assert (rules.no_repeat_ngram_size, rules.encoder_ngram_size, rules.tail_width) == (8, 0, 8)
    assert [group.prefixes.shape[1] for group in rules.token_sequences.bias_groups] == [1, 8]
    assert [group.prefixes.shape[1] for group in rules.token_sequences.bad_groups] == [1]
    rules = rules.within(3, 7)
    assert (rules.no_repeat_ngram_size, rules.tail_width) == (0, 1)
    assert rules.token_sequences.bias_ends.tolist() == [2]
    assert TokenSequenceRules(None, [[6] * 12], [], 10, device).within(5) is None


def test_drafts_skip_the_tokens_the_target_never_takes(monkeypatch):
    """Suppressed ids and one-token bad words are -inf at every node, so the drafts skip them too: with the target
    as its own chain draft, every step then accepts drafts, and the output equals generate's. Drafts that propose
    them get those steps rejected."""
    from distill_ops import speculative

    target, _ = models("llama")
    prompt = prompts(256, [4], seed=3)[0]
    free = reference_generate(target, prompt, 24, eos_token_id=[])[0, 4:].tolist()
    options = dict(bad_words_ids=[[free[2]], [free[5]]], eos_token_id=[])

    def accepted():
        engine = SpeculativeDecoder(target, target, tree=[[0] * depth for depth in range(1, 5)], impl="torch")
        out, expected = _generate_both(engine, target, prompt, 24, options, options,
                                       {"suppress_tokens": [free[0], free[9]]})
        assert torch.equal(out.sequences, expected)
        return out.accept_lengths[:-1]  # the last step may be cut by the token budget

    assert min(accepted()) >= 1
    monkeypatch.setattr(speculative, "_PenalizedDrafter", lambda drafter, penalize: drafter)
    assert min(accepted()) == 0


def _generate(target, prompt, max_new, **options):
    """generate's greedy output for one prompt (no padding)."""
    return target.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=max_new,
                           pad_token_id=0, **options)


def _generate_both(engine, target, prompt, max_new, ours=None, theirs=None, config=None):
    """The engine's and generate's greedy output with the given options (``config``: set on the target's
    generation_config for both)."""
    config = config or {}
    before = {name: getattr(target.generation_config, name) for name in config}
    for name, value in config.items():
        setattr(target.generation_config, name, value)
    try:
        out = engine.generate(prompt, max_new_tokens=max_new, **(ours or {}))
        expected = _generate(target, prompt, max_new, **(theirs or {}))
    finally:
        for name, value in before.items():
            setattr(target.generation_config, name, value)
    return out, expected


@pytest.mark.parametrize("draft_kind, tree_kind", [("lm", "dynamic"), ("lm", "static"), ("lm", "chain"),
                                                   ("fspad", "dynamic")])
def test_greedy_with_sequence_rules_equals_generate(draft_kind, tree_kind):
    """Each option, as an argument and from the target's generation_config: token for token generate's output,
    which differs from the output without it. The chain tree drafts with the target itself (``lm``), so whole
    paths are accepted and every rule acts at deep tree nodes."""
    target, draft_lm = models("llama")
    draft = draft_lm if draft_kind == "lm" else make_head(target)
    if tree_kind == "chain":
        draft = target if draft_kind == "lm" else draft
        tree = dict(tree=[[0] * depth for depth in range(1, 6)])
    else:
        tree = dict(tree=STATIC_TREE) if tree_kind == "static" else DYNAMIC_TREE
    engine = SpeculativeDecoder(target, draft, impl="torch", **tree)
    max_new = 24
    changed = {}
    # Prompts whose free run repeats a 2-gram and a 3-gram within the budget (the tiny target rarely does).
    for prompt in [prompts(256, [length], seed=seed)[0] for length, seed in ((2, 17), (7, 25), (12, 29))]:
        free = reference_generate(target, prompt, max_new, eos_token_id=[])[0, prompt.shape[1]:].tolist()
        # The prompt rules ("encoder" ones) on the prompt extended by the first 4 free tokens: its free run (the
        # rest) repeats some of them, which those rules then act on.
        extended = torch.cat([prompt, torch.tensor([free[:4]], device=DEVICE)], dim=1)
        free_extended = reference_generate(target, extended, max_new, eos_token_id=[])[0, extended.shape[1]:].tolist()
        options = [
            {"no_repeat_ngram_size": 1}, {"no_repeat_ngram_size": 2}, {"no_repeat_ngram_size": 3},
            {"bad_words_ids": [[free[3]], free[5:7], free[8:11]]},
            {"sequence_bias": [[[free[2]], -6.0], [free[4:6], -8.0], [free[9:12], 9.0], [[free[1], 7], 30.0]]},
            {"sequence_bias": {tuple(free[6:8]): -10.0}, "repetition_penalty": 1.4},  # bias, then penalty
            {"forced_eos_token_id": free[0]}, {"forced_eos_token_id": [free[0], 17]},
            {"exponential_decay_length_penalty": (3, 1.8), "eos_token_id": free[12]},  # EOS 13th, here earlier
            {"encoder_repetition_penalty": 1.6, "prompt": extended},
            {"encoder_repetition_penalty": 0.5, "prompt": extended},
            {"encoder_no_repeat_ngram_size": 1, "prompt": extended},
            {"encoder_no_repeat_ngram_size": 2, "no_repeat_ngram_size": 3, "prompt": extended},
        ]
        for index, case in enumerate(options):
            option = dict(case)
            kwargs = {"eos_token_id": option.pop("eos_token_id", [])}
            given = option.pop("prompt", prompt)
            base = free if given is prompt else free_extended
            for source in ("argument", "config"):
                if source == "argument":
                    out, expected = _generate_both(engine, target, given, max_new, {**kwargs, **option},
                                                   {**kwargs, **option})
                else:
                    out, expected = _generate_both(engine, target, given, max_new, kwargs, kwargs, option)
                assert torch.equal(out.sequences, expected), (option, source, out.sequences, expected)
            changed[index] = changed.get(index, 0) + (expected[0, given.shape[1]:].tolist() != base)
    assert all(count == 3 for count in changed.values()), changed


def test_sequence_rules_with_triton_kernels_in_a_batch_and_bad_values():
    """A left-padded batch with the Triton kernels: each row as generate alone; bad values are refused before
    any forward, naming the option."""
    from .test_speculative_batch import left_padded

    target, draft = models("qwen2")
    rows = prompts(320, [3, 9, 1, 6], seed=43)
    ids, mask = left_padded(rows)
    engine = SpeculativeDecoder(target, draft, impl="triton", **DYNAMIC_TREE)
    options = dict(no_repeat_ngram_size=2, bad_words_ids=[[5, 6], [7]], sequence_bias=[[[8, 9], 3.0]],
                   forced_eos_token_id=11, eos_token_id=[11], encoder_repetition_penalty=1.3,
                   encoder_no_repeat_ngram_size=2, exponential_decay_length_penalty=(6, 1.2))
    out = engine.generate(ids, attention_mask=mask, max_new_tokens=14, pad_token_id=0, **options)
    for b, prompt in enumerate(rows):
        alone = target.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                max_new_tokens=14, pad_token_id=0, **options)[0, prompt.shape[1]:]
        new = out.sequences[b, ids.shape[1]:]
        assert torch.equal(new[: alone.shape[0]], alone), (b, new, alone)
        assert alone[-1].item() == 11
    prompt = rows[0]
    bad = [
        (dict(no_repeat_ngram_size=-1), ValueError, "no_repeat_ngram_size must be >= 0, got -1"),
        (dict(no_repeat_ngram_size=2.0), TypeError, "no_repeat_ngram_size must be an int"),
        (dict(bad_words_ids=[[1], []]), ValueError, "bad_words_ids[1] must be a non-empty list of token ids"),
        (dict(bad_words_ids=[[1, 320]]), ValueError, "bad_words_ids[0] must hold token ids in [0, 320)"),
        (dict(bad_words_ids=5), TypeError, "bad_words_ids must be a list of token id lists, got int"),
        (dict(sequence_bias=[[[1], 1.0, 2]]), ValueError, "sequence_bias[0] must be a [token ids, bias] pair"),
        (dict(sequence_bias=[[[1], float("nan")]]), ValueError, "sequence_bias[0] bias must be"),
        (dict(sequence_bias={(1, -2): 1.0}), ValueError, "sequence_bias[0] token ids must be >= 0, got -2"),
        (dict(sequence_bias="ab"), TypeError, "sequence_bias must be a list of [token ids, bias] pairs"),
        (dict(forced_eos_token_id=[3, 400]), ValueError, "forced_eos_token_id must hold token ids in [0, 320)"),
        (dict(encoder_repetition_penalty=0.0), ValueError, "encoder_repetition_penalty must be in (0.0, inf)"),
        (dict(encoder_no_repeat_ngram_size=-2), ValueError, "encoder_no_repeat_ngram_size must be >= 0, got -2"),
        (dict(exponential_decay_length_penalty=(3,)), ValueError,
         "exponential_decay_length_penalty must be a (start_index, decay_factor) pair"),
        (dict(exponential_decay_length_penalty=(3, -1.0)), ValueError, "exponential_decay_length_penalty[1] must be"),
        (dict(bad_words_ids=torch.tensor([[1, 2]])), TypeError, "bad_words_ids must be a list of token id lists"),
        (dict(sequence_bias=np.array([1.0, 2.0])), TypeError, "sequence_bias must be a list of [token ids, bias]"),
    ]
    for kwargs, error, message in bad:
        with pytest.raises(error, match=re.escape(message)):
            engine.generate(prompt, max_new_tokens=4, **kwargs)
    # A forced EOS that is also suppressed: every logit would be -inf (transformers refuses it as well).
    target.generation_config.suppress_tokens = [7, 9]
    try:
        with pytest.raises(ValueError, match=re.escape("every token of forced_eos_token_id ([7]) is also in")):
            engine.generate(prompt, max_new_tokens=4, forced_eos_token_id=np.array([7, 7]))
        out = engine.generate(prompt, max_new_tokens=4, forced_eos_token_id=np.array([7, 8]), eos_token_id=[])
        assert out.sequences[0, -1].item() == 8  # 7 suppressed: 8 is the one forced token left
    finally:
        target.generation_config.suppress_tokens = None
    # An n-gram size or an entry longer than any sequence of the call can never act: same output, no cost.
    plain = engine.generate(prompt, max_new_tokens=6).sequences
    huge = engine.generate(prompt, max_new_tokens=6, no_repeat_ngram_size=5000, encoder_no_repeat_ngram_size=50,
                           bad_words_ids=[[i % 300 for i in range(3000)]], sequence_bias=[[[5] * 3000, 5.0]])
    assert torch.equal(huge.sequences, plain)
    target.generation_config.bad_words_ids = [[400]]
    try:
        with pytest.raises(ValueError, match=re.escape("target.generation_config.bad_words_ids[0] must hold")):
            engine.generate(prompt, max_new_tokens=4)
    finally:
        target.generation_config.bad_words_ids = None


def test_sampling_with_sequence_rules_is_lossless_chi_square(monkeypatch):
    """Sampling with ``no_repeat_ngram_size=1`` (no token twice) and a two-token sequence bias: the first three
    tokens follow generate's distribution with the same processors (exact, by enumeration of the target's
    processed distributions); leaving out the n-grams that end at a node's path drafts fails the test."""
    target, draft = models("llama")
    prompt = prompts(256, [3], seed=5)[0]
    first = reference_generate(target, prompt, 2, eos_token_id=[])[0, 3:].tolist()
    options = dict(no_repeat_ngram_size=1, sequence_bias=[[first, 2.0]])
    processors = [SequenceBiasLogitsProcessor([[first, 2.0]]), NoRepeatNGramLogitsProcessor(1)]

    def process(logits, held, step):
        for processor in processors:
            logits = processor(torch.tensor([held]), logits[None])[0]
        return logits

    expected = _sequence_distribution(target, prompt, 3, 1.0, 4, process)
    engine = SpeculativeDecoder(target, draft, impl="torch", **DYNAMIC_TREE)
    assert _sequence_sampling_pvalue(engine, prompt, expected, 1500, 1.0, 4, 0, eos_token_id=[], **options) > 1e-3


# From a mutation audit of the per-node rules: entries exactly as long as the longest sequence, the decay at the
# deepest node of a step and in a batch after a sequence finished, committed tails per batch row, a prompt n-gram
# size equal to the prompt's length.


def test_entries_as_long_as_the_longest_sequence_still_act():
    """A sequence_bias / bad_words_ids entry whose first tokens are the whole sequence the last token is chosen
    after (prompt + max_new_tokens - 1 tokens) acts on that last token, as in generate: the engine must not
    drop it as "longer than any sequence"."""
    target, draft = models("llama")
    engine = SpeculativeDecoder(target, draft, impl="torch", **DYNAMIC_TREE)
    max_new = 6
    prompt = prompts(256, [3], seed=7)[0]
    free = reference_generate(target, prompt, max_new, eos_token_id=[])[0].tolist()
    other = (free[-1] + 1) % 256
    cases = [dict(sequence_bias=[[free[:-1] + [other], 60.0]]), dict(bad_words_ids=[free])]
    for options in cases:
        expected = _generate(target, prompt, max_new, eos_token_id=[], **options)
        assert expected[0, -1].item() != free[-1]  # the entry changes generate's last token
        out = engine.generate(prompt, max_new_tokens=max_new, eos_token_id=[], **options)
        assert torch.equal(out.sequences, expected), (options, out.sequences, expected)


def test_decay_acts_at_the_deepest_node_of_the_first_step_that_reaches_its_start():
    """exponential_decay_length_penalty with a large factor makes EOS the first token chosen after
    prompt + start_index tokens. With the target drafting for itself along a chain of depth 5, the first step's
    deepest node (sequence length prompt + 6) is that token for start_index 5: the only decayed row of the step,
    which must not be skipped. Other starts put it at other nodes."""
    target, _ = models("llama")
    engine = SpeculativeDecoder(target, target, tree=[[0] * depth for depth in range(1, 6)], impl="torch")
    prompt = prompts(256, [4], seed=3)[0]
    free = reference_generate(target, prompt, 16, eos_token_id=[])[0, 4:].tolist()
    eos = next(token for token in range(256) if token not in free)
    for start in range(3, 9):
        options = dict(exponential_decay_length_penalty=(start, 50.0), eos_token_id=eos)
        expected = _generate(target, prompt, 16, **options)
        assert expected[0, -1].item() == eos and expected.shape[1] == 4 + start + 2  # EOS right after the start
        out = engine.generate(prompt, max_new_tokens=16, **options)
        assert torch.equal(out.sequences, expected), (start, out.sequences, expected)


def test_decay_in_a_batch_after_a_sequence_finished_counts_each_sequences_own_prompt():
    """A left-padded batch whose first sequence stops at its first token (its EOS): the rest of the call decodes
    the second sequence alone, whose exponential_decay_length_penalty start counts from its own prompt (6 tokens,
    not the finished one's 2). A large factor makes EOS the first token past the start, as generate alone does."""
    target, draft = models("llama")
    engine = SpeculativeDecoder(target, draft, impl="torch", **DYNAMIC_TREE)
    rows = prompts(256, [2, 6], seed=11)
    first = reference_generate(target, rows[0], 1, eos_token_id=[])[0, -1].item()
    assert first not in reference_generate(target, rows[1], 12, eos_token_id=[])[0, 6:].tolist()
    ids, mask = left_padded(rows)
    options = dict(exponential_decay_length_penalty=(3, 50.0), eos_token_id=first)
    out = engine.generate(ids, attention_mask=mask, max_new_tokens=12, pad_token_id=0, **options)
    for b, prompt in enumerate(rows):
        alone = _generate(target, prompt, 12, **options)[0, prompt.shape[1]:]
        assert alone[-1].item() == first and alone.shape[0] == (1 if b == 0 else 3 + 2)
        new = out.sequences[b, ids.shape[1]:]
        assert torch.equal(new[: alone.shape[0]], alone), (b, new, alone)


def test_batch_root_rows_read_their_own_sequences_committed_tokens():
    """In a batch, a node's sequence reaches back past the root into its own sequence's committed tokens: a
    three-token bad word per sequence made of its prompt's last token and its first two free tokens bans its
    second new token, which the first step's root row predicts from (prompt's last token, first new token).
    Each sequence equals generate alone."""
    target, draft = models("llama")
    engine = SpeculativeDecoder(target, draft, impl="torch", **DYNAMIC_TREE)
    rows = prompts(256, [3, 5], seed=13)
    frees = [reference_generate(target, row, 2, eos_token_id=[])[0, -2:].tolist() for row in rows]
    assert rows[0][0, -1].item() != rows[1][0, -1].item()
    bad = [[row[0, -1].item()] + free for row, free in zip(rows, frees)]
    ids, mask = left_padded(rows)
    out = engine.generate(ids, attention_mask=mask, max_new_tokens=8, pad_token_id=0, eos_token_id=[],
                          bad_words_ids=bad, no_repeat_ngram_size=3)
    for b, prompt in enumerate(rows):
        alone = _generate(target, prompt, 8, eos_token_id=[], bad_words_ids=bad,
                          no_repeat_ngram_size=3)[0, prompt.shape[1]:]
        assert alone[1].item() != frees[b][1]  # the bad word acts
        assert torch.equal(out.sequences[b, ids.shape[1]:], alone), (b, out.sequences[b], alone)


def test_prompt_ngram_size_equal_to_the_prompt_length_acts():
    """encoder_no_repeat_ngram_size equal to the prompt's length (1 here) still acts, as in generate: a
    one-token prompt whose free run repeats its token no longer does."""
    target, draft = models("llama")
    engine = SpeculativeDecoder(target, draft, impl="torch", **DYNAMIC_TREE)
    starts = torch.arange(256, device=DEVICE)[:, None]
    runs = target.generate(starts, attention_mask=torch.ones_like(starts), do_sample=False, max_new_tokens=8,
                           pad_token_id=0, eos_token_id=[])[:, 1:]
    token = next(t for t in range(256) if t in runs[t].tolist())  # a prompt token its free run repeats
    prompt = starts[token: token + 1]
    expected = _generate(target, prompt, 8, eos_token_id=[], encoder_no_repeat_ngram_size=1)
    assert token not in expected[0, 1:].tolist()
    out = engine.generate(prompt, max_new_tokens=8, eos_token_id=[], encoder_no_repeat_ngram_size=1)
    assert torch.equal(out.sequences, expected), (out.sequences, expected)
