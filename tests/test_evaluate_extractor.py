"""evaluate refuses a feature extractor that has seen the generator's images (or the reference
images): a classifier trained with synthetic images scores any synthetic image as right."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.infra.config import load_config


def _edited_copy(src: str, dst: Path, edit) -> str:
    payload = torch.load(src, map_location="cpu", weights_only=True)
    edit(payload)
    torch.save(payload, dst)
    return str(dst)


def _as_synthetic(p: dict) -> None:
    p["arm"] = "synthetic"
    p["config"]["arm"] = "synthetic"


def _before_provenance(p: dict) -> None:
    # a classify checkpoint from before it recorded its arm and training manifest
    p.pop("arm", None)
    p.pop("train_manifest", None)


def _cfg(tmp_path, generator: str, extractor: str, reference, *extra: str):
    from pipeline.evaluate import EvaluateConfig

    return load_config(
        EvaluateConfig,
        None,
        [
            f"checkpoint={generator}",
            f"judge={extractor}",
            f"reference={reference}",
            "bootstrap=10",
            "k=3",
            f"out_dir={tmp_path / 'ev'}",
            f"tracking.uri=sqlite:///{tmp_path / 'ev.db'}",
            *extra,
        ],
    )


def test_evaluate_refuses_a_foreign_extractor_unless_told(
    tmp_path, phantom_manifest, phantom_generator, phantom_extractor
):
    from pipeline.evaluate import evaluate

    gen = phantom_generator["checkpoint"]
    synthetic = _edited_copy(phantom_extractor, tmp_path / "synthetic-arm.pt", _as_synthetic)
    # refused before any work, naming the extractor, what it was trained on and the override
    with pytest.raises(ValueError) as e:
        evaluate(_cfg(tmp_path, gen, synthetic, phantom_manifest))
    msg = str(e.value)
    assert "synthetic-arm.pt" in msg and "arm=synthetic" in msg and "allow_foreign_judge" in msg
    assert not (tmp_path / "ev").exists() or not any((tmp_path / "ev").rglob("report.md"))

    # the extractor the classify stage records (arm=real on the reference manifest) is accepted
    from pipeline.infra.judge import check_extractor
    from transforms.io import file_sha256

    payload = torch.load(phantom_extractor, map_location="cpu", weights_only=True)
    assert payload["arm"] == "real"
    assert payload["train_manifest"]["sha256"] == file_sha256(phantom_manifest)
    assert Path(payload["train_manifest"]["path"]) == Path(phantom_manifest).resolve()
    assert check_extractor(phantom_extractor, payload, phantom_manifest) == ""

    # trained on another manifest than the reference: refused
    other = tmp_path / "other.csv"
    other.write_text("".join(Path(phantom_manifest).read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(ValueError, match="not on the reference manifest.*allow_foreign_judge"):
        evaluate(_cfg(tmp_path, gen, phantom_extractor, other))

    # a checkpoint from before the provenance was recorded: refused, clearly
    old = _edited_copy(phantom_extractor, tmp_path / "old.pt", _before_provenance)
    with pytest.raises(ValueError, match="records no training manifest.*allow_foreign_judge"):
        evaluate(_cfg(tmp_path, gen, old, phantom_manifest))
    no_arm = _edited_copy(old, tmp_path / "no-arm.pt", lambda p: p["config"].pop("arm"))
    with pytest.raises(ValueError, match="records no training arm"):
        check_extractor(no_arm, torch.load(no_arm, weights_only=True), phantom_manifest)

    # the judge of train's gate and of the gain stage's check of each generator refuses it too
    from pipeline.infra.judge import Judge

    with pytest.raises(ValueError, match="arm=synthetic.*allow_foreign_judge"):
        Judge.load(synthetic)

    # the explicit override runs, and the report and the MLflow run say so
    res = evaluate(_cfg(tmp_path, gen, synthetic, phantom_manifest, "allow_foreign_judge=true"))
    assert "arm=synthetic" in res["meta"]["foreign_extractor"]
    report = Path(res["report"]).read_text()
    assert "foreign judge, used with allow_foreign_judge=true" in report
    assert "arm=synthetic" in report
    saved = json.loads((Path(res["report"]).parent / "metrics.json").read_text())
    assert saved["meta"]["foreign_extractor"] == res["meta"]["foreign_extractor"]
    import mlflow

    run = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'ev.db'}").get_run(res["run_id"])
    assert "arm=synthetic" in run.data.tags["foreign_extractor"]
    assert run.data.params["allow_foreign_judge"].lower() == "true"


def test_judge_scores_once_and_measures_class_fidelity(phantom_generator, phantom_extractor):
    """One definition of P(positive): the judge's, batch by batch, equals the classifier's own
    forward pass on one image; class fidelity from images equals class fidelity from their scores,
    and without a bootstrap its AUROC is the plain AUROC."""
    import numpy as np

    from pipeline.infra.judge import Judge, Scores, class_fidelity, generator_fidelity
    from pipeline.infra.loaders import load_generator, resolve_labels, sample_images
    from pipeline.infra.metrics import auroc

    judge = Judge.load(phantom_extractor)
    assert judge.arm == "real" and judge.image_size == 32 and 0 <= judge.threshold <= 1
    lg = load_generator(phantom_generator["checkpoint"])
    y = resolve_labels("balanced", 24, lg)
    fake = sample_images(lg, y, seed=3)
    scores = judge.score(fake, batch_size=5)
    assert isinstance(scores, Scores) and scores.features.shape[0] == 24
    with torch.no_grad():
        one = float(torch.sigmoid(judge.model(fake[7][None]).float()).reshape(-1)[0])
    assert float(judge.probs(fake[7][None])[0]) == one
    assert np.array_equal(judge.probs(fake), judge.score(fake).probs)
    by_images = class_fidelity(judge, fake, y, n_boot=50, seed=1, real_images=fake[:12])
    assert by_images == class_fidelity(judge, judge.score(fake), y, n_boot=50, seed=1, real_images=fake[:12])
    assert {"auroc", "auroc_lo", "auroc_hi", "n", "fd", "coverage", "n_real"} <= set(by_images)
    point = class_fidelity(judge, scores, y, n_boot=0)
    assert point["auroc"] == auroc(y, scores.probs) and np.isnan(point["auroc_lo"])
    fid = generator_fidelity(phantom_generator["checkpoint"], judge, n=24, seed=3)
    assert fid["auroc"] == auroc(y, judge.probs(fake)) and fid["n"] == 24
