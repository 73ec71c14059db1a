"""Shared test configuration.

Without a CUDA device the Triton kernels run under Triton's CPU interpreter: ``TRITON_INTERPRET``
must be set before ``triton`` (and so ``distill_ops``) is imported, which is why it happens here.
"""

import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Tolerances against the float64 reference, per input dtype; set once here, never loosened per test.
TOLERANCES = {
    torch.float64: dict(rtol=1e-9, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.float16: dict(rtol=2e-2, atol=2e-3),
    torch.bfloat16: dict(rtol=5e-2, atol=1e-2),
}

IMPLS = ["torch", "triton"]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, msg: str = "") -> None:
    """Compare in float64 with the tolerance of ``dtype`` (the dtype of the inputs that produced ``actual``)."""
    torch.testing.assert_close(
        actual.detach().to(torch.float64).cpu(),
        expected.detach().to(torch.float64).cpu(),
        equal_nan=True,
        msg=(lambda m: f"{msg}\n{m}") if msg else None,
        **TOLERANCES[dtype],
    )


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module (``pytestmark = pytest.mark.usefixtures("one_thread")``): tiny
    models are dominated by per-op overhead, and extra threads only add contention on a shared 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class RecordTensorOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Records ``(op name, output shape)`` of every ATen op that returns a new tensor (views and in-place ops
    are left out), stepping into ``distill_ops`` custom ops: a dispatch mode otherwise sees such an op as one
    call, not the allocations and copies its implementation makes."""

    def __init__(self):
        super().__init__()
        self.records = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch._library.custom_ops import OPDEFS

        kwargs = kwargs or {}
        opdef = OPDEFS.get(func._schema.name) if func.namespace == "distill_ops" else None
        if opdef is not None:
            with self:
                return opdef._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        if not (func._schema.is_mutable or any(r.alias_info is not None for r in func._schema.returns)):
            outs = out if isinstance(out, (tuple, list)) else [out]
            self.records += [(str(func), tuple(t.shape)) for t in outs if isinstance(t, torch.Tensor)]
        return out

    def ops_with_numel(self, numel: int) -> list[str]:
        return [name for name, shape in self.records if math.prod(shape) == numel]
