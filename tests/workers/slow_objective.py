"""A python objective whose module takes 3 s to import: a worker using it is slow to load (load limit tests)."""

from __future__ import annotations

import time
from typing import Any

time.sleep(3.0)


def score(model: Any, tokenizer: Any, data: Any, **_: Any) -> list[float]:
    return [1.0]
