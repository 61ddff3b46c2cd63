"""`agentforge infra install|up|down|status|env`: the local Kafka, S3 server and Jaeger."""
from __future__ import annotations

import shlex
import time
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from shared.localinfra.stack import LocalStack

infra_app = typer.Typer(no_args_is_help=True)
console = Console(stderr=True)  # progress and tables on stderr; stdout stays clean for `eval "$(... env)"`

Servers = Annotated[Optional[list[str]], typer.Argument(help="kafka, s3, jaeger (default: all)")]


@infra_app.command()
def install(servers: Servers = None) -> None:
    """Fetch and build the servers into the cache folder (minutes the first time, instant after)."""
    stack = LocalStack()
    console.print(f"installing into {stack.layout.root} (Go builds take minutes the first time)")
    results = stack.install(servers)
    for name, result in results.items():
        console.print(f"{name}: " + (f"installed ({result:.1f} s)" if isinstance(result, float) else f"[red]{result}[/red]"))
    if any(isinstance(result, str) for result in results.values()):
        raise typer.Exit(1)


@infra_app.command()
def up(servers: Servers = None) -> None:
    """Start the servers that are not already running and healthy, then wait until all are healthy."""
    started = time.perf_counter()
    results = LocalStack().up(servers)
    for name, error in results.items():
        console.print(f"{name}: " + ("[green]up[/green]" if error is None else f"[red]{error}[/red]"))
    if any(error is not None for error in results.values()):
        raise typer.Exit(1)
    console.print(f"all healthy after {time.perf_counter() - started:.1f} s; `agentforge infra env` prints the endpoints")


@infra_app.command()
def down(servers: Servers = None) -> None:
    """Stop the servers by their recorded PIDs."""
    stopped = LocalStack().down(servers)
    console.print(f"stopped: {', '.join(stopped) or 'nothing was running'}")


@infra_app.command()
def status() -> None:
    """Show each server: running, healthy, PID, listening addresses."""
    statuses = LocalStack().status()
    table = Table("server", "installed", "pid", "healthy", "listening", "detail")
    for entry in statuses:
        table.add_row(entry.name, "yes" if entry.installed else "[red]no[/red]", str(entry.pid or "-"),
                      "[green]yes[/green]" if entry.healthy else "[red]no[/red]",
                      " ".join(f"{ip}:{port}" for ip, port in entry.listening) or "-", entry.detail)
    console.print(table)
    if not all(entry.healthy for entry in statuses):
        raise typer.Exit(1)


@infra_app.command()
def env() -> None:
    """Print `export AGENTFORGE_...=` lines for the running servers: eval "$(agentforge infra env)"."""
    for name, value in LocalStack().env().items():
        print(f"export {name}={shlex.quote(value)}")
