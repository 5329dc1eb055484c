"""Patient-level sampling, stratified by label: the one sampler behind ingest's ``val`` carve
(:func:`pipeline.ingest.stage.carve_val_by_patient`) and the study's subsets and held-out splits
(:func:`pipeline.infra.data.sample_patients`).

Whole patients are drawn, never single images, so a patient's images stay on one side. Each
patient's stratum is their majority label (ties -> the lowest); strata are visited in label order,
each stratum's patients in sorted order, from one ``numpy`` generator seeded once per call.

The callers differ in two things, both kept because manifests already written depend on them:
how many patients a stratum gives (``count``: the caller's rounding rule), and how numpy draws
them (``draw``):

- ``"shuffle"``: shuffle the stratum, take its first ``count`` patients (ingest's val carve);
- ``"choice"``: ``Generator.choice`` without replacement (subsets and held-out splits).

The two draws consume the generator differently, so the same seed picks different patients:
changing either one would change every manifest (or every study subset) made with it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import pandas as pd

Draw = Literal["shuffle", "choice"]


def majority_labels(labels: pd.Series, patients: pd.Series) -> pd.Series:
    """Each patient's most frequent label (ties -> the lowest), indexed by patient in sorted order."""
    return labels.groupby(patients).agg(lambda s: int(s.mode().iloc[0]))


def draw_patients(
    labels: pd.Series, patients: pd.Series, count: Callable[[int], int], seed: int, draw: Draw
) -> set:
    """The patients drawn from each label stratum: ``count(n)`` of a stratum of ``n`` patients.

    ``labels`` and ``patients`` are aligned (one entry per image); the result holds patient ids."""
    per_patient = majority_labels(labels, patients)
    rng = np.random.default_rng(seed)
    chosen: set = set()
    for _, stratum in per_patient.groupby(per_patient):
        ids = sorted(stratum.index)
        k = count(len(ids))
        if draw == "shuffle":
            rng.shuffle(ids)
            chosen.update(ids[:k])
        else:
            chosen.update(rng.choice(ids, size=k, replace=False))
    return chosen
