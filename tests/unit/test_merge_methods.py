"""Merge operators on tiny Llama state dicts: exact checks of the math, and the registry's errors."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from services.evomerge.merge_methods import METHODS, MergeConfigError, UnknownMergeMethodError, get_method, merge_state_dicts
from services.evomerge.merge_methods.dfs import DataFlowPath, candidate_layers, dfs_merge, path_from_indicators
from services.evomerge.merge_methods.passthrough import LayerSlice, frankenmerge, num_layers
from services.evomerge.merge_methods.slerp import slerp
from services.evomerge.merge_methods.karcher import karcher_mean
from services.evomerge.merge_methods.multislerp import multislerp
from services.evomerge.merge_methods.nuslerp import nuslerp
from services.evomerge.merge_methods.sce import task_vector_weights, variance_selection
from services.evomerge.merge_methods.sparsify import della_magprune, magnitude_outliers, random_drop
from services.evomerge.merge_methods.task_arithmetic import elect_sign_mask

pytestmark = pytest.mark.unit


def tiny_config(layers: int = 2, **overrides) -> LlamaConfig:
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return LlamaConfig(**{**shape, **overrides})


def tiny_family(n_finetunes: int = 2, seed: int = 0, **config) -> tuple[LlamaForCausalLM, list[LlamaForCausalLM]]:
    """A random base and fine-tunes = base + (shared direction + own noise), like specialists of one base."""
    torch.manual_seed(seed)
    base = LlamaForCausalLM(tiny_config(**config)).eval()
    shared = {name: 0.01 * torch.randn_like(p) for name, p in base.state_dict().items()}
    finetunes = []
    for _ in range(n_finetunes):
        model = LlamaForCausalLM(tiny_config(**config)).eval()
        model.load_state_dict({n: p + shared[n] + 0.01 * torch.randn_like(p) for n, p in base.state_dict().items()})
        finetunes.append(model)
    return base, finetunes


def run_and_check(method: str, params: dict, n_finetunes: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Merge a tiny family; every tensor present, same shape and dtype, finite."""
    base, finetunes = tiny_family(n_finetunes)
    method_obj = get_method(method)
    merged = merge_state_dicts(
        method_obj,
        [m.state_dict() for m in finetunes],
        base.state_dict() if method_obj.needs_base else None,
        lambda name: params,
        seed=seed,
    )
    reference = base.state_dict()
    assert set(merged) == set(reference)
    for name, tensor in merged.items():
        assert tensor.shape == reference[name].shape and tensor.dtype == reference[name].dtype, name
        assert torch.isfinite(tensor).all(), name
    return merged


@pytest.mark.parametrize(
    "method, params",
    [
        ("linear", {}),
        ("slerp", {"t": 0.3}),
        ("task_arithmetic", {"weight": 0.5}),
        ("ties", {"weight": 1.0, "density": 0.5}),
        ("dare_linear", {"weight": 0.5, "density": 0.4}),
        ("dare_ties", {"weight": 0.5, "density": 0.4, "rescale": "l1"}),
        ("della", {"weight": 1.0, "density": 0.5}),
        ("della_linear", {"weight": 0.5, "density": 0.5, "epsilon": 0.1}),
        ("model_stock", {}),
        ("breadcrumbs", {"weight": 0.5, "density": 0.6}),
        ("breadcrumbs_ties", {"weight": 0.5, "density": 0.6, "gamma": 0.05}),
        ("sce", {"select_topk": 0.5}),
        ("nuslerp", {"weight": [0.6, 0.4]}),
        ("multislerp", {"weight": [0.6, 0.4]}),
        ("karcher", {}),
    ],
)
def test_every_method_merges_a_tiny_family(method, params):
    merged = run_and_check(method, params)
    base, finetunes = tiny_family()
    # A merge of two distinct models is neither parent (catches a method that returns an input unchanged).
    assert not torch.equal(merged["model.layers.0.mlp.up_proj.weight"], finetunes[0].state_dict()["model.layers.0.mlp.up_proj.weight"])


def test_registry_lookup_names_what_exists():
    with pytest.raises(UnknownMergeMethodError, match="known: .*dare_ties.*ties"):
        get_method("tie")
    assert {"linear", "slerp", "task_arithmetic", "ties", "dare_linear", "dare_ties", "della", "model_stock", "passthrough"} <= set(METHODS)


def test_parameters_are_checked():
    ties = get_method("ties")
    with pytest.raises(MergeConfigError, match="unknown parameters.*'densty'"):
        ties.resolve({"weight": 1.0, "densty": 0.5}, 2)
    with pytest.raises(MergeConfigError, match="'weight' is required"):
        ties.resolve({}, 2)
    with pytest.raises(MergeConfigError, match="2 values for 3 models"):
        ties.resolve({"weight": [1.0, 1.0]}, 3)


def test_task_vector_methods_refuse_to_run_without_a_base():
    _, finetunes = tiny_family()
    with pytest.raises(MergeConfigError, match="needs an explicit base"):
        merge_state_dicts(get_method("ties"), [m.state_dict() for m in finetunes], None, lambda n: {"weight": 1.0})


def test_slerp_returns_the_endpoints_exactly():
    _, (a, b) = tiny_family()
    for t, expected in ((0.0, a), (1.0, b)):
        merged = merge_state_dicts(get_method("slerp"), [a.state_dict(), b.state_dict()], None, lambda n: {"t": t})
        for name, tensor in merged.items():
            assert torch.equal(tensor, expected.state_dict()[name]), (t, name)


def test_slerp_keeps_the_norm_of_orthogonal_unit_vectors():
    v0, v1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    mid = slerp(0.5, v0, v1)
    assert torch.allclose(mid, torch.tensor([2**-0.5, 2**-0.5]))  # lerp would give norm 0.707
    parallel = slerp(0.25, v0, 3 * v0)  # |cos| = 1: falls back to lerp
    assert torch.allclose(parallel, torch.tensor([1.5, 0.0]))


def test_task_arithmetic_is_base_plus_scaled_weighted_deltas():
    base = torch.tensor([1.0, 2.0, 3.0])
    a, b = base + torch.tensor([0.5, 0.0, -1.0]), base + torch.tensor([0.5, 1.0, 1.0])
    out = get_method("task_arithmetic").merge([a, b], base, torch.Generator(), weight=[1.0, 0.5], **{"lambda": 0.5}, normalize=False)
    assert torch.allclose(out, base + 0.5 * (torch.tensor([0.5, 0.0, -1.0]) + 0.5 * torch.tensor([0.5, 1.0, 1.0])))


def test_ties_trims_elects_sign_and_averages_the_agreeing_models():
    base = torch.zeros(4)
    a = torch.tensor([3.0, -2.0, 0.1, 1.0])
    b = torch.tensor([1.0, 4.0, -0.2, -3.0])
    # density 0.5: a keeps [3, -2], b keeps [4, -3]; signs elected from the sums [3+1?]: trimmed sums are
    # [3, 2, 0, -3] -> signs [+, +, +, -]; entry 0: only a (3); entry 1: only b agrees (4); entry 3: only b.
    out = get_method("ties").merge([a, b], base, torch.Generator(), weight=[1.0, 1.0], density=[0.5, 0.5], **{"lambda": 1.0}, normalize=True)
    assert torch.equal(out, torch.tensor([3.0, 4.0, 0.0, -3.0]))
    mask = elect_sign_mask(torch.stack([torch.tensor([1.0, -1.0]), torch.tensor([2.0, 3.0])]))
    assert mask.tolist() == [[True, False], [True, True]]


def test_dare_paper_rescale_keeps_survivors_at_delta_over_density_and_is_unbiased():
    delta = torch.full((200, 200), 0.02)
    dropped = random_drop(delta, 0.3, "paper", torch.Generator().manual_seed(1))
    kept = dropped != 0
    assert torch.allclose(dropped[kept], torch.tensor(0.02 / 0.3))  # 1/(1-p) with drop rate p = 0.7
    assert abs(kept.float().mean().item() - 0.3) < 0.01
    assert abs(dropped.mean().item() - 0.02) < 0.02 * 0.03
    l1 = random_drop(delta, 0.3, "l1", torch.Generator().manual_seed(1))
    assert torch.allclose(l1.abs().sum(), delta.abs().sum())  # mergekit's variant keeps the L1 norm


def test_della_keeps_large_entries_more_often_and_rescales_by_their_keep_probability():
    row = torch.linspace(0.001, 1.0, 1000).repeat(50, 1)
    out = della_magprune(row, 0.5, 0.2, "paper", torch.Generator().manual_seed(0))
    kept = out != 0
    assert kept[:, :100].float().mean() < 0.4 < 0.6 < kept[:, -100:].float().mean()
    keep_prob = 0.3 + torch.linspace(0, 1, 1000) * 0.4  # density - eps .. density + eps by rank
    assert torch.allclose(out[kept], (row / keep_prob)[kept])
    with pytest.raises(ValueError, match="must stay inside"):
        della_magprune(row, 0.9, 0.15, "paper", torch.Generator())


def test_random_masks_come_from_one_seeded_generator_in_sorted_tensor_order_as_in_mergekit():
    base, finetunes = tiny_family()
    states = [m.state_dict() for m in finetunes]
    reversed_states = [dict(reversed(list(s.items()))) for s in states]
    params = lambda n: {"weight": 0.5, "density": 0.5}  # noqa: E731
    dare = get_method("dare_ties")
    one = merge_state_dicts(dare, states, base.state_dict(), params, seed=3)
    two = merge_state_dicts(dare, reversed_states, base.state_dict(), params, seed=3)
    other_seed = merge_state_dicts(dare, states, base.state_dict(), params, seed=4)
    generator = torch.Generator().manual_seed(3)
    replay = {name: dare.merge([s[name] for s in states], base.state_dict()[name], generator, **dare.resolve(params(name), 2))
              for name in sorted(states[0])}
    assert all(torch.equal(one[n], two[n]) and torch.equal(one[n], replay[n]) for n in one)
    assert not all(torch.equal(one[n], other_seed[n]) for n in one)


def test_model_stock_interpolation_ratio():
    base = torch.zeros(2, 4)
    same = torch.ones(2, 4)
    out = get_method("model_stock").merge([same, same.clone()], base, torch.Generator(), filter_wise=False)
    assert torch.allclose(out, same)  # cos = 1 -> t = 1: the fine-tunes' mean
    a = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    cos = 1 / 2**0.5
    t = 2 * cos / (1 + cos)
    out = get_method("model_stock").merge([a, b], torch.zeros(2, 2), torch.Generator(), filter_wise=False)
    assert torch.allclose(out, t * (a + b) / 2)


def test_frankenmerge_stacks_renumbered_layer_slices():
    _, (a, b) = tiny_family()
    sa, sb = a.state_dict(), b.state_dict()
    stacked = frankenmerge([sa, sb], [LayerSlice(0, 0, 2), LayerSlice(1, 1, 2)])
    assert num_layers(stacked) == 3
    assert torch.equal(stacked["model.layers.2.self_attn.q_proj.weight"], sb["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(stacked["model.layers.1.mlp.up_proj.weight"], sa["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(stacked["model.embed_tokens.weight"], sa["model.embed_tokens.weight"])
    assert torch.equal(stacked["lm_head.weight"], sb["lm_head.weight"])
    model = LlamaForCausalLM(tiny_config(3))
    model.load_state_dict(stacked)  # strict: the stacked names are exactly a 3-layer model's
    with pytest.raises(MergeConfigError, match="layer 5 of model 1"):
        frankenmerge([sa, sb], [LayerSlice(1, 5, 6)])


def test_dfs_path_through_one_model_is_that_model():
    _, (a, b) = tiny_family()
    candidates = candidate_layers([2, 2], repeats=2)
    assert len(candidates) == 8
    path = path_from_indicators(candidates, [True, True] + [False] * 6, {"0->1": 2.0})
    merged = dfs_merge([a.state_dict(), b.state_dict()], path)
    assert all(torch.equal(merged[n], t) for n, t in a.state_dict().items())


def test_dfs_folded_crossing_scale_equals_scaling_the_hidden_state():
    """The folded weights must compute what the paper describes: hidden state times W[a, b] at a crossing."""
    _, (a, b) = tiny_family()
    path = DataFlowPath(((0, 0), (1, 1), (0, 1)), {"0->1": 0.5, "1->0": 3.0})
    # The fold is exact but for RMSNorm's epsilon; take it out of the picture to test the algebra.
    config = tiny_config(3, rms_norm_eps=1e-20)
    folded = LlamaForCausalLM(config).eval()
    folded.load_state_dict(dfs_merge([a.state_dict(), b.state_dict()], path))
    # Reference: the unscaled stack, with the residual stream multiplied at each crossing by forward hooks.
    plain = LlamaForCausalLM(config).eval()
    plain.load_state_dict(dfs_merge([a.state_dict(), b.state_dict()], DataFlowPath(path.steps, {})))
    for k, layer in enumerate(plain.model.layers):
        scale = path.scale_before(k)
        layer.register_forward_pre_hook(lambda mod, args, kwargs, s=scale: ((args[0] * s, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": kwargs["hidden_states"] * s}), with_kwargs=True)
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = plain(tokens).logits, folded(tokens).logits
    unscaled = LlamaForCausalLM(config).eval()
    unscaled.load_state_dict(dfs_merge([a.state_dict(), b.state_dict()], DataFlowPath(path.steps, {})))
    with torch.no_grad():
        assert not torch.allclose(unscaled(tokens).logits, expected, atol=1e-3)  # the scales do matter
    assert torch.allclose(got, expected, atol=1e-4)


def test_breadcrumbs_drops_the_largest_outliers_and_the_smallest_entries():
    delta = torch.arange(1.0, 101.0)  # |delta| ranks are the values themselves
    kept = magnitude_outliers(delta, density=0.5, gamma=0.1)
    assert torch.equal(kept.nonzero().flatten(), torch.arange(40, 90))  # 41..90: the top 10 and bottom 40 dropped
    assert torch.equal(magnitude_outliers(delta, density=1.0, gamma=0.1), delta)
    # density + gamma above 1: fewer outliers go, the density is kept.
    assert int((magnitude_outliers(delta, density=0.95, gamma=0.1) != 0).sum()) == 95


def test_sce_selects_by_variance_and_weighs_task_vectors_by_their_energy():
    deltas = torch.tensor([[1.0, 0.0, 2.0, 5.0], [1.0, 0.0, -2.0, 1.0]])
    assert torch.equal(variance_selection(deltas, 0.5), torch.tensor([0.0, 0.0, 1.0, 0.0]))  # 2 of 4 vary; top 1
    weights = task_vector_weights(deltas)
    assert torch.allclose(weights, torch.tensor([30.0, 6.0]) / 36)
    base = torch.zeros(4)
    merged = get_method("sce").merge(list(deltas), base, torch.Generator(), select_topk=1.0)
    # Entry 2 sums to 0, which elects + (ties go to +): only the first vector agrees; entry 3 agrees in both.
    assert torch.allclose(merged, torch.tensor([1.0, 0.0, 2.0, (5 * 30 + 1 * 6) / 36]))


def test_nuslerp_interpolates_by_the_weights_whole_or_row_by_row():
    a, b = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    assert torch.allclose(nuslerp(0.5, a, b, row_wise=False, flatten=True), slerp(0.5, a, b), atol=1e-6)
    rows = nuslerp(0.5, a, b, row_wise=False, flatten=False)  # each row a quarter turn: the midpoints
    assert torch.allclose(rows, torch.tensor([[1.0, 1.0], [2.0, 2.0]]) / 2**0.5, atol=1e-6)
    weighted = get_method("nuslerp").merge([a, b], None, torch.Generator(), weight=[3.0, 1.0], nuslerp_row_wise=False,
                                           nuslerp_flatten=True)
    assert torch.allclose(weighted, slerp(0.25, a, b), atol=1e-6)  # t = w1 / (w0 + w1)


def test_multislerp_and_karcher_of_two_equal_norm_tensors_are_the_slerp_midpoint():
    torch.manual_seed(0)
    a, b = torch.randn(6, 5), torch.randn(6, 5)
    b = b * (a.norm() / b.norm())
    midpoint = slerp(0.5, a, b)
    assert torch.allclose(multislerp([a, b], [1.0, 1.0], normalize=True, eps=1e-8), midpoint, atol=1e-5)
    assert torch.allclose(karcher_mean([a, b], max_iter=50, tol=1e-7), midpoint, atol=1e-5)
    with pytest.raises(MergeConfigError, match="no base"):
        get_method("karcher").merge([a, b], a, torch.Generator(), max_iter=10, tol=1e-5)
