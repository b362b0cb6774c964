"""Export: recipe + float model + target -> QDQ ONNX, checked against the target's rules before it is written."""
