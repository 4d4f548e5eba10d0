"""The REST API's response bodies (the request body is the job spec itself, :class:`evomerge.spec.JobSpec`).

Numbers that are missing or not finite (a failed objective, NaN) are ``null``: every body is strict JSON.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Optional

from pydantic import BaseModel, Field

Values = dict[str, Optional[float]]


class ErrorOut(BaseModel):
    """Every error: one line saying what is wrong and how to fix it, and the field at fault when there is one."""

    detail: str
    field: Optional[str] = None


class SearchCreated(BaseModel):
    id: int
    status: str
    url: str = Field(description="The search's resource (also in the Location header).")
    dashboard: str = Field(description="The search's page in the dashboard.")


class ObjectiveOut(BaseModel):
    name: str
    direction: str


class PointOut(BaseModel):
    """A candidate on the front (or the best): search scores, holdout scores beside them, and the score the
    search ranks by (its ``scalarize`` rule)."""

    id: int
    values: Values
    holdout: Optional[Values] = None
    score: Optional[float] = None


class ReferenceOut(BaseModel):
    """An expert scored alone: the point a merge has to beat."""

    name: str
    values: Optional[Values] = None
    holdout: Optional[Values] = None
    score: Optional[float] = None


class SearchBrief(BaseModel):
    id: int
    name: str
    status: str
    algorithm: str
    seed: int
    budget: int
    counts: dict[str, int]
    evaluated: int = Field(description="Candidates with a result (done or failed).")
    stop_reason: Optional[str] = None
    error: Optional[str] = None
    created_at: Optional[datetime] = None
    started_at: Optional[datetime] = None
    finished_at: Optional[datetime] = None


class SearchPage(BaseModel):
    items: list[SearchBrief]
    total: int
    limit: int
    offset: int


class SearchOut(SearchBrief):
    """A search with its best candidate, its front and the experts' reference scores: the same document as
    ``evomerge status ID --json``."""

    objectives: list[ObjectiveOut]
    best: Optional[PointOut] = None
    front: list[PointOut]
    references: list[ReferenceOut]
    scalarize: str
    spec: dict[str, Any] = Field(description="The job spec as stored (absolute paths).")


class FrontOut(BaseModel):
    id: int
    status: str
    objectives: list[ObjectiveOut]
    scalarize: str
    best: Optional[PointOut] = None
    front: list[PointOut]
    references: list[ReferenceOut]
    report: Optional[dict[str, Any]] = Field(
        default=None, description="The algorithm's latest report: MAP's predicted and evaluated fronts and surrogate "
        "R², the stage of a hybrid search.")


class CandidateBrief(BaseModel):
    id: int
    stage: int
    status: str
    values: Optional[Values] = None
    holdout: Optional[Values] = None
    score: Optional[float] = None
    reused_from: Optional[int] = Field(default=None, description="The candidate whose identical recipe was scored.")
    worker: Optional[str] = None
    attempts: int
    error: Optional[str] = None
    merge_seconds: Optional[float] = None
    score_seconds: Optional[float] = None
    created_at: Optional[datetime] = None
    finished_at: Optional[datetime] = None
    has_recipe: bool = Field(description="False for M2N2 members evolved as raw weights.")


class CandidatePage(BaseModel):
    items: list[CandidateBrief]
    total: int
    limit: int
    offset: int


class CandidateOut(CandidateBrief):
    search_id: int
    genome: list[float]
    recipe: Optional[dict[str, Any]] = Field(default=None, description="Our JSON recipe (see the recipe routes).")
    recipe_hash: Optional[str] = None
    per_example: Optional[dict[str, list[Optional[float]]]] = Field(
        default=None, description="Per-example scores per objective (only with ?per_example=true).")
    examples: Optional[dict[str, int]] = Field(default=None, description="How many examples each objective scored.")


class StatusOut(BaseModel):
    id: int
    status: str
    detail: str


class HealthOut(BaseModel):
    status: str
    database: str
    version: str
    queued: int
    running: list[int]


__all__ = ["CandidateBrief", "CandidateOut", "CandidatePage", "ErrorOut", "FrontOut", "HealthOut", "ObjectiveOut",
           "PointOut", "ReferenceOut", "SearchBrief", "SearchCreated", "SearchOut", "SearchPage", "StatusOut",
           "Values"]
