"""Export targets: one descriptor per target, read by the plan, QuantSim, the exporter, the runtimes and verify.

A target is what ``--target`` names. Its descriptor says how the target encodes the recipe's integers in the
QDQ file (activation element type and zero point, bias), which placement plan it needs (the plan policy), which
runtimes build its exports, and whether QuantSim can emulate the integer arithmetic of its engine. Adding a
target is one :func:`register_target` call; nothing else lists the targets.

============  ==========================  ==============  ==========  ======================================
target        activations                 plan policy     bias        runtimes / QuantSim integer arithmetic
============  ==========================  ==============  ==========  ======================================
onnxruntime   uint8; zp 128 signed, 0     unsigned 8-bit  int32 DQ    onnxruntime / ``onnxruntime``
              unsigned                    grids, fusion
                                          points, code clip
tensorrt      int8, zero point 0          signed 8-bit    float on    tensorrt / none
                                          grids only      int32 grid
openvino      as onnxruntime              unsigned 8-bit  int32 DQ    openvino / none
                                          grids, no
                                          fusion points,
                                          code clip
============  ==========================  ==============  ==========  ======================================

Aligned (Erf) activation points: every built-in target runs ``Erf``; the integer code lookup (a Gather on the
codes) runs on onnxruntime and openvino, not on TensorRT (the descriptor's ``erf_encodings``).

Two targets whose plan policies are equal take each other's recipes unchanged; otherwise a recipe exports to a
target only when the target's own plan of the same model is the recipe's plan (``qexport export`` checks).
"""

from __future__ import annotations

from dataclasses import dataclass

from qexport.errors import QexportError
from qexport.quant.spec import QuantSpec

_ACT_DTYPES = ("uint8", "int8")
_BIAS = ("int32", "float")


@dataclass(frozen=True)
class PlanPolicy:
    """What a target's placement plan looks like.

    Args:
        unsigned_8bit: a non-negative tensor may take an unsigned 8-bit grid (an int8-only engine cannot hold
            one; below 8 bits an unsigned grid still fits int8).
        fusion_points: at every activation width, 8-bit points on the outputs of quantized layers that feed a
            residual Add, on the last block's output and on the pool before the classifier, so the runtime fuses
            the integer conv, add and pool (ONNX Runtime's QLinearConv + QLinearAdd + QLinearGlobalAveragePool).
    """

    unsigned_8bit: bool
    fusion_points: bool


@dataclass(frozen=True)
class Target:
    """One export target.

    Args:
        name: what ``--target`` takes.
        summary: one line for ``--help`` and the docs.
        act_dtype: element type of activation Q/DQ pairs: ``uint8`` (signed grids get zero point 128) or
            ``int8`` (zero point 0).
        bias: ``int32`` (an int32 DQ with scale ``x_scale * w_scale``) or ``float`` (float values on that grid).
        plan: the plan policy.
        runtimes: runtimes that build this target's exports (``build-engine --target``).
        integer_arithmetic: name of the engine integer arithmetic QuantSim emulates for this target's engine
            (``QuantSim.set_engine_arithmetic``), or None when it does not.
        code_clip: a low-bit activation's Clip acts on the integer codes between Q and DQ (keeps the Q -> DQ
            pattern, so the runtime fuses the neighbouring convs); otherwise a float Clip before Q.
        erf_encodings: how the target's runtime can run an aligned activation point (``erf``: an Erf node
            between DQ and Q; ``lookup``: a Gather from the incoming codes); empty when it can run neither.
    """

    name: str
    summary: str
    act_dtype: str
    bias: str
    plan: PlanPolicy
    runtimes: tuple[str, ...]
    integer_arithmetic: str | None = None
    code_clip: bool = False
    erf_encodings: tuple[str, ...] = ()

    def __post_init__(self):
        if self.act_dtype not in _ACT_DTYPES:
            raise QexportError(f"target {self.name!r}: act_dtype must be one of {_ACT_DTYPES}, not {self.act_dtype!r}")
        if self.bias not in _BIAS:
            raise QexportError(f"target {self.name!r}: bias must be one of {_BIAS}, not {self.bias!r}")
        if not self.runtimes:
            raise QexportError(f"target {self.name!r} names no runtime")
        if not set(self.erf_encodings) <= {"erf", "lookup"}:
            raise QexportError(f"target {self.name!r}: erf_encodings must be among erf, lookup")

    def act_encoding(self, spec: QuantSpec) -> tuple[str, int, tuple[int, int] | None]:
        """How this target encodes an activation grid in a Q/DQ pair.

        Args:
            spec: the activation grid (zero point 0 in the recipe).

        Returns:
            (element type ``uint8``/``int8``, zero point, clip range in integer levels or None when the 8-bit
            type holds the grid as it is).
        """
        if self.act_dtype == "int8":
            if not spec.signed and spec.bits == 8:
                raise QexportError(f"this recipe has unsigned 8-bit activations, which {self.name}'s int8 cannot "
                                   f"hold; recalibrate with --target {self.name}")
            zp, lo, hi = 0, -128, 127
        else:
            zp = 128 if spec.signed else 0
            lo, hi = -zp, 255 - zp
        clip = None if (spec.qmin, spec.qmax) == (lo, hi) else (spec.qmin, spec.qmax)
        return self.act_dtype, zp, clip


_REGISTRY: dict[str, Target] = {}


def register_target(target: Target) -> Target:
    """Add a target (its name must be new).

    Args:
        target: the descriptor.

    Returns:
        The descriptor.
    """
    if target.name in _REGISTRY and _REGISTRY[target.name] != target:
        raise ValueError(f"target {target.name!r} is already registered")
    _REGISTRY[target.name] = target
    return target


def list_targets() -> list[str]:
    """Names of the registered targets, in registration order.

    Returns:
        The names.
    """
    return list(_REGISTRY)


def get_target(name: str) -> Target:
    """The descriptor of a target name.

    Args:
        name: what ``--target`` was given.

    Returns:
        The Target.
    """
    if name not in _REGISTRY:
        raise QexportError(f"unknown target {name!r}; choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


register_target(Target("onnxruntime", "ONNX Runtime CPU: uint8 activations, fused integer conv + add",
                       act_dtype="uint8", bias="int32", plan=PlanPolicy(unsigned_8bit=True, fusion_points=True),
                       runtimes=("onnxruntime",), integer_arithmetic="onnxruntime", code_clip=True,
                       erf_encodings=("erf", "lookup")))
register_target(Target("tensorrt", "TensorRT: int8 activations with zero point 0 (NVIDIA GPU)",
                       act_dtype="int8", bias="float", plan=PlanPolicy(unsigned_8bit=False, fusion_points=False),
                       runtimes=("tensorrt",), erf_encodings=("erf",)))
# OpenVINO runs both clip forms exactly; the code clip measured 1.17x faster on ResNet-20 W4A4 at batch 1 and equal
# on ResNet-18 (bench/openvino_clip_forms.py), and needs no float bound that OpenVINO turns back into a level.
register_target(Target("openvino", "OpenVINO CPU: ONNX Runtime's encoding, no fusion points",
                       act_dtype="uint8", bias="int32", plan=PlanPolicy(unsigned_8bit=True, fusion_points=False),
                       runtimes=("openvino",), code_clip=True, erf_encodings=("erf", "lookup")))


def targets_with(feature: str) -> tuple[str, ...]:
    """Names of the registered targets whose descriptor has a feature set (true or non-empty).

    Args:
        feature: a Target field, e.g. ``code_clip`` or ``erf_encodings``.

    Returns:
        The target names, in registration order.
    """
    return tuple(name for name, t in _REGISTRY.items() if getattr(t, feature))
