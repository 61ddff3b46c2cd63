"""Quiet-STaR's "think" step: thought tokens, and a thought generated in parallel at every text position.

A batch of texts (B, T) is laid out as blocks of T columns, one sequence of N*T tokens:

    block 0                 the text x_0 .. x_{T-1} (causal, as in plain language modelling)
    block 1                 <|startthought|> at every column
    blocks 2 .. k+1         the k thought tokens, sampled one block at a time
    block k+2               <|endthought|>; its hidden state at column i predicts x_{i+1}
    blocks k+3 .. k+1+n     teacher forcing: x_{i+1} .. x_{i+n-1} after the thought, predicting x_{i+2} ..

The token at block b >= 1, column i sees the text up to x_i and the tokens of its own column in blocks
1..b, nothing else: the reference's diagonal attention mask (a diagonal appended per block). Its position
is i + b, so a thought continues its prefix as ordinary text would. Sampling a block needs the block
before it, so the blocks are generated one after another with a key/value cache; the whole layout then
runs once more with gradients for the objective (services.quietstar.objective).

The two thought tokens are added to the tokenizer and to the vocabulary with zero rows in the (tied)
embedding: the output head shares those rows, so a learned row would give the plain model, as later phases
and stock transformers run it, two likely tokens it was never taught to avoid (a first version that trained
the rows in place cost the plain model 0.66 bits per byte). A zero row has logit 0 everywhere. The learned
embeddings live apart, start at the embedding of "---" as the reference's do, and travel with the mixing
head (services.quietstar.mixing_head). During training they are ThoughtEmbeddings, stored divided by
EMBEDDING_SCALE: under Adam that makes their steps EMBEDDING_SCALE times larger than the rest's (the
reference's way of training them faster). No text prediction may be a thought token (the reference's
pitfall): their logits are masked wherever the phase predicts.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache

START_THOUGHT = "<|startthought|>"
END_THOUGHT = "<|endthought|>"
INITIAL_THOUGHT_TEXT = "---"  # the reference initialises both thought embeddings from this token
EMBEDDING_SCALE = 100.0  # the reference's embedding_scale

Embed = Callable[[torch.Tensor], torch.Tensor]  # token ids -> input embeddings


@dataclass(frozen=True)
class ThoughtTokens:
    start: int
    end: int

    @property
    def ids(self) -> list[int]:
        return [self.start, self.end]


def thought_tokens(tokenizer) -> ThoughtTokens:
    """The ids of the two thought tokens of a tokenizer that has them; a ValueError if it has not."""
    ids = tokenizer.convert_tokens_to_ids([START_THOUGHT, END_THOUGHT])
    if tokenizer.unk_token_id in ids or None in ids:
        raise ValueError(f"the tokenizer has no {START_THOUGHT} / {END_THOUGHT} tokens (add_thought_tokens adds them)")
    return ThoughtTokens(*ids)


def add_thought_tokens(model, tokenizer) -> tuple[ThoughtTokens, torch.Tensor]:
    """Add the two thought tokens to tokenizer and vocabulary (in place), their rows zero; returns their ids
    and the initial thought embeddings (2, H): the embedding of INITIAL_THOUGHT_TEXT's first token, twice."""
    if START_THOUGHT in tokenizer.get_vocab():
        raise ValueError(f"the tokenizer has {START_THOUGHT} already: this model went through Quiet-STaR before")
    initial = tokenizer(INITIAL_THOUGHT_TEXT, add_special_tokens=False)["input_ids"][0]
    vectors = model.get_input_embeddings().weight[initial].detach().clone().repeat(2, 1)
    tokenizer.add_special_tokens({"additional_special_tokens": [START_THOUGHT, END_THOUGHT]},
                                 replace_extra_special_tokens=False)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    tokens = thought_tokens(tokenizer)
    with torch.no_grad():
        model.get_input_embeddings().weight[tokens.ids] = 0.0
    return tokens, vectors


def embed_with_thoughts(table: torch.nn.Embedding, tokens: ThoughtTokens, vectors: torch.Tensor,
                        ids: torch.Tensor) -> torch.Tensor:
    """Input embeddings of ids, the thought tokens' taken from vectors (2, H) instead of the table."""
    embeds = table(ids)
    for row, token in enumerate(tokens.ids):
        embeds = torch.where((ids == token)[..., None], vectors[row].to(embeds.dtype), embeds)
    return embeds


class ThoughtEmbeddings(torch.nn.Module):
    """The two thought tokens' input embeddings as a separate, faster-learning parameter (see the module doc)."""

    def __init__(self, model, tokens: ThoughtTokens, initial: torch.Tensor):
        super().__init__()
        self.tokens = tokens
        self.table = model.get_input_embeddings()
        self.scaled = torch.nn.Parameter(initial.detach().clone() / EMBEDDING_SCALE)

    def vectors(self) -> torch.Tensor:
        return self.scaled * EMBEDDING_SCALE

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return embed_with_thoughts(self.table, self.tokens, self.vectors(), ids)


def mask_thought_logits(logits: torch.Tensor, tokens: ThoughtTokens) -> torch.Tensor:
    """logits with the thought tokens made impossible (text never contains them)."""
    return logits.index_fill(-1, torch.tensor(tokens.ids, device=logits.device), float("-inf"))


# --- the parallel layout ------------------------------------------------------------------------------


def n_blocks(thought_length: int, n_true: int) -> int:
    """Blocks of the layout: text, start, k thought tokens, end, n_true - 1 teacher-forced tokens."""
    return thought_length + 2 + n_true


def block_attention(n: int, width: int, device=None) -> torch.Tensor:
    """allowed[query, key] over the N*T layout (block-major): True where the query may attend."""
    column = torch.arange(width, device=device)
    causal = column[None, :] <= column[:, None]  # (T, T): key column <= query column
    diagonal = column[None, :] == column[:, None]
    allowed = torch.zeros(n, width, n, width, dtype=torch.bool, device=device)
    allowed[:, :, 0, :] = causal  # every block reads the text up to its column
    for query_block in range(1, n):
        allowed[query_block, :, 1 : query_block + 1, :] = diagonal[:, None, :] # and its own column's thought so far
    return allowed.reshape(n * width, n * width)


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask as the additive (1, 1, Q, K) float mask transformers' attention takes as given."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)[None, None]


def block_positions(n: int, batch: int, width: int, device=None) -> torch.Tensor:
    """Position ids (B, N*T): block b, column i sits at position i + b."""
    column = torch.arange(width, device=device)
    return torch.cat([column + b for b in range(n)])[None].expand(batch, -1)


def shift_columns(x: torch.Tensor, by: int, fill) -> torch.Tensor:
    """x[:, i + by] at column i (dim 1), filled past the end."""
    if by == 0:
        return x
    tail = torch.full((x.shape[0], by, *x.shape[2:]), fill, dtype=x.dtype, device=x.device)
    return torch.cat([x[:, by:], tail], dim=1)


def teacher_forced_blocks(text: torch.Tensor, n_true: int, pad_id: int) -> list[torch.Tensor]:
    """The blocks after the end token: x_{i+1} .. x_{i+n_true-1} at column i."""
    return [shift_columns(text, s, pad_id) for s in range(1, n_true)]


def layout_ids(text: torch.Tensor, thoughts: torch.Tensor, tokens: ThoughtTokens, n_true: int, pad_id: int) -> torch.Tensor:
    """The N*T token ids: text, start, the thought blocks (B, k, T), end, then the teacher-forced shifts."""
    return torch.cat([text, torch.full_like(text, tokens.start), *thoughts.unbind(1), torch.full_like(text, tokens.end),
                      *teacher_forced_blocks(text, n_true, pad_id)], dim=1)


@dataclass
class Thoughts:
    tokens: torch.Tensor  # (B, k, T): the sampled thought token of block 2 + j at column i
    hidden: torch.Tensor  # (B, N, T, H): final hidden states of the layout, computed while sampling (no grad)


@torch.no_grad()
def generate_thoughts(model, embed: Embed, text: torch.Tensor, tokens: ThoughtTokens, thought_length: int,
                      n_true: int, pad_id: int, temperature: float = 1.0,
                      generator: torch.Generator | None = None) -> Thoughts:
    """Sample a thought at every column of text (B, T), one block per forward pass over the cache.
    temperature 0 takes the most likely token (inference); thought tokens are never sampled."""
    batch, width = text.shape
    n = n_blocks(thought_length, n_true)
    device = text.device
    allowed = block_attention(n, width, device)
    positions = block_positions(n, batch, width, device)
    dtype = next(model.parameters()).dtype
    cache = DynamicCache()
    hidden, sampled = [], []
    start = torch.full_like(text, tokens.start)
    end = torch.full_like(text, tokens.end)
    forced = teacher_forced_blocks(text, n_true, pad_id)
    block_ids = text
    for b in range(n):
        rows = slice(b * width, (b + 1) * width)
        mask = additive(allowed[rows, : (b + 1) * width], dtype)
        out = model.model(inputs_embeds=embed(block_ids), attention_mask=mask, position_ids=positions[:, rows],
                          past_key_values=cache, use_cache=True)
        hidden.append(out.last_hidden_state)
        if b < n - 1:
            if 1 <= b <= thought_length:  # the start token and each thought token sample the next thought token
                logits = mask_thought_logits(model.lm_head(out.last_hidden_state).float(), tokens)
                block_ids = _sample(logits, temperature, generator)
                sampled.append(block_ids)
            elif b == 0:
                block_ids = start
            elif b == thought_length + 1:
                block_ids = end
            else:
                block_ids = forced[b - thought_length - 2]
    thought = torch.stack(sampled, dim=1) if sampled else torch.zeros(batch, 0, width, dtype=text.dtype, device=device)
    return Thoughts(tokens=thought, hidden=torch.stack(hidden, dim=1))


def _sample(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(-1)
    probabilities = torch.softmax(logits / temperature, dim=-1)
    flat = probabilities.flatten(0, -2)
    return torch.multinomial(flat, 1, generator=generator).view(logits.shape[:-1])


def layout_hidden(model, embed: Embed, ids: torch.Tensor, n: int) -> torch.Tensor:
    """One forward pass over a whole layout (B, N*T) with gradients: final hidden states (B, N, T, H)."""
    batch, total = ids.shape
    width = total // n
    dtype = next(model.parameters()).dtype
    mask = additive(block_attention(n, width, ids.device), dtype)
    out = model.model(inputs_embeds=embed(ids), attention_mask=mask,
                      position_ids=block_positions(n, batch, width, ids.device))
    return out.last_hidden_state.view(batch, n, width, -1)
