"""Generators in MLflow, as data: logged and loaded without pickle.

A generator is logged as an MLflow pyfunc model whose artifacts are ``generator.json`` (the
architecture and label names, :meth:`networks.vaegan.Generator.export_spec`) and
``generator.pt`` (the decoder's ``state_dict``: tensors only). The project loads a model URI
(``models:/NAME/VERSION``, ``runs:/ID/generator``, ``file://...``) by downloading those two files
and rebuilding the module, reading the weights with ``torch.load(weights_only=True)``: anyone who
can register a version in a shared registry can give us wrong weights, never run code on our
machines. A model logged with pickle (``mlflow.pytorch`` and older versions of this project) is
refused unless the user sets ``CXR_VAEGAN_TRUST_PICKLED_MODELS=1``: unpickling runs whatever code
the file holds. ``mlflow.pyfunc.load_model(uri)`` works on our models too (see
``pipeline/mlflow_generator_model.py``).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from networks.vaegan import Decoder, Generator, ModelConfig, autoencoder_kwargs
from pipeline import checkpoint as ckpt
from pipeline.config import from_dict

TRUST_ENV = "CXR_VAEGAN_TRUST_PICKLED_MODELS"
PYFUNC_CODE = Path(__file__).resolve().parent / "mlflow_generator_model.py"
NETWORKS_DIR = Path(__file__).resolve().parent.parent / "networks"


class UnsafeModelError(ValueError):
    """An MLflow model that could only be loaded by unpickling it (running code from its author)."""


def is_model_uri(source: str) -> bool:
    return "://" in source or source.startswith(("runs:", "models:"))


def _inside(root: Path, rel: str) -> Path:
    """``root/rel`` when it really is a file inside ``root`` (no ``..``, no link out)."""
    p = (root / rel).resolve()
    if not p.is_relative_to(root.resolve()) or not p.is_file():
        raise UnsafeModelError(f"model artifact {rel!r} is not a file inside the model")
    return p


def load_generator_uri(uri: str, tracking_uri: str = "") -> Generator:
    """Download an MLflow model and rebuild its generator from data only (see module doc)."""
    import mlflow

    if tracking_uri:
        # a models:/ or runs:/ address is looked up in the project's store, not ./mlruns
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="cxr-model-") as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
        except Exception as e:
            raise FileNotFoundError(
                f"MLflow model {uri} cannot be found in {mlflow.get_registry_uri()} "
                f"({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''})"
            ) from e
        if local.is_file() or not (local / "MLmodel").is_file():
            raise FileNotFoundError(f"{uri} is not an MLflow model (no MLmodel file)")
        mlmodel = yaml.safe_load((local / "MLmodel").read_text()) or {}
        flavors = mlmodel.get("flavors") or {}
        artifacts = (flavors.get("python_function") or {}).get("artifacts") or {}
        if {"spec", "weights"} <= set(artifacts):
            spec = json.loads(_inside(local, artifacts["spec"]["path"]).read_text())
            weights = _inside(local, artifacts["weights"]["path"])
            try:
                state = torch.load(weights, map_location="cpu", weights_only=True)
                return Generator.from_spec(spec, state).eval()
            except Exception as e:
                raise ValueError(f"MLflow model {uri}: generator files unusable ({type(e).__name__}: {e})") from e
        if os.environ.get(TRUST_ENV) != "1":
            raise UnsafeModelError(
                f"MLflow model {uri} is stored with pickle ({', '.join(flavors) or 'no flavor'}): loading "
                f"it would run code from whoever logged it. Re-log it with this version of cxr-vaegan, or, "
                f"if you trust its source, set {TRUST_ENV}=1"
            )
        print(f"WARNING: unpickling MLflow model {uri} because {TRUST_ENV}=1", file=sys.stderr, flush=True)
        import mlflow.pytorch

        gen = mlflow.pytorch.load_model(str(local), map_location=torch.device("cpu"))
        if not isinstance(gen, Generator):
            raise ValueError(f"MLflow model {uri} is a {type(gen).__name__}, not a Generator")
        return gen


def generator_from_checkpoint(path: str | Path) -> tuple[Generator, ModelConfig]:
    """The generator of a train checkpoint (loaded ``weights_only``) and its model config."""
    payload = ckpt.load_checkpoint(path)
    model = dict(payload.get("config", {}).get("model") or {})
    # checkpoints from before decoder heads existed were all "deconv"
    model.setdefault("decoder_head", "deconv")
    mcfg = from_dict(ModelConfig, model)
    dec = Decoder(**autoencoder_kwargs(mcfg), head=mcfg.decoder_head)
    ckpt.load_module_state(dec, payload["models"]["decoder"], "decoder", path)
    names = {int(k): str(v) for k, v in payload.get("label_names", {}).items()}
    return Generator(dec, names), mcfg


def _requirements() -> list[str]:
    import monai
    import numpy
    import pandas

    return [
        f"torch=={torch.__version__.split('+')[0]}",
        f"monai=={monai.__version__}",
        f"numpy=={numpy.__version__}",
        f"pandas=={pandas.__version__}",
    ]


def log_generator_model(
    run_id: str, gen: Generator, model_cfg: ModelConfig, registered_name: str = ""
) -> Any:
    """Log ``gen`` to run ``run_id`` as the pyfunc model ``generator`` (and register it)."""
    import mlflow
    import numpy as np
    import pandas as pd
    from mlflow.models import infer_signature

    names = gen.label_names
    labels = [names[k] for k in sorted(names)] if names else [""]
    example = pd.DataFrame({"label": labels, "count": [2] * len(labels), "seed": [0] * len(labels)})
    size = int(gen.decoder.image_size)
    signature = infer_signature(example, np.zeros((2, 1, size, size), np.float32))
    with tempfile.TemporaryDirectory(prefix="cxr-model-") as tmp:
        spec_path, weights_path = Path(tmp) / "generator.json", Path(tmp) / "generator.pt"
        spec_path.write_text(json.dumps(gen.export_spec(model_cfg), indent=1))
        torch.save({k: v.detach().cpu() for k, v in gen.decoder.state_dict().items()}, weights_path)
        # log_model needs an active run; nested: a parent run may be active in this process
        with mlflow.start_run(run_id=run_id, nested=True):
            return mlflow.pyfunc.log_model(
                name="generator",
                python_model=str(PYFUNC_CODE),
                artifacts={"spec": str(spec_path), "weights": str(weights_path)},
                code_paths=[str(NETWORKS_DIR)],
                signature=signature,
                input_example=example,
                pip_requirements=_requirements(),
                registered_model_name=registered_name or None,
            )
