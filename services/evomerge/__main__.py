"""`python -m services.evomerge`: run EvoMerge on checkpoints, or on Cognate's base and specialists.

With --checkpoint (repeat it; one must be the base, named by its manifest) the phase merges those. Without,
it first runs Cognate on its defaults for --preset (about 5 minutes for tiny on 2 cores); --parents-out
keeps those four checkpoints for later runs. The champion checkpoint goes to --out, the report (also in its
manifest) to --report and, shortened, to stdout.
"""
from __future__ import annotations

import json
from pathlib import Path

import typer

from services.cognate.phase import CognatePhase
from services.evomerge.phase import EvoMergePhase
from shared.checkpoint import load_checkpoint, save_checkpoint
from shared.phase import print_every_percent
from shared.scorecard import table_lines

cli = typer.Typer(add_completion=False)


@cli.command()
def main(
    out: Path = typer.Option(..., help="folder for the champion checkpoint"),
    report: Path | None = typer.Option(None, help="also write the full report as JSON here"),
    checkpoint: list[Path] = typer.Option([], help="input checkpoint folder (repeat; include the base)"),
    parents_out: Path | None = typer.Option(None, help="save Cognate's base and specialists under this folder"),
    preset: str = typer.Option("tiny", help="Cognate preset when no checkpoint is given"),
    config_json: str = typer.Option("{}", help="EvoMergeConfig overrides as JSON"),
) -> None:
    phase, progress = EvoMergePhase(), print_every_percent(typer.echo)
    config = phase.parse_config(json.loads(config_json))
    if checkpoint:
        loaded = [load_checkpoint(path) for path in checkpoint]
        models, parents = [forged for forged, _ in loaded], [manifest.digest for _, manifest in loaded]
    else:
        cognate = CognatePhase()
        cognate_config = cognate.parse_config({"preset": preset, "score": False})
        models, parents = cognate.transform([], cognate_config, print_every_percent(typer.echo)).models, []
        for forged in models if parents_out is not None else []:
            manifest = save_checkpoint(forged, parents_out / forged.name, phase=cognate.name,
                                       code_version=cognate.version, config=cognate_config.model_dump(mode="json"),
                                       config_hash=cognate_config.config_hash(), parents=[])
            parents.append(manifest.digest)
    result = phase.transform(models, config, progress)
    manifest = save_checkpoint(result.models[0], out, phase=phase.name, code_version=phase.version,
                               config=config.model_dump(mode="json"), config_hash=config.config_hash(),
                               parents=parents, metrics=result.report)
    if report is not None:
        report.write_text(json.dumps(result.report, indent=2))
    summary = {k: result.report[k] for k in ("seed_round", "lineage", "search_seconds", "evaluations",
                                             "champion_beats_every_parent_and_uniform_on_test",
                                             "champion_beats_every_parent_and_uniform_with_95pct_significance")}
    typer.echo(json.dumps({**summary, "recipe": result.report["champion"]["recipe"], "digest": manifest.digest}, indent=2))
    _echo_test_table(result.report)


def _echo_test_table(report: dict) -> None:
    typer.echo(f"test scorecard; fitness = {report['fitness']}")
    typer.echo("\n".join(table_lines(report["scorecard"]["cards"])))
    typer.echo("champion's fitness margin over each model [paired 95%], and its Pareto relation to it:")
    for name, interval in report["champion_margin_on_test_95pct"].items():
        typer.echo(f"  {name:22} {interval['margin']:+.4f} [{interval['ci_low']:+.4f}, {interval['ci_high']:+.4f}]  "
                   f"{report['comparisons'][name]['relation']}")


if __name__ == "__main__":
    cli()
