"""The digits miniature's stand-in for CLIP in the preference reward model.

The reward model of the reward-model report reads frozen CLIP ViT-L/14 image and text embeddings. The digits default
has no CLIP worth the name at 16x16, so :class:`DigitsEmbedder` gives the same interface from what
the package ships:

- **image embedding** ``[B, 64]``: the digit as the sklearn digits store it, grayscale at 8x8
  (the canonical 16x16 digit average-pooled by 2), flattened (``image_features="pixels"``), or the
  64 features of the shipped digit feature network (``image_features="features"``). The pixel
  embedding keeps stroke weight and position, which a network trained to tell digits apart
  largely throws away (on held-out real digits a head on the network's features ranks stroke
  thickness correctly for 85% of pairs, one on the 8x8 pixels for 92%).
- **text embedding** ``[B, 64]``: the unit-norm pooled output (end-of-text token) of the digits
  diffusion model's own CLIP-style text encoder, as CLIP's text tower would give.

Both towers are frozen; gradients flow to the input images, so the learned reward can drive ReFL.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import CLIPTextModel

from lightning_sdrl.digits.models import DigitFeatureNet, to_canonical_digits
from lightning_sdrl.digits.policy import DIGITS_DIFFUSION_DIR, PRETRAIN_COMMAND
from lightning_sdrl.frozen import FrozenModule
from lightning_sdrl.policies.loading import load_clip_tokenizer, load_component
from lightning_sdrl.policies.tokenizers import token_ids

__all__ = ["DigitsEmbedder"]

ImageFeatures = Literal["pixels", "features"]
EMBED_DIM = 64


class DigitsEmbedder(FrozenModule):
    """Frozen image and text embeddings ``[B, 64]`` of digits images and prompts.

    Same interface as :class:`~lightning_sdrl.rewards.reward_model.CLIPEmbedder` (``embed_dim``,
    ``cache_key``, ``preprocess`` / ``encode_pixels`` / ``encode_images`` / ``encode_text``), so
    it plugs into :class:`~lightning_sdrl.modules.reward_model.RewardModelModule`,
    :class:`~lightning_sdrl.data.imagereward_db.ImageRewardDataModule` and
    :class:`~lightning_sdrl.rewards.reward_model.LearnedPreferenceReward`.

    Args:
        image_features: ``"pixels"`` (the 8x8 digit, flattened) or ``"features"`` (the shipped
            digit feature network).
        diffusion_dir: Digits diffusion model directory whose ``text_encoder/`` and ``tokenizer/``
            embed the prompts; ``None`` is the model shipped with the package.
        feature_net_dir: Weights of the feature network for ``image_features="features"``;
            ``None`` is the shipped one.

    Example:
        >>> embedder = DigitsEmbedder()
        >>> image, text = embedder(torch.rand(2, 3, 16, 16), ["a handwritten two", "the digit 7"])
        >>> image.shape, text.shape
        (torch.Size([2, 64]), torch.Size([2, 64]))
    """

    def __init__(
        self,
        image_features: ImageFeatures = "pixels",
        diffusion_dir: str | None = None,
        feature_net_dir: str | None = None,
    ) -> None:
        super().__init__()
        if image_features not in ("pixels", "features"):
            raise ValueError(f"image_features={image_features!r}; expected 'pixels' or 'features'")
        self.image_features = image_features
        self.diffusion_dir = diffusion_dir
        self.feature_net_dir = feature_net_dir
        self.model_name = f"digits-{image_features}"
        self.embed_dim = EMBED_DIM
        source = str(DIGITS_DIFFUSION_DIR if diffusion_dir is None else diffusion_dir)
        try:
            self.text_encoder = load_component(CLIPTextModel, source, "text_encoder", local_files_only=True)
            self.tokenizer = load_clip_tokenizer(source, "tokenizer", local_files_only=True)
        except OSError as error:
            raise OSError(
                f"DigitsEmbedder could not load the digits text encoder from '{source}' ({error}). Fix: "
                f"re-install lightning_sdrl, or retrain the digits model with `{PRETRAIN_COMMAND}` and pass "
                "its export directory as diffusion_dir."
            ) from error
        if self.text_encoder.config.hidden_size != EMBED_DIM:
            raise ValueError(
                f"the text encoder in '{source}' has hidden size {self.text_encoder.config.hidden_size}; "
                f"DigitsEmbedder needs {EMBED_DIM} (a digits diffusion model)"
            )
        self.feature_net = DigitFeatureNet.from_pretrained(feature_net_dir) if image_features == "features" else None
        if self.feature_net is not None and self.feature_net.feature_dim != EMBED_DIM:
            raise ValueError(
                f"the feature network in {feature_net_dir!r} gives {self.feature_net.feature_dim} features; "
                f"DigitsEmbedder needs {EMBED_DIM}"
            )
        self.requires_grad_(False)
        self.eval()

    @property
    def cache_key(self) -> str:
        """Identifies the embeddings this encoder produces, for on-disk caches."""
        text = Path(self.diffusion_dir).name if self.diffusion_dir else "shipped"
        image = Path(self.feature_net_dir).name if self.feature_net_dir else "shipped"
        return f"{self.model_name}:text={text}:features={image}"

    @property
    def device(self) -> torch.device:
        """Device of the frozen weights."""
        return next(self.text_encoder.parameters()).device

    def config(self) -> dict[str, str | None]:
        """Constructor arguments that rebuild this embedder (saved with a trained reward head)."""
        return {
            "image_features": self.image_features,
            "diffusion_dir": self.diffusion_dir,
            "feature_net_dir": self.feature_net_dir,
        }

    def preprocess(self, images: Tensor) -> Tensor:
        """Canonical digits ``[B, 1, 16, 16]`` of images ``[B, C, H, W]`` in ``[0, 1]``."""
        return to_canonical_digits(images).float()

    def encode_pixels(self, pixels: Tensor) -> Tensor:
        """Image embeddings ``[B, 64]`` of canonical digits ``[B, 1, 16, 16]``."""
        if self.feature_net is not None:
            return self.feature_net(pixels.to(self.device))
        return F.avg_pool2d(pixels.to(self.device), 2).flatten(1)

    def encode_images(self, images: Tensor) -> Tensor:
        """Image embeddings ``[B, 64]`` of images ``[B, C, H, W]`` in ``[0, 1]`` (differentiable)."""
        return self.encode_pixels(self.preprocess(images))

    def encode_text(self, prompts: Sequence[str]) -> Tensor:
        """Unit-norm text embeddings ``[B, 64]`` of ``B`` prompts."""
        ids = token_ids(self.tokenizer, list(prompts), self.device)
        return F.normalize(self.text_encoder(ids).pooler_output.float(), dim=-1)

    def forward(self, images: Tensor, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Image and text embeddings, each ``[B, 64]``."""
        return self.encode_images(images), self.encode_text(prompts)
