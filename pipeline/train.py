"""``python -m pipeline.run train [CONFIG.yaml] [key=value ...]``: train the VAE-GAN (or the plain VAE).

The model owns its math (:meth:`networks.vaegan.VAEGAN.objective`, :mod:`networks.objective`:
Larsen et al.'s losses and gradient routing); this stage builds the data, the model and the
optimisers, runs the epochs (checkpoints, divergence guard, grids, the fitted prior) and tracks
the run in MLflow.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from networks import losses as L
from networks.objective import GROUP_LOSSES, route_gradients
from networks.vaegan import VAEGAN
from pipeline import checkpoint as ckpt
from pipeline import distributed, engine, speed, tracking
from pipeline.config import flatten, to_dict
from pipeline.data import (
    build_dataset,
    device_augment,
    make_loader,
    make_train_loader,
    records,
    resolve_manifest,
)
from pipeline.stage_configs import (  # noqa: F401 - also re-exported; the configs live in pipeline.stage_configs
    MEASURES,
    DataConfig,
    GuardConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    TrackingConfig,
    TrainConfig,
)
from pipeline.tracking import git_commit
from pipeline.viz import pairs, plot_curves, save_grid
from transforms.manifest import label_names, may_hold_burned_in, read_manifest


# ----------------------------------------------------------------------------------------- helpers
class Groups:
    """The parameter groups and their optimisers, in the order encoder, decoder, discriminator."""

    def __init__(self, model: VAEGAN, ocfg: OptimConfig) -> None:
        betas = (ocfg.beta1, ocfg.beta2)
        self.modules: dict[str, torch.nn.Module] = {"encoder": model.encoder, "decoder": model.decoder}
        if model.discriminator is not None:
            self.modules["discriminator"] = model.discriminator
        self.params = {k: [p for p in m.parameters() if p.requires_grad] for k, m in self.modules.items()}
        self.opts = {
            k: torch.optim.Adam(
                self.params[k], lr=ocfg.lr_disc if k == "discriminator" else ocfg.lr, betas=betas
            )
            for k in self.modules
        }


def make_step_fn(
    model: VAEGAN,
    groups: Groups,
    cfg: TrainConfig,
    device: torch.device,
    amp: torch.dtype | None,
    scaler: torch.amp.GradScaler | None,
    guard: engine.DivergenceGuard | None = None,
    dinfo: distributed.DistInfo | None = None,
    batch_aug=None,
):
    """The VAE-GAN training step ``step_fn(batch) -> {loss name: detached tensor}``.

    It never syncs with the host (the engine does, every ``log_every`` steps), except for the
    divergence guard's single boolean. ``benchmarks/bench_train.py`` times exactly this function.
    """

    def step_fn(batch: dict) -> dict[str, torch.Tensor]:
        x = batch["image"].to(device, non_blocking=True)
        if batch_aug is not None:  # augmentation on the device, the whole batch at once
            x = batch_aug(x)
        if model.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = batch["label"].to(device, non_blocking=True).clamp_min(0)
        for opt in groups.opts.values():
            opt.zero_grad(set_to_none=True)
        # one global draw of the noise, sliced per replica: N replicas see what one process would
        b, world, rank = x.shape[0], dinfo.world if dinfo else 1, dinfo.rank if dinfo else 0
        g_eps = torch.randn(b * world, cfg.model.latent_dim)
        g_zp = torch.randn(b * world, cfg.model.latent_dim)
        # DistributedSampler deals global position r + world * i to replica r as its i-th sample
        noise = (g_eps[rank::world].to(device), g_zp[rank::world].to(device))
        losses = model.objective(x, y, cfg.loss, amp, noise)
        route_gradients(losses, groups.params, scaler)
        norms = []
        for name, opt in groups.opts.items():
            if dinfo is not None:
                distributed.average_gradients(groups.params[name], dinfo)
            if scaler is not None:
                scaler.unscale_(opt)
            clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
            norms.append(torch.nn.utils.clip_grad_norm_(groups.params[name], clip))
        # fp16's scaler skips inf steps itself; the guard covers bf16/fp32 and persistent NaNs
        if guard is not None and scaler is None:
            parts = [v for k, v in losses.items() if k in GROUP_LOSSES]
            if dinfo is not None:  # every replica must take the same decision
                parts = [
                    distributed.all_finite(torch.stack([p.detach().float() for p in parts]).sum(), dinfo)
                ]
            if not guard.ok(*parts, *norms):
                for opt in groups.opts.values():
                    opt.zero_grad(set_to_none=True)
                return {}
        for opt in groups.opts.values():
            if scaler is not None:
                scaler.step(opt)
            else:
                opt.step()
        if scaler is not None:
            scaler.update()
        # per-group totals are sums of the logged parts
        return {k: v.detach() for k, v in losses.items() if k not in GROUP_LOSSES}

    return step_fn


def train_one_epoch(
    model: VAEGAN,
    loader,
    groups: Groups,
    cfg: TrainConfig,
    device: torch.device,
    step: int,
    epoch: int,
    amp: torch.dtype | None,
    scaler: torch.amp.GradScaler | None,
    log_fn=None,
    ckpt_fn=None,
    skip_batches: int = 0,
    restore_rng: dict | None = None,
    guard: engine.DivergenceGuard | None = None,
    dinfo: distributed.DistInfo | None = None,
    batch_aug=None,
) -> tuple[dict[str, float], int]:
    """One pass over ``loader``; returns (epoch-mean losses, new global step).

    With a ``guard``, a step whose losses or gradient norms are not finite updates nothing and is
    counted; too many in a row raise :class:`pipeline.engine.RollbackNeeded`.

    ``ckpt_fn(step, epoch, batch_in_epoch)`` saves a mid-epoch checkpoint.
    """
    model.train()
    step_fn = make_step_fn(model, groups, cfg, device, amp, scaler, guard, dinfo, batch_aug)
    return engine.run_epoch(
        loader,
        step_fn,
        step=step,
        desc=f"epoch {epoch + 1}/{cfg.epochs}",
        log_every=cfg.tracking.log_every,
        log_fn=log_fn,
        ckpt_fn=None if ckpt_fn is None else (lambda s, bi: ckpt_fn(s, epoch, bi)),
        ckpt_every=cfg.ckpt_every,
        skip_batches=skip_batches,
        restore_rng=restore_rng,
        hide_in_bar=("d_",),
    )


@torch.no_grad()
def evaluate(model: VAEGAN, loader, device: torch.device, lcfg: LossConfig) -> dict[str, float]:
    """Validation: reconstruction SSIM/PSNR (posterior mean, images in [0, 1]) and losses."""
    from monai.metrics import PSNRMetric, SSIMMetric

    model.eval()
    size = model.cfg.image_size
    win = 11 if size >= 64 else 7 if size >= 32 else 3
    ssim, psnr = SSIMMetric(spatial_dims=2, data_range=1.0, win_size=win), PSNRMetric(max_val=1.0)
    sums: dict[str, float] = {}
    n = 0
    for batch in loader:
        x = batch["image"].to(device)
        y = batch["label"].to(device).clamp_min(0)
        mu, logvar = model.encode(x, y)
        recon = model.decode(mu, y)  # the posterior mean's reconstruction
        a, b = (recon.float() + 1) / 2, (x + 1) / 2
        ssim(a, b)
        psnr(a, b)
        bs = x.shape[0]
        sums["kl"] = sums.get("kl", 0.0) + float(L.kl_divergence(mu, logvar, x[0].numel())) * bs
        sums["pixel_l1"] = sums.get("pixel_l1", 0.0) + float(L.pixel_l1(recon, x)) * bs
        n += bs
    out = {f"val/{k}": v / max(n, 1) for k, v in sums.items()}
    out["val/ssim"] = float(ssim.aggregate().item())
    out["val/psnr"] = float(psnr.aggregate().item())
    return out


# ----------------------------------------------------------------------------------------- stage
# a resumed run may change its epoch budget, and the keys that change neither what it computes
# nor where it logs (how it was started, how often it saves, CPU threads). Anything else that
# differs refuses the resume, naming the keys.
RESUME_MAY_DIFFER = (
    "epochs",
    "resume",
    "out_dir",
    "tracking.run_name",
    "ckpt_every",
    "threads",
    "tracking.retry_s",
    *(f"speed.{k}" for k in ("mode", "cache", *MEASURES)),  # how steps run, not what they compute
)


def build_model(cfg: TrainConfig, device: torch.device, measures: dict[str, bool]) -> VAEGAN:
    """The VAE-GAN on ``device`` with the model-level speed measures of ``measures``."""
    model = VAEGAN(cfg.model, disc_calls="auto" if measures["split_discriminator"] else "joint")
    model = model.to(device).fuse_norm_act()
    return model.to_channels_last() if measures["channels_last"] else model


def calibration_step(cfg: TrainConfig, device: torch.device, amp, measures: dict[str, bool]):
    """A zero-argument training step of the run's model, size and batch on a random batch (what
    ``speed.mode=auto`` times, pipeline/speed.py; benchmarks/bench_train.py times the same)."""
    model = build_model(cfg, device, measures)
    step = make_step_fn(model, Groups(model, cfg.optim), cfg, device, amp, None)
    b, s = cfg.data.batch_size, cfg.data.image_size
    batch = {
        "image": torch.rand(b, 1, s, s) * 2 - 1,
        "label": torch.arange(b) % max(cfg.model.num_classes, 1),
    }
    return lambda: step(batch)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train; returns the MLflow run id, the output folder, final metrics and artifact paths.

    The run folder is locked while this process writes it (a second process with the same run
    name gets a clear error)."""
    dinfo = distributed.init()  # under torchrun: join the group; rank 0 alone logs and checkpoints
    try:
        if cfg.data.batch_size % dinfo.world:
            raise ValueError(
                f"data.batch_size={cfg.data.batch_size} is not divisible by {dinfo.world} processes"
            )
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = engine.run_folder(
            cfg.out_dir,
            cfg.tracking.run_name,
            cfg.resume,
            f"{cfg.model.kind}-{cfg.data.image_size}px-{stamp}",
        )
        with engine.RunLock(run_dir, enabled=dinfo.is_main):
            return _train(cfg, dinfo, run_dir)
    finally:
        distributed.shutdown(dinfo)


def _restore_or_set_aside(cfg: TrainConfig, run_dir: Path, is_main: bool):
    """The checkpoint to resume from (payload, path) or (None, None) for a fresh start; before a
    fresh start an earlier run's folder under the same name is moved aside (its MLflow run id is
    returned, to mark it KILLED if it was left RUNNING)."""
    resume_path = engine.find_resume(cfg.resume, run_dir)
    if resume_path is None:
        old_run_id = engine.previous_run_id(run_dir) if is_main else None
        if is_main:
            engine.set_aside(run_dir)
        return None, None, old_run_id
    resumed, resume_path = ckpt.load_resumable(resume_path)
    diff = ckpt.config_diff(resumed.get("config", {}), to_dict(cfg), RESUME_MAY_DIFFER)
    if diff:
        raise ckpt.CheckpointError(
            f"resume={cfg.resume}: {resume_path} was trained with another config ("
            + "; ".join(diff[:5])
            + (f"; +{len(diff) - 5} more" if len(diff) > 5 else "")
            + "). Resume with the same settings (only epochs may change), or start a new run "
            "under another tracking.run_name"
        )
    return resumed, resume_path, None


def _train(cfg: TrainConfig, dinfo: distributed.DistInfo, run_dir: Path) -> dict[str, Any]:
    from monai.utils import set_determinism

    # Everything that can fail cheaply fails before a model is built.
    manifest = resolve_manifest(cfg.data)
    resumed, resume_path, old_run_id = _restore_or_set_aside(cfg, run_dir, dinfo.is_main)
    if dinfo.is_main:
        ckpt.remove_stale_temps(run_dir / "checkpoints")
    device = engine.pick_device(cfg.device)
    if dinfo.enabled and device.type == "cuda":
        device = torch.device("cuda", dinfo.local_rank)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    amp = engine.amp_dtype(cfg.amp, device, cfg.data.image_size)
    measures, speed_line = speed.resolve(
        cfg.speed,
        device,
        cfg.data.image_size,
        cfg.data.batch_size,
        lambda m: calibration_step(cfg, device, amp, m),
        log=lambda line: print(line, flush=True) if dinfo.is_main else None,
    )
    if dinfo.is_main:
        print(speed_line, flush=True)
    if cfg.deterministic:
        set_determinism(seed=cfg.seed)

    mdf, _ = read_manifest(manifest)
    names = label_names(mdf)
    # images that may show burned-in identifying text never reach MLflow: no reconstruction grids
    real_grids = not may_hold_burned_in(manifest)
    if not real_grids:
        print(f"{manifest} may hold burned-in annotations: reconstruction grids are not made", flush=True)
    if cfg.model.num_classes and cfg.model.num_classes < len(names):
        raise ValueError(f"model.num_classes={cfg.model.num_classes} but {manifest} has {len(names)} classes")

    train_items = records(manifest, cfg.data.train_split, cfg.data.max_train, cfg.data.labels)
    val_items = records(manifest, cfg.data.val_split, cfg.data.max_val, cfg.data.labels)
    _check_labels(train_items + val_items, cfg.model.num_classes, manifest, names)
    print(
        f"data: {manifest} train={len(train_items)} val={len(val_items)} size={cfg.data.image_size}px "
        f"classes={names} device={device} amp={amp}",
        flush=True,
    )
    batch_aug = device_augment(cfg.data, device)  # None: the loader augments each image
    train_ds = build_dataset(train_items, cfg.data, train=batch_aug is None)
    val_ds = build_dataset(val_items, cfg.data, train=False)
    train_loader, sampler, gen = make_train_loader(train_ds, cfg.data, cfg.seed, dinfo)
    val_loader = make_loader(val_ds, cfg.data, shuffle=False)
    # the fitted prior is fitted to the unaugmented training images' posterior means
    fit_ds = train_ds if batch_aug is not None else build_dataset(train_items, cfg.data, train=False)
    fit_loader = make_loader(fit_ds, cfg.data, shuffle=False) if cfg.model.prior == "fitted" else None

    model = build_model(cfg, device, measures)
    if dinfo.enabled and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    groups = Groups(model, cfg.optim)
    if cfg.compile:
        for m in groups.modules.values():
            m.compile()  # in place: state_dict keys and checkpoints stay those of the plain module
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None

    step, start_epoch, skip, restore_rng = 0, 0, 0, None
    run_id = None
    if resumed is not None:
        for name, module in groups.modules.items():
            if name not in resumed["models"]:
                raise ckpt.CheckpointError(f"checkpoint {resume_path} has no {name} (model.kind differs?)")
            ckpt.load_module_state(module, resumed["models"][name], name, resume_path)
        for name, opt in groups.opts.items():
            ckpt.load_optimizer_state(
                opt, resumed["optimizers"][name], groups.modules[name], resumed["models"][name]
            )
        if resumed.get("prior"):
            ckpt.load_module_state(model.prior, resumed["prior"], "prior", resume_path)
        if scaler is not None and resumed.get("scaler"):
            scaler.load_state_dict(resumed["scaler"])
        step, start_epoch, skip = int(resumed["step"]), int(resumed["epoch"]), int(resumed["batch_in_epoch"])
        restore_rng = resumed["rng"] if skip > 0 else None
        run_id = resumed.get("mlflow_run_id") or None
        print(f"resuming from {resume_path}: epoch {start_epoch + 1}, step {step}", flush=True)
    if dinfo.is_main:
        # a checkpoint is weights + two Adam moments, written beside the last one; plus grids
        engine.check_writable(run_dir / "checkpoints", need_bytes=6 * engine.state_bytes(model) + 16 * 2**20)
    cfg_dict = to_dict(cfg)
    code_version = git_commit()
    # rank 0 alone talks to MLflow; an unreachable server does not stop training (see Tracker)
    tracker = tracking.Tracker(cfg.tracking, run_dir, enabled=dinfo.is_main)
    tags = {
        "git_commit": code_version,
        "stage": "train",
        "model.kind": cfg.model.kind,
        "data.manifest": str(manifest),
        "classes": ",".join(names.values()),
        "mlflow.note.content": (  # the run's description in the MLflow UI
            f"{cfg.model.kind.upper()} at {cfg.data.image_size} px"
            f"{f', conditioned on {len(names)} classes' if cfg.model.num_classes else ''} "
            f"({', '.join(names.values())}), {cfg.epochs} epochs, data {manifest}, seed {cfg.seed}"
        ),
    }
    if cfg.tracking.parent_run_id:
        tags["mlflow.parentRunId"] = cfg.tracking.parent_run_id

    def payload(step_: int, epoch_: int, batch_in_epoch: int) -> dict[str, Any]:
        return {
            "models": {k: m.state_dict() for k, m in groups.modules.items()},
            "prior": model.prior.state_dict(),
            "optimizers": {k: o.state_dict() for k, o in groups.opts.items()},
            "scaler": scaler.state_dict() if scaler is not None else {},
            "step": step_,
            "epoch": epoch_,
            "batch_in_epoch": batch_in_epoch,
            "rng": ckpt.rng_state(),
            "config": cfg_dict,
            "code_version": code_version,
            "mlflow_run_id": tracker.run_id,  # None while the server has not been reached yet
            "label_names": {int(k): v for k, v in names.items()},
        }

    def save(step_: int, epoch_: int, bi: int) -> None:
        if dinfo.is_main:
            ckpt.save_checkpoint(run_dir / "checkpoints" / "last.pt", payload(step_, epoch_, bi))
        distributed.barrier(dinfo)  # no replica reads a checkpoint (rollback) before it is whole

    # A run resumed after a crash recomputes the steps between its checkpoint and the crash;
    # they were logged already (with the same values: training is deterministic), so only steps
    # past the highest one logged are sent, and the run's metric steps never go backwards.
    # (A divergence-guard rollback replays steps in the same way, with new values: those are
    # not logged again either.) Set once the run has started.
    logged = {"floor": -1, "last": -1}

    def log_fn(metrics: dict[str, float], s: int) -> None:
        if s > logged["floor"]:
            tracker.log_metrics(metrics, step=s)
            logged["last"] = max(logged["last"], s)

    # fixed inputs for the grids: the same prior codes and validation images every epoch
    g = torch.Generator().manual_seed(1234)
    z_fixed = torch.randn(cfg.grid_size, cfg.model.latent_dim, generator=g)
    n_cls = max(cfg.model.num_classes, 1)
    y_fixed = (torch.arange(cfg.grid_size) % 8) % n_cls  # one class per grid column (8 columns)
    val_fixed = torch.stack([val_ds[i]["image"] for i in range(min(32, len(val_ds)))])
    val_fixed_y = torch.stack(
        [torch.as_tensor(val_ds[i]["label"]) for i in range(min(32, len(val_ds)))]
    ).clamp_min(0)

    metrics: dict[str, float] = {}
    grid_path = recon_path = None
    t0 = time.time()
    guard = (
        engine.DivergenceGuard(cfg.guard.max_bad_steps, cfg.guard.max_rollbacks, cfg.guard.lr_factor)
        if cfg.guard.enabled
        else None
    )
    last_ckpt = run_dir / "checkpoints" / "last.pt"
    base_lrs = {k: [g["lr"] for g in o.param_groups] for k, o in groups.opts.items()}
    status = "FAILED"
    try:  # from here on the MLflow run always ends: FINISHED, or FAILED with the error
        tracker.start(run_id, run_dir.name, tags)
        if old_run_id:
            tracker.end_if_running(old_run_id, "KILLED")
        if resumed is None:
            # the speed measures this machine runs with (speed.mode=auto chose them by timing)
            tracker.log_params({**flatten(cfg_dict), **{f"speed_chosen.{m}": v for m, v in measures.items()}})
            tracker.log_dict(cfg_dict, "config.json")
            tracker.log_dataset(manifest, "train")
            # a good state to roll back to before the first epoch ends
            save(step, start_epoch, 0)
        else:
            logged["floor"] = tracker.max_logged_step()
        epoch = start_epoch
        while epoch < cfg.epochs:
            # seeding per epoch makes the data order, augmentation and noise of epoch e the same
            # whether or not the run was interrupted before it
            engine.seed_epoch(cfg.seed, epoch, gen, train_ds)
            sampler.set_epoch(epoch)
            te = time.time()
            try:
                train_metrics, step = train_one_epoch(
                    model,
                    train_loader,
                    groups,
                    cfg,
                    device,
                    step,
                    epoch,
                    amp,
                    scaler,
                    log_fn,
                    save,
                    skip_batches=skip if epoch == start_epoch else 0,
                    restore_rng=restore_rng if epoch == start_epoch else None,
                    guard=guard,
                    dinfo=dinfo if dinfo.enabled else None,
                    batch_aug=batch_aug,
                )
            except engine.RollbackNeeded as e:
                factor = guard.rollback()  # raises DivergenceError after R rollbacks
                good, _ = ckpt.load_resumable(last_ckpt)
                for name, module in groups.modules.items():
                    module.load_state_dict(good["models"][name])
                for name, opt in groups.opts.items():
                    opt.load_state_dict(good["optimizers"][name])
                    for g, lr0 in zip(opt.param_groups, base_lrs[name], strict=True):
                        g["lr"] = lr0 * factor
                step, epoch, skip = int(good["step"]), int(good["epoch"]), int(good["batch_in_epoch"])
                start_epoch, restore_rng = epoch, good["rng"] if skip > 0 else None
                print(
                    f"divergence guard: {e}; rolled back to step {step} (epoch {epoch + 1}), "
                    f"learning rates x{factor:g} (rollback {guard.rollbacks}/{guard.max_rollbacks})",
                    file=sys.stderr,
                    flush=True,
                )
                logged["floor"] = max(logged["floor"], logged["last"])
                tracker.log_metrics(
                    {"guard/rollbacks": guard.rollbacks, "guard/skipped_steps": guard.skipped},
                    step=max(logged["floor"], 0),
                )
                continue
            val_metrics = evaluate(model, val_loader, device, cfg.loss)
            epoch_s = time.time() - te
            val_metrics["epoch"] = epoch + 1
            val_metrics["time/epoch_s"] = epoch_s
            val_metrics["time/images_per_s"] = len(train_ds) / max(epoch_s, 1e-9)
            if guard is not None:
                val_metrics["guard/skipped_steps"] = guard.skipped
                val_metrics["guard/rollbacks"] = guard.rollbacks
            log_fn(val_metrics, step)
            metrics = {**{f"train/{k}": v for k, v in train_metrics.items()}, **val_metrics}
            if dinfo.is_main:
                if fit_loader is not None:
                    model.fit_prior(fit_loader, device)
                grid_path, recon_path = _save_grids(
                    model, run_dir, epoch, z_fixed, y_fixed, val_fixed, val_fixed_y, device, real_grids, names
                )
                tracker.log_artifact(grid_path, "grids")
                if recon_path is not None:
                    tracker.log_artifact(recon_path, "grids")
            save(step, epoch + 1, 0)
            if dinfo.is_main:
                print(
                    f"epoch {epoch + 1}/{cfg.epochs} step {step} {epoch_s:.1f}s "
                    + " ".join(
                        f"{k}={v:.4f}" for k, v in metrics.items() if k.startswith(("train/", "val/"))
                    ),
                    flush=True,
                )
            epoch += 1
        if dinfo.is_main:
            tracker.log_artifact(last_ckpt, "checkpoints")
            if cfg.tracking.log_model:
                tracker.log_generator(last_ckpt, cfg.tracking.register_model)
        status = "FINISHED"
    finally:
        if dinfo.is_main:
            curve = _loss_curve(tracker, run_dir)
            if curve is not None:
                tracker.log_artifact(curve, "plots")
        tracker.close(status)
    if dinfo.is_main:
        print(f"done in {time.time() - t0:.0f}s")
        print(f"MLflow run id: {tracker.run_id} (tracking: {tracker.uri})")
        print(f"sample grid: {grid_path}")
        print(f"reconstruction grid: {recon_path}")
        print(f"look at the run: {tracking.ui_command(tracker.uri)}")
        print(
            f"  then http://127.0.0.1:5000 -> experiment {cfg.tracking.experiment} -> Runs -> {run_dir.name}"
        )
    return {
        "run_id": tracker.run_id,
        "run_dir": str(run_dir),
        "metrics": metrics,
        "guard": guard.state() if guard is not None else {},
        "grid": str(grid_path),
        "recon_grid": str(recon_path),
        "checkpoint": str(run_dir / "checkpoints" / "last.pt"),
    }


def _check_labels(items: list[dict], num_classes: int, manifest: Path, names: dict) -> None:
    """A class-conditioned model embeds labels 0..num_classes-1: refuse any other before the
    model is built (it would fail deep inside as 'index out of range in self')."""
    if num_classes <= 0:
        return
    bad = sorted({int(it["label"]) for it in items if not 0 <= int(it["label"]) < num_classes})
    if bad:
        shown = ", ".join(f"{b} ({names.get(b, '?')})" for b in bad[:5])
        raise ValueError(
            f"{manifest} has labels {shown} outside model.num_classes={num_classes} (0..{num_classes - 1}): "
            f"set model.num_classes={max(bad) + 1}, or keep only some classes with data.labels=[...]"
        )


def _save_grids(
    model, run_dir: Path, epoch: int, z, y, vx, vy, device, real=True, names=None
) -> tuple[Path, Path | None]:
    """The prior-sample grid (columns headed by their class; codes from the model's prior, fitted
    or N(0, I)), and (``real``) the validation
    images beside their reconstructions."""
    model.eval()
    with torch.no_grad():
        cond = y.to(device) if model.cfg.num_classes > 0 else None
        samples = model.decoder(model.prior(z.to(device), cond), cond).float().cpu()
        vcond = vy.to(device) if model.cfg.num_classes > 0 else None
        mu, _ = model.encoder(vx.to(device), vcond)
        rec = model.decoder(mu, vcond).float().cpu()
    up = max(1, 256 // model.cfg.image_size)
    heads = [(names or {}).get(int(c), str(int(c))) for c in y[:8]] if model.cfg.num_classes > 0 else None
    gp = save_grid(
        samples,
        run_dir / "grids" / f"samples_epoch{epoch + 1:03d}.png",
        nrow=8,
        upscale=up // 2 or 1,
        col_labels=heads,
    )
    if not real:
        return gp, None
    rp = save_grid(
        pairs(vx, rec), run_dir / "grids" / f"recon_epoch{epoch + 1:03d}.png", nrow=8, upscale=up // 2 or 1
    )
    return gp, rp


def _loss_curve(tracker: tracking.Tracker, run_dir: Path) -> Path | None:
    """Plot from the run's local metric record, so a resumed run's curve covers all of it."""
    history = {k: v for k, v in tracker.history().items() if k.startswith(("train/", "val/"))}
    history = {k: v for k, v in history.items() if all(math.isfinite(x) for _, x in v)}
    if not history:
        return None
    return plot_curves(history, run_dir / "loss_curves.png", title=run_dir.name)


def config_from_checkpoint(payload: dict[str, Any]) -> TrainConfig:
    from pipeline.config import from_dict

    cfg = copy.deepcopy(payload["config"])
    # checkpoints from before decoder heads existed were all "deconv"
    cfg.setdefault("model", {}).setdefault("decoder_head", "deconv")
    return from_dict(TrainConfig, cfg)


__all__ = [
    "TrainConfig",
    "LossConfig",
    "OptimConfig",
    "train",
    "train_one_epoch",
    "evaluate",
]
