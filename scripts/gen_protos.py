"""Regenerate the Python code for every .proto under protos/.

Run from anywhere: ``python scripts/gen_protos.py``. Code is generated from the repository
root (``-I .``) so imports read ``from protos.fleet.v1 import fleet_pb2``. The generator is
pinned (grpcio-tools, mypy-protobuf in the ``dev`` extra) so the output is reproducible and
``tests/test_protos_fresh.py`` can tell when the checked-in code is stale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Protos whose message names other libraries register too (Triton's, KServe's and
# MLServer's clients all define `inference.*`): their descriptors go into a private pool, so
# they coexist in one process (kserve#3099, MLServer#1730). Wire names do not change.
PRIVATE_POOL = ("protos/inference/",)
_DEFAULT_POOL = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
_PRIVATE_POOL = (
    "# edgefleet: a private descriptor pool (scripts/gen_protos.py says why).\n"
    "POOL = _descriptor_pool.DescriptorPool()\n"
    "DESCRIPTOR = POOL.AddSerializedFile("
)


def proto_files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in (root / "protos").rglob("*.proto"))


def generate(out_dir: Path, root: Path = ROOT) -> None:
    """Write *_pb2.py, *_pb2_grpc.py and their .pyi stubs for every proto into out_dir."""
    import grpc_tools
    from grpc_tools import protoc  # dev-only dependency

    include = Path(grpc_tools.__file__).parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{root}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *[str(p) for p in proto_files(root)],
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    for module in (out_dir / "protos").rglob("*_pb2.py"):
        if module.relative_to(out_dir).as_posix().startswith(PRIVATE_POOL):
            code = module.read_text()
            if _DEFAULT_POOL not in code:
                raise SystemExit(f"{module}: the generator's output changed; update gen_protos")
            module.write_text(code.replace(_DEFAULT_POOL, _PRIVATE_POOL))
    # Every folder from protos/ down to the generated modules must be a package.
    for module in (out_dir / "protos").rglob("*_pb2.py"):
        folder = module.parent
        while folder != out_dir:
            (folder / "__init__.py").touch(exist_ok=True)
            folder = folder.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.parse_args(argv)
    generate(ROOT)
    names = [str(p) for p in proto_files(ROOT)]
    print(f"generated code for {len(names)} protos: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
