"""Post-sampling selection (Table 1 of the diversity reward paper): is the reward a diversity measure?

Without any training, ``O`` images are sampled per condition and a subset of ``M`` of them is
kept: the one with the largest set reward against the condition's reference set ``X_r``, the one
with the smallest, or a random one. If the reward measures how well a set covers ``X_r``, the
union of the max-reward subsets over all conditions covers the real distribution better than
random subsets (higher recall, lower FID) and the min-reward subsets worse.
:func:`post_sampling_selection` runs this protocol on any :class:`DiffusionPolicy`; the subset
search is :func:`~lightning_sdrl.functional.selection.select_subset`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_sdrl.functional.diversity import mmd_reward
from lightning_sdrl.functional.seeding import derive_seed
from lightning_sdrl.functional.selection import select_subset
from lightning_sdrl.metrics.fid import FID
from lightning_sdrl.metrics.precision_recall import PrecisionRecall
from lightning_sdrl.policies.base import DiffusionPolicy
from lightning_sdrl.validation import check_positive_ints

__all__ = ["SELECTION_MODES", "PostSamplingSelection", "SelectionModeResult", "post_sampling_selection"]

RewardFn = Callable[[Tensor, Tensor], Tensor]
SelectionMode = Literal["random", "max", "min"]

SELECTION_MODES: tuple[SelectionMode, ...] = ("random", "max", "min")
"""The three selection criteria of Table 1, baseline first."""


@dataclass
class SelectionModeResult:
    """Evaluation of the subsets kept by one selection mode, over all conditions.

    ``max`` and ``min`` are deterministic (one draw); ``random`` is repeated ``D`` times with
    different seeds on the same sampled images, and its properties are means over the draws.

    Attributes:
        mode: ``"random"``, ``"max"`` or ``"min"``.
        kept: ``[D, G, M]`` indices of the kept images into each group's ``O`` images.
        rewards: ``[D, G]`` set reward of each kept subset against its group's reference.
        fids: ``[D]`` FID of the union of kept images against the evaluation set.
        precisions: ``[D]`` precision of the union of kept images.
        recalls: ``[D]`` recall of the union of kept images.
    """

    mode: SelectionMode
    kept: Tensor
    rewards: Tensor
    fids: Tensor
    precisions: Tensor
    recalls: Tensor

    @property
    def fid(self) -> float:
        """FID, mean over draws."""
        return self.fids.mean().item()

    @property
    def precision(self) -> float:
        """Precision, mean over draws."""
        return self.precisions.mean().item()

    @property
    def recall(self) -> float:
        """Recall, mean over draws."""
        return self.recalls.mean().item()

    @property
    def mean_reward(self) -> float:
        """Set reward of the kept subsets, mean over groups and draws."""
        return self.rewards.double().mean().item()

    def to_dict(self) -> dict[str, float | int | list[float]]:
        """Means, and the per-draw values when there are several draws (JSON-ready)."""
        summary: dict[str, float | int | list[float]] = {
            "fid": self.fid,
            "precision": self.precision,
            "recall": self.recall,
            "mean_reward": self.mean_reward,
            "draws": len(self.fids),
        }
        if len(self.fids) > 1:
            for name in ("fids", "precisions", "recalls"):
                summary[name] = getattr(self, name).tolist()
            summary["mean_rewards"] = self.rewards.double().mean(dim=1).tolist()
        return summary


@dataclass
class PostSamplingSelection:
    """Outcome of :func:`post_sampling_selection`.

    Attributes:
        modes: the :class:`SelectionModeResult` of each mode of :data:`SELECTION_MODES`.
        group_prompts: the prompt of each of the ``G`` groups (each prompt ``groups_per_prompt``
            times, in the order of ``prompts``).
        images: ``[G, O, 3, H, W]`` all sampled images, on the CPU (``kept`` indexes their rows).
        features: ``[G, O, D]`` features of all sampled images, on the CPU.
    """

    modes: dict[str, SelectionModeResult]
    group_prompts: list[str]
    images: Tensor
    features: Tensor

    def to_dict(self) -> dict[str, dict[str, float | int | list[float]]]:
        """``{mode: SelectionModeResult.to_dict()}`` (JSON-ready)."""
        return {mode: result.to_dict() for mode, result in self.modes.items()}


def _check_images(name: str, images: Tensor, minimum: int, fix: str) -> None:
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] < minimum:
        raise ValueError(
            f"{name} has shape {list(images.shape)}; expected [N, 3, H, W] images in [0, 1] with N >= {minimum} ({fix})"
        )


def _check_arguments(
    prompts: Sequence[str],
    reference: Tensor | Sequence[Tensor],
    evaluation_images: Tensor,
    num_sampled: int,
    subset_size: int,
    groups_per_prompt: int,
    random_draws: int,
    k: int,
) -> list[Tensor]:
    """Validate the arguments of :func:`post_sampling_selection`; returns one reference per prompt."""
    if isinstance(prompts, str) or not prompts:
        raise ValueError(f"prompts={prompts!r}; expected a non-empty list of prompts (one condition each)")
    check_positive_ints(
        num_sampled=num_sampled, subset_size=subset_size, groups_per_prompt=groups_per_prompt, random_draws=random_draws
    )
    if subset_size > num_sampled:
        raise ValueError(
            f"subset_size={subset_size} > num_sampled={num_sampled}; the kept subset (M) must be drawn from "
            "the O images sampled per group, so choose M <= O (the paper: O = 10, M = 5)"
        )
    num_kept = len(prompts) * groups_per_prompt * subset_size
    if num_kept <= k:
        raise ValueError(
            f"{len(prompts)} prompts x groups_per_prompt={groups_per_prompt} x subset_size={subset_size} keep "
            f"{num_kept} images per mode; precision/recall with k={k} needs more than {k}: add groups or prompts"
        )
    _check_images("evaluation_images", evaluation_images, k + 1, f"precision/recall with k={k} needs > {k}")
    if isinstance(reference, Tensor):
        references = [reference] * len(prompts)
    else:
        references = list(reference)
        if len(references) != len(prompts):
            raise ValueError(
                f"reference has {len(references)} image sets for {len(prompts)} prompts; give one [N, 3, H, W] "
                "tensor per prompt, in the order of prompts, or a single tensor shared by all prompts"
            )
    for index, images in enumerate(references):
        name = "reference" if isinstance(reference, Tensor) else f"reference[{index}]"
        _check_images(name, images, 2, "the set reward compares each subset with at least 2 reference images")
    return references


@torch.no_grad()
def _extract(feature_extractor: nn.Module, images: Tensor, batch_size: int) -> Tensor:
    """Features ``[N, D]`` of ``images``, ``batch_size`` at a time."""
    return torch.cat([feature_extractor(chunk).flatten(1) for chunk in images.split(batch_size)])


def _sample_groups(
    policy: DiffusionPolicy,
    group_prompts: list[str],
    num_sampled: int,
    feature_extractor: nn.Module,
    seed: int,
    batch_size: int,
    **sampling: float,
) -> tuple[Tensor, Tensor]:
    """Images ``[G, O, 3, H, W]`` of ``O`` samples per group and their features ``[G, O, D]``."""
    groups_per_call = max(1, batch_size // num_sampled)
    images, features = [], []
    for call, start in enumerate(range(0, len(group_prompts), groups_per_call)):
        prompts = [p for p in group_prompts[start : start + groups_per_call] for _ in range(num_sampled)]
        generator = torch.Generator(policy.device).manual_seed(derive_seed(seed, call))
        sampled = policy.sample(prompts, generator=generator, **sampling).images
        images.append(sampled.unflatten(0, (-1, num_sampled)))
        features.append(_extract(feature_extractor, sampled, batch_size).unflatten(0, (-1, num_sampled)))
    return torch.cat(images), torch.cat(features)


def _select_groups(
    features: Tensor,
    ref_feats: list[Tensor],
    subset_size: int,
    reward_fn: RewardFn,
    mode: SelectionMode,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """Kept indices ``[G, M]`` of every group and the set reward ``[G]`` of each kept subset."""
    kept = torch.stack(
        [
            select_subset(group, ref, subset_size, reward_fn, mode, generator)
            for group, ref in zip(features, ref_feats, strict=True)
        ]
    )
    rewards = torch.stack(
        [reward_fn(group[row], ref) for group, row, ref in zip(features, kept, ref_feats, strict=True)]
    )
    return kept, rewards


def _new_metrics(
    feature_extractor: nn.Module, evaluation_images: Tensor, num_features: int, k: int, batch_size: int
) -> tuple[FID, PrecisionRecall]:
    """An FID and a precision/recall metric with the evaluation set added as the real side."""
    # reset() keeps the real side: the evaluation set is embedded once for all modes and draws
    fid = FID(feature_extractor, num_features, reset_real_features=False).to(evaluation_images.device)
    precision_recall = PrecisionRecall(feature_extractor, k=k, reset_real_features=False)
    precision_recall = precision_recall.to(evaluation_images.device)
    for chunk in evaluation_images.split(batch_size):
        fid.update(chunk, real=True)
        precision_recall.update(chunk, real=True)
    return fid, precision_recall


def _evaluate(
    fid: FID, precision_recall: PrecisionRecall, images: Tensor, kept: Tensor, batch_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """FID, precision and recall of the union of the kept images (``[G, O, ...]`` at ``[G, M]``)."""
    kept_images = torch.stack([group[row] for group, row in zip(images, kept, strict=True)]).flatten(0, 1)
    for chunk in kept_images.split(batch_size):
        fid.update(chunk, real=False)
        precision_recall.update(chunk, real=False)
    scores = precision_recall.compute()
    values = (fid.compute(), scores["precision"], scores["recall"])
    fid.reset()
    precision_recall.reset()
    return values


def post_sampling_selection(
    policy: DiffusionPolicy,
    prompts: Sequence[str],
    reference: Tensor | Sequence[Tensor],
    evaluation_images: Tensor,
    feature_extractor: nn.Module,
    num_sampled: int = 10,
    subset_size: int = 5,
    groups_per_prompt: int = 1,
    reward_fn: RewardFn = mmd_reward,
    random_draws: int = 5,
    seed: int = 0,
    num_steps: int = 20,
    eta: float = 1.0,
    guidance_scale: float = 3.0,
    batch_size: int = 200,
    k: int = 3,
) -> PostSamplingSelection:
    """Sample ``O`` images per group, keep ``M`` by max / min / random set reward, evaluate the kept images.

    The protocol of section 5.1 and Table 1 of the diversity reward paper (there ``O = 10``,
    ``M = 5``, 10K groups of ImageNet classes, ``X_r`` = 50 training images of the class):

    1. every prompt forms ``groups_per_prompt`` groups; each group is ``O`` images sampled from
       the policy for that prompt (``batch_size`` images per sampling call, the noise of call
       ``i`` seeded with ``derive_seed(seed, i)``);
    2. ``Z = phi(X)`` for every sampled image and ``Z_r = phi(X_r)`` for each prompt's reference
       (``phi`` = ``feature_extractor``, computed once per image);
    3. in each group, :func:`~lightning_sdrl.functional.selection.select_subset` keeps the ``M``
       images whose set reward ``reward_fn(Z_kept, Z_r)`` is largest (``"max"``), smallest
       (``"min"``), or ``M`` random ones (``"random"``, repeated ``random_draws`` times, draw
       ``d`` seeded with ``derive_seed(seed, d, 1)``). All modes choose among the **same**
       sampled images, so they differ only by the choice;
    4. for each mode (and random draw), the union of the kept images over all groups is compared
       with ``evaluation_images`` by :class:`~lightning_sdrl.metrics.FID` and
       :class:`~lightning_sdrl.metrics.PrecisionRecall` (in ``phi``'s space).

    With exhaustive selection (``C(O, M) <= 10000``; 252 for the paper's sizes) the max subset's
    reward is at least that of any random subset of its group, and the min subset's at most.

    All sampled images are kept until the end (``G * O`` images on the policy's device); the
    feature extractor must live on that device too.

    Args:
        policy: The diffusion model to sample from (put in eval mode here).
        prompts: The conditions, e.g. ``["a handwritten zero", ...]``.
        reference: The reference images ``X_r`` of the set reward, ``[N, 3, H, W]`` in ``[0, 1]``:
            one tensor shared by all prompts, or a sequence with one tensor per prompt.
        evaluation_images: The real images ``[N_eval, 3, H, W]`` in ``[0, 1]`` of the evaluation
            (held out from ``reference`` for an unbiased evaluation).
        feature_extractor: ``phi``, images ``[B, 3, H, W]`` in ``[0, 1]`` -> ``[B, D]``; used for
            both the set reward and the metrics.
        num_sampled: ``O``, images sampled per group.
        subset_size: ``M``, images kept per group (``2 <= M`` for ``mmd_reward``).
        groups_per_prompt: Groups of ``O`` images sampled per prompt.
        reward_fn: Set reward ``(Z_g [M, D], Z_r [N, D]) -> scalar``, e.g. ``mmd_reward`` (eq. 11)
            or a ``functools.partial`` of ``gp_mi_reward`` (eq. 16).
        random_draws: Repetitions of the random selection; its metrics are reported as means.
        seed: Base seed of the sampling noise and the random draws.
        num_steps: DDIM steps.
        eta: DDIM noise weight.
        guidance_scale: Classifier-free guidance weight (1 disables guidance).
        batch_size: Images per sampling call (whole groups; at least one group) and per
            feature-extractor call.
        k: Neighbourhood size of precision/recall.

    Returns:
        A :class:`PostSamplingSelection` with one :class:`SelectionModeResult` per mode.

    Raises:
        ValueError: If ``prompts`` is empty, a size is not a positive int, ``subset_size >
            num_sampled``, a reference or the evaluation set is not ``[N, 3, H, W]`` (or too small),
            the number of references differs from the number of prompts, or fewer than ``k + 1``
            images would be kept per mode.

    Example:
        >>> from lightning_sdrl.policies import TextToImagePolicy
        >>> from lightning_sdrl.policies.architectures import text_to_image_components
        >>> policy = TextToImagePolicy(text_to_image_components("tiny-pixel"), lora=None)  # random weights
        >>> real = torch.rand(40, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        >>> phi = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten())  # mean colour of each quarter
        >>> result = post_sampling_selection(
        ...     policy, ["a cat", "a dog"], real[:20], real[20:], phi,
        ...     num_sampled=6, subset_size=3, groups_per_prompt=2, num_steps=2,
        ... )
        >>> result.modes["max"].kept.shape, result.modes["random"].kept.shape  # [draws, groups, M]
        (torch.Size([1, 4, 3]), torch.Size([5, 4, 3]))
        >>> {mode: round(res.mean_reward, 3) for mode, res in result.modes.items()}
        {'random': -0.028, 'max': -0.019, 'min': -0.039}
    """
    references = _check_arguments(
        prompts, reference, evaluation_images, num_sampled, subset_size, groups_per_prompt, random_draws, k
    )
    policy.eval()
    feature_extractor = feature_extractor.eval()
    device = policy.device

    # 1.-2. sample every group and embed it once; Z_r once per distinct reference tensor
    group_prompts = [prompt for prompt in prompts for _ in range(groups_per_prompt)]
    sampling = {"num_steps": num_steps, "eta": eta, "guidance_scale": guidance_scale}
    images, features = _sample_groups(
        policy, group_prompts, num_sampled, feature_extractor, seed, batch_size, **sampling
    )
    distinct: dict[int, Tensor] = {}
    for ref in references:
        if id(ref) not in distinct:
            distinct[id(ref)] = _extract(feature_extractor, ref.to(device), batch_size)
    group_refs = [distinct[id(ref)] for ref in references for _ in range(groups_per_prompt)]

    # 3.-4. select in every group, then evaluate the union of kept images of each mode and draw
    metrics = _new_metrics(feature_extractor, evaluation_images.to(device), features.shape[2], k, batch_size)
    modes = {}
    for mode in SELECTION_MODES:
        kept, rewards, values = [], [], []
        for draw in range(random_draws if mode == "random" else 1):
            generator = torch.Generator().manual_seed(derive_seed(seed, draw, 1))
            draw_kept, draw_rewards = _select_groups(features, group_refs, subset_size, reward_fn, mode, generator)
            kept.append(draw_kept)
            rewards.append(draw_rewards)
            values.append(_evaluate(*metrics, images, draw_kept, batch_size))
        fids, precisions, recalls = (torch.stack(column).double().cpu() for column in zip(*values, strict=True))
        kept_cpu, rewards_cpu = torch.stack(kept).cpu(), torch.stack(rewards).cpu()
        modes[mode] = SelectionModeResult(mode, kept_cpu, rewards_cpu, fids, precisions, recalls)
    return PostSamplingSelection(modes=modes, group_prompts=group_prompts, images=images.cpu(), features=features.cpu())
