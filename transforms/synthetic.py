"""Synthetic augmentation for any MONAI/PyTorch training loop.

Two ways to mix synthetic radiographs of the right label into a real training set:

* :class:`SyntheticMixDataset` appends ``round(ratio * len(real))`` synthetic items; each one takes
  the label of a real item (so the class balance of the real set is kept) and an image of that
  label from a source.
* :class:`RandSyntheticSwapd`, a MONAI random dictionary transform, replaces the image of a
  dictionary by a synthetic one of the same label with probability ``prob``.

A source is either :class:`GeneratorSource` (images drawn on the fly from a loaded generator;
``pipeline.infra.loaders.synthetic_source`` builds either kind from a checkpoint, an MLflow model URI or
a manifest) or :class:`ManifestSource` (images read from a manifest written by
``python -m pipeline.run generate``). Both return ``[1, S, S]`` tensors in ``[-1, 1]`` and are
deterministic given the random state they are handed.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from monai.transforms import MapTransform, RandomizableTransform
from torch.utils.data import Dataset

from networks.vaegan import Generator
from transforms.manifest import ManifestError, read_manifest
from transforms.presets import TransformConfig, eval_transforms


def _index(i: int, n: int) -> int:
    """A sequence index: negative ones count from the end; outside ``[-n, n)`` an IndexError."""
    if not -n <= i < n:
        raise IndexError(i)
    return i % n if i < 0 else i


class SyntheticSource(Protocol):
    image_size: int

    def labels(self) -> list[int]: ...

    def draw(self, label: int, rng: np.random.RandomState) -> torch.Tensor: ...


class GeneratorSource:
    """Draws images on the fly from a generator (:class:`networks.vaegan.Generator`: the decoder
    and its latent prior), e.g. ``pipeline.infra.loaders.load_generator(path_or_uri).generator``, which
    loads checkpoints and MLflow models as data.

    Codes come from the caller's random state, through the generator's prior (fitted, when it
    carries one), so an item's image depends only on the state it is handed.
    """

    def __init__(self, generator: Generator, temperature: float = 1.0) -> None:
        if not isinstance(generator, Generator):
            raise TypeError(
                f"GeneratorSource takes a networks.vaegan.Generator, got {type(generator).__name__}: "
                "load one with pipeline.infra.loaders.load_generator(path_or_uri).generator"
            )
        self.generator = generator.eval()
        self.temperature = float(temperature)  # scales the prior's spread around each class mean
        self.num_classes = generator.decoder.num_classes
        self.image_size = generator.decoder.image_size

    def labels(self) -> list[int]:
        return list(range(self.num_classes)) if self.num_classes else [-1]

    @torch.no_grad()
    def draw(self, label: int, rng: np.random.RandomState) -> torch.Tensor:
        if self.num_classes and not 0 <= label < self.num_classes:
            raise ValueError(f"label {label} is not a class of the generator ({self.num_classes} classes)")
        eps = torch.from_numpy(rng.standard_normal((1, self.generator.decoder.latent_dim)).astype(np.float32))
        if self.temperature != 1.0:
            eps = eps * self.temperature
        dev = next(self.generator.parameters()).device
        lab = None if self.num_classes == 0 else torch.tensor([label], device=dev)
        z = self.generator.prior(eps.to(dev), lab)  # the fitted prior when it has one, else N(0, I)
        return self.generator(z, lab).float().cpu()[0]


class ManifestSource:
    """Images of a generated (or any) manifest, preprocessed once and kept in memory per label."""

    def __init__(self, manifest: str | Path, image_size: int, split: str | None = None) -> None:
        df, _ = read_manifest(manifest, split)
        if df.empty:
            raise ManifestError(f"{manifest}: no images to draw synthetic samples from")
        tf = eval_transforms(TransformConfig(image_size=image_size))
        self.image_size = image_size
        self.by_label: dict[int, list[torch.Tensor]] = {}
        for p, lab in zip(df["abs_path"], df["label"], strict=True):
            self.by_label.setdefault(int(lab), []).append(
                torch.as_tensor(tf({"image": p, "label": int(lab)})["image"])
            )

    def labels(self) -> list[int]:
        return sorted(self.by_label)

    def draw(self, label: int, rng: np.random.RandomState) -> torch.Tensor:
        pool = self.by_label.get(int(label))
        if not pool:
            raise ValueError(f"the synthetic manifest has no images of label {label} (has {self.labels()})")
        return pool[rng.randint(len(pool))].clone()


class FilteredSource:
    """A synthetic source that keeps only images a judge accepts for their label (Xue et al. 2019:
    keep the samples whose intended label a real-trained classifier confirms). ``accept(image,
    label)`` decides; a rejected draw is drawn again from the same random stream, up to
    ``max_tries``, after which the last draw is kept and counted as forced."""

    def __init__(
        self, source: SyntheticSource, accept: Callable[[np.ndarray, int], bool], max_tries: int = 20
    ) -> None:
        if max_tries < 1:
            raise ValueError(f"max_tries must be >= 1, got {max_tries}")
        self.source, self.accept, self.max_tries = source, accept, max_tries
        self.image_size = getattr(source, "image_size", None)
        self.stats = {"accepted": 0, "rejected": 0, "forced": 0}

    def draw(self, label: int, rng: np.random.RandomState) -> np.ndarray:
        for _ in range(self.max_tries):
            img = self.source.draw(label, rng)
            if self.accept(img, label):
                self.stats["accepted"] += 1
                return img
            self.stats["rejected"] += 1
        self.stats["forced"] += 1
        return img

    def accept_rate(self) -> float:
        n = self.stats["accepted"] + self.stats["rejected"]
        return self.stats["accepted"] / n if n else float("nan")


class SyntheticMixDataset(Dataset):
    """A real dataset plus ``round(ratio * len(real))`` synthetic items of the real labels.

    Item ``i < len(real)`` is ``real[i]`` with ``synthetic=0``; item ``len(real) + j`` has the label
    of real item ``j % len(real)`` (or ``syn_labels[j]`` when given), an image drawn from ``source`` with a random state seeded by
    ``(seed, epoch, j)`` (call :meth:`set_epoch` for fresh samples each epoch) passed through
    ``transform`` when given, and ``synthetic=1``. ``ratio=inf``-like use (synthetic only) is
    :meth:`synthetic_only`.
    """

    def __init__(
        self,
        real: Dataset,
        real_labels: Sequence[int],
        source: SyntheticSource,
        ratio: float = 1.0,
        transform: Callable[[dict], dict] | None = None,
        seed: int = 0,
        include_real: bool = True,
        syn_labels: Sequence[int] | None = None,
    ) -> None:
        if ratio < 0:
            raise ValueError(f"ratio must be >= 0, got {ratio}")
        if len(real_labels) != len(real):  # type: ignore[arg-type]
            raise ValueError(f"real_labels has {len(real_labels)} entries for {len(real)} real items")  # type: ignore[arg-type]
        self.real, self.real_labels = real, [int(v) for v in real_labels]
        self.source, self.transform, self.seed = source, transform, seed
        self.include_real = include_real
        self.n_real = len(self.real_labels) if include_real else 0
        # the synthetic items' labels: given (e.g. the minority class only), or the real ones cycled
        self.syn_labels = None if syn_labels is None else [int(v) for v in syn_labels]
        self.n_syn = (
            len(self.syn_labels) if self.syn_labels is not None else int(round(ratio * len(self.real_labels)))
        )
        self.epoch = 0

    @classmethod
    def synthetic_only(cls, real: Dataset, real_labels: Sequence[int], source: SyntheticSource, **kw):
        """As many synthetic items as real ones, with the real labels, and no real image."""
        return cls(real, real_labels, source, ratio=1.0, include_real=False, **kw)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n_real + self.n_syn

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = _index(i, len(self))
        if i < self.n_real:
            item = dict(self.real[i])
            item["synthetic"] = 0
            return item
        j = i - self.n_real
        label = (
            self.syn_labels[j] if self.syn_labels is not None else self.real_labels[j % len(self.real_labels)]
        )
        rng = np.random.RandomState(np.random.SeedSequence([self.seed, self.epoch, j]).generate_state(1))
        item = {"image": self.source.draw(label, rng), "label": label}
        if self.transform is not None:
            item = self.transform(item)
        item = dict(item)
        item["image"] = torch.as_tensor(item["image"]).float()
        item["label"] = torch.as_tensor(label, dtype=torch.long)  # as the real items' labels, for collation
        item["synthetic"] = 1
        return item


class RealDuplicatesDataset(Dataset):
    """The count-matched control of :class:`SyntheticMixDataset`: the real dataset plus
    ``round(ratio * len(real))`` extra draws of *real* images, each passed through ``transform``
    (the classical augmentation). Extra item ``len(real) + j`` is real item ``j % len(real)``,
    the item whose label synthetic item ``j`` takes, so both arms add the same number of images
    per class and the same number of optimiser steps. Without this arm a "gain" from synthetic
    images may be more steps and more augmented views of the same real images (Pink & Sykes 2026).
    """

    def __init__(self, real: Dataset, ratio: float, transform: Callable[[dict], dict]) -> None:
        if ratio < 0:
            raise ValueError(f"ratio must be >= 0, got {ratio}")
        self.real, self.transform = real, transform
        self.n_real = len(real)  # type: ignore[arg-type]
        self.n_extra = int(round(ratio * self.n_real))

    def set_epoch(self, epoch: int) -> None:
        """No per-epoch state: the transform's random state is seeded by the stage each epoch."""

    def __len__(self) -> int:
        return self.n_real + self.n_extra

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = _index(i, len(self))
        item = dict(self.real[i % self.n_real])
        if i >= self.n_real:
            item = dict(self.transform(item))
            item["image"] = torch.as_tensor(item["image"]).float()
        item["label"] = torch.as_tensor(int(item["label"]), dtype=torch.long)
        item["synthetic"] = 0
        return item


class RandSyntheticSwapd(RandomizableTransform, MapTransform):
    """With probability ``prob``, replace ``d[image_key]`` by a synthetic image of label ``d[label_key]``.

    The input dictionary is never mutated: a shallow copy is returned.
    """

    def __init__(
        self,
        source: SyntheticSource,
        prob: float = 0.5,
        image_key: str = "image",
        label_key: str = "label",
        allow_missing_keys: bool = False,
    ) -> None:
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob}")
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, [image_key], allow_missing_keys)
        self.source, self.image_key, self.label_key = source, image_key, label_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            d["synthetic"] = 0
            return d
        d[self.image_key] = self.source.draw(int(d[self.label_key]), self.R)
        d["synthetic"] = 1
        return d
