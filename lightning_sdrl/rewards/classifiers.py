"""Frozen image classifiers: images ``[B, 3, H, W]`` in ``[0, 1]`` -> class probabilities ``[B, K]``.

Section III-C of the DDPO debiasing paper judges each generated image with a pretrained
classifier ("gender-classification-2", a ViT). The attribute rewards of
:mod:`lightning_sdrl.rewards.attribute` accept any module of this shape; two are provided here:

* :class:`HFImageClassifier`: any Hugging Face ``AutoModelForImageClassification`` checkpoint,
  e.g. ``rizvandwiki/gender-classification-2``;
* :class:`CLIPZeroShotClassifier`: CLIP scoring the images against one text prompt per class.

The digits miniature's classifier is :class:`lightning_sdrl.digits.classifier.DigitsClassifier`.

Every classifier has a ``labels`` list (the name of each probability column), stays in eval mode
with frozen parameters, and is differentiable with respect to the images, so it can also drive
ReFL-style reward backpropagation.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_sdrl.frozen import FrozenModule
from lightning_sdrl.rewards.reward_model import CLIPEmbedder

__all__ = ["CLIPZeroShotClassifier", "HFImageClassifier", "resize_images"]

# PIL resampling codes of Hugging Face image processors -> the closest torch interpolation mode
_PIL_TO_TORCH_MODE = {0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "bilinear"}


def _check_images(images: Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images have shape {list(images.shape)}; expected [B, 3, H, W] floats in [0, 1]")


def resize_images(
    images: Tensor,
    size: tuple[int, int] | None = None,
    shortest_edge: int | None = None,
    crop_size: tuple[int, int] | None = None,
    mode: str = "bilinear",
) -> Tensor:
    """Differentiable resizing of images ``[B, C, H, W]`` as image processors do it.

    1. ``size=(h, w)``: resize to exactly ``h x w``; or ``shortest_edge=s``: resize so that the
       shorter side is ``s``, keeping the aspect ratio;
    2. ``crop_size=(h, w)``: crop the centre ``h x w``.

    Downsampling is antialiased (``nearest`` excepted), like PIL's resize.

    Args:
        images: ``[B, C, H, W]`` float images.
        size: Exact output size ``(height, width)``; exclusive with ``shortest_edge``.
        shortest_edge: Target length of the shorter side.
        crop_size: Size ``(height, width)`` of the centre crop taken after resizing.
        mode: ``torch.nn.functional.interpolate`` mode.

    Returns:
        The resized (and cropped) images.

    Example:
        >>> resize_images(torch.rand(2, 3, 40, 80), shortest_edge=20, crop_size=(20, 20)).shape
        torch.Size([2, 3, 20, 20])
    """
    if (size is None) == (shortest_edge is None):
        raise ValueError(f"size={size}, shortest_edge={shortest_edge}; give exactly one of the two")
    height, width = images.shape[-2:]
    if shortest_edge is not None:
        scale = shortest_edge / min(height, width)
        size = (max(shortest_edge, round(height * scale)), max(shortest_edge, round(width * scale)))
    if tuple(size) != (height, width):
        options: dict[str, Any] = {} if mode == "nearest" else {"antialias": True}
        if mode in ("bilinear", "bicubic"):
            options["align_corners"] = False
        images = F.interpolate(images, size=tuple(size), mode=mode, **options)
    if crop_size is not None:
        top = (images.shape[-2] - crop_size[0]) // 2
        left = (images.shape[-1] - crop_size[1]) // 2
        images = images[..., top : top + crop_size[0], left : left + crop_size[1]]
    return images


def _size_field(size: Any, name: str) -> int | None:
    """Read ``name`` from a processor size (a dict, or a ``SizeDict`` in transformers >= 5)."""
    if size is None:
        return None
    value = size.get(name) if isinstance(size, dict) else getattr(size, name, None)
    return None if value is None else int(value)


class HFImageClassifier(FrozenModule):
    """A Hugging Face image classifier with differentiable, batched torch preprocessing.

    The model is ``AutoModelForImageClassification.from_pretrained(path)``; its preprocessing is
    read from ``AutoImageProcessor.from_pretrained(path)`` and redone in torch:

    1. resize to ``size`` (``{"height", "width"}``: exactly; ``{"shortest_edge"}``: shorter side,
       aspect kept) with the processor's ``resample`` (nearest, bilinear or bicubic);
    2. centre crop to ``crop_size`` when ``do_center_crop`` is set;
    3. normalise with ``image_mean`` / ``image_std`` when ``do_normalize`` is set.

    Images in ``[0, 1]`` are what the processor's ``do_rescale`` (``x / 255``) produces, so that
    step is already done. Other size conventions (``longest_edge``, ConvNeXT's ``crop_pct``) are
    not supported and raise an error.

    Args:
        pretrained_model_name_or_path: A Hub model id (``"rizvandwiki/gender-classification-2"``,
            the debiasing paper's classifier) or a local folder written by ``save_pretrained`` holding the
            model and its ``preprocessor_config.json``.
        local_files_only: ``True`` never reaches the Hub; ``None`` follows the environment
            (``HF_HUB_OFFLINE=1`` means offline).

    Raises:
        OSError: If the model or processor cannot be loaded (e.g. a Hub id while offline); the
            message says how to provide a local copy.
        ValueError: If the processor's ``size`` uses an unsupported convention.
    """

    def __init__(self, pretrained_model_name_or_path: str, local_files_only: bool | None = None) -> None:
        super().__init__()
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        kwargs = {} if local_files_only is None else {"local_files_only": local_files_only}
        try:
            processor = AutoImageProcessor.from_pretrained(pretrained_model_name_or_path, **kwargs)
            model = AutoModelForImageClassification.from_pretrained(pretrained_model_name_or_path, **kwargs)
        except OSError as error:
            raise OSError(
                f"could not load the image classifier pretrained_model_name_or_path="
                f"{pretrained_model_name_or_path!r} ({error}). Offline (HF_HUB_OFFLINE=1 or "
                "local_files_only=True) it must be a local folder with the model and its "
                "preprocessor_config.json (written by save_pretrained) or a model already in the "
                "Hugging Face cache: download it on a machine with internet access (e.g. "
                "`huggingface-cli download MODEL_ID --local-dir DIR`) and pass DIR."
            ) from error
        self.pretrained_model_name_or_path = pretrained_model_name_or_path
        self.model = model.requires_grad_(False)
        id2label = model.config.id2label
        self.labels: list[str] = [str(id2label[i]) for i in sorted(id2label)]
        self._read_processor(processor)
        self.eval()

    def _read_processor(self, processor: Any) -> None:
        size = processor.size if getattr(processor, "do_resize", True) else None
        height, width = _size_field(size, "height"), _size_field(size, "width")
        shortest = _size_field(size, "shortest_edge")
        if size is not None and (height is None or width is None) and shortest is None:
            raise ValueError(
                f"{type(processor).__name__} of {self.pretrained_model_name_or_path!r} has "
                f"size={size}; HFImageClassifier supports {{'height', 'width'}} or "
                "{'shortest_edge'} (optionally with do_center_crop and crop_size)"
            )
        self.size = (height, width) if height is not None and width is not None else None
        self.shortest_edge = shortest if self.size is None else None
        crop = getattr(processor, "crop_size", None)
        self.crop_size = None
        if getattr(processor, "do_center_crop", False) and crop is not None:
            self.crop_size = (_size_field(crop, "height"), _size_field(crop, "width"))
        resample = getattr(processor, "resample", None)  # 0 is nearest: test for None, not falsy
        self.mode = "bilinear" if resample is None else _PIL_TO_TORCH_MODE.get(int(resample), "bicubic")
        normalize = getattr(processor, "do_normalize", False)
        mean = processor.image_mean if normalize else (0.0, 0.0, 0.0)
        std = processor.image_std if normalize else (1.0, 1.0, 1.0)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, images: Tensor) -> Tensor:
        """Pixel values for the model from images ``[B, 3, H, W]`` in ``[0, 1]``."""
        _check_images(images)
        if self.size is not None or self.shortest_edge is not None:
            images = resize_images(images, self.size, self.shortest_edge, self.crop_size, self.mode)
        pixels = (images.to(self.mean.dtype) - self.mean) / self.std
        return pixels.to(self.model.dtype)

    def forward(self, images: Tensor) -> Tensor:
        """Class probabilities ``[B, K]`` (columns named by :attr:`labels`)."""
        logits = self.model(pixel_values=self.preprocess(images)).logits
        return logits.float().softmax(dim=-1)


class CLIPZeroShotClassifier(nn.Module):
    """CLIP zero-shot classification: softmax over the similarity to one prompt per class.

    ``P(k | x) = softmax_k(temperature * cos(clip_image(x), clip_text(template.format(label_k))))``;
    the class text embeddings are computed once at construction.

    Args:
        labels: Class names, e.g. ``["man", "woman"]``.
        template: Prompt with one ``{}`` replaced by each label.
        model_name: open_clip model config (see :class:`CLIPEmbedder`).
        pretrained: Local weights file of ``model_name``; ``None`` leaves the weights random
            (tests only).
        temperature: Scale of the cosine similarities, CLIP's learnt logit scale (100).

    Raises:
        ValueError: If fewer than two labels are given, they repeat, or ``template`` has no
            ``{}``.
    """

    def __init__(
        self,
        labels: list[str],
        template: str = "a photo of {}",
        model_name: str = "ViT-L-14-quickgelu",
        pretrained: str | None = None,
        temperature: float = 100.0,
    ) -> None:
        super().__init__()
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise ValueError(f"labels={labels!r}; expected at least two distinct class names")
        if "{}" not in template:
            raise ValueError(f"template={template!r} has no '{{}}' to put the label in; e.g. 'a photo of {{}}'")
        if not temperature > 0:
            raise ValueError(f"temperature={temperature}; expected a positive logit scale")
        self.labels = list(labels)
        self.template = template
        self.temperature = float(temperature)
        self.embedder = CLIPEmbedder(model_name, pretrained=pretrained)
        with torch.no_grad():
            text = self.embedder.encode_text([template.format(label) for label in labels])
        self.register_buffer("text_embeds", text, persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        """Class probabilities ``[B, K]`` of images ``[B, 3, H, W]`` in ``[0, 1]``."""
        image_embeds = self.embedder.encode_images(images)
        return (self.temperature * image_embeds @ self.text_embeds.T).softmax(dim=-1)
