"""Inference with thoughts: a model that thinks (greedily) before each token it predicts or writes.

ThinkingModel wraps the language model and its mixing head behind the two calls the shared scorecard makes,
so the same scorecard, tool runtime and suites score a model with and without thoughts:
- forward(input_ids, attention_mask).logits: at every column, the mixed prediction after a greedy thought
  there (the parallel layout of services.quietstar.thoughts with n_true = 1), for likelihoods and bits per byte;
- generate(...): greedy decoding where every new token follows a thought at the last position (start
  token, thought tokens, end token, continuing the text's positions), mixed with the prediction without it.
Thought tokens are never predicted nor written (their logits are masked), and a thought is dropped once its
token is chosen: the text seen by later tokens is the text alone, as in training.
"""
from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import torch
from transformers import DynamicCache

from services.quietstar.mixing_head import MixingHead
from services.quietstar.thoughts import ThoughtTokens, embed_with_thoughts, generate_thoughts, mask_thought_logits


class ThinkingModel(torch.nn.Module):
    def __init__(self, model, head: MixingHead, tokens: ThoughtTokens, thought_embeddings: torch.Tensor,
                 thought_length: int, force_w: float | None = None):
        super().__init__()
        self.model, self.head, self.tokens, self.thought_length = model, head, tokens, thought_length
        self.register_buffer("thought_embeddings", thought_embeddings.detach().clone())
        self.force_w = force_w  # a fixed mixing weight in place of the head's (0: the model without thoughts)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return embed_with_thoughts(self.model.get_input_embeddings(), self.tokens, self.thought_embeddings, ids)

    @property
    def config(self):
        return self.model.config

    def _mixed_logits(self, base: torch.Tensor, thought: torch.Tensor) -> torch.Tensor:
        w = None if self.force_w is None else torch.full((*base.shape[:-1], 1), self.force_w, dtype=base.dtype)
        return mask_thought_logits(self.model.lm_head(self.head.mix(base, thought, w)), self.tokens)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_) -> SimpleNamespace:
        """Teacher-forced next-token logits (B, T, V) with a greedy thought at every column (right padding)."""
        pad = self.model.config.pad_token_id or 0
        thoughts = generate_thoughts(self.model, self.embed, input_ids, self.tokens,
                                     self.thought_length, 1, pad, temperature=0)
        return SimpleNamespace(logits=self._mixed_logits(thoughts.hidden[:, 0], thoughts.hidden[:, self.thought_length + 2]))

    @torch.no_grad()
    def next_token_logits(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, V) logits of the token after left-padded ids, after a greedy thought at the last position."""
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        out = self.model.model(inputs_embeds=self.embed(ids), attention_mask=mask, position_ids=positions,
                               past_key_values=cache, use_cache=True)
        base = out.last_hidden_state[:, -1]
        feed = torch.full_like(ids[:, :1], self.tokens.start)
        position = positions[:, -1:]
        for step in range(self.thought_length + 2):  # start, the thought tokens, end
            position, mask = position + 1, torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = self.model.model(inputs_embeds=self.embed(feed), attention_mask=mask, position_ids=position,
                                   past_key_values=cache, use_cache=True)
            if step < self.thought_length:
                feed = mask_thought_logits(self.model.lm_head(out.last_hidden_state), self.tokens).argmax(-1)
            else:
                feed = torch.full_like(feed, self.tokens.end)
        return self._mixed_logits(base, out.last_hidden_state[:, -1])

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                 pad_token_id: int, tokenizer, stop_strings: Sequence[str] = (), do_sample: bool = False,
                 streamer=None, **_) -> torch.Tensor:
        """Greedy generation as transformers' generate returns it (prompt + new tokens, finished rows padded),
        stopping a row at the end-of-text token or once its new text holds a stop string. A transformers
        streamer gets the prompt, then each new token, as generate gives them to it."""
        if do_sample:
            raise ValueError("ThinkingModel generates greedily only")
        ids, mask = input_ids, attention_mask
        width = ids.shape[1]
        finished = torch.zeros(ids.shape[0], dtype=torch.bool)
        eos = self.model.config.eos_token_id
        if streamer is not None:
            streamer.put(ids)
        for _ in range(max_new_tokens):
            token = self.next_token_logits(ids, mask).argmax(-1)
            token = torch.where(finished, torch.full_like(token, pad_token_id), token)
            if streamer is not None:
                streamer.put(token)
            ids = torch.cat([ids, token[:, None]], dim=1)
            mask = torch.cat([mask, (~finished).long()[:, None]], dim=1)
            texts = tokenizer.batch_decode(ids[:, width:], skip_special_tokens=True)
            finished |= (token == eos) | torch.tensor([any(stop in text for stop in stop_strings) for text in texts])
            if finished.all():
                break
        if streamer is not None:
            streamer.end()
        return ids
