"""Build test beds for several seeds and print what each build measured (the numbers in docs/testbeds.md).

    .venv/bin/python benchmarks/testbeds/quality.py digits --seeds 0 1 2 3
    .venv/bin/python benchmarks/testbeds/quality.py tinylm --size ci --seeds 0 1 2
    .venv/bin/python benchmarks/testbeds/quality.py tinylm --seeds 0 --out /tmp/tinylm.json

Each bed is built into a temporary folder (or under ``--workdir``, where builds are cached and reused) and its
``testbed.json`` (quality, build seconds) is printed as one JSON line per seed; ``--out`` also writes them all.
Build times are wall-clock seconds of the build itself, imports excluded.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from evomerge.testbeds import TESTBEDS, build, read_manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bed", choices=TESTBEDS)
    parser.add_argument("--size", default="full", choices=("full", "ci"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--workdir", type=Path, default=None, help="keep the beds here (cached between runs)")
    parser.add_argument("--out", type=Path, default=None, help="also write all results to this JSON file")
    args = parser.parse_args()

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or Path(tmp)
        for seed in args.seeds:
            folder = build(args.bed, root / f"{args.bed}-{args.size}-seed{seed}", seed=seed, size=args.size)
            manifest = read_manifest(folder) or {}
            record = {"bed": args.bed, "size": args.size, "seed": seed,
                      "build_seconds": manifest.get("build_seconds"), "quality": manifest.get("quality")}
            print(json.dumps(record), flush=True)
            results.append(record)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
