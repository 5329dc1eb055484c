"""VAE-GAN networks from MONAI blocks (Larsen et al. 2016, "Autoencoding beyond pixels").

* :class:`Encoder`: strided MONAI ``Convolution`` stack (VarAutoEncoder style) -> ``(mu, logvar)``.
* :class:`Decoder`: the generator; linear -> transposed ``Convolution`` stack -> ``tanh`` image.
* :class:`Discriminator`: MONAI ``PatchDiscriminator`` that also exposes its intermediate features
  (Larsen's feature-wise reconstruction loss is measured in one of them).

A VarAutoEncoder-style conv stack was chosen over ``AutoencoderKL`` because it trains several
times faster on CPU at equal size; see ``benchmarks/``.
"""

from __future__ import annotations

import inspect
import math

import torch
from monai.networks.blocks import ADN, Convolution
from monai.networks.nets import PatchDiscriminator
from torch import nn

from networks.config import (  # also re-exported; the config lives in networks.config
    HEADS,
    PRIORS,
    LossConfig,
    ModelConfig,
)
from networks.ema import EMA
from networks.fused import extension, fuse_adn
from networks.layers import FewInputConv2d, FewOutputConv2d, adopt, set_gemm
from networks.losses import kl_divergence, pixel_l1
from networks.objective import DISC_CALLS, vaegan_losses
from networks.prior import LatentPrior

SUPPORTED_SIZES = (16, 32, 64, 128, 256)


def _check_size(image_size: int) -> int:
    if image_size not in SUPPORTED_SIZES:
        raise ValueError(f"image_size must be one of {SUPPORTED_SIZES}, got {image_size}")
    return int(math.log2(image_size)) - 2  # downsample to 4x4


NORMS = ("BATCH", "INSTANCE", "NONE")


def _check_norm(norm: str) -> str | None:
    if norm.upper() not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    return None if norm.upper() == "NONE" else norm.upper()


def _channels(n: int, base: int, cap: int) -> list[int]:
    return [min(base * 2**i, cap) for i in range(n)]


def _check_common(
    latent_dim: int, base_channels: int, max_channels: int, num_classes: int, embed_dim: int
) -> None:
    if latent_dim < 1:
        raise ValueError(f"latent_dim must be >= 1, got {latent_dim}")
    if base_channels < 1:
        raise ValueError(f"base_channels must be >= 1, got {base_channels}")
    if max_channels < base_channels:
        raise ValueError(f"max_channels ({max_channels}) must be >= base_channels ({base_channels})")
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    if num_classes > 0 and embed_dim < 1:
        raise ValueError(f"embed_dim must be >= 1 when num_classes > 0, got {embed_dim}")


def upgrade_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Translate a state dict written before the conv bias in front of each norm was dropped.

    Such a bias only shifts what the norm subtracts: batch norm in training mode and instance norm
    remove it exactly, and batch norm's eval mode does once it is folded into the running mean
    (``(x + b - m) == (x - (m - b))``). So old checkpoints load into the new layers unchanged in
    function.
    """
    own = module.state_dict()
    out = dict(state)
    for key, bias in state.items():
        if not key.endswith("conv.bias") or key in own:
            continue
        prefix = key[: -len("conv.bias")]
        if prefix + "conv.weight" not in own:
            continue  # not a layer of this module: leave it for load_module_state to report
        mean = prefix + "adn.N.running_mean"
        if mean in out:
            out[mean] = out[mean] - bias.to(out[mean].dtype)
        del out[key]
    return out


class Encoder(nn.Module):
    """``x [B, 1, S, S]`` (and labels ``[B]`` when conditioned) -> ``(mu, logvar)``, each ``[B, latent_dim]``."""

    def __init__(
        self,
        image_size: int = 64,
        latent_dim: int = 128,
        base_channels: int = 32,
        max_channels: int = 256,
        num_classes: int = 0,
        embed_dim: int = 16,
        in_channels: int = 1,
        norm: str = "BATCH",
    ) -> None:
        super().__init__()
        n_down = _check_size(image_size)
        _check_common(latent_dim, base_channels, max_channels, num_classes, embed_dim)
        norm_arg = _check_norm(norm)
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        chans = _channels(n_down, base_channels, max_channels)
        layers, c_in = [], in_channels
        for c in chans:
            layers.append(
                Convolution(
                    2,
                    c_in,
                    c,
                    strides=2,
                    kernel_size=3,
                    act=("leakyrelu", {"negative_slope": 0.2, "inplace": True}),
                    norm=norm_arg,
                    # a bias before batch/instance norm is subtracted right back out by the
                    # norm; its gradient alone is a measurable share of a CPU step (old checkpoints:
                    # upgrade_state_dict)
                    bias=norm_arg is None,
                )
            )
            c_in = c
        self.conv = nn.Sequential(*layers)
        self.num_classes = num_classes
        self.embed = nn.Embedding(num_classes, embed_dim) if num_classes > 0 else None
        flat = chans[-1] * 4 * 4 + (embed_dim if num_classes > 0 else 0)
        self.fc = nn.Linear(flat, 2 * latent_dim)
        self.latent_dim = latent_dim

    upgrade_state_dict = upgrade_state_dict

    def forward(
        self, x: torch.Tensor, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.conv(x).flatten(1)
        if self.embed is not None:
            if labels is None:
                raise ValueError("this encoder is class-conditioned: pass labels")
            h = torch.cat([h, self.embed(labels)], dim=1)
        mu, logvar = self.fc(h).chunk(2, dim=1)
        # clamp keeps exp(logvar) finite early in training, when the encoder is still random
        return mu, logvar.clamp(-30.0, 20.0)


@torch.no_grad()
def _icnr_(weight: torch.Tensor, bias: torch.Tensor | None, scale: int = 2) -> None:
    """ICNR initialisation (Aitken et al. 2017): the ``scale**2`` sub-pixel filters of each output
    channel start equal, so PixelShuffle starts as a nearest-neighbour upsampling of one
    convolution, free of checkerboard artefacts."""
    out = weight.shape[0] // scale**2
    sub = torch.empty(out, *weight.shape[1:])
    nn.init.kaiming_uniform_(sub, a=5**0.5)  # Conv2d's own default initialisation
    weight.copy_(sub.repeat_interleave(scale**2, dim=0))
    if bias is not None:
        bias.copy_(bias.view(out, scale**2)[:, :1].expand(out, scale**2).reshape(-1))


class Decoder(nn.Module):
    """The generator: ``z [B, latent_dim]`` (and labels) -> image ``[B, 1, S, S]`` in ``[-1, 1]``."""

    def __init__(
        self,
        image_size: int = 64,
        latent_dim: int = 128,
        base_channels: int = 32,
        max_channels: int = 256,
        num_classes: int = 0,
        embed_dim: int = 16,
        out_channels: int = 1,
        norm: str = "BATCH",
        head: str = "deconv",
    ) -> None:
        super().__init__()
        n_up = _check_size(image_size)
        _check_common(latent_dim, base_channels, max_channels, num_classes, embed_dim)
        norm_arg = _check_norm(norm)
        if out_channels < 1:
            raise ValueError(f"out_channels must be >= 1, got {out_channels}")
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        chans = _channels(n_up, base_channels, max_channels)[::-1]  # e.g. 256,128,64,32
        self.num_classes = num_classes
        self.latent_dim = latent_dim
        self.image_size = image_size
        self.embed = nn.Embedding(num_classes, embed_dim) if num_classes > 0 else None
        self.start_channels = chans[0]
        self.fc = nn.Linear(latent_dim + (embed_dim if num_classes > 0 else 0), chans[0] * 4 * 4)
        layers: list[nn.Module] = []
        outs = [*chans[1:], chans[-1]]
        if head == "subpixel":  # the last doubling is done by the output layer itself
            chans, outs = chans[:-1], outs[:-1]
        for c_in, c_out in zip(chans, outs, strict=True):
            layers.append(
                Convolution(
                    2,
                    c_in,
                    c_out,
                    strides=2,
                    kernel_size=3,
                    is_transposed=True,
                    output_padding=1,
                    act=("relu", {"inplace": True}),
                    norm=norm_arg,
                    bias=norm_arg is None,
                )
            )
        c_last = outs[-1] if outs else chans[0]
        if head == "subpixel":
            # the depth the dropped full-resolution stage had, spent at half resolution
            layers.append(
                Convolution(
                    2,
                    c_last,
                    c_last,
                    kernel_size=3,
                    act=("relu", {"inplace": True}),
                    norm=norm_arg,
                    bias=norm_arg is None,
                )
            )
            out = Convolution(2, c_last, out_channels * 4, kernel_size=3, conv_only=True)
            out.conv = adopt(out.conv, FewOutputConv2d)
            _icnr_(out.conv.weight, out.conv.bias)
            layers += [out, nn.PixelShuffle(2)]
        else:
            out = Convolution(2, c_last, out_channels, kernel_size=3, conv_only=True)
            # many channels -> one at full resolution: oneDNN's slowest layer here (networks/layers.py)
            out.conv = adopt(out.conv, FewOutputConv2d)
            layers.append(out)
        self.deconv = nn.Sequential(*layers)

    upgrade_state_dict = upgrade_state_dict

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            if labels is None:
                raise ValueError("this decoder is class-conditioned: pass labels")
            z = torch.cat([z, self.embed(labels)], dim=1)
        h = torch.relu(self.fc(z)).view(-1, self.start_channels, 4, 4)
        return torch.tanh(self.deconv(h))


class Discriminator(nn.Module):
    """MONAI ``PatchDiscriminator`` -> ``(logits [B, 1, h, w], features list)``.

    ``features`` are the activations after each hidden layer (the output layer excluded), coarse
    last; the feature-wise reconstruction loss picks one of them.
    """

    def __init__(
        self,
        image_size: int = 64,
        channels: int = 32,
        num_layers: int = 0,
        norm: str = "INSTANCE",
        in_channels: int = 1,
        num_classes: int = 0,
    ) -> None:
        """``num_classes > 0``: projection-style class conditioning (Miyato & Koyama, ICLR 2018):
        each patch logit gains ``<embed(y), mean-pooled last features>``, so the discriminator
        judges "a real image of class y" rather than "a real image" (an auxiliary classifier
        instead loses within-class diversity when classes overlap, as normal and pneumonia do)."""
        super().__init__()
        _check_size(image_size)
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        if num_layers == 0:
            num_layers = {16: 1, 32: 2, 64: 3, 128: 4, 256: 5}[image_size]
        # each layer but the last halves the size, after the initial stride-2 conv: keep >= 4 px
        if num_layers < 1 or image_size // 2**num_layers < 4:
            raise ValueError(f"num_layers={num_layers} is too deep for image_size={image_size}")
        if norm.upper() not in ("INSTANCE", "BATCH", "GROUP", "LAYER", "NONE"):
            raise ValueError(f"norm must be INSTANCE, BATCH, GROUP, LAYER or NONE, got {norm!r}")
        self.net = PatchDiscriminator(
            spatial_dims=2,
            channels=channels,
            in_channels=in_channels,
            out_channels=1,
            num_layers_d=num_layers,
            norm=None if norm.upper() == "NONE" else norm,
        )
        # the image -> first features conv: its input gradient (the decoder's training signal)
        # is slow in oneDNN with one input channel (networks/layers.py)
        self.net.initial_conv.conv = adopt(self.net.initial_conv.conv, FewInputConv2d)
        self.net.final_conv.conv = adopt(self.net.final_conv.conv, FewOutputConv2d)
        self.num_features = num_layers + 1
        self.embed = None
        if num_classes > 0:
            # the last hidden layer's width is what the final conv reads
            width = self.net.final_conv.conv.in_channels
            self.embed = nn.Embedding(num_classes, width)
            nn.init.zeros_(self.embed.weight)  # starts unconditional; learns what each class adds

    def forward(
        self, x: torch.Tensor, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        outs = self.net(x)
        logits, feats = outs[-1], outs[:-1]
        if self.embed is not None and labels is not None:
            proj = (self.embed(labels) * feats[-1].float().mean(dim=(2, 3))).sum(dim=1)
            logits = logits + proj.to(logits.dtype)[:, None, None, None]
        return logits, feats


class Generator(nn.Module):
    """Decoder and latent prior packaged for export (MLflow model): ``(z, labels) -> images``;
    :meth:`sample` draws codes from the prior (:class:`networks.prior.LatentPrior`) and decodes them.

    Exported as data only: :meth:`export_spec` (JSON: architecture and label names) plus
    ``state_dict()`` (the decoder's weights and the prior's buffers; tensors, loadable with
    ``torch.load(weights_only=True)``); :meth:`from_spec` rebuilds it. Nothing of it is ever pickled.
    """

    SPEC_FORMAT = "cxr-vaegan-generator"
    SPEC_VERSION = 2  # 2: weights = decoder.* + prior.*; 1 (decoder weights only) still loads

    def __init__(
        self, decoder: Decoder, label_names: dict[int, str] | None = None, prior: LatentPrior | None = None
    ) -> None:
        super().__init__()
        self.decoder = decoder
        self.prior = prior if prior is not None else LatentPrior(decoder.latent_dim, decoder.num_classes)
        # travels with the MLflow model, so `generate label=pneumonia` works from a model URI
        self.label_names = dict(label_names or {})

    def export_spec(self, model_cfg: ModelConfig) -> dict:
        """The JSON-able description :meth:`from_spec` rebuilds the module from."""
        return {
            "format": self.SPEC_FORMAT,
            "version": self.SPEC_VERSION,
            "decoder": {**autoencoder_kwargs(model_cfg), "head": model_cfg.decoder_head},
            "label_names": {str(k): str(v) for k, v in self.label_names.items()},
        }

    @classmethod
    def from_spec(cls, spec: dict, state: dict[str, torch.Tensor]) -> Generator:
        """Rebuild from :meth:`export_spec`'s dict and :meth:`state_dict` (strict)."""
        if not isinstance(spec, dict) or spec.get("format") != cls.SPEC_FORMAT:
            raise ValueError(f"not a {cls.SPEC_FORMAT} spec")
        if spec.get("version") not in (1, cls.SPEC_VERSION):
            raise ValueError(f"{cls.SPEC_FORMAT} spec version {spec.get('version')!r} is not supported")
        kwargs = spec.get("decoder")
        if not isinstance(kwargs, dict) or not set(kwargs) <= set(inspect.signature(Decoder).parameters):
            raise ValueError("generator spec: 'decoder' must map Decoder argument names to values")
        names = {int(k): str(v) for k, v in (spec.get("label_names") or {}).items()}
        gen = cls(Decoder(**kwargs), names)
        if spec["version"] == 1:  # exported before the fitted prior: decoder weights, N(0, I) codes
            gen.decoder.load_state_dict(state, strict=True)
        else:
            gen.load_state_dict(state, strict=True)
        return gen.eval()  # an exported generator is for inference: batch norm uses its running stats

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.decoder(z, labels)

    @torch.no_grad()
    def sample(
        self,
        labels: torch.Tensor | None,
        n: int | None = None,
        seed: int = 0,
        prior: str = "fitted",
        batch_size: int = 256,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """``n`` images (``len(labels)`` when labels are given), ``[N, 1, S, S]`` in ``[-1, 1]`` on
        the CPU, deterministic in ``seed``. ``prior``: ``fitted`` draws from the fitted prior when
        this generator carries one (else N(0, I)), ``normal`` always from N(0, I). ``temperature``
        scales the prior's spread (its standard normal draws) around each class mean."""
        if prior not in PRIORS:
            raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}")
        n = len(labels) if labels is not None else n
        if n is None or n < 0:
            raise ValueError("sample needs labels or n >= 0")
        eps = torch.randn(n, self.decoder.latent_dim, generator=torch.Generator().manual_seed(seed))
        if temperature != 1.0:
            eps = eps * temperature
        dev = next(self.decoder.parameters()).device
        out = []
        for i in range(0, n, batch_size):
            e = eps[i : i + batch_size].to(dev)
            y = (
                None
                if labels is None or self.decoder.num_classes == 0
                else labels[i : i + batch_size].to(dev)
            )
            z = self.prior(e, y) if prior == "fitted" else e
            out.append(self.decoder(z, y).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, 1, self.decoder.image_size, self.decoder.image_size)


def autoencoder_kwargs(cfg: ModelConfig) -> dict:
    """The constructor arguments shared by :class:`Encoder` and :class:`Decoder`."""
    return dict(
        image_size=cfg.image_size,
        latent_dim=cfg.latent_dim,
        base_channels=cfg.base_channels,
        max_channels=cfg.max_channels,
        num_classes=cfg.num_classes,
        embed_dim=cfg.embed_dim,
        norm=cfg.norm,
    )


class VAEGAN(nn.Module):
    """Encoder + decoder (+ discriminator when ``kind == 'vaegan'``) + the latent prior that
    generation draws from (:class:`networks.prior.LatentPrior`, fitted by :meth:`fit_prior`)."""

    def __init__(self, cfg: ModelConfig, disc_calls: str = "auto") -> None:
        """``disc_calls``: how real, reconstructed and prior images go through the discriminator
        (:func:`networks.objective.split_discriminator`): ``auto`` (three calls on CPU and from
        256 px, else one), ``split`` or ``joint``; the same values either way."""
        super().__init__()
        if disc_calls not in DISC_CALLS:
            raise ValueError(f"disc_calls must be one of {DISC_CALLS}, got {disc_calls!r}")
        self.cfg = cfg
        self.disc_calls = disc_calls
        self.channels_last = False  # set by to_channels_last(): the step then feeds NHWC batches
        self.encoder = Encoder(**autoencoder_kwargs(cfg))
        self.decoder = Decoder(**autoencoder_kwargs(cfg), head=cfg.decoder_head)
        self.prior = LatentPrior(cfg.latent_dim, cfg.num_classes)
        # averaged copies of encoder and decoder (model.ema_decay > 0): what inference uses
        self.ema = (
            EMA({"encoder": self.encoder, "decoder": self.decoder}, cfg.ema_decay)
            if cfg.ema_decay > 0
            else None
        )
        self.discriminator = (
            Discriminator(
                cfg.image_size,
                cfg.disc_channels,
                cfg.disc_layers,
                cfg.disc_norm,
                num_classes=cfg.num_classes if cfg.disc_conditioning == "projection" else 0,
            )
            if cfg.kind == "vaegan"
            else None
        )
        if self.discriminator is not None:
            n = self.discriminator.num_features
            if not -n <= cfg.feature_layer < n:
                raise ValueError(
                    f"feature_layer={cfg.feature_layer} out of range for {n} discriminator feature maps"
                )

    def fuse_norm_act(self) -> VAEGAN:
        """On CPU, turn every norm + (Leaky)ReLU pair into one fused module (networks/fused.py;
        same state_dict); a no-op on other devices. Not done at construction: on CUDA, DDP's
        ``SyncBatchNorm.convert_sync_batchnorm`` replaces every batch norm, a fused one too, and
        would drop the activation fused into it."""
        if next(self.parameters()).device.type == "cpu":
            for m in self.modules():
                if isinstance(m, ADN):
                    fuse_adn(m)
        return self

    def update_ema(self) -> None:
        """Move the averaged encoder and decoder towards the live ones (after an optimiser step)."""
        if self.ema is not None:
            self.ema.update({"encoder": self.encoder, "decoder": self.decoder})

    def averaged(self, name: str) -> nn.Module:
        """The network inference uses: the averaged ``encoder``/``decoder`` when there is one."""
        return self.ema.nets[name] if self.ema is not None else getattr(self, name)

    def use_gemm_convs(self, enabled: bool) -> VAEGAN:
        """Run the few-channel convolutions as GEMMs on CPU, or as ``nn.Conv2d`` does (the speed
        measure ``gemm_convs``; networks/layers.py); the same values either way."""
        set_gemm(self, enabled)
        return self

    def to_channels_last(self) -> VAEGAN:
        """channels_last everywhere, except the discriminator on a CPU without the fused kernel
        (networks/fused.py): eager instance norm copies every channels_last activation to NCHW and
        back, which costs more than oneDNN gains (~3 % slower steps); with the kernel, channels_last
        is ~4 % faster (its first two convolutions run faster backward)."""
        self.channels_last = True
        self.encoder.to(memory_format=torch.channels_last)
        self.decoder.to(memory_format=torch.channels_last)
        if self.ema is not None:
            self.ema.to(memory_format=torch.channels_last)
        if self.discriminator is not None:
            on_cpu = next(self.discriminator.parameters()).device.type == "cpu"
            # eager instance norm: the kernel is off or missing, or fuse_norm_act() was not called
            unfused = any(type(m) is nn.InstanceNorm2d for m in self.discriminator.modules())
            eager_norm = on_cpu and (unfused or extension() is None)
            self.discriminator.to(
                memory_format=torch.contiguous_format if eager_norm else torch.channels_last
            )
        return self

    @staticmethod
    def reparameterize(
        mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``mu + eps * sigma``; ``eps`` is drawn here unless given (replicas pass their slice)."""
        return mu + (torch.randn_like(mu) if eps is None else eps) * torch.exp(0.5 * logvar)

    def generator(self, label_names: dict[int, str] | None = None) -> Generator:
        """The decoder (averaged, when there is an average) and prior, shared, not copied, as an
        exportable :class:`Generator`."""
        return Generator(self.averaged("decoder"), label_names, self.prior)

    @torch.no_grad()
    def fit_prior(self, batches, device: torch.device | str = "cpu") -> bool:
        """Fit the prior to the aggregate posterior of ``batches`` (``{"image", "label"}`` dicts, e.g.
        the unaugmented training set) when ``cfg.prior == "fitted"``; returns whether it did."""
        if self.cfg.prior != "fitted":
            return False
        encoder = self.averaged("encoder")  # the codes the exported generator's decoder expects
        was_training = encoder.training
        encoder.eval()
        mus, logvars, ys = [], [], []
        for b in batches:
            y = torch.as_tensor(b["label"]).long().clamp_min(0)
            mu, logvar = encoder(
                b["image"].to(device).float(), y.to(device) if self.cfg.num_classes else None
            )
            mus.append(mu.float().cpu())
            logvars.append(logvar.float().cpu())
            ys.append(y)
        encoder.train(was_training)
        self.prior.fit(torch.cat(mus), torch.cat(ys), torch.cat(logvars))
        return True

    def encode(
        self, x: torch.Tensor, labels: torch.Tensor | None = None, averaged: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, logvar)`` of the posterior, each ``[B, latent_dim]`` (``averaged``: by the
        averaged encoder when there is one)."""
        enc = self.averaged("encoder") if averaged else self.encoder
        return enc(x, labels if self.cfg.num_classes else None)

    def decode(
        self, z: torch.Tensor, labels: torch.Tensor | None = None, averaged: bool = False
    ) -> torch.Tensor:
        """Images in ``[-1, 1]`` from codes ``[B, latent_dim]`` (``averaged``: as for :meth:`encode`)."""
        dec = self.averaged("decoder") if averaged else self.decoder
        return dec(z, labels if self.cfg.num_classes else None)

    def reconstruct(
        self, x: torch.Tensor, labels: torch.Tensor | None = None, averaged: bool = False
    ) -> torch.Tensor:
        """The posterior-mean reconstruction of ``x``."""
        return self.decode(self.encode(x, labels, averaged)[0], labels, averaged)

    def sample(self, labels: torch.Tensor | None, n: int | None = None, seed: int = 0, prior: str = "fitted"):
        """``n`` images drawn from the prior (fitted, when it is), see :meth:`Generator.sample`."""
        return self.generator().sample(labels, n=n, seed=seed, prior=prior)

    @torch.no_grad()
    def validation_scores(self, batches, device: torch.device) -> dict[str, float]:
        """Reconstruction quality over ``batches`` (dicts of ``image``/``label``): SSIM and PSNR of
        the posterior mean's reconstruction (images in [0, 1], the averaged networks), its pixel
        L1 and the KL term, each averaged over the images; keys ``val/...``."""
        from monai.metrics import PSNRMetric, SSIMMetric

        self.eval()
        size = self.cfg.image_size
        win = 11 if size >= 64 else 7 if size >= 32 else 3
        ssim, psnr = SSIMMetric(spatial_dims=2, data_range=1.0, win_size=win), PSNRMetric(max_val=1.0)
        sums: dict[str, float] = {}
        n = 0
        for batch in batches:
            x = batch["image"].to(device)
            y = batch["label"].to(device).clamp_min(0)
            mu, logvar = self.encode(x, y, averaged=True)
            recon = self.decode(mu, y, averaged=True)  # the posterior mean's reconstruction
            a, b = (recon.float() + 1) / 2, (x + 1) / 2
            ssim(a, b)
            psnr(a, b)
            bs = x.shape[0]
            sums["kl"] = sums.get("kl", 0.0) + float(kl_divergence(mu, logvar, x[0].numel())) * bs
            sums["pixel_l1"] = sums.get("pixel_l1", 0.0) + float(pixel_l1(recon, x)) * bs
            n += bs
        out = {f"val/{k}": v / max(n, 1) for k, v in sums.items()}
        out["val/ssim"] = float(ssim.aggregate().item())
        out["val/psnr"] = float(psnr.aggregate().item())
        return out

    def objective(
        self,
        x: torch.Tensor,
        labels: torch.Tensor | None,
        lcfg: LossConfig,
        amp: torch.dtype | None = None,
        noise: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The VAE-GAN's losses on one batch (:func:`networks.objective.vaegan_losses`): named terms
        and one total per network, which :func:`networks.objective.route_gradients` applies."""
        return vaegan_losses(self, x, labels, lcfg, amp, noise)

    def forward(
        self, x: torch.Tensor, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns ``(reconstruction, mu, logvar, z)`` with a sampled ``z``."""
        mu, logvar = self.encoder(x, labels)
        z = self.reparameterize(mu, logvar)
        return self.decoder(z, labels), mu, logvar, z
