"""The reward server: the wire format round trip, POST /score and GET /health, 4xx answers, the CLI."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import uvicorn
from safetensors.torch import save as save_safetensors

from lightning_sdrl.cli import EXIT_CONFIG_ERROR, main
from lightning_sdrl.digits.classifier import DigitsClassifier
from lightning_sdrl.reward_server import reward_app
from lightning_sdrl.rewards.attribute import ShiftReward
from lightning_sdrl.rewards.base import RewardModule
from lightning_sdrl.rewards.http import RemoteRewardError
from lightning_sdrl.rewards.remote import RemoteReward
from lightning_sdrl.rewards.simple import Brightness
from lightning_sdrl.rewards.wire import (
    CONTENT_TYPE,
    WIRE_FORMAT,
    WireFormatError,
    decode_request,
    decode_rewards,
    encode_request,
    encode_rewards,
)

ROOT = Path(__file__).resolve().parents[1]
SERVER_CONFIG = ROOT / "configs" / "reward_server" / "digits_classifier.yaml"


@contextmanager
def serving(app) -> Iterator[str]:
    """Run ``app`` with uvicorn in a thread on a free port of 127.0.0.1; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # port 0: the system picks a free one
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of a tensor: equal bits, NaN payloads included."""
    return tensor.contiguous().flatten().view(torch.uint8)


def http(url: str, body: bytes | None = None) -> tuple[int, dict]:
    """``(status, decoded JSON)`` of a GET (no body) or POST, without retries."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": CONTENT_TYPE})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


class Recorder(RewardModule):
    """Brightness that records whether gradients were enabled, the device and the metadata it got."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[bool, torch.device, dict]] = []

    def forward(self, images, prompts, **metadata):
        self.calls.append((torch.is_grad_enabled(), images.device, metadata))
        if metadata.get("fail") == "value":
            raise ValueError("images must be 64x64; got 4x4")
        if metadata.get("fail") == "runtime":
            raise RuntimeError("CUDA out of memory")
        return images.mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def recorder_server():
    reward = Recorder()
    with serving(reward_app(reward, device="cpu")) as url:
        yield url, reward


# ---------------------------------------------------------------- the wire format
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_request_round_trips_images_bit_for_bit(dtype):
    images = torch.rand(3, 3, 5, 7, generator=torch.Generator().manual_seed(0)).to(dtype)
    images[0, 0, 0, :4] = torch.tensor([float("nan"), float("inf"), 1e-40, -0.0])  # subnormal, signed zero
    prompts = ["a round digit", "ünïcode ✓", ""]
    request = decode_request(encode_request(images, prompts, {"step": 3, "tags": ["x"]}))
    assert request.images.dtype == dtype and request.images.shape == images.shape
    assert torch.equal(bits(request.images), bits(images))
    assert request.prompts == prompts and request.metadata == {"step": 3, "tags": ["x"]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_rewards_round_trip_exactly_and_non_finite_ones_become_nan(dtype):
    finfo = torch.finfo(dtype)
    rewards = torch.tensor([0.1, finfo.tiny, finfo.max, -finfo.eps, float("nan"), float("inf")], dtype=dtype)
    answer = json.loads(json.dumps(encode_rewards(rewards)))  # through JSON text, as on the wire
    assert answer["rewards"][4:] == [None, None]
    decoded = decode_rewards(answer, len(rewards), "http://host/score")
    assert decoded.dtype == dtype
    assert torch.equal(bits(decoded[:4]), bits(rewards[:4])) and decoded[4:].isnan().all()


def _body(tensors: dict, **header: str) -> bytes:
    prompts = json.dumps(["a"] * len(next(iter(tensors.values()))))
    return save_safetensors(tensors, metadata={"format": WIRE_FORMAT, "prompts": prompts, **header})


MALFORMED = [
    (b"not safetensors", "not a safetensors file|format is None"),
    (_body({"images": torch.rand(2, 3, 4, 4)}, format="other/9"), "format is 'other/9'; expected"),
    (_body({"images": torch.randint(0, 255, (2, 3, 4, 4), dtype=torch.uint8)}), "dtype torch.uint8"),
    (_body({"images": torch.rand(2, 1, 4, 4)}), r"shape \[2, 1, 4, 4\]; expected \[B, 3, H, W\]"),
    (_body({"images": torch.rand(2, 3, 4, 4)}, prompts='["a"]'), "1 prompts for 2 images"),
    (_body({"images": torch.rand(2, 3, 4, 4)}, prompts="[1, 2]"), "expected a JSON list of strings"),
    (_body({"images": torch.rand(2, 3, 4, 4), "x": torch.zeros(1)}), r"tensors \['images', 'x'\]"),
]


@pytest.mark.parametrize(("body", "message"), MALFORMED)
def test_malformed_requests_are_refused_with_a_message(body, message):
    with pytest.raises(WireFormatError, match=message):
        decode_request(body)


# ---------------------------------------------------------------- the server
@pytest.mark.parametrize(("body", "message"), MALFORMED)
def test_server_answers_422_with_the_message_for_a_malformed_request(recorder_server, body, message):
    url, _ = recorder_server
    status, answer = http(f"{url}/score", body)
    assert status == 422
    assert answer["detail"].startswith("malformed scoring request: ")
    assert re.search(message, answer["detail"]), answer


def test_server_scores_without_gradients_on_its_device_and_passes_metadata(recorder_server):
    url, reward = recorder_server
    images = torch.rand(2, 3, 4, 4)
    status, answer = http(f"{url}/score", encode_request(images, ["a", "b"], {"seed": 7}))
    assert status == 200
    assert torch.equal(decode_rewards(answer, 2, url), images.mean(dim=(1, 2, 3)))
    assert answer["batch_level"] is False and answer["dtype"] == "float32"
    assert reward.calls[-1] == (False, torch.device("cpu"), {"seed": 7})
    assert not reward.training  # served in eval mode


def test_server_refuses_what_the_reward_refuses_and_reports_its_failures(recorder_server):
    url, _ = recorder_server
    images = torch.rand(1, 3, 4, 4)
    status, answer = http(f"{url}/score", encode_request(images, ["a"], {"fail": "value"}))
    assert (status, answer["detail"]) == (422, "Recorder refused the request: images must be 64x64; got 4x4")
    status, answer = http(f"{url}/score", encode_request(images, ["a"], {"fail": "runtime"}))
    assert (status, answer["detail"]) == (500, "Recorder failed: RuntimeError: CUDA out of memory")


def test_health_names_the_reward_and_whether_it_is_batch_level(recorder_server):
    url, _ = recorder_server
    assert http(f"{url}/health") == (
        200,
        {"status": "ok", "reward": "Recorder", "batch_level": False, "device": "cpu", "format": WIRE_FORMAT},
    )


def test_client_of_a_server_gets_its_422_message_without_retrying(recorder_server):
    url, _ = recorder_server
    remote = RemoteReward(url, retries=3, backoff=10.0)  # a retry would take 10 s
    with pytest.raises(RemoteRewardError, match=f"{url}/score refused the request.*images must be 64x64"):
        remote(torch.rand(1, 3, 4, 4), ["a"], fail="value")


# ---------------------------------------------------------------- the command line
def test_serve_reward_cli_serves_the_config_reward_exactly_until_killed():
    port = free_port()
    command = [sys.executable, "-m", "lightning_sdrl", "serve-reward", "-c", str(SERVER_CONFIG), f"--port={port}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.communicate()[0]
            try:
                health = http(f"{url}/health")
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, "the server did not start in 120 s"
                time.sleep(0.2)
        assert health[1]["reward"] == "ShiftReward" and health[1]["batch_level"] is False
        local = ShiftReward(DigitsClassifier(), target=1, groups=[[0], [6]])
        images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        images[2, 0, 0, 0] = float("nan")  # scored NaN by both, the others in a batch of the same size
        remote = RemoteReward(url, retries=1, backoff=0.0)
        with torch.no_grad():
            expected = local(images, ["a round digit"] * 6)
        rewards = remote(images, ["a round digit"] * 6)
        assert torch.equal(bits(rewards), bits(expected)) and rewards[2].isnan()
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=30)
    with pytest.raises(RemoteRewardError, match=f"reward server at {url}/score failed 2 attempts"):
        remote(images, ["a round digit"] * 6)


def test_serve_reward_cli_prints_the_reward_error_last_and_exits_2(capsys):
    args = ["serve-reward", "-c", str(SERVER_CONFIG), "--reward.init_args.target=7"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == EXIT_CONFIG_ERROR
    assert capsys.readouterr().err.strip().splitlines()[-1] == "ValueError: target=7; expected a column index in [0, 1]"


def test_serve_reward_cli_help_and_unknown_keys(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve-reward", "--help"])
    assert exit_info.value.code in (None, 0)
    printed = capsys.readouterr().out
    assert all(option in printed for option in ("--reward REWARD", "--port PORT", "--device DEVICE", "-c CONFIG"))
    with pytest.raises(SystemExit) as exit_info:
        main(["serve-reward", "--reward.help", "BalanceReward"])
    assert "--reward.threshold" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["serve-reward", "-c", str(SERVER_CONFIG), "--not_an_option=1"])
    assert exit_info.value.code == 2 and "not_an_option" in capsys.readouterr().err


def test_a_batch_level_reward_is_reported_by_health_and_answers():
    class Centred(Brightness):
        batch_level = True

    with serving(reward_app(Centred(), device="cpu")) as url:
        assert http(f"{url}/health")[1]["batch_level"] is True
        with pytest.raises(ValueError, match="serves a batch-level reward, but RemoteReward has batch_level=False"):
            RemoteReward(url)(torch.rand(2, 3, 4, 4), ["a", "b"])
        assert RemoteReward(url, batch_level=True)(torch.rand(2, 3, 4, 4), ["a", "b"]).shape == (2,)
