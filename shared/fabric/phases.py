"""Finding a phase from the name a PipelineSpec step gives.

A registered name ("cognate") goes through shared.phase.get_phase (entry points). "module:Class" loads
a Phase subclass that is not registered (test phases that separate service processes must load too), only
where Settings.allow_module_phases is on: the name comes from events and requests, and an import runs code.
"""
from __future__ import annotations

import importlib

from shared.phase import Phase, get_phase, registered_phase
from shared.settings import Settings


def load_phase(spec: str) -> Phase:
    if ":" not in spec:
        return get_phase(spec)
    if not Settings().allow_module_phases:
        raise LookupError(
            f"phase {spec!r} names a module, and module phases are off: register the phase under the "
            "agentforge.phases entry points, or set AGENTFORGE_ALLOW_MODULE_PHASES=true (development only)"
        )
    module_name, _, class_name = spec.partition(":")
    try:
        phase_cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise LookupError(f"cannot load phase {spec!r}: {error}") from error
    if not (isinstance(phase_cls, type) and issubclass(phase_cls, Phase)):
        raise TypeError(f"{spec!r} is not a shared.phase.Phase subclass")
    return phase_cls()


def phase_name(spec: str) -> str:
    """The name topics and consumer groups use: the registered name, or the loaded class's `name`.
    LookupError for a phase that is not registered, so no event is ever sent to a topic nobody serves."""
    if ":" in spec:
        return load_phase(spec).name
    registered_phase(spec)
    return spec
