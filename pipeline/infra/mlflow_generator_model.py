"""The registered generator as an MLflow pyfunc "model from code".

MLflow executes this file when a user calls ``mlflow.pyfunc.load_model(uri)``; the project itself
never imports it (it loads registered generators as data: ``pipeline.infra.model_store``). The model's
artifacts are a JSON spec and the decoder's ``state_dict``, read with ``weights_only=True``: no
pickle is involved anywhere.

``predict`` takes a table with columns ``label`` (a class name or index; empty for an
unconditioned generator), ``count`` and ``seed`` and returns ``[N, 1, S, S]`` float32 images in
``[-1, 1]``, the rows' images in order. Row ``(label, count, seed)`` draws its latent codes from a
CPU generator seeded with ``seed``, so the same row gives the same images anywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import torch
from mlflow.models import set_model

from networks.vaegan import Generator


class GeneratorModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        spec = json.loads(Path(context.artifacts["spec"]).read_text())
        state = torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True)
        self.generator = Generator.from_spec(spec, state).eval()

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

    def predict(self, context, model_input, params=None) -> np.ndarray:
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


set_model(GeneratorModel())
