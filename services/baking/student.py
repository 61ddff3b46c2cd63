"""The baking student: the input ternary model with a low-rank update, and how that update is folded in.

The phase must hand on a ternary model, so whatever the student learns has to survive being folded into the
latent weights and re-ternarized (W_q = round(W / mean|W|) clamped to {-1, 0, 1}). Two students:

    peft_lora    peft's LoRA beside each ternary layer: y = BitLinear(x) + (alpha / r) B A x, a float branch
                 on the layer's raw input. Folding adds (alpha / r) B A to the latent weight (peft's
                 merge_and_unload) and the layer re-ternarizes it; an update smaller than half a quantization
                 step is rounded away, and the branch's input was not the layer's normed, 8-bit one.
    latent_lora  the same low-rank update inside the quantizer: W_q = ternarize(W + (alpha / r) B A), trained
                 through the straight-through estimator, the teacher-frozen W untouched. Folding writes
                 W + (alpha / r) B A into the latent weight: the ternary forward is exactly the trained one.

Both train only A and B (peft's initialisation: A Kaiming-uniform, B zero, so training starts at the input).
The phase folds either and measures the validation KL before and after folding; the report says which was
used and what folding cost (README, Baking, for both).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn.utils import parametrize

from shared.ternary.bitlinear import bit_linears

StudentKind = Literal["latent_lora", "peft_lora"]


class LoraSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    rank: int = Field(8, ge=1)
    alpha: float = Field(8.0, gt=0)


class LatentLoRA(nn.Module):
    """A parametrization of a ternary layer's latent weight: W -> W + (alpha / r) B A."""

    def __init__(self, out_features: int, in_features: int, settings: LoraSettings):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(settings.rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, settings.rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # peft's (and nn.Linear's) initialisation
        self.scaling = settings.alpha / settings.rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scaling * (self.lora_B @ self.lora_A)


def make_student(model: nn.Module, kind: StudentKind, settings: LoraSettings, seed: int) -> nn.Module:
    """The student for a trainable ternary model (shared.ternary.bitlinear.trainable_ternary), changed in place:
    every parameter frozen except the low-rank update of each ternary layer."""
    model.requires_grad_(False)
    torch.manual_seed(seed)  # the A matrices' initialisation
    if kind == "latent_lora":
        for _, layer in list(bit_linears(model)):
            parametrize.register_parametrization(layer, "weight",
                                                 LatentLoRA(layer.out_features, layer.in_features, settings))
        return model
    from peft import LoraConfig, get_peft_model

    targets = [name for name, _ in bit_linears(model)]
    return get_peft_model(model, LoraConfig(r=settings.rank, lora_alpha=settings.alpha, target_modules=targets,
                                            lora_dropout=0.0, bias="none"))


def fold(student: nn.Module, kind: StudentKind) -> nn.Module:
    """The plain ternary model the student's update is folded into (latent weights; BitLinear re-ternarizes)."""
    if kind == "latent_lora":
        for _, layer in list(bit_linears(student)):
            if parametrize.is_parametrized(layer, "weight"):
                parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
        model = student
    else:
        model = student.merge_and_unload()
    model.requires_grad_(True)
    return model.eval()


def trainable_parameters(student: nn.Module) -> int:
    return sum(p.numel() for p in student.parameters() if p.requires_grad)
