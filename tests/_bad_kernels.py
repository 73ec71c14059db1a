"""A kernel the GPU compiler rejects (the interpreter would run it): proves compile_check can fail."""

import triton
import triton.language as tl


@triton.jit
def _non_power_of_two_block_kernel(out_ptr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)  # BLOCK = 1000 is not a power of two: a compile error
    tl.store(out_ptr + offsets, offsets.to(tl.float32))


def aot_specs():
    return [
        {
            "name": "bad_non_power_of_two_block",
            "fn": _non_power_of_two_block_kernel,
            "signature": {"out_ptr": "*fp32"},
            "constexprs": {"BLOCK": 1000},
            "num_warps": 4,
            "num_stages": 1,
        }
    ]
