"""The layering rule (docs/architecture.md), enforced: which layer may import which.

    core/     pure scheduling and memory: imports no torch and nothing above it
    engine/   front-ends and the engine core: imports no torch (device work is behind executor/)
    model/    the network: knows no requests (nothing from core/, engine/ or the executor)

Checked two ways: every import statement of a layer's files (the direct rule), and, for core/,
a fresh interpreter that imports all of it and must not have loaded torch (the whole closure).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pagedllm"

ABOVE_CORE = ("engine", "executor", "worker", "model", "attention", "ops", "entrypoints",
              "structured_output", "bench", "platform", "tokenizer")
RULES = {
    # layer: (forbidden top-level modules, forbidden pagedllm subpackages)
    "core": ({"torch", "transformers", "numpy"}, ABOVE_CORE),
    "engine": ({"torch"}, ("worker", "model", "attention", "ops")),
    "model": (set(), ("core", "engine", "executor", "worker", "entrypoints")),
}


def imported_modules(path: Path) -> list[str]:
    """Every module a file imports, at any depth (function-local imports count too)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def violations(layer: str) -> list[str]:
    top_level, subpackages = RULES[layer]
    found = []
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for name in imported_modules(path):
            parts = name.split(".")
            bad = parts[0] in top_level or (
                parts[0] == "pagedllm" and len(parts) > 1 and parts[1] in subpackages)
            if bad:
                found.append(f"{path.relative_to(PACKAGE.parent)} imports {name}")
    return found


@pytest.mark.parametrize("layer", sorted(RULES))
def test_layer_imports_follow_the_rule(layer):
    assert violations(layer) == []


def test_the_rule_catches_a_wrong_way_import(tmp_path, monkeypatch):
    """The checker itself: a core module importing torch, or the engine, is reported."""
    fake = tmp_path / "pagedllm"
    (fake / "core").mkdir(parents=True)
    (fake / "core" / "bad.py").write_text("import torch\nfrom pagedllm.engine.core import X\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert len(violations("core")) == 2


def test_core_loads_without_torch():
    modules = sorted(p.stem for p in (PACKAGE / "core").glob("*.py") if p.stem != "__init__")
    code = ("import sys\n" + "".join(f"import pagedllm.core.{m}\n" for m in modules)
            + "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
            + "assert not heavy, heavy\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
