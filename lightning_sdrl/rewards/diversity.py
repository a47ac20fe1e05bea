"""Diversity rewards against a reference set, and the feature networks ``phi`` they use.

"Training Diffusion Models Towards Diverse Image Generation with Reinforcement Learning":
the generated batch ``X_g`` and a small reference set ``X_r`` are embedded by a frozen network
``phi`` (section 4.1.1: InceptionV3 for class-conditional models, CLIP's image encoder for
text-to-image ones), compared by minus the MMD (eq. 11) or the GP mutual information (eq. 16),
and each image is credited with its marginal utility (eq. 18). The math lives in
:mod:`lightning_sdrl.functional.diversity`.

Feature extractors, each an ``nn.Module`` mapping images ``[B, 3, H, W]`` in ``[0, 1]`` to
``[B, D]``, frozen and kept in eval mode:

* :class:`CLIPImageFeatures`: unit-norm CLIP image embeddings;
* :class:`InceptionFeatures`: InceptionV3 pool features (2048) from a local torchvision file.

The digits miniature's feature network is :class:`lightning_sdrl.digits.features.DigitsFeatures`.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_sdrl.frozen import FrozenModule
from lightning_sdrl.functional.diversity import gp_mi_reward, marginal_utility, mmd_reward
from lightning_sdrl.reference import ReferenceSet
from lightning_sdrl.rewards.base import RewardModule, check_images, score_finite_images
from lightning_sdrl.rewards.reward_model import CLIPEmbedder

__all__ = ["CLIPImageFeatures", "DiversityReward", "InceptionFeatures"]

_SET_REWARDS = {"mmd": mmd_reward, "gp_mi": gp_mi_reward}
# fewest generated images each (kind, individual) needs: mmd's leave-one-out sets need 2 images
_MIN_IMAGES = {("mmd", True): 3, ("mmd", False): 2, ("gp_mi", True): 2, ("gp_mi", False): 1}

INCEPTION_SIZE = 299
"""Input side of InceptionV3."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class CLIPImageFeatures(nn.Module):
    """Unit-norm CLIP image embeddings ``[B, D]`` (``phi`` for text-to-image models).

    Args:
        model_name: open_clip model config (see :class:`CLIPEmbedder`).
        pretrained: Local weights file of ``model_name``; ``None`` leaves the weights random
            (tests only).
    """

    def __init__(self, model_name: str = "ViT-L-14-quickgelu", pretrained: str | None = None) -> None:
        super().__init__()
        self.embedder = CLIPEmbedder(model_name, pretrained=pretrained)

    @property
    def cache_key(self) -> str:
        """Identifies these features for on-disk caches."""
        return f"CLIPImageFeatures:{self.embedder.cache_key}"

    def forward(self, images: Tensor) -> Tensor:
        """Embeddings ``[B, D]`` of images ``[B, 3, H, W]`` in ``[0, 1]``."""
        return self.embedder.encode_images(images)


class InceptionFeatures(FrozenModule):
    """InceptionV3 pool features ``[B, 2048]`` (``phi`` for class-conditional models).

    torchvision's ``inception_v3(weights=None, init_weights=False)`` is built and loaded from a
    local state-dict file in torchvision's layout, e.g. ``inception_v3_google-0cc3c7bd.pth``
    (with or without the ``AuxLogits.*`` keys); its classifier ``fc`` is replaced by the
    identity, so the output is the 2048 average-pooled features. Images are resized to
    ``299 x 299`` (bilinear, antialiased) and normalised with the ImageNet mean and std, which
    is what torchvision's weights expect.

    Not the FID Inception (``pt_inception-2015-12-05``), whose blocks differ slightly: features
    here are for rewards, not for reporting FID comparable with other papers.

    Args:
        weights_path: Local ``.pth`` state dict of torchvision's ``Inception3``.
        transform_input: Re-map ImageNet-normalised inputs to ``[-1, 1]`` inside the model, as
            torchvision does for its ImageNet weights (ported from TensorFlow); ``False`` for
            weights trained on ImageNet-normalised inputs.

    Raises:
        FileNotFoundError: If ``weights_path`` does not exist.
        ValueError: If the file is not an ``Inception3`` state dict.
    """

    def __init__(self, weights_path: str, transform_input: bool = True) -> None:
        super().__init__()
        from torchvision.models import inception_v3

        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"Inception weights file not found: weights_path={weights_path!r}. Download "
                "torchvision's inception_v3_google-0cc3c7bd.pth (or save "
                "inception_v3(weights='DEFAULT').state_dict()) on a machine with internet "
                "access and pass the local file path."
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        aux_logits = any(key.startswith("AuxLogits.") for key in state)
        # built on the meta device: no time spent on a random initialisation that is overwritten
        with torch.device("meta"):
            model = inception_v3(
                weights=None,
                aux_logits=aux_logits,
                init_weights=False,
                transform_input=transform_input,
            )
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as error:
            raise ValueError(
                f"weights_path={weights_path!r} is not a torchvision Inception3 state dict "
                f"({error}); expected the keys of inception_v3().state_dict()"
            ) from error
        model.AuxLogits, model.aux_logits = None, False  # only used in training mode
        model.fc = nn.Identity()  # pool3 features instead of the 1000 ImageNet logits
        self.model = model.requires_grad_(False)
        self.weights_path = str(weights_path)
        self.transform_input = transform_input
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.eval()

    @property
    def cache_key(self) -> str:
        """Identifies these features for on-disk caches (file name and size)."""
        path = Path(self.weights_path)
        size = path.stat().st_size if path.is_file() else -1
        return f"InceptionFeatures:{path.name}:{size}:transform_input={self.transform_input}"

    def preprocess(self, images: Tensor) -> Tensor:
        """Resize to ``299 x 299`` and normalise images ``[B, 3, H, W]`` in ``[0, 1]``."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images have shape {list(images.shape)}; expected [B, 3, H, W] floats in [0, 1]")
        if images.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            images = F.interpolate(
                images,
                size=(INCEPTION_SIZE, INCEPTION_SIZE),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
        return (images.to(self.mean.dtype) - self.mean) / self.std

    def forward(self, images: Tensor) -> Tensor:
        """Pool features ``[B, 2048]``."""
        return self.model(self.preprocess(images))


def _set_reward(kind: str, kernel_args: dict[str, Any]) -> functools.partial:
    if kind not in _SET_REWARDS:
        raise ValueError(f"kind={kind!r}; expected one of {sorted(_SET_REWARDS)}")
    reward_fn = _SET_REWARDS[kind]
    allowed = list(inspect.signature(reward_fn).parameters)[2:]
    unknown = sorted(set(kernel_args) - set(allowed))
    if unknown:
        raise ValueError(
            f"kernel_args has {unknown}, which kind={kind!r} does not take; expected keys "
            f"among {allowed} (the keyword arguments of {reward_fn.__name__})"
        )
    return functools.partial(reward_fn, **kernel_args)


class DiversityReward(FrozenModule, RewardModule):
    """Diversity of the generated batch with respect to a reference set, eq. (6)-(18).

    1. ``Z_g = phi(X_g)`` for the batch, ``Z_r = phi(X_r)`` for the reference set (computed
       once, :meth:`ReferenceSet.features`);
    2. the set reward ``r(Z_g; Z_r)``: minus the unbiased MMD^2 with a polynomial kernel
       (``kind="mmd"``, eq. 11) or the GP mutual information with an RBF kernel
       (``kind="gp_mi"``, eq. 16);
    3. ``individual=True``: each image gets its marginal utility
       ``r(Z_g) - r(Z_g without z_m)`` (eq. 18); else every image gets the set reward.

    The whole batch is one set, so the reward is ``batch_level`` (DDPO hands it the images of
    all processes); for per-condition sets sample one condition per batch. Non-finite images
    get NaN and the set is the finite images alone; if fewer finite images remain than the set
    reward needs (3 for ``mmd`` with ``individual=True``), every image gets NaN.

    Args:
        feature_extractor: Frozen ``phi``, images ``[B, 3, H, W]`` in ``[0, 1]`` -> ``[B, D]``.
        reference: The reference set ``X_r``.
        kind: ``"mmd"`` or ``"gp_mi"``.
        individual: Per-image marginal utilities (the paper's choice) instead of the set reward.
        normalize: L2-normalise both feature sets first (CLIP features already are; useful for
            the digits features with ``gp_mi``, whose default lengthscale 1 suits unit vectors).
        kernel_args: Keyword arguments of the set reward: ``degree``, ``gamma``, ``coef`` of
            :func:`~lightning_sdrl.functional.diversity.mmd_reward`, or ``lengthscale``,
            ``noise``, ``jitter`` of :func:`~lightning_sdrl.functional.diversity.gp_mi_reward`;
            ``None`` keeps their defaults.

    Raises:
        ValueError: If ``kind`` is unknown or ``kernel_args`` has a key ``kind`` does not take.
    """

    batch_level = True

    def __init__(
        self,
        feature_extractor: nn.Module,
        reference: ReferenceSet,
        kind: Literal["mmd", "gp_mi"] = "mmd",
        individual: bool = True,
        normalize: bool = False,
        kernel_args: dict[str, float | int | None] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(feature_extractor, nn.Module):
            raise TypeError(
                f"feature_extractor is a {type(feature_extractor).__name__}; expected an "
                "nn.Module mapping images [B, 3, H, W] to features [B, D]"
            )
        self.feature_extractor = feature_extractor.eval().requires_grad_(False)
        self.reference = reference
        self.kind = kind
        self.individual = individual
        self.normalize = normalize
        self.reward_fn = _set_reward(kind, dict(kernel_args or {}))
        self._reference_features: Tensor | None = None

    def _features(self, features: Tensor) -> Tensor:
        features = features.flatten(1).float()
        return F.normalize(features, dim=-1) if self.normalize else features

    def reference_features(self, device: torch.device | str = "cpu") -> Tensor:
        """``Z_r`` ``[N, D]`` (normalised if ``normalize``) on ``device``, computed once."""
        if self._reference_features is None:
            self._reference_features = self._features(self.reference.features(self.feature_extractor))
        if self._reference_features.device != torch.device(device):
            self._reference_features = self._reference_features.to(device)
        return self._reference_features

    def forward(self, images: Tensor, prompts: list[str], **metadata: Any) -> Tensor:
        """Diversity reward of each image of the batch, ``[B]``.

        Args:
            images: ``[B, 3, H, W]`` in ``[0, 1]``: all images sampled together (``B >= 3``
                for ``mmd`` with ``individual=True``).
            prompts: The ``B`` prompts (unused).
            **metadata: Ignored.
        """
        finite = check_images(images, type(self).__name__)
        if not finite.all() and int(finite.sum()) < _MIN_IMAGES[self.kind, self.individual]:
            finite = torch.zeros_like(finite)  # too few finite images left to compare: all NaN
        return score_finite_images(self._diversity, images, finite, batch_level=True)

    def _diversity(self, images: Tensor) -> Tensor:
        gen_feats = self._features(self.feature_extractor(images))
        ref_feats = self.reference_features(gen_feats.device)
        if self.individual:
            return marginal_utility(self.reward_fn, gen_feats, ref_feats)
        return self.reward_fn(gen_feats, ref_feats).expand(images.shape[0]).clone()
