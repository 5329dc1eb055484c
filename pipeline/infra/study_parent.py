"""The MLflow parent run of a value study (:mod:`pipeline.gain`): opened (or continued) before the
first item, ended FINISHED with the table, the plots and the metrics, or FAILED / KILLED with the
error; and SIGTERM taken as Ctrl-C, so a batch job's end ends the parent run too."""

from __future__ import annotations

import contextlib
import copy
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.infra import tracking
from pipeline.infra.config import BudgetReached, ConfigError, flatten, to_dict
from pipeline.infra.engine import check_writable
from pipeline.infra.runtime import run_tags
from pipeline.infra.stage_configs import TrackingConfig
from pipeline.infra.study_configs import GainConfig
from pipeline.infra.study_plan import config_key, study_config
from pipeline.infra.study_report import summarise, to_markdown
from pipeline.infra.tracking import Tracker
from pipeline.infra.viz import plot_gain


def open_parent(cfg: GainConfig, out: Path, tracking_cfg: TrackingConfig, source: Path | None) -> Tracker:
    """The MLflow run every child hangs under, started through the stages' one tracker
    (``tracking_cfg``: the children's, in the study's experiment); a re-run in the same folder
    ``out`` continues it (its id is in ``out/parent_run_id``). The store must answer here: the
    children are linked to this run by its id."""
    check_writable(out)
    tcfg = copy.deepcopy(tracking_cfg)
    tcfg.experiment = cfg.tracking.experiment
    state = out / "parent_run_id"
    parent_id = state.read_text().strip() if state.is_file() else None
    # its own folder inside the study's: the study's folder is no run folder (engine.set_aside)
    tracker = Tracker(tcfg, out / "parent_run")
    if parent_id:
        _check_parent(tracker, parent_id, state)
    tags = run_tags(
        "gain",
        tcfg,
        tracking.git_commit(),
        **{"data.manifest": str(source), "gain_config_key": config_key(study_config(cfg))},
    )
    tracker.start(parent_id, cfg.tracking.run_name or f"gain-{time.strftime('%Y%m%d-%H%M%S')}", tags)
    if tracker.run_id is None:
        tracker.enabled = False  # nothing more goes to a run that does not exist
        if parent_id is None:  # nothing but the unsent start is buffered: the next start begins anew
            shutil.rmtree(out / "parent_run", ignore_errors=True)
        raise ConfigError(
            f"gain: the tracking store {tracker.uri} cannot be reached ({tracker.last_error}): a study "
            "links its children to its parent run, so it starts with the store up (start the server, "
            "or set tracking.uri); its records are kept"
        )
    if parent_id is None:
        try:
            tracker.log_params(flatten(to_dict(cfg)))
            state.write_text(tracker.run_id)
        except BaseException as e:
            end_parent(tracker, e)
            raise
    print(f"gain: parent MLflow run {tracker.run_id} in experiment {cfg.tracking.experiment}", flush=True)
    return tracker


def _check_parent(tracker: Tracker, parent_id: str, state: Path) -> None:
    """A parent run named in ``state`` must be in the store and not deleted."""
    try:
        run = tracker.client.get_run(parent_id)
    except Exception as e:  # noqa: BLE001 - MlflowException, or a store that cannot be read
        raise ConfigError(
            f"gain: {state} names the parent run {parent_id}, which the tracking store "
            f"{tracker.uri} does not have ({type(e).__name__}): use the store the study was started "
            "in (tracking.uri), or another tracking.run_name= (the records carry the study)"
        ) from None
    if run.info.lifecycle_stage == "deleted":
        raise ConfigError(
            f"gain: the parent run {parent_id} named in {state} was deleted: restore it, or use another "
            "tracking.run_name="
        )


def end_parent(tracker: Tracker | None, exc: BaseException) -> None:
    """End the parent run FAILED (KILLED on Ctrl-C, SIGTERM or the budget), the error tagged."""
    if tracker is None or tracker.run_id is None:
        return
    status = "KILLED" if isinstance(exc, (KeyboardInterrupt, BudgetReached)) else "FAILED"
    try:
        tracker.log_tags({"gain.error": f"{type(exc).__name__}: {exc}"[:500]})
        tracker.close(status)
    except Exception as e:  # noqa: BLE001 - the study's own error is the one to raise
        print(
            f"gain: could not mark the parent run {tracker.run_id} {status}: {e}", file=sys.stderr, flush=True
        )
        return
    print(
        f"gain: parent run {tracker.run_id} ended {status} ({type(exc).__name__}: {exc})",
        file=sys.stderr,
        flush=True,
    )


def finish_parent(
    tracker: Tracker, cfg: GainConfig, out: Path, rows: pd.DataFrame, t0: float
) -> dict[str, Any]:
    """The table, the plots and the metrics on the parent run (ended FINISHED); ``rows`` are the
    study's :func:`pipeline.infra.study_report.child_rows`, ``t0`` when it started."""
    test_split = cfg.classify.test_split
    table = summarise(rows)
    rows.drop(columns=["labels", "scores"]).to_csv(out / "gain_runs.csv", index=False)
    table.to_csv(out / "gain_table.csv", index=False)
    md = ""
    for split, t in table.groupby("split", sort=False):
        md += f"### {split}\n\n" + to_markdown(t) + "\n"
    (out / "gain_table.md").write_text(md)
    plots = _plots(table[table["split"] == test_split], out, len(cfg.seeds))
    for p in ("gain_runs.csv", "gain_table.csv", "gain_table.md", *(Path(p).name for p in plots)):
        tracker.log_artifact(out / p, "gain")
    metrics = {}
    for r in table.itertuples():
        tag = "" if r.split == test_split else f"{r.split}/"
        if r.arm != "real" and np.isfinite(r.paired_delta):
            metrics[f"{tag}delta_auroc/{r.arm}/f{r.fraction:g}"] = float(r.paired_delta)
        metrics[f"{tag}auroc/{r.arm}/f{r.fraction:g}"] = float(r.auroc)
    tracker.log_metrics(metrics, step=0)
    tracker.close("FINISHED")
    pid = tracker.run_id
    print(md)
    print(f"gain: done in {time.time() - t0:.0f}s; table {out / 'gain_table.md'}, plot {plots[0]}")
    print(f"MLflow parent run id: {pid}")
    runs = rows[rows["split"] == test_split].drop(columns=["labels", "scores"]).reset_index(drop=True)
    return {"parent_run_id": pid, "table": table, "runs": runs, "plot": str(plots[0])}


def _plots(test: pd.DataFrame, out: Path, n_seeds: int) -> list[Path]:
    """The paired gain over real-only (and over real_dup, when the study has it) on the test split."""
    plots = [plot_gain(test, out / "gain.png", title=f"AUROC gain over real-only, paired ({n_seeds} seeds)")]
    if "real_dup" in set(test["arm"]):
        plots.append(
            plot_gain(
                test, out / "gain_vs_real_dup.png", title="AUROC gain over real_dup, paired", ref="real_dup"
            )
        )
    return plots


@contextlib.contextmanager
def sigterm_as_interrupt():
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
