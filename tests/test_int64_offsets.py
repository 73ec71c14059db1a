"""Row offsets past 2^31 elements: the kernels compute them in int64.

Triton passes an integer argument below 2^31 as i32 and ``tl.program_id`` is i32, so ``row * stride`` wraps in a
kernel that does not cast one factor to int64 first, once the product passes 2^31 - 1 (N·V is ~1.7e10 at 64k rows of
a 256k vocabulary). An audit of every kernel's offsets (2026-12-06) found them int64 wherever they can get there;
these tests keep two of them so, cheaply: one 8 GiB bf16 storage that is never touched except for a few rows
(``torch.empty`` commits no memory on the CPU; on a GPU it is a real 8 GiB allocation), viewed with a row stride of
2^30 + 16 (an i32 argument) from element 2^31. Row 2 then starts at 2^31 + 2^31 + 32: computed in int32 it wraps to
element 32 of the storage, which holds a sentinel. The CPU interpreter reproduces the wrap (numpy int32 arithmetic);
both tests fail with the casts removed.
"""

import torch

from distill_ops.kernels.kl_div import kl_div_forward
from distill_ops.kernels.scale_rows import scale_rows_
from tests.conftest import DEVICE, assert_close

STRIDE = 2**30 + 16  # below 2^31: Triton passes it as i32
BASE = 2**31  # storage offset of row 0
WRAPPED = BASE + 2 * STRIDE - 2**32  # = 32: where row 2's offset lands when computed in int32
V = 16
SENTINEL = 100.0


def _huge_storage():
    storage = torch.empty(BASE + 2 * STRIDE + 4 * V, dtype=torch.bfloat16, device=DEVICE)  # ~8 GiB, untouched
    storage[: WRAPPED + 4 * V].fill_(SENTINEL)  # what a wrapped offset would read or overwrite
    return storage


def _rows(storage, values, offset=0):
    """``values [3, V]`` written to rows at ``STRIDE`` apart from storage element ``BASE + offset``; the view."""
    rows = torch.as_strided(storage, (3, V), (STRIDE, 1), BASE + offset)
    for index in range(3):
        rows[index].copy_(values[index])
    return rows


def _values(seed):
    return torch.randn(3, V, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16).to(DEVICE)


def test_scale_rows_offsets_past_2_31():
    storage = _huge_storage()
    values = _values(1)
    grad = _rows(storage, values)
    upstream = torch.tensor([2.0, 0.5, 4.0], device=DEVICE)  # powers of two: the products are exact in bf16
    scale_rows_(grad, upstream)
    assert torch.equal(grad, (values.double() * upstream[:, None].double()).to(torch.bfloat16))
    assert torch.all(storage[: WRAPPED + 4 * V] == SENTINEL)  # nothing written at the wrapped address


def test_kl_div_offsets_past_2_31():
    storage = _huge_storage()
    student_values, teacher_values = _values(2), _values(3)
    student = _rows(storage, student_values)
    teacher = _rows(storage, teacher_values, offset=V)  # each teacher row right after its student row
    grad = torch.empty(3, V, dtype=torch.bfloat16, device=DEVICE)
    loss = kl_div_forward(student, teacher, None, grad, torch.ones(1, device=DEVICE), divergence="forward", coef=0.0,
                          temperature=1.0, ignore_index=-100)
    log_q = torch.log_softmax(student_values.double(), -1)
    log_p = torch.log_softmax(teacher_values.double(), -1)
    assert_close(loss, (log_p.exp() * (log_p - log_q)).sum(-1), torch.float32, "loss")
    assert_close(grad, log_q.exp() - log_p.exp(), torch.bfloat16, "gradient")
    assert torch.all(storage[: WRAPPED + 4 * V] == SENTINEL)
