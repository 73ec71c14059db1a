"""Lossless speculative decoding for Hugging Face ``transformers`` causal LMs, with draft trees.

Each step drafts a tree of candidate continuations with a cheap draft (a smaller causal LM with the same
vocabulary, or an :class:`~distill_ops.fspad.FSPADDraftHead` that drafts from the target's last-layer
features), scores the whole tree with **one** target forward pass, keeps the longest acceptable path
(greedy, or lossless speculative sampling) plus one bonus token, and compacts the target's KV cache.

How it plugs into ``transformers`` (no model source is patched):

* :func:`register_tree_attention` registers ``"distill_ops_tree"`` in ``transformers.AttentionInterface``
  (the attention function) and in ``AttentionMaskInterface`` (as SDPA's mask builder). The engine switches
  the target (and a draft LM) to it for the duration of :meth:`SpeculativeDecoder.generate` and restores
  the previous implementation afterwards.
* The engine passes a :class:`TreeAttentionContext` through the model's forward kwargs
  (``speculative_tree=``); transformers forwards them to every attention call. With a tree in the
  context the layer's queries are the tree nodes, which sit at the end of the KV the cache returned (in a
  batch of sequences of different lengths the attention first moves them, per sequence, right after that
  sequence's prefix: :attr:`TreeAttentionContext.starts`), and attention runs
  :func:`~distill_ops.tree_attention.tree_attention` (Triton on CUDA). Without one
  (prefill, plain causal steps) it is transformers' own SDPA attention, so prefill is bit-identical to
  the model's default ``sdpa`` implementation.
* Tree position ids are ``cache length + depth``. After verification the accepted rows of every layer of
  the model's own ``DynamicCache`` are moved in place with one :func:`~distill_ops.verify.compact_kv_cache`
  call (all layers: one Triton launch) and the cache is cropped. The engine builds that cache with full layers
  only: sliding-window layers (Mistral, Gemma-2/3 local layers) keep the whole sequence too, and the window is
  applied by the attention (transformers' masks on causal forwards, ``tree_attention(sliding_window=)`` on
  trees), so generations run past the window; other cache layers (linear attention, quantized) are refused.

Semantics: greedy (``temperature=0``) output equals ``target.generate(do_sample=False)`` token for token
(up to floating-point ties between the tree pass and the one-token decode pass); sampling draws from the
same distribution as the target alone (temperature, top-k, top-p applied to the target; drafts are
deterministic top-k choices, verified with the residual rule of :func:`~distill_ops.verify.verify_sampling`);
a ``repetition_penalty`` (:func:`repetition_penalized`), ``min_new_tokens`` / ``min_length`` and suppressed
tokens are applied to the target's logits at every tree node as ``generate`` applies them (``_Generation._banned``).
Batches of sequences of any lengths: each sequence is decoded exactly as it would be alone (see
:class:`_Generation`). Stops at ``eos_token_id`` / ``max_new_tokens`` exactly like ``generate``.

Per-step host work. On a GPU at T ~ 32 the engine's own work is host-bound (each small op or Triton
launch costs microseconds of CPU time whatever its size; ``python -m benchmarks.engine_overhead`` counts
them per phase), and every device-to-host read drains the stream, exposing each launch's latency. So:

* One device-to-host read per step, whatever the tree: the emitted tokens after verification (they
  decide termination, the next root and the cache length). Drafting reads nothing back, static or
  dynamic tree. Once per ``generate``: the prompt's value check and the first token. ``profile=True``
  adds a synchronisation at each phase boundary.
* Dynamic (EAGLE-2) trees are drafted on the device with static shapes (:class:`_DynamicPlan`): per
  level, the cumulative scores of the level's candidates, a stable sort that picks the ``topk`` to
  expand (score descending, then creation order, exactly the host rule it replaced), the draft model's
  tree grown by those nodes and its :class:`~distill_ops.tree.TreeSpec` built by
  :func:`~distill_ops.tree.tree_spec_from_parents_tensor`; then the ``num_nodes - 1`` best candidates,
  breadth-first, and the verification spec. Every size is a host integer fixed by ``depth``, ``topk``,
  ``num_nodes`` and the vocabulary; ``max_depth`` / ``max_children`` of these specs are bounds
  (``min(depth, T - 1)``, ``min(topk, V, T - 1)``), so the verification result is ``-1`` padded to
  ``min(depth, T - 1) + 1`` columns. On the PyTorch path (CPU) that is a spec of about 30 small ops per
  drafting level and for the final tree plus about 10 ops of selection per level. On the Triton path the
  candidate bookkeeping is one launch per expanding level and one for the final selection
  (:mod:`distill_ops.kernels.eagle_tree`: exact pairwise ranks, no sort, into workspaces allocated once
  per plan) and each spec one launch rebuilding it in place over a buffer the plan allocated once
  (:func:`~distill_ops.tree.tree_spec_in_place`): 10 launches and no ATen op per step at depth 5
  (``python -m benchmarks.engine_overhead --impl triton`` counts them; traced under ``torch.compile``, the
  specs are built anew).
  What it buys: no stream drain while drafting, and a drafting step made of the same launches on the
  same shapes every time.
* Static trees are planned once (:func:`_static_plan`: specs computed with Python integers,
  :class:`_HostTree`); each step only fills their tokens, by ``topk`` over each level's logits.
* Host-to-device data never synchronises: the draft's advance (accepted tokens and positions) and the
  compaction's layer addresses are each one int64 buffer copied from pinned memory with
  ``non_blocking=True`` (:func:`~distill_ops.tree.int64_to_device`; a plain
  ``torch.tensor(..., device="cuda")`` copies from pageable memory and synchronises).
* Verification is two Triton launches (argmax or statistics per node, then the walk); compaction one
  launch for every layer, the prefix lengths being those the target's tree attention used.
"""

from __future__ import annotations

import inspect
import math
import time
import warnings
from contextlib import contextmanager
import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from ._utils import (
    FLOAT_DTYPES,
    Impl,
    IMPLS, INT_DTYPES, check_choice, check_device, check_flag, check_int, check_number, check_tensor,
    check_token_ids, resolve_impl,
    sink_softmax, softcapped, text_config, to_device_async, _integer_like,
)
from .generation_rules import (
    TokenSequenceRules, ban_repeated_ngrams, check_decay, check_ngram_size, decay_eos, node_tails,
)
from .tree import (
    BITS_PER_WORD,
    MAX_TREE_NODES,
    TreeSpec,
    build_tree,
    int64_to_device,
    ordered_paths,
    tree_from_paths,
    tree_spec_from_parents_tensor,
    tree_spec_in_place,
)
from .tree_attention import tree_attention, triton_head_dim_problem
from .verify import (
    MIN_SAMPLING_TEMPERATURE,
    VerifyResult,
    compact_kv_cache,
    nan_as_neg_inf,
    verify_greedy,
    verify_sampling,
)

#: Name under which the tree attention is registered in transformers' attention registries.
ATTENTION_NAME = "distill_ops_tree"
#: Forward kwarg that carries the :class:`TreeAttentionContext` to the attention function.
CONTEXT_KWARG = "speculative_tree"

_SDPA_ATTENTION: Callable | None = None


# --------------------------------------------------------------------------------------------------
# Tree specs built on the host (static trees, prepared once)
# --------------------------------------------------------------------------------------------------


class _HostTree:
    """A tree as host lists of Python integers, grown node by node, made a :class:`TreeSpec` with one copy.

    Static trees (the engine's ``tree=`` plan, the one-node root tree) are built once, with Python
    integers (a few microseconds instead of a loop of small tensor ops), and :meth:`to_device` ships the
    whole spec in a single non-blocking host-to-device copy (:func:`~distill_ops.tree.int64_to_device`).
    A node's depth, ancestor-mask words and root path never change once it is appended, so they are
    computed once, in :meth:`append`.
    """

    def __init__(self):
        self.parents, self.depth, self.words, self.paths = [-1], [0], [1], [[0]]
        self.first_child, self.next_sibling, self.last_child, self.num_children = [-1], [-1], [-1], [0]
        self._ancestors = [1]

    @classmethod
    def from_parents(cls, parents: Sequence[int]) -> "_HostTree":
        tree = cls()
        for parent in parents[1:]:
            tree.append(parent)
        return tree

    def append(self, parent: int) -> int:
        """Add a child of ``parent`` (an existing node); returns its index."""
        node = len(self.parents)
        self.parents.append(parent)
        self.depth.append(self.depth[parent] + 1)
        self.paths.append(self.paths[parent] + [node])
        mask = self._ancestors[parent] | (1 << node)
        self._ancestors.append(mask)
        if node % BITS_PER_WORD == 0:  # one more 64-bit word per node: rebuild the words
            self.words = [word for ancestors in self._ancestors for word in self._mask_words(ancestors)]
        else:
            self.words += self._mask_words(mask)
        self.first_child.append(-1)
        self.next_sibling.append(-1)
        self.last_child.append(-1)
        self.num_children.append(0)
        if self.last_child[parent] < 0:
            self.first_child[parent] = node
        else:
            self.next_sibling[self.last_child[parent]] = node
        self.last_child[parent] = node
        self.num_children[parent] += 1
        return node

    def _mask_words(self, mask: int) -> list[int]:
        """int64 two's complement of each 64-bit word of an ancestor mask."""
        words = []
        for word in range((len(self.parents) + BITS_PER_WORD - 1) // BITS_PER_WORD):
            value = (mask >> (BITS_PER_WORD * word)) & ((1 << 64) - 1)
            words.append(value - (1 << 64) if value >> 63 else value)
        return words

    def to_device(self, device: torch.device) -> TreeSpec:
        """The :class:`TreeSpec`, its tensors views of one buffer copied to ``device`` at once."""
        num_nodes = len(self.parents)
        max_depth = max(self.depth)
        leaf_paths = []
        for node, path in enumerate(self.paths):
            if self.num_children[node] == 0:
                leaf_paths += path
                leaf_paths += [-1] * (max_depth + 1 - len(path))
        flat = self.parents + self.depth + self.first_child + self.next_sibling + self.words + leaf_paths
        rows, words, paths = int64_to_device(flat, device).split([4 * num_nodes, len(self.words), len(leaf_paths)])
        parents, depth, first_child, next_sibling = rows.view(4, 1, num_nodes).unbind(0)
        return TreeSpec(
            parents=parents,
            depth=depth,
            first_child=first_child,
            next_sibling=next_sibling,
            ancestor_mask=words.view(1, num_nodes, len(self.words) // num_nodes),
            leaf_paths=paths.view(1, len(leaf_paths) // (max_depth + 1), max_depth + 1),
            max_depth=max_depth,
            max_children=max(self.num_children),
        )


def tree_spec_from_parents(parents: Sequence[int], device: torch.device | str) -> TreeSpec:
    """A :class:`~distill_ops.tree.TreeSpec` of one tree from a host parent list, in one host-to-device copy.

    Equal to ``build_tree(torch.tensor(parents), device=device)`` but computed with Python integers (a
    few microseconds instead of a loop of small tensor ops) and copied without a host synchronisation.
    ``parents[0] == -1`` and ``0 <= parents[i] < i``. For a parent array computed on the device, see
    :func:`~distill_ops.tree.tree_spec_from_parents_tensor` (no host read at all). A 1-D integer tensor is read
    once on the host.
    """
    if isinstance(parents, torch.Tensor):
        check_tensor("parents", parents, dtypes=INT_DTYPES, ndim=1)
        parents = parents.tolist()
    elif not isinstance(parents, (list, tuple)):
        raise TypeError(f"parents must be a list of ints or a 1-D integer tensor, got {type(parents).__name__}")
    for index, parent in enumerate(parents):  # an int check per node (floats, None and bools were let through)
        if not _integer_like(parent):
            raise TypeError(f"parents[{index}] must be an int, got {type(parent).__name__}: {parent!r}")
    num_nodes = len(parents)
    if num_nodes < 1 or num_nodes > MAX_TREE_NODES:
        raise ValueError(f"a tree must have 1 to {MAX_TREE_NODES} nodes, got {num_nodes}")
    if parents[0] != -1 or any(not 0 <= parents[i] < i for i in range(1, num_nodes)):
        raise ValueError(f"parents must satisfy parents[0] == -1 and 0 <= parents[i] < i, got {list(parents)}")
    return _HostTree.from_parents(parents).to_device(check_device("device", device))


# --------------------------------------------------------------------------------------------------
# The transformers attention function
# --------------------------------------------------------------------------------------------------


@dataclass
class TreeAttentionContext:
    """What one model forward needs to attend over a draft tree (passed as ``speculative_tree=`` kwarg).

    Attributes:
        tree: the tree whose ``T`` nodes occupy the **last** ``T`` positions of the KV the cache returns
            (node order); the positions before them are the prefix every node sees. The layer's queries
            are the last ``q_len <= T`` nodes (all of them for verification; the newest level while a draft
            model expands its tree). ``None``: plain causal attention (transformers' SDPA).
        impl: ``impl`` of :func:`~distill_ops.tree_attention.tree_attention`.
        calls: attention calls seen (the engine checks that every layer went through this function).
        starts: ragged batches (the engine at batch size > 1): int64 ``[B]``, the KV position of node 0 of
            each sequence's tree. The cache appends this forward's ``q_len`` rows at the end of the KV
            (the same position for every sequence); each layer moves them, in place, to positions
            ``starts[b] + T - q_len ..`` of sequence ``b`` (right after its own prefix and the earlier tree
            nodes), and the tree attention reads ``starts`` as the prefix lengths. Requires
            ``starts[b] + T <= S``. Rows of a sequence beyond ``starts[b] + T`` are left as they are (stale).
            ``None``: every sequence's tree is the last ``T`` positions of the KV.
    """

    tree: TreeSpec | None = None
    impl: Impl = "auto"
    calls: int = 0
    starts: torch.Tensor | None = None
    _cache_lens: torch.Tensor | None = field(default=None, repr=False)
    _slots: torch.Tensor | None = field(default=None, repr=False)

    def cache_lens(self, batch: int, prefix_len: int, device: torch.device) -> torch.Tensor:
        """The ``[B]`` prefix lengths tensor, created once per forward (every layer has the same prefix)."""
        lens = self._cache_lens
        if lens is None or lens.shape[0] != batch or lens.device != device:
            lens = torch.full((batch,), prefix_len, dtype=torch.int32, device=device)
            self._cache_lens = lens
        return lens

    def place_new_rows(self, key: torch.Tensor, value: torch.Tensor, q_len: int) -> None:
        """Move the last ``q_len`` rows of ``key`` / ``value`` ``[B, Hkv, S, D]`` (in place) to positions
        ``starts[b] + T - q_len + i`` of each sequence (see ``starts``); the index is made once per forward."""
        slots = self._slots
        if slots is None or slots.shape[1] != q_len:
            offsets = torch.arange(self.tree.num_nodes - q_len, self.tree.num_nodes, device=key.device)
            slots = self.starts.to(device=key.device, dtype=torch.int64)[:, None] + offsets
            self._slots = slots
        batch, heads, kv_len, head_dim = key.shape
        index = slots[:, None, :, None].expand(batch, heads, q_len, head_dim)
        for cache in (key, value):
            cache.scatter_(2, index, cache[:, :, kv_len - q_len:].clone())


def tree_attention_tail(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    context: TreeAttentionContext,
    *,
    scaling: float | None = None,
    softcap: float | None = None,
    sliding_window: int | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Tree attention for queries that are the last ``q_len`` nodes of ``context.tree``.

    ``query`` ``[B, Hq, q_len, D]``; ``key``/``value`` ``[B, Hkv, S, D]`` ending with the ``T`` tree nodes.
    With ``context.starts`` (ragged batches) the new rows are first moved to each sequence's own tree
    positions. Returns ``[B, Hq, q_len, D]``, a transposed view of a ``[B, q_len..T, Hq, D]`` buffer the kernel writes
    (transposing it back to the ``[B, q_len, Hq, D]`` that transformers' attention functions return is then free:
    contiguous when ``q_len == T`` or ``B == 1``). When ``q_len < T`` (a draft expanding one level of its tree) the
    earlier nodes' query rows are padded with zeros and their outputs dropped: one
    :func:`~distill_ops.tree_attention.tree_attention` call, whatever the level.
    """
    tree = context.tree
    batch, num_heads, q_len, head_dim = query.shape
    num_nodes, kv_len = tree.num_nodes, key.shape[2]
    if q_len > num_nodes or kv_len < num_nodes:
        raise ValueError(
            f"tree attention: {q_len} queries and {kv_len} keys do not fit a tree of {num_nodes} nodes at the "
            f"end of the KV cache"
        )
    if context.starts is None:
        cache_lens = context.cache_lens(batch, kv_len - num_nodes, query.device)
    else:
        context.place_new_rows(key, value, q_len)
        cache_lens = context.starts
    if q_len < num_nodes:
        padded = query.new_zeros(batch, num_heads, num_nodes, head_dim)
        padded[:, :, num_nodes - q_len:] = query
        query = padded
    out = query.new_empty(batch, num_nodes, num_heads, head_dim).transpose(1, 2)
    out = tree_attention(query, key, value, tree, cache_lens, sm_scale=scaling, softcap=softcap,
                         sliding_window=sliding_window, sinks=sinks, impl=context.impl, out=out)
    return out[:, :, num_nodes - q_len:]


def _dense_causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    softcap: float | None,
    sinks: torch.Tensor | None,
) -> torch.Tensor:
    """Causal attention with logit soft-capping (Gemma-2) and / or attention sinks (gpt-oss), for the forwards
    without a tree (prefill, the bonus token): SDPA can do neither. ``attention_mask`` as SDPA's mask builder
    makes it: None (plain causal; queries are the last ``q_len`` positions), boolean (True = visible) or
    additive. Dense scores, as transformers' eager attention; returns ``[B, q, Hq, D]``."""
    group = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(group, dim=1)
    value = value.repeat_interleave(group, dim=1)
    q_len, kv_len = query.shape[2], key.shape[2]
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = softcapped(torch.matmul(query, key.transpose(2, 3)) * scale, softcap)
    if attention_mask is None:
        visible = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
        scores = scores.masked_fill(~visible, float("-inf"))
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask[..., :kv_len], float("-inf"))
    else:
        scores = scores + attention_mask[..., :kv_len]
    probs = sink_softmax(scores, sinks, torch.float32)
    return torch.matmul(probs.to(query.dtype), value).transpose(1, 2).contiguous()


def _tree_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: tree attention when the forward carries a tree, SDPA otherwise.

    Receives ``query [B, Hq, q, D]`` and ``key``/``value [B, Hkv, S, D]`` already concatenated with the cache
    by the cache's ``update``; returns ``([B, q, Hq, D], None)`` as transformers' attention functions do.
    """
    context = kwargs.get(CONTEXT_KWARG)
    if context is not None:
        context.calls += 1
    softcap, sinks = kwargs.get("softcap"), kwargs.get("s_aux")
    if context is None or context.tree is None:
        if (softcap is not None or sinks is not None) and not dropout:
            return _dense_causal_attention(query, key, value, attention_mask, scaling, softcap, sinks), None
        return _SDPA_ATTENTION(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if dropout:
        raise ValueError("tree attention does not support attention dropout: put the model in eval() mode")
    out = tree_attention_tail(query, key, value, context, scaling=scaling, softcap=softcap,
                              sliding_window=kwargs.get("sliding_window"), sinks=sinks)
    return out.transpose(1, 2).contiguous(), None


def register_tree_attention() -> str:
    """Register the tree attention in transformers' ``AttentionInterface`` (and SDPA's mask builder under
    the same name in ``AttentionMaskInterface``); returns the name (``"distill_ops_tree"``). Idempotent.

    A model switched to it (``model.set_attn_implementation(name)``) behaves exactly like ``"sdpa"``
    unless a forward is given ``speculative_tree=TreeAttentionContext(tree)``.
    """
    global _SDPA_ATTENTION
    if _SDPA_ATTENTION is None:
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(ATTENTION_NAME, _tree_attention_forward)
        AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
        _SDPA_ATTENTION = sdpa_attention_forward
    return ATTENTION_NAME


# --------------------------------------------------------------------------------------------------
# Model checks and helpers
# --------------------------------------------------------------------------------------------------


def _check_causal_lm(name: str, model: object) -> None:
    """Clear errors for models the engine cannot drive, naming what is missing."""
    try:
        from transformers import PreTrainedModel
    except ImportError as exc:  # pragma: no cover - transformers is a dependency of the engine
        raise ImportError("distill_ops.speculative needs `transformers` (pip install transformers)") from exc
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"{name} must be a transformers PreTrainedModel (a causal LM), got {type(model).__name__}")
    missing = [attr for attr in ("get_output_embeddings", "set_attn_implementation") if not hasattr(model, attr)]
    if missing or model.get_output_embeddings() is None:
        raise TypeError(f"{name} ({type(model).__name__}) is not a causal LM with an output embedding (lm_head)")
    can_set = getattr(type(model), "_can_set_attn_implementation", None)  # transformers >= 4.56
    if can_set is not None and not can_set():
        raise ValueError(
            f"{name} ({type(model).__name__}) does not dispatch attention through transformers' AttentionInterface, "
            f"so tree attention cannot be plugged in (unsupported model)"
        )
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(
            f"{name} ({type(model).__name__}) is an encoder-decoder model; only decoder-only LMs are supported"
        )
    config = text_config(model)
    value_dim = getattr(config, "v_head_dim", None)
    key_dim = getattr(config, "qk_head_dim", None)
    if key_dim is None and getattr(config, "qk_nope_head_dim", None) is not None:
        key_dim = config.qk_nope_head_dim + getattr(config, "qk_rope_head_dim", 0)
    if value_dim is not None and key_dim is not None and value_dim != key_dim:
        raise ValueError(
            f"{name} ({type(model).__name__}) has value heads of dim {value_dim} and query/key heads of dim {key_dim} "
            f"(multi-head latent attention): tree attention and the KV compaction need one head dim for K and V"
        )


def _attention_head_dim(model: torch.nn.Module) -> int:
    """The head dim of a model's attention (an FSPAD head's, or a ``transformers`` config's ``head_dim``, else
    ``hidden_size // num_attention_heads``)."""
    if isinstance(getattr(model, "head_dim", None), int):
        return model.head_dim
    config = text_config(model)
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def _position_limit(model: torch.nn.Module) -> tuple[str, int] | None:
    """``(what, limit)``: the length a sequence plus the tree depth must stay within for the engine to compute
    what ``generate`` computes, or None when there is no such limit.

    * RoPE whose frequencies depend on the largest position id of a forward (``dynamic`` NTK scaling,
      ``longrope``): transformers switches them once positions pass the original context length, and the tree
      forwards reach ``depth`` positions further than ``generate``'s one-token steps, so past that length the two
      would use different frequencies (and Phi-3 re-runs its prompt at the switch).
    * Chunked attention (Llama-4's ``chunked_attention`` layers): tree attention applies no chunk mask, which is
      the plain causal mask while every position is in the first chunk.
    """
    config = text_config(model)
    found: list[tuple[str, int]] = []
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if isinstance(params, dict) and params:
        entries = list(params.values()) if all(isinstance(v, dict) for v in params.values()) else [params]
        for entry in entries:
            kind = str(entry.get("rope_type", entry.get("type", "default")))
            if "dynamic" in kind or kind == "longrope":
                limits = [entry.get("original_max_position_embeddings"),
                          getattr(config, "original_max_position_embeddings", None),
                          getattr(config, "max_position_embeddings", None)]
                found.append((f"rope_type {kind!r}", min(int(value) for value in limits if value is not None)))
    chunk = getattr(config, "attention_chunk_size", None)
    if chunk and "chunked_attention" in (getattr(config, "layer_types", None) or []):
        found.append(("chunked_attention layers", int(chunk)))
    return min(found, key=lambda item: item[1]) if found else None


def _position_table(*models: torch.nn.Module) -> int | None:
    """The fewest positions any of ``models``' configs declares (``max_position_embeddings``, GPT-2's
    ``n_positions``), or None: the size of a learned position table (GPT-2, OPT), which a position id past it
    indexes out of range; RoPE models declare one too (harmless: caps at it never bind below a sequence's own)."""
    sizes = [getattr(text_config(model), "max_position_embeddings", None) for model in models]
    sizes = [size for size in sizes if isinstance(size, int) and size > 0]
    return min(sizes) if sizes else None


def _vocab_size(model: torch.nn.Module) -> int:
    return model.get_output_embeddings().weight.shape[0]


def _cache_kwarg(model: torch.nn.Module) -> str:
    """transformers 5 names the forward's cache argument ``cache`` (``past_key_values`` before)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _supports_logits_to_keep(model: torch.nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _full_cache(name: str, model: torch.nn.Module):
    """A ``DynamicCache`` of full layers for ``model``, which every layer can compact in place and crop.

    transformers would give sliding-window layers (Mistral, Gemma-2/3 local layers) a cache that keeps only the
    last ``window - 1`` tokens and cannot be rolled back past them; here every layer keeps the whole sequence
    and the window is applied by the attention instead (transformers' sliding-window masks on the causal
    forwards, ``tree_attention(sliding_window=)`` on the tree forwards). The layer types the model's own
    cache would have are checked first: other kinds (linear attention, indexed or quantized layers) are refused.
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    supported = (DynamicLayer, DynamicSlidingWindowLayer)
    layer_types = getattr(text_config(model), "layer_types", None) or []
    # chunked_attention (Llama-4): in the first chunk only, a limit generate() checks (_position_limit).
    other = sorted(set(layer_types) - {"full_attention", "sliding_attention", "chunked_attention"})
    try:
        layers = DynamicCache(config=model.config).layers
    except KeyError:
        if not other:
            raise
        layers = []  # a layer type transformers' cache does not know: refused below, by name
    bad = [type(layer).__name__ for layer in layers if type(layer) not in supported]
    if bad:
        raise ValueError(
            f"{name} ({type(model).__name__}) uses cache layers the engine cannot compact in place "
            f"({', '.join(sorted(set(bad)))}); only full-attention and sliding-window attention layers are "
            f"supported (no linear-attention, indexed or quantized layers)"
        )
    if other:
        raise ValueError(
            f"{name} ({type(model).__name__}) has attention layers of type {', '.join(other)}; only full-attention "
            f"and sliding-window attention layers are supported"
        )
    return DynamicCache()


def _crop_cache(cache, length: int) -> None:
    """Drop a ``DynamicCache``'s positions from ``length`` on, if it holds more. Never calls ``crop(0)``: before
    transformers 5.14 that emptied the cache instead of keeping it whole."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def _select_cache_rows(cache, index: torch.Tensor) -> None:
    """Keep only the batch rows ``index`` (int64 ``[B']``) of every layer of a ``DynamicCache``."""
    for layer in cache.layers:
        if isinstance(getattr(layer, "keys", None), torch.Tensor):
            layer.keys, layer.values = layer.keys[index], layer.values[index]


@contextmanager
def _attention_switched(models: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Switch the models to the tree attention, restoring their previous implementation afterwards."""
    name = register_tree_attention()
    previous = [model.config._attn_implementation for model in models]
    try:
        for model in models:
            if model.config._attn_implementation != name:
                model.set_attn_implementation(name)
        yield
    finally:
        for model, old in zip(models, previous):
            if model.config._attn_implementation != old:
                model.set_attn_implementation(old)


def _model_device(name: str, model: torch.nn.Module) -> torch.device:
    """The one device holding all of ``model``'s parameters and buffers. A model split over devices
    (``device_map="auto"``) is refused: one step's tree, cache lengths and KV compaction live on one device.
    On a device that is not the current one the engine runs as on the current one (every kernel launches
    on its inputs' device)."""
    devices = {t.device for t in (*model.parameters(), *model.buffers())}
    if len(devices) != 1:
        raise ValueError(
            f"{name} must sit on one device, got parameters and buffers on {sorted(map(str, devices))} (a model "
            "split with device_map): the engine runs the target and the draft on a single device"
        )
    return devices.pop()


TIMED_PHASES = ("prefill", "draft", "tree", "target", "verify", "compaction")


class _Timer:
    """Accumulates wall-clock seconds per phase; with ``sync`` the CUDA stream is drained at each
    boundary so that the split is device time, not launch time."""

    def __init__(self, device: torch.device, sync: bool):
        self.sync = sync and device.type == "cuda"
        self.device = device  # the models' device, which need not be the current one
        # Every phase is listed, 0 where it did not run (max_new_tokens=1; a static tree builds no tree specs).
        self.seconds: dict[str, float] = dict.fromkeys(TIMED_PHASES, 0.0)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if self.sync:
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize(self.device)
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


# --------------------------------------------------------------------------------------------------
# Drafters: a causal LM, or an FSPAD head on the target's features
# --------------------------------------------------------------------------------------------------


class _DrafterRows:
    """What both drafters keep about a ragged batch (``generate`` at batch size > 1): the host length of each
    sequence's committed cache, the tree starts that follow from it, and the chain trees of the advances.

    At batch size 1 (``lens`` unused, ``tree_starts`` None) the draft tree is the end of the cache and the
    advance is a plain causal forward. In a ragged batch each sequence's committed entries are the first
    ``lens[b]`` rows of the cache; a draft tree starts at the sequence's last committed entry (``lens[b] - 1``,
    the root) and an advance is a chain tree that starts at ``lens[b]`` (``TreeAttentionContext.starts``).
    """

    impl: str

    def _rows_init(self) -> None:
        self.lens: list[int] = []
        self.tree_starts: torch.Tensor | None = None
        self._chains: dict[int, TreeSpec] = {}

    def _start_rows(self, lens: list[int], ragged: bool, device: torch.device) -> None:
        """A new ``generate``: committed lengths after the prefill (kept only for a ragged batch)."""
        if ragged:
            self._set_lens(lens, device)
        else:
            self.lens, self.tree_starts = [], None

    def _set_lens(self, lens: list[int], device: torch.device) -> None:
        self.lens = lens
        self.tree_starts = int64_to_device([n - 1 for n in lens], device).to(torch.int32)

    def _chain(self, counts: list[int], device: torch.device) -> tuple[TreeAttentionContext, torch.Tensor]:
        """The context of an advance by ``counts[b]`` entries per sequence (``max(counts)`` nodes; a sequence's
        nodes past its count are padding, written past its committed rows), and the index ``[B]`` of each
        sequence's last entry. Updates ``lens``."""
        width = max(counts)
        chain = self._chains.get(width)
        if chain is None:
            chain = self._chains[width] = tree_spec_from_parents(list(range(-1, width - 1)), device)
        batch = len(counts)
        index = int64_to_device(self.lens + [max(count - 1, 0) for count in counts], device)
        context = TreeAttentionContext(chain, self.impl, starts=index[:batch].to(torch.int32))
        self._set_lens([n + count for n, count in zip(self.lens, counts)], device)
        return context, index[batch:]

    def _tree_context(self, tree: TreeSpec) -> TreeAttentionContext:
        return TreeAttentionContext(tree, self.impl, starts=self.tree_starts)

    def select_rows(self, keep: list[int], index: torch.Tensor) -> None:
        """Keep only the sequences ``keep`` (``index``: the same as an int64 tensor) of a ragged batch: their
        cache rows and lengths; the cache is cropped to the longest of them."""
        self._set_lens([self.lens[i] for i in keep], index.device)
        self._select_cache(index, max(self.lens))


def _append_per_row(tokens: torch.Tensor, lengths: list[int], values: torch.Tensor) -> torch.Tensor:
    """``tokens [B, W]`` right-padded (row b holds ``lengths[b]`` tokens) with ``values[b]`` put at column
    ``lengths[b]``: ``[B, W + 1]``."""
    columns = int64_to_device(lengths, tokens.device)[:, None]
    return torch.cat([tokens, tokens[:, :1]], dim=1).scatter_(1, columns, values.view(-1, 1))


def _row_ends(lengths: list[int], width: int, logits_to_keep: bool, device: torch.device):
    """For a right-padded forward (row b holds ``lengths[b]`` of ``width`` positions): forward kwargs that keep
    only the logits needed (each row's last position) and the index of each row's in the returned sequence
    dimension (``None``: the last, every row full)."""
    if all(length == width for length in lengths):
        return ({"logits_to_keep": 1} if logits_to_keep else {}), None
    if not logits_to_keep:
        return {}, int64_to_device([length - 1 for length in lengths], device)
    keep = sorted({length - 1 for length in lengths})
    index = int64_to_device(keep + [keep.index(length - 1) for length in lengths], device)
    return {"logits_to_keep": index[:len(keep)]}, index[len(keep):]


def _pick_rows(values: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """``values [B, n, ...]`` -> ``[B, ...]``: entry ``index[b]`` of each row (the last when ``index`` is None)."""
    if index is None:
        return values[:, -1]
    return values[torch.arange(values.shape[0], device=values.device), index]


class _ModelDrafter(_DrafterRows):
    """A smaller ``transformers`` causal LM with its own ``DynamicCache``.

    The committed cache holds every token through the current root; each drafting level appends the
    expanded nodes (tree attention over root + expanded nodes) and :meth:`rollback` crops them.
    """

    needs_features = False

    def __init__(self, model: torch.nn.Module, impl: str, shared_vocab: int | None = None,
                 target_vocab: int | None = None):
        self.model = model
        self.impl = impl
        # A draft whose embedding matrices are padded to another size than the target's (one tokenizer): its
        # logits are cut to the shared_vocab ids and padded with -inf to the target's size; a committed id beyond
        # its input embedding reaches it as id 0 (its guesses suffer there, never the output).
        self.shared_vocab, self.target_vocab = shared_vocab, target_vocab
        self.input_rows = model.get_input_embeddings().weight.shape[0]
        self.cache_kwarg = _cache_kwarg(model)
        self.logits_to_keep = _supports_logits_to_keep(model)
        self.keep_last = {"logits_to_keep": 1} if self.logits_to_keep else {}
        self.cache = None
        self.committed = 0
        self._rows_init()

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, context: TreeAttentionContext, **extra):
        if self.target_vocab is not None and self.target_vocab > self.input_rows:
            tokens = torch.where(tokens < self.input_rows, tokens, 0)
        out = self.model(
            input_ids=tokens, position_ids=positions, use_cache=True,
            **{self.cache_kwarg: self.cache, CONTEXT_KWARG: context}, **extra,
        )
        if context.calls == 0:
            raise ValueError(
                f"draft ({type(self.model).__name__}) never called the registered attention function: its attention "
                f"does not go through transformers' AttentionInterface (unsupported model)"
            )
        if self.shared_vocab is None:
            return out.logits
        return torch.nn.functional.pad(out.logits[..., : self.shared_vocab],
                                       (0, self.target_vocab - self.shared_vocab), value=float("-inf"))

    def start(self, prompt: torch.Tensor, lengths: list[int], first_tokens: torch.Tensor,
              features: torch.Tensor | None, ragged: bool):
        """Commit each prompt (``prompt [B, W]`` right-padded, row b holding ``lengths[b]`` tokens) and its
        first generated token; returns the next-token logits ``[B, V]`` and no state."""
        self.cache = _full_cache("draft", self.model)
        tokens = _append_per_row(prompt, lengths, first_tokens)
        batch, width = tokens.shape
        positions = torch.arange(width, device=tokens.device)[None].expand(batch, width)
        lens = [length + 1 for length in lengths]
        keep, ends = _row_ends(lens, width, self.logits_to_keep, tokens.device)
        logits = self._forward(tokens, positions, TreeAttentionContext(impl=self.impl), **keep)
        self.committed = self.cache.get_seq_length()
        self._start_rows(lens, ragged, tokens.device)
        return _pick_rows(logits, ends), None

    def advance(self, tokens: torch.Tensor, positions: torch.Tensor, features: torch.Tensor | None,
                counts: list[int] | None = None):
        """Commit ``tokens [B, n]``; returns each sequence's next-token logits ``[B, V]`` and no state.

        ``counts`` None (batch size 1): a causal forward of all ``n``. Otherwise sequence ``b`` commits its
        first ``counts[b]`` tokens (a chain tree from its own end, see :class:`_DrafterRows`)."""
        if counts is None:
            logits = self._forward(tokens, positions, TreeAttentionContext(impl=self.impl), **self.keep_last)
            self.committed = self.cache.get_seq_length()
            return logits[:, -1], None
        context, last = self._chain(counts, tokens.device)
        logits = self._forward(tokens, positions, context)
        self.committed = max(self.lens)
        self.rollback()  # the padding of the longest advance beyond every sequence's entries
        return _pick_rows(logits, last), None

    def expand(self, tokens: torch.Tensor, parent_states, positions: torch.Tensor, tree: TreeSpec):
        """Append one level of tree nodes (``tokens [B, m]``: the last ``m`` nodes of ``tree``, whose node 0 is
        the committed root); returns their next-token logits ``[B, m, V]`` and no state."""
        return self._forward(tokens, positions, self._tree_context(tree)), None

    def rollback(self) -> None:
        _crop_cache(self.cache, self.committed)

    def _select_cache(self, index: torch.Tensor, length: int) -> None:
        _select_cache_rows(self.cache, index)
        self.committed = length
        self.rollback()


class _PenalizedDrafter:
    """A drafter whose next-token logits get the generation's repetition penalty over each sequence's committed
    tokens (the drafts on a node's path are left out: a cheaper rule that still makes the drafts follow the
    penalised target more often) and -inf at the tokens the target never takes (suppressed ids, one-token bad
    words); the verification alone decides the output. Everything else is the drafter's."""

    def __init__(self, drafter, penalize: Callable[[torch.Tensor], torch.Tensor]):
        self._drafter = drafter
        self._penalize = penalize

    def __getattr__(self, name: str):
        return getattr(self._drafter, name)

    def start(self, *args):
        logits, state = self._drafter.start(*args)
        return self._penalize(logits), state

    def advance(self, *args):
        logits, state = self._drafter.advance(*args)
        return self._penalize(logits), state

    def expand(self, *args):
        logits, state = self._drafter.expand(*args)
        return self._penalize(logits), state


class _CappedPositions:
    """A drafter whose tree expansions' position ids are capped per sequence (``caps [B, 1]``; see
    ``_Generation._position_caps``). Everything else is the drafter's."""

    def __init__(self, drafter, caps: torch.Tensor):
        self._drafter = drafter
        self._caps = caps

    def __getattr__(self, name: str):
        return getattr(self._drafter, name)

    def expand(self, tokens, parent_states, positions, tree):
        return self._drafter.expand(tokens, parent_states, torch.minimum(positions, self._caps), tree)


def _target_logit_map(target: torch.nn.Module) -> tuple[float, float | None]:
    """``(scale, softcap)`` with which ``target`` maps its last features to logits (``softcap(scale * lm_head)``;
    :func:`distill_ops.integrations.hf.logit_scale`, probed once). A target whose logits are some other map of
    its LM head's output drafts with the raw LM head: drafting only proposes tokens, and verification uses the
    target's own logits, so the output is unchanged either way."""
    from .integrations.hf import logit_scale, logit_softcap

    try:
        scale = logit_scale(target)
    except ValueError:
        scale = 1.0
    return scale, logit_softcap(target)


class _FSPADDrafter(_DrafterRows):
    """An :class:`~distill_ops.fspad.FSPADDraftHead` drafting from the target's features.

    Head entry ``t`` reads (feature of position ``t``, embedding of the token at ``t + 1``) and sits at
    position ``t + 1``. The committed entries use true target features; a tree node's entry reads the
    feature its parent's entry predicted (the regression half).
    """

    needs_features = True

    def __init__(self, head: torch.nn.Module, target: torch.nn.Module, impl: str):
        self.head = head
        self.embed = target.get_input_embeddings()
        self.lm_head = target.get_output_embeddings()
        self.logit_scale, self.softcap = _target_logit_map(target)
        self.impl = impl
        self.cache = None
        self._rows_init()

    def _logits(self, predict: torch.Tensor) -> torch.Tensor:
        """The target's logit map on the head's predicted features: ``softcap(scale * lm_head(predict))``."""
        logits = self.lm_head(predict)
        return softcapped(logits if self.logit_scale == 1.0 else logits * self.logit_scale, self.softcap)

    def start(self, prompt: torch.Tensor, lengths: list[int], first_tokens: torch.Tensor,
              features: torch.Tensor, ragged: bool):
        self.cache = self.head.new_cache()
        tokens = _append_per_row(prompt, lengths, first_tokens)[:, 1:]
        batch, width = tokens.shape
        positions = torch.arange(1, width + 1, device=tokens.device)[None].expand(batch, width)
        regress, predict = self.head(features[:, :width], self.embed(tokens), positions, cache=self.cache)
        self.cache.commit()
        _, ends = _row_ends(lengths, width, False, tokens.device)
        self._start_rows(list(lengths), ragged, tokens.device)
        return self._logits(_pick_rows(predict, ends)), _pick_rows(regress, ends)

    def advance(self, tokens: torch.Tensor, positions: torch.Tensor, features: torch.Tensor,
                counts: list[int] | None = None):
        """As :meth:`_ModelDrafter.advance`; returns the logits ``[B, V]`` and predicted features ``[B, d]``."""
        if counts is None:
            regress, predict = self.head(features, self.embed(tokens), positions, cache=self.cache)
            self.cache.commit()
            return self._logits(predict[:, -1]), regress[:, -1]
        context, last = self._chain(counts, tokens.device)
        regress, predict = self.head(features, self.embed(tokens), positions, cache=self.cache, tree=context)
        self.cache.commit(max(self.lens))
        return self._logits(_pick_rows(predict, last)), _pick_rows(regress, last)

    def expand(self, tokens: torch.Tensor, parent_states: torch.Tensor, positions: torch.Tensor, tree: TreeSpec):
        """``tokens [B, m]``, ``parent_states [B, m, d]``; returns logits ``[B, m, V]`` and states ``[B, m, d]``."""
        regress, predict = self.head(parent_states, self.embed(tokens), positions, cache=self.cache,
                                     tree=self._tree_context(tree))
        return self._logits(predict), regress

    def rollback(self) -> None:
        self.cache.rollback()

    def _select_cache(self, index: torch.Tensor, length: int) -> None:
        self.cache.select_rows(index)
        self.cache.commit(length)


# --------------------------------------------------------------------------------------------------
# Draft trees
# --------------------------------------------------------------------------------------------------


@dataclass
class _StaticPlan:
    """Everything about a static tree that does not depend on the tokens, prepared once."""

    tree: TreeSpec
    num_children_max: int  # how many of a parent's most likely tokens the drafter takes (the largest rank + 1)
    root_child_nodes: torch.Tensor  # nodes whose parent is the root
    root_child_ranks: torch.Tensor
    # per level d = 1 .. max_depth - 1: (eval nodes, draft-tree spec after appending them,
    #   appended index of each eval node's parent, child nodes, (row of the parent in this level, rank))
    levels: list[tuple[torch.Tensor, TreeSpec, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


def _static_plan(parents: list[int], device: torch.device, ranks: list[int] | None = None) -> _StaticPlan:
    """``ranks[i]``: node i drafts its parent's ``ranks[i]``-th most likely token (EAGLE paths' last entries);
    by default its position among its siblings in node order."""
    num_nodes = len(parents)
    depth = [0] * num_nodes
    children: list[list[int]] = [[] for _ in range(num_nodes)]
    for node in range(1, num_nodes):
        depth[node] = depth[parents[node]] + 1
        children[parents[node]].append(node)
    rank = [0] * num_nodes
    for kids in children:
        for position, kid in enumerate(kids):
            rank[kid] = position if ranks is None else ranks[kid]
    max_depth = max(depth)
    as_tensor = lambda values: torch.tensor(values, dtype=torch.int64, device=device)  # noqa: E731
    appended_index = {0: 0}
    appended_parents = [-1]
    levels = []
    for level in range(1, max_depth):
        eval_nodes = [n for n in range(num_nodes) if depth[n] == level and children[n]]
        for node in eval_nodes:
            appended_index[node] = len(appended_parents)
            appended_parents.append(appended_index[parents[node]])
        child_nodes = [kid for node in eval_nodes for kid in children[node]]
        child_rows = [row for row, node in enumerate(eval_nodes) for _ in children[node]]
        levels.append((
            as_tensor(eval_nodes),
            tree_spec_from_parents(appended_parents, device),
            as_tensor([appended_index[parents[n]] for n in eval_nodes]),
            as_tensor(child_nodes),
            as_tensor(child_rows),
            as_tensor([rank[kid] for kid in child_nodes]),
        ))
    return _StaticPlan(
        tree=tree_spec_from_parents(parents, device),
        num_children_max=max((rank[node] + 1 for node in range(1, num_nodes)), default=0),
        root_child_nodes=as_tensor(children[0]),
        root_child_ranks=as_tensor([rank[kid] for kid in children[0]]),
        levels=levels,
    )


def _level_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A drafting level's ``k`` best draft log-probabilities per row and their tokens, NaN read as ``-inf`` (a broken
    draft row ranks last, as verification reads NaN target logits): the candidates' scores stay totally ordered,
    which both paths' rankings need (the Triton kernels' pairwise ranks gave a NaN score and the best one rank 0,
    two writes to one node and one node left stale; ``torch.topk`` ranked NaN first; a race audit, 2026-12-07)."""
    return torch.topk(nan_as_neg_inf(torch.log_softmax(logits.float(), dim=-1)), k, dim=-1)


@torch.library.custom_op("distill_ops::eagle_level", mutates_args=("floats", "ints"))
def _eagle_level_op(values: torch.Tensor, indices: torch.Tensor, floats: torch.Tensor, ints: torch.Tensor,
                    layout: list[int], row_base: int, node_base: int, num_expand: int, position: int,
                    row_positions: torch.Tensor | None) -> None:
    """:class:`_DynamicPlan`'s level launch as an opaque op, for ``torch.compile`` (``kernels/eagle_tree.py``)."""
    from .kernels.eagle_tree import eagle_level_forward

    eagle_level_forward(values, indices, floats, ints, tuple(layout), row_base, node_base, num_expand, position,
                        row_positions)


@_eagle_level_op.register_fake
def _(values, indices, floats, ints, layout, row_base, node_base, num_expand, position, row_positions):
    return None


@torch.library.custom_op("distill_ops::eagle_select", mutates_args=("floats", "ints"))
def _eagle_select_op(values: torch.Tensor, indices: torch.Tensor, floats: torch.Tensor, ints: torch.Tensor,
                     layout: list[int], num_rows: int, last_row_base: int, root_token: int,
                     root_tokens: torch.Tensor | None) -> None:
    """:class:`_DynamicPlan`'s final selection as an opaque op, for ``torch.compile``."""
    from .kernels.eagle_tree import eagle_select_forward

    eagle_select_forward(values, indices, floats, ints, tuple(layout), num_rows, last_row_base, root_token,
                         root_tokens)


@_eagle_select_op.register_fake
def _(values, indices, floats, ints, layout, num_rows, last_row_base, root_token, root_tokens):
    return None


@dataclass
class _Workspace:
    """The Triton path's buffers for a batch of ``B`` sequences (``kernels/eagle_tree.py``), allocated once:
    float64 ``[B, F]`` and int64 ``[B, I]`` workspaces, the views the engine hands on (``[B, n]`` slices),
    the specs rebuilt in place over the parent views, and the empty last level of the one-node tree."""

    floats: torch.Tensor
    ints: torch.Tensor
    views: list[tuple[torch.Tensor, ...]]
    specs: list[tuple[TreeSpec, Callable[[], None]]]
    no_level: tuple[torch.Tensor, torch.Tensor]


class _DynamicPlan:
    """EAGLE-2 drafting on the device: the static sizes and index tables of a dynamic tree, prepared once.

    Every drafted token is a *candidate*, numbered in creation order: 0 is the root (score 0, the highest
    possible: log-probabilities are <= 0, and the lowest index, so always kept first), then level
    1's ``k = min(topk, V)`` children of the root, then each level's rows (one row per node expanded at
    the previous level, in expansion order: that node's ``k`` best children as ``torch.topk`` returns
    them). A candidate's score is its parent's plus its draft log-probability (float64, the sum the
    host bookkeeping used to compute in Python floats). Ranking is always "score descending, then
    candidate index ascending" (a stable descending sort: ``torch.topk`` promises no order among ties).

    Level ``l < depth`` expands its ``E_l = min(topk, F_l)`` best candidates (``F_l`` of them: ``k``
    at level 1, ``E_{l-1} k`` after): they become nodes ``b_l .. b_l + E_l - 1`` of the draft model's own
    tree (node 0 the committed root; what its cache holds while drafting), whose parents are
    ``b_{l-1} + position // k`` (a candidate's row is its parent's rank at the previous level). The
    verification tree keeps the ``T - 1`` best candidates after the root; ascending candidate index is
    breadth-first order (candidates are created level by level), and a kept candidate's parent, a kept
    candidate too (a child never outranks its parent: its log-probability is <= 0 and its index is
    larger), is found by a binary search among the kept indices.

    Every size is a host integer known here (``V`` included), so each step runs the same device ops on
    the same shapes and reads nothing back: the parent arrays are device tensors and the specs come from
    :func:`~distill_ops.tree.tree_spec_from_parents_tensor`, with ``max_depth`` / ``max_children``
    bounds (``min(depth, T - 1)`` / ``min(k, T - 1)``).

    Two paths, chosen by ``impl`` like the specs' builder, with identical results (trees, tokens,
    positions, the parent states gathered for an FSPAD head):

    * PyTorch (CPU, and the reference): per level float64 scores, a stable sort, slices, gathers and a
      ``cat`` of the draft tree's parents; at the end concatenations, sorts and a ``searchsorted``.
    * Triton (the engine's GPU path; ``kernels/eagle_tree.py``): one launch per expanding level and one
      for the final tree, into two workspaces allocated here (float64 scores, int64 tokens / nodes /
      trees), so a step allocates nothing for the bookkeeping: the draft tree's parent array is a
      growing prefix of one buffer, the expanded tokens and position ids and the verification tree's
      parents and tokens are views of it, made here once. Ranks are exact pairwise counts (no sort);
      the final launch also scores the last level, which needs no launch of its own. A step's tree
      phase is ``2 (depth - 1) + 2`` launches (each level's and the final one, each followed by its
      spec): 10 at ``depth=5``. The workspaces are rewritten by the next :meth:`draft`: the returned
      tree and tokens are valid until then (the engine uses them within the step). On the engine's tiny
      tree-greedy pair (depth 5, T = 32; ``python -m benchmarks.engine_overhead --impl triton``, CPU
      counts under the interpreter) the tree phase of a step went from 103 ATen ops (43 kernels, 5
      allocations, 5 launches) to 40 (no device kernel: the five specs' allocations and views) and 10
      launches. GPU time not measured. A batch of ``B`` sequences runs the same launches with one program
      per sequence (``[B, size]`` workspaces, made at the first step of that batch size; each sequence's
      position ids and root token read from ``[B]`` tensors).
    """

    def __init__(self, topk: int, depth: int, num_nodes: int, vocab: int, device: torch.device, impl: Impl = "auto"):
        self.impl = impl  # the specs' builder: one Triton launch each on the engine's Triton path
        self.triton = resolve_impl(impl, device) == "triton"
        self.k = min(topk, vocab)
        self.depth = depth if num_nodes > 1 else 0  # a one-node tree drafts nothing
        level_sizes, self.expanded = [self.k], []
        for _ in range(1, self.depth):
            self.expanded.append(min(topk, level_sizes[-1]))
            level_sizes.append(self.expanded[-1] * self.k)
        num_candidates = 1 + sum(level_sizes[: self.depth])
        self.num_tree_nodes = min(num_nodes, num_candidates)
        self.max_depth = min(self.depth, self.num_tree_nodes - 1)
        self.max_children = min(self.k, self.num_tree_nodes - 1)
        # First draft-tree node of each level (b_0 = 0: the root) and first candidate of each level.
        self.node_bases = [0]
        for count in [1] + self.expanded:
            self.node_bases.append(self.node_bases[-1] + count)
        if self.triton:
            self._init_workspaces(device)
        # The PyTorch path's tables.
        level_starts = [1]
        for size in level_sizes[:-1]:
            level_starts.append(level_starts[-1] + size)
        # expanded ids = [-1 (the root's parent), 0 (the root), the expanded candidates level by level]:
        # each candidate's parent is entry parent_slot[c]; the expanded entries are each level's ranks
        # plus the level's first candidate index (expanded_offsets).
        expanded_offsets = [0, 0]
        for level, count in enumerate(self.expanded, start=1):
            expanded_offsets += [level_starts[level - 1]] * count
        parent_slot = [0] + [1] * level_sizes[0]
        first_slot = 2
        for level in range(2, self.depth + 1):
            parent_slot += [first_slot + position // self.k for position in range(level_sizes[level - 1])]
            first_slot += self.expanded[level - 2]
        static = int64_to_device([-1] + [-1, 0] + expanded_offsets + parent_slot, device)
        self.root_parent, self.expanded_head, self.expanded_offsets, self.parent_slot = static.split(
            [1, 2, len(expanded_offsets), len(parent_slot)]
        )
        self.root_score = torch.zeros(1, dtype=torch.float64, device=device)

    def _init_workspaces(self, device: torch.device) -> None:
        """The Triton path's layout (``kernels/eagle_tree.py``): candidates are rows of ``k`` after the root,
        one row per draft-tree node (``node_bases[depth]`` of them); and the workspace of one sequence (the
        engine's batch size 1), made here so that no step allocates."""
        from .kernels.eagle_tree import section_offsets

        self.num_rows = self.node_bases[self.depth] if self.depth else 0
        self.last_row_base = self.node_bases[self.depth - 1] if self.depth else 0
        num_draft_nodes = max(self.num_rows, 1)
        self.layout = (1 + self.num_rows * self.k, num_draft_nodes, self.num_tree_nodes)
        _, self.int_offsets, self.float_size, self.int_size = section_offsets(*self.layout)
        # Per expanding level: the draft tree's parents (a prefix) and the expanded nodes' parents, tokens
        # and position ids; then the verification tree's parents and tokens.
        self.view_bounds = [
            (("node_parents", 0, first + count), ("node_parents", first, first + count),
             ("node_tokens", first, first + count), ("node_positions", first, first + count))
            for first, count in zip(self.node_bases[1:], self.expanded)
        ]
        self.view_bounds.append((("tree_parents", 0, self.num_tree_nodes), ("tree_tokens", 0, self.num_tree_nodes)))
        self.workspaces: dict[int, _Workspace] = {}
        self._workspace(1, device)

    def _workspace(self, batch: int, device: torch.device) -> _Workspace:
        """The workspace of ``batch`` sequences, made at its first use (batch size 1: at construction)."""
        workspace = self.workspaces.get(batch)
        if workspace is not None:
            return workspace
        # Node 0, the root: score 0 (a zero workspace), candidate 0 and parent -1, written once here.
        floats = torch.zeros(batch, self.float_size, dtype=torch.float64, device=device)
        initial = [0] * self.int_size
        initial[self.int_offsets["node_parents"]] = -1
        ints = int64_to_device(initial * batch, device).view(batch, self.int_size)
        views = self._workspace_views(ints)
        # Eager steps rebuild each spec in place over these parent views (one launch, nothing allocated).
        specs = [tree_spec_in_place(level_views[0], level, self.k) for level, level_views in enumerate(views[:-1], 1)]
        specs.append(tree_spec_in_place(views[-1][0], self.max_depth, self.max_children))
        # The one-node tree has no last level: the final launch reads nothing from these.
        no_level = (torch.zeros(batch, 1, 1, device=device), torch.zeros(batch, 1, 1, dtype=torch.int64, device=device))
        workspace = self.workspaces[batch] = _Workspace(floats, ints, views, specs, no_level)
        return workspace

    def _workspace_views(self, ints: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """The views of ``view_bounds``: ``[B, n]`` slices of the int64 workspace."""
        return [tuple(ints[:, self.int_offsets[name] + start: self.int_offsets[name] + stop]
                      for name, start, stop in bounds) for bounds in self.view_bounds]

    def draft(self, drafter, root_logits: torch.Tensor, root_state: torch.Tensor | None,
              root_token: int | torch.Tensor, root_pos: int | torch.Tensor, timer: Callable
              ) -> tuple[TreeSpec, torch.Tensor]:
        """Draft one tree per sequence: the verification :class:`TreeSpec` and its tokens ``[B, T]`` (node 0:
        the root token).

        ``root_logits [B, V]`` and ``root_state [B, d]`` (or None) are the draft's outputs at the roots;
        ``root_token`` / ``root_pos``: host integers at batch size 1, else int64 ``[B]`` / ``[B, 1]`` tensors.
        ``drafter.expand(tokens [B, E], parent_states [B, E, d], positions [B, E], draft_tree)`` runs the
        draft on each level's expanded nodes (the last ``E`` nodes of ``draft_tree``) and returns their
        next-token logits ``[B, E, V]`` and states (``None`` for a draft LM; FSPAD's predicted features
        otherwise). Device ops only; ``timer("tree")`` wraps the candidate bookkeeping and the specs.
        """
        if self.triton:
            return self._draft_triton(drafter, root_logits, root_state, root_token, root_pos, timer)
        batch, device = root_logits.shape[0], root_logits.device
        scores = [self.root_score.expand(batch, 1)]
        if isinstance(root_token, int):
            tokens = [torch.full((batch, 1), root_token, dtype=torch.int64, device=device)]
        else:
            tokens = [root_token.view(batch, 1)]
        ranks = []  # each expanded level's chosen positions among its candidates
        states = None if root_state is None else root_state[:, None]
        logits, parent_scores, draft_parents = root_logits[:, None], None, self.root_parent.expand(batch, 1)
        for level in range(1, self.depth + 1):
            values, indices = _level_topk(logits, self.k)
            with timer("tree"):
                # float64 (type promotion of the float32 log-probs): the sums the host rule used.
                level_scores = values.double() if parent_scores is None else parent_scores[:, :, None] + values
                level_scores, level_tokens = level_scores.flatten(1), indices.flatten(1)
                scores.append(level_scores)
                tokens.append(level_tokens)
                if level == self.depth:
                    break
                best = torch.sort(level_scores, dim=1, descending=True, stable=True).indices
                best = best[:, : self.expanded[level - 1]]
                ranks.append(best)
                parent_scores = level_scores.gather(1, best)
                parent_nodes = best // self.k + self.node_bases[level - 1]
                draft_parents = torch.cat([draft_parents, parent_nodes], dim=1)
                draft_tree = tree_spec_from_parents_tensor(draft_parents, level, self.k, impl=self.impl)
                expanded_tokens = level_tokens.gather(1, best)
                if isinstance(root_pos, int):
                    expanded_positions = torch.full_like(best, root_pos + level)
                else:
                    expanded_positions = (root_pos + level).expand_as(best)
            parent_states = None
            if states is not None:
                parent_states = states.gather(1, parent_nodes[:, :, None].expand(-1, -1, states.shape[-1]))
            logits, new_states = drafter.expand(expanded_tokens, parent_states, expanded_positions, draft_tree)
            if states is not None:
                states = torch.cat([states, new_states], dim=1)
        with timer("tree"):
            all_scores, all_tokens = torch.cat(scores, dim=1), torch.cat(tokens, dim=1)
            order = torch.sort(all_scores, dim=1, descending=True, stable=True).indices
            kept = order[:, : self.num_tree_nodes].sort(dim=1).values  # breadth-first: candidates in level order
            expanded_ids = torch.cat([self.expanded_head.expand(batch, 2), *ranks], dim=1) + self.expanded_offsets
            parents = torch.searchsorted(kept, expanded_ids.gather(1, self.parent_slot[kept]), right=True) - 1
            tree = tree_spec_from_parents_tensor(parents, self.max_depth, self.max_children, impl=self.impl)
            return tree, all_tokens.gather(1, kept)

    def _draft_triton(self, drafter, root_logits, root_state, root_token, root_pos, timer):
        """:meth:`draft` on the Triton path: one launch per expanding level, one for the final tree (one
        program per sequence of a batch)."""
        from .kernels.eagle_tree import eagle_level_forward, eagle_select_forward

        batch = root_logits.shape[0]
        workspace = self._workspace(batch, root_logits.device)
        # Eager calls launch directly: the custom ops that make the launches traceable cost a dispatcher
        # round trip of host time each (see distill_ops.tree.tree_spec_from_parents_tensor).
        compiling = torch.compiler.is_compiling()
        level_launch = _eagle_level_op if compiling else eagle_level_forward
        select_launch = _eagle_select_op if compiling else eagle_select_forward
        layout = list(self.layout) if compiling else self.layout
        # Traced code slices the workspace itself: outputs that are views of views made outside the graph
        # do not survive functionalization.
        views = self._workspace_views(workspace.ints) if compiling else workspace.views
        # Position ids and root tokens: host integers for one sequence, each sequence's own in a batch.
        if isinstance(root_pos, int):
            base_pos, row_positions = root_pos, None
        else:
            base_pos, row_positions = 0, root_pos.view(batch)
        if isinstance(root_token, int):
            base_token, root_tokens = root_token, None
        else:
            base_token, root_tokens = 0, root_token.view(batch)
        states = None if root_state is None else root_state[:, None]
        logits = root_logits[:, None]
        values, indices = workspace.no_level
        for level in range(1, self.depth + 1):
            values, indices = _level_topk(logits, self.k)
            if level == self.depth:
                break  # the final launch scores the last level
            with timer("tree"):
                draft_parents, parent_nodes, expanded_tokens, expanded_positions = views[level - 1]
                level_launch(values, indices, workspace.floats, workspace.ints, layout, self.node_bases[level - 1],
                             self.node_bases[level], self.expanded[level - 1], base_pos + level, row_positions)
                draft_tree = self._spec(workspace, level - 1, draft_parents, level, self.k, compiling)
            parent_states = None
            if states is not None:
                parent_states = states.gather(1, parent_nodes[:, :, None].expand(-1, -1, states.shape[-1]))
            logits, new_states = drafter.expand(expanded_tokens, parent_states, expanded_positions, draft_tree)
            if states is not None:
                states = torch.cat([states, new_states], dim=1)
        with timer("tree"):
            select_launch(values, indices, workspace.floats, workspace.ints, layout, self.num_rows,
                          self.last_row_base, base_token, root_tokens)
            tree_parents, tree_tokens = views[-1]
            tree = self._spec(workspace, -1, tree_parents, self.max_depth, self.max_children, compiling)
            return tree, tree_tokens

    def _spec(self, workspace: _Workspace, index: int, parents: torch.Tensor, max_depth: int, max_children: int,
              compiling: bool):
        """The spec of ``parents``: eager, rebuilt in place over the workspace's buffer ``index``; traced, built
        anew (the in-place buffers are views made outside the graph)."""
        if compiling:
            return tree_spec_from_parents_tensor(parents, max_depth, max_children, impl=self.impl)
        spec, rebuild = workspace.specs[index]
        rebuild()
        return spec


# --------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------


@dataclass
class SpeculativeOutput:
    """Result of :meth:`SpeculativeDecoder.generate`.

    Attributes:
        sequences: int64 ``[B, L + new]``: each input row as given (padding included), then its generated
            tokens, then ``pad_token_id`` up to the longest (as ``generate`` returns).
        num_target_forwards: target forward passes (the prefill included; a batch shares them).
        accept_lengths: accepted draft tokens per verification step (the bonus token excluded), as the
            verifier accepted them: on a sequence's last step, before the cut at EOS / ``max_new_tokens``
            (a measure of the draft, which can exceed what that step emitted; trees are cut near
            ``max_new_tokens`` to the depth the furthest-behind sequence can still keep); in a batch, every
            sequence's steps while it was unfinished, sequence after sequence.
        timings: seconds per phase: ``prefill`` (target and draft prefill), ``draft`` (draft forwards and
            tree selection, including ``tree``: building the tree specs), ``target`` (target forwards over
            the trees), ``verify``, ``compaction`` and ``total``. With ``profile=True`` the CUDA stream is
            synchronised at phase boundaries (device times); otherwise they are host times.
        prompt_length: ``L``.
        row_accept_lengths: ``accept_lengths`` of each sequence.
        scores: with ``output_scores=True``, per input sequence an fp32 ``[new tokens, V]`` tensor: row ``k`` holds
            the scores the ``k``-th new token was chosen from, as ``generate``'s ``scores[k][b]`` (the target's
            logits after every processor, and after the warpers when sampling); None otherwise.
        logits: with ``output_logits=True``, likewise the target's unprocessed logits (``generate``'s ``logits``,
            fp32); None otherwise.
    """

    sequences: torch.Tensor
    num_target_forwards: int
    accept_lengths: list[int]
    timings: dict[str, float]
    prompt_length: int = 0
    row_accept_lengths: list[list[int]] = field(default_factory=list)
    scores: list[torch.Tensor] | None = None
    logits: list[torch.Tensor] | None = None

    @property
    def num_new_tokens(self) -> int:
        """Generated tokens (the sequence minus the prompt)."""
        return self.sequences.shape[1] - self.prompt_length

    @property
    def mean_accept_length(self) -> float:
        """Mean accepted draft tokens per verification step plus the bonus token (from ``accept_lengths``:
        the last step counts what the verifier accepted, also beyond a cut at EOS, or at ``max_new_tokens``
        for a sequence of a batch ahead of another)."""
        return sum(self.accept_lengths) / len(self.accept_lengths) + 1.0 if self.accept_lengths else 0.0


class SpeculativeDecoder:
    """Speculative decoding of a ``transformers`` causal LM with a draft tree verified in one target pass.

    Args:
        target: a decoder-only ``transformers`` causal LM whose attention goes through the
            ``AttentionInterface`` (Llama, Qwen2, Mistral families...), in ``eval()`` mode.
        draft: a smaller ``transformers`` causal LM with the same vocabulary, or an
            :class:`~distill_ops.fspad.FSPADDraftHead` built for ``target``; on the target's device (a head
            also in its dtype; a draft LM may have another dtype).
        depth, topk, num_nodes: the dynamic (EAGLE-2) tree: ``depth`` draft levels, each expanding the
            ``topk`` best nodes of the previous level into their ``topk`` most likely children; the tree
            keeps the root and the ``num_nodes - 1`` candidates with the highest cumulative draft
            log-probability (``num_nodes <= 256``, and ``1 + topk * (depth - 1) <= 256`` too, whatever
            ``num_nodes``: a ``ValueError`` otherwise).
        tree: a static tree instead: EAGLE-style paths of child ranks (``[[0], [1], [0, 0], ...]``; the node
            with rank ``r`` under a parent drafts the parent's ``r``-th most likely token), a parent array
            (1-D int tensor) or the ``TreeSpec`` of one tree (:func:`~distill_ops.tree.build_tree`); a parent
            array's children take ranks 0, 1, ... in node order. ``depth``, ``topk`` and ``num_nodes`` are then
            unused.
        impl: ``impl`` of the tree attention, verification and compaction ops.
        vocab_size: for a draft LM whose embedding matrices are padded to another size than the target's while
            both use one tokenizer (Qwen2.5-0.5B has 151936 rows, Qwen2.5-7B 152064): the number of token ids
            they share, at most both sizes. The draft then proposes only ids below it (its other logits are
            masked) and a committed id it has no embedding row for reaches it as id 0 (only its guesses suffer).
            The target's logits are untouched: the output is the target's exactly as with equal sizes. ``None``:
            the sizes must be equal.
        profile: synchronise the CUDA stream at phase boundaries so that ``timings`` are device times.

    Targets with ``dynamic`` / ``longrope`` RoPE or chunked attention layers are limited to sequences (prompt +
    ``max_new_tokens`` - 1, as ``generate``'s last forward; for a batch of several sequences + the tree depth)
    within their original context / first chunk, and models with multi-head latent attention are refused (see
    :func:`_position_limit`). Near ``max_new_tokens`` a step's tree is cut to the depth whose drafts could
    still be kept (:meth:`_plans_within`).
    """

    def __init__(
        self,
        target: torch.nn.Module,
        draft: torch.nn.Module,
        *,
        depth: int = 5,
        topk: int = 4,
        num_nodes: int = 32,
        tree: Sequence[Sequence[int]] | torch.Tensor | TreeSpec | None = None,
        impl: Impl = "auto",
        profile: bool = False,
        vocab_size: int | None = None,
    ):
        from .fspad import FSPADDraftHead

        _check_causal_lm("target", target)
        check_choice("impl", impl, IMPLS)  # at construction for static trees too (a dynamic plan resolves it)
        check_flag("profile", profile)
        depth, topk, num_nodes = (check_int(name, value, low=1) for name, value in
                                  (("depth", depth), ("topk", topk), ("num_nodes", num_nodes)))
        if num_nodes > MAX_TREE_NODES:
            raise ValueError(f"num_nodes must be <= {MAX_TREE_NODES} (the tree ops' limit), got {num_nodes}")
        if 1 + topk * max(depth - 1, 0) > MAX_TREE_NODES:
            raise ValueError(
                f"1 + topk * (depth - 1) draft nodes must be <= {MAX_TREE_NODES}, got topk={topk}, depth={depth}"
            )
        target_param = next(target.parameters())
        if target_param.dtype not in FLOAT_DTYPES:
            # Verification takes float32 / float16 / bfloat16 logits: a float64 target failed at the first step,
            # after its forwards, naming an internal argument (target_logits; an audit of bad inputs, 2026-12-07).
            raise TypeError(f"target must have float32, float16 or bfloat16 weights (the verification of its logits "
                            f"takes those), got {target_param.dtype}")
        vocab = _vocab_size(target)
        if isinstance(draft, FSPADDraftHead):
            if vocab_size is not None:
                raise ValueError("vocab_size applies to a draft LM; an FSPADDraftHead drafts with the target's LM head")
            if draft.vocab_size != vocab or draft.hidden_size != target.get_output_embeddings().weight.shape[1]:
                raise ValueError(
                    f"draft FSPADDraftHead was built for vocabulary {draft.vocab_size} and hidden size "
                    f"{draft.hidden_size}, but the target has vocabulary {vocab} and hidden size "
                    f"{target.get_output_embeddings().weight.shape[1]}"
                )
            self._drafter = _FSPADDrafter(draft, target, impl)
        else:
            _check_causal_lm("draft", draft)
            draft_vocab = _vocab_size(draft)
            vocab_size = check_int("vocab_size", vocab_size, low=1, optional=True)
            if vocab_size is None and draft_vocab != vocab:
                raise ValueError(
                    f"draft vocabulary size {draft_vocab} differs from the target's {vocab}: the draft must share the "
                    f"target's tokenizer; if both are padded to different sizes (one tokenizer), pass vocab_size= the "
                    f"number of token ids they share"
                )
            if vocab_size is not None and vocab_size > min(draft_vocab, vocab):
                raise ValueError(
                    f"vocab_size must be <= both models' vocabulary sizes (draft {draft_vocab}, target {vocab}), "
                    f"got {vocab_size}"
                )
            self._drafter = _ModelDrafter(draft, impl, vocab_size, None if vocab_size is None else vocab)
        target_device, draft_device = _model_device("target", target), _model_device("draft", draft)
        if draft_device != target_device:
            raise ValueError(f"draft is on {draft_device} but target is on {target_device}")
        draft_param = next(draft.parameters())
        if isinstance(draft, FSPADDraftHead) and draft_param.dtype != target_param.dtype:
            raise TypeError(f"draft head has dtype {draft_param.dtype} but the target has {target_param.dtype}")
        if impl == "triton" and resolve_impl(impl, target_device) == "triton":
            # The tree forwards' kernel limits, when the engine is built (they failed at the first tree forward).
            for name, model, dtype in (("target", target, target_param.dtype), ("draft", draft, draft_param.dtype)):
                problem = triton_head_dim_problem(_attention_head_dim(model), dtype)
                if problem:
                    raise ValueError(f"impl='triton': the {name} ({type(model).__name__})'s tree attention {problem}; "
                                     f"impl='auto' runs it on the PyTorch path")
        self.target = target
        self.draft = draft
        self.depth, self.topk, self.num_nodes = depth, topk, num_nodes
        self.impl = impl
        self.profile = profile
        self.device = target_device
        self.vocab_size = vocab
        self._cache_kwarg = _cache_kwarg(target)
        self._position_limit = _position_limit(target)
        # The position every forward's ids must stay below: a learned table's size or the target's limit above.
        bounds = [_position_table(target, draft), self._position_limit and self._position_limit[1]]
        bounds = [bound for bound in bounds if bound is not None]
        self._position_bound = min(bounds) if bounds else None
        self._keep_last = {"logits_to_keep": 1} if _supports_logits_to_keep(target) else {}
        self._root_tree = tree_spec_from_parents([-1], self.device)
        self._static = self._dynamic = None
        self.max_tree_nodes = max(num_nodes, 1 + topk * (depth - 1))
        if tree is None:
            self._dynamic = _DynamicPlan(topk, depth, num_nodes, vocab, self.device, impl)
        else:
            ranks = None
            if isinstance(tree, TreeSpec):  # one tree (parents [1, T]); its parents read once, at construction
                if tree.parents.shape[0] != 1:
                    raise ValueError(f"tree must be one tree, got a TreeSpec of {tree.parents.shape[0]} trees")
                tree = tree.parents[0]
            if isinstance(tree, torch.Tensor):
                check_tensor("tree", tree, dtypes=INT_DTYPES, ndim=1)
                parents = build_tree(tree).parents[0].tolist()
            else:
                parents = tree_from_paths(tree).tolist()
                ranks = [0] + [path[-1] for path in ordered_paths(tree)]
            self._static = _static_plan(parents, self.device, ranks)
            # Host values of the static tree for its cut plans (one read of the depths, at construction).
            self._static_nodes = (parents, ranks, self._static.tree.depth[0].tolist())
            if self._static.num_children_max > vocab:
                raise ValueError(
                    f"tree drafts a node's top-{self._static.num_children_max} tokens, more than the vocabulary "
                    f"of {vocab} tokens has"
                )
            self.max_tree_nodes = len(parents)
        self.tree_depth = self._dynamic.max_depth if tree is None else self._static.tree.max_depth
        self._shallow_plans = [self._shallow_plan(depth) for depth in range(self.tree_depth)]
        self._cut_trees = True  # False: full trees at every step (tests, benchmarks.engine_overhead)
        self._built = True

    # Built from at construction (the drafter, the tree plans, the checks of the models): setting one afterwards was
    # ignored (depth), half applied (impl: verification only) or failed later (draft = None); an audit of bad
    # inputs, 2026-12-07.
    _FIXED_WHEN_BUILT = ("target", "draft", "depth", "topk", "num_nodes", "impl", "device", "vocab_size",
                         "max_tree_nodes", "tree_depth")

    def __setattr__(self, name: str, value: object) -> None:
        if name in self._FIXED_WHEN_BUILT and getattr(self, "_built", False):
            raise AttributeError(f"SpeculativeDecoder.{name} is fixed when the engine is built (its drafter and tree "
                                 f"plans are built from it): build another SpeculativeDecoder")
        if name == "profile":
            check_flag("profile", value)
        object.__setattr__(self, name, value)

    def _shallow_plan(self, depth: int) -> tuple[_StaticPlan | None, _DynamicPlan | None]:
        """The (static, dynamic) plan of the tree cut to ``depth`` levels (see :meth:`_plans_within`)."""
        if depth == 0:
            return _static_plan([-1], self.device), None
        if self._static is None:
            return None, _DynamicPlan(self.topk, depth, self.num_nodes, self.vocab_size, self.device, self.impl)
        parents, ranks, node_depth = self._static_nodes
        kept = [node for node in range(len(parents)) if node_depth[node] <= depth]
        index = {node: row for row, node in enumerate(kept)}
        return _static_plan([-1] + [index[parents[node]] for node in kept[1:]], self.device,
                            None if ranks is None else [ranks[node] for node in kept]), None

    def _plans_within(self, depth: int) -> tuple[_StaticPlan | None, _DynamicPlan | None]:
        """The (static, dynamic) plan of a step whose tree needs no node deeper than ``depth``: a step that
        may emit at most ``depth + 1`` more tokens (the drafts accepted, then the bonus token) before
        ``max_new_tokens``. Deeper nodes could only be cut, so near the end the tree is cut to ``depth``
        levels: a static tree to its nodes at depth <= ``depth`` (node order and ranks kept), a dynamic one
        drafted ``depth`` levels deep with the same ``topk`` / ``num_nodes``, and at depth 0 the root alone
        (no drafting). The shorter trees cost fewer draft levels and target rows, and no tree position goes
        past the last one ``generate`` computes. All are made with the engine (no step prepares a plan)."""
        if depth >= self.tree_depth or not self._cut_trees:
            return self._static, self._dynamic
        return self._shallow_plans[depth]

    # ---------------------------------------------------------------------------------------------

    def generate(
        self,
        input_ids: torch.Tensor,
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        typical_p: float | None = None,
        epsilon_cutoff: float | None = None,
        eta_cutoff: float | None = None,
        top_h: float | None = None,
        repetition_penalty: float | None = None,
        min_new_tokens: int | None = None,
        no_repeat_ngram_size: int | None = None,
        bad_words_ids: Sequence[Sequence[int]] | None = None,
        sequence_bias: Sequence | dict | None = None,
        forced_eos_token_id: int | Sequence[int] | None = None,
        encoder_repetition_penalty: float | None = None,
        encoder_no_repeat_ngram_size: int | None = None,
        exponential_decay_length_penalty: tuple[int, float] | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        generator: torch.Generator | None = None,
        attention_mask: torch.Tensor | None = None,
        pad_token_id: int | None = None,
        step_callback: Callable[[torch.Tensor, object], None] | None = None,
        streamer: object | None = None,
        stopping_criteria: Sequence[Callable] | None = None,
        stop_strings: str | Sequence[str] | None = None,
        tokenizer: object | None = None,
        generation_config: object | None = None,
        logits_processor: Sequence[Callable] | None = None,
        prefix_allowed_tokens_fn: Callable[[int, torch.Tensor], Sequence[int]] | None = None,
        output_scores: bool = False,
        output_logits: bool = False,
    ) -> SpeculativeOutput:
        """Generate up to ``max_new_tokens`` tokens after each prompt of ``input_ids``.

        Args:
            input_ids: integer ``[B, L]`` (or ``[L]``) prompts on the target's device, ``L >= 1``.
            max_new_tokens: >= 1.
            temperature: 0 for greedy decoding (identical to ``target.generate(do_sample=False)``), > 0 to
                sample: the distribution of ``target.generate(do_sample=True, temperature=..., top_k=...,
                top_p=...)`` with the same three values passed explicitly (``None`` disables a filter), up to
                exact ties at the top-p cut: all kept here (:func:`~distill_ops.verify.verify_sampling`'s rule),
                where transformers' top-p keeps a sorted prefix and so drops some of them.
            min_p, typical_p, epsilon_cutoff, eta_cutoff, top_h: transformers' other sampling warpers (ignored
                when greedy; ``None``: the target's ``generation_config`` value, as ``generate`` reads them). When
                one is active the engine builds ``generate``'s own warper list (temperature, top-h, top-k, top-p,
                min-p, typical, epsilon, eta, in its order) and applies it to every node row of the target's
                logits before lossless verification at temperature 1: the distribution is ``generate``'s, top-p's
                ties included (a sort of each node row: O(B·T·V log V) per step).
            top_k, top_p: filters of the target distribution when sampling (ignored when greedy). Only these
                arguments count: the target's ``generation_config`` sampling fields (``do_sample``,
                ``temperature``, ``top_k``, ``top_p``) are not read, and ``top_k=None`` means no top-k, where
                ``generate`` left to its defaults applies ``top_k=50`` (:meth:`hf_generate` applies those defaults).
                ``top_k=0`` also means no top-k, as in ``generate``.
            repetition_penalty: transformers' repetition penalty (> 0; 1 = none), greedy or sampling, applied
                to the target's logits exactly as ``generate`` does: at each tree node, each token the sequence
                holds up to that node (its prompt, its generated tokens, the drafts on the node's path) has its
                fp32 logit divided by the penalty where positive, multiplied where negative, once, before
                temperature / top-k / top-p. ``None`` uses the target's ``generation_config.repetition_penalty``
                as ``generate`` does (Qwen2.5-Instruct checkpoints ship 1.05). The drafts are ranked with the
                penalty on the committed tokens only (:class:`_PenalizedDrafter`; drafts only change how many
                tokens are accepted, never the output).
            min_new_tokens: no EOS before this many new tokens (the EOS logits are -inf until then, as
                ``generate``'s processor sets them), ``None``: the target's ``generation_config.min_new_tokens``.
                The generation config's ``min_length`` (prompt included, each sequence's own prompt), and its
                ``suppress_tokens`` (never generated) and ``begin_suppress_tokens`` (not as the first new token)
                are applied too, as ``generate`` applies them.
            no_repeat_ngram_size, bad_words_ids, sequence_bias, forced_eos_token_id: ``generate``'s options of
                these names (``None``: the target's ``generation_config`` value), applied at every tree node from
                the sequence up to that node (:mod:`distill_ops.generation_rules`), greedy or sampling: no n-gram
                of ``no_repeat_ngram_size`` tokens twice (the prompt included); each ``bad_words_ids`` entry's last
                token banned after its other tokens (a one-token entry everywhere, except an EOS id, which
                ``generate`` drops); each ``sequence_bias`` entry (``[[ids, bias], ...]`` or ``{tuple: bias}``)
                adds its bias to its last token's logit after its other tokens, before the repetition penalty;
                ``forced_eos_token_id`` (one id or a list) is the only token allowed (logit 0) as the
                ``max_new_tokens``-th new token. The drafts skip the suppressed ids and one-token bad words; the
                other rules do not rank them (only acceptance would change).
            encoder_repetition_penalty, encoder_no_repeat_ngram_size, exponential_decay_length_penalty:
                ``generate``'s options (``None``: the generation config's), which on a decoder-only model act on
                the prompt (its "encoder input"), applied at every tree node as ``generate`` applies them: the
                prompt's tokens have their fp32 logits multiplied by the penalty where positive, divided where
                negative; no token that completes an n-gram of the prompt; from ``start_index`` new tokens on,
                the EOS logits grow by ``|logit| * (decay_factor ** (new tokens - start_index) - 1)``. In a batch
                each sequence's own prompt counts (``generate`` would count left padding).
            eos_token_id: token id(s) that end generation (kept in the output; Python or NumPy ints); ``None``
                uses the target's ``generation_config.eos_token_id`` as ``generate`` does.
            generator: the only source of randomness when sampling.
            attention_mask: ``[B, L]`` of 0 / 1 for prompts of different lengths (1 = token; each row's
                tokens contiguous, as left padding makes them). ``None``: every position is a token. Right
                padding (or a run in the middle) decodes each sequence as alone too; ``sequences`` then holds
                the input row as given, padding included, before the new tokens.
            pad_token_id: fills a finished sequence up to the longest one (batch size > 1, as ``generate``
                pads); ``None`` uses the target's ``generation_config.pad_token_id``, else the first EOS id, else
                0.
            step_callback: called after the prefill and after each verification step with
                ``(sequences, cache)``: the committed tokens (the last one is the next root, not yet in the
                cache), ``[1, n]`` at batch size 1 and, for a batch, a list of one ``[1, n_b]`` tensor per
                sequence still in the batch, in input order (entry ``b``'s cache entries are the first
                ``n_b - 1`` positions of cache row ``b``; a sequence is listed up to the step it finished in,
                then leaves the batch while the others go on), and the target's ``DynamicCache``.
            streamer: a transformers streamer (``TextStreamer``, ``TextIteratorStreamer``, any object with
                ``put`` and ``end``), batch size 1 as for ``generate``: ``put`` gets the prompt (``input_ids`` on
                the CPU), then each step's emitted tokens as one ``[1, n]`` CPU tensor (as transformers' assisted
                decoding puts them; up to ``depth + 1`` tokens per step), and ``end()`` is called once the last
                token is out.
            stopping_criteria: transformers stopping criteria (a ``StoppingCriteriaList`` or a list of
                ``StoppingCriteria`` / callables ``(input_ids, scores) -> bool tensor``), checked as ``generate``
                checks them: after every new token, on the sequence so far (``[1, n]`` on the target's device, each
                sequence alone; ``scores`` is None). A sequence ends with the first token after which one holds,
                that token kept, also inside an accepted path (transformers' assisted decoding checks once per
                step, after all of the step's tokens). Costs one device-to-host read per step (whole batch): the
                criteria are called for each of the step's tokens before the read, so a stateful criterion also
                sees the tokens after the first stop of a step (their results are discarded). In a batch each
                sequence is checked alone, on ``[1, n]`` (``generate`` passes ``[B, n]`` once per step).
            stop_strings, tokenizer: ``generate``'s stop strings (``None``: the target's
                ``generation_config.stop_strings``), checked as above with transformers' ``StopStringCriteria``,
                which needs the ``tokenizer``.
            logits_processor: the caller's logits processors (a transformers ``LogitsProcessorList`` or a list of
                callables ``(input_ids, scores) -> scores``), applied as ``generate`` applies them: after its own
                processors, before the warpers, on fp32 scores. At every tree node, on the node's own sequence: each
                step calls the list once per sequence and tree depth, with ``input_ids [n, length]`` (on the device)
                holding the sequences of the ``n`` nodes of that depth (the committed tokens, then the drafts on the
                node's path) and their ``scores [n, V]`` (``generate`` calls it once per token on ``[B, length]``).
                So a processor must be a function of its arguments (transformers' own are; one that keeps state
                between calls, expecting one call per token, is not supported). One of the class of a processor
                that an option of the call builds (``RepetitionPenaltyLogitsProcessor`` with ``repetition_penalty``
                set, ...) is a ``ValueError``: ``generate`` would use it in place of its own; pass the value through
                the option. Results of another dtype are written back in fp32. The drafts do not see it: tokens it
                forbids are rejected by verification (fewer accepted, same output). Costs one device-to-host read
                of the tree per step.
            prefix_allowed_tokens_fn: ``generate``'s constrained decoding: ``fn(batch_id, sequence)`` lists the
                tokens allowed after ``sequence`` (a 1-D device tensor); the others get -inf, where ``generate``
                applies it (after the minimum-length rules, before the forced EOS). Called at every tree node on
                the node's sequence, ``batch_id`` the sequence's index in ``input_ids`` (its own tokens, without
                the left padding ``generate`` would pass); an empty list is a ``ValueError``, as in ``generate``.
            output_scores, output_logits: fill :class:`SpeculativeOutput`'s ``scores`` (the processed, and when
                sampling warped, target logits each new token was chosen from, as ``generate`` reports them) and
                ``logits`` (the unprocessed ones; ``generate`` reports a caller's processor's in-place edits there
                when none of its own ran first), per sequence ``[new tokens, V]`` fp32. The rows along each
                accepted path are gathered on the device at every step (``[B, depth + 1, V]``) and kept for the
                emitted tokens. When sampling, the scores pass through transformers' warpers (top-p keeps its
                sorted prefix there, where verification keeps exact ties at the cut).
            generation_config: a transformers ``GenerationConfig`` read instead of the target's
                ``generation_config`` wherever an option above is ``None`` ("the target's ``generation_config``"
                above then means this one; errors name ``generation_config.<field>``). Its ``do_sample``,
                ``temperature``, ``top_k``, ``top_p``, ``max_length`` and ``max_new_tokens`` are not read either
                (``min_length`` / ``min_new_tokens`` are, as above): :meth:`hf_generate`
                resolves a config and keyword options exactly as ``target.generate`` does.

        Each sequence is decoded as if it were alone (see :class:`_Generation` for how a batch shares the
        forwards). Returns a :class:`SpeculativeOutput`.

        The target's ``generation_config`` fields for beam search, guidance, watermarking, contrastive search and DoLa
        (``_GENERATION_FIELDS``) and ``forced_bos_token_id`` on a one-token prompt are not applied by the engine: a
        target whose config sets one is a ``ValueError`` naming it (its output would silently differ from
        ``generate``'s). Every logits processor and warper ``generate`` builds from the rest of the config is applied
        (above).
        """
        check_tensor("input_ids", input_ids, dtypes=INT_DTYPES)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if streamer is not None:
            missing = [name for name in ("put", "end") if not callable(getattr(streamer, name, None))]
            if missing:
                raise TypeError(f"streamer must have put() and end() (a transformers streamer), "
                                f"{type(streamer).__name__} lacks {' and '.join(name + '()' for name in missing)}")
            if input_ids.dim() == 2 and input_ids.shape[0] != 1:
                raise ValueError(f"streamer streams one sequence (batch size 1, as transformers' streamers), got "
                                 f"input_ids of batch size {input_ids.shape[0]}")
        rows, max_new_tokens, top_k = self._check_generate_args(
            input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p, generator
        )
        if generation_config is None:
            defaults = _ConfigDefaults(getattr(self.target, "generation_config", None), "target.generation_config")
        else:
            defaults = _ConfigDefaults(_checked_generation_config(generation_config), "generation_config")
        warpers = None
        if temperature > 0:
            warpers = self._warpers(defaults, temperature, top_k, top_p, min_p=min_p, typical_p=typical_p,
                                    epsilon_cutoff=epsilon_cutoff, eta_cutoff=eta_cutoff, top_h=top_h)
        if self._position_limit is not None:
            what, limit = self._position_limit
            # A forward's largest position + 1: generate's last is prompt + max_new_tokens - 1, and so is the
            # engine's for one sequence (trees are cut near the end, _plans_within); in a batch a sequence
            # ahead of another drafts full trees, whose deeper position ids are capped (_position_caps).
            longest = max(len(row) for row in rows)
            if longest + max_new_tokens - 1 > limit:
                raise ValueError(
                    f"the target ({what}) matches transformers' generate only while its forwards stay within "
                    f"{limit} positions, got {longest} + max_new_tokens={max_new_tokens} - 1: lower max_new_tokens"
                )
        _check_generation_config(defaults, min(len(row) for row in rows))
        penalty = self._repetition_penalty(defaults, repetition_penalty)
        eos = self._eos_ids(defaults, eos_token_id)
        rules = self._logit_rules(defaults, min_new_tokens, no_repeat_ngram_size, bad_words_ids, sequence_bias,
                                  forced_eos_token_id, eos, encoder_repetition_penalty,
                                  encoder_no_repeat_ngram_size, exponential_decay_length_penalty)
        rules = dataclasses.replace(rules, custom=_custom_processors(logits_processor),
                                    prefix_allowed_tokens_fn=_checked_callable("prefix_allowed_tokens_fn",
                                                                               prefix_allowed_tokens_fn))
        _check_processor_clashes(rules, penalty, eos)
        if pad_token_id is None:
            pad_token_id = defaults.get("pad_token_id")
        # Checked before any forward: a str ran the whole generation and failed when the output was built.
        pad_token_id = check_int("pad_token_id", pad_token_id, optional=True)
        step_callback = _checked_callable("step_callback", step_callback)
        if attention_mask is None and pad_token_id is not None and pad_token_id not in eos:
            _warn_unmasked_padding(rows, pad_token_id)
        if pad_token_id is None:
            pad_token_id = eos[0] if eos else 0
        sampling = temperature > 0
        outputs = (check_flag("output_scores", output_scores), check_flag("output_logits", output_logits))
        score_warpers = None
        if outputs[0] and sampling and warpers is None:  # the scores generate reports: warped (its top-p ties)
            score_warpers = _warper_list(temperature, top_k, top_p, {}, self.device)
        models = [self.target] if isinstance(self._drafter, _FSPADDrafter) else [self.target, self.draft]
        criteria = _stopping_criteria(stopping_criteria, stop_strings, tokenizer, defaults)
        timer = _Timer(self.device, self.profile)
        start = time.perf_counter()
        if streamer is not None:
            streamer.put(input_ids.cpu())
        with torch.inference_mode(), _attention_switched(models):
            state = _Generation(self, rows, max_new_tokens, set(eos), sampling, temperature, top_k, top_p,
                                generator, timer, step_callback, penalty, streamer, rules, criteria, warpers,
                                outputs, score_warpers)
            state.run()
        if streamer is not None:
            streamer.end()
        timings = dict(timer.seconds)
        timings["total"] = time.perf_counter() - start
        given = input_ids.tolist()
        new = [row[length:] for row, length in zip(state.rows, state.prompt_lens)]
        width = max(len(tokens) for tokens in new)
        sequences = [prompt + tokens + [pad_token_id] * (width - len(tokens)) for prompt, tokens in zip(given, new)]
        return SpeculativeOutput(
            sequences=torch.tensor(sequences, dtype=torch.int64, device=self.device),
            num_target_forwards=state.num_target_forwards,
            accept_lengths=[length for lengths in state.accept_lengths for length in lengths],
            timings=timings,
            prompt_length=input_ids.shape[1],
            row_accept_lengths=state.accept_lengths,
            scores=state.outputs("scores"),
            logits=state.outputs("logits"),
        )

    def hf_generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config: object | None = None,
        *,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        streamer: object | None = None,
        stopping_criteria: Sequence[Callable] | None = None,
        tokenizer: object | None = None,
        step_callback: Callable[[torch.Tensor, object], None] | None = None,
        logits_processor: Sequence[Callable] | None = None,
        prefix_allowed_tokens_fn: Callable[[int, torch.Tensor], Sequence[int]] | None = None,
        **kwargs,
    ) -> SpeculativeOutput:
        """:meth:`generate` called the way ``target.generate`` is: its options resolved as transformers resolves them.

        ``generation_config`` (a ``GenerationConfig``, else the target's) merged with ``kwargs`` (any of its fields:
        ``max_new_tokens``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``, ...) by the
        target's own ``_prepare_generation_config``, so unset fields take the target's generation config and then
        transformers' global defaults (``max_length=20``, ``top_k=50``, ``temperature=1.0``, ...). Then, as
        ``generate``: ``do_sample=False`` decodes greedily and ignores the sampling fields; ``do_sample=True``
        samples with the config's ``temperature``, ``top_k`` and ``top_p`` and every other warper; ``max_new_tokens``
        wins over ``max_length`` (which counts the padded prompt; unset: 20 new tokens, capped at the model's
        ``max_position_embeddings``); ``min_new_tokens`` wins over ``min_length``; ``max_time`` adds transformers'
        ``MaxTimeCriteria``; ``num_return_sequences`` (sampling) repeats each prompt that often, adjacent in the
        output; a ``bos_token_id`` prompt of batch size 1 when no prompt is given; without an ``attention_mask``,
        ``pad_token_id`` positions of the prompt are masked out (unless it is an EOS id); values ``generate`` skips
        are skipped (epsilon / eta cutoffs outside (0, 1), ``typical_p >= 1``, n-gram sizes below 1, negative EOS
        ids, suppressed ids outside the vocabulary); ``temperature=None`` samples at 1 and ``top_p=0`` keeps the
        one most likely token; a caller's ``MaxLengthCriteria`` / ``MaxTimeCriteria`` / ``StopStringCriteria``
        replaces the one ``generate`` builds from the config. ``inputs`` or ``input_ids`` and
        ``attention_mask`` are the prompt (``**tokenizer(...)`` works); the other keywords are :meth:`generate`'s
        (``logits_processor`` and ``prefix_allowed_tokens_fn`` included); ``output_scores`` / ``output_logits``
        fill :class:`SpeculativeOutput`'s ``scores`` / ``logits``.

        Refused with a ``ValueError`` naming them: decoding modes other than greedy and sampling (beam search and
        its variants, DoLa, contrastive search: :meth:`generate`'s refusals), ``output_attentions`` /
        ``output_hidden_states``, ``token_healing``, an ``EosTokenCriteria`` in ``stopping_criteria`` (pass
        ``eos_token_id``), a ``MaxLengthCriteria`` with ``forced_eos_token_id``, a pad token between two tokens of
        a prompt without a mask, and keywords that are neither a generation option nor one of the above (model
        inputs such as ``token_type_ids``, or ``generate``'s ``assistant_model``, ``negative_prompt_ids``, ...;
        such a keyword set to None is ignored, as it is ``generate``'s default). Ignored, as
        they do not change the output: ``return_dict_in_generate`` (a :class:`SpeculativeOutput` is returned),
        ``use_cache``, ``cache_implementation``, ``prompt_lookup_num_tokens``,
        ``remove_invalid_values``; ``renormalize_logits`` only log-softmaxes the returned ``scores``, as ``generate``
        reports them. The output equals ``target.generate``'s as :meth:`generate` documents it (greedy
        token for token; sampling in distribution, top-p's exact ties aside). The minimum sampling temperature
        (``MIN_SAMPLING_TEMPERATURE``) and the per-sequence handling of left-padded batches are :meth:`generate`'s.
        """
        from transformers.generation import (
            EosTokenCriteria, MaxLengthCriteria, MaxTimeCriteria, StoppingCriteriaList, StopStringCriteria,
        )

        prepare = getattr(self.target, "_prepare_generation_config", None)
        if prepare is None:
            raise TypeError(f"hf_generate resolves options with the target's transformers generation support "
                            f"(GenerationMixin._prepare_generation_config), which {type(self.target).__name__} "
                            f"lacks: call generate() with explicit options")
        if generation_config is not None:
            _checked_generation_config(generation_config)
        if inputs is not None and input_ids is not None:
            raise ValueError("hf_generate takes the prompt as inputs or as input_ids, got both")
        prompt = inputs if inputs is not None else input_ids
        explicit_max_length = kwargs.get("max_length") is not None
        config, unused = prepare(generation_config, **kwargs)
        outputs = [name for name in ("output_attentions", "output_hidden_states")
                   if getattr(config, name, False) or unused.pop(name, None)]  # (prepare moves them to unused)
        if outputs:
            raise ValueError(f"the generation options set {', '.join(outputs)}: the speculative engine returns "
                             f"sequences, scores and logits only (no attentions or hidden states)")
        unused = sorted(name for name, value in unused.items() if value is not None)  # None: generate's defaults
        if unused:
            raise ValueError(f"hf_generate does not take {', '.join(unused)}: neither a generation option nor "
                             f"a model input the engine passes on (input_ids and attention_mask are)")
        if getattr(config, "token_healing", False):
            raise ValueError("the generation options set token_healing=True, which the speculative engine does "
                             "not apply (it would change the prompt): set it to False")
        if config.bad_words_ids is not None and len(config.bad_words_ids) == 0:
            raise ValueError("bad_words_ids must be a non-empty list (as transformers' generate asks), got []")
        config.validate()
        mode = str(getattr(config.get_generation_mode(), "value", config.get_generation_mode()))
        if mode not in ("greedy_search", "sample", "assisted_generation"):
            raise ValueError(f"the generation options select transformers' {mode!r} decoding (num_beams="
                             f"{config.num_beams}); the speculative engine decodes greedily or samples: set "
                             f"num_beams=1 (and penalty_alpha / dola_layers to None)")
        _as_generate_reads(config, self.vocab_size)
        if prompt is None:
            if config.bos_token_id is None:
                raise ValueError("hf_generate needs a prompt (inputs or input_ids) or a bos_token_id to start from")
            prompt = torch.full((1, 1), int(config.bos_token_id), dtype=torch.int64, device=self.device)
        check_tensor("input_ids", prompt, dtypes=INT_DTYPES)
        if prompt.dim() == 1:
            prompt = prompt[None]
            if attention_mask is not None and attention_mask.dim() == 1:
                attention_mask = attention_mask[None]
        if attention_mask is None and prompt.dim() == 2:
            attention_mask = _inferred_attention_mask(prompt, config)
        copies = config.num_return_sequences or 1
        if copies > 1:  # generate's expansion: each prompt repeated, adjacent (greedy refused by validate())
            prompt = prompt.repeat_interleave(copies, dim=0)
            attention_mask = None if attention_mask is None else attention_mask.repeat_interleave(copies, dim=0)
            if callable(prefix_allowed_tokens_fn):  # generate passes every copy of prompt i as batch_id i
                prefix_allowed_tokens_fn = functools.partial(_per_prompt, prefix_allowed_tokens_fn, copies)
        length = prompt.shape[-1]
        criteria = StoppingCriteriaList(_callables("stopping_criteria", stopping_criteria, "StoppingCriteria"))
        # generate's merge: a caller's criterion replaces the one of its type that generate builds from the config
        given = {type(criterion) for criterion in criteria}
        if EosTokenCriteria in given:
            raise ValueError("stopping_criteria holds an EosTokenCriteria, which would replace the EOS rule "
                             "generate builds from eos_token_id: pass eos_token_id= instead")
        max_new_tokens = config.max_new_tokens
        if MaxLengthCriteria in given:
            if config.forced_eos_token_id is not None:
                raise ValueError("stopping_criteria holds a MaxLengthCriteria, which with forced_eos_token_id would "
                                 "end at another length than the one the forced EOS is placed for: give the "
                                 "length as max_new_tokens / max_length instead")
            max_new_tokens = min(criterion.max_length for criterion in criteria
                                 if isinstance(criterion, MaxLengthCriteria)) - length
            if max_new_tokens <= 0:
                raise ValueError(f"input_ids has length {length}, but stopping_criteria's MaxLengthCriteria ends "
                                 f"at {max_new_tokens + length}: nothing to generate")
        elif max_new_tokens is None:
            max_length = _whole("max_length", config.max_length)
            if _default_max_length(config, generation_config, self.target, explicit_max_length):
                max_length = max_length + length  # generate's default: 20 new tokens, within the model's positions
                positions = getattr(getattr(self.target, "config", None), "max_position_embeddings", None)
                max_length = max_length if positions is None else min(max_length, positions)
            max_new_tokens = max_length - length
            if max_new_tokens <= 0:
                raise ValueError(f"input_ids has length {length}, but max_length is {max_length}: nothing to "
                                 f"generate; set max_new_tokens (as transformers' generate asks)")
        max_new_tokens = _whole("max_new_tokens", max_new_tokens)
        if config.max_time is not None and MaxTimeCriteria not in given:
            criteria.append(MaxTimeCriteria(max_time=config.max_time))
        stop_strings = [] if StopStringCriteria in given else None  # the caller's replaces the config's
        temperature, top_k, top_p = 0.0, None, None
        if config.do_sample:
            temperature, top_k, top_p = config.temperature, config.top_k, config.top_p
            temperature = 1.0 if temperature is None else temperature  # None: no temperature warper
            # A str / NaN was a TypeError from a comparison here, or passed on (an audit of bad inputs).
            temperature = check_number("generation_config.temperature", temperature)
            if temperature <= 0:
                raise ValueError(f"do_sample=True needs a temperature > 0 (transformers' temperature warper "
                                 f"refuses {temperature}), got temperature={temperature}")
            if top_p is not None:
                # generate's TopPLogitsWarper refuses a negative top_p (it was taken as top_p=0 here: greedy).
                top_p = check_number("generation_config.top_p", top_p, low=0.0)
            if top_p == 0.0:  # transformers' top-p keeps the one most likely token
                top_k, top_p = 1, None
            top_p = None if top_p is None or top_p >= 1.0 else top_p
        out = self.generate(
            prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            generator=generator, attention_mask=attention_mask, step_callback=step_callback, streamer=streamer,
            stopping_criteria=criteria, stop_strings=stop_strings, tokenizer=tokenizer, generation_config=config,
            logits_processor=logits_processor, prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
            output_scores=bool(config.output_scores), output_logits=bool(config.output_logits),
        )
        if config.renormalize_logits and out.scores is not None:
            # generate's last processor (LogitNormalization): the scores it reports are log-probabilities; the
            # tokens are unchanged (the engine's scores were left raw: a review, 2026-12-07).
            out = dataclasses.replace(out, scores=[torch.log_softmax(rows, dim=-1) for rows in out.scores])
        return out

    def _check_generate_args(self, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p,
                             generator) -> list[list[int]]:
        """Checks; returns each sequence's prompt tokens (one host read of the prompts, once per call), and
        ``max_new_tokens`` and ``top_k`` as Python ints (``top_k`` 0 is None: transformers' "no top-k", its
        TopKLogitsWarper is skipped)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape [B, L] or [L], got {tuple(input_ids.shape)}")
        if input_ids.shape[0] == 0:
            raise ValueError("input_ids must hold at least one sequence, got batch size 0")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids must hold at least one token (empty prompt)")
        max_new_tokens = check_int("max_new_tokens", max_new_tokens, low=1)
        check_number("temperature", temperature, low=0.0)
        if 0 < temperature < MIN_SAMPLING_TEMPERATURE:
            raise ValueError(
                f"temperature must be 0 (greedy) or >= {MIN_SAMPLING_TEMPERATURE} (sampling), got {temperature}: "
                f"below that fp32 logits / temperature can overflow"
            )
        if temperature > 0:
            top_k = check_int("top_k", top_k, low=0, optional=True) or None
            if top_p is not None:
                check_number("top_p", top_p, low=0.0, high=1.0, low_inclusive=False)
        elif top_k not in (None, 0) or top_p not in (None, 1, 1.0):
            # transformers' generate warns likewise when sampling fields come without do_sample.
            warnings.warn(f"top_k={top_k!r} / top_p={top_p!r} only filter when sampling: temperature=0 decodes "
                          f"greedily (pass temperature > 0 to sample)", stacklevel=3)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        tokens = input_ids.tolist()
        if attention_mask is None:
            rows = tokens
        else:
            check_tensor("attention_mask", attention_mask, dtypes=(*INT_DTYPES, torch.bool))
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got "
                    f"{tuple(attention_mask.shape)}"
                )
            rows = []
            for index, (row, mask) in enumerate(zip(tokens, attention_mask.to(torch.int64).tolist())):
                kept = _kept_positions(mask)
                if any(value not in (0, 1) for value in mask):
                    raise ValueError(f"attention_mask must hold 0 and 1 only, got row {index}: {mask}")
                if not kept:
                    raise ValueError(f"attention_mask row {index} masks every token (empty prompt)")
                if kept[-1] - kept[0] + 1 != len(kept):
                    raise ValueError(
                        f"attention_mask row {index} must mark one contiguous run of tokens (left or right "
                        f"padding), got {mask}"
                    )
                rows.append(row[kept[0]: kept[-1] + 1])
        for index, row in enumerate(rows):
            bad = [token for token in row if not 0 <= token < self.vocab_size]
            if bad:
                raise ValueError(
                    f"input_ids must be token ids in [0, {self.vocab_size}), got {bad[0]} in sequence {index}"
                )
        return rows, max_new_tokens, top_k

    def _warpers(self, defaults: "_ConfigDefaults", temperature, top_k, top_p, **extra):
        """transformers' sampling warper list, as ``generate`` builds it, when one of ``extra`` (``min_p``,
        ``typical_p``, ``epsilon_cutoff``, ``eta_cutoff``, ``top_h``; each ``None``: the generation config's) is
        active; None otherwise (the verifiers then filter with ``temperature`` / ``top_k`` / ``top_p``)."""
        values = {}
        for name, value in extra.items():
            source, value = defaults.option(name, value)
            if value is None:
                continue
            low, high, neutral = _WARPER_RANGES[name]
            value = check_number(source, value, low=low[0], high=high[0], low_inclusive=low[1],
                                 high_inclusive=high[1])
            if value != neutral:
                values[name] = value
        if not values:
            return None
        return _warper_list(temperature, top_k, top_p, values, self.device)

    @staticmethod
    def _repetition_penalty(defaults: "_ConfigDefaults", penalty, field: str = "repetition_penalty") -> float | None:
        """The penalty to apply (``None`` for none): the argument, else the generation config's."""
        name, penalty = defaults.option(field, penalty)
        if penalty is None:
            return None
        penalty = check_number(name, penalty, low=0.0, low_inclusive=False)
        return None if penalty == 1.0 else penalty

    def _logit_rules(self, defaults: "_ConfigDefaults", min_new_tokens, no_repeat_ngram_size=None,
                     bad_words_ids=None, sequence_bias=None, forced_eos_token_id=None, eos=(),
                     encoder_repetition_penalty=None, encoder_no_repeat_ngram_size=None,
                     exponential_decay_length_penalty=None) -> "_LogitRules":
        """The logits processors to apply: each argument, else the generation config's value."""
        config = defaults.option
        ngram = check_ngram_size(*config("no_repeat_ngram_size", no_repeat_ngram_size))
        bias_name, bias = config("sequence_bias", sequence_bias)
        bad_name, bad = config("bad_words_ids", bad_words_ids)
        tokens = None
        if bias is not None or bad is not None:  # (checked by TokenSequenceRules: an array is a named TypeError)
            tokens = TokenSequenceRules(bias, bad, eos, self.vocab_size, self.device, bias_name, bad_name)
            tokens = tokens if tokens.biases or tokens.bans else None
        forced_name, forced = config("forced_eos_token_id", forced_eos_token_id)
        forced = self._token_list(forced_name, forced)
        bounds = self._eos_bounds(defaults, min_new_tokens)
        if forced and set(forced) <= set(bounds[2]):  # transformers' GenerationConfig.validate refuses it too
            raise ValueError(f"every token of {forced_name} ({sorted(set(forced))}) is also in "
                             f"{defaults.label}.suppress_tokens: all logits would be -inf where the EOS is "
                             f"forced; remove the overlap (min_new_tokens= holds an EOS back)")
        decay = check_decay(*config("exponential_decay_length_penalty", exponential_decay_length_penalty))
        return _LogitRules(
            *bounds, ngram, tokens, forced,
            self._repetition_penalty(defaults, encoder_repetition_penalty, "encoder_repetition_penalty"),
            check_ngram_size(*config("encoder_no_repeat_ngram_size", encoder_no_repeat_ngram_size)),
            decay if eos else None,  # generate's decay acts on the EOS ids: none, no effect
        )

    def _eos_bounds(self, defaults: "_ConfigDefaults", min_new_tokens) -> tuple[int | None, int, list[int], list[int]]:
        """``(min_new_tokens, min_length, suppress_tokens, begin_suppress_tokens)``: the argument, else the
        generation config (None, 0 and empty lists where unset)."""
        min_new_tokens = check_int(*defaults.option("min_new_tokens", min_new_tokens), low=0, optional=True)
        min_length = check_int(f"{defaults.label}.min_length", defaults.get("min_length") or 0, low=0)
        suppress = []
        for name in ("suppress_tokens", "begin_suppress_tokens"):
            label = f"{defaults.label}.{name}"
            ids = [check_int(label, token, low=0) for token in defaults.get(name) or []]
            bad = [token for token in ids if token >= self.vocab_size]
            if bad:
                raise ValueError(f"{label} must hold token ids in [0, {self.vocab_size}), got {bad[0]}")
            suppress.append(ids)
        return min_new_tokens, min_length, *suppress

    def _eos_ids(self, defaults: "_ConfigDefaults", eos_token_id) -> list[int]:
        return self._token_list(*defaults.option("eos_token_id", eos_token_id), vocab_bound=False)

    def _token_list(self, name: str, ids, vocab_bound: bool = True) -> list[int]:
        """One token id or a list (or tensor) of them, as a list (``None``: empty)."""
        if ids is None:
            return []
        if isinstance(ids, torch.Tensor) or getattr(ids, "ndim", 0) >= 1:  # a tensor or a NumPy array
            ids = ids.flatten().tolist()
        if not isinstance(ids, (list, tuple)):  # one id: a Python or NumPy int
            ids = [ids]
        ids = [check_int(name, token, low=0) for token in ids]
        if vocab_bound and any(token >= self.vocab_size for token in ids):
            raise ValueError(f"{name} must hold token ids in [0, {self.vocab_size}), got {max(ids)}")
        return ids


@dataclass
class _LogitRules:
    """The logits processors ``generate`` would apply besides the repetition penalty (see ``generate``)."""
    min_new_tokens: int | None = None
    min_length: int = 0
    suppress: list[int] = field(default_factory=list)
    begin_suppress: list[int] = field(default_factory=list)
    no_repeat_ngram_size: int = 0
    token_sequences: TokenSequenceRules | None = None
    forced_eos: list[int] = field(default_factory=list)
    encoder_penalty: float | None = None
    encoder_ngram_size: int = 0
    decay: tuple[int, float] | None = None
    prefix_allowed_tokens_fn: Callable | None = None
    custom: object | None = None  # a transformers LogitsProcessorList of the caller's processors

    @property
    def per_node(self) -> bool:
        """Rules that call the caller's code on each node's sequence (built on the host)."""
        return self.prefix_allowed_tokens_fn is not None or self.custom is not None

    @property
    def tail_width(self) -> int:
        """How many of each node's last tokens the rules read (0: none)."""
        sequences = 0 if self.token_sequences is None else self.token_sequences.width
        return max(self.no_repeat_ngram_size, self.encoder_ngram_size, sequences)

    def within(self, prompt_length: int, longest: int) -> "_LogitRules":
        """These rules for sequences of at most ``longest`` tokens and prompts of at most ``prompt_length``: an
        n-gram size or a biased / banned entry longer than that can never act and is dropped."""
        sequences = self.token_sequences
        return dataclasses.replace(
            self,
            no_repeat_ngram_size=self.no_repeat_ngram_size if self.no_repeat_ngram_size <= longest else 0,
            encoder_ngram_size=self.encoder_ngram_size if self.encoder_ngram_size <= prompt_length else 0,
            token_sequences=None if sequences is None else sequences.within(longest),
        )

    @property
    def needs_fp32(self) -> bool:
        """Rules whose arithmetic ``generate`` does in fp32 on the logits (the bans work in any dtype)."""
        sequences = self.token_sequences is not None and self.token_sequences.biases
        return sequences or self.encoder_penalty is not None or self.decay is not None or self.per_node


@dataclass(frozen=True)
class _ConfigDefaults:
    """Where ``generate`` reads the options it is not given: a transformers generation config (None: none) and
    the name errors give it (``target.generation_config``, or ``generation_config`` for a caller's own)."""
    config: object | None
    label: str

    def get(self, name: str):
        """The config's ``name`` (None when unset or without a config)."""
        return getattr(self.config, name, None)

    def option(self, name: str, value) -> tuple[str, object]:
        """``(name for errors, value)``: the argument when given, else the config's value."""
        if value is None:
            return f"{self.label}.{name}", self.get(name)
        return name, value


# generation_config fields with which target.generate's output is not what the engine reproduces (every other
# logits processor and warper generate builds from the config is applied by the engine, see generate): beam search,
# guidance, watermarking. Each maps to its neutral value (None and empty lists are neutral for all).
# penalty_alpha (> 0: contrastive search) and dola_layers (DoLa) switch generate's decoding mode (a review, 2026-12-06:
# the engine decoded greedily under them, where hf_generate already refused them).
_GENERATION_FIELDS = {"num_beams": 1, "guidance_scale": 1.0, "watermarking_config": None, "penalty_alpha": None,
                      "dola_layers": None}
# The sampling warpers the engine applies through transformers' own classes (see SpeculativeDecoder._warpers):
# ((low, inclusive), (high, inclusive), neutral value), as generate accepts them.
_WARPER_RANGES = {
    "min_p": ((0.0, True), (1.0, True), 0.0), "typical_p": ((0.0, False), (1.0, True), 1.0),
    "epsilon_cutoff": ((0.0, True), (1.0, False), 0.0), "eta_cutoff": ((0.0, True), (1.0, False), 0.0),
    "top_h": ((0.0, False), (1.0, True), None),
}


def _stopping_criteria(criteria, stop_strings, tokenizer, defaults: _ConfigDefaults):
    """transformers' ``StoppingCriteriaList`` of the given criteria and, for ``stop_strings`` (else the generation
    config's), a ``StopStringCriteria``; None when there are none."""
    from transformers import StoppingCriteriaList, StopStringCriteria

    criteria = StoppingCriteriaList(_callables("stopping_criteria", criteria, "StoppingCriteria"))
    name, stop_strings = defaults.option("stop_strings", stop_strings)
    if stop_strings is not None and not (
        isinstance(stop_strings, str)
        or (isinstance(stop_strings, (list, tuple)) and all(isinstance(text, str) for text in stop_strings))
    ):
        raise TypeError(f"{name} must be a str, a list of str or None, got {type(stop_strings).__name__}: "
                        f"{stop_strings!r}")
    if stop_strings:
        if tokenizer is None:
            raise ValueError(f"{name} needs the target's tokenizer: pass tokenizer= to generate (as to "
                             f"transformers' generate)")
        missing = [m for m in ("get_vocab", "convert_tokens_to_string") if not callable(getattr(tokenizer, m, None))]
        if missing:  # (an AttributeError inside transformers' StopStringCriteria)
            raise TypeError(f"tokenizer must be the target's transformers tokenizer for {name}, got "
                            f"{type(tokenizer).__name__}, which lacks {' and '.join(m + '()' for m in missing)}")
        criteria.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings))
    return criteria if criteria else None


def _penalized_values(x: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' repetition-penalty rule on every value: divided by ``penalty`` if positive, else multiplied."""
    return torch.where(x < 0, x * penalty, x / penalty)


def repetition_penalized(logits: torch.Tensor, penalty: float, seen: torch.Tensor, tree: TreeSpec | None = None,
                         tokens: torch.Tensor | None = None) -> torch.Tensor:
    """transformers' repetition penalty (``RepetitionPenaltyLogitsProcessor``) on every node row of a tree's
    target logits ``[B, T, V]``, in fp32 as ``generate`` applies it; a new tensor, no host read.

    The token after node ``i`` is penalised for each token its sequence holds up to node ``i``: the committed
    ones (``seen [B, V]`` bool, the root included) and the draft ``tokens [B, T]`` of node ``i``'s ancestors and
    of ``i`` itself (from ``tree``'s ancestor mask). A held token's logit is divided by ``penalty`` when
    positive, multiplied by it when negative, once however often it is held."""
    logits = logits.float()
    if tree is None or tokens.shape[1] == 1:
        return torch.where(seen[:, None, :], _penalized_values(logits, penalty), logits)
    batch, num_nodes, vocab = logits.shape
    # held[b, i, v]: sequence b holds token v up to node i. One extra column takes the (ignored) writes of the
    # nodes off node i's path; O(B T V + B T^2) work.
    held = torch.zeros(batch, num_nodes, vocab + 1, dtype=torch.bool, device=logits.device)
    held[..., :vocab] = seen[:, None, :]
    on_path = tree.dense_ancestors()  # [Bt, T, T]: node j is node i or one of its ancestors
    held.scatter_(2, torch.where(on_path, tokens[:, None, :], vocab), True)
    return torch.where(held[..., :vocab], _penalized_values(logits, penalty), logits)


def _warper_list(temperature, top_k, top_p, values: dict, device) -> object:
    """transformers' sampling warpers in ``generate``'s order: temperature, top-h, top-k, top-p, then ``values``'
    min-p, typical, epsilon and eta (each only when set, as ``generate`` adds them)."""
    from transformers.generation import logits_process as processors

    warpers = processors.LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(processors.TemperatureLogitsWarper(float(temperature)))
    if "top_h" in values:
        if not hasattr(processors, "TopHLogitsWarper"):
            raise ValueError("top_h needs a transformers version with TopHLogitsWarper (this one has none)")
        warpers.append(processors.TopHLogitsWarper(top_h=values["top_h"]))
    if top_k:
        warpers.append(processors.TopKLogitsWarper(top_k=top_k))
    if top_p is not None and top_p < 1.0:
        warpers.append(processors.TopPLogitsWarper(top_p=float(top_p)))
    if "min_p" in values:
        warpers.append(processors.MinPLogitsWarper(min_p=values["min_p"]))
    if "typical_p" in values:
        warpers.append(processors.TypicalLogitsWarper(mass=values["typical_p"]))
    if "epsilon_cutoff" in values:
        warpers.append(processors.EpsilonLogitsWarper(epsilon=values["epsilon_cutoff"]))
    if "eta_cutoff" in values:
        warpers.append(processors.EtaLogitsWarper(epsilon=values["eta_cutoff"], device=device))
    return warpers


def _checked_callable(name: str, fn: object) -> object:
    """``fn`` when it is None or callable; a ``TypeError`` naming ``name`` otherwise."""
    if fn is not None and not callable(fn):
        raise TypeError(f"{name} must be callable or None, got {type(fn).__name__}")
    return fn


def _callables(name: str, items, kind: str) -> list:
    """``items`` (a transformers ``{kind}List`` or a list of callables; None: none) as a list; a ``TypeError``
    naming ``name`` or the entry otherwise."""
    if items is None:
        return []
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        raise TypeError(f"{name} must be a {kind}List or a list of {kind} objects / callables, got "
                        f"{type(items).__name__}")
    for index, item in enumerate(items):
        if not callable(item):
            raise TypeError(f"{name}[{index}] must be callable (a transformers {kind}), got {type(item).__name__}")
    return list(items)


def _check_processor_clashes(rules: _LogitRules, penalty: float | None, eos: list[int]) -> None:
    """A ``ValueError`` for a caller's logits processor of the class of one the call's options build: transformers'
    ``generate`` would use it in place of its own, at its own's position in the order; the engine applies its
    rule at every tree node instead, so the option should carry the value."""
    from transformers.generation import logits_process as processors

    sequences = rules.token_sequences
    options = {  # class name -> (option, active in this call)
        "SequenceBiasLogitsProcessor": ("sequence_bias", sequences is not None and bool(sequences.biases)),
        "NoBadWordsLogitsProcessor": ("bad_words_ids", sequences is not None and bool(sequences.bans)),
        "RepetitionPenaltyLogitsProcessor": ("repetition_penalty", penalty is not None),
        "EncoderRepetitionPenaltyLogitsProcessor": ("encoder_repetition_penalty", rules.encoder_penalty is not None),
        "NoRepeatNGramLogitsProcessor": ("no_repeat_ngram_size", bool(rules.no_repeat_ngram_size)),
        "EncoderNoRepeatNGramLogitsProcessor": ("encoder_no_repeat_ngram_size", bool(rules.encoder_ngram_size)),
        "MinLengthLogitsProcessor": ("min_length", bool(eos) and rules.min_length > 0),
        "MinNewTokensLengthLogitsProcessor": ("min_new_tokens", bool(eos) and bool(rules.min_new_tokens)),
        "PrefixConstrainedLogitsProcessor": ("prefix_allowed_tokens_fn", rules.prefix_allowed_tokens_fn is not None),
        "ForcedEOSTokenLogitsProcessor": ("forced_eos_token_id", bool(rules.forced_eos)),
        "ExponentialDecayLengthPenalty": ("exponential_decay_length_penalty", rules.decay is not None),
        "SuppressTokensLogitsProcessor": ("suppress_tokens", bool(rules.suppress)),
        "SuppressTokensAtBeginLogitsProcessor": ("begin_suppress_tokens", bool(rules.begin_suppress)),
    }
    for index, processor in enumerate(rules.custom or []):
        option, active = options.get(type(processor).__name__, (None, False))
        if active and type(processor) is getattr(processors, type(processor).__name__, None):
            raise ValueError(f"logits_processor[{index}] is a {type(processor).__name__}, which transformers' generate "
                             f"would use in place of the one {option} builds (set in this call or the generation "
                             f"config): give the value as {option} instead, which the engine applies at every tree "
                             f"node, or leave {option} unset")


def _allowed_ids(allowed, vocab: int, batch_id: int) -> torch.Tensor:
    """``prefix_allowed_tokens_fn``'s result as an index of the vocabulary: token ids in ``[0, vocab)`` (values read
    where that costs no synchronisation), or a bool mask of ``vocab`` entries. An id past the vocabulary was an
    ``IndexError``, a negative one allowed the token that many from the end, a float one its truncation."""
    index = allowed if isinstance(allowed, torch.Tensor) else torch.as_tensor(allowed)
    if index.dtype == torch.bool and index.shape == (vocab,):
        return index
    if index.dtype not in INT_DTYPES or index.dim() != 1:
        raise TypeError(f"prefix_allowed_tokens_fn must return a list of token ids (ints), got {index.dtype} values "
                        f"of shape {tuple(index.shape)} for batch_id {batch_id}")
    check_token_ids("prefix_allowed_tokens_fn's result", index, vocab, note=f" for batch_id {batch_id}")
    return index


def _custom_processors(processors) -> object | None:
    """The caller's logits processors as a transformers ``LogitsProcessorList`` (None when there are none)."""
    from transformers import LogitsProcessorList

    processors = _callables("logits_processor", processors, "LogitsProcessor")
    return LogitsProcessorList(processors) if processors else None


def _checked_generation_config(config: object) -> object:
    """``config`` when it is a transformers ``GenerationConfig``; a ``TypeError`` naming what it is otherwise."""
    from transformers import GenerationConfig

    if not isinstance(config, GenerationConfig):
        raise TypeError(f"generation_config must be a transformers GenerationConfig or None, got "
                        f"{type(config).__name__}")
    return config


def _per_prompt(fn: Callable, copies: int, batch_id: int, sequence: torch.Tensor):
    """``fn`` called with the prompt's index for ``batch_id`` of a batch that repeats each prompt ``copies`` times."""
    return fn(batch_id // copies, sequence)


def _whole(name: str, value):
    """An integral number as an int (transformers' generate takes 9.0 for 9); anything else is returned as is, for
    the checks that name it."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _as_generate_reads(config, vocab_size: int) -> None:
    """In place: the values of ``config`` that transformers' ``generate`` skips (it builds no processor or warper
    for them) set to their neutral value, so that the engine, which refuses them, skips them too: epsilon / eta
    cutoffs outside (0, 1), ``typical_p >= 1``, n-gram sizes below 1, negative EOS ids, suppressed ids outside the
    vocabulary."""
    for name in ("epsilon_cutoff", "eta_cutoff"):
        value = getattr(config, name, None)
        if value is not None and not 0.0 < value < 1.0:
            setattr(config, name, None)
    if config.typical_p is not None and config.typical_p >= 1.0:
        config.typical_p = None
    for name in ("no_repeat_ngram_size", "encoder_no_repeat_ngram_size"):
        value = getattr(config, name, None)
        if value is not None and value < 1:
            setattr(config, name, None)
    eos = config.eos_token_id
    if isinstance(eos, (list, tuple)):
        config.eos_token_id = [token for token in eos if not (isinstance(token, int) and token < 0)]
    elif isinstance(eos, int) and eos < 0:
        config.eos_token_id = None
    for name in ("suppress_tokens", "begin_suppress_tokens"):
        ids = getattr(config, name, None)
        if ids is not None:
            setattr(config, name, [token for token in ids if not (isinstance(token, int)
                                                                  and not 0 <= token < vocab_size)])


def _kept_positions(mask_row: list) -> list[int]:
    """The positions an attention-mask row keeps (nonzero entries); they must form one run for the engine."""
    return [position for position, value in enumerate(mask_row) if value]


def _warn_unmasked_padding(rows: list[list[int]], pad_token_id: int) -> None:
    """``generate`` reads every position as a token without an ``attention_mask``, where transformers' ``generate``
    masks out the prompt's ``pad_token_id`` positions: say so when the prompt holds that id (``rows``: the prompts
    already read to the host, whole without a mask)."""
    if any(pad_token_id in row for row in rows):
        warnings.warn(
            f"input_ids hold pad_token_id {pad_token_id} and no attention_mask was given: generate reads every "
            f"position as a token, where transformers' generate would mask the padding out; pass attention_mask (or "
            f"call hf_generate, which infers it as transformers does)",
            stacklevel=3,
        )


def _inferred_attention_mask(prompt: torch.Tensor, config) -> torch.Tensor | None:
    """transformers' ``generate`` without an attention mask: when the prompt holds ``pad_token_id`` (and it is
    not an EOS id) those positions are masked out; None (every position a token) otherwise. A pad token between
    two tokens of a row is a ``ValueError`` (the engine takes one contiguous run of tokens per row)."""
    pad, eos = config.pad_token_id, config.eos_token_id
    eos = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
    if pad is None or pad in eos:
        return None
    mask = prompt.ne(pad)
    rows = mask.tolist()  # the one host read (hf_generate reads the prompt anyway)
    if all(all(row) for row in rows):
        return None
    for index, row in enumerate(rows):
        kept = _kept_positions(row)
        if kept and kept[-1] - kept[0] + 1 != len(kept):
            raise ValueError(f"input_ids row {index} holds pad_token_id {pad} between tokens, which generate would "
                             f"mask out; the speculative engine takes one contiguous run of tokens per row: pass an "
                             f"attention_mask, or a pad_token_id that is not in the prompt")
    return mask.to(torch.int64)


def _default_max_length(config, given, target, explicit: bool) -> bool:
    """Whether transformers' ``generate`` reads ``config.max_length`` as its default (20 new tokens after the prompt)
    rather than a length set by the caller or the model: transformers 5 asks whether any config set it (its fields
    default to None), transformers 4 whether it still equals ``GenerationConfig().max_length``."""
    from transformers import GenerationConfig

    if explicit:
        return False
    if hasattr(GenerationConfig, "_get_default_generation_params"):  # transformers 5
        model_config = getattr(target, "generation_config", None)
        return all(getattr(source, "max_length", None) is None for source in (given, model_config))
    return config.max_length == GenerationConfig().max_length


def _check_generation_config(defaults: _ConfigDefaults, shortest_prompt: int) -> None:
    """A ``ValueError`` naming the generation config's fields that would make ``target.generate``'s
    output differ from the engine's (which applies none of them): beam search, guidance, watermarking, contrastive
    search (``penalty_alpha > 0``) and DoLa (``dola_layers``).
    ``forced_bos_token_id`` only acts on a one-token prompt (generate forces the token after it)."""
    config = defaults.config
    if config is None:
        return
    fields = dict(_GENERATION_FIELDS)
    if shortest_prompt == 1:
        fields["forced_bos_token_id"] = None
    active = {name: getattr(config, name, None) for name in fields}
    active = {name: value for name, value in active.items()  # a token id of 0 is a setting, not neutral
              if value is not None and value != fields[name] and not (isinstance(value, (list, tuple, dict))
                                                                     and len(value) == 0)
              and not (name == "penalty_alpha" and not value > 0)}
    if active:
        settings = ", ".join(f"{name}={value!r}" for name, value in active.items())
        raise ValueError(
            f"{defaults.label} sets {settings}: target.generate applies "
            f"{'it' if len(active) == 1 else 'them'} (also when greedy), the speculative engine does not, so its "
            f"output would differ; set {'it' if len(active) == 1 else 'them'} to the neutral value on "
            f"{defaults.label} (e.g. num_beams=1, others None) to decode without"
        )


class _Generation:
    """The state of one ``generate`` call (the engine object itself stays stateless between calls).

    A batch of ``B`` sequences shares every forward, verification and compaction; each sequence keeps its
    own length. The target's cache holds sequence ``b``'s committed tokens (all but its root) in the first
    ``lens[b]`` positions of row ``b``; the rest of the row is stale. The prefill is one right-padded causal
    forward (a right-padded row's tokens see only earlier tokens: exactly the unpadded forward); each tree
    forward appends the ``T`` nodes at the end, the attention moves them to ``lens[b] ..`` of each row
    (:attr:`TreeAttentionContext.starts`), and compaction writes the accepted rows after ``lens[b]``. A
    sequence that finishes while others go on leaves the batch at the end of that step (after the step
    callback): its rows of the target's and the drafter's caches are dropped (``active`` lists the input
    index of each remaining row), so no later forward, drafting level or verification computes it. At batch
    size 1 none of this is needed: the tree is the end of the cache, the draft advances are plain causal
    forwards.
    """

    def __init__(self, engine: SpeculativeDecoder, rows: list[list[int]], max_new_tokens, eos, sampling,
                 temperature, top_k, top_p, generator, timer, step_callback, penalty=None, streamer=None,
                 rules: _LogitRules | None = None, criteria=None, warpers=None, outputs=(False, False),
                 score_warpers=None):
        self.engine = engine
        self.drafter = engine._drafter
        self.rows = [list(row) for row in rows]
        self.prompt_lens = [len(row) for row in rows]
        self.batch = len(rows)
        self.ragged = self.batch > 1
        self.active = list(range(self.batch))  # input index of each batch row still decoding
        self.max_new_tokens = max_new_tokens
        self.eos = eos
        self.sampling = sampling
        self.sample_args = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        self.warpers = warpers
        if warpers is not None:  # generate's warper list filters the logits; verification samples at temperature 1
            self.sample_args = dict(temperature=1.0, top_k=None, top_p=None, generator=generator)
        self.timer = timer
        self.step_callback = step_callback
        self.streamer = streamer
        self.criteria = criteria
        # output_scores / output_logits: per input sequence, the rows each emitted token was chosen from
        self.kept = {name: [[] for _ in rows] for name, wanted in zip(("scores", "logits"), outputs) if wanted}
        self.score_warpers = score_warpers
        self.step_rows: dict[str, torch.Tensor] = {}
        self.cache = None
        self.num_target_forwards = 0
        self.accept_lengths: list[list[int]] = [[] for _ in rows]
        self.done = [False] * self.batch
        self.num_layers = 0
        # Rules no sequence of this call can trigger (an n-gram or an entry longer than the longest node's
        # sequence) are dropped: their cost grows with their length.
        longest = max(self.prompt_lens) + max_new_tokens + engine.tree_depth + 1
        rules = _LogitRules() if rules is None else rules.within(max(self.prompt_lens), longest)
        self.rules = rules
        device = engine.device
        # The repetition penalty: seen[b, v] says whether token v is among sequence b's committed tokens.
        self.penalty = penalty
        self.seen = None
        if penalty is not None:
            self.seen = torch.zeros(self.batch, engine.vocab_size, dtype=torch.bool, device=device)
        # Tokens the target never takes at any node (suppressed, one-token bad words): the drafts skip them too.
        bad = [] if rules.token_sequences is None else rules.token_sequences.bad_single_ids
        self.draft_bans = sorted(set(rules.suppress) | set(bad))
        self._draft_ban_ids: dict[int, torch.Tensor | None] = {}
        if penalty is not None or self.draft_bans:
            self.drafter = _PenalizedDrafter(self.drafter, self._penalize_draft)
        # no_repeat_ngram_size: history[b] holds sequence b's committed tokens, -1 after them.
        self.history = None
        if rules.no_repeat_ngram_size:
            capacity = max(self.prompt_lens) + max_new_tokens + engine.tree_depth + 1
            self.history = torch.full((self.batch, capacity), -1, dtype=torch.int64, device=device)
        self._commit([0] * self.batch, self.rows)
        # The prompt's rules ("encoder input" of a decoder-only model): its tokens as a set and as a sequence.
        prompt = self._prompt_tensor() if rules.encoder_penalty is not None or rules.encoder_ngram_size else None
        self.prompt_held = None
        if rules.encoder_penalty is not None:
            held = torch.zeros(self.batch, engine.vocab_size + 1, dtype=torch.bool, device=device)
            self.prompt_held = held.scatter_(1, torch.where(prompt >= 0, prompt, engine.vocab_size), True)[:, :-1]
        self.prompt_tokens = prompt if rules.encoder_ngram_size else None
        # Banned tokens: EOS at positions before eos_until[b] (min_new_tokens / min_length), the suppressed ids
        # everywhere, the begin-suppressed ids at the first new token; forced EOS at position forced_at[b].
        min_new_tokens, min_length, suppress, begin_suppress = (rules.min_new_tokens, rules.min_length,
                                                                rules.suppress, rules.begin_suppress)
        # generate: a min_new_tokens that is set (0 included) replaces min_length by prompt length + min_new_tokens.
        until = [length - 1 + (min_length - length if min_new_tokens is None else min_new_tokens)
                 for length in self.prompt_lens]
        needed = eos and any(end > length - 1 for end, length in zip(until, self.prompt_lens))
        self.eos_until_rows = until  # per input sequence, on the host: the ban stops once every root passed it
        self.eos_until = int64_to_device(until, device) if needed else None
        eos_ids = int64_to_device(sorted(eos), device) if eos and (needed or rules.decay is not None) else None
        self.eos_ids = eos_ids if needed else None
        self.suppress = int64_to_device(suppress, device) if suppress else None
        self.begin_suppress = int64_to_device(begin_suppress, device) if begin_suppress else None
        # generate forces the EOS ids at max_length - 1 = prompt + max_new_tokens - 1 tokens: the node at position
        # prompt + max_new_tokens - 2 predicts the max_new_tokens-th new token.
        self.forced_at_rows = [length + max_new_tokens - 2 for length in self.prompt_lens]
        self.forced_at = int64_to_device(self.forced_at_rows, device) if rules.forced_eos else None
        self.forced_eos = int64_to_device(rules.forced_eos, device) if rules.forced_eos else None
        self.decay_eos = eos_ids if rules.decay is not None else None

    def _prompt_tensor(self) -> torch.Tensor:
        """``[B, max prompt length]`` int64: each prompt, ``-1`` after it."""
        width = max(self.prompt_lens)
        flat = [token for row in self.rows for token in row + [-1] * (width - len(row))]
        return int64_to_device(flat, self.engine.device).view(self.batch, width)

    # -- target ----------------------------------------------------------------------------------

    def _target_forward(self, tokens, positions, context, **extra):
        engine = self.engine
        out = engine.target(
            input_ids=tokens, position_ids=positions, use_cache=True,
            output_hidden_states=self.drafter.needs_features,
            **{engine._cache_kwarg: self.cache, CONTEXT_KWARG: context}, **extra,
        )
        self.num_target_forwards += 1
        if context.calls == 0 or (self.num_layers and context.calls != self.num_layers):
            raise ValueError(
                f"target ({type(engine.target).__name__}) made {context.calls} calls to the registered attention "
                f"function for {self.num_layers or 'its'} cache layers: its attention does not go through "
                f"transformers' AttentionInterface (unsupported model)"
            )
        features = out.hidden_states[-1] if self.drafter.needs_features else None
        return out.logits, features

    def _penalize_draft(self, logits: torch.Tensor) -> torch.Tensor:
        """Draft logits ``[B, V]`` or ``[B, m, V]`` with the penalty on each sequence's committed tokens and the
        tokens the target never takes at -inf (in their dtype: they only rank the drafts)."""
        if self.penalty is not None:
            seen = self.seen.view(self.seen.shape[0], *([1] * (logits.dim() - 2)), -1)
            logits = torch.where(seen, _penalized_values(logits, self.penalty), logits)
        width = logits.shape[-1]
        if width not in self._draft_ban_ids:  # once per call and width: ids the draft's vocabulary has
            ids = [token for token in self.draft_bans if token < width]
            self._draft_ban_ids[width] = int64_to_device(ids, self.engine.device) if ids else None
        bans = self._draft_ban_ids[width]
        return logits if bans is None else logits.index_fill(-1, bans, -math.inf)

    def _commit(self, starts: list[int], tokens: list[list[int]]) -> None:
        """Record each batch row's new committed ``tokens`` (host ints, one list per batch row, the first at
        position ``starts[row]``) in the device state the rules read (``seen``, ``history``): one copy."""
        if self.seen is None and self.history is None:
            return
        rows = [row for row, row_tokens in enumerate(tokens) for _ in row_tokens]
        positions = [start + k for start, row_tokens in zip(starts, tokens) for k in range(len(row_tokens))]
        flat = int64_to_device(rows + positions + [token for row_tokens in tokens for token in row_tokens],
                               self.engine.device)
        rows, positions, values = flat.view(3, -1).unbind(0)
        if self.seen is not None:
            self.seen[rows, values] = True
        if self.history is not None:
            self.history[rows, positions] = values

    def _tails(self, tree: TreeSpec, tokens: torch.Tensor) -> torch.Tensor | None:
        """The last tokens of every node's sequence that the rules read (:func:`node_tails`), or None."""
        width = self.rules.tail_width
        if not width:
            return None
        committed = [([-1] * width + self.rows[row])[-width:] for row in self.active]
        committed = int64_to_device([token for row in committed for token in row], self.engine.device)
        return node_tails(tree, tokens, committed.view(self.batch, width), width)

    def _banned(self, logits: torch.Tensor, positions: torch.Tensor | None, tree: TreeSpec, tokens: torch.Tensor,
                tails: torch.Tensor | None, nodes: list | None = None) -> torch.Tensor:
        """``logits [B, T, V]`` (this step's own tensor: written in place) with the banned tokens at -inf, in
        ``generate``'s order: repeated n-grams, bad words, EOS at nodes whose position ``[B, T]`` is before
        ``eos_until`` (fewer new tokens than required before the one this node predicts), the tokens
        ``prefix_allowed_tokens_fn`` does not allow after each node's sequence (``nodes``), the forced EOS at
        ``forced_at`` (every other token -inf, the EOS ids 0), the suppressed ids, the begin-suppressed ids at the
        first new token (the prefill: ``positions`` None). The position rules are skipped on the host when no node
        can reach their bound."""
        roots = [len(self.rows[row]) - 1 for row in self.active]
        prefill = positions is None
        if prefill and (self.eos_until is not None or self.forced_at is not None):  # the prompt's last position
            positions = int64_to_device(roots, self.engine.device).view(-1, 1)
        if self.rules.no_repeat_ngram_size:
            history = self.history[:, : max(roots) + 1]
            ban_repeated_ngrams(logits, self.rules.no_repeat_ngram_size, tails, history, tree, tokens)
        if self.prompt_tokens is not None:
            ban_repeated_ngrams(logits, self.rules.encoder_ngram_size, tails, self.prompt_tokens)
        if self.rules.token_sequences is not None and self.rules.token_sequences.bans:
            self.rules.token_sequences.ban(logits, tails)
        if self.eos_until is not None and any(root < self.eos_until_rows[row]
                                              for root, row in zip(roots, self.active)):
            early = positions < self.eos_until[:, None]
            eos = logits.index_select(-1, self.eos_ids).masked_fill_(early[..., None], -math.inf)
            logits.index_copy_(-1, self.eos_ids, eos)
        if self.rules.prefix_allowed_tokens_fn is not None:
            self._prefix_constrained(logits, nodes)
        if self.forced_at is not None and any(root + tree.max_depth >= self.forced_at_rows[row]
                                              for root, row in zip(roots, self.active)):
            forced = positions == self.forced_at[:, None]
            eos = logits.index_select(-1, self.forced_eos).masked_fill_(forced[..., None], 0.0)
            logits.masked_fill_(forced[..., None], -math.inf).index_copy_(-1, self.forced_eos, eos)
        if self.decay_eos is not None:
            self._decay(logits, tree, roots)
        if self.suppress is not None:
            logits.index_fill_(-1, self.suppress, -math.inf)
        if prefill and self.begin_suppress is not None:
            logits.index_fill_(-1, self.begin_suppress, -math.inf)
        return logits

    def _node_sequences(self, tree: TreeSpec, tokens: torch.Tensor) -> list[tuple[torch.Tensor, list[int]]]:
        """Every node's sequence, for the caller's per-node rules: per active row, a device tensor ``[T, n]`` whose
        row ``i`` starts with node ``i``'s sequence (the committed tokens, root included, then the drafts on its
        path; 0 after it) and the sequences' lengths. One device-to-host read of the tree's tokens and parents and
        one host-to-device copy of the committed tokens and the paths (O(L + T depth) host work per sequence)."""
        batch, num_nodes = tokens.shape
        host = torch.cat([tokens, tree.parents.expand(batch, -1)], dim=1).tolist()
        flat, shapes = [], []
        for b, row in enumerate(self.active):
            node_tokens, parents = host[b][:num_nodes], host[b][num_nodes:]
            paths = [[]]
            for node in range(1, num_nodes):  # a parent comes before its children
                paths.append(paths[parents[node]] + [node_tokens[node]])
            deepest = max(len(path) for path in paths)
            flat += self.rows[row]
            flat += [token for path in paths for token in path + [0] * (deepest - len(path))]
            shapes.append((len(self.rows[row]), deepest, [len(path) for path in paths]))
        flat = int64_to_device(flat, self.engine.device)
        out, start = [], 0
        for length, deepest, path_lengths in shapes:
            committed = flat[start: start + length].expand(num_nodes, length)
            paths = flat[start + length: start + length + num_nodes * deepest].view(num_nodes, deepest)
            out.append((torch.cat([committed, paths], dim=1), [length + depth for depth in path_lengths]))
            start += length + num_nodes * deepest
        return out

    def _prefix_constrained(self, logits: torch.Tensor, nodes: list) -> None:
        """transformers' ``PrefixConstrainedLogitsProcessor`` at every node: ``fn(batch_id, sequence)`` (the input
        row's index, node ``i``'s sequence as a 1-D device tensor) lists the allowed tokens; the others get -inf
        (added, as transformers adds its mask). In place."""
        fn = self.rules.prefix_allowed_tokens_fn
        mask = torch.full_like(logits, -math.inf)
        for b, (row, (ids, lengths)) in enumerate(zip(self.active, nodes)):
            for node, length in enumerate(lengths):
                allowed = fn(row, ids[node, :length])
                if len(allowed) == 0:
                    raise ValueError(f"prefix_allowed_tokens_fn returned no token for batch_id {row} (the constraint "
                                     f"cannot be satisfied), as transformers' generate refuses it")
                mask[b, node, _allowed_ids(allowed, logits.shape[-1], row)] = 0.0
        logits.add_(mask)

    def _custom_processed(self, logits: torch.Tensor, nodes: list) -> None:
        """The caller's ``logits_processor`` list on every node row, in place: called once per sequence and tree
        depth with the nodes of that depth (``input_ids [n, length]`` on the device, their fp32 ``scores [n, V]``),
        as ``generate`` calls it once per token on ``[B, length]``."""
        for b, (ids, lengths) in enumerate(nodes):
            groups: dict[int, list[int]] = {}
            for node, length in enumerate(lengths):
                groups.setdefault(length, []).append(node)
            for length, members in groups.items():
                index = int64_to_device(members, logits.device)
                scores = logits[b].index_select(0, index)
                processed = self.rules.custom(ids.index_select(0, index)[:, :length], scores)
                # (None, a number or another shape failed inside index_copy_, naming no argument)
                if not isinstance(processed, torch.Tensor):
                    raise TypeError(f"logits_processor must return the scores (a torch.Tensor of the shape it was "
                                    f"given, {tuple(scores.shape)}), got {type(processed).__name__}")
                if processed.shape != scores.shape:
                    raise ValueError(f"logits_processor must return scores of the shape it was given "
                                     f"{tuple(scores.shape)}, got {tuple(processed.shape)}")
                logits[b].index_copy_(0, index, processed.to(logits.dtype))  # a processor may change the dtype

    def _decay(self, logits: torch.Tensor, tree: TreeSpec, roots: list[int]) -> None:
        """``exponential_decay_length_penalty`` at the nodes whose sequence is longer than the prompt plus
        ``start_index`` tokens. The factors are computed on the host, per sequence and depth, with Python's ``pow``
        as ``generate`` computes them (one small copy; none when no node reaches the start)."""
        start, factor = self.rules.decay
        starts = [start + self.prompt_lens[row] for row in self.active]
        if all(root + tree.max_depth + 1 <= begin for root, begin in zip(roots, starts)):
            return
        table = [[pow(factor, root + depth + 1 - begin) - 1 if root + depth + 1 > begin else 0.0
                  for depth in range(tree.max_depth + 1)] for root, begin in zip(roots, starts)]
        table = to_device_async(torch.tensor(table, dtype=torch.float32), self.engine.device)
        depth = tree.depth.expand(self.batch, -1)
        decay_eos(logits, self.decay_eos, table.gather(1, depth))

    def _verify(self, tree: TreeSpec, draft_tokens: torch.Tensor, logits: torch.Tensor,
                positions: torch.Tensor | None = None) -> VerifyResult:
        """Verify a step's tree (the prefill's one-node tree when ``positions`` is None)."""
        impl = self.engine.impl
        raw = logits.to(torch.float32, copy=True) if "logits" in self.kept else None  # before in-place rules
        tails = self._tails(tree, draft_tokens)
        nodes = self._node_sequences(tree, draft_tokens) if self.rules.per_node else None
        sequences = self.rules.token_sequences
        if sequences is not None and sequences.biases:
            logits = sequences.biased(logits, tails)  # a new fp32 tensor
        elif self.rules.needs_fp32:
            logits = logits.float()  # the step's own tensor (or a copy): written in place below
        if self.prompt_held is not None:  # the prompt's tokens: 1 / penalty, as transformers' encoder processor
            rewarded = _penalized_values(logits, 1 / self.rules.encoder_penalty)
            logits = torch.where(self.prompt_held[:, None, :], rewarded, logits)
        if self.penalty is not None:
            logits = repetition_penalized(logits, self.penalty, self.seen, tree, draft_tokens)
        logits = self._banned(logits, positions, tree, draft_tokens, tails, nodes)
        if self.rules.custom is not None:
            self._custom_processed(logits, nodes)
        if self.sampling:
            if self.warpers is not None:
                rows = logits.float().reshape(-1, logits.shape[-1])
                logits = self.warpers(rows.new_empty(rows.shape[0], 0, dtype=torch.int64), rows).view(logits.shape)
            result = verify_sampling(tree, draft_tokens, logits, impl=impl, **self.sample_args)
        else:
            result = verify_greedy(tree, draft_tokens, logits, impl=impl)
        if self.kept:
            self._keep_rows(result, logits, raw)
        return result

    def _keep_rows(self, result: VerifyResult, scores: torch.Tensor, raw: torch.Tensor | None) -> None:
        """For ``output_scores`` / ``output_logits``: the step's rows along each accepted path ``[B, depth + 1, V]``
        (row ``k``: the distribution the ``k``-th emitted token was chosen from), kept on the device until
        ``_emit`` knows how many tokens each sequence emitted. The scores are the processed logits, warped when
        sampling, as ``generate`` reports them; the logits are the target's, unprocessed, in fp32."""
        index = result.accepted_nodes.clamp_min(0)[..., None].expand(-1, -1, scores.shape[-1])
        self.step_rows = {}
        if "scores" in self.kept:
            rows = scores.float().gather(1, index)
            if self.score_warpers is not None:
                flat = rows.reshape(-1, rows.shape[-1])
                rows = self.score_warpers(flat.new_empty(flat.shape[0], 0, dtype=torch.int64), flat).view(rows.shape)
            self.step_rows["scores"] = rows
        if raw is not None:
            self.step_rows["logits"] = raw.gather(1, index)

    def outputs(self, name: str) -> list[torch.Tensor] | None:
        """``scores`` or ``logits`` per input sequence, ``[new tokens, V]`` fp32 (None when not asked for)."""
        if name not in self.kept:
            return None
        return [torch.cat(rows) for rows in self.kept[name]]

    def _emit(self, rows: list[int], new_tokens: list[list[int]]) -> None:
        """Append each sequence's generated tokens (``rows``: their input indices), truncated at the first EOS, at
        ``max_new_tokens`` and after the first token at which a stopping criterion holds, like ``generate``."""
        cuts = []
        for row, row_tokens in zip(rows, new_tokens):
            budget = self.max_new_tokens - (len(self.rows[row]) - self.prompt_lens[row])
            emitted = row_tokens[:budget]
            ends = [index for index, token in enumerate(emitted) if token in self.eos]
            cuts.append(emitted[: ends[0] + 1] if ends else emitted)
        stops = self._first_stops(rows, cuts) if self.criteria is not None else [None] * len(rows)
        for position, (row, emitted, stop) in enumerate(zip(rows, cuts, stops)):
            tokens = self.rows[row]
            if stop is not None:
                emitted = emitted[: stop + 1]
            tokens.extend(emitted)
            for name, kept in self.kept.items():
                kept[row].append(self.step_rows[name][position, : len(emitted)])
            if (stop is not None or (emitted and emitted[-1] in self.eos)
                    or len(tokens) - self.prompt_lens[row] >= self.max_new_tokens):
                self.done[row] = True
            if self.streamer is not None and emitted:
                with torch.inference_mode(False):  # an ordinary tensor, as generate streams (not an inference one)
                    self.streamer.put(torch.tensor([emitted], dtype=torch.int64))

    def _first_stops(self, rows: list[int], emitted: list[list[int]]) -> list[int | None]:
        """For each sequence, the index of the first of its ``emitted`` tokens after which the stopping criteria
        hold on the sequence up to that token, or None: one criteria call per token (on a view of one device copy
        of the sequence), one device-to-host read for the whole batch."""
        device = self.engine.device
        flags = []
        for row, row_emitted in zip(rows, emitted):
            tokens = self.rows[row]
            ids = int64_to_device(tokens + row_emitted, device).view(1, -1) if row_emitted else None
            flags += [torch.as_tensor(self.criteria(ids[:, : len(tokens) + index + 1], None), device=device)
                      .reshape(-1).any() for index in range(len(row_emitted))]
        flags = torch.stack(flags).tolist() if flags else []
        stops, start = [], 0
        for row_emitted in emitted:
            row_flags = flags[start: start + len(row_emitted)]
            start += len(row_emitted)
            stops.append(row_flags.index(True) if True in row_flags else None)
        return stops

    def _callback(self) -> None:
        if self.step_callback is None:
            return
        device = self.engine.device
        if self.ragged:
            self.step_callback([int64_to_device(self.rows[row], device).view(1, -1) for row in self.active],
                               self.cache)
        else:
            self.step_callback(int64_to_device(self.rows[0], device).view(1, -1), self.cache)

    # -- the loop --------------------------------------------------------------------------------

    def run(self) -> None:
        engine, timer, device = self.engine, self.timer, self.engine.device
        with timer("prefill"):
            self.cache = _full_cache("target", engine.target)
            width = max(self.prompt_lens)
            prompt = int64_to_device([token for row in self.rows for token in row + [0] * (width - len(row))],
                                     device).view(self.batch, width)
            positions = torch.arange(width, device=device)[None].expand(self.batch, width)
            keep, ends = _row_ends(self.prompt_lens, width, bool(engine._keep_last), device)
            logits, features = self._target_forward(prompt, positions, TreeAttentionContext(impl=engine.impl),
                                                    **keep)
            self.num_layers = len(self.cache.layers)
            # The first token: a one-node tree, so that greedy / sampling follow the verifier's exact rules.
            roots = int64_to_device([row[-1] for row in self.rows], device).view(self.batch, 1)
            result = self._verify(engine._root_tree, roots, _pick_rows(logits, ends)[:, None].float())
            first = result.next_tokens
            first_tokens = [[token] for token in first.tolist()]
            self._commit(self.prompt_lens, first_tokens)
            self._emit(list(range(self.batch)), first_tokens)
            self._callback()
            kept = self._drop_finished()
            if all(self.done):
                return
            prompt_lens = self.prompt_lens
            if kept is not None:
                keep = kept[1]
                prompt, first = prompt[keep], first[keep]
                features = None if features is None else features[keep]
                prompt_lens = [prompt_lens[row] for row in self.active]
            root_logits, root_state = self.drafter.start(prompt, prompt_lens, first, features, self.ragged)
        while not all(self.done):
            # The roots (last committed tokens) are not in the caches yet: a sequence's cache length is root_pos.
            rows = [self.rows[row] for row in self.active]
            root_pos = [len(row) - 1 for row in rows]
            if self.ragged:
                cap_list = self._position_caps()
                step = int64_to_device([row[-1] for row in rows] + root_pos + (cap_list or []), device)
                roots, tree_pos = step[: self.batch], step[self.batch: 2 * self.batch].view(self.batch, 1)
                caps = step[2 * self.batch:].view(self.batch, 1) if cap_list else None
                starts = tree_pos.view(self.batch).to(torch.int32)
            else:
                roots, tree_pos, starts, caps = self.rows[0][-1], root_pos[0], None, None
            with timer("draft"):
                tree, draft_tokens, positions = self._draft(root_logits, root_state, roots, tree_pos, caps)
                self.drafter.rollback()
            with timer("target"):
                context = TreeAttentionContext(tree, engine.impl, starts=starts)
                logits, features = self._target_forward(draft_tokens, positions, context)
            with timer("verify"):
                result = self._verify(tree, draft_tokens, logits, positions)
                # The step's device-to-host read: accepted drafts then the bonus token, -1 padded.
                new_tokens = [[token for token in row if token >= 0] for row in result.emitted_tokens.tolist()]
            with timer("compaction"):
                # The prefix lengths the target's tree attention used (created once per forward).
                cache_lens = starts if self.ragged else context.cache_lens(1, root_pos[0], device)
                self._compact(result, cache_lens, root_pos, new_tokens)
            self._commit([pos + 1 for pos in root_pos], new_tokens)
            for row, tokens in zip(self.active, new_tokens):
                self.accept_lengths[row].append(len(tokens) - 1)
            self._emit(self.active, new_tokens)
            if not self.ragged and self.done[0]:
                # Drafts accepted past an EOS / the token budget were cut: keep the cache consistent.
                _crop_cache(self.cache, len(self.rows[0]) - 1)
            self._callback()
            accepted_nodes = result.accepted_nodes
            kept = self._drop_finished()
            if kept is not None:
                keep, index = kept
                self.drafter.select_rows(keep, index)
                accepted_nodes = accepted_nodes[index]
                features = None if features is None else features[index]
                root_pos = [root_pos[i] for i in keep]
                new_tokens = [new_tokens[i] for i in keep]
            if all(self.done):
                break
            with timer("draft"):
                root_logits, root_state = self._advance(accepted_nodes, features, root_pos, new_tokens)

    def _drop_finished(self) -> tuple[list[int], torch.Tensor] | None:
        """Remove the sequences that have finished from the batch while others go on (a ragged batch only):
        the target cache keeps the other rows (cropped to the longest of them), ``active`` and ``batch``
        follow. Returns the kept batch rows (host list and int64 tensor), or None when the batch is
        unchanged."""
        if not self.ragged or all(self.done):
            return None
        keep = [i for i, row in enumerate(self.active) if not self.done[row]]
        if len(keep) == len(self.active):
            return None
        index = int64_to_device(keep, self.engine.device)
        self.active = [self.active[i] for i in keep]
        self.batch = len(self.active)
        for name in ("seen", "history", "eos_until", "forced_at", "prompt_held", "prompt_tokens"):  # per-row state
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name)[index])
        _select_cache_rows(self.cache, index)
        _crop_cache(self.cache, max(len(self.rows[row]) - 1 for row in self.active))
        return keep, index

    def _advance(self, accepted_nodes: torch.Tensor, features, root_pos: list[int], new_tokens: list[list[int]]):
        """Commit each sequence's accepted tokens and bonus token to the drafter (all of ``new_tokens[b]``: the
        batch holds only unfinished sequences); returns the drafter's outputs at the new roots."""
        device = self.engine.device
        counts = [len(tokens) for tokens in new_tokens]
        width = max(counts)
        flat_tokens, flat_positions = [], []
        caps = self._position_caps() or [None] * len(root_pos)
        for tokens, pos, cap in zip(new_tokens, root_pos, caps):
            flat_tokens += (tokens + [0] * width)[:width]
            positions = range(pos + 1, pos + 1 + width)  # past the sequence's count: padding, capped (_position_caps)
            flat_positions += positions if cap is None else (min(position, cap) for position in positions)
        advance = int64_to_device(flat_tokens + flat_positions, device)
        advance_tokens, advance_positions = advance.view(2, self.batch, width).unbind(0)
        path_features = None
        if features is not None:
            nodes = accepted_nodes[:, :width]
            if self.ragged:
                nodes = nodes.clamp(min=0)  # a sequence's padding entries: any node
                path_features = features.gather(1, nodes[:, :, None].expand(-1, -1, features.shape[-1]))
            else:
                path_features = features[:, nodes[0]]
        return self.drafter.advance(advance_tokens, advance_positions, path_features,
                                    counts if self.ragged else None)

    def _compact(self, result: VerifyResult, cache_lens: torch.Tensor, root_pos: list[int],
                 new_tokens: list[list[int]]) -> None:
        """Move the accepted rows after each prefix in every layer (in place, one call for all layers), then
        crop what no sequence needs."""
        layers = self.cache.layers
        compact_kv_cache([layer.keys for layer in layers], [layer.values for layer in layers], cache_lens, result,
                         impl=self.engine.impl)
        _crop_cache(self.cache, max(pos + len(tokens) for pos, tokens in zip(root_pos, new_tokens)))

    # -- drafting --------------------------------------------------------------------------------

    def _position_caps(self) -> list[int] | None:
        """Per active sequence of a batch, the position id its tree and draft forwards are capped at, or None when
        no cap can bind. A batch's trees are cut for the sequence furthest from its budget, so a sequence ahead
        drafts nodes past its own, up to the tree depth beyond the largest position ``generate`` gives a forward
        (prompt + max_new_tokens - 2): past a learned position table (GPT-2's wpe raised an IndexError in a
        ragged batch that ``generate`` decodes, a device assert on CUDA; a review, 2026-12-07), or past the
        target's :func:`_position_limit` (such batches were refused). Such nodes' ids are capped at the larger of
        that position and the bound's last: nothing kept changes (a node at depth d >= the sequence's budget r
        has no kept token after it; those at depth < r stay below the cap). Draft advances' padding entries
        likewise."""
        bound = self.engine._position_bound
        if bound is None or max(self.prompt_lens) + self.max_new_tokens - 1 + self.engine.tree_depth <= bound:
            return None
        return [max(self.prompt_lens[row] + self.max_new_tokens - 2, bound - 1) for row in self.active]

    def _draft(self, root_logits, root_state, roots, root_pos, caps) -> tuple[TreeSpec, torch.Tensor, torch.Tensor]:
        """This step's trees, their tokens ``[B, T]`` (node 0: the root) and position ids ``[B, T]``.
        ``roots`` / ``root_pos`` / ``caps``: host integers at batch size 1 (no caps), ``[B]`` / ``[B, 1]`` /
        ``[B, 1]`` tensors otherwise (:meth:`_position_caps`)."""
        # At most `left` more tokens are kept (max_new_tokens): drafts deeper than left - 1 would be cut.
        left = max(self.max_new_tokens - (len(self.rows[row]) - self.prompt_lens[row]) for row in self.active)
        static, dynamic = self.engine._plans_within(left - 1)
        drafter = self.drafter if caps is None else _CappedPositions(self.drafter, caps)
        if static is not None:
            tree, tokens, positions = self._draft_static(drafter, static, root_logits, root_state, roots, root_pos)
        else:
            tree, tokens = dynamic.draft(drafter, root_logits, root_state, roots, root_pos, self.timer)
            positions = tree.depth + root_pos
        return tree, tokens, positions if caps is None else torch.minimum(positions, caps)

    def _draft_static(self, drafter, plan: _StaticPlan, root_logits, root_state, roots, root_pos):
        """Fill the static tree's tokens level by level; no host synchronisation."""
        device, batch = self.engine.device, self.batch
        tokens = torch.empty(batch, plan.tree.num_nodes, dtype=torch.int64, device=device)
        if isinstance(roots, int):
            tokens[:, 0].fill_(roots)  # the root, known on the host
        else:
            tokens[:, 0] = roots
        positions = plan.tree.depth + root_pos
        if plan.num_children_max == 0:
            return plan.tree, tokens, positions
        top = torch.topk(root_logits, plan.num_children_max).indices
        tokens[:, plan.root_child_nodes] = top[:, plan.root_child_ranks]
        states = None if root_state is None else root_state[:, None]
        for level, (eval_nodes, draft_tree, parent_rows, child_nodes, child_rows, child_ranks) in enumerate(
            plan.levels, start=1
        ):
            parent_states = None if states is None else states[:, parent_rows]
            if isinstance(root_pos, int):
                level_positions = torch.full((batch, eval_nodes.shape[0]), root_pos + level, dtype=torch.int64,
                                             device=device)
            else:
                level_positions = (root_pos + level).expand(batch, eval_nodes.shape[0])
            logits, new_states = drafter.expand(tokens[:, eval_nodes], parent_states, level_positions, draft_tree)
            top = torch.topk(logits, plan.num_children_max, dim=-1).indices
            tokens[:, child_nodes] = top[:, child_rows, child_ranks]
            if states is not None:
                states = torch.cat([states, new_states], dim=1)
        return plan.tree, tokens, positions
