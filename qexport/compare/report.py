"""compare.json, compare.md and the plots of a comparison (accuracy vs width, accuracy vs latency with the
Pareto front, calibration time per method)."""

from __future__ import annotations

import json
from pathlib import Path

from qexport.fileio import atomic_file, write_text_atomic


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _f(v, fmt: str = "{:.3f}") -> str:
    return "-" if v is None else fmt.format(v)


def render_markdown(rows: list[dict], settings: dict, names: list[str], seconds: float) -> str:
    """The comparison as Markdown: one row per method x width x target.

    Args:
        rows: the cell rows.
        settings: the CompareConfig as a dict.
        names: evaluation folder names (one column group each).
        seconds: wall time of this run.

    Returns:
        Markdown text.
    """
    ok = [r for r in rows if r["status"] == "ok"]
    tb = next((r.get("throughput_batch") for r in ok if r.get("throughput_batch")), settings.get("throughput_batch"))
    lines = [f"# qexport compare: {settings['model']}", "",
             f"Calibration: `{settings.get('data')}`, {settings['num_samples']} images, seed {settings['seed']}. "
             f"Evaluation: " + ", ".join(f"`{p}`" for p in settings["eval_data"])
             + (f" ({settings['eval_samples']} images each)" if settings.get("eval_samples") else "") + ".", ""]
    if ok:
        r0 = ok[0]
        fp32 = ", ".join(f"{n} {_pct(r0['eval'][n]['fp32_top1'])} %" for n in names if n in r0["eval"])
        lines += [f"FP32 top-1: {fp32}; FP32 model {r0['fp32_size_kb']:.1f} KB.", ""]
    head = ["method", "bits", "target"]
    for n in names:
        head += [f"{n} top-1 %", f"{n} drop", f"{n} agree %"]
    head += ["b1 ms", "speed-up b1", f"b{tb} img/s", f"speed-up b{tb}", "size KB", "calib s", "status"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], r["bits"], r["target"]]
        for n in names:
            e = (r.get("eval") or {}).get(n, {})
            cells += [_pct(e.get("top1")), _f(e.get("drop_points"), "{:.2f}"), _pct(e.get("agreement"))]
        cells += [_f(r.get("latency_b1_ms")), _f(r.get("speedup_b1"), "{:.2f}x"), _f(r.get("throughput_bt_ips"), "{:.0f}"),
                  _f(r.get("speedup_bt"), "{:.2f}x"), _f(r.get("size_kb"), "{:.1f}"),
                  _f(r.get("calibration_seconds"), "{:.1f}"),
                  "ok" if r["status"] == "ok" else f"failed: {r['reason']}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "drop: points of top-1 below the FP32 model; agree: engine vs QuantSim top-1 agreement; latency "
              "p50 at batch 1 and images/s at the throughput batch, speed-up vs the FP32 engine of the same runtime "
              "timed in the same run; size: integer weights at their true widths plus float parameters.",
              f"This run: {seconds:.0f} s (cells already done were reused)."]
    return "\n".join(lines) + "\n"


def write_outputs(rows: list[dict], out: Path, settings: dict, names: list[str], seconds: float) -> None:
    """Write compare.json, compare.md and the PNG plots (each file atomically)."""
    clean = [{k: v for k, v in r.items() if k != "reused"} for r in rows]
    write_text_atomic(out / "compare.json", json.dumps({"settings": settings, "eval": names, "rows": clean},
                                                       indent=2) + "\n")
    write_text_atomic(out / "compare.md", render_markdown(rows, settings, names, seconds))
    ok = [r for r in rows if r["status"] == "ok"]
    if ok:
        from qexport.compare.plots import plot_all

        plot_all(ok, out, names[0], settings, _save)


def _save(fig, path: Path) -> None:
    with atomic_file(path, force=True) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
