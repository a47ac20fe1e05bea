"""The parts of a text-to-image diffusion model, as diffusers components."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer


@dataclass
class TextToImageComponents:
    """The parts of a text-to-image diffusion model (``vae=None`` means pixel-space diffusion)."""

    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler
    vae: AutoencoderKL | None = None

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write every component into its diffusers subfolder of ``directory``."""
        directory = Path(directory)
        for name in ("unet", "text_encoder", "tokenizer", "scheduler", "vae"):
            component = getattr(self, name)
            if component is not None:
                component.save_pretrained(directory / name)
        index = {"_class_name": "StableDiffusionPipeline" if self.vae is not None else "PixelTextToImage"}
        (directory / "model_index.json").write_text(json.dumps(index, indent=2))
        return directory
