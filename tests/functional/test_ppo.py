import pytest
import torch

from lightning_sdrl.functional.ppo import clip_advantages, ppo_clip_loss, truly_ppo_loss


def test_ppo_clip_loss_matches_a_direct_computation():
    log_prob = torch.tensor([0.05, -0.3, 0.0, 0.2])
    old = torch.zeros(4)
    adv = torch.tensor([1.0, 1.0, -2.0, -1.0])
    eps = 0.1
    out = ppo_clip_loss(log_prob, old, adv, eps)
    expected = []
    for lp, a in zip(log_prob.tolist(), adv.tolist(), strict=True):
        r = torch.tensor(lp).exp().item()
        expected.append(max(-a * r, -a * min(max(r, 1 - eps), 1 + eps)))
    assert out.loss.item() == pytest.approx(sum(expected) / 4, abs=1e-6)
    assert out.clip_fraction.item() == pytest.approx(0.5)  # ratios exp(-0.3), exp(0.2) leave [0.9, 1.1]
    assert out.approx_kl.item() == pytest.approx(0.5 * (log_prob**2).mean().item())


def test_ppo_gradient_vanishes_once_clipped_in_the_advantage_direction():
    log_prob = torch.tensor([0.5], requires_grad=True)
    ppo_clip_loss(log_prob, torch.zeros(1), torch.tensor([1.0]), 0.1).loss.backward()
    assert log_prob.grad.abs().item() == 0.0


def test_truly_ppo_rolls_back_only_outside_the_trust_region_and_moving_away():
    log_prob = torch.tensor([0.1, 0.1, -0.1, 0.1])
    adv = torch.tensor([1.0, 1.0, 1.0, 1.0])
    kl = torch.tensor([0.0, 0.5, 0.5, 0.5])
    out = truly_ppo_loss(log_prob, torch.zeros(4), adv, kl, kl_threshold=0.2, rollback_coef=3.0)
    r = log_prob.exp()
    # sample 0: inside region; sample 1: outside and r*A >= A -> rollback; sample 2: r*A < A -> no rollback
    objective = torch.stack([r[0], r[1] - 3.0 * 0.5, r[2], r[3] - 3.0 * 0.5])
    torch.testing.assert_close(out.loss, -objective.mean())
    assert out.clip_fraction.item() == pytest.approx(0.5)


def test_clip_advantages_and_argument_checks():
    torch.testing.assert_close(clip_advantages(torch.tensor([-7.0, 2.0]), 5.0), torch.tensor([-5.0, 2.0]))
    with pytest.raises(ValueError, match="clip_range"):
        ppo_clip_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), 0.0)
    with pytest.raises(ValueError, match="kl_threshold"):
        truly_ppo_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), 0.0, 1.0)
