"""Chest-radiograph readers and MONAI dictionary transforms."""

from transforms.dictionary import CLAHEd, LoadCXRd, ToPlainTensord
from transforms.io import CXRReadError, ImageInfo, read_image
from transforms.presets import TransformConfig, eval_transforms, train_transforms

__all__ = [
    "CLAHEd",
    "CXRReadError",
    "ImageInfo",
    "LoadCXRd",
    "ToPlainTensord",
    "TransformConfig",
    "eval_transforms",
    "read_image",
    "train_transforms",
]
