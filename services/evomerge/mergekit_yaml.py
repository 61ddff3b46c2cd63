"""mergekit's YAML recipes, run by our merge methods: `agentforge merge CONFIG.yml OUT_DIR`.

A mergekit user's config runs unchanged, with mergekit's own defaults, where it uses what we support:
  merge_method  every method of merge_methods/ that mergekit also has (passthrough needs slices: refused)
  models        [{model: local folder, parameters: {...}}]; the base_model may be listed among them
  base_model    a local folder; required by the task-vector methods, refused by linear and karcher
  parameters    top-level values, the defaults of every model's (the model's own win)
  dtype         float32, float16, bfloat16 (the output's; merging is done in float32)
  tokenizer_source  "base" or a model folder; absent: the base model's, else the first model's
Values may be gradients (lists interpolated over the layers: layer i of N takes t = i / (N - 1), tensors
outside the layers t = 0) and per-tensor filters ([{filter: self_attn, value: 0.5}, {value: 1.0}]: the
first whose filter is in the tensor's name, or has none), as in mergekit 0.1.5. mergekit's boolean
`rescale` maps to our "l1" (its L1-norm rescale) or "none"; our papers' 1/p rescale stays available to our
own recipes as rescale "paper". `int8_mask` changes only the dtype mergekit holds its masks in, not the
result, and is accepted. Anything else (slices, modules, another field, a model on the Hub) is refused,
naming it: never silently ignored.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from services.evomerge.merge_methods import MergeConfigError, UnknownMergeMethodError, get_method, merge_state_dicts
from services.evomerge.merge_methods.passthrough import layer_index

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
NO_BASE = ("linear", "karcher")  # mergekit methods that take their models as they are
SHARED_FLAGS = ("int8_mask",)  # accepted, no effect on the numbers
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


class MergekitModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, Any] = {}


class MergekitConfig(BaseModel):
    """The part of mergekit's MergeConfiguration that we run; extra="forbid" names whatever else a file has."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str
    models: list[MergekitModel]
    base_model: str | None = None
    parameters: dict[str, Any] = {}
    dtype: str | None = None
    tokenizer_source: str | None = None


def read_config(path: Path) -> MergekitConfig:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise MergeConfigError(f"cannot read {path}: {error}") from error
    if isinstance(raw, dict):
        for field in ("slices", "modules"):
            if field in raw:
                raise MergeConfigError(f"{path}: `{field}` is not supported by agentforge merge yet; use `models:`")
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


def layer_position(tensor: str, layers: int) -> float:
    index = layer_index(tensor)
    if index is None:
        return 0.0
    return index / (layers - 1) if layers > 1 else 1.0


class MergekitRecipe:
    """A validated config, as our method, its inputs and a per-tensor parameter callback."""

    def __init__(self, config: MergekitConfig, root: Path = Path(".")) -> None:
        self.config, self.root = config, root
        if config.merge_method == "passthrough":
            raise MergeConfigError("merge_method passthrough needs slices, which agentforge merge does not run yet")
        try:
            self.method = get_method(config.merge_method)
        except UnknownMergeMethodError as error:
            raise MergeConfigError(f"merge_method: {error}") from None
        base, listed = config.base_model, [m.model for m in config.models]
        if config.merge_method == "slerp":
            # mergekit's slerp: base_model is one of the two, and t = 0 gives it; ours takes (first, second).
            if base not in listed:
                raise MergeConfigError("slerp needs base_model, one of its two models (t = 0 gives it)")
            self.inputs, self.base = sorted(config.models, key=lambda m: m.model != base), None
        elif config.merge_method in NO_BASE:
            if base is not None:
                raise MergeConfigError(f"{config.merge_method} takes no base_model; remove it")
            self.inputs, self.base = list(config.models), None
        else:  # task vectors against the base, which may also be listed among the models
            self.inputs, self.base = [m for m in config.models if m.model != base], base
        declared = {spec.name for spec in self.method.parameters}
        takes = declared | {"rescale"} if "rescale" in declared else declared
        for where, values in [("parameters", config.parameters), *((m.model, m.parameters) for m in config.models)]:
            if unknown := set(values) - takes - set(SHARED_FLAGS):
                raise MergeConfigError(f"{config.merge_method} has no parameter {sorted(unknown)} (in {where}); "
                                       f"it takes {sorted(takes)}")
        if config.dtype is not None and config.dtype not in DTYPES:
            raise MergeConfigError(f"dtype {config.dtype!r} is not supported; use one of {sorted(DTYPES)}")

    def folder(self, reference: str) -> Path:
        path = Path(reference) if Path(reference).is_absolute() else self.root / reference
        if not (path / "config.json").is_file():
            raise MergeConfigError(f"model {reference!r} is not a local model folder (no config.json at {path}); "
                                   "agentforge merge reads local safetensors folders only")
        return path

    def params_for(self, layers: int):
        specs = {spec.name: spec for spec in self.method.parameters}

        def value(name: str, model: MergekitModel | None, tensor: str, t: float) -> Any:
            for source in ([model.parameters] if model else []) + [self.config.parameters]:
                if name in source and (found := setting(source[name], tensor, t)) is not None:
                    return found
            return None

        def params(tensor: str) -> dict[str, Any]:
            t = layer_position(tensor, layers)
            resolved = {}
            for name, spec in specs.items():
                if spec.per_model:
                    values = [value(name, m, tensor, t) for m in self.inputs]
                    if all(v is None for v in values):
                        continue
                    if any(v is None for v in values) and spec.required:
                        missing = [m.model for m, v in zip(self.inputs, values) if v is None]
                        raise MergeConfigError(f"{self.config.merge_method}: {name} is not given for {missing}")
                    resolved[name] = [spec.default if v is None else v for v in values]
                elif name == "rescale":
                    flag = value("rescale", None, tensor, t)
                    # mergekit's defaults: DARE and DELLA rescale (its L1 norm) unless told not to.
                    resolved[name] = "l1" if flag is None or flag else "none"
                elif (found := value(name, None, tensor, t)) is not None:
                    resolved[name] = found
            return resolved

        return params


def run_merge(config_path: Path, out_dir: Path, *, seed: int = 0) -> Path:
    """Merge as the mergekit config says and write a Hugging Face folder (safetensors, tokenizer) to out_dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config_path = Path(config_path)
    recipe = MergekitRecipe(read_config(config_path), root=config_path.parent)
    load = lambda ref: AutoModelForCausalLM.from_pretrained(recipe.folder(ref), use_safetensors=True,  # noqa: E731
                                                            torch_dtype=torch.float32)
    models = [load(m.model) for m in recipe.inputs]
    base = load(recipe.base) if recipe.base else None
    layers = models[0].config.num_hidden_layers
    merged = merge_state_dicts(recipe.method, [m.state_dict() for m in models],
                               base.state_dict() if base is not None else None, recipe.params_for(layers), seed=seed)
    output = models[0]
    output.load_state_dict(merged)
    dtype = DTYPES[recipe.config.dtype or "float32"]
    output.to(dtype).save_pretrained(out_dir, safe_serialization=True)
    source = recipe.config.tokenizer_source
    if source not in (None, "base") and source not in [m.model for m in recipe.config.models]:
        raise MergeConfigError(f"tokenizer_source {source!r} is neither 'base' nor one of the models")
    tokenizer_from = recipe.folder(recipe.base or recipe.inputs[0].model if source in (None, "base") else source)
    if any((tokenizer_from / name).is_file() for name in TOKENIZER_FILES):
        AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(out_dir)
    return Path(out_dir)


def merge_command(
    config: Path,
    out_dir: Path,
    seed: int = 0,
) -> None:
    """Run a mergekit YAML config with EvoMerge's merge methods (local model folders), writing an HF folder."""
    import typer

    try:
        written = run_merge(config, out_dir, seed=seed)
    except MergeConfigError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    note = "" if (written / "tokenizer_config.json").is_file() else " (no tokenizer: its source folder has none)"
    typer.echo(f"merged {config} into {written}{note}")


# --- the champion out, as mergekit YAML ------------------------------------------------------------------

RANDOM_METHODS = ("dare_linear", "dare_ties", "della", "della_linear")


def _tensor_filters(n_layers: int, n_groups: int) -> list[tuple[str, int]]:
    """(filter, layer group) covering every tensor the way recipe.group_of assigns them: each layer by its
    index (the trailing dot keeps layers.1. from matching layers.10.), embeddings with the first group,
    the final norm and the head with the last."""
    from services.evomerge.recipe import group_of

    by_layer = [(f"layers.{i}.", group_of(f"model.layers.{i}.x", n_layers, n_groups)) for i in range(n_layers)]
    return [*by_layer, ("embed_tokens", 0), ("model.norm.", n_groups - 1), ("lm_head", n_groups - 1)]


def _per_tensor(values: list[Any], filters: list[tuple[str, int]]) -> Any:
    """A value per layer group as mergekit filters; a plain value where every group has the same."""
    if all(value == values[0] for value in values):
        return values[0]
    return [{"filter": name, "value": values[group]} for name, group in filters]


def champion_as_mergekit(recipe, n_layers: int) -> tuple[dict | None, str]:
    """A parameter-space champion as a mergekit config (its models by parent name: put their folders there),
    and a note: what reproduces it, or why mergekit cannot."""
    from services.evomerge.recipe import ParameterSpaceRecipe

    if not isinstance(recipe, ParameterSpaceRecipe):
        return None, ("a data-flow champion stacks layers of several models along a path with crossing scales; "
                      "mergekit's passthrough slices copy layers but cannot scale the hidden state at a crossing")
    filters = _tensor_filters(n_layers, len(recipe.groups))
    groups = [{**recipe.shared, **group} for group in recipe.groups]
    method = get_method(recipe.method)
    per_model = {spec.name for spec in method.parameters if spec.per_model}
    rescale = {group.get("rescale", "paper") for group in groups} if "rescale" in {s.name for s in method.parameters} else set()
    if rescale - {"l1", "none"}:
        return None, (f"{recipe.method} with our papers' 1/p rescale: mergekit rescales by the L1 norm or not at all")
    models = []
    for index, name in enumerate(recipe.models):
        parameters = {key: _per_tensor([g[key][index] if isinstance(g[key], list) else g[key] for g in groups], filters)
                      for key in sorted(per_model) if key in groups[0]}
        models.append({"model": name, "parameters": parameters} if parameters else {"model": name})
    shared = {key: _per_tensor([g[key] for g in groups], filters) for key in sorted(groups[0]) if key not in per_model}
    if "rescale" in shared:
        shared["rescale"] = shared["rescale"] == "l1"
    config = {"merge_method": recipe.method, "models": models, "dtype": "float32"}
    if recipe.method == "slerp":
        config["base_model"] = recipe.models[0]
    elif recipe.base is not None:
        config["base_model"] = recipe.base
    if shared:
        config["parameters"] = shared
    if recipe.method in RANDOM_METHODS:
        return config, ("the same method and parameters; the random masks differ: mergekit draws them from one "
                        "global seed in its tensor order, ours from a seed per tensor name")
    return config, "reproduces the champion's weights (tested against mergekit 0.1.5 within 1e-6)"
