"""Quiet-STaR's "talk" step: the mixing head, which decides how much of a thought to use.

As in the reference (use_concat_talk_head, use_complex_talk_head, use_weighted_talk_head): an MLP over the
concatenated hidden states without and with the thought, [h, h_thought] -> Linear(2H, H), ReLU,
Linear(H, H), ReLU, Linear(H, 1), gives a weight w, and the next-token logits are
lm_head((1 - w) * h + w * h_thought). The last layer starts at zero, so w = 0 and training begins at
exactly the model's own predictions. Like the reference, w is the head's raw output (no sigmoid).

The head travels with the model as a documented extra file, MIXING_HEAD_FILE: a safetensors file holding
the head's weights (layers.*) and the learned input embeddings of the two thought tokens
(thought_embeddings, 2 x H: start, end; the vocabulary's rows for them are zero, see thoughts.py), whose
metadata names the thought tokens and the thought length it was trained with.
"""
from __future__ import annotations

import json
import struct

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from services.quietstar.thoughts import END_THOUGHT, START_THOUGHT

MIXING_HEAD_FILE = "quietstar-mixing-head.safetensors"
FORMAT = "agentforge.quietstar.mixing-head/v1"


class MixingHead(torch.nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(2 * hidden_size, hidden_size), torch.nn.ReLU(),
            torch.nn.Linear(hidden_size, hidden_size), torch.nn.ReLU(),
            torch.nn.Linear(hidden_size, 1, bias=False),
        )
        torch.nn.init.zeros_(self.layers[-1].weight)

    def weight(self, base: torch.Tensor, thought: torch.Tensor) -> torch.Tensor:
        """w (..., 1) for hidden states without and with the thought, each (..., H)."""
        return self.layers(torch.cat([base, thought], dim=-1))

    def mix(self, base: torch.Tensor, thought: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        w = self.weight(base, thought) if w is None else w
        return base * (1 - w) + thought * w


THOUGHT_EMBEDDINGS = "thought_embeddings"


def save_head(head: MixingHead, thought_embeddings: torch.Tensor, thought_length: int) -> bytes:
    metadata = {"format": FORMAT, "start_thought": START_THOUGHT, "end_thought": END_THOUGHT,
                "thought_length": str(thought_length),
                "use": "logits = lm_head((1 - w) * h + w * h_thought), w = layers([h, h_thought])"}
    tensors = {name: tensor.detach().contiguous() for name, tensor in head.state_dict().items()}
    tensors[THOUGHT_EMBEDDINGS] = thought_embeddings.detach().contiguous()
    return save_tensors(tensors, metadata=metadata)


def load_head(payload: bytes) -> tuple[MixingHead, torch.Tensor]:
    """The head and the thought embeddings (2, H) of a saved file."""
    tensors = load_tensors(payload)
    embeddings = tensors.pop(THOUGHT_EMBEDDINGS)
    head = MixingHead(embeddings.shape[1])
    head.load_state_dict(tensors)
    return head.eval(), embeddings


def head_metadata(payload: bytes) -> dict[str, str]:
    """The metadata of a saved head (safetensors' header, read without loading the tensors)."""
    (length,) = struct.unpack("<Q", payload[:8])
    return json.loads(payload[8 : 8 + length]).get("__metadata__", {})
