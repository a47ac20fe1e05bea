"""What a run leaves for its user: trained weights, before/after grids and summaries, curves."""

import json

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image

from lightning_sdrl.callbacks import AttributeTracker, RewardTracker
from lightning_sdrl.data.sampling import PromptBatch, SamplingDataModule
from lightning_sdrl.digits.classifier import DigitsClassifier
from lightning_sdrl.modules.ddpo import DDPOModule
from lightning_sdrl.modules.refl import ReFLModule
from lightning_sdrl.policies import LoRASettings, RandomTextToImagePolicy
from lightning_sdrl.rewards.simple import Brightness


def trainer(tmp_path, epochs, callbacks, **kwargs):
    options = dict(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
    )
    return pl.Trainer(**{**options, **kwargs})


def test_refl_fit_writes_weights_grids_and_reward_curve(tmp_path):
    policy = RandomTextToImagePolicy("tiny-pixel", lora=LoRASettings(rank=4))
    module = ReFLModule(
        policy,
        Brightness(),
        num_steps=4,
        grad_step_range=(2, 4),
        guidance_scale=2.0,
        reward_weight=1.0,
        optimizer=lambda p: torch.optim.AdamW(p, lr=0.2),
    )
    data = SamplingDataModule(prompts=["a", "b"], batch_size=4, num_batches_per_epoch=2)
    tracker = RewardTracker(num_samples=8, num_grid_images=4, seed=5)
    trainer(tmp_path, 3, [tracker]).fit(module, data)
    assert (tmp_path / "trained" / "pytorch_lora_weights.safetensors").is_file()
    summary = json.loads((tmp_path / "rewards.json").read_text())
    assert [r["epoch"] for r in summary["history"]] == [0, 1, 2]
    assert summary["history"][-1]["reward_mean"] == pytest.approx(float(module.reward_history[-1]))
    # "before" is the pretrained policy on the fixed prompts and noise: recompute it independently
    fresh = ReFLModule(
        RandomTextToImagePolicy("tiny-pixel", lora=LoRASettings(rank=4)),
        Brightness(),
        num_steps=4,
        grad_step_range=(2, 4),
        guidance_scale=2.0,
    )
    batch = PromptBatch(["a", "b"] * 4, torch.tensor([0, 1] * 4), seed=5)
    assert summary["before"] == pytest.approx(float(Brightness()(fresh.sample(batch).images, batch.prompts).mean()))
    assert summary["after"] == pytest.approx(float(Brightness()(module.sample(batch).images, batch.prompts).mean()))
    # ReFL raised brightness on its training batches (~0.50 -> ~0.60). Eight fixed-noise images are too
    # few to show it every time: on some CPUs their mean fell by 0.01 while the batches' rose by 0.09.
    history = [float(r) for r in module.reward_history]
    assert history[-1] > history[0] + 0.03, history
    assert summary["after"] != summary["before"]  # the fine-tuned policy is the one measured "after"
    for name in ("samples_before.png", "samples_after.png", "reward_curve.png"):
        assert (tmp_path / name).stat().st_size > 0
    # 16x16 pixel samples are shown upscaled, four of them, with a caption above
    width, height = Image.open(tmp_path / "samples_before.png").size
    assert width >= 2 * 128 and height > 2 * 128


def tracked_module():
    return DDPOModule(
        RandomTextToImagePolicy("tiny-pixel", lora=LoRASettings(rank=2)),
        Brightness(),
        num_steps=2,
        guidance_scale=1.0,
        train_batch_size=4,
        sample_grid_every_n_epochs=1,
        save_trained_on_end=False,
        optimizer=lambda p: torch.optim.AdamW(p, lr=0.1),
    )


def test_attribute_tracker_before_is_the_pretrained_policy_also_after_a_resume(tmp_path):
    data = SamplingDataModule(prompts=["a digit with a loop"], batch_size=8, num_batches_per_epoch=1)
    module = tracked_module()
    pretrained = {k: v.clone() for k, v in module.policy.named_parameters() if v.requires_grad}
    first = AttributeTracker(DigitsClassifier(), [[0], [6, 8, 9]], num_grid_images=4, summary_samples=32, threshold=0.3)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path / "a", 2, [first, checkpoints], enable_checkpointing=True).fit(module, data)
    before = json.loads((tmp_path / "a" / "attributes.json").read_text())["before"]
    assert json.loads((tmp_path / "a" / "attributes.json").read_text())["summary_samples"] == 32
    moved = any(not torch.equal(pretrained[k], v) for k, v in module.policy.named_parameters() if v.requires_grad)
    assert moved

    # a new fit of the trained module still measures "before" with the LoRA off
    again = AttributeTracker(DigitsClassifier(), [[0], [6, 8, 9]], num_grid_images=4, summary_samples=32, threshold=0.3)
    trainer(tmp_path / "b", 1, [again]).fit(module, data)
    assert json.loads((tmp_path / "b" / "attributes.json").read_text())["before"] == before

    # a resumed run keeps the checkpoint's "before" and does not overwrite samples_before.png
    resumed = AttributeTracker(
        DigitsClassifier(), [[0], [6, 8, 9]], num_grid_images=4, summary_samples=32, threshold=0.3
    )
    directory = tmp_path / "a"
    stamp = (directory / "samples_before.png").stat().st_mtime_ns
    trainer(directory, 3, [resumed]).fit(tracked_module(), data, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    summary = json.loads((directory / "attributes.json").read_text())
    assert summary["before"] == before
    assert [r["epoch"] for r in summary["history"]] == [0, 1, 2]
    assert (directory / "samples_before.png").stat().st_mtime_ns == stamp
    assert (directory / "samples" / "epoch_0002.png").is_file()
