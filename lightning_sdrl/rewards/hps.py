"""Human Preference Score v2 (HPS v2 / v2.1): an open_clip ViT-H/14 fine-tuned on human preferences.

HPS v2 (Wu et al. 2023, "Human Preference Score v2", arXiv:2306.09341) fine-tunes OpenCLIP
ViT-H/14 on the Human Preference Dataset v2 (HPD v2); v2.1 is the same model trained further. The
published checkpoint (``HPS_v2.1_compressed.pt``, Hugging Face ``xswu/HPSv2``) holds the whole
CLIP as ``{"state_dict": model.state_dict()}``. The score of an image ``x`` for a prompt ``z``
(``hpsv2.score`` of the reference code) is the cosine of the unit-norm embeddings::

    HPS(x, z) = <E_image(x) / |E_image(x)|, E_text(z) / |E_text(z)|>      (about 0.25-0.35)

:class:`HPSv2Reward` computes it with the reference's evaluation transform done in torch, so
gradients reach the images (ReFL):

1. resize the longer side to the model's image size (224), bicubic, the shorter side in proportion
   (:func:`resize_longest_side_and_pad`);
2. pad the shorter side with black to a square, centred (nothing to pad for square images);
3. normalise with the model's mean and std (OpenAI CLIP's);
4. embed with the frozen CLIP (:class:`~lightning_sdrl.rewards.reward_model.CLIPEmbedder`) and
   take the cosine with the prompt's embedding.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_sdrl.frozen import FrozenModule
from lightning_sdrl.rewards.base import RewardModule, check_prompted_images, score_finite_images
from lightning_sdrl.rewards.reward_model import CLIPEmbedder

__all__ = ["HPSv2Reward", "load_hps_state_dict", "resize_longest_side_and_pad"]

HPS_CHECKPOINT_KEY = "state_dict"
"""Key of the model's state dict in the published HPS checkpoints."""


def resize_longest_side_and_pad(images: Tensor, size: int) -> Tensor:
    """HPSv2's evaluation transform (``ResizeMaxSize``) on tensors, differentiably.

    The longer side is resized to ``size`` (bicubic, antialiased; the shorter side to
    ``round(side * size / longer)``), then the shorter side is padded with zeros (black) to
    ``size``, the extra pixel of an odd padding going right / bottom. A square image is only resized.

    Args:
        images: ``[B, 3, H, W]`` floats in ``[0, 1]``.
        size: Side of the square output.

    Returns:
        ``[B, 3, size, size]``.

    Example:
        >>> padded = resize_longest_side_and_pad(torch.ones(1, 3, 4, 8), 4)  # 4x8 -> 2x4
        >>> padded[0, 0].round(decimals=3)  # one black row above, one below
        tensor([[0., 0., 0., 0.],
                [1., 1., 1., 1.],
                [1., 1., 1., 1.],
                [0., 0., 0., 0.]])
    """
    height, width = images.shape[-2:]
    scale = size / max(height, width)
    resized = (round(height * scale), round(width * scale))  # 1. longer side -> size
    if resized != (height, width):
        images = F.interpolate(images, size=resized, mode="bicubic", align_corners=False, antialias=True)
    pad_h, pad_w = size - resized[0], size - resized[1]  # 2. pad (left, right, top, bottom) with black
    if pad_h or pad_w:
        images = F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
    return images


def load_hps_state_dict(checkpoint: str) -> dict[str, Tensor]:
    """Read an HPS checkpoint file: ``{"state_dict": {...}}`` (the published layout) or a plain state dict.

    Args:
        checkpoint: Path of the file (e.g. ``HPS_v2.1_compressed.pt``).

    Returns:
        The open_clip model's state dict (on the CPU).

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If the file is not a dict of tensors, nor one under ``"state_dict"``.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(
            f"HPS checkpoint file not found: checkpoint={checkpoint!r}. Download HPS_v2.1_compressed.pt "
            "(Hugging Face xswu/HPSv2, e.g. `hf download xswu/HPSv2 HPS_v2.1_compressed.pt --local-dir DIR`) "
            "on a machine with internet access and pass the local file path."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # torch's message is long: keep the line naming the object
        lines = str(error).splitlines()
        reason = next((line.strip() for line in lines if "WeightsUnpickler error" in line), lines[0])
        raise ValueError(
            f"checkpoint={checkpoint!r} holds objects other than tensors, which torch.load(weights_only=True) "
            f"refuses ({reason}); expected {{'state_dict': state_dict}} or a plain state dict: re-save only the "
            "state dict, torch.save({'state_dict': model.state_dict()}, path)"
        ) from error
    if isinstance(state, Mapping) and isinstance(state.get(HPS_CHECKPOINT_KEY), Mapping):
        state = state[HPS_CHECKPOINT_KEY]
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        found = sorted(state)[:6] if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(
            f"checkpoint={checkpoint!r} holds {found}; expected the published layout {{'state_dict': "
            "state_dict} or a plain state dict of the open_clip model (keys 'visual.conv1.weight', "
            "'token_embedding.weight', 'logit_scale', ...)"
        )
    return dict(state)


class HPSv2Reward(FrozenModule, RewardModule):
    """HPS v2.1 of each image for its prompt, differentiable with respect to the images.

    ``reward(x, z) = cos(E_image(x), E_text(z))`` with the HPS-fine-tuned open_clip, in the units
    the HPSv2 reference reports (about 0.25-0.35 for real images; no logit scale). The model is
    built from its open_clip config with random weights (nothing is downloaded; open_clip logs "No
    pretrained weights loaded") and the checkpoint is loaded into it. Prompts are tokenised with
    open_clip's tokenizer for ``model_name`` (CLIP's BPE, 77 tokens for ViT-H-14), as in the reference.

    Args:
        checkpoint: Local HPS checkpoint, ``HPS_v2.1_compressed.pt`` (or ``HPS_v2_compressed.pt``
            for HPS v2.0); see :func:`load_hps_state_dict`.
        model_name: open_clip config of the checkpoint's model: ``"ViT-H-14"`` for the published
            ones; a config registered with ``open_clip.add_model_config`` for tests.

    Raises:
        FileNotFoundError: If ``checkpoint`` does not exist.
        ValueError: If its layout or keys are not those of ``model_name``.

    Example:
        >>> HPSv2Reward("missing/HPS_v2.1_compressed.pt")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        FileNotFoundError: HPS checkpoint file not found: checkpoint='missing/HPS_v2.1_compressed.pt'. ...
    """

    batch_level = False

    def __init__(self, checkpoint: str, model_name: str = "ViT-H-14") -> None:
        super().__init__()
        state = load_hps_state_dict(checkpoint)  # read first: a missing file fails before building CLIP
        self.embedder = CLIPEmbedder(model_name, pretrained=None)
        if self.embedder.image_size[0] != self.embedder.image_size[1]:
            raise ValueError(
                f"model_name={model_name!r} reads {self.embedder.image_size} images; HPS pads images to a "
                "square: use a config with a square image_size"
            )
        expected = set(self.embedder.model.state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(
                f"checkpoint={checkpoint!r} does not fit open_clip model_name={model_name!r}: missing keys "
                f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
                f"{'...' if len(unexpected) > 5 else ''}; expected {{'state_dict': state_dict}} or a plain state "
                f"dict of {model_name!r} (keys such as 'visual.conv1.weight', 'token_embedding.weight', "
                "'logit_scale'): pass the model_name the checkpoint was trained with"
            )
        try:
            self.embedder.model.load_state_dict(state)
        except RuntimeError as error:  # same keys, other shapes: another model size
            raise ValueError(
                f"checkpoint={checkpoint!r} has tensors of other shapes than open_clip model_name={model_name!r}; "
                f"pass the model_name the checkpoint was trained with ({error})"
            ) from error
        self.eval()

    def preprocess(self, images: Tensor) -> Tensor:
        """CLIP pixel values ``[B, 3, S, S]`` of images ``[B, 3, H, W]`` in ``[0, 1]`` (differentiable)."""
        pixels = resize_longest_side_and_pad(images, self.embedder.image_size[0])
        return (pixels.to(self.embedder.mean.dtype) - self.embedder.mean) / self.embedder.std  # 3. normalise

    def forward(self, images: Tensor, prompts: list[str], **metadata: Any) -> Tensor:
        """HPS ``[B]`` of each image with its prompt (NaN for a non-finite image).

        Args:
            images: ``[B, 3, H, W]`` in ``[0, 1]``.
            prompts: The ``B`` prompts the images were generated from.
            **metadata: Ignored.
        """
        finite = check_prompted_images(images, prompts, type(self).__name__)
        text_embeds = self.embedder.encode_text(prompts)

        def score(images: Tensor) -> Tensor:
            image_embeds = self.embedder.encode_pixels(self.preprocess(images))  # 4. unit-norm embeddings
            return (image_embeds * text_embeds).sum(dim=-1)  # diag(image_features @ text_features.T)

        return score_finite_images(score, images, finite)
