"""Final compression's parts: SeedLM's seed search and exact decoding, VQ's codebooks, error feedback, bits on
disk and exact decoding, the range coder's exact round trip and its bits against the entropy bound, the
baselines' bits, and the compressed file rebuilt to the same logits."""
import copy
import math

import pytest
import torch

from services.compression import vq
from services.compression.baselines import (baseline_bits_per_weight, bits_setting_at_least, equal_bits_setting, hqq,
                                            round_to_nearest)
from services.compression.compressed_file import compressed_size_report, load_compressed, write_compressed
from services.compression.entropy import decode_trits, encode_trits, entropy_bits
from services.compression.phase import (CompressionConfig, CompressionPhase, float_matrices, output_relative_error,
                                        relative_error, with_matrices)
from services.compression.seedlm import (Q_MAX, Q_MIN, SEEDS, SeedLMShape, decode, encode, generator_matrices,
                                         lfsr_cycle)
from shared.models import Preset, build_model
from shared.ternary.bitlinear import bit_linears, convert_to_bitnet, ternarize
from shared.ternary.packing import BASE3
from shared.training import collate

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
    # VQ's bits: the least setting of no fewer bits, the same one where the bits are equal.
    assert [bits_setting_at_least(b) for b in (2.94, 3.0, 3.97, 4.0, 4.01)] == [(2, 32), (2, 32), (3, 32), (3, 32), (4, 32)]
    with pytest.raises(ValueError, match="bits a weight"):
        equal_bits_setting(3.5)
    rtn = round_to_nearest(weight, 2)
    assert all(len(torch.unique(group)) <= 4 for group in rtn.reshape(-1, 32))
    assert relative_error(hqq(weight, 3), weight) <= relative_error(round_to_nearest(weight, 3), weight)
    constant = torch.zeros(2, 32)
    assert torch.equal(round_to_nearest(constant, 3), constant)


@pytest.mark.parametrize("bits", [1, 3, 7, 8, 12])
def test_indices_pack_at_their_bits_and_unpack_exactly(bits):
    values = torch.randint(0, 2**bits, (1001,), generator=torch.Generator().manual_seed(bits))
    packed = vq.pack_bits(values, bits)
    assert packed.dtype == torch.uint8 and len(packed) == math.ceil(1001 * bits / 8)
    assert torch.equal(vq.unpack_bits(packed, bits, 1001), values)
    with pytest.raises(ValueError, match="outside"):
        vq.pack_bits(torch.tensor([2**bits]), bits)


def test_weighted_kmeans_with_one_entry_is_the_weighted_mean():
    generator = torch.Generator().manual_seed(0)
    vectors, weights = torch.randn(500, 4, generator=generator), torch.rand(500, generator=generator)
    (centroid,) = vq.weighted_kmeans(vectors, weights, 1, generator)
    assert torch.allclose(centroid, (vectors * weights[:, None]).sum(0) / weights.sum(), atol=1e-6)


@pytest.fixture(scope="module")
def correlated_layer():
    """A 256 x 64 matrix and the Hessian of inputs whose dimensions are correlated and of unequal scale."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(256, 64, generator=generator) * 0.05
    inputs = torch.randn(4000, 64, generator=generator) @ torch.randn(64, 64, generator=generator) * torch.linspace(0.2, 2, 64)
    return weight, (inputs.T @ inputs).double()


SMALL_VQ = vq.VQShape(vector=4, codebook_bits=6, residual_bits=3)  # 2.25 bits of indices + 0.28 of codebooks + 0.25 of scales


def test_vq_bits_on_disk_are_the_formula_and_decoding_is_exact(correlated_layer):
    weight, hessian = correlated_layer
    code = vq.encode(weight, hessian, SMALL_VQ)
    bits = (64 * 64 * (6 + 3) + 16 * 4 * (64 + 8) + 16 * 256) / weight.numel()  # indices, codebooks, row scales
    assert SMALL_VQ.bits_per_weight(weight.shape) == bits == 2.78125
    assert 8 * code.payload_bytes() / weight.numel() == 2.78125
    assert code.codebook.dtype == code.residual_codebook.dtype == code.row_scales.dtype == torch.float16
    assert code.codebook.shape == (64, 4) and code.residual_codebook.shape == (8, 4) and code.row_scales.shape == (256,)
    first = vq.decode(code)
    assert first.shape == weight.shape and first.dtype == torch.float32 and torch.equal(first, vq.decode(code))
    # Every vector is its rows' scales times the sum of one entry of each codebook, nothing else.
    sums = code.codebook.float()[:, None, :] + code.residual_codebook.float()[None, :, :]
    assert (sums.reshape(-1, 4) * code.row_scales.float()[:4] == first[:4, 0]).all(1).any()


def test_rows_not_a_multiple_of_the_vector_are_padded_and_counted():
    weight = torch.randn(10, 8, generator=torch.Generator().manual_seed(0))
    shape = vq.VQShape(vector=4, codebook_bits=2, residual_bits=0)
    code = vq.encode(weight, torch.eye(8, dtype=torch.float64), shape)
    assert code.indices.shape == (8, 3) and vq.decode(code).shape == (10, 8)
    assert code.payload_bytes() == math.ceil(3 * 8 * 2 / 8) + 2 * 4 * 4 + 2 * 10 == shape.payload_bytes((10, 8))


def test_the_hessian_and_error_feedback_lower_the_output_error_below_plain_kmeans(correlated_layer):
    """Same codebook sizes; under the inputs' Hessian, VPTQ's weighting and column sweep give a smaller error of
    the layer's outputs than k-means with H = I (no weighting, no feedback), at a larger weight error."""
    weight, hessian = correlated_layer
    weighted = vq.decode(vq.encode(weight, hessian, SMALL_VQ))
    plain = vq.decode(vq.encode(weight, torch.eye(64, dtype=torch.float64), SMALL_VQ))
    assert output_relative_error(weighted, weight, hessian) < 0.85 * output_relative_error(plain, weight, hessian)
    assert relative_error(weighted, weight) > relative_error(plain, weight)


def test_vq_beats_the_baselines_at_no_fewer_bits_on_the_layer_output(correlated_layer):
    weight, hessian = correlated_layer
    nbits, group = bits_setting_at_least(SMALL_VQ.bits_per_weight(weight.shape))
    assert (nbits, group) == (2, 32) and baseline_bits_per_weight(nbits, group) == 3.0 >= 2.78125
    coded = output_relative_error(vq.decode(vq.encode(weight, hessian, SMALL_VQ)), weight, hessian)
    assert coded < output_relative_error(round_to_nearest(weight, nbits, group), weight, hessian)
    assert coded < output_relative_error(hqq(weight, nbits, group), weight, hessian)


def test_the_input_hessian_of_a_tied_embedding_is_the_final_hidden_states_plus_its_lookup_share(small_ternary):
    rows = [[1, 2, 3, 4, 5, 6], [7, 8, 9]]
    input_ids, attention_mask, _ = collate(rows, 0)
    (hessian,) = vq.input_hessians(small_ternary, ["model.embed_tokens.weight"], input_ids, attention_mask).values()
    with torch.no_grad():
        hidden = small_ternary.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    x = hidden[attention_mask.bool()].double()
    head = x.T @ x
    lookup = vq.LOOKUP_SHARE * head.diagonal().mean() * torch.eye(32, dtype=torch.float64)
    assert torch.allclose(hessian, head + lookup, rtol=1e-5, atol=1e-8)
    untied = copy.deepcopy(small_ternary)
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach().clone())
    by_key = vq.input_hessians(untied, ["model.embed_tokens.weight", "lm_head.weight"], input_ids, attention_mask)
    assert torch.equal(by_key["model.embed_tokens.weight"], torch.eye(32, dtype=torch.float64))  # a lookup only
    assert torch.allclose(by_key["lm_head.weight"], head, rtol=1e-5, atol=1e-8)  # a head only


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


def test_vq_matrices_rebuild_bit_for_bit_from_the_file_at_the_formulas_bits(small_ternary, tmp_path):
    key = "model.embed_tokens.weight"
    weight = small_ternary.get_parameter(key).detach()
    code = vq.encode(weight, torch.eye(32, dtype=torch.float64), SMALL_VQ)
    chained = with_matrices(small_ternary, {key: vq.decode(code)})
    path = tmp_path / "compressed.safetensors"
    path.write_bytes(write_compressed(chained, {}, {}, vq={key: code}))
    rebuilt = load_compressed(path)
    assert torch.equal(rebuilt.get_parameter(key), vq.decode(code))
    sizes = compressed_size_report(path)
    assert sizes["vq"] == code.payload_bytes() and sizes["vq_bits_per_weight"] == SMALL_VQ.bits_per_weight(weight.shape)
    assert sizes["seedlm"] == sizes["float16"] == 0
    with pytest.raises(KeyError, match="coded twice"):
        write_compressed(chained, {key: encode(weight)}, {}, vq={key: code})


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


@pytest.mark.parametrize(("hidden", "ternary_type", "kind"), [(32, "TQ2_0", "Q4_0"), (256, "TQ2_0", "TQ2_0"),
                                                            (256, "TQ1_0", "TQ1_0")])
def test_the_gguf_holds_every_ternary_matrix_exactly_with_its_scale(hidden, ternary_type, kind, small_corpus, tmp_path):
    """Rows of 256 go in the ternary type asked for (TQ2_0 or TQ1_0), others in Q4_0 with block scale 1; each
    dequantizes (gguf's own reader) to exactly the codes, and scale x codes is the layer's ternary weight times
    its mean gain."""
    import gguf
    from gguf.quants import dequantize

    from services.compression.gguf_export import export_gguf

    tokenizer, _ = small_corpus
    preset = Preset(hidden_size=hidden, num_layers=1, num_heads=2, intermediate_size=2 * hidden, vocab_size=len(tokenizer),
                    max_positions=32)
    model = build_model(preset, len(tokenizer), 0)
    convert_to_bitnet(model)
    info = export_gguf(model, tokenizer, tmp_path / "model.gguf", ternary_type=ternary_type)
    assert set(info["matrix_types"].values()) == {kind}
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "model.gguf").tensors}
    layer = model.model.layers[0].self_attn.q_proj
    codes, s_w = ternarize(layer.weight.detach())
    q = tensors["blk.0.attn_q.weight"]
    assert q.tensor_type.name == kind
    assert torch.equal(torch.from_numpy(dequantize(q.data, q.tensor_type).reshape(codes.shape)), codes.float())
    scale = float(tensors["blk.0.attn_q.scale"].data[0])
    assert scale == pytest.approx(float(layer.rms_norm.weight.detach().mean()) / float(s_w), rel=1e-6)
    assert {"token_embd.weight", "output_norm.weight", "blk.0.attn_sub_norm.weight", "blk.0.ffn_sub_norm.weight"} <= set(tensors)
    assert "output.weight" not in tensors  # tied to the embedding, as llama.cpp's bitnet graph reads it
