"""Imports only point down (issue 16): every runtime module imports only modules
of the layers below its own (shimv2.layers, ARCHITECTURE.md's list), at module
level or inside functions, and never the tools.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from shimv2.layers import LAYERS, TOOLS

PACKAGE = Path(__file__).resolve().parents[2] / "shimv2"
RANK = {name: rank for rank, layer in enumerate(LAYERS) for name in layer}


def module_name(path: Path) -> str:
    """``cli``, ``ttrpc.client``: a package is named by its own name, the root ``__init__``."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def is_tool(name: str) -> bool:
    return any(name == tool or name.startswith(tool + ".") for tool in TOOLS)


def runtime_modules() -> dict[str, Path]:
    found = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    return {n: p for n, p in found.items() if not is_tool(n) and n.split(".")[0] != "api"}


def _exists(name: str) -> bool:
    base = PACKAGE.joinpath(*name.split("."))
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def imported(name: str, source: str) -> set[str]:
    """The shimv2 modules ``source`` (module ``name``) imports, anywhere in it."""
    package = name.split(".")[:-1] if name != "__init__" else []
    if name != "__init__" and (PACKAGE.joinpath(*name.split(".")) / "__init__.py").exists():
        package = name.split(".")  # a package's __init__: relative to itself
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            bases = [alias.name for alias in node.names]
            candidates = [b.split(".", 1)[1] if "." in b else "" for b in bases if _ours(b)]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                up = package[: len(package) - node.level + 1]
                base = ".".join([*up, *([node.module] if node.module else [])])
            elif node.module and _ours(node.module):
                base = node.module.partition(".")[2]
            else:
                continue
            # `from shimv2 import cli`: a module; `from shimv2.cli import main`: a name
            subs = [f"{base}.{a.name}".lstrip(".") for a in node.names]
            candidates = [s for s in subs if _exists(s)] or [base]
        else:
            continue
        found.update(c or "__init__" for c in candidates)
    return found


def _ours(module: str) -> bool:
    return module == "shimv2" or module.startswith("shimv2.")


def rank(name: str) -> int | None:
    while name:
        if name in RANK:
            return RANK[name]
        name = name.rpartition(".")[0]
    return None


def violations(name: str, source: str) -> list[str]:
    own = RANK[name]
    found = []
    for target in sorted(imported(name, source)):
        if is_tool(target):
            found.append(f"{name} imports the tool {target}")
            continue
        theirs = rank(target)
        if theirs is None:
            found.append(f"{name} imports {target}, which shimv2.layers does not list")
        elif theirs <= own:
            where = "its own layer" if theirs == own else "a layer above it"
            found.append(f"{name} imports {target}, of {where}")
    return found


def test_every_runtime_module_has_a_layer() -> None:
    assert sorted(set(runtime_modules()) - set(RANK)) == []
    assert sorted(n for n in RANK if n != "api" and n not in runtime_modules()) == []


@pytest.mark.parametrize(("name", "path"), runtime_modules().items())
def test_imports_point_down(name: str, path: Path) -> None:
    assert violations(name, path.read_text()) == []


def test_an_import_inside_a_function_counts() -> None:
    source = "def f():\n    from shimv2.cli import main\n    from shimv2.tools import stress\n"
    assert violations("manager", source) == [
        "manager imports cli, of a layer above it",
        "manager imports the tool tools.stress",
    ]
    assert violations("ttrpc.client", "from . import wire, server\n") == [
        "ttrpc.client imports ttrpc.server, of its own layer"
    ]


def test_the_runtime_never_loads_the_tools() -> None:
    """The daemon, the binary and what the fork server preloads (a fresh, isolated
    interpreter: nothing the tests imported)."""
    probe = (
        f"import sys; sys.path.insert(0, {str(PACKAGE.parent)!r})\n"
        "import json, shimv2.daemon, shimv2.cli, shimv2.forkserver\n"
        "shimv2.cli._preload()\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    modules = json.loads(out.stdout)
    assert "shimv2.daemon" in modules
    assert [m for m in modules if m.startswith("shimv2.") and is_tool(m[len("shimv2.") :])] == []


def test_the_stress_tool_keeps_its_first_name() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "shimv2.stress", "--help"],
        cwd=PACKAGE.parent,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert "--runtime" in out.stdout


def test_the_fork_server_imports_nothing_it_serves() -> None:
    """Stricter than the layers: cli hands it what it runs, as callables."""
    source = (PACKAGE / "forkserver.py").read_text()
    assert imported("forkserver", source) & {"cli", "debugview", "manager", "daemon"} == set()
