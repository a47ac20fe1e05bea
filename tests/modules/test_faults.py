"""Fault injection: diverging runs, NaN rewards and gradients, bad checkpoints, bad arguments."""

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file
from torch import nn

from lightning_sdrl.data.sampling import SamplingDataModule
from lightning_sdrl.functional.advantages import BatchNormalizedAdvantages
from lightning_sdrl.functional.stat_tracking import batch_advantages
from lightning_sdrl.modules.ddpo import DDPOModule
from lightning_sdrl.modules.guards import NonFiniteGuard
from lightning_sdrl.modules.refl import ReFLModule
from lightning_sdrl.policies import LoRASettings, RandomTextToImagePolicy
from lightning_sdrl.rewards.simple import Brightness
from tests.helpers import NaNOnceReward, lora_snapshot


class AlwaysNaNReward(nn.Module):
    def forward(self, images, prompts, **metadata):
        return torch.full((len(images),), float("nan"))


def trainer(tmp_path, epochs=1, **kwargs):
    options = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    return pl.Trainer(**{**options, **kwargs})


def policy():
    return RandomTextToImagePolicy("tiny-pixel", lora=LoRASettings(rank=4))


def ddpo(reward=None, **kwargs):
    options = dict(
        num_steps=3,
        guidance_scale=2.0,
        train_batch_size=4,
        clip_range=0.1,
        advantages=BatchNormalizedAdvantages(),
        sample_grid_every_n_epochs=0,
        save_trained_on_end=False,
    )
    return DDPOModule(policy(), reward or Brightness(), **{**options, **kwargs})


def data(batch_size=4):
    return SamplingDataModule(prompts=["a", "b"], batch_size=batch_size, num_batches_per_epoch=1)


# ---------------------------------------------------------------- non-finite gradients and weights
@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
        lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.1),
    ],
)
def test_guard_skips_a_step_with_non_finite_gradients_exactly(make_optimizer):
    layer = nn.Linear(3, 2)
    optimizer = make_optimizer(layer.parameters())
    layer(torch.ones(1, 3)).sum().backward()
    optimizer.step()  # a first real step, so that the optimiser has state to protect
    weights = {k: v.clone() for k, v in layer.state_dict().items()}
    state = {k: {n: t.clone() for n, t in s.items()} for k, s in optimizer.state_dict()["state"].items()}
    optimizer.zero_grad()
    (layer(torch.ones(1, 3)).sum() * float("nan")).backward()
    guard = NonFiniteGuard(3, "test")
    assert not guard.check_gradients(layer.parameters(), "fix")
    optimizer.step()
    assert all(torch.equal(weights[k], v) for k, v in layer.state_dict().items())
    after = optimizer.state_dict()["state"]
    assert all(torch.equal(state[k][n], after[k][n]) for k in state for n in state[k])
    assert guard.skipped_steps == 1 and guard.consecutive_skips == 1


def test_guard_stops_after_consecutive_skips_and_resets_on_success():
    guard = NonFiniteGuard(2, "DDPO")
    bad = nn.Parameter(torch.ones(1))
    bad.grad = torch.tensor([float("inf")])
    assert not guard.check_gradients([bad], "Lower it.")
    good = nn.Parameter(torch.ones(1))
    good.grad = torch.ones(1)
    assert guard.check_gradients([good], "Lower it.")
    assert guard.consecutive_skips == 0
    bad.grad = torch.tensor([float("nan")])
    guard.check_gradients([bad], "Lower it.")
    bad.grad = torch.tensor([float("nan")])
    with pytest.raises(FloatingPointError, match=r"DDPO: 2 consecutive steps skipped .*Lower it\."):
        guard.check_gradients([bad], "Lower it.")
    assert guard.skipped_steps == 3


def test_diverging_ddpo_run_stops_with_a_clear_error_and_writes_no_non_finite_weights(tmp_path):
    # The learning rate of the issue: AdamW at 1e4 blows the LoRA up within an epoch or two.
    module = ddpo(optimizer=lambda p: torch.optim.AdamW(p, lr=1e4), save_trained_on_end=True, num_inner_epochs=2)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_epochs=1)
    run = trainer(tmp_path, epochs=20, enable_checkpointing=True, callbacks=[checkpoints])
    with pytest.raises(FloatingPointError, match="consecutive steps skipped.*Lower the learning rate"):
        run.fit(module, data())
    assert not (tmp_path / "trained").exists()
    assert all(torch.isfinite(p).all() for p in module.policy.trainable_parameters())
    for path in (tmp_path / "ckpt").glob("*.ckpt"):
        state = torch.load(path, weights_only=False)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values()), path


def test_non_finite_weights_are_never_saved(tmp_path):
    module = ddpo(save_trained_on_end=True)
    run = trainer(tmp_path)
    run.fit(module, data())
    saved = load_file(tmp_path / "trained" / "pytorch_lora_weights.safetensors")
    assert saved and all(torch.isfinite(v).all() for v in saved.values())
    parameter = next(iter(module.policy.trainable_parameters()))
    with torch.no_grad():
        parameter[0] = float("nan")
    with pytest.raises(FloatingPointError, match="refusing to write checkpoint: 1 of .* not finite"):
        run.save_checkpoint(tmp_path / "bad.ckpt")
    assert not (tmp_path / "bad.ckpt").exists()
    (tmp_path / "trained").rename(tmp_path / "trained_before")
    with pytest.raises(FloatingPointError, match="refusing to write the trained weights"):
        module.on_train_end()
    assert not (tmp_path / "trained").exists()


# ---------------------------------------------------------------- non-finite rewards
def test_one_nan_reward_drops_only_that_sample(tmp_path, caplog):
    module = ddpo(NaNOnceReward())
    before = lora_snapshot(module.policy)
    with caplog.at_level("WARNING", logger="lightning_sdrl"):
        trainer(tmp_path).fit(module, data())
    assert "dropped 1 of 4 samples with a non-finite reward" in caplog.text
    assert module.skipped_epochs == 0 and module.dropped_samples == 1
    update = module.last_update
    assert math.isnan(update.rewards[0]) and math.isnan(update.advantages[0])
    # the advantages of the other samples are those of the finite rewards alone
    torch.testing.assert_close(update.advantages[1:], batch_advantages(update.rewards[1:]), rtol=0, atol=0)
    assert any(not torch.equal(before[k], v) for k, v in lora_snapshot(module.policy).items())
    assert all(torch.isfinite(v).all() for v in lora_snapshot(module.policy).values())


def test_one_nan_reward_trains_on_the_other_samples_as_if_it_was_never_drawn(tmp_path):
    """Dropping a sample equals training on the remaining ones: same update as a run on them alone."""
    module = ddpo(NaNOnceReward(), train_batch_size=8)
    trainer(tmp_path).fit(module, data())
    dropped = lora_snapshot(module.policy)

    reference = ddpo(train_batch_size=8)
    run = trainer(tmp_path)
    captured = {}

    def update(trajectory, rewards):  # train the same epoch's samples minus the first
        captured["rows"] = len(trajectory)
        keep = torch.arange(1, len(trajectory))
        DDPOModule.update(reference, trajectory.select(keep), rewards[keep])

    reference.update = update
    run.fit(reference, data())
    assert captured["rows"] == 4
    reference_weights = lora_snapshot(reference.policy)
    # the shuffles of the inner epoch see 3 rows in both runs, so the updates agree exactly
    assert all(torch.equal(dropped[k], reference_weights[k]) for k in dropped)


def test_an_epoch_with_no_finite_reward_is_skipped_and_repeated_ones_stop_the_run(tmp_path):
    module = ddpo(AlwaysNaNReward(), max_consecutive_skips=3)
    before = lora_snapshot(module.policy)
    trainer(tmp_path, epochs=2).fit(module, data())
    assert module.skipped_epochs == 2 and module.guard.consecutive_skips == 2
    assert all(torch.equal(before[k], v) for k, v in lora_snapshot(module.policy).items())
    with pytest.raises(FloatingPointError, match="3 consecutive steps skipped .*rewards are not finite"):
        trainer(tmp_path, epochs=3).fit(module, data())


# ---------------------------------------------------------------- checkpoints
def fitted_checkpoint(tmp_path):
    module = ddpo()
    run = trainer(tmp_path)
    run.fit(module, data())
    path = tmp_path / "good.ckpt"
    run.save_checkpoint(path)
    return torch.load(path, weights_only=False)


@pytest.mark.parametrize("damage", ["empty", "missing", "foreign"])
def test_checkpoint_that_does_not_match_the_policy_is_refused_naming_the_keys(tmp_path, damage):
    checkpoint = fitted_checkpoint(tmp_path)
    state = checkpoint["state_dict"]
    first = sorted(state)[0]
    if damage == "empty":
        checkpoint["state_dict"] = {}
        pattern = rf"{len(state)} of {len(state)} trainable weights are missing \({first}"
    elif damage == "missing":
        del state[first]
        pattern = rf"1 of {len(state) + 1} trainable weights are missing \({first}\)"
    else:
        checkpoint["state_dict"] = {f"other_model.{k}": v for k, v in state.items()}
        pattern = r"keys match no weight of this module \(other_model\."
    path = tmp_path / f"{damage}.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=pattern):
        trainer(tmp_path / "resume", epochs=2).fit(ddpo(), data(), ckpt_path=path)


def test_good_checkpoint_still_resumes(tmp_path):
    checkpoint = fitted_checkpoint(tmp_path)
    resumed = ddpo()
    trainer(tmp_path / "resume", epochs=1).fit(resumed, data(), ckpt_path=tmp_path / "good.ckpt")
    weights = dict(resumed.named_parameters())
    assert all(torch.equal(weights[k], v) for k, v in checkpoint["state_dict"].items())


def test_refl_checkpoint_with_missing_keys_is_refused(tmp_path):
    module = ReFLModule(policy(), Brightness(), num_steps=4, grad_step_range=(2, 4))
    with pytest.raises(ValueError, match=r"trainable weights are missing"):
        module.on_load_checkpoint({"state_dict": {}})


# ---------------------------------------------------------------- ReFL
class NaNBrightness(nn.Module):
    def forward(self, images, prompts, **metadata):
        return images.mean(dim=(1, 2, 3)) * float("nan")


def test_refl_skips_non_finite_steps_and_stops_after_too_many(tmp_path):
    module = ReFLModule(policy(), NaNBrightness(), num_steps=4, grad_step_range=(2, 4), max_consecutive_skips=2)
    before = lora_snapshot(module.policy)
    with pytest.raises(FloatingPointError, match="ReFL: 2 consecutive steps skipped"):
        trainer(tmp_path, epochs=3).fit(module, data())
    assert module.guard.skipped_steps == 2
    assert all(torch.equal(before[k], v) for k, v in lora_snapshot(module.policy).items())


# ---------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    "argument, value, message",
    [
        ("num_steps", 0, "num_steps=0; expected a positive integer"),
        ("eta", 0.0, "eta=0.0; expected 0 < eta <= 1"),
        ("eta", 1.5, "eta=1.5; expected 0 < eta <= 1"),
        ("clip_range", 0.0, "clip_range=0.0; expected a positive PPO clip range"),
        ("adv_clip_max", -1.0, "adv_clip_max=-1.0; expected a positive advantage bound"),
        ("max_grad_norm", -1.0, "max_grad_norm=-1.0; expected a positive norm, or null"),
        ("guidance_scale", -2.0, "guidance_scale=-2.0; expected >= 0"),
        ("kl_threshold", 0.0, "kl_threshold=0.0; expected a positive trust-region radius"),
        ("kl_reference_coef", -0.1, "kl_reference_coef=-0.1; expected >= 0"),
        ("timestep_fraction", 0.0, "timestep_fraction=0.0; expected 0 < fraction <= 1"),
        ("max_consecutive_skips", 0, "max_consecutive_skips=0; expected a positive integer"),
    ],
)
def test_ddpo_arguments_are_checked_at_construction(argument, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("+", r"\+")):
        DDPOModule(policy(), Brightness(), **{argument: value})


@pytest.mark.parametrize(
    "argument, value, message",
    [("eta", 0.0, "eta=0.0"), ("num_steps", 0, "num_steps=0"), ("kl_weight", -1.0, "kl_weight=-1.0")],
)
def test_refl_arguments_are_checked_at_construction(argument, value, message):
    options = {"num_steps": 4, "grad_step_range": (2, 4), argument: value}
    with pytest.raises(ValueError, match=message):
        ReFLModule(policy(), Brightness(), **options)


# ---------------------------------------------------------------- reward model
def test_reward_model_skips_non_finite_gradients_and_refuses_to_export_nan(tmp_path):
    from lightning_sdrl.modules.reward_model import RewardModelModule
    from tests.helpers import make_tiny_clip, tiny_clip_config

    name, weights, _ = make_tiny_clip(tmp_path, "tiny-clip-faults", tiny_clip_config(16, 1))
    module = RewardModelModule(name, weights, hidden_sizes=(8,), dropout=(), max_consecutive_skips=2)
    optimizer = module.configure_optimizers()
    before = {k: v.clone() for k, v in module.head.state_dict().items()}
    embeds = torch.randn(4, 16)
    (module(embeds, embeds).sum() * float("nan")).backward()
    module.on_before_optimizer_step(optimizer)
    assert all(p.grad is None for p in module.head.parameters())
    optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in module.head.state_dict().items())
    assert module.guard.skipped_steps == 1
    with torch.no_grad():
        next(module.head.parameters())[0] = float("nan")
    with pytest.raises(FloatingPointError, match="refusing to write the reward head"):
        module.export(tmp_path / "head", embeds, embeds)
    assert not (tmp_path / "head").exists()
