"""Alembic migrations: the migrated schema is the ORM's, upgrades are idempotent and safe to race."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text
from storage_helpers import new_search, open_at_once

from evomerge.errors import UserError
from evomerge.storage import NewCandidate, Store
from evomerge.storage.database import MIGRATIONS_DIR, VERSION_TABLE, head_revisions, new_revision
from evomerge.storage.models import Base


def test_the_migrated_schema_matches_the_orm_models(store: Store) -> None:
    with store.engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "version_table": VERSION_TABLE}
        )
        assert compare_metadata(context, Base.metadata) == []
    tables = set(inspect(store.engine).get_table_names())
    names = {"evomerge_searches", "evomerge_candidates", "evomerge_checkpoints", "evomerge_events", VERSION_TABLE}
    assert tables == names  # every table carries the evomerge_ prefix


def test_upgrade_is_explicit_when_asked_and_a_second_upgrade_changes_nothing(db_url: str) -> None:
    with Store(db_url, upgrade=False) as bare:
        assert bare.revision() == set()
        assert inspect(bare.engine).get_table_names() == []
        bare.upgrade()
        assert bare.revision() == head_revisions() == {"0001"}
        sid = new_search(bare)
        bare.add_candidates(sid, [NewCandidate(0, np.arange(3.0))])
        bare.upgrade()
    with Store(db_url) as reopened:  # upgrade=True on an up-to-date database
        assert reopened.revision() == {"0001"}
        with reopened.engine.connect() as connection:
            assert connection.execute(text(f"SELECT count(*) FROM {VERSION_TABLE}")).scalar() == 1
        assert reopened.candidate(sid, 0).genome.tolist() == [0.0, 1.0, 2.0]  # type: ignore[union-attr]


def test_two_processes_opening_a_fresh_database_at_once_migrate_it_once(db_url: str) -> None:
    script = "import sys; from evomerge.storage import Store; Store(sys.argv[1]).close(); print('ok')"
    procs = [subprocess.Popen([sys.executable, "-c", script, db_url], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outputs]
    with Store(db_url, upgrade=False) as store:
        assert store.revision() == {"0001"}
        new_search(store)


def test_two_threads_opening_a_fresh_database_at_once_both_get_a_working_store(db_url: str) -> None:
    stores, errors = open_at_once(db_url)
    assert errors == [] and len(stores) == 2
    a, b = (new_search(s) for s in stores)
    assert a != b
    for s in stores:
        s.close()


def test_a_database_from_a_newer_evomerge_is_refused_with_the_fix(db_url: str) -> None:
    with Store(db_url) as store, store.engine.begin() as connection:
        connection.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = '9999'"))
    with pytest.raises(UserError, match="newer evomerge: upgrade evomerge") as info:
        Store(db_url)
    assert info.value.where == "database"


def test_the_migrations_ship_as_files_of_the_package() -> None:
    names = {p.relative_to(MIGRATIONS_DIR).as_posix() for p in MIGRATIONS_DIR.rglob("*") if p.is_file()}
    assert {"env.py", "script.py.mako", "versions/0001_initial.py"} <= names


def test_a_new_revision_renders_from_the_template_and_finds_no_drift(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/x.db"
    Store(url).close()
    path = Path(new_revision(url, "nothing changed", version_path=str(tmp_path / "versions")))
    source = path.read_text()
    assert path.parent == tmp_path / "versions" and "down_revision: str | None = '0001'" in source
    upgrade_body = source.split("def upgrade() -> None:")[1].split("def downgrade")[0]
    assert "op." not in upgrade_body  # models and migrations agree
    compile(source, str(path), "exec")
