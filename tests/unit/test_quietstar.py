"""Quiet-STaR's parts on a micro model: the attention layout, the exact w = 0 reduction, the thinking model's
two paths against each other, the objective, and generation that never writes a thought token."""
import pytest
import torch

from services.bitnet.__main__ import train_float_model
from services.bitnet.phase import BitNetConfig
from services.quietstar.mixing_head import MixingHead, head_metadata, load_head, save_head
from services.quietstar.objective import ObjectiveConfig, QuietStarModel, quietstar_loss
from services.quietstar.thinking import ThinkingModel
from services.quietstar.thoughts import (
    END_THOUGHT, START_THOUGHT, ThoughtEmbeddings, add_thought_tokens, block_attention, generate_thoughts,
    layout_hidden, layout_ids, n_blocks)
from shared.data.tasks import make_examples
from shared.models import Preset
from shared.tool_runtime import greedy_with_tools
from shared.training import collate

pytestmark = pytest.mark.unit

MICRO_SHAPE = Preset(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=192, vocab_size=512, max_positions=96)
MICRO_DATA = BitNetConfig(task_examples=300, train_text_chars=100_000)


@pytest.fixture(scope="module")
def base():
    """A micro float model that learned a little (so its predictions are not uniform), before thought tokens."""
    return train_float_model(MICRO_SHAPE, MICRO_DATA, steps=60, name="micro")


@pytest.fixture(scope="module")
def thinker(base):
    """The base with thought tokens added and a mixing head whose weights are random (w far from 0)."""
    import copy

    model, tokenizer = copy.deepcopy(base.model), copy.deepcopy(base.tokenizer)
    tokens, vectors = add_thought_tokens(model, tokenizer)
    head = MixingHead(model.config.hidden_size)
    torch.manual_seed(0)
    torch.nn.init.normal_(head.layers[-1].weight, std=0.3)
    return model, tokenizer, tokens, head, vectors


def _text_ids(tokenizer, n: int = 2, width: int = 20) -> torch.Tensor:
    text = "The quick brown fox jumps over the lazy dog, and 12 + 7 = 19 is written plainly."
    return torch.tensor([tokenizer(text)["input_ids"][:width]] * n)


def test_a_thought_sees_its_prefix_and_its_own_earlier_tokens_only():
    n, width = n_blocks(3, 2), 5  # text, start, 3 thought tokens, end, 1 teacher-forced block
    allowed = block_attention(n, width).view(n, width, n, width)
    for block in range(1, n):
        for i in range(width):
            seen = allowed[block, i]
            assert seen[0, : i + 1].all() and not seen[0, i + 1 :].any()  # nothing after i in the text
            assert seen[1 : block + 1, i].all() and not seen[block + 1 :].any()  # its own column, blocks <= b
            others = torch.ones(width, dtype=torch.bool)
            others[i] = False
            assert not seen[1:, others].any()  # nothing of another position's thought
    text = allowed[0]
    assert torch.equal(text[:, 0], torch.ones(width, width).tril().bool()) and not text[:, 1:].any()


def test_with_w_forced_to_zero_the_loss_equals_the_base_models_exactly(base, thinker):
    model, tokenizer, tokens, head, vectors = thinker
    ids = _text_ids(tokenizer)
    with torch.no_grad():
        expected = base.model(input_ids=ids).logits
    logits = ThinkingModel(model, head, tokens, vectors, thought_length=4, force_w=0.0)(ids).logits[..., : expected.shape[-1]]
    assert torch.equal(logits, expected)
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    assert loss == torch.nn.functional.cross_entropy(expected[0, :-1], ids[0, 1:])
    # and a head that is not forced does change the predictions
    assert not torch.allclose(ThinkingModel(model, head, tokens, vectors, 4)(ids).logits[..., : expected.shape[-1]], expected)


def test_thought_tokens_have_zero_rows_and_start_from_the_reference_initial_token(base, thinker):
    model, tokenizer, tokens, head, vectors = thinker
    weight = model.get_input_embeddings().weight
    assert tokens.ids == [len(base.tokenizer), len(base.tokenizer) + 1] and weight.shape[0] == len(tokenizer)
    assert not weight[tokens.ids].any()  # logit 0 in the tied head: the plain model gains no likely token
    initial = base.tokenizer("---", add_special_tokens=False)["input_ids"][0]
    assert torch.equal(vectors, base.model.get_input_embeddings().weight[initial].repeat(2, 1))
    assert torch.equal(weight[: len(base.tokenizer)], base.model.get_input_embeddings().weight)
    with pytest.raises(ValueError, match="went through Quiet-STaR before"):
        add_thought_tokens(model, tokenizer)


def test_the_parallel_layout_and_the_last_position_path_agree(thinker):
    model, tokenizer, tokens, head, vectors = thinker
    ids = _text_ids(tokenizer)
    thinking = ThinkingModel(model, head, tokens, vectors, thought_length=4)
    parallel = thinking(ids).logits[:, -1, : len(tokenizer) - 2]
    last = thinking.next_token_logits(ids, torch.ones_like(ids))[:, : len(tokenizer) - 2]
    assert torch.allclose(parallel, last, atol=1e-5)
    # the cached, block-by-block sampling computes what one pass over the whole layout computes
    embed = thinking.embed
    thoughts = generate_thoughts(model, embed, ids, tokens, 4, 3, tokenizer.pad_token_id,
                                 generator=torch.Generator().manual_seed(0))
    full = layout_hidden(model, embed, layout_ids(ids, thoughts.tokens, tokens, 3, tokenizer.pad_token_id), n_blocks(4, 3))
    assert torch.allclose(full, thoughts.hidden, atol=1e-5)
    assert not torch.isin(thoughts.tokens, torch.tensor(tokens.ids)).any()


def test_generation_never_writes_a_thought_token_with_or_without_thoughts(thinker):
    model, tokenizer, tokens, head, vectors = thinker
    # Make the thought tokens the most likely continuation of everything: only masking can keep them out.
    boosted = model.__class__(model.config)
    boosted.load_state_dict(model.state_dict())
    boosted.generation_config.suppress_tokens = tokens.ids
    with torch.no_grad():
        boosted.get_input_embeddings().weight[tokens.ids] = boosted.model.norm.weight * 50
    prompts = [e.prompt for e in make_examples("tool_calls", 2, "validation", 40, 0)]
    for generating in (boosted, ThinkingModel(boosted, head, tokens, vectors, thought_length=3)):
        transcripts = greedy_with_tools(generating, tokenizer, prompts, max_new_tokens=12)
        for transcript in transcripts:
            assert START_THOUGHT not in transcript.text and END_THOUGHT not in transcript.text
    raw = tokenizer.batch_decode(boosted.generate(input_ids=_text_ids(tokenizer, 1, 8), max_new_tokens=20, do_sample=False))
    assert START_THOUGHT not in raw[0] and END_THOUGHT not in raw[0]


def test_the_objective_rewards_thoughts_against_the_baseline_and_trains_every_part(thinker):
    model, tokenizer, tokens, head, vectors = thinker
    ids = _text_ids(tokenizer, 3, 16)
    batch = collate([row.tolist() for row in ids], tokenizer.pad_token_id)
    config = ObjectiveConfig(thought_length=3, n_true=2)

    def step(mixing_head):
        trainee = QuietStarModel(model, mixing_head, ThoughtEmbeddings(model, tokens, vectors))
        trainee.zero_grad()
        loss, count, figures = quietstar_loss(trainee, tokens, config, tokenizer.pad_token_id,
                                              torch.Generator().manual_seed(0), *batch)
        loss.backward()
        return trainee, count, figures

    # A fresh head has w = 0: the thought changes nothing yet, so the reward is exactly 0, and only the
    # head itself learns (towards using the thought where it helps).
    trainee, count, figures = step(MixingHead(model.config.hidden_size))
    assert count == 3 * 15  # every next-token target of the three texts, counted once whatever n_passes
    assert figures["mean_w"] == 0 and figures["mean_reward"] == 0 and figures["policy_loss"] == 0
    assert trainee.head.layers[-1].weight.grad.abs().sum() > 0
    # With w != 0 thoughts change the predictions: rewards differ between the passes, and the policy
    # gradient and the mixed prediction reach the thought embeddings and the model.
    trainee, _, figures = step(head)
    assert figures["mean_reward"] != 0 and figures["policy_loss"] != 0
    assert trainee.thought_embeddings.scaled.grad.abs().sum() > 0
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_the_mixing_head_file_round_trips_with_its_metadata(thinker):
    head, vectors = thinker[3], thinker[4]
    payload = save_head(head, vectors, thought_length=4)
    again, vectors_again = load_head(payload)
    for name, tensor in head.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor)
    assert torch.equal(vectors_again, vectors)
    assert head_metadata(payload)["thought_length"] == "4" and head_metadata(payload)["start_thought"] == START_THOUGHT
