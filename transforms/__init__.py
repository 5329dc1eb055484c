"""Chest-radiograph readers and MONAI dictionary transforms.

``TransformConfig`` comes from :mod:`transforms.config` (plain Python); the readers and transforms
are loaded on first access (PEP 562), so ``import transforms.config`` (which runs this file first)
checks a config without loading MONAI, torch or numpy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from transforms.config import TransformConfig

if TYPE_CHECKING:
    from transforms.dictionary import CLAHEd, LoadCXRd, ToPlainTensord
    from transforms.io import CXRReadError, ImageInfo, read_image
    from transforms.presets import eval_transforms, train_transforms

# name -> the module defining it, imported when the name is first looked up here
_LAZY = {
    **dict.fromkeys(("CLAHEd", "LoadCXRd", "ToPlainTensord"), "transforms.dictionary"),
    **dict.fromkeys(("CXRReadError", "ImageInfo", "read_image"), "transforms.io"),
    **dict.fromkeys(("eval_transforms", "train_transforms"), "transforms.presets"),
}

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


def __getattr__(name: str) -> Any:
    if name not in _LAZY:  # also lets ``from transforms import batch`` fall back to the submodule
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
