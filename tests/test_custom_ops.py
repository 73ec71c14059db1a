"""Every ``distill_ops::`` custom op passes ``torch.library.opcheck``.

``torch.compile`` traces our kernels through these ops: a schema that hides a mutation, a fake implementation whose
shapes, strides or dtypes differ from the real outputs, or an op that does not trace under AOT dispatch gives wrong
results or graph breaks only under compile. The ops are called by the public API, so their arguments are captured
from public calls (a ``TorchDispatchMode`` records each op's first call per impl, arguments cloned before it runs),
with ``torch.compiler.is_compiling`` reading True so that the paths which call the kernel directly in eager mode
take the op as they do while tracing. Then opcheck runs all of its checks on each captured call.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

import distill_ops
from distill_ops import speculative
from distill_ops.tree import tree_spec_from_parents_tensor
from tests.conftest import DEVICE, IMPLS


def _clone(value):
    return value.clone() if isinstance(value, torch.Tensor) else value


class _FirstCalls(TorchDispatchMode):
    """Records the first call of each ``distill_ops::`` op (its arguments cloned before it runs)."""

    def __init__(self, impl, calls):
        super().__init__()
        self.impl, self.calls = impl, calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "distill_ops":
            self.calls.setdefault((func.name(), self.impl), (func, tree_map(_clone, args), tree_map(_clone, kwargs)))
        return func(*args, **kwargs)


class _Drafter:
    """A fake EAGLE drafter: random logits for each level (``_DynamicPlan.draft``'s interface)."""

    def __init__(self, vocab):
        self.vocab, self.generator = vocab, torch.Generator().manual_seed(5)

    def expand(self, tokens, parent_states, positions, tree):
        logits = torch.randn(tokens.shape[1], self.vocab, generator=self.generator).to(DEVICE)
        return logits[None], tokens.to(torch.float32)[..., None]


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def _public_calls(impl, patch):
    """One call of each public entry point that reaches a custom op, on ``impl``."""
    student, teacher = _randn(6, 50, seed=1).requires_grad_(True), _randn(6, 50, seed=2)
    distill_ops.kl_div(student, teacher, divergence="jsd", impl=impl).backward(torch.tensor(2.0, device=DEVICE))
    distill_ops.kl_div(student.detach().clone().requires_grad_(True), teacher, impl=impl, inplace_grad=True).backward()
    distill_ops.aligndistil_kl(student, _randn(6, 50, seed=3), _randn(6, 50, seed=4), impl=impl).backward()
    hidden, weight = _randn(5, 16, seed=5).requires_grad_(True), _randn(40, 16, seed=6).requires_grad_(True)
    loss = distill_ops.fused_linear_kl_div(hidden, weight, _randn(5, 12, seed=7), _randn(40, 12, seed=8),
                                           labels=torch.tensor([1, 2, -100, 3, 4], device=DEVICE), ce_weight=0.5,
                                           impl=impl)
    loss.backward()
    distill_ops.topk_kl_div(student, teacher, k=5, tail="bucket", impl=impl).backward()
    if impl == "torch":  # the tree / verification / engine ops below are the Triton paths' only
        return
    # These call their kernels directly in eager mode and through the op while torch.compile traces.
    patch.setattr(torch.compiler, "is_compiling", lambda: True)
    parents = torch.tensor([-1, 0, 0, 1, 1, 2, 3], device=DEVICE)
    tree = tree_spec_from_parents_tensor(parents, max_depth=3, max_children=2, impl=impl)
    batch, nodes, vocab = 2, parents.numel(), 30
    q, k, v = _randn(batch, 4, nodes, 16, seed=9), _randn(batch, 2, 20, 16, seed=10), _randn(batch, 2, 20, 16, seed=11)
    cache_lens = torch.tensor([5, 9], device=DEVICE)
    distill_ops.tree_attention(q, k, v, tree, cache_lens, impl=impl)
    draft_tokens = torch.randint(0, vocab, (batch, nodes), generator=torch.Generator().manual_seed(12)).to(DEVICE)
    logits = _randn(batch, nodes, vocab, seed=13)
    result = distill_ops.verify_greedy(tree, draft_tokens, logits, impl=impl)
    distill_ops.verify_sampling(tree, draft_tokens, logits, temperature=0.7, top_k=10, top_p=0.9,
                                generator=torch.Generator(device=DEVICE).manual_seed(14), impl=impl)
    distill_ops.compact_kv_cache(k.clone(), v.clone(), cache_lens, result, impl=impl)
    plan = speculative._DynamicPlan(topk=2, depth=3, num_nodes=6, vocab=vocab, device=torch.device(DEVICE),
                                    impl=impl)
    plan.draft(_Drafter(vocab), _randn(1, vocab, seed=15), torch.full((1, 1), -1.0, device=DEVICE), 7, 11,
               speculative._Timer(torch.device(DEVICE), sync=False))


@pytest.fixture(scope="module")
def captured():
    calls = {}
    for impl in IMPLS:
        with pytest.MonkeyPatch.context() as patch, _FirstCalls(impl, calls):
            _public_calls(impl, patch)
    return calls


def _registered_ops():
    return {name for name in torch._C._dispatch_get_all_op_names() if name.startswith("distill_ops::")}


def test_every_registered_op_is_captured(captured):
    """A new custom op must be reached by ``_public_calls`` (and so opchecked below)."""
    assert {name for name, _ in captured} == _registered_ops()
    assert len(_registered_ops()) == 16


# (op, impl) pairs: every op on the Triton path; those with a PyTorch body too on the torch path.
CASES = [(name, "triton") for name in (
    "kl_div_rows", "scale_rows_", "kl_div_rows_inplace", "aligndistil_rows", "fused_linear_kl_div_rows",
    "fused_linear_kl_div_backward", "topk_kl_dense_select", "topk_kl_teacher_lse", "topk_kl_rows", "tree_spec",
    "tree_attention", "verify_greedy", "verify_sampling", "compact_kv_cache", "eagle_level", "eagle_select",
)] + [(name, "torch") for name in (
    "kl_div_rows", "scale_rows_", "kl_div_rows_inplace", "aligndistil_rows", "fused_linear_kl_div_rows",
    "fused_linear_kl_div_backward", "topk_kl_teacher_lse", "topk_kl_rows",
)]


@pytest.mark.parametrize("name, impl", CASES, ids=[f"{name}-{impl}" for name, impl in CASES])
def test_custom_op_passes_opcheck(captured, name, impl):
    func, args, kwargs = captured[(f"distill_ops::{name}", impl)]
    torch.library.opcheck(func, args, kwargs)

