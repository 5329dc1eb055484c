"""``python -m pipeline.run export checkpoint=<path|MLflow model URI> format=monai-bundle out=DIR``.

Writes a generator as a MONAI bundle (https://docs.monai.io/en/stable/mb_specification.html) that
runs without cxr-vaegan installed::

    DIR/configs/metadata.json    what the network takes and gives, versions, data, training, quality
    DIR/configs/inference.json   python -m monai.bundle run --config_file DIR/configs/inference.json
                                     --bundle_root DIR --label pneumonia --n 8 --seed 0 --output_dir OUT
    DIR/models/model.pt          the decoder's weights (the averaged ones when the run kept an
                                 average) and the fitted latent prior: a state dict of tensors only,
                                 read with torch.load(weights_only=True); no pickled code
    DIR/scripts/cxr_generator.py the network: torch, MONAI, NumPy and Pillow only
    DIR/docs/README.md           how to run it, what it was trained on, how good it is

The bundle's code computes what ``networks.vaegan.Generator`` computes, operation for operation, so
its images for a seed equal ``generate``'s for that seed; the export checks this on the written
bundle (a few images of each class) before it puts the bundle in place. A generator whose recorded
class fidelity is below ``min_fidelity`` is refused unless ``force=true``. The bundle is written
into a hidden sibling folder and renamed into place only when whole. The bundle's files, its code
and the self-check are :mod:`pipeline.infra.monai_bundle`'s; this stage picks what goes in them.
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from monai.networks.blocks import Convolution
from torch import nn

from networks.vaegan import Decoder
from pipeline.infra import checkpoint as ckpt
from pipeline.infra import model_store, tracking
from pipeline.infra.loaders import LoadedGenerator, load_generator
from pipeline.infra.locks import swap_into_place
from pipeline.infra.monai_bundle import self_check, write_bundle
from pipeline.infra.stage_configs import (
    ExportConfig,
    TrackingConfig,
)

FIDELITY_METRIC = "gate/class_fidelity"  # what train's validation gate logs (an AUROC)
# a config string starting with one of these is an expression, a reference or a macro to MONAI
CONFIG_SIGILS = ("$", "@", "%")


def export(cfg: ExportConfig) -> dict[str, Any]:
    """Write the generator as a MONAI bundle; returns the bundle folder and its metadata."""
    out = Path(cfg.out)
    _check_out(out, cfg.overwrite)
    payload = ckpt.load_checkpoint(cfg.checkpoint) if not model_store.is_model_uri(cfg.checkpoint) else {}
    uri = _tracking_uri(cfg, payload)
    loaded = load_generator(cfg.checkpoint, "cpu", uri)
    training, fidelity = _training_record(loaded, payload, uri)
    _check_fidelity(cfg, loaded, fidelity)
    args = network_args(loaded)
    staging = out.resolve().parent / f".{out.name}.exporting-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir(parents=True)
    try:
        meta = write_bundle(staging, cfg, loaded, args, training, fidelity)
        self_check(staging, loaded, args)
        swap_into_place(staging, out.resolve())
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    print(
        f"exported {loaded.source} as a MONAI bundle -> {out}\n"
        f"  run it: python -m monai.bundle run --config_file {out}/configs/inference.json "
        f"--bundle_root {out} --n 8 --output_dir OUT"
    )
    return {"bundle": str(out), "metadata": meta}


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse a file, a root or the current folder, and a non-empty ``out`` unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out={out} is a file, not a folder: give a folder for the bundle")
    real = out.resolve()
    if real == real.parent or Path.cwd().resolve().is_relative_to(real):
        raise ValueError(f"out={out} is the current folder, one above it or a root: give a folder of its own")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"out={out} is not empty: give another out=, or overwrite=true to replace its contents"
        )


def _tracking_uri(cfg: ExportConfig, payload: dict[str, Any]) -> str:
    """Where the generator's training run is: ``tracking.uri=``, the checkpoint's own ``tracking.uri``,
    ``MLFLOW_TRACKING_URI``, else the embedded store (for a checkpoint only when it exists: the
    export never creates one)."""
    own = str(((payload.get("config") or {}).get("tracking") or {}).get("uri") or "")
    uri = cfg.tracking.uri or own or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri or not payload:
        return uri or tracking.resolve_uri(TrackingConfig())
    return tracking.embedded_uri() if (tracking.store_dir() / "mlflow.db").is_file() else ""


def _run_record(run_id: str, uri: str) -> tuple[dict[str, str], list[tuple[int, float]]]:
    """The training run's params (its flattened config) and git commit, and its validation-gate
    class fidelity per step; nothing when the run cannot be read (no run id, store unreachable)."""
    if not run_id or not uri:
        return {}, []
    tracking.fail_fast_http()  # a dead server answers in seconds, not after minutes of retries
    try:
        import mlflow

        client = mlflow.tracking.MlflowClient(tracking_uri=uri)
        run = client.get_run(run_id)
        params = {**run.data.params, "code_version": run.data.tags.get("git_commit", "")}
        history = sorted(
            (m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, FIDELITY_METRIC)
        )
    except Exception as e:  # noqa: BLE001 - the record is a label: without it the export says "unknown"
        print(
            f"note: training run {run_id} not read from {uri} ({type(e).__name__}); its measures are unknown"
        )
        return {}, []
    return params, [(int(s), float(v)) for s, _, v in history]


def _training_record(loaded: LoadedGenerator, payload: dict[str, Any], uri: str) -> tuple[dict, dict]:
    """What the generator was trained on and how (from the checkpoint, else from its MLflow run's
    params), and its recorded class fidelity (:func:`_fidelity`)."""
    params, history = _run_record(loaded.run_id, uri)
    config = payload.get("config") or {}
    flat = dict(params)
    for section in ("data", "model"):
        flat.update({f"{section}.{k}": v for k, v in (config.get(section) or {}).items()})
    flat.update({k: v for k, v in config.items() if not isinstance(v, dict)})
    keep = ("data.manifest", "data.image_size", "data.train_split", "data.max_train", "model.kind")
    keep += ("model.latent_dim", "model.num_classes", "model.prior", "model.ema_decay", "epochs", "seed")
    ema = float(flat.get("model.ema_decay") or 0.0)
    averaged = bool(payload.get("ema")) if payload else ema > 0  # what inference_state loaded
    if "data.manifest" in flat and flat["data.manifest"]:  # a shared bundle names files, not this disk
        flat["data.manifest"] = Path(str(flat["data.manifest"])).name
    training = {
        # a model URI as given; a checkpoint by its file name (the bundle is shared: no local path)
        "source": loaded.source
        if "://" in loaded.source or loaded.source.startswith(("models:", "runs:"))
        else Path(loaded.source).name,
        "source_sha256": loaded.sha256,
        "mlflow_run_id": loaded.run_id or None,
        "code_version": payload.get("code_version") or params.get("code_version") or None,
        "epoch": payload.get("epoch"),
        "step": payload.get("step"),
        "config": {k: flat[k] for k in keep if k in flat},
        "weights": f"averaged (EMA, decay {ema:g})" if averaged else "the last step's (no average kept)",
        "prior": "fitted" if loaded.generator.prior.is_fitted else "N(0, I) (no fitted prior)",
    }
    return training, _fidelity(payload, loaded, history)


def _fidelity(payload: dict[str, Any], loaded: LoadedGenerator, history: list[tuple[int, float]]) -> dict:
    """The class fidelity (train's validation gate: a real-only classifier's AUROC on the images'
    intended labels) measured on *these* weights: the checkpoint's gate record when it is of the
    checkpoint's own epoch, else the run's gate metric at the checkpoint's step (an MLflow model:
    the run's last check, made at its last epoch, whose checkpoint was registered)."""
    gate = payload.get("gate") or {}
    value, fd = gate.get("class_fidelity"), gate.get("fd")
    if payload and gate.get("epoch") == payload.get("epoch") and _finite(value):
        where = f"validation gate, epoch {gate['epoch']} (the checkpoint's gate record)"
        return {"class_fidelity_auroc": float(value), "gate_fd": _num(fd), "measured_by": where}
    steps = [(s, v) for s, v in history if (s == payload.get("step") if payload else True)]
    if steps and _finite(steps[-1][1]):
        where = f"validation gate of training run {loaded.run_id}, step {steps[-1][0]}"
        return {"class_fidelity_auroc": steps[-1][1], "gate_fd": None, "measured_by": where}
    why = "train with gate.every > 0 and gate.judge=... to measure it, or run `evaluate`"
    return {"class_fidelity_auroc": None, "gate_fd": None, "measured_by": f"not recorded ({why})"}


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _num(x: Any) -> float | None:
    return float(x) if _finite(x) else None


def _check_fidelity(cfg: ExportConfig, loaded: LoadedGenerator, fidelity: dict) -> None:
    """Refuse a generator whose recorded class fidelity is below ``min_fidelity`` (``force``: warn)."""
    value = fidelity["class_fidelity_auroc"]
    fidelity["min_fidelity"], fidelity["forced"] = cfg.min_fidelity, False
    if value is None or value >= cfg.min_fidelity:
        return
    what = (
        f"{loaded.source}: recorded class fidelity {value:.3f} ({fidelity['measured_by']}) is below "
        f"min_fidelity={cfg.min_fidelity}: its images often do not show their label"
    )
    if not cfg.force:
        raise ValueError(
            f"{what}; not exported. Export a better checkpoint (e.g. best.pt of a run with gate.every > 0), "
            "or force=true to export it anyway (its metadata and README then say so)"
        )
    fidelity["forced"] = True
    print(f"WARNING: {what}; exported anyway (force=true)", flush=True)


def network_args(loaded: LoadedGenerator) -> dict[str, Any]:
    """The bundle network's constructor arguments, read off the loaded decoder's layers (a train
    checkpoint and an MLflow model alike) and checked by rebuilding ``networks.vaegan.Decoder``
    from them and loading its weights (names and shapes, strictly)."""
    dec = loaded.generator.decoder
    final = [m for m in dec.deconv if isinstance(m, Convolution)][-1].conv
    head = "subpixel" if any(isinstance(m, nn.PixelShuffle) for m in dec.deconv) else "deconv"
    kinds = {type(m) for m in dec.deconv.modules()}
    norm = "BATCH" if nn.BatchNorm2d in kinds else "INSTANCE" if nn.InstanceNorm2d in kinds else "NONE"
    args = {
        "image_size": dec.image_size,
        "latent_dim": dec.latent_dim,
        "base_channels": final.in_channels,
        "max_channels": dec.start_channels,
        "num_classes": dec.num_classes,
        "embed_dim": dec.embed.embedding_dim if dec.embed is not None else 16,
        "out_channels": final.out_channels // (4 if head == "subpixel" else 1),
        "norm": norm,
        "head": head,
    }
    ckpt.load_module_state(Decoder(**args), dec.state_dict(), "decoder", loaded.source)
    names = {str(k): str(v) for k, v in sorted(loaded.generator.label_names.items())}
    bad = [v for v in names.values() if v.startswith(CONFIG_SIGILS)]
    if bad:
        raise ValueError(
            f"{loaded.source}: class name(s) {bad} start with one of {CONFIG_SIGILS}, which a MONAI config "
            "reads as an expression or a reference: rename the class in the training manifest's label_name"
        )
    return {**args, "label_names": names}
