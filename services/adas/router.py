"""The first pass of adaptive inference: which expert an input calls for.

The reference's prompt-based strategy asks the model itself, with a classification prompt, which task an
input is; a 1M-parameter model cannot follow such a prompt. Our router is the cheaper analogue of the
reference's classification expert: a linear classifier (multinomial logistic regression, L2) on the input
model's own last hidden state averaged over the input's tokens, trained on training-split inputs of each
expert's family. Its first pass is one forward of the model; the second runs the chosen expert.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

FIT_STEPS = 300
WEIGHT_DECAY = 1e-3


@torch.no_grad()
def features(model, tokenizer, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """The mean last hidden state over each text's tokens, (len(texts), hidden)."""
    rows = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(list(texts[start:start + batch_size]), add_special_tokens=False, padding=True,
                          return_tensors="pt")
        hidden = model(**batch, output_hidden_states=True).hidden_states[-1]
        mask = batch["attention_mask"].unsqueeze(-1).float()
        rows.append((hidden * mask).sum(1) / mask.sum(1))
    return torch.cat(rows)


class Router:
    """Logistic regression from features to one of `labels`."""

    def __init__(self, labels: Sequence[str], weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor,
                 scale: torch.Tensor):
        self.labels, self.weight, self.bias, self.mean, self.scale = list(labels), weight, bias, mean, scale

    @classmethod
    def fit(cls, inputs: dict[str, torch.Tensor], seed: int) -> Router:
        """inputs: label -> its training features."""
        labels = list(inputs)
        x = torch.cat([inputs[label] for label in labels])
        y = torch.cat([torch.full((len(inputs[label]),), i) for i, label in enumerate(labels)])
        mean, scale = x.mean(0), x.std(0).clamp(min=1e-6)
        x = (x - mean) / scale
        torch.manual_seed(seed)
        linear = torch.nn.Linear(x.shape[1], len(labels))
        optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=FIT_STEPS, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = F.cross_entropy(linear(x), y) + WEIGHT_DECAY * linear.weight.pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        return cls(labels, linear.weight.detach(), linear.bias.detach(), mean, scale)

    def route(self, features_: torch.Tensor) -> list[str]:
        logits = ((features_ - self.mean) / self.scale) @ self.weight.T + self.bias
        return [self.labels[i] for i in logits.argmax(1).tolist()]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"router.weight": self.weight, "router.bias": self.bias, "router.feature_mean": self.mean,
                "router.feature_scale": self.scale}
