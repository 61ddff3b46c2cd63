"""The packed BitNet file: the whole model in one safetensors file, ternary layers at 2 or 1.6 bits a weight.

File contents (safetensors, so nothing in it can execute on load):
    <layer>.packed            uint8, codec.packed_bytes(out * in) bytes: the ternary weight (packing.py)
    <layer>.weight_scale      float32 scalar s_w; the layer's weight is W_q / s_w
    <layer>.rms_norm.weight   float32, the layer's input-norm gain;   <layer>.bias if the layer has one
    every other tensor        as in the model's state dict (embeddings, block norms, full-precision LM head)
    metadata                  format, codec, the model's config.json, and the shape of each packed layer

`load_packed` rebuilds the model from this file alone, with PackedBitLinear layers that compute exactly what
BitLinear computes at quant strength 1: same activation quantizer, same W_q / s_w.
"""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from shared.ternary.bitlinear import bit_linears, quantize_activations, ternarize
from shared.ternary.packing import Codec, get_codec, pack_ternary, unpack_ternary
from shared.training import collate

FORMAT = "agentforge.bitnet-packed/v1"
PACKED_FILE = "bitnet-packed.safetensors"  # its name in a checkpoint's extra files (BitNet's and every later phase's)


class PackedBitLinear(nn.Module):
    """Inference-only BitLinear whose weight lives packed; unpacked per call, or once if cache_unpacked."""

    def __init__(self, in_features: int, out_features: int, bias: bool, codec: Codec, *, rms_norm_eps: float,
                 cache_unpacked: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.codec = in_features, out_features, codec
        self.packed = nn.Buffer(torch.zeros(codec.packed_bytes(in_features * out_features), dtype=torch.uint8))
        self.weight_scale = nn.Buffer(torch.ones((), dtype=torch.float32))
        self.rms_norm = LlamaRMSNorm(in_features, eps=rms_norm_eps)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.cache_unpacked = cache_unpacked
        self._unpacked: torch.Tensor | None = None

    def ternary_weight(self) -> torch.Tensor:
        """W_q / s_w, computed as BitLinear computes it, from the packed codes."""
        if self._unpacked is not None:
            return self._unpacked
        codes = unpack_ternary(self.packed, (self.out_features, self.in_features), self.codec)
        weight = codes.float() / self.weight_scale
        if self.cache_unpacked:
            self._unpacked = weight
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = quantize_activations(self.rms_norm(x))
        return F.linear(x, self.ternary_weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, codec={self.codec.name}"


def pack_model(model: PreTrainedModel, codec: Codec) -> bytes:
    """Serialize a BitNet model (BitLinear layers, see convert_to_bitnet) to the packed file's bytes."""
    layers = dict(bit_linears(model))
    if not layers:
        raise ValueError("the model has no BitLinear layer to pack; run convert_to_bitnet first")
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        codes, scale = ternarize(layer.weight.detach())
        tensors[f"{name}.packed"] = pack_ternary(codes, codec)
        tensors[f"{name}.weight_scale"] = scale
        tensors[f"{name}.rms_norm.weight"] = layer.rms_norm.weight.detach()
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias.detach()
    seen_storage = {t.data_ptr() for t in tensors.values()}
    for key, tensor in model.state_dict().items():
        if key.rsplit(".", 1)[0] in layers or key.rsplit(".", 2)[0] in layers:
            continue
        if tensor.data_ptr() in seen_storage:  # tied weights (embeddings and LM head) are stored once
            continue
        seen_storage.add(tensor.data_ptr())
        tensors[key] = tensor.detach()
    metadata = {
        "format": FORMAT,
        "codec": codec.name,
        "config": model.config.to_json_string(use_diff=False),
        "packed_shapes": json.dumps({name: [l.out_features, l.in_features] for name, l in layers.items()}),
    }
    return save({k: v.contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)


def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path} is not a packed BitNet file (format {metadata.get('format')!r}, expected {FORMAT!r})")
        return metadata, {key: f.get_tensor(key) for key in f.keys()}


def load_packed(path: str | Path, *, cache_unpacked: bool = False) -> PreTrainedModel:
    """Rebuild the model from the packed file alone, in eval mode, with PackedBitLinear layers."""
    metadata, tensors = _read(Path(path))
    return build_packed_model(metadata["config"], json.loads(metadata["packed_shapes"]), get_codec(metadata["codec"]),
                              tensors, cache_unpacked=cache_unpacked)


def build_packed_model(config_json: str, packed_shapes: dict[str, list[int]], codec: Codec,
                       tensors: dict[str, torch.Tensor], *, cache_unpacked: bool = False) -> PreTrainedModel:
    """The model of a packed file's contents (its config.json, the shapes of its packed layers, its tensors)."""
    config_dict = json.loads(config_json)
    quantization = config_dict.pop("quantization_config", None) or {}
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config)
    eps = quantization.get("rms_norm_eps") or 1e-6
    for name, (out_features, in_features) in packed_shapes.items():
        has_bias = f"{name}.bias" in tensors
        model.set_submodule(name, PackedBitLinear(in_features, out_features, has_bias, codec, rms_norm_eps=eps,
                                                  cache_unpacked=cache_unpacked))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    loaded = {model.state_dict()[k].data_ptr() for k in tensors}
    really_missing = [k for k in missing if model.state_dict()[k].data_ptr() not in loaded]  # tied ones are fine
    if really_missing or unexpected:
        raise ValueError(f"packed file does not match its config: missing {really_missing}, unexpected {unexpected}")
    model.config.quantization_config = quantization
    return model.eval()


def packed_size_report(path: str | Path) -> dict[str, float | int]:
    """Sizes measured on the file: the ternary layers (payload + scales) and the whole file."""
    path = Path(path)
    metadata, tensors = _read(path)
    codec = get_codec(metadata["codec"])
    shapes = json.loads(metadata["packed_shapes"])
    ternary_weights = sum(math.prod(shape) for shape in shapes.values())
    payload = sum(tensors[f"{name}.packed"].numel() for name in shapes)
    scales = sum(tensors[f"{name}.weight_scale"].nbytes for name in shapes)
    parameters = ternary_weights + sum(t.numel() for k, t in tensors.items() if not k.endswith((".packed", ".weight_scale")))
    file_bytes = path.stat().st_size
    return {
        "codec": codec.name,
        "ternary_weights": ternary_weights,
        "ternary_payload_bytes": payload,
        "ternary_scale_bytes": scales,
        "ternary_bits_per_weight": 8 * (payload + scales) / ternary_weights,
        "parameters": parameters,
        "file_bytes": file_bytes,
        "file_bits_per_parameter": 8 * file_bytes / parameters,
    }


def ternary_check(input_model, output_model, codec_name: str, rows: list, pad_id: int) -> dict:
    """The output is still ternary: its packed file's size against the input's, and the packed model's
    logits against the checkpoint's on real rows."""
    codec = get_codec(codec_name)
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        sizes = {}
        for name, model in (("input", input_model), ("output", output_model)):
            path = Path(folder) / f"{name}.safetensors"
            path.write_bytes(pack_model(model, codec))
            sizes[name] = packed_size_report(path)
        packed = load_packed(Path(folder) / "output.safetensors")
        input_ids, attention_mask, _ = collate(rows, pad_id)
        expected = output_model(input_ids=input_ids, attention_mask=attention_mask).logits
        got = packed(input_ids=input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    return {"input_packed_bytes": sizes["input"]["file_bytes"], "output_packed_bytes": sizes["output"]["file_bytes"],
            "same_packed_size": sizes["input"]["file_bytes"] == sizes["output"]["file_bytes"],
            "ternary_bits_per_weight": sizes["output"]["ternary_bits_per_weight"],
            "packed_logits_max_abs_diff": float((expected - got).abs()[real].max())}
