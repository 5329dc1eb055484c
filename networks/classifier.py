"""Chest-radiograph classifier from MONAI networks (1 channel in, one logit per class out).

Used by the downstream-gain experiment (``python -m pipeline.run classify`` / ``gain``) and, as a
feature extractor trained on real data, by the synthesis-quality metrics (no pretrained weights
can be downloaded here, so the project trains its own).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from monai.networks.nets import DenseNet121, ResNet
from torch import nn

ARCHS = ("resnet10", "resnet18", "densenet121")


@dataclass
class ClassifierConfig:
    arch: str = "resnet10"  # resnet10 | resnet18 (MONAI ResNet, basic blocks) | densenet121
    widths: list[int] = field(default_factory=lambda: [32, 64, 128, 256])  # ResNet stage widths
    num_classes: int = 2  # 2 -> one logit (binary); > 2 -> one logit per class
    dropout: float = 0.0
    max_pool: bool = True  # ResNet stem max-pool: 4x less compute; off keeps more resolution
    # ResNet normalisation: batch | instance. Under torchrun on CPU, BatchNorm cannot be
    # synchronised (no SyncBatchNorm on gloo); instance norm makes N processes equal to one
    norm: str = "batch"

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"classifier arch must be one of {ARCHS}, got {self.arch!r}")
        if len(self.widths) != 4 or any(w < 1 for w in self.widths):
            raise ValueError(f"widths must be 4 positive stage widths, got {self.widths}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.norm not in ("batch", "instance"):
            raise ValueError(f"classifier norm must be 'batch' or 'instance', got {self.norm!r}")
        if self.norm != "batch" and self.arch == "densenet121":
            raise ValueError("classifier norm applies to the ResNets; densenet121 uses batch norm")


def _batch_to_instance_norm(module: nn.Module) -> None:
    """Replace each BatchNorm2d in place by an affine InstanceNorm2d (same learnable scale and
    shift, statistics per image instead of per batch)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, nn.InstanceNorm2d(child.num_features, eps=child.eps, affine=True))
        else:
            _batch_to_instance_norm(child)


class CXRClassifier(nn.Module):
    """``x [B, 1, S, S]`` in ``[-1, 1]`` -> logits ``[B]`` (binary) or ``[B, C]``.

    :meth:`features` returns the pooled penultimate features ``[B, F]`` (the embedding used for
    Fréchet/kernel distances and precision/recall).
    """

    def __init__(self, cfg: ClassifierConfig) -> None:
        super().__init__()
        self.cfg = cfg
        out = 1 if cfg.num_classes == 2 else cfg.num_classes
        if cfg.arch == "densenet121":
            self.backbone = DenseNet121(
                spatial_dims=2, in_channels=1, out_channels=out, dropout_prob=cfg.dropout
            )
            # DenseNet121's class_layers = relu, pool, flatten, out: split off the last one
            self.head = self.backbone.class_layers.out
            self.backbone.class_layers.out = nn.Identity()
            self.feature_dim = self.head.in_features
        else:
            layers = [1, 1, 1, 1] if cfg.arch == "resnet10" else [2, 2, 2, 2]
            self.backbone = ResNet(
                block="basic",
                layers=layers,
                block_inplanes=list(cfg.widths),
                spatial_dims=2,
                n_input_channels=1,
                conv1_t_size=7,
                conv1_t_stride=2,
                no_max_pool=not cfg.max_pool,
                feed_forward=False,
            )
            if cfg.norm == "instance":
                # MONAI's ResNet blocks build BatchNorm whatever ``norm`` says: swap every one
                _batch_to_instance_norm(self.backbone)
            self.feature_dim = cfg.widths[-1]
            self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(self.feature_dim, out))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.features(x))
        return logits[:, 0] if logits.shape[1] == 1 else logits
