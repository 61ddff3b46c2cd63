"""`python -m services.bitnet`: run the BitNet phase on a checkpoint, or on a freshly trained tiny float model.

Without --checkpoint, a float model of the chosen preset is trained first with the shared loop on the
phase's own data mix (a stand-in for phases 1-3), so the whole measurement runs offline in minutes.
The output checkpoint (with the packed file) goes to --out, the report (also in its manifest) to stdout.
"""
from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from services.bitnet.phase import BitNetConfig, BitNetPhase, training_sources
from shared.checkpoint import load_checkpoint, save_checkpoint
from shared.data.skills import skill_texts
from shared.models import Preset, build_model, get_preset
from shared.phase import ForgedModel
from shared.scorecard import table_lines
from shared.tokenizer import train_tokenizer
from shared.training import TrainingConfig, train_causal_lm

cli = typer.Typer(add_completion=False)


def train_float_model(shape: Preset, config: BitNetConfig, steps: int, name: str) -> ForgedModel:
    texts = skill_texts("train", config.task_examples, config.seed, config.train_text_chars)
    tokenizer = train_tokenizer([text for source in texts.values() for text in source], shape.vocab_size,
                                shape.max_positions)
    model = build_model(shape, len(tokenizer), config.seed, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    sources = training_sources(tokenizer, config, "train", config.task_examples)  # the data QAT will see
    curve = train_causal_lm(model, sources, config.mix, TrainingConfig(steps=steps, learning_rate=3e-3, seed=config.seed),
                            pad_id=tokenizer.pad_token_id)
    typer.echo(f"float model: {steps} steps, final train loss {curve.train_loss[-1]:.3f}, "
               f"{curve.tokens_per_second:.0f} tokens/s")
    return ForgedModel(model=model, tokenizer=tokenizer, name=name)


def _every_tenth():
    printed = set()

    def echo(fraction: float, message: str) -> None:
        if int(fraction * 10) not in printed:
            printed.add(int(fraction * 10))
            typer.echo(f"[{fraction:4.0%}] {message}")

    return echo


def print_summary(report: dict) -> None:
    typer.echo(f"scorecard, {report['scorecard']['spec']['split']} split:")
    typer.echo("\n".join(table_lines(report["scorecard"]["cards"])))
    for reference, gap in report["qat_gap"].items():
        typer.echo(f"QAT against {reference}: {gap['relation']}; " + ", ".join(
            f"{name} {d['difference']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"
            for name, d in gap["metrics"].items() if name in gap["headline"]))
    losses = Table("model", *next(iter(report["held_out_loss"].values())), title="held-out loss (nats per token)")
    for name, row in report["held_out_loss"].items():
        losses.add_row(name, *(f"{loss:.3f}" for loss in row.values()))
    sizes = Table("packing", "ternary payload bytes", "ternary bits/weight", "file bytes", "file bits/parameter",
                  "x smaller than float file", title=f"sizes (float file {report['float_file_bytes']} bytes)")
    for name, size in report["sizes"].items():
        sizes.add_row(name, str(size["ternary_payload_bytes"]), f"{size['ternary_bits_per_weight']:.4f}",
                      str(size["file_bytes"]), f"{size['file_bits_per_parameter']:.3f}",
                      f"{size['file_compression_vs_float']:.2f}")
    Console().print(losses, sizes)


@cli.command()
def main(
    out: Path = typer.Option(..., help="folder for the output checkpoint"),
    report: Path | None = typer.Option(None, help="also write the report as JSON here"),
    checkpoint: Path | None = typer.Option(None, help="input checkpoint folder; default: train a float model"),
    preset: str = typer.Option("tiny", help="preset of the float model trained when no checkpoint is given"),
    float_steps: int = typer.Option(600, help="training steps of that float model"),
    config_json: str = typer.Option("{}", help="BitNetConfig overrides as JSON"),
    float_out: Path | None = typer.Option(None, help="save the trained float model here (for reruns, bench)"),
) -> None:
    phase = BitNetPhase()
    config = phase.parse_config(json.loads(config_json))
    if checkpoint is not None:
        forged, manifest = load_checkpoint(checkpoint)
        parents = [manifest.digest]
    else:
        forged, parents = train_float_model(get_preset(preset), config, float_steps, "float-" + preset), []
        if float_out is not None:
            save_checkpoint(forged, float_out, phase="float-stand-in", code_version="1", config={},
                            config_hash="", parents=[])
    result = phase.transform([forged], config, _every_tenth())
    output = result.models[0]
    save_checkpoint(output, out, phase=phase.name, code_version=phase.version, config=config.model_dump(mode="json"),
                    config_hash=config.config_hash(), parents=parents, metrics=result.report,
                    extra_files=result.extra_files[output.name])
    if report is not None:
        report.write_text(json.dumps(result.report, indent=2))
    typer.echo(json.dumps(result.report["summary"], indent=2))
    print_summary(result.report)


if __name__ == "__main__":
    cli()
