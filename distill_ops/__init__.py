"""distill-ops: fused Triton kernels for LLM distillation losses and speculative-decoding verification."""

from ._version import __version__
from .aligndistil import AlignDistilLoss, aligndistil_kl
from .kl_div import DIVERGENCES, KLDivLoss, kl_div, kl_div_reference
from .topk_kl import TAILS, TOPK_DIVERGENCES, DACKLLoss, TopKKLDivLoss, topk_kl_div

__all__ = [
    "__version__",
    "DIVERGENCES",
    "KLDivLoss",
    "kl_div",
    "kl_div_reference",
    "AlignDistilLoss",
    "aligndistil_kl",
    "TAILS",
    "TOPK_DIVERGENCES",
    "DACKLLoss",
    "TopKKLDivLoss",
    "topk_kl_div",
]
