"""Final compression's parts: SeedLM's seed search and exact decoding, the range coder's exact round trip and
its bits against the entropy bound, the baselines' bits, and the compressed file rebuilt to the same logits."""
import math

import pytest
import torch

from services.compression.baselines import baseline_bits_per_weight, equal_bits_setting, hqq, round_to_nearest
from services.compression.compressed_file import compressed_size_report, load_compressed, write_compressed
from services.compression.entropy import decode_trits, encode_trits, entropy_bits
from services.compression.phase import CompressionConfig, CompressionPhase, float_matrices, relative_error, with_matrices
from services.compression.seedlm import (Q_MAX, Q_MIN, SEEDS, SeedLMShape, decode, encode, generator_matrices,
                                         lfsr_cycle)
from shared.models import Preset, build_model
from shared.ternary.bitlinear import bit_linears, convert_to_bitnet, ternarize
from shared.ternary.packing import BASE3

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def weight():
    return torch.randn(16, 64, generator=torch.Generator().manual_seed(0)) * 0.02


@pytest.fixture(scope="module")
def encoded(weight):
    return encode(weight)


def test_the_lfsr_visits_every_nonzero_state_and_u_lies_in_the_open_unit_interval():
    assert sorted(lfsr_cycle().tolist()) == list(range(1, SEEDS + 1))
    u = generator_matrices(SeedLMShape())[1:].double() / 2**15
    assert u.shape == (SEEDS, 8, 3) and u.abs().max() < 1


@pytest.mark.parametrize(("block", "coefficients", "bits"), [(8, 3, 4.0), (12, 4, 3.0)])
def test_the_payload_is_the_papers_bits_per_weight(block, coefficients, bits):
    shape = SeedLMShape(block, coefficients)
    assert shape.bits_per_weight == bits
    weight = torch.randn(4, 24, generator=torch.Generator().manual_seed(1))
    code = encode(weight, shape)
    assert len(code.seeds) == math.ceil(weight.numel() / block)
    assert 8 * code.payload_bytes() == math.ceil(weight.numel() / block) * shape.bits_per_block
    assert 8 * code.payload_bytes() / weight.numel() == bits  # 96 weights: whole blocks, whole bytes


def test_decoding_is_exact_and_the_stored_fields_are_in_range(encoded, weight):
    first, second = decode(encoded), decode(encoded)
    assert torch.equal(first, second) and first.shape == weight.shape and first.dtype == torch.float32
    assert Q_MIN <= int(encoded.coefficients.min()) and int(encoded.coefficients.max()) <= Q_MAX
    assert int(encoded.exponents.max()) <= 15 and int(encoded.seeds.to(torch.int64).min()) >= 1


def test_the_chosen_seed_beats_every_other_seed_under_the_same_quantization(encoded, weight):
    """An independent brute force over 2,000 seeds for the first block: least squares, the same 4-bit
    quantization, the error measured; none beats the seed the batched search chose."""
    block = weight.reshape(-1)[:8].double()
    chosen_error = float((decode(encoded).reshape(-1)[:8].double() - block).pow(2).sum())
    u_all = generator_matrices(SeedLMShape()).double() / 2**15
    best_other = math.inf
    for seed in torch.randperm(SEEDS, generator=torch.Generator().manual_seed(0))[:2000].tolist():
        u = u_all[seed + 1]
        t = torch.linalg.lstsq(u, block.unsqueeze(1)).solution.squeeze(1)
        e = math.ceil(math.log2(float(t.abs().max()) / Q_MAX))
        e = min(max(e, encoded.exponent_base), encoded.exponent_base + 15)
        q = torch.round(t / 2**e).clamp(Q_MIN, Q_MAX)
        best_other = min(best_other, float((u @ q * 2**e - block).pow(2).sum()))
    assert chosen_error <= best_other * (1 + 1e-5)


def test_seedlm_reconstructs_gaussian_weights_better_than_round_to_nearest_at_four_bits(encoded, weight):
    nbits, group = equal_bits_setting(4.0)
    assert baseline_bits_per_weight(nbits, group) == 4.0
    assert relative_error(decode(encoded), weight) < relative_error(round_to_nearest(weight, nbits, group), weight)


def test_the_baselines_have_their_counted_levels_and_hqq_is_no_worse_than_rtn(weight):
    assert equal_bits_setting(3.0) == (2, 32)
    with pytest.raises(ValueError, match="bits a weight"):
        equal_bits_setting(3.5)
    rtn = round_to_nearest(weight, 2)
    assert all(len(torch.unique(group)) <= 4 for group in rtn.reshape(-1, 32))
    assert relative_error(hqq(weight, 3), weight) <= relative_error(round_to_nearest(weight, 3), weight)
    constant = torch.zeros(2, 32)
    assert torch.equal(round_to_nearest(constant, 3), constant)


def test_range_coded_trits_decode_exactly_and_sit_just_above_the_entropy_bound():
    generator = torch.Generator().manual_seed(0)
    trits = (torch.multinomial(torch.tensor([0.2, 0.6, 0.2]), 60_000, replacement=True, generator=generator) - 1)
    trits = trits.to(torch.int8).reshape(300, 200)
    coded = encode_trits(trits)
    assert torch.equal(decode_trits(coded), trits)
    bound = entropy_bits(coded.counts)
    assert bound <= 8 * coded.payload_bytes() <= bound + 128  # the last word and the three counts
    assert 8 * coded.payload_bytes() < 8 * BASE3.packed_bytes(trits.numel()) * 0.9  # zeros dominate: well below base 3
    for constant in (torch.zeros(3, 5, dtype=torch.int8), torch.ones(7, dtype=torch.int8)):
        assert torch.equal(decode_trits(encode_trits(constant)), constant)
    with pytest.raises(ValueError, match="-1, 0 and 1"):
        encode_trits(torch.tensor([2], dtype=torch.int8))


@pytest.fixture(scope="module")
def small_ternary():
    preset = Preset(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, vocab_size=64, max_positions=32)
    model = build_model(preset, 64, 0)
    convert_to_bitnet(model)
    return model.eval()


def test_the_compressed_file_rebuilds_the_model_exactly_and_its_sizes_add_up(small_ternary, tmp_path):
    matrices = float_matrices(small_ternary, ())
    assert list(matrices) == ["model.embed_tokens.weight"]  # the head is tied: one matrix
    seedlm = {key: encode(w) for key, w in matrices.items()}
    chained = with_matrices(small_ternary, {key: decode(code) for key, code in seedlm.items()})
    trits = {name: encode_trits(ternarize(layer.weight)[0]) for name, layer in bit_linears(chained)}
    path = tmp_path / "compressed.safetensors"
    path.write_bytes(write_compressed(chained, seedlm, trits))
    rebuilt = load_compressed(path)
    batch = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(rebuilt(batch).logits, chained(batch).logits)
    sizes = compressed_size_report(path)
    assert sizes["seedlm"] == sum(code.payload_bytes() for code in seedlm.values())
    assert sizes["seedlm_bits_per_weight"] == 4.0
    assert sizes["ternary_range_coded"] == sum(code.payload_bytes() for code in trits.values())
    assert sizes["ternary_packed"] == 0
    assert sizes["float16"] == 0
    assert sizes["file_bytes"] == sum(sizes[k] for k in ("ternary_range_coded", "ternary_packed", "ternary_scales",
                                                         "seedlm", "float16", "other_tensors", "header_bytes"))


def test_float16_matrices_round_trip_through_the_file(small_ternary, tmp_path):
    key = "model.embed_tokens.weight"
    chained = with_matrices(small_ternary, {key: small_ternary.get_parameter(key).detach().half().float()})
    path = tmp_path / "compressed.safetensors"
    path.write_bytes(write_compressed(chained, {}, {}, [key]))
    batch = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load_compressed(path)(batch).logits, chained(batch).logits)
    sizes = compressed_size_report(path)
    assert sizes["float16"] == 2 * small_ternary.get_parameter(key).numel() and sizes["seedlm"] == 0


def test_the_gate_rolls_back_a_stage_past_either_tolerance():
    def card(success, bpb):
        return {"metrics": {"tasks.mean_task_success": {"value": success}, "text.bits_per_byte": {"value": bpb}}}

    config = CompressionConfig(max_task_success_drop=0.02, max_bits_per_byte_rise=0.05)
    gate = CompressionPhase()._gate
    assert gate(card(0.49, 2.04), card(0.5, 2.0), config)["passed"]
    assert not gate(card(0.47, 2.0), card(0.5, 2.0), config)["passed"]
    assert not gate(card(0.5, 2.06), card(0.5, 2.0), config)["passed"]
    with pytest.raises(ValueError, match="bits a weight"):
        CompressionConfig(seedlm={"block": 8, "coefficients": 2})  # 3.5 bits: no baseline at the same bits


@pytest.mark.parametrize(("hidden", "kind"), [(32, "Q4_0"), (256, "TQ2_0")])
def test_the_gguf_holds_every_ternary_matrix_exactly_with_its_scale(hidden, kind, small_corpus, tmp_path):
    """Rows of 256 go in TQ2_0, others in Q4_0 with block scale 1; either dequantizes (gguf's own reader) to
    exactly the codes, and scale x codes is the layer's ternary weight times its mean gain."""
    import gguf
    from gguf.quants import dequantize

    from services.compression.gguf_export import export_gguf

    tokenizer, _ = small_corpus
    preset = Preset(hidden_size=hidden, num_layers=1, num_heads=2, intermediate_size=2 * hidden, vocab_size=len(tokenizer),
                    max_positions=32)
    model = build_model(preset, len(tokenizer), 0)
    convert_to_bitnet(model)
    info = export_gguf(model, tokenizer, tmp_path / "model.gguf")
    assert set(info["matrix_types"].values()) == {kind}
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "model.gguf").tensors}
    layer = model.model.layers[0].self_attn.q_proj
    codes, s_w = ternarize(layer.weight)
    q = tensors["blk.0.attn_q.weight"]
    assert q.tensor_type.name == kind
    assert torch.equal(torch.from_numpy(dequantize(q.data, q.tensor_type).reshape(codes.shape)), codes.float())
    scale = float(tensors["blk.0.attn_q.scale"].data[0])
    assert scale == pytest.approx(float(layer.rms_norm.weight.mean()) / float(s_w), rel=1e-6)
    assert {"token_embd.weight", "output_norm.weight", "blk.0.attn_sub_norm.weight", "blk.0.ffn_sub_norm.weight"} <= set(tensors)
    assert "output.weight" not in tensors  # tied to the embedding, as llama.cpp's bitnet graph reads it
