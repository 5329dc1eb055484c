from __future__ import annotations

import subprocess
import sys

import pytest
from cxr_factory import REPO

from pipeline.config import ConfigError, flatten, load_config, to_dict
from pipeline.train import TrainConfig


def test_defaults_yaml_and_overrides(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("epochs: 3\ndata:\n  image_size: 32\nloss:\n  kl_weight: 0.2\n")
    cfg = load_config(TrainConfig, y, ["data.batch_size=8", "loss.kl_weight=1e-2", "model.kind=vae"])
    assert cfg.epochs == 3 and cfg.data.image_size == 32 and cfg.data.batch_size == 8
    assert cfg.loss.kl_weight == pytest.approx(0.01) and cfg.model.kind == "vae"
    assert cfg.model.image_size == 32  # follows the data size
    assert flatten(to_dict(cfg))["data.batch_size"] == 8


def test_unknown_key_names_the_key():
    with pytest.raises(ConfigError, match="data.bacth_size"):
        load_config(TrainConfig, None, ["data.bacth_size=8"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match="'epochs'"):
        load_config(TrainConfig, None, ["epochs=many"])
    with pytest.raises(ConfigError, match="'data.augment'"):
        load_config(TrainConfig, None, ["data.augment=3"])


def test_invalid_value_is_reported():
    with pytest.raises(ConfigError, match="model.kind"):
        load_config(TrainConfig, None, ["model.kind=gan"])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(TrainConfig, tmp_path / "none.yaml")


def test_cli_rejects_unknown_key_and_missing_manifest_before_building_anything(tmp_path):
    def run(*a):
        return subprocess.run(
            [sys.executable, "-m", "pipeline.run", *a],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )

    p = run("train", "optim.learning_rate=1")
    assert p.returncode == 2 and "optim.learning_rate" in p.stderr
    p = run("train", f"data.manifest={tmp_path}/missing.csv")
    assert p.returncode == 2 and "missing.csv does not exist" in p.stderr
    assert "Traceback" not in p.stderr
