"""distill-ops: fused Triton kernels for LLM distillation losses and speculative-decoding verification."""

from ._version import __version__
from .aligndistil import AlignDistilLoss, aligndistil_kl
from .fspad_loss import fspad_draft_loss
from .fused_linear import FusedLinearKLDivLoss, fused_linear_kl_div
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
    "FusedLinearKLDivLoss",
    "fused_linear_kl_div",
    "fspad_draft_loss",
]

from .tree import (
    TreeSpec,
    build_tree,
    paths_from_tree,
    tree_from_paths,
    tree_from_retrieve,
    tree_spec_from_parents_tensor,
    tree_spec_in_place,
    tree_to_retrieve,
)
from .tree_attention import tree_attention
from .verify import VerifyResult, compact_kv_cache, verify_greedy, verify_sampling

__all__ += [
    "TreeSpec",
    "build_tree",
    "tree_from_paths",
    "paths_from_tree",
    "tree_to_retrieve",
    "tree_from_retrieve",
    "tree_spec_from_parents_tensor",
    "tree_spec_in_place",
    "tree_attention",
    "VerifyResult",
    "verify_greedy",
    "verify_sampling",
    "compact_kv_cache",
]

from .fspad import FSPADCache, FSPADDraftHead, fspad_training_inputs, target_features
from .speculative import (
    SpeculativeDecoder,
    SpeculativeOutput,
    TreeAttentionContext,
    register_tree_attention,
    tree_spec_from_parents,
)

__all__ += [
    "SpeculativeDecoder",
    "SpeculativeOutput",
    "TreeAttentionContext",
    "register_tree_attention",
    "tree_spec_from_parents",
    "FSPADDraftHead",
    "FSPADCache",
    "fspad_training_inputs",
    "target_features",
]
