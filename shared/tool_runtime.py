"""Generation with the calculator: a complete call is executed while the model writes, and it reads the result.

The model generates greedily until it ends its answer (TERMINATOR) or closes a calculator call. A closed
call is executed by shared.calculator (never eval), its result or error is appended to the transcript, and
the model continues from the transcript so far, re-tokenized as a whole as training text is. At most
`max_calls` calls are executed per prompt; after that the model may still write calls, which stay text.
Each round generates at most `max_new_tokens` tokens. A malformed call (`<calc>12+</calc>`, letters, a
stray `</calc>` with nothing opened) or an oversized one gets an error result, never an exception.

The generation function is a parameter (`generate`: prompts -> continuations, given stop strings), so a
phase whose model writes in another way (Quiet-STaR's thoughts) runs the same tools.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from shared.calculator import CALC_CLOSE, CALC_OPEN, ERROR_PREFIX, execute, result_text
from shared.data.tasks import TERMINATOR, extract_answer
from shared.evaluation import greedy_continuations, sampled_continuations

# (prompts, max_new_tokens, stop_strings) -> one continuation per prompt, ending at the first stop string or earlier.
Generate = Callable[[Sequence[str], int, Sequence[str]], list[str]]
DEFAULT_MAX_CALLS = 2


@dataclass(frozen=True)
class Transcript:
    """What followed a prompt: the model's text with the runtime's results spliced in, and the calls made."""

    text: str
    calls: tuple[str, ...] = ()  # the expressions of the executed calls, in order
    results: tuple[str, ...] = ()  # what the runtime appended for each (a value, or "error: ...")

    @property
    def final_answer(self) -> str:
        return extract_answer(self.text)

    @property
    def made_well_formed_call(self) -> bool:
        """At least one executed call computed a value (its expression was valid and small enough)."""
        return any(not result.startswith(ERROR_PREFIX) for result in self.results)


def first_stop(text: str, stops: Sequence[str]) -> str:
    """text up to and including the earliest stop string in it (all of it if none occurs)."""
    ends = [text.index(stop) + len(stop) for stop in stops if stop in text]
    return text[: min(ends)] if ends else text


def _call_expression(piece: str) -> str:
    """The expression of the call a piece ending in CALC_CLOSE closes ("" for a close with nothing opened,
    which the calculator refuses)."""
    opened = piece.rfind(CALC_OPEN)
    return piece[opened + len(CALC_OPEN) : -len(CALC_CLOSE)] if opened >= 0 else ""


def run_with_tools(generate: Generate, prompts: Sequence[str], max_new_tokens: int,
                   max_calls: int = DEFAULT_MAX_CALLS) -> list[Transcript]:
    """One transcript per prompt, each call executed as soon as the model closes it."""
    texts = [""] * len(prompts)
    calls: list[list[str]] = [[] for _ in prompts]
    results: list[list[str]] = [[] for _ in prompts]
    active = list(range(len(prompts)))
    for round_ in range(max_calls + 1):
        if not active:
            break
        # The last round executes nothing, so it stops only at the end of the answer.
        stops = [TERMINATOR] if round_ == max_calls else [TERMINATOR, CALC_CLOSE]
        continuations = generate([prompts[i] + texts[i] for i in active], max_new_tokens, stops)
        still_calling = []
        for i, continuation in zip(active, continuations, strict=True):
            piece = first_stop(continuation, stops)
            texts[i] += piece
            if piece.endswith(CALC_CLOSE) and CALC_CLOSE in stops:
                expression = _call_expression(piece)
                value = execute(expression)
                calls[i].append(expression.strip())
                results[i].append(value)
                texts[i] += result_text(value)
                still_calling.append(i)
        active = still_calling
    return [Transcript(text, tuple(c), tuple(r)) for text, c, r in zip(texts, calls, results, strict=True)]


def greedy_with_tools(model, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                      max_calls: int = DEFAULT_MAX_CALLS, batch_size: int = 64) -> list[Transcript]:
    """Greedy decoding of a causal LM with the calculator (shared.evaluation's batched generation)."""

    def generate(batch_prompts: Sequence[str], new_tokens: int, stops: Sequence[str]) -> list[str]:
        return greedy_continuations(model, tokenizer, batch_prompts, new_tokens, batch_size, stop_strings=stops)

    return run_with_tools(generate, prompts, max_new_tokens, max_calls)


def sampled_with_tools(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, temperature: float, seed: int,
                       max_calls: int = DEFAULT_MAX_CALLS, batch_size: int = 64) -> list[Transcript]:
    """As greedy_with_tools, each token sampled at `temperature`; round r of the runtime draws with seed + r."""
    rounds = iter(range(max_calls + 1))

    def generate(batch_prompts: Sequence[str], new_tokens: int, stops: Sequence[str]) -> list[str]:
        return sampled_continuations(model, tokenizer, batch_prompts, new_tokens, temperature, seed + next(rounds),
                                     batch_size, stop_strings=stops)

    return run_with_tools(generate, prompts, max_new_tokens, max_calls)
