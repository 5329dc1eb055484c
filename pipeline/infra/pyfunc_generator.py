"""The registered generator's pyfunc entry point: a module of the installed package, not code
shipped inside the model.

A generator is logged with ``mlflow.pyfunc.log_model(loader_module="pipeline.infra.pyfunc_generator",
data_path=...)``: the model's files are data only (``generator.json``, the architecture and label
names; ``generator.pt``, the decoder's ``state_dict`` read with ``weights_only=True``), and
``mlflow.pyfunc.load_model(uri)`` imports this module from the cxr-vaegan installed on the loading
machine and calls :func:`_load_pyfunc` on the model's data folder. Editing a registered version's
files can give wrong weights, never run code through them.

MLflow itself trusts a model's ``MLmodel`` file (it imports whatever ``loader_module`` that file
names): :func:`pipeline.infra.model_store.load_pyfunc` checks that file names this module before it
hands the model to MLflow; use it for models from a registry others can write to.

``predict`` takes a table with columns ``label`` (a class name or index; empty for an
unconditioned generator), ``count`` and ``seed`` and returns ``[N, 1, S, S]`` float32 images in
``[-1, 1]``, the rows' images in order. Row ``(label, count, seed)`` draws its latent codes from a
CPU generator seeded with ``seed``, so the same row gives the same images anywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from networks.vaegan import Generator

SPEC, WEIGHTS = "generator.json", "generator.pt"


def load_data(folder: str | Path) -> Generator:
    """The generator of a model's data folder: its JSON spec and weights-only state dict (files
    inside the folder only: no link out), every weight finite."""
    root = Path(folder).resolve()
    paths = {}
    for name in (SPEC, WEIGHTS):
        p = (root / name).resolve()
        if not p.is_relative_to(root) or not p.is_file():
            raise ValueError(f"{root}: {name} is not a file inside the model's data folder")
        paths[name] = p
    spec = json.loads(paths[SPEC].read_text())
    state = torch.load(paths[WEIGHTS], map_location="cpu", weights_only=True)
    bad = [
        k
        for k, v in state.items()
        if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()
    ]
    if bad:
        raise ValueError(f"{paths[WEIGHTS]}: non-finite weights in {bad[:3]}: a diverged or damaged model")
    return Generator.from_spec(spec, state).eval()


class GeneratorModel:
    """What ``mlflow.pyfunc.load_model`` wraps: ``predict(table) -> images``."""

    def __init__(self, generator: Generator) -> None:
        self.generator = generator

    def _label_index(self, value) -> int:
        dec = self.generator.decoder
        if dec.num_classes == 0:
            return -1
        text = str(value).strip()
        by_name = {v.lower(): k for k, v in self.generator.label_names.items()}
        if text.lower() in by_name:
            return by_name[text.lower()]
        if text.lstrip("-").isdigit() and 0 <= int(text) < dec.num_classes:
            return int(text)
        raise ValueError(f"label {value!r} is not a class of this generator ({self.generator.label_names})")

    def predict(self, model_input, params=None) -> np.ndarray:
        dec = self.generator.decoder
        out = []
        with torch.no_grad():
            for row in model_input.to_dict("records"):
                count, seed = int(row["count"]), int(row["seed"])
                if count < 1:
                    raise ValueError(f"count must be >= 1, got {count}")
                label = self._label_index(row.get("label", ""))
                labels = None if label < 0 else torch.full((count,), label, dtype=torch.long)
                out.append(self.generator.sample(labels, n=count, seed=seed).numpy())
        size = dec.image_size
        return np.concatenate(out) if out else np.zeros((0, 1, size, size), np.float32)


def _load_pyfunc(data_path: str) -> GeneratorModel:
    """MLflow's pyfunc loader hook (``loader_module``): the model's data folder -> the model."""
    return GeneratorModel(load_data(data_path))
