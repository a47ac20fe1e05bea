"""Shared fixtures: tiny models built from constructors, fixed seeds, CPU only."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Tiny models are dominated by per-op overhead: one thread is faster than two on a 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tiny_components():
    from lightning_sdrl.policies.architectures import text_to_image_components

    return text_to_image_components("tiny", seed=0)


@pytest.fixture
def tiny_policy(tiny_components):
    from lightning_sdrl.policies import LoRASettings, TextToImagePolicy

    return TextToImagePolicy(tiny_components, lora=LoRASettings(rank=4))


@pytest.fixture
def tiny_sd_dir(tmp_path, tiny_components):
    """A tiny Stable Diffusion written with StableDiffusionPipeline.save_pretrained."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=tiny_components.vae,
        text_encoder=tiny_components.text_encoder,
        tokenizer=tiny_components.tokenizer,
        unet=tiny_components.unet,
        scheduler=tiny_components.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    path = tmp_path / "tiny-sd"
    pipe.save_pretrained(path)
    return path


def randomize_lora(module: torch.nn.Module, scale: float = 0.1) -> None:
    """Give LoRA weights non-zero values (they start at zero), so adapters change outputs."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


@pytest.fixture
def two_torch_threads():
    """Run the test with 2 torch threads (CI's 2 cores), restoring the count afterwards.

    Tests that assert a measured effect of a short run on a tiny random model (the SDXL / FLUX
    training tests) use it: another thread count sums in another order, which can change a small
    effect (GRPO on the tiny SDXL with 1 thread: brightness 0.5072 -> 0.4984 instead of a rise).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)
