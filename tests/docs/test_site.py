"""The user guide builds with ``mkdocs build --strict``: every page is in the navigation, every link between pages
and every anchor resolves, no page links outside docs/. The README links only pages that exist."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[2]
MKDOCS = [sys.executable, "-m", "mkdocs"]


def test_the_site_builds_in_strict_mode(tmp_path):
    done = subprocess.run([*MKDOCS, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "site" / "quickstart" / "index.html").is_file()
    assert (tmp_path / "site" / "spec-reference" / "index.html").is_file()


def test_every_page_is_in_the_navigation():
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    listed = {page for entry in nav for page in entry.values()}
    assert listed == {p.name for p in (ROOT / "docs").glob("*.md")}


def test_the_readme_links_pages_that_exist_and_every_guide_page():
    readme = (ROOT / "README.md").read_text()
    linked = set(re.findall(r"\]\((docs/[^)#]+)", readme))
    assert linked, "the README links the docs"
    assert [link for link in linked if not (ROOT / link).is_file()] == []
    pages = {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")}
    assert pages - linked == set(), "the README links every page of the guide"
