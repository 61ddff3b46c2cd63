"""Phase 6, tool and persona baking: what a prompt makes the model do, moved into its ternary weights.

Prompt baking (Bhargava et al. 2024): train the un-prompted model to match the prompted one, minimising
KL(P(. | prompt, x) || P_baked(. | x)) on trajectories the prompted model samples (trajectories.py,
objective.py). The teacher is the frozen input; the student is the input with a low-rank update of each
ternary layer, folded into the latent weights at the end (student.py), so the model handed on is ternary
and every number below is measured on it, after folding. The step with the best validation KL is kept
(half-baking is stopping earlier).

In order:
1. Screening (validation split): each prompt's behaviour (behaviour.py) with and without it, on the input.
   A prompt that moves none of its measures is reported and not baked (`screen`).
2. Trajectories from the prompted input on training-split inputs (baking) and validation ones (keeping the
   best step), as configured (`sampling`).
3. Baking all kept prompts at once: each step draws trajectories of every prompt alike, and of the anchor
   (`anchor`: the input's own trajectories without a prompt on the scorecard's tasks and on play text, a
   deviation from the paper, which bakes on prompted trajectories alone; see BakingConfig.anchor).
4. Report (test split): per prompt, KL(prompted input || input, no prompt) against KL(prompted input ||
   baked, no prompt) on test trajectories; the behaviour of the input without and with the prompt and of the
   baked model without it, paired; the shared scorecard of input and output, and whether baking cost any
   headline metric more than the stated tolerance; the ternary check (packed size, packed logits).
"""
from __future__ import annotations

import dataclasses

import torch
from pydantic import Field, field_validator

from services.baking.behaviour import changes_behaviour, measure, paired
from services.baking.objective import PromptKL
from services.baking.prompts import DEFAULT_PROMPTS, PromptConfig, dialogue_inputs, prompt_examples, prompt_inputs
from services.baking.student import LoraSettings, StudentKind, fold, make_student, trainable_parameters
from services.baking.trajectories import (SamplingConfig, at_most, check_prompt, input_room, sample_trajectories,
                                         teacher_rows)
from shared.phase import ForgedModel, Phase, PhaseConfig, PhaseResult, ProgressFn, no_progress, one_ternary_model
from shared.scorecard import (TEXT_METRIC, ScorecardSpec, compare, headline_figures, lower_is_better, report_section,
                              score)
from shared.ternary.bitlinear import trainable_ternary
from shared.ternary.packed_model import PACKED_FILE, pack_model, ternary_check
from shared.ternary.packing import get_codec
from shared.data.tasks import make_examples
from shared.training import TrainingConfig, train_causal_lm

SPLIT_SEED_OFFSET = {"train": 0, "validation": 1, "test": 2}  # trajectories of each split draw their own samples
# "Far below": the baked student's held-out KL at most this fraction of the un-prompted input's.
FAR_BELOW = 0.5
SAMPLES_SHOWN = 3
ANCHOR = "anchor"


class BakingConfig(PhaseConfig):
    prompts: tuple[PromptConfig, ...] = DEFAULT_PROMPTS
    student: StudentKind = "latent_lora"
    lora: LoraSettings = LoraSettings()
    training: TrainingConfig = TrainingConfig(steps=150, batch_size=16, learning_rate=2e-3, warmup_steps=10,
                                              eval_every=25, weight_decay=0.0)
    sampling: SamplingConfig = SamplingConfig()
    train_inputs: int = Field(384, ge=1)  # per prompt (per task of a tools prompt)
    validation_inputs: int = Field(128, ge=1)
    test_inputs: int = Field(300, ge=1)
    excerpt_chars: int = Field(240, ge=16)  # longest play excerpt a persona input may be
    screen: bool = True  # bake only prompts that measurably change the prompted input's behaviour (validation)
    # The anchor (our addition to the paper's objective): KL to the input itself, no prompt, on its own
    # trajectories for `anchor_inputs` problems of each scorecard task and as many play excerpts, drawn at
    # `anchor_weight` against each prompt's 1. Without it, baking the calculator instruction into requests
    # cost the other tasks on the scorecard (README, Baking: the no_anchor run).
    anchor: bool = True
    anchor_inputs: int = Field(64, ge=1)
    anchor_weight: float = Field(1.0, gt=0)
    # Largest cost on a headline scorecard metric (point estimate, test split) that baking may have and still
    # count as harmless: bits per byte, and success rate.
    tolerance_bits_per_byte: float = Field(0.02, ge=0)
    tolerance_task_success: float = Field(0.02, ge=0)
    packing: str = "base3"
    scorecard: ScorecardSpec = ScorecardSpec()

    @field_validator("prompts")
    @classmethod
    def _distinct_prompts(cls, prompts: tuple[PromptConfig, ...]) -> tuple[PromptConfig, ...]:
        if not prompts:
            raise ValueError("baking needs at least one prompt")
        names = [prompt.name for prompt in prompts]
        if len(set(names)) != len(names):
            raise ValueError(f"prompt names must be distinct, got {names}")
        return prompts


def anchor_streams(config: BakingConfig, tokenizer, context: int) -> dict[str, tuple[str, bool, dict[str, list[str]]]]:
    """The anchor's inputs, no prompt: problems of each scorecard task (with the calculator) and play excerpts
    (those that fit the context before a speech)."""
    task_inputs = {split: [e.prompt for suite, level, _ in config.scorecard.tasks
                           for e in make_examples(suite, level, split, config.anchor_inputs, config.seed, allow_fewer=True)]
                   for split in SPLIT_SEED_OFFSET}
    fits = at_most(tokenizer, context - config.sampling.speech_tokens)
    text_inputs = {split: dialogue_inputs(split, config.anchor_inputs, config.seed, config.excerpt_chars, fits)
                   for split in SPLIT_SEED_OFFSET}
    return {f"{ANCHOR}.tasks": ("", True, task_inputs), f"{ANCHOR}.text": ("", False, text_inputs)}


def scorecard_cost(comparison: dict, config: BakingConfig) -> dict:
    """Per headline metric, how much worse the baked model is than its input (point estimate; negative is a
    gain) against the stated tolerance."""
    metrics = {}
    for name in comparison["headline"]:
        difference = comparison["metrics"][name]
        cost = difference["difference"] if lower_is_better(name) else -difference["difference"]
        tolerance = config.tolerance_bits_per_byte if name == TEXT_METRIC else config.tolerance_task_success
        metrics[name] = {"cost": cost, "tolerance": tolerance, "within": cost <= tolerance, "verdict": difference["verdict"]}
    return {"metrics": metrics, "within_tolerance": all(m["within"] for m in metrics.values())}


class BakingPhase(Phase):
    name = "baking"
    version = "1"
    Config = BakingConfig

    def transform(self, models: list[ForgedModel], config: BakingConfig, progress: ProgressFn = no_progress) -> PhaseResult:
        forged = one_ternary_model(models, self.name)
        tokenizer = forged.tokenizer
        input_model = trainable_ternary(forged.model).eval()
        context = input_model.config.max_position_embeddings
        sizes = {"train": config.train_inputs, "validation": config.validation_inputs, "test": config.test_inputs}
        # Play excerpts are drawn among those that fit the context with the prompt and a trajectory.
        fits = {p.name: at_most(tokenizer, input_room(tokenizer, p, config.sampling, context)) for p in config.prompts}
        inputs = {p.name: {split: prompt_inputs(p, split, n, config.seed, config.excerpt_chars, fits[p.name])
                           for split, n in sizes.items()}
                  for p in config.prompts}
        examples = {p.name: {split: prompt_examples(p, split, sizes[split], config.seed) for split in ("validation", "test")}
                    for p in config.prompts}
        for prompt in config.prompts:  # before any work: a prompt too long for the model is a config error
            check_prompt(tokenizer, prompt, [text for split in inputs[prompt.name].values() for text in split],
                         config.sampling, context)

        def behaviour(model, prompt: PromptConfig, split: str, prompted: bool) -> dict:
            return measure(model, tokenizer, prompt, inputs[prompt.name][split], examples[prompt.name][split], prompted,
                           config.sampling.answer_tokens, config.sampling.max_calls, config.sampling.speech_tokens)

        progress(0.0, "screening the prompts on validation")
        screening = {}
        for prompt in config.prompts:
            differences = paired(behaviour(input_model, prompt, "validation", True),
                                 behaviour(input_model, prompt, "validation", False), f"validation/{prompt.name}")
            screening[prompt.name] = {"prompted_against_unprompted": differences,
                                      "changes_behaviour": changes_behaviour(differences)}
        baked = [p for p in config.prompts if screening[p.name]["changes_behaviour"] or not config.screen]
        report: dict = {"screening": screening, "baked_prompts": [p.name for p in baked],
                        "skipped_prompts": [p.name for p in config.prompts if p not in baked]}

        output = input_model
        if baked:
            output, report["baking"], test_rows = self._bake(forged, input_model, baked, inputs, config, progress)
        report["test"] = {}
        for prompt in config.prompts:  # skipped prompts too: what baking the others did to their behaviour
            progress(0.8, f"{prompt.name}: behaviour on test")
            flags = {"input": behaviour(input_model, prompt, "test", False),
                     "prompted_input": behaviour(input_model, prompt, "test", True)}
            if baked:
                flags["baked"] = behaviour(output, prompt, "test", False)
            item_set = f"test/{prompt.name}"
            report["test"][prompt.name] = {
                "means": {model: {name: sum(v) / len(v) for name, v in measures.items()} for model, measures in flags.items()},
                "prompted_against_input": paired(flags["prompted_input"], flags["input"], item_set),
            }
            if baked:
                report["test"][prompt.name].update({
                    "baked_against_input": paired(flags["baked"], flags["input"], item_set),
                    "baked_against_prompted": paired(flags["baked"], flags["prompted_input"], item_set)})
            if prompt in baked:
                report["test"][prompt.name]["kl"] = report["baking"]["test_kl"][prompt.name]

        progress(0.9, "scorecard")
        cards = {"input": score(input_model, tokenizer, config.scorecard, lambda f, m: progress(0.9, f"input: {m}"))}
        if baked:
            cards["baked"] = score(output, tokenizer, config.scorecard, lambda f, m: progress(0.95, f"baked: {m}"))
            report["against_input"] = compare(cards["baked"], cards["input"])
            report["scorecard_cost"] = scorecard_cost(report["against_input"], config)
            report["ternary"] = ternary_check(input_model, output, config.packing, test_rows[:8], tokenizer.pad_token_id)
        report["scorecard"] = report_section(config.scorecard, cards, inputs=["input"], outputs=["baked" if baked else "input"])
        report["summary"] = _summary(report)
        progress(1.0, "packed")
        with torch.no_grad():
            packed = pack_model(output, get_codec(config.packing))
        result = dataclasses.replace(forged, model=output)  # tokenizer, name and carried files go on
        return PhaseResult(models=[result], report=report, extra_files={forged.name: {PACKED_FILE: packed}})

    def _bake(self, forged: ForgedModel, input_model, prompts: list[PromptConfig], inputs: dict, config: BakingConfig,
              progress: ProgressFn) -> tuple[torch.nn.Module, dict, list]:
        """The baked, folded model; the baking report; the test trajectories' rows (as the student reads them)."""
        tokenizer = forged.tokenizer
        streams = {prompt.name: (prompt.text, prompt.kind == "tools", inputs[prompt.name]) for prompt in prompts}
        if config.anchor:
            streams.update(anchor_streams(config, tokenizer, input_model.config.max_position_embeddings))
        rows, samples = {}, {}
        for split, offset in SPLIT_SEED_OFFSET.items():
            rows[split] = {}
            for name, (prefix, uses_tools, texts_of) in streams.items():
                progress(0.1 + 0.1 * offset / 3, f"{name}: sampling {split} trajectories")
                texts = texts_of[split]
                trajectories = sample_trajectories(input_model, tokenizer, prefix, texts, uses_tools, config.sampling,
                                                   config.seed + offset)
                rows[split][name] = teacher_rows(tokenizer, prefix, texts, trajectories)
                if split == "test":
                    samples[name] = [{"input": x, "trajectory": y} for x, y in list(zip(texts, trajectories))[:SAMPLES_SHOWN]]
        mix = {name: config.anchor_weight if name.startswith(ANCHOR) else 1.0 for name in rows["train"]}
        objective = PromptKL(input_model, rows["train"], mix, tokenizer.pad_token_id)
        student = make_student(trainable_ternary(forged.model), config.student, config.lora, config.seed)
        validation = [row for stream_rows in rows["validation"].values() for row in stream_rows]
        curve = train_causal_lm(student, None, None, config.training, pad_id=tokenizer.pad_token_id,
                                eval_sets={"validation": validation}, feed=objective,
                                progress=lambda f, m: progress(0.2 + 0.55 * f, f"baking: {m}"), step_loss=objective,
                                eval_loss=objective.mean, keep_best="validation")
        before_fold = objective.mean(student, validation)
        trainable = trainable_parameters(student)
        output = fold(student, config.student)
        after_fold = objective.mean(output, validation)
        test_kl = {}
        for prompt in prompts:
            progress(0.75, f"{prompt.name}: KL on test")
            input_kl, baked_kl = objective.mean(input_model, rows["test"][prompt.name]), objective.mean(output, rows["test"][prompt.name])
            test_kl[prompt.name] = {"teacher_to_input": input_kl, "teacher_to_baked": baked_kl, "ratio": baked_kl / input_kl,
                                    "far_below": baked_kl <= FAR_BELOW * input_kl}
        for name in rows["test"]:  # how far the baked model moved from the input where no prompt asked it to
            if name.startswith(ANCHOR):
                test_kl[name] = {"input_to_baked": objective.mean(output, rows["test"][name])}
        return output, {
            "student": {"kind": config.student, "trainable_parameters": trainable, **config.lora.model_dump()},
            "curve": curve.as_report(),
            "fold": {"validation_kl_before_fold": before_fold, "validation_kl_after_fold": after_fold},
            "test_kl": test_kl,
            "mix": mix,
            "trajectories": {split: {name: len(r) for name, r in by_prompt.items()} for split, by_prompt in rows.items()},
            "samples": samples,
        }, [row for prompt_rows in rows["test"].values() for row in prompt_rows]


def _summary(report: dict) -> dict:
    summary = {"baked_prompts": report["baked_prompts"], "skipped_prompts": report["skipped_prompts"],
               **headline_figures(report["scorecard"]["cards"])}
    for prompt, test in report["test"].items():
        if "kl" in test:
            summary[f"{prompt}.kl_input"] = round(test["kl"]["teacher_to_input"], 4)
            summary[f"{prompt}.kl_baked"] = round(test["kl"]["teacher_to_baked"], 4)
        for measure_name, difference in test.get("baked_against_input", {}).items():
            summary[f"{prompt}.{measure_name}"] = f"{difference['reference']:.3f} -> {difference['value']:.3f} ({difference['verdict']})"
    if "scorecard_cost" in report:
        summary["within_tolerance"] = report["scorecard_cost"]["within_tolerance"]
        summary["packed_logits_max_abs_diff"] = report["ternary"]["packed_logits_max_abs_diff"]
    return summary
