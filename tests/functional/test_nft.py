import pytest
import torch

from lightning_sdrl.functional.forward_process import noise_sample, training_target
from lightning_sdrl.functional.nft import implicit_policies, nft_loss, optimality_probability

SHAPE = (4, 3, 5, 5)
ADVANTAGES = torch.tensor([-7.0, -1.5, 0.4, 6.0])
LEVELS = torch.tensor([0.15, 0.4, 0.7, 0.95])


def randn(*shape, seed, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def batch(parameterization="flow", dtype=torch.float64):
    """Clean samples, their noised versions and three models' outputs at them."""
    x0, noise = randn(*SHAPE, seed=1, dtype=dtype), randn(*SHAPE, seed=2, dtype=dtype)
    x_t = noise_sample(x0, noise, LEVELS, parameterization).to(dtype)
    theta, old, ref = (randn(*SHAPE, seed=s, dtype=dtype) for s in (3, 4, 5))
    return x0, noise, x_t, theta, old, ref


def reference_x0_hat(x_t, output, level, parameterization):
    """The clean-sample estimate written out in float64 for each parameterization."""
    x_t, output, level = x_t.double(), output.double(), level.double().view(-1, 1, 1, 1)
    if parameterization == "flow":
        return x_t - level * output
    if parameterization == "epsilon":
        return (x_t - (1 - level).sqrt() * output) / level.sqrt()
    if parameterization == "v_prediction":
        return level.sqrt() * x_t - (1 - level).sqrt() * output
    return output


def reference_nft(theta, old, x_t, x0, level, advantages, beta, clip, parameterization):
    """DiffusionNFT's per-sample loss from the formula, in float64."""
    theta, old, x0 = theta.double(), old.double(), x0.double()
    r = (0.5 + advantages.double().clamp(-clip, clip) / (2 * clip)).clamp(0, 1)
    terms = {}
    for name, output in (("positive", (1 - beta) * old + beta * theta), ("negative", (1 + beta) * old - beta * theta)):
        error = reference_x0_hat(x_t, output, level, parameterization) - x0
        weight = error.abs().mean(dim=(1, 2, 3)).clamp(min=1e-5)
        terms[name] = ((error**2).mean(dim=(1, 2, 3)) / weight, weight)
    per_sample = (r * terms["positive"][0] + (1 - r) * terms["negative"][0]) / beta
    return r, per_sample, terms


@pytest.mark.parametrize("parameterization", ["flow", "epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_loss_matches_the_formula_in_float64(parameterization, beta):
    x0, _, x_t, theta, old, ref = batch(parameterization, dtype=torch.float32)
    out = nft_loss(theta, old, x_t, x0, LEVELS, ADVANTAGES, beta, 5.0, parameterization, reference_output=ref)
    r, per_sample, terms = reference_nft(theta, old, x_t, x0, LEVELS, ADVANTAGES, beta, 5.0, parameterization)
    # float32 inputs; x0_hat of epsilon models divides by sqrt(abar) = 0.39 at most
    close = {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(out.optimality.double(), r, **close)
    torch.testing.assert_close(out.per_sample.double(), per_sample, **close)
    torch.testing.assert_close(out.loss.double(), 5.0 * per_sample.mean(), **close)
    torch.testing.assert_close(out.positive_loss.double(), terms["positive"][0], **close)
    torch.testing.assert_close(out.negative_loss.double(), terms["negative"][0], **close)
    torch.testing.assert_close(out.positive_weight.double(), terms["positive"][1], **close)
    torch.testing.assert_close(out.negative_weight.double(), terms["negative"][1], **close)
    torch.testing.assert_close(out.kl.double(), ((theta.double() - ref.double()) ** 2).mean(dim=(1, 2, 3)), **close)


def test_optimality_probability_maps_clipped_advantages_to_zero_one():
    advantages = torch.tensor([-100.0, -2.0, -1.0, 0.0, 1.0, 2.0, 100.0])
    expected = torch.tensor([0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0])
    torch.testing.assert_close(optimality_probability(advantages, 2.0), expected)


def test_the_implicit_policies_lie_symmetrically_about_the_old_one():
    theta, old = randn(2, 3, seed=1), randn(2, 3, seed=2)
    positive, negative = implicit_policies(theta, old, 0.3)
    torch.testing.assert_close((positive + negative) / 2, old)
    torch.testing.assert_close(positive - old, 0.3 * (theta - old))


def flow_matching_gradient(branch_output, theta, target):
    """Gradient w.r.t. v_theta of the plain flow-matching loss mean (v_branch - target)^2, summed over samples."""
    (grad,) = torch.autograd.grad((branch_output - target).pow(2).flatten(1).mean(1).sum(), theta)
    return grad


def nft_gradient(theta, old, x_t, x0, advantages, beta):
    theta = theta.clone().requires_grad_(True)
    out = nft_loss(theta, old, x_t, x0, LEVELS, advantages, beta)
    (grad,) = torch.autograd.grad(out.per_sample.sum(), theta)
    return grad, out


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_at_r_one_the_gradient_is_flow_matching_on_the_positive_policy_scaled_by_t2_over_w_beta(beta):
    x0, noise, x_t, theta, old, _ = batch()
    grad, out = nft_gradient(theta, old, x_t, x0, torch.full((4,), 5.0), beta)
    assert torch.equal(out.optimality, torch.ones(4, dtype=torch.float64))
    # x0_hat(v+) - x0 = -t (v+ - (eps - x0)), so d/dv_theta of ||.||^2 / (w+ beta) = t^2 / (w+ beta) d FM(v+)
    theta = theta.clone().requires_grad_(True)
    positive, _ = implicit_policies(theta, old, beta)
    fm = flow_matching_gradient(positive, theta, training_target(x0, noise, LEVELS, "flow"))
    scale = (LEVELS.double() ** 2 / (out.positive_weight * beta)).view(-1, 1, 1, 1)
    torch.testing.assert_close(grad, scale * fm, atol=1e-12, rtol=1e-10)
    # a small step against the gradient lowers the positive branch's flow-matching error: towards the sample
    step = theta.detach() - 1e-3 * grad
    before = (implicit_policies(theta.detach(), old, beta)[0] - (noise - x0)).pow(2).sum()
    after = (implicit_policies(step, old, beta)[0] - (noise - x0)).pow(2).sum()
    assert after < before


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_at_r_zero_the_gradient_fits_the_negative_policy_so_v_theta_moves_away(beta):
    x0, noise, x_t, theta, old, _ = batch()
    grad, out = nft_gradient(theta, old, x_t, x0, torch.full((4,), -5.0), beta)
    theta = theta.clone().requires_grad_(True)
    _, negative = implicit_policies(theta, old, beta)
    fm = flow_matching_gradient(negative, theta, training_target(x0, noise, LEVELS, "flow"))
    scale = (LEVELS.double() ** 2 / (out.negative_weight * beta)).view(-1, 1, 1, 1)
    torch.testing.assert_close(grad, scale * fm, atol=1e-12, rtol=1e-10)
    # at v_theta = v_old both branches coincide and the r = 0 gradient is exactly minus the r = 1 gradient
    at_old_neg, _ = nft_gradient(old, old, x_t, x0, torch.full((4,), -5.0), beta)
    at_old_pos, _ = nft_gradient(old, old, x_t, x0, torch.full((4,), 5.0), beta)
    torch.testing.assert_close(at_old_neg, -at_old_pos, atol=1e-12, rtol=0)
    # descending it moves v_theta away from the sample's velocity
    step = old - 1e-3 * at_old_neg
    assert (step - (noise - x0)).pow(2).sum() > (old - (noise - x0)).pow(2).sum()


def test_at_v_theta_equal_v_old_the_gradient_is_two_r_minus_one_times_the_positive_one():
    # v+ = v- = v_old, w+ = w-: the branch gradients are g and -g, so the total is (r - (1 - r)) g = (A / c) g
    x0, _, x_t, _, old, _ = batch()
    positive, _ = nft_gradient(old, old, x_t, x0, torch.full((4,), 5.0), 1.0)
    grad, out = nft_gradient(old, old, x_t, x0, ADVANTAGES, 1.0)
    expected = (2 * out.optimality - 1).view(-1, 1, 1, 1) * positive
    torch.testing.assert_close(grad, expected, atol=1e-12, rtol=0)


def test_equal_advantages_at_v_theta_equal_v_old_give_zero_policy_gradient():
    x0, _, x_t, _, old, _ = batch()
    grad, out = nft_gradient(old, old, x_t, x0, torch.zeros(4), 0.5)
    assert torch.equal(out.optimality, torch.full((4,), 0.5, dtype=torch.float64))
    assert grad.abs().max() < 1e-12


def test_the_old_output_gets_no_gradient_and_half_precision_is_upcast():
    x0, _, x_t, theta, old, _ = batch(dtype=torch.bfloat16)
    theta, old = theta.requires_grad_(True), old.requires_grad_(True)
    out = nft_loss(theta, old, x_t, x0, LEVELS, ADVANTAGES)
    assert out.loss.dtype == torch.float32 and out.kl is None
    out.loss.backward()
    assert theta.grad is not None and old.grad is None


def test_argument_errors_name_the_argument():
    x0, _, x_t, theta, old, _ = batch()
    with pytest.raises(ValueError, match="beta=0.0; expected beta > 0"):
        nft_loss(theta, old, x_t, x0, LEVELS, ADVANTAGES, beta=0.0)
    with pytest.raises(ValueError, match="beta=-1; expected beta > 0"):
        implicit_policies(theta, old, -1)
    with pytest.raises(ValueError, match="adv_clip_max=0; expected a positive advantage bound"):
        nft_loss(theta, old, x_t, x0, LEVELS, ADVANTAGES, adv_clip_max=0)
    with pytest.raises(ValueError, match=r"advantages has shape \[3\]; expected \[4\]"):
        nft_loss(theta, old, x_t, x0, LEVELS, ADVANTAGES[:3])
    with pytest.raises(ValueError, match="old_output has shape"):
        nft_loss(theta, old[:, :2], x_t, x0, LEVELS, ADVANTAGES)
