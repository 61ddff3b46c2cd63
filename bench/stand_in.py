"""The stand-in for the pipeline's ternary model that phase benchmarks after BitNet start from.

A `tiny` float model trained STAND_IN_STEPS steps on the skills mix (services.bitnet.__main__.train_float_model,
as bench.quietstar's stand-in), then BitNet on its defaults: the same recipe and seed give the same model,
so a benchmark's numbers repeat without running Cognate and EvoMerge first. `--checkpoint` in a benchmark
takes a real pipeline output (or a saved stand-in) instead.
"""
from __future__ import annotations

from pathlib import Path

import typer

from services.bitnet.__main__ import train_float_model
from services.bitnet.phase import BitNetConfig, BitNetPhase
from shared.checkpoint import load_checkpoint
from shared.models import get_preset
from shared.phase import ForgedModel, print_every_percent

STAND_IN_STEPS = 600


def ternary_input(checkpoint: Path | None, seed: int) -> tuple[ForgedModel, str]:
    """The model a benchmark starts from and a sentence saying what it is."""
    if checkpoint is not None:
        forged, manifest = load_checkpoint(checkpoint)
        return forged, f"checkpoint {manifest.name} ({manifest.phase}, digest {manifest.digest[:12]})"
    config = BitNetConfig(seed=seed)
    float_model = train_float_model(get_preset("tiny"), config, STAND_IN_STEPS, "stand-in")
    typer.echo("BitNet on its defaults:")
    forged = BitNetPhase().transform([float_model], config, print_every_percent(typer.echo)).models[0]
    return forged, f"a tiny float model trained {STAND_IN_STEPS} steps on the skills mix (seed {seed}), then BitNet on its defaults"
