"""MkDocs hooks: publish the repository files the pages cite, with links that work in both places.

A page in ``docs/`` links to a report or a figure as it lies in the repository
(``../reports/REPORT.md``), so the link works when the page is read in the repository. These hooks add
those files (``reports/``, ``benchmarks/RESULTS*.md``) to the site under the same relative paths and
drop the one ``../`` that leaves ``docs/``, so the link works on the site too. A link to any other
file outside ``docs/`` is left alone, and ``mkdocs build --strict`` fails on it.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
PUBLISHED = ("reports/REPORT.md", "reports/*.png", "benchmarks/RESULTS*.md")
_LINK = re.compile(r"(\]\()([^)\s]+)")


def _published() -> set[str]:
    return {path.relative_to(ROOT).as_posix() for pattern in PUBLISHED for path in ROOT.glob(pattern)}


def on_files(files: Files, config: Any) -> Files:
    for src_uri in sorted(_published()):
        files.append(File.generated(config, src_uri, abs_src_path=str(ROOT / src_uri)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    published = _published()
    folder = posixpath.dirname(page.file.src_uri)

    def relink(match: re.Match[str]) -> str:
        target = match.group(2)
        path, _, anchor = target.partition("#")
        # Where the link points from the page's place in the repository (docs/<folder>/).
        in_repository = posixpath.normpath(posixpath.join("docs", folder, path))
        if path.startswith("../") and in_repository in published:
            site_relative = posixpath.relpath(in_repository, posixpath.join("", folder) or ".")
            return match.group(1) + site_relative + (f"#{anchor}" if anchor else "")
        return match.group(0)

    return _LINK.sub(relink, markdown)
