"""Apache Kafka 4.x, single node in KRaft mode, run from the jars Maven Central serves.

infra/local/kafka/pom.xml names kafka_2.13 (and a log4j binding); `mvn dependency:copy-dependencies`
puts its runtime class path under the cache folder once per Kafka version. Storage is formatted with
`kafka.tools.StorageTool format --standalone` (a dynamic quorum whose only voter is this node), then
`kafka.Kafka` runs the broker and the controller in one JVM.
"""
from __future__ import annotations

import asyncio
import base64
import json
import shutil
import socket
import subprocess
import uuid
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from string import Template

from aiokafka.admin import AIOKafkaAdminClient

from shared.localinfra.layout import asset
from shared.localinfra.ports import LOOPBACK
from shared.localinfra.server import Launch, LocalServer, NotHealthy

POM_NS = {"pom": "http://maven.apache.org/POM/4.0.0"}
# The JVM's defaults (a quarter of RAM) are far more than a one-node test broker uses.
JVM_OPTIONS = ["-Xms256m", "-Xmx1g", "-XX:+UseG1GC", "-Djava.awt.headless=true",
               # The C1 compiler only: a local broker then starts in about half the time on two busy cores
               # (7.4 s instead of 14.1 s measured here), at a throughput cost that tests do not notice.
               "-XX:TieredStopAtLevel=1",
               # Listen on plain IPv4 loopback rather than an IPv4-mapped IPv6 socket.
               "-Djava.net.preferIPv4Stack=true"]


def java() -> str:
    found = shutil.which("java")
    if found is None:
        raise RuntimeError("Kafka needs a Java 17+ runtime (`java` on PATH)")
    return found


def random_cluster_id() -> str:
    # Kafka's Uuid.toString(): URL-safe base64 of 16 random bytes, without padding; Kafka's own generator
    # also skips ids starting with "-" so they are never read as a command-line flag.
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


class KafkaServer(LocalServer):
    name = "kafka"
    port_names = ("broker", "controller")

    @property
    def version(self) -> str:
        pom = ElementTree.parse(asset("kafka", "pom.xml"))
        return pom.find("pom:properties/pom:kafka.version", POM_NS).text

    @property
    def libs_dir(self) -> Path:
        return self.layout.bin_dir / f"kafka-{self.version}-libs"

    @property
    def config_file(self) -> Path:
        return self.layout.server_dir(self.name) / "server.properties"

    @property
    def format_marker(self) -> Path:
        return self.layout.server_dir(self.name) / "formatted.json"

    def installed(self) -> bool:
        return self.libs_dir.is_dir()

    def install(self) -> None:
        if self.installed():
            return
        mvn = shutil.which("mvn")
        if mvn is None:
            raise RuntimeError("installing Kafka needs Apache Maven (`mvn` on PATH) to fetch its jars")
        partial = self.libs_dir.with_name(self.libs_dir.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        maven = subprocess.run([mvn, "-q", "-B", "-f", str(asset("kafka", "pom.xml")), "dependency:copy-dependencies",
                                "-DincludeScope=runtime", f"-DoutputDirectory={partial}"],
                               capture_output=True, text=True)
        if maven.returncode != 0:
            raise RuntimeError(f"`mvn dependency:copy-dependencies` failed:\n{maven.stdout}{maven.stderr}")
        partial.rename(self.libs_dir)

    def _java(self, main_class: str, *args: str) -> list[str]:
        return [java(), *JVM_OPTIONS, f"-Dlog4j2.configurationFile={asset('kafka', 'log4j2.properties')}",
                "-cp", f"{self.libs_dir}/*", main_class, *args]

    def prepare(self, ports: dict[str, int]) -> None:
        template = Template(asset("kafka", "server.properties").read_text())
        self.config_file.parent.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(template.substitute(
            broker_port=ports["broker"], controller_port=ports["controller"], data_dir=self.data_dir))
        # The formatted storage records the controller's endpoint as the quorum's only voter; when the port
        # changes (it was taken by another program) the local data starts over rather than disagree with it.
        formatted_for = {"controller_port": ports["controller"]}
        formatted = (self.data_dir / "meta.properties").exists() and self.format_marker.exists()
        if formatted and json.loads(self.format_marker.read_text()) == formatted_for:
            return
        shutil.rmtree(self.data_dir, ignore_errors=True)
        with open(self.log_file, "ab") as log:
            subprocess.run(self._java("kafka.tools.StorageTool", "format", "--standalone",
                                      "--cluster-id", random_cluster_id(), "--config", str(self.config_file)),
                           stdout=log, stderr=subprocess.STDOUT, check=True)
        self.format_marker.write_text(json.dumps(formatted_for))

    def launch(self, ports: dict[str, int]) -> Launch:
        return Launch(self._java("kafka.Kafka", str(self.config_file)))

    def check_health(self, ports: dict[str, int]) -> None:
        try:  # a refused connection is the common case while the JVM starts; aiokafka would log it loudly
            socket.create_connection((LOOPBACK, ports["broker"]), timeout=2).close()
        except OSError as error:
            raise NotHealthy(f"Kafka's port {ports['broker']} does not accept connections: {error}") from error
        cluster = asyncio.run(_describe_cluster(f"{LOOPBACK}:{ports['broker']}"))
        if not cluster["brokers"] or cluster["controller_id"] < 0:
            raise NotHealthy(f"no broker or no active controller in the metadata: {cluster}")

    def settings_env(self, ports: dict[str, int]) -> dict[str, str]:
        return {"AGENTFORGE_KAFKA_BOOTSTRAP": f"{LOOPBACK}:{ports['broker']}"}


async def _describe_cluster(bootstrap: str) -> dict:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    try:
        await admin.start()
        return await admin.describe_cluster()
    except Exception as error:  # aiokafka raises several unrelated types while the broker starts
        raise NotHealthy(f"Kafka at {bootstrap} does not answer: {error!r}") from error
    finally:
        await admin.close()
