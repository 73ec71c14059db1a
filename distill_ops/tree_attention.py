"""Tree attention: the target model scores a whole draft tree in one forward pass.

For sequence ``b`` the KV cache holds the prefix at positions ``[0, cache_lens[b])`` and the tree nodes
at ``[cache_lens[b], cache_lens[b] + T)`` in node order. Tree node ``i`` attends to the whole prefix and
to the tree nodes set in its ancestor bitmask (itself and its ancestors).
"""

from __future__ import annotations

import math

import torch

from ._utils import (
    Impl,
    FLOAT_DTYPES, INT_DTYPES, check_int, check_number, check_same_device, check_tensor, check_written_in_place,
    resolve_impl, sink_softmax, softcapped,
)
from .tree import TreeSpec, check_tree_spec, unpack_ancestor_mask

_TRITON_HEAD_DIMS = (16, 32, 64, 128, 256)
# float32 D = 256 has no Triton configuration that is spill-free and fits an A100's shared memory (its 3xTF32
# operands take four times a 16-bit fragment's registers): impl="auto" runs it on the PyTorch path.
_TRITON_FP32_MAX_HEAD_DIM = 128
# float64 runs on the PyTorch path only (it is the tests' reference precision).
_DTYPES = FLOAT_DTYPES + (torch.float64,)


def triton_head_dim_problem(head_dim: int, dtype: torch.dtype) -> str | None:
    """Why the Triton kernel cannot run q/k/v of this head dim and (float) dtype, or None when it can; read by
    :func:`tree_attention` and by the speculative engine, which refuses such a model with ``impl="triton"`` when
    it is built rather than at its first tree forward."""
    if head_dim not in _TRITON_HEAD_DIMS:
        return f"needs a head dim D in {_TRITON_HEAD_DIMS}, got D={head_dim}"
    if dtype == torch.float32 and head_dim > _TRITON_FP32_MAX_HEAD_DIM:
        return (f"runs float32 q/k/v up to D={_TRITON_FP32_MAX_HEAD_DIM}, got D={head_dim}: use bfloat16/float16, "
                f"or impl='torch' (impl='auto' picks it)")
    return None


def tree_attention_mask(
    ancestor_mask: torch.Tensor,
    cache_lens: torch.Tensor,
    kv_len: int,
    depth: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Dense boolean mask ``[B, T, S]`` (True = visible) of tree attention; device-side, no host sync.

    ``ancestor_mask`` int64 ``[Bt, T, W]`` (Bt 1 or B), ``cache_lens`` int ``[B]``. With ``sliding_window``
    (and the nodes' ``depth`` ``[Bt, T]``), node ``i`` at position ``cache_len + depth_i`` sees only the prefix
    keys ``k`` with ``(cache_len + depth_i) - k < sliding_window`` (transformers' sliding-window rule).
    """
    num_nodes = ancestor_mask.shape[1]
    ancestors = unpack_ancestor_mask(ancestor_mask, num_nodes).expand(cache_lens.shape[0], -1, -1)
    positions = torch.arange(kv_len, device=cache_lens.device)
    relative = positions[None, :] - cache_lens.to(torch.int64)[:, None]  # [B, S]
    in_prefix = relative < 0
    in_tree = (relative >= 0) & (relative < num_nodes)
    index = relative.clamp(0, num_nodes - 1)[:, None, :].expand(-1, num_nodes, -1)
    tree_visible = torch.gather(ancestors, 2, index) & in_tree[:, None, :]
    prefix_visible = in_prefix[:, None, :]
    if sliding_window is not None:
        # Key positions: prefix key k sits at position k, tree node j at cache_len + depth_j.
        node_depth = depth.expand(cache_lens.shape[0], -1)  # [B, T]
        node_pos = cache_lens.to(torch.int64)[:, None] + node_depth
        key_pos = torch.where(in_tree, cache_lens.to(torch.int64)[:, None] + node_depth.gather(1, index[:, 0]),
                              positions[None, :])  # [B, S]
        in_window = (node_pos[:, :, None] - key_pos[:, None, :]) < sliding_window
        prefix_visible = prefix_visible & in_window
        tree_visible = tree_visible & in_window
    return prefix_visible | tree_visible


def tree_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ancestor_mask: torch.Tensor,
    cache_lens: torch.Tensor,
    sm_scale: float,
    *,
    upcast: bool = True,
    softcap: float | None = None,
    depth: torch.Tensor | None = None,
    sliding_window: int | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """PyTorch tree attention with a dense boolean mask (the CPU path and the test/benchmark reference).
    ``sinks`` ``[Hq]``: one attention-sink logit per query head, in the softmax's denominator only (gpt-oss).
    ``softcap``: scores ``softcap * tanh(sm_scale * q.k / softcap)`` (Gemma-2's attention soft-capping).

    Computes in float32 (float64 for float64 inputs) when ``upcast``; one sequence at a time so the
    ``[Hq, T, S]`` score matrix of only one sequence is alive. The query heads that share a KV head are stacked
    into one matrix, ``[Hkv, group * T, D]``, so each KV head's keys and values are read where they lie (repeating
    them per query head copied the sequence's cache: 32.0 -> 21.0 ms at Hq=32, Hkv=8, L=4096, T=32, D=128, fp32, on
    a 2-core CPU, the same results; benchmarks/results/cpu-2026-12-07-fallbacks/tree-attention). Returns q's dtype,
    ``[B, Hq, T, D]``. Rows no node sees (past ``cache_len + T``, or before every node's window) are read as zeros,
    as the kernel never loads them: garbage there (NaN in an uninitialised cache) does not reach the output through
    0 * NaN.
    """
    batch, num_heads, num_nodes, head_dim = q.shape
    kv_heads = k.shape[1]
    rows = num_heads // kv_heads * num_nodes  # the query heads of each KV head, stacked (no -1: Hq may be 0)
    compute = torch.float64 if q.dtype == torch.float64 else (torch.float32 if upcast else q.dtype)
    mask = tree_attention_mask(ancestor_mask, cache_lens, k.shape[2], depth, sliding_window)
    out = torch.empty_like(q)
    for b in range(batch):
        values = v[b].to(compute).masked_fill(~mask[b].any(0)[:, None], 0.0)
        scores = torch.matmul(q[b].to(compute).reshape(kv_heads, rows, head_dim), k[b].to(compute).transpose(-1, -2))
        scores = softcapped(scores.mul_(sm_scale).view(num_heads, num_nodes, k.shape[2]), softcap)
        scores = scores.masked_fill(~mask[b][None], float("-inf"))
        probs = sink_softmax(scores, sinks, compute).reshape(kv_heads, rows, k.shape[2])
        out[b] = torch.matmul(probs, values).view(num_heads, num_nodes, head_dim).to(q.dtype)
    return out


def _check_cache_lens_values(cache_lens: torch.Tensor, num_nodes: int, kv_len: int) -> None:
    """Value checks, only where they cost no host synchronisation (``cache_lens`` in host memory).

    On a GPU the kernel stays memory-safe regardless (it never reads past ``S``)."""
    if cache_lens.device.type != "cpu" or cache_lens.numel() == 0:
        return
    if bool((cache_lens < 0).any()):
        raise ValueError(f"cache_lens must be >= 0, got {cache_lens.tolist()}")
    if bool((cache_lens.to(torch.int64) + num_nodes > kv_len).any()):
        raise ValueError(
            f"cache_lens + T must be <= S (the KV cache must hold the tree after the prefix): "
            f"T={num_nodes}, S={kv_len}, max(cache_lens)={int(cache_lens.max())}"
        )


def _tree_attention_body(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ancestor_mask: torch.Tensor,
    cache_lens: torch.Tensor,
    sm_scale: float,
    num_kv_splits: int,
    impl: str,
    softcap: float | None = None,
    depth: torch.Tensor | None = None,
    sliding_window: int | None = None,
    sinks: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The op's body; with ``out`` (eager calls only), the result is written there (the kernel stores into it)."""
    _check_cache_lens_values(cache_lens, q.shape[2], k.shape[2])
    if impl == "torch":
        result = tree_attention_ref(q, k, v, ancestor_mask, cache_lens, sm_scale, softcap=softcap, depth=depth,
                                    sliding_window=sliding_window, sinks=sinks)
        return result if out is None else out.copy_(result)
    from .kernels.tree_attention import tree_attention_forward

    # The kernel assumes 16-element-aligned output strides (vectorised stores): another ``out`` gets a copy.
    aligned = out is None or all(stride % 16 == 0 for stride in out.stride()[:-1])
    result = tree_attention_forward(
        q, k, v, ancestor_mask.contiguous(), cache_lens.to(torch.int32).contiguous(), sm_scale,
        None if num_kv_splits <= 0 else num_kv_splits, softcap,
        None if depth is None else depth.contiguous(), sliding_window,
        None if sinks is None else sinks.contiguous(),  # any float dtype: the kernel reads it as fp32
        out if aligned else None,
    )
    return result if aligned else out.copy_(result)


# The op is the body without ``out`` (its schema states the arguments; ``out`` is for eager calls only).
_tree_attention_op = torch.library.custom_op(
    "distill_ops::tree_attention", _tree_attention_body, mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor ancestor_mask, Tensor cache_lens, float sm_scale, int num_kv_splits, "
           "str impl, float? softcap=None, Tensor? depth=None, int? sliding_window=None, Tensor? sinks=None) -> Tensor",
)


@_tree_attention_op.register_fake
def _(q, k, v, ancestor_mask, cache_lens, sm_scale, num_kv_splits, impl, softcap=None, depth=None,
      sliding_window=None, sinks=None):
    return torch.empty_like(q)


def tree_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tree: TreeSpec,
    cache_lens: torch.Tensor,
    *,
    sm_scale: float | None = None,
    num_kv_splits: int | None = None,
    softcap: float | None = None,
    sliding_window: int | None = None,
    sinks: torch.Tensor | None = None,
    impl: Impl = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of the draft-tree queries over a KV cache holding the prefix then the tree nodes.

    Args:
        q: ``[B, Hq, T, D]`` queries of the tree nodes (fp32 / fp16 / bf16; fp64 with the torch impl).
        k, v: ``[B, Hkv, S, D]``, same dtype, ``Hq % Hkv == 0``. For sequence ``b``, positions
            ``[0, cache_lens[b])`` are the prefix and ``[cache_lens[b], cache_lens[b] + T)`` the tree nodes
            in node order; ``S >= max(cache_lens) + T``.
        tree: a :class:`TreeSpec` of ``T`` nodes, one tree (shared) or ``B`` trees, on q's device.
        cache_lens: integer ``[B]`` prefix lengths (ragged across the batch).
        sm_scale: score scale, default ``1 / sqrt(D)``.
        num_kv_splits: Triton only: number of prefix chunks of split-KV mode (1 = no split); ``None``
            applies the heuristic of ``distill_ops.kernels.tree_attention.choose_num_splits`` (from sizes
            only: split a prefix of at least 1,024 keys when the ``B · Hkv · row blocks`` programs would
            leave SMs idle, into as many chunks as give every SM a program in whole waves, counting the
            partial outputs a split writes).
        softcap: attention logit soft-capping (Gemma-2's ``attn_logit_softcapping``): each score becomes
            ``softcap * tanh(sm_scale * q.k / softcap)`` before the softmax; ``None`` (default) for none.
        sliding_window: transformers' sliding-window rule (Mistral, Gemma-2/3 local layers): node ``i`` at
            position ``cache_lens[b] + depth_i`` sees only keys whose position ``p`` has ``pos_i - p <
            sliding_window`` (prefix key ``k`` sits at position ``k``, tree node ``j`` at ``cache_lens[b] +
            depth_j``); ``None`` (default) for none. The Triton path starts each program's prefix at its
            window, so keys far behind are never read.
        sinks: float ``[Hq]`` attention-sink logits (gpt-oss's ``sinks``): each query head's softmax gets one
            extra logit ``sinks[h]`` (not scaled, no value vector) in its denominator; ``None`` (default) for none.
        impl: ``"auto"`` | ``"triton"`` | ``"torch"``.
        out: optional ``[B, Hq, T, D]`` tensor of q's dtype and device, with a unit last stride, that receives
            the result (the Triton kernel stores straight into it) and is returned: e.g. the transpose of a
            ``[B, T, Hq, D]`` buffer, the layout transformers' attention functions return, so that no copy
            follows. It must not overlap q, k or v.

    Returns ``[B, Hq, T, D]`` in q's dtype (``out`` when given). Node ``i`` attends to the whole prefix and to the
    tree nodes set in its ancestor bitmask. ``cache_lens`` values are checked only when they live on the CPU (a
    check on a GPU would synchronise); the kernel never reads outside ``[0, S)``.
    """
    check_tensor("q", q, dtypes=_DTYPES, ndim=4)
    check_tensor("k", k, dtypes=_DTYPES, ndim=4)
    check_tensor("v", v, dtypes=_DTYPES, ndim=4)
    check_tree_spec(tree)
    check_tensor("cache_lens", cache_lens, dtypes=INT_DTYPES, ndim=1)
    device = check_same_device(q=q, k=k, v=v, cache_lens=cache_lens, tree=tree.ancestor_mask)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    batch, num_heads, num_nodes, head_dim = q.shape
    if head_dim == 0:
        raise ValueError(f"q must have a head dim D >= 1 (q.shape[3]), got shape {tuple(q.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(
            f"k must have shape [B={batch}, Hkv, S, D={head_dim}] to match q {tuple(q.shape)}, got {tuple(k.shape)}"
        )
    num_kv_heads, kv_len = k.shape[1], k.shape[2]
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        raise ValueError(f"the number of query heads ({num_heads}) must be a multiple of the KV heads ({num_kv_heads})")
    if tree.num_nodes != num_nodes:
        raise ValueError(f"tree has {tree.num_nodes} nodes but q has T={num_nodes} (q.shape[2])")
    if tree.batch_size not in (1, batch):
        raise ValueError(f"tree must hold 1 or B={batch} trees, got {tree.batch_size}")
    if cache_lens.shape[0] != batch:
        raise ValueError(f"cache_lens must have shape [B={batch}], got {tuple(cache_lens.shape)}")
    if kv_len < num_nodes:
        raise ValueError(f"k/v length S={kv_len} must be >= T={num_nodes} (cache_lens + T <= S)")
    num_kv_splits = check_int("num_kv_splits", num_kv_splits, low=1, optional=True)
    if sm_scale is not None:
        sm_scale = check_number("sm_scale", sm_scale)
    if softcap is not None:
        softcap = check_number("softcap", softcap, low=0.0, low_inclusive=False)
    sliding_window = check_int("sliding_window", sliding_window, low=1, optional=True)
    if sinks is not None:
        check_tensor("sinks", sinks, dtypes=_DTYPES, ndim=1)
        check_same_device(q=q, sinks=sinks)
        if sinks.shape[0] != q.shape[1]:
            raise ValueError(f"sinks must have shape [Hq={q.shape[1]}] (one per query head), got {tuple(sinks.shape)}")
    backend = resolve_impl(impl, device)
    problem = triton_head_dim_problem(head_dim, q.dtype) if backend == "triton" else None
    if backend == "triton" and impl == "auto" and (q.dtype not in FLOAT_DTYPES or problem):
        backend = "torch"  # what the kernel does not cover (float64, D = 24, 80, 96, ...) takes the PyTorch path
    if backend == "triton" and q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"impl='triton' needs q/k/v in float32, float16 or bfloat16, got {q.dtype}")
    if backend == "triton" and problem:
        raise ValueError(f"impl='triton' {problem}")
    if backend == "triton" and max(k.stride(2), v.stride(2), head_dim) * kv_len >= 2**31:
        raise ValueError(f"impl='triton' needs S * k.stride(2) < 2**31 (int32 key offsets), got S={kv_len}")
    if out is not None:
        check_tensor("out", out, dtypes=(q.dtype,), ndim=4)
        check_same_device(q=q, out=out)
        if out.shape != q.shape or out.stride(-1) != 1:
            raise ValueError(f"out must have q's shape {tuple(q.shape)} and a unit last stride, got shape "
                             f"{tuple(out.shape)} and strides {out.stride()}")
        # An expand()ed out: all but one of the rows sharing memory are overwritten (the kernel stored into it
        # silently; the PyTorch path failed inside copy_); one requiring grad would keep stale autograd history.
        check_written_in_place("out", out)
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)
    if softcap is not None and not abs(2.0 * scale / softcap) <= torch.finfo(torch.float32).max:
        # The kernel folds 2 * sm_scale / softcap into one fp32 argument: an inf there made 0-scores NaN.
        raise ValueError(f"softcap={softcap} is too small for sm_scale={scale}: 2 * sm_scale / softcap overflows fp32")
    args = (
        q, k, v, tree.ancestor_mask, cache_lens, scale, 0 if num_kv_splits is None else num_kv_splits, backend,
        softcap, None if sliding_window is None else tree.depth, sliding_window,
        None if sinks is None else sinks.detach(),
    )
    # The custom op while torch.compile traces (and where autograd could record); otherwise its body directly:
    # the dispatcher's per-call cost (about 13 us of host time in a CPU measurement) would be paid in every
    # layer of every forward of a speculative decoder.
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))):
        result = _tree_attention_op(*args)
        return result if out is None else out.copy_(result)
    return _tree_attention_body(*args, out=out)
