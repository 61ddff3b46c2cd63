"""Phase 3, Quiet-STaR (Zelikman et al. 2024): the model learns to think before it speaks.

One model in (EvoMerge's champion), the same model trained with Quiet-STaR out. The transform adds the
thought tokens (services.quietstar.thoughts), trains the model, its mixing head (mixing_head.py) and the
thought embeddings on the reference's objective (objective.py) through the shared training loop, and
measures, on the shared scorecard: the input, the output without thoughts (what later phases and stock
transformers compute) and the output with thoughts (thinking.py), with paired intervals between them.
Whatever the sign of the difference, the report states it.

Training data: the skills of the input (shared.data.skills): the reasoning suites (multi-step arithmetic
and word problems among them), English text, and calculator requests so that tool use is kept.

What the next phase receives (the checkpoint of the output model):
    config.json, model.safetensors, tokenizer   a standard Llama; the tokenizer and the vocabulary hold the
                                                two thought tokens with zero embedding rows (thoughts.py says
                                                why), and generation_config.json suppresses them, so plain
                                                generation never writes one.
    carried/quietstar-mixing-head.safetensors   the mixing head and the learned thought embeddings
                                                (services.quietstar.mixing_head documents it); later phases
                                                carry it on unchanged (ForgedModel.carried) and do not train
                                                it: after BitNet it mixes hidden states of weights it was not
                                                trained with.

Scoring window: a thought continues its text's positions, so the scorecard's text windows are shortened by
the layout (thought length + 3 positions) to stay inside the model's trained context; every card of this
phase uses the same windows, so its cards pair with one another (not with other phases' text figures).
"""
from __future__ import annotations

import copy
import dataclasses

import torch
from pydantic import Field, field_validator

from services.quietstar.mixing_head import MIXING_HEAD_FILE, MixingHead, head_metadata, load_head, save_head
from services.quietstar.objective import ObjectiveConfig, QuietStarModel, quietstar_loss
from services.quietstar.thinking import ThinkingModel
from services.quietstar.thoughts import ThoughtEmbeddings, add_thought_tokens, n_blocks, thought_tokens
from shared.data.skills import check_mix, skill_rows
from shared.phase import ForgedModel, Phase, PhaseConfig, PhaseResult, ProgressFn, no_progress, one_float_model
from shared.scorecard import ScorecardSpec, compare, report_section, score
from shared.training import TrainingConfig, train_causal_lm


class QuietStarConfig(PhaseConfig):
    objective: ObjectiveConfig = ObjectiveConfig()
    # Reference: AdamW, lr 1e-6 and weight decay 0.001 on Mistral-7B; a 1M-parameter model takes larger steps.
    training: TrainingConfig = TrainingConfig(steps=150, batch_size=4, learning_rate=3e-4, warmup_steps=10,
                                              weight_decay=0.001, eval_every=50)
    seq_len: int = Field(64, ge=8)  # tokens per training row (the layout holds (thought_length + 2 + n_true) x this)
    mix: dict[str, float] = {"reasoning": 0.4, "text": 0.3, "tools": 0.3}
    train_text_chars: int = Field(2_000_000, ge=1)
    task_examples: int = Field(4000, ge=1)
    held_out_rows: int = Field(32, ge=1)
    scorecard: ScorecardSpec = ScorecardSpec()

    @field_validator("mix")
    @classmethod
    def _known_mix(cls, mix: dict[str, float]) -> dict[str, float]:
        return check_mix(mix)


def scoring_spec(spec: ScorecardSpec, model, thought_length: int) -> ScorecardSpec:
    """The spec with text windows that leave room for a thought inside the model's context."""
    room = model.config.max_position_embeddings - n_blocks(thought_length, 1)
    if room < 8:
        raise ValueError(f"a thought of {thought_length} tokens leaves no room in a context of "
                         f"{model.config.max_position_embeddings} positions")
    return spec.model_copy(update={"max_length": min(spec.max_length or room, room)})


def reward_rose(curve: dict, tail: float = 0.2) -> dict:
    """Mean reward over the first and the last `tail` of the steps, and whether the last is above 0."""
    rewards = curve["logged"]["mean_reward"]
    n = max(1, int(len(rewards) * tail))
    first, last = sum(rewards[:n]) / n, sum(rewards[-n:]) / n
    return {"first": first, "last": last, "steps_averaged": n, "above_zero": last > 0}


class QuietStarPhase(Phase):
    name = "quietstar"
    version = "1"
    Config = QuietStarConfig

    def figures(self, report: dict) -> list:
        """The training curves, and the reward (figures.py)."""
        from services.quietstar.figures import reward_figure

        return [*super().figures(report), *reward_figure(report)]

    def thinking_model(self, forged: ForgedModel) -> ThinkingModel | None:
        """The model with the mixing head it carries (later phases carry it on unchanged)."""
        payload = forged.carried.get(MIXING_HEAD_FILE)
        if payload is None:
            return None
        head, vectors = load_head(payload)
        return ThinkingModel(forged.model, head, thought_tokens(forged.tokenizer), vectors,
                             int(head_metadata(payload)["thought_length"]))

    def transform(self, models: list[ForgedModel], config: QuietStarConfig, progress: ProgressFn = no_progress) -> PhaseResult:
        forged = one_float_model(models, self.name)
        objective = config.objective
        spec = scoring_spec(config.scorecard, forged.model, objective.thought_length)
        model = copy.deepcopy(forged.model).float()
        tokenizer = copy.deepcopy(forged.tokenizer)
        tokens, initial = add_thought_tokens(model, tokenizer)
        cards = {"input": score(forged.model, forged.tokenizer, spec, lambda f, m: progress(0.1 * f, f"input: {m}"))}
        model.generation_config.suppress_tokens = tokens.ids  # plain generation never writes a thought token
        trainee = QuietStarModel(model, MixingHead(model.config.hidden_size), ThoughtEmbeddings(model, tokens, initial))
        pad_id = tokenizer.pad_token_id
        rows = skill_rows(tokenizer, "train", config.task_examples, config.seq_len, config.seed, config.train_text_chars)
        held = skill_rows(tokenizer, "validation", config.held_out_rows * 4, config.seq_len, config.seed,
                          config.train_text_chars)
        sources = {name: rows[name] for name, weight in config.mix.items() if weight > 0}
        held_out = {name: held[name][: config.held_out_rows] for name in sources}
        generator = torch.Generator().manual_seed(config.seed)  # thought sampling, apart from batch sampling

        def step_loss(module, input_ids, attention_mask, predicted):
            return quietstar_loss(module, tokens, objective, pad_id, generator, input_ids, attention_mask, predicted)

        curve = train_causal_lm(trainee, sources, config.mix, config.training, pad_id=pad_id, eval_sets=held_out,
                                progress=lambda f, m: progress(0.1 + 0.6 * f, f"training: {m}"), step_loss=step_loss)
        model.eval()
        head, vectors = trainee.head.eval(), trainee.thought_embeddings.vectors().detach()

        cards["output"] = score(model, tokenizer, spec, lambda f, m: progress(0.7 + 0.1 * f, f"output: {m}"))
        thinking = ThinkingModel(model, head, tokens, vectors, objective.thought_length)
        cards["output_thinking"] = score(thinking, tokenizer, spec,
                                         lambda f, m: progress(0.8 + 0.2 * f, f"output with thoughts: {m}"))
        report = {
            "scorecard": report_section(spec, cards, inputs=["input"], outputs=["output", "output_thinking"],
                                        baselines=[]),
            "comparisons": {
                "thinking_vs_not": compare(cards["output_thinking"], cards["output"]),
                "thinking_vs_input": compare(cards["output_thinking"], cards["input"]),
                "output_vs_input": compare(cards["output"], cards["input"]),
            },
            "training_curve": curve.as_report(),
            "thought_tokens": {"start": tokens.start, "end": tokens.end, "thought_length": objective.thought_length},
            "carried": {MIXING_HEAD_FILE: "the mixing head, carried on unchanged by every later phase"},
        }
        report["reward"] = reward_rose(report["training_curve"])
        report["summary"] = _summary(report, cards)
        progress(1.0, "done")
        output = dataclasses.replace(forged, model=model, tokenizer=tokenizer,
                                     carried={**forged.carried, MIXING_HEAD_FILE: save_head(head, vectors, objective.thought_length)})
        return PhaseResult(models=[output], report=report)


def _summary(report: dict, cards: dict[str, dict]) -> dict:
    summary = {"reward_first": round(report["reward"]["first"], 4), "reward_last": round(report["reward"]["last"], 4),
               "reward_above_zero": report["reward"]["above_zero"]}
    for name, card in cards.items():
        for metric, label in (("text.bits_per_byte", "bpb"), ("tasks.mean_task_success", "mean_task_success")):
            if metric in card["metrics"]:
                summary[f"{name}.{label}"] = round(card["metrics"][metric]["value"], 4)
    summary["thinking_vs_not"] = report["comparisons"]["thinking_vs_not"]["relation"]
    return summary
