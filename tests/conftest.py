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
