"""fp32 / fp64 -> bf16 conversions inside kernels round to nearest even, as PyTorch's ``.to(torch.bfloat16)``.

On a GPU this is the hardware's ``cvt.rn.bf16.f32``; under Triton's CPU interpreter it is the conversion that
``tests/conftest.py`` installs (the interpreter of Triton 3.6 truncates, and casts fp64 as an integer), so the
bf16 outputs of the kernel tests are those a GPU would write. Both conversion routes are checked: an explicit
``.to(tl.bfloat16)`` and a store of wider values through a bf16 pointer.
"""

import pytest
import torch
import triton
import triton.language as tl

from tests.conftest import DEVICE


@triton.jit
def _convert_kernel(X, CAST_OUT, STORE_OUT, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0)
    tl.store(CAST_OUT + offs, x.to(tl.bfloat16), mask=mask)
    tl.store(STORE_OUT + offs, x, mask=mask)  # implicit conversion to the pointer's bf16


def _hard_values(dtype):
    """Random values, exact ties between two bf16 neighbours (both parities), values one fp32 ulp either side of a
    tie, a mantissa of all ones (rounding carries into the exponent), subnormals, the largest finite values and
    the specials."""
    generator = torch.Generator().manual_seed(0)
    random = torch.randn(200, generator=generator, dtype=torch.float64) * torch.logspace(-30, 30, 200,
                                                                                            dtype=torch.float64)
    bits = torch.tensor([0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF, 0x3FFFFFFF, 0x3F7FFFFF, 0xBF808000,
                         0x00400000, 0x00018000, 0x7F7FFFFF, 0x7F7F8000],
                        dtype=torch.int64).to(torch.int32).view(torch.float32)
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 1.0, -1.0, 3.0, 1e-45])
    values = torch.cat([random.to(torch.float32), bits, specials]).to(dtype)
    return values


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_conversion_to_bf16_rounds_to_nearest_even(dtype):
    values = _hard_values(dtype).to(DEVICE)
    cast_out = torch.empty(values.shape, dtype=torch.bfloat16, device=DEVICE)
    store_out = torch.empty_like(cast_out)
    _convert_kernel[(1,)](values, cast_out, store_out, values.numel(), BLOCK=triton.next_power_of_2(values.numel()))
    expected = values.cpu().to(torch.bfloat16)
    for route, out in (("cast", cast_out), ("store", store_out)):
        got = out.cpu()
        mismatch = (got.view(torch.int16) != expected.view(torch.int16)).nonzero().flatten().tolist()
        assert not mismatch, (
            f"{route}: {len(mismatch)} conversions differ from round-to-nearest-even, e.g. "
            f"{values[mismatch[0]].item()!r} -> {got[mismatch[0]].item()!r}, expected {expected[mismatch[0]].item()!r}"
        )


def test_nan_stays_nan():
    values = torch.tensor([float("nan"), -float("nan"), 1.0], device=DEVICE)
    cast_out = torch.empty(values.shape, dtype=torch.bfloat16, device=DEVICE)
    store_out = torch.empty_like(cast_out)
    _convert_kernel[(1,)](values, cast_out, store_out, 3, BLOCK=4)
    for out in (cast_out, store_out):
        assert out[:2].isnan().all() and out[2].item() == 1.0
