"""Every stage's config, importable without torch, MONAI, MLflow, pandas or matplotlib.

The CLI (``pipeline.run``) loads and validates a stage's config from here, and answers ``--help``
and ``--print-config``, before it imports the stage: a bad key or value is reported in about a
second instead of after the stage's heavy imports. The dataclasses and their ``__post_init__``
checks are plain Python; their nested sections come from :mod:`networks.config` and
:mod:`transforms.config`, which are light in the same way; the arms (``ARMS``, their rules) come
from :mod:`pipeline.infra.arms`, plain Python too. Keep it so: this module imports only the
standard library and those three modules. A stage's config is imported from here (the stages
of studies: :mod:`pipeline.infra.study_configs`; ingest: :mod:`pipeline.ingest.config`); a stage
module names only the configs it uses, and re-exports none.

A key whose meaning needs a range declares it in its class's ``RANGES`` table (key -> interval),
which the config loader enforces (:func:`pipeline.infra.config.declared_ranges`); every float is
refused when not finite, whatever the key. The ``__post_init__`` checks cover what one interval
cannot say (choices, keys that depend on each other).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from networks.config import PRIORS, ClassifierConfig, LossConfig, ModelConfig
from pipeline.infra.arms import ARM_REGISTRY, ARMS
from transforms.config import TransformConfig

# ------------------------------------------------------------------ keys that identify no computation
# What a key says about a run when it is not what the run computes, declared once per class in its
# RUNS table (field -> kind; "*": every field of the section); pipeline.infra.config.tagged_keys
# reads them: a study's keys, compare's groups and train's resume check each leave out the kinds
# that do not matter to them.
WHERE, HOW, CACHE, LOG, START = "where", "how", "cache", "log", "start"
EXECUTION = frozenset({WHERE, HOW, CACHE, LOG})  # where and how a run executes, caches and logs
RESUMABLE = frozenset({WHERE, HOW, START})  # what a resumed run may change (with its epochs)


# ----------------------------------------------------------------------------- renamed keys
@dataclass(frozen=True)
class Renamed:
    """A config key's new spelling (a dotted key of the same class) and, when its values changed
    too, the map from old values to new (``values``); the old spelling is read with a deprecation
    message (pipeline.infra.config), and a study keys the field by its old name and value so its
    committed records stay valid (pipeline.infra.study_plan)."""

    new: str
    values: tuple[tuple[Any, Any], ...] = ()

    def forward(self, value: Any) -> Any:
        """An old value as the new key holds it (the first mapping of it)."""
        for old, new in self.values:
            if old == value and type(old) is type(value):
                return new
        return value

    def backward(self, value: Any) -> Any:
        """A new value as the old key held it (the first old value mapping to it)."""
        for old, new in self.values:
            if new == value and type(new) is type(value):
                return old
        return value


# booleans that became train's auto | on | off (auto: on, the old default)
ON_OFF = ((True, "on"), (False, "off"), (True, "auto"))


# --------------------------------------------------------------------- tracking (pipeline.infra.tracking)
def check_run_name(key: str, name: str) -> None:
    """Refuse a run name that is not one plain folder name: the stages write ``out_dir/NAME`` and
    move an earlier ``out_dir/NAME`` aside, so a path there (``.``, ``..``, ``a/b``, ``/abs``) once
    moved ``out_dir`` itself or any folder of the machine aside, or wrote outside ``out_dir``.
    ``""`` is allowed: the stage makes up a name."""
    if name == "":
        return
    shown = repr(name if len(name) <= 60 else name[:57] + "...")
    why = ""
    if not name.strip():
        why = "is blank"
    elif any(ord(c) < 32 or ord(c) == 127 for c in name):
        why = "holds a control character"
    elif "/" in name or "\\" in name:
        why = "holds a path separator (an absolute or nested path)"
    elif name.strip() in (".", ".."):
        why = "names a folder itself, not a run"
    elif len(name.encode()) > RUN_NAME_MAX_BYTES:
        why = f"is {len(name.encode())} bytes long (at most {RUN_NAME_MAX_BYTES})"
    if why:
        raise ValueError(
            f"{key}={shown} {why}: a run name is one folder name inside out_dir, not a path; "
            f"use letters, digits, '-', '_' or '.', e.g. {key}=kermany64-vaegan (out_dir= sets the folder)"
        )


RUN_NAME_MAX_BYTES = 128  # a folder name, with room for ".NAME.lock" and "NAME.replaced-STAMP"


@dataclass
class TrackingConfig:
    uri: str = ""  # empty: MLFLOW_TRACKING_URI, else the embedded sqlite store
    experiment: str = "cxr-vaegan"
    run_name: str = ""
    register_model: str = "cxr-vaegan-generator"  # empty: do not register the generator
    log_model: bool = True  # log (and register) the generator as an MLflow model at the end
    log_every: int = 10  # steps between per-step metric logs (each log is a host sync + a DB write)
    parent_run_id: str = ""  # make the run a child of this one (the gain experiment sets it)
    retry_s: float = 30.0  # while the server is unreachable, seconds between attempts to send the outbox

    RUNS: ClassVar[dict[str, str]] = {"*": LOG, "run_name": WHERE, "retry_s": HOW}

    def __post_init__(self) -> None:
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1 (steps between metric logs), got {self.log_every}")
        if self.retry_s <= 0:
            raise ValueError(f"retry_s must be > 0, got {self.retry_s}")
        check_run_name("tracking.run_name", self.run_name)


# ----------------------------------------------------------------------------- data (pipeline.infra.data)
@dataclass
class DataConfig(TransformConfig):
    """The ``data`` section: which manifest and split, batching, caching, plus preprocessing."""

    manifest: str = ""  # empty: the embedded phantom set (generated on first use)
    train_split: str = "train"
    val_split: str = "val"
    batch_size: int = 64
    num_workers: int = 0
    cache: str = "memory"  # memory | disk | none
    cache_dir: str = "data/cache"
    max_train: int = 0  # > 0: use only the first N training images (quick runs, tests)
    max_val: int = 512
    labels: list[int] = field(default_factory=list)  # keep only these labels (e.g. [0]: normals only)
    # where the train augmentation runs: loader (MONAI, per image, CPU workers) | device (the
    # whole batch at once on the training device, transforms.batch) | auto (device on CUDA)
    augment_on: str = "auto"

    RUNS: ClassVar[dict[str, str]] = {"cache": CACHE, "cache_dir": CACHE}
    RANGES: ClassVar[dict[str, str]] = {
        "batch_size": "[1, 65536]",
        "num_workers": "[0, 1024]",
        "max_train": "[0, inf)",  # 0: all
        "max_val": "[0, inf)",
        "labels": "[0, 999]",
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.augment_on not in ("auto", "loader", "device"):
            raise ValueError(f"augment_on must be auto, loader or device, got {self.augment_on!r}")
        if self.cache not in ("memory", "disk", "none"):
            raise ValueError(f"cache must be memory, disk or none, got {self.cache!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


# --------------------------------------------------------------------------- train (pipeline.train)
@dataclass
class OptimConfig:
    lr: float = 3e-4
    lr_disc: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    grad_clip: float = 5.0  # max gradient norm per network; 0 disables

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.lr_disc <= 0:
            raise ValueError(f"lr and lr_disc must be > 0, got {self.lr} and {self.lr_disc}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"beta1 and beta2 must be in [0, 1), got {self.beta1} and {self.beta2}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 disables), got {self.grad_clip}")


@dataclass
class GuardConfig:
    """Divergence guard: skip non-finite steps; roll back after K in a row; stop after R rollbacks."""

    enabled: bool = True
    max_bad_steps: int = 3  # K
    max_rollbacks: int = 3  # R
    lr_factor: float = 0.5  # learning rates are multiplied by this at each rollback

    def __post_init__(self) -> None:
        # the same rules engine.DivergenceGuard enforces, checked before any run starts
        if self.max_bad_steps < 1:
            raise ValueError(f"max_bad_steps must be >= 1, got {self.max_bad_steps}")
        if self.max_rollbacks < 0:
            raise ValueError(f"max_rollbacks must be >= 0, got {self.max_rollbacks}")
        if not 0 < self.lr_factor <= 1:
            raise ValueError(f"lr_factor must be in (0, 1], got {self.lr_factor}")


@dataclass
class GateConfig:
    """Validation gate: score the generator's samples against the validation images every few
    epochs and keep the best epoch's checkpoint as best.pt beside last.pt."""

    every: int = 0  # score every N epochs and at the last; 0: off
    # a classify checkpoint trained (arm real or classical) on this run's manifest: the judge of
    # the samples' FD (its feature space) and class fidelity (its AUROC on their labels)
    judge: str = ""
    n: int = 512  # samples scored, balanced over the classes (prior codes, averaged weights)
    min_fidelity: float = 0.7  # below: a loud warning, and the epoch cannot become best.pt

    RANGES: ClassVar[dict[str, str]] = {"min_fidelity": "[0, 1]"}  # an AUROC
    RENAMED: ClassVar[dict[str, Renamed]] = {"extractor": Renamed("judge")}  # before 2026-12-06

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError(f"gate.every must be >= 0 (0: off), got {self.every}")
        if self.every > 0 and not self.judge:
            raise ValueError("gate.every > 0 needs gate.judge=<classify checkpoint of a real-only arm>")
        if self.n < 8:
            raise ValueError(f"gate.n must be >= 8, got {self.n}")


# the CPU speed measures (pipeline/infra/speed.py); none changes what a step computes
MEASURES = ("cache_allocations", "gemm_convs", "fused_norm_act", "channels_last", "split_discriminator")


@dataclass
class SpeedConfig:
    """How a training step is computed on this machine (pipeline/infra/speed.py), never what it computes."""

    # auto: time each measure on and off for a few steps of the real model once per machine, size
    # and batch (cached), keep the fastest set; on: every measure on; off: plain PyTorch
    mode: str = "auto"
    cache: str = (
        ""  # calibration cache file; "" = $CXR_VAEGAN_SPEED_CACHE, else ~/.cache/cxr-vaegan/speed.json
    )
    # per measure: auto (follow mode) | on | off
    cache_allocations: str = "auto"  # freed memory stays in the process (glibc mallopt)
    gemm_convs: str = "auto"  # few-channel convolutions as GEMMs (networks/layers.py)
    fused_norm_act: str = "auto"  # norm + activation as one C++ kernel (networks/fused.py)
    channels_last: str = "auto"  # NHWC activations
    split_discriminator: str = "auto"  # real, reconstructed and prior images in three discriminator calls

    RUNS: ClassVar[dict[str, str]] = {"*": HOW}

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "on", "off"):
            raise ValueError(f"speed.mode must be auto, on or off, got {self.mode!r}")
        for m in MEASURES:
            if getattr(self, m) not in ("auto", "on", "off"):
                raise ValueError(f"speed.{m} must be auto, on or off, got {getattr(self, m)!r}")


@dataclass
class RuntimeConfig:
    """Where and how a training stage runs: the same keys, checks and meaning in train and
    classify (``pipeline.infra.runtime`` acts on them)."""

    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # auto (bf16 on CUDA from 128 px, engine.AUTO_BF16_MIN_SIZE; else off) | bf16 | fp16 | off
    amp: str = "auto"
    threads: int = 0  # torch intra-op threads on CPU; 0 = leave torch's default
    out_dir: str = "outputs"

    RANGES: ClassVar[dict[str, str]] = {"threads": "[0, 4096]"}
    RUNS: ClassVar[dict[str, str]] = {"out_dir": WHERE, "threads": HOW}

    def check_runtime(self) -> None:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise ValueError(f"amp must be auto, bf16, fp16 or off, got {self.amp!r}")


@dataclass
class TrainConfig(RuntimeConfig):
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    epochs: int = 12
    resume: str = ""  # "" | auto | path to a checkpoint
    ckpt_every: int = 0  # steps between mid-epoch checkpoints; 0 = epoch ends only
    grid_size: int = 64  # prior samples in the per-epoch grid
    deterministic: bool = True  # seed everything (monai.utils.set_determinism)
    # torch.compile the three networks. Off by default: measured slower at 64 px on CPU and on an
    # H100 (docs/benchmarks.md; benchmarks/bench_train.py --compile)
    compile: bool = False

    RANGES: ClassVar[dict[str, str]] = {"grid_size": "[1, 1024]"}
    RUNS: ClassVar[dict[str, str]] = {"resume": START, "ckpt_every": START}

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        self.check_runtime()
        if self.ckpt_every < 0 or self.threads < 0 or self.grid_size < 1:
            raise ValueError(
                f"ckpt_every and threads must be >= 0 and grid_size >= 1, got "
                f"{self.ckpt_every}, {self.threads}, {self.grid_size}"
            )
        if self.model.image_size == 0:
            self.model.image_size = self.data.image_size
        elif self.model.image_size != self.data.image_size:
            raise ValueError(
                f"model.image_size ({self.model.image_size}) != data.image_size ({self.data.image_size})"
            )


# --------------------------------------------------------------------- generate (pipeline.generate)
@dataclass
class GenerateConfig:
    checkpoint: str = ""  # a train checkpoint (.pt) or an MLflow model URI (runs:/..., models:/...)
    n: int = 64
    label: str = "balanced"  # balanced | a class name | a class index
    # fitted: codes from the generator's fitted per-class prior (networks/prior.py), or N(0, I)
    # with a note when it has none (trained before it existed); normal: always N(0, I)
    prior: str = "fitted"
    out: str = "outputs/generated"
    seed: int = 0
    batch_size: int = 256
    dicom: bool = False  # also write DICOM Secondary Capture objects (one study, one series per call)
    # a non-empty out folder is refused (a new set beside old files would mix them); overwrite=true
    # replaces its whole contents, atomically: the new set is written into a hidden sibling folder
    # and swapped in only when complete, so a failed call leaves the old set as it was. An old
    # tracking_outbox still holding unsent MLflow calls is never discarded: `pipeline.run sync` it
    overwrite: bool = False
    device: str = "auto"
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="cxr-vaegan-generate"))
    log_mlflow: bool = True
    # drop near-copies of training images: a manifest whose train split is the generator's
    # training set; its test split sets the threshold (the near_copy_percentile-th percentile of
    # test-to-train nearest-neighbour distances); dropped images are replaced by new draws
    drop_near_copies: str = ""
    near_copy_percentile: float = 1.0

    RANGES: ClassVar[dict[str, str]] = {"near_copy_percentile": "(0, 100)", "batch_size": "[1, 65536]"}

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise ValueError("checkpoint is required: a train checkpoint (.pt) or an MLflow model URI")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.prior not in PRIORS:
            raise ValueError(f"prior must be one of {PRIORS}, got {self.prior!r}")


# --------------------------------------------------------------------- classify (pipeline.classify)
@dataclass
class ClassifierOptimConfig:
    """The classifier's AdamW and one-cycle schedule (peak ``lr``)."""

    lr: float = 1e-3
    weight_decay: float = 1e-4
    grad_clip: float = 5.0  # max gradient norm; 0 disables

    RANGES: ClassVar[dict[str, str]] = {"lr": "(0, inf)", "weight_decay": "[0, inf)", "grad_clip": "[0, inf)"}


@dataclass
class ClassifierSpeedConfig:
    """How the classifier's steps run (not what they compute), spelled as train's ``speed.``:
    ``auto`` is ``on`` here (no calibration: both help on every machine measured)."""

    channels_last: str = "auto"  # NHWC activations
    cache_allocations: str = "auto"  # on CPU, freed memory stays in the process (glibc mallopt)

    # channels_last is keyed: NHWC changes the classifier's float arithmetic (train's measures are
    # checked to leave its losses unchanged, tests/test_train.py; this one is not)
    RUNS: ClassVar[dict[str, str]] = {"cache_allocations": HOW}

    def __post_init__(self) -> None:
        for name in ("channels_last", "cache_allocations"):
            if getattr(self, name) not in ("auto", "on", "off"):
                raise ValueError(f"{name} must be auto, on or off, got {getattr(self, name)!r}")

    def on(self, name: str) -> bool:
        return getattr(self, name) != "off"


@dataclass
class ClassifyConfig(RuntimeConfig):
    data: DataConfig = field(default_factory=lambda: DataConfig(max_val=0))
    model: ClassifierConfig = field(default_factory=ClassifierConfig)
    tracking: TrackingConfig = field(
        default_factory=lambda: TrackingConfig(
            experiment="cxr-vaegan-classify", register_model="", log_model=False
        )
    )
    arm: str = "real"
    synthetic: str = ""  # generator checkpoint / MLflow model URI, or a generated manifest (.csv)
    ratio: float = 1.0  # synthetic images per real image (synthetic arms); extra real draws (real_dup)
    # synthetic_filtered: a classify checkpoint of a real-only arm on the same data; a synthetic image
    # is kept only when it classifies it as its intended label at its validation-chosen threshold
    judge: str = ""
    # synthetic arms: the latent prior's sampling scale (its codes' spread times this; < 1 draws
    # nearer each class's centre, > 1 more diverse images, nearer the class boundary)
    synthetic_temperature: float = 1.0
    fraction: float = 1.0  # fraction of the real train (and val) patients used, stratified by label
    epochs: int = 10
    # optimiser steps per epoch: "epochs" = one pass over the arm's own training set (an arm that
    # adds images trains more steps); "real" = the batches of one pass over the real training set
    # for every arm, so arms differ only in which images they see (gain's default)
    step_budget: str = "epochs"
    optim: ClassifierOptimConfig = field(default_factory=ClassifierOptimConfig)
    speed: ClassifierSpeedConfig = field(default_factory=ClassifierSpeedConfig)
    test_split: str = "test"
    # more held-out splits scored like test_split (metrics SPLIT/auroc ..., scores_SPLIT.csv), e.g.
    # gain's in-distribution test split carved from the training pool
    extra_test_splits: list[str] = field(default_factory=list)
    bootstrap: int = 1000
    out_dir: str = "outputs/classify"

    RANGES: ClassVar[dict[str, str]] = {"ratio": "[0, 1000]"}
    # the spellings before 2026-12-06 (train's names since): read, with a deprecation message,
    # for one release; a study keys its children by the old names (committed records stay valid)
    RENAMED: ClassVar[dict[str, Renamed]] = {
        "lr": Renamed("optim.lr"),
        "weight_decay": Renamed("optim.weight_decay"),
        "grad_clip": Renamed("optim.grad_clip"),
        "channels_last": Renamed("speed.channels_last", ON_OFF),
        "cache_allocations": Renamed("speed.cache_allocations", ON_OFF),
        "filter_classifier": Renamed("judge"),  # the judge has one name in every stage
    }

    def __post_init__(self) -> None:
        if self.arm not in ARMS:
            raise ValueError(f"arm must be one of {ARMS}, got {self.arm!r}")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        self.check_runtime()
        ARM_REGISTRY[self.arm].check(self.synthetic, self.ratio, self.judge, self.epochs)
        if self.step_budget not in ("epochs", "real"):
            raise ValueError(f"step_budget must be 'epochs' or 'real', got {self.step_budget!r}")
        if self.bootstrap < 0:
            raise ValueError(f"bootstrap must be >= 0, got {self.bootstrap}")
        if not 0 < self.synthetic_temperature <= 10:  # NaN fails too
            raise ValueError(f"synthetic_temperature must be in (0, 10], got {self.synthetic_temperature}")
        clash = {self.test_split, self.data.train_split, self.data.val_split} & set(self.extra_test_splits)
        if clash:
            raise ValueError(f"extra_test_splits {sorted(clash)} repeat(s) test_split, train or val split")


# --------------------------------------------------------------------- evaluate (pipeline.evaluate)
@dataclass
class EvaluateConfig:
    # a train checkpoint (.pt: encoder + decoder), or an MLflow model URI (models:/NAME/VERSION, runs:/ID/generator):
    # the generator alone (no interpolation grid; its training data found through the model's run)
    checkpoint: str = ""
    # instead of checkpoint: images from any generator (GAN, diffusion model...) to score: a manifest CSV
    # with path/label columns (e.g. generate's generated.csv; every row, whatever its split; class
    # fidelity when labelled 0/1) or a folder of PNG/JPEG files (those directly in it; unlabelled).
    # Needs reference=; no interpolation grid. Preprocessed like the reference at the extractor's size
    samples: str = ""
    judge: str = ""  # a classifier checkpoint from the classify stage, trained on real images
    # manifest of the real images (its train split is the memorisation audit's training set with
    # samples=); "" = the generator's training manifest
    reference: str = ""
    reference_split: str = "test"
    train_split: str = "train"  # the generator's training images (memorisation audit)
    n: int = 0  # synthetic images; 0 = as many as reference images (samples=: a seeded subset of n; 0 = all)
    k: int = 5
    bootstrap: int = 200
    near_copy_percentile: float = 1.0
    prior: str = "fitted"  # a generator's codes: fitted (its fitted prior, if it has one) | normal (N(0, I))
    anomaly_checkpoint: str = ""  # a model trained on normal images only (unconditioned)
    normal_label: int = 0
    seed: int = 0
    device: str = "auto"
    batch_size: int = 256
    # use an extractor that has seen synthetic images, was trained on another manifest than the
    # reference, or does not record its arm and training manifest (a checkpoint from before
    # classify recorded them); the report and the MLflow run then say so
    allow_foreign_judge: bool = False
    out_dir: str = "outputs/evaluate"
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="cxr-vaegan-evaluate"))

    RANGES: ClassVar[dict[str, str]] = {
        "bootstrap": "[0, inf)",
        "normal_label": "[0, 999]",
        "batch_size": "[1, 65536]",
    }
    # the judge has one name in every stage since 2026-12-06 (the old one is read for a release)
    RENAMED: ClassVar[dict[str, Renamed]] = {
        "extractor": Renamed("judge"),
        "allow_foreign_extractor": Renamed("allow_foreign_judge"),
    }

    def __post_init__(self) -> None:
        if self.checkpoint and self.samples:
            raise ValueError(
                "give checkpoint or samples, not both: checkpoint= scores a generator by sampling it, "
                "samples= scores images already made (a manifest or a folder)"
            )
        if not self.checkpoint and not self.samples:
            raise ValueError(
                "checkpoint is required (a train checkpoint .pt or an MLflow model URI), or samples= "
                "(a manifest or a folder of generated images)"
            )
        if self.prior not in PRIORS:
            raise ValueError(f"prior must be one of {PRIORS}, got {self.prior!r}")
        if self.samples and not self.reference:
            raise ValueError(
                "samples= needs reference= (the manifest of the real images): with samples there is no "
                "generator training run to find the real and training images from"
            )
        if not self.judge:
            raise ValueError(
                "judge is required: a classifier checkpoint trained on real images (classify stage)"
            )
        if self.n < 0:
            raise ValueError(f"n must be >= 0, got {self.n}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if not 0 < self.near_copy_percentile < 100:
            raise ValueError(f"near_copy_percentile must be in (0, 100), got {self.near_copy_percentile}")


# ------------------------------------------------------------------------ export (pipeline.export)
EXPORT_FORMATS = ("monai-bundle",)


@dataclass
class ExportConfig:
    """A generator written as a self-contained package other tools run (a MONAI bundle)."""

    checkpoint: str = ""  # a train checkpoint (.pt) or an MLflow model URI (runs:/..., models:/...)
    format: str = "monai-bundle"  # monai-bundle: configs/, models/ (weights only), scripts/, docs/
    out: str = ""  # the bundle folder to write (refused when not empty, unless overwrite=true)
    overwrite: bool = False  # replace what out holds (the new bundle is swapped in only when whole)
    # a generator whose recorded class fidelity (the validation gate's AUROC on these weights) is
    # below this draws images that often do not show their label: refused. 0.7 is the project's
    # warning threshold (gate.min_fidelity, gain's FIDELITY_WARN)
    min_fidelity: float = 0.7
    force: bool = False  # export even below min_fidelity (the bundle's metadata and README say so)
    version: str = "0.1.0"  # the bundle's version (metadata.json)
    authors: str = "cxr-vaegan contributors"  # metadata.json's authors
    copyright: str = "Copyright (c) cxr-vaegan contributors; Apache-2.0"  # metadata.json's copyright
    # tracking.uri: where models:/ and runs:/ addresses and the training run's measures are looked
    # up; empty: the checkpoint's own tracking.uri, MLFLOW_TRACKING_URI, else the embedded store
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    RANGES: ClassVar[dict[str, str]] = {"min_fidelity": "[0, 1]"}  # an AUROC
    RENAMED: ClassVar[dict[str, Renamed]] = {"uri": Renamed("tracking.uri")}  # before 2026-12-06

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise ValueError("checkpoint is required: a train checkpoint (.pt) or an MLflow model URI")
        if self.format not in EXPORT_FORMATS:
            raise ValueError(f"format={self.format!r} is not supported: use format={EXPORT_FORMATS[0]}")
        if not self.out:
            raise ValueError("out is required: the folder to write the bundle into, e.g. out=bundles/cxr-gen")
        if not re.fullmatch(r"\d+\.\d+\.\d+", self.version):
            raise ValueError(f"version={self.version!r} is not MAJOR.MINOR.PATCH (e.g. version=0.1.0)")
