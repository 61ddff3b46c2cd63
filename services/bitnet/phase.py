"""Phase 4, BitNet: one float model in, its quantization-aware fine-tuned BitNet b1.58 version out.

The transform measures, on the same evaluation, the float input, its naive ternarization (converted, no
training), the QAT model and, as the fair reference for QAT, the float input fine-tuned without quantization
on the same data, steps, schedule and seed ("float_finetuned"): QAT's extra training alone can lower the
loss of an under-trained input, so only this control isolates what ternary weights cost. The report gives
QAT's gap to both float models; the result is packed and the files measured.

What the next phase receives (the checkpoint of the output model):
    model.safetensors + config.json   the latent float weights and input-norm gains; config.json carries
                                      transformers' BitNetQuantConfig (autobitlinear, online), so
                                      load_checkpoint / AutoModelForCausalLM.from_pretrained rebuilds
                                      trainable ternary layers (AutoBitLinear) computing the same logits,
                                      ready for more quantization-aware training.
    bitnet-packed.safetensors         the deployable model: ternary weights packed (packing.py) plus
                                      everything else; services.bitnet.packed_model.load_packed runs it.
"""
from __future__ import annotations

import copy
import tempfile
from itertools import islice
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from services.bitnet.bitlinear import DEFAULT_KEEP_FULL_PRECISION, convert_to_bitnet, measure_input_rms
from services.bitnet.packed_model import pack_model, packed_size_report
from services.bitnet.packing import CODECS, get_codec
from services.bitnet.qat import quantization_aware_finetune
from shared.data.tasks import format_for_training, training_stream
from shared.data.text import english_documents
from shared.evaluation import EvalSuite, evaluate
from shared.phase import ForgedModel, Phase, PhaseConfig, PhaseResult, ProgressFn, no_progress
from shared.training import Row, TrainingConfig, collate, encode_texts, mean_loss, train_causal_lm

PACKED_FILE = "bitnet-packed.safetensors"


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
    # Training data: English text and generated tasks, mixed by weight.
    text_weight: float = Field(0.5, ge=0, le=1)
    train_text_chars: int = Field(2_000_000, ge=1)  # of the train split, in document order; QAT sees far less
    task_mix: dict[str, float] = {"arithmetic": 1.0, "sequence": 1.0, "multiple_choice": 1.0}
    task_levels: tuple[int, ...] = (1,)
    task_examples: int = Field(4000, ge=1)  # drawn from the train split for the tasks source
    held_out_rows: int = Field(64, ge=1)  # validation rows per source for the held-out losses
    eval: EvalSuite = EvalSuite(text_split="test", split="test")


def _first_chars(documents: list[str], limit: int) -> list[str]:
    kept = []
    for document in documents:
        if limit <= 0:
            break
        kept.append(document[:limit])
        limit -= len(kept[-1])
    return kept


def training_texts(config: BitNetConfig, split: str, max_task_examples: int) -> dict[str, list[str]]:
    """The phase's data: English text and formatted task examples of one split."""
    stream = training_stream(config.task_mix, config.task_levels, split, config.seed)
    return {
        "text": _first_chars(english_documents(split), config.train_text_chars),
        "tasks": [format_for_training(example) for example in islice(stream, max_task_examples)],
    }


def training_sources(tokenizer, config: BitNetConfig, split: str, max_task_examples: int) -> dict[str, list[Row]]:
    texts = training_texts(config, split, max_task_examples)
    return {name: encode_texts(tokenizer, documents, config.seq_len) for name, documents in texts.items()}


def _held_out_losses(model, sets: dict[str, list[Row]], pad_id: int) -> dict[str, float]:
    return {name: mean_loss(model, rows, pad_id) for name, rows in sets.items()}


def _measure(model, tokenizer, config: BitNetConfig, held_out: dict[str, list[Row]], pad_id: int) -> dict:
    return {**evaluate(model, tokenizer, config.eval), "held_out_loss": _held_out_losses(model, held_out, pad_id)}


HEADLINE_SUFFIXES = (".bits_per_byte", ".exact_match", ".acc", ".mean_accuracy")


def quality_gap(measured: dict, reference: dict) -> dict[str, float]:
    """measured minus reference on the headline figures of two _measure tables.

    Bits per byte and held-out losses: positive means worse than the reference; accuracies: negative does.
    """
    gap = {key: measured[key] - reference[key] for key in measured if key.endswith(HEADLINE_SUFFIXES)}
    gap.update({f"held_out_loss.{source}": loss - reference["held_out_loss"][source]
                for source, loss in measured["held_out_loss"].items()})
    return gap


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


class BitNetPhase(Phase):
    name = "bitnet"
    version = "1"
    Config = BitNetConfig

    def transform(self, models: list[ForgedModel], config: BitNetConfig, progress: ProgressFn = no_progress) -> PhaseResult:
        if len(models) != 1:
            raise ValueError(f"the bitnet phase takes exactly one model, got {len(models)}")
        forged = models[0]
        if getattr(forged.model.config, "quantization_config", None):
            raise ValueError(f"model {forged.name!r} is already quantized; the bitnet phase takes a float model")
        tokenizer, pad_id = forged.tokenizer, forged.tokenizer.pad_token_id
        model = copy.deepcopy(forged.model).float().eval()

        train = training_sources(tokenizer, config, "train", config.task_examples)
        held_out = {name: rows[: config.held_out_rows] for name, rows in
                    training_sources(tokenizer, config, "validation", config.held_out_rows * 4).items()}
        mix = {"text": config.text_weight, "tasks": 1.0 - config.text_weight}
        report: dict = {}
        # Progress milestones: the QAT run (and the float control when on) take nearly all of the time.
        start_qat = 0.5 if config.float_control else 0.1

        progress(0.0, "evaluating the float model")
        report["float"] = _measure(model, tokenizer, config, held_out, pad_id)
        float_bytes = _file_bytes(model)

        if config.float_control:
            control = copy.deepcopy(model)
            curve = train_causal_lm(control, train, mix, config.training, pad_id=pad_id, eval_sets=held_out,
                                    progress=lambda f, m: progress(0.05 + 0.4 * f, f"float control: {m}"))
            progress(0.45, "evaluating the fine-tuned float model")
            report["float_finetuned"] = _measure(control, tokenizer, config, held_out, pad_id)
            report["float_finetune_curve"] = curve.as_report()
            del control

        gains = None
        if config.calibrate_norms:
            calibration = collate(train["text"][: config.calibration_rows], pad_id)[0]
            gains = measure_input_rms(model, calibration.split(4))
        converted = convert_to_bitnet(model, config.keep_full_precision, norm_gains=gains)
        if not converted:
            raise ValueError("no linear layer to quantize: every nn.Linear is kept in full precision")

        progress(start_qat - 0.05, "evaluating the naive ternarization")
        report["naive_ternary"] = _measure(model, tokenizer, config, held_out, pad_id)

        warmup = round(config.lambda_warmup_fraction * config.training.steps)
        curve, strengths = quantization_aware_finetune(
            model, train, mix, config.training, lambda_warmup_steps=warmup, pad_id=pad_id, eval_sets=held_out,
            progress=lambda f, m: progress(start_qat + (0.9 - start_qat) * f, m),
        )

        progress(0.9, "evaluating the QAT model")
        model.eval()
        report["qat"] = _measure(model, tokenizer, config, held_out, pad_id)
        report["qat_curve"] = {**curve.as_report(), "lambda_warmup_steps": warmup,
                               "lambda": [round(s, 4) for s in strengths]}
        report["qat_gap"] = {reference: quality_gap(report["qat"], report[reference])
                             for reference in ("float", "float_finetuned") if reference in report}
        report["converted_layers"] = len(converted)
        report["kept_full_precision"] = list(config.keep_full_precision)
        report["float_file_bytes"] = float_bytes
        report["sizes"] = _size_reports(model, float_bytes)
        report["packing"] = config.packing
        packed_size = report["sizes"][config.packing]
        report["summary"] = {
            **{f"{name}.test_bpb": round(report[name]["text.bits_per_byte"], 4)
               for name in ("float", "float_finetuned", "naive_ternary", "qat")
               if "text.bits_per_byte" in report.get(name, {})},  # absent where the eval suite has no text
            "ternary_bits_per_weight": round(packed_size["ternary_bits_per_weight"], 4),
            "packed_file_bytes": packed_size["file_bytes"],
            "float_file_bytes": float_bytes,
        }
        progress(1.0, "packed")

        output = ForgedModel(model=model, tokenizer=tokenizer, name=forged.name)
        with torch.no_grad():
            packed = pack_model(model, get_codec(config.packing))
        return PhaseResult(models=[output], report=report, extra_files={forged.name: {PACKED_FILE: packed}})
