"""The compressed model file: the packed BitNet file (shared.ternary.packed_model) with its ternary codes
range-coded (entropy.py) and its float matrices in SeedLM form (seedlm.py) or vector-quantized (vq.py). One
safetensors file, so nothing in it can execute on load, and `load_compressed` rebuilds the model from it alone.

Tensors, beside the packed file's own (scales, norm gains, whatever was not compressed):
    <layer>.trit_words        uint32, the range coder's words                instead of <layer>.packed
    <layer>.trit_counts       uint32 (3,), how many -1, 0, 1: the coder's model
    <key>.seedlm_seeds        uint16, each block's LFSR seed                  instead of the float tensor <key>
    <key>.seedlm_nibbles      uint8, per block the exponent then the P coefficients + 8, 4 bits each, two a byte
    <key>.vq_row_scales       float16 (M,)                                    instead of the float tensor <key>
    <key>.vq_codebook         float16 (2^b1, v)
    <key>.vq_residual_codebook  float16 (2^b2, v)
    <key>.vq_indices          uint8, the main codebook's indices at b1 bits each (vq.pack_bits), column by column
    <key>.vq_residual_indices uint8, the residual codebook's at b2 bits each
    <key>                     float16 for the keys in "float16", instead of float32
Metadata: the packed file's (the model's config, the shapes of the ternary layers), FORMAT, "trits" (the
coded layers), "seedlm" (per key its shape, C, P and exponent base), "vq" (per key its shape, v, b1 and b2) and
"float16" (the keys stored so). Version 1 files (before VQ) have no "vq" and load the same way.
"""
from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load, save

from services.compression.entropy import CodedTrits, decode_trits
from services.compression.seedlm import Q_MIN, SeedLMTensor
from services.compression.seedlm import decode as decode_seedlm
from services.compression.vq import VQTensor, pack_bits, unpack_bits
from services.compression.vq import decode as decode_vq
from shared.ternary.packed_model import build_packed_model, pack_model
from shared.ternary.packing import BASE3, pack_ternary

FORMAT = "agentforge.compressed/v2"  # 2: float matrices may be vector-quantized
READABLE = ("agentforge.compressed/v1", FORMAT)
COMPRESSED_FILE = "compressed.safetensors"  # its name in the phase's checkpoint
WORDS, COUNTS, SEEDS, NIBBLES = ".trit_words", ".trit_counts", ".seedlm_seeds", ".seedlm_nibbles"
ROW_SCALES, CODEBOOK, RESIDUAL_CODEBOOK = ".vq_row_scales", ".vq_codebook", ".vq_residual_codebook"
INDICES, RESIDUAL_INDICES = ".vq_indices", ".vq_residual_indices"
VQ_PARTS = (ROW_SCALES, CODEBOOK, RESIDUAL_CODEBOOK, INDICES, RESIDUAL_INDICES)


def _header_metadata(data: bytes) -> dict[str, str]:
    """The metadata of a safetensors file held in memory (its JSON header's __metadata__)."""
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]).get("__metadata__", {})


def _pack_nibbles(values: torch.Tensor) -> torch.Tensor:
    flat = values.reshape(-1).to(torch.uint8)
    if len(flat) % 2:
        flat = torch.cat([flat, torch.zeros(1, dtype=torch.uint8)])
    return flat[0::2] | (flat[1::2] << 4)


def _unpack_nibbles(packed: torch.Tensor, count: int) -> torch.Tensor:
    return torch.stack([packed & 0xF, packed >> 4], dim=1).reshape(-1)[:count]


def write_compressed(model, seedlm: dict[str, SeedLMTensor], trits: dict[str, CodedTrits],
                     float16: Sequence[str] = (), vq: dict[str, VQTensor] | None = None) -> bytes:
    """The file's bytes: the model's packed file with the given layers' codes and float tensors replaced."""
    vq = vq or {}
    packed_bytes = pack_model(model, BASE3)
    metadata, tensors = _header_metadata(packed_bytes), load(packed_bytes)
    shapes = json.loads(metadata["packed_shapes"])
    for layer, coded in trits.items():
        if layer not in shapes:
            raise KeyError(f"{layer} is not a ternary layer of the model")
        del tensors[f"{layer}.packed"]
        tensors[layer + WORDS], tensors[layer + COUNTS] = coded.words, coded.counts
    if set(seedlm) & set(vq):
        raise KeyError(f"coded twice, by SeedLM and by VQ: {sorted(set(seedlm) & set(vq))}")
    for key in [*seedlm, *vq]:
        if key not in tensors or tensors[key].dim() != 2:
            raise KeyError(f"{key} is not a float matrix of the model's packed file")
        del tensors[key]
    for key, encoded in vq.items():
        shape = encoded.vq_shape
        tensors[key + ROW_SCALES] = encoded.row_scales
        tensors[key + CODEBOOK], tensors[key + RESIDUAL_CODEBOOK] = encoded.codebook, encoded.residual_codebook
        tensors[key + INDICES] = pack_bits(encoded.indices, shape.codebook_bits)
        tensors[key + RESIDUAL_INDICES] = pack_bits(encoded.residual_indices, shape.residual_bits)
    for key, encoded in seedlm.items():
        tensors[key + SEEDS] = encoded.seeds
        nibbles = torch.cat([encoded.exponents.unsqueeze(1), (encoded.coefficients - Q_MIN).to(torch.uint8)], dim=1)
        tensors[key + NIBBLES] = _pack_nibbles(nibbles)
    for key in float16:
        if key not in tensors or key in seedlm or key in vq:
            raise KeyError(f"{key} is not a float tensor of the model's packed file left in float")
        tensors[key] = tensors[key].half()
    metadata.update(
        format=FORMAT, trits=json.dumps(sorted(trits)), float16=json.dumps(sorted(float16)),
        seedlm=json.dumps({key: {"shape": list(e.shape), "block": e.block, "coefficients": e.coefficients.shape[1],
                                 "exponent_base": e.exponent_base} for key, e in seedlm.items()}),
        vq=json.dumps({key: {"shape": list(e.shape), "vector": e.vq_shape.vector, "codebook_bits": e.vq_shape.codebook_bits,
                             "residual_bits": e.vq_shape.residual_bits} for key, e in vq.items()}))
    return save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)


def read_compressed(path: str | Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") not in READABLE:
            raise ValueError(f"{path} is not a compressed model file (format {metadata.get('format')!r}, expected one of {READABLE})")
        return metadata, {key: f.get_tensor(key) for key in f.keys()}


def seedlm_tensors(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> dict[str, SeedLMTensor]:
    found = {}
    for key, info in json.loads(metadata["seedlm"]).items():
        blocks, p = len(tensors[key + SEEDS]), info["coefficients"]
        nibbles = _unpack_nibbles(tensors[key + NIBBLES], blocks * (1 + p)).view(blocks, 1 + p)
        found[key] = SeedLMTensor(tuple(info["shape"]), info["block"], tensors[key + SEEDS], nibbles[:, 0].clone(),
                                  nibbles[:, 1:].to(torch.int8) + Q_MIN, info["exponent_base"])
    return found


def vq_tensors(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> dict[str, VQTensor]:
    found = {}
    for key, info in json.loads(metadata.get("vq", "{}")).items():
        rows, columns = info["shape"]
        vectors = (rows + info["vector"] - 1) // info["vector"]
        indices, residual = (unpack_bits(tensors[key + part], info[bits], columns * vectors).view(columns, vectors)
                             for part, bits in ((INDICES, "codebook_bits"), (RESIDUAL_INDICES, "residual_bits")))
        found[key] = VQTensor((rows, columns), tensors[key + ROW_SCALES], tensors[key + CODEBOOK],
                              tensors[key + RESIDUAL_CODEBOOK], indices, residual)
    return found


def coded_trits(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> dict[str, CodedTrits]:
    shapes = json.loads(metadata["packed_shapes"])
    return {layer: CodedTrits(tuple(shapes[layer]), tensors[layer + COUNTS], tensors[layer + WORDS])
            for layer in json.loads(metadata["trits"])}


def load_compressed(path: str | Path):
    """Rebuild the model from the compressed file alone: trits decoded and packed, float matrices decoded
    from their seeds or codebooks; it computes exactly what the model the file was written from computes."""
    metadata, tensors = read_compressed(path)
    packed = {k: v for k, v in tensors.items() if not k.endswith((WORDS, COUNTS, SEEDS, NIBBLES, *VQ_PARTS))}
    for layer, coded in coded_trits(metadata, tensors).items():
        packed[f"{layer}.packed"] = pack_ternary(decode_trits(coded), BASE3)
    for key, encoded in seedlm_tensors(metadata, tensors).items():
        packed[key] = decode_seedlm(encoded)
    for key, encoded in vq_tensors(metadata, tensors).items():
        packed[key] = decode_vq(encoded)
    for key in json.loads(metadata["float16"]):
        packed[key] = tensors[key].float()
    return build_packed_model(metadata["config"], json.loads(metadata["packed_shapes"]), BASE3, packed)


def compressed_size_report(path: str | Path) -> dict[str, int | float]:
    """Where the file's bytes are, measured on it: range-coded trits (words and counts), packed trits left
    as they were, SeedLM payloads, VQ payloads (indices and codebooks), float16 tensors, every other tensor,
    and the header."""
    path = Path(path)
    metadata, tensors = read_compressed(path)
    shapes = json.loads(metadata["packed_shapes"])
    seedlm = json.loads(metadata["seedlm"])
    part = {"ternary_range_coded": (WORDS, COUNTS), "ternary_packed": (".packed",),
            "ternary_scales": (".weight_scale",), "seedlm": (SEEDS, NIBBLES), "vq": VQ_PARTS}
    sizes = {name: sum(t.nbytes for k, t in tensors.items() if k.endswith(suffixes)) for name, suffixes in part.items()}
    sizes["float16"] = sum(tensors[key].nbytes for key in json.loads(metadata["float16"]))
    sizes["other_tensors"] = sum(t.nbytes for t in tensors.values()) - sum(sizes.values())
    sizes["file_bytes"] = path.stat().st_size
    sizes["header_bytes"] = sizes["file_bytes"] - sum(t.nbytes for t in tensors.values())
    ternary_weights = sum(math.prod(s) for s in shapes.values())
    seedlm_weights = sum(math.prod(info["shape"]) for info in seedlm.values())
    vq_weights = sum(math.prod(info["shape"]) for info in json.loads(metadata.get("vq", "{}")).values())
    sizes["ternary_bits_per_weight"] = 8 * (sizes["ternary_range_coded"] + sizes["ternary_packed"]
                                            + sizes["ternary_scales"]) / ternary_weights
    sizes["seedlm_bits_per_weight"] = 8 * sizes["seedlm"] / seedlm_weights if seedlm_weights else None
    sizes["vq_bits_per_weight"] = 8 * sizes["vq"] / vq_weights if vq_weights else None
    return sizes
