"""The placement plan: which tensors are quantized, with which grid, for one target.

The plan is derived once from the BN-folded float graph and stored in the recipe; QuantSim and the
exporter both read it, so they quantize exactly the same tensors (../shared/docs/architecture.md, invariant 1).

Placement (../shared/docs/architecture.md): weights of every Conv2d/Linear per output channel; the input tensor of every
quantized layer per tensor; for a residual Add, the input that does not come straight from a quantized layer.
Each target's plan policy (qexport/quant/targets.py) adds the rest: ``tensorrt`` takes no unsigned 8-bit grid;
where ``fusion_points`` is set (``onnxruntime``) there are ``fusion`` points, so nothing runs in float: at
every activation width, 8-bit points on the conv outputs feeding an Add (QLinearConv + QLinearAdd; without
them that conv runs in float) and on a residual block's output that no layer input point covers (the last
block: QLinearAdd); and a point on the average pool in front of the classifier (QLinearGlobalAveragePool) with
the classifier input's grid, whose scale the classifier input then shares (exact). A quantizer sits on a
tensor: every consumer of that tensor sees the quantized value, in QuantSim and in the ONNX file alike.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from torch import fx

from qexport.errors import QexportError
from qexport.quant import graph_ops
from qexport.quant.spec import BitsConfig, QuantSpec, activation_spec, weight_spec
from qexport.quant.targets import get_target

PLAN_VERSION = 1
FUSION_BITS = 8
ACT_KINDS = ("linear", "erf")


@dataclass(frozen=True)
class LayerPoint:
    """A quantized Conv2d/Linear: its module name, kind and weight grid."""

    name: str
    kind: str  # "conv2d" | "linear"
    weight: QuantSpec
    input_point: str | None  # the ActPoint on its input tensor, None for weights-only plans

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "weight": self.weight.to_dict(), "input_point": self.input_point}

    @classmethod
    def from_dict(cls, d: dict) -> "LayerPoint":
        return cls(d["name"], d["kind"], QuantSpec.from_dict(d["weight"]), d.get("input_point"))


@dataclass(frozen=True)
class ActPoint:
    """A per-tensor activation quantizer on the output of graph node ``name``.

    ``role`` is why it exists (``input`` of a layer, ``residual`` Add input, ``fusion`` for the runtime).
    ``share_scale_with`` names a point whose scale this one reuses: its tensor is the other's moved by
    slicing/padding/pooling-max, so sharing the scale makes the second quantization exact (no double rounding).

    ``kind`` is ``"linear"`` (quantize the tensor) or ``"erf"`` (an aligned activation, AlignQ): the
    non-negative tensor is first quantized on ``in_spec`` (8-bit codes, fixed scale), then mapped through
    ``gain * erf(x / sqrt 2)`` and quantized on ``spec`` with scale ``gain / spec.qmax``. The value consumers see
    is that second quantization; see qexport/quant/aligned.py.
    """

    name: str
    spec: QuantSpec
    role: str
    share_scale_with: str | None = None
    kind: str = "linear"
    gain: float = 0.0
    in_spec: QuantSpec | None = None

    def __post_init__(self) -> None:
        if self.kind not in ACT_KINDS:
            raise QexportError(f"activation point {self.name!r}: unknown kind {self.kind!r} ({', '.join(ACT_KINDS)})")
        if self.kind == "erf" and (self.in_spec is None or not self.gain > 0 or self.spec.signed):
            raise QexportError(f"aligned activation point {self.name!r} needs an unsigned grid, an input grid "
                               "and a positive gain")

    def to_dict(self) -> dict:
        d = {"name": self.name, "spec": self.spec.to_dict(), "role": self.role,
             "share_scale_with": self.share_scale_with}
        if self.kind != "linear":  # linear points keep the original layout
            d.update(kind=self.kind, gain=self.gain, in_spec=self.in_spec.to_dict())
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ActPoint":
        in_spec = QuantSpec.from_dict(d["in_spec"]) if d.get("in_spec") else None
        return cls(d["name"], QuantSpec.from_dict(d["spec"]), d["role"], d.get("share_scale_with"),
                   d.get("kind", "linear"), float(d.get("gain", 0.0)), in_spec)


@dataclass(frozen=True)
class QuantPlan:
    """Everything that is quantized, for one target and bit configuration."""

    target: str
    bits: BitsConfig
    layers: tuple[LayerPoint, ...]
    activations: tuple[ActPoint, ...]
    float_layers: tuple[str, ...] = field(default=())

    def layer(self, name: str) -> LayerPoint:
        for lp in self.layers:
            if lp.name == name:
                return lp
        raise KeyError(name)

    def activation(self, name: str) -> ActPoint:
        for ap in self.activations:
            if ap.name == name:
                return ap
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {"version": PLAN_VERSION, "target": self.target, "bits": self.bits.to_dict(),
                "layers": [lp.to_dict() for lp in self.layers],
                "activations": [ap.to_dict() for ap in self.activations],
                "float_layers": list(self.float_layers)}

    @classmethod
    def from_dict(cls, d: dict) -> "QuantPlan":
        if d.get("version") != PLAN_VERSION:
            raise QexportError(f"plan version {d.get('version')} is not supported (expected {PLAN_VERSION}); recalibrate")
        return cls(d["target"], BitsConfig.from_dict(d["bits"]),
                   tuple(LayerPoint.from_dict(x) for x in d["layers"]),
                   tuple(ActPoint.from_dict(x) for x in d["activations"]),
                   tuple(d.get("float_layers", ())))


def _moved_from(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """Walk back through data-movement ops to the tensor they move."""
    while graph_ops.is_data_movement(gm, node) and graph_ops.tensor_inputs(node):
        node = graph_ops.tensor_inputs(node)[0]
    return node


def _block_output(gm: fx.GraphModule, add: fx.Node) -> fx.Node:
    """A residual Add's block output: the Add, or the plain ReLU that is its only consumer."""
    users = list(add.users)
    if len(users) == 1 and graph_ops.is_relu(gm, users[0]) and graph_ops.tensor_inputs(users[0])[:1] == [add]:
        return users[0]
    return add


def _add_tail_points(gm: fx.GraphModule, nodes: list, last: LayerPoint, last_node: fx.Node,
                     acts: dict, add_act) -> None:
    """Fusion points of the tail: every residual block output not yet quantized, and the classifier's pool.

    Args:
        gm: the traced model.
        nodes: its nodes in order.
        last: the plan entry of the last quantized layer (the classifier).
        last_node: its graph node.
        acts: the points so far, by node name.
        add_act: ``build_plan``'s point adder ``(node, bits, role) -> name``.
    """
    for node in nodes:
        if graph_ops.is_residual_add(node):
            out = _block_output(gm, node)
            if out.name not in acts and len(out.users) > 0:
                add_act(out, FUSION_BITS, "fusion")
    if last.input_point is None or last.kind != "linear":
        return
    pool = graph_ops.tensor_inputs(last_node)[0]
    while graph_ops.is_data_movement(gm, pool) and graph_ops.tensor_inputs(pool):
        pool = graph_ops.tensor_inputs(pool)[0]
    if pool.name != last.input_point and graph_ops.is_average(gm, pool) and pool.name not in acts:
        # The classifier input's grid: its point (after Flatten) then shares this scale and re-rounds nothing.
        add_act(pool, acts[last.input_point].spec.bits, "fusion")
def _check_layer_names(bits: BitsConfig, names: list[str], keep_float: tuple[str, ...]) -> None:
    """Every per-layer width must name a quantized layer of the model (close names suggested)."""
    import difflib

    for name, _, _ in bits.layer_bits:
        if name in names:
            continue
        if name in keep_float:
            raise QexportError(f"layer {name!r} has a per-layer width but is kept in float (--keep-float); drop one")
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f"close names: {', '.join(close)}" if close else f"quantizable layers: {', '.join(names[:6])}, ..."
        raise QexportError(f"per-layer bits name no quantizable layer {name!r}; {hint}")


def build_plan(gm: fx.GraphModule, target: str, bits: BitsConfig, keep_float: tuple[str, ...] = ()) -> QuantPlan:
    """Derive the default placement plan from a BN-folded traced model.

    Args:
        gm: the BN-folded float model as a torch.fx GraphModule.
        target: a registered target (qexport.quant.targets: ``onnxruntime``, ``tensorrt``, ``openvino``); its plan
            policy says which grids and points it takes.
        bits: bit widths; ``first_last_bits`` applies to the first and last quantized layer, ``layer_bits``
            (mixed precision) to the layers it names.
        keep_float: layer names to leave in float (also allows unsupported layers).

    Returns:
        The QuantPlan.
    """
    policy = get_target(target).plan
    nodes = list(gm.graph.nodes)
    layer_nodes = _quantizable_layer_nodes(gm, nodes, keep_float)
    # An int8-only engine (TensorRT) has no unsigned 8-bit grid; unsigned grids below 8 bits still fit int8.
    points = _PointSet(gm, graph_ops.non_negative_nodes(gm), policy.unsigned_8bit)
    edge = {layer_nodes[0].name, layer_nodes[-1].name}
    _check_layer_names(bits, [n.target for n in layer_nodes], keep_float)
    layers = []
    for n in layer_nodes:
        # a tensor feeding several layers takes the widest of their input widths (add keeps the wider)
        w_bits, a_bits = bits.widths_for(n.target, n.name in edge)
        inp = graph_ops.tensor_inputs(n)[0]
        point = points.add(inp, a_bits, "input") if a_bits is not None else None
        kind = "conv2d" if type(graph_ops.target_module(gm, n)).__name__ == "Conv2d" else "linear"
        layers.append(LayerPoint(n.target, kind, weight_spec(w_bits), point))
    if bits.act_bits is not None:
        _add_residual_points(nodes, {n.name for n in layer_nodes}, bits.act_bits, policy.fusion_points, points)
        if policy.fusion_points:
            _add_tail_points(gm, nodes, layers[-1], layer_nodes[-1], points.acts, points.add)
    return QuantPlan(target, bits, tuple(layers), points.ordered(nodes), tuple(keep_float))


def _quantizable_layer_nodes(gm: fx.GraphModule, nodes: list, keep_float: tuple[str, ...]) -> list:
    """The layer nodes to quantize, in graph order, after checking ``keep_float`` and unsupported layers.

    Raises:
        QexportError: an unsupported weighted layer not kept in float, an unknown ``keep_float`` name, or no
            quantizable layer at all.
    """
    for node in nodes:
        if graph_ops.is_unsupported_weighted(gm, node) and node.target not in keep_float:
            kind = type(graph_ops.target_module(gm, node)).__name__
            raise QexportError(f"layer {node.target!r} is a {kind}, which qexport cannot quantize; "
                               f"pass --keep-float {node.target} to leave it in float")
    known = {n.target for n in nodes if n.op == "call_module"}
    unknown = [k for k in keep_float if k not in known]
    if unknown:
        raise QexportError(f"--keep-float names no layer of this model: {', '.join(unknown)}")
    layer_nodes = [n for n in nodes if graph_ops.is_quantizable_layer(gm, n) and n.target not in keep_float]
    if not layer_nodes:
        raise QexportError("the model has no Conv2d or Linear layer to quantize")
    return layer_nodes


class _PointSet:
    """The activation points of a plan being built, one per tensor (node name), widest width kept."""

    def __init__(self, gm: fx.GraphModule, nonneg: set, unsigned_8bit: bool):
        self.gm, self.nonneg, self.unsigned_8bit = gm, nonneg, unsigned_8bit
        self.acts: dict[str, ActPoint] = {}

    def add(self, node: fx.Node, b: int, role: str) -> str:
        """Quantize ``node``'s output at ``b`` bits (a wider existing point stays); returns the point's name."""
        src = _moved_from(self.gm, node)
        share = src.name if src is not node and src.name in self.acts else None
        unsigned = node.name in self.nonneg and (self.unsigned_8bit or b < 8)
        old = self.acts.get(node.name)
        if old is None or old.spec.bits < b:
            self.acts[node.name] = ActPoint(node.name, activation_spec(b, unsigned), old.role if old else role, share)
        return node.name

    def ordered(self, nodes: list) -> tuple[ActPoint, ...]:
        """The points in graph order, scale sharing re-resolved now that every point exists (a residual point
        may precede its source in order)."""
        out = []
        for node in nodes:
            if node.name in self.acts:
                ap = self.acts[node.name]
                src = _moved_from(self.gm, node)
                same = src is not node and src.name in self.acts and self.acts[src.name].spec == ap.spec
                out.append(dataclasses.replace(ap, share_scale_with=src.name if same else None))
        return tuple(out)


def _add_residual_points(nodes: list, layer_names: set, act_bits: int, fusion: bool, points: _PointSet) -> None:
    """Points on the inputs of residual Adds: an 8-bit fusion point on a layer's output (targets that fuse the
    Add into the conv), else the default activation width on an input no other point covers."""
    for node in nodes:
        if not graph_ops.is_residual_add(node):
            continue
        for arg in node.args[:2]:
            if arg.name in layer_names:
                if fusion:
                    points.add(arg, FUSION_BITS, "fusion")
            elif arg.name not in points.acts:
                points.add(arg, act_bits, "residual")
