"""docs/configs.md is generated from the schema (tools/config_docs.py) and must not go stale:
every schema key is listed with its type, default and a meaning."""

import dataclasses
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "configs.md"


@pytest.fixture(scope="module")
def config_docs():
    spec = importlib.util.spec_from_file_location("config_docs", ROOT / "tools" / "config_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configs_md_matches_the_schema(config_docs):
    assert DOC.read_text(encoding="utf-8") == config_docs.generate(), (
        "docs/configs.md is stale: run python tools/config_docs.py --out docs/configs.md"
    )


def test_every_key_is_documented_with_a_meaning(config_docs):
    text = config_docs.generate()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    for line in rows:
        meaning = line.rstrip("|").rsplit("|", 1)[1].strip()
        assert meaning, f"no meaning for {line.split('|')[1].strip()}: add a comment to its field in detkit/schema.py"
    # Every field of every section has its row, in the schema's order.
    expected = [f"| `{f.name}` |" for cls, _ in config_docs.sections() for f in dataclasses.fields(cls)]
    assert [line[: line.index("|", 2) + 1] for line in rows] == expected
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert "## `data.train` / `data.test`" in headings and "## `model.proposals.rpn`" in headings


def test_a_changed_schema_makes_the_doc_stale(config_docs, monkeypatch, tmp_path):
    """The check can fail: a new comment in the schema source changes the generated page."""
    src = config_docs.SCHEMA_FILE.read_text(encoding="utf-8")
    changed = src.replace("    max_iter: int = 1000", "    # a brand-new meaning\n    max_iter: int = 1000", 1)
    assert changed != src
    fake = tmp_path / "schema.py"
    fake.write_text(changed, encoding="utf-8")
    monkeypatch.setattr(config_docs, "SCHEMA_FILE", fake)
    text = config_docs.generate()
    assert "a brand-new meaning" in text and text != DOC.read_text(encoding="utf-8")
    assert config_docs.main(["--check", str(DOC)]) == 1


def test_types_and_defaults_are_the_schemas(config_docs):
    from detkit import schema

    text = config_docs.generate()
    assert f"| `max_iter` | int | `{schema.TrainConfig().max_iter}` |" in text
    assert f"| `metric` | one of 'voc07', 'voc', 'coco' | `{schema.TestConfig().metric}` |" in text
    sizes = ", ".join(f"[{s[0]:g}]" for s in schema.AnchorConfig().sizes)
    assert f"| `sizes` | list of list of float | `[{sizes}]` |" in text
    assert "| `pretrained` | str or null | `null` |" in text
