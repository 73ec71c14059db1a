"""Regression tests for correctness bugs that peer tree / custom-mask attention implementations have had.

Each test names the peer report it comes from and pins our behaviour on the same situation (soft-capping
against the tree mask, empty split-KV partitions, the (query head, node) row to mask-row mapping under GQA,
per-sequence and multi-word mask offsets, batched tree-spec building next to a malformed tree, position ids
of sibling nodes, the shape of the packed mask). References are float64 brute force
(``tests.test_tree_attention``'s ``sdpa_reference`` / ``path_oracle``, :func:`build_tree`).
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from distill_ops.tree import TreeSpec, build_tree, tree_spec_from_parents_tensor
from distill_ops.tree_attention import tree_attention
from distill_ops.verify import verify_greedy, verify_sampling
from tests.conftest import DEVICE, IMPLS, assert_close
from tests.test_tree import assert_spec_matches
from tests.test_tree import random_parents as any_earlier_parents
from tests.test_tree_attention import ancestor_chain, make_case, path_oracle, sdpa_reference


def per_sequence_parents(batch: int, num_nodes: int, seed: int) -> torch.Tensor:
    """``[B, T]`` parent arrays, a different tree per sequence."""
    return torch.stack([any_earlier_parents(num_nodes, seed + b) for b in range(batch)])


# --------------------------------------------------------------------------------------------------
# Tree attention
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl, num_kv_splits", [("torch", None), ("triton", 1), ("triton", 2)])
def test_softcap_is_applied_before_the_tree_mask(impl, num_kv_splits):
    """https://github.com/flashinfer-ai/flashinfer/pull/350 -- FlashInfer's decode kernel applied the logits
    soft-cap after masking, so a masked (-inf) logit became -cap and masked keys got weight again.

    A star tree (every child sees only the root and itself among 13 tree keys) with a small cap: a masked
    tree key must keep exactly zero weight, unsplit and split-KV."""
    num_nodes, cap = 13, 2.0
    q, k, v, _, lens = make_case(2, 4, 2, num_nodes, 64, [3, 150], torch.float32, per_seq_tree=False, seed=31)
    q = q * 4
    parents = torch.tensor([[-1] + [0] * (num_nodes - 1)])
    tree = build_tree(parents.to(DEVICE))
    out = tree_attention(q, k, v, tree, lens, softcap=cap, num_kv_splits=num_kv_splits, impl=impl)
    assert_close(out, path_oracle(q, k, v, parents, lens.cpu(), 1 / math.sqrt(64), softcap=cap), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_empty_kv_splits_merge_without_nan(dtype):
    """https://github.com/vllm-project/vllm/pull/39148 -- vLLM's Triton merge_attn_states produced NaN when a
    partition had no key (LSE -inf, output 0: -inf - -inf in the rescale); FlashInfer's cascade merge had
    the same bug (https://github.com/flashinfer-ai/flashinfer/issues/4051).

    Five prefix chunks, and two of three sequences have a prefix of 0 or 2 keys: most of their splits see no
    key at all (and sequence 0's split 0 holds only the tree block). The merged output is finite and equals
    the unsplit float64 reference."""
    q, k, v, parents, lens = make_case(3, 4, 2, 5, 64, [0, 2, 300], dtype, per_seq_tree=True, seed=23)
    tree = build_tree(parents.to(DEVICE))
    out = tree_attention(q, k, v, tree, lens, num_kv_splits=8, impl="triton")
    assert torch.isfinite(out).all()
    assert_close(out, sdpa_reference(q, k, v, parents, lens.cpu(), 1 / math.sqrt(64)), dtype)


@pytest.mark.parametrize("impl", IMPLS)
def test_gqa_rows_read_their_own_nodes_mask_row(impl):
    """https://github.com/AMD-Ecosystem/flashinfer/pull/214 -- the ROCm FlashInfer fork computed the packed
    (query head, query) row index of the custom mask with the wrong interleaving under GQA, so query rows
    were masked with another query's mask row.

    4 query heads per KV head and 9 nodes: 36 (head, node) rows per KV group, more than one fp32 row block
    (32 rows), so a block boundary falls inside a head. Different trees per sequence."""
    q, k, v, parents, lens = make_case(2, 8, 2, 9, 64, [6, 20], torch.float32, per_seq_tree=True, seed=41)
    tree = build_tree(parents.to(DEVICE))
    out = tree_attention(q, k, v, tree, lens, num_kv_splits=1 if impl == "triton" else None, impl=impl)
    assert_close(out, path_oracle(q, k, v, parents, lens.cpu(), 1 / math.sqrt(64)), torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_each_sequence_reads_its_own_multi_word_mask(impl):
    """https://github.com/flashinfer-ai/flashinfer/pull/2201 -- FlashInfer's paged prefill plan() did not
    convert the per-request mask offsets (mask_indptr) when given a packed custom mask, so every request
    after the first read its mask bits at the wrong offset.

    Three sequences with their own 70-node trees (two int64 words per mask row, deep chains across the word
    boundary) and ragged prefixes, one of them empty."""
    num_nodes = 70
    q, k, v, _, lens = make_case(3, 2, 1, num_nodes, 16, [0, 37, 5], torch.float32, per_seq_tree=False, seed=43)
    parents = per_sequence_parents(3, num_nodes, seed=430)
    tree = build_tree(parents.to(DEVICE))
    assert tree.num_words == 2
    out = tree_attention(q, k, v, tree, lens, impl=impl)
    assert_close(out, sdpa_reference(q, k, v, parents, lens.cpu(), 1 / math.sqrt(16)), torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_mask_row_stride_of_a_three_word_tree(impl):
    """https://github.com/NVIDIA/TensorRT-LLM/pull/13006 -- TensorRT-LLM's prepareCustomMask indexed the
    packed tree mask with a row stride (packedMaskNumBlocks) that did not match the layout the mask was
    written in (ceil(T / 32) words per row), so rows past the first read other rows' bits.

    150 nodes: three int64 words per row; a chain through both word boundaries (bit 63 of word 0 and of
    word 1 set in every deeper row) with side branches off it."""
    num_nodes = 150
    chain = list(range(-1, 129))  # nodes 0..129 form a chain
    branches = [3 * i for i in range(num_nodes - len(chain))]  # nodes 130..149 hang off chain nodes
    parents = torch.tensor([chain + branches])
    q, k, v, _, lens = make_case(1, 2, 2, num_nodes, 16, [9], torch.float32, per_seq_tree=False, seed=47)
    tree = build_tree(parents.to(DEVICE))
    assert tree.num_words == 3 and bool((tree.ancestor_mask[0, 129, :2] == -1).all())  # both sign bits set
    out = tree_attention(q, k, v, tree, lens, impl=impl)
    assert_close(out, sdpa_reference(q, k, v, parents, lens.cpu(), 1 / math.sqrt(16)), torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_ancestor_mask_shape_is_validated(impl):
    """https://github.com/flashinfer-ai/flashinfer/issues/3176 -- FlashInfer's single_prefill_with_kv_cache
    accepted a custom mask whose shape did not match (qo_len, kv_len), and its kernel read past the packed
    buffer: silently corrupted output instead of an error.

    A 9-node spec whose ancestor mask holds only 5 rows (a view into a larger zero buffer, so that the
    unchecked read stays inside allocated memory) must be refused with a ValueError naming the mask, by tree
    attention and by the verifiers (this test found that ours did not check; ``check_tree_spec`` does now)."""
    q, k, v, parents, lens = make_case(1, 2, 1, 9, 16, [4], torch.float32, per_seq_tree=False, seed=53)
    tree = build_tree(parents.to(DEVICE))
    short = torch.zeros(1, 9, 1, dtype=torch.int64, device=DEVICE)[:, :5]
    bad = dataclasses.replace(tree, ancestor_mask=short)
    with pytest.raises(ValueError, match=r"tree.ancestor_mask must be int64 of shape \[1, 9, 1\]"):
        tree_attention(q, k, v, bad, lens, impl=impl)
    tokens = torch.zeros(1, 9, dtype=torch.int64, device=DEVICE)
    logits = torch.zeros(1, 9, 11, device=DEVICE)
    with pytest.raises(ValueError, match="tree.ancestor_mask must be int64"):
        verify_greedy(bad, tokens, logits, impl=impl)
    with pytest.raises(TypeError, match="tree.depth must be int64"):  # a dtype: TypeError
        verify_sampling(dataclasses.replace(tree, depth=tree.depth.int()), tokens, logits, impl=impl)


# --------------------------------------------------------------------------------------------------
# Tree utilities
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_batched_spec_ignores_the_neighbouring_trees_rows(impl):
    """https://github.com/sgl-project/sglang/pull/36201 -- SGLang's CUDA build_tree_efficient searched one
    entry too many per request for a parent, so a lookup (and, with a missing parent, the ancestor walk)
    read the next request's row.

    Two well-formed 37-node trees (T not a power of two: the kernel's tile is padded to 64) around a
    malformed one (a parent after its child, parents out of range): each well-formed tree's spec equals
    build_tree of that tree alone."""
    num_nodes = 37
    good = [any_earlier_parents(num_nodes, 600), any_earlier_parents(num_nodes, 601)]
    broken = any_earlier_parents(num_nodes, 602)
    broken[1], broken[4], broken[5], broken[20] = 30, 99, -5, 36
    parents = torch.stack([good[0], broken, good[1]]).to(DEVICE)
    spec = tree_spec_from_parents_tensor(parents, num_nodes - 1, num_nodes - 1, impl=impl)
    kept = torch.tensor([0, 2], device=DEVICE)
    fields = ("parents", "depth", "ancestor_mask", "first_child", "next_sibling", "leaf_paths")
    well_formed = TreeSpec(**{name: getattr(spec, name)[kept] for name in fields},
                           max_depth=spec.max_depth, max_children=spec.max_children)
    assert_spec_matches(well_formed, build_tree(torch.stack(good)))


# --------------------------------------------------------------------------------------------------
# The transformers attention function: position ids of a tree
# --------------------------------------------------------------------------------------------------

_TARGET = {}


def tiny_target():
    if "llama" not in _TARGET:
        from tests.test_speculative import make_models

        _TARGET["llama"] = make_models("llama", vocab=96, seed=5)[0]
    return _TARGET["llama"]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("impl", IMPLS)
def test_sibling_nodes_share_depth_position_ids(impl):
    """https://github.com/NVIDIA/TensorRT-LLM/pull/13081 -- TensorRT-LLM's model engine gave every node of a
    flattened non-linear draft tree its own position id (range over the nodes), where siblings must share
    the depth-based position the path they end would have.

    A tiny Llama (4 query heads, 2 KV heads) scores a tree with siblings at depths 1 and 2 in one forward,
    with our spec's position ids (cache length + depth) and the registered tree attention; each node's
    logits equal a float64 plain causal forward over the prefix followed by that node's root path."""
    import distill_ops.speculative as speculative
    from transformers import DynamicCache

    target = tiny_target()
    cache_kwarg = speculative._cache_kwarg(target)
    gen = torch.Generator().manual_seed(7)
    prefix = torch.randint(0, 96, (1, 6), generator=gen).to(DEVICE)
    parent_list = [-1, 0, 0, 1, 1, 2, 3, 3]
    tokens = torch.randint(0, 96, (1, len(parent_list)), generator=gen).to(DEVICE)
    tree = speculative.tree_spec_from_parents(parent_list, DEVICE)
    with torch.no_grad(), speculative._attention_switched([target]):
        cache = DynamicCache(config=target.config)
        target(input_ids=prefix, position_ids=torch.arange(prefix.shape[1], device=DEVICE)[None], use_cache=True,
               **{cache_kwarg: cache})
        context = speculative.TreeAttentionContext(tree, impl)
        logits = target(input_ids=tokens, position_ids=tree.depth + prefix.shape[1], use_cache=True,
                        **{cache_kwarg: cache, speculative.CONTEXT_KWARG: context}).logits
    assert context.calls == target.config.num_hidden_layers
    reference = copy.deepcopy(target).to(torch.float64)
    with torch.no_grad():
        for node in range(len(parent_list)):
            path = tokens[:, ancestor_chain(parent_list, node)]
            expected = reference(input_ids=torch.cat([prefix, path], dim=1)).logits[0, -1]
            assert_close(logits[0, node], expected, torch.float32, msg=f"node {node}")
