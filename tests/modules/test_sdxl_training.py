"""DDPO, GRPO, ReFL, DiffusionNFT and AWM on the tiny Stable Diffusion XL policy: CLI runs, DDP, LoRA export."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from lightning_sdrl.cli import run_cli
from lightning_sdrl.policies import RandomStableDiffusionXLPolicy
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
    [  # measured on data seeds 0 (the configs') / 5 / 7 / 11; the sign varies for all but ReFL (docs/model_families.md)
        ("ddpo_sdxl", 1.0, 2.0, 0.004),  # +0.0091 / +0.024 / +0.021 / -0.0066
        ("grpo_sdxl", 1.0, 2.0, 0.002),  # +0.0039 / -0.0069 / +0.030 / +0.0031 (1-4: +0.017 +0.044 +0.026 -0.033)
        ("refl_sdxl", 1.0, 2.0, 0.01),  # +0.026 / +0.0043 / +0.014 / +0.027
        ("nft_sdxl", 0.0, 1.0, 0.002),  # +0.0033 / -0.0045 / -0.0047 / +0.0039
        ("awm_sdxl", 0.0, 1.0, 0.001),  # +0.0023 / +0.0053 / -0.0056 / -0.0041
    ],
)
def test_cli_run_on_tiny_sdxl_raises_brightness_and_the_pipeline_loads_its_lora(
    two_torch_threads, config, eta, guidance_scale, rise, tmp_path
):
    """Every algorithm through ``python -m lightning_sdrl fit -c configs/tiny/<config>.yaml``, measured on its
    own sampler (DDPO, GRPO, ReFL: DDIM eta 1 with guidance; NFT, AWM: the ODE without) on paired noise."""
    path = str(ROOT / "configs" / "tiny" / f"{config}.yaml")
    cli = run_cli(
        ["fit", "-c", path, f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"]
        + ["--cpu_threads=2"]  # the measured runs' thread count, see two_torch_threads
    )
    policy = cli.model.policy
    before = fixed_noise_brightness(policy, False, eta, guidance_scale)
    after = fixed_noise_brightness(policy, True, eta, guidance_scale)
    assert after > before + rise, (before, after)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert_the_sdxl_pipeline_loads_the_trained_lora(policy, tmp_path / "trained")


def test_two_process_ddpo_on_tiny_sdxl_stays_in_lockstep(tmp_path):
    records, _ = ddp_fit(tmp_path, "lightning_sdrl.rewards.simple.Brightness", "configs/tiny/ddpo_sdxl.yaml")
    for epoch in range(2):
        rank0 = json.loads((records / f"rank0_epoch{epoch}.json").read_text())
        rank1 = json.loads((records / f"rank1_epoch{epoch}.json").read_text())
        assert rank0["sample_sums"] != rank1["sample_sums"]  # each process sampled its own images
        assert rank0["advantages"] == rank1["advantages"]
        assert rank0["trainable_sum"] == rank1["trainable_sum"]  # one all-reduced update on both
