"""Networks and losses for the chest-radiograph VAE-GAN.

``ModelConfig`` comes from :mod:`networks.config` (plain Python); the networks are loaded from
:mod:`networks.vaegan` on first access (PEP 562), so ``import networks.config`` (which runs this
file first) checks a config without loading torch or MONAI.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from networks.config import ModelConfig

if TYPE_CHECKING:
    from networks.vaegan import VAEGAN, Decoder, Discriminator, Encoder, Generator

# name -> the module defining it, imported when the name is first looked up here
_LAZY = {name: "networks.vaegan" for name in ("VAEGAN", "Decoder", "Discriminator", "Encoder", "Generator")}

__all__ = ["VAEGAN", "Decoder", "Discriminator", "Encoder", "Generator", "ModelConfig"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:  # also lets ``from networks import fused`` fall back to the submodule
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
