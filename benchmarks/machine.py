"""What every benchmark records about the machine it ran on, and its progress messages (stderr)."""

from __future__ import annotations

import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path


def machine_info(threads: int, load_before: tuple, load_after: tuple) -> dict:
    """CPU, memory, library versions, torch threads and the load average around the run (shared, noisy hosts)."""
    import torch

    cpu_model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        mem_gb = None
    versions = {}
    for package in ("transformers", "mergekit", "cma", "pymoo", "optuna"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "platform": platform.platform(), "python": platform.python_version(), "cpu": cpu_model,
        "cpu_count": os.cpu_count(), "memory_gb": mem_gb, "gpu": torch.cuda.is_available(),
        "torch": torch.__version__, **versions, "torch_threads": torch.get_num_threads(),
        "threads_requested": threads, "interop_threads": torch.get_num_interop_threads(),
        "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in load_after],
    }


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
