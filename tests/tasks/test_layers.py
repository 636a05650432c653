"""Tasks sit below the client and the coordinator: they never import client, server,
simulations, transport or cli (not even lazily)."""

from __future__ import annotations

import ast
from pathlib import Path

import fedsafe

HIGHER = ("client", "server", "simulations", "transport", "cli", "flower_apps")


def test_tasks_import_no_higher_layer() -> None:
    tasks = Path(fedsafe.__file__).resolve().parent / "tasks"
    offenders = []
    for path in sorted(tasks.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] == "fedsafe" and len(parts) > 1 and parts[1] in HIGHER:
                    offenders.append(f"{path.name}: {name}")
    assert offenders == []
