from __future__ import annotations

import subprocess
import sys
import time

import pytest
from cxr_factory import REPO

from pipeline.infra.config import ConfigError, flatten, load_config, to_dict
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


# ----------------------------------------------------------------------------- every stage's own defaults
def _stage_classes():
    from pipeline.classify import ClassifyConfig
    from pipeline.compare import CompareConfig
    from pipeline.evaluate import EvaluateConfig
    from pipeline.gain import GainConfig
    from pipeline.generate import GenerateConfig
    from pipeline.ingest.stage import IngestConfig

    return {
        "train": TrainConfig,
        "generate": GenerateConfig,
        "classify": ClassifyConfig,
        "evaluate": EvaluateConfig,
        "gain": GainConfig,
        "ingest": IngestConfig,
        "compare": CompareConfig,
    }


# the keys a stage requires, so that its config can be built at all
REQUIRED = {"generate": ["checkpoint=g.pt"], "evaluate": ["checkpoint=g.pt", "judge=c.pt"]}

# (stage, override, the flattened key it sets, the value it must take); ingest and compare have no
# sections, so theirs are top-level keys
ONE_KEY = [
    ("train", "tracking.run_name=r", "tracking.run_name", "r"),
    ("train", "data.batch_size=8", "data.batch_size", 8),
    ("generate", "tracking.run_name=r", "tracking.run_name", "r"),
    ("classify", "tracking.run_name=r", "tracking.run_name", "r"),
    ("classify", "data.image_size=32", "data.image_size", 32),
    ("classify", "model.dropout=0.2", "model.dropout", 0.2),
    ("evaluate", "tracking.run_name=r", "tracking.run_name", "r"),
    ("gain", "classify.tracking.run_name=r", "classify.tracking.run_name", "r"),
    ("gain", "classify.data.batch_size=8", "classify.data.batch_size", 8),
    ("ingest", "label_names=[normal,pneumonia]", "label_names", ["normal", "pneumonia"]),
    ("compare", "metric=val/auroc", "metric", "val/auroc"),
]


@pytest.mark.parametrize("stage,override,key,value", ONE_KEY, ids=[f"{s}:{o}" for s, o, _, _ in ONE_KEY])
def test_overriding_one_nested_key_changes_only_that_key(stage, override, key, value):
    cls = _stage_classes()[stage]
    base = flatten(to_dict(load_config(cls, None, REQUIRED.get(stage, []))))
    got = flatten(to_dict(load_config(cls, None, [*REQUIRED.get(stage, []), override])))
    changed = {k: got[k] for k in got if got[k] != base.get(k)}
    assert changed == {key: value}
    assert set(got) == set(base)


def test_classify_yaml_keeps_classify_tracking_defaults():
    from pipeline.classify import ClassifyConfig

    cfg = load_config(ClassifyConfig, REPO / "configs" / "classify64.yaml")
    assert cfg.tracking.register_model == "" and cfg.tracking.log_model is False
    assert cfg.tracking.experiment == "cxr-vaegan-classify"
    assert cfg.model.dropout == pytest.approx(0.3) and cfg.model.widths == [32, 64, 128, 256]


def test_broken_yaml_names_file_and_line(tmp_path):
    y = tmp_path / "broken.yaml"
    y.write_text("epochs: 3\ndata:\n  image_size: 32\n  batch_size: [8\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml.*line \d+") as e:
        load_config(TrainConfig, y)
    assert "\n" not in str(e.value)


def test_unknown_key_suggests_the_close_one(tmp_path):
    with pytest.raises(ConfigError, match=r"did you mean 'data\.batch_size'"):
        load_config(TrainConfig, None, ["data.bacth_size=8"])
    y = tmp_path / "typo.yaml"
    y.write_text("trackng:\n  run_name: r\n")
    with pytest.raises(ConfigError, match=r"'trackng'.*did you mean 'tracking'"):
        load_config(TrainConfig, y)


def _main(capsys, *argv):
    from pipeline.run import main

    try:
        rc = main(list(argv))
    except SystemExit as e:  # argparse exits on its own errors
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_stage_help_lists_every_key(capsys):
    rc, out, _ = _main(capsys, "train", "--help")
    assert rc == 0
    line = next(ln for ln in out.splitlines() if ln.split() and ln.split()[0] == "tracking.log_every")
    assert "int" in line and "10" in line
    for key in flatten(to_dict(load_config(TrainConfig))):
        assert key in out
    rc, out, _ = _main(capsys, "classify", "--help")
    line = next(ln for ln in out.splitlines() if ln.split() and ln.split()[0] == "data.max_val")
    assert rc == 0 and " 0" in line  # classify's own default, not DataConfig's 512


@pytest.mark.parametrize(
    "stage,args",
    [
        ("train", ["configs/kermany64.yaml", "epochs=2", "tracking.run_name=x"]),
        ("classify", ["configs/classify64.yaml", "data.image_size=32"]),
        ("generate", ["checkpoint=g.pt", "tracking.run_name=r"]),
    ],
)
def test_cli_print_config_round_trips(capsys, tmp_path, stage, args):
    cls = _stage_classes()[stage]
    argv = [str(REPO / a) if a.endswith(".yaml") else a for a in args]
    rc, out, err = _main(capsys, stage, *argv, "--print-config")
    assert rc == 0, err
    y = tmp_path / "printed.yaml"
    y.write_text(out)
    yaml_path = next((REPO / a for a in args if a.endswith(".yaml")), None)
    expected = load_config(cls, yaml_path, [a for a in args if "=" in a])
    assert load_config(cls, y) == expected


def test_cli_flag_style_argument_gets_a_hint(capsys):
    rc, _, err = _main(capsys, "train", "--epochs", "1")
    assert rc == 2 and "epochs=1" in err


def test_cli_ingest_takes_key_value_anywhere(capsys, monkeypatch, tmp_path):
    import pipeline.ingest.config
    import pipeline.ingest.stage

    seen = []
    monkeypatch.setattr(pipeline.ingest.stage, "ingest", seen.append)
    rc, _, err = _main(capsys, "ingest", "src", "--out", str(tmp_path / "m.csv"), "seed=3", "min_size=8")
    assert rc == 0, err
    assert seen[0].source == "src" and seen[0].out == str(tmp_path / "m.csv")
    assert seen[0].seed == 3 and seen[0].min_size == 8


# ----------------------------------------------------------------------------- config before imports
HEAVY = ("torch", "monai", "mlflow", "pandas", "matplotlib", "scipy", "sklearn")
# stage -> a key=value whose value does not fit, and the key its error names
BAD_VALUE = {
    "train": ("epochs=abc", "'epochs'"),
    "generate": ("n=abc", "'n'"),
    "classify": ("epochs=abc", "'epochs'"),
    "evaluate": ("k=abc", "'k'"),
    "gain": ("seeds=abc", "'seeds'"),
    "ingest": ("seed=abc", "'seed'"),
}


def test_cli_checks_config_and_answers_help_without_importing_torch_monai_mlflow(tmp_path):
    # compare quotes every value as free text, so its bad value comes from a config file
    bad_yaml = tmp_path / "compare.yaml"
    bad_yaml.write_text("metric: 3\n")
    cases = {**BAD_VALUE, "compare": (str(bad_yaml), "'metric'")}
    code = f"""
import contextlib, io, sys
from pipeline.run import main
for stage, (arg, key) in {cases!r}.items():
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        assert main([stage, arg]) == 2, stage
        assert main([stage, "--help"]) == 0, stage
    assert "error: " in err.getvalue() and key in err.getvalue(), (stage, err.getvalue())
    assert "usage: python -m pipeline.run " + stage in out.getvalue(), stage
with contextlib.redirect_stdout(io.StringIO()):
    assert main(["train", "--print-config"]) == 0
    assert main(["generate", "checkpoint=g.pt", "--print-config"]) == 0
loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))
assert not loaded, f"imported before the stage ran: {{loaded}}"
"""
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr


def test_every_config_class_imports_light_and_is_the_one_its_stage_module_exports():
    code = f"""
import sys
import pipeline.infra.stage_configs, pipeline.infra.study_configs, pipeline.ingest.config, networks.config, transforms.config
loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))
assert not loaded, f"imported by the config modules: {{loaded}}"
"""
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr

    import networks
    import networks.classifier
    import networks.config
    import networks.vaegan
    import pipeline.classify
    import pipeline.compare
    import pipeline.evaluate
    import pipeline.gain
    import pipeline.generate
    import pipeline.infra.data
    import pipeline.infra.stage_configs as sc
    import pipeline.infra.study_configs
    import pipeline.infra.tracking
    import pipeline.ingest.stage
    import pipeline.train
    import transforms
    import transforms.config
    import transforms.io
    import transforms.presets

    # a stage module imports the config it runs with from where it lives (nothing re-exported)
    uses = {
        pipeline.train: ["TrainConfig", "OptimConfig", "GateConfig"],
        pipeline.infra.data: ["DataConfig"],
        pipeline.infra.tracking: ["TrackingConfig"],
        pipeline.generate: ["GenerateConfig"],
        pipeline.classify: ["ClassifyConfig"],
        pipeline.evaluate: ["EvaluateConfig"],
        pipeline.gain: ["ClassifyConfig"],
    }
    assert pipeline.gain.GainConfig is pipeline.infra.study_configs.GainConfig
    assert pipeline.compare.CompareConfig is pipeline.infra.study_configs.CompareConfig
    assert pipeline.ingest.stage.IngestConfig is pipeline.ingest.config.IngestConfig
    for module, names in uses.items():
        for name in names:
            assert getattr(module, name) is getattr(sc, name), f"{module.__name__}.{name}"
    assert networks.vaegan.ModelConfig is networks.ModelConfig is networks.config.ModelConfig
    assert networks.vaegan.HEADS is networks.config.HEADS
    assert networks.classifier.ClassifierConfig is networks.config.ClassifierConfig
    assert (
        transforms.presets.TransformConfig is transforms.TransformConfig is transforms.config.TransformConfig
    )
    assert transforms.io.MAX_PIXELS == transforms.config.MAX_PIXELS
    assert networks.VAEGAN is networks.vaegan.VAEGAN and transforms.read_image is transforms.io.read_image
    with pytest.raises(AttributeError):
        networks.no_such_name  # noqa: B018


def test_cli_config_error_comes_fast_end_to_end():
    t0 = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-m", "pipeline.run", "train", "epochs=abc"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.perf_counter() - t0
    print(f"python -m pipeline.run train epochs=abc: {elapsed:.2f} s")  # machine-dependent: not asserted
    assert p.returncode == 2
    assert p.stderr.strip() == "error: config key 'epochs': expected an integer, got str 'abc'"
    assert "Traceback" not in p.stderr


def test_on_off_yes_no_are_words_not_booleans():
    """YAML 1.1 (PyYAML's default) reads on/off/yes/no as booleans, so `speed.mode=off` would reach
    a string key as False; the loader reads YAML 1.2 booleans: only true and false."""
    from pipeline.train import TrainConfig

    cfg = load_config(TrainConfig, None, ["speed.mode=off", "speed.fused_norm_act=on"])
    assert (cfg.speed.mode, cfg.speed.fused_norm_act) == ("off", "on")
    with pytest.raises(ConfigError, match="'deterministic': expected true/false, got 'yes'"):
        load_config(TrainConfig, None, ["deterministic=yes"])


def test_train_alone_is_the_default_job_and_the_unconditioned_model_is_one_key_away(capsys):
    # one command, one default: `train` with no config trains what `make run` trains (before, the
    # stage defaults: an unconditioned model whose generator could not draw a class)
    import yaml

    from pipeline.run import main

    assert main(["train", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["num_classes"] == 2 and cfg["tracking"]["run_name"] == "phantoms64"
    assert main(["train", "model.num_classes=0", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"]["num_classes"] == 0
    # a config file given replaces the default job entirely
    assert main(["train", str(REPO / "configs" / "kermany64.yaml"), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"]["latent_dim"] == 128


# ------------------------------------------------------------------ renamed keys (one release)
def test_a_renamed_classify_key_is_read_in_its_new_place_with_a_deprecation_message(capsys, monkeypatch):
    # classify's lr/weight_decay/grad_clip are spelled as train's (optim.*) since 2026-12-06; a
    # user's old command line keeps working for a release and is told the new spelling
    from pipeline.infra import config
    from pipeline.infra.stage_configs import ClassifyConfig

    monkeypatch.setattr(config, "_WARNED", set())  # said once per process: this test must see it

    cfg = load_config(ClassifyConfig, None, ["lr=0.02", "weight_decay=0.1", "channels_last=false"])
    assert (cfg.optim.lr, cfg.optim.weight_decay) == (0.02, 0.1)
    assert cfg.speed.channels_last == "off"
    err = capsys.readouterr().err
    assert "'lr' is deprecated, read as 'optim.lr'" in err
    assert "'channels_last' is deprecated, read as 'speed.channels_last'" in err


def test_a_renamed_key_in_a_yaml_section_is_read_in_its_new_place(tmp_path):
    from pipeline.infra.study_configs import GainConfig

    path = tmp_path / "old.yaml"
    path.write_text("classify:\n  lr: 0.003\n  cache_allocations: true\narms: [real]\n")
    cfg = load_config(GainConfig, path, ["classify.grad_clip=1.5"])
    assert (cfg.classify.optim.lr, cfg.classify.optim.grad_clip) == (0.003, 1.5)
    assert cfg.classify.speed.cache_allocations == "on"


def test_a_key_given_in_both_spellings_is_refused(tmp_path):
    # which one was meant cannot be told: refused, naming the key to keep
    from pipeline.infra.stage_configs import ClassifyConfig

    path = tmp_path / "both.yaml"
    path.write_text("lr: 0.003\noptim:\n  lr: 0.004\n")
    with pytest.raises(ConfigError, match="'optim.lr' is given twice"):
        load_config(ClassifyConfig, path)


def test_an_override_in_the_new_spelling_wins_over_the_old_one_in_a_file(tmp_path):
    from pipeline.infra.stage_configs import ClassifyConfig

    path = tmp_path / "old.yaml"
    path.write_text("lr: 0.003\n")
    assert load_config(ClassifyConfig, path, ["optim.lr=0.5"]).optim.lr == 0.5


@pytest.mark.parametrize(
    "stage,old,path",
    [
        ("train", "gate.extractor=c.pt", ("gate", "judge")),
        ("classify", "filter_classifier=c.pt", ("judge",)),
        ("evaluate", "extractor=c.pt", ("judge",)),
    ],
)
def test_the_judge_has_one_name_and_its_old_names_still_read(stage, old, path):
    # a real-only classifier judging synthetic images was gate.extractor, filter_classifier and
    # extractor in three stages; it is `judge` in each (the old names read for a release)
    from pipeline.run import config_class

    extra = ["checkpoint=g.pt"] if stage == "evaluate" else []
    cfg = load_config(config_class(stage), None, [old, *extra])
    for name in path:
        cfg = getattr(cfg, name)
    assert cfg == "c.pt"
