from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
from cxr_factory import REPO, TINY_GAIN_CLASSIFY

from networks.classifier import ClassifierConfig, CXRClassifier
from pipeline import run
from pipeline.infra.config import ConfigError, load_config
from pipeline.infra.stage_configs import ARMS


def _cli(*args, timeout=300):
    env = dict(os.environ, MLFLOW_TRACKING_URI="")
    return subprocess.run(
        [sys.executable, "-m", "pipeline.run", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.mark.parametrize("arch", ["resnet10", "resnet18", "densenet121"])
def test_classifier_shapes(arch):
    m = CXRClassifier(ClassifierConfig(arch=arch))
    x = torch.randn(2, 1, 32, 32)
    assert m(x).shape == (2,)
    assert m.features(x).shape == (2, m.feature_dim)
    assert CXRClassifier(ClassifierConfig(arch=arch, num_classes=3))(x).shape == (2, 3)


def test_classifier_validation():
    with pytest.raises(ValueError, match="arch must be one of"):
        ClassifierConfig(arch="vgg")
    with pytest.raises(ValueError, match="4 positive stage widths"):
        ClassifierConfig(widths=[8, 16])
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        ClassifierConfig(num_classes=1)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        ClassifierConfig(dropout=1.0)
    with pytest.raises(ValueError, match="norm must be 'batch' or 'instance'"):
        ClassifierConfig(norm="group")
    with pytest.raises(ValueError, match="densenet121 uses batch norm"):
        ClassifierConfig(arch="densenet121", norm="instance")
    # instance norm keeps the shapes and has no running statistics
    m = CXRClassifier(ClassifierConfig(norm="instance"))
    assert m(torch.randn(2, 1, 64, 64)).shape == (2,)
    assert not any("running_mean" in k for k in m.state_dict())


def _main(capsys, *args) -> tuple[int, str, str]:
    """The CLI in this process (no interpreter start-up): exit code, stdout, stderr."""
    capsys.readouterr()
    rc = run.main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_generate_then_classify_with_synthetic_augmentation_then_compare(
    tmp_path, phantom_manifest, phantom_generator, capsys
):
    """The real CLI end to end: generate -> generated manifest -> classify arms -> compare (one
    subprocess per stage, the rest of the calls in this process: interpreter start-ups cost ~10 s)."""
    uri = f"sqlite:///{tmp_path / 'cls.db'}"
    gen = _cli(
        "generate",
        f"checkpoint={phantom_generator['checkpoint']}",
        "n=40",
        f"out={tmp_path / 'gen'}",
        f"tracking.uri={uri}",
    )
    assert gen.returncode == 0, gen.stderr[-2000:]
    manifest = tmp_path / "gen" / "generated.csv"
    assert len(pd.read_csv(manifest)) == 40
    common = [
        f"data.manifest={phantom_manifest}",
        "data.image_size=32",
        "data.batch_size=16",
        "model.widths=[8,16,16,16]",
        "epochs=2",
        "bootstrap=50",
        "threads=1",
        f"out_dir={tmp_path / 'cls'}",
        f"tracking.uri={uri}",
        "tracking.experiment=arms",
    ]
    p = _cli("classify", *common, "arm=real", f"synthetic={manifest}", "tracking.run_name=real")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "test AUROC" in p.stdout and "MLflow run id:" in p.stdout
    # every other arm of pipeline/infra/stage_configs.py ARMS (real ran above, through the CLI)
    others = [a for a in ARMS if a != "real"]
    for arm in others:
        # synthetic_filtered's judge: the real arm's classifier, trained above
        judge = (
            [f"judge={tmp_path / 'cls' / 'real' / 'classifier.pt'}"] if arm == "synthetic_filtered" else []
        )
        rc, out, err = _main(
            capsys,
            "classify",
            *common,
            f"arm={arm}",
            f"synthetic={manifest}",
            f"tracking.run_name={arm}",
            *judge,
        )
        assert rc == 0, err[-2000:]
        assert "test AUROC" in out and "MLflow run id:" in out
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("arms")
    runs = client.search_runs([exp.experiment_id])
    assert {r.data.tags["arm"] for r in runs} == {"real", *others}
    for r in runs:
        m = r.data.metrics
        assert 0.0 <= m["test/auroc_lo"] <= m["test/auroc"] <= m["test/auroc_hi"] <= 1.0
        assert {"test/balanced_accuracy", "test/sensitivity", "test/specificity", "val/auroc"} <= set(m)
        assert {a.path for a in client.list_artifacts(r.info.run_id, "eval")} >= {
            "eval/roc.png",
            "eval/test_scores.csv",
        }
    mixed = next(r for r in runs if r.data.tags["arm"] == "classical+synthetic")
    assert int(mixed.data.params["n_train_total"]) == 2 * int(mixed.data.params["n_train_real"])
    # the count-matched control adds as many images (of real ones) as the synthetic arm does
    dup = next(r for r in runs if r.data.tags["arm"] == "real_dup")
    assert dup.data.params["n_train_total"] == mixed.data.params["n_train_total"]
    # balanced_synthetic adds minority-class images only, up to the majority's count
    labels = pd.read_csv(phantom_manifest).query("split == 'train'")["label"].value_counts()
    bal = next(r for r in runs if r.data.tags["arm"] == "balanced_synthetic")
    n_real = int(bal.data.params["n_train_real"])
    assert int(bal.data.params["n_train_total"]) == n_real + int(labels.max() - labels.min())
    # synthetic_pretrain: epoch 1 on synthetic images only, epoch 2 on the real ones; the model is
    # picked among the real epochs, whatever the synthetic epoch scored
    pre = next(r for r in runs if r.data.tags["arm"] == "synthetic_pretrain")
    assert pre.data.metrics["best_epoch"] == 2
    # synthetic_filtered: the share of drawn images the real arm's classifier confirmed
    filt = next(r for r in runs if r.data.tags["arm"] == "synthetic_filtered")
    assert 0.0 <= filt.data.metrics["filter/accept_rate"] <= 1.0

    cmp = _cli("compare", "arms", f"tracking.uri={uri}", f"out={tmp_path / 'cmp'}")
    assert cmp.returncode == 0, cmp.stderr[-2000:]
    for arm in ("real", "classical+synthetic", "synthetic_only"):
        assert arm in cmp.stdout
    assert (tmp_path / "cmp" / "arms.png").is_file()
    rc, out, _ = _main(
        capsys, "compare", "arms", "tags.arm = 'real'", f"tracking.uri={uri}", f"out={tmp_path / 'cmp'}"
    )
    assert rc == 0 and "synthetic_only" not in out and "real" in out
    rc, _, err = _main(capsys, "compare", "no-such-experiment", f"tracking.uri={uri}")
    assert rc != 0 and "does not exist" in err


def test_fraction_subsets_are_whole_patients_stratified(tmp_path, phantom_manifest):
    from pipeline.infra.data import write_subset_manifest
    from transforms.manifest import read_manifest

    full, _ = read_manifest(phantom_manifest)
    sub_path = write_subset_manifest(phantom_manifest, 0.5, 0, tmp_path / "sub.csv")
    sub, _ = read_manifest(sub_path)
    assert (sub["split"] == "test").sum() == (full["split"] == "test").sum()  # test never reduced
    tr, ftr = sub[sub["split"] == "train"], full[full["split"] == "train"]
    assert 0.3 * len(ftr) <= len(tr) <= 0.7 * len(ftr)
    assert set(tr["label"]) == set(ftr["label"])  # both classes kept
    # every kept patient keeps all of its images
    kept = set(tr["patient_id"])
    assert len(ftr[ftr["patient_id"].isin(kept)]) == len(tr)
    again, _ = read_manifest(write_subset_manifest(phantom_manifest, 0.5, 0, tmp_path / "sub2.csv"))
    assert list(again["path"]) == list(sub["path"])


def test_a_classify_run_reads_its_manifest_once(tmp_path, phantom_manifest, monkeypatch):
    # the subset, the label names and every split come from one parse of the manifest (it was
    # parsed 4-6 times per run); the records are those a re-read of the written subset gives
    from pathlib import Path

    from pipeline.classify import ClassifyConfig, classify
    from pipeline.infra.data import records

    reads = []
    real_read_csv = pd.read_csv

    def counting(path, *a, **k):
        if Path(str(path)).suffix == ".csv" and Path(str(path)).stem in ("phantoms", "subset"):
            reads.append(Path(str(path)).name)
        return real_read_csv(path, *a, **k)

    monkeypatch.setattr(pd, "read_csv", counting)
    cfg = load_config(
        ClassifyConfig,
        None,
        [
            f"data.manifest={phantom_manifest}",
            *(a.removeprefix("classify.") for a in TINY_GAIN_CLASSIFY),
            "fraction=0.5",
            f"out_dir={tmp_path / 'out'}",
            "tracking.run_name=once",
            f"tracking.uri=sqlite:///{tmp_path / 'm.db'}",
        ],
    )
    res = classify(cfg)
    assert reads == ["phantoms.csv"], reads
    monkeypatch.setattr(pd, "read_csv", real_read_csv)
    subset = tmp_path / "out" / "once" / "subset.csv"
    scores = pd.read_csv(res["scores"])
    assert list(scores["path"]) == [r["image"] for r in records(subset, "test")]


def test_gain_children_under_one_parent_and_paired_table(tmp_path, phantom_manifest):
    import mlflow

    from pipeline.gain import GainConfig, gain

    uri = f"sqlite:///{tmp_path / 'gain.db'}"
    cfg = load_config(
        GainConfig,
        None,
        [
            f"classify.data.manifest={phantom_manifest}",
            *TINY_GAIN_CLASSIFY,
            f"classify.tracking.uri={uri}",
            "arms=[real,synthetic,synthetic_filtered]",
            "fractions=[0.5,1.0]",
            "seeds=[0,1]",
            "vaegan_overrides=[epochs=1,data.batch_size=16,model.base_channels=8,model.latent_dim=8,"
            "model.num_classes=2,grid_size=4,tracking.log_model=false]",
            f"out_dir={tmp_path / 'gain'}",
            "tracking.run_name=t",
        ],
    )
    res = gain(cfg)
    table = res["table"]
    assert set(table["split"]) == {"test"}
    assert set(table["arm"]) == {"real", "synthetic", "synthetic_filtered"} and set(table["fraction"]) == {
        0.5,
        1.0,
    }
    syn = table[table["arm"] == "synthetic"]
    assert syn["paired_delta"].notna().all() and (syn["n_seeds"] == 2).all()
    # the paired delta's mean is the mean over seeds of the children's test AUROC differences
    runs = res["runs"].set_index(["fraction", "arm", "seed"])["auroc"]
    d = [runs[(0.5, "synthetic", s)] - runs[(0.5, "real", s)] for s in (0, 1)]
    assert abs(float(syn[syn["fraction"] == 0.5]["paired_delta"].iloc[0]) - sum(d) / 2) < 1e-6
    assert ((syn["paired_lo"] <= syn["paired_delta"]) & (syn["paired_delta"] <= syn["paired_hi"])).all()
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("cxr-vaegan-gain")
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{res['parent_run_id']}'")
    stages = [r.data.tags.get("stage") for r in children]
    assert stages.count("classify") == 12
    # each synthetic_filtered child is judged by its own subset's real-only classifier
    for r in children:
        if r.data.tags.get("arm") == "synthetic_filtered":
            fr, sd = r.data.tags["fraction"], r.data.tags["seed"]
            assert r.data.params["judge"].endswith(f"real-f{fr}-s{sd}/classifier.pt")
    # gain's step budget: within a (fraction, seed) every arm trains the real arm's optimiser steps,
    # although the synthetic arm has twice the images
    for fr in ("0.5", "1"):
        for sd in ("0", "1"):
            steps = {
                r.data.params["optimizer_steps"]
                for r in children
                if r.data.tags.get("stage") == "classify"
                and r.data.tags["fraction"] == fr
                and r.data.tags["seed"] == sd
            }
            assert len(steps) == 1, (fr, sd, steps)
    assert "optimiser steps" in (tmp_path / "gain" / "t" / "gain_table.md").read_text()
    # one generator per (fraction 0.5, seed) subset, one shared at fraction 1.0
    assert stages.count("train") == 3
    assert {a.path for a in client.list_artifacts(res["parent_run_id"], "gain")} >= {
        "gain/gain.png",
        "gain/gain_table.md",
    }
    # each (fraction, seed) generator is scored by that subset's real-only classifier, in its record
    runs_df = res["runs"]
    fid = runs_df[runs_df["arm"] == "synthetic"]["generator_class_fidelity"]
    assert len(fid) == 4 and fid.between(0, 1).all()
    assert runs_df[runs_df["arm"] == "real"]["generator_class_fidelity"].isna().all()
    from pipeline.infra.records import StudyRecords

    gens = StudyRecords(tmp_path / "gain" / "t" / "records").all("generators")
    assert sorted(gens) == ["vaegan-f0.5-s0", "vaegan-f0.5-s1", "vaegan-f1"]
    assert sorted(gens["vaegan-f1"]["class_fidelity"]) == ["0", "1"]  # one judge per seed
    assert all(
        d["n"] == 1000 and d["auroc_lo"] <= d["auroc"] <= d["auroc_hi"]
        for g in gens.values()
        for d in g["class_fidelity"].values()
    )
    assert "generator class fidelity" in (tmp_path / "gain" / "t" / "gain_table.md").read_text()
    # a re-run loses nothing already done: every child is skipped, no fidelity is recomputed
    files = sorted((tmp_path / "gain" / "t" / "records" / "generators").glob("*.json"))
    mtimes = [f.stat().st_mtime_ns for f in files]
    again = gain(cfg)
    assert again["parent_run_id"] == res["parent_run_id"] and again["trained"] == 0
    assert list(again["runs"]["run_id"]) == list(res["runs"]["run_id"])
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    before = runs_df["generator_class_fidelity"].fillna(-1).tolist()
    assert again["runs"]["generator_class_fidelity"].fillna(-1).tolist() == before


def test_validation_rules():
    from pipeline.classify import ClassifyConfig
    from pipeline.gain import GainConfig

    with pytest.raises(ConfigError, match="arm must be one of"):
        load_config(ClassifyConfig, None, ["arm=magic"])
    with pytest.raises(ConfigError, match="needs synthetic="):
        load_config(ClassifyConfig, None, ["arm=synthetic"])
    with pytest.raises(ConfigError, match=r"fraction must be in \(0, 1\]"):
        load_config(ClassifyConfig, None, ["fraction=0"])
    with pytest.raises(ConfigError, match="step_budget must be 'epochs' or 'real'"):
        load_config(ClassifyConfig, None, ["step_budget=steps"])
    with pytest.raises(ConfigError, match="needs judge="):
        load_config(ClassifyConfig, None, ["arm=synthetic_filtered", "synthetic=x.csv"])
    with pytest.raises(ConfigError, match="'real' must come before 'synthetic_filtered'"):
        load_config(GainConfig, None, ["arms=[synthetic_filtered,real]"])
    with pytest.raises(ConfigError, match="synthetic_pretrain needs epochs >= 2"):
        load_config(ClassifyConfig, None, ["arm=synthetic_pretrain", "synthetic=x.csv", "epochs=1"])
    with pytest.raises(ConfigError, match="must include 'real'"):
        load_config(GainConfig, None, ["arms=[classical]"])
    with pytest.raises(ConfigError, match="only a fraction-1.0 generator can be shared"):
        load_config(GainConfig, None, ["generators=['0.1=x.pt']"])
    with pytest.raises(ConfigError, match="unknown config key 'classify.nope'"):
        load_config(GainConfig, None, ["classify.nope=1"])
