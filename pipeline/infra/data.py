"""Datasets for a manifest split, with the preprocessed tensors cached.

``cache="memory"`` uses MONAI ``CacheDataset`` (decode + normalise + resize once, keep tensors in
RAM: the 5,840-image Kermany set at 64 px is under 100 MB); ``cache="disk"`` does the same and
also keeps each preprocessed image as a plain ``.npy`` file under ``cache_dir``
(:class:`transforms.cache.DiskCached`), so another process (the next child of a study, a resumed
study) decodes nothing again; ``cache="none"`` re-decodes every time (the reference the benchmark
compares against). Random augmentation runs after the cache boundary.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pandas as pd
import torch
from monai.data import CacheDataset, Dataset
from monai.transforms import Compose

from pipeline.infra.sampling import draw_patients
from pipeline.infra.stage_configs import (
    DataConfig,
)
from transforms.batch import BatchAugment
from transforms.cache import DiskCached
from transforms.manifest import (
    COLUMNS,
    MANIFEST_SPLITS,
    ManifestError,
    label_names,
    read_manifest,
    resolve_data_root,
    sidecar_path,
    write_manifest,
)
from transforms.presets import TransformConfig, deterministic_transforms, eval_transforms, train_transforms


class Manifest:
    """A manifest read once (:func:`transforms.manifest.read_manifest`: columns checked, paths
    kept inside the data root, ``abs_path`` added): a stage derives its splits, label names and
    subsets from these rows instead of parsing the file again for each."""

    def __init__(self, path: str | Path, df: pd.DataFrame | None = None) -> None:
        self.path = Path(path)
        self.df = read_manifest(self.path)[0] if df is None else df

    def records(self, split: str, limit: int = 0, labels: list[int] | None = None) -> list[dict]:
        """``[{"image": abs_path, "label": int}]`` of one split (the first ``limit`` rows when
        > 0; only rows with one of ``labels`` when given)."""
        if split not in MANIFEST_SPLITS:
            raise ManifestError(f"unknown split '{split}'; expected one of {MANIFEST_SPLITS}")
        df = self.df[self.df["split"] == split]
        if labels:
            df = df[df["label"].isin(labels)]
        if df.empty:
            raise ManifestError(
                f"{self.path}: split '{split}' has no images" + (f" with labels {labels}" if labels else "")
            )
        if limit > 0:
            df = df.iloc[:limit]
        return [{"image": p, "label": int(lab)} for p, lab in zip(df["abs_path"], df["label"], strict=True)]

    def label_names(self) -> dict[int, str]:
        return label_names(self.df)

    def subset(self, fraction: float, seed: int, out: str | Path | None) -> Manifest:
        """``fraction`` of the train and val patients (every other split kept whole), written to
        ``out`` as a manifest over the same data root when given (rank 0 writes; every replica
        draws the same rows); the subset's rows, as :meth:`read` would give them back."""
        df = self.df.drop(columns=["abs_path"])
        parts = [
            sample_patients(df[df["split"] == s], fraction, seed + i) for i, s in enumerate(("train", "val"))
        ]
        sub = pd.concat([*parts, df[~df["split"].isin(("train", "val"))]])
        if out is not None:
            counts = {s: int((sub["split"] == s).sum()) for s in sorted(set(sub["split"]))}
            meta = {
                "subset_of": str(self.path),
                "fraction": fraction,
                "fraction_seed": seed,
                "counts": counts,
            }
            _write_like(self.path, sub.copy(), out, **meta)
        return Manifest(out if out is not None else self.path, self.df.loc[sub.index])


def records(manifest: str | Path, split: str, limit: int = 0, labels: list[int] | None = None) -> list[dict]:
    """One split's records of a manifest file (:meth:`Manifest.records`)."""
    return Manifest(manifest).records(split, limit, labels)


def _cache_key(cfg: TransformConfig) -> str:
    # disk caches are keyed by every setting that changes the cached tensor
    key = f"{cfg.image_size}-{cfg.lower_percentile}-{cfg.upper_percentile}-{cfg.clahe}-{cfg.clahe_clip_limit}"
    return hashlib.sha1(key.encode()).hexdigest()[:12]


class UnreadableImagesError(ValueError):
    """Too many of a split's images cannot be read any more (changed or damaged after ingest)."""


# above this share of unreadable images a split is refused rather than trained on what is left
MAX_UNREADABLE = 0.5


def _decode_all(items: list[dict], head: Compose) -> tuple[list[dict], list[tuple[str, str]]]:
    """``head`` on every item (threads, as MONAI's cache fill); returns the decoded items and
    ``(file, reason)`` for each that could not be read."""
    from multiprocessing.pool import ThreadPool

    def one(it: dict) -> tuple[dict | None, str]:
        try:
            return head(dict(it)), ""
        except Exception as e:  # noqa: BLE001 - MONAI wraps the reader's error: report its cause
            cause = e.__cause__ or e
            return None, f"{type(cause).__name__}: {str(cause).splitlines()[0][:300] if str(cause) else ''}"

    with ThreadPool(max(1, min(8, os.cpu_count() or 1))) as pool:
        out = pool.map(one, items, chunksize=16)
    kept = [d for d, _ in out if d is not None]
    bad = [(str(it["image"]), why) for it, (d, why) in zip(items, out, strict=True) if d is None]
    return kept, bad


def build_dataset(
    items: list[dict], cfg: DataConfig, train: bool, cache: str | None = None, progress: bool = False
) -> Dataset:
    """MONAI dataset over manifest records; ``train`` adds augmentation after the cache boundary.

    With a cache (memory or disk), an image that can no longer be read (changed, damaged or removed
    after ingest) is skipped and reported: it is dropped from ``items`` itself, so a caller's list
    stays aligned with the dataset, and listed in the dataset's ``skipped`` as ``(file, reason)``.
    More than half of the images unreadable refuses the split (:class:`UnreadableImagesError`)."""
    tf = train_transforms(cfg) if train else eval_transforms(cfg)
    cache = cache or cfg.cache
    if cache == "none":
        return Dataset(items, tf)
    head = deterministic_transforms(cfg)
    tail = tf.transforms[len(head) :]
    if cache == "disk":  # the deterministic head is read from / written to disk
        head = [DiskCached(Compose(head), cfg.cache_dir, _cache_key(cfg))]
    decoded, bad = _decode_all(items, Compose(head))
    if bad:
        names = "; ".join(f"{f} ({why})" for f, why in bad[:5]) + (
            f"; +{len(bad) - 5} more" if len(bad) > 5 else ""
        )
        if len(bad) > MAX_UNREADABLE * len(items):
            raise UnreadableImagesError(
                f"{len(bad)} of {len(items)} images cannot be read any more: {names}. Re-run the ingest "
                "stage on the data (or restore the files)"
            )
        print(
            f"WARNING data: skipped {len(bad)} of {len(items)} images that cannot be read: {names}",
            flush=True,
        )
        unreadable = {f for f, _ in bad}
        items[:] = [it for it in items if str(it["image"]) not in unreadable]
    ds = CacheDataset(
        decoded, Compose(tail), cache_rate=1.0, num_workers=None, progress=progress, copy_cache=False
    )
    ds.skipped = bad
    return ds


def device_augment(cfg: DataConfig, device: torch.device):
    """A :class:`transforms.batch.BatchAugment` when the train augmentation runs on the device
    (``augment_on=device``, or ``auto`` on CUDA), else None (the loader augments)."""

    if not cfg.augment or cfg.augment_on == "loader" or (cfg.augment_on == "auto" and device.type != "cuda"):
        return None
    return BatchAugment(cfg)


def _drop_last(shuffle: bool, n: int, batch_size: int) -> bool:
    """A shuffled (training) loader drops a trailing partial batch, unless it is the only batch."""
    return shuffle and n > batch_size


def make_loader(
    ds: Dataset,
    cfg: DataConfig,
    shuffle: bool,
    generator: torch.Generator | None = None,
    sampler=None,
    batch_size: int | None = None,
):
    from monai.data import DataLoader

    return DataLoader(
        ds,
        batch_size=batch_size or cfg.batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=cfg.num_workers,
        generator=generator,
        drop_last=_drop_last(
            shuffle, len(sampler) if sampler is not None else len(ds), batch_size or cfg.batch_size
        ),
        persistent_workers=cfg.num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )


def make_train_loader(ds: Dataset, cfg: DataConfig, seed: int, dinfo):
    """The shuffled training loader, one replica's share under torchrun. Returns
    ``(loader, sampler, generator)``: call ``sampler.set_epoch(e)`` each epoch.

    One permutation per epoch (seed + epoch) is split across the replicas by
    ``DistributedSampler``, so N processes together see the same global batches as one; each
    takes ``batch_size / N`` of every batch.
    """
    from torch.utils.data.distributed import DistributedSampler

    gen = torch.Generator()
    sampler = DistributedSampler(
        ds, num_replicas=dinfo.world, rank=dinfo.rank, shuffle=True, seed=seed, drop_last=dinfo.enabled
    )
    loader = make_loader(
        ds, cfg, shuffle=True, generator=gen, sampler=sampler, batch_size=cfg.batch_size // dinfo.world
    )
    return loader, sampler, gen


def batches_per_epoch(n_items: int, cfg: DataConfig, dinfo) -> int:
    """How many batches :func:`make_train_loader` yields one replica per epoch over ``n_items``."""
    from torch.utils.data.distributed import DistributedSampler

    share = len(
        DistributedSampler(range(n_items), num_replicas=dinfo.world, rank=dinfo.rank, drop_last=dinfo.enabled)
    )
    bs = cfg.batch_size // dinfo.world
    return share // bs if _drop_last(True, share, bs) else -(-share // bs)


def sample_patients(df, fraction: float, seed: int):
    """Rows of ``fraction`` of the patients of ``df``, stratified by each patient's majority label.

    Whole patients are kept or dropped, so a fraction never splits a patient's images; at least one
    patient per label is kept.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if fraction == 1 or df.empty:
        return df
    pid = df["patient_id"].astype(str).where(df["patient_id"].astype(str) != "", df["path"].astype(str))
    keep = draw_patients(df["label"], pid, lambda n: max(1, int(round(fraction * n))), seed, "choice")
    return df[pid.isin(keep)]


def _write_like(manifest: str | Path, df, out: str | Path, **meta_update) -> Path:
    """``df`` (rows of ``manifest``) as a manifest at ``out`` pointing at the same data root."""
    import json

    side = sidecar_path(manifest)
    meta = json.loads(side.read_text()) if side.is_file() else {}
    meta.update(data_root_abs=str(resolve_data_root(manifest)), **meta_update)
    extra = tuple(c for c in df.columns if c not in COLUMNS)
    for c in COLUMNS:
        if c not in df.columns:
            df[c] = ""
    write_manifest(out, df, meta, extra=extra)
    return Path(out)


def write_subset_manifest(manifest: str | Path, fraction: float, seed: int, out: str | Path) -> Path:
    """A copy of ``manifest`` keeping ``fraction`` of the train and val patients (every other split,
    test and any held-out split, kept whole): :meth:`Manifest.subset`.

    The copy points at the same data root, so the images are not duplicated.
    """
    return Manifest(manifest).subset(fraction, seed, out).path


def carve_split(manifest: str | Path, fraction: float, seed: int, name: str, out: str | Path) -> Path:
    """A copy of ``manifest`` whose split ``name`` is ``fraction`` of the train patients (whole
    patients, stratified by label, :func:`sample_patients`), taken out of train: a held-out test
    set from the training distribution, carved before any subset is drawn."""
    df, _ = read_manifest(manifest)
    if name in set(df["split"]):
        raise ManifestError(f"{manifest} already has a split {name!r}: choose another name")
    df = df.drop(columns=["abs_path"])
    held = sample_patients(df[df["split"] == "train"], fraction, seed).index
    df.loc[held, "split"] = name
    counts = {s: int((df["split"] == s).sum()) for s in sorted(set(df["split"]))}
    return _write_like(
        manifest,
        df,
        out,
        carved_from=str(manifest),
        carved_split=name,
        carve_fraction=fraction,
        carve_seed=seed,
        counts=counts,
    )
