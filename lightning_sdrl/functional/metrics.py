"""Evaluation metrics on features: FID, precision/recall and the attribute KL divergence.

These are the evaluation of the diversity reward RL paper (section 5): FID and
precision/recall (Kynkaanniemi et al., 2019) for quality and diversity, and the KL divergence
between the predicted attribute distribution and the uniform one for debiasing.
"""

import torch
from torch import Tensor

__all__ = ["attribute_kl", "fid_from_features", "frechet_distance", "precision_recall"]


def _sqrt_psd(matrix: Tensor) -> Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix."""
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    return (eigenvectors * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> Tensor:
    """Frechet distance between the Gaussians ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

    ``d^2 = ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))``. The trace
    of the matrix square root is ``sum_i sqrt(lambda_i)`` over the eigenvalues of the symmetric
    ``sigma1^(1/2) sigma2 sigma1^(1/2)``, which has the same spectrum as ``sigma1 sigma2``; both
    eigendecompositions run in float64.

    Args:
        mu1: ``[D]`` mean of the first distribution.
        sigma1: ``[D, D]`` covariance of the first distribution.
        mu2: ``[D]`` mean of the second distribution.
        sigma2: ``[D, D]`` covariance of the second distribution.

    Returns:
        Scalar float64 distance.

    Raises:
        ValueError: If the shapes do not match ``[D]`` and ``[D, D]``.

    Example:
        >>> eye = torch.eye(2, dtype=torch.float64)
        >>> round(frechet_distance(torch.zeros(2), eye, torch.ones(2), 4 * eye).item(), 6)
        4.0
    """
    dim = mu1.shape[-1]
    for name, value, shape in (
        ("mu1", mu1, (dim,)),
        ("sigma1", sigma1, (dim, dim)),
        ("mu2", mu2, (dim,)),
        ("sigma2", sigma2, (dim, dim)),
    ):
        if value.shape != shape:
            raise ValueError(f"{name} has shape {list(value.shape)}; expected {list(shape)}")
    mu1, sigma1, mu2, sigma2 = (t.double() for t in (mu1, sigma1, mu2, sigma2))
    sqrt_sigma1 = _sqrt_psd(sigma1)
    middle = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    # symmetrise away round-off so eigvalsh sees the symmetric matrix it assumes
    eigenvalues = torch.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = eigenvalues.clamp(min=0).sqrt().sum()
    return (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt


def _check_feature_matrix(name: str, feats: Tensor, minimum: int) -> None:
    if feats.ndim != 2 or feats.shape[0] < minimum:
        raise ValueError(f"{name} has shape {list(feats.shape)}; expected [n, D] with n >= {minimum}")


def _mean_cov_from_sums(feature_sum: Tensor, outer_sum: Tensor, count: Tensor | int) -> tuple[Tensor, Tensor]:
    """Mean and unbiased covariance from ``sum_i x_i``, ``sum_i x_i x_i^T`` and ``n`` (float64)."""
    mean = feature_sum.double() / count
    cov = (outer_sum.double() - count * torch.outer(mean, mean)) / (count - 1)
    return mean, cov


def fid_from_features(real: Tensor, fake: Tensor) -> Tensor:
    """FID between two feature sets, as clean-fid's ``fid_from_feats``.

    Means and unbiased covariances (``np.cov``'s) are computed in float64 and passed to
    :func:`frechet_distance`.

    Args:
        real: ``[N, D]`` features of the real images, ``N >= 2``.
        fake: ``[M, D]`` features of the generated images, ``M >= 2``.

    Returns:
        Scalar float64 FID.

    Raises:
        ValueError: If a set has fewer than 2 rows or the feature sizes differ.

    Example:
        >>> real = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
        >>> round(fid_from_features(real, real + 1).item(), 6)  # ||mu1 - mu2||^2, same covariances
        2.0
    """
    _check_feature_matrix("real", real, 2)
    _check_feature_matrix("fake", fake, 2)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real has D={real.shape[1]} but fake has D={fake.shape[1]}")
    real, fake = real.double(), fake.double()
    return frechet_distance(real.mean(0), torch.cov(real.T), fake.mean(0), torch.cov(fake.T))


def _kth_neighbour_radii(feats: Tensor, k: int, batch_size: int) -> Tensor:
    """Distance from each point to its k-th nearest neighbour in the same set (itself excluded)."""
    # the point itself is the first of the k + 1 smallest distances
    chunks = feats.split(batch_size)
    return torch.cat([torch.cdist(chunk, feats).kthvalue(k + 1, dim=1).values for chunk in chunks])


def _fraction_in_manifold(points: Tensor, support: Tensor, radii: Tensor, batch_size: int) -> Tensor:
    """Share of ``points`` inside at least one ball ``B(support_j, radii_j)``."""
    inside = [(torch.cdist(chunk, support) <= radii).any(dim=1) for chunk in points.split(batch_size)]
    return torch.cat(inside).double().mean()


def precision_recall(real_feats: Tensor, fake_feats: Tensor, k: int = 3, batch_size: int = 1024) -> dict[str, Tensor]:
    """Improved precision and recall of Kynkaanniemi et al. (2019), as torch-fidelity's ``prc``.

    The manifold of a set is the union of balls around its points, each with the radius of the
    distance to its ``k``-th nearest neighbour in the set. Precision is the share of fake
    points inside the real manifold, recall the share of real points inside the fake manifold
    (a point on a ball's boundary counts as inside). Distances are computed ``batch_size`` rows
    at a time, so memory is ``O(batch_size * max(N, M))``.

    Args:
        real_feats: ``[N, D]`` features of the real images, ``N > k``.
        fake_feats: ``[M, D]`` features of the generated images, ``M > k``.
        k: Neighbourhood size.
        batch_size: Rows of each block of pairwise distances.

    Returns:
        ``{"precision": scalar, "recall": scalar}``, float64 tensors in ``[0, 1]``.

    Raises:
        ValueError: If ``k`` or ``batch_size`` is not positive, a set has ``<= k`` rows, or the
            feature sizes differ.

    Example:
        >>> real = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
        >>> fake = torch.tensor([[0.5], [1.5], [2.5], [9.0]])
        >>> scores = precision_recall(real, fake, k=1)
        >>> scores["precision"], scores["recall"]
        (tensor(0.7500, dtype=torch.float64), tensor(1., dtype=torch.float64))
    """
    if k < 1:
        raise ValueError(f"k={k}; expected a positive neighbourhood size, e.g. 3")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; expected a positive number of rows")
    _check_feature_matrix("real_feats", real_feats, k + 1)
    _check_feature_matrix("fake_feats", fake_feats, k + 1)
    if real_feats.shape[1] != fake_feats.shape[1]:
        raise ValueError(f"real_feats has D={real_feats.shape[1]} but fake_feats has D={fake_feats.shape[1]}")
    real_radii = _kth_neighbour_radii(real_feats, k, batch_size)
    fake_radii = _kth_neighbour_radii(fake_feats, k, batch_size)
    return {
        "precision": _fraction_in_manifold(fake_feats, real_feats, real_radii, batch_size),
        "recall": _fraction_in_manifold(real_feats, fake_feats, fake_radii, batch_size),
    }


def attribute_kl(counts: Tensor, target: Tensor | None = None) -> Tensor:
    """KL divergence ``KL(p || target)`` of an attribute distribution, as ``scipy.stats.entropy``.

    ``counts`` (class counts or probabilities) and ``target`` are both normalised to sum to 1;
    ``0 * log(0 / t) = 0`` and a class with ``p_k > 0 = t_k`` gives ``inf``. Given counts
    ``[P, K]`` (one row per prompt), each row is a distribution of its own and the result is
    the ``[P]`` KL divergences of the prompts (average them for the mean over prompts).

    Args:
        counts: ``[K]`` (or ``[P, K]``) non-negative class counts or probabilities, no row all zero.
        target: ``[K]`` non-negative target distribution (of every row); ``None`` for uniform.

    Returns:
        Scalar (or ``[P]``) float64 KL divergence in nats.

    Raises:
        ValueError: If ``counts`` is not ``[K]`` or ``[P, K]``, ``target`` not ``[K]``, or a
            vector has negative entries or sums to 0.

    Example:
        >>> attribute_kl(torch.tensor([3, 1]))
        tensor(0.1308, dtype=torch.float64)
        >>> attribute_kl(torch.tensor([[3, 1], [2, 2]]))  # two prompts
        tensor([0.1308, 0.0000], dtype=torch.float64)
    """
    counts = torch.as_tensor(counts).double()
    if counts.ndim not in (1, 2):
        raise ValueError(f"counts has shape {list(counts.shape)}; expected [K] (or [P, K], one row per prompt)")
    if target is None:
        target = torch.ones(counts.shape[-1], dtype=torch.float64, device=counts.device)
    target = torch.as_tensor(target, device=counts.device).double()
    for name, value in (("counts", counts), ("target", target)):
        if value.shape[-1:] != counts.shape[-1:] or (value < 0).any() or (value.sum(dim=-1) <= 0).any():
            raise ValueError(
                f"{name}={value.tolist()}; expected {counts.shape[-1]} non-negative values (per row), not all zero"
            )
    if target.ndim != 1:
        raise ValueError(f"target has shape {list(target.shape)}; expected [{counts.shape[-1]}]")
    p = counts / counts.sum(dim=-1, keepdim=True)
    t = target / target.sum()
    return torch.xlogy(p, p).sum(dim=-1) - torch.xlogy(p, t).sum(dim=-1)


def pairwise_bias(counts: Tensor) -> Tensor:
    """The fairness bias of Shen et al. (2024): the mean over class pairs of ``|freq_i - freq_j|``.

    ``bias = 2 / (K (K - 1)) * sum_{i<j} |f_i - f_j|`` with ``f`` the class frequencies of a
    prompt's images (``counts`` normalised to sum to 1). 0 is perfectly balanced; one class
    taking every image gives ``2 / K`` (1 for two classes). Given ``[P, K]`` counts, one bias per
    prompt (``[P]``; average them for the paper's mean over prompts). For joint attributes (gender
    x race) pass the counts of the joint classes.

    Args:
        counts: ``[K]`` (or ``[P, K]``) non-negative class counts or frequencies, ``K >= 2``, no
            row all zero.

    Returns:
        Scalar (or ``[P]``) float64 bias.

    Raises:
        ValueError: If ``counts`` is not ``[K]`` or ``[P, K]`` with ``K >= 2``, or a row is negative
            or sums to 0.

    Example:
        >>> pairwise_bias(torch.tensor([3, 1]))  # 75% / 25%
        tensor(0.5000, dtype=torch.float64)
        >>> pairwise_bias(torch.tensor([[1, 1, 1, 1], [4, 0, 0, 0]]))  # balanced; one class of four
        tensor([0.0000, 0.5000], dtype=torch.float64)
    """
    counts = torch.as_tensor(counts).double()
    if counts.ndim not in (1, 2) or counts.shape[-1] < 2:
        raise ValueError(f"counts has shape {list(counts.shape)}; expected [K] or [P, K] with K >= 2 classes")
    if (counts < 0).any() or (counts.sum(dim=-1) <= 0).any():
        raise ValueError(f"counts={counts.tolist()}; expected non-negative values, no row all zero")
    freq = counts / counts.sum(dim=-1, keepdim=True)
    num_classes = counts.shape[-1]
    differences = (freq.unsqueeze(-1) - freq.unsqueeze(-2)).abs().sum(dim=(-2, -1)) / 2  # each pair once
    return differences * 2 / (num_classes * (num_classes - 1))
