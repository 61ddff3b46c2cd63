"""The edge-of-chaos curriculum: keep the reasoning tasks fed at the difficulty where the model succeeds
about 55-75% of the time.

Every `check_every` steps the controller scores the model, greedily, on a window of fresh problems of the
current level: drawn from the train split by a stream of their own (never the test or final split), each
window new. Success above the band raises the level, below it lowers it, inside it holds; the reasoning rows
fed from then on are that level's (`CurriculumFeed` in feed.py swaps the pool), so the difficulty really
changes the batches. Levels are those of the reasoning suites (shared.data.tasks): level 1 is what the
scorecard measures, levels 2 and 3 have larger operands, longer sequences and harder moduli.

Deviation, stated: the band and window are the predecessor's idea of "the edge of chaos" made measurable; no
paper fixes them. At the lowest level a model below the band stays there (nothing easier exists), which the
level trace in the report shows.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import islice

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.data.skills import REASONING_SUITES
from shared.data.tasks import Example, training_stream
from shared.scorecard import ScorecardSpec
from shared.tool_runtime import greedy_with_tools

# (model, tokenizer, examples) -> one 0/1 success per example
SuccessFn = Callable[..., list[int]]


class CurriculumConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    levels: tuple[int, ...] = (1, 2, 3)  # the difficulty ladder, easiest first
    start_level: int = 1
    band: tuple[float, float] = (0.55, 0.75)  # target success rate on the window
    window: int = Field(32, ge=1)  # fresh problems per measurement
    check_every: int = Field(25, ge=1)  # steps between measurements

    @model_validator(mode="after")
    def _consistent(self) -> CurriculumConfig:
        low, high = self.band
        if not 0 <= low < high <= 1:
            raise ValueError(f"band must satisfy 0 <= low < high <= 1, got {self.band}")
        if self.start_level not in self.levels:
            raise ValueError(f"start_level {self.start_level} is not among levels {self.levels}")
        if list(self.levels) != sorted(set(self.levels)):
            raise ValueError(f"levels must rise without repeats, got {self.levels}")
        return self


def greedy_success(model, tokenizer, examples: Sequence[Example]) -> list[int]:
    """Exact match of the final answer, decoded greedily with the calculator, as the scorecard decodes."""
    spec = ScorecardSpec()
    transcripts = greedy_with_tools(model, tokenizer, [e.prompt for e in examples], spec.max_new_tokens, spec.max_calls)
    return [int(t.final_answer == e.answer) for t, e in zip(transcripts, examples, strict=True)]


@dataclass
class Measurement:
    step: int
    level: int
    success: float
    next_level: int


@dataclass
class EdgeOfChaosController:
    """The level and its history; `measure` scores a fresh window and moves the level."""

    config: CurriculumConfig
    seed: int = 0
    success_fn: SuccessFn = greedy_success
    level: int = 0
    history: list[Measurement] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.level = self.config.start_level
        # One endless stream per level: each window takes the next problems, so no window repeats an earlier one.
        self._streams = {level: training_stream(REASONING_SUITES, (level,), "train", seed=10_000 + 97 * self.seed + level)
                         for level in self.config.levels}

    def due(self, step: int) -> bool:
        """After optimiser step `step` (0-based), is a measurement due?"""
        return (step + 1) % self.config.check_every == 0

    def measure(self, step: int, model, tokenizer) -> Measurement:
        window = list(islice(self._streams[self.level], self.config.window))
        success = sum(self.success_fn(model, tokenizer, window)) / len(window)
        levels, index = self.config.levels, self.config.levels.index(self.level)
        low, high = self.config.band
        if success > high and index + 1 < len(levels):
            index += 1
        elif success < low and index > 0:
            index -= 1
        measurement = Measurement(step + 1, self.level, success, levels[index])
        self.history.append(measurement)
        self.level = levels[index]
        return measurement

    def as_report(self) -> dict:
        return {"band": list(self.config.band), "window": self.config.window, "check_every": self.config.check_every,
                "start_level": self.config.start_level,
                "measurements": [{"step": m.step, "level": m.level, "success": round(m.success, 4),
                                  "next_level": m.next_level} for m in self.history]}
