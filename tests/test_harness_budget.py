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


def test_sigterm_stops_the_run_and_still_writes_the_report(tmp_path):
    """The GPU check's timeout sends SIGTERM: the runner must stop at once and write its report. The signal's
    exception used to be an ``Exception``, which the per-impl ``except Exception`` recorded as one failed impl
    before carrying on, until the SIGKILL 30 s later left no report."""
    import os
    import signal
    import subprocess
    import sys
    import textwrap
    import time

    module = tmp_path / "bench_spin.py"
    module.write_text(textwrap.dedent("""
        import time
        from benchmarks.harness import Case

        def _setup():
            def fn():
                end = time.time() + 0.3
                while time.time() < end:
                    pass
            return fn

        def cases(device, quick):
            return [Case(op="spin", params={"i": i}, impls={"a": _setup, "b": _setup}) for i in range(20)]
    """))
    out = tmp_path / "out"
    script = (f"from benchmarks.harness import run_benchmarks; doc = run_benchmarks({str(out)!r}, device='cpu', "
              f"sources=[{str(module)!r}], budget_s=1000); print('complete', doc['meta']['complete'])")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=repo, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (out / "results.json").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)  # the first measurement is saved: the handler is installed
    assert proc.poll() is None, proc.communicate()[0]
    proc.send_signal(signal.SIGTERM)
    signalled = time.time()
    output, _ = proc.communicate(timeout=120)
    assert time.time() - signalled < 10, output
    assert "complete False" in output, output
    assert (out / "report.md").exists()
