"""Per-row top-``count`` selection by radix select (the dense teacher of ``topk_kl_div``).

``_topk_select_kernel`` runs one program per row of ``rows [N, V]`` (fp32 / fp16 / bf16, unit stride
along V, any row stride) and writes the row's ``count`` largest entries: ``values [N, count]`` (the
input dtype) and ``indices [N, count]`` (int64), **in ascending vocabulary index order** (callers that
need them by value sort the small [N, count] result). The vocabulary is never sorted.

**Order and ties.** Each value maps to an int32 key with the same order (IEEE bits; negative values
get their magnitude bits flipped). ``-0.0`` and ``+0.0`` share one key (they are equal values). Every
NaN (either sign, any payload) gets the largest key: NaN ranks above ``+inf``, as in ``torch.topk``.
Entries with equal keys are taken lower vocabulary index first, so the selected set is the first
``count`` entries of a stable descending sort. 16-bit inputs use their own 16 bits (fp16 and bf16
alike), fp32 its 32.

**Radix select** (``_select_into``) over 8-bit digits of the key, most significant first: each digit
pass streams the entries and builds a 256-bin histogram (``tl.histogram`` with a mask) of the digit
among the entries whose higher digits equal the threshold's digits found so far; the threshold's
digit is the bin where the count from the top reaches the number still to pick (2 passes for 16-bit
keys, 4 for fp32). A final pass writes the entries above the threshold key and the first
``count - (#above)`` entries equal to it, in index order (an in-block exclusive ``tl.cumsum`` of the
take mask plus a running count across blocks gives each entry its output slot).

**Candidate filter.** ``tl.histogram`` lowers to warp ballots: per entry, one ballot per digit bit and
a mask-and-popcount for each of the 8 bins a lane owns (about 50 instructions, read from Triton's
lowering, not measured), so radix passes over a whole 128k-entry row would cost more than its memory
traffic. The kernel therefore runs them on a short candidate list:

1. Pass 1 over the row keeps the running maximum key of each of the ``BLOCK_V`` lanes (one
   ``max`` per entry). The lane maxima are ``BLOCK_V`` distinct entries of the row (lanes past V hold a key
   below every value's), so when
   ``count <= BLOCK_V`` their ``count``-th largest (a radix select on that one register block) is a
   lower bound on the row's ``count``-th largest key.
2. Pass 2 copies the entries at or above the bound (value and int32 index, in index order) into a
   per-row scratch list of ``capacity`` slots. For independent, identically distributed logits about
   ``count`` entries pass; every tied entry passes too.
3. When they fit, the radix select runs on the scratch list; otherwise (heavy ties, adversarial rows,
   or ``count > BLOCK_V`` with ``V > capacity``, where passes 1 and 2 are skipped) on the row itself,
   which is then read up to ``2 + digits + 1`` times. The result does not depend on the path.

So a 16-bit or fp32 row is usually read twice (the second read may hit L2; not measured). The
scratch list is ``capacity * (itemsize + 4)`` bytes per row; the launcher bounds the scratch
allocation by launching the rows in chunks.

**Launch configuration** (reasoned, not tuned on a GPU). ``BLOCK_V = 4096`` entries per step over the
row with 16 warps (8 entries per thread: 16-byte loads in 16-bit, two in fp32) and
``CANDIDATE_BLOCK = 1024`` over the scratch list: 79-122 registers (compile_check, Triton 3.6 and
3.9, spill-free), so one 512-thread program per SM. Few rows in flight is deliberate: about 132
rows of 256 KiB (V = 131072, bf16) on an H100/H200 fit in its 50 MB L2 between pass 1 and pass 2.
(8 warps at ``BLOCK_V = 2048`` spill: Triton 3.6 in 16-bit, 3.9 in fp32. ``count <= BLOCK_V`` is also
what lets the filter cover every k the top-k loss kernel accepts.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._device import on_input_device
from ._launch import LAUNCH_OPTIONS

BLOCK_V = 4096
CANDIDATE_BLOCK = 1024
NUM_WARPS = 16
KEY_BITS = {torch.float32: 32, torch.float16: 16, torch.bfloat16: 16}
# Scratch slots per row: CAPACITY_FACTOR * count, at least MIN_CAPACITY, at most V.
CAPACITY_FACTOR = 4
MIN_CAPACITY = 1024
# Bytes of scratch one launch may use; more rows are launched in chunks.
SCRATCH_BYTES = 1 << 27


@triton.jit
def _order_key(x, KEY_BITS: tl.constexpr):
    """int32 key with the order of ``x`` (NaN highest, -0.0 keyed as +0.0), read from the bits only
    (no float comparison: the interpreter's bf16 ``x != x`` misses NaN)."""
    if KEY_BITS == 32:
        bits = x.to(tl.int32, bitcast=True)
        nan_key = 2147483647
        inf_bits = 0x7F800000
    else:
        bits = x.to(tl.int16, bitcast=True).to(tl.int32)
        nan_key = 32767
        if x.dtype == tl.bfloat16:
            inf_bits = 0x7F80
        else:
            inf_bits = 0x7C00
    magnitude = bits & nan_key
    # Negative values: flip the magnitude bits so that a larger magnitude gives a smaller key.
    key = tl.where(bits < 0, bits ^ nan_key, bits)
    key = tl.where(magnitude == 0, 0, key)
    return tl.where(magnitude > inf_bits, nan_key, key)


@triton.jit
def _radix_bits(key, KEY_BITS: tl.constexpr):
    """The key as an unsigned bit pattern (in an int32) whose unsigned order is the key order."""
    if KEY_BITS == 32:
        return key ^ -2147483648
    else:
        return key + 32768


@triton.jit
def _key_from_radix_bits(bits, KEY_BITS: tl.constexpr):
    if KEY_BITS == 32:
        return bits ^ -2147483648
    else:
        return bits - 32768


@triton.jit
def _threshold_digit(histogram, remaining):
    """(digit, entries still to pick after it): the bin where the count from the top reaches ``remaining``."""
    bins = tl.arange(0, 256)
    # at_or_above[d]: entries whose digit is >= d (non-increasing; at d = 0 all of them, >= remaining).
    at_or_above = tl.sum(histogram, axis=0) - tl.cumsum(histogram, axis=0) + histogram
    digit = tl.sum((at_or_above >= remaining).to(tl.int32), axis=0) - 1
    above = tl.sum(tl.where(bins == digit, at_or_above - histogram, 0), axis=0)
    return digit, remaining - above


@triton.jit
def _kth_largest_key(keys, count, KEY_BITS: tl.constexpr):
    """The ``count``-th largest of a register block of keys (radix select without streaming)."""
    bits = _radix_bits(keys, KEY_BITS)
    known_mask = 0
    known_bits = 0
    remaining = count
    for digit_pass in range(KEY_BITS // 8):
        shift = KEY_BITS - 8 - 8 * digit_pass
        matches = (bits & known_mask) == known_bits
        digit, remaining = _threshold_digit(tl.histogram((bits >> shift) & 0xFF, 256, mask=matches), remaining)
        known_mask |= 0xFF << shift
        known_bits |= digit << shift
    return _key_from_radix_bits(known_bits, KEY_BITS)


@triton.jit
def _select_into(
    src_ptr,
    src_index_ptr,
    length,
    count,
    values_out,
    indices_out,
    KEY_BITS: tl.constexpr,
    BLOCK: tl.constexpr,
    GATHERED: tl.constexpr,
):
    """Radix-select the ``count`` largest of ``src[0:length]`` into the output row, in source order.

    ``GATHERED``: the entries' vocabulary indices are ``src_index[0:length]`` (the scratch list);
    otherwise their positions (the row itself).
    """
    offsets = tl.arange(0, BLOCK)
    # Digits of the threshold's radix bits found so far (known_mask marks their positions) and the
    # number of entries still to pick among those that share them.
    known_mask = 0
    known_bits = 0
    remaining = count
    for digit_pass in range(KEY_BITS // 8):
        shift = KEY_BITS - 8 - 8 * digit_pass
        histogram = tl.zeros([256], tl.int32)
        for start in range(0, length, BLOCK):
            cols = start + offsets
            valid = cols < length
            bits = _radix_bits(_order_key(tl.load(src_ptr + cols, mask=valid, other=0.0), KEY_BITS), KEY_BITS)
            matches = valid & ((bits & known_mask) == known_bits)
            histogram += tl.histogram((bits >> shift) & 0xFF, 256, mask=matches)
        digit, remaining = _threshold_digit(histogram, remaining)
        known_mask |= 0xFF << shift
        known_bits |= digit << shift

    threshold = _key_from_radix_bits(known_bits, KEY_BITS)
    seen_equal = 0
    written = 0
    for start in range(0, length, BLOCK):
        cols = start + offsets
        valid = cols < length
        x = tl.load(src_ptr + cols, mask=valid, other=0.0)
        key = _order_key(x, KEY_BITS)
        equal = (valid & (key == threshold)).to(tl.int32)
        equal_rank = seen_equal + tl.cumsum(equal, axis=0) - equal
        take = (valid & (key > threshold)) | ((equal != 0) & (equal_rank < remaining))
        taken = take.to(tl.int32)
        slot = written + tl.cumsum(taken, axis=0) - taken
        if GATHERED:
            index = tl.load(src_index_ptr + cols, mask=take, other=0)
        else:
            index = cols
        tl.store(values_out + slot, x, mask=take)
        tl.store(indices_out + slot, index.to(tl.int64), mask=take)
        seen_equal += tl.sum(equal, axis=0)
        written += tl.sum(taken, axis=0)


@triton.jit
def _topk_select_kernel(
    rows_ptr,
    values_ptr,
    indices_ptr,
    scratch_values_ptr,
    scratch_indices_ptr,
    stride_rows,
    V,
    count,
    capacity,
    KEY_BITS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    CANDIDATE_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = rows_ptr + row * stride_rows
    values_out = values_ptr + row * count
    indices_out = indices_ptr + row * count
    scratch_values = scratch_values_ptr + row * capacity
    scratch_indices = scratch_indices_ptr + row * capacity
    offsets = tl.arange(0, BLOCK_V)
    if KEY_BITS == 32:
        key_floor = -2147483648  # below every value's key (it would be a NaN's, and NaNs are keyed on top)
    else:
        key_floor = -32768

    # Pass 1: a lower bound on the count-th largest key (the count-th largest lane maximum).
    bound = tl.full([], key_floor, tl.int32)
    if count <= BLOCK_V:
        lane_max = tl.full([BLOCK_V], key_floor, tl.int32)
        for start in range(0, V, BLOCK_V):
            cols = start + offsets
            in_row = cols < V
            key = _order_key(tl.load(row_ptr + cols, mask=in_row, other=0.0), KEY_BITS)
            lane_max = tl.maximum(lane_max, tl.where(in_row, key, key_floor))
        bound = _kth_largest_key(lane_max, count, KEY_BITS)

    # Pass 2: the entries at or above the bound, into the scratch list (in index order).
    num_candidates = V
    if (count <= BLOCK_V) | (V <= capacity):
        num_candidates = 0
        for start in range(0, V, BLOCK_V):
            cols = start + offsets
            in_row = cols < V
            x = tl.load(row_ptr + cols, mask=in_row, other=0.0)
            candidate = in_row & (_order_key(x, KEY_BITS) >= bound)
            flags = candidate.to(tl.int32)
            slot = num_candidates + tl.cumsum(flags, axis=0) - flags
            fits = candidate & (slot < capacity)
            tl.store(scratch_values + slot, x, mask=fits)
            tl.store(scratch_indices + slot, cols, mask=fits)
            num_candidates += tl.sum(flags, axis=0)

    if num_candidates <= capacity:
        # The scratch stores must be visible to every thread of the CTA before it reads them back.
        tl.debug_barrier()
        _select_into(scratch_values, scratch_indices, num_candidates, count, values_out, indices_out, KEY_BITS,
                     CANDIDATE_BLOCK, True)
    else:
        _select_into(row_ptr, row_ptr, V, count, values_out, indices_out, KEY_BITS, BLOCK_V, False)


def default_capacity(count: int, vocab: int) -> int:
    return min(vocab, max(CAPACITY_FACTOR * count, MIN_CAPACITY))


@on_input_device
def topk_select(
    rows: torch.Tensor,
    count: int,
    *,
    capacity: int | None = None,
    block_v: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``count`` largest entries of each row, in ascending index order (module docstring).

    ``rows [N, V]`` fp32 / fp16 / bf16 with unit column stride, ``1 <= count <= V``. Returns
    ``(values [N, count] rows.dtype, indices [N, count] int64)``. ``capacity`` (scratch slots per
    row), ``block_v`` and ``num_warps`` override the defaults (tests use them to reach every path).
    """
    if rows.dim() != 2 or rows.dtype not in KEY_BITS:
        raise ValueError(f"rows must be [N, V] float32 / float16 / bfloat16, got shape {tuple(rows.shape)} and "
                         f"{rows.dtype}")
    num_rows, vocab = rows.shape
    if not 1 <= count <= vocab:  # a larger count returned uninitialised memory as indices
        raise ValueError(f"count must be in [1, {vocab}] (the row width), got {count}")
    values = rows.new_empty((num_rows, count))
    indices = torch.empty((num_rows, count), dtype=torch.int64, device=rows.device)
    if num_rows == 0:
        return values, indices
    capacity = capacity or default_capacity(count, vocab)
    chunk = max(1, min(num_rows, SCRATCH_BYTES // (capacity * (rows.element_size() + 4))))
    scratch_values = rows.new_empty((chunk, capacity))
    scratch_indices = torch.empty((chunk, capacity), dtype=torch.int32, device=rows.device)
    for start in range(0, num_rows, chunk):
        stop = min(start + chunk, num_rows)
        _topk_select_kernel[(stop - start,)](
            rows[start:stop], values[start:stop], indices[start:stop], scratch_values, scratch_indices,
            rows.stride(0), vocab, count, capacity, KEY_BITS=KEY_BITS[rows.dtype], BLOCK_V=block_v or BLOCK_V,
            CANDIDATE_BLOCK=CANDIDATE_BLOCK, num_warps=num_warps or NUM_WARPS, **LAUNCH_OPTIONS,
        )
    return values, indices


def aot_specs() -> list[dict]:
    return [
        {
            "name": f"topk_select[{dtype}]",
            "fn": _topk_select_kernel,
            "signature": {
                "rows_ptr": f"*{dtype}",
                "values_ptr": f"*{dtype}",
                "indices_ptr": "*i64",
                "scratch_values_ptr": f"*{dtype}",
                "scratch_indices_ptr": "*i32",
                "stride_rows": "i64",
                "V": "i32",
                "count": "i32",
                "capacity": "i32",
            },
            "constexprs": {"KEY_BITS": 32 if dtype == "fp32" else 16, "BLOCK_V": BLOCK_V,
                           "CANDIDATE_BLOCK": CANDIDATE_BLOCK},
            "num_warps": NUM_WARPS,
            "num_stages": 3,
        }
        for dtype in ("bf16", "fp16", "fp32")
    ]
