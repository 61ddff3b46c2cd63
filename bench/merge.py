"""Merge throughput beside mergekit's on the same checkpoints, and CMA-ES search time per generation.

    .venv/bin/python -m bench.merge [--preset tiny] [--repeats 3]

Checkpoints: a base of the chosen preset and two fine-tunes (base + a shared and an own random
direction), saved as safetensors. For each method we time our merge of the state dicts (best of
`repeats`, tensors already in memory) and mergekit's run_merge in its own venv (reading and writing
safetensors included, as its CLI does); both are printed as parameters merged per second, so the figures
say how the two compare, not that the work is identical (mergekit's includes the I/O). Then one CMA-ES
generation of the parameter-space search with a cheap real fitness (logit MSE to a target merge), with 1
and 2 worker threads, to show what threaded fitness evaluation buys on this machine.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
import typer

from bench.merge_reference import MergekitUnavailable, run_mergekit
from services.evomerge.merge_methods import get_method, merge_state_dicts
from services.evomerge.recipe import ParameterSpaceRecipe, weights_of
from services.evomerge.search import Evaluator, SearchLog, StageBudget, cma_stage, decode, encode
from shared.models import build_model, get_preset
from shared.phase import ForgedModel

cli = typer.Typer(add_completion=False)

METHODS = {  # ours, mergekit's config for the same merge
    "linear": ({"weight": [0.5, 0.5]}, {"merge_method": "linear"}, {"weight": 0.5}),
    "ties": ({"weight": [0.5, 0.5], "density": 0.5}, {"merge_method": "ties", "base": True}, {"weight": 0.5, "density": 0.5}),
    "dare_ties": ({"weight": [0.5, 0.5], "density": 0.5, "rescale": "l1"}, {"merge_method": "dare_ties", "base": True},
                  {"weight": 0.5, "density": 0.5}),
    "della": ({"weight": [0.5, 0.5], "density": 0.5, "rescale": "l1"}, {"merge_method": "della", "base": True},
              {"weight": 0.5, "density": 0.5}),
    "model_stock": ({}, {"merge_method": "model_stock", "base": True}, {}),
}


def family(preset: str) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
    shape = get_preset(preset)
    base = build_model(shape, shape.vocab_size, seed=0)
    generator = torch.Generator().manual_seed(1)
    shared = {n: 0.01 * torch.randn(p.shape, generator=generator) for n, p in base.state_dict().items()}
    finetunes = []
    for seed in (2, 3):
        model = build_model(shape, shape.vocab_size, seed=seed)
        model.load_state_dict({n: p + shared[n] + 0.01 * torch.randn(p.shape, generator=generator)
                               for n, p in base.state_dict().items()})
        finetunes.append(model)
    return base, finetunes


def time_ours(method: str, params: dict, base, finetunes, repeats: int) -> float:
    states, base_state = [weights_of(m) for m in finetunes], weights_of(base)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        merge_state_dicts(get_method(method), states, base_state if get_method(method).needs_base else None,
                          lambda name: params)
        best = min(best, time.perf_counter() - start)
    return best


@cli.command()
def main(preset: str = "tiny", repeats: int = 3, generations: int = 2, population: int = 8) -> None:
    torch.set_num_threads(2)
    base, finetunes = family(preset)
    n_params = sum(p.numel() for p in weights_of(base).values())
    typer.echo(f"preset {preset}: {n_params / 1e6:.2f}M parameters per model, torch threads {torch.get_num_threads()}")
    ours = {name: time_ours(name, params, base, finetunes, repeats) for name, (params, _, _) in METHODS.items()}
    theirs: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        for name, model in (("base", base), ("ft0", finetunes[0]), ("ft1", finetunes[1])):
            model.save_pretrained(root / name, safe_serialization=True)
        jobs = []
        for name, (_, config, params) in METHODS.items():
            config = {"merge_method": config["merge_method"], "dtype": "float32",
                      "models": [{"model": str(root / m), "parameters": params} for m in ("ft0", "ft1")]}
            if METHODS[name][1].get("base"):
                config["base_model"] = str(root / "base")
            jobs.append({"config": config, "out": str(root / f"out-{name}"), "seed": 0})
        try:
            timings = run_mergekit(jobs)
            theirs = {name: timings[str(root / f"out-{name}")] for name in METHODS}
        except MergekitUnavailable as error:
            typer.echo(f"mergekit unavailable: {error}")
    typer.echo(f"{'method':<12} {'ours s':>8} {'ours Mparam/s':>14} {'mergekit s':>11} {'mergekit Mparam/s':>18}")
    for name in METHODS:
        row = f"{name:<12} {ours[name]:8.3f} {n_params / ours[name] / 1e6:14.1f}"
        if name in theirs:
            row += f" {theirs[name]:11.3f} {n_params / theirs[name] / 1e6:18.1f}"
        typer.echo(row)

    tokens = torch.randint(0, get_preset(preset).vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    parents = [ForgedModel(base, None, "base"), ForgedModel(finetunes[0], None, "ft0"), ForgedModel(finetunes[1], None, "ft1")]
    start_recipe = ParameterSpaceRecipe(method="ties", models=("ft0", "ft1"), base="base",
                                        groups=tuple({"weight": [0.5, 0.5], "density": [0.5, 0.5]} for _ in range(2)))
    with torch.no_grad():
        target = base(tokens).logits  # fitness: how close a merge's logits come to the base's (cheap, real)

    def score(forged):
        with torch.no_grad():
            return -(forged.model(tokens).logits - target).pow(2).mean().item(), {}

    for workers in (1, 2):
        log = SearchLog()
        cma_stage("parameter_space", encode(start_recipe), lambda x: decode(start_recipe, x), Evaluator(parents, score, workers),
                  log, StageBudget(generations, population, generations, 0.0), seed=0)
        per_generation = [g["seconds"] for g in log.generations]
        typer.echo(f"search, {workers} worker(s): population {population}, seconds per generation "
                   f"{', '.join(f'{s:.2f}' for s in per_generation)} (merge + build + score of each candidate)")


if __name__ == "__main__":
    cli()
