"""Models from outside are data, never code: a pickled MLflow model or a crafted tracking outbox
must not run anything on the machine that loads or syncs it (issue: safe model loading).

The payload is harmless: unpickling it touches a marker file. Each test first shows the payload is
live (it runs when unpickled on purpose), then that the project's loaders never run it."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import mlflow
import mlflow.pytorch
import pandas as pd
import pytest
import torch
from cxr_factory import REPO

from pipeline.infra import model_store, outbox, tracking
from pipeline.infra.loaders import load_generator, synthetic_source
from pipeline.infra.model_store import UnsafeModelError

MARKER_ENV = "CXR_TEST_MARKER"


class Payload(torch.nn.Module):
    """Unpickling this touches the marker file named when it was pickled."""

    def __init__(self, marker: pathlib.Path) -> None:
        super().__init__()
        self.marker = marker

    def __reduce_ex__(self, protocol):
        return (pathlib.Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def _pickled_store(tmp_path_factory):
    """A pickled mlflow.pytorch model holding the payload, registered as models:/evil/1 (built
    once per module: saving and registering costs ~10 s)."""
    root = tmp_path_factory.mktemp("evil")
    marker = root / "marker"
    uri = f"sqlite:///{root / 'mlflow.db'}"
    path = root / "evil_model"
    mlflow.pytorch.save_model(Payload(marker), str(path), serialization_format="pickle")
    client = mlflow.tracking.MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("evil")
    client.create_model_version("evil", path.as_uri())
    return {"marker": marker, "uri": uri, "file_uri": path.as_uri()}


@pytest.fixture
def pickled_model(_pickled_store, monkeypatch):
    _pickled_store["marker"].unlink(missing_ok=True)  # saving (or the control test) ran the payload
    mlflow.set_tracking_uri(_pickled_store["uri"])
    mlflow.set_registry_uri(_pickled_store["uri"])
    monkeypatch.delenv(model_store.TRUST_ENV, raising=False)
    return _pickled_store


def test_payload_is_live_when_trusted_explicitly(pickled_model, monkeypatch):
    # the control: with the explicit trust switch the pickle IS unpickled, so the refusal tests
    # below would fail if a loader unpickled it
    monkeypatch.setenv(model_store.TRUST_ENV, "1")
    with pytest.raises(Exception):  # noqa: B017 - the payload returns None, not a module
        model_store.load_generator_uri(pickled_model["file_uri"], pickled_model["uri"])
    assert pickled_model["marker"].exists()


@pytest.mark.parametrize("address", ["file", "models"])
def test_pickled_model_is_refused_and_never_runs(pickled_model, address, monkeypatch):
    src = pickled_model["file_uri"] if address == "file" else "models:/evil/1"
    with pytest.raises(UnsafeModelError, match="pickle"):
        load_generator(src, tracking_uri=pickled_model["uri"])
    # the synthetic-augmentation source (classify synthetic=...) too, found through the
    # tracking URI a user would set
    monkeypatch.setenv("MLFLOW_TRACKING_URI", pickled_model["uri"])
    with pytest.raises(UnsafeModelError):
        synthetic_source(src, 32)
    assert not pickled_model["marker"].exists()


def test_cli_generate_refuses_a_pickled_registered_model(pickled_model, tmp_path):
    env = dict(os.environ, MLFLOW_TRACKING_URI=pickled_model["uri"])
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.run",
            "generate",
            "checkpoint=models:/evil/1",
            "n=2",
            f"out={tmp_path / 'gen'}",
            "log_mlflow=false",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "pickle" in proc.stderr and "Traceback" not in proc.stderr
    assert not pickled_model["marker"].exists()
    assert not (tmp_path / "gen" / "generated.csv").exists()


def test_logged_generator_is_data_and_loads_by_run_uri(phantom_generator):
    """train logs the generator as a JSON spec + weights-only state dict, no pickle anywhere."""
    uri = phantom_generator["uri"]
    # MLflow 3 resolves a logged model's artifacts through the global store, whatever the client
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = mlflow.tracking.MlflowClient(tracking_uri=uri, registry_uri=uri)
    files = {f.path for f in client.list_artifacts(phantom_generator["run_id"], "generator")}
    assert not any(p.endswith((".pkl", ".pth")) for p in files), files
    a = load_generator(phantom_generator["checkpoint"])
    b = load_generator(f"runs:/{phantom_generator['run_id']}/generator", tracking_uri=uri)
    z = torch.randn(3, a.generator.decoder.latent_dim)
    y = torch.tensor([0, 1, 0])
    torch.testing.assert_close(a.generator(z, y), b.generator(z, y))
    assert b.label_names == a.label_names


# ------------------------------------------------------------------------------ crafted outboxes
def _outbox(tmp_path, ops: list[dict]) -> pathlib.Path:
    box = tmp_path / "run" / outbox.OUTBOX_NAME
    (box / "files").mkdir(parents=True)
    uri = f"sqlite:///{tmp_path / 'sync.db'}"
    (box / "state.json").write_text(json.dumps({"uri": uri, "experiment": "e", "run_id": None}))
    start = {"op": "start", "experiment": "e", "run_name": "r", "tags": {}, "seq": 1}
    (box / "ops.jsonl").write_text("".join(json.dumps(o) + "\n" for o in [start, *ops]))
    return box


def test_sync_never_uploads_a_file_outside_its_outbox(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the tracking server")
    box = _outbox(tmp_path, [{"op": "artifact", "path": str(secret), "artifact_path": None, "seq": 2}])
    with pytest.raises(outbox.OutboxError, match="not a buffered file inside"):
        tracking.sync(box)
    assert not (tmp_path / "sync.db").exists()  # refused before anything was sent


def test_sync_refuses_a_symlink_out_of_its_outbox(tmp_path):
    box = _outbox(tmp_path, [])
    link = box / "files" / "000002-hostname"
    link.symlink_to("/etc/hostname")
    with (box / "ops.jsonl").open("a") as f:
        f.write(json.dumps({"op": "artifact", "path": str(link), "artifact_path": None, "seq": 2}) + "\n")
    with pytest.raises(outbox.OutboxError):
        tracking.sync(box)
    assert not (tmp_path / "sync.db").exists()


def test_sync_never_unpickles_a_generator_op_pointing_at_a_model_uri(pickled_model, tmp_path):
    # before: a generator op whose path was a model URI went to mlflow.pytorch.load_model
    box = _outbox(
        tmp_path, [{"op": "generator", "path": pickled_model["file_uri"], "registered_name": "", "seq": 2}]
    )
    with pytest.raises(outbox.OutboxError, match="not a buffered file inside"):
        tracking.sync(box)
    assert not pickled_model["marker"].exists()


def test_sync_never_unpickles_a_buffered_generator(tmp_path):
    marker = tmp_path / "marker"
    box = _outbox(tmp_path, [])
    evil = box / "files" / "000002-last.pt"
    torch.save(Payload(marker), evil)  # a "checkpoint" that is a pickle with a payload
    with (box / "ops.jsonl").open("a") as f:
        f.write(json.dumps({"op": "generator", "path": str(evil), "registered_name": "", "seq": 2}) + "\n")
    res = tracking.sync(box)  # the op is kept (unsendable), never unpickled
    assert res["pending"] == 1
    assert not marker.exists()


@pytest.mark.parametrize(
    "op,why",
    [
        ({"op": "exec", "seq": 2}, "unknown operation"),
        ({"op": "dict", "data": {}, "name": "../../x.json", "seq": 2}, "relative artifact path"),
        ({"op": "artifact", "path": "files/x", "artifact_path": "/abs", "seq": 2}, "not a buffered file"),
        ({"op": "end", "status": "RUNNING", "seq": 2}, "bad run status"),
    ],
)
def test_sync_validates_every_operation_before_sending(tmp_path, op, why):
    box = _outbox(tmp_path, [op])
    with pytest.raises(outbox.OutboxError, match=why):
        tracking.sync(box)
    assert not (tmp_path / "sync.db").exists()


# ------------------------------------------------------------------------------ a tampered registered version
def _registered_copy(phantom_generator, tmp_path):
    """The phantom generator's logged model, copied to a folder and registered as models:/gen/1
    (a version whose files the test can edit, as anyone with write access to a shared store can)."""
    uri = f"sqlite:///{tmp_path / 'shared.db'}"
    mlflow.set_tracking_uri(phantom_generator["uri"])
    mlflow.set_registry_uri(phantom_generator["uri"])
    src = pathlib.Path(
        mlflow.artifacts.download_artifacts(
            f"runs:/{phantom_generator['run_id']}/generator", dst_path=str(tmp_path / "dl")
        )
    )
    clean = tmp_path / "clean"
    shutil.copytree(src, clean)
    version = tmp_path / "version"
    shutil.copytree(clean, version)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = mlflow.tracking.MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("gen")
    client.create_model_version("gen", version.as_uri())
    return uri, clean, version


def test_a_registered_model_ships_no_code_and_no_tampered_file_runs_a_payload(phantom_generator, tmp_path):
    uri, clean, version = _registered_copy(phantom_generator, tmp_path)
    marker = tmp_path / "marker"
    # the model is data: no Python file, and its pyfunc loader is a module of the installed package
    assert not list(version.rglob("*.py")), sorted(str(p) for p in version.rglob("*.py"))
    assert f"loader_module: {model_store.LOADER_MODULE}" in (version / "MLmodel").read_text()
    clean_images = model_store.load_pyfunc("models:/gen/1", uri).predict(
        pd.DataFrame({"label": ["normal"], "count": [2], "seed": [0]})
    )
    payload_py = f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
    evil_pickled = tmp_path / "evil_pickled"
    mlflow.pytorch.save_model(Payload(marker), str(evil_pickled), serialization_format="pickle")
    marker.unlink(missing_ok=True)  # saving ran the payload once: the control that it is live
    for f in sorted(p.relative_to(clean) for p in clean.rglob("*") if p.is_file()):
        shutil.rmtree(version)
        shutil.copytree(clean, version)
        target = version / f
        if f.name == "MLmodel":
            # the real attack on this file: name a pickle-based loader and point it at a pickle
            shutil.copytree(evil_pickled / "data", version / "evil", dirs_exist_ok=True)
            text = target.read_text().replace(
                f"loader_module: {model_store.LOADER_MODULE}", "loader_module: mlflow.pytorch"
            )
            assert "data: data/generator" in text
            target.write_text(text.replace("data: data/generator", "data: evil"))
        elif f.suffix == ".pt":
            torch.save(Payload(marker), target)  # a pickle whose unpickling runs the payload
        else:
            target.write_text(payload_py)
        # the project's loader and its safe pyfunc entry: refused or loaded as data, never run
        for load in (
            lambda: load_generator("models:/gen/1", tracking_uri=uri),
            lambda: model_store.load_pyfunc("models:/gen/1", uri),
        ):
            with contextlib.suppress(Exception):  # refusing is fine; running the payload is not
                load()
            assert not marker.exists(), f"tampered {f}: the payload ran"
        # MLflow's own pyfunc loader: no data file can make it run code; MLmodel can (MLflow imports
        # the loader module that file names): the control that the MLmodel attack above is live,
        # and why README loads through model_store.load_pyfunc
        with contextlib.suppress(Exception):
            mlflow.pyfunc.load_model("models:/gen/1")
        assert marker.exists() == (f.name == "MLmodel"), f"tampered {f}"
        marker.unlink(missing_ok=True)
    assert clean_images.shape == (2, 1, 32, 32)
