"""Offline test beds, built locally and deterministically: no weights or data sets come from a hub.

- ``digits`` (:mod:`evomerge.testbeds.digits`): scikit-learn's 8x8 digits and the 64-256-10 MLP of the M2N2
  paper (arXiv 2508.16204): its two pre-trained seeds, plus a base with experts on digits 0-4, 5-9, rotated and
  mirrored digits.
- ``tinylm`` (:mod:`evomerge.testbeds.tinylm`): a tiny Llama with a character-level tokenizer, pre-trained on
  Python's own documentation text, and experts fine-tuned on string tasks (upper-casing, rot13, atbash).

>>> from evomerge.testbeds import build
>>> build("digits", "testbeds/digits", progress=print)          # doctest: +SKIP

Every bed is cached: ``testbed.json`` is written last and records the build arguments, the format version, a
SHA-256 per file and the quality numbers measured during the build. A second call with the same arguments
returns at once; other arguments, another format version or a missing file rebuild. A build starts by deleting
the manifest, so a build that is killed half-way never looks complete.

This module stays light (no torch at import time): the CLI lists the beds without loading torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from evomerge.errors import UserError

__all__ = ["MANIFEST", "SIZES", "TESTBEDS", "build", "read_manifest", "verify"]

TESTBEDS = ("digits", "tinylm")
SIZES = ("full", "ci")
MANIFEST = "testbed.json"

# After the constants: the manifest module reads them.
from evomerge.testbeds.manifest import read_manifest, verify  # noqa: E402


def build(name: str, out_dir: str | Path, *, seed: int = 0, size: str = "full",
          progress: Callable[[str], None] | None = None) -> Path:
    """Build (or reuse) the test bed ``name`` in ``out_dir`` and return ``out_dir``.

    ``size`` is ``"full"`` (the real bed) or ``"ci"`` (smaller and faster, for tests); ``progress`` receives
    short human messages while the bed trains.
    """
    if name not in TESTBEDS:
        raise UserError(f"unknown test bed {name!r}; choose one of {', '.join(TESTBEDS)}", where="testbed")
    module = importlib.import_module(f"evomerge.testbeds.{name}")
    return module.build(out_dir, seed=seed, size=size, progress=progress)
