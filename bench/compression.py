"""Final compression at tiny scale, on the same ternary input: the phase on its defaults (VQ v = 4 with 2^8 + 2^7
entries: 3.97 bits a weight on the tiny embedding; SeedLM C = 8, P = 3: 4 bits) and at about 3 bits (VQ with
2^8 + 2^3 entries: 2.94 bits; SeedLM's other setting, C = 12, P = 4: 3 bits).

    .venv/bin/python -m bench.compression                    # a stand-in input (bench.stand_in)
    .venv/bin/python -m bench.compression --checkpoint DIR   # on ADAS's (or BitNet's) output from a run instead

The phase report holds every number: each stage's gate on validation, the file's bytes part by part, the
ternary weights' bits (base-3, range-coded, entropy bound), each coder's (SeedLM's, VQ's) reconstruction
error beside round-to-nearest's and HQQ's at the same bits per weight (no fewer, for VQ), and the test scorecard
of the input, the model rebuilt from the compressed file, each rolled-back coder's candidate and the baselines
(paired), and the GGUF's agreement with our model in llama.cpp. Then llama.cpp's prefill and decode speed on the
first setting's output, its ternary GGUF against the same model's F16 GGUF, in this one run (when
llama-cpp-python is installed; else the file says why not). This script keeps what the README shows in
bench/results/compression.json, from which bench.readme writes the README block.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import typer

from bench.results_file import write_results
from bench.stand_in import ternary_input
from services.compression.gguf_export import export_gguf
from services.compression.llama_cpp_check import llama_cpp_available, speed
from services.compression.phase import CompressionPhase
from shared.phase import ForgedModel, print_every_percent
from shared.scorecard import comparison_figures, text_blocks, without_items

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "compression.json"
PROMPT_TOKENS, NEW_TOKENS = 128, 64
SETTINGS = {"4 bits (VQ v 4, 2^8 + 2^7 entries; SeedLM C 8, P 3)": {},
            "3 bits (VQ v 4, 2^8 + 2^3 entries; SeedLM C 12, P 4)": {"vq": {"residual_bits": 3},
                                                                 "seedlm": {"block": 12, "coefficients": 4}}}
cli = typer.Typer(add_completion=False)


def _kept(report: dict) -> dict:
    kept = {key: report[key] for key in ("seedlm", "vq", "entropy", "stages", "sizes", "rebuilt_logits_max_abs_diff",
                                         "against_baselines", "gguf", "summary") if key in report}
    kept["against_input"] = {name: comparison_figures(c) for name, c in report["against_input"].items()}
    kept["cards"] = {name: without_items(card) for name, card in report["scorecard"]["cards"].items()}
    return kept


@cli.command()
def main(
    checkpoint: Path | None = typer.Option(None, help="input checkpoint (a ternary model); default: the stand-in"),
    seed: int = typer.Option(0, help="seed of the stand-in"),
    out: Path = typer.Option(DEFAULT_OUT, help="results file"),
) -> None:
    started = time.perf_counter()
    forged, source = ternary_input(checkpoint, seed)
    phase = CompressionPhase()
    runs, outputs = {}, []
    for label, overrides in SETTINGS.items():
        config = phase.parse_config(overrides)
        typer.echo(f"final compression, {label}:")
        result = phase.transform([forged], config, print_every_percent(typer.echo))
        runs[label] = {"config": config.model_dump(mode="json"), **_kept(result.report)}
        outputs.append(result.models[0])
    results = {"command": "python -m bench.compression" + (f" --checkpoint {checkpoint}" if checkpoint else ""),
               "input": source, "seed": seed, "runs": runs, "llama_cpp_speed": gguf_speed(outputs[0])}
    write_results(out, results, started)


def gguf_speed(output: ForgedModel) -> dict:
    """Prefill and decode tokens per second in llama.cpp, the ternary GGUF against the F16 GGUF of one model."""
    missing = llama_cpp_available()
    if missing:
        return {"measured": False, "why": missing}
    prompt = output.tokenizer(text_blocks("test")[0], add_special_tokens=False)["input_ids"][:PROMPT_TOKENS]
    figures = {"measured": True}
    with tempfile.TemporaryDirectory() as folder:
        for label, ternary in (("ternary", True), ("f16", False)):
            path = Path(folder) / f"{label}.gguf"
            info = export_gguf(output.model, output.tokenizer, path, ternary=ternary)
            typer.echo(f"llama.cpp speed, {label} GGUF")
            figures[label] = {"file_bytes": path.stat().st_size, "matrix_types": sorted(set(info["matrix_types"].values())),
                              **speed(path, prompt, NEW_TOKENS)}
    return figures


if __name__ == "__main__":
    cli()
