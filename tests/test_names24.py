"""Issue 24: run names are names, a fresh run moves aside only a folder this pipeline made, resume
continues a checkpoint in its own run folder only, and a tracking outbox writes to its own,
still-running run only (a last line cut short by a kill is skipped, not fatal).

Everything here is real: tiny training runs, a real sqlite MLflow store under tmp_path, outboxes
written by a real Tracker whose server (a port nobody listens on) cannot be reached.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import mlflow
import pytest
from cxr_factory import tiny_train_config
from mlflow_server import free_port

from pipeline.classify import ClassifyConfig
from pipeline.infra import checkpoint as ckpt
from pipeline.infra import engine, outbox, tracking
from pipeline.infra.config import ConfigError, load_config
from pipeline.infra.stage_configs import TrackingConfig
from pipeline.infra.study_configs import GainConfig
from pipeline.train import TrainConfig, train


def _client(tmp_path: Path):
    return mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")


# ------------------------------------------------------------------------- item 2: run names
@pytest.mark.parametrize(
    "name",
    [
        ".",  # before: moved the whole out_dir, every other run with it, to out.replaced-STAMP
        "..",
        "../../x",  # before: wrote outside out_dir
        "/tmp/x",  # before: moved any folder of the machine aside and put the run in its place
        "a/b",
        "'a\\b'",
        "'   '",
        '"a\\x07b"',  # a control character
        "x" * 200,
    ],
)
def test_a_run_name_that_is_not_one_folder_name_is_refused(tmp_path, name):
    with pytest.raises(ConfigError, match=r"tracking\.run_name=.*a run name is one folder name"):
        load_config(TrainConfig, None, [f"out_dir={tmp_path / 'out'}", f"tracking.run_name={name}"])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "cls,override",
    [(GainConfig, "tracking.run_name=.."), (ClassifyConfig, "tracking.run_name=/etc")],
)
def test_gain_and_classify_run_names_are_names_too(cls, override):
    # gain writes OUT_DIR/RUN_NAME, classify OUT_DIR/RUN_NAME (tracking.run_name): both once took any path
    with pytest.raises(ConfigError, match=r"run_name=.*not a path"):
        load_config(cls, None, [override])


def test_a_fresh_run_never_moves_aside_a_folder_it_did_not_create(tmp_path, phantom_manifest):
    mine = tmp_path / "out" / "data"
    (mine / "sub").mkdir(parents=True)
    (mine / "sub" / "notes.txt").write_text("not a run")
    # before: moved to out/data.replaced-STAMP and the run put in its place
    with pytest.raises(FileExistsError, match=rf"{re.escape(str(mine))} exists and is not a run folder"):
        train(tiny_train_config(phantom_manifest, tmp_path, "tracking.run_name=data"))
    assert (mine / "sub" / "notes.txt").read_text() == "not a run"
    assert not list((tmp_path / "out").glob("data.replaced-*"))


def test_a_folder_holding_only_empty_folders_is_used_as_it_is(tmp_path):
    # what a run that died before it began tracking leaves: nothing to keep, nothing to refuse
    (tmp_path / "a" / "checkpoints").mkdir(parents=True)
    assert engine.set_aside(tmp_path / "a") is None
    assert (tmp_path / "a" / "checkpoints").is_dir()


def _offline(monkeypatch) -> TrackingConfig:
    """Tracking to a port nobody listens on (what fail_fast_http would set, restored after)."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
    return TrackingConfig(uri=f"http://127.0.0.1:{free_port()}", experiment="names24", retry_s=3600)


def test_a_run_folder_whose_server_was_never_reached_is_still_set_aside(tmp_path, monkeypatch):
    run_dir = tmp_path / "out" / "a"
    tr = tracking.Tracker(_offline(monkeypatch), run_dir)
    tr.start(None, "a")
    tr.log_metrics({"m": 1.0}, step=1)
    tr.close("FAILED")
    # it carries the run marker from its start, empty until the server sees the run
    assert (run_dir / ckpt.RUN_ID_FILE).read_text() == ""
    assert engine.previous_run_id(run_dir) is None
    moved = engine.set_aside(run_dir)
    assert moved is not None and (moved / "tracking_outbox" / "ops.jsonl").is_file()


# ------------------------------------------------------------ item 3: resume=PATH outside a run
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, phantom_manifest):
    root = tmp_path_factory.mktemp("orig")
    res = train(tiny_train_config(phantom_manifest, root, "tracking.run_name=orig"))
    return {**res, "root": root}


@pytest.mark.parametrize("where", ["x/last.pt", "download/checkpoints/last.pt"])
def test_resume_from_a_checkpoint_outside_its_run_folder_is_refused(
    tmp_path, phantom_manifest, finished_run, where
):
    copy = tmp_path / where
    copy.parent.mkdir(parents=True)
    shutil.copy2(finished_run["checkpoint"], copy)
    cfg = tiny_train_config(phantom_manifest, finished_run["root"], "epochs=2", f"resume={copy}")
    # before: PATH/../.. was the run folder (checkpoints/ and grids/ beside the copy's folder, a
    # lock file one level up) and the original MLflow run went on without holding its lock
    with pytest.raises(
        ckpt.CheckpointError, match=rf"resume={re.escape(str(copy))}: .* is not in a run folder"
    ):
        train(cfg)
    parent = copy.parent.parent
    assert [p.name for p in parent.iterdir()] == [copy.parent.name]  # no checkpoints/, grids/ beside it
    assert not (parent.parent / f".{parent.name}.lock").exists()
    run = _client(finished_run["root"]).get_run(finished_run["run_id"])
    assert run.info.status == "FINISHED"
    assert ckpt.load_checkpoint(finished_run["checkpoint"])["epoch"] == 1


# ------------------------------------------------------------------ item 4: the tracking outbox
def _running_run(tmp_path: Path, name: str) -> str:
    client = _client(tmp_path)
    exp = client.get_experiment_by_name("names24") or client.get_experiment(
        client.create_experiment("names24")
    )
    return client.create_run(exp.experiment_id, run_name=name).info.run_id


def _outbox_of(tmp_path: Path, monkeypatch, run_id: str, folder: str = "run") -> Path:
    """The outbox a process continuing ``run_id`` leaves when its server is down throughout."""
    tr = tracking.Tracker(_offline(monkeypatch), tmp_path / folder)
    tr.start(run_id, folder)
    tr.log_params({"p": "1"})
    tr.log_metrics({"m": 1.0}, step=1)
    tr.close("FAILED")
    assert tr.pending
    return tr.box.folder


def test_sync_sends_an_outbox_to_its_own_run(tmp_path, monkeypatch):
    rid = _running_run(tmp_path, "r")
    box = _outbox_of(tmp_path, monkeypatch, rid)
    res = tracking.sync(box, uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert res["pending"] == 0 and res["run_id"] == rid
    run = _client(tmp_path).get_run(rid)
    assert run.data.params["p"] == "1" and run.data.metrics["m"] == 1.0 and run.info.status == "FAILED"


def test_sync_refuses_a_state_json_naming_another_run(tmp_path, monkeypatch):
    rid = _running_run(tmp_path, "r")
    other = _running_run(tmp_path, "other")
    _client(tmp_path).set_terminated(other, "FINISHED")
    box = _outbox_of(tmp_path, monkeypatch, rid)
    state = json.loads((box / "state.json").read_text())
    (box / "state.json").write_text(json.dumps({**state, "run_id": other}))
    # before: the other, finished run got the param and the metric and went FINISHED -> FAILED
    with pytest.raises(outbox.OutboxError, match=rf"names MLflow run {other}, but .* made for run {rid}"):
        tracking.sync(box, uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    for r in (other, rid):
        run = _client(tmp_path).get_run(r)
        assert not run.data.params and not run.data.metrics
    assert _client(tmp_path).get_run(other).info.status == "FINISHED"


def test_sync_never_writes_into_a_run_that_has_ended(tmp_path, monkeypatch):
    rid = _running_run(tmp_path, "r")
    other = _running_run(tmp_path, "other")
    _client(tmp_path).set_terminated(other, "FINISHED")
    box = _outbox_of(tmp_path, monkeypatch, rid)
    # a crafted outbox: state and operations agree on the other, finished run
    for name in ("state.json", "ops.jsonl"):
        (box / name).write_text((box / name).read_text().replace(rid, other))
    with pytest.raises(outbox.OutboxError, match=rf"run {other} has already ended \(FINISHED\)"):
        tracking.sync(box, uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = _client(tmp_path).get_run(other)
    assert run.info.status == "FINISHED" and not run.data.params and not run.data.metrics


def test_a_cut_last_line_is_skipped_and_reported_not_fatal(tmp_path, monkeypatch, capfd):
    rid = _running_run(tmp_path, "r")
    box = _outbox_of(tmp_path, monkeypatch, rid)
    with open(box / "ops.jsonl", "a") as f:  # a kill during the append
        f.write('{"op": "metrics", "data": {"m": 9.0}, "st')
    # the run goes on while the server is still down: its next operation is not glued to the cut one
    tr = tracking.Tracker(_offline(monkeypatch), tmp_path / "run")
    tr.start(rid, "run")
    tr.log_metrics({"m": 2.0}, step=2)
    tr.close("FINISHED")
    assert "was cut short" in capfd.readouterr().err
    # before: "line 4: not JSON; nothing was sent", for every operation of the outbox
    res = tracking.sync(box, uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert res["pending"] == 0
    history = _client(tmp_path).get_metric_history(rid, "m")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 2.0)]
    assert _client(tmp_path).get_run(rid).info.status == "FINISHED"


def test_a_malformed_line_in_the_middle_is_still_refused(tmp_path, monkeypatch):
    rid = _running_run(tmp_path, "r")
    box = _outbox_of(tmp_path, monkeypatch, rid)
    lines = (box / "ops.jsonl").read_text().splitlines(keepends=True)
    (box / "ops.jsonl").write_text("".join([*lines[:2], '{"op": "metr\n', *lines[2:]]))
    with pytest.raises(outbox.OutboxError, match=r"line 3: not JSON"):
        tracking.sync(box, uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert not _client(tmp_path).get_run(rid).data.params


def test_train_resume_auto_goes_on_after_a_cut_last_line(tmp_path, phantom_manifest, monkeypatch, capfd):
    first = train(tiny_train_config(phantom_manifest, tmp_path, "tracking.run_name=a"))
    run_dir = Path(first["run_dir"])
    # a process of the run, killed during an outage while appending to its outbox
    tr = tracking.Tracker(_offline(monkeypatch), run_dir)
    tr.start(first["run_id"], "a")
    tr.log_params({"note": "kept"})
    with open(tr.box.ops_file, "a") as f:
        f.write('{"op": "params", "da')
    # before: OutboxError "not JSON; nothing was sent", and the run could not be resumed
    res = train(
        tiny_train_config(phantom_manifest, tmp_path, "tracking.run_name=a", "resume=auto", "epochs=2")
    )
    assert "was cut short" in capfd.readouterr().err
    assert res["run_id"] == first["run_id"]
    assert ckpt.load_checkpoint(res["checkpoint"])["epoch"] == 2
    run = _client(tmp_path).get_run(first["run_id"])
    assert run.data.params["note"] == "kept" and run.info.status == "FINISHED"
    assert not tr.box.ops_file.read_text().strip()
