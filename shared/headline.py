"""The headline: is the forged model smaller than the models it started from, and better on held-out tasks?

One measurement, read where nothing was tuned: the final split (shared.data.splits), which only the
pipeline's final report and the headline benchmark may unseal. Each contender (the run's final model
first, then what a user would otherwise keep: the best Cognate specialist, the multitask baseline, and in
the benchmark a compute-matched baseline) gets the shared scorecard on that split, its bytes on disk and
its greedy generation speed; the forged model is then compared with each of the others, paired, on the
same problems and text. A development run may read the test split instead (`split="test"`).
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from shared.data.splits import FINAL, unsealed_final
from shared.data.tasks import make_examples
from shared.evaluation import generation_speed
from shared.phase import ProgressFn, no_progress
from shared.scorecard import MEAN_METRIC, TEXT_METRIC, ScorecardSpec, compare, comparison_figures, score

# Generation speed: one left-padded batch of validation word problems (the split does not change the cost).
SPEED_PROMPTS = 64
SPEED_NEW_TOKENS = 16


@dataclass(frozen=True)
class Contender:
    """A model in the headline, as it is measured (ternary models through shared.phase.as_measured)."""

    name: str
    model: Any
    tokenizer: Any
    bytes: int  # on disk: the smallest file that rebuilds the model
    bytes_how: str = "file"  # how `bytes` was counted, said beside it in tables


def measure(contenders: Sequence[Contender], split: str = FINAL, reader: str = "the pipeline's final report",
            progress: ProgressFn = no_progress) -> dict[str, Any]:
    """The headline of contenders[0] (the forged model) against the others: every card on `split`, bytes,
    tokens per second, and the forged model's paired comparison with each. `reader` is who unseals the final
    split, recorded in the result."""
    if len(contenders) < 2:
        raise ValueError("the headline compares the forged model with at least one other model")
    unseal = unsealed_final(reader) if split == FINAL else contextlib.nullcontext()
    cards = {}
    with unseal:
        spec = ScorecardSpec(split=split)
        for i, contender in enumerate(contenders):
            step = lambda f, m, i=i: progress((i + f) / len(contenders), f"{contenders[i].name}: {m}")  # noqa: E731
            cards[contender.name] = score(contender.model, contender.tokenizer, spec, step)
    prompts = [e.prompt for e in make_examples("word_problems", 1, "validation", SPEED_PROMPTS, 0)]
    forged = contenders[0]
    models = [{"name": c.name, "bytes": c.bytes, "bytes_how": c.bytes_how,
               "bytes_over_forged": round(c.bytes / forged.bytes, 3),
               "speed": generation_speed(c.model, c.tokenizer, prompts, SPEED_NEW_TOKENS),
               "metrics": cards[c.name]["metrics"]} for c in contenders]
    progress(1.0, "headline measured")
    return {"split": split, "reader": reader if split == FINAL else None, "spec_digest": spec.digest(),
            "forged": forged.name, "models": models,
            "comparisons": {c.name: comparison_figures(compare(cards[forged.name], cards[c.name]))
                            for c in contenders[1:]}}


def _cell(metric: dict[str, float]) -> str:
    return f"{metric['value']:.3f} [{metric['ci_low']:.3f}, {metric['ci_high']:.3f}]"


def _difference(figure: dict[str, Any]) -> str:
    return f"{figure['difference']:+.3f} [{figure['ci_low']:+.3f}, {figure['ci_high']:+.3f}] {figure['verdict']}"


def table_lines(headline: dict[str, Any]) -> list[str]:
    """Markdown: the contenders (bytes, bits per byte, mean task success with 95% intervals, tokens per
    second), then the forged model's paired differences from each (its gain: positive bits per byte is worse)."""
    lines = ["| model | bytes on disk | × forged | bits/byte | mean task success | tokens/s |", "|---|---|---|---|---|---|"]
    for model in headline["models"]:
        how = "" if model["bytes_how"] == "file" else f" ({model['bytes_how']})"
        lines.append(f"| {model['name']} | {model['bytes']:,}{how} | {model['bytes_over_forged']:.2f} | "
                     f"{_cell(model['metrics'][TEXT_METRIC])} | {_cell(model['metrics'][MEAN_METRIC])} | "
                     f"{model['speed']['tokens_per_second']:.0f} |")
    lines += ["", f"| {headline['forged']} minus | bits/byte | mean task success | Pareto relation |", "|---|---|---|---|"]
    for name, comparison in headline["comparisons"].items():
        figures = comparison["metrics"]
        lines.append(f"| {name} | {_difference(figures[TEXT_METRIC])} | {_difference(figures[MEAN_METRIC])} | "
                     f"{comparison['relation']} |")
    return lines
