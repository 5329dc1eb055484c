"""``python -m pipeline.run gain [CONFIG.yaml] [key=value ...]``: does synthetic augmentation help?

Arms x real-training fractions x seeds, each a child MLflow run of one parent run:

* for each fraction f and seed s, a subset of the real train (and val) split is drawn by patient,
  stratified by label (``pipeline.data.write_subset_manifest``); the test split is never reduced;
* the VAE-GAN that feeds the synthetic arms of (f, s) is trained on that subset only, so no real
  image outside it reaches the classifier through the generator. At f = 1 every seed has the same
  subset, so one generator serves all seeds (``generators=['1.0=PATH']`` reuses one trained before);
* every arm is trained by the classify stage with the same seed, so arms can be paired by seed.

Output on the parent run: per fraction and arm, the mean AUROC difference to real-only over seeds
(paired by seed) with a 95 % t-interval, as a CSV, a Markdown table and a plot. Finished children
are kept: a re-run skips every (arm, fraction, seed) whose ``result.json`` exists.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline import distributed
from pipeline.classify import ARMS, ClassifyConfig, classify

DEFAULT_ARMS = ["real", "classical", "synthetic", "synthetic_only"]


@dataclass
class GainConfig:
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)  # the base of every arm
    arms: list[str] = field(default_factory=lambda: list(DEFAULT_ARMS))
    fractions: list[float] = field(default_factory=lambda: [0.1, 1.0])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    # "FRACTION=PATH": a generator trained on exactly that fraction's train split (only 1.0 is
    # the same subset for every seed, so only 1.0 may be reused)
    generators: list[str] = field(default_factory=list)
    vaegan_config: str = ""  # YAML for the VAE-GANs trained per subset ("" = TrainConfig defaults)
    vaegan_overrides: list[str] = field(default_factory=list)  # e.g. ["epochs=30"]
    experiment: str = "cxr-vaegan-gain"
    run_name: str = ""
    out_dir: str = "outputs/gain"

    def __post_init__(self) -> None:
        bad = [a for a in self.arms if a not in ARMS]
        if bad:
            raise ValueError(f"unknown arm(s) {bad}; choose from {ARMS}")
        if "real" not in self.arms:
            raise ValueError("arms must include 'real': every gain is measured against real-only")
        if not self.fractions or any(not 0 < f <= 1 for f in self.fractions):
            raise ValueError(f"fractions must be in (0, 1], got {self.fractions}")
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        for g in self.generators:
            f, _, path = g.partition("=")
            if not path:
                raise ValueError(f"generators entry {g!r} is not FRACTION=PATH")
            if float(f) != 1.0:
                raise ValueError(
                    f"generators entry {g!r}: only a fraction-1.0 generator can be shared; smaller fractions "
                    "draw a different patient subset per seed and get a generator trained on that subset"
                )


def _generator_for(
    cfg: GainConfig,
    fraction: float,
    seed: int,
    manifest: Path,
    out: Path,
    parent_id: str,
    cache: dict,
    dinfo: distributed.DistInfo,
) -> str:
    """A generator checkpoint trained on exactly this subset (trained, resumed or reused)."""
    from pipeline.config import load_config
    from pipeline.train import TrainConfig, train

    given = {float(g.partition("=")[0]): g.partition("=")[2] for g in cfg.generators}
    if fraction in given:
        return given[fraction]
    key = (fraction, None if fraction == 1.0 else seed)
    if key in cache:
        return cache[key]
    name = f"vaegan-f{fraction:g}" + ("" if fraction == 1.0 else f"-s{seed}")
    run_dir = out / "generators" / name
    last = run_dir / "checkpoints" / "last.pt"
    overrides = [
        f"data.manifest={manifest}",
        # the generator must make images of the classifier's size
        f"data.image_size={cfg.classify.data.image_size}",
        "model.image_size=0",
        f"seed={seed}",
        f"out_dir={out / 'generators'}",
        f"tracking.run_name={name}",
        f"tracking.experiment={cfg.experiment}",
        f"tracking.uri={cfg.classify.tracking.uri}",
        f"tracking.parent_run_id={parent_id}",
        "tracking.register_model=''",
        *cfg.vaegan_overrides,
    ]
    tcfg = load_config(TrainConfig, cfg.vaegan_config or None, overrides)
    # under torchrun every replica must take the same branch: rank 0 reads the files
    if distributed.agree((run_dir / "done").is_file() and last.is_file(), dinfo):
        cache[key] = str(last)
        return cache[key]
    if distributed.agree(last.is_file(), dinfo):
        tcfg.resume = str(last)  # an interrupted generator continues where it stopped
    print(f"gain: training the generator for fraction {fraction:g} seed {seed} on {manifest}", flush=True)
    res = train(tcfg)
    if dinfo.is_main:
        (run_dir / "done").write_text(str(res["run_id"]))
    cache[key] = res["checkpoint"]
    return cache[key]


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
    return c


def _run_children(
    cfg: GainConfig,
    base: ClassifyConfig,
    manifest: Path,
    out: Path,
    parent_id: str,
    dinfo: distributed.DistInfo,
    client,
) -> list[dict[str, Any]]:
    """Every (fraction, seed, arm) child in order, trained or picked up from an earlier run.

    Under torchrun every replica walks the same sequence (each child trains data-parallel);
    rank 0 alone writes subsets, reads finished results, tags runs and returns the rows, and the
    decisions that depend on its files are broadcast so that every replica takes the same branch.
    """
    from pipeline.data import write_subset_manifest

    gen_cache: dict = {}
    rows: list[dict[str, Any]] = []
    for fraction in cfg.fractions:
        for seed in cfg.seeds:
            sub = manifest if fraction == 1.0 else out / "subsets" / f"f{fraction:g}_s{seed}.csv"
            if fraction != 1.0 and dinfo.is_main:
                write_subset_manifest(manifest, fraction, seed, sub)
            distributed.barrier(dinfo)  # the replicas read the subset rank 0 wrote
            gen_path = None
            for arm in cfg.arms:
                name = f"{arm}-f{fraction:g}-s{seed}"
                done = out / "children" / name / "result.json"
                if distributed.agree(done.is_file(), dinfo):
                    if not dinfo.is_main:
                        continue
                    res = json.loads(done.read_text())
                    print(f"gain: {name} already done (run {res['run_id']})", flush=True)
                else:
                    if "synthetic" in arm and gen_path is None:
                        gen_path = _generator_for(
                            cfg, fraction, seed, Path(sub), out, parent_id, gen_cache, dinfo
                        )
                    res = classify(
                        _child_config(cfg, base, arm, fraction, seed, sub, gen_path, out, parent_id)
                    )
                    if not dinfo.is_main:
                        continue
                    if res["run_id"]:  # None: the child's tracking is buffered in its outbox
                        client.set_tag(res["run_id"], "fraction", f"{fraction:g}")
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
                        "run_id": res["run_id"],
                    }
                )
            if any("synthetic" in a for a in cfg.arms):
                fid = _generator_fidelity(
                    cfg, fraction, seed, Path(sub), out, parent_id, gen_cache, gen_path, dinfo
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
    sub: Path,
    out: Path,
    parent_id: str,
    gen_cache: dict,
    gen_path: str | None,
    dinfo: distributed.DistInfo,
) -> float:
    """Class fidelity of the (fraction, seed) generator, scored by that subset's real-only classifier.

    A generator can lose its class conditioning with nothing odd in its losses (one 30-epoch run in
    six did, docs/benchmarks.md); its synthetic arms then measure wrong labels, not synthetic data.
    Saved beside the children, so a re-run does not recompute it. NaN on ranks other than 0.
    """
    from pipeline.engine import pick_device
    from pipeline.evaluate import class_fidelity

    path = out / "children" / f"generator-fidelity-f{fraction:g}-s{seed}.json"
    if not distributed.agree(path.is_file(), dinfo):
        if gen_path is None:  # every synthetic child was done before: find its generator again
            gen_path = _generator_for(cfg, fraction, seed, sub, out, parent_id, gen_cache, dinfo)
        if dinfo.is_main:
            clf = out / "children" / f"real-f{fraction:g}-s{seed}" / "classifier.pt"
            if not clf.is_file():  # a real-only child from elsewhere, without its checkpoint
                print(f"gain: no {clf}: class fidelity of this generator not scored", flush=True)
                return float("nan")
            fid = class_fidelity(gen_path, clf, seed=seed, device=pick_device(cfg.classify.device))
            path.write_text(json.dumps({**fid, "generator": str(gen_path), "classifier": str(clf)}, indent=1))
    if not dinfo.is_main:
        return float("nan")
    fid = json.loads(path.read_text())
    auc = float(fid.get("auroc", float("nan")))
    if auc < FIDELITY_WARN:
        print(
            f"gain: WARNING the generator for fraction {fraction:g} seed {seed} has class fidelity "
            f"{auc:.3f} (< {FIDELITY_WARN}): its labelled images are unreliable, so this seed's synthetic "
            f"arms test a generator that lost its labels ({fid['generator']})",
            flush=True,
        )
    return auc


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """Per (fraction, arm): mean AUROC with a t-interval over seeds and the AUROC difference to
    real-only paired by seed, with its t-interval."""
    from pipeline.metrics import mean_ci

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
                "delta_auroc": dm,
                "delta_lo": dlo,
                "delta_hi": dhi,
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


def to_markdown(table: pd.DataFrame) -> str:
    head = (
        "| fraction | arm | seeds | AUROC (95% CI) | ΔAUROC vs real (95% CI) | bal. acc | sens | spec "
        "| generator class fidelity (mean, min) |\n"
    )
    head += "|---|---|---|---|---|---|---|---|---|\n"
    lines = []
    for r in table.itertuples():
        delta = "—" if r.arm == "real" else f"{r.delta_auroc:+.4f} [{r.delta_lo:+.4f}, {r.delta_hi:+.4f}]"
        fid, fid_min = r.generator_class_fidelity, r.generator_class_fidelity_min
        fid_s = "—" if not np.isfinite(fid) else f"{fid:.3f}, {fid_min:.3f}"
        lines.append(
            f"| {r.fraction:g} | {r.arm} | {r.n_seeds} | {r.auroc:.4f} [{r.auroc_lo:.4f}, {r.auroc_hi:.4f}] | "
            f"{delta} | {r.balanced_accuracy:.4f} | {r.sensitivity:.4f} | {r.specificity:.4f} | {fid_s} |"
        )
    return head + "\n".join(lines) + "\n"


def _parent_run(cfg: GainConfig, base: ClassifyConfig, manifest: Path, out: Path):
    """(MLflow client, parent run id): the run every child hangs under; a re-run continues it."""
    import mlflow

    from pipeline import tracking
    from pipeline.config import flatten, to_dict
    from pipeline.engine import check_writable

    check_writable(out)
    tcfg = copy.deepcopy(base.tracking)
    tcfg.experiment = cfg.experiment
    exp_id = tracking.setup(tcfg)
    client = mlflow.tracking.MlflowClient()
    state_file = out / "parent_run_id"
    if state_file.is_file():
        parent_id = state_file.read_text().strip()
    else:
        parent = client.create_run(
            exp_id,
            run_name=cfg.run_name or f"gain-{time.strftime('%Y%m%d-%H%M%S')}",
            tags={"stage": "gain", "git_commit": tracking.git_commit(), "data.manifest": str(manifest)},
        )
        parent_id = parent.info.run_id
        state_file.write_text(parent_id)
        for k, v in flatten(to_dict(cfg)).items():
            client.log_param(parent_id, k, str(v)[:500])
    print(f"gain: parent MLflow run {parent_id} in experiment {cfg.experiment}", flush=True)
    return client, parent_id


def gain(cfg: GainConfig) -> dict[str, Any]:
    from pipeline.data import resolve_manifest
    from pipeline.viz import plot_gain

    base = copy.deepcopy(cfg.classify)
    manifest = resolve_manifest(base.data)
    out = Path(cfg.out_dir) / (cfg.run_name or "gain")
    # under torchrun (N processes) every child trains data-parallel; rank 0 alone writes files and
    # talks to MLflow, and broadcasts the decisions that depend on them
    dinfo = distributed.init()
    client, parent_id = _parent_run(cfg, base, manifest, out) if dinfo.is_main else (None, None)
    parent_id = distributed.agree(parent_id, dinfo)
    t0 = time.time()
    rows = _run_children(cfg, base, manifest, out, parent_id, dinfo, client)
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
    client.set_terminated(parent_id)
    distributed.shutdown(dinfo)
    print(md)
    print(f"gain: done in {time.time() - t0:.0f}s; table {out / 'gain_table.md'}, plot {plot}")
    print(f"MLflow parent run id: {parent_id}")
    return {"parent_run_id": parent_id, "table": table, "runs": results, "plot": str(plot)}
