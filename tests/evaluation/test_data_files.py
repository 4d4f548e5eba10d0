"""Reading data files: JSONL, JSON lists, CSV and .npz; every user mistake is one line naming the field."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from evomerge.errors import UserError
from evomerge.evaluation.data import DataError, integer_labels, read_arrays, read_rows

WHERE = "objectives.qa.task.data"


def test_jsonl_rows_keep_their_line_numbers_and_limit_stops_early(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "answer": "b"}\n\n{"prompt": "c", "answer": "d"}\n{"prompt": "e"}\n')
    rows = read_rows(path, where=WHERE)
    assert [r["prompt"] for r in rows.records] == ["a", "c", "e"]
    assert rows.lines == [1, 3, 4]
    assert len(read_rows(path, where=WHERE, limit=2)) == 2


def test_csv_and_json_list_files_read_as_rows(tmp_path: Path) -> None:
    csv = tmp_path / "d.csv"
    csv.write_text('text,label\n"hello, world",1\nbye,0\n')
    rows = read_rows(csv, where=WHERE)
    assert rows.records == [{"text": "hello, world", "label": "1"}, {"text": "bye", "label": "0"}]
    assert rows.lines == [2, 3]
    listed = tmp_path / "d.json"
    listed.write_text('[{"text": "x", "label": 0}, {"text": "y", "label": 1}]')
    assert [r["text"] for r in read_rows(listed, where=WHERE, limit=1).records] == ["x"]


@pytest.mark.parametrize("content, expected", [
    ('{"prompt": "a"}\n{"prompt": oops}\n', "line 2 is not valid JSON"),
    ('{"prompt": "a"}\n["a", "b"]\n', "line 2 is a JSON list, not an object"),
    ("", "holds no examples"),
    ("\n\n", "holds no examples"),
])
def test_malformed_or_empty_jsonl_is_a_user_error_with_the_line(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=expected) as info:
        read_rows(path, where=WHERE)
    assert info.value.where == WHERE
    assert "\n" not in str(info.value)


def test_missing_folder_and_unknown_suffix_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist") as info:
        read_rows(tmp_path / "nope.jsonl", where=WHERE)
    assert str(info.value).startswith(WHERE + ": ")
    with pytest.raises(DataError, match="is a folder"):
        read_rows(tmp_path, where=WHERE)
    (tmp_path / "d.parquet").write_bytes(b"x")
    with pytest.raises(DataError, match="cannot read .parquet"):
        read_rows(tmp_path / "d.parquet", where=WHERE)


def test_a_missing_column_names_the_line_the_columns_and_the_field_to_set(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "answer": "b"}\n{"question": "c", "answer": "d"}\n')
    rows = read_rows(path, where=WHERE)
    with pytest.raises(DataError) as info:
        rows.column("prompt", field="objectives.qa.task.input", what="prompt")
    message = str(info.value)
    assert info.value.where == "objectives.qa.task.input"
    assert "line 2" in message and "'prompt'" in message and "answer, question" in message and "`input`" in message


def test_npz_arrays_are_read_limited_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.ones((5, 3), np.float32), y=np.arange(5))
    keys = [("x", "t.input"), ("y", "t.target")]
    arrays = read_arrays(path, keys, where=WHERE, limit=3)
    assert arrays["x"].shape == (3, 3) and arrays["y"].tolist() == [0, 1, 2]
    with pytest.raises(DataError, match="no array 'features' \\(it has: x, y\\); set `input`") as info:
        read_arrays(path, [("features", "objectives.a.task.input")], where=WHERE)
    assert info.value.where == "objectives.a.task.input"
    np.savez(path, x=np.ones((5, 3)), y=np.arange(4))
    with pytest.raises(DataError, match="differ in length"):
        read_arrays(path, keys, where=WHERE)
    np.savez(path, x=np.ones((0, 3)), y=np.arange(0))
    with pytest.raises(DataError, match="holds no examples"):
        read_arrays(path, keys, where=WHERE)


def test_labels_must_be_non_negative_integers() -> None:
    assert integer_labels([0, "3", 2.0, np.int64(4)], None, field="f", source="s").tolist() == [0, 3, 2, 4]
    for bad in (-1, "cat", 1.5, True):
        with pytest.raises(DataError, match="is not a class index"):
            integer_labels([0, bad], None, field="f", source="s")
