"""The arms of the augmentation study (``classify arm=``), one :class:`Arm` object each.

An arm declares what it trains on (:attr:`Arm.extra`: what joins the real training images), and
from that what it needs: a generator (``synthetic=``), a judge that filters the synthetic images
(``judge=``), ``ratio``, a pre-training phase, classical augmentation, and whether it
may itself judge synthetic images. :meth:`Arm.training_set` composes its training set from parts
the stage supplies (:class:`TrainingParts`), :meth:`Arm.check` refuses a config the arm cannot run
with. :data:`ARM_REGISTRY` holds them in the study's order; a new arm is one entry (and, for a new
kind of ``extra``, one branch of :meth:`Arm.training_set`). ``python -m pipeline.run classify``'s
module docstring (:mod:`pipeline.classify`) describes each arm.

Plain Python (no torch, MONAI or the project's stages): :mod:`pipeline.infra.stage_configs`
checks its configs with it before a stage's heavy imports.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

# what joins the real training images: nothing; ratio x synthetic images of the real labels; as
# many synthetic images as real ones *instead* of them; synthetic images of the minority class up to
# the majority's count; ratio x extra augmented draws of the real images (no generator)
EXTRAS = ("", "synthetic", "synthetic_instead", "synthetic_minority", "real_duplicates")


class TrainingParts(Protocol):
    """What an arm's training set is made of. The stage supplies it: the datasets and sources need
    torch and MONAI, which this module does not import."""

    labels: list[int]  # the real training images' labels, in the real dataset's order
    ratio: float  # extra images per real image

    def real(self, augment: bool) -> Any:
        """The real training set; ``augment``: with classical augmentation per image where the
        loader augments (not where whole batches are augmented on the device)."""

    def augmentation(self) -> Any:
        """The classical augmentation of one decoded image (real duplicates)."""

    def synthetic_augmentation(self) -> Any | None:
        """The classical augmentation of one synthetic image, or None where the loader does not
        augment (``data.augment`` off, or batches augmented on the device)."""

    def source(self, filtered: bool) -> Any:
        """The synthetic source (``synthetic=``); ``filtered``: keeping only the images the judge
        (``judge=``) calls their intended label."""

    def mix(self, real: Any, source: Any, **kw: Any) -> Any:
        """The real set plus synthetic items (``transforms.synthetic.SyntheticMixDataset``)."""

    def duplicates(self, real: Any, transform: Any) -> Any:
        """The real set plus augmented real draws (``transforms.synthetic.RealDuplicatesDataset``)."""


@dataclass(frozen=True)
class Arm:
    """One arm: its name, what joins its real images, and what it needs."""

    name: str
    extra: str = ""  # one of EXTRAS
    classical: bool = False  # the real (and synthetic) images get the classical augmentation
    filtered: bool = False  # synthetic images kept only when a real-only classifier confirms their label
    pretrain: bool = False  # the first half of the epochs on synthetic images only, then the real ones
    # it may judge synthetic images (a generator's validation gate, a filter, an evaluate extractor):
    # it has seen no generator's output
    judge: bool = False

    def __post_init__(self) -> None:
        if self.extra not in EXTRAS:
            raise ValueError(f"arm {self.name}: extra must be one of {EXTRAS}, got {self.extra!r}")
        if self.judge and self.synthetic:
            raise ValueError(f"arm {self.name}: an arm that sees synthetic images cannot judge them")
        if (self.filtered or self.pretrain) and not self.synthetic:
            raise ValueError(f"arm {self.name}: filtered and pretrain need synthetic images")

    @property
    def synthetic(self) -> bool:
        """Trains on a generator's images (needs ``synthetic=``; in gain, a generator per subset)."""
        return self.extra.startswith("synthetic")

    @property
    def uses_ratio(self) -> bool:
        """Adds ``ratio`` x as many images as the real ones."""
        return self.extra in ("synthetic", "real_duplicates")

    @property
    def augments(self) -> bool:
        """Adds synthetic images to a classifier that also learns from the real ones (synthetic
        images alone, the classification accuracy score, do not)."""
        return self.synthetic and (self.extra != "synthetic_instead" or self.pretrain)

    def check(self, synthetic: str, ratio: float, judge: str, epochs: int) -> None:
        """Refuse (ValueError) values of a classify config this arm cannot run with."""
        if self.synthetic and not synthetic:
            raise ValueError(
                f"arm={self.name} needs synthetic=<generator checkpoint | MLflow URI | manifest.csv>"
            )
        if ratio <= 0 and self.uses_ratio:
            raise ValueError(f"ratio must be > 0 for arm={self.name}, got {ratio}")
        if self.filtered and not judge:
            raise ValueError(f"arm={self.name} needs judge=<classifier.pt of a real-only arm>")
        if self.pretrain and epochs < 2:
            raise ValueError(
                f"arm={self.name} needs epochs >= 2 (half pre-training, half real), got {epochs}"
            )

    def training_set(self, parts: TrainingParts) -> tuple[Any, tuple[Any, Any]]:
        """The arm's training set: (dataset, (real dataset, per-image augmentation of the extra
        images or None)); ``pretrain`` arms train on the real dataset after the first half."""
        real = parts.real(self.classical)
        if self.extra == "real_duplicates":  # the synthetic arm's count-matched control
            tf = parts.augmentation()
            return parts.duplicates(real, tf), (real, tf)
        if not self.synthetic:
            return real, (real, None)
        source = parts.source(self.filtered)
        tf = parts.synthetic_augmentation() if self.classical else None
        if self.extra == "synthetic_instead":
            return parts.mix(real, source, include_real=False), (real, tf)
        if self.extra == "synthetic_minority":
            return parts.mix(real, source, syn_labels=minority_top_up(parts.labels)), (real, tf)
        return parts.mix(real, source, ratio=parts.ratio, transform=tf), (real, tf)


def minority_top_up(labels: Sequence[int]) -> list[int]:
    """The labels that bring the minority class (the lower label on a tie) to the majority's count."""
    counts = Counter(labels)
    minority = min(counts, key=lambda k: (counts[k], k))
    return [minority] * (max(counts.values()) - counts[minority])


ARM_REGISTRY: dict[str, Arm] = {
    a.name: a
    for a in (
        Arm("real", judge=True),
        Arm("classical", classical=True, judge=True),
        Arm("synthetic", extra="synthetic"),
        Arm("classical+synthetic", extra="synthetic", classical=True),
        Arm("synthetic_only", extra="synthetic_instead"),
        Arm("real_dup", extra="real_duplicates"),
        Arm("balanced_synthetic", extra="synthetic_minority"),
        Arm("synthetic_pretrain", extra="synthetic_instead", pretrain=True),
        Arm("synthetic_filtered", extra="synthetic", filtered=True),
    )
}
ARMS = tuple(ARM_REGISTRY)  # their names, in the study's order
# the arms whose classifier has seen only real images (classical augmentation transforms them), so
# it may judge synthetic ones
REAL_ONLY_ARMS = tuple(name for name, a in ARM_REGISTRY.items() if a.judge)
