"""Test-only phases for the fabric: tiny, fast, deterministic, and each a real transform of a real model.

Service processes load them as "tests.fabric_phases:Class" (they are not registered entry points).
    SeedModel   creates a tiny Llama (hidden 32, 2 layers) from a seed, with a byte-level BPE tokenizer
    ScaleWeights multiplies every weight by a factor
    AddNoise    adds seeded Gaussian noise to every weight
    FineTune    takes a few AdamW steps on a fixed seeded token batch; reports the measured losses
    Endless     reports progress every 10 ms for a minute and never returns a model: a phase to abandon
Each reports numbers measured on the model it returns. FineTune takes `hold_s`: it keeps the handler
busy that long before training, to outlast a shrunk max.poll.interval.ms; `hold_first_s`, the same on
its first call only (a call that will be abandoned, then redone without the wait); and `invocation_log`:
a file it appends one line to per call, so a test can count how often the transform really ran.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from shared.phase import ForgedModel, Phase, PhaseConfig, PhaseResult, ProgressFn, no_progress
from shared.tokenizer import train_tokenizer

# These phases are loaded as "module:Class", which the fabric refuses unless told otherwise; service
# processes started by tests and benchmarks inherit the setting.
os.environ["AGENTFORGE_ALLOW_MODULE_PHASES"] = "true"

CORPUS = [f"the forge turns {n} models into one smaller model, step {n * 7 % 13}" for n in range(200)]


def tiny_llama(seed: int, vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def weight_norm(model) -> float:
    with torch.no_grad():
        return float(torch.sqrt(sum((p.double() ** 2).sum() for p in model.parameters())))


class SeedConfig(PhaseConfig):
    count: int = 1  # how many models, each from seed + index


class SeedModel(Phase):
    name = "fabric_seed"
    Config = SeedConfig

    def transform(self, models, config, progress: ProgressFn = no_progress) -> PhaseResult:
        if models:
            raise ValueError("fabric_seed creates models; it takes no input")
        tokenizer = train_tokenizer(CORPUS, vocab_size=512, model_max_length=64)
        created = []
        for index in range(config.count):
            model = tiny_llama(config.seed + index, len(tokenizer))
            created.append(ForgedModel(model, tokenizer, name=f"seed-{index}"))
            progress((index + 1) / config.count, f"created model {index + 1}/{config.count}")
        return PhaseResult(created, report={"models": len(created), "weight_norm": weight_norm(created[0].model)})


class ScaleConfig(PhaseConfig):
    factor: float = 0.5


class ScaleWeights(Phase):
    name = "fabric_scale"
    Config = ScaleConfig

    def transform(self, models, config, progress: ProgressFn = no_progress) -> PhaseResult:
        before = weight_norm(models[0].model)
        for forged in models:
            with torch.no_grad():
                for parameter in forged.model.parameters():
                    parameter.mul_(config.factor)
        return PhaseResult(models, report={"norm_before": before, "norm_after": weight_norm(models[0].model)})


class NoiseConfig(PhaseConfig):
    std: float = 0.01


class AddNoise(Phase):
    name = "fabric_noise"
    Config = NoiseConfig

    def transform(self, models, config, progress: ProgressFn = no_progress) -> PhaseResult:
        generator = torch.Generator().manual_seed(config.seed)
        moved = 0.0
        for forged in models:
            with torch.no_grad():
                for parameter in forged.model.parameters():
                    noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * config.std
                    parameter.add_(noise)
                    moved += float((noise.double() ** 2).sum())
        return PhaseResult(models, report={"noise_norm": moved**0.5})


class FineTuneConfig(PhaseConfig):
    steps: int = 3
    lr: float = 1e-2
    hold_s: float = 0.0
    hold_first_s: float = 0.0
    invocation_log: str = ""


class FineTune(Phase):
    name = "fabric_finetune"
    Config = FineTuneConfig

    def transform(self, models, config, progress: ProgressFn = no_progress) -> PhaseResult:
        hold_s = config.hold_s
        if config.invocation_log:
            with open(config.invocation_log, "a+") as log:
                log.seek(0)
                if not log.read():
                    hold_s += config.hold_first_s
                log.write(f"{time.time()}\n")
        deadline = time.monotonic() + hold_s
        while time.monotonic() < deadline:
            progress(0.0, "holding")
            time.sleep(min(0.5, max(deadline - time.monotonic(), 0)))
        torch.manual_seed(config.seed)
        forged = models[0]
        batch = torch.randint(0, forged.model.config.vocab_size, (4, 16))
        forged.model.train()
        optimizer = torch.optim.AdamW(forged.model.parameters(), lr=config.lr)
        losses = []
        for step in range(config.steps):
            loss = forged.model(input_ids=batch, labels=batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            progress((step + 1) / config.steps, f"step {step + 1}: loss {losses[-1]:.4f}")
        forged.model.eval()
        with torch.no_grad():
            final = float(forged.model(input_ids=batch, labels=batch).loss)
        return PhaseResult(models, report={"loss_first": losses[0], "loss_final": final, "steps": config.steps})


class Endless(Phase):
    """Sets `started` on entry and `exited` however it leaves, so a test can see the thread stop."""

    name = "fabric_endless"
    Config = PhaseConfig
    started, exited = threading.Event(), threading.Event()

    def transform(self, models, config, progress: ProgressFn = no_progress) -> PhaseResult:
        Endless.started.set()
        try:
            for tick in range(6000):
                progress(tick / 6000, "busy")
                time.sleep(0.01)
            raise AssertionError("fabric_endless ran to its end: nobody abandoned it")
        finally:
            Endless.exited.set()


def spec_for(*phases: type[Phase]) -> list[str]:
    return [f"{__name__}:{phase.__name__}" for phase in phases]


def seed_checkpoint(directory: Path, seed: int = 0) -> Path:
    """A real checkpoint folder of a SeedModel model, for tests of the transport."""
    from shared.checkpoint import save_checkpoint

    phase = SeedModel()
    config = SeedConfig(seed=seed)
    forged = phase.transform([], config).models[0]
    save_checkpoint(forged, directory, phase=phase.name, code_version=phase.version,
                    config=config.model_dump(mode="json"), config_hash=config.config_hash(), parents=[])
    return directory


def altered(message, **fields):
    """A copy of a protobuf message with some fields changed (e.g. a CheckpointRef with a wrong SHA-256)."""
    copy = type(message)()
    copy.CopyFrom(message)
    for name, value in fields.items():
        setattr(copy, name, value)
    return copy


def scale_event(run_id: str, ref, factor: float):
    """A ModelReady for a one-step ScaleWeights pipeline on checkpoint `ref`."""
    from shared.contracts.agentforge.v1 import events_pb2
    from shared.fabric.events import new_envelope, pipeline_spec

    spec = pipeline_spec([(spec_for(ScaleWeights)[0], {"factor": factor})])
    return new_envelope(run_id, "test", model_ready=events_pb2.ModelReady(spec=spec, step=0, inputs=[ref]))
