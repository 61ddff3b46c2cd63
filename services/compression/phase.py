"""Phase 8, final compression: the ternary model made as small as it goes while it stays as good.

It takes the ternary model ADAS hands on and hands on a ternary model plus its compressed file. After
BitNet, most of a small model's bytes are in float: the embedding (tied with the LM head) is most of the
`tiny` model's packed file. The stages, chained, each consuming the previous one's output:

1. vq: every float matrix of the packed file (the embedding) vector-quantized VPTQ-style (vq.py): k-means
   codebooks weighted by the input Hessian of the layer that reads the matrix (the tied embedding's: the LM
   head's input, the final hidden states, on calibration_rows train-split rows of each skill), a residual
   codebook and GPTQ's error feedback; 3.97 bits a weight on the tiny embedding by default. Lossy, so gated:
   the validation scorecard of the model with the decoded matrices against the stage's input; a drop in mean
   task success beyond max_task_success_drop, or a rise in bits per byte beyond max_bits_per_byte_rise, rolls
   the stage back.
2. seedlm: the float matrices VQ did not code (all of them when its stage was rolled back) in SeedLM form
   (seedlm.py), the paper's C = 8, P = 3 (4 bits a weight) by default; gated the same way. A matrix either coder
   keeps is not coded again: the first coder that passes its gate codes it. VQ comes first because on the
   stand-in's validation it cost less than SeedLM at no more bits (and passed its gate where SeedLM did not;
   README, "Final compression").
3. float16: the float matrices neither coder kept (all of them when both were rolled back) stored as
   float16, gated the same way. Not in the design's list of methods: added after the first benchmark run
   rolled SeedLM back at both of the paper's settings (its validation cost in mean task success was above
   the tolerance), as the plain next step down from float32.
4. entropy: every ternary layer's trits range-coded under its own value counts (entropy.py). Lossless, so
   its gate is the decode (the coded trits must decode to exactly the layer's trits) and the file: a layer
   whose code is not smaller than its base-3 packing stays packed, and the stage is rolled back when the
   coded file is not smaller than the packed one (each coded layer adds header entries).

Then the compressed file (compressed_file.py) is written, the model rebuilt from it alone, its logits checked
against the chained model's, and the rebuilt model scored on the test split beside its input. Each coder's
candidate (the rebuilt model where the coder was kept, else its rolled-back candidate) is scored beside
round-to-nearest and HQQ on the same matrices at the same bits per weight (baselines.py; for VQ, whose codebooks
add a fraction no baseline setting hits, at the least baseline bits at or above its own), paired.
The model handed on is the chained model in the BitNet checkpoint layout (latent ternary weights, the
decoded float matrices): it computes exactly what the compressed file rebuilds, and its checkpoint folder is
the Hugging Face export (stock transformers loads it as AutoBitLinear layers, without this project).
Beside it in the checkpoint: the compressed file, the packed file, and the GGUF for llama.cpp
(gguf_export.py, GGUF_FILE), whose agreement with the model on test text llama.cpp measures when
llama-cpp-python is installed (llama_cpp_check.py; the report says so when it is not).
"""
from __future__ import annotations

import copy
import re
import tempfile
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import field_validator
from safetensors.torch import load

from services.compression import seedlm, vq
from services.compression.baselines import (baseline_bits_per_weight, bits_setting_at_least, equal_bits_setting, hqq,
                                            round_to_nearest)
from services.compression.compressed_file import (COMPRESSED_FILE, compressed_size_report, load_compressed,
                                                  write_compressed)
from services.compression.entropy import decode_trits, encode_trits, entropy_bits
from services.compression.gguf_export import export_gguf
from services.compression.llama_cpp_check import agreement, llama_cpp_available
from services.compression.seedlm import SeedLMShape
from services.compression.vq import VQShape, input_hessians
from shared.data.skills import skill_rows
from shared.gate import beyond
from shared.phase import ForgedModel, Phase, PhaseConfig, PhaseResult, ProgressFn, no_progress, one_ternary_model
from shared.scorecard import (HEADLINE_TASKS, MEAN_METRIC, TEXT_METRIC, ScorecardSpec, compare, paired_difference,
                              headline_figures, report_section, score, text_blocks)
from shared.ternary.bitlinear import bit_linears, ternarize, trainable_ternary
from shared.ternary.packed_model import PACKED_FILE, pack_model, packed_size_report
from shared.ternary.packing import BASE3, get_codec
from shared.training import collate

Stage = Literal["seedlm", "vq", "float16", "entropy"]
CODERS = ("seedlm", "vq")  # the lossy stages that code float matrices, each in its own form in the file
GGUF_FILE = "model.gguf"  # llama.cpp's form of the model handed on (gguf_export.py), in the checkpoint
AGREEMENT_TEXTS = 4  # test-split text blocks llama.cpp's logits are compared on, each up to the context length
# The gates' scorecard: the headline tasks on validation, 200 problems each (the validation split of
# sequence.1 holds 279, fewer than the test card's 300).
GATE_SPEC = ScorecardSpec(split="validation", tasks=tuple((suite, level, 200) for suite, level, _ in HEADLINE_TASKS))


class CompressionConfig(PhaseConfig):
    stages: tuple[Stage, ...] = ("vq", "seedlm", "float16", "entropy")
    vq: VQShape = VQShape()  # v 4, 2^8 + 2^7 entries, row scales: 3.97 bits a weight on the tiny embedding
    seedlm: SeedLMShape = SeedLMShape()
    # Train-split rows (the context length) of each skill whose hidden states make VQ's Hessians.
    calibration_rows: int = 32
    # Regexes of the packed file's float matrices the coders code; none: every one (the embedding, an untied head).
    float_matrices: tuple[str, ...] = ()
    # The gate, on validation, absolute; a negative tolerance demands a gain of at least its size.
    max_task_success_drop: float = 0.02  # mean task success
    max_bits_per_byte_rise: float = 0.02  # text bits per byte
    validation: ScorecardSpec = GATE_SPEC
    scorecard: ScorecardSpec = ScorecardSpec()
    packing: str = "base3"  # of the packed file handed on beside the checkpoint

    @field_validator("stages")
    @classmethod
    def _distinct(cls, stages: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(stages)) != len(stages):
            raise ValueError(f"a stage appears twice: {stages}")
        return stages

    @field_validator("seedlm")
    @classmethod
    def _has_baselines(cls, shape: SeedLMShape) -> SeedLMShape:
        equal_bits_setting(shape.bits_per_weight)  # the baselines must exist at the same bits per weight
        return shape


def float_matrices(model, patterns: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The 2-D float tensors of the model's packed file (a tied embedding and head once), by key."""
    tensors = load(pack_model(model, BASE3))
    return {key: tensor for key, tensor in tensors.items()
            if tensor.dim() == 2 and tensor.is_floating_point()
            and (not patterns or any(re.search(p, key) for p in patterns))}


def with_matrices(model, matrices: dict[str, torch.Tensor]):
    """A copy of the model with the given float matrices (packed-file keys) replaced."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for key, value in matrices.items():
            model.get_parameter(key).copy_(value)
    return model


def relative_error(approximation: torch.Tensor, weight: torch.Tensor) -> float:
    return float((approximation - weight).pow(2).sum() / weight.pow(2).sum())


def output_relative_error(approximation: torch.Tensor, weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """||(W' - W) X^T||^2 / ||W X^T||^2 with H = X^T X: the relative error of the layer's outputs on the inputs."""
    error = (approximation - weight).double()
    return float(((error @ hessian) * error).sum() / ((weight.double() @ hessian) * weight.double()).sum())


class CompressionPhase(Phase):
    name = "compression"
    # 2: the GGUF lists tokens added after training (Quiet-STaR's), one per embedding row; 3: the VQ stage
    version = "3"
    Config = CompressionConfig

    def transform(self, models: list[ForgedModel], config: CompressionConfig,
                  progress: ProgressFn = no_progress) -> PhaseResult:
        forged = one_ternary_model(models, self.name)
        tokenizer = forged.tokenizer
        model = trainable_ternary(forged.model).eval()
        progress(0.0, "validation: the input")
        current, current_card = model, score(model, tokenizer, config.validation)
        kept = {coder: {} for coder in CODERS}  # per coder, its codes of the matrices it was kept for
        candidates = {}  # per coder that ran, its candidate (kept or rolled back), scored on test beside the baselines
        trit_codes, float16_keys, stages = {}, [], []
        report: dict = {}
        for stage in config.stages:
            coded = {key for codes in kept.values() for key in codes} | set(float16_keys)
            if stage in CODERS:
                matrices = {k: w for k, w in float_matrices(current, config.float_matrices).items() if k not in coded}
                if not matrices:
                    stages.append({"stage": stage, "passed": False, "rolled_back": False,
                                   "skipped": "every float matrix is coded already"})
                    continue
                codes, decoded, report[stage] = self._code(stage, current, matrices, tokenizer, config, progress)
                candidate = with_matrices(current, decoded)
                progress(0.35, f"validation: after {stage}")
                card = score(candidate, tokenizer, config.validation)
                gate = self._gate(card, current_card, config)
                candidates[stage] = candidate
                if gate["passed"]:
                    current, current_card, kept[stage] = candidate, card, codes
                stages.append({"stage": stage, **gate, "rolled_back": not gate["passed"]})
            elif stage == "float16":
                matrices = {k: w for k, w in float_matrices(current, config.float_matrices).items() if k not in coded}
                candidate = with_matrices(current, {key: weight.half().float() for key, weight in matrices.items()})
                progress(0.4, "validation: after float16")
                card = score(candidate, tokenizer, config.validation)
                gate = self._gate(card, current_card, config)
                if gate["passed"]:
                    current, current_card, float16_keys = candidate, card, sorted(matrices)
                stages.append({"stage": stage, "matrices": sorted(matrices), **gate, "rolled_back": not gate["passed"]})
            else:
                codes, report["entropy"] = self._entropy(current)
                # Lossless, so the gate is the exact decode (checked in _entropy) and a smaller file: each coded
                # layer adds header entries, which can cost more than the code saves.
                sizes = {"with": len(write_compressed(current, kept["seedlm"], codes, float16_keys, kept["vq"])),
                         "without": len(write_compressed(current, kept["seedlm"], {}, float16_keys, kept["vq"]))}
                smaller = sizes["with"] < sizes["without"]
                if smaller:
                    trit_codes = codes
                stages.append({"stage": stage, "passed": smaller, "rolled_back": not smaller, "file_bytes": sizes,
                               "check": "every coded layer decodes to exactly its trits, and the file is smaller"})
        report["stages"] = stages

        progress(0.5, "the compressed file, and the model rebuilt from it")
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / COMPRESSED_FILE
            path.write_bytes(write_compressed(current, kept["seedlm"], trit_codes, float16_keys, kept["vq"]))
            rebuilt = load_compressed(path)
            report["sizes"] = self._sizes(model, path)
            compressed = path.read_bytes()
        report["rebuilt_logits_max_abs_diff"] = _logits_difference(current, rebuilt, tokenizer)

        kept_coders = {coder for coder, codes in kept.items() if codes}
        report.update(self._test(model, rebuilt, candidates, kept_coders, report, tokenizer, config, progress))
        progress(0.95, "GGUF for llama.cpp")
        gguf_bytes, report["gguf"] = self._gguf(current, tokenizer, config)
        report["summary"] = _summary(report)
        progress(1.0, "packed")
        with torch.no_grad():
            files = {PACKED_FILE: pack_model(current, get_codec(config.packing)), COMPRESSED_FILE: compressed,
                     GGUF_FILE: gguf_bytes}
        return PhaseResult(models=[ForgedModel(current, tokenizer, forged.name, forged.carried)], report=report,
                           extra_files={forged.name: files})

    def _gguf(self, model, tokenizer, config: CompressionConfig) -> tuple[bytes, dict]:
        """The GGUF's bytes, what it holds, and llama.cpp's agreement with the model on test text."""
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / GGUF_FILE
            info = export_gguf(model, tokenizer, path)
            info["file_bytes"] = path.stat().st_size
            missing = llama_cpp_available()
            if missing:
                info["llama_cpp"] = {"measured": False, "why": missing}
            else:
                texts = list(text_blocks(config.scorecard.split)[:AGREEMENT_TEXTS])
                info["llama_cpp"] = {"measured": True, **agreement(path, model, tokenizer, texts,
                                                                   model.config.max_position_embeddings)}
            return path.read_bytes(), info

    def _gate(self, card: dict, reference: dict, config: CompressionConfig) -> dict:
        drop = reference["metrics"][MEAN_METRIC]["value"] - card["metrics"][MEAN_METRIC]["value"]
        measured = {"task_success_drop": drop}
        passed = not beyond(drop, config.max_task_success_drop)
        if TEXT_METRIC in card["metrics"]:
            measured["bits_per_byte_rise"] = card["metrics"][TEXT_METRIC]["value"] - reference["metrics"][TEXT_METRIC]["value"]
            passed = passed and not beyond(measured["bits_per_byte_rise"], config.max_bits_per_byte_rise)
        return {"passed": passed, "measured": measured,
                "tolerance": {"task_success_drop": config.max_task_success_drop,
                              "bits_per_byte_rise": config.max_bits_per_byte_rise}}

    def _code(self, coder: str, model, matrices: dict[str, torch.Tensor], tokenizer, config: CompressionConfig,
              progress: ProgressFn) -> tuple[dict, dict[str, torch.Tensor], dict]:
        """The coder's codes of the matrices, their decoded weights, and its report: bits on disk against its
        formula, reconstruction error beside the baselines' at the same bits, exact decoding, encoding time."""
        started = time.perf_counter()
        if coder == "seedlm":
            codes = {key: seedlm.encode(weight, config.seedlm, lambda f, m: progress(0.05 + 0.3 * f, m))
                     for key, weight in matrices.items()}
            decode = seedlm.decode
            formula = {key: config.seedlm.bits_per_weight for key in matrices}
            nbits, group = equal_bits_setting(config.seedlm.bits_per_weight)
            found = {"block": config.seedlm.block, "coefficients": config.seedlm.coefficients,
                     "formula_bits_per_weight": config.seedlm.bits_per_weight}
        else:
            progress(0.05, "VQ: calibration on the train split")
            hessians, positions = self._hessians(model, list(matrices), tokenizer, config)
            codes = {key: vq.encode(weight, hessians[key], config.vq, config.seed) for key, weight in matrices.items()}
            decode = vq.decode
            formula = {key: config.vq.bits_per_weight(weight.shape) for key, weight in matrices.items()}
            weights = sum(weight.numel() for weight in matrices.values())
            bits = sum(formula[key] * weight.numel() for key, weight in matrices.items()) / weights
            nbits, group = bits_setting_at_least(bits)
            found = {"vector": config.vq.vector, "codebook_bits": config.vq.codebook_bits,
                     "residual_bits": config.vq.residual_bits, "formula_bits_per_weight": bits,
                     "calibration_positions": positions}
        encode_s = time.perf_counter() - started
        decoded = {key: decode(code) for key, code in codes.items()}
        tensors = {}
        for key, weight in matrices.items():
            baselines = {"rtn": round_to_nearest(weight, nbits, group), "hqq": hqq(weight, nbits, group)}
            tensors[key] = {
                "shape": list(weight.shape), "formula_bits_per_weight": formula[key],
                "payload_bits_per_weight": 8 * codes[key].payload_bytes() / weight.numel(),
                "relative_error": {coder: relative_error(decoded[key], weight),
                                   **{label: relative_error(q, weight) for label, q in baselines.items()}},
                "decode_is_exact": bool(torch.equal(decode(codes[key]), decoded[key]))}
            if coder == "vq":  # VQ's own objective: the error of the layer's output on the calibration inputs
                tensors[key]["output_relative_error"] = {
                    label: output_relative_error(q, weight, hessians[key])
                    for label, q in {coder: decoded[key], **baselines}.items()}
                identity = torch.equal(hessians[key], torch.eye(len(hessians[key]), dtype=hessians[key].dtype))
                tensors[key]["hessian"] = "identity: no linear layer reads it" if identity else "its readers' inputs"
        report = {**found, "encode_s": encode_s, "tensors": tensors,
                  "baselines": {"nbits": nbits, "group": group, "bits_per_weight": baseline_bits_per_weight(nbits, group)}}
        return codes, decoded, report

    def _hessians(self, model, keys: list[str], tokenizer, config: CompressionConfig) -> tuple[dict, int]:
        """VQ's input Hessians from calibration_rows train-split rows of each skill, and the positions counted."""
        length = model.config.max_position_embeddings
        rows = [row for skill in skill_rows(tokenizer, "train", config.calibration_rows, length, config.seed,
                                            text_chars=config.calibration_rows * length * 8).values()
                for row in skill[:config.calibration_rows]]
        input_ids, attention_mask, _ = collate(rows, tokenizer.pad_token_id)
        return input_hessians(model, keys, input_ids, attention_mask), int(attention_mask.sum())

    def _entropy(self, model) -> tuple[dict, dict]:
        codes, layers = {}, {}
        for name, layer in bit_linears(model):
            trits, _ = ternarize(layer.weight.detach())
            coded = encode_trits(trits)
            if not torch.equal(decode_trits(coded), trits):
                raise AssertionError(f"the range code of {name} does not decode to its trits")
            base3_bytes = BASE3.packed_bytes(trits.numel())
            kept = coded.payload_bytes() < base3_bytes
            if kept:
                codes[name] = coded
            layers[name] = {"weights": trits.numel(), "zeros": float((trits == 0).float().mean()),
                            "entropy_bits_per_weight": entropy_bits(coded.counts) / trits.numel(),
                            "range_coded_bits_per_weight": 8 * coded.payload_bytes() / trits.numel(),
                            "base3_bits_per_weight": 8 * base3_bytes / trits.numel(), "range_coded": kept}
        weights = sum(layer["weights"] for layer in layers.values())
        total = {key: sum(layer[key] * layer["weights"] for layer in layers.values()) / weights
                 for key in ("entropy_bits_per_weight", "range_coded_bits_per_weight", "base3_bits_per_weight", "zeros")}
        return codes, {"layers": layers, "all_layers": {"weights": weights, **total}}

    def _sizes(self, model, compressed_path: Path) -> dict:
        with tempfile.TemporaryDirectory() as folder:
            packed_path = Path(folder) / PACKED_FILE
            packed_path.write_bytes(pack_model(model, BASE3))
            packed = packed_size_report(packed_path)
        compressed = compressed_size_report(compressed_path)
        return {"input_packed": packed, "compressed": compressed,
                "ratio": packed["file_bytes"] / compressed["file_bytes"]}

    def _test(self, model, rebuilt, candidates: dict, kept_coders: set[str], report: dict, tokenizer,
              config: CompressionConfig, progress: ProgressFn) -> dict:
        spec = config.scorecard
        progress(0.55, "test: the input")
        cards = {"input": score(model, tokenizer, spec)}
        progress(0.65, "test: the compressed model")
        cards["output"] = score(rebuilt, tokenizer, spec)
        baselines, versus = [], {}
        matrices = float_matrices(model, config.float_matrices)
        for coder, candidate in candidates.items():
            setting = report[coder]["baselines"]
            keys = sorted(report[coder]["tensors"])
            # Every coder that ran coded the same matrices (a kept coder leaves none to the next), so cards
            # named by their bits alone are the same baseline for each.
            assert all(sorted(report[other]["tensors"]) == keys for other in candidates), "coders coded different matrices"
            names = {label: f"{label} {setting['bits_per_weight']:g} bits" for label in ("rtn", "hqq")}
            for label, quantize in (("rtn", round_to_nearest), ("hqq", hqq)):
                if names[label] not in cards:
                    progress(0.75, f"test: {names[label]}")
                    quantized = {key: quantize(matrices[key], setting["nbits"], setting["group"]) for key in keys}
                    cards[names[label]] = score(with_matrices(model, quantized), tokenizer, spec)
                    baselines.append(names[label])
            coded = "output" if coder in kept_coders else coder
            if coded not in cards:  # rolled back: its candidate is still what the baselines are compared with
                progress(0.9, f"test: the rolled-back {coder} candidate")
                cards[coder] = score(candidate, tokenizer, spec)
                baselines.append(coder)
            versus[coder] = {"card": coded, "baselines": {label: names[label] for label in ("rtn", "hqq")},
                             **{label: {metric: paired_difference(cards[coded], cards[names[label]], metric)
                                        for metric in (MEAN_METRIC, TEXT_METRIC) if metric in cards[coded]["metrics"]}
                                for label in ("rtn", "hqq")}}
        against = {name: compare(card, cards["input"]) for name, card in cards.items() if name != "input"}
        return {"against_input": against, "against_baselines": versus,
                "scorecard": report_section(spec, cards, inputs=["input"], outputs=["output"], baselines=baselines)}


@torch.no_grad()
def _logits_difference(expected_model, model, tokenizer) -> float:
    batch = torch.randint(0, len(tokenizer), (2, 32), generator=torch.Generator().manual_seed(0))
    return float((expected_model(batch).logits - model(batch).logits).abs().max())


def _summary(report: dict) -> dict:
    sizes = report["sizes"]
    summary = headline_figures(report["scorecard"]["cards"])
    summary["stages"] = {s["stage"]: "skipped" if "skipped" in s else "kept" if s["passed"] else "rolled back"
                         for s in report["stages"]}
    summary["input_packed_bytes"] = sizes["input_packed"]["file_bytes"]
    summary["compressed_bytes"] = sizes["compressed"]["file_bytes"]
    summary["output_relation_to_input"] = report["against_input"]["output"]["relation"]
    summary["rebuilt_logits_max_abs_diff"] = report["rebuilt_logits_max_abs_diff"]
    summary["gguf_bytes"] = report["gguf"]["file_bytes"]
    llama = report["gguf"]["llama_cpp"]
    summary["llama_cpp_top1_agreement"] = llama.get("top1_agreement", f"not measured: {llama.get('why')}")
    return summary
