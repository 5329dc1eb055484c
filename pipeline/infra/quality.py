"""Synthesis-quality metrics: pure functions on feature or image tensors.

* Fréchet distance (the formula of ``monai.metrics.FIDMetric``, matrix root from SciPy) and kernel distances: MONAI's ``MMDMetric``
  (unbiased MMD² with a linear kernel) and KID (unbiased MMD² with the cubic polynomial kernel of
  Bińkowski et al. 2018), in the feature space of a classifier trained on real radiographs;
* precision / recall (Kynkäänniemi et al. 2019) and density / coverage (Naeem et al. 2020), k-NN;
* diversity: MS-SSIM of random pairs (``monai.metrics.MultiScaleSSIMMetric``);
* memorisation: nearest-neighbour distances to the generator's training set.

Their confidence intervals come from :func:`pipeline.infra.metrics.bootstrap`; the k-NN metrics are
means of per-sample indicators (:func:`prdc_indicators`), bootstrapped over samples with the
manifolds held fixed.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

Array = np.ndarray


def frechet_distance(fake: torch.Tensor, real: torch.Tensor, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``[N, D]``.

    MONAI's ``FIDMetric`` computes the same, but calls ``scipy.linalg.sqrtm(..., disp=False)``,
    which SciPy releases after 1.17 no longer accept (TypeError); ``sqrtm(A)`` works on all.
    """
    from scipy import linalg

    x, y = fake.double().cpu().numpy(), real.double().cpu().numpy()
    mu_x, mu_y = x.mean(0), y.mean(0)
    s_x, s_y = np.atleast_2d(np.cov(x, rowvar=False)), np.atleast_2d(np.cov(y, rowvar=False))
    with warnings.catch_warnings():  # singular products are expected (fewer samples than features)
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s_x @ s_y)
        if not np.isfinite(covmean).all():  # regularise as MONAI does
            off = np.eye(len(s_x)) * eps
            covmean = linalg.sqrtm((s_x + off) @ (s_y + off))
    if np.iscomplexobj(covmean):  # rounding leaves a tiny imaginary part; a large one is an error
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f"Fréchet distance: imaginary component {np.abs(covmean.imag).max():.3g} too large"
            )
        covmean = covmean.real
    diff = mu_x - mu_y
    return float(diff @ diff + np.trace(s_x) + np.trace(s_y) - 2 * np.trace(covmean))


def mmd_linear(fake: torch.Tensor, real: torch.Tensor) -> float:
    """MONAI's MMD (linear kernel) on features; needs equally many samples in both sets."""
    from monai.metrics import MMDMetric

    n = min(len(fake), len(real))
    return float(MMDMetric()(fake[:n].double(), real[:n].double()))


def kid(
    fake: torch.Tensor, real: torch.Tensor, subsets: int = 20, subset_size: int = 200, seed: int = 0
) -> float:
    """Kernel Inception-style distance: mean unbiased MMD² with k(x, y) = (x.y / d + 1)^3 over subsets."""
    x, y = fake.double(), real.double()
    d = x.shape[1]
    m = min(subset_size, len(x), len(y))
    if m < 2:
        raise ValueError(f"kid needs at least 2 samples per set, got {len(x)} and {len(y)}")
    g = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(subsets):
        a = x[torch.randperm(len(x), generator=g)[:m]]
        b = y[torch.randperm(len(y), generator=g)[:m]]
        kxx = (a @ a.T / d + 1) ** 3
        kyy = (b @ b.T / d + 1) ** 3
        kxy = (a @ b.T / d + 1) ** 3
        s = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
        vals.append(float(s - 2 * kxy.mean()))
    return float(np.mean(vals))


def _knn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of each row to its k-th nearest other row."""
    if len(x) <= k:
        raise ValueError(f"k={k} needs more than {k} samples, got {len(x)}")
    d = torch.cdist(x.double(), x.double())
    return d.kthvalue(k + 1, dim=1).values  # +1: the zero distance to itself


def prdc_indicators(real: torch.Tensor, fake: torch.Tensor, k: int = 5) -> dict[str, Array]:
    """Per-sample terms whose means are precision, recall, density and coverage."""
    r_rad, f_rad = _knn_radii(real, k), _knn_radii(fake, k)
    d_fr = torch.cdist(fake.double(), real.double())  # [n_fake, n_real]
    inside_real = d_fr <= r_rad[None, :]  # fake j inside the ball of real i
    precision = inside_real.any(dim=1).double()
    density = inside_real.sum(dim=1).double() / k
    recall = (d_fr <= f_rad[:, None]).any(dim=0).double()  # real i inside some fake ball
    coverage = (d_fr.min(dim=0).values < r_rad).double()  # real ball holds its nearest fake
    return {
        "precision": precision.numpy(),
        "recall": recall.numpy(),
        "density": density.numpy(),
        "coverage": coverage.numpy(),
    }


def prdc(real: torch.Tensor, fake: torch.Tensor, k: int = 5) -> dict[str, float]:
    return {n: float(v.mean()) for n, v in prdc_indicators(real, fake, k).items()}


MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, MONAI's default


def ms_ssim_setup(image_size: int) -> tuple[int, tuple[float, ...]]:
    """Kernel size and scale weights that fit ``image_size``: 5 scales when possible, fewer (the
    first weights, renormalised) for small images."""
    for levels in range(5, 1, -1):
        try:
            k = ms_ssim_kernel(image_size, levels)
        except ValueError:
            continue
        w = MS_SSIM_WEIGHTS[:levels]
        return k, tuple(x / sum(w) for x in w)
    raise ValueError(f"{image_size}px images are too small for MS-SSIM")


def ms_ssim_kernel(image_size: int, levels: int = 5) -> int:
    """Largest odd kernel that still fits the coarsest of ``levels`` scales (at least 3)."""
    coarsest = image_size // 2 ** (levels - 1)
    k = max(3, min(11, coarsest - 1))
    k = k if k % 2 == 1 else k - 1
    if (k - 1) * 2 ** (levels - 1) >= image_size:
        raise ValueError(f"{image_size}px images are too small for {levels}-scale MS-SSIM")
    return k


def ms_ssim_pairs(images: torch.Tensor, n_pairs: int = 500, seed: int = 0) -> Array:
    """MS-SSIM of ``n_pairs`` random distinct pairs from ``images`` ``[N, 1, S, S]`` in ``[-1, 1]``."""
    from monai.metrics import MultiScaleSSIMMetric

    n = len(images)
    if n < 2:
        raise ValueError("ms_ssim_pairs needs at least 2 images")
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, n_pairs)
    j = (i + rng.integers(1, n, n_pairs)) % n  # never the same image
    x = (images.float().clamp(-1, 1) + 1) / 2
    k, weights = ms_ssim_setup(images.shape[-1])
    metric = MultiScaleSSIMMetric(spatial_dims=2, data_range=1.0, kernel_size=k, weights=weights)
    vals = metric(x[i], x[j])
    return vals.reshape(-1).cpu().numpy()


def nn_distances(queries: torch.Tensor, reference: torch.Tensor, chunk: int = 512) -> tuple[Array, Array]:
    """Euclidean distance of each query row to its nearest reference row, and that row's index."""
    q = queries.reshape(len(queries), -1).float()
    r = reference.reshape(len(reference), -1).float()
    dists, idx = [], []
    for s in range(0, len(q), chunk):
        d = torch.cdist(q[s : s + chunk], r)
        v, ix = d.min(dim=1)
        dists.append(v)
        idx.append(ix)
    return torch.cat(dists).numpy(), torch.cat(idx).numpy()


def memorisation_audit(
    fake: torch.Tensor, train: torch.Tensor, test: torch.Tensor, percentile: float = 1.0
) -> dict[str, Array | float]:
    """Flag synthetic images closer to a training image than ``percentile`` % of real test images
    are to theirs (pixel L2): a real unseen image is rarely that close, a near-copy always is."""
    d_fake, idx = nn_distances(fake, train)
    d_test, _ = nn_distances(test, train)
    thr = float(np.percentile(d_test, percentile))
    return {
        "near_copy": d_fake < thr,
        "threshold": thr,
        "distance": d_fake,
        "nearest": idx,
        "test_distance": d_test,
    }
