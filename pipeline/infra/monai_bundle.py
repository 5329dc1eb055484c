"""The MONAI bundle the export stage writes (https://docs.monai.io/en/stable/mb_specification.html):
its files (:func:`write_bundle`) and the check that the written bundle's code and weights give the
generator's own images (:func:`self_check`). The bundle's network, ``scripts/cxr_generator.py``,
is :data:`BUNDLE_CODE`: torch, MONAI, NumPy and Pillow only, so it runs without cxr-vaegan.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import secrets
from pathlib import Path

import monai
import numpy as np
import PIL
import torch

from pipeline.infra.loaders import LoadedGenerator
from pipeline.infra.stage_configs import ExportConfig
from transforms.io import file_sha256

CODE_FILE = "cxr_generator.py"  # the network's module in DIR/scripts/
SCHEMA = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
)

# ``DIR/scripts/cxr_generator.py``: the bundle's network, a copy of the arithmetic of
# networks.vaegan.Decoder (with networks.layers.FewOutputConv2d's CPU path) and networks.prior.LatentPrior
BUNDLE_CODE = r'''"""A cxr-vaegan generator as a MONAI bundle network: torch, MONAI, NumPy and Pillow only.

Written by ``python -m pipeline.run export`` (cxr-vaegan). :class:`CXRGenerator` is the decoder and
the fitted latent prior of a cxr-vaegan VAE-GAN with the layers, ``state_dict`` keys and arithmetic
of ``networks.vaegan.Generator``: ``models/model.pt`` loads into either, and :func:`sample` gives
the images ``python -m pipeline.run generate`` gives for the same seed, label and prior.

The network's input is standard-normal noise ``[B, latent_dim]``; the fitted prior (one Gaussian
per class, fitted to the training images' codes) maps it to the decoder's codes. Its output is
``[B, 1, S, S]`` float32 images in ``[-1, 1]``. The images are synthetic: never patient data.
"""

from __future__ import annotations

import csv
import os
import re

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from PIL import Image
from torch import nn

HEADS = ("deconv", "subpixel")
PRIORS = ("fitted", "normal")
SIZES = (16, 32, 64, 128, 256)


def _use_gemm(x, w):
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and w.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
    )


class FewOutputConv2d(nn.Conv2d):
    """``nn.Conv2d`` (stride 1) computed on a CPU in float32 as cxr-vaegan computes it: one 1x1
    convolution into the per-tap products, then a shift-and-add; elsewhere plain ``nn.Conv2d``."""

    def forward(self, x):
        if not _use_gemm(x, self.weight):
            return super().forward(x)
        w, b, p = self.weight, self.bias, self.padding[0]
        B, C, H, W = x.shape
        n_out, k = w.shape[0], w.shape[-1]
        Ho, Wo = H + 2 * p - k + 1, W + 2 * p - k + 1
        w1 = w.permute(0, 2, 3, 1).reshape(n_out * k * k, C, 1, 1)
        taps = F.conv2d(x, w1).permute(1, 0, 2, 3)
        tp = F.pad(taps, (p, p, p, p)).view(n_out, k, k, B, H + 2 * p, W + 2 * p)
        out = tp[:, 0, 0, :, :Ho, :Wo].clone()
        for i in range(k):
            for j in range(k):
                if i or j:
                    out += tp[:, i, j, :, i : i + Ho, j : j + Wo]
        if b is not None:
            out += b.view(n_out, 1, 1, 1)
        return out.permute(1, 0, 2, 3).contiguous(memory_format=torch.channels_last)


def _few_output(conv):
    new = FewOutputConv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
        padding=conv.padding, bias=conv.bias is not None, device="meta",
    )
    new.weight, new.bias = conv.weight, conv.bias
    return new


class Decoder(nn.Module):
    """``z [B, latent_dim]`` (and labels ``[B]``) -> images ``[B, out_channels, S, S]`` in ``[-1, 1]``."""

    def __init__(self, image_size, latent_dim, base_channels, max_channels, num_classes=0,
                 embed_dim=16, out_channels=1, norm="BATCH", head="deconv"):
        super().__init__()
        if image_size not in SIZES or head not in HEADS:
            raise ValueError(f"image_size must be one of {SIZES} and head one of {HEADS}")
        n_up = image_size.bit_length() - 3  # upsampling stages from 4x4
        norm_arg = None if norm.upper() == "NONE" else norm.upper()
        chans = [min(base_channels * 2**i, max_channels) for i in range(n_up)][::-1]
        self.num_classes, self.latent_dim, self.image_size = num_classes, latent_dim, image_size
        self.embed = nn.Embedding(num_classes, embed_dim) if num_classes > 0 else None
        self.start_channels = chans[0]
        self.fc = nn.Linear(latent_dim + (embed_dim if num_classes > 0 else 0), chans[0] * 4 * 4)
        layers = []
        outs = [*chans[1:], chans[-1]]
        if head == "subpixel":
            chans, outs = chans[:-1], outs[:-1]
        relu = ("relu", {"inplace": True})
        for c_in, c_out in zip(chans, outs, strict=True):
            layers.append(Convolution(2, c_in, c_out, strides=2, kernel_size=3, is_transposed=True,
                                      output_padding=1, act=relu, norm=norm_arg, bias=norm_arg is None))
        c_last = outs[-1] if outs else chans[0]
        if head == "subpixel":
            layers.append(Convolution(2, c_last, c_last, kernel_size=3, act=relu, norm=norm_arg,
                                      bias=norm_arg is None))
            out = Convolution(2, c_last, out_channels * 4, kernel_size=3, conv_only=True)
            out.conv = _few_output(out.conv)
            layers += [out, nn.PixelShuffle(2)]
        else:
            out = Convolution(2, c_last, out_channels, kernel_size=3, conv_only=True)
            out.conv = _few_output(out.conv)
            layers.append(out)
        self.deconv = nn.Sequential(*layers)

    def forward(self, z, labels=None):
        if self.embed is not None:
            if labels is None:
                raise ValueError("this decoder is class-conditioned: pass labels")
            z = torch.cat([z, self.embed(labels)], dim=1)
        h = torch.relu(self.fc(z)).view(-1, self.start_channels, 4, 4)
        return torch.tanh(self.deconv(h))


class LatentPrior(nn.Module):
    """Standard-normal noise -> codes: ``mean[y] + scale_tril[y] @ eps`` once fitted, else ``eps``."""

    def __init__(self, latent_dim, num_classes=0):
        super().__init__()
        k = max(num_classes, 1)
        self.latent_dim, self.num_classes = latent_dim, num_classes
        self.register_buffer("mean", torch.zeros(k, latent_dim))
        self.register_buffer("scale_tril", torch.eye(latent_dim).repeat(k, 1, 1))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def forward(self, eps, labels=None):
        if not bool(self.fitted):
            return eps
        if labels is None or self.num_classes == 0:
            y = torch.zeros(len(eps), dtype=torch.long, device=eps.device)
        else:
            y = labels.long()
        tril = self.scale_tril.to(eps)[y]
        return self.mean.to(eps)[y] + (tril @ eps.unsqueeze(-1)).squeeze(-1)


class CXRGenerator(nn.Module):
    """``(noise [B, latent_dim], labels) -> images [B, 1, S, S]`` in ``[-1, 1]``: the prior maps the
    noise to codes, the decoder draws them. ``labels``: class indices (a tensor, a list, or one
    int for the whole batch); none for an unconditioned generator."""

    def __init__(self, image_size, latent_dim, base_channels, max_channels, num_classes=0,
                 embed_dim=16, out_channels=1, norm="BATCH", head="deconv", label_names=None):
        super().__init__()
        self.decoder = Decoder(image_size, latent_dim, base_channels, max_channels, num_classes,
                               embed_dim, out_channels, norm, head)
        self.prior = LatentPrior(latent_dim, num_classes)
        self.label_names = {int(k): str(v) for k, v in (label_names or {}).items()}

    def forward(self, noise, labels=None, prior="fitted"):
        if prior not in PRIORS:
            raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}")
        y = None
        if self.decoder.num_classes > 0:
            if labels is None:
                raise ValueError("this generator is class-conditioned: pass labels (class indices)")
            y = torch.as_tensor(labels, dtype=torch.long, device=noise.device).expand(len(noise))
        z = self.prior(noise, y) if prior == "fitted" else noise
        return self.decoder(z, y)


def load_weights(net, path, device="cpu"):
    """``net`` with the weights of ``path`` (a state dict of tensors: ``weights_only``), for inference."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{path}: non-finite weights in {bad[:3]}: a damaged file")
    net.load_state_dict(state, strict=True)
    return net.to(device).eval()


def resolve_labels(net, label, n):
    """``balanced`` cycles the classes; a class name or index repeats one class; -1: unconditioned."""
    k = net.decoder.num_classes
    spec = str(label).strip()
    if k == 0:
        if spec != "balanced":
            raise ValueError(f"label={spec!r}: this generator is not class-conditioned; use label balanced")
        return np.full(n, -1, dtype=np.int64)
    if spec == "balanced":
        return np.arange(n, dtype=np.int64) % k
    by_name = {v.lower(): i for i, v in net.label_names.items()}
    if spec.lower() in by_name:
        return np.full(n, by_name[spec.lower()], dtype=np.int64)
    if spec.lstrip("-").isdigit() and 0 <= int(spec) < k:
        return np.full(n, int(spec), dtype=np.int64)
    known = ", ".join(sorted(net.label_names.values())) or f"indices 0..{k - 1}"
    raise ValueError(f"label={spec!r} is not a class of this generator (known: {known}, or balanced)")


@torch.no_grad()
def batches(net, labels, seed=0, batch_size=256, prior="fitted"):
    """``(start, images)`` of ``len(labels)`` images, a batch at a time: all noise drawn first from
    one CPU generator seeded once, so image ``i`` does not depend on the device."""
    if prior not in PRIORS:
        raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}")
    dec = net.decoder
    n = len(labels)
    eps = torch.randn(n, dec.latent_dim, generator=torch.Generator().manual_seed(int(seed)))
    lab = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    dev = next(dec.parameters()).device
    for i in range(0, n, batch_size):
        e = eps[i : i + batch_size].to(dev)
        y = None if dec.num_classes == 0 else lab[i : i + batch_size].to(dev)
        z = net.prior(e, y) if prior == "fitted" else e
        yield i, dec(z, y).float().cpu()


def sample(net, labels, seed=0, batch_size=256, prior="fitted"):
    """``[N, 1, S, S]`` float images in ``[-1, 1]`` on the CPU for class indices ``labels``."""
    parts = [images for _, images in batches(net, labels, seed, batch_size, prior)]
    size = net.decoder.image_size
    return torch.cat(parts) if parts else torch.zeros(0, 1, size, size)


def to_uint8(img):
    return ((img.clamp(-1, 1)[0].numpy() + 1) * 127.5).round().astype(np.uint8)


def file_safe(name, limit=64):
    return re.sub(r"[^\w.-]", "_", name)[:limit] or "_"


def write_pngs(net, label="balanced", n=16, seed=0, output_dir="eval", batch_size=256, prior="fitted"):
    """``n`` synthetic PNGs of class ``label`` in ``output_dir`` (``syn_INDEX_CLASS.png``, 8-bit
    grey) and ``labels.csv`` (file, index, label, label_name, seed, prior); returns the files."""
    n, batch_size = int(n), int(batch_size)
    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be >= 1, got n={n}, batch_size={batch_size}")
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        raise FileExistsError(
            f"output_dir {output_dir} is not empty: a new set beside its files would mix two sets; "
            "give another --output_dir"
        )
    labels = resolve_labels(net, label, n)
    names = {int(y): net.label_names.get(int(y), "unlabelled" if y < 0 else str(int(y))) for y in set(labels)}
    os.makedirs(output_dir, exist_ok=True)
    rows = []
    for start, images in batches(net, labels, seed, batch_size, prior):
        for i, img in enumerate(images, start):
            y = int(labels[i])
            path = os.path.join(output_dir, f"syn_{i:06d}_{file_safe(names[y])}.png")
            Image.fromarray(to_uint8(img)).save(path)
            rows.append([os.path.basename(path), i, y, names[y], int(seed), prior])
    with open(os.path.join(output_dir, "labels.csv"), "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["file", "index", "label", "label_name", "seed", "prior"], *rows])
    counts = {names[y]: int((labels == y).sum()) for y in names}
    print(f"wrote {n} synthetic images {counts} (seed {seed}, prior {prior}) to {output_dir}")
    return [os.path.join(output_dir, r[0]) for r in rows]
'''


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _data_format(args: dict) -> dict:
    """metadata.json's ``network_data_format``: the network's inputs (noise, class) and output."""
    size, k, names = args["image_size"], args["num_classes"], args["label_names"]
    latent = {
        "type": "tensor",
        "format": "latent",
        "modality": "n/a",
        "num_channels": args["latent_dim"],
        "spatial_shape": [],
        "dtype": "float32",
        "value_range": [],
        "is_patch_data": False,
        "channel_def": {},
        "description": "standard-normal noise [B, latent_dim]; the fitted prior maps it to the decoder's codes",
    }
    inputs = {"latent": latent}
    if k:
        inputs["label"] = {
            **latent,
            "format": "classes",
            "num_channels": 1,
            "dtype": "int64",
            "value_range": [0, k - 1],
            "channel_def": names,
            "description": "class index per image [B] (or one int for the batch): the class drawn",
        }
    pred = {
        **latent,
        "type": "image",
        "format": "magnitude",
        "modality": "DX",
        "num_channels": 1,
        "spatial_shape": [size, size],
        "value_range": [-1, 1],
        "channel_def": {"0": "synthetic chest radiograph (grey level; -1 black, 1 white)"},
        "description": f"synthetic images [B, 1, {size}, {size}], float32 in [-1, 1]; never patient data",
    }
    return {"inputs": inputs, "outputs": {"pred": pred}}


def _metadata(cfg: ExportConfig, args: dict, training: dict, fidelity: dict, weights_sha: str) -> dict:
    """``configs/metadata.json``: MONAI's mandatory keys, the network's inputs and output, and
    the generator's data, training and measured quality."""
    size, k, names = args["image_size"], args["num_classes"], args["label_names"]
    cond = f"class-conditioned ({', '.join(names.values())})" if k else "unconditioned"
    return {
        "schema": SCHEMA,
        "version": cfg.version,
        "changelog": {cfg.version: f"exported by cxr-vaegan from {training['source']}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"pillow": PIL.__version__, "fire": _package_version("fire")},
        "name": "cxr-vaegan generator",
        "task": f"Synthetic chest radiograph generation, {cond}, {size} x {size} px",
        "description": (
            f"The decoder and fitted latent prior of a cxr-vaegan VAE-GAN (Larsen et al. 2016), {cond}: "
            "standard-normal noise and a class index in, a synthetic radiograph out. The images are "
            "synthetic: never patient data, not for diagnosis."
        ),
        "authors": cfg.authors,
        "copyright": cfg.copyright,
        "intended_use": "Research: synthetic training images for chest X-ray classifiers. Not for clinical use.",
        "data_source": str(training["config"].get("data.manifest") or "not recorded (the embedded phantoms)"),
        "data_type": "image files (PNG, JPEG or DICOM) ingested by cxr-vaegan",
        "references": [
            "Larsen et al. Autoencoding beyond pixels using a learned similarity metric. ICML 2016.",
            "Ghosh et al. From variational to deterministic autoencoders. ICLR 2020 (the fitted prior).",
        ],
        "image_size": size,
        "latent_dim": args["latent_dim"],
        "label_names": names,
        "training": training,
        "quality": dict(fidelity),
        "eval_metrics": {"class_fidelity_auroc": fidelity["class_fidelity_auroc"]},
        "weights": {"file": "models/model.pt", "sha256": weights_sha, "format": "state dict, tensors only"},
        "network_data_format": _data_format(args),
    }


def _inference_config(args: dict) -> dict:
    """``configs/inference.json``: the network is loaded from ``scripts/cxr_generator.py`` by its path
    under ``bundle_root`` (no import path to set up, no clash with another bundle's ``scripts``).
    No expression that holds a reference may contain the word "import": MONAI parses those as
    Python before it substitutes the references."""
    code = os.path.join("scripts", CODE_FILE)
    return {
        "imports": ["$import os", "$import torch", "$from importlib import util as module_util"],
        "bundle_root": ".",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "label": "balanced",
        "n": 16,
        "seed": 0,
        "batch_size": 256,
        "prior": "fitted",
        "output_dir": "$os.path.join(@bundle_root, 'eval')",
        "code_spec": (
            f"$module_util.spec_from_file_location('cxr_vaegan_bundle', os.path.join(@bundle_root, {code!r}))"
        ),
        "code": "$(lambda m: @code_spec.loader.exec_module(m) or m)(module_util.module_from_spec(@code_spec))",
        "network_def": {"_target_": "$@code.CXRGenerator", **args},
        "checkpoint": "$os.path.join(@bundle_root, 'models', 'model.pt')",
        "network": "$@code.load_weights(@network_def, @checkpoint, @device)",
        "run": ["$@code.write_pngs(@network, @label, @n, @seed, @output_dir, @batch_size, @prior)"],
    }


def _readme(meta: dict, args: dict) -> str:
    """``docs/README.md``: what the bundle is, how to run and check it, its data and quality."""
    t = meta["training"]
    names = ", ".join(f"{k} = {v}" for k, v in meta["label_names"].items()) or "none (unconditioned)"
    label = next(reversed(meta["label_names"].values()), "balanced")  # an example --label
    return f"""# {meta["name"]} ({meta["task"]})

{meta["description"]}

Classes: {names}. Output: `[B, 1, {args["image_size"]}, {args["image_size"]}]` float32 in `[-1, 1]`.

## Run

Needs torch, MONAI, NumPy, Pillow and `fire` (MONAI's command line); not cxr-vaegan, no network.

    python -m monai.bundle run --config_file BUNDLE/configs/inference.json --bundle_root BUNDLE \\
        --label {label} --n 8 --seed 0 --output_dir OUT

writes `OUT/syn_000000_<class>.png` ... (8-bit grey) and `OUT/labels.csv` (file, index, label,
label_name, seed, prior). `--label` takes a class name, an index or `balanced` (the default);
`--prior normal` draws codes from N(0, I) instead of the fitted prior. The same seed gives the
images `python -m pipeline.run generate checkpoint=... n=8 label={label} seed=0` gives.

From Python: `ConfigParser` (`parser.read_config("BUNDLE/configs/inference.json")`,
`parser["bundle_root"] = "BUNDLE"`, `parser.get_parsed_content("network")`) gives the loaded
network; `monai.bundle.load(name, bundle_dir=PARENT, workflow_type="inference")` run from inside
the bundle folder (its `bundle_root` is `.`), or with `model=`, gives it too (call `.eval()`).

## Files

- `models/model.pt`: the weights (a state dict of tensors, `torch.load(weights_only=True)`; no
  pickled code): the decoder ({t["weights"]}) and the latent prior ({t["prior"]}).
- `scripts/cxr_generator.py`: the network (`CXRGenerator`), loaded by `configs/inference.json`
  from its path under `bundle_root`.

{_readme_checks(meta, args)}

{_readme_provenance(meta)}

Synthetic images: never use them as patient data; not for diagnosis.
"""


def _readme_checks(meta: dict, args: dict) -> str:
    """The README's section on MONAI's bundle checks: which work offline."""
    image = "{'num_channels': " + str(args["latent_dim"]) + ", 'spatial_shape': [], 'dtype': 'float32'}"
    labels_arg = " --extra_forward_args \"{'labels': 0}\"" if meta["label_names"] else ""
    return f"""## Checks

- `python -m monai.bundle verify_net_in_out network_def --meta_file BUNDLE/configs/metadata.json
  --config_file BUNDLE/configs/inference.json --bundle_root BUNDLE --device cpu
  --_meta_#network_data_format#inputs#image "{image}"{labels_arg}`
  works offline (it reads an input named `image`: the override points it at the latent input).
- `python -m monai.bundle verify_metadata --meta_file BUNDLE/configs/metadata.json --filepath
  schema.json` downloads MONAI's schema (`schema` in metadata.json) and needs the `jsonschema`
  package: it does not work offline."""


def _readme_provenance(meta: dict) -> str:
    """The README's section on where the generator comes from and how good it is."""
    t, q = meta["training"], meta["quality"]
    fid = q["class_fidelity_auroc"]
    fid_text = q["measured_by"] if fid is None else f"{fid:.3f} ({q['measured_by']})"
    forced = (
        f"\n\n**Exported with force=true below min_fidelity={q['min_fidelity']}: its images often do "
        "not show their label.**"
        if q["forced"]
        else ""
    )
    facts = "\n".join(f"- {k}: {v}" for k, v in t["config"].items())
    return f"""## Provenance and quality

- source: {t["source"]} (sha256 {t["source_sha256"]}), MLflow run {t["mlflow_run_id"]},
  code {t["code_version"]}, epoch {t["epoch"]}, step {t["step"]}
{facts}
- class fidelity (a real-only classifier's AUROC on the images' intended labels): {fid_text}{forced}"""


def write_bundle(
    staging: Path, cfg: ExportConfig, loaded: LoadedGenerator, args: dict, training: dict, fidelity: dict
) -> dict:
    """Every file of the bundle under ``staging``; returns the metadata."""
    for sub in ("configs", "models", "scripts", "docs"):
        (staging / sub).mkdir()
    weights = staging / "models" / "model.pt"
    torch.save({k: v.detach().cpu().contiguous() for k, v in loaded.generator.state_dict().items()}, weights)
    sha = file_sha256(weights)
    (staging / "scripts" / "__init__.py").write_text('"""The network of this bundle: cxr_generator."""\n')
    (staging / "scripts" / CODE_FILE).write_text(BUNDLE_CODE)
    meta = _metadata(cfg, args, training, fidelity, sha)
    dump = {"indent": 2, "ensure_ascii": False}
    (staging / "configs" / "metadata.json").write_text(json.dumps(meta, **dump) + "\n", encoding="utf-8")
    config = _inference_config(args)
    (staging / "configs" / "inference.json").write_text(json.dumps(config, **dump) + "\n", encoding="utf-8")
    (staging / "docs" / "README.md").write_text(_readme(meta, args), encoding="utf-8")
    return meta


def self_check(staging: Path, loaded: LoadedGenerator, args: dict) -> None:
    """The written bundle's code and weights (read ``weights_only``) must give ``loaded``'s images,
    to the bit, for a few images of each class; else nothing is exported."""
    spec = importlib.util.spec_from_file_location(
        f"cxr_bundle_check_{secrets.token_hex(4)}", staging / "scripts" / CODE_FILE
    )
    code = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(code)
    net = code.load_weights(code.CXRGenerator(**args), staging / "models" / "model.pt")
    k = loaded.num_classes
    labels = np.arange(2 * k) % k if k else np.full(4, -1)
    got = code.sample(net, labels, seed=0, prior="fitted")
    want = loaded.generator.sample(torch.as_tensor(labels) if k else None, n=len(labels), seed=0)
    if not torch.equal(got, want):
        diff = (
            (got - want).abs().max().item()
            if got.shape == want.shape
            else f"shapes {got.shape}, {want.shape}"
        )
        raise RuntimeError(
            f"bundle self-check: the bundle's images differ from {loaded.source}'s (max |diff| {diff}); "
            "nothing was exported. This is a bug of the export: please report it with the checkpoint"
        )
