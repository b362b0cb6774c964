"""``qexport compare``: every method x width x target through calibrate, export, build-engine and verify."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from qexport.errors import QexportError

_MODEL_HELP = "cifar:resnet20|32|44|56, torchvision:<name>, package.module:factory, or a torch.export .pt2 file"


def _list(text: str, flag: str) -> tuple[str, ...]:
    vals = tuple(v.strip() for v in text.split(",") if v.strip())
    if not vals:
        raise QexportError(f"{flag} needs a comma-separated list, e.g. {flag} minmax,mse")
    return vals


def _coerce(value: str):
    """A CLI option value as JSON when it is a number, boolean or null, else the string itself."""
    try:
        v = json.loads(value)
    except ValueError:
        return value
    return v if isinstance(v, (int, float, bool)) or v is None else value


def method_options(opts: list[str], options_file: Optional[Path]) -> dict:
    """``--options FILE.json`` ({method: {key: value}}) overlaid with ``--opt method.key=value`` entries.

    Args:
        opts: the repeated ``--opt`` values.
        options_file: the JSON file or None.

    Returns:
        method -> {option: value}.
    """
    out: dict[str, dict] = {}
    if options_file is not None:
        try:
            d = json.loads(Path(options_file).read_text())
        except (OSError, ValueError) as e:
            raise QexportError(f"--options {options_file} is not readable JSON ({e})") from None
        if not isinstance(d, dict) or not all(isinstance(v, dict) for v in d.values()):
            raise QexportError(f"--options {options_file} must map each method to its options, "
                               '{"gpfq": {"c": "auto"}}')
        out = {m: dict(v) for m, v in d.items()}
    for item in opts:
        key, sep, value = item.partition("=")
        method, dot, name = key.partition(".")
        if not sep or not dot or not method or not name:
            raise QexportError(f"--opt {item!r} must be METHOD.OPTION=VALUE, e.g. gpfq.c=auto")
        out.setdefault(method.strip(), {})[name.strip().replace("-", "_")] = _coerce(value.strip())
    return out


def compare(
    model: str = typer.Argument(..., help=_MODEL_HELP),
    output: Path = typer.Option(..., "-o", "--output", help="Comparison folder; a rerun reuses the cells already "
                                "done and resumes an interrupted comparison."),
    methods: str = typer.Option("minmax,mse", help="Calibration methods, comma-separated."),
    bits: str = typer.Option("w8a8", help="Widths, comma-separated, e.g. w8a8,w4a8,w4a4."),
    targets: str = typer.Option("onnxruntime", help="Runtimes, comma-separated: onnxruntime, openvino, tensorrt."),
    eval_data: list[Path] = typer.Option(..., help="Labelled evaluation folder (repeatable: each gets its columns)."),
    weights: Optional[Path] = typer.Option(None, help="Checkpoint."),
    data: Optional[Path] = typer.Option(None, help="Calibration image folder."),
    num_samples: int = typer.Option(512, help="Calibration images (a seeded subset)."),
    eval_samples: Optional[int] = typer.Option(None, help="Evaluate on a seeded subset of each folder."),
    opt: list[str] = typer.Option([], "--opt", help="Method option METHOD.OPTION=VALUE (repeatable), e.g. "
                                  "gpfq.c=auto, adasg.time_budget=5m."),
    options: Optional[Path] = typer.Option(None, "--options", help='JSON file {"gpfq": {"c": "auto"}, ...}; --opt '
                                           "entries win."),
    seed: int = typer.Option(0, help="Seed of calibration and evaluation subsets."),
    threads: Optional[int] = typer.Option(None, help="Engine threads (default: all available cores)."),
    throughput_batch: int = typer.Option(32, help="Batch size of the throughput measurement."),
    bench_iters: int = typer.Option(30, help="Timed calls per engine and batch size."),
    force: bool = typer.Option(False, "--force", help="Start the comparison folder over."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display."),
) -> None:
    """Run every method x width x target through the pipeline; write compare.md, compare.json and plots."""
    from qexport.compare.grid import CompareConfig, run_compare

    cfg = CompareConfig(model=model, output=output, methods=_list(methods, "--methods"), bits=_list(bits, "--bits"),
                        targets=_list(targets, "--targets"), eval_data=tuple(str(p) for p in eval_data),
                        weights=str(weights) if weights else None, data=str(data) if data else None,
                        num_samples=num_samples, eval_samples=eval_samples,
                        method_options=method_options(opt, options), seed=seed, threads=threads,
                        throughput_batch=throughput_batch, bench_iters=bench_iters, force=force, quiet=quiet)
    rows, out = run_compare(cfg)
    failed = [r for r in rows if r["status"] != "ok"]
    reused = sum(1 for r in rows if r.get("reused"))
    typer.echo(f"{len(rows) - len(failed)} of {len(rows)} cells ok ({reused} reused); {out}/compare.md")
    for r in failed:
        typer.echo(f"failed: {r['method']} {r['bits']} {r['target']}: {r['reason']}")
