"""The FastAPI application: REST API, dashboard, health and metrics, around one store and one controller.

>>> app = create_app(Settings.from_env())           # doctest: +SKIP
>>> uvicorn.run(app, host="127.0.0.1", port=8000)    # or: evomerge serve

Errors are JSON ``{"detail": "...", "field": "..."}``: a user's mistake names the field and the fix (422), a
missing search or candidate is 404, a request that the search's state does not allow is 409, a missing or wrong
token 401, a body over the limit 413; a state-changing request from another web page's origin is 403, and a
server without tokens answers 421 to requests not addressed to a loopback name (:mod:`evomerge.service.guards`).
No route answers a user's mistake with a traceback.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import threading
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Iterator

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.gzip import GZipMiddleware
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from evomerge import __version__
from evomerge.errors import UserError, first_error
from evomerge.service.guards import CatchAll, LoopbackHosts, SameOrigin, error_response, header
from evomerge.service.results import SummaryCache
from evomerge.service.schemas import HealthOut
from evomerge.service.settings import Settings
from evomerge.spec import JobSpec

log = logging.getLogger("evomerge.service")

FREEZE_EVERY_S = 2.0
CHECKS_AT_ONCE = 2  # submissions whose models are loaded and checked at the same time (each holds a model set)


class _Request(BaseModel):
    """Where a request's fields live, so an unknown key in a submitted spec lists the keys its level takes."""

    body: JobSpec


DESCRIPTION = """Evolutionary search for model-merge recipes.

Submit a job spec (`POST /api/v1/searches`), follow it (`GET /api/v1/searches/{id}`, or live with
`GET /api/v1/searches/{id}/events`), and download recipes as mergekit YAML or evomerge JSON. When the server has
API tokens (`EVOMERGE_API_TOKENS`), send one as `Authorization: Bearer <token>`."""


def _status_of(error: UserError) -> int:
    from evomerge.storage.repository import (AlreadyFinishedError, NotFoundError, SearchBusyError,
                                             StatusTransitionError)

    if isinstance(error, NotFoundError):
        return 404
    if isinstance(error, (AlreadyFinishedError, SearchBusyError, StatusTransitionError)):
        return 409
    return 422


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413, whether announced (Content-Length) or streamed.

    The body is read here, up to the limit, before the app sees the request, and then handed on: a body that
    grows past the limit is refused before any route parses it (routes would turn a failed read into a 400).
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = error_response(413, f"the request body is larger than this server accepts "
                                        f"({self.max_bytes} bytes; EVOMERGE_MAX_BODY_BYTES)")
        try:
            announced = int(header(scope, b"content-length") or 0)
        except ValueError:
            announced = 0
        if announced > self.max_bytes:
            await too_large(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await too_large(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # later reads wait for the disconnect, as the server's receive does

        await self.app(scope, replay, send)


def _leaves(routes: Any) -> Iterator[Any]:
    """Every route, also those of included routers (which FastAPI keeps nested; ours add no prefix of their
    own when included, their routes carry full paths)."""
    for route in routes:
        nested = getattr(route, "original_router", None)
        if nested is not None:
            yield from _leaves(nested.routes)
        else:
            yield route


def allowed_methods(app: Any, scope: dict) -> list[str]:
    """The methods of every route whose path matches ``scope``'s (for a 405's ``Allow`` header)."""
    methods: set[str] = set()
    for route in _leaves(app.router.routes):
        match, _ = route.matches({**scope, "method": "\x00"})
        if match != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


async def _freeze_imports(every: float = FREEZE_EVERY_S) -> None:
    """Keep imported modules out of the garbage collector's full passes.

    Runners import torch, Ray, pymoo, scipy… on their first search: some 200,000 long-lived objects that every
    full collection would scan again (80-150 ms with the GIL held, measured by ``benchmarks/api_load.py``: the
    slowest API answers). Whenever modules were imported since the last look, the heap is frozen
    (:func:`gc.freeze`), after one full collection so that no garbage is frozen with it; objects freed later by
    reference counting are still freed, objects in cycles made since the freeze by the collector."""
    known = -1
    while True:
        if len(sys.modules) != known:
            known = len(sys.modules)
            gc.collect()  # garbage frozen now would never be collected
            gc.freeze()
        await asyncio.sleep(every)


def create_app(settings: Settings | None = None, *, executor_factory: Callable[[Any], Any] | None = None,
               start_controller: bool = True) -> FastAPI:
    """The application for ``settings`` (default: from the environment). The store and the controller start
    with the app's lifespan and stop with it (the controller checkpoints running searches and leaves them
    queued). ``executor_factory`` replaces how the controller makes executors (tests)."""
    from evomerge.service import api, dashboard

    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from evomerge.service.controller import Controller
        from evomerge.service.metrics import registry_for
        from evomerge.storage import Store

        store = await run_in_threadpool(Store, settings.database_url)
        controller = Controller(store, settings, executor_factory=executor_factory)
        app.state.store, app.state.controller = store, controller
        app.state.metrics = registry_for(store, controller)
        if start_controller:
            await run_in_threadpool(controller.start)
        freezer = asyncio.create_task(_freeze_imports())
        try:
            yield
        finally:
            freezer.cancel()
            await run_in_threadpool(controller.shutdown)
            store.close()

    app = FastAPI(title="evomerge", version=__version__, description=DESCRIPTION, lifespan=lifespan,
                  openapi_tags=[{"name": "searches"}, {"name": "candidates"}, {"name": "recipes"},
                                {"name": "service"}])
    app.state.settings = settings
    app.state.summaries = SummaryCache()
    app.state.checking = threading.BoundedSemaphore(CHECKS_AT_ONCE)

    @app.exception_handler(UserError)
    async def user_error(request: Request, error: UserError) -> JSONResponse:
        return error_response(_status_of(error), str(error), error.where)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        if first.get("type") == "json_invalid":
            why = (first.get("ctx") or {}).get("error")
            return error_response(422, "the body is not valid JSON" + (f" ({why})" if why else "")
                                  + "; send the job spec as a JSON object")
        field, message = first_error(error, _Request)
        parts = field.split(".")
        if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
            parts = parts[1:]
        field = ".".join(parts) or None
        return error_response(422, f"{field}: {message}" if field else message, field)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        headers = dict(getattr(error, "headers", None) or {})
        if error.status_code == 405:  # every method of the path (Starlette names only the first route's)
            headers["Allow"] = ", ".join(allowed_methods(request.app, request.scope))
        return error_response(error.status_code, str(error.detail), headers=headers or None)

    app.include_router(api.router)
    app.include_router(dashboard.router)

    @app.get("/healthz", response_model=HealthOut, tags=["service"],
             responses={503: {"model": HealthOut, "description": "The database does not answer."}})
    def healthz(request: Request) -> Any:
        """Liveness and readiness: the database answers; how many searches wait and which run here."""
        store, controller = request.app.state.store, request.app.state.controller
        try:
            store.ping()
            queued = store.count_searches()["queued"]
        except Exception as e:  # the database is down: not ready
            log.warning("health check: the database does not answer: %s", e)
            body = {"status": "unavailable", "database": "unreachable", "version": __version__, "queued": 0,
                    "running": controller.running_ids()}
            return JSONResponse(body, status_code=503)
        status = "stopping" if controller.stopping else "ok"
        return {"status": status, "database": store.backend, "version": __version__, "queued": queued,
                "running": controller.running_ids()}

    @app.get("/metrics", tags=["service"], response_class=Response,
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format."}})
    def metrics(request: Request) -> Response:
        """Prometheus metrics: searches by status, queue depth, candidates per second, workers."""
        from prometheus_client import CONTENT_TYPE_LATEST

        from evomerge.service.metrics import render

        return Response(render(request.app.state.metrics), media_type=CONTENT_TYPE_LATEST)

    app.mount("/static", StaticFiles(directory=str(dashboard.HERE / "static")), name="static")
    # outermost last: CatchAll, LoopbackHosts (no tokens), SameOrigin, BodyLimit, GZip, then the routes
    app.add_middleware(GZipMiddleware, minimum_size=1024)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(SameOrigin)
    if not settings.auth:
        app.add_middleware(LoopbackHosts)
    app.add_middleware(CatchAll)
    return app


__all__ = ["BodyLimit", "create_app"]
