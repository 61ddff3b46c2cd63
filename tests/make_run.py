"""Each phase's config in `make run`'s pipeline (the `tiny` preset, shared/fabric/presets/tiny.yaml), for the
session fixtures and slow tests that check what `make run` makes."""
from __future__ import annotations

from typing import Any

from shared.fabric.cli import DEFAULT_PRESET, spec_file
from shared.phase import PhaseConfig, get_phase


def make_run_config(phase: str, **changes: Any) -> PhaseConfig:
    """The phase's config as `make run` runs it (seed 0), with `changes` to its top-level fields."""
    (step,) = [step for step in spec_file(None, DEFAULT_PRESET).steps if step.phase == phase]
    return get_phase(phase).parse_config({**step.config, **changes})
