"""The speculative-decoding engine on batches of prompts of different lengths.

Each sequence of a batch must be decoded exactly as it would be alone: greedy output equals
``target.generate`` on the sequence alone and on the same left-padded batch; sampling follows the target's
own distribution; each sequence's cache rows equal a plain forward's after every step.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import GenerationMixin

import distill_ops.speculative as speculative
from distill_ops.fspad import FSPADDraftHead
from distill_ops.speculative import SpeculativeDecoder, TreeAttentionContext, tree_attention_tail
from distill_ops.tree import build_tree
from distill_ops.tree_attention import tree_attention
from distill_ops.verify import VerifyResult

from .conftest import DEVICE, assert_close
from .test_tree import assert_specs_equal
from .test_speculative import (
    _EAGLE2_CASES,
    DYNAMIC_TREE,
    _RecordingDrafter,
    STATIC_TREE,
    _chi_square_pvalue,
    _target_two_token_distribution,
    check_draft_choices,
    gpt_oss_with_sinks,
    make_head,
    models,
    prompts,
    reference_generate,
    tiny_model,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py


def left_padded(rows: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, L]`` input ids and attention mask of 1-row prompts, left padded like a tokenizer does for
    generation."""
    width = max(row.shape[1] for row in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.int64, device=DEVICE)
    mask = torch.zeros_like(ids)
    for index, row in enumerate(rows):
        ids[index, width - row.shape[1]:] = row[0]
        mask[index, width - row.shape[1]:] = 1
    return ids, mask


def expected_rows(target, rows, ids, max_new_tokens, eos=None, pad=0) -> torch.Tensor:
    """Each prompt generated alone by ``target.generate``, laid out as a batched ``generate`` returns it."""
    alone = [reference_generate(target, row, max_new_tokens, eos_token_id=eos)[0, row.shape[1]:] for row in rows]
    width = max(len(new) for new in alone)
    out = torch.full((len(rows), ids.shape[1] + width), pad, dtype=torch.int64, device=DEVICE)
    out[:, : ids.shape[1]] = ids
    for index, new in enumerate(alone):
        out[index, ids.shape[1]: ids.shape[1] + len(new)] = new
    return out


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_tree_attention_tail_places_each_sequences_tree_after_its_own_prefix(impl):
    """``starts``: the new rows, appended at the end of the KV, are moved to each sequence's tree slots; the
    result equals tree attention over a cache laid out per sequence."""
    torch.manual_seed(0)
    tree = build_tree(torch.tensor([-1, 0, 0, 1, 1, 2]), device=DEVICE)
    batch, heads, kv_heads, dim, nodes = 3, 4, 2, 16, 6
    lens = [5, 9, 2]
    width = max(lens)
    q = torch.randn(batch, heads, nodes, dim, device=DEVICE)
    k = torch.randn(batch, kv_heads, width + nodes, dim, device=DEVICE)
    v = torch.randn(batch, kv_heads, width + nodes, dim, device=DEVICE)
    # Reference layout: sequence b's tree right after its prefix (stale rows after it).
    k_ref, v_ref = k.clone(), v.clone()
    for b, n in enumerate(lens):
        k_ref[b, :, n: n + nodes] = k[b, :, width:]
        v_ref[b, :, n: n + nodes] = v[b, :, width:]
    starts = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    expected = tree_attention(q, k_ref, v_ref, tree, starts, impl="torch")
    # A draft expanding its last level: the earlier nodes were placed by earlier forwards.
    k_tail, v_tail = k_ref[:, :, : width + nodes - 2].clone(), v_ref[:, :, : width + nodes - 2].clone()
    k_tail = torch.cat([k_tail, k[:, :, -2:]], dim=2)
    v_tail = torch.cat([v_tail, v[:, :, -2:]], dim=2)
    out = tree_attention_tail(q[:, :, -2:], k_tail, v_tail, TreeAttentionContext(tree, impl, starts=starts))
    assert_close(out, expected[:, :, -2:], torch.float32)
    for b, n in enumerate(lens):  # moved in place, prefixes untouched
        assert torch.equal(k_tail[b, :, : n + nodes], k_ref[b, :, : n + nodes])
    out = tree_attention_tail(q, k.clone(), v.clone(), TreeAttentionContext(tree, impl, starts=starts))
    assert_close(out, expected, torch.float32)


class _BatchReplayDrafter:
    """A batched fake drafter: each level's logits ``[B, E, V]`` drawn beforehand (few distinct values: exact
    ties); states identify a node by its token; it keeps what it was given."""

    def __init__(self, level_logits):
        self.level_logits, self.calls = level_logits, []

    def expand(self, tokens, parent_states, positions, tree):
        self.calls.append((tokens.clone(), positions.clone(), parent_states.clone(), tree))
        return self.level_logits[len(self.calls) - 1][:, : tokens.shape[1]], tokens.to(torch.float32)[..., None]


# Without the 200-node case (about 100 s under the interpreter at batch 3) and the all-kept one.
@pytest.mark.parametrize("depth, topk, num_nodes, vocab, kind", [case for case in _EAGLE2_CASES if case[2] <= 100
                                                                 and case[:3] != (2, 2, 50)])
def test_batched_eagle2_kernels_equal_the_pytorch_path(depth, topk, num_nodes, vocab, kind):
    """The Triton bookkeeping with one program per sequence (each sequence's own root token and position ids)
    gives every sequence the trees, tokens, positions and parent states of the PyTorch path, which is the
    host-bookkeeping reference at batch size 1 (tests/test_speculative.py)."""
    batch = 3
    source = _RecordingDrafter(vocab, kind, seed=depth)
    root_logits = torch.stack([source.logits(1)[0] for _ in range(batch)])
    level_logits = [torch.stack([source.logits(topk) for _ in range(batch)]) for _ in range(depth)]
    roots = torch.tensor([7, 0, vocab - 1], device=DEVICE)
    root_pos = torch.tensor([[11], [3], [40]], device=DEVICE)
    root_state = roots.to(torch.float32)[:, None]
    results = []
    for impl in ("triton", "torch"):
        drafter = _BatchReplayDrafter(level_logits)
        plan = speculative._DynamicPlan(topk, depth, num_nodes, vocab, DEVICE, impl)
        for _ in range(2):  # the second draft reuses the batch's workspace
            drafter.calls.clear()
            tree, tokens = plan.draft(drafter, root_logits, root_state, roots, root_pos,
                                      speculative._Timer(DEVICE, sync=False))
        results.append((tree, tokens, drafter.calls))
    (tree, tokens, calls), (ref_tree, ref_tokens, ref_calls) = results
    assert tokens.shape == (batch, tree.num_nodes) and tree.batch_size == batch
    assert torch.equal(tokens, ref_tokens) and torch.equal(tokens[:, 0], roots)
    assert_specs_equal(tree, ref_tree)
    assert len(calls) == len(ref_calls) == (depth - 1 if num_nodes > 1 else 0)
    for level, (got, want) in enumerate(zip(calls, ref_calls), start=1):
        assert all(torch.equal(a, b) for a, b in zip(got[:3], want[:3]))
        assert torch.equal(got[1], (root_pos + level).expand_as(got[1]))
        assert_specs_equal(got[3], want[3])
    # Sequences differ (the comparison is not of identical rows).
    assert not torch.equal(tokens[0], tokens[1]) or num_nodes == 1


@pytest.mark.parametrize("tree_kind", ["dynamic", "static"])
@pytest.mark.parametrize("draft_kind", ["lm", "fspad"])
def test_batch_greedy_equals_generate(draft_kind, tree_kind):
    """Prompts of lengths 3, 9, 1 and 6, left padded: each row equals ``generate`` on that prompt alone and
    ``generate`` on the same padded batch."""
    target, draft_lm = models("llama")
    draft = draft_lm if draft_kind == "lm" else make_head(target)
    tree = dict(tree=STATIC_TREE) if tree_kind == "static" else DYNAMIC_TREE
    engine = SpeculativeDecoder(target, draft, impl="torch", **tree)
    rows = prompts(256, [3, 9, 1, 6], seed=41)
    ids, mask = left_padded(rows)
    max_new = 16 if draft_kind == "lm" else 9
    out = engine.generate(ids, attention_mask=mask, max_new_tokens=max_new, eos_token_id=[])
    expected = expected_rows(target, rows, ids, max_new)
    assert torch.equal(out.sequences, expected), (out.sequences, expected)
    batched = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new, pad_token_id=0)
    assert torch.equal(out.sequences, batched)
    steps = [len(lengths) for lengths in out.row_accept_lengths]
    assert out.num_target_forwards == 1 + max(steps)
    assert out.accept_lengths == [n for lengths in out.row_accept_lengths for n in lengths]
    for lengths in out.row_accept_lengths:  # each row emitted exactly its tokens (the first one from the prefill)
        assert sum(lengths) + len(lengths) >= max_new - 1
    if draft_kind == "lm":
        assert max(out.accept_lengths) >= 2 and len(set(steps)) > 1  # rows advanced at different speeds


def test_right_padded_and_middle_run_prompts_decode_each_sequence_as_alone():
    """The mask may mark any one contiguous run per row: right padding (transformers' generate warns and decodes
    such a row after its padding, a different continuation) and a run in the middle. Each sequence's new tokens are
    those of its prompt alone, laid out as documented: the input row as given, then the new tokens."""
    target, draft = models("llama")
    engine = SpeculativeDecoder(target, draft, impl="torch", **DYNAMIC_TREE)
    rows = prompts(256, [6, 2, 3], seed=44)
    ids = torch.zeros((3, 6), dtype=torch.int64, device=DEVICE)
    mask = torch.zeros_like(ids)
    for index, (row, start) in enumerate(zip(rows, [0, 0, 2])):  # full, right padded, middle run
        ids[index, start: start + row.shape[1]] = row[0]
        mask[index, start: start + row.shape[1]] = 1
    max_new = 7
    out = engine.generate(ids, attention_mask=mask, max_new_tokens=max_new, eos_token_id=[])
    assert torch.equal(out.sequences, expected_rows(target, rows, ids, max_new)), out.sequences
    # The padded rows really are read without their padding: as tokens, the zeros change the continuation.
    unmasked = reference_generate(target, ids[1:2], max_new)[0, ids.shape[1]:]
    assert not torch.equal(out.sequences[1, ids.shape[1]:], unmasked)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_batch_draft_equal_to_target_accepts_whole_chains(impl):
    """A perfect draft on a chain tree: every step of every sequence accepts the whole chain, whatever the
    sequences' lengths (the draft's ragged advances and trees are right)."""
    target, _ = models("llama")
    engine = SpeculativeDecoder(target, target, tree=[[0] * d for d in range(1, 5)], impl=impl)
    rows = prompts(256, [5, 1, 3], seed=3)
    ids, mask = left_padded(rows)
    new = 21 if impl == "torch" else 11
    out = engine.generate(ids, attention_mask=mask, max_new_tokens=new, eos_token_id=[])
    assert torch.equal(out.sequences, expected_rows(target, rows, ids, new))
    assert out.row_accept_lengths == [[4] * ((new - 1 + 4) // 5)] * 3


@pytest.mark.parametrize("draft_kind", ["lm", "fspad"])
def test_batch_drafts_are_each_sequences_own_top_choices(monkeypatch, draft_kind):
    """Each node's token is the rank-r token of the draft's own distribution after that sequence's committed
    tokens and the node's path: the drafter's ragged caches, tree starts and feature feedback are right."""
    target, draft_lm = models("llama")
    draft = draft_lm if draft_kind == "lm" else make_head(target)
    records = []
    original = speculative._Generation._draft

    def recording(self, root_logits, root_state, roots, root_pos, caps):
        tree, tokens, positions = original(self, root_logits, root_state, roots, root_pos, caps)
        records.append(([list(self.rows[row]) for row in self.active], tree.parents[0].tolist(), tokens.tolist()))
        return tree, tokens, positions

    monkeypatch.setattr(speculative._Generation, "_draft", recording)
    engine = SpeculativeDecoder(target, draft, tree=STATIC_TREE, impl="torch")
    rows = prompts(256, [5, 2, 8], seed=13)
    ids, mask = left_padded(rows)
    engine.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[])
    assert len(records) >= 3
    for committed_rows, parents, token_rows in records[:3]:
        for committed, tokens in zip(committed_rows, token_rows, strict=True):
            check_draft_choices(draft, target, committed, parents, tokens, static=True)


def _forced_verify(tree, draft_tokens, logits, **kwargs) -> VerifyResult:
    """Accept the first-child chain of ``root token % 4`` nodes whatever the target says (a rule of the
    sequence's content, not of its row), then the target's argmax: each sequence accepts different lengths,
    so a drafter's ragged advance, its feature gathering and each sequence's tree positions are exercised
    even with an untrained draft."""
    batch, width = draft_tokens.shape[0], tree.max_depth + 1
    first_child = tree.first_child.expand(batch, -1).tolist()
    accepted = torch.full((batch, width), -1, dtype=torch.int64, device=logits.device)
    emitted = accepted.clone()
    for b, tokens in enumerate(draft_tokens.tolist()):
        nodes = [0]
        while len(nodes) <= tokens[0] % 4 and first_child[b][nodes[-1]] >= 0:
            nodes.append(first_child[b][nodes[-1]])
        accepted[b, : len(nodes)] = torch.tensor(nodes)
        emitted[b, : len(nodes) - 1] = torch.tensor([tokens[node] for node in nodes[1:]], dtype=torch.int64)
        emitted[b, len(nodes) - 1] = logits[b, nodes[-1]].argmax()
    accept_len = (accepted >= 0).sum(1) - 1
    return VerifyResult(accepted, accept_len, emitted.gather(1, accept_len[:, None])[:, 0], emitted)


@pytest.mark.parametrize("tree_kind", ["dynamic", "static"])
@pytest.mark.parametrize("draft_kind", ["lm", "fspad"])
def test_batch_drafts_equal_drafting_each_sequence_alone(monkeypatch, draft_kind, tree_kind):
    """Under a verification that accepts different lengths per sequence, every tree drafted for a sequence of a
    batch (tokens and shape, step after step) is the tree drafted for that sequence alone."""
    target, draft_lm = models("llama")
    draft = draft_lm if draft_kind == "lm" else make_head(target)
    tree = dict(tree=STATIC_TREE) if tree_kind == "static" else DYNAMIC_TREE
    engine = SpeculativeDecoder(target, draft, impl="torch", **tree)
    monkeypatch.setattr(speculative, "verify_greedy", _forced_verify)
    # Full trees at every step: near max_new_tokens a batch's trees are cut for its furthest-behind sequence,
    # a sequence alone for itself (test_batch_trees_are_cut_for_the_furthest_behind_sequence).
    engine._cut_trees = False
    drafts = []
    original = speculative._Generation._draft

    def recording(self, root_logits, root_state, roots, root_pos, caps):
        tree, tokens, positions = original(self, root_logits, root_state, roots, root_pos, caps)
        parents = tree.parents.expand(tokens.shape[0], -1)
        assert not any(self.done[row] for row in self.active)  # finished sequences have left the batch
        drafts.append({row: (parents[i].tolist(), tokens[i].tolist(), positions[i].tolist())
                       for i, row in enumerate(self.active)})
        return tree, tokens, positions

    monkeypatch.setattr(speculative._Generation, "_draft", recording)
    rows = prompts(256, [5, 2, 8, 3], seed=29)
    ids, mask = left_padded(rows)
    out = engine.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[])
    batched = [[step[b] for step in drafts if b in step] for b in range(len(rows))]
    assert len(drafts[-1]) < len(rows)  # sequences that finished earlier were no longer drafted
    lengths = out.row_accept_lengths
    assert len({tuple(row) for row in lengths}) > 1 and max(map(max, lengths)) >= 2
    for b, row in enumerate(rows):
        drafts.clear()
        alone = engine.generate(row, max_new_tokens=12, eos_token_id=[])
        assert alone.sequences[0].tolist() == out.sequences[b, ids.shape[1] - row.shape[1]:].tolist()
        assert alone.accept_lengths == lengths[b]
        assert [step[0] for step in drafts] == batched[b], b


def test_batch_trees_are_cut_for_the_furthest_behind_sequence(monkeypatch):
    """Sequences that accept different lengths reach max_new_tokens at different steps: each step's tree keeps
    the depth the sequence with the most tokens to go can still use (max over the batch of left - 1), a
    static tree its nodes up to that depth."""
    target, draft = models("llama")
    engine = SpeculativeDecoder(target, draft, tree=STATIC_TREE, impl="torch")
    monkeypatch.setattr(speculative, "verify_greedy", _forced_verify)
    steps = []
    original = speculative._Generation._draft

    def recording(self, root_logits, root_state, roots, root_pos, caps):
        tree, tokens, positions = original(self, root_logits, root_state, roots, root_pos, caps)
        steps.append(([12 - (len(self.rows[row]) - self.prompt_lens[row]) for row in self.active], tree.num_nodes))
        return tree, tokens, positions

    monkeypatch.setattr(speculative._Generation, "_draft", recording)
    rows = prompts(256, [5, 2, 8, 3], seed=29)
    ids, mask = left_padded(rows)
    engine.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[])
    nodes_within = [1, 4, 7, 9, 10]  # STATIC_TREE's nodes at depth <= 0, 1, 2, 3, 4
    assert [num_nodes for _, num_nodes in steps] == [nodes_within[min(4, max(left) - 1)] for left, _ in steps]
    assert any(min(left) - 1 < 4 and max(left) > min(left) for left, _ in steps)  # a sequence nearer its end
    assert any(max(left) - 1 < 4 for left, _ in steps)  # and cut trees


@pytest.mark.parametrize("draft_kind", ["lm", "fspad"])
def test_batch_greedy_with_triton_kernels(draft_kind):
    """The Triton path at batch size > 1: tree attention with ragged prefixes, batched verification,
    compaction of every layer at ragged lengths; dynamic trees are bookkept by the PyTorch path."""
    target, draft_lm = models("qwen2")
    draft = draft_lm if draft_kind == "lm" else make_head(target)
    engine = SpeculativeDecoder(target, draft, impl="triton", **DYNAMIC_TREE)
    rows = prompts(320, [2, 7, 4], seed=43)
    ids, mask = left_padded(rows)
    out = engine.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(out.sequences, expected_rows(target, rows, ids, 6))


@pytest.mark.parametrize("family, impl", [("gemma2", "torch"), ("mistral", "torch"), ("gpt_oss", "torch"),
                                          ("gemma2", "triton"), ("gpt_oss", "triton")])
def test_batch_sliding_window_softcap_and_sinks(family, impl):
    """Batches past a 4-token sliding window (windows count each sequence's own positions), with attention
    soft-capping (Gemma-2) or attention sinks (gpt-oss)."""
    if family == "gpt_oss":
        target = gpt_oss_with_sinks()
    elif family == "gemma2":
        target = tiny_model("Gemma2", sliding_window=4, head_dim=16, attn_logit_softcapping=3.0)
    else:
        target = tiny_model("Mistral", sliding_window=4)
    engine = SpeculativeDecoder(target, target, impl=impl, depth=3, topk=2, num_nodes=8)
    rows = prompts(128, [7, 2, 5], seed=10)
    ids, mask = left_padded(rows)
    new = 14 if impl == "torch" else 8
    out = engine.generate(ids, attention_mask=mask, max_new_tokens=new, eos_token_id=[])
    assert torch.equal(out.sequences, expected_rows(target, rows, ids, new))


def test_batch_stops_each_sequence_at_its_eos_and_pads():
    """Sequences end at different steps (an EOS that only some rows emit, one inside an accepted path);
    finished rows are padded with ``pad_token_id``; the others go on as if alone."""
    target, _ = models("llama")
    rows = prompts(256, [4, 2, 7], seed=5)
    free_run = reference_generate(target, rows[0], 12)[0, 4:].tolist()
    eos = free_run[2]  # row 0 ends at its third new token (test_speculative's EOS case)
    engine = SpeculativeDecoder(target, target, tree=[[0] * d for d in range(1, 6)], impl="torch")
    ids, mask = left_padded(rows, pad=7)
    out = engine.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=3)
    expected = expected_rows(target, rows, ids, 12, eos=eos, pad=3)
    assert torch.equal(out.sequences, expected), (out.sequences, expected)
    assert out.sequences[0, ids.shape[1] + 2].item() == eos and (out.sequences[0, ids.shape[1] + 3:] == 3).all()
    assert out.row_accept_lengths[0] == [5]  # a perfect chain draft: 5 accepted, cut after the EOS
    # Without pad_token_id and without one in the generation config, the first EOS id pads (as generate).
    out = engine.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[eos, 1])
    assert torch.equal(out.sequences, expected_rows(target, rows, ids, 12, eos=[eos, 1], pad=eos))


@pytest.mark.parametrize("draft_kind", ["lm", "fspad"])
def test_batch_repetition_penalty_equals_generate(draft_kind):
    """The target's ``generation_config.repetition_penalty`` (read as generate reads it): each row equals generate
    on its prompt alone, and on the same left-padded batch (transformers leaves the left padding out of the
    penalty where its generate passes the padding lengths, as 5.x does; the pad id 5 is a token of another row's
    prompt). An EOS ends one sequence early: the others keep
    their own penalised token sets."""
    target, draft_lm = models("llama")
    draft = draft_lm if draft_kind == "lm" else make_head(target)
    engine = SpeculativeDecoder(target, draft, impl="torch", **DYNAMIC_TREE)
    rows = prompts(256, [3, 9, 1, 6], seed=41)
    ids, mask = left_padded(rows, pad=5)
    max_new = 16 if draft_kind == "lm" else 9
    target.generation_config.repetition_penalty = 1.3
    try:
        eos = reference_generate(target, rows[2], max_new)[0, 3].item()  # row 2's third new token
        expected = expected_rows(target, rows, ids, max_new, eos=eos, pad=0)
        out = engine.generate(ids, attention_mask=mask, max_new_tokens=max_new, eos_token_id=eos, pad_token_id=0)
        assert torch.equal(out.sequences, expected), (out.sequences, expected)
        if "padding_lengths" in inspect.getsource(GenerationMixin._get_logits_processor):  # transformers >= 5
            batched = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new,
                                      pad_token_id=0, eos_token_id=eos)
            assert torch.equal(out.sequences[:, : batched.shape[1]], batched)
    finally:
        target.generation_config.repetition_penalty = 1.0
    plain = expected_rows(target, rows, ids, max_new, eos=eos, pad=0)
    assert not torch.equal(plain, expected)  # the penalty changes the output
    steps = [len(lengths) for lengths in out.row_accept_lengths]
    assert steps[2] < max(steps)  # row 2 left the batch while others went on


@pytest.mark.parametrize("draft_kind, impl", [("lm", "torch"), ("fspad", "torch"), ("lm", "triton")])
def test_batch_cache_after_each_step_equals_a_plain_forward(draft_kind, impl):
    """Row b of every layer holds, in its first ``n_b - 1`` positions, the cache a plain forward of the
    sequence's committed tokens builds, for every sequence still in the batch; a sequence leaves the batch (its
    cache rows dropped) only once it has finished."""
    target, draft_lm = models("qwen2")
    draft = draft_lm if draft_kind == "lm" else make_head(target)
    engine = SpeculativeDecoder(target, draft, impl=impl, **DYNAMIC_TREE)
    rows = prompts(320, [6, 2, 9], seed=11)
    ids, mask = left_padded(rows)
    checked = []

    def check(sequences, cache):
        assert isinstance(sequences, list) and 1 <= len(sequences) <= len(rows)
        assert all(layer.keys.shape[0] == len(sequences) for layer in cache.layers)
        width = cache.get_seq_length()
        assert width >= max(row.shape[1] for row in sequences) - 1
        for b, row in enumerate(sequences):
            committed = row[:, :-1]
            with torch.no_grad():
                out = target(committed, use_cache=True)
            fresh = out.cache if hasattr(out, "cache") else out.past_key_values
            n = committed.shape[1]
            for layer, expected in zip(cache.layers, fresh.layers):
                assert_close(layer.keys[b:b + 1, :, :n], expected.keys, torch.float32)
                assert_close(layer.values[b:b + 1, :, :n], expected.values, torch.float32)
        # Which input sequence each batch row is (the prompts differ), in input order, and its length.
        which = [next(i for i, prompt in enumerate(rows) if torch.equal(row[:, :prompt.shape[1]], prompt))
                 for row in sequences]
        assert which == sorted(which)
        checked.append({i: row.shape[1] for i, row in zip(which, sequences)})

    new = 10 if impl == "torch" else 5
    out = engine.generate(ids, attention_mask=mask, max_new_tokens=new, eos_token_id=[], step_callback=check)
    assert len(checked) == out.num_target_forwards
    assert checked[0] == {0: 7, 1: 3, 2: 10}
    final = {i: n + new for i, n in enumerate((6, 2, 9))}
    for before, after in zip(checked, checked[1:]):
        assert set(after) <= set(before)
        # Only finished sequences leave, after the step they finished in; the others stay until every one has.
        assert all(before[i] == final[i] for i in set(before) - set(after))
        assert all(before[i] < final[i] for i in after)
    assert all(lengths[i] == final[i] for lengths in checked[-1:] for i in lengths)
    last_seen = {i: next(step[i] for step in reversed(checked) if i in step) for i in final}
    assert last_seen == final
    if impl == "torch":
        assert len(checked[-1]) < len(rows)  # here the sequences finish at different steps


def _sample_first_two(engine, batch_rows, sample_rows, calls, temperature, top_k, seed) -> torch.Tensor:
    """Counts of the first two sampled tokens of rows ``sample_rows`` over ``calls`` batched generations."""
    vocab = engine.vocab_size
    ids, mask = left_padded(batch_rows)
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    counts = torch.zeros(vocab * vocab, dtype=torch.float64)
    for _ in range(calls):  # a third token: the second's step then drafts (the trees are cut to what is kept)
        out = engine.generate(ids, attention_mask=mask, max_new_tokens=3, temperature=temperature, top_k=top_k,
                              eos_token_id=[], generator=generator)
        for b in sample_rows:
            first, second = out.sequences[b, ids.shape[1]:ids.shape[1] + 2].tolist()
            counts[first * vocab + second] += 1
    return counts


def test_batch_sampling_is_lossless_chi_square(monkeypatch):
    """Three copies of a prompt sampled in one batch with two prompts of other lengths: the copies' first two
    tokens follow the target's own distribution (and the copies are independent samples)."""
    target, draft = models("llama")
    prompt = prompts(256, [5], seed=19)[0]
    others = prompts(256, [2, 8], seed=20)
    batch_rows, sample_rows = [others[0], prompt, prompt, others[1], prompt], [1, 2, 4]
    temperature, top_k, calls = 1.3, 3, 80
    expected = _target_two_token_distribution(target, prompt, temperature, top_k)
    engine = SpeculativeDecoder(target, draft, depth=2, topk=3, num_nodes=6, impl="torch")
    counts = _sample_first_two(engine, batch_rows, sample_rows, calls, temperature, top_k, seed=0)
    assert counts.sum() == calls * len(sample_rows)
    assert _chi_square_pvalue(counts, expected) > 1e-3
    # Power: tree nodes judged by the next node's logits fail it.
    real = speculative.verify_sampling
    monkeypatch.setattr(speculative, "verify_sampling",
                        lambda tree, tokens, logits, **kw: real(tree, tokens, logits.roll(-1, dims=1), **kw))
    biased = _sample_first_two(engine, batch_rows, sample_rows, calls // 2, temperature, top_k, seed=1)
    assert _chi_square_pvalue(biased, expected) < 1e-3


def test_batch_bad_inputs():
    target, draft = models("llama")
    engine = SpeculativeDecoder(target, draft, impl="torch", **DYNAMIC_TREE)
    ids, mask = left_padded(prompts(256, [3, 5], seed=3))
    with pytest.raises(ValueError, match=r"attention_mask must have input_ids' shape \(2, 5\), got \(2, 4\)"):
        engine.generate(ids, attention_mask=mask[:, 1:], max_new_tokens=3)
    with pytest.raises(ValueError, match="0 and 1 only"):
        engine.generate(ids, attention_mask=mask * 2, max_new_tokens=3)
    with pytest.raises(ValueError, match="row 0 masks every token"):
        engine.generate(ids, attention_mask=torch.cat([mask[:1] * 0, mask[1:]]), max_new_tokens=3)
    holes = mask.clone()
    holes[1, 2] = 0
    with pytest.raises(ValueError, match="row 1 must mark one contiguous run"):
        engine.generate(ids, attention_mask=holes, max_new_tokens=3)
    with pytest.raises(TypeError, match="attention_mask"):
        engine.generate(ids, attention_mask=mask.float(), max_new_tokens=3)
    with pytest.raises(ValueError, match=r"shape \[B, L\] or \[L\]"):
        engine.generate(ids[None], max_new_tokens=3)
    bad = ids.clone()
    bad[1, -1] = 1000
    with pytest.raises(ValueError, match="got 1000 in sequence 1"):
        engine.generate(bad, attention_mask=mask, max_new_tokens=3)
    # Padding positions may hold any value (only the tokens are checked).
    padded = ids.clone()
    padded[0, 0] = -1
    out = engine.generate(padded, attention_mask=mask, max_new_tokens=2, eos_token_id=[])
    assert out.sequences[0, 0].item() == -1 and out.sequences.shape == (2, 7)


@pytest.mark.parametrize("tree_kind", ["dynamic", "static"])
def test_batch_fspad_row_that_ends_at_its_first_token(tree_kind):
    """An FSPAD head in a batch where one sequence (not the last) ends with the prefill's token (its first new
    token is the EOS): it leaves the batch before the head's prefill, whose prompts, first tokens and target
    features must then be those of the remaining sequences."""
    target, _ = models("llama")
    head = make_head(target)
    tree = dict(tree=STATIC_TREE) if tree_kind == "static" else DYNAMIC_TREE
    engine = SpeculativeDecoder(target, head, impl="torch", **tree)
    rows = prompts(256, [3, 9, 1, 6], seed=41)
    eos = reference_generate(target, rows[1], 1)[0, -1].item()  # row 1's first new token
    ids, mask = left_padded(rows)
    out = engine.generate(ids, attention_mask=mask, max_new_tokens=9, eos_token_id=eos, pad_token_id=0)
    expected = expected_rows(target, rows, ids, 9, eos=eos, pad=0)
    assert torch.equal(out.sequences, expected), (out.sequences, expected)
    assert out.row_accept_lengths[1] == []  # row 1 ended at the prefill
    assert all(len(lengths) > 0 for b, lengths in enumerate(out.row_accept_lengths) if b != 1)


@pytest.mark.parametrize("draft_kind", ["lm", "fspad"])
def test_batch_draft_cache_holds_the_longest_committed_sequence_before_each_draft(monkeypatch, draft_kind):
    """Before every drafting step of a ragged batch the drafter's cache is as long as its longest committed
    sequence (a draft LM: the tokens through the root; an FSPAD head: one entry fewer) and, for a draft LM, row b
    holds the cache a plain draft forward of sequence b builds: the padding of the ragged advances (sequences
    that accepted fewer tokens than the longest advance) is not kept."""
    target, draft_lm = models("llama")
    draft = draft_lm if draft_kind == "lm" else make_head(target)
    engine = SpeculativeDecoder(target, draft, impl="torch", tree=STATIC_TREE)
    monkeypatch.setattr(speculative, "verify_greedy", _forced_verify)  # different accepted lengths per sequence
    original = speculative._Generation._draft
    checked = []

    def checking(self, root_logits, root_state, roots, root_pos, caps):
        committed = [self.rows[row] for row in self.active]  # through each root
        if isinstance(draft, FSPADDraftHead):
            assert self.drafter.cache.length == max(len(row) for row in committed) - 1
        else:
            cache = self.drafter.cache
            assert cache.get_seq_length() == max(len(row) for row in committed)
            for b, row in enumerate(committed):
                with torch.no_grad():
                    fresh = draft(torch.tensor([row], device=ids.device), use_cache=True).past_key_values
                for layer, expected in zip(cache.layers, fresh.layers):
                    assert_close(layer.keys[b:b + 1, :, :len(row)], expected.keys, torch.float32)
        checked.append(len(committed))
        return original(self, root_logits, root_state, roots, root_pos, caps)

    monkeypatch.setattr(speculative._Generation, "_draft", checking)
    rows = prompts(256, [5, 2, 8, 3], seed=29)
    ids, mask = left_padded(rows)
    out = engine.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[])
    assert len(checked) >= 3 and len({tuple(lengths) for lengths in out.row_accept_lengths}) > 1


@pytest.mark.parametrize("rule", [dict(no_repeat_ngram_size=2), dict(forced_eos_token_id=11),
                                  dict(encoder_repetition_penalty=1.5), dict(encoder_no_repeat_ngram_size=2)],
                         ids=lambda rule: next(iter(rule)))
def test_batch_rules_after_an_earlier_row_left(rule):
    """Rules with per-sequence state in a left-padded batch whose first sequence ends early (an EOS only it
    emits): the sequences still decoding keep their own n-gram history, forced-EOS position and prompt, each row
    equal to ``generate`` on its prompt alone."""
    target, draft = models("llama")
    engine = SpeculativeDecoder(target, draft, impl="torch", **DYNAMIC_TREE)
    rows = prompts(256, [4, 2, 7], seed=5)
    options = dict(do_sample=False, pad_token_id=0, **rule)
    eos = target.generate(rows[0], max_new_tokens=12, **options)[0, 4 + 2].item()  # row 0's third new token
    ids, mask = left_padded(rows)
    out = engine.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0, **rule)
    new = [len(lengths) for lengths in out.row_accept_lengths]
    assert new[0] < max(new[1:])  # row 0 left the batch while the others went on
    for index, row in enumerate(rows):
        alone = target.generate(row, max_new_tokens=12, eos_token_id=eos, **options)[0, row.shape[1]:].tolist()
        got = out.sequences[index, ids.shape[1]:].tolist()
        assert got[: len(alone)] == alone and all(token == 0 for token in got[len(alone):]), index


def test_batch_near_the_end_of_a_learned_position_table_equals_generate(monkeypatch):
    """GPT-2 (a learned position table, ``n_positions`` = 16) in ragged batches that end at its last position: a
    sequence ahead of another drafts nodes past its own budget (trees are cut for the one furthest behind), whose
    position ids indexed past the table (IndexError; a device assert on CUDA) where ``generate`` decodes the batch
    (a review, 2026-12-07). Those ids are capped now; every sequence equals ``generate``'s, and caps did bind."""
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2(layers):
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=96, n_positions=16, n_embd=32, n_layer=layers, n_head=2, initializer_range=0.3,
                            bos_token_id=None, eos_token_id=None, pad_token_id=None)
        return GPT2LMHeadModel(config).eval().to(DEVICE)

    target, draft = gpt2(2), gpt2(1)
    with torch.no_grad():  # a draft that agrees with the target part of the time: ragged accept lengths
        draft.transformer.load_state_dict(target.transformer.state_dict(), strict=False)
        target.transformer.h[1].attn.c_proj.weight.mul_(0.3)
        target.transformer.h[1].mlp.c_proj.weight.mul_(0.3)
    engine = SpeculativeDecoder(target, draft, depth=5, topk=3, num_nodes=16, impl="torch")
    bound = []
    expand = speculative._CappedPositions.expand

    def recording(self, tokens, parent_states, positions, tree):
        bound.append(bool((positions > self._caps).any()))
        return expand(self, tokens, parent_states, positions, tree)

    monkeypatch.setattr(speculative._CappedPositions, "expand", recording)
    generator = torch.Generator().manual_seed(0)
    for trial in range(12):  # the first prompt ends at position 15 = n_positions - 1
        rows = [torch.randint(0, 96, (1, n), generator=generator).to(DEVICE) for n in (8, 2)]
        ids, mask = left_padded(rows)
        out = engine.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
        assert out.sequences.tolist() == expected_rows(target, rows, ids, 8).tolist(), trial
    assert any(bound)
