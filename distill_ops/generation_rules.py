"""transformers' token-sequence logits processors at every node of a draft tree.

``generate`` applies ``no_repeat_ngram_size``, ``bad_words_ids`` and ``sequence_bias`` from the sequence a token
would extend (``encoder_no_repeat_ngram_size`` from the prompt, ``exponential_decay_length_penalty`` from its
length: :func:`ban_repeated_ngrams` without a tree, :func:`decay_eos`). In a verification step, node ``i`` of the tree predicts the token after its own sequence: the
committed tokens (the root is the last of them) and then the drafts on the path from the root to ``i``. These
helpers apply each processor to every node row of the target's ``[B, T, V]`` logits from that node's sequence, on
the device, with no host read: a node's last ``width`` tokens come from its ancestors (``tree.parents``) and, past
the root, from each sequence's last committed tokens.

Costs per step: O(B·T·width) for the node tails, O(B·T·(L + T)·n) for the n-gram rule over ``L`` committed tokens,
O(B·T·E·m) for ``E`` biased or banned sequences of ``m`` tokens. The bans write their -inf with a scatter (no pass
over the vocabulary); the biases make the fp32 copy of the logits that ``generate``'s processors work on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ._utils import check_int, check_number
from .tree import TreeSpec


def node_tails(tree: TreeSpec, tokens: torch.Tensor, committed_tail: torch.Tensor, width: int) -> torch.Tensor:
    """The last ``width`` tokens of every node's sequence, ``[B, T, width]`` int64, oldest first, ``-1`` before the
    sequence's start.

    ``tokens [B, T]``: the tree's tokens (node 0, the root, is the last committed token). ``committed_tail
    [B, width]``: each sequence's last ``width`` committed tokens, oldest first, ``-1`` padded on the left."""
    batch, num_nodes = tokens.shape
    parents = tree.parents.expand(batch, num_nodes)
    depth = tree.depth.expand(batch, num_nodes)
    node = torch.arange(num_nodes, device=tokens.device).expand(batch, num_nodes)
    columns = []
    for distance in range(width):  # the token `distance` places before the node's own one
        on_tree = tokens.gather(1, node.clamp(min=0))
        # Past the root: committed token root - (distance - depth), at column width - 1 - (distance - depth) >= 0.
        before_root = committed_tail.gather(1, (width - 1 - distance + depth).clamp(max=width - 1))
        columns.append(torch.where(depth >= distance, on_tree, before_root))
        node = parents.gather(1, node.clamp(min=0))
    return torch.stack(columns[::-1], dim=-1)


def ban_repeated_ngrams(logits: torch.Tensor, size: int, tails: torch.Tensor, history: torch.Tensor,
                        tree: TreeSpec | None = None, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """transformers' ``NoRepeatNGramLogitsProcessor`` at every node: the token after node ``i`` is -inf where it
    would complete an n-gram (``n = size``) that node ``i``'s sequence already holds. In place on ``logits
    [B, T, V]``. Without ``tree``: only the n-grams of ``history`` (``EncoderNoRepeatNGramLogitsProcessor``, whose
    "encoder input" is a decoder-only model's prompt, when ``history`` is the prompt).

    ``history [B, L]``: the committed tokens, ``-1`` past each sequence's length. ``tails``: :func:`node_tails` of
    width >= ``size``. A window that reaches before a sequence's start or past its committed end holds a ``-1``:
    it matches no node's n-gram prefix (a node of ``size - 1`` tokens or more has none; a shorter one has fewer
    ``-1`` in its prefix than such a window), so a sequence of fewer than ``size`` tokens bans nothing, as in
    ``generate``."""
    width = tails.shape[-1]
    suffix = tails[..., width - size + 1:]  # [B, T, n - 1]: the n-gram prefix that the next token would complete
    if history.shape[1] >= size:  # the n-grams among the committed tokens
        windows = history.unfold(1, size, 1)  # [B, W, n]
        last = windows[:, None, :, -1]
        match = (windows[:, None, :, :-1] == suffix[:, :, None, :]).all(-1) & (last >= 0)  # -1: past the end
        _ban_where(logits, match, last)
    if tree is not None and tokens.shape[1] > 1:  # n-grams ending at a draft on the node's path (the root's: above)
        windows = tails[..., width - size:]  # [B, T, n]: the n-gram ending at each node
        match = (windows[:, None, :, :-1] == suffix[:, :, None, :]).all(-1)
        match &= tree.dense_ancestors() & (tree.depth > 0)[:, None, :]
        _ban_where(logits, match, tokens[:, None, :])
    return logits


def decay_eos(logits: torch.Tensor, eos_ids: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """transformers' ``ExponentialDecayLengthPenalty`` at every node: each EOS logit ``x`` becomes
    ``x + |x| * factors[b, i]`` where finite (``factors [B, T]`` fp32: ``decay ** (length - start) - 1`` for the
    node's sequence length past the start, 0 before it). In place on fp32 ``logits [B, T, V]``."""
    eos = logits.index_select(-1, eos_ids)
    penalty = (eos.abs() * factors[..., None]).masked_fill_(~torch.isfinite(eos), 0.0)
    return logits.index_copy_(-1, eos_ids, eos + penalty)


def _ban_where(logits: torch.Tensor, match: torch.Tensor, ids: torch.Tensor) -> None:
    """``logits[b, i, ids[b, i, e]] = -inf`` where ``match[b, i, e]`` (``ids`` broadcast to ``match``; ids < 0 must
    not match), with no pass over the vocabulary: a min with -inf where matched, +inf elsewhere (order-free)."""
    ids = ids.clamp(min=0).expand(match.shape)
    values = torch.where(match, -math.inf, math.inf).to(logits.dtype)
    logits.scatter_reduce_(2, ids, values, "amin")


@dataclass
class _Group:
    """The biased sequences of one length ``m + 1``: their first ``m`` tokens, last tokens and biases."""
    prefixes: torch.Tensor  # int64 [E, m]
    last: torch.Tensor  # int64 [E]
    bias: torch.Tensor  # fp32 [E]
    last_ids: list[int]  # ``last`` on the host


class TokenSequenceRules:
    """``sequence_bias`` and ``bad_words_ids`` as ``generate`` applies them (``SequenceBiasLogitsProcessor``, then,
    after the repetition penalty, ``NoBadWordsLogitsProcessor``), at every tree node.

    A one-token entry acts on every node; a longer one on the nodes whose sequence ends with its first tokens.
    ``sequence_bias``: a list of ``[token ids, bias]`` pairs or a dict ``{tuple of ids: bias}``; biases on the same
    last token add up. ``bad_words_ids``: a list of id lists, each banned (-inf) as its last token after the others;
    a one-token entry equal to an EOS id is dropped, as ``generate`` drops it."""

    def __init__(self, sequence_bias, bad_words_ids, eos: Sequence[int], vocab: int, device: torch.device,
                 sequence_bias_name: str = "sequence_bias", bad_words_name: str = "bad_words_ids"):
        biases = _sequence_bias_entries(sequence_bias_name, sequence_bias, vocab)
        bad = [tuple(ids) for ids in _token_lists(bad_words_name, bad_words_ids, vocab)
               if not (len(ids) == 1 and ids[0] in eos)]
        self.device = device
        self.bias_single = None
        single = [(ids[0], value) for ids, value in biases.items() if len(ids) == 1]
        if single:
            self.bias_single = torch.zeros(vocab, dtype=torch.float32)
            self.bias_single[[token for token, _ in single]] = torch.tensor([value for _, value in single])
            self.bias_single = self.bias_single.to(device)
        self.bias_groups = _groups([(ids, value) for ids, value in biases.items() if len(ids) > 1], device)
        self.bad_single_ids = sorted({ids[0] for ids in bad if len(ids) == 1})
        self.bad_single = (torch.tensor(self.bad_single_ids, dtype=torch.int64, device=device)
                           if self.bad_single_ids else None)
        self.bad_groups = _groups([(ids, -math.inf) for ids in dict.fromkeys(bad) if len(ids) > 1], device)
        self._index_groups()

    def _index_groups(self) -> None:
        """The node tail the longer entries need (``width``), the distinct last tokens of the longer biased entries
        (``bias_ends``) and each bias group's entries' slots among them."""
        lengths = [group.prefixes.shape[1] for group in self.bias_groups + self.bad_groups]
        self.width = max(lengths, default=0)
        ends = list(dict.fromkeys(token for group in self.bias_groups for token in group.last_ids))
        self.bias_ends = torch.tensor(ends, dtype=torch.int64, device=self.device)
        self.bias_slots = [torch.tensor([ends.index(token) for token in group.last_ids], dtype=torch.int64,
                                        device=self.device) for group in self.bias_groups]

    def within(self, longest: int) -> "TokenSequenceRules | None":
        """These rules (changed in place) without the entries whose first tokens are longer than ``longest`` (no
        sequence ends with them); None when nothing is left."""
        self.bias_groups, self.bad_groups = [[group for group in groups if group.prefixes.shape[1] <= longest]
                                             for groups in (self.bias_groups, self.bad_groups)]
        self._index_groups()
        return self if self.biases or self.bans else None

    @property
    def biases(self) -> bool:
        return self.bias_single is not None or bool(self.bias_groups)

    @property
    def bans(self) -> bool:
        return self.bad_single is not None or bool(self.bad_groups)

    def biased(self, logits: torch.Tensor, tails: torch.Tensor | None) -> torch.Tensor:
        """fp32 ``logits [B, T, V]`` plus the sequence biases that apply at each node (a new tensor). As
        ``generate``: each token's bias is summed first (its one-token bias, then the longer entries that apply,
        group by group), then added once; only the tokens that end a longer entry are handled per node."""
        single = self.bias_single
        out = logits.to(torch.float32, copy=True)  # a new fp32 tensor, as generate's processors see the logits
        if single is not None:
            out += single  # in place: an out-of-place broadcast add measured ~10x slower on CPU
        if not self.bias_groups:
            return out
        ends = self.bias_ends  # [U] the distinct last tokens of the longer entries
        total = torch.zeros(*logits.shape[:2], ends.shape[0], dtype=torch.float32, device=logits.device)
        if single is not None:
            total += single[ends]
        for group, slots in zip(self.bias_groups, self.bias_slots):
            total.index_add_(2, slots, torch.where(_matches(group, tails), group.bias, 0.0))
        index = ends.expand(total.shape)
        out.scatter_(2, index, logits.gather(2, index).float() + total)
        return out

    def ban(self, logits: torch.Tensor, tails: torch.Tensor | None) -> torch.Tensor:
        """``logits`` with each bad word's last token at -inf where the node's sequence ends with its other tokens
        (in place)."""
        if self.bad_single is not None:
            logits.index_fill_(-1, self.bad_single, -math.inf)
        for group in self.bad_groups:
            _ban_where(logits, _matches(group, tails), group.last)
        return logits


def _matches(group: _Group, tails: torch.Tensor) -> torch.Tensor:
    """``[B, T, E]``: node ``i``'s sequence ends with the group's entry ``e`` prefix."""
    length = group.prefixes.shape[1]
    return (tails[..., tails.shape[-1] - length:][:, :, None, :] == group.prefixes).all(-1)


def _groups(entries: list[tuple[tuple[int, ...], float]], device: torch.device) -> list[_Group]:
    """Entries of two or more tokens grouped by length, in first-seen order (``generate``'s)."""
    by_length: dict[int, list[tuple[tuple[int, ...], float]]] = {}
    for ids, value in entries:
        by_length.setdefault(len(ids), []).append((ids, value))
    return [
        _Group(
            prefixes=torch.tensor([ids[:-1] for ids, _ in group], dtype=torch.int64, device=device),
            last=torch.tensor([ids[-1] for ids, _ in group], dtype=torch.int64, device=device),
            bias=torch.tensor([value for _, value in group], dtype=torch.float32, device=device),
            last_ids=[ids[-1] for ids, _ in group],
        )
        for group in by_length.values()
    ]


def _token_ids(name: str, ids, vocab: int) -> tuple[int, ...]:
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence) or len(ids) == 0:
        raise ValueError(f"{name} must be a non-empty list of token ids, got {ids!r}")
    ids = tuple(check_int(name, token, low=0) for token in ids)
    if max(ids) >= vocab:
        raise ValueError(f"{name} must hold token ids in [0, {vocab}) (the target's vocabulary), got {max(ids)}")
    return ids


def _token_lists(name: str, value, vocab: int) -> list[tuple[int, ...]]:
    """``bad_words_ids``: a list of non-empty token id lists (``None`` or empty: none)."""
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a list of token id lists, got {type(value).__name__}")
    return [_token_ids(f"{name}[{index}]", ids, vocab) for index, ids in enumerate(value)]


def _sequence_bias_entries(name: str, value, vocab: int) -> dict[tuple[int, ...], float]:
    """``sequence_bias`` as a dict ``{ids: bias}`` (the last of repeated sequences wins, as in ``generate``)."""
    if value is None:
        return {}
    if isinstance(value, dict):
        pairs = list(value.items())
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        pairs = []
        for index, pair in enumerate(value):
            if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
                raise ValueError(f"{name}[{index}] must be a [token ids, bias] pair, got {pair!r}")
            pairs.append(tuple(pair))
    else:
        raise TypeError(f"{name} must be a list of [token ids, bias] pairs or a dict {{tuple of ids: bias}}, got "
                        f"{type(value).__name__}")
    entries = {}
    for index, (ids, bias) in enumerate(pairs):
        key = _token_ids(f"{name}[{index}] token ids", ids, vocab)
        infinite = isinstance(bias, float) and bias in (math.inf, -math.inf)  # -inf bans, as in generate
        entries[key] = bias if infinite else check_number(f"{name}[{index}] bias", bias)
    return entries


def check_decay(name: str, value) -> tuple[int, float] | None:
    """``exponential_decay_length_penalty``: ``(start_index, decay_factor)``, an int >= 0 and a number > 0."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"{name} must be a (start_index, decay_factor) pair, got {value!r}")
    return check_int(f"{name}[0]", value[0], low=0), check_number(f"{name}[1]", value[1], low=0.0,
                                                                    low_inclusive=False)


def check_ngram_size(name: str, value) -> int:
    """``no_repeat_ngram_size``: an int >= 0 (0 and ``None``: off)."""
    return check_int(name, 0 if value is None else value, low=0)
