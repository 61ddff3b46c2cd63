"""Every command the deployment files start is a command of the `agentforge` CLI (the image's entry point).

The commands are collected from docker-compose.yml and from the rendered dev overlay, then asked for --help
through typer's test runner: an unknown command or sub-command exits non-zero.
"""
from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from shared.cli import app
from tests.deploy_support import COMPOSE_FILE, K8S, fetched_or_skip, kustomize_command, render

pytestmark = pytest.mark.unit


def compose_commands() -> set[tuple[str, ...]]:
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    return {tuple(s["command"]) for s in services.values() if str(s.get("image", "")).startswith("agentforge")}


def manifest_commands() -> set[tuple[str, ...]]:
    commands = set()
    for resource in render(K8S / "overlays" / "dev"):
        template = resource.get("spec", {}).get("template", {}).get("spec", {})
        commands |= {tuple(c.get("args", [])) for c in template.get("containers", [])
                     if c["image"].split(":")[0] == "agentforge"}
    return commands


def test_deployments_start_the_phase_services_and_the_control_service():
    fetched_or_skip(kustomize_command, "a kustomize")
    assert compose_commands() == manifest_commands()
    assert ("control",) in compose_commands()
    assert {c[0] for c in compose_commands()} == {"serve", "control"}


@pytest.mark.parametrize("command", sorted(compose_commands()), ids=" ".join)
def test_every_deployed_command_exists_in_the_cli(command):
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0, f"`agentforge {' '.join(command)}` is not a command: {result.output}"


def test_an_unknown_command_is_refused_by_the_cli():
    assert CliRunner().invoke(app, ["serve-phase", "cognate", "--help"]).exit_code != 0
