"""Shared pytest set-up. Infrastructure fixtures live in tests/plugins/ and are loaded here."""
import pytest
import torch

import shared  # noqa: F401  first: it sets the OpenMP wait policy before torch starts its threads

pytest_plugins = ["tests.plugins.infra", "tests.fabric_cluster"]


@pytest.fixture
def eager_torch():
    """transformers wraps its BitNet quantizers in torch.compile; eager gives the same numbers without a
    minute of compiling."""
    with torch.compiler.set_stance("force_eager"):
        yield


@pytest.fixture(scope="session")
def small_corpus():
    """A 512-token BPE trained on sums and one sentence, and those texts as 32-token training rows."""
    from shared.tokenizer import train_tokenizer
    from shared.training import encode_texts

    texts = [f"{a} + {b} = {a + b}\n" for a in range(10) for b in range(10)] + ["the cat sat on the mat.\n"] * 20
    tokenizer = train_tokenizer(texts, 512, 32)
    return tokenizer, encode_texts(tokenizer, texts, 32)


@pytest.fixture(scope="session")
def micro_bitnet(small_corpus):
    """A random micro BitNet model on the small corpus's tokenizer (context 32), in eval mode, and the tokenizer."""
    from shared.models import build_model
    from shared.ternary.bitlinear import convert_to_bitnet

    tokenizer, _ = small_corpus
    model = build_model("tiny", len(tokenizer), 0, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    convert_to_bitnet(model)
    return model.eval(), tokenizer


@pytest.fixture(scope="session")
def tiny_cognate():
    """Cognate as `make run` trains it, on its defaults (about 8 minutes): the base and three specialists with
    the scored report. Shared by the slow tests of Cognate and of the phases that take its models."""
    from services.cognate.phase import CognatePhase
    from tests.make_run import make_run_config

    return CognatePhase().transform([], make_run_config("cognate"))


@pytest.fixture(scope="session")
def tiny_champion(tiny_cognate):
    """EvoMerge over tiny_cognate's models as `make run` merges them (about a minute)."""
    from services.evomerge.phase import EvoMergePhase
    from tests.make_run import make_run_config

    return EvoMergePhase().transform(tiny_cognate.models, make_run_config("evomerge"))


@pytest.fixture(scope="session")
def tiny_ternary(tiny_champion):
    """BitNet over tiny_champion's model with `make run`'s BitNet config (under a minute). `make run` quantizes
    Quiet-STaR's output; this chain leaves Quiet-STaR out (its check trains on the champion by itself)."""
    from services.bitnet.phase import BitNetPhase
    from tests.make_run import make_run_config

    return BitNetPhase().transform(tiny_champion.models, make_run_config("bitnet"))


@pytest.fixture(scope="session")
def tiny_forged(tiny_ternary):
    """Forge training over tiny_ternary's model with `make run`'s Forge config (under a minute): the input of
    baking's check, as Forge's output is baking's input in `make run`."""
    from services.forge.phase import ForgePhase
    from tests.make_run import make_run_config

    return ForgePhase().transform(tiny_ternary.models, make_run_config("forge"))


@pytest.fixture(scope="session")
def micro_ternary():
    """BitNet, shortened, on a micro float model (context 64): the ternary input of the later phases' micro tests."""
    from services.bitnet.__main__ import train_float_model
    from services.bitnet.phase import BitNetPhase
    from tests.unit.test_bitnet_phase import MICRO as MICRO_BITNET
    from tests.unit.test_bitnet_phase import MICRO_SHAPE

    float_model = train_float_model(MICRO_SHAPE, MICRO_BITNET, steps=60, name="micro")
    quick = MICRO_BITNET.model_copy(update={"float_control": False,
                                            "training": MICRO_BITNET.training.model_copy(update={"steps": 20})})
    with torch.compiler.set_stance("force_eager"):
        return BitNetPhase().transform([float_model], quick)
