"""The prompts baking moves into the weights, and the held-out inputs each is baked on and measured on.

A prompt is data: its text, its kind, and how its behaviour is measured. Two kinds:

    tools     the inputs are task problems (suite, level); the behaviour is the task's success with the
              calculator runtime executing the model's calls, and how often it makes a call that computes
    persona   the inputs are excerpts of the split's plays, each ending where the next speech begins; the
              behaviour is each trait's automatic measure, a regular expression searched in the speech the
              model writes next (greedy)

The model reads a prompt and an input as one text, the prompt then the input. The prompt's tokens must be
the same alone as before every input (the phase checks it: trajectories.check_prompt), so that the student's
view of a trajectory is the teacher's with the prompt's tokens removed; a prompt ending in a newline, or in
a space before a number, does (byte-level BPE never merges across those boundaries).

The default prompts are the ones measured in the README: the calculator instruction, baked on requests that
lack it, and a persona.
"""
from __future__ import annotations

import bisect
import random
import re
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.data.splits import check_readable
from shared.data.tasks import INSTRUCTION, check_task, make_examples
from shared.data.text import english_documents

# Where a speech ends and the next begins: a blank line, then the speaker's name in capitals and a full stop.
NEXT_SPEECH = re.compile(r"\n\n(?=[A-Z][A-Z' ]+\.\n)")


class Trait(BaseModel):
    """One persona trait and its automatic measure."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    pattern: str = Field(min_length=1)  # a regular expression, searched (case-insensitive) in what the model writes
    description: str = ""

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"trait pattern {pattern!r} is not a regular expression: {error}") from error
        return pattern

    def shown_by(self, speech: str) -> bool:
        return re.search(self.pattern, speech, flags=re.IGNORECASE) is not None


class PromptConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    kind: Literal["tools", "persona"]
    text: str
    tasks: tuple[tuple[str, int], ...] = ()  # tools: the (suite, level) problems it is baked and measured on
    traits: tuple[Trait, ...] = ()  # persona: what it should make the model do

    @field_validator("text")
    @classmethod
    def _not_empty(cls, text: str) -> str:
        if not text.strip():
            raise ValueError("a baked prompt's text is empty: there is nothing to bake")
        return text

    @model_validator(mode="after")
    def _measured(self) -> PromptConfig:
        if self.kind == "tools":
            if not self.tasks or self.traits:
                raise ValueError(f"tools prompt {self.name!r} needs tasks (suite, level) and no traits")
            for suite, level in self.tasks:
                check_task(suite, level)
        elif not self.traits or self.tasks:
            raise ValueError(f"persona prompt {self.name!r} needs traits and no tasks")
        return self

    def context(self, text: str) -> str:
        """What the prompted model reads: the prompt, then the input."""
        return self.text + text


TOOL_PROMPT = PromptConfig(
    name="tools",
    kind="tools",
    # The instruction every calculator request of the training data opens with. Without it the models
    # answer a request ("87 minus 12 ?") by guessing; with it they call the calculator (README, Baking).
    # Worked calls on bare arithmetic ("27 * 46 = <calc>27*46</calc>...") moved no model (validation).
    text=INSTRUCTION,
    tasks=(("requests", 2),),
)
PERSONA_PROMPT = PromptConfig(
    name="persona",
    kind="persona",
    text=("[Enter FORGE, a smith]\n\n"
          "FORGE.\n"
          "I am Forge, a smith of fire and iron. Good friend, I speak briefly.\n\n"
          "FORGE.\n"
          "Friend, my fire is hot and my iron is ready.\n"),
    traits=(
        Trait(name="speaks_as_forge", pattern=r"^\s*FORGE\.", description="the next speech is Forge's"),
        Trait(name="says_friend", pattern=r"\bfriend", description="the speech calls someone friend"),
        Trait(name="fire_and_iron", pattern=r"\b(fire|iron)\b", description="the speech speaks of fire or iron"),
    ),
)
DEFAULT_PROMPTS = (TOOL_PROMPT, PERSONA_PROMPT)


def dialogue_inputs(split: str, n: int, seed: int, max_chars: int,
                    fits: Callable[[str], bool] = lambda text: True) -> list[str]:
    """n excerpts of the split's plays, each of whole speeches (at most max_chars characters), ending with
    the newline after a speech's last line, so that what follows is a newline, the next speaker's name and
    speech. (Ending after the blank line would end the input on a two-newline token that training text
    only ever has before more white space, never before a name.)

    An excerpt that `fits` refuses (too many tokens for the model's context with its prompt and trajectory:
    characters do not bound tokens) loses its first speeches until it fits, and is left out if its last
    speech alone does not. While none is left out, the draw is the one without `fits`, shortened excerpts in
    place of long ones."""
    check_readable(split)
    candidates = []
    for document in english_documents(split):
        starts = [match.end() for match in NEXT_SPEECH.finditer(document)]
        for i, end in enumerate(starts):
            first = bisect.bisect_left(starts, end - max_chars)  # the earliest speech that keeps it short enough
            # Without the blank line's second newline, which the model writes (see above).
            excerpt = next((text for start in starts[first:i] if fits(text := document[start:end - 1])), None)
            if excerpt is not None:
                candidates.append(excerpt)
    if len(candidates) < n:
        raise ValueError(f"the {split} plays hold {len(candidates)} excerpts of at most {max_chars} characters "
                         f"(and few enough tokens for the context), fewer than the {n} asked for")
    return random.Random(seed).sample(candidates, n)


def next_speech(continuation: str) -> str:
    """The speech a continuation of an excerpt opens with: up to the blank line that ends it."""
    return continuation.lstrip("\n").split("\n\n", 1)[0]


def prompt_inputs(prompt: PromptConfig, split: str, n: int, seed: int, max_chars: int,
                  fits: Callable[[str], bool]) -> list[str]:
    """n held-out inputs of a prompt from a split (n problems of each of a tools prompt's tasks; play
    excerpts that `fits` accepts for a persona)."""
    if prompt.kind == "persona":
        return dialogue_inputs(split, n, seed, max_chars, fits)
    return [example.prompt for suite, level in prompt.tasks
            for example in make_examples(suite, level, split, n, seed, allow_fewer=split == "train")]


def prompt_examples(prompt: PromptConfig, split: str, n: int, seed: int) -> dict[str, list]:
    """A tools prompt's problems per task name (their answers score the behaviour)."""
    return {f"{suite}.{level}": make_examples(suite, level, split, n, seed) for suite, level in prompt.tasks}
