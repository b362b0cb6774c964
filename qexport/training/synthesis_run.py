"""A whole synthesis run: the zoo, balanced labels, batches under a budget, checkpoints, the image folder.

Output folder (written atomically): ``<class>/NNNNNN.png`` for every image, ``contact_<class>.png`` (a grid of up
to 16 images of the class, for a person to look at; files in the root are not read as images by ImageFolder),
and ``synthesis.json`` (options, zoo specs and weight hashes, seed, per-batch BN loss first/last, seconds).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from qexport.data.synthesize import SynthConfig, SynthesisBatch, ZooMember, make_member
from qexport.errors import QexportError
from qexport.training.loop import LoopConfig, TrainLoop

CHECKPOINT = "synthesis.pt"


def parse_zoo_entry(text: str) -> tuple[str, str | None]:
    """``MODEL[=WEIGHTS]`` -> (model spec, weights path or None)."""
    spec, sep, weights = text.partition("=")
    if not spec.strip() or (sep and not weights.strip()):
        raise QexportError(f"--zoo {text!r} must be MODEL or MODEL=WEIGHTS, e.g. cifar:resnet32=resnet32.th")
    return spec.strip(), (weights.strip() or None)


def expand_zoo(entries: tuple[str, ...] | list[str]) -> list[tuple[str, str | None]]:
    """Zoo entries; a folder stands for the ``MODEL[=WEIGHTS]`` lines of its ``zoo.txt`` (weights relative to it).

    Args:
        entries: ``--zoo`` values.

    Returns:
        (model spec, weights) pairs.
    """
    out = []
    for e in entries:
        p = Path(e)
        if p.is_dir():
            listing = p / "zoo.txt"
            lines = [ln.strip() for ln in listing.read_text().splitlines()] if listing.is_file() else []
            lines = [ln for ln in lines if ln and not ln.startswith("#")]
            if not lines:
                raise QexportError(f"--zoo folder {p} holds no models: write a zoo.txt there with one MODEL=WEIGHTS "
                                   "line per model (weights relative to the folder)")
            for ln in lines:
                spec, w = parse_zoo_entry(ln)
                out.append((spec, str(p / w) if w and not Path(w).is_absolute() else w))
        else:
            out.append(parse_zoo_entry(e))
    return out


def load_zoo(target, target_name: str, entries: list[tuple[str, str | None]], device: str) -> list[ZooMember]:
    """The target model first, then the zoo models (classes checked against the target's).

    Args:
        target: the target's LoadedModel.
        target_name: its spec.
        entries: extra (spec, weights) pairs.
        device: torch device.

    Returns:
        Zoo members.
    """
    from qexport.models import load_model

    zoo = [make_member(target_name, target.model, target.preprocess, device)]
    for spec, weights in entries:
        if weights is not None and not Path(weights).is_file():
            raise QexportError(f"--zoo {spec}={weights}: no such weights file")
        m = load_model(spec, weights)
        if m.num_classes != target.num_classes:
            raise QexportError(f"zoo model {spec} has {m.num_classes} classes but the target has "
                               f"{target.num_classes}; every zoo model must classify the same classes")
        if m.preprocess.channels != target.preprocess.channels:
            raise QexportError(f"zoo model {spec} takes {m.preprocess.channels}-channel images, the target "
                               f"{target.preprocess.channels}")
        zoo.append(make_member(spec, m.model, m.preprocess, device))
    return zoo


def balanced_labels(n: int, num_classes: int, seed: int) -> torch.Tensor:
    """``n`` labels, every class as often as possible, in a seeded order."""
    lab = torch.arange(n) % num_classes
    return lab[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]


def _save_ckpt(work: Path, state: dict) -> None:
    tmp = work / (CHECKPOINT + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, work / CHECKPOINT)


def run_synthesis(zoo: list[ZooMember], num_classes: int, cfg: SynthConfig, seed: int, work: Path | None,
                  resume: bool, quiet: bool) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Synthesize ``cfg.num_images`` images batch by batch (resumable at batch boundaries).

    Each batch's iterations run on the shared training loop (its progress bar; on Ctrl-C the step under way
    finishes, then KeyboardInterrupt: the checkpoint holds the finished batches).

    Args:
        zoo: the models (target first; ``bns`` uses the target only).
        num_classes: classes.
        cfg: options.
        seed: the run's seed.
        work: checkpoint folder (None: no checkpoints).
        resume: continue from the checkpoint in ``work``.
        quiet: no progress bars.

    Returns:
        (pixels in [0, 1] rounded to 8-bit levels, labels, info for synthesis.json).
    """
    from qexport.duration import parse_duration

    members = zoo[:1] if cfg.mode == "bns" else zoo
    device = members[0].mean.device
    size = members[0].size
    labels = balanced_labels(cfg.num_images, num_classes, seed)
    key = json.dumps(dataclasses.asdict(cfg), sort_keys=True) + str(seed) + ",".join(m.name for m in members)
    state = {"key": key, "images": [], "batches": [], "elapsed": 0.0}
    if resume and work is not None and (work / CHECKPOINT).is_file():
        state = torch.load(work / CHECKPOINT, weights_only=False)
        if state["key"] != key:
            raise QexportError("--resume: the interrupted synthesis used other options; rerun without --resume")
    budget, started = parse_duration(cfg.time_budget), time.time()
    starts = list(range(0, cfg.num_images, cfg.batch_size))
    for bi in range(len(state["batches"]), len(starts)):
        lab = labels[starts[bi] : starts[bi] + cfg.batch_size].to(device)
        gen = torch.Generator().manual_seed(seed * 100003 + bi)
        iters = cfg.iters
        if budget is not None:
            left = budget - state["elapsed"] - (time.time() - started)
            iters = _iters_in(members, lab, size, cfg, left / (len(starts) - bi), num_classes)
        t0 = time.time()
        task = SynthesisBatch(members, lab, size, cfg, gen, iters, num_classes)
        name = f"synthesis batch {bi + 1}/{len(starts)} ({cfg.mode})"
        TrainLoop(task, LoopConfig(name=name, iters_per_epoch=iters, epochs=1), quiet=quiet).run()
        pix, info = task.result()
        info["seconds"] = round(time.time() - t0, 2)
        state["images"].append((pix.cpu() * 255).round().to(torch.uint8))
        state["batches"].append(info)
        if work is not None:
            _save_ckpt(work, {**state, "elapsed": state["elapsed"] + time.time() - started})
    pixels = torch.cat(state["images"]).float() / 255
    return pixels, labels, {"batches": state["batches"], "zoo": [m.name for m in members]}


def _iters_in(members, lab, size, cfg: SynthConfig, seconds: float, num_classes: int) -> int:
    """Iterations that fit in ``seconds``, timed on a throw-away batch.

    The probe's first step is not timed (it carries one-time allocations: timed, it gave the first batch of a
    30-minute mixmix run 111 steps and the later batches 360-440); the probe runs every zoo model, and with
    ``zoo_per_step`` the cost is scaled to the expected share of the zoo a step runs.
    """
    probe_cfg = dataclasses.replace(cfg, half_res_min=10**9, zoo_per_step=0)
    probe = SynthesisBatch(members, lab, size, probe_cfg, torch.Generator().manual_seed(0), 3, num_classes)
    probe.step()
    t0 = time.perf_counter()
    probe.step()
    probe.step()
    per = (time.perf_counter() - t0) / 2
    if 0 < cfg.zoo_per_step < len(members):
        per *= cfg.zoo_per_step / len(members)
    return max(1, min(cfg.iters, int(max(seconds, 0.0) / max(per, 1e-6))))


def contact_sheet(pixels: torch.Tensor, path: Path, cols: int = 4) -> None:
    """A grid of up to ``cols * cols`` images as one PNG."""
    import numpy as np
    from PIL import Image

    imgs = pixels[: cols * cols]
    n, c, h, w = imgs.shape
    rows = (n + cols - 1) // cols
    sheet = torch.ones(c, rows * (h + 2), cols * (w + 2))
    for i in range(n):
        r, q = divmod(i, cols)
        sheet[:, r * (h + 2) + 1 : r * (h + 2) + 1 + h, q * (w + 2) + 1 : q * (w + 2) + 1 + w] = imgs[i]
    arr = (sheet.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(np.ascontiguousarray(arr[:, :, 0] if c == 1 else arr)).save(path)


def write_folder(out: Path, pixels: torch.Tensor, labels: torch.Tensor, classes: list[str], info: dict) -> None:
    """Write the images (class subfolders), a contact sheet per class and synthesis.json into ``out`` (exists)."""
    import numpy as np
    from PIL import Image

    arr = (pixels * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for ci, name in enumerate(classes):
        (out / name).mkdir(parents=True, exist_ok=True)
        idx = (labels == ci).nonzero().flatten()
        if len(idx):
            contact_sheet(pixels[idx], out / f"contact_{name}.png")
    for i in range(pixels.shape[0]):
        img = arr[i][:, :, 0] if arr.shape[-1] == 1 else arr[i]
        Image.fromarray(np.ascontiguousarray(img)).save(out / classes[int(labels[i])] / f"{i:06d}.png")
    (out / "synthesis.json").write_text(json.dumps(info, indent=2, sort_keys=True))


def synthesize_folder(model: str, weights: str | None, zoo: tuple[str, ...], cfg: SynthConfig, output,
                      seed: int = 0, device: str = "auto", force: bool = False, resume: bool = False,
                      quiet: bool = False) -> Path:
    """``qexport synthesize``: load the target and the zoo, synthesize, write the image folder atomically.

    Args:
        model: target model spec.
        weights: its checkpoint.
        zoo: ``MODEL[=WEIGHTS]`` entries or zoo folders.
        cfg: options.
        output: folder to write.
        seed: seed.
        device: ``auto``, ``cpu`` or ``cuda``.
        force: overwrite an existing folder.
        resume: continue an interrupted run.
        quiet: no progress bars.

    Returns:
        The folder.
    """
    import shutil

    from qexport.device import resolve_device, work_dir_for
    from qexport.fileio import atomic_dir, check_output_free
    from qexport.models import load_model

    out = Path(output)
    check_output_free(out, force)
    entries = expand_zoo(zoo)
    if cfg.mode == "bns" and entries:
        raise QexportError("--mode bns inverts the target model alone; drop --zoo or use --mode mixmix")
    dev = resolve_device(device)
    torch.manual_seed(seed)
    target = load_model(model, weights)
    if not target.num_classes:
        raise QexportError(f"cannot tell how many classes {model} has (no final Linear layer); synthesis needs labels")
    members = load_zoo(target, model, entries, dev)
    work = work_dir_for(out)
    if resume and not work.is_dir():
        raise QexportError(f"--resume: no interrupted synthesis found for {out} (expected {work})")
    if not resume and work.is_dir():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    pixels, labels, info = run_synthesis(members, target.num_classes, cfg, seed, work, resume, quiet)
    info.update({"model": model, "weights": weights, "weights_sha256": target.weights_sha256,
                 "zoo_entries": [f"{s}={w}" if w else s for s, w in entries], "seed": seed,
                 "options": dataclasses.asdict(cfg), "seconds": round(time.time() - started, 2),
                 "real_images_read": 0, "input_shape": list(target.input_shape)})
    classes = [f"{i:0{len(str(target.num_classes - 1))}d}" for i in range(target.num_classes)]
    with atomic_dir(out, force) as tmp:
        write_folder(tmp, pixels, labels, classes, info)
    shutil.rmtree(work, ignore_errors=True)
    return out
