"""Every command of docs/quickstart.md, run as written, in order, in a fresh folder: the quickstart never lies.

The folder holds what a clone holds for these commands (the Makefile, pyproject.toml, the package, the example
specs) and this venv, so ``make install`` finds it installed and returns at once (the test refuses to run when it
would not). A block introduced by "in a second terminal" runs in the background, and the next block starts once
that server answers ``/healthz`` (a user waits for the startup line the same way). All blocks run in one bash,
with ``set -euo pipefail``, so ``source .venv/bin/activate`` holds for the commands after it.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evomerge.storage import Store

ROOT = Path(__file__).parents[2]
PAGE = ROOT / "docs" / "quickstart.md"
PORT = 8000  # the quickstart's `evomerge serve` default
_BLOCK = re.compile(r"((?:^[^\n]*\n){0,3})```bash\n(.*?)```", re.S | re.M)


def blocks(text: str) -> list[tuple[bool, list[str]]]:
    """``(runs in the background, command lines)`` of each bash block, comments and blank lines dropped."""
    found = []
    for before, body in _BLOCK.findall(text):
        lines = [line.split("  #", 1)[0].strip() for line in body.splitlines()]
        lines = [line for line in lines if line and not line.startswith("#")]
        found.append(("second terminal" in before.lower(), lines))
    return found


def script(text: str) -> str:
    """The page's commands as one bash script; a background block is started and waited for."""
    wait = (f"python -c \"import time, urllib.request as u\nfor _ in range(600):\n    try:\n        "
            f"u.urlopen('http://127.0.0.1:{PORT}/healthz', timeout=2); break\n    except OSError: time.sleep(0.2)\n"
            f"else: raise SystemExit('the server did not answer')\"")
    out = ["set -euo pipefail", "trap 'jobs -p | xargs -r kill' EXIT"]
    for background, lines in blocks(text):
        for line in lines:
            out.append(f"echo {shlex.quote('$ ' + line)}")
            out.append(f"{line} > server.log 2>&1 &" if background else line)
        if background:
            out.append(wait)
    return "\n".join(out) + "\n"


def test_the_page_has_the_steps_a_user_needs():
    commands = [line for _, lines in blocks(PAGE.read_text()) for line in lines]
    assert commands[0] == "make install" and commands[1] == "source .venv/bin/activate"
    for needed in ("evomerge testbed build", "evomerge run", "evomerge status", "evomerge recipe",
                   "evomerge materialize", "evomerge serve", "evomerge submit"):
        assert any(c.startswith(needed) for c in commands), needed
    assert [background for background, _ in blocks(PAGE.read_text())].count(True) == 1


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def test_every_quickstart_command_runs_as_written(tmp_path):
    if not _port_free(PORT):
        message = f"port {PORT} is taken; the quickstart's `evomerge serve` needs it"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    venv = Path(sys.executable).parent.parent
    for name in ("Makefile", "pyproject.toml", "evomerge"):
        (tmp_path / name).symlink_to(ROOT / name)
    (tmp_path / ".venv").symlink_to(venv)
    (tmp_path / "examples").mkdir()
    for spec in (ROOT / "examples").glob("*.yaml"):
        shutil.copy(spec, tmp_path / "examples" / spec.name)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("EVOMERGE_", "VIRTUAL_ENV", "RAY_ADDRESS")) and k != "FORCE_COLOR"}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(str(venv)))
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # `make install` must find this venv up to date and do nothing: a reinstall from this temporary folder would
    # point the venv's scripts at it. After an edit of pyproject.toml, run `make install` (or `make test`) first.
    if subprocess.run(["make", "--question", "install"], cwd=tmp_path, env=env).returncode != 0:
        message = "the venv is older than pyproject.toml: run `make install` first (this test never reinstalls it)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)

    proc = subprocess.Popen(["bash", "-c", script(PAGE.read_text())], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=900)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the server and the Ray it started, if still there
        except ProcessLookupError:
            pass
    server_log = (tmp_path / "server.log").read_text(errors="replace") if (tmp_path / "server.log").exists() else ""
    assert proc.returncode == 0, output[-4000:] + "\n--- server.log\n" + server_log[-3000:]

    assert (tmp_path / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = yaml.safe_load((tmp_path / "best.yml").read_text())
    assert best["merge_method"] == "ties" and len(best["models"]) == 2
    assert (tmp_path / "merged" / "config.json").is_file()
    assert list((tmp_path / "merged").glob("*.safetensors"))
    assert yaml.safe_load((tmp_path / "front-best.yml").read_text())["merge_method"] == "task_arithmetic"

    store = Store(f"sqlite:///{tmp_path / '.evomerge' / 'evomerge.db'}")
    try:
        searches = {row.id: row for row in store.list_searches()}
        assert {i: (s.name, s.status) for i, s in searches.items()} == {1: ("cmaes-digits", "done"),
                                                                        2: ("digits-map", "done")}
        assert store.count_candidates(1)["done"] == 200
        assert store.count_candidates(2)["done"] == 84
    finally:
        store.close()
