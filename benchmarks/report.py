"""Markdown report and plots from a results document (``results.json`` as written by the harness).

    python -m benchmarks.report RESULTS_JSON [OUT_DIR]   # re-render a report from raw results

One table per op (varying params as columns, constant ones above it), the targets each benchmark
module checks (its ``summarize_results``), the skipped measurements with their reasons, and one PNG
(``plots.png``) with a row of subplots per op: time and memory against each numeric parameter that
varies (e.g. V and N), other parameters fixed at their most common value.
"""

from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Optional

PLOT_FILE = "plots.png"
HIDDEN_PARAMS = ("measure_cpu_memory",)
MAX_PLOT_AXES = 2


def _ms(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"


def _mib(value: Optional[int]) -> str:
    if value is None:
        return "-"
    return f"{value / 2**20:.0f}" if abs(value) >= 2**24 else f"{value / 2**20:.2f}"


def _ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _num(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def pass_ms(result: dict) -> Optional[float]:
    """The time a result is compared by: the full pass, or the forward for forward-only cases."""
    return result["forward_ms"] if result["forward_only"] else result["full_ms"]


def _params(result: dict) -> dict:
    return {k: v for k, v in result["params"].items() if k not in HIDDEN_PARAMS}


def _case_key(result: dict) -> str:
    return json.dumps(_params(result), sort_keys=True, default=str)


def _varying_params(results: list[dict]) -> tuple[list[str], dict]:
    """Param names whose value differs between the op's cases (in first-seen order), and the constant ones."""
    values: dict[str, list] = defaultdict(list)
    for result in results:
        for key, value in _params(result).items():
            values[key].append(json.dumps(value, default=str))
    varying = [k for k, v in values.items() if len(set(v)) > 1 or len(v) < len(results)]
    constant = {k: _params(results[0]).get(k) for k in values if k not in varying}
    return varying, constant


def _reference_times(results: list[dict]) -> dict[str, float]:
    """Per case, the time of our best-available impl (``ours_triton``, else ``ours_torch``)."""
    by_case: dict[str, dict[str, float]] = defaultdict(dict)
    for result in results:
        if not result["skipped"] and pass_ms(result):
            by_case[_case_key(result)][result["impl"]] = pass_ms(result)
    reference = {}
    for key, times in by_case.items():
        for name in ("ours_triton", "ours_torch"):
            if name in times:
                reference[key] = times[name]
                break
    return reference


def op_table(results: list[dict], peak_bandwidth: Optional[float]) -> str:
    measured = [r for r in results if not r["skipped"]]
    if not measured:
        return "_no measurements_\n"
    varying, _ = _varying_params(results)
    reference = _reference_times(measured)
    model_names = list(dict.fromkeys(name for r in measured for name in r["bytes_models"]))

    def any_value(key: str) -> bool:
        return any(r.get(key) is not None for r in measured)

    columns: list[tuple[str, callable]] = [(p, lambda r, p=p: str(_params(r).get(p, "-"))) for p in varying]
    columns.append(("impl", lambda r: r["impl"]))
    if any_value("forward_ms"):
        columns.append(("fwd ms", lambda r: _ms(r["forward_ms"])))
    if any_value("backward_ms"):
        # full - fwd of two separate medians: below 0 it is noise around a backward of about 0.
        columns.append(("bwd ms", lambda r: "≈0" if (r["backward_ms"] or 0.0) < 0 else _ms(r["backward_ms"])))
    if any_value("full_ms"):
        columns.append(("full ms", lambda r: _ms(r["full_ms"])))
    if reference:
        columns.append(
            ("time / ours", lambda r: _ratio(pass_ms(r) / reference[_case_key(r)]) if _case_key(r) in reference else "-")
        )
    if any_value("peak_memory_bytes"):
        columns.append(("peak MiB", lambda r: _mib(r["peak_memory_bytes"])))
        columns.append(("case MiB", lambda r: _mib(r["case_memory_bytes"])))
        columns.append(("extra MiB", lambda r: _mib(r["extra_memory_bytes"])))
    if any_value("case_memory_over_floor"):
        columns.append(("case mem / floor", lambda r: _ratio(r["case_memory_over_floor"])))
    if any_value("extra_memory_over_output"):
        columns.append(("extra mem / output", lambda r: _ratio(r["extra_memory_over_output"])))
    if any_value("achieved_gb_per_s"):
        columns.append(("GB/s", lambda r: _num(r["achieved_gb_per_s"])))
    if peak_bandwidth and any_value("hbm_fraction"):
        columns.append(("% HBM", lambda r: _pct(r["hbm_fraction"])))
    for name in model_names:
        if peak_bandwidth:
            columns.append((f"% HBM ({name})", lambda r, n=name: _pct(r["bytes_models"].get(n, {}).get("hbm_fraction"))))
        else:
            columns.append(
                (f"GB/s ({name})", lambda r, n=name: _num(r["bytes_models"].get(n, {}).get("achieved_gb_per_s")))
            )
    if any_value("achieved_tflop_per_s"):
        columns.append(("TFLOP/s", lambda r: _num(r["achieved_tflop_per_s"])))
        if any_value("bf16_peak_fraction"):
            columns.append(("% bf16 peak", lambda r: _pct(r["bf16_peak_fraction"])))

    lines = ["| " + " | ".join(name for name, _ in columns) + " |", "|" + "---|" * len(columns)]
    for result in measured:
        lines.append("| " + " | ".join(render(result) for _, render in columns) + " |")
    return "\n".join(lines) + "\n"


def skipped_table(results: list[dict]) -> str:
    groups: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    for result in results:
        if result["skipped"]:
            params = " ".join(f"{k}={v}" for k, v in _params(result).items())
            groups[(result["op"], result["impl"], result["skipped"])].append(params)
    if not groups:
        return "Nothing was skipped.\n"
    lines = ["| op | impl | reason | cases |", "|---|---|---|---|"]
    for (op, impl, reason), cases in groups.items():
        shown = "; ".join(cases[:3]) + (f"; ... ({len(cases)} cases)" if len(cases) > 3 else "")
        lines.append(f"| {op} | {impl} | {reason.replace('|', '/')} | {shown} |")
    return "\n".join(lines) + "\n"


def _plot_axes(results: list[dict]) -> list[str]:
    varying, _ = _varying_params(results)
    numeric = [
        p
        for p in varying
        if all(isinstance(_params(r).get(p), (int, float)) and not isinstance(_params(r).get(p), bool) for r in results)
    ]
    return numeric[:MAX_PLOT_AXES]


def _series(results: list[dict], x_param: str, metric) -> tuple[dict[str, list[tuple[float, float]]], dict]:
    """Points (x, metric) per impl, other varying params fixed at their most common value (ties: largest)."""
    varying, _ = _varying_params(results)
    fixed = {}
    for param in varying:
        if param == x_param:
            continue
        counts = Counter(json.dumps(_params(r).get(param), default=str) for r in results)
        best = max(counts.values())
        candidates = [json.loads(v) for v, c in counts.items() if c == best]
        try:
            fixed[param] = max(candidates)
        except TypeError:
            fixed[param] = candidates[0]
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for result in results:
        params = _params(result)
        if any(params.get(k) != v for k, v in fixed.items()):
            continue
        value = metric(result)
        if value is not None and not result["skipped"]:
            series[result["impl"]].append((params[x_param], value))
    return {impl: sorted(points) for impl, points in series.items() if len(points) >= 2}, fixed


def write_plots(document: dict, out_dir: Path) -> Optional[str]:
    """One PNG, a row of subplots per op; returns its file name, or a reason string starting with '!'."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "!matplotlib is not installed: no plots"
    metrics = [
        ("time (ms)", pass_ms),
        ("extra memory (MiB)", lambda r: None if r["extra_memory_bytes"] is None else r["extra_memory_bytes"] / 2**20),
    ]
    by_op = _group_by_op(document["results"])
    panels: list[list[tuple]] = []
    for op, results in by_op.items():
        row = []
        for x_param in _plot_axes(results):
            for metric_name, metric in metrics:
                series, fixed = _series(results, x_param, metric)
                if series:
                    row.append((op, x_param, metric_name, series, fixed))
        if row:
            panels.append(row)
    if not panels:
        return "!no op has a numeric parameter with two or more measured values: no plots"
    width = max(len(row) for row in panels)
    fig, axes = plt.subplots(len(panels), width, figsize=(4.6 * width, 3.6 * len(panels)), squeeze=False)
    for i, row in enumerate(panels):
        for j in range(width):
            ax = axes[i][j]
            if j >= len(row):
                ax.axis("off")
                continue
            op, x_param, metric_name, series, fixed = row[j]
            for impl, points in series.items():
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=impl)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(x_param)
            ax.set_ylabel(metric_name)
            title = f"{op}: {metric_name.split(' (')[0]} vs {x_param}"
            if fixed:
                title += "\n" + ", ".join(f"{k}={v}" for k, v in fixed.items())
            ax.set_title(title, fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"{document['meta']['device_name']} ({document['meta']['utc_time']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_dir / PLOT_FILE, dpi=90)
    plt.close(fig)
    return PLOT_FILE


def _group_by_op(results: list[dict]) -> dict[str, list[dict]]:
    by_op: dict[str, list[dict]] = defaultdict(list)
    for result in results:
        by_op[result["op"]].append(result)
    return dict(by_op)


def render_markdown(document: dict, plot: Optional[str]) -> str:
    meta = document["meta"]
    git = meta.get("git") or {}
    commit = (git.get("commit") or "unknown")[:12] + (" (uncommitted changes)" if git.get("dirty") else "")
    peak_bandwidth = meta.get("peak_hbm_bytes_per_s")
    peaks = (
        f"peak HBM {peak_bandwidth / 1e12:.2f} TB/s, dense bf16 {meta['peak_bf16_flops'] / 1e12:.0f} TFLOP/s"
        if peak_bandwidth
        else "no roofline peaks known for this device"
    )
    lines = [
        f"# Benchmark report: {meta['device_name']}",
        "",
        f"- device: **{meta['device_name']}** ({meta['device']}; {peaks}; {meta['cpu_threads']} torch threads, "
        f"{meta.get('cpu_count')} CPUs, load average {meta.get('load_average_1min')} at the start, "
        f"{meta.get('load_average_1min_end', '-')} at the end: on CPU, a load above the torch threads' spare cores "
        f"makes timings unreliable)",
        f"- torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, Python {meta['python']}",
        f"- commit {commit}, {meta['utc_time']}, mode {'quick' if meta['quick'] else 'full'}"
        + (f", only `{meta['only']}`" if meta.get("only") else "")
        + f", {meta['elapsed_s']} s" + ("" if meta.get("complete") else " (**incomplete run**)")
        + (f", **{meta['budget_skipped']} measurements skipped: time budget exhausted**"
           if meta.get("budget_skipped") else ""),
        f"- timing: {meta['timing']}",
        "",
        "How to read: *fwd* is the forward call with autograd enabled, as in training (our losses compute "
        "the gradient there); *bwd* = full - fwd (our ops consume their stored gradient in backward, so "
        "backward cannot be re-run alone with `retain_graph`); *time / ours* is the impl's time over our "
        "Triton impl's (our PyTorch fallback's where Triton is not measured) in the same case, so > 1 "
        "means ours is faster. Memory: *peak* is absolute (CUDA allocator, or a subprocess' peak RSS on "
        "CPU), *case* is the peak above what was held before the inputs were made (inputs + pass), "
        "*extra* the peak above what was held after setup (what the pass adds). *floor* and *output* are "
        "defined per op below. *% HBM (model)* is that traffic model's bytes / time / peak bandwidth.",
        "",
    ]
    for item in meta.get("broken_sources") or []:
        lines.append(f"- could not load `{item['source']}`: {item['reason']}")
    for op, results in _group_by_op(document["results"]).items():
        _, constant = _varying_params(results)
        lines += [f"## {op}", ""]
        notes = list(dict.fromkeys(r.get("notes") for r in results if r.get("notes")))
        lines += [note for note in notes] + ([""] if notes else [])
        if constant:
            lines += ["constant: " + ", ".join(f"{k}={v}" for k, v in constant.items()), ""]
        lines.append(op_table(results, peak_bandwidth))
    summaries = document.get("summaries") or {}
    if summaries:
        lines += ["## Targets", ""]
        for text in summaries.values():
            lines += [text.rstrip(), ""]
    lines += ["## Skipped", "", skipped_table(document["results"])]
    if plot and not plot.startswith("!"):
        lines += ["## Plots", "", f"![time and memory per op]({plot})", ""]
    elif plot:
        lines += ["## Plots", "", plot[1:], ""]
    return "\n".join(lines)


def write_report(document: dict, out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    try:
        plot = write_plots(document, out_dir)
    except Exception as exc:  # noqa: BLE001 - a plotting failure must not lose the tables
        plot = f"!plotting failed: {type(exc).__name__}: {exc}"
    path = out_dir / "report.md"
    path.write_text(render_markdown(document, plot))
    return path


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python -m benchmarks.report RESULTS_JSON [OUT_DIR]")
    source = Path(sys.argv[1])
    print(write_report(json.loads(source.read_text()), Path(sys.argv[2]) if len(sys.argv) > 2 else source.parent))
