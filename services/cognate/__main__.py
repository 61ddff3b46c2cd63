"""`python -m services.cognate --preset tiny`: train the base, three specialists and the multitask baseline,
print the measured scorecard.

Checkpoints go to --out/<name> (base, specialist-reasoning, specialist-text, specialist-tools, multitask),
the full report (curves and per-item results included) to --report.
"""
from __future__ import annotations

import json
from pathlib import Path

import typer

from services.cognate.phase import CognatePhase
from shared.checkpoint import save_checkpoint
from shared.phase import print_every_percent
from shared.scorecard import table_lines

cli = typer.Typer(add_completion=False)


@cli.command()
def main(
    preset: str = typer.Option("tiny", help="model preset (tiny or small)"),
    out: Path | None = typer.Option(None, help="save the checkpoints under this folder"),
    report: Path | None = typer.Option(None, help="write the full report (curves included) as JSON here"),
    config_json: str = typer.Option("{}", help="CognateConfig overrides as JSON"),
) -> None:
    phase = CognatePhase()
    config = phase.parse_config({"preset": preset, **json.loads(config_json)})
    result = phase.transform([], config, print_every_percent(typer.echo))
    cards = result.report.get("scorecard", {}).get("cards", {})
    if out is not None:
        for forged in result.models:
            save_checkpoint(forged, out / forged.name, phase=phase.name, code_version=phase.version,
                            config=config.model_dump(mode="json"), config_hash=config.config_hash(), parents=[],
                            metrics=cards.get(forged.name, {}).get("metrics", {}))
    if report is not None:
        report.write_text(json.dumps(result.report, indent=2))
    if "curves" in result.report:
        typer.echo(f"parameters {result.report['parameters']}, base {result.report['base_seconds']:.0f} s, "
                   f"three specialists {result.report['specialists_seconds']:.0f} s")
        for name, run in result.report["curves"].items():
            curve = run["curve"]
            typer.echo(f"{name:22} loss {curve['train_loss'][0]:.2f} -> {curve['train_loss'][-1]:.2f}, "
                       f"{curve['tokens_per_second']:.0f} tokens/s, {curve['seconds']:.0f} s")
    if cards:
        typer.echo(f"scorecard, {result.report['scorecard']['spec']['split']} split:")
        typer.echo("\n".join(table_lines(cards)))
        typer.echo(json.dumps(result.report["speciality"], indent=2))


if __name__ == "__main__":
    cli()
