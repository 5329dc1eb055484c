"""The parts an arm's training set is made of (:class:`pipeline.infra.arms.TrainingParts`) for a
classify config: the real dataset, the classical augmentation, the synthetic source and the
datasets that mix them. :meth:`pipeline.infra.arms.Arm.training_set` composes them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from pipeline.infra.data import build_dataset
from pipeline.infra.loaders import synthetic_source
from pipeline.infra.stage_configs import ClassifyConfig
from transforms.presets import tensor_augment_transforms
from transforms.synthetic import FilteredSource, RealDuplicatesDataset, SyntheticMixDataset


class ClassifyParts:
    """A classify run's training parts: ``items`` are its real training records; ``accept()``
    makes the filter's ``accept(image, label)`` (called only by a filtered arm)."""

    def __init__(
        self,
        cfg: ClassifyConfig,
        items: list[dict],
        device: torch.device,
        accept: Callable[[], Callable[[np.ndarray, int], bool]],
        batched: bool = False,
    ) -> None:
        self.cfg, self.items, self.device, self.accept = cfg, items, device, accept
        self.ratio = cfg.ratio
        # with the augmentation on whole batches (data.augment_on=device) the loader only decodes
        self.batched = batched

    @property
    def labels(self) -> list[int]:
        # read when used: building the real dataset drops the records of unreadable images
        return [int(it["label"]) for it in self.items]

    def real(self, augment: bool) -> Any:
        return build_dataset(self.items, self.cfg.data, train=augment and not self.batched)

    def augmentation(self) -> Any:
        return tensor_augment_transforms(self.cfg.data)

    def synthetic_augmentation(self) -> Any | None:
        return self.augmentation() if self.cfg.data.augment and not self.batched else None

    def source(self, filtered: bool) -> Any:
        cfg = self.cfg
        src = synthetic_source(cfg.synthetic, cfg.data.image_size, self.device, cfg.synthetic_temperature)
        return FilteredSource(src, self.accept()) if filtered else src

    def mix(self, real: Any, source: Any, **kw: Any) -> SyntheticMixDataset:
        return SyntheticMixDataset(real, self.labels, source, seed=self.cfg.seed, **kw)

    def duplicates(self, real: Any, transform: Any) -> RealDuplicatesDataset:
        return RealDuplicatesDataset(real, self.ratio, transform)
