from __future__ import annotations

import numpy as np
import pytest
import torch
from cxr_factory import chest_like, make_png

from pipeline.data import DataConfig, build_dataset, records
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
    assert len(list((tmp_path / "cache").rglob("*.pt"))) == len(items)
    with pytest.raises(ValueError, match="cache"):
        DataConfig(cache="ram")
