"""BitNet b1.58 (Ma et al. 2024): ternary weights, 8-bit activations, trained through a straight-through estimator.

One BitLinear replaces each nn.Linear of a decoder; embeddings (a lookup, not a matmul) and, by default, the
LM head stay in full precision. In a BitLinear:

    x  -> RMSNorm(x)                                   norm before quantizing (see below)
    x_q = clamp(round(x * 127 / max|x|), -128, 127)   per token, 8 bits
    W_q = clamp(round(W / mean|W|), -1, 1)             per tensor, ternary
    y   = (x_q W_q^T) / (s_x s_w)                      s_x = 127 / max|x|, s_w = 1 / mean|W|

The norm is the one of the Hugging Face "fine-tuning LLMs to 1.58 bit" recipe and of transformers'
AutoBitLinear(use_rms_norm=True): an RMSNorm with a learnable gain on the layer's input (the blog measured
perplexity 5.9 with it, 6.3 without). The BitNet paper's own models place SubLN norms in the block instead;
per-layer norms need no change to the Llama block, so the result stays a stock Llama checkpoint.

The numerics are exactly transformers' WeightQuant / ActQuant / AutoBitLinear(online_quant=True), so a
checkpoint saved with `quantization_config` (see `bitnet_quantization_config`) loads back with stock
`AutoModelForCausalLM.from_pretrained` as trainable AutoBitLinear layers.

Fine-tuning from a float model uses the lambda warm-up of the same blog: every quantized tensor t becomes
t + lambda (q(t) - t), lambda rising from 0 (float) to 1 (fully quantized), with q's gradient passed straight
through. Our one addition: the norm's gain can start at the typical RMS of the layer's input
(`measure_input_rms` on the float model), so at lambda = 0 the converted model stays close to the float one (gain 1, the blog's
start, rescales every layer's input to RMS 1 and starts fine-tuning from a broken model).
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.quantizers.quantizers_utils import should_convert_module
from transformers.utils.quantization_config import BitNetQuantConfig

logger = logging.getLogger(__name__)

ACTIVATION_MAX = 127  # symmetric 8-bit range [-128, 127]
ACTIVATION_MIN = -128
SCALE_FLOOR = 1e-5  # keeps an all-zero token or tensor from dividing by zero (same floor as transformers)
DEFAULT_KEEP_FULL_PRECISION = ("lm_head",)


def ternary_scale(weight: torch.Tensor) -> torch.Tensor:
    """s_w = 1 / mean|W|, one float32 scalar for the whole tensor."""
    return 1.0 / weight.float().abs().mean().clamp(min=SCALE_FLOOR)


def ternarize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W -> (W_q in {-1, 0, 1} as int8, s_w), with W ~ W_q / s_w."""
    scale = ternary_scale(weight)
    return (weight.float() * scale).round().clamp(-1, 1).to(torch.int8), scale


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """Per-token absmax 8-bit fake quantization: round(x s_x) / s_x along the last dimension."""
    scale = ACTIVATION_MAX / x.float().abs().amax(dim=-1, keepdim=True).clamp(min=SCALE_FLOOR)
    return ((x.float() * scale).round().clamp(ACTIVATION_MIN, ACTIVATION_MAX) / scale).to(x.dtype)


class _WeightSTE(torch.autograd.Function):
    """Forward: W_q / s_w. Backward: the identity (straight-through estimator)."""

    @staticmethod
    def forward(ctx, weight):
        codes, scale = ternarize(weight)
        return (codes.float() / scale).to(weight.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output


class _ActivationSTE(torch.autograd.Function):
    """Forward: 8-bit per-token fake quantization. Backward: the identity."""

    @staticmethod
    def forward(ctx, x):
        return quantize_activations(x)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output


def _blend(value: torch.Tensor, quantize, strength: float) -> torch.Tensor:
    """value + strength (q(value) - value); exactly q(value) at strength 1, gradient 1 throughout."""
    if strength <= 0.0:
        return value
    quantized = quantize(value)
    return quantized if strength >= 1.0 else value + strength * (quantized - value)


class BitLinear(nn.Linear):
    """nn.Linear with BitNet b1.58 quantization; keeps the float (latent) weight that training updates."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, rms_norm_eps: float = 1e-6):
        super().__init__(in_features, out_features, bias)
        self.rms_norm = LlamaRMSNorm(in_features, eps=rms_norm_eps)  # state-dict key as in AutoBitLinear
        self.quant_strength = 1.0  # lambda of the warm-up: 0 float, 1 fully quantized

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _blend(self.rms_norm(x), _ActivationSTE.apply, self.quant_strength)
        weight = _blend(self.weight, _WeightSTE.apply, self.quant_strength)
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, quant_strength={self.quant_strength}"


def _replace_linears(
    model: nn.Module, keep_full_precision: Sequence[str], rms_norm_eps: float, norm_gains: Mapping[str, float]
) -> list[str]:
    replaced = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or not should_convert_module(name, list(keep_full_precision)):
            continue
        bit = BitLinear(module.in_features, module.out_features, module.bias is not None, rms_norm_eps=rms_norm_eps)
        bit.to(device=module.weight.device, dtype=module.weight.dtype)
        with torch.no_grad():
            bit.weight.copy_(module.weight)
            if module.bias is not None:
                bit.bias.copy_(module.bias)
            bit.rms_norm.weight.fill_(norm_gains.get(name, 1.0))
        model.set_submodule(name, bit)
        replaced.append(name)
    return replaced


def bitnet_quantization_config(keep_full_precision: Sequence[str], rms_norm_eps: float) -> dict:
    """What config.json needs for stock transformers to rebuild these layers (online = trainable latent weights)."""
    return BitNetQuantConfig(
        modules_to_not_convert=list(keep_full_precision),
        linear_class="autobitlinear",
        quantization_mode="online",
        use_rms_norm=True,
        rms_norm_eps=rms_norm_eps,
    ).to_dict()


def convert_to_bitnet(
    model: nn.Module,
    keep_full_precision: Sequence[str] = DEFAULT_KEEP_FULL_PRECISION,
    rms_norm_eps: float = 1e-6,
    norm_gains: Mapping[str, float] | None = None,
) -> list[str]:
    """Replace, in place, every nn.Linear not named in keep_full_precision by a BitLinear; return their names.

    norm_gains: layer name -> initial gain of its input norm (default 1, see measure_input_rms).
    """
    if any(isinstance(m, BitLinear) for m in model.modules()) or getattr(model.config, "quantization_config", None):
        raise ValueError("model is already quantized; convert_to_bitnet takes a float model")
    if getattr(model.config, "tie_word_embeddings", False) and should_convert_module("lm_head", list(keep_full_precision)):
        raise ValueError("the LM head is tied to the embeddings, which stay in full precision: keep 'lm_head'")
    replaced = _replace_linears(model, keep_full_precision, rms_norm_eps, norm_gains or {})
    if not replaced:
        logger.warning("convert_to_bitnet found no nn.Linear to convert; the model is unchanged")
        return replaced
    model.config.quantization_config = bitnet_quantization_config(keep_full_precision, rms_norm_eps)
    return replaced


def adopt_bit_linears(model: nn.Module) -> list[str]:
    """Replace, in place, every transformers AutoBitLinear (what load_checkpoint rebuilds from a BitNet
    checkpoint) by the BitLinear computing the same thing, so that later phases train, set the quant
    strength of and pack one kind of ternary layer; return their names. A model with BitLinear layers
    already (the embedded pipeline hands them on in memory) is left as it is."""
    from transformers.integrations.bitnet import AutoBitLinear

    adopted = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, AutoBitLinear):
            continue
        if not module.online_quant or module.rms_norm is None:
            raise ValueError(f"{name}: only online-quantized AutoBitLinear layers with an input norm can be trained")
        bit = BitLinear(module.in_features, module.out_features, module.bias is not None,
                        rms_norm_eps=module.rms_norm.variance_epsilon)
        bit.to(device=module.weight.device, dtype=module.weight.dtype)
        with torch.no_grad():
            bit.weight.copy_(module.weight)
            bit.rms_norm.weight.copy_(module.rms_norm.weight)
            if module.bias is not None:
                bit.bias.copy_(module.bias)
        model.set_submodule(name, bit)
        adopted.append(name)
    return adopted


def bit_linears(model: nn.Module) -> Iterable[tuple[str, BitLinear]]:
    return ((name, m) for name, m in model.named_modules() if isinstance(m, BitLinear))


def set_quant_strength(model: nn.Module, strength: float) -> None:
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"quant strength must lie in [0, 1], got {strength}")
    for _, layer in bit_linears(model):
        layer.quant_strength = strength


@torch.no_grad()
def measure_input_rms(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, float]:
    """Mean RMS of each nn.Linear's input token vectors over the batches (token ids, shape (B, T)).

    Given to convert_to_bitnet as norm gains: RMSNorm(x) = g x / rms(x), so with g = the typical rms(x)
    each layer sees roughly its float input and the model at lambda = 0 computes nearly what it did.
    """
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}

    def record(name):
        def hook(module, args):
            rms = args[0].float().pow(2).mean(dim=-1).sqrt()
            sums[name] = sums.get(name, 0.0) + rms.sum().item()
            counts[name] = counts.get(name, 0) + rms.numel()

        return hook

    linears = {name: m for name, m in model.named_modules() if type(m) is nn.Linear}
    handles = [m.register_forward_pre_hook(record(name)) for name, m in linears.items()]
    try:
        for input_ids in batches:
            model(input_ids=input_ids)
    finally:
        for handle in handles:
            handle.remove()
    return {name: sums[name] / counts[name] for name in sums}


def trainable_ternary(model) -> torch.nn.Module:
    """A copy of a BitNet model whose ternary layers are BitLinear at full strength, its latent weights float32."""
    model = copy.deepcopy(model)
    adopt_bit_linears(model)
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise ValueError("a phase after BitNet trains float32 latent weights; the model holds another dtype")
    if not any(True for _ in bit_linears(model)):
        raise ValueError("the model has no ternary layer to train; phases after BitNet take BitNet's output")
    set_quant_strength(model, 1.0)
    return model
