"""What the deployment tests share: the project's own facts, schemas from their upstream projects, rendering.

No Docker engine or cluster is needed. Schemas come from the projects that define them, downloaded once through
the Go module proxy into Settings.cache_dir/gomod: KEDA's CRD for ScaledObject and compose-go's compose-spec.json
(the schema `docker compose` itself validates against). Built-in Kubernetes kinds are checked against the schemas
that kubernetes-validate bundles.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import tempfile
import tomllib
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from shared.fabric.topics import Topics
from shared.phase import ENTRY_POINT_GROUP
from shared.settings import Settings

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "infra" / "docker" / "Dockerfile"
K8S = REPO / "k8s"

KEDA_MODULE, KEDA_VERSION = "github.com/kedacore/keda/v2", "v2.21.0"
COMPOSE_GO_MODULE, COMPOSE_GO_VERSION = "github.com/compose-spec/compose-go/v2", "v2.16.2"
# Where kubectl is missing: the kustomize that kubectl 1.32 embeds, built once (about 2 minutes on 2 cores).
KUSTOMIZE_PACKAGE, KUSTOMIZE_VERSION = "sigs.k8s.io/kustomize/kustomize/v5", "v5.5.0"

# The only settings whose value may say 0.0.0.0: what a server inside a container binds (a container must listen on
# its own interfaces to be reachable). Everywhere else, and in every default, servers bind loopback.
BIND_ADDRESS_VARIABLES = frozenset(
    {"AGENTFORGE_GRPC_ADDR", "AGENTFORGE_HEALTH_ADDR", "KAFKA_LISTENERS", "VGW_PORT", "JAEGER_LISTEN_HOST"}
)
ALL_INTERFACES = "0.0.0.0"

# Phase handlers run for minutes (the tiny preset's Cognate trains three specialists in a few); a stopped service
# finishes the event in hand, so the stop grace period must outlast the longest one with room to spare.
LONGEST_PHASE_HANDLER_S = 900


class Unobtainable(RuntimeError):
    """An upstream schema or tool could not be had (no Go toolchain, or no route to the module proxy)."""


T = TypeVar("T")


def fetched_or_skip(fetch: Callable[[], T], what: str) -> T:
    """For fixtures: what `fetch` returns, or a skip that says why it could not be had."""
    try:
        return fetch()
    except Unobtainable as reason:
        pytest.skip(f"{what} is not obtainable: {reason}")


# --- the project's own facts ---------------------------------------------------------------------------------


def settings_variables() -> frozenset[str]:
    """The environment variables shared/settings.py reads: AGENTFORGE_<FIELD>."""
    prefix = Settings.model_config["env_prefix"]
    return frozenset(prefix + name.upper() for name in Settings.model_fields)


def registered_phases() -> frozenset[str]:
    """Phase names in pyproject.toml's entry points: what `agentforge serve <phase>` accepts."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    return frozenset(pyproject["project"]["entry-points"][ENTRY_POINT_GROUP])


def topics(prefix: str | None = None) -> Topics:
    return Topics(prefix=prefix or Settings.model_fields["topic_prefix"].default)


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a Docker/kustomize env file; comments and blank lines skipped."""
    entries = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            if not sep:
                raise ValueError(f"{path}: {line!r} is not KEY=VALUE")
            entries[key.strip()] = value.strip()
    return entries


# --- 0.0.0.0 only where a container binds ------------------------------------------------------------------------


def strings_in(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """Every string in a YAML tree (keys included), with a dotted path to it."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from strings_in(key, f"{path}.<key>")
            yield from strings_in(value, f"{path}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from strings_in(value, f"{path}[{index}]")
    elif isinstance(node, str):
        yield path, node


def all_interfaces_problems(node: Any, allowed: set[int], where: str) -> list[str]:
    """0.0.0.0 anywhere but in the strings whose id() is in `allowed` (the values of bind-address variables)."""
    return [
        f"{where}{path}: says {ALL_INTERFACES} but is not a container bind address ({sorted(BIND_ADDRESS_VARIABLES)})"
        for path, text in strings_in(node)
        if ALL_INTERFACES in text and id(text) not in allowed
    ]


# --- Kubernetes resource quantities -----------------------------------------------------------------------------

_QUANTITY = re.compile(r"^([+-]?[0-9.]+)([eE][+-]?[0-9]+|Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$")
_SUFFIX = {
    None: Decimal(1), "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"),
    "k": Decimal(10) ** 3, "M": Decimal(10) ** 6, "G": Decimal(10) ** 9, "T": Decimal(10) ** 12,
    "P": Decimal(10) ** 15, "E": Decimal(10) ** 18,
    "Ki": Decimal(2) ** 10, "Mi": Decimal(2) ** 20, "Gi": Decimal(2) ** 30, "Ti": Decimal(2) ** 40,
    "Pi": Decimal(2) ** 50, "Ei": Decimal(2) ** 60,
}


def parse_quantity(value: str | int | float) -> Decimal:
    """A Kubernetes quantity ("250m", "4Gi", 2) as a number; ValueError for anything the API server would refuse."""
    match = _QUANTITY.match(str(value))
    if match is None:
        raise ValueError(f"{value!r} is not a Kubernetes quantity")
    number, suffix = match.groups()
    if suffix and suffix[0] in "eE":
        return Decimal(number + suffix)
    return Decimal(number) * _SUFFIX[suffix]


# --- upstream schemas, through the Go module proxy -------------------------------------------------------------


def run_go(args: list[str], **env: str) -> str:
    """A `go` command outside any module (no go.mod is read or written), with the module cache under ours."""
    go = shutil.which("go")
    if go is None:
        raise Unobtainable(f"no `go` on PATH for `go {' '.join(args)}` (through the Go module proxy)")
    env = {**os.environ, "GOMODCACHE": str(Settings().cache_dir / "gomod"), "GOTOOLCHAIN": "local", **env}
    with tempfile.TemporaryDirectory() as scratch:
        result = subprocess.run([go, *args], cwd=scratch, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        detail = (result.stdout + result.stderr).strip().splitlines()[-1:] or ["no output"]
        raise Unobtainable(f"`go {' '.join(args)}` failed: {detail[0]}")
    return result.stdout


def go_module_dir(module: str, version: str) -> Path:
    """The source folder of a Go module, downloaded once through the Go module proxy into the cache."""
    return Path(json.loads(run_go(["mod", "download", "-json", f"{module}@{version}"]))["Dir"])


def _closed(schema: Any) -> Any:
    """A structural schema with unknown fields forbidden, as the API server's strict field validation does.

    CRD schemas leave additionalProperties out (the API server prunes unknown fields, and `kubectl apply`'s default
    strict validation rejects them); JSON Schema would accept them silently, so add it where the CRD gives
    properties and neither a map type nor x-kubernetes-preserve-unknown-fields.
    """
    if isinstance(schema, dict):
        schema = {key: _closed(value) for key, value in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_closed(item) for item in schema]
    return schema


def keda_scaledobject_schema(api_version: str = "v1alpha1") -> dict[str, Any]:
    crd_file = go_module_dir(KEDA_MODULE, KEDA_VERSION) / "config" / "crd" / "bases" / "keda.sh_scaledobjects.yaml"
    crd = yaml.safe_load(crd_file.read_text())
    for version in crd["spec"]["versions"]:
        if version["name"] == api_version:
            return _closed(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    raise Unobtainable(f"KEDA {KEDA_VERSION}'s ScaledObject CRD has no version {api_version}")


# `keda:"name=lagThreshold,order=triggerMetadata,default=10"` struct tags declare each scaler's parameters.
_KEDA_PARAMETER = re.compile(r'keda:"name=([A-Za-z0-9]+),order=([A-Za-z;]+)([^"]*)"')


def keda_kafka_trigger_parameters() -> dict[str, tuple[str, ...]]:
    """The metadata keys KEDA's kafka scaler reads from a trigger, each with its allowed values (() = any).

    KEDA ignores keys it does not know (a misspelt lagThreshold silently becomes the default of 10), so the keys
    are read from the scaler's own source: parameters whose order includes triggerMetadata, plus <name>FromEnv for
    those that may be resolved from the target container's environment.
    """
    source = (go_module_dir(KEDA_MODULE, KEDA_VERSION) / "pkg" / "scalers" / "kafka_scaler.go").read_text()
    parameters: dict[str, tuple[str, ...]] = {}
    for name, order, options in _KEDA_PARAMETER.findall(source):
        orders = order.split(";")
        enum = re.search(r"enum=([A-Za-z0-9_;]+)", options)
        allowed = tuple(enum.group(1).split(";")) if enum else ()
        if "triggerMetadata" in orders:
            parameters[name] = allowed
        if "resolvedEnv" in orders:
            parameters[f"{name}FromEnv"] = ()
    if "lagThreshold" not in parameters:
        raise Unobtainable(f"could not read the kafka scaler's parameters from KEDA {KEDA_VERSION}")
    return parameters


def compose_spec_schema() -> dict[str, Any]:
    schema_file = go_module_dir(COMPOSE_GO_MODULE, COMPOSE_GO_VERSION) / "schema" / "compose-spec.json"
    return json.loads(schema_file.read_text())


# --- rendering kustomizations ------------------------------------------------------------------------------------


class RenderError(RuntimeError):
    pass


def kustomize_command() -> list[str]:
    """`kubectl kustomize`, or where kubectl is missing `kustomize build`, built once through the Go module proxy."""
    kubectl = shutil.which("kubectl")
    if kubectl is not None:
        return [kubectl, "kustomize"]
    binary = Settings().cache_dir / "tools" / f"kustomize-{KUSTOMIZE_VERSION}"
    if not binary.exists():
        binary.parent.mkdir(parents=True, exist_ok=True)
        # Built aside and moved in whole, so a build cut short never leaves a broken binary behind.
        with tempfile.TemporaryDirectory(dir=binary.parent) as gobin:
            run_go(["install", f"{KUSTOMIZE_PACKAGE}@{KUSTOMIZE_VERSION}"], GOBIN=gobin, GOFLAGS="-buildvcs=false")
            (Path(gobin) / "kustomize").rename(binary)
    return [str(binary), "build"]


def render(kustomization_dir: Path) -> list[dict[str, Any]]:
    """The kustomization rendered offline (no cluster), parsed; RenderError says why it cannot be."""
    command = [*kustomize_command(), str(kustomization_dir)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RenderError(f"`{' '.join(command)}` failed: {result.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]
