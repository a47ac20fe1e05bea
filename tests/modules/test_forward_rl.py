"""DiffusionNFT and AWM modules: rollouts, the old policy, zero gradients, guards, arguments, DDPM policies."""

import math

import pytest
import torch

from lightning_sdrl.data.sampling import PromptBatch, SamplingDataModule
from lightning_sdrl.functional.ema import ema_decay
from lightning_sdrl.modules.awm import AWMModule
from lightning_sdrl.modules.forward_process import nft_training_steps, stratified_training_steps
from lightning_sdrl.modules.nft import NFTModule
from lightning_sdrl.policies import LoRASettings, RandomStableDiffusion3Policy, RandomTextToImagePolicy
from lightning_sdrl.policies.old_policy import ParameterCopy
from lightning_sdrl.rewards.base import RewardModule
from lightning_sdrl.rewards.simple import Brightness
from tests.helpers import NaNOnceReward, lora_snapshot
from tests.modules.test_ddpo import tiny_trainer

MODULES = [NFTModule, AWMModule]


def flow_policy():
    return RandomStableDiffusion3Policy("sd3-tiny", lora=LoRASettings(rank=4))


def ddim_policy():
    return RandomTextToImagePolicy("tiny-pixel", lora=LoRASettings(rank=4))


def make(cls, policy=None, reward=None, **kwargs):
    options = dict(num_steps=4, train_batch_size=4, sample_grid_every_n_epochs=0, save_trained_on_end=False)
    if cls is AWMModule:
        options.update(train_timesteps=2, timestep_fraction=1.0)
    return cls(policy or flow_policy(), reward or Brightness(), **{**options, **kwargs})


def data(batch_size=4, group_size=2):
    return SamplingDataModule(prompts=["a", "b"], batch_size=batch_size, num_batches_per_epoch=1, group_size=group_size)


def perturb(policy, scale=0.05, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))


class ConstantReward(RewardModule):
    def forward(self, images, prompts, **metadata):
        return torch.full((len(images),), 0.3)


# ---------------------------------------------------------------- rollouts and the old policy
@pytest.mark.parametrize("cls", MODULES)
def test_rollouts_keep_final_samples_only_and_come_from_the_right_weights(cls):
    module = make(cls)
    perturb(module.policy)  # trained weights != old policy (still the initial copy)
    batch = PromptBatch(prompts=["a", "b"], prompt_ids=torch.tensor([0, 1]), seed=3)
    samples = module.rollout(batch)
    assert not hasattr(samples, "log_probs") and samples.samples.shape == (2, *module.policy.sample_shape)
    module.policy.eval()  # as rollouts are drawn (the tiny T5 has dropout)
    generator = torch.Generator().manual_seed(3)
    if cls is NFTModule:  # DiffusionNFT samples with the old policy ...
        with module.old_policy.swapped_into(module.policy):
            expected = module.policy.generate(["a", "b"], num_steps=4, generator=generator)
    else:  # ... AWM with the trained one
        expected = module.policy.generate(["a", "b"], num_steps=4, generator=generator)
    assert torch.equal(samples.samples, expected.samples)
    other = module.policy.generate(["a", "b"], num_steps=4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(samples.samples, other.samples) == (cls is AWMModule)


@pytest.mark.parametrize("cls", MODULES)
def test_the_old_policy_is_the_ema_of_the_trained_weights_after_each_epoch(cls, tmp_path):
    module = make(cls, optimizer=lambda p: torch.optim.SGD(p, lr=0.5), decay_rate=0.1, max_decay=0.5)
    perturb(module.policy)
    old_before = {k: v.clone() for k, v in module.old_policy.state_dict().items()}
    trainer = tiny_trainer(tmp_path, epochs=1)
    trainer.fit(module, data())
    decay = ema_decay(trainer.global_step, 0.1, 0.5)
    assert trainer.global_step == 1 and decay == pytest.approx(0.1)
    trained = dict(module.policy.named_parameters())
    for name, old in module.old_policy.state_dict().items():
        expected = decay * old_before[name].double() + (1 - decay) * trained[name].detach().double()
        torch.testing.assert_close(old.double(), expected, rtol=0, atol=1e-6)
    assert float(module.trainer.logged_metrics["train/old_policy_decay"]) == pytest.approx(0.1)


@pytest.mark.parametrize("cls", MODULES)
def test_equal_rewards_give_no_policy_gradient(cls, tmp_path):
    """All advantages 0: NFT's two branches cancel at v_theta = v_old, AWM's surrogate is 0 (EMA = theta)."""
    module = make(cls, reward=ConstantReward(), optimizer=lambda p: torch.optim.SGD(p, lr=1.0))
    perturb(module.policy)
    module.old_policy = ParameterCopy(module.policy)  # old = EMA = trained weights
    before = lora_snapshot(module.policy)
    tiny_trainer(tmp_path, epochs=1).fit(module, data())
    for name, value in lora_snapshot(module.policy).items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=1e-6)
    assert float(module.trainer.logged_metrics["train/policy_loss"]) == pytest.approx(
        5.0 * float(module.trainer.logged_metrics["train/positive_loss"]) if cls is NFTModule else 0.0, abs=1e-6
    )


@pytest.mark.parametrize("cls", MODULES)
@pytest.mark.parametrize("policy", [flow_policy, ddim_policy], ids=["flow", "ddim"])
def test_both_model_families_train_and_change_the_lora(cls, policy, tmp_path):
    module = make(cls, policy(), optimizer=lambda p: torch.optim.AdamW(p, lr=0.01))
    assert module.policy.parameterization == ("flow" if policy is flow_policy else "epsilon")
    before = lora_snapshot(module.policy)
    tiny_trainer(tmp_path, epochs=1).fit(module, data())
    after = lora_snapshot(module.policy)
    assert any(not torch.equal(before[k], v) for k, v in after.items())
    assert all(torch.isfinite(v).all() for v in after.values())
    for key in ("train/loss", "train/policy_loss", "train/reward_mean"):
        assert torch.isfinite(module.trainer.logged_metrics[key]), key


def test_training_timesteps_nft_subset_and_awm_strata():
    generator = torch.Generator().manual_seed(0)
    steps = nft_training_steps(64, 10, 0.99, generator)
    assert steps.shape == (64, 9) and all(len(set(row)) == 9 for row in steps.tolist())
    assert set(steps.flatten().tolist()) == set(range(10))  # every step is drawn by some sample
    strata = stratified_training_steps(256, 14, 6, 0.9, generator)
    bounds = [(1, 2), (2, 4), (4, 6), (6, 8), (8, 10), (10, 12)]  # the reference's strata for 14 steps
    for k, (lo, hi) in enumerate(bounds):
        assert set(strata[:, k].tolist()) == set(range(lo, hi))


# ---------------------------------------------------------------- guards and arguments
@pytest.mark.parametrize("cls", MODULES)
def test_a_nan_reward_is_dropped_and_a_diverging_run_stops_with_a_clear_error(cls, tmp_path, caplog):
    module = make(cls, reward=NaNOnceReward())
    with caplog.at_level("WARNING", logger="lightning_sdrl"):
        tiny_trainer(tmp_path, epochs=1).fit(module, data())
    assert f"{cls.algorithm_name} epoch 0: dropped 1 of 4 samples with a non-finite reward" in caplog.text
    assert math.isnan(module.last_update.advantages[0]) and module.dropped_samples == 1
    diverging = make(cls, optimizer=lambda p: torch.optim.SGD(p, lr=1e30), num_inner_epochs=3)
    with pytest.raises(FloatingPointError, match=r"consecutive steps skipped .*[Ll]ower the learning rate"):
        tiny_trainer(tmp_path, epochs=5).fit(diverging, data())
    assert all(torch.isfinite(p).all() for p in diverging.policy.trainable_parameters())


@pytest.mark.parametrize(
    ("cls", "argument", "value", "message"),
    [
        (NFTModule, "beta", 0.0, r"beta=0.0; expected beta > 0"),
        (NFTModule, "adv_clip_max", -1.0, r"adv_clip_max=-1.0; expected a positive advantage clip"),
        (NFTModule, "max_decay", 1.0, r"max_decay=1.0; expected 0 <= max_decay < 1"),
        (NFTModule, "eta", 1.5, r"eta=1.5; expected 0 <= eta <= 1"),
        (NFTModule, "timestep_fraction", 0.0, r"timestep_fraction=0.0"),
        (NFTModule, "solver", "heun", r"solver='heun'; expected one of \['kernel', 'dpmsolver\+\+', 'unipc'\]"),
        (AWMModule, "eta", 0.5, None),
        (AWMModule, "train_timesteps", 4, r"train_timesteps=4 but only 3 sampling steps are eligible"),
        (AWMModule, "weighting", "cubic", r"weighting='cubic'; expected one of \['uniform', 't', 't2', 'huber'\]"),
        (AWMModule, "clip_range", 0.0, r"clip_range=0.0; expected a positive PPO clip range"),
        (AWMModule, "adv_clip_max", 0.0, r"adv_clip_max=0.0; expected a positive advantage clip"),
        (AWMModule, "max_decay", -0.1, r"max_decay=-0.1; expected 0 <= max_decay < 1"),
    ],
)
def test_nonsense_arguments_are_errors_at_construction(cls, argument, value, message):
    if message is None:  # noise with a deterministic solver
        with pytest.raises(ValueError, match=r"eta=0.5 with solver='unipc': the ODE solvers are deterministic"):
            make(cls, solver="unipc", **{argument: value})
        return
    with pytest.raises(ValueError, match=message):
        make(cls, **{argument: value})


@pytest.mark.parametrize("cls", MODULES)
def test_group_relative_advantages_need_groups(cls, tmp_path):
    with pytest.raises(ValueError, match=rf"{cls.algorithm_name} normalises each reward within its prompt's group"):
        tiny_trainer(tmp_path, epochs=1).fit(make(cls), data(group_size=1))
