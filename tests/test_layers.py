"""No lower layer of fedsafe imports a higher one (STYLE.md; issue 15).

Layers, lowest first: errors/config/durable_files -> privacy, compression, data, models ->
tasks, training -> client, server, transport -> simulations, reporting -> cli. Every import of
every module counts, at module level, inside functions (lazy) and under ``TYPE_CHECKING``: a
lazy import is the same dependency, paid later.
"""

from __future__ import annotations

import ast
from pathlib import Path

import fedsafe

PACKAGE = Path(fedsafe.__file__).resolve().parent

#: Each top-level module or package of fedsafe, by layer (0 = lowest). A new top-level module
#: must be placed here (the test fails until it is).
LAYERS: dict[str, int] = {
    "errors": 0,
    "config": 0,
    "durable_files": 0,
    "freed_memory": 0,  # glibc malloc_trim after one-off peaks (issue 17): no fedsafe imports
    "strict_json": 0,  # JSON writing without bare NaN/Infinity, used by every run file
    "protocol": 0,  # message keys shared by client and server: constants only
    "privacy": 1,
    "compression": 1,
    "data": 1,
    "models": 1,
    "tasks": 2,
    "training": 2,
    "client": 3,
    "server": 3,
    "transport": 3,
    "strategies": 3,  # Flower server strategies, built by the ServerApp
    "simulations": 4,
    "reporting": 4,
    "cli": 5,
    "flower_apps": 5,  # fedsafe.client_app(task) / server_app(task): Flower apps for users
    "__main__": 5,  # ``python -m fedsafe``: the CLI
    # The package itself (``fedsafe/__init__.py``) is the public facade above everything: it
    # may re-export any layer, and no module below it imports it (see _target).
    "__init__": 6,
}

#: Imports that climb, each with the reason it cannot be avoided. Keep it short.
ALLOWED: dict[tuple[str, str], str] = {
    # RunConfig validates its compression specs on creation (immutable values validated on
    # creation); the spec grammar is the compression package's. compression imports only
    # errors below it, so this is no cycle; moving the check out would let an invalid run
    # config exist until a site or the coordinator parses it.
    ("fedsafe.config", "fedsafe.compression"): "run config validates compression specs",
}


def _module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer_key(module: str) -> str:
    """The :data:`LAYERS` key of a fedsafe module name (``fedsafe`` itself: ``__init__``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _target(node: ast.ImportFrom, importer: str, is_package: bool) -> list[str]:
    """The fedsafe modules an ``from ... import ...`` reaches (relative imports resolved)."""
    if node.level:
        base = importer.split(".")
        base = base if is_package else base[:-1]
        base = base[: len(base) - (node.level - 1)]
        module = ".".join(base + ([node.module] if node.module else []))
    else:
        module = node.module or ""
    if module == "fedsafe":
        return [_package_name(a.name) for a in node.names]
    return [module]


def _package_name(name: str) -> str:
    """What ``fedsafe.<name>`` reaches.

    Package metadata (``__version__``, ``__file__``: no layer, nothing imported), a submodule
    (its layer), or a name of the facade (the top).
    """
    if name.startswith("__") and name.endswith("__"):
        return ""
    return f"fedsafe.{name}" if name in LAYERS else "fedsafe"


def _within(module: str, package: str) -> bool:
    """``module`` is ``package`` or inside it."""
    return module == package or module.startswith(package + ".")


def fedsafe_imports(path: Path, package: Path = PACKAGE) -> list[tuple[int, str]]:
    """Every (line, fedsafe module) imported anywhere in the file at ``path``."""
    importer = _module_name(path, package)
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name != "fedsafe"]
            if len(names) < len(node.names):
                # ``import fedsafe``: what it reaches is what the module reads from it.
                names += [
                    _package_name(n.attr)
                    for n in ast.walk(tree)
                    if isinstance(n, ast.Attribute)
                    and isinstance(n.value, ast.Name)
                    and n.value.id == "fedsafe"
                ]
        elif isinstance(node, ast.ImportFrom):
            names = _target(node, importer, path.name == "__init__.py")
        else:
            continue
        found += [(node.lineno, n) for n in names if n == "fedsafe" or n.startswith("fedsafe.")]
    return found


def climbs(package: Path = PACKAGE) -> list[str]:
    """``file:line: importer (layer) imports module (layer)`` for each import that climbs."""
    problems = []
    for path in sorted(package.rglob("*.py")):
        importer = _module_name(path, package)
        own = _layer_key(importer)
        if path.name == "__init__.py" and importer == "fedsafe":
            continue  # the facade
        if own not in LAYERS:
            problems.append(f"{path}: top-level module {own!r} has no layer in LAYERS")
            continue
        for line, module in fedsafe_imports(path, package):
            theirs = _layer_key(module)
            if theirs not in LAYERS:
                problems.append(f"{path}:{line}: imports {module}, which has no layer")
                continue
            allowed = any(_within(importer, a) and _within(module, b) for a, b in ALLOWED)
            if LAYERS[theirs] > LAYERS[own] and not allowed:
                problems.append(
                    f"{path.relative_to(package.parent)}:{line}: {importer} (layer "
                    f"{LAYERS[own]}) imports {module} (layer {LAYERS[theirs]})"
                )
    return problems


def test_no_module_imports_a_higher_layer() -> None:
    problems = climbs()
    assert not problems, "imports that climb the layers:\n" + "\n".join(problems)


def test_every_allowed_climb_still_exists() -> None:
    # An allow-list entry nothing needs any more is removed, not kept "just in case".
    used = set()
    for path in PACKAGE.rglob("*.py"):
        importer = _module_name(path)
        for _, module in fedsafe_imports(path):
            for a, b in ALLOWED:
                if _within(importer, a) and _within(module, b):
                    used.add((a, b))
    assert used == set(ALLOWED)


def _write(root: Path, relative: str, text: str) -> None:
    path = root / "fedsafe" / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_the_check_sees_lazy_relative_and_type_checking_imports(tmp_path: Path) -> None:
    _write(tmp_path, "__init__.py", "")
    _write(tmp_path, "privacy/__init__.py", "")
    _write(
        tmp_path,
        "privacy/audit.py",
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from fedsafe.client import app\n"
        "def f():\n    from ..training import loop\n    import fedsafe.cli.main\n",
    )
    _write(tmp_path, "training/__init__.py", "from fedsafe.privacy import audit\n")
    _write(tmp_path, "newthing.py", "")
    _write(
        tmp_path,
        "data/meta.py",
        "import fedsafe\nfrom fedsafe import __version__\nV = fedsafe.__file__\n"
        "def g():\n    from fedsafe import Task\n",
    )
    found = climbs(tmp_path / "fedsafe")
    text = "\n".join(found)
    assert "fedsafe.privacy.audit (layer 1) imports fedsafe.client (layer 3)" in text
    assert "audit.py:5: fedsafe.privacy.audit (layer 1) imports fedsafe.training (layer 2)" in text
    assert "imports fedsafe.cli.main (layer 5)" in text
    assert "'newthing' has no layer" in text
    # Package metadata is no climb; a name of the facade (``fedsafe.Task``) is.
    assert "meta.py:5: fedsafe.data.meta (layer 1) imports fedsafe (layer 6)" in text
    assert len(found) == 5  # training importing privacy goes down: fine
