"""SQL storage: searches, candidates, checkpoints and events behind one repository (:class:`Store`).

SQLite by default (``<data dir>/evomerge.db``, WAL), PostgreSQL through ``postgresql+psycopg://``; the schema is
kept by alembic migrations shipped in ``migrations/`` and applied when a :class:`Store` opens.
"""

from evomerge.storage.codec import decode_scores, encode_scores
from evomerge.storage.database import data_dir, default_database_url, mask_url
from evomerge.storage.repository import (
    AlreadyFinishedError,
    CandidateResult,
    CandidateRow,
    CheckpointRow,
    EventRow,
    NewCandidate,
    NotFoundError,
    SearchRow,
    Store,
)

__all__ = [
    "AlreadyFinishedError",
    "CandidateResult",
    "CandidateRow",
    "CheckpointRow",
    "EventRow",
    "NewCandidate",
    "NotFoundError",
    "SearchRow",
    "Store",
    "data_dir",
    "decode_scores",
    "default_database_url",
    "encode_scores",
    "mask_url",
]
