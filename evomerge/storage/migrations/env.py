"""Alembic environment for evomerge's schema.

:func:`evomerge.storage.database.upgrade` runs migrations programmatically: it passes an open connection (already
inside a transaction and holding the migration lock) through ``config.attributes["connection"]``. Run from the
``alembic`` command line instead, this file connects to ``sqlalchemy.url`` from the config or, failing that, to
``EVOMERGE_DATABASE_URL`` / the default database.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from evomerge.storage.database import VERSION_TABLE, default_database_url, make_engine
from evomerge.storage.models import Base

config = context.config
target_metadata = Base.metadata


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
        compare_type=True,
    )


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(config.get_main_option("sqlalchemy.url") or default_database_url())
    with engine.connect() as connection:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
