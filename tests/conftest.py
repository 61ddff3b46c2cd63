"""Shared pytest set-up. Infrastructure fixtures live in tests/plugins/ and are loaded here."""
import shared  # noqa: F401  first: it sets the OpenMP wait policy before torch starts its threads

import pytest
import torch

pytest_plugins = ["tests.plugins.infra"]


@pytest.fixture
def eager_torch():
    """transformers wraps its BitNet quantizers in torch.compile; eager gives the same numbers without a
    minute of compiling."""
    with torch.compiler.set_stance("force_eager"):
        yield


@pytest.fixture(scope="session")
def tiny_cognate():
    """Cognate on its defaults, as `make run` trains it (about 5 minutes): the base and three specialists
    with the scored report. Shared by the slow tests of Cognate and of the phases that take its models."""
    from services.cognate.phase import CognatePhase

    phase = CognatePhase()
    return phase.transform([], phase.parse_config({"preset": "tiny"}))


@pytest.fixture(scope="session")
def tiny_champion(tiny_cognate):
    """EvoMerge on its defaults over tiny_cognate's models, as `make run` merges them (about 5 minutes)."""
    from services.evomerge.phase import EvoMergePhase

    phase = EvoMergePhase()
    return phase.transform(tiny_cognate.models, phase.parse_config({}))
