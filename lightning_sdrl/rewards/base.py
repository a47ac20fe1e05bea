"""The reward interface every DDPO/ReFL reward follows, and the checks applied to its input and output."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

RANGE_TOLERANCE = 1e-6
"""How far outside ``[0, 1]`` a finite pixel may lie (rounding) before :func:`check_images` refuses it."""


@runtime_checkable
class Reward(Protocol):
    """A reward: ``reward(images, prompts, **metadata) -> Tensor[B]``.

    ``images`` are ``[B, 3, H, W]`` floats in ``[0, 1]`` (:func:`check_images`); ``prompts`` is the
    list of ``B`` prompts they were generated from. An image that is not finite (a diverged policy
    draws NaN) gets a NaN reward, which the training loop drops. A reward whose value depends on
    the whole batch (for example the balance reward) sets the attribute ``batch_level = True``:
    under DDP it then receives the images of all processes at once.
    """

    def __call__(self, images: Tensor, prompts: list[str], **metadata: Any) -> Tensor:
        """Score a batch of images."""
        ...


def check_images(images: Any, name: str = "reward") -> Tensor:
    """Raise a clear error unless ``images`` are ``[B, 3, H, W]`` floats in ``[0, 1]``; flag non-finite ones.

    Images with a NaN or infinite pixel are not an error: they are flagged in the returned mask
    (the reward gives them NaN, see :func:`score_finite_images`). The range is checked on the
    finite images, with a tolerance of :data:`RANGE_TOLERANCE`.

    Args:
        images: The batch handed to the reward.
        name: The reward's name, for the messages.

    Returns:
        ``[B]`` bool tensor, ``True`` for the images whose pixels are all finite.

    Raises:
        TypeError: If ``images`` is not a floating-point tensor (e.g. ``uint8``).
        ValueError: If ``images`` is not ``[B, 3, H, W]`` or its finite values are outside ``[0, 1]``.

    Example:
        >>> check_images(torch.tensor([[[[0.5]]], [[[float("nan")]]]]).expand(2, 3, 1, 1))
        tensor([ True, False])
        >>> check_images(torch.full((1, 3, 2, 2), 255.0), "Brightness")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: Brightness got images with values in [255, 255]; expected [0, 1]: rescale them, ...
    """
    if not isinstance(images, Tensor):
        raise TypeError(f"{name} got images of type {type(images).__name__}; expected a torch.Tensor [B, 3, H, W]")
    if not torch.is_floating_point(images):
        raise TypeError(
            f"{name} got images of dtype {images.dtype}; expected floats in [0, 1]: convert with "
            "images.float() / 255 (8-bit images)"
        )
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"{name} got images of shape {list(images.shape)}; expected [B, 3, H, W] (a batch of RGB images): "
            "add the batch dimension with images.unsqueeze(0), repeat a grey channel with "
            "images.expand(-1, 3, -1, -1)"
        )
    pixels = images.detach().flatten(1)
    finite = torch.isfinite(pixels).all(dim=1)
    if finite.any():
        low, high = pixels.amin(dim=1)[finite].min().item(), pixels.amax(dim=1)[finite].max().item()
        if low < -RANGE_TOLERANCE or high > 1.0 + RANGE_TOLERANCE:
            raise ValueError(
                f"{name} got images with values in [{low:.4g}, {high:.4g}]; expected [0, 1]: rescale them, "
                "e.g. (x + 1) / 2 for images in [-1, 1] or x / 255 for 0-255 values (x.clamp(0, 1) if they "
                "only overshoot slightly)"
            )
    return finite


def check_prompted_images(images: Any, prompts: Sequence[str], name: str = "reward") -> Tensor:
    """:func:`check_images`, and one prompt per image; returns the mask of the finite images.

    Example:
        >>> check_prompted_images(torch.zeros(3, 3, 2, 2), ["a", "b"], "PickScoreReward")
        Traceback (most recent call last):
        ...
        ValueError: PickScoreReward got 3 images but 2 prompts; expected one prompt per image
    """
    finite = check_images(images, name)
    if len(prompts) != len(images):
        raise ValueError(f"{name} got {len(images)} images but {len(prompts)} prompts; expected one prompt per image")
    return finite


def score_finite_images(
    score: Callable[[Tensor], Tensor], images: Tensor, finite: Tensor, batch_level: bool = False
) -> Tensor:
    """``score(images) -> [B]`` on the finite images of a batch; NaN for the others.

    * every image finite: ``score(images)``, exactly;
    * per-image rewards (``batch_level=False``): the non-finite images are replaced by black ones,
      so the batch keeps its size and order, and their rewards are set to NaN (no gradient flows
      to them);
    * batch-level rewards: ``score`` sees only the finite images, so the batch statistic (class
      shares, diversity) is theirs alone;
    * no finite image: NaN for all, ``score`` is not called.

    Args:
        score: The reward's computation, ``[b, 3, H, W]`` -> ``[b]``.
        images: ``[B, 3, H, W]`` images.
        finite: ``[B]`` mask of the finite images (:func:`check_images`).
        batch_level: Whether a reward depends on the whole batch.

    Returns:
        ``[B]`` rewards, differentiable where ``score`` is.

    Example:
        >>> images = torch.tensor([0.25, float("nan"), 0.75]).view(3, 1, 1, 1).expand(3, 3, 2, 2)
        >>> centred = lambda x: x.mean(dim=(1, 2, 3)) - x.mean()
        >>> score_finite_images(centred, images, check_images(images), batch_level=True)
        tensor([-0.2500,     nan,  0.2500])
    """
    if bool(finite.all()):
        return score(images)
    if not bool(finite.any()):
        return torch.full((len(images),), float("nan"), dtype=images.dtype, device=images.device)
    if batch_level:
        scored = score(images[finite])
        return scored.new_full((len(images),), float("nan")).index_put((finite,), scored)
    scored = score(images.where(finite.view(-1, 1, 1, 1), 0.0))
    return scored.masked_fill(~finite, float("nan"))


class RewardModule(nn.Module):
    """Base class of every reward of the package, and of rewards written for it.

    A :class:`Reward` that is an ``nn.Module`` (so it moves with the model and is frozen with
    ``eval()``). ``DDPOModule`` and ``ReFLModule`` type their ``reward`` argument with it, so the
    command line lists the rewards by name (``--model.reward.help BalanceReward``) instead of every
    torch module; a reward of your own selected by ``class_path`` subclasses it.

    Attributes:
        batch_level: ``True`` when the reward of an image depends on the whole batch (under DDP it
            then receives the images of all processes at once).
        background: ``True`` when the online RL loop should compute the reward in a background
            thread, overlapping the next batch's sampling (rewards that wait on another machine: a
            reward server, a VLM judge). The rewards are the same numbers as computed in line; such
            a reward must not draw from torch's global random generator (the sampler does).
    """

    batch_level: bool = False
    background: bool = False


def check_reward_output(rewards: Any, batch_size: int, name: str = "reward") -> Tensor:
    """Raise a clear error unless ``rewards`` is a float tensor of shape ``[batch_size]``.

    NaN or infinite values are not an error here: the training loop counts and skips them.

    Example:
        >>> check_reward_output(torch.ones(2, 1), 2)
        Traceback (most recent call last):
        ...
        ValueError: reward returned shape [2, 1]; expected [2] (one scalar per image)
    """
    if not isinstance(rewards, Tensor):
        raise TypeError(f"{name} returned {type(rewards).__name__}; expected a torch.Tensor of shape [{batch_size}]")
    if rewards.shape != (batch_size,):
        raise ValueError(f"{name} returned shape {list(rewards.shape)}; expected [{batch_size}] (one scalar per image)")
    if not torch.is_floating_point(rewards):
        rewards = rewards.float()
    return rewards
