"""``python -m pipeline.run gain [CONFIG.yaml] [key=value ...]``: does synthetic augmentation help?

A :class:`GainStudy` is a grid of :class:`Cell` values (real-data fraction x seed x arm), each a
classifier child of one MLflow parent run, plus one VAE-GAN per (fraction, seed) that feeds its
synthetic arms:

* with ``holdout_fraction`` > 0, a test set is first carved by patient from the training pool (the
  split ``holdout``: in distribution, unlike Kermany's shifted official test split); every child is
  scored on both;
* for each fraction f and seed s, a subset of the real train (and val) split is drawn by patient,
  stratified by label; the test splits are never reduced. The real child of (f, s) trains first:
  it is the judge of that subset's generator (validation gate, class fidelity) and of the
  synthetic_filtered arm;
* the generator of (f, s) is trained on that subset only, sized in optimiser steps
  (``generator_steps``; the gate keeps the epoch with the best validation FD among label-faithful
  ones as best.pt). At f = 1 every seed shares one generator (seeded with the first seed).

**Records** (:mod:`pipeline.infra.records`, ``records=``; default ``OUT/records``): each finished
child and generator writes a small JSON record (its config key, metrics, per-image test scores,
steps, wall time; no weights, no absolute paths) meant to be committed. A study continues from
them anywhere: a child or generator whose record holds the same key is done and is not trained
again; one whose recorded key differs refuses the whole study before anything trains, naming the
keys that changed. Weights live in ``OUT`` only: where a pending synthetic child needs a generator
(or a judge) that was recorded on another machine, it is trained again there.

**Budget**: with ``max_minutes``, the study stops before an item that its measured cost (from the
records, else a prior) says would not fit, prints what is done and what is left with an estimate
and exits with status 3 (:data:`pipeline.infra.config.EXIT_BUDGET`); the same command continues.
A kill (SIGTERM, SIGKILL) mid-item loses that item only. The records folder and ``OUT`` are
locked for the whole study: a second process on either is refused at once, naming the holder.

The table, the paired statistics and the plots come from the records alone
(:mod:`pipeline.infra.study_report`; ``python -m pipeline.run report`` renders docs from them).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.classify import ClassifyConfig, classify
from pipeline.evaluate import class_fidelity
from pipeline.gain_ray import run_on_ray
from pipeline.infra import checkpoint as ckpt
from pipeline.infra import distributed, tracking
from pipeline.infra.config import BudgetReached, ConfigError, flatten, from_dict, load_config, to_dict
from pipeline.infra.data import batches_per_epoch, carve_split, write_subset_manifest
from pipeline.infra.engine import check_writable, pick_device
from pipeline.infra.loaders import file_sha256, load_images
from pipeline.infra.locks import RunLock
from pipeline.infra.model_store import is_model_uri
from pipeline.infra.records import StudyRecords
from pipeline.infra.stage_configs import EXECUTION_KEYS, EXECUTION_PREFIXES, GainConfig
from pipeline.infra.study_report import child_rows, summarise, to_markdown
from pipeline.infra.viz import plot_gain
from pipeline.ingest import resolve_manifest
from pipeline.train import TrainConfig, train
from transforms.manifest import ManifestError, atomic_write_text, read_manifest, resolve_data_root

# ------------------------------------------------------------------------------ what identifies a computation
# where and how a run logs, how fast it goes, where it caches: left out of a key
COSMETIC_KEYS = EXECUTION_KEYS | {"resume", "ckpt_every"}
COSMETIC_PREFIXES = EXECUTION_PREFIXES
# paths whose content is keyed otherwise (the source manifest's hash, fraction and seed; the
# generator's key; the judge's key), so a study continued from another folder keeps its keys
CHILD_PATH_KEYS = frozenset({"data.manifest", "synthetic", "filter_classifier"})
GENERATOR_PATH_KEYS = frozenset({"data.manifest", "gate.extractor"})
# the study's own config: what the children are (not where the study writes, its budget, or the
# base classify values each child replaces)
STUDY_COSMETIC = frozenset(
    {f"classify.{k}" for k in (*COSMETIC_KEYS, *CHILD_PATH_KEYS, "arm", "seed", "fraction")}
    | {"out_dir", "run_name", "records", "max_minutes", "experiment", "generator_dir", "executor"}
    # paths: what they hold is in the generators' keys (their train config, a given file's hash)
    | {"vaegan_config", "generators"}
)
STUDY_COSMETIC_PREFIXES = ("classify.tracking.", "ray.")
HOLDOUT = "holdout"  # the in-distribution test split carved from the training pool
FIDELITY_WARN = 0.7  # below this class-fidelity AUROC a generator's labels are unreliable


def _canonical(d: dict[str, Any]) -> dict[str, Any]:
    """JSON's view of a flat dict (tuples become lists, paths strings): how a record reads back."""
    return json.loads(json.dumps(d, sort_keys=True, default=str))


def keyed_config(cfg: dict[str, Any], prefix: str, paths: frozenset[str] = frozenset()) -> dict[str, Any]:
    """A stage config dict, flattened, less its cosmetic and path keys, each key under ``prefix``."""
    return _canonical(
        {
            f"{prefix}{k}": v
            for k, v in flatten(cfg).items()
            if k not in COSMETIC_KEYS and k not in paths and not k.startswith(COSMETIC_PREFIXES)
        }
    )


def study_config(cfg: GainConfig) -> dict[str, Any]:
    return _canonical(
        {
            k: v
            for k, v in flatten(to_dict(cfg)).items()
            if k not in STUDY_COSMETIC and not k.startswith(STUDY_COSMETIC_PREFIXES)
        }
    )


# what the code's defaults are, keyed like the records: an option added since a record was written
# is no change at its default
CHILD_DEFAULTS = keyed_config(to_dict(ClassifyConfig()), "classify.", CHILD_PATH_KEYS)
GENERATOR_DEFAULTS = keyed_config(to_dict(TrainConfig()), "generator.train.", GENERATOR_PATH_KEYS)


def config_key(flat: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a flat config."""
    text = json.dumps(_canonical(flat), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def config_changes(
    old: dict[str, Any], new: dict[str, Any], defaults: dict[str, Any] | None = None
) -> list[str]:
    """``key: OLD -> NEW`` for every key that differs. A key the old record lacks whose new value
    is the code's default is no change: a config field added since, at the value that keeps the
    old behaviour (so committed records outlive new options)."""
    out = []
    defaults = defaults or {}
    for k in sorted(set(old) | set(new)):
        if k not in old:
            if k in defaults and defaults[k] == new[k]:
                continue
            out.append(f"{k}: (not recorded) -> {new[k]!r}")
        elif k not in new:
            out.append(f"{k}: {old[k]!r} -> (no such key now)")
        elif old[k] != new[k]:
            out.append(f"{k}: {old[k]!r} -> {new[k]!r}")
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
        return "synthetic" in self.arm

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
                if ("synthetic" in r["arm"]) == syn and r.get("wall_s")
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
        syn = "synthetic" in item.name.split("-f")[0]
        a, b = self.child_fit.get(syn) or self.child_fit.get(not syn) or self.priors[syn]
        return a + b * item.steps


def _duration(s: float) -> str:
    s = int(round(s))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


# ------------------------------------------------------------------------------ the study
class GainStudy:
    """The plan of a study (every cell's config and key, checked against the records before
    anything trains), its run (cells in order under a budget), and its table."""

    def __init__(self, cfg: GainConfig) -> None:
        self.cfg, self.base = cfg, copy.deepcopy(cfg.classify)
        self.out = Path(cfg.out_dir) / (cfg.run_name or "gain")
        self.records = StudyRecords(cfg.records or self.out / "records")
        self.dinfo = distributed.init()
        self.t0 = time.time()
        self.deadline = self.t0 + cfg.max_minutes * 60 if cfg.max_minutes > 0 else math.inf
        self.given = {float(g.partition("=")[0]): g.partition("=")[2] for g in cfg.generators}
        self.source: Path | None = None  # the manifest the user named
        self.manifest: Path | None = None  # the study's manifest (with the holdout split, if carved)
        self.children: dict[str, Item] = {}
        self.generators: dict[str, Item] = {}
        self.paths: dict[str, str] = {}  # generator name -> checkpoint this process can use
        self.cost = CostModel()
        self.client = None
        self.parent_id: str | None = None
        self.trained = 0
        self.val_images = None  # the study manifest's validation images, loaded when first needed
        # generator weights: OUT/generators, or a folder several studies share (generator_dir=),
        # e.g. recipe variants that differ only in how the children use the same generators
        self.gen_dir = Path(cfg.generator_dir) if cfg.generator_dir else self.out / "generators"

    # ---------------------------------------------------------------- cells and their files
    def cells(self) -> list[Cell]:
        """Every child, in the order they train: per fraction and seed, real first (the judge)."""
        arms = ["real", *(a for a in self.cfg.arms if a != "real")]
        return [Cell(f, s, a) for f in self.cfg.fractions for s in self.cfg.seeds for a in arms]

    def cell(self, name: str) -> Cell:
        return next(c for c in self.cells() if c.name == name)

    def subset(self, fraction: float, seed: int) -> Path:
        return self.manifest if fraction == 1.0 else self.out / "subsets" / f"f{fraction:g}_s{seed}.csv"

    def child_dir(self, cell: Cell) -> Path:
        return self.out / "children" / cell.name

    def generator_of(self, cell: Cell) -> str | None:
        if not cell.synthetic:
            return None
        if cell.fraction in self.given:
            return f"given-f{cell.fraction:g}"
        return generator_name(cell.fraction, self.cfg.seeds[0] if cell.fraction == 1.0 else cell.seed)

    def judge_cell(self, gname: str) -> Cell:
        """The real child whose classifier gates the generator ``gname`` (the first seed's at f = 1)."""
        fraction, _, seed = gname.removeprefix("vaegan-f").partition("-s")
        f = float(fraction)
        return Cell(f, int(seed) if seed else self.cfg.seeds[0], "real")

    # ---------------------------------------------------------------- planning
    def check_inputs(self) -> None:
        """Every input the study reads, checked before a run is created; one ConfigError lists
        every problem, each naming its key."""
        cfg, base, problems = self.cfg, self.base, []
        if base.data.manifest and not Path(base.data.manifest).is_file():
            problems.append(
                f"classify.data.manifest: {base.data.manifest} does not exist (run the ingest stage first)"
            )
        else:
            try:
                self.source = resolve_manifest(base.data)
                splits = set(read_manifest(self.source)[0]["split"])
            except ManifestError as e:
                problems.append(f"classify.data.manifest: {e}")
            else:
                for key, split in (
                    ("classify.data.train_split", base.data.train_split),
                    ("classify.data.val_split", base.data.val_split),
                    ("classify.test_split", base.test_split),
                ):
                    if split not in splits:
                        problems.append(
                            f"{key}={split!r}: {self.source} has no such split (it has {sorted(splits)})"
                        )
                if cfg.holdout_fraction > 0 and HOLDOUT in splits:
                    problems.append(f"holdout_fraction: {self.source} already has a split {HOLDOUT!r}")
        if any("synthetic" in a for a in cfg.arms):
            if cfg.vaegan_config and not Path(cfg.vaegan_config).is_file():
                problems.append(f"vaegan_config: {cfg.vaegan_config} does not exist")
            for entry in cfg.generators:
                why = _generator_problem(entry.partition("=")[2], base.data.image_size)
                if why:
                    problems.append(f"generators entry {entry!r}: {why}")
        if problems:
            raise ConfigError("gain: nothing was started:\n  " + "\n  ".join(problems))

    def prepare_data(self, write: bool = True) -> None:
        """The study's manifest (the holdout carved first) and each (fraction, seed) subset
        (``write=False``: only where they are, e.g. in a Ray worker of a prepared study)."""
        cfg = self.cfg
        self.manifest = self.source
        if cfg.holdout_fraction > 0:
            self.manifest = self.out / "study_manifest.csv"
            if write:
                carve_split(self.source, cfg.holdout_fraction, cfg.holdout_seed, HOLDOUT, self.manifest)
        for f in cfg.fractions:
            for s in cfg.seeds:
                if f != 1.0 and write:
                    write_subset_manifest(self.manifest, f, s, self.subset(f, s))

    def plan(self) -> None:
        """Every child's and generator's config (checked) and key, each matched with its record:
        a record with another key refuses the study here, before anything trains."""
        self.sha = file_sha256(self.source)
        self.data_key = {"source_manifest_sha256": self.sha}
        if self.cfg.holdout_fraction > 0:
            self.data_key["holdout"] = [self.cfg.holdout_fraction, self.cfg.holdout_seed]
        bad, self.changed = [], []
        changed = self.changed
        study = self.records.study()
        now = study_config(self.cfg)
        if study is not None and study.get("key") != config_key(now):
            # the study grew or changed (more seeds, another recipe): each item's own key decides
            # below whether its record still holds; the study's record is rewritten when it starts
            diff = config_changes(study["config"], now, study_config(GainConfig()))
            if diff and self.dinfo.is_main:
                print(
                    f"gain: the study's config changed since {self.records.folder / 'study.json'}: "
                    + "; ".join(diff[:8]),
                    flush=True,
                )
        for cell in self.cells():
            try:
                self._plan_cell(cell)
            except ConfigError as e:
                bad.append(str(e))
        if bad:
            raise ConfigError("gain: nothing was started:\n  " + "\n  ".join(bad))
        if changed:
            raise ConfigError(
                f"gain: the study recorded in {self.records.folder} was run with another config; nothing "
                "was trained.\n  "
                + "\n  ".join(changed)
                + "\nA recorded item is reused only with the config "
                "it was trained with: remove its record to retrain it with this config, or start a new "
                "study with another records= (and run_name=)."
            )
        self.refit_cost()

    def _plan_cell(self, cell: Cell) -> None:
        gname = self.generator_of(cell)
        if gname is not None and gname not in self.generators:
            self._plan_generator(gname)
        c = self.child_config(cell, gname)
        try:
            from_dict(ClassifyConfig, to_dict(c))  # the checks of ClassifyConfig.__post_init__
        except ConfigError as e:
            raise ConfigError(f"child {cell.name}: {e}") from None
        keyed = keyed_config(to_dict(c), "classify.", CHILD_PATH_KEYS)
        if not cell.synthetic:  # how synthetic images are drawn is no part of a real-only child
            keyed.pop("classify.synthetic_temperature", None)
        keyed.update({**self.data_key, "fraction": cell.fraction, "subset_seed": cell.seed})
        if gname is not None:
            keyed["generator_key"] = self.generators[gname].key
        if cell.arm == "synthetic_filtered":  # retrained when its judge, the real child, is
            keyed["judge_key"] = self.children[cell.real().name].key
        n_real = self._n_train(cell.fraction, cell.seed)
        steps = c.epochs * batches_per_epoch(n_real, c.data, self.dinfo)
        item = self.children[cell.name] = Item("children", cell.name, c, _canonical(keyed), steps)
        self._match(item, CHILD_DEFAULTS)

    def _plan_generator(self, gname: str) -> None:
        if gname.startswith("given-"):
            path = self.given[float(gname.removeprefix("given-f"))]
            local = not is_model_uri(path) or Path(path).exists()
            keyed = {"generator.path": path, "generator.sha256": file_sha256(path) if local else None}
            self.generators[gname] = Item("generators", gname, None, keyed, 0)
            self.paths[gname] = path
            return
        judge = self.judge_cell(gname)
        try:
            tcfg = self.generator_config(gname, judge)
        except ConfigError as e:
            raise ConfigError(f"vaegan_config / vaegan_overrides (generator {gname}): {e}") from None
        keyed = keyed_config(to_dict(tcfg), "generator.train.", GENERATOR_PATH_KEYS)
        keyed.update(
            {**{f"generator.{k}": v for k, v in self.data_key.items()}, "generator.fraction": judge.fraction}
        )
        if tcfg.gate.every:  # the gate's judge: the real child of its subset
            keyed["generator.judge_key"] = self.children[judge.name].key
        steps = tcfg.epochs * batches_per_epoch(
            self._n_train(judge.fraction, judge.seed), tcfg.data, self.dinfo
        )
        item = self.generators[gname] = Item("generators", gname, tcfg, _canonical(keyed), steps)
        self._match(item, GENERATOR_DEFAULTS)

    def _match(self, item: Item, defaults: dict[str, Any]) -> None:
        """The item's record, when there is one for this computation (else the changes are noted)."""
        why = item.match(self.records.read(item.kind, item.name), defaults)
        if why:
            self.changed.append(why)

    def _n_train(self, fraction: float, seed: int) -> int:
        df, _ = read_manifest(self.subset(fraction, seed), self.base.data.train_split)
        return len(df)

    def child_config(self, cell: Cell, gname: str | None) -> ClassifyConfig:
        c = copy.deepcopy(self.base)
        c.data.manifest = str(self.subset(cell.fraction, cell.seed))
        c.arm, c.seed, c.fraction = cell.arm, cell.seed, 1.0  # the subset manifest is the fraction
        c.synthetic = self.generator_path(gname) if gname else ""
        c.out_dir = str(self.out / "children")
        c.tracking.experiment = self.cfg.experiment
        c.tracking.run_name = cell.name
        c.tracking.parent_run_id = self.parent_id or ""
        if self.cfg.holdout_fraction > 0 and HOLDOUT not in c.extra_test_splits:
            c.extra_test_splits = [*c.extra_test_splits, HOLDOUT]
        if cell.arm == "synthetic_filtered":  # the same subset's real-only classifier judges the images
            c.filter_classifier = str(self.child_dir(cell.real()) / "classifier.pt")
        return c

    def generator_path(self, gname: str) -> str:
        """The checkpoint the synthetic arms load: the gate's best.pt when it kept one, else last.pt."""
        if gname in self.paths:
            return self.paths[gname]
        ckpts = self.gen_dir / gname / "checkpoints"
        return str(ckpts / "best.pt") if (ckpts / "best.pt").is_file() else str(ckpts / "last.pt")

    def generator_config(self, gname: str, judge: Cell) -> TrainConfig:
        """The VAE-GAN of a subset: the classifier's image size, sized in optimiser steps
        (``generator_steps``) with the validation gate judged by the subset's real child."""
        cfg = self.cfg
        overrides = [
            f"data.manifest={self.subset(judge.fraction, judge.seed)}",
            f"data.image_size={self.base.data.image_size}",  # the classifier's size
            "model.image_size=0",
            f"data.cache={self.base.data.cache}",
            f"data.cache_dir={self.base.data.cache_dir}",
            f"seed={judge.seed}",
            f"out_dir={self.gen_dir}",
            f"tracking.run_name={gname}",
            f"tracking.experiment={cfg.experiment}",
            f"tracking.uri={self.base.tracking.uri}",
            f"tracking.parent_run_id={self.parent_id or ''}",
            "tracking.register_model=''",
            *cfg.vaegan_overrides,
        ]
        tcfg = load_config(TrainConfig, cfg.vaegan_config or None, overrides)
        if cfg.generator_steps > 0:
            per_epoch = batches_per_epoch(self._n_train(judge.fraction, judge.seed), tcfg.data, self.dinfo)
            tcfg.epochs = max(1, math.ceil(cfg.generator_steps / per_epoch))
            if cfg.gate_checks > 0:
                tcfg.gate.every = max(1, tcfg.epochs // cfg.gate_checks)
                tcfg.gate.extractor = str(self.child_dir(judge) / "classifier.pt")
        return tcfg

    # ---------------------------------------------------------------- running
    def pending(self) -> list[Item]:
        return [i for i in (*self.generators.values(), *self.children.values()) if i.record is None]

    def eta(self) -> float:
        return sum(self.cost.seconds(i) for i in self.pending())

    def check_budget(self, item: Item, extra: float = 0.0) -> None:
        """Stop (BudgetReached) before ``item`` when its estimated cost does not fit the budget."""
        need = self.cost.seconds(item) + extra
        stop = self.dinfo.is_main and time.time() + need > self.deadline
        if not distributed.agree(stop, self.dinfo):
            return
        left = self.pending()
        done = len(self.children) + len(self.generators) - len(left)
        msg = (
            f"gain: stopped at the time budget (max_minutes={self.cfg.max_minutes:g}) before {item.name} "
            f"(~{_duration(need)}): {done} item(s) recorded in {self.records.folder}, {len(left)} left "
            f"(~{_duration(self.eta())} of this machine). Run the same command again to continue."
        )
        if need > self.cfg.max_minutes * 60:  # else every call would stop here, training nothing
            msg += (
                f" {item.name} alone needs more than the whole budget: give max_minutes >= {need / 60:.0f}."
            )
        raise BudgetReached(msg, done, len(left), self.eta())

    def run(self, train: bool = True) -> pd.DataFrame:
        """Every cell in order (a recorded one is skipped), then the class fidelity of each generator
        (``train=False``: nothing trains; what is recorded is scored and tabled)."""
        total = len(self.children)
        for k, cell in enumerate(self.cells(), 1):
            item = self.children[cell.name]
            if self.dinfo.is_main:
                what = "recorded, reused" if item.record else f"training; about {_duration(self.eta())} left"
                print(
                    f"gain: [{k}/{total}] arm={cell.arm} fraction={cell.fraction:g} seed={cell.seed}: {what}",
                    flush=True,
                )
            if item.record is None and train:
                self.train_child(cell, item)
            if cell.synthetic and (train or item.record is not None):
                self.score_generator(cell)
        return child_rows(self.records.all("children"), self.records.all("generators"), set(self.children))

    def ensure_judge(self, real: Cell) -> None:
        """The real child's weights in this folder (a child recorded elsewhere is trained again)."""
        if distributed.agree((self.child_dir(real) / "classifier.pt").is_file(), self.dinfo):
            return
        if self.dinfo.is_main:
            print(
                f"gain: {real.name} is recorded but its weights are not here (they are not committed): training it again as a judge",
                flush=True,
            )
        classify(self.child_config(real, None))

    def ensure_generator(self, gname: str) -> str:
        """A checkpoint of the generator ``gname`` (trained, resumed, reused from a shared
        ``generator_dir`` when its key matches, or trained again where only its record travelled);
        returns its path."""
        item = self.generators[gname]
        if gname.startswith("given-"):
            return self.paths[gname]
        state = _read_done(self.gen_dir / gname / "done") if self.dinfo.is_main else None
        own = self.gen_dir == self.out / "generators"
        # a marker without a key (written before markers held one) is trusted in the study's own
        # folder only: in a shared generator_dir it could be another study's generator
        foreign = bool(state is not None and state.get("key") != item.key and (state.get("key") or not own))
        if distributed.agree(foreign, self.dinfo):
            raise ConfigError(
                f"gain: {self.gen_dir / gname} holds the generator {gname} trained with another config "
                f"(key {str((state or {}).get('key'))[:12]}, this study's {item.key[:12]}): use another generator_dir="
            )
        if distributed.agree(Path(self.generator_path(gname)).is_file() and state is not None, self.dinfo):
            if item.record is None and self.dinfo.is_main:  # trained by a study sharing generator_dir
                self._record_generator(gname, item, state.get("result") or {}, state.get("wall_s", 0.0))
            return self.generator_path(gname)
        if item.config.gate.every:
            self.ensure_judge(self.judge_cell(gname))
        self.check_budget(item)
        tcfg = copy.deepcopy(item.config)
        tcfg.tracking.parent_run_id = self.parent_id or ""
        last = self.gen_dir / gname / "checkpoints" / "last.pt"
        if distributed.agree(last.is_file(), self.dinfo):
            tcfg.resume = str(last)  # an interrupted generator continues where it stopped
        if self.dinfo.is_main:
            again = " again (recorded elsewhere; weights are not committed)" if item.record else ""
            print(
                f"gain: training the generator {gname}{again} for {item.steps} steps on {tcfg.data.manifest}",
                flush=True,
            )
        t0 = time.time()
        res = train(tcfg)
        wall = time.time() - t0
        if self.dinfo.is_main:
            wall = max(wall, float(res.get("train_s") or 0.0))  # a resumed run's earlier part too
            keep = {"run_id": res["run_id"], "steps": res.get("steps"), "gate": res.get("gate") or {}}
            # the marker of a finished generator, with its key: a study sharing the folder checks it
            atomic_write_text(
                self.gen_dir / gname / "done",
                json.dumps({"key": item.key, "wall_s": wall, "result": keep}, default=str),
            )
            if item.record is None:
                self._record_generator(gname, item, keep, wall)
        return self.generator_path(gname)

    def _record_generator(self, gname: str, item: Item, res: dict, wall: float) -> None:
        judge = self.judge_cell(gname)
        gate = res.get("gate") or {}
        best = gate.get("best") or {}
        self.records.write(
            "generators",
            gname,
            {
                "key": item.key,
                "config": item.keyed,
                "fraction": judge.fraction,
                "seed": judge.seed,
                "steps": int(res.get("steps") or item.steps),
                "epochs": item.config.epochs,
                "wall_s": round(float(wall), 1),
                "run_id": res.get("run_id"),
                "parent_run_id": self.parent_id,
                "gate": {
                    "checks": gate.get("checks", []),
                    "best": {
                        k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                        for k, v in best.items()
                    },
                    "kept": "best.pt" if gate.get("best_checkpoint") else "last.pt",
                },
                "code_version": tracking.git_commit(),
            },
        )
        item.record = self.records.read("generators", gname)
        self.refit_cost()

    def refit_cost(self) -> None:
        """The cost model fitted on every item recorded so far."""
        self.cost = CostModel.from_records(
            [i.record for i in self.children.values() if i.record],
            [i.record for i in self.generators.values() if i.record],
        )

    def train_child(self, cell: Cell, item: Item) -> None:
        gname = self.generator_of(cell)
        extra = 0.0
        if gname is not None and not Path(self.generator_path(gname)).is_file():
            extra = self.cost.seconds(self.generators[gname])
        self.check_budget(item, extra)
        if gname is not None:
            self.ensure_generator(gname)
        if cell.arm == "synthetic_filtered":
            self.ensure_judge(cell.real())
        c = self.child_config(cell, gname)  # now with the parent run and the generator's checkpoint
        t0 = time.time()
        res = classify(c)
        wall = time.time() - t0
        self.trained += 1
        if not self.dinfo.is_main:
            return
        self.records.write("children", cell.name, self.child_record(cell, item, res, wall, gname))
        item.record = self.records.read("children", cell.name)
        if res["run_id"] and self.client is not None:  # None: the child's tracking is buffered in its outbox
            self.client.set_tag(
                res["run_id"], "fraction", f"{cell.fraction:g}"
            )  # the child sees its subset as 1.0
            self.client.set_tag(res["run_id"], "gain_key", item.key)
        self.refit_cost()

    def child_record(self, cell: Cell, item: Item, res: dict, wall: float, gname: str | None) -> dict:
        root = resolve_data_root(self.source).resolve()
        scores = {item.config.test_split: _scores(res["scores"], root)}
        for split, path in (res.get("extra_scores") or {}).items():
            scores[split] = _scores(path, root)
        m = res["metrics"]
        return {
            "key": item.key,
            "config": item.keyed,
            "fraction": cell.fraction,
            "seed": cell.seed,
            "arm": cell.arm,
            "generator": gname,
            "test_split": item.config.test_split,
            "metrics": {
                k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in m.items()
            },
            "optimizer_steps": int(m.get("optimizer_steps", 0)),
            "wall_s": round(wall, 1),
            "run_id": res["run_id"],
            "parent_run_id": self.parent_id,
            "scores": scores,
            "code_version": tracking.git_commit(),
        }

    def score_generator(self, cell: Cell) -> None:
        """Class fidelity of the cell's generator, judged by that seed's real-only classifier: a
        generator can lose its class conditioning with nothing odd in its losses, and its synthetic
        arms then measure wrong labels. Kept in the generator's record (per seed), computed once."""
        gname = self.generator_of(cell)
        if gname.startswith("given-"):
            if self.dinfo.is_main:
                self._given_fidelity(cell, gname)
            return
        item = self.generators[gname]
        real = self.children[cell.real().name]
        temp = self.base.synthetic_temperature
        done = ((item.record or {}).get("class_fidelity") or {}).get(str(cell.seed)) or {}
        fresh = (
            done.get("classifier_key") == real.key and done.get("temperature") == temp and "coverage" in done
        )
        # rank 0 decides from its records; every replica then takes the same branch (the
        # generator or the judge may have to be trained again, data-parallel)
        if not distributed.agree(self.dinfo.is_main and item.record is not None and not fresh, self.dinfo):
            return
        gen = self.ensure_generator(gname)
        self.ensure_judge(cell.real())
        if not self.dinfo.is_main:
            return
        if self.val_images is None:  # the whole validation split: the reference of FD and coverage
            self.val_images = load_images(self.manifest, self.base.data.val_split, self.base.data.image_size)[
                0
            ]
        fid = class_fidelity(
            gen,
            self.child_dir(cell.real()) / "classifier.pt",
            seed=cell.seed,
            device=pick_device(self.base.device),
            temperature=temp,
            real_images=self.val_images,
        )
        keys = (
            "auroc",
            "auroc_lo",
            "auroc_hi",
            "n",
            "fd",
            "precision",
            "recall",
            "density",
            "coverage",
            "n_real",
        )
        entry = {k: fid.get(k) for k in keys} | {"classifier_key": real.key, "temperature": temp}
        rec = dict(item.record)
        rec["class_fidelity"] = {**(rec.get("class_fidelity") or {}), str(cell.seed): entry}
        self.records.write("generators", gname, rec)
        item.record = self.records.read("generators", gname)
        _warn_fidelity(gname, cell, entry.get("auroc"))

    def _given_fidelity(self, cell: Cell, gname: str) -> None:
        path = self.out / "children" / f"generator-fidelity-{gname}-s{cell.seed}.json"
        if path.is_file():
            return
        clf = self.child_dir(cell.real()) / "classifier.pt"
        if not clf.is_file():
            return
        fid = class_fidelity(self.paths[gname], clf, seed=cell.seed, device=pick_device(self.base.device))
        path.write_text(json.dumps(fid, indent=1, default=str))
        _warn_fidelity(gname, cell, fid.get("auroc"))

    # ---------------------------------------------------------------- the parent run and the table
    def open_parent(self) -> None:
        """The MLflow run every child hangs under; a re-run in the same folder continues it."""
        import mlflow
        from mlflow.entities import Param

        check_writable(self.out)
        tcfg = copy.deepcopy(self.base.tracking)
        tcfg.experiment = self.cfg.experiment
        exp_id = tracking.setup(tcfg)
        self.client = client = mlflow.tracking.MlflowClient()
        state = self.out / "parent_run_id"
        if state.is_file():
            self.parent_id = state.read_text().strip()
            try:
                run = client.get_run(self.parent_id)
            except Exception as e:  # noqa: BLE001 - MlflowException, or a store that cannot be read
                raise ConfigError(
                    f"gain: {state} names the parent run {self.parent_id}, which the tracking store "
                    f"{tracking.resolve_uri(tcfg)} does not have ({type(e).__name__}): use the store the study "
                    "was started in (classify.tracking.uri), or another run_name= (the records carry the study)"
                ) from None
            if run.info.lifecycle_stage == "deleted":
                raise ConfigError(
                    f"gain: the parent run {self.parent_id} named in {state} was deleted: restore it, or use another run_name="
                )
            if run.info.status != "RUNNING":
                client.update_run(self.parent_id, status="RUNNING")
        else:
            now = study_config(self.cfg)
            parent = client.create_run(
                exp_id,
                run_name=self.cfg.run_name or f"gain-{time.strftime('%Y%m%d-%H%M%S')}",
                tags={
                    "stage": "gain",
                    "git_commit": tracking.git_commit(),
                    "data.manifest": str(self.source),
                    "gain_config_key": config_key(now),
                },
            )
            self.parent_id = parent.info.run_id
            try:
                params = [Param(k, str(v)[:500]) for k, v in flatten(to_dict(self.cfg)).items()]
                for i in range(0, len(params), 100):  # MLflow takes at most 100 params a call
                    client.log_batch(self.parent_id, params=params[i : i + 100])
                state.write_text(self.parent_id)
            except BaseException as e:
                self.end_parent(e)
                raise
        print(f"gain: parent MLflow run {self.parent_id} in experiment {self.cfg.experiment}", flush=True)

    def end_parent(self, exc: BaseException) -> None:
        """End the parent run FAILED (KILLED on Ctrl-C, SIGTERM or the budget); a tracking error
        here is printed, never raised over ``exc``."""
        if self.client is None or self.parent_id is None:
            return
        status = "KILLED" if isinstance(exc, (KeyboardInterrupt, BudgetReached)) else "FAILED"
        try:
            self.client.set_tag(self.parent_id, "gain.error", f"{type(exc).__name__}: {exc}"[:500])
            self.client.set_terminated(self.parent_id, status)
        except Exception as e:  # noqa: BLE001 - the study's own error is the one to raise
            print(
                f"gain: could not mark the parent run {self.parent_id} {status}: {e}",
                file=sys.stderr,
                flush=True,
            )
            return
        print(
            f"gain: parent run {self.parent_id} ended {status} ({type(exc).__name__}: {exc})",
            file=sys.stderr,
            flush=True,
        )

    def finish(self, rows: pd.DataFrame) -> dict[str, Any]:
        """The table, the plots and the metrics on the parent run (ended FINISHED)."""
        out, client, pid = self.out, self.client, self.parent_id
        table = summarise(rows)
        rows.drop(columns=["labels", "scores"]).to_csv(out / "gain_runs.csv", index=False)
        table.to_csv(out / "gain_table.csv", index=False)
        md = ""
        for split, t in table.groupby("split", sort=False):
            md += f"### {split}\n\n" + to_markdown(t) + "\n"
        (out / "gain_table.md").write_text(md)
        test = table[table["split"] == self.base.test_split]
        plots = [
            plot_gain(
                test,
                out / "gain.png",
                title=f"AUROC gain over real-only, paired ({len(self.cfg.seeds)} seeds)",
            )
        ]
        if "real_dup" in set(test["arm"]):
            plots.append(
                plot_gain(
                    test,
                    out / "gain_vs_real_dup.png",
                    title="AUROC gain over real_dup, paired",
                    ref="real_dup",
                )
            )
        for p in ("gain_runs.csv", "gain_table.csv", "gain_table.md", *(Path(p).name for p in plots)):
            client.log_artifact(pid, str(out / p), "gain")
        for r in table.itertuples():
            tag = "" if r.split == self.base.test_split else f"{r.split}/"
            if r.arm != "real" and np.isfinite(r.paired_delta):
                client.log_metric(pid, f"{tag}delta_auroc/{r.arm}/f{r.fraction:g}", float(r.paired_delta))
            client.log_metric(pid, f"{tag}auroc/{r.arm}/f{r.fraction:g}", float(r.auroc))
        client.set_terminated(pid, "FINISHED")
        print(md)
        print(f"gain: done in {time.time() - self.t0:.0f}s; table {out / 'gain_table.md'}, plot {plots[0]}")
        print(f"MLflow parent run id: {pid}")
        runs = (
            rows[rows["split"] == self.base.test_split]
            .drop(columns=["labels", "scores"])
            .reset_index(drop=True)
        )
        return {
            "parent_run_id": pid,
            "table": table,
            "runs": runs,
            "plot": str(plots[0]),
            "trained": self.trained,
        }


def _scores(path: str | Path, root: Path) -> dict[str, Any]:
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


def _relative(path: str, root: Path) -> str:
    p = Path(path).resolve()
    try:
        return str(p.relative_to(root))
    except ValueError:
        return p.name


def _read_done(path: Path) -> dict[str, Any] | None:
    """A finished generator's marker: its key, wall time and train result (None: not finished)."""
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except ValueError:  # a marker written before keys were kept: finished, key unknown
        return {}
    return state if isinstance(state, dict) else {}


def _warn_fidelity(gname: str, cell: Cell, auc: Any) -> None:
    if auc is not None and float(auc) < FIDELITY_WARN:
        print(
            f"gain: WARNING the generator {gname} has class fidelity {float(auc):.3f} (< {FIDELITY_WARN}) by "
            f"the seed-{cell.seed} judge: its labelled images are unreliable, so its synthetic arms test a "
            "generator that lost its labels",
            flush=True,
        )


def _generator_problem(path: str, image_size: int) -> str | None:
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


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (a batch job's end) ends the study like Ctrl-C: the parent run KILLED, the item in
    progress lost, every record kept."""

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def gain(cfg: GainConfig) -> dict[str, Any]:
    """Arms x fractions x seeds under one parent run, recorded, budgeted, resumable; the paired table."""
    study = GainStudy(cfg)
    # under torchrun (N processes) every child trains data-parallel; rank 0 alone writes files and
    # talks to MLflow, and broadcasts the decisions that depend on them
    main = study.dinfo.is_main
    locks = contextlib.ExitStack()
    err = None
    if main:
        try:
            study.check_inputs()
            locks.enter_context(RunLock(study.out, what="study folder", fix="wait for that study to end"))
            locks.enter_context(study.records.lock())
            study.prepare_data()
            study.plan()
        except Exception as e:  # raised below, on every rank
            err = e
            locks.close()
    msg = distributed.agree(None if err is None else f"{err}", study.dinfo)
    if err is not None:
        raise err
    if msg is not None:
        raise ConfigError(msg)
    with locks, _sigterm_as_interrupt():
        if not main:
            study.source, study.manifest = distributed.agree((None, None), study.dinfo)
            study.children, study.generators, study.cost = distributed.agree((None, None, None), study.dinfo)
        else:
            distributed.agree((study.source, study.manifest), study.dinfo)
            distributed.agree((study.children, study.generators, study.cost), study.dinfo)
            study.records.write_study({"key": config_key(study_config(cfg)), "config": study_config(cfg)})
            study.open_parent()
        study.parent_id = distributed.agree(study.parent_id, study.dinfo)
        try:
            failed = []
            if cfg.executor == "ray":  # the items as Ray tasks; then the records they wrote
                if study.dinfo.enabled:
                    raise ConfigError("executor=ray runs its own workers: start it without torchrun")
                failed = run_on_ray(study)
                study.changed = []
                for item in [*study.generators.values(), *study.children.values()]:
                    if item.record is None:  # what a task wrote must be this study's computation
                        study._match(
                            item, GENERATOR_DEFAULTS if item.kind == "generators" else CHILD_DEFAULTS
                        )
                if study.changed:
                    raise ConfigError(
                        "gain: a Ray task recorded another config:\n  " + "\n  ".join(study.changed)
                    )
            rows = study.run(train=cfg.executor == "local")
            if failed and rows.empty:
                raise RuntimeError(f"gain: every item failed after its retries: {', '.join(failed)}")
            res = study.finish(rows) if main else {"parent_run_id": study.parent_id}
            if failed:
                raise RuntimeError(
                    f"gain: {len(failed)} item(s) failed after their retries (the rest is recorded and "
                    f"tabled; the same command retries them): {', '.join(failed)}"
                )
            # the replicas leave together: one that tore its process group down while rank 0 still
            # scored a generator aborted the job (gloo)
            distributed.barrier(study.dinfo)
            distributed.shutdown(study.dinfo)
            return res
        except BaseException as e:
            if main:
                study.end_parent(e)
                if isinstance(e, BudgetReached):
                    print(str(e), flush=True)
            raise
