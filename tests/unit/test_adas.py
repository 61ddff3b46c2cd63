"""ADAS's parts: SVF's exact reconstruction, size and gradient, the experts' mixing, the folded model, the
router, few-shot CEM, the multi-objective search's front, and bad configs refused."""
import numpy as np
import pytest
import torch
from pydantic import ValidationError

from services.adas.cem import CEMConfig, cem
from services.adas.experts import Family
from services.adas.phase import AdasConfig
from services.adas.router import Router
from services.adas.search import OBJECTIVES, SearchConfig, choose, layer_groups, pareto_front, search
from services.adas.svf import (adapted, compose, decompose, initial_vectors, mixed_multipliers, multiplier, svf_student,
                               trainable_count, trained_vectors)
from shared.ternary.bitlinear import bit_linears
from shared.training import causal_lm_loss, collate

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def micro(micro_bitnet, small_corpus):
    """The random micro BitNet model and a batch of the small corpus's rows."""
    model, tokenizer = micro_bitnet
    return model, collate(small_corpus[1][:8], tokenizer.pad_token_id)


def test_a_constant_multiplier_gives_every_latent_weight_back(micro):
    model, _ = micro
    factors = decompose(model)
    weights = dict(bit_linears(model))
    assert set(factors) == set(weights)
    for name, f in factors.items():
        for constant in (1.0, 0.3):
            assert (compose(f, torch.full((f.rank,), constant)) - weights[name].weight).abs().max() < 1e-5


def test_an_expert_has_one_entry_per_singular_value_and_is_all_that_trains(micro):
    model, _ = micro
    factors = decompose(model, targets=[r"\.mlp\."])
    assert factors and all(".mlp." in name for name in factors)
    expected = sum(min(layer.weight.shape) for name, layer in bit_linears(model) if ".mlp." in name)
    assert trainable_count(factors) == expected
    student = svf_student(model, factors, initial_vectors(factors, 0), max_mult=1.0)
    assert sum(p.numel() for p in student.parameters() if p.requires_grad) == expected
    with pytest.raises(ValueError, match="no ternary layer"):
        decompose(model, targets=["nothing_is_called_this"])


def test_the_loss_reaches_z_through_the_quantizer_and_training_changes_only_z(micro):
    model, (ids, mask, _) = micro
    factors = decompose(model)
    z = initial_vectors(factors, 0)
    student = svf_student(model, factors, z, max_mult=1.0).train()
    causal_lm_loss(student, ids, mask)[0].backward()
    grads = [layer.parametrizations.weight[0].z.grad for _, layer in bit_linears(student)]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(not p.requires_grad for n, p in student.named_parameters() if not n.endswith(".z"))
    assert all(torch.equal(trained_vectors(student)[name], z[name]) for name in z)


def test_mixing_normalises_the_weights_and_refuses_bad_ones():
    experts = [{"a": torch.tensor([0.0, 2.0])}, {"a": torch.tensor([-1.0, 1.0])}]
    first = multiplier(experts[0]["a"], 2.0)
    assert torch.allclose(mixed_multipliers(experts, [3.0, 0.0], 2.0)["a"], first)
    assert torch.allclose(mixed_multipliers(experts, [0.2, 0.6], 2.0)["a"], mixed_multipliers(experts, [1, 3], 2.0)["a"])
    equal = (first + multiplier(experts[1]["a"], 2.0)) / 2
    assert torch.allclose(mixed_multipliers(experts, [0.0, 0.0], 2.0)["a"], equal)
    with pytest.raises(ValueError, match=">= 0"):
        mixed_multipliers(experts, [-0.1, 1.0], 1.0)
    with pytest.raises(ValueError, match="2 experts"):
        mixed_multipliers(experts, [1.0], 1.0)


def test_the_folded_model_computes_what_the_parametrized_one_does(micro):
    model, (ids, _, _) = micro
    factors = decompose(model)
    z = {name: torch.randn(f.rank, generator=torch.Generator().manual_seed(1)) for name, f in factors.items()}
    student = svf_student(model, factors, z, max_mult=2.0).eval()
    adapted_layers = list(factors)[:3]
    folded = adapted(model, factors, {name: multiplier(z[name], 2.0) for name in factors})
    partly = adapted(model, factors, {name: multiplier(z[name], 2.0) for name in adapted_layers})
    with torch.no_grad():
        assert torch.allclose(folded(ids).logits, student(ids).logits, atol=1e-5)
    layers, originals, partial = dict(bit_linears(folded)), dict(bit_linears(model)), dict(bit_linears(partly))
    assert all(type(layer).__name__ == "BitLinear" and "parametrizations" not in dict(layer.named_children())
               for layer in layers.values())
    for name in factors:
        changed = not torch.equal(partial[name].weight, originals[name].weight)
        assert changed == (name in adapted_layers)


def test_the_router_separates_separable_inputs():
    generator = torch.Generator().manual_seed(0)
    centres = {"a": torch.zeros(8), "b": torch.full((8,), 3.0), "c": torch.arange(8.0)}
    train = {label: centre + torch.randn(40, 8, generator=generator) for label, centre in centres.items()}
    router = Router.fit(train, seed=0)
    test = torch.cat([centre + torch.randn(10, 8, generator=generator) for centre in centres.values()])
    assert router.route(test) == ["a"] * 10 + ["b"] * 10 + ["c"] * 10
    assert set(router.tensors()) == {"router.weight", "router.bias", "router.feature_mean", "router.feature_scale"}


def test_cem_finds_the_mix_a_toy_score_prefers_and_never_loses_its_best():
    target = np.array([0.9, 0.1, 0.5])
    calls = []

    def score(alpha):
        calls.append(alpha.copy())
        distance = float(np.abs(alpha - target).sum())
        return round(1 - distance, 1), -distance  # success coarse, ties broken by the finer score

    found = cem(score, 3, CEMConfig(population=16, generations=6, shots=1), seed=0)
    assert len(calls) == 1 + 16 * 6
    assert np.abs(np.array(found["alpha"]) - target).sum() < 0.3
    assert found["success"] >= round(1 - float(np.abs(np.full(3, 1 / 3) - target).sum()), 1)
    bests = [g["best_success"] for g in found["generations"]]
    assert bests == sorted(bests)


def _objectives(task_success, bits_per_byte, bytes_, latency_ms):
    return {"objectives": dict(zip(OBJECTIVES, (task_success, bits_per_byte, bytes_, latency_ms), strict=True))}


def test_the_front_holds_exactly_the_non_dominated_points_and_choose_follows_the_order():
    points = [_objectives(0.5, 2.0, 100, 1.0),   # 0: best success
              _objectives(0.4, 2.0, 100, 1.0),   # 1: dominated by 0
              _objectives(0.3, 1.5, 100, 1.0),   # 2: best bits per byte
              _objectives(0.1, 3.0, 10, 0.1),    # 3: smallest, fastest
              _objectives(0.5, 2.5, 100, 1.0)]   # 4: dominated by 0
    front = pareto_front(points)
    assert front == [0, 2, 3]
    assert choose(points, front, ("task_success", "bits_per_byte")) == 0
    assert choose(points, front, ("bytes",)) == 3
    assert choose(points, front, ("bits_per_byte",)) == 2


def test_layer_groups_are_each_blocks_attention_and_mlp():
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.mlp.up_proj",
             "model.layers.1.mlp.down_proj"]
    assert layer_groups(names) == {"layers.0.self_attn": names[:2], "layers.0.mlp": [names[2]],
                                   "layers.1.mlp": [names[3]]}


def test_the_search_evaluates_every_point_it_reports_and_starts_from_the_input():
    groups, experts = ["g0", "g1", "g2"], ["e0", "e1"]
    measured = []

    def measure(point):
        measured.append(point)
        size = len(point["groups"])
        alpha = point["alpha"]
        success = 0.1 * size * (alpha["e0"] + 0.01) / (alpha["e0"] + alpha["e1"] + 0.02) if size else 0.05
        return {"task_success": success, "bits_per_byte": 2.0 - 0.1 * size, "bytes": 100 + 10 * size,
                "latency_ms": float(size)}

    found = search(measure, groups, experts, SearchConfig(population=8, generations=3), seed=0)
    assert [{key: p[key] for key in ("groups", "alpha")} for p in found["points"]] == measured  # each once
    assert len(measured) <= 8 * 3
    assert found["points"][0]["groups"] == []  # the input is on the first population
    assert found["points"][1]["groups"] == groups
    front = found["front"]
    assert front == pareto_front(found["points"]) and found["chosen"] in front
    values = [[-p["objectives"]["task_success"], *(p["objectives"][o] for o in OBJECTIVES[1:])]
              for p in (found["points"][i] for i in front)]
    for a in values:
        for b in values:
            assert not (all(x <= y for x, y in zip(a, b, strict=True)) and a != b)
    assert 0 in front  # nothing is smaller or faster than the input


def test_bad_configs_are_refused_before_any_work():
    with pytest.raises(ValidationError, match="either tasks or text"):
        Family(name="both", tasks=(("arithmetic", 1),), text=True)
    with pytest.raises(ValidationError, match="distinct names"):
        AdasConfig(families=[{"name": "a", "text": True}, {"name": "a", "tasks": [["sequence", 1]]}])
    with pytest.raises(ValidationError, match="one an expert trains on"):
        AdasConfig(held_out=("arithmetic", 1))
    with pytest.raises(ValidationError, match="not on the scorecard"):
        AdasConfig(held_out=("modular", 1), scorecard={"tasks": [["arithmetic", 1, 10]]})
