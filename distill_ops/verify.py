"""Draft-tree verification for speculative decoding, and KV-cache compaction after it.

``draft_tokens[b, i]`` is the token of tree node ``i`` (``draft_tokens[:, 0]`` the root, already
decided); ``target_logits[b, i]`` is the target model's prediction for the token *after* node ``i``.

* Greedy: accept the deepest node whose whole root path matches the target argmax (EAGLE's "longest
  matching path"; with distinct sibling tokens this is exactly "follow the child whose token is the
  argmax, stop when none is"; ties between equally deep paths go to the smaller node index). The bonus
  token is the argmax at the last accepted node.
* Sampling, lossless: target distribution ``p = softmax(logits / temperature)`` after top-k then top-p.
  From the root, the children of the current node are tried in node-index order. Without
  ``draft_probs`` the drafts are deterministic: child ``x`` is accepted with the residual probability
  ``r(x)``, otherwise ``x`` is zeroed in the residual and it is renormalised. With ``draft_probs`` (the
  children of node ``i`` drawn i.i.d. from ``draft_probs[:, i]``) SpecInfer's multi-round rejection:
  accept with ``min(1, r(x) / q(x))``, otherwise ``r <- normalise(max(r - q, 0))``. ``q`` is the draft row
  divided by its sum, as ``torch.multinomial`` draws from it: a 16-bit row (which misses 1 by its rounding) or a
  truncated, unnormalised one (top-k draft weights) is verified against the distribution it was sampled from.
  When no child is accepted the bonus token is drawn from the residual (inverse CDF). Randomness:
  ``uniforms[b, j]`` decides child ``j`` and ``uniforms[b, 0]`` the bonus token, all drawn up front with
  ``torch.rand(generator=...)``, so one generator state gives the same result on every impl.
* Top-k keeps the tokens whose logit is >= the k-th largest; top-p then keeps the smallest
  descending-probability prefix whose mass reaches ``top_p`` (ties at either cut are kept). The torch
  impl computes the cut with PyTorch ops (:func:`filter_thresholds`, a sort over V); the Triton impl's
  statistics kernel finds the same cut per row by a search over the fp32 key space (15 pivots per pass over
  the row, counting for top-k, summing mass for top-p: at most 9 passes each; no sort, no extra launch).
  The two can differ only where a descending-order mass lies within fp32 rounding of ``top_p`` (sums in
  different orders).
* NaN in ``target_logits`` reads as ``-inf`` on every impl: that token is never the argmax and has
  probability 0 (a row of NaN is then a row of ``-inf``; ``torch.argmax`` alone would rank NaN first).

KV compaction (:func:`compact_kv_cache`) takes one layer's K/V or lists with every layer's: a model's
whole cache is compacted by one Triton launch (the layers' addresses travel in an int64 table, one
non-blocking copy), which also writes the new cache lengths; value checks of the inputs run only on CPU
tensors (on a GPU they would synchronise).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ._utils import (
    Impl,
    FLOAT_DTYPES, INT_DTYPES, check_int, check_number, check_same_device, check_tensor, check_token_ids,
    check_written_in_place, host_readable, resolve_impl, row_chunk, to_device_async,
)
from .tree import TreeSpec, check_tree_spec, int64_to_device

# The smallest temperature verify_sampling takes: logits / T must stay finite in fp32 (|logit| up to 1e4 gives
# 1e10 here; at T ~ 1e-39, 1 / T alone overflows).
MIN_SAMPLING_TEMPERATURE = 1e-6


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of verifying one draft tree per sequence (all int64, on the logits' device).

    Attributes:
        accepted_nodes: ``[B, max_depth + 1]`` accepted node indices, root first, ``-1`` padded.
        accept_len: ``[B]`` accepted draft tokens (root excluded).
        next_tokens: ``[B]`` the bonus token chosen at the last accepted node.
        emitted_tokens: ``[B, max_depth + 1]`` accepted draft tokens then the bonus token, ``-1`` padded.
    """

    accepted_nodes: torch.Tensor
    accept_len: torch.Tensor
    next_tokens: torch.Tensor
    emitted_tokens: torch.Tensor


def _check_verify_inputs(tree: object, draft_tokens: object, target_logits: object) -> tuple[int, int, int]:
    check_tree_spec(tree)
    check_tensor("draft_tokens", draft_tokens, dtypes=INT_DTYPES, ndim=2)
    check_tensor("target_logits", target_logits, dtypes=FLOAT_DTYPES, ndim=3)
    check_same_device(target_logits=target_logits, draft_tokens=draft_tokens, tree=tree.parents)
    batch, num_nodes, vocab = target_logits.shape
    if draft_tokens.shape != (batch, num_nodes):
        raise ValueError(
            f"draft_tokens must have shape [B, T] = {[batch, num_nodes]} (target_logits' leading dims), "
            f"got {tuple(draft_tokens.shape)}"
        )
    if tree.num_nodes != num_nodes:
        raise ValueError(f"tree has {tree.num_nodes} nodes but target_logits has T={num_nodes}")
    if tree.batch_size not in (1, batch):
        raise ValueError(f"tree must hold 1 or B={batch} trees, got {tree.batch_size}")
    if vocab < 1:
        raise ValueError(f"target_logits must have a non-empty vocabulary dim, got shape {tuple(target_logits.shape)}")
    # On a GPU and under torch.compile the kernels treat an out-of-range token as one the target gives
    # probability 0 (never accepted).
    check_token_ids("draft_tokens", draft_tokens, vocab, vocab_name="V")
    return batch, num_nodes, vocab


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def _contiguous(tensor: torch.Tensor) -> torch.Tensor:
    """The kernels index tree tensors as contiguous ``[Bt, T(, W)]`` (one batch stride for parents and depth);
    a :class:`TreeSpec` may hold views (e.g. parents sliced from a wider buffer)."""
    return tensor if tensor.is_contiguous() else tensor.contiguous()


def _int64_rows(tensor: torch.Tensor) -> torch.Tensor:
    """int64 and contiguous, without a dispatcher call when it already is (the engine's case)."""
    if tensor.dtype == torch.int64 and tensor.is_contiguous():
        return tensor
    return tensor.to(torch.int64).contiguous()


def _empty_result(batch: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.full((batch, width + 1), -1, dtype=torch.int64, device=device),
            torch.full((batch, width + 1), -1, dtype=torch.int64, device=device))


# The Triton paths as custom ops, so that torch.compile(fullgraph=True) treats each as one opaque call
# (dynamo cannot trace the launches: the greedy path computes its grid from the vocabulary, the compaction
# reads the layers' addresses). Eager calls skip the dispatcher and launch directly: the speculative
# engine calls these once per step, and the custom-op dispatch would add host time to every step.
@torch.library.custom_op("distill_ops::verify_greedy", mutates_args=())
def _verify_greedy_op(
    parents: torch.Tensor, depth: torch.Tensor, ancestor_mask: torch.Tensor, draft_tokens: torch.Tensor,
    target_logits: torch.Tensor, out_width: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from .kernels.tree_verify import verify_greedy_forward

    return verify_greedy_forward(parents, depth, ancestor_mask, draft_tokens, target_logits, out_width)


@torch.library.custom_op("distill_ops::verify_sampling", mutates_args=())
def _verify_sampling_op(
    parents: torch.Tensor, draft_tokens: torch.Tensor, target_logits: torch.Tensor, top_k: int | None,
    top_p: float | None, draft_probs: torch.Tensor | None, uniforms: torch.Tensor, temperature: float,
    out_width: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from .kernels.tree_verify import verify_sampling_forward

    return verify_sampling_forward(
        parents, draft_tokens, target_logits, top_k, top_p, draft_probs, uniforms, temperature, out_width
    )


def _fake_result(draft_tokens: torch.Tensor, out_width: int) -> tuple[torch.Tensor, ...]:
    batch = draft_tokens.shape[0]
    table = draft_tokens.new_empty((batch, out_width), dtype=torch.int64)
    lengths = draft_tokens.new_empty((batch,), dtype=torch.int64)
    return table, lengths, torch.empty_like(lengths), torch.empty_like(table)


@_verify_greedy_op.register_fake
def _(parents, depth, ancestor_mask, draft_tokens, target_logits, out_width):
    return _fake_result(draft_tokens, out_width)


@_verify_sampling_op.register_fake
def _(parents, draft_tokens, target_logits, top_k, top_p, draft_probs, uniforms, temperature, out_width):
    return _fake_result(draft_tokens, out_width)


@torch.library.custom_op("distill_ops::compact_kv_cache", mutates_args=("keys", "values"))
def _compact_kv_op(
    keys: list[torch.Tensor], values: list[torch.Tensor], accepted: torch.Tensor, cache_lens: torch.Tensor
) -> torch.Tensor:
    return _compact_kv_triton(keys, values, accepted, cache_lens)


@_compact_kv_op.register_fake
def _(keys, values, accepted, cache_lens):
    return torch.empty_like(cache_lens)


def _launch(op, direct, *args):
    """``op(*args)`` (the custom op) while torch.compile traces, ``direct(*args)`` otherwise."""
    return op(*args) if torch.compiler.is_compiling() else direct(*args)


def nan_as_neg_inf(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` with NaN read as ``-inf`` (the Triton kernels' rule: their comparisons exclude NaN)."""
    return torch.where(torch.isnan(logits), float("-inf"), logits)


def verify_greedy_ref(tree: TreeSpec, draft_tokens: torch.Tensor, target_logits: torch.Tensor) -> VerifyResult:
    """PyTorch greedy verification (the CPU path and the reference); device-side, no host sync."""
    batch, num_nodes, _ = target_logits.shape
    device = target_logits.device
    argmax = nan_as_neg_inf(target_logits).argmax(-1)
    parents = tree.parents.expand(batch, -1)
    depth = tree.depth.expand(batch, -1)
    nodes = torch.arange(num_nodes, device=device)
    match = draft_tokens.to(torch.int64) == argmax.gather(1, parents.clamp_min(0))
    match = match | (nodes == 0)
    ancestors = tree.dense_ancestors().expand(batch, -1, -1)
    on_path = ~(ancestors & ~match[:, None, :]).any(-1)
    key = torch.where(on_path, depth * num_nodes + (num_nodes - 1 - nodes), -1)
    best = key.amax(-1)
    final = num_nodes - 1 - best % num_nodes
    final_depth = best // num_nodes
    return _finish(tree, draft_tokens, ancestors, depth, final, final_depth, argmax.gather(1, final[:, None])[:, 0])


def _finish(tree, draft_tokens, ancestors, depth, final, final_depth, bonus) -> VerifyResult:
    """Result tensors from the final node of each sequence (path = the final node's ancestors)."""
    batch, num_nodes = draft_tokens.shape
    width = tree.max_depth + 1
    nodes = torch.arange(num_nodes, device=draft_tokens.device).expand(batch, -1)
    in_path = ancestors.gather(1, final[:, None, None].expand(-1, 1, num_nodes))[:, 0]
    accepted, emitted = _empty_result(batch, width, draft_tokens.device)
    # Column `width` is a dump slot for the nodes off the path.
    accepted.scatter_(1, torch.where(in_path, depth, width), nodes)
    emitted.scatter_(1, torch.where(in_path & (nodes > 0), depth - 1, width), draft_tokens.to(torch.int64))
    emitted.scatter_(1, final_depth[:, None], bonus[:, None].to(torch.int64))
    return VerifyResult(accepted[:, :width], final_depth.to(torch.int64), bonus.to(torch.int64), emitted[:, :width])


def verify_greedy(
    tree: TreeSpec, draft_tokens: torch.Tensor, target_logits: torch.Tensor, *, impl: Impl = "auto"
) -> VerifyResult:
    """Greedy verification of one draft tree per sequence.

    Args:
        tree: :class:`TreeSpec` of ``T`` nodes (1 shared tree or ``B`` trees) on the logits' device.
        draft_tokens: integer ``[B, T]`` token of each node (column 0: the root).
        target_logits: ``[B, T, V]`` fp32 / fp16 / bf16; row ``i`` predicts the token after node ``i``.
        impl: ``"auto"`` | ``"triton"`` | ``"torch"``.

    Returns a :class:`VerifyResult`. No host synchronisation; the logits never leave the device.
    """
    batch, num_nodes, _ = _check_verify_inputs(tree, draft_tokens, target_logits)
    if resolve_impl(impl, target_logits.device) == "torch":
        return verify_greedy_ref(tree, draft_tokens, target_logits)
    from .kernels.tree_verify import verify_greedy_forward

    return VerifyResult(*_launch(
        _verify_greedy_op, verify_greedy_forward, _contiguous(tree.parents), _contiguous(tree.depth),
        _contiguous(tree.ancestor_mask), _int64_rows(draft_tokens), _rows(target_logits), tree.max_depth + 1,
    ))


def active_filters(vocab: int, top_k: int | None, top_p: float | None) -> tuple[int | None, float | None]:
    """``(top_k, top_p)`` with ``None`` for a filter that keeps everything (``top_k >= V``, ``top_p == 1``)."""
    return (top_k if top_k is not None and top_k < vocab else None,
            top_p if top_p is not None and top_p < 1.0 else None)


def filter_thresholds(
    target_logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None
) -> torch.Tensor | None:
    """Per-node raw-logit cut ``[B, T]`` (fp32) of top-k then top-p: a token is kept iff its logit is >=
    the cut. ``None`` when nothing is filtered. PyTorch ops on the device (a sort over V for top-p), one
    chunk of rows at a time to bound memory; no host synchronisation."""
    vocab = target_logits.shape[-1]
    top_k, top_p = active_filters(vocab, top_k, top_p)
    if top_k is None and top_p is None:
        return None
    rows = target_logits.reshape(-1, vocab)
    cuts = []
    # Row chunks bound the sort's temporaries (values + int64 indices) to a few million elements.
    for start in range(0, rows.shape[0], row_chunk(rows.shape[0], vocab)):
        logits = nan_as_neg_inf(rows[start : start + row_chunk(rows.shape[0], vocab)].float())
        cut = torch.full(logits.shape[:-1], float("-inf"), device=logits.device)
        if top_k is not None:
            cut = torch.topk(logits, top_k, dim=-1).values[..., -1]
        if top_p is not None:
            values = torch.sort(logits, dim=-1, descending=True).values
            scaled = torch.where(values >= cut[..., None], values / temperature, float("-inf"))
            probs = torch.softmax(scaled, dim=-1)
            mass_before = torch.cumsum(probs, dim=-1) - probs
            last_kept = ((mass_before < top_p) & (probs > 0)).sum(-1, keepdim=True).clamp_min(1) - 1
            cut = torch.maximum(cut, values.gather(-1, last_kept)[..., 0])
        cuts.append(cut)
    return torch.cat(cuts).view(target_logits.shape[:-1])


def verify_sampling_ref(
    tree: TreeSpec,
    draft_tokens: torch.Tensor,
    target_logits: torch.Tensor,
    thresholds: torch.Tensor | None,
    draft_probs: torch.Tensor | None,
    uniforms: torch.Tensor,
    temperature: float,
) -> VerifyResult:
    """PyTorch lossless sampling verification with explicit uniforms ``[B, T]`` (see the module doc).

    Materialises the fp32 probabilities ``[B, T, V]``; device-side, no host sync."""
    batch, num_nodes, vocab = target_logits.shape
    device = target_logits.device
    logits = nan_as_neg_inf(target_logits.float())
    kept = torch.ones_like(logits, dtype=torch.bool) if thresholds is None else logits >= thresholds[..., None]
    scaled = torch.where(kept, logits * (1.0 / temperature), float("-inf"))
    # One fused softmax, not exp of the shifted row, its sum and a division (the same values to ~3e-8): on a 2-core
    # CPU those took 6.9 ms against 1.2 ms at 32 x 128256 after top-k 50 (exp's slow path at the -inf entries), 2.8
    # without; the whole call 23.5 -> 17.4 ms (benchmarks/results/cpu-2026-12-07-fallbacks/verify-sampling).
    probs = torch.softmax(scaled, dim=-1)
    argmax = scaled.argmax(-1)
    parents = tree.parents.expand(batch, -1)
    tokens = draft_tokens.to(torch.int64)
    rows = torch.arange(batch, device=device)
    nodes = torch.arange(num_nodes, device=device)

    if draft_probs is not None:
        q_all = draft_probs.float()
        # Each row normalised as torch.multinomial does; an all-zero row (a leaf's, never drawn from) stays zero.
        q_sum = q_all.sum(-1, keepdim=True)
        q_all = q_all * torch.where(q_sum > 0, 1.0 / q_sum, 0.0)
        round_c = [torch.zeros(batch, num_nodes, device=device)]
        round_n = [torch.ones(batch, num_nodes, device=device)]
        for _ in range(tree.max_children):
            round_c.append(round_c[-1] + round_n[-1])
            round_n.append(torch.relu(probs - round_c[-1][..., None] * q_all).sum(-1))
        round_c, round_n = torch.stack(round_c, -1), torch.stack(round_n, -1)

    cur = torch.zeros(batch, dtype=torch.int64, device=device)
    depth = torch.zeros_like(cur)
    rnd = torch.zeros_like(cur)
    det_mass = torch.ones(batch, device=device)
    excluded = torch.zeros(batch, num_nodes, dtype=torch.bool, device=device)
    for j in range(1, num_nodes):
        token = tokens[:, j]
        is_child = parents[:, j] == cur
        p = probs[rows, cur, token.clamp(0, vocab - 1)]
        u = uniforms[:, j]
        if draft_probs is not None:
            q = q_all[rows, cur, token.clamp(0, vocab - 1)]
            c = round_c[rows, cur, rnd]
            mass = round_n[rows, cur, rnd]
            accept = is_child & (u * q * mass < torch.clamp_min(p - c * q, 0.0))
            rnd = torch.where(accept, 0, torch.where(is_child, rnd + 1, rnd))
        else:
            dup = ((parents == cur[:, None]) & (nodes < j) & (tokens == token[:, None])).any(-1)
            resid = torch.where(dup, 0.0, p)
            accept = is_child & (u * det_mass < resid)
            reject = is_child & ~accept
            det_mass = torch.where(accept, 1.0, torch.where(reject, torch.clamp_min(det_mass - resid, 0.0), det_mass))
            excluded = torch.where(accept[:, None], False, excluded | ((reject & ~dup)[:, None] & (nodes == j)))
        cur = torch.where(accept, j, cur)
        depth = depth + accept.long()

    residual = probs[rows, cur]
    if draft_probs is not None:
        residual = torch.relu(residual - round_c[rows, cur, rnd][:, None] * q_all[rows, cur])
        total = round_n[rows, cur, rnd]
    else:
        dump = torch.full_like(tokens, vocab)
        residual = torch.cat([residual, residual.new_zeros(batch, 1)], 1)
        residual = residual.scatter(1, torch.where(excluded, tokens.clamp(0, vocab - 1), dump), 0.0)[:, :vocab]
        total = det_mass
    cdf = torch.cumsum(residual, -1)
    hit = (cdf > (uniforms[:, 0] * total)[:, None]) & (residual > 0)
    positive = residual > 0
    last_positive = vocab - 1 - positive.flip(-1).int().argmax(-1)
    bonus = torch.where(hit.any(-1), hit.int().argmax(-1), last_positive)
    bonus = torch.where(positive.any(-1), bonus, argmax[rows, cur])
    ancestors = tree.dense_ancestors().expand(batch, -1, -1)
    return _finish(tree, draft_tokens, ancestors, tree.depth.expand(batch, -1), cur, depth, bonus)


def draw_uniforms(batch: int, num_nodes: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """fp32 ``[B, T]`` uniforms in [0, 1) from ``generator`` (drawn on the generator's device), moved to
    ``device`` (from a CPU generator to a GPU without a host synchronisation). Column ``j > 0`` decides child
    ``j``, column 0 the bonus token."""
    source = generator.device if generator is not None else device
    uniforms = torch.rand((batch, num_nodes), generator=generator, device=source, dtype=torch.float32)
    return to_device_async(uniforms, torch.device(device))


def verify_sampling(
    tree: TreeSpec,
    draft_tokens: torch.Tensor,
    target_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    draft_probs: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    impl: Impl = "auto",
) -> VerifyResult:
    """Lossless speculative-sampling verification of one draft tree per sequence.

    Args:
        tree, draft_tokens, target_logits: as in :func:`verify_greedy`.
        temperature: >= ``MIN_SAMPLING_TEMPERATURE`` (1e-6): below it fp32 logits / temperature can overflow to
            inf and the probabilities turn NaN (use :func:`verify_greedy` for greedy decoding, temperature 0);
            top_k: int >= 1 or None; top_p: in (0, 1] or None (applied after top-k).
        draft_probs: ``[B, T, V]`` float draft distributions (children of node ``i`` sampled i.i.d. from
            ``draft_probs[:, i]``), or None for deterministic (top-k) drafts. Non-negative weights: each row
            of a node with children is normalised by its sum (as ``torch.multinomial`` samples), in fp32.
        generator: the only source of randomness (``torch.rand`` on its device; default generator of the
            logits' device when None).
        impl: ``"auto"`` | ``"triton"`` | ``"torch"``.

    Returns a :class:`VerifyResult` whose emitted tokens are distributed exactly as autoregressive
    sampling from the (filtered, tempered) target. No host synchronisation.
    """
    batch, num_nodes, vocab = _check_verify_inputs(tree, draft_tokens, target_logits)
    temperature = check_number("temperature", temperature, low=MIN_SAMPLING_TEMPERATURE)
    top_k = check_int("top_k", top_k, low=1, optional=True)
    if top_p is not None:
        top_p = check_number("top_p", top_p, low=0.0, high=1.0, low_inclusive=False)
    if draft_probs is not None:
        check_tensor("draft_probs", draft_probs, dtypes=FLOAT_DTYPES, ndim=3)
        if draft_probs.shape != target_logits.shape:
            raise ValueError(
                f"draft_probs must have the shape of target_logits {tuple(target_logits.shape)}, "
                f"got {tuple(draft_probs.shape)}"
            )
        check_same_device(target_logits=target_logits, draft_probs=draft_probs)
        # Read only where it costs no synchronisation: a negative, NaN or infinite weight made the acceptance
        # test p - c * q meaningless (drafts accepted or rejected silently, on both impls).
        if host_readable(draft_probs):
            invalid = ~((draft_probs >= 0) & (draft_probs < float("inf")))
            if bool(invalid.any()):
                b, node, token = (int(i) for i in invalid.nonzero()[0])
                raise ValueError(
                    f"draft_probs must be finite and >= 0 (the draft's probabilities, or unnormalised weights), got "
                    f"{float(draft_probs[b, node, token])} at [{b}, {node}, {token}]"
                )
            # Each drafted token was sampled from its parent's row, so it has probability there: a 0 (or a row of
            # zeros at a node with children) made the acceptance test p - c q > u q n read p > 0, every such draft
            # was accepted and the result was no longer the target's distribution (a review, 2026-12-07). Tokens
            # out of [0, V) have target probability 0 and are never accepted.
            parents = tree.parents.expand(batch, -1).to(torch.int64)
            tokens = draft_tokens.to(torch.int64)
            drafted = (parents >= 0) & (tokens >= 0) & (tokens < vocab)
            batch_rows = torch.arange(batch, device=draft_probs.device).unsqueeze(-1)
            q_drafted = draft_probs[batch_rows, parents.clamp_min(0), tokens.clamp(0, vocab - 1)]
            impossible = drafted & (q_drafted == 0)
            if bool(impossible.any()):
                b, node = (int(i) for i in impossible.nonzero()[0])
                parent, token = int(parents[b, node]), int(tokens[b, node])
                raise ValueError(
                    f"draft_probs must give each drafted token a probability > 0 in its parent's row (the row it was "
                    f"sampled from), got draft_probs[{b}, {parent}, {token}] = 0 for node {node}"
                )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    backend = resolve_impl(impl, target_logits.device)
    uniforms = draw_uniforms(batch, num_nodes, target_logits.device, generator)
    if backend == "torch":
        thresholds = filter_thresholds(target_logits, temperature, top_k, top_p)
        return verify_sampling_ref(tree, draft_tokens, target_logits, thresholds, draft_probs, uniforms, temperature)
    from .kernels.tree_verify import verify_sampling_forward

    # The stats kernel finds each row's top-k / top-p cut itself (a pivot search over the keys, no sort).
    return VerifyResult(*_launch(
        _verify_sampling_op, verify_sampling_forward, _contiguous(tree.parents), _int64_rows(draft_tokens),
        _rows(target_logits),
        *active_filters(vocab, top_k, top_p),
        None if draft_probs is None else _rows(draft_probs), uniforms, temperature, tree.max_depth + 1,
    ))


def _layer_list(name: str, tensors: object) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    if isinstance(tensors, (list, tuple)) and tensors:
        return list(tensors)
    raise TypeError(
        f"{name} must be a torch.Tensor or a non-empty list of tensors (one per layer), got {tensors!r:.80}"
    )


def _distinct_caches(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` less repeats of one view (same address, shape and strides: ``v`` that is ``k``, or a layer list
    that holds a tensor shared across layers), in order: a repeat would be compacted twice, moving rows already
    moved (disjoint views of one buffer, such as ``kv[0]`` / ``kv[1]``, are distinct).

    Under ``torch.compile`` a repeat is the same tensor object: Dynamo cannot hash data pointers (torch 2.11
    refuses, 2.13 hashes each ``data_ptr()`` call apart, so nothing was found twice) and traces ``is`` only."""
    if torch.compiler.is_compiling():
        distinct = []
        for tensor in tensors:
            if not any(tensor is other for other in distinct):
                distinct.append(tensor)
        return distinct
    seen, distinct = set(), []
    for tensor in tensors:
        # A dim of size 1 is never stepped over, so its stride does not matter (a view may give it any value).
        strides = tuple(stride if size > 1 else 0 for size, stride in zip(tensor.shape, tensor.stride()))
        key = (tensor.data_ptr(), tuple(tensor.shape), strides)
        if key not in seen:
            seen.add(key)
            distinct.append(tensor)
    return distinct


def compact_kv_cache_ref(
    k: torch.Tensor | Sequence[torch.Tensor],
    v: torch.Tensor | Sequence[torch.Tensor],
    cache_lens: torch.Tensor,
    accepted: torch.Tensor,
) -> None:
    """PyTorch in-place compaction: gather the accepted rows, then scatter them to their new slots (the
    indices are built once and shared by every layer when ``k`` / ``v`` are per-layer lists; a tensor given
    more than once is compacted once)."""
    keys, values = _layer_list("k", k), _layer_list("v", v)
    batch, num_heads, _, head_dim = keys[0].shape
    width = accepted.shape[1]
    slots = torch.arange(width, device=keys[0].device)
    start = cache_lens.to(torch.int64)[:, None]
    source = start + torch.where(accepted >= 0, accepted, slots)  # padding slots copy onto themselves
    dest = (start + slots)[:, None, :, None].expand(batch, num_heads, width, head_dim)
    source = source[:, None, :, None].expand(batch, num_heads, width, head_dim)
    for cache in _distinct_caches((*keys, *values)):
        cache.scatter_(2, dest, cache.gather(2, source))


def compact_kv_cache(
    k: torch.Tensor | Sequence[torch.Tensor],
    v: torch.Tensor | Sequence[torch.Tensor],
    cache_lens: torch.Tensor,
    result: VerifyResult,
    *,
    impl: Impl = "auto",
) -> torch.Tensor:
    """Move the accepted nodes' K/V rows in place to positions ``cache_lens[b] + 0 .. accept_len[b]``.

    Args:
        k, v: ``[B, H, S, D]`` KV cache holding the prefix then the tree nodes (as for tree attention), or
            lists with one such tensor per layer (same shape, dtype and device): a whole model's cache in
            one call, one kernel launch on the Triton path when the layers also share strides (as the
            layers of a transformers ``DynamicCache`` do; otherwise one launch per set of strides). A tensor
            given more than once (``v`` that is ``k``, a layer sharing another's cache) is compacted once.
        cache_lens: integer ``[B]`` prefix lengths before the tree (every layer has the same prefix).
        result: the :class:`VerifyResult` of this step.
        impl: ``"auto"`` | ``"triton"`` | ``"torch"``.

    Returns the new cache lengths ``cache_lens + accept_len + 1`` (the root and the accepted drafts;
    the bonus token is not in the cache yet, and the drafts are counted from ``result.accepted_nodes``, the rows
    moved), in ``cache_lens``' dtype. No host synchronisation: with
    several layers the Triton path passes their addresses in an int64 table (one non-blocking copy).
    """
    keys, values = _layer_list("k", k), _layer_list("v", v)
    if len(keys) != len(values):
        raise ValueError(f"k and v must list the same number of layers, got {len(keys)} and {len(values)}")
    per_layer = len(keys) > 1 or not isinstance(k, torch.Tensor)
    for index, (layer_k, layer_v) in enumerate(zip(keys, values)):
        suffix = f"[{index}]" if per_layer else ""
        check_tensor(f"k{suffix}", layer_k, dtypes=FLOAT_DTYPES, ndim=4)
        check_tensor(f"v{suffix}", layer_v, dtypes=FLOAT_DTYPES, ndim=4)
        mismatch = layer_k.shape != keys[0].shape or layer_v.shape != keys[0].shape
        if mismatch or layer_k.dtype != keys[0].dtype or layer_v.dtype != keys[0].dtype:
            raise (ValueError if mismatch else TypeError)(
                f"k{suffix} and v{suffix} must match k{'[0]' if per_layer else ''}'s shape {tuple(keys[0].shape)} and "
                f"dtype {keys[0].dtype}, got {tuple(layer_k.shape)} {layer_k.dtype} and {tuple(layer_v.shape)} "
                f"{layer_v.dtype}"
            )
        if index:
            check_same_device(**{"k[0]": keys[0], f"k{suffix}": layer_k, f"v{suffix}": layer_v})
        for name, tensor in ((f"k{suffix}", layer_k), (f"v{suffix}", layer_v)):
            # An expand()ed cache: moving one sequence's rows moved the others' (the Triton path did so silently,
            # the PyTorch path failed inside); one requiring grad was moved outside autograd.
            check_written_in_place(name, tensor, " is compacted in place and")
    check_tensor("cache_lens", cache_lens, dtypes=INT_DTYPES, ndim=1)
    if not isinstance(result, VerifyResult):
        raise TypeError(f"result must be a VerifyResult, got {type(result).__name__}")
    # A hand-built result: float nodes failed inside gather() on the PyTorch path and passed on the Triton one.
    check_tensor("result.accepted_nodes", result.accepted_nodes, dtypes=INT_DTYPES, ndim=2)
    device = check_same_device(k=keys[0], v=values[0], cache_lens=cache_lens, accepted_nodes=result.accepted_nodes)
    batch, _, kv_len, _ = keys[0].shape
    accepted = result.accepted_nodes
    if cache_lens.shape[0] != batch or accepted.dim() != 2 or accepted.shape[0] != batch:
        raise ValueError(
            f"cache_lens [B] and result.accepted_nodes [B, W] must match k's batch B={batch}, got "
            f"{tuple(cache_lens.shape)} and {tuple(accepted.shape)}"
        )
    if host_readable(cache_lens) and bool((cache_lens < 0).any()):
        raise ValueError(f"cache_lens must be >= 0, got {cache_lens.tolist()}")
    if host_readable(cache_lens) and bool((cache_lens.to(torch.int64) + accepted.shape[1] > kv_len).any()):
        raise ValueError(f"cache_lens + W must be <= S={kv_len} (W = result.accepted_nodes.shape[1] = "
                         f"{accepted.shape[1]}), got max(cache_lens)={int(cache_lens.max())}")
    if host_readable(accepted) and bool((cache_lens.to(torch.int64)[:, None] + accepted >= kv_len).any()):
        # An accepted node's row past S: the cache does not hold the whole tree (the kernel would skip the row).
        raise ValueError(
            f"k and v must hold every accepted tree node at cache_lens + node < S={kv_len}, got cache_lens "
            f"{cache_lens.tolist()} and accepted nodes {accepted.tolist()}"
        )
    if resolve_impl(impl, device) == "torch":
        compact_kv_cache_ref(keys, values, cache_lens, accepted)
        # Counted from the nodes moved, as the kernel counts them: a hand-built result's accept_len (another shape,
        # which broadcast, a float, another device, or a count that disagrees with its nodes) gave other lengths.
        return cache_lens + (accepted[:, 1:] > 0).sum(1).to(cache_lens.dtype) + 1
    if any(t.stride(-1) != 1 for t in (*keys, *values)):
        raise ValueError("impl='triton' compacts in place and needs k and v with unit stride along D")
    distinct = _distinct_caches((*keys, *values))
    if len(distinct) < len(keys) + len(values):
        # Re-paired so that each tensor is moved by one program; an odd one out is paired with itself, which one
        # program moves correctly (slot by slot it copies K's row, then V's, from a source row that no earlier
        # slot wrote: the second copy rewrites the same values).
        keys, values = distinct[0::2], distinct[1::2] + distinct[len(distinct) - len(distinct) % 2:]
    return _launch(_compact_kv_op, _compact_kv_triton, keys, values, _int64_rows(accepted), cache_lens)


def _compact_kv_triton(
    keys: list[torch.Tensor], values: list[torch.Tensor], accepted: torch.Tensor, cache_lens: torch.Tensor
) -> torch.Tensor:
    """One compaction launch per set of layer strides (one in all for a transformers cache)."""
    from .kernels.tree_verify import compact_kv_forward

    groups: dict[tuple, list[int]] = {}
    for index, (layer_k, layer_v) in enumerate(zip(keys, values)):
        groups.setdefault((layer_k.stride(), layer_v.stride()), []).append(index)
    for members in groups.values():
        group_k, group_v = [keys[i] for i in members], [values[i] for i in members]
        table = None
        if len(members) > 1:
            table = int64_to_device([t.data_ptr() for pair in zip(group_k, group_v) for t in pair], keys[0].device)
        new_lens = compact_kv_forward(group_k, group_v, accepted, cache_lens, table)
    return new_lens
