"""The values of a value study's plan (:mod:`pipeline.gain`): what identifies a computation (its
config key), the cells and items of the plan, and what each will cost.

A child's or generator's **key** is the SHA-256 of its keyed config: the stage config flattened,
less the keys that say where and how it runs (:data:`COSMETIC`) and the paths whose content is
keyed otherwise, plus what it depends on (the data's hash, the generator's and judge's keys). A
record holding the same key is the same computation (:meth:`Item.match`).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.infra import checkpoint as ckpt
from pipeline.infra import tracking
from pipeline.infra.arms import ARM_REGISTRY
from pipeline.infra.config import MISSING, diff_flat, flatten, old_spelling, tagged_keys, to_dict
from pipeline.infra.model_store import is_model_uri
from pipeline.infra.stage_configs import (
    EXECUTION,
    START,
    ClassifyConfig,
    TrainConfig,
)
from pipeline.infra.study_configs import GainConfig
from transforms.manifest import atomic_writer

# ------------------------------------------------------------------------------ what identifies a computation
# where and how a run executes, caches and logs, and how it was started: left out of a key (the
# kinds each config class declares in its RUNS tables, pipeline.infra.stage_configs)
COSMETIC = EXECUTION | {START}
# paths whose content is keyed otherwise (the source manifest's hash, fraction and seed; the
# generator's key; the judge's key), so a study continued from another folder keeps its keys
CHILD_PATH_KEYS = frozenset({"data.manifest", "synthetic", "filter_classifier"})  # (judge, gate.judge)
GENERATOR_PATH_KEYS = frozenset({"data.manifest", "gate.extractor"})  # keyed by the old spellings
# the study's own config: what the children are (not where the study writes, its budget, or the
# base classify values each child replaces)
STUDY_COSMETIC = frozenset(
    {
        f"classify.{k}"
        for k in (*tagged_keys(ClassifyConfig, COSMETIC), *CHILD_PATH_KEYS, "arm", "seed", "fraction")
    }
    | {"out_dir", "run_name", "records", "max_minutes", "experiment", "generator_dir", "executor"}
    # paths: what they hold is in the generators' keys (their train config, a given file's hash)
    | {"vaegan_config", "generators"}
)
STUDY_COSMETIC_PREFIXES = ("tracking.", "ray.")


def canonical(d: dict[str, Any]) -> dict[str, Any]:
    """JSON's view of a flat dict (tuples become lists, paths strings): how a record reads back."""
    return json.loads(json.dumps(d, sort_keys=True, default=str))


def keyed_config(cfg: Any, prefix: str, paths: frozenset[str] = frozenset()) -> dict[str, Any]:
    """A stage config (a dataclass instance), flattened with its keys as spelled before any
    rename (:func:`pipeline.infra.config.old_spelling`), less its cosmetic keys (:data:`COSMETIC`)
    and ``paths``, each key under ``prefix``."""
    flat = old_spelling(type(cfg), flatten(to_dict(cfg)))
    drop = tagged_keys(type(cfg), COSMETIC) | paths
    return canonical({f"{prefix}{k}": v for k, v in flat.items() if k not in drop})


def study_config(cfg: GainConfig) -> dict[str, Any]:
    return canonical(
        {
            k: v
            for k, v in old_spelling(GainConfig, flatten(to_dict(cfg))).items()
            if k not in STUDY_COSMETIC and not k.startswith(STUDY_COSMETIC_PREFIXES)
        }
    )


# what the code's defaults are, keyed like the records: an option added since a record was written
# is no change at its default
CHILD_DEFAULTS = keyed_config(ClassifyConfig(), "classify.", CHILD_PATH_KEYS)
GENERATOR_DEFAULTS = keyed_config(TrainConfig(), "generator.train.", GENERATOR_PATH_KEYS)


def config_key(flat: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a flat config."""
    text = json.dumps(canonical(flat), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def config_changes(
    old: dict[str, Any], new: dict[str, Any], defaults: dict[str, Any] | None = None
) -> list[str]:
    """``key: OLD -> NEW`` for every key that differs. A key the old record lacks whose new value
    is the code's default is no change: a config field added since, at the value that keeps the
    old behaviour (so committed records outlive new options)."""
    defaults = defaults or {}
    out = []
    for k, a, b in diff_flat(old, new):
        if a is MISSING:
            if k not in defaults or defaults[k] != b:
                out.append(f"{k}: (not recorded) -> {b!r}")
        elif b is MISSING:
            out.append(f"{k}: {a!r} -> (no such key now)")
        else:
            out.append(f"{k}: {a!r} -> {b!r}")
    return out


# ------------------------------------------------------------------------------ the study's values
@dataclass(frozen=True)
class Cell:
    """One classifier child: an arm trained on a fraction of the real data with a seed."""

    fraction: float
    seed: int
    arm: str

    @property
    def name(self) -> str:
        return f"{self.arm}-f{self.fraction:g}-s{self.seed}"

    @property
    def synthetic(self) -> bool:
        """Its arm draws synthetic images: it needs its subset's generator."""
        return ARM_REGISTRY[self.arm].synthetic

    @property
    def filtered(self) -> bool:
        """Its arm filters the synthetic images with its subset's real child (the judge)."""
        return ARM_REGISTRY[self.arm].filtered

    def real(self) -> Cell:
        """The same subset's real-only child: the judge of its generator and filter."""
        return Cell(self.fraction, self.seed, "real")


def generator_name(fraction: float, seed: int) -> str:
    return f"vaegan-f{fraction:g}" + ("" if fraction == 1.0 else f"-s{seed}")


@dataclass
class Item:
    """A child or a generator of the plan: its config, key, and whether a record says it is done."""

    kind: str  # "children" | "generators"
    name: str
    config: Any  # ClassifyConfig | TrainConfig
    keyed: dict[str, Any]
    steps: int  # optimiser steps it will train
    record: dict[str, Any] | None = None
    key: str = ""  # config_key(keyed), or the key of the record it was matched with

    def __post_init__(self) -> None:
        self.key = self.key or config_key(self.keyed)

    def match(self, rec: dict[str, Any] | None, defaults: dict[str, Any]) -> str | None:
        """Take ``rec`` as this item's record when it holds this computation: the same key, or a
        config that differs only by options added since at their defaults (the record's key is
        kept, so what depends on this item keeps its key too). Returns the changes otherwise."""
        if rec is None:
            return None
        diff = (
            []
            if rec.get("key") == self.key
            else config_changes(rec.get("config") or {}, self.keyed, defaults)
        )
        if diff:
            shown = diff[:8] + ([f"+{len(diff) - 8} more"] if len(diff) > 8 else [])
            return f"{self.kind[:-1]} {self.name}: " + "; ".join(shown)
        self.record, self.key = rec, rec["key"]
        return None


@dataclass
class CostModel:
    """Seconds an item will take: fitted on the recorded items (wall time against optimiser
    steps), else a prior measured on a 2-core AVX2 EPYC (docs/gain.md, "What the study costs")."""

    child_fit: dict[bool, tuple[float, float]] = field(default_factory=dict)  # synthetic? -> (a, b)
    generator_s_per_step: float = 0.45
    priors: dict[bool, tuple[float, float]] = field(
        default_factory=lambda: {False: (8.0, 0.12), True: (25.0, 0.16)}
    )

    @classmethod
    def from_records(cls, children: list[dict], generators: list[dict]) -> CostModel:
        model = cls()
        for syn in (False, True):
            pts = [
                (float(r["optimizer_steps"]), float(r["wall_s"]))
                for r in children
                if ARM_REGISTRY[r["arm"]].synthetic == syn and r.get("wall_s")
            ]
            steps = np.array([p[0] for p in pts])
            wall = np.array([p[1] for p in pts])
            if len(set(steps.tolist())) >= 2:
                b, a = np.polyfit(steps, wall, 1)
                model.child_fit[syn] = (max(float(a), 0.0), max(float(b), 1e-4))
            elif len(pts):
                model.child_fit[syn] = (0.0, float(wall.mean() / max(steps.mean(), 1)))
        rates = [g["wall_s"] / g["steps"] for g in generators if g.get("steps") and g.get("wall_s")]
        if rates:
            model.generator_s_per_step = float(np.mean(rates))
        return model

    def seconds(self, item: Item) -> float:
        if item.kind == "generators":
            return self.generator_s_per_step * item.steps
        syn = ARM_REGISTRY[item.name.split("-f")[0]].synthetic  # a child's name: ARM-fFRACTION-sSEED
        a, b = self.child_fit.get(syn) or self.child_fit.get(not syn) or self.priors[syn]
        return a + b * item.steps


def duration(s: float) -> str:
    s = int(round(s))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


# ------------------------------------------------------------------------------ what a record holds
def scores_entry(path: str | Path, root: Path) -> dict[str, Any]:
    """Per-image scores of a child on one split, for its record: image ids relative to the data
    (no absolute path), their digest (what pairing compares), labels and scores."""
    df = pd.read_csv(path)
    ids = [_relative(p, root) for p in df["path"]]
    return {
        "images_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
        "n": len(ids),
        "labels": [int(v) for v in df["label"]],
        "scores": [round(float(v), 7) for v in df["score"]],
    }


def child_record(
    cell: Cell, item: Item, res: dict, wall: float, gname: str | None, root: Path, parent_id: str | None
) -> dict[str, Any]:
    """The record of a trained child: its key and keyed config, metrics, steps, wall time, run ids
    and per-image scores on each test split (``res``: what classify returned; ``root``: the data's)."""
    scores = {item.config.test_split: scores_entry(res["scores"], root)}
    for split, path in (res.get("extra_scores") or {}).items():
        scores[split] = scores_entry(path, root)
    m = res["metrics"]
    return {
        "key": item.key,
        "config": item.keyed,
        "fraction": cell.fraction,
        "seed": cell.seed,
        "arm": cell.arm,
        "generator": gname,
        "test_split": item.config.test_split,
        "metrics": _finite(m),
        "optimizer_steps": int(m.get("optimizer_steps", 0)),
        "wall_s": round(wall, 1),
        "run_id": res["run_id"],
        "parent_run_id": parent_id,
        "scores": scores,
        "code_version": tracking.git_commit(),
    }


def generator_record(
    judge: Cell, item: Item, res: dict, wall: float, parent_id: str | None
) -> dict[str, Any]:
    """The record of a trained generator (``judge``: the real child of its subset; ``res``: what
    train returned, or a finished generator's marker's result)."""
    gate = res.get("gate") or {}
    return {
        "key": item.key,
        "config": item.keyed,
        "fraction": judge.fraction,
        "seed": judge.seed,
        "steps": int(res.get("steps") or item.steps),
        "epochs": item.config.epochs,
        "wall_s": round(float(wall), 1),
        "run_id": res.get("run_id"),
        "parent_run_id": parent_id,
        "gate": {
            "checks": gate.get("checks", []),
            "best": _finite(gate.get("best") or {}),
            "kept": "best.pt" if gate.get("best_checkpoint") else "last.pt",
        },
        "code_version": tracking.git_commit(),
    }


def keep_grid(run_dir: Path, rec: dict[str, Any], dest: Path) -> Path | None:
    """The prior-sample grid of a generator's kept epoch (``best.pt``'s, else the last) copied
    beside the study's records, where its results page shows it (records hold no weights; a grid
    is ~250 kB). None when the run left none; never raises (a picture is not worth a study)."""
    kept = (rec.get("gate") or {}).get("kept") == "best.pt"
    epoch = int(((rec.get("gate") or {}).get("best") or {}).get("epoch") or 0) if kept else int(rec["epochs"])
    src = run_dir / "grids" / f"samples_epoch{epoch:03d}.png"
    try:
        if not src.is_file():
            return None
        dest.parent.mkdir(parents=True, exist_ok=True)
        with atomic_writer(dest, binary=True, fsync=False) as f:
            f.write(src.read_bytes())
        return dest
    except OSError as e:
        print(f"gain: the sample grid of {run_dir.name} was not kept ({e})", flush=True)
        return None


def _finite(d: dict[str, Any]) -> dict[str, Any]:
    """``d`` with its non-finite floats as None (JSON has no NaN)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def _relative(path: str, root: Path) -> str:
    p = Path(path).resolve()
    try:
        return str(p.relative_to(root))
    except ValueError:
        return p.name


def read_done(path: Path) -> dict[str, Any] | None:
    """A finished generator's marker: its key, wall time and train result (None: not finished)."""
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except ValueError:  # a marker written before keys were kept: finished, key unknown
        return {}
    return state if isinstance(state, dict) else {}


def generator_problem(path: str, image_size: int) -> str | None:
    """Why ``path`` (a given generator: checkpoint, manifest or model URI) cannot feed the synthetic arms."""

    if is_model_uri(path) and not Path(path).exists():
        if path.startswith("models:") and not (path.startswith("models:/") and path.count("/") >= 2):
            return "expected models:/NAME/VERSION, models:/NAME/STAGE or models:/NAME@ALIAS"
        return None
    p = Path(path)
    if not p.is_file():
        return f"{p} does not exist" + (" (a folder)" if p.is_dir() else "")
    if p.suffix == ".csv":
        return None
    try:
        payload = ckpt.load_checkpoint(p)
    except ckpt.CheckpointError as e:
        return str(e)
    if "decoder" not in (payload.get("models") or {}):
        return f"{p} holds no generator (no decoder weights): a VAE-GAN checkpoint from the train stage?"
    conf = payload.get("config") or {}
    size = (conf.get("model") or {}).get("image_size") or (conf.get("data") or {}).get("image_size")
    if size and int(size) != image_size:
        return f"{p} makes {size} px images but classify.data.image_size={image_size}"
    return None
