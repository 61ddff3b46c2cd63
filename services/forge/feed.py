"""What Forge training feeds each step: the skill mix, its reasoning rows at the curriculum's level, and
replayed rows (shared.training.Feed)."""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence

import torch

from services.forge.curriculum import EdgeOfChaosController
from services.forge.dream import ReplayBuffer
from shared.training import MixFeed, Row

logger = logging.getLogger(__name__)
CURRICULUM_SOURCE = "reasoning"


class ForgeFeed:
    def __init__(self, sources: Mapping[str, Sequence[Row]], mix: Mapping[str, float], *, lm, tokenizer,
                 level_pools: Mapping[int, Sequence[Row]] | None = None,
                 controller: EdgeOfChaosController | None = None, replay: ReplayBuffer | None = None):
        if (level_pools is None) != (controller is None):
            raise ValueError("the curriculum needs both its level pools and its controller")
        self.sources = dict(sources)
        if controller is not None:
            if CURRICULUM_SOURCE not in self.sources:
                raise ValueError(f"the curriculum drives the {CURRICULUM_SOURCE!r} source, which the mix lacks")
            self.sources[CURRICULUM_SOURCE] = level_pools[controller.level]
        self.mix = MixFeed(self.sources, mix)  # reads self.sources at every draw: a level change takes effect at once
        self.lm, self.tokenizer = lm, tokenizer
        self.level_pools, self.controller, self.replay = level_pools, controller, replay
        self.levels: list[int] = []  # the curriculum level of each step's batch
        self.fed = Counter()  # rows fed by kind: "real", "replayed_real", "dream"
        self._replayed: set[int] = set()

    def draw(self, step: int, batch_size: int, generator: torch.Generator) -> list[Row]:
        rows = self.mix.draw(step, batch_size, generator)
        self._replayed = set()
        if self.replay is not None:
            for i in range(len(rows)):
                if float(torch.rand((), generator=generator)) >= self.replay.config.share:
                    continue
                replayed = self.replay.replay(generator)
                if replayed is not None:
                    rows[i], dream = replayed
                    self._replayed.add(i)
                    self.fed["dream" if dream else "replayed_real"] += 1
        self.fed["real"] += len(rows) - len(self._replayed)
        if self.controller is not None:
            self.levels.append(self.controller.level)
        return rows

    def after_step(self, step: int, model, rows: list[Row]) -> None:
        if self.replay is not None:
            self.replay.add_real([row for i, row in enumerate(rows) if i not in self._replayed])
            if (step + 1) % self.replay.config.every == 0:
                self.replay.dream(self.lm, self.tokenizer.pad_token_id, self.tokenizer.eos_token_id, step)
        if self.controller is not None and self.controller.due(step):
            measured = self.controller.measure(step, self.lm, self.tokenizer)
            self.sources[CURRICULUM_SOURCE] = self.level_pools[self.controller.level]
            logger.info(f"curriculum at step {measured.step}: level {measured.level} success "
                          f"{measured.success:.2f} -> level {measured.next_level}")

    def as_report(self) -> dict:
        report = {"rows_fed": dict(self.fed)}
        if self.controller is not None:
            report["curriculum"] = {**self.controller.as_report(), "level_per_step": self.levels}
        if self.replay is not None:
            report["replay"] = {"real_rows_seen": self.replay.real_seen, "dreams_kept": len(self.replay.dreams),
                                "share": self.replay.config.share, "dream_fraction": self.replay.config.dream_fraction}
        return report
