"""The networks' settings, importable without torch or MONAI.

:class:`ModelConfig` (the VAE-GAN, :mod:`networks.vaegan`) and :class:`ClassifierConfig` (the
classifier, :mod:`networks.classifier`) are plain dataclasses validated in ``__post_init__``, so a
stage's config is checked (and ``--help`` printed) before any network code is loaded. Both are
re-exported by the modules that build the networks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

HEADS = ("deconv", "subpixel")  # the VAE-GAN decoder's output heads
PRIORS = ("fitted", "normal")  # ModelConfig.prior, generate's prior= (networks.prior)
DIFFAUG_POLICIES = ("color", "translation", "cutout")  # LossConfig.diffaug (networks.diffaug)


def diffaug_policy(text: str) -> tuple[str, ...]:
    """``"color,translation"`` -> ``("color", "translation")``; ``""`` -> ``()``. Refuses names
    outside :data:`DIFFAUG_POLICIES` (LossConfig checks its ``diffaug`` with it)."""
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in parts if p not in DIFFAUG_POLICIES]
    if bad:
        raise ValueError(
            f"loss.diffaug: {bad} unknown; use a comma-separated subset of {DIFFAUG_POLICIES} or ''"
        )
    return parts


ARCHS = ("resnet10", "resnet18", "densenet121")  # the classifier's architectures


@dataclass
class ModelConfig:
    """Network settings (the ``model`` section of the train config)."""

    kind: str = "vaegan"  # vaegan | vae (same encoder/decoder, no discriminator: the ablation)
    image_size: int = 0  # 0: taken from data.image_size
    latent_dim: int = 128
    base_channels: int = 32
    max_channels: int = 256
    num_classes: int = 0  # > 0 conditions encoder and decoder on the label (2 for normal/pneumonia)
    embed_dim: int = 16
    disc_channels: int = 16
    disc_layers: int = 0  # 0 = chosen from the image size
    disc_norm: str = "INSTANCE"
    # encoder/decoder normalisation: BATCH (default) | INSTANCE | NONE. On CPU under torchrun
    # BatchNorm cannot be synchronised across processes; INSTANCE makes N processes exactly
    # equivalent to one.
    norm: str = "BATCH"
    feature_layer: int = -1  # which discriminator feature map carries the reconstruction loss
    # how the decoder reaches full resolution: "deconv" (a last transposed conv to full size, then
    # a 3x3 conv to the image) or "subpixel" (one more 3x3 conv at half size, then a conv
    # predicting the 2x2 sub-pixels and PixelShuffle; Shi et al. 2016). Sub-pixel skips the two
    # full-resolution layers, which oneDNN runs at a fraction of its matmul rate: faster steps on
    # CPU. See docs/benchmarks.md for both the speed and what it does to sample quality.
    decoder_head: str = "deconv"
    # where generated codes come from: "fitted" (one Gaussian per class fitted to the training
    # set's posterior means at every epoch end, networks/prior.py; Ghosh et al. 2020) or "normal"
    # (N(0, I), the textbook VAE prior). Measured on the default job: class fidelity 0.87 vs 0.79
    # (docs/benchmarks.md)
    prior: str = "fitted"
    # > 0 (e.g. 0.999): keep an exponential moving average of the encoder's and decoder's weights
    # and use it for grids, validation, the fitted prior, the exported generator and evaluation
    # (networks/ema.py); 0: off, the last step's weights
    ema_decay: float = 0.0
    # class conditioning of the discriminator: "none" (only encoder and decoder see the label) or
    # "projection" (Miyato & Koyama 2018; needs num_classes > 0; networks.vaegan.Discriminator)
    disc_conditioning: str = "none"

    # value ranges the config loader enforces (pipeline.infra.config.declared_ranges): sizes and
    # counts at least 1 and far beyond any network this project builds, never a 10^9 allocation
    RANGES: ClassVar[dict[str, str]] = {
        "latent_dim": "[1, 4096]",
        "base_channels": "[1, 4096]",
        "max_channels": "[1, 8192]",
        "num_classes": "[0, 1000]",  # 0: unconditioned
        "embed_dim": "[1, 4096]",
        "disc_channels": "[1, 4096]",
        "disc_layers": "[0, 16]",  # 0: chosen from the image size
        "feature_layer": "[-32, 31]",  # an index into the feature maps (from the end when negative)
    }

    def __post_init__(self) -> None:
        if self.kind not in ("vaegan", "vae"):
            raise ValueError(f"model.kind must be 'vaegan' or 'vae', got {self.kind!r}")
        if self.decoder_head not in HEADS:
            raise ValueError(f"model.decoder_head must be one of {HEADS}, got {self.decoder_head!r}")
        if self.prior not in PRIORS:
            raise ValueError(f"model.prior must be one of {PRIORS}, got {self.prior!r}")
        if self.disc_conditioning not in ("none", "projection"):
            raise ValueError(
                f"model.disc_conditioning must be 'none' or 'projection', got {self.disc_conditioning!r}"
            )
        if self.disc_conditioning == "projection" and self.num_classes < 1:
            raise ValueError(
                "model.disc_conditioning=projection needs model.num_classes > 0 (labels to project)"
            )
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"model.ema_decay must be in [0, 1) (0: off), got {self.ema_decay}")


@dataclass
class LossConfig:
    """Weights of the VAE-GAN objective's terms (the ``loss`` section of the train config;
    :mod:`networks.objective`)."""

    # on the per-pixel KL (networks.losses.kl_divergence); with the mean L1 this is a Laplace
    # likelihood of scale kl_weight (in [-1, 1] units): 1.0 collapses the posterior, 0.05 does not
    kl_weight: float = 0.05
    gamma: float = 1.0  # decoder weight of the reconstruction terms against the adversarial term
    pixel_l1: float = 1.0  # pixel L1 added to the feature reconstruction (0: Larsen's pure Dis_l)
    adversarial: float = 0.1  # decoder weight of the adversarial term
    feature: float = 1.0  # weight of the feature-wise reconstruction term
    # DiffAugment of every discriminator input (real, reconstructed, prior; one draw shared by the
    # three): a comma-separated subset of color, translation, cutout; "" = off (networks.diffaug)
    diffaug: str = ""

    # value ranges the config loader enforces (pipeline.infra.config.declared_ranges): a negative
    # weight turns its term into one to maximise
    RANGES: ClassVar[dict[str, str]] = {
        "kl_weight": "[0, inf)",
        "gamma": "[0, inf)",
        "pixel_l1": "[0, inf)",
        "adversarial": "[0, inf)",
        "feature": "[0, inf)",
    }

    def __post_init__(self) -> None:
        diffaug_policy(self.diffaug)


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

    # value ranges the config loader enforces (pipeline.infra.config.declared_ranges)
    RANGES: ClassVar[dict[str, str]] = {"widths": "[1, 8192]", "num_classes": "[2, 1000]"}

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
