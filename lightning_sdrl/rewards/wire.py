"""The wire format of a reward server: images and prompts in, rewards out, for the client and the server alike.

A request (``POST /score``, ``Content-Type:`` :data:`CONTENT_TYPE`) is one `safetensors
<https://huggingface.co/docs/safetensors>`_ file:

* the tensor ``"images"``: ``[B, 3, H, W]`` in ``[0, 1]``, in the images' own floating dtype
  (float32, float16, bfloat16 or float64), little-endian, so the server scores bit for bit the
  pixels the sampler drew;
* its ``__metadata__`` (strings): ``"format"`` = :data:`WIRE_FORMAT`, ``"prompts"`` = the JSON list
  of the ``B`` prompts, ``"metadata"`` = a JSON object of the reward's keyword arguments.

The answer is JSON: ``{"rewards": [float | null, ...], "dtype": "float32", "batch_level": false}``,
one value per image; ``null`` is a reward the server could not compute (a non-finite one), which the
client turns into NaN (the training loop drops it). A Python float holds every float32 / float16 /
bfloat16 / float64 value exactly and JSON writes it with all its digits, so the rewards are the
server's to the bit; ``"dtype"`` (optional, default float32) is the dtype to read them back in.

Example:
    >>> images = torch.rand(2, 3, 4, 4)
    >>> request = decode_request(encode_request(images, ["a", "b"], {"step": 3}))
    >>> torch.equal(request.images, images), request.prompts, request.metadata
    (True, ['a', 'b'], {'step': 3})
    >>> decode_rewards(encode_rewards(torch.tensor([0.5, float("nan")])), 2, "http://host/score")
    tensor([0.5000,    nan])
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from lightning_sdrl.rewards.base import check_images
from lightning_sdrl.rewards.http import RemoteRewardError

__all__ = [
    "CONTENT_TYPE",
    "WIRE_FORMAT",
    "ScoreRequest",
    "WireFormatError",
    "decode_request",
    "decode_rewards",
    "encode_request",
    "encode_rewards",
]

CONTENT_TYPE = "application/vnd.lightning-sdrl.score+safetensors"
"""``Content-Type`` of a scoring request."""

WIRE_FORMAT = "lightning_sdrl.score/1"
"""Version of the request format, in the request's ``__metadata__["format"]``."""

REWARD_DTYPES = {
    str(dtype).removeprefix("torch."): dtype for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
}
"""The dtypes an answer's ``"dtype"`` may name."""


class WireFormatError(ValueError):
    """A scoring request that does not follow the wire format (the server answers it with a 4xx)."""


@dataclass
class ScoreRequest:
    """A decoded scoring request.

    Attributes:
        images: ``[B, 3, H, W]`` floats in ``[0, 1]`` (NaN or infinite pixels allowed: the reward flags them).
        prompts: The ``B`` prompts.
        metadata: The reward's keyword arguments.
    """

    images: Tensor
    prompts: list[str]
    metadata: dict[str, Any]


def encode_request(images: Tensor, prompts: list[str], metadata: dict[str, Any] | None = None) -> bytes:
    """The body of a scoring request: ``images`` as safetensors, prompts and metadata as JSON in its header.

    Args:
        images: ``[B, 3, H, W]`` floating-point images (any device; sent in their own dtype).
        prompts: The ``B`` prompts.
        metadata: JSON-serialisable keyword arguments for the reward.

    Raises:
        TypeError: If a value of ``metadata`` is not JSON-serialisable.
    """
    metadata = metadata or {}
    for key, value in metadata.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError) as error:
            raise TypeError(
                f"metadata {key!r} is a {type(value).__name__}, which a reward server cannot receive ({error}); "
                "pass JSON values (str, numbers, lists, dicts), e.g. tensor.tolist()"
            ) from error
    header = {"format": WIRE_FORMAT, "prompts": json.dumps(list(prompts)), "metadata": json.dumps(metadata)}
    return save_safetensors({"images": images.detach().cpu().contiguous()}, metadata=header)


def _header(body: bytes) -> dict[str, Any]:
    """The JSON header of a safetensors file: an 8-byte little-endian length, then that many bytes."""
    if len(body) < 8:
        raise WireFormatError(f"the request body has {len(body)} bytes; expected a safetensors file")
    (length,) = struct.unpack("<Q", body[:8])
    try:
        header = json.loads(body[8 : 8 + length].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WireFormatError(f"the request body is not a safetensors file ({error})") from error
    if not isinstance(header, dict):
        raise WireFormatError("the request body is not a safetensors file (its header is not a JSON object)")
    return header


def decode_request(body: bytes) -> ScoreRequest:
    """Read a scoring request written by :func:`encode_request`, checking what the reward relies on.

    Raises:
        WireFormatError: If the body is not such a request: not safetensors, another format version,
            no ``images`` or not ``[B, 3, H, W]`` floats, prompts that are not ``B`` strings.
    """
    header = _header(body).get("__metadata__") or {}
    if not isinstance(header, dict):
        raise WireFormatError("the request's safetensors __metadata__ is not a JSON object of strings")
    if header.get("format") != WIRE_FORMAT:
        raise WireFormatError(
            f"the request's format is {header.get('format')!r}; expected {WIRE_FORMAT!r} (a request written by "
            "lightning_sdrl.rewards.wire.encode_request): update the client or the server to the same version"
        )
    try:
        tensors = load_safetensors(body)
        prompts = json.loads(header.get("prompts", "null"))
        metadata = json.loads(header.get("metadata", "{}"))
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types for corrupt data
        raise WireFormatError(f"the request is corrupt ({type(error).__name__}: {error})") from error
    if set(tensors) != {"images"}:
        raise WireFormatError(f"the request holds the tensors {sorted(tensors)}; expected exactly ['images']")
    images = tensors["images"]
    try:
        check_images(images, "the reward server")
    except (TypeError, ValueError) as error:
        raise WireFormatError(str(error)) from error
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise WireFormatError(f"the request's prompts are {prompts!r:.200}; expected a JSON list of strings")
    if len(prompts) != len(images):
        raise WireFormatError(
            f"the request has {len(prompts)} prompts for {len(images)} images; expected one prompt per image"
        )
    if not isinstance(metadata, dict):
        raise WireFormatError(f"the request's metadata is {metadata!r:.200}; expected a JSON object")
    return ScoreRequest(images, prompts, metadata)


def encode_rewards(rewards: Tensor, batch_level: bool = False) -> dict[str, Any]:
    """The JSON answer for ``[B]`` rewards: non-finite ones become ``null``.

    Example:
        >>> encode_rewards(torch.tensor([0.25, float("inf")]))
        {'rewards': [0.25, None], 'dtype': 'float32', 'batch_level': False}
    """
    dtype = str(rewards.dtype).removeprefix("torch.")
    values = [value if math.isfinite(value) else None for value in rewards.detach().cpu().tolist()]
    return {"rewards": values, "dtype": dtype if dtype in REWARD_DTYPES else "float32", "batch_level": batch_level}


def decode_rewards(answer: Any, batch_size: int, url: str, what: str = "reward server") -> Tensor:
    """``[batch_size]`` rewards from a server's decoded JSON answer (``null`` -> NaN).

    Args:
        answer: The decoded JSON.
        batch_size: How many images were sent.
        url: The URL that answered, for the messages.
        what: What the server is, for the messages.

    Raises:
        RemoteRewardError: If ``answer`` is not ``{"rewards": [...]}`` with ``batch_size`` numbers or nulls.

    Example:
        >>> decode_rewards({"rewards": [1.0, "high"]}, 2, "http://h/score")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lightning_sdrl.rewards.http.RemoteRewardError: ... at http://h/score answered reward 1 = 'high' (str), ...
    """

    def wrong(what_was_wrong: str) -> RemoteRewardError:
        return RemoteRewardError(
            f'{what} at {url} answered {what_was_wrong}; expected {{"rewards": [float | null, ...]}} with '
            f"{batch_size} values: check that the URL points at a reward server (python -m lightning_sdrl "
            "serve-reward) and that the server and this client are the same version"
        )

    if not isinstance(answer, dict):
        return_type = type(answer).__name__
        raise wrong(f"a JSON {return_type} ({json.dumps(answer)[:120]}) instead of an object")
    if "rewards" not in answer:
        raise wrong(f"an object without the key 'rewards' (keys: {sorted(answer)})")
    rewards = answer["rewards"]
    if not isinstance(rewards, list):
        raise wrong(f"'rewards' = {json.dumps(rewards)[:120]} ({type(rewards).__name__}) instead of a list")
    if len(rewards) != batch_size:
        raise wrong(f"{len(rewards)} rewards for {batch_size} images")
    for index, value in enumerate(rewards):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise wrong(f"reward {index} = {value!r:.60} ({type(value).__name__}), not a number or null")
    dtype = answer.get("dtype", "float32")
    if dtype not in REWARD_DTYPES:
        raise wrong(f"'dtype' = {dtype!r}, not one of {sorted(REWARD_DTYPES)}")
    return torch.tensor([math.nan if value is None else value for value in rewards], dtype=REWARD_DTYPES[dtype])
