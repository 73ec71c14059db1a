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


NO_TRITON_PROBE = """
import sys, torch
sys.modules["triton"] = None  # as on Windows / macOS: no Triton wheel
import importlib.util
importlib.util.find_spec = (lambda find: lambda name, *a: None if name == "triton" else find(name, *a))(
    importlib.util.find_spec)
import distill_ops
from distill_ops._utils import TRITON_PROBLEM, resolve_impl
print(resolve_impl("auto", torch.device("cuda")), resolve_impl("auto", torch.device("cpu")))
try:
    resolve_impl("triton", torch.device("cuda"))
except RuntimeError as error:
    print("error:", error)
s, t = torch.randn(3, 10), torch.randn(3, 10)
print(float(distill_ops.kl_div(s, t)) == float(distill_ops.kl_div(s, t, impl="torch")))
"""


def test_without_triton_auto_runs_pytorch_and_triton_says_why():
    """No Triton installed (no wheels for Windows / macOS, where CUDA torch exists): ``impl="auto"`` picks the PyTorch
    implementations on CUDA tensors too (it picked Triton and failed with ModuleNotFoundError), and ``impl="triton"``
    is an error naming the missing package. Run in a fresh interpreter where importing triton fails."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-c", NO_TRITON_PROBE], cwd=REPO_ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "torch torch"
    assert lines[1].startswith("error: impl='triton': Triton is not installed (it has wheels for Linux only")
    assert lines[2] == "True"


def test_rocm_build_runs_the_pytorch_implementations_and_triton_says_why():
    """A ROCm torch (``torch.version.hip`` set) calls AMD GPUs "cuda": ``impl="auto"`` picked the Triton kernels there,
    which target NVIDIA GPUs (for gfx942 the fp32 tree attention does not compile and the 16-bit one at head dim 128
    overflows the LDS). Now auto runs PyTorch on them and ``impl="triton"`` says why; the CPU interpreter is
    unaffected. Fresh interpreter, ``torch.version.hip`` set before distill_ops is imported."""
    probe = """
import torch
torch.version.hip = "6.4.43484"
from distill_ops._utils import resolve_impl
print(resolve_impl("auto", torch.device("cuda")), resolve_impl("triton", torch.device("cpu")))
try:
    resolve_impl("triton", torch.device("cuda"))
except RuntimeError as error:
    print(error)
"""
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "torch triton"
    assert lines[1].startswith("impl='triton': the Triton kernels target NVIDIA GPUs and are not supported on ROCm "
                               "(torch.version.hip = 6.4.43484): ")
    assert lines[1].endswith("impl='auto' runs the PyTorch implementations on ROCm")


def test_triton_3_6_interpreter_with_numpy_2_4_is_named():
    """Triton 3.6's CPU interpreter fails inside with NumPy >= 2.4 (a TypeError deep in the interpreter): the reason
    is found at import and named by impl='triton' on CPU tensors."""
    probe = """
import importlib.metadata, numpy
importlib.metadata.version = lambda name: "3.6.0" if name == "triton" else "0"
numpy.__version__ = "2.4.1"
import torch
from distill_ops._utils import TRITON_PROBLEM, resolve_impl
try:
    resolve_impl("triton", torch.device("cpu"))
except RuntimeError as error:
    print(error)
print(resolve_impl("auto", torch.device("cpu")))
"""
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == ("impl='triton': Triton 3.6.0's CPU interpreter fails with NumPy 2.4.1 (a TypeError inside the "
                        "interpreter): pip install 'numpy<2.4', or a newer Triton")
    assert lines[1] == "torch"


def test_triton_3_6_interpreter_problem_covers_every_numpy_from_2_4(monkeypatch):
    """The Triton 3.6 interpreter / NumPy problem is found for every NumPy >= 2.4 (2.5, 3.0, a bare "3"), not for
    NumPy 2.3 or a bare "2", nor for another Triton minor version or with the interpreter off."""
    import numpy

    from distill_ops import _utils

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for triton_version, numpy_version, found in (("3.6.0", "2.4.1", True), ("3.6.1", "2.5.0", True),
                                                 ("3.6.0", "3.0.0", True), ("3.6", "3", True),
                                                 ("3.6.0", "2.3.5", False), ("3.6.0", "2", False),
                                                 ("3.7.0", "2.4.1", False), ("3", "2.4.1", False)):
        monkeypatch.setattr(importlib.metadata, "version",
                            lambda name, v=triton_version: v if name == "triton" else "0")
        monkeypatch.setattr(numpy, "__version__", numpy_version)
        problem = _utils._triton_problem()
        assert (problem is not None) == found, (triton_version, numpy_version, problem)
        if found:
            assert f"Triton {triton_version}'s CPU interpreter fails with NumPy {numpy_version}" in problem
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "3.6.0" if name == "triton" else "0")
    monkeypatch.setattr(numpy, "__version__", "2.4.1")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _utils._triton_problem() is None  # NumPy 2.4 and Triton 3.6 are fine off the interpreter
