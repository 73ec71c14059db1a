"""The benchmark harness end to end on a tiny CPU case, and the kl_div benchmark's baselines."""

from __future__ import annotations

import importlib.util
import io
import json
import textwrap
import time

import pytest
import torch

from benchmarks import bench_kl_div, engine_overhead
from benchmarks.harness import Case, device_peaks, environment, run_benchmarks, run_impl
from distill_ops import kl_div

from tests.conftest import DEVICE, assert_close

# The tiny benchmark module: two cases (V varies, so a plot is drawn), an impl that works, one that
# raises, one declared unavailable; the V=128 case measures CPU memory in a subprocess, with a pass
# that allocates a known 64 MiB temporary on top of 32 MiB of inputs.
TINY_MODULE = textwrap.dedent(
    '''
    import torch
    from benchmarks.harness import Case

    TEMP_ELEMENTS = 16 * 2**20   # 64 MiB of fp32
    INPUT_ELEMENTS = 8 * 2**20   # 32 MiB of fp32

    def _setup(vocab, fail=False, forward=False, big=False):
        def setup():
            x = torch.randn(64, vocab, requires_grad=True)
            held = torch.ones(INPUT_ELEMENTS) if big else None
            def run():
                if fail:
                    raise RuntimeError("deliberate failure")
                loss = (x.exp() * 2).sum()
                if big:
                    loss = loss + torch.ones(TEMP_ELEMENTS).sum() + held[0]
                if not forward:
                    loss.backward()
                    x.grad = None
                return loss
            return run
        return setup

    def cases(device, quick):
        return [
            Case(
                op="tiny",
                params={"N": 64, "V": vocab},
                impls={"good": _setup(vocab, big=vocab == 128), "bad": _setup(vocab, fail=True)},
                forward_impls={"good": _setup(vocab, forward=True)},
                bytes_moved=3 * 64 * vocab * 4,
                skipped={"absent": "not installed here"},
                measure_cpu_memory=vocab == 128,
                memory_floor_bytes=4 * INPUT_ELEMENTS,
            )
            for vocab in (64, 128)
        ]
    '''
)


@pytest.fixture
def tiny_module(tmp_path):
    path = tmp_path / "bench_tiny.py"
    path.write_text(TINY_MODULE)
    return str(path)


def test_harness_end_to_end_on_a_tiny_cpu_case(tmp_path, tiny_module):
    out_dir = tmp_path / "out"
    progress = io.StringIO()
    document = run_benchmarks(out_dir, device="cpu", sources=[tiny_module], stream=progress)

    written = json.loads((out_dir / "results.json").read_text())
    assert written == json.loads(json.dumps(document))
    meta = written["meta"]
    assert meta["complete"] and meta["device"] == "cpu" and meta["torch"] == torch.__version__
    for key in ("triton", "python", "git", "utc_time", "device_name"):
        assert key in meta

    results = {(r["params"]["V"], r["impl"]): r for r in written["results"]}
    assert sorted(results) == [(64, "absent"), (64, "bad"), (64, "good"), (128, "absent"), (128, "bad"), (128, "good")]
    for vocab in (64, 128):
        good = results[(vocab, "good")]
        assert good["skipped"] is None
        assert good["full_ms"] > 0 and good["forward_ms"] > 0
        assert good["backward_ms"] == pytest.approx(good["full_ms"] - good["forward_ms"])
        assert good["achieved_gb_per_s"] == pytest.approx(good["bytes_moved"] / (good["full_ms"] * 1e-3) / 1e9)
        assert good["hbm_fraction"] is None  # no roofline peak for a CPU
        assert results[(vocab, "bad")]["skipped"] == "failed: RuntimeError: deliberate failure"
        assert results[(vocab, "bad")]["full_ms"] is None
        assert results[(vocab, "absent")]["skipped"] == "not installed here"

    # Memory only where asked (subprocesses are slow), and it sees the pass's 64 MiB temporary.
    assert results[(64, "good")]["extra_memory_bytes"] is None
    measured = results[(128, "good")]
    mib = 2**20
    assert 60 * mib <= measured["extra_memory_bytes"] <= 64 * mib + 48 * mib, measured
    assert measured["case_memory_bytes"] >= measured["extra_memory_bytes"] + 28 * mib, measured
    assert measured["case_memory_over_floor"] == pytest.approx(measured["case_memory_bytes"] / (32 * mib))

    printed = progress.getvalue()
    assert "[1/6] tiny N=64 V=64 good ..." in printed and "[6/6]" in printed
    assert "skipped: failed: RuntimeError: deliberate failure" in printed

    report = (out_dir / "report.md").read_text()
    assert "## tiny" in report and "| 128 | good |" in report
    assert "deliberate failure" in report and "not installed here" in report
    assert (out_dir / "plots.png").stat().st_size > 1000 and "plots.png" in report


def test_time_budget_records_the_rest_as_skipped(tmp_path, tiny_module):
    document = run_benchmarks(tmp_path, device="cpu", sources=[tiny_module], budget_s=0.0, stream=io.StringIO())
    reasons = [(r["impl"], r["skipped"]) for r in document["results"]]
    assert len(reasons) == 6 and all(
        reason == "not installed here" if impl == "absent" else reason.startswith("time budget") for impl, reason in reasons
    ), reasons
    assert "time budget" in (tmp_path / "report.md").read_text()
    assert document["meta"]["budget_skipped"] == 4 and "4 measurements skipped" in (tmp_path / "report.md").read_text()


def test_time_left_at_the_end_goes_back_to_budget_skipped_measurements(tmp_path):
    """A module whose share ran out early gets the time later modules left unused: its budget-skipped measurements
    run in a second pass (on the CPU run kl_div's timings were all skipped while 180 s of the budget went unused)."""
    source = """
import time
from benchmarks.harness import Case

def _setup(seconds):
    def setup():
        def run():
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                pass
        return run
    return setup

def cases(device, quick):
    return [Case(op=OP, params={"i": i}, impls={"a": _setup(SECONDS)}, forward_only=True, budget_weight=WEIGHT)
            for i in range(COUNT)]
"""
    first, second = tmp_path / "bench_first.py", tmp_path / "bench_second.py"
    # The first module's share is 1 % of the budget: its first case overruns it, the other two are skipped.
    first.write_text(source.replace("OP", "'first'").replace("SECONDS", "0.05").replace("WEIGHT", "0.01")
                     .replace("COUNT", "3"))
    second.write_text(source.replace("OP", "'second'").replace("SECONDS", "0.001").replace("WEIGHT", "1.0")
                      .replace("COUNT", "1"))
    progress = io.StringIO()
    document = run_benchmarks(tmp_path / "out", device="cpu", sources=[str(first), str(second)], budget_s=40.0,
                              stream=progress)
    assert "second pass" in progress.getvalue(), progress.getvalue()
    assert all(r["skipped"] is None and r["forward_ms"] > 0 for r in document["results"]), document["results"]
    assert document["meta"]["budget_skipped"] == 0


def test_a_measurement_past_its_time_limit_is_stopped_and_recorded():
    def slow_setup():
        def slow_pass():
            time.sleep(30)

        return slow_pass

    case = Case(op="slow", params={"N": 1}, impls={"slow": slow_setup})
    started = time.monotonic()
    result = run_impl(case, "slow", "cpu", True, 5, 20, environment("cpu"), timeout_s=0.5)
    assert time.monotonic() - started < 10
    assert result["skipped"].startswith("failed: MeasurementTimeout: stopped after") and result["full_ms"] is None
    time.sleep(0.6)  # the alarm is disarmed: nothing fires after the measurement


def test_a_module_that_fails_to_load_is_reported(tmp_path, tiny_module):
    broken = tmp_path / "bench_broken.py"
    broken.write_text("raise ImportError('missing dependency')\n")
    document = run_benchmarks(
        tmp_path / "out", device="cpu", sources=[str(broken), tiny_module], budget_s=0.0, stream=io.StringIO()
    )
    assert document["meta"]["broken_sources"][0]["reason"] == "failed: ImportError: missing dependency"
    assert "missing dependency" in (tmp_path / "out" / "report.md").read_text()
    assert len(document["results"]) == 6


def test_device_peak_table():
    assert device_peaks("NVIDIA H100 80GB HBM3") == (3.35e12, 989e12)
    assert device_peaks("NVIDIA H100 PCIe")[0] == 2.0e12
    assert device_peaks("NVIDIA H200") == (4.8e12, 989e12)
    assert device_peaks("NVIDIA A100-SXM4-80GB") == (2.0e12, 312e12)
    assert device_peaks("Tesla T4") == (None, None)
    assert device_peaks("NVIDIA H200 NVL") == (4.8e12, 835e12)  # matched "H200" (989 TFLOP/s) before
    assert device_peaks("NVIDIA GH200 480GB") == (None, None)


@pytest.mark.parametrize("divergence", ["forward", "jsd"])
def test_eager_baselines_compute_our_loss_and_gradient(divergence):
    """The baselines the report compares against must compute the same thing as kl_div."""
    generator = torch.Generator().manual_seed(3)
    student = torch.randn(6, 257, generator=generator).mul_(3).requires_grad_()
    teacher = torch.randn(6, 257, generator=generator).mul_(3)
    expected = kl_div(student, teacher, divergence=divergence, beta=bench_kl_div.JSD_BETA, impl="torch")
    (expected_grad,) = torch.autograd.grad(expected, student)
    baselines = [bench_kl_div.EAGER_LOSSES[divergence]]
    if divergence == "jsd":
        baselines.append(bench_kl_div.trl_loss(divergence))  # TRL's own GKD loss
    for baseline in baselines:
        actual = baseline(student, teacher)
        (actual_grad,) = torch.autograd.grad(actual, student)
        assert_close(actual, expected, torch.float32)
        assert_close(actual_grad, expected_grad, torch.float32)


def test_kl_div_cases_cpu_and_gpu_lists():
    cpu_cases = bench_kl_div.cases("cpu", quick=True)
    assert all(c.params["dtype"] == "fp32" for c in cpu_cases)
    assert all(c.params["N"] <= 1024 and c.params["V"] <= 32000 for c in cpu_cases if not c.measure_cpu_memory)
    timed = next(c for c in cpu_cases if not c.measure_cpu_memory)
    assert "ours_triton" in timed.skipped and "liger" in timed.skipped and set(timed.impls) == {"ours_torch", "eager"}
    assert "trl" in timed.skipped  # forward KL: TRL's GKD loss is the JSD only
    jsd = next(c for c in cpu_cases if c.params["divergence"] == "jsd")
    assert set(jsd.impls) == {"ours_torch", "eager", "trl"}  # trl: a dev dependency
    assert jsd.impls["trl"]()() is None
    for name, setup in timed.impls.items():  # each setup builds inputs and runs a full pass
        full_pass = setup()
        assert full_pass() is None, name
    memory_cases = [c for c in cpu_cases if c.measure_cpu_memory]
    assert [(c.params["divergence"], set(c.impls)) for c in memory_cases] == [
        ("forward", {"ours_torch", "eager"}), ("jsd", {"ours_torch", "eager", "trl"})]
    assert not any(c.time_passes for c in memory_cases)  # their passes take seconds: memory only

    gpu_cases = bench_kl_div.cases("cuda", quick=False)  # built lazily: nothing is allocated here
    main = [c for c in gpu_cases if c.op == "kl_div"]
    sweeps = [c for c in gpu_cases if c.op == "kl_div_block_sweep"]
    assert (main[0].params["N"], main[0].params["V"]) == bench_kl_div.TARGET_SHAPE
    assert {(c.params["N"], c.params["V"], c.params["divergence"]) for c in main} == {
        (n, v, d) for n in (4096, 16384) for v in (32768, 131072, 262144) for d in ("forward", "jsd")
    }
    assert all(c.params["dtype"] == "bf16" for c in main)
    n, v = bench_kl_div.TARGET_SHAPE
    assert main[0].bytes_moved == 6 * n * v and main[0].bytes_models == {"two-pass": 10 * n * v}
    assert main[0].output_bytes == 2 * n * v
    for case in main:  # the fallback at the smaller N only, torch.compile at the target V only
        assert ("ours_torch" in case.skipped) == (case.params["N"] > 4096)
        assert ("torch_compile" in case.skipped) == (case.params["V"] != 131072)
    assert len(sweeps) == 2 and all(c.forward_only for c in sweeps)
    assert {c.params["divergence"]: len(c.impls) for c in sweeps} == {
        "forward": 5 + len(bench_kl_div.PERSISTENT_SWEEP), "jsd": 5}
    assert sum("(default)" in name for name in sweeps[0].impls) == 1


@pytest.mark.parametrize("divergence", ["forward", "jsd"])
def test_block_sweep_launches_compute_the_loss(divergence):
    """Every swept (BLOCK_V, num_warps) launch gives kl_div's per-row loss (Triton interpreter on CPU)."""
    case = bench_kl_div.sweep_case(2, 300, torch.float32, divergence, DEVICE.type)
    student, teacher = bench_kl_div.make_logits(2, 300, torch.float32, DEVICE.type)
    expected = kl_div(student, teacher, divergence=divergence, beta=bench_kl_div.JSD_BETA, reduction="none", impl="torch")
    for name, setup in case.impls.items():
        assert_close(setup()(), expected, torch.float32, msg=name)


# The speculative engine's per-step overhead counts (benchmarks/engine_overhead.py), on a tiny pair.
TINY_PAIR = dict(vocab=128, hidden=32, layers=3, heads=2, kv_heads=1, intermediate=64, draft_layers=1)


@pytest.mark.parametrize("config", ["tree-greedy", "chain-sampling"])
def test_engine_overhead_counts_every_phase(config):
    result = engine_overhead.measure(config, impl="torch", new_tokens=6, repeats=1, shape=TINY_PAIR, device=DEVICE.type)
    counts = result["counts"]
    assert result["new_tokens"] == 6 and result["steps"] >= 1
    for phase in engine_overhead.PHASES:
        row = counts[phase]
        assert row["aten"] == pytest.approx(row["kernel"] + row["alloc"] + row["meta"]), phase
    for phase in ("draft", "target", "verify", "compaction"):
        assert counts[phase]["kernel"] > 0, phase
    assert counts["verify"]["reads"] >= 1  # the step's read of the emitted tokens
    if config.startswith("tree"):
        # EAGLE-2 trees are built on the device: ops, but no host-built data and no read.
        assert counts["tree"]["kernel"] > 0 and counts["tree"]["h2d"] == 0 and counts["tree"]["reads"] == 0
        assert "aten.lift_fresh.default" not in result["ops"]["tree"]
    else:
        assert counts["tree"]["aten"] == 0  # static trees are prepared once
    assert set(result["ms"]) == set(engine_overhead.PHASES) and result["target_ms"] > 0
    text = engine_overhead.format_results([result], top=3)
    assert f"### {config}, impl=torch" in text and "| overhead |" in text and "- verify: " in text
    verify_reads = next(line for line in text.splitlines() if line.startswith("- verify reads: "))
    assert "distill_ops.speculative:run 1.0" in verify_reads


def test_engine_tree_cut_counts_what_the_cut_saves(capsys):
    """benchmarks/engine_tree_cut.py: the same tokens with and without the cut (it checks), fewer draft levels
    and target tree rows with it, as many steps."""
    from benchmarks import engine_tree_cut

    (row,) = engine_tree_cut.main(["--new-tokens", "5", "--prompts", "2"])
    assert row["steps_cut"] == row["steps_full"] >= 2
    assert row["levels_cut"] < row["levels_full"] and row["rows_cut"] < row["rows_full"]
    assert f"draft levels {row['levels_full']} -> {row['levels_cut']}" in capsys.readouterr().out


# What only a CPU run reads: the ops' value checks of CPU tensors (skipped for CUDA tensors).
CPU_ONLY_CHECKS = {
    "distill_ops.tree_attention:_check_cache_lens_values",
    "distill_ops.verify:_check_verify_inputs",
    "distill_ops.verify:compact_kv_cache",
}


@pytest.mark.parametrize("config", ["tree-greedy", "tree-sampling", "chain-greedy"])
def test_engine_reads_the_device_once_per_step(config):
    """Drafting reads nothing back, dynamic (EAGLE-2) trees included: the engine's one device-to-host read
    per step is the verification result (emitted tokens); every other read is a CPU-only value check."""
    result = engine_overhead.measure(config, impl="torch", new_tokens=8, repeats=0, shape=TINY_PAIR,
                                     device=DEVICE.type)
    sites = result["read_sites"]
    assert sites["verify"].get("distill_ops.speculative:run") == 1.0
    for phase in engine_overhead.PHASES:
        others = {site for site in sites[phase] if site != "distill_ops.speculative:run" or phase != "verify"}
        assert others <= CPU_ONLY_CHECKS, (phase, others)
    if DEVICE.type == "cpu":
        # The counter sees reads: the tree ops' checks read once per draft level (4 of them).
        assert sites["draft"]["distill_ops.tree_attention:_check_cache_lens_values"] == 8.0


def test_engine_overhead_triton_launches_per_step():
    """The GPU path's launch structure (interpreter on CPU): verification is two launches, compaction one
    for every layer, tree attention one per target layer. The tree phase at depth 5: per expanding draft
    level one EAGLE-2 bookkeeping launch and its spec, then the final selection and the verification
    spec (10 launches), all writing buffers the plan allocated once: no ATen op at all."""
    result = engine_overhead.measure("tree-greedy", impl="triton", new_tokens=4, repeats=0, shape=TINY_PAIR,
                                     device=DEVICE.type)
    counts = result["counts"]
    assert counts["verify"]["triton"] == 2
    assert counts["compaction"]["triton"] == 1 and counts["compaction"]["h2d"] == 1  # the layer-address table
    assert counts["target"]["triton"] == TINY_PAIR["layers"]
    assert counts["tree"]["triton"] == 10 and counts["tree"]["aten"] == 0
    if DEVICE.type == "cpu":
        assert result["ms"] is None  # interpreter times mean nothing: not reported


def test_fused_linear_baselines_compute_our_loss_and_gradients():
    """The fused-linear benchmark's baselines (the eager formula; TRL's DistillationTrainer chunked loss, when
    this trl has it) and our entropy variant compute our loss and both student gradients; the CPU cases time them."""
    from benchmarks import bench_fused_linear as bench
    from distill_ops import fused_linear_kl_div

    inputs = bench.make_inputs(6, 24, 300, torch.float32, "cpu")
    student_hidden, student_weight = (tensor.requires_grad_() for tensor in inputs[:2])
    expected = fused_linear_kl_div(student_hidden, student_weight, *inputs[2:], divergence="jsd",
                                   beta=bench.JSD_BETA, impl="torch")
    expected_grads = torch.autograd.grad(expected, (student_hidden, student_weight))
    baselines = {"eager": bench.eager_loss, "ours_torch_entropy": bench.ours_loss("torch", entropy=True)}
    if bench._trl_chunked_unavailable() is None:
        baselines["trl_chunked"] = bench.trl_chunked_loss()
    else:
        assert importlib.util.find_spec("trl") is None  # the dev extra's trl (1.16) has it
    for name, baseline in baselines.items():
        loss = baseline(student_hidden, student_weight, *inputs[2:])
        grads = torch.autograd.grad(loss, (student_hidden, student_weight))
        assert_close(loss, expected, torch.float32, msg=name)
        for grad, expected_grad in zip(grads, expected_grads):
            assert_close(grad, expected_grad, torch.float32, msg=name)
    timed = bench.cases("cpu", quick=True)[0]
    assert set(timed.impls) == {"ours_torch", "eager"} | set(baselines)
