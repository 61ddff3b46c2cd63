"""Dream replay: a buffer of earlier real rows and of the model's own samples, mixed back into training.

What is replayed, and in what share:
- real rows: every row the loop trained on enters a reservoir (uniform over all rows seen so far, capacity
  `capacity`), so replay revisits earlier batches (of earlier curriculum levels too) against forgetting;
- dreams: every `every` steps the model samples `per_round` continuations at temperature `temperature`
  (ancestral sampling, no top-k), each from the first `prompt_tokens` tokens of a real row in the buffer,
  `length` tokens long; the newest `capacity` dreams are kept. Trained on as ordinary text, a dream pulls
  the model towards what it already writes: the consolidation the reference notes call "sleep".
Once the buffer holds anything, each batch row is a replayed one with probability `share`; a replayed row
is a dream with probability `dream_fraction` (while dreams exist), else a real row from the reservoir.

Not from one paper: the predecessor named the idea; this is its plainest measurable form, and its effect
is an ablation in the phase report, not a claim.
"""
from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from shared.training import NOT_PREDICTED, Row


class DreamConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    share: float = Field(0.125, ge=0, le=1)  # of the batch rows, once the buffer holds anything
    dream_fraction: float = Field(0.5, ge=0, le=1)  # of the replayed rows, once dreams exist
    every: int = Field(25, ge=1)  # steps between dream rounds
    per_round: int = Field(8, ge=1)
    temperature: float = Field(1.3, gt=0)
    prompt_tokens: int = Field(4, ge=1)
    length: int = Field(48, ge=1)  # tokens sampled per dream
    capacity: int = Field(512, ge=1)  # rows kept of each kind


class ReplayBuffer:
    def __init__(self, config: DreamConfig, seed: int):
        self.config = config
        self.real: list[Row] = []
        self.dreams: list[Row] = []
        self.real_seen = 0
        self._rng = torch.Generator().manual_seed(seed)  # reservoir and prompts; the loop's sampler stays untouched

    def add_real(self, rows: list[Row]) -> None:
        for row in rows:
            self.real_seen += 1
            if len(self.real) < self.config.capacity:
                self.real.append(row)
                continue
            slot = int(torch.randint(self.real_seen, (1,), generator=self._rng))
            if slot < self.config.capacity:
                self.real[slot] = row

    def replay(self, generator: torch.Generator) -> tuple[Row, bool] | None:
        """A row to replay and whether it is a dream; None while the buffer is empty."""
        if not self.real and not self.dreams:
            return None
        dream = bool(self.dreams) and (not self.real or float(torch.rand((), generator=generator)) < self.config.dream_fraction)
        pool = self.dreams if dream else self.real
        return pool[int(torch.randint(len(pool), (1,), generator=generator))], dream

    @torch.no_grad()
    def dream(self, model, pad_id: int, eos_id: int, step: int) -> list[Row]:
        """Sample a round of dreams from the model (left as it was: train or eval mode) and keep them."""
        if not self.real:
            return []
        config = self.config
        picks = torch.randint(len(self.real), (config.per_round,), generator=self._rng).tolist()
        prompts = [self.real[i][: config.prompt_tokens] for i in picks]
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):  # left-padded, as generation needs
            ids[row, width - len(prompt):] = torch.tensor([t % NOT_PREDICTED for t in prompt])
            mask[row, width - len(prompt):] = 1
        was_training = model.training
        model.eval()
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(1 << 31, (1,), generator=self._rng)) + step)
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=config.temperature,
                                 top_k=0, top_p=1.0, max_new_tokens=config.length, pad_token_id=pad_id)
        model.train(was_training)
        dreams = []
        for prompt, generated in zip(prompts, out[:, width:].tolist(), strict=True):
            if eos_id in generated:  # a finished dream ends at its end-of-text; the rest is padding
                generated = generated[: generated.index(eos_id) + 1]
            dreams.append([t % NOT_PREDICTED for t in prompt] + generated)
        self.dreams = (self.dreams + dreams)[-config.capacity:]
        return dreams
