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
  context the layer's queries are the tree nodes, which sit at the end of the KV the cache returned, and
  attention runs :func:`~distill_ops.tree_attention.tree_attention` (Triton on CUDA). Without one
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
deterministic top-k choices, verified with the residual rule of :func:`~distill_ops.verify.verify_sampling`).
Batch size 1 only. Stops at ``eos_token_id`` / ``max_new_tokens`` exactly like ``generate``.

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
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from ._utils import INT_DTYPES, check_number, check_tensor, resolve_impl, sink_softmax, softcapped
from .tree import (
    BITS_PER_WORD,
    MAX_TREE_NODES,
    TreeSpec,
    build_tree,
    int64_to_device,
    tree_from_paths,
    tree_spec_from_parents_tensor,
    tree_spec_in_place,
)
from .tree_attention import tree_attention
from .verify import VerifyResult, compact_kv_cache, verify_greedy, verify_sampling

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
    :func:`~distill_ops.tree.tree_spec_from_parents_tensor` (no host read at all).
    """
    num_nodes = len(parents)
    if num_nodes < 1 or num_nodes > MAX_TREE_NODES:
        raise ValueError(f"a tree must have 1 to {MAX_TREE_NODES} nodes, got {num_nodes}")
    if parents[0] != -1 or any(not 0 <= parents[i] < i for i in range(1, num_nodes)):
        raise ValueError(f"parents must satisfy parents[0] == -1 and 0 <= parents[i] < i, got {list(parents)}")
    return _HostTree.from_parents(parents).to_device(torch.device(device))


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
    """

    tree: TreeSpec | None = None
    impl: str = "auto"
    calls: int = 0
    _cache_lens: torch.Tensor | None = field(default=None, repr=False)

    def cache_lens(self, batch: int, prefix_len: int, device: torch.device) -> torch.Tensor:
        """The ``[B]`` prefix lengths tensor, created once per forward (every layer has the same prefix)."""
        lens = self._cache_lens
        if lens is None or lens.shape[0] != batch or lens.device != device:
            lens = torch.full((batch,), prefix_len, dtype=torch.int32, device=device)
            self._cache_lens = lens
        return lens


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
    Returns ``[B, Hq, q_len, D]``. When ``q_len < T`` (a draft expanding one level of its tree) the earlier
    nodes' query rows are padded with zeros and their outputs dropped: one
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
    cache_lens = context.cache_lens(batch, kv_len - num_nodes, query.device)
    if q_len < num_nodes:
        padded = query.new_zeros(batch, num_heads, num_nodes, head_dim)
        padded[:, :, num_nodes - q_len:] = query
        query = padded
    out = tree_attention(query, key, value, tree, cache_lens, sm_scale=scaling, softcap=softcap,
                         sliding_window=sliding_window, sinks=sinks, impl=context.impl)
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
    bad = [type(layer).__name__ for layer in DynamicCache(config=model.config).layers if type(layer) not in supported]
    if bad:
        raise ValueError(
            f"{name} ({type(model).__name__}) uses cache layers the engine cannot compact in place "
            f"({', '.join(sorted(set(bad)))}); only full-attention and sliding-window attention layers are "
            f"supported (no linear-attention, indexed or quantized layers)"
        )
    return DynamicCache()


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


class _Timer:
    """Accumulates wall-clock seconds per phase; with ``sync`` the CUDA stream is drained at each
    boundary so that the split is device time, not launch time."""

    def __init__(self, device: torch.device, sync: bool):
        self.sync = sync and device.type == "cuda"
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if self.sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


# --------------------------------------------------------------------------------------------------
# Drafters: a causal LM, or an FSPAD head on the target's features
# --------------------------------------------------------------------------------------------------


class _ModelDrafter:
    """A smaller ``transformers`` causal LM with its own ``DynamicCache``.

    The committed cache holds every token through the current root; each drafting level appends the
    expanded nodes (tree attention over root + expanded nodes) and :meth:`rollback` crops them.
    """

    needs_features = False

    def __init__(self, model: torch.nn.Module, impl: str):
        self.model = model
        self.impl = impl
        self.cache_kwarg = _cache_kwarg(model)
        self.keep_last = {"logits_to_keep": 1} if _supports_logits_to_keep(model) else {}
        self.cache = None
        self.committed = 0

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, context: TreeAttentionContext, **extra):
        out = self.model(
            input_ids=tokens, position_ids=positions, use_cache=True,
            **{self.cache_kwarg: self.cache, CONTEXT_KWARG: context}, **extra,
        )
        if context.calls == 0:
            raise ValueError(
                f"draft ({type(self.model).__name__}) never called the registered attention function: its attention "
                f"does not go through transformers' AttentionInterface (unsupported model)"
            )
        return out.logits

    def start(self, prompt_ids: torch.Tensor, first_token: torch.Tensor, features: torch.Tensor | None,
              max_length: int):
        self.cache = _full_cache("draft", self.model)
        tokens = torch.cat([prompt_ids, first_token.view(1, 1)], dim=1)
        positions = torch.arange(tokens.shape[1], device=tokens.device)[None]
        return self.advance(tokens, positions, None)

    def advance(self, tokens: torch.Tensor, positions: torch.Tensor, features: torch.Tensor | None):
        """Commit ``tokens [1, n]`` (causal); returns the last token's next-token logits ``[V]`` and no state."""
        logits = self._forward(tokens, positions, TreeAttentionContext(impl=self.impl), **self.keep_last)
        self.committed = self.cache.get_seq_length()
        return logits[0, -1], None

    def expand(self, tokens: torch.Tensor, parent_states, positions: torch.Tensor, tree: TreeSpec):
        """Append one level of tree nodes (the last ``len(tokens)`` nodes of ``tree``, whose node 0 is the
        committed root); returns their next-token logits ``[m, V]`` and no state."""
        logits = self._forward(tokens[None], positions[None], TreeAttentionContext(tree, self.impl))
        return logits[0], None

    def rollback(self) -> None:
        extra = self.cache.get_seq_length() - self.committed
        if extra:
            self.cache.crop(-extra)


class _FSPADDrafter:
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
        self.impl = impl
        self.cache = None

    def start(self, prompt_ids: torch.Tensor, first_token: torch.Tensor, features: torch.Tensor,
              max_length: int):
        self.cache = self.head.new_cache()
        tokens = torch.cat([prompt_ids[:, 1:], first_token.view(1, 1)], dim=1)
        positions = torch.arange(1, tokens.shape[1] + 1, device=tokens.device)[None]
        return self.advance(tokens, positions, features)

    def advance(self, tokens: torch.Tensor, positions: torch.Tensor, features: torch.Tensor):
        regress, predict = self.head(features, self.embed(tokens), positions, cache=self.cache)
        self.cache.commit()
        return self.lm_head(predict[0, -1]), regress[0, -1]

    def expand(self, tokens: torch.Tensor, parent_states: torch.Tensor, positions: torch.Tensor, tree: TreeSpec):
        regress, predict = self.head(
            parent_states[None], self.embed(tokens[None]), positions[None], cache=self.cache,
            tree=TreeAttentionContext(tree, self.impl),
        )
        return self.lm_head(predict[0]), regress[0]

    def rollback(self) -> None:
        self.cache.rollback()


# --------------------------------------------------------------------------------------------------
# Draft trees
# --------------------------------------------------------------------------------------------------


@dataclass
class _StaticPlan:
    """Everything about a static tree that does not depend on the tokens, prepared once."""

    tree: TreeSpec
    num_children_max: int
    root_child_nodes: torch.Tensor  # nodes whose parent is the root
    root_child_ranks: torch.Tensor
    # per level d = 1 .. max_depth - 1: (eval nodes, draft-tree spec after appending them,
    #   appended index of each eval node's parent, child nodes, (row of the parent in this level, rank))
    levels: list[tuple[torch.Tensor, TreeSpec, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


def _static_plan(parents: list[int], device: torch.device) -> _StaticPlan:
    num_nodes = len(parents)
    depth = [0] * num_nodes
    children: list[list[int]] = [[] for _ in range(num_nodes)]
    for node in range(1, num_nodes):
        depth[node] = depth[parents[node]] + 1
        children[parents[node]].append(node)
    rank = [0] * num_nodes
    for kids in children:
        for position, kid in enumerate(kids):
            rank[kid] = position
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
        num_children_max=max(len(kids) for kids in children),
        root_child_nodes=as_tensor(children[0]),
        root_child_ranks=as_tensor([rank[kid] for kid in children[0]]),
        levels=levels,
    )


@torch.library.custom_op("distill_ops::eagle_level", mutates_args=("floats", "ints"))
def _eagle_level_op(values: torch.Tensor, indices: torch.Tensor, floats: torch.Tensor, ints: torch.Tensor,
                    layout: list[int], row_base: int, node_base: int, num_expand: int, position: int) -> None:
    """:class:`_DynamicPlan`'s level launch as an opaque op, for ``torch.compile`` (``kernels/eagle_tree.py``)."""
    from .kernels.eagle_tree import eagle_level_forward

    eagle_level_forward(values, indices, floats, ints, tuple(layout), row_base, node_base, num_expand, position)


@_eagle_level_op.register_fake
def _(values, indices, floats, ints, layout, row_base, node_base, num_expand, position):
    return None


@torch.library.custom_op("distill_ops::eagle_select", mutates_args=("floats", "ints"))
def _eagle_select_op(values: torch.Tensor, indices: torch.Tensor, floats: torch.Tensor, ints: torch.Tensor,
                     layout: list[int], num_rows: int, last_row_base: int, root_token: int) -> None:
    """:class:`_DynamicPlan`'s final selection as an opaque op, for ``torch.compile``."""
    from .kernels.eagle_tree import eagle_select_forward

    eagle_select_forward(values, indices, floats, ints, tuple(layout), num_rows, last_row_base, root_token)


@_eagle_select_op.register_fake
def _(values, indices, floats, ints, layout, num_rows, last_row_base, root_token):
    return None


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
      launches. GPU time not measured.
    """

    def __init__(self, topk: int, depth: int, num_nodes: int, vocab: int, device: torch.device, impl: str = "auto"):
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
            return
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
        """The Triton path's workspaces and their views (``kernels/eagle_tree.py``): candidates are rows of
        ``k`` after the root, one row per draft-tree node (``node_bases[depth]`` of them)."""
        from .kernels.eagle_tree import section_offsets

        self.num_rows = self.node_bases[self.depth] if self.depth else 0
        self.last_row_base = self.node_bases[self.depth - 1] if self.depth else 0
        num_draft_nodes = max(self.num_rows, 1)
        self.layout = (1 + self.num_rows * self.k, num_draft_nodes, self.num_tree_nodes)
        float_offsets, int_offsets, float_size, int_size = section_offsets(*self.layout)
        # Node 0, the root: score 0 (a zero workspace), candidate 0 and parent -1, written once here.
        self.floats = torch.zeros(float_size, dtype=torch.float64, device=device)
        initial = [0] * int_size
        initial[int_offsets["node_parents"]] = -1
        self.ints = int64_to_device(initial, device)
        self.int_offsets = int_offsets
        # Per expanding level: the draft tree's parents (a prefix) and the expanded nodes' parents, tokens
        # and position ids; then the verification tree's parents and tokens. Made once (eager calls).
        self.view_bounds = [
            (("node_parents", 0, first + count), ("node_parents", first, first + count),
             ("node_tokens", first, first + count), ("node_positions", first, first + count))
            for first, count in zip(self.node_bases[1:], self.expanded)
        ]
        self.view_bounds.append((("tree_parents", 0, self.num_tree_nodes), ("tree_tokens", 0, self.num_tree_nodes)))
        self.views = self._workspace_views()
        # Eager steps rebuild each spec in place over these parent views (one launch, nothing allocated).
        self.specs = [tree_spec_in_place(level_views[0], level, self.k)
                      for level, level_views in enumerate(self.views[:-1], start=1)]
        self.specs.append(tree_spec_in_place(self.views[-1][0], self.max_depth, self.max_children))
        # The one-node tree has no last level: the final launch reads nothing from these.
        self.no_level = (torch.zeros(1, 1, device=device), torch.zeros(1, 1, dtype=torch.int64, device=device))

    def _workspace_views(self) -> list[tuple[torch.Tensor, ...]]:
        """The views of ``view_bounds``: slices of the int64 workspace."""
        return [tuple(self.ints[self.int_offsets[name] + start: self.int_offsets[name] + stop]
                      for name, start, stop in bounds) for bounds in self.view_bounds]

    def draft(self, drafter, root_logits: torch.Tensor, root_state: torch.Tensor | None, root_token: int,
              root_pos: int, timer: Callable) -> tuple[TreeSpec, torch.Tensor]:
        """Draft one tree: the verification :class:`TreeSpec` and its tokens ``[T]`` (node 0: ``root_token``).

        ``drafter.expand(tokens [E], parent_states, positions [E], draft_tree)`` runs the draft on each
        level's expanded nodes (the last ``E`` nodes of ``draft_tree``) and returns their next-token logits
        ``[E, V]`` and states (``None`` for a draft LM; FSPAD's predicted features otherwise). Device ops
        only; ``timer("tree")`` wraps the candidate bookkeeping and the specs.
        """
        if self.triton:
            return self._draft_triton(drafter, root_logits, root_state, root_token, root_pos, timer)
        device = root_logits.device
        scores = [self.root_score]
        tokens = [torch.full((1,), root_token, dtype=torch.int64, device=device)]
        ranks = []  # each expanded level's chosen positions among its candidates
        states = None if root_state is None else root_state[None]
        logits, parent_scores, draft_parents = root_logits[None], None, self.root_parent
        for level in range(1, self.depth + 1):
            values, indices = torch.topk(torch.log_softmax(logits.float(), dim=-1), self.k, dim=-1)
            with timer("tree"):
                # float64 (type promotion of the float32 log-probs): the sums the host rule used.
                level_scores = values.double() if parent_scores is None else parent_scores[:, None] + values
                level_scores, level_tokens = level_scores.flatten(), indices.flatten()
                scores.append(level_scores)
                tokens.append(level_tokens)
                if level == self.depth:
                    break
                best = torch.sort(level_scores, descending=True, stable=True).indices[: self.expanded[level - 1]]
                ranks.append(best)
                parent_scores = level_scores[best]
                parent_nodes = best // self.k + self.node_bases[level - 1]
                draft_parents = torch.cat([draft_parents, parent_nodes])
                draft_tree = tree_spec_from_parents_tensor(draft_parents, level, self.k, impl=self.impl)
                expanded_tokens = level_tokens[best]
                expanded_positions = torch.full_like(best, root_pos + level)
            parent_states = None if states is None else states[parent_nodes]
            logits, new_states = drafter.expand(expanded_tokens, parent_states, expanded_positions, draft_tree)
            if states is not None:
                states = torch.cat([states, new_states])
        with timer("tree"):
            all_scores, all_tokens = torch.cat(scores), torch.cat(tokens)
            order = torch.sort(all_scores, descending=True, stable=True).indices
            kept = order[: self.num_tree_nodes].sort().values  # breadth-first: candidate order is level order
            expanded_ids = torch.cat([self.expanded_head, *ranks]) + self.expanded_offsets
            parents = torch.searchsorted(kept, expanded_ids[self.parent_slot[kept]], right=True) - 1
            tree = tree_spec_from_parents_tensor(parents, self.max_depth, self.max_children, impl=self.impl)
            return tree, all_tokens[kept]

    def _draft_triton(self, drafter, root_logits, root_state, root_token, root_pos, timer):
        """:meth:`draft` on the Triton path: one launch per expanding level, one for the final tree."""
        from .kernels.eagle_tree import eagle_level_forward, eagle_select_forward

        # Eager calls launch directly: the custom ops that make the launches traceable cost a dispatcher
        # round trip of host time each (see distill_ops.tree.tree_spec_from_parents_tensor).
        compiling = torch.compiler.is_compiling()
        level_launch = _eagle_level_op if compiling else eagle_level_forward
        select_launch = _eagle_select_op if compiling else eagle_select_forward
        layout = list(self.layout) if compiling else self.layout
        # Traced code slices the workspace itself: outputs that are views of views made outside the graph
        # do not survive functionalization.
        views = self._workspace_views() if compiling else self.views
        states = None if root_state is None else root_state[None]
        logits = root_logits[None]
        values, indices = self.no_level
        for level in range(1, self.depth + 1):
            values, indices = torch.topk(torch.log_softmax(logits.float(), dim=-1), self.k, dim=-1)
            if level == self.depth:
                break  # the final launch scores the last level
            with timer("tree"):
                draft_parents, parent_nodes, expanded_tokens, expanded_positions = views[level - 1]
                level_launch(values, indices, self.floats, self.ints, layout, self.node_bases[level - 1],
                             self.node_bases[level], self.expanded[level - 1], root_pos + level)
                draft_tree = self._spec(level - 1, draft_parents, level, self.k, compiling)
            parent_states = None if states is None else states[parent_nodes]
            logits, new_states = drafter.expand(expanded_tokens, parent_states, expanded_positions, draft_tree)
            if states is not None:
                states = torch.cat([states, new_states])
        with timer("tree"):
            select_launch(values, indices, self.floats, self.ints, layout, self.num_rows, self.last_row_base,
                          root_token)
            tree_parents, tree_tokens = views[-1]
            tree = self._spec(-1, tree_parents, self.max_depth, self.max_children, compiling)
            return tree, tree_tokens

    def _spec(self, index: int, parents: torch.Tensor, max_depth: int, max_children: int, compiling: bool):
        """The spec of ``parents``: eager, rebuilt in place over the plan's buffer ``index``; traced, built anew
        (the in-place buffers are views made outside the graph)."""
        if compiling:
            return tree_spec_from_parents_tensor(parents, max_depth, max_children, impl=self.impl)
        spec, rebuild = self.specs[index]
        rebuild()
        return spec


# --------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------


@dataclass
class SpeculativeOutput:
    """Result of :meth:`SpeculativeDecoder.generate`.

    Attributes:
        sequences: int64 ``[1, L + new]``: the prompt then the generated tokens (as ``generate`` returns).
        num_target_forwards: target forward passes (the prefill included).
        accept_lengths: accepted draft tokens per verification step (the bonus token excluded).
        timings: seconds per phase: ``prefill`` (target and draft prefill), ``draft`` (draft forwards and
            tree selection, including ``tree``: building the tree specs), ``target`` (target forwards over
            the trees), ``verify``, ``compaction`` and ``total``. With ``profile=True`` the CUDA stream is
            synchronised at phase boundaries (device times); otherwise they are host times.
        prompt_length: ``L``.
    """

    sequences: torch.Tensor
    num_target_forwards: int
    accept_lengths: list[int]
    timings: dict[str, float]
    prompt_length: int = 0

    @property
    def num_new_tokens(self) -> int:
        """Generated tokens (the sequence minus the prompt)."""
        return self.sequences.shape[1] - self.prompt_length

    @property
    def mean_accept_length(self) -> float:
        """Mean tokens produced per verification step (accepted drafts + the bonus token)."""
        return sum(self.accept_lengths) / len(self.accept_lengths) + 1.0 if self.accept_lengths else 0.0


class SpeculativeDecoder:
    """Speculative decoding of a ``transformers`` causal LM with a draft tree verified in one target pass.

    Args:
        target: a decoder-only ``transformers`` causal LM whose attention goes through the
            ``AttentionInterface`` (Llama, Qwen2, Mistral families...), in ``eval()`` mode.
        draft: a smaller ``transformers`` causal LM with the same vocabulary, or an
            :class:`~distill_ops.fspad.FSPADDraftHead` built for ``target``; same device and dtype.
        depth, topk, num_nodes: the dynamic (EAGLE-2) tree: ``depth`` draft levels, each expanding the
            ``topk`` best nodes of the previous level into their ``topk`` most likely children; the tree
            keeps the root and the ``num_nodes - 1`` candidates with the highest cumulative draft
            log-probability (``num_nodes <= 256``).
        tree: a static tree instead: EAGLE-style paths of child ranks (``[[0], [1], [0, 0], ...]``; the node
            with rank ``r`` under a parent drafts the parent's ``r``-th most likely token) or a parent array
            (1-D int tensor). ``depth``, ``topk`` and ``num_nodes`` are then unused.
        impl: ``impl`` of the tree attention, verification and compaction ops.
        profile: synchronise the CUDA stream at phase boundaries so that ``timings`` are device times.
    """

    def __init__(
        self,
        target: torch.nn.Module,
        draft: torch.nn.Module,
        *,
        depth: int = 5,
        topk: int = 4,
        num_nodes: int = 32,
        tree: Sequence[Sequence[int]] | torch.Tensor | None = None,
        impl: str = "auto",
        profile: bool = False,
    ):
        from .fspad import FSPADDraftHead

        _check_causal_lm("target", target)
        for name, value, low in (("depth", depth, 1), ("topk", topk, 1), ("num_nodes", num_nodes, 1)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if num_nodes > MAX_TREE_NODES:
            raise ValueError(f"num_nodes must be <= {MAX_TREE_NODES} (the tree ops' limit), got {num_nodes}")
        if 1 + topk * max(depth - 1, 0) > MAX_TREE_NODES:
            raise ValueError(
                f"1 + topk * (depth - 1) draft nodes must be <= {MAX_TREE_NODES}, got topk={topk}, depth={depth}"
            )
        target_param = next(target.parameters())
        vocab = _vocab_size(target)
        if isinstance(draft, FSPADDraftHead):
            if draft.vocab_size != vocab or draft.hidden_size != target.get_output_embeddings().weight.shape[1]:
                raise ValueError(
                    f"draft FSPADDraftHead was built for vocabulary {draft.vocab_size} and hidden size "
                    f"{draft.hidden_size}, but the target has vocabulary {vocab} and hidden size "
                    f"{target.get_output_embeddings().weight.shape[1]}"
                )
            self._drafter = _FSPADDrafter(draft, target, impl)
        else:
            _check_causal_lm("draft", draft)
            if _vocab_size(draft) != vocab:
                raise ValueError(
                    f"draft vocabulary size {_vocab_size(draft)} differs from the target's {vocab}: the draft must "
                    f"share the target's tokenizer and vocabulary"
                )
            self._drafter = _ModelDrafter(draft, impl)
        draft_param = next(draft.parameters())
        if draft_param.device != target_param.device:
            raise ValueError(f"draft is on {draft_param.device} but target is on {target_param.device}")
        if isinstance(draft, FSPADDraftHead) and draft_param.dtype != target_param.dtype:
            raise TypeError(f"draft head has dtype {draft_param.dtype} but the target has {target_param.dtype}")
        self.target = target
        self.draft = draft
        self.depth, self.topk, self.num_nodes = depth, topk, num_nodes
        self.impl = impl
        self.profile = profile
        self.device = target_param.device
        self.vocab_size = vocab
        self._cache_kwarg = _cache_kwarg(target)
        self._keep_last = {"logits_to_keep": 1} if _supports_logits_to_keep(target) else {}
        self._root_tree = tree_spec_from_parents([-1], self.device)
        self._static = self._dynamic = None
        self.max_tree_nodes = max(num_nodes, 1 + topk * (depth - 1))
        if tree is None:
            self._dynamic = _DynamicPlan(topk, depth, num_nodes, vocab, self.device, impl)
        else:
            if isinstance(tree, torch.Tensor):
                check_tensor("tree", tree, dtypes=INT_DTYPES, ndim=1)
                parents = build_tree(tree).parents[0].tolist()
            else:
                parents = tree_from_paths(tree).tolist()
            self._static = _static_plan(parents, self.device)
            self.max_tree_nodes = len(parents)

    # ---------------------------------------------------------------------------------------------

    def generate(
        self,
        input_ids: torch.Tensor,
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        generator: torch.Generator | None = None,
        step_callback: Callable[[torch.Tensor, object], None] | None = None,
    ) -> SpeculativeOutput:
        """Generate up to ``max_new_tokens`` tokens after ``input_ids``.

        Args:
            input_ids: integer ``[1, L]`` (``L >= 1``) prompt on the target's device (batch size 1 only).
            max_new_tokens: >= 1.
            temperature: 0 for greedy decoding (identical to ``target.generate(do_sample=False)``), > 0 to
                sample (the distribution of ``target.generate(do_sample=True, temperature=..., top_k=...,
                top_p=...)``).
            top_k, top_p: filters of the target distribution when sampling (ignored when greedy).
            eos_token_id: token id(s) that end generation (kept in the output); ``None`` uses the target's
                ``generation_config.eos_token_id`` as ``generate`` does.
            generator: the only source of randomness when sampling.
            step_callback: called after the prefill and after each verification step with
                ``(sequences [1, n], cache)``: the committed tokens (the last one is the next root, not yet
                in the cache) and the target's ``DynamicCache``.

        Returns a :class:`SpeculativeOutput`.
        """
        self._check_generate_args(input_ids, max_new_tokens, temperature, top_k, top_p, generator)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        eos = self._eos_ids(eos_token_id)
        sampling = temperature > 0
        models = [self.target] if isinstance(self._drafter, _FSPADDrafter) else [self.target, self.draft]
        timer = _Timer(self.device, self.profile)
        start = time.perf_counter()
        with torch.inference_mode(), _attention_switched(models):
            state = _Generation(self, input_ids.to(self.device), max_new_tokens, eos, sampling, temperature,
                                top_k, top_p, generator, timer, step_callback)
            state.run()
        timings = dict(timer.seconds)
        timings["total"] = time.perf_counter() - start
        return SpeculativeOutput(
            sequences=torch.tensor([state.tokens], dtype=torch.int64, device=self.device),
            num_target_forwards=state.num_target_forwards,
            accept_lengths=state.accept_lengths,
            timings=timings,
            prompt_length=state.prompt_len,
        )

    def _check_generate_args(self, input_ids, max_new_tokens, temperature, top_k, top_p, generator) -> None:
        check_tensor("input_ids", input_ids, dtypes=INT_DTYPES)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape [1, L], got {tuple(input_ids.shape)}")
        if input_ids.shape[0] != 1:
            raise ValueError(
                f"SpeculativeDecoder supports batch size 1 only (each sequence accepts a different number of "
                f"tokens per step); got input_ids of batch size {input_ids.shape[0]}: loop over the sequences"
            )
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids must hold at least one token (empty prompt)")
        if bool(((input_ids < 0) | (input_ids >= self.vocab_size)).any()):
            raise ValueError(f"input_ids must be token ids in [0, {self.vocab_size})")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise TypeError(f"max_new_tokens must be an int, got {type(max_new_tokens).__name__}")
        if max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        check_number("temperature", temperature, low=0.0)
        if temperature > 0:
            if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
                raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
            if top_p is not None:
                check_number("top_p", top_p, low=0.0, high=1.0, low_inclusive=False)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")

    def _eos_ids(self, eos_token_id) -> set[int]:
        if eos_token_id is None:
            eos_token_id = getattr(getattr(self.target, "generation_config", None), "eos_token_id", None)
        if eos_token_id is None:
            return set()
        if isinstance(eos_token_id, torch.Tensor):
            eos_token_id = eos_token_id.flatten().tolist()
        if isinstance(eos_token_id, int):
            eos_token_id = [eos_token_id]
        return {int(token) for token in eos_token_id}


class _Generation:
    """The state of one ``generate`` call (the engine object itself stays stateless between calls)."""

    def __init__(self, engine: SpeculativeDecoder, input_ids, max_new_tokens, eos, sampling, temperature,
                 top_k, top_p, generator, timer, step_callback):
        self.engine = engine
        self.drafter = engine._drafter
        self.prompt = input_ids
        self.tokens: list[int] = input_ids[0].tolist()
        self.prompt_len = len(self.tokens)
        self.max_new_tokens = max_new_tokens
        self.eos = eos
        self.sampling = sampling
        self.sample_args = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        self.timer = timer
        self.step_callback = step_callback
        self.cache = None
        self.num_target_forwards = 0
        self.accept_lengths: list[int] = []
        self.done = False
        self.num_layers = 0

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

    def _verify(self, tree: TreeSpec, draft_tokens: torch.Tensor, logits: torch.Tensor) -> VerifyResult:
        impl = self.engine.impl
        if self.sampling:
            return verify_sampling(tree, draft_tokens, logits, impl=impl, **self.sample_args)
        return verify_greedy(tree, draft_tokens, logits, impl=impl)

    def _emit(self, new_tokens: list[int]) -> list[int]:
        """Append generated tokens, truncated at the first EOS and at ``max_new_tokens`` like ``generate``."""
        budget = self.max_new_tokens - (len(self.tokens) - self.prompt_len)
        emitted = []
        for token in new_tokens[:budget]:
            emitted.append(token)
            if token in self.eos:
                self.done = True
                break
        self.tokens.extend(emitted)
        if len(self.tokens) - self.prompt_len >= self.max_new_tokens:
            self.done = True
        return emitted

    # -- the loop --------------------------------------------------------------------------------

    def run(self) -> None:
        engine, timer = self.engine, self.timer
        with timer("prefill"):
            self.cache = _full_cache("target", engine.target)
            context = TreeAttentionContext(impl=engine.impl)
            positions = torch.arange(self.prompt_len, device=engine.device)[None]
            logits, features = self._target_forward(self.prompt, positions, context, **engine._keep_last)
            # Longest sequence either model's cache may hold: the output plus a draft tree beyond it.
            max_length = self.prompt_len + self.max_new_tokens + engine.max_tree_nodes
            self.num_layers = len(self.cache.layers)
            # The first token: a one-node tree, so that greedy / sampling follow the verifier's exact rules.
            root = self.prompt[:, -1:]
            result = self._verify(engine._root_tree, root, logits[:, -1:].float())
            first = result.next_tokens
            self._emit([int(first)])
            if self.step_callback is not None:
                self.step_callback(torch.tensor([self.tokens], device=engine.device), self.cache)
            if self.done:
                return
            root_logits, root_state = self.drafter.start(self.prompt, first, features, max_length)
        device = engine.device
        while not self.done:
            root_pos = len(self.tokens) - 1  # the root (last committed token) is not in the caches yet
            with timer("draft"):
                tree, draft_tokens, positions = self._draft(root_logits, root_state, root_pos)
                self.drafter.rollback()
            with timer("target"):
                context = TreeAttentionContext(tree, engine.impl)
                logits, features = self._target_forward(draft_tokens, positions, context)
            with timer("verify"):
                result = self._verify(tree, draft_tokens, logits)
                # The step's device-to-host read: accepted drafts then the bonus token, -1 padded.
                new_tokens = [token for token in result.emitted_tokens[0].tolist() if token >= 0]
                accept_len = len(new_tokens) - 1
            with timer("compaction"):
                # The prefix lengths the target's tree attention used (root_pos; created once per forward).
                self._compact(result, context.cache_lens(1, root_pos, device), root_pos, accept_len)
            self.accept_lengths.append(accept_len)
            self._emit(new_tokens)
            if self.done and self.cache.get_seq_length() > len(self.tokens) - 1:
                # Drafts accepted past an EOS / the token budget were cut: keep the cache consistent.
                self.cache.crop(len(self.tokens) - 1 - self.cache.get_seq_length())
            if self.step_callback is not None:
                self.step_callback(torch.tensor([self.tokens], device=device), self.cache)
            if self.done:
                break
            with timer("draft"):
                path_features = None
                if features is not None:
                    path_features = features[:, result.accepted_nodes[0, :accept_len + 1]]
                count = accept_len + 1
                advance = int64_to_device(new_tokens + list(range(root_pos + 1, root_pos + count + 1)), device)
                advance_tokens, advance_positions = advance.view(2, 1, count).unbind(0)
                root_logits, root_state = self.drafter.advance(advance_tokens, advance_positions, path_features)

    def _compact(self, result: VerifyResult, cache_lens: torch.Tensor, prefix_len: int, accept_len: int) -> None:
        """Move the accepted rows after the prefix in every layer (in place, one call for all layers), then
        crop the rest."""
        layers = self.cache.layers
        compact_kv_cache([layer.keys for layer in layers], [layer.values for layer in layers], cache_lens, result,
                         impl=self.engine.impl)
        kept = prefix_len + accept_len + 1
        self.cache.crop(kept - self.cache.get_seq_length())

    # -- drafting --------------------------------------------------------------------------------

    def _draft(self, root_logits, root_state, root_pos) -> tuple[TreeSpec, torch.Tensor, torch.Tensor]:
        """This step's tree, its tokens ``[1, T]`` (node 0: the root) and position ids ``[1, T]``."""
        if self.engine._static is not None:
            return self._draft_static(root_logits, root_state, root_pos)
        return self._draft_dynamic(root_logits, root_state, root_pos)

    def _draft_static(self, root_logits, root_state, root_pos):
        """Fill the static tree's tokens level by level; no host synchronisation."""
        plan: _StaticPlan = self.engine._static
        device = self.engine.device
        tokens = torch.empty(plan.tree.num_nodes, dtype=torch.int64, device=device)
        tokens[0].fill_(self.tokens[-1])  # the root, known on the host
        positions = plan.tree.depth + root_pos
        if plan.num_children_max == 0:
            return plan.tree, tokens[None], positions
        top = torch.topk(root_logits, plan.num_children_max).indices
        tokens[plan.root_child_nodes] = top[plan.root_child_ranks]
        states = None if root_state is None else root_state[None]
        for level, (eval_nodes, draft_tree, parent_rows, child_nodes, child_rows, child_ranks) in enumerate(
            plan.levels, start=1
        ):
            parent_states = None if states is None else states[parent_rows]
            level_positions = torch.full((eval_nodes.shape[0],), root_pos + level, dtype=torch.int64, device=device)
            logits, new_states = self.drafter.expand(tokens[eval_nodes], parent_states, level_positions, draft_tree)
            top = torch.topk(logits, plan.num_children_max, dim=-1).indices
            tokens[child_nodes] = top[child_rows, child_ranks]
            if states is not None:
                states = torch.cat([states, new_states])
        return plan.tree, tokens[None], positions

    def _draft_dynamic(self, root_logits, root_state, root_pos):
        """EAGLE-2 on the device (:class:`_DynamicPlan`): no host read, no host-to-device copy."""
        tree, tokens = self.engine._dynamic.draft(self.drafter, root_logits, root_state, self.tokens[-1], root_pos,
                                                  self.timer)
        return tree, tokens[None], tree.depth + root_pos
