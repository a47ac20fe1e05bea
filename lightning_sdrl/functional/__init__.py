"""Pure tensor functions: the math of every method, with no Lightning and no I/O."""

from lightning_sdrl.functional.advantages import (
    AdvantageRule,
    BatchNormalizedAdvantages,
    CenteredAdvantages,
    GroupRelativeAdvantages,
    PerPromptAdvantages,
)
from lightning_sdrl.functional.awm import AWMLoss, AWMWeighting, awm_log_prob, awm_loss, matching_error
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
from lightning_sdrl.functional.ema import ema_decay, ema_update
from lightning_sdrl.functional.flow_sde import (
    cps_step_distribution,
    flow_sde_step_distribution,
    flow_sde_step_with_logprob,
)
from lightning_sdrl.functional.forward_process import (
    DDPMPredictionType,
    Parameterization,
    clean_estimate,
    ddpm_clean_estimate,
    ddpm_noise,
    ddpm_target,
    flow_clean_estimate,
    flow_noise,
    flow_target,
    noise_coefficient,
    noise_sample,
    output_kl,
    parameterization_of,
    timestep_to_level,
    training_target,
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
from lightning_sdrl.functional.nft import (
    NFTLoss,
    implicit_policies,
    nft_loss,
    optimality_probability,
    self_normalized_error,
)
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
    "AWMLoss",
    "AWMWeighting",
    "DDIMStepDistribution",
    "DDPMPredictionType",
    "NFTLoss",
    "Parameterization",
    "PerPromptStatTracker",
    "PolicyLoss",
    "StepDistribution",
    "attribute_kl",
    "awm_log_prob",
    "awm_loss",
    "balance_reward",
    "batch_advantages",
    "classify_with_threshold",
    "clean_estimate",
    "clip_advantages",
    "cps_step_distribution",
    "ddim_step_distribution",
    "ddim_step_with_logprob",
    "ddpm_clean_estimate",
    "ddpm_noise",
    "ddpm_target",
    "derive_seed",
    "ema_decay",
    "ema_update",
    "fid_from_features",
    "flow_clean_estimate",
    "flow_noise",
    "flow_sde_step_distribution",
    "flow_sde_step_with_logprob",
    "flow_target",
    "frechet_distance",
    "gaussian_kl_same_std",
    "gaussian_log_prob",
    "gp_mi_reward",
    "grouped_balance_reward",
    "implicit_policies",
    "joint_balance_reward",
    "joint_target",
    "jpeg_compressibility",
    "jpeg_size_kb",
    "marginal_utility",
    "matching_error",
    "mean_brightness",
    "mmd_reward",
    "mmd_subset_rewards",
    "nft_loss",
    "noise_coefficient",
    "noise_sample",
    "optimality_probability",
    "output_kl",
    "pairwise_loss",
    "parameterization_of",
    "polynomial_kernel",
    "ppo_clip_loss",
    "precision_recall",
    "preference_accuracy",
    "ranking_to_pairs",
    "rbf_kernel",
    "sample_step",
    "select_subset",
    "self_normalized_error",
    "shift_reward",
    "step_with_log_prob",
    "timestep_to_level",
    "training_target",
    "truly_ppo_loss",
]
