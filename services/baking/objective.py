"""The prompt-baking objective: KL(teacher with the prompt || student without it), over generated tokens.

For each teacher-view row (trajectories.teacher_rows) the frozen teacher reads prompt + input + trajectory
and the student reads input + trajectory; at every trajectory token the model wrote, the teacher's
next-token distribution p and the student's q give the forward KL sum_v p_v (log p_v - log q_v) over the
whole vocabulary (Bhargava et al. 2024, eq. 2). The paper sums over tokens; the loop here takes the mean per
token (the sum divided by the count), a constant rescaling of the learning rate at a fixed trajectory length.
Rows whose prompt is empty (the anchor, phase.py) pull the student towards the input itself.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from services.baking.trajectories import TeacherRow
from shared.training import MixFeed, collate


class PromptKL:
    """The objective as the shared loop's feed and step loss, and as its held-out loss (`mean`).

    The loop collates the rows a feed draws, and a collated batch no longer says where each row's prompt
    ends; so the objective is the feed too (a MixFeed over its sources), keeps the rows it handed out, and
    reads their prompt lengths (trajectories.TeacherRow) when the loop asks for the step's loss.
    """

    def __init__(self, teacher: torch.nn.Module, sources: Mapping[str, Sequence[TeacherRow]], mix: Mapping[str, float],
                 pad_id: int, batch_size: int = 32):
        self.teacher = teacher.eval().requires_grad_(False)
        self.batches = MixFeed(sources, mix)
        self.pad_id = pad_id
        self.batch_size = batch_size
        self.drawn: list[TeacherRow] = []

    def draw(self, step: int, batch_size: int, generator: torch.Generator) -> list[TeacherRow]:
        self.drawn = self.batches.draw(step, batch_size, generator)
        return self.drawn

    def after_step(self, step: int, model: torch.nn.Module, rows: list[TeacherRow]) -> None:
        return None

    def kl_per_token(self, student, rows: Sequence[TeacherRow], input_ids, attention_mask, predicted) -> torch.Tensor:
        """KL(teacher || student) at each generated token of rows, collated as (input_ids, attention_mask, predicted)."""
        lengths = attention_mask.sum(1).tolist()
        prompt_lengths = [row.prompt_length for row in rows]
        width = max(n - p for n, p in zip(lengths, prompt_lengths, strict=True))
        student_ids = torch.full((len(lengths), width), self.pad_id, dtype=torch.long)
        student_mask = torch.zeros_like(student_ids)
        for i, (n, p) in enumerate(zip(lengths, prompt_lengths, strict=True)):
            student_ids[i, : n - p] = input_ids[i, p:n]
            student_mask[i, : n - p] = 1
        # Position t predicts token t + 1; a counted target is a generated token (never the prompt's).
        positions, columns = (predicted[:, 1:].bool() & attention_mask[:, 1:].bool()).nonzero(as_tuple=True)
        with torch.no_grad():
            teacher = self.teacher(input_ids=input_ids, attention_mask=attention_mask).logits[positions, columns]
        student_logits = student(input_ids=student_ids, attention_mask=student_mask).logits
        shift = torch.tensor(prompt_lengths)[positions]
        log_q = F.log_softmax(student_logits[positions, columns - shift].float(), dim=-1)
        log_p = F.log_softmax(teacher.float(), dim=-1)
        return (log_p.exp() * (log_p - log_q)).sum(-1)

    def __call__(self, student, input_ids, attention_mask, predicted) -> tuple[torch.Tensor, int, dict[str, float]]:
        kl = self.kl_per_token(student, self.drawn, input_ids, attention_mask, predicted)
        return kl.sum(), kl.numel(), {}

    @torch.no_grad()
    def mean(self, student, rows: Sequence[TeacherRow]) -> float:
        """Mean KL per generated token over rows (held out), in nats."""
        was_training = student.training
        student.eval()
        total, count = 0.0, 0
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start : start + self.batch_size]
            kl = self.kl_per_token(student, batch, *collate(batch, self.pad_id))
            total, count = total + float(kl.sum()), count + kl.numel()
        student.train(was_training)
        if count == 0:
            raise ValueError("no generated token to measure the KL on")
        return total / count
