"""Export to GGUF (the `gguf` package) for llama.cpp's BitNet architecture, and what differs from our model.

llama.cpp's "bitnet" graph (src/models/bitnet.cpp) is a Llama block with BitNet's SubLN norms: an RMSNorm
before the attention output (attn_sub_norm) and before the down projection (ffn_sub_norm), one float scale
per matrix (`<tensor>.scale`, multiplied after the product), rotary embeddings in the NEOX layout (HF's
rotate_half, so no permutation of q and k) and the output tied to the token embedding. Our BitLinear puts
an RMSNorm with its own gain before every projection instead (shared.ternary.bitlinear), so:

- exact: o_proj's and down_proj's norms are attn_sub_norm and ffn_sub_norm; their ternary codes and 1 / s_w.
- approximate: q, k and v share one input norm in llama.cpp, and so do gate and up. Ours normalises again
  per projection, with its own gain, the block norm's output u = g_in * x / rms(x). Exported: attn_norm =
  g_in / rms(g_in) * (the mean of the projections' gains, each over its own mean), and each projection's
  mean gain folded into its scale. Left out: each gain's deviation from the shared one (a few percent in
  a trained model) and rms(u) / rms(g_in), which is 1 when x spreads its energy evenly over the dimensions.
- approximate: our 8-bit per-token absmax activations. llama.cpp quantizes activations per block of 32
  (Q8_0, for the Q4_0 matrices) or 256 (Q8_K, for TQ2_0), or not at all (F16).

The ternary matrices go in TQ2_0 (2.0625 bits a weight, rows in blocks of 256; or TQ1_0, 1.6875 bits, with
`ternary_type="TQ1_0"`) where a row's length is a multiple of 256, else in Q4_0 with a block scale of exactly 1
(4.5 bits a weight, blocks of 32): the tiny preset's 128- and 384-wide rows fit no ternary type. Either way the
codes are stored exactly and the scale tensor holds the rest. `export_gguf(..., ternary=False)` writes the same
graph in F16 (weights = codes x scale) for the speed comparison. The token embedding is F16 in both; norms F32.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import gguf
import numpy as np
import torch

from shared.ternary.bitlinear import ternarize

ARCH = "bitnet"
TQ_BLOCK = 256
Q4_BLOCK = 32
ATTENTION = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
MLP = {"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def _q4_0_exact(codes: np.ndarray) -> np.ndarray:
    """Q4_0 blocks (float16 d = 1, then 16 bytes: element j in the low nibble of byte j, element j + 16 in
    the high nibble) holding the ternary codes exactly as q - 8 with q = code + 8."""
    rows, columns = codes.shape
    q = (codes.astype(np.int16) + 8).astype(np.uint8).reshape(rows, columns // Q4_BLOCK, Q4_BLOCK)
    nibbles = q[..., :16] | (q[..., 16:] << 4)
    d = np.full((rows, columns // Q4_BLOCK, 1), 1.0, dtype=np.float16).view(np.uint8)
    return np.concatenate([d, nibbles], axis=-1).reshape(rows, -1)


def _ternary_tensor(codes: np.ndarray, ternary_type: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    columns = codes.shape[1]
    if columns % TQ_BLOCK == 0:
        kind = gguf.GGMLQuantizationType[ternary_type]
        return gguf.quants.quantize(codes.astype(np.float32), kind), kind
    if columns % Q4_BLOCK == 0:
        return _q4_0_exact(codes), gguf.GGMLQuantizationType.Q4_0
    raise ValueError(f"rows of {columns} weights fit neither TQ2_0 (blocks of {TQ_BLOCK}) nor Q4_0 ({Q4_BLOCK})")


def _f32(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().float().numpy().astype(np.float32)


def _shared_gain(layers: list) -> tuple[torch.Tensor, list[float]]:
    """The gain the projections share (the mean of each one's gain over its own mean) and each one's mean."""
    means = [float(layer.rms_norm.weight.detach().mean()) for layer in layers]
    shared = torch.stack([layer.rms_norm.weight.detach() / m for layer, m in zip(layers, means, strict=True)]).mean(0)
    return shared, means


def export_gguf(model, tokenizer, path: str | Path, *, ternary: bool = True,
                ternary_type: Literal["TQ2_0", "TQ1_0"] = "TQ2_0") -> dict:
    """Write the model as a GGUF llama.cpp runs; returns the type of every matrix and the approximations."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), ARCH)
    writer.add_name("agentforge")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType[f"MOSTLY_{ternary_type}"] if ternary else gguf.LlamaFileType.MOSTLY_F16)
    _add_tokenizer(writer, tokenizer)

    types = {}
    writer.add_tensor("token_embd.weight", _f32(model.model.embed_tokens.weight).astype(np.float16))
    writer.add_tensor("output_norm.weight", _f32(model.model.norm.weight))
    for i, block in enumerate(model.model.layers):
        for norm_name, block_norm, group, modules in (
                ("attn_norm", block.input_layernorm, ATTENTION, block.self_attn),
                ("ffn_norm", block.post_attention_layernorm, MLP, block.mlp)):
            first = [name for name in group if name not in ("o_proj", "down_proj")]
            layers = [getattr(modules, name) for name in first]
            shared, means = _shared_gain(layers)
            gain = block_norm.weight.detach()
            writer.add_tensor(f"blk.{i}.{norm_name}.weight", _f32(gain / gain.pow(2).mean().sqrt() * shared))
            for name, mean in zip(first, means, strict=True):
                types[f"blk.{i}.{group[name]}"] = _add_projection(writer, f"blk.{i}.{group[name]}", getattr(modules, name),
                                                                  mean, ternary, ternary_type)
        for name, sub_norm in (("o_proj", "attn_sub_norm"), ("down_proj", "ffn_sub_norm")):
            modules = block.self_attn if name == "o_proj" else block.mlp
            layer = getattr(modules, name)
            group = ATTENTION if name == "o_proj" else MLP
            writer.add_tensor(f"blk.{i}.{sub_norm}.weight", _f32(layer.rms_norm.weight))
            types[f"blk.{i}.{group[name]}"] = _add_projection(writer, f"blk.{i}.{group[name]}", layer, 1.0, ternary, ternary_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"arch": ARCH, "matrix_types": types,
            "exact": ["attention output and down projection: their norms (attn_sub_norm, ffn_sub_norm), codes and 1/s_w"],
            "approximate": ["q, k, v (and gate, up) share one input norm: per-projection gains folded to their mean "
                            "and a shared gain; the second normalisation's rms taken as rms(g_in)",
                            "activations: llama.cpp's block quantization (Q8_0 / Q8_K) or none (F16) instead of "
                            "8-bit per token", "token embedding in F16"]}


def _add_projection(writer, name: str, layer, gain_mean: float, ternary: bool, ternary_type: str) -> str:
    """One projection: its ternary codes (or F16 weights) and its scale, gain_mean / s_w."""
    codes, s_w = ternarize(layer.weight.detach())
    scale = gain_mean / float(s_w)
    if not ternary:
        writer.add_tensor(f"{name}.weight", (codes.float() * scale).numpy().astype(np.float16))
        return "F16"
    data, kind = _ternary_tensor(codes.numpy(), ternary_type)
    writer.add_tensor(f"{name}.weight", data, raw_shape=data.shape, raw_dtype=kind)
    writer.add_tensor(f"{name}.scale", np.array([scale], dtype=np.float32))
    return kind.name


def _add_tokenizer(writer, tokenizer) -> None:
    """The byte-level BPE as llama.cpp's "gpt2" tokenizer (its vocabulary, merges and special tokens). Our
    pre-tokenizer splits digits one by one, which no llama.cpp pre-tokenizer does: llama.cpp's own
    tokenization of text can differ, so comparisons feed it our token ids."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    by_id = {token_id: token for token, token_id in state["model"]["vocab"].items()}
    # Tokens added after training (Quiet-STaR's thought tokens) are not in the BPE's vocabulary but have
    # embedding rows: llama.cpp needs one token per row, in id order.
    by_id.update({added["id"]: added["content"] for added in state.get("added_tokens", [])})
    if sorted(by_id) != list(range(len(by_id))):
        raise ValueError(f"token ids are not 0..{len(by_id) - 1}: GGUF lists tokens by position")
    tokens = [by_id[token_id] for token_id in range(len(by_id))]
    special = {added["content"] for added in state.get("added_tokens", [])}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    merges = state["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tokenizer.eos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
