"""Grokfast's own result at tiny scale: steps to a target validation accuracy on modular addition with the
Grokfast EMA filter (shared.grokfast) against a baseline whose learning rate is tuned, over several seeds.

    .venv/bin/python -m bench.grokfast            # the default configuration, about 6 minutes on 2 busy cores
    .venv/bin/python -m bench.grokfast --quick    # a smoke configuration, seconds; writes no file unless --out

The task is (a + b) mod p on all p * p ordered pairs, split by problem (each pair in exactly one split, drawn
once with a fixed data seed) into train / validation / test. Every run trains full-batch with AdamW on the
train split and evaluates validation accuracy every --eval-every steps; its steps-to-target is the first
evaluated step at or above --target. A run that does not get there within --max-steps is censored: it is kept
and reported at the cap with `censored: true`, so a ratio involving it is a bound, not a value.

The filter raises the effective step (a constant gradient g becomes (1 + lambda) g), so the comparison is
against an LR-matched baseline: plain AdamW on a grid of multiples of Grokfast's learning rate, the multiple
chosen on validation steps-to-target with the tuning seed, which is none of the report seeds. On each report
seed we then train Grokfast (at its learning rate), the tuned baseline and, for reference, the baseline at
Grokfast's own learning rate; the ratio baseline steps / Grokfast steps per seed, its mean, standard
deviation, minimum, maximum and geometric mean, and each run's test accuracy (the test split is used for
nothing else) go to bench/results/grokfast.json and a table. A seed sets the model's initialisation; the
split and the full batch are the same for every seed.

Deviations from the paper (Lee et al. 2024, reference code ironjr/grokfast main.py): its task is modular
multiplication with p = 97 and a [a, op, b, =] sequence on a width-128 decoder trained with Adam (L2 weight
decay: none for the baseline, 0.005 with the filter), minibatches of 512 and no learning-rate matching, and
it reports Grokfast reaching 95% validation accuracy about 44 times sooner. Here: modular addition, p = 23,
[a, b, =], a width-64 two-layer pre-norm decoder (4 heads), full batch, and the same AdamW recipe with
decoupled weight decay (1.0, betas 0.9 / 0.98, the grokking setting of Power et al.) in both arms, so that
the filter is the only difference besides the tuned learning rate; Grokfast's learning rate is 3e-3, not the
reference's 1e-3, at which a run takes about three times the steps and the benchmark would not fit in minutes.
The 10-step linear warm-up is the reference's; Grokfast's alpha and lambda are its modular-arithmetic ones,
0.98 and 2.0.
"""
from __future__ import annotations

import json
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
import typer
from torch import nn

import shared  # noqa: F401  first: it sets the OpenMP wait policy before torch loads
from shared.grokfast import GrokfastConfig, GrokfastEMA

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "grokfast.json"
WARMUP_STEPS = 10
CURVE_EVERY = 100  # steps between the validation accuracies a run's record keeps (of those evaluated)
cli = typer.Typer(add_completion=False)


@dataclass(frozen=True)
class Setup:
    """Everything a run depends on besides its learning rate, its seed and whether the filter is on."""

    modulus: int = 23
    train_fraction: float = 0.5
    data_seed: int = 0
    dim: int = 64
    layers: int = 2
    heads: int = 4
    weight_decay: float = 1.0
    betas: tuple[float, float] = (0.9, 0.98)
    grokfast_lr: float = 3e-3
    alpha: float = 0.98
    lamb: float = 2.0
    target: float = 0.95
    eval_every: int = 10
    max_steps: int = 5000


QUICK = Setup(modulus=11, dim=32, max_steps=300)


def make_splits(modulus: int, train_fraction: float, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Train / validation / test (inputs [a, b, =], labels (a + b) mod p) over all ordered pairs, disjoint by
    problem: a fixed permutation of the pairs, train_fraction of them for training and the rest halved."""
    pairs = torch.cartesian_prod(torch.arange(modulus), torch.arange(modulus))
    pairs = pairs[torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))]
    n_train = round(len(pairs) * train_fraction)
    n_validation = (len(pairs) - n_train) // 2
    chunks = {"train": pairs[:n_train], "validation": pairs[n_train:n_train + n_validation],
              "test": pairs[n_train + n_validation:]}
    equals = torch.full((1,), modulus)
    return {name: (torch.cat([chunk, equals.expand(len(chunk), 1)], dim=1), chunk.sum(dim=1) % modulus)
            for name, chunk in chunks.items()}


class Block(nn.Module):
    """A pre-norm causal transformer block."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm_attention, self.norm_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(self.norm_attention(x)).view(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(attended.transpose(1, 2).reshape(batch, length, dim))
        return x + self.mlp(self.norm_mlp(x))


class TinyDecoder(nn.Module):
    """A decoder-only transformer over the p numbers and "=", predicting the answer at the last position."""

    def __init__(self, modulus: int, dim: int, layers: int, heads: int):
        super().__init__()
        self.tokens = nn.Embedding(modulus + 1, dim)
        self.positions = nn.Embedding(3, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, modulus, bias=False)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        h = self.tokens(inputs) + self.positions(torch.arange(inputs.shape[1]))
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h[:, -1]))


@torch.no_grad()
def accuracy(model: nn.Module, split: tuple[torch.Tensor, torch.Tensor]) -> float:
    inputs, labels = split
    return (model(inputs).argmax(dim=-1) == labels).float().mean().item()


def steps_to_accuracy(curve: list[tuple[int, float]], target: float) -> int | None:
    """The first evaluated step whose accuracy is at least target (None if none is)."""
    return next((step for step, value in curve if value >= target), None)


def train_run(splits: dict, setup: Setup, lr: float, grokfast: bool, seed: int) -> dict:
    """One full-batch AdamW run, stopped at the first evaluation reaching the target or at max_steps."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    model = TinyDecoder(setup.modulus, setup.dim, setup.layers, setup.heads)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=setup.weight_decay, betas=setup.betas)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / WARMUP_STEPS))
    ema = GrokfastEMA(GrokfastConfig(enabled=True, alpha=setup.alpha, lamb=setup.lamb)) if grokfast else None
    inputs, labels = splits["train"]
    curve: list[tuple[int, float]] = []
    for step in range(1, setup.max_steps + 1):
        loss = F.cross_entropy(model(inputs), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if ema is not None:
            ema.filter(model.parameters())
        optimizer.step()
        warmup.step()
        if step % setup.eval_every == 0 or step == setup.max_steps:
            curve.append((step, accuracy(model, splits["validation"])))
            if curve[-1][1] >= setup.target:
                break
    reached = steps_to_accuracy(curve, setup.target)
    return {"lr": lr, "grokfast": grokfast, "seed": seed, "steps": reached or setup.max_steps,
            "censored": reached is None, "final_step": curve[-1][0], "final_train_loss": round(loss.item(), 5),
            "validation_accuracy": round(curve[-1][1], 4), "test_accuracy": round(accuracy(model, splits["test"]), 4),
            f"validation_accuracy_every_{CURVE_EVERY}_steps": [round(value, 4) for step, value in curve
                                                                 if step % CURVE_EVERY == 0],
            "seconds": round(time.perf_counter() - started, 1)}


def logged_run(splits: dict, setup: Setup, lr: float, grokfast: bool, seed: int, role: str) -> dict:
    run = train_run(splits, setup, lr, grokfast, seed)
    reached = f">{run['steps']} (censored)" if run["censored"] else str(run["steps"])
    print(f"{role:16} seed {seed} lr {lr:.2e}: {reached} steps to {setup.target:.0%} validation accuracy, "
          f"test {run['test_accuracy']:.3f}, {run['seconds']} s", flush=True)
    return run


def fastest(runs: list[dict]) -> dict:
    """The run with the fewest steps to target; censored runs rank last, ties go to the smaller learning rate."""
    return min(runs, key=lambda run: (run["censored"], run["steps"], run["lr"]))


def tune_baseline_lr(splits: dict, setup: Setup, multipliers: list[float], seed: int) -> tuple[float, list[dict]]:
    """The plain-AdamW learning rate, of multiples of Grokfast's, fastest to the target on the tuning seed."""
    runs = [logged_run(splits, setup, setup.grokfast_lr * m, False, seed, "baseline tuning") for m in multipliers]
    return fastest(runs)["lr"], runs


def _bound(baseline: dict, grokfast: dict) -> str:
    """What a ratio baseline / Grokfast is, given which of its two runs were censored at the cap."""
    return {(False, False): "value", (True, False): "lower bound", (False, True): "upper bound",
            (True, True): "unknown"}[(baseline["censored"], grokfast["censored"])]


def spread(numbers: list[float]) -> dict:
    return {"mean": statistics.fmean(numbers), "sd": statistics.stdev(numbers) if len(numbers) > 1 else 0.0,
            "min": min(numbers), "max": max(numbers), "n": len(numbers)}


def ratio_spread(ratios: list[float]) -> dict:
    """A ratio's spread over seeds, with its geometric mean (the mean of a ratio and of its inverse disagree)."""
    return {**spread(ratios), "geometric_mean": statistics.geometric_mean(ratios)}


def compare_seed(splits: dict, setup: Setup, tuned_lr: float, seed: int) -> dict:
    """Grokfast, the tuned baseline and the baseline at Grokfast's learning rate on one report seed."""
    grokfast = logged_run(splits, setup, setup.grokfast_lr, True, seed, "grokfast")
    tuned = logged_run(splits, setup, tuned_lr, False, seed, "baseline tuned")
    same_lr = tuned if math.isclose(tuned_lr, setup.grokfast_lr) else \
        logged_run(splits, setup, setup.grokfast_lr, False, seed, "baseline same lr")
    return {"seed": seed, "grokfast": grokfast, "baseline_tuned": tuned, "baseline_same_lr": same_lr,
            "ratio_tuned": tuned["steps"] / grokfast["steps"], "ratio_tuned_is": _bound(tuned, grokfast),
            "ratio_same_lr": same_lr["steps"] / grokfast["steps"], "ratio_same_lr_is": _bound(same_lr, grokfast)}


def summarise(records: list[dict]) -> dict:
    runs = ("grokfast", "baseline_tuned", "baseline_same_lr")
    return {"ratio_tuned": ratio_spread([r["ratio_tuned"] for r in records]),
            "ratio_same_lr": ratio_spread([r["ratio_same_lr"] for r in records]),
            "steps": {name: spread([r[name]["steps"] for r in records]) for name in runs},
            "test_accuracy": {name: spread([r[name]["test_accuracy"] for r in records]) for name in runs},
            "censored_runs": {name: sum(r[name]["censored"] for r in records) for name in runs},
            "ratios_that_are_bounds": sum(r["ratio_tuned_is"] != "value" for r in records)}


def print_table(records: list[dict], summary: dict, tuned_lr: float, setup: Setup) -> None:
    def cell(run: dict) -> str:
        return f">{run['steps']}" if run["censored"] else str(run["steps"])

    print(f"\nsteps to {setup.target:.0%} validation accuracy (Grokfast lr {setup.grokfast_lr:.1e}, "
          f"tuned baseline lr {tuned_lr:.1e})")
    print(f"{'seed':>4} {'grokfast':>9} {'baseline':>9} {'ratio':>6} {'same-lr':>8} {'ratio':>6}")
    for r in records:
        print(f"{r['seed']:>4} {cell(r['grokfast']):>9} {cell(r['baseline_tuned']):>9} {r['ratio_tuned']:>6.2f} "
              f"{cell(r['baseline_same_lr']):>8} {r['ratio_same_lr']:>6.2f}")
    for name in ("ratio_tuned", "ratio_same_lr"):
        s = summary[name]
        print(f"{name}: mean {s['mean']:.2f} +/- {s['sd']:.2f} (min {s['min']:.2f}, max {s['max']:.2f}, "
              f"geometric mean {s['geometric_mean']:.2f}, {s['n']} seeds)")
    if summary["ratios_that_are_bounds"]:
        print(f"{summary['ratios_that_are_bounds']} tuned ratio(s) involve a censored run and are bounds")


def _numbers(text: str, kind: type) -> list:
    return [kind(item) for item in text.split(",")]


@cli.command()
def main(
    quick: bool = typer.Option(False, help=f"smoke configuration: {QUICK.modulus=}, {QUICK.dim=}, {QUICK.max_steps=}, "
                                            "seed 1 only, a two-point grid"),
    modulus: int | None = typer.Option(None, help=f"p (default {Setup.modulus})"),
    max_steps: int | None = typer.Option(None, help=f"step cap of every run (default {Setup.max_steps})"),
    grokfast_lr: float | None = typer.Option(None, help=f"Grokfast's learning rate (default {Setup.grokfast_lr})"),
    seeds: str | None = typer.Option(None, help="report seeds, comma-separated (default 1,2,3)"),
    tuning_seed: int = typer.Option(0, help="the seed the baseline's learning rate is tuned on"),
    lr_multipliers: str | None = typer.Option(None, help="baseline grid, multiples of Grokfast's lr (default 1,2,3,5,8)"),
    out: Path | None = typer.Option(None, help=f"results file (default {DEFAULT_OUT}; none for --quick)"),
) -> None:
    torch.set_num_threads(1)
    started = time.perf_counter()
    setup = QUICK if quick else Setup()
    overrides = {"modulus": modulus, "max_steps": max_steps, "grokfast_lr": grokfast_lr}
    setup = replace(setup, **{name: value for name, value in overrides.items() if value is not None})
    report_seeds = _numbers(seeds or ("1" if quick else "1,2,3"), int)
    multipliers = _numbers(lr_multipliers or ("1,2" if quick else "1,2,3,5,8"), float)
    if tuning_seed in report_seeds:
        raise typer.BadParameter("the tuning seed must not be a report seed")
    splits = make_splits(setup.modulus, setup.train_fraction, setup.data_seed)
    print(f"(a + b) mod {setup.modulus}: " + ", ".join(f"{name} {len(s[1])}" for name, s in splits.items()), flush=True)
    tuned_lr, tuning_runs = tune_baseline_lr(splits, setup, multipliers, tuning_seed)
    at_edge = math.isclose(tuned_lr, setup.grokfast_lr * max(multipliers))
    if at_edge:
        print("the tuned learning rate is the grid's largest: a larger one might be faster still", flush=True)
    records = [compare_seed(splits, setup, tuned_lr, seed) for seed in report_seeds]
    summary = summarise(records)
    print_table(records, summary, tuned_lr, setup)
    result = {
        "what": "steps to a target validation accuracy on (a + b) mod p, Grokfast EMA against an LR-tuned AdamW "
                "baseline; ratio = baseline steps / Grokfast steps; censored runs count at the cap",
        "command": "python -m bench.grokfast" + (" --quick" if quick else ""),
        "setup": asdict(setup), "warmup_steps": WARMUP_STEPS,
        "split_sizes": {name: len(s[1]) for name, s in splits.items()},
        "tuning": {"seed": tuning_seed, "multipliers": multipliers, "runs": tuning_runs, "chosen_lr": tuned_lr,
                   "chosen_is_the_largest_in_the_grid": at_edge},
        "seeds": records, "summary": summary,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "seconds": round(time.perf_counter() - started, 1),
    }
    target = out or (None if quick else DEFAULT_OUT)
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{result['seconds']} s" + (f"; results in {target}" if target else ""), flush=True)


if __name__ == "__main__":
    cli()
