"""Kernels compile_check must fail on: one the GPU compiler rejects (the interpreter would run it), one that compiles
but spills registers."""

import triton
import triton.language as tl


@triton.jit
def _non_power_of_two_block_kernel(out_ptr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)  # BLOCK = 1000 is not a power of two: a compile error
    tl.store(out_ptr + offsets, offsets.to(tl.float32))


@triton.jit
def _spilling_tile_kernel(x_ptr, out_ptr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # A 128 x 256 fp32 tile held by one warp (~1000 live values per thread): it compiles, and spills.
    rows = tl.arange(0, BLOCK_M)[:, None]
    cols = tl.arange(0, BLOCK_N)[None, :]
    x = tl.load(x_ptr + rows * BLOCK_N + cols)
    y = tl.exp(x - tl.max(x, axis=0)[None, :])
    z = y / tl.sum(y, axis=1)[:, None]
    tl.store(out_ptr + rows * BLOCK_N + cols, z * tl.sum(z * x, axis=0)[None, :] + x)


def aot_specs():
    return [
        {
            "name": "bad_non_power_of_two_block",
            "fn": _non_power_of_two_block_kernel,
            "signature": {"out_ptr": "*fp32"},
            "constexprs": {"BLOCK": 1000},
            "num_warps": 4,
            "num_stages": 1,
        },
        {
            "name": "bad_spilling_tile",
            "fn": _spilling_tile_kernel,
            "signature": {"x_ptr": "*fp32", "out_ptr": "*fp32"},
            "constexprs": {"BLOCK_M": 128, "BLOCK_N": 256},
            "num_warps": 1,
            "num_stages": 1,
        },
    ]
