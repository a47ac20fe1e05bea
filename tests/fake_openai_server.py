"""A small OpenAI-compatible chat-completions server on 127.0.0.1 for the VLM-judge tests.

``FakeOpenAIServer(respond)`` serves ``POST /v1/chat/completions`` from a free port in a
background thread; ``respond(body, headers)`` returns ``(status, payload)`` (a dict is sent as
JSON, bytes as they are). It records every request and the most requests it held at once, and
can wait ``delay`` seconds before answering (to overlap requests, or outlast a client's timeout).

``digits_judge`` answers from a real local scorer, the digits miniature's classifier: it decodes
the request's PNG data URL, reads the digit named in the question ("... the digit 7 ..."), and
answers P(that digit) either as first-token log-probabilities or as the text "Score: {10 p:.1f}".
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import torch
from PIL import Image

Respond = Callable[[dict[str, Any], dict[str, str]], tuple[int, Any]]


class FakeOpenAIServer:
    """An OpenAI-compatible server answering ``POST /v1/chat/completions`` with ``respond``."""

    def __init__(self, respond: Respond, delay: float = 0.0) -> None:
        self.respond = respond
        self.delay = delay
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.01,), daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    @property
    def questions(self) -> list[str]:
        """The text part of each request, in the order received."""
        return [question_of(body) for body in self.requests]

    def __enter__(self) -> FakeOpenAIServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()  # wakes the handlers still waiting out their delay
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep the test output clean
                pass

            def do_POST(self) -> None:  # noqa: N802 - the name http.server calls
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server._lock:
                    server.requests.append(body)
                    server.headers.append(dict(self.headers))
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    if self.path != "/v1/chat/completions":
                        status, payload = 404, {"error": f"no route {self.path}"}
                    else:
                        status, payload = server.respond(body, dict(self.headers))
                    if server._stop.wait(server.delay):
                        return
                    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (its timeout): nothing to answer
                finally:
                    with server._lock:
                        server.in_flight -= 1

        return Handler


def question_of(body: dict[str, Any]) -> str:
    """The text content of a chat-completions request."""
    return next(part["text"] for part in body["messages"][0]["content"] if part["type"] == "text")


def image_of(body: dict[str, Any]) -> torch.Tensor:
    """The request's image (a PNG data URL) as ``[3, H, W]`` floats in ``[0, 1]``."""
    url = next(part["image_url"]["url"] for part in body["messages"][0]["content"] if part["type"] == "image_url")
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix), url[:40]
    array = np.asarray(Image.open(io.BytesIO(base64.b64decode(url[len(prefix) :]))).convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255


def completion(content: str | None = None, top_logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A chat completion with one choice, in the OpenAI format."""
    logprobs = None
    if top_logprobs is not None:
        chosen = max((entry.get("logprob", 0.0) for entry in top_logprobs), default=0.0)
        logprobs = {"content": [{"token": content or "", "logprob": chosen, "top_logprobs": top_logprobs}]}
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "logprobs": logprobs,
                "finish_reason": "length",
            }
        ],
    }


def _log(p: float) -> float:
    return math.log(p) if p > 0 else -1e4  # what a server reports for a vanishing probability


def yes_no_logprobs(p: float) -> list[dict[str, Any]]:
    """First-token alternatives with P(yes | yes or no) = p, split over case variants and a distractor."""
    return [
        {"token": "Yes", "logprob": _log(0.6 * p)},
        {"token": " yes", "logprob": _log(0.3 * p)},
        {"token": "No", "logprob": _log(0.9 * (1 - p))},
        {"token": "The", "logprob": _log(0.1)},
    ]


def digits_judge(classifier: torch.nn.Module, mode: str) -> Respond:
    """``respond`` of a judge that answers P(digit named in the question) from ``classifier``."""
    lock = threading.Lock()

    def respond(body: dict[str, Any], headers: dict[str, str]) -> tuple[int, Any]:
        digit = int(re.search(r"digit (\d)", question_of(body)).group(1))
        with lock, torch.no_grad():
            p = float(classifier(image_of(body)[None])[0, digit])
        if mode == "yes_probability":
            return 200, completion("Yes" if p >= 0.5 else "No", yes_no_logprobs(p))
        return 200, completion(f"Score: {10 * p:.1f}")

    return respond
