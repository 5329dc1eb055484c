from __future__ import annotations

import numpy as np
import pytest
import torch
from cxr_factory import chest_like, make_png

from pipeline.infra.data import DataConfig, build_dataset, records
from transforms import CLAHEd, TransformConfig, eval_transforms, train_transforms


def test_eval_output_range_shape_and_aspect_padding(tmp_path):
    p = make_png(tmp_path / "tall.png", chest_like(96, 48, np.uint8))
    d = {"image": str(p), "label": 1}
    out = eval_transforms(TransformConfig(image_size=64))(d)
    img = out["image"]
    assert img.shape == (1, 64, 64) and img.dtype == torch.float32
    assert float(img.min()) >= -1 and float(img.max()) <= 1
    # 96x48 -> 64x32 centred: 16 padded columns either side are black (-1)
    assert torch.all(img[0, :, :16] == -1) and torch.all(img[0, :, -16:] == -1)
    assert float(img[0, :, 16:48].std()) > 0.1
    # the input dict is untouched, the label passes through
    assert d == {"image": str(p), "label": 1}
    assert int(out["label"]) == 1
    # orientation survives the whole chain: the top-left marker stays top-left (bright)
    assert float(img[0, :4, 16:20].mean()) > 0.9


def test_percentile_normalisation_clips_outliers(tmp_path):
    arr = chest_like(64, 64, np.uint16)
    arr[10, 10] = 65535  # a hot pixel must not compress the rest of the range
    arr[20, 20] = 0
    img = eval_transforms(TransformConfig(image_size=64))({"image": str(make_png(tmp_path / "a.png", arr))})[
        "image"
    ]
    assert float((img > 0.99).float().mean()) < 0.1
    assert float(img.std()) > 0.3


def test_train_transforms_augment_but_keep_shape(tmp_path):
    p = str(make_png(tmp_path / "a.png", chest_like(64, 64, np.uint8)))
    tf = train_transforms(TransformConfig(image_size=32, aug_prob=1.0))
    tf.set_random_state(seed=0)
    a = tf({"image": p, "label": 0})["image"]
    b = tf({"image": p, "label": 0})["image"]
    assert a.shape == b.shape == (1, 32, 32)
    assert not torch.allclose(a, b)
    assert float(a.min()) >= -1 and float(a.max()) <= 1
    assert not any("Flip" in type(t).__name__ for t in tf.transforms)  # no horizontal flip by default
    assert any("Flip" in type(t).__name__ for t in train_transforms(TransformConfig(hflip=True)).transforms)


def test_clahe_changes_contrast_in_range(tmp_path):
    p = str(make_png(tmp_path / "a.png", chest_like(64, 64, np.uint8)))
    plain = eval_transforms(TransformConfig(image_size=64))({"image": p})["image"]
    eq = eval_transforms(TransformConfig(image_size=64, clahe=True))({"image": p})["image"]
    assert eq.shape == plain.shape and not torch.allclose(eq, plain)
    assert float(eq.min()) >= -1 and float(eq.max()) <= 1
    with pytest.raises(ValueError, match="clip_limit"):
        CLAHEd(keys="image", clip_limit=0)


def test_transform_config_validation():
    with pytest.raises(ValueError, match="image_size"):
        TransformConfig(image_size=100)
    with pytest.raises(ValueError, match="percentile"):
        TransformConfig(lower_percentile=50, upper_percentile=10)


def test_cached_datasets(tmp_path, phantom_manifest):
    cfg = DataConfig(manifest=str(phantom_manifest), image_size=32, cache_dir=str(tmp_path / "cache"))
    items = records(phantom_manifest, "train", limit=8)
    mem = build_dataset(items, cfg, train=False, cache="memory")
    none = build_dataset(items, cfg, train=False, cache="none")
    disk = build_dataset(items, cfg, train=False, cache="disk")
    for i in range(len(items)):
        assert torch.equal(mem[i]["image"], none[i]["image"])
        assert torch.equal(disk[i]["image"], none[i]["image"])
    # one plain array file per image, no pickle
    files = list((tmp_path / "cache").rglob("*.npy"))
    assert len(files) == len(items) and not list((tmp_path / "cache").rglob("*.pt"))
    # another process (a second dataset) reads them instead of decoding: the same tensors
    again = build_dataset(items, cfg, train=False, cache="disk")
    assert all(torch.equal(again[i]["image"], none[i]["image"]) for i in range(len(items)))
    # an image changed after it was cached is decoded again (the key holds its size and mtime)
    import os

    os.utime(items[0]["image"], ns=(1, 1))
    build_dataset(items[:1], cfg, train=False, cache="disk")
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == len(items) + 1
    with pytest.raises(ValueError, match="cache"):
        DataConfig(cache="ram")


# --------------------------------------------------------------------- batched device augmentation
def _blob_batch(b: int = 6, s: int = 32) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    blob = ((yy - s / 2) ** 2 + (xx - s / 2) ** 2 < (s / 4) ** 2).float()
    return (blob * torch.linspace(0.5, 1.0, b)[:, None, None]).unsqueeze(1) * 2 - 1


def test_batch_augment_identity_when_off_and_keeps_shape_range():
    from transforms.batch import BatchAugment
    from transforms.presets import TransformConfig

    x = _blob_batch()
    before = x.clone()
    out = BatchAugment(TransformConfig(image_size=32, aug_prob=0.0))(x)
    assert torch.equal(x, before)  # the input is not modified
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.allclose(out, x, atol=1e-5)  # probability 0: every image unchanged
    torch.manual_seed(0)
    on = BatchAugment(TransformConfig(image_size=32, aug_prob=1.0))(x)
    assert on.min() >= -1 and on.max() <= 1
    assert (on - x).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # probability 1: every image changed
    torch.manual_seed(0)
    assert torch.equal(on, BatchAugment(TransformConfig(image_size=32, aug_prob=1.0))(x))  # seeded


def test_batch_augment_parameters_stay_in_their_ranges():
    from transforms.batch import BatchAugment
    from transforms.presets import TransformConfig

    x = _blob_batch(b=64)
    unit = (x + 1) / 2
    # intensity scale alone: each image is multiplied by a factor in [1 - f, 1 + f]
    only_scale = TransformConfig(
        image_size=32, aug_prob=1.0, rotate_deg=0, scale=0, translate=0, contrast_gamma=0, intensity_scale=0.1
    )
    out = (BatchAugment(only_scale)(x) + 1) / 2
    ratio = out.amax(dim=(1, 2, 3)) / unit.amax(dim=(1, 2, 3))
    assert ratio.min() >= 0.9 - 1e-5 and ratio.max() <= 1.1 + 1e-5 and ratio.std() > 0.01
    # rotation alone (about the centre, black outside): a centred disc keeps its area
    only_rot = TransformConfig(
        image_size=32, aug_prob=1.0, rotate_deg=30, scale=0, translate=0, contrast_gamma=0, intensity_scale=0
    )
    out = (BatchAugment(only_rot)(x) + 1) / 2
    assert torch.allclose(out.sum(dim=(1, 2, 3)), unit.sum(dim=(1, 2, 3)), rtol=0.03)
    # translation alone moves the disc's centre by at most translate * size pixels per axis
    only_shift = TransformConfig(
        image_size=32, aug_prob=1.0, rotate_deg=0, scale=0, translate=0.1, contrast_gamma=0, intensity_scale=0
    )
    out = (BatchAugment(only_shift)(x) + 1) / 2
    grid = torch.arange(32.0)
    cx = (out.sum(dim=(1, 2)) * grid).sum(-1) / out.sum(dim=(1, 2, 3))
    assert (cx - 16).abs().max() <= 0.1 * 32 + 0.5 and (cx - 16).abs().max() > 0.5
