"""RemoteReward: exactly the served reward's numbers, in a DDPO run too; retries, timeouts and clear errors."""

import json
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import uvicorn

from lightning_sdrl.cli import run_cli
from lightning_sdrl.digits.classifier import DigitsClassifier
from lightning_sdrl.digits.data import load_digits_images
from lightning_sdrl.reward_server import reward_app
from lightning_sdrl.rewards.attribute import ShiftReward
from lightning_sdrl.rewards.http import RemoteRewardError
from lightning_sdrl.rewards.remote import RemoteReward
from lightning_sdrl.rewards.simple import Brightness
from lightning_sdrl.rewards.wire import decode_request, encode_rewards
from tests.test_reward_server import serving

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- a fake server (stdlib)
@dataclass
class Seen:
    """A request the fake server received."""

    body: bytes
    headers: dict[str, str]
    time: float


@dataclass
class FakeServer:
    """Answers each request with the next of ``answers`` (the last one repeats): ``(status, body, delay_s)``.

    A body that is a callable gets the request body and returns the answer's body.
    """

    answers: list[tuple[int, bytes | Callable[[bytes], bytes], float]]
    seen: list[Seen] = field(default_factory=list)


def brightness_answer(body: bytes) -> bytes:
    """What a server of mean brightness answers."""
    images = decode_request(body).images
    return json.dumps(encode_rewards(images.mean(dim=(1, 2, 3)))).encode()


OK = (200, brightness_answer, 0.0)


@contextmanager
def fake_server(*answers) -> Iterator[tuple[str, FakeServer]]:
    """A stdlib HTTP server on a free port of 127.0.0.1 answering as told; yields its URL and record."""
    fake = FakeServer(list(answers) or [OK])

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            fake.seen.append(Seen(body, dict(self.headers), time.monotonic()))
            status, answer, delay = fake.answers[min(len(fake.seen), len(fake.answers)) - 1]
            time.sleep(delay)
            payload = answer(body) if callable(answer) else answer
            self.send_response(status)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args) -> None:  # quiet
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request, client_address) -> None:  # a client that timed out and left
            pass

    server = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", fake
    finally:
        server.shutdown()
        server.server_close()


IMAGES = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
PROMPTS = ["a", "b", "c"]


# ---------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(url="127.0.0.1:8000"), r"url='127.0.0.1:8000'; expected the server's http\(s\) URL"),
        (dict(timeout=0), "timeout=0; expected seconds > 0"),
        (dict(retries=-1), "retries=-1; expected >= 0"),
        (dict(backoff=-1.0), "backoff=-1.0; expected seconds >= 0"),
        (dict(max_batch_size=0), "max_batch_size=0; expected >= 1"),
        (dict(max_batch_size=4, batch_level=True), "max_batch_size=4 with batch_level=True"),
    ],
)
def test_arguments_out_of_range_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        RemoteReward(**{"url": "http://127.0.0.1:8000", **options})


def test_defaults_compute_in_the_background():
    reward = RemoteReward("http://127.0.0.1:8000/")
    assert reward.background and not reward.batch_level and reward.score_url == "http://127.0.0.1:8000/score"


# ---------------------------------------------------------------- exactly the served reward
@pytest.mark.parametrize(
    ("make_reward", "dtype"),
    [
        (lambda: ShiftReward(DigitsClassifier(), target=1, groups=[[0], [6]]), torch.float32),
        (Brightness, torch.float64),  # the images' dtype travels, and the rewards' dtype comes back
        (Brightness, torch.bfloat16),
    ],
)
def test_rewards_are_exactly_those_of_the_reward_in_process(make_reward, dtype):
    reward = make_reward()
    images = load_digits_images(size=32)[0][:10].expand(-1, 3, -1, -1).to(dtype)  # the digits 0, 1, ..., 9
    with torch.no_grad():
        expected = reward(images, ["a round digit"] * 10)
    with serving(reward_app(reward, device="cpu")) as url:
        rewards = RemoteReward(url)(images, ["a round digit"] * 10)
    assert rewards.dtype == expected.dtype and torch.equal(rewards, expected)
    assert expected.unique().numel() > 5


def test_null_is_nan_and_non_finite_images_are_nan_without_being_scored():
    with fake_server((200, b'{"rewards": [0.5, null, 0.25]}', 0.0)) as (url, fake):
        rewards = RemoteReward(url)(IMAGES, PROMPTS)
    assert torch.equal(rewards[[0, 2]], torch.tensor([0.5, 0.25])) and rewards[1].isnan()
    images = IMAGES.clone()
    images[1, 0, 0, 0] = float("nan")
    with fake_server() as (url, fake):
        per_image = RemoteReward(url)(images, PROMPTS)
        batch_level = RemoteReward(url, batch_level=True)(images, PROMPTS)
    expected = IMAGES.mean(dim=(1, 2, 3))
    assert torch.equal(per_image[[0, 2]], expected[[0, 2]]) and per_image[1].isnan()
    assert torch.equal(batch_level[[0, 2]], expected[[0, 2]]) and batch_level[1].isnan()
    # per-image: a black image in its place; batch-level: only the finite images, with their prompts
    sent = [decode_request(seen.body) for seen in fake.seen]
    assert sent[0].images[1].eq(0).all() and sent[0].prompts == PROMPTS
    assert torch.equal(sent[1].images, IMAGES[[0, 2]]) and sent[1].prompts == ["a", "c"]


def test_large_batches_are_split_into_requests_of_max_batch_size():
    images = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with fake_server() as (url, fake):
        rewards = RemoteReward(url, max_batch_size=2, headers={"Authorization": "Bearer t"})(images, list("abcde"))
    assert torch.equal(rewards, images.mean(dim=(1, 2, 3)))
    assert [decode_request(seen.body).prompts for seen in fake.seen] == [["a", "b"], ["c", "d"], ["e"]]
    assert all(seen.headers["Authorization"] == "Bearer t" for seen in fake.seen)


# ---------------------------------------------------------------- failures
def test_transient_failures_are_retried_with_exponential_backoff():
    with fake_server((503, b"loading", 0.0), (502, b"", 0.0), OK) as (url, fake):
        rewards = RemoteReward(url, retries=3, backoff=0.1)(IMAGES, PROMPTS)
    assert torch.equal(rewards, IMAGES.mean(dim=(1, 2, 3)))
    assert len(fake.seen) == 3
    gaps = [later.time - earlier.time for earlier, later in zip(fake.seen, fake.seen[1:], strict=False)]
    assert gaps[0] >= 0.1 and gaps[1] >= 0.2  # backoff, then twice it


def test_a_server_that_keeps_failing_is_an_error_naming_it_after_the_retries():
    with fake_server((503, b"overloaded", 0.0)) as (url, fake):
        with pytest.raises(RemoteRewardError, match=rf"^reward server at {url}/score failed 3 attempts \(HTTP 503"):
            RemoteReward(url, retries=2, backoff=0.0)(IMAGES, PROMPTS)
    assert len(fake.seen) == 3


def test_no_server_is_an_error_naming_the_url():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        with pytest.raises(RemoteRewardError, match=rf"at {url}/score failed 2 attempts.*Connection"):
            RemoteReward(url, retries=1, backoff=0.0)(IMAGES, PROMPTS)


def test_timeouts_are_retried_then_an_error():
    with fake_server((200, brightness_answer, 1.0), OK) as (url, fake):
        rewards = RemoteReward(url, timeout=0.2, retries=1, backoff=0.0)(IMAGES, PROMPTS)
    assert torch.equal(rewards, IMAGES.mean(dim=(1, 2, 3))) and len(fake.seen) == 2
    with fake_server((200, brightness_answer, 1.0)) as (url, fake):
        with pytest.raises(RemoteRewardError, match=rf"at {url}/score failed 2 attempts \(.*timed out"):
            RemoteReward(url, timeout=0.2, retries=1, backoff=0.0)(IMAGES, PROMPTS)
    assert len(fake.seen) == 2


def test_a_refused_request_is_not_retried():
    with fake_server((400, b"image size must be 512", 0.0)) as (url, fake):
        with pytest.raises(RemoteRewardError, match=f"{url}/score refused the request.*image size must be 512"):
            RemoteReward(url, retries=3, backoff=10.0)(IMAGES, PROMPTS)
    assert len(fake.seen) == 1


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"<html>busy</html>", "answered malformed JSON"),
        (b'{"rewards": [0.1, 0.2]}', "answered 2 rewards for 3 images"),
        (b'{"rewards": [0.1, "high", 0.3]}', r"answered reward 1 = 'high' \(str\), not a number or null"),
        (b'{"rewards": [0.1, true, 0.3]}', r"answered reward 1 = True \(bool\)"),
        (b'{"scores": [0.1, 0.2, 0.3]}', r"answered an object without the key 'rewards' \(keys: \['scores'\]\)"),
        (b"[0.1, 0.2, 0.3]", r"answered a JSON list \(\[0.1, 0.2, 0.3\]\) instead of an object"),
        (b'{"rewards": {"a": 1}}', r"answered 'rewards' = \{\"a\": 1\} \(dict\) instead of a list"),
        (b'{"rewards": [1, 2, 3], "dtype": "int8"}', "answered 'dtype' = 'int8'"),
    ],
)
def test_malformed_answers_are_errors_naming_the_url_and_the_problem(answer, message):
    with fake_server((200, answer, 0.0)) as (url, fake):
        with pytest.raises(RemoteRewardError, match=rf"^reward server at {url}/score {message}"):
            RemoteReward(url, retries=3, backoff=10.0)(IMAGES, PROMPTS)
    assert len(fake.seen) == 1  # a wrong answer is not retried


# ---------------------------------------------------------------- in a DDPO run
def digits_ddpo(tmp_path: Path, *extra: str):
    """Two epochs of two batches of 4 samples of configs/digits/ddpo_shift.yaml, 4 denoising steps."""
    return run_cli(
        [
            "fit",
            "-c",
            str(ROOT / "configs" / "digits" / "ddpo_shift.yaml"),
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_epochs=2",
            "--trainer.callbacks=[]",
            "--trainer.logger=false",
            "--trainer.enable_checkpointing=false",
            "--trainer.limit_val_batches=0",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--model.init_args.num_steps=4",
            "--model.init_args.train_batch_size=4",
            "--model.init_args.sample_grid_every_n_epochs=0",
            "--model.init_args.save_trained_on_end=false",
            "--data.init_args.batch_size=4",
            "--data.init_args.num_batches_per_epoch=2",
            "--cpu_threads=1",
            *extra,
        ]
    ).model


def remote(url: str, **init_args) -> str:
    return "--model.init_args.reward=" + json.dumps(
        {"class_path": "lightning_sdrl.rewards.remote.RemoteReward", "init_args": {"url": url, **init_args}}
    )


def test_a_digits_ddpo_run_gets_exactly_the_in_process_rewards_in_the_background_or_not(tmp_path, monkeypatch):
    threads: dict[bool, set[str]] = {True: set(), False: set()}
    request = RemoteReward._request

    def recorded(reward, *args):
        threads[reward.background].add(threading.current_thread().name.split("_")[0])
        return request(reward, *args)

    monkeypatch.setattr(RemoteReward, "_request", recorded)
    local = digits_ddpo(tmp_path / "local")
    served = ShiftReward(DigitsClassifier(), target=1, groups=[[0], [6]])
    runs = {}
    with serving(reward_app(served, device="cpu")) as url:
        for background in (True, False):
            runs[background] = digits_ddpo(tmp_path / str(background), remote(url, background=background))
    assert threads == {True: {"reward"}, False: {"MainThread"}}  # the loop's worker thread, or in line
    for background, module in runs.items():
        assert isinstance(module.reward, RemoteReward) and module.reward.background is background
        assert torch.equal(module.last_update.rewards, local.last_update.rewards)
        assert torch.equal(module.last_update.advantages, local.last_update.advantages)
        assert torch.equal(torch.stack(module.reward_history), torch.stack(local.reward_history))
    assert len(local.reward_history) == 2 and local.last_update.rewards.std() > 0


@pytest.mark.parametrize("background", [True, False])
def test_a_ddpo_run_whose_server_is_down_stops_with_the_error(tmp_path, background):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        with pytest.raises(RemoteRewardError, match=rf"^reward server at {url}/score failed 2 attempts"):
            digits_ddpo(tmp_path, remote(url, retries=1, backoff=0.0, background=background))


class StopServerAtEpoch(pl.Callback):
    """Stops the test's uvicorn server when epoch ``epoch`` starts (the server dies mid-run)."""

    server: uvicorn.Server | None = None
    thread: threading.Thread | None = None

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            StopServerAtEpoch.server.should_exit = True
            StopServerAtEpoch.thread.join(timeout=10)


def test_a_server_that_dies_mid_run_is_retried_then_stops_the_run_naming_it(tmp_path, monkeypatch):
    """Epoch 0 is scored by the server; it stops before epoch 1: retries, then the error (no zeros)."""
    served = ShiftReward(DigitsClassifier(), target=1, groups=[[0], [6]])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(reward_app(served, device="cpu"), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive()
        time.sleep(0.01)
    StopServerAtEpoch.server, StopServerAtEpoch.thread = server, thread
    attempts: list[bool] = []
    urlopen = urllib.request.urlopen

    def counted(*args, **kwargs):
        try:
            answer = urlopen(*args, **kwargs)
        except Exception:
            attempts.append(False)
            raise
        attempts.append(True)
        return answer

    monkeypatch.setattr(urllib.request, "urlopen", counted)
    try:
        with pytest.raises(RemoteRewardError, match=rf"^reward server at {url}/score failed 3 attempts"):
            digits_ddpo(
                tmp_path,
                remote(url, retries=2, backoff=0.05, background=False),  # in line: the attempts in order
                "--trainer.callbacks+=tests.rewards.test_remote_reward.StopServerAtEpoch",
                "--trainer.callbacks.epoch=1",
            )
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
    assert attempts == [True, True, False, False, False]  # epoch 0's two batches scored, then 3 failed attempts
