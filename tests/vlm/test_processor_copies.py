"""A model folder must carry its own remote code, so the image-only processors live in toolkit/vlm/ AND in each
shipped model folder. The copies must stay byte-identical to the source (an edit to one alone would make vLLM
and the learner process images differently)."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COPIES = sorted((ROOT / "assets").rglob("processing_image_only*.py"))


def test_there_are_copies_to_check():
    assert len(COPIES) >= 4


@pytest.mark.parametrize("copy", COPIES, ids=lambda p: str(p.relative_to(ROOT)))
def test_each_shipped_copy_equals_the_toolkit_source(copy):
    assert copy.read_bytes() == (ROOT / "toolkit" / "vlm" / copy.name).read_bytes()
