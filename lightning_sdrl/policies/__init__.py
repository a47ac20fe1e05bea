"""Diffusion models as policies: sample trajectories with log-probs, re-score steps, LoRA, I/O."""

from lightning_sdrl.policies.base import DiffusionPolicy, Trajectory
from lightning_sdrl.policies.class_conditional import ClassConditionalPolicy
from lightning_sdrl.policies.conditioning import Conditioning
from lightning_sdrl.policies.flow_kernels import FlowSDEStep
from lightning_sdrl.policies.kernels import DDIMStep, StepKernel
from lightning_sdrl.policies.lora import LoRASettings
from lightning_sdrl.policies.text_to_image import (
    RandomTextToImagePolicy,
    StableDiffusionPolicy,
    TextToImageComponents,
    TextToImagePolicy,
)

__all__ = [
    "ClassConditionalPolicy",
    "Conditioning",
    "DDIMStep",
    "DiffusionPolicy",
    "FlowSDEStep",
    "LoRASettings",
    "RandomTextToImagePolicy",
    "StableDiffusionPolicy",
    "StepKernel",
    "TextToImageComponents",
    "TextToImagePolicy",
    "Trajectory",
]
