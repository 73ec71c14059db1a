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


def _interpreter_modules():
    """(``triton.runtime.interpreter``, ``triton.language``) when Triton's CPU interpreter runs the kernels, else
    (None, None) (no Triton: the PyTorch implementations run)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None, None
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return None, None
    return interpreter, tl


def _interpreter_rounds_bf16_to_nearest() -> None:
    """Make Triton's CPU interpreter convert fp32 / fp64 to bf16 as a GPU does: round to nearest even.

    A GPU lowers every fp32 -> bf16 conversion (``.to(tl.bfloat16)``, a store of fp32 values through a bf16 pointer)
    to ``cvt.rn.bf16.f32``, within half an ulp. Triton 3.6's interpreter truncates the mantissa instead (up to one
    ulp, always towards zero), and converts fp64 to bf16 as an integer cast. The kernel tests would then measure the
    emulator: a bf16 gradient stored one ulp low before a GEMM whose terms cancel was 0.014 off where the GPU
    rounding is within 0.004 (a fused-linear weight gradient found by ``DISTILL_OPS_FUZZ``). The conversion here
    rounds to nearest even like the GPU and PyTorch (``tests/test_interpreter_numerics.py`` compares it with
    PyTorch's bit for bit); every other cast is the interpreter's own."""
    import numpy as np

    interpreter, tl = _interpreter_modules()
    if interpreter is None:
        return
    builder = interpreter.InterpreterBuilder
    if getattr(builder.cast_impl, "rounds_bf16_to_nearest", False):
        return
    original = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if dst_type.scalar == tl.bfloat16 and src.dtype.scalar in (tl.float32, tl.float64):
            # NumPy only (no torch tensor: the memory tests record every allocation). fp64 goes through fp32 as
            # in PyTorch's conversion; NaN becomes PyTorch's quiet NaN 0x7FC0.
            values = np.asarray(src.data, dtype=np.float32)
            bits = values.view(np.uint32).astype(np.uint64)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            return interpreter.TensorHandle(np.where(np.isnan(values), np.uint16(0x7FC0), rounded), tl.bfloat16)
        return original(self, src, dst_type)

    cast_impl.rounds_bf16_to_nearest = True
    builder.cast_impl = cast_impl


_interpreter_rounds_bf16_to_nearest()


def _interpreter_types_comparisons_as_int1() -> None:
    """Label the results of Triton's CPU interpreter's comparisons ``int1``, as the compiler types them.

    The interpreter computes a comparison as NumPy booleans but labels the result with its operands' type (an
    ``i32 < i32`` is labelled ``int32``). Triton 3.9's interpreter splats a scalar by its label, so a scalar
    comparison combined with a block mask (``(cols < V) & (row < n)``) became an int32 block that ``tl.load``
    refuses ("mask has unsupported dtype"): none of our kernels ran under it. Earlier releases splat by the data.
    Only the label changes; the values are the interpreter's own."""
    interpreter, tl = _interpreter_modules()
    if interpreter is None:
        return
    builder = interpreter.InterpreterBuilder
    for name in dir(builder):
        compare = getattr(builder, name)
        if not name.startswith(("create_icmp", "create_fcmp")) or getattr(compare, "labels_int1", False):
            continue

        def labelled(self, lhs, rhs, compare=compare):
            return interpreter.TensorHandle(compare(self, lhs, rhs).data, tl.int1)

        labelled.labels_int1 = True
        setattr(builder, name, labelled)


_interpreter_types_comparisons_as_int1()

# Tolerances against the float64 reference, per input dtype; set once here, never loosened per test.
TOLERANCES = {
    torch.float64: dict(rtol=1e-9, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.float16: dict(rtol=2e-2, atol=2e-3),
    torch.bfloat16: dict(rtol=5e-2, atol=1e-2),
}

IMPLS = ["torch", "triton"]


def property_settings(max_examples: int, **kwargs):
    """hypothesis settings of the property tests: ``max_examples`` derandomized examples (the same every run), no
    example database, no deadline. ``DISTILL_OPS_FUZZ=N`` in the environment runs N times as many examples from a
    random seed instead (a longer search for new failures; a failure prints the seed and blob that reproduce it)."""
    from hypothesis import HealthCheck, settings

    fuzz = os.environ.get("DISTILL_OPS_FUZZ", "").strip()
    if fuzz and (not fuzz.isdigit() or int(fuzz) < 1):
        raise ValueError(f"DISTILL_OPS_FUZZ must be a positive integer (the examples' multiplier), got {fuzz!r}")
    factor = int(fuzz) if fuzz else 1
    return settings(
        max_examples=max_examples * factor,
        deadline=None,
        derandomize=not fuzz,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
        **kwargs,
    )


def word_tokenizer(vocab: int):
    """A word-level ``transformers`` tokenizer over ids ``0 .. vocab - 1`` (words ``t0``, ``t1``, ...; pad ``t0``,
    EOS ``t1``, unknown ``t2``), built in memory: no download."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t2"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="t0", eos_token="t1",
                                                unk_token="t2")


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
        self.touched = []  # (op name, shape) of every tensor an op reads, writes or returns, in-place ops too

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch._library.custom_ops import OPDEFS

        kwargs = kwargs or {}
        opdef = OPDEFS.get(func._schema.name) if func.namespace == "distill_ops" else None
        if opdef is not None:
            with self:
                return opdef._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        outs = out if isinstance(out, (tuple, list)) else [out]
        is_view = not func._schema.is_mutable and any(r.alias_info is not None for r in func._schema.returns)
        if not (func._schema.is_mutable or is_view):
            self.records += [(str(func), tuple(t.shape)) for t in outs if isinstance(t, torch.Tensor)]
        if not is_view:  # views and detach move no data
            tensors = [t for t in (*args, *kwargs.values(), *outs) if isinstance(t, torch.Tensor)]
            self.touched += [(str(func), tuple(t.shape)) for t in tensors]
        return out

    def ops_with_numel(self, numel: int) -> list[str]:
        return [name for name, shape in self.records if math.prod(shape) == numel]

    def ops_touching_numel(self, numel: int) -> list[str]:
        return [name for name, shape in self.touched if math.prod(shape) == numel]


# --------------------------------------------------------------------------------------------------
# Every launch of one of our kernels, in every test, runs on the device of its tensors
# --------------------------------------------------------------------------------------------------
# Triton launches on the current device whatever device the tensors are on, so each launcher of
# distill_ops.kernels makes its inputs' device current (kernels/_device.py). Checked here at each launch, for
# the whole suite: the device the innermost launcher chose must be the device of every tensor argument (and, on
# CUDA, the current device). A launcher left unwrapped has chosen none and fails whichever test reaches it. Each
# launch also passes the explicit compiler options of kernels/_launch.py (the interpreter would ignore them unseen).
LAUNCHES_CHECKED = [0]


def _checked_launch(run):
    def checked_run(self, *args, **kwargs):
        module = getattr(getattr(self, "fn", None), "__module__", "") or ""
        if module.startswith("distill_ops.kernels") and not kwargs.get("warmup", False):
            from distill_ops.kernels._device import launch_device

            chosen = launch_device()
            devices = {arg.device for arg in (*args, *kwargs.values()) if isinstance(arg, torch.Tensor)}
            current = torch.cuda.current_device() if chosen is not None and chosen.type == "cuda" else None
            if chosen is None or devices - {chosen} or (current is not None and current != chosen.index):
                raise AssertionError(
                    f"{module}.{self.fn.__name__} launched with tensors on {sorted(map(str, devices))} while the "
                    f"launcher chose device {chosen} (current CUDA device {current}): every launcher must be "
                    "wrapped by kernels._device.on_input_device"
                )
            from distill_ops.kernels._launch import LAUNCH_OPTIONS

            missing = {key: value for key, value in LAUNCH_OPTIONS.items() if kwargs.get(key) != value}
            if missing:
                raise AssertionError(
                    f"{module}.{self.fn.__name__} launched without {missing}: every launch passes "
                    "kernels._launch.LAUNCH_OPTIONS"
                )
            LAUNCHES_CHECKED[0] += 1
        return run(self, *args, **kwargs)

    checked_run.__wrapped__ = run
    return checked_run


def _check_launch_devices() -> None:
    import triton.runtime.interpreter as interpreter
    import triton.runtime.jit as jit

    for cls in (interpreter.InterpretedFunction, jit.JITFunction):
        if not hasattr(cls.run, "__wrapped__"):
            cls.run = _checked_launch(cls.run)


_check_launch_devices()
