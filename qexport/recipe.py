"""The QuantRecipe: the one artifact between calibration and everything after it.

On disk a folder: ``recipe.json`` (format version, model reference, plan, activation scales, provenance,
calibration metrics) and ``tensors.safetensors`` (integer weights, per-channel scales, the QuantSim state
without the quantized weights, and the BN-folded float state of the original model for the FP32 baseline).
Loading rebuilds QuantSim exactly: its quantized weights are ``int * scale``.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qexport import __version__
from qexport.errors import QexportError
from qexport.fileio import atomic_dir
from qexport.quant.plan import QuantPlan

RECIPE_FORMAT = "qexport-recipe"
RECIPE_VERSION = 1


@dataclass(frozen=True)
class ModelRef:
    """How to rebuild the float architecture: the spec, input shape, preprocessing and weights provenance."""

    spec: str
    input_shape: tuple[int, int, int]
    preprocess: dict
    num_classes: int | None
    weights: str | None = None
    weights_sha256: str | None = None

    def to_dict(self) -> dict:
        return {"spec": self.spec, "input_shape": list(self.input_shape), "preprocess": self.preprocess,
                "num_classes": self.num_classes, "weights": self.weights, "weights_sha256": self.weights_sha256}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelRef":
        return cls(d["spec"], tuple(d["input_shape"]), d["preprocess"], d.get("num_classes"),
                   d.get("weights"), d.get("weights_sha256"))


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape a recipe's numbers."""
    import numpy
    import onnx

    return {"qexport": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "numpy": numpy.__version__, "python": platform.python_version()}


@dataclass
class QuantRecipe:
    """Integer weights, scales and the plan, plus provenance.

    Attributes:
        model: the float model reference.
        plan: the placement plan (target, bits, quantized layers and tensors).
        int_weights: integer weight levels per layer (int8 tensors).
        weight_scales: per-output-channel scales per layer.
        act_scales: per-tensor scale per activation point.
        sim_state: QuantSim state without the quantized weights (biases, scales, unquantized params).
        float_state: the BN-folded float model's state (the FP32 baseline).
        provenance: method, options, seed, data fingerprint, library versions, creation time.
        metrics: calibration metrics (e.g. per-layer errors) for people to read.
    """

    model: ModelRef
    plan: QuantPlan
    int_weights: dict[str, torch.Tensor]
    weight_scales: dict[str, torch.Tensor]
    act_scales: dict[str, float]
    sim_state: dict[str, torch.Tensor]
    float_state: dict[str, torch.Tensor]
    provenance: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_quantsim(cls, sim, folded: torch.nn.Module, model: ModelRef, provenance: dict,
                      metrics: dict | None = None) -> "QuantRecipe":
        """Capture a calibrated QuantSim.

        Args:
            sim: the calibrated QuantSim.
            folded: the BN-folded float model it was built from (the FP32 baseline).
            model: the model reference.
            provenance: method, options, seed, data fingerprint.
            metrics: optional calibration metrics.

        Returns:
            The recipe.
        """
        sim.apply_shared_scales()
        layers = sim.layers()
        int_w = {n: l.int_weight().contiguous() for n, l in layers.items()}
        scales = {n: l.weight_quantizer.scale.detach().float().clone() for n, l in layers.items()}
        acts = {n: float(q.scale.detach()) for n, q in sim.act_quantizers().items()}
        for name, s in list(scales.items()) + [(k, torch.tensor(v)) for k, v in acts.items()]:
            if not torch.all(torch.isfinite(s)) or not torch.all(s > 0):
                raise QexportError(f"calibration produced a non-positive or non-finite scale at {name!r}")
        skip = {f"gm.{n}.weight" for n in layers}
        sim_state = {k: v.detach().clone().contiguous() for k, v in sim.state_dict().items() if k not in skip}
        prov = dict(provenance)
        prov.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        prov.setdefault("versions", library_versions())
        float_state = {k: v.detach().clone().contiguous() for k, v in folded.state_dict().items()}
        return cls(model, sim.plan, int_w, scales, acts, sim_state, float_state, prov, dict(metrics or {}))

    def build_float_model(self) -> torch.fx.GraphModule:
        """Rebuild the BN-folded float model (the FP32 baseline) from the spec and the stored state.

        Returns:
            The folded float model, eval mode.
        """
        from qexport.models import Preprocess, fold_batchnorm, load_model

        pre = Preprocess.from_dict(self.model.preprocess)
        loaded = load_model(self.model.spec, None, input_size=pre.input_size, mean=pre.mean, std=pre.std,
                            num_classes=self.model.num_classes)
        folded = fold_batchnorm(loaded.model)
        try:
            folded.load_state_dict(self.float_state, strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise QexportError(f"the recipe's float weights do not fit model {self.model.spec!r}: {first}") from None
        return folded.eval()

    def build_quantsim(self, folded: torch.nn.Module | None = None):
        """Rebuild QuantSim exactly: quantized weights are ``int * scale``.

        Args:
            folded: the folded float model if already built (saves a rebuild).

        Returns:
            The QuantSim, eval mode.
        """
        from qexport.quant.quantsim import QuantSim

        sim = QuantSim(folded if folded is not None else self.build_float_model(), self.plan)
        missing, unexpected = sim.load_state_dict(self.sim_state, strict=False)
        skip = {f"gm.{n}.weight" for n in self.int_weights}
        missing = [k for k in missing if k not in skip]
        if missing or unexpected:
            raise QexportError(f"the recipe's tensors do not fit its plan (missing {missing[:3]}, unexpected {unexpected[:3]})")
        for name, layer in sim.layers().items():
            layer.set_quantized_weight(self.int_weights[name], self.weight_scales[name])
        for name, aq in sim.act_quantizers().items():
            with torch.no_grad():
                aq.scale.fill_(self.act_scales[name])
        return sim.eval()

    # ------------------------------------------------------------------ disk
    def save(self, path: str | Path, force: bool = False) -> Path:
        """Write the recipe folder atomically.

        Args:
            path: destination folder.
            force: replace an existing folder.

        Returns:
            The folder path.
        """
        with atomic_dir(path, force=force) as tmp:
            self.write_files(tmp)
        return Path(path)

    def write_files(self, folder: Path) -> None:
        """Write ``recipe.json`` and ``tensors.safetensors`` into an existing (temporary) folder.

        Args:
            folder: destination folder.
        """
        from safetensors.torch import save_file

        tensors = {}
        for n, t in self.int_weights.items():
            tensors[f"int_weight/{n}"] = t
            tensors[f"weight_scale/{n}"] = self.weight_scales[n]
        tensors.update({f"sim/{k}": v for k, v in self.sim_state.items()})
        tensors.update({f"float/{k}": v for k, v in self.float_state.items()})
        meta = {"format": RECIPE_FORMAT, "version": RECIPE_VERSION, "model": self.model.to_dict(),
                "plan": self.plan.to_dict(), "act_scales": self.act_scales, "provenance": self.provenance,
                "metrics": self.metrics}
        save_file(tensors, str(Path(folder) / "tensors.safetensors"))
        (Path(folder) / "recipe.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "QuantRecipe":
        """Read and validate a recipe folder.

        Args:
            path: the recipe folder (or its recipe.json).

        Returns:
            The recipe.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(path)
        if folder.is_file() and folder.name == "recipe.json":
            folder = folder.parent
        if not folder.is_dir():
            raise QexportError(f"recipe folder {folder} not found; create one with `qexport calibrate ... -o {folder}`")
        meta_path = folder / "recipe.json"
        if not meta_path.is_file():
            raise QexportError(f"{folder} is not a qexport recipe (no recipe.json)")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as e:
            raise QexportError(f"{meta_path} is not readable JSON ({e}); recalibrate") from None
        if meta.get("format") != RECIPE_FORMAT:
            raise QexportError(f"{meta_path} is not a qexport recipe (format {meta.get('format')!r})")
        if meta.get("version") != RECIPE_VERSION:
            raise QexportError(f"recipe {folder} has format version {meta.get('version')}, this qexport reads "
                               f"version {RECIPE_VERSION}; recalibrate with this version")
        try:
            tensors = load_file(str(folder / "tensors.safetensors"))
        except (OSError, SafetensorError, ValueError) as e:
            raise QexportError(f"{folder / 'tensors.safetensors'} is missing or corrupt ({e}); recalibrate") from None
        plan = QuantPlan.from_dict(meta["plan"])
        take = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
        int_w, scales = take("int_weight/"), take("weight_scale/")
        for lp in plan.layers:
            if lp.name not in int_w or lp.name not in scales:
                raise QexportError(f"recipe {folder} lacks the integer weights of layer {lp.name!r}; recalibrate")
            q = int_w[lp.name].to(torch.int32)
            if not lp.weight.holds(q):
                grid = "binary grid {-1, +1}" if lp.weight.binary else f"{lp.weight.bits}-bit grid"
                raise QexportError(f"recipe {folder}: layer {lp.name!r} has integers outside its {grid}; recalibrate")
        acts = {k: float(v) for k, v in meta["act_scales"].items()}
        missing = [ap.name for ap in plan.activations if ap.name not in acts]
        if missing:
            raise QexportError(f"recipe {folder} lacks activation scales for {missing[:3]}; recalibrate")
        return cls(ModelRef.from_dict(meta["model"]), plan, int_w, scales, acts, take("sim/"), take("float/"),
                   meta.get("provenance", {}), meta.get("metrics", {}))
