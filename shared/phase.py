"""The one interface every phase implements, and the registry that finds phases by name.

A phase is a pure transform: (models, config) -> (models, report). It knows nothing of Kafka, S3 or
OpenTelemetry, so the same code runs embedded, inside a service and in a test. Data comes from the
shared, seeded data module, chosen by the config. Phases register through the entry-point group
"agentforge.phases", so this package never imports services/.
"""
from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Callable, ClassVar

from pydantic import BaseModel, ConfigDict

ENTRY_POINT_GROUP = "agentforge.phases"

# progress(fraction in [0, 1], message); phases call it on long work, the runtime turns it into events.
# It raises PhaseCancelled when the runtime abandons the phase, so a phase needs no cancellation code of its own.
ProgressFn = Callable[[float, str], None]


class PhaseCancelled(Exception):
    """Raised inside a phase's transform, from progress(), once its run was abandoned (Ctrl-C)."""


def no_progress(fraction: float, message: str) -> None:
    pass


def print_every_percent(echo: Callable[[str], None] = print) -> ProgressFn:
    """A progress callback for command lines: echoes "[ 42%] message" at most once per percent of the run."""
    last = -1

    def show(fraction: float, message: str) -> None:
        nonlocal last
        if int(fraction * 100) > last:
            last = int(fraction * 100)
            echo(f"[{fraction:4.0%}] {message}")

    return show


class PhaseConfig(BaseModel):
    """Base for every phase's config: frozen, and unknown keys are an error, not a silent default."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = 0

    def config_hash(self) -> str:
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass
class ForgedModel:
    """A model with its tokenizer, as phases pass them to each other."""

    model: Any  # transformers.PreTrainedModel
    tokenizer: Any  # transformers.PreTrainedTokenizerFast
    name: str = "model"  # role in the run, e.g. "specialist-reasoning"; becomes the checkpoint's name
    # Files that travel with the model through every later phase unchanged (name -> bytes), e.g. Quiet-STaR's
    # mixing head; a checkpoint keeps them under carried/. A phase hands them on with dataclasses.replace.
    carried: dict[str, bytes] = field(default_factory=dict)


@dataclass
class PhaseResult:
    models: list[ForgedModel]
    # JSON-serialisable; every number in it measured by the phase on a real model.
    report: dict[str, Any] = field(default_factory=dict)
    # Extra files stored beside the weights in the checkpoint, name -> bytes (e.g. a packed ternary file).
    extra_files: dict[str, dict[str, bytes]] = field(default_factory=dict)  # model name -> files


class Phase(ABC):
    name: ClassVar[str]
    # Bump when the same input and config would give a different output: it is part of the output key.
    version: ClassVar[str] = "1"
    Config: ClassVar[type[PhaseConfig]] = PhaseConfig

    def parse_config(self, raw: dict[str, Any] | None) -> PhaseConfig:
        return self.Config.model_validate(raw or {})

    @abstractmethod
    def transform(
        self, models: list[ForgedModel], config: PhaseConfig, progress: ProgressFn = no_progress
    ) -> PhaseResult:
        """Turn the input models into output models and a report of measured numbers."""

    def figures(self, report: dict[str, Any]) -> list[tuple[str, Any]]:
        """(title, matplotlib Figure) pairs drawn from this phase's report for `agentforge report`; by default
        every training curve in it (shared.report). A phase adds its own: search fitness, reward, fronts."""
        from shared.report import curve_figures

        return curve_figures(report)

    def thinking_model(self, forged: ForgedModel) -> Any | None:
        """`forged` wrapped to think before each token, from what this phase made it carry (Quiet-STaR's
        mixing head); None where this phase adds no thinking. `agentforge generate --think` asks every phase."""
        return None


def _quant_method(forged: ForgedModel) -> str | None:
    quantization = getattr(forged.model.config, "quantization_config", None)
    if not quantization:
        return None
    method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization.quant_method
    return str(getattr(method, "value", method))  # transformers' QuantizationMethod enum, or its string


def _one_model(models: list[ForgedModel], phase: str) -> ForgedModel:
    if len(models) != 1:
        raise ValueError(f"the {phase} phase takes exactly one model, got {len(models)}")
    return models[0]


def one_float_model(models: list[ForgedModel], phase: str) -> ForgedModel:
    """The one model a phase that trains a float model takes; a ValueError for more, fewer or a quantized one."""
    forged = _one_model(models, phase)
    if _quant_method(forged):
        raise ValueError(f"model {forged.name!r} is already quantized; the {phase} phase takes a float model")
    return forged


def one_ternary_model(models: list[ForgedModel], phase: str) -> ForgedModel:
    """The one ternary (BitNet) model a phase after BitNet takes; a ValueError for more, fewer or another kind."""
    forged = _one_model(models, phase)
    if _quant_method(forged) != "bitnet":
        raise ValueError(f"model {forged.name!r} is not a BitNet model; the {phase} phase takes BitNet's output")
    return forged


def as_measured(forged: ForgedModel):
    """The model as the phases measure it: a BitNet model's ternary layers as BitLinear at full strength on
    its latent weights (what stock transformers' BitNet layers compute in another order); others as they are."""
    if _quant_method(forged) != "bitnet":
        return forged.model
    from shared.ternary.bitlinear import trainable_ternary

    return trainable_ternary(forged.model).eval()


class UnknownPhaseError(LookupError):
    pass


def available_phases() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def registered_phase(name: str) -> Any:
    """The entry point of the phase registered as `name` (not loaded); UnknownPhaseError otherwise."""
    found = available_phases()
    if name not in found:
        known = ", ".join(sorted(found)) or "none (is the project installed? `make venv`)"
        raise UnknownPhaseError(f"no phase named {name!r}; registered phases: {known}")
    return found[name]


def get_phase(name: str) -> Phase:
    return registered_phase(name).load()()
