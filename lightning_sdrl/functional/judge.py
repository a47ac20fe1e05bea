"""Reading a vision-language judge's answer as a reward: P(yes), a parsed score, the question asked.

A VLM judge (:class:`~lightning_sdrl.rewards.vlm_judge.VLMJudgeReward`) asks a vision-language
model one question per image and turns its answer into a number, in one of two ways:

* :func:`yes_probability`: the probability that the first token of the answer is "yes",
  renormalised over "yes" and "no", from the answer's top log-probabilities (VQAScore-style
  judging, a smooth reward in ``[0, 1]``);
* :func:`parse_score`: the first number written in a free-text answer ("Score: 7/10" -> 7).

:func:`fill_question` writes the question of each image from a template and the image's prompt.
Everything here is pure Python on strings and floats: no I/O, no server.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["QUESTION_FIELDS", "fill_question", "parse_score", "yes_probability"]

QUESTION_FIELDS = ("prompt",)
"""The placeholders a question template may use: ``{prompt}``, the image's prompt."""

_TOKEN_MARKERS = " \t\r\n\u2581\u0120"
"""Stripped from a token before comparing it with "yes" / "no": whitespace, and the word-start
markers of SentencePiece (``▁``) and byte-level BPE (``Ġ``) that some servers leave in tokens."""

_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
"""A decimal number: optional sign, digits with an optional fraction, optional exponent."""


def _logsumexp(values: list[float]) -> float:
    """``log(sum(exp(v)))`` without underflow; ``-inf`` for an empty list."""
    top = max(values, default=-math.inf)
    if top == -math.inf:
        return -math.inf
    return top + math.log(sum(math.exp(value - top) for value in values))


def yes_probability(top_logprobs: Sequence[Mapping[str, Any]]) -> float:
    """P("yes") of a judge's first answer token, renormalised over the answers "yes" and "no".

    ``top_logprobs`` is the first token's list of alternatives in the OpenAI chat-completions
    format, ``choices[0].logprobs.content[0].top_logprobs``: ``[{"token": "Yes", "logprob":
    -0.1}, ...]``. A token counts as "yes" (or "no") when it is that word after stripping
    whitespace (and the word-start markers ``▁`` / ``Ġ``) and lower-casing, so "Yes", " yes" and
    "YES" add up:

    1. ``P(yes) = sum(exp(logprob))`` over the yes tokens, ``P(no)`` likewise;
    2. ``reward = P(yes) / (P(yes) + P(no))``, computed as ``sigmoid(log P(yes) - log P(no))``
       so that very small probabilities do not underflow.

    Why renormalise: a judge rarely puts all its mass on the two answers (some goes to "The",
    "A", ...), and the top-k list truncates the rest, so the raw ``P(yes)`` mixes the judge's
    opinion with its phrasing. The conditional probability of "yes" given that the answer is yes
    or no is the judge's opinion alone. VQAScore (Lin et al., 2024) uses the raw ``P("Yes")``;
    VLM-judge rewards for RL fine-tuning (Flow-Factory's ``vllm_evaluate`` reward, which also
    aggregates the case variants) use this renormalised form.

    Args:
        top_logprobs: The first token's top alternatives, each a mapping with ``"token"`` (str)
            and ``"logprob"`` (float, natural log; ``None`` or ``-inf`` for zero probability).

    Returns:
        The probability of "yes" in ``[0, 1]``; NaN when neither "yes" nor "no" is among the
        alternatives (the judge did not answer the question: no reward for that image).

    Raises:
        ValueError: If an alternative lacks ``"token"`` or ``"logprob"``.

    Example:
        >>> alternatives = [{"token": "Yes", "logprob": math.log(0.6)}, {"token": " yes", "logprob": math.log(0.2)},
        ...                 {"token": "No", "logprob": math.log(0.1)}, {"token": "The", "logprob": math.log(0.1)}]
        >>> round(yes_probability(alternatives), 4)  # 0.8 / (0.8 + 0.1); "The" does not count
        0.8889
        >>> yes_probability([{"token": "YES", "logprob": -3.0}])
        1.0
        >>> yes_probability([{"token": "Maybe", "logprob": -0.1}])
        nan
    """
    yes, no = [], []
    for alternative in top_logprobs:
        if not isinstance(alternative, Mapping) or "token" not in alternative or "logprob" not in alternative:
            raise ValueError(
                f"top_logprobs has the entry {alternative!r}; expected {{'token': str, 'logprob': float}} "
                "(the OpenAI chat-completions format of choices[0].logprobs.content[0].top_logprobs)"
            )
        word = str(alternative["token"]).strip(_TOKEN_MARKERS).lower()
        logprob = -math.inf if alternative["logprob"] is None else float(alternative["logprob"])
        if word == "yes":
            yes.append(logprob)
        elif word == "no":
            no.append(logprob)
    log_yes, log_no = _logsumexp(yes), _logsumexp(no)
    if log_yes == -math.inf and log_no == -math.inf:
        return math.nan
    if log_no == -math.inf:
        return 1.0
    if log_yes == -math.inf:
        return 0.0
    # P(yes) / (P(yes) + P(no)) = sigmoid(d), d = log P(yes) - log P(no); exp of a negative number only
    d = log_yes - log_no
    return 1.0 / (1.0 + math.exp(-d)) if d >= 0 else math.exp(d) / (1.0 + math.exp(d))


def parse_score(text: str, score_range: tuple[float, float] | None = None) -> float:
    """The first number written in a judge's free-text answer; NaN when there is none.

    "Score: 7/10" gives 7, "8.5" gives 8.5, "-2" gives -2. Only the first number counts, so the
    question should ask for the score first ("Answer with a number from 0 to 10 only"): an answer
    that repeats the scale first ("On a scale of 0 to 10: 7") reads as 0.

    Args:
        text: The answer's text.
        score_range: ``(low, high)``: a number outside it is not a valid score and gives NaN.

    Returns:
        The number as a float, or NaN when the text has no number or it is outside ``score_range``.

    Raises:
        ValueError: If ``score_range`` does not have ``low < high``.

    Example:
        >>> parse_score("Score: 7/10")
        7.0
        >>> parse_score("I would rate it 8.5.", score_range=(0, 10))
        8.5
        >>> parse_score("11", score_range=(0, 10)), parse_score("no idea")
        (nan, nan)
    """
    if score_range is not None and not (len(score_range) == 2 and score_range[0] < score_range[1]):
        raise ValueError(f"score_range={score_range!r}; expected (low, high) with low < high, e.g. (0, 10)")
    match = _NUMBER.search(text)
    if match is None:
        return math.nan
    number = float(match.group())
    if score_range is not None and not score_range[0] <= number <= score_range[1]:
        return math.nan
    return number


def fill_question(template: str, prompt: str) -> str:
    """The question asked about one image: ``template`` with ``{prompt}`` replaced by its prompt.

    The template is a :meth:`str.format` string whose only placeholder is ``{prompt}``
    (:data:`QUESTION_FIELDS`); a template without it asks the same question of every image
    ("Is this image beautiful? Answer yes or no."). Literal braces are written ``{{`` and ``}}``.

    Args:
        template: E.g. ``"Does this image show {prompt}? Answer yes or no."``.
        prompt: The prompt the image was generated from.

    Returns:
        The filled question.

    Raises:
        ValueError: If the template has another placeholder (``{}``, ``{caption}``, ...) or a
            stray brace.

    Example:
        >>> fill_question("Does this image show {prompt}? Answer yes or no.", "a red cube")
        'Does this image show a red cube? Answer yes or no.'
        >>> fill_question("Does this image show {caption}?", "a red cube")
        Traceback (most recent call last):
        ...
        ValueError: question='Does this image show {caption}?' has the placeholder {caption}; ...
    """
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as error:
        raise ValueError(
            f"question={template!r} is not a valid template ({error}); write literal braces as '{{{{' and '}}}}'"
        ) from None
    for field in fields:
        if field not in QUESTION_FIELDS:
            raise ValueError(
                f"question={template!r} has the placeholder {{{field}}}; the only placeholder is {{prompt}} "
                "(the image's prompt): rename it, or write literal braces as '{{{{' and '}}}}'"
            )
    return template.format(prompt=prompt)
