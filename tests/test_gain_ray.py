"""gain executor=ray: the study's items as Ray tasks on a local Ray instance (2 single-CPU workers,
tiny images) give the records, keys and table of executor=local; a worker killed mid-study is
retried and the study finishes with every child recorded once."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from cxr_factory import TINY_GAIN_CLASSIFY

from pipeline.infra.config import ConfigError, load_config
from pipeline.infra.records import StudyRecords

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install '.[ray]'")


def _args(manifest, tmp_path, name: str, *extra: str) -> list[str]:
    return [
        f"classify.data.manifest={manifest}",
        *TINY_GAIN_CLASSIFY,
        "classify.epochs=2",
        f"classify.tracking.uri=sqlite:///{tmp_path / (name + '.db')}",
        "arms=[real,classical,synthetic]",
        "fractions=[1.0]",
        "seeds=[0,1]",
        "vaegan_overrides=[epochs=1,data.batch_size=16,model.base_channels=8,model.latent_dim=8,"
        "model.num_classes=2,grid_size=4,tracking.log_model=false,threads=1]",
        f"out_dir={tmp_path / name}",
        "tracking.run_name=t",
        f"records={tmp_path / name / 'records'}",
        *extra,
    ]


def _gain(*args):
    from pipeline.gain import GainConfig, gain

    return gain(load_config(GainConfig, None, list(args)))


def _summary(records) -> dict:
    recs = StudyRecords(records)
    children = {n: (r["key"], r["metrics"]["test/auroc"]) for n, r in recs.all("children").items()}
    generators = {n: r["key"] for n, r in recs.all("generators").items()}
    return {"children": children, "generators": generators}


@pytest.fixture
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_gives_the_records_keys_and_table_of_the_local_executor(tmp_path, phantom_manifest, local_ray):
    local = _gain(*_args(phantom_manifest, tmp_path, "local"))
    on_ray = _gain(*_args(phantom_manifest, tmp_path, "ray", "executor=ray", "ray.num_cpus=1"))
    a, b = _summary(tmp_path / "local" / "records"), _summary(tmp_path / "ray" / "records")
    assert a == b and len(a["children"]) == 6 and list(a["generators"]) == ["vaegan-f1"]
    ta = local["table"].set_index(["split", "fraction", "arm"])[["auroc", "paired_delta"]]
    tb = on_ray["table"].set_index(["split", "fraction", "arm"])[["auroc", "paired_delta"]]
    assert np.allclose(ta.to_numpy(), tb.to_numpy(), equal_nan=True)
    # and a study started on Ray continues locally: nothing left to train
    again = _gain(*_args(phantom_manifest, tmp_path, "ray"))
    assert again["trained"] == 0


def _worker_pids() -> list[int]:
    """Ray's worker processes running one of the study's tasks (their title names the task)."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                cmd = Path(f"/proc/{d}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if cmd.startswith("ray::_item_task"):
                pids.append(int(d))
    return pids


def test_a_worker_killed_mid_study_is_retried_and_every_child_is_recorded_once(
    tmp_path, phantom_manifest, local_ray
):
    killed = []

    def kill_one():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            pids = _worker_pids()
            if pids:
                time.sleep(0.5)  # let it get into its child
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.05)

    t = threading.Thread(target=kill_one)
    t.start()
    res = _gain(
        *_args(phantom_manifest, tmp_path, "k", "executor=ray", "ray.num_cpus=1", "ray.max_retries=3")
    )
    t.join()
    assert killed, "no worker was running a task"
    recs = StudyRecords(tmp_path / "k" / "records")
    assert sorted(recs.all("children")) == sorted(
        f"{a}-f1-s{s}" for a in ("real", "classical", "synthetic") for s in (0, 1)
    )
    # one FINISHED MLflow run per child: the killed attempt left none, or one that is not FINISHED
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'k.db'}")
    runs = client.search_runs(
        [client.get_experiment_by_name("cxr-vaegan-gain").experiment_id],
        f"tags.mlflow.parentRunId = '{res['parent_run_id']}' and attributes.status = 'FINISHED'",
    )
    names = [r.info.run_name for r in runs if r.data.tags.get("stage") == "classify"]
    assert sorted(names) == sorted(set(names)) and len(names) == 6
    json.dumps(res["runs"].to_dict())  # the table is whole


def test_ray_refuses_a_budget(tmp_path, phantom_manifest):
    # a budget stops before an item; a Ray study submits all of them at once
    from pipeline.gain import GainConfig

    with pytest.raises(ConfigError, match="max_minutes works with executor=local only"):
        load_config(GainConfig, None, ["executor=ray", "max_minutes=5"])
