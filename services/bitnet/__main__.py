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

from services.bitnet.phase import BitNetConfig, BitNetPhase, training_sources, training_texts
from shared.checkpoint import load_checkpoint, save_checkpoint
from shared.models import Preset, build_model, get_preset
from shared.phase import ForgedModel
from shared.tokenizer import train_tokenizer
from shared.training import TrainingConfig, train_causal_lm

cli = typer.Typer(add_completion=False)


def train_float_model(shape: Preset, config: BitNetConfig, steps: int, name: str) -> ForgedModel:
    texts = training_texts(config, "train", config.task_examples)
    tokenizer = train_tokenizer([*texts["text"], *texts["tasks"]], shape.vocab_size, shape.max_positions)
    model = build_model(shape, len(tokenizer), config.seed, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    sources = training_sources(tokenizer, config, "train", config.task_examples)  # the data QAT will see
    curve = train_causal_lm(model, sources, {"text": config.text_weight, "tasks": 1 - config.text_weight},
                            TrainingConfig(steps=steps, learning_rate=3e-3, seed=config.seed),
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
    quality = Table("model", "text bits/byte", "task accuracy (mean)", "held-out loss", title="quality")
    for name in ("float", "float_finetuned", "naive_ternary", "qat"):
        if name in report:
            row = report[name]
            losses = ", ".join(f"{source} {loss:.3f}" for source, loss in row["held_out_loss"].items())
            quality.add_row(name, f"{row.get('text.bits_per_byte', float('nan')):.3f}",
                            f"{row.get('tasks.mean_accuracy', float('nan')):.3f}", losses)
    sizes = Table("packing", "ternary payload bytes", "ternary bits/weight", "file bytes", "file bits/parameter",
                  "x smaller than float file", title=f"sizes (float file {report['float_file_bytes']} bytes)")
    for name, size in report["sizes"].items():
        sizes.add_row(name, str(size["ternary_payload_bytes"]), f"{size['ternary_bits_per_weight']:.4f}",
                      str(size["file_bytes"]), f"{size['file_bits_per_parameter']:.3f}",
                      f"{size['file_compression_vs_float']:.2f}")
    Console().print(quality, sizes)


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
    typer.echo(json.dumps({k: v for k, v in result.report.items() if not k.endswith("_curve")}, indent=2))
    print_summary(result.report)


if __name__ == "__main__":
    cli()
