"""BitNet benchmark, printing measured figures: memory and tokens/s of the packed model beside the float one.

For each model preset (random initialisation: speed and memory do not depend on the weights' values) or
for a given pair of checkpoints (--float DIR --bitnet DIR, the latter holding bitnet-packed.safetensors):

  memory   bytes of the model's tensors (shared tensors counted once), and the size of each file;
  speed    prefill tokens/s (one forward of batch x length) and decode tokens/s (greedy generation with
           the KV cache), median of --repeats rounds in which every variant runs once (so a machine
           shared with other work slows all variants alike), torch on --threads threads.

Variants: float (nn.Linear), BitLinear in memory (fake quantization of latent float weights, as trained),
packed with weights unpacked on every call, packed with the unpacked weights cached.
    .venv/bin/python -m bench.bitnet --presets tiny small
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import shared  # noqa: F401  first: it sets the OpenMP wait policy before torch loads
import torch
from safetensors import safe_open

from shared.ternary.bitlinear import convert_to_bitnet
from shared.ternary.packed_model import load_packed, pack_model
from shared.ternary.packing import CODECS
from services.bitnet.phase import PACKED_FILE
from shared.checkpoint import load_checkpoint
from shared.models import build_model, get_preset

MB = 1024 * 1024


def tensor_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [m._unpacked for m in model.modules() if getattr(m, "_unpacked", None) is not None]
    for tensor in tensors:
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.nbytes
    return total


def interleaved_medians(jobs: dict, repeats: int) -> dict:
    """Median seconds of each job, timed in rounds (every job once a round) so load drift hits all alike."""
    for job in jobs.values():
        job()  # warm-up (and fills the unpack cache where there is one)
    times = {name: [] for name in jobs}
    for _ in range(repeats):
        for name, job in jobs.items():
            started = time.perf_counter()
            job()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}


def float_variant(float_model, folder: Path) -> dict[str, tuple[torch.nn.Module, int]]:
    float_model.save_pretrained(folder / "float")
    return {"float": (float_model, sum(p.stat().st_size for p in (folder / "float").glob("*.safetensors")))}


def packed_variants(path: Path, codec: str) -> dict[str, tuple[torch.nn.Module, int]]:
    size = path.stat().st_size
    return {f"packed {codec}, unpack per call": (load_packed(path), size),
            f"packed {codec}, unpacked cached": (load_packed(path, cache_unpacked=True), size)}


@torch.inference_mode()
def report(title: str, models: dict, vocab: int, args) -> None:
    ids = torch.randint(0, vocab, (args.batch, args.length), generator=torch.Generator().manual_seed(0))
    jobs = {}
    for name, (model, _) in models.items():
        model.eval()
        jobs[(name, "prefill")] = lambda m=model: m(input_ids=ids)
        jobs[(name, "decode")] = lambda m=model: m.generate(ids[:1, :8], max_new_tokens=args.new_tokens,
                                                            min_new_tokens=args.new_tokens, do_sample=False,
                                                            pad_token_id=0)
    seconds = interleaved_medians(jobs, args.repeats)
    print(f"\n== {title}: batch {args.batch} x {args.length} prefill, {args.new_tokens} decoded tokens, "
          f"{args.threads} threads, median of {args.repeats} interleaved rounds ==")
    print(f"{'variant':34} {'file MB':>8} {'tensors MB':>10} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for name, (model, file_bytes) in models.items():
        file_mb = f"{file_bytes / MB:8.2f}" if file_bytes else f"{'-':>8}"
        print(f"{name:34} {file_mb} {tensor_bytes(model) / MB:10.2f} "
              f"{args.batch * args.length / seconds[(name, 'prefill')]:14.0f} "
              f"{args.new_tokens / seconds[(name, 'decode')]:13.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="*", default=["tiny"])
    parser.add_argument("--float", dest="float_dir", type=Path, help="float checkpoint folder")
    parser.add_argument("--bitnet", dest="bitnet_dir", type=Path, help="BitNet phase output checkpoint folder")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.float_dir and args.bitnet_dir:
            float_forged, _ = load_checkpoint(args.float_dir)
            packed_path = args.bitnet_dir / PACKED_FILE
            with safe_open(str(packed_path), framework="pt") as f:
                codec = f.metadata()["codec"]
            models = {**float_variant(float_forged.model, Path(tmp)), **packed_variants(packed_path, codec)}
            report(f"{args.float_dir.name} vs {args.bitnet_dir.name}", models, float_forged.model.config.vocab_size, args)
            return
        for preset in args.presets:
            shape = get_preset(preset)
            folder = Path(tmp) / preset
            folder.mkdir()
            models = float_variant(build_model(shape, shape.vocab_size, seed=0), folder)
            bitnet_model = build_model(shape, shape.vocab_size, seed=0)
            convert_to_bitnet(bitnet_model)
            models["bitlinear (training form)"] = (bitnet_model, None)
            for codec in CODECS:
                path = folder / f"{codec}.safetensors"
                path.write_bytes(pack_model(bitnet_model, CODECS[codec]))
                models.update(packed_variants(path, codec))
            report(f"preset {preset} (random init)", models, shape.vocab_size, args)

if __name__ == "__main__":
    main()
