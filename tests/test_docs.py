"""What a newcomer reads: the README, the documentation site (docs/, MkDocs)
and the model card. They talk about the tool, its versions and dates, never
about how the project is worked on; their links and pictures exist."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CARD = ROOT / "bridge" / "weights" / "MODEL_CARD.md"
DOCS = ROOT / "docs"


def _texts() -> list[Path]:
    """Every page a reader sees: the README, the docs, the model card and the table it is made with."""
    return [README, CARD, ROOT / "scripts" / "card_candidates.md", *sorted(DOCS.rglob("*.md"))]


# "session" is a word of OMERO's (a logged-in OMERO session, its session key); anywhere else it would
# be about how the project was worked on.
SESSION = re.compile(r"sessions?\b", re.IGNORECASE)
OMERO_SENSE = re.compile(r"omero|session[\s_-]?keys?|sessions\skey", re.IGNORECASE)
# runs counted as the project went ("the fourth run", a numbered speed run), not versions or dates
# ("a second run adds nothing" is a user running a command again, and stays)
COUNTED_RUN = re.compile(
    r"\b(?:(?:third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|\d+th)(?: speed| AVX2)? runs?"
    r"|(?:first|second)(?: speed| AVX2) runs?)\b",
    re.IGNORECASE,
)


def _paragraph(text: str, at: int) -> str:
    start = text.rfind("\n\n", 0, at) + 2
    end = text.find("\n\n", at)
    return text[start : end if end >= 0 else len(text)]


def test_session_appears_only_in_omeros_meaning():
    found = []
    for path in _texts():
        text = path.read_text(encoding="utf-8")
        for m in SESSION.finditer(text):
            if not OMERO_SENSE.search(_paragraph(text, m.start())):
                line = text.count("\n", 0, m.start()) + 1
                found.append(f"{path.relative_to(ROOT)}:{line}: {text.splitlines()[line - 1].strip()}")
    assert not found, "'session' outside OMERO's meaning (use versions and dates):\n" + "\n".join(found)


def test_the_session_check_tells_the_two_meanings_apart():
    omero = "The password is read from an environment variable, or join an OMERO session with its key."
    ours = "Trained in the eighth" + " session on 2 cores."  # split so this file passes the same check
    for text, allowed in ((omero, True), (ours, False)):
        m = SESSION.search(text)
        assert bool(OMERO_SENSE.search(_paragraph(text, m.start()))) is allowed


def test_no_runs_counted_by_how_the_project_went():
    found = [f"{p.relative_to(ROOT)}: {m.group(0)!r}" for p in _texts() for m in COUNTED_RUN.finditer(p.read_text())]
    assert not found, found


def test_readme_is_short_and_its_first_screen_shows_the_tool_and_how_to_start():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, len(lines)
    first_screen = "\n".join(lines[:30])
    assert re.search(r"!\[[^\]]+\]\(docs/images/[^)]+\.png\)", first_screen), "a picture of what it does"
    assert "make run" in first_screen and "make test" in first_screen
    headings = re.findall(r"(?m)^## (.+)$", "\n".join(lines))
    for way_in in ("QuPath extension", "QuPath projects", "OMERO", "Server and Python client"):
        assert way_in in headings


@pytest.mark.parametrize("page", [README, CARD], ids=["README", "MODEL_CARD"])
def test_links_to_files_of_the_repository_exist(page):
    """mkdocs --strict checks the links between docs pages; these two live outside docs/."""
    text = page.read_text(encoding="utf-8")
    targets = [t for t in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text) if "://" not in t]
    assert targets
    missing = [t for t in targets if not (page.parent / t).resolve().exists()]
    assert not missing, missing


def test_pictures_are_small_pngs():
    pictures = sorted((DOCS / "images").glob("*"))
    assert pictures
    for p in pictures:
        assert p.suffix == ".png" and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", p.name
        assert p.stat().st_size < 300_000, (p.name, p.stat().st_size)


def test_the_site_builds_strictly(tmp_path):
    """What `make docs` runs: a broken link, a missing page or one left out of the nav fails (not with
    --quiet, which hides the warnings that --strict counts)."""
    if shutil.which("mkdocs", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("mkdocs is not installed (the docs extra)")
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": str(Path(sys.executable).parent)},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    card = (site / "model-card" / "index.html").read_text(encoding="utf-8")
    assert "Limitations and recommendations" in card and 'href="../adapt/"' in card
