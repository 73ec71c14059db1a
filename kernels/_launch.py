"""Compiler options that every launch of ours passes explicitly, whatever the installed Triton's defaults.

``enable_fp_fusion=True``: the compiler may contract a multiply followed by an add into one fused multiply-add (one
rounding instead of two, one instruction instead of two). It is the default of every Triton up to 3.9, the setting
each kernel was measured with (``benchmarks/results/``) and is compiled with by ``benchmarks/compile_check.py``.
Triton 3.9 warns at the first launch that leaves it unset ("TRITON_DEFAULT_FP_FUSION is unset") and announces the
default turning off in 3.10, which would change every kernel's instructions and last-bit rounding with a Triton
upgrade. Passing it fixes both; ``TRITON_FORCE_DISABLE_FP_FUSION=1`` still turns it off for a debugging session.
The CPU interpreter ignores the option (it runs NumPy, which never contracts). ``tests/conftest.py`` checks every
launch of the test suite for these options.
"""

LAUNCH_OPTIONS = {"enable_fp_fusion": True}
