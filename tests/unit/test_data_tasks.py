"""Generated task suites: right answers, splits disjoint by canonical problem, the same examples for the same
seed, and pools large enough for the scorecard's headline tasks."""
from __future__ import annotations

import hashlib
import itertools
import random
import re
from collections import Counter

import pytest

from shared.calculator import CALC_CLOSE, CALC_OPEN, RESULT_CLOSE, RESULT_OPEN, evaluate_calc
from shared.data.splits import SPLITS, split_of, unsealed_final
from shared.data.tasks import (
    SUITES,
    TERMINATOR,
    extract_answer,
    format_for_training,
    make_examples,
    training_stream,
)
from shared.scorecard import HEADLINE_TASKS

pytestmark = pytest.mark.unit

ALL_LEVELS = [(suite, level) for suite, (_, levels) in SUITES.items() for level in levels]


@pytest.mark.parametrize(("suite", "level"), ALL_LEVELS)
def test_examples_are_deterministic_distinct_and_in_their_split(suite, level):
    examples = make_examples(suite, level, "test", 20, seed=3)
    assert examples == make_examples(suite, level, "test", 20, seed=3)
    assert examples != make_examples(suite, level, "test", 20, seed=4)
    assert len({e.key for e in examples}) == 20
    for example in examples:
        assert (example.suite, example.level) == (suite, level)
        assert split_of(example.key) == "test"
        assert example.prompt == example.prompt.strip() and TERMINATOR not in example.prompt
        assert example.answer and TERMINATOR not in example.answer


# --- splits by problem ------------------------------------------------------------------------------
# The problem a prompt states, read back from its text alone (not from the generator's key): the test's own
# notion of "the same problem", so a key that forgot a surface change would be caught here.


def _expression(a: str, op: str, b: str) -> tuple:
    return ("+" if op in ("+", "plus") else "*" if op in ("*", "times") else "-",
            *(sorted((int(a), int(b))) if op in ("+", "*", "plus", "times") else (int(a), int(b))))


def problem_of(suite: str, prompt: str) -> tuple:
    if suite == "arithmetic":
        return _expression(*re.fullmatch(r"(\d+) ([-+*]) (\d+) =", prompt).groups())
    if suite in ("tool_calls", "requests"):
        return _expression(*re.fullmatch(r"(?:use the calculator: )?(\d+) (plus|minus|times) (\d+) \?", prompt).groups())
    if suite == "multiple_choice":
        if match := re.match(r"which is (\d+) \+ (\d+):", prompt):
            return _expression(match.group(1), "+", match.group(2))
        task, options = re.fullmatch(r"which is the (\w+): (.*) \?", prompt).groups()
        return task, tuple(sorted(map(int, options.split(", "))))
    if suite == "modular":
        if match := re.fullmatch(r"(\d+) mod (\d+) =", prompt):
            return "mod", int(match.group(1)), int(match.group(2))
        a, op, b, m = re.fullmatch(r"\((\d+) ([+*]) (\d+)\) mod (\d+) =", prompt).groups()
        return "mod", _expression(a, op, b), int(m)
    if suite == "sequence":
        task, *items = prompt.removesuffix(" =").split()
        numbers = list(map(int, items))
        if task == "continue":  # one progression at every length
            return task, numbers[0], numbers[1] - numbers[0]
        if task == "reverse":  # reversing x and reversing reversed(x) teach the same pair
            return task, min(tuple(numbers), tuple(reversed(numbers)))
        return task, tuple(sorted(numbers))
    if suite == "word_problems":  # names and items do not count
        start = int(re.search(r"has (\d+) ", prompt).group(1))
        steps = [(verb, int(n)) for verb, n in re.findall(r"(buys|gives) (\d+)", prompt)]
        if all(verb == "buys" for verb, _ in steps):
            return "words+", tuple(sorted([start, *(n for _, n in steps)]))
        return "words", start, tuple(steps)
    raise AssertionError(suite)


def leaks(problems: dict[str, list]) -> set:
    """The problems that appear in more than one split; problems: split -> [(suite, prompt), ...]."""
    splits_of: dict[tuple, set[str]] = {}
    for split, items in problems.items():
        for suite, prompt in items:
            splits_of.setdefault(problem_of(suite, prompt), set()).add(split)
    return {problem for problem, splits in splits_of.items() if len(splits) > 1}


SMALL_POOLS = {("tool_calls", 1): 15, ("requests", 1): 15, ("multiple_choice", 1): 30}  # levels with few problems per split


def test_no_problem_falls_in_two_splits_over_every_suite_and_level():
    # Arithmetic, calculator requests and multiple-choice sums share problems ("12 + 53"), so all suites are
    # pooled: a sum asked of the calculator in train may not reappear as a test arithmetic problem.
    with unsealed_final("the split-disjointness test (problems, no model scores)"):
        problems = {split: [(suite, e.prompt) for suite, level in ALL_LEVELS for seed in range(2)
                            for e in make_examples(suite, level, split, SMALL_POOLS.get((suite, level), 60), seed)]
                    for split in SPLITS}
    assert sum(map(len, problems.values())) > 8000
    assert not leaks(problems)


def _split_by_prompt(prompt: str) -> str:
    """The earlier design's split: a hash of the prompt text, 70/15/15."""
    bucket = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big") % 100
    return "train" if bucket < 70 else "validation" if bucket < 85 else "test"


@pytest.mark.parametrize(("suite", "level"), [("arithmetic", 1), ("word_problems", 1), ("tool_calls", 2), ("sequence", 1)])
def test_a_split_by_raw_prompt_would_be_caught(suite, level):
    rng = random.Random(0)
    generator = SUITES[suite][0]
    problems: dict[str, list] = {"train": [], "validation": [], "test": []}
    for _ in range(3000):
        prompt = generator(rng, level).prompt
        problems[_split_by_prompt(prompt)].append((suite, prompt))
    assert len(leaks(problems)) > 20  # commuted sums, renamed word problems, reshuffled sorts...


@pytest.mark.parametrize(("suite", "level", "n"), HEADLINE_TASKS)
def test_headline_tasks_keep_300_distinct_problems_in_test_and_final(suite, level, n):
    assert n >= 300
    assert len(make_examples(suite, level, "test", 300)) == 300
    with unsealed_final("the pool-size test (problems, no model scores)"):
        assert len(make_examples(suite, level, "final", 300)) == 300


def test_a_multiple_choice_problem_has_one_prompt():
    # Options ordered (and distractors drawn) from the key, so it cannot reach two splits.
    by_key = {}
    for seed in range(10):
        for example in make_examples("multiple_choice", 2, "train", 100, seed=seed):
            by_key.setdefault(example.key, set()).add(example.prompt)
    assert all(len(prompts) == 1 for prompts in by_key.values())


def test_split_sizes_follow_the_hash_fractions():
    counts = Counter(split_of(f"{a}+{b}") for a in range(100) for b in range(100))
    assert 0.57 < counts["train"] / 10_000 < 0.63 and 0.08 < counts["validation"] / 10_000 < 0.12
    assert 0.13 < counts["test"] / 10_000 < 0.17 and 0.13 < counts["final"] / 10_000 < 0.17


@pytest.mark.parametrize("level", [2, 3, 4])
def test_arithmetic_answers(level):
    examples = make_examples("arithmetic", level, "train", 50)
    for example in examples:
        a, op, b = re.fullmatch(r"(\d+) ([-+*]) (\d+) =", example.prompt).groups()
        assert len(a) == len(b) == level
        assert int(example.answer) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert int(example.answer) >= 0
    assert {re.search(r"[-+*]", e.prompt).group() for e in examples} == {"+", "-", "*"}


def test_easy_arithmetic_is_two_digit_addition_without_carrying_or_subtraction_without_borrowing():
    examples = make_examples("arithmetic", 1, "train", 600)
    assert {re.search(r"[-+]", e.prompt).group() for e in examples} == {"+", "-"}
    for example in examples:
        a, op, b = re.fullmatch(r"(\d\d) ([-+]) (\d\d) =", example.prompt).groups()
        digits = [(int(x), int(y)) for x, y in zip(a, b, strict=True)]
        if op == "+":
            assert all(x + y < 10 for x, y in digits)
            assert example.answer == "".join(str(x + y) for x, y in digits)
        else:
            assert all(x >= y for x, y in digits)
            assert int(example.answer) == int(a) - int(b)

    def digit_facts(example):
        return {(example.prompt[3], x, y) for x, y in zip(example.prompt[:2], example.prompt[5:7], strict=True)}

    # Every digit fact the test problems use is taught by training problems.
    taught = set().union(*map(digit_facts, examples))
    assert all(digit_facts(e) <= taught for e in make_examples("arithmetic", 1, "test", 300))


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


def test_tool_calls_work_the_stated_problem_through_the_calculator():
    words = {"plus": "+", "minus": "-", "times": "*"}
    for example in make_examples("tool_calls", 3, "train", 50):
        a, word, b = re.search(r"(\d+) (plus|minus|times) (\d+)", example.prompt).groups()
        expression = f"{a}{words[word]}{b}"
        assert example.tool_call == expression and example.answer == str(eval(expression))  # noqa: S307  test data
        assert format_for_training(example) == (
            f"{example.prompt} {CALC_OPEN}{expression}{CALC_CLOSE}{RESULT_OPEN}{example.answer}{RESULT_CLOSE} "
            f"{example.answer}\n")


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
        ("arithmetic", 1, "final", "the final split is sealed"),
    ],
)
def test_unknown_suite_level_or_split_is_an_error(suite, level, split, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make_examples(suite, level, split, 5)


def test_asking_for_more_problems_than_a_split_holds_is_an_error():
    with pytest.raises(ValueError, match="holds only 20 distinct problems"):
        make_examples("tool_calls", 1, "test", 21)
    assert len(make_examples("tool_calls", 1, "test", 21, allow_fewer=True)) == 20


def test_training_stream_follows_mix_levels_and_split():
    stream = training_stream({"arithmetic": 3.0, "sequence": 1.0, "modular": 0.0}, {"arithmetic": [1], "sequence": [2, 3]}, seed=5)
    examples = list(itertools.islice(stream, 400))
    suites = Counter(e.suite for e in examples)
    assert set(suites) == {"arithmetic", "sequence"} and 250 < suites["arithmetic"] < 350
    assert {e.level for e in examples if e.suite == "sequence"} == {2, 3}
    assert all(split_of(e.key) == "train" for e in examples)
    again = training_stream({"arithmetic": 3.0, "sequence": 1.0, "modular": 0.0}, {"arithmetic": [1], "sequence": [2, 3]}, seed=5)
    assert list(itertools.islice(again, 400)) == examples
    with pytest.raises(ValueError, match="levels 1..3, not 7"):
        training_stream({"modular": 1.0}, [7])
    with pytest.raises(ValueError, match="no levels given for suite 'sequence'"):
        training_stream({"sequence": 1.0}, {"arithmetic": [1]})
    with pytest.raises(ValueError, match="weights must be >= 0"):
        training_stream({"sequence": -1.0, "arithmetic": 1.0}, [1])
