"""Greedy / lossless-sampling verification and KV compaction."""

import dataclasses
import random

import numpy as np
import pytest
import torch

from tests._verify_reference import sampling_reference
from tests.conftest import DEVICE, IMPLS
from distill_ops.tree import build_tree
from distill_ops.verify import VerifyResult, compact_kv_cache, nan_as_neg_inf, verify_greedy, verify_sampling


def random_tree_and_tokens(num_nodes, vocab, logits, rng):
    """A random tree whose siblings carry distinct tokens; each child copies its parent's target argmax
    with probability 0.6 so that long accepted paths occur."""
    batch = logits.shape[0]
    argmax = logits.argmax(-1)
    parents = [-1] + [rng.randrange(max(0, i - 5), i) for i in range(1, num_nodes)]
    tokens = torch.zeros(batch, num_nodes, dtype=torch.int64)
    for b in range(batch):
        tokens[b, 0] = rng.randrange(vocab)
        used = {}
        for i in range(1, num_nodes):
            taken = used.setdefault(parents[i], set())
            wanted = int(argmax[b, parents[i]])
            token = wanted if wanted not in taken and rng.random() < 0.6 else rng.choice(
                [t for t in range(vocab) if t not in taken and t != wanted])
            taken.add(token)
            tokens[b, i] = token
    return torch.tensor(parents), tokens


def brute_force_greedy(parents, tokens, logits):
    """EAGLE's rule: over every leaf path, the longest prefix whose tokens equal the target argmax."""
    argmax = logits.double().argmax(-1)
    num_nodes = len(parents)
    children = [[j for j in range(num_nodes) if parents[j] == i] for i in range(num_nodes)]
    rows = []
    for b in range(tokens.shape[0]):
        best = [0]
        for leaf in (i for i in range(num_nodes) if not children[i]):
            path = [leaf]
            while parents[path[-1]] >= 0:
                path.append(parents[path[-1]])
            path = path[::-1]
            n = 1
            while n < len(path) and int(tokens[b, path[n]]) == int(argmax[b, path[n - 1]]):
                n += 1
            if n > len(best):
                best = path[:n]
        rows.append((best, int(argmax[b, best[-1]])))
    return rows


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("num_nodes, vocab", [(1, 50), (7, 50), (26, 1000), (64, 37)])
def test_greedy_vs_brute_force(num_nodes, vocab, dtype, impl):
    rng = random.Random(num_nodes * 7 + vocab)
    gen = torch.Generator().manual_seed(num_nodes)
    batch = 5
    logits = (torch.randn(batch, num_nodes, vocab, generator=gen) * 4).to(dtype)
    parents, tokens = random_tree_and_tokens(num_nodes, vocab, logits.float(), rng)
    tree = build_tree(parents.to(DEVICE))
    result = verify_greedy(tree, tokens.to(DEVICE), logits.to(DEVICE), impl=impl)
    width = tree.max_depth + 1
    for b, (path, bonus) in enumerate(brute_force_greedy(parents.tolist(), tokens, logits.float())):
        assert result.accepted_nodes[b].tolist() == path + [-1] * (width - len(path))
        assert result.accept_len[b].item() == len(path) - 1
        assert result.next_tokens[b].item() == bonus
        emitted = [int(tokens[b, n]) for n in path[1:]] + [bonus]
        assert result.emitted_tokens[b].tolist() == emitted + [-1] * (width - len(emitted))


def test_greedy_per_sequence_trees_and_non_contiguous_logits():
    rng = random.Random(0)
    batch, num_nodes, vocab = 3, 12, 40
    logits = torch.randn(batch, vocab, num_nodes).transpose(1, 2) * 4  # stride along V is not 1
    trees, token_rows = [], []
    for b in range(batch):
        parents, tokens = random_tree_and_tokens(num_nodes, vocab, logits[b:b + 1], rng)
        trees.append(parents)
        token_rows.append(tokens)
    tree = build_tree(torch.stack(trees).to(DEVICE))
    tokens = torch.cat(token_rows).to(DEVICE)
    results = [verify_greedy(tree, tokens, logits.to(DEVICE), impl=impl) for impl in IMPLS]
    for b in range(batch):
        (path, bonus), = brute_force_greedy(trees[b].tolist(), token_rows[b], logits[b:b + 1])
        for result in results:
            assert result.accepted_nodes[b, : len(path)].tolist() == path and result.next_tokens[b] == bonus


def test_verify_trees_held_as_views():
    """A TreeSpec may hold views: parents sliced from a wider buffer (tree_spec_from_parents_tensor keeps them),
    next to a depth tensor with another batch stride. Both verifiers must read each tree's own rows."""
    from distill_ops.tree import tree_spec_from_parents_tensor

    rng = random.Random(3)
    batch, num_nodes, vocab = 2, 6, 16
    logits = torch.randn(batch, num_nodes, vocab, generator=torch.Generator().manual_seed(3)) * 4
    trees, token_rows = [], []
    for b in range(batch):
        parents, tokens = random_tree_and_tokens(num_nodes, vocab, logits[b:b + 1], rng)
        trees.append(parents)
        token_rows.append(tokens)
    wide = torch.full((batch, num_nodes + 5), -1, dtype=torch.int64)
    wide[:, :num_nodes] = torch.stack(trees)
    tokens = torch.cat(token_rows).to(DEVICE)
    logits = logits.to(DEVICE)
    want = [verify_greedy(build_tree(torch.stack(trees).to(DEVICE)), tokens, logits, impl="torch")]
    for impl in ("torch", "triton"):
        spec = tree_spec_from_parents_tensor(wide.to(DEVICE)[:, :num_nodes], num_nodes - 1, num_nodes - 1, impl=impl)
        assert not spec.parents.is_contiguous()
        for verify in (verify_greedy, verify_sampling):
            kwargs = {} if verify is verify_greedy else {"generator": torch.Generator(DEVICE).manual_seed(5)}
            got = [verify(spec, tokens, logits, impl=impl, **kwargs) for impl in IMPLS]
            for result in got[1:]:
                for name in ("accepted_nodes", "accept_len", "next_tokens", "emitted_tokens"):
                    assert torch.equal(getattr(result, name), getattr(got[0], name)), (verify.__name__, name)
            if verify is verify_greedy:
                for name in ("accepted_nodes", "accept_len", "next_tokens"):
                    width = want[0].accepted_nodes.shape[1]
                    ours = getattr(got[0], name)
                    ours = ours[:, :width] if ours.dim() == 2 else ours
                    assert torch.equal(ours, getattr(want[0], name)), name


@pytest.mark.parametrize("cache_len", [8, 7])
def test_compact_kv_kernel_never_writes_past_the_cache(cache_len):
    """On a GPU the cache_lens + W <= S check is skipped (it would synchronise): the kernel itself must not read
    or write rows at or past S. K/V are views of longer buffers whose extra rows must stay untouched, and no row
    inside is overwritten from one past S."""
    from distill_ops.kernels.tree_verify import compact_kv_forward

    heads, kv_len, dim = 2, 10, 8
    big_k = torch.randn(1, heads, kv_len + 4, dim, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    big_v = torch.randn(1, heads, kv_len + 4, dim, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    before_k, before_v = big_k.clone(), big_v.clone()
    k, v = big_k[:, :, :kv_len], big_v[:, :, :kv_len]
    # Path root -> node 1 -> node 3: at cache_len 8 slot 2 would move row 11 to row 10, both past S = 10; at
    # cache_len 7 row 10 (past S) to row 9 (inside).
    accepted = torch.tensor([[0, 1, 3]], dtype=torch.int64, device=DEVICE)
    cache_lens = torch.tensor([cache_len], dtype=torch.int32, device=DEVICE)
    new_lens = compact_kv_forward([k], [v], accepted, cache_lens)
    assert new_lens.tolist() == [cache_len + 3]
    assert torch.equal(big_k, before_k) and torch.equal(big_v, before_v)


def test_greedy_walk_never_writes_past_its_rows(monkeypatch):
    """A spec whose max_depth understates the tree (tree_spec_from_parents_tensor trusts its bound, and an invalid
    parent array gives depths it does not check) must not make the walk write past its result rows: on a GPU that
    wrote into other memory. The result tensors are allocated inside guard bands that must stay untouched."""
    tree = build_tree(torch.tensor([-1, 0, 1, 2], device=DEVICE))  # a chain of depth 3
    tokens = torch.tensor([[5, 1, 2, 3]], device=DEVICE)
    logits = torch.full((1, 4, 8), -5.0, device=DEVICE)
    logits[0, torch.arange(4), torch.tensor([1, 2, 3, 4])] = 5.0  # every draft accepted, bonus 4
    guarded, (accepted, _, _, emitted) = _greedy_walk_in_guarded_buffers(monkeypatch, tree, tokens, logits, 2)
    assert guarded and all(bool((buffer[-16:] == -7).all()) for buffer in guarded)
    assert accepted.tolist() == [[0, 1]] and emitted.tolist() == [[1, 2]]  # the first slots, truncated


def _guard_result_buffers(patch) -> list:
    """Make the Triton verify launchers' torch.empty / empty_like results views of -7-filled buffers followed by a
    guard band of 16 entries of -7 (``patch``: a monkeypatch context); returns the list the buffers go into."""
    from distill_ops.kernels import tree_verify as tree_verify_module

    guarded, real_empty = [], torch.empty

    def empty_with_guards(*size, dtype=None, device=None, **kwargs):
        shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
        count = int(np.prod(shape)) if shape else 1
        buffer = real_empty(count + 16, dtype=dtype, device=device).fill_(-7)
        guarded.append(buffer)
        return buffer[:count].view(shape)

    patch.setattr(tree_verify_module.torch, "empty", empty_with_guards)
    patch.setattr(tree_verify_module.torch, "empty_like",
                  lambda t, **kw: empty_with_guards(t.shape, dtype=t.dtype, device=t.device))
    return guarded


def _greedy_walk_in_guarded_buffers(monkeypatch, tree, tokens, logits, out_width):
    """The Triton greedy launcher with guarded result buffers: returns the buffers and the launcher's outputs."""
    from distill_ops.kernels.tree_verify import verify_greedy_forward

    with monkeypatch.context() as patch:
        guarded = _guard_result_buffers(patch)
        outputs = verify_greedy_forward(tree.parents, tree.depth, tree.ancestor_mask, tokens, logits, out_width)
    return guarded, outputs


def test_greedy_walk_writes_every_result_slot_of_an_inconsistent_spec(monkeypatch):
    """A hand-built TreeSpec whose ancestor mask disagrees with its parents (here: every bit set) has no meaningful
    result, but the walk must still write every slot of its rows: it left slots of the torch.empty outputs unwritten
    and the results changed from call to call (uninitialised memory). The consistent spec's result is unchanged."""
    tree = build_tree(torch.tensor([-1, 0, 1], device=DEVICE))
    tokens = torch.tensor([[0, 3, 3]], device=DEVICE)
    logits = torch.zeros(1, 3, 8, device=DEVICE)
    logits[0, :, 3] = 1.0
    bad = dataclasses.replace(tree, ancestor_mask=torch.ones_like(tree.ancestor_mask))
    for spec in (bad, tree):
        _, (accepted, accept_len, _, emitted) = _greedy_walk_in_guarded_buffers(monkeypatch, spec, tokens, logits, 3)
        assert not bool((accepted == -7).any()) and not bool((emitted == -7).any()), (accepted, emitted)
        assert bool((accepted >= -1).all() & (accepted < 3).all()), accepted
    assert accepted.tolist() == [[0, 1, 2]] and emitted.tolist() == [[3, 3, 3]] and accept_len.tolist() == [2]


def test_greedy_walk_of_an_invalid_parent_array_stays_in_bounds():
    """tree_spec_from_parents_tensor does not validate the values (that would read them): a parent index past the
    tree made the Triton walk read the argmax buffer a million entries out (the interpreter segfaulted). Run in a
    subprocess so that a crash fails the test instead of ending the session."""
    import subprocess
    import sys

    script = (
        "import os; os.environ['TRITON_INTERPRET'] = '1'\n"
        "import torch\n"
        "from distill_ops import verify_greedy\n"
        "from distill_ops.tree import tree_spec_from_parents_tensor\n"
        "spec = tree_spec_from_parents_tensor(torch.tensor([-1, 0, 1000000]), max_depth=1, max_children=1,"
        " impl='torch')\n"
        "result = verify_greedy(spec, torch.tensor([[5, 1, 2]]), torch.randn(1, 3, 8), impl='triton')\n"
        "print('ran', tuple(result.accepted_nodes.shape))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ran (1, 2)" in done.stdout, (done.returncode, done.stderr[-2000:])


def test_compact_kv_kernel_moves_nothing_for_a_negative_cache_len():
    """A negative cache_len (unchecked on a GPU) leaves that sequence's rows, and every other sequence's, as they
    were: the kernel moved its row cache_len + node to cache_len + slot, which for cache_len = -3 lands in
    another sequence's rows, or before the tensor's start for the first sequence of a view."""
    from distill_ops.kernels.tree_verify import compact_kv_forward

    heads, kv_len, dim = 2, 10, 8
    big_k = torch.randn(3, heads, kv_len, dim, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    big_v = torch.randn(3, heads, kv_len, dim, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    before_k, before_v = big_k.clone(), big_v.clone()
    k, v = big_k[1:], big_v[1:]  # the negative sequence is the view's first: row -1 would be big_k[0]'s last
    accepted = torch.tensor([[0, 2, 3], [0, 2, 3]], dtype=torch.int64, device=DEVICE)
    cache_lens = torch.tensor([-3, 2], dtype=torch.int32, device=DEVICE)
    compact_kv_forward([k], [v], accepted, cache_lens)
    for moved in (big_k, big_v):
        before = before_k if moved is big_k else before_v
        assert torch.equal(moved[:2], before[:2])
        expected = before[2].clone()
        expected[:, 3:5] = before[2][:, [4, 5]]
        assert torch.equal(moved[2], expected)


# ---------------------------------------------------------------- lossless sampling
# Tree: root -> nodes 1, 2, 3 (depth 1); 4, 5 children of 1; 6 child of 2. A fixed two-step "target
# model": P1 at the root, P2[x] after the first token x (the logits of a depth-1 node are P2[its token]).
PARENTS = [-1, 0, 0, 0, 1, 1, 2]
VOCAB = 5
_gen = torch.Generator().manual_seed(1234)
LOGITS_1 = torch.randn(VOCAB, generator=_gen, dtype=torch.float64) * 1.5
LOGITS_2 = torch.randn(VOCAB, VOCAB, generator=_gen, dtype=torch.float64) * 1.5
DRAFT_Q = torch.softmax(torch.randn(VOCAB + 1, VOCAB, generator=_gen, dtype=torch.float64), -1)


def filtered_probs(logits, temperature, top_k, top_p):
    """float64 target distribution with the documented top-k then top-p semantics (ties kept)."""
    logits = logits.clone()
    if top_k is not None:
        kth = torch.sort(logits, descending=True).values[..., top_k - 1 : top_k]
        logits = torch.where(logits >= kth, logits, float("-inf"))
    probs = torch.softmax(logits / temperature, -1)
    if top_p is not None:
        values, order = torch.sort(probs, descending=True)
        before = torch.cumsum(values, -1) - values
        keep_sorted = before < top_p
        cut = torch.where(keep_sorted, values, float("inf")).amin(-1, keepdim=True)
        probs = torch.where(probs >= cut, probs, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def make_sampling_batch(num_samples, with_draft_probs, seed, truncated=False):
    """Per-sample drafts: fixed top-k-style tokens, or tokens sampled i.i.d. from the draft rows (``truncated``:
    each row's top 3 weights, not renormalised, which is what torch.multinomial and the verification are given)."""
    gen = torch.Generator().manual_seed(seed)
    draft_q = DRAFT_Q
    if truncated:
        draft_q = torch.where(DRAFT_Q >= DRAFT_Q.topk(3, -1).values[:, -1:], DRAFT_Q, 0.0)
    num_nodes = len(PARENTS)
    tokens = torch.zeros(num_samples, num_nodes, dtype=torch.int64)
    draft_probs = None
    if with_draft_probs:
        # Row i's children are drawn from DRAFT_Q[row]: the root's row is VOCAB, a depth-1 node's row its token.
        for i in range(1, num_nodes):
            parent = PARENTS[i]
            row = torch.full((num_samples,), VOCAB) if parent == 0 else tokens[:, parent]
            tokens[:, i] = torch.multinomial(draft_q[row], 1, generator=gen)[:, 0]
        rows = torch.where(torch.tensor(PARENTS) == -1, VOCAB, 0).expand(num_samples, -1).clone()
        rows[:, 1:4] = tokens[:, 1:4]
        rows[:, 4:] = tokens[:, [1, 1, 2]]  # unused rows: nodes 4-6 have no children
        draft_probs = draft_q[rows].float()
    else:
        tokens[:, 1:] = torch.tensor([2, 0, 4, 1, 3, 2])
    logits = torch.empty(num_samples, num_nodes, VOCAB, dtype=torch.float64)
    logits[:, 0] = LOGITS_1
    logits[:, 1:4] = LOGITS_2[tokens[:, 1:4]]
    logits[:, 4:] = torch.randn(num_samples, 3, VOCAB, generator=gen, dtype=torch.float64)
    return tokens, logits.float(), draft_probs


def first_two_tokens(result, temperature, top_k, top_p, seed):
    """(e1, e2): when only one token is emitted, the next step would sample e2 from the target itself."""
    e1 = result.emitted_tokens[:, 0].cpu()
    e2 = result.emitted_tokens[:, 1].cpu()
    p2 = filtered_probs(LOGITS_2, temperature, top_k, top_p)
    fresh = torch.multinomial(p2[e1], 1, generator=torch.Generator().manual_seed(seed))[:, 0]
    return e1, torch.where(result.accept_len.cpu() == 0, fresh, e2)


def chi_square_pvalue(e1, e2, expected_probs):
    counts = torch.bincount(e1 * VOCAB + e2, minlength=VOCAB * VOCAB).double()
    expected = expected_probs.flatten() * counts.sum()
    assert counts[expected == 0].sum() == 0, "a token pair of target probability 0 was emitted"
    keep = expected > 0
    stat = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    dof = int(keep.sum()) - 1
    return torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), stat / 2).item()


SAMPLING_CASES = {
    "deterministic": dict(draft=False, temperature=1.0, top_k=None, top_p=None),
    "deterministic-filtered": dict(draft=False, temperature=0.7, top_k=4, top_p=0.9),
    "draft_probs": dict(draft=True, temperature=1.0, top_k=None, top_p=None),
    "draft_probs-filtered": dict(draft=True, temperature=1.3, top_k=3, top_p=0.8),
    # Unnormalised top-3 draft weights (rows sum to 0.75-0.94): verified against the distribution
    # torch.multinomial drew from, i.e. the rows normalised (used as given, the chi-square p-value was 2e-51).
    "draft_probs-truncated": dict(draft=True, truncated=True, temperature=1.0, top_k=None, top_p=None),
}
NUM_SAMPLES = 20000


def mutated_verify(tree, tokens, logits, draft_probs, temperature, top_k, top_p, generator):
    """A wrong verifier: accepts child x with the plain target probability p(x) (deterministic drafts)
    or min(1, p/q) (sampled drafts) at every round, never using the residual."""
    probs = filtered_probs(logits.double(), temperature, top_k, top_p)
    uniforms = torch.rand(tokens.shape, generator=generator)
    rows = torch.arange(tokens.shape[0])
    cur = torch.zeros(tokens.shape[0], dtype=torch.int64)
    depth = torch.zeros_like(cur)
    emitted = torch.full((tokens.shape[0], 3), -1)
    for j in range(1, tokens.shape[1]):
        p = probs[rows, cur, tokens[:, j]]
        ratio = p if draft_probs is None else p / draft_probs[rows, cur, tokens[:, j]].double()
        accept = (torch.tensor(PARENTS[j]) == cur) & (uniforms[:, j] < ratio)
        emitted[rows[accept], depth[accept]] = tokens[accept, j]
        cur = torch.where(accept, j, cur)
        depth += accept.long()
    bonus = torch.multinomial(probs[rows, cur], 1, generator=generator)[:, 0]
    emitted[rows, depth] = bonus
    return VerifyResult(None, depth, bonus, emitted)


@pytest.mark.parametrize("case", list(SAMPLING_CASES), ids=list(SAMPLING_CASES))
def test_sampling_is_lossless_chi_square(case):
    cfg = SAMPLING_CASES[case]
    filters = dict(temperature=cfg["temperature"], top_k=cfg["top_k"], top_p=cfg["top_p"])
    tokens, logits, draft_probs = make_sampling_batch(NUM_SAMPLES, cfg["draft"], seed=len(case),
                                                      truncated=cfg.get("truncated", False))
    tree = build_tree(torch.tensor(PARENTS, device=DEVICE))
    p1 = filtered_probs(LOGITS_1, **filters)
    p2 = filtered_probs(LOGITS_2, **filters)
    expected = p1[:, None] * p2
    result = verify_sampling(
        tree, tokens.to(DEVICE), logits.to(DEVICE), draft_probs=None if draft_probs is None else draft_probs.to(DEVICE),
        generator=torch.Generator(DEVICE).manual_seed(7), impl="torch", **filters,
    )
    e1, e2 = first_two_tokens(result, seed=99, **filters)
    assert chi_square_pvalue(e1, e2, expected) > 1e-3
    # Some drafts must actually be accepted, or the test says nothing about the acceptance rule.
    assert (result.accept_len > 0).float().mean() > 0.2

    wrong = mutated_verify(tree, tokens, logits, draft_probs, generator=torch.Generator().manual_seed(7), **filters)
    e1, e2 = first_two_tokens(wrong, seed=99, **filters)
    assert chi_square_pvalue(e1, e2, expected) < 1e-6


@pytest.mark.parametrize("case", list(SAMPLING_CASES), ids=list(SAMPLING_CASES))
def test_sampling_triton_equals_torch(case):
    """Same generator state → the same decisions on both impls (so the Triton path inherits the
    chi-square test above); the interpreter is slow, hence few sequences."""
    cfg = SAMPLING_CASES[case]
    filters = dict(temperature=cfg["temperature"], top_k=cfg["top_k"], top_p=cfg["top_p"])
    tokens, logits, draft_probs = make_sampling_batch(12, cfg["draft"], seed=3, truncated=cfg.get("truncated", False))
    tree = build_tree(torch.tensor(PARENTS, device=DEVICE))
    results = [
        verify_sampling(tree, tokens.to(DEVICE), logits.to(DEVICE),
                        draft_probs=None if draft_probs is None else draft_probs.to(DEVICE),
                        generator=torch.Generator(DEVICE).manual_seed(5), impl=impl, **filters)
        for impl in IMPLS
    ]
    for field in ("accepted_nodes", "accept_len", "next_tokens", "emitted_tokens"):
        assert torch.equal(getattr(results[0], field), getattr(results[1], field)), field
    assert results[0].accept_len.sum() > 0


@pytest.mark.parametrize("impl", IMPLS)
def test_draft_probs_second_round_divides_by_the_residual_mass(impl):
    """SpecInfer's second round: the root's children draft token 2 (p = 0: always rejected) then token 0, both from
    q = [0.4, 0.2, 0.4] with p = [0.6, 0.4, 0]. The residual after the rejection is max(p - q, 0) / N =
    [0.2, 0.2, 0] / 0.4, so token 0 is accepted with min(1, 0.5 / 0.4) = 1: every sequence accepts node 2. An
    acceptance test that leaves out N (u q < max(p - q, 0): probability 1/2) passed the chi-square and impl-equality
    tests, whose batches never needed it."""
    batch = 64
    tree = build_tree(torch.tensor([-1, 0, 0], device=DEVICE))
    tokens = torch.tensor([[1, 2, 0]] * batch, device=DEVICE)
    logits = torch.tensor([0.6, 0.4, 0.0]).log().expand(batch, 3, 3).contiguous().to(DEVICE)
    draft_probs = torch.tensor([0.4, 0.2, 0.4]).expand(batch, 3, 3).contiguous().to(DEVICE)
    result = verify_sampling(tree, tokens, logits, draft_probs=draft_probs, impl=impl,
                             generator=torch.Generator(DEVICE).manual_seed(0))
    assert result.accepted_nodes[:, :2].tolist() == [[0, 2]] * batch
    assert result.accept_len.tolist() == [1] * batch
    # The bonus at node 2 comes from the target's row there (no draft child): tokens 0 and 1 only.
    assert set(result.next_tokens.tolist()) <= {0, 1}


def test_sampling_random_tree_large_vocab_consistency():
    """A random 26-node tree, V = 2,000 (two vocabulary blocks), duplicate sibling tokens, bf16 logits:
    outputs are identical across impls for one generator state, and well formed: the accepted nodes are a
    root path of the tree, the emitted tokens are their drafts then the bonus token, and every emitted token
    lies in the top-p set of its node's float64 filtered distribution (so a dropped top_p shows)."""
    rng = random.Random(4)
    batch, num_nodes, vocab = 3, 26, 2000
    logits = (torch.randn(batch, num_nodes, vocab, generator=torch.Generator().manual_seed(4)) * 3).bfloat16()
    parents, tokens = random_tree_and_tokens(num_nodes, vocab, logits.float(), rng)
    tokens[:, 2] = tokens[:, 1]  # a duplicated draft
    parents[2] = parents[1]
    tree = build_tree(parents.to(DEVICE))
    args = (tree, tokens.to(DEVICE), logits.to(DEVICE))
    for top_p in (0.95, 0.3):
        ours, ref = (verify_sampling(*args, temperature=0.8, top_p=top_p, impl=impl,
                                     generator=torch.Generator(DEVICE).manual_seed(1)) for impl in ("triton", "torch"))
        assert torch.equal(ours.emitted_tokens, ref.emitted_tokens)
        assert torch.equal(ours.accepted_nodes, ref.accepted_nodes)
        support = filtered_probs(logits.double(), 0.8, None, top_p) > 0  # [B, T, V]
        for b in range(batch):
            path = [node for node in ref.accepted_nodes[b].tolist() if node >= 0]
            assert path[0] == 0 and all(parents[child] == parent for parent, child in zip(path, path[1:]))
            assert ref.accept_len[b].item() == len(path) - 1
            emitted = [tokens[b, node].item() for node in path[1:]] + [ref.next_tokens[b].item()]
            assert ref.emitted_tokens[b, : len(emitted)].tolist() == emitted
            assert (ref.emitted_tokens[b, len(emitted):] == -1).all()
            assert all(support[b, node, token] for node, token in zip(path, emitted)), (top_p, b, path, emitted)


# ---------------------------------------------------------------- KV compaction
@pytest.mark.parametrize("impl", IMPLS)
def test_compact_kv_cache_vs_gather(impl):
    parents = torch.tensor([-1, 0, 0, 1, 1, 3, 2, 5])  # max_depth 4
    tree = build_tree(parents)
    batch, heads, kv_len, head_dim = 4, 2, 30, 24
    cache_lens = torch.tensor([3, 0, 10, 22], device=DEVICE)
    accepted = torch.tensor([[0, 1, 3, 5, 7], [0, -1, -1, -1, -1], [0, 2, 6, -1, -1], [0, 1, 4, -1, -1]])
    accept_len = torch.tensor([4, 0, 2, 2])
    result = VerifyResult(accepted.to(DEVICE), accept_len.to(DEVICE), torch.zeros(4, dtype=torch.int64, device=DEVICE),
                          accepted.to(DEVICE))
    assert tree.max_depth + 1 == accepted.shape[1]
    k = torch.randn(batch, heads, kv_len, head_dim, device=DEVICE)
    v = torch.randn(batch, heads, kv_len, head_dim, device=DEVICE)
    k_ref, v_ref = k.clone(), v.clone()
    for b in range(batch):
        for slot, node in enumerate(accepted[b].tolist()):
            if node >= 0:
                k_ref[b, :, cache_lens[b] + slot] = k[b, :, cache_lens[b] + node]
                v_ref[b, :, cache_lens[b] + slot] = v[b, :, cache_lens[b] + node]
    new_lens = compact_kv_cache(k, v, cache_lens, result, impl=impl)
    assert new_lens.tolist() == [8, 1, 13, 25]
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)


@pytest.mark.parametrize("impl", IMPLS)
def test_compact_kv_cache_every_layer_in_one_call(impl):
    """Per-layer lists (a model's cache in one call, int32 lengths as the engine passes them) move exactly
    what one call per layer moves; a layer with other strides (a view into a longer buffer) is compacted too."""
    generator = torch.Generator().manual_seed(3)
    batch, heads, kv_len, head_dim = 2, 3, 17, 16
    accepted = torch.tensor([[0, 2, 5, -1], [0, 1, 3, 6]])
    result = VerifyResult(accepted.to(DEVICE), torch.tensor([2, 3], device=DEVICE),
                          torch.zeros(2, dtype=torch.int64, device=DEVICE), accepted.to(DEVICE))
    cache_lens = torch.tensor([4, 9], dtype=torch.int32, device=DEVICE)

    def layer(longer: bool = False) -> torch.Tensor:
        full = torch.randn(batch, heads, kv_len + (5 if longer else 0), head_dim, generator=generator).to(DEVICE)
        return full[:, :, :kv_len]

    keys = [layer(), layer(), layer(longer=True), layer()]
    values = [layer(), layer(longer=True), layer(), layer()]
    assert keys[2].stride() != keys[0].stride() and values[1].stride() != values[0].stride()
    original_k, original_v = [k.clone() for k in keys], [v.clone() for v in values]
    expected_k, expected_v = [k.clone() for k in keys], [v.clone() for v in values]
    for k, v in zip(expected_k, expected_v):
        compact_kv_cache(k, v, cache_lens, result, impl="torch")
    new_lens = compact_kv_cache(keys, values, cache_lens, result, impl=impl)
    assert new_lens.dtype == torch.int32 and new_lens.tolist() == [7, 13]
    for got, expected in zip(keys + values, expected_k + expected_v):
        assert torch.equal(got, expected)
    for got, original in zip(keys + values, original_k + original_v):  # sequence 1, slot 3 <- node 6
        assert torch.equal(got[1, :, 9 + 3], original[1, :, 9 + 6])
        assert torch.equal(got[0, :, 4 + 3], original[0, :, 4 + 3])  # padding slot untouched


def _shared_cache_case():
    """A verification result, cache lengths, two caches ``shared`` / ``other`` and each compacted once."""
    accepted = torch.tensor([[0, 2, 3, 5], [0, 1, -1, -1]])
    result = VerifyResult(accepted.to(DEVICE), torch.tensor([3, 1], device=DEVICE),
                          torch.zeros(2, dtype=torch.int64, device=DEVICE), accepted.to(DEVICE))
    cache_lens = torch.tensor([1, 4], device=DEVICE)
    shared = torch.arange(2 * 2 * 10 * 16, dtype=torch.float32, device=DEVICE).view(2, 2, 10, 16)
    other = torch.randn(2, 2, 10, 16, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    expected_shared, expected_other = shared.clone(), other.clone()
    compact_kv_cache(expected_shared, expected_other, cache_lens, result, impl="torch")  # each tensor once
    return result, cache_lens, shared, other, expected_shared, expected_other


@pytest.mark.parametrize("impl", IMPLS)
def test_compact_kv_cache_moves_a_shared_tensor_once(impl):
    """A tensor given more than once (v that is k; a layer list holding one tensor for several layers, as caches
    shared across layers do) is moved once: a second move re-read rows the first had already overwritten (the
    PyTorch path for both forms, the Triton path for the layer list)."""
    result, cache_lens, shared, other, expected_shared, expected_other = _shared_cache_case()
    assert torch.equal(expected_shared[0, :, 1:5], shared[0, :, [1, 3, 4, 6]])
    for layout in ("k is v", "v is k with another stride on a dim of size 1", "k, v: [s, o, s], [s, s, o]",
                   "k, v: [s, s], [o, s]"):
        got_shared, got_other = shared.clone(), other.clone()
        if layout == "k is v":
            k_in = v_in = got_shared
        elif layout.startswith("v is k"):
            k_in = got_shared[:1]
            v_in = k_in.as_strided(k_in.shape, (7,) + k_in.stride()[1:])
        elif layout.startswith("k, v: [s, o"):
            k_in, v_in = [got_shared, got_other, got_shared], [got_shared, got_shared, got_other]
        else:
            k_in, v_in = [got_shared, got_shared], [got_other, got_shared]
        if layout.startswith("v is k"):  # sequence 0 alone
            first = VerifyResult(result.accepted_nodes[:1], result.accept_len[:1], result.next_tokens[:1],
                                 result.emitted_tokens[:1])
            compact_kv_cache(k_in, v_in, cache_lens[:1], first, impl=impl)
            assert torch.equal(got_shared[:1], expected_shared[:1]), layout
            continue
        compact_kv_cache(k_in, v_in, cache_lens, result, impl=impl)
        assert torch.equal(got_shared, expected_shared), layout
        assert torch.equal(got_other, other if layout == "k is v" else expected_other), layout


@pytest.mark.parametrize("impl", IMPLS)
def test_compact_kv_cache_moves_a_shared_tensor_once_compiled(impl):
    """Under torch.compile a tensor given more than once (one object: v that is k, a layer list holding it twice,
    the same tensor passed as two graph inputs) is moved once too: Dynamo cannot hash data pointers (torch 2.11
    refused the trace, 2.13 hashed each data_ptr() call apart and moved the tensor twice)."""
    result, cache_lens, shared, other, expected_shared, expected_other = _shared_cache_case()
    layouts = {
        "k is v": lambda s, o: compact_kv_cache(s, s, cache_lens, result, impl=impl),
        "k, v: [s, o, s], [s, s, o]": lambda s, o: compact_kv_cache([s, o, s], [s, s, o], cache_lens, result,
                                                                    impl=impl),
        "k, v: [s, s], [o, s]": lambda s, o: compact_kv_cache([s, s], [o, s], cache_lens, result, impl=impl),
    }
    for layout, step in layouts.items():
        got_shared, got_other = shared.clone(), other.clone()
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        compiled(got_shared, got_other)
        assert torch.equal(got_shared, expected_shared), layout
        assert torch.equal(got_other, other if layout == "k is v" else expected_other), layout
    got_shared = shared.clone()  # one tensor as both graph inputs
    torch.compile(lambda k, v: compact_kv_cache(k, v, cache_lens, result, impl=impl), fullgraph=True,
                  backend="aot_eager")(got_shared, got_shared)
    assert torch.equal(got_shared, expected_shared)


# ---------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batch(impl):
    """B = 0: empty results of the documented shapes on every impl (the greedy kernel's split count divided by the
    number of rows: a ZeroDivisionError on the Triton path only)."""
    tree = build_tree(torch.tensor([-1, 0, 0, 1], device=DEVICE))
    tokens = torch.zeros(0, 4, dtype=torch.int64, device=DEVICE)
    logits = torch.randn(0, 4, 10, device=DEVICE)
    for verify in (verify_greedy, verify_sampling):
        result = verify(tree, tokens, logits, impl=impl)
        shapes = [tuple(t.shape) for t in (result.accepted_nodes, result.accept_len, result.next_tokens,
                                          result.emitted_tokens)]
        assert shapes == [(0, 3), (0,), (0,), (0, 3)], verify.__name__
    cache = torch.zeros(0, 2, 8, 4, device=DEVICE)
    assert compact_kv_cache(cache, cache.clone(), torch.zeros(0, dtype=torch.int64, device=DEVICE), result,
                            impl=impl).shape == (0,)


def test_verify_bad_inputs():
    tree = build_tree(torch.tensor(PARENTS))
    tokens, logits, draft_probs = make_sampling_batch(2, True, seed=0)
    with pytest.raises(ValueError, match=r"draft_tokens must be token ids in \[0, V=5\)"):
        verify_greedy(tree, tokens + 5, logits, impl="torch")
    with pytest.raises(ValueError, match=r"draft_tokens must have shape \[B, T\]"):
        verify_greedy(tree, tokens[:, :-1], logits, impl="torch")
    with pytest.raises(ValueError, match="tree has 7 nodes but target_logits has T=6"):
        verify_greedy(tree, tokens[:, :-1], logits[:, :-1], impl="torch")
    with pytest.raises(TypeError, match="target_logits must have dtype"):
        verify_greedy(tree, tokens, logits.long(), impl="torch")
    with pytest.raises(ValueError, match="temperature must be in"):
        verify_sampling(tree, tokens, logits, temperature=0.0, impl="torch")
    # Below 1e-6 fp32 logits / temperature could overflow (at 1e-39 the argmax draft was rejected on both impls).
    for impl in IMPLS:
        with pytest.raises(ValueError, match=r"temperature must be in \[1e-06, inf\)"):
            verify_sampling(tree, tokens, logits, temperature=1e-39, impl=impl)
    with pytest.raises(ValueError, match="top_p must be in"):
        verify_sampling(tree, tokens, logits, top_p=1.5, impl="torch")
    with pytest.raises(ValueError, match="top_p must be in"):
        verify_sampling(tree, tokens, logits, top_p=0.0, impl="torch")
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        verify_sampling(tree, tokens, logits, top_k=0, impl="torch")
    for impl in IMPLS:  # a NumPy top_k (read from a config array) means what the Python int means (it was refused)
        draws = [verify_sampling(tree, tokens, logits, top_k=top_k, generator=torch.Generator(DEVICE).manual_seed(4),
                                 impl=impl).emitted_tokens for top_k in (2, np.int64(2))]
        assert torch.equal(*draws)
    with pytest.raises(ValueError, match="draft_probs must have the shape"):
        verify_sampling(tree, tokens, logits, draft_probs=draft_probs[:, :, :3], impl="torch")
    with pytest.raises(TypeError, match="generator"):
        verify_sampling(tree, tokens, logits, generator=7, impl="torch")
    k = torch.zeros(2, 1, 9, 8)
    result = verify_greedy(tree, tokens, logits, impl="torch")
    hand_built = VerifyResult(result.accepted_nodes.float(), result.accept_len, result.next_tokens,
                              result.emitted_tokens)
    for impl in IMPLS:
        with pytest.raises(TypeError, match=r"result.accepted_nodes must have dtype in \(int64"):
            compact_kv_cache(k, k.clone(), torch.tensor([0, 1]), hand_built, impl=impl)
    with pytest.raises(ValueError, match=r"cache_lens \+ W must be <= S=9 \(W = result.accepted_nodes.shape\[1\]"):
        compact_kv_cache(k, k.clone(), torch.tensor([0, 7]), result, impl="torch")
    # A cache that holds the accepted width but not the accepted node's row (S < cache_len + node): the PyTorch
    # path failed with an index error, the kernel skipped the row and still returned the new length.
    star = build_tree(torch.tensor([-1, 0, 0, 0, 0, 0, 0, 0]))
    star_logits = torch.zeros(1, 8, 4)
    star_logits[0, 0, 1] = 1.0
    star_result = verify_greedy(star, torch.tensor([[0, 0, 0, 0, 0, 0, 0, 1]]), star_logits, impl="torch")
    assert star_result.accepted_nodes.tolist() == [[0, 7]]
    for impl in IMPLS:
        short = torch.zeros(1, 1, 5, 8)
        with pytest.raises(ValueError, match="must hold every accepted tree node"):
            compact_kv_cache(short, short.clone(), torch.tensor([3]), star_result, impl=impl)
    for impl in IMPLS:  # the PyTorch path failed with an index error, the kernel moved rows of the next sequence
        with pytest.raises(ValueError, match=r"cache_lens must be >= 0, got \[2, -3\]"):
            compact_kv_cache(k, k.clone(), torch.tensor([2, -3]), result, impl=impl)
    with pytest.raises(TypeError, match="result must be a VerifyResult"):
        compact_kv_cache(k, k.clone(), torch.tensor([0, 1]), (1, 2), impl="torch")
    lens = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="k and v must list the same number of layers, got 2 and 1"):
        compact_kv_cache([k, k.clone()], [k.clone()], lens, result, impl="torch")
    with pytest.raises(ValueError, match=r"k\[1\] and v\[1\] must match k\[0\]'s shape \(2, 1, 9, 8\)"):
        compact_kv_cache([k, k[:, :, :8]], [k.clone(), k.clone()], lens, result, impl="torch")
    with pytest.raises(TypeError, match=r"k\[1\] and v\[1\] must match k\[0\]'s shape .* and dtype torch.float32"):
        compact_kv_cache([k, k.half()], [k.clone(), k.clone()], lens, result, impl="torch")
    with pytest.raises(TypeError, match="k must be a torch.Tensor or a non-empty list of tensors"):
        compact_kv_cache([], [], lens, result, impl="torch")
    with pytest.raises(TypeError, match=r"v\[0\] must have dtype"):
        compact_kv_cache([k], [k.long()], lens, result, impl="torch")
    # An expand()ed cache shares rows between sequences: the kernel moved both through one buffer silently, the
    # PyTorch path failed inside an in-place copy.
    shared = torch.zeros(1, 1, 9, 8).expand(2, 1, 9, 8)
    for impl in IMPLS:
        with pytest.raises(ValueError, match=r"v is compacted in place and must not have overlapping elements .* "
                                             r"strides \(0, 72, 8, 1\)"):
            compact_kv_cache(k.clone(), shared, lens, result, impl=impl)
        with pytest.raises(ValueError, match=r"k\[1\] is compacted in place"):
            compact_kv_cache([k.clone(), shared], [k.clone(), k.clone()], lens, result, impl=impl)


def test_draft_probs_that_are_not_probabilities_are_refused():
    """An input-contract audit (2026-12-07): negative, NaN or infinite ``draft_probs`` passed on both impls and
    silently decided the acceptance tests (a negative row accepted its drafts). Read on CPU tensors only, as the
    token-range check (on a GPU that would synchronise); zero rows stay legal (a leaf's, never drawn from)."""
    tree = build_tree(torch.tensor(PARENTS))
    tokens, logits, draft_probs = make_sampling_batch(2, True, seed=0)
    for impl in IMPLS:
        for bad, shown in ((-0.25, "-0.25"), (float("nan"), "nan"), (float("inf"), "inf")):
            probs = draft_probs.clone()
            probs[1, 2, 3] = bad
            with pytest.raises(ValueError, match=rf"draft_probs must be finite and >= 0 .* got {shown} at \[1, 2, 3\]"):
                verify_sampling(tree, tokens, logits, draft_probs=probs, impl=impl)
        zero_leaves = draft_probs.clone()
        zero_leaves[:, 3:] = 0.0  # nodes 3..6 have no children: their rows are never read
        verify_sampling(tree, tokens, logits, draft_probs=zero_leaves, impl=impl)


def test_draft_probs_that_cannot_have_drawn_the_drafts_are_refused():
    """A review (2026-12-07): a drafted token with draft probability 0 in its parent's row (or a zero row at a node
    with children) cannot have been sampled from it; the acceptance test then read p > 0 and accepted every such
    draft, on both impls, so the emitted tokens were not the target's distribution (a chi-square p of 0). Refused by
    name where readable (CPU tensors); zero rows of leaves and zero weights of tokens nobody drafted stay legal."""
    tree = build_tree(torch.tensor(PARENTS))
    tokens, logits, draft_probs = make_sampling_batch(2, True, seed=0)
    for impl in IMPLS:
        zero_token = draft_probs.clone()
        zero_token[1, 0, tokens[1, 2]] = 0.0  # node 2's token (a sibling may share it), drafted from the root's row
        with pytest.raises(ValueError, match=rf"got draft_probs\[1, 0, {int(tokens[1, 2])}\] = 0 for node [123]"):
            verify_sampling(tree, tokens, logits, draft_probs=zero_token, impl=impl)
        zero_row = draft_probs.clone()
        zero_row[0, 1] = 0.0  # node 1 has children (4 and 5)
        with pytest.raises(ValueError, match=r"got draft_probs\[0, 1, \d+\] = 0 for node 4"):
            verify_sampling(tree, tokens, logits, draft_probs=zero_row, impl=impl)
        undrafted = draft_probs.clone()
        for b in range(2):
            others = torch.ones(VOCAB, dtype=torch.bool)
            others[tokens[b, 1:4]] = False  # the root's row: zero every token no child of the root drafted
            undrafted[b, 0, others] = 0.0
        verify_sampling(tree, tokens, logits, draft_probs=undrafted, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_compact_kv_cache_counts_the_nodes_it_moves(impl):
    """The new lengths count result.accepted_nodes (the rows moved), on both impls: the PyTorch path added a
    hand-built result's accept_len instead (a [1] one broadcast over the batch, a float or a wrong count gave
    other lengths than the kernel's)."""
    accepted = torch.tensor([[0, 2, 5, -1], [0, 3, 4, 6]], device=DEVICE)
    lens = torch.tensor([1, 2], device=DEVICE)
    expected = torch.tensor([4, 6], device=DEVICE)
    for accept_len in (torch.tensor([2, 3]), torch.tensor([2]), torch.tensor([2.0, 3.0]), torch.tensor([12, -5])):
        result = VerifyResult(accepted, accept_len.to(DEVICE), accepted[:, 0], accepted)
        cache = torch.randn(2, 1, 12, 4, device=DEVICE)
        new_lens = compact_kv_cache(cache, cache.clone(), lens, result, impl=impl)
        assert torch.equal(new_lens, expected), (accept_len, new_lens)


def test_compact_refuses_a_cache_that_requires_grad():
    """An input-contract audit (2026-12-07): a cache that requires grad was moved in place by the kernel outside
    autograd (a leaf overwritten silently), while the PyTorch path failed inside ``scatter_``. Refused by name
    where autograd records; under ``torch.no_grad()`` the move is the caller's, as any in-place update there."""
    tree = build_tree(torch.tensor(PARENTS))
    tokens, logits, _ = make_sampling_batch(2, True, seed=0)
    result = verify_greedy(tree, tokens, logits, impl="torch")
    lens = torch.tensor([0, 1])
    for impl in IMPLS:
        k = torch.randn(2, 1, 9, 8, requires_grad=True)
        before = k.detach().clone()
        with pytest.raises(ValueError, match="k is compacted in place and must not require grad"):
            compact_kv_cache(k, k.detach().clone(), lens, result, impl=impl)
        assert torch.equal(k.detach(), before)
        with pytest.raises(ValueError, match=r"v\[1\] is compacted in place and must not require grad"):
            compact_kv_cache([before.clone()] * 2, [before.clone(), k], lens, result, impl=impl)
        with torch.no_grad():
            compact_kv_cache(k, before.clone(), lens, result, impl=impl)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 7, 64])
def test_greedy_split_argmax_keeps_the_first_maximum(num_splits):
    """The Triton greedy path splits each logits row into column slices and merges their partial argmaxes:
    with heavily tied logits (ties across slice boundaries), rows that are all -inf and maxima in the last
    column, it must still pick torch.argmax's first occurrence everywhere (checked through the result)."""
    from distill_ops.kernels.tree_verify import verify_greedy_forward
    from distill_ops.verify import verify_greedy_ref

    rng = random.Random(num_splits)
    gen = torch.Generator().manual_seed(num_splits)
    batch, num_nodes, vocab = 3, 20, 301
    logits = torch.randint(0, 3, (batch, num_nodes, vocab), generator=gen).float()  # three levels: many ties
    logits[0, 3] = float("-inf")
    logits[1, 5, -1] = 10.0  # the maximum in the very last column
    logits[2, 0, 290:] = 5.0  # tied maxima inside the last slice only
    parents, tokens = random_tree_and_tokens(num_nodes, vocab, logits, rng)
    tree = build_tree(parents.to(DEVICE))
    logits, tokens = logits.to(DEVICE), tokens.to(DEVICE)
    expected = verify_greedy_ref(tree, tokens, logits)
    actual = VerifyResult(*verify_greedy_forward(
        tree.parents, tree.depth, tree.ancestor_mask, tokens, logits, tree.max_depth + 1,
        num_splits=num_splits, block_v=16,
    ))
    for field in ("accepted_nodes", "accept_len", "next_tokens", "emitted_tokens"):
        assert torch.equal(getattr(actual, field), getattr(expected, field)), field


def test_greedy_splits_large_vocabularies_by_default():
    """At V = 20000 the default splits each row (several programs per node) and matches the reference."""
    from distill_ops.kernels.tree_verify import VERIFY_BLOCK_V, argmax_splits
    from distill_ops.verify import verify_greedy_ref

    batch, num_nodes, vocab = 2, 9, 20000
    assert argmax_splits(batch * num_nodes, vocab, VERIFY_BLOCK_V) > 1
    rng = random.Random(5)
    logits = torch.randn(batch, num_nodes, vocab, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    parents, tokens = random_tree_and_tokens(num_nodes, vocab, logits.float(), rng)
    tree = build_tree(parents.to(DEVICE))
    expected = verify_greedy_ref(tree, tokens.to(DEVICE), logits.to(DEVICE))
    actual = verify_greedy(tree, tokens.to(DEVICE), logits.to(DEVICE), impl="triton")
    for field in ("accepted_nodes", "accept_len", "next_tokens", "emitted_tokens"):
        assert torch.equal(getattr(actual, field), getattr(expected, field)), field


@pytest.mark.parametrize("top_k, top_p, vocab, dtype", [  # vocab 50: one block of the stats kernel, 3000: three
    (5, None, 50, torch.float32), (1, None, 3000, torch.bfloat16), (None, 0.9, 50, torch.bfloat16),
    (None, 0.05, 3000, torch.float32), (7, 0.8, 50, torch.float32), (7, 0.8, 50, torch.bfloat16),
    (40, 0.99, 3000, torch.float32),
], ids=str)
def test_triton_filter_cut_equals_filter_thresholds(top_k, top_p, vocab, dtype):
    """The statistics kernel's in-kernel cut (bisection over fp32 keys) equals the sort-based
    ``filter_thresholds`` exactly: heavy ties (logits on a 1/4 grid), -inf and NaN entries, negative and
    positive values, temperature != 1."""
    from distill_ops.kernels.tree_verify import sampling_stats
    from distill_ops.verify import filter_thresholds

    generator = torch.Generator().manual_seed(vocab + (top_k or 0))
    batch, num_nodes = 2, 7
    logits = torch.randint(-24, 24, (batch, num_nodes, vocab), generator=generator).double() / 4
    logits[0, 1, ::3] = float("-inf")
    logits[1, 2] = torch.randn(vocab, generator=generator, dtype=torch.float64) * 3  # no ties
    logits[1, 3, 1::4] = float("nan")  # read as -inf
    logits = logits.to(dtype).to(DEVICE)
    parents = build_tree(torch.tensor([-1, 0, 0, 1, 1, 2, 3])).parents.to(DEVICE)
    expected = filter_thresholds(logits, 0.7, top_k, top_p)
    got = sampling_stats(parents, logits, top_k, top_p, None, 0.7)["thresh"].view(batch, num_nodes)
    assert torch.equal(got.cpu(), expected.cpu()), (got, expected)


@pytest.mark.parametrize("impl", IMPLS)
def test_torch_compile_fullgraph(impl):
    """Verification and compaction (one layer and a list of layers) trace as one graph and give what the
    eager calls give: greedy against the brute-force rule, sampling with the same global seed (a
    torch.Generator argument cannot be traced, so compiled callers use the default generator)."""
    rng = random.Random(3)  # accept lengths 3 and 1: rows move in the caches
    batch, num_nodes, vocab = 2, 9, 40
    logits = torch.randn(batch, num_nodes, vocab, generator=torch.Generator().manual_seed(3))
    parents, tokens = random_tree_and_tokens(num_nodes, vocab, logits, rng)
    tree = build_tree(parents.to(DEVICE))
    logits, tokens = logits.to(DEVICE), tokens.to(DEVICE)
    layers = [torch.randn(batch, 2, 24, 8, device=DEVICE) for _ in range(4)]
    cache_lens = torch.tensor([3, 11], dtype=torch.int32, device=DEVICE)

    def step(tokens, logits, keys, values, cache_lens):
        greedy = verify_greedy(tree, tokens, logits, impl=impl)
        sampled = verify_sampling(tree, tokens, logits, temperature=0.7, top_k=12, top_p=0.9, impl=impl)
        one = compact_kv_cache(keys[0], values[0], cache_lens, greedy, impl=impl)
        every = compact_kv_cache(keys[1:], values[1:], cache_lens, greedy, impl=impl)
        return greedy, sampled, one, every

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    outputs = {}
    for name, fn in (("compiled", compiled), ("eager", step)):
        caches = [t.clone() for t in layers]
        torch.manual_seed(11)
        outputs[name] = fn(tokens, logits, caches[:2], caches[2:], cache_lens), caches
    (greedy, sampled, one, every), caches = outputs["compiled"]
    (greedy_e, sampled_e, one_e, every_e), caches_e = outputs["eager"]
    for b, (path, bonus) in enumerate(brute_force_greedy(parents.tolist(), tokens.cpu(), logits.cpu())):
        assert greedy.accepted_nodes[b, : len(path)].tolist() == path and int(greedy.next_tokens[b]) == bonus
    for field in ("accepted_nodes", "accept_len", "next_tokens", "emitted_tokens"):
        assert torch.equal(getattr(greedy, field), getattr(greedy_e, field)), field
        assert torch.equal(getattr(sampled, field), getattr(sampled_e, field)), field
    assert torch.equal(one, one_e) and torch.equal(every, every_e)
    assert torch.equal(one, cache_lens + greedy.accept_len.to(torch.int32) + 1)
    assert all(torch.equal(a, b) for a, b in zip(caches, caches_e))
    for cache, before in zip(caches, layers):  # the gather reference
        expected = before.clone()
        for b in range(batch):
            start = int(cache_lens[b])
            for slot, node in enumerate(greedy.accepted_nodes[b].tolist()):
                if node >= 0:
                    expected[b, :, start + slot] = before[b, :, start + node]
        assert torch.equal(cache, expected)
    assert not all(torch.equal(a, b) for a, b in zip(caches, layers))  # something moved


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["greedy", "sampling", "top_k", "top_p", "draft_probs"])
def test_nan_target_logits_read_as_neg_inf(mode, impl):
    """NaN in ``target_logits`` reads as -inf on every impl (``torch.argmax`` alone would rank it first): the
    result equals that of the same logits with NaN replaced by -inf, on the PyTorch reference path. Rows hold
    scattered NaN (at their argmax too) and one row is entirely NaN."""
    rng = random.Random(11)
    batch, num_nodes, vocab = 3, 12, 40
    gen = torch.Generator().manual_seed(11)
    clean = torch.randn(batch, num_nodes, vocab, generator=gen) * 3
    parents, tokens = random_tree_and_tokens(num_nodes, vocab, clean, rng)
    logits = clean.clone()
    logits[torch.rand(logits.shape, generator=gen) < 0.15] = float("nan")
    logits[:, :, 7] = float("nan")
    logits[1, 0] = float("nan")
    tree = build_tree(parents.to(DEVICE))
    as_inf = torch.where(logits.isnan(), float("-inf"), logits)
    draft_probs = None
    if mode == "draft_probs":
        draft_probs = torch.softmax(torch.randn(batch, num_nodes, vocab, generator=gen), -1).to(DEVICE)

    def run(values, which):
        if mode == "greedy":
            return verify_greedy(tree, tokens.to(DEVICE), values.to(DEVICE), impl=which)
        filters = {"top_k": dict(top_k=5), "top_p": dict(top_p=0.7)}.get(mode, {})
        return verify_sampling(tree, tokens.to(DEVICE), values.to(DEVICE), temperature=0.9, draft_probs=draft_probs,
                               generator=torch.Generator(DEVICE).manual_seed(2), impl=which, **filters)

    got, expected = run(logits, impl), run(as_inf, "torch")
    for field in ("accepted_nodes", "accept_len", "next_tokens", "emitted_tokens"):
        assert torch.equal(getattr(got, field).cpu(), getattr(expected, field).cpu()), field
    assert ((got.next_tokens >= 0) & (got.next_tokens < vocab)).all()
    assert not torch.equal(logits.isnan(), torch.zeros_like(logits, dtype=torch.bool))
    if mode == "greedy":
        for b, (path, bonus) in enumerate(brute_force_greedy(parents.tolist(), tokens, as_inf)):
            assert got.accepted_nodes[b].tolist()[:len(path)] == path and got.next_tokens[b].item() == bonus


def test_verify_refuses_a_draft_token_equal_to_the_vocabulary_size():
    """The token-range check's upper end: a token id of exactly V (one past the last) is refused like any other
    out-of-range id. Under a check with > in place of >=, the PyTorch path read it as token V - 1 (it clamps the
    index) and could accept it; the existing check passed tokens + 5, whose other values are all > V."""
    tree = build_tree(torch.tensor(PARENTS))
    tokens, logits, _ = make_sampling_batch(2, False, seed=0)
    for bad in (logits.shape[-1], -1):
        wrong = tokens.clone()
        wrong[1, 4] = bad
        for verify in (verify_greedy, verify_sampling):
            low, high = int(wrong.min()), int(wrong.max())
            with pytest.raises(ValueError, match=rf"draft_tokens must be token ids in \[0, V=5\), got values from "
                                                 rf"{low} to {high}"):
                verify(tree, wrong, logits, impl="torch")


@pytest.mark.parametrize("impl", IMPLS)
def test_compact_kv_cache_bounds_are_exact(impl):
    """The two cache-length checks at their boundaries: cache_lens + W == S (the accepted width exactly fills the
    cache, every accepted node's row inside) is accepted and compacts; an accepted node whose row is exactly S
    (cache_lens + node == S) is refused before any row moves (the PyTorch path failed with an index error, the
    kernel skipped the row)."""
    chain = build_tree(torch.tensor([-1, 0, 1]))  # W = 3
    result = VerifyResult(torch.tensor([[0, 1, 2]], device=DEVICE), torch.tensor([2], device=DEVICE),
                          torch.zeros(1, dtype=torch.int64, device=DEVICE), torch.tensor([[4, 5, 6]], device=DEVICE))
    assert chain.max_depth + 1 == result.accepted_nodes.shape[1]
    k = torch.randn(1, 2, 7, 4, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    v = torch.randn(1, 2, 7, 4, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    k_before, v_before = k.clone(), v.clone()
    assert compact_kv_cache(k, v, torch.tensor([4], device=DEVICE), result, impl=impl).tolist() == [7]
    assert torch.equal(k, k_before) and torch.equal(v, v_before)  # the accepted rows are already in place
    # Star: node 7 accepted at depth 1 (W = 2); S = 9 with cache_len 2 puts its row at exactly 9.
    star = VerifyResult(torch.tensor([[0, 7]], device=DEVICE), torch.tensor([1], device=DEVICE),
                        torch.zeros(1, dtype=torch.int64, device=DEVICE), torch.tensor([[3, 1]], device=DEVICE))
    short_k, short_v = torch.randn(1, 1, 9, 4).to(DEVICE), torch.randn(1, 1, 9, 4).to(DEVICE)
    before = short_k.clone(), short_v.clone()
    with pytest.raises(ValueError, match="must hold every accepted tree node"):
        compact_kv_cache(short_k, short_v, torch.tensor([2], device=DEVICE), star, impl=impl)
    assert torch.equal(short_k, before[0]) and torch.equal(short_v, before[1])


def test_verify_refuses_a_tree_batch_that_is_neither_one_nor_b():
    """TreeSpec holds 1 tree or one per sequence: 2 trees for 3 sequences (or 3 for 2) are refused on every impl with
    the documented message, before any walk (no test passed a wrong count: without the check the PyTorch path failed
    inside expand() with a RuntimeError, and the Triton launch was given a tree count it does not check)."""
    logits = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(0))
    tokens = torch.zeros(3, 4, dtype=torch.int64)
    two = build_tree(torch.tensor([[-1, 0, 0, 1], [-1, 0, 1, 2]]))
    three = build_tree(torch.tensor([[-1, 0, 0, 1], [-1, 0, 1, 2], [-1, 0, 0, 0]]))
    for tree, batch in ((two, 3), (three, 2)):
        for impl in IMPLS:
            for verify in (verify_greedy, verify_sampling):
                with pytest.raises(ValueError, match=f"tree must hold 1 or B={batch} trees, got {tree.batch_size}"):
                    verify(tree, tokens[:batch], logits[:batch], impl=impl)


# --------------------------------------------------------------------------------------------------
# 16-bit target logits and draft probabilities (a 16-bit audit, 2026-12-06: these held; pinned here)
# --------------------------------------------------------------------------------------------------

HALF_DTYPES = [torch.bfloat16, torch.float16]
RESULT_FIELDS = ("accepted_nodes", "accept_len", "next_tokens", "emitted_tokens")


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_16bit_sampling_is_the_same_on_both_impls_for_one_generator_state(dtype):
    """Heavily tied 16-bit logits (multiples of 0.5), 16-bit or fp32 draft probabilities, temperature with top-k,
    top-p or both: the Triton path (its statistics kernel's cut and sampling walk) gives the PyTorch path's result
    for the same generator state."""
    from distill_ops.tree import tree_from_paths

    tree = build_tree(tree_from_paths([[0], [1], [0, 0], [0, 1], [1, 0]]), device=DEVICE)
    generator = torch.Generator().manual_seed(0)
    for trial in range(2):
        logits = (torch.randint(-6, 6, (2, tree.num_nodes, 64), generator=generator) * 0.5).to(dtype).to(DEVICE)
        tokens = torch.randint(0, 64, (2, tree.num_nodes), generator=generator).to(DEVICE)
        q = torch.softmax(torch.randn(2, tree.num_nodes, 64, generator=generator), -1).to(DEVICE)
        for options in (dict(temperature=0.7, top_k=5), dict(temperature=1.3, top_p=0.8),
                        dict(temperature=0.37, top_k=3, top_p=0.95)):
            for draft_probs in (None, q.to(dtype), q):
                torch_result, triton_result = (
                    verify_sampling(tree, tokens, logits, draft_probs=draft_probs, impl=impl,
                                    generator=torch.Generator(device=DEVICE).manual_seed(trial), **options)
                    for impl in ("torch", "triton"))
                for field in RESULT_FIELDS:
                    assert torch.equal(getattr(torch_result, field), getattr(triton_result, field)), (trial, options)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_16bit_cut_keeps_what_transformers_warpers_keep_plus_only_top_p_ties(dtype):
    """The top-k / top-p cut of tied 16-bit logits, as the kernel finds it, against transformers' TopKLogitsWarper
    and TopPLogitsWarper on the same values: top-k keeps exactly their set; top-p keeps theirs plus only tokens
    exactly tied with the cut value (the documented tie rule)."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    from distill_ops.kernels.tree_verify import sampling_stats
    from distill_ops.verify import filter_thresholds

    generator = torch.Generator().manual_seed(1)
    parents = torch.tensor([[-1, 0, 0, 1]], device=DEVICE)
    for trial in range(6):
        logits = (torch.randint(-4, 4, (1, 4, 50), generator=generator) * 0.5).to(dtype).to(DEVICE)
        for temperature, top_k, top_p in ((1.0, 5, None), (0.6, None, 0.7), (1.7, 8, 0.5)):
            cut = filter_thresholds(logits, temperature, top_k, top_p)[0]
            kernel_cut = sampling_stats(parents, logits, top_k, top_p, None, temperature)["thresh"].view(4)
            assert torch.equal(cut, kernel_cut)
            values = logits[0].float().cpu()
            scores = values / temperature
            if top_k:
                scores = TopKLogitsWarper(top_k)(None, scores)
            if top_p:
                scores = TopPLogitsWarper(top_p)(None, scores)
            theirs, ours = scores > float("-inf"), values >= cut.cpu()[:, None]
            assert not (theirs & ~ours).any()
            extra = ours & ~theirs
            assert torch.equal(values[extra], cut.cpu()[:, None].expand_as(values)[extra])
            if top_p is None:
                assert torch.equal(theirs, ours)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_16bit_compaction_is_identical_on_both_impls(dtype):
    accepted = torch.tensor([[0, 1, 3, 6], [0, 2, 5, -1]], device=DEVICE)
    zeros = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    result = VerifyResult(accepted, torch.tensor([3, 2], device=DEVICE), zeros, accepted)
    torch.manual_seed(0)
    caches = [torch.randn(2, 2, 40, 16).to(dtype).to(DEVICE) for _ in range(6)]
    a, b = [c.clone() for c in caches], [c.clone() for c in caches]
    lens = torch.tensor([10, 20], device=DEVICE)
    assert torch.equal(compact_kv_cache(a[:3], a[3:], lens, result, impl="torch"),
                       compact_kv_cache(b[:3], b[3:], lens, result, impl="triton"))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, c) for x, c in zip(a, caches))  # the compaction moved rows


@pytest.mark.parametrize("impl", IMPLS)
def test_every_argument_in_every_layout(impl):
    """A layout audit (2026-12-07): every tensor argument of verify_greedy and verify_sampling (with draft_probs)
    (the spec's parents, depth and ancestor mask, draft tokens, target logits) given at a storage offset, as a slice
    of a wider last dim (padded rows), with stride 2 along the last dim, transposed, leading dims permuted, and (the
    trees and draft probabilities, shared by the batch) expand()ed with stride 0 over the batch: the same results
    bit for bit as contiguous inputs (greedy: the brute-force path), and no input's storage is written."""
    from tests._layouts import bit_equal, layout_calls

    rng, gen = random.Random(96), torch.Generator().manual_seed(96)
    logits = torch.randn(2, 9, 37, generator=gen) * 4
    parents, tokens = random_tree_and_tokens(9, 37, logits[:1], rng)
    tokens = torch.cat([tokens, random_tree_and_tokens(9, 37, logits[1:], rng)[1]])  # one tree, two token rows
    tree = build_tree(parents.expand(2, 9).contiguous().to(DEVICE))
    probs = torch.softmax(torch.randn(1, 9, 37, generator=gen), -1).expand(2, 9, 37).contiguous()
    inputs = dict(parents=tree.parents, depth=tree.depth, ancestor_mask=tree.ancestor_mask,
                  draft_tokens=tokens.to(DEVICE), target_logits=logits.to(DEVICE), draft_probs=probs.to(DEVICE))

    def verify(args):
        spec = dataclasses.replace(tree, parents=args["parents"], depth=args["depth"],
                                   ancestor_mask=args["ancestor_mask"])
        greedy = verify_greedy(spec, args["draft_tokens"], args["target_logits"], impl=impl)
        sampled = verify_sampling(spec, args["draft_tokens"], args["target_logits"], draft_probs=args["draft_probs"],
                                  temperature=0.8, generator=torch.Generator(DEVICE).manual_seed(97),
                                  impl=impl)
        return [getattr(result, f.name) for result in (greedy, sampled) for f in dataclasses.fields(result)]

    expected = verify(inputs)
    for b, (path, bonus) in enumerate(brute_force_greedy(parents.tolist(), tokens, logits)):
        assert expected[0][b, :len(path)].tolist() == path and int(expected[2][b]) == bonus
    shared = ("parents", "depth", "ancestor_mask", "draft_probs")
    for name, layout, args, base, _ in layout_calls(inputs, inputs, shared=shared):
        before = base.clone()
        for got, want in zip(verify(args), expected):
            assert torch.equal(got, want), f"{name} {layout}"
        assert bit_equal(base, before), f"{name} {layout}: the input's storage was written"


@pytest.mark.parametrize("impl", IMPLS)
def test_compact_kv_cache_every_argument_in_every_layout(impl):
    """The layout audit (above) of compact_kv_cache: K, V, cache_lens and the accepted nodes in every layout
    (cache_lens also expand()ed): K / V compacted in place as a gather of the accepted rows, nothing written past
    the view (impl="triton" refuses K / V without unit stride along D, as documented), no other input written."""
    from tests._layouts import bit_equal, layout_calls

    gen = torch.Generator().manual_seed(98)
    accepted = torch.tensor([[0, 2, 5, 7], [0, 3, -1, -1]], device=DEVICE)
    result = VerifyResult(accepted, torch.tensor([3, 1], device=DEVICE), accepted[:, 0], accepted)
    cache = torch.randn(2, 2, 9 + 12, 8, generator=gen).to(DEVICE)
    lens = torch.tensor([12, 12], device=DEVICE)
    gathered = cache.clone()
    for b in range(2):
        nodes = result.accepted_nodes[b][result.accepted_nodes[b] >= 0]
        gathered[b, :, 12:12 + len(nodes)] = cache[b, :, 12 + nodes]
    inputs = dict(k=cache, v=-cache, cache_lens=lens, accepted_nodes=result.accepted_nodes)
    for name, layout, args, base, place in layout_calls(inputs, inputs, shared=("cache_lens",)):
        before = base.clone()
        call_result = dataclasses.replace(result, accepted_nodes=args["accepted_nodes"])
        for other in {"k", "v"} - {name}:  # a fresh cache for each call
            args[other] = args[other].clone()
        if impl == "triton" and name in ("k", "v") and args[name].stride(-1) != 1:
            with pytest.raises(ValueError, match="unit stride along D"):
                compact_kv_cache(args["k"], args["v"], args["cache_lens"], call_result, impl=impl)
            assert bit_equal(base, before), f"{name} {layout}: refused, but written"
            continue
        new_lens = compact_kv_cache(args["k"], args["v"], args["cache_lens"], call_result, impl=impl)
        assert torch.equal(new_lens, lens + result.accept_len + 1), f"{name} {layout}"
        assert bit_equal(args["k"], gathered) and bit_equal(args["v"], -gathered), f"{name} {layout}"
        if name in ("k", "v"):  # moved in place: only the view's elements
            outside = torch.ones(base.shape, dtype=torch.bool, device=DEVICE)
            place(outside).fill_(False)
            assert bit_equal(base[outside], before[outside]), f"{name} {layout}: written past the view"
        else:
            assert bit_equal(base, before), f"{name} {layout}: the input's storage was written"


# --------------------------------------------------------------------------------------------------
# Triton-kernel mutation audit (2026-12-07): inputs the kernels' existing tests left out
# --------------------------------------------------------------------------------------------------

def test_verify_reads_logits_and_draft_probs_through_their_own_strides():
    """Row views whose batch / node strides are not those of a contiguous ``[B, T, V]`` tensor reach the kernels as
    they are (only a unit stride along V is required): logits sliced along T from a taller buffer (batch stride !=
    T * node stride) and draft weights permuted from a ``[T, B, V + 7]`` buffer (strides unlike the logits'). A
    kernel that derived one stride from another read other rows: random ones here, so the argmax, the masses and
    the draft rows' sums (each row at its own scale) differ. Greedy against the brute-force rule; sampling (drafts
    drawn from their rows, so q decides) against the PyTorch path on contiguous copies for one generator state."""
    rng = random.Random(8)
    batch, num_nodes, vocab = 4, 9, 40
    gen = torch.Generator().manual_seed(8)
    wide = torch.softmax(torch.randn(num_nodes, batch, vocab + 7, generator=gen) * 2, -1)
    wide = wide * 10 ** (3 * torch.rand(num_nodes, batch, 1, generator=gen))
    draft_probs = wide.permute(1, 0, 2)[:, :, :vocab]
    tall = torch.randn(batch, num_nodes + 4, vocab, generator=gen) * 2
    tall[:, 2 : 2 + num_nodes] = draft_probs.log() + torch.randn(batch, num_nodes, vocab, generator=gen) * 1.5
    logits = tall[:, 2 : 2 + num_nodes]  # near the draft rows' logits, so that drafts are accepted
    assert logits.stride(0) != num_nodes * logits.stride(1) and draft_probs.stride()[:2] != logits.stride()[:2]
    parents, tokens = random_tree_and_tokens(num_nodes, vocab, logits, rng)
    tree = build_tree(parents.to(DEVICE))
    greedy = verify_greedy(tree, tokens.to(DEVICE), logits.to(DEVICE), impl="triton")
    for b, (path, bonus) in enumerate(brute_force_greedy(parents.tolist(), tokens, logits)):
        assert greedy.accepted_nodes[b, : len(path)].tolist() == path and greedy.next_tokens[b].item() == bonus
    assert greedy.accept_len.sum() > 0

    tree = build_tree(torch.tensor(PARENTS, device=DEVICE))  # three children at the root, two at node 1
    drafts = torch.zeros(batch, len(PARENTS), dtype=torch.int64)
    for node in range(1, len(PARENTS)):
        drafts[:, node] = torch.multinomial(draft_probs[:, PARENTS[node]], 1, generator=gen)[:, 0]
    logits, draft_probs = logits[:, : len(PARENTS)], draft_probs[:, : len(PARENTS)]
    for probs in (None, draft_probs):
        results = [verify_sampling(tree, drafts.to(DEVICE), values.to(DEVICE),
                                   draft_probs=None if probs is None else weights.to(DEVICE),
                                   generator=torch.Generator(DEVICE).manual_seed(seed), impl=impl)
                   for seed in range(3)
                   for values, weights, impl in ((logits, probs, "triton"),
                                                 (logits.contiguous(), None if probs is None else probs.contiguous(),
                                                  "torch"))]
        for ours, ref in zip(results[0::2], results[1::2]):
            for field in RESULT_FIELDS:
                assert torch.equal(getattr(ours, field), getattr(ref, field)), (field, probs is None)
        assert 0 < sum(int(result.accept_len.sum()) for result in results[1::2]) < 3 * batch * 2


def test_greedy_checks_ancestors_in_every_64_bit_word():
    """The ancestor bitmask holds 64 nodes per int64 word; the greedy walk must check, and read the accepted path
    from, the words past the first. Nodes 1-64 are mismatched children of the root (node 64 opens word 1), so
    every longer match lies in word 1: a matching chain 0 -> 65 -> 66, and a deeper chain of matches 68 -> 69 -> 70
    below node 67, whose own token does not match (so that chain must be rejected). The tests above stop at
    T = 64 (one word) and random trees never match that deep."""
    num_nodes, vocab = 72, 16
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(1, num_nodes, vocab, generator=gen)
    argmax = torch.randint(0, vocab, (num_nodes,), generator=gen)
    logits[0, torch.arange(num_nodes), argmax] = 10.0
    parents = [-1] + [0] * 65 + [65, 0, 67, 68, 69, 70]
    tokens = torch.zeros(1, num_nodes, dtype=torch.int64)
    for node in range(1, num_nodes):
        tokens[0, node] = (argmax[parents[node]] + (1 if node <= 64 or node == 67 else 0)) % vocab
    tree = build_tree(torch.tensor(parents, device=DEVICE))
    assert tree.ancestor_mask.shape[-1] == 2
    result = verify_greedy(tree, tokens.to(DEVICE), logits.to(DEVICE), impl="triton")
    (path, bonus), = brute_force_greedy(parents, tokens, logits)
    assert path == [0, 65, 66]
    width = tree.max_depth + 1
    assert result.accepted_nodes[0].tolist() == path + [-1] * (width - len(path))
    assert result.accept_len.tolist() == [len(path) - 1] and result.next_tokens.tolist() == [bonus]
    emitted = [int(tokens[0, node]) for node in path[1:]] + [bonus]
    assert result.emitted_tokens[0].tolist() == emitted + [-1] * (width - len(emitted))


@pytest.mark.parametrize("vocab", [64, 1100], ids=["one-full-block", "two-blocks"])
def test_sampling_bonus_of_a_row_without_mass_is_its_first_token(vocab):
    """A final node whose row is entirely -inf or NaN has no residual mass: the bonus token is that row's argmax,
    torch.argmax's first occurrence, token 0 (as on the PyTorch path). The statistics kernel keeps a per-lane argmax
    across vocabulary blocks: every lane ties here, in a block with no padding lanes (V = 64) and across two blocks
    (V = 1,100 with 1,024-entry blocks), where a lane index taken from a later block or the largest tied lane would
    come first. Sequence 0 (a finite row, its own argmax) comes first in the batch. With and without draft
    probabilities."""
    gen = torch.Generator().manual_seed(vocab)
    tree = build_tree(torch.tensor([-1, 0, 0], device=DEVICE))
    logits = torch.randn(3, 3, vocab, generator=gen)
    logits[1, 0] = float("-inf")
    logits[2, 0] = float("nan")
    tokens = torch.randint(0, vocab, (3, 3), generator=gen).to(DEVICE)
    draft_probs = torch.softmax(torch.randn(3, 3, vocab, generator=gen), -1).to(DEVICE)
    first = nan_as_neg_inf(logits[1:, 0]).argmax(-1)
    for probs in (None, draft_probs):
        results = [verify_sampling(tree, tokens, logits.to(DEVICE), draft_probs=probs, impl=impl,
                                   generator=torch.Generator(DEVICE).manual_seed(0)) for impl in ("triton", "torch")]
        for field in RESULT_FIELDS:
            assert torch.equal(getattr(results[0], field), getattr(results[1], field)), (field, probs is None)
        assert torch.equal(results[0].next_tokens[1:].cpu(), first) and results[0].accept_len[1:].tolist() == [0, 0]


def test_sampling_walk_never_writes_past_its_rows(monkeypatch):
    """The sampling walk keeps its result rows in BLOCK_W >= 16 lanes: only the first ``out_width`` may be stored
    (past them, on a GPU, lie the next sequence's row or other memory). Result tensors inside guard bands that must
    stay untouched, at the spec's own width (4) and at an understated one (2, a spec whose max_depth is too small:
    the row is truncated); the rows equal the PyTorch path's, truncated."""
    import distill_ops.verify as verify_module
    from distill_ops.kernels import tree_verify as tree_verify_module

    tree = build_tree(torch.tensor([-1, 0, 1, 2], device=DEVICE))  # a chain of depth 3
    tokens = torch.tensor([[5, 1, 2, 3], [5, 1, 6, 3]], device=DEVICE)
    logits = torch.full((2, 4, 8), -5.0, device=DEVICE)
    logits[:, torch.arange(4), torch.tensor([1, 2, 3, 4])] = 20.0  # drafts of probability ~1 (or ~0: token 6)
    uniforms = torch.full((2, 4), 0.5, device=DEVICE)
    monkeypatch.setattr(verify_module, "draw_uniforms", lambda *args: uniforms)
    want = verify_sampling(tree, tokens, logits, impl="torch")
    for out_width in (4, 2):
        with monkeypatch.context() as patch:
            guarded = _guard_result_buffers(patch)
            accepted, accept_len, next_tokens, emitted = tree_verify_module.verify_sampling_forward(
                tree.parents, tokens, logits, None, None, None, uniforms, 1.0, out_width)
        assert guarded and all(bool((buffer[-16:] == -7).all()) for buffer in guarded), out_width
        assert torch.equal(accepted, want.accepted_nodes[:, :out_width])
        assert torch.equal(emitted, want.emitted_tokens[:, :out_width])
    assert want.accept_len.tolist() == [3, 1]


@pytest.mark.parametrize("top_k, top_p", [(None, 0.9), (12, 0.5)], ids=str)
def test_triton_filter_cut_at_a_low_temperature(top_k, top_p):
    """At a low temperature the tempered logits reach hundreds (logit / T with |logit| up to ~12, T = 0.03): the
    top-p search must shift by the tempered row maximum, or its exp() overflows to inf and the cut is lost. The
    kernel's cut equals ``filter_thresholds``' (a sort); logits on a 1/4 grid (ties), distinct ones, and a row of
    logits within ~0.05 of 10 (many tokens in the top-p set even at this temperature)."""
    from distill_ops.kernels.tree_verify import sampling_stats
    from distill_ops.verify import filter_thresholds

    generator = torch.Generator().manual_seed(12)
    batch, num_nodes, vocab, temperature = 2, 3, 300, 0.03
    logits = torch.randint(-48, 48, (batch, num_nodes, vocab), generator=generator).double() / 4
    logits[1, 2] = torch.randn(vocab, generator=generator, dtype=torch.float64) * 4
    logits[1, 1] = 10 + torch.randn(vocab, generator=generator, dtype=torch.float64) / 50  # close: a wide top-p set
    logits = logits.float().to(DEVICE)
    parents = build_tree(torch.tensor([-1, 0, 0])).parents.to(DEVICE)
    expected = filter_thresholds(logits, temperature, top_k, top_p)
    got = sampling_stats(parents, logits, top_k, top_p, None, temperature)["thresh"].view(batch, num_nodes)
    assert torch.equal(got.cpu(), expected.cpu()), (got, expected)
    assert (got < logits.amax(-1)).any()  # some row keeps more than its maximum


def _matches_reference(result, uniforms, seed, **case) -> int:
    """Assert a Triton sampling walk's paths and bonus tokens equal ``sampling_reference``'s for the same uniforms (no
    top-k / top-p); returns the most children the reference rejected in a row at one node."""
    paths, bonuses, ambiguous, most = sampling_reference(
        dict(case, top_k=None, top_p=None, batch=len(case["rows"])), uniforms)
    assert not ambiguous, "a decision within rounding of its threshold: pick another seed"
    for b, (path, bonus) in enumerate(zip(paths, bonuses)):
        assert result.accepted_nodes[b, : len(path)].tolist() == path, (seed, b)
        assert result.accept_len[b].item() == len(path) - 1 and result.next_tokens[b].item() == bonus, (seed, b)
    return most


def test_draft_probs_rounds_match_a_float64_specinfer_walk():
    """The Triton SpecInfer walk (draft_probs) against ``sampling_reference`` (float64) for the same uniforms:
    per-sequence trees (nodes of four and six children, so up to five rejections at a node; a chain of single children),
    drafts drawn from their rows, a target near the draft (rejections, and round masses N_k well below 1), and draft
    rows at different scales (normalised as torch.multinomial does). Each round's residual is ``max(p - c_k q, 0) /
    N_k`` with ``c_{k+1} = c_k + N_k``: a wrong round constant, an unnormalised row, or the round table of another
    sequence's tree changes decisions."""
    gen = torch.Generator().manual_seed(21)
    # Sequence 0: six children at the root. 1 and 2: four children at a node that has one or none in tree 0. 3: a chain.
    trees = [[-1, 0, 0, 0, 0, 0, 0, 1], [-1, 0, 1, 1, 1, 1, 2, 2], [-1, 0, 0, 2, 2, 2, 2, 3], [-1, 0, 1, 2, 3, 4, 5, 6]]
    batch, num_nodes, vocab, temperature = len(trees), len(trees[0]), 12, 0.9
    tree = build_tree(torch.tensor(trees, device=DEVICE))
    draft_probs = torch.softmax(torch.randn(batch, num_nodes, vocab, generator=gen) * 1.5, -1)
    draft_probs = draft_probs * torch.tensor([0.3, 1.0, 2.5, 7.0])[:, None, None]
    logits = draft_probs.log() + torch.randn(batch, num_nodes, vocab, generator=gen)  # a target near the draft
    deepest = 0
    for seed in range(6):
        tokens = torch.zeros(batch, num_nodes, dtype=torch.int64)
        for b, parents in enumerate(trees):
            for node in range(1, num_nodes):
                tokens[b, node] = torch.multinomial(draft_probs[b, parents[node]], 1, generator=gen)[0]
        result = verify_sampling(tree, tokens.to(DEVICE), logits.to(DEVICE), temperature=temperature,
                                 draft_probs=draft_probs.to(DEVICE), impl="triton",
                                 generator=torch.Generator(DEVICE).manual_seed(seed))
        uniforms = torch.rand((batch, num_nodes), generator=torch.Generator().manual_seed(seed))
        deepest = max(deepest, _matches_reference(result, uniforms, seed, rows=trees, tokens=tokens, logits=logits,
                                                  draft_probs=draft_probs, temperature=temperature))
    assert deepest >= 2  # some node rejected two children: its third round or bonus used c_2


@pytest.mark.parametrize("top_k, top_p", [(5, None), (None, 0.8), (5, 0.8)], ids=str)
def test_triton_filter_cut_of_rows_without_finite_values(top_k, top_p):
    """Rows that are entirely NaN or entirely -inf (NaN reads as -inf), and a row whose only non-NaN entry is finite:
    the kernel's cut equals ``filter_thresholds``' (-inf for a row without finite values: its min / max pass must read
    NaN as -inf too, or an all-NaN row's minimum is +inf and so is its cut), and the walk's results equal the PyTorch
    path's."""
    from distill_ops.kernels.tree_verify import sampling_stats
    from distill_ops.verify import filter_thresholds

    generator = torch.Generator().manual_seed(13)
    logits = torch.randn(2, 3, 40, generator=generator) * 2
    logits[0, 0] = float("nan")
    logits[0, 1] = float("-inf")
    logits[1, 1] = float("nan")
    logits[1, 1, 17] = 3.0
    logits[1, 2, ::2] = float("nan")
    logits = logits.to(DEVICE)
    parents = build_tree(torch.tensor([-1, 0, 0])).parents.to(DEVICE)
    expected = filter_thresholds(logits, 0.9, top_k, top_p)
    got = sampling_stats(parents, logits, top_k, top_p, None, 0.9)["thresh"].view(2, 3)
    assert torch.equal(got.cpu(), expected.cpu()), (got, expected)
    tree = build_tree(torch.tensor([-1, 0, 0], device=DEVICE))
    tokens = torch.randint(0, 40, (2, 3), generator=generator).to(DEVICE)
    results = [verify_sampling(tree, tokens, logits, temperature=0.9, top_k=top_k, top_p=top_p, impl=impl,
                               generator=torch.Generator(DEVICE).manual_seed(1)) for impl in ("triton", "torch")]
    for field in RESULT_FIELDS:
        assert torch.equal(getattr(results[0], field), getattr(results[1], field)), field


def test_deterministic_drafts_match_a_float64_walk():
    """Deterministic (top-k) drafts on the Triton path against ``sampling_reference`` (float64) for the same
    uniforms: each of a node's children is tried in order and accepted with its probability under the
    residual renormalised after the earlier rejections (``u * det_mass < p(x)``), a repeated rejected token never.
    Nodes of up to six children that draft their parent's top tokens (a repeat among them), per-sequence trees."""
    gen = torch.Generator().manual_seed(22)
    trees = [[-1, 0, 0, 0, 0, 0, 0, 1], [-1, 0, 1, 1, 1, 1, 2, 2], [-1, 0, 0, 2, 2, 2, 2, 3]] * 4
    batch, num_nodes, vocab, temperature = len(trees), len(trees[0]), 12, 0.8
    tree = build_tree(torch.tensor(trees, device=DEVICE))
    logits = torch.randn(batch, num_nodes, vocab, generator=gen) * 2
    tokens = torch.zeros(batch, num_nodes, dtype=torch.int64)
    for b, parents in enumerate(trees):
        for node in range(1, num_nodes):
            rank = sum(parents[n] == parents[node] for n in range(1, node))  # the node's place among its siblings
            tokens[b, node] = logits[b, parents[node]].topk(6).indices[rank if rank != 3 else 0]  # rank 3 repeats
    deepest = 0
    for seed in range(4):
        result = verify_sampling(tree, tokens.to(DEVICE), logits.to(DEVICE), temperature=temperature, impl="triton",
                                 generator=torch.Generator(DEVICE).manual_seed(seed))
        uniforms = torch.rand((batch, num_nodes), generator=torch.Generator().manual_seed(seed))
        deepest = max(deepest, _matches_reference(result, uniforms, seed, rows=trees, tokens=tokens, logits=logits,
                                                  draft_probs=None, temperature=temperature))
    assert deepest >= 3


@pytest.mark.parametrize("vocab", [9, 1100], ids=["one-block", "empty-last-block"])
def test_a_coin_past_every_cumulative_mass_draws_the_last_token_of_positive_mass(monkeypatch, vocab):
    """The bonus draw with the largest coin below 1 over many rows (one batch): where the fp32 masses summed block by
    block stay at or below coin * total (no block crosses the coin), the walk must fall back to the last token of
    positive mass, as where the CDF crosses the coin only at that last token (the float64 walk: its mass is large);
    not the first positive token of the last block with mass, nor (V = 1,100: tokens 9 on are -inf, the second
    1,024-entry block has no mass) the row's argmax. The -inf entries must not be drawn."""
    import distill_ops.verify as verify_module

    almost_one = torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)).item()
    batch = 64
    logits = torch.full((batch, 1, vocab), float("-inf"))
    logits[:, 0, :9] = torch.randn(batch, 9, generator=torch.Generator().manual_seed(14)) * 2
    logits[:, 0, 8] = logits[:, 0].amax(-1) - 1  # the last finite token has a large mass (and is not the argmax)
    tree = build_tree(torch.tensor([-1], device=DEVICE))
    uniforms = torch.full((batch, 1), almost_one, device=DEVICE)
    monkeypatch.setattr(verify_module, "draw_uniforms", lambda *args: uniforms)
    result = verify_sampling(tree, torch.zeros(batch, 1, dtype=torch.int64, device=DEVICE), logits.to(DEVICE),
                             impl="triton")
    probs = torch.softmax(logits[:, 0].double(), -1)
    cdf = torch.cumsum(probs, -1)
    expected = ((cdf > almost_one) & (probs > 0)).int().argmax(-1)
    assert (expected == 8).all()
    assert result.next_tokens.tolist() == expected.tolist()


def test_a_coin_on_a_cumulative_mass_boundary_between_blocks_takes_the_next_blocks_token(monkeypatch):
    """The inverse CDF picks the first token whose cumulative mass exceeds coin * total, strictly. The walk first
    finds the vocabulary block where the running mass crosses the target: two tokens of mass exactly 1/2, one in each
    1,024-entry block (V = 1,100), and a coin of exactly 1/2 put the target on the first block's end, so the token of
    the second block is drawn (a block test with >= stopped in the first block and drew its last token), as on the
    PyTorch path."""
    import distill_ops.verify as verify_module

    vocab = 1100
    logits = torch.full((2, 1, vocab), float("-inf"))
    logits[:, 0, [5, 1050]] = 0.0
    logits[1, 0, 3] = 0.0  # 1/3 each: no boundary, the coin falls inside the first block
    tree = build_tree(torch.tensor([-1], device=DEVICE))
    monkeypatch.setattr(verify_module, "draw_uniforms", lambda *args: torch.full((2, 1), 0.5, device=DEVICE))
    tokens = torch.zeros(2, 1, dtype=torch.int64, device=DEVICE)
    ours, ref = (verify_sampling(tree, tokens, logits.to(DEVICE), impl=impl) for impl in ("triton", "torch"))
    probs = torch.softmax(logits[:, 0].double(), -1)
    expected = ((torch.cumsum(probs, -1) > 0.5) & (probs > 0)).int().argmax(-1)
    assert expected[0] >= 1024  # the case under test: the boundary between the blocks
    assert ours.next_tokens.tolist() == expected.tolist() == ref.next_tokens.tolist()
