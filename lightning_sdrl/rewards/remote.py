"""A reward computed by a reward server: the images go over HTTP, the rewards come back.

The server (``python -m lightning_sdrl serve-reward -c reward.yaml``, :mod:`lightning_sdrl.reward_server`)
runs any :class:`~lightning_sdrl.rewards.base.RewardModule` on its own machine or GPU; the
training job holds only this client, which needs nothing but the standard library and safetensors.
The wire format (lossless images, JSON rewards) is :mod:`lightning_sdrl.rewards.wire`; timeouts,
retries with exponential backoff and the errors are :mod:`lightning_sdrl.rewards.http`. A dead
server stops the run with a :class:`~lightning_sdrl.rewards.http.RemoteRewardError` naming its URL,
never with a reward of zero.

In a training config::

    reward:
      class_path: lightning_sdrl.rewards.remote.RemoteReward
      init_args:
        url: http://reward-host:8000
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_sdrl.rewards.base import RewardModule, check_prompted_images, score_finite_images
from lightning_sdrl.rewards.http import decode_json, post
from lightning_sdrl.rewards.wire import CONTENT_TYPE, decode_rewards, encode_request

__all__ = ["RemoteReward"]


class RemoteReward(RewardModule):
    """The reward a reward server computes: ``POST <url>/score`` with the images, prompts and metadata.

    Images with a NaN or infinite pixel are not sent: they get NaN here, the way every reward of the
    package treats them (:func:`~lightning_sdrl.rewards.base.score_finite_images`). A reward the
    server answers as ``null`` is NaN too; the training loop drops both.

    Args:
        url: The server's base URL, e.g. ``"http://127.0.0.1:8000"``; requests go to ``<url>/score``.
        timeout: Seconds to wait for each request (the server scores the whole batch within it).
        retries: How many times a failed request (connection refused, timeout, HTTP 429 / 5xx) is
            retried before the run stops with an error.
        backoff: Seconds before the first retry, doubled before each next one.
        max_batch_size: Most images per request; a larger batch is sent as several requests.
            ``None`` sends each batch whole. Not with ``batch_level`` (the batch is the reward's unit).
        background: Let the online RL loop compute the rewards in a background thread, so the
            server's work overlaps the sampling of the next batch (the rewards are the same).
        batch_level: Set it when the served reward is batch-level (e.g. ``BalanceReward``): under DDP
            the loop then sends the images of all processes in one batch. The server says which it
            serves (``GET <url>/health``); a mismatch is an error at the first batch.
        headers: Extra HTTP headers, e.g. ``{"Authorization": "Bearer ..."}``.

    Raises:
        ValueError: If an argument is out of range (each message names it).

    Example:
        >>> reward = RemoteReward("http://127.0.0.1:9", timeout=0.5, retries=0)
        >>> reward(torch.rand(1, 3, 8, 8), ["a digit"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lightning_sdrl.rewards.http.RemoteRewardError: reward server at http://127.0.0.1:9/score failed 1 attempt ...
    """

    def __init__(
        self,
        url: str,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 1.0,
        max_batch_size: int | None = None,
        background: bool = True,
        batch_level: bool = False,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url={url!r}; expected the server's http(s) URL, e.g. 'http://127.0.0.1:8000'")
        if timeout <= 0:
            raise ValueError(f"timeout={timeout}; expected seconds > 0")
        if retries < 0:
            raise ValueError(f"retries={retries}; expected >= 0 (0: no retry)")
        if backoff < 0:
            raise ValueError(f"backoff={backoff}; expected seconds >= 0")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size}; expected >= 1, or None to send each batch whole")
        if max_batch_size is not None and batch_level:
            raise ValueError(
                f"max_batch_size={max_batch_size} with batch_level=True; a batch-level reward must see the whole "
                "batch at once: set max_batch_size to None"
            )
        self.url = url.rstrip("/")
        self.score_url = f"{self.url}/score"
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.max_batch_size = max_batch_size
        self.background = background
        self.batch_level = batch_level
        self.headers = dict(headers or {})

    def forward(self, images: Tensor, prompts: list[str], **metadata: Any) -> Tensor:
        """Rewards ``[B]`` of ``[B, 3, H, W]`` images in ``[0, 1]`` (NaN for non-finite images or a ``null``).

        Args:
            images: The images, on any device.
            prompts: Their ``B`` prompts.
            **metadata: JSON-serialisable keyword arguments, passed to the served reward.

        Raises:
            RemoteRewardError: If the server cannot be reached after the retries, refuses the request,
                or answers something other than ``B`` rewards.
        """
        finite = check_prompted_images(images, prompts, type(self).__name__)
        # score_finite_images sends a batch-level reward only the finite images, a per-image reward
        # the whole batch with black images in place of the non-finite ones
        kept = [p for p, keep in zip(prompts, finite.tolist(), strict=True) if keep or not self.batch_level]
        rewards = score_finite_images(lambda x: self._score(x, kept, metadata), images, finite, self.batch_level)
        return rewards.to(images.device)

    def _score(self, images: Tensor, prompts: list[str], metadata: dict[str, Any]) -> Tensor:
        """Send ``images`` in requests of at most ``max_batch_size``; the rewards in order."""
        if len(images) == 0:
            return images.new_empty(0)
        size = self.max_batch_size or len(images)
        chunks = [
            self._request(images[start : start + size], prompts[start : start + size], metadata)
            for start in range(0, len(images), size)
        ]
        return torch.cat(chunks)

    def _request(self, images: Tensor, prompts: list[str], metadata: dict[str, Any]) -> Tensor:
        body = encode_request(images, prompts, metadata)
        answer = decode_json(
            post(
                self.score_url,
                body,
                CONTENT_TYPE,
                timeout=self.timeout,
                retries=self.retries,
                backoff=self.backoff,
                headers=self.headers,
            ),
            self.score_url,
        )
        rewards = decode_rewards(answer, len(images), self.score_url)
        if answer.get("batch_level") and not self.batch_level:
            raise ValueError(
                f"reward server at {self.url} serves a batch-level reward, but RemoteReward has batch_level=False; "
                "set batch_level: true so that it sees the images of all processes as one batch"
            )
        return rewards

    def extra_repr(self) -> str:
        """The URL and the request settings, for ``print(module)``."""
        return (
            f"url={self.url!r}, timeout={self.timeout}, retries={self.retries}, max_batch_size={self.max_batch_size}, "
            f"background={self.background}, batch_level={self.batch_level}"
        )
