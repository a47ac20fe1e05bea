"""Diffusion models as policies: sample trajectories with log-probs, re-score steps, LoRA, I/O."""

from lightning_sdrl.policies.base import DiffusionPolicy, Trajectory
from lightning_sdrl.policies.class_conditional import ClassConditionalPolicy
from lightning_sdrl.policies.lora import LoRASettings
from lightning_sdrl.policies.text_to_image import (
    RandomTextToImagePolicy,
    StableDiffusionPolicy,
    TextToImageComponents,
    TextToImagePolicy,
)

__all__ = [
    "ClassConditionalPolicy",
    "DiffusionPolicy",
    "LoRASettings",
    "RandomTextToImagePolicy",
    "StableDiffusionPolicy",
    "TextToImageComponents",
    "TextToImagePolicy",
    "Trajectory",
]
