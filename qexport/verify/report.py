"""Reports a person can read: report.json (everything) and report.md (tables), plus a console table."""

from __future__ import annotations

import json
from pathlib import Path


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f} %"


def _num(v: float) -> str:
    """A gate value with two decimals (``:.4g`` showed 100.01 as ``100``, a failed gate that looked passed)."""
    return f"{v:.2f}"


# QuantSim arithmetic name -> (short label, what it means)
_ARITHMETIC = {
    "onnxruntime-integer": ("ONNX Runtime integer arithmetic",
                            "onnxruntime-integer (fused layers accumulate exactly in integers and requantize as "
                            "ONNX Runtime's QLinearConv/QGemm/QLinearAdd kernels do)"),
    "float64-accumulation": ("fake-quant PyTorch",
                             "float64-accumulation (fake quantization, layers accumulated in float64)"),
    "float64-accumulation+pair-saturation": (
        "fake-quant PyTorch, int16 pair saturation",
        "float64-accumulation+pair-saturation (fake quantization, layers accumulated in float64 with the int16 "
        "pair saturation of this CPU's int8 kernels)"),
}


def _arithmetic(report: dict) -> tuple[str, str]:
    name = report.get("quantsim_arithmetic") or "float64-accumulation"
    return _ARITHMETIC.get(name, ("fake-quant PyTorch", name))


def render_markdown(report: dict) -> str:
    """The report as Markdown.

    Args:
        report: the verify report dictionary.

    Returns:
        Markdown text.
    """
    a, r = report["accuracy"], report["recipe"]
    lines = [f"# qexport verify: {r['model']} {r['bits']} ({r['method']}) on {report['engine']['target']}", "",
             f"Images: {report['data']['count']} from `{report['data']['path']}`"
             + (" (labelled)" if report["data"]["labelled"] else " (unlabelled: no top-1)"), "",
             "| model | top-1 | agreement with QuantSim |", "|---|---|---|",
             f"| FP32 (PyTorch) | {_pct(a.get('fp32_top1'))} | |",
             f"| QuantSim ({_arithmetic(report)[0]}) | {_pct(a.get('quantsim_top1'))} | |",
             f"| INT8 engine | {_pct(a.get('engine_top1'))} | {_pct(a['engine_vs_quantsim_agreement'])} |"]
    if a.get("fp32_engine_top1") is not None:
        lines.append(f"| FP32 engine | {_pct(a.get('fp32_engine_top1'))} | |")
    if a.get("engine_vs_quantsim_float_agreement") is not None:
        lines.append(f"| QuantSim, float arithmetic | {_pct(a.get('quantsim_float_top1'))} | "
                     f"INT8 engine: {_pct(a['engine_vs_quantsim_float_agreement'])} |")
    lines += ["", f"QuantSim arithmetic (the reference): {_arithmetic(report)[1]}.", ""]
    if report.get("cpu_note"):
        lines += [f"Note: {report['cpu_note']}.", ""]
    lines.append(f"Logit difference engine vs QuantSim: mean {a['logit_abs_diff_mean']:.4g}, "
                 f"max {a['logit_abs_diff_max']:.4g}.")
    if a.get("logit_abs_diff_mean_vs_quantsim_float") is not None:
        lines.append("Logit difference engine vs float QuantSim: "
                     f"mean {a['logit_abs_diff_mean_vs_quantsim_float']:.4g}, "
                     f"max {a['logit_abs_diff_max_vs_quantsim_float']:.4g}.")
    if a.get("top1_drop_points") is not None:
        lines.append(f"Top-1 drop of the engine vs FP32: {a['top1_drop_points']:.2f} points.")
    if report.get("model_size"):
        from qexport.verify.size import size_line

        lines += ["", size_line(report["model_size"])]
    lines += _data_sets_markdown(report.get("data_sets") or [], report.get("more_data_mean") or {})
    lines += _latency_markdown(report.get("latency") or [], report["engine"])
    lines += _widths_markdown(report.get("widths") or [])
    div = report.get("divergence")
    if div:
        lines += ["", "## First divergent layer", "", div.get("summary", "")]
    checks = report.get("checks") or []
    if checks:
        lines += ["", "## Checks", "", "| check | value | threshold | result |", "|---|---|---|---|"]
        for c in checks:
            lines.append(f"| {c['name']} | {_num(c['value'])} | {_num(c['threshold'])} | {'PASS' if c['passed'] else 'FAIL'} |")
    return "\n".join(lines) + "\n"


def _data_sets_markdown(sets: list[dict], mean: dict) -> list[str]:
    """The per-folder accuracy table (several ``--data`` folders), with the mean of the folders after the first."""
    if not sets:
        return []
    lines = ["", "## Each image folder", "", "| folder | images | FP32 top-1 | QuantSim top-1 | engine top-1 | "
             "drop (points) | engine vs QuantSim |", "|---|---|---|---|---|---|---|"]
    for d in sets + ([{"path": "mean over the folders after the first", "count": "", "accuracy": mean}]
                     if mean else []):
        acc = d["accuracy"]
        drop = f"{acc['top1_drop_points']:.2f}" if acc.get("top1_drop_points") is not None else "-"
        lines.append(f"| `{d['path']}` | {d['count']} | {_pct(acc.get('fp32_top1'))} | "
                     f"{_pct(acc.get('quantsim_top1'))} | {_pct(acc.get('engine_top1'))} | {drop} | "
                     f"{_pct(acc.get('engine_vs_quantsim_agreement'))} |")
    return lines


def _latency_markdown(lat: list[dict], engine: dict) -> list[str]:
    """The latency table: p50/p90/p99 and throughput of the INT8 and FP32 engines per batch size."""
    if not lat:
        return []
    lines = ["", f"## Latency ({engine['target']}, {engine['threads']} threads, same run)", "",
             "| batch | engine | p50 ms | p90 ms | p99 ms | images/s | speed-up vs FP32 |", "|---|---|---|---|---|---|---|"]
    for row in lat:
        for which in ("int8", "fp32"):
            s = row.get(which)
            if s:
                sp = f"{row['speedup']:.2f}x" if which == "int8" and row.get("speedup") else ""
                lines.append(f"| {row['batch_size']} | {which} | {s['p50_ms']:.3f} | {s['p90_ms']:.3f} | "
                             f"{s['p99_ms']:.3f} | {s['throughput_ips']:.1f} | {sp} |")
    return lines


def _widths_markdown(widths: list[dict]) -> list[str]:
    """Each layer's weight and input widths (mixed precision shows where the bits went)."""
    if not widths:
        return []
    out = ["", "## Layer widths", "", "| layer | kind | weight bits | input bits |", "|---|---|---|---|"]
    for w in widths:
        out.append(f"| {w['layer']} | {w['kind']} | {w['weight_bits']} | {w['input_bits'] or 'float'} |")
    return out


def widths_line(widths: list[dict]) -> str:
    """One console line: ``conv1 w8a8, layer1.0.conv1 w4a8, ...``."""
    return "widths: " + ", ".join(f"{w['layer']} w{w['weight_bits']}a{w['input_bits'] or 32}" for w in widths)


def write_report(report: dict, folder: Path) -> None:
    """Write report.json and report.md into ``folder`` (a fresh, temporary folder).

    Args:
        report: the report dictionary.
        folder: destination folder.
    """
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / "report.md").write_text(render_markdown(report))


def print_report(report: dict) -> None:
    """Print the main figures as a table on stdout.

    Args:
        report: the report dictionary.
    """
    from rich.console import Console
    from rich.table import Table

    a = report["accuracy"]
    t = Table(title=f"{report['recipe']['model']} {report['recipe']['bits']} on {report['engine']['target']}")
    for col in ("", "top-1", "agreement vs QuantSim"):
        t.add_column(col)
    t.add_row("FP32 (PyTorch)", _pct(a.get("fp32_top1")), "")
    t.add_row("QuantSim", _pct(a.get("quantsim_top1")), "")
    t.add_row("INT8 engine", _pct(a.get("engine_top1")), _pct(a["engine_vs_quantsim_agreement"]))
    console = Console()
    console.print(t)
    for d in report.get("data_sets") or []:
        acc = d["accuracy"]
        console.print(f"{d['path']}: engine top-1 {_pct(acc.get('engine_top1'))}, FP32 {_pct(acc.get('fp32_top1'))}, "
                      f"agreement {_pct(acc.get('engine_vs_quantsim_agreement'))}")
    if report.get("more_data_mean"):
        m = report["more_data_mean"]
        console.print(f"mean over the folders after the first: engine top-1 {_pct(m.get('engine_top1'))}, "
                      f"FP32 {_pct(m.get('fp32_top1'))}, agreement {_pct(m.get('engine_vs_quantsim_agreement'))}")
    if report.get("quantsim_arithmetic"):
        msg = f"QuantSim arithmetic: {report['quantsim_arithmetic']}"
        if a.get("engine_vs_quantsim_float_agreement") is not None:
            msg += (f" (float QuantSim: top-1 {_pct(a.get('quantsim_float_top1'))}, engine agreement "
                    f"{_pct(a['engine_vs_quantsim_float_agreement'])})")
        console.print(msg)
    if report.get("cpu_note"):
        console.print(f"note: {report['cpu_note']}")
    if report.get("model_size"):
        from qexport.verify.size import size_line

        console.print(size_line(report["model_size"]))
    for row in report.get("latency") or []:
        i8, f32 = row.get("int8"), row.get("fp32")
        msg = f"batch {row['batch_size']}: INT8 p50 {i8['p50_ms']:.3f} ms"
        if f32:
            msg += f", FP32 p50 {f32['p50_ms']:.3f} ms, speed-up {row['speedup']:.2f}x"
        console.print(msg)
    if len({(w["weight_bits"], w["input_bits"]) for w in report.get("widths") or []}) > 1:
        console.print(widths_line(report["widths"]), soft_wrap=True)
    if report.get("divergence"):
        console.print(report["divergence"]["summary"])
    for c in report.get("checks") or []:
        console.print(f"{'PASS' if c['passed'] else 'FAIL'} {c['name']}: {_num(c['value'])} (threshold {_num(c['threshold'])})")

