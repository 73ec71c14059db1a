"""The tree benchmark's cases and its target summary (issue 4's targets read from measured results)."""

import pytest
import torch

from benchmarks import bench_tree


def test_gpu_cases_time_graph_replays_and_one_read():
    cases = bench_tree.cases("cuda", quick=False)  # built lazily: nothing is allocated or captured here
    attention = [c for c in cases if c.op == "tree_attention"]
    verify = [c for c in cases if c.op == "verify_greedy"]
    assert attention and verify
    assert all({"ours_triton_graph", "sdpa_dense_mask_graph"} <= set(c.impls) for c in attention)
    assert all({"ours_triton_graph", "one_read_graph"} <= set(c.impls) for c in verify)


def test_cpu_cases_run_and_verify_matches_its_reference():
    for case in bench_tree.cases("cpu", quick=True):
        assert not any(name.endswith("_graph") for name in case.impls)
        for name, setup in case.impls.items():
            out = setup()()
            assert out is not None, name
    fns = bench_tree.make_verify_case(2, 26, 512, "cpu")["fns"]
    ours, reference = fns["ours_triton"](), fns["eager_reference"]()
    for field in ("accepted_nodes", "accept_len", "next_tokens", "emitted_tokens"):
        assert torch.equal(getattr(ours, field), getattr(reference, field)), field
    assert fns["one_read"]().shape == (2, 26)
    with pytest.raises(KeyError):
        fns["no_such_impl"]


def _row(op, impl, params, ms, hbm=None):
    return {"op": op, "impl": impl, "params": params, "forward_ms": ms, "hbm_fraction": hbm}


def test_summary_marks_targets_met_and_missed():
    attn = {"B": 8, "L": 4096, "T": 32, "Hq": 32, "Hkv": 8, "D": 128, "dtype": "bfloat16"}
    ver = {"B": 8, "T": 64, "V": 131072}
    attn_b1, ver_b1 = dict(attn, B=1), dict(ver, B=1)
    results = [
        _row("tree_attention", "ours_triton", attn, 0.1, hbm=0.85),
        _row("tree_attention", "ours_triton_graph", attn, 0.2, hbm=0.5),
        _row("tree_attention", "sdpa_dense_mask", attn, 0.4),
        _row("tree_attention", "sdpa_dense_mask_graph", attn, 0.3),
        _row("tree_attention", "ours_triton", attn_b1, None),  # skipped for the budget
        _row("tree_attention", "ours_triton_graph", attn_b1, 0.05, hbm=0.3),
        _row("tree_attention", "sdpa_dense_mask", attn_b1, 0.2),
        _row("verify_greedy", "ours_triton", ver, 0.06),
        _row("verify_greedy", "ours_triton_graph", ver, 0.03),
        _row("verify_greedy", "one_read_graph", ver, 0.025),
        _row("verify_greedy", "ours_triton", ver_b1, 0.05),
    ]
    text = bench_tree.summarize_results(results, {"device": "cuda", "device_name": "test"})
    assert "| 8 | 32 | ours_triton | 85 % met | 4.00× met |" in text
    # The graph replay against SDPA's graph replay (0.3 ms), not against SDPA's eager call (0.4 ms).
    assert "| 8 | 32 | ours_triton_graph | 50 % **missed** | 1.50× **missed** |" in text
    assert "| 8 | 64 | 131072 | ours_triton | 2.40× **missed** |" in text
    assert "| 8 | 64 | 131072 | ours_triton_graph | 1.20× met |" in text
    # A missing measurement (ours, or the reference it is compared with) is said, not left out.
    assert "| 1 | 32 | ours_triton | not measured | not measured |" in text
    assert "| 1 | 32 | ours_triton_graph | 30 % **missed** | not measured |" in text
    assert "| 1 | 64 | 131072 | ours_triton | not measured |" in text
    assert bench_tree.summarize_results(results, {"device": "cpu"}) == ""


def test_summary_targets_are_met_at_their_thresholds_and_only_at_l_4096():
    """Exactly 80 % of the roofline and exactly 3x SDPA are met (the issue says ≥), exactly 1.5x one read too (≤);
    a case at another L is not a row of the L = 4096 table."""
    attn = {"B": 8, "L": 4096, "T": 32, "Hq": 32, "Hkv": 8, "D": 128, "dtype": "bfloat16"}
    short = dict(attn, L=1024, B=2)
    ver = {"B": 8, "T": 64, "V": 131072}
    results = [
        _row("tree_attention", "ours_triton", attn, 0.25, hbm=0.8),
        _row("tree_attention", "sdpa_dense_mask", attn, 0.75),
        _row("tree_attention", "ours_triton", short, 0.25, hbm=0.9),
        _row("tree_attention", "sdpa_dense_mask", short, 0.75),
        _row("verify_greedy", "ours_triton", ver, 0.375),
        _row("verify_greedy", "one_read_graph", ver, 0.25),
    ]
    text = bench_tree.summarize_results(results, {"device": "cuda", "device_name": "test"})
    assert "| 8 | 32 | ours_triton | 80 % met | 3.00× met |" in text
    assert "| 8 | 64 | 131072 | ours_triton | 1.50× met |" in text
    assert "| 2 | 32 |" not in text  # L = 1024: not a target row
