"""``qexport sensitivity``: per-layer loss of quantizing one layer alone at a low width (table + bar chart)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

_MODEL_HELP = "cifar:resnet20|32|44|56, torchvision:<name>, package.module:factory, or a torch.export .pt2 file"


def sensitivity(
    model: str = typer.Argument(..., help=_MODEL_HELP),
    output: Path = typer.Option(..., "-o", "--output", help="Folder to write: sensitivity.json, .md and .png."),
    data: Path = typer.Option(..., help="Calibration image folder (the loss is measured on these images)."),
    bits: str = typer.Option("w4a4", help="Probe width, or several comma-separated (w3a4,w4a4,w6a6): each layer "
                             "is quantized alone at each."),
    weights: Optional[Path] = typer.Option(None, help="Checkpoint."),
    num_samples: int = typer.Option(256, help="Calibration images (the seeded subset calibrate takes)."),
    heldout: int = typer.Option(0, help="Also measure the top-1 drop on this many labelled images of --data "
                                "outside the calibration subset."),
    metric: str = typer.Option("kl", help="kl: softmax KL divergence vs float; mse: logit mean squared error."),
    target: str = typer.Option("onnxruntime", help="Plan target (where activation quantizers sit)."),
    keep_float: list[str] = typer.Option([], help="Layer to leave in float (repeatable)."),
    batch_size: int = typer.Option(64, help="Images per forward pass."),
    seed: int = typer.Option(0, help="Seed of the image subset."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output folder."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Rank the layers by what quantizing each one alone at a low width costs (KL or MSE vs the float model)."""
    from qexport.mixed.sensitivity_run import SensitivityConfig, run_sensitivity

    cfg = SensitivityConfig(model=model, output=output, data=str(data), bits=bits,
                            weights=str(weights) if weights else None, num_samples=num_samples, heldout=heldout,
                            metric=metric, target=target, keep_float=tuple(keep_float), batch_size=batch_size,
                            seed=seed, force=force, quiet=quiet)
    table, out = run_sensitivity(cfg)
    top = ", ".join(r["layer"] for r in table["layers"][:3])
    typer.echo(f"most sensitive at {table['widths'][0]}: {top}; table written to {out}/sensitivity.md")
