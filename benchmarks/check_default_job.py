"""Is the default job's generator drawing phantoms of the right class, or noise?

    python benchmarks/check_default_job.py [--checkpoint outputs/phantoms64/checkpoints/last.pt]

Trains a small classifier on the embedded phantoms' real images (the classify stage, arm=real,
its own MLflow store under outputs/), then scores the default job's generator with it: the class
fidelity AUROC (judge.generator_fidelity: 1,000 balanced samples, bootstrap CI), codes drawn from
the generator's fitted prior and, as an ablation, from N(0, I). A generator
drawing noise or ignoring its labels scores ~0.5. Writes docs/benchmarks/default_job.json and
copies the run's final sample grid to docs/default_job_samples.png.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.classify import ClassifyConfig, classify
from pipeline.infra.checkpoint import load_checkpoint
from pipeline.infra.config import load_config
from pipeline.infra.judge import Judge, generator_fidelity
from pipeline.infra.loaders import load_generator, load_images, resolve_labels, sample_images
from pipeline.ingest.default import default_manifest

DOCS = Path(__file__).resolve().parent.parent / "docs"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="outputs/phantoms64/checkpoints/last.pt")
    ap.add_argument("--epochs", type=int, default=25, help="classifier epochs")
    args = ap.parse_args()
    ck = Path(args.checkpoint)
    if not ck.is_file():
        sys.exit(f"{ck} does not exist: run `make run` (the default job) first")
    manifest = default_manifest()
    size = load_checkpoint(ck)["config"]["data"]["image_size"]
    t0 = time.time()
    cls = classify(
        load_config(
            ClassifyConfig,
            None,
            [
                f"data.manifest={manifest}",
                f"data.image_size={size}",
                "arm=real",
                f"epochs={args.epochs}",
                "tracking.run_name=phantom-extractor",
                "tracking.uri=sqlite:///outputs/check_default_job.db",
            ],
        )
    )
    judge = Judge.load(cls["checkpoint"], reference=manifest)
    fid = generator_fidelity(str(ck), judge, n=1000)
    # the default job's promise (issue "The front door"): 256 balanced samples told apart by class
    # (AUROC >= 0.9), and a mean sample that looks like the mean real phantom (correlation >= 0.8)
    fid256 = generator_fidelity(str(ck), judge, n=256)
    lg = load_generator(ck)
    fake = sample_images(lg, resolve_labels("balanced", 256, lg), seed=0)
    real = load_images(manifest, "train", size)[0]
    corr = float(np.corrcoef(fake.mean(0).flatten().numpy(), real.mean(0).flatten().numpy())[0, 1])
    # the ablation: the same generator drawing its codes from N(0, I) instead of its fitted prior
    normal = generator_fidelity(str(ck), judge, n=1000, prior="normal")
    grids = sorted((ck.parent.parent / "grids").glob("samples_epoch*.png"))
    out = {
        "checkpoint": str(ck),
        "classifier_test_auroc": cls["metrics"]["test/auroc"],
        "class_fidelity_auroc": fid["auroc"],
        "class_fidelity_ci": [fid["auroc_lo"], fid["auroc_hi"]],
        "n_samples": fid["n"],
        "class_fidelity_auroc_256": fid256["auroc"],
        "mean_image_correlation_256": round(corr, 4),
        "class_fidelity_auroc_normal_prior": normal["auroc"],
        "class_fidelity_ci_normal_prior": [normal["auroc_lo"], normal["auroc_hi"]],
        "final_grid": str(grids[-1]) if grids else "",
        "seconds": round(time.time() - t0, 1),
    }
    (DOCS / "benchmarks").mkdir(parents=True, exist_ok=True)
    (DOCS / "benchmarks" / "default_job.json").write_text(json.dumps(out, indent=2))
    if grids:
        shutil.copy(grids[-1], DOCS / "default_job_samples.png")
    print(json.dumps(out, indent=2))
    verdict = "phantoms of the right class" if fid["auroc"] >= 0.9 else "NOT recognisable (below 0.9)"
    print(f"class fidelity {fid['auroc']:.3f} [{fid['auroc_lo']:.3f}, {fid['auroc_hi']:.3f}]: {verdict}")
    print(
        f"256 samples: class fidelity {fid256['auroc']:.3f}, mean-image correlation with the real phantoms {corr:.3f}"
    )
    return 0 if fid["auroc"] >= 0.9 and fid256["auroc"] >= 0.9 and corr >= 0.8 else 1


if __name__ == "__main__":
    sys.exit(main())
