"""The one scorecard every phase reports on, for the models it takes in and the models it hands on.

Every phase scores with the same spec (suites, sizes, split), so numbers from different phases compare, and
keeps each model's per-item results in its report, so any two models of a run can later be compared
paired (shared.comparison). What a card measures:

- text.bits_per_byte: the split's English text (two plays) in blocks of about BLOCK_CHARS characters cut at
  blank lines, each scored with lm-eval's rolling windows (shared.evaluation), pooled over the blocks;
  the interval is a bootstrap over blocks. A block's first tokens lack the context before it, so the pooled
  figure sits slightly above the whole-document one.
- SUITE.LEVEL.task_success: the final answer of greedy generation with the calculator (shared.tool_runtime:
  calls are executed, the model continues to its answer) equals the reference; for multiple choice the
  choice of highest likelihood is right (lm-eval's acc). Wilson interval.
- tool_calls.LEVEL.call_well_formed: the model made at least one call the calculator could execute.
- reasoning.task_success, tools.task_success: pooled over the tasks of an area the spec measures (Wilson).
- tasks.mean_task_success: the mean of the tasks' success, bootstrap interval.

Baselines a phase can put beside its models: the untrained model (Cognate scores it), the majority answer
of each task (majority_card), and the multitask model (the base trained on the union of the specialists'
data for their total steps, Cognate's output "multitask").

compare(card, reference) gives, per metric, the paired difference with its 95% interval and a verdict
(better, worse, or tied where the interval holds zero), and over the headline metrics (bits per byte and
each task's success) the Pareto relation: dominates (better somewhere, worse nowhere), dominated,
incomparable (better somewhere, worse elsewhere) or indistinguishable.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import threading
from collections import Counter, OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.comparison import percentile_interval, resample_indices
from shared.data.splits import check_readable
from shared.data.tasks import Example, check_task, make_examples
from shared.data.text import english_documents
from shared.evaluation import argmax, choice_loglikelihoods, rolling_loglikelihoods, wilson_interval
from shared.phase import ProgressFn, no_progress
from shared.tool_runtime import greedy_with_tools

Task = tuple[str, int, int]  # (suite, level, number of problems)
# What the forged model must be good at (Cognate's specialities): the level-1 reasoning suites and level-2
# calculator requests, 300 problems each (every split but train holds more; tests/unit/test_data_tasks.py).
HEADLINE_TASKS: tuple[Task, ...] = (
    ("arithmetic", 1, 300), ("sequence", 1, 300), ("modular", 1, 300), ("word_problems", 1, 300), ("tool_calls", 2, 300))
AREAS = {"reasoning": ("arithmetic", "sequence", "modular", "word_problems"), "tools": ("tool_calls",)}
TEXT = "text"
TEXT_METRIC = "text.bits_per_byte"
MEAN_METRIC = "tasks.mean_task_success"
BLOCK_CHARS = 2_000
MAJORITY_TRAIN_PROBLEMS = 1_000
LOG2 = math.log(2)


class ScorecardSpec(BaseModel):
    """What a card measures. Phases report on the default (the test split); searches score on validation."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    split: str = "test"
    text: bool = True  # bits per byte of the split's English text
    tasks: tuple[Task, ...] = HEADLINE_TASKS
    seed: int = 0  # which problems; the same for every model and every training seed
    max_new_tokens: int = Field(16, ge=1)  # per generation round (the answer, or a call, or the answer after one)
    max_calls: int = Field(2, ge=0)  # calculator calls executed per problem
    max_length: int | None = Field(None, ge=1)  # rolling-window length; None: the model's context length

    @field_validator("split")
    @classmethod
    def _readable(cls, split: str) -> str:
        check_readable(split)  # FinalSplitSealed (a ValueError) for the final split outside the final report
        if split == "train":
            raise ValueError("a scorecard measures held-out problems: use 'validation' or 'test'")
        return split

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: tuple[Task, ...]) -> tuple[Task, ...]:
        for suite, level, n in tasks:
            check_task(suite, level)
            if n < 1:
                raise ValueError(f"task ({suite}, {level}) needs n >= 1, got {n}")
        names = [task_name(suite, level) for suite, level, _ in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"a task appears twice: {names}")
        return tasks

    @model_validator(mode="after")
    def _measures_something(self) -> ScorecardSpec:
        if not self.text and not self.tasks:
            raise ValueError("the scorecard measures nothing (no text, no tasks)")
        return self

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def task_name(suite: str, level: int) -> str:
    return f"{suite}.{level}"


def _problems_digest(values: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(values).encode()).hexdigest()[:16]


def text_blocks(split: str) -> tuple[str, ...]:
    """The split's English documents cut at blank lines into blocks of at least BLOCK_CHARS characters."""
    check_readable(split)  # before the cache, which would otherwise answer for a sealed split
    return _blocks(split)


@functools.cache
def _blocks(split: str) -> tuple[str, ...]:
    blocks = []
    for document in english_documents(split):
        current = ""
        for paragraph in document.split("\n\n"):
            current = f"{current}\n\n{paragraph}" if current else paragraph
            if len(current) >= BLOCK_CHARS:
                blocks.append(current)
                current = ""
        if current:
            blocks.append(current)
    return tuple(blocks)


def _task_examples(spec: ScorecardSpec) -> dict[str, list[Example]]:
    return {task_name(s, lv): make_examples(s, lv, spec.split, n, spec.seed) for s, lv, n in spec.tasks}


# --- scoring ------------------------------------------------------------------------------------------


# Cards measured in this process, by everything a card depends on (card_key). A phase scores its input, which
# in one process (embedded mode) is the model the step before scored as its output: the same model under the
# same spec gives the same card, so it is looked up instead of measured twice. Least recently used goes first.
_CARDS: OrderedDict[str, dict[str, Any]] = OrderedDict()
_CARDS_LOCK = threading.Lock()
CARDS_KEPT = 64
_PLAIN = (bool, int, float, str, type(None))
_NOT_BEHAVIOUR = ("training", "name_or_path")


def card_key(model, tokenizer, spec: ScorecardSpec) -> str:
    """A digest of what a card depends on: the spec, the tokenizer, the model's class, structure, config and
    each module's plain settings (flags; not the training mode, as every card is measured in eval mode, nor
    the folder it was loaded from), and every parameter and buffer bit for bit."""
    digest = hashlib.sha256(spec.model_dump_json().encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update((backend.to_str() if backend is not None else repr(tokenizer)).encode())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    for part in (type(model).__qualname__, str(model),
                 getattr(model, "config", None), getattr(model, "generation_config", None)):
        digest.update((part.to_json_string() if hasattr(part, "to_json_string") else str(part)).encode())
    for name, module in model.named_modules(remove_duplicate=False):
        settings = sorted((key, _setting(value)) for key, value in vars(module).items()
                          if not key.startswith("_") and key not in _NOT_BEHAVIOUR)
        digest.update(f"{name}:{type(module).__qualname__}:{settings}".encode())
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _setting(value) -> Any:
    """A module attribute as the card key sees it: plain values and sequences as they are, objects by type."""
    if isinstance(value, _PLAIN):
        return value
    return repr(value) if isinstance(value, (tuple, list)) else type(value).__qualname__


def score(model, tokenizer, spec: ScorecardSpec, progress: ProgressFn = no_progress) -> dict[str, Any]:
    """One model's card: its metrics with 95% intervals and the per-item results behind them (JSON). A card
    this process already measured for the same model and spec is returned again (a copy), not remeasured."""
    check_readable(spec.split)
    key = card_key(model, tokenizer, spec)
    with _CARDS_LOCK:  # searches score candidates from several threads
        kept = _CARDS.get(key)
        if kept is not None:
            _CARDS.move_to_end(key)
            kept = copy.deepcopy(kept)
    if kept is not None:
        progress(1.0, "scorecard: measured before in this process")
        return kept
    card = _measure(model, tokenizer, spec, progress)
    with _CARDS_LOCK:
        _CARDS[key] = copy.deepcopy(card)
        while len(_CARDS) > CARDS_KEPT:
            _CARDS.popitem(last=False)
    return card


def _measure(model, tokenizer, spec: ScorecardSpec, progress: ProgressFn) -> dict[str, Any]:
    items: dict[str, Any] = {}
    problems: dict[str, str] = {}
    steps = len(spec.tasks) + spec.text
    if spec.text:
        progress(0.0, "scorecard: text")
        blocks = text_blocks(spec.split)
        loglikelihoods = rolling_loglikelihoods(model, tokenizer, blocks, spec.max_length)
        items[TEXT] = {"loglikelihood": loglikelihoods, "n_bytes": [len(b.encode("utf-8")) for b in blocks]}
        problems[TEXT] = _problems_digest(blocks)
    for i, (name, examples) in enumerate(_task_examples(spec).items()):
        progress((i + spec.text) / steps, f"scorecard: {name}")
        problems[name] = _problems_digest([e.key for e in examples])
        if examples[0].choices:
            scores = choice_loglikelihoods(model, tokenizer, examples)
            items[name] = {"task_success": [int(argmax(s) == e.label) for s, e in zip(scores, examples, strict=True)]}
            continue
        transcripts = greedy_with_tools(model, tokenizer, [e.prompt for e in examples], spec.max_new_tokens,
                                        spec.max_calls)
        items[name] = {"task_success": [int(t.final_answer == e.answer) for t, e in zip(transcripts, examples, strict=True)]}
        if any(e.tool_call for e in examples):
            items[name]["call_well_formed"] = [int(t.made_well_formed_call) for t in transcripts]
    progress(1.0, "scorecard done")
    return card_from_items(spec, problems, items)


def majority_card(spec: ScorecardSpec) -> dict[str, Any]:
    """The card of always giving each task's most frequent answer over (up to MAJORITY_TRAIN_PROBLEMS) distinct
    training problems (no text, no calls)."""
    items, problems = {}, {}
    for suite, level, n in spec.tasks:
        name = task_name(suite, level)
        examples = make_examples(suite, level, spec.split, n, spec.seed)
        train = make_examples(suite, level, "train", MAJORITY_TRAIN_PROBLEMS, spec.seed, allow_fewer=True)
        if examples[0].choices:  # the most frequent position of the right choice
            label = Counter(e.label for e in train).most_common(1)[0][0]
            items[name] = {"task_success": [int(e.label == label) for e in examples]}
        else:
            answer = Counter(e.answer for e in train).most_common(1)[0][0]
            items[name] = {"task_success": [int(e.answer == answer) for e in examples]}
            if any(e.tool_call for e in examples):
                items[name]["call_well_formed"] = [0] * len(examples)
        problems[name] = _problems_digest([e.key for e in examples])
    return card_from_items(spec, problems, items)


def card_from_items(spec: ScorecardSpec, problems: dict[str, str], items: dict[str, Any]) -> dict[str, Any]:
    """A card from per-item results (problems: item set -> digest of what was scored); metrics follow from them."""
    card = {"spec_digest": spec.digest(), "split": spec.split, "problems": problems, "items": items}
    card["metrics"] = {name: _summarise(card, name) for name in metric_names(card)}
    return card


# --- metrics from items ---------------------------------------------------------------------------------


def metric_names(card: dict[str, Any]) -> list[str]:
    """The metrics a card's items support, in a fixed order: text, each task's, the areas, the mean."""
    names = [TEXT_METRIC] if TEXT in card["items"] else []
    tasks = [name for name in card["items"] if name != TEXT]
    names += [f"{task}.{flag}" for task in tasks for flag in card["items"][task]]
    suites = {task.split(".")[0] for task in tasks}
    names += [f"{area}.task_success" for area, members in AREAS.items() if suites & set(members)]
    if tasks:
        names.append(MEAN_METRIC)
    return names


def headline_metrics(names: Sequence[str]) -> list[str]:
    """The metrics a Pareto relation is taken over: bits per byte and each task's success."""
    return [n for n in names if n == TEXT_METRIC or (n.endswith(".task_success") and n.count(".") == 2)]


def _area_tasks(card: dict[str, Any], area: str) -> list[str]:
    return [task for task in card["items"] if task != TEXT and task.split(".")[0] in AREAS[area]]


def _flags(card: dict[str, Any], task: str, flag: str = "task_success") -> np.ndarray:
    return np.asarray(card["items"][task][flag], dtype=float)


def metric_draws(card: dict[str, Any], name: str) -> tuple[float, np.ndarray]:
    """A metric's value and its BOOTSTRAP_SAMPLES resampled values; two cards on the same items get the same
    resamples, so subtracting their draws gives a paired difference."""
    if name == TEXT_METRIC:
        loglikelihood = np.asarray(card["items"][TEXT]["loglikelihood"])
        n_bytes = np.asarray(card["items"][TEXT]["n_bytes"], dtype=float)
        picks = resample_indices(TEXT, len(n_bytes))
        point = -loglikelihood.sum() / n_bytes.sum() / LOG2
        return float(point), -loglikelihood[picks].sum(1) / n_bytes[picks].sum(1) / LOG2
    head, _, flag = name.rpartition(".")
    if name == MEAN_METRIC:
        tasks = [task for task in card["items"] if task != TEXT]
        per_task = [_flags(card, task)[resample_indices(task, len(card["items"][task]["task_success"]))].mean(1)
                    for task in tasks]
        return float(np.mean([_flags(card, task).mean() for task in tasks])), np.mean(per_task, axis=0)
    if head in AREAS:
        tasks = _area_tasks(card, head)
        total = sum(len(card["items"][t][flag]) for t in tasks)
        correct = sum(_flags(card, t, flag)[resample_indices(t, len(card["items"][t][flag]))].sum(1) for t in tasks)
        return float(sum(_flags(card, t, flag).sum() for t in tasks) / total), correct / total
    flags = _flags(card, head, flag)
    return float(flags.mean()), flags[resample_indices(head, len(flags))].mean(1)


def _summarise(card: dict[str, Any], name: str) -> dict[str, float | int]:
    value, draws = metric_draws(card, name)
    head, _, flag = name.rpartition(".")
    if name in (TEXT_METRIC, MEAN_METRIC):
        low, high = percentile_interval(draws)
        n = len(card["items"][TEXT]["n_bytes"]) if name == TEXT_METRIC else len(card["items"]) - (TEXT in card["items"])
    else:  # a proportion: the Wilson interval, exact at 0 and 1 where a bootstrap collapses
        tasks = _area_tasks(card, head) if head in AREAS else [head]
        n = sum(len(card["items"][t][flag]) for t in tasks)
        low, high = wilson_interval(round(value * n), n)
    return {"value": value, "ci_low": low, "ci_high": high, "n": n}


def values(card: dict[str, Any]) -> dict[str, float]:
    """Metric name -> value, for summaries and tables."""
    return {name: metric["value"] for name, metric in card["metrics"].items()}


# --- comparisons ---------------------------------------------------------------------------------------


def _check_same_items(card: dict[str, Any], reference: dict[str, Any]) -> None:
    for item_set in card["problems"].keys() & reference["problems"].keys():
        if card["problems"][item_set] != reference["problems"][item_set]:
            raise ValueError(f"the two cards scored different problems for {item_set!r}: they cannot be paired")
    if card["split"] != reference["split"]:
        raise ValueError(f"cards of different splits ({card['split']}, {reference['split']}) cannot be paired")


def lower_is_better(name: str) -> bool:
    return name == TEXT_METRIC


def paired_difference(card: dict[str, Any], reference: dict[str, Any], name: str) -> dict[str, Any]:
    """card's metric minus reference's, its paired 95% interval, and whether card is better, worse or tied."""
    _check_same_items(card, reference)
    value, draws = metric_draws(card, name)
    reference_value, reference_draws = metric_draws(reference, name)
    low, high = percentile_interval(draws - reference_draws)
    gain_low, gain_high = (-high, -low) if lower_is_better(name) else (low, high)
    verdict = "better" if gain_low > 0 else "worse" if gain_high < 0 else "tied"
    return {"difference": value - reference_value, "ci_low": low, "ci_high": high, "verdict": verdict}


def pareto_relation(verdicts: Sequence[str]) -> str:
    better, worse = "better" in verdicts, "worse" in verdicts
    if better and worse:
        return "incomparable"
    return "dominates" if better else "dominated" if worse else "indistinguishable"


def compare(card: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """Every metric both cards have, paired, and the Pareto relation of card to reference on the headline ones."""
    shared = [name for name in card["metrics"] if name in reference["metrics"]]
    metrics = {name: paired_difference(card, reference, name) for name in shared}
    headline = headline_metrics(shared)
    return {"metrics": metrics, "headline": headline,
            "relation": pareto_relation([metrics[name]["verdict"] for name in headline])}


def comparison_figures(comparison: dict[str, Any]) -> dict[str, Any]:
    """A compare() result reduced to what a results file keeps: the relation and each metric's difference,
    interval and verdict."""
    return {"relation": comparison["relation"],
            "metrics": {name: {key: d[key] for key in ("difference", "ci_low", "ci_high", "verdict")}
                        for name, d in comparison["metrics"].items()}}


def headline_figures(cards: dict[str, dict[str, Any]], names: Sequence[str] | None = None) -> dict[str, float]:
    """For a report's summary: each card's mean task success and bits per byte ("NAME.mean_task_success",
    "NAME.bpb"), rounded to 4 places; a metric a card lacks is left out."""
    figures = {}
    for name in names or cards:
        for metric, label in ((MEAN_METRIC, "mean_task_success"), (TEXT_METRIC, "bpb")):
            if metric in cards[name]["metrics"]:
                figures[f"{name}.{label}"] = round(cards[name]["metrics"][metric]["value"], 4)
    return figures


def without_items(card: dict[str, Any]) -> dict[str, Any]:
    """The card's metrics alone (for search logs, where thousands of candidates are scored)."""
    return {key: value for key, value in card.items() if key != "items"}


def report_section(spec: ScorecardSpec, cards: dict[str, dict[str, Any]], inputs: Sequence[str],
                   outputs: Sequence[str], baselines: Sequence[str] = ()) -> dict[str, Any]:
    """The scorecard part of a phase report, the same keys in every phase: which cards are the phase's
    inputs, outputs and baselines, and every card with its items."""
    for name in [*inputs, *outputs, *baselines]:
        if name not in cards:
            raise ValueError(f"no card for {name!r}")
    return {"spec": spec.model_dump(mode="json"), "spec_digest": spec.digest(), "inputs": list(inputs),
            "outputs": list(outputs), "baselines": list(baselines), "cards": cards}


def table_lines(cards: dict[str, dict[str, Any]], metrics: Sequence[str] | None = None) -> list[str]:
    """A plain-text table of cards (rows) by metrics (columns, default: the headline metrics and the mean),
    each cell "value [95% low, high]"; a metric a card lacks shows "-"."""
    if metrics is None:
        every = sorted(dict.fromkeys(name for card in cards.values() for name in card["metrics"]),
                       key=lambda name: name != TEXT_METRIC)  # text first, then the tasks in the cards' order
        metrics = [*headline_metrics(every), *(m for m in every if m == MEAN_METRIC)]
    width = max(len(name) for name in cards)
    labels = ["bits/byte" if m == TEXT_METRIC else "mean" if m == MEAN_METRIC else m.removesuffix(".task_success")
              for m in metrics]
    lines = [f"{'model':{width}}  " + "  ".join(f"{label:>20}" for label in labels)]
    for name, card in cards.items():
        cells = []
        for metric in metrics:
            value = card["metrics"].get(metric)
            cells.append(f"{value['value']:.3f} [{value['ci_low']:.3f}, {value['ci_high']:.3f}]" if value else "-")
        lines.append(f"{name:{width}}  " + "  ".join(f"{cell:>20}" for cell in cells))
    return lines
