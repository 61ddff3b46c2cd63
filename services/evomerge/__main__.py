"""`python -m services.evomerge`: run EvoMerge on checkpoints, or on stand-in specialists trained here.

With --checkpoint (repeat it; one must be the base, named by its manifest) the phase merges those. Without,
until Cognate's specialists exist, it trains stand-ins with the shared loop: a base on English text, then
one specialist per task suite fine-tuned from it on that suite (plus some text). The champion checkpoint
goes to --out, the report (also in its manifest) to --report and, shortened, to stdout.
"""
from __future__ import annotations

import copy
import json
from itertools import islice
from pathlib import Path

import typer

from services.evomerge.phase import EvoMergePhase
from shared.checkpoint import load_checkpoint, save_checkpoint
from shared.data.tasks import format_for_training, training_stream
from shared.data.text import english_documents
from shared.models import build_model, get_preset
from shared.phase import ForgedModel
from shared.tokenizer import train_tokenizer
from shared.training import TrainingConfig, encode_texts, train_causal_lm

cli = typer.Typer(add_completion=False)

SPECIALTIES = ("arithmetic", "sequence", "multiple_choice")  # the suites of EvalSuite's default tasks
TASK_EXAMPLES = 4000  # training examples drawn per suite


def _task_rows(tokenizer, suite: str, seq_len: int, seed: int):
    stream = training_stream({suite: 1.0}, [1], "train", seed)
    return encode_texts(tokenizer, [format_for_training(e) for e in islice(stream, TASK_EXAMPLES)], seq_len)


def train_stand_ins(preset: str, base_steps: int, specialist_steps: int, seed: int) -> list[ForgedModel]:
    shape = get_preset(preset)
    texts = english_documents("train")
    task_texts = [format_for_training(e) for suite in SPECIALTIES
                  for e in islice(training_stream({suite: 1.0}, [1], "train", seed), 500)]
    tokenizer = train_tokenizer([*texts, *task_texts], shape.vocab_size, shape.max_positions)
    text_rows = encode_texts(tokenizer, texts, shape.max_positions)
    base = build_model(shape, len(tokenizer), seed, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    curve = train_causal_lm(base, {"text": text_rows}, {"text": 1.0}, TrainingConfig(steps=base_steps, seed=seed),
                            pad_id=tokenizer.pad_token_id)
    typer.echo(f"base: {base_steps} steps, final loss {curve.train_loss[-1]:.3f}, {curve.tokens_per_second:.0f} tokens/s")
    models = [ForgedModel(base.eval(), tokenizer, "base")]
    for suite in SPECIALTIES:
        specialist = copy.deepcopy(base)
        sources = {"text": text_rows, suite: _task_rows(tokenizer, suite, shape.max_positions, seed)}
        curve = train_causal_lm(specialist, sources, {"text": 0.3, suite: 0.7},
                                TrainingConfig(steps=specialist_steps, learning_rate=1e-3, warmup_steps=specialist_steps // 10,
                                               seed=seed),
                                pad_id=tokenizer.pad_token_id)
        typer.echo(f"specialist {suite}: {specialist_steps} steps, final loss {curve.train_loss[-1]:.3f}")
        models.append(ForgedModel(specialist.eval(), tokenizer, f"specialist-{suite}"))
    return models


def _echo_progress(fraction: float, message: str) -> None:
    typer.echo(f"[{fraction:4.0%}] {message}")


@cli.command()
def main(
    out: Path = typer.Option(..., help="folder for the champion checkpoint"),
    report: Path | None = typer.Option(None, help="also write the full report as JSON here"),
    checkpoint: list[Path] = typer.Option([], help="input checkpoint folder (repeat; include the base)"),
    parents_out: Path | None = typer.Option(None, help="save the stand-in base and specialists under this folder"),
    preset: str = typer.Option("tiny", help="preset of the stand-ins trained when no checkpoint is given"),
    base_steps: int = typer.Option(400, help="training steps of the stand-in base"),
    specialist_steps: int = typer.Option(200, help="fine-tuning steps of each stand-in specialist"),
    config_json: str = typer.Option("{}", help="EvoMergeConfig overrides as JSON"),
) -> None:
    phase = EvoMergePhase()
    config = phase.parse_config(json.loads(config_json))
    if checkpoint:
        loaded = [load_checkpoint(path) for path in checkpoint]
        models, parents = [forged for forged, _ in loaded], [manifest.digest for _, manifest in loaded]
    else:
        models, parents = train_stand_ins(preset, base_steps, specialist_steps, config.seed), []
        for forged in models if parents_out is not None else []:
            manifest = save_checkpoint(forged, parents_out / forged.name, phase="evomerge-stand-in", code_version="1",
                                       config={"preset": preset, "base_steps": base_steps,
                                               "specialist_steps": specialist_steps}, config_hash="", parents=[])
            parents.append(manifest.digest)
    result = phase.transform(models, config, _echo_progress)
    manifest = save_checkpoint(result.models[0], out, phase=phase.name, code_version=phase.version,
                               config=config.model_dump(mode="json"), config_hash=config.config_hash(),
                               parents=parents, metrics=result.report)
    if report is not None:
        report.write_text(json.dumps(result.report, indent=2))
    summary = {k: result.report[k] for k in ("seed_round", "lineage", "search_seconds", "evaluations",
                                             "champion_beats_every_parent_and_uniform_on_test")}
    typer.echo(json.dumps({**summary, "recipe": result.report["champion"]["recipe"], "digest": manifest.digest}, indent=2))
    _echo_test_table(result.report)


def _echo_test_table(report: dict) -> None:
    typer.echo(f"test split; fitness = {report['fitness']}; margin = champion's fitness minus the row's")
    typer.echo(f"{'model':22} {'fitness':>8} {'margin':>8} {'bpb':>7} {'tasks':>6}  per task")
    for name, metrics in report["test"].items():
        tasks = " ".join(f"{k.split('.')[0]}={v:.3f}" for k, v in metrics.items() if k.endswith((".exact_match", ".acc")))
        margin = report["champion_margin_on_test"].get(name)
        typer.echo(f"{name:22} {report['test_fitness'][name]:8.4f} {'' if margin is None else f'{margin:+.4f}':>8} "
                   f"{metrics.get('text.bits_per_byte', float('nan')):7.4f} {metrics.get('tasks.mean_accuracy', 0.0):6.3f}  {tasks}")


if __name__ == "__main__":
    cli()
