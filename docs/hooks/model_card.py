"""MkDocs hook: the shipped model card (bridge/weights/MODEL_CARD.md) as the
site's page ``model-card.md``, so the site never holds a second copy.

The card's links are written for its place in the repository: links into
``docs/`` become links between pages (and ``mkdocs build --strict`` checks
them), other repository paths become links to the repository on GitHub.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File, Files

CARD = Path(__file__).resolve().parents[2] / "bridge" / "weights" / "MODEL_CARD.md"
REPO_URL = "https://github.com/nuclickbridge/nuclick-bridge/blob/main/"


def card_page_text(text: str) -> str:
    """The card's markdown with its links to repository paths (``../../PATH``) re-aimed for the site."""

    def relink(m: re.Match) -> str:
        path = m.group(1)
        return f"]({path.removeprefix('docs/')})" if path.startswith("docs/") else f"]({REPO_URL}{path})"

    return re.sub(r"\]\(\.\./\.\./([^)]+)\)", relink, text)


def on_files(files: Files, config) -> Files:
    """Add the generated page."""
    files.append(File.generated(config, "model-card.md", content=card_page_text(CARD.read_text(encoding="utf-8"))))
    return files
