"""The shared training loop (``qexport.training.loop``) and its torch.distributed helpers
(``qexport.training.distributed``); read loop.py's docstring to put a method on it. QAT data:
:mod:`qexport.training.qat_data`."""

from qexport.training.distributed import DistInfo, init_from_env
from qexport.training.loop import Callbacks, LoopConfig, StepInfo, TrainLoop

__all__ = ["Callbacks", "DistInfo", "LoopConfig", "StepInfo", "TrainLoop", "init_from_env"]
