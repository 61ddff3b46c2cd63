"""Generated task suites: right answers, disjoint splits, the same examples for the same seed."""
from __future__ import annotations

import itertools
import re
from collections import Counter

import pytest

from shared.data.tasks import (
    CALC_CLOSE,
    CALC_OPEN,
    SPLITS,
    SUITES,
    TERMINATOR,
    evaluate_calc,
    extract_answer,
    format_for_training,
    make_examples,
    parse_calc,
    split_of,
    training_stream,
)

pytestmark = pytest.mark.unit

ALL_LEVELS = [(suite, level) for suite, (_, levels) in SUITES.items() for level in levels]


@pytest.mark.parametrize(("suite", "level"), ALL_LEVELS)
def test_examples_are_deterministic_distinct_and_in_their_split(suite, level):
    examples = make_examples(suite, level, "test", 20, seed=3)
    assert examples == make_examples(suite, level, "test", 20, seed=3)
    assert examples != make_examples(suite, level, "test", 20, seed=4)
    assert len({e.prompt for e in examples}) == 20
    for example in examples:
        assert (example.suite, example.level) == (suite, level)
        assert split_of(example.prompt) == "test"
        assert example.prompt == example.prompt.strip() and TERMINATOR not in example.prompt
        assert example.answer and TERMINATOR not in example.answer


@pytest.mark.parametrize("suite", list(SUITES))
def test_splits_never_share_a_problem(suite):
    prompts = {
        split: {e.prompt for seed in range(3) for e in make_examples(suite, 2, split, 30, seed=seed)}
        for split in SPLITS
    }
    for a, b in itertools.combinations(SPLITS, 2):
        assert not prompts[a] & prompts[b]


def test_a_multiple_choice_question_has_one_prompt():
    # Options ordered (and distractors drawn) from the question, so it cannot reach two splits.
    by_question = {}
    for seed in range(10):
        for example in make_examples("multiple_choice", 1, "train", 100, seed=seed):
            by_question.setdefault(example.prompt.split(":")[0] + str(sorted(example.choices)), set()).add(example.prompt)
    assert all(len(prompts) == 1 for prompts in by_question.values())


def test_split_sizes_follow_the_hash_fractions():
    counts = Counter(split_of(f"{a} + {b} =") for a in range(100) for b in range(100))
    assert 0.67 < counts["train"] / 10_000 < 0.73
    assert 0.13 < counts["validation"] / 10_000 < 0.17 and 0.13 < counts["test"] / 10_000 < 0.17


@pytest.mark.parametrize("level", [2, 3, 4])
def test_arithmetic_answers(level):
    examples = make_examples("arithmetic", level, "train", 50)
    for example in examples:
        a, op, b = re.fullmatch(r"(\d+) ([-+*]) (\d+) =", example.prompt).groups()
        assert len(a) == len(b) == level
        assert int(example.answer) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert int(example.answer) >= 0
    assert {re.search(r"[-+*]", e.prompt).group() for e in examples} == {"+", "-", "*"}


def test_easy_arithmetic_is_two_digit_addition_without_carrying():
    examples = make_examples("arithmetic", 1, "train", 300)
    for example in examples:
        a, b = re.fullmatch(r"(\d\d) \+ (\d\d) =", example.prompt).groups()
        assert all(int(x) + int(y) < 10 for x, y in zip(a, b, strict=True))
        assert example.answer == "".join(str(int(x) + int(y)) for x, y in zip(a, b, strict=True))

    def digit_pairs(example):
        return set(zip(example.prompt[:2], example.prompt[5:7], strict=True))

    # Every digit fact the test problems use is taught by training problems.
    taught = set().union(*map(digit_pairs, examples))
    assert all(digit_pairs(e) <= taught for e in make_examples("arithmetic", 1, "test", 300))


def test_modular_answers():
    for level in (1, 2, 3):
        for example in make_examples("modular", level, "validation", 30):
            expression, modulus = re.fullmatch(r"(.+) mod (\d+) =", example.prompt).groups()
            assert int(example.answer) == evaluate_calc(expression) % int(modulus)


def test_sequence_answers():
    for example in make_examples("sequence", 3, "train", 60):
        task, *items = example.prompt.removesuffix(" =").split()
        numbers = list(map(int, items))
        assert len(numbers) == 5
        expected = {
            "continue": [numbers[-1] + numbers[1] - numbers[0]],
            "reverse": numbers[::-1],
            "sort": sorted(numbers),
        }[task]
        assert example.answer == " ".join(map(str, expected))


def test_word_problem_answers():
    for example in make_examples("word_problems", 3, "train", 50):
        count = int(re.search(r"has (\d+) ", example.prompt).group(1))
        for verb, change in re.findall(r"(buys|gives) (\d+)", example.prompt):
            count += int(change) if verb == "buys" else -int(change)
            assert count >= 0
        assert example.prompt.count("Then") == 3
        assert example.answer == str(count)


def test_multiple_choice_examples():
    for example in make_examples("multiple_choice", 2, "test", 50):
        assert len(example.choices) == 4 == len(set(example.choices))
        assert example.answer == example.choices[example.label]
        numbers = list(map(int, example.choices))
        if "largest" in example.prompt:
            assert int(example.answer) == max(numbers)
        elif "smallest" in example.prompt:
            assert int(example.answer) == min(numbers)
        else:
            a, b = map(int, re.match(r"which is (\d+) \+ (\d+)", example.prompt).groups())
            assert int(example.answer) == a + b


def test_tool_calls_ask_the_calculator_for_the_stated_problem():
    words = {"plus": "+", "minus": "-", "times": "*"}
    for example in make_examples("tool_calls", 3, "train", 50):
        a, word, b = re.search(r"(\d+) (plus|minus|times) (\d+)", example.prompt).groups()
        assert example.answer == f"{CALC_OPEN}{a}{words[word]}{b}{CALC_CLOSE}"
        assert parse_calc("I will call " + example.answer + " now") == f"{a}{words[word]}{b}"


def test_calculator_parses_and_evaluates_only_integer_arithmetic():
    assert parse_calc("no call here") is None
    assert evaluate_calc("12*(3-5)+-2") == -26
    for bad in ("2**10", "1/2", "__import__('os')", "x+1", "1.5*2", "", "3 +"):
        with pytest.raises(ValueError, match="not a calculator expression"):
            evaluate_calc(bad)


def test_training_format_round_trips_through_extraction():
    for suite, level in ALL_LEVELS:
        example = make_examples(suite, level, "train", 1)[0]
        text = format_for_training(example)
        assert text.endswith(TERMINATOR) and text.startswith(example.prompt + " ")
        assert extract_answer(text[len(example.prompt) :] + "trailing junk") == example.answer


@pytest.mark.parametrize(
    ("suite", "level", "split", "message"),
    [
        ("poetry", 1, "train", "unknown suite 'poetry'"),
        ("arithmetic", 9, "train", "levels 1..4, not 9"),
        ("arithmetic", 1, "dev", "unknown split 'dev'"),
    ],
)
def test_unknown_suite_level_or_split_is_an_error(suite, level, split, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make_examples(suite, level, split, 5)


def test_asking_for_more_problems_than_a_split_holds_is_an_error():
    with pytest.raises(ValueError, match="holds only 309 distinct problems"):
        make_examples("arithmetic", 1, "test", 310)


def test_training_stream_follows_mix_levels_and_split():
    stream = training_stream({"arithmetic": 3.0, "sequence": 1.0, "modular": 0.0}, {"arithmetic": [1], "sequence": [2, 3]}, seed=5)
    examples = list(itertools.islice(stream, 400))
    suites = Counter(e.suite for e in examples)
    assert set(suites) == {"arithmetic", "sequence"} and 250 < suites["arithmetic"] < 350
    assert {e.level for e in examples if e.suite == "sequence"} == {2, 3}
    assert all(split_of(e.prompt) == "train" for e in examples)
    again = training_stream({"arithmetic": 3.0, "sequence": 1.0, "modular": 0.0}, {"arithmetic": [1], "sequence": [2, 3]}, seed=5)
    assert list(itertools.islice(again, 400)) == examples
    with pytest.raises(ValueError, match="levels 1..3, not 7"):
        training_stream({"modular": 1.0}, [7])
    with pytest.raises(ValueError, match="no levels given for suite 'sequence'"):
        training_stream({"sequence": 1.0}, {"arithmetic": [1]})
    with pytest.raises(ValueError, match="weights must be >= 0"):
        training_stream({"sequence": -1.0, "arithmetic": 1.0}, [1])
