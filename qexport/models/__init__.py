"""Float models from specs: ``cifar:resnet20``, ``torchvision:resnet18``, ``package.module:factory``, ``model.pt2``.

Public API: :func:`load_model`, :class:`LoadedModel`, :class:`Preprocess`, :func:`register_model`,
:func:`list_models`, :func:`get`, :func:`sha256_file`, :func:`fold_batchnorm`.
"""

from qexport.models.preprocess import CIFAR_PRESET, IMAGENET_MEAN, IMAGENET_PRESET, IMAGENET_STD, Preprocess
from qexport.models.registry import ModelFamily, class_names, families, get, list_models, register_model

# built-in families register themselves on import (torchvision is imported lazily inside its builder)
from qexport.models import cifar_resnet as _cifar_resnet  # noqa: F401  isort: skip
from qexport.models import tv as _tv  # noqa: F401  isort: skip
from qexport.models.fold import fold_batchnorm, trace
from qexport.models.loader import LoadedModel, load_model
from qexport.models.weights import read_state_dict, sha256_file

__all__ = [
    "CIFAR_PRESET",
    "IMAGENET_MEAN",
    "IMAGENET_PRESET",
    "IMAGENET_STD",
    "LoadedModel",
    "class_names",
    "ModelFamily",
    "Preprocess",
    "families",
    "fold_batchnorm",
    "get",
    "list_models",
    "load_model",
    "read_state_dict",
    "register_model",
    "sha256_file",
    "trace",
]
