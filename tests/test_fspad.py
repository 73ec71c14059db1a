"""The FSPAD draft head: its formulas, its KV cache, its tree attention and its training inputs."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from distill_ops.fspad import FSPADCache, FSPADDraftHead, fspad_training_inputs, target_features
from distill_ops.speculative import TreeAttentionContext, tree_spec_from_parents

from .conftest import DEVICE, assert_close


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py


def tiny_config(**overrides) -> LlamaConfig:
    values = dict(vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, initializer_range=0.3, rope_theta=500.0, bos_token_id=None,
                  eos_token_id=None, pad_token_id=None)
    values.update(overrides)
    return LlamaConfig(**values)


def make_head(dtype=torch.float32, seed: int = 0, **overrides) -> FSPADDraftHead:
    torch.manual_seed(seed)
    head = FSPADDraftHead(tiny_config(**overrides), sampling_size=48).to(DEVICE).eval()
    with torch.no_grad():
        # Break the identity initialisation of the output split so that the two halves differ. Drawn in
        # fp32 and cast after: a bf16 draw is another random stream on torch 2.11's CPU randn (the GPUs' torch).
        head.out_proj.weight.add_(0.05 * torch.randn_like(head.out_proj.weight))
        for norm in (head.sample_norm, head.input_norm, head.post_attention_norm, head.final_norm):
            norm.weight.add_(0.1 * torch.randn_like(norm.weight))
    return head.to(dtype)


def random_inputs(batch: int, length: int, seed: int = 1, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, length, 64, generator=generator).to(DEVICE, dtype)
    embeds = torch.randn(batch, length, 64, generator=generator).to(DEVICE, dtype)
    return features, embeds


def reference_head(head: FSPADDraftHead, features, embeds, positions) -> tuple[torch.Tensor, torch.Tensor]:
    """The issue's formulas, written out in float64 from the head's parameters (causal, no cache)."""
    p = {name: value.detach().double() for name, value in head.named_parameters()}
    e, f = embeds.double(), features.double()

    def rms(x, weight, eps=1e-6):
        return weight * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)

    h0 = torch.cat([e, f], -1) @ p["fc.weight"].T + p["fc.bias"]
    h = h0 + (F.silu(e @ p["sample_gate.weight"].T) * (rms(h0, p["sample_norm.weight"]) @ p["sample_up.weight"].T)) \
        @ p["sample_down.weight"].T
    x = rms(h, p["input_norm.weight"])
    batch, length, _ = x.shape
    heads, kv_heads, dim = 4, 2, 16
    q = (x @ p["q_proj.weight"].T).view(batch, length, heads, dim).transpose(1, 2)
    k = (x @ p["k_proj.weight"].T).view(batch, length, kv_heads, dim).transpose(1, 2)
    v = (x @ p["v_proj.weight"].T).view(batch, length, kv_heads, dim).transpose(1, 2)
    inv_freq = 500.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angle = positions.double()[:, None] * inv_freq.to(positions.device)
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)

    def rope(t):
        first, second = t[..., : dim // 2], t[..., dim // 2:]
        return t * cos + torch.cat([-second, first], -1) * sin

    q, k = rope(q), rope(k)
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(dim)
    causal = torch.ones(length, length, dtype=torch.bool, device=scores.device).tril()
    attn = torch.softmax(scores.masked_fill(~causal, -math.inf), -1) @ v
    h = h + attn.transpose(1, 2).reshape(batch, length, heads * dim) @ p["o_proj.weight"].T
    y = rms(h, p["post_attention_norm.weight"])
    h = h + (F.silu(y @ p["mlp_gate.weight"].T) * (y @ p["mlp_up.weight"].T)) @ p["mlp_down.weight"].T
    out = rms(h, p["final_norm.weight"]) @ p["out_proj.weight"].T
    return out[..., :64], out[..., 64:]


def test_forward_matches_the_formulas():
    head = make_head()
    features, embeds = random_inputs(2, 9)
    positions = torch.arange(1, 10, device=DEVICE)
    regress, predict = head(features, embeds, positions)
    expected_regress, expected_predict = reference_head(head, features, embeds, positions)
    assert_close(regress, expected_regress, torch.float32)
    assert_close(predict, expected_predict, torch.float32)
    # Default positions: 1 + arange(L) (entry t sits at the position of token t + 1).
    assert_close(head(features, embeds)[0], regress, torch.float32)


def test_output_split_starts_as_two_identities():
    torch.manual_seed(0)
    head = FSPADDraftHead(tiny_config()).to(DEVICE)
    features, embeds = random_inputs(1, 5)
    regress, predict = head(features, embeds)
    assert torch.equal(regress, predict)


def test_cache_commit_trims_and_rollback_drops_the_tree():
    """``commit(length)`` keeps the first ``length`` entries and drops the rest (the drafts past the accepted path:
    a commit that kept them left stale rows that every later step carried), ``commit()`` keeps everything appended,
    and ``rollback`` drops what came after the last commit."""
    cache = FSPADCache()
    entries = torch.arange(2 * 1 * 7 * 3, dtype=torch.float32).view(2, 1, 7, 3)
    cache.append(entries[:, :, :5], -entries[:, :, :5])
    cache.commit(3)
    assert cache.length == cache.committed == 3
    assert torch.equal(cache.keys, entries[:, :, :3]) and torch.equal(cache.values, -entries[:, :, :3])
    cache.append(entries[:, :, 3:6], -entries[:, :, 3:6])
    cache.rollback()
    assert cache.length == 3 and torch.equal(cache.keys, entries[:, :, :3])
    cache.append(entries[:, :, 3:7], -entries[:, :, 3:7])
    cache.commit()
    assert cache.length == cache.committed == 7 and torch.equal(cache.values, -entries)
    cache.commit(9)  # longer than the cache: nothing to trim
    assert cache.length == cache.committed == 7


def test_cache_rollback_of_a_single_draft_entry():
    """``rollback`` drops every entry appended since the last commit, a single one included (a one-node draft)."""
    cache = FSPADCache()
    entries = torch.arange(2 * 1 * 5 * 3, dtype=torch.float32).view(2, 1, 5, 3)
    cache.append(entries[:, :, :4], -entries[:, :, :4])
    cache.commit()
    cache.append(entries[:, :, 4:5], -entries[:, :, 4:5])
    cache.rollback()
    assert cache.length == cache.committed == 4
    assert torch.equal(cache.keys, entries[:, :, :4]) and torch.equal(cache.values, -entries[:, :, :4])


def test_training_inputs_carry_no_gradient():
    """``fspad_training_inputs`` returns tensors without gradients, the token embeddings too (looked up outside
    ``no_grad`` they kept the target's graph alive and sent the head's loss into the embedding table)."""
    torch.manual_seed(0)
    target = LlamaForCausalLM(tiny_config()).eval().to(DEVICE)
    input_ids = torch.randint(0, 200, (2, 6), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    for name, value in fspad_training_inputs(target, input_ids).items():
        assert not value.requires_grad and value.grad_fn is None, name


def test_norms_apply_the_config_eps():
    """The head's RMSNorms are x / sqrt(mean x^2 + eps) with the config's ``rms_norm_eps``: an all-zero row stays 0
    (not NaN), and rows of rms ~ sqrt(eps) are scaled as the float64 formula says."""
    for eps in (1e-6, 0.25):
        head = make_head(rms_norm_eps=eps)
        x = torch.randn(3, 64, generator=torch.Generator().manual_seed(3)) * eps ** 0.5
        x[1] = 0.0
        x = x.to(DEVICE)
        for norm in (head.sample_norm, head.input_norm, head.post_attention_norm, head.final_norm):
            out = norm(x)
            x64 = x.double()
            expected = norm.weight.detach().double() * x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
            assert torch.isfinite(out).all()
            assert_close(out, expected, torch.float32, f"eps={eps}")
    # An eps of 0 is the config's value (it was read as unset: 1e-6): a row of rms 1e-4 is scaled to rms 1 exactly.
    head = make_head(rms_norm_eps=0.0)
    x = torch.full((1, 64), 1e-4, device=DEVICE)
    for norm in (head.sample_norm, head.input_norm, head.post_attention_norm, head.final_norm):
        assert_close(norm(x), norm.weight.detach().double().expand(1, 64), torch.float32, "eps=0")


def test_cached_chunks_equal_one_causal_pass():
    head = make_head()
    features, embeds = random_inputs(1, 11)
    full_regress, full_predict = head(features, embeds)
    cache = FSPADCache()
    outputs = []
    for start, stop in ((0, 5), (5, 6), (6, 9), (9, 11)):
        regress, predict = head(features[:, start:stop], embeds[:, start:stop], cache=cache)
        cache.commit()
        outputs.append((regress, predict))
    assert cache.length == 11 and cache.committed == 11
    assert_close(torch.cat([o[0] for o in outputs], 1), full_regress, torch.float32)
    assert_close(torch.cat([o[1] for o in outputs], 1), full_predict, torch.float32)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_tree_entries_equal_their_root_paths(impl):
    """Entries appended as a tree (all at once, or level by level as the engine drafts) equal a causal pass
    over the committed prefix followed by each node's ancestor chain."""
    head = make_head()
    prefix = 6
    parents = [-1, 0, 0, 1, 1, 2, 3]  # node 0: the last committed entry (the engine's root)
    features, embeds = random_inputs(1, prefix - 1 + len(parents), seed=3)
    committed_f, committed_e = features[:, :prefix], embeds[:, :prefix]
    tree_f, tree_e = features[:, prefix:], embeds[:, prefix:]  # nodes 1..6
    tree = tree_spec_from_parents(parents, DEVICE)

    def path_outputs(node):
        chain = []
        while node > 0:
            chain.insert(0, node - 1)
            node = parents[node]
        f = torch.cat([committed_f, tree_f[:, chain]], 1)
        e = torch.cat([committed_e, tree_e[:, chain]], 1)
        regress, predict = head(f, e)
        return regress[:, -1], predict[:, -1]

    # All tree nodes in one call.
    cache = FSPADCache()
    head(committed_f, committed_e, cache=cache)
    cache.commit()
    positions = prefix + torch.tensor([tree.depth[0, n].item() for n in range(1, len(parents))], device=DEVICE)
    regress, predict = head(tree_f, tree_e, positions, cache=cache, tree=TreeAttentionContext(tree, impl))
    # The tree context covers node 0 (the root, already the last committed entry) and nodes 1..6.
    for node in range(1, len(parents)):
        expected_regress, expected_predict = path_outputs(node)
        assert_close(regress[:, node - 1], expected_regress, torch.float32, f"node {node}")
        assert_close(predict[:, node - 1], expected_predict, torch.float32, f"node {node}")
    cache.rollback()
    assert cache.length == prefix

    # Level by level (queries = the newest level only): same outputs.
    levels = [[1, 2], [3, 4, 5], [6]]
    for level in levels:
        last = level[-1]
        sub_tree = tree_spec_from_parents(parents[: last + 1], DEVICE)
        index = torch.tensor([n - 1 for n in level], device=DEVICE)
        level_regress, _ = head(tree_f[:, index], tree_e[:, index], positions[index], cache=cache,
                                tree=TreeAttentionContext(sub_tree, impl))
        assert_close(level_regress, regress[:, index], torch.float32)
    cache.rollback()
    assert cache.length == prefix


def test_training_inputs_are_aligned():
    torch.manual_seed(0)
    target = LlamaForCausalLM(tiny_config()).eval().to(DEVICE)
    input_ids = torch.randint(0, 200, (3, 12), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    inputs = fspad_training_inputs(target, input_ids)
    features, logits = target_features(target, input_ids)
    # The features are what the LM head consumes: the logits are exactly lm_head(features).
    assert_close(target.lm_head(features), logits, torch.float32)
    assert torch.equal(inputs["features"], features[:, :-1])
    assert torch.equal(inputs["target_next_features"], features[:, 1:])
    assert torch.equal(inputs["token_embeds"], target.model.embed_tokens(input_ids[:, 1:]))
    assert torch.equal(inputs["position_ids"], torch.arange(1, 12, device=DEVICE))
    assert not inputs["features"].requires_grad
    with pytest.raises(ValueError, match="L >= 2"):
        fspad_training_inputs(target, input_ids[:, :1])


def test_gradients_reach_every_head_parameter():
    head = make_head()
    head.train()
    features, embeds = random_inputs(2, 7)
    lm_head_weight = torch.randn(200, 64, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    regress, predict = head(features, embeds)
    loss = F.smooth_l1_loss(regress, features.roll(-1, 1)) + torch.logsumexp(predict @ lm_head_weight.T, -1).mean()
    loss.backward()
    for name, parameter in head.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_bf16_forward_is_close_to_fp32():
    head32 = make_head()
    head16 = make_head(torch.bfloat16)
    features, embeds = random_inputs(1, 8)
    regress32, predict32 = head32(features, embeds)
    regress16, predict16 = head16(features.bfloat16(), embeds.bfloat16())
    assert regress16.dtype == torch.bfloat16
    # A whole bf16 layer stack, not one kernel: its outputs reach magnitudes where one bf16 ulp exceeds
    # the elementwise bf16 atol (seen on an H200: 1 of 512 elements off by 0.012). Compare the relative
    # error of the whole output instead, bounded by a few bf16 roundings (2^-8 each).
    for low, full in ((regress16, regress32), (predict16, predict32)):
        error = (low.double() - full.double()).norm() / full.double().norm()
        assert error < 4 * 2.0**-8, f"relative error {error:.2e}"


def test_bad_inputs():
    head = make_head()
    features, embeds = random_inputs(1, 4)
    with pytest.raises(ValueError, match="token_embeds"):
        head(features, embeds[:, :3])
    with pytest.raises(ValueError, match=r"\[B, L, 64\]"):
        head(features[..., :32], embeds[..., :32])
    with pytest.raises(ValueError, match="num_key_value_heads"):
        FSPADDraftHead(tiny_config(num_key_value_heads=3))
    odd_head_dim = SimpleNamespace(hidden_size=60, num_attention_heads=4, num_key_value_heads=2, head_dim=15,
                                   intermediate_size=96, vocab_size=200)
    with pytest.raises(ValueError, match="head_dim"):
        FSPADDraftHead(odd_head_dim)
    with pytest.raises(TypeError, match=r"config must be the target's config \(target.config\), got a Module model"):
        FSPADDraftHead(torch.nn.Module())  # the model itself: it was an AttributeError on hidden_size
    # An error-message audit: these reached PyTorch internals (a dtype mismatch in a matmul, a broadcast error, a
    # negative dimension, ZeroDivisionError, AttributeError) or were silently truncated (sampling_size=2.7).
    with pytest.raises(TypeError, match="features and token_embeds must have the head's dtype torch.float32, got "
                                        "torch.float16 and torch.float16"):
        head(features.half(), embeds.half())
    with pytest.raises(ValueError, match=r"position_ids must have shape \[L\]=\[4\] or \[B, L\]=\[1, 4\], got \(5,\)"):
        head(features, embeds, torch.arange(5, device=features.device))
    with pytest.raises(TypeError, match="features must be a torch.Tensor, got list"):
        head(features.tolist(), embeds)
    # A review (2026-12-07): tensors on another device reached PyTorch's unnamed "not on the expected device".
    with pytest.raises(ValueError, match="position_ids is on meta but head_weights is on cpu"):
        head(features, embeds, torch.arange(1, 5, device="meta"))
    with pytest.raises(ValueError, match="token_embeds is on meta but head_weights is on cpu"):
        head(features, embeds.to("meta"))
    for bad, error, match in ((-1, ValueError, "sampling_size must be >= 1, got -1"),
                              (2.7, TypeError, "sampling_size must be an int, got float: 2.7"),
                              (True, TypeError, "sampling_size must be an int, got bool")):
        with pytest.raises(error, match=match):
            FSPADDraftHead(tiny_config(), sampling_size=bad)
    with pytest.raises(ValueError, match="config.num_attention_heads must be >= 1, got 0"):
        FSPADDraftHead(SimpleNamespace(hidden_size=64, num_attention_heads=0, vocab_size=200))
    with pytest.raises(TypeError, match="config must have hidden_size .* SimpleNamespace has none"):
        FSPADDraftHead(SimpleNamespace(num_attention_heads=4, vocab_size=200))
    with pytest.raises(TypeError, match="input_ids must be a torch.Tensor, got list"):
        fspad_training_inputs(torch.nn.Module(), [[1, 2, 3]])


def test_bad_inputs_are_refused_before_the_target_runs():
    """An input-contract audit (2026-12-07): ``target_features`` checked nothing (a float, list or empty
    ``input_ids`` failed inside the target's embedding or mask code, an out-of-range token id with an
    ``IndexError``), ``fspad_training_inputs`` passed out-of-range ids to the target likewise, the head's
    ``position_ids [B', L]`` with the wrong batch failed in a broadcast, and a negative rope theta or a NaN norm
    epsilon in a hand-made config made every output NaN."""
    torch.manual_seed(0)
    target = LlamaForCausalLM(tiny_config()).eval().to(DEVICE)
    ids = torch.randint(0, 200, (2, 5), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    with pytest.raises(TypeError, match=r"input_ids must have dtype in \(int64"):
        target_features(target, ids.float())
    with pytest.raises(TypeError, match="input_ids must be a torch.Tensor, got list"):
        target_features(target, ids.tolist())
    with pytest.raises(ValueError, match=r"input_ids must have shape \[B, L\] with L >= 1, got \(2, 0\)"):
        target_features(target, ids[:, :0])
    with pytest.raises(TypeError, match="target must be a transformers causal LM"):
        target_features(None, ids)
    # An empty batch failed inside the target's attention (a reshape of 0 elements; an audit of bad inputs).
    for call in (target_features, fspad_training_inputs):
        with pytest.raises(ValueError, match=r"input_ids must have shape \[B, L\] with B >= 1, got \(0, 5\)"):
            call(target, ids[:0])
    if DEVICE.type == "cpu":  # token values are read on CPU tensors only
        for call in (target_features, fspad_training_inputs):
            with pytest.raises(ValueError, match=r"input_ids must be token ids in \[0, 200\) .* from 3 to 200"):
                call(target, torch.tensor([[3, 200, 7]], device=DEVICE))
    head = make_head()
    features, embeds = random_inputs(2, 4)
    with pytest.raises(ValueError, match=r"position_ids must have shape \[L\]=\[4\] or \[B, L\]=\[2, 4\], got "
                                         r"\(3, 4\)"):
        head(features, embeds, torch.arange(4, device=DEVICE).expand(3, 4))
    # A 0 is the config's value, checked as given (it was read as unset: rope theta 10000, eps 1e-6).
    for field, value in (("rope_theta", -10000.0), ("rope_theta", 0.0), ("rms_norm_eps", float("nan"))):
        config = SimpleNamespace(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                                 vocab_size=200, **{field: value})
        with pytest.raises(ValueError, match=f"config.{field} must be in"):
            FSPADDraftHead(config)


@pytest.mark.parametrize("family, extra", [
    ("Llama", {}),
    ("Gemma2", dict(final_logit_softcapping=2.0, head_dim=16)),  # a small cap, so that it changes the logits
    ("Cohere", dict(logit_scale=0.25)),
    ("Granite", dict(logits_scaling=4.0)),  # divides
], ids=["llama", "gemma2-softcap", "cohere-scale", "granite-scale"])
def test_drafter_maps_predicted_features_to_logits_as_the_target_does(family, extra):
    """The engine's FSPAD drafter turns the head's predicted features into logits with the target's own map
    (``softcap(scale * lm_head(feature))``): on the target's true last features it gives the target's logits.
    Before this, Gemma-2, Cohere and Granite heads drafted from the raw LM head output (unscaled, uncapped), a
    different distribution from the one they were trained to match."""
    import transformers

    from distill_ops.speculative import _FSPADDrafter

    config = getattr(transformers, f"{family}Config")(
        vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.3, tie_word_embeddings=False, bos_token_id=None,
        eos_token_id=None, pad_token_id=None, **extra)
    torch.manual_seed(0)
    target = getattr(transformers, f"{family}ForCausalLM")(config).eval().to(DEVICE)
    drafter = _FSPADDrafter(FSPADDraftHead(config).to(DEVICE), target, "torch")
    ids = torch.randint(0, 120, (2, 7), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.no_grad():
        features, logits = target_features(target, ids)
        raw = target.get_output_embeddings()(features)
        assert_close(drafter._logits(features), logits, torch.float32)
    if extra:
        assert (raw - logits).abs().max() > 0.1  # the map matters here: the raw LM head would fail the check
