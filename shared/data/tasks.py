"""Generated task suites with difficulty levels, deterministic from a seed, split by canonical problem.

Every example is one line: a prompt ending in a non-space character, then ANSWER_DELIMITER, the worked
answer and TERMINATOR ("3 + 4 = 7\n"). The space before the answer belongs to the answer's first token in
both byte-level BPE and SentencePiece tokenizers, so the prompt tokenizes the same alone as in training
text (lm-eval's target_delimiter convention). A tool-use example's worked answer is a calculator call, the
result the runtime appends and the final answer (shared.calculator); every other worked answer is the
final answer alone. Scoring compares the final answer (`extract_answer`).

Splits are by problem, not by text. Each suite gives every example a canonical key naming the problem up
to the surface changes that do not change what must be learned: the operand multiset and operation of
commutative arithmetic ("12 + 53" and "53 + 12" are one problem, and the same problem again as a
calculator request or a multiple-choice sum), the numeric skeleton of a word problem (names and items do
not count), the rule and start of a sequence (a progression is one problem at every length), the multiset
a sort must order. A problem's split is the hash of its key (shared.data.splits), and "distinct problems"
means distinct keys.

Pools: every headline task (the level-1 reasoning suites and level-2 calculator requests, what the
scorecard measures) holds at least 300 problems in both test and final; make_examples raises when a split
cannot supply n distinct ones. Level 1 is meant to be learnable by a 1M-parameter model in minutes.
"""
from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from shared.calculator import RESULT_CLOSE, evaluate_calc, worked_call
from shared.data.splits import check_readable, check_split, split_of

ANSWER_DELIMITER = " "
TERMINATOR = "\n"
INSTRUCTION = "use the calculator: "  # how a calculator request says the calculator is to be used


@dataclass(frozen=True)
class Example:
    suite: str
    level: int
    prompt: str
    answer: str  # the final answer a model must give
    key: str  # the canonical problem: its split is a hash of this
    choices: tuple[str, ...] = ()  # multiple choice only; answer == choices[label]
    label: int = -1
    tool_call: str = ""  # the calculator expression the worked answer calls ("": no call)


def worked_answer(example: Example) -> str:
    """What follows the prompt in training text: the call and its result where the task calls the calculator,
    then the final answer."""
    if example.tool_call:
        return f"{worked_call(example.tool_call)}{ANSWER_DELIMITER}{example.answer}"
    return example.answer


def worked_continuation(example: Example) -> str:
    """What a model should write after the prompt: the delimiter, the worked answer, the terminator."""
    return ANSWER_DELIMITER + worked_answer(example) + TERMINATOR


def format_for_training(example: Example) -> str:
    return example.prompt + worked_continuation(example)


def extract_answer(transcript: str) -> str:
    """The final answer in a model's continuation: what follows the last calculator result (or the whole
    continuation without one), up to TERMINATOR, without surrounding spaces."""
    return transcript.rsplit(RESULT_CLOSE, 1)[-1].split(TERMINATOR, 1)[0].strip()


# --- canonical keys ---------------------------------------------------------------------------------


def expression_key(a: int, op: str, b: int) -> str:
    """One binary arithmetic problem whatever its wording: + and * commute, so their operands are sorted."""
    if op in "+*":
        a, b = sorted((a, b))
    return f"{a}{op}{b}"


# --- the suites: each draws one random problem of a level ------------------------------------------


def _operand(rng: random.Random, digits: int) -> int:
    """A number with exactly `digits` digits (0 counts as a 1-digit number)."""
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _binary_problem(rng: random.Random, digits: int) -> tuple[int, str, int]:
    a, op, b = _operand(rng, digits), rng.choice("+-*"), _operand(rng, digits)
    if op == "-":  # keep answers non-negative
        a, b = max(a, b), min(a, b)
    return a, op, b


def _digitwise_pair(rng: random.Random, op: str) -> tuple[int, int]:
    """Two two-digit numbers whose digits add without carrying (op "+") or subtract without borrowing ("-")."""
    while True:
        a, b = _operand(rng, 2), _operand(rng, 2)
        tens, units = (a // 10, b // 10), (a % 10, b % 10)
        if op == "+" and sum(tens) < 10 and sum(units) < 10:
            return a, b
        if op == "-" and tens[0] >= tens[1] and units[0] >= units[1]:
            return a, b


def arithmetic(rng: random.Random, level: int) -> Example:
    """Level 1: two-digit addition without carrying or subtraction without borrowing, composed of digit
    facts every training problem repeats (1,000 additions and 2,475 subtractions, so test and final keep
    over 300 each). Level n >= 2: + - * of two n-digit operands."""
    if level == 1:
        op = rng.choice("+-")
        a, b = _digitwise_pair(rng, op)
    else:
        a, op, b = _binary_problem(rng, level)
    return Example("arithmetic", level, f"{a} {op} {b} =", str(evaluate_calc(f"{a}{op}{b}")), expression_key(a, op, b))


def tool_calls(rng: random.Random, level: int) -> Example:
    """The right move is to call the calculator; level = digits of each operand. The key is the arithmetic
    problem's, so a sum asked of the calculator and asked outright fall in the same split."""
    a, op, b = _binary_problem(rng, level)
    word = {"+": "plus", "-": "minus", "*": "times"}[op]
    expression = f"{a}{op}{b}"
    return Example("tool_calls", level, f"{INSTRUCTION}{a} {word} {b} ?", str(evaluate_calc(expression)),
                   expression_key(a, op, b), tool_call=expression)



def requests(rng: random.Random, level: int) -> Example:
    """A calculator request without the instruction to use the calculator ("87 minus 12 ?"): the right move is
    still to call it, but no training text shows it (prompt baking teaches it: services/baking). The
    problems, keys and splits are tool_calls' own."""
    example = tool_calls(rng, level)
    return dataclasses.replace(example, suite="requests", prompt=example.prompt.removeprefix(INSTRUCTION))


def modular(rng: random.Random, level: int) -> Example:
    """level 1: a mod m (a < 300, 2 <= m <= 11); 2: (a + b) mod m (< 100, m < 20); 3: (a * b) mod m (< 1000, m < 100)."""
    if level == 1:
        a, m = rng.randint(0, 299), rng.randint(2, 11)
        return Example("modular", level, f"{a} mod {m} =", str(a % m), f"{a}%{m}")
    bound, modulus_bound, op = {2: (99, 19, "+"), 3: (999, 99, "*")}[level]
    a, b, m = rng.randint(0, bound), rng.randint(0, bound), rng.randint(2, modulus_bound)
    return Example("modular", level, f"({a} {op} {b}) mod {m} =", str(evaluate_calc(f"{a}{op}{b}") % m),
                   f"({expression_key(a, op, b)})%{m}")


def sequence(rng: random.Random, level: int) -> Example:
    """Continue an arithmetic progression, or reverse or sort a list of digits; level + 2 items shown.

    Keys: a progression is its start and step at every length (level 2 shows the answer of level 1); a
    reversal is the unordered pair {list, reversed list} (each is the other's answer); a sort is the
    multiset it orders."""
    length = level + 2
    task = rng.choice(("continue", "reverse", "sort"))
    if task == "continue":
        start, step = rng.randint(0, 99), rng.randint(1, 19)
        shown = [start + i * step for i in range(length)]
        answer, key = [start + length * step], f"continue:{start},{step}"
    else:
        shown = [rng.randint(0, 9) for _ in range(length)]
        if task == "reverse":
            answer = shown[::-1]
            key = f"reverse:{_spaced(min(shown, answer))}"
        else:
            answer = sorted(shown)
            key = f"sort:{_spaced(answer)}"
    return Example("sequence", level, f"{task} {_spaced(shown)} =", _spaced(answer), key)


def _spaced(numbers: list[int]) -> str:
    return " ".join(map(str, numbers))


def word_problems(rng: random.Random, level: int) -> Example:
    """A count (1 to 99) changed by `level` purchases or gifts, each of 1 to 19 items. The key is the
    numeric skeleton: names and items do not count, and purchases alone commute (their addends sorted)."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    count = start = rng.randint(1, 99)
    sentences = [f"{name} has {count} {item}."]
    steps = []
    for _ in range(level):
        change = rng.randint(1, 19)
        if rng.random() < 0.5 or change > count:
            count += change
            steps.append(f"+{change}")
            sentences.append(f"Then {name} buys {change} more.")
        else:
            count -= change
            steps.append(f"-{change}")
            sentences.append(f"Then {name} gives {change} away.")
    if all(step.startswith("+") for step in steps):
        key = "words:" + "+".join(map(str, sorted([start, *(int(s) for s in steps)])))
    else:
        key = f"words:{start}{''.join(steps)}"
    question = f"How many {item} does {name} have now?"
    return Example("word_problems", level, " ".join([*sentences, question]), str(count), key)


NAMES = ("Ann", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jo")
ITEMS = ("apples", "books", "coins", "cards", "pens", "shells", "stamps", "marbles")


def multiple_choice(rng: random.Random, level: int) -> Example:
    """Pick one of four `level`-digit numbers: the largest, the smallest, or the one equal to a sum. A sum's
    key is the addition's (shared with arithmetic and tool calls); largest and smallest are keyed by the set
    of options. The options' order and a sum's distractors are drawn from the key, so a problem has one prompt."""
    task = rng.choice(("largest", "smallest", "sum"))
    if task == "sum":
        a, b = sorted((_operand(rng, level), _operand(rng, level)))
        correct, key = a + b, expression_key(a, "+", b)
        question = f"which is {a} + {b}"
        offsets = random.Random(key).sample([d for d in range(-5, 6) if d and correct + d >= 0], 3)
        options = [correct, *(correct + d for d in offsets)]
    else:
        options = []
        while len(options) < 4:
            if (x := _operand(rng, level)) not in options:
                options.append(x)
        correct = max(options) if task == "largest" else min(options)
        question = f"which is the {task}"
        key = f"{task}:{_spaced(sorted(options))}"
    options.sort()
    random.Random(key).shuffle(options)
    choices = tuple(map(str, options))
    prompt = f"{question}: {', '.join(choices)} ?"
    label = choices.index(str(correct))
    return Example("multiple_choice", level, prompt, choices[label], key, choices, label)


Generator = Callable[[random.Random, int], Example]
# suite -> (generator, levels it accepts)
SUITES: dict[str, tuple[Generator, range]] = {
    "arithmetic": (arithmetic, range(1, 5)),
    "word_problems": (word_problems, range(1, 4)),
    "modular": (modular, range(1, 4)),
    "sequence": (sequence, range(1, 4)),
    "multiple_choice": (multiple_choice, range(1, 4)),
    "tool_calls": (tool_calls, range(1, 5)),
    "requests": (requests, range(1, 5)),
}


def check_task(suite: str, level: int, split: str | None = None) -> Generator:
    """The suite's generator, or a ValueError naming what is unknown (the split too, when given)."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; known: {', '.join(SUITES)}")
    generator, levels = SUITES[suite]
    if level not in levels:
        raise ValueError(f"suite {suite!r} has levels {levels.start}..{levels.stop - 1}, not {level!r}")
    if split is not None:
        check_split(split)
    return generator


def _draw(generator: Generator, rng: random.Random, level: int, split: str) -> Example:
    """One problem of the split (rejection sampling: splits are regions of the hash space of keys)."""
    while True:
        example = generator(rng, level)
        if split_of(example.key) == split:
            return example


def make_examples(suite: str, level: int, split: str, n: int, seed: int = 0, allow_fewer: bool = False) -> list[Example]:
    """n distinct problems (distinct keys) of one suite, level and split, the same list for the same arguments;
    with allow_fewer, all the split holds where that is fewer than n."""
    generator = check_task(suite, level, split)
    check_readable(split)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"{suite}|{level}|{split}|{seed}")
    examples: dict[str, Example] = {}
    # Give up after this many draws in a row bring nothing new: if the split held n problems, the
    # chance of missing the last one that long is below e^-50 (coupon collector over a pool >= n).
    patience, misses = 50 * n + 1000, 0
    while len(examples) < n and misses < patience:
        example = _draw(generator, rng, level, split)
        misses = misses + 1 if example.key in examples else 0
        examples.setdefault(example.key, example)
    if len(examples) < n and not allow_fewer:
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
    check_readable(split)
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

