"""``qexport sensitivity``: load a model and calibration images, measure the table, write md + json + PNG."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qexport.errors import QexportError
from qexport.fileio import atomic_dir, check_output_free
from qexport.progress import progress_bar


@dataclass(frozen=True)
class SensitivityConfig:
    """Options of ``qexport sensitivity``."""

    model: str = field(metadata={"help": "model spec"})
    output: Path = field(metadata={"help": "folder to write (sensitivity.json, sensitivity.md, sensitivity.png)"})
    data: str = field(metadata={"help": "calibration image folder"})
    bits: str = field(default="w4a4", metadata={"help": "probe width(s), e.g. w4a4 or w3a4,w4a4,w6a6"})
    weights: str | None = field(default=None, metadata={"help": "checkpoint"})
    num_samples: int = field(default=256, metadata={"help": "calibration images (seeded subset)"})
    heldout: int = field(default=0, metadata={"help": "labelled images outside the calibration subset for top-1"})
    metric: str = field(default="kl", metadata={"help": "kl (softmax KL vs float) or mse (logit MSE)"})
    target: str = field(default="onnxruntime", metadata={"help": "plan target"})
    keep_float: tuple[str, ...] = field(default=(), metadata={"help": "layers left in float"})
    batch_size: int = field(default=64, metadata={"help": "images per forward pass"})
    seed: int = field(default=0, metadata={"help": "seed of the image subset"})
    force: bool = field(default=False, metadata={"help": "overwrite an existing output"})
    quiet: bool = field(default=False, metadata={"help": "no progress bars"})

    def __post_init__(self) -> None:
        if self.num_samples <= 0:
            raise QexportError(f"--num-samples must be positive, got {self.num_samples}")
        if self.heldout < 0:
            raise QexportError(f"--heldout must be >= 0, got {self.heldout}")
        if self.batch_size <= 0:
            raise QexportError(f"--batch-size must be positive, got {self.batch_size}")


def load_heldout(folder, num_samples: int, seed: int, count: int, quiet: bool = False, flag: str = "--heldout"):
    """``count`` labelled images outside the calibration subset of ``num_samples`` (the next ones of its permutation).

    Args:
        folder: an ImageFolder with class subfolders.
        num_samples: calibration images (the subset calibrate takes with ``seed``).
        seed: permutation seed.
        count: held-out images wanted.
        quiet: no progress bar.
        flag: the option that asked for them (named in the error).

    Returns:
        (images, labels).
    """
    from qexport.data import heldout_indices

    idx = heldout_indices(len(folder), num_samples, count, seed)
    if not folder.labelled or len(idx) < count:
        raise QexportError(f"{flag} {count} needs that many labelled images outside the {num_samples} "
                           f"calibration images; {folder.root} has {max(len(folder) - num_samples, 0)}"
                           + ("" if folder.labelled else " and no class subfolders"))
    return _load_indices(folder, idx, quiet)


def load_calibration(folder, num_samples: int, seed: int, heldout: int = 0, quiet: bool = False):
    """The calibration subset ``load_tensor`` takes, and optionally ``heldout`` labelled images outside it.

    Args:
        folder: an ImageFolder.
        num_samples: calibration images.
        seed: permutation seed (the same as calibrate's subset).
        heldout: held-out images (0: none).
        quiet: no progress bar.

    Returns:
        (x, y, heldout (x, y) or None).
    """
    from qexport.data import subset_indices

    held = load_heldout(folder, num_samples, seed, heldout, quiet) if heldout else None  # first: fails early
    x, y = _load_indices(folder, subset_indices(len(folder), num_samples, seed), quiet)
    return x, y, held


def _load_indices(folder, idx: list[int], quiet: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from qexport.data import iter_batches

    xs, ys = [], []
    with progress_bar((len(idx) + 63) // 64, "loading images", quiet) as bar:
        for x, y in iter_batches(folder, 64, idx):
            xs.append(x)
            ys.append(y)
            bar.advance(1)
    return torch.cat(xs), torch.cat(ys)


def run_sensitivity(cfg: SensitivityConfig) -> tuple[dict, Path]:
    """Measure and write the sensitivity table.

    Args:
        cfg: options.

    Returns:
        (the table, the output folder).
    """
    from qexport.data import ImageFolder
    from qexport.mixed.sensitivity import measure_sensitivity, parse_probe_widths
    from qexport.models import fold_batchnorm, load_model

    widths = parse_probe_widths(cfg.bits)
    out = check_output_free(cfg.output, cfg.force)
    loaded = load_model(cfg.model, cfg.weights)
    folded = fold_batchnorm(loaded.model)
    folder = ImageFolder(cfg.data, loaded.preprocess)
    x, _, held = load_calibration(folder, cfg.num_samples, cfg.seed, cfg.heldout, cfg.quiet)
    started = time.time()
    table = measure_sensitivity(folded, cfg.target, widths, x, heldout=held, metric=cfg.metric,
                                keep_float=cfg.keep_float, seed=cfg.seed, batch_size=cfg.batch_size, quiet=cfg.quiet)
    table.update(model=cfg.model, weights=cfg.weights, data=str(cfg.data), seed=cfg.seed,
                 seconds=round(time.time() - started, 1), threads=torch.get_num_threads())
    with atomic_dir(out, force=cfg.force) as tmp:
        write_table(table, tmp)
    return table, out


def write_table(table: dict, folder: Path) -> None:
    """sensitivity.json, sensitivity.md and sensitivity.png into ``folder``."""
    (folder / "sensitivity.json").write_text(json.dumps(table, indent=2) + "\n")
    (folder / "sensitivity.md").write_text(render_markdown(table))
    plot_table(table, folder / "sensitivity.png")


def render_markdown(table: dict) -> str:
    """The table as Markdown, most sensitive layer first."""
    widths = table["widths"]
    ho = table.get("heldout_images", 0) > 0
    head = ["rank", "layer", "weights"]
    for w in widths:
        head += [f"{w} both", f"{w} weights", f"{w} input"] + ([f"{w} top-1 drop"] if ho else [])
    lines = [f"# Sensitivity of {table.get('model', 'the model')} ({table['metric']} vs float on "
             f"{table['images']} calibration images)", "",
             f"One layer quantized at a time, everything else float; {table.get('seconds', '?')} s on "
             f"{table.get('threads', '?')} threads.", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for i, row in enumerate(table["layers"], 1):
        cells = [str(i), row["layer"], str(row["weights"])]
        for w in widths:
            c = row["loss"][w]
            cells += [f"{c['both']:.4g}", f"{c['weight']:.4g}", f"{c['act']:.4g}" if "act" in c else "-"]
            if ho:
                cells.append(f"{c['top1_drop']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only), or a one-line error when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        from qexport.errors import MissingDependencyError

        raise MissingDependencyError("the plots need matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_table(table: dict, path: Path) -> None:
    """Horizontal bars per layer (graph order, first layer at the top): the loss of its weights and of its input at each probe width."""
    plt = pyplot()
    rows = sorted(table["layers"], key=lambda r: r.get("index", 0))  # graph order
    widths = table["widths"]
    fig, axes = plt.subplots(1, len(widths), figsize=(5 * len(widths), 0.28 * len(rows) + 1.5), squeeze=False,
                             sharey=True)
    ys = list(range(len(rows)))
    for ax, w in zip(axes[0], widths):
        wl = [max(r["loss"][w]["weight"], 1e-9) for r in rows]
        al = [max(r["loss"][w].get("act", 0.0), 1e-9) for r in rows]
        ax.barh([y - 0.2 for y in ys], wl, height=0.4, label="weights")
        ax.barh([y + 0.2 for y in ys], al, height=0.4, label="input")
        ax.set_xscale("log")
        ax.set_title(f"{w}: {table['metric']} vs float")
        ax.legend(loc="lower right", fontsize=8)
    axes[0][0].set_yticks(ys, [r["layer"] for r in rows], fontsize=7)
    axes[0][0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_table(path: str | Path) -> dict:
    """Read a sensitivity.json (or the folder holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / "sensitivity.json"
    try:
        table = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise QexportError(f"sensitivity table {p} is not readable ({e}); write one with `qexport sensitivity`") from None
    if table.get("format") != "qexport-sensitivity":
        raise QexportError(f"{p} is not a qexport sensitivity table")
    return table
