"""`agentforge report RUN_ID`: one self-contained HTML page of a run, from what the run recorded.

Each phase draws its own figures from its report (Phase.figures: by default every training curve the
report holds; EvoMerge adds fitness by generation, Quiet-STaR its reward, Forge its difficulty and
ablations, ADAS its Pareto front). The page adds the run's size/quality staircase: for each checkpoint
the run made, its bytes on disk (the smallest top-level safetensors file of the checkpoint, each of which
holds the whole model: the weights, BitNet's packed file, the compressed file) against the mean task success
its phase's scorecard measured. Figures are PNGs inlined as data: URIs, so the file needs nothing beside it.
"""
from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Callable, Iterator
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: the report is written from a terminal, a service or CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from shared.scorecard import MEAN_METRIC  # noqa: E402

Figures = list[tuple[str, Figure]]
# Once the page has loaded, <body data-images-loaded="K/N">: how many of its N images decoded, for a reader
# (or a headless browser's DOM dump) to check that the page is whole.
IMAGES_LOADED = ("<script>addEventListener('load', () => { const images = [...document.images]; "
                 "document.body.dataset.imagesLoaded = images.filter(i => i.complete && i.naturalWidth > 0).length "
                 "+ '/' + images.length; });</script>")


def curves_in(report: Any, path: str = "") -> Iterator[tuple[str, dict]]:
    """Every training curve in a report (a dict with a train_loss list), with where it sits."""
    if isinstance(report, dict):
        if isinstance(report.get("train_loss"), list) and report["train_loss"]:
            yield path or "training", report
        for key, value in report.items():
            yield from curves_in(value, f"{path}/{key}" if path else key)


def curve_figures(report: dict) -> Figures:
    figures = []
    for where, curve in curves_in(report):
        figure, axes = plt.subplots(figsize=(6, 3.2))
        axes.plot(range(1, len(curve["train_loss"]) + 1), curve["train_loss"], label="train", linewidth=1)
        for source, losses in (curve.get("eval_loss") or {}).items():
            if isinstance(losses, list) and len(losses) == len(curve.get("eval_steps", [])):
                axes.plot(curve["eval_steps"], losses, marker="o", markersize=3, label=f"held out: {source}")
        axes.set(xlabel="step", ylabel="loss", title=where)
        axes.legend(fontsize=7)
        figure.tight_layout()
        figures.append((f"training curve: {where}", figure))
    return figures


def output_points(report: dict) -> dict[str, float]:
    """Mean task success of each output card of a phase's report."""
    scorecard = report.get("scorecard") or {}
    cards = scorecard.get("cards", {})
    return {name: cards[name]["metrics"][MEAN_METRIC]["value"] for name in scorecard.get("outputs", [])
            if MEAN_METRIC in cards.get(name, {}).get("metrics", {})}


def model_bytes(sizes: dict[str, int]) -> int:
    return min(size for name, size in sizes.items() if "/" not in name and name.endswith(".safetensors"))


def staircase(points: list[dict[str, Any]]) -> Figure:
    figure, axes = plt.subplots(figsize=(7, 4))
    for point in points:
        axes.scatter(point["bytes"], point["success"], s=20)
        axes.annotate(f"{point['step']}. {point['phase']}: {point['model']}", (point["bytes"], point["success"]),
                      fontsize=7, xytext=(4, 2), textcoords="offset points")
    axes.set_xscale("log")
    axes.set(xlabel="bytes on disk (log)", ylabel="mean task success (its phase's scorecard)",
             title="size and quality of every checkpoint of the run")
    figure.tight_layout()
    return figure


def _png(figure: Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def render(run: dict[str, Any], steps: list[dict[str, Any]], points: list[dict[str, Any]],
           figures_of: Callable[[dict[str, Any]], Figures]) -> str:
    """The page: a header, the staircase, then per step its headline numbers and figures."""
    sections = [f"<h2>Size and quality</h2><img alt='staircase' src='{_png(staircase(points))}'>" if points else ""]
    for step in steps:
        summary = step["report"].get("summary", {})
        rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(json.dumps(v))}</td></tr>"
                       for k, v in summary.items())
        images = "".join(f"<figure><img alt='{html.escape(title)}' src='{_png(figure)}'>"
                         f"<figcaption>{html.escape(title)}</figcaption></figure>"
                         for title, figure in figures_of(step))
        sections.append(f"<h2>{step['step'] + 1}. {html.escape(step['phase'])}</h2>"
                        f"<table>{rows}</table>{images}")
    title = f"Agent Forge run {html.escape(run['run_id'])}"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>"
            "body{font-family:sans-serif;max-width:60em;margin:auto}td{padding:0 1em;font-size:small}"
            "figure{display:inline-block;margin:0.5em}img{max-width:100%}</style></head><body>"
            f"<h1>{title}</h1><p>{html.escape(run['spec'])}: {html.escape(run['state'])}, "
            f"{len(steps)} step(s) completed.</p>{''.join(sections)}{IMAGES_LOADED}</body></html>")
