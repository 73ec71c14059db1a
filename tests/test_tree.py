"""Tree utilities: parent arrays, paths, retrieve arrays, ancestor bitmask, depth, leaf paths."""

import random

import pytest
import torch

from distill_ops.tree import (
    MAX_TREE_NODES,
    build_tree,
    int64_to_device,
    paths_from_tree,
    tree_from_paths,
    tree_from_retrieve,
    tree_to_retrieve,
)


def random_parents(num_nodes: int, seed: int) -> torch.Tensor:
    rng = random.Random(seed)
    return torch.tensor([-1] + [rng.randrange(i) for i in range(1, num_nodes)])


def ancestors_of(parents: list[int], node: int) -> set[int]:
    chain = {node}
    while parents[node] >= 0:
        node = parents[node]
        chain.add(node)
    return chain


def test_tree_from_paths_is_breadth_first():
    parents = tree_from_paths([[0, 0], [1], [0], [0, 1], [1, 0], [0, 0, 0]])
    # BFS: root, [0], [1], [0,0], [0,1], [1,0], [0,0,0]
    assert parents.tolist() == [-1, 0, 0, 1, 1, 2, 3]
    assert paths_from_tree(parents) == [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]


@pytest.mark.parametrize("seed", range(5))
def test_paths_round_trip(seed):
    parents = random_parents(40, seed)
    paths = paths_from_tree(parents)
    canonical = tree_from_paths(paths)
    # The BFS relabelling has the same set of paths, and a BFS tree survives the round trip exactly.
    assert sorted(paths_from_tree(canonical)) == sorted(paths)
    assert torch.equal(tree_from_paths(paths_from_tree(canonical)), canonical)


@pytest.mark.parametrize("num_nodes", [1, 7, 26, 64, 65, 130, MAX_TREE_NODES])
def test_bitmask_depth_leaves_vs_brute_force(num_nodes):
    batch = 3
    parents = torch.stack([random_parents(num_nodes, 100 + b) for b in range(batch)]).to(torch.int32)
    tree = build_tree(parents)
    assert tree.ancestor_mask.shape == (batch, num_nodes, (num_nodes + 63) // 64)
    dense = tree.dense_ancestors()
    for b in range(batch):
        plist = parents[b].tolist()
        children = {i: [j for j in range(num_nodes) if plist[j] == i] for i in range(num_nodes)}
        leaves = [i for i in range(num_nodes) if not children[i]]
        depths = [len(ancestors_of(plist, i)) - 1 for i in range(num_nodes)]
        assert tree.depth[b].tolist() == depths
        for i in range(num_nodes):
            expected = torch.zeros(num_nodes, dtype=torch.bool)
            expected[list(ancestors_of(plist, i))] = True
            assert torch.equal(dense[b, i], expected), (b, i)
            assert tree.first_child[b, i].item() == (children[i][0] if children[i] else -1)
        for i in range(num_nodes):
            siblings = children[plist[i]] if plist[i] >= 0 else [0]
            pos = siblings.index(i)
            assert tree.next_sibling[b, i].item() == (siblings[pos + 1] if pos + 1 < len(siblings) else -1)
        for slot, leaf in enumerate(leaves):
            path = sorted(ancestors_of(plist, leaf), key=lambda n: depths[n])
            row = tree.leaf_paths[b, slot].tolist()
            assert row[: len(path)] == path and all(x == -1 for x in row[len(path):])
        assert (tree.leaf_paths[b, len(leaves):] == -1).all()
    assert tree.max_depth == int(tree.depth.max())
    assert tree.max_children == max(
        max(parents[b].tolist().count(i) for i in range(num_nodes)) for b in range(batch)
    )


def test_bit_63_and_word_boundary():
    # A chain crosses the sign bit of word 0 and continues into word 1.
    parents = torch.arange(-1, 69)
    tree = build_tree(parents)
    assert tree.ancestor_mask[0, 63, 0].item() == -1  # all 64 bits set
    assert tree.ancestor_mask[0, 69, 1].item() == (1 << 6) - 1
    assert tree.max_depth == 69 and tree.leaf_paths[0, 0].tolist() == list(range(70))


@pytest.mark.parametrize("seed", range(3))
def test_retrieve_round_trip(seed):
    parents = torch.stack([random_parents(33, seed), random_parents(33, seed + 7)])
    tree = build_tree(parents)
    index, next_token, next_sibling = tree_to_retrieve(tree)
    assert index.tolist() == [list(range(33)), list(range(33, 66))]
    assert torch.equal(tree_from_retrieve(next_token, next_sibling), parents)
    assert torch.equal(tree_from_retrieve(next_token[1], next_sibling[1]), parents[1])


def test_shared_tree_is_batch_one():
    tree = build_tree(torch.tensor([-1, 0, 0, 1]))
    assert tree.batch_size == 1 and tree.num_nodes == 4 and tree.max_depth == 2 and tree.max_children == 2


@pytest.mark.parametrize(
    "parents, match",
    [
        (torch.tensor([0, 0, 1]), "must be -1"),
        (torch.tensor([-1, 1, 0]), r"parents\[1\] must be in \[0, 1\)"),
        (torch.tensor([-1, 0, 3, 2]), r"parents\[2\] must be in \[0, 2\)"),  # a cycle 2 <-> 3
        (torch.tensor([-1, 0, -1]), r"parents\[2\]"),
        (torch.zeros(2, 2, 2, dtype=torch.int64), "shape"),
        (torch.arange(-1, MAX_TREE_NODES), f"at most {MAX_TREE_NODES} nodes"),
    ],
)
def test_bad_parents(parents, match):
    with pytest.raises(ValueError, match=match):
        build_tree(parents)


def test_bad_parents_dtype():
    with pytest.raises(TypeError, match="parents must have dtype"):
        build_tree(torch.tensor([-1.0, 0.0]))


def test_bad_paths():
    with pytest.raises(ValueError, match="no parent path"):
        tree_from_paths([[0], [1, 0]])
    with pytest.raises(ValueError, match="distinct"):
        tree_from_paths([[0], [0]])
    with pytest.raises(ValueError, match="child ranks"):
        tree_from_paths([[-1]])


def test_bad_retrieve():
    with pytest.raises(ValueError, match="do not describe a tree"):
        tree_from_retrieve(torch.tensor([1, 1, -1]), torch.tensor([-1, -1, -1]))
    with pytest.raises(ValueError, match="unreachable"):
        tree_from_retrieve(torch.tensor([1, -1, -1]), torch.tensor([-1, -1, -1]))


def test_int64_to_device_round_trip():
    """Host integers (tree data, 48-bit addresses, negative padding) arrive exactly, as int64."""
    from tests.conftest import DEVICE

    values = [-1, 0, 7, 2**47 + 12345, -(2**63), 2**63 - 1]
    out = int64_to_device(values, torch.device(DEVICE))
    assert out.dtype == torch.int64 and out.device.type == torch.device(DEVICE).type
    assert out.tolist() == values
