"""Expert vectors, one per task family, trained on the family's training split.

A family is either tasks of the generated suites (its success is the scorecard's task success on them) or
English text (its measure is bits per byte). An expert is the SVF vectors z of every adapted matrix
(svf.py), everything else frozen.

The objective. The reference trains z with REINFORCE on task success (+1/-1). At this scale we train on
the likelihood of the family's training text (the worked answers and plays the skill sources hold; the
calculator's results read-only), and the phase measures why (`gradient_agreement`): at the input, two
independent batches of the family give two gradient estimates of each objective, and their cosine says how
much of an estimate is signal. A batch of a 1M model's sampled answers is mostly wrong alike (rewards all
-1 carry no direction but "less of this"), and the report holds both cosines for every family.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.adas.svf import Factors, Vectors, initial_vectors, svf_student, trained_vectors
from shared.calculator import result_spans
from shared.data.skills import text_documents
from shared.data.tasks import format_for_training, make_examples, worked_continuation
from shared.tool_runtime import sampled_with_tools
from shared.training import Row, TrainingConfig, collate, continuation_rows, encode_texts, row_nll, train_causal_lm

Task = tuple[str, int]  # (suite, level)


class Family(BaseModel):
    """A task family an expert specialises in: generated tasks, or (text=True) English text."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    tasks: tuple[Task, ...] = ()
    text: bool = False

    @model_validator(mode="after")
    def _one_kind(self) -> Family:
        if bool(self.tasks) == self.text:
            raise ValueError(f"family {self.name!r}: give either tasks or text=True")
        return self


# The families (arithmetic, sequences, word problems, tool use, text) at the scorecard's levels.
# modular.1 is on the scorecard and no expert trains on it: the held-out family of the composition check.
DEFAULT_FAMILIES = (
    Family(name="arithmetic", tasks=(("arithmetic", 1),)),
    Family(name="sequence", tasks=(("sequence", 1),)),
    Family(name="word_problems", tasks=(("word_problems", 1),)),
    Family(name="tool_use", tasks=(("tool_calls", 2),)),
    Family(name="text", text=True),
)


class ExpertTraining(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # The reference: lr 2e-3, 2000 iterations of batch 256 for an 8B model; here steps of 32 rows.
    training: TrainingConfig = TrainingConfig(steps=200, batch_size=32, learning_rate=2e-2, warmup_steps=10,
                                              eval_every=50, weight_decay=0.0)
    examples: int = Field(2_000, ge=1)  # training problems per family of tasks
    text_chars: int = Field(200_000, ge=1_000)  # training text of the text family
    validation_examples: int = Field(128, ge=1)  # held-out rows for the curve and the kept step
    max_mult: float = Field(1.0, gt=0)


def family_rows(tokenizer, family: Family, split: str, n: int, text_chars: int, seq_len: int, seed: int) -> list[Row]:
    """Training text of a family as rows: worked examples of its tasks, or the split's plays."""
    if family.text:
        return encode_texts(tokenizer, text_documents(split, text_chars), seq_len)
    texts = [format_for_training(e) for suite, level in family.tasks
             for e in make_examples(suite, level, split, n, seed, allow_fewer=True)]
    return encode_texts(tokenizer, texts, seq_len, read_only=result_spans)


def train_expert(model, tokenizer, factors: Mapping[str, Factors], family: Family, config: ExpertTraining, seq_len: int,
                 seed: int, progress=lambda f, m: None) -> tuple[Vectors, dict]:
    """The family's expert vectors and the training curve (held-out loss on validation rows, best step kept)."""
    student = svf_student(model, factors, initial_vectors(factors, seed), config.max_mult)
    train = family_rows(tokenizer, family, "train", config.examples, config.text_chars, seq_len, seed)
    validation = family_rows(tokenizer, family, "validation", config.validation_examples, config.text_chars // 10,
                             seq_len, seed)
    curve = train_causal_lm(student, {family.name: train}, {family.name: 1.0},
                            config.training.model_copy(update={"seed": seed}), pad_id=tokenizer.pad_token_id,
                            eval_sets={"validation": validation}, progress=progress, keep_best="validation")
    return trained_vectors(student), curve.as_report()


def _gradient(student, loss: torch.Tensor) -> torch.Tensor:
    student.zero_grad(set_to_none=True)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in student.parameters() if p.requires_grad])


def gradient_agreement(model, tokenizer, factors: Mapping[str, Factors], family: Family, batch_size: int,
                       max_new_tokens: int, max_calls: int, seed: int, max_mult: float) -> dict:
    """Cosine between the z-gradients of two independent training batches, for REINFORCE on task success
    (answers sampled at temperature 1 with the calculator, reward +1 right / -1 wrong, the reference's) and
    for the likelihood of the worked answers; with the batches' mean reward."""
    if family.text:
        return {"applies": False, "why": "text has no task success to reward"}
    student = svf_student(model, factors, initial_vectors(factors, seed), max_mult)
    suite, level = family.tasks[0]
    examples = make_examples(suite, level, "train", 2 * batch_size, seed)
    halves = (examples[:batch_size], examples[batch_size:])
    reinforce, likelihood, rewards = [], [], []
    for i, batch in enumerate(halves):
        prompts = [e.prompt for e in batch]
        with torch.no_grad():
            transcripts = sampled_with_tools(student, tokenizer, prompts, max_new_tokens, 1.0, seed + 10 * i, max_calls)
        reward = torch.tensor([1.0 if t.final_answer == e.answer else -1.0 for t, e in zip(transcripts, batch, strict=True)])
        rewards.append(float(reward.mean()))
        nll, _ = row_nll(student, *collate(continuation_rows(tokenizer, prompts, [t.text for t in transcripts]),
                                           tokenizer.pad_token_id))
        reinforce.append(_gradient(student, (reward * nll).mean()))  # -E[r log p]: nll is -log p
        worked = [worked_continuation(e) for e in batch]
        nll, _ = row_nll(student, *collate(continuation_rows(tokenizer, prompts, worked), tokenizer.pad_token_id))
        likelihood.append(_gradient(student, nll.mean()))
    cosine = lambda a, b: float(torch.nn.functional.cosine_similarity(a, b, dim=0))  # noqa: E731
    return {"applies": True, "batch_size": batch_size, "mean_reward": rewards,
            "reinforce_cosine": cosine(*reinforce), "likelihood_cosine": cosine(*likelihood)}

