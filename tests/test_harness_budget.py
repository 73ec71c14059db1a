"""The benchmark harness's time budget: weighted shares per module."""

from benchmarks import bench_speculative
from benchmarks.harness import module_share


def test_module_share_is_weighted_over_the_modules_left():
    weights = {"kl_div": 1.0, "tree": 1.0, "speculative": 2.0}
    assert module_share(weights, ["kl_div", "tree", "speculative"]) == 0.25
    assert module_share(weights, ["speculative"]) == 1.0
    assert module_share({"a": 1.0, "b": 1.0}, ["a", "b"]) == 0.5  # equal weights: the even share of before


def test_engine_cases_ask_for_a_double_share():
    """Whole generate calls that compile the engine's kernels on first use (the H200 run timed out on an even share)."""
    assert all(case.budget_weight == 2.0 for case in bench_speculative.cases("cpu", quick=True))
