"""A learned human-preference reward: frozen CLIP features and a small MLP head.

The reward-model report (section IV.1, figure 5) extracts CLIP ViT-L/14 image and text features, combines
them into one embedding and maps it to a scalar with an MLP trained on ImageRewardDB rankings
(``lightning_sdrl.modules.reward_model``). Here:

1. :class:`CLIPEmbedder` turns images ``[B, 3, H, W]`` in ``[0, 1]`` and prompts into unit-norm CLIP
   embeddings ``[B, D]``; CLIP stays frozen, but gradients flow back to the images, so the reward
   can drive ReFL-style fine-tuning.
2. :class:`RewardHead` scores the concatenation ``[image; text]`` of the two embeddings
   (``2 * D`` inputs): the image half lets it judge quality, both halves together alignment.
3. :class:`LearnedPreferenceReward` standardises the head's score with its mean and standard
   deviation over the training images, as ImageReward does, so that 0 is an average training
   image and 1 one standard deviation better.
"""

import importlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lightning_sdrl.frozen import FrozenModule
from lightning_sdrl.rewards.base import RewardModule, check_prompted_images, score_finite_images

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "head.safetensors"


class RewardHead(nn.Module):
    """MLP from a CLIP image and text embedding to a scalar reward (seed section V.1, figure 5).

    Layers: ``Dropout(dropout[0])``, then for each hidden size a ``Linear`` and a ``ReLU``, with
    ``Dropout(dropout[k])`` after the ``k``-th hidden layer while rates remain, and a linear output.
    The defaults are the report's five-layer MLP: hidden sizes 1024-256-128-32, dropout 0.2 on the
    input and 0.2, 0.1 on the first two hidden layers.

    Args:
        embed_dim: Size ``D`` of each CLIP embedding (768 for ViT-L/14); the head reads ``2 * D``.
        hidden_sizes: Widths of the hidden layers.
        dropout: Dropout rates on the input and then the first hidden layers; at most one more
            than there are hidden layers.

    Example:
        >>> head = RewardHead(embed_dim=4, hidden_sizes=(8, 2), dropout=(0.2,))
        >>> head(torch.randn(3, 4), torch.randn(3, 4)).shape
        torch.Size([3])
    """

    def __init__(
        self,
        embed_dim: int = 768,
        hidden_sizes: Sequence[int] = (1024, 256, 128, 32),
        dropout: Sequence[float] = (0.2, 0.2, 0.1),
    ) -> None:
        super().__init__()
        if len(dropout) > len(hidden_sizes) + 1:
            raise ValueError(
                f"dropout has {len(dropout)} rates but there are only {len(hidden_sizes)} hidden "
                f"layers; give at most {len(hidden_sizes) + 1} (input, then hidden layers)"
            )
        self.embed_dim = embed_dim
        self.hidden_sizes = tuple(hidden_sizes)
        self.dropout = tuple(dropout)
        layers: list[nn.Module] = []
        width = 2 * embed_dim
        for k, hidden in enumerate(hidden_sizes):
            if k < len(dropout):
                layers.append(nn.Dropout(dropout[k]))
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        if len(dropout) > len(hidden_sizes):
            layers.append(nn.Dropout(dropout[-1]))
        layers.append(nn.Linear(width, 1))
        self.layers = nn.Sequential(*layers)

    def config(self) -> dict[str, Any]:
        """Constructor arguments that rebuild this head."""
        return {
            "embed_dim": self.embed_dim,
            "hidden_sizes": list(self.hidden_sizes),
            "dropout": list(self.dropout),
        }

    def forward(self, image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
        """Score image-prompt pairs.

        Args:
            image_embeds: CLIP image embeddings ``[B, D]``.
            text_embeds: CLIP embeddings of each image's prompt ``[B, D]``.

        Returns:
            Unnormalised rewards ``[B]``.
        """
        if image_embeds.shape[-1] != self.embed_dim or text_embeds.shape != image_embeds.shape:
            raise ValueError(
                f"got image embeddings {list(image_embeds.shape)} and text embeddings "
                f"{list(text_embeds.shape)}; expected both [B, {self.embed_dim}] (embed_dim)"
            )
        return self.layers(torch.cat([image_embeds, text_embeds], dim=-1)).squeeze(-1)


class CLIPEmbedder(FrozenModule):
    """Frozen open_clip model giving unit-norm image and text embeddings.

    The model is built with ``open_clip.create_model(model_name, pretrained=pretrained)`` and the
    prompts are tokenised with ``open_clip.get_tokenizer(model_name)`` (open_clip ships the CLIP
    BPE vocabulary, so nothing is downloaded). Image preprocessing is done in torch so that it is
    differentiable: the shorter side is resized to the model's image size (bicubic, antialiased),
    the centre is cropped, and channels are normalised with the model's mean and std (CLIP's).

    The parameters never train (``requires_grad`` is off and the module stays in eval mode), but
    gradients flow through to the input images.

    Args:
        model_name: An open_clip model config. OpenAI's ViT-L/14 (the report's CLIP) was trained with
            QuickGELU, hence ``"ViT-L-14-quickgelu"``; use ``"ViT-L-14"`` for LAION weights. A
            custom config is used by registering its JSON with ``open_clip.add_model_config``.
        pretrained: Path to a local weights file for ``model_name`` (e.g. open_clip's
            ``open_clip_pytorch_model.bin``); ``None`` leaves the weights random (tests only).

    Example:
        >>> CLIPEmbedder("ViT-L-14-quickgelu", pretrained="missing.bin")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        FileNotFoundError: CLIP weights file not found: pretrained='missing.bin'. ...
    """

    def __init__(self, model_name: str = "ViT-L-14-quickgelu", pretrained: str | None = None) -> None:
        super().__init__()
        if pretrained is not None and not Path(pretrained).is_file():
            raise FileNotFoundError(
                f"CLIP weights file not found: pretrained={pretrained!r}. Download the open_clip "
                f"weights for {model_name!r} (e.g. open_clip_pytorch_model.bin from the Hugging "
                "Face Hub) on a machine with internet access and pass the local file path."
            )
        model_config = open_clip.get_model_config(model_name)
        if model_config is None:
            raise ValueError(
                f"model_name={model_name!r} is not an open_clip model config; use one of "
                "open_clip.list_models() or register a config JSON with open_clip.add_model_config"
            )
        self.model_name = model_name
        self.pretrained = pretrained
        self.embed_dim: int = model_config["embed_dim"]
        self.model = open_clip.create_model(model_name, pretrained=pretrained)
        self.model.requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        cfg = open_clip.get_model_preprocess_cfg(self.model)
        size = cfg["size"]
        self.image_size: tuple[int, int] = (size, size) if isinstance(size, int) else tuple(size)
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)
        self.eval()

    @property
    def cache_key(self) -> str:
        """Identifies the embeddings this encoder produces, for on-disk caches."""
        weights = Path(self.pretrained).name if self.pretrained else "random-init"
        return f"{self.model_name}:{weights}"

    @property
    def device(self) -> torch.device:
        """Device of the frozen weights."""
        return self.mean.device

    def preprocess(self, images: Tensor) -> Tensor:
        """Resize, centre-crop and normalise images ``[B, 3, H, W]`` in ``[0, 1]`` for CLIP."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images have shape {list(images.shape)}; expected [B, 3, H, W] floats in [0, 1]")
        height, width = images.shape[-2:]
        target_h, target_w = self.image_size
        if (height, width) != (target_h, target_w):
            scale = max(target_h / height, target_w / width)
            resized = (max(target_h, round(height * scale)), max(target_w, round(width * scale)))
            images = F.interpolate(images, size=resized, mode="bicubic", align_corners=False, antialias=True)
            top = (resized[0] - target_h) // 2
            left = (resized[1] - target_w) // 2
            images = images[..., top : top + target_h, left : left + target_w]
        return (images.to(self.mean.dtype) - self.mean) / self.std

    def encode_pixels(self, pixels: Tensor) -> Tensor:
        """Unit-norm image embeddings ``[B, D]`` of already preprocessed pixels."""
        return self.model.encode_image(pixels, normalize=True)

    def encode_images(self, images: Tensor) -> Tensor:
        """Unit-norm image embeddings ``[B, D]`` of images ``[B, 3, H, W]`` in ``[0, 1]``."""
        return self.encode_pixels(self.preprocess(images))

    def encode_text(self, prompts: Sequence[str]) -> Tensor:
        """Unit-norm text embeddings ``[B, D]`` of ``B`` prompts (truncated to CLIP's context)."""
        tokens = self.tokenizer(list(prompts)).to(self.mean.device)
        return self.model.encode_text(tokens, normalize=True)

    def forward(self, images: Tensor, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Image and text embeddings, each ``[B, D]``."""
        return self.encode_images(images), self.encode_text(prompts)


def embedder_spec(embedder: nn.Module | str) -> dict[str, Any]:
    """How a saved reward head names the frozen embedder it reads.

    A :class:`CLIPEmbedder` (or an open_clip config name) is ``{"clip_model_name": name}``: its
    weights file is given again when loading. Any other embedder must have a ``config()`` method
    returning its constructor arguments and is ``{"embedder": {"class_path", "init_args"}}``.
    """
    if isinstance(embedder, str):
        return {"clip_model_name": embedder}
    if isinstance(embedder, CLIPEmbedder):
        return {"clip_model_name": embedder.model_name}
    if not callable(getattr(embedder, "config", None)):
        raise TypeError(
            f"{type(embedder).__name__} has no config() method; a reward head can only be saved with a "
            "CLIPEmbedder or an embedder whose config() returns its constructor arguments"
        )
    class_path = f"{type(embedder).__module__}.{type(embedder).__qualname__}"
    return {"embedder": {"class_path": class_path, "init_args": embedder.config()}}


def build_embedder(config: dict[str, Any], clip_pretrained: str | None) -> nn.Module:
    """The embedder a saved head's ``config.json`` names (see :func:`embedder_spec`)."""
    if "embedder" in config:
        spec = config["embedder"]
        module_name, _, class_name = spec["class_path"].rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as error:
            raise ValueError(
                f"the reward head's embedder {spec['class_path']!r} cannot be imported ({error}); "
                "install the package that defines it"
            ) from error
        return cls(**spec.get("init_args", {}))
    return CLIPEmbedder(config["clip_model_name"], pretrained=clip_pretrained)


def save_reward_head(
    directory: str | Path,
    head: RewardHead,
    embedder: nn.Module | str,
    score_mean: float = 0.0,
    score_std: float = 1.0,
) -> None:
    """Write a reward head as ``config.json`` and ``head.safetensors`` in ``directory``.

    Args:
        directory: Folder to write, created if missing.
        head: The trained head.
        embedder: The frozen embedder whose embeddings the head reads (or an open_clip config
            name, for a :class:`CLIPEmbedder`); see :func:`embedder_spec`.
        score_mean: Mean head score over the training images.
        score_std: Standard deviation of the head score over the training images.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        **embedder_spec(embedder),
        "head": head.config(),
        "score_mean": float(score_mean),
        "score_std": float(score_std),
    }
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))


class LearnedPreferenceReward(FrozenModule, RewardModule):
    """Reward = standardised score of a preference head on frozen CLIP embeddings.

    ``reward(x, z) = (head([clip_image(x); clip_text(z)]) - score_mean) / score_std``, where the
    statistics are taken over the training images as in ImageReward, so rewards are comparable
    across trained heads. The module always stays in eval mode (no dropout).

    Args:
        embedder: Frozen CLIP giving the embeddings the head was trained on (or another frozen
            embedder with the same interface, e.g.
            :class:`~lightning_sdrl.digits.embedder.DigitsEmbedder`).
        head: Trained reward head.
        score_mean: Mean head score over the training images.
        score_std: Standard deviation of the head score over the training images.
    """

    batch_level = False

    def __init__(
        self,
        embedder: nn.Module,
        head: RewardHead,
        score_mean: float = 0.0,
        score_std: float = 1.0,
    ) -> None:
        super().__init__()
        if head.embed_dim != embedder.embed_dim:
            raise ValueError(
                f"head reads {head.embed_dim}-dim embeddings but the CLIP model "
                f"{embedder.model_name!r} gives {embedder.embed_dim}; use the CLIP the head was "
                "trained with"
            )
        if not score_std > 0:
            raise ValueError(f"score_std={score_std}; expected a positive standard deviation")
        self.embedder = embedder
        self.head = head
        self.score_mean = float(score_mean)
        self.score_std = float(score_std)
        self.eval()

    def forward(self, images: Tensor, prompts: Sequence[str], **metadata: Any) -> Tensor:
        """Reward of each image for its prompt.

        Args:
            images: Generated images ``[B, 3, H, W]`` in ``[0, 1]``.
            prompts: The ``B`` prompts the images were generated from.
            **metadata: Ignored; accepted so all rewards share one call signature.

        Returns:
            Standardised rewards ``[B]``, differentiable with respect to ``images``; NaN for a
            non-finite image.
        """
        finite = check_prompted_images(images, prompts, type(self).__name__)

        def standardised_score(images: Tensor) -> Tensor:
            image_embeds, text_embeds = self.embedder(images, prompts)
            return (self.head(image_embeds, text_embeds) - self.score_mean) / self.score_std

        return score_finite_images(standardised_score, images, finite)

    def save_pretrained(self, directory: str | Path) -> None:
        """Save the head, its config, its embedder's name and score statistics (not CLIP) to ``directory``."""
        save_reward_head(directory, self.head, self.embedder, self.score_mean, self.score_std)

    @classmethod
    def from_pretrained(cls, directory: str | Path, clip_pretrained: str | None) -> "LearnedPreferenceReward":
        """Load a head saved by :meth:`save_pretrained` and the CLIP it was trained on.

        Args:
            directory: Folder holding ``config.json`` and ``head.safetensors``.
            clip_pretrained: Local weights file of the CLIP named in ``config.json`` (required, as
                CLIP is not saved with the head; ``None`` only for random test models). Unused
                when the head was trained on another embedder (rebuilt from ``config.json``).

        Returns:
            The reward, frozen and in eval mode.
        """
        directory = Path(directory)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(
                    f"{directory / name} not found; expected a folder written by "
                    "LearnedPreferenceReward.save_pretrained or RewardModelModule.export"
                )
        config = json.loads((directory / CONFIG_FILE).read_text())
        head = RewardHead(**config["head"])
        head.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
        embedder = build_embedder(config, clip_pretrained)
        reward = cls(embedder, head, config["score_mean"], config["score_std"])
        return reward.requires_grad_(False)


class PretrainedPreferenceReward(LearnedPreferenceReward):
    """A trained reward head loaded from a directory: the form a YAML config selects.

    ``reward: {class_path: lightning_sdrl.rewards.reward_model.PretrainedPreferenceReward,
    init_args: {directory: runs/reward_model/head, clip_pretrained: /path/to/ViT-L-14.pt}}``

    Args:
        directory: folder written by ``RewardModelModule.export`` / ``save_pretrained``.
        clip_pretrained: local weights file of the CLIP model the head was trained on.
    """

    def __init__(self, directory: str, clip_pretrained: str | None = None) -> None:
        loaded = LearnedPreferenceReward.from_pretrained(directory, clip_pretrained)
        super().__init__(loaded.embedder, loaded.head, loaded.score_mean, loaded.score_std)
        self.requires_grad_(False)
