"""BitNet b1.58: the quantizers, the layer, the walker, the codecs and the packed file, on tiny Llamas."""
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from shared.ternary.bitlinear import (
    BitLinear,
    convert_to_bitnet,
    measure_input_rms,
    quantize_activations,
    set_quant_strength,
    ternarize,
)
from shared.ternary.packed_model import PackedBitLinear, load_packed, pack_model, packed_size_report
from shared.ternary.packing import BASE3, CODECS, TWO_BIT, bits_per_weight, pack_ternary, unpack_ternary

pytestmark = pytest.mark.unit

AWKWARD_SHAPES = [(1,), (3,), (7, 5), (33, 17), (4, 3, 5), (2, 1, 1, 9), (0, 4)]


def tiny_llama(seed: int = 0, tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return LlamaForCausalLM(config).eval()


def token_batch(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("codec", CODECS.values(), ids=list(CODECS))
@pytest.mark.parametrize("shape", AWKWARD_SHAPES, ids=str)
def test_unpack_inverts_pack_for_awkward_shapes(codec, shape):
    weights = torch.randint(-1, 2, shape, generator=torch.Generator().manual_seed(math.prod(shape)))
    packed = pack_ternary(weights.float(), codec)
    assert packed.dtype == torch.uint8 and packed.shape == (math.ceil(math.prod(shape) / codec.per_byte),)
    assert torch.equal(unpack_ternary(packed, shape, codec), weights.to(torch.int8))


def test_two_bit_layout_is_four_codes_a_byte_lowest_bits_first():
    # weights 1, -1, 0, 1 -> codes 2, 0, 1, 2 -> 2 + 0 * 4 + 1 * 16 + 2 * 64
    assert pack_ternary(torch.tensor([1.0, -1.0, 0.0, 1.0]), TWO_BIT).tolist() == [146]
    # base 3: codes 2, 0, 1, 2, 1 -> 2 + 0 * 3 + 1 * 9 + 2 * 27 + 1 * 81
    assert pack_ternary(torch.tensor([1.0, -1.0, 0.0, 1.0, 0.0]), BASE3).tolist() == [146]
    assert pack_ternary(torch.ones(5), BASE3).tolist() == [242]  # the largest base-3 byte


def test_pack_rejects_non_ternary_and_unpack_rejects_wrong_payload():
    with pytest.raises(ValueError, match="-1, 0 and 1"):
        pack_ternary(torch.tensor([0.5, 1.0]), TWO_BIT)
    with pytest.raises(ValueError, match="-1, 0 and 1"):
        pack_ternary(torch.tensor([2, 0]), BASE3)
    with pytest.raises(ValueError, match="3 bytes"):
        unpack_ternary(torch.zeros(2, dtype=torch.uint8), (3, 4), TWO_BIT)


def test_ternarize_is_absmean_and_activation_quant_is_per_token_absmax():
    weight = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    codes, scale = ternarize(weight)
    assert set(codes.unique().tolist()) <= {-1, 0, 1} and codes.dtype == torch.int8
    assert scale.item() == pytest.approx(1 / weight.abs().mean().item())
    assert torch.equal(codes, (weight / weight.abs().mean()).round().clamp(-1, 1).to(torch.int8))

    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1)) * torch.tensor([0.01, 1.0, 100.0]).view(3, 1, 1)
    step = x.abs().amax(dim=-1, keepdim=True) / 127  # each token's own grid
    xq = quantize_activations(x)
    assert torch.allclose(xq.abs().amax(dim=-1), x.abs().amax(dim=-1))  # the max is on the grid
    assert (xq - x).abs().le(step / 2 + 1e-6 * step).all()
    assert torch.allclose(xq / step, (xq / step).round(), atol=1e-3)


def test_quant_strength_moves_from_float_to_quantized_with_straight_through_gradients():
    torch.manual_seed(0)
    layer = BitLinear(8, 6)
    x = torch.randn(4, 8, requires_grad=True)
    normed = layer.rms_norm(x)

    layer.quant_strength = 0.0
    assert torch.equal(layer(x), F.linear(normed, layer.weight))

    layer.quant_strength = 1.0
    codes, scale = ternarize(layer.weight)
    quantized_weight = codes.float() / scale
    expected = F.linear(quantize_activations(normed), quantized_weight)
    out = layer(x)
    assert torch.equal(out, expected)

    # The STE passes the gradient of the quantized matmul straight to the latent weight.
    out.sum().backward()
    assert torch.allclose(layer.weight.grad, torch.ones(4, 6).T @ quantize_activations(normed).detach())

    layer.quant_strength = 0.5
    halfway = layer(x)
    assert torch.allclose(halfway, F.linear(normed + 0.5 * (quantize_activations(normed) - normed),
                                            layer.weight + 0.5 * (quantized_weight - layer.weight)), atol=1e-6)
    with pytest.raises(ValueError):
        set_quant_strength(torch.nn.Sequential(layer), 1.5)


def test_walker_converts_every_linear_but_the_lm_head_and_refuses_twice():
    model = tiny_llama()
    replaced = convert_to_bitnet(model)
    assert len(replaced) == 7 * 2  # q, k, v, o, gate, up, down in each of the 2 blocks
    assert type(model.lm_head) is torch.nn.Linear and type(model.model.embed_tokens) is torch.nn.Embedding
    assert all(isinstance(model.get_submodule(name), BitLinear) for name in replaced)
    assert model.config.quantization_config["quant_method"] == "bitnet"
    with pytest.raises(ValueError, match="already quantized"):
        convert_to_bitnet(model)
    with pytest.raises(ValueError, match="tied"):
        convert_to_bitnet(tiny_llama(tie=True), keep_full_precision=())
    assert len(convert_to_bitnet(tiny_llama(), keep_full_precision=())) == 15  # the LM head too, if asked


def test_calibrated_norm_gains_keep_the_unquantized_model_close_to_the_float_one():
    batch = token_batch()
    float_model = tiny_llama()
    with torch.no_grad():
        float_logits = float_model(batch).logits
    gains = measure_input_rms(float_model, [batch])
    assert gains["model.layers.0.mlp.down_proj"] == pytest.approx(
        _input_rms(float_model, "model.layers.0.mlp.down_proj", batch), rel=1e-5)

    calibrated, plain = tiny_llama(), tiny_llama()
    convert_to_bitnet(calibrated, norm_gains=gains)
    convert_to_bitnet(plain)
    for model in (calibrated, plain):
        set_quant_strength(model, 0.0)
    with torch.no_grad():
        err_calibrated = (calibrated(batch).logits - float_logits).abs().mean()
        err_plain = (plain(batch).logits - float_logits).abs().mean()
    assert err_calibrated < err_plain / 2


def _input_rms(model, name, batch):
    seen = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model(batch)
    handle.remove()
    return seen[0].pow(2).mean(dim=-1).sqrt().mean().item()


def test_checkpoint_loads_back_in_stock_transformers_with_the_same_logits(tmp_path, eager_torch):
    model = tiny_llama()
    convert_to_bitnet(model)
    model.save_pretrained(tmp_path)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(stock.model.layers[0].mlp.down_proj).__name__ == "AutoBitLinear"
    with torch.no_grad():
        assert torch.equal(model(token_batch()).logits, stock(token_batch()).logits)


@pytest.mark.parametrize("codec", CODECS.values(), ids=list(CODECS))
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_model_from_the_packed_file_alone_gives_the_same_logits(tmp_path, codec, tie):
    model = tiny_llama(tie=tie)
    convert_to_bitnet(model, norm_gains=measure_input_rms(model, [token_batch()]))
    path = tmp_path / "model.bitnet.safetensors"
    path.write_bytes(pack_model(model, codec))
    batch = token_batch(seed=7)
    with torch.no_grad():
        expected = model(batch).logits
        for cache in (False, True):
            packed = load_packed(path, cache_unpacked=cache)
            assert sum(isinstance(m, PackedBitLinear) for m in packed.modules()) == 14
            assert not any(type(m) is torch.nn.Linear for n, m in packed.named_modules() if n != "lm_head")
            assert torch.equal(packed(batch).logits, expected)
            assert torch.equal(packed(batch).logits, expected)  # second call: from the cache when caching


@pytest.mark.parametrize("codec", CODECS.values(), ids=list(CODECS))
def test_packed_payload_is_exact_and_base3_within_tq1_0(tmp_path, codec):
    model = tiny_llama()
    replaced = convert_to_bitnet(model)
    path = tmp_path / "packed.safetensors"
    path.write_bytes(pack_model(model, codec))
    report = packed_size_report(path)

    sizes = [model.get_submodule(name).weight.numel() for name in replaced]
    assert report["ternary_weights"] == sum(sizes)
    assert report["ternary_payload_bytes"] == sum(math.ceil(n / codec.per_byte) for n in sizes)
    assert report["ternary_scale_bytes"] == 4 * len(sizes)  # one float32 scale a layer
    assert report["file_bytes"] == path.stat().st_size
    assert report["parameters"] == sum(p.numel() for p in model.parameters())
    if codec is BASE3:
        assert report["ternary_bits_per_weight"] <= 1.6875
        assert all(bits_per_weight(n, BASE3) <= 1.6875 for n in sizes)
    else:
        assert 2.0 < report["ternary_bits_per_weight"] < 2.0625


def test_packed_loader_refuses_other_safetensors(tmp_path):
    path = tmp_path / "plain.safetensors"
    tiny_llama().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").rename(path)
    with pytest.raises(ValueError, match="not a packed BitNet file"):
        load_packed(path)
