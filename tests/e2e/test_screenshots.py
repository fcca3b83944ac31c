"""The README shows exactly the pictures the browser journeys draw (no browser needed to check it).

The journeys write them to docs/screenshots on every run (``browser_support.save_screenshot``), so a picture
the README names but no journey draws would go stale, and one a journey draws but the README omits is lost.
"""
from __future__ import annotations

import re

from browser_support import ROOT, SCREENSHOTS

E2E = ROOT / "tests" / "e2e"


def drawn_by_journeys() -> set[str]:
    names = set()
    for f in E2E.glob("test_*.py"):
        names |= set(re.findall(r'save_screenshot\([^\n]*?,\s*"([\w-]+)"\)', f.read_text(encoding="utf-8")))
    return names


def shown_in_readme() -> set[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return set(re.findall(r"!\[[^\]]*\]\(docs/screenshots/([\w-]+)\.png\)", text))


def test_the_readme_shows_what_the_journeys_draw():
    drawn, shown = drawn_by_journeys(), shown_in_readme()
    assert {"overview", "layers", "search", "activations", "export", "compare", "report"} <= drawn
    assert shown == drawn, {"in the README, drawn by no journey": sorted(shown - drawn),
                            "drawn, not in the README": sorted(drawn - shown)}
    assert all((SCREENSHOTS / f"{n}.png").is_file() for n in shown)
    assert not set(re.findall(r"docs/screenshots/[\w-]+\.(?:jpg|jpeg|gif|svg)", (ROOT / "README.md").read_text()))
