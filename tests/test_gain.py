"""The gain stage's bookkeeping: parent run status, config-keyed reuse of finished children,
inputs checked before anything trains, progress. Tiny: 32 px, 1 epoch, one or two seeds."""

from __future__ import annotations

import re
import shutil

import pytest
from cxr_factory import TINY_GAIN_CLASSIFY

from pipeline.infra import engine
from pipeline.infra.config import ConfigError, load_config


def _config(tmp_path, manifest, *extra: str):
    from pipeline.gain import GainConfig

    return load_config(
        GainConfig,
        None,
        [
            f"classify.data.manifest={manifest}",
            *TINY_GAIN_CLASSIFY,
            f"classify.tracking.uri=sqlite:///{tmp_path / 'gain.db'}",
            "arms=[real]",
            "fractions=[1.0]",
            "seeds=[0]",
            f"out_dir={tmp_path / 'gain'}",
            "tracking.run_name=t",
            *extra,
        ],
    )


def _client(tmp_path):
    import mlflow

    return mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'gain.db'}")


def _parent_id(tmp_path) -> str:
    return (tmp_path / "gain" / "t" / "parent_run_id").read_text().strip()


def _must_not_train(*args, **kwargs):
    raise AssertionError("a child trained")


def test_a_failing_study_ends_its_parent_run_failed_or_killed(tmp_path, phantom_manifest, monkeypatch):
    import pipeline.gain as G

    cfg = _config(tmp_path, phantom_manifest)
    real_classify = G.classify

    def crash(c):
        raise RuntimeError("child crashed")

    monkeypatch.setattr(G, "classify", crash)
    with pytest.raises(RuntimeError, match="child crashed"):
        G.gain(cfg)
    client = _client(tmp_path)
    parent = _parent_id(tmp_path)
    assert client.get_run(parent).info.status == "FAILED"

    def interrupt(c):
        raise KeyboardInterrupt

    monkeypatch.setattr(G, "classify", interrupt)
    with pytest.raises(KeyboardInterrupt):
        G.gain(cfg)
    assert client.get_run(parent).info.status == "KILLED"

    # the re-run continues the same parent and ends it FINISHED
    monkeypatch.setattr(G, "classify", real_classify)
    res = G.gain(cfg)
    assert res["parent_run_id"] == parent
    assert client.get_run(parent).info.status == "FINISHED"


def test_rerun_reuses_only_children_whose_config_is_unchanged(tmp_path, phantom_manifest, monkeypatch):
    import pipeline.gain as G
    from pipeline.infra.records import StudyRecords

    cfg = _config(tmp_path, phantom_manifest)
    res = G.gain(cfg)
    rec = StudyRecords(tmp_path / "gain" / "t" / "records").read("children", "real-f1-s0")
    assert (
        re.fullmatch(r"[0-9a-f]{64}", rec["key"]) and rec["config"]["classify.lr"] == 0.001
    )  # keyed by the spelling before 2026-12-06
    assert rec["parent_run_id"] == res["parent_run_id"] and rec["run_id"] == res["runs"]["run_id"][0]

    # the same config again: reused from its record, nothing trains
    monkeypatch.setattr(G, "classify", _must_not_train)
    again = G.gain(cfg)
    assert list(again["runs"]["run_id"]) == list(res["runs"]["run_id"])

    # another learning rate: refused before anything trains, naming the child and the change
    with pytest.raises(ConfigError) as e:
        G.gain(_config(tmp_path, phantom_manifest, "classify.optim.lr=0.002"))
    msg = str(e.value)
    assert "real-f1-s0" in msg and "classify.lr: 0.001 -> 0.002" in msg
    assert "records=" in msg and "remove" in msg
    # the old parent run is untouched: one parent, its params still the old ones
    client = _client(tmp_path)
    parent = client.get_run(res["parent_run_id"])
    assert parent.data.params["classify.optim.lr"] == "0.001" and parent.info.status == "FINISHED"
    runs = client.search_runs([parent.info.experiment_id], "tags.stage = 'gain'")
    assert len(runs) == 1


def test_a_changed_generator_refuses_its_synthetic_children_only(
    tmp_path, phantom_manifest, phantom_generator, monkeypatch
):
    import torch

    import pipeline.gain as G

    gen = tmp_path / "generator.pt"
    shutil.copy(phantom_generator["checkpoint"], gen)
    cfg = _config(tmp_path, phantom_manifest, "arms=[real,synthetic]", f"generators=['1.0={gen}']")
    G.gain(cfg)
    # the same path now holds another generator (retrained in place, say)
    payload = torch.load(gen, weights_only=True)
    w = next(k for k, v in payload["models"]["decoder"].items() if v.is_floating_point())
    payload["models"]["decoder"][w] = payload["models"]["decoder"][w] + 0.1
    torch.save(payload, gen)
    monkeypatch.setattr(G, "classify", _must_not_train)
    with pytest.raises(ConfigError) as e:
        G.gain(cfg)
    msg = str(e.value)
    assert "synthetic-f1-s0" in msg and "generator_key" in msg
    assert "real-f1-s0" not in msg


@pytest.mark.parametrize(
    "extra, match",
    [
        (["classify.data.manifest=/nonexistent/m.csv"], r"classify\.data\.manifest"),
        (["classify.test_split=nope"], r"classify\.test_split"),
        (["arms=[real,synthetic]", "generators=['1.0=/nonexistent/last.pt']"], r"generators.*does not exist"),
        (["arms=[real,synthetic]", "generators=['1.0=models:gen']"], r"generators.*models:/NAME/VERSION"),
        (["arms=[real,synthetic]", "vaegan_config=/nonexistent/v.yaml"], r"vaegan_config"),
        (["arms=[real,synthetic]", "vaegan_overrides=[nope=1]"], r"vaegan_overrides.*nope"),
        (["seeds=[0,0]"], r"seeds.*duplicate"),
        (["fractions=[0]"], r"fractions must be in \(0, 1\]"),
        (["seeds=[]"], r"seeds must not be empty"),
        (["arms=[real,synthetic]", "GEN", "classify.data.image_size=64"], r"generators.*32 px"),
        (["arms=[real,synthetic]", "GEN", "classify.ratio=0"], r"synthetic-f1-s0.*ratio must be > 0"),
    ],
    ids=[
        "manifest",
        "split",
        "generator-path",
        "generator-uri",
        "vaegan-config",
        "vaegan-override",
        "duplicate-seed",
        "fraction",
        "no-seed",
        "generator-size",
        "child-config",
    ],
)
def test_inputs_are_checked_before_anything_trains(
    tmp_path, phantom_manifest, phantom_generator, monkeypatch, extra, match
):
    import pipeline.gain as G
    import pipeline.train

    extra = [f"generators=['1.0={phantom_generator['checkpoint']}']" if x == "GEN" else x for x in extra]
    monkeypatch.setattr(G, "classify", _must_not_train)
    monkeypatch.setattr(pipeline.train, "train", _must_not_train)
    with pytest.raises(ConfigError, match=match):
        G.gain(_config(tmp_path, phantom_manifest, *extra))
    assert not (tmp_path / "gain" / "t" / "parent_run_id").exists()  # no parent run was created


def test_progress_counts_children_and_estimates_the_time_left(tmp_path, phantom_manifest, capsys):
    import pipeline.gain as G

    G.gain(_config(tmp_path, phantom_manifest, "arms=[classical,real]", "seeds=[0,1]"))
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if re.search(r"\[\d/4\]", ln)]
    heads = [re.search(r"\[\d/4\] arm=\S+ fraction=\S+ seed=\d", ln).group(0) for ln in lines]
    # real trains first in every (fraction, seed): it is the judge of that subset's generator
    assert heads == [
        "[1/4] arm=real fraction=1 seed=0",
        "[2/4] arm=classical fraction=1 seed=0",
        "[3/4] arm=real fraction=1 seed=1",
        "[4/4] arm=classical fraction=1 seed=1",
    ]
    # every line estimates the time left: a prior first, then the measured cost of recorded children
    assert all(re.search(r"about \d+s left", ln) for ln in lines)


def test_executor_ray_without_ray_says_how_to_install_it(tmp_path, phantom_manifest, monkeypatch):
    import sys

    import pipeline.gain as G

    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    monkeypatch.setattr(G, "classify", _must_not_train)
    with pytest.raises(ConfigError, match=r"pip install '\.\[ray\]'"):
        G.gain(_config(tmp_path, phantom_manifest, "executor=ray"))


def test_a_study_does_not_start_without_its_tracking_store(tmp_path, phantom_manifest, monkeypatch):
    # the children are linked to the parent run by its id: with the store down at start, a study
    # would train children that belong to no study run; it is refused before anything trains
    from mlflow_server import free_port

    import pipeline.gain as G

    monkeypatch.setattr(G, "classify", _must_not_train)
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(ConfigError, match=r"tracking store http://127\.0\.0\.1:\d+ cannot be reached"):
        G.gain(_config(tmp_path, phantom_manifest, f"classify.tracking.uri={dead}"))
    assert not (tmp_path / "gain" / "t" / "parent_run_id").exists()
    # with the store up, the same study starts: the refused start left nothing buffered behind
    monkeypatch.undo()
    res = G.gain(_config(tmp_path, phantom_manifest))
    assert _client(tmp_path).get_run(res["parent_run_id"]).info.status == "FINISHED"
    # the study's folder is no run folder: a stage run under its name is refused, never moves it
    assert not engine.is_run_folder(tmp_path / "gain" / "t")
