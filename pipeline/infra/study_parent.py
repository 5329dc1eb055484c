"""The MLflow parent run of a value study (:mod:`pipeline.gain`): opened (or continued) before the
first item, ended FINISHED with the table, the plots and the metrics, or FAILED / KILLED with the
error; and SIGTERM taken as Ctrl-C, so a batch job's end ends the parent run too."""

from __future__ import annotations

import contextlib
import copy
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
from pipeline.infra.stage_configs import GainConfig, TrackingConfig
from pipeline.infra.study_plan import config_key, study_config
from pipeline.infra.study_report import summarise, to_markdown
from pipeline.infra.viz import plot_gain


def open_parent(cfg: GainConfig, out: Path, tracking_cfg: TrackingConfig, source: Path | None):
    """The MLflow run every child hangs under (``tracking_cfg``: the children's, in the study's
    experiment); a re-run in the same folder ``out`` continues it. Returns (client, run id)."""
    import mlflow
    from mlflow.entities import Param

    check_writable(out)
    tcfg = copy.deepcopy(tracking_cfg)
    tcfg.experiment = cfg.tracking.experiment
    exp_id = tracking.setup(tcfg)
    client = mlflow.tracking.MlflowClient()
    state = out / "parent_run_id"
    if state.is_file():
        parent_id = state.read_text().strip()
        try:
            run = client.get_run(parent_id)
        except Exception as e:  # noqa: BLE001 - MlflowException, or a store that cannot be read
            raise ConfigError(
                f"gain: {state} names the parent run {parent_id}, which the tracking store "
                f"{tracking.resolve_uri(tcfg)} does not have ({type(e).__name__}): use the store the study "
                "was started in (tracking.uri), or another tracking.run_name= (the records carry the study)"
            ) from None
        if run.info.lifecycle_stage == "deleted":
            raise ConfigError(
                f"gain: the parent run {parent_id} named in {state} was deleted: restore it, or use another tracking.run_name="
            )
        if run.info.status != "RUNNING":
            client.update_run(parent_id, status="RUNNING")
    else:
        now = study_config(cfg)
        parent = client.create_run(
            exp_id,
            run_name=cfg.tracking.run_name or f"gain-{time.strftime('%Y%m%d-%H%M%S')}",
            tags={
                "stage": "gain",
                "git_commit": tracking.git_commit(),
                "data.manifest": str(source),
                "gain_config_key": config_key(now),
            },
        )
        parent_id = parent.info.run_id
        try:
            params = [Param(k, str(v)[:500]) for k, v in flatten(to_dict(cfg)).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params a call
                client.log_batch(parent_id, params=params[i : i + 100])
            state.write_text(parent_id)
        except BaseException as e:
            end_parent(client, parent_id, e)
            raise
    print(f"gain: parent MLflow run {parent_id} in experiment {cfg.tracking.experiment}", flush=True)
    return client, parent_id


def end_parent(client, parent_id: str | None, exc: BaseException) -> None:
    """End the parent run FAILED (KILLED on Ctrl-C, SIGTERM or the budget); a tracking error
    here is printed, never raised over ``exc``."""
    if client is None or parent_id is None:
        return
    status = "KILLED" if isinstance(exc, (KeyboardInterrupt, BudgetReached)) else "FAILED"
    try:
        client.set_tag(parent_id, "gain.error", f"{type(exc).__name__}: {exc}"[:500])
        client.set_terminated(parent_id, status)
    except Exception as e:  # noqa: BLE001 - the study's own error is the one to raise
        print(
            f"gain: could not mark the parent run {parent_id} {status}: {e}",
            file=sys.stderr,
            flush=True,
        )
        return
    print(
        f"gain: parent run {parent_id} ended {status} ({type(exc).__name__}: {exc})",
        file=sys.stderr,
        flush=True,
    )


def finish_parent(
    client, pid: str, cfg: GainConfig, out: Path, rows: pd.DataFrame, t0: float
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
        client.log_artifact(pid, str(out / p), "gain")
    for r in table.itertuples():
        tag = "" if r.split == test_split else f"{r.split}/"
        if r.arm != "real" and np.isfinite(r.paired_delta):
            client.log_metric(pid, f"{tag}delta_auroc/{r.arm}/f{r.fraction:g}", float(r.paired_delta))
        client.log_metric(pid, f"{tag}auroc/{r.arm}/f{r.fraction:g}", float(r.auroc))
    client.set_terminated(pid, "FINISHED")
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
