import math

import pytest

from lightning_sdrl.functional.judge import fill_question, parse_score, yes_probability


def _alternatives(**probs):
    return [{"token": token, "logprob": math.log(p)} for token, p in probs.items()]


def test_yes_probability_adds_case_variants_and_renormalises_over_yes_and_no():
    top = [
        {"token": "Yes", "logprob": math.log(0.3)},
        {"token": " yes", "logprob": math.log(0.1)},
        {"token": "YES", "logprob": math.log(0.05)},
        {"token": "\u2581No", "logprob": math.log(0.15)},  # SentencePiece word-start marker
        {"token": "no", "logprob": math.log(0.05)},
        {"token": "The", "logprob": math.log(0.2)},
        {"token": "Yesterday", "logprob": math.log(0.1)},  # not the answer "yes"
    ]
    assert yes_probability(top) == pytest.approx(0.45 / (0.45 + 0.2), rel=1e-12)


def test_yes_probability_with_one_answer_missing_or_both():
    assert yes_probability(_alternatives(Yes=0.01, Maybe=0.9)) == 1.0
    assert yes_probability(_alternatives(No=0.01, Maybe=0.9)) == 0.0
    assert math.isnan(yes_probability(_alternatives(Maybe=0.9, The=0.1)))
    assert math.isnan(yes_probability([]))
    # a zero probability written as None or -inf counts as absent
    assert yes_probability([{"token": "Yes", "logprob": -1.0}, {"token": "No", "logprob": None}]) == 1.0
    assert math.isnan(yes_probability([{"token": "Yes", "logprob": -math.inf}]))


def test_yes_probability_does_not_underflow():
    # exp(-1000) is 0 in float64; the ratio is still sigmoid(log P(yes) - log P(no))
    top = [{"token": "Yes", "logprob": -1000.0}, {"token": "No", "logprob": -1001.0}]
    assert yes_probability(top) == pytest.approx(1 / (1 + math.exp(-1.0)), rel=1e-12)
    assert yes_probability([{"token": "Yes", "logprob": -1e4}, {"token": "No", "logprob": 0.0}]) == 0.0


def test_yes_probability_rejects_malformed_entries():
    with pytest.raises(ValueError, match=r"\{'token': 'Yes'\}.*'logprob'.*top_logprobs"):
        yes_probability([{"token": "Yes"}])


@pytest.mark.parametrize(
    ("text", "score_range", "expected"),
    [
        ("Score: 7/10", None, 7.0),
        ("8.5", (0, 10), 8.5),
        ("I rate it 9.", (0, 10), 9.0),
        ("-2", None, -2.0),
        ("+3e1 points", None, 30.0),
        (".5", (0, 1), 0.5),
        ("Score: 10", (0, 10), 10.0),
        ("Score: 12", (0, 10), math.nan),
        ("no idea", None, math.nan),
        ("", (0, 10), math.nan),
    ],
)
def test_parse_score(text, score_range, expected):
    score = parse_score(text, score_range)
    assert (math.isnan(score) and math.isnan(expected)) or score == expected


def test_parse_score_checks_the_range():
    with pytest.raises(ValueError, match=r"score_range=\(10, 0\); expected \(low, high\) with low < high"):
        parse_score("5", (10, 0))


def test_fill_question():
    assert fill_question("Does this image show {prompt}?", "a red cube") == "Does this image show a red cube?"
    assert fill_question("Is this image beautiful?", "ignored") == "Is this image beautiful?"
    assert fill_question('Answer {{"yes": ...}} for {prompt}', "x") == 'Answer {"yes": ...} for x'


@pytest.mark.parametrize(
    ("template", "match"),
    [
        ("Does it show {caption}?", r"placeholder \{caption\}; the only placeholder is \{prompt\}"),
        ("Does it show {}?", r"placeholder \{\}; the only placeholder is \{prompt\}"),
        ("Does it show {prompt.upper}?", r"placeholder \{prompt.upper\}"),
        ("Answer {yes: 1} or {prompt}", r"placeholder \{yes\}"),
        ("Does it show {prompt?", r"not a valid template.*'\{\{' and '\}\}'"),
    ],
)
def test_fill_question_names_bad_placeholders(template, match):
    with pytest.raises(ValueError, match=match):
        fill_question(template, "a cat")
