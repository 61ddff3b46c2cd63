"""Quiet-STaR's "learn" step: the loss of one batch, as the reference computes it.

For every text column i and every one of `n_passes` thoughts sampled there (services.quietstar.thoughts):
- the mixed prediction (services.quietstar.mixing_head) of each of the next n_true true tokens, read after
  the thought with the true tokens before it teacher-forced;
- reward r = sum over those tokens of log p_mixed(x) - log p_base(x): how much the thought helped predict
  the true future (the base is the model's own prediction without a thought, at the same column);
- advantage = r - the mean reward of the thoughts sampled at the same column (the reference's baseline),
  negative advantages clipped to 0 (its default); policy loss -advantage * log p(thought tokens);
- language-modelling loss: original_loss_weight * the base prediction's NLL + the rest * the mean NLL of
  the mixed predictions over the n_true tokens.
Tokens that are padding or read-only (calculator results, shared.training) are neither predicted nor rewarded.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from services.quietstar.mixing_head import MixingHead
from services.quietstar.thoughts import (
    ThoughtEmbeddings, ThoughtTokens, generate_thoughts, layout_hidden, layout_ids, mask_thought_logits, n_blocks,
    shift_columns)


class ObjectiveConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    thought_length: int = Field(8, ge=0)  # sampled thought tokens between start and end (reference: 10)
    n_true: int = Field(4, ge=1)  # true tokens scored after each thought (reference: 4)
    n_passes: int = Field(2, ge=1)  # thoughts sampled per column, the baseline's sample (reference: 2)
    temperature: float = Field(1.0, gt=0)  # of thought sampling in training (reference: 1)
    original_loss_weight: float = Field(0.5, ge=0, le=1)  # share of the base prediction's NLL (reference: 0.5)
    # The reference scales the policy loss by 1e6 (policy_loss_beta) against lr 1e-6 on a 7B model; at our
    # scale and learning rate the two terms are weighed equally by default (not tuned; a config choice).
    policy_weight: float = Field(1.0, ge=0)
    clip_negative_advantage: bool = True


class QuietStarModel(torch.nn.Module):
    """What trains: the language model, its mixing head and the thought embeddings, as one module whose
    forward is the plain model's (so shared.training's held-out losses are the model's without thoughts)."""

    def __init__(self, model, head: MixingHead, thought_embeddings: ThoughtEmbeddings):
        super().__init__()
        self.model, self.head, self.thought_embeddings = model, head, thought_embeddings

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), reduction="none").view(targets.shape)


def quietstar_loss(trainee: QuietStarModel, tokens: ThoughtTokens, config: ObjectiveConfig, pad_id: int,
                   generator: torch.Generator, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   predicted: torch.Tensor) -> tuple[torch.Tensor, int, dict[str, float]]:
    """(loss * predicted tokens, predicted tokens, logged figures): a shared.training StepLoss."""
    model, head, embed = trainee.model, trainee.head, trainee.thought_embeddings
    k, n_true, passes = config.thought_length, config.n_true, config.n_passes
    ids = input_ids.repeat_interleave(passes, 0)
    counted = (attention_mask.bool() & predicted.bool()).repeat_interleave(passes, 0)
    thoughts = generate_thoughts(model, embed, ids, tokens, k, n_true, pad_id, config.temperature, generator)
    hidden = layout_hidden(model, embed, layout_ids(ids, thoughts.tokens, tokens, n_true, pad_id), n_blocks(k, n_true))
    base = hidden[:, 0]
    base_logprobs = _token_logprobs(mask_thought_logits(model.lm_head(base), tokens), shift_columns(ids, 1, pad_id))
    valid = [shift_columns(counted, 1 + j, False) for j in range(n_true)]  # column i predicts x_{i+1+j}
    base_loss = -(base_logprobs * valid[0]).sum() / valid[0].sum().clamp(min=1)

    reward = torch.zeros(ids.shape, device=ids.device)
    mixed_losses, weights = [], None
    for j in range(n_true):
        base_j = shift_columns(base, j, 0.0)
        thought_j = hidden[:, k + 2 + j]
        w = head.weight(base_j, thought_j)
        weights = w.squeeze(-1) if j == 0 else weights
        logits = mask_thought_logits(model.lm_head(head.mix(base_j, thought_j, w)), tokens)
        mixed = _token_logprobs(logits, shift_columns(ids, 1 + j, pad_id))
        mixed_losses.append(-(mixed * valid[j]).sum() / valid[j].sum().clamp(min=1))
        reward = reward + ((mixed - shift_columns(base_logprobs, j, 0.0)) * valid[j]).detach()
    lm_loss = (config.original_loss_weight * base_loss
               + (1 - config.original_loss_weight) * torch.stack(mixed_losses).mean())

    columns = valid[0]
    policy_loss = torch.zeros((), device=ids.device)
    if k > 0:
        thought_logits = mask_thought_logits(model.lm_head(hidden[:, 1 : k + 1]), tokens)  # (B, k, T, V)
        thought_logprob = _token_logprobs(thought_logits, thoughts.tokens).sum(1)  # (B, T)
        advantage = reward.view(-1, passes, reward.shape[-1])
        advantage = (advantage - advantage.mean(1, keepdim=True)).view_as(reward)
        if config.clip_negative_advantage:
            advantage = advantage.clamp(min=0)
        policy_loss = -(advantage * thought_logprob * columns).sum() / columns.sum().clamp(min=1)
    loss = lm_loss + config.policy_weight * policy_loss
    count = int(columns.sum()) // passes  # predicted targets per text, as causal_lm_loss counts them
    n_columns = columns.sum().clamp(min=1)
    figures = {name: float(value.detach()) for name, value in (
        ("mean_reward", reward.sum() / n_columns), ("policy_loss", policy_loss), ("lm_loss", lm_loss),
        ("base_loss", base_loss), ("mixed_loss", mixed_losses[0]), ("mean_w", (weights * columns).sum() / n_columns))}
    return loss * max(count, 1), max(count, 1), figures
