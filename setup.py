import re
from pathlib import Path

from setuptools import setup

_version_text = (Path(__file__).parent / "distill_ops" / "_version.py").read_text(encoding="utf-8")
VERSION = re.search(r'__version__ = "([^"]+)"', _version_text).group(1)

setup(
    name="distill-ops",
    version=VERSION,
    description="Fused Triton kernels for LLM distillation losses and speculative-decoding tree verification",
    # UTF-8 whatever the locale (the README is not ASCII: a Windows code page failed to read it).
    long_description=(Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # `kernels/` is installed as `distill_ops.kernels`: a top-level `kernels` package would shadow
    # Hugging Face's `kernels` distribution, which transformers probes for.
    packages=["distill_ops", "distill_ops.kernels", "distill_ops.integrations"],
    package_dir={"distill_ops": "distill_ops", "distill_ops.kernels": "kernels"},
    # On Linux every torch wheel pins one Triton release and only torch >= 2.10 pins Triton >= 3.6 (our floor): an
    # older torch there cannot satisfy both. Elsewhere (no Triton wheels) the PyTorch implementations run.
    install_requires=[
        "torch>=2.10; platform_system == 'Linux'",
        "torch>=2.4; platform_system != 'Linux'",
        "triton>=3.6; platform_system == 'Linux'",
        "numpy",
    ],
    extras_require={
        # Floors: the oldest releases the tests pass with (transformers 5.24: generate's batch_id per prompt; trl 1.15:
        # DistillationTrainer at the top level, importable without `requests`; peft 0.15: ModulesToSaveWrapper's
        # active_adapters). Caps: the newest releases CI has run.
        "dev": ["pytest", "pytest-benchmark", "hypothesis", "transformers>=5.24,<=5.25.0", "accelerate", "matplotlib",
                "trl>=1.15,<=1.16.0", "peft>=0.15,<=0.21.2"],
        "bench": ["liger-kernel"],
    },
)
