"""Host-side inputs beside GPU tensors: a CPU ``normalizer`` (a token count made on the host) and a CPU
``torch.Generator`` are moved to the GPU without a stream synchronisation.

The synchronisation itself exists only on a CUDA device: there the tests run the ops under
``torch.cuda.set_sync_debug_mode("error")``, which raises on a synchronising copy (a plain ``.to("cuda")`` of a
CPU tensor did, before ``to_device_async``). On the CPU the same calls are checked for their values.
"""

import contextlib

import pytest
import torch

import distill_ops
from distill_ops._utils import to_device_async
from distill_ops.tree import build_tree
from distill_ops.verify import filter_thresholds, verify_sampling_ref
from tests.conftest import DEVICE, IMPLS, assert_close

CUDA = DEVICE.type == "cuda"


@contextlib.contextmanager
def _no_sync():
    """On CUDA: any synchronising operation inside raises. Elsewhere: nothing to check."""
    if not CUDA:
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_to_device_async_copies_values():
    """The values arrive; on a GPU the copy neither aliases nor races the caller's CPU tensor, which may change
    right after the call (on the CPU the result is the tensor itself, as ``.to`` gives)."""
    source = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    with _no_sync():
        moved = to_device_async(source, DEVICE)
        if CUDA:
            source.add_(100.0)
    assert moved.device.type == DEVICE.type
    assert torch.equal(moved.cpu(), torch.arange(6, dtype=torch.float32).reshape(2, 3))
    assert (moved is source) == (not CUDA)


@pytest.mark.parametrize("impl", IMPLS)
def test_cpu_normalizer_beside_device_logits(impl):
    """``normalizer`` as a CPU tensor (e.g. a ``num_items_in_batch`` counted on the host): the mean divides by it,
    forward and backward, with no synchronising copy on a GPU."""
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(5, 37, generator=generator, dtype=torch.float64)
    teacher = torch.randn(5, 37, generator=generator, dtype=torch.float64)
    logits = student.to(torch.float32).to(DEVICE).requires_grad_(True)
    with _no_sync():
        loss = distill_ops.kl_div(logits, teacher.to(torch.float32).to(DEVICE), normalizer=torch.tensor(8.0),
                                  impl=impl)
        loss.backward()
    reference = student.clone().requires_grad_(True)
    expected = torch.nn.functional.kl_div(reference.log_softmax(-1), teacher.log_softmax(-1), log_target=True,
                                          reduction="sum") / 8.0
    expected.backward()
    assert_close(loss, expected, torch.float32)
    assert_close(logits.grad, reference.grad, torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_cpu_generator_beside_device_logits(impl):
    """``verify_sampling`` with a CPU generator and logits on the device: the uniforms are the generator's (the
    result equals the one from uniforms drawn by hand), moved without a synchronising copy."""
    tree = build_tree(torch.tensor([-1, 0, 0, 1, 1, 2])).to(DEVICE)
    logits = torch.randn(2, 6, 11, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    tokens = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    with _no_sync():
        result = distill_ops.verify_sampling(tree, tokens, logits, temperature=0.9,
                                             generator=torch.Generator().manual_seed(3), impl=impl)
    uniforms = torch.rand((2, 6), generator=torch.Generator().manual_seed(3), dtype=torch.float32).to(DEVICE)
    thresholds = filter_thresholds(logits, 0.9, None, None)
    expected = verify_sampling_ref(tree, tokens, logits, thresholds, None, uniforms, 0.9)
    assert torch.equal(result.emitted_tokens, expected.emitted_tokens)
    assert torch.equal(result.accept_len, expected.accept_len)
