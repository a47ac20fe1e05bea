"""PickScore: a CLIP fine-tuned on human preferences between generated images (Pick-a-Pic).

PickScore (Kirstain et al. 2023, "Pick-a-Pic", arXiv:2305.01569) is CLIP ViT-H/14 fine-tuned so
that the image a user picked for a prompt scores higher than the other. It is published as a
transformers ``CLIPModel`` (``yuvalkirstain/PickScore_v1``) used with the processor of the CLIP it
started from (``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``). The score of an image ``x`` for a prompt
``z`` (the reference code of the PickScore repository) is::

    PickScore(x, z) = exp(logit_scale) * cos(E_image(x), E_text(z))        (about 20-23 for real images)

:class:`PickScoreReward` computes it with the image preprocessing done in torch, so gradients reach
the images (ReFL); the steps are those of transformers' ``CLIPImageProcessor``:

1. resize the shorter side to ``size["shortest_edge"]`` (bicubic, antialiased), the longer side in
   proportion (truncated to an integer, as transformers does);
2. crop the centre ``crop_size``;
3. normalise with the processor's ``image_mean`` / ``image_std`` (the ``1/255`` rescaling is already
   done: images are floats in ``[0, 1]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import CLIPModel, CLIPProcessor

from lightning_sdrl.frozen import FrozenModule
from lightning_sdrl.rewards.base import RewardModule, check_prompted_images, score_finite_images

__all__ = ["PICKSCORE_MAX_LENGTH", "PickScoreReward", "pickscore", "resize_shortest_edge_and_crop"]

PICKSCORE_MAX_LENGTH = 77
"""Token length prompts are truncated to (CLIP's context length, as in the PickScore reference code)."""


def resize_shortest_edge_and_crop(images: Tensor, shortest_edge: int, crop_size: tuple[int, int]) -> Tensor:
    """Resize and centre-crop images as transformers' ``CLIPImageProcessor`` does, differentiably.

    Args:
        images: ``[B, 3, H, W]`` floats.
        shortest_edge: Length the shorter side is resized to (bicubic, antialiased); the longer
            side becomes ``int(shortest_edge * long / short)``.
        crop_size: ``(height, width)`` of the centre crop, at most ``shortest_edge`` each.

    Returns:
        ``[B, 3, *crop_size]``.

    Example:
        >>> resize_shortest_edge_and_crop(torch.rand(2, 3, 40, 48), 32, (32, 32)).shape
        torch.Size([2, 3, 32, 32])
    """
    height, width = images.shape[-2:]
    if height <= width:  # 1. shorter side -> shortest_edge (get_resize_output_image_size)
        size = (shortest_edge, int(shortest_edge * width / height))
    else:
        size = (int(shortest_edge * height / width), shortest_edge)
    if size != (height, width):
        images = F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)
    crop_height, crop_width = crop_size  # 2. centre crop, rounding the offsets down as transformers does
    top, left = (size[0] - crop_height) // 2, (size[1] - crop_width) // 2
    return images[..., top : top + crop_height, left : left + crop_width]


def pickscore(image_embeds: Tensor, text_embeds: Tensor, logit_scale: Tensor) -> Tensor:
    """PickScore of each image-prompt pair: ``exp(logit_scale) * cos(image_embeds, text_embeds)``.

    Args:
        image_embeds: ``[B, D]`` projected CLIP image embeddings (any norm).
        text_embeds: ``[B, D]`` projected CLIP text embeddings of each image's prompt.
        logit_scale: The model's scalar ``logit_scale`` (a log temperature).

    Returns:
        ``[B]`` scores.

    Example:
        >>> pickscore(torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor(0.0))
        tensor([0.6000])
    """
    cosine = F.cosine_similarity(image_embeds, text_embeds, dim=-1, eps=0.0)
    return logit_scale.exp() * cosine


def _check_directory(path: str, argument: str, published: str) -> None:
    if not Path(path).is_dir():
        raise FileNotFoundError(
            f"PickScore {argument} directory not found: {argument}={path!r}. Download {published} "
            f"(e.g. `hf download {published} --local-dir DIR`) on a machine with internet access and pass "
            "the local directory."
        )


class PickScoreReward(FrozenModule, RewardModule):
    """PickScore of each image for its prompt (Pick-a-Pic), differentiable with respect to the images.

    ``reward(x, z) = exp(logit_scale) * cos(E_image(x), E_text(z))``, in the units of the PickScore
    reference code (about 20-23 for real images; a softmax over the scores of several images of one
    prompt gives the probability that a user prefers each). Prompts are tokenised by the processor's
    tokenizer, truncated to :data:`PICKSCORE_MAX_LENGTH` tokens. The image preprocessing reads the
    processor's resize, crop, mean and std (see :func:`resize_shortest_edge_and_crop`). Both are
    loaded from local directories only (``local_files_only=True``).

    Args:
        model_path: Local directory of the PickScore ``CLIPModel`` (``yuvalkirstain/PickScore_v1``).
        processor_path: Local directory of its ``CLIPProcessor`` (image processor and tokenizer;
            published as ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``); ``None``: ``model_path``.

    Raises:
        FileNotFoundError: If a directory does not exist.
        OSError: If the processor's tokenizer has no vocabulary (its files are missing), or
            transformers cannot load the model or the processor.
        ValueError: If the image processor does not resize the shortest edge and crop (not a CLIP
            processor).

    Example:
        >>> PickScoreReward("missing/PickScore_v1")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        FileNotFoundError: PickScore model_path directory not found: model_path='missing/PickScore_v1'. ...
    """

    batch_level = False

    def __init__(self, model_path: str, processor_path: str | None = None) -> None:
        super().__init__()
        processor_path = model_path if processor_path is None else processor_path
        _check_directory(model_path, "model_path", "yuvalkirstain/PickScore_v1")
        _check_directory(processor_path, "processor_path", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
        self.model = CLIPModel.from_pretrained(model_path, local_files_only=True).requires_grad_(False)
        processor = CLIPProcessor.from_pretrained(processor_path, local_files_only=True)
        self.tokenizer = processor.tokenizer
        # transformers returns a tokenizer with only its special tokens when the vocabulary files are missing
        if len(self.tokenizer) <= 2:
            raise OSError(
                f"the tokenizer in processor_path={processor_path!r} has no vocabulary ({len(self.tokenizer)} "
                "tokens): its vocab.json / merges.txt or tokenizer.json files are missing. Pass the directory "
                "of laion/CLIP-ViT-H-14-laion2B-s32B-b79K (or re-save the processor with "
                "processor.save_pretrained(DIR))."
            )
        image_processor = processor.image_processor
        size, crop = image_processor.size, image_processor.crop_size
        if not size.get("shortest_edge") or not crop.get("height") or crop["height"] > size["shortest_edge"]:
            raise ValueError(
                f"processor_path={processor_path!r} has an image processor with size={dict(size)} and "
                f"crop_size={dict(crop)}; expected a CLIP processor that resizes the shortest edge and crops "
                "at most that size (e.g. shortest_edge 224, crop 224x224)"
            )
        self.shortest_edge: int = size["shortest_edge"]
        self.crop_size: tuple[int, int] = (crop["height"], crop["width"])
        self.register_buffer("mean", torch.tensor(image_processor.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(image_processor.image_std).view(1, 3, 1, 1), persistent=False)
        self.eval()

    def preprocess(self, images: Tensor) -> Tensor:
        """CLIP pixel values ``[B, 3, *crop_size]`` of images ``[B, 3, H, W]`` in ``[0, 1]`` (differentiable)."""
        pixels = resize_shortest_edge_and_crop(images, self.shortest_edge, self.crop_size)
        return (pixels.to(self.mean.dtype) - self.mean) / self.std  # 3. normalise

    def encode_images(self, images: Tensor) -> Tensor:
        """Projected image embeddings ``[B, D]`` (not normalised) of images ``[B, 3, H, W]`` in ``[0, 1]``."""
        pixels = self.preprocess(images).to(self.model.dtype)
        return self.model.get_image_features(pixel_values=pixels).pooler_output

    def encode_text(self, prompts: Sequence[str]) -> Tensor:
        """Projected text embeddings ``[B, D]`` (not normalised) of ``B`` prompts."""
        tokens = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=PICKSCORE_MAX_LENGTH, return_tensors="pt"
        ).to(self.mean.device)
        return self.model.get_text_features(**tokens).pooler_output

    def forward(self, images: Tensor, prompts: list[str], **metadata: Any) -> Tensor:
        """PickScore ``[B]`` of each image with its prompt (NaN for a non-finite image).

        Args:
            images: ``[B, 3, H, W]`` in ``[0, 1]``.
            prompts: The ``B`` prompts the images were generated from.
            **metadata: Ignored.
        """
        finite = check_prompted_images(images, prompts, type(self).__name__)
        text_embeds = self.encode_text(prompts)

        def score(images: Tensor) -> Tensor:
            return pickscore(self.encode_images(images), text_embeds, self.model.logit_scale)

        return score_finite_images(score, images, finite)
