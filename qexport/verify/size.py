"""Model size at the weights' true width (packed 1/2/4-bit codes plus scales) beside FP32 and INT8 storage."""

from __future__ import annotations

import math

# What ``verify`` says whenever some weights are narrower than 8 bits.
LOW_BIT_NOTE = ("an INT8 engine stores and computes these weights as INT8: 1-, 2- and 4-bit weights give no extra "
                "speed over W8 there; the gain is the model size at the true width (packed codes + scales)")


def model_size(recipe) -> dict:
    """Storage of a recipe's model in bytes: FP32, INT8 weights, and the weights' true width.

    Quantized layers: ``n_weights * bits / 8`` (binary and ternary packed at 1 and 2 bits), one float32 scale per
    output channel, float32 biases (their int32 form is the same size). Everything else (kept-float layers)
    counts as FP32 in all three columns.

    Args:
        recipe: a QuantRecipe.

    Returns:
        {"fp32_bytes", "int8_bytes", "true_width_bytes", "low_bit_weights", "per_width": {bits: weight count}}.
    """
    q_layers = {lp.name: lp for lp in recipe.plan.layers}
    fp32 = int8 = true = 0
    per_width: dict[int, int] = {}
    for name, q in recipe.int_weights.items():
        lp = q_layers[name]
        n, ch = q.numel(), recipe.weight_scales[name].numel()
        bias = recipe.sim_state.get(f"gm.{name}.bias")
        extra = 4 * ch + (4 * bias.numel() if bias is not None else 0)
        fp32 += 4 * n + (4 * bias.numel() if bias is not None else 0)
        int8 += n + extra
        true += math.ceil(n * lp.weight.bits / 8) + extra
        per_width[lp.weight.bits] = per_width.get(lp.weight.bits, 0) + n
    for key, t in recipe.sim_state.items():  # float parameters outside quantized layers
        layer = key[3:].rsplit(".", 1)[0] if key.startswith("gm.") else None
        if layer in q_layers or not t.is_floating_point() or t.dim() == 0:
            continue
        if key.endswith((".weight", ".bias")):
            fp32 += 4 * t.numel()
            int8 += 4 * t.numel()
            true += 4 * t.numel()
    return {"fp32_bytes": fp32, "int8_bytes": int8, "true_width_bytes": true,
            "low_bit_weights": any(b < 8 for b in per_width), "per_width": {str(k): v for k, v in sorted(per_width.items())}}


def size_line(size: dict) -> str:
    """One line for the console and the Markdown report."""
    kib = lambda b: f"{b / 1024:.1f} KiB"  # noqa: E731
    widths = ", ".join(f"{n:,} at {b} bit{'s' if b != '1' else ''}" for b, n in size["per_width"].items())
    line = (f"Model size: {kib(size['true_width_bytes'])} at the weights' true width ({widths}; packed codes + "
            f"float32 scales and biases), {kib(size['int8_bytes'])} as INT8, {kib(size['fp32_bytes'])} as FP32 "
            f"({size['fp32_bytes'] / max(size['true_width_bytes'], 1):.1f}x smaller than FP32).")
    if size["low_bit_weights"]:
        line += f" Note: {LOW_BIT_NOTE}."
    return line
