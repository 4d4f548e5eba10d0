"""What every test bed build shares: argument checks, the manifest that marks a finished build, caching,
determinism and seed derivation.

``testbed.json`` is written last and records the build arguments, the format version, a SHA-256 per file and the
quality numbers measured during the build. A second call with the same arguments returns at once; other
arguments, another format version or a missing file rebuild. A build starts by deleting the manifest, so a build
that is killed half-way never looks complete. No torch at import time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from evomerge.errors import UserError

from evomerge.testbeds import MANIFEST, SIZES

Progress = Callable[[str], None]
BUILDING = ".testbed-building"  # present from the start of a build until its manifest is written


def read_manifest(out_dir: str | Path) -> dict[str, Any] | None:
    """The manifest of a complete bed in ``out_dir`` (build arguments, file hashes, quality), else None."""
    try:
        data = json.loads((Path(out_dir) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# ------------------------------------------------------------------------------------- shared build mechanics
# Used by the bed modules only; kept here so each bed module holds nothing but its own data and training.


def check_arguments(testbed: str, out_dir: str | Path, seed: int, size: str) -> Path:
    """Validate the common build arguments; return ``out_dir`` as a Path."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"the seed must be an integer >= 0, got {seed!r}", where="seed")
    if size not in SIZES:
        raise UserError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}", where="size")
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; give a folder for the {testbed} test bed", where="out_dir")
    recorded = read_manifest(out)
    if recorded is not None and recorded.get("testbed") not in (None, testbed):
        raise UserError(f"{out} already holds the {recorded['testbed']} test bed; choose another folder",
                        where="out_dir")
    return out


def cached(out: Path, arguments: Mapping[str, Any]) -> dict[str, Any] | None:
    """The manifest when ``out`` holds a complete bed built with exactly ``arguments``, else None.

    Every file the manifest lists must still be there with its recorded size; a file whose modification time
    changed since the build is hashed and must match (an untouched bed is a hit without reading a byte).
    """
    recorded = read_manifest(out)
    if recorded is None or recorded.get("arguments") != dict(arguments):
        return None
    files = recorded.get("files")
    mtimes = recorded.get("mtimes") or {}
    if not isinstance(files, dict) or not files or not isinstance(mtimes, dict):
        return None
    for rel, info in files.items():
        path = out / rel
        if not path.is_file() or not isinstance(info, dict):
            return None
        stat = path.stat()
        if stat.st_size != info.get("bytes"):
            return None
        if stat.st_mtime_ns != mtimes.get(rel) and _sha256(path) != info.get("sha256"):
            return None
    return recorded


def verify(out_dir: str | Path) -> list[str]:
    """Files of a built bed whose SHA-256 differs from the manifest's (empty when the bed is intact)."""
    out = Path(out_dir)
    recorded = read_manifest(out) or {}
    return [rel for rel, info in (recorded.get("files") or {}).items()
            if not (out / rel).is_file() or _sha256(out / rel) != info.get("sha256")]


def start(out: Path, owned: Iterable[str]) -> None:
    """Begin a (re)build: mark the folder as ours, drop the manifest, then the entries an earlier build left.

    Only names the bed owns are removed, and only when an earlier build wrote them (a manifest, or the marker of a
    build that was interrupted): a folder where the user keeps a ``base/`` of their own is refused, not emptied.
    """
    owned = list(owned)
    ours = read_manifest(out) is not None or (out / BUILDING).exists()
    clashes = [rel for rel in owned if (out / rel).exists() or (out / rel).is_symlink()]
    if clashes and not ours:
        raise UserError(f"{out} already holds {', '.join(clashes[:3])}{' ...' if len(clashes) > 3 else ''}, which "
                        "no test bed build wrote; choose an empty folder", where="out_dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / BUILDING).write_text("a test bed build started here; it is complete when testbed.json exists\n")
        (out / MANIFEST).unlink(missing_ok=True)
        for rel in owned:
            path = out / rel
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    except OSError as e:
        raise UserError(f"cannot build the test bed in {out}: {e.strerror or e}", where="out_dir") from None


def finish(out: Path, testbed: str, arguments: Mapping[str, Any], files: Iterable[str],
           quality: Mapping[str, Any], started: float, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write the manifest, atomically and last: its presence means every listed file is complete."""
    manifest = {
        "testbed": testbed,
        "arguments": dict(arguments),
        "files": {rel: {"bytes": (out / rel).stat().st_size, "sha256": _sha256(out / rel)} for rel in sorted(files)},
        # Apart from "files", which is the same for every build with the same arguments.
        "mtimes": {rel: (out / rel).stat().st_mtime_ns for rel in sorted(files)},
        "quality": dict(quality),
        "build_seconds": round(time.perf_counter() - started, 1),
        **(extra or {}),
    }
    tmp = out / (MANIFEST + ".tmp")
    try:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, out / MANIFEST)
        (out / BUILDING).unlink(missing_ok=True)
    except OSError as e:
        raise UserError(f"cannot write {out / MANIFEST}: {e.strerror or e}", where="out_dir") from None
    return manifest


def files_under(out: Path, entries: Iterable[str]) -> list[str]:
    """Every file below the given entries of ``out`` (relative POSIX paths), in sorted order."""
    found: list[str] = []
    for rel in entries:
        path = out / rel
        if path.is_file():
            found.append(rel)
        else:
            found.extend(p.relative_to(out).as_posix() for p in sorted(path.rglob("*")) if p.is_file())
    return sorted(found)


@contextlib.contextmanager
def deterministic(seed: int, threads: int = 1) -> Iterator[None]:
    """Run a build reproducibly: seeded torch RNG, deterministic kernels, a fixed thread count; restore after.

    CPU kernels may reduce in a different order with another number of threads, so the count is part of what
    makes two builds byte-identical; the caller's global RNG, thread count and determinism flag are restored.
    """
    import torch

    previous_threads = torch.get_num_threads()
    previous_flag = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(previous_flag, warn_only=previous_warn)
            torch.set_num_threads(previous_threads)


def derive_seed(seed: int, *labels: object) -> int:
    """A seed for one random stream of a build, kept apart from every other stream by its labels."""
    digest = hashlib.sha256(":".join(["evomerge-testbed", str(seed), *map(str, labels)]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
