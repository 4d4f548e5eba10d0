"""The REST API under ``/api/v1`` (DESIGN.md, "REST"); OpenAPI at ``/docs`` and ``/openapi.json``.

Every route needs a bearer token when ``EVOMERGE_API_TOKENS`` is set (:mod:`evomerge.service.auth`). Route
functions are plain ``def``: FastAPI runs them in its thread pool, where the short SQL transactions of
:class:`~evomerge.storage.Store` belong; only the event stream is ``async`` (it sleeps between polls).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator, Literal, Optional

from fastapi import APIRouter, Depends, Header, HTTPException, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse, StreamingResponse

from evomerge.errors import RecipeError
from evomerge.service.auth import require_token
from evomerge.service.results import MAX_ID, Scoring, Summary, finite, finite_values
from evomerge.service.schemas import (CandidateBrief, CandidateOut, CandidatePage, ErrorOut, FrontOut, SearchBrief,
                                      SearchCreated, SearchOut, SearchPage, StatusOut)
from evomerge.spec import MAX_EVALUATIONS, JobSpec
from evomerge.storage.models import FINISHED_STATUSES
from evomerge.storage.repository import CandidateRow, SearchRow

PREFIX = "/api/v1"
MAX_CANDIDATE_ID = MAX_EVALUATIONS  # candidate indices are SQL INTEGER
EVENT_POLL_S = 0.5  # the event stream reads the database this often
CHECK_WAIT_S = 60.0  # a submission waits this long for its turn to load and check its models
KEEPALIVE_S = 15.0  # and sends a comment line at least this often, so proxies keep the connection

_errors = {401: {"model": ErrorOut, "description": "No or a wrong bearer token."}}
_missing = {404: {"model": ErrorOut, "description": "No such search or candidate."}}
_invalid = {422: {"model": ErrorOut, "description": "A parameter or the spec is wrong; `field` names it."}}
_conflict = {409: {"model": ErrorOut, "description": "Not possible in the search's current state."}}

router = APIRouter(prefix=PREFIX, dependencies=[Depends(require_token)], responses={**_errors, **_invalid})

SearchId = Path(..., ge=1, le=MAX_ID, description="The search's id.")
CandidateId = Path(..., ge=0, le=MAX_CANDIDATE_ID, description="The candidate's id (its index in the search).")
Format = Query("mergekit", description="mergekit (YAML that mergekit-yaml accepts) or json (ours, complete).")


def _store(request: Request) -> Any:
    return request.app.state.store


def _controller(request: Request) -> Any:
    return request.app.state.controller


def _search(request: Request, search_id: int) -> SearchRow:
    row = _store(request).get_search(search_id)
    if row is None:
        raise HTTPException(404, f"there is no search {search_id}")
    return row


def _evaluated(row: SearchRow) -> int:
    counts = row.counts or {}
    return int(counts.get("done", 0)) + int(counts.get("failed", 0))


def _brief(row: SearchRow) -> dict[str, Any]:
    return {"id": row.id, "name": row.name, "status": row.status, "algorithm": row.algorithm, "seed": row.seed,
            "budget": row.budget, "counts": dict(row.counts or {}), "evaluated": _evaluated(row),
            "stop_reason": row.stop_reason, "error": row.error, "created_at": row.created_at,
            "started_at": row.started_at, "finished_at": row.finished_at}


def _summary(request: Request, search_id: int) -> Summary:
    """The search's summary (best, front, references) from the server's cache, with its row read just now."""
    return request.app.state.summaries.get(_store(request), _search(request, search_id))


def search_document(summary: Summary) -> dict[str, Any]:
    """``GET /searches/{id}``: the ``status --json`` document, with the spec and the ranking rule."""
    document = summary.to_dict()
    document.update(_brief(summary.row))
    document["scalarize"] = summary.scoring.scalarize
    document["spec"] = summary.row.spec
    # new dicts: the summary (and its references) is shared by every request through the cache
    document["references"] = [{**r, "values": finite_values(r.get("values")),
                               "holdout": finite_values(r.get("holdout")), "score": finite(r.get("score"))}
                              for r in document["references"]]
    return document


# ------------------------------------------------------------------------------------------------ searches


@router.post("/searches", status_code=201, response_model=SearchCreated, tags=["searches"],
             responses={201: {"description": "Created; the Location header points at the search."},
                        503: {"model": ErrorOut, "description": "Shutting down, or busy checking other submissions "
                              "(Retry-After)."}})
def create_search(spec: JobSpec, request: Request, response: Response) -> dict[str, Any]:
    """Submit a search: the body is the job spec (the same document as a spec file, as JSON).

    Relative paths resolve against the server's model roots, and every path must lie inside them. Everything is
    checked before the search is stored (paths, the models against each other, the space against the models,
    data files): a wrong spec gets 422 naming the field, and nothing is written.
    """
    from evomerge.service.runner import prepare, submit
    from evomerge.service.submission import confine

    controller = _controller(request)
    if controller.stopping:
        raise HTTPException(503, "the server is shutting down; submit again when it is back")
    settings = request.app.state.settings
    spec = confine(spec, settings.model_roots, allow_python=settings.allow_python_scorers)
    controller.check_resources(spec)
    checking = request.app.state.checking
    if not checking.acquire(timeout=CHECK_WAIT_S):  # each check loads the models: a burst must not exhaust memory
        raise HTTPException(503, "the server is busy checking other submissions; submit again in a minute",
                            headers={"Retry-After": "30"})
    try:
        prepared = prepare(spec)
    finally:
        checking.release()
    store = _store(request)
    search_id = submit(store, spec, None, prepared=prepared)
    controller.hand_over(search_id, prepared)
    url = f"{PREFIX}/searches/{search_id}"
    response.headers["Location"] = url
    return {"id": search_id, "status": "queued", "url": url, "dashboard": f"/searches/{search_id}"}


@router.get("/searches", response_model=SearchPage, tags=["searches"])
def list_searches(request: Request,
                  status: Optional[Literal["queued", "running", "cancelling", "cancelled", "done", "failed"]] = None,
                  limit: int = Query(50, ge=0, le=500), offset: int = Query(0, ge=0, le=MAX_ID)) -> dict[str, Any]:
    """Searches, newest first."""
    store = _store(request)
    counts = store.count_searches()
    rows = store.list_searches(status=status, limit=limit, offset=offset)
    total = counts.get(status, 0) if status else sum(counts.values())
    return {"items": [_brief(r) for r in rows], "total": total, "limit": limit, "offset": offset}


@router.get("/searches/{search_id}", response_model=SearchOut, responses=_missing, tags=["searches"])
def get_search(request: Request, search_id: int = SearchId) -> dict[str, Any]:
    """A search: status, counts, the best candidate, the front (with holdout scores) and the experts' scores."""
    return search_document(_summary(request, search_id))


@router.post("/searches/{search_id}/cancel", response_model=StatusOut, responses={**_missing, **_conflict},
             tags=["searches"])
def cancel_search(request: Request, search_id: int = SearchId) -> dict[str, Any]:
    """Stop a search: a queued one at once, a running one within seconds (pending candidates stay for a resume)."""
    row = _search(request, search_id)
    if row.status in ("done", "failed"):
        raise HTTPException(409, f"search {search_id} is {row.status}; there is nothing to cancel")
    if row.status == "cancelled":
        return {"id": search_id, "status": "cancelled", "detail": "already cancelled"}
    status = _store(request).request_cancel(search_id)
    detail = "cancelled" if status == "cancelled" else "its runner stops within seconds"
    return {"id": search_id, "status": status, "detail": detail}


@router.post("/searches/{search_id}/resume", response_model=StatusOut, status_code=202,
             responses={**_missing, **_conflict}, tags=["searches"])
def resume_search(request: Request, search_id: int = SearchId) -> dict[str, Any]:
    """Queue a cancelled or failed search (or one whose runner died) again: it continues from its last
    checkpoint and ends with exactly the candidates of an uninterrupted run."""
    from evomerge.service.runner import live_runner

    store, controller = _store(request), _controller(request)
    row = _search(request, search_id)
    if row.status == "done":
        raise HTTPException(409, f"search {search_id} is done; there is nothing to resume")
    if row.status == "queued":
        return {"id": search_id, "status": "queued", "detail": "already queued"}
    if row.status == "cancelling":
        raise HTTPException(409, f"search {search_id} is being cancelled; resume it once it is cancelled")
    if row.status == "running":
        if search_id in controller.running_ids():
            raise HTTPException(409, f"search {search_id} is running on this server")
        alive = live_runner(store, search_id)
        if alive:
            raise HTTPException(409, f"search {search_id} is running: {alive}")
    store.set_status(search_id, "queued")
    store.add_event(search_id, "requeued", {"reason": "resume requested"})
    controller.wake()
    return {"id": search_id, "status": "queued", "detail": "queued; it continues from its last checkpoint"}


# ---------------------------------------------------------------------------------------------- candidates


def _candidate_brief(row: CandidateRow, score: float | None) -> dict[str, Any]:
    return {"id": row.index, "stage": row.stage, "status": row.status, "values": finite_values(row.values),
            "holdout": finite_values(row.holdout), "score": score, "reused_from": row.reused_from,
            "worker": row.worker, "attempts": row.attempts, "error": row.error,
            "merge_seconds": row.merge_seconds, "score_seconds": row.score_seconds, "created_at": row.created_at,
            "finished_at": row.finished_at, "has_recipe": row.recipe is not None}


def _scores(scoring: Scoring, rows: list[CandidateRow]) -> list[float | None]:
    """Each row's score under the search's ``scalarize`` rule (``None`` unless it is done and finite)."""
    scored = [r for r in rows if r.status == "done" and r.values]
    if not scored:
        return [None] * len(rows)
    nan = float("nan")
    values = [[nan if (v := (r.values or {}).get(n)) is None else v for n in scoring.names] for r in scored]
    by_index = {r.index: finite(x) for r, x in zip(scored, scoring.scores(values))}
    return [by_index.get(r.index) for r in rows]


@router.get("/searches/{search_id}/candidates", response_model=CandidatePage, responses=_missing,
            tags=["candidates"])
def list_candidates(request: Request, search_id: int = SearchId,
                    status: Optional[Literal["pending", "done", "failed"]] = None,
                    limit: int = Query(50, ge=0, le=1000), offset: int = Query(0, ge=0, le=MAX_CANDIDATE_ID),
                    order_by: str = Query("index", description="index, or an objective's name (best first)."),
                    descending: Optional[bool] = Query(None, description="Default: ascending ids; for an "
                                                       "objective, best first.")) -> dict[str, Any]:
    """A page of a search's candidates, filtered by status, sorted by id or by an objective."""
    row = _search(request, search_id)
    scoring = Scoring.of(row.spec)
    if order_by != "index" and order_by not in scoring.names:
        from evomerge.errors import UserError

        raise UserError(f"no objective {order_by!r} in search {search_id}; sort by index or one of "
                        f"{', '.join(scoring.names)}", where="order_by")
    if descending is None:
        direction = next((o.direction for o in scoring.objectives if o.name == order_by), None)
        descending = direction == "maximize"
    rows = _store(request).candidates(search_id, status=status, limit=limit, offset=offset, order_by=order_by,
                                      descending=descending)
    counts = row.counts or {}
    total = int(counts.get(status, 0) if status else counts.get("total", 0))
    return {"items": [_candidate_brief(r, s) for r, s in zip(rows, _scores(scoring, rows))], "total": total,
            "limit": limit, "offset": offset}


def _candidate(request: Request, search_id: int, candidate_id: int, *, per_example: bool = False) -> CandidateRow:
    """A candidate of a search the caller has found (:func:`_search`), or 404."""
    row = _store(request).candidate(search_id, candidate_id, with_per_example=per_example)
    if row is None:
        raise HTTPException(404, f"search {search_id} has no candidate {candidate_id}")
    return row


@router.get("/searches/{search_id}/candidates/{candidate_id}", response_model=CandidateOut, responses=_missing,
            tags=["candidates"])
def get_candidate(request: Request, search_id: int = SearchId, candidate_id: int = CandidateId,
                  per_example: bool = Query(False, description="Include every per-example score.")
                  ) -> dict[str, Any]:
    """One candidate: genome, recipe, scores, holdout scores, timings, worker, error."""
    search = _search(request, search_id)
    row = _candidate(request, search_id, candidate_id, per_example=True)
    scoring = Scoring.of(search.spec)
    out = _candidate_brief(row, _scores(scoring, [row])[0])
    out.update({"search_id": search_id, "genome": [float(g) for g in row.genome],
                "recipe": None if row.recipe is None else json.loads(row.recipe), "recipe_hash": row.recipe_hash})
    if row.per_example:
        out["examples"] = {k: int(len(v)) for k, v in row.per_example.items()}
        if per_example:
            out["per_example"] = {k: [finite(x) for x in v] for k, v in row.per_example.items()}
    return out


@router.get("/searches/{search_id}/front", response_model=FrontOut, responses=_missing, tags=["searches"])
def get_front(request: Request, search_id: int = SearchId) -> dict[str, Any]:
    """The Pareto front (best first by the search's score), the best candidate, the experts' scores, and the
    algorithm's report (MAP's predicted front and surrogate R²)."""
    document = search_document(_summary(request, search_id))
    checkpoint = _store(request).latest_checkpoint(search_id)
    keys = ("id", "status", "objectives", "scalarize", "best", "front", "references")
    return {**{k: document[k] for k in keys}, "report": None if checkpoint is None else checkpoint.report}


# ------------------------------------------------------------------------------------------------- recipes


def _recipe_response(search_id: int, row: CandidateRow, fmt: str) -> PlainTextResponse:
    from evomerge.merging import Recipe

    if row.recipe is None:
        raise HTTPException(409, f"candidate {row.index} is a set of weights (M2N2 from scratch), not a recipe")
    recipe = Recipe.model_validate_json(row.recipe)
    stem = f"evomerge-search-{search_id}-candidate-{row.index}"
    if fmt == "json":
        text, media, name = recipe.to_json() + "\n", "application/json", f"{stem}.json"
    else:
        try:
            text = recipe.to_mergekit_yaml()
        except RecipeError as e:
            raise HTTPException(409, f"candidate {row.index}'s recipe cannot be written as mergekit YAML "
                                f"({e.detail}); ask for format=json") from None
        media, name = "application/yaml", f"{stem}.yml"
    return PlainTextResponse(text, media_type=media, headers={"Content-Disposition": f'attachment; filename="{name}"'})


_recipe_doc = {200: {"content": {"application/yaml": {"schema": {"type": "object"}},
                                 "application/json": {"schema": {"type": "object"}}},
                     "description": "The recipe as a download."}, **_missing, **_conflict}


@router.get("/searches/{search_id}/candidates/{candidate_id}/recipe", response_model=None,
            responses=_recipe_doc, tags=["recipes"])
def candidate_recipe(request: Request, search_id: int = SearchId, candidate_id: int = CandidateId,
                     format: Literal["mergekit", "json"] = Format) -> PlainTextResponse:
    """Download a candidate's recipe: mergekit YAML (``mergekit-yaml recipe.yml out/``) or our JSON."""
    _search(request, search_id)
    return _recipe_response(search_id, _candidate(request, search_id, candidate_id), format)


@router.get("/searches/{search_id}/best/recipe", response_model=None, responses=_recipe_doc, tags=["recipes"])
def best_recipe(request: Request, search_id: int = SearchId,
                format: Literal["mergekit", "json"] = Format) -> PlainTextResponse:
    """Download the best candidate's recipe (the front member with the highest score)."""
    summary = _summary(request, search_id)
    if summary.best is None:
        raise HTTPException(409, f"search {search_id} has no successful candidate yet")
    return _recipe_response(search_id, _candidate(request, search_id, summary.best.index), format)


# -------------------------------------------------------------------------------------------------- events


def _sse(kind: str, data: Any, event_id: int | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {kind}\ndata: {json.dumps(data, default=str, allow_nan=False)}\n\n"


def progress_of(row: SearchRow) -> dict[str, Any]:
    return {"id": row.id, "status": row.status, "counts": dict(row.counts or {}), "evaluated": _evaluated(row),
            "budget": row.budget, "stop_reason": row.stop_reason, "error": row.error}


async def _event_stream(request: Request, search_id: int, after: int) -> AsyncIterator[str]:
    store, controller = _store(request), _controller(request)
    last: dict[str, Any] | None = None
    last_kind: str | None = None
    last_sent = time.monotonic()
    final_polls = 0
    yield "retry: 2000\n\n"
    while not controller.stopping:
        row = await run_in_threadpool(store.get_search, search_id)
        if row is None:
            yield _sse("end", {"id": search_id, "status": "deleted"})
            return
        events = await run_in_threadpool(store.events, search_id, after=after, limit=500)
        for event in events:
            after, last_kind = event.id, event.kind
            yield _sse(event.kind, {**_json_safe(event.data), "at": event.created_at.isoformat()}, event.id)
            last_sent = time.monotonic()
        progress = progress_of(row)
        if progress != last:
            last = progress
            yield _sse("progress", progress)
            last_sent = time.monotonic()
        if row.status in FINISHED_STATUSES and len(events) < 500:
            final_polls += 1
            # the runner writes its `finished` event just after the final status: end once it is sent (a search
            # cancelled while queued has none, so one more read settles it)
            if last_kind == "finished" or final_polls >= 2:
                yield _sse("end", progress)
                return
        if time.monotonic() - last_sent >= KEEPALIVE_S:
            yield ": keep-alive\n\n"
            last_sent = time.monotonic()
        if await request.is_disconnected():
            return
        await asyncio.sleep(EVENT_POLL_S)


def _json_safe(data: Any) -> Any:
    if isinstance(data, float):
        return finite(data)
    if isinstance(data, dict):
        return {k: _json_safe(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_json_safe(v) for v in data]
    return data


@router.get("/searches/{search_id}/events", response_class=StreamingResponse, tags=["searches"],
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "Server-sent events: `progress` (status and counts, when they change), "
                             "the search's own events (`started`, `stage`, `best`, `reference`, `requeued`, "
                             "`finished`) with their ids, and `end` once the search has finished."}, **_missing})
async def search_events(request: Request, search_id: int = SearchId,
                        after: int = Query(0, ge=0, le=MAX_ID, description="Only events after this id."),
                        last_event_id: Optional[str] = Header(None, description="Set by EventSource on reconnect.")
                        ) -> StreamingResponse:
    """Live progress as server-sent events (``EventSource``); the stream ends after the search finishes."""
    row = await run_in_threadpool(_store(request).get_search, search_id)
    if row is None:
        raise HTTPException(404, f"there is no search {search_id}")
    if last_event_id and last_event_id.strip().isdigit():
        after = max(after, min(int(last_event_id.strip()), MAX_ID))
    return StreamingResponse(_event_stream(request, search_id, after), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


__all__ = ["PREFIX", "progress_of", "router", "search_document"]
