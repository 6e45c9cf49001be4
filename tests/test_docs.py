"""The README stays a front page: the two set-up commands first, at most 220 lines, every docs/ page linked, and no
relative link in the README or docs/ pointing at a file that is not there."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_the_readme_opens_with_the_two_set_up_commands_and_stays_short() -> None:
    readme = (REPO / "README.md").read_text()
    first_block = readme.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert first_block[0].endswith(".venv/bin/rlhf pipeline run --local")
    assert first_block[1].endswith(".venv/bin/python -m pytest")
    # CI runs the second command as written, on a clean clone; tests/test_demo_pipeline.py runs the first.
    assert first_block[1] in (REPO / ".ci" / "run").read_text()
    assert len(readme.splitlines()) <= 220


def test_every_docs_page_is_linked_from_the_readme_and_every_relative_link_resolves() -> None:
    readme = (REPO / "README.md").read_text()
    pages = sorted((REPO / "docs").glob("*.md"))
    assert pages and all(f"](docs/{page.name}" in readme for page in pages)
    broken = [
        f"{page.relative_to(REPO)}: {target}"
        for page in [REPO / "README.md", *pages]
        for target in LINK.findall(page.read_text())
        if "://" not in target and not (page.parent / target).exists()
    ]
    assert not broken, "broken links: " + ", ".join(broken)
