"""Every repository path the README and docs/ cite exists: a path written from the repository root
(`server/http/tgi.py`, `docs/bench/`) and every relative Markdown link. A file that moves takes
its citations with it, or this test names the page that still points at the old place."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
TOP_FOLDERS = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith("."))
# A path from the root: a top folder, then path characters; not the tail of a longer path or a URL.
TOP_FOLDER = "|".join(map(re.escape, TOP_FOLDERS))
ROOT_PATH = re.compile(rf"(?<![\w./-])((?:{TOP_FOLDER})/[\w./-]*[\w/])")
LINK = re.compile(r"\]\(([^)#\s]+)")
# Paths a page names as patterns or as what a run writes elsewhere, not as files of the tree.
NOT_FILES = re.compile(r"[*<>{}]")


def cited_root_paths(text: str) -> set[str]:
    return {m.group(1) for m in ROOT_PATH.finditer(text)}


def linked_paths(page: Path, text: str) -> set[Path]:
    targets = (m.group(1) for m in LINK.finditer(text))
    return {page.parent / t for t in targets if not re.match(r"[a-z]+:", t)}


def missing_citations(page: Path) -> list[str]:
    text = page.read_text()
    missing = [p for p in cited_root_paths(text) if not NOT_FILES.search(p) and not (ROOT / p).exists()]
    missing += [str(p.relative_to(page.parent)) for p in linked_paths(page, text) if not p.exists()]
    return sorted(missing)


def test_the_pattern_finds_root_paths_and_passes_over_urls() -> None:
    text = "see `server/http/tgi.py` and docs/bench/, not https://x.org/server/a.py nor /work/main/server/b.py"
    assert cited_root_paths(text) == {"server/http/tgi.py", "docs/bench/"}


def test_every_cited_path_exists() -> None:
    missing = {str(page.relative_to(ROOT)): found for page in PAGES if (found := missing_citations(page))}
    assert missing == {}
