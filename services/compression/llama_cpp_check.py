"""llama.cpp on the exported GGUF (llama-cpp-python) against our model: next-token logits on the same token
ids, their top-1 agreement and each side's bits per byte, and llama.cpp's prefill and decode speed.

llama-cpp-python is optional: PyPI has only its source, and building llama.cpp takes about 20 minutes on 2
cores. `install_llama_cpp` builds it with uv into the running environment; uv keeps the built wheel in the
project's cache (Settings().cache_dir / "uv"), so a fresh environment installs it in seconds.
`llama_cpp_available` says whether it can be imported; callers report "not measured" with its reason.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch


LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"


def install_llama_cpp(timeout_s: float) -> str | None:
    """Build (or take from uv's cache) and install llama-cpp-python; None on success, else why it failed."""
    from shared.localinfra.uv import UvUnavailable, uv_binary, uv_env

    try:
        uv = uv_binary()
    except UvUnavailable as error:
        return str(error)
    env = {**uv_env(), "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
    # Offline first: uv takes the wheel it built before from its cache. Online it revalidates the index and,
    # on this project's machines, built llama.cpp again each time (about 4 minutes on 2 cores).
    for mode in (["--offline"], []):
        try:
            run = subprocess.run([uv, "pip", "install", "--quiet", *mode, "-p", sys.executable, LLAMA_CPP_PYTHON],
                                 env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return f"building {LLAMA_CPP_PYTHON} took more than {timeout_s:.0f} s"
        if run.returncode == 0:
            return llama_cpp_available()
    return f"uv could not install {LLAMA_CPP_PYTHON}: {run.stderr.strip()[-500:]}"


def llama_cpp_available() -> str | None:
    """None when llama_cpp imports, else why not."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as error:
        return f"llama-cpp-python is not installed ({error})"
    return None


def _llama(path: Path, n_ctx: int):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False,
                 n_threads=torch.get_num_threads(), n_batch=n_ctx)


def _bits(logits: np.ndarray, ids: list[int]) -> float:
    """Summed -log2 p(next token) over the window's predictions."""
    logits = torch.from_numpy(np.asarray(logits, dtype=np.float64))
    log_p = torch.log_softmax(logits[:-1], dim=-1)
    return float(-log_p[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum() / math.log(2))


@torch.no_grad()
def agreement(path: str | Path, model, tokenizer, texts: list[str], n_ctx: int) -> dict:
    """Per text, its first n_ctx tokens through both; top-1 agreement over every position, bits per byte of
    the predicted tokens' bytes on each side."""
    llm = _llama(Path(path), n_ctx)
    same = positions = 0
    ours_bits = theirs_bits = 0.0
    n_bytes = 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n_ctx]
        llm.reset()
        llm.eval(ids)
        theirs = np.array(llm.scores[: len(ids)])
        ours = model(torch.tensor([ids])).logits[0].double().numpy()
        same += int((theirs.argmax(-1) == ours.argmax(-1)).sum())
        positions += len(ids)
        ours_bits += _bits(ours, ids)
        theirs_bits += _bits(theirs, ids)
        n_bytes += len(tokenizer.decode(ids[1:]).encode("utf-8"))
    ours_bpb, theirs_bpb = ours_bits / n_bytes, theirs_bits / n_bytes
    return {"positions": positions, "top1_agreement": same / positions, "ours_bits_per_byte": ours_bpb,
            "llama_cpp_bits_per_byte": theirs_bpb, "bits_per_byte_relative_difference": theirs_bpb / ours_bpb - 1}


def speed(path: str | Path, prompt_ids: list[int], new_tokens: int, repeats: int = 3) -> dict:
    """Median prefill tokens/s (the prompt in one batch) and decode tokens/s (greedy, one token at a time)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=len(prompt_ids) + new_tokens, verbose=False,
                n_threads=torch.get_num_threads(), n_batch=len(prompt_ids) + new_tokens)  # scores has n_batch rows
    prefill, decode = [], []
    for _ in range(repeats):
        llm.reset()
        started = time.perf_counter()
        llm.eval(prompt_ids)
        prefill.append(len(prompt_ids) / (time.perf_counter() - started))
        started = time.perf_counter()
        for _ in range(new_tokens):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([token])
        decode.append(new_tokens / (time.perf_counter() - started))
    return {"prefill_tokens_per_s": float(np.median(prefill)), "decode_tokens_per_s": float(np.median(decode)),
            "prompt_tokens": len(prompt_ids), "new_tokens": new_tokens, "repeats": repeats,
            "threads": torch.get_num_threads()}
