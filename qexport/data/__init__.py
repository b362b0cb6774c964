"""Calibration and evaluation data: image folders, seeded subsets, fingerprints, saved synthetic sets.

Public API: :class:`ImageFolder`, :func:`load_tensor`, :func:`iter_batches`, :func:`fingerprint`,
:func:`save_image_folder`, :func:`preprocess_image`, :data:`IMAGE_EXTENSIONS`.
"""

from qexport.data.folder import (
    IMAGE_EXTENSIONS,
    ImageFolder,
    fingerprint,
    heldout_indices,
    iter_batches,
    load_tensor,
    preprocess_image,
    subset_indices,
)
from qexport.data.synthetic import save_image_folder
from qexport.models.preprocess import Preprocess

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFolder",
    "Preprocess",
    "fingerprint",
    "heldout_indices",
    "iter_batches",
    "load_tensor",
    "preprocess_image",
    "save_image_folder",
    "subset_indices",
]
