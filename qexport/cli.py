"""The ``qexport`` command line: a thin typer app; each command builds a config and calls one function.

Heavy imports happen inside the commands, so ``qexport --help`` is fast and needs no optional runtime.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from qexport.errors import QexportError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Calibrate a PyTorch CNN, export QDQ ONNX, build an INT8 engine and verify it.\n\n"
                       "  qexport calibrate MODEL --method mse --bits w8a8 --data DIR -o recipe/\n\n"
                       "  qexport export recipe/ --target onnxruntime -o model.onnx\n\n"
                       "  qexport build-engine model.onnx --target onnxruntime -o engine/\n\n"
                       "  qexport verify engine/ --recipe recipe/ --data DIR")

_MODEL_HELP = ("cifar:resnet20|32|44|56, torchvision:<name>, package.module:factory, or a torch.export .pt2 file")
_MIXED = "Mixed precision"


def _floats(text: Optional[str], what: str) -> Optional[tuple[float, ...]]:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise QexportError(f"{what} {text!r} must be comma-separated numbers, e.g. 0.485,0.456,0.406") from None


def _size(text: Optional[str]) -> Optional[tuple[int, int]]:
    if text is None:
        return None
    try:
        parts = [int(v) for v in text.lower().replace("x", ",").split(",")]
    except ValueError:
        raise QexportError(f"--input-size {text!r} must be H,W or a single size, e.g. 224 or 32,32") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) <= 0:
        raise QexportError(f"--input-size {text!r} must be H,W or a single positive size")
    return parts[0], parts[1]


def _auto_bits(bits: str, weight_avg: Optional[float], act_avg: Optional[float], size_kb: Optional[float],
               sensitivity: Optional[Path], allocator: Optional[str] = None, heldout_images: Optional[int] = None,
               floor: Optional[bool] = None):
    if all(v is None for v in (weight_avg, act_avg, size_kb, sensitivity, allocator, heldout_images, floor)):
        return None
    from qexport.mixed.allocate import AUTO_ONLY_FLAGS, AutoBitsConfig

    if bits.strip().lower() != "auto":  # before AutoBitsConfig, whose own checks would name the wrong problem
        raise QexportError(AUTO_ONLY_FLAGS)

    return AutoBitsConfig(weight_bits_avg=weight_avg, act_bits_avg=act_avg, size_kb=size_kb,
                          sensitivity=str(sensitivity) if sensitivity else None, allocator=allocator or "knapsack",
                          heldout_images=heldout_images, floor=True if floor is None else floor)


def _calibrator_configs() -> dict[str, type]:
    from qexport.calibrators import list_calibrators

    return {info.name: info.config for info in list_calibrators()}


def _calibrator_config(name: str) -> type:
    from qexport.calibrators import get_calibrator

    return get_calibrator(name).config


def _replay_method(args: list[str]) -> Optional[str]:
    """The method of the recipe named by ``--replay`` (None when absent or unreadable: reported later)."""
    from qexport.cli_options import scan_flag

    folder = scan_flag(args, "--replay")
    if folder is None:
        return None
    from qexport.calibrate import recipe_method

    return recipe_method(Path(folder))


def _method_command(command: str, pick=None) -> type:
    from qexport.cli_options import selector_command

    return selector_command(selector="--method", default="mse", kind="method", command=command,
                            resolve=_calibrator_config, everyone=_calibrator_configs, pick=pick)


_OPT_HELP = "A method option as key=value (repeatable), e.g. --opt time_budget=30m; same as the flag."
_OPTIONS_HELP = "JSON file of method options {name: value}; --opt and flags override it."


@app.command(cls=_method_command("calibrate", pick=_replay_method))
def calibrate(
    ctx: typer.Context,
    model: Optional[str] = typer.Argument(None, help=_MODEL_HELP + " (not with --replay)."),
    output: Path = typer.Option(..., "-o", "--output", help="Recipe folder to write (recipe.json + tensors.safetensors)."),
    method: str = typer.Option("mse", help="Calibration method; `qexport methods` lists them. Its options are "
                                           "listed by `qexport calibrate --method M --help`."),
    bits: str = typer.Option("w8a8", help="Bit widths: wNaM (w8a8, w4a8, w4a4), wN for weights only, a JSON map "
                             "file {\"default\": \"w4a8\", \"layers\": {NAME: \"w8a8\"}} (mixed precision), or "
                             "'auto' with a budget (--weight-bits-avg / --act-bits-avg / --size-kb)."),
    weights: Optional[Path] = typer.Option(None, help="Checkpoint: state dict (.pt/.pth/.th) or .safetensors."),
    data: Optional[Path] = typer.Option(None, help="Calibration image folder (class subfolders or flat)."),
    num_samples: int = typer.Option(512, help="Calibration images used (a seeded random subset)."),
    target: str = typer.Option("onnxruntime", help="Runtime whose placement plan is used: onnxruntime, tensorrt, openvino."),
    first_last_bits: Optional[int] = typer.Option(None, help="Keep the first and last layer at this width (e.g. 8)."),
    layer_bits: list[str] = typer.Option([], "--layer-bits", help="Per-layer width on top of --bits, NAME=wNaM "
                                         "(repeatable), e.g. layer1.0.conv1=w8a8.", rich_help_panel=_MIXED),
    weight_bits_avg: Optional[float] = typer.Option(None, help="--bits auto: mean weight bits (weighted by weight "
                                                    "count), e.g. 4.5.", rich_help_panel=_MIXED),
    act_bits_avg: Optional[float] = typer.Option(None, help="--bits auto: mean input-activation bits (weighted by "
                                                 "tensor size); default: activations at 8.", rich_help_panel=_MIXED),
    size_kb: Optional[float] = typer.Option(None, help="--bits auto: budget of the integer weights in KB (1024 "
                                            "bytes).", rich_help_panel=_MIXED),
    sensitivity: Optional[Path] = typer.Option(None, help="--bits auto: sensitivity.json from `qexport "
                                               "sensitivity` (default: measured now on the calibration images).",
                                               rich_help_panel=_MIXED),
    allocator: Optional[str] = typer.Option(None, help="--bits auto: knapsack (adds per-layer sensitivities; "
                                            "default), greedy (raises one layer at a time by the measured loss "
                                            "of the whole model against the float model; weight widths only) or "
                                            "labels (the same search on the cross-entropy of labelled images "
                                            "outside the calibration subset: the most accurate on ResNet-20, needs "
                                            "class subfolders; docs/mixed_precision.md).", rich_help_panel=_MIXED),
    heldout_images: Optional[int] = typer.Option(None, help="--allocator labels: how many labelled images right "
                                                 "after the calibration subset it measures on (default 1000).",
                                                 rich_help_panel=_MIXED),
    floor: Optional[bool] = typer.Option(None, "--floor/--no-floor", help="--bits auto: keep every layer at or "
                                         "above the floor of the mean budget (default), or let layers go lower "
                                         "(one bit lower with the greedy allocators) to pay for others.",
                                         rich_help_panel=_MIXED),
    keep_float: list[str] = typer.Option([], help="Layer to leave in float (repeatable), e.g. an unsupported one."),
    input_size: Optional[str] = typer.Option(None, help="Override the input size: H,W or one number."),
    mean: Optional[str] = typer.Option(None, help="Override normalisation mean, e.g. 0.485,0.456,0.406."),
    std: Optional[str] = typer.Option(None, help="Override normalisation std."),
    seed: int = typer.Option(0, help="Seed: the same seed gives the same recipe."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output folder."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its checkpoint."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    opt: list[str] = typer.Option([], "--opt", help=_OPT_HELP),
    options: Optional[Path] = typer.Option(None, "--options", help=_OPTIONS_HELP),
    replay: Optional[Path] = typer.Option(None, "--replay", help="Recalibrate as RECIPE_DIR was: same model, method, "
                                          "options, bits, plan, seed and data (only -o, --force, --quiet, "
                                          "--device and --resume may be given with it)."),
) -> None:
    """Calibrate MODEL with a method and write a recipe folder (integer weights, scales, provenance).

    Method options are ordinary flags (--time-budget 30m), --opt key=value or --options FILE.json; the chosen
    method's options are listed at the end of this help.
    """
    from qexport.cli_options import check_replay_alone, collected_options
    from qexport.calibrate import CalibrateConfig, calibrate as run_calibrate, replay_config

    method_options = collected_options(ctx, options, opt)
    if replay is not None:
        check_replay_alone(ctx, method_options, allowed=("output", "force", "quiet", "device", "resume", "replay"))
        cfg = replay_config(replay, output, force=force, quiet=quiet, device=device, resume=resume)
    else:
        if model is None:
            raise QexportError("MODEL is missing: qexport calibrate MODEL -o RECIPE_DIR (or --replay RECIPE_DIR)")
        cfg = CalibrateConfig(model=model, output=output, method=method, bits=bits, target=target,
                              weights=str(weights) if weights else None, data=str(data) if data else None,
                              num_samples=num_samples, seed=seed, first_last_bits=first_last_bits,
                              keep_float=tuple(keep_float), input_size=_size(input_size),
                              mean=_floats(mean, "--mean"), std=_floats(std, "--std"), device=device, force=force,
                              resume=resume, quiet=quiet, options=method_options, layer_bits=tuple(layer_bits),
                              auto_bits=_auto_bits(bits, weight_bits_avg, act_bits_avg, size_kb, sensitivity,
                                                   allocator, heldout_images, floor))
    out = run_calibrate(cfg)
    typer.echo(f"recipe written to {out}")


@app.command("export")
def export_cmd(
    recipe: Path = typer.Argument(..., help="Recipe folder from `qexport calibrate`."),
    output: Path = typer.Option(..., "-o", "--output", help="QDQ ONNX file; the FP32 baseline goes beside it as <name>.fp32.onnx."),
    target: str = typer.Option("onnxruntime", help="onnxruntime (uint8 activations), tensorrt (int8, zero point 0) or openvino."),
    opset: int = typer.Option(17, help="ONNX opset (>= 13)."),
    erf_encoding: str = typer.Option("erf", help="Aligned (alignq) activations as 'erf' (DQ, Erf, Q: every runtime) or 'lookup' (a table from incoming to outgoing 8-bit codes: onnxruntime/openvino)."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing files."),
) -> None:
    """Export a recipe as QDQ ONNX for a target (checked against the target's rules before writing)."""
    from qexport.export.qdq import export_recipe

    qdq, fp32, _ = export_recipe(recipe, target, output, force=force, opset=opset, erf_encoding=erf_encoding)
    typer.echo(f"wrote {qdq} ({target} QDQ) and {fp32} (FP32 baseline)")


def _runtime_options(name: str) -> type:
    from qexport.runtimes import get_runtime

    return get_runtime(name).options


def _all_runtime_options() -> dict[str, type]:
    from qexport.runtimes import get_runtime, list_runtimes

    return {name: get_runtime(name).options for name in list_runtimes()}


def _runtime_command() -> type:
    from qexport.cli_options import selector_command

    return selector_command(selector="--target", default="onnxruntime", kind="runtime", command="build-engine",
                            resolve=_runtime_options, everyone=_all_runtime_options)


@app.command("build-engine", cls=_runtime_command())
def build_engine(
    ctx: typer.Context,
    onnx_file: Path = typer.Argument(..., metavar="MODEL.onnx", help="QDQ ONNX from `qexport export`."),
    output: Path = typer.Option(..., "-o", "--output", help="Engine folder to write."),
    target: str = typer.Option("onnxruntime", help="onnxruntime, openvino or tensorrt."),
    fp32: Optional[Path] = typer.Option(None, help="FP32 baseline ONNX (default: <name>.fp32.onnx beside MODEL.onnx, if present)."),
    threads: Optional[int] = typer.Option(None, help="CPU threads (default: all available cores)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing engine folder."),
    opt: list[str] = typer.Option([], "--opt", help="A runtime build option as key=value (repeatable)."),
    options: Optional[Path] = typer.Option(None, "--options", help="JSON file of runtime build options."),
) -> None:
    """Build a runnable INT8 engine (and its FP32 baseline) from a QDQ ONNX file.

    The chosen runtime's build options (flags, --opt key=value or --options FILE.json) are listed at the end.
    """
    from qexport.cli_options import collected_options
    from qexport.build_engine import build_engine_folder

    out = build_engine_folder(onnx_file, output, target, fp32=fp32, threads=threads, force=force,
                              options=collected_options(ctx, options, opt))
    typer.echo(f"engine written to {out}")


@app.command()
def verify(
    engine: Path = typer.Argument(..., help="Engine folder from `qexport build-engine`."),
    recipe: Path = typer.Option(..., help="The recipe folder the engine was exported from."),
    data: list[Path] = typer.Option(..., help="Image folder (class subfolders give top-1). Repeatable: every folder is "
                                    "evaluated and reported (the first is the main one); a folder written by "
                                    "`qexport corrupt` stands for all its corrupted folders."),
    report: Optional[Path] = typer.Option(None, help="Report folder (default: <engine>.report beside the engine)."),
    num_samples: Optional[int] = typer.Option(None, help="Use a seeded subset of this many images (default all)."),
    batch_size: int = typer.Option(64, help="Inference batch size."),
    threads: Optional[int] = typer.Option(None, help="Runtime threads (default: the engine's)."),
    bench_batch: list[int] = typer.Option([1], help="Batch size to time (repeatable); 0 skips timing."),
    bench_iters: int = typer.Option(50, help="Timed calls per engine and batch size."),
    max_drop: Optional[float] = typer.Option(None, help="Fail (exit 1) if engine top-1 drops more points than this vs FP32."),
    min_agreement: Optional[float] = typer.Option(None, help="Fail (exit 1) if engine vs QuantSim agreement (%) is below this."),
    seed: int = typer.Option(0, help="Seed of the image subset."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing report folder."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Compare engine, QuantSim and FP32 on images; time INT8 vs FP32; write report.json and report.md."""
    from qexport.verify.compare import VerifyConfig, verify as run_verify
    from qexport.verify.report import print_report

    sizes = tuple(b for b in bench_batch if b > 0)
    from qexport.data.corrupt import expand_data_folders

    folders = expand_data_folders(data)
    cfg = VerifyConfig(engine=engine, recipe=recipe, data=folders[0], more_data=tuple(folders[1:]), report=report, num_samples=num_samples, seed=seed,
                       batch_size=batch_size, threads=threads, bench_batch_sizes=sizes, bench_iters=bench_iters,
                       max_drop=max_drop, min_agreement=min_agreement, force=force, quiet=quiet)
    rep, out = run_verify(cfg)
    print_report(rep)
    typer.echo(f"report written to {out}/report.md")
    if not rep["passed"]:
        raise typer.Exit(1)


@app.command(cls=_method_command("run"))
def run(
    ctx: typer.Context,
    model: str = typer.Argument(..., help=_MODEL_HELP),
    output: Path = typer.Option(..., "-o", "--output", help="Run folder: recipe, model.onnx, engine/, report."),
    eval_data: Path = typer.Option(..., help="Labelled image folder for verify (never used for calibration)."),
    method: str = typer.Option("mse", help="Calibration method; its options: `qexport run --method M --help`."),
    bits: str = typer.Option("w8a8", help="Bit widths, e.g. w8a8."),
    weights: Optional[Path] = typer.Option(None, help="Checkpoint."),
    data: Optional[Path] = typer.Option(None, help="Calibration image folder."),
    num_samples: int = typer.Option(512, help="Calibration images."),
    target: str = typer.Option("onnxruntime", help="Runtime: onnxruntime or openvino (tensorrt needs a GPU)."),
    eval_samples: Optional[int] = typer.Option(None, help="Verify on a seeded subset of this many images."),
    seed: int = typer.Option(0, help="Seed."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing run folder."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    opt: list[str] = typer.Option([], "--opt", help=_OPT_HELP),
    options: Optional[Path] = typer.Option(None, "--options", help=_OPTIONS_HELP),
) -> None:
    """All four steps in one: calibrate, export, build-engine and verify into one run folder.

    Method options as in `qexport calibrate`: flags, --opt key=value or --options FILE.json.
    """
    from qexport.cli_options import collected_options
    from qexport.run import run_pipeline
    from qexport.verify.report import print_report

    method_options = collected_options(ctx, options, opt)
    rep, folder = run_pipeline(model=model, output=output, eval_data=eval_data, method=method, bits=bits,
                               weights=weights, data=data, num_samples=num_samples, target=target,
                               eval_samples=eval_samples, seed=seed, force=force, quiet=quiet,
                               options=method_options)
    print_report(rep)
    typer.echo(f"run folder {folder}: recipe/, model.onnx, engine/, report/report.md")


@app.command()
def methods(
    name: Optional[str] = typer.Argument(None, help="A method: list its options (type, default, help)."),
) -> None:
    """List the registered calibration methods, one line each; with NAME, that method's options."""
    from qexport.calibrators import get_calibrator, list_calibrators
    from qexport.options import options_help

    if name is not None:
        info = get_calibrator(name)
        kind = "data" if info.needs_data else "data-free"
        typer.echo(f"{info.name} ({kind}): {info.summary}\n\nOptions (flags of `qexport calibrate --method "
                   f"{info.name}` and `qexport run`, or --opt key=value, or --options FILE.json):")
        typer.echo(options_help(info.config))
        return
    for info in list_calibrators():
        kind = "data" if info.needs_data else "data-free"
        typer.echo(f"{info.name:<11} {kind:<9} {info.summary}")


@app.command()
def check(
    onnx_file: Path = typer.Argument(..., metavar="MODEL.onnx", help="ONNX file to check."),
    target: str = typer.Option(..., help="tensorrt, onnxruntime or openvino."),
) -> None:
    """Check a QDQ ONNX file offline against a target's rules; exit 1 if any rule is broken."""
    from qexport.export.check import run_check

    raise typer.Exit(run_check(onnx_file, target, echo=typer.echo))


from qexport.cli_compare import compare as _compare  # noqa: E402
from qexport.cli_sensitivity import sensitivity as _sensitivity  # noqa: E402
from qexport.cli_synthesize import synthesize as _synthesize  # noqa: E402

app.command("synthesize")(_synthesize)
app.command("sensitivity")(_sensitivity)
app.command("compare")(_compare)


def _exception_classes() -> tuple[type, type, type]:
    """(Exit, ClickException, Abort) as this typer raises them (typer >= 0.29 bundles its own click)."""
    try:
        from typer._click.exceptions import ClickException
        from typer.exceptions import Abort, Exit
    except ImportError:  # older typer uses click itself
        from click.exceptions import Abort, ClickException, Exit
    return Exit, ClickException, Abort


from qexport.cli_corrupt import corrupt  # noqa: E402

app.command()(corrupt)


def main() -> None:
    """Console entry point: one-line errors with exit code 2, Ctrl-C exits 130 leaving no partial output."""
    exit_cls, click_error, abort_cls = _exception_classes()
    try:
        # Not standalone: typer returns (rather than raises) the code of typer.Exit here.
        sys.exit(typer.main.get_command(app).main(standalone_mode=False, prog_name="qexport") or 0)
    except exit_cls as e:
        sys.exit(e.exit_code)
    except click_error as e:  # usage errors: click's message, exit code 2
        e.show()
        sys.exit(e.exit_code)
    except (abort_cls, KeyboardInterrupt):
        typer.echo("interrupted: nothing was written (a resumable run keeps its checkpoint; use --resume)", err=True)
        sys.exit(130)
    except QexportError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
