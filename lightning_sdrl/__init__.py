"""lightning_sdrl: reinforcement learning from AI feedback for diffusion models, on Lightning."""

__version__ = "0.1.0"
