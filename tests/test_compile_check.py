"""The static kernel check compiles kernels for sm_90a / sm_80 on the CPU and fails when it should."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run_check(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    json_path = tmp_path / "check.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.compile_check", "--json", str(json_path), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = json.loads(json_path.read_text()) if json_path.exists() else None
    return proc, report


def test_compile_check_reports_registers_and_no_spills(tmp_path):
    proc, report = _run_check(tmp_path, "--only", "kl_div_fwd[jsd,bf16]")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    targets = {row["target"] for row in report["results"]}
    assert targets == {"sm_90a", "sm_80"}
    for row in report["results"]:
        assert row["ok"] and row["registers"] > 0 and row["spill_bytes"] == 0
    assert "kl_div_fwd[jsd,bf16]" in proc.stdout


def test_compile_check_builds_for_blackwell_on_request(tmp_path):
    """--targets 100a compiles for sm_100a (not in the default targets: its stack frames are only reported)."""
    proc, report = _run_check(tmp_path, "--only", "fused_linear_stats[forward,pass1,linear,bf16]", "--targets", "100a",
                              "--variants", "aligned")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (row,) = [row for row in report["results"] if row["kernel"] == "fused_linear_stats[forward,pass1,linear,bf16]"]
    assert row["target"] == "sm_100a" and row["ok"] and row["registers"] > 0 and row["spill_bytes"] == 0


def test_compile_check_fails_on_a_kernel_that_does_not_compile(tmp_path):
    """One result, and it is the failure (a check that read all but the last result passed with two variants)."""
    proc, report = _run_check(tmp_path, "--modules", "tests._bad_kernels", "--only", "bad_non_power_of_two_block",
                              "--targets", "90a", "--variants", "generic")
    assert proc.returncode != 0
    assert len(report["results"]) == 1
    assert report["results"][0]["ok"] is False
    assert report["results"][0]["error"]


def test_compile_check_fails_on_a_kernel_that_spills(tmp_path):
    """The check's purpose: a kernel that compiles but spills registers fails it (no test compiled one, so a check
    that called every result ok, or read the spill bytes from the wrong counter, passed)."""
    proc, report = _run_check(tmp_path, "--modules", "tests._bad_kernels", "--only", "bad_spilling_tile",
                              "--targets", "90a", "--variants", "generic")
    assert proc.returncode != 0, proc.stdout + proc.stderr
    (row,) = report["results"]
    assert row["ok"] is False and row["spill_bytes"] > 0 and not row.get("error")
    assert "SPILLS" in proc.stdout


def test_compile_check_fails_when_nothing_matches(tmp_path):
    proc, _ = _run_check(tmp_path, "--only", "no_such_kernel_name")
    assert proc.returncode != 0
    assert "no kernels found" in proc.stdout + proc.stderr


def test_compile_check_compiles_the_aligned_variant_the_jit_runs(tmp_path):
    """At real shapes every integer argument is a multiple of 16 and the JIT specialises on it: the aligned variant
    software-pipelines the fused-linear H loop (asynchronous copies into more shared memory), the generic one cannot
    (unknown row alignment). Both are checked."""
    proc, report = _run_check(
        tmp_path, "--only", "fused_linear_stats[forward,pass1,linear,bf16]", "--targets", "90a"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {row["variant"]: row for row in report["results"]}
    assert set(rows) == {"generic", "aligned"}
    assert rows["aligned"]["shared_bytes"] > rows["generic"]["shared_bytes"]
    # On sm_90a the logit tiles run on Hopper's asynchronous tensor-core instructions, not Ampere's mma.sync.
    assert rows["aligned"]["wgmma"] > 0 and rows["aligned"]["mma_sync"] == 0


def test_spec_variants_and_unaligned_arguments(tmp_path):
    """A spec may restrict its variants (the compensated d_hidden GEMM's 128-wide tiles run only for aligned strides)
    and name integer arguments its launcher never assumes divisible (the row count, used only in masks)."""
    from distill_ops.kernels.fused_linear import aot_specs

    specs = {spec["name"]: spec for spec in aot_specs() if spec["name"].startswith("grad_hidden_accumulate[bf16")}
    aligned_only = specs["grad_hidden_accumulate[bf16,first=False,last=False,aligned]"]
    assert aligned_only["variants"] == ("aligned",) and aligned_only["unaligned"] == ("N",)
    proc, report = _run_check(
        tmp_path, "--only", "grad_hidden_accumulate[bf16,first=False,last=False,", "--targets", "90a"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    compiled = sorted((row["kernel"].rsplit(",", 1)[1], row["variant"]) for row in report["results"])
    assert compiled == [("aligned]", "aligned"), ("generic]", "aligned"), ("generic]", "generic")]
