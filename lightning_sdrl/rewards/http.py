"""HTTP requests of the rewards that run elsewhere (a reward server, a VLM judge): timeouts, retries, clear errors.

One function, :func:`post`, sends a request body to a URL and returns the answer's bytes;
:func:`post_json` wraps it for JSON in and out. Both use only the standard library, so a
training job needs no HTTP package of its own.

Failure rules, the same for every remote reward:

* a connection refused or reset, a timeout, or an answer with status 429 or 5xx is retried
  ``retries`` times, waiting ``backoff * 2**attempt`` seconds before each retry; when every attempt
  fails, :class:`RemoteRewardError` names the URL, the attempts and the last error;
* any other 4xx answer is not retried (the request itself is wrong): the error quotes the server's
  message;
* an answer that is not the JSON asked for is a :class:`RemoteRewardError` naming the URL.

A remote reward never turns a failure into a reward of zero: a dead server stops the run.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

__all__ = ["RETRYABLE_STATUS", "RemoteRewardError", "decode_json", "post", "post_json"]

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
"""HTTP statuses worth retrying: the server is overloaded or restarting, not refusing the request."""


class RemoteRewardError(RuntimeError):
    """A remote reward could not be computed: the server is down, timed out, or answered malformed data."""


def _describe(error: BaseException) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code}: {_error_text(error)}"
    if isinstance(error, urllib.error.URLError):
        return f"{type(error.reason).__name__}: {error.reason}"
    return f"{type(error).__name__}: {error}"


def _error_text(error: urllib.error.HTTPError, limit: int = 300) -> str:
    try:
        text = error.read().decode("utf-8", "replace").strip()
    except Exception:  # noqa: BLE001 - the body is only quoted in the message
        text = ""
    return (text[:limit] + "...") if len(text) > limit else (text or str(error.reason))


def post(
    url: str,
    body: bytes,
    content_type: str,
    *,
    timeout: float,
    retries: int,
    backoff: float,
    headers: dict[str, str] | None = None,
    what: str = "reward server",
) -> bytes:
    """POST ``body`` to ``url`` and return the answer's body, retrying transient failures.

    Args:
        url: The endpoint, e.g. ``"http://127.0.0.1:8000/score"``.
        body: The request body.
        content_type: Its ``Content-Type``.
        timeout: Seconds to wait for each attempt (connection and answer).
        retries: How many times to retry after the first attempt fails transiently.
        backoff: Seconds before the first retry; doubled before each next one.
        headers: Extra headers (e.g. ``Authorization``).
        what: What the server is, for the messages ("reward server", "VLM judge").

    Returns:
        The answer's body.

    Raises:
        RemoteRewardError: If every attempt failed, or the server refused the request (4xx).
        ValueError: If ``timeout``, ``retries`` or ``backoff`` is out of range.

    Example:
        >>> post("http://127.0.0.1:9/score", b"{}", "application/json", timeout=0.5, retries=0, backoff=0.0)
        Traceback (most recent call last):
        ...
        lightning_sdrl.rewards.http.RemoteRewardError: reward server at http://127.0.0.1:9/score failed 1 attempt ...
    """
    if timeout <= 0 or retries < 0 or backoff < 0:
        raise ValueError(
            f"got timeout={timeout}, retries={retries}, backoff={backoff}; expected timeout > 0, retries >= 0 "
            "and backoff >= 0 (seconds)"
        )
    request_headers = {"Content-Type": content_type, **(headers or {})}
    last: BaseException | None = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        request = urllib.request.Request(url, data=body, headers=request_headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as answer:
                return answer.read()
        except urllib.error.HTTPError as error:
            if error.code not in RETRYABLE_STATUS:
                raise RemoteRewardError(
                    f"{what} at {url} refused the request ({_describe(error)}); check the request's settings "
                    "(model name, image size, prompts) against the server"
                ) from error
            last = error
        except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
            last = error
    attempts = retries + 1
    start = " (start one: `python -m lightning_sdrl serve-reward -c reward.yaml`)" if what == "reward server" else ""
    raise RemoteRewardError(
        f"{what} at {url} failed {attempts} attempt{'s' * (attempts > 1)} ({_describe(last)}); check that it "
        f"is running and reachable at that URL{start}, or raise the timeout / retries"
    ) from last


def post_json(
    url: str,
    payload: Any,
    *,
    timeout: float,
    retries: int,
    backoff: float,
    headers: dict[str, str] | None = None,
    what: str = "reward server",
) -> Any:
    """POST ``payload`` as JSON and return the decoded JSON answer (see :func:`post` for the arguments).

    Raises:
        RemoteRewardError: As :func:`post`, or if the answer is not valid JSON.
    """
    answer = post(
        url,
        json.dumps(payload).encode("utf-8"),
        "application/json",
        timeout=timeout,
        retries=retries,
        backoff=backoff,
        headers=headers,
        what=what,
    )
    return decode_json(answer, url, what)


def decode_json(answer: bytes, url: str, what: str = "reward server") -> Any:
    """Decode a JSON answer, or raise :class:`RemoteRewardError` naming the URL and quoting the start of it.

    Example:
        >>> decode_json(b'{"rewards": [1.0]}', "http://host/score")
        {'rewards': [1.0]}
        >>> decode_json(b"<html>", "http://host/score")
        Traceback (most recent call last):
        ...
        lightning_sdrl.rewards.http.RemoteRewardError: reward server at http://host/score answered malformed JSON ...
    """
    try:
        return json.loads(answer.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        start = answer[:120].decode("utf-8", "replace")
        raise RemoteRewardError(
            f"{what} at {url} answered malformed JSON ({error}): {start!r}; check that the URL points at the "
            "scoring endpoint"
        ) from error
