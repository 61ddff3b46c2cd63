"""mergekit's YAML recipes, run by our merge methods: `agentforge merge CONFIG.yml OUT_DIR`.

A mergekit user's config runs unchanged, with mergekit's own defaults, where it uses what we support:
  merge_method  every method of merge_methods/ that mergekit also has, passthrough included
  models        [{model: local folder, parameters: {...}}]; the base_model may be listed among them
  slices        [{sources: [{model, layer_range: [start, end], parameters}], base_model, parameters}]:
                output slice after output slice, each merging layer start + i of each of its sources into
                the next output layer (passthrough: one source a slice, a frankenmerge)
  base_model    a local folder; required by the task-vector methods, refused by linear, karcher, passthrough
  parameters    top-level values, the defaults of every slice's and model's (the nearer one wins)
  dtype         float32, float16, bfloat16 (the output's, else the checkpoints' own; we merge in float32)
  tokenizer_source  "base" or a model folder; absent: the base model's, else the first model's
Values may be gradients (lists interpolated over a slice's layers: its layer i of n takes t = i / (n - 1),
t = 1 for a one-layer slice, tensors outside the layers t = 0) and per-tensor filters ([{filter: self_attn,
value: 0.5}, {value: 1.0}]: the first whose filter is in the tensor's name, or has none), as in mergekit
0.1.5. mergekit's boolean `rescale` maps to our "l1" (its L1-norm rescale) or "none"; our papers' 1/p
rescale stays available to our own recipes as rescale "paper". `int8_mask` changes only the dtype mergekit
holds its masks in, not the result, and is accepted. Anything else (modules, residual_weight, another field,
a model on the Hub) is refused, naming it: never silently ignored.

mergekit 0.1.5's semantics, which a config fed to both tools must get alike:
- `models` is one slice whose sources are the models over all their layers, the base model appended
  when it is not listed.
- The embeddings merge the first slice's sources with its parameters, the final norm and head the last
  slice's; output layers are numbered on through the slices, and num_hidden_layers is their count.
- Per-model values are looked up on the tensor's name in that source (a filter "layers.3." picks source
  layer 3), values for the whole merge on the output tensor's name.
- Random masks (DARE, DELLA) come from one generator seeded once (mergekit's --random-seed, ours
  --random-seed), tensor after tensor in the order mergekit merges them: by the greatest of their sources'
  tensor names. Two output tensors with the same greatest source name have no order in the config; a random
  method is refused there rather than guessed.
- Computation: mergekit computes in `dtype` (without one, in the checkpoints' dtype); we compute in float32
  and write that dtype. Equal for float32; for float16 and bfloat16 the weights differ by that precision's
  rounding, and more where a method picks entries (TIES, DARE, DELLA, SCE, Breadcrumbs): half-precision
  deltas and keep probabilities pick others. A warning says so when it happens.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from services.evomerge.merge_methods import MergeConfigError, UnknownMergeMethodError, get_method
from services.evomerge.merge_methods.base import StateDict, merge_tensor, work_dtype
from services.evomerge.merge_methods.passthrough import is_embedding, layer_index, layers_of, num_layers, renumbered

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
NO_BASE = ("linear", "karcher", "passthrough")  # mergekit methods that take their models as they are
RANDOM_METHODS = ("dare_linear", "dare_ties", "della", "della_linear")  # their masks follow the merge order
SHARED_FLAGS = ("int8_mask",)  # accepted, no effect on the numbers
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
LOG = logging.getLogger(__name__)


class MergekitModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, Any] = {}


class MergekitSource(BaseModel):
    """One model's layers [start, end) in an output slice."""

    model_config = ConfigDict(extra="forbid")
    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, Any] = {}


class MergekitSlice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sources: list[MergekitSource]
    base_model: str | None = None
    parameters: dict[str, Any] = {}

    @property
    def length(self) -> int:
        return self.sources[0].layer_range[1] - self.sources[0].layer_range[0]


class MergekitConfig(BaseModel):
    """The part of mergekit's MergeConfiguration that we run; extra="forbid" names whatever else a file has."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str
    models: list[MergekitModel] | None = None
    slices: list[MergekitSlice] | None = None
    base_model: str | None = None
    parameters: dict[str, Any] = {}
    dtype: str | None = None
    tokenizer_source: str | None = None

    @model_validator(mode="after")
    def _models_or_slices(self) -> MergekitConfig:
        if bool(self.models) == bool(self.slices):
            raise ValueError("give exactly one of `models` and `slices`, not empty")
        return self


def read_config(path: Path) -> MergekitConfig:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise MergeConfigError(f"cannot read {path}: {error}") from error
    if isinstance(raw, dict) and "modules" in raw:
        raise MergeConfigError(f"{path}: `modules` is not supported by agentforge merge; use `models:` or `slices:`")
    try:
        return MergekitConfig.model_validate(raw)
    except ValidationError as error:
        raise MergeConfigError(f"{path} is not a mergekit config we can run:\n{error}") from error


def setting(value: Any, tensor: str, t: float) -> Any:
    """A mergekit parameter value at one tensor: a scalar, a gradient over t, or per-tensor filters."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for condition in value:
            unknown = set(condition) - {"filter", "value"}
            if unknown:
                raise MergeConfigError(f"a parameter filter has fields {sorted(unknown)}; it takes filter and value")
            if condition.get("filter") in (None, "*") or condition["filter"] in tensor:
                return setting(condition["value"], tensor, t)
        return None
    if isinstance(value, list):
        if not value:
            return None
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return value[int(t * (len(value) - 1))]
        scaled = t * (len(value) - 1)
        low = int(scaled)
        high = min(len(value) - 1, low + 1)
        return (1 - (scaled - low)) * value[low] + (scaled - low) * value[high]
    return value


def check_layer_counts(slices: list[MergekitSlice]) -> None:
    for index, output_slice in enumerate(slices):
        lengths = {source.layer_range[1] - source.layer_range[0] for source in output_slice.sources}
        if len(lengths) != 1 or min(lengths) < 1:
            raise MergeConfigError(f"slices[{index}]: every source's layer_range must cover the same number of "
                                   f"layers, at least one; got {[list(s.layer_range) for s in output_slice.sources]}")


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the merged model: which tensor of each of its slice's sources it merges."""

    output: str  # its name in the merged model
    slice: int  # index of the output slice whose sources and parameters it takes
    inputs: tuple[str, ...]  # the tensor's name in each source of that slice, in the slice's order
    t: float  # where gradients are read: i / (n - 1) for layer i of a slice of n, 0 outside the layers

    @property
    def mergekit_order(self) -> str:
        """mergekit 0.1.5 merges tensors in the order of the greatest name among their inputs."""
        return max(self.inputs)


class MergekitRecipe:
    """A validated config: its slices (`models` as the one slice mergekit makes of them), which sources the
    method merges and which is the base, the plan of every output tensor and each one's parameters."""

    def __init__(self, config: MergekitConfig, root: Path = Path(".")) -> None:
        self.config, self.root = config, root
        try:
            self.method = get_method(config.merge_method)
        except UnknownMergeMethodError as error:
            raise MergeConfigError(f"merge_method: {error}") from None
        if config.dtype is not None and config.dtype not in DTYPES:
            raise MergeConfigError(f"dtype {config.dtype!r} is not supported; use one of {sorted(DTYPES)}")
        declared = {spec.name for spec in self.method.parameters}
        takes = declared | {"rescale"} if "rescale" in declared else declared
        for where, values in self._parameter_scopes():
            if unknown := set(values) - takes - set(SHARED_FLAGS):
                raise MergeConfigError(f"{config.merge_method} has no parameter {sorted(unknown)} (in {where}); "
                                       f"it takes {sorted(takes)}")
        check_layer_counts(config.slices or [])
        if config.slices and len(config.slices[0].sources) != len(config.slices[-1].sources):
            # mergekit 0.1.5 merges the final norm and head over as many sources as the first slice has.
            raise MergeConfigError("slices: the first and the last slice must have the same number of sources")
        for index, (models, base) in enumerate(self._slice_models()):
            where = f"slices[{index}]" if config.slices else "models"
            inputs, base_index = self.roles(models, base, where)
            self.method.check_inputs(len(inputs), base_index is not None)

    def _parameter_scopes(self) -> list[tuple[str, dict[str, Any]]]:
        scopes = [("parameters", self.config.parameters)]
        scopes += [(m.model, m.parameters) for m in self.config.models or []]
        for index, output_slice in enumerate(self.config.slices or []):
            scopes.append((f"slices[{index}].parameters", output_slice.parameters))
            scopes += [(f"slices[{index}] {s.model}", s.parameters) for s in output_slice.sources]
        return scopes

    def _slice_models(self) -> list[tuple[list[str], str | None]]:
        """(the models of each slice's sources, its base model): without loading anything."""
        base = self.config.base_model
        if self.config.models:
            listed = [m.model for m in self.config.models]
            return [(listed + ([base] if base is not None and base not in listed else []), base)]
        return [([s.model for s in output_slice.sources], output_slice.base_model or base)
                for output_slice in self.config.slices]

    def roles(self, models: list[str], base: str | None, where: str) -> tuple[list[int], int | None]:
        """Which of a slice's sources the method merges, in the order it takes them, and which is the base."""
        method = self.config.merge_method
        if len(set(models)) != len(models):
            raise MergeConfigError(f"{where}: a model is listed twice among {models}")
        if method in NO_BASE:
            if base is not None:
                raise MergeConfigError(f"{method} takes no base_model; remove it")
            return list(range(len(models))), None
        if method == "slerp":
            # mergekit's slerp: base_model is one of the two, and t = 0 gives it; ours takes (first, second).
            if base not in models or len(models) != 2:
                raise MergeConfigError(f"{where}: slerp needs base_model, one of its two models (t = 0 gives it)")
            return sorted(range(2), key=lambda i: models[i] != base), None
        if base is None:
            return list(range(len(models))), None
        if base not in models:
            raise MergeConfigError(f"{where}: base_model {base!r} is not among the slice's sources")
        return [i for i, model in enumerate(models) if model != base], models.index(base)

    def slices(self, layer_count: Callable[[str], int]) -> list[MergekitSlice]:
        if self.config.slices:
            return self.config.slices
        (models, _), = self._slice_models()
        parameters = {m.model: m.parameters for m in self.config.models}
        return [MergekitSlice(sources=[MergekitSource(model=model, layer_range=(0, layer_count(model)),
                                                      parameters=parameters.get(model, {})) for model in models])]

    def plan(self, weights: dict[str, StateDict]) -> tuple[list[MergekitSlice], list[PlannedTensor]]:
        """Every output tensor, in the merged model's order: embeddings, layer after layer, the rest."""
        slices = self.slices(lambda model: num_layers(weights[model]))
        check_layer_counts(slices)
        layers = {model: layers_of(state) for model, state in weights.items()}
        first, last = slices[0], slices[-1]
        outside = [name for name in weights[first.sources[0].model] if layer_index(name) is None]
        plan = [PlannedTensor(name, 0, (name,) * len(first.sources), 0.0) for name in outside if is_embedding(name)]
        output_layer = 0
        for index, output_slice in enumerate(slices):
            n = output_slice.length
            for offset in range(n):
                source_layers = [self._source_layer(layers, source, offset, index) for source in output_slice.sources]
                t = offset / (n - 1) if n > 1 else 1.0
                for rest, name in source_layers[0].items():
                    if any(rest not in layer for layer in source_layers):
                        raise MergeConfigError(f"slices[{index}]: {name} has no counterpart in every source")
                    inputs = tuple(layer[rest] for layer in source_layers)
                    plan.append(PlannedTensor(renumbered(name, output_layer), index, inputs, t))
                output_layer += 1
        plan += [PlannedTensor(name, len(slices) - 1, (name,) * len(last.sources), 0.0)
                 for name in outside if not is_embedding(name)]
        return slices, plan

    @staticmethod
    def _source_layer(layers: dict[str, dict[int, dict[str, str]]], source: MergekitSource, offset: int,
                      index: int) -> dict[str, str]:
        start, end = source.layer_range
        if not 0 <= start < end <= len(layers[source.model]):
            raise MergeConfigError(f"slices[{index}]: layer_range {[start, end]} of {source.model}, "
                                   f"which has {len(layers[source.model])} layers")
        return layers[source.model][start + offset]

    def params(self, tensor: PlannedTensor, output_slice: MergekitSlice, inputs: list[int]) -> dict[str, Any]:
        """The method's parameters at one tensor: a source's own values, then its slice's, then the top level."""

        def value(name: str, source: int | None) -> Any:
            scopes = [output_slice.parameters, self.config.parameters]
            if source is not None:
                model = output_slice.sources[source].model
                scopes = [s.parameters for s in output_slice.sources if s.model == model] + scopes
            tensor_name = tensor.output if source is None else tensor.inputs[source]
            for scope in scopes:
                if name in scope and (found := setting(scope[name], tensor_name, tensor.t)) is not None:
                    return found
            return None

        resolved = {}
        for spec in self.method.parameters:
            if spec.per_model:
                values = [value(spec.name, i) for i in inputs]
                if all(v is None for v in values):
                    continue
                if any(v is None for v in values) and spec.required:
                    missing = [output_slice.sources[i].model for i, v in zip(inputs, values) if v is None]
                    raise MergeConfigError(f"{self.config.merge_method}: {spec.name} is not given for {missing}")
                resolved[spec.name] = [spec.default if v is None else v for v in values]
            elif spec.name == "rescale":
                flag = value("rescale", None)
                # mergekit's defaults: DARE and DELLA rescale (its L1 norm) unless told not to.
                resolved[spec.name] = "l1" if flag is None or flag else "none"
            elif (found := value(spec.name, None)) is not None:
                resolved[spec.name] = found
        return resolved

    def merge(self, weights: dict[str, StateDict], seed: int) -> tuple[StateDict, list[int]]:
        """The merged weights, and for each output layer the source layer its config follows (the first
        source's). Tensors are merged in mergekit's order, drawing every random mask from one generator."""
        slices, plan = self.plan(weights)
        if self.config.merge_method in RANDOM_METHODS:
            orders = [tensor.mergekit_order for tensor in plan]
            if len(set(orders)) != len(orders):
                clash = next(order for order in orders if orders.count(order) > 1)
                raise MergeConfigError(f"slices: two output tensors have {clash} as the greatest of their sources' "
                                       f"tensor names, so mergekit's order between them (hence their "
                                       f"{self.config.merge_method} masks) is not set by the config; give each output "
                                       "layer a different highest source layer, or use a deterministic method")
        generator = torch.Generator().manual_seed(seed)
        merged = {}
        for tensor in sorted(plan, key=lambda planned: planned.mergekit_order):
            output_slice = slices[tensor.slice]
            models = [source.model for source in output_slice.sources]
            inputs, base = self.roles(models, output_slice.base_model or self.config.base_model, "slices")
            merged[tensor.output] = merge_tensor(
                self.method, tensor.output, [weights[models[i]][tensor.inputs[i]] for i in inputs],
                weights[models[base]][tensor.inputs[base]] if base is not None else None,
                self.params(tensor, output_slice, inputs), generator,
            )
        source_layers = [source.layer_range[0] + offset for s in slices for source in s.sources[:1]
                         for offset in range(s.length)]
        return {tensor.output: merged[tensor.output] for tensor in plan}, source_layers

    def models(self) -> list[str]:
        """Every model the config names, each once, in the order it first appears."""
        named = [model for models, base in self._slice_models() for model in [*models, base] if model is not None]
        return list(dict.fromkeys(named))

    def folder(self, reference: str) -> Path:
        path = Path(reference) if Path(reference).is_absolute() else self.root / reference
        if not (path / "config.json").is_file():
            raise MergeConfigError(f"model {reference!r} is not a local model folder (no config.json at {path}); "
                                   "agentforge merge reads local safetensors folders only")
        return path


def run_merge(config_path: Path, out_dir: Path, *, seed: int = 0) -> Path:
    """Merge as the mergekit config says and write a Hugging Face folder (safetensors, tokenizer) to out_dir."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from services.evomerge.recipe import load_weights, stacked_model_shell, weights_of

    config_path = Path(config_path)
    recipe = MergekitRecipe(read_config(config_path), root=config_path.parent)
    models = recipe.models()
    source = recipe.config.tokenizer_source
    if source not in (None, "base") and source not in models:
        raise MergeConfigError(f"tokenizer_source {source!r} is neither 'base' nor one of the models")
    folders = {model: recipe.folder(model) for model in models}
    stored = {model: weights_of(AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True, dtype="auto"))
              for model, folder in folders.items()}
    # mergekit's output config: the base model's, else a model's (ours: the first named), its layers counted anew;
    # its dtype: the config's, else the checkpoints' own.
    donor = recipe.config.base_model or models[0]
    dtype = DTYPES[recipe.config.dtype] if recipe.config.dtype else next(iter(stored[donor].values())).dtype
    if dtype in (torch.float16, torch.bfloat16):
        LOG.warning("agentforge merge computes in float32 and writes %s; mergekit computes in it: its weights differ "
                    "from these by its rounding, and more where the method picks entries by magnitude or mask",
                    str(dtype).removeprefix("torch."))
    weights = {model: {name: t.to(work_dtype(t)) for name, t in state.items()} for model, state in stored.items()}
    merged, source_layers = recipe.merge(weights, seed)
    output = stacked_model_shell(AutoConfig.from_pretrained(folders[donor]), source_layers)
    load_weights(output, merged)
    output.to(dtype).save_pretrained(out_dir, safe_serialization=True)
    tokenizer_from = folders[donor if source in (None, "base") else source]
    if any((tokenizer_from / name).is_file() for name in TOKENIZER_FILES):
        AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(out_dir)
    return Path(out_dir)


def merge_command(
    config: Path,
    out_dir: Path,
    random_seed: int = 0,
) -> None:
    """Run a mergekit YAML config with EvoMerge's merge methods (local model folders), writing an HF folder.
    --random-seed seeds DARE and DELLA masks as mergekit's --random-seed does: the same seed, the same masks."""
    import typer

    try:
        written = run_merge(config, out_dir, seed=random_seed)
    except MergeConfigError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    note = "" if (written / "tokenizer_config.json").is_file() else " (no tokenizer: its source folder has none)"
    typer.echo(f"merged {config} into {written}{note}")
