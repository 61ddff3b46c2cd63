"""Generated task suites with difficulty levels, deterministic from a seed, in three disjoint splits.

Every example is one line: a prompt ending in a non-space character, then ANSWER_DELIMITER, the answer and
TERMINATOR ("3 + 4 = 7\n"). The space before the answer belongs to the answer's first token in both
byte-level BPE and SentencePiece tokenizers, so the prompt tokenizes the same alone as in training text
(lm-eval's target_delimiter convention). Exact-match evaluation cuts the generation at TERMINATOR.

Splits: each problem goes to train, validation or test by a hash of its prompt (70/15/15), so one problem
can never be in two splits whatever the seed. A problem's prompt is a function of the problem alone
(multiple-choice options are ordered by a hash of the question), so the hash names the problem.
Small levels hold few distinct problems (carry-free two-digit addition: 1,980 in all, 309 in test);
make_examples raises when a split cannot supply n distinct ones.

Calibration on 2 CPU cores: a 1M-parameter Llama trained 90 s reached 6% exact match on 2-digit
addition, so level 1 of every suite is meant to be learnable in a minute or two.
"""
from __future__ import annotations

import ast
import hashlib
import itertools
import operator
import random
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

ANSWER_DELIMITER = " "
TERMINATOR = "\n"

# The calculator-call syntax of the tool_calls suite: integers joined by + - * inside the tags.
CALC_OPEN, CALC_CLOSE = "<calc>", "</calc>"
CALC_CALL = re.compile(re.escape(CALC_OPEN) + r"([0-9+\-* ()]+)" + re.escape(CALC_CLOSE))

SPLITS = ("train", "validation", "test")
# Percent of the hash space given to each split, in SPLITS order.
SPLIT_PERCENT = (70, 15, 15)


@dataclass(frozen=True)
class Example:
    suite: str
    level: int
    prompt: str
    answer: str
    choices: tuple[str, ...] = ()  # multiple choice only; answer == choices[label]
    label: int = -1


def split_of(prompt: str) -> str:
    """The split a problem belongs to, from the SHA-256 of its prompt."""
    bucket = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big") % 100
    for split, upper in zip(SPLITS, itertools.accumulate(SPLIT_PERCENT), strict=True):
        if bucket < upper:
            return split
    raise AssertionError("unreachable")


def format_for_training(example: Example) -> str:
    return example.prompt + ANSWER_DELIMITER + example.answer + TERMINATOR


def extract_answer(generated: str) -> str:
    """The answer a model gave: its continuation up to TERMINATOR, without surrounding spaces."""
    return generated.split(TERMINATOR, 1)[0].strip()


# --- the calculator ---------------------------------------------------------------------------------

_CALC_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def calc_call(expression: str) -> str:
    return f"{CALC_OPEN}{expression}{CALC_CLOSE}"


def parse_calc(text: str) -> str | None:
    """The expression of the first calculator call in text, or None."""
    match = CALC_CALL.search(text)
    return match.group(1).strip() if match else None


def evaluate_calc(expression: str) -> int:
    """Integer + - * with parentheses; anything else is a ValueError (never eval)."""

    def value(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _CALC_OPERATORS:
            return _CALC_OPERATORS[type(node.op)](value(node.left), value(node.right))
        raise ValueError(f"not a calculator expression: {expression!r}")

    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as error:
        raise ValueError(f"not a calculator expression: {expression!r}") from error
    return value(tree.body)


# --- the suites: each draws one random problem of a level ------------------------------------------


def _operand(rng: random.Random, digits: int) -> int:
    """A number with exactly `digits` digits (0 counts as a 1-digit number)."""
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _binary_problem(rng: random.Random, digits: int) -> tuple[int, str, int]:
    a, op, b = _operand(rng, digits), rng.choice("+-*"), _operand(rng, digits)
    if op == "-":  # keep answers non-negative
        a, b = max(a, b), min(a, b)
    return a, op, b


def arithmetic(rng: random.Random, level: int) -> Example:
    """Level 1: two-digit addition without carrying. Level n >= 2: + - * of two n-digit operands.

    Level 1 is not one-digit arithmetic: its 255 problems leave about 40 in test, each a digit fact the
    model never saw in training (the split is by problem), so no model can score there by generalising.
    Two-digit sums whose digit pairs stay below 10 are composed of digit facts every training problem
    repeats, and about 300 of their 1,980 problems fall in test.
    """
    if level == 1:
        while True:
            a, b = _operand(rng, 2), _operand(rng, 2)
            if a % 10 + b % 10 < 10 and a // 10 + b // 10 < 10:
                return Example("arithmetic", level, f"{a} + {b} =", str(a + b))
    a, op, b = _binary_problem(rng, level)
    return Example("arithmetic", level, f"{a} {op} {b} =", str(evaluate_calc(f"{a}{op}{b}")))


def tool_calls(rng: random.Random, level: int) -> Example:
    """The right move is to call the calculator; level = digits of each operand."""
    a, op, b = _binary_problem(rng, level)
    word = {"+": "plus", "-": "minus", "*": "times"}[op]
    return Example("tool_calls", level, f"use the calculator: {a} {word} {b} ?", calc_call(f"{a}{op}{b}"))


def modular(rng: random.Random, level: int) -> Example:
    """level 1: a mod m (a < 100, m < 10); 2: (a + b) mod m (< 100, m < 20); 3: (a * b) mod m (< 1000, m < 100)."""
    if level == 1:
        a, m = rng.randint(0, 99), rng.randint(2, 9)
        return Example("modular", level, f"{a} mod {m} =", str(a % m))
    bound, modulus_bound, op = {2: (99, 19, "+"), 3: (999, 99, "*")}[level]
    a, b, m = rng.randint(0, bound), rng.randint(0, bound), rng.randint(2, modulus_bound)
    return Example("modular", level, f"({a} {op} {b}) mod {m} =", str(evaluate_calc(f"{a}{op}{b}") % m))


def sequence(rng: random.Random, level: int) -> Example:
    """Continue an arithmetic progression, or reverse or sort a list of digits; level + 2 items shown."""
    length = level + 2
    task = rng.choice(("continue", "reverse", "sort"))
    if task == "continue":
        start, step = rng.randint(0, 20), rng.randint(1, 9)
        shown = [start + i * step for i in range(length)]
        answer = [start + length * step]
    else:
        shown = [rng.randint(0, 9) for _ in range(length)]
        answer = shown[::-1] if task == "reverse" else sorted(shown)
    return Example("sequence", level, f"{task} {_spaced(shown)} =", _spaced(answer))


def _spaced(numbers: list[int]) -> str:
    return " ".join(map(str, numbers))


def word_problems(rng: random.Random, level: int) -> Example:
    """A count changed by `level` purchases or gifts, each of 1 to 9 items."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    count = rng.randint(1, 9)
    sentences = [f"{name} has {count} {item}."]
    for _ in range(level):
        change = rng.randint(1, 9)
        if rng.random() < 0.5 or change > count:
            count += change
            sentences.append(f"Then {name} buys {change} more.")
        else:
            count -= change
            sentences.append(f"Then {name} gives {change} away.")
    question = f"How many {item} does {name} have now?"
    return Example("word_problems", level, " ".join([*sentences, question]), str(count))


NAMES = ("Ann", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jo")
ITEMS = ("apples", "books", "coins", "cards", "pens", "shells", "stamps", "marbles")


def multiple_choice(rng: random.Random, level: int) -> Example:
    """Pick one of four `level`-digit numbers: the largest, the smallest, or the one equal to a sum."""
    task = rng.choice(("largest", "smallest", "sum"))
    if task == "sum":
        a, b = _operand(rng, level), _operand(rng, level)
        correct = a + b
        question = f"which is {a} + {b}"
        # Distractors drawn from the question, so a question has one prompt and lands in one split.
        offsets = random.Random(question).sample([d for d in range(-5, 6) if d and correct + d >= 0], 3)
        options = [correct, *(correct + d for d in offsets)]
    else:
        options = []
        while len(options) < 4:
            if (x := _operand(rng, level)) not in options:
                options.append(x)
        correct = max(options) if task == "largest" else min(options)
        question = f"which is the {task}"
    # The order depends on the problem alone, so the prompt (and its split) names the problem.
    options.sort()
    random.Random(f"{question}|{options}").shuffle(options)
    choices = tuple(map(str, options))
    prompt = f"{question}: {', '.join(choices)} ?"
    label = choices.index(str(correct))
    return Example("multiple_choice", level, prompt, choices[label], choices, label)


Generator = Callable[[random.Random, int], Example]
# suite -> (generator, levels it accepts)
SUITES: dict[str, tuple[Generator, range]] = {
    "arithmetic": (arithmetic, range(1, 5)),
    "word_problems": (word_problems, range(1, 4)),
    "modular": (modular, range(1, 4)),
    "sequence": (sequence, range(1, 4)),
    "multiple_choice": (multiple_choice, range(1, 4)),
    "tool_calls": (tool_calls, range(1, 5)),
}


def check_task(suite: str, level: int, split: str) -> Generator:
    """The suite's generator, or a ValueError naming what is unknown."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; known: {', '.join(SUITES)}")
    generator, levels = SUITES[suite]
    if level not in levels:
        raise ValueError(f"suite {suite!r} has levels {levels.start}..{levels.stop - 1}, not {level!r}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return generator


def _draw(generator: Generator, rng: random.Random, level: int, split: str) -> Example:
    """One problem of the split (rejection sampling: splits are regions of the hash space)."""
    while True:
        example = generator(rng, level)
        if split_of(example.prompt) == split:
            return example


def make_examples(suite: str, level: int, split: str, n: int, seed: int = 0) -> list[Example]:
    """n distinct problems of one suite, level and split, the same list for the same arguments."""
    generator = check_task(suite, level, split)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"{suite}|{level}|{split}|{seed}")
    examples: dict[str, Example] = {}
    # Give up after this many draws in a row bring nothing new: if the split held n problems, the
    # chance of missing the last one that long is below e^-50 (coupon collector over a pool >= n).
    patience, misses = 50 * n + 1000, 0
    while len(examples) < n and misses < patience:
        example = _draw(generator, rng, level, split)
        misses = misses + 1 if example.prompt in examples else 0
        examples.setdefault(example.prompt, example)
    if len(examples) < n:
        raise ValueError(
            f"the {split} split of {suite} level {level} holds only {len(examples)} distinct problems, "
            f"fewer than the {n} asked for"
        )
    return list(examples.values())


def training_stream(
    mix: Mapping[str, float], levels: Sequence[int] | Mapping[str, Sequence[int]], split: str = "train", seed: int = 0
) -> Iterator[Example]:
    """Endless examples: a suite drawn by weight from mix, a level uniformly from its levels, problems
    with repetition. A curriculum is a sequence of streams with rising levels."""
    if any(weight < 0 for weight in mix.values()):
        raise ValueError(f"mix weights must be >= 0, got {dict(mix)}")
    suites = [suite for suite, weight in mix.items() if weight > 0]
    if not suites:
        raise ValueError("mix needs at least one suite with a positive weight")
    levels_of = {s: tuple(levels.get(s, ()) if isinstance(levels, Mapping) else levels) for s in suites}
    for suite in suites:
        if not levels_of[suite]:
            raise ValueError(f"no levels given for suite {suite!r}")
        for level in levels_of[suite]:
            check_task(suite, level, split)
    return _stream(suites, [mix[s] for s in suites], levels_of, split, random.Random(f"stream|{split}|{seed}"))


def _stream(
    suites: list[str], weights: list[float], levels_of: dict[str, tuple[int, ...]], split: str, rng: random.Random
) -> Iterator[Example]:
    while True:
        suite = rng.choices(suites, weights)[0]
        yield _draw(SUITES[suite][0], rng, rng.choice(levels_of[suite]), split)
