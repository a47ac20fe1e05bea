import pytest
import torch

from lightning_sdrl.functional.awm import awm_log_prob, awm_loss, matching_error

SHAPE = (4, 3, 5, 5)
LEVELS = torch.tensor([0.15, 0.4, 0.7, 0.95])
ADVANTAGES = torch.tensor([-7.0, -1.5, 0.4, 6.0])
EPS, POWER = 1e-10, 0.25


def randn(*shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def tensors(dtype=torch.float32):
    return tuple(randn(*SHAPE, seed=s, dtype=dtype) for s in (1, 2, 3, 4, 5, 6))


def reference_target(x0, noise, level, parameterization):
    x0, noise, level = x0.double(), noise.double(), level.double().view(-1, 1, 1, 1)
    return {
        "flow": noise - x0,
        "epsilon": noise,
        "v_prediction": level.sqrt() * noise - (1 - level).sqrt() * x0,
        "sample": x0,
    }[parameterization]


def reference_log_prob(error, t, weighting):
    """The reference's compute_log_prob_awm weightings, in float64."""
    error, t = error.double(), t.double()
    if weighting == "uniform":
        return -error
    if weighting == "t":
        return -t * error
    if weighting == "t2":
        return -(t**2) * error
    return -t * ((error + EPS) ** POWER - EPS**POWER) / POWER


@pytest.mark.parametrize("parameterization", ["flow", "epsilon", "v_prediction", "sample"])
def test_matching_error_is_the_pretraining_loss_per_sample(parameterization):
    output, x0, noise, *_ = tensors()
    expected = (output.double() - reference_target(x0, noise, LEVELS, parameterization)).pow(2).mean(dim=(1, 2, 3))
    actual = matching_error(output, x0, noise, LEVELS, parameterization)
    torch.testing.assert_close(actual.double(), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("weighting", ["uniform", "t", "t2", "huber"])
def test_log_prob_matches_the_reference_weightings(weighting):
    error = torch.tensor([0.0, 1e-6, 0.3, 2.5])
    expected = reference_log_prob(error, LEVELS, weighting)
    torch.testing.assert_close(awm_log_prob(error, LEVELS, weighting).double(), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("parameterization", ["flow", "v_prediction"])
@pytest.mark.parametrize("weighting", ["uniform", "huber"])
def test_loss_matches_the_clipped_surrogate_in_float64(parameterization, weighting):
    output, x0, noise, old, ref, ema = tensors()
    out = awm_loss(output, x0, noise, LEVELS, ADVANTAGES, old, ref, ema, parameterization, weighting, clip_range=0.05)
    t = LEVELS.double() if parameterization == "flow" else (1 - LEVELS.double()).sqrt()
    target = reference_target(x0, noise, LEVELS, parameterization)
    log_prob = reference_log_prob((output.double() - target).pow(2).mean(dim=(1, 2, 3)), t, weighting)
    old_log_prob = reference_log_prob((old.double() - target).pow(2).mean(dim=(1, 2, 3)), t, weighting)
    ratio = (log_prob - old_log_prob).exp()
    advantages = ADVANTAGES.double().clamp(-5, 5) / 5
    loss = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(0.95, 1.05)).mean()
    close = {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(out.log_prob.double(), log_prob, **close)
    torch.testing.assert_close(out.old_log_prob.double(), old_log_prob, **close)
    torch.testing.assert_close(out.ratio.double(), ratio, **close)
    torch.testing.assert_close(out.advantages.double(), advantages, **close)
    torch.testing.assert_close(out.loss.double(), loss, **close)
    torch.testing.assert_close(out.clip_fraction.double(), ((ratio - 1).abs() > 0.05).double().mean())
    for kl, other in ((out.kl, ref), (out.ema_kl, ema)):
        torch.testing.assert_close(kl.double(), (output.double() - other.double()).pow(2).mean(dim=(1, 2, 3)), **close)


def test_without_rescaling_the_advantages_are_only_clipped():
    output, x0, noise, *_ = tensors()
    out = awm_loss(output, x0, noise, LEVELS, ADVANTAGES, adv_clip_max=1.0, advantage_max=None)
    assert torch.equal(out.advantages, torch.tensor([-1.0, -1.0, 0.4, 1.0]))


def test_on_policy_the_ratio_is_one_and_the_gradient_is_advantage_weighted_matching():
    output, x0, noise, *_ = tensors(torch.float64)
    output = output.requires_grad_(True)
    out = awm_loss(output, x0, noise, LEVELS, ADVANTAGES, clip_range=1e-4)
    assert torch.equal(out.ratio, torch.ones(4, dtype=torch.float64)) and out.kl is None and out.ema_kl is None
    assert torch.equal(out.old_log_prob, out.log_prob.detach())
    (grad,) = torch.autograd.grad(out.loss, output)
    # -mean(A grad log p) with log p = -t ((l + e)^p - e^p) / p: each sample's flow-matching loss weighted by A
    log_prob = awm_log_prob(matching_error(output, x0, noise, LEVELS), LEVELS)
    (expected,) = torch.autograd.grad(-(out.advantages * log_prob).mean(), output)
    torch.testing.assert_close(grad, expected, atol=1e-14, rtol=1e-12)


def test_equal_advantages_give_zero_loss_and_gradient():
    output, x0, noise, old, *_ = tensors(torch.float64)
    output = output.requires_grad_(True)
    rewards = torch.full((4,), 0.7, dtype=torch.float64)
    out = awm_loss(output, x0, noise, LEVELS, rewards - rewards.mean(), old)
    (grad,) = torch.autograd.grad(out.loss, output)
    assert out.loss == 0 and torch.equal(grad, torch.zeros_like(grad))


def test_the_clip_cuts_the_gradient_where_ppo_does():
    # errors 0.5 (theta) and 1.5 (old) everywhere: ratio e^2 > 1 + eps for samples 0, 1; swapped, e^-2 for 2, 3
    _, x0, noise, *_ = tensors(torch.float64)
    target = noise - x0
    swap = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64).view(-1, 1, 1, 1)
    output = (target + 0.5 + swap).requires_grad_(True)
    old = target + 1.5 - swap
    advantages = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    out = awm_loss(output, x0, noise, LEVELS, advantages, old, weighting="uniform", clip_range=0.2, adv_clip_max=1.0)
    torch.testing.assert_close(out.ratio, torch.tensor([2.0, 2.0, -2.0, -2.0], dtype=torch.float64).exp())
    assert out.clip_fraction == 1
    (grad,) = torch.autograd.grad(out.loss, output)
    per_sample = grad.flatten(1).abs().sum(1)
    # no gradient where the ratio left the range in the advantage's favour, as PPO; full gradient elsewhere
    assert per_sample[0] == 0 and per_sample[2] == 0
    # the others: d/dv of -A ratio / B with d ratio = ratio d(-l) = -ratio 2 (v - target) / D
    dims = output[0].numel()
    torch.testing.assert_close(grad[1], torch.full_like(grad[1], -(torch.e**2) * 2 * 0.5 / dims / 4))
    torch.testing.assert_close(grad[3], torch.full_like(grad[3], torch.e**-2 * 2 * 1.5 / dims / 4))


def test_argument_errors_name_the_argument_and_the_fix():
    output, x0, noise, *_ = tensors()
    with pytest.raises(ValueError, match=r"weighting='ghuber'; expected one of \['uniform', 't', 't2', 'huber'\]"):
        awm_loss(output, x0, noise, LEVELS, ADVANTAGES, weighting="ghuber")
    with pytest.raises(ValueError, match="clip_range=0; expected a positive PPO clip range"):
        awm_loss(output, x0, noise, LEVELS, ADVANTAGES, clip_range=0)
    with pytest.raises(ValueError, match="adv_clip_max=-1; expected a positive advantage bound"):
        awm_loss(output, x0, noise, LEVELS, ADVANTAGES, adv_clip_max=-1)
    with pytest.raises(ValueError, match="advantage_max=0; expected a positive bound or None"):
        awm_loss(output, x0, noise, LEVELS, ADVANTAGES, advantage_max=0)
    with pytest.raises(ValueError, match="huber_power=0"):
        awm_log_prob(torch.ones(4), LEVELS, huber_power=0)
    with pytest.raises(ValueError, match=r"time has shape \[3\]; expected a scalar or \[4\]"):
        awm_log_prob(torch.ones(4), LEVELS[:3])
    with pytest.raises(ValueError, match=r"advantages has shape \[3\]; expected \[4\]"):
        awm_loss(output, x0, noise, LEVELS, ADVANTAGES[:3])
