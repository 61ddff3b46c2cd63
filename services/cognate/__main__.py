"""`python -m services.cognate --preset tiny`: train the base and three specialists, print the measured table.

Checkpoints go to --out/<name> (base, specialist-reasoning, specialist-text, specialist-tools), the full
report (curves included) to --report.
"""
from __future__ import annotations

import json
from pathlib import Path

import typer

from services.cognate.phase import CognatePhase
from shared.checkpoint import save_checkpoint
from shared.phase import print_every_percent

cli = typer.Typer(add_completion=False)


def _table_lines(report: dict) -> list[str]:
    def em(scores: dict) -> str:
        return f"{scores['exact_match']:.3f} [{scores['ci_low']:.3f}, {scores['ci_high']:.3f}]"

    lines = [f"{'model':22} {'test bpb [95% block CI]':28} {'reasoning EM [95%]':22} {'tools EM [95%]':22} arith L1 EM [95%]"]
    for name, row in report["table"].items():
        if name == "majority_baseline":
            continue
        text = row["text"]
        lines.append(
            f"{name:22} {text['bits_per_byte']:.3f} [{text['block_ci_low']:.3f}, {text['block_ci_high']:.3f}]      "
            f"{em(row['reasoning']):22} {em(row['tools']):22} {em(row['arithmetic_easy'])}"
        )
    lines.append(f"majority-answer baseline, arithmetic L1: {report['table']['majority_baseline']['arithmetic_easy']:.3f}")
    return lines


@cli.command()
def main(
    preset: str = typer.Option("tiny", help="model preset (tiny or small)"),
    out: Path | None = typer.Option(None, help="save the four checkpoints under this folder"),
    report: Path | None = typer.Option(None, help="write the full report (curves included) as JSON here"),
    config_json: str = typer.Option("{}", help="CognateConfig overrides as JSON"),
) -> None:
    phase = CognatePhase()
    config = phase.parse_config({"preset": preset, **json.loads(config_json)})
    result = phase.transform([], config, print_every_percent(typer.echo))
    if out is not None:
        for forged in result.models:
            save_checkpoint(forged, out / forged.name, phase=phase.name, code_version=phase.version,
                            config=config.model_dump(mode="json"), config_hash=config.config_hash(), parents=[],
                            metrics=result.report.get("table", {}).get(forged.name, {}))
    if report is not None:
        report.write_text(json.dumps(result.report, indent=2))
    if "curves" in result.report:
        typer.echo(f"parameters {result.report['parameters']}, base {result.report['base_seconds']:.0f} s, "
                   f"three specialists {result.report['specialists_seconds']:.0f} s")
        for name, run in result.report["curves"].items():
            curve = run["curve"]
            typer.echo(f"{name:22} loss {curve['train_loss'][0]:.2f} -> {curve['train_loss'][-1]:.2f}, "
                       f"{curve['tokens_per_second']:.0f} tokens/s, {curve['seconds']:.0f} s")
    if "table" in result.report:
        typer.echo("\n".join(_table_lines(result.report)))
        typer.echo(json.dumps(result.report["speciality"], indent=2))


if __name__ == "__main__":
    cli()
