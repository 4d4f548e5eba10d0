"""Initial schema: evomerge_searches, evomerge_candidates, evomerge_checkpoints, evomerge_events.

Tables carry the ``evomerge_`` prefix so that evomerge can share a database (or schema) with other programs.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "evomerge_searches",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("spec_path", sa.Text(), nullable=True),
        sa.Column("algorithm", sa.Text(), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("budget", sa.Integer(), nullable=False),
        sa.Column("objectives", sa.JSON(), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("updated_at", _utc(), nullable=False),
        sa.Column("started_at", _utc(), nullable=True),
        sa.Column("finished_at", _utc(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("stop_reason", sa.Text(), nullable=True),
        sa.Column("owner", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_evomerge_searches"),
    )
    op.create_index("ix_evomerge_searches_status", "evomerge_searches", ["status"])

    op.create_table(
        "evomerge_candidates",
        sa.Column("search_id", sa.Integer(), nullable=False),
        sa.Column("idx", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("stage", sa.SmallInteger(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("genome", sa.LargeBinary(), nullable=False),
        sa.Column("recipe", sa.Text(), nullable=True),
        sa.Column("recipe_hash", sa.String(length=128), nullable=True),
        sa.Column("objective_values", sa.JSON(), nullable=True),
        sa.Column("holdout", sa.JSON(), nullable=True),
        sa.Column("per_example", sa.LargeBinary(), nullable=True),
        sa.Column("merge_seconds", sa.Float(), nullable=True),
        sa.Column("score_seconds", sa.Float(), nullable=True),
        sa.Column("worker", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("reused_from", sa.Integer(), nullable=True),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("finished_at", _utc(), nullable=True),
        sa.ForeignKeyConstraint(
            ["search_id"],
            ["evomerge_searches.id"],
            name="fk_evomerge_candidates_search_id_evomerge_searches",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("search_id", "idx", name="pk_evomerge_candidates"),
    )
    op.create_index("ix_evomerge_candidates_search_id_status", "evomerge_candidates", ["search_id", "status"])
    op.create_index(
        "ix_evomerge_candidates_search_id_recipe_hash", "evomerge_candidates", ["search_id", "recipe_hash"]
    )

    op.create_table(
        "evomerge_checkpoints",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("search_id", sa.Integer(), nullable=False),
        sa.Column("told", sa.Integer(), nullable=False),
        sa.Column("state", sa.JSON(), nullable=False),
        sa.Column("report", sa.JSON(), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.ForeignKeyConstraint(
            ["search_id"],
            ["evomerge_searches.id"],
            name="fk_evomerge_checkpoints_search_id_evomerge_searches",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_evomerge_checkpoints"),
    )
    op.create_index("ix_evomerge_checkpoints_search_id_id", "evomerge_checkpoints", ["search_id", "id"])

    op.create_table(
        "evomerge_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("search_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.ForeignKeyConstraint(
            ["search_id"],
            ["evomerge_searches.id"],
            name="fk_evomerge_events_search_id_evomerge_searches",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_evomerge_events"),
    )
    op.create_index("ix_evomerge_events_search_id_id", "evomerge_events", ["search_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_evomerge_events_search_id_id", table_name="evomerge_events")
    op.drop_table("evomerge_events")
    op.drop_index("ix_evomerge_checkpoints_search_id_id", table_name="evomerge_checkpoints")
    op.drop_table("evomerge_checkpoints")
    op.drop_index("ix_evomerge_candidates_search_id_recipe_hash", table_name="evomerge_candidates")
    op.drop_index("ix_evomerge_candidates_search_id_status", table_name="evomerge_candidates")
    op.drop_table("evomerge_candidates")
    op.drop_index("ix_evomerge_searches_status", table_name="evomerge_searches")
    op.drop_table("evomerge_searches")
