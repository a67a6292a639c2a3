"""Dependencies point one way (DESIGN.md): front-ends (assistant/cli, assistant/tui) → the rest of
`assistant` → `adapters` → `storage`. A back-end that imports a front-end is caught here, by reading the
source (every import, at any depth, including those inside functions)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FRONT_ENDS = ("assistant.cli", "assistant.tui")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import in a file; `from a import b` counts as `a.b` too, since
    `b` may be a module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module_name(path).split(".")[: None if path.name == "__init__.py" else -1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def sources(package: str, *, excluding: tuple[str, ...] = ()) -> list[Path]:
    return [p for p in sorted((ROOT / package).rglob("*.py"))
            if not any(module_name(p) == e or module_name(p).startswith(e + ".") for e in excluding)]


def within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def offenders(files: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    return [f"{p.relative_to(ROOT)}:{line} imports {name}"
            for p in files for line, name in imports(p) if within(name, forbidden)]


def test_the_walk_sees_imports_inside_functions():
    assert within("assistant.cli.adapt", FRONT_ENDS) and not within("assistant.client", FRONT_ENDS)
    daemon = ROOT / "assistant" / "daemon.py"
    assert any(name == "assistant.adaptation" for _, name in imports(daemon))   # imported inside a method


@pytest.mark.parametrize("package, excluding, forbidden", [
    # Back-ends never import a front-end (`python -m assistant` is the CLI's own launcher).
    ("assistant", FRONT_ENDS + ("assistant.__main__",), FRONT_ENDS),
    ("adapters", (), ("assistant",)),
    ("storage", (), ("assistant", "adapters")),
])
def test_no_back_end_imports_a_front_end_or_a_layer_above(package, excluding, forbidden):
    files = sources(package, excluding=excluding)
    assert files
    assert offenders(files, forbidden) == []
