"""A vision-language model as the judge of each image, over an OpenAI-compatible chat API.

:class:`VLMJudgeReward` asks a VLM served by vLLM, SGLang or any server of the OpenAI
chat-completions API (``POST {base_url}/chat/completions``) one question per image, written from a
template and the image's prompt (:func:`~lightning_sdrl.functional.judge.fill_question`), and
reads the answer as a reward in one of two modes:

* ``"yes_probability"``: the probability of "yes" as the first answer token, renormalised over
  "yes" and "no" (:func:`~lightning_sdrl.functional.judge.yes_probability`), read from the
  answer's top log-probabilities; a smooth reward in ``[0, 1]``;
* ``"number"``: the first number of a free-text answer
  (:func:`~lightning_sdrl.functional.judge.parse_score`), "Score: 7/10" -> 7.

Serving a judge with vLLM, for example::

    vllm serve Qwen/Qwen2.5-VL-7B-Instruct --port 8000 --api-key $VLLM_API_KEY

and in the run's YAML::

    reward:
      class_path: VLMJudgeReward
      init_args:
        base_url: http://judge-host:8000/v1
        model: Qwen/Qwen2.5-VL-7B-Instruct
        question: "Does this image show {prompt}? Answer yes or no."
        api_key_env: VLLM_API_KEY

Each image is one request (a chat completion holds one conversation), sent as a lossless PNG
(``data:image/png;base64,...`` in the ``image_url`` content format) of the image quantised to 8
bits: ``round(255 * x) / 255``, at most ``1/510`` from the float image, which is the image a judge
of saved pictures would see. Requests go out from a thread pool, ``max_concurrency`` at a time.

Failures follow :mod:`lightning_sdrl.rewards.http`: a dead or slow server is retried with
exponential backoff, then stops the run with a :class:`~lightning_sdrl.rewards.http.RemoteRewardError`
naming the URL (never a silent zero); an answer that is not a chat completion (no ``choices``, no
log-probabilities in ``"yes_probability"`` mode) is an error too. An answer that is well formed
but does not answer the question (neither "yes" nor "no" among the first token's alternatives, no
number in the text) gives that image a NaN reward, which the training loop drops, and a warning
counts them.
"""

from __future__ import annotations

import base64
import io
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import torch
from PIL import Image
from torch import Tensor

from lightning_sdrl.functional.judge import fill_question, parse_score, yes_probability
from lightning_sdrl.rewards.base import RewardModule, check_prompted_images, score_finite_images
from lightning_sdrl.rewards.http import RemoteRewardError, post_json
from lightning_sdrl.validation import check_positive_ints

__all__ = ["JudgeMode", "VLMJudgeReward", "png_data_url"]

JudgeMode = Literal["yes_probability", "number"]
"""How an answer becomes a reward: P(yes) from log-probabilities, or a number parsed from the text."""

DEFAULT_MAX_TOKENS = {"yes_probability": 1, "number": 16}
"""Tokens a judge may write when ``max_tokens`` is not given: the first token is all that P(yes)
needs; a few for a score ("Score: 7.5/10")."""

_WHAT = "VLM judge"


def png_data_url(image: Tensor) -> str:
    """A ``[3, H, W]`` image in ``[0, 1]`` as an 8-bit PNG data URL (``data:image/png;base64,...``).

    The image is quantised to 8 bits (``round(255 * x)``); the PNG holds those bytes exactly.

    Example:
        >>> url = png_data_url(torch.full((3, 2, 2), 0.5))
        >>> url[:22]
        'data:image/png;base64,'
        >>> Image.open(io.BytesIO(base64.b64decode(url[22:]))).getpixel((0, 0))
        (128, 128, 128)
    """
    pixels = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy()).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class VLMJudgeReward(RewardModule):
    """A VLM's judgement of each image: P(yes) to a question about it, or the score it writes.

    Not differentiable (the judge runs on another machine): a reward for DDPO / GRPO-style
    methods, not for ReFL. It needs no GPU of its own; by default it runs in the background
    (``background=True``), while the policy samples the next batch.

    Args:
        base_url: The API's base URL, up to and including its version, e.g.
            ``"http://127.0.0.1:8000/v1"``; requests go to ``{base_url}/chat/completions``.
        model: The served model's name, as the server lists it at ``{base_url}/models``.
        question: The question asked about each image, a template whose ``{prompt}`` is replaced
            by the image's prompt, e.g. ``"Does this image show {prompt}? Answer yes or no."``
            (``"yes_probability"``) or ``"Rate how well this image shows {prompt} from 0 to 10.
            Answer with the number only."`` (``"number"``).
        mode: ``"yes_probability"``: the reward is P(yes) / (P(yes) + P(no)) of the first answer
            token, in ``[0, 1]``; ``"number"``: the first number of the answer.
        api_key: Sent as ``Authorization: Bearer <api_key>``. A key written here is saved with the
            run's config: prefer ``api_key_env``.
        api_key_env: Name of an environment variable holding the key (e.g. ``"VLLM_API_KEY"``),
            read at each batch and never saved. Exclusive with ``api_key``. There is no default:
            a key found in the environment (say ``OPENAI_API_KEY``) is not sent to a server that
            was not given it on purpose. Neither given: no ``Authorization`` header (a local
            server started without ``--api-key``).
        max_tokens: Most tokens the judge may write; ``None``: 1 for ``"yes_probability"`` (only
            the first token is read), 16 for ``"number"``.
        temperature: Sampling temperature of the answer; 0 (greedy) makes a ``"number"`` answer
            deterministic. In ``"yes_probability"`` mode the reward comes from the
            log-probabilities, not the sampled token.
        top_logprobs: How many alternatives of the first token the server returns
            (``"yes_probability"``); "yes" and "no" must be among them to count. The OpenAI API
            allows up to 20, vLLM up to its ``--max-logprobs`` (default 20).
        timeout: Seconds to wait for each answer.
        retries: Retries of a request after a connection error, a timeout or an HTTP 429 / 5xx.
        backoff: Seconds before the first retry, doubled before each next one.
        max_concurrency: Requests in flight at once (per process under DDP); each image is one
            request.
        score_range: ``(low, high)`` of a ``"number"`` score, e.g. ``(0, 10)``: an answer outside
            it gives NaN, and the rewards are rescaled to ``[0, 1]`` by ``(score - low) / (high -
            low)``, the scale of ``"yes_probability"``. ``None`` keeps the number as written.
        background: Let the online RL loop compute this reward in a background thread,
            overlapping the next batch's sampling (:attr:`RewardModule.background`).

    Raises:
        ValueError: If an argument is out of range, the question has a placeholder other than
            ``{prompt}``, or ``api_key_env`` names an unset variable.

    Example:
        >>> judge = VLMJudgeReward("http://127.0.0.1:8000/v1", "Qwen/Qwen2.5-VL-7B-Instruct",
        ...                        "Does this image show {prompt}? Answer yes or no.")
        >>> judge.url, judge.background
        ('http://127.0.0.1:8000/v1/chat/completions', True)
        >>> judge.request(torch.zeros(3, 4, 4), "a cat")["messages"][0]["content"][1]
        {'type': 'text', 'text': 'Does this image show a cat? Answer yes or no.'}
    """

    batch_level = False

    def __init__(
        self,
        base_url: str,
        model: str,
        question: str,
        mode: JudgeMode = "yes_probability",
        api_key: str | None = None,
        api_key_env: str | None = None,
        max_tokens: int | None = None,
        temperature: float = 0.0,
        top_logprobs: int = 20,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 1.0,
        max_concurrency: int = 8,
        score_range: tuple[float, float] | None = None,
        background: bool = True,
    ) -> None:
        super().__init__()
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(
                f"base_url={base_url!r}; expected an http(s) URL up to the API version, e.g. 'http://127.0.0.1:8000/v1'"
            )
        if not model:
            raise ValueError(f"model=''; expected the served model's name, as listed at {base_url.rstrip('/')}/models")
        if mode not in DEFAULT_MAX_TOKENS:
            raise ValueError(f"mode={mode!r}; expected 'yes_probability' or 'number'")
        fill_question(question, "")  # a bad template fails here, not at the first batch
        if api_key is not None and api_key_env is not None:
            raise ValueError(
                f"got api_key and api_key_env={api_key_env!r}; give one of them (api_key_env keeps the key out "
                "of saved configs)"
            )
        if api_key_env is not None and not os.environ.get(api_key_env):
            raise ValueError(
                f"api_key_env={api_key_env!r} names an environment variable that is not set; export it "
                f"(export {api_key_env}=...) or leave api_key_env out for a server without a key"
            )
        max_tokens = DEFAULT_MAX_TOKENS[mode] if max_tokens is None else max_tokens
        check_positive_ints(max_tokens=max_tokens, top_logprobs=top_logprobs, max_concurrency=max_concurrency)
        if not temperature >= 0:
            raise ValueError(f"temperature={temperature}; expected >= 0 (0 for greedy answers)")
        if not timeout > 0 or not retries >= 0 or not backoff >= 0:
            raise ValueError(
                f"timeout={timeout}, retries={retries}, backoff={backoff}; expected timeout > 0, retries >= 0 "
                "and backoff >= 0 (seconds)"
            )
        if score_range is not None:
            if mode != "number":
                raise ValueError(
                    f"score_range={score_range!r} with mode={mode!r}; score_range applies to mode='number'"
                )
            parse_score("", score_range)  # checks low < high
            score_range = (float(score_range[0]), float(score_range[1]))
        self.base_url = base_url.rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.model = model
        self.question = question
        self.mode = mode
        self.api_key = api_key
        self.api_key_env = api_key_env
        self.max_tokens = max_tokens
        self.temperature = float(temperature)
        self.top_logprobs = top_logprobs
        self.timeout = float(timeout)
        self.retries = retries
        self.backoff = float(backoff)
        self.max_concurrency = max_concurrency
        self.score_range = score_range
        self.background = background

    def extra_repr(self) -> str:
        """The judge's URL, model and mode (never the key)."""
        return f"url={self.url!r}, model={self.model!r}, mode={self.mode!r}"

    def request(self, image: Tensor, prompt: str) -> dict[str, Any]:
        """The chat-completions request body that asks about one ``[3, H, W]`` image."""
        content = [
            {"type": "image_url", "image_url": {"url": png_data_url(image)}},
            {"type": "text", "text": fill_question(self.question, prompt)},
        ]
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        if self.mode == "yes_probability":
            body.update(logprobs=True, top_logprobs=self.top_logprobs)
        return body

    def _headers(self) -> dict[str, str]:
        key = os.environ.get(self.api_key_env, "") if self.api_key_env is not None else self.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _first_choice(self, answer: Any) -> dict[str, Any]:
        choices = answer.get("choices") if isinstance(answer, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise RemoteRewardError(
                f"{_WHAT} at {self.url} answered {str(answer)[:200]!r}, which has no choices; expected an OpenAI "
                "chat completion {'choices': [{'message': ..., 'logprobs': ...}]}: check that base_url ends with "
                "the API version (e.g. /v1) of an OpenAI-compatible server"
            )
        return choices[0]

    def _score(self, answer: Any) -> tuple[float, str]:
        """The reward of one answer and what the judge said (for the warning about NaNs)."""
        choice = self._first_choice(answer)
        if self.mode == "number":
            message = choice.get("message")
            text = message.get("content") if isinstance(message, dict) else None
            if not isinstance(text, str):
                raise RemoteRewardError(
                    f"{_WHAT} at {self.url} answered a choice without text content ({str(choice)[:200]!r}); a "
                    "reasoning model may have spent max_tokens thinking: raise max_tokens or turn its thinking off"
                )
            return parse_score(text, self.score_range), repr(text[:120])
        logprobs = choice.get("logprobs")
        content = logprobs.get("content") if isinstance(logprobs, dict) else None
        first = content[0] if isinstance(content, list) and content else None
        top = first.get("top_logprobs") if isinstance(first, dict) else None
        if not isinstance(top, list) or not top:
            raise RemoteRewardError(
                f"{_WHAT} at {self.url} answered without the first token's top log-probabilities "
                f"(choices[0].logprobs={str(choice.get('logprobs'))[:200]}), which mode='yes_probability' needs: "
                "the server must support logprobs=true with top_logprobs in chat completions (vLLM and SGLang do; "
                "vLLM allows top_logprobs up to its --max-logprobs flag), or use mode='number'"
            )
        try:
            reward = yes_probability(top)
        except ValueError as error:
            raise RemoteRewardError(f"{_WHAT} at {self.url} answered malformed log-probabilities: {error}") from None
        return reward, "top tokens " + ", ".join(repr(entry["token"]) for entry in top[:5])

    def _ask(self, image: Tensor, prompt: str) -> tuple[float, str]:
        answer = post_json(
            self.url,
            self.request(image, prompt),
            timeout=self.timeout,
            retries=self.retries,
            backoff=self.backoff,
            headers=self._headers(),
            what=_WHAT,
        )
        return self._score(answer)

    def _judge(self, images: Tensor, prompts: list[str]) -> Tensor:
        pixels = images.detach().cpu()  # one copy off the GPU, not one per request
        workers = min(self.max_concurrency, len(images))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vlm-judge") as pool:
            futures = [pool.submit(self._ask, image, prompt) for image, prompt in zip(pixels, prompts, strict=True)]
            try:
                answers = [future.result() for future in futures]
            except BaseException:
                pool.shutdown(cancel_futures=True)  # one failure stops the run: send no more requests
                raise
        unanswered = [said for reward, said in answers if math.isnan(reward)]
        if unanswered:
            expected = (
                "neither 'yes' nor 'no' among the first token's top alternatives"
                if self.mode == "yes_probability"
                else f"no number{'' if self.score_range is None else f' in score_range={self.score_range}'}"
            )
            warnings.warn(
                f"{type(self).__name__}: {len(unanswered)} of {len(answers)} answers of the {_WHAT} at {self.url} had "
                f"{expected} (e.g. {unanswered[0]}); their rewards are NaN and the training loop drops them: make "
                "the question ask for that answer explicitly",
                stacklevel=2,
            )
        rewards = torch.tensor([reward for reward, _ in answers], dtype=torch.float32, device=images.device)
        if self.score_range is not None:
            low, high = self.score_range
            rewards = (rewards - low) / (high - low)
        return rewards

    def forward(self, images: Tensor, prompts: list[str], **metadata: Any) -> Tensor:
        """Ask the judge about each image; returns ``[B]`` float32 rewards.

        Args:
            images: ``[B, 3, H, W]`` in ``[0, 1]``.
            prompts: The ``B`` prompts, put into the question template.
            **metadata: Ignored.

        Returns:
            ``[B]`` rewards; NaN for a non-finite image (not sent) and for an answer without
            "yes"/"no" or a number.

        Raises:
            RemoteRewardError: If the server fails every attempt, refuses a request, or answers
                something other than a chat completion (with log-probabilities in
                ``"yes_probability"`` mode).
        """
        finite = check_prompted_images(images, prompts, type(self).__name__)
        # batch_level=True only for its effect: non-finite images are left out, not sent as black stand-ins
        # (each would cost a request); the reward of an image does not depend on the others.
        if bool(finite.all()):
            return self._judge(images, prompts)
        kept = [prompt for prompt, keep in zip(prompts, finite.tolist(), strict=True) if keep]
        return score_finite_images(lambda x: self._judge(x, kept), images, finite, batch_level=True)
