"""``python -m pipeline.run train [CONFIG.yaml] [key=value ...]``: train the VAE-GAN (or the plain VAE).

The model owns its math (:meth:`networks.vaegan.VAEGAN.objective`, :mod:`networks.objective`:
Larsen et al.'s losses and gradient routing); this stage builds the data, the model and the
optimisers, runs the epochs (checkpoints, divergence guard, grids, the fitted prior) and tracks
the run in MLflow.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from networks.objective import GROUP_LOSSES, route_gradients
from networks.vaegan import VAEGAN
from pipeline.infra import checkpoint as ckpt
from pipeline.infra import distributed, engine, runtime, speed, tracking
from pipeline.infra.config import current_spelling, flatten, tagged_keys, to_dict
from pipeline.infra.data import (
    Manifest,
    build_dataset,
    device_augment,
    make_loader,
    make_train_loader,
)
from pipeline.infra.gate import ValidationGate, gate_checks
from pipeline.infra.grids import grid_inputs, loss_curve, save_grids
from pipeline.infra.judge import Judge
from pipeline.infra.stage_configs import RESUMABLE, GateConfig, OptimConfig, TrainConfig
from pipeline.infra.tracking import git_commit
from pipeline.ingest.default import resolve_manifest
from transforms.manifest import may_hold_burned_in


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


@dataclass
class StepParts:
    """What a VAE-GAN training step works with: the model and its optimiser groups, the run's
    config, device and precision; optionally fp16's grad scaler, the divergence guard, the
    replicas' group and an on-device batch augmentation."""

    model: VAEGAN
    groups: Groups
    cfg: TrainConfig
    device: torch.device
    amp: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    guard: engine.DivergenceGuard | None = None
    dinfo: distributed.DistInfo | None = None
    batch_aug: Any = None


def _clip_and_check(p: StepParts, losses: dict[str, torch.Tensor]) -> bool:
    """Average (replicas), unscale (fp16) and clip each group's gradients; False when the
    divergence guard rejects the step (its gradients are then dropped)."""
    norms = []
    for name, opt in p.groups.opts.items():
        if p.dinfo is not None:
            distributed.average_gradients(p.groups.params[name], p.dinfo)
        if p.scaler is not None:
            p.scaler.unscale_(opt)
        clip = p.cfg.optim.grad_clip if p.cfg.optim.grad_clip > 0 else float("inf")
        norms.append(torch.nn.utils.clip_grad_norm_(p.groups.params[name], clip))
    # fp16's scaler skips inf steps itself; the guard covers bf16/fp32 and persistent NaNs
    if p.guard is None or p.scaler is not None:
        return True
    parts = [v for k, v in losses.items() if k in GROUP_LOSSES]
    if p.dinfo is not None:  # every replica must take the same decision
        parts = [distributed.all_finite(torch.stack([x.detach().float() for x in parts]).sum(), p.dinfo)]
    if p.guard.ok(*parts, *norms):
        return True
    for opt in p.groups.opts.values():
        opt.zero_grad(set_to_none=True)
    return False


def make_step_fn(p: StepParts):
    """The VAE-GAN training step ``step_fn(batch) -> {loss name: detached tensor}``.

    It never syncs with the host (the engine does, every ``log_every`` steps), except for the
    divergence guard's single boolean. ``benchmarks/bench_train.py`` times exactly this function.
    """
    model, groups, cfg, device, dinfo, scaler = p.model, p.groups, p.cfg, p.device, p.dinfo, p.scaler

    def step_fn(batch: dict) -> dict[str, torch.Tensor]:
        x = batch["image"].to(device, non_blocking=True)
        if p.batch_aug is not None:  # augmentation on the device, the whole batch at once
            x = p.batch_aug(x)
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
        losses = model.objective(x, y, cfg.loss, p.amp, noise)
        route_gradients(losses, groups.params, scaler)
        if not _clip_and_check(p, losses):
            return {}
        for opt in groups.opts.values():
            if scaler is not None:
                scaler.step(opt)
            else:
                opt.step()
        if scaler is not None:
            scaler.update()
        model.update_ema()
        # per-group totals are sums of the logged parts
        return {k: v.detach() for k, v in losses.items() if k not in GROUP_LOSSES}

    return step_fn


@dataclass(kw_only=True)
class TrainRun(runtime.StageRun):
    """A VAE-GAN training run: the stage's common state (:class:`pipeline.infra.runtime.StageRun`)
    and what train adds."""

    cfg: TrainConfig
    model: VAEGAN
    measures: dict[str, bool]  # the speed measures this machine runs with
    groups: Groups
    scaler: torch.amp.GradScaler | None
    guard: engine.DivergenceGuard | None
    base_lrs: dict[str, list[float]] = field(default_factory=dict)  # what a rollback scales
    # the validation gate (gate.every > 0) and its best epoch so far (saved in checkpoints)
    gate: ValidationGate = field(default_factory=lambda: ValidationGate(GateConfig()))
    # where the epoch loop starts (a resume or a rollback moves it)
    start_epoch: int = 0
    skip: int = 0
    restore_rng: dict | None = None
    run_id: str | None = None
    # a resumed run recomputes the steps between its checkpoint and the crash; they were logged
    # already (same values: training is deterministic), so only steps past the highest one logged
    # are sent and the run's metric steps never go backwards. A divergence-guard rollback replays
    # steps the same way, with new values: those are not logged again either.
    log_floor: int = -1
    last_logged: int = -1

    @property
    def last_checkpoint(self) -> Path:
        return self.run_dir / "checkpoints" / "last.pt"

    def payload(self, step: int, epoch: int, batch_in_epoch: int) -> dict[str, Any]:
        return {
            "models": {k: m.state_dict() for k, m in self.groups.modules.items()},
            "prior": self.model.prior.state_dict(),
            # the averaged encoder and decoder (model.ema_decay > 0): what inference loads
            "ema": {k: m.state_dict() for k, m in self.model.ema.nets.items()} if self.model.ema else {},
            "optimizers": {k: o.state_dict() for k, o in self.groups.opts.items()},
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "step": step,
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "rng": ckpt.rng_state(),
            "config": to_dict(self.cfg),
            "code_version": self.code_version,
            "mlflow_run_id": self.tracker.run_id,  # None while the server has not been reached yet
            "label_names": {int(k): v for k, v in self.names.items()},
            "gate": dict(self.gate.best),
        }

    def save(self, step: int, epoch: int, batch_in_epoch: int) -> None:
        if self.dinfo.is_main:
            ckpt.save_checkpoint(self.last_checkpoint, self.payload(step, epoch, batch_in_epoch))
        distributed.barrier(self.dinfo)  # no replica reads a checkpoint (rollback) before it is whole

    def log(self, metrics: dict[str, float], step: int) -> None:
        if step > self.log_floor:
            self.tracker.log_metrics(metrics, step=step)
            self.last_logged = max(self.last_logged, step)


def train_one_epoch(run: TrainRun, epoch: int) -> dict[str, float]:
    """One pass over the training data; returns the epoch-mean losses and advances ``run.step``.

    With a divergence guard, a step whose losses or gradient norms are not finite updates nothing
    and is counted; too many in a row raise :class:`pipeline.infra.engine.RollbackNeeded`. A
    checkpoint is saved every ``ckpt_every`` steps; the first epoch after a resume or a rollback
    skips the batches its checkpoint had done and restores its random state.
    """
    cfg, d = run.cfg, run.data
    # seeding per epoch makes the data order, augmentation and noise of epoch e the same whether
    # or not the run was interrupted before it
    engine.seed_epoch(cfg.seed, epoch, d["gen"], d["train_ds"])
    d["sampler"].set_epoch(epoch)
    first = epoch == run.start_epoch
    run.model.train()
    step_fn = make_step_fn(
        StepParts(
            run.model,
            run.groups,
            cfg,
            run.device,
            run.amp,
            run.scaler,
            run.guard,
            run.dinfo if run.dinfo.enabled else None,
            d["batch_aug"],
        )
    )
    plan = engine.EpochPlan(
        desc=f"epoch {epoch + 1}/{cfg.epochs}",
        log_every=cfg.tracking.log_every,
        log_fn=run.log,
        ckpt_fn=lambda s, bi: run.save(s, epoch, bi),
        ckpt_every=cfg.ckpt_every,
        skip_batches=run.skip if first else 0,
        restore_rng=run.restore_rng if first else None,
        hide_in_bar=("d_",),
    )
    metrics, run.step = engine.run_epoch(d["train_loader"], step_fn, run.step, plan)
    return metrics


# ----------------------------------------------------------------------------------------- stage
# a resumed run may change its epoch budget, and the keys that change neither what it computes
# nor where it logs (how it was started, how often it saves, CPU threads). Anything else that
# differs refuses the resume, naming the keys.
RESUME_MAY_DIFFER = ("epochs", *sorted(tagged_keys(TrainConfig, RESUMABLE)))


def build_model(cfg: TrainConfig, device: torch.device, measures: dict[str, bool]) -> VAEGAN:
    """The VAE-GAN on ``device`` with the model-level speed measures of ``measures``."""
    model = VAEGAN(cfg.model, disc_calls="auto" if measures["split_discriminator"] else "joint")
    model = model.use_gemm_convs(measures["gemm_convs"]).to(device)
    if measures["fused_norm_act"]:
        model.fuse_norm_act()
    return model.to_channels_last() if measures["channels_last"] else model


def calibration_step(cfg: TrainConfig, device: torch.device, amp, measures: dict[str, bool]):
    """A zero-argument training step of the run's model, size and batch on a random batch (what
    ``speed.mode=auto`` times, pipeline/infra/speed.py; benchmarks/bench_train.py times the same)."""
    model = build_model(cfg, device, measures)
    step = make_step_fn(StepParts(model, Groups(model, cfg.optim), cfg, device, amp))
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
    # under torchrun: join the group; rank 0 alone logs and checkpoints
    with runtime.replicas(cfg.data.batch_size) as dinfo:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        _check_resume_path(cfg.resume)
        run_dir = engine.run_folder(
            cfg.out_dir,
            cfg.tracking.run_name,
            cfg.resume,
            f"{cfg.model.kind}-{cfg.data.image_size}px-{stamp}",
        )
        with runtime.run_folder(run_dir, dinfo, fresh=False):
            return _train(cfg, dinfo, run_dir)


def _check_resume_path(resume: str) -> None:
    """``resume=PATH`` continues the run whose folder holds the checkpoint (``RUN/checkpoints/*.pt``,
    RUN a run folder: ``engine.is_run_folder``), under that folder's lock. A checkpoint anywhere
    else is refused: its ``PATH/../..`` is no run of ours (a copy in ``/tmp/x/`` once wrote
    ``checkpoints/`` and ``grids/`` into ``/tmp`` and a lock file into ``/``), and it would go on
    logging into its original MLflow run without holding that run's lock."""
    if not resume or resume == "auto":
        return
    engine.find_resume(resume, None)  # a missing file is named as such, before any lock is taken
    path = Path(resume).resolve()
    if path.parent.name == "checkpoints" and engine.is_run_folder(path.parent.parent):
        return
    raise ckpt.CheckpointError(
        f"resume={resume}: {path} is not in a run folder (RUN/checkpoints/last.pt, RUN holding "
        f"{ckpt.RUN_ID_FILE}); resume continues a run in its own folder. Resume from the checkpoint "
        "in the folder of the run it belongs to (or tracking.run_name=NAME resume=auto), or start "
        "a new run"
    )


def _restore_or_set_aside(cfg: TrainConfig, run_dir: Path, dinfo: distributed.DistInfo):
    """The checkpoint to resume from (payload, path) or (None, None) for a fresh start; before a
    fresh start an earlier run's folder under the same name is moved aside (its MLflow run id is
    returned, to mark it KILLED if it was left RUNNING)."""
    resume_path = engine.find_resume(cfg.resume, run_dir)
    if resume_path is None:
        return None, None, runtime.set_aside_earlier(run_dir, dinfo)
    resumed, resume_path = ckpt.load_resumable(resume_path)
    # a checkpoint from before a key was renamed is compared in today's spelling
    saved = current_spelling(TrainConfig, resumed.get("config", {}), warn=False)
    diff = ckpt.config_diff(saved, to_dict(cfg), RESUME_MAY_DIFFER)
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
    # Everything that can fail cheaply fails before a model is built.
    manifest = resolve_manifest(cfg.data)
    resumed, resume_path, old_run_id = _restore_or_set_aside(cfg, run_dir, dinfo)
    if dinfo.is_main:
        ckpt.remove_stale_temps(run_dir / "checkpoints")
    run = _build_run(cfg, dinfo, run_dir, manifest)
    if cfg.gate.every and dinfo.is_main:  # refused here, before training, if it is no fair judge
        judge = Judge.load(cfg.gate.judge, run.device, reference=manifest)
        run.gate = ValidationGate(cfg.gate, judge, cfg.seed, cfg.model.num_classes, run.gate.best)
    if resumed is not None:
        _load_resumed(run, resumed, resume_path)
    if dinfo.is_main:
        # a checkpoint is weights + two Adam moments, written beside the last one; plus grids
        engine.check_writable(
            run_dir / "checkpoints", need_bytes=6 * engine.state_bytes(run.model) + 16 * 2**20
        )
    run.code_version = git_commit()
    run.base_lrs = {k: [g["lr"] for g in o.param_groups] for k, o in run.groups.opts.items()}
    fixed = grid_inputs(cfg.grid_size, cfg.model.latent_dim, cfg.model.num_classes, run.data["val_ds"])
    t0 = time.time()
    # rank 0 alone talks to MLflow; an unreachable server does not stop training (see Tracker);
    # from its start on, the MLflow run always ends: FINISHED, or FAILED with the error
    with runtime.tracked_run(
        cfg.tracking, run_dir, _tags(run), enabled=dinfo.is_main, run_id=run.run_id, old_run_id=old_run_id
    ) as run.tracker:
        try:
            _log_start(run, resumed is None)
            metrics, grids = _epochs(run, fixed)
            if dinfo.is_main:
                run.tracker.log_artifact(run.last_checkpoint, "checkpoints")
                if cfg.tracking.log_model:
                    run.tracker.log_generator(run.last_checkpoint, cfg.tracking.register_model)
        finally:
            if dinfo.is_main:
                curve = loss_curve(run.tracker, run_dir)
                if curve is not None:
                    run.tracker.log_artifact(curve, "plots")
    return _summary(run, metrics, grids, time.time() - t0)


def _log_start(run: TrainRun, fresh: bool) -> None:
    """A fresh run logs its resolved config, data and the state to roll back to before epoch 1
    ends; a resumed one reads the highest step it had logged."""
    cfg = run.cfg
    if not fresh:
        run.log_floor = run.tracker.max_logged_step()
        return
    # the speed measures this machine runs with (speed.mode=auto chose them by timing)
    chosen = {f"speed_chosen.{m}": v for m, v in run.measures.items()}
    run.tracker.log_params({**flatten(to_dict(cfg)), **chosen})
    run.tracker.log_dict(to_dict(cfg), "config.json")
    run.tracker.log_dataset(run.manifest, "train")
    engine.log_skipped(run.tracker, run.data["skipped"])
    run.save(run.step, run.start_epoch, 0)


def _epochs(run: TrainRun, fixed: dict[str, torch.Tensor]):
    """The epochs from ``run.start_epoch``; a divergence rolls back to the last good checkpoint."""
    metrics: dict[str, float] = {}
    grids: tuple[Path | None, Path | None] = (None, None)
    epoch = run.start_epoch
    while epoch < run.cfg.epochs:
        te = time.time()
        try:
            train_metrics = train_one_epoch(run, epoch)
        except engine.RollbackNeeded as e:
            epoch = _roll_back(run, e)
            continue
        metrics, grids = _end_epoch(run, epoch, train_metrics, time.time() - te, fixed)
        epoch += 1
    return metrics, grids


def _build_run(cfg: TrainConfig, dinfo: distributed.DistInfo, run_dir: Path, manifest: Path) -> TrainRun:
    """Device, speed measures, seed, data and model, in the order a seeded run depends on."""
    from monai.utils import set_determinism

    device = engine.training_device(cfg.device, cfg.threads, dinfo)
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
    rows = Manifest(manifest)  # read once: label names and both splits come from it
    names = rows.label_names()
    if cfg.model.num_classes and cfg.model.num_classes < len(names):
        raise ValueError(f"model.num_classes={cfg.model.num_classes} but {manifest} has {len(names)} classes")
    data = _build_data(cfg, dinfo, rows, names, device, f"device={device} amp={amp}")
    model = runtime.sync_batchnorm(build_model(cfg, device, measures), dinfo, device)
    groups = Groups(model, cfg.optim)
    if cfg.compile:
        for m in groups.modules.values():
            m.compile()  # in place: state_dict keys and checkpoints stay those of the plain module
    guard = None
    if cfg.guard.enabled:
        guard = engine.DivergenceGuard(cfg.guard.max_bad_steps, cfg.guard.max_rollbacks, cfg.guard.lr_factor)
    return TrainRun(
        cfg=cfg,
        dinfo=dinfo,
        run_dir=run_dir,
        device=device,
        amp=amp,
        measures=measures,
        manifest=manifest,
        names=names,
        data=data,
        model=model,
        groups=groups,
        scaler=torch.amp.GradScaler("cuda") if amp == torch.float16 else None,
        guard=guard,
    )


def _build_data(
    cfg: TrainConfig,
    dinfo: distributed.DistInfo,
    rows: Manifest,
    names: dict,
    device: torch.device,
    where: str,
) -> dict[str, Any]:
    manifest = rows.path
    # images that may show burned-in identifying text never reach MLflow: no reconstruction grids
    real_grids = not may_hold_burned_in(manifest)
    if not real_grids:
        print(f"{manifest} may hold burned-in annotations: reconstruction grids are not made", flush=True)
    train_items = rows.records(cfg.data.train_split, cfg.data.max_train, cfg.data.labels)
    val_items = rows.records(cfg.data.val_split, cfg.data.max_val, cfg.data.labels)
    _check_labels(train_items + val_items, cfg.model.num_classes, manifest, names)
    print(
        f"data: {manifest} train={len(train_items)} val={len(val_items)} size={cfg.data.image_size}px "
        f"classes={names} {where}",
        flush=True,
    )
    batch_aug = device_augment(cfg.data, device)  # None: the loader augments each image
    train_ds = build_dataset(train_items, cfg.data, train=batch_aug is None)
    val_ds = build_dataset(val_items, cfg.data, train=False)
    train_loader, sampler, gen = make_train_loader(train_ds, cfg.data, cfg.seed, dinfo)
    # the fitted prior is fitted to the unaugmented training images' posterior means
    fit_loader = None
    if cfg.model.prior == "fitted":
        fit_ds = train_ds if batch_aug is not None else build_dataset(train_items, cfg.data, train=False)
        fit_loader = make_loader(fit_ds, cfg.data, shuffle=False)
    return {
        "train_ds": train_ds,
        "val_ds": val_ds,
        "train_loader": train_loader,
        "sampler": sampler,
        "gen": gen,
        "val_loader": make_loader(val_ds, cfg.data, shuffle=False),
        "fit_loader": fit_loader,
        "batch_aug": batch_aug,
        "real_grids": real_grids,
        # images that could not be read any more (skipped, reported: data.build_dataset)
        "skipped": [*getattr(train_ds, "skipped", []), *getattr(val_ds, "skipped", [])],
    }


def _load_resumed(run: TrainRun, resumed: dict[str, Any], path: Path) -> None:
    for name, module in run.groups.modules.items():
        if name not in resumed["models"]:
            raise ckpt.CheckpointError(f"checkpoint {path} has no {name} (model.kind differs?)")
        ckpt.load_module_state(module, resumed["models"][name], name, path)
    for name, opt in run.groups.opts.items():
        ckpt.load_optimizer_state(
            opt, resumed["optimizers"][name], run.groups.modules[name], resumed["models"][name]
        )
    if resumed.get("prior"):
        ckpt.load_module_state(run.model.prior, resumed["prior"], "prior", path)
    _load_ema(run.model, resumed, path)
    if run.scaler is not None and resumed.get("scaler"):
        run.scaler.load_state_dict(resumed["scaler"])
    run.step, run.start_epoch = int(resumed["step"]), int(resumed["epoch"])
    run.skip = int(resumed["batch_in_epoch"])
    run.restore_rng = resumed["rng"] if run.skip > 0 else None
    run.gate.best.update(resumed.get("gate") or {})
    run.run_id = resumed.get("mlflow_run_id") or None
    print(f"resuming from {path}: epoch {run.start_epoch + 1}, step {run.step}", flush=True)


def _load_ema(model: VAEGAN, payload: dict[str, Any], path: Path) -> None:
    """The averaged encoder and decoder of a checkpoint (resume, rollback)."""
    if model.ema is None:
        return
    if not payload.get("ema"):
        raise ckpt.CheckpointError(f"{path} holds no averaged weights, but model.ema_decay > 0")
    for name, net in model.ema.nets.items():
        ckpt.load_module_state(net, payload["ema"][name], f"ema.{name}", path)


def _tags(run: TrainRun) -> dict[str, str]:
    cfg, names = run.cfg, run.names
    description = (  # the run's description in the MLflow UI
        f"{cfg.model.kind.upper()} at {cfg.data.image_size} px"
        f"{f', conditioned on {len(names)} classes' if cfg.model.num_classes else ''} "
        f"({', '.join(names.values())}), {cfg.epochs} epochs, data {run.manifest}, seed {cfg.seed}"
    )
    return runtime.run_tags(
        "train",
        cfg.tracking,
        run.code_version,
        **{
            "model.kind": cfg.model.kind,
            "data.manifest": str(run.manifest),
            "classes": ",".join(names.values()),
            "mlflow.note.content": description,
        },
    )


def _roll_back(run: TrainRun, e: engine.RollbackNeeded) -> int:
    """Reload the last checkpoint with lower learning rates after the divergence guard fired;
    returns the epoch to continue from."""
    factor = run.guard.rollback()  # raises DivergenceError after max_rollbacks
    good, _ = ckpt.load_resumable(run.last_checkpoint)
    for name, module in run.groups.modules.items():
        module.load_state_dict(good["models"][name])
    _load_ema(run.model, good, run.last_checkpoint)
    for name, opt in run.groups.opts.items():
        opt.load_state_dict(good["optimizers"][name])
        for g, lr0 in zip(opt.param_groups, run.base_lrs[name], strict=True):
            g["lr"] = lr0 * factor
    run.step, run.skip = int(good["step"]), int(good["batch_in_epoch"])
    run.start_epoch, run.restore_rng = int(good["epoch"]), good["rng"] if run.skip > 0 else None
    print(
        f"divergence guard: {e}; rolled back to step {run.step} (epoch {run.start_epoch + 1}), "
        f"learning rates x{factor:g} (rollback {run.guard.rollbacks}/{run.guard.max_rollbacks})",
        file=sys.stderr,
        flush=True,
    )
    run.log_floor = max(run.log_floor, run.last_logged)
    run.tracker.log_metrics(
        {"guard/rollbacks": run.guard.rollbacks, "guard/skipped_steps": run.guard.skipped},
        step=max(run.log_floor, 0),
    )
    return run.start_epoch


def _end_epoch(
    run: TrainRun, epoch: int, train_metrics: dict[str, float], epoch_s: float, fixed: dict[str, torch.Tensor]
) -> tuple[dict[str, float], tuple[Path | None, Path | None]]:
    """Validate, log, refit the prior, save the grids and the checkpoint of the epoch just ended."""
    cfg, d = run.cfg, run.data
    val_metrics = run.model.validation_scores(d["val_loader"], run.device)
    val_metrics["epoch"] = epoch + 1
    val_metrics["time/epoch_s"] = epoch_s
    val_metrics["time/images_per_s"] = len(d["train_ds"]) / max(epoch_s, 1e-9)
    if run.guard is not None:
        val_metrics["guard/skipped_steps"] = run.guard.skipped
        val_metrics["guard/rollbacks"] = run.guard.rollbacks
    run.log(val_metrics, run.step)
    metrics = {**{f"train/{k}": v for k, v in train_metrics.items()}, **val_metrics}
    grids: tuple[Path | None, Path | None] = (None, None)
    if run.dinfo.is_main:
        if d["fit_loader"] is not None:
            run.model.fit_prior(d["fit_loader"], run.device)
        grids = save_grids(run.model, run.run_dir, epoch, fixed, run.device, d["real_grids"], run.names)
        for path in grids:
            if path is not None:
                run.tracker.log_artifact(path, "grids")
    # the gate before the save: last.pt then records the gate's best so far, this epoch included
    gate_due = cfg.gate.every and ((epoch + 1) % cfg.gate.every == 0 or epoch + 1 == cfg.epochs)
    best = False
    if run.dinfo.is_main and gate_due:
        gate_metrics, best = run.gate.check(run.model, epoch, d["val_ds"])
        run.log(gate_metrics, run.step)
        metrics.update(gate_metrics)
    run.save(run.step, epoch + 1, 0)
    if best:  # this epoch's checkpoint, kept beside last.pt (a hard link where the disk allows)
        ckpt.keep_copy(run.last_checkpoint, run.last_checkpoint.with_name("best.pt"))
        run.tracker.log_artifact(run.last_checkpoint.with_name("best.pt"), "checkpoints")
    if run.dinfo.is_main:
        losses = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.startswith(("train/", "val/")))
        print(f"epoch {epoch + 1}/{cfg.epochs} step {run.step} {epoch_s:.1f}s {losses}", flush=True)
    return metrics, grids


def _summary(
    run: TrainRun, metrics: dict[str, float], grids: tuple[Path | None, Path | None], seconds: float
) -> dict[str, Any]:
    grid_path, recon_path = grids
    if run.dinfo.is_main:
        print(f"done in {seconds:.0f}s")
        print(f"MLflow run id: {run.tracker.run_id} (tracking: {run.tracker.uri})")
        print(f"sample grid: {grid_path}")
        print(f"reconstruction grid: {recon_path}")
        print(f"look at the run: {tracking.ui_command(run.tracker.uri)}")
        print(
            f"  then http://127.0.0.1:5000 -> experiment {run.cfg.tracking.experiment} -> Runs -> {run.run_dir.name}"
        )
    return {
        "run_id": run.tracker.run_id,
        "run_dir": str(run.run_dir),
        "metrics": metrics,
        "guard": run.guard.state() if run.guard is not None else {},
        "grid": str(grid_path),
        "recon_grid": str(recon_path),
        "checkpoint": str(run.last_checkpoint),
        # the validation gate's checks (epoch -> FD, class fidelity) and the epoch it kept as best.pt
        "gate": {
            "checks": gate_checks(run.tracker.history()),
            "best": dict(run.gate.best),
            "best_checkpoint": str(best)
            if (best := run.last_checkpoint.with_name("best.pt")).is_file()
            else "",
        },
        "steps": run.step,
        # seconds of training over every part of the run (a resumed run's earlier parts included)
        "train_s": sum(v for _, v in run.tracker.history().get("time/epoch_s", [])),
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


__all__ = ["train", "train_one_epoch"]
