"""Phase 1, Cognate: the specialists the later phases merge, trained from one shared base.

Models trained from unrelated random initialisations cannot be merged meaningfully (their hidden units are
permuted differently), so Cognate trains one base on a balanced mix of English text, reasoning tasks and
calculator calls, then fine-tunes three copies of it on skewed mixes, each with its own seed and learning
rate: specialist-reasoning, specialist-text, specialist-tools. The output is the base (task-vector merges
need it) and the three specialists; the report holds every training curve and a measured table on the
test split, including the untrained model, with 95% intervals. With `import_paths` set, the models are
imported from local weights (HF safetensors folders or GGUF files) instead, and scored the same way.
"""
from __future__ import annotations

import copy

from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.cognate.mixes import SOURCES, source_rows, tokenizer_corpus
from services.cognate.scoring import EASY_ARITHMETIC, majority_baseline, score_model
from shared.comparison import bootstrap_accuracy_difference, bootstrap_bpb, text_blocks
from shared.models import build_model, count_parameters, get_preset, import_weights
from shared.phase import ForgedModel, Phase, PhaseConfig, PhaseResult, ProgressFn, no_progress
from shared.tokenizer import train_tokenizer
from shared.training import TrainingConfig, train_causal_lm

BASE = "base"
SPECIALITY = {"specialist-reasoning": "reasoning", "specialist-text": "text", "specialist-tools": "tools"}


class Specialist(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    mix: dict[str, float]  # source -> weight
    learning_rate: float = Field(gt=0)
    seed: int


DEFAULT_SPECIALISTS = (
    Specialist(name="specialist-reasoning", mix={"text": 0.1, "reasoning": 0.8, "tools": 0.1}, learning_rate=2e-3, seed=11),
    Specialist(name="specialist-text", mix={"text": 0.7, "reasoning": 0.2, "tools": 0.1}, learning_rate=3e-3, seed=12),
    Specialist(name="specialist-tools", mix={"text": 0.1, "reasoning": 0.2, "tools": 0.7}, learning_rate=1.5e-3, seed=13),
)


class CognateConfig(PhaseConfig):
    preset: str = "tiny"
    base_steps: int = Field(300, ge=1)
    base_mix: dict[str, float] = {"text": 0.35, "reasoning": 0.45, "tools": 0.2}
    base_learning_rate: float = Field(3e-3, gt=0)
    specialist_steps: int = Field(150, ge=1)
    specialists: tuple[Specialist, ...] = DEFAULT_SPECIALISTS
    batch_size: int = Field(16, ge=1)
    warmup_steps: int = Field(20, ge=0)
    eval_every: int = Field(50, ge=1)
    task_examples: int = Field(40_000, ge=1)  # training examples drawn per task source
    curve_rows: int = Field(16, ge=1)  # validation rows per source for the held-out curves
    text_documents: int | None = Field(None, ge=1)  # use only the first N training works (micro runs)
    threads: int = Field(2, ge=1)  # torch threads for training
    score: bool = True  # measure the test table (off only for micro runs in unit tests)
    # Name -> local weights (HF folder or .gguf): import these instead of training (names as the outputs).
    import_paths: dict[str, str] = {}

    @field_validator("specialists")
    @classmethod
    def _three_known(cls, specialists: tuple[Specialist, ...]) -> tuple[Specialist, ...]:
        if sorted(s.name for s in specialists) != sorted(SPECIALITY):
            raise ValueError(f"specialists must be exactly {sorted(SPECIALITY)}, got {[s.name for s in specialists]}")
        for s in specialists:
            if unknown := set(s.mix) - set(SOURCES):
                raise ValueError(f"{s.name}: unknown sources {sorted(unknown)}; known: {SOURCES}")
        return specialists

    @field_validator("import_paths")
    @classmethod
    def _imports_name_specialists(cls, paths: dict[str, str]) -> dict[str, str]:
        if paths and not set(SPECIALITY) <= set(paths) <= {BASE, *SPECIALITY}:
            raise ValueError(f"import_paths must name {sorted(SPECIALITY)} (and optionally {BASE!r}), got {sorted(paths)}")
        return paths


class CognatePhase(Phase):
    name = "cognate"
    version = "1"
    Config = CognateConfig

    def transform(self, models: list[ForgedModel], config: CognateConfig, progress: ProgressFn = no_progress) -> PhaseResult:
        if models:
            raise ValueError("Cognate is the first phase and takes no input models; to start from weights, set import_paths")
        if config.import_paths:
            forged = [import_weights(path, name) for name, path in config.import_paths.items()]
            report, untrained = {"source": "import", "import_paths": config.import_paths}, None
        else:
            forged, report, untrained = _train(config, progress)
        if config.score:
            report["table"], report["speciality"] = _score(forged, untrained, progress)
            report["summary"] = _summary(report["table"], report["speciality"])
        progress(1.0, "cognate done")
        return PhaseResult(models=forged, report=report)


def _train(config: CognateConfig, progress: ProgressFn) -> tuple[list[ForgedModel], dict, ForgedModel]:
    """The base and the specialists, their curves, and the base's initial weights (the untrained baseline)."""
    shape = get_preset(config.preset)
    progress(0.0, "training the tokenizer")
    corpus = tokenizer_corpus(config.task_examples, config.seed, config.text_documents)
    tokenizer = train_tokenizer(corpus, shape.vocab_size, shape.max_positions)
    train_rows = source_rows(tokenizer, "train", config.task_examples, shape.max_positions, config.seed, config.text_documents)
    validation = source_rows(tokenizer, "validation", config.curve_rows * 40, shape.max_positions, config.seed)
    curve_rows = {name: rows[: config.curve_rows] for name, rows in validation.items()}
    pad = tokenizer.pad_token_id

    base = build_model(shape, len(tokenizer), config.seed, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
    untrained = copy.deepcopy(base)
    total_steps = config.base_steps + config.specialist_steps * len(config.specialists)
    done = 0

    def stage(label: str, steps: int) -> ProgressFn:
        offset = done
        return lambda fraction, message: progress(0.8 * (offset + fraction * steps) / total_steps, f"{label}: {message}")

    def run(model, mix, learning_rate, seed, steps, label):
        nonlocal done
        training = TrainingConfig(steps=steps, batch_size=config.batch_size, learning_rate=learning_rate,
                                  warmup_steps=min(config.warmup_steps, steps - 1), eval_every=config.eval_every, seed=seed,
                                  threads=config.threads)
        curve = train_causal_lm(model, train_rows, mix, training, pad_id=pad, eval_sets=curve_rows, progress=stage(label, steps))
        done += steps
        return {"mix": mix, "training": training.model_dump(), "curve": curve.as_report()}

    curves = {BASE: run(base, config.base_mix, config.base_learning_rate, config.seed, config.base_steps, BASE)}
    forged = [ForgedModel(base, tokenizer, BASE)]
    for spec in config.specialists:
        specialist = copy.deepcopy(base)
        curves[spec.name] = run(specialist, spec.mix, spec.learning_rate, spec.seed, config.specialist_steps, spec.name)
        forged.append(ForgedModel(specialist, tokenizer, spec.name))
    specialist_seconds = sum(curves[s.name]["curve"]["seconds"] for s in config.specialists)
    report = {
        "source": "train",
        "preset": config.preset,
        "parameters": count_parameters(base),
        "vocab_size": len(tokenizer),
        "rows": {name: len(rows) for name, rows in train_rows.items()},
        "curves": curves,
        "base_seconds": curves[BASE]["curve"]["seconds"],
        "specialists_seconds": round(specialist_seconds, 2),
    }
    return forged, report, ForgedModel(untrained, tokenizer, "untrained")


def _summary(table: dict, speciality: dict) -> dict:
    """The headline numbers: test bits per byte of every model, each specialist's score on its speciality."""
    summary = {f"{name}.test_bpb": round(row["text"]["bits_per_byte"], 4)
               for name, row in table.items() if name != "majority_baseline"}
    for name, won in speciality.items():
        if won["area"] != "text":  # the text specialist's score is its test_bpb, already above
            summary[f"{name}.{won['area']}_exact_match"] = round(won["score"], 4)
    summary["each_specialist_best_on_its_speciality"] = all(
        won["best_with_95pct_significance"] for won in speciality.values())
    return summary


def _score(forged: list[ForgedModel], untrained: ForgedModel | None, progress: ProgressFn) -> tuple[dict, dict]:
    """The measured table (every model, the untrained one first) and, for each specialist, its paired
    comparison with both siblings on its own speciality: the difference and its 95% bootstrap interval
    over test blocks (text) or test problems (reasoning, tools). It wins if every interval excludes zero
    on its side."""
    blocks = text_blocks("test")
    scored = [untrained] if untrained is not None else []
    scored += forged
    table, items = {}, {}
    for i, m in enumerate(scored):
        progress(0.8 + 0.2 * i / len(scored), f"scoring {m.name}")
        table[m.name], items[m.name] = score_model(m.model, m.tokenizer, blocks)
    table["majority_baseline"] = {"arithmetic_easy": majority_baseline(*EASY_ARITHMETIC)}

    speciality = {}
    for name, area in SPECIALITY.items():
        versus = {}
        for other in (o for o in SPECIALITY if o != name):
            if area == "text":  # lower is better
                difference, low, high = bootstrap_bpb(items[name].blocks, items[other].blocks)
                versus[other] = {"bpb_difference": difference, "ci_low": low, "ci_high": high, "significant": high < 0}
            else:
                difference, low, high = bootstrap_accuracy_difference(items[name].correct[area], items[other].correct[area])
                versus[other] = {"exact_match_difference": difference, "ci_low": low, "ci_high": high, "significant": low > 0}
        score = table[name]["text"]["bits_per_byte"] if area == "text" else table[name][area]["exact_match"]
        speciality[name] = {"area": area, "score": score, "versus": versus,
                            "best_with_95pct_significance": all(v["significant"] for v in versus.values())}
    return table, speciality
