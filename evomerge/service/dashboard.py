"""The dashboard: the searches list, a search's page (front, best so far, MAP's fronts, candidates, downloads),
and the login form that turns a token into a cookie.

Pages are Jinja2 templates; their scripts (``static/dashboard.js``) read the REST API with the page's cookie and
draw the figures :mod:`evomerge.service.figures` builds with Plotly.js, which is served from the ``plotly``
package itself (``/vendor/plotly.min.js``): no CDN, the dashboard works offline. Pages update live from the
search's event stream.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from evomerge import __version__
from evomerge.service.auth import COOKIE, COOKIE_MAX_AGE, authorized, token_ok
from evomerge.service.results import MAX_ID, Scoring

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=str(HERE / "templates"))
router = APIRouter(include_in_schema=False)


def plotly_js() -> Path:
    """The Plotly.js bundle that ships inside the ``plotly`` Python package."""
    import plotly

    return Path(plotly.__file__).parent / "package_data" / "plotly.min.js"


def _login_redirect(request: Request) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/login?next={quote(target)}", status_code=303)


def _safe_next(target: str | None) -> str:
    """Only paths of this site (``/…``, not ``//host``): the login form is no open redirect."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def _page(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
    settings = request.app.state.settings
    context.update({"version": __version__, "auth": settings.auth})
    return templates.TemplateResponse(request, name, context, status_code=status)


@router.get("/", response_class=HTMLResponse)
def index(request: Request) -> Response:
    if not authorized(request):
        return _login_redirect(request)
    return _page(request, "index.html")


@router.get("/searches/{search_id}", response_class=HTMLResponse)
def search_page(request: Request, search_id: int) -> Response:
    if not authorized(request):
        return _login_redirect(request)
    row = None if not 1 <= search_id <= MAX_ID else request.app.state.store.get_search(search_id)
    if row is None:
        return _page(request, "missing.html", status=404, search_id=search_id)
    scoring = Scoring.of(row.spec)
    objectives = [{"name": o.name, "direction": o.direction} for o in scoring.objectives]
    return _page(request, "search.html", search=row, objectives=objectives, scalarize=scoring.scalarize)


@router.get("/ui/searches/{search_id}/figures")
def search_figures(request: Request, search_id: int) -> Response:
    """The page's charts as Plotly figure JSON (see :func:`evomerge.service.figures.figures`)."""
    from evomerge.service.figures import figures

    if not authorized(request):
        return JSONResponse({"detail": "log in first"}, status_code=401)
    store = request.app.state.store
    row = store.get_search(search_id) if 1 <= search_id <= MAX_ID else None
    if row is None:
        raise HTTPException(404, f"there is no search {search_id}")
    summary = request.app.state.summaries.get(store, row)
    scored = [(index, values) for index, values, _ in summary.scored]
    checkpoint = store.latest_checkpoint(search_id) if summary.row.algorithm == "map" else None
    body = figures(summary, scored, None if checkpoint is None else checkpoint.report)
    return JSONResponse(body, headers={"Cache-Control": "no-store"})


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str = "/") -> Response:
    if not request.app.state.settings.auth:
        return RedirectResponse(_safe_next(next), status_code=303)
    return _page(request, "login.html", next=_safe_next(next), error=None)


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request) -> Response:
    """Check the token once and keep it in an HttpOnly, SameSite=Strict cookie (Secure over HTTPS)."""
    settings = request.app.state.settings
    form = parse_qs((await request.body()).decode("utf-8", "replace"))
    token = (form.get("token") or [""])[0].strip()
    target = _safe_next((form.get("next") or ["/"])[0])
    if settings.auth and not token_ok(token, settings.tokens):
        return _page(request, "login.html", status=401, next=target, error="That token is not valid.")
    response = RedirectResponse(target, status_code=303)
    if settings.auth:
        response.set_cookie(COOKIE, token, max_age=COOKIE_MAX_AGE, httponly=True, samesite="strict",
                            secure=request.url.scheme == "https", path="/")
    return response


@router.post("/logout")
def logout() -> Response:
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


@router.get("/vendor/plotly.min.js")
def plotly_bundle() -> Response:
    return FileResponse(plotly_js(), media_type="text/javascript",
                        headers={"Cache-Control": "public, max-age=86400"})


__all__ = ["plotly_js", "router", "templates"]
