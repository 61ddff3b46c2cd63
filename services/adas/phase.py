"""Phase 7, ADAS: singular-value expert vectors (Transformer², Sun et al. 2025) and a search over their composition.

"ADAS" is the design's name for this phase; it is not Meta Agent Search (../shared/reference/adas-svf.md).
It takes the baked ternary model and hands on a ternary model. In order:

1. The SVD of every adapted latent weight, once (svf.py).
2. Why likelihood and not REINFORCE: per task family, the agreement of two independent batches' gradients
   under each objective, at the input (experts.gradient_agreement).
3. One expert per family (experts.py), trained on its training split, the best validation step kept.
4. The router (router.py) of adaptive inference, fitted on training inputs of the families.
5. Few-shot CEM (cem.py) over the mixing weights, on validation problems of the held-out family (a
   scorecard task no expert trained on).
6. NSGA-II (search.py) over which layer groups adapt and the mixing, on validation: task success, bits per
   byte, bytes and latency; the point handed on chosen from the front by `search.choose_by`.
7. The chosen composition folded into the latent weights: a stock BitNet checkpoint. The experts, their SVD
   factors and the router travel beside it (EXPERTS_FILE) for adaptive inference.
8. Report (test split): each expert against the input on its own family; on the held-out family the folded
   output, the few-shot composition and the routed model against every single expert; the whole scorecard
   of the input, the experts, the routed model and the output; the ternary check.
"""
from __future__ import annotations

import json
import statistics
import time

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator
from safetensors.torch import save

from services.adas.cem import CEMConfig, cem
from services.adas.experts import DEFAULT_FAMILIES, ExpertTraining, Family, gradient_agreement, train_expert
from services.adas.router import Router, features
from services.adas.search import SearchConfig, layer_groups, search
from services.adas.svf import Factors, adapted, compose, decompose, mixed_multipliers, multiplier, trainable_count
from shared.data.skills import text_documents
from shared.data.tasks import make_examples, worked_continuation
from shared.evaluation import bits_per_byte
from shared.phase import ForgedModel, Phase, PhaseConfig, PhaseResult, ProgressFn, no_progress, one_ternary_model
from shared.scorecard import (TEXT, TEXT_METRIC, ScorecardSpec, card_from_items, compare, paired_difference,
                              headline_figures, report_section, score, task_name, text_blocks)
from shared.ternary.bitlinear import bit_linears, ternarize, trainable_ternary
from shared.ternary.packed_model import PACKED_FILE, pack_model, ternary_check
from shared.ternary.packing import get_codec
from shared.training import collate, continuation_rows, encode_texts, row_nll

EXPERTS_FILE = "adas_experts.safetensors"
ROUTE_CHARS = 256  # a text input is routed on its first characters (a scorecard block is longer than the context)
LATENCY_REPEATS = 5


class AdasConfig(PhaseConfig):
    families: tuple[Family, ...] = DEFAULT_FAMILIES
    held_out: tuple[str, int] = ("modular", 1)  # a scorecard task no expert trains on
    targets: tuple[str, ...] = ()  # regexes of the ternary layers experts adapt; none: all of them
    experts: ExpertTraining = ExpertTraining()
    seq_len: int = Field(128, ge=8)
    router_inputs: int = Field(256, ge=8)  # training inputs per family
    gradient_batch: int = Field(64, ge=2)  # per batch of the objective measurement
    cem: CEMConfig = CEMConfig()
    search: SearchConfig = SearchConfig()
    packing: str = "base3"
    scorecard: ScorecardSpec = ScorecardSpec()

    @field_validator("families")
    @classmethod
    def _distinct(cls, families: tuple[Family, ...]) -> tuple[Family, ...]:
        names = [family.name for family in families]
        if len(families) < 2 or len(set(names)) != len(names):
            raise ValueError(f"ADAS needs at least two families with distinct names, got {names}")
        return families

    @model_validator(mode="after")
    def _held_out_is_unseen(self) -> AdasConfig:
        held_out = task_name(*self.held_out)
        if held_out in {task_name(s, lv) for f in self.families for s, lv in f.tasks}:
            raise ValueError(f"the held-out task {held_out} is one an expert trains on")
        if held_out not in {task_name(s, lv) for s, lv, _ in self.scorecard.tasks}:
            raise ValueError(f"the held-out task {held_out} is not on the scorecard")
        return self


def _text_inputs(split: str, n: int) -> list[str]:
    """n excerpts of the split's plays, ROUTE_CHARS characters each, for the router."""
    joined = "\n\n".join(text_documents(split))
    step = max(ROUTE_CHARS, (len(joined) - ROUTE_CHARS) // n)
    return [joined[i:i + ROUTE_CHARS] for i in range(0, step * n, step)][:n]


def family_inputs(family: Family, split: str, n: int, seed: int) -> list[str]:
    if family.text:
        return _text_inputs(split, n)
    return [e.prompt for suite, level in family.tasks for e in make_examples(suite, level, split, n, seed, allow_fewer=True)]


class AdasPhase(Phase):
    name = "adas"
    version = "1"
    Config = AdasConfig

    def figures(self, report: dict) -> list:
        """The training curves, and the search's front (figures.py)."""
        from services.adas.figures import front_figure

        return [*super().figures(report), *front_figure(report)]

    def transform(self, models: list[ForgedModel], config: AdasConfig, progress: ProgressFn = no_progress) -> PhaseResult:
        forged = one_ternary_model(models, self.name)
        tokenizer = forged.tokenizer
        model = trainable_ternary(forged.model).eval()
        held_out = task_name(*config.held_out)
        factors = decompose(model, config.targets)
        names = [family.name for family in config.families]
        report: dict = {"adapted_layers": list(factors), "trainable_per_expert": trainable_count(factors),
                        "sum_min_dimensions": sum(min(layer.weight.shape) for n, layer in bit_linears(model) if n in factors)}

        progress(0.0, "objective: gradient agreement")
        report["objective"] = {
            "used": "likelihood",
            "gradient_agreement": {f.name: gradient_agreement(model, tokenizer, factors, f, config.gradient_batch,
                                                              config.scorecard.max_new_tokens, config.scorecard.max_calls,
                                                              config.seed, config.experts.max_mult)
                                   for f in config.families}}

        experts, curves = [], {}
        for i, family in enumerate(config.families):
            z, curves[family.name] = train_expert(
                model, tokenizer, factors, family, config.experts, config.seq_len, config.seed + i,
                lambda f, m, i=i, name=family.name: progress(0.05 + 0.3 * (i + f) / len(names), f"expert {name}: {m}"))
            experts.append(z)
        report["experts"] = {"curves": curves}

        progress(0.35, "router")
        router = Router.fit({f.name: features(model, tokenizer, family_inputs(f, "train", config.router_inputs, config.seed))
                             for f in config.families}, config.seed)
        report["router"] = self._routing_accuracy(model, tokenizer, router, config)

        progress(0.4, f"few-shot CEM on {held_out}")
        shots = make_examples(*config.held_out, "validation", config.cem.shots, config.seed)
        shots_spec = ScorecardSpec(split="validation", text=False, seed=config.seed,
                                   tasks=((*config.held_out, config.cem.shots),))

        def few_shot(alpha: np.ndarray) -> tuple[float, float]:
            candidate = adapted(model, factors, mixed_multipliers(experts, alpha, config.experts.max_mult))
            card = score(candidate, tokenizer, shots_spec)
            return card["metrics"][f"{held_out}.task_success"]["value"], _answer_loglikelihood(candidate, tokenizer, shots)

        report["few_shot"] = {"task": held_out, **cem(few_shot, len(experts), config.cem, config.seed)}

        progress(0.5, "search")
        groups = layer_groups(list(factors))
        packed_bytes = len(pack_model(model, get_codec(config.packing)))
        search_spec = ScorecardSpec(split="validation", text=False, seed=config.seed,
                                    tasks=tuple((s, lv, config.search.problems) for s, lv in
                                                dict.fromkeys((s, lv) for f in config.families for s, lv in f.tasks)))
        blocks = text_blocks("validation")[: config.search.text_blocks]

        def composition(point: dict) -> dict:
            """The multiplier of every layer a point adapts (its groups' layers, the experts mixed by its alphas)."""
            mixed = mixed_multipliers(experts, list(point["alpha"].values()), config.experts.max_mult)
            return {layer: mixed[layer] for group in point["groups"] for layer in groups[group]}

        def measure(point: dict) -> dict:
            multipliers = composition(point)
            candidate = adapted(model, factors, multipliers)
            card = score(candidate, tokenizer, search_spec)
            return {"task_success": card["metrics"]["tasks.mean_task_success"]["value"],
                    "bits_per_byte": bits_per_byte(candidate, tokenizer, blocks)["bits_per_byte"],
                    "bytes": packed_bytes + sum(factors[layer].bytes() + 4 * len(experts) * factors[layer].rank
                                                for layer in multipliers),
                    "latency_ms": _adaptation_ms(factors, multipliers)}

        found = search(measure, list(groups), names, config.search, config.seed,
                       lambda f, m: progress(0.5 + 0.25 * f, m))
        chosen = found["points"][found["chosen"]]
        report["search"] = {**found, "groups": groups, "search_spec": search_spec.model_dump(mode="json")}
        output = adapted(model, factors, composition(chosen))

        progress(0.75, "test: scorecards")
        report.update(self._test(model, output, tokenizer, factors, experts, router, report["few_shot"]["alpha"],
                                 config, progress))
        report["ternary"] = ternary_check(model, output, config.packing,
                                          encode_texts(tokenizer, [blocks[0][:400]], config.seq_len), tokenizer.pad_token_id)
        report["summary"] = _summary(report)
        progress(1.0, "packed")
        with torch.no_grad():
            packed = pack_model(output, get_codec(config.packing))
        files = {PACKED_FILE: packed, EXPERTS_FILE: experts_file(factors, experts, names, router, chosen, config)}
        return PhaseResult(models=[ForgedModel(output, tokenizer, forged.name, forged.carried)], report=report,
                           extra_files={forged.name: files})

    def _routing_accuracy(self, model, tokenizer, router: Router, config: AdasConfig) -> dict:
        accuracy = {}
        for family in config.families:
            labels = router.route(features(model, tokenizer, family_inputs(family, "test", 128, config.seed)))
            accuracy[family.name] = sum(label == family.name for label in labels) / len(labels)
        held_out = [e.prompt for e in make_examples(*config.held_out, "test", 128, config.seed)]
        labels = router.route(features(model, tokenizer, held_out))
        routed = {name: labels.count(name) / len(labels) for name in router.labels}
        return {"test_accuracy": accuracy, "held_out_routed_to": routed}

    def _test(self, model, output, tokenizer, factors: dict[str, Factors], experts: list, router: Router,
              few_shot_alpha: list[float], config: AdasConfig, progress: ProgressFn) -> dict:
        spec = config.scorecard
        names = [f.name for f in config.families]
        cards = {"input": score(model, tokenizer, spec)}
        for i, (name, z) in enumerate(zip(names, experts, strict=True)):
            progress(0.75 + 0.15 * i / len(names), f"test: expert {name}")
            expert = adapted(model, factors, {layer: multiplier(v, config.experts.max_mult) for layer, v in z.items()})
            cards[f"expert.{name}"] = score(expert, tokenizer, spec)
        cards["output"] = score(output, tokenizer, spec)
        cards["routed"] = self._routed_card(model, tokenizer, router, cards, spec, config)
        held_out = task_name(*config.held_out)
        few_shot_model = adapted(model, factors, mixed_multipliers(experts, few_shot_alpha, config.experts.max_mult))
        few_shot_card = score(few_shot_model, tokenizer, spec.model_copy(
            update={"text": False, "tasks": tuple(t for t in spec.tasks if task_name(t[0], t[1]) == held_out)}))

        own = {}
        for family in config.families:
            card = cards[f"expert.{family.name}"]
            metrics = [TEXT_METRIC] if family.text else [f"{task_name(s, lv)}.task_success" for s, lv in family.tasks]
            own[family.name] = {m: paired_difference(card, cards["input"], m) for m in metrics}
            for m in metrics:
                own[family.name][m].update(value=card["metrics"][m]["value"], reference=cards["input"]["metrics"][m]["value"])
        metric = f"{held_out}.task_success"
        singles = {name: cards[f"expert.{name}"]["metrics"][metric]["value"] for name in names}
        best_single = max(singles, key=singles.get)
        versus = {}
        for label, card in (("output", cards["output"]), ("few_shot", few_shot_card), ("routed", cards["routed"])):
            difference = paired_difference(card, cards[f"expert.{best_single}"], metric)
            versus[label] = {"value": card["metrics"][metric]["value"], **difference,
                             "at_least_as_good": difference["difference"] >= 0}
        return {
            "own_family": own,
            "experts_beating_input": [n for n, d in own.items() if all(m["verdict"] == "better" for m in d.values())],
            "held_out": {"task": held_out, "single_experts": singles, "best_single": best_single, "against_best_single": versus},
            "against_input": {name: compare(card, cards["input"]) for name, card in cards.items() if name != "input"},
            "scorecard": report_section(spec, cards, inputs=["input"], outputs=["output"],
                                        baselines=[n for n in cards if n not in ("input", "output")]),
        }

    def _routed_card(self, model, tokenizer, router: Router, cards: dict, spec: ScorecardSpec, config: AdasConfig) -> dict:
        """Adaptive inference on the scorecard: each item answered by the expert the router picks for it (an
        item's result is that expert's own result on it)."""
        inputs = {task_name(s, lv): [e.prompt for e in make_examples(s, lv, spec.split, n, spec.seed)] for s, lv, n in spec.tasks}
        if spec.text:
            inputs[TEXT] = [block[:ROUTE_CHARS] for block in text_blocks(spec.split)]
        items = {}
        for item_set, texts in inputs.items():
            labels = router.route(features(model, tokenizer, texts))
            items[item_set] = {key: [cards[f"expert.{label}"]["items"][item_set][key][i] for i, label in enumerate(labels)]
                               for key in cards["input"]["items"][item_set]}
        return card_from_items(spec, cards["input"]["problems"], items)


@torch.no_grad()
def _answer_loglikelihood(model, tokenizer, examples) -> float:
    """Mean log-likelihood per token of the right worked answers (the CEM's tie-break)."""
    rows = continuation_rows(tokenizer, [e.prompt for e in examples], [worked_continuation(e) for e in examples])
    sums, counts = row_nll(model.eval(), *collate(rows, tokenizer.pad_token_id))
    return -float(sums.sum() / counts.sum())


@torch.no_grad()
def _adaptation_ms(factors: dict[str, Factors], multipliers: dict) -> float:
    """Median wall time of adaptive inference's second-pass set-up: compose and ternarize the adapted matrices."""
    times = []
    for _ in range(LATENCY_REPEATS):
        started = time.perf_counter()
        for layer, mult in multipliers.items():
            ternarize(compose(factors[layer], mult))
        times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times)


def experts_file(factors: dict[str, Factors], experts: list, names: list[str], router: Router, chosen: dict,
                 config: AdasConfig) -> bytes:
    """The extra file of adaptive inference (safetensors): per adapted layer its SVD factors (`{layer}.U`,
    `.S`, `.Vh`) and each expert's z (`expert.{name}.{layer}`), the router's weights; the metadata says the
    experts' order, the formula's max_mult, the router's feature and the chosen composition."""
    tensors = {}
    for layer, f in factors.items():
        tensors.update({f"{layer}.U": f.u, f"{layer}.S": f.s, f"{layer}.Vh": f.vh})
    for name, z in zip(names, experts, strict=True):
        tensors.update({f"expert.{name}.{layer}": v for layer, v in z.items()})
    tensors.update(router.tensors())
    metadata = {"experts": json.dumps(names), "max_mult": str(config.experts.max_mult),
                "router_labels": json.dumps(router.labels), "route_chars": str(ROUTE_CHARS),
                "router_feature": "mean last hidden state over the input's tokens, standardised",
                "chosen": json.dumps({"groups": chosen["groups"], "alpha": chosen["alpha"]}),
                "formula": "W' = U diag(S * m) Vh * sum(S) / sum(S * m), m = sum_k alpha_k sigmoid(z_k) * max_mult"}
    return save({k: v.contiguous() for k, v in tensors.items()}, metadata)


def _summary(report: dict) -> dict:
    summary = headline_figures(report["scorecard"]["cards"], ("input", "output", "routed"))
    summary["experts_beating_input"] = report["experts_beating_input"]
    summary["output_relation_to_input"] = report["against_input"]["output"]["relation"]
    summary["held_out"] = {label: f"{v['value']:.3f} vs best single {v['value'] - v['difference']:.3f}"
                           for label, v in report["held_out"]["against_best_single"].items()}
    chosen = report["search"]["points"][report["search"]["chosen"]]
    summary["chosen"] = {"groups": len(chosen["groups"]), **chosen["objectives"]}
    summary["front_size"] = len(report["search"]["front"])
    summary["packed_logits_max_abs_diff"] = report["ternary"]["packed_logits_max_abs_diff"]
    return summary
