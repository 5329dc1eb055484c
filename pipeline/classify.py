"""``python -m pipeline.run classify [CONFIG.yaml] [key=value ...]``: one arm of the augmentation study.

Arms (``arm=``):

* ``real``: the real training split, no augmentation;
* ``classical``: the real split with the classical augmentation of ``train_transforms``;
* ``synthetic``: the real split plus ``ratio x`` as many synthetic images of the real labels;
* ``classical+synthetic``: both;
* ``synthetic_only``: as many synthetic images as real ones, with the real labels, and no real image;
* ``synthetic_pretrain``: the first half of the epochs on synthetic images only (as many as the real
  ones, with their labels), the second half on the real split (RoentGen-v2's pre-train then
  fine-tune); the model is picked among the real epochs;
* ``synthetic_filtered``: as ``synthetic``, keeping only synthetic images that ``judge``
  (a real-only arm's checkpoint) classifies as their intended label at its validation threshold;
* ``balanced_synthetic``: the real split plus synthetic images of its minority class only, as many
  as bring it to the majority's count (Kermany's train split: normal is the minority, ~1:3);
* ``real_dup``: the count-matched control of ``synthetic``: the real split plus ``ratio x`` as many
  extra draws of real images (the same labels the synthetic arm adds) with classical augmentation.

The model is picked on the validation split (best AUROC over epochs) and the operating threshold
is set on it (Youden's J); the held-out test split (Kermany's official one) is touched once, at
the end: AUROC, balanced accuracy, sensitivity, specificity with 95 % bootstrap CIs, an ROC plot,
the per-image scores, all logged to MLflow. The epoch loop is the VAE-GAN's (``pipeline.infra.engine``).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from networks.classifier import CXRClassifier
from pipeline.infra import checkpoint as ckpt
from pipeline.infra import distributed, engine, runtime, tracking
from pipeline.infra.arm_parts import ClassifyParts
from pipeline.infra.arms import ARM_REGISTRY
from pipeline.infra.config import flatten, to_dict
from pipeline.infra.data import (
    Manifest,
    batches_per_epoch,
    build_dataset,
    device_augment,
    make_loader,
    make_train_loader,
)
from pipeline.infra.judge import Judge
from pipeline.infra.metrics import auroc, bootstrap_ci, youden_threshold
from pipeline.infra.stage_configs import ClassifyConfig
from pipeline.infra.viz import plot_curves, plot_roc
from pipeline.ingest.default import resolve_manifest
from transforms.io import file_sha256
from transforms.manifest import atomic_write_text
from transforms.synthetic import FilteredSource


@torch.no_grad()
def predict(model: CXRClassifier, loader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """(labels, P(positive)) over a loader."""
    model.eval()
    ys, ps = [], []
    for batch in loader:
        x = batch["image"].to(device)
        ps.append(torch.sigmoid(model(x).float()).cpu())
        ys.append(torch.as_tensor(batch["label"]))
    return torch.cat(ys).numpy().astype(int), torch.cat(ps).numpy()


def validate_classifier(model: CXRClassifier, loader, device: torch.device) -> dict[str, float]:
    """Validation AUROC and BCE loss."""

    y, p = predict(model, loader, device)
    pt = torch.from_numpy(p).clamp(1e-6, 1 - 1e-6)
    loss = float(F.binary_cross_entropy(pt, torch.from_numpy(y).float()))
    return {"auroc": auroc(y, p), "loss": loss}


def training_provenance(arm: str, manifest: str | Path, source: str | Path) -> dict[str, Any]:
    """What a classifier checkpoint records about its training data: ``arm`` and
    ``train_manifest`` (``path`` and ``sha256`` of the manifest trained on; ``source_path`` and
    ``source_sha256`` of the manifest a ``fraction`` < 1 subset was drawn from, else the same)."""

    digest = file_sha256(manifest)
    src_digest = digest if Path(source) == Path(manifest) else file_sha256(source)
    return {
        "arm": arm,
        "train_manifest": {
            "path": str(Path(manifest).resolve()),
            "sha256": digest,
            "source_path": str(Path(source).resolve()),
            "source_sha256": src_digest,
        },
    }


def _label_judge(cfg: ClassifyConfig, device: torch.device):
    """``accept(image, label)``: does the filter classifier (a real-only arm, at this image size)
    call ``image`` ``label`` at its own validation-chosen threshold?"""
    judge = Judge.load(cfg.judge, device)  # it must never have seen synthetic images
    if judge.image_size != cfg.data.image_size:
        raise ValueError(
            f"judge {cfg.judge} was trained at {judge.image_size} px, this run is "
            f"{cfg.data.image_size} px: use a classifier trained at this size"
        )
    threshold = judge.threshold

    def accept(image: np.ndarray, label: int) -> bool:
        p = float(judge.probs(torch.as_tensor(image, dtype=torch.float32)[None])[0])
        return (p >= threshold) == (int(label) == 1)

    return accept


def _train_dataset(cfg: ClassifyConfig, items: list[dict], device: torch.device, batched: bool):
    """The arm's training set; returns (dataset, (real dataset, synthetic augmentation or None)).
    ``batched``: the classical augmentation runs on whole batches on the device, not in the loader."""
    parts = ClassifyParts(cfg, items, device, accept=lambda: _label_judge(cfg, device), batched=batched)
    return ARM_REGISTRY[cfg.arm].training_set(parts)


@dataclass(kw_only=True)
class ClassifyRun(runtime.StageRun):
    """A classifier run: the stage's common state (:class:`pipeline.infra.runtime.StageRun`) and
    what classify adds (see :func:`classify`)."""

    cfg: ClassifyConfig
    items: dict[str, list[dict]]  # train / val / test records
    net: CXRClassifier  # the network; ``model`` is it, or its DDP wrapper
    best: dict[str, Any] = field(default_factory=lambda: {"auroc": -1.0, "state": None, "epoch": 0})


def classify(cfg: ClassifyConfig) -> dict[str, Any]:
    """Train one arm, pick the epoch on val, test once; returns metrics, paths and the run id."""
    from monai.utils import set_determinism

    source_manifest = resolve_manifest(cfg.data)  # the manifest a fraction < 1 subset is drawn from
    # under torchrun: N replicas split every batch (DistributedSampler) and DDP averages the
    # gradients; each replica evaluates the whole val/test split (identical weights, identical
    # decisions); rank 0 alone logs and writes files
    with runtime.replicas(cfg.data.batch_size) as dinfo:
        device = runtime.stage_device(cfg.device, cfg.threads, dinfo, cfg.speed.on("cache_allocations"))
        set_determinism(seed=cfg.seed)
        stamp = distributed.agree(time.strftime("%Y%m%d-%H%M%S"), dinfo)
        run_dir = Path(cfg.out_dir) / (
            cfg.tracking.run_name or f"{cfg.arm}-f{cfg.fraction:g}-s{cfg.seed}-{stamp}"
        )
        # one process per run folder; a fresh run never mixes an earlier run's files (moved aside)
        with runtime.run_folder(run_dir, dinfo) as old_run_id:
            run = _build_run(cfg, dinfo, run_dir, device, source_manifest)
            t0 = time.time()
            run.code_version = tracking.git_commit()
            # rank 0 alone logs; an unreachable tracking server does not stop the run (see Tracker)
            with runtime.tracked_run(
                cfg.tracking, run_dir, _tags(run), enabled=dinfo.is_main, old_run_id=old_run_id
            ) as run.tracker:
                run.tracker.log_params(flatten(to_dict(cfg)))
                n_real, n_total = len(run.items["train"]), len(run.data["train_ds"])
                run.tracker.log_params(
                    {"n_train_real": n_real, "n_train_total": n_total, "replicas": dinfo.world}
                )
                engine.log_skipped(run.tracker, run.data["skipped"])
                _fit(run)
                if not dinfo.is_main:  # training is over: rank 0 alone tests, writes and logs
                    return {"run_id": None, "run_dir": str(run_dir), "metrics": {}}
                result = _test_and_save(run, source_manifest)
            result["run_id"] = run.tracker.run_id
            _print_result(run, result, t0)
            # written last: its presence marks the arm as done (the gain stage skips it on a re-run)
            atomic_write_text(run_dir / "result.json", json.dumps(result, indent=2))
            return result


def _print_result(run: ClassifyRun, result: dict[str, Any], t0: float) -> None:
    cfg, test = run.cfg, result["metrics"]
    print(
        f"{cfg.arm} fraction={cfg.fraction:g} seed={cfg.seed}: test AUROC {test['test/auroc']:.4f} "
        f"[{test['test/auroc_lo']:.4f}, {test['test/auroc_hi']:.4f}] balanced acc "
        f"{test['test/balanced_accuracy']:.4f} sens {test['test/sensitivity']:.4f} spec "
        f"{test['test/specificity']:.4f} (threshold {test['threshold']:.3f} from val, best epoch "
        f"{run.best['epoch']}) in {time.time() - t0:.0f}s",
        flush=True,
    )
    print(f"MLflow run id: {result['run_id']}\nROC plot: {result['roc']}")


def _build_run(
    cfg: ClassifyConfig, dinfo: distributed.DistInfo, run_dir: Path, device: torch.device, manifest: Path
) -> ClassifyRun:
    """The (subset) manifest, data and network of a run, in the order a seeded run depends on."""
    manifest, names, items = _items(cfg, dinfo, run_dir, manifest)
    data = _data(cfg, items, device, dinfo)
    print(
        f"classify arm={cfg.arm} fraction={cfg.fraction:g} seed={cfg.seed}: train={len(items['train'])} "
        f"(+{len(data['train_ds']) - len(items['train'])} synthetic) val={len(items['val'])} "
        f"test={len(items['test'])} classes={names} device={device}",
        flush=True,
    )
    net = runtime.sync_batchnorm(CXRClassifier(cfg.model), dinfo, device).to(device)
    if cfg.speed.on("channels_last"):
        net = net.to(memory_format=torch.channels_last)
    model: torch.nn.Module = net
    if dinfo.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None
        )
    return ClassifyRun(
        cfg=cfg,
        dinfo=dinfo,
        run_dir=run_dir,
        device=device,
        amp=engine.amp_dtype(cfg.amp, device),
        manifest=manifest,
        names=names,
        items=items,
        data=data,
        net=net,
        model=model,
    )


def _items(
    cfg: ClassifyConfig, dinfo: distributed.DistInfo, run_dir: Path, manifest: Path
) -> tuple[Path, dict[int, str], dict[str, list[dict]]]:
    """(the manifest trained on, label names, the records of every split), the manifest read once:
    a ``fraction`` < 1 subset is drawn from its rows (and written to the run folder)."""
    rows = Manifest(manifest)
    if cfg.fraction < 1:
        rows = rows.subset(cfg.fraction, cfg.seed, run_dir / "subset.csv" if dinfo.is_main else None)
        distributed.barrier(dinfo)
        manifest = run_dir / "subset.csv"
    names = rows.label_names()
    if len(names) != 2 or cfg.model.num_classes != 2:
        raise ValueError(
            f"classify is binary: {manifest} has classes {names}, model.num_classes={cfg.model.num_classes}"
        )
    items = {
        "train": rows.records(cfg.data.train_split, cfg.data.max_train),
        "val": rows.records(cfg.data.val_split, cfg.data.max_val),
        "test": rows.records(cfg.test_split),
        # keyed apart from "test": an extra split may be called "test" when test_split is another
        **{f"extra/{split}": rows.records(split) for split in cfg.extra_test_splits},
    }
    return manifest, names, items


def _data(
    cfg: ClassifyConfig, items: dict[str, list[dict]], device: torch.device, dinfo: distributed.DistInfo
) -> dict[str, Any]:
    """The arm's training set and loaders, validation and test loaders (a test set is whole)."""
    batch_aug = device_augment(cfg.data, device)  # None: the loader augments each image
    train_ds, (real_ds, syn_tf) = _train_dataset(cfg, items["train"], device, batch_aug is not None)
    val_ds = build_dataset(items["val"], cfg.data, train=False)
    tests = {
        split: make_loader(build_dataset(items[k], cfg.data, train=False), cfg.data, shuffle=False)
        for split, k in ((cfg.test_split, "test"), *((x, f"extra/{x}") for x in cfg.extra_test_splits))
    }
    for split, loader in tests.items():  # a test set is scored whole or not at all
        if getattr(loader.dataset, "skipped", None):
            bad = "; ".join(f for f, _ in loader.dataset.skipped[:5])
            raise ValueError(
                f"{len(loader.dataset.skipped)} image(s) of the test split {split!r} cannot be read any more "
                f"({bad}): a test set scored without them would not pair with runs scored with them; "
                "restore the files (or re-run the ingest stage and start the study anew)"
            )
    train_loader, sampler, gen = make_train_loader(train_ds, cfg.data, cfg.seed, dinfo)
    # synthetic_pretrain's second half: the real images alone
    finetune = (
        make_train_loader(real_ds, cfg.data, cfg.seed, dinfo) if ARM_REGISTRY[cfg.arm].pretrain else None
    )
    data = {
        "train_ds": train_ds,
        "real_ds": real_ds,
        "syn_tf": syn_tf,
        "train_loader": train_loader,
        "sampler": sampler,
        "gen": gen,
        "finetune": finetune,  # (loader, sampler, generator) or None
        "val_loader": make_loader(val_ds, cfg.data, shuffle=False),
        "test_loaders": tests,  # split -> loader: test_split first, then extra_test_splits
        # images that could not be read any more (skipped, reported: data.build_dataset)
        "skipped": [
            x
            for ds in (real_ds, val_ds, *(ld.dataset for ld in tests.values()))
            for x in getattr(ds, "skipped", [])
        ],
        # classical arms with data.augment_on=device: the whole batch is augmented in the step
        "batch_aug": batch_aug if ARM_REGISTRY[cfg.arm].classical else None,
    }
    return data


def _tags(run: ClassifyRun) -> dict[str, str]:
    cfg = run.cfg
    return runtime.run_tags(
        "classify",
        cfg.tracking,
        run.code_version,
        arm=cfg.arm,
        fraction=f"{cfg.fraction:g}",
        seed=str(cfg.seed),
        **{"data.manifest": str(run.manifest)},
    )


def make_step_fn(run: ClassifyRun, opt: torch.optim.Optimizer, sched) -> Any:
    """One optimiser step of the class-weighted BCE loss: ``step_fn(batch) -> {"loss": tensor}``."""
    cfg, device, model = run.cfg, run.device, run.model
    n_pos = sum(int(it["label"]) == 1 for it in run.items["train"])
    # class balance by loss weight: Kermany's train split is ~3:1 pneumonia:normal
    pos_weight = torch.tensor((len(run.items["train"]) - n_pos) / max(n_pos, 1), device=device)

    batch_aug = run.data["batch_aug"]
    channels_last = cfg.speed.on("channels_last")

    def step_fn(batch: dict) -> dict[str, torch.Tensor]:
        x = batch["image"].to(device, non_blocking=True)
        if batch_aug is not None:
            x = batch_aug(x)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = batch["label"].to(device).float()
        amp = run.amp
        ctx = (
            torch.autocast(device.type, dtype=amp)
            if amp is not None
            else torch.autocast("cpu", enabled=False)
        )
        with ctx:
            logits = model(x).float()
        loss = F.binary_cross_entropy_with_logits(logits, y, pos_weight=pos_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        sched.step()
        return {"loss": loss.detach()}

    return step_fn


def _fit(run: ClassifyRun) -> None:
    """The epochs; keeps the weights of the epoch with the best validation AUROC in ``run.best``."""
    cfg, d, tracker = run.cfg, run.data, run.tracker
    opt = torch.optim.AdamW(run.model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    per_epoch = len(d["train_loader"])
    if cfg.step_budget == "real":  # the real arm's steps, whatever images this arm adds
        per_epoch = min(per_epoch, batches_per_epoch(len(run.items["train"]), cfg.data, run.dinfo))
    total_steps = cfg.epochs * per_epoch
    tracker.log_params({"optimizer_steps": total_steps, "steps_per_epoch": per_epoch})
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.optim.lr, total_steps=max(total_steps, 1), pct_start=0.2
    )
    step_fn = make_step_fn(run, opt, sched)
    # synthetic_pretrain: the first half of the epochs on synthetic images only, then the real ones
    # (one learning-rate schedule over both); the model is picked among the real epochs only
    pretrain = cfg.epochs // 2 if d["finetune"] is not None else 0
    for epoch in range(cfg.epochs):
        on_real = d["finetune"] is not None and epoch >= pretrain
        loader, sampler, gen = d["finetune"] if on_real else (d["train_loader"], d["sampler"], d["gen"])
        engine.seed_epoch(cfg.seed, epoch, gen, d["real_ds"])
        sampler.set_epoch(epoch)
        if d["train_ds"] is not d["real_ds"]:
            d["train_ds"].set_epoch(epoch)  # fresh synthetic draws each epoch, reproducibly
        if d["syn_tf"] is not None:
            d["syn_tf"].set_random_state(seed=cfg.seed * 1000 + epoch + 7)
        run.model.train()
        plan = engine.EpochPlan(
            desc=f"{cfg.arm} epoch {epoch + 1}/{cfg.epochs}",
            log_every=cfg.tracking.log_every,
            log_fn=lambda m, s: tracker.log_metrics(m, step=s),
            max_batches=per_epoch,
        )
        tr, run.step = engine.run_epoch(loader, step_fn, run.step, plan)
        val = {f"val/{k}": v for k, v in validate_classifier(run.net, d["val_loader"], run.device).items()}
        val["epoch"] = epoch + 1
        tracker.log_metrics(val, step=run.step)
        if epoch >= pretrain and val["val/auroc"] > run.best["auroc"]:
            run.best = {
                "auroc": val["val/auroc"],
                "state": copy.deepcopy(run.net.state_dict()),
                "epoch": epoch + 1,
            }
        print(
            ("" if run.dinfo.is_main else f"[rank {run.dinfo.rank}] ")
            + f"{cfg.arm} epoch {epoch + 1}/{cfg.epochs} train/loss={tr.get('loss', float('nan')):.4f} "
            f"val/auroc={val['val/auroc']:.4f} val/loss={val['val/loss']:.4f}",
            flush=True,
        )
    source = getattr(d["train_ds"], "source", None)
    if isinstance(source, FilteredSource):  # how many drawn images the filter classifier confirmed
        rate, forced = source.accept_rate(), source.stats["forced"]
        tracker.log_metrics({"filter/accept_rate": rate, "filter/forced": float(forced)}, step=run.step)
        print(
            f"synthetic_filtered: {rate:.1%} of drawn images kept, {forced} kept after 20 rejections",
            flush=True,
        )


def _save_classifier(run: ClassifyRun, threshold: float, source_manifest: Path) -> Path:
    """The best epoch's weights with the config, label names, validation threshold, code version,
    MLflow run and training provenance (``classifier.pt``)."""
    cfg, run_dir, tracker = run.cfg, run.run_dir, run.tracker
    return ckpt.save_checkpoint(
        run_dir / "classifier.pt",
        {
            "model": run.net.state_dict(),
            "config": to_dict(cfg),
            "label_names": {int(k): v for k, v in run.names.items()},
            "threshold": threshold,
            "epoch": run.best["epoch"],
            "code_version": run.code_version,
            "mlflow_run_id": tracker.run_id,  # None while the server has not been reached
            # provenance, checked by pipeline.evaluate before it uses this model as a feature
            # extractor: which images it has seen (an arm with synthetic images has seen a
            # generator's output) and the manifest it was trained on, by path and content
            **training_provenance(cfg.arm, run.manifest, source_manifest),
        },
    )


def _test_and_save(run: ClassifyRun, source_manifest: Path) -> dict[str, Any]:
    """The best epoch's weights on the test split, once, at the validation-chosen threshold; the
    per-image scores (the gain stage pairs arms on them), ROC plot, curves and checkpoint."""
    import pandas as pd

    cfg, d, tracker, run_dir = run.cfg, run.data, run.tracker, run.run_dir
    run.net.load_state_dict(run.best["state"])
    yv, pv = predict(run.net, d["val_loader"], run.device)
    threshold = youden_threshold(yv, pv)
    results: dict[str, Any] = {}
    scored: dict[str, tuple[np.ndarray, np.ndarray, Path]] = {}
    for i, (split, loader) in enumerate(d["test_loaders"].items()):
        y, p = predict(run.net, loader, run.device)
        # test_split's metrics and records keep their names (test/...), extra splits go under theirs
        name = "test" if i == 0 else split
        test = bootstrap_ci(y, p, threshold, n_boot=cfg.bootstrap, seed=cfg.seed)
        results.update({f"{name}/{k}": v for k, v in test.items()})
        path = run_dir / ("test_scores.csv" if i == 0 else f"scores_{split}.csv")
        paths = [it["image"] for it in run.items["test" if i == 0 else f"extra/{split}"]]
        pd.DataFrame({"path": paths, "label": y, "score": p}).to_csv(path, index=False)
        scored[split] = (y, p, path)
    results.update(
        {
            "best_epoch": run.best["epoch"],
            "threshold": threshold,
            "val/best_auroc": run.best["auroc"],
            "optimizer_steps": run.step,  # what the arm trained, for tables that compare arms
        }
    )
    tracker.log_metrics(results, step=run.step)
    yt, pt, scores_path = scored[cfg.test_split]
    curves_roc = {f"{cfg.arm} ({split})": (y, p) for split, (y, p, _) in scored.items()}
    roc = plot_roc({**curves_roc, "val": (yv, pv)}, run_dir / "roc.png", title=run_dir.name)
    hist = {k: v for k, v in tracker.history().items() if k in ("train/loss", "val/auroc", "val/loss")}
    curves = plot_curves(hist, run_dir / "curves.png", title=run_dir.name)
    ck = _save_classifier(run, threshold, source_manifest)
    for p in (*(v[2] for v in scored.values()), roc, curves):
        tracker.log_artifact(p, "eval")
    tracker.log_artifact(ck, "checkpoints")
    return {
        "run_id": tracker.run_id,
        "run_dir": str(run_dir),
        "metrics": results,
        "checkpoint": str(ck),
        "scores": str(scores_path),
        "extra_scores": {split: str(v[2]) for split, v in scored.items() if split != cfg.test_split},
        "roc": str(roc),
    }
