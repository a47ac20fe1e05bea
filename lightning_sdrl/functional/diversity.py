"""Set-level diversity rewards and their per-image marginal utilities.

"Training Diffusion Models Towards Diverse Image Generation with Reinforcement Learning"
(diversity reward RL): a batch of generated features ``Z_g [M, D]`` is compared with a small,
diverse reference set ``Z_r [N, D]``, either by minus the MMD (eq. 11) or by the GP mutual
information (eq. 16); each image is then credited with its marginal utility (eq. 18).

All kernel algebra runs in float64 (leave-one-out differences cancel most of the digits) and
results are returned in the dtype of ``gen_feats``.
"""

import functools
import inspect
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["gp_mi_reward", "marginal_utility", "mmd_reward", "polynomial_kernel", "rbf_kernel"]

RewardFn = Callable[[Tensor, Tensor], Tensor]


def _check_features(gen_feats: Tensor, ref_feats: Tensor, min_gen: int, min_ref: int) -> None:
    checks = (("gen_feats", gen_feats, min_gen), ("ref_feats", ref_feats, min_ref))
    for name, feats, minimum in checks:
        if feats.ndim != 2 or feats.shape[0] < minimum:
            raise ValueError(f"{name} has shape {list(feats.shape)}; expected [n, D] with n >= {minimum}")
    if gen_feats.shape[1] != ref_feats.shape[1]:
        raise ValueError(
            f"gen_feats has D={gen_feats.shape[1]} but ref_feats has D={ref_feats.shape[1]}; "
            "extract both with the same feature network"
        )


def polynomial_kernel(x: Tensor, y: Tensor, degree: int = 3, gamma: float | None = None, coef: float = 1.0) -> Tensor:
    """Polynomial kernel ``(gamma * <x, y> + coef) ** degree``, the kernel of KID.

    Args:
        x: ``[n, D]`` features.
        y: ``[m, D]`` features.
        degree: Polynomial degree.
        gamma: Scale of the inner product; ``None`` for ``1 / D``.
        coef: Constant added before the power.

    Returns:
        ``[n, m]`` kernel matrix.

    Example:
        >>> polynomial_kernel(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        tensor([[3.3750, 1.0000]])
    """
    if gamma is None:
        gamma = 1.0 / x.shape[1]
    return (gamma * x @ y.T + coef) ** degree


def rbf_kernel(x: Tensor, y: Tensor, lengthscale: float = 1.0) -> Tensor:
    """RBF kernel ``exp(-||x - y||^2 / (2 * lengthscale^2))``.

    Args:
        x: ``[n, D]`` features.
        y: ``[m, D]`` features.
        lengthscale: Kernel width, in feature-space distance units.

    Returns:
        ``[n, m]`` kernel matrix.

    Example:
        >>> rbf_kernel(torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
        tensor([[1.0000, 0.3679]])
    """
    return torch.exp(-torch.cdist(x, y).square() / (2.0 * lengthscale**2))


def _mmd_kernel_sums(
    gen: Tensor, ref: Tensor, degree: int, gamma: float | None, coef: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Row and total sums of the kernel matrices of eq. (11), same-set diagonals excluded."""
    gen, ref = gen.double(), ref.double()
    k_gg = polynomial_kernel(gen, gen, degree, gamma, coef)
    k_rr = polynomial_kernel(ref, ref, degree, gamma, coef)
    k_gr = polynomial_kernel(gen, ref, degree, gamma, coef)
    gg_rows = k_gg.sum(dim=1) - k_gg.diagonal()
    gr_rows = k_gr.sum(dim=1)
    return gg_rows, gr_rows, k_rr.sum() - k_rr.trace(), gg_rows.sum(), gr_rows.sum()


def _mmd_from_sums(sum_gg: Tensor, sum_rr: Tensor, sum_gr: Tensor, m: int, n: int) -> Tensor:
    # eq. (11): -1/(M(M-1)) sum_{i!=j} K_gg - 1/(N(N-1)) sum_{i!=j} K_rr + 2/(MN) sum K_gr
    return -sum_gg / (m * (m - 1)) - sum_rr / (n * (n - 1)) + 2.0 * sum_gr / (m * n)


def mmd_reward(
    gen_feats: Tensor,
    ref_feats: Tensor,
    degree: int = 3,
    gamma: float | None = None,
    coef: float = 1.0,
) -> Tensor:
    """Minus the unbiased MMD^2 between generated and reference features, eq. (11).

    The kernel is :func:`polynomial_kernel` (as in KID); ``M`` and ``N`` may differ.

    Args:
        gen_feats: ``[M, D]`` features of the generated images, ``M >= 2``.
        ref_feats: ``[N, D]`` features of the reference images, ``N >= 2``.
        degree: Polynomial kernel degree.
        gamma: Polynomial kernel scale; ``None`` for ``1 / D``.
        coef: Polynomial kernel constant.

    Returns:
        Scalar reward (higher is closer to the reference distribution).

    Raises:
        ValueError: If either set has fewer than 2 rows or the feature sizes differ.

    Example:
        >>> ref = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
        >>> gen = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
        >>> mmd_reward(gen, ref)
        tensor(0.3958)
    """
    _check_features(gen_feats, ref_feats, min_gen=2, min_ref=2)
    _, _, sum_rr, sum_gg, sum_gr = _mmd_kernel_sums(gen_feats, ref_feats, degree, gamma, coef)
    reward = _mmd_from_sums(sum_gg, sum_rr, sum_gr, gen_feats.shape[0], ref_feats.shape[0])
    return reward.to(gen_feats.dtype)


def _gp_covariances(gen: Tensor, ref: Tensor, lengthscale: float, noise: float, jitter: float) -> tuple[Tensor, Tensor]:
    """Cov(Z_g, Z_g) and Cov(Z_{g,r}, Z_{g,r}) of eq. (13) plus noise and jitter on the diagonal."""
    joint = torch.cat([gen, ref]).double()
    # eq. (13): Cov(m, n) = K(Z_m, Z_n); the diagonal term makes both matrices positive definite
    cov_joint = rbf_kernel(joint, joint, lengthscale)
    cov_joint.diagonal().add_(noise + jitter)
    num_gen = gen.shape[0]
    return cov_joint[:num_gen, :num_gen], cov_joint


def _logdet(cov: Tensor) -> Tensor:
    # log|A| = 2 sum log diag(L) for the Cholesky factor A = L L^T
    return 2.0 * torch.linalg.cholesky(cov).diagonal(dim1=-2, dim2=-1).log().sum(dim=-1)


def _check_gp_args(lengthscale: float, noise: float, jitter: float) -> None:
    if lengthscale <= 0:
        raise ValueError(f"lengthscale={lengthscale}; expected a positive kernel width")
    if noise < 0 or jitter < 0 or noise + jitter <= 0:
        raise ValueError(
            f"noise={noise}, jitter={jitter}; expected both >= 0 with a positive sum, so the "
            "covariances are positive definite"
        )


def gp_mi_reward(
    gen_feats: Tensor,
    ref_feats: Tensor,
    lengthscale: float = 1.0,
    noise: float = 0.1,
    jitter: float = 1e-6,
) -> Tensor:
    r"""GP mutual information between generated and reference features, eq. (16).

    ``r = ln|C_gg| - ln|C_{g,r}|`` where ``C`` is the RBF kernel matrix of eq. (13) with
    ``noise + jitter`` added to its diagonal, ``C_gg`` its block over ``Z_g`` and ``C_{g,r}``
    the matrix over the concatenation ``[Z_g; Z_r]``. The paper writes ``Cov = K``; the GP
    observation ``noise`` is our addition: with it ``r = -ln|S|`` for the Schur complement
    ``S = C_rr - C_rg C_gg^{-1} C_gr`` (the posterior covariance of ``Z_r`` given ``Z_g``), so
    ``-ln|C_rr| <= r <= -N ln(noise + jitter)`` and a generated image that duplicates a reference
    image cannot make the reward explode. ``jitter`` only guards the Cholesky factorisation when
    ``noise = 0``. Log-determinants come from a float64 Cholesky factorisation.

    ``lengthscale`` is in feature-space distance units: 1.0 suits L2-normalised (CLIP) features;
    for other features use about the median pairwise distance.

    Args:
        gen_feats: ``[M, D]`` features of the generated images.
        ref_feats: ``[N, D]`` features of the reference images.
        lengthscale: RBF kernel width.
        noise: GP observation noise variance added to the diagonal.
        jitter: Extra diagonal term for numerical safety.

    Returns:
        Scalar reward (higher when the generated set explains more of the reference set).

    Raises:
        ValueError: If a set is empty, the feature sizes differ, or a GP argument is invalid.

    Example:
        >>> gen = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
        >>> ref = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
        >>> gp_mi_reward(gen, ref)
        tensor(1.9657)
    """
    _check_features(gen_feats, ref_feats, min_gen=1, min_ref=1)
    _check_gp_args(lengthscale, noise, jitter)
    cov_gg, cov_joint = _gp_covariances(gen_feats, ref_feats, lengthscale, noise, jitter)
    # eq. (16): r = ln |Cov(Z_g, Z_g)| / |Cov(Z_{g,r}, Z_{g,r})|
    return (_logdet(cov_gg) - _logdet(cov_joint)).to(gen_feats.dtype)


def _mmd_marginal_utility(gen: Tensor, ref: Tensor, **kernel_args: float | None) -> Tensor:
    num_gen, num_ref = gen.shape[0], ref.shape[0]
    gg_rows, gr_rows, sum_rr, sum_gg, sum_gr = _mmd_kernel_sums(gen, ref, **kernel_args)
    full = _mmd_from_sums(sum_gg, sum_rr, sum_gr, num_gen, num_ref)
    # removing x_m drops row and column m of K_gg (2 * its off-diagonal row sum) and row m of K_gr
    without = _mmd_from_sums(sum_gg - 2.0 * gg_rows, sum_rr, sum_gr - gr_rows, num_gen - 1, num_ref)
    return full - without


def _gp_mi_marginal_utility(gen: Tensor, ref: Tensor, **gp_args: float) -> Tensor:
    cov_gg, cov_joint = _gp_covariances(gen, ref, **gp_args)
    num_gen = gen.shape[0]
    # deleting row and column m of a positive definite A gives |A_{-m}| = |A| [A^{-1}]_{mm}, so
    # r(X) - r(X \ {x_m}) = ln [C_{g,r}^{-1}]_{mm} - ln [C_gg^{-1}]_{mm}
    inv_diag_gg = torch.cholesky_inverse(torch.linalg.cholesky(cov_gg)).diagonal()
    inv_diag_joint = torch.cholesky_inverse(torch.linalg.cholesky(cov_joint)).diagonal()[:num_gen]
    return inv_diag_joint.log() - inv_diag_gg.log()


def _hyperparameters(reward_fn: RewardFn, keywords: dict) -> dict:
    """The keyword arguments of ``reward_fn`` after ``gen_feats, ref_feats``, defaults filled in."""
    bound = inspect.signature(reward_fn).bind(None, None, **keywords)
    bound.apply_defaults()
    return dict(list(bound.arguments.items())[2:])


def mmd_subset_rewards(gen_feats: Tensor, ref_feats: Tensor, subsets: Tensor, **kernel_args: float | None) -> Tensor:
    """:func:`mmd_reward` of many subsets of one generated set, from one set of kernel matrices.

    Equal to ``torch.stack([mmd_reward(gen_feats[s], ref_feats, **kernel_args) for s in subsets])``
    but the kernels are computed once: a subset's ``K_gg`` sum is a sum over its sub-matrix and its
    ``K_gr`` sum one of per-image row sums; the ``K_rr`` term does not depend on the subset.

    Args:
        gen_feats: ``[O, D]`` features of the generated images.
        ref_feats: ``[N, D]`` features of the reference images, ``N >= 2``.
        subsets: ``[C, M]`` int64 indices into ``gen_feats`` (distinct within a row), ``M >= 2``.
        **kernel_args: ``degree``, ``gamma``, ``coef`` of :func:`mmd_reward`.

    Returns:
        ``[C]`` rewards in the dtype of ``gen_feats``.
    """
    _check_features(gen_feats, ref_feats, min_gen=2, min_ref=2)
    if subsets.ndim != 2 or subsets.shape[1] < 2:
        raise ValueError(f"subsets have shape {list(subsets.shape)}; expected [C, M] indices with M >= 2")
    hyperparameters = _hyperparameters(mmd_reward, kernel_args)
    gen, ref = gen_feats.double(), ref_feats.double()
    k_gg = polynomial_kernel(gen, gen, **hyperparameters).fill_diagonal_(0.0)
    k_rr = polynomial_kernel(ref, ref, **hyperparameters)
    gr_rows = polynomial_kernel(gen, ref, **hyperparameters).sum(dim=1)
    subsets = subsets.to(gen.device)
    sum_gg = k_gg[subsets[:, :, None], subsets[:, None, :]].sum(dim=(1, 2))
    sum_gr = gr_rows[subsets].sum(dim=1)
    sum_rr = k_rr.sum() - k_rr.trace()
    return _mmd_from_sums(sum_gg, sum_rr, sum_gr, subsets.shape[1], ref.shape[0]).to(gen_feats.dtype)


def unwrap_set_reward(reward_fn: RewardFn) -> tuple[RewardFn, dict]:
    """``(function, keyword arguments)`` of a set reward or a keyword-only ``functools.partial`` of it."""
    if isinstance(reward_fn, functools.partial) and not reward_fn.args:
        return reward_fn.func, dict(reward_fn.keywords)
    return reward_fn, {}


def _loop_marginal_utility(reward_fn: RewardFn, gen: Tensor, ref: Tensor) -> Tensor:
    full = reward_fn(gen, ref)
    keep = ~torch.eye(gen.shape[0], dtype=torch.bool, device=gen.device)
    return torch.stack([full - reward_fn(gen[row], ref) for row in keep])


def marginal_utility(reward_fn: RewardFn, gen_feats: Tensor, ref_feats: Tensor) -> Tensor:
    """Per-image reward ``r(X_g) - r(X_g without x_m)`` of a set reward, eq. (17)-(18).

    Three paths, chosen from ``reward_fn``:

    * :func:`mmd_reward` (or a ``functools.partial`` of it with keyword arguments): closed form
      from the kernel row sums, one set of kernel matrices for all ``M`` leave-one-out sets.
    * :func:`gp_mi_reward` (or a keyword ``functools.partial``): closed form from the inverse
      diagonals, ``ln|A_{-m}| = ln|A| + ln [A^{-1}]_{mm}``, one Cholesky factorisation per
      matrix.
    * any other callable ``reward_fn(gen_feats, ref_feats) -> scalar``: ``M + 1`` calls, one per
      leave-one-out set.

    Args:
        reward_fn: Set reward ``(gen_feats [M, D], ref_feats [N, D]) -> scalar``.
        gen_feats: ``[M, D]`` features of the generated images, ``M >= 2``
            (``M >= 3`` for :func:`mmd_reward`, whose leave-one-out sets need 2 images).
        ref_feats: ``[N, D]`` features of the reference images.

    Returns:
        ``[M]`` marginal utilities in the dtype of ``gen_feats``.

    Raises:
        ValueError: If the feature shapes are invalid for ``reward_fn``.

    Example:
        >>> ref = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
        >>> gen = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
        >>> marginal_utility(mmd_reward, gen, ref)  # the three duplicates lower the reward
        tensor([-0.3958, -0.3958, -0.3958,  1.1875])
        >>> marginal_utility(gp_mi_reward, gen, ref)
        tensor([0.1117, 0.1117, 0.1117, 1.6457])
    """
    func, kwargs = unwrap_set_reward(reward_fn)
    if func is mmd_reward:
        _check_features(gen_feats, ref_feats, min_gen=3, min_ref=2)
        utility = _mmd_marginal_utility(gen_feats, ref_feats, **_hyperparameters(func, kwargs))
    elif func is gp_mi_reward:
        _check_features(gen_feats, ref_feats, min_gen=2, min_ref=1)
        hyperparameters = _hyperparameters(func, kwargs)
        _check_gp_args(**hyperparameters)
        utility = _gp_mi_marginal_utility(gen_feats, ref_feats, **hyperparameters)
    else:
        _check_features(gen_feats, ref_feats, min_gen=2, min_ref=1)
        utility = _loop_marginal_utility(reward_fn, gen_feats, ref_feats)
    return utility.to(gen_feats.dtype)
