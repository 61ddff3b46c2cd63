"""Generate the Python code for proto/agentforge/v1 into shared/contracts/agentforge/v1.

    python -m shared.contracts.generate          # rewrite the committed code
    python -m shared.contracts.generate OUT_DIR  # write elsewhere (the sync test compares the two)

protoc names imports after the proto path (`from agentforge.v1 import ...`); the code lives under
shared.contracts, so those imports are rewritten to `shared.contracts.agentforge.v1`. The proto file
names registered in the descriptor pool stay "agentforge/v1/*.proto", as buf and other languages see them.
"""
from __future__ import annotations

import re
import sys
import tempfile
from importlib.resources import files
from pathlib import Path

from grpc_tools import protoc

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "proto"
PACKAGE_DIR = Path("agentforge") / "v1"
GENERATED_ROOT = Path(__file__).resolve().parent
IMPORT_PREFIX = "shared.contracts."

_PROTOC_IMPORT = re.compile(r"^(from|import) agentforge\.v1\b", re.MULTILINE)


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))


def run_protoc(out_dir: Path, *extra_args: str) -> None:
    """Run protoc on every schema file (with the well-known types bundled in grpc_tools)."""
    well_known = str(files("grpc_tools") / "_proto")
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        *extra_args,
        *(str(p.relative_to(PROTO_ROOT)) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")


def generate(out_root: Path) -> list[Path]:
    """Write the generated modules under out_root/agentforge/v1 and return their paths."""
    with tempfile.TemporaryDirectory() as raw:
        raw_dir = Path(raw)
        run_protoc(raw_dir, f"--python_out={raw_dir}", f"--pyi_out={raw_dir}", f"--grpc_python_out={raw_dir}")
        target = out_root / PACKAGE_DIR
        target.mkdir(parents=True, exist_ok=True)
        written = []
        for source in sorted((raw_dir / PACKAGE_DIR).iterdir()):
            if source.name.endswith("_pb2_grpc.py") and "Stub" not in source.read_text():
                continue  # a schema without services: protoc still writes an empty grpc module
            text = _PROTOC_IMPORT.sub(rf"\1 {IMPORT_PREFIX}agentforge.v1", source.read_text())
            (target / source.name).write_text(text)
            written.append(target / source.name)
        for package in (out_root / "agentforge", target):
            (package / "__init__.py").touch()
        return written


def main(argv: list[str]) -> None:
    out_root = Path(argv[0]) if argv else GENERATED_ROOT
    for path in generate(out_root):
        print(path)


if __name__ == "__main__":
    main(sys.argv[1:])
