"""Reading the data files an objective names: JSONL, JSON, CSV rows for text tasks, ``.npz`` arrays otherwise.

Every mistake a user can make in a data file (a missing file, an empty one, a malformed JSON line, a missing
column or array) is a :class:`~evomerge.errors.UserError` naming the objective's field (``where``, e.g.
``objectives.acc_0_4.task.data``), the file, the line, and the fix. Files are read once per scorer and split;
``limit`` stops reading after the first N examples.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from evomerge.errors import UserError

ROW_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")
ARRAY_SUFFIXES = (".npz",)


class DataError(UserError):
    """A data file that cannot be used as the objective asks."""


@dataclass(frozen=True)
class Rows:
    """Records of a text data file, each with the line it came from (for error messages)."""

    path: Path
    records: list[dict[str, Any]]
    lines: list[int]
    where: str

    def __len__(self) -> int:
        return len(self.records)

    def column(self, key: str, *, field: str, what: str) -> list[Any]:
        """The values of ``key`` in every record; a record without it is a :class:`DataError` naming ``field``
        (the TaskSpec field that picks the column, e.g. ``task.input``)."""
        values = []
        for record, line in zip(self.records, self.lines):
            if key not in record or record[key] is None:
                have = ", ".join(sorted(map(str, record))) or "nothing"
                raise DataError(f"{self.path.name} line {line} has no {what} field {key!r} (it has: {have}); rename "
                                f"the field in the file or set `{field.rsplit('.', 1)[-1]}` to the column that holds "
                                "it", where=field)
            values.append(record[key])
        return values

    def has(self, key: str) -> bool:
        return bool(self.records) and key in self.records[0]


def is_array_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in ARRAY_SUFFIXES


def check_file(path: str | Path, where: str, suffixes: Sequence[str] = ROW_SUFFIXES + ARRAY_SUFFIXES) -> Path:
    """The path, or a :class:`DataError` when it is missing, a folder, or of a kind we cannot read."""
    file = Path(path).expanduser()
    if not file.exists():
        raise DataError(f"{file} does not exist; point it at a {_kinds(suffixes)} file", where=where)
    if not file.is_file():
        raise DataError(f"{file} is a folder; point it at a {_kinds(suffixes)} file", where=where)
    if file.suffix.lower() not in suffixes:
        raise DataError(f"{file.name}: cannot read {file.suffix or 'files without a suffix'}; use a "
                        f"{_kinds(suffixes)} file", where=where)
    return file


def _kinds(suffixes: Sequence[str]) -> str:
    names = {".jsonl": "JSONL", ".json": "JSON", ".csv": "CSV", ".tsv": "TSV", ".npz": ".npz"}
    return ", ".join(dict.fromkeys(names[s] for s in suffixes))


# ------------------------------------------------------------------------------------------------------- rows


def read_rows(path: str | Path, *, where: str, limit: int | None = None) -> Rows:
    """Records of a JSON-lines file (one object a line; a ``.json`` file may also hold one list of objects) or of
    a CSV/TSV file with a header line; at most ``limit`` of them."""
    file = check_file(path, where, ROW_SUFFIXES)
    suffix = file.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            records, lines = _read_csv(file, "\t" if suffix == ".tsv" else ",", limit, where)
        else:
            records, lines = _read_json_lines(file, limit, where)
    except UnicodeDecodeError as e:
        raise DataError(f"{file.name} is not UTF-8 text ({e.reason} at byte {e.start})", where=where) from None
    if not records:
        raise DataError(f"{file.name} holds no examples; add some or point at another file", where=where)
    return Rows(file, records, lines, where)


def _read_json_lines(file: Path, limit: int | None, where: str) -> tuple[list[dict], list[int]]:
    records: list[dict] = []
    lines: list[int] = []
    with file.open(encoding="utf-8") as f:
        first = ""
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            if not first:
                first = text.lstrip()
                if first.startswith("[") and file.suffix.lower() == ".json":
                    return _read_json_list(file, limit, where)
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{file.name} line {number} is not valid JSON ({e.msg} at column {e.colno}); "
                                "write one JSON object per line", where=where) from None
            if not isinstance(record, dict):
                raise DataError(f"{file.name} line {number} is a JSON {type(record).__name__}, not an object; "
                                'write one object per line ({"prompt": ..., "answer": ...})', where=where)
            records.append(record)
            lines.append(number)
            if limit is not None and len(records) >= limit:
                break
    return records, lines


def _read_json_list(file: Path, limit: int | None, where: str) -> tuple[list[dict], list[int]]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{file.name} line {e.lineno} is not valid JSON ({e.msg})", where=where) from None
    if not isinstance(data, list):
        raise DataError(f"{file.name} is neither JSON lines nor a list of objects", where=where)
    data = data[:limit] if limit is not None else data
    for i, record in enumerate(data):
        if not isinstance(record, dict):
            raise DataError(f"{file.name} item {i} is a JSON {type(record).__name__}, not an object", where=where)
    # A list has no meaningful line per record; report the item's position (1-based) instead.
    return data, list(range(1, len(data) + 1))


def _read_csv(file: Path, delimiter: str, limit: int | None, where: str) -> tuple[list[dict], list[int]]:
    records: list[dict] = []
    lines: list[int] = []
    with file.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        if reader.fieldnames is None:
            return records, lines
        for record in reader:
            if None in record:  # more cells than header names
                raise DataError(f"{file.name} line {reader.line_num} has more cells than the header has columns",
                                where=where)
            records.append(dict(record))
            lines.append(reader.line_num)
            if limit is not None and len(records) >= limit:
                break
    return records, lines


# ----------------------------------------------------------------------------------------------------- arrays


def read_arrays(path: str | Path, keys: Sequence[tuple[str, str]], *, where: str,
                limit: int | None = None) -> dict[str, np.ndarray]:
    """The named arrays of an ``.npz`` file, first ``limit`` rows; ``keys`` pairs an array name with the TaskSpec
    field that chose it (``("x", "objectives.a.task.input")``) so a missing array names the field to set.
    All arrays must have the same number of rows."""
    file = check_file(path, where, ARRAY_SUFFIXES)
    try:
        archive = np.load(file, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{file.name} is not a readable .npz archive ({e})", where=where) from None
    with archive:
        out = {}
        for key, field in keys:
            if key not in archive.files:
                raise DataError(f"{file.name} has no array {key!r} (it has: {', '.join(archive.files) or 'none'}); "
                                f"set `{field.rsplit('.', 1)[-1]}` to the array's name", where=field)
            try:
                array = archive[key]
            except ValueError as e:  # object arrays need pickle: refuse them
                raise DataError(f"{file.name}: array {key!r} cannot be read without pickle ({e}); save numeric "
                                "arrays", where=where) from None
            out[key] = array[:limit] if limit is not None else array
    lengths = {k: len(v) if v.ndim else 0 for k, v in out.items()}
    if min(lengths.values()) == 0:
        raise DataError(f"{file.name} holds no examples ({', '.join(f'{k}: {n}' for k, n in lengths.items())})",
                        where=where)
    if len(set(lengths.values())) > 1:
        raise DataError(f"{file.name}: arrays differ in length ({', '.join(f'{k}: {n}' for k, n in lengths.items())})"
                        "; every array needs one row per example", where=where)
    return out


def integer_labels(values: Sequence[Any], rows: Rows | None, *, field: str, source: str) -> np.ndarray:
    """Class or answer indices as int64, or a :class:`DataError` naming the first value that is not a
    non-negative integer (CSV cells arrive as text: ``"3"`` is accepted)."""
    out = np.empty(len(values), dtype=np.int64)
    for i, value in enumerate(values):
        label = _as_int(value)
        if label is None or label < 0:
            at = f"line {rows.lines[i]}" if rows is not None else f"row {i}"
            raise DataError(f"{source} {at}: {value!r} is not a class index (a non-negative integer)", where=field)
        out[i] = label
    return out


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None
