from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.infra.data import DataConfig, build_dataset, records
from pipeline.infra.loaders import load_generator, synthetic_source
from transforms.synthetic import (
    FilteredSource,
    GeneratorSource,
    ManifestSource,
    RandSyntheticSwapd,
    RealDuplicatesDataset,
    SyntheticMixDataset,
)


def _source(checkpoint) -> GeneratorSource:
    return GeneratorSource(load_generator(checkpoint).generator)


class ConstSource:
    """A source whose images encode their label: +1 for label 1, -1 for label 0."""

    image_size = 8

    def labels(self):
        return [0, 1]

    def draw(self, label, rng):
        return torch.full((1, 8, 8), 1.0 if label == 1 else -1.0) + 0 * float(rng.rand())


def _real(n=10):
    labels = [i % 2 for i in range(n)]
    return [{"image": torch.zeros(1, 8, 8), "label": torch.tensor(lab)} for lab in labels], labels


def test_mix_appends_ratio_times_real_with_the_real_labels():
    real, labels = _real(10)
    ds = SyntheticMixDataset(real, labels, ConstSource(), ratio=0.5)
    assert len(ds) == 15
    assert all(ds[i]["synthetic"] == 0 for i in range(10))
    syn = [ds[i] for i in range(10, 15)]
    assert all(s["synthetic"] == 1 for s in syn)
    for j, s in enumerate(syn):
        assert int(s["label"]) == labels[j]  # label of real item j ...
        assert float(s["image"].mean()) == (1.0 if labels[j] == 1 else -1.0)  # ... and an image of it


def test_synthetic_only_has_no_real_image():
    real, labels = _real(6)
    ds = SyntheticMixDataset.synthetic_only(real, labels, ConstSource())
    assert len(ds) == 6 and all(ds[i]["synthetic"] == 1 for i in range(6))


def test_draws_are_reproducible_per_epoch_and_change_between_epochs(phantom_generator):
    src = _source(phantom_generator["checkpoint"])
    real, labels = _real(4)
    a = SyntheticMixDataset(real, labels, src, ratio=1.0, seed=1)
    b = SyntheticMixDataset(real, labels, src, ratio=1.0, seed=1)
    torch.testing.assert_close(a[5]["image"], b[5]["image"])
    a.set_epoch(1)
    assert not torch.equal(a[5]["image"], b[5]["image"])
    assert a[5]["image"].shape == (1, 32, 32) and float(a[5]["image"].min()) >= -1


def test_swap_transform_replaces_with_right_label_and_never_mutates_input():
    t = RandSyntheticSwapd(ConstSource(), prob=1.0)
    t.set_random_state(0)
    d = {"image": torch.zeros(1, 8, 8), "label": 1}
    out = t(d)
    assert float(out["image"].mean()) == 1.0 and out["synthetic"] == 1
    assert float(d["image"].abs().sum()) == 0 and "synthetic" not in d
    keep = RandSyntheticSwapd(ConstSource(), prob=0.0)(d)
    assert keep["synthetic"] == 0 and torch.equal(keep["image"], d["image"])


def test_manifest_source_reads_generated_images(tmp_path, phantom_generator):
    from pipeline.generate import GenerateConfig, generate
    from pipeline.infra.config import load_config

    res = generate(
        load_config(
            GenerateConfig,
            None,
            [
                f"checkpoint={phantom_generator['checkpoint']}",
                "n=6",
                f"out={tmp_path / 'g'}",
                "log_mlflow=false",
            ],
        )
    )
    src = synthetic_source(res["manifest"], 32)
    assert isinstance(src, ManifestSource) and src.labels() == [0, 1]
    img = src.draw(1, np.random.RandomState(0))
    assert img.shape == (1, 32, 32) and float(img.min()) >= -1.0 and float(img.max()) <= 1.0
    with pytest.raises(ValueError, match="no images of label 5"):
        src.draw(5, np.random.RandomState(0))


def test_mixed_dataset_collates_with_a_real_cache_dataset(phantom_manifest, phantom_generator):
    from monai.data import DataLoader

    items = records(phantom_manifest, "train")
    real = build_dataset(items, DataConfig(image_size=32), train=True)
    ds = SyntheticMixDataset(real, [it["label"] for it in items], _source(phantom_generator["checkpoint"]))
    batch = next(iter(DataLoader(ds, batch_size=len(ds), shuffle=False)))
    assert batch["image"].shape == (2 * len(items), 1, 32, 32)
    assert int(batch["synthetic"].sum()) == len(items)
    torch.testing.assert_close(batch["label"][: len(items)], batch["label"][len(items) :])


def test_validation_rules(phantom_generator):
    real, labels = _real(4)
    with pytest.raises(ValueError, match="ratio must be >= 0"):
        SyntheticMixDataset(real, labels, ConstSource(), ratio=-1)
    with pytest.raises(ValueError, match="real_labels has 3 entries for 4"):
        SyntheticMixDataset(real, labels[:3], ConstSource())
    with pytest.raises(ValueError, match=r"prob must be in \[0, 1\]"):
        RandSyntheticSwapd(ConstSource(), prob=2)
    with pytest.raises(ValueError, match="makes 32px images but the data are 64px"):
        synthetic_source(phantom_generator["checkpoint"], 64)
    with pytest.raises(ValueError, match="not a class of the generator"):
        _source(phantom_generator["checkpoint"]).draw(7, np.random.RandomState(0))
    # the data layer takes a loaded generator; loading (and refusing pickles) is the stages' job
    with pytest.raises(TypeError, match="load one with pipeline.infra.loaders.load_generator"):
        GeneratorSource(phantom_generator["checkpoint"])


def test_real_duplicates_match_the_synthetic_arms_counts_and_labels():
    """real_dup's extra item j is an augmented draw of real item j % N: the synthetic arm's extra
    item j takes that item's label, so both arms add the same images per class."""
    real = [{"image": torch.full((1, 8, 8), float(i) / 10), "label": i % 2} for i in range(5)]
    seen = []

    def tf(item):
        seen.append(float(item["image"].mean()))
        return {**item, "image": item["image"] * 0 + 0.5}  # stands in for the classical augmentation

    ds = RealDuplicatesDataset(real, ratio=2.0, transform=tf)
    assert len(ds) == 5 + 10
    assert [int(ds[i]["label"]) for i in range(len(ds))] == [i % 5 % 2 for i in range(15)]
    # the first N are the real items untouched; the rest went through the transform
    assert torch.equal(ds[3]["image"], real[3]["image"]) and float(ds[5 + 3]["image"].mean()) == 0.5
    assert seen and all(ds[i]["synthetic"] == 0 for i in range(len(ds)))
    with pytest.raises(ValueError, match="ratio"):
        RealDuplicatesDataset(real, ratio=-1.0, transform=tf)


def test_given_synthetic_labels_replace_the_cycled_real_ones():
    """balanced_synthetic tops up the minority class: synthetic items take the labels given."""

    class Source:
        image_size = 8

        def draw(self, label, rng):
            return np.full((1, 8, 8), float(label), np.float32)

    real = [{"image": torch.zeros(1, 8, 8), "label": lab} for lab in (1, 1, 1, 0)]
    ds = SyntheticMixDataset(real, [1, 1, 1, 0], Source(), ratio=5.0, syn_labels=[0, 0])
    assert len(ds) == 4 + 2  # ratio is ignored when the labels are given
    assert [int(ds[i]["label"]) for i in range(4, 6)] == [0, 0] and ds[5]["synthetic"] == 1


def test_filtered_source_keeps_what_the_judge_confirms_and_counts_the_rest():
    class Source:
        image_size = 8

        def draw(self, label, rng):
            return np.full((1, 8, 8), rng.rand(), np.float32)

    # the judge confirms label 1 for bright images and label 0 for dark ones
    src = FilteredSource(Source(), lambda img, lab: (img.mean() > 0.5) == (lab == 1))
    rng = np.random.RandomState(0)
    assert all(src.draw(1, rng).mean() > 0.5 for _ in range(20))
    assert all(src.draw(0, rng).mean() <= 0.5 for _ in range(20))
    assert src.stats["accepted"] == 40 and src.stats["rejected"] > 0 and 0 < src.accept_rate() < 1
    never = FilteredSource(Source(), lambda img, lab: False, max_tries=3)
    never.draw(1, rng)  # after max_tries the last draw is kept, and said to be
    assert never.stats == {"accepted": 0, "rejected": 3, "forced": 1}
