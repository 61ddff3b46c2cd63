"""Grokfast (Lee et al. 2024, "Grokfast: Accelerated Grokking by Amplifying Slow Gradients"): an EMA filter
on each parameter's gradient, applied between backward() and the optimiser step.

    mu <- alpha * mu + (1 - alpha) * g        (mu starts at the first gradient a parameter receives)
    g  <- g + lambda * mu

The EMA is a low-pass filter: it keeps the slow, consistent direction of the gradient and amplifies it by
lambda, which the paper finds speeds up generalisation on algorithmic tasks (grokking) several-fold. A
parameter whose gradient is None at a step (unused that step, or frozen) is skipped: its EMA neither decays
nor is it seeded. Defaults are the reference code's (ironjr/grokfast `gradfilter_ema`): alpha 0.98,
lambda 2.0. A constant gradient g therefore becomes (1 + lambda) g: compare against a baseline whose
learning rate is tuned, since the filter raises the effective step.

In the shared loop (shared.training) the filter runs before gradient clipping, so the clip bounds the
filtered gradient, as it bounds any gradient; the reference code does not clip.
"""
from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field


class GrokfastConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = False
    alpha: float = Field(0.98, ge=0, lt=1)  # EMA momentum
    lamb: float = Field(2.0, ge=0)  # amplification of the slow component


class GrokfastEMA:
    """The filter's state (one EMA per parameter, by identity) for one model and one run."""

    def __init__(self, config: GrokfastConfig):
        self.alpha, self.lamb = config.alpha, config.lamb
        self.ema: dict[torch.nn.Parameter, torch.Tensor] = {}

    @torch.no_grad()
    def filter(self, parameters) -> None:
        """Replace each parameter's .grad by grad + lambda * EMA(grad), in place."""
        for parameter in parameters:
            if parameter.grad is None:
                continue
            grad = parameter.grad
            ema = self.ema.get(parameter)
            if ema is None:
                ema = self.ema[parameter] = grad.detach().clone()
            else:
                ema.mul_(self.alpha).add_(grad, alpha=1 - self.alpha)
            grad.add_(ema, alpha=self.lamb)
