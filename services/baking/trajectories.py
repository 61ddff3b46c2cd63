"""Trajectories sampled from the prompted teacher, as the token rows the KL objective trains and measures on.

Prompt baking estimates KL(teacher with prompt || student without) on text the prompted model writes itself
(Bhargava et al. 2024 sample at temperature 2.0, 100-300 tokens). A tools prompt's trajectory is written with
the calculator runtime executing its calls, as the model is used: the result after each call is the true
one, and it is read-only (the runtime writes it, no KL is taken on it). A persona prompt's trajectory is a
free continuation of `speech_tokens` tokens.

A row is the teacher's view: the prompt's tokens, the input's, the trajectory's, with everything but the
trajectory's model-written tokens marked read-only (shared.training.NOT_PREDICTED); it knows its prompt's
length. The student's view is the same row without the prompt's tokens (objective.PromptKL). The anchor's
rows (the input's own trajectories, no prompt: phase.py) have a prompt of length 0.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from pydantic import BaseModel, ConfigDict, Field

from services.baking.prompts import PromptConfig
from shared.calculator import MAX_RESULT_DIGITS, result_text
from shared.evaluation import sampled_continuations
from shared.tool_runtime import sampled_with_tools
from shared.training import NOT_PREDICTED, continuation_rows


class SamplingConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # The paper samples 7B models at 2.0; 1.0 here, not tuned (README, Baking).
    temperature: float = Field(1.0, gt=0)
    answer_tokens: int = Field(16, ge=1)  # tools: tokens per round of the runtime (a call, or the answer)
    max_calls: int = Field(2, ge=0)  # tools: calculator calls executed per trajectory
    speech_tokens: int = Field(48, ge=1)  # persona: tokens of free continuation
    batch_size: int = Field(64, ge=1)

    def trajectory_tokens(self, tokenizer, prompt: PromptConfig) -> int:
        """The most tokens a trajectory of this prompt can add after its input: every round of the runtime,
        and the longest result the calculator can write after each call."""
        if prompt.kind == "persona":
            return self.speech_tokens
        longest_result = len(tokenizer(result_text("-" + "9" * MAX_RESULT_DIGITS), add_special_tokens=False)["input_ids"])
        return (self.max_calls + 1) * self.answer_tokens + self.max_calls * longest_result


def prompt_ids(tokenizer, prompt: PromptConfig) -> list[int]:
    return tokenizer(prompt.text, add_special_tokens=False)["input_ids"]


def input_room(tokenizer, prompt: PromptConfig, config: SamplingConfig, context: int) -> int:
    """The most tokens an input of this prompt may have: the model's context less the prompt and its longest
    trajectory."""
    return context - len(prompt_ids(tokenizer, prompt)) - config.trajectory_tokens(tokenizer, prompt)


def at_most(tokenizer, tokens: int) -> Callable[[str], bool]:
    """Whether a text is at most this many tokens."""
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= tokens


def check_prompt(tokenizer, prompt: PromptConfig, inputs: Sequence[str], config: SamplingConfig, context: int) -> None:
    """A ValueError, naming the numbers, for a prompt that with its longest input and trajectory overflows the
    model's context, or whose tokens change when an input follows it (the student's view of a row would then
    not be the teacher's without the prompt)."""
    own = prompt_ids(tokenizer, prompt)
    encoded = tokenizer(list(inputs), add_special_tokens=False)["input_ids"]
    longest = max(map(len, encoded))
    if longest > input_room(tokenizer, prompt, config, context):
        trajectory = config.trajectory_tokens(tokenizer, prompt)
        raise ValueError(f"prompt {prompt.name!r} is {len(own)} tokens; with its longest input ({longest}) and "
                         f"trajectory ({trajectory}) that is {len(own) + longest + trajectory}, more than the "
                         f"model's context of {context} tokens")
    together = tokenizer([prompt.context(text) for text in inputs], add_special_tokens=False)["input_ids"]
    for text, ids, alone in zip(inputs, together, encoded, strict=True):
        if ids != own + alone:
            raise ValueError(f"prompt {prompt.name!r} does not end at a token boundary before the input {text[:40]!r}: "
                             "end it with a newline or a space before a number")


class TeacherRow(list):
    """A row of token ids (shared.training's Row) that knows how many of its first tokens are the prompt."""

    def __init__(self, ids: Sequence[int], prompt_length: int):
        super().__init__(ids)
        self.prompt_length = prompt_length


def sample_trajectories(model, tokenizer, prefix: str, inputs: Sequence[str], uses_tools: bool, config: SamplingConfig,
                        seed: int) -> list[str]:
    """What the model writes after prefix + each input (a prompt's text, or "" for the anchor), sampled: with
    the calculator runtime executing its calls if `uses_tools`, else `speech_tokens` of free text."""
    contexts = [prefix + text for text in inputs]
    if uses_tools:
        transcripts = sampled_with_tools(model, tokenizer, contexts, config.answer_tokens, config.temperature, seed,
                                         config.max_calls, config.batch_size)
        return [transcript.text for transcript in transcripts]
    return sampled_continuations(model, tokenizer, contexts, config.speech_tokens, config.temperature, seed,
                                 config.batch_size, stop_strings=())


def teacher_rows(tokenizer, prefix: str, inputs: Sequence[str], trajectories: Sequence[str]) -> list[TeacherRow]:
    """The teacher's view of each (input, trajectory): the prefix's tokens and the input read-only, then the
    trajectory with its calculator results read-only."""
    rows = continuation_rows(tokenizer, inputs, trajectories)
    head = [token + NOT_PREDICTED for token in tokenizer(prefix, add_special_tokens=False)["input_ids"]] if prefix else []
    return [TeacherRow(head + row, len(head)) for row in rows]
