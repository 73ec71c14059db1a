"""distill-ops: fused Triton kernels for LLM distillation losses and speculative-decoding verification."""

from ._version import __version__
from .aligndistil import AlignDistilLoss, aligndistil_kl
from .kl_div import DIVERGENCES, KLDivLoss, kl_div, kl_div_reference

__all__ = [
    "__version__",
    "DIVERGENCES",
    "KLDivLoss",
    "kl_div",
    "kl_div_reference",
    "AlignDistilLoss",
    "aligndistil_kl",
]
