"""A python objective the worker tests steer through files, to make workers slow, fail or die on cue.

``control(model, tokenizer, data, dir=...)`` reads ``<dir>/mode.json`` at each call (absent: return at once):

- ``{"sleep": s}``: note ``<dir>/started/<pid>-<ns>``, then sleep ``s`` seconds;
- ``{"stall_once": [long, short]}``: the first caller (it creates ``<dir>/claimed``) sleeps ``long``, others ``short``;
- ``{"raise_once": message}``: the first caller raises ``RuntimeError(message)``, others return at once;
- ``{"give_up": message}``: raises :class:`GiveUp` (a ``BaseException``, not an ``Exception``);
- ``{"die": true}``: the worker process SIGKILLs itself (a crash mid-candidate).

It returns one score, 1.0. Workers import it by name: the tests put this folder on the workers' PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any


class GiveUp(BaseException):
    """What a user's objective might raise to abandon a candidate (not an ``Exception``)."""


def _claim(folder: Path) -> bool:
    try:
        os.close(os.open(folder / "claimed", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def control(model: Any, tokenizer: Any, data: Any, dir: str, **_: Any) -> list[float]:
    folder = Path(dir)
    try:
        mode = json.loads((folder / "mode.json").read_text())
    except FileNotFoundError:
        return [1.0]
    if "sleep" in mode:
        (folder / "started").mkdir(exist_ok=True)
        (folder / "started" / f"{os.getpid()}-{time.monotonic_ns()}").touch()
        time.sleep(mode["sleep"])
    elif "stall_once" in mode:
        long, short = mode["stall_once"]
        time.sleep(long if _claim(folder) else short)
    elif "raise_once" in mode:
        if _claim(folder):
            raise RuntimeError(mode["raise_once"])
    elif "give_up" in mode:
        raise GiveUp(mode["give_up"])
    elif mode.get("die"):
        os.kill(os.getpid(), signal.SIGKILL)
    return [1.0]
