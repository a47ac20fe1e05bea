"""DDPO, GRPO, ReFL, DiffusionNFT and AWM on the tiny Stable Diffusion XL policy: CLI runs, DDP, LoRA export."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from lightning_sdrl.cli import run_cli
from lightning_sdrl.data.sampling import SamplingDataModule
from lightning_sdrl.modules.awm import AWMModule
from lightning_sdrl.modules.grpo import GRPOModule
from lightning_sdrl.modules.refl import ReFLModule
from lightning_sdrl.policies import LoRASettings, RandomStableDiffusionXLPolicy
from lightning_sdrl.rewards.simple import Brightness
from tests.helpers import lora_snapshot
from tests.modules.test_ddpo import tiny_trainer
from tests.modules.test_ddpo_ddp import ddp_fit

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["a bright square", "a dark circle", "a red sun", "a blue sea"]


def fixed_noise_brightness(policy, lora_on: bool, eta: float, guidance_scale: float) -> float:
    """Mean brightness of 64 samples from fixed noise (paired before/after: no sampling noise)."""
    policy.eval()
    settings = dict(num_steps=4, eta=eta, guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(1234))
    with torch.no_grad():
        if lora_on:
            return float(policy.sample(PROMPTS * 16, **settings).images.mean())
        with policy.reference():
            return float(policy.sample(PROMPTS * 16, **settings).images.mean())


def assert_the_sdxl_pipeline_loads_the_trained_lora(policy, directory):
    """The LoRA in ``directory`` loads into the stock SDXL pipeline and gives the trained UNet's outputs."""
    policy = policy.eval()
    pipe = RandomStableDiffusionXLPolicy("sdxl-tiny", lora=None).components().pipeline()
    assert isinstance(pipe, StableDiffusionXLPipeline)
    pipe.load_lora_weights(directory)
    x = torch.randn(2, *policy.sample_shape, generator=torch.Generator().manual_seed(1))
    conditions = policy.encode_prompts(PROMPTS[:2])
    t = policy.set_num_steps(4)[1].expand(2)
    added = {"text_embeds": conditions["text_embeds"], "time_ids": conditions["time_ids"]}
    with torch.no_grad():
        ours = policy.denoise(x, t, conditions)
        theirs = pipe.unet(x, t, encoder_hidden_states=conditions["encoder_hidden_states"], added_cond_kwargs=added)
    torch.testing.assert_close(theirs.sample, ours, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("config", "eta", "guidance_scale", "rise"),
    [("ddpo_sdxl", 1.0, 2.0, 0.004), ("nft_sdxl", 0.0, 1.0, 0.002)],  # measured: +0.023, +0.006
)
def test_cli_run_on_tiny_sdxl_raises_brightness_and_the_pipeline_loads_its_lora(
    config, eta, guidance_scale, rise, tmp_path
):
    """Each algorithm's own sampler (DDPO: DDIM eta 1 with guidance; NFT: the ODE without) on paired noise."""
    path = str(ROOT / "configs" / "tiny" / f"{config}.yaml")
    cli = run_cli(["fit", "-c", path, f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"])
    policy = cli.model.policy
    before = fixed_noise_brightness(policy, False, eta, guidance_scale)
    after = fixed_noise_brightness(policy, True, eta, guidance_scale)
    assert after > before + rise, (before, after)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert_the_sdxl_pipeline_loads_the_trained_lora(policy, tmp_path / "trained")


def _grpo(policy):
    return GRPOModule(
        policy,
        Brightness(),
        num_steps=3,
        noise_level=1.0,
        guidance_scale=2.0,
        clip_range=0.5,
        sample_grid_every_n_epochs=0,
    )


def test_grpo_trains_the_tiny_sdxl_lora(tmp_path):
    """GRPO updates the LoRA (finite). Its brightness change on this random model was not robust to the data
    seed in short runs (lr 0.2, 6 epochs: +0.018 on seed 0, -0.0002 on seed 5; lr 0.1, 8 epochs: -0.008,
    -0.002), so no reward-rise assertion here: DDPO, ReFL, DiffusionNFT and AWM carry that for SDXL."""
    policy = RandomStableDiffusionXLPolicy("sdxl-tiny", lora=LoRASettings(rank=4))
    before = lora_snapshot(policy)
    data = SamplingDataModule(prompts=["a", "b"], batch_size=4, num_batches_per_epoch=1, group_size=4)
    tiny_trainer(tmp_path, 2).fit(_grpo(policy), data)
    after = lora_snapshot(policy)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in after.values())


def test_awm_on_tiny_sdxl_raises_brightness(tmp_path):
    """On its own sampler (the DDIM ODE); measured +0.0025 and +0.0048 on data seeds 0 and 5."""
    policy = RandomStableDiffusionXLPolicy("sdxl-tiny", lora=LoRASettings(rank=4))
    module = AWMModule(
        policy,
        Brightness(),
        optimizer=lambda params: torch.optim.AdamW(params, lr=0.05),
        num_steps=6,
        train_timesteps=3,
        train_batch_size=8,
        ema_kl_coef=0.1,
        decay_rate=0.1,
        save_trained_on_end=False,
    )
    data = SamplingDataModule(prompts=PROMPTS, batch_size=4, num_batches_per_epoch=8, group_size=4)
    tiny_trainer(tmp_path, 8).fit(module, data)
    before, after = fixed_noise_brightness(policy, False, 0.0, 1.0), fixed_noise_brightness(policy, True, 0.0, 1.0)
    assert after > before + 0.001, (before, after)


def test_refl_on_tiny_sdxl_raises_brightness(tmp_path):
    """Reward gradients through the last DDIM steps; measured +0.017 (data seeds 5, 7: +0.020, +0.011)."""
    policy = RandomStableDiffusionXLPolicy("sdxl-tiny", lora=LoRASettings(rank=4))
    module = ReFLModule(
        policy,
        Brightness(),
        optimizer=lambda params: torch.optim.AdamW(params, lr=0.1),
        num_steps=4,
        eta=1.0,
        guidance_scale=2.0,
        grad_step_range=(2, 4),
        save_trained_on_end=False,
    )
    data = SamplingDataModule(prompts=["a bright square", "a dark circle"], batch_size=4, num_batches_per_epoch=2)
    tiny_trainer(tmp_path, 4).fit(module, data)
    before, after = fixed_noise_brightness(policy, False, 1.0, 2.0), fixed_noise_brightness(policy, True, 1.0, 2.0)
    assert after > before + 0.005, (before, after)


def test_two_process_ddpo_on_tiny_sdxl_stays_in_lockstep(tmp_path):
    records, _ = ddp_fit(tmp_path, "lightning_sdrl.rewards.simple.Brightness", "configs/tiny/ddpo_sdxl.yaml")
    for epoch in range(2):
        rank0 = json.loads((records / f"rank0_epoch{epoch}.json").read_text())
        rank1 = json.loads((records / f"rank1_epoch{epoch}.json").read_text())
        assert rank0["sample_sums"] != rank1["sample_sums"]  # each process sampled its own images
        assert rank0["advantages"] == rank1["advantages"]
        assert rank0["trainable_sum"] == rank1["trainable_sum"]  # one all-reduced update on both
