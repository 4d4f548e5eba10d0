"""The Python code blocks of the guide run as written (from a folder holding the examples and the digits bed)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from evomerge.testbeds import build

ROOT = Path(__file__).parents[2]
PAGES = ["running.md"]


def python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "docs" / page).read_text(), re.S)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("python-api")
    shutil.copytree(ROOT / "examples", folder / "examples", ignore=shutil.ignore_patterns("testbeds"))
    build("digits", folder / "examples" / "testbeds" / "digits", seed=0)
    return folder


@pytest.mark.parametrize("page", PAGES)
def test_the_python_blocks_run(page, workspace):
    blocks = python_blocks(page)
    assert blocks, f"docs/{page} has no python block"
    for i, code in enumerate(blocks):
        done = subprocess.run([sys.executable, "-c", code], cwd=workspace, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, f"docs/{page}, python block {i + 1}:\n{done.stderr[-3000:]}"
        if "to_mergekit_yaml" in code:
            assert "merge_method: ties" in done.stdout
