import lightning.pytorch as pl
import pytest
import torch

from lightning_sdrl.data.sampling import PromptBatch, SamplingDataModule
from lightning_sdrl.modules.refl import ReFLModule
from lightning_sdrl.policies import LoRASettings, RandomTextToImagePolicy
from lightning_sdrl.rewards.simple import Brightness


def make_module(**kwargs):
    options = dict(num_steps=6, grad_step_range=(3, 6), guidance_scale=2.0)
    options.update(kwargs)
    return ReFLModule(RandomTextToImagePolicy("tiny-pixel", lora=LoRASettings(rank=4)), Brightness(), **options)


def record_grad_calls(module):
    calls = []
    handle = module.policy.unet.register_forward_pre_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    return calls, handle


def test_only_the_chosen_step_carries_gradients_and_kl_starts_at_zero():
    module = make_module()
    calls, handle = record_grad_calls(module)
    out = module.refl_loss(PromptBatch(["a", "b"], torch.tensor([0, 1]), seed=3))
    handle.remove()
    start = int(out["grad_step"])
    assert 3 <= start < 6
    # start no-grad steps, one step with gradients, one no-grad reference call for the KL
    assert calls == [False] * start + [True, False]
    assert out["kl"].item() == 0.0
    out["loss"].backward()
    grads = [p.grad for p in module.policy.trainable_parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_truncated_backprop_runs_the_last_k_steps_with_gradients():
    module = make_module(truncated_backprop_steps=2, kl_weight=0.0)
    calls, handle = record_grad_calls(module)
    out = module.refl_loss(PromptBatch(["a"], torch.tensor([0]), seed=0))
    handle.remove()
    assert calls == [False] * 4 + [True, True]
    assert int(out["grad_step"]) == 4


def test_fit_raises_the_reward_and_kl_grows(tmp_path):
    module = make_module(optimizer=lambda p: torch.optim.AdamW(p, lr=0.2), reward_weight=1.0)
    data = SamplingDataModule(
        prompts=["a", "b"], batch_size=4, num_batches_per_epoch=1, val_samples_per_prompt=4, val_batch_size=4
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=8,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        gradient_clip_val=1.0,
    )
    (before,) = trainer.validate(module, data, verbose=False)
    trainer.fit(module, data)
    assert trainer.callback_metrics["train/kl"] > 0  # the policy moved away from the pretrained one
    (after,) = trainer.validate(module, data, verbose=False)
    assert after["val/reward_mean"] > before["val/reward_mean"] + 0.02


def test_bad_window_is_refused():
    with pytest.raises(ValueError, match="grad_step_range"):
        make_module(grad_step_range=(5, 9))
