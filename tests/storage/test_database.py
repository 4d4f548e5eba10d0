"""Connecting: URLs, the data folder, SQLite settings, user-facing errors, and concurrent writers."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine, text
from storage_helpers import new_search, open_at_once

from evomerge.errors import UserError
from evomerge.storage import CandidateResult, NewCandidate, Store, data_dir, default_database_url
from evomerge.storage.database import mask_url, parse_url
from evomerge.storage.testing import (
    DatabaseMisconfigured,
    DatabaseUnavailable,
    _postgres_server,
    database_for_tests,
    temporary_database,
)


def test_data_dir_and_default_url_follow_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EVOMERGE_DATA_DIR", raising=False)
    monkeypatch.delenv("EVOMERGE_DATABASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    assert data_dir() == tmp_path.resolve() / ".evomerge" and data_dir().is_dir()
    assert default_database_url() == f"sqlite:///{tmp_path.resolve()}/.evomerge/evomerge.db"
    monkeypatch.setenv("EVOMERGE_DATA_DIR", str(tmp_path / "a" / "b"))
    assert data_dir() == (tmp_path / "a" / "b").resolve() and (tmp_path / "a" / "b").is_dir()
    with Store() as store:  # the default database is created inside the data folder
        assert store.url == f"sqlite:///{tmp_path.resolve()}/a/b/evomerge.db"
        assert store.backend == "sqlite"
    assert (tmp_path / "a" / "b" / "evomerge.db").is_file()
    monkeypatch.setenv("EVOMERGE_DATABASE_URL", "postgresql+psycopg://u@h/db")
    assert default_database_url() == "postgresql+psycopg://u@h/db"
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("EVOMERGE_DATA_DIR", str(tmp_path / "file" / "sub"))
    with pytest.raises(UserError, match="cannot create the data folder") as info:
        data_dir()
    assert info.value.where == "EVOMERGE_DATA_DIR"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("not a url", "is not a database URL"),
        ("mysql://root:hunter2@127.0.0.1/db", "unsupported database 'mysql'"),
        ("sqlite:////no/such/folder/evomerge.db", "folder /no/such/folder does not exist"),
        ("postgresql://evo:hunter2@127.0.0.1:1/test", "cannot connect to postgresql\\+psycopg://evo:\\*\\*\\*@127"),
        ("postgresql://evo@127.0.0.1:1/test?password=hunter2", "cannot connect to .*password=\\*\\*\\*"),
        ("postgresql://evo@127.0.0.1:1/test?passfile=/x/hunter2", "cannot connect to .*passfile=\\*\\*\\*"),
        ("sqlite://", "in-memory SQLite is not supported"),
        ("sqlite:///:memory:", "in-memory SQLite is not supported"),
        ("sqlite:///file:mem?mode=memory&uri=true", "in-memory SQLite is not supported"),
    ],
)
def test_bad_urls_raise_one_user_error_naming_the_database_with_the_password_masked(url: str, message: str) -> None:
    with pytest.raises(UserError, match=message) as info:
        Store(url)
    assert info.value.where == "database"
    assert "hunter2" not in str(info.value)
    assert "EVOMERGE_DATABASE_URL" in str(info.value)  # the fix


def test_postgres_urls_without_a_driver_mean_psycopg() -> None:
    assert parse_url("postgresql://u@h/db").drivername == "postgresql+psycopg"
    assert parse_url("postgres://u@h/db").drivername == "postgresql+psycopg"
    assert parse_url("postgresql+psycopg://u@h/db").drivername == "postgresql+psycopg"


def test_sqlite_runs_in_wal_mode_with_busy_timeout_and_foreign_keys(tmp_path: Path) -> None:
    with Store(f"sqlite:///{tmp_path}/x.db") as store, store.engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert connection.execute(text("PRAGMA busy_timeout")).scalar() == 30000
        assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1


def test_two_stores_on_one_sqlite_file_writing_alternately_from_two_threads_never_lock(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/shared.db"
    stores = [Store(url), Store(url)]
    rounds, barrier, errors = 40, threading.Barrier(2), []
    sids = [new_search(stores[0], "a"), new_search(stores[1], "b")]

    def write(k: int) -> None:
        store, sid = stores[k], sids[k]
        try:
            for i in range(rounds):
                barrier.wait(timeout=60)
                store.add_candidates(sid, [NewCandidate(i, np.full(3, i + k / 10))])
                store.count_candidates(sid)  # a read between writes: the next write must not see a stale snapshot
                store.complete_candidates(sid, [CandidateResult(i, "done", values={"acc_0_4": i, "acc_5_9": k})])
                store.save_checkpoint(sid, told=i + 1, state={"i": i})
                store.add_event(sid, "progress", {"i": i})
                store.heartbeat(sid)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=write, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    for k, sid in enumerate(sids):
        assert stores[1 - k].count_candidates(sid) == {"pending": 0, "done": rounds, "failed": 0, "total": rounds}
        assert [c.genome[0] for c in stores[0].candidates(sid)] == [i + k / 10 for i in range(rounds)]
        assert stores[0].latest_checkpoint(sid).told == rounds  # type: ignore[union-attr]
        assert len(stores[1].events(sid)) == rounds
    for store in stores:
        store.close()


def test_fresh_sqlite_files_opened_by_two_threads_at_once_never_lock(tmp_path: Path) -> None:
    """Switching a new file to WAL can fail with SQLITE_BUSY without waiting; the connection retries it."""
    errors: list[Exception] = []
    for attempt in range(20):
        stores, failed = open_at_once(f"sqlite:///{tmp_path}/fresh{attempt}.db")
        errors.extend(failed)
        for store in stores:
            store.close()
    assert errors == []


def test_importing_and_using_storage_leaves_torch_unloaded(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        from evomerge.storage import Store, NewCandidate
        with Store("sqlite:///{tmp_path}/t.db") as store:
            sid = store.create_search(name="t", spec={{}}, algorithm="random", seed=0, budget=1,
                                      objectives=[{{"name": "a", "direction": "maximize"}}])
            store.add_candidates(sid, [NewCandidate(0, np.zeros(2))])
        print("TORCH:" + ",".join(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("TORCH:"), result.stdout


def test_a_missing_postgres_server_skips_the_backend_locally_and_fails_it_in_ci(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EVOMERGE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:1/test")
    with pytest.raises(DatabaseUnavailable, match="no PostgreSQL server answers.*127.0.0.1:1"):
        with temporary_database("postgresql"):
            pass
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="postgresql: no PostgreSQL server answers"):
        with database_for_tests("postgresql"):
            pass
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true requires it"):
        with database_for_tests("postgresql"):
            pass
    with database_for_tests("sqlite") as url:  # SQLite needs no server
        assert url.startswith("sqlite:///")


def test_mask_url_hides_passwords_in_the_query_string_too() -> None:
    masked = mask_url("postgresql+psycopg://u:pw1@h/db?password=pw2&sslpassword=pw3&passfile=/p&application_name=a")
    assert all(secret not in masked for secret in ("pw1", "pw2", "pw3", "/p"))
    assert "application_name=a" in masked and masked.startswith("postgresql+psycopg://u:***@h/db?")


def test_three_processes_changing_one_search_status_never_hit_database_is_locked(tmp_path: Path) -> None:
    """Session writes read the row before writing it; with a deferred BEGIN two processes upgrading their read
    locks at once fail with "database is locked" at once (no busy wait). ``BEGIN IMMEDIATE`` prevents that."""
    url = f"sqlite:///{tmp_path / 'evomerge.db'}"
    with Store(url) as store:
        sid = new_search(store)
    script = textwrap.dedent(f"""
        from evomerge.storage import Store
        with Store({url!r}, upgrade=False) as store:
            for _ in range(300):
                store.set_status({sid}, "running")
                store.request_cancel({sid})
    """)
    processes = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outcomes = [(p.wait(timeout=120), p.stderr.read() if p.stderr else "") for p in processes]
    assert [code for code, _ in outcomes] == [0, 0, 0], [err[-300:] for _, err in outcomes]
    with Store(url, upgrade=False) as store:
        assert store.get_search(sid).status == "cancelling"  # type: ignore[union-attr]


def test_a_table_of_another_program_in_the_way_is_a_user_error_naming_it(db_url: str) -> None:
    engine = create_engine(db_url)
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE evomerge_events (id integer primary key, what text)"))
    engine.dispose()
    with pytest.raises(UserError, match="cannot create or update evomerge's tables .*evomerge_events") as info:
        Store(db_url)
    assert info.value.where == "database"


def test_a_postgres_server_that_answers_but_refuses_us_fails_instead_of_skipping(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    try:
        server = _postgres_server()
    except DatabaseUnavailable as exc:
        pytest.skip(f"postgresql: {exc}")
    for wrong in (server.set(username="no_such_role_evomerge"), server.set(database="no_such_database_evomerge")):
        monkeypatch.setenv("EVOMERGE_TEST_POSTGRES_URL", wrong.render_as_string(hide_password=False))
        monkeypatch.delenv("CI", raising=False)
        with pytest.raises(DatabaseMisconfigured, match="refuses us.*does not exist"):
            with temporary_database("postgresql"):
                pass
        with pytest.raises(pytest.fail.Exception, match="postgresql: the PostgreSQL test server refuses us"):
            with database_for_tests("postgresql"):
                pass
