"""Verification: parity of engines against QuantSim and FP32, and latency."""
