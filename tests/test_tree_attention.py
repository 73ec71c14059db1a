"""Tree attention vs a float64 dense-mask SDPA reference and a per-node path oracle."""

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import DEVICE, IMPLS, RecordTensorOps, assert_close
from distill_ops.tree import build_tree
from distill_ops.tree_attention import tree_attention


def random_parents(num_nodes: int, seed: int) -> torch.Tensor:
    rng = random.Random(seed)
    return torch.tensor([-1] + [rng.randrange(max(0, i - 4), i) for i in range(1, num_nodes)])


def ancestor_chain(parents: list[int], node: int) -> list[int]:
    chain = [node]
    while parents[chain[-1]] >= 0:
        chain.append(parents[chain[-1]])
    return chain[::-1]


def sdpa_reference(q, k, v, parents, cache_lens, scale):
    """float64 SDPA with a dense boolean mask built by brute force from the parent arrays."""
    batch, num_heads, num_nodes, _ = q.shape
    kv_len, group = k.shape[2], num_heads // k.shape[1]
    mask = torch.zeros(batch, 1, num_nodes, kv_len, dtype=torch.bool)
    for b in range(batch):
        plist = parents[min(b, parents.shape[0] - 1)].tolist()
        start = int(cache_lens[b])
        mask[b, :, :, :start] = True
        for i in range(num_nodes):
            for j in ancestor_chain(plist, i):
                mask[b, 0, i, start + j] = True
    k64 = k.double().cpu().repeat_interleave(group, 1)
    v64 = v.double().cpu().repeat_interleave(group, 1)
    return F.scaled_dot_product_attention(q.double().cpu(), k64, v64, attn_mask=mask, scale=scale)


def path_oracle(q, k, v, parents, cache_lens, scale, softcap=None, window=None, sinks=None):
    """Each node: plain softmax attention over the prefix followed by its ancestor chain, nothing else
    (scores soft-capped to ``softcap * tanh(score / softcap)`` when ``softcap`` is given; with ``window`` only
    the keys whose position is within ``window - 1`` of the node's, prefix key p at position p and node j at
    cache_len + depth_j; ``sinks [Hq]``: one extra logit per head in the softmax's denominator)."""
    batch, num_heads, num_nodes, _ = q.shape
    group = num_heads // k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    for b in range(batch):
        plist = parents[min(b, parents.shape[0] - 1)].tolist()
        start = int(cache_lens[b])
        for i in range(num_nodes):
            chain = ancestor_chain(plist, i)
            positions = list(range(start)) + [start + j for j in chain]
            if window is not None:  # the chain lists depths 0 .. depth_i; node i sits at start + depth_i
                depth_of = {j: d for d, j in enumerate(chain)}
                pos_i = start + len(chain) - 1
                positions = [p for p in range(start) if pos_i - p < window] + [
                    start + j for j in chain if pos_i - (start + depth_of[j]) < window]
            for h in range(num_heads):
                keys = k[b, h // group, positions].double().cpu()
                values = v[b, h // group, positions].double().cpu()
                scores = keys @ q[b, h, i].double().cpu() * scale
                if softcap is not None:
                    scores = softcap * torch.tanh(scores / softcap)
                if sinks is not None:
                    scores = torch.cat([scores, sinks[h].double().cpu().view(1)])
                weights = torch.softmax(scores, 0)[: len(positions)]
                out[b, h, i] = weights @ values
    return out


def make_case(batch, num_heads, num_kv_heads, num_nodes, head_dim, cache_lens, dtype, *, per_seq_tree, seed,
              extra_kv=3):
    gen = torch.Generator().manual_seed(seed)
    kv_len = max(cache_lens) + num_nodes + extra_kv
    q = torch.randn(batch, num_heads, num_nodes, head_dim, generator=gen)
    k = torch.randn(batch, num_kv_heads, kv_len, head_dim, generator=gen)
    v = torch.randn(batch, num_kv_heads, kv_len, head_dim, generator=gen)
    trees = batch if per_seq_tree else 1
    parents = torch.stack([random_parents(num_nodes, seed + t) for t in range(trees)])
    q, k, v = (t.to(DEVICE, dtype) for t in (q, k, v))
    return q, k, v, parents, torch.tensor(cache_lens, device=DEVICE, dtype=torch.int32)


# (B, Hq, Hkv, T, D, cache_lens, per-sequence trees): small for the interpreter, awkward on purpose.
CASES = {
    "T1-mha": (1, 2, 2, 1, 64, [5], False),
    "T7-gqa-ragged": (3, 4, 2, 7, 64, [0, 9, 70], True),
    "T26-gqa4-ragged": (2, 8, 2, 26, 64, [33, 3], False),
    "T26-mqa-d128": (2, 4, 1, 26, 128, [17, 40], True),
    "T9-gqa-d32": (2, 4, 2, 9, 32, [0, 70], True),  # fp32 D = 32: 32-key tiles, several of them
    "T5-mqa-d16": (1, 2, 1, 5, 16, [65], False),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_tree_attention_vs_reference(case, dtype, impl):
    batch, hq, hkv, num_nodes, head_dim, cache_lens, per_seq = CASES[case]
    q, k, v, parents, lens = make_case(batch, hq, hkv, num_nodes, head_dim, cache_lens, dtype,
                                       per_seq_tree=per_seq, seed=len(case))
    tree = build_tree(parents.to(DEVICE))
    out = tree_attention(q, k, v, tree, lens, impl=impl)
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out, sdpa_reference(q, k, v, parents, lens.cpu(), 1 / math.sqrt(head_dim)), dtype)


def test_torch_path_reads_each_kv_head_where_it_lies():
    """The PyTorch path stacks the query heads that share a KV head, so no copy of the cache repeated per query head
    ([Hq, S, D] per sequence) is made; it repeated K and V (32 -> 21 ms at Hq=32, Hkv=8, L=4096, D=128 on a 2-core
    CPU). Checked with sinks and a soft cap (per query head): the same output as the path oracle."""
    q, k, v, parents, lens = make_case(3, 4, 2, 5, 16, [27, 20, 4], torch.float32, per_seq_tree=True, seed=8)
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0], device=DEVICE)
    tree = build_tree(parents.to(DEVICE))
    with RecordTensorOps() as recorder:
        out = tree_attention(q, k, v, tree, lens, sm_scale=0.3, softcap=5.0, sinks=sinks, impl="torch")
    assert recorder.ops_with_numel(4 * k.shape[2] * 16) == [], recorder.records
    oracle = path_oracle(q, k, v, parents, lens.cpu(), 0.3, softcap=5.0, sinks=sinks.cpu())
    assert_close(out, oracle, torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_query_heads_give_an_empty_output(impl):
    """q with Hq = 0 (as B = 0) is legal (0 % Hkv == 0) and gives an empty [B, 0, T, D] on both paths; the PyTorch
    path's reshape with -1 of a zero-element tensor raised instead (a review, 2026-12-07)."""
    tree = build_tree(torch.tensor([-1, 0, 0], device=DEVICE))
    q = torch.randn(2, 0, 3, 16, device=DEVICE)
    k = torch.randn(2, 1, 8, 16, device=DEVICE)
    out = tree_attention(q, k, torch.randn_like(k), tree, torch.tensor([2, 5], device=DEVICE), impl=impl)
    assert out.shape == (2, 0, 3, 16) and out.dtype == q.dtype


@pytest.mark.parametrize("impl", IMPLS)
def test_tree_attention_path_oracle_and_fp64_fallback(impl):
    q, k, v, parents, lens = make_case(2, 4, 2, 9, 64, [4, 12], torch.float32, per_seq_tree=True, seed=3)
    tree = build_tree(parents.to(DEVICE))
    oracle = path_oracle(q, k, v, parents, lens.cpu(), 0.3)
    assert_close(tree_attention(q, k, v, tree, lens, sm_scale=0.3, impl=impl), oracle, torch.float32)
    fp64 = tree_attention(q.double(), k.double(), v.double(), tree, lens, sm_scale=0.3, impl="torch")
    assert_close(fp64, oracle, torch.float64)


@pytest.mark.parametrize("impl, num_kv_splits", [("torch", None), ("triton", 1), ("triton", 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_softcap_vs_path_oracle(dtype, impl, num_kv_splits):
    """Gemma-2's attention soft-capping: scores cap * tanh(score / cap), in the prefix and the tree block,
    unsplit and split-KV. The queries are scaled up so that the cap changes the result."""
    q, k, v, parents, lens = make_case(2, 4, 2, 9, 64, [150, 3], dtype, per_seq_tree=True, seed=13)
    q = q * 4
    tree = build_tree(parents.to(DEVICE))
    out = tree_attention(q, k, v, tree, lens, softcap=5.0, num_kv_splits=num_kv_splits, impl=impl)
    expected = path_oracle(q, k, v, parents, lens.cpu(), 1 / math.sqrt(64), softcap=5.0)
    assert_close(out, expected, dtype)
    uncapped = path_oracle(q, k, v, parents, lens.cpu(), 1 / math.sqrt(64))
    assert (expected - uncapped).abs().max() > 0.1  # the cap matters at these scores


@pytest.mark.parametrize("impl, num_kv_splits", [("torch", None), ("triton", 1), ("triton", 3)])
@pytest.mark.parametrize("window", [1, 3, 12, 1000])
def test_sliding_window_vs_path_oracle(window, impl, num_kv_splits):
    """transformers' sliding window (node at position p sees keys at positions > p - window), in the prefix
    and inside the tree (deep nodes lose their far ancestors when the window is short), ragged prefixes,
    split-KV; with soft-capping too for one window."""
    q, k, v, parents, lens = make_case(2, 4, 2, 9, 64, [150, 3], torch.float32, per_seq_tree=True, seed=17)
    tree = build_tree(parents.to(DEVICE))
    assert tree.max_depth >= 3
    out = tree_attention(q, k, v, tree, lens, sliding_window=window, num_kv_splits=num_kv_splits, impl=impl)
    expected = path_oracle(q, k, v, parents, lens.cpu(), 1 / math.sqrt(64), window=window)
    assert_close(out, expected, torch.float32)
    if window == 12:
        out = tree_attention(q, k, v, tree, lens, sliding_window=window, softcap=2.0, num_kv_splits=num_kv_splits,
                             impl=impl)
        expected = path_oracle(q, k, v, parents, lens.cpu(), 1 / math.sqrt(64), softcap=2.0, window=window)
        assert_close(out, expected, torch.float32)


@pytest.mark.parametrize("impl, num_kv_splits", [("torch", None), ("triton", 1), ("triton", 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_attention_sinks_vs_path_oracle(dtype, impl, num_kv_splits):
    """gpt-oss's attention sinks: one logit per query head in the softmax's denominator (no value), with and
    without a sliding window, unsplit and split-KV (the sink enters once, in split 0)."""
    q, k, v, parents, lens = make_case(2, 4, 2, 9, 64, [150, 3], dtype, per_seq_tree=True, seed=23)
    sinks = torch.tensor([2.5, -1.0, 0.0, 4.0], device=DEVICE)
    tree = build_tree(parents.to(DEVICE))
    for window in (None, 6):
        out = tree_attention(q, k, v, tree, lens, sinks=sinks, sliding_window=window, num_kv_splits=num_kv_splits,
                             impl=impl)
        expected = path_oracle(q, k, v, parents, lens.cpu(), 1 / math.sqrt(64), window=window, sinks=sinks)
        assert_close(out, expected, dtype)
        without = path_oracle(q, k, v, parents, lens.cpu(), 1 / math.sqrt(64), window=window)
        assert (expected - without).abs().max() > 0.05  # the sinks matter at these logits


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("num_nodes", [4, 8])
def test_sliding_window_bf16_d128_configurations(num_nodes, softcap):
    """The 16-bit D = 128 window configurations (16 / 32 rows per KV group at Hq/Hkv = 4; with soft-capping
    the 32 rows take two 16-row blocks), against the float64 path oracle."""
    q, k, v, parents, lens = make_case(2, 8, 2, num_nodes, 128, [21, 6], torch.bfloat16, per_seq_tree=True,
                                       seed=19)
    tree = build_tree(parents.to(DEVICE))
    out = tree_attention(q, k, v, tree, lens, sliding_window=5, softcap=softcap, impl="triton")
    expected = path_oracle(q, k, v, parents, lens.cpu(), 1 / math.sqrt(128), softcap=softcap, window=5)
    assert_close(out, expected, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("num_nodes, head_dim", [(64, 128), (64, 64), (7, 128)])
def test_tree_attention_large_shapes_torch(num_nodes, head_dim, dtype):
    q, k, v, parents, lens = make_case(2, 4, 2, num_nodes, head_dim, [50, 0], dtype, per_seq_tree=True, seed=5)
    tree = build_tree(parents.to(DEVICE))
    expected = sdpa_reference(q, k, v, parents, lens.cpu(), 1 / math.sqrt(head_dim))
    assert_close(tree_attention(q, k, v, tree, lens, impl="torch"), expected, dtype)


def test_tree_attention_t64_d128_triton():
    q, k, v, parents, lens = make_case(1, 2, 1, 64, 128, [21], torch.bfloat16, per_seq_tree=False, seed=11)
    tree = build_tree(parents.to(DEVICE))
    expected = sdpa_reference(q, k, v, parents, lens.cpu(), 1 / math.sqrt(128))
    assert_close(tree_attention(q, k, v, tree, lens, impl="triton"), expected, torch.bfloat16)


@pytest.mark.parametrize("num_kv_splits", [1, 3, 8])
def test_split_kv_matches(num_kv_splits):
    # Ragged: sequence 1 has an empty prefix, so some splits see no key at all.
    q, k, v, parents, lens = make_case(2, 4, 2, 7, 64, [150, 0], torch.float32, per_seq_tree=True, seed=7)
    tree = build_tree(parents.to(DEVICE))
    out = tree_attention(q, k, v, tree, lens, num_kv_splits=num_kv_splits, impl="triton")
    assert_close(out, sdpa_reference(q, k, v, parents, lens.cpu(), 1 / math.sqrt(64)), torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_numpy_integer_options(impl):
    """``num_kv_splits`` and ``sliding_window`` as NumPy integers (read from a config array): the same output as
    Python ints (they were refused)."""
    q, k, v, parents, lens = make_case(2, 4, 2, 7, 16, [9, 3], torch.float32, per_seq_tree=True, seed=8)
    tree = build_tree(parents.to(DEVICE))
    splits = dict(num_kv_splits=2) if impl == "triton" else {}
    expected = tree_attention(q, k, v, tree, lens, sliding_window=5, impl=impl, **splits)
    as_numpy = {name: np.int64(value) for name, value in splits.items()}
    got = tree_attention(q, k, v, tree, lens, sliding_window=np.int32(5), impl=impl, **as_numpy)
    assert torch.equal(got, expected)


def test_split_heuristic():
    from distill_ops.kernels.tree_attention import choose_num_splits

    cpu = torch.device("cpu")
    assert choose_num_splits(base_programs=8, max_prefix=4096, device=cpu) > 1  # B=1, long prefix
    assert choose_num_splits(base_programs=8, max_prefix=200, device=cpu) == 1  # short prefix
    assert choose_num_splits(base_programs=512, max_prefix=16384, device=cpu) == 1  # big batch


# Row blocking (B, Hq, Hkv, T, D, cache_lens, per-sequence trees, (BLOCK_M, row blocks) for 16-bit inputs):
# one row block holds a whole KV group of up to 128 (head, node) rows, more rows take several blocks.
ROW_BLOCK_CASES = {
    "rows128-exact-d128": (2, 8, 2, 32, 128, [0, 77], True, (128, 1)),
    "rows104-T26-gqa4-d128": (2, 8, 2, 26, 128, [64, 31], False, (128, 1)),
    "rows160-two-blocks-d128": (2, 8, 2, 40, 128, [5, 90], True, (128, 2)),
    "rows208-T26-gqa8-d64": (1, 16, 2, 26, 64, [129], False, (128, 2)),
    "rows160-T80-two-words-d64": (1, 4, 2, 80, 64, [45], True, (128, 2)),
    "rows64-d128": (1, 8, 2, 16, 128, [70], True, (64, 1)),
    "rows4-T1-gqa4-d128": (2, 8, 2, 1, 128, [3, 40], False, (16, 1)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(ROW_BLOCK_CASES), ids=list(ROW_BLOCK_CASES))
def test_tree_attention_row_blocks(case, dtype):
    from distill_ops.kernels.tree_attention import _block_config

    batch, hq, hkv, num_nodes, head_dim, cache_lens, per_seq, (block_m, row_blocks) = ROW_BLOCK_CASES[case]
    rows = hq // hkv * num_nodes
    if dtype != torch.float32:  # the case must reach the row blocking it is named after
        config = _block_config(rows, head_dim, dtype)
        assert (config.block_m, math.ceil(rows / config.block_m)) == (block_m, row_blocks)
    q, k, v, parents, lens = make_case(batch, hq, hkv, num_nodes, head_dim, cache_lens, dtype,
                                       per_seq_tree=per_seq, seed=len(case))
    tree = build_tree(parents.to(DEVICE))
    out = tree_attention(q, k, v, tree, lens, num_kv_splits=1, impl="triton")
    assert_close(out, sdpa_reference(q, k, v, parents, lens.cpu(), 1 / math.sqrt(head_dim)), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("num_kv_splits", [2, 5, 32])
def test_split_kv_with_row_blocks(num_kv_splits, dtype):
    # 160 rows (two 128-row blocks for bf16, five 32-row blocks for fp32) times the splits; sequence 1's
    # prefix is empty, so all its splits but the first (which also holds the tree block) see no key.
    q, k, v, parents, lens = make_case(2, 8, 2, 40, 64, [300, 0], dtype, per_seq_tree=True, seed=13)
    tree = build_tree(parents.to(DEVICE))
    out = tree_attention(q, k, v, tree, lens, num_kv_splits=num_kv_splits, impl="triton")
    assert_close(out, sdpa_reference(q, k, v, parents, lens.cpu(), 1 / math.sqrt(64)), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_split_kv_chosen_by_heuristic(dtype, monkeypatch):
    import distill_ops.kernels.tree_attention as kernels

    heuristic = kernels.choose_num_splits
    chosen = []

    def recording_choose_num_splits(*args, **kwargs):
        chosen.append(heuristic(*args, **kwargs))
        return chosen[-1]

    monkeypatch.setattr(kernels, "choose_num_splits", recording_choose_num_splits)
    # A long ragged prefix at batch 2: the unsplit grid leaves most SMs idle, so the heuristic splits.
    q, k, v, parents, lens = make_case(2, 8, 2, 26, 64, [1100, 517], dtype, per_seq_tree=True, seed=17)
    tree = build_tree(parents.to(DEVICE))
    out = tree_attention(q, k, v, tree, lens, impl="triton")
    assert len(chosen) == 1 and chosen[0] > 1
    assert_close(out, sdpa_reference(q, k, v, parents, lens.cpu(), 1 / math.sqrt(64)), dtype)


def test_split_heuristic_model():
    from distill_ops.kernels.tree_attention import MAX_SPLITS, MIN_SPLIT_LEN, choose_num_splits

    cpu = torch.device("cpu")  # DEFAULT_SM_COUNT = 132 SMs
    # The docstring's examples (Hkv = 8, one 128-row block per KV head, bf16).
    assert choose_num_splits(base_programs=64, max_prefix=4096, device=cpu) == 2  # B = 8: 128 programs
    assert choose_num_splits(base_programs=8, max_prefix=16384, device=cpu) == 16  # B = 1: 128 programs
    assert choose_num_splits(base_programs=128, max_prefix=4096, device=cpu) == 1  # B = 16: one wave
    # Capped by the chunk length and by MAX_SPLITS.
    assert choose_num_splits(base_programs=1, max_prefix=3 * MIN_SPLIT_LEN + 5, device=cpu) == 3
    assert choose_num_splits(base_programs=1, max_prefix=10**6, device=cpu) == MAX_SPLITS
    assert choose_num_splits(base_programs=1, max_prefix=2 * MIN_SPLIT_LEN - 1, device=cpu) == 1
    # The partial-output traffic of a split counts: 100 programs (76 % of one wave) split only when the
    # prefix is long enough for 5 splits (500 programs in 4 waves: 0.8 of the unsplit critical path) to pay
    # for their partial outputs.
    assert choose_num_splits(base_programs=100, max_prefix=4096, device=cpu) == 1
    assert choose_num_splits(base_programs=100, max_prefix=32768, device=cpu) == 5
    assert choose_num_splits(base_programs=64, max_prefix=1024, device=cpu) == 2
    assert choose_num_splits(base_programs=64, max_prefix=1024, device=cpu, partial_keys=4096) == 1


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_kv(impl):
    q, k, v, parents, lens = make_case(2, 4, 2, 7, 64, [5, 11], torch.float32, per_seq_tree=False, seed=9)
    # A [B, S, H, D] cache viewed as [B, H, S, D].
    k_bshd, v_bshd = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
    tree = build_tree(parents.to(DEVICE))
    out = tree_attention(q, k_bshd.transpose(1, 2), v_bshd.transpose(1, 2), tree, lens, impl=impl)
    assert_close(out, sdpa_reference(q, k, v, parents, lens.cpu(), 1 / math.sqrt(64)), torch.float32)


def test_torch_compile_fullgraph():
    q, k, v, parents, lens = make_case(2, 4, 2, 7, 64, [5, 11], torch.float32, per_seq_tree=True, seed=1)
    tree = build_tree(parents.to(DEVICE))

    def step(q, k, v, lens):
        return tree_attention(q, k, v, tree, lens, impl="torch") * 2

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    assert_close(compiled(q, k, v, lens), step(q, k, v, lens), torch.float32)


class _OpNames(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("impl", IMPLS)
def test_eager_calls_skip_the_dispatcher(impl):
    """Eager calls with nothing to differentiate (a decoder's forwards) run the op's body directly, not the
    ``distill_ops::tree_attention`` custom op (whose dispatch costs host time in every layer); where autograd could
    record (q requiring a gradient), and under torch.compile (test above), the custom op runs. Same outputs."""
    q, k, v, parents, lens = make_case(2, 4, 2, 7, 64, [5, 11], torch.float32, per_seq_tree=False, seed=3)
    tree = build_tree(parents.to(DEVICE))
    with torch.inference_mode(), _OpNames() as eager:
        direct = tree_attention(q, k, v, tree, lens, impl=impl)
    with _OpNames() as recorded:
        through_op = tree_attention(q.clone().requires_grad_(True), k, v, tree, lens, impl=impl)
    assert "distill_ops.tree_attention.default" not in eager.names
    assert "distill_ops.tree_attention.default" in recorded.names
    assert torch.equal(direct, through_op.detach())


@pytest.mark.parametrize("num_kv_splits", [1, 2])
@pytest.mark.parametrize("impl", IMPLS)
def test_out_buffer_in_the_layout_transformers_returns(impl, num_kv_splits):
    """``out=`` a transposed ``[B, T, Hq, D]`` buffer: the same values as a plain call, written into it (split-KV's
    merge too), so ``out.transpose(1, 2)`` is the contiguous ``[B, T, Hq, D]`` an attention function returns."""
    q, k, v, parents, lens = make_case(2, 4, 2, 7, 64, [40, 11], torch.float32, per_seq_tree=True, seed=4)
    tree = build_tree(parents.to(DEVICE))
    splits = dict(num_kv_splits=num_kv_splits) if impl == "triton" else {}
    expected = tree_attention(q, k, v, tree, lens, impl=impl, **splits)
    buffer = torch.full((2, 7, 4, 64), float("nan"), device=DEVICE)
    with torch.inference_mode():
        out = tree_attention(q, k, v, tree, lens, impl=impl, out=buffer.transpose(1, 2), **splits)
    assert out.data_ptr() == buffer.data_ptr() and out.transpose(1, 2).is_contiguous()
    assert torch.equal(buffer.transpose(1, 2), expected)
    # Strides that are not multiples of 16 elements (the kernel's store assumption): written through a copy.
    padded = torch.full((2, 4, 7, 72), float("nan"), device=DEVICE)
    with torch.inference_mode():
        out = tree_attention(q, k, v, tree, lens, impl=impl, out=padded[..., 3:67], **splits)
    assert out.data_ptr() == padded[..., 3:67].data_ptr() and torch.equal(out, expected)
    assert torch.isnan(padded[..., :3]).all() and torch.isnan(padded[..., 67:]).all()
    with pytest.raises(ValueError, match="out must have q's shape"):
        tree_attention(q, k, v, tree, lens, impl=impl, out=buffer)
    with pytest.raises(TypeError, match="out"):
        tree_attention(q, k, v, tree, lens, impl=impl, out=buffer.transpose(1, 2).double())


@pytest.mark.parametrize("impl", IMPLS)
def test_out_buffers_that_cannot_hold_the_result_are_refused(impl):
    """An input-contract audit (2026-12-07): an ``expand()``ed ``out`` (rows sharing memory) was stored into
    silently by the kernel, every sequence's rows overwriting the others' (the PyTorch path failed inside
    ``copy_``); an ``out`` that requires grad was written outside autograd by the kernel (the PyTorch path failed
    inside ``copy_`` with autograd's leaf error). Both are refused by name, before anything is written."""
    q, k, v, parents, lens = make_case(2, 4, 2, 7, 64, [5, 11], torch.float32, per_seq_tree=False, seed=3)
    tree = build_tree(parents.to(DEVICE))
    shared = torch.full((1, 4, 7, 64), float("nan"), device=DEVICE)
    with pytest.raises(ValueError, match=r"out must not have overlapping elements .* strides \(0, 448, 64, 1\)"):
        tree_attention(q, k, v, tree, lens, impl=impl, out=shared.expand(2, 4, 7, 64))
    assert torch.isnan(shared).all()
    leaf = torch.full((2, 4, 7, 64), float("nan"), device=DEVICE, requires_grad=True)
    with pytest.raises(ValueError, match="out must not require grad"):
        tree_attention(q, k, v, tree, lens, impl=impl, out=leaf)
    assert torch.isnan(leaf.detach()).all()
    with torch.no_grad():  # where autograd records nothing, such a buffer is the caller's to overwrite
        out = tree_attention(q, k, v, tree, lens, impl=impl, out=leaf)
    assert torch.equal(out.detach(), tree_attention(q, k, v, tree, lens, impl=impl))


# From a mutation audit: K and V of different layouts, a prefix that fills the cache under split-KV, cache lengths
# the GPU path does not check (negative, past S - T), and one tree shared by a batch under a sliding window.


@pytest.mark.parametrize("num_kv_splits", [1, 2])
@pytest.mark.parametrize("impl", IMPLS)
def test_k_and_v_with_different_layouts(impl, num_kv_splits):
    """K a contiguous [B, Hkv, S, D] cache, V a [B, S, Hkv, D] one viewed as [B, Hkv, S, D]: each is read with its
    own strides (the existing layout test gives K and V the same strides)."""
    q, k, v, parents, lens = make_case(2, 4, 2, 7, 64, [5, 40], torch.float32, per_seq_tree=True, seed=5)
    v_view = v.transpose(1, 2).contiguous().transpose(1, 2)
    assert v_view.stride() != k.stride()
    tree = build_tree(parents.to(DEVICE))
    splits = dict(num_kv_splits=num_kv_splits) if impl == "triton" else {}
    out = tree_attention(q, k, v_view, tree, lens, impl=impl, **splits)
    assert_close(out, sdpa_reference(q, k, v, parents, lens.cpu(), 1 / math.sqrt(64)), torch.float32)


@pytest.mark.parametrize("num_kv_splits", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_split_kv_covers_a_prefix_that_fills_the_cache(dtype, num_kv_splits):
    """cache_len = S - T (no slack after the tree) with a prefix one key past a multiple of the split length: the
    splits must cover the last prefix key (the existing split tests keep 3 spare rows after the tree)."""
    q, k, v, parents, lens = make_case(1, 4, 2, 5, 64, [129], dtype, per_seq_tree=False, seed=21, extra_kv=0)
    assert k.shape[2] == 129 + 5
    tree = build_tree(parents.to(DEVICE))
    out = tree_attention(q, k, v, tree, lens, num_kv_splits=num_kv_splits, impl="triton")
    assert_close(out, sdpa_reference(q, k, v, parents, lens.cpu(), 1 / math.sqrt(64)), dtype)


@pytest.mark.parametrize("num_kv_splits", [1, 2])
def test_kernel_reads_a_negative_cache_len_as_zero(num_kv_splits):
    """A negative cache_len (unchecked on a GPU, where the check would synchronise) is clamped to 0 in the kernel:
    the tree keys are read from the sequence's own rows 0 .. T-1, never from the rows before it (here the last rows
    of the previous sequence in the buffer K/V are views of)."""
    from distill_ops.kernels.tree_attention import tree_attention_forward

    q, k, v, parents, lens = make_case(3, 4, 2, 7, 64, [0, 0, 150], torch.float32, per_seq_tree=True, seed=12)
    q, k, v, parents = q[1:], k[1:], v[1:], parents[1:]  # K/V views starting one sequence into their buffers
    tree = build_tree(parents.to(DEVICE))
    cache_lens = torch.tensor([-3, 150], dtype=torch.int32, device=DEVICE)
    out = tree_attention_forward(q, k, v, tree.ancestor_mask.contiguous(), cache_lens, 1 / math.sqrt(64),
                                 num_kv_splits)
    expected = sdpa_reference(q, k, v, parents, torch.tensor([0, 150]), 1 / math.sqrt(64))
    assert_close(out, expected, torch.float32)


@pytest.mark.parametrize("num_kv_splits", [1, 2])
def test_kernel_never_reads_keys_past_the_cache(num_kv_splits):
    """A cache_len past S - T (unchecked on a GPU) must not make the kernel read rows at or past S: K/V are views of
    longer buffers whose extra rows are NaN. The prefix is cut at S and the tree keys (all at >= S) are skipped, so
    every node attends to the S cached keys."""
    from distill_ops.kernels.tree_attention import tree_attention_forward

    q, k, v, parents, _ = make_case(1, 4, 2, 5, 64, [140], torch.float32, per_seq_tree=False, seed=14, extra_kv=0)
    kv_len = k.shape[2]
    big_k, big_v = (torch.cat([t, torch.full_like(t[:, :, :16], float("nan"))], 2) for t in (k, v))
    tree = build_tree(parents.to(DEVICE))
    cache_lens = torch.tensor([kv_len + 7], dtype=torch.int32, device=DEVICE)
    out = tree_attention_forward(q, big_k[:, :, :kv_len], big_v[:, :, :kv_len], tree.ancestor_mask.contiguous(),
                                 cache_lens, 1 / math.sqrt(64), num_kv_splits)
    assert torch.isfinite(out).all()
    k64, v64 = (t.double().cpu().repeat_interleave(2, 1) for t in (k, v))
    expected = torch.softmax(q.double().cpu() @ k64.transpose(-1, -2) / math.sqrt(64), -1) @ v64
    assert_close(out, expected, torch.float32)


@pytest.mark.parametrize("impl, num_kv_splits", [("torch", None), ("triton", 1), ("triton", 3)])
def test_sliding_window_with_one_tree_shared_by_the_batch(impl, num_kv_splits):
    """A sliding window with one TreeSpec shared by three sequences (depth [1, T]): every sequence reads the shared
    depths (the existing window tests all use per-sequence trees)."""
    q, k, v, parents, lens = make_case(3, 4, 2, 9, 64, [150, 3, 20], torch.float32, per_seq_tree=False, seed=17)
    tree = build_tree(parents.to(DEVICE))
    assert tree.batch_size == 1 and tree.max_depth >= 3
    splits = dict(num_kv_splits=num_kv_splits) if impl == "triton" else {}
    out = tree_attention(q, k, v, tree, lens, sliding_window=3, impl=impl, **splits)
    assert_close(out, path_oracle(q, k, v, parents, lens.cpu(), 1 / math.sqrt(64), window=3), torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_rows_no_node_sees_never_reach_the_output(impl):
    """K / V rows past each sequence's cache_len + T (ragged lengths: the shorter sequence's padding) filled with
    NaN, as an uninitialised cache may hold: both impls return the attention over the rows the nodes see (the
    PyTorch path multiplied those rows' zero weights by NaN: a NaN output)."""
    q, k, v, parents, lens = make_case(2, 4, 2, 7, 64, [5, 40], torch.float32, per_seq_tree=True, seed=31)
    expected = sdpa_reference(q, k, v, parents, lens.cpu(), 1 / math.sqrt(64))
    for b, length in enumerate(lens.tolist()):
        k[b, :, length + 7:] = float("nan")
        v[b, :, length + 7:] = float("nan")
    out = tree_attention(q, k, v, build_tree(parents.to(DEVICE)), lens, impl=impl)
    assert_close(out, expected, torch.float32)


def test_bad_inputs():
    q, k, v, parents, lens = make_case(2, 4, 2, 7, 64, [5, 11], torch.float32, per_seq_tree=False, seed=1)
    tree = build_tree(parents.to(DEVICE))
    with pytest.raises(ValueError, match="multiple of the KV heads"):
        tree_attention(q[:, :3], k, v, tree, lens, impl="torch")
    with pytest.raises(ValueError, match="tree has 7 nodes but q has T=6"):
        tree_attention(q[:, :, :6], k, v, tree, lens, impl="torch")
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        tree_attention(q, k, v[:, :, :-1], tree, lens, impl="torch")
    with pytest.raises(ValueError, match=r"k must have shape \[B=2, Hkv, S, D=64\]"):
        tree_attention(q, k[..., :32], v[..., :32], tree, lens, impl="torch")
    with pytest.raises(TypeError, match="share a dtype"):
        tree_attention(q, k.half(), v.half(), tree, lens, impl="torch")
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="softcap"):
            tree_attention(q, k, v, tree, lens, softcap=bad, impl="torch")
    for bad in (float("nan"), float("inf")):  # both gave a NaN output
        with pytest.raises(ValueError, match=r"sm_scale must be in \(-inf, inf\)"):
            tree_attention(q, k, v, tree, lens, sm_scale=bad, impl="torch")
    with pytest.raises(TypeError, match="sm_scale must be a Python int or float"):
        tree_attention(q, k, v, tree, lens, sm_scale="0.1", impl="torch")
    for impl in IMPLS:  # a cap whose 2 * scale / cap overflows fp32 (the kernel made zero scores NaN)
        with pytest.raises(ValueError, match="softcap=1e-40 is too small for sm_scale"):
            tree_attention(q, k, v, tree, lens, softcap=1e-40, impl=impl)
    for impl in IMPLS:  # D = 0 (a ZeroDivisionError in the default scale on the PyTorch path)
        with pytest.raises(ValueError, match=r"q must have a head dim D >= 1 \(q.shape\[3\]\)"):
            tree_attention(q[..., :0], k[..., :0], v[..., :0], tree, lens, impl=impl)
    for bad in (0, -3):
        with pytest.raises(ValueError, match=f"sliding_window must be >= 1, got {bad}"):
            tree_attention(q, k, v, tree, lens, sliding_window=bad, impl="torch")
    for bad in (2.5, True):
        with pytest.raises(TypeError, match="sliding_window must be an int or None"):
            tree_attention(q, k, v, tree, lens, sliding_window=bad, impl="torch")
    with pytest.raises(ValueError, match=r"sinks must have shape \[Hq=4\]"):
        tree_attention(q, k, v, tree, lens, sinks=torch.zeros(2, device=DEVICE), impl="torch")
    with pytest.raises(TypeError, match="sinks"):
        tree_attention(q, k, v, tree, lens, sinks=torch.zeros(4, dtype=torch.int64, device=DEVICE), impl="torch")
    with pytest.raises(ValueError, match="cache_lens must have shape"):
        tree_attention(q, k, v, tree, lens[:1], impl="torch")
    with pytest.raises(TypeError, match="cache_lens must have dtype"):
        tree_attention(q, k, v, tree, lens.float(), impl="torch")
    with pytest.raises(TypeError, match="tree must be a TreeSpec"):
        tree_attention(q, k, v, parents, lens, impl="torch")
    with pytest.raises(ValueError, match="1 or B=2 trees"):
        tree_attention(q, k, v, build_tree(torch.stack([parents[0]] * 3).to(DEVICE)), lens, impl="torch")
    too_long = torch.tensor([5, k.shape[2] - 6], device=DEVICE)
    if DEVICE.type == "cpu":
        for impl in IMPLS:
            with pytest.raises(ValueError, match=r"cache_lens \+ T must be <= S"):
                tree_attention(q, k, v, tree, too_long, impl=impl)
    with pytest.raises(ValueError, match="impl must be one of"):
        tree_attention(q, k, v, tree, lens, impl="cuda")
    with pytest.raises(ValueError, match="num_kv_splits"):
        tree_attention(q, k, v, tree, lens, num_kv_splits=0, impl="triton")
    with pytest.raises(ValueError, match="head dim"):
        tree_attention(q[..., :48], k[..., :48], v[..., :48], tree, lens, impl="triton")


def test_float32_head_dim_256_runs_on_the_torch_path():
    """No fp32 D = 256 Triton configuration is spill-free and fits an A100's shared memory: impl="triton" refuses
    it with the reason, 16-bit D = 256 stays on Triton, and the torch path computes it."""
    q, k, v, parents, lens = make_case(1, 2, 1, 5, 256, [3], torch.float32, per_seq_tree=False, seed=2)
    tree = build_tree(parents.to(DEVICE))
    with pytest.raises(ValueError, match=r"float32 q/k/v up to D=128, got D=256"):
        tree_attention(q, k, v, tree, lens, impl="triton")
    out = tree_attention(q, k, v, tree, lens, impl="auto")
    assert_close(out, sdpa_reference(q, k, v, parents, lens.cpu(), 1 / 16), torch.float32)
    half = [t.to(torch.bfloat16) for t in (q, k, v)]
    out = tree_attention(*half, tree, lens, impl="triton")
    assert_close(out, sdpa_reference(*half, parents, lens.cpu(), 1 / 16), torch.bfloat16)


@pytest.mark.parametrize("head_dim, dtype", [(24, torch.float32), (96, torch.bfloat16), (64, torch.float64)], ids=str)
def test_auto_takes_the_torch_path_for_what_the_kernel_does_not_cover(head_dim, dtype, monkeypatch):
    """On CUDA impl="auto" resolves to Triton, which raised for D outside {16, 32, 64, 128, 256} (Phi-3-mini's and
    GPT-NeoX-20B's 96, Phi-2's 80) and for float64, after the engine's prefill. CUDA's resolution is emulated here
    (the module's resolve_impl answers "triton"); "auto" must run such inputs on the PyTorch path."""
    import sys

    module = sys.modules["distill_ops.tree_attention"]
    monkeypatch.setattr(module, "resolve_impl", lambda impl, device: "torch" if impl == "torch" else "triton")
    q, k, v, parents, lens = make_case(2, 4, 2, 6, head_dim, [3, 5], dtype, per_seq_tree=False, seed=3)
    tree = build_tree(parents.to(DEVICE))
    if dtype != torch.float64:
        with pytest.raises((ValueError, TypeError), match="impl='triton' needs"):
            tree_attention(q, k, v, tree, lens, impl="triton")
    out = tree_attention(q, k, v, tree, lens, impl="auto")
    assert_close(out, sdpa_reference(q, k, v, parents, lens.cpu(), head_dim**-0.5), dtype)


@pytest.mark.parametrize("impl, num_kv_splits", [(impl, 1) for impl in IMPLS] + [("triton", 2)])  # splits: Triton's
def test_every_argument_in_every_layout(impl, num_kv_splits):
    """A layout audit (2026-12-07): q, k, v, cache_lens, sinks and the spec's ancestor mask and depth given at a
    storage offset, as a slice of a wider last dim (padded rows), with stride 2 along the last dim, transposed,
    leading dims permuted, and (the cache, lengths and trees shared by the batch) expand()ed with stride 0 over the
    batch: the output is the path oracle's, and no input's storage (the view's padding included) is written."""
    import dataclasses

    from tests._layouts import bit_equal, layout_calls

    gen = torch.Generator().manual_seed(94)
    q = torch.randn(2, 4, 7, 16, generator=gen).to(DEVICE)
    k, v = (torch.randn(1, 2, 40, 16, generator=gen).expand(2, 2, 40, 16).contiguous().to(DEVICE) for _ in range(2))
    parents = random_parents(7, 95).expand(2, 7)
    tree = build_tree(parents.contiguous().to(DEVICE))
    lens = torch.tensor([33, 33], device=DEVICE)
    sinks = torch.randn(4, generator=gen).to(DEVICE)
    inputs = dict(q=q, k=k, v=v, cache_lens=lens, sinks=sinks, ancestor_mask=tree.ancestor_mask, depth=tree.depth)
    expected = path_oracle(q, k, v, parents, lens.cpu(), 0.25, window=20, sinks=sinks)
    splits = dict(num_kv_splits=num_kv_splits) if impl == "triton" else {}
    for name, layout, args, base, _ in layout_calls(inputs, inputs, shared=("k", "v", "cache_lens", "ancestor_mask",
                                                                            "depth")):
        before = base.clone()
        spec = dataclasses.replace(tree, ancestor_mask=args["ancestor_mask"], depth=args["depth"])
        out = tree_attention(args["q"], args["k"], args["v"], spec, args["cache_lens"], sinks=args["sinks"],
                             sliding_window=20, impl=impl, **splits)
        assert_close(out, expected, torch.float32, f"{name} {layout}")
        assert bit_equal(base, before), f"{name} {layout}: the input's storage was written"
