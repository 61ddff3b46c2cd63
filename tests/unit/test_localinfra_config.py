"""The committed infra/local assets: pins, loopback-only endpoints, variables that Settings understands."""
import re
import string

import pytest
import yaml

from shared.localinfra.gobuild import GoTool
from shared.localinfra.jaeger import JAEGER, JaegerServer
from shared.localinfra.kafka import KafkaServer, random_cluster_id
from shared.localinfra.layout import InfraLayout, asset
from shared.localinfra.s3 import VERSITYGW, S3Server
from shared.settings import Settings

pytestmark = pytest.mark.unit


def _endpoints(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "endpoint":
                yield value
            else:
                yield from _endpoints(value)
    elif isinstance(node, list):
        for item in node:
            yield from _endpoints(item)


def test_go_tools_are_pinned_to_the_expected_versions(tmp_path):
    assert JAEGER.version() == "v1.76.0"
    assert VERSITYGW.version() == "v1.8.0"
    assert JAEGER.binary(tmp_path) == tmp_path / "jaeger-v1.76.0"  # the cached build is keyed by version


def test_go_tool_that_its_module_does_not_require_is_an_error():
    with pytest.raises(ValueError, match="does not require"):
        GoTool(name="jaeger", module="example.com/absent", package="example.com/absent/cmd").version()


def test_every_jaeger_endpoint_is_on_loopback_and_takes_a_port_we_pick(tmp_path):
    config = yaml.safe_load(asset("jaeger", "config.yaml").read_text())
    endpoints = list(_endpoints(config))
    assert len(endpoints) == len(JaegerServer.port_names)
    assert all(endpoint.startswith("127.0.0.1:${env:") for endpoint in endpoints)
    variables = {re.search(r"\$\{env:(\w+)\}", endpoint).group(1) for endpoint in endpoints}
    ports = {name: 1000 + index for index, name in enumerate(JaegerServer.port_names)}
    launch = JaegerServer(InfraLayout(root=tmp_path)).launch(ports)
    assert variables == set(launch.env)


def test_kafka_listens_on_loopback_and_fills_every_placeholder(tmp_path):
    template = string.Template(asset("kafka", "server.properties").read_text())
    rendered = template.substitute(broker_port=9, controller_port=10, data_dir="/data")  # KeyError if one is missing
    properties = dict(line.split("=", 1) for line in rendered.splitlines() if line and not line.startswith("#"))
    assert properties["listeners"] == "PLAINTEXT://127.0.0.1:9,CONTROLLER://127.0.0.1:10"
    assert properties["process.roles"] == "broker,controller"
    assert properties["offsets.topic.replication.factor"] == "1"
    assert properties["group.initial.rebalance.delay.ms"] == "0"
    assert KafkaServer(InfraLayout(root=tmp_path)).version == "4.4.0"


def test_cluster_id_is_a_kafka_uuid():
    cluster_id = random_cluster_id()
    assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_-]{21}", cluster_id)


def test_exported_variables_are_settings_fields(tmp_path):
    layout = InfraLayout(root=tmp_path)
    s3 = S3Server(layout, bucket="forge")
    s3.ensure_credentials()
    exported = {**KafkaServer(layout).settings_env({"broker": 9092, "controller": 9093}),
                **s3.settings_env({"s3": 9000}),
                **JaegerServer(layout).settings_env({name: 4000 + index
                                                   for index, name in enumerate(JaegerServer.port_names)})}
    ours = {name.removeprefix("AGENTFORGE_").lower(): value for name, value in exported.items()
            if name.startswith("AGENTFORGE_")}
    assert set(ours) == {"kafka_bootstrap", "s3_endpoint", "s3_access_key", "s3_secret_key", "s3_bucket",
                         "otlp_endpoint", "jaeger_query_url"}
    settings = Settings(**ours)
    assert settings.kafka_bootstrap == "127.0.0.1:9092" and settings.s3_bucket == "forge"
    assert settings.otlp_endpoint == exported["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://127.0.0.1:4001"


def test_s3_keys_are_made_once_and_private(tmp_path):
    s3 = S3Server(InfraLayout(root=tmp_path), bucket="forge")
    s3.ensure_credentials()
    first = s3.credentials()
    s3.ensure_credentials()
    assert s3.credentials() == first
    assert len(first["access_key"]) >= 16 and len(first["secret_key"]) >= 32
    assert (tmp_path / "s3-credentials.json").stat().st_mode & 0o077 == 0
