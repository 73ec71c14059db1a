"""Raw Triton kernels and their launchers (installed as ``distill_ops.kernels``).

Every kernel module exposes ``aot_specs()``: the launch configurations its launchers use, as
consumed by ``benchmarks/compile_check.py`` (ahead-of-time compile for sm_90a / sm_80).
"""

KERNEL_MODULES = [
    "kl_div", "scale_rows", "tree_attention", "tree_verify", "aligndistil", "fused_linear", "topk_kl", "topk_select",
    "tree_spec", "eagle_tree",
]
