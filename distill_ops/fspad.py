"""FSPAD draft head: one decoder layer that drafts from the target model's last-layer features.

Entry ``t`` of the head reads the target's feature ``f_t`` (the last hidden state the LM head consumes,
i.e. after the final norm) and the embedding ``e_{t+1}`` of the next token (the target's frozen input
embedding), and sits at position ``t + 1``:

* feature sampling (FSPAD): the next token's embedding gates the feature::

      h0 = W_fc [e_{t+1}; f_t] + b
      h  = h0 + W_down( SiLU(W_gate e_{t+1}) * W_up RMSNorm(h0) )

* one pre-norm decoder layer (RoPE self-attention with the target's head layout and GQA, SwiGLU MLP),
* partial alignment: a final RMSNorm and a ``d -> 2d`` projection split into ``regress`` (regresses the
  next target feature ``f_{t+1}``; fed back as the next entry's feature while drafting) and ``predict``
  (goes to the target's frozen LM head: the draft logits of token ``t + 2``). The projection starts as two
  identities so that both halves begin as the layer's output.

Training pairs come from :func:`fspad_training_inputs`; the loss is ``distill_ops.fspad_draft_loss``
(SmoothL1 on ``regress`` + soft cross-entropy of ``lm_head(predict)`` against ``lm_head(f_{t+1})``).
While drafting, :class:`~distill_ops.speculative.SpeculativeDecoder` keeps the head's own KV cache
(:class:`FSPADCache`) and runs its attention over the draft tree with the package's tree attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._utils import INT_DTYPES, check_int, check_number, check_same_device, check_tensor, check_token_ids
from .speculative import TreeAttentionContext, tree_attention_tail


def _config_value(config, name: str, default):
    """``config.<name>``, or ``default`` when the config lacks it or holds None (a 0 is a value: it is checked, not
    replaced by the default)."""
    value = getattr(config, name, None)
    return default if value is None else value


def _rope_theta(config):
    """The rope base: ``config.rope_parameters["rope_theta"]`` (transformers 5), else ``config.rope_theta``, else
    10000."""
    parameters = getattr(config, "rope_parameters", None) or {}
    theta = parameters.get("rope_theta") if isinstance(parameters, dict) else None
    return _config_value(config, "rope_theta", 10000.0) if theta is None else theta


class _RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics, as the Llama-family norms compute them.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


class FSPADCache:
    """KV cache of the head's attention: committed entries, then draft-tree entries until :meth:`rollback`.

    ``keys``/``values``: ``[B, Hkv, S, D]``.
    """

    def __init__(self):
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.committed = 0

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys is None:
            self.keys, self.values = keys, values
        else:
            self.keys = torch.cat([self.keys, keys], dim=2)
            self.values = torch.cat([self.values, values], dim=2)
        return self.keys, self.values

    def commit(self, length: int | None = None) -> None:
        """Everything appended so far is committed (true target features); with ``length``, the first
        ``length`` entries are, and the rest is dropped."""
        if length is not None and self.keys is not None and self.length > length:
            self.keys = self.keys[:, :, :length]
            self.values = self.values[:, :, :length]
        self.committed = self.length

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep only the batch rows ``index`` (int64 ``[B']``)."""
        if self.keys is not None:
            self.keys, self.values = self.keys[index], self.values[index]

    def rollback(self) -> None:
        """Drop the entries appended since the last :meth:`commit` (the draft tree)."""
        if self.keys is not None and self.length > self.committed:
            self.keys = self.keys[:, :, : self.committed]
            self.values = self.values[:, :, : self.committed]


def _config_int(config, name: str, default: int | None = None) -> int:
    """``config.<name>`` as an int >= 1 (``default`` when the config lacks it or holds None; required otherwise)."""
    value = getattr(config, name, None)
    if value is None:
        if default is None:
            raise TypeError(f"config must have {name} (the target's transformers config), {type(config).__name__} "
                            f"has none")
        return default
    return check_int(f"config.{name}", value, low=1)


class FSPADDraftHead(nn.Module):
    """FSPAD draft head for a target model (see the module docstring for the formulas).

    Args:
        config: the target's ``transformers`` config (``hidden_size``, ``num_attention_heads``,
            ``num_key_value_heads``, ``head_dim``, ``intermediate_size``, ``rms_norm_eps``, rope theta,
            ``vocab_size``), or any object with those attributes.
        sampling_size: width of the feature-sampling gate (``W_gate``/``W_up``); default ``hidden_size``.

    The head owns no embedding or LM head: it takes token embeddings and returns hidden states for the
    target's frozen LM head. Parameters: about ``4 d^2 + 3 d s + attention + MLP`` for width ``d``.
    """

    def __init__(self, config, *, sampling_size: int | None = None):
        super().__init__()
        if isinstance(config, torch.nn.Module):
            raise TypeError(f"config must be the target's config (target.config), got a {type(config).__name__} model")
        hidden = _config_int(config, "hidden_size")
        num_heads = _config_int(config, "num_attention_heads")
        num_kv_heads = _config_int(config, "num_key_value_heads", num_heads)
        head_dim = _config_int(config, "head_dim", hidden // num_heads)
        intermediate = _config_int(config, "intermediate_size", 4 * hidden)
        eps = check_number("config.rms_norm_eps", _config_value(config, "rms_norm_eps", 1e-6), low=0.0)
        if num_heads % num_kv_heads != 0:
            raise ValueError(
                f"num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads ({num_kv_heads})"
            )
        if head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even (rotary embedding), got {head_dim}")
        sampling = hidden if sampling_size is None else check_int("sampling_size", sampling_size, low=1)
        self.hidden_size = hidden
        self.vocab_size = _config_int(config, "vocab_size")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        # A negative rope theta or a NaN / negative norm epsilon made every output NaN.
        self.rope_theta = check_number("config.rope_theta", _rope_theta(config), low=0.0, low_inclusive=False)

        # Feature sampling.
        self.fc = nn.Linear(2 * hidden, hidden, bias=True)
        self.sample_norm = _RMSNorm(hidden, eps)
        self.sample_gate = nn.Linear(hidden, sampling, bias=False)
        self.sample_up = nn.Linear(hidden, sampling, bias=False)
        self.sample_down = nn.Linear(sampling, hidden, bias=False)
        # The decoder layer.
        self.input_norm = _RMSNorm(hidden, eps)
        self.q_proj = nn.Linear(hidden, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden, bias=False)
        self.post_attention_norm = _RMSNorm(hidden, eps)
        self.mlp_gate = nn.Linear(hidden, intermediate, bias=False)
        self.mlp_up = nn.Linear(hidden, intermediate, bias=False)
        self.mlp_down = nn.Linear(intermediate, hidden, bias=False)
        # Partial alignment.
        self.final_norm = _RMSNorm(hidden, eps)
        self.out_proj = nn.Linear(hidden, 2 * hidden, bias=False)
        with torch.no_grad():
            eye = torch.eye(hidden)
            self.out_proj.weight.copy_(torch.cat([eye, eye], dim=0))

    def new_cache(self) -> FSPADCache:
        return FSPADCache()

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        exponents = torch.arange(0, self.head_dim, 2, device=positions.device, dtype=torch.float32) / self.head_dim
        inv_freq = self.rope_theta ** -exponents
        angles = positions.to(torch.float32)[..., None] * inv_freq  # [B, L, D/2]
        angles = torch.cat([angles, angles], dim=-1)[:, None]  # [B, 1, L, D]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def _attention(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cache: FSPADCache | None,
        tree: TreeAttentionContext | None,
    ) -> torch.Tensor:
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = self._rope(positions, q.dtype)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if cache is not None:
            k, v = cache.append(k, v)
        if tree is not None:
            out = tree_attention_tail(q, k, v, tree, scaling=self.head_dim**-0.5)
        else:
            group = self.num_heads // self.num_kv_heads
            k_full = k.repeat_interleave(group, dim=1) if group > 1 else k
            v_full = v.repeat_interleave(group, dim=1) if group > 1 else v
            kv_len = k.shape[2]
            if kv_len == length:
                out = F.scaled_dot_product_attention(q, k_full, v_full, is_causal=True)
            else:
                # Causal with a committed prefix: query i sits at key position kv_len - length + i.
                rows = torch.arange(length, device=x.device)[:, None] + (kv_len - length)
                mask = torch.arange(kv_len, device=x.device)[None, :] <= rows
                out = F.scaled_dot_product_attention(q, k_full, v_full, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim))

    def forward(
        self,
        features: torch.Tensor,
        token_embeds: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        *,
        cache: FSPADCache | None = None,
        tree: TreeAttentionContext | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the head over ``L`` entries.

        Args:
            features: ``[B, L, d]`` the feature of each entry's position (target features, or the
                ``regress`` output of the parent entry while drafting).
            token_embeds: ``[B, L, d]`` the embedding of the token after each entry's feature.
            position_ids: ``[B, L]`` or ``[L]``; default ``cache length + 1 + arange(L)``.
            cache: the head's KV cache (None in training: plain causal attention over the ``L`` entries).
            tree: draft-tree attention context (the entries are the last ``L`` nodes of ``tree.tree``).

        Returns ``(regress, predict)``, each ``[B, L, d]`` in the head's dtype.
        """
        check_tensor("features", features)
        check_tensor("token_embeds", token_embeds)
        if features.shape != token_embeds.shape or features.dim() != 3 or features.shape[-1] != self.hidden_size:
            raise ValueError(
                f"features and token_embeds must both have shape [B, L, {self.hidden_size}], got "
                f"{tuple(features.shape)} and {tuple(token_embeds.shape)}"
            )
        dtype = self.fc.weight.dtype
        if features.dtype != dtype or token_embeds.dtype != dtype:
            raise TypeError(f"features and token_embeds must have the head's dtype {dtype}, got {features.dtype} "
                            f"and {token_embeds.dtype}")
        length = features.shape[1]
        if position_ids is not None:
            check_tensor("position_ids", position_ids, dtypes=INT_DTYPES)
            if position_ids.dim() not in (1, 2) or position_ids.shape[-1] != length or (
                    position_ids.dim() == 2 and position_ids.shape[0] != features.shape[0]):
                raise ValueError(f"position_ids must have shape [L]=[{length}] or [B, L]=[{features.shape[0]}, "
                                 f"{length}], got {tuple(position_ids.shape)}")
        check_same_device(head_weights=self.fc.weight, features=features, token_embeds=token_embeds,
                          position_ids=position_ids)
        if position_ids is None:
            start = 1 + (cache.length if cache is not None else 0)
            position_ids = torch.arange(start, start + length, device=features.device)
        if position_ids.dim() == 1:
            position_ids = position_ids[None]
        h0 = self.fc(torch.cat([token_embeds, features], dim=-1))
        h = h0 + self.sample_down(F.silu(self.sample_gate(token_embeds)) * self.sample_up(self.sample_norm(h0)))
        h = h + self._attention(self.input_norm(h), position_ids, cache, tree)
        normed = self.post_attention_norm(h)
        h = h + self.mlp_down(F.silu(self.mlp_gate(normed)) * self.mlp_up(normed))
        regress, predict = self.out_proj(self.final_norm(h)).chunk(2, dim=-1)
        return regress, predict


def _check_target_input_ids(target: object, input_ids: object, min_length: int) -> None:
    """``target`` a model and ``input_ids`` integer ``[B, L]`` with ``L >= min_length``, token ids within the target's
    embedding rows (values read only where that costs no synchronisation). Unchecked, a float, empty or
    out-of-range ``input_ids`` failed deep inside the target's embedding or mask code."""
    if not isinstance(target, nn.Module):
        raise TypeError(f"target must be a transformers causal LM (an nn.Module), got {type(target).__name__}")
    check_tensor("input_ids", input_ids, dtypes=INT_DTYPES)
    if input_ids.dim() != 2 or input_ids.shape[1] < min_length:
        raise ValueError(f"input_ids must have shape [B, L] with L >= {min_length}, got {tuple(input_ids.shape)}")
    if input_ids.shape[0] < 1:  # (failed inside the target's attention, reshaping 0 elements)
        raise ValueError(f"input_ids must have shape [B, L] with B >= 1, got {tuple(input_ids.shape)}")
    get_embeddings = getattr(target, "get_input_embeddings", None)
    vocab = getattr(get_embeddings() if callable(get_embeddings) else None, "num_embeddings", None)
    if isinstance(vocab, int):
        check_token_ids("input_ids", input_ids, vocab, note=" (the target's embedding rows)")


def target_features(target: nn.Module, input_ids: torch.Tensor, **forward_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's last-layer features (the hidden states its LM head consumes) and logits.

    ``input_ids [B, L]`` → ``(features [B, L, d], logits [B, L, V])``. These are the features the engine
    feeds the head while decoding (``output_hidden_states=True``, last entry). ``forward_kwargs`` go to the
    target's forward as they are (e.g. ``attention_mask``).
    """
    _check_target_input_ids(target, input_ids, min_length=1)
    return _target_features(target, input_ids, **forward_kwargs)


def _target_features(target: nn.Module, input_ids: torch.Tensor, **forward_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`target_features` on inputs already checked."""
    out = target(input_ids=input_ids, output_hidden_states=True, use_cache=False, **forward_kwargs)
    return out.hidden_states[-1], out.logits


def fspad_training_inputs(target: nn.Module, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Aligned training tensors for a head on sequences ``input_ids [B, L]`` (``L >= 2``), without gradients.
    ``target``: the (frozen) ``transformers`` causal LM whose last-layer features the head learns to draft.

    Entry ``t = 0 .. L-2`` reads ``(f_t, e_{t+1})`` at position ``t + 1`` and is trained to produce
    ``f_{t+1}``. Returns ``features [B, L-1, d]``, ``token_embeds [B, L-1, d]``, ``position_ids [L-1]`` and
    ``target_next_features [B, L-1, d]`` (pass ``regress``, ``predict``, ``target_next_features`` and the
    LM head's weight to ``fspad_draft_loss``, with ``logit_scale=`` / ``softcap=`` for a target that scales or
    soft-caps its logits). Batches of different lengths: pad on the right and drop the padding's entries with
    ``fspad_draft_loss(loss_mask=...)`` (causal attention leaves the real entries exact); the target runs
    without an attention mask and every row's positions start at 0, so left padding would shift them.
    """
    _check_target_input_ids(target, input_ids, min_length=2)
    with torch.no_grad():
        features, _ = _target_features(target, input_ids)  # input_ids checked above (min_length 2)
        token_embeds = target.get_input_embeddings()(input_ids[:, 1:])
    length = input_ids.shape[1] - 1
    return {
        "features": features[:, :-1],
        "token_embeds": token_embeds,
        "position_ids": torch.arange(1, length + 1, device=input_ids.device),
        "target_next_features": features[:, 1:],
    }
