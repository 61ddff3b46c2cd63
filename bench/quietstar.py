"""Quiet-STaR at tiny scale: the phase on its defaults (test split), a thought-length ablation (validation
split), and what thinking costs in tokens per second.

    .venv/bin/python -m bench.quietstar                       # about half an hour on 2 cores
    .venv/bin/python -m bench.quietstar --checkpoint DIR      # on a champion from a run instead

Without --checkpoint the input is a stand-in for EvoMerge's champion: a `tiny` float model trained on the
skills mix (services.bitnet.__main__.train_float_model), so the benchmark needs no earlier phase. Each
thought length trains the phase from the same input with the same seed and is scored on the validation
split with and without thoughts; the default length's run is also the phase's own report on the test split.
Everything goes to bench/results/quietstar.json, from which bench.readme writes the README's Quiet-STaR block.
"""
from __future__ import annotations

import time
from pathlib import Path

import typer

from bench.results_file import write_results
from services.bitnet.__main__ import train_float_model
from services.bitnet.phase import BitNetConfig
from services.quietstar.mixing_head import MIXING_HEAD_FILE, load_head
from services.quietstar.phase import QuietStarPhase, scoring_spec
from services.quietstar.thinking import ThinkingModel
from services.quietstar.thoughts import thought_tokens
from shared.checkpoint import load_checkpoint
from shared.data.tasks import make_examples
from shared.evaluation import generation_speed, scoring_speed
from shared.models import get_preset
from shared.phase import print_every_percent
from shared.scorecard import compare, comparison_figures, score, without_items

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "quietstar.json"
STAND_IN_STEPS = 600
COST_PROMPTS = 64
ABLATION_PROBLEMS = 250  # a task, on validation (its smallest headline pool, sequences, holds 279)
COST_NEW_TOKENS = 16
cli = typer.Typer(add_completion=False)


@cli.command()
def main(
    checkpoint: Path | None = typer.Option(None, help="input checkpoint (EvoMerge's champion); default: a stand-in"),
    lengths: str = typer.Option("0,4,8", help="thought lengths of the ablation (the phase default among them)"),
    seed: int = typer.Option(0, help="seed of the stand-in and of the phase"),
    out: Path = typer.Option(DEFAULT_OUT, help="results file"),
) -> None:
    started = time.perf_counter()
    stand_in = BitNetConfig(seed=seed)
    if checkpoint is None:
        forged = train_float_model(get_preset("tiny"), stand_in, STAND_IN_STEPS, "stand-in")
        source = f"a tiny float model trained {STAND_IN_STEPS} steps on the skills mix (seed {seed})"
    else:
        forged, manifest = load_checkpoint(checkpoint)
        source = f"checkpoint {manifest.name} ({manifest.phase}, digest {manifest.digest[:12]})"
    phase = QuietStarPhase()
    default = phase.parse_config({"seed": seed})
    wanted = [int(n) for n in lengths.split(",")]
    validation = default.scorecard.model_copy(update={
        "split": "validation", "tasks": tuple((suite, level, ABLATION_PROBLEMS) for suite, level, _ in default.scorecard.tasks)})
    runs, report = {}, None
    for length in wanted:
        typer.echo(f"thought length {length}:")
        config = phase.parse_config({"seed": seed, "objective": {"thought_length": length}})
        run_started = time.perf_counter()
        result = phase.transform([forged], config, print_every_percent(typer.echo))
        output = result.models[0]
        spec = scoring_spec(validation, forged.model, length)
        head, vectors = load_head(output.carried[MIXING_HEAD_FILE])
        thinking = ThinkingModel(output.model, head, thought_tokens(output.tokenizer), vectors, length)
        cards = {"input": score(forged.model, forged.tokenizer, spec), "output": score(output.model, output.tokenizer, spec),
                 "output_thinking": score(thinking, output.tokenizer, spec)}
        prompts = [e.prompt for e in make_examples("word_problems", 1, "validation", COST_PROMPTS, seed)]
        runs[str(length)] = {
            "reward": result.report["reward"],
            "mean_w_last": sum(result.report["training_curve"]["logged"]["mean_w"][-30:]) / 30,
            "validation": {"cards": {name: without_items(card) for name, card in cards.items()},
                           "thinking_vs_not": comparison_figures(compare(cards["output_thinking"], cards["output"])),
                           "thinking_vs_input": comparison_figures(compare(cards["output_thinking"], cards["input"]))},
            "speed": {"generation": {"without_thoughts": generation_speed(output.model, output.tokenizer, prompts, COST_NEW_TOKENS),
                                     "with_thoughts": generation_speed(thinking, output.tokenizer, prompts, COST_NEW_TOKENS)},
                      "scoring": {"without_thoughts": scoring_speed(output.model, output.tokenizer, prompts),
                                  "with_thoughts": scoring_speed(thinking, output.tokenizer, prompts)}},
            "seconds": round(time.perf_counter() - run_started, 1),
        }
        if length == default.objective.thought_length:
            report = result.report
    if report is None:
        raise typer.BadParameter(f"the lengths must include the default, {default.objective.thought_length}")
    section = report["scorecard"]
    results = {
        "command": "python -m bench.quietstar" + (f" --checkpoint {checkpoint}" if checkpoint else ""),
        "input": source, "seed": seed, "default_thought_length": default.objective.thought_length,
        "config": default.model_dump(mode="json"),
        "test": {"cards": {name: without_items(card) for name, card in section["cards"].items()},
                 "spec": section["spec"],
                 "comparisons": {name: comparison_figures(c) for name, c in report["comparisons"].items()},
                 "reward": report["reward"], "logged": report["training_curve"]["logged"]},
        "ablation": runs,
        "cost_batch": f"{COST_PROMPTS} word-problem prompts (validation), up to {COST_NEW_TOKENS} new tokens each",
    }
    write_results(out, results, started)


if __name__ == "__main__":
    cli()
