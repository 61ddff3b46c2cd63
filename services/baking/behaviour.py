"""What a prompt makes the model do, measured per held-out input, with and without the prompt.

A tools prompt: for each task, `task_success` (the final answer, with the calculator runtime executing the
model's calls, equals the reference; as on the scorecard) and `call_well_formed` (at least one call computed
a value). A persona prompt: for each trait, whether its pattern occurs in the next speech the model writes
(greedy). Every measure is a 0/1 flag per input, higher meaning more of the behaviour, so two models (or
one model with and without the prompt) on the same inputs compare paired: the difference of the means with
a paired 95% bootstrap interval (shared.comparison), "better" where the interval lies above zero.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from services.baking.prompts import PromptConfig, next_speech
from shared.comparison import percentile_interval, resample_indices
from shared.data.tasks import Example
from shared.evaluation import greedy_continuations
from shared.tool_runtime import greedy_with_tools

Flags = dict[str, list[int]]  # measure -> one 0/1 per input


def measure(model, tokenizer, prompt: PromptConfig, inputs: Sequence[str], examples: dict[str, list[Example]],
            prompted: bool, max_new_tokens: int, max_calls: int, speech_tokens: int) -> Flags:
    """The prompt's measures of `model` on the inputs, reading the prompt before each input if `prompted`."""
    context = prompt.context if prompted else (lambda text: text)
    if prompt.kind == "tools":
        flags: Flags = {}
        for task, task_examples in examples.items():
            transcripts = greedy_with_tools(model, tokenizer, [context(e.prompt) for e in task_examples],
                                            max_new_tokens, max_calls)
            flags[f"{task}.task_success"] = [int(t.final_answer == e.answer) for t, e in zip(transcripts, task_examples, strict=True)]
            flags[f"{task}.call_well_formed"] = [int(t.made_well_formed_call) for t in transcripts]
        return flags
    speeches = [next_speech(text) for text in
                greedy_continuations(model, tokenizer, [context(text) for text in inputs], speech_tokens, 64, stop_strings=())]
    return {trait.name: [int(trait.shown_by(speech)) for speech in speeches] for trait in prompt.traits}


def paired(flags: Flags, reference: Flags, item_set: str) -> dict[str, dict]:
    """Per measure: both means, flags minus reference with its paired 95% interval, and the verdict."""
    out = {}
    for name, values in flags.items():
        a, b = np.asarray(values, float), np.asarray(reference[name], float)
        if len(a) != len(b):
            raise ValueError(f"{name}: {len(a)} and {len(b)} inputs cannot be paired")
        picks = resample_indices(f"{item_set}/{name}", len(a))
        low, high = percentile_interval(a[picks].mean(1) - b[picks].mean(1))
        out[name] = {"value": float(a.mean()), "reference": float(b.mean()), "difference": float(a.mean() - b.mean()),
                     "ci_low": low, "ci_high": high, "n": len(a),
                     "verdict": "better" if low > 0 else "worse" if high < 0 else "tied"}
    return out


def changes_behaviour(differences: dict[str, dict]) -> bool:
    """The prompt measurably moves some measure the way it asks (its paired interval above zero)."""
    return any(d["verdict"] == "better" for d in differences.values())
