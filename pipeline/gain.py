"""``python -m pipeline.run gain [CONFIG.yaml] [key=value ...]``: does synthetic augmentation help?

A :class:`GainStudy` is a grid of :class:`~pipeline.infra.study_plan.Cell` values (real-data
fraction x seed x arm), each a classifier child of one MLflow parent run, plus one VAE-GAN per
(fraction, seed) that feeds its synthetic arms:

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
The keys, cells, items and cost model are :mod:`pipeline.infra.study_plan`'s; the parent run is
:mod:`pipeline.infra.study_parent`'s; what each arm needs, :mod:`pipeline.infra.arms`'.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.classify import ClassifyConfig, classify
from pipeline.gain_ray import run_on_ray
from pipeline.infra import distributed
from pipeline.infra.arms import ARM_REGISTRY
from pipeline.infra.config import BudgetReached, ConfigError, from_dict, load_config, to_dict
from pipeline.infra.data import batches_per_epoch, carve_split, write_subset_manifest
from pipeline.infra.engine import pick_device
from pipeline.infra.judge import Judge, generator_fidelity
from pipeline.infra.loaders import load_images
from pipeline.infra.locks import RunLock
from pipeline.infra.model_store import is_model_uri
from pipeline.infra.records import StudyRecords
from pipeline.infra.study_configs import GainConfig
from pipeline.infra.study_parent import end_parent, finish_parent, open_parent, sigterm_as_interrupt
from pipeline.infra.study_plan import (
    CHILD_DEFAULTS,
    CHILD_PATH_KEYS,
    GENERATOR_DEFAULTS,
    GENERATOR_PATH_KEYS,
    Cell,
    CostModel,
    Item,
    canonical,
    child_record,
    config_changes,
    config_key,
    duration,
    generator_name,
    generator_problem,
    generator_record,
    keep_grid,
    keyed_config,
    read_done,
    study_config,
)
from pipeline.infra.study_report import child_rows
from pipeline.infra.tracking import Tracker
from pipeline.ingest.default import resolve_manifest
from pipeline.train import TrainConfig, train
from transforms.io import file_sha256
from transforms.manifest import ManifestError, atomic_write_text, read_manifest, resolve_data_root

HOLDOUT = "holdout"  # the in-distribution test split carved from the training pool
FIDELITY_WARN = 0.7  # below this class-fidelity AUROC a generator's labels are unreliable


# ------------------------------------------------------------------------------ the study
class GainStudy:
    """The plan of a study (every cell's config and key, checked against the records before
    anything trains), its run (cells in order under a budget), and its table."""

    def __init__(self, cfg: GainConfig) -> None:
        self.cfg, self.base = cfg, copy.deepcopy(cfg.classify)
        # the study's store, unless its children name their own
        self.base.tracking.uri = self.base.tracking.uri or cfg.tracking.uri
        self.out = Path(cfg.out_dir) / (cfg.tracking.run_name or "gain")
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
        self.parent: Tracker | None = None  # the parent MLflow run (rank 0)
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
        if any(ARM_REGISTRY[a].synthetic for a in cfg.arms):
            if cfg.vaegan_config and not Path(cfg.vaegan_config).is_file():
                problems.append(f"vaegan_config: {cfg.vaegan_config} does not exist")
            for entry in cfg.generators:
                why = generator_problem(entry.partition("=")[2], base.data.image_size)
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
                "study with another records= (and tracking.run_name=)."
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
        keyed = keyed_config(c, "classify.", CHILD_PATH_KEYS)
        if not cell.synthetic:  # how synthetic images are drawn is no part of a real-only child
            keyed.pop("classify.synthetic_temperature", None)
        keyed.update({**self.data_key, "fraction": cell.fraction, "subset_seed": cell.seed})
        if gname is not None:
            keyed["generator_key"] = self.generators[gname].key
        if cell.filtered:  # retrained when its judge, the real child, is
            keyed["judge_key"] = self.children[cell.real().name].key
        n_real = self._n_train(cell.fraction, cell.seed)
        steps = c.epochs * batches_per_epoch(n_real, c.data, self.dinfo)
        item = self.children[cell.name] = Item("children", cell.name, c, canonical(keyed), steps)
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
        keyed = keyed_config(tcfg, "generator.train.", GENERATOR_PATH_KEYS)
        keyed.update(
            {**{f"generator.{k}": v for k, v in self.data_key.items()}, "generator.fraction": judge.fraction}
        )
        if tcfg.gate.every:  # the gate's judge: the real child of its subset
            keyed["generator.judge_key"] = self.children[judge.name].key
        steps = tcfg.epochs * batches_per_epoch(
            self._n_train(judge.fraction, judge.seed), tcfg.data, self.dinfo
        )
        item = self.generators[gname] = Item("generators", gname, tcfg, canonical(keyed), steps)
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
        c.tracking.experiment = self.cfg.tracking.experiment
        c.tracking.run_name = cell.name
        c.tracking.parent_run_id = self.parent_id or ""
        if self.cfg.holdout_fraction > 0 and HOLDOUT not in c.extra_test_splits:
            c.extra_test_splits = [*c.extra_test_splits, HOLDOUT]
        if cell.filtered:  # the same subset's real-only classifier judges the images
            c.judge = str(self.child_dir(cell.real()) / "classifier.pt")
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
            f"tracking.experiment={cfg.tracking.experiment}",
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
                tcfg.gate.judge = str(self.child_dir(judge) / "classifier.pt")
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
            f"(~{duration(need)}): {done} item(s) recorded in {self.records.folder}, {len(left)} left "
            f"(~{duration(self.eta())} of this machine). Run the same command again to continue."
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
                what = "recorded, reused" if item.record else f"training; about {duration(self.eta())} left"
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
        state = read_done(self.gen_dir / gname / "done") if self.dinfo.is_main else None
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
        rec = generator_record(self.judge_cell(gname), item, res, wall, self.parent_id)
        self.records.write("generators", gname, rec)
        item.record = self.records.read("generators", gname)
        keep_grid(self.gen_dir / gname, rec, self.records.folder / "grids" / f"{gname}.png")
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
        if cell.filtered:
            self.ensure_judge(cell.real())
        c = self.child_config(cell, gname)  # now with the parent run and the generator's checkpoint
        t0 = time.time()
        res = classify(c)
        wall = time.time() - t0
        self.trained += 1
        if not self.dinfo.is_main:
            return
        root = resolve_data_root(self.source).resolve()
        rec = child_record(cell, item, res, wall, gname, root, self.parent_id)
        self.records.write("children", cell.name, rec)
        item.record = self.records.read("children", cell.name)
        if res["run_id"] and self.parent is not None:  # None: the child's tracking is buffered in its outbox
            client = self.parent.client  # the child sees its subset as 1.0: its fraction is the study's
            client.set_tag(res["run_id"], "fraction", f"{cell.fraction:g}")
            client.set_tag(res["run_id"], "gain_key", item.key)
        self.refit_cost()

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
        judge = Judge.load(self.child_dir(cell.real()) / "classifier.pt", pick_device(self.base.device))
        fid = generator_fidelity(gen, judge, seed=cell.seed, temperature=temp, real_images=self.val_images)
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
        fid = generator_fidelity(
            self.paths[gname], Judge.load(clf, pick_device(self.base.device)), seed=cell.seed
        )
        path.write_text(json.dumps(fid, indent=1, default=str))
        _warn_fidelity(gname, cell, fid.get("auroc"))


def _warn_fidelity(gname: str, cell: Cell, auc: Any) -> None:
    if auc is not None and float(auc) < FIDELITY_WARN:
        print(
            f"gain: WARNING the generator {gname} has class fidelity {float(auc):.3f} (< {FIDELITY_WARN}) by "
            f"the seed-{cell.seed} judge: its labelled images are unreliable, so its synthetic arms test a "
            "generator that lost its labels",
            flush=True,
        )


def gain(cfg: GainConfig) -> dict[str, Any]:
    """Arms x fractions x seeds under one parent run, recorded, budgeted, resumable; the paired table."""
    study = GainStudy(cfg)
    # under torchrun (N processes) every child trains data-parallel; rank 0 alone writes files and
    # talks to MLflow, and broadcasts the decisions that depend on them
    main = study.dinfo.is_main
    with _planned(study), sigterm_as_interrupt():
        _share_plan(study)
        try:
            failed = _run_on_ray(study) if cfg.executor == "ray" else []
            rows = study.run(train=cfg.executor == "local")
            if failed and rows.empty:
                raise RuntimeError(f"gain: every item failed after its retries: {', '.join(failed)}")
            res = {"parent_run_id": study.parent_id}
            if main:
                res = finish_parent(study.parent, cfg, study.out, rows, study.t0)
                res["trained"] = study.trained
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
                end_parent(study.parent, e)
                if isinstance(e, BudgetReached):
                    print(str(e), flush=True)
            raise


def _planned(study: GainStudy) -> contextlib.ExitStack:
    """Rank 0 checks the inputs, locks the study folder and the records, writes the subsets and
    makes the plan; an error there is raised on every rank. Returns the locks, held."""
    locks = contextlib.ExitStack()
    err = None
    if study.dinfo.is_main:
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
    return locks


def _share_plan(study: GainStudy) -> None:
    """Rank 0's plan on every rank; rank 0 records the study's config and opens the parent run."""
    if not study.dinfo.is_main:
        study.source, study.manifest = distributed.agree((None, None), study.dinfo)
        study.children, study.generators, study.cost = distributed.agree((None, None, None), study.dinfo)
    else:
        distributed.agree((study.source, study.manifest), study.dinfo)
        distributed.agree((study.children, study.generators, study.cost), study.dinfo)
        now = study_config(study.cfg)
        study.records.write_study({"key": config_key(now), "config": now})
        study.parent = open_parent(study.cfg, study.out, study.base.tracking, study.source)
        study.parent_id = study.parent.run_id
    study.parent_id = distributed.agree(study.parent_id, study.dinfo)


def _run_on_ray(study: GainStudy) -> list[str]:
    """The items as Ray tasks, then the records they wrote matched; the names of the failed ones."""
    if study.dinfo.enabled:
        raise ConfigError("executor=ray runs its own workers: start it without torchrun")
    failed = run_on_ray(study)
    study.changed = []
    for item in [*study.generators.values(), *study.children.values()]:
        if item.record is None:  # what a task wrote must be this study's computation
            study._match(item, GENERATOR_DEFAULTS if item.kind == "generators" else CHILD_DEFAULTS)
    if study.changed:
        raise ConfigError("gain: a Ray task recorded another config:\n  " + "\n  ".join(study.changed))
    return failed
