"""Quantization numerics, placement plan and QuantSim (the fake-quant PyTorch model)."""
