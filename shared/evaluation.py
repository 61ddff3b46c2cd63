"""Score a causal language model the way lm-evaluation-harness does, on our text and task suites.

- bits_per_byte: lm-eval's loglikelihood_rolling (the wikitext task): each document is cut into disjoint
  windows of max_length predicted tokens, the first conditioned on a single prefix token (BOS, else EOS),
  the others on the tokens just before them; bits per byte, byte and word perplexity from the summed
  log-likelihood. Token perplexity is not reported: it does not compare across tokenizers.
- greedy_continuations: batched greedy generation from prompts, stopped at the terminator (or other stop
  strings); generative tasks are scored on what it writes (shared.tool_runtime, shared.scorecard), never
  by a teacher-forced proxy. sampled_continuations samples instead, at a temperature, seeded (prompt
  baking's trajectories).
- choice_loglikelihoods: the summed log-probability of " " + choice for every choice (lm-eval's acc is
  its argmax).
Accuracies carry a 95% Wilson interval. Everything runs under torch.no_grad in eval mode.
"""
from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Iterator, Sequence
import torch

from shared.data.tasks import ANSWER_DELIMITER, TERMINATOR, Example

Z_95 = 1.959963984540054
# lm-eval's fallback when neither the model config nor the tokenizer states a context length.
DEFAULT_MAX_LENGTH = 2048
# A tokenizer's model_max_length at or above this means "not set" (transformers' VERY_LARGE_INTEGER).
UNSET_MODEL_MAX_LENGTH = int(1e29)
# Most memory one batch's logits may take (SmolLM2: 8192 positions x 49152 tokens is 1.6 GB a row).
LOGITS_BUDGET_BYTES = 1 << 30

Request = tuple[list[int], list[int]]  # (context tokens, continuation tokens)


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    if successes in (0, n):  # the closed form's exact bound, free of rounding
        bound = n / (n + z * z)
        return (0.0, 1 - bound) if successes == 0 else (bound, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@contextlib.contextmanager
def _evaluating(model) -> Iterator[torch.device]:
    """Eval mode and no gradients for the duration; the model's training flag is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield next(model.parameters()).device
    finally:
        model.train(was_training)


def _continuation_logprobs(model, requests: Sequence[Request], batch_size: int) -> list[float]:
    """Summed log P(continuation | context) per request, as lm-eval's _loglikelihood_tokens computes it:
    the model reads (context + continuation)[:-1] and the last len(continuation) positions are scored."""
    results = [0.0] * len(requests)
    # Longest first so a batch pads little; right padding cannot change earlier positions of a causal model.
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    vocab_size = model.config.vocab_size
    with _evaluating(model) as device:
        start = 0
        while start < len(order):
            # Fewer rows when long windows of a large vocabulary would make the float32 logits too big.
            longest = len(requests[order[start]][0]) + len(requests[order[start]][1])
            rows = max(1, min(batch_size, LOGITS_BUDGET_BYTES // (4 * longest * vocab_size)))
            batch, start = order[start : start + rows], start + rows
            inputs = [(requests[i][0] + requests[i][1])[:-1] for i in batch]
            width = max(map(len, inputs))
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for row, tokens in enumerate(inputs):
                ids[row, : len(tokens)] = torch.tensor(tokens)
                mask[row, : len(tokens)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # (batch, width, vocab)
            for row, i in enumerate(batch):
                continuation = requests[i][1]
                end = len(inputs[row])
                logprobs = torch.log_softmax(logits[row, end - len(continuation) : end].double(), dim=-1)
                target = torch.tensor(continuation, device=logprobs.device)
                results[i] = logprobs.gather(-1, target[:, None]).sum().item()
    return results


# --- bits per byte -----------------------------------------------------------------------------------


def rolling_windows(tokens: list[int], prefix_token: int, max_length: int) -> list[Request]:
    """Disjoint prediction windows covering every token once; the same pairs as lm-eval's
    make_disjoint_window(get_rolling_token_windows(tokens, prefix_token, max_length, context_len=1)).

    Each window predicts up to max_length tokens and the model reads exactly max_length tokens (fewer
    only for a document shorter than that): the first window is [prefix] + tokens[:L-1] predicting
    tokens[:L]; later ones predict tokens[start:end] after the one token before (the last window gets
    more context so its input still fills max_length).
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if not tokens:
        return []
    windows: list[Request] = [([prefix_token], tokens[:max_length])]
    start = len(windows[0][1])
    while start < len(tokens):
        end = min(start + max_length, len(tokens))
        windows.append((tokens[end - max_length - 1 : start], tokens[start:end]))
        start = end
    return windows


def resolve_max_length(model, tokenizer) -> int:
    """The model's context length, looked up as lm-eval's HFLM does."""
    for attribute in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(model.config, attribute, None)
        if value is not None:
            return int(value)
    stated = getattr(tokenizer, "model_max_length", None)
    if stated is not None and stated < UNSET_MODEL_MAX_LENGTH:
        return int(stated)
    return DEFAULT_MAX_LENGTH


def prefix_token_id(tokenizer) -> int:
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to condition the first token on")
    return token


def rolling_loglikelihoods(
    model, tokenizer, documents: Sequence[str], max_length: int | None = None, batch_size: int = 8
) -> list[float]:
    """Each document's summed log-likelihood (nats) over lm-eval's disjoint rolling windows; the windows of
    all documents are batched together.

    Documents are tokenized without special tokens (the prefix token is the only one added). lm-eval
    uses the tokenizer's default there, which for tokenizers that add a BOS themselves scores a second
    BOS; our figure equals lm-eval's with add_bos_token=False.
    """
    max_length = max_length or resolve_max_length(model, tokenizer)
    prefix = prefix_token_id(tokenizer)
    requests: list[Request] = []
    owners: list[int] = []
    for index, document in enumerate(documents):
        tokens = tokenizer(document, add_special_tokens=False, verbose=False)["input_ids"]  # scored in windows
        windows = rolling_windows(tokens, prefix, max_length)
        requests.extend(windows)
        owners.extend([index] * len(windows))
    per_document: list[list[float]] = [[] for _ in documents]
    for owner, logprob in zip(owners, _continuation_logprobs(model, requests, batch_size), strict=True):
        per_document[owner].append(logprob)
    return [math.fsum(values) for values in per_document]


def bits_per_byte(
    model, tokenizer, documents: Sequence[str], max_length: int | None = None, batch_size: int = 8
) -> dict[str, float | int]:
    """Rolling log-likelihood of the documents, reported per byte and per word as lm-eval's wikitext task."""
    if not documents:
        raise ValueError("bits_per_byte needs at least one document")
    max_length = max_length or resolve_max_length(model, tokenizer)
    loglikelihood = math.fsum(rolling_loglikelihoods(model, tokenizer, documents, max_length, batch_size))
    n_bytes = sum(len(document.encode("utf-8")) for document in documents)
    # lm-eval's wikitext word count, empty strings from leading/trailing whitespace included.
    n_words = sum(len(re.split(r"\s+", document)) for document in documents)
    n_tokens = sum(len(tokenizer(d, add_special_tokens=False, verbose=False)["input_ids"]) for d in documents)
    return {
        "bits_per_byte": -loglikelihood / n_bytes / math.log(2),
        "byte_perplexity": math.exp(-loglikelihood / n_bytes),
        "word_perplexity": math.exp(-loglikelihood / n_words),
        "loglikelihood": loglikelihood,
        "n_bytes": n_bytes,
        "n_words": n_words,
        "n_tokens": n_tokens,
        "n_documents": len(documents),
        "max_length": max_length,
    }


# --- generative tasks: exact match -----------------------------------------------------------------


def greedy_continuations(
    model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 16,
    stop_strings: Sequence[str] = (TERMINATOR,), streamer=None,
) -> list[str]:
    """Greedy continuation of each prompt (left-padded batches), stopped at a stop string or EOS. A row that
    stops early may carry text past its stop string (the batch generates on): callers cut at the first one.
    A transformers streamer (one prompt only) sees the tokens as they come."""
    streaming = {} if streamer is None else {"streamer": streamer}
    return _continuations(model, tokenizer, prompts, max_new_tokens, batch_size, stop_strings, do_sample=False,
                          **streaming)


def sampled_continuations(
    model, tokenizer, prompts: Sequence[str], max_new_tokens: int, temperature: float, seed: int,
    batch_size: int = 16, stop_strings: Sequence[str] = (TERMINATOR,),
) -> list[str]:
    """As greedy_continuations, but each token sampled from the softmax at `temperature` (no top-k or
    top-p cut); the same seed, prompts and batch size give the same samples."""
    if temperature <= 0:
        raise ValueError(f"sampling needs a temperature above 0, got {temperature}")
    torch.manual_seed(seed)  # transformers' sampling draws from the global generator
    return _continuations(model, tokenizer, prompts, max_new_tokens, batch_size, stop_strings,
                          do_sample=True, temperature=temperature, top_k=0, top_p=1.0)


def _continuations(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int,
                   stop_strings: Sequence[str], **decoding) -> list[str]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else prefix_token_id(tokenizer)
    outputs: list[str] = []
    with _evaluating(model) as device:
        for start in range(0, len(prompts), batch_size):
            encoded = [tokenizer(p)["input_ids"] for p in prompts[start : start + batch_size]]
            width = max(map(len, encoded))
            ids = torch.full((len(encoded), width), pad, dtype=torch.long)
            mask = torch.zeros(len(encoded), width, dtype=torch.long)
            for row, tokens in enumerate(encoded):
                ids[row, width - len(tokens) :] = torch.tensor(tokens)
                mask[row, width - len(tokens) :] = 1
            generated = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                pad_token_id=pad,
                stop_strings=list(stop_strings) or None,
                tokenizer=tokenizer,
                **decoding,
            )
            outputs += tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
    return outputs


# --- multiple choice ---------------------------------------------------------------------------------


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value, the first on ties (lm-eval's np.argmax)."""
    return max(range(len(values)), key=values.__getitem__)


def _choice_request(tokenizer, context: str, continuation: str) -> Request:
    """lm-eval's _encode_pair: encode the whole and split at the context's length, so the boundary
    tokenizes as it would in running text."""
    whole = tokenizer(context + continuation)["input_ids"]
    context_tokens = tokenizer(context)["input_ids"]
    return context_tokens, whole[len(context_tokens) :]


def choice_loglikelihoods(model, tokenizer, examples: Sequence[Example], batch_size: int = 32) -> list[list[float]]:
    """log P(" " + choice | prompt) for every choice of every example."""
    for example in examples:
        if not example.choices or not 0 <= example.label < len(example.choices):
            raise ValueError(f"not a multiple-choice example (choices and label): {example}")
    requests = [
        _choice_request(tokenizer, e.prompt, ANSWER_DELIMITER + choice) for e in examples for choice in e.choices
    ]
    scores = iter(_continuation_logprobs(model, requests, batch_size))
    return [[next(scores) for _ in example.choices] for example in examples]


# --- speed ------------------------------------------------------------------------------------------------


def timed_tokens(run) -> dict:
    """Tokens per second of run() (which returns the tokens it processed), after one untimed call that warms
    the kernels and caches up."""
    run()
    started = time.perf_counter()
    tokens = run()
    seconds = time.perf_counter() - started
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_second": round(tokens / seconds, 1)}


@torch.no_grad()
def generation_speed(model, tokenizer, prompts: Sequence[str], new_tokens: int) -> dict:
    """New tokens per second of greedy generation: one left-padded batch, exactly new_tokens each, no stop."""
    encoded = tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left")

    def run() -> int:
        out = model.generate(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"], do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, tokenizer=tokenizer,
                             pad_token_id=tokenizer.pad_token_id)
        return (out.shape[1] - encoded["input_ids"].shape[1]) * len(prompts)

    return timed_tokens(run)


@torch.no_grad()
def scoring_speed(model, tokenizer, texts: Sequence[str]) -> dict:
    """Teacher-forced tokens per second: the likelihood of texts, one batch."""
    encoded = tokenizer(list(texts), return_tensors="pt", padding=True)

    def run() -> int:
        model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"])
        return int(encoded["attention_mask"].sum())

    return timed_tokens(run)
