"""CLIP-based rewards: the LAION aesthetic predictor and CLIPScore.

Both embed images with a frozen CLIP (:class:`~lightning_sdrl.rewards.reward_model.CLIPEmbedder`,
differentiable torch preprocessing) and are differentiable with respect to the images.

* :class:`AestheticReward`: DDPO's aesthetic-quality reward, the LAION aesthetic predictor, a
  small head on L2-normalised CLIP ViT-L/14 image embeddings predicting a 1-10 rating;
* :class:`CLIPScoreReward`: prompt alignment, ``100 * max(cos(image, text), 0)`` as
  torchmetrics' ``CLIPScore`` defines it (per image, not averaged).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_sdrl.frozen import FrozenModule
from lightning_sdrl.rewards.base import RewardModule, check_images, check_prompted_images, score_finite_images
from lightning_sdrl.rewards.reward_model import CLIPEmbedder

__all__ = ["AestheticMLP", "AestheticReward", "CLIPScoreReward", "load_aesthetic_head"]

_MLP_KEYS = frozenset(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
_LINEAR_KEYS = frozenset({"weight", "bias"})


class AestheticMLP(nn.Module):
    """The improved LAION aesthetic predictor's head (``sac+logos+ava1-l14-linearMSE.pth``).

    ``layers`` is the published ``nn.Sequential``: Linear(768, 1024), Dropout(0.2),
    Linear(1024, 128), Dropout(0.2), Linear(128, 64), Dropout(0.1), Linear(64, 16),
    Linear(16, 1); the ReLUs are commented out in the original (hence "linearMSE"), so the
    state-dict keys are ``layers.{0,2,4,6,7}.{weight,bias}``.

    Args:
        sizes: Widths ``(input, hidden..., 1)``; the published head is ``(768, 1024, 128, 64,
            16, 1)``.

    Example:
        >>> AestheticMLP()(torch.randn(2, 768)).shape
        torch.Size([2, 1])
    """

    def __init__(self, sizes: tuple[int, int, int, int, int, int] = (768, 1024, 128, 64, 16, 1)) -> None:
        super().__init__()
        d0, d1, d2, d3, d4, d5 = sizes
        self.layers = nn.Sequential(
            nn.Linear(d0, d1),
            nn.Dropout(0.2),
            nn.Linear(d1, d2),
            nn.Dropout(0.2),
            nn.Linear(d2, d3),
            nn.Dropout(0.1),
            nn.Linear(d3, d4),
            nn.Linear(d4, d5),
        )

    def forward(self, embeds: Tensor) -> Tensor:
        """Scores ``[B, 1]`` of L2-normalised embeddings ``[B, D]``."""
        return self.layers(embeds)


def load_aesthetic_head(head_weights: str) -> nn.Module:
    """Load an aesthetic predictor head from a local state-dict file.

    Two published layouts are recognised by their keys:

    * ``layers.{0,2,4,6,7}.{weight,bias}``: the improved aesthetic predictor's MLP
      (christophschuhmann/improved-aesthetic-predictor, e.g. ``sac+logos+ava1-l14-linearMSE.pth``
      used by DDPO, or ``ava+logos-l14-linearMSE.pth``), built as :class:`AestheticMLP` with the
      widths read from the tensors;
    * ``weight``, ``bias``: the first LAION predictor's single ``nn.Linear(768, 1)``
      (LAION-AI/aesthetic-predictor, ``sa_0_4_vit_l_14_linear.pth``).

    Other layouts (e.g. the ``reluMSE`` heads, whose ReLUs shift the layer indices) are refused.

    Args:
        head_weights: Path of the ``.pth`` file (a plain ``state_dict``).

    Returns:
        The head in eval mode: ``[B, D]`` embeddings -> ``[B, 1]`` scores.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If its keys match neither layout.
    """
    path = Path(head_weights)
    if not path.is_file():
        raise FileNotFoundError(
            f"aesthetic head file not found: head_weights={head_weights!r}. Download "
            "sac+logos+ava1-l14-linearMSE.pth (christophschuhmann/improved-aesthetic-predictor) "
            "on a machine with internet access and pass the local file path."
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    keys = frozenset(state)
    if keys == _MLP_KEYS:
        widths = [state[f"layers.{i}.weight"].shape[1] for i in (0, 2, 4, 6, 7)]
        head: nn.Module = AestheticMLP((*widths, state["layers.7.weight"].shape[0]))
    elif keys == _LINEAR_KEYS:
        head = nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
    else:
        raise ValueError(
            f"head_weights={head_weights!r} has keys {sorted(keys)[:6]}...; expected the improved "
            f"aesthetic predictor MLP ({sorted(_MLP_KEYS)}) or a linear head (['bias', 'weight'])"
        )
    head.load_state_dict(state)
    return head.eval()


class AestheticReward(FrozenModule, RewardModule):
    """LAION aesthetic score of each image: a head on L2-normalised CLIP image embeddings.

    ``reward(x) = head(clip_image(x) / ||clip_image(x)||)``, about 1-10 (DDPO's "aesthetic
    quality" reward). The predictor was trained on OpenAI's CLIP ViT-L/14, which uses QuickGELU:
    with OpenAI's weights the open_clip config is ``"ViT-L-14-quickgelu"``.

    Args:
        head_weights: Local head file, see :func:`load_aesthetic_head`.
        clip_model_name: open_clip model config whose embedding size matches the head.
        clip_pretrained: Local weights file of ``clip_model_name`` (OpenAI ViT-L/14 for the
            published heads); ``None`` leaves CLIP random (tests only).

    Raises:
        ValueError: If the head reads another embedding size than the CLIP gives.
    """

    batch_level = False

    def __init__(
        self,
        head_weights: str,
        clip_model_name: str = "ViT-L-14-quickgelu",
        clip_pretrained: str | None = None,
    ) -> None:
        super().__init__()
        self.head = load_aesthetic_head(head_weights).requires_grad_(False)
        self.embedder = CLIPEmbedder(clip_model_name, pretrained=clip_pretrained)
        in_features = next(m for m in self.head.modules() if isinstance(m, nn.Linear)).in_features
        if in_features != self.embedder.embed_dim:
            raise ValueError(
                f"head_weights={head_weights!r} reads {in_features}-dim embeddings but "
                f"clip_model_name={clip_model_name!r} gives {self.embedder.embed_dim}; use the "
                "CLIP the head was trained on (ViT-L/14: 768)"
            )
        self.eval()

    def forward(self, images: Tensor, prompts: list[str], **metadata: Any) -> Tensor:
        """Aesthetic score of each image, ``[B]`` (NaN for a non-finite image).

        Args:
            images: ``[B, 3, H, W]`` in ``[0, 1]``.
            prompts: The ``B`` prompts (unused).
            **metadata: Ignored.
        """
        finite = check_images(images, type(self).__name__)
        return score_finite_images(self._score, images, finite)

    def _score(self, images: Tensor) -> Tensor:
        embeds = self.embedder.encode_images(images)  # already L2-normalised
        return self.head(embeds.to(next(self.head.parameters()).dtype)).squeeze(-1)


class CLIPScoreReward(RewardModule):
    """CLIPScore of each image for its prompt: ``100 * max(cos(E_image, E_text), 0)``.

    The per-image score of torchmetrics' ``CLIPScore`` (which averages it over the batch), in
    ``[0, 100]``; prompts longer than CLIP's context are truncated.

    Args:
        model_name: open_clip model config; torchmetrics' default is OpenAI's ViT-L/14
            (``"ViT-L-14-quickgelu"``).
        pretrained: Local weights file of ``model_name``; ``None`` leaves CLIP random (tests
            only).
    """

    batch_level = False

    def __init__(self, model_name: str = "ViT-L-14-quickgelu", pretrained: str | None = None) -> None:
        super().__init__()
        self.embedder = CLIPEmbedder(model_name, pretrained=pretrained)

    def forward(self, images: Tensor, prompts: list[str], **metadata: Any) -> Tensor:
        """CLIPScore ``[B]`` of each image with its prompt (NaN for a non-finite image).

        Args:
            images: ``[B, 3, H, W]`` in ``[0, 1]``.
            prompts: The ``B`` prompts the images were generated from.
            **metadata: Ignored.
        """
        finite = check_prompted_images(images, prompts, type(self).__name__)

        def clip_score(images: Tensor) -> Tensor:
            image_embeds, text_embeds = self.embedder(images, prompts)
            return 100.0 * (image_embeds * text_embeds).sum(dim=-1).clamp(min=0.0)

        return score_finite_images(clip_score, images, finite)
