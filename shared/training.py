"""The one causal-LM training loop the phases share: packed rows, a data mix, AdamW, warmup + cosine.

Data arrives as named sources of token rows (lists of ids, each at most seq_len long, made by
`pack_rows`) and a mix that weights the sources. Every batch row is drawn from a source chosen by weight,
so a specialist is "the same loop on a different mix". Batches are right-padded; the loss predicts token
t+1 from tokens <= t and counts real tokens only (padding never contributes, and no position predicts
across the end of a row). The same seed, data and config give the same weights: batch sampling uses its
own seeded generator and torch runs on a fixed number of threads.

Read-only tokens: text a model reads but never writes (the calculator results the tool runtime splices into
a transcript) is kept in its row as id + NOT_PREDICTED; collate gives the model the id and leaves the
token out of the loss, as agent fine-tuning masks tool observations. Training on them would teach a 1M
model to guess products it is never asked for, in place of copying the result it is given.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from shared.calculator import result_spans
from shared.grokfast import GrokfastConfig, GrokfastEMA
from shared.phase import ProgressFn, no_progress

Row = list[int]
NOT_PREDICTED = 1 << 30  # added to the id of a read-only token (larger than any vocabulary)
ReadOnlySpans = Callable[[str], list[tuple[int, int]]]  # text -> [start, end) character spans of read-only text
# (model, input_ids, attention_mask, predicted) -> (loss summed over its tokens, token count, figures to log).
# The default is causal_lm_loss; a phase with an objective of its own (Quiet-STaR) passes one.
StepLoss = Callable[..., tuple[torch.Tensor, int, dict[str, float]]]
# (model, rows) -> a held-out loss of the rows; the default is mean_loss.
EvalLoss = Callable[[torch.nn.Module, Sequence[Row]], float]


class TrainingConfig(BaseModel):
    """Hyperparameters of one run. Defaults suit the `tiny` preset on 2 CPU cores."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: int = Field(300, ge=1)
    batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(3e-3, gt=0)  # peak; small models tolerate large rates
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # cosine decays to this fraction of the peak
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.1, ge=0)  # on matrices only, not on norms (nanoGPT's split)
    grad_clip: float = Field(1.0, gt=0)
    eval_every: int = Field(50, ge=1)  # steps between held-out evaluations (and one at the end)
    seed: int = 0
    threads: int = Field(2, ge=1)  # torch intra-op threads; fixed so results repeat
    grokfast: GrokfastConfig = GrokfastConfig()  # the slow-gradient filter (shared.grokfast); off by default

    @model_validator(mode="after")
    def _warmup_fits(self) -> TrainingConfig:
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be fewer than steps ({self.steps})")
        return self


@dataclass
class TrainingCurve:
    """What a run measured: train loss at every step, held-out loss per source at every evaluation."""

    train_loss: list[float] = field(default_factory=list)  # mean nats per predicted token, per step
    eval_steps: list[int] = field(default_factory=list)
    eval_loss: dict[str, list[float]] = field(default_factory=dict)  # source -> loss at each eval step
    logged: dict[str, list[float]] = field(default_factory=dict)  # a StepLoss's figures, one per step
    best_step: int | None = None  # the evaluation whose weights the model ends with (keep_best), else None
    tokens: int = 0  # tokens predicted (real, non-pad targets) over the whole run
    seconds: float = 0.0  # wall time of the run, evaluations included
    train_seconds: float = 0.0  # wall time of the optimisation steps alone

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds else 0.0

    def as_report(self) -> dict:
        return {
            "train_loss": [round(x, 4) for x in self.train_loss],
            "eval_steps": self.eval_steps,
            "eval_loss": {k: [round(x, 4) for x in v] for k, v in self.eval_loss.items()},
            **({"best_step": self.best_step} if self.best_step is not None else {}),
            **({"logged": {k: [round(x, 5) for x in v] for k, v in self.logged.items()}} if self.logged else {}),
            "tokens": self.tokens,
            "seconds": round(self.seconds, 2),
            "train_seconds": round(self.train_seconds, 2),
            "tokens_per_second": round(self.tokens_per_second, 1),
        }


# --- data: texts to rows, rows to batches -------------------------------------------------------------


def pack_rows(token_lists: Iterable[Sequence[int]], seq_len: int, eos_id: int) -> list[Row]:
    """Append end-of-text to each document, cut documents longer than seq_len into pieces, and fill rows
    greedily with whole pieces (short examples share a row, separated by end-of-text; a piece never
    straddles two rows). Fewer pad tokens than one example per row, and every row is at most seq_len."""
    rows: list[Row] = []
    current: Row = []
    for ids in token_lists:
        document = [*ids, eos_id]
        for start in range(0, len(document), seq_len):
            piece = document[start : start + seq_len]
            if len(current) + len(piece) > seq_len:
                rows.append(current)
                current = []
            current.extend(piece)
    if current:
        rows.append(current)
    return rows


def encode_texts(tokenizer, texts: Iterable[str], seq_len: int, read_only: ReadOnlySpans | None = None) -> list[Row]:
    """Tokenise texts (no special tokens added by the tokenizer) and pack them into rows; tokens lying
    inside a span `read_only` returns for their text are marked read-only."""
    return pack_rows(tokenize_marked(tokenizer, texts, read_only), seq_len, tokenizer.eos_token_id)


def tokenize_marked(tokenizer, texts: Iterable[str], read_only: ReadOnlySpans | None = None) -> list[Row]:
    """Each text's token ids (no special tokens), those lying inside a span `read_only` returns for the text
    marked read-only (id + NOT_PREDICTED)."""
    texts = list(texts)
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False, return_offsets_mapping=read_only is not None)
    token_lists = encoded["input_ids"]
    if read_only is not None:
        for i, text in enumerate(texts):
            spans = read_only(text)
            token_lists[i] = [token + NOT_PREDICTED if any(s <= start and end <= e for s, e in spans) else token
                              for token, (start, end) in zip(token_lists[i], encoded["offset_mapping"][i], strict=True)]
    return token_lists


def continuation_rows(tokenizer, prompts: Sequence[str], continuations: Sequence[str]) -> list[Row]:
    """Each prompt + continuation as one row, the prompt and the calculator's results in the continuation
    read-only: the tokens the model wrote after the prompt are the ones a loss counts."""
    texts = [prompt + continuation for prompt, continuation in zip(prompts, continuations, strict=True)]
    spans = {text: [(0, len(prompt)), *result_spans(text)] for text, prompt in zip(texts, prompts, strict=True)}
    return tokenize_marked(tokenizer, texts, read_only=lambda text: spans[text])


def collate(rows: Sequence[Row], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad rows into (input_ids, attention_mask, predicted), each (batch, longest row): predicted is
    1 for a real token the loss may count, 0 for padding and read-only tokens."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    predicted = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        tokens = torch.tensor(row, dtype=torch.long)
        input_ids[i, : len(row)] = tokens % NOT_PREDICTED
        attention_mask[i, : len(row)] = 1
        predicted[i, : len(row)] = (tokens < NOT_PREDICTED).long()
    return input_ids, attention_mask, predicted


def row_nll(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            predicted: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, (sum of next-token NLL in nats, number of predicted tokens), real tokens only, and of those
    only the ones `predicted` marks (default: every real token)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
    # Position t predicts token t+1: drop the last position's logits and the first token's label.
    targets = input_ids[:, 1:]
    # A target counts only if it is a real token; its context (an earlier position) then is real too.
    counted = attention_mask[:, 1:].bool()
    if predicted is not None:
        counted &= predicted[:, 1:].bool()
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), targets, reduction="none")  # (B, T - 1)
    return (nll * counted).sum(1), counted.sum(1)


def causal_lm_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   predicted: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """(sum of next-token NLL in nats, number of predicted tokens) over the batch (row_nll's, summed)."""
    sums, counts = row_nll(model, input_ids, attention_mask, predicted)
    return sums.sum(), int(counts.sum())


@torch.no_grad()
def mean_loss(model, rows: Sequence[Row], pad_id: int, batch_size: int = 32) -> float:
    """Mean next-token NLL (nats) over every real token of rows."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        loss_sum, n = causal_lm_loss(model, *collate(rows[start : start + batch_size], pad_id))
        total, count = total + float(loss_sum), count + n
    model.train(was_training)
    if count == 0:
        raise ValueError("no tokens to evaluate: every row is empty or a single token")
    return total / count


# --- the loop -----------------------------------------------------------------------------------------


def _optimizer(model: torch.nn.Module, config: TrainingConfig) -> torch.optim.AdamW:
    matrices = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": config.weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(0.9, 0.95), eps=1e-8)


def _check_sources(sources: Mapping[str, Sequence[Row]], mix: Mapping[str, float]) -> list[str]:
    # Sorted: the same mix must draw the same batches whatever its key order. A config read back from
    # JSON (a pipeline event) has its keys sorted, and a run from that must equal one from the Python default.
    names = sorted(name for name, weight in mix.items() if weight > 0)
    if not names:
        raise ValueError("the data mix needs at least one source with a positive weight")
    for name in names:
        if name not in sources:
            raise ValueError(f"the mix names source {name!r}, which is not among {sorted(sources)}")
        if not sources[name]:
            raise ValueError(f"source {name!r} has no rows")
    if any(weight < 0 for weight in mix.values()):
        raise ValueError(f"mix weights must be >= 0, got {dict(mix)}")
    return names


class Feed(Protocol):
    """What each step trains on. The loop asks for a batch before the step and tells the feed after it,
    so a feed may change what it serves as training goes (Forge's curriculum and replay)."""

    def draw(self, step: int, batch_size: int, generator: torch.Generator) -> list[Row]: ...

    def after_step(self, step: int, model: torch.nn.Module, rows: list[Row]) -> None: ...


class MixFeed:
    """The default feed: every row from a source chosen by weight, then a row of it uniformly."""

    def __init__(self, sources: Mapping[str, Sequence[Row]], mix: Mapping[str, float]):
        self.names = _check_sources(sources, mix)
        self.weights = torch.tensor([float(mix[name]) for name in self.names])
        self.sources = sources

    def draw(self, step: int, batch_size: int, generator: torch.Generator) -> list[Row]:
        source_ids = torch.multinomial(self.weights, batch_size, replacement=True, generator=generator)
        rows = []
        for source_id in source_ids.tolist():
            pool = self.sources[self.names[source_id]]
            rows.append(pool[int(torch.randint(len(pool), (1,), generator=generator))])
        return rows

    def after_step(self, step: int, model: torch.nn.Module, rows: list[Row]) -> None:
        return None


def train_causal_lm(
    model: torch.nn.Module,
    sources: Mapping[str, Sequence[Row]] | None,
    mix: Mapping[str, float] | None,
    config: TrainingConfig,
    *,
    pad_id: int,
    eval_sets: Mapping[str, Sequence[Row]] | None = None,
    progress: ProgressFn = no_progress,
    step_loss: StepLoss | None = None,
    feed: Feed | None = None,
    eval_loss: EvalLoss | None = None,
    keep_best: str | None = None,
) -> TrainingCurve:
    """Train `model` in place for config.steps steps (on causal_lm_loss unless step_loss is given); returns
    the measured curve. Batches come from MixFeed(sources, mix), or from `feed` (then sources and mix are
    None). Held-out losses are mean_loss's (next-token NLL of model's own forward) unless eval_loss is given.
    With keep_best naming an eval set, the model ends with the weights of the evaluation where that set's
    loss was lowest (early stopping on held-out data), and curve.best_step says which."""
    if (feed is None) == (sources is None and mix is None):
        raise ValueError("give either sources and mix or a feed, not both")
    if keep_best is not None and keep_best not in (eval_sets or {}):
        raise ValueError(f"keep_best names {keep_best!r}, which is not among the eval sets {sorted(eval_sets or {})}")
    feed = feed or MixFeed(sources, mix)
    eval_sets = dict(eval_sets or {})
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)  # dropout-free model, but any stochastic layer draws from here
    sampler = torch.Generator().manual_seed(config.seed)  # batch composition, independent of the model

    optimizer = _optimizer(model, config)
    grokfast = GrokfastEMA(config.grokfast) if config.grokfast.enabled else None
    schedule = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, config.warmup_steps, config.steps, min_lr_rate=config.min_lr_ratio
    )
    curve = TrainingCurve(eval_loss={name: [] for name in eval_sets})
    held_out_loss = eval_loss or (lambda model, rows: mean_loss(model, rows, pad_id))
    best_state: dict[str, torch.Tensor] | None = None

    def evaluate(step: int) -> None:
        nonlocal best_state
        curve.eval_steps.append(step)
        for name, rows in eval_sets.items():
            curve.eval_loss[name].append(held_out_loss(model, rows))
        losses = curve.eval_loss.get(keep_best, [])
        if losses and losses[-1] == min(losses):
            curve.best_step = step
            best_state = {key: value.detach().clone() for key, value in model.state_dict().items()}

    model.train()
    started = time.perf_counter()
    for step in range(config.steps):
        if step % config.eval_every == 0 and eval_sets:
            evaluate(step)
        step_started = time.perf_counter()
        rows = feed.draw(step, config.batch_size, sampler)
        if step_loss is None:
            loss_sum, count = causal_lm_loss(model, *collate(rows, pad_id))
        else:
            loss_sum, count, figures = step_loss(model, *collate(rows, pad_id))
            for name, value in figures.items():
                curve.logged.setdefault(name, []).append(value)
        loss = loss_sum / count
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"training loss became {loss.item()} at step {step}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grokfast is not None:
            grokfast.filter(model.parameters())
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        schedule.step()
        curve.train_loss.append(loss.item())
        curve.tokens += count
        curve.train_seconds += time.perf_counter() - step_started
        feed.after_step(step, model, rows)
        progress((step + 1) / config.steps, f"step {step + 1}/{config.steps} loss {loss.item():.3f}")
    if eval_sets:
        evaluate(config.steps)
    if best_state is not None:
        model.load_state_dict(best_state)
    curve.seconds = time.perf_counter() - started
    model.eval()
    return curve
