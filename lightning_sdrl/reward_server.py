"""Serving a reward over HTTP, for :class:`~lightning_sdrl.rewards.remote.RemoteReward` clients.

``python -m lightning_sdrl serve-reward -c configs/reward_server/digits_classifier.yaml`` serves
the ``reward:`` of a config (``class_path`` / ``init_args``, as ``model.init_args.reward`` of a
training config) with :func:`serve_reward`; :func:`reward_app` is the FastAPI application it runs:

* ``POST /score``: a request in the wire format of :mod:`lightning_sdrl.rewards.wire` (images as
  safetensors, prompts and metadata in its header) -> ``{"rewards": [float | null, ...], ...}``,
  computed under ``torch.no_grad`` on the server's device; a non-finite reward is ``null``. A
  request that is not in the wire format (wrong shape or dtype, a prompt count that is not the
  image count), or that the reward refuses (``ValueError`` / ``TypeError``), is answered with 422
  and a message saying what is wrong; the client does not retry it. Any other error of the reward
  is a 500 with its message (the client retries it).
* ``GET /health``: ``{"status": "ok", "reward": <class name>, "batch_level": ..., "device": ...}``.

One request is scored at a time (the reward is not assumed to be thread-safe); several training
processes may share one server.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Literal

import jsonargparse
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from lightning_sdrl.rewards.base import RewardModule, check_reward_output
from lightning_sdrl.rewards.wire import WIRE_FORMAT, WireFormatError, decode_request, encode_rewards

__all__ = ["reward_app", "reward_server_parser", "serve_reward"]

log = logging.getLogger("lightning_sdrl")


def reward_app(reward: RewardModule, device: str | None = None) -> FastAPI:
    """The FastAPI application serving ``reward`` at ``POST /score`` and ``GET /health``.

    Args:
        reward: The reward to serve; it is moved to ``device`` and put in eval mode.
        device: Where the reward runs, e.g. ``"cuda:0"``; ``None``: ``"cuda"`` if available, else ``"cpu"``.

    Returns:
        The application (run it with uvicorn, or :func:`serve_reward`).
    """
    where = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    reward = reward.to(where).eval()
    name, batch_level = type(reward).__name__, bool(getattr(reward, "batch_level", False))
    lock = threading.Lock()
    app = FastAPI(title=f"lightning_sdrl reward server: {name}")

    def score_body(body: bytes) -> JSONResponse:
        try:
            request = decode_request(body)
        except WireFormatError as error:
            return JSONResponse({"detail": f"malformed scoring request: {error}"}, status_code=422)
        try:
            with lock, torch.no_grad():
                rewards = reward(request.images.to(where), request.prompts, **request.metadata)
                rewards = check_reward_output(rewards, len(request.images), name)
        except (TypeError, ValueError) as error:  # the reward refuses these images, prompts or metadata
            return JSONResponse({"detail": f"{name} refused the request: {error}"}, status_code=422)
        except Exception as error:  # noqa: BLE001 - the client is told, and retries (out of memory, a judge down)
            log.exception("%s failed on a batch of %d images", name, len(request.images))
            return JSONResponse({"detail": f"{name} failed: {type(error).__name__}: {error}"}, status_code=500)
        return JSONResponse(encode_rewards(rewards, batch_level))

    @app.post("/score")
    async def score(request: Request) -> JSONResponse:
        """Rewards of a batch of images: ``{"rewards": [float | null, ...], "dtype": ..., "batch_level": ...}``."""
        return await run_in_threadpool(score_body, await request.body())

    @app.get("/health")
    def health() -> dict[str, Any]:
        """What this server serves: the reward's class name, whether it is batch-level, its device."""
        return {"status": "ok", "reward": name, "batch_level": batch_level, "device": str(where), "format": WIRE_FORMAT}

    return app


def serve_reward(
    reward: RewardModule,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str | None = None,
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info",
) -> None:
    """Serve ``reward`` over HTTP until interrupted (Ctrl-C).

    Args:
        reward: The reward to serve: any RewardModule, by ``class_path`` and ``init_args``.
        host: Address to listen on; ``0.0.0.0`` accepts other machines (the server has no
            authentication: keep it on a trusted network).
        port: TCP port to listen on.
        device: Where the reward runs, e.g. ``cuda:0``; unset: ``cuda`` if available, else ``cpu``.
        log_level: uvicorn's log level (``info`` logs every request).
    """
    app = reward_app(reward, device)
    log.info("serving %s at http://%s:%d/score", type(reward).__name__, host, port)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def reward_server_parser() -> jsonargparse.ArgumentParser:
    """The parser of ``lightning-sdrl serve-reward``: a config file (``-c``) and :func:`serve_reward`'s arguments.

    Example:
        >>> parser = reward_server_parser()
        >>> config = parser.parse_args(["--reward=lightning_sdrl.rewards.simple.Brightness", "--port=9000"])
        >>> config.reward.class_path, config.host, config.port
        ('lightning_sdrl.rewards.simple.Brightness', '127.0.0.1', 9000)
    """
    parser = jsonargparse.ArgumentParser(
        prog="lightning-sdrl serve-reward",
        description="Serve a reward over HTTP for RemoteReward clients (POST /score, GET /health).",
    )
    parser.add_argument("-c", "--config", action=jsonargparse.ActionConfigFile, help="a YAML config file")
    parser.add_function_arguments(serve_reward)
    return parser
