"""``python -m pipeline.run evaluate checkpoint=... judge=... [reference=<manifest>] [n=...]``,
or ``evaluate samples=<manifest or folder> reference=<manifest> judge=...``.

Synthesis quality of a trained VAE-GAN (or VAE) against real images, logged to MLflow with a
Markdown report and its figures. With ``samples`` it scores images any generator made (a GAN, a
diffusion model), preprocessed like the reference, on the same panel; the latent interpolation
then is left out (it needs an encoder):

* Fréchet distance, MMD (MONAI, linear kernel) and KID, precision / recall / density / coverage
  (k = 5), all in the feature space of a classifier trained on real radiographs (``judge``,
  from the classify stage: no pretrained network can be downloaded here). The extractor's file
  hash is recorded: two runs compare only with the same extractor;
* diversity: mean MS-SSIM of random synthetic pairs against random real pairs;
* class fidelity: the extractor's AUROC on labelled synthetic images;
* memorisation: each synthetic image's nearest-neighbour pixel distance to the generator's
  training set against the test-to-train nearest-neighbour distances; the fraction closer than
  their 1st percentile, and a grid of the closest pairs;
* latent space: interpolation between the codes of two real images; with ``anomaly_checkpoint``
  (a model trained on normal images only) the AUROC of its anomaly score for pneumonia.

Every metric comes with a 95 % bootstrap interval and the N used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from networks.vaegan import VAEGAN
from pipeline.infra import checkpoint as ckpt
from pipeline.infra import model_store, quality, runtime, tracking
from pipeline.infra.config import flatten, to_dict
from pipeline.infra.engine import check_writable, pick_device
from pipeline.infra.judge import Judge, class_fidelity
from pipeline.infra.loaders import (
    LoadedGenerator,
    config_from_checkpoint,
    load_generator,
    load_images,
    load_items,
    sample_images,
)
from pipeline.infra.metrics import auroc, bootstrap, bootstrap_ci, mean_with_ci
from pipeline.infra.stage_configs import EvaluateConfig
from pipeline.infra.viz import pairs, plot_roc, pyplot, save_figure, save_grid
from pipeline.ingest.default import default_manifest
from transforms.io import file_sha256
from transforms.manifest import ManifestError, may_hold_burned_in, read_manifest, sidecar_path


def load_vaegan(path: str | Path, device: str | torch.device = "cpu"):
    """(model with encoder and decoder, train config) from a train checkpoint."""

    payload = ckpt.load_checkpoint(path)
    tcfg = config_from_checkpoint(payload)
    # the discriminator is not needed here; tcfg keeps the trained kind for the report
    # the averaged weights, when the run kept them, are loaded as the model's own
    model = VAEGAN(dataclasses.replace(tcfg.model, kind="vae", ema_decay=0.0))
    ckpt.load_module_state(model.encoder, ckpt.inference_state(payload, "encoder"), "encoder", path)
    ckpt.load_module_state(model.decoder, ckpt.inference_state(payload, "decoder"), "decoder", path)
    if payload.get("prior"):  # checkpoints from before the fitted prior have none: N(0, I)
        ckpt.load_module_state(model.prior, payload["prior"], "prior", path)
    return model.to(device).eval(), tcfg, payload


@dataclass
class Source:
    """What evaluate scores: the generator, the full VAE-GAN when a train checkpoint is given
    (interpolation needs its encoder), and what its training run used; or, with ``samples=``,
    images already made (:func:`load_samples`)."""

    loaded: Any  # pipeline.generate.LoadedGenerator, or None for samples
    model: Any  # VAEGAN with encoder, or None for an MLflow model (generator only) or samples
    kind: str
    train_manifest: str
    max_train: int
    items: list[dict] | None = None  # samples: {"image": path, "label": int (-1 = none)} per image
    samples_meta: dict[str, Any] = field(default_factory=dict)  # samples: path, sha256, file count
    burned_in: bool = False  # samples: a manifest that may hold burned-in identifying text

    @property
    def image_size(self) -> int:
        """The generator's image size; 0 for samples (they take the extractor's)."""
        return self.loaded.image_size if self.loaded is not None else 0

    @property
    def num_classes(self) -> int:
        """The generator's classes; for samples 2 when labelled 0/1 (class fidelity), else 0."""
        if self.loaded is not None:
            return self.loaded.num_classes
        return 2 if {it["label"] for it in self.items} == {0, 1} else 0

    @property
    def provenance(self) -> dict[str, Any]:
        """Where the synthetic images come from, as the report, metrics.json and MLflow record it."""
        if self.loaded is None:
            return dict(self.samples_meta)
        loaded = self.loaded
        return {
            "checkpoint": loaded.source,
            "checkpoint_sha256": loaded.sha256,
            "generator_run_id": loaded.run_id,
            "prior_fitted": loaded.generator.prior.is_fitted,
        }

    def images(
        self, real_y: np.ndarray, size: int, n: int, seed: int, batch_size: int, prior: str = "fitted"
    ) -> tuple[torch.Tensor, np.ndarray]:
        """The synthetic images to score, ``[N, 1, S, S]`` in ``[-1, 1]``, and their labels (-1:
        none). Samples are read and preprocessed exactly like the reference; a generator draws
        ``n`` (0 = as many as ``real_y``) with labels following the reference's class mix, so
        class-conditional models are compared fairly."""
        if self.items is not None:
            return load_items(self.items, size)

        n = n or len(real_y)
        y = real_y[np.arange(n) % len(real_y)] if self.num_classes else np.full(n, -1)
        return sample_images(self.loaded, y, seed, batch_size, prior), y


def load_source(checkpoint: str, device, tracking_uri: str) -> Source:
    """A train checkpoint, or a ``models:/``/``runs:/`` generator whose training run's params
    (found through the model's lineage) say which data it was trained on."""

    if not model_store.is_model_uri(checkpoint):
        model, tcfg, payload = load_vaegan(checkpoint, device)
        names = {int(k): v for k, v in payload.get("label_names", {}).items()}
        run_id = str(payload.get("mlflow_run_id") or "")
        loaded = LoadedGenerator(
            model.generator(names).eval(), names, checkpoint, file_sha256(checkpoint), run_id
        )
        return Source(loaded, model, tcfg.model.kind, tcfg.data.manifest, tcfg.data.max_train)
    loaded = load_generator(checkpoint, device, tracking_uri)
    params: dict[str, str] = {}
    if loaded.run_id:
        import mlflow

        with contextlib.suppress(Exception):  # lineage is best effort; reference= then decides
            params = (
                mlflow.tracking.MlflowClient(tracking_uri=tracking_uri).get_run(loaded.run_id).data.params
            )
    return Source(
        loaded,
        None,
        params.get("model.kind", "generator"),
        params.get("data.manifest", ""),
        int(params.get("data.max_train", "0") or 0),
    )


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def load_samples(samples: str | Path, n: int = 0, seed: int = 0) -> Source:
    """``samples=``: images any generator made. A manifest (every row, whatever its split; its
    labels kept, -1 = unlabelled) or a folder of PNG/JPEG files (those directly in it, in name
    order; unlabelled). ``n`` > 0 keeps a random subset of that many (seeded, in listed order).

    Lists and hashes the files (the report and MLflow record the source: a manifest's path and
    sha256, a folder's path and the sha256 of its file names and contents, and the file count);
    :meth:`Source.images` reads them."""

    path = Path(samples)
    meta: dict[str, Any] = {"samples": str(path)}
    if path.is_dir():
        files = sorted(
            p
            for p in path.iterdir()
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        )
        if not files:
            raise FileNotFoundError(
                f"samples folder {path} holds no PNG/JPEG images (subfolders are not searched)"
            )
        outside = [p for p in files if not p.resolve().is_relative_to(path.resolve())]
        if outside:  # a link out of the folder would score (and hash) any file of the machine
            raise ValueError(
                f"samples folder {path}: {len(outside)} file(s) link outside it ({outside[0].name} -> "
                f"{outside[0].resolve()}): copy the images into the folder instead"
            )
        items = [{"image": str(p), "label": -1} for p in files]
        listing = "".join(f"{p.name}\0{file_sha256(p)}\n" for p in files)
        meta["samples_sha256"] = hashlib.sha256(listing.encode()).hexdigest()
    elif path.is_file():
        df, _ = read_manifest(path)
        if df.empty:
            raise ManifestError(f"samples manifest {path} has no rows")
        items = [{"image": a, "label": int(y)} for a, y in zip(df["abs_path"], df["label"], strict=True)]
        meta["samples_sha256"] = file_sha256(path)
        with contextlib.suppress(OSError, ValueError, AttributeError):  # lineage of generate's manifests
            side = json.loads(sidecar_path(path).read_text())
            if side.get("source"):
                meta["samples_generator"] = str(side["source"])
                meta["samples_generator_sha256"] = str(side.get("source_sha256", ""))
    else:
        raise FileNotFoundError(
            f"samples {path} does not exist (a manifest CSV or a folder of PNG/JPEG images)"
        )
    meta["samples_files"] = len(items)
    labels = {it["label"] for it in items}
    if labels != {-1} and labels != {0, 1}:
        print(f"evaluate: samples labelled {sorted(labels)}: class fidelity needs labels 0 and 1, left out")
    if 0 < n < len(items):
        keep = np.sort(np.random.default_rng(seed).choice(len(items), n, replace=False))
        items = [items[i] for i in keep]
    burned = path.is_file() and may_hold_burned_in(path)
    return Source(None, None, "samples", "", 0, items=items, samples_meta=meta, burned_in=burned)


@torch.no_grad()
def anomaly_scores(
    model, x: torch.Tensor, device, kl_weight: float, bs: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Per image: reconstruction error (mean L1 of the posterior-mean reconstruction) and a
    negative-ELBO-like score (that error + kl_weight x per-pixel KL), from an unconditioned model."""
    if model.cfg.num_classes:
        raise ValueError(
            "the anomaly model must be unconditioned (model.num_classes=0): a label input would leak the answer"
        )
    rec_err, elbo = [], []
    npix = x[0].numel()
    for i in range(0, len(x), bs):
        xb = x[i : i + bs].to(device)
        mu, logvar = model.encoder(xb, None)
        recon = model.decoder(mu, None).float()
        e = (recon - xb).abs().flatten(1).mean(1)
        kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).sum(1) / npix
        rec_err.append(e.cpu())
        elbo.append((e + kl_weight * kl).cpu())
    return torch.cat(rec_err).numpy(), torch.cat(elbo).numpy()


@torch.no_grad()
def interpolate(
    model, a: torch.Tensor, b: torch.Tensor, label: int | None, steps: int, device
) -> torch.Tensor:
    """Decoded images along the straight line between the posterior means of ``a`` and ``b``."""
    cond = None if label is None else torch.tensor([label, label], device=device)
    mu, _ = model.encoder(torch.stack([a, b]).to(device), cond)
    t = torch.linspace(0, 1, steps, device=device)[:, None]
    z = (1 - t) * mu[0:1] + t * mu[1:2]
    lab = None if label is None else torch.full((steps,), label, device=device)
    return model.decoder(z, lab).float().cpu()


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Score a generator's (or any image folder's) samples against real images; returns the
    metrics, the provenance, the report's path and the MLflow run id."""
    from monai.utils import set_determinism

    device = pick_device(cfg.device)
    set_determinism(seed=cfg.seed)
    t0 = time.time()
    if cfg.samples:  # images any generator made, instead of sampling one
        src = load_samples(cfg.samples, cfg.n, cfg.seed)
    else:
        src = load_source(cfg.checkpoint, device, tracking.resolve_uri(cfg.tracking))
    ref_manifest = cfg.reference or src.train_manifest or str(default_manifest())
    # before any image is loaded: an extractor that has seen synthetic or reference images
    # would flatter the generator
    judge = Judge.load(cfg.judge, device, ref_manifest, cfg.allow_foreign_judge)
    # samples are preprocessed like the reference, at the size the extractor was trained at
    size = src.image_size or judge.image_size
    run_dir = Path(cfg.out_dir) / (cfg.tracking.run_name or f"{src.kind}-{time.strftime('%Y%m%d-%H%M%S')}")
    check_writable(run_dir)

    real_x, real_y = load_images(ref_manifest, cfg.reference_split, size)
    train_x, _ = load_images(src.train_manifest or ref_manifest, cfg.train_split, size, src.max_train)
    fake_x, syn_y = src.images(real_y, size, cfg.n, cfg.seed, cfg.batch_size, cfg.prior)
    print(
        f"evaluate: {len(fake_x)} synthetic vs {len(real_x)} real ({cfg.reference_split}) images, "
        f"{len(train_x)} train",
        flush=True,
    )
    images = {"real": real_x, "real_y": real_y, "train": train_x, "fake": fake_x, "fake_y": syn_y}
    res = _panel(cfg, judge, images, src.num_classes)
    audit = _memorisation(cfg, images, res)
    manifests = {str(ref_manifest), str(src.train_manifest or ref_manifest)}
    figs = _figures(cfg, src, images, audit, manifests, run_dir, device)
    if cfg.anomaly_checkpoint:
        figs["anomaly_roc"] = _anomaly(cfg, images, size, res, run_dir, device)
    meta = {
        **src.provenance,  # the checkpoint and its training run, or the samples' path, sha256 and count
        "model_kind": src.kind,
        "extractor": cfg.judge,
        "extractor_sha256": judge.sha256,
        "extractor_arch": judge.arch,
        "extractor_arm": judge.arm,
        "extractor_train_manifest": judge.train_manifest,
        "foreign_extractor": judge.foreign,  # "" unless allow_foreign_judge let a refused one through
        "reference": str(ref_manifest),
        "reference_split": cfg.reference_split,
    }
    report = _report(res, meta, figs, run_dir)
    (run_dir / "metrics.json").write_text(json.dumps({"metrics": res, "meta": meta}, indent=2))
    run_id = _log_run(cfg, src, res, meta, [*figs.values(), report, run_dir / "metrics.json"], run_dir)
    print(report.read_text())
    print(
        f"evaluate done in {time.time() - t0:.0f}s; report {report}\n"
        + (f"MLflow run id: {run_id}" if run_id else "MLflow: not reached; the run is kept in the outbox")
    )
    return {"metrics": res, "meta": meta, "report": str(report), "run_id": run_id}


def _put(res: dict[str, float], name: str, triple: tuple[float, float, float]) -> None:
    """A metric and its 95 % interval, as ``name``, ``name_lo``, ``name_hi``."""
    res[name], res[f"{name}_lo"], res[f"{name}_hi"] = triple


def _panel(cfg: EvaluateConfig, judge: Judge, images: dict[str, Any], num_classes: int) -> dict[str, float]:
    """FD, MMD, KID, precision/recall/density/coverage in the extractor's feature space, MS-SSIM
    diversity, and (two classes) class fidelity: the extractor's AUROC on the samples' labels."""
    real_x, fake_x = images["real"], images["fake"]
    real, fake = judge.score(real_x), judge.score(fake_x)
    B = cfg.bootstrap
    res: dict[str, float] = {"n_fake": len(fake_x), "n_real": len(real_x), "n_train": len(images["train"])}
    ft, rt = fake.features.double(), real.features.double()
    _put(res, "fd", bootstrap(quality.frechet_distance, ft, rt, n_boot=B, seed=cfg.seed, bias_correct=True))
    _put(res, "mmd", bootstrap(quality.mmd_linear, ft, rt, n_boot=B, seed=cfg.seed, bias_correct=True))
    _put(
        res,
        "kid",
        bootstrap(
            lambda a, b: quality.kid(a, b, subsets=5, seed=cfg.seed),
            ft,
            rt,
            n_boot=max(B // 4, 20),
            seed=cfg.seed,
            bias_correct=True,
        ),
    )
    for name, v in quality.prdc_indicators(real.features, fake.features, cfg.k).items():
        _put(res, name, mean_with_ci(v, n_boot=1000, seed=cfg.seed))
    _put(res, "ms_ssim_synthetic", mean_with_ci(quality.ms_ssim_pairs(fake_x, 500, cfg.seed), seed=cfg.seed))
    _put(res, "ms_ssim_real", mean_with_ci(quality.ms_ssim_pairs(real_x, 500, cfg.seed), seed=cfg.seed))
    if num_classes == 2:
        cf = class_fidelity(judge, fake, images["fake_y"], seed=cfg.seed)
        _put(res, "class_fidelity_auroc", (cf["auroc"], cf["auroc_lo"], cf["auroc_hi"]))
        res["real_auroc_extractor"] = auroc(images["real_y"], real.probs)
    return res


def _memorisation(cfg: EvaluateConfig, images: dict[str, Any], res: dict[str, float]) -> dict[str, Any]:
    """Memorisation audit in pixel space (a near-copy is close in every space); adds its figures
    to ``res`` and returns the audit (distances, nearest training image, threshold)."""
    audit = quality.memorisation_audit(
        images["fake"], images["train"], images["real"], cfg.near_copy_percentile
    )
    res["near_copy_threshold"] = audit["threshold"]
    _put(res, "memorisation_fraction", mean_with_ci(audit["near_copy"].astype(float), seed=cfg.seed))
    res["nn_distance_synthetic_median"] = float(np.median(audit["distance"]))
    res["nn_distance_test_median"] = float(np.median(audit["test_distance"]))
    return audit


def _figures(
    cfg: EvaluateConfig,
    src: Source,
    images: dict[str, Any],
    audit: dict[str, Any],
    manifests: set[str],
    run_dir: Path,
    device: torch.device,
) -> dict[str, Path]:
    """Sample grid, distance histogram, closest pairs and latent interpolation, each only where no
    image shown may hold burned-in identifying text."""
    fake_x, train_x, real_x, real_y = images["fake"], images["train"], images["real"], images["real_y"]
    up = max(1, 128 // fake_x.shape[-1])
    figs = {}  # no picture of samples= a manifest whose images may show burned-in identifying text
    if not src.burned_in:
        figs["samples"] = save_grid(fake_x[:64], run_dir / "samples.png", nrow=8, upscale=up)
    d_fake = audit["distance"]
    figs["nn_distances"] = _hist(
        d_fake, audit["test_distance"], audit["threshold"], run_dir / "nn_distances.png"
    )
    # pictures of real images only when no manifest may hold burned-in identifying text
    if src.burned_in or any(may_hold_burned_in(m) for m in manifests):
        print("evaluate: a manifest may hold burned-in annotations; no real-image figures are made")
        return figs
    order = np.argsort(d_fake)[:16]
    figs["closest_pairs"] = save_grid(
        pairs(fake_x[order], train_x[audit["nearest"][order]]),
        run_dir / "closest_pairs.png",
        nrow=8,
        upscale=up,
    )
    if src.model is not None:
        # latent interpolation between two real images of each class (needs the encoder)
        rows = []
        for lab in sorted(set(real_y.tolist())) if src.num_classes else [None]:
            idx = np.flatnonzero(real_y == lab) if lab is not None else np.arange(len(real_y))
            rows.append(interpolate(src.model, real_x[idx[0]], real_x[idx[-1]], lab, 10, device))
        figs["interpolation"] = save_grid(torch.cat(rows), run_dir / "interpolation.png", nrow=10, upscale=up)
    return figs


def _anomaly(
    cfg: EvaluateConfig, images: dict[str, Any], size: int, res: dict[str, float], run_dir: Path, device
) -> Path:
    """AUROC of a VAE trained on normal images only, scoring the reference images as anomalies by
    reconstruction error and by negative ELBO; returns the ROC plot."""
    amodel, acfg, _ = load_vaegan(cfg.anomaly_checkpoint, device)
    if acfg.model.image_size != size:
        raise ValueError(f"anomaly model is {acfg.model.image_size}px, evaluated images are {size}px")
    rec, elbo = anomaly_scores(amodel, images["real"], device, acfg.loss.kl_weight)
    target = (images["real_y"] != cfg.normal_label).astype(int)
    a = bootstrap_ci(target, rec, float(np.median(rec)), n_boot=1000, seed=cfg.seed)
    _put(res, "anomaly_auroc", (a["auroc"], a["auroc_lo"], a["auroc_hi"]))
    e = bootstrap_ci(target, elbo, float(np.median(elbo)), n_boot=1000, seed=cfg.seed)
    _put(res, "anomaly_auroc_elbo", (e["auroc"], e["auroc_lo"], e["auroc_hi"]))
    return plot_roc(
        {"reconstruction error": (target, rec), "neg. ELBO": (target, elbo)},
        run_dir / "anomaly_roc.png",
        title="pneumonia vs normal, model trained on normal only",
    )


def _log_run(
    cfg: EvaluateConfig,
    src: Source,
    res: dict[str, float],
    meta: dict[str, Any],
    files: list[Path],
    run_dir: Path,
) -> str | None:
    """Through the outage-tolerant Tracker: with the server down the report is still written and
    the run waits in run_dir/tracking_outbox for `pipeline.run sync`. Returns the run id."""
    tags = runtime.run_tags(
        "evaluate",
        cfg.tracking,
        tracking.git_commit(),
        **{"model.kind": src.kind},
        # lineage: the generator's training run and checkpoint hash, or the samples' source
        **{k: str(v) for k, v in src.provenance.items() if k != "checkpoint"},
        extractor_sha256=meta["extractor_sha256"],
    )
    if meta["foreign_extractor"]:
        tags["foreign_extractor"] = meta["foreign_extractor"][:4000]
    with runtime.tracked_run(cfg.tracking, run_dir, tags) as tr:
        tr.log_params(flatten(to_dict(cfg)))
        tr.log_metrics({k: float(v) for k, v in res.items() if np.isfinite(v)}, step=0)
        for p in files:
            tr.log_artifact(p, "report")
    return tr.run_id


def _hist(d_fake: np.ndarray, d_test: np.ndarray, thr: float, path: Path) -> Path:

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(5, 3.2))
    bins = np.linspace(0, max(d_fake.max(), d_test.max()), 50)
    ax.hist(d_test, bins, alpha=0.6, density=True, label="real test -> train")
    ax.hist(d_fake, bins, alpha=0.6, density=True, label="synthetic -> train")
    ax.axvline(thr, color="k", ls="--", lw=1, label="near-copy threshold")
    ax.set_xlabel("nearest-neighbour distance to the training set (pixels, L2)")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


# the report's metric table: (metric, label), each row present when the metric was measured
REPORT_ROWS = (
    ("fd", "Fréchet distance (classifier features)"),
    ("mmd", "MMD, linear kernel (MONAI)"),
    ("kid", "KID, cubic kernel"),
    ("precision", "precision (k=5)"),
    ("recall", "recall (k=5)"),
    ("density", "density (k=5)"),
    ("coverage", "coverage (k=5)"),
    ("ms_ssim_synthetic", "MS-SSIM synthetic pairs (lower = more diverse)"),
    ("ms_ssim_real", "MS-SSIM real pairs"),
    ("class_fidelity_auroc", "class fidelity (classifier AUROC on synthetic)"),
    ("memorisation_fraction", "memorisation: fraction below the 1st pct of test->train NN distance"),
    ("anomaly_auroc", "anomaly AUROC (reconstruction error)"),
    ("anomaly_auroc_elbo", "anomaly AUROC (neg. ELBO)"),
)


def _report(res: dict[str, float], meta: dict[str, Any], figs: dict[str, Path], run_dir: Path) -> Path:
    """Write ``run_dir/report.md``: the metric table, then every figure in ``figs`` embedded as a
    Markdown image linked relative to the report (``![samples](samples.png)``).

    evaluate logs the report and each figure by file name into one MLflow artifact folder
    (``log_artifact(p, "report")``), so a link is the bare file name, which resolves both beside
    the report on disk and in that folder. A figure written elsewhere (or under a name another
    figure already has) is copied beside the report and ``figs`` updated to the copy, so that the
    copy is what gets logged. Names are percent-encoded, so a space or parenthesis stays one link.
    """

    def row(name: str, label: str) -> str:
        if name not in res:
            return ""
        return f"| {label} | {res[name]:.4f} | [{res.get(name + '_lo', float('nan')):.4f}, {res.get(name + '_hi', float('nan')):.4f}] |\n"

    lines = _report_header(res, meta)
    lines += [
        "| metric | value | 95% CI |\n|---|---|---|\n",
        *(row(n, label) for n, label in REPORT_ROWS),
        "\n",
    ]
    lines += _embed_figures(figs, run_dir)
    path = run_dir / "report.md"
    path.write_text("".join(lines))
    return path


def _report_header(res: dict[str, float], meta: dict[str, Any]) -> list[str]:
    """The report's title and what was scored against what, with which extractor."""
    source = meta.get("checkpoint") or meta.get("samples", "")
    return [
        f"# Synthesis quality: {meta['model_kind']} ({Path(source).name})\n\n",
        (
            f"Samples: `{source}` ({meta.get('samples_files', '?')} files, sha256 "
            f"`{str(meta.get('samples_sha256', ''))[:16]}`"
            + (
                f"; written by generator `{meta['samples_generator']}`"
                if meta.get("samples_generator")
                else ""
            )
            + "): scored as given (no generator sampled), preprocessed like the reference.\n\n"
            if "samples" in meta
            else ""
        ),
        f"Extractor: {meta['extractor_arch']} `{meta['extractor']}` sha256 `{meta['extractor_sha256'][:16]}`; "
        f"reference {meta['reference']} split {meta['reference_split']}; N synthetic {int(res['n_fake'])}, "
        f"N real {int(res['n_real'])}, N train {int(res['n_train'])}.\n\n",
        f"Extractor trained with arm={meta['extractor_arm']} on {meta['extractor_train_manifest']}.\n\n",
        (
            f"**WARNING: foreign judge, used with allow_foreign_judge=true.** {meta['foreign_extractor']}. "
            "Its features and class fidelity may flatter the generator: these results do not compare with "
            "runs that used a real-only extractor trained on the reference manifest.\n\n"
            if meta["foreign_extractor"]
            else ""
        ),
    ]


FIGURE_CAPTIONS = {
    "samples": "Synthetic samples (one class per column)",
    "nn_distances": "Nearest-neighbour distance to the training set: synthetic vs real test images",
    "closest_pairs": "Closest pairs: each synthetic image beside its nearest training image",
    "interpolation": "Latent interpolation between two real images of each class",
    "anomaly_roc": "Anomaly detection ROC",
}


def _embed_figures(figs: dict[str, Path], run_dir: Path) -> list[str]:
    """The report's Markdown for ``figs``, each linked by a bare file name beside the report
    (copied there, under a free name, when it lives elsewhere or another figure has its name;
    ``figs`` then points at the copy)."""
    import shutil
    from urllib.parse import quote

    run_dir.mkdir(parents=True, exist_ok=True)
    here = run_dir.resolve()
    taken: dict[str, Path] = {}  # file name beside the report -> the figure it shows
    lines = ["## Figures\n\n"] if figs else []
    for k, p in list(figs.items()):
        p = Path(p)
        caption = FIGURE_CAPTIONS.get(k, k)
        if not p.is_file():
            lines.append(f"{caption}: not written ({p.name}).\n\n")
            continue
        name = p.name
        if p.resolve().parent != here or name in taken or name == "report.md":
            # not beside the report, or under another figure's name: copied beside it, a free name
            base = Path(f"{k}-{name}" if name in taken or name == "report.md" else name)
            name, n = base.name, 1
            while name in taken or name == "report.md" or (run_dir / name).exists():
                n += 1
                name = f"{base.stem}-{n}{base.suffix}"
            shutil.copyfile(p, run_dir / name)
            figs[k] = run_dir / name
        taken[name] = figs[k]
        alt = k.replace("\\", "\\\\").replace("[", "\\[").replace("]", "\\]")
        lines.append(f"**{caption}**\n\n![{alt}]({quote(name)})\n\n")
    return lines
