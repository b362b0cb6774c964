"""The comparison's PNG plots (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both (lower x, higher y), sorted by x.

    Args:
        points: (latency, accuracy) pairs.

    Returns:
        Indices on the front.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def _width_key(bits: str) -> tuple[int, int]:
    import re

    m = re.match(r"w(\d+)(?:a(\d+))?", bits)
    return (int(m.group(1)), int(m.group(2) or 32)) if m else (99, 99)


def plot_all(rows: list[dict], out: Path, eval_name: str, settings: dict, save: Callable) -> None:
    """accuracy_vs_width.png, accuracy_vs_latency.png (one panel per target), calibration_time.png.

    Args:
        rows: the successful rows.
        out: folder.
        eval_name: the evaluation folder whose top-1 is plotted.
        settings: the comparison's settings (model name for titles).
        save: ``save(fig, path)`` writes a figure atomically.
    """
    from qexport.mixed.sensitivity_run import pyplot

    plt = pyplot()
    model = settings["model"]
    _accuracy_vs_width(plt, rows, out, eval_name, model, save)
    _accuracy_vs_latency(plt, rows, out, eval_name, model, save)
    _calibration_time(plt, rows, out, model, save)


def _top1(r: dict, name: str) -> float:
    return 100.0 * r["eval"][name]["top1"]


def _accuracy_vs_width(plt, rows, out, name, model, save) -> None:
    widths = sorted({r["bits"] for r in rows}, key=_width_key, reverse=True)
    targets = sorted({r["target"] for r in rows})
    styles = ["-", "--", ":", "-."]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for m in sorted({r["method"] for r in rows}):
        for k, t in enumerate(targets):
            pts = [(widths.index(r["bits"]), _top1(r, name)) for r in rows if r["method"] == m and r["target"] == t]
            if pts:
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], styles[k % 4], marker="o",
                        label=f"{m} ({t})" if len(targets) > 1 else m)
    fp32 = rows[0]["eval"][name]["fp32_top1"]
    if fp32 is not None:
        ax.axhline(100 * fp32, color="grey", lw=0.8, ls="--", label="FP32")
    ax.set_xticks(range(len(widths)), widths)
    ax.set(xlabel="width", ylabel=f"engine top-1 % ({name})", title=f"{model}: accuracy vs width")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save(fig, out / "accuracy_vs_width.png")
    plt.close(fig)


def _accuracy_vs_latency(plt, rows, out, name, model, save) -> None:
    targets = sorted({r["target"] for r in rows if r.get("latency_b1_ms")})
    if not targets:
        return
    fig, axes = plt.subplots(1, len(targets), figsize=(5.5 * len(targets), 4.2), squeeze=False)
    for ax, t in zip(axes[0], targets):
        rs = [r for r in rows if r["target"] == t and r.get("latency_b1_ms")]
        pts = [(r["latency_b1_ms"], _top1(r, name)) for r in rs]
        for m in sorted({r["method"] for r in rs}):
            sel = [p for p, r in zip(pts, rs) if r["method"] == m]
            ax.scatter([p[0] for p in sel], [p[1] for p in sel], label=m, zorder=3)
        for p, r in zip(pts, rs):
            ax.annotate(r["bits"], p, fontsize=6, xytext=(3, 3), textcoords="offset points")
        front = [pts[i] for i in pareto_front(pts)]
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="black", lw=1, zorder=2)
        ax.scatter([p[0] for p in front], [p[1] for p in front], s=140, facecolors="none", edgecolors="black",
                   label="Pareto front", zorder=4)
        fp = rs[0].get("fp32_latency_b1_ms")
        if fp:
            ax.axvline(fp, color="grey", lw=0.8, ls="--", label="FP32 engine latency")
        ax.set(xlabel="p50 latency at batch 1 (ms)", ylabel=f"engine top-1 % ({name})", title=f"{model} on {t}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save(fig, out / "accuracy_vs_latency.png")
    plt.close(fig)


def _calibration_time(plt, rows, out, model, save) -> None:
    methods = sorted({r["method"] for r in rows})
    widths = sorted({r["bits"] for r in rows}, key=_width_key, reverse=True)
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    step = 0.8 / max(len(widths), 1)
    for k, b in enumerate(widths):
        vals = []
        for m in methods:
            v = [r["calibration_seconds"] for r in rows if r["method"] == m and r["bits"] == b
                 and r.get("calibration_seconds") is not None]
            vals.append(v[0] if v else 0.0)
        ax.bar([i - 0.4 + step * (k + 0.5) for i in range(len(methods))], vals, width=step, label=b)
    ax.set_xticks(range(len(methods)), methods)
    positive = all(r.get("calibration_seconds") for r in rows)
    ax.set_yscale("log" if positive else "linear")
    ax.set(ylabel=f"calibration time (s{', log' if positive else ''})", title=f"{model}: calibration time per method")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save(fig, out / "calibration_time.png")
    plt.close(fig)
