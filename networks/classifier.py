"""Chest-radiograph classifier from MONAI networks (1 channel in, one logit per class out).

Used by the downstream-gain experiment (``python -m pipeline.run classify`` / ``gain``) and, as a
feature extractor trained on real data, by the synthesis-quality metrics (no pretrained weights
can be downloaded here, so the project trains its own).
"""

from __future__ import annotations

import torch
from monai.networks.nets import DenseNet121, ResNet
from torch import nn

from networks.config import ClassifierConfig


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
