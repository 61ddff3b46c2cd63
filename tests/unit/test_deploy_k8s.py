"""The k8s/ kustomizations render offline, validate strictly and agree with the code they deploy.

Every overlay is rendered with `kubectl kustomize`; built-in kinds are validated with kubernetes-validate --strict,
ScaledObjects against KEDA's own CRD schema, and the result is checked against the project: phases registered in
pyproject, topic and group names from shared/fabric/topics.py, variables from shared/settings.py. Each check also
runs on deliberately broken copies, which must be refused.
"""
from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
from kubernetes_validate.utils import SchemaNotFoundError, latest_version
from packaging.version import Version

from shared.fabric.kafka_bus import DEFAULT_PARTITIONS
from tests.deploy_support import (
    BIND_ADDRESS_VARIABLES,
    K8S,
    LONGEST_PHASE_HANDLER_S,
    RenderError,
    all_interfaces_problems,
    fetched_or_skip,
    keda_kafka_trigger_parameters,
    keda_scaledobject_schema,
    kustomize_command,
    parse_quantity,
    registered_phases,
    render,
    settings_variables,
    topics,
)

pytestmark = pytest.mark.unit

OVERLAYS = ("dev", "gpu")
GPU = "nvidia.com/gpu"
TRAINS_LABEL = "agentforge/trains"

Resources = list[dict[str, Any]]


# --- checks ------------------------------------------------------------------------------------------------------


def schema_problems(resources: Resources, scaledobject_schema: dict[str, Any]) -> list[str]:
    """Strict schema validation: kubernetes-validate for built-in kinds, KEDA's CRD for ScaledObject."""
    problems = []
    scaledobject_validator = jsonschema.Draft7Validator(scaledobject_schema)
    for resource in resources:
        name = f"{resource.get('kind')}/{resource.get('metadata', {}).get('name')}"
        if resource.get("apiVersion", "").startswith("keda.sh/"):
            if resource["kind"] != "ScaledObject":
                problems.append(f"{name}: only KEDA ScaledObjects are expected")
                continue
            problems += [f"{name}: {error.json_path}: {error.message}" for error in
                         scaledobject_validator.iter_errors(resource)]
            continue
        try:
            kubernetes_validate.validate(resource, latest_version(), strict=True)
        except kubernetes_validate.ValidationError as error:
            problems.append(f"{name}: {'.'.join(map(str, error.path))}: {error.message}")
        except SchemaNotFoundError as error:
            problems.append(f"{name}: {error.message}")
    return problems


def of_kind(resources: Resources, kind: str) -> Resources:
    return [r for r in resources if r["kind"] == kind]


def workloads(resources: Resources) -> Resources:
    return [r for r in resources if r["kind"] in ("Deployment", "StatefulSet", "Job")]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def agentforge_containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in pod_spec(workload)["containers"] if c["image"].split(":")[0] == "agentforge"]


def served_phase(deployment: dict[str, Any]) -> str | None:
    args = [arg for c in agentforge_containers(deployment) for arg in c.get("args", [])]
    return args[1] if args[:1] == ["serve"] and len(args) == 2 else None


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def container_port(container: dict[str, Any], port: int | str) -> int | None:
    if isinstance(port, int):
        return port
    return next((p["containerPort"] for p in container.get("ports", []) if p.get("name") == port), None)


def bind_address_values(resources: Resources) -> set[int]:
    """id() of every string that is the value of a container bind-address variable."""
    allowed = set()
    for config_map in of_kind(resources, "ConfigMap"):
        allowed |= {id(v) for k, v in config_map.get("data", {}).items() if k in BIND_ADDRESS_VARIABLES}
    for workload in workloads(resources):
        for container in pod_spec(workload)["containers"]:
            allowed |= {id(e["value"]) for e in container.get("env", []) if e["name"] in BIND_ADDRESS_VARIABLES
                        and "value" in e}
    return allowed


def config_problems(resources: Resources) -> tuple[dict[str, str], list[str]]:
    """The services' settings (ConfigMap + container env), and every variable that Settings does not know."""
    known = settings_variables()
    problems = []
    config: dict[str, str] = {}
    for config_map in of_kind(resources, "ConfigMap"):
        if config_map["metadata"]["name"].startswith("agentforge-config"):
            config.update(config_map["data"])
    for resource in of_kind(resources, "ConfigMap") + of_kind(resources, "Secret"):
        keys = set(resource.get("data", {})) | set(resource.get("stringData", {}))
        problems += [f"{resource['kind']}/{resource['metadata']['name']}: {key} is not a field of "
                     f"shared.settings.Settings" for key in sorted(keys)
                     if key.startswith("AGENTFORGE_") and key not in known]
    for workload in workloads(resources):
        for container in pod_spec(workload)["containers"]:
            problems += [f"{workload['metadata']['name']}: {e['name']} is not a field of shared.settings.Settings"
                         for e in container.get("env", []) if e["name"].startswith("AGENTFORGE_")
                         and e["name"] not in known]
    return config, problems


def container_problems(workload: dict[str, Any], config: dict[str, str], names: set[str]) -> list[str]:
    """Probes on the health endpoint, resources, and references to config that exists."""
    problems = []
    where = workload["metadata"]["name"]
    health_port = port_of(config.get("AGENTFORGE_HEALTH_ADDR", ":-1"))
    for container in agentforge_containers(workload):
        for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            http = container.get(probe, {}).get("httpGet")
            if http is None or http.get("path") != path:
                problems.append(f"{where}: {probe} must GET {path}")
            elif container_port(container, http["port"]) != health_port:
                problems.append(f"{where}: {probe} port is not the health port {health_port} of AGENTFORGE_HEALTH_ADDR")
        resources = container.get("resources", {})
        for name in ("cpu", "memory"):
            request, limit = resources.get("requests", {}).get(name), resources.get("limits", {}).get(name)
            if request is None or limit is None:
                problems.append(f"{where}: {name} needs both a request and a limit")
            elif parse_quantity(request) > parse_quantity(limit):
                problems.append(f"{where}: {name} request {request} is above its limit {limit}")
        for source in container.get("envFrom", []):
            ref = source.get("configMapRef") or source.get("secretRef")
            if ref["name"] not in names:
                problems.append(f"{where}: envFrom names {ref['name']}, which is not in the rendered manifests")
    if pod_spec(workload).get("securityContext", {}).get("runAsNonRoot") is not True:
        problems.append(f"{where}: pods must set runAsNonRoot")
    return problems


def scaledobject_problems(scaled: dict[str, Any], phase: str, config: dict[str, str]) -> list[str]:
    where = f"ScaledObject/{scaled['metadata']['name']}"
    names = topics(config.get("AGENTFORGE_TOPIC_PREFIX"))
    spec = scaled["spec"]
    problems = []
    if spec.get("minReplicaCount") != 0:
        problems.append(f"{where}: minReplicaCount must be 0 (an idle phase costs nothing)")
    if spec.get("maxReplicaCount", 100) > DEFAULT_PARTITIONS:
        problems.append(f"{where}: maxReplicaCount is above the input topic's {DEFAULT_PARTITIONS} partitions; "
                        f"the extra replicas would sit idle")
    # The CRD's x-kubernetes-validations rule, which JSON Schema cannot evaluate.
    if spec.get("minReplicaCount", 0) > spec.get("maxReplicaCount", 100):
        problems.append(f"{where}: minReplicaCount must be less than or equal to maxReplicaCount")
    kafka = [t for t in spec.get("triggers", []) if t.get("type") == "kafka"]
    if len(kafka) != 1:
        return problems + [f"{where}: needs exactly one kafka trigger"]
    metadata = kafka[0].get("metadata", {})
    expected = {
        "bootstrapServers": config.get("AGENTFORGE_KAFKA_BOOTSTRAP"),
        "topic": names.phase_input(phase),
        "consumerGroup": names.consumer_group(phase),
    }
    for key, value in expected.items():
        if metadata.get(key) != value:
            problems.append(f"{where}: {key} is {metadata.get(key)!r}, the service uses {value!r}")
    if not str(metadata.get("lagThreshold", "")).isdigit() or int(metadata["lagThreshold"]) < 1:
        problems.append(f"{where}: lagThreshold must be a whole number of records, at least 1")
    return problems


def trigger_parameter_problems(resources: Resources, kafka_parameters: dict[str, tuple[str, ...]]) -> list[str]:
    """Kafka trigger metadata keys KEDA reads, with values it accepts: it ignores unknown keys silently."""
    problems = []
    for scaled in of_kind(resources, "ScaledObject"):
        where = f"ScaledObject/{scaled['metadata']['name']}"
        for trigger in scaled["spec"].get("triggers", []):
            for key, value in trigger.get("metadata", {}).items() if trigger.get("type") == "kafka" else ():
                if key not in kafka_parameters:
                    problems.append(f"{where}: KEDA's kafka scaler has no parameter {key!r}")
                elif kafka_parameters[key] and value not in kafka_parameters[key]:
                    problems.append(f"{where}: {key} must be one of {kafka_parameters[key]}, not {value!r}")
    return problems


def gpu_problems(resources: Resources, gpu_expected: bool) -> list[str]:
    """GPUs only on the training phases (label agentforge/trains=true), whole ones, with a toleration."""
    problems = []
    for workload in workloads(resources):
        where = workload["metadata"]["name"]
        trains = workload["metadata"].get("labels", {}).get(TRAINS_LABEL) == "true"
        for container in pod_spec(workload)["containers"]:
            gpus = container.get("resources", {}).get("limits", {}).get(GPU)
            if gpus is not None and not (trains and gpu_expected):
                problems.append(f"{where}: asks for a GPU but is not a training phase of a GPU overlay")
            if trains and gpu_expected and gpus != 1:
                problems.append(f"{where}: a training phase in the GPU overlay needs limits {GPU}: 1, has {gpus!r}")
        tolerates = any(t.get("key") == GPU for t in pod_spec(workload).get("tolerations", []))
        if trains and gpu_expected and not tolerates:
            problems.append(f"{where}: needs a toleration for {GPU} to land on GPU nodes")
    return problems


def manifest_problems(resources: Resources, gpu_expected: bool) -> list[str]:
    """Everything a rendered overlay must satisfy beyond its schemas."""
    config, problems = config_problems(resources)
    names = {r["metadata"]["name"] for r in resources}
    deployments = {d["metadata"]["name"]: d for d in of_kind(resources, "Deployment")}
    phases = {}
    for deployment in deployments.values():
        if agentforge_containers(deployment):
            problems += container_problems(deployment, config, names)
        phase = served_phase(deployment)
        if phase is None:
            continue
        phases[phase] = deployment["metadata"]["name"]
        if phase not in registered_phases():
            problems.append(f"{deployment['metadata']['name']}: serves {phase!r}, "
                            f"not a phase in pyproject's entry points")
        if pod_spec(deployment).get("terminationGracePeriodSeconds", 30) <= LONGEST_PHASE_HANDLER_S:
            problems.append(f"{deployment['metadata']['name']}: terminationGracePeriodSeconds must exceed the "
                            f"longest phase handler ({LONGEST_PHASE_HANDLER_S} s)")
        if "replicas" in deployment["spec"]:
            problems.append(f"{deployment['metadata']['name']}: sets replicas, which its ScaledObject owns")
    missing = registered_phases() - set(phases)
    problems += [f"phase {phase!r} is registered but has no Deployment" for phase in sorted(missing)]

    scaled_targets: dict[str, list[str]] = {}
    for scaled in of_kind(resources, "ScaledObject"):
        target = scaled["spec"]["scaleTargetRef"]["name"]
        scaled_targets.setdefault(target, []).append(scaled["metadata"]["name"])
        phase = served_phase(deployments[target]) if target in deployments else None
        if phase is None:
            problems.append(f"ScaledObject/{scaled['metadata']['name']}: targets {target!r}, not a phase Deployment")
            continue
        problems += scaledobject_problems(scaled, phase, config)
    problems += [f"{name}: needs exactly one ScaledObject, has {len(scaled_targets.get(name, []))}"
                 for name in phases.values() if len(scaled_targets.get(name, [])) != 1]

    # A topic-creating Job must create every phase's input topic, with the partitions the services would give it.
    for job in of_kind(resources, "Job"):
        for container in pod_spec(job)["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            if "PHASE_TOPICS" in env:
                wanted = {topics(config.get("AGENTFORGE_TOPIC_PREFIX")).phase_input(p) for p in phases}
                problems += [f"Job/{job['metadata']['name']}: does not create {t}"
                             for t in sorted(wanted - set(env["PHASE_TOPICS"].split()))]
                if env.get("PARTITIONS") != str(DEFAULT_PARTITIONS):
                    problems.append(f"Job/{job['metadata']['name']}: PARTITIONS must be {DEFAULT_PARTITIONS}, as the "
                                    f"services create topics (shared/fabric/kafka_bus.py)")

    problems += control_problems(resources, config)
    problems += gpu_problems(resources, gpu_expected)
    allowed = bind_address_values(resources)
    for resource in resources:
        problems += all_interfaces_problems(resource, allowed, f"{resource['kind']}/{resource['metadata']['name']}")
    return problems


def control_problems(resources: Resources, config: dict[str, str]) -> list[str]:
    controls = [d for d in of_kind(resources, "Deployment")
                if any(c.get("args") == ["control"] for c in agentforge_containers(d))]
    if len(controls) != 1:
        return [f"expected one control Deployment, found {len(controls)}"]
    control = controls[0]
    pod_labels = control["spec"]["template"]["metadata"]["labels"]
    container = agentforge_containers(control)[0]
    grpc = next((e["value"] for e in container.get("env", []) if e["name"] == "AGENTFORGE_GRPC_ADDR"),
                config.get("AGENTFORGE_GRPC_ADDR"))
    if grpc is None:
        return ["the control container does not set AGENTFORGE_GRPC_ADDR"]
    for service in of_kind(resources, "Service"):
        selector = service["spec"].get("selector", {})
        if selector and selector.items() <= pod_labels.items():
            targets = {container_port(container, p.get("targetPort", p["port"])) for p in service["spec"]["ports"]}
            if port_of(grpc) in targets:
                return []
    return [f"no Service routes to the control service's gRPC port {port_of(grpc)}"]


# --- fixtures ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def kafka_parameters() -> dict[str, tuple[str, ...]]:
    return fetched_or_skip(keda_kafka_trigger_parameters, "KEDA's kafka scaler source")


@pytest.fixture(scope="session")
def scaledobject_schema() -> dict[str, Any]:
    return fetched_or_skip(keda_scaledobject_schema, "KEDA's ScaledObject CRD")


@pytest.fixture(scope="session")
def renderer() -> list[str]:
    return fetched_or_skip(kustomize_command, "a kustomize (kubectl, or one built through the Go module proxy)")


@pytest.fixture(scope="session")
def rendered(renderer) -> dict[str, Resources]:
    return {name: render(K8S / path) for name, path in
            (("base", "base"), ("dev", "overlays/dev"), ("gpu", "overlays/gpu"))}


# --- the real manifests ------------------------------------------------------------------------------------------


def test_kubernetes_validate_bundles_a_recent_kubernetes():
    assert Version(latest_version()) >= Version("1.33")


@pytest.mark.parametrize("name", ["base", *OVERLAYS])
def test_every_overlay_renders_and_validates_strictly(rendered, scaledobject_schema, name):
    resources = rendered[name]
    assert {"Namespace", "ConfigMap", "Deployment", "Service", "ScaledObject"} <= {r["kind"] for r in resources}
    assert schema_problems(resources, scaledobject_schema) == []


@pytest.mark.parametrize("name", OVERLAYS)
def test_overlays_agree_with_the_code_they_deploy(rendered, name):
    assert manifest_problems(rendered[name], gpu_expected=name == "gpu") == []


@pytest.mark.parametrize("name", ["base", *OVERLAYS])
def test_kafka_triggers_use_only_parameters_keda_reads(rendered, kafka_parameters, name):
    assert trigger_parameter_problems(rendered[name], kafka_parameters) == []


def test_every_registered_phase_runs_as_a_scaled_deployment(rendered):
    phases = {served_phase(d) for d in of_kind(rendered["dev"], "Deployment")} - {None}
    assert phases == registered_phases()
    assert len(of_kind(rendered["dev"], "ScaledObject")) == len(phases)


def test_gpu_overlay_gives_gpus_to_the_training_phases_only(rendered):
    with_gpu = {served_phase(d) for d in workloads(rendered["gpu"])
                if any(GPU in c["resources"].get("limits", {}) for c in pod_spec(d)["containers"])}
    training = {served_phase(d) for d in of_kind(rendered["gpu"], "Deployment")
                if d["metadata"].get("labels", {}).get(TRAINS_LABEL) == "true"}
    assert with_gpu == training and with_gpu  # some phase trains, and only those get a GPU
    assert "evomerge" not in with_gpu  # merging and its evaluation need no training GPU
    assert not any(GPU in str(r) for r in rendered["dev"])


# --- deliberately broken manifests are refused -------------------------------------------------------------------


def deployment(resources: Resources, phase: str) -> dict[str, Any]:
    return next(d for d in of_kind(resources, "Deployment") if served_phase(d) == phase)


def scaled_object(resources: Resources, phase: str) -> dict[str, Any]:
    return next(s for s in of_kind(resources, "ScaledObject") if s["metadata"]["name"].endswith(f"-{phase}"))


def kafka_metadata(resources: Resources, phase: str) -> dict[str, Any]:
    return scaled_object(resources, phase)["spec"]["triggers"][0]["metadata"]


def container_of(resources: Resources, phase: str) -> dict[str, Any]:
    return pod_spec(deployment(resources, phase))["containers"][0]


SCHEMA_BREAKS: dict[str, tuple[Callable[[Resources], None], str]] = {
    "misspelt pod field": (
        lambda r: pod_spec(deployment(r, "cognate")).update(terminationGracePeriod=60), "terminationGracePeriod"),
    "lagThreshold as a number": (lambda r: kafka_metadata(r, "bitnet").update(lagThreshold=1), "lagThreshold"),
    "unknown ScaledObject field": (lambda r: scaled_object(r, "evomerge")["spec"].update(minReplicas=0),
                                   "minReplicas"),
    "ScaledObject without triggers": (lambda r: scaled_object(r, "cognate")["spec"].pop("triggers"), "triggers"),
}


@pytest.mark.parametrize("case", sorted(SCHEMA_BREAKS))
def test_schema_validation_refuses_a_broken_manifest(rendered, scaledobject_schema, case):
    resources = copy.deepcopy(rendered["dev"])
    breaker, expected = SCHEMA_BREAKS[case]
    breaker(resources)
    problems = schema_problems(resources, scaledobject_schema)
    assert problems and any(expected in p for p in problems), problems


CONSISTENCY_BREAKS: dict[str, tuple[Callable[[Resources], None], str]] = {
    "topic the service does not read": (
        lambda r: kafka_metadata(r, "cognate").update(topic="agentforge.cognate.input"), "agentforge.cognate.in"),
    "lagThreshold left out": (lambda r: kafka_metadata(r, "bitnet").pop("lagThreshold"), "lagThreshold"),
    "unregistered phase": (lambda r: container_of(r, "evomerge").update(args=["serve", "evomerger"]), "evomerger"),
    "unknown setting": (lambda r: container_of(r, "cognate").setdefault("env", []).append(
        {"name": "AGENTFORGE_KAFKA_SERVERS", "value": "x:9092"}), "AGENTFORGE_KAFKA_SERVERS"),
    "0.0.0.0 outside a bind address": (lambda r: container_of(r, "cognate").setdefault("env", []).append(
        {"name": "AGENTFORGE_OTLP_ENDPOINT", "value": "http://0.0.0.0:4318"}), "0.0.0.0"),
    "short grace period": (lambda r: pod_spec(deployment(r, "bitnet")).update(terminationGracePeriodSeconds=30),
                           "terminationGracePeriodSeconds"),
    "no readiness probe": (lambda r: container_of(r, "bitnet").pop("readinessProbe"), "readinessProbe"),
    "request above limit": (lambda r: container_of(r, "cognate")["resources"]["requests"].update(memory="64Gi"),
                            "above its limit"),
    "scale floor above zero": (lambda r: scaled_object(r, "cognate")["spec"].update(minReplicaCount=1),
                               "minReplicaCount"),
    "more replicas than partitions": (lambda r: scaled_object(r, "bitnet")["spec"].update(maxReplicaCount=8),
                                      "partitions"),
    "GPU on a phase that does not train": (
        lambda r: container_of(r, "evomerge")["resources"]["limits"].update({GPU: 1}), "asks for a GPU"),
}


@pytest.mark.parametrize("case", sorted(CONSISTENCY_BREAKS))
def test_consistency_checks_refuse_a_broken_manifest(rendered, case):
    resources = copy.deepcopy(rendered["dev"])
    breaker, expected = CONSISTENCY_BREAKS[case]
    breaker(resources)
    problems = manifest_problems(resources, gpu_expected=False)
    assert problems and any(expected in p for p in problems), problems


@pytest.mark.parametrize(
    ("case", "breaker", "expected"),
    [
        ("misspelt parameter", lambda r: kafka_metadata(r, "bitnet").update(lagTreshold="1"), "'lagTreshold'"),
        ("offset policy KEDA lacks", lambda r: kafka_metadata(r, "cognate").update(offsetResetPolicy="oldest"),
         "offsetResetPolicy must be one of"),
    ],
)
def test_parameter_checks_refuse_what_keda_would_ignore(rendered, kafka_parameters, case, breaker, expected):
    resources = copy.deepcopy(rendered["dev"])
    breaker(resources)
    problems = trigger_parameter_problems(resources, kafka_parameters)
    assert problems and any(expected in p for p in problems), problems


def test_a_phase_file_that_drifts_from_the_runtime_is_caught_after_rendering(tmp_path, renderer):
    shutil.copytree(K8S, tmp_path / "k8s")
    phase_file = tmp_path / "k8s" / "base" / "phases" / "evomerge" / "kustomization.yaml"
    phase_file.write_text(phase_file.read_text().replace("value: agentforge-evomerge", "value: agentforge-merge"))
    problems = manifest_problems(render(tmp_path / "k8s" / "overlays" / "dev"), gpu_expected=False)
    assert any("consumerGroup" in p and "agentforge-evomerge" in p for p in problems), problems


def test_a_kustomization_that_cannot_render_is_an_error(tmp_path, renderer):
    shutil.copytree(K8S, tmp_path / "k8s")
    (tmp_path / "k8s" / "overlays" / "dev" / "dev-s3-credentials.env").unlink()
    with pytest.raises(RenderError, match="dev-s3-credentials.env"):
        render(tmp_path / "k8s" / "overlays" / "dev")
