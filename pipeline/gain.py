"""``python -m pipeline.run gain [CONFIG.yaml] [key=value ...]``: does synthetic augmentation help?

Arms x real-training fractions x seeds, each a child MLflow run of one parent run:

* for each fraction f and seed s, a subset of the real train (and val) split is drawn by patient,
  stratified by label (``pipeline.infra.data.write_subset_manifest``); the test split is never reduced;
* the VAE-GAN that feeds the synthetic arms of (f, s) is trained on that subset only, so no real
  image outside it reaches the classifier through the generator. At f = 1 every seed has the same
  subset, so one generator (seeded with the first seed) serves all seeds (``generators=['1.0=PATH']``
  reuses one trained before);
* every arm is trained by the classify stage with the same seed, so arms can be paired by seed.

Output on the parent run: per fraction and arm, the mean AUROC difference to real-only over seeds
(paired by seed) with a 95 % t-interval, as a CSV, a Markdown table and a plot.

Every input (manifest and its splits, generator checkpoints or MLflow URIs, the VAE-GAN config and
overrides, each child's config) is checked before the parent run is created. The parent run ends
FINISHED, FAILED (any error) or KILLED (Ctrl-C).

Re-runs continue the study in ``out_dir/run_name``. Each finished child (classifier or generator)
records the SHA-256 of its resolved config in ``gain_key.json`` in its folder: the child's whole
config less where and how it logs (``COSMETIC_KEYS``), plus the content hash of the source manifest
and of a given generator checkpoint. A finished child is reused only when its recorded hash is the
new one. When any finished child, or the parent run's recorded gain config (``gain_config.json``),
differs, the whole study is refused before anything trains, with each child and the keys that
changed: another ``run_name`` (or ``out_dir``) starts a new study; removing a child's folder
retrains that child.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.classify import ClassifyConfig, classify
from pipeline.evaluate import class_fidelity
from pipeline.infra import checkpoint as ckpt
from pipeline.infra import distributed, tracking
from pipeline.infra.config import ConfigError, flatten, from_dict, load_config, to_dict
from pipeline.infra.data import write_subset_manifest
from pipeline.infra.engine import check_writable, pick_device
from pipeline.infra.loaders import file_sha256
from pipeline.infra.metrics import combine_seed_deltas, mean_ci, paired_auroc_deltas
from pipeline.infra.model_store import is_model_uri
from pipeline.infra.stage_configs import ARMS, DEFAULT_ARMS, EXECUTION_KEYS, EXECUTION_PREFIXES, GainConfig  # noqa: F401 - re-exported; they live in pipeline.infra.stage_configs
from pipeline.infra.viz import plot_gain
from pipeline.ingest import resolve_manifest
from pipeline.train import TrainConfig, train
from transforms.manifest import ManifestError, atomic_write_text, read_manifest

# ------------------------------------------------------------------------------ config keys
KEY_FILE = "gain_key.json"  # in each finished child's folder: the hash of its resolved config
PARENT_FILE = "gain_config.json"  # in the study folder: the parent run's gain config and its hash
# where and how a run logs, how fast it goes, where it caches: left out of a child's key (the
# folder a child lives in already fixes its out_dir and run name)
COSMETIC_KEYS = EXECUTION_KEYS | {"resume", "ckpt_every"}
COSMETIC_PREFIXES = EXECUTION_PREFIXES
# the parent's gain config: the base classify values the stage replaces in every child count for
# nothing, nor does how the children log (the tracking store is checked by finding the parent in it)
PARENT_COSMETIC_KEYS = frozenset(
    {f"classify.{k}" for k in COSMETIC_KEYS}
    | {f"classify.{k}" for k in ("arm", "seed", "fraction", "synthetic")}
)
PARENT_COSMETIC_PREFIXES = ("classify.tracking.",)


def _canonical(d: dict[str, Any]) -> dict[str, Any]:
    """JSON's view of a flat dict (tuples become lists, paths strings): how a record reads back."""
    return json.loads(json.dumps(d, sort_keys=True, default=str))


def keyed_config(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A stage config dict, flattened, less its cosmetic keys, each key under ``prefix``."""
    flat = flatten(cfg)
    return _canonical(
        {
            f"{prefix}{k}": v
            for k, v in flat.items()
            if k not in COSMETIC_KEYS and not k.startswith(COSMETIC_PREFIXES)
        }
    )


def parent_config(cfg: GainConfig) -> dict[str, Any]:
    flat = flatten(to_dict(cfg))
    return _canonical(
        {
            k: v
            for k, v in flat.items()
            if k not in PARENT_COSMETIC_KEYS and not k.startswith(PARENT_COSMETIC_PREFIXES)
        }
    )


def config_key(flat: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a flat config."""
    text = json.dumps(_canonical(flat), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def config_changes(
    old: dict[str, Any], new: dict[str, Any], defaults: dict[str, Any] | None = None
) -> list[str]:
    """``key: OLD -> NEW`` for every key that differs. A key the old record lacks whose new value is
    its default is no change: a config field added to the code since, at the value that keeps the
    old behaviour."""
    defaults = defaults or {}
    out = []
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


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_record(folder: Path, flat: dict[str, Any], parent_id: str | None, run_id: str | None) -> None:

    record = {"key": config_key(flat), "parent_run_id": parent_id, "run_id": run_id, "config": flat}
    atomic_write_text(folder / KEY_FILE, json.dumps(record, indent=1, sort_keys=True))


# ------------------------------------------------------------------------------ generators
def _given_generators(cfg: GainConfig) -> dict[float, str]:
    return {float(g.partition("=")[0]): g.partition("=")[2] for g in cfg.generators}


def _generator_seed(cfg: GainConfig, fraction: float, seed: int) -> int:
    """At fraction 1.0 every seed shares one generator, trained with the first seed."""
    return cfg.seeds[0] if fraction == 1.0 else seed


def _generator_name(fraction: float, seed: int) -> str:
    return f"vaegan-f{fraction:g}" + ("" if fraction == 1.0 else f"-s{seed}")


def _subset_path(manifest: Path, out: Path, fraction: float, seed: int) -> Path:
    return manifest if fraction == 1.0 else out / "subsets" / f"f{fraction:g}_s{seed}.csv"


def _generator_config(cfg: GainConfig, fraction: float, seed: int, sub: Path, out: Path, parent_id: str):
    """The TrainConfig of the (fraction, seed) VAE-GAN (``seed``: the generator's own seed)."""

    overrides = [
        f"data.manifest={sub}",
        # the generator must make images of the classifier's size
        f"data.image_size={cfg.classify.data.image_size}",
        "model.image_size=0",
        f"seed={seed}",
        f"out_dir={out / 'generators'}",
        f"tracking.run_name={_generator_name(fraction, seed)}",
        f"tracking.experiment={cfg.experiment}",
        f"tracking.uri={cfg.classify.tracking.uri}",
        f"tracking.parent_run_id={parent_id}",
        "tracking.register_model=''",
        *cfg.vaegan_overrides,
    ]
    return load_config(TrainConfig, cfg.vaegan_config or None, overrides)


def _generator_for(
    cfg: GainConfig,
    fraction: float,
    seed: int,
    manifest: Path,
    out: Path,
    parent_id: str,
    cache: dict,
    dinfo: distributed.DistInfo,
    plan: _Plan,
    progress: _Progress,
) -> str:
    """A generator checkpoint trained on exactly this subset (trained, resumed or reused)."""

    given = _given_generators(cfg)
    if fraction in given:
        return given[fraction]
    gseed = _generator_seed(cfg, fraction, seed)
    name = _generator_name(fraction, gseed)
    if name in cache:
        return cache[name]
    run_dir = out / "generators" / name
    last = run_dir / "checkpoints" / "last.pt"
    tcfg = _generator_config(
        cfg, fraction, gseed, _subset_path(manifest, out, fraction, seed), out, parent_id
    )
    # under torchrun every replica must take the same branch: rank 0 reads the files
    if distributed.agree((run_dir / "done").is_file() and last.is_file(), dinfo):
        if dinfo.is_main and name in plan.adopt:  # finished before keys were recorded: record it now
            _write_record(run_dir, plan.generators[name], parent_id, None)
        cache[name] = str(last)
        return cache[name]
    if distributed.agree(last.is_file(), dinfo):
        tcfg.resume = str(last)  # an interrupted generator continues where it stopped
    if dinfo.is_main:
        print(
            f"gain: training the generator {name} for fraction {fraction:g} on {tcfg.data.manifest}",
            flush=True,
        )
    t0 = time.time()
    res = train(tcfg)
    progress.generator_done(time.time() - t0)
    if dinfo.is_main:
        (run_dir / "done").write_text(str(res["run_id"]))
        _write_record(run_dir, plan.generators[name], parent_id, res["run_id"])
    cache[name] = res["checkpoint"]
    return cache[name]


def _child_config(
    cfg: GainConfig,
    base: ClassifyConfig,
    arm: str,
    fraction: float,
    seed: int,
    sub: Path | str,
    gen_path: str | None,
    out: Path,
    parent_id: str,
) -> ClassifyConfig:
    c = copy.deepcopy(base)
    c.data.manifest = str(sub)
    c.arm, c.seed, c.fraction = arm, seed, 1.0  # the subset manifest is the fraction
    c.synthetic = gen_path or ""
    c.out_dir = str(out / "children")
    c.tracking.experiment = cfg.experiment
    c.tracking.run_name = f"{arm}-f{fraction:g}-s{seed}"
    c.tracking.parent_run_id = parent_id
    if arm == "synthetic_filtered":  # the same subset's real-only classifier judges the images
        c.filter_classifier = str(out / "children" / f"real-f{fraction:g}-s{seed}" / "classifier.pt")
    return c


def _child_keyed(c: ClassifyConfig, manifest_sha: str, fraction: float, generator: dict | None) -> dict:
    """What a classifier child's result depends on: its config, the data, its generator's key."""
    flat = keyed_config(to_dict(c), "classify.")
    flat.update({"source_manifest_sha256": manifest_sha, "fraction": fraction})
    if generator is not None:
        flat.update(generator)
    return _canonical(flat)


# ------------------------------------------------------------------------------ before anything trains
@dataclass
class _Plan:
    """What rank 0 found before the parent run was created: the key of every child, what is
    already done, what will train."""

    parent_id: str | None  # the study's existing parent run (None: a new one will be created)
    generators: dict[str, dict] = field(default_factory=dict)  # generator name -> keyed config
    children: dict[str, dict] = field(default_factory=dict)  # child name -> keyed config
    to_train: list[str] = field(default_factory=list)  # children, in order
    generators_to_train: list[str] = field(default_factory=list)
    adopt: set[str] = field(default_factory=set)  # finished before keys were recorded (or other fields)


def _uri_problem(uri: str) -> str | None:
    """Why ``uri`` cannot be an MLflow model URI (None when it can)."""
    if uri.startswith("models:"):
        rest = uri[len("models:") :]
        body = rest.lstrip("/")
        name, sep, ver = body.partition("@") if "@" in body else body.partition("/")
        logged_model = body.startswith("m-") and "/" not in body  # MLflow 3: models:/MODEL_ID
        if not rest.startswith("/") or not (logged_model or (name and sep and ver and "/" not in ver)):
            return "expected models:/NAME/VERSION, models:/NAME/STAGE or models:/NAME@ALIAS"
    elif uri.startswith("runs:"):
        parts = uri[len("runs:") :].lstrip("/").split("/", 1)
        if not uri.startswith("runs:/") or len(parts) < 2 or not all(parts):
            return "expected runs:/RUN_ID/ARTIFACT_PATH"
    elif uri.startswith("file://"):
        if not Path(uri[len("file://") :]).exists():
            return f"{uri[len('file://') :]} does not exist"
    elif not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*://.+", uri):
        return "expected SCHEME://LOCATION"
    return None


def _generator_file_problem(path: str, image_size: int) -> str | None:
    """Why the local file ``path`` cannot feed the synthetic arms (None when it can)."""

    p = Path(path)
    if not p.is_file():
        return f"{p} does not exist" + (" (a folder)" if p.is_dir() else "")
    if p.suffix == ".csv":  # a generated manifest: its images are resized to the data's size
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


def _check_inputs(cfg: GainConfig, base: ClassifyConfig) -> Path:
    """Every input the study reads, checked before a run is created; returns the manifest.
    Raises one ConfigError listing every problem, each naming its key."""

    problems: list[str] = []
    manifest = None
    if base.data.manifest and not Path(base.data.manifest).is_file():
        problems.append(
            f"classify.data.manifest: {base.data.manifest} does not exist (run the ingest stage first)"
        )
    else:
        try:
            manifest = resolve_manifest(base.data)
            splits = set(read_manifest(manifest)[0]["split"])
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
                        f"{key}={split!r}: {manifest} has no such split (it has {sorted(splits)})"
                    )
    if any("synthetic" in a for a in cfg.arms):
        if cfg.vaegan_config and not Path(cfg.vaegan_config).is_file():
            problems.append(f"vaegan_config: {cfg.vaegan_config} does not exist")
        for entry in cfg.generators:
            path = entry.partition("=")[2]
            why = (
                _uri_problem(path)
                if is_model_uri(path) and not Path(path).exists()
                else _generator_file_problem(path, base.data.image_size)
            )
            if why:
                problems.append(f"generators entry {entry!r}: {why}")
    if problems:
        raise ConfigError("gain: nothing was started:\n  " + "\n  ".join(problems))
    return manifest


@dataclass
class _Audit:
    """What planning found: inputs that cannot work and finished runs recorded with another config."""

    plan: _Plan
    state_file: Path
    given: dict[float, str]  # fraction -> generator the user gave (gain's generators=)
    train_defaults: dict[str, Any]  # the generators' TrainConfig defaults, keyed like their records
    bad: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)

    def check_done(self, what: str, folder: Path, new: dict, legacy, defaults: dict) -> None:
        """Compare a finished child's record (or, recorded before keys existed, its checkpoint's
        config) with ``new``; note a difference or a record to (re)write."""
        plan = self.plan
        rec = _read_json(folder / KEY_FILE)
        if rec is not None and rec.get("key") == config_key(new):
            old = new
        elif rec is not None:
            old = rec.get("config") or {}
        else:
            try:
                old = {**new, **legacy()}  # what the checkpoint does not say is taken as unchanged
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: say so, refuse
                self.changed.append(
                    f"{what} ({folder}): finished, but no {KEY_FILE} records its config ({e})"
                )
                return
            print(
                f"gain: {what} was finished before config keys were recorded: checked against its checkpoint"
            )
        diff = config_changes(old, new, defaults)
        recorded_parent = (rec or {}).get("parent_run_id")
        if recorded_parent and recorded_parent != plan.parent_id:
            now = (
                f"{self.state_file} names {plan.parent_id}"
                if plan.parent_id
                else f"{self.state_file} is missing"
            )
            diff.append(f"logged under parent run {recorded_parent}, but {now}")
        if diff:
            shown = diff[:8] + ([f"+{len(diff) - 8} more"] if len(diff) > 8 else [])
            self.changed.append(f"{what} ({folder}): " + "; ".join(shown))
        elif rec is None or rec.get("key") != config_key(new):
            plan.adopt.add(folder.name)


def _plan(cfg: GainConfig, base: ClassifyConfig, manifest: Path, out: Path) -> _Plan:
    """Every child's config (checked) and key; finished children whose recorded key differs, or
    a parent whose recorded gain config differs, refuse the whole study here."""
    state_file = out / "parent_run_id"
    audit = _Audit(
        _Plan(parent_id=state_file.read_text().strip() if state_file.is_file() else None),
        state_file,
        _given_generators(cfg),
        keyed_config(to_dict(TrainConfig()), "generator.train."),
    )
    record = _read_json(out / PARENT_FILE)
    if audit.plan.parent_id and record is not None:
        diff = config_changes(record.get("config", {}), parent_config(cfg), parent_config(GainConfig()))
        if diff:
            audit.changed.append(
                f"parent run {audit.plan.parent_id} ({out / PARENT_FILE}): " + "; ".join(diff)
            )
    manifest_sha = file_sha256(manifest)
    gen_of = _plan_generators(cfg, audit, manifest, manifest_sha, out)
    _plan_children(cfg, base, audit, gen_of, manifest, manifest_sha, out)
    if audit.bad:
        raise ConfigError("gain: nothing was started:\n  " + "\n  ".join(audit.bad))
    if audit.changed:
        if audit.changed[0].startswith("parent run"):
            fix = (
                "The parent run's params must describe its children: to run this config, start a new "
                f"study with another run_name= (or out_dir=), or remove {out} to redo this one."
            )
        else:
            fix = (
                "A finished child is reused only with the config it was trained with: remove the folder "
                "of each child above to retrain it with this config, or start a new study with another "
                "run_name= (or out_dir=)."
            )
        raise ConfigError(
            f"gain: the study in {out} was run before with another config; nothing was trained.\n  "
            + "\n  ".join(audit.changed)
            + "\n"
            + fix
        )
    return audit.plan


def _plan_generators(
    cfg: GainConfig, audit: _Audit, manifest: Path, manifest_sha: str, out: Path
) -> dict[tuple[float, int], str]:
    """The generators of the synthetic arms, given or to train; returns (fraction, seed) -> name."""
    plan, given = audit.plan, audit.given
    gen_of: dict[tuple[float, int], str] = {}
    if not any("synthetic" in a for a in cfg.arms):
        return gen_of
    for fraction in cfg.fractions:
        for seed in cfg.seeds:
            if fraction in given:
                path = given[fraction]
                name = gen_of[(fraction, seed)] = f"given-f{fraction:g}"
                if name not in plan.generators:  # a local file is keyed by its content too
                    local = not is_model_uri(path) or Path(path).exists()
                    plan.generators[name] = {
                        "generator.path": path,
                        "generator.sha256": file_sha256(path) if local else None,
                    }
                continue
            gseed = _generator_seed(cfg, fraction, seed)
            name = gen_of[(fraction, seed)] = _generator_name(fraction, gseed)
            if name in plan.generators:
                continue
            sub = _subset_path(manifest, out, fraction, seed)
            try:
                tcfg = _generator_config(cfg, fraction, gseed, sub, out, "")
            except ConfigError as e:
                audit.bad.append(f"vaegan_config / vaegan_overrides (generator {name}): {e}")
                continue
            flat = keyed_config(to_dict(tcfg), "generator.train.")
            flat.update({"generator.source_manifest_sha256": manifest_sha, "generator.fraction": fraction})
            plan.generators[name] = _canonical(flat)
            run_dir = out / "generators" / name
            last = run_dir / "checkpoints" / "last.pt"
            if (run_dir / "done").is_file() and last.is_file():
                audit.check_done(
                    f"generator {name}",
                    run_dir,
                    plan.generators[name],
                    lambda last=last: keyed_config(ckpt.load_checkpoint(last)["config"], "generator.train."),
                    audit.train_defaults,
                )
            else:
                plan.generators_to_train.append(name)
    return gen_of


def _plan_children(
    cfg: GainConfig,
    base: ClassifyConfig,
    audit: _Audit,
    gen_of: dict[tuple[float, int], str],
    manifest: Path,
    manifest_sha: str,
    out: Path,
) -> None:
    """The classifier children: each one's checked config and key, to train or finished."""
    plan, given = audit.plan, audit.given
    child_defaults = {**keyed_config(to_dict(ClassifyConfig()), "classify."), **audit.train_defaults}
    for fraction in cfg.fractions:
        for seed in cfg.seeds:
            sub = _subset_path(manifest, out, fraction, seed)
            for arm in cfg.arms:
                gname = gen_of.get((fraction, seed)) if "synthetic" in arm else None
                if gname is not None and gname not in plan.generators:
                    continue  # its generator's config is broken: reported already
                gen_path = None
                if gname is not None:
                    gen_path = given.get(fraction) or str(
                        out / "generators" / gname / "checkpoints" / "last.pt"
                    )
                c = _child_config(cfg, base, arm, fraction, seed, sub, gen_path, out, "")
                name = c.tracking.run_name
                try:
                    from_dict(ClassifyConfig, to_dict(c))  # the checks of ClassifyConfig.__post_init__
                except ConfigError as e:
                    audit.bad.append(f"child {name}: {e}")
                    continue
                new = _child_keyed(c, manifest_sha, fraction, plan.generators[gname] if gname else None)
                if arm == "synthetic_filtered":  # retrained when its judge, the real child, is
                    judge = plan.children.get(f"real-f{fraction:g}-s{seed}")
                    if judge is None:
                        continue  # the real child's config is broken: reported above
                    new = _canonical({**new, "filter.real_child_key": config_key(judge)})
                plan.children[name] = new
                folder = out / "children" / name
                if (folder / "result.json").is_file():
                    audit.check_done(
                        f"child {name}",
                        folder,
                        new,
                        lambda folder=folder: keyed_config(
                            ckpt.load_checkpoint(folder / "classifier.pt")["config"], "classify."
                        ),
                        child_defaults,
                    )
                else:
                    plan.to_train.append(name)


# ------------------------------------------------------------------------------ progress
def _duration(s: float) -> str:
    s = int(round(s))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class _Progress:
    """``[k/N] arm=... fraction=... seed=...`` with the time left, from the mean duration of the
    children (and generators) trained so far in this process."""

    def __init__(self, total: int, to_train: int, generators_to_train: int, show: bool) -> None:
        self.total, self.k, self.show = total, 0, show
        self.to_train, self.generators_left = to_train, generators_to_train
        self.child_s: list[float] = []
        self.generator_s: list[float] = []

    def generator_done(self, seconds: float) -> None:
        self.generator_s.append(seconds)
        self.generators_left = max(self.generators_left - 1, 0)

    def child_done(self, seconds: float) -> None:
        self.child_s.append(seconds)

    def eta(self) -> str:
        left = self.to_train - len(self.child_s)  # the child about to train included
        if left <= 0 and not self.generators_left:
            return "nothing left to train"
        if not self.child_s:
            return f"time left unknown until a child finishes ({left} to train)"
        mean = sum(self.child_s) / len(self.child_s)
        total = mean * left
        note = f"{left} to train at ~{_duration(mean)} each"
        if self.generators_left and self.generator_s:
            gmean = sum(self.generator_s) / len(self.generator_s)
            total += gmean * self.generators_left
            note += f", {self.generators_left} generator(s) at ~{_duration(gmean)}"
        elif self.generators_left:
            note += f", plus {self.generators_left} generator(s) not timed yet"
        return f"about {_duration(total)} left ({note})"

    def child(self, arm: str, fraction: float, seed: int, reused: str | None) -> None:
        self.k += 1
        if self.show:
            what = f"done before, reused (run {reused})" if reused is not None else "training"
            print(
                f"gain: [{self.k}/{self.total}] arm={arm} fraction={fraction:g} seed={seed}: {what}; {self.eta()}",
                flush=True,
            )


def _run_children(
    cfg: GainConfig,
    base: ClassifyConfig,
    manifest: Path,
    out: Path,
    parent_id: str,
    dinfo: distributed.DistInfo,
    client,
    plan: _Plan,
) -> list[dict[str, Any]]:
    """Every (fraction, seed, arm) child in order, trained or picked up from an earlier run.

    Under torchrun every replica walks the same sequence (each child trains data-parallel);
    rank 0 alone writes subsets, reads finished results, tags runs and returns the rows, and the
    decisions that depend on its files are broadcast so that every replica takes the same branch.
    """

    gen_cache: dict = {}
    rows: list[dict[str, Any]] = []
    total = len(cfg.fractions) * len(cfg.seeds) * len(cfg.arms)
    progress = _Progress(total, len(plan.to_train), len(plan.generators_to_train), dinfo.is_main)
    for fraction in cfg.fractions:
        for seed in cfg.seeds:
            sub = _subset_path(manifest, out, fraction, seed)
            if fraction != 1.0 and dinfo.is_main:
                write_subset_manifest(manifest, fraction, seed, sub)
            distributed.barrier(dinfo)  # the replicas read the subset rank 0 wrote
            gen_path = None
            for arm in cfg.arms:
                name = f"{arm}-f{fraction:g}-s{seed}"
                folder = out / "children" / name
                done = folder / "result.json"
                if distributed.agree(done.is_file(), dinfo):
                    if not dinfo.is_main:
                        continue
                    res = json.loads(done.read_text())
                    progress.child(arm, fraction, seed, reused=str(res.get("run_id")))
                    if name in plan.adopt:  # finished before keys were recorded: record it now
                        _write_record(folder, plan.children[name], parent_id, res.get("run_id"))
                else:
                    progress.child(arm, fraction, seed, reused=None)
                    if "synthetic" in arm and gen_path is None:
                        gen_path = _generator_for(
                            cfg, fraction, seed, manifest, out, parent_id, gen_cache, dinfo, plan, progress
                        )
                    t0 = time.time()
                    res = classify(
                        _child_config(cfg, base, arm, fraction, seed, sub, gen_path, out, parent_id)
                    )
                    progress.child_done(time.time() - t0)
                    if not dinfo.is_main:
                        continue
                    _write_record(folder, plan.children[name], parent_id, res["run_id"])
                    if res["run_id"]:  # None: the child's tracking is buffered in its outbox
                        client.set_tag(res["run_id"], "fraction", f"{fraction:g}")
                        client.set_tag(res["run_id"], "gain_key", config_key(plan.children[name]))
                m = res["metrics"]
                rows.append(
                    {
                        "fraction": fraction,
                        "arm": arm,
                        "seed": seed,
                        "auroc": m["test/auroc"],
                        "balanced_accuracy": m["test/balanced_accuracy"],
                        "sensitivity": m["test/sensitivity"],
                        "specificity": m["test/specificity"],
                        # children finished before step budgets were recorded: NaN
                        "steps": m.get("optimizer_steps", float("nan")),
                        "scores": res.get("scores", ""),  # per-image test scores, for paired deltas
                        "run_id": res["run_id"],
                    }
                )
            if any("synthetic" in a for a in cfg.arms):
                fid = _generator_fidelity(
                    cfg, fraction, seed, manifest, out, parent_id, gen_cache, gen_path, dinfo, plan, progress
                )
                for r in rows:
                    if r["fraction"] == fraction and r["seed"] == seed and "synthetic" in r["arm"]:
                        r["generator_class_fidelity"] = fid
    return rows


# below this class-fidelity AUROC a generator's labels are too unreliable to teach a classifier
FIDELITY_WARN = 0.7


def _generator_fidelity(
    cfg: GainConfig,
    fraction: float,
    seed: int,
    manifest: Path,
    out: Path,
    parent_id: str,
    gen_cache: dict,
    gen_path: str | None,
    dinfo: distributed.DistInfo,
    plan: _Plan,
    progress: _Progress,
) -> float:
    """Class fidelity of the (fraction, seed) generator, scored by that subset's real-only classifier.

    A generator can lose its class conditioning with nothing odd in its losses (one 30-epoch run in
    six did, docs/benchmarks.md); its synthetic arms then measure wrong labels, not synthetic data.
    Saved beside the children with the keys of the generator and the classifier it was computed
    from, so a re-run does not recompute it unless one of them changed. NaN on ranks other than 0.
    """

    path = out / "children" / f"generator-fidelity-f{fraction:g}-s{seed}.json"
    real = f"real-f{fraction:g}-s{seed}"
    syn = next(f"{a}-f{fraction:g}-s{seed}" for a in cfg.arms if "synthetic" in a)
    keys = {
        "generator_key": config_key(
            {k: v for k, v in plan.children.get(syn, {}).items() if k.startswith("generator.")}
        ),
        "classifier_key": config_key(plan.children.get(real, {})),
    }
    saved = _read_json(path) if dinfo.is_main else None
    fresh = saved is not None and all(saved.get(k) == v for k, v in keys.items())
    if not distributed.agree(fresh, dinfo):
        if gen_path is None:  # every synthetic child was done before: find its generator again
            gen_path = _generator_for(
                cfg, fraction, seed, manifest, out, parent_id, gen_cache, dinfo, plan, progress
            )
        if dinfo.is_main:
            clf = out / "children" / real / "classifier.pt"
            if not clf.is_file():  # a real-only child from elsewhere, without its checkpoint
                print(f"gain: no {clf}: class fidelity of this generator not scored", flush=True)
                return float("nan")
            fid = class_fidelity(gen_path, clf, seed=seed, device=pick_device(cfg.classify.device))
            saved = {**fid, "generator": str(gen_path), "classifier": str(clf), **keys}
            path.write_text(json.dumps(saved, indent=1))
    if not dinfo.is_main:
        return float("nan")
    fid = saved
    auc = float(fid.get("auroc", float("nan")))
    if auc < FIDELITY_WARN:
        print(
            f"gain: WARNING the generator for fraction {fraction:g} seed {seed} has class fidelity "
            f"{auc:.3f} (< {FIDELITY_WARN}): its labelled images are unreliable, so this seed's synthetic "
            f"arms test a generator that lost its labels ({fid['generator']})",
            flush=True,
        )
    return auc


def paired_deltas(results: pd.DataFrame, ref: str, n_boot: int = 1000) -> dict[tuple[float, str], tuple]:
    """(fraction, arm) -> (mean ΔAUROC against arm ``ref``, 95 % low, high): per seed, the paired
    bootstrap of the two classifiers' AUROC difference on the same test images (their per-image
    scores), combined over seeds by a two-level bootstrap (metrics.combine_seed_deltas). Arms
    without per-image scores (children finished before they were kept) are left out."""
    out: dict[tuple[float, str], tuple] = {}
    if "scores" not in results or ref not in set(results["arm"]):
        return out
    for (frac, arm), g in results.groupby(["fraction", "arm"], sort=True):
        if arm == ref:
            continue
        base = results[(results["fraction"] == frac) & (results["arm"] == ref)].set_index("seed")["scores"]
        deltas, reps = [], []
        for seed, mine in g.set_index("seed")["scores"].items():
            theirs = base.get(seed)
            if not mine or not theirs or not Path(mine).is_file() or not Path(theirs).is_file():
                deltas = []
                break
            a, b = pd.read_csv(mine), pd.read_csv(theirs)
            # pairing needs the same test images in the same order, each with the same label
            if list(a["path"]) != list(b["path"]) or list(a["label"]) != list(b["label"]):
                raise ValueError(
                    f"{mine} and {theirs} score different test images: arms of one (fraction, seed) "
                    "must share the test split; re-run the study with one manifest"
                )
            d, r = paired_auroc_deltas(
                a["label"].to_numpy(), a["score"].to_numpy(), b["score"].to_numpy(), n_boot, int(seed)
            )
            deltas.append(d)
            reps.append(r)
        if deltas:
            out[(frac, arm)] = combine_seed_deltas(deltas, reps, seed=0)
    return out


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """Per (fraction, arm): mean AUROC with a t-interval over seeds; the AUROC difference to
    real-only paired by seed, with its t-interval; and the paired-bootstrap differences to
    ``real`` and ``real_dup`` (:func:`paired_deltas`)."""

    vs_real, vs_dup = paired_deltas(results, "real"), paired_deltas(results, "real_dup")
    nan3 = (float("nan"),) * 3
    rows = []
    for (frac, arm), g in results.groupby(["fraction", "arm"], sort=True):
        real = results[(results["fraction"] == frac) & (results["arm"] == "real")].set_index("seed")["auroc"]
        mine = g.set_index("seed")["auroc"]
        common = sorted(set(real.index) & set(mine.index))
        d = (mine.loc[common] - real.loc[common]).to_numpy()
        m, lo, hi = mean_ci(mine.to_numpy())
        lo, hi = max(lo, 0.0), min(hi, 1.0)  # a t-interval over 3 seeds can overrun AUROC's range
        dm, dlo, dhi = mean_ci(d) if arm != "real" else (0.0, 0.0, 0.0)
        rows.append(
            {
                "fraction": frac,
                "arm": arm,
                "n_seeds": len(mine),
                "auroc": m,
                "auroc_lo": lo,
                "auroc_hi": hi,
                "balanced_accuracy": g["balanced_accuracy"].mean(),
                "sensitivity": g["sensitivity"].mean(),
                "specificity": g["specificity"].mean(),
                "steps": g["steps"].mean() if "steps" in g else float("nan"),
                "delta_auroc": dm,
                "delta_lo": dlo,
                "delta_hi": dhi,
                # paired on the same test images, combined over seeds (two-level bootstrap)
                **dict(
                    zip(
                        ("paired_delta", "paired_lo", "paired_hi"),
                        vs_real.get((frac, arm), nan3),
                        strict=True,
                    )
                ),
                **dict(
                    zip(
                        ("vs_dup_delta", "vs_dup_lo", "vs_dup_hi"), vs_dup.get((frac, arm), nan3), strict=True
                    )
                ),
                # mean over seeds of the generators' class fidelity (synthetic arms only)
                "generator_class_fidelity": (
                    g["generator_class_fidelity"].mean() if "generator_class_fidelity" in g else float("nan")
                ),
                "generator_class_fidelity_min": (
                    g["generator_class_fidelity"].min() if "generator_class_fidelity" in g else float("nan")
                ),
            }
        )
    return pd.DataFrame(rows)


def _ci(m: float, lo: float, hi: float) -> str:
    return "—" if not np.isfinite(m) else f"{m:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def to_markdown(table: pd.DataFrame) -> str:
    head = (
        "| fraction | arm | seeds | optimiser steps | AUROC (95% CI) | ΔAUROC vs real (95% CI) "
        "| ΔAUROC vs real, paired bootstrap | ΔAUROC vs real_dup, paired bootstrap | bal. acc "
        "| sens | spec | generator class fidelity (mean, min) |\n"
    )
    head += "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    lines = []
    for r in table.itertuples():
        delta = "—" if r.arm == "real" else f"{r.delta_auroc:+.4f} [{r.delta_lo:+.4f}, {r.delta_hi:+.4f}]"
        fid, fid_min = r.generator_class_fidelity, r.generator_class_fidelity_min
        fid_s = "—" if not np.isfinite(fid) else f"{fid:.3f}, {fid_min:.3f}"
        steps = "—" if not np.isfinite(r.steps) else f"{r.steps:,.0f}"
        lines.append(
            f"| {r.fraction:g} | {r.arm} | {r.n_seeds} | {steps} | {r.auroc:.4f} [{r.auroc_lo:.4f}, {r.auroc_hi:.4f}] | "
            f"{delta} | {_ci(r.paired_delta, r.paired_lo, r.paired_hi)} | {_ci(r.vs_dup_delta, r.vs_dup_lo, r.vs_dup_hi)} "
            f"| {r.balanced_accuracy:.4f} | {r.sensitivity:.4f} | {r.specificity:.4f} | {fid_s} |"
        )
    return head + "\n".join(lines) + "\n"


def _end_parent(client, parent_id: str, exc: BaseException) -> None:
    """End the parent run FAILED (KILLED on Ctrl-C) for ``exc``; a tracking error here is printed,
    never raised over ``exc``."""
    status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
    try:
        client.set_tag(parent_id, "gain.error", f"{type(exc).__name__}: {exc}"[:500])
        client.set_terminated(parent_id, status)
    except Exception as e:  # noqa: BLE001 - the study's own error is the one to raise
        print(f"gain: could not mark the parent run {parent_id} {status}: {e}", file=sys.stderr, flush=True)
        return
    print(
        f"gain: parent run {parent_id} ended {status} ({type(exc).__name__}: {exc})",
        file=sys.stderr,
        flush=True,
    )


def _parent_run(cfg: GainConfig, base: ClassifyConfig, manifest: Path, out: Path, plan: _Plan):
    """(MLflow client, parent run id): the run every child hangs under; a re-run continues it
    (it is set RUNNING again) when its recorded gain config is this one."""
    import mlflow
    from mlflow.entities import Param

    check_writable(out)
    tcfg = copy.deepcopy(base.tracking)
    tcfg.experiment = cfg.experiment
    exp_id = tracking.setup(tcfg)
    client = mlflow.tracking.MlflowClient()
    state_file = out / "parent_run_id"
    now = parent_config(cfg)
    record = {"key": config_key(now), "config": now}
    if plan.parent_id:
        parent_id = plan.parent_id
        try:
            run = client.get_run(parent_id)
        except Exception as e:  # noqa: BLE001 - MlflowException, or a store that cannot be read
            raise ConfigError(
                f"gain: {state_file} names the parent run {parent_id}, which the tracking store "
                f"{tracking.resolve_uri(tcfg)} does not have ({type(e).__name__}): use the store the study "
                "was started in (classify.tracking.uri), or start a new study with another run_name="
            ) from None
        if run.info.lifecycle_stage == "deleted":
            raise ConfigError(
                f"gain: the parent run {parent_id} named in {state_file} was deleted: restore it, or start "
                "a new study with another run_name="
            )
        if not (out / PARENT_FILE).is_file():  # a study started before gain configs were recorded
            old = {k: v for k, v in run.data.params.items() if k in now}
            # as the params were logged: str() of each value of the config itself
            new = {k: str(v)[:500] for k, v in flatten(to_dict(cfg)).items() if k in now}
            defaults = {k: str(v)[:500] for k, v in parent_config(GainConfig()).items()}
            diff = config_changes(old, new, defaults)
            if diff:
                raise ConfigError(
                    f"gain: the study in {out} was run before with another config; nothing was trained.\n  "
                    f"parent run {parent_id} (its params): " + "; ".join(diff) + "\nTo run this config, "
                    "start a new study with another run_name= (or out_dir=)."
                )
            atomic_write_text(out / PARENT_FILE, json.dumps(record, indent=1, sort_keys=True))
        if run.info.status != "RUNNING":
            client.update_run(parent_id, status="RUNNING")
    else:
        parent = client.create_run(
            exp_id,
            run_name=cfg.run_name or f"gain-{time.strftime('%Y%m%d-%H%M%S')}",
            tags={
                "stage": "gain",
                "git_commit": tracking.git_commit(),
                "data.manifest": str(manifest),
                "gain_config_key": record["key"],
            },
        )
        parent_id = parent.info.run_id
        try:
            params = [Param(k, str(v)[:500]) for k, v in flatten(to_dict(cfg)).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params a call
                client.log_batch(parent_id, params=params[i : i + 100])
            atomic_write_text(out / PARENT_FILE, json.dumps(record, indent=1, sort_keys=True))
            state_file.write_text(parent_id)
        except BaseException as e:
            _end_parent(client, parent_id, e)
            raise
    print(f"gain: parent MLflow run {parent_id} in experiment {cfg.experiment}", flush=True)
    return client, parent_id


def gain(cfg: GainConfig) -> dict[str, Any]:

    base = copy.deepcopy(cfg.classify)
    out = Path(cfg.out_dir) / (cfg.run_name or "gain")
    # under torchrun (N processes) every child trains data-parallel; rank 0 alone writes files and
    # talks to MLflow, and broadcasts the decisions that depend on them
    dinfo = distributed.init()
    # every input and every finished child is checked before the parent run is created
    err, manifest, plan = None, None, None
    if dinfo.is_main:
        try:
            manifest = _check_inputs(cfg, base)
            plan = _plan(cfg, base, manifest, out)
        except Exception as e:  # raised below, on every rank
            err = e
    msg = distributed.agree(None if err is None else str(err), dinfo)
    if err is not None:
        raise err
    if msg is not None:
        raise ConfigError(msg)
    manifest, plan = distributed.agree((manifest, plan), dinfo)

    client, parent_id = None, None
    if dinfo.is_main:
        try:
            client, parent_id = _parent_run(cfg, base, manifest, out, plan)
        except Exception as e:
            err = e
    parent_id = distributed.agree(parent_id, dinfo)
    if err is not None:
        raise err
    if parent_id is None:
        raise ConfigError("gain: rank 0 could not open the parent run (see its error)")
    try:
        return _study(cfg, base, manifest, out, parent_id, dinfo, client, plan, plot_gain)
    except BaseException as e:
        if dinfo.is_main:
            _end_parent(client, parent_id, e)
        raise


def _study(cfg, base, manifest, out, parent_id, dinfo, client, plan, plot_gain) -> dict[str, Any]:
    """The children, then the table, the plot and the metrics on the parent run (ended FINISHED)."""
    t0 = time.time()
    rows = _run_children(cfg, base, manifest, out, parent_id, dinfo, client, plan)
    if not dinfo.is_main:
        distributed.shutdown(dinfo)
        return {"parent_run_id": parent_id}
    results = pd.DataFrame(rows)
    table = summarise(results)
    results.to_csv(out / "gain_runs.csv", index=False)
    table.to_csv(out / "gain_table.csv", index=False)
    md = to_markdown(table)
    (out / "gain_table.md").write_text(md)
    plot = plot_gain(table, out / "gain.png", title=f"AUROC gain over real-only ({len(cfg.seeds)} seeds)")
    for p in ("gain_runs.csv", "gain_table.csv", "gain_table.md", "gain.png"):
        client.log_artifact(parent_id, str(out / p), "gain")
    fid_logged: set[str] = set()
    for r in table.itertuples():
        if r.arm != "real" and np.isfinite(r.delta_auroc):
            client.log_metric(parent_id, f"delta_auroc/{r.arm}/f{r.fraction:g}", float(r.delta_auroc))
        client.log_metric(parent_id, f"auroc/{r.arm}/f{r.fraction:g}", float(r.auroc))
        if np.isfinite(r.generator_class_fidelity) and f"f{r.fraction:g}" not in fid_logged:
            fid_logged.add(f"f{r.fraction:g}")
            client.log_metric(
                parent_id, f"generator_class_fidelity/f{r.fraction:g}", float(r.generator_class_fidelity)
            )
    client.set_terminated(parent_id, "FINISHED")
    distributed.shutdown(dinfo)
    print(md)
    print(f"gain: done in {time.time() - t0:.0f}s; table {out / 'gain_table.md'}, plot {plot}")
    print(f"MLflow parent run id: {parent_id}")
    return {"parent_run_id": parent_id, "table": table, "runs": results, "plot": str(plot)}
