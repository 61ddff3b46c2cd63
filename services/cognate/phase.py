"""Phase 1, Cognate: the specialists the later phases merge, trained from one shared base.

Models trained from unrelated random initialisations cannot be merged meaningfully (their hidden units are
permuted differently), so Cognate trains one base on a balanced mix of the skills (shared.data.skills:
English text, reasoning tasks, calculator calls), then fine-tunes three copies of it on skewed mixes, each
with its own seed and learning rate: specialist-reasoning, specialist-text, specialist-tools. Beside them
it trains the baseline a reviewer asks for first: "multitask", the base fine-tuned on the union of the
specialists' data (the mean of their mixes) for the specialists' total steps, so that a merge of the
specialists can be judged against training one model on everything at equal compute.

The output is the base (task-vector merges need it), the three specialists and the multitask model. The
report holds every training curve and the shared scorecard (shared.scorecard, test split) of every model
and of the untrained one, the majority-answer baseline, and each specialist's paired comparison with its
siblings on its own speciality. With `import_paths` set, the models are imported from local weights (HF
safetensors folders or GGUF files) instead, and scored the same way.

Seeds: `seed` sets the tokenizer's data, the base's initialisation and data; each specialist's training
seed is seed * 100 + its seed_offset, so a pipeline seed gives a whole new family.
"""
from __future__ import annotations

import copy

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.data.skills import SKILLS, check_mix, skill_rows, skill_texts
from shared.models import build_model, count_parameters, get_preset, import_weights
from shared.phase import ForgedModel, Phase, PhaseConfig, PhaseResult, ProgressFn, no_progress
from shared.scorecard import ScorecardSpec, majority_card, paired_difference, report_section, score
from shared.tokenizer import train_tokenizer
from shared.training import TrainingConfig, train_causal_lm

BASE = "base"
MULTITASK = "multitask"
UNTRAINED = "untrained"
MAJORITY = "majority"
SPECIALITY = {"specialist-reasoning": "reasoning", "specialist-text": "text", "specialist-tools": "tools"}
# The scorecard metric each speciality is judged on.
SPECIALITY_METRIC = {"reasoning": "reasoning.task_success", "text": "text.bits_per_byte", "tools": "tools.task_success"}


class Specialist(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    mix: dict[str, float]  # source -> weight
    learning_rate: float = Field(gt=0)
    seed_offset: int  # training seed = the phase's seed * 100 + this


DEFAULT_SPECIALISTS = (
    Specialist(name="specialist-reasoning", mix={"text": 0.1, "reasoning": 0.8, "tools": 0.1}, learning_rate=2e-3, seed_offset=11),
    Specialist(name="specialist-text", mix={"text": 0.7, "reasoning": 0.2, "tools": 0.1}, learning_rate=3e-3, seed_offset=12),
    Specialist(name="specialist-tools", mix={"text": 0.1, "reasoning": 0.2, "tools": 0.7}, learning_rate=1.5e-3, seed_offset=13),
)


class CognateConfig(PhaseConfig):
    preset: str = "tiny"
    # Steps, tuned on the validation split: with a 300-step base and 300-step specialists each specialist won its
    # speciality but drifted so far that no merge beat the text specialist; with 150-step specialists on a
    # 300-step base the reasoning specialist did not win. A 600-step base already holds every skill in part,
    # its 150-step specialists each win their own (validation), and merging them then beats each of them.
    base_steps: int = Field(600, ge=1)
    base_mix: dict[str, float] = {"text": 0.35, "reasoning": 0.45, "tools": 0.2}
    base_learning_rate: float = Field(3e-3, gt=0)
    specialist_steps: int = Field(150, ge=1)
    specialists: tuple[Specialist, ...] = DEFAULT_SPECIALISTS
    # The multitask baseline: the union mix for the specialists' total steps, at their median learning rate.
    multitask: bool = True
    multitask_learning_rate: float = Field(2e-3, gt=0)
    multitask_seed_offset: int = 14
    batch_size: int = Field(16, ge=1)
    warmup_steps: int = Field(20, ge=0)
    eval_every: int = Field(50, ge=1)
    task_examples: int = Field(40_000, ge=1)  # training examples drawn per task source
    curve_rows: int = Field(16, ge=1)  # validation rows per source for the held-out curves
    text_chars: int | None = Field(None, ge=1)  # use only this much of the training text (micro runs)
    threads: int = Field(2, ge=1)  # torch threads for training
    score: bool = True  # measure the scorecard (off only for micro runs in unit tests)
    scorecard: ScorecardSpec = ScorecardSpec()
    # Name -> local weights (HF folder or .gguf): import these instead of training (names as the outputs).
    import_paths: dict[str, str] = {}

    @field_validator("base_mix")
    @classmethod
    def _known_base_mix(cls, mix: dict[str, float]) -> dict[str, float]:
        return check_mix(mix)

    @field_validator("specialists")
    @classmethod
    def _three_known(cls, specialists: tuple[Specialist, ...]) -> tuple[Specialist, ...]:
        if sorted(s.name for s in specialists) != sorted(SPECIALITY):
            raise ValueError(f"specialists must be exactly {sorted(SPECIALITY)}, got {[s.name for s in specialists]}")
        for s in specialists:
            try:
                check_mix(s.mix)
            except ValueError as error:
                raise ValueError(f"{s.name}: {error}") from None
        return specialists

    @field_validator("import_paths")
    @classmethod
    def _imports_name_specialists(cls, paths: dict[str, str]) -> dict[str, str]:
        if paths and not set(SPECIALITY) <= set(paths) <= {BASE, MULTITASK, *SPECIALITY}:
            raise ValueError(f"import_paths must name {sorted(SPECIALITY)} (and optionally {BASE!r}, {MULTITASK!r}), "
                             f"got {sorted(paths)}")
        return paths


def union_mix(specialists: tuple[Specialist, ...]) -> dict[str, float]:
    """The mix of the specialists' data pooled: each source's mean weight over the specialists."""
    return {source: sum(s.mix.get(source, 0.0) for s in specialists) / len(specialists) for source in SKILLS}


class CognatePhase(Phase):
    name = "cognate"
    version = "2"  # 2: problem-level splits, the multitask output, the shared scorecard
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
            report["scorecard"], report["speciality"] = _score(forged, untrained, config.scorecard, progress)
            report["summary"] = _summary(report["scorecard"], report["speciality"])
        progress(1.0, "cognate done")
        return PhaseResult(models=forged, report=report)


def _tokenizer_corpus(config: CognateConfig) -> list[str]:
    """What the tokenizer is trained on: the English training text and the task formats."""
    texts = skill_texts("train", config.task_examples, config.seed, config.text_chars)
    return [*texts["text"], *texts["reasoning"], *texts["tools"]]


def _train(config: CognateConfig, progress: ProgressFn) -> tuple[list[ForgedModel], dict, ForgedModel]:
    """The base, the specialists and the multitask model, their curves, and the base's initial weights
    (the untrained baseline)."""
    shape = get_preset(config.preset)
    progress(0.0, "training the tokenizer")
    tokenizer = train_tokenizer(_tokenizer_corpus(config), shape.vocab_size, shape.max_positions)
    train_rows = skill_rows(tokenizer, "train", config.task_examples, shape.max_positions, config.seed, config.text_chars)
    validation = skill_rows(tokenizer, "validation", config.curve_rows * 40, shape.max_positions, config.seed)
    curve_rows = {name: rows[: config.curve_rows] for name, rows in validation.items()}
    pad = tokenizer.pad_token_id

    base = build_model(shape, len(tokenizer), config.seed, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
    untrained = copy.deepcopy(base)
    fine_tunes = [(s.name, s.mix, s.learning_rate, s.seed_offset, config.specialist_steps) for s in config.specialists]
    if config.multitask:
        fine_tunes.append((MULTITASK, union_mix(config.specialists), config.multitask_learning_rate,
                           config.multitask_seed_offset, config.specialist_steps * len(config.specialists)))
    total_steps = config.base_steps + sum(steps for *_, steps in fine_tunes)
    done = 0

    def stage(label: str, steps: int) -> ProgressFn:
        offset = done
        return lambda fraction, message: progress(0.7 * (offset + fraction * steps) / total_steps, f"{label}: {message}")

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
    for name, mix, learning_rate, seed_offset, steps in fine_tunes:
        model = copy.deepcopy(base)
        curves[name] = run(model, mix, learning_rate, config.seed * 100 + seed_offset, steps, name)
        forged.append(ForgedModel(model, tokenizer, name))
    report = {
        "source": "train",
        "preset": config.preset,
        "parameters": count_parameters(base),
        "vocab_size": len(tokenizer),
        "rows": {name: len(rows) for name, rows in train_rows.items()},
        "curves": curves,
        "base_seconds": curves[BASE]["curve"]["seconds"],
        "specialists_seconds": round(sum(curves[s.name]["curve"]["seconds"] for s in config.specialists), 2),
    }
    return forged, report, ForgedModel(untrained, tokenizer, UNTRAINED)


def _score(forged: list[ForgedModel], untrained: ForgedModel | None, spec: ScorecardSpec,
           progress: ProgressFn) -> tuple[dict, dict]:
    """The scorecard of every model (the untrained one first) with the majority baseline, and each
    specialist's paired comparison with both siblings on its speciality: it is the best if every paired
    95% interval lies on its side of zero."""
    scored = ([untrained] if untrained is not None else []) + forged
    cards = {}
    for i, m in enumerate(scored):
        share = 0.3 / len(scored)
        cards[m.name] = score(m.model, m.tokenizer, spec,
                              lambda f, msg, i=i: progress(0.7 + share * (i + f), f"{m.name}: {msg}"))
    cards[MAJORITY] = majority_card(spec)
    names = [m.name for m in forged]
    baselines = [name for name in (UNTRAINED, MAJORITY, MULTITASK) if name in cards]
    section = report_section(spec, cards, inputs=[UNTRAINED] if untrained is not None else [],
                             outputs=names, baselines=baselines)

    speciality = {}
    for name, area in SPECIALITY.items():
        metric = SPECIALITY_METRIC[area]
        versus = {other: paired_difference(cards[name], cards[other], metric) for other in SPECIALITY if other != name}
        speciality[name] = {"area": area, "metric": metric, "score": cards[name]["metrics"][metric]["value"],
                            "versus": versus,
                            "best_with_95pct_significance": all(v["verdict"] == "better" for v in versus.values())}
    return section, speciality


def _summary(section: dict, speciality: dict) -> dict:
    """The headline numbers: every model's test bits per byte and mean task success, each specialist's
    score on its speciality, and whether each is best on it."""
    summary = {}
    for name, card in section["cards"].items():
        metrics = card["metrics"]
        if "text.bits_per_byte" in metrics:
            summary[f"{name}.bpb"] = round(metrics["text.bits_per_byte"]["value"], 4)
        summary[f"{name}.mean_task_success"] = round(metrics["tasks.mean_task_success"]["value"], 4)
    for name, won in speciality.items():
        if won["area"] != "text":  # the text specialist's score is its bpb, already above
            summary[f"{name}.{won['metric']}"] = round(won["score"], 4)
    summary["each_specialist_best_on_its_speciality"] = all(won["best_with_95pct_significance"] for won in speciality.values())
    return summary
