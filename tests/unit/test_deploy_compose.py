"""docker-compose.yml is valid compose and agrees with the code, the Dockerfile and the rules on exposure.

Validated against compose-spec.json from compose-go (what `docker compose` itself loads it with), then checked:
images or builds exist, dependencies wait on real health checks, every AGENTFORGE_* variable is a Settings field,
every `agentforge serve X` names a registered phase, only the Jaeger UI and the control gRPC are published (on
loopback), and 0.0.0.0 appears only where a container binds. Broken copies must be refused.
"""
from __future__ import annotations

import asyncio
import copy
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from shared.fabric.health import start_health_server
from shared.fabric.kafka_bus import DEFAULT_PARTITIONS
from tests.deploy_support import (
    BIND_ADDRESS_VARIABLES,
    COMPOSE_FILE,
    DOCKERFILE,
    LONGEST_PHASE_HANDLER_S,
    REPO,
    all_interfaces_problems,
    compose_spec_schema,
    fetched_or_skip,
    read_env_file,
    registered_phases,
    settings_variables,
    topics,
)

pytestmark = pytest.mark.unit

# Host ports a user needs, and nothing else: the Jaeger UI (and its /api/v3) and the control service's gRPC.
ALLOWED_HOST_PORTS = {16686: "Jaeger UI", 50051: "control gRPC"}
LOOPBACK = "127.0.0.1"
# Compose's restart policies that leave a one-shot job exited once it succeeded.
ONE_SHOT_RESTARTS = (None, "no", "on-failure")

Compose = dict[str, Any]


# --- reading compose's shapes ------------------------------------------------------------------------------------


def environment(service: dict[str, Any]) -> dict[str, Any]:
    """`environment` in either form: a mapping, or a list of KEY=VALUE."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.partition("=")[::2] for item in env)
    return env


def bind_address_strings(service: dict[str, Any]) -> set[int]:
    """id() of the strings in the file that set a bind-address variable (its value, or the whole KEY=VALUE item)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return {id(item) for item in env if item.partition("=")[0] in BIND_ADDRESS_VARIABLES}
    return {id(value) for key, value in env.items() if key in BIND_ADDRESS_VARIABLES}


def env_files(service: dict[str, Any], root: Path) -> list[Path]:
    entries = service.get("env_file") or []
    entries = [entries] if isinstance(entries, str) else entries
    return [root / (entry if isinstance(entry, str) else entry["path"]) for entry in entries]


def command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(part) for part in cmd]


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    """Target -> condition; the list form means service_started."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {target: "service_started" for target in deps}
    return {target: spec.get("condition", "service_started") for target, spec in deps.items()}


def builds_our_image(service: dict[str, Any], root: Path) -> bool:
    build = service.get("build")
    if isinstance(build, dict):
        return (root / build.get("context", ".") / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE
    return str(service.get("image", "")).split(":")[0] == "agentforge"


def published_ports(service: dict[str, Any]) -> list[tuple[str, int | None, int]]:
    """(host address, host port or None for a random one, container port) for each entry of `ports`."""
    published = []
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            host = entry.get("published")
            published.append((entry.get("host_ip", "0.0.0.0"), int(host) if host else None, int(entry["target"])))
            continue
        parts = str(entry).split("/")[0].rsplit(":", 2)
        if len(parts) == 3:
            published.append((parts[0].strip("[]"), int(parts[1]), int(parts[2])))
        elif len(parts) == 2:
            published.append(("0.0.0.0", int(parts[0]), int(parts[1])))
        else:
            published.append(("0.0.0.0", None, int(parts[0])))
    return published


def duration_s(text: str) -> float:
    """A compose duration ("30m", "1h30m", "90s") in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", str(text))
    if not parts or "".join(n + u for n, u in parts) != str(text):
        raise ValueError(f"{text!r} is not a compose duration")
    return sum(float(number) * units[unit] for number, unit in parts)


# --- checks ------------------------------------------------------------------------------------------------------


def schema_problems(compose: Compose, schema: dict[str, Any]) -> list[str]:
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{error.json_path}: {error.message}" for error in validator.iter_errors(compose)]


def compose_problems(compose: Compose, root: Path) -> list[str]:
    services: dict[str, dict[str, Any]] = compose.get("services", {})
    known_variables = settings_variables()
    problems = []
    allowed_all_interfaces: set[int] = set()
    served: dict[str, str] = {}
    for name, service in services.items():
        build = service.get("build")
        if build is not None:
            build = {"context": build} if isinstance(build, str) else build
            dockerfile = root / build.get("context", ".") / build.get("dockerfile", "Dockerfile")
            if not dockerfile.is_file():
                problems.append(f"{name}: builds from {dockerfile.relative_to(root)}, which does not exist")
        elif not service.get("image"):
            problems.append(f"{name}: has neither an image nor a build")

        for target, condition in depends_on(service).items():
            if target not in services:
                problems.append(f"{name}: depends on {target!r}, which is not a service")
            elif condition == "service_healthy" and (
                not services[target].get("healthcheck") or services[target]["healthcheck"].get("disable")
            ):
                problems.append(f"{name}: waits for {target} to be healthy, but {target} has no healthcheck")
            elif (condition == "service_completed_successfully"
                  and services[target].get("restart") not in ONE_SHOT_RESTARTS):
                problems.append(f"{name}: waits for {target} to complete, but {target} restarts when it exits")

        variables = dict(environment(service))
        allowed_all_interfaces |= bind_address_strings(service)
        for env_file in env_files(service, root):
            # The real credentials file is not committed; its committed example stands for it.
            stand_in = env_file if env_file.is_file() else env_file.with_name(env_file.name + ".example")
            if not stand_in.is_file():
                problems.append(f"{name}: env file {env_file.relative_to(root)} is missing and has no .example")
                continue
            variables.update(read_env_file(stand_in))
        problems += [f"{name}: {key} is not a field of shared.settings.Settings" for key in sorted(variables)
                     if key.startswith("AGENTFORGE_") and key not in known_variables]

        if builds_our_image(service, root):
            problems += agentforge_service_problems(name, service, variables)
            args = command(service)
            if args[:1] == ["serve"]:
                phase = args[1] if len(args) > 1 else ""
                served[phase] = name
                if phase not in registered_phases():
                    problems.append(f"{name}: serves {phase!r}, not a phase in pyproject's entry points")

        for host_ip, host_port, container_port in published_ports(service):
            if host_port not in ALLOWED_HOST_PORTS:
                problems.append(f"{name}: publishes container port {container_port} on host port {host_port}; "
                                f"only {ALLOWED_HOST_PORTS} may be published")
            elif host_ip != LOOPBACK:
                problems.append(f"{name}: publishes {host_port} on {host_ip}, not on {LOOPBACK}")
        if service.get("network_mode") == "host":
            problems.append(f"{name}: network_mode host publishes every port it opens")

    problems += [f"phase {phase!r} is registered but no service serves it"
                 for phase in sorted(registered_phases() - set(served))]
    problems += topic_problems(services, served)
    problems += all_interfaces_problems(compose, allowed_all_interfaces, "docker-compose.yml")
    return problems


def agentforge_service_problems(name: str, service: dict[str, Any], variables: dict[str, Any]) -> list[str]:
    problems = []
    if variables.get("AGENTFORGE_MODE") != "distributed":
        problems.append(f"{name}: AGENTFORGE_MODE must be distributed")
    health_addr = str(variables.get("AGENTFORGE_HEALTH_ADDR", ""))
    test = " ".join(map(str, (service.get("healthcheck") or {}).get("test", [])))
    port = health_addr.rpartition(":")[2]
    if not port or not re.search(rf":{port}/(readyz|healthz)\b", test):
        problems.append(f"{name}: healthcheck must GET /readyz or /healthz on the port of AGENTFORGE_HEALTH_ADDR")
    if command(service)[:1] == ["serve"]:
        grace = service.get("stop_grace_period", "10s")
        if duration_s(grace) <= LONGEST_PHASE_HANDLER_S:
            problems.append(f"{name}: stop_grace_period {grace} must exceed the longest phase handler "
                            f"({LONGEST_PHASE_HANDLER_S} s)")
    return problems


def topic_problems(services: dict[str, dict[str, Any]], served: dict[str, str]) -> list[str]:
    """A topic-creating job (PHASE_TOPICS) must create the input topic of every phase that is served, with the
    partitions the services would give it (whoever comes first, a topic gets the same count)."""
    problems = []
    for name, service in services.items():
        env = environment(service)
        if "PHASE_TOPICS" in env:
            missing = {topics().phase_input(phase) for phase in served} - set(str(env["PHASE_TOPICS"]).split())
            problems += [f"{name}: does not create {topic}" for topic in sorted(missing)]
            if str(env.get("PARTITIONS")) != str(DEFAULT_PARTITIONS):
                problems.append(f"{name}: PARTITIONS must be {DEFAULT_PARTITIONS}, as the services create topics")
    return problems


# --- the real file -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> Compose:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="session")
def spec_schema() -> dict[str, Any]:
    return fetched_or_skip(compose_spec_schema, "compose-spec.json")


def test_compose_file_follows_the_compose_specification(compose, spec_schema):
    assert schema_problems(compose, spec_schema) == []


def test_compose_file_agrees_with_the_code_and_the_exposure_rules(compose):
    assert compose_problems(compose, REPO) == []


def test_compose_runs_the_servers_and_every_phase(compose):
    services = compose["services"]
    assert {"kafka", "s3", "jaeger", "control"} <= set(services)
    served = {command(s)[1] for s in services.values() if command(s)[:1] == ["serve"]}
    assert served == registered_phases()
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper
    assert services["jaeger"]["image"].startswith("jaegertracing/jaeger:2.")


@pytest.mark.asyncio
async def test_service_healthcheck_follows_the_real_health_endpoint(compose):
    """The compose healthcheck, run against shared/fabric/health.py: unhealthy while starting, healthy when ready."""
    test = compose["services"]["cognate"]["healthcheck"]["test"]
    assert test[:2] == ["CMD", "python"], "the image has python, not curl"
    ready = asyncio.Event()
    runner = await start_health_server("127.0.0.1:0", ready)
    try:
        port = runner.addresses[0][1]
        check = [sys.executable, *(part.replace(":8080/", f":{port}/") for part in test[2:])]

        async def exit_code() -> int:
            process = await asyncio.create_subprocess_exec(*check, stderr=asyncio.subprocess.DEVNULL)
            return await process.wait()

        assert await exit_code() != 0
        ready.set()
        assert await exit_code() == 0
    finally:
        await runner.cleanup()


def test_s3_credentials_file_is_ignored_and_only_its_example_is_committed():
    tracked = subprocess.run(["git", "ls-files", "infra/docker/"], cwd=REPO, capture_output=True, text=True, check=True)
    assert "infra/docker/s3.env\n" not in tracked.stdout + "\n"
    ignored = subprocess.run(["git", "check-ignore", "-q", "infra/docker/s3.env"], cwd=REPO)
    assert ignored.returncode == 0, "infra/docker/s3.env must be git-ignored"
    example = read_env_file(REPO / "infra" / "docker" / "s3.env.example")
    assert set(example) == {"AGENTFORGE_S3_ACCESS_KEY", "AGENTFORGE_S3_SECRET_KEY"}


# --- deliberately broken copies are refused ----------------------------------------------------------------------


def service(compose: Compose, name: str) -> dict[str, Any]:
    return compose["services"][name]


def own_environment(compose: Compose, name: str) -> dict[str, Any]:
    """The service's environment as a mapping of its own (the file shares one through a YAML anchor)."""
    env = dict(environment(service(compose, name)))
    service(compose, name)["environment"] = env
    return env


def as_list_with_otlp_everywhere(compose: Compose) -> list[tuple[str, Any]]:
    env = dict(environment(service(compose, "cognate")))
    env["AGENTFORGE_OTLP_ENDPOINT"] = "http://0.0.0.0:4318"
    return list(env.items())


def test_list_form_environments_are_read_like_mappings(compose):
    # The x- templates are only anchors for the services; with the services rewritten they stand alone.
    as_lists = {key: value for key, value in copy.deepcopy(compose).items() if not key.startswith("x-")}
    for each in as_lists["services"].values():
        each["environment"] = [f"{k}={v}" for k, v in environment(each).items()]
    assert compose_problems(as_lists, REPO) == []


BREAKS: dict[str, tuple[Callable[[Compose], None], str]] = {
    "dependency that does not exist": (
        lambda c: service(c, "bitnet").update(depends_on={"kafka-setup": {"condition": "service_started"}}),
        "'kafka-setup', which is not a service"),
    "waits for health that is never checked": (lambda c: service(c, "jaeger").pop("healthcheck"),
                                               "has no healthcheck"),
    "waits for a job that restarts": (lambda c: service(c, "kafka-init").update(restart="always"),
                                      "restarts when it exits"),
    "unknown setting": (lambda c: own_environment(c, "control").update(AGENTFORGE_GRPC_PORT="50051"),
                        "AGENTFORGE_GRPC_PORT"),
    "unregistered phase": (lambda c: service(c, "evomerge").update(command=["serve", "evo-merge"]), "'evo-merge'"),
    "Kafka published to the host": (lambda c: service(c, "kafka").update(ports=["127.0.0.1:9092:9092"]),
                                    "host port 9092"),
    "UI published on every interface": (lambda c: service(c, "jaeger").update(ports=["16686:16686"]),
                                        "not on 127.0.0.1"),
    "0.0.0.0 outside a bind address": (
        lambda c: own_environment(c, "cognate").update(AGENTFORGE_OTLP_ENDPOINT="http://0.0.0.0:4318"), "0.0.0.0"),
    "0.0.0.0 in a KEY=VALUE list": (
        lambda c: service(c, "cognate").update(environment=[f"{k}={v}" for k, v in as_list_with_otlp_everywhere(c)]),
        "0.0.0.0"),
    "Dockerfile that does not exist": (
        lambda c: service(c, "control").update(build={"context": ".", "dockerfile": "infra/docker/Containerfile"}),
        "does not exist"),
    "phase without its input topic": (
        lambda c: own_environment(c, "kafka-init").update(PHASE_TOPICS="agentforge.cognate.in agentforge.bitnet.in"),
        "agentforge.evomerge.in"),
    "topics with another partition count": (lambda c: own_environment(c, "kafka-init").update(PARTITIONS=4),
                                            "PARTITIONS"),
    "phase stopped before its handler ends": (lambda c: service(c, "cognate").update(stop_grace_period="10s"),
                                              "stop_grace_period"),
    "healthcheck on the wrong port": (
        lambda c: own_environment(c, "bitnet").update(AGENTFORGE_HEALTH_ADDR="0.0.0.0:9090"), "healthcheck"),
}


@pytest.mark.parametrize("case", sorted(BREAKS))
def test_consistency_checks_refuse_a_broken_compose_file(compose, case):
    broken = copy.deepcopy(compose)
    breaker, expected = BREAKS[case]
    breaker(broken)
    problems = compose_problems(broken, REPO)
    assert problems and any(expected in p for p in problems), problems


@pytest.mark.parametrize(
    ("case", "breaker", "expected"),
    [
        ("misspelt condition", lambda c: service(c, "control")["depends_on"]["s3"].update(condition="service_healty"),
         "service_healty"),
        ("unknown service key", lambda c: service(c, "kafka").update(dependson=["s3"]), "dependson"),
    ],
)
def test_schema_refuses_a_broken_compose_file(compose, spec_schema, case, breaker, expected):
    broken = copy.deepcopy(compose)
    breaker(broken)
    problems = schema_problems(broken, spec_schema)
    assert problems and any(expected in p for p in problems), problems
