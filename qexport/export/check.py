"""Offline checker of a target's QDQ rules (``qexport check MODEL.onnx --target tensorrt``).

Each rule is a function ``(model, index) -> list[Violation]`` registered with :func:`register_rule` for the
targets it applies to; the rules themselves live in :mod:`qexport.export.check_rules`. :func:`check_model`
runs every rule of a target, :func:`assert_valid` is what ``qexport export`` calls before writing a file and
:func:`run_check` is the CLI command (exit code 1 when any rule is broken).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qexport.errors import QexportError

if TYPE_CHECKING:  # onnx and numpy stay lazy: ``import qexport`` must be fast
    import numpy as np
    import onnx

ALL: tuple[str, ...] = ("*",)  # a rule of every registered target (qexport.quant.targets)
FLOAT_NODES_KEY = "qexport.float_nodes"
WEIGHT_GRIDS_KEY = "qexport.weight_grids"  # "init=binary,init2=int4": weight initializers on a grid below 8 bits
MODEL_NODE = "<model>"


@dataclass(frozen=True)
class Violation:
    """One broken rule.

    Args:
        rule: the rule id, e.g. ``"trt-zero-point"``.
        node: the offending node's name (or a tensor name, or ``<model>`` for model-wide rules).
        message: one line saying what is wrong.
    """

    rule: str
    node: str
    message: str

    def __str__(self) -> str:
        return f"node {self.node}: {self.rule}: {self.message}"


@dataclass(frozen=True)
class CheckRule:
    """A registered rule.

    Args:
        id: short id, printed in every violation.
        targets: the targets it applies to.
        description: one line for ``list_rules``.
        fn: ``(model, index) -> list[Violation]``.
    """

    id: str
    targets: tuple[str, ...]
    description: str
    fn: Callable[..., list[Violation]]


_RULES: dict[str, CheckRule] = {}


def register_rule(rule_id: str, targets: Iterable[str], description: str):
    """Decorator registering a rule function ``(model, index) -> list[Violation]``.

    Args:
        rule_id: unique short id.
        targets: targets it applies to (registered target names, or ``ALL``).
        description: one line.

    Returns:
        The decorator; it returns the function unchanged.
    """
    from qexport.quant.targets import list_targets

    targets = tuple(targets)
    bad = [t for t in targets if t not in list_targets() and targets != ALL]
    if bad:
        raise ValueError(f"rule {rule_id}: unknown targets {bad}")

    def deco(fn):
        if rule_id in _RULES and _RULES[rule_id].fn is not fn:
            raise ValueError(f"rule {rule_id!r} registered twice")
        _RULES[rule_id] = CheckRule(rule_id, targets, description, fn)
        return fn

    return deco


def _load_rules() -> None:
    from qexport.export import check_rules  # noqa: F401  (registers the rules)


def _check_target(target: str) -> str:
    from qexport.quant.targets import get_target

    return get_target(target).name


def list_rules(target: str | None = None) -> list[CheckRule]:
    """The registered rules, in the order they run.

    Args:
        target: only the rules of this target; None for all.

    Returns:
        The rules.
    """
    _load_rules()
    if target is not None:
        _check_target(target)
    return [r for r in _RULES.values() if target is None or target in r.targets or r.targets == ALL]


class GraphIndex:
    """Look-ups shared by the rules: producers, consumers, constants, shapes and types of tensors.

    Built on a shape-inferred copy of the model (falls back to the model itself when inference fails).

    Args:
        model: the model to index.
        target: the target being checked (some rules differ per target).
    """

    def __init__(self, model: onnx.ModelProto, target: str):
        import onnx

        self.target = target
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
        except Exception:  # noqa: BLE001  (reported by the onnx-checker rule)
            inferred = model
        g = inferred.graph
        self.nodes: list[onnx.NodeProto] = list(g.node)
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        self._labels: dict[int, str] = {}
        self._const_protos: dict[str, onnx.TensorProto] = {t.name: t for t in g.initializer}
        self.initializers = dict(self._const_protos)
        for i, node in enumerate(self.nodes):
            self._labels[id(node)] = node.name or f"{node.op_type}#{i}({node.output[0] if node.output else ''})"
            for out in node.output:
                if out:
                    self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers.setdefault(inp, []).append(node)
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
                tp = _constant_node_tensor(node)
                if tp is not None:
                    self._const_protos[node.output[0]] = tp
        self._values: dict[str, np.ndarray] = {}
        self._types: dict[str, onnx.TypeProto] = {}
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            self._types[vi.name] = vi.type
        self.graph_outputs = {o.name for o in g.output}
        meta = {p.key: p.value for p in model.metadata_props}
        self.float_nodes = {s.strip() for s in meta.get(FLOAT_NODES_KEY, "").split(",") if s.strip()}
        self.weight_grids = dict(e.strip().rsplit("=", 1) for e in meta.get(WEIGHT_GRIDS_KEY, "").split(",") if "=" in e)

    def label(self, node: onnx.NodeProto) -> str:
        """The node's name, or ``OpType#index(first output)`` for an unnamed node."""
        return self._labels.get(id(node)) or node.name or node.op_type

    def is_constant(self, name: str) -> bool:
        """True when the tensor is an initializer or a Constant node's output."""
        return name in self._const_protos

    def const(self, name: str) -> np.ndarray | None:
        """The tensor's constant value (initializer or Constant node), or None."""
        if name not in self._values:
            tp = self._const_protos.get(name)
            if tp is None:
                return None
            from onnx import numpy_helper

            self._values[name] = numpy_helper.to_array(tp)
        return self._values[name]

    def elem_type(self, name: str) -> int | None:
        """The tensor's ONNX element type (``onnx.TensorProto.INT8`` ...), or None when unknown."""
        if name in self._const_protos:
            return self._const_protos[name].data_type
        t = self._types.get(name)
        if t is not None and t.HasField("tensor_type") and t.tensor_type.elem_type:
            return t.tensor_type.elem_type
        return None

    def shape(self, name: str) -> tuple[int | None, ...] | None:
        """The tensor's shape (None for an unknown dimension), or None when even the rank is unknown."""
        if name in self._const_protos:
            return tuple(self._const_protos[name].dims)
        t = self._types.get(name)
        if t is None or not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
            return None
        return tuple(d.dim_value if d.HasField("dim_value") else None for d in t.tensor_type.shape.dim)

    def producer_op(self, name: str) -> str | None:
        """The op type producing the tensor, or None (graph input, initializer)."""
        p = self.producer.get(name)
        return p.op_type if p is not None else None


def _constant_node_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    import numpy as np
    from onnx import helper, numpy_helper

    for a in node.attribute:
        if a.name == "value":
            return a.t
        if a.name in ("value_float", "value_floats", "value_int", "value_ints"):
            v = helper.get_attribute_value(a)
            dtype = np.float32 if "float" in a.name else np.int64
            return numpy_helper.from_array(np.asarray(v, dtype=dtype))
    return None


def _load(model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model
    path = os.fspath(model)
    if not os.path.isfile(path):
        raise QexportError(f"cannot read ONNX model {path}: no such file")
    try:
        return onnx.load(path)
    except Exception as e:  # noqa: BLE001  (protobuf DecodeError, missing external data, ...)
        raise QexportError(f"cannot read ONNX model {path}: {type(e).__name__}: {e}") from None


def check_model(model: onnx.ModelProto | str | os.PathLike, target: str) -> list[Violation]:
    """Check a QDQ model against every rule of a target.

    Args:
        model: a ModelProto or the path of an ``.onnx`` file.
        target: ``onnxruntime``, ``tensorrt`` or ``openvino``.

    Returns:
        The violations, in rule order (empty when the model passes).

    Raises:
        QexportError: unknown target, or a file that cannot be read.
    """
    rules = list_rules(_check_target(target))
    proto = _load(model)
    index = GraphIndex(proto, target)
    out: list[Violation] = []
    for rule in rules:
        try:
            out.extend(rule.fn(proto, index))
        except Exception as e:  # noqa: BLE001  (a crashed rule is reported, never hides the others)
            out.append(Violation(rule.id, MODEL_NODE, f"rule could not run: {type(e).__name__}: {e}"))
    return out


def format_violations(violations: list[Violation], limit: int | None = None) -> str:
    """One violation per line (``node X: rule-id: message``).

    Args:
        violations: from :func:`check_model`.
        limit: print at most this many, then ``... and N more``.

    Returns:
        The text (empty for no violations).
    """
    shown = violations if limit is None else violations[:limit]
    lines = [str(v) for v in shown]
    if len(violations) > len(shown):
        lines.append(f"... and {len(violations) - len(shown)} more")
    return "\n".join(lines)


def assert_valid(model: onnx.ModelProto | str | os.PathLike, target: str) -> None:
    """Raise when the model breaks any rule of the target (``qexport export`` calls this before writing).

    Args:
        model: a ModelProto or a path.
        target: the export target.

    Raises:
        QexportError: one line naming the first violations.
    """
    vs = check_model(model, target)
    if vs:
        first = "; ".join(str(v) for v in vs[:3])
        more = f" (and {len(vs) - 3} more)" if len(vs) > 3 else ""
        raise QexportError(f"the {target} export breaks {len(vs)} check rule(s): {first}{more}")


def run_check(path: str | os.PathLike, target: str, echo: Callable[[str], None] = print) -> int:
    """The ``qexport check MODEL.onnx --target T`` command: print each violation and a summary.

    Args:
        path: the ``.onnx`` file.
        target: the target whose rules apply.
        echo: where lines go (``print`` or ``typer.echo``).

    Returns:
        The exit code: 0 when the model passes, 1 when any rule is broken.

    Raises:
        QexportError: unknown target or unreadable file (the CLI turns it into exit code 2).
    """
    vs = check_model(path, target)
    n_rules = len(list_rules(target))
    if vs:
        echo(format_violations(vs))
        echo(f"{len(vs)} violation(s) of the {target} rules in {os.fspath(path)}")
        return 1
    echo(f"ok: {os.fspath(path)} passes all {n_rules} {target} rules")
    return 0
