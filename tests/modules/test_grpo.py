"""GRPO: group-relative advantages, group sampling, SDE windows, the module on a DDIM policy."""

import numpy as np
import pytest
import torch

from lightning_sdrl.data.sampling import SamplingDataModule
from lightning_sdrl.functional.advantages import GroupRelativeAdvantages
from lightning_sdrl.modules.ddpo import DDPOModule
from lightning_sdrl.modules.grpo import GRPOModule
from lightning_sdrl.policies import LoRASettings, RandomTextToImagePolicy
from lightning_sdrl.rewards.simple import Brightness
from tests.modules.test_ddpo import tiny_trainer


def numpy_group_advantages(keys, rewards, eps, global_std):
    """Flow-GRPO's per-prompt normalisation written out with numpy (population std)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    out = np.zeros_like(rewards)
    for key in set(keys):
        rows = [i for i, k in enumerate(keys) if k == key]
        std = rewards.std() if global_std else rewards[rows].std()
        out[rows] = (rewards[rows] - rewards[rows].mean()) / (std + eps)
    return out


@pytest.mark.parametrize("global_std", [False, True])
def test_group_relative_advantages_match_numpy(global_std):
    generator = torch.Generator().manual_seed(0)
    keys = [3, 1, 3, 2, 1, 3, 2, 1, 2, 3]
    rewards = torch.randn(10, generator=generator) * 3 + 1
    rule = GroupRelativeAdvantages(eps=1e-4, global_std=global_std)
    got = rule(keys, rewards)
    expected = numpy_group_advantages(keys, rewards.numpy(), 1e-4, global_std)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)
    stats = rule.statistics()
    group_stds = [rewards.numpy()[[i for i, k in enumerate(keys) if k == g]].std() for g in (1, 2, 3)]
    assert stats["group_reward_std"] == pytest.approx(np.mean(group_stds), rel=1e-6)
    assert stats["group_size_min"] == 3


def test_group_relative_advantages_constant_group_and_singleton_give_zero():
    rule = GroupRelativeAdvantages(eps=0.0)
    got = rule(["a", "a", "b", "c", "c"], torch.tensor([2.0, 2.0, 5.0, 1.0, 3.0]))
    assert torch.equal(got, torch.tensor([0.0, 0.0, 0.0, -1.0, 1.0]))
    assert rule.statistics()["zero_std_groups"] == 2
    with pytest.raises(ValueError, match="one key per reward"):
        rule(["a"], torch.tensor([1.0, 2.0]))


def epoch_ids(data, world):
    ranks = []
    for rank in range(world):
        data._where = lambda rank=rank: (3, rank, world)  # noqa: B023 - bound per rank
        ranks.append([batch.prompt_ids for batch in data.train_dataloader()])
    return ranks


def test_group_sampling_repeats_each_prompt_group_size_times_across_ranks():
    data = SamplingDataModule(prompts=list("abcdef"), batch_size=3, num_batches_per_epoch=2, group_size=4)
    ranks = epoch_ids(data, world=2)
    # rank-major order of the global draw: batch j of rank r holds samples (j * W + r) * B ...
    flat = torch.cat([torch.cat([ranks[r][j] for r in range(2)]) for j in range(2)])
    groups = flat.view(-1, 4)
    assert (groups == groups[:, :1]).all()  # consecutive runs of group_size equal ids
    assert len(set(groups[:, 0].tolist())) == 3  # three distinct prompts in the epoch
    # a group spans processes: rank 0's first batch ends inside the group rank 1's starts with
    assert ranks[0][0][-1] == ranks[1][0][0]
    # group_size 1 is the plain draw (unchanged behaviour)
    plain = SamplingDataModule(prompts=list("abcdef"), batch_size=3, num_batches_per_epoch=2)
    ungrouped = SamplingDataModule(prompts=list("abcdef"), batch_size=3, num_batches_per_epoch=2, group_size=1)
    assert all(torch.equal(a, b) for a, b in zip(epoch_ids(plain, 2)[0], epoch_ids(ungrouped, 2)[0], strict=True))


def test_group_size_must_divide_the_epoch():
    data = SamplingDataModule(prompts=["a"], batch_size=3, num_batches_per_epoch=1, group_size=4)
    with pytest.raises(ValueError, match="not a multiple of group_size=4"):
        next(iter(data.train_dataloader()))


def tiny_policy():
    return RandomTextToImagePolicy("tiny-pixel", lora=LoRASettings(rank=4))


def test_sde_window_samples_and_trains_only_inside_the_window(tmp_path):
    module = DDPOModule(
        tiny_policy(),
        Brightness(),
        num_steps=6,
        guidance_scale=1.0,
        train_batch_size=4,
        sde_window_size=2,
        sde_window_range=(1, 5),
        sample_grid_every_n_epochs=0,
        save_trained_on_end=False,
    )
    scored = []
    original = module.policy.step_log_prob

    def recording(trajectory, step, *args):
        scored.append((trajectory.stochastic_mask().cpu(), step.cpu()))
        return original(trajectory, step, *args)

    module.policy.step_log_prob = recording
    data = SamplingDataModule(prompts=["a", "b"], batch_size=4, num_batches_per_epoch=2)
    tiny_trainer(tmp_path, epochs=1).fit(module, data)
    windows = set()
    for mask, step in scored:
        rows = torch.arange(len(step))
        assert mask[rows, step].all()  # every trained step is stochastic
        for row in mask:
            (inside,) = torch.nonzero(row, as_tuple=True)
            assert len(inside) == 2 and inside[1] == inside[0] + 1 and 1 <= inside[0] <= 3
            windows.add(int(inside[0]))
    assert len(scored) == 2 * 2  # 2 train batches x 2 window steps
    # each batch draws its own window from its seed; the draw is reproducible
    batch = next(iter(data.train_dataloader()))
    assert torch.equal(module.sde_steps(batch), module.sde_steps(batch))


def test_deterministic_steps_are_the_kernels_eta0_step_with_zero_log_prob():
    policy = tiny_policy().eval()
    mask = torch.tensor([False, True, False])
    generator = torch.Generator().manual_seed(0)
    trajectory = policy.sample(["a", "b"], num_steps=3, guidance_scale=1.0, generator=generator, sde_steps=mask)
    assert torch.equal(trajectory.stochastic, mask.expand(2, -1))
    assert torch.equal(trajectory.log_probs[:, [0, 2]], torch.zeros(2, 2))
    policy.set_num_steps(3)
    for j in (0, 2):
        x, t = trajectory.latents[:, j], trajectory.timesteps[0, j]
        with torch.no_grad():
            v = policy.guided_prediction(x, t.expand(2), trajectory.conditions, 1.0)
        mean = policy.kernel.distribution(v, t, x, 0.0).mean
        torch.testing.assert_close(trajectory.latents[:, j + 1], mean, rtol=0, atol=0)
    # the stochastic step scores as sampled
    log_prob, _ = policy.step_log_prob(trajectory, torch.tensor([1, 1]), 1.0, 1.0)
    torch.testing.assert_close(log_prob, trajectory.log_probs[:, 1], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="expected \\[3\\]"):
        policy.sample(["a"], num_steps=3, sde_steps=torch.ones(2, dtype=torch.bool))


def test_grpo_on_a_ddim_policy_trains_with_group_advantages_and_kl(tmp_path):
    module = GRPOModule(
        tiny_policy(),
        Brightness(),
        num_steps=3,
        noise_level=1.0,
        guidance_scale=1.0,
        clip_range=0.1,
        beta=0.5,
        sample_grid_every_n_epochs=1,
        save_trained_on_end=False,
    )
    assert module.settings.eta == 1.0 and module.settings.kl_reference_coef == 0.5
    assert module.hparams.noise_level == 1.0 and module.hparams.beta == 0.5 and "eta" not in module.hparams
    data = SamplingDataModule(prompts=["a", "b"], batch_size=4, num_batches_per_epoch=1, group_size=2)
    trainer = tiny_trainer(tmp_path, epochs=2)
    trainer.fit(module, data)
    update = module.last_update
    expected = numpy_group_advantages(update.prompt_ids.tolist(), update.rewards.numpy(), 1e-4, False)
    np.testing.assert_allclose(update.advantages.numpy(), expected, rtol=1e-5, atol=1e-6)
    logged = trainer.logged_metrics
    for key in ("train/reward_mean", "train/reward_std", "train/group_reward_std", "train/kl_reference"):
        assert key in logged, sorted(logged)
    assert float(logged["train/kl_reference"]) > 0  # the second epoch's policy differs from the reference
    assert (tmp_path / "samples" / "epoch_0001.png").is_file()


def test_grpo_refuses_data_without_groups(tmp_path):
    module = GRPOModule(tiny_policy(), Brightness(), num_steps=2, sample_grid_every_n_epochs=0)
    data = SamplingDataModule(prompts=["a", "b"], batch_size=2, num_batches_per_epoch=1)
    with pytest.raises(ValueError, match="group_size >= 2"):
        tiny_trainer(tmp_path).fit(module, data)


def test_window_arguments_are_checked():
    with pytest.raises(ValueError, match="sde_window_size=5"):
        GRPOModule(tiny_policy(), Brightness(), num_steps=4, sde_window_size=5)
    with pytest.raises(ValueError, match="sde_window_range"):
        GRPOModule(tiny_policy(), Brightness(), num_steps=4, sde_window_size=2, sde_window_range=(3, 4))


def test_validation_uses_its_own_steps_and_noise_level(tmp_path):
    module = GRPOModule(
        tiny_policy(), Brightness(), num_steps=2, val_num_steps=5, val_eta=0.0, sample_grid_every_n_epochs=0
    )
    calls = []
    original = module.policy.sample

    def recording(prompts, **kwargs):
        trajectory = original(prompts, **kwargs)
        calls.append((kwargs["num_steps"], kwargs["eta"], trajectory))
        return trajectory

    module.policy.sample = recording
    data = SamplingDataModule(prompts=["a", "b"], batch_size=2, num_batches_per_epoch=1, group_size=2)
    trainer = tiny_trainer(tmp_path, limit_val_batches=1)
    trainer.validate(module, data)
    trainer.fit(module, data)
    validation, training = calls[0], next(call for call in calls if call[0] == 2)
    assert validation[:2] == (5, 0.0) and validation[2].num_steps == 5
    assert not validation[2].stochastic.any()  # eta 0: the deterministic sampler, no log-probs
    assert training[:2] == (2, 0.7) and training[2].stochastic.all()
