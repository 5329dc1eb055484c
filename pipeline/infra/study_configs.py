"""The configs of the stages that run and read studies (gain, compare, report), importable
without torch, MONAI, MLflow, pandas or matplotlib like :mod:`pipeline.infra.stage_configs`,
whose sections they use."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from pipeline.infra.arms import ARMS
from pipeline.infra.stage_configs import ClassifyConfig, Renamed, TrackingConfig

# ----------------------------------------------------------------------------- gain (pipeline.gain)
DEFAULT_ARMS = ["real", "classical", "synthetic", "synthetic_only"]


@dataclass
class RayConfig:
    """Where a study's tasks run with executor=ray, and what each asks for."""

    # "" = a local Ray instance started and stopped with the command; "auto" = the cluster this
    # machine has joined (`ray start`); "ray://HOST:PORT" = a remote cluster's client server
    address: str = ""
    workers: int = 0  # a local instance's CPUs (0 = all of this machine's)
    num_cpus: float = 1.0  # per task (a generator or a classifier child); also its torch threads
    num_gpus: float = 0.0  # per task (e.g. 1 on a GPU cluster)
    max_retries: int = 2  # a task whose worker died is run again this many times, then reported

    def __post_init__(self) -> None:
        if not (self.num_cpus > 0 and self.num_gpus >= 0 and self.max_retries >= 0 and self.workers >= 0):
            raise ValueError("ray.num_cpus must be > 0; ray.num_gpus, ray.max_retries and ray.workers >= 0")


@dataclass
class GainConfig:
    # the base of every arm; every arm trains the real arm's number of optimiser steps
    classify: ClassifyConfig = field(default_factory=lambda: ClassifyConfig(step_budget="real"))
    arms: list[str] = field(default_factory=lambda: list(DEFAULT_ARMS))
    fractions: list[float] = field(default_factory=lambda: [0.1, 1.0])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    # "FRACTION=PATH": a generator trained on exactly that fraction's train split (only 1.0 is
    # the same subset for every seed, so only 1.0 may be reused)
    generators: list[str] = field(default_factory=list)
    vaegan_config: str = ""  # YAML for the VAE-GANs trained per subset ("" = TrainConfig defaults)
    vaegan_overrides: list[str] = field(default_factory=list)  # e.g. ["epochs=30"]
    # the study's MLflow: tracking.experiment (its parent run and every child), tracking.run_name
    # (the parent run, and the study's folder OUT_DIR/RUN_NAME), tracking.uri (the store; empty:
    # classify.tracking.uri, else MLFLOW_TRACKING_URI, else the embedded store)
    tracking: TrackingConfig = field(
        default_factory=lambda: TrackingConfig(
            experiment="cxr-vaegan-gain", register_model="", log_model=False
        )
    )
    out_dir: str = "outputs/gain"
    # the study's records (one small JSON per child and generator, no weights; meant to be committed,
    # e.g. docs/studies/NAME): a study continues from them on any machine. "" = OUT_DIR/RUN_NAME/records
    records: str = ""
    # stop before a child or generator whose measured cost does not fit in this many minutes of this
    # call (exit status 3; the same command continues); 0 = no budget
    max_minutes: float = 0.0
    # > 0: each generator trains about this many optimiser steps whatever its subset's size
    # (epochs = ceil(steps / batches per epoch)); 0: vaegan_config's epochs
    generator_steps: int = 0
    # with generator_steps: the validation gate checks each generator this many times (judge: its
    # subset's real child; best.pt feeds the synthetic arms); 0 = no gate
    gate_checks: int = 4
    # > 0: carve this fraction of the training patients as an in-distribution test split ("holdout")
    # before any subset is drawn; every child is scored on it beside classify.test_split
    holdout_fraction: float = 0.0
    holdout_seed: int = 0
    # where generator weights live ("" = OUT_DIR/RUN_NAME/generators); studies that differ only in
    # how their children use the same generators (e.g. classify.synthetic_temperature) share one, and
    # a generator is reused only when its recorded config key is this study's
    generator_dir: str = ""
    # local: one item after another in this process; ray: the study's generators and children as a
    # graph of Ray tasks (pip install '.[ray]'), each writing the same records
    executor: str = "local"
    ray: RayConfig = field(default_factory=RayConfig)

    # spelled as every stage's tracking section since 2026-12-06 (read, with a message, for a release)
    RENAMED: ClassVar[dict[str, Renamed]] = {
        "experiment": Renamed("tracking.experiment"),
        "run_name": Renamed("tracking.run_name"),
    }

    def __post_init__(self) -> None:
        if self.executor not in ("local", "ray"):
            raise ValueError(f"executor must be local or ray, got {self.executor!r}")
        if self.executor == "ray" and self.max_minutes > 0:
            raise ValueError("max_minutes works with executor=local only: a Ray study runs its tasks at once")
        for name in ("max_minutes", "holdout_fraction"):
            v = getattr(self, name)
            if not (v >= 0 and v < float("inf")):  # NaN fails too
                raise ValueError(f"{name} must be a finite number >= 0, got {v}")
        if self.holdout_fraction >= 0.5:
            raise ValueError(
                f"holdout_fraction must be < 0.5 (the rest is the training pool), got {self.holdout_fraction}"
            )
        if self.generator_steps < 0 or self.gate_checks < 0:
            raise ValueError("generator_steps and gate_checks must be >= 0")
        bad = [a for a in self.arms if a not in ARMS]
        if bad:
            raise ValueError(f"unknown arm(s) {bad}; choose from {ARMS}")
        if "real" not in self.arms:
            raise ValueError("arms must include 'real': every gain is measured against real-only")
        if "synthetic_filtered" in self.arms and self.arms.index("synthetic_filtered") < self.arms.index(
            "real"
        ):
            raise ValueError(
                "arms: 'real' must come before 'synthetic_filtered' (its classifier filters the images)"
            )
        if not self.fractions or any(not 0 < f <= 1 for f in self.fractions):
            raise ValueError(f"fractions must be in (0, 1], got {self.fractions}")
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        for name, values in (("arms", self.arms), ("fractions", self.fractions), ("seeds", self.seeds)):
            dup = sorted({v for v in values if list(values).count(v) > 1})
            if dup:
                raise ValueError(f"{name} holds duplicates {dup}: each would be counted twice in the table")
        seen: set[float] = set()
        for g in self.generators:
            f, _, path = g.partition("=")
            try:
                frac = float(f)
            except ValueError:
                frac = None
            if not path or frac is None:
                raise ValueError(f"generators entry {g!r} is not FRACTION=PATH")
            if frac != 1.0:
                raise ValueError(
                    f"generators entry {g!r}: only a fraction-1.0 generator can be shared; smaller fractions "
                    "draw a different patient subset per seed and get a generator trained on that subset"
                )
            if frac in seen:
                raise ValueError(f"generators: two entries for fraction {frac:g}")
            seen.add(frac)


# ----------------------------------------------------------------------- compare (pipeline.compare)
@dataclass
class CompareConfig:
    # where the runs are: tracking.uri (empty: MLFLOW_TRACKING_URI, else the embedded store) and
    # tracking.experiment (the runs of this experiment are compared)
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="cxr-vaegan-gain"))
    filter: str = ""  # an MLflow filter string, e.g. "tags.arm = 'real'"
    metric: str = "test/auroc"
    out: str = "outputs/compare"

    # spelled as every stage's tracking section since 2026-12-06 (read, with a message, for a release)
    RENAMED: ClassVar[dict[str, Renamed]] = {
        "experiment": Renamed("tracking.experiment"),
        "uri": Renamed("tracking.uri"),
    }


# ------------------------------------------------------------------------ report (pipeline.report)
@dataclass
class ReportConfig:
    records: str = ""  # a study's records folder (gain's records=), e.g. docs/studies/kermany64
    out: str = ""  # the Markdown page to write; its plots go beside it ("" = RECORDS/report.md)
    title: str = "Does synthetic augmentation help?"
    notes: str = ""  # a Markdown file placed under the verdict (discussion, the recipe ablation)
    # instead of records: the records folders of a recipe ablation's variants (one study each), and
    # the split that chooses among them (a held-out selection split, never a test split)
    variants: list[str] = field(default_factory=list)
    select_split: str = "holdout"

    def __post_init__(self) -> None:
        if bool(self.records) == bool(self.variants):
            raise ValueError(
                "give records= (a study's records folder) or variants=[...] (a recipe ablation's), one of them"
            )
