"""The README and docs/ link only to files of the repository, and to headings those files have."""
import re
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def heading_anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces made hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    return {heading_anchor(line.lstrip("#")) for line in doc.read_text().splitlines() if line.startswith("#")}


def test_a_heading_anchor_is_githubs():
    assert heading_anchor(" RT-DETR → RT-DETR at the full schedule: what was tried") == \
        "rt-detr--rt-detr-at-the-full-schedule-what-was-tried"
    assert heading_anchor("Which distillation points (short runs)") == "which-distillation-points-short-runs"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_local_link_reaches_a_file_and_heading_of_the_repository(doc):
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (doc.parent / path).resolve() if path else doc
        assert linked.is_relative_to(REPO) and linked.exists(), f"{doc.name}: link {target!r} reaches no file here"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked), f"{doc.name}: link {target!r}: {linked.name} has no such heading"
