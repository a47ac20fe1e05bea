"""Flow-GRPO, DDPO, ReFL, DiffusionNFT and AWM on the tiny FLUX.1 policy: CLI run, DDP, LoRA export."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline

from lightning_sdrl.cli import run_cli
from lightning_sdrl.modules.nft import NFTModule
from lightning_sdrl.policies import LoRASettings, RandomFluxPolicy
from lightning_sdrl.policies.flux import latent_image_ids, pack_latents, unpack_latents
from lightning_sdrl.rewards.simple import Brightness
from tests.modules.test_ddpo_ddp import ddp_fit

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["a bright square", "a dark circle", "a red sun", "a blue sea"]


def fixed_noise_brightness(policy, lora_on: bool) -> float:
    """Mean brightness of 64 SDE samples from fixed noise at guidance 3.5 (paired before/after)."""
    policy.eval()
    settings = dict(num_steps=4, eta=0.7, guidance_scale=3.5, generator=torch.Generator().manual_seed(1234))
    with torch.no_grad():
        if lora_on:
            return float(policy.sample(PROMPTS * 16, **settings).images.mean())
        with policy.reference():
            return float(policy.sample(PROMPTS * 16, **settings).images.mean())


def assert_the_flux_pipeline_loads_the_trained_lora(policy, directory):
    """The LoRA in ``directory`` loads into the stock ``FluxPipeline`` and gives the trained transformer's output."""
    pipe = RandomFluxPolicy("flux-tiny", lora=None).components().pipeline()
    assert isinstance(pipe, FluxPipeline)
    pipe.load_lora_weights(directory)
    x = torch.randn(2, *policy.sample_shape, generator=torch.Generator().manual_seed(1))
    conditions = policy.encode_prompts(PROMPTS[:2])
    t = policy.set_num_steps(4)[1].expand(2)
    hidden = conditions["encoder_hidden_states"]
    with torch.no_grad():
        ours = policy.eval().denoise(x, t, conditions)
        theirs = pipe.transformer(
            hidden_states=pack_latents(x),
            timestep=t / 1000,
            guidance=torch.ones(2),
            pooled_projections=conditions["pooled_projections"],
            encoder_hidden_states=hidden,
            txt_ids=torch.zeros(hidden.shape[1], 3),
            img_ids=latent_image_ids(8, 8),
        ).sample
    torch.testing.assert_close(unpack_latents(theirs, 8, 8), ours, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("config", "rise"),
    [  # measured on data seeds 0 (the configs') / 5
        ("grpo_flux", 0.002),  # +0.0043 / +0.0051 (7, 11: +0.0086, +0.028)
        ("ddpo_flux", 0.003),  # +0.025 / +0.0075
        ("refl_flux", 0.05),  # +0.12 / +0.12
        ("nft_flux", 0.003),  # +0.0081 / +0.013
        ("awm_flux", 0.0015),  # +0.0034 / +0.0049
    ],
)
def test_cli_run_on_tiny_flux_raises_brightness_and_the_flux_pipeline_loads_its_lora(
    two_torch_threads, config, rise, tmp_path
):
    """Every algorithm through ``python -m lightning_sdrl fit -c configs/tiny/<config>.yaml``; brightness of the
    same 64 fixed-noise SDE samples before (adapters off) and after."""
    path = str(ROOT / "configs" / "tiny" / f"{config}.yaml")
    cli = run_cli(
        ["fit", "-c", path, f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"]
        + ["--cpu_threads=2"]  # the measured runs' thread count, see two_torch_threads
    )
    policy = cli.model.policy
    before, after = fixed_noise_brightness(policy, False), fixed_noise_brightness(policy, True)
    assert after > before + rise, (before, after)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert_the_flux_pipeline_loads_the_trained_lora(policy, tmp_path / "trained")


def test_two_process_grpo_on_tiny_flux_stays_in_lockstep(tmp_path):
    records, _ = ddp_fit(tmp_path, "lightning_sdrl.rewards.simple.Brightness", "configs/tiny/grpo_flux.yaml")
    for epoch in range(2):
        rank0 = json.loads((records / f"rank0_epoch{epoch}.json").read_text())
        rank1 = json.loads((records / f"rank1_epoch{epoch}.json").read_text())
        assert rank0["sample_sums"] != rank1["sample_sums"]
        assert rank0["advantages"] == rank1["advantages"]
        assert rank0["trainable_sum"] == rank1["trainable_sum"]


def test_forward_process_training_reads_flux_dev_at_the_guidance_it_samples_with():
    """A guidance-distilled model's guidance is an input: NFT trains its output at the rollouts' 3.5, not at 1."""
    policy = RandomFluxPolicy("flux-tiny", lora=LoRASettings(rank=4), max_sequence_length=16)
    module = NFTModule(policy, Brightness(), num_steps=4, guidance_scale=3.5)
    samples = policy.generate(PROMPTS[:2], num_steps=4, guidance_scale=3.5, generator=torch.Generator())
    x_t, t = torch.randn(2, *policy.sample_shape), policy.set_num_steps(4)[:2]
    with torch.no_grad():
        trained = module.conditional_output(x_t, t, samples)
        expected = policy.guided_prediction(x_t, t, samples.conditions, 3.5)
        unguided = policy.guided_prediction(x_t, t, samples.conditions, 1.0)
    torch.testing.assert_close(trained, expected, rtol=0, atol=0)
    assert (trained - unguided).abs().max() > 1e-4
    assert RandomFluxPolicy("flux-tiny").training_guidance(3.5) == 3.5
