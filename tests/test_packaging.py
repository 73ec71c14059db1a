"""The checkout's top-level ``kernels/`` directory must not shadow Hugging Face's ``kernels`` distribution.

``python -m pytest`` / ``python -m benchmarks`` put the repository root on ``sys.path``, where ``kernels/``
(installed as ``distill_ops.kernels``) would win the name ``kernels`` that transformers (>= 5) imports.
"""

import importlib.metadata
import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = """
import os, sys
import kernels
import distill_ops.kernels as ours
print(os.path.abspath(kernels.__file__))
print(os.path.abspath(ours.__file__))
print(len(ours.KERNEL_MODULES))
"""


def _distribution_installed() -> bool:
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_top_level_kernels_name_resolves_to_the_installed_distribution():
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    top_level, ours, count = out.stdout.split()
    ours_dir = os.path.join(REPO_ROOT, "kernels")
    assert os.path.dirname(ours) == ours_dir
    assert int(count) > 0
    if _distribution_installed():
        assert not top_level.startswith(ours_dir + os.sep), top_level
        # and it is the distribution transformers probes for
        assert os.path.dirname(top_level) != ours_dir
    else:
        # no distribution: the name falls back to this directory, which nothing else claims
        assert os.path.dirname(top_level) == ours_dir


def test_transformers_imports_from_a_checkout():
    out = subprocess.run(
        [sys.executable, "-c", "from transformers import LlamaConfig, LlamaForCausalLM; print('ok')"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"
