"""Backward of the losses that store their gradient in forward: scale each row in place.

The stored gradient already carries the reduction's weight (1/count for ``mean``), so the incoming
gradient is usually exactly 1. Each program reads its row's incoming gradient on the device and
skips the row when it is 1: the common ``loss.backward()`` then moves no [N, V] bytes at all,
without a host synchronisation to find that out.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._device import on_input_device
from ._launch import LAUNCH_OPTIONS

BLOCK_V = 4096
NUM_WARPS = 8


@triton.jit
def _scale_rows_kernel(grad_ptr, upstream_ptr, stride_grad, stride_upstream, V, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    scale = tl.load(upstream_ptr + row * stride_upstream).to(tl.float32)
    if scale != 1.0:
        grad_row = grad_ptr + row * stride_grad
        offsets = tl.arange(0, BLOCK_V)
        for start in range(0, V, BLOCK_V):
            cols = start + offsets
            mask = cols < V
            values = tl.load(grad_row + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(grad_row + cols, (values * scale).to(grad_ptr.dtype.element_ty), mask=mask)


@on_input_device
def scale_rows_(grad: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    """``grad[i, :] *= upstream[i]`` in place (``grad`` [N, V] unit column stride, ``upstream`` [N] any stride)."""
    num_rows, vocab = grad.shape
    if upstream.shape != (num_rows,):  # the kernel reads upstream[i] for every row: a short one reads past its end
        raise ValueError(f"upstream must have shape [{num_rows}] (grad's rows), got {tuple(upstream.shape)}")
    if num_rows > 0 and vocab > 0:
        _scale_rows_kernel[(num_rows,)](
            grad, upstream, grad.stride(0), upstream.stride(0), vocab, BLOCK_V=BLOCK_V, num_warps=NUM_WARPS,
            **LAUNCH_OPTIONS,
        )
    return grad


def aot_specs() -> list[dict]:
    return [
        {
            "name": f"scale_rows[{dtype}]",
            "fn": _scale_rows_kernel,
            "signature": {
                "grad_ptr": f"*{dtype}",
                "upstream_ptr": "*fp32",
                "stride_grad": "i64",
                "stride_upstream": "i64",
                "V": "i32",
            },
            "constexprs": {"BLOCK_V": BLOCK_V},
            "num_warps": NUM_WARPS,
            "num_stages": 1,
        }
        for dtype in ("bf16", "fp16", "fp32")
    ]
