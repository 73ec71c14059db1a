"""Raw Triton kernels and their launchers (installed as ``distill_ops.kernels``).

Every kernel module exposes ``aot_specs()``: the launch configurations its launchers use, as
consumed by ``benchmarks/compile_check.py`` (ahead-of-time compile for sm_90a / sm_80).
"""

if __name__ == "kernels":
    # Imported under the top-level name ``kernels``: the repository root is on ``sys.path`` (``python -m
    # pytest`` / ``python -m benchmarks`` from a checkout), so this directory shadows Hugging Face's
    # ``kernels`` distribution, which transformers (>= 5) imports. Nothing of ours uses that name (this
    # package is ``distill_ops.kernels``), so hand the import over to the installed distribution when there
    # is one: the import system returns whatever ``sys.modules["kernels"]`` holds once this body has run.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _search = [entry for entry in _sys.path if _os.path.abspath(entry or _os.curdir) != _root]
    _spec = _machinery.PathFinder.find_spec("kernels", _search)
    if _spec is not None and _spec.loader is not None:
        _module = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _module
        _spec.loader.exec_module(_module)

KERNEL_MODULES = [
    "kl_div", "scale_rows", "tree_attention", "tree_verify", "aligndistil", "fused_linear", "topk_kl", "topk_select",
    "tree_spec", "eagle_tree",
]
