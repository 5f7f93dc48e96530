"""The folder tree is the architecture: each layer of detkit imports only from layers below
it (DESIGN.md, Layout), and nothing imports the CLI. Checked on the source (every import
statement, also the ones inside functions), so a lazy import cannot sneak a cycle in."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "detkit"

# Layer of each top-level part of detkit; an import may only go to a strictly lower layer or
# stay inside its own part (detkit.data.voc -> detkit.data.io). data and evaluation are side
# by side: neither imports the other.
LAYERS = {
    "errors": 0,
    "structures": 0.1,
    "config": 0.1,
    "visualize": 0.1,
    "schema": 0.5,  # built on config
    "evaluation": 1,
    "data": 1,
    "modeling": 2,
    "engine": 3,
    "cli": 4,
    "__main__": 5,
}


def _part(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "__init__"


def _imports(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("detkit."):
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "detkit":
                for alias in node.names:
                    yield node.lineno, f"detkit.{alias.name}"
            elif node.module.startswith("detkit."):
                yield node.lineno, node.module


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    return ".".join(rel.parts)


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


def test_every_part_has_a_layer():
    parts = {
        p.name.removesuffix(".py") for p in PACKAGE.iterdir() if not p.name.startswith("__") or p.name == "__main__.py"
    }
    parts.discard("__pycache__")
    assert parts - set(LAYERS) == set(), "give new top-level modules a layer in tests/test_layers.py"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_down(path):
    me = _part(_module_name(path))
    bad = []
    for line, target in _imports(path):
        other = _part(target)
        if other == me:
            continue
        if other not in LAYERS or LAYERS[other] >= LAYERS[me]:
            bad.append(f"line {line}: {target} (layer {LAYERS.get(other)}) from {me} (layer {LAYERS[me]})")
    assert not bad, "\n".join(bad)


def test_the_layer_check_can_fail(tmp_path, monkeypatch):
    """A data module importing the engine is reported."""
    fake = PACKAGE / "data" / "voc.py"
    src = fake.read_text(encoding="utf-8") + "\nfrom detkit.engine.trainer import Trainer\n"
    bad_file = tmp_path / "detkit" / "data" / "voc.py"
    bad_file.parent.mkdir(parents=True)
    bad_file.write_text(src, encoding="utf-8")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", tmp_path / "detkit")
    with pytest.raises(AssertionError, match="detkit.engine.trainer"):
        test_imports_go_down(bad_file)
