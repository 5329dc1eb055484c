"""Studies that survive a job's end: records committed with the repository, a time budget, a kill
mid-child, the study continued elsewhere, and docs rendered from the records alone. Tiny: 32 px,
1 epoch, 2 seeds."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cxr_factory import TINY_GAIN_CLASSIFY

from pipeline.infra.config import load_config
from pipeline.infra.records import RecordError, StudyRecords

REPO = Path(__file__).resolve().parent.parent


def _args(manifest, out: Path, records: Path, store: Path, *extra: str) -> list[str]:
    return [
        f"classify.data.manifest={manifest}",
        *TINY_GAIN_CLASSIFY,
        "classify.epochs=2",
        f"classify.tracking.uri=sqlite:///{store}",
        f"classify.data.cache_dir={out.parent / 'cache'}",
        "classify.data.cache=disk",
        "arms=[real,classical]",
        "fractions=[1.0]",
        "seeds=[0,1]",
        "holdout_fraction=0.2",
        f"out_dir={out}",
        "tracking.run_name=t",
        f"records={records}",
        *extra,
    ]


def _gain(*args: str):
    from pipeline.gain import GainConfig, gain

    return gain(load_config(GainConfig, None, list(args)))


def _cli(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.run", "gain", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _table(res) -> dict:
    t = res["table"].set_index(["split", "fraction", "arm"])
    # NaN (real against itself) compares equal as None
    return {
        k: tuple(None if np.isnan(v) else round(v, 10) for v in (r.auroc, r.paired_delta))
        for k, r in t.iterrows()
    }


def test_a_study_killed_mid_child_continues_from_its_records_elsewhere(tmp_path, phantom_manifest):
    # the reference: the same study, uninterrupted
    ref = _gain(*_args(phantom_manifest, tmp_path / "ref", tmp_path / "ref_records", tmp_path / "ref.db"))
    assert set(ref["table"]["split"]) == {"test", "holdout"}  # scored on both test sets

    # a batch job: killed by PID (SIGKILL) while its second child trains
    records = tmp_path / "job1" / "records"
    p = _cli(_args(phantom_manifest, tmp_path / "job1" / "out", records, tmp_path / "job1.db"), tmp_path)
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if (
            len(list((records / "children").glob("*.json"))) == 1
            and (tmp_path / "job1" / "out" / "t" / "children" / "classical-f1-s0").is_dir()
        ):
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait(30)
    assert p.returncode == -signal.SIGKILL, p.stdout.read()[-3000:]
    recorded = sorted(f.name for f in (records / "children").glob("*.json"))
    assert recorded == ["real-f1-s0.json"]

    # "a fresh clone": the records folder alone travels, into another folder, store and out_dir
    clone = tmp_path / "clone" / "docs" / "studies" / "tiny"
    shutil.copytree(records, clone)
    out2, db2 = tmp_path / "clone" / "outputs", tmp_path / "clone" / "mlflow.db"
    # a time budget too small for any child: stops before training, exit status 3, says what is left
    p = _cli(_args(phantom_manifest, out2, clone, db2, "max_minutes=0.001"), tmp_path / "clone")
    text, _ = p.communicate(timeout=240)
    assert p.returncode == 3, text[-3000:]
    assert "stopped at the time budget" in text and "1 item(s) recorded" in text and "3 left" in text
    # a budget smaller than the next item alone would stop every call there: it says so
    assert "alone needs more than the whole budget: give max_minutes >=" in text
    assert sorted(f.name for f in (clone / "children").glob("*.json")) == recorded

    # continued without a budget: trains only the three unrecorded children, gives the same table
    res = _gain(*_args(phantom_manifest, out2, clone, db2))
    assert res["trained"] == 3
    assert _table(res) == _table(ref)
    # and once more: nothing left to train
    assert _gain(*_args(phantom_manifest, out2, clone, db2))["trained"] == 0


def test_an_edited_record_refuses_the_study_naming_the_file(tmp_path, phantom_manifest):
    args = _args(phantom_manifest, tmp_path / "out", tmp_path / "rec", tmp_path / "s.db", "seeds=[0]")
    _gain(*args)
    f = tmp_path / "rec" / "children" / "real-f1-s0.json"
    rec = json.loads(f.read_text())
    rec["metrics"]["test/auroc"] = 0.99  # a better number, nothing retrained
    f.write_text(json.dumps(rec))
    with pytest.raises(RecordError, match=r"real-f1-s0\.json.*do not match its digest"):
        _gain(*args)
    with pytest.raises(RecordError, match="digest"):
        StudyRecords(tmp_path / "rec").all("children")


def test_a_second_process_on_one_study_is_refused_at_once_naming_the_holder(tmp_path, phantom_manifest):
    from pipeline.infra.locks import RunBusyError

    rec = tmp_path / "rec"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pipeline.infra.records import StudyRecords\n"
            f"with StudyRecords({str(rec)!r}).lock():\n    print('locked', flush=True); time.sleep(120)",
        ],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.time()
        with pytest.raises(
            RunBusyError, match=rf"study records folder .*another process \(pid {holder.pid}\)"
        ):
            _gain(*_args(phantom_manifest, tmp_path / "out", rec, tmp_path / "s.db", "seeds=[0]"))
        assert time.time() - t0 < 30  # refused at once, not after waiting
        assert not (rec / "children").exists()  # nothing was trained or recorded
    finally:
        holder.kill()
        holder.wait()


def test_records_hold_no_absolute_path_and_name_plain_files(tmp_path):
    recs = StudyRecords(tmp_path)
    with pytest.raises(ValueError, match="no absolute path"):
        recs.write("children", "x", {"key": "k", "manifest": "/data/m.csv"})
    with pytest.raises(ValueError, match="not a plain name"):
        recs.write("children", "../x", {"key": "k"})


def _tiny_records(folder: Path) -> None:
    """A two-seed study's records written the way gain writes them (digests included)."""
    recs = StudyRecords(folder)
    recs.write_study(
        {
            "key": "k",
            "config": {"fractions": [0.1, 1.0], "seeds": [0, 1], "arms": ["real", "synthetic", "real_dup"]},
        }
    )
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 80)
    for frac in (0.1, 1.0):
        for seed in (0, 1):
            for arm, noise in (("real", 1.0), ("real_dup", 0.9), ("synthetic", 1.2)):
                s = y + noise * rng.normal(size=80)
                from pipeline.infra.metrics import auroc

                recs.write(
                    "children",
                    f"{arm}-f{frac:g}-s{seed}",
                    {
                        "key": f"{arm}{frac}{seed}",
                        "config": {},
                        "fraction": frac,
                        "seed": seed,
                        "arm": arm,
                        "generator": f"vaegan-f{frac:g}-s{seed}" if arm == "synthetic" else None,
                        "test_split": "test",
                        "metrics": {
                            "test/auroc": auroc(y, s),
                            "test/balanced_accuracy": 0.7,
                            "test/sensitivity": 0.7,
                            "test/specificity": 0.7,
                        },
                        "optimizer_steps": 100 * (1 + 9 * (frac == 1.0)),
                        "wall_s": 12.5,
                        "scores": {
                            "test": {
                                "images_sha256": "abc",
                                "n": 80,
                                "labels": y.tolist(),
                                "scores": s.round(6).tolist(),
                            }
                        },
                    },
                )
            recs.write(
                "generators",
                f"vaegan-f{frac:g}-s{seed}",
                {
                    "key": "g",
                    "fraction": frac,
                    "seed": seed,
                    "steps": 1500,
                    "wall_s": 600.0,
                    "gate": {
                        "checks": [{"epoch": 5, "fd": 3.0, "class_fidelity": 0.95}],
                        "best": {"epoch": 5, "fd": 3.0, "class_fidelity": 0.95},
                    },
                    "class_fidelity": {str(seed): {"auroc": 0.97}},
                },
            )


def test_docs_render_from_a_study_folder_alone(tmp_path):
    records = tmp_path / "docs" / "studies" / "tiny"
    _tiny_records(records)
    page = tmp_path / "docs" / "gain.md"
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}  # no store
    p = subprocess.run(
        [sys.executable, "-m", "pipeline.run", "report", f"records={records}", f"out={page}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    text = page.read_text()
    assert "ΔAUROC vs real (paired 95 % CI)" in text and "| 0.1 | synthetic | 2 |" in text
    assert "## Verdict" in text and "**0.1 of the real data**" in text
    assert "vaegan-f0.1-s0" in text and "What the study cost" in text
    for ref in ("real", "real_dup"):
        png = tmp_path / "docs" / f"gain_test_vs_{ref}.png"
        assert png.is_file() and png.stat().st_size > 5000
        assert f"({png.name})" in text
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("mlflow.db"))


def test_generators_are_sized_in_steps_and_gated_by_their_subsets_real_child(tmp_path, phantom_manifest):
    gated = [
        "arms=[real,synthetic]",
        "fractions=[0.5]",
        "generator_steps=6",
        "gate_checks=2",
        "vaegan_overrides=[data.batch_size=4,model.base_channels=8,model.latent_dim=8,model.num_classes=2,"
        "grid_size=4,tracking.log_model=false,gate.n=8]",
    ]
    res = _gain(
        *_args(phantom_manifest, tmp_path / "out", tmp_path / "rec", tmp_path / "s.db", "seeds=[0]"), *gated
    )
    gen = StudyRecords(tmp_path / "rec").read("generators", "vaegan-f0.5-s0")
    # 6 steps at batch 4 over the subset's 12 training images (half of what the holdout left):
    # 3 batches an epoch, so 2 epochs
    assert gen["epochs"] == 2 and gen["steps"] == 6
    assert [c["epoch"] for c in gen["gate"]["checks"]] == [1, 2]  # every 2 // 2 epochs
    assert gen["gate"]["kept"] in ("best.pt", "last.pt") and "classify.lr" not in gen["config"]
    assert (
        gen["config"]["generator.judge_key"]
        == StudyRecords(tmp_path / "rec").read("children", "real-f0.5-s0")["key"]
    )
    syn = res["runs"][res["runs"]["arm"] == "synthetic"]
    assert syn["generator_class_fidelity"].between(0, 1).all()
    # the generator's quality against the validation split, in its judge's feature space
    q = gen["class_fidelity"]["0"]
    assert q["temperature"] == 1.0 and 0 <= q["coverage"] <= 1 and 0 <= q["precision"] <= 1 and q["fd"] >= 0
    # the kept epoch's sample grid travels with the records (no weights) and shows on the page
    grid = tmp_path / "rec" / "grids" / "vaegan-f0.5-s0.png"
    kept = gen["gate"]["best"]["epoch"] if gen["gate"]["kept"] == "best.pt" else gen["epochs"]
    run_grid = (
        tmp_path / "out" / "t" / "generators" / "vaegan-f0.5-s0" / "grids" / f"samples_epoch{kept:03d}.png"
    )
    assert grid.read_bytes() == run_grid.read_bytes()
    from pipeline.infra.study_configs import ReportConfig
    from pipeline.report import report

    page = tmp_path / "page" / "gain.md"
    page.parent.mkdir()
    report(ReportConfig(records=str(tmp_path / "rec"), out=str(page)))
    assert "![vaegan-f0.5-s0 (0.5 of the real data)](gain_samples_vaegan-f0.5-s0.png)" in page.read_text()
    assert (page.parent / "gain_samples_vaegan-f0.5-s0.png").read_bytes() == grid.read_bytes()

    # a variant that only samples differently (a temperature) shares the generators: none trains
    import pipeline.gain as G

    calls = []
    real_train = G.train
    G.train = lambda cfg: calls.append(cfg) or real_train(cfg)
    try:
        res2 = _gain(
            *_args(phantom_manifest, tmp_path / "out2", tmp_path / "rec2", tmp_path / "s.db", "seeds=[0]"),
            *gated,
            "classify.synthetic_temperature=1.5",
            f"generator_dir={tmp_path / 'out' / 't' / 'generators'}",
        )
    finally:
        G.train = real_train
    assert calls == [] and res2["trained"] == 2
    gen2 = StudyRecords(tmp_path / "rec2").read("generators", "vaegan-f0.5-s0")
    assert gen2["key"] == gen["key"] and gen2["class_fidelity"]["0"]["temperature"] == 1.5


@pytest.mark.parametrize(
    "override, match",
    [
        # a budget must be a number of minutes: NaN would never stop, a negative one never start
        ("max_minutes=-1", "max_minutes must be a finite number >= 0"),
        # the holdout is carved from the training pool: half or more leaves too little to train on
        ("holdout_fraction=0.5", "holdout_fraction must be < 0.5"),
        ("generator_steps=-5", "generator_steps and gate_checks must be >= 0"),
    ],
)
def test_study_config_rules(override, match):
    from pipeline.gain import GainConfig
    from pipeline.infra.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        load_config(GainConfig, None, [override])


@pytest.mark.parametrize(
    "override, match",
    [
        # a temperature scales the prior's spread: 0 would draw every image at its class mean
        ("synthetic_temperature=0", "synthetic_temperature must be in"),
        # scoring the test split twice would count it twice in a study's records
        ("extra_test_splits=[test]", "extra_test_splits"),
    ],
)
def test_classify_scoring_rules(override, match):
    from pipeline.classify import ClassifyConfig
    from pipeline.infra.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        load_config(ClassifyConfig, None, [override])


def test_the_recipe_ablation_page_renders_from_its_variants_records(tmp_path):
    from pipeline.infra.study_configs import ReportConfig
    from pipeline.report import report

    for v in ("base", "ema"):
        _tiny_records(tmp_path / v)
    res = report(
        ReportConfig(
            variants=[str(tmp_path / "base"), str(tmp_path / "ema")],
            out=str(tmp_path / "a.md"),
            select_split="test",
        )
    )
    rows = res["rows"]
    assert len(rows) == 8 and set(rows["variant"]) == {"base", "ema"}
    # CAS is the synthetic_only child's AUROC; here there is none, and the delta is synthetic - real
    assert rows["cas"].isna().all() and rows["delta_synthetic"].notna().all()
    text = (tmp_path / "a.md").read_text()
    assert "| **base** | mean |" in text and "class fidelity" in text
    # one of records= or variants=, never both or neither
    with pytest.raises(ValueError, match="one of them"):
        ReportConfig()


def test_records_outlive_options_added_later_at_their_defaults(tmp_path, phantom_manifest):
    # a multi-session study must survive the code growing a config option: a record written
    # before the option existed holds the same computation when the option is at its default
    args = _args(phantom_manifest, tmp_path / "out", tmp_path / "rec", tmp_path / "s.db", "seeds=[0]")
    _gain(*args)
    recs = StudyRecords(tmp_path / "rec")
    rec = recs.read("children", "real-f1-s0")
    old = dict(rec)
    from pipeline.infra.study_plan import config_key

    old["config"] = {k: v for k, v in rec["config"].items() if k != "classify.grad_clip"}  # "added later"
    old["key"] = config_key(old["config"])  # as the code of then keyed it
    recs.write("children", "real-f1-s0", old)
    res = _gain(*args)
    assert res["trained"] == 0
    # an option missing from the record whose value now is not its default is a change: refused
    old["config"] = {k: v for k, v in rec["config"].items() if k != "classify.epochs"}  # 2, default 10
    old["key"] = config_key(old["config"])
    recs.write("children", "real-f1-s0", old)
    from pipeline.infra.config import ConfigError

    with pytest.raises(ConfigError, match=r"classify\.epochs: \(not recorded\) -> 2"):
        _gain(*args)


def test_the_keys_of_a_tiny_study_are_pinned(tmp_path, phantom_manifest, monkeypatch):
    # committed records are valid only while the code keys each item as it did when they were
    # written: a refactor that changes a key (a renamed field, a path let into the key, a changed
    # default) must show here, not as a study refused in another sitting. The data's hash is
    # fixed so that only the code decides the keys.
    import pipeline.gain as G

    monkeypatch.setattr(G, "file_sha256", lambda path: "data")
    study = G.GainStudy(
        load_config(
            G.GainConfig,
            None,
            [
                f"classify.data.manifest={phantom_manifest}",
                *TINY_GAIN_CLASSIFY,
                "arms=[real,real_dup,synthetic,synthetic_filtered]",
                "fractions=[0.5,1.0]",
                "seeds=[0]",
                "generator_steps=6",
                "vaegan_overrides=[data.batch_size=4,model.base_channels=8,model.latent_dim=8,model.num_classes=2]",
                f"out_dir={tmp_path / 'out'}",
                f"records={tmp_path / 'rec'}",
                "tracking.run_name=t",
            ],
        )
    )
    study.check_inputs()
    study.prepare_data()
    study.plan()
    keys = {n: i.key[:16] for n, i in {**study.generators, **study.children}.items()}
    assert keys == PINNED_KEYS, repr(keys)


# the first 16 hex digits of each key at 2026-12-06 (the keys of the committed study records are
# computed the same way); the generators' epochs follow from the phantom subsets' sizes
PINNED_KEYS = {
    "vaegan-f0.5-s0": "ad6514c06d0d98ff",
    "vaegan-f1": "1889353cdfae7c86",
    "real-f0.5-s0": "628ccab291c03640",
    "real_dup-f0.5-s0": "1e645c20672068e9",
    "synthetic-f0.5-s0": "a4aba1c039a9934b",
    "synthetic_filtered-f0.5-s0": "7b5fbae55857f7bc",
    "real-f1-s0": "261d08219b2c2884",
    "real_dup-f1-s0": "503e87053715db12",
    "synthetic-f1-s0": "16b946584a869833",
    "synthetic_filtered-f1-s0": "1a1d83fce2bd8bf5",
}
