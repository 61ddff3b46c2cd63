"""Phase 4, BitNet: one float model in, its quantization-aware fine-tuned BitNet b1.58 version out.

The transform measures, on the shared scorecard (shared.scorecard, test split), the float input, its naive
ternarization (converted, no training), the QAT model and, as the fair reference for QAT, the float input
fine-tuned without quantization on the same data, steps, schedule and seed ("float_finetuned"): QAT's extra
training alone can lower the loss of an under-trained input, so only this control isolates what ternary
weights cost. The report gives QAT's paired gap to both float models on every scorecard metric; the result
is packed and the files measured.

Training data: every skill the input has (shared.data.skills: calculator calls, reasoning tasks, English
text), so that QAT keeps them all; a QAT run on text and reasoning alone once took the champion's tool-call
success from 0.995 to 0.000.

What the next phase receives (the checkpoint of the output model):
    model.safetensors + config.json   the latent float weights and input-norm gains; config.json carries
                                      transformers' BitNetQuantConfig (autobitlinear, online), so
                                      load_checkpoint / AutoModelForCausalLM.from_pretrained rebuilds
                                      trainable ternary layers (AutoBitLinear) computing the same logits,
                                      ready for more quantization-aware training.
    bitnet-packed.safetensors         the deployable model: ternary weights packed (packing.py) plus
                                      everything else; shared.ternary.packed_model.load_packed runs it.
    carried/                          what the input carried (Quiet-STaR's mixing head), unchanged.
"""
from __future__ import annotations

import copy
import dataclasses
import tempfile
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator

from shared.ternary.bitlinear import DEFAULT_KEEP_FULL_PRECISION, convert_to_bitnet, measure_input_rms
from shared.ternary.packed_model import PACKED_FILE, pack_model, packed_size_report
from shared.ternary.packing import CODECS, get_codec
from services.bitnet.qat import quantization_aware_finetune
from shared.data.skills import check_mix, skill_rows
from shared.phase import ForgedModel, Phase, PhaseConfig, PhaseResult, ProgressFn, no_progress, one_float_model
from shared.scorecard import ScorecardSpec, compare, report_section, score
from shared.training import Row, TrainingConfig, collate, mean_loss, train_causal_lm



class BitNetConfig(PhaseConfig):
    keep_full_precision: tuple[str, ...] = DEFAULT_KEEP_FULL_PRECISION  # nn.Linear names left in float
    # Start each input norm's gain at the RMS its layer saw in the float model (our addition; False: gain 1).
    calibrate_norms: bool = True
    calibration_rows: int = Field(16, ge=1)  # training rows the norm calibration runs on
    packing: Literal["2bit", "base3"] = "base3"  # codec of the packed file (both are measured)
    # Also fine-tune the float input exactly as QAT is trained, without quantization (doubles the training time).
    float_control: bool = True
    training: TrainingConfig = TrainingConfig(steps=300, learning_rate=1e-3, warmup_steps=20, eval_every=50)
    lambda_warmup_fraction: float = Field(0.5, ge=0, le=1)  # share of the steps lambda takes to reach 1
    seq_len: int = Field(128, ge=8)
    # Training data: the skills (shared.data.skills) mixed by weight; every skill of the input is kept.
    mix: dict[str, float] = {"tools": 0.3, "reasoning": 0.4, "text": 0.3}
    train_text_chars: int = Field(2_000_000, ge=1)  # of the train split, in document order; QAT sees far less
    task_examples: int = Field(4000, ge=1)  # drawn from the train split per task source
    held_out_rows: int = Field(64, ge=1)  # validation rows per source for the held-out losses
    scorecard: ScorecardSpec = ScorecardSpec()

    @field_validator("mix")
    @classmethod
    def _known_mix(cls, mix: dict[str, float]) -> dict[str, float]:
        return check_mix(mix)


def training_sources(tokenizer, config: BitNetConfig, split: str, max_task_examples: int) -> dict[str, list[Row]]:
    """The phase's data: token rows of the skills the mix weighs, from one split."""
    rows = skill_rows(tokenizer, split, max_task_examples, config.seq_len, config.seed, config.train_text_chars)
    return {name: rows[name] for name, weight in config.mix.items() if weight > 0}


def _held_out_losses(model, sets: dict[str, list[Row]], pad_id: int) -> dict[str, float]:
    return {name: mean_loss(model, rows, pad_id) for name, rows in sets.items()}


def _file_bytes(model) -> int:
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, safe_serialization=True)
        return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def _size_reports(model, float_bytes: int) -> dict[str, dict]:
    reports = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, codec in CODECS.items():
            path = Path(folder) / f"{name}.safetensors"
            path.write_bytes(pack_model(model, codec))
            report = packed_size_report(path)
            reports[name] = {**report, "file_compression_vs_float": float_bytes / report["file_bytes"]}
    return reports


# The largest loss of tool-call success (test split) the phase accepts without the report flagging it.
TOOL_USE_TOLERANCE = 0.10
TOOL_METRIC = "tools.task_success"


class BitNetPhase(Phase):
    name = "bitnet"
    version = "2"  # 2: trains on every skill (tool calls included), reports on the shared scorecard
    Config = BitNetConfig

    def transform(self, models: list[ForgedModel], config: BitNetConfig, progress: ProgressFn = no_progress) -> PhaseResult:
        forged = one_float_model(models, self.name)
        tokenizer, pad_id = forged.tokenizer, forged.tokenizer.pad_token_id
        model = copy.deepcopy(forged.model).float().eval()

        train = training_sources(tokenizer, config, "train", config.task_examples)
        held_out = {name: rows[: config.held_out_rows] for name, rows in
                    training_sources(tokenizer, config, "validation", config.held_out_rows * 4).items()}
        cards, losses, report = {}, {}, {}
        # Progress milestones: the QAT run (and the float control when on) take most of the time.
        start_qat = 0.45 if config.float_control else 0.15

        def measure(name: str, measured, start: float, end: float) -> None:
            cards[name] = score(measured, tokenizer, config.scorecard,
                                lambda f, m: progress(start + (end - start) * f, f"{name}: {m}"))
            losses[name] = _held_out_losses(measured, held_out, pad_id)

        measure("float", model, 0.0, 0.05)
        float_bytes = _file_bytes(model)

        if config.float_control:
            control = copy.deepcopy(model)
            curve = train_causal_lm(control, train, config.mix, config.training, pad_id=pad_id, eval_sets=held_out,
                                    progress=lambda f, m: progress(0.05 + 0.3 * f, f"float control: {m}"))
            measure("float_finetuned", control, 0.35, 0.4)
            report["float_finetune_curve"] = curve.as_report()
            del control

        gains = None
        if config.calibrate_norms:
            calibration = collate(next(iter(train.values()))[: config.calibration_rows], pad_id)[0]
            gains = measure_input_rms(model, calibration.split(4))
        converted = convert_to_bitnet(model, config.keep_full_precision, norm_gains=gains)
        if not converted:
            raise ValueError("no linear layer to quantize: every nn.Linear is kept in full precision")

        measure("naive_ternary", model, start_qat - 0.05, start_qat)
        warmup = round(config.lambda_warmup_fraction * config.training.steps)
        curve, strengths = quantization_aware_finetune(
            model, train, config.mix, config.training, lambda_warmup_steps=warmup, pad_id=pad_id, eval_sets=held_out,
            progress=lambda f, m: progress(start_qat + (0.9 - start_qat) * f, m),
        )
        model.eval()
        measure("qat", model, 0.9, 0.98)

        references = [name for name in ("float", "float_finetuned") if name in cards]
        report["scorecard"] = report_section(config.scorecard, cards, inputs=["float"], outputs=["qat"],
                                             baselines=[name for name in cards if name not in ("float", "qat")])
        report["held_out_loss"] = losses
        report["qat_curve"] = {**curve.as_report(), "lambda_warmup_steps": warmup,
                               "lambda": [round(s, 4) for s in strengths]}
        report["qat_gap"] = {
            reference: {**compare(cards["qat"], cards[reference]),
                        "held_out_loss": {source: losses["qat"][source] - losses[reference][source]
                                          for source in losses["qat"]}}
            for reference in references}
        report["tool_use"] = _tool_use_kept(cards)
        report["converted_layers"] = len(converted)
        report["kept_full_precision"] = list(config.keep_full_precision)
        report["float_file_bytes"] = float_bytes
        report["sizes"] = _size_reports(model, float_bytes)
        report["packing"] = config.packing
        report["summary"] = _summary(report, cards, config.packing)
        progress(1.0, "packed")

        output = dataclasses.replace(forged, model=model)  # the tokenizer, name and carried files go on
        with torch.no_grad():
            packed = pack_model(model, get_codec(config.packing))
        return PhaseResult(models=[output], report=report, extra_files={forged.name: {PACKED_FILE: packed}})


def _tool_use_kept(cards: dict[str, dict]) -> dict:
    """Whether QAT kept the input's tool use: its tool-call success within TOOL_USE_TOLERANCE of the input's."""
    if TOOL_METRIC not in cards["float"]["metrics"]:
        return {"measured": False, "reason": "the scorecard has no tool-call task"}
    before, after = (cards[name]["metrics"][TOOL_METRIC]["value"] for name in ("float", "qat"))
    return {"measured": True, "input": before, "output": after, "loss": before - after,
            "tolerance": TOOL_USE_TOLERANCE, "kept": before - after <= TOOL_USE_TOLERANCE}


def _summary(report: dict, cards: dict[str, dict], packing: str) -> dict:
    summary = {}
    for name, card in cards.items():
        metrics = card["metrics"]
        for metric, label in (("text.bits_per_byte", "bpb"), ("tasks.mean_task_success", "mean_task_success"),
                              (TOOL_METRIC, "tool_success")):
            if metric in metrics:
                summary[f"{name}.{label}"] = round(metrics[metric]["value"], 4)
    if report["tool_use"]["measured"]:
        summary["tool_use_kept"] = report["tool_use"]["kept"]
    packed_size = report["sizes"][packing]
    summary.update({"ternary_bits_per_weight": round(packed_size["ternary_bits_per_weight"], 4),
                    "packed_file_bytes": packed_size["file_bytes"], "float_file_bytes": report["float_file_bytes"]})
    return summary
