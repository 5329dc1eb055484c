"""The transforms' settings, importable without MONAI, torch or numpy.

:class:`TransformConfig` (preprocessing and augmentation, the base of every stage's ``data``
section) and :data:`MAX_PIXELS` (the readers' size cap, the default of ingest's ``max_pixels``) are
plain Python, so a stage's config is checked (and ``--help`` printed) before any image code is
loaded. :mod:`transforms.presets` and :mod:`transforms.io` re-export them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

# A decoded image above this many pixels is refused rather than allocated: a header that declares
# a huge size is far more likely corrupt than a real radiograph (the largest CR plates are ~4300 px).
MAX_PIXELS = 12_000 * 12_000

VALID_SIZES = (16, 32, 64, 128, 256, 512)


@dataclass
class TransformConfig:
    """Preprocessing and augmentation settings (the ``data`` section of a stage config)."""

    image_size: int = 64
    lower_percentile: float = 0.5  # clip below this percentile of each image ...
    upper_percentile: float = 99.5  # ... and above this one, then scale to [0, 1]
    clahe: bool = False
    clahe_clip_limit: float = 0.01
    # augmentation (train only)
    augment: bool = True
    aug_prob: float = 0.5
    rotate_deg: float = 5.0
    scale: float = 0.05
    translate: float = 0.03  # fraction of the image size
    contrast_gamma: float = 0.15  # gamma in [1 - g, 1 + g]
    intensity_scale: float = 0.05
    hflip: bool = False  # off by default: the heart has a side

    # value ranges the config loader enforces (pipeline.infra.config.declared_ranges): a
    # probability, a rotation up to a half turn, factors 1 +- s that stay positive
    RANGES: ClassVar[dict[str, str]] = {
        "clahe_clip_limit": "[0, 1]",
        "aug_prob": "[0, 1]",
        "rotate_deg": "[0, 180]",
        "scale": "[0, 1)",
        "translate": "[0, 1]",
        "contrast_gamma": "[0, 1)",
        "intensity_scale": "[0, 1)",
    }

    def __post_init__(self) -> None:
        if self.image_size not in VALID_SIZES:
            raise ValueError(f"image_size must be one of {VALID_SIZES}, got {self.image_size}")
        if not 0 <= self.lower_percentile < self.upper_percentile <= 100:
            raise ValueError(
                f"need 0 <= lower_percentile < upper_percentile <= 100, got {self.lower_percentile}, {self.upper_percentile}"
            )
