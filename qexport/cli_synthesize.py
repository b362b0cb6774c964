"""``qexport synthesize``: calibration images from pretrained models alone (BN-statistics inversion / MixMix)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def synthesize(
    model: str = typer.Argument(..., help="Target model: cifar:resnet20, torchvision:<name>, package.module:factory."),
    output: Path = typer.Option(..., "-o", "--output", help="Image folder to write (class subfolders of PNGs, "
                                                           "contact_<class>.png sheets, synthesis.json)."),
    weights: Optional[Path] = typer.Option(None, help="Checkpoint of the target model."),
    zoo: list[str] = typer.Option([], help="Extra zoo model MODEL[=WEIGHTS] (repeatable), or a folder with a "
                                           "zoo.txt of such lines; mixmix inverts the target and the zoo together."),
    mode: str = typer.Option("mixmix", help="mixmix (zoo feature mixing + data mixing) or bns (the target's "
                                           "BN statistics only)."),
    num_images: int = typer.Option(1024, help="Images to synthesize (balanced over the classes)."),
    iters: int = typer.Option(500, help="Optimisation steps per batch (large inputs: half at half resolution)."),
    batch_size: int = typer.Option(64, help="Images optimised together."),
    time_budget: Optional[str] = typer.Option(None, help="Cap for the whole run, e.g. 15m (split over batches)."),
    zoo_per_step: int = typer.Option(0, help="mixmix: zoo models run per step, drawn at random (0: all of them; "
                                             "fewer make a step cheaper, so more steps fit a time budget)."),
    seed: int = typer.Option(0, help="Seed: the same seed gives the same images."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output folder."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run at its next batch."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Synthesize calibration images by inverting MODEL (and a zoo); never reads a real image."""
    from qexport.data.synthesize import SynthConfig
    from qexport.training.synthesis_run import synthesize_folder

    cfg = SynthConfig(mode=mode, num_images=num_images, iters=iters, batch_size=batch_size, time_budget=time_budget,
                      zoo_per_step=zoo_per_step)
    out = synthesize_folder(model, str(weights) if weights else None, tuple(zoo), cfg, output, seed=seed,
                            device=device, force=force, resume=resume, quiet=quiet)
    typer.echo(f"{num_images} images written to {out}")

