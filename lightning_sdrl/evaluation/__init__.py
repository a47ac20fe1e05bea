"""Evaluation protocols that sample a policy and score the samples: post-sampling selection."""

from lightning_sdrl.evaluation.selection import (
    SELECTION_MODES,
    PostSamplingSelection,
    SelectionModeResult,
    post_sampling_selection,
)

__all__ = ["SELECTION_MODES", "PostSamplingSelection", "SelectionModeResult", "post_sampling_selection"]
