import typer


def register_fabric_commands(app: typer.Typer) -> None:
    pass
