"""Quantization-aware fine-tuning of a converted model, from float to ternary by a lambda warm-up.

Naively ternarizing a float model sends its loss towards that of a random one. The Hugging Face
"fine-tuning LLMs to 1.58 bit" recipe instead blends each quantized tensor in: t + lambda (q(t) - t), with
lambda = min(step / warmup_steps, 1), so training starts on the float function and ends fully quantized,
the straight-through estimator carrying the gradient throughout. The optimisation itself is the shared
training loop (AdamW, warmup + cosine, padding masked) on the latent float weights.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from shared.ternary.bitlinear import bit_linears, set_quant_strength
from shared.phase import ProgressFn, no_progress
from shared.training import Row, TrainingConfig, TrainingCurve, train_causal_lm


def quant_strength_at(step: int, warmup_steps: int) -> float:
    """lambda = min(step / warmup_steps, 1); warmup_steps 0 means quantized from the first step."""
    return 1.0 if warmup_steps == 0 else min(step / warmup_steps, 1.0)


def quantization_aware_finetune(
    model: torch.nn.Module,
    sources: Mapping[str, Sequence[Row]],
    mix: Mapping[str, float],
    training: TrainingConfig,
    *,
    lambda_warmup_steps: int,
    pad_id: int,
    eval_sets: Mapping[str, Sequence[Row]] | None = None,
    progress: ProgressFn = no_progress,
) -> tuple[TrainingCurve, list[float]]:
    """Train the model's BitLinear layers in place; returns the curve and lambda at every step.

    Evaluations on the curve are taken at the lambda of their step; the last one, after the final step,
    at lambda 1.
    """
    if not any(True for _ in bit_linears(model)):
        raise ValueError("the model has no BitLinear layer; run convert_to_bitnet first")
    if not 0 <= lambda_warmup_steps <= training.steps:
        raise ValueError(f"lambda_warmup_steps must lie in [0, {training.steps}], got {lambda_warmup_steps}")
    strengths = [quant_strength_at(0, lambda_warmup_steps)]
    set_quant_strength(model, strengths[0])

    def advance_lambda(fraction: float, message: str) -> None:
        # The shared loop reports progress after each optimiser step; the next step uses the next lambda.
        step = round(fraction * training.steps)
        strength = quant_strength_at(step, lambda_warmup_steps)
        set_quant_strength(model, strength)
        if step < training.steps:
            strengths.append(strength)
        progress(fraction, f"{message} lambda {strength:.2f}")

    try:
        curve = train_causal_lm(model, sources, mix, training, pad_id=pad_id, eval_sets=eval_sets,
                                progress=advance_lambda)
    finally:
        set_quant_strength(model, 1.0)
    return curve, strengths
