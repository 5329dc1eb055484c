"""``pipeline.run export format=monai-bundle`` (issue 26, item 3): the tiny phantom generator
written as a MONAI bundle, run by MONAI's own command line in a fresh process with no network, its
images equal to ``generate``'s for the same seed; read by ``ConfigParser`` and ``monai.bundle.load``;
weights only in ``models/``; a generator below the class-fidelity threshold refused."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, verify_net_in_out
from monai.bundle import load as bundle_load
from PIL import Image

from pipeline.export import ExportConfig, export
from pipeline.generate import GenerateConfig, generate
from pipeline.infra import checkpoint as ckpt
from pipeline.infra.config import ConfigError, load_config
from pipeline.infra.loaders import load_generator, resolve_labels, sample_images
from pipeline.infra.stage_configs import TrackingConfig
from pipeline.run import main as run_main

# what MONAI's bundle specification requires of metadata.json (verify_metadata checks it against a
# schema it downloads: not possible offline, so the keys are checked here)
MANDATORY = (
    "version",
    "monai_version",
    "pytorch_version",
    "numpy_version",
    "required_packages_version",
    "task",
    "description",
    "authors",
    "copyright",
    "network_data_format",
)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, phantom_generator) -> Path:
    """The phantom generator exported through the CLI."""
    out = tmp_path_factory.mktemp("bundles") / "cxr-gen"
    ck = phantom_generator["checkpoint"]
    assert run_main(["export", f"checkpoint={ck}", "format=monai-bundle", f"out={out}"]) == 0
    return out


def _offline_env() -> dict[str, str]:
    """This environment with every proxy pointing at a closed port: any download fails at once."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    dead = "http://127.0.0.1:9"
    return {**env, "HTTP_PROXY": dead, "HTTPS_PROXY": dead, "http_proxy": dead, "https_proxy": dead}


def _pngs(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def test_bundle_layout_and_metadata(bundle, phantom_generator):
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert [k for k in MANDATORY if k not in meta] == []
    assert (bundle / "configs" / "inference.json").is_file() and (bundle / "docs" / "README.md").is_file()
    fmt = meta["network_data_format"]
    assert fmt["outputs"]["pred"]["num_channels"] == 1
    assert fmt["outputs"]["pred"]["spatial_shape"] == [32, 32]
    assert fmt["outputs"]["pred"]["dtype"] == "float32" and fmt["outputs"]["pred"]["value_range"] == [-1, 1]
    assert fmt["inputs"]["latent"]["num_channels"] == 8 and fmt["inputs"]["label"]["value_range"] == [0, 1]
    assert meta["label_names"] == {"0": "normal", "1": "pneumonia"} and meta["image_size"] == 32
    # data and training facts from the checkpoint; no gate ran, so no fidelity is claimed
    assert meta["training"]["config"]["data.image_size"] == 32 and meta["training"]["epoch"] == 1
    assert meta["training"]["mlflow_run_id"] == phantom_generator["run_id"]
    # a bundle is shared: no path of the exporting machine in what it says about itself
    text = (bundle / "configs" / "metadata.json").read_text() + (bundle / "docs" / "README.md").read_text()
    assert str(phantom_generator["checkpoint"]).rsplit("/", 2)[0] not in text
    assert meta["quality"]["class_fidelity_auroc"] is None
    assert "not recorded" in meta["quality"]["measured_by"]


def test_bundle_runs_offline_in_monai_cli_and_equals_generate(bundle, phantom_generator, tmp_path):
    out = tmp_path / "synthetic"
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        str(bundle / "configs" / "inference.json"),
    ]
    cmd += ["--bundle_root", str(bundle), "--label", "pneumonia", "--n", "8", "--seed", "3"]
    cmd += ["--output_dir", str(out)]
    # from a folder of its own (not the repository), with no network
    res = subprocess.run(cmd, cwd=tmp_path, env=_offline_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = _pngs(out)
    assert list(got) == [f"syn_{i:06d}_pneumonia.png" for i in range(8)]
    assert all(a.shape == (32, 32) and a.dtype == np.uint8 for a in got.values())
    rows = (out / "labels.csv").read_text().splitlines()
    assert rows[0] == "file,index,label,label_name,seed,prior"
    assert {r.split(",")[3] for r in rows[1:]} == {"pneumonia"} and len(rows) == 9
    # the very images generate writes for the same seed, label and prior
    ck = phantom_generator["checkpoint"]
    generate(
        GenerateConfig(
            checkpoint=ck, n=8, label="pneumonia", seed=3, out=str(tmp_path / "gen"), log_mlflow=False
        )
    )
    want = _pngs(tmp_path / "gen" / "images")
    assert list(want) == list(got) and all(np.array_equal(got[k], want[k]) for k in got)


def test_bundle_code_imports_nothing_of_this_project(bundle):
    # the bundle runs where cxr-vaegan is not installed: its network module imports only these
    tree = ast.parse((bundle / "scripts" / "cxr_generator.py").read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {
        n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0
    }
    assert names <= {"__future__", "csv", "os", "re", "numpy", "torch", "monai", "PIL"}


def test_config_parser_network_equals_sample_images(bundle, phantom_generator):
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.read_meta(str(bundle / "configs" / "metadata.json"))
    parser["bundle_root"] = str(bundle)
    parser["device"] = "cpu"
    net, code = parser.get_parsed_content("network"), parser.get_parsed_content("code")
    assert parser["_meta_#image_size"] == 32 and not net.training
    lg = load_generator(phantom_generator["checkpoint"])
    labels = resolve_labels("balanced", 10, lg)
    for prior in ("fitted", "normal"):
        want = sample_images(lg, labels, seed=5, prior=prior)
        assert torch.equal(code.sample(net, labels, seed=5, prior=prior), want)


def test_monai_bundle_load_and_verify_net_in_out(bundle, monkeypatch):
    # bundle_root is "." in the bundle (MONAI's convention): load() is run from the bundle folder
    monkeypatch.chdir(bundle)
    net = bundle_load(bundle.name, bundle_dir=bundle.parent, workflow_type="inference", device="cpu")
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert type(net).__name__ == "CXRGenerator"
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())
    # verify_net_in_out works offline; it reads an input named "image": pointed at the latent input
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(bundle / "configs" / "metadata.json"),
        config_file=str(bundle / "configs" / "inference.json"),
        device="cpu",
        extra_forward_args={"labels": 0},
        **{
            "bundle_root": str(bundle),
            "_meta_#network_data_format#inputs#image": {
                "num_channels": 8,
                "spatial_shape": [],
                "dtype": "float32",
            },
        },
    )


def test_models_hold_weights_only_with_the_prior(bundle, phantom_generator):
    assert sorted(p.name for p in (bundle / "models").iterdir()) == ["model.pt"]
    # weights_only=True refuses anything but tensors and plain containers: nothing pickled
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    payload = ckpt.load_checkpoint(phantom_generator["checkpoint"])
    decoder = ckpt.inference_state(payload, "decoder")
    assert all(torch.equal(state[f"decoder.{k}"], v) for k, v in decoder.items())
    assert bool(state["prior.fitted"]) and torch.equal(state["prior.mean"], payload["prior"]["mean"])


def test_averaged_weights_are_the_ones_exported(phantom_generator, tmp_path):
    payload = ckpt.load_checkpoint(phantom_generator["checkpoint"])
    averaged = {k: v + 0.01 if v.is_floating_point() else v for k, v in payload["models"]["decoder"].items()}
    payload["ema"] = {"decoder": averaged, "encoder": payload["models"]["encoder"]}
    payload["config"]["model"]["ema_decay"] = 0.999
    torch.save(payload, tmp_path / "ema.pt")
    export(ExportConfig(checkpoint=str(tmp_path / "ema.pt"), out=str(tmp_path / "b")))
    state = torch.load(tmp_path / "b" / "models" / "model.pt", weights_only=True)
    assert all(torch.equal(state[f"decoder.{k}"], v) for k, v in averaged.items())
    meta = json.loads((tmp_path / "b" / "configs" / "metadata.json").read_text())
    assert meta["training"]["weights"].startswith("averaged (EMA")


def test_mlflow_model_uri_exports_the_same_bundle(bundle, phantom_generator, tmp_path):
    uri = f"runs:/{phantom_generator['run_id']}/generator"
    export(
        ExportConfig(
            checkpoint=uri, out=str(tmp_path / "b"), tracking=TrackingConfig(uri=phantom_generator["uri"])
        )
    )
    a = torch.load(tmp_path / "b" / "models" / "model.pt", weights_only=True)
    b = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the training facts come from the run's params
    meta = json.loads((tmp_path / "b" / "configs" / "metadata.json").read_text())
    assert meta["training"]["config"]["data.image_size"] == "32"


def test_export_refuses_a_generator_below_the_fidelity_threshold(phantom_generator, tmp_path):
    payload = ckpt.load_checkpoint(phantom_generator["checkpoint"])
    payload["gate"] = {"fd": 12.0, "epoch": payload["epoch"], "class_fidelity": 0.55}
    torch.save(payload, tmp_path / "weak.pt")
    # its images often do not show their label: a bundle others use would spread wrong labels
    with pytest.raises(ValueError, match=r"class fidelity 0\.550 .* below min_fidelity=0\.7.*force=true"):
        export(ExportConfig(checkpoint=str(tmp_path / "weak.pt"), out=str(tmp_path / "b")))
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.*"))
    export(ExportConfig(checkpoint=str(tmp_path / "weak.pt"), out=str(tmp_path / "b"), force=True))
    meta = json.loads((tmp_path / "b" / "configs" / "metadata.json").read_text())
    assert meta["quality"]["class_fidelity_auroc"] == 0.55 and meta["quality"]["forced"] is True
    assert "force=true" in (tmp_path / "b" / "docs" / "README.md").read_text()


def test_export_refuses_a_non_empty_out_unless_overwrite(bundle, phantom_generator, tmp_path):
    out = tmp_path / "b"
    shutil.copytree(bundle, out)
    (out / "notes.txt").write_text("mine")
    ck = phantom_generator["checkpoint"]
    # a bundle written beside other files would mix them: refused, naming out= and overwrite=true
    with pytest.raises(FileExistsError, match="out=.* is not empty.*overwrite=true"):
        export(ExportConfig(checkpoint=ck, out=str(out)))
    export(ExportConfig(checkpoint=ck, out=str(out), overwrite=True))
    assert not (out / "notes.txt").exists() and (out / "models" / "model.pt").is_file()


def test_export_config_refuses_an_unknown_format():
    # only MONAI bundles are written: another format would silently give one
    with pytest.raises(ConfigError, match="format='onnx' is not supported: use format=monai-bundle"):
        load_config(ExportConfig, None, ["checkpoint=g.pt", "out=b", "format=onnx"])


def test_export_config_refuses_a_missing_out():
    # without out= there is nowhere to write the bundle
    with pytest.raises(ConfigError, match="out is required"):
        load_config(ExportConfig, None, ["checkpoint=g.pt"])
