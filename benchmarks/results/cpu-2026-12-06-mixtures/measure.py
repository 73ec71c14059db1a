"""kl_div's PyTorch fallback (``impl="torch"``) for the mixture divergences on the CPU: forward + backward, fp32,
minimum over repeated runs, with the eager JSD formula beside it (the table of ``cpu-2026-12-06-fallback``'s
``measure.py``, for other divergences).

    python benchmarks/results/cpu-2026-12-06-mixtures/measure.py LABEL   (from the repository root)
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

_spec = importlib.util.spec_from_file_location(
    "fallback_measure", pathlib.Path(__file__).parent.parent / "cpu-2026-12-06-fallback" / "measure.py"
)
_fallback = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fallback)

CASES = (("jsd", {"beta": 0.5}), ("skew_forward", {"alpha": 0.1}), ("skew_reverse", {"alpha": 0.1}))

if __name__ == "__main__":
    _fallback.main(sys.argv[1] if len(sys.argv) > 1 else "run", CASES)
