"""Mixed precision: per-layer sensitivity (sensitivity.py, sensitivity_run.py) and per-layer width allocation
under a budget (allocate.py). Sits beside the calibrators: it reads the quant layer and the shared scale searches."""
