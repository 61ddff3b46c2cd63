"""Quality gates: a pipeline step may demand that its output keep a scorecard metric, against the step's
input (the most it may drop) or absolutely (a floor). A gated-out output is never handed on.

The gate measures its own scorecard, on the validation split by default: whether an output goes on is a
design decision, and those are made on validation only. It compares point estimates (the verdict must
be a yes or a no); the values, the best input and each output's drop are in the step's report and, on a
failure, in the reason the run fails with. "Drop" follows the metric's direction: lower task success, or
higher bits per byte; the floor is the worst value allowed (a minimum success, a maximum bits per byte).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.phase import ForgedModel, ProgressFn, as_measured, no_progress
from shared.scorecard import HEADLINE_TASKS, MEAN_METRIC, ScorecardSpec, lower_is_better, score

# A drop equal to its limit passes; a mean of proportions minus another carries float rounding (6 problems in
# 300 come out as 0.0200000000000018), which must not turn "exactly at the limit" into "beyond it".
ROUNDING_SLACK = 1e-9

GATE_SCORECARD = ScorecardSpec(split="validation", tasks=tuple((suite, level, 100) for suite, level, _ in HEADLINE_TASKS))


def beyond(change: float, limit: float) -> bool:
    """Whether a measured drop (or rise) exceeds its limit, float rounding aside."""
    return change > limit + ROUNDING_SLACK


class GateError(ValueError):
    """The gate cannot be applied to this step (a metric its scorecard lacks, a drop with no input)."""


class Gate(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    metric: str = MEAN_METRIC  # a metric name of shared.scorecard, e.g. text.bits_per_byte, arithmetic.1.task_success
    max_drop: float | None = Field(None, ge=0)  # against the best of the step's inputs, in the metric's units
    floor: float | None = None
    scorecard: ScorecardSpec = GATE_SCORECARD

    @model_validator(mode="after")
    def _has_a_bound(self) -> Gate:
        if self.max_drop is None and self.floor is None:
            raise ValueError("a gate needs max_drop, floor or both")
        return self

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def _value(card: dict[str, Any], gate: Gate, whose: str) -> float:
    if gate.metric not in card["metrics"]:
        raise GateError(f"the gate's metric {gate.metric!r} is not on its scorecard ({whose}); "
                        f"its metrics: {', '.join(card['metrics'])}")
    return float(card["metrics"][gate.metric]["value"])


def input_values(gate: Gate, inputs: list[ForgedModel], progress: ProgressFn = no_progress) -> dict[str, float]:
    """The gate's metric for each input, measured before the phase runs (a phase may change its inputs)."""
    if gate.max_drop is not None and not inputs:
        raise GateError("max_drop compares an output with the step's inputs, and this step has none: use a floor")
    if gate.max_drop is None:
        return {}
    return {forged.name: _value(score(as_measured(forged), forged.tokenizer, gate.scorecard, progress), gate, forged.name)
            for forged in inputs}


def verdict(gate: Gate, inputs: dict[str, float], outputs: list[ForgedModel],
            progress: ProgressFn = no_progress) -> dict[str, Any]:
    """Each output's value and drop against the best input, whether all pass, and the reason if not."""
    lower = lower_is_better(gate.metric)
    best = (min if lower else max)(inputs.values()) if inputs else None
    measured, failures = {}, []
    for forged in outputs:
        value = _value(score(as_measured(forged), forged.tokenizer, gate.scorecard, progress), gate, forged.name)
        drop = None if best is None else (value - best if lower else best - value)
        measured[forged.name] = {"value": value, "drop": drop}
        if gate.max_drop is not None and beyond(drop, gate.max_drop):
            failures.append(f"{forged.name}: {gate.metric} {value:.4f} dropped {drop:.4f} from the best input's "
                            f"{best:.4f}, more than the gate's {gate.max_drop}")
        if gate.floor is not None and (value > gate.floor if lower else value < gate.floor):
            failures.append(f"{forged.name}: {gate.metric} {value:.4f} is {'above' if lower else 'below'} the "
                            f"gate's floor {gate.floor}")
    return {"metric": gate.metric, "split": gate.scorecard.split, "max_drop": gate.max_drop, "floor": gate.floor,
            "inputs": inputs, "best_input": best, "outputs": measured, "passed": not failures,
            "reason": "; ".join(failures)}
