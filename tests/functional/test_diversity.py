import functools

import numpy as np
import pytest
import torch
from torchmetrics.image.kid import poly_kernel, poly_mmd

from lightning_sdrl.functional.diversity import (
    gp_mi_reward,
    marginal_utility,
    mmd_reward,
    polynomial_kernel,
    rbf_kernel,
)


def features(rows: int, dim: int = 8, seed: int = 0, shift: float = 0.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, dim, generator=generator, dtype=torch.float64) + shift


def literal_mmd2(x: np.ndarray, y: np.ndarray, degree=3, gamma=None, coef=1.0) -> float:
    """Unbiased MMD^2 as three explicit double sums (eq. 11 without its minus sign)."""
    gamma = 1.0 / x.shape[1] if gamma is None else gamma

    def k(a, b):
        return (gamma * float(a @ b) + coef) ** degree

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_polynomial_kernel_matches_torchmetrics_kid_kernel():
    x, y = features(5, seed=0), features(7, seed=1)
    torch.testing.assert_close(polynomial_kernel(x, y), poly_kernel(x, y))
    torch.testing.assert_close(
        polynomial_kernel(x, y, degree=2, gamma=0.3, coef=0.5),
        poly_kernel(x, y, degree=2, gamma=0.3, coef=0.5),
    )


def test_rbf_kernel_by_hand():
    x, y = features(3, seed=0), features(4, seed=1)
    expected = torch.tensor(
        [[np.exp(-np.sum((a - b) ** 2) / (2 * 0.7**2)) for b in y.numpy()] for a in x.numpy()],
        dtype=torch.float64,
    )
    torch.testing.assert_close(rbf_kernel(x, y, lengthscale=0.7), expected)


def test_mmd_reward_is_minus_torchmetrics_poly_mmd_for_equal_sizes():
    gen, ref = features(16, seed=0), features(16, seed=1, shift=0.5)
    torch.testing.assert_close(mmd_reward(gen, ref), -poly_mmd(ref, gen))
    torch.testing.assert_close(
        mmd_reward(gen, ref, degree=2, gamma=0.2, coef=2.0),
        -poly_mmd(ref, gen, degree=2, gamma=0.2, coef=2.0),
    )


def test_mmd_reward_matches_literal_eq11_for_unequal_sizes():
    gen, ref = features(6, seed=2), features(9, seed=3, shift=0.3)
    expected = -literal_mmd2(gen.numpy(), ref.numpy())
    assert mmd_reward(gen, ref).item() == pytest.approx(expected, rel=1e-10)
    assert mmd_reward(gen.float(), ref.float()).dtype == torch.float32


def test_mmd_reward_prefers_the_reference_distribution():
    ref = features(32, seed=4)
    assert mmd_reward(features(32, seed=5), ref) > mmd_reward(features(32, seed=5, shift=2.0), ref)


def gp_mi_by_logdet(gen, ref, lengthscale=1.0, noise=0.1, jitter=1e-6) -> float:
    """Eq. (16) from numpy's log-determinants of explicitly built RBF covariances."""
    joint = np.concatenate([gen, ref])
    sq_dist = ((joint[:, None, :] - joint[None, :, :]) ** 2).sum(-1)
    cov = np.exp(-sq_dist / (2 * lengthscale**2)) + (noise + jitter) * np.eye(len(joint))
    m = len(gen)
    sign_g, logdet_g = np.linalg.slogdet(cov[:m, :m])
    sign_j, logdet_j = np.linalg.slogdet(cov)
    assert sign_g > 0 and sign_j > 0
    return logdet_g - logdet_j


@pytest.mark.parametrize("kwargs", [{}, {"lengthscale": 2.0, "noise": 0.01}, {"noise": 0.0, "jitter": 1e-4}])
def test_gp_mi_reward_matches_direct_log_determinants(kwargs):
    gen, ref = features(7, seed=6), features(5, seed=7)
    expected = gp_mi_by_logdet(gen.numpy(), ref.numpy(), **kwargs)
    assert gp_mi_reward(gen, ref, **kwargs).item() == pytest.approx(expected, rel=1e-9)


def test_gp_mi_reward_is_bounded_with_duplicates():
    ref = features(4, seed=8)
    gen = torch.cat([ref, ref])  # exact duplicates: singular without noise
    reward = gp_mi_reward(gen, ref, noise=0.1)
    assert torch.isfinite(reward)
    # bounds of the docstring: -ln|C_rr| <= r <= -N ln(noise + jitter)
    assert reward <= -4 * np.log(0.1 + 1e-6) + 1e-9
    assert reward >= gp_mi_by_logdet(np.zeros((0, 8)), ref.numpy()) - 1e-9


def test_gp_mi_reward_rejects_bad_arguments():
    gen, ref = features(3), features(3, seed=1)
    with pytest.raises(ValueError, match="lengthscale=0"):
        gp_mi_reward(gen, ref, lengthscale=0)
    with pytest.raises(ValueError, match="noise=0"):
        gp_mi_reward(gen, ref, noise=0, jitter=0)
    with pytest.raises(ValueError, match=r"D=8 but ref_feats has D=4"):
        gp_mi_reward(gen, features(3, dim=4))


def literal_marginal_utility(reward_fn, gen, ref) -> torch.Tensor:
    """Eq. (18): r(X) - r(X without x_m), one explicit leave-one-out set at a time."""
    full = reward_fn(gen, ref).double()
    values = []
    for m in range(len(gen)):
        rest = torch.cat([gen[:m], gen[m + 1 :]])
        values.append(full - reward_fn(rest, ref).double())
    return torch.stack(values)


@pytest.mark.parametrize(
    "reward_fn",
    [
        mmd_reward,
        functools.partial(mmd_reward, degree=2, gamma=0.5, coef=0.1),
        gp_mi_reward,
        functools.partial(gp_mi_reward, lengthscale=3.0, noise=0.01),
    ],
    ids=["mmd", "mmd-partial", "gp-mi", "gp-mi-partial"],
)
def test_closed_form_marginal_utility_matches_leave_one_out(reward_fn):
    gen, ref = features(9, seed=10), features(6, seed=11, shift=0.2)
    expected = literal_marginal_utility(reward_fn, gen, ref)
    torch.testing.assert_close(marginal_utility(reward_fn, gen, ref), expected, rtol=1e-8, atol=1e-10)


def test_marginal_utility_float32_inputs_keep_dtype_and_precision():
    gen, ref = features(12, seed=12), features(10, seed=13)
    utility = marginal_utility(mmd_reward, gen.float(), ref.float())
    assert utility.dtype == torch.float32
    torch.testing.assert_close(utility.double(), marginal_utility(mmd_reward, gen, ref), rtol=1e-5, atol=1e-6)


def test_marginal_utility_loops_over_arbitrary_callables():
    gen, ref = features(5, seed=14), features(4, seed=15)

    def mean_distance_reward(g, r):
        return -torch.cdist(g, r).mean()

    expected = literal_marginal_utility(mean_distance_reward, gen, ref)
    torch.testing.assert_close(marginal_utility(mean_distance_reward, gen, ref), expected)
    # a positional partial is not recognised as mmd_reward and takes the generic path too
    lambda_mmd = functools.partial(lambda g, r, degree: mmd_reward(g, r, degree), degree=3)
    torch.testing.assert_close(marginal_utility(lambda_mmd, gen, ref), marginal_utility(mmd_reward, gen, ref))


def test_marginal_utility_gp_mi_is_non_negative():
    # eq. (17) requires a monotone set function; with GP noise the GP-MI reward is one
    gen, ref = features(10, seed=16), features(8, seed=17)
    assert (marginal_utility(gp_mi_reward, gen, ref) >= 0).all()


def test_marginal_utility_needs_enough_generated_images():
    with pytest.raises(ValueError, match=r"gen_feats has shape \[2, 8\]; expected \[n, D\] with n >= 3"):
        marginal_utility(mmd_reward, features(2), features(4, seed=1))
    with pytest.raises(ValueError, match="n >= 2"):
        marginal_utility(gp_mi_reward, features(1), features(4, seed=1))


@pytest.mark.parametrize("reward_fn", [mmd_reward, functools.partial(gp_mi_reward, noise=0.5)])
def test_marginal_utility_uses_the_closed_form_for_known_rewards(reward_fn, monkeypatch):
    from lightning_sdrl.functional import diversity

    def no_loop(*args):
        raise AssertionError("the generic leave-one-out loop was used")

    monkeypatch.setattr(diversity, "_loop_marginal_utility", no_loop)
    assert marginal_utility(reward_fn, features(6), features(4, seed=1)).shape == (6,)
    with pytest.raises(AssertionError, match="generic"):
        marginal_utility(lambda g, r: mmd_reward(g, r), features(6), features(4, seed=1))


def test_mmd_subset_rewards_equal_one_mmd_reward_per_subset():
    import itertools

    from lightning_sdrl.functional.diversity import mmd_subset_rewards

    gen, ref = torch.randn(7, 5), torch.randn(9, 5)
    subsets = torch.tensor(list(itertools.combinations(range(7), 3)))
    expected = torch.stack([mmd_reward(gen[s], ref, degree=2, coef=0.5) for s in subsets])
    torch.testing.assert_close(mmd_subset_rewards(gen, ref, subsets, degree=2, coef=0.5), expected)
    with pytest.raises(ValueError, match="expected \\[C, M\\] indices with M >= 2"):
        mmd_subset_rewards(gen, ref, subsets[:, :1])
