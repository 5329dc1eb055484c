"""Where the decoder's latent codes are drawn from when it generates.

A VAE is trained to decode codes from its *posterior*; sampling assumes that the posterior codes,
pooled over the data, fill the N(0, I) prior. With a weak KL term (as in a VAE-GAN, where the
adversarial and feature losses dominate) they do not: the posterior means of a trained model
sit far from the origin with small spread, and N(0, I) codes land in "holes" the decoder never
saw, giving blurred or wrong-class images. Ghosh et al. (ICLR 2020, "From variational to
deterministic autoencoders") fit a density to the training set's posterior means after training
and sample from it instead, with no retraining. :class:`LatentPrior` does that with one Gaussian
per class (full covariance) matched to the moments of that class's aggregate posterior (the
mixture of the training images' posteriors N(mu_i, sigma_i^2): mean of mu, covariance of mu plus
the mean posterior variance, so an early model, whose posteriors are still wide, is not sampled
narrower than it was trained). The buffers travel in every ``state_dict``: checkpoints and
exported generators alike.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn


class LatentPrior(nn.Module):
    """N(0, I) until :meth:`fit`; then one Gaussian per class fitted to posterior means.

    ``forward(eps, labels)`` maps standard-normal noise to codes (``mean[y] + L[y] @ eps``), so
    the same seed gives the same noise whichever prior is used, and the unfitted prior is the
    identity.
    """

    def __init__(self, latent_dim: int, num_classes: int = 0) -> None:
        super().__init__()
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {latent_dim}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        k = max(num_classes, 1)  # an unconditioned model has one "class"
        self.latent_dim, self.num_classes = latent_dim, num_classes
        self.register_buffer("mean", torch.zeros(k, latent_dim))
        self.register_buffer("scale_tril", torch.eye(latent_dim).repeat(k, 1, 1))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @property
    def is_fitted(self) -> bool:
        return bool(self.fitted)

    @torch.no_grad()
    def fit(
        self,
        mu: torch.Tensor,
        labels: torch.Tensor | None = None,
        logvar: torch.Tensor | None = None,
        shrinkage: float = 0.0,
    ) -> LatentPrior:
        """Fit each class's Gaussian to its aggregate posterior: posterior means ``mu`` ``[N, D]``
        and (optional) log-variances ``logvar`` ``[N, D]``.

        ``shrinkage`` in [0, 1] pulls the covariance toward its diagonal. A small ridge (1e-3 of
        the mean variance) keeps it positive definite when a class has fewer codes than
        dimensions; the codes then spread within the span of its training codes.
        """
        if mu.ndim != 2 or mu.shape[1] != self.latent_dim:
            raise ValueError(f"mu must be [N, {self.latent_dim}], got {tuple(mu.shape)}")
        if not 0.0 <= shrinkage <= 1.0:
            raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")
        if logvar is not None and logvar.shape != mu.shape:
            raise ValueError(f"logvar must have mu's shape {tuple(mu.shape)}, got {tuple(logvar.shape)}")
        mu = mu.detach().double().cpu()
        var = None if logvar is None else logvar.detach().double().cpu().exp()
        y = torch.zeros(len(mu), dtype=torch.long) if self.num_classes == 0 else labels.detach().long().cpu()
        if len(mu) < 2:
            raise ValueError(f"fitting the prior needs >= 2 codes, got {len(mu)}")
        means, trils, pooled = [], [], []
        for c in range(self.mean.shape[0]):
            rows = y == c
            if int(rows.sum()) < 2:  # a class the data barely hold: all codes' Gaussian for it
                pooled.append(c)
                rows = torch.ones_like(rows)
            mc = mu[rows]
            cov = torch.cov(mc.T).reshape(self.latent_dim, self.latent_dim)
            cov = (1.0 - shrinkage) * cov + shrinkage * torch.diag(torch.diagonal(cov))
            if var is not None:  # the mixture's covariance: spread of the means + mean variance
                cov = cov + torch.diag(var[rows].mean(0))
            ridge = 1e-3 * torch.diagonal(cov).mean().clamp_min(1e-12)
            cov = cov + ridge * torch.eye(self.latent_dim, dtype=cov.dtype)
            means.append(mc.mean(0))
            trils.append(torch.linalg.cholesky(cov))
        if pooled:
            warnings.warn(
                f"prior: class(es) {pooled} have fewer than 2 training codes; they draw from the "
                "Gaussian fitted to all codes",
                stacklevel=2,
            )
        self.mean.copy_(torch.stack(means).to(self.mean))
        self.scale_tril.copy_(torch.stack(trils).to(self.scale_tril))
        self.fitted.fill_(True)
        return self

    def forward(self, eps: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Codes ``[N, D]`` from standard-normal ``eps`` ``[N, D]`` (returned as is when unfitted)."""
        if not self.is_fitted:
            return eps
        if labels is None or self.num_classes == 0:
            y = torch.zeros(len(eps), dtype=torch.long, device=eps.device)
        else:
            y = labels.long()
        tril = self.scale_tril.to(eps)[y]
        return self.mean.to(eps)[y] + (tril @ eps.unsqueeze(-1)).squeeze(-1)
