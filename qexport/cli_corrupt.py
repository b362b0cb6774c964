"""``qexport corrupt IMAGES -o OUT``: seeded corrupted copies of a labelled image folder (a shifted test set)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def _names(text: Optional[str]) -> Optional[tuple[str, ...]]:
    return None if text is None else tuple(t.strip() for t in text.split(",") if t.strip())


def _ints(text: Optional[str]) -> Optional[tuple[int, ...]]:
    from qexport.errors import QexportError

    if text is None:
        return None
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise QexportError(f"--severities {text!r} must be comma-separated integers in 1..5, e.g. 1,3,5") from None


def corrupt(
    images: Path = typer.Argument(..., help="Labelled image folder (one subfolder per class), e.g. a test set."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder to write: <corruption>-<severity>/<class>/*.png "
                                "and corruptions.json."),
    corruptions: Optional[str] = typer.Option(None, help="Comma-separated subset of gaussian_noise, gaussian_blur, "
                                              "contrast, brightness, jpeg (default: all five)."),
    severities: Optional[str] = typer.Option(None, help="Comma-separated severities 1..5 (default: 3)."),
    num_samples: Optional[int] = typer.Option(None, help="Corrupt a seeded subset of this many images (default all)."),
    seed: int = typer.Option(0, help="Seed of the random draws (noise) and of the subset."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output folder."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Write seeded corrupted copies of IMAGES (noise, blur, contrast, brightness, JPEG at fixed severities).

    Each <corruption>-<severity> folder is an ordinary labelled image folder: pass them to `qexport verify --data`
    (repeatable) to measure accuracy under distribution shift the same way every time. The same command, seed
    and source give the same files.
    """
    from qexport.data.corrupt import CorruptConfig, write_corrupted
    from qexport.progress import progress_bar

    kw = {"seed": seed, "num_samples": num_samples}
    if _names(corruptions) is not None:
        kw["corruptions"] = _names(corruptions)
    if _ints(severities) is not None:
        kw["severities"] = _ints(severities)
    cfg = CorruptConfig(**kw)
    with progress_bar(None, "writing corrupted images", quiet) as bar:
        out = write_corrupted(images, output, cfg, force=force,
                              progress=lambda done, total: bar.update(completed=done, total=total))
    typer.echo(f"wrote {len(cfg.corruptions) * len(cfg.severities)} corrupted folders to {out} (see corruptions.json)")
