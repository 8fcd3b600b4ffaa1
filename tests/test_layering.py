"""The folder tree draws the architecture; these rules keep it honest (read from the source with
ast, so a lazy import inside a function counts too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Leaf modules: they import nothing of ours, so any layer may use them.
LEAVES = {"orchestrator.errors", "orchestrator.text", "orchestrator.failpoints"}


def _module(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _ours(name: str) -> bool:
    return name.split(".")[0] in {"api", "orchestrator", "kernels", "refitd_client"}


def _imports(package: str) -> dict[str, set[str]]:
    """Every module under `package` and the modules of ours it imports."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package.replace(".", "/")).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
                # `from orchestrator.model import synthetic` imports a module too.
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
        found[_module(path)] = {n for n in names if _ours(n) and _is_module(n)}
    return found


def _is_module(name: str) -> bool:
    path = ROOT / name.replace(".", "/")
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


RULES = [
    # (package, what it may import of ours)
    ("kernels", ("kernels",)),
    ("orchestrator.model", ("kernels", "orchestrator.model", *LEAVES)),
    ("orchestrator.data", ("kernels", "orchestrator.data", *LEAVES)),
    (
        "orchestrator.state",
        ("orchestrator.state", "orchestrator.data", "orchestrator.settings", *LEAVES),
    ),
    (
        "orchestrator.rollout",
        (
            "orchestrator.rollout",
            "orchestrator.state",
            "orchestrator.data",
            "orchestrator.settings",
            *LEAVES,
        ),
    ),
    # The client runs in trainers: the data layer (flat buckets, IPC) and nothing of the service.
    ("refitd_client", ("refitd_client", "orchestrator.data", "kernels", *LEAVES)),
    ("orchestrator.errors", ()),
    ("orchestrator.text", ()),
    ("orchestrator.failpoints", ()),
]


@pytest.mark.parametrize(("package", "allowed"), RULES, ids=[r[0] for r in RULES])
def test_a_layer_imports_only_the_layers_below_it(package: str, allowed: tuple[str, ...]) -> None:
    if not (ROOT / package.replace(".", "/")).is_dir():
        imports = {package: _imports_of_file(package)}
    else:
        imports = _imports(package)
    wrong = {
        module: sorted(n for n in names if not _within(n, allowed) and n != "orchestrator")
        for module, names in imports.items()
    }
    assert {m: w for m, w in wrong.items() if w} == {}


def test_nothing_below_the_api_imports_it() -> None:
    for package in ("orchestrator", "kernels"):
        for module, names in _imports(package).items():
            assert not any(_within(n, ("api",)) for n in names), module


def test_only_refitctl_uses_the_client() -> None:
    users = {
        module
        for package in ("api", "orchestrator", "kernels")
        for module, names in _imports(package).items()
        if any(_within(n, ("refitd_client",)) for n in names)
    }
    assert users == {"orchestrator.ctl"}


def _imports_of_file(module: str) -> set[str]:
    path = ROOT / (module.replace(".", "/") + ".py")
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if _ours(n)}
