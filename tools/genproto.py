"""Generate shimv2/api/ from proto/ (python -m tools.genproto [--check]).

protoc writes absolute imports (``from containerd.types import mount_pb2``);
we rewrite the ones that point into proto/ so the generated modules live
inside the ``shimv2.api`` package. ``--check`` regenerates into a temporary
directory and exits 1 when the committed files differ (drift).
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
API_DIR = ROOT / "shimv2" / "api"
API_PACKAGE = "shimv2.api"
# Test-only wire types the shim never speaks (compiled by tests/e2e/cri/gen.py).
TEST_ONLY = {"cri"}


def _local_roots() -> set[str]:
    """Top-level import names that protoc generates from proto/ (not google.protobuf)."""
    return {p.name for p in PROTO_DIR.iterdir() if p.is_dir() and p.name not in TEST_ONLY}


def _rewrite_imports(source: str, roots: set[str]) -> str:
    def fix(match: re.Match[str]) -> str:
        module = match.group(1)
        if module.split(".")[0] in roots and not module.startswith("google.protobuf"):
            return f"from {API_PACKAGE}.{module} import"
        return match.group(0)

    source = re.sub(r"^from ([\w.]+) import", fix, source, flags=re.MULTILINE)
    # The module name given to the builder becomes each class's __module__.
    return re.sub(
        r"BuildTopDescriptorsAndMessages\(DESCRIPTOR, '([\w.]+)'",
        lambda m: f"BuildTopDescriptorsAndMessages(DESCRIPTOR, '{API_PACKAGE}.{m.group(1)}'",
        source,
    )


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc  # dev dependency only

    include = Path(protoc.__file__).parent / "_proto"
    protos = sorted(
        str(p.relative_to(PROTO_DIR))
        for p in PROTO_DIR.rglob("*.proto")
        if p.relative_to(PROTO_DIR).parts[0] not in TEST_ONLY
    )
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    roots = _local_roots()
    for path in [*out_dir.rglob("*_pb2.py"), *out_dir.rglob("*_pb2.pyi")]:
        path.write_text(_rewrite_imports(path.read_text(), roots))
    for directory in (d for d in out_dir.rglob("*") if d.is_dir()):
        (directory / "__init__.py").touch()
    (out_dir / "__init__.py").write_text(API_DOCSTRING)


API_DOCSTRING = '''"""Generated protobuf modules (``make proto`` from proto/); never edit by hand.

The messages of containerd's Task, Events and bootstrap APIs, runc and cgroup
options and metrics, ttrpc's frames and google.rpc.Status: what crosses a
socket or a file containerd reads. Nothing else belongs here.
"""
'''


def _tree(base: Path) -> set[str]:
    return {str(p.relative_to(base)) for p in base.rglob("*.py") if "__pycache__" not in p.parts}


def check() -> list[str]:
    """Return the generated files that differ from (or are missing in) shimv2/api."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        generate(out)
        expected, actual = _tree(out), _tree(API_DIR)
        drift = sorted(expected ^ actual)
        for name in sorted(expected & actual):
            if not filecmp.cmp(out / name, API_DIR / name, shallow=False):
                drift.append(name)
        return drift


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if shimv2/api drifted")
    args = parser.parse_args()
    if args.check:
        drift = check()
        if drift:
            print("shimv2/api is out of date with proto/:", *drift, sep="\n  ")
            return 1
        print("shimv2/api matches proto/")
        return 0
    for child in API_DIR.iterdir():
        if child.is_dir():
            shutil.rmtree(child)
        elif child.name != "__init__.py":
            child.unlink()
    generate(API_DIR)
    return 0


if __name__ == "__main__":
    sys.exit(main())
