"""Self-modeling: an auxiliary head that predicts the model's own per-token loss from its final hidden state.

What it predicts, precisely: at each position t, the next-token negative log-likelihood (nats) the model
itself is about to incur there, -log p(x_{t+1} | x_<=t), read from the same forward pass and detached, so it
is a target and not a path for gradients. The head is one linear map from the final (normed) hidden state
to a scalar; its loss is the squared error, averaged over the tokens the language-model loss counts.

Why this target: it is the model's own confidence, a property of its computation that exists at every token
of every source without labels, and asking the trunk to make it linearly readable is the "know what you
do not know" form of self-modeling the reference notes name. Before `warmup_steps` the head learns on
detached hidden states (it is calibrated when it switches on, but does not shape the model); from then on
its gradient, weighted by `weight` (0.1, the predecessor's), also reaches the trunk. The head is discarded
with the training: the model handed on is the ternary LM alone, and the ablation measures what the head's
gradient did to it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class SelfModelConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    weight: float = Field(0.1, ge=0)
    warmup_steps: int = Field(50, ge=0)


class SelfModelingLM(nn.Module):
    """The LM and its self-model head, trained together; forward is the LM's, so held-out losses are the LM's."""

    def __init__(self, lm: nn.Module, config: SelfModelConfig):
        super().__init__()
        self.lm = lm
        self.head = nn.Linear(lm.config.hidden_size, 1)
        self.config = config
        self.steps_taken = 0  # counted by the loss: the warm-up is in optimiser steps

    def forward(self, *args, **kwargs):
        return self.lm(*args, **kwargs)


def self_modeling_loss(trainee: SelfModelingLM, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       predicted: torch.Tensor) -> tuple[torch.Tensor, int, dict[str, float]]:
    """A shared.training StepLoss: the LM's summed NLL plus the weighted self-model error."""
    outputs = trainee.lm(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    counted = (attention_mask[:, 1:].bool() & predicted[:, 1:].bool()).flatten()
    nll = F.cross_entropy(outputs.logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten(),
                          reduction="none")[counted]
    hidden = outputs.hidden_states[-1][:, :-1].flatten(0, 1)[counted]
    switched_on = trainee.steps_taken >= trainee.config.warmup_steps
    prediction = trainee.head(hidden if switched_on else hidden.detach()).squeeze(-1).float()
    error = (prediction - nll.detach()).pow(2)
    trainee.steps_taken += 1
    figures = {"self_model_mse": error.mean().item(), "own_loss_variance": nll.detach().var().item(),
               "self_model_on": float(switched_on)}
    return nll.sum() + trainee.config.weight * error.sum(), int(counted.sum()), figures
