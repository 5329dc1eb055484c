"""The judge of synthetic images: a classifier trained on real images only (a classify arm in
:data:`pipeline.infra.arms.REAL_ONLY_ARMS`), loaded with its provenance checked, and what it makes
of images.

Train's validation gate, evaluate, the gain study's check of each generator and classify's
``judge`` all ask one such classifier about synthetic images; they load it here
(:meth:`Judge.load`: refused when it may have seen synthetic or reference images), score images
here (:meth:`Judge.score`: penultimate features and P(positive), the one definition of both) and
measure class fidelity here (:func:`class_fidelity`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from networks.classifier import CXRClassifier
from pipeline.infra import quality
from pipeline.infra.arms import REAL_ONLY_ARMS
from pipeline.infra.loaders import (
    load_classifier,
    load_generator,
    resolve_labels,
    sample_images,
)
from pipeline.infra.metrics import bootstrap_ci
from transforms.io import file_sha256


def check_extractor(
    path: str | Path,
    payload: dict[str, Any],
    reference: str | Path | None = None,
    allow_foreign: bool = False,
) -> str:
    """Is the classifier checkpoint ``path`` (its loaded ``payload``) a fair judge of synthetic
    images? It must record its arm, that arm must be real-only (an extractor that has seen a
    generator's images scores them as real: class fidelity 1.000 for a 1-epoch generator), and,
    when ``reference`` is given, it must have been trained on that manifest (the same content,
    or the manifest its fraction subset was drawn from), so it has not seen the reference images.

    Returns "" when it is; otherwise raises ``ValueError`` naming the extractor, what it was
    trained on and the override, or with ``allow_foreign`` returns that reason."""

    config = payload.get("config") if isinstance(payload.get("config"), dict) else {}
    arms = {a for a in (payload.get("arm"), config.get("arm")) if a is not None}
    record = payload.get("train_manifest") if isinstance(payload.get("train_manifest"), dict) else None
    trained_on = f"arm={'/'.join(sorted(map(str, arms))) or 'unrecorded'}, manifest " + (
        f"{record.get('path')} (sha256 {str(record.get('sha256'))[:12]})" if record else "unrecorded"
    )
    reason = ""
    if not arms:
        reason = (
            f"extractor {path} records no training arm (a classifier checkpoint from before classify "
            "recorded its arm and training manifest), so it may have seen synthetic images"
        )
    elif not arms <= set(REAL_ONLY_ARMS):
        reason = (
            f"extractor {path} was trained with {trained_on}: an arm with synthetic images, so it has "
            f"seen a generator's output and cannot judge synthetic images (use one trained with arm "
            f"in {REAL_ONLY_ARMS})"
        )
    elif reference is not None and record is None:
        reason = (
            f"extractor {path} records no training manifest (a classifier checkpoint from before "
            f"classify recorded it; {trained_on}), so it cannot be checked against the reference "
            f"manifest {reference}"
        )
    elif reference is not None:
        if not Path(reference).is_file():
            raise FileNotFoundError(f"reference manifest {reference} does not exist")
        ref_sha = file_sha256(reference)
        if ref_sha not in (record.get("sha256"), record.get("source_sha256")):
            reason = (
                f"extractor {path} was trained with {trained_on}, not on the reference manifest "
                f"{reference} (sha256 {ref_sha[:12]}): it may have seen the reference images, or "
                "other ones than real images of this data set"
            )
    if not reason:
        return ""
    if allow_foreign:
        print(f"WARNING: allow_foreign_judge=true: {reason}", flush=True)
        return reason
    raise ValueError(f"{reason}; set allow_foreign_judge=true to use it anyway (the report will say so)")


class Scores(NamedTuple):
    """What a judge makes of ``N`` images."""

    features: torch.Tensor  # [N, F] float32 on the CPU: the space FD and precision/recall live in
    probs: np.ndarray  # [N] P(positive) (positive = class 1)


@dataclass
class Judge:
    """A loaded real-only classifier checkpoint (:meth:`load`) and what it was trained on."""

    model: CXRClassifier
    payload: dict[str, Any]  # the checkpoint as loaded (config, arm, train_manifest, threshold)
    path: str
    device: torch.device
    foreign: str = ""  # why it is no fair judge, when ``allow_foreign`` let it through; else ""

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        reference: str | Path | None = None,
        allow_foreign: bool = False,
    ) -> Judge:
        """The classifier checkpoint ``path`` (weights only) on ``device``, refused unless it is a
        fair judge: it records a real-only arm and, with ``reference`` (a manifest), was trained on
        that manifest (:func:`check_extractor`). ``allow_foreign`` lets a refused one through with
        a warning; :attr:`foreign` then says why it was refused."""
        model, payload = load_classifier(path, device)
        foreign = check_extractor(path, payload, reference, allow_foreign)
        return cls(model, payload, str(path), torch.device(device), foreign)

    @property
    def threshold(self) -> float:
        """The operating threshold on P(positive) that classify chose on its validation split."""
        return float(self.payload["threshold"])

    @property
    def image_size(self) -> int:
        """The image size (px) it was trained at."""
        return int(self.payload["config"]["data"]["image_size"])

    @property
    def arch(self) -> str:
        return str(self.payload["config"]["model"]["arch"])

    @property
    def arm(self) -> str:
        """classify's arm it was trained with ("unrecorded" for an old checkpoint)."""
        return str(self.payload.get("arm", self.payload["config"].get("arm", "unrecorded")))

    @property
    def train_manifest(self) -> str:
        """The manifest it was trained on ("unrecorded" for an old checkpoint)."""
        return str((self.payload.get("train_manifest") or {}).get("path", "unrecorded"))

    @cached_property
    def sha256(self) -> str:
        """The checkpoint file's SHA-256: two measurements compare only with the same judge."""
        return file_sha256(self.path)

    @torch.no_grad()
    def score(self, images: torch.Tensor, batch_size: int = 256) -> Scores:
        """Features and P(positive) of ``[N, 1, S, S]`` images in ``[-1, 1]``, ``batch_size`` at a time."""
        feats, probs = [], []
        for i in range(0, len(images), batch_size):
            f = self.model.features(images[i : i + batch_size].to(self.device))
            feats.append(f.float().cpu())
            probs.append(torch.sigmoid(self.model.head(f).float()[:, 0]).cpu())
        return Scores(torch.cat(feats), torch.cat(probs).numpy())

    def probs(self, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
        """``[N]`` P(positive) of ``images``."""
        return self.score(images, batch_size).probs

    def features(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """``[N, F]`` penultimate features of ``images`` (float32, CPU)."""
        return self.score(images, batch_size).features


def class_fidelity(
    judge: Judge,
    images: torch.Tensor | Scores,
    labels: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    real_images: torch.Tensor | None = None,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Do synthetic ``images`` show their intended ``labels`` (0/1)? The judge's AUROC on them
    (``auroc``) with a percentile-bootstrap interval (``auroc_lo``/``auroc_hi``, ``n_boot``
    resamples seeded by ``seed``; NaN with ``n_boot=0``) and ``n``. ``images`` may be what
    :meth:`Judge.score` already made of them.

    With ``real_images`` (e.g. the validation split), also the images' FD, precision, recall,
    density and coverage against them in the judge's feature space (``fd`` ... ``coverage``,
    ``n_real``). A judge let through with ``allow_foreign`` adds ``foreign_extractor`` (why).

    ~0.5 means the labels are ignored, below 0.5 that they are swapped: such a generator's
    "labelled" images would teach a classifier wrong labels.
    """
    scores = images if isinstance(images, Scores) else judge.score(images, batch_size)
    ci = bootstrap_ci(labels, scores.probs, 0.5, n_boot=n_boot, seed=seed)
    out: dict[str, Any] = {
        "auroc": ci["auroc"],
        "auroc_lo": ci["auroc_lo"],
        "auroc_hi": ci["auroc_hi"],
        "n": float(len(labels)),
    }
    if real_images is not None:
        f_real = judge.features(real_images, batch_size).double()
        out["fd"] = float(quality.frechet_distance(scores.features.double(), f_real))
        out.update(quality.prdc(f_real, scores.features.double()))
        out["n_real"] = float(len(real_images))
    if judge.foreign:
        out["foreign_extractor"] = judge.foreign
    return out


def generator_fidelity(
    generator: str | Path,
    judge: Judge,
    n: int = 1000,
    seed: int = 0,
    prior: str = "fitted",
    temperature: float = 1.0,
    real_images: torch.Tensor | None = None,
) -> dict[str, Any]:
    """:func:`class_fidelity` of a generator (a train checkpoint or an MLflow model URI, loaded on
    the judge's device): ``n`` of its images with balanced labels, drawn with ``seed`` from its
    fitted prior (``prior="normal"``, or a generator without one: N(0, I)), their spread scaled by
    ``temperature``; the bootstrap is seeded by ``seed`` too. Empty for a generator that is not
    conditioned on two classes."""
    loaded = load_generator(generator, judge.device)
    if loaded.num_classes != 2:
        return {}
    y = resolve_labels("balanced", n, loaded)
    fake = sample_images(loaded, y, seed, prior=prior, temperature=temperature)
    return class_fidelity(judge, fake, y, seed=seed, real_images=real_images)
