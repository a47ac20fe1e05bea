"""Pure tensor functions: the math of every method, with no Lightning and no I/O."""

from lightning_sdrl.functional.advantages import (
    AdvantageRule,
    BatchNormalizedAdvantages,
    CenteredAdvantages,
    GroupRelativeAdvantages,
    PerPromptAdvantages,
)
from lightning_sdrl.functional.classifier_rewards import (
    balance_reward,
    classify_with_threshold,
    grouped_balance_reward,
    joint_balance_reward,
    joint_target,
    shift_reward,
)
from lightning_sdrl.functional.ddim import DDIMStepDistribution, ddim_step_distribution, ddim_step_with_logprob
from lightning_sdrl.functional.diversity import (
    gp_mi_reward,
    marginal_utility,
    mmd_reward,
    mmd_subset_rewards,
    polynomial_kernel,
    rbf_kernel,
)
from lightning_sdrl.functional.flow_sde import (
    cps_step_distribution,
    flow_sde_step_distribution,
    flow_sde_step_with_logprob,
)
from lightning_sdrl.functional.gaussian import (
    StepDistribution,
    gaussian_kl_same_std,
    gaussian_log_prob,
    sample_step,
    step_with_log_prob,
)
from lightning_sdrl.functional.image_rewards import jpeg_compressibility, jpeg_size_kb, mean_brightness
from lightning_sdrl.functional.metrics import attribute_kl, fid_from_features, frechet_distance, precision_recall
from lightning_sdrl.functional.ppo import PolicyLoss, clip_advantages, ppo_clip_loss, truly_ppo_loss
from lightning_sdrl.functional.preference import pairwise_loss, preference_accuracy, ranking_to_pairs
from lightning_sdrl.functional.seeding import derive_seed
from lightning_sdrl.functional.selection import select_subset
from lightning_sdrl.functional.stat_tracking import PerPromptStatTracker, batch_advantages

__all__ = [
    "AdvantageRule",
    "BatchNormalizedAdvantages",
    "CenteredAdvantages",
    "GroupRelativeAdvantages",
    "PerPromptAdvantages",
    "DDIMStepDistribution",
    "PerPromptStatTracker",
    "PolicyLoss",
    "StepDistribution",
    "attribute_kl",
    "balance_reward",
    "batch_advantages",
    "classify_with_threshold",
    "clip_advantages",
    "cps_step_distribution",
    "ddim_step_distribution",
    "ddim_step_with_logprob",
    "derive_seed",
    "fid_from_features",
    "flow_sde_step_distribution",
    "flow_sde_step_with_logprob",
    "frechet_distance",
    "gaussian_kl_same_std",
    "gaussian_log_prob",
    "gp_mi_reward",
    "grouped_balance_reward",
    "joint_balance_reward",
    "joint_target",
    "jpeg_compressibility",
    "jpeg_size_kb",
    "marginal_utility",
    "mean_brightness",
    "mmd_reward",
    "mmd_subset_rewards",
    "pairwise_loss",
    "polynomial_kernel",
    "ppo_clip_loss",
    "precision_recall",
    "preference_accuracy",
    "ranking_to_pairs",
    "rbf_kernel",
    "sample_step",
    "select_subset",
    "shift_reward",
    "step_with_log_prob",
    "truly_ppo_loss",
]
