"""Reward modules (select them by ``class_path`` in YAML); each wraps :mod:`lightning_sdrl.functional`."""

from lightning_sdrl.rewards.attribute import BalanceReward, ShiftReward
from lightning_sdrl.rewards.base import Reward, RewardModule, check_images, check_reward_output, score_finite_images
from lightning_sdrl.rewards.simple import Brightness, JpegCompressibility

__all__ = [
    "BalanceReward",
    "Brightness",
    "JpegCompressibility",
    "Reward",
    "RewardModule",
    "ShiftReward",
    "check_images",
    "check_reward_output",
    "score_finite_images",
]
