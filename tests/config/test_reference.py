"""docs/CONFIG_REFERENCE.md is generated from the schema and must be up to date."""

from __future__ import annotations

from _config_helpers import REPO

from toolkit.config.legacy import LEGACY
from toolkit.config.reference import render_reference
from toolkit.config.schema import ROOT
from toolkit.config.spec import Key, walk_spec

DOC = REPO / "docs" / "CONFIG_REFERENCE.md"


def test_committed_reference_is_current():
    assert DOC.read_text(encoding="utf-8") == render_reference(), (
        "docs/CONFIG_REFERENCE.md is stale: run `python -m toolkit.config.reference > docs/CONFIG_REFERENCE.md`"
    )


def test_every_key_and_legacy_entry_is_documented():
    text = render_reference()
    for path, node in walk_spec(ROOT):
        name = ".".join(path).replace(".[]", "[]")
        assert f"`{name}`" in text, name
        if isinstance(node, Key):
            assert node.doc.strip(), f"{name} has no description"
    for path in LEGACY:
        assert f"`{path}`" in text
