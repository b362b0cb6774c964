"""Quantizer specifications and the ``--bits`` grammar (``w4a8``, ``w8a8``, ``w4``, ``w4a32``).

Conventions (see ../shared/docs/numerics.md): weights symmetric per output channel with zero point 0, narrow range
[-127, 127] at 8 bits and full range [-2^(b-1), 2^(b-1)-1] below; activations per tensor, zero point 0,
unsigned [0, 2^b - 1] where the tensor is provably non-negative, else signed symmetric.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from qexport.errors import QexportError

MIN_BITS, MAX_BITS = 1, 8


@dataclass(frozen=True)
class QuantSpec:
    """An integer grid ``q in [qmin, qmax]``, value = q * scale (zero point 0 in the recipe).

    A signed 1-bit grid is *binary*: the two levels {-1, +1}, with no zero level (``binary``); ``qmin``/``qmax``
    are its ends and :meth:`grid` lists the levels. Every other grid holds every integer in [qmin, qmax].

    Args:
        bits: bit width, 1..8 (1 = binary weights {-1, +1}: QAT methods ``md`` and ``ste``).
        signed: signed grid, else unsigned [0, 2^b - 1].
        narrow: drop the most negative level (symmetric [-(2^(b-1)-1), 2^(b-1)-1]).
    """

    bits: int
    signed: bool = True
    narrow: bool = False

    def __post_init__(self) -> None:
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise QexportError(f"quantizer bits must be in {MIN_BITS}..{MAX_BITS}, got {self.bits}")

    @property
    def qmin(self) -> int:
        if not self.signed:
            return 0
        if self.bits == 1:
            return -1
        return -(2 ** (self.bits - 1)) + (1 if self.narrow else 0)

    @property
    def qmax(self) -> int:
        if self.bits == 1 and self.signed:
            return 1
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def binary(self) -> bool:
        """The binary grid {-1, +1} (signed 1-bit): no zero level; values round to the sign, 0 to +1."""
        return self.bits == 1 and self.signed

    @property
    def levels(self) -> int:
        return 2 if self.binary else self.qmax - self.qmin + 1

    def grid(self) -> tuple[int, ...]:
        """Every integer level of the grid, ascending ((-1, 1) for binary)."""
        return (-1, 1) if self.binary else tuple(range(self.qmin, self.qmax + 1))

    def holds(self, q) -> bool:
        """Whether every integer of tensor ``q`` is a level of this grid (binary: no zeros).

        Args:
            q: an integer-valued tensor.

        Returns:
            True when all values are levels.
        """
        if q.numel() == 0:
            return True
        if int(q.min()) < self.qmin or int(q.max()) > self.qmax:
            return False
        return not (self.binary and bool((q == 0).any()))

    def to_dict(self) -> dict:
        return {"bits": self.bits, "signed": self.signed, "narrow": self.narrow}

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSpec":
        return cls(bits=int(d["bits"]), signed=bool(d["signed"]), narrow=bool(d.get("narrow", False)))


def weight_spec(bits: int) -> QuantSpec:
    """The weight grid for ``bits``: narrow at 8 bits, full range below (../shared/docs/numerics.md).

    Args:
        bits: weight bit width.

    Returns:
        The QuantSpec for per-channel symmetric weights.
    """
    return QuantSpec(bits=bits, signed=True, narrow=(bits == 8))


def activation_spec(bits: int, non_negative: bool) -> QuantSpec:
    """The activation grid: unsigned for provably non-negative tensors, else signed [-2^(b-1), 2^(b-1)-1].

    The signed grid keeps the full range: int8 in TensorRT and uint8 with zero point 128 in ONNX Runtime both
    hold [-128, 127] exactly, so no Clip is needed at 8 bits.

    Args:
        bits: activation bit width.
        non_negative: the tensor is provably >= 0 (after ReLU).

    Returns:
        The QuantSpec for a per-tensor activation quantizer.
    """
    if non_negative:
        return QuantSpec(bits=bits, signed=False)
    return QuantSpec(bits=bits, signed=True, narrow=False)


_BITS_RE = re.compile(r"^w(\d+)(?:a(\d+))?$")


@dataclass(frozen=True)
class BitsConfig:
    """Bit widths of a run: ``weight_bits`` for every quantized layer, ``act_bits`` (None = float).

    Args:
        weight_bits: weight bits (1..8).
        act_bits: activation bits (2..8), or None for weights-only quantization.
        first_last_bits: keep the first and last quantized layer (weights and input) at this width.
        layer_bits: per-layer widths on top of the defaults, ``(layer name, weight bits, input bits)`` each
            (mixed precision; qexport/quant/layer_bits.py parses them). Input bits are None exactly when the
            default activations are float.
    """

    weight_bits: int
    act_bits: int | None
    first_last_bits: int | None = None
    layer_bits: tuple[tuple[str, int, int | None], ...] = ()

    def __post_init__(self) -> None:
        if not MIN_BITS <= self.weight_bits <= MAX_BITS:
            raise QexportError(f"weight bits must be in 1..8, got {self.weight_bits} (use e.g. --bits w4a8)")
        if self.act_bits is not None and not 2 <= self.act_bits <= MAX_BITS:
            raise QexportError(f"activation bits must be in 2..8 (or 32 for float), got {self.act_bits}")
        if self.first_last_bits is not None and not 2 <= self.first_last_bits <= MAX_BITS:
            raise QexportError(f"--first-last-bits must be in 2..8, got {self.first_last_bits}")
        for name, w, a in self.layer_bits:
            check_layer_widths(name, w, a, self.act_bits is not None)

    @classmethod
    def parse(cls, text: str, first_last_bits: int | None = None) -> "BitsConfig":
        """Parse ``wNaM`` (``a32`` or no ``a`` part = float activations).

        Args:
            text: e.g. ``w8a8``, ``w4a4``, ``w4``, ``w4a32``.
            first_last_bits: optional width for the first and last layer.

        Returns:
            The BitsConfig.
        """
        m = _BITS_RE.match(text.strip().lower())
        if not m:
            raise QexportError(f"--bits {text!r} does not parse; use wNaM such as w8a8, w4a8, w4a4 or w4 (weights only)")
        w = int(m.group(1))
        a = int(m.group(2)) if m.group(2) is not None else None
        if a == 32:
            a = None
        return cls(weight_bits=w, act_bits=a, first_last_bits=first_last_bits)

    @property
    def label(self) -> str:
        base = f"w{self.weight_bits}a{self.act_bits if self.act_bits else 32}"
        return f"{base}+mixed({len(self.layer_bits)} layers)" if self.layer_bits else base

    def widths_for(self, layer: str, edge: bool) -> tuple[int, int | None]:
        """(weight bits, input bits) of one layer: its ``layer_bits`` entry, else first/last, else the default."""
        for name, w, a in self.layer_bits:
            if name == layer:
                return w, a
        if self.first_last_bits and edge:
            return self.first_last_bits, (self.first_last_bits if self.act_bits is not None else None)
        return self.weight_bits, self.act_bits

    def to_dict(self) -> dict:
        d = {"weight_bits": self.weight_bits, "act_bits": self.act_bits, "first_last_bits": self.first_last_bits}
        if self.layer_bits:
            d["layer_bits"] = {n: width_label(w, a) for n, w, a in self.layer_bits}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "BitsConfig":
        per_layer = []
        for name, text in (d.get("layer_bits") or {}).items():
            b = cls.parse(text)
            per_layer.append((name, b.weight_bits, b.act_bits))
        return cls(int(d["weight_bits"]), d.get("act_bits"), d.get("first_last_bits"), tuple(per_layer))


def width_label(w: int, a: int | None) -> str:
    """``wNaM`` of a weight and an activation width (``a32`` for float activations)."""
    return f"w{w}a{a if a else 32}"


def check_layer_widths(name: str, w: int, a: int | None, quantized_acts: bool) -> None:
    """Reject a per-layer width no target can hold, or one that mixes float and integer activations.

    Every target stores codes in 8-bit integers (Q/DQ pairs with a Clip below 8 bits), so 1..8 weight bits and
    2..8 activation bits are what a layer can have.

    Args:
        name: layer name (for the message).
        w: weight bits.
        a: input activation bits (None: float).
        quantized_acts: the default activations are quantized.
    """
    if not MIN_BITS <= w <= MAX_BITS:
        raise QexportError(f"layer {name!r}: {w}-bit weights do not fit the 8-bit integers of every target; "
                           f"use 1..8 weight bits")
    if a is not None and not 2 <= a <= MAX_BITS:
        raise QexportError(f"layer {name!r}: {a}-bit activations do not fit the 8-bit integers of every target; "
                           f"use 2..8 activation bits")
    if (a is not None) != quantized_acts:
        want = "a width such as w8a8" if quantized_acts else "weights only, such as w8"
        raise QexportError(f"layer {name!r}: {width_label(w, a)} mixes float and integer activations with the "
                           f"default; give {want}")
