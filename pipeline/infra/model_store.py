"""Generators in MLflow, as data: logged and loaded without pickle.

A generator is logged as an MLflow pyfunc model whose artifacts are ``generator.json`` (the
architecture and label names, :meth:`networks.vaegan.Generator.export_spec`) and
``generator.pt`` (the decoder's ``state_dict``: tensors only). The project loads a model URI
(``models:/NAME/VERSION``, ``runs:/ID/generator``, ``file://...``) by downloading those two files
and rebuilding the module, reading the weights with ``torch.load(weights_only=True)``: anyone who
can register a version in a shared registry can give us wrong weights, never run code on our
machines. A model logged with pickle (``mlflow.pytorch``) is refused unless the user sets
``CXR_VAEGAN_TRUST_PICKLED_MODELS=1``: unpickling runs whatever code the file holds.

The model ships no code: its pyfunc flavour names ``pipeline.infra.pyfunc_generator`` (a module of
the installed package) as its ``loader_module`` and its data folder holds the two files above.
:func:`load_pyfunc` checks a downloaded model's ``MLmodel`` names that module (MLflow imports
whatever module that file names) before handing it to ``mlflow.pyfunc.load_model``.
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
from pipeline.infra import checkpoint as ckpt
from pipeline.infra import pyfunc_generator
from pipeline.infra.config import from_dict

TRUST_ENV = "CXR_VAEGAN_TRUST_PICKLED_MODELS"
LOADER_MODULE = pyfunc_generator.__name__  # the pyfunc entry point named in our models' MLmodel


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


def _download(uri: str, tracking_uri: str, dst: str) -> Path:
    import mlflow

    if tracking_uri:
        # a models:/ or runs:/ address is looked up in the project's store, not ./mlruns
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst))
    except Exception as e:
        raise FileNotFoundError(
            f"MLflow model {uri} cannot be found in {mlflow.get_registry_uri()} "
            f"({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''})"
        ) from e
    if local.is_file() or not (local / "MLmodel").is_file():
        raise FileNotFoundError(f"{uri} is not an MLflow model (no MLmodel file)")
    return local


def _data_folder(local: Path, uri: str) -> Path | None:
    """The data folder of one of our models (its MLmodel names our loader module), else None."""
    try:
        mlmodel = yaml.safe_load((local / "MLmodel").read_text()) or {}
    except yaml.YAMLError as e:
        raise UnsafeModelError(f"MLflow model {uri}: its MLmodel file is not valid YAML ({e})") from None
    pyfunc = ((mlmodel.get("flavors") or {}) if isinstance(mlmodel, dict) else {}).get(
        "python_function"
    ) or {}
    if pyfunc.get("loader_module") != LOADER_MODULE or not isinstance(pyfunc.get("data"), str):
        return None
    data = (local / pyfunc["data"]).resolve()
    if not data.is_relative_to(local.resolve()) or not data.is_dir():
        raise UnsafeModelError(
            f"MLflow model {uri}: its data folder {pyfunc['data']!r} is not inside the model"
        )
    return data


def load_generator_uri(uri: str, tracking_uri: str = "") -> Generator:
    """Download an MLflow model and rebuild its generator from data only (see module doc)."""
    with tempfile.TemporaryDirectory(prefix="cxr-model-") as tmp:
        local = _download(uri, tracking_uri, tmp)
        data = _data_folder(local, uri)
        if data is not None:
            try:
                return pyfunc_generator.load_data(data)
            except Exception as e:
                raise ValueError(
                    f"MLflow model {uri}: generator files unusable ({type(e).__name__}: {e})"
                ) from e
        mlmodel = yaml.safe_load((local / "MLmodel").read_text()) or {}
        flavors = mlmodel.get("flavors") or {} if isinstance(mlmodel, dict) else {}
        if os.environ.get(TRUST_ENV) != "1":
            kinds = ", ".join(flavors) or "no flavor"
            raise UnsafeModelError(
                f"MLflow model {uri} is not a cxr-vaegan generator stored as data ({kinds}; its pyfunc loader "
                f"is not {LOADER_MODULE}): loading it could run code from whoever logged it (it is stored with "
                f"pickle). Re-log it with this version of cxr-vaegan, or, if you trust its source, set {TRUST_ENV}=1"
            )
        print(f"WARNING: unpickling MLflow model {uri} because {TRUST_ENV}=1", file=sys.stderr, flush=True)
        import mlflow.pytorch

        gen = mlflow.pytorch.load_model(str(local), map_location=torch.device("cpu"))
        if not isinstance(gen, Generator):
            raise ValueError(f"MLflow model {uri} is a {type(gen).__name__}, not a Generator")
        return gen


def load_pyfunc(uri: str, tracking_uri: str = ""):
    """``mlflow.pyfunc.load_model`` for a generator from a registry others can write to: the model
    is downloaded, its MLmodel checked to name :mod:`pipeline.infra.pyfunc_generator` with a data
    folder inside the model (MLflow would import whatever module it names), and only then loaded."""
    import mlflow.pyfunc

    tmp = tempfile.mkdtemp(prefix="cxr-model-")
    local = _download(uri, tracking_uri, tmp)
    if _data_folder(local, uri) is None:
        raise UnsafeModelError(
            f"MLflow model {uri} does not name {LOADER_MODULE} as its pyfunc loader: not loaded (MLflow would "
            "import and run the module its MLmodel file names)"
        )
    return mlflow.pyfunc.load_model(str(local))


def generator_from_checkpoint(path: str | Path, payload: dict | None = None) -> tuple[Generator, ModelConfig]:
    """The generator of a train checkpoint (loaded ``weights_only``) and its model config."""
    payload = ckpt.load_checkpoint(path) if payload is None else payload
    model = dict(payload.get("config", {}).get("model") or {})
    # checkpoints from before decoder heads existed were all "deconv"
    model.setdefault("decoder_head", "deconv")
    mcfg = from_dict(ModelConfig, model)
    dec = Decoder(**autoencoder_kwargs(mcfg), head=mcfg.decoder_head)
    ckpt.load_module_state(dec, ckpt.inference_state(payload, "decoder"), "decoder", path)
    names = {int(k): str(v) for k, v in payload.get("label_names", {}).items()}
    gen = Generator(dec, names)
    if payload.get("prior"):  # checkpoints from before the fitted prior have none: N(0, I)
        ckpt.load_module_state(gen.prior, payload["prior"], "prior", path)
    return gen, mcfg


def source_run_id(uri: str) -> str:
    """The MLflow run that logged the model at ``uri`` (lineage), or "" when it cannot be told."""
    import mlflow

    try:
        if uri.startswith("runs:/"):
            return uri[len("runs:/") :].split("/", 1)[0]
        if uri.startswith("models:/"):
            name, _, ref = uri[len("models:/") :].partition("/")
            client = mlflow.tracking.MlflowClient()
            if name and "@" in name:
                name, alias = name.split("@", 1)
                return client.get_model_version_by_alias(name, alias).run_id or ""
            return client.get_model_version(name, ref).run_id or ""
    except Exception:  # noqa: BLE001 - lineage is a label, never a reason to fail
        return ""
    return ""


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


def describe_generator(payload: dict[str, Any], metrics: dict[str, float]) -> tuple[str, dict[str, str]]:
    """A registered version's description and tags: its data, size, epochs and measured quality."""
    cfg = payload.get("config", {})
    data, model = cfg.get("data", {}), cfg.get("model", {})
    names = ", ".join(str(v) for _, v in sorted((payload.get("label_names") or {}).items())) or "none"
    quality = ", ".join(f"{k} {metrics[k]:.4f}" for k in sorted(metrics) if k.startswith("val/")) or "n/a"
    text = (
        f"VAE-GAN generator (Larsen et al. 2016) trained by cxr-vaegan: "
        f"{model.get('kind', 'vaegan')}, {model.get('image_size')} px, latent {model.get('latent_dim')}, "
        f"classes: {names}; data {data.get('manifest') or 'embedded phantoms'}, "
        f"{payload.get('epoch', '?')} of {cfg.get('epochs', '?')} epochs, step {payload.get('step', '?')}; "
        f"code {payload.get('code_version', 'unknown')}. Validation: {quality}. "
        f"Synthetic images: never use them as patient data. Class fidelity and FD: run `evaluate`."
    )
    tags = {
        "image_size": str(model.get("image_size")),
        "classes": names,
        "data.manifest": str(data.get("manifest") or "embedded phantoms"),
        "epochs": str(payload.get("epoch", "")),
        "git_commit": str(payload.get("code_version", "unknown")),
        "synthetic": "true",
    }
    return text, tags


def log_generator_model(
    run_id: str,
    gen: Generator,
    model_cfg: ModelConfig,
    registered_name: str = "",
    description: str = "",
    tags: dict[str, str] | None = None,
) -> Any:
    """Log ``gen`` to run ``run_id`` as the pyfunc model ``generator`` (and register it, with
    ``description`` and ``tags`` on the new version)."""
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
        data = Path(tmp) / "generator"
        data.mkdir()
        (data / pyfunc_generator.SPEC).write_text(json.dumps(gen.export_spec(model_cfg), indent=1))
        torch.save(
            {k: v.detach().cpu() for k, v in gen.state_dict().items()}, data / pyfunc_generator.WEIGHTS
        )
        # log_model needs an active run; nested: a parent run may be active in this process
        with mlflow.start_run(run_id=run_id, nested=True):
            # no code in the model: the loader is a module of the installed package, the files data
            info = mlflow.pyfunc.log_model(
                name="generator",
                loader_module=LOADER_MODULE,
                data_path=str(data),
                signature=signature,
                input_example=example,
                pip_requirements=_requirements(),
                registered_model_name=registered_name or None,
            )
    version = getattr(info, "registered_model_version", None)
    if registered_name and version is not None:
        client = mlflow.tracking.MlflowClient()
        if description:
            client.update_model_version(registered_name, str(version), description=description)
        for k, v in (tags or {}).items():
            client.set_model_version_tag(registered_name, str(version), k, v)
    return info
