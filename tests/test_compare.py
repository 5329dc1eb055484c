"""compare: runs are pooled only when they differ by seed (and cosmetic settings) alone."""

from __future__ import annotations

import math
import re
import warnings

import pandas as pd
import pytest

from pipeline.compare import CompareConfig, compare, file_stem
from pipeline.infra.stage_configs import TrackingConfig
from transforms.manifest import unneutralise


def _log_runs(uri: str, experiment: str, runs: list[dict]) -> None:
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment(experiment)
    for r in runs:
        params = {
            "arm": r.get("arm", "synthetic"),
            "fraction": "1.0",
            "ratio": str(r["ratio"]),
            "seed": str(r["seed"]),
            "epochs": "10",
            "data.max_train": str(r.get("max_train", 0)),
            "data.manifest": r.get("manifest", "data_manifests/kermany.csv"),
            # cosmetic: must not split a group
            "out_dir": f"outputs/cls-{r['name']}",
            "device": r.get("device", "cpu"),
            "threads": str(r.get("threads", 0)),
            "tracking.run_name": r["name"],
            "tracking.uri": uri,
            # derived from the config and the seed's subset: must not split a group
            "n_train_real": str(100 + r["seed"]),
        }
        run = client.create_run(
            exp_id,
            run_name=r["name"],
            tags={
                "stage": "classify",
                "arm": params["arm"],
                "fraction": r.get("tag_fraction", "1"),
                "seed": str(r["seed"]),
            },
        )
        for k, v in params.items():
            client.log_param(run.info.run_id, k, v)
        client.log_metric(run.info.run_id, "test/auroc", r["auroc"])
        client.log_metric(run.info.run_id, "test/balanced_accuracy", r["auroc"] - 0.1)
        client.set_terminated(run.info.run_id)


def test_compare_groups_by_config_not_by_arm(tmp_path, capsys):
    from pipeline.compare import CompareConfig, compare

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _log_runs(
        uri,
        "study",
        [
            # one config, three seeds (and different cosmetic settings): one group; its t-interval
            # would overrun 1.0 unclipped
            {"name": "a0", "ratio": 0.5, "seed": 0, "auroc": 0.90, "threads": 1},
            {"name": "a1", "ratio": 0.5, "seed": 1, "auroc": 0.95, "threads": 2, "device": "cuda"},
            {"name": "a2", "ratio": 0.5, "seed": 2, "auroc": 0.99},
            # same arm and fraction, another ratio and training size, seed 0 again: its own group,
            # one run, so no interval
            {"name": "b0", "ratio": 1.0, "seed": 0, "auroc": 0.40, "max_train": 50},
            # the gain stage's children: one subset manifest per seed, the same configuration
            *(
                {
                    "name": f"real-f0.1-s{s}",
                    "arm": "real",
                    "ratio": 1.0,
                    "seed": s,
                    "auroc": 0.6 + 0.05 * s,
                    "manifest": f"outputs/gain/subsets/f0.1_s{s}.csv",
                    "tag_fraction": "0.1",
                }
                for s in (0, 1)
            ),
        ],
    )
    out = tmp_path / "cmp"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no NumPy / pandas warning may reach the user
        rc = compare(CompareConfig(tracking=TrackingConfig(experiment="study", uri=uri), out=str(out)))
    assert rc == 0
    printed = capsys.readouterr().out
    table = pd.read_csv(out / "study.csv")
    assert len(table) == 3, table
    a = table[table["n_runs"] == 3].iloc[0]
    b = table[table["n_runs"] == 1].iloc[0]
    c = table[table["n_runs"] == 2].iloc[0]
    assert a["n_seeds"] == 3 and b["n_seeds"] == 1 and c["n_seeds"] == 2
    assert c["arm"] == "real" and c["fraction"] == 0.1 and "f0.1_s{seed}.csv" in c["config"]
    assert 0.0 <= c["auroc_lo"] <= c["auroc"] <= c["auroc_hi"] <= 1.0
    assert math.isclose(a["auroc"], (0.90 + 0.95 + 0.99) / 3)
    assert 0.0 <= a["auroc_lo"] <= a["auroc"] <= a["auroc_hi"] <= 1.0
    assert a["auroc_hi"] == 1.0  # clipped t-interval
    assert math.isclose(b["auroc"], 0.40)
    # the distinguishing params are shown; cosmetic ones and the seed are not
    assert "ratio=0.5" in a["config"] and "ratio=1.0" in b["config"] and "data.max_train=50" in b["config"]
    for key in ("seed", "threads", "device", "out_dir", "tracking.", "n_train_real"):
        assert key not in a["config"] and key not in b["config"], key
    # printed: the single run has no interval, and nothing reads "nan" or lies outside [0, 1]
    assert "nan" not in printed.lower()
    line_b = next(ln for ln in printed.splitlines() if "data.max_train=50" in ln)
    assert "0.4000" in line_b and "[" not in line_b
    line_a = next(ln for ln in printed.splitlines() if "ratio=0.5" in ln)
    lo, hi = map(float, re.search(r"0\.9467 \[(-?[0-9.]+), (-?[0-9.]+)\]", line_a).groups())
    assert 0.0 <= lo <= 0.9467 <= hi == 1.0
    assert (out / "study.png").is_file()


def _log_plain_runs(uri: str, experiment: str, names: list[str]) -> None:
    """VAE-GAN-like runs (no arm tag): compare lists them one per row, run names included."""
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment(experiment)
    for i, name in enumerate(names):
        run = client.create_run(exp_id, run_name=name, tags={"stage": "train"})
        client.log_metric(run.info.run_id, "val/ssim", 0.5 + 0.1 * i)
        client.set_terminated(run.info.run_id)


def test_formula_like_run_names_are_text_in_the_csv(tmp_path, capsys):
    # a run named "=HYPERLINK(...)" was written as is: a spreadsheet opening the CSV ran it

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    names = ['=HYPERLINK("http://x","y")', "+1+1", "-2", "@SUM(A1)", "plain"]
    _log_plain_runs(uri, "vaegan", names)
    out = tmp_path / "cmp"
    assert compare(CompareConfig(tracking=TrackingConfig(experiment="vaegan", uri=uri), out=str(out))) == 0
    cells = pd.read_csv(out / "vaegan.csv")["runName"].tolist()
    assert sorted(cells) == sorted(["'" + n for n in names[:4]] + ["plain"])
    assert sorted(unneutralise(c) for c in cells) == sorted(names)


def test_an_experiment_named_with_path_parts_writes_inside_out(tmp_path, capsys):
    # an experiment named "../x" made compare write x.csv beside its out folder, not in it

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _log_plain_runs(uri, "../escape", ["a", "b"])
    out = tmp_path / "box" / "cmp"
    assert compare(CompareConfig(tracking=TrackingConfig(experiment="../escape", uri=uri), out=str(out))) == 0
    assert sorted(p.name for p in out.iterdir()) == ["escape.csv", "escape.png"]
    assert not list((tmp_path / "box").glob("escape*"))


@pytest.mark.parametrize(
    "name,stem",
    [
        ("../", "experiment"),
        ("..", "experiment"),
        (".", "experiment"),
        ("/etc/passwd", "etc_passwd"),
        ("a/../b", "a_.._b"),
        ("C:\\\\x", "C_x"),
        (".hidden", "hidden"),
        ("cxr-vaegan-gain", "cxr-vaegan-gain"),
        ("x" * 500, "x" * 120),
    ],
)
def test_file_stem_is_one_plain_file_name(name, stem):
    # every name gives one file name in out: no separator, no "." or "..", no hidden file

    assert file_stem(name) == stem


def test_runs_logged_before_and_after_the_renames_group_together():
    # classify's lr and channels_last became optim.lr and speed.channels_last (2026-12-06): an
    # experiment holding runs of both revisions shows one row per configuration, not two; and
    # channels_last still tells configurations apart (it changes the arithmetic)
    from pipeline.compare import aggregate

    base = {"tags.arm": "real", "tags.fraction": "0.1", "metrics.test/auroc": 0.9}
    runs = pd.DataFrame(
        [
            {**base, "run_id": "a", "params.seed": "0", "params.lr": "0.001", "params.channels_last": "True"},
            {
                **base,
                "run_id": "b",
                "params.seed": "1",
                "params.optim.lr": "0.001",
                "params.speed.channels_last": "on",
            },
            {
                **base,
                "run_id": "c",
                "params.seed": "2",
                "params.optim.lr": "0.001",
                "params.speed.channels_last": "off",
            },
        ]
    )
    table = aggregate(runs)
    assert sorted(table["n_seeds"]) == [1, 2], table
    assert set(table["config"]) == {"channels_last=True", "channels_last=False"}
