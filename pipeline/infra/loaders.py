"""Loading what the stages share, as data: generators (train checkpoints and MLflow models, never
unpickled: :mod:`pipeline.infra.model_store`), classifier checkpoints, evaluation images, and the
synthetic sources ``classify synthetic=`` draws from. Stages import these; none of them imports
a stage, so no stage needs another to load its inputs.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader

from networks.classifier import ClassifierConfig, CXRClassifier
from networks.vaegan import Generator
from pipeline.infra import checkpoint as ckpt
from pipeline.infra import model_store
from pipeline.infra.config import from_dict
from pipeline.infra.data import DataConfig, build_dataset, records
from pipeline.infra.stage_configs import TrainConfig
from pipeline.infra.tracking import TrackingConfig, resolve_uri
from transforms.io import file_sha256
from transforms.synthetic import GeneratorSource, ManifestSource


@dataclass
class LoadedGenerator:
    generator: Generator
    label_names: dict[int, str]
    source: str
    sha256: str
    run_id: str = ""  # the MLflow run that trained it (lineage), "" when unknown

    @property
    def image_size(self) -> int:
        return int(self.generator.decoder.image_size)

    @property
    def num_classes(self) -> int:
        return int(self.generator.decoder.num_classes)


def state_sha256(module: torch.nn.Module) -> str:
    """Hash of the weights themselves (names, shapes, bytes): the same for any file holding them."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def load_generator(
    source: str | Path, device: str | torch.device = "cpu", tracking_uri: str = ""
) -> LoadedGenerator:
    """A generator from a train checkpoint or an MLflow model URI, loaded as data (weights only,
    never unpickled: ``pipeline.infra.model_store``). ``tracking_uri``: where ``models:/``/``runs:/``
    addresses are looked up (default: ``MLFLOW_TRACKING_URI``, else the embedded store)."""
    src = str(source)
    if model_store.is_model_uri(src):
        gen = model_store.load_generator_uri(src, tracking_uri or resolve_uri(TrackingConfig()))
        # a checkpoint's weights are checked in ckpt.load_module_state; a model's here, whichever
        # way load_generator_uri rebuilt it (from data, or unpickled on explicit trust)
        ckpt.check_finite(
            gen.state_dict(), "generator", f"MLflow model {src}", fix="load an earlier, good version"
        )
        run_id = model_store.source_run_id(src)
        return LoadedGenerator(gen.to(device).eval(), dict(gen.label_names), src, state_sha256(gen), run_id)
    payload = ckpt.load_checkpoint(src)
    gen, _ = model_store.generator_from_checkpoint(src, payload)
    run_id = str(payload.get("mlflow_run_id") or "")
    return LoadedGenerator(gen.to(device).eval(), dict(gen.label_names), src, file_sha256(src), run_id)


def resolve_labels(spec: str, n: int, loaded: LoadedGenerator) -> np.ndarray:
    """``balanced`` cycles the classes; a name or index repeats one class. -1 = unconditioned."""
    if loaded.num_classes == 0:
        if spec != "balanced":
            raise ValueError(f"label={spec!r}: this generator is not class-conditioned; use label=balanced")
        return np.full(n, -1, dtype=np.int64)
    if spec == "balanced":
        return np.arange(n, dtype=np.int64) % loaded.num_classes
    by_name = {v.lower(): k for k, v in loaded.label_names.items()}
    if spec.lower() in by_name:
        return np.full(n, by_name[spec.lower()], dtype=np.int64)
    if spec.lstrip("-").isdigit() and 0 <= int(spec) < loaded.num_classes:
        return np.full(n, int(spec), dtype=np.int64)
    known = ", ".join(sorted(loaded.label_names.values())) or f"indices 0..{loaded.num_classes - 1}"
    raise ValueError(f"label={spec!r} is not a class of this generator (known: {known}, or balanced)")


def sample_images(
    loaded: LoadedGenerator,
    labels: np.ndarray,
    seed: int,
    batch_size: int = 256,
    prior: str = "fitted",
    temperature: float = 1.0,
) -> torch.Tensor:
    """``[N, 1, S, S]`` float images in ``[-1, 1]`` on the CPU, deterministic in ``seed``; codes
    from the generator's fitted prior when it has one and ``prior == "fitted"``, else N(0, I),
    their spread scaled by ``temperature``."""
    lab = None if loaded.num_classes == 0 else torch.as_tensor(labels, dtype=torch.long)
    return loaded.generator.sample(
        lab, n=len(labels), seed=seed, prior=prior, batch_size=batch_size, temperature=temperature
    )


def prior_used(loaded: LoadedGenerator, prior: str) -> str:
    """What ``prior`` (a config's request) draws from with this generator: ``fitted`` or ``normal``."""
    return "fitted" if prior == "fitted" and loaded.generator.prior.is_fitted else "normal"


def synthetic_source(
    spec: str | Path, image_size: int, device: str | torch.device = "cpu", temperature: float = 1.0
) -> GeneratorSource | ManifestSource:
    """What ``classify synthetic=`` draws from: a ``.csv`` is a generated manifest; anything else a
    generator checkpoint or MLflow model URI (loaded as data, :func:`load_generator`)."""
    if str(spec).endswith(".csv"):
        return ManifestSource(spec, image_size)
    src = GeneratorSource(load_generator(spec, device).generator, temperature)
    if src.image_size != image_size:
        raise ValueError(f"generator {spec} makes {src.image_size}px images but the data are {image_size}px")
    return src


def load_classifier(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[CXRClassifier, dict[str, Any]]:
    """A classifier checkpoint written by :func:`classify` (``weights_only`` load)."""
    payload = ckpt.load_checkpoint(path)
    mcfg = from_dict(ClassifierConfig, payload["config"]["model"])
    model = CXRClassifier(mcfg)
    ckpt.load_module_state(model, payload["model"], "classifier", path)
    return model.to(device).eval(), payload


def load_images(
    manifest: str | Path, split: str, image_size: int, limit: int = 0
) -> tuple[torch.Tensor, np.ndarray]:
    """Preprocessed ``[N, 1, S, S]`` images in ``[-1, 1]`` and their labels."""
    return load_items(records(manifest, split, limit), image_size)


def load_items(items: list[dict], image_size: int) -> tuple[torch.Tensor, np.ndarray]:
    """``{"image": path, "label": int}`` records read and preprocessed as evaluation images."""
    ds = build_dataset(items, DataConfig(image_size=image_size), train=False)
    xs, ys = [], []
    for b in DataLoader(ds, batch_size=256, shuffle=False):
        xs.append(b["image"].float())
        ys.append(torch.as_tensor(b["label"]))
    return torch.cat(xs), torch.cat(ys).numpy().astype(int)


def config_from_checkpoint(payload: dict[str, Any]) -> TrainConfig:
    cfg = copy.deepcopy(payload["config"])
    # checkpoints from before decoder heads existed were all "deconv"
    cfg.setdefault("model", {}).setdefault("decoder_head", "deconv")
    return from_dict(TrainConfig, cfg)
