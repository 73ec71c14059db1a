"""Tree utilities: parent arrays, paths, retrieve arrays, ancestor bitmask, depth, leaf paths."""

import random

import numpy as np
import pytest
import torch

from distill_ops.kernels import tree_spec as tree_spec_kernels
from distill_ops.tree import (
    MAX_TREE_NODES,
    TreeSpec,
    build_tree,
    int64_to_device,
    paths_from_tree,
    tree_from_paths,
    tree_from_retrieve,
    tree_spec_from_parents_tensor,
    tree_spec_in_place,
    tree_to_retrieve,
)
from tests.conftest import DEVICE, IMPLS

_HOST_READS = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")
_SPEC_FIELDS = ("parents", "depth", "ancestor_mask", "first_child", "next_sibling", "leaf_paths")


def random_parents(num_nodes: int, seed: int) -> torch.Tensor:
    rng = random.Random(seed)
    return torch.tensor([-1] + [rng.randrange(i) for i in range(1, num_nodes)])


def assert_spec_matches(spec: TreeSpec, reference: TreeSpec) -> None:
    """``spec`` (possibly padded to bounds, as :func:`tree_spec_from_parents_tensor` builds it) describes
    the same trees as ``reference`` (:func:`build_tree`): equal tensors, ``leaf_paths`` equal once its
    extra ``-1`` rows and columns are dropped, bounds no smaller than the exact values."""
    reference = reference.to(spec.device)
    for name in ("parents", "depth", "ancestor_mask", "first_child", "next_sibling"):
        assert torch.equal(getattr(spec, name), getattr(reference, name)), name
    assert reference.max_depth <= spec.max_depth <= spec.num_nodes - 1
    assert reference.max_children <= spec.max_children <= max(spec.num_nodes - 1, 0)
    assert spec.leaf_paths.shape[2] == spec.max_depth + 1
    num_leaves, width = reference.leaf_paths.shape[1:]
    assert torch.equal(spec.leaf_paths[:, :num_leaves, :width], reference.leaf_paths)
    assert (spec.leaf_paths[:, num_leaves:] == -1).all() and (spec.leaf_paths[:, :, width:] == -1).all()


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


def test_bad_device_is_refused_by_name():
    """An input-contract audit (2026-12-07): an unknown device string was PyTorch's RuntimeError from
    ``torch.device`` and a float its argument-parser TypeError, neither naming ``device``."""
    parents = torch.tensor([-1, 0, 0])
    with pytest.raises(ValueError, match=r"device must name a device \(e.g. 'cpu', 'cuda', 'cuda:1'\), got 'gpu0'"):
        build_tree(parents, device="gpu0")
    with pytest.raises(TypeError, match="device must be a torch.device, a device string or index, got float: 1.5"):
        build_tree(parents, device=1.5)
    assert build_tree(parents, device="cpu").parents.device.type == "cpu"


def test_bad_paths():
    with pytest.raises(ValueError, match="no parent path"):
        tree_from_paths([[0], [1, 0]])
    with pytest.raises(ValueError, match=r"paths must be distinct, got \[0\] more than once"):
        tree_from_paths([[0], [0]])
    with pytest.raises(ValueError, match="child ranks"):
        tree_from_paths([[-1]])
    with pytest.raises(ValueError, match="child ranks"):
        tree_from_paths([[1.0]])
    # paths_from_tree's batch_index: one of the trees (5 was an IndexError, 1.0 another, -1 the last tree).
    batch = torch.tensor([[-1, 0, 0], [-1, 0, 1]])
    for trees in (batch, build_tree(batch)):
        assert paths_from_tree(trees, np.int64(1)) == [[0], [0, 0]]
        for bad, error, match in ((2, ValueError, r"batch_index must be in \[0, 2\) \(the number of trees\), got 2"),
                                  (-1, ValueError, "batch_index must be >= 0, got -1"),
                                  (1.0, TypeError, "batch_index must be an int, got float")):
            with pytest.raises(error, match=match):
                paths_from_tree(trees, bad)
    # NumPy ranks (paths read from an array without .tolist()) are the Python ints' tree (they were refused).
    assert torch.equal(tree_from_paths([[np.int64(0)], [np.int32(1)], [0, np.int64(0)]]),
                       tree_from_paths([[0], [1], [0, 0]]))


def test_bad_retrieve():
    with pytest.raises(ValueError, match="do not describe a tree"):
        tree_from_retrieve(torch.tensor([1, 1, -1]), torch.tensor([-1, -1, -1]))
    with pytest.raises(ValueError, match="unreachable"):
        tree_from_retrieve(torch.tensor([1, -1, -1]), torch.tensor([-1, -1, -1]))
    # The root's next sibling (node 2, also reached as node 1's child) was ignored.
    with pytest.raises(ValueError, match=r"tree 1: the root \(node 0\) has no siblings.*got 2"):
        tree_from_retrieve(torch.tensor([[1, -1, -1], [1, 2, -1]]), torch.tensor([[-1, -1, -1], [2, -1, -1]]))
    # A tree whose child comes before its parent (0 -> 2 -> 1): the error said "parents[1] must be in [0, 1)".
    with pytest.raises(ValueError, match=r"tree 0: node 1 is a child of node 2; nodes must be numbered with every "
                                         r"parent before its children"):
        tree_from_retrieve(torch.tensor([2, -1, 1]), torch.tensor([-1, -1, -1]))
    # A node listed as its own first child: refused in the retrieve arrays' terms, not by the parent-array check
    # that follows ("parents[1] must be in [0, 1)": an array the caller never passed).
    with pytest.raises(ValueError, match=r"retrieve arrays of tree 0: node 1 is a child of node 1"):
        tree_from_retrieve(torch.tensor([-1, 1]), torch.tensor([-1, -1]))
    empty = torch.tensor([], dtype=torch.int64)  # an IndexError before
    with pytest.raises(ValueError, match=r"must hold at least one tree of at least one node, got shape \(0,\)"):
        tree_from_retrieve(empty, empty)
    with pytest.raises(ValueError, match=r"at least one tree of at least one node, got shape \(0, 3\)"):
        tree_from_retrieve(empty.view(0, 3), empty.view(0, 3))
    with pytest.raises(TypeError, match="tree must be a TreeSpec .* got Tensor"):  # an AttributeError before
        tree_to_retrieve(torch.tensor([-1, 0]))


def test_int64_to_device_round_trip():
    """Host integers (tree data, 48-bit addresses, negative padding) arrive exactly, as int64."""
    from tests.conftest import DEVICE

    values = [-1, 0, 7, 2**47 + 12345, -(2**63), 2**63 - 1]
    out = int64_to_device(values, torch.device(DEVICE))
    assert out.dtype == torch.int64 and out.device.type == torch.device(DEVICE).type
    assert out.tolist() == values


# --------------------------------------------------------------------------------------------------
# tree_spec_from_parents_tensor: the device-side builder (no host read)
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def no_host_reads(monkeypatch):
    """Any read of tensor values on the host fails the test."""

    def forbidden(name):
        def read(*args, **kwargs):
            raise AssertionError(f"host read Tensor.{name}")

        return read

    for name in _HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, forbidden(name))


def assert_specs_equal(spec: TreeSpec, expected: TreeSpec) -> None:
    """Identical specs: every tensor (shape, dtype, values) and both bounds."""
    for name in _SPEC_FIELDS:
        got, want = getattr(spec, name), getattr(expected, name)
        assert got.dtype == want.dtype and torch.equal(got, want), name
    assert (spec.max_depth, spec.max_children) == (expected.max_depth, expected.max_children)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("num_nodes", [1, 2, 7, 63, 64, 65, 130, MAX_TREE_NODES])
def test_spec_from_parents_tensor_equals_build_tree(num_nodes, batch, impl):
    parents = torch.stack([random_parents(num_nodes, 300 + b) for b in range(batch)])
    reference = build_tree(parents)
    parents = parents.to(DEVICE)
    for max_depth, max_children in ((reference.max_depth, reference.max_children), (num_nodes - 1, num_nodes - 1)):
        spec = tree_spec_from_parents_tensor(parents, max_depth, max_children, impl=impl)
        assert_spec_matches(spec, reference)
        assert spec.leaf_paths.shape == (batch, num_nodes, max_depth + 1)
        if impl == "triton":  # the kernel returns exactly the PyTorch path's tensors, padding included
            assert_specs_equal(spec, tree_spec_from_parents_tensor(parents, max_depth, max_children, impl="torch"))
    if batch == 1:
        shared = tree_spec_from_parents_tensor(parents[0], reference.max_depth, reference.max_children, impl=impl)
        assert_spec_matches(shared, reference)


@pytest.mark.parametrize(
    "parents",
    [
        torch.arange(-1, MAX_TREE_NODES - 1),  # a chain: depth 255, every word's sign bit
        torch.tensor([-1] + [0] * (MAX_TREE_NODES - 1)),  # a star: 255 children of the root
        torch.tensor([-1] + [i // 2 for i in range(1, 200)]),  # a binary heap across four words
    ],
    ids=["chain", "star", "heap"],
)
@pytest.mark.parametrize("impl", IMPLS)
def test_spec_from_parents_tensor_extreme_shapes(parents, impl):
    reference = build_tree(parents)
    spec = tree_spec_from_parents_tensor(parents.to(DEVICE), reference.max_depth, reference.max_children, impl=impl)
    assert_spec_matches(spec, reference)


def test_spec_from_parents_tensor_reads_nothing_on_the_host(no_host_reads):
    parents = random_parents(70, 5).to(DEVICE)
    spec = tree_spec_from_parents_tensor(parents, 69, 69)
    assert spec.num_nodes == 70 and spec.num_words == 2
    with pytest.raises(AssertionError, match="host read"):  # the fixture has power: build_tree reads
        build_tree(parents)


def test_spec_from_parents_tensor_torch_compile_fullgraph():
    """No graph break (no host read, no data-dependent shape): the builder can live in a captured graph."""

    def fields(parents):
        spec = tree_spec_from_parents_tensor(parents, 5, 4)
        return spec.parents, spec.depth, spec.ancestor_mask, spec.first_child, spec.next_sibling, spec.leaf_paths

    parents = torch.tensor([-1, 0, 0, 1, 1, 2, 3, 3, 0, 5], device=DEVICE)
    compiled = torch.compile(fields, fullgraph=True)(parents)
    for got, expected in zip(compiled, fields(parents)):
        assert torch.equal(got, expected)


def test_spec_from_parents_tensor_detects_a_wrong_builder():
    """The comparison has power: a parent array off by one node differs from the reference."""
    parents = random_parents(40, 9)
    reference = build_tree(parents)
    moved = parents.clone()
    moved[-1] = (moved[-1] + 1) % 39
    spec = tree_spec_from_parents_tensor(moved.to(DEVICE), 39, 39)
    with pytest.raises(AssertionError):
        assert_spec_matches(spec, reference)


def test_spec_from_parents_tensor_bad_inputs():
    parents = torch.tensor([-1, 0, 0])
    with pytest.raises(TypeError, match="parents must have dtype"):
        tree_spec_from_parents_tensor(parents.to(torch.int32), 1, 2)
    with pytest.raises(ValueError, match=r"parents must have shape \[T\] or \[Bt, T\]"):
        tree_spec_from_parents_tensor(parents.view(1, 1, 3), 1, 2)
    with pytest.raises(ValueError, match="1 to 256 nodes"):
        tree_spec_from_parents_tensor(torch.arange(-1, MAX_TREE_NODES), 1, 1)
    with pytest.raises(ValueError, match="1 to 256 nodes"):
        tree_spec_from_parents_tensor(torch.zeros(1, 0, dtype=torch.int64), 0, 0)
    with pytest.raises(ValueError, match=r"max_depth must be in \[0, T - 1 = 2\] for T=3 nodes, got 3"):
        tree_spec_from_parents_tensor(parents, 3, 2)
    with pytest.raises(ValueError, match="max_children must be in"):
        tree_spec_from_parents_tensor(parents, 1, -1)
    with pytest.raises(TypeError, match="max_depth must be an int, got bool"):
        tree_spec_from_parents_tensor(parents, True, 2)
    for impl in IMPLS:  # NumPy bounds: the Python ints' spec, its max_depth a Python int (they were refused)
        spec = tree_spec_from_parents_tensor(parents, np.int64(2), np.int32(2), impl=impl)
        assert type(spec.max_depth) is int
        assert_specs_equal(spec, tree_spec_from_parents_tensor(parents, 2, 2, impl=impl))


# The Triton path (tree_spec kernel): one launch, one allocation, no host read


_ORIGINAL_READS = {name: getattr(torch.Tensor, name) for name in _HOST_READS}


class _RecordingKernel:
    """Stands in for ``tree_spec_kernel``: records each launch's grid and runs the real kernel with host reads
    allowed (the CPU interpreter reads the tensors it simulates; a GPU launch reads nothing)."""

    def __init__(self, kernel):
        self.kernel, self.grids, self.running = kernel, [], False

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.grids.append(grid)
            forbidden = {name: getattr(torch.Tensor, name) for name in _HOST_READS}
            for name, method in _ORIGINAL_READS.items():
                setattr(torch.Tensor, name, method)
            self.running = True
            try:
                return self.kernel[grid](*args, **kwargs)
            finally:
                self.running = False
                for name, method in forbidden.items():
                    setattr(torch.Tensor, name, method)

        return launch


@pytest.fixture
def recorded_launches(monkeypatch):
    recorder = _RecordingKernel(tree_spec_kernels.tree_spec_kernel)
    monkeypatch.setattr(tree_spec_kernels, "tree_spec_kernel", recorder)
    return recorder


class _OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """ATen ops dispatched outside the recorded kernel launches (the interpreter's own tensor work is
    the simulated device's)."""

    def __init__(self, recorder: _RecordingKernel):
        super().__init__()
        self.recorder, self.ops = recorder, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.recorder.running:
            self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_spec_triton_one_launch_one_allocation_no_host_read(no_host_reads, recorded_launches):
    parents = torch.stack([random_parents(70, 40 + b) for b in range(3)]).to(DEVICE)
    with _OpLog(recorded_launches) as log:
        spec = tree_spec_from_parents_tensor(parents, 69, 69, impl="triton")
    assert recorded_launches.grids == [(3,)]  # one program per tree
    # One allocation; the rest are views of it (no copy, no fill, no other device op).
    assert log.ops == ["empty", "split_with_sizes"] + ["view"] * 5
    buffer = spec.depth.untyped_storage()
    for name in _SPEC_FIELDS[1:]:
        assert getattr(spec, name).untyped_storage().data_ptr() == buffer.data_ptr(), name
    assert spec.parents is parents
    with pytest.raises(AssertionError, match="host read"):  # the fixtures have power: a read outside the launch
        spec.depth.tolist()
    assert_specs_equal(spec, tree_spec_from_parents_tensor(parents, 69, 69, impl="torch"))  # torch.equal reads nothing


def test_spec_triton_mixed_batch_and_strided_parents():
    """Trees of one batch are independent programs: a chain (depth 255, every word's sign bit), a star
    (255 children of the root) and a heap in one launch, from a non-contiguous parent array."""
    num_nodes = MAX_TREE_NODES
    trees = [
        torch.arange(-1, num_nodes - 1),
        torch.tensor([-1] + [0] * (num_nodes - 1)),
        torch.tensor([-1] + [i // 2 for i in range(1, num_nodes)]),
    ]
    reference = build_tree(torch.stack(trees))
    strided = torch.stack(trees, dim=1).to(DEVICE).t()  # [3, T] with strides (1, 3)
    assert not strided.is_contiguous()
    spec = tree_spec_from_parents_tensor(strided, num_nodes - 1, num_nodes - 1, impl="triton")
    assert_spec_matches(spec, reference)
    assert_specs_equal(spec, tree_spec_from_parents_tensor(strided, num_nodes - 1, num_nodes - 1, impl="torch"))


@pytest.mark.parametrize("section", range(5), ids=list(_SPEC_FIELDS[1:]))
def test_spec_triton_detects_a_wrong_kernel(monkeypatch, section):
    """The comparisons have power: one wrong entry in any section of the kernel's buffer is caught (the
    last entry of the section: bit 63 of the last ancestor word, the last leaf-path cell, ...)."""
    parents = random_parents(70, 11).to(DEVICE)
    launch = tree_spec_kernels.tree_spec_forward

    def faulty(tree_parents, max_depth):
        buffer = launch(tree_parents, max_depth)
        sizes = tree_spec_kernels.section_sizes(*tree_parents.shape, max_depth)
        buffer[sum(sizes[: section + 1]) - 1] ^= -(2**63) if section == 1 else 1
        return buffer

    monkeypatch.setattr(tree_spec_kernels, "tree_spec_forward", faulty)
    spec = tree_spec_from_parents_tensor(parents, 69, 69, impl="triton")
    with pytest.raises(AssertionError, match=_SPEC_FIELDS[section + 1]):
        assert_specs_equal(spec, tree_spec_from_parents_tensor(parents, 69, 69, impl="torch"))
    with pytest.raises(AssertionError):
        assert_spec_matches(spec, build_tree(parents))


def test_spec_triton_torch_compile_fullgraph():
    """The launch is one opaque op under ``torch.compile`` (no graph break)."""

    def fields(parents):
        spec = tree_spec_from_parents_tensor(parents, 5, 4, impl="triton")
        return tuple(getattr(spec, name) for name in _SPEC_FIELDS)

    parents = torch.tensor([-1, 0, 0, 1, 1, 2, 3, 3, 0, 5], device=DEVICE)
    compiled = torch.compile(fields, fullgraph=True, backend="aot_eager")(parents)
    expected = tree_spec_from_parents_tensor(parents, 5, 4, impl="torch")
    for got, name in zip(compiled, _SPEC_FIELDS):
        assert torch.equal(got, getattr(expected, name)), name


def test_spec_triton_bad_inputs_raise_before_the_kernel(recorded_launches):
    parents = torch.tensor([-1, 0, 0], device=DEVICE)
    with pytest.raises(TypeError, match="parents must have dtype"):
        tree_spec_from_parents_tensor(parents.to(torch.int32), 1, 2, impl="triton")
    with pytest.raises(ValueError, match=r"max_depth must be in \[0, T - 1 = 2\] for T=3 nodes, got 3"):
        tree_spec_from_parents_tensor(parents, 3, 2, impl="triton")
    with pytest.raises(ValueError, match="impl must be one of"):
        tree_spec_from_parents_tensor(parents, 1, 2, impl="cuda")
    assert recorded_launches.grids == []


@pytest.mark.parametrize("impl", IMPLS)
def test_spec_broken_contract_stays_in_bounds(impl):
    """Unvalidated input (the builder does not read it): parents out of range, a cycle, a depth bound
    below the true depth. The spec is meaningless but every index in it is a node or -1 (on the PyTorch path the
    deeper path entries go to a dump column instead of raising an index error)."""
    parents = torch.tensor([[-1, 7, 1, 2, 99, -5, 3, 6], [-1, 0, 1, 2, 3, 4, 5, 6]], device=DEVICE)
    spec = tree_spec_from_parents_tensor(parents, 2, 2, impl=impl)
    assert spec.leaf_paths.shape == (2, 8, 3)
    for name in ("first_child", "next_sibling", "leaf_paths"):
        values = getattr(spec, name)
        assert ((values >= -1) & (values < 8)).all(), name
    if impl == "triton":  # the kernel's walk up the parents stops at the bound (the PyTorch path counts on)
        assert ((spec.depth >= 0) & (spec.depth <= 2)).all()
        assert spec.depth[1].tolist() == [0, 1, 2, 2, 2, 2, 2, 2]


def test_spec_triton_parent_equal_to_t_ends_the_walk():
    """A parent equal to ``T`` (one past the last node) is outside ``[0, T)``: it ends the walk like the root's
    ``-1``, so nothing past the parent row is read. The row is a view of a wider buffer whose next entry is a
    valid node: reading it would change the depth and set ancestor bits >= T."""
    num_nodes = 3
    specs = []
    for past_the_row in (1, -1):
        wide = torch.tensor([[-1, 0, num_nodes, past_the_row]], device=DEVICE)
        specs.append(tree_spec_from_parents_tensor(wide[:, :num_nodes], num_nodes - 1, num_nodes - 1, impl="triton"))
    assert specs[0].depth.tolist() == [[0, 1, 0]]  # node 2's walk ends at once: a root of its own
    assert specs[0].ancestor_mask.tolist() == [[[0b001], [0b011], [0b100]]]  # no bit >= T
    assert_specs_equal(specs[0], specs[1])  # what lies past the row does not matter


def test_retrieve_arrays_do_not_alias_the_spec():
    """``tree_to_retrieve`` returns new tensors: a consumer that edits its retrieve arrays in place leaves the
    spec's ``first_child`` / ``next_sibling`` intact."""
    tree = build_tree(torch.tensor([[-1, 0, 0, 1], [-1, 0, 1, 1]]))
    first_child, next_sibling = tree.first_child.clone(), tree.next_sibling.clone()
    for array in tree_to_retrieve(tree):
        array.fill_(-7)
    assert torch.equal(tree.first_child, first_child) and torch.equal(tree.next_sibling, next_sibling)
    assert tree_to_retrieve(tree)[0].tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_spec_in_place_rebuilds_over_one_buffer():
    """``tree_spec_in_place``: the same spec object and buffer every step; after each in-place rewrite of the
    parent array, one rebuild gives exactly the spec ``tree_spec_from_parents_tensor`` builds anew."""
    num_nodes, max_depth = 70, 69
    parents = random_parents(num_nodes, 11).to(DEVICE)
    spec, rebuild = tree_spec_in_place(parents, max_depth, num_nodes - 1)
    assert spec.parents.data_ptr() == parents.data_ptr()
    pointers = [t.data_ptr() for t in (spec.depth, spec.ancestor_mask, spec.leaf_paths)]
    for seed in (11, 12, 13):
        parents.copy_(random_parents(num_nodes, seed).to(DEVICE))  # the engine rewrites its views in place
        rebuild()
        expected = tree_spec_from_parents_tensor(parents, max_depth, num_nodes - 1, impl="torch")
        assert_specs_equal(spec, expected)
        assert [t.data_ptr() for t in (spec.depth, spec.ancestor_mask, spec.leaf_paths)] == pointers
    with pytest.raises(ValueError, match="max_depth must be in"):
        tree_spec_in_place(parents, num_nodes, 1)
