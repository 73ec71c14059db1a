"""Property-based tests (hypothesis) of the draft-tree utilities, tree attention, verification and KV compaction.

Every property compares the library against an independent reference written here in plain Python / torch
(brute-force ancestor walks, float64 dense-mask attention, a float64 walk of the documented sampling rule).
Examples are derandomized (the same examples on every run) and sized so the whole file stays well under a
minute under Triton's CPU interpreter. Where a reference would be ambiguous (argmax ties, a probability within
rounding of a decision boundary) the generator avoids or ``assume``s away exactly those inputs.
"""

import math
import random

import pytest
import torch

# The dev extra installs hypothesis (CI, make test); a GPU machine without it skips this file instead of
# stopping the whole run at collection.
pytest.importorskip("hypothesis")
from hypothesis import assume, event, given, strategies as st  # noqa: E402

from distill_ops.tree import (  # noqa: E402
    build_tree,
    paths_from_tree,
    tree_from_paths,
    tree_from_retrieve,
    tree_spec_from_parents_tensor,
    tree_to_retrieve,
)
from distill_ops.tree_attention import tree_attention  # noqa: E402
from distill_ops.verify import VerifyResult, compact_kv_cache, verify_greedy, verify_sampling  # noqa: E402
from tests.conftest import DEVICE, IMPLS, assert_close, property_settings  # noqa: E402
from tests._verify_reference import kept_probs, sampling_reference  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


_settings = property_settings


# ------------------------------------------------------------------------------------------------ strategies
# Sizes around the 64-bit word boundaries of the ancestor bitmask, besides uniform sizes.
_BOUNDARY_SIZES = (1, 2, 63, 64, 65, 127, 128, 129, 130)


def _num_nodes(low: int, high: int):
    boundary = [n for n in _BOUNDARY_SIZES if low <= n <= high]
    sizes = st.integers(low, high)
    return st.one_of(sizes, st.sampled_from(boundary)) if boundary else sizes


@st.composite
def parent_row(draw, num_nodes: int) -> list[int]:
    """One parent array (``parents[0] == -1``, ``0 <= parents[i] < i``): uniform, deep (chains) or wide (stars)."""
    style = draw(st.sampled_from(("uniform", "deep", "wide")))
    parents = [-1]
    for i in range(1, num_nodes):
        if style == "uniform":
            parents.append(draw(st.integers(0, i - 1)))
        elif style == "deep":
            parents.append(i - 1 - draw(st.integers(0, min(i - 1, 2))))
        else:
            parents.append(draw(st.integers(0, min(i - 1, 3))))
    return parents


@st.composite
def tree_rows(draw, min_nodes: int = 1, max_nodes: int = 130, max_trees: int = 3) -> list[list[int]]:
    """1..max_trees parent arrays of one size (a different tree per row)."""
    num_nodes = draw(_num_nodes(min_nodes, max_nodes))
    num_trees = draw(st.integers(1, max_trees))
    return [draw(parent_row(num_nodes)) for _ in range(num_trees)]


@st.composite
def seq_trees(draw, max_nodes: int, max_batch: int = 3, min_nodes: int = 1):
    """``(batch, rows)``: one shared tree (``len(rows) == 1``) or one tree per sequence (``len(rows) == batch``)."""
    batch = draw(st.integers(1, max_batch))
    num_nodes = draw(st.one_of(st.integers(min_nodes, max_nodes), _num_nodes(max(min_nodes, max_nodes - 8), max_nodes)))
    shared = draw(st.booleans())
    rows = [draw(parent_row(num_nodes)) for _ in range(1 if shared else batch)]
    return batch, rows


# ------------------------------------------------------------------------------------------------ brute force
def root_path(parents: list[int], node: int) -> list[int]:
    """Node indices root -> node, by walking the parent pointers."""
    path = [node]
    while parents[path[-1]] >= 0:
        path.append(parents[path[-1]])
    return path[::-1]


def children_of(parents: list[int], node: int) -> list[int]:
    return [j for j in range(len(parents)) if parents[j] == node]


def signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def brute_force_spec(rows: list[list[int]]) -> dict:
    """Everything a TreeSpec holds, by walks over the parent arrays (exact bounds)."""
    num_nodes = len(rows[0])
    num_words = (num_nodes + 63) // 64
    depth, masks, dense, first, sibling, leaves, fanout = [], [], [], [], [], [], []
    for parents in rows:
        paths = [root_path(parents, i) for i in range(num_nodes)]
        depth.append([len(p) - 1 for p in paths])
        words, dense_rows = [], []
        for i in range(num_nodes):
            row = [0] * num_words
            for j in paths[i]:
                row[j // 64] |= 1 << (j % 64)
            words.append([signed64(w) for w in row])
            dense_rows.append([j in paths[i] for j in range(num_nodes)])
        masks.append(words)
        dense.append(dense_rows)
        kids = [children_of(parents, i) for i in range(num_nodes)]
        first.append([c[0] if c else -1 for c in kids])
        nxt = [-1] * num_nodes
        for c in kids:
            for a, b in zip(c, c[1:]):
                nxt[a] = b
        sibling.append(nxt)
        leaves.append([paths[i] for i in range(num_nodes) if not kids[i]])
        fanout.append(max(len(c) for c in kids))
    return dict(depth=depth, ancestor_mask=masks, dense=dense, first_child=first, next_sibling=sibling,
                leaves=leaves, max_depth=max(max(d) for d in depth), max_children=max(fanout))


def check_spec(spec, rows: list[list[int]], *, exact_bounds: bool, leaf_rows: int | None = None) -> None:
    """``spec`` describes ``rows`` exactly (bounds may exceed the exact values unless ``exact_bounds``)."""
    want = brute_force_spec(rows)
    num_trees, num_nodes = len(rows), len(rows[0])
    assert spec.parents.tolist() == rows
    assert spec.depth.tolist() == want["depth"]
    assert spec.ancestor_mask.dtype == torch.int64
    assert tuple(spec.ancestor_mask.shape) == (num_trees, num_nodes, (num_nodes + 63) // 64)
    assert spec.ancestor_mask.tolist() == want["ancestor_mask"]
    assert spec.dense_ancestors().tolist() == want["dense"]
    assert spec.first_child.tolist() == want["first_child"]
    assert spec.next_sibling.tolist() == want["next_sibling"]
    if exact_bounds:
        assert spec.max_depth == want["max_depth"] and spec.max_children == want["max_children"]
    else:
        assert spec.max_depth >= want["max_depth"] and spec.max_children >= want["max_children"]
    width = spec.max_depth + 1
    leaf_paths = spec.leaf_paths.tolist()
    assert spec.leaf_paths.shape[0] == num_trees and spec.leaf_paths.shape[2] == width
    num_rows = spec.leaf_paths.shape[1]
    assert num_rows >= max(len(t) for t in want["leaves"])
    if leaf_rows is not None:
        assert num_rows == leaf_rows
    for t in range(num_trees):
        expected = [p + [-1] * (width - len(p)) for p in want["leaves"][t]]
        expected += [[-1] * width] * (num_rows - len(expected))
        assert leaf_paths[t] == expected, f"leaf paths of tree {t}"


# ------------------------------------------------------------------------------------------------ tree utilities
@_settings(40)
@given(rows=tree_rows(), batched=st.booleans(), dtype=st.sampled_from([torch.int64, torch.int32]))
def test_build_tree_matches_brute_force(rows, batched, dtype):
    """Ancestor bitmask (every 64-bit word, padding bits included), depth, max_depth, first child / next
    sibling, max_children and leaf paths (node-index order, root -> leaf, -1 padded) of build_tree."""
    rows = rows if batched else rows[:1]
    parents = torch.tensor(rows if batched else rows[0], dtype=dtype)
    spec = build_tree(parents)
    check_spec(spec, rows, exact_bounds=True)


@_settings(12)
@given(rows=tree_rows(max_nodes=130), impl=st.sampled_from(IMPLS), slack=st.tuples(st.integers(0, 3), st.integers(0, 3)),
       batched=st.booleans())
def test_device_spec_builder_matches_brute_force(rows, impl, slack, batched):
    """tree_spec_from_parents_tensor (both impls) with bounds >= the exact depth / fan-out: same tensors as
    the brute force, leaf paths padded to T rows and max_depth + 1 columns."""
    rows = rows if batched else rows[:1]
    num_nodes = len(rows[0])
    exact = brute_force_spec(rows)
    max_depth = min(exact["max_depth"] + slack[0], num_nodes - 1)
    max_children = min(exact["max_children"] + slack[1], num_nodes - 1)
    parents = torch.tensor(rows if batched else rows[0], dtype=torch.int64, device=DEVICE)
    spec = tree_spec_from_parents_tensor(parents, max_depth, max_children, impl=impl)
    assert spec.max_depth == max_depth and spec.max_children == max_children
    check_spec(spec, rows, exact_bounds=False, leaf_rows=num_nodes)


@st.composite
def eagle_paths(draw, contiguous: bool):
    """A prefix-closed set of EAGLE child-rank paths from a random tree (ranks with gaps unless ``contiguous``)."""
    parents = draw(parent_row(draw(st.integers(1, 80))))
    paths = {0: ()}
    for node in range(len(parents)):
        kids = children_of(parents, node)
        if contiguous:
            ranks = list(range(len(kids)))
        else:
            ranks, rank = [], -1
            for _ in kids:
                rank += 1 + draw(st.integers(0, 2))
                ranks.append(rank)
        for kid, rank in zip(kids, ranks):
            paths[kid] = paths[node] + (rank,)
    chosen = [list(paths[i]) for i in range(1, len(parents))]
    return draw(st.permutations(chosen))


def bfs_reference(paths: list[list[int]]) -> tuple[list[int], list[list[int]]]:
    """Breadth-first numbering of the tree the paths describe (children by rank), by a queue walk: the parent
    array and each node's path with its ranks compacted to 0, 1, ... among its siblings."""
    kids: dict[tuple, list[int]] = {}
    for p in paths:
        kids.setdefault(tuple(p[:-1]), []).append(p[-1])
    parents, compact = [-1], [[]]
    queue = [((), 0)]
    while queue:
        prefix, node = queue.pop(0)
        for position, rank in enumerate(sorted(kids.get(prefix, []))):
            parents.append(node)
            compact.append(compact[node] + [position])
            queue.append((prefix + (rank,), len(parents) - 1))
    return parents, compact[1:]


def test_tree_from_paths_at_the_size_limit():
    """256 nodes (the root and 255 paths) is the largest tree: it is built; one path more is refused."""
    assert tree_from_paths([[i] for i in range(255)]).tolist() == [-1] + [0] * 255
    with pytest.raises(ValueError, match="at most 256 nodes, got T=257"):
        tree_from_paths([[i] for i in range(256)])


@_settings(40)
@given(paths=eagle_paths(contiguous=True))
def test_tree_from_paths_round_trip(paths):
    """tree_from_paths is the breadth-first numbering (independent of the input order) and paths_from_tree its
    inverse: for rank-contiguous EAGLE choices, paths -> tree -> paths gives the paths in (depth, path) order."""
    parents = tree_from_paths(paths)
    expected_parents, _ = bfs_reference(paths)
    assert parents.dtype == torch.int64 and parents.tolist() == expected_parents
    assert paths_from_tree(parents) == sorted(paths, key=lambda p: (len(p), p))
    assert paths_from_tree(build_tree(parents)) == sorted(paths, key=lambda p: (len(p), p))
    assert torch.equal(tree_from_paths(paths_from_tree(parents)), parents)


@_settings(25)
@given(paths=eagle_paths(contiguous=False))
def test_tree_from_paths_with_rank_gaps(paths):
    """Ranks only order siblings: gaps in the ranks give the same tree as the compacted ranks."""
    parents = tree_from_paths(paths)
    expected_parents, compact = bfs_reference(paths)
    assert parents.tolist() == expected_parents
    assert paths_from_tree(parents) == compact


@_settings(30)
@given(rows=tree_rows(max_nodes=130))
def test_paths_from_tree_of_any_tree(rows):
    """paths_from_tree of an arbitrary (not breadth-first) tree: rank = position among the parent's children in
    node order, per tree of a batch; tree_from_paths of it is the same tree renumbered breadth-first."""
    spec = build_tree(torch.tensor(rows))
    for t, parents in enumerate(rows):
        rank = {}
        for node in range(len(parents)):
            for position, kid in enumerate(children_of(parents, node)):
                rank[kid] = position
        expected = [[rank[n] for n in root_path(parents, i)[1:]] for i in range(1, len(parents))]
        assert paths_from_tree(spec, t) == expected
        assert paths_from_tree(torch.tensor(rows), t) == expected
        canonical = tree_from_paths(expected)
        assert canonical.tolist() == bfs_reference(expected)[0]
        assert sorted(paths_from_tree(canonical)) == sorted(expected)


@_settings(30)
@given(rows=tree_rows(max_nodes=130), batched=st.booleans(), seed=st.integers(0, 2**16))
def test_retrieve_arrays_round_trip(rows, batched, seed):
    """tree_to_retrieve gives the flat indices and the brute-force first child / next sibling; tree_from_retrieve
    inverts it, also from sibling chains listed in a random order (the parents do not depend on it)."""
    rows = rows if batched else rows[:1]
    num_trees, num_nodes = len(rows), len(rows[0])
    parents = torch.tensor(rows if batched else rows[0])
    spec = build_tree(parents)
    index, first, sibling = tree_to_retrieve(spec)
    want = brute_force_spec(rows)
    assert index.tolist() == [[t * num_nodes + i for i in range(num_nodes)] for t in range(num_trees)]
    assert first.tolist() == want["first_child"] and sibling.tolist() == want["next_sibling"]
    squeeze = (lambda x: x) if batched else (lambda x: x[0])
    assert tree_from_retrieve(squeeze(first), squeeze(sibling)).tolist() == squeeze(rows)

    rng = random.Random(seed)
    shuffled_first = [[-1] * num_nodes for _ in rows]
    shuffled_next = [[-1] * num_nodes for _ in rows]
    for t, plist in enumerate(rows):
        for node in range(num_nodes):
            kids = children_of(plist, node)
            rng.shuffle(kids)
            if kids:
                shuffled_first[t][node] = kids[0]
            for a, b in zip(kids, kids[1:]):
                shuffled_next[t][a] = b
    got = tree_from_retrieve(torch.tensor(squeeze(shuffled_first), dtype=torch.int32),
                             torch.tensor(squeeze(shuffled_next), dtype=torch.int32))
    assert got.dtype == torch.int64 and got.tolist() == squeeze(rows)


# ------------------------------------------------------------------------------------------------ greedy verification
def greedy_reference(parents: list[int], tokens: list[int], argmax: list[int]) -> tuple[list[int], int, int]:
    """EAGLE's rule by enumeration: the deepest node whose whole root path matches the target argmax (each
    node's token is the argmax at its parent), ties to the smaller node index. Returns (path, bonus, number of
    equally deep matching nodes)."""
    best, deepest = None, 0
    for node in range(len(parents)):
        path = root_path(parents, node)
        if all(tokens[n] == argmax[parents[n]] for n in path[1:]):
            if best is None or len(path) > len(best):
                best, deepest = path, 0
            deepest += len(path) == len(best)
    return best, argmax[best[-1]], deepest


def greedy_walk(parents: list[int], tokens: list[int], argmax: list[int]) -> list[int]:
    """'Follow the child whose token is the argmax': the same rule when sibling tokens are distinct."""
    path = [0]
    while True:
        nxt = [c for c in children_of(parents, path[-1]) if tokens[c] == argmax[path[-1]]]
        if not nxt:
            return path
        assert len(nxt) == 1
        path.append(nxt[0])


@_settings(30)
@given(trees=seq_trees(max_nodes=70), vocab=st.integers(2, 64), pool=st.integers(1, 8), follow=st.sampled_from([0.3, 0.8, 1.0]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), impl=st.sampled_from(IMPLS),
       seed=st.integers(0, 2**16))
def test_verify_greedy_matches_brute_force(trees, vocab, pool, follow, dtype, impl, seed):
    """accepted_nodes / accept_len / next_tokens / emitted_tokens against the enumeration of every root path.
    Draft tokens come from a small pool (equal-token siblings occur) or the whole vocabulary; each node's target
    argmax is, with probability ``follow``, one of its children's tokens; logits are tie-free permutations of
    integers (exact in fp16 / bf16)."""
    batch, rows = trees
    num_nodes = len(rows[0])
    rng = random.Random(seed)
    pool = min(pool, vocab) if rng.random() < 0.5 else vocab
    tokens = [[rng.randrange(pool) for _ in range(num_nodes)] for _ in range(batch)]
    argmax = []
    logits = torch.empty(batch, num_nodes, vocab)
    for b in range(batch):
        parents = rows[min(b, len(rows) - 1)]
        row_argmax = []
        for i in range(num_nodes):
            kids = children_of(parents, i)
            target = tokens[b][rng.choice(kids)] if kids and rng.random() < follow else rng.randrange(vocab)
            values = list(range(vocab))
            rng.shuffle(values)
            top = values.index(vocab - 1)
            values[top], values[target] = values[target], values[top]
            logits[b, i] = torch.tensor(values, dtype=torch.float32) - vocab // 2
            row_argmax.append(target)
        argmax.append(row_argmax)
    spec = build_tree(torch.tensor(rows if len(rows) > 1 else rows[0]), device=DEVICE)
    width = spec.max_depth + 1
    result = verify_greedy(spec, torch.tensor(tokens, device=DEVICE), logits.to(DEVICE, dtype), impl=impl)

    want_nodes, want_len, want_next, want_emitted = [], [], [], []
    for b in range(batch):
        parents = rows[min(b, len(rows) - 1)]
        path, bonus, deepest = greedy_reference(parents, tokens[b], argmax[b])
        if deepest > 1:
            event("greedy: equally deep matching paths")
        event(f"greedy: accept_len {min(len(path) - 1, 3)}{'+' if len(path) > 3 else ''}")
        distinct = all(len({tokens[b][c] for c in children_of(parents, i)}) == len(children_of(parents, i))
                       for i in range(num_nodes))
        if distinct:  # self-check of the reference against the walk
            assert greedy_walk(parents, tokens[b], argmax[b]) == path
        emitted = [tokens[b][n] for n in path[1:]] + [bonus]
        want_nodes.append(path + [-1] * (width - len(path)))
        want_len.append(len(path) - 1)
        want_next.append(bonus)
        want_emitted.append(emitted + [-1] * (width - len(emitted)))
    for name in ("accepted_nodes", "accept_len", "next_tokens", "emitted_tokens"):
        assert getattr(result, name).dtype == torch.int64, name
    assert result.accepted_nodes.tolist() == want_nodes
    assert result.accept_len.tolist() == want_len
    assert result.next_tokens.tolist() == want_next
    assert result.emitted_tokens.tolist() == want_emitted


# ------------------------------------------------------------------------------------------------ sampling verification
@st.composite
def sampling_case(draw, max_nodes: int = 7, max_vocab: int = 24, draft_probs: bool | None = None,
                  filtered: bool = False):
    """A small batch of trees, logits (fp32 / fp16 / bf16), draft tokens that are often among the parent's top
    tokens, optional draft distributions (scaled or 16-bit, so not always summing to 1), temperature, top-k and
    top-p (at least one of them cutting when ``filtered``)."""
    batch, rows = draw(seq_trees(max_nodes=max_nodes, min_nodes=2))
    vocab = draw(st.integers(2, max_vocab))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    num_nodes = len(rows[0])
    scale = draw(st.sampled_from([0.5, 2.0, 4.0]))
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16, torch.float16]))
    logits = (torch.randn(batch, num_nodes, vocab, generator=gen) * scale).to(dtype)
    tokens = torch.empty(batch, num_nodes, dtype=torch.int64)
    for b in range(batch):
        parents = rows[min(b, len(rows) - 1)]
        for i in range(num_nodes):
            top = logits[b, max(parents[i], 0)].float().topk(min(3, vocab)).indices.tolist()
            tokens[b, i] = rng.choice(top) if rng.random() < 0.7 else rng.randrange(vocab)
    use_draft = draw(st.booleans()) if draft_probs is None else draft_probs
    probs = None
    if use_draft:
        probs = torch.softmax(torch.randn(batch, num_nodes, vocab, generator=gen) * 2, -1)
        if draw(st.booleans()):  # some exact zeros, never at a drafted token (it was sampled from its parent's row)
            keep = torch.rand(probs.shape, generator=gen) > 0.3
            for b in range(batch):
                parents = rows[min(b, len(rows) - 1)]
                for i in range(1, num_nodes):
                    if parents[i] >= 0:
                        keep[b, parents[i], tokens[b, i]] = True
            probs = probs * keep
            probs[..., 0] += 1e-3
            probs = probs / probs.sum(-1, keepdim=True)
        # Rows that do not sum to 1, which the verification normalises as torch.multinomial does: a scale, or
        # 16-bit storage (rounding leaves the sum off 1).
        probs = (probs * draw(st.sampled_from([1.0, 1.0, 0.25, 3.0]))).to(draw(st.sampled_from(
            [torch.float32, torch.float32, torch.bfloat16, torch.float16])))
    if filtered:
        which = draw(st.sampled_from(["top_k", "top_p", "both"]))
        top_k = draw(st.integers(1, max(1, vocab // 2))) if which != "top_p" else None
        top_p = draw(st.sampled_from([0.2, 0.5, 0.8])) if which != "top_k" else None
    else:
        top_k = draw(st.one_of(st.none(), st.integers(1, vocab + 1)))
        top_p = draw(st.one_of(st.none(), st.sampled_from([0.2, 0.5, 0.8, 0.9, 0.95, 1.0])))
    return dict(
        batch=batch, rows=rows, tokens=tokens, logits=logits, draft_probs=probs,
        temperature=draw(st.sampled_from([0.3, 0.7, 1.0, 1.6])), top_k=top_k, top_p=top_p,
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _run_sampling(case: dict, impl: str) -> VerifyResult:
    rows = case["rows"]
    spec = build_tree(torch.tensor(rows if len(rows) > 1 else rows[0]), device=DEVICE)
    probs = case["draft_probs"]
    return verify_sampling(
        spec, case["tokens"].to(DEVICE), case["logits"].to(DEVICE), temperature=case["temperature"],
        top_k=case["top_k"], top_p=case["top_p"], draft_probs=None if probs is None else probs.to(DEVICE),
        generator=torch.Generator(DEVICE).manual_seed(case["seed"]), impl=impl,
    )


def check_valid_result(case: dict, result: VerifyResult) -> None:
    """Shape / path invariants every verification result satisfies, plus: every accepted draft and the bonus
    token have nonzero target probability after top-k / top-p (at their parent / at the final node)."""
    rows, tokens = case["rows"], case["tokens"].tolist()
    width = max(max(len(root_path(p, i)) for i in range(len(p))) for p in rows)
    assert result.accepted_nodes.shape == (case["batch"], width) and result.emitted_tokens.shape == (case["batch"], width)
    for b in range(case["batch"]):
        parents = rows[min(b, len(rows) - 1)]
        accepted = result.accepted_nodes[b].tolist()
        length = int(result.accept_len[b])
        path = accepted[: length + 1]
        assert 0 <= length < width and accepted[length + 1:] == [-1] * (width - length - 1)
        assert path == root_path(parents, path[-1]), f"accepted nodes {accepted} are not a root path"
        bonus = int(result.next_tokens[b])
        assert result.emitted_tokens[b].tolist() == [tokens[b][n] for n in path[1:]] + [bonus] + [-1] * (width - length - 1)
        for node in path[1:] + [None]:
            at = parents[node] if node is not None else path[-1]
            token = tokens[b][node] if node is not None else bonus
            probs, ambiguous = kept_probs(case["logits"][b, at].double().tolist(), case["temperature"], case["top_k"],
                                          case["top_p"])
            assert ambiguous or probs[token] > 0, (
                f"token {token} at node {at} has zero target probability after top-k / top-p")


@_settings(10)
@given(case=sampling_case())
def test_verify_sampling_same_generator_same_result_on_both_impls(case):
    """One generator state gives bit-identical results on the torch and the Triton impl (all four tensors),
    with and without draft_probs, temperature, top-k and top-p."""
    results = [_run_sampling(case, impl) for impl in IMPLS]
    for name in ("accepted_nodes", "accept_len", "next_tokens", "emitted_tokens"):
        assert torch.equal(getattr(results[0], name), getattr(results[1], name)), name
    check_valid_result(case, results[0])


@_settings(10)
@given(case=sampling_case(draft_probs=False, filtered=True), impl=st.sampled_from(IMPLS))
def test_verify_sampling_deterministic_drafts_invariants(case, impl):
    """With temperature and no draft_probs: the accepted nodes are a root path, the emitted tokens are their draft
    tokens then the bonus token; accepted drafts and the bonus have nonzero filtered target probability; an
    accepted child never repeats an earlier sibling's token (its residual is 0), and the bonus token is not the
    token of a (rejected, hence zeroed) child of the final node unless those children cover every kept token."""
    result = _run_sampling(case, impl)
    check_valid_result(case, result)
    rows, tokens = case["rows"], case["tokens"].tolist()
    for b in range(case["batch"]):
        parents = rows[min(b, len(rows) - 1)]
        path = result.accepted_nodes[b, : int(result.accept_len[b]) + 1].tolist()
        for node in path[1:]:
            earlier = [tokens[b][s] for s in children_of(parents, parents[node]) if s < node]
            assert tokens[b][node] not in earlier
        child_tokens = {tokens[b][c] for c in children_of(parents, path[-1])}
        probs, ambiguous = kept_probs(case["logits"][b, path[-1]].double().tolist(), case["temperature"],
                                      case["top_k"], case["top_p"])
        kept = {t for t, p in enumerate(probs) if p > 0}
        if not ambiguous and not kept <= child_tokens:
            assert int(result.next_tokens[b]) not in child_tokens


@_settings(80)
@given(case=sampling_case(max_nodes=8))
def test_verify_sampling_matches_float64_walk(case):
    """The torch impl (equal to the Triton impl by the test above) equals the documented walk computed in float64
    from the same uniforms (``torch.rand((B, T))`` from the generator: column j decides child j, column 0 the
    bonus token): residual acceptance for deterministic drafts, SpecInfer rounds with draft_probs, inverse CDF."""
    uniforms = torch.rand((case["batch"], len(case["rows"][0])), generator=torch.Generator().manual_seed(case["seed"]),
                          dtype=torch.float32)
    paths, bonuses, ambiguous, _ = sampling_reference(case, uniforms)
    assume(not ambiguous)
    result = _run_sampling(case, "torch")
    event(f"sampling: {'draft_probs' if case['draft_probs'] is not None else 'deterministic'}, "
          f"max accept_len {min(int(result.accept_len.max()), 2)}")
    for b in range(case["batch"]):
        length = int(result.accept_len[b])
        assert result.accepted_nodes[b, : length + 1].tolist() == paths[b]
        assert int(result.next_tokens[b]) == bonuses[b]


# ------------------------------------------------------------------------------------------------ tree attention
def attention_reference(q, k, v, rows, cache_lens, scale, softcap=None, window=None, sinks=None):
    """float64 softmax attention under a dense mask built by brute force: node i of sequence b (position
    cache_len + depth_i) sees prefix keys [0, cache_len) and the tree keys of itself and its ancestors, each
    only when ``pos_i - key_pos < window``; scores soft-capped to ``softcap * tanh(score / softcap)``;
    ``sinks [Hq]``: one extra unscaled logit per head in the softmax's denominator, with no value."""
    batch, num_heads, num_nodes, _ = q.shape
    kv_len, group = k.shape[2], num_heads // k.shape[1]
    mask = torch.zeros(batch, num_nodes, kv_len, dtype=torch.bool)
    for b in range(batch):
        parents = rows[min(b, len(rows) - 1)]
        start = int(cache_lens[b])
        for i in range(num_nodes):
            path = root_path(parents, i)
            pos_i = start + len(path) - 1
            mask[b, i, :start] = True if window is None else pos_i - torch.arange(start) < window
            for depth_j, j in enumerate(path):
                mask[b, i, start + j] = window is None or pos_i - (start + depth_j) < window
    q64, k64, v64 = (t.double().cpu() for t in (q, k, v))
    k64, v64 = k64.repeat_interleave(group, 1), v64.repeat_interleave(group, 1)
    scores = q64 @ k64.transpose(-1, -2) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask[:, None], -math.inf)
    if sinks is not None:
        sink_column = sinks.double().cpu().view(1, -1, 1, 1).expand(batch, num_heads, num_nodes, 1)
        return torch.softmax(torch.cat([scores, sink_column], -1), -1)[..., :kv_len] @ v64
    return torch.softmax(scores, -1) @ v64


@_settings(20)
@given(trees=seq_trees(max_nodes=70), kv_heads=st.integers(1, 2), group=st.sampled_from([1, 2, 4]),
       head_dim=st.sampled_from([16, 32, 64]), seed=st.integers(0, 2**16), impl=st.sampled_from(IMPLS),
       softcap=st.one_of(st.none(), st.sampled_from([1.0, 5.0, 30.0])),
       window=st.one_of(st.none(), st.integers(1, 40)), splits=st.sampled_from([None, 1, 2, 3]),
       scale=st.one_of(st.none(), st.sampled_from([0.05, 0.3])), extra=st.integers(0, 4), use_sinks=st.booleans(),
       lens_dtype=st.sampled_from([torch.int32, torch.int64]))
def test_tree_attention_matches_float64_dense_mask(trees, kv_heads, group, head_dim, seed, impl, softcap, window,
                                                   splits, scale, extra, use_sinks, lens_dtype):
    """fp32 tree attention (GQA, ragged prefixes, shared or per-sequence trees, soft-capping, sliding window,
    attention sinks, split-KV on Triton) against float64 dense-mask softmax attention, at the fp32 tolerance."""
    batch, rows = trees
    num_nodes = len(rows[0])
    rng = random.Random(seed)
    while batch * kv_heads * group * num_nodes > 200 and (group > 1 or batch > 1):  # bound the interpreter's time
        group, batch = (group // 2, batch) if group > 1 else (group, batch - 1)
    rows = rows[:batch]
    cache_lens = [rng.choice([0, rng.randrange(1, 8), rng.randrange(1, 45)]) for _ in range(batch)]
    kv_len = max(cache_lens) + num_nodes + extra
    gen = torch.Generator().manual_seed(seed)
    num_heads = kv_heads * group
    q = torch.randn(batch, num_heads, num_nodes, head_dim, generator=gen)
    k = torch.randn(batch, kv_heads, kv_len, head_dim, generator=gen)
    v = torch.randn(batch, kv_heads, kv_len, head_dim, generator=gen)
    sinks = torch.randn(num_heads, generator=gen) * 2 if use_sinks else None
    spec = build_tree(torch.tensor(rows if len(rows) > 1 else rows[0]), device=DEVICE)
    lens = torch.tensor(cache_lens, dtype=lens_dtype, device=DEVICE)
    out = tree_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), spec, lens, sm_scale=scale,
                         num_kv_splits=splits if impl == "triton" else None, softcap=softcap,
                         sliding_window=window, sinks=None if sinks is None else sinks.to(DEVICE), impl=impl)
    expected = attention_reference(q, k, v, rows, cache_lens, 1 / math.sqrt(head_dim) if scale is None else scale,
                                   softcap, window, sinks)
    event(f"attention: {impl}, {'two mask words' if num_nodes > 64 else 'one mask word'}, "
          f"{'window' if window else 'no window'}, {'softcap' if softcap else 'no softcap'}")
    assert out.shape == q.shape and out.dtype == torch.float32
    assert_close(out, expected, torch.float32)


# ------------------------------------------------------------------------------------------------ KV compaction
@_settings(20)
@given(trees=seq_trees(max_nodes=30), heads=st.integers(1, 3), head_dim=st.sampled_from([4, 16, 24]),
       layers=st.integers(0, 3), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       lens_dtype=st.sampled_from([torch.int32, torch.int64]), impl=st.sampled_from(IMPLS),
       seed=st.integers(0, 2**16), extra=st.integers(0, 4), views=st.booleans())
def test_compact_kv_cache_matches_gather(trees, heads, head_dim, layers, dtype, lens_dtype, impl, seed, extra, views):
    """Rows cache_lens + d (d = 0 .. accept_len) become the rows of the accepted nodes (cache_lens + node), for a
    random accepted root path per sequence; every other row (the prefix above all) is untouched; returns
    cache_lens + accept_len + 1 in cache_lens' dtype. One tensor (layers = 0) or a list of 1..3 layers, each
    optionally a view of a longer buffer (rows past S must stay untouched)."""
    batch, rows = trees
    num_nodes = len(rows[0])
    rng = random.Random(seed)
    spec = build_tree(torch.tensor(rows if len(rows) > 1 else rows[0]), device=DEVICE)
    width = spec.max_depth + 1
    accepted, accept_len = [], []
    for b in range(batch):
        parents = rows[min(b, len(rows) - 1)]
        path = [0]
        while children_of(parents, path[-1]) and rng.random() < 0.8:
            path.append(rng.choice(children_of(parents, path[-1])))
        accepted.append(path + [-1] * (width - len(path)))
        accept_len.append(len(path) - 1)
    cache_lens = [rng.choice([0, rng.randrange(0, 25)]) for _ in range(batch)]
    kv_len = max(cache_lens) + num_nodes + extra
    gen = torch.Generator().manual_seed(seed)
    caches = [(torch.randn(batch, heads, kv_len, head_dim, generator=gen).to(dtype),
               torch.randn(batch, heads, kv_len, head_dim, generator=gen).to(dtype)) for _ in range(max(layers, 1))]
    expected = []
    for k, v in caches:
        want_k, want_v = k.clone(), v.clone()
        for b in range(batch):
            for d in range(accept_len[b] + 1):
                want_k[b, :, cache_lens[b] + d] = k[b, :, cache_lens[b] + accepted[b][d]]
                want_v[b, :, cache_lens[b] + d] = v[b, :, cache_lens[b] + accepted[b][d]]
        expected.append((want_k, want_v))
    buffers = []  # with views, each layer has its own strides (one launch per set of strides on Triton)
    for layer, (k, v) in enumerate(caches):
        pair = []
        for t in (k, v):
            tail = torch.randn(batch, heads, 3 + layer if views else 0, head_dim, generator=gen).to(dtype)
            pair.append(torch.cat([t, tail], 2).to(DEVICE))
        buffers.append(pair)
    originals = [[t.clone() for t in pair] for pair in buffers]
    device_caches = [(k[:, :, :kv_len], v[:, :, :kv_len]) for k, v in buffers]
    accepted_t = torch.tensor(accepted, device=DEVICE)
    result = VerifyResult(accepted_t, torch.tensor(accept_len, device=DEVICE),
                          torch.zeros(batch, dtype=torch.int64, device=DEVICE), accepted_t.clone())
    lens = torch.tensor(cache_lens, dtype=lens_dtype, device=DEVICE)
    if layers == 0:
        new_lens = compact_kv_cache(device_caches[0][0], device_caches[0][1], lens, result, impl=impl)
    else:
        new_lens = compact_kv_cache([k for k, _ in device_caches], [v for _, v in device_caches], lens, result,
                                    impl=impl)
    assert new_lens.dtype == lens_dtype
    assert new_lens.tolist() == [c + n + 1 for c, n in zip(cache_lens, accept_len)]
    assert lens.tolist() == cache_lens
    for (k, v), (want_k, want_v) in zip(device_caches, expected):
        assert torch.equal(k.cpu(), want_k) and torch.equal(v.cpu(), want_v)
    for pair, original in zip(buffers, originals):
        for t, o in zip(pair, original):
            assert torch.equal(t[:, :, kv_len:], o[:, :, kv_len:]), "rows past S were written"
