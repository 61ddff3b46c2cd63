"""Kafka topic and consumer-group names, one convention for services, tests and manifests.

    <prefix>.<phase>.in   ModelReady events a phase consumes (one topic per phase)
    <prefix>.runs         pipeline-level events, keyed by run id (started, progress, completed, failed)
    <prefix>.dlq          dead letters, with headers saying where they came from and why
    <prefix>-<phase>      the consumer group of a phase's service replicas

The prefix is Settings.topic_prefix ("agentforge").
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from shared.settings import Settings

# Kafka allows [a-zA-Z0-9._-]; phase names stay lower-case words so topic and group names are predictable.
_PHASE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


def check_phase_name(name: str) -> str:
    if not _PHASE_NAME.match(name):
        raise ValueError(f"phase name {name!r} cannot name a topic: use lower-case letters, digits, '_' or '-'")
    return name


@dataclass(frozen=True)
class Topics:
    prefix: str = "agentforge"

    @classmethod
    def from_settings(cls, settings: Settings) -> Topics:
        return cls(prefix=settings.topic_prefix)

    def phase_input(self, phase: str) -> str:
        return f"{self.prefix}.{check_phase_name(phase)}.in"

    @property
    def runs(self) -> str:
        return f"{self.prefix}.runs"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}.dlq"

    def consumer_group(self, phase: str) -> str:
        return f"{self.prefix}-{check_phase_name(phase)}"
