"""A python objective the runner tests steer: slow candidates, planned failures, a worker that dies once.

``pause(model, tokenizer, data, seconds=0, fail_every=0, die_marker=None)`` returns one score, 0.0, after
sleeping ``seconds``. With ``fail_every=k`` it raises for the merges whose first weight sum, in units of 1e-4,
is divisible by ``k``: the same recipes fail in every run, so a failing search stays deterministic. When the
file ``die_marker`` exists, the first caller to delete it SIGKILLs its own process (a worker dying
mid-candidate); later callers find no marker. Workers import it by name: the tests put this folder on the
PYTHONPATH.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any


def pause(model: Any, tokenizer: Any, data: Any, seconds: float = 0.0, fail_every: int = 0,
          die_marker: str | None = None) -> list[float]:
    if die_marker:
        try:
            os.unlink(die_marker)
        except FileNotFoundError:
            pass
        else:
            os.kill(os.getpid(), signal.SIGKILL)
    if seconds:
        time.sleep(seconds)
    if fail_every:
        total = float(next(model.parameters()).double().sum())
        if int(round(abs(total) * 1e4)) % fail_every == 0:
            raise RuntimeError(f"planned failure (weight sum {total:.6f})")
    return [0.0]
