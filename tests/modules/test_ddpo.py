import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_sdrl.cli import main, run_cli
from lightning_sdrl.data.sampling import SamplingDataModule
from lightning_sdrl.functional.advantages import PerPromptAdvantages
from lightning_sdrl.modules.ddpo import DDPOModule
from lightning_sdrl.policies import LoRASettings, RandomTextToImagePolicy
from lightning_sdrl.rewards.simple import Brightness
from tests.helpers import NaNOnceReward, WrongShapeReward, lora_snapshot

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny" / "ddpo.yaml")


def tiny_trainer(tmp_path, epochs=1, **kwargs):
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


def tiny_module(reward=None, architecture="tiny-pixel", **kwargs):
    defaults = dict(
        num_steps=3,
        guidance_scale=2.0,
        train_batch_size=4,
        clip_range=0.1,
        advantages=PerPromptAdvantages(min_count=4),
        sample_grid_every_n_epochs=0,
        save_trained_on_end=False,
    )
    defaults.update(kwargs)
    return DDPOModule(
        RandomTextToImagePolicy(architecture, lora=LoRASettings(rank=4)), reward or Brightness(), **defaults
    )


def tiny_data(**kwargs):
    return SamplingDataModule(prompts=["a", "b"], batch_size=4, num_batches_per_epoch=1, **kwargs)


def test_cli_fit_raises_brightness_and_changes_lora(tmp_path):
    cli = run_cli(
        [
            "fit",
            "-c",
            TINY,
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
            "--model.init_args.save_trained_on_end=true",
        ]
    )
    module = cli.model
    lora = {k: v for k, v in module.policy.named_parameters() if "lora_B" in k}
    assert any(v.abs().sum() > 0 for v in lora.values())  # lora_B starts at zero
    rewards = [r.item() for r in module.reward_history]
    assert len(rewards) == 6
    assert sum(rewards[-2:]) / 2 > rewards[0] + 0.05, rewards
    assert (tmp_path / "trained" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "samples" / "epoch_0000.png").is_file()


def test_nan_reward_drops_the_sample_and_the_update_is_applied(tmp_path):
    module = tiny_module(NaNOnceReward())
    before = lora_snapshot(module.policy)
    tiny_trainer(tmp_path, epochs=1).fit(module, tiny_data())
    assert module.skipped_epochs == 0 and module.dropped_samples == 1
    assert any(not torch.equal(before[k], v) for k, v in lora_snapshot(module.policy).items())
    assert torch.isnan(module.last_update.advantages).sum() == 1


def test_wrong_reward_shape_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"WrongShapeReward returned shape \[4, 1\]; expected \[4\]"):
        tiny_trainer(tmp_path).fit(tiny_module(WrongShapeReward()), tiny_data())


@pytest.mark.parametrize(
    "options",
    [
        dict(trust_region="truly", kl_threshold=1e-12, rollback_coef=1.0, num_inner_epochs=2),
        dict(
            kl_reference_coef=0.1,
            cfg_during_training=False,
            timestep_fraction=0.5,
            gradient_accumulation_steps=2,
            train_batch_size=2,
            num_inner_epochs=2,
        ),
    ],
)
def test_trust_region_and_reference_kl_options_train(tmp_path, options):
    module = tiny_module(**options)
    before = lora_snapshot(module.policy)
    tiny_trainer(tmp_path, epochs=1).fit(module, tiny_data())
    assert any(not torch.equal(before[k], v) for k, v in lora_snapshot(module.policy).items())
    metrics = module.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"])
    if "kl_reference_coef" in options:
        # 0 in the first inner epoch (lora_B starts at zero: policy = reference), > 0 once the LoRA moved
        assert metrics["train/kl_reference"] > 0
    else:
        assert metrics["train/clip_fraction"] > 0  # delta ~ 0: every improving step rolls back


def test_checkpoint_holds_only_trainable_weights_and_resumes(tmp_path):
    module = tiny_module()
    trainer = tiny_trainer(tmp_path, epochs=1)
    trainer.fit(module, tiny_data())
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    assert checkpoint["state_dict"] and all("lora_" in key for key in checkpoint["state_dict"])
    assert checkpoint["stat_tracker"]["buffers"]
    resumed = tiny_module()
    tiny_trainer(tmp_path, epochs=2).fit(resumed, tiny_data(), ckpt_path=path)
    assert resumed.tracker.buffers.keys() == module.tracker.buffers.keys()
    assert len(next(iter(resumed.tracker.buffers.values()))) > len(next(iter(module.tracker.buffers.values())))


def test_lr_scheduler_steps_once_per_ddpo_epoch_and_resumes(tmp_path):
    def decay(optimizer):
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.5)

    module = tiny_module(optimizer=lambda params: torch.optim.AdamW(params, lr=0.01), lr_scheduler=decay)
    trainer = tiny_trainer(tmp_path, epochs=2)
    trainer.fit(module, tiny_data())
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.01 * 0.5**2)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    resumed = tiny_module(optimizer=lambda params: torch.optim.AdamW(params, lr=0.01), lr_scheduler=decay)
    trainer = tiny_trainer(tmp_path, epochs=3)
    trainer.fit(resumed, tiny_data(), ckpt_path=path)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.01 * 0.5**3)


def test_validate_logs_mean_reward(tmp_path):
    module = tiny_module()
    data = SamplingDataModule(prompts=["a", "b"], val_samples_per_prompt=2, val_batch_size=2)
    (metrics,) = tiny_trainer(tmp_path, limit_val_batches=None).validate(module, data)
    # by hand: each batch sampled with its own seed and the module's settings, brightness = mean pixel
    rewards = []
    for batch in data.val_dataloader():
        generator = torch.Generator().manual_seed(batch.seed)
        trajectory = module.policy.sample(batch.prompts, num_steps=3, eta=1.0, guidance_scale=2.0, generator=generator)
        rewards.append(trajectory.images.double().mean(dim=(1, 2, 3)))
    rewards = torch.cat(rewards)
    assert len(rewards) == 4 and rewards.std() > 1e-4  # distinct samples: a wrong seed would show
    assert metrics["val/reward_mean"] == pytest.approx(rewards.mean().item(), abs=1e-6)


def test_unknown_config_key_is_an_error_naming_it(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "-c", TINY, "--model.init_args.not_an_option=1"])
    assert "not_an_option" in capsys.readouterr().err


def test_cli_validate_from_checkpoint(tmp_path):
    cli = run_cli(
        [
            "fit",
            "-c",
            TINY,
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_epochs=1",
            "--trainer.enable_progress_bar=false",
        ]
    )
    ckpt = tmp_path / "model.ckpt"
    cli.trainer.save_checkpoint(ckpt)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_sdrl",
            "validate",
            "-c",
            TINY,
            f"--ckpt_path={ckpt}",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "val/reward_mean" in result.stdout
