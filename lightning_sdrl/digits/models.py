"""AI-feedback models of the digits miniature: a digit classifier and a feature network.

In the gender-debiasing experiment (section III-C of the debiasing paper) a pretrained classifier
judges each generated image, and an image whose top probability is below a confidence of 0.7 is
labelled "None". In the digits miniature :class:`DigitClassifier` plays that classifier and
:class:`DigitFeatureNet` plays the Inception / CLIP feature extractor behind FID,
precision-recall and diversity rewards. The two are trained separately (different architecture
and seed, see :mod:`lightning_sdrl.digits.train_digits`) so that a policy optimised against
the classifier is not also graded by the same network.

Both take generated images as ``[B, C, H, W]`` floats in ``[0, 1]`` with ``C`` = 1 or 3 and any
``H, W``, and turn them into canonical digits images themselves (:func:`to_canonical_digits`).
Both are differentiable with respect to the images (for ReFL-style reward backpropagation).

Weights trained by ``python -m lightning_sdrl.digits.train_digits`` ship with the package:
``DigitClassifier.from_pretrained()`` and ``DigitFeatureNet.from_pretrained()`` load them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

NUM_DIGIT_CLASSES = 10
"""The ten digits 0..9."""

DIGIT_IMAGE_SIZE = 16
"""Side of a canonical digits image in pixels."""

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
ASSETS_DIR = Path(__file__).resolve().parent / "assets"
"""Where the package's pretrained digits weights live (``classifier/`` and ``feature_net/``)."""

_RETRAIN_HINT = (
    "re-install lightning_sdrl, or retrain with "
    "`python -m lightning_sdrl.digits.train_digits --out DIR` and pass DIR/{name}"
)


def to_canonical_digits(images: Tensor) -> Tensor:
    """Turn generated images into canonical digits images ``[B, 1, 16, 16]``.

    1. grayscale: the mean over channels;
    2. resize to 16x16 with bilinear interpolation (``align_corners=False``, antialiased so that
       downsampling averages instead of skipping pixels; for upsampling this is plain bilinear,
       the interpolation that made the canonical images).

    Values are not clamped: a slightly off-range pixel stays visible to the models, which were
    trained on augmented images that leave ``[0, 1]`` a little.

    Args:
        images: ``[B, C, H, W]`` floats, nominally in ``[0, 1]``, with ``C`` = 1 or 3.

    Returns:
        ``[B, 1, 16, 16]`` images of the same dtype.

    Example:
        >>> import torch
        >>> to_canonical_digits(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 1, 16, 16])
        >>> to_canonical_digits(torch.rand(2, 16, 16))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: images have shape [2, 16, 16]; expected [B, C, H, W] with C = 1 or 3 ...
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"images have shape {list(images.shape)}; expected [B, C, H, W] with C = 1 or 3 (floats in [0, 1])"
        )
    if not images.is_floating_point():
        raise ValueError(
            f"images have dtype {images.dtype}; expected floats in [0, 1] "
            "(convert uint8 images with images.float() / 255)"
        )
    gray = images.mean(dim=1, keepdim=True)
    if gray.shape[-2:] != (DIGIT_IMAGE_SIZE, DIGIT_IMAGE_SIZE):
        gray = F.interpolate(gray, size=DIGIT_IMAGE_SIZE, mode="bilinear", align_corners=False, antialias=True)
    return gray


class DigitClassifier(nn.Module):
    """Small CNN that classifies digits images into ``0..9``; the AI feedback of the miniature.

    Architecture on the canonical ``[B, 1, 16, 16]`` image: two 3x3 convolutions, 2x2 max-pool,
    a 3x3 convolution, 2x2 max-pool, a hidden linear layer with dropout, and a linear head.

    Args:
        channels: Output channels of the three convolutions.
        hidden_features: Width of the hidden linear layer.
        dropout: Dropout before the head (active in training mode only).

    Example:
        >>> import torch
        >>> model = DigitClassifier.from_pretrained()  # the weights shipped with the package
        >>> from lightning_sdrl.digits.data import digits_split
        >>> images, labels = digits_split("test")
        >>> with torch.no_grad():
        ...     probs = model.predict_proba(images[:4].expand(-1, 3, -1, -1))
        >>> probs.shape, probs.argmax(dim=1).tolist() == labels[:4].tolist()
        (torch.Size([4, 10]), True)
    """

    def __init__(
        self,
        channels: tuple[int, int, int] = (16, 32, 32),
        hidden_features: int = 64,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        channels = _check_channels(channels)
        if hidden_features < 1:
            raise ValueError(f"hidden_features={hidden_features}; expected a positive int")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout={dropout}; expected a probability in [0, 1)")
        self.config: dict[str, Any] = {
            "channels": list(channels),
            "hidden_features": hidden_features,
            "dropout": dropout,
        }
        c1, c2, c3 = channels
        self.body = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 16x16 -> 8x8
            nn.Conv2d(c2, c3, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Flatten(),
            nn.Linear(c3 * 4 * 4, hidden_features),
            nn.ReLU(),
            nn.Dropout(dropout),
        )
        self.head = nn.Linear(hidden_features, NUM_DIGIT_CLASSES)

    def forward(self, images: Tensor) -> Tensor:
        """Logits ``[B, 10]`` of ``[B, C, H, W]`` images in ``[0, 1]`` (``C`` = 1 or 3)."""
        return self.head(self.body(_prepare(images, self)))

    def predict_proba(self, images: Tensor) -> Tensor:
        """Class probabilities ``[B, 10]`` (softmax of :meth:`forward`); rows sum to 1."""
        return self(images).softmax(dim=-1)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (made if needed)."""
        _save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path | None = None) -> DigitClassifier:
        """Load a classifier written by :meth:`save_pretrained`, in eval mode.

        Args:
            directory: Folder with ``config.json`` and ``model.safetensors``. ``None`` loads the
                weights shipped with the package (``lightning_sdrl/digits/assets/classifier``).

        Raises:
            FileNotFoundError: the folder or one of its two files is missing.
            ValueError: a file is corrupt or does not describe a ``DigitClassifier``.
        """
        return _load_pretrained(cls, directory, ASSETS_DIR / "classifier")


class DigitFeatureNet(nn.Module):
    """CNN embedding of digits images; the miniature's Inception / CLIP feature extractor.

    Architecture on the canonical ``[B, 1, 16, 16]`` image (deliberately unlike
    :class:`DigitClassifier`): a 5x5 convolution, two stride-2 3x3 convolutions, and a linear
    projection to ``feature_dim`` features. It is trained with a linear softmax head on top of
    the features, which is then dropped: the features are that head's input, the penultimate
    layer of the trained network.

    The features are **not** normalised, like Inception's pool features used by FID; use
    ``F.normalize(features, dim=-1)`` for cosine similarities (for example diversity rewards).

    Args:
        channels: Output channels of the three convolutions.
        feature_dim: Number of features ``D``.

    Example:
        >>> import torch
        >>> net = DigitFeatureNet.from_pretrained()
        >>> with torch.no_grad():
        ...     features = net(torch.rand(5, 3, 64, 64))
        >>> features.shape
        torch.Size([5, 64])
    """

    def __init__(self, channels: tuple[int, int, int] = (16, 32, 32), feature_dim: int = 64) -> None:
        super().__init__()
        channels = _check_channels(channels)
        if feature_dim < 1:
            raise ValueError(f"feature_dim={feature_dim}; expected a positive int")
        self.config: dict[str, Any] = {"channels": list(channels), "feature_dim": feature_dim}
        self.feature_dim = feature_dim
        c1, c2, c3 = channels
        self.body = nn.Sequential(
            nn.Conv2d(1, c1, 5, padding=2),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1),  # 16x16 -> 8x8
            nn.ReLU(),
            nn.Conv2d(c2, c3, 3, stride=2, padding=1),  # 8x8 -> 4x4
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(c3 * 4 * 4, feature_dim),
        )

    def forward(self, images: Tensor) -> Tensor:
        """Features ``[B, feature_dim]`` of ``[B, C, H, W]`` images in ``[0, 1]``."""
        return self.body(_prepare(images, self))

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (made if needed)."""
        _save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path | None = None) -> DigitFeatureNet:
        """Load a feature network written by :meth:`save_pretrained`, in eval mode.

        Args:
            directory: Folder with ``config.json`` and ``model.safetensors``. ``None`` loads the
                weights shipped with the package (``lightning_sdrl/digits/assets/feature_net``).

        Raises:
            FileNotFoundError: the folder or one of its two files is missing.
            ValueError: a file is corrupt or does not describe a ``DigitFeatureNet``.
        """
        return _load_pretrained(cls, directory, ASSETS_DIR / "feature_net")


_Model = TypeVar("_Model", DigitClassifier, DigitFeatureNet)


def _check_channels(channels: tuple[int, ...] | list[int]) -> tuple[int, int, int]:
    if len(channels) != 3 or any(int(c) < 1 for c in channels):
        raise ValueError(f"channels={channels!r}; expected three positive ints, e.g. (16, 32, 32)")
    return tuple(int(c) for c in channels)  # type: ignore[return-value]


def _prepare(images: Tensor, model: nn.Module) -> Tensor:
    # Models are float32; diffusion pipelines often hand over float16 / bfloat16 images.
    weight = next(model.parameters())
    return to_canonical_digits(images).to(device=weight.device, dtype=weight.dtype)


def _save_pretrained(model: DigitClassifier | DigitFeatureNet, directory: str | Path) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"model_type": type(model).__name__, **model.config}
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, directory / WEIGHTS_NAME, metadata={"model_type": type(model).__name__})


def _load_pretrained(cls: type[_Model], directory: str | Path | None, default: Path) -> _Model:
    directory = default if directory is None else Path(directory)
    hint = _RETRAIN_HINT.format(name=default.name)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (directory, config_path, weights_path):
        if not path.exists():
            raise FileNotFoundError(
                f"{cls.__name__}.from_pretrained: {path} does not exist; expected a folder with "
                f"{CONFIG_NAME} and {WEIGHTS_NAME} written by save_pretrained. Fix: {hint}"
            )
    try:
        config = json.loads(config_path.read_text())
        model_type = config.pop("model_type")
        if model_type != cls.__name__:
            raise ValueError(f"model_type is {model_type!r}, not {cls.__name__!r}")
        model = cls(**config)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(
            f"{cls.__name__}.from_pretrained: {config_path} is not a valid {cls.__name__} "
            f"config ({type(error).__name__}: {error}). Fix: {hint}"
        ) from error
    try:
        model.load_state_dict(load_file(weights_path), strict=True)
    except (SafetensorError, RuntimeError, OSError) as error:
        raise ValueError(
            f"{cls.__name__}.from_pretrained: {weights_path} is corrupt or does not match "
            f"{config_path} ({type(error).__name__}: {error}). Fix: {hint}"
        ) from error
    return model.eval()
