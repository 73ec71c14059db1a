"""Compiler options that every launch of ours passes explicitly, whatever the installed Triton's defaults.

``enable_fp_fusion``: whether the compiler may contract a multiply followed by an add into one fused multiply-add
(one rounding instead of two, one instruction instead of two). On, as in every Triton up to 3.9 by default: the
setting each kernel was measured with (``benchmarks/results/``) and is compiled with by
``benchmarks/compile_check.py``. Triton 3.9 warns at the first launch that leaves it unset ("TRITON_DEFAULT_FP_FUSION
is unset") and announces the default turning off in 3.10, which would change every kernel's instructions and
last-bit rounding with a Triton upgrade; passing it avoids both. A user who sets ``TRITON_DEFAULT_FP_FUSION`` (read
when this module is imported, with Triton's spelling: ``1`` / ``true`` / ``on``) still decides, on every version.
The CPU interpreter ignores the option (it runs NumPy, which never contracts). ``tests/conftest.py`` checks every
launch of the test suite for these options.
"""

from __future__ import annotations

import os


def _fp_fusion(setting: str | None) -> bool:
    return True if setting is None else setting.strip().lower() in ("1", "true", "on")


LAUNCH_OPTIONS = {"enable_fp_fusion": _fp_fusion(os.environ.get("TRITON_DEFAULT_FP_FUSION"))}
