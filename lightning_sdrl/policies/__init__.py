"""Diffusion models as policies: sample trajectories with log-probs or final samples, re-score steps, LoRA, I/O."""

from lightning_sdrl.policies.base import DiffusionPolicy, Trajectory
from lightning_sdrl.policies.class_conditional import ClassConditionalPolicy
from lightning_sdrl.policies.conditioning import Conditioning
from lightning_sdrl.policies.flow_kernels import FlowSDEStep
from lightning_sdrl.policies.flux import FluxPolicy, FluxPretrainedPolicy, RandomFluxPolicy
from lightning_sdrl.policies.flux_components import FluxComponents
from lightning_sdrl.policies.kernels import DDIMStep, StepKernel
from lightning_sdrl.policies.lora import LoRASettings
from lightning_sdrl.policies.old_policy import ParameterCopy
from lightning_sdrl.policies.samples import Samples
from lightning_sdrl.policies.sd3 import (
    FLOW_GRPO_LORA_TARGET_MODULES,
    RandomStableDiffusion3Policy,
    SD3Policy,
    StableDiffusion3Policy,
)
from lightning_sdrl.policies.sd3_components import SD3Components
from lightning_sdrl.policies.sdxl import RandomStableDiffusionXLPolicy, SDXLPolicy, StableDiffusionXLPolicy
from lightning_sdrl.policies.sdxl_components import SDXLComponents
from lightning_sdrl.policies.solvers import ODESolver, Solver, solver_scheduler
from lightning_sdrl.policies.text_to_image import (
    RandomTextToImagePolicy,
    StableDiffusionPolicy,
    TextToImageComponents,
    TextToImagePolicy,
)

__all__ = [
    "FLOW_GRPO_LORA_TARGET_MODULES",
    "ClassConditionalPolicy",
    "Conditioning",
    "DDIMStep",
    "DiffusionPolicy",
    "FlowSDEStep",
    "FluxComponents",
    "FluxPolicy",
    "FluxPretrainedPolicy",
    "LoRASettings",
    "ODESolver",
    "ParameterCopy",
    "RandomFluxPolicy",
    "RandomStableDiffusion3Policy",
    "RandomStableDiffusionXLPolicy",
    "RandomTextToImagePolicy",
    "SD3Components",
    "SD3Policy",
    "SDXLComponents",
    "SDXLPolicy",
    "Samples",
    "Solver",
    "StableDiffusion3Policy",
    "StableDiffusionPolicy",
    "StableDiffusionXLPolicy",
    "StepKernel",
    "TextToImageComponents",
    "TextToImagePolicy",
    "Trajectory",
    "solver_scheduler",
]
