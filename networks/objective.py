"""The VAE-GAN objective (Larsen et al. 2016, "Autoencoding beyond pixels"): the loss terms of one
forward pass, their composition into one loss per network, and the routing of each loss into its
own network's parameters.

* encoder <- KL + feature-wise reconstruction (in a discriminator layer, + optional pixel L1);
* decoder <- gamma x reconstruction + adversarial weight x generator loss (on reconstructions and
  prior samples);
* discriminator <- the adversarial loss only.

With ``loss.diffaug`` the discriminator sees real, reconstructed and prior images through the same
differentiable augmentation (:mod:`networks.diffaug`); the pixel terms see them unaugmented.

The plain VAE (``model.kind == "vae"``, no discriminator) trains encoder and decoder together on
pixel L1 + KL. The terms themselves are pure functions in :mod:`networks.losses`; the model calls
this file through :meth:`networks.vaegan.VAEGAN.objective`.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from networks.config import LossConfig
from networks.config import diffaug_policy as parse_policy
from networks.diffaug import diff_augment
from networks.losses import (
    discriminator_adversarial,
    feature_reconstruction,
    generator_adversarial,
    kl_divergence,
    pixel_l1,
)

DISC_CALLS = ("auto", "split", "joint")  # how real, reconstructed and prior images meet the discriminator
GROUP_LOSSES = ("encoder", "decoder", "discriminator")  # the per-network totals; the rest are terms


def split_discriminator(model: nn.Module, x: torch.Tensor) -> bool:
    """Call the discriminator three times (real, reconstructed, prior) rather than once on the
    concatenated batch? The same values with a per-sample norm (instance, the default), but each
    backward pass then runs through only the parts it needs (faster on CPU and at 256 px on
    CUDA; docs/benchmarks.md); on CUDA below 256 px the step is bound by kernel launches, which
    three calls triple. A batch-normed discriminator must see one batch: always joint."""
    if model.cfg.disc_norm.upper() == "BATCH" or model.disc_calls == "joint":
        return False
    return model.disc_calls == "split" or x.device.type != "cuda" or x.shape[-1] >= 256


def vaegan_losses(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None,
    lcfg: LossConfig,
    amp: torch.dtype | None = None,
    noise: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """One forward pass of ``model`` (a :class:`networks.vaegan.VAEGAN`) -> named losses,
    including the per-network totals :data:`GROUP_LOSSES`.

    ``noise = (eps, z_prior)``, each ``[B, latent_dim]``, fixes the reparameterisation noise and
    the prior codes (replicas under torchrun take their slice of one global draw); by default both
    are drawn here.
    """
    cond = y if model.cfg.num_classes > 0 else None
    npix = x[0].numel()
    ctx = torch.autocast(x.device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    with ctx:
        mu, logvar = model.encoder(x, cond)
        z = model.reparameterize(mu.float(), logvar.float(), None if noise is None else noise[0])
        kl = kl_divergence(mu.float(), logvar.float(), per_pixel=npix)
        if model.discriminator is None:
            recon = model.decoder(z, cond)
            pix = pixel_l1(recon.float(), x)
            total = (
                lcfg.pixel_l1 * pix + lcfg.kl_weight * kl if lcfg.pixel_l1 > 0 else pix + lcfg.kl_weight * kl
            )
            return {"kl": kl, "pixel_l1": pix, "encoder": total, "decoder": total}
        b = x.shape[0]
        z_p = torch.randn_like(z) if noise is None else noise[1]
        out = model.decoder(torch.cat([z, z_p]), None if cond is None else torch.cat([cond, cond]))
        recon = out[:b]  # out[b:] are the prior samples
        policy = parse_policy(lcfg.diffaug)
        if policy:  # what the discriminator sees, augmented alike (DiffAugment)
            d_in = diff_augment([x, recon, out[b:]], policy)
            x_d, out_d = d_in[0], torch.cat(d_in[1:])
        else:
            x_d, out_d = x, out
        if split_discriminator(model, x):
            (l_real, f_real), (l_rec, f_rec), (l_prior, _) = (
                model.discriminator(t, cond) for t in (x_d, out_d[:b], out_d[b:])
            )
            l_real, l_rec, l_prior = l_real.float(), l_rec.float(), l_prior.float()
            fl = model.cfg.feature_layer
            feat = feature_reconstruction(f_rec[fl].float(), f_real[fl].float())
        else:
            logits, feats = model.discriminator(
                torch.cat([x_d, out_d]), None if cond is None else torch.cat([cond, cond, cond])
            )
            logits = logits.float()
            l_real, l_rec, l_prior = logits[:b], logits[b : 2 * b], logits[2 * b :]
            f = feats[model.cfg.feature_layer].float()
            feat = feature_reconstruction(f[b : 2 * b], f[:b])
        pix = pixel_l1(recon.float(), x)
        rec = lcfg.feature * feat + lcfg.pixel_l1 * pix
        adv_g = 0.5 * (generator_adversarial(l_rec) + generator_adversarial(l_prior))
        adv_d = discriminator_adversarial(l_real, l_rec, l_prior)
    return {
        "kl": kl,
        "feature_rec": feat,
        "pixel_l1": pix,
        "adv_g": adv_g,
        "adv_d": adv_d,
        "d_real": torch.sigmoid(l_real).mean(),
        "d_fake": torch.sigmoid(torch.cat([l_rec, l_prior])).mean(),
        "encoder": lcfg.kl_weight * kl + rec,
        "decoder": lcfg.gamma * rec + lcfg.adversarial * adv_g,
        "discriminator": adv_d,
    }


def route_gradients(
    losses: dict[str, torch.Tensor],
    params: dict[str, list[torch.nn.Parameter]],
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """Back-propagate each network's loss into that network's parameters only (Larsen's routing):
    ``params`` maps ``encoder``/``decoder``(/``discriminator``) to their parameters.

    The plain VAE has one loss for encoder and decoder together: one backward pass.
    """
    if losses["encoder"] is losses["decoder"]:
        plan = [(losses["encoder"], params["encoder"] + params["decoder"])]
    else:
        plan = [(losses[name], params[name]) for name in params]
    for i, (loss, ps) in enumerate(plan):
        (scaler.scale(loss) if scaler is not None else loss).backward(
            inputs=ps, retain_graph=i < len(plan) - 1
        )
