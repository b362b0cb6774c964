"""qexport: calibrate a PyTorch CNN, export QDQ ONNX, build an INT8 engine and verify it.

Heavy dependencies (torch, onnx, runtimes) are imported by the submodules that need them, so that
``import qexport`` and ``qexport --help`` stay fast and work without optional runtimes.
"""

__version__ = "0.1.0"

from qexport.errors import QexportError  # noqa: E402  (light: no heavy imports)

__all__ = ["QexportError", "__version__"]
