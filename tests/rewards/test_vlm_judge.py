import math
import socket
import time

import pytest
import torch

from lightning_sdrl.digits.classifier import DigitsClassifier
from lightning_sdrl.digits.data import digits_split
from lightning_sdrl.rewards.base import RewardModule
from lightning_sdrl.rewards.http import RemoteRewardError
from lightning_sdrl.rewards.vlm_judge import VLMJudgeReward
from tests.fake_openai_server import (
    FakeOpenAIServer,
    completion,
    digits_judge,
    image_of,
    question_of,
    yes_no_logprobs,
)

QUESTION = "Does this image show the digit {prompt}? Answer yes or no."
MODEL = "fake/digits-judge"


@pytest.fixture(scope="module")
def classifier():
    return DigitsClassifier()


@pytest.fixture(scope="module")
def digits():
    """Eight test digits, three of them blends of two digits (so P(digit) is not only ~0 or ~1), with
    a prompt per image naming its own digit or another one."""
    images, labels = digits_split("test")
    images = images[:8].expand(-1, 3, -1, -1).clone()
    images[5:] = 0.5 * images[5:] + 0.5 * images[:3]
    labels = labels[:8].tolist()
    prompts = [str(label if i % 2 == 0 else (label + 1) % 10) for i, label in enumerate(labels)]
    prompts[5:] = [str(labels[i]) for i in range(3)]
    return images, prompts


def _quantised(images):
    return (images * 255).round() / 255


def _judge(server, **kwargs):
    kwargs = {"question": QUESTION, "timeout": 10.0, "retries": 0, "backoff": 0.0, **kwargs}
    return VLMJudgeReward(server.base_url, MODEL, **kwargs)


def _ok(body, headers):
    return 200, completion("Yes", yes_no_logprobs(0.75))


def test_yes_probability_equals_the_scorer_on_the_8bit_images(classifier, digits):
    images, prompts = digits
    with FakeOpenAIServer(digits_judge(classifier, "yes_probability")) as server:
        rewards = _judge(server)(images, prompts)
    with torch.no_grad():
        probs = classifier(_quantised(images))
    expected = probs[torch.arange(len(prompts)), torch.tensor([int(p) for p in prompts])]
    torch.testing.assert_close(rewards, expected, rtol=1e-5, atol=1e-6)
    assert rewards.dtype == torch.float32 and rewards.shape == (8,)
    assert rewards.min() < 0.05 and rewards.max() > 0.95 and ((rewards > 0.05) & (rewards < 0.95)).any()
    # each request holds one of the 8-bit images, exactly, with its own prompt's question
    seen = []
    for body in server.requests:
        (i,) = [i for i in range(8) if torch.equal(image_of(body), _quantised(images[i]))]
        assert question_of(body) == f"Does this image show the digit {prompts[i]}? Answer yes or no."
        seen.append(i)
        assert body["model"] == MODEL and body["logprobs"] is True and body["top_logprobs"] == 20
        assert body["max_tokens"] == 1 and body["temperature"] == 0.0
    assert sorted(seen) == list(range(8))
    assert all("Authorization" not in headers for headers in server.headers)


def test_number_mode_returns_the_written_score(classifier, digits):
    images, prompts = digits
    with FakeOpenAIServer(digits_judge(classifier, "number")) as server:
        raw = _judge(server, mode="number")(images, prompts)
        scaled = _judge(server, mode="number", score_range=(0, 10))(images, prompts)
    with torch.no_grad():
        probs = classifier(_quantised(images))
    written = [float(f"{10 * probs[i, int(p)]:.1f}") for i, p in enumerate(prompts)]
    torch.testing.assert_close(raw, torch.tensor(written))
    torch.testing.assert_close(scaled, torch.tensor(written) / 10)
    body = server.requests[0]
    assert body["max_tokens"] == 16 and "logprobs" not in body and "top_logprobs" not in body


def test_each_image_gets_its_own_prompts_question():
    images = torch.linspace(0, 1, 4).view(4, 1, 1, 1).expand(4, 3, 2, 2)
    prompts = ["a red cube", "a blue ball", "a red cube", "{prompt} literally"]
    answers = {}

    def respond(body, headers):
        answers[round(image_of(body)[0, 0, 0].item() * 255)] = question_of(body)
        return _ok(body, headers)

    with FakeOpenAIServer(respond) as server:
        _judge(server, question="Does this image show {prompt}?")(images, prompts)
    levels = [0, 85, 170, 255]  # round(255 * linspace(0, 1, 4))
    assert answers == {level: f"Does this image show {p}?" for level, p in zip(levels, prompts, strict=True)}


def test_timeouts_are_retried_then_name_the_url():
    with FakeOpenAIServer(_ok, delay=5.0) as server:
        judge = _judge(server, timeout=0.2, retries=2, backoff=0.01)
        start = time.perf_counter()
        with pytest.raises(
            RemoteRewardError, match=rf"VLM judge at {server.base_url}/chat/completions failed 3 attempts"
        ):
            judge(torch.rand(1, 3, 4, 4), ["x"])
        assert time.perf_counter() - start < 3.0  # three timeouts, not the server's delay
        assert len(server.requests) == 3


def test_dead_server_names_the_url():
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    judge = VLMJudgeReward(f"http://127.0.0.1:{port}/v1", MODEL, QUESTION, timeout=1.0, retries=1, backoff=0.01)
    with pytest.raises(RemoteRewardError, match=rf"127.0.0.1:{port}/v1/chat/completions failed 2 attempts"):
        judge(torch.rand(2, 3, 4, 4), ["1", "2"])


def test_transient_errors_are_retried():
    def flaky(body, headers):
        return (503, {"error": "loading"}) if len(server.requests) <= 2 else _ok(body, headers)

    with FakeOpenAIServer(flaky) as server:
        rewards = _judge(server, retries=2, backoff=0.01)(torch.rand(1, 3, 4, 4), ["x"])
    torch.testing.assert_close(rewards, torch.tensor([0.75]))
    assert len(server.requests) == 3


@pytest.mark.parametrize(
    ("mode", "answer", "match"),
    [
        ("yes_probability", (200, {"error": {"message": "oops"}}), r"which has no choices.*/v1\)"),
        ("yes_probability", (200, {"choices": []}), "which has no choices"),
        (
            "yes_probability",
            (200, completion("Yes")),
            r"without the first token's top log-probabilities.*--max-logprobs",
        ),
        ("yes_probability", (200, completion("Yes", [])), "without the first token's top log-probabilities"),
        ("yes_probability", (200, completion("Yes", [{"token": "Yes"}])), "malformed log-probabilities.*'logprob'"),
        ("number", (200, completion(None)), "without text content.*max_tokens"),
        ("number", (200, b"<html>busy</html>"), "answered malformed JSON"),
        ("yes_probability", (400, {"error": "top_logprobs must be <= 5"}), r"refused the request.*<= 5"),
    ],
)
def test_malformed_answers_are_clear_errors(mode, answer, match):
    with FakeOpenAIServer(lambda body, headers: answer) as server:
        with pytest.raises(RemoteRewardError, match=rf"VLM judge at {server.base_url}/chat/completions .*{match}"):
            _judge(server, mode=mode)(torch.rand(2, 3, 4, 4), ["1", "2"])


def test_unanswered_questions_are_nan_with_a_warning():
    def evasive(body, headers):  # answers "Yes"/"No" about the bright images only
        if image_of(body).mean() > 0.5:
            return 200, completion("Yes", yes_no_logprobs(0.25))
        return 200, completion("The", [{"token": "The", "logprob": -0.1}, {"token": "It", "logprob": -2.5}])

    images = torch.tensor([0.9, 0.1, 0.8, 0.2]).view(4, 1, 1, 1).expand(4, 3, 2, 2)
    with FakeOpenAIServer(evasive) as server:
        with pytest.warns(UserWarning, match=r"2 of 4 answers .* had neither 'yes' nor 'no' .*'The', 'It'.*NaN"):
            rewards = _judge(server)(images, ["a"] * 4)
    torch.testing.assert_close(rewards, torch.tensor([0.25, math.nan, 0.25, math.nan]), equal_nan=True)


def test_answers_without_a_valid_number_are_nan_with_a_warning():
    texts = iter(["Score: 7", "I cannot tell.", "Score: 12/10", "3"])

    def respond(body, headers):
        return 200, completion(next(texts))

    with FakeOpenAIServer(respond) as server:
        with pytest.warns(UserWarning, match=r"2 of 4 answers .* had no number in score_range=\(0.0, 10.0\)"):
            rewards = _judge(server, mode="number", score_range=(0, 10), max_concurrency=1)(
                torch.rand(4, 3, 2, 2), ["a"] * 4
            )
    torch.testing.assert_close(rewards, torch.tensor([0.7, math.nan, math.nan, 0.3]), equal_nan=True)


def test_concurrency_limit_is_respected_and_reached():
    with FakeOpenAIServer(_ok, delay=0.15) as server:
        rewards = _judge(server, max_concurrency=2)(torch.rand(6, 3, 4, 4), ["a"] * 6)
    assert len(server.requests) == 6 and server.max_in_flight == 2
    torch.testing.assert_close(rewards, torch.full((6,), 0.75))


def test_non_finite_images_are_nan_and_not_sent():
    images = torch.rand(3, 3, 4, 4)
    images[1, 0, 0, 0] = float("nan")
    with FakeOpenAIServer(_ok) as server:
        rewards = _judge(server)(images, ["a", "b", "c"])
    torch.testing.assert_close(rewards, torch.tensor([0.75, math.nan, 0.75]), equal_nan=True)
    assert sorted(server.questions) == [
        "Does this image show the digit a? Answer yes or no.",
        "Does this image show the digit c? Answer yes or no.",
    ]


def test_api_key_is_sent_as_bearer(monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", "from-env")
    with FakeOpenAIServer(_ok) as server:
        _judge(server, api_key="secret")(torch.rand(1, 3, 2, 2), ["a"])
        judge = _judge(server, api_key_env="JUDGE_TEST_KEY")
        judge(torch.rand(1, 3, 2, 2), ["a"])
    assert [headers["Authorization"] for headers in server.headers] == ["Bearer secret", "Bearer from-env"]
    assert "from-env" not in repr(judge) and not any(
        isinstance(v, str) and "from-env" in v for v in vars(judge).values()
    )


def test_constructor_checks_its_arguments(monkeypatch):
    monkeypatch.delenv("JUDGE_TEST_UNSET", raising=False)
    url = "http://127.0.0.1:8000/v1"
    cases = [
        ({"base_url": "127.0.0.1:8000/v1"}, r"base_url='127.0.0.1:8000/v1'; expected an http\(s\) URL"),
        ({"question": "Is it {caption}?"}, r"question='Is it \{caption\}\?' has the placeholder \{caption\}"),
        ({"mode": "score"}, "mode='score'; expected 'yes_probability' or 'number'"),
        ({"score_range": (0, 10)}, "score_range applies to mode='number'"),
        ({"mode": "number", "score_range": (10, 0)}, r"score_range=\(10, 0\); expected \(low, high\)"),
        ({"max_concurrency": 0}, "max_concurrency=0; expected a positive integer"),
        ({"top_logprobs": 0}, "top_logprobs=0; expected a positive integer"),
        ({"timeout": 0}, "timeout=0.*expected timeout > 0"),
        ({"api_key_env": "JUDGE_TEST_UNSET"}, r"api_key_env='JUDGE_TEST_UNSET' names .* not set; export it"),
        ({"api_key": "k", "api_key_env": "HOME"}, "give one of them"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            VLMJudgeReward(**{"base_url": url, "model": MODEL, "question": QUESTION, **kwargs})


def test_runs_in_the_background_by_default():
    judge = VLMJudgeReward("http://127.0.0.1:8000/v1/", MODEL, QUESTION)
    assert isinstance(judge, RewardModule) and judge.background and not judge.batch_level
    assert judge.url == "http://127.0.0.1:8000/v1/chat/completions"
    assert not VLMJudgeReward("http://h/v1", MODEL, QUESTION, background=False).background
    assert not RewardModule.background
