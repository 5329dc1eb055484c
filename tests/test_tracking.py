"""Tracking outages: a real ``mlflow server`` on 127.0.0.1, unreachable at start or killed mid-run.

Training must go on, keep on disk what it could not send, and lose no metric or artifact: after
the server is back (reconnect during the run, or ``pipeline.run sync`` afterwards) the server holds
every step of the run's local metric record and every grid, checkpoint and plot.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cxr_factory import REPO, TINY_TRAIN
from mlflow_server import free_port, kill, start_server

TINY = [
    *TINY_TRAIN,
    "model.num_classes=2",
    "tracking.experiment=outage",
    "tracking.register_model=outage-generator",
]


def _local_steps(run_dir: Path, key: str) -> list[int]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in recs if key in r["metrics"]]


def _check_server_has_everything(url: str, run_id: str, run_dir: Path, epochs: int) -> None:
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=url, registry_uri=url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["epochs"] == str(epochs)
    assert run.data.tags["stage"] == "train"
    for key in ("train/kl", "val/ssim"):
        server = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert server == _local_steps(run_dir, key), key
    assert len(_local_steps(run_dir, "val/ssim")) == epochs
    grids = {f.path for f in client.list_artifacts(run_id, "grids")}
    assert grids == {
        f"grids/{k}_epoch{e:03d}.png" for k in ("samples", "recon") for e in range(1, epochs + 1)
    }
    assert [f.path for f in client.list_artifacts(run_id, "checkpoints")] == ["checkpoints/last.pt"]
    assert [f.path for f in client.list_artifacts(run_id, "plots")] == ["plots/loss_curves.png"]
    assert "config.json" in {f.path for f in client.list_artifacts(run_id)}
    versions = client.search_model_versions("name='outage-generator'")
    assert [v.run_id for v in versions] == [run_id]
    # the outbox is empty once everything is sent
    assert not (run_dir / "tracking_outbox" / "ops.jsonl").read_text().strip()
    assert not list((run_dir / "tracking_outbox").glob("files/*"))


def test_server_unreachable_at_start(tmp_path, phantom_manifest, capsys):
    from pipeline.infra.checkpoint import load_checkpoint
    from pipeline.infra.config import load_config
    from pipeline.train import TrainConfig, train

    port = free_port()  # nothing listens here yet
    url = f"http://127.0.0.1:{port}"
    cfg = load_config(
        TrainConfig,
        None,
        [
            f"data.manifest={phantom_manifest}",
            *TINY,
            "epochs=2",
            f"out_dir={tmp_path / 'out'}",
            f"tracking.uri={url}",
        ],
    )
    res = train(cfg)
    err = capsys.readouterr().err
    run_dir = Path(res["run_dir"])
    assert res["run_id"] is None  # never reached
    assert f"WARNING tracking: {url} failed" in err
    assert "python -m pipeline.run sync" in err and "Nothing is lost" in err
    # training itself finished and checkpointed
    assert load_checkpoint(res["checkpoint"])["epoch"] == 2
    ops = [json.loads(line) for line in (run_dir / "tracking_outbox" / "ops.jsonl").read_text().splitlines()]
    assert ops[0]["op"] == "start" and ops[-1]["op"] == "end"
    assert sum(op["op"] == "metrics" for op in ops) == len(
        (run_dir / "metrics.jsonl").read_text().splitlines()
    )
    assert all(Path(op["path"]).is_file() for op in ops if "path" in op)

    proc = start_server(port, tmp_path / "server")
    try:
        out = subprocess.run(
            [sys.executable, "-m", "pipeline.run", "sync", str(run_dir / "tracking_outbox")],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr
        state = json.loads((run_dir / "tracking_outbox" / "state.json").read_text())
        assert state["run_id"] and state["run_id"] in out.stdout
        _check_server_has_everything(url, state["run_id"], run_dir, epochs=2)
    finally:
        kill(proc, signal.SIGTERM)


def test_server_killed_mid_run_and_back(tmp_path, phantom_manifest):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    store = tmp_path / "server"
    server = start_server(port, store)
    epochs = 8
    errlog = tmp_path / "train.err"
    with open(errlog, "w") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pipeline.run",
                "train",
                f"data.manifest={phantom_manifest}",
                *TINY,
                f"epochs={epochs}",
                f"out_dir={tmp_path / 'out'}",
                f"tracking.uri={url}",
                "tracking.retry_s=1",
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
        lines = []
        try:
            for line in proc.stdout:
                lines.append(line)
                if line.startswith("epoch 2/"):
                    kill(server)  # SIGKILL: the server vanishes mid-run
                elif line.startswith("epoch 4/"):
                    # hold training while the server restarts, so that it reconnects mid-run
                    proc.send_signal(signal.SIGSTOP)
                    server = start_server(port, store)
                    proc.send_signal(signal.SIGCONT)
            assert proc.wait(timeout=600) == 0, errlog.read_text()
            text = errlog.read_text()
            assert f"WARNING tracking: {url} failed" in text
            assert "is reachable again; sent" in text
            assert "could not be reached" not in text  # nothing was left over at the end
            run_id = next(ln.split()[3] for ln in lines if ln.startswith("MLflow run id:"))
            grid = next(ln.split(": ", 1)[1].strip() for ln in lines if ln.startswith("sample grid:"))
            _check_server_has_everything(url, run_id, Path(grid).parent.parent, epochs=epochs)
        finally:
            if proc.poll() is None:
                proc.kill()
            kill(server, signal.SIGTERM)


def test_sync_refuses_a_folder_that_is_not_an_outbox(tmp_path):
    from pipeline.infra.tracking import sync

    with pytest.raises(FileNotFoundError, match="is not a tracking outbox"):
        sync(tmp_path)


def test_classify_goes_on_when_the_server_is_down(tmp_path, phantom_manifest):
    """The classifier stage logs through the same outbox: no server, the arm still finishes and
    writes its results; ``sync`` later delivers the run."""
    from pipeline.classify import ClassifyConfig, classify
    from pipeline.infra.config import load_config

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cfg = load_config(
        ClassifyConfig,
        None,
        [
            f"data.manifest={phantom_manifest}",
            "data.image_size=32",
            "data.batch_size=16",
            "model.widths=[8,16,16,16]",
            "epochs=1",
            "bootstrap=20",
            "threads=1",
            f"out_dir={tmp_path / 'cls'}",
            f"tracking.uri={url}",
            "tracking.run_name=offline-arm",
        ],
    )
    res = classify(cfg)
    assert res["run_id"] is None and 0 <= res["metrics"]["test/auroc"] <= 1
    outbox = Path(res["run_dir"]) / "tracking_outbox"
    proc = start_server(port, tmp_path / "server")
    try:
        from pipeline.infra.tracking import sync

        out = sync(outbox)
        assert out["pending"] == 0 and out["run_id"]
        import mlflow

        client = mlflow.tracking.MlflowClient(tracking_uri=url)
        run = client.get_run(out["run_id"])
        assert run.info.status == "FINISHED" and run.data.tags["stage"] == "classify"
        assert run.data.metrics["test/auroc"] == pytest.approx(res["metrics"]["test/auroc"])
        assert {f.path for f in client.list_artifacts(out["run_id"], "eval")} == {
            "eval/test_scores.csv",
            "eval/roc.png",
            "eval/curves.png",
        }
    finally:
        kill(proc, signal.SIGTERM)


def test_generate_and_evaluate_go_on_when_the_server_is_down(
    tmp_path, phantom_manifest, phantom_generator, phantom_extractor
):
    """generate and evaluate log through the same outbox: no server, both still write their
    images and report; ``sync`` later delivers both runs. compare, which reads runs, says clearly
    that it needs the server."""
    from pipeline.compare import CompareConfig, compare
    from pipeline.evaluate import EvaluateConfig, evaluate
    from pipeline.generate import GenerateConfig, generate
    from pipeline.infra.config import load_config
    from pipeline.infra.stage_configs import TrackingConfig
    from pipeline.infra.tracking import sync

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    gen = generate(
        load_config(
            GenerateConfig,
            None,
            [
                f"checkpoint={phantom_generator['checkpoint']}",
                "n=8",
                f"out={tmp_path / 'gen'}",
                f"tracking.uri={url}",
            ],
        )
    )
    assert gen["run_id"] is None and Path(gen["manifest"]).is_file()
    ev = evaluate(
        load_config(
            EvaluateConfig,
            None,
            [
                f"checkpoint={phantom_generator['checkpoint']}",
                f"judge={phantom_extractor}",
                f"reference={phantom_manifest}",
                "bootstrap=5",
                "k=3",
                f"out_dir={tmp_path / 'ev'}",
                f"tracking.uri={url}",
                "tracking.run_name=offline-eval",
            ],
        )
    )
    assert ev["run_id"] is None and Path(ev["report"]).is_file()
    assert compare(CompareConfig(tracking=TrackingConfig(experiment="cxr-vaegan-evaluate", uri=url))) == 2

    proc = start_server(port, tmp_path / "server")
    try:
        import mlflow

        client = mlflow.tracking.MlflowClient(tracking_uri=url)
        g = sync(tmp_path / "gen" / "tracking_outbox")
        assert g["pending"] == 0 and g["run_id"]
        run = client.get_run(g["run_id"])
        assert run.data.tags["stage"] == "generate" and run.info.status == "FINISHED"
        assert sum(v for k, v in run.data.metrics.items() if k.startswith("count/")) == 8
        assert {f.path for f in client.list_artifacts(g["run_id"], "generated")} >= {
            "generated/preview.png",
            "generated/generated.json",
        }
        e = sync(tmp_path / "ev" / "offline-eval" / "tracking_outbox")
        assert e["pending"] == 0 and e["run_id"]
        run = client.get_run(e["run_id"])
        assert run.data.tags["stage"] == "evaluate"
        assert run.data.metrics["fd"] == pytest.approx(ev["metrics"]["fd"])
        assert "report/report.md" in {f.path for f in client.list_artifacts(e["run_id"], "report")}
    finally:
        kill(proc, signal.SIGTERM)
