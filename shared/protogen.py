"""Generate the Python gRPC code from ``protos/`` into ``shared/pb`` (not committed).

``python -m shared.protogen`` (``make protos``). The generated modules import each other as
``shared.pb.acestep.<service>.v1``; protoc writes ``acestep.<service>.v1`` imports, so they are
rewritten after generation.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = REPO_ROOT / "protos"
OUT_ROOT = REPO_ROOT / "shared" / "pb"
_IMPORT = re.compile(r"^from acestep\.", re.MULTILINE)


def generate() -> list[Path]:
    """Run protoc on every .proto file and return the generated Python files."""
    from grpc_tools import protoc  # build-time dependency only

    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={OUT_ROOT}",
        f"--pyi_out={OUT_ROOT}",
        f"--grpc_python_out={OUT_ROOT}",
        *map(str, protos),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    generated = sorted(OUT_ROOT.rglob("*_pb2*.py*"))
    for path in generated:
        path.write_text(_IMPORT.sub("from shared.pb.acestep.", path.read_text()))
    for folder in {p.parent for p in generated}:
        while folder != OUT_ROOT:
            (folder / "__init__.py").touch()
            folder = folder.parent
    return generated


def main() -> int:
    files = generate()
    print(f"generated {len(files)} files under {OUT_ROOT.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
