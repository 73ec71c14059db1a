"""The speculative-decoding engine on tiny random transformers models.

Greedy output must equal ``target.generate(do_sample=False)`` token for token; sampling must follow the
target's own distribution (chi-square); the KV cache after every step must equal a plain forward's; the
drafted tokens must be what the draft itself predicts along each tree path.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import re
import types

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import distill_ops.speculative as speculative
from distill_ops.fspad import FSPADDraftHead, target_features
from distill_ops.speculative import (
    ATTENTION_NAME,
    SpeculativeDecoder,
    TreeAttentionContext,
    register_tree_attention,
    tree_attention_tail,
    tree_spec_from_parents,
)
from distill_ops.tree import build_tree, tree_from_paths
from distill_ops.tree_attention import tree_attention

from .conftest import DEVICE, IMPLS, assert_close, word_tokenizer
from .test_tree import _RecordingKernel, assert_spec_matches, assert_specs_equal, no_host_reads  # noqa: F401

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),  # sliding-window cache layers (window 4096 by default)
    # Attention logit soft-capping (small, so that it changes the scores), final-logit soft-capping, and
    # alternating sliding-window layers.
    "gemma2": (Gemma2Config, Gemma2ForCausalLM),
}
FAMILY_OVERRIDES = {"gemma2": dict(head_dim=16, attn_logit_softcapping=3.0)}
STATIC_TREE = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 1], [0, 0, 0, 0]]
DYNAMIC_TREE = dict(depth=4, topk=3, num_nodes=12)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py


def model_config(family: str, vocab: int, layers: int, **overrides):
    config_cls, _ = FAMILIES[family]
    return config_cls(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
        # Larger-than-default weights give peaked next-token distributions (no near-ties in argmax).
        initializer_range=0.3, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        **{**FAMILY_OVERRIDES.get(family, {}), **overrides},
    )


def make_models(family: str = "llama", vocab: int = 256, seed: int = 0):
    """A 2-layer target and a 1-layer draft LM that shares its embedding, first layer, norm and LM head.

    The target's second layer is damped so that the draft agrees with it often but not always: steps
    accept paths of varied lengths and reject others."""
    _, model_cls = FAMILIES[family]
    torch.manual_seed(seed)
    target = model_cls(model_config(family, vocab, 2)).eval().to(DEVICE)
    with torch.no_grad():
        second = target.model.layers[1]
        second.self_attn.o_proj.weight.mul_(0.3)
        second.mlp.down_proj.weight.mul_(0.3)
    draft = model_cls(model_config(family, vocab, 1)).eval().to(DEVICE)
    draft.model.embed_tokens.load_state_dict(target.model.embed_tokens.state_dict())
    draft.model.layers[0].load_state_dict(target.model.layers[0].state_dict())
    draft.model.norm.load_state_dict(target.model.norm.state_dict())
    draft.lm_head.load_state_dict(target.lm_head.state_dict())
    return target, draft


def make_head(target, seed: int = 1) -> FSPADDraftHead:
    torch.manual_seed(seed)
    return FSPADDraftHead(target.config).eval().to(DEVICE)


def reference_generate(target, prompt, max_new_tokens, eos_token_id=None):
    return target.generate(
        prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id, pad_token_id=0,
    )


def prompts(vocab: int, lengths, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (1, n), generator=generator).to(DEVICE) for n in lengths]


_MODELS = {}


def models(family: str):
    if family not in _MODELS:
        _MODELS[family] = make_models(family, vocab={"llama": 256, "qwen2": 320, "mistral": 288, "gemma2": 192}[family])
    return _MODELS[family]


# --------------------------------------------------------------------------------------------------
# Host-built tree specs and the attention plumbing
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_nodes", [1, 2, 9, 64, 65, 150])
def test_tree_spec_from_parents_equals_build_tree(num_nodes):
    generator = torch.Generator().manual_seed(num_nodes)
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=generator)) for i in range(1, num_nodes)]
    fast = tree_spec_from_parents(parents, DEVICE)
    reference = build_tree(torch.tensor(parents), device=DEVICE)
    for name in ("parents", "depth", "ancestor_mask", "first_child", "next_sibling", "leaf_paths"):
        assert torch.equal(getattr(fast, name), getattr(reference, name)), name
    assert (fast.max_depth, fast.max_children) == (reference.max_depth, reference.max_children)


def test_tree_spec_from_parents_rejects_invalid():
    with pytest.raises(ValueError, match="parents"):
        tree_spec_from_parents([-1, 1], DEVICE)
    with pytest.raises(ValueError, match="parents"):
        tree_spec_from_parents([0, 0], DEVICE)
    with pytest.raises(ValueError, match="nodes"):
        tree_spec_from_parents([], DEVICE)
    # Types too (an error-message audit: floats, None, a bare int and a 2-D tensor reached Python / PyTorch
    # internals; a bool was read as node 0).
    for bad, match in (([-1, 0.0], r"parents\[1\] must be an int, got float: 0.0"),
                       ([-1, None], r"parents\[1\] must be an int, got NoneType"),
                       ([-1, False], r"parents\[1\] must be an int, got bool"),
                       (5, "parents must be a list of ints or a 1-D integer tensor, got int"),
                       (torch.tensor([[-1, 0]]), r"parents must have 1 dim, got shape \(1, 2\)"),
                       (torch.tensor([-1.0, 0.0]), "parents must have dtype in")):
        with pytest.raises(TypeError if "dim" not in match else ValueError, match=match):
            tree_spec_from_parents(bad, DEVICE)
    # The device by name too (an input-contract audit, 2026-12-07: PyTorch's RuntimeError for an unknown string,
    # its argument-parser TypeError for None).
    with pytest.raises(ValueError, match="device must name a device .* got 'gpu0'"):
        tree_spec_from_parents([-1, 0], "gpu0")
    with pytest.raises(TypeError, match="device must be a torch.device, a device string or index, got NoneType"):
        tree_spec_from_parents([-1, 0], None)
    parents = torch.tensor([-1, 0, 0])  # a 1-D integer tensor is accepted (read once on the host)
    assert_specs_equal(tree_spec_from_parents(parents, DEVICE), build_tree(parents, device=DEVICE))


def test_tree_attention_tail_is_a_slice_of_full_tree_attention():
    """Queries for the last nodes only (a draft level) = the same rows of the whole tree's attention."""
    generator = torch.Generator().manual_seed(0)
    parents = [-1, 0, 0, 1, 1, 2, 3]
    tree = tree_spec_from_parents(parents, DEVICE)
    q = torch.randn(1, 4, 7, 16, generator=generator).to(DEVICE)
    k, v = (torch.randn(1, 2, 12, 16, generator=generator).to(DEVICE) for _ in range(2))
    full = tree_attention(q, k, v, tree, torch.tensor([5], device=DEVICE), impl="torch")
    tail = tree_attention_tail(q[:, :, 4:], k, v, TreeAttentionContext(tree, "torch"))
    assert_close(tail, full[:, :, 4:], torch.float32)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_registered_attention_returns_the_kernels_buffer_without_a_copy(impl):
    """The attention function hands transformers ``[B, q, Hq, D]``: the kernel's own output buffer in that layout,
    contiguous for the target's whole tree (q = T) and for a draft level at batch size 1, with no copy after the
    attention (a transpose-and-copy ran in every layer of every forward)."""
    generator = torch.Generator().manual_seed(1)
    tree = tree_spec_from_parents([-1, 0, 0, 1, 1, 2, 3], DEVICE)
    k, v = (torch.randn(1, 2, 12, 16, generator=generator).to(DEVICE) for _ in range(2))
    for q_len in (7, 3):
        query = torch.randn(1, 4, q_len, 16, generator=generator).to(DEVICE)
        context = TreeAttentionContext(tree, impl)
        names = []

        class _Names(torch.utils._python_dispatch.TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                names.append(str(func))
                return func(*args, **(kwargs or {}))

        with torch.inference_mode(), _Names():
            out, _ = speculative._tree_attention_forward(None, query, k, v, None, scaling=0.25,
                                                         **{speculative.CONTEXT_KWARG: context})
        expected = tree_attention_tail(query, k, v, TreeAttentionContext(tree, impl), scaling=0.25)
        assert out.shape == (1, q_len, 4, 16) and out.is_contiguous()
        assert torch.equal(out, expected.transpose(1, 2))
        assert not {"aten.clone.default", "aten.contiguous.default"} & set(names), names


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_registered_attention_without_tree_is_sdpa(family):
    """Switched to our implementation, a model without a tree context computes exactly what SDPA does."""
    target, _ = models(family)
    prompt = prompts(target.config.vocab_size, [9], seed=1)[0]
    with torch.no_grad():
        expected = target(prompt).logits
        name = register_tree_attention()
        target.set_attn_implementation(name)
        try:
            got = target(prompt, **{speculative.CONTEXT_KWARG: TreeAttentionContext()}).logits
            plain = target(prompt).logits
        finally:
            target.set_attn_implementation("sdpa")
    assert name == ATTENTION_NAME
    assert torch.equal(got, expected) and torch.equal(plain, expected)


# --------------------------------------------------------------------------------------------------
# Greedy: identical to generate
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tree_kind", ["dynamic", "static"])
@pytest.mark.parametrize("draft_kind", ["lm", "fspad"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_greedy_equals_generate(family, draft_kind, tree_kind):
    target, draft_lm = models(family)
    draft = draft_lm if draft_kind == "lm" else make_head(target)
    tree = dict(tree=STATIC_TREE) if tree_kind == "static" else DYNAMIC_TREE
    engine = SpeculativeDecoder(target, draft, impl="torch", **tree)
    vocab = target.config.vocab_size
    accepted = []
    # An untrained FSPAD head is rejected at almost every step: shorter runs keep the test fast.
    lengths, new_tokens = ([1, 4, 11, 6], [1, 9, 24, 13]) if draft_kind == "lm" else ([1, 11, 6], [1, 12, 7])
    for prompt, max_new_tokens in zip(prompts(vocab, lengths, seed={"llama": 1, "qwen2": 2}[family]), new_tokens):
        out = engine.generate(prompt, max_new_tokens=max_new_tokens, eos_token_id=[])
        expected = reference_generate(target, prompt, max_new_tokens)
        assert torch.equal(out.sequences, expected), (out.sequences, expected)
        assert out.num_new_tokens == max_new_tokens
        assert out.num_target_forwards == 1 + len(out.accept_lengths)
        accepted += out.accept_lengths
    if draft_kind == "lm":
        assert max(accepted) >= 2  # the test exercises multi-token acceptance, not only rejections


def test_sampling_with_a_tiny_top_p_is_greedy():
    """top_p = 0.01 at temperature 3 keeps only each step's most likely token: sampling gives the greedy output
    whatever the seed (an engine that did not pass top_p to the verifier sampled from the whole tempered
    distribution; the hf_generate tests compare with the engine itself, so they could not see it)."""
    target, draft = models("llama")
    engine = SpeculativeDecoder(target, draft, impl="torch", **DYNAMIC_TREE)
    prompt = prompts(target.config.vocab_size, [5], seed=4)[0]
    greedy = engine.generate(prompt, max_new_tokens=8, eos_token_id=[]).sequences
    assert torch.equal(greedy, reference_generate(target, prompt, 8))
    for seed in range(3):
        sampled = engine.generate(prompt, max_new_tokens=8, temperature=3.0, top_p=0.01, eos_token_id=[],
                                  generator=torch.Generator().manual_seed(seed)).sequences
        assert torch.equal(sampled, greedy), seed


@pytest.mark.parametrize("impl", IMPLS)
def test_a_dynamic_tree_with_fewer_nodes_than_its_depth(impl):
    """``num_nodes`` at most ``depth`` (the default depth 5 with 3 nodes): the tree is cut to what the nodes can
    reach (a chain of 2 drafts at most), not built to the full depth (a plan that kept depth 5 raised, as a tree
    spec of 3 nodes cannot be 4 deep). Greedy output equals generate's."""
    target, draft = models("llama")
    engine = SpeculativeDecoder(target, draft, impl=impl, depth=5, topk=2, num_nodes=3)
    prompt = prompts(target.config.vocab_size, [5], seed=3)[0]
    out = engine.generate(prompt, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(out.sequences, reference_generate(target, prompt, 8))
    assert max(out.accept_lengths) <= 2


@pytest.mark.parametrize("draft_kind", ["lm", "fspad"])
def test_greedy_equals_generate_mistral_sliding_window(draft_kind):
    """Mistral's layers are sliding-window layers (window 4096 here: the sequence fits it); beyond the window:
    test_greedy_equals_generate_beyond_the_sliding_window."""
    target, draft_lm = models("mistral")
    draft = draft_lm if draft_kind == "lm" else make_head(target)
    engine = SpeculativeDecoder(target, draft, impl="torch", **DYNAMIC_TREE)
    for prompt, max_new_tokens in zip(prompts(288, [3, 9], seed=4), [14, 8]):
        out = engine.generate(prompt, max_new_tokens=max_new_tokens, eos_token_id=[])
        assert torch.equal(out.sequences, reference_generate(target, prompt, max_new_tokens))


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_greedy_equals_generate_gemma2_softcap(impl):
    """Gemma-2: attention soft-capping in the tree attention (both impls) and in the engine's own causal
    forwards (SDPA cannot soft-cap); the reference is transformers' eager attention."""
    target, draft = models("gemma2")
    assert target.config.attn_logit_softcapping == 3.0 and target.config._attn_implementation == "eager"
    engine = SpeculativeDecoder(target, draft, impl=impl, **DYNAMIC_TREE)
    accepted = []
    for prompt, max_new_tokens in zip(prompts(192, [2, 9], seed=6), [15, 10]):
        out = engine.generate(prompt, max_new_tokens=max_new_tokens, eos_token_id=[])
        assert torch.equal(out.sequences, reference_generate(target, prompt, max_new_tokens))
        accepted += out.accept_lengths
    assert max(accepted) >= 1


@pytest.mark.parametrize("family", ["Qwen3", "Phi3", "Gemma3", "Olmo2", "Mixtral", "GPTNeoX", "Cohere"])
def test_greedy_equals_generate_more_families(family):
    """Other transformers families whose attention goes through the AttentionInterface (q/k norms, partial
    rotary, mixture-of-experts MLPs, parallel blocks): greedy output equals generate's."""
    import transformers

    config_cls = getattr(transformers, f"{family}TextConfig", None) or getattr(transformers, f"{family}Config")
    model_cls = getattr(transformers, f"{family}ForCausalLM")
    config = dict(vocab_size=160, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                  tie_word_embeddings=False, initializer_range=0.3, bos_token_id=None, eos_token_id=None,
                  pad_token_id=None)
    torch.manual_seed(0)
    target = model_cls(config_cls(num_hidden_layers=2, **config)).eval().to(DEVICE)
    # The target drafts for itself: whole paths are accepted, so deep tree rows decide the output too.
    engine = SpeculativeDecoder(target, target, impl="torch", depth=3, topk=2, num_nodes=8)
    for prompt in prompts(160, [1, 7], seed=8):
        out = engine.generate(prompt, max_new_tokens=12, eos_token_id=[])
        assert torch.equal(out.sequences, reference_generate(target, prompt, 12))
        assert max(out.accept_lengths) == 3


def test_unsupported_attention_is_refused():
    """StableLM's attention does not go through transformers' AttentionInterface: refused, naming why."""
    import transformers

    config = transformers.StableLmConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2)
    model = transformers.StableLmForCausalLM(config).eval().to(DEVICE)
    engine = SpeculativeDecoder(model, model, impl="torch", depth=2, topk=2, num_nodes=4)
    with pytest.raises(ValueError, match="does not go through transformers' AttentionInterface"):
        engine.generate(prompts(64, [3], seed=9)[0], max_new_tokens=4)


def test_multi_head_latent_attention_is_refused():
    """DeepSeek-V2/V3's MLA has value heads narrower than its query/key heads: the engine was built, ran the
    prefill, then failed inside tree_attention's shape check. Refused when built now, naming the reason."""
    target = tiny_model("DeepseekV3", num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
                        qk_nope_head_dim=16, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
                        moe_intermediate_size=32, first_k_dense_replace=1, n_group=1, topk_group=1)
    with pytest.raises(ValueError, match="value heads of dim 8 and query/key heads of dim 24"):
        SpeculativeDecoder(target, target, impl="torch", depth=2, topk=2, num_nodes=4)


POSITION_LIMITED = {  # (family, config): each computes what generate does only up to 16 positions
    "phi3-longrope": ("Phi3", dict(max_position_embeddings=64, original_max_position_embeddings=16, rope_parameters=dict(
        rope_type="longrope", rope_theta=10000.0, short_factor=[1.0] * 8, long_factor=[4.0] * 8,
        original_max_position_embeddings=16))),
    "llama-dynamic": ("Llama", dict(max_position_embeddings=16, rope_parameters=dict(rope_type="dynamic",
                                                                                   rope_theta=10000.0, factor=4.0))),
    "llama4-chunked": ("Llama4Text", dict(intermediate_size_mlp=128, head_dim=16, num_local_experts=2,
                                          interleave_moe_layer_step=1, attention_chunk_size=16, no_rope_layers=[1, 0],
                                          attn_temperature_tuning=False)),
}


@pytest.mark.parametrize("case", list(POSITION_LIMITED))
def test_position_dependent_models_run_within_their_limit_and_are_refused_past_it(case, monkeypatch):
    """dynamic / longrope RoPE switch frequencies with a forward's largest position, and chunked attention masks
    across chunks: full trees reach `depth` positions beyond generate's, and gave other tokens once the
    sequence passed the original context / the first chunk. One sequence's trees are cut near max_new_tokens,
    so its forwards end where generate's do (prompt + max_new_tokens - 1 positions); a batch's sequence ahead
    of another drafts deeper, at position ids capped below the limit (a batch within it was refused while it
    could reach past by the tree depth). Within the limit the engine equals generate; past it a ValueError says
    why, before any forward."""
    family, extra = POSITION_LIMITED[case]
    target = tiny_model(family, **extra)
    engine = SpeculativeDecoder(target, target, impl="torch", depth=3, topk=2, num_nodes=8)
    prompt = prompts(128, [5], seed=12)[0]
    out = engine.generate(prompt, max_new_tokens=12, eos_token_id=[])  # 5 + 12 - 1 = 16
    assert torch.equal(out.sequences, reference_generate(target, prompt, 12))
    with pytest.raises(ValueError, match=r"within 16 positions, got 5 \+ max_new_tokens=13 - 1: "):
        engine.generate(prompt, max_new_tokens=13, eos_token_id=[])
    # A batch with a draft that agrees part of the time (ragged accept lengths), rows of 5, 3 and 5 tokens (left
    # padded), the longest ending at position 15: the caps bind (recorded) and every row equals generate's.
    draft = copy.deepcopy(target)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for weight in draft.parameters():
            weight.add_(torch.randn(weight.shape, generator=generator).to(weight) * 0.01)
    engine = SpeculativeDecoder(target, draft, impl="torch", depth=3, topk=2, num_nodes=8)
    bound = []  # whether a step's tree reached past a sequence's cap
    draft_step = speculative._Generation._draft

    def recording(self, root_logits, root_state, roots, root_pos, caps):
        tree, tokens, positions = draft_step(self, root_logits, root_state, roots, root_pos, caps)
        bound.append(caps is not None and bool((tree.depth + root_pos > caps).any()))
        assert caps is None or bool((positions <= caps).all())
        return tree, tokens, positions

    monkeypatch.setattr(speculative._Generation, "_draft", recording)
    width = 5
    for seed in range(13, 23):  # until a sequence ahead reached past the limit (one to three tries here)
        rows = [prompt, *prompts(128, [3, 5], seed=seed)]
        batch = torch.cat([torch.cat([row.new_zeros(1, width - row.shape[1]), row], 1) for row in rows])
        mask = torch.cat([torch.cat([row.new_zeros(1, width - row.shape[1]), torch.ones_like(row)], 1)
                          for row in rows])
        out = engine.generate(batch, attention_mask=mask, max_new_tokens=12, eos_token_id=[])  # 5 + 12 - 1 = 16
        for b, row in enumerate(rows):
            assert out.sequences[b, width - row.shape[1]:].tolist() == reference_generate(target, row, 12)[0].tolist()
        if any(bound):
            break
    assert any(bound)
    with pytest.raises(ValueError, match=r"within 16 positions, got 5 \+ max_new_tokens=13 - 1: "):
        engine.generate(batch, attention_mask=mask, max_new_tokens=13, eos_token_id=[])


def tiny_model(family: str, **extra):
    """A 2-layer random model of a ``transformers`` family (``{family}Config`` / ``{family}ForCausalLM``,
    ``Text`` dropped for the model class), vocabulary 128, peaked distributions."""
    import transformers

    config_cls = getattr(transformers, f"{family}Config")
    model_cls = getattr(transformers, f"{family.removesuffix('Text')}ForCausalLM")
    config = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=False, initializer_range=0.3, bos_token_id=None,
                  eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    return model_cls(config_cls(**{**config, **extra})).eval().to(DEVICE)


def gpt_oss_with_sinks():
    """gpt-oss with strong attention sinks (so that they change the output), alternating 4-token sliding-window
    and full layers, mixture-of-experts MLPs."""
    target = tiny_model("GptOss", intermediate_size=64, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                        sliding_window=4)
    with torch.no_grad():
        for layer in target.model.layers:
            layer.self_attn.sinks.normal_(0.0, 2.0)
    assert target.config.layer_types == ["sliding_attention", "full_attention"]
    return target


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("family, extra", [
    ("Gemma3Text", dict(sliding_window=4, head_dim=16)),  # local layers + global layers
    ("Gemma2", dict(sliding_window=4, head_dim=16, attn_logit_softcapping=3.0)),  # window and soft-capping
    ("Mistral", dict(sliding_window=4)),  # every layer local
], ids=["gemma3", "gemma2", "mistral"])
def test_greedy_equals_generate_beyond_the_sliding_window(family, extra, impl):
    """Sliding-window models far beyond their window (4 tokens; the sequences reach 26): the engine keeps
    every layer's whole sequence and applies the window in the attention (transformers' masks on causal
    forwards, tree_attention(sliding_window=) on the trees), so greedy output equals generate's, whose own
    cache keeps only the window."""
    target = tiny_model(family, **extra)
    engine = SpeculativeDecoder(target, target, impl=impl, depth=3, topk=2, num_nodes=8)
    for prompt in prompts(128, [7], seed=10):
        out = engine.generate(prompt, max_new_tokens=19, eos_token_id=[])
        assert torch.equal(out.sequences, reference_generate(target, prompt, 19))
        assert max(out.accept_lengths) == 3


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_greedy_equals_generate_gpt_oss_sinks(impl):
    """gpt-oss: attention sinks (one logit per head; strong ones here, so that they change the output),
    alternating sliding-window (4 tokens) and full layers, mixture-of-experts MLPs; the sequences run far
    past the window. The reference is transformers' eager attention."""
    target = gpt_oss_with_sinks()
    engine = SpeculativeDecoder(target, target, impl=impl, depth=3, topk=2, num_nodes=8)
    for prompt in prompts(128, [7], seed=11):
        out = engine.generate(prompt, max_new_tokens=16, eos_token_id=[])
        assert torch.equal(out.sequences, reference_generate(target, prompt, 16))
        assert max(out.accept_lengths) == 3


def test_greedy_with_draft_equal_to_target_accepts_whole_chains():
    """A perfect draft on a chain tree: every step accepts the whole chain (multi-token advance works)."""
    target, _ = models("llama")
    engine = SpeculativeDecoder(target, target, tree=[[0] * d for d in range(1, 5)], impl="torch")
    prompt = prompts(256, [5], seed=3)[0]
    out = engine.generate(prompt, max_new_tokens=21, eos_token_id=[])
    assert torch.equal(out.sequences, reference_generate(target, prompt, 21))
    assert out.accept_lengths == [4] * 4
    assert out.num_target_forwards == 5


@pytest.mark.parametrize("max_new_tokens, last_parents, last_accepted", [(8, [-1, 0, 0], 1), (7, [-1], 0)])
def test_a_static_tree_is_cut_to_what_can_still_be_kept(monkeypatch, max_new_tokens, last_parents, last_accepted):
    """A perfect draft: the prefill's token, then a step that accepts the whole chain (4 drafts + the bonus
    token) leaves 2 (or 1) tokens to go; the last tree keeps the nodes at depth <= 1 (0) with their ranks, and
    accepts 1 (0) drafts. Full trees accepted 4 drafts there and cut them, for the same output."""
    target, _ = models("llama")
    records = _record_drafts(monkeypatch)
    engine = SpeculativeDecoder(target, target, tree=[[0], [1], [0, 0], [1, 0], [0, 0, 0], [0, 0, 0, 0]],
                                impl="torch")
    prompt = prompts(256, [5], seed=3)[0]
    out = engine.generate(prompt, max_new_tokens=max_new_tokens, eos_token_id=[])
    assert torch.equal(out.sequences, reference_generate(target, prompt, max_new_tokens))
    assert out.accept_lengths == [4, last_accepted]
    assert out.num_target_forwards == 3
    assert [parents for _, parents, _ in records] == [[-1, 0, 0, 1, 2, 3, 5], last_parents]
    committed, _, tokens = records[-1]
    top = _lm_next_logprobs(target, committed).topk(2).indices.tolist()
    assert tokens == [committed[-1]] + top[: len(last_parents) - 1]


@pytest.mark.parametrize("draft_kind", ["lm", "fspad"])
def test_eos_inside_an_accepted_path(draft_kind):
    target, _ = models("llama")
    prompt = prompts(256, [4], seed=5)[0]
    free_run = reference_generate(target, prompt, 12)[0, prompt.shape[1]:].tolist()
    # An EOS the target emits at its 3rd new token, which a perfect chain draft accepts mid-path.
    eos = free_run[2]
    assert eos not in free_run[:2]
    draft = target if draft_kind == "lm" else make_head(target)
    tree = [[0] * d for d in range(1, 6)]
    engine = SpeculativeDecoder(target, draft, tree=tree, impl="torch")
    out = engine.generate(prompt, max_new_tokens=12, eos_token_id=eos)
    expected = reference_generate(target, prompt, 12, eos_token_id=eos)
    assert torch.equal(out.sequences, expected)
    assert out.sequences[0, -1].item() == eos
    if draft_kind == "lm":
        # The first step accepted 5 drafts past the EOS; they were cut like generate cuts them.
        assert out.accept_lengths == [5] and out.num_new_tokens == 3
    # eos_token_id=None falls back to the target's generation config, like generate.
    target.generation_config.eos_token_id = eos
    try:
        assert torch.equal(engine.generate(prompt, max_new_tokens=12).sequences, expected)
    finally:
        target.generation_config.eos_token_id = None


def test_streamer_gets_the_prompt_then_each_steps_tokens(capsys):
    """A transformers streamer gets what generate gives it: the prompt, the new tokens (several per step, as
    transformers' assisted decoding puts them, cut at an EOS inside an accepted path), then end(); a TextStreamer
    prints generate's text. A batch is refused, as transformers' streamers refuse it."""
    from transformers import TextStreamer
    from transformers.generation.streamers import BaseStreamer

    class Recorder(BaseStreamer):
        def __init__(self):
            self.events = []

        def put(self, value):
            self.events.append(value.clone())

        def end(self):
            self.events.append("end")

    target, _ = models("llama")
    prompt = prompts(256, [4], seed=5)[0]
    eos = reference_generate(target, prompt, 12)[0, 4 + 2].item()  # the 3rd new token, as in the EOS test
    engine = SpeculativeDecoder(target, target, tree=[[0] * d for d in range(1, 6)], impl="torch")
    ours, theirs = Recorder(), Recorder()
    out = engine.generate(prompt, max_new_tokens=12, eos_token_id=eos, streamer=ours)
    target.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=12,
                    eos_token_id=eos, pad_token_id=0, streamer=theirs)
    assert torch.equal(ours.events[0], prompt.cpu()) and ours.events[1:].count("end") == 1
    assert ours.events[-1] == "end" and theirs.events[-1] == "end"
    new = ours.events[1:-1]
    assert all(put.device.type == "cpu" and put.dim() == 2 and put.shape[0] == 1 for put in new)
    assert not any(put.is_inference() for put in new)  # a streamer may update them in place, as generate's
    assert len(new) == out.num_target_forwards == 2  # the prefill's token, then the step's two (cut at the EOS)
    streamed = torch.cat(new, dim=1)
    assert torch.equal(streamed, out.sequences[:, prompt.shape[1]:].cpu())
    assert torch.equal(streamed, torch.cat([put.view(1, -1) for put in theirs.events[1:-1]], dim=1))
    tokenizer = word_tokenizer(256)
    capsys.readouterr()
    longer = prompts(256, [6], seed=6)[0]
    engine.generate(longer, max_new_tokens=15, eos_token_id=[], streamer=TextStreamer(tokenizer))
    printed = capsys.readouterr().out
    target.generate(longer, attention_mask=torch.ones_like(longer), do_sample=False, max_new_tokens=15,
                    pad_token_id=0, streamer=TextStreamer(tokenizer))
    assert printed == capsys.readouterr().out and len(printed.split()) == 6 + 15
    with pytest.raises(ValueError, match="streamer streams one sequence .* batch size 2"):
        engine.generate(torch.cat([prompt, prompt]), max_new_tokens=3, streamer=Recorder())
    with pytest.raises(TypeError, match="streamer must have put\\(\\) and end\\(\\).* lacks put\\(\\) and end\\(\\)"):
        engine.generate(prompt, max_new_tokens=3, streamer=print)


def test_eos_as_first_token_and_max_new_tokens_one():
    target, draft = models("qwen2")
    prompt = prompts(320, [3], seed=7)[0]
    first = reference_generate(target, prompt, 1)[0, -1].item()
    engine = SpeculativeDecoder(target, draft, impl="torch", **DYNAMIC_TREE)
    out = engine.generate(prompt, max_new_tokens=10, eos_token_id=first)
    assert torch.equal(out.sequences, reference_generate(target, prompt, 10, eos_token_id=first))
    assert out.num_target_forwards == 1 and out.accept_lengths == []
    out = engine.generate(prompt, max_new_tokens=1, eos_token_id=[])
    assert out.sequences.shape[1] == prompt.shape[1] + 1 and out.num_target_forwards == 1
    # Every phase is in timings, 0 where it did not run (a KeyError before for a run with no verification step).
    assert set(out.timings) == {"prefill", "draft", "tree", "target", "verify", "compaction", "total"}
    assert out.timings["verify"] == 0.0 and out.timings["prefill"] > 0.0
    # A NumPy id is an id, as in generate (it was iterated: TypeError).
    out = engine.generate(prompt, max_new_tokens=10, eos_token_id=np.int64(first))
    assert torch.equal(out.sequences, reference_generate(target, prompt, 10, eos_token_id=first))
    with pytest.raises(TypeError, match="eos_token_id must be an int, got float"):
        engine.generate(prompt, max_new_tokens=10, eos_token_id=[first, 2.0])


@pytest.mark.parametrize("field, value, sampling", [
    ("num_beams", 2, False), ("num_beams", 2, True), ("guidance_scale", 1.5, False), ("forced_bos_token_id", 0, False),
    ("penalty_alpha", 0.6, False), ("dola_layers", "low", False),
])
def test_generation_config_processors_the_engine_does_not_apply_are_refused(field, value, sampling):
    """generate applies these generation_config fields (beam search, guidance, forced_bos_token_id, contrastive
    search's penalty_alpha and DoLa's dola_layers, which the engine ignored until a review, 2026-12-06), greedy or
    sampling, the engine does not: a ValueError naming the field, instead of an output that silently differed from
    generate's. Neutral values are accepted. A token id of 0 is a setting, not a neutral value;
    forced_bos_token_id acts (and is refused) on a one-token prompt only. (Every other logits processor and
    warper is applied: see the repetition-penalty, min_new_tokens, tests/test_generation_rules.py and
    tests/test_speculative_warpers.py tests.)"""
    target, draft = models("qwen2")
    prompt = prompts(320, [1 if field == "forced_bos_token_id" else 5], seed=8)[0]
    engine = SpeculativeDecoder(target, draft, impl="torch", **DYNAMIC_TREE)
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    kwargs = dict(temperature=1.0, generator=generator) if sampling else {}
    before = getattr(target.generation_config, field)
    setattr(target.generation_config, field, value)
    try:
        message = re.escape(f"generation_config sets {field}={value!r}: target.generate applies it")
        with pytest.raises(ValueError, match=message):
            engine.generate(prompt, max_new_tokens=8, **kwargs)
    finally:
        setattr(target.generation_config, field, before)
    neutral = {"num_beams": 1, "guidance_scale": 1.0, "typical_p": 1.0}.get(field, None)
    setattr(target.generation_config, field, neutral)
    try:
        assert torch.equal(engine.generate(prompt, max_new_tokens=8).sequences, reference_generate(target, prompt, 8))
    finally:
        setattr(target.generation_config, field, before)
    if field == "forced_bos_token_id":  # it does not act on a longer prompt: accepted, and equal to generate
        longer = prompts(320, [4], seed=9)[0]
        setattr(target.generation_config, field, value)
        try:
            assert torch.equal(engine.generate(longer, max_new_tokens=8).sequences,
                               reference_generate(target, longer, 8))
        finally:
            setattr(target.generation_config, field, before)


# --------------------------------------------------------------------------------------------------
# Repetition penalty: applied as generate applies it
# --------------------------------------------------------------------------------------------------


def hf_penalized(logits_row: torch.Tensor, held: list[int], penalty: float) -> torch.Tensor:
    """transformers' own processor on one row (fp32, as generate applies it) for a sequence holding ``held``."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    processor = RepetitionPenaltyLogitsProcessor(float(penalty))
    return processor(torch.tensor([held], dtype=torch.int64), logits_row.detach().float().cpu()[None].clone())[0]


def _node_path(parents: list[int], node: int) -> list[int]:
    path = [node]
    while parents[path[-1]] >= 0:
        path.append(parents[path[-1]])
    return path[::-1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("penalty", [0.5, 1.7])
def test_repetition_penalized_equals_transformers_processor_at_every_node(penalty, dtype):
    """Every node row equals transformers' RepetitionPenaltyLogitsProcessor on the sequence up to that node: the
    committed tokens (the root included) and the drafts on the node's path. A vocabulary of 6 makes tokens repeat
    along paths, among the committed tokens and between the two; one tree per sequence and one shared tree."""
    generator = torch.Generator().manual_seed(0)
    vocab, batch = 6, 3

    def draw(high, size=()):
        return torch.randint(0, high, size, generator=generator)

    for trial in range(12):
        num_nodes = int(draw(20)) + 1
        parents = [[-1] + [int(draw(i)) for i in range(1, num_nodes)] for _ in range(1 if trial % 2 else batch)]
        tree = build_tree(torch.tensor(parents), device=DEVICE)
        tokens = draw(vocab, (batch, num_nodes))
        committed = [draw(vocab, (int(draw(4)),)).tolist() + [int(tokens[b, 0])] for b in range(batch)]
        seen = torch.zeros(batch, vocab, dtype=torch.bool)
        for b, row in enumerate(committed):
            seen[b, row] = True
        logits = (torch.randn(batch, num_nodes, vocab, generator=generator) * 3).to(dtype).to(DEVICE)
        given = logits.clone()
        got = speculative.repetition_penalized(logits, penalty, seen.to(DEVICE), tree, tokens.to(DEVICE))
        assert got.dtype == torch.float32 and torch.equal(logits, given)
        for b in range(batch):
            for node in range(num_nodes):
                path = _node_path(parents[b % len(parents)], node)
                held = committed[b] + [int(tokens[b, j]) for j in path[1:]]
                assert torch.equal(got[b, node].cpu(), hf_penalized(logits[b, node], held, penalty)), (trial, b, node)


@pytest.mark.parametrize("tree_kind", ["dynamic", "static"])
@pytest.mark.parametrize("draft_kind", ["lm", "fspad"])
def test_greedy_with_repetition_penalty_equals_generate(draft_kind, tree_kind):
    """``repetition_penalty`` given to generate (> 1 penalises, < 1 rewards repetition) or read from the target's
    generation_config (as generate reads it): token for token ``generate``'s output with that penalty, which
    differs from the output without it. Without the drafts on each node's path in the penalty, 2 of the draft
    LM's 5 prompts at 1.3 go wrong."""
    target, draft_lm = models("llama")
    draft = draft_lm if draft_kind == "lm" else make_head(target)
    tree = dict(tree=STATIC_TREE) if tree_kind == "static" else dict(depth=4, topk=4, num_nodes=16)
    engine = SpeculativeDecoder(target, draft, impl="torch", **tree)
    lengths, max_new = ([1, 3, 5, 9, 12], 24) if draft_kind == "lm" else ([1, 9], 12)
    changed = 0
    for penalty in (1.3, 0.6, "generation_config"):
        for prompt in prompts(256, lengths, seed=3):
            if penalty == "generation_config":
                target.generation_config.repetition_penalty = 1.3
                try:
                    out = engine.generate(prompt, max_new_tokens=max_new, eos_token_id=[])
                    expected = reference_generate(target, prompt, max_new)
                finally:
                    target.generation_config.repetition_penalty = 1.0
            else:
                out = engine.generate(prompt, max_new_tokens=max_new, eos_token_id=[], repetition_penalty=penalty)
                expected = target.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                           max_new_tokens=max_new, pad_token_id=0, repetition_penalty=penalty)
            assert torch.equal(out.sequences, expected), (penalty, out.sequences, expected)
            changed += not torch.equal(expected, reference_generate(target, prompt, max_new))
    assert changed >= len(lengths)
    # 1 (no penalty) and the config's own neutral value leave the output as it is without the argument.
    prompt = prompts(256, [5], seed=4)[0]
    assert torch.equal(engine.generate(prompt, max_new_tokens=8, repetition_penalty=1).sequences,
                       reference_generate(target, prompt, 8))


def test_drafts_follow_the_penalty_on_committed_tokens(monkeypatch):
    """The drafts are ranked with the penalty on each sequence's committed tokens: with the target as its own draft
    on a chain, the root's child is then the target's own penalised choice, so every step accepts at least one
    draft (the drafts below it leave the path's tokens out of their penalty and may be rejected). Unpenalised
    drafts miss it wherever the penalty moves the target's choice."""
    target, _ = models("llama")
    chain = [[0] * depth for depth in range(1, 5)]

    def accepted(prompt):
        engine = SpeculativeDecoder(target, target, tree=chain, impl="torch")
        out = engine.generate(prompt, max_new_tokens=40, eos_token_id=[], repetition_penalty=1.3)
        expected = target.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=40,
                                   pad_token_id=0, repetition_penalty=1.3)
        assert torch.equal(out.sequences, expected)
        return out.accept_lengths[:-1]  # the last step may be cut by the token budget

    rows = prompts(256, [1, 4, 9], seed=11)
    assert all(min(accepted(prompt)) >= 1 for prompt in rows)
    monkeypatch.setattr(speculative, "_PenalizedDrafter", lambda drafter, penalize: drafter)
    assert any(min(accepted(prompt)) == 0 for prompt in rows)


# --------------------------------------------------------------------------------------------------
# min_new_tokens / min_length, suppress_tokens / begin_suppress_tokens: applied as generate applies them
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tree_kind", ["dynamic", "static"])
@pytest.mark.parametrize("draft_kind", ["lm", "fspad"])
def test_min_new_tokens_and_suppressed_tokens_equal_generate(draft_kind, tree_kind):
    """An EOS the target emits as its 3rd new token: ``min_new_tokens`` (argument or generation config) and the
    config's ``min_length`` hold it back exactly as long as generate does (then the output goes on past it); the
    config's ``suppress_tokens`` and ``begin_suppress_tokens`` change the output as they change generate's."""
    target, draft_lm = models("llama")
    draft = draft_lm if draft_kind == "lm" else make_head(target)
    tree = dict(tree=STATIC_TREE) if tree_kind == "static" else DYNAMIC_TREE
    engine = SpeculativeDecoder(target, draft, impl="torch", **tree)
    prompt = prompts(256, [4], seed=5)[0]
    free_run = reference_generate(target, prompt, 20)[0, 4:].tolist()
    eos = free_run[2]
    cases = [({"min_new_tokens": n}, {"min_new_tokens": n}) for n in (2, 3, 7)] + [
        # EOS as the first new token (banned at the prefill), and a list of EOS ids banned together.
        ({"min_new_tokens": 1, "eos_token_id": free_run[0]}, {"min_new_tokens": 1, "eos_token_id": free_run[0]}),
        ({"min_new_tokens": 4, "eos_token_id": [eos, free_run[0]]},
         {"min_new_tokens": 4, "eos_token_id": [eos, free_run[0]]}),
        # A suppressed id the free run emits later (at a tree node, not at the prefill; no EOS to stop before).
        ({"eos_token_id": None}, {"config": {"suppress_tokens": free_run[3:4]}, "eos_token_id": None}),
        ({}, {"config": {"min_new_tokens": 5}}), ({}, {"config": {"min_length": 4 + 6}}),
        ({}, {"config": {"suppress_tokens": free_run[:2]}}), ({}, {"config": {"begin_suppress_tokens": free_run[:1]}}),
        ({}, {"config": {"begin_suppress_tokens": free_run[1:2]}}),  # only the first new token: output unchanged
        ({"min_new_tokens": 0}, {"config": {"min_new_tokens": 5}, "min_new_tokens": 0}),  # the argument wins
        # A min_new_tokens that is set (0 too) replaces min_length, in generate and here.
        ({}, {"config": {"min_new_tokens": 0, "min_length": 4 + 6}}),
        ({"min_new_tokens": 1}, {"config": {"min_length": 4 + 6}, "min_new_tokens": 1}),
    ]
    lengths = set()
    for ours, theirs in cases:
        config = theirs.pop("config", {})
        before = {name: getattr(target.generation_config, name) for name in config}
        for name, value in config.items():
            setattr(target.generation_config, name, value)
        try:
            out = engine.generate(prompt, max_new_tokens=20, **{"eos_token_id": eos, **ours})
            expected = target.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                       max_new_tokens=20, pad_token_id=0, **{"eos_token_id": eos, **theirs})
        finally:
            for name, value in before.items():
                setattr(target.generation_config, name, value)
        assert torch.equal(out.sequences, expected), (ours, config, out.sequences, expected)
        lengths.add(out.num_new_tokens)
        if config.get("suppress_tokens") == free_run[:2] or config.get("begin_suppress_tokens") == free_run[:1]:
            assert not torch.equal(expected[0, 4:5], torch.tensor(free_run[:1], device=DEVICE))
        if config.get("suppress_tokens") == free_run[3:4]:
            assert torch.equal(expected[0, 4:7], torch.tensor(free_run[:3], device=DEVICE))
            assert free_run[3] not in expected[0, 4:].tolist()
    assert {3, 20} <= lengths  # an EOS let through (min 2, 3) and one held back to the token budget


def test_min_new_tokens_in_a_batch_and_when_sampling(monkeypatch):
    """A left-padded batch: each row holds its EOS back for ``min_new_tokens`` as generate does alone and batched,
    and ``min_length`` counts each row's own prompt. Sampling: the first three tokens follow generate's
    distribution with EOS (here the likeliest first token) banned from the first two; banning it at the prefill
    only (not at tree nodes) fails the test."""
    from .test_speculative_batch import expected_rows, left_padded

    target, draft = models("llama")
    rows = prompts(256, [3, 9, 1, 6], seed=41)
    ids, mask = left_padded(rows)
    eos = reference_generate(target, rows[2], 8)[0, 3].item()  # row 2's third new token
    engine = SpeculativeDecoder(target, draft, impl="torch", **DYNAMIC_TREE)
    # min_new_tokens 2 lets row 2's EOS (its 3rd new token) through; counted from the longest prompt it would not.
    for name, value in (("min_new_tokens", 2), ("min_new_tokens", 5), ("min_length", 9)):
        before = getattr(target.generation_config, name)
        setattr(target.generation_config, name, value)
        try:
            out = engine.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
            expected = expected_rows(target, rows, ids, 12, eos=eos, pad=0)
            assert torch.equal(out.sequences, expected), (name, out.sequences, expected)
            if name == "min_new_tokens":  # generate's batch counts new tokens alike in every row
                batched = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=12,
                                          pad_token_id=0, eos_token_id=eos)
                assert torch.equal(out.sequences[:, : batched.shape[1]], batched)
        finally:
            setattr(target.generation_config, name, before)

    prompt = prompts(256, [5], seed=20)[0]
    temperature, top_k, samples = 1.3, 3, 240

    def ban(logits, held, step):
        return logits.index_fill(0, torch.tensor([eos]), -math.inf) if step < 2 else logits

    def second_token_mass(candidate):  # P(the 2nd token is candidate | it was banned from the 1st)
        outcomes = _sequence_distribution(target, prompt, 2, temperature, top_k,
                                          lambda logits, held, step: ban(logits, held, 1 + step))
        return sum(mass for tokens, mass in outcomes.items() if tokens[1] == candidate)

    with torch.no_grad():  # EOS: of the likeliest first tokens, the likeliest second token once banned first
        candidates = torch.topk(target(prompt).logits[0, -1], 6).indices.tolist()
    masses = {}
    for eos in candidates:
        masses[eos] = second_token_mass(eos)
    eos = max(masses, key=masses.get)
    assert masses[eos] > 0.1  # the mutation below then ends a third of its samples early
    expected = _sequence_distribution(target, prompt, 3, temperature, top_k, ban)
    chain = SpeculativeDecoder(target, target, depth=2, topk=3, num_nodes=6, impl="torch")
    kwargs = dict(eos_token_id=eos, min_new_tokens=2)
    assert _sequence_sampling_pvalue(chain, prompt, expected, samples, temperature, top_k, seed=0, **kwargs) > 1e-3
    real = speculative._Generation._banned
    monkeypatch.setattr(speculative._Generation, "_banned",
                        lambda self, logits, positions, *tree: logits if positions is not None
                        else real(self, logits, None, *tree))
    assert _sequence_sampling_pvalue(chain, prompt, expected, samples // 2, temperature, top_k, seed=1, **kwargs) < 1e-3


def test_min_new_tokens_with_triton_kernels_and_bad_values():
    target, draft = models("qwen2")
    engine = SpeculativeDecoder(target, draft, tree=[[0], [1], [0, 0], [0, 0, 0]], impl="triton")
    prompt = prompts(320, [6], seed=5)[0]
    eos = reference_generate(target, prompt, 4)[0, 6 + 1].item()  # the 2nd new token
    out = engine.generate(prompt, max_new_tokens=8, eos_token_id=eos, min_new_tokens=4)
    expected = target.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=8,
                               pad_token_id=0, eos_token_id=eos, min_new_tokens=4)
    assert torch.equal(out.sequences, expected) and out.num_new_tokens > 2
    with pytest.raises(ValueError, match="min_new_tokens must be >= 0, got -1"):
        engine.generate(prompt, max_new_tokens=3, min_new_tokens=-1)
    with pytest.raises(TypeError, match="min_new_tokens must be"):
        engine.generate(prompt, max_new_tokens=3, min_new_tokens=2.0)
    before = target.generation_config.suppress_tokens
    target.generation_config.suppress_tokens = [5, 320]
    try:
        with pytest.raises(ValueError, match=r"generation_config.suppress_tokens must hold token ids in \[0, 320\), "
                                             r"got 320"):
            engine.generate(prompt, max_new_tokens=3)
    finally:
        target.generation_config.suppress_tokens = before


def test_repetition_penalty_with_triton_kernels_and_bad_values():
    target, draft = models("qwen2")
    engine = SpeculativeDecoder(target, draft, tree=[[0], [1], [0, 0], [0, 0, 0]], impl="triton")
    prompt = prompts(320, [6], seed=5)[0]
    out = engine.generate(prompt, max_new_tokens=8, eos_token_id=[], repetition_penalty=1.4)
    expected = target.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=8,
                               pad_token_id=0, repetition_penalty=1.4)
    assert torch.equal(out.sequences, expected)
    for bad in (0, -1.0, math.inf):
        with pytest.raises(ValueError, match=r"repetition_penalty must be in \(0.0, inf\), got"):
            engine.generate(prompt, max_new_tokens=3, repetition_penalty=bad)
    with pytest.raises(TypeError, match="repetition_penalty must be a Python int or float"):
        engine.generate(prompt, max_new_tokens=3, repetition_penalty=torch.tensor(1.2))
    target.generation_config.repetition_penalty = -0.5
    try:
        with pytest.raises(ValueError, match=r"target.generation_config.repetition_penalty must be in"):
            engine.generate(prompt, max_new_tokens=3)
    finally:
        target.generation_config.repetition_penalty = 1.0


# --------------------------------------------------------------------------------------------------
# Caches and drafts
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("draft_kind, impl", [("lm", "torch"), ("fspad", "torch"), ("lm", "triton")])
def test_cache_after_each_step_equals_a_plain_forward(draft_kind, impl):
    """Also the Triton path, which compacts every layer in one launch (layer addresses in a table)."""
    target, draft_lm = models("qwen2")
    draft = draft_lm if draft_kind == "lm" else make_head(target)
    engine = SpeculativeDecoder(target, draft, impl=impl, **DYNAMIC_TREE)
    checked = []

    def check(sequences, cache):
        committed = sequences[:, :-1]  # the last token is the next root, not in the cache yet
        with torch.no_grad():
            out = target(committed, use_cache=True)
        fresh = out.cache if hasattr(out, "cache") else out.past_key_values
        assert cache.get_seq_length() == committed.shape[1]
        for layer, expected in zip(cache.layers, fresh.layers):
            assert_close(layer.keys, expected.keys, torch.float32)
            assert_close(layer.values, expected.values, torch.float32)
        checked.append(committed.shape[1])

    prompt = prompts(320, [6], seed=11)[0]
    out = engine.generate(prompt, max_new_tokens=20 if impl == "torch" else 8, eos_token_id=[], step_callback=check)
    assert len(checked) == 1 + len(out.accept_lengths)
    assert checked[0] == 6 and checked[-1] == out.sequences.shape[1] - 1


def _record_drafts(monkeypatch):
    """Record (committed tokens, tree, draft tokens) of every drafting step."""
    records = []
    original = speculative._Generation._draft

    def recording(self, root_logits, root_state, roots, root_pos, caps):
        tree, tokens, positions = original(self, root_logits, root_state, roots, root_pos, caps)
        assert torch.equal(positions, tree.depth + root_pos)
        records.append((list(self.rows[0]), tree.parents[0].tolist(), tokens[0].tolist()))
        return tree, tokens, positions

    monkeypatch.setattr(speculative._Generation, "_draft", recording)
    return records


def _lm_next_logprobs(draft, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(draft(torch.tensor([tokens], device=DEVICE)).logits[0, -1].float(), -1)


def _head_next_logprobs(head, target, committed: list[int], path: list[int]) -> torch.Tensor:
    """The head's distribution after ``committed`` then the tree ``path`` (tokens below the root), computed
    without cache: true target features for the committed entries, then each entry's predicted feature."""
    embed, lm_head = target.get_input_embeddings(), target.get_output_embeddings()
    with torch.no_grad():
        features, _ = target_features(target, torch.tensor([committed[:-1]], device=DEVICE))
        tokens = committed[1:]
        regress, predict = head(features, embed(torch.tensor([tokens], device=DEVICE)))
        for token in path:
            features = torch.cat([features, regress[:, -1:]], dim=1)
            tokens = tokens + [token]
            regress, predict = head(features, embed(torch.tensor([tokens], device=DEVICE)))
        return torch.log_softmax(lm_head(predict[0, -1]).float(), -1)


def check_draft_choices(draft, target, committed: list[int], parents: list[int], tokens: list[int], static: bool):
    """Each child of a node drafts the rank-r token (static trees) or one of the ``topk`` best tokens (dynamic
    trees) of the draft's own distribution after ``committed`` and the node's path, computed without cache (a
    draft LM, or an FSPAD head on ``target``'s features)."""
    assert tokens[0] == committed[-1]
    children: dict[int, list[int]] = {}
    for node in range(1, len(parents)):
        children.setdefault(parents[node], []).append(node)
    for parent, kids in children.items():
        path = []
        node = parent
        while node > 0:
            path.insert(0, tokens[node])
            node = parents[node]
        if isinstance(draft, FSPADDraftHead):
            logprobs = _head_next_logprobs(draft, target, committed, path)
        else:
            logprobs = _lm_next_logprobs(draft, committed + path)
        order = torch.argsort(logprobs, descending=True).tolist()
        for rank, kid in enumerate(kids):
            if static:
                # Allow a float tie between neighbouring ranks, nothing more.
                assert abs(logprobs[tokens[kid]] - logprobs[order[rank]]) < 1e-4, (parent, rank)
            else:
                assert logprobs[tokens[kid]] >= logprobs[order[DYNAMIC_TREE["topk"] - 1]] - 1e-4
        assert len({tokens[kid] for kid in kids}) == len(kids)  # siblings draft distinct tokens


@pytest.mark.parametrize("tree_kind", ["dynamic", "static"])
@pytest.mark.parametrize("draft_kind", ["lm", "fspad"])
def test_drafted_tokens_are_the_drafts_top_choices_along_each_path(monkeypatch, draft_kind, tree_kind):
    """Each node's token is one of the ``topk`` best of the draft's own distribution after the node's path
    (the rank-r token for a static tree): checks the draft caches, tree attention and feature feedback."""
    target, draft_lm = models("llama")
    draft = draft_lm if draft_kind == "lm" else make_head(target)
    tree = dict(tree=STATIC_TREE) if tree_kind == "static" else DYNAMIC_TREE
    records = _record_drafts(monkeypatch)
    engine = SpeculativeDecoder(target, draft, impl="torch", **tree)
    engine.generate(prompts(256, [5], seed=13)[0], max_new_tokens=14, eos_token_id=[])
    assert len(records) >= 3
    for committed, parents, tokens in records[:3]:
        check_draft_choices(draft, target, committed, parents, tokens, static=tree_kind == "static")


def test_dynamic_tree_shape(monkeypatch):
    """EAGLE-2 tree: num_nodes nodes, depth <= depth, at most topk children per node, parents first; near
    max_new_tokens, a step that can keep r more tokens drafts r - 1 levels (fewer candidates)."""
    target, draft = models("llama")
    records = _record_drafts(monkeypatch)
    SpeculativeDecoder(target, draft, depth=3, topk=2, num_nodes=6, impl="torch").generate(
        prompts(256, [4], seed=17)[0], max_new_tokens=8, eos_token_id=[])
    assert records
    levels = []
    for committed, parents, _ in records:
        tree = build_tree(torch.tensor(parents))  # validates parents[i] < i
        levels.append(min(3, 8 - (len(committed) - 4) - 1))
        # 2 + 2*2 + 2*2 = 10 candidates at 3 levels, the best 5 kept; 2 + 2*2 at 2; 2 at 1 level; none at 0
        assert tree.num_nodes == [1, 3, 6, 6][levels[-1]]
        assert tree.max_depth <= levels[-1] and tree.max_children <= 2
    assert levels[0] == 3 and levels[-1] < 3  # full trees, then the cut


# --------------------------------------------------------------------------------------------------
# EAGLE-2 drafting on the device vs the host bookkeeping it replaced
# --------------------------------------------------------------------------------------------------


class _DynamicTree:
    """The engine's former host-side EAGLE-2 bookkeeping (one device-to-host read per level), kept as the
    reference of :class:`distill_ops.speculative._DynamicPlan`.

    Candidate ``c`` has ``scores[c]`` (sum of draft log-probs along its path, Python floats),
    ``tokens[c]``, ``parents[c]`` (a candidate, ``-1`` for the root) and ``depths[c]``. The draft model's
    own tree is the root plus the expanded candidates, in expansion order (``draft_parents``).
    """

    def __init__(self, topk: int, num_nodes: int):
        self.topk, self.num_nodes = topk, num_nodes
        self.scores: list[float] = []
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.depths: list[int] = []
        self.frontier: list[int] = []
        self.draft_parents = [-1]  # node 0: the committed root
        self.node_of = {-1: 0}  # candidate -> its node in the draft model's tree

    def add_children(self, parent_ids: list[int], values: list[list[float]], tokens: list[list[int]],
                     level: int) -> None:
        """``values[i]`` / ``tokens[i]``: the ``k`` best log-probs and their tokens after ``parent_ids[i]``."""
        self.frontier = []
        for row_values, row_tokens, parent in zip(values, tokens, parent_ids):
            base = self.scores[parent] if parent >= 0 else 0.0
            for value, token in zip(row_values, row_tokens):
                self.frontier.append(len(self.scores))
                self.scores.append(base + value)
                self.tokens.append(token)
                self.parents.append(parent)
                self.depths.append(level)

    def expand_best(self) -> tuple[list[int], list[int]]:
        """The ``topk`` best candidates of the newest level, appended to the draft model's tree; returns
        them and each one's parent node in that tree."""
        expanded = sorted(self.frontier, key=lambda c: (-self.scores[c], c))[: self.topk]
        parent_rows = [self.node_of[self.parents[c]] for c in expanded]
        for cand, parent_row in zip(expanded, parent_rows):
            self.node_of[cand] = len(self.draft_parents)
            self.draft_parents.append(parent_row)
        return expanded, parent_rows

    def select(self) -> tuple[list[int], list[int]]:
        """The verification tree: the root and the ``num_nodes - 1`` best candidates, breadth-first; returns
        its parent array and its tokens (entry 0, the root, is a placeholder)."""
        kept = sorted(range(len(self.scores)), key=lambda c: (-self.scores[c], c))[: self.num_nodes - 1]
        kept.sort(key=lambda c: (self.depths[c], c))
        node_of = {-1: 0}
        parents, tokens = [-1], [0]
        for cand in kept:
            node_of[cand] = len(parents)
            parents.append(node_of[self.parents[cand]])
            tokens.append(self.tokens[cand])
        return parents, tokens


class _RecordingDrafter:
    """A fake drafter: random logits for each expanded level (few distinct values: exact ties), states that
    identify a node (its token; the root's is -1) so that the parent states given back can be checked."""

    def __init__(self, vocab: int, kind: str, seed: int):
        self.vocab, self.kind = vocab, kind
        self.generator = torch.Generator().manual_seed(seed)
        self.calls = []

    def logits(self, rows: int) -> torch.Tensor:
        if self.kind == "ties":  # log-probs repeat within and across rows, so do cumulative scores
            logits = torch.randint(0, 3, (rows, self.vocab), generator=self.generator).float()
        elif self.kind == "peaked":  # the top token has log-prob exactly 0: a child ties its parent's score
            logits = torch.randint(0, 3, (rows, self.vocab), generator=self.generator).float()
            top = torch.randint(0, self.vocab, (rows, 1), generator=self.generator)
            logits.scatter_(1, top, 200.0)
        elif self.kind == "nan":  # a broken draft: rows holding NaN (read as -inf log-probs), ties elsewhere
            logits = torch.randint(0, 3, (rows, self.vocab), generator=self.generator).float()
            broken = torch.rand(rows, generator=self.generator) < 0.5
            logits[broken, self.vocab // 2] = float("nan")
            logits[0, 1] = float("nan")  # (the root's row too)
        else:  # "masked": most tokens impossible (-inf log-probs once the finite ones are used up)
            logits = torch.randint(0, 2, (rows, self.vocab), generator=self.generator).float()
            logits[:, 2:] = float("-inf")
        return logits.to(DEVICE)

    def expand(self, tokens, parent_states, positions, tree):  # one sequence: [1, E]
        logits = self.logits(tokens.shape[1])
        self.calls.append((tokens[0].tolist(), positions[0].tolist(), parent_states[0, :, 0].tolist(), tree, logits))
        return logits[None], tokens.to(torch.float32)[..., None]


def _host_eagle2(root_logits, level_logits, topk, depth, num_nodes):
    """The former engine loop: host reads of each level's top-k, :class:`_DynamicTree` bookkeeping."""
    builder = _DynamicTree(topk, num_nodes)
    logits, expanded, levels = root_logits[None], [-1], []
    for level in range(1, depth + 1 if num_nodes > 1 else 1):
        k = min(topk, logits.shape[-1])
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        values, indices = torch.topk(log_probs.masked_fill(log_probs.isnan(), float("-inf")), k, dim=-1)
        builder.add_children(expanded, values.tolist(), indices.tolist(), level)
        if level == depth:
            break
        expanded, parent_rows = builder.expand_best()
        levels.append(([builder.tokens[c] for c in expanded], parent_rows, list(builder.draft_parents)))
        logits = level_logits[level - 1]
    parents, tokens = builder.select()
    return levels, parents, tokens


_EAGLE2_CASES = [
    (5, 4, 32, 50, "ties"),  # the engine's default shape
    (4, 3, 12, 40, "peaked"),
    (6, 16, 200, 64, "ties"),  # draft tree of 81 nodes and verification tree of 200: two and four words
    (3, 8, 100, 30, "masked"),
    (4, 5, 40, 3, "ties"),  # vocabulary smaller than topk: k = 3, later levels expand 5 nodes
    (2, 2, 50, 20, "ties"),  # num_nodes larger than the 6 candidates: all kept
    (1, 4, 8, 20, "peaked"),  # one level: no draft forward
    (3, 2, 1, 20, "ties"),  # a one-node tree: nothing drafted
    # Fewer nodes after the root than k (T - 1 < k): the final kernel ranks keep = T - 1 contenders per row, so
    # contender q and candidate 1 + row * k + position differ in stride (elsewhere keep == k).
    (4, 6, 3, 20, "peaked"),
    (3, 8, 4, 30, "peaked"),  # every top token scores 0: the last node lies in row 9 of 17
    # T = depth + 2 with "peaked" logits: the root and the best chain are the T - 1 contenders of score 0, and a
    # padding lane of the final kernel's tile (score 0, an index past every candidate) also has rank T - 1.
    (3, 3, 5, 40, "peaked"),
    (4, 2, 6, 30, "peaked"),
    # NaN draft log-probs read as -inf on both paths (the kernels' pairwise ranks were no total order with NaN).
    (4, 3, 12, 40, "nan"),
    (3, 4, 20, 12, "nan"),
]


@pytest.mark.parametrize(
    "depth, topk, num_nodes, vocab, kind, seed, impl",
    [
        (*case, seed, impl)
        for impl in ("torch", "triton")
        for case in _EAGLE2_CASES
        for seed in (0, 1)
        # The 200-node tree takes ~20 s per run under the interpreter: one seed on the Triton path.
        if not (impl == "triton" and case[2] == 200 and seed == 1)
    ],
)
def test_device_eagle2_tree_equals_host_bookkeeping(depth, topk, num_nodes, vocab, kind, seed, impl):
    """Trees (draft model's per level and verification), tokens, positions, parent states and every spec
    field equal the host reference, with exact ties in draft log-probs and cumulative scores, on both
    paths (PyTorch ops; the Triton bookkeeping kernels and spec launches)."""
    drafter = _RecordingDrafter(vocab, kind, seed)
    plan = speculative._DynamicPlan(topk, depth, num_nodes, vocab, DEVICE, impl)
    root_logits = drafter.logits(1)[0]
    root_token, root_pos = 7, 11
    timer = speculative._Timer(DEVICE, sync=False)
    tree, tokens = plan.draft(drafter, root_logits[None], torch.full((1, 1), -1.0, device=DEVICE), root_token,
                              root_pos, timer)
    levels, parents, expected_tokens = _host_eagle2(root_logits, [call[4] for call in drafter.calls], topk, depth,
                                                    num_nodes)
    assert len(drafter.calls) == len(levels) == (depth - 1 if num_nodes > 1 else 0)
    expected_tokens[0] = root_token
    node_tokens = [-1]
    for level, ((level_tokens, positions, parent_states, draft_tree, _), (ref_tokens, parent_rows, draft_parents)) in \
            enumerate(zip(drafter.calls, levels), start=1):
        assert level_tokens == ref_tokens and positions == [root_pos + level] * len(ref_tokens)
        assert parent_states == [float(node_tokens[row]) for row in parent_rows]
        node_tokens += ref_tokens
        assert_spec_matches(draft_tree, build_tree(torch.tensor(draft_parents)))
        assert draft_tree.max_depth == level
    assert tokens.tolist() == [expected_tokens]
    assert_spec_matches(tree, build_tree(torch.tensor(parents)))


def test_device_eagle2_tree_comparison_has_power(monkeypatch):
    """An unstable sort (torch.topk's arbitrary order among tied scores) is caught by the reference."""
    real_sort = torch.sort

    def unstable_last_index_first(values, *args, stable=False, **kwargs):
        # Ties broken by the *higher* candidate index: what the rule must not do.
        flipped = real_sort(values.flip(-1), *args, stable=True, **kwargs)
        return torch.return_types.sort((flipped.values, values.shape[-1] - 1 - flipped.indices))

    monkeypatch.setattr(torch, "sort", unstable_last_index_first)
    with pytest.raises(AssertionError):
        test_device_eagle2_tree_equals_host_bookkeeping(5, 4, 32, 50, "ties", 0, "torch")


@pytest.mark.skipif(DEVICE.type == "cuda", reason="patches a kernel helper: only the interpreter sees it")
def test_device_eagle2_triton_comparison_has_power(monkeypatch):
    """Kernels that break score ties by the *higher* candidate index are caught by the reference."""
    from distill_ops.kernels import eagle_tree

    @triton.jit
    def last_index_first(score_j, cand_j, score_i, cand_i):
        same = score_j[None, :] == score_i[:, None]
        return tl.where(same, cand_j[None, :] > cand_i[:, None], score_j[None, :] > score_i[:, None])

    monkeypatch.setattr(eagle_tree, "_beats", last_index_first)
    with pytest.raises(AssertionError):
        test_device_eagle2_tree_equals_host_bookkeeping(5, 4, 32, 50, "ties", 0, "triton")


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("num_expand", [1, 2, 3])
def test_eagle_level_kernel_expands_fewer_nodes_than_k(seed, num_expand):
    """``eagle_level_forward`` with ``num_expand < k`` ranks ``keep = num_expand`` contenders per row (contender
    ``q`` is position ``q % keep`` of row ``q // keep``); every output equals a float64 brute force over all
    ``E * k`` candidates: score = parent node's score + value, "score descending, then candidate index". The engine
    never expands fewer than k nodes (each level expands min(topk, F_l) >= k), so the kernel is called directly."""
    from distill_ops.kernels.eagle_tree import eagle_level_forward, section_offsets

    k, num_rows, row_base, node_base, position = 5, 3, 1, 4, 9
    layout = (1 + (row_base + num_rows) * k, node_base + num_expand, 1)  # candidates, draft nodes, tree nodes
    float_offsets, int_offsets, float_size, int_size = section_offsets(*layout)
    generator = torch.Generator().manual_seed(seed)
    # Few distinct values: exact ties within and across rows, in parent scores and in sums.
    values = (-torch.randint(0, 3, (num_rows, k), generator=generator).float()).sort(dim=1, descending=True).values
    indices = torch.randint(0, 1000, (num_rows, k), generator=generator)
    parent_scores = -torch.randint(0, 3, (num_rows,), generator=generator).double()
    floats = torch.zeros(float_size, dtype=torch.float64)
    ints = torch.zeros(int_size, dtype=torch.int64)
    floats[float_offsets["node_scores"] + row_base: float_offsets["node_scores"] + row_base + num_rows] = parent_scores
    floats, ints = floats.to(DEVICE), ints.to(DEVICE)
    eagle_level_forward(values.to(DEVICE), indices.to(DEVICE), floats, ints, layout, row_base, node_base, num_expand,
                        position)
    floats, ints = floats.cpu(), ints.cpu()

    candidates = []  # (score, candidate index, row, position) in float64, candidate index 1 + node * k + position
    for row in range(num_rows):
        for column in range(k):
            score = float(parent_scores[row]) + float(values[row, column])
            candidates.append((score, 1 + (row_base + row) * k + column, row, column))
    for score, cand, row, column in candidates:
        assert floats[float_offsets["candidate_scores"] + cand].item() == score
        assert ints[int_offsets["candidate_tokens"] + cand].item() == indices[row, column].item()
    best = sorted(candidates, key=lambda c: (-c[0], c[1]))[:num_expand]
    section = lambda name: ints[int_offsets[name] + node_base: int_offsets[name] + node_base + num_expand].tolist()
    first_score = float_offsets["node_scores"] + node_base
    assert floats[first_score: first_score + num_expand].tolist() == [c[0] for c in best]
    assert section("node_candidates") == [c[1] for c in best]
    assert section("node_parents") == [row_base + c[2] for c in best]
    assert section("node_tokens") == [indices[c[2], c[3]].item() for c in best]
    assert section("node_positions") == [position] * num_expand


class _ReplayDrafter:
    """A drafter that reads nothing on the host: each level's logits were drawn beforehand; it keeps what
    it was given (tokens, positions, parent states, draft tree) as device tensors."""

    def __init__(self, level_logits):
        self.level_logits, self.calls = list(level_logits), []

    def expand(self, tokens, parent_states, positions, tree):  # one sequence: [1, E]
        self.calls.append((tokens.clone(), positions.clone(), parent_states.clone(), tree))
        logits = self.level_logits[len(self.calls) - 1]
        return logits[None], tokens.to(torch.float32)[..., None]


def _draft_with_both_paths(depth, topk, num_nodes, vocab, seed, timer):
    """The Triton path's draft and the PyTorch path's draft of the same logits."""
    source = _RecordingDrafter(vocab, "ties", seed)
    root_logits, level_logits = source.logits(1)[0], [source.logits(topk) for _ in range(depth)]
    results = []
    for impl in ("triton", "torch"):
        drafter = _ReplayDrafter(level_logits)
        plan = speculative._DynamicPlan(topk, depth, num_nodes, vocab, DEVICE, impl)
        tree, tokens = plan.draft(drafter, root_logits[None], torch.full((1, 1), -1.0, device=DEVICE), 7, 11,
                                  timer if impl == "triton" else speculative._Timer(DEVICE, sync=False))
        results.append((tree, tokens, drafter.calls))
    return results


def test_device_eagle2_triton_launches_per_step(no_host_reads, monkeypatch):
    """The Triton path's tree phase: per expanding level one bookkeeping launch and its spec, then the final
    selection and the verification spec; no host read, no allocation, no other op."""
    from distill_ops.kernels import eagle_tree
    from distill_ops.kernels import tree_spec as tree_spec_kernels

    launches = []
    for module, name in ((eagle_tree, "eagle_level_kernel"), (eagle_tree, "eagle_select_kernel"),
                         (tree_spec_kernels, "tree_spec_kernel")):
        recorder = _RecordingKernel(getattr(module, name))
        monkeypatch.setattr(module, name, recorder)
        launches.append((name, recorder))
    ops = []

    class TreeOps(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if in_tree and not any(recorder.running for _, recorder in launches):
                ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    in_tree = False

    @contextlib.contextmanager
    def tree_timer(phase):
        nonlocal in_tree
        assert phase == "tree"
        in_tree = True
        try:
            yield
        finally:
            in_tree = False

    depth = 5
    with TreeOps():
        (tree, tokens, calls), (ref_tree, ref_tokens, ref_calls) = _draft_with_both_paths(
            depth, 4, 32, 50, 3, tree_timer)
    assert [len(recorder.grids) for _, recorder in launches] == [depth - 1, 1, depth]
    assert all(grid == (1,) for _, recorder in launches for grid in recorder.grids)
    # Bookkeeping and specs write into buffers the plan allocated once, and the specs' views were made then too:
    # the tree phase of a step is its launches and nothing else.
    assert ops == [], ops
    assert_specs_equal(tree, ref_tree) and torch.equal(tokens, ref_tokens)
    for (got, want) in zip(calls, ref_calls):
        assert all(torch.equal(a, b) for a, b in zip(got[:3], want[:3]))
        assert_specs_equal(got[3], want[3])


def test_device_eagle2_triton_torch_compile_fullgraph():
    """The bookkeeping launches are opaque ops under ``torch.compile`` (no graph break), same results."""
    source = _RecordingDrafter(30, "ties", 5)
    root_logits, level_logits = source.logits(1)[0], source.logits(3)
    plan = speculative._DynamicPlan(3, 2, 8, 30, DEVICE, "triton")
    eager = speculative._DynamicPlan(3, 2, 8, 30, DEVICE, "torch")

    class Drafter:
        def expand(self, tokens, parent_states, positions, tree):
            return (self.logits + tokens[0, :, None])[None], None

    drafter = Drafter()
    drafter.logits = level_logits

    def draft(drafter_plan, root_logits):
        tree, tokens = drafter_plan.draft(drafter, root_logits[None], None, 7, 11,
                                          lambda phase: contextlib.nullcontext())
        return tree.parents, tree.depth, tree.ancestor_mask, tree.leaf_paths, tokens

    compiled = torch.compile(draft, fullgraph=True, backend="aot_eager")(plan, root_logits)
    for got, want in zip(compiled, draft(eager, root_logits)):
        assert torch.equal(got, want)


# --------------------------------------------------------------------------------------------------
# Sampling: lossless
# --------------------------------------------------------------------------------------------------


def _chi_square_pvalue(observed: torch.Tensor, expected_probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson chi-square p-value; bins with too small an expected count are merged into one."""
    total = observed.sum()
    expected = expected_probs.double() * total
    small = expected < min_expected
    obs = torch.cat([observed[~small].double(), observed[small].double().sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), stat / 2))


def _filtered_probs(logits: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    logits = logits.double()
    cut = torch.topk(logits, top_k).values[-1]
    return torch.softmax(torch.where(logits >= cut, logits / temperature, -math.inf), -1)


def _target_two_token_distribution(target, prompt, temperature, top_k) -> torch.Tensor:
    """Exact joint distribution of the first two sampled tokens, flattened ``[V * V]`` (sparse)."""
    vocab = target.config.vocab_size
    with torch.no_grad():
        first = _filtered_probs(target(prompt).logits[0, -1], temperature, top_k)
        joint = torch.zeros(vocab, vocab, dtype=torch.float64)
        for token in first.nonzero().flatten().tolist():
            extended = torch.cat([prompt, torch.tensor([[token]], device=DEVICE)], dim=1)
            second = _filtered_probs(target(extended).logits[0, -1], temperature, top_k)
            joint[token] = first[token].cpu() * second.cpu()
    return joint.flatten()


def _sample_two_tokens(engine, prompt, num_samples, temperature, top_k, seed) -> torch.Tensor:
    vocab = engine.vocab_size
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    counts = torch.zeros(vocab * vocab, dtype=torch.float64)
    for _ in range(num_samples):  # a third token: the second's step then drafts (see _sequence_sampling_pvalue)
        out = engine.generate(prompt, max_new_tokens=3, temperature=temperature, top_k=top_k,
                              eos_token_id=[], generator=generator)
        first, second = out.sequences[0, prompt.shape[1]:prompt.shape[1] + 2].tolist()
        counts[first * vocab + second] += 1
    return counts


def test_sampling_is_lossless_chi_square(monkeypatch):
    target, draft = models("llama")
    prompt = prompts(256, [5], seed=19)[0]
    # top_k=3 keeps the joint of two tokens to 9 outcomes: a few hundred samples give the test power.
    temperature, top_k, samples = 1.3, 3, 240
    expected = _target_two_token_distribution(target, prompt, temperature, top_k)
    engine = SpeculativeDecoder(target, draft, depth=2, topk=3, num_nodes=6, impl="torch")
    counts = _sample_two_tokens(engine, prompt, samples, temperature, top_k, seed=0)
    assert counts.sum() == samples
    assert _chi_square_pvalue(counts, expected) > 1e-3
    # The test has power: an off-by-one between tree nodes and logit rows (node i judged by the row of
    # node i + 1, a classic integration bug) fails it.
    real = speculative.verify_sampling
    monkeypatch.setattr(speculative, "verify_sampling",
                        lambda tree, tokens, logits, **kw: real(tree, tokens, logits.roll(-1, dims=1), **kw))
    biased = _sample_two_tokens(engine, prompt, samples // 2, temperature, top_k, seed=1)
    assert _chi_square_pvalue(biased, expected) < 1e-3


def _sequence_distribution(target, prompt, length, temperature, top_k, process) -> dict:
    """Exact distribution of the first ``length`` sampled tokens (tuples), the logits of each step (fp32) passed
    through ``process(logits, held tokens, new-token index)`` before temperature and top-k, as generate's
    processors."""
    outcomes = {(): 1.0}
    with torch.no_grad():
        for step in range(length):
            grown = {}
            for tokens, mass in outcomes.items():
                held = prompt[0].tolist() + list(tokens)
                logits = target(torch.tensor([held], device=DEVICE)).logits[0, -1].float().cpu()
                probs = _filtered_probs(process(logits, held, step), temperature, top_k).cpu()
                for token in probs.nonzero().flatten().tolist():
                    grown[tokens + (token,)] = mass * float(probs[token])
            outcomes = grown
    return outcomes


def _sequence_sampling_pvalue(engine, prompt, expected: dict, num_samples, temperature, top_k, seed, **kwargs):
    """Chi-square p-value of the engine's first tokens (``generate(**kwargs)``) against ``expected``. One token
    more is generated than counted: the engine cuts a tree to the tokens it can still keep, so the counted
    tokens come from trees that reach past them (an accepted draft's row judges the next token)."""
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    keys = sorted(expected)
    counts = torch.zeros(len(keys), dtype=torch.float64)
    length = len(keys[0])
    kwargs.setdefault("eos_token_id", [])
    for _ in range(num_samples):
        out = engine.generate(prompt, max_new_tokens=length + 1, temperature=temperature, top_k=top_k,
                              generator=generator, **kwargs)
        drawn = tuple(out.sequences[0, prompt.shape[1]:prompt.shape[1] + length].tolist())
        if drawn not in expected:
            return 0.0  # an outcome the target cannot produce
        counts[keys.index(drawn)] += 1
    return _chi_square_pvalue(counts, torch.tensor([expected[key] for key in keys], dtype=torch.float64))


def test_sampling_with_repetition_penalty_is_lossless_chi_square(monkeypatch):
    """Sampling with a repetition penalty draws from generate's distribution with that penalty (applied before
    temperature and top-k): the first three tokens (the first comes from the prefill, the third from an accepted
    draft's row when the second was one). The draft is the target itself; a penalty below 1 rewards repetition,
    which here moves most of the third token's mass. Without the drafts on a node's path in the penalty, the
    test fails."""
    target, _ = models("llama")
    prompt = prompts(256, [2], seed=36)[0]
    temperature, top_k, samples, penalty = 1.3, 3, 240, 0.3
    expected = _sequence_distribution(target, prompt, 3, temperature, top_k,
                                      lambda logits, held, step: hf_penalized(logits, held, penalty))
    engine = SpeculativeDecoder(target, target, depth=2, topk=3, num_nodes=6, impl="torch")
    pvalue = _sequence_sampling_pvalue(engine, prompt, expected, samples, temperature, top_k, seed=0,
                                       repetition_penalty=penalty)
    assert pvalue > 1e-3
    real = speculative.repetition_penalized
    monkeypatch.setattr(speculative, "repetition_penalized",
                        lambda logits, penalty, seen, *tree: real(logits, penalty, seen))
    biased = _sequence_sampling_pvalue(engine, prompt, expected, samples // 2, temperature, top_k, seed=1,
                                       repetition_penalty=penalty)
    assert biased < 1e-3


def test_sampling_is_reproducible_with_a_generator():
    target, draft = models("qwen2")
    engine = SpeculativeDecoder(target, draft, impl="torch", **DYNAMIC_TREE)
    prompt = prompts(320, [4], seed=23)[0]
    runs = [
        engine.generate(prompt, max_new_tokens=12, temperature=0.8, top_p=0.9, eos_token_id=[],
                        generator=torch.Generator(device=DEVICE).manual_seed(5)).sequences
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1]) and runs[0].shape[1] == 16


# --------------------------------------------------------------------------------------------------
# The Triton path (interpreter on CPU)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("draft_kind", ["lm", "fspad"])
def test_greedy_with_triton_kernels(draft_kind):
    target, draft_lm = models("llama")
    draft = draft_lm if draft_kind == "lm" else make_head(target)
    engine = SpeculativeDecoder(target, draft, tree=[[0], [1], [0, 0]], impl="triton")
    prompt = prompts(256, [4], seed=29)[0]
    out = engine.generate(prompt, max_new_tokens=5, eos_token_id=[])
    assert torch.equal(out.sequences, reference_generate(target, prompt, 5))


# --------------------------------------------------------------------------------------------------
# Bad inputs and unsupported models
# --------------------------------------------------------------------------------------------------


def test_triton_engine_refuses_head_dims_its_kernel_cannot_run_when_built():
    """impl='triton' with a model whose tree attention the kernel cannot run (D = 8; fp32 D = 256) is refused when
    the engine is built, naming the model and the limit: it was accepted and failed inside generate, at the first
    tree forward after both prefills (a 16-bit audit). impl='auto' runs such heads on the PyTorch path and decodes
    as generate does."""
    small_heads = tiny_model("Llama", hidden_size=32, num_attention_heads=4)  # D = 8
    wide_heads = tiny_model("Llama", head_dim=256)
    target = tiny_model("Llama")  # D = 16
    prompt = prompts(128, [5], seed=40)[0]
    for bad_target, bad_draft, match in (
        (small_heads, small_heads, r"the target \(LlamaForCausalLM\)'s tree attention needs a head dim D in .*D=8"),
        (target, small_heads, r"the draft \(LlamaForCausalLM\)'s tree attention needs a head dim .*D=8"),
        (wide_heads, wide_heads, r"the target .* runs float32 q/k/v up to D=128, got D=256"),
    ):
        with pytest.raises(ValueError, match=match):
            SpeculativeDecoder(bad_target, bad_draft, impl="triton", tree=[[0], [1]])
    for model in (small_heads, wide_heads):
        out = SpeculativeDecoder(model, model, impl="auto", tree=[[0], [1]]).generate(prompt, max_new_tokens=4)
        assert torch.equal(out.sequences, reference_generate(model, prompt, 4))


def test_bad_inputs():
    target, draft = models("llama")
    engine = SpeculativeDecoder(target, draft, impl="torch", **DYNAMIC_TREE)
    prompt = prompts(256, [4], seed=31)[0]
    with pytest.raises(ValueError, match="empty prompt"):
        engine.generate(prompt[:, :0], max_new_tokens=3)
    for bad in (0, -2):
        with pytest.raises(ValueError, match="max_new_tokens"):
            engine.generate(prompt, max_new_tokens=bad)
    with pytest.raises(TypeError, match="max_new_tokens"):
        engine.generate(prompt, max_new_tokens=2.0)
    with pytest.raises(TypeError, match="input_ids"):
        engine.generate(prompt.float(), max_new_tokens=3)
    with pytest.raises(ValueError, match="token ids"):
        engine.generate(prompt + 1000, max_new_tokens=3)
    with pytest.raises(ValueError, match="temperature"):
        engine.generate(prompt, max_new_tokens=3, temperature=-1.0)
    with pytest.raises(ValueError, match="temperature must be 0 \\(greedy\\) or >= 1e-06"):
        engine.generate(prompt, max_new_tokens=3, temperature=1e-9)
    with pytest.raises(ValueError, match="top_p"):
        engine.generate(prompt, max_new_tokens=3, temperature=1.0, top_p=1.5)
    with pytest.raises(ValueError, match="top_k"):
        engine.generate(prompt, max_new_tokens=3, temperature=1.0, top_k=-1)
    with pytest.raises(ValueError, match="num_nodes"):
        SpeculativeDecoder(target, draft, num_nodes=300)
    with pytest.raises(ValueError, match="depth"):
        SpeculativeDecoder(target, draft, depth=0)
    with pytest.raises(TypeError, match="topk"):
        SpeculativeDecoder(target, draft, topk=2.5)
    with pytest.raises(ValueError, match="parent path"):
        SpeculativeDecoder(target, draft, tree=[[0, 0]])
    # A float64 target: refused when built (it failed at the first step, after its forwards, naming target_logits).
    with pytest.raises(TypeError, match="target must have float32, float16 or bfloat16 weights .* got torch.float64"):
        SpeculativeDecoder(copy.deepcopy(target).double(), copy.deepcopy(draft).double())
    # What the engine is built from is fixed (engine.depth = 1 was ignored, engine.impl switched verification only,
    # engine.draft = None failed at the next generate); profile is checked where it is set.
    for name, value in (("depth", 1), ("impl", "triton"), ("draft", None), ("topk", 2)):
        with pytest.raises(AttributeError, match=f"SpeculativeDecoder.{name} is fixed when the engine is built"):
            setattr(engine, name, value)
    with pytest.raises(TypeError, match="profile must be a bool"):
        engine.profile = "yes"
    engine.profile = False
    assert engine.depth == DYNAMIC_TREE["depth"] and engine.impl == "torch" and engine.draft is draft
    assert engine.generate(prompt, max_new_tokens=2).sequences.shape[1] == prompt.shape[1] + 2
    # Checked at construction with a static tree too (it was first refused by generate), and profile is a bool.
    with pytest.raises(ValueError, match=r"impl must be one of \('auto', 'triton', 'torch'\), got 'bogus'"):
        SpeculativeDecoder(target, draft, tree=[[0], [0, 0]], impl="bogus")
    with pytest.raises(TypeError, match="profile must be a bool, got str: 'yes'"):
        SpeculativeDecoder(target, draft, profile="yes")
    # NumPy integers (read from a config array) mean what Python ints mean (they were a TypeError).
    numpy_engine = SpeculativeDecoder(target, draft, impl="torch", depth=np.int64(4), topk=np.int32(3),
                                      num_nodes=np.int64(12))
    for top_k in (0, 2):
        outs = [
            decoder.generate(prompt, max_new_tokens=new, temperature=1.5, top_k=k,
                             generator=torch.Generator(DEVICE).manual_seed(1))
            for decoder, new, k in ((engine, 6, top_k), (numpy_engine, np.int64(6), np.int64(top_k)))
        ]
        assert torch.equal(outs[0].sequences, outs[1].sequences), top_k
    assert target.config._attn_implementation == "sdpa"  # restored even when generate raised
    # Checked before any forward (an error-message audit): a str pad_token_id ran the whole generation and failed
    # building the output, a float was truncated, a non-callable step_callback failed after the prefill.
    forwards = []
    handle = target.register_forward_pre_hook(lambda *args: forwards.append(1))
    for bad, match in ((dict(pad_token_id="x"), "pad_token_id must be an int or None, got str: 'x'"),
                       (dict(pad_token_id=1.5), "pad_token_id must be an int or None, got float: 1.5"),
                       (dict(step_callback=1), "step_callback must be callable or None, got int"),
                       (dict(stop_strings=5), "stop_strings must be a str, a list of str or None, got int: 5")):
        with pytest.raises(TypeError, match=match):
            engine.generate(prompt, max_new_tokens=3, **bad)
    handle.remove()
    assert not forwards


def test_static_tree_as_paths_parents_or_a_tree_spec():
    """A static tree may be given as EAGLE paths, a parent array or the TreeSpec of one tree (every other op takes a
    TreeSpec as ``tree``; it failed with "paths must be a list of lists of ints"): the same drafts and outputs,
    greedy and sampled. A TreeSpec of several trees is refused, naming ``tree``."""
    target, draft = models("llama")
    prompt = prompts(256, [5], seed=43)[0]
    paths = [[0], [1], [0, 0], [0, 1], [0, 0, 0]]
    parents = tree_from_paths(paths)
    outputs = []
    for tree in (paths, parents, build_tree(parents)):
        engine = SpeculativeDecoder(target, draft, tree=tree, impl="torch")
        greedy = engine.generate(prompt, max_new_tokens=9, eos_token_id=[])
        sampled = engine.generate(prompt, max_new_tokens=9, temperature=1.3, eos_token_id=[],
                                  generator=torch.Generator(DEVICE).manual_seed(3))
        outputs.append((greedy.sequences, greedy.accept_lengths, sampled.sequences))
    for other in outputs[1:]:
        assert all(torch.equal(a, b) if torch.is_tensor(a) else a == b for a, b in zip(outputs[0], other))
    assert torch.equal(outputs[0][0], reference_generate(target, prompt, 9))
    with pytest.raises(ValueError, match="tree must be one tree, got a TreeSpec of 2 trees"):
        SpeculativeDecoder(target, draft, tree=build_tree(torch.stack([parents, parents])))


def test_top_k_zero_means_no_top_k():
    """``top_k=0`` is transformers' "no top-k": the same draws as ``top_k=None`` (it was refused), and unlike
    ``top_k=1`` (which is greedy)."""
    target, draft = models("llama")
    engine = SpeculativeDecoder(target, draft, impl="torch", **DYNAMIC_TREE)
    prompt = prompts(256, [4], seed=32)[0]
    outs = {
        top_k: engine.generate(prompt, max_new_tokens=8, temperature=1.5, top_k=top_k, eos_token_id=[],
                               generator=torch.Generator(DEVICE).manual_seed(5)).sequences
        for top_k in (0, None, 1)
    }
    assert torch.equal(outs[0], outs[None])
    assert torch.equal(outs[1], reference_generate(target, prompt, 8))
    assert not torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("max_new", [4, 3])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_static_tree_ranks_pick_the_parents_rank_th_token(impl, max_new, monkeypatch):
    """EAGLE paths with gaps in the ranks: node [2] drafts the root's third most likely token and [2, 1] the
    second most likely after it (the ranks were read as sibling positions: [2] drafted the second). With 2 tokens
    to go (max_new 3) the tree is cut to its depth-1 nodes, which keep their ranks."""
    target, draft = models("llama")
    prompt = prompts(256, [5], seed=41)[0]
    trees = []
    real_verify = speculative.verify_greedy
    monkeypatch.setattr(speculative, "verify_greedy",
                        lambda tree, tokens, logits, **kw: trees.append(tokens.clone()) or real_verify(tree, tokens,
                                                                                                      logits, **kw))
    engine = SpeculativeDecoder(target, draft, tree=[[0], [2], [2, 1]], impl=impl)
    out = engine.generate(prompt, max_new_tokens=max_new, eos_token_id=[])  # max_new - 1 to go at the first step
    assert [t.shape[1] for t in trees][:2] == [1, max_new]  # the prefill's one-node tree, then the first step's
    tokens = trees[1][0].tolist()
    context = torch.cat([prompt, out.sequences[:, prompt.shape[1]:prompt.shape[1] + 1]], 1)
    with torch.no_grad():
        ranking = draft(context).logits[0, -1].topk(3).indices.tolist()
        after = draft(torch.cat([context, torch.tensor([[ranking[2]]], device=DEVICE)], 1)).logits[0, -1]
    assert tokens[1:] == [ranking[0], ranking[2], after.topk(2).indices[1].item()][:max_new - 1]
    with pytest.raises(ValueError, match="top-9 tokens, more than the vocabulary of 8"):
        tiny = make_models("llama", vocab=8)
        SpeculativeDecoder(tiny[0], tiny[1], tree=[[rank] for rank in range(9)])


def test_vocabulary_mismatch():
    target, _ = models("llama")
    other_vocab = make_models("llama", vocab=300)[1]
    with pytest.raises(ValueError, match="vocabulary size 300 differs from the target's 256"):
        SpeculativeDecoder(target, other_vocab)
    head = FSPADDraftHead(model_config("llama", 300, 2)).to(DEVICE)
    with pytest.raises(ValueError, match="vocabulary 300"):
        SpeculativeDecoder(target, head)


def _padded(model, rows: int, scale: float):
    """A copy of ``model`` with its embedding matrices padded to ``rows`` (new LM-head rows random, times ``scale``)."""
    import copy

    padded = copy.deepcopy(model)
    padded.resize_token_embeddings(rows, mean_resizing=False)
    with torch.no_grad():
        head = padded.get_output_embeddings().weight
        old = model.get_output_embeddings().weight.shape[0]
        generator = torch.Generator().manual_seed(rows)
        head[old:] = torch.randn(head[old:].shape, generator=generator).to(head) * scale
    return padded


@pytest.mark.parametrize("padded_side", ["draft", "target"])
def test_padded_vocabularies_with_vocab_size(padded_side):
    """One tokenizer, embedding matrices padded to other sizes (Qwen2.5-0.5B's 151936 rows against Qwen2.5-7B's
    152064): refused without ``vocab_size``; with it the output is still generate's exactly. A padded draft's
    extra logits (made large here) are masked: it drafts what the unpadded draft drafts (the same acceptance); a
    padded target emits ids the draft has no row for (random extra rows), which reach the draft as id 0; a
    repetition penalty covers them."""
    target, draft = models("llama")
    if padded_side == "draft":
        big_target, big_draft = target, _padded(draft, 300, scale=5.0)
    else:
        big_target, big_draft = _padded(target, 300, scale=1.0), draft
    with pytest.raises(ValueError, match="pass vocab_size= the number of token ids they share"):
        SpeculativeDecoder(big_target, big_draft)
    with pytest.raises(ValueError, match="vocab_size must be <= both models' vocabulary sizes"):
        SpeculativeDecoder(big_target, big_draft, vocab_size=257)
    with pytest.raises(ValueError, match="vocab_size applies to a draft LM"):
        SpeculativeDecoder(target, make_head(target), vocab_size=256)
    engine = SpeculativeDecoder(big_target, big_draft, vocab_size=256, impl="torch", **DYNAMIC_TREE)
    emitted_beyond = False
    for prompt in prompts(256, [3, 6], seed=31):
        out = engine.generate(prompt, max_new_tokens=24)
        expected = reference_generate(big_target, prompt, 24)
        assert torch.equal(out.sequences, expected)
        emitted_beyond |= bool((expected >= 256).any())
        # The repetition penalty covers the whole (padded) target vocabulary.
        penalized = engine.generate(prompt, max_new_tokens=24, repetition_penalty=1.3).sequences
        assert torch.equal(penalized, big_target.generate(prompt, attention_mask=torch.ones_like(prompt),
                                                          do_sample=False, max_new_tokens=24, pad_token_id=0,
                                                          repetition_penalty=1.3))
        if padded_side == "draft":
            plain = SpeculativeDecoder(target, draft, impl="torch", **DYNAMIC_TREE).generate(prompt, max_new_tokens=24)
            assert out.accept_lengths == plain.accept_lengths
    assert emitted_beyond or padded_side == "draft"


def test_unsupported_models(monkeypatch):
    target, draft = models("llama")
    with pytest.raises(TypeError, match="PreTrainedModel"):
        SpeculativeDecoder(torch.nn.Linear(4, 4), draft)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        SpeculativeDecoder(target, torch.nn.Linear(4, 4))
    # A model class whose attention does not go through the AttentionInterface.
    monkeypatch.setattr(type(target), "_can_set_attn_implementation", classmethod(lambda cls: False))
    with pytest.raises(ValueError, match="AttentionInterface"):
        SpeculativeDecoder(target, draft)
    monkeypatch.undo()
    # Caught at run time too: a forward whose attention never reaches the registered function.
    monkeypatch.setattr(speculative, "_attention_switched", lambda models: contextlib.nullcontext())
    with pytest.raises(ValueError, match="registered attention function"):
        SpeculativeDecoder(target, draft, impl="torch").generate(prompts(256, [3], seed=37)[0], max_new_tokens=4)
    monkeypatch.undo()
    # Cache layers that cannot be compacted at all (a linear-attention layer in the model's layer types).
    monkeypatch.setattr(target.config, "layer_types", ["linear_attention", "full_attention"], raising=False)
    with pytest.raises(ValueError, match=r"cannot compact in place \(LinearAttentionLayer\)"):
        SpeculativeDecoder(target, draft, impl="torch").generate(prompts(256, [3], seed=43)[0], max_new_tokens=4)
    # A layer type whose cache is a plain one but whose mask tree attention does not apply.
    monkeypatch.setattr(target.config, "layer_types", ["full_attention", "window_attention"], raising=False)
    with pytest.raises(ValueError, match=r"attention layers of type window_attention; only full-attention"):
        SpeculativeDecoder(target, draft, impl="torch").generate(prompts(256, [3], seed=43)[0], max_new_tokens=4)


def test_timings_add_up_every_step(monkeypatch):
    """``timings`` sums each phase over the steps: under a clock that advances one second per reading, each
    step's target forward, verification and compaction add one second each (no clock is read inside them)."""
    clock = itertools.count()
    monkeypatch.setattr(speculative, "time", types.SimpleNamespace(perf_counter=lambda: float(next(clock))))
    target, draft = models("llama")
    engine = SpeculativeDecoder(target, draft, impl="torch", **DYNAMIC_TREE)
    out = engine.generate(prompts(256, [5], seed=13)[0], max_new_tokens=12, eos_token_id=[])
    steps = len(out.accept_lengths)
    assert steps >= 3
    assert out.timings["target"] == out.timings["verify"] == out.timings["compaction"] == steps
    assert out.timings["prefill"] == 1.0
    assert out.timings["draft"] >= 2 * steps - 1 + out.timings["tree"] > out.timings["tree"] > 0
    assert out.timings["total"] > sum(out.timings[phase] for phase in ("prefill", "draft", "target", "verify",
                                                                        "compaction"))


def test_mean_accept_length_counts_the_bonus_token():
    """A perfect draft on a chain of 4: every step accepts 4 drafts and emits 5 tokens, the mean accept length."""
    target, _ = models("llama")
    engine = SpeculativeDecoder(target, target, tree=[[0] * d for d in range(1, 5)], impl="torch")
    out = engine.generate(prompts(256, [5], seed=3)[0], max_new_tokens=21, eos_token_id=[])
    assert out.accept_lengths == [4] * 4 and out.num_new_tokens == 21
    assert out.mean_accept_length == 5.0
    assert engine.generate(prompts(256, [5], seed=3)[0], max_new_tokens=1).mean_accept_length == 0.0


def test_position_limit_reads_the_text_config_of_a_multimodal_config():
    """A multimodal config (Llama-4's keeps attention_chunk_size and layer_types in its text config) is read
    through get_text_config(): its chunked-attention limit is found, as for a text-only config."""
    text = types.SimpleNamespace(attention_chunk_size=8, layer_types=["chunked_attention", "full_attention"])
    multimodal = types.SimpleNamespace(get_text_config=lambda: text)
    assert speculative._position_limit(types.SimpleNamespace(config=text)) == ("chunked_attention layers", 8)
    assert speculative._position_limit(types.SimpleNamespace(config=multimodal)) == ("chunked_attention layers", 8)


def test_crop_cache_never_calls_crop_zero():
    """``_crop_cache`` keeps a cache that is not longer than asked for untouched: ``crop(0)`` emptied a
    ``DynamicCache`` before transformers 5.14, which the engine would hit whenever a whole path was accepted."""
    from transformers import DynamicCache

    cache = DynamicCache()
    keys = torch.randn(1, 2, 5, 4)
    cache.update(keys, keys + 1, 0)
    calls = []
    crop = cache.crop
    cache.crop = lambda max_length: (calls.append(max_length), crop(max_length))
    for length in (5, 7):
        speculative._crop_cache(cache, length)
    assert calls == [] and cache.get_seq_length() == 5
    speculative._crop_cache(cache, 3)
    assert calls == [-2] and cache.get_seq_length() == 3
    assert torch.equal(cache.layers[0].keys, keys[:, :, :3]) and torch.equal(cache.layers[0].values, keys[:, :, :3] + 1)
