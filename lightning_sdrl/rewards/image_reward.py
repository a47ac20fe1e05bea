"""ImageReward (Xu et al. 2023): a BLIP-based human-preference reward, on transformers' BLIP.

ImageReward scores an image for its prompt with BLIP: a ViT-L/16 image encoder, and BLIP's text
encoder (a BERT whose layers cross-attend to the image patches, BLIP's image-text-matching
encoder) run on the prompt tokens; the output at the ``[CLS]`` token goes through a five-layer
linear head, and the score is standardised with the mean and standard deviation the authors
measured on their training images (``ImageReward/ImageReward.py`` of THUDM/ImageReward,
``score_gard``):

1. preprocess: resize the shorter side to 224 (bicubic, antialiased), centre-crop 224 x 224,
   normalise with CLIP's mean and std (done in torch, so the reward is differentiable);
2. ``E_img = ViT(x)``, ``[B, 1 + N, 1024]``;
3. ``h = BERT(tokens(prompt), cross-attending to E_img)[:, 0]``, ``[B, 768]``; the prompt is
   tokenised with bert-base-uncased (padded and truncated to 35 tokens);
4. ``r = (MLP(h) - 0.16717362830052426) / 1.0333394966054072``.

The original ``image-reward`` package is not needed: the published ``ImageReward.pt`` is read
key by key into transformers' ``BlipVisionModel`` and ``BlipTextModel``
(:func:`imagereward_key_map`, the renaming of transformers'
``convert_blip_original_pytorch_to_hf.py``), and the head is :class:`AestheticMLP` (ImageReward
took the improved aesthetic predictor's head unchanged).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers import BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

from lightning_sdrl.frozen import FrozenModule
from lightning_sdrl.rewards.aesthetic import AestheticMLP
from lightning_sdrl.rewards.base import RewardModule, check_prompted_images, score_finite_images
from lightning_sdrl.rewards.classifiers import resize_images

__all__ = [
    "IMAGE_REWARD_MEAN",
    "IMAGE_REWARD_STD",
    "ImageReward",
    "ImageRewardArchitecture",
    "check_imagereward_keys",
    "imagereward_key_map",
    "load_imagereward_state_dict",
    "standardise_image_reward",
]

IMAGE_REWARD_MEAN = 0.16717362830052426
"""Mean of the raw head score over ImageReward's training images (``ImageReward.mean``)."""
IMAGE_REWARD_STD = 1.0333394966054072
"""Standard deviation of the raw head score over ImageReward's training images (``ImageReward.std``)."""

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""Channel means of ImageReward's (CLIP's) image normalisation."""
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""Channel standard deviations of ImageReward's (CLIP's) image normalisation."""

SPECIAL_TOKENS = ("[DEC]", "[ENC]")
"""Tokens BLIP adds to bert-base-uncased (ids 30522 and 30523, hence the 30524-word embedding)."""

UNUSED_KEYS = frozenset(
    {
        "blip.text_encoder.embeddings.position_ids",  # a persistent buffer in BLIP's BERT: arange(512)
        "blip.vision_proj.weight",  # BLIP's contrastive projections: in the checkpoint, unused by the score
        "blip.vision_proj.bias",
        "blip.text_proj.weight",
        "blip.text_proj.bias",
    }
)
"""Keys of the published checkpoint that the score does not use; accepted and ignored."""

HEAD_INDICES = (0, 2, 4, 6, 7)
"""``nn.Sequential`` indices of the head's five ``Linear`` layers (Dropouts at 1, 3, 5)."""

# original ViT block (BLIP's vit.py) -> transformers' BlipEncoderLayer
_VISION_BLOCK = {
    "norm1": "layer_norm1",
    "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection",
    "norm2": "layer_norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
# BLIP's med.py BertLayer and transformers' BlipTextLayer share these names
_TEXT_LAYER = tuple(
    f"{attention}.{part}"
    for attention in ("attention", "crossattention")
    for part in ("self.query", "self.key", "self.value", "output.dense", "output.LayerNorm")
) + ("intermediate.dense", "output.dense", "output.LayerNorm")

Part = Literal["vision", "text", "head"]


@dataclass(frozen=True)
class ImageRewardArchitecture:
    """Sizes of ImageReward's BLIP; the defaults are the published model's.

    BLIP ``vit="large"`` at 224 pixels (``create_vit``: patch 16, width 1024, depth 24, 16 heads,
    MLP ratio 4, LayerNorm eps 1e-6) and ``med_config.json`` (BERT-base: width 768, 12 layers,
    12 heads, 30524 words, 512 positions, LayerNorm eps 1e-12), whose cross-attention reads the
    ViT's width.

    Attributes:
        image_size: Side of the square input image, in pixels.
        patch_size: Side of the ViT's patches, in pixels.
        vision_width: ViT hidden size.
        vision_layers: Number of ViT blocks.
        vision_heads: ViT attention heads.
        text_width: BERT hidden size (the head's input size).
        text_layers: Number of BERT layers.
        text_heads: BERT attention heads.
        vocab_size: Rows of the word embedding (bert-base-uncased's 30522 words + ``[DEC]``, ``[ENC]``).
        max_text_positions: Rows of the position embedding.
    """

    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 1024
    vision_layers: int = 24
    vision_heads: int = 16
    text_width: int = 768
    text_layers: int = 12
    text_heads: int = 12
    vocab_size: int = 30524
    max_text_positions: int = 512

    def __post_init__(self) -> None:
        for width, heads, name in (
            (self.vision_width, self.vision_heads, "vision"),
            (self.text_width, self.text_heads, "text"),
        ):
            if heads < 1 or width % heads:
                raise ValueError(
                    f"{name}_width={width} is not divisible by {name}_heads={heads}; the published "
                    "model has vision 1024 / 16 and text 768 / 12"
                )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}; "
                "the published model has 224 / 16"
            )

    def vision_config(self) -> BlipVisionConfig:
        """The ``BlipVisionConfig`` of the ViT (exact GELU, no dropout, LayerNorm eps 1e-6 as in BLIP's vit.py)."""
        return BlipVisionConfig(
            hidden_size=self.vision_width,
            intermediate_size=4 * self.vision_width,
            num_hidden_layers=self.vision_layers,
            num_attention_heads=self.vision_heads,
            image_size=self.image_size,
            patch_size=self.patch_size,
            hidden_act="gelu",
            layer_norm_eps=1e-6,
            attention_dropout=0.0,
        )

    def text_config(self) -> BlipTextConfig:
        """The ``BlipTextConfig`` of the text encoder; ``is_decoder=True`` builds the cross-attention layers."""
        return BlipTextConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.text_width,
            encoder_hidden_size=self.vision_width,
            intermediate_size=4 * self.text_width,
            num_hidden_layers=self.text_layers,
            num_attention_heads=self.text_heads,
            max_position_embeddings=self.max_text_positions,
            hidden_act="gelu",
            layer_norm_eps=1e-12,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            pad_token_id=0,
            is_decoder=True,
        )


def imagereward_key_map(architecture: ImageRewardArchitecture) -> dict[str, tuple[Part, str]]:
    """Where each parameter of the published ``ImageReward.pt`` goes.

    The checkpoint is the ``state_dict`` of THUDM's ``ImageReward`` module: ``blip.visual_encoder.*``
    (BLIP's ViT), ``blip.text_encoder.*`` (BLIP's BERT with cross-attention), ``mlp.layers.*`` (the
    head), plus the :data:`UNUSED_KEYS`. The ViT's names change as in transformers'
    ``convert_blip_original_pytorch_to_hf.py``; the BERT's and the head's are kept.

    Args:
        architecture: The sizes (the number of layers sets the keys).

    Returns:
        ``{original key: (part, key in that part)}``, ``part`` being ``"vision"``
        (``BlipVisionModel``), ``"text"`` (``BlipTextModel`` without pooler) or ``"head"``
        (:class:`AestheticMLP`).

    Example:
        >>> key_map = imagereward_key_map(ImageRewardArchitecture())
        >>> key_map["blip.visual_encoder.blocks.23.attn.proj.weight"]
        ('vision', 'encoder.layers.23.self_attn.projection.weight')
        >>> key_map["blip.text_encoder.encoder.layer.11.crossattention.self.key.bias"]
        ('text', 'encoder.layer.11.crossattention.self.key.bias')
        >>> len(key_map)
        620
    """
    vision = "blip.visual_encoder."
    key_map: dict[str, tuple[Part, str]] = {
        f"{vision}cls_token": ("vision", "embeddings.class_embedding"),
        f"{vision}pos_embed": ("vision", "embeddings.position_embedding"),
    }
    for p in ("weight", "bias"):
        key_map[f"{vision}patch_embed.proj.{p}"] = ("vision", f"embeddings.patch_embedding.{p}")
        for i in range(architecture.vision_layers):
            for original, renamed in _VISION_BLOCK.items():
                key_map[f"{vision}blocks.{i}.{original}.{p}"] = ("vision", f"encoder.layers.{i}.{renamed}.{p}")
        key_map[f"{vision}norm.{p}"] = ("vision", f"post_layernorm.{p}")

    text_keys = ["embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight"]
    text_keys += [f"embeddings.LayerNorm.{p}" for p in ("weight", "bias")]
    text_keys += [
        f"encoder.layer.{i}.{name}.{p}"
        for i in range(architecture.text_layers)
        for name in _TEXT_LAYER
        for p in ("weight", "bias")
    ]
    key_map.update({f"blip.text_encoder.{key}": ("text", key) for key in text_keys})
    key_map.update(
        {f"mlp.layers.{i}.{p}": ("head", f"layers.{i}.{p}") for i in HEAD_INDICES for p in ("weight", "bias")}
    )
    return key_map


def check_imagereward_keys(
    state: Mapping[str, Tensor], architecture: ImageRewardArchitecture, name: str = "checkpoint"
) -> None:
    """Raise a clear error unless ``state`` has the published checkpoint's keys for ``architecture``.

    Args:
        state: The checkpoint's ``state_dict``.
        architecture: The sizes (the number of layers sets the keys).
        name: How the checkpoint is named in the message.

    Raises:
        ValueError: If keys are missing or unknown (both listed); the :data:`UNUSED_KEYS` may be
            present or not.
    """
    key_map = imagereward_key_map(architecture)
    missing = sorted(set(key_map) - set(state))
    unknown = sorted(set(state) - set(key_map) - UNUSED_KEYS)
    if missing or unknown:
        raise ValueError(
            f"{name} does not have ImageReward's key layout ({len(missing)} missing, {len(unknown)} "
            f"unknown): missing {_some(missing)}, unknown {_some(unknown)}; expected the state dict "
            "of THUDM's ImageReward.pt (blip.visual_encoder.*, blip.text_encoder.*, mlp.layers.*) "
            f"for vision_layers={architecture.vision_layers}, text_layers={architecture.text_layers}"
        )


def load_imagereward_state_dict(
    modules: Mapping[Part, nn.Module],
    state: Mapping[str, Tensor],
    architecture: ImageRewardArchitecture,
    name: str = "checkpoint",
) -> None:
    """Copy a published-layout state dict into the vision, text and head modules.

    Args:
        modules: ``{"vision": BlipVisionModel, "text": BlipTextModel, "head": AestheticMLP}``.
        state: The checkpoint's ``state_dict`` (:func:`imagereward_key_map` gives its keys).
        architecture: The sizes the modules were built with.
        name: How the checkpoint is named in the messages.

    Raises:
        ValueError: If keys are missing or unknown, or shapes differ (each listed, by its
            original name).
    """
    key_map = imagereward_key_map(architecture)
    check_imagereward_keys(state, architecture, name)
    targets = {part: module.state_dict() for part, module in modules.items()}
    misshapen = [
        f"{original} {list(state[original].shape)} (architecture: {list(targets[part][key].shape)})"
        for original, (part, key) in key_map.items()
        if state[original].shape != targets[part][key].shape
    ]
    if misshapen:
        raise ValueError(
            f"{name} does not fit architecture={architecture}: {len(misshapen)} tensors differ in "
            f"shape: {_some(misshapen, 4)}; set the sizes the checkpoint was trained with (the "
            "defaults are the published ImageReward's)"
        )
    for part, module in modules.items():
        module.load_state_dict({key: state[original] for original, (p, key) in key_map.items() if p == part})


def _some(keys: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}]"


def standardise_image_reward(raw: Tensor) -> Tensor:
    """ImageReward's score from the head's raw output: ``(raw - mean) / std`` over its training images.

    Example:
        >>> standardise_image_reward(torch.tensor([IMAGE_REWARD_MEAN, IMAGE_REWARD_MEAN + IMAGE_REWARD_STD]))
        tensor([0., 1.])
    """
    return (raw - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD


class ImageReward(FrozenModule, RewardModule):
    """ImageReward's human-preference score of each image for its prompt (Xu et al. 2023).

    ``reward(x, z) = (MLP(BLIP_text(z | BLIP_vit(x))[CLS]) - 0.1672) / 1.0333``, see the module
    docstring. The score is standardised: 0 is the average of ImageReward's training images,
    +1 one standard deviation better (most images score within about -2 to +2). It is
    differentiable with respect to the images (ReFL's reward); the weights are frozen and the
    module always stays in eval mode.

    Args:
        checkpoint: Local path of the published ``ImageReward.pt`` (THUDM/ImageReward on the
            Hugging Face Hub), a ``state_dict`` in the original key layout.
        tokenizer_path: Local folder of the bert-base-uncased tokenizer (its ``vocab.txt``);
            BLIP's ``[DEC]`` and ``[ENC]`` tokens are added to it.
        architecture: The BLIP sizes; the default is the published model's.
        max_length: Prompt length in tokens, ``[CLS]`` and ``[SEP]`` included: longer prompts
            are truncated, shorter ones padded (ImageReward's 35).

    Raises:
        FileNotFoundError: If ``checkpoint`` or ``tokenizer_path`` does not exist.
        ValueError: If the checkpoint's keys or shapes do not fit ``architecture``, or the
            tokenizer has more tokens than the word embedding.

    Example:
        >>> ImageReward("missing/ImageReward.pt", "bert-base-uncased")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        FileNotFoundError: ImageReward checkpoint not found: checkpoint='missing/ImageReward.pt'. ...
    """

    batch_level = False

    def __init__(
        self,
        checkpoint: str,
        tokenizer_path: str,
        architecture: ImageRewardArchitecture = ImageRewardArchitecture(),  # noqa: B008 - frozen dataclass
        max_length: int = 35,
    ) -> None:
        super().__init__()
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(
                f"ImageReward checkpoint not found: checkpoint={checkpoint!r}. Download ImageReward.pt "
                "from the Hugging Face Hub (THUDM/ImageReward) on a machine with internet access and "
                "pass the local file path."
            )
        if not Path(tokenizer_path).is_dir():
            raise FileNotFoundError(
                f"tokenizer folder not found: tokenizer_path={tokenizer_path!r}. Save the bert-base-uncased "
                "tokenizer (its vocab.txt) on a machine with internet access, e.g. "
                "`huggingface-cli download google-bert/bert-base-uncased vocab.txt tokenizer_config.json "
                "--local-dir DIR`, and pass DIR."
            )
        if max_length < 2 or max_length > architecture.max_text_positions:
            raise ValueError(
                f"max_length={max_length}; expected 2 to {architecture.max_text_positions} tokens (ImageReward uses 35)"
            )
        self.architecture = architecture
        self.max_length = max_length
        self.tokenizer = _load_tokenizer(tokenizer_path, architecture.vocab_size)

        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        name = f"checkpoint={checkpoint!r}"
        check_imagereward_keys(state, architecture, name)
        head_keys = [f"mlp.layers.{i}.weight" for i in HEAD_INDICES]
        widths = [architecture.text_width] + [state[key].shape[1] for key in head_keys[1:]]
        self.vision = BlipVisionModel(architecture.vision_config())
        self.text = BlipTextModel(architecture.text_config(), add_pooling_layer=False)
        self.head = AestheticMLP((*widths, state[head_keys[-1]].shape[0]))
        load_imagereward_state_dict(
            {"vision": self.vision, "text": self.text, "head": self.head}, state, architecture, name
        )
        self.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self.eval()

    def preprocess(self, images: Tensor) -> Tensor:
        """ImageReward's pixels from images ``[B, 3, H, W]`` in ``[0, 1]``, differentiably.

        The shorter side is resized to ``image_size`` (bicubic, antialiased like PIL), the centre
        ``image_size`` square is cropped and the channels are normalised with CLIP's mean and
        std. (torchvision's ``Resize`` floors the longer side where this rounds it: at most one
        pixel apart, before the crop.)
        """
        size = self.architecture.image_size
        images = resize_images(images, shortest_edge=size, crop_size=(size, size), mode="bicubic")
        return (images.to(self.mean.dtype) - self.mean) / self.std

    def tokenize(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Token ids and attention mask ``[B, max_length]`` of the prompts, as ImageReward pads them."""
        tokens = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return tokens["input_ids"].to(self.mean.device), tokens["attention_mask"].to(self.mean.device)

    def score(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Standardised scores ``[B]`` of preprocessed pixels and tokenised prompts (``score_gard``).

        Args:
            pixels: ``[B, 3, image_size, image_size]`` from :meth:`preprocess`.
            input_ids: ``[B, L]`` prompt token ids from :meth:`tokenize`.
            attention_mask: ``[B, L]``, 1 for the prompt's tokens and 0 for padding.
        """
        # 2. image patches; every patch is attended to, as the original's all-ones image mask says
        image_embeds = self.vision(pixel_values=pixels.to(self.vision.dtype)).last_hidden_state
        # 3. the prompt's tokens cross-attend to them; bidirectional self-attention (an encoder)
        text = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            is_decoder=False,
        ).last_hidden_state
        # 4. the head on the [CLS] token, then the standardisation
        raw = self.head(text[:, 0].to(self.head.layers[0].weight.dtype)).squeeze(-1)
        return standardise_image_reward(raw.float())

    def forward(self, images: Tensor, prompts: Sequence[str], **metadata: Any) -> Tensor:
        """ImageReward score of each image for its prompt, ``[B]`` (NaN for a non-finite image).

        Args:
            images: ``[B, 3, H, W]`` in ``[0, 1]``.
            prompts: The ``B`` prompts the images were generated from.
            **metadata: Ignored.
        """
        finite = check_prompted_images(images, prompts, type(self).__name__)
        input_ids, attention_mask = self.tokenize(prompts)
        return score_finite_images(
            lambda images: self.score(self.preprocess(images), input_ids, attention_mask), images, finite
        )


def _load_tokenizer(tokenizer_path: str, vocab_size: int) -> BertTokenizer:
    """bert-base-uncased's tokenizer with BLIP's ``[DEC]`` and ``[ENC]`` (``init_tokenizer`` of BLIP)."""
    folder = Path(tokenizer_path)
    if not ((folder / "vocab.txt").is_file() or (folder / "tokenizer.json").is_file()):
        raise FileNotFoundError(
            f"no BERT tokenizer in tokenizer_path={tokenizer_path!r}: the folder needs bert-base-uncased's "
            "vocab.txt (or its tokenizer.json)"
        )
    tokenizer = BertTokenizer.from_pretrained(tokenizer_path)
    tokenizer.add_tokens(list(SPECIAL_TOKENS), special_tokens=True)
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"tokenizer_path={tokenizer_path!r} has {len(tokenizer)} tokens with [DEC] and [ENC] but the "
            f"word embedding has vocab_size={vocab_size} rows; use bert-base-uncased (30522 + 2 = 30524)"
        )
    return tokenizer
