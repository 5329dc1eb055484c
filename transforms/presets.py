"""Transform chains: ``eval_transforms(cfg)`` and ``train_transforms(cfg)`` (torchvision-preset style).

Output: ``image`` a float32 tensor ``[1, size, size]`` in ``[-1, 1]`` (0 is mid-grey, -1 black),
``label`` a long scalar. The deterministic head (read, normalise, resize, pad) comes first so that
MONAI's ``CacheDataset`` caches it; random augmentation comes after the cache boundary.
"""

from __future__ import annotations

from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandScaleIntensityd,
    Resized,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    SpatialPadd,
)

from transforms.config import TransformConfig
from transforms.dictionary import CLAHEd, LoadCXRd, ToPlainTensord


def deterministic_transforms(cfg: TransformConfig) -> list:
    """Read -> percentile clip to [0, 1] -> optional CLAHE -> aspect-preserving resize -> pad square."""
    size = cfg.image_size
    head = [
        LoadCXRd(keys="image"),
        ScaleIntensityRangePercentilesd(
            keys="image",
            lower=cfg.lower_percentile,
            upper=cfg.upper_percentile,
            b_min=0.0,
            b_max=1.0,
            clip=True,
        ),
    ]
    if cfg.clahe:
        head.append(CLAHEd(keys="image", clip_limit=cfg.clahe_clip_limit))
    head += [
        # "area" = average pooling when shrinking: anti-aliased, which a 2000 px CR needs at 64 px.
        Resized(keys="image", spatial_size=size, size_mode="longest", mode="area"),
        # pad the short side with 0 (black, in [0, 1] space) to a centred square
        SpatialPadd(keys="image", spatial_size=(size, size), mode="constant"),
        ToPlainTensord(keys="image"),
    ]
    return head


def _to_signed() -> ScaleIntensityRanged:
    return ScaleIntensityRanged(keys="image", a_min=0.0, a_max=1.0, b_min=-1.0, b_max=1.0, clip=True)


def eval_transforms(cfg: TransformConfig) -> Compose:
    return Compose([*deterministic_transforms(cfg), _to_signed(), ToPlainTensord(keys="image")])


def _random_augmentations(cfg: TransformConfig) -> list:
    size = cfg.image_size
    p = cfg.aug_prob
    rand = [
        # applied in [0, 1] space so that the zero padding of the affine is black, like the borders
        RandAffined(
            keys="image",
            prob=p,
            rotate_range=(cfg.rotate_deg * 3.14159265 / 180.0,),
            scale_range=(cfg.scale, cfg.scale),
            translate_range=(cfg.translate * size, cfg.translate * size),
            mode="bilinear",
            padding_mode="zeros",
        ),
        RandAdjustContrastd(keys="image", prob=p, gamma=(1 - cfg.contrast_gamma, 1 + cfg.contrast_gamma)),
        RandScaleIntensityd(keys="image", prob=p, factors=cfg.intensity_scale),
    ]
    if cfg.hflip:
        rand.append(RandFlipd(keys="image", prob=0.5, spatial_axis=1))
    return rand


def train_transforms(cfg: TransformConfig) -> Compose:
    if not cfg.augment:
        return eval_transforms(cfg)
    return Compose(
        [
            *deterministic_transforms(cfg),
            *_random_augmentations(cfg),
            _to_signed(),
            ToPlainTensord(keys="image"),
        ]
    )


def tensor_augment_transforms(cfg: TransformConfig) -> Compose:
    """The same random augmentation for images already preprocessed to ``[-1, 1]`` (synthetic ones)."""
    to_unit = ScaleIntensityRanged(keys="image", a_min=-1.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True)
    return Compose([to_unit, *_random_augmentations(cfg), _to_signed(), ToPlainTensord(keys="image")])
