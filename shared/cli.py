"""`agentforge`: the command line. Each group of commands lives beside the code it drives."""
from __future__ import annotations

from importlib.metadata import entry_points

import typer

from shared.fabric.checkpoint_cli import register_checkpoint_commands
from shared.fabric.cli import register_fabric_commands
from shared.localinfra.cli import infra_app

app = typer.Typer(help="Agent Forge: forge small language models, embedded or as services.", no_args_is_help=True)
app.add_typer(infra_app, name="infra", help="Install, start and stop the local Kafka, S3 server and Jaeger.")
register_fabric_commands(app)
register_checkpoint_commands(app)
for command in entry_points(group="agentforge.commands"):  # a phase's own commands (EvoMerge's merge)
    app.command(command.name)(command.load())
