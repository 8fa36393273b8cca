"""Regenerates protos/*_pb2.py and *_pb2_grpc.py from protos/*.proto (needs grpcio-tools).

    python protos/generate.py            # rewrite the generated files in protos/
    python protos/generate.py --out DIR  # write them into DIR instead (used by the test)

The .proto files are copied into a temporary tree ``asyncps/protos/`` that serves as the include
root, so the generated code imports ``from asyncps.protos import tensor_pb2`` and the protos
import each other as ``import "asyncps/protos/tensor.proto"``.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def generate(out_dir: Path) -> list[Path]:
    """Runs protoc on every .proto next to this file; returns the files written into out_dir."""
    from grpc_tools import protoc  # imported here: only this script needs grpcio-tools

    protos = sorted(HERE.glob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tree = root / "asyncps" / "protos"
        tree.mkdir(parents=True)
        for proto in protos:
            shutil.copy(proto, tree / proto.name)
        names = [f"asyncps/protos/{p.name}" for p in protos]
        include = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto
        args = ["protoc", f"-I{root}", f"-I{include}", f"--python_out={root}", f"--grpc_python_out={root}"]
        if protoc.main(args + names) != 0:
            raise RuntimeError("protoc failed on " + ", ".join(names))
        written = []
        for src in sorted(tree.glob("*_pb2*.py")):
            dst = out_dir / src.name
            shutil.copy(src, dst)
            written.append(dst)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="directory for the generated files")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
