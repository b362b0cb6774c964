"""QuantSim: the BN-folded float model with fake quantization exactly where the plan says.

It is trainable (methods fine-tune weights, biases and scales through straight-through gradients) and it
is the numerical reference an engine is verified against.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx

from qexport.errors import QexportError
from qexport.quant.fake_quant import channel_view, fake_quant, quantize_to_int
from qexport.quant.plan import ActPoint, QuantPlan
from qexport.quant.spec import QuantSpec
from qexport.quant.u8s8_saturation import PAD_CODE, PAIR_ORDER, saturation_correction


class ActQuantizer(nn.Module):
    """Per-tensor activation fake-quantizer with an optional observer hook.

    A point of kind ``erf`` (AlignQ, qexport/quant/aligned.py) quantizes its tensor on ``in_spec`` with the fixed
    ``in_scale`` (a buffer: saved in the recipe), maps it through ``gain * erf(x / sqrt 2)`` and quantizes that
    with ``scale`` (``gain / spec.qmax``). ``scale`` is always the scale of the values consumers see.

    Args:
        point: the plan entry.
    """

    def __init__(self, point: ActPoint):
        super().__init__()
        self.point_name = point.name
        self.spec = point.spec
        self.kind = point.kind
        self.scale = nn.Parameter(torch.tensor(1.0), requires_grad=False)
        self.enabled = True
        self.observer: Callable[[torch.Tensor], None] | None = None
        self.export_mode = False
        if self.kind == "erf":
            from qexport.quant.aligned import default_in_scale

            self.gain, self.in_spec = point.gain, point.in_spec
            self.register_buffer("in_scale", torch.tensor(default_in_scale(point.spec, point.in_spec)))
            with torch.no_grad():
                self.scale.fill_(float(torch.tensor(point.gain / point.spec.qmax, dtype=torch.float32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer(x)
        if self.export_mode:
            from qexport.quant.markers import act_marker, aligned_marker

            return aligned_marker(x, self.point_name) if self.kind == "erf" else act_marker(x, self.point_name)
        if self.kind == "erf":
            from qexport.quant.aligned import aligned_float, aligned_forward

            if not self.enabled:
                return aligned_float(x, self.gain)
            # Both grids are fixed (gain / n, saturation / 255): a trainer learning step sizes leaves them alone.
            return aligned_forward(x, self.in_scale, self.in_spec, self.gain, self.scale.detach(), self.spec)
        if not self.enabled:
            return x
        return fake_quant(x, self.scale, self.spec.qmin, self.spec.qmax, self.spec.binary)

    def incoming(self) -> tuple[torch.Tensor, QuantSpec]:
        """(scale, grid) of the codes the producer of this tensor writes (the fused output of the layer before).

        Returns:
            ``(in_scale, in_spec)`` for an aligned point, else ``(scale, spec)``.
        """
        if self.kind == "erf":
            return self.in_scale, self.in_spec
        return self.scale, self.spec

    def extra_repr(self) -> str:
        extra = f", erf gain={self.gain}" if self.kind == "erf" else ""
        return f"{self.point_name}, bits={self.spec.bits}, signed={self.spec.signed}{extra}"


class WeightQuantizer(nn.Module):
    """Per-output-channel symmetric weight fake-quantizer (zero point 0)."""

    def __init__(self, spec: QuantSpec, out_channels: int):
        super().__init__()
        self.spec = spec
        self.scale = nn.Parameter(torch.ones(out_channels), requires_grad=False)
        self.enabled = True

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        return fake_quant(w, channel_view(self.scale, w.dim()), self.spec.qmin, self.spec.qmax, self.spec.binary)

    def int_weight(self, w: torch.Tensor) -> torch.Tensor:
        """Integer levels of ``w`` on this grid (int8; binary grids give only -1 and +1)."""
        return quantize_to_int(w, channel_view(self.scale, w.dim()), self.spec.qmin, self.spec.qmax,
                               self.spec.binary)


class _QuantLayerMixin:
    """Shared by QuantConv2d / QuantLinear: weight quantizer, int32-grid bias, export markers."""

    weight_quantizer: WeightQuantizer
    layer_name: str
    export_mode: bool

    def _setup(self, spec: QuantSpec, name: str) -> None:
        self.weight_quantizer = WeightQuantizer(spec, self.weight.shape[0])
        self.layer_name = name
        self.export_mode = False
        self.exact_accumulation = False
        self.pair_saturation: tuple[str, int, int] | None = None  # (order, zero point, pad code): set_pair_saturation
        self._input_quantizer: tuple[ActQuantizer, ...] = ()  # tuple: keeps it out of the module tree

    def bind_input_quantizer(self, aq: ActQuantizer | None) -> None:
        self._input_quantizer = (aq,) if aq is not None else ()

    @property
    def input_quantizer(self) -> ActQuantizer | None:
        return self._input_quantizer[0] if self._input_quantizer else None

    def bias_scale(self) -> torch.Tensor | None:
        """Scale of the int32 bias grid (input scale x weight scale), or None when the input is float."""
        aq = self.input_quantizer
        if aq is None or not aq.enabled or not self.weight_quantizer.enabled:
            return None
        return aq.scale.detach() * self.weight_quantizer.scale.detach()

    def quant_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = self.weight_quantizer(self.weight)
        b = self.bias
        bs = self.bias_scale()
        if b is not None and bs is not None:
            # The engine adds an int32 bias: round it to that grid (straight-through).
            b = fake_quant(b, bs, -(2**31), 2**31 - 1)
        if self.export_mode:
            from qexport.quant.markers import bias_marker, weight_marker

            w = weight_marker(self.weight, self.layer_name)
            b = bias_marker(self.bias, self.layer_name) if self.bias is not None else None
        return w, b

    def set_quantized_weight(self, int_weight: torch.Tensor, scale: torch.Tensor) -> None:
        """Set the weight to ``int_weight * scale`` exactly and the per-channel scale.

        Args:
            int_weight: integer levels (any integer or float dtype), shape of the weight.
            scale: per-output-channel positive scales.
        """
        with torch.no_grad():
            self.weight_quantizer.scale.copy_(scale)
            self.weight.copy_(int_weight.to(self.weight.dtype) * channel_view(scale, self.weight.dim()))

    def int_weight(self) -> torch.Tensor:
        return self.weight_quantizer.int_weight(self.weight.detach())

    def saturated_pairs_term(self, x: torch.Tensor) -> torch.Tensor | float:
        """What an engine's int16 pair saturation adds to this layer's float64 output (0 when it is off)."""
        aq = self.input_quantizer
        if self.pair_saturation is None or aq is None or not aq.enabled or not self.weight_quantizer.enabled:
            return 0.0
        order, zero_point, pad_code = self.pair_saturation
        s_in = aq.scale.detach().double()
        codes = torch.round(x / s_in) + zero_point
        conv = self if isinstance(self, nn.Conv2d) else None
        corr = saturation_correction(codes, self.int_weight().double(), conv, pad_code=pad_code, order=order)
        if corr is None:
            return 0.0
        s_w = self.weight_quantizer.scale.detach().double().view(1, -1, *([1] * (corr.dim() - 2)))  # output channels
        return corr * s_in * s_w


def _f64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.double()


class QuantConv2d(_QuantLayerMixin, nn.Conv2d):
    """nn.Conv2d whose weight (and int32 bias grid) is fake-quantized."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.quant_weight_bias()
        if self.exact_accumulation:
            x64 = x.double()
            return (self._conv_forward(x64, w.double(), _f64(b)) + self.saturated_pairs_term(x64)).to(x.dtype)
        return self._conv_forward(x, w, b)


class QuantLinear(_QuantLayerMixin, nn.Linear):
    """nn.Linear whose weight (and int32 bias grid) is fake-quantized."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.quant_weight_bias()
        if self.exact_accumulation:
            x64 = x.double()
            return (F.linear(x64, w.double(), _f64(b)) + self.saturated_pairs_term(x64)).to(x.dtype)
        return F.linear(x, w, b)


def _quant_layer_from(mod: nn.Module, spec: QuantSpec, name: str) -> nn.Module:
    if isinstance(mod, nn.Conv2d):
        q = QuantConv2d(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding,
                        mod.dilation, mod.groups, mod.bias is not None, mod.padding_mode)
    elif isinstance(mod, nn.Linear):
        q = QuantLinear(mod.in_features, mod.out_features, mod.bias is not None)
    else:  # plan and graph disagree
        raise QexportError(f"layer {name!r} is a {type(mod).__name__}, not Conv2d/Linear; the recipe does not fit the model")
    q.load_state_dict(mod.state_dict())
    q._setup(spec, name)
    return q


def aq_module_name(point_name: str) -> str:
    """Submodule name of the activation quantizer of a plan point."""
    return f"qx_{point_name}"


class QuantSim(nn.Module):
    """The float model with fake-quant where the plan says.

    Args:
        folded: the BN-folded float model (torch.fx GraphModule); it is deep-copied.
        plan: the placement plan.
    """

    def __init__(self, folded: fx.GraphModule, plan: QuantPlan):
        super().__init__()
        gm = copy.deepcopy(folded)
        self.plan = plan
        for lp in plan.layers:
            try:
                mod = gm.get_submodule(lp.name)
            except AttributeError:
                raise QexportError(f"layer {lp.name!r} of the plan is not in the model; the recipe does not fit it") from None
            parent, _, leaf = lp.name.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, leaf, _quant_layer_from(mod, lp.weight, lp.name))
        by_name = {n.name: n for n in gm.graph.nodes}
        for ap in plan.activations:
            node = by_name.get(ap.name)
            if node is None:
                raise QexportError(f"activation point {ap.name!r} is not a tensor of the model; the recipe does not fit it")
            mod_name = aq_module_name(ap.name)
            gm.add_submodule(mod_name, ActQuantizer(ap))
            with gm.graph.inserting_after(node):
                qnode = gm.graph.call_module(mod_name, (node,))
            node.replace_all_uses_with(qnode, delete_user_cb=lambda user: user is not qnode)
        gm.recompile()
        self.gm = gm
        self._engine_arith = None  # set_engine_arithmetic: an engine's integer kernels, for verification
        for lp in plan.layers:
            aq = self.act_quantizers().get(lp.input_point) if lp.input_point else None
            self.layers()[lp.name].bind_input_quantizer(aq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._engine_arith is not None:
            return self._engine_arith.run(self, x)
        return self.gm(x)

    def layers(self) -> dict[str, _QuantLayerMixin]:
        """Quantized layers by module name, in graph order."""
        return {lp.name: self.gm.get_submodule(lp.name) for lp in self.plan.layers}

    def act_quantizers(self) -> dict[str, ActQuantizer]:
        """Activation quantizers by plan point name, in graph order."""
        return {ap.name: self.gm.get_submodule(aq_module_name(ap.name)) for ap in self.plan.activations}

    def apply_shared_scales(self) -> None:
        """Copy scales to the points that share another point's scale (see ActPoint)."""
        aqs = self.act_quantizers()
        with torch.no_grad():
            for ap in self.plan.activations:
                if ap.share_scale_with:
                    aqs[ap.name].scale.copy_(aqs[ap.share_scale_with].scale)

    @contextlib.contextmanager
    def quant_disabled(self, weights: bool = True, acts: bool = True) -> Iterator[None]:
        """Temporarily run (parts of) the model in float."""
        saved = []
        for layer in self.layers().values():
            saved.append((layer.weight_quantizer, layer.weight_quantizer.enabled))
            if weights:
                layer.weight_quantizer.enabled = False
        for aq in self.act_quantizers().values():
            saved.append((aq, aq.enabled))
            if acts:
                aq.enabled = False
        try:
            yield
        finally:
            for mod, flag in saved:
                mod.enabled = flag

    def set_exact_accumulation(self, exact: bool = True) -> "QuantSim":
        """Accumulate quantized layers in float64, as an integer engine accumulates exactly in int32.

        float32 accumulation of a 3x3x64 conv drifts by ~1e-6 relative, enough to flip a value lying near a
        rounding boundary to the next level; the engine's int32 accumulator does not drift. Verification uses
        exact accumulation (ResNet-20 W8A8 on ONNX Runtime: engine agreement 99.86 % -> 99.92 %, mean logit
        difference 0.019 -> 0.012); calibration keeps float32 speed.

        Args:
            exact: turn exact accumulation on or off.

        Returns:
            self.
        """
        for layer in self.layers().values():
            layer.exact_accumulation = exact
        return self

    def set_pair_saturation(self, runtime: str | None) -> "QuantSim":
        """Add the int16 pair saturation of a runtime's int8 kernels on x86 CPUs without VNNI (verification only).

        Applies with exact accumulation; the pair order is the runtime's (qexport/quant/u8s8_saturation.py), the
        raw codes use the plan target's activation encoding. Call it where ``pairs_saturate(runtime)`` is true.

        Args:
            runtime: ``"openvino"`` or ``"onnxruntime"`` (for its exact integer arithmetic, use
                ``set_engine_arithmetic("onnxruntime")``, which includes the saturation); None turns it off.

        Returns:
            self.
        """
        from qexport.quant.targets import get_target

        target = get_target(self.plan.target)
        for layer in self.layers().values():
            aq = layer.input_quantizer
            if runtime is None or aq is None:
                layer.pair_saturation = None
            else:
                zero_point = target.act_encoding(aq.spec)[1]
                layer.pair_saturation = (PAIR_ORDER[runtime], zero_point, PAD_CODE[runtime](zero_point))
        return self

    def set_engine_arithmetic(self, engine: str | None = "onnxruntime", pair_saturation: bool | None = None
                              ) -> "QuantSim":
        """Compute the layers an engine fuses into integer kernels with that engine's arithmetic (verification only).

        ``"onnxruntime"`` (onnxruntime plans): exact integer accumulators requantized as ONNX Runtime's kernels
        do, QLinearAdd and GlobalAveragePool as it computes them (qexport/quant/engine_arith.py). The output is
        not differentiable; training paths leave this off (the default).

        Args:
            engine: ``"onnxruntime"``, or None to turn it off.
            pair_saturation: include the int16 pair saturation of x86 CPUs without VNNI; None (default) asks this
                CPU's kernels (``u8s8_saturation.pairs_saturate``).

        Returns:
            self.
        """
        if engine is None:
            self._engine_arith = None
        else:
            from qexport.quant.engine_arith import engine_arithmetic

            self._engine_arith = engine_arithmetic(self, engine, pair_saturation)
        return self

    @property
    def arithmetic(self) -> str:
        """Which arithmetic forward uses: the engine emulation's name, or float64/float32 accumulation."""
        if self._engine_arith is not None:
            return self._engine_arith.name
        exact = any(layer.exact_accumulation for layer in self.layers().values())
        saturating = any(layer.pair_saturation is not None for layer in self.layers().values())
        return ("float64-accumulation" if exact else "float32") + ("+pair-saturation" if saturating else "")

    @contextlib.contextmanager
    def export_mode(self) -> Iterator[None]:
        """Quantizers emit ONNX markers instead of fake-quant (used by the exporter only)."""
        mods = list(self.layers().values()) + list(self.act_quantizers().values())
        for m in mods:
            m.export_mode = True
        try:
            yield
        finally:
            for m in mods:
                m.export_mode = False

    def integer_weights(self) -> dict[str, torch.Tensor]:
        """The integer weight levels of every quantized layer (int8)."""
        return {name: layer.int_weight() for name, layer in self.layers().items()}

    def snap_weights(self) -> None:
        """Replace every float weight by its quantized value, so the state holds exactly int * scale."""
        for layer in self.layers().values():
            layer.set_quantized_weight(layer.int_weight(), layer.weight_quantizer.scale.detach().clone())
