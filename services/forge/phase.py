"""Phase 5, Forge training: BitNet's ternary model in, the same ternary model trained further out.

The forward pass stays BitNet b1.58 throughout (every BitLinear at quant strength 1); the latent float
weights learn through the straight-through estimator, so what is handed on is still ternary: its packed
file is the input's size, and the report checks that the packed model computes the checkpoint's logits.
Training is the shared loop (shared.training) on every skill the input has, with four mechanisms, each
with a switch:

    grokfast      the slow-gradient EMA filter (shared.grokfast), in the shared loop
    curriculum    the edge-of-chaos controller moving the reasoning rows' level (curriculum.py)
    self_model    an auxiliary head predicting the model's own per-token loss (self_model.py)
    dream         replay of earlier real rows and of the model's own samples (dream.py)

The report measures, on the shared scorecard (test split), the input and the output and, with `ablations`
on, the same run with each mechanism off in turn and with all off, at equal steps, data and seed: paired
95% intervals of the output against each. Loss curves, the curriculum's level over time and its
measurements, and the self-model's error are in the report too.
"""
from __future__ import annotations

import dataclasses

import torch
from pydantic import Field, field_validator

from services.forge.curriculum import CurriculumConfig, EdgeOfChaosController
from services.forge.dream import DreamConfig, ReplayBuffer
from services.forge.feed import CURRICULUM_SOURCE, ForgeFeed
from services.forge.self_model import SelfModelConfig, SelfModelingLM, self_modeling_loss
from shared.calculator import result_spans
from shared.data.skills import check_mix, skill_rows, task_texts
from shared.grokfast import GrokfastConfig
from shared.phase import ForgedModel, Phase, PhaseConfig, PhaseResult, ProgressFn, no_progress, one_ternary_model
from shared.scorecard import ScorecardSpec, compare, report_section, score
from shared.ternary.bitlinear import trainable_ternary
from shared.ternary.packed_model import PACKED_FILE, pack_model, ternary_check
from shared.ternary.packing import get_codec
from shared.training import TrainingConfig, encode_texts, mean_loss, train_causal_lm

MECHANISMS = ("grokfast", "curriculum", "self_model", "dream")


class ForgeConfig(PhaseConfig):
    training: TrainingConfig = TrainingConfig(steps=200, learning_rate=5e-4, warmup_steps=20, eval_every=50,
                                              grokfast=GrokfastConfig(enabled=True))
    curriculum: CurriculumConfig = CurriculumConfig()
    self_model: SelfModelConfig = SelfModelConfig()
    dream: DreamConfig = DreamConfig()
    # Also train with each mechanism off in turn and with all off (equal steps), and score each.
    ablations: bool = True
    seq_len: int = Field(128, ge=8)
    mix: dict[str, float] = {"tools": 0.3, "reasoning": 0.4, "text": 0.3}
    train_text_chars: int = Field(2_000_000, ge=1)
    task_examples: int = Field(4000, ge=1)
    held_out_rows: int = Field(64, ge=1)
    packing: str = "base3"
    scorecard: ScorecardSpec = ScorecardSpec()

    @field_validator("mix")
    @classmethod
    def _known_mix(cls, mix: dict[str, float]) -> dict[str, float]:
        return check_mix(mix)

    def switches(self) -> dict[str, bool]:
        return {"grokfast": self.training.grokfast.enabled, "curriculum": self.curriculum.enabled,
                "self_model": self.self_model.enabled, "dream": self.dream.enabled}


def ablation_variants(switches: dict[str, bool]) -> dict[str, dict[str, bool]]:
    """The runs of the ablation: each mechanism the config switches on, off in turn; then all off."""
    variants = {f"no_{name}": {**switches, name: False} for name, on in switches.items() if on}
    variants["all_off"] = dict.fromkeys(switches, False)
    return variants


def forge_train(model, tokenizer, switches: dict[str, bool], config: ForgeConfig, train: dict, level_pools: dict,
                held_out: dict, progress: ProgressFn = no_progress) -> dict:
    """Train `model` (a trainable ternary one) in place with the mechanisms `switches` turns on; its report."""
    training = config.training.model_copy(update={"grokfast": config.training.grokfast.model_copy(
        update={"enabled": switches["grokfast"]})})
    controller = EdgeOfChaosController(config.curriculum, seed=config.seed) if switches["curriculum"] else None
    replay = ReplayBuffer(config.dream, seed=config.seed) if switches["dream"] else None
    feed = ForgeFeed(train, config.mix, lm=model, tokenizer=tokenizer, controller=controller, replay=replay,
                     level_pools=level_pools if controller else None)
    trainee = SelfModelingLM(model, config.self_model) if switches["self_model"] else model
    curve = train_causal_lm(trainee, None, None, training, pad_id=tokenizer.pad_token_id, eval_sets=held_out,
                            progress=progress, step_loss=self_modeling_loss if switches["self_model"] else None, feed=feed)
    model.eval()
    return {"switches": switches, "curve": curve.as_report(), **feed.as_report()}


def level_rows(tokenizer, config: ForgeConfig) -> dict[int, list]:
    """Training rows of the reasoning suites at each curriculum level, as many examples as the skill source
    has: level 1's rows are the reasoning source's own, so a curriculum that never moves feeds what the
    run without it feeds."""
    return {level: encode_texts(tokenizer, task_texts(CURRICULUM_SOURCE, "train", config.task_examples,
                                                      config.seed, levels=(level,)), config.seq_len,
                                read_only=result_spans)
            for level in config.curriculum.levels}


def beats_input(margins: dict) -> dict:
    """Whether the output is significantly better than the input on some headline metric and worse on none."""
    verdicts = {name: margins["metrics"][name]["verdict"] for name in margins["headline"]}
    return {"relation": margins["relation"], "verdicts": verdicts,
            "beats_input": margins["relation"] == "dominates"}


class ForgePhase(Phase):
    name = "forge"
    version = "1"
    Config = ForgeConfig

    def figures(self, report: dict) -> list:
        """The training curves, and difficulty and ablations (figures.py)."""
        from services.forge.figures import forge_figures

        return [*super().figures(report), *forge_figures(report)]

    def transform(self, models: list[ForgedModel], config: ForgeConfig, progress: ProgressFn = no_progress) -> PhaseResult:
        forged = one_ternary_model(models, self.name)
        tokenizer = forged.tokenizer
        input_model = trainable_ternary(forged.model).eval()
        progress(0.0, "preparing data")
        train = {name: rows for name, rows in skill_rows(tokenizer, "train", config.task_examples, config.seq_len,
                                                         config.seed, config.train_text_chars).items()
                 if config.mix.get(name, 0) > 0}
        held_out = {name: rows[: config.held_out_rows] for name, rows in
                    skill_rows(tokenizer, "validation", config.held_out_rows * 4, config.seq_len, config.seed,
                               config.held_out_rows * config.seq_len * 8).items() if name in train}
        switches = config.switches()
        level_pools = level_rows(tokenizer, config) if switches["curriculum"] else {}
        runs = {"forge": switches, **(ablation_variants(switches) if config.ablations else {})}

        cards = {"input": score(input_model, tokenizer, config.scorecard, lambda f, m: progress(0.0, f"input: {m}"))}
        losses = {"input": {name: mean_loss(input_model, rows, tokenizer.pad_token_id) for name, rows in held_out.items()}}
        reports, output = {}, None
        for index, (name, run_switches) in enumerate(runs.items()):
            span = 1.0 / len(runs)

            def stage(fraction: float, message: str, index=index, name=name) -> None:
                progress((index + 0.9 * fraction) * span, f"{name}: {message}")

            model = trainable_ternary(forged.model)
            reports[name] = forge_train(model, tokenizer, run_switches, config, train, level_pools, held_out, stage)
            cards[name] = score(model, tokenizer, config.scorecard,
                                lambda f, m, index=index, name=name: progress((index + 0.9 + 0.1 * f) * span, f"{name}: {m}"))
            losses[name] = {source: mean_loss(model, rows, tokenizer.pad_token_id) for source, rows in held_out.items()}
            if name == "forge":
                output = model

        report = {
            "scorecard": report_section(config.scorecard, cards, inputs=["input"], outputs=["forge"],
                                        baselines=[name for name in runs if name != "forge"]),
            "held_out_loss": losses,
            "runs": reports,
            "against_input": {**compare(cards["forge"], cards["input"]), **beats_input(compare(cards["forge"], cards["input"]))},
            "ablation": {name: compare(cards["forge"], cards[name]) for name in runs if name != "forge"},
            "ternary": ternary_check(input_model, output, config.packing, next(iter(held_out.values()))[:8],
                                     tokenizer.pad_token_id),
        }
        report["summary"] = _summary(report, cards)
        progress(1.0, "packed")
        with torch.no_grad():
            packed = pack_model(output, get_codec(config.packing))
        result = dataclasses.replace(forged, model=output)  # tokenizer, name and carried files go on
        return PhaseResult(models=[result], report=report, extra_files={forged.name: {PACKED_FILE: packed}})


def _summary(report: dict, cards: dict) -> dict:
    summary = {}
    for name, card in cards.items():
        for metric, label in (("text.bits_per_byte", "bpb"), ("tasks.mean_task_success", "mean_task_success")):
            if metric in card["metrics"]:
                summary[f"{name}.{label}"] = round(card["metrics"][metric]["value"], 4)
    summary["beats_input"] = report["against_input"]["beats_input"]
    summary["relation_to_input"] = report["against_input"]["relation"]
    for name, margins in report["ablation"].items():
        summary[f"relation_to_{name}"] = margins["relation"]
    summary["same_packed_size"] = report["ternary"]["same_packed_size"]
    summary["packed_logits_max_abs_diff"] = report["ternary"]["packed_logits_max_abs_diff"]
    return summary
