"""A small client of the REST API, for the CLI's ``--server`` commands (``submit``, ``list``, ``status``, ``cancel``,
``resume``, ``recipe``, ``front``).

Every failure is one line: a server that does not answer, a missing or refused token, and the server's own
``{"detail": ...}`` for a request it refused (a wrong spec names the field). The token travels only in the
``Authorization`` header, never in a URL.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import httpx

from evomerge.errors import UserError

DEFAULT_SERVER = "http://127.0.0.1:8000"
SERVER_ENV = "EVOMERGE_SERVER"
TOKEN_ENV = "EVOMERGE_TOKEN"


class ServerError(UserError):
    """The server failed (5xx) or answered something that is not the API: not the user's mistake, exit 1."""

    exit_code = 1


class Client:
    """``Client(server, token)``; use as a context manager or call :meth:`close`."""

    def __init__(self, server: str | None = None, token: str | None = None, *, timeout: float = 60.0) -> None:
        server = (server or os.environ.get(SERVER_ENV) or DEFAULT_SERVER).strip()
        if "://" not in server:
            server = "http://" + server
        self.server = server.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.has_token = bool(token)
        self.http = httpx.Client(base_url=self.server, headers=headers, timeout=timeout)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, "/api/v1" + path, **kwargs)
        except httpx.InvalidURL:
            raise UserError(f"{self.server} is not a server URL; write it like http://host:8000",
                            where="--server") from None
        except httpx.TimeoutException:
            raise ServerError(f"{self.server} did not answer in time", where="--server") from None
        except httpx.TransportError as e:
            raise UserError(f"no evomerge server answers at {self.server} ({e}); start one with `evomerge serve` "
                            f"or fix --server / {SERVER_ENV}", where="--server") from None
        if response.status_code == 401:
            why = ("the server refused this token" if self.has_token else
                   f"the server needs an API token; pass --token or set {TOKEN_ENV}")
            raise UserError(why, where="--token")
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail")
            except ValueError:
                detail = None
            if not isinstance(detail, str):
                detail = f"{response.status_code} {response.reason_phrase}"
            if response.status_code >= 500:
                raise ServerError(f"the server failed: {detail}", where=self.server)
            raise UserError(detail)
        return response

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.request(method, path, **kwargs)
        try:
            return response.json()
        except ValueError:
            raise ServerError(f"{self.server} answered something that is not evomerge's API",
                              where="--server") from None

    # -- the API --------------------------------------------------------------------------------------------

    def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self.json("POST", "/searches", json=spec)

    def searches(self, *, status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        return self.json("GET", "/searches", params=params)["items"]

    def search(self, search_id: int) -> dict[str, Any]:
        return self.json("GET", f"/searches/{search_id}")

    def cancel(self, search_id: int) -> dict[str, Any]:
        return self.json("POST", f"/searches/{search_id}/cancel")

    def resume(self, search_id: int) -> dict[str, Any]:
        return self.json("POST", f"/searches/{search_id}/resume")

    def recipe(self, search_id: int, candidate: str, fmt: str) -> tuple[int | None, str]:
        """(candidate id when known, text) of a candidate's recipe (``candidate``: an id or ``best``)."""
        fmt = "json" if fmt == "json" else "mergekit"
        if str(candidate).lower() == "best":
            response = self.request("GET", f"/searches/{search_id}/best/recipe", params={"format": fmt})
        else:
            try:
                index = int(candidate)
            except ValueError:
                raise UserError(f"{candidate!r} is neither a candidate id nor 'best'", where="--candidate") from None
            response = self.request("GET", f"/searches/{search_id}/candidates/{index}/recipe", params={"format": fmt})
        name = response.headers.get("content-disposition", "")
        index = None
        if "candidate-" in name:
            digits = name.split("candidate-")[-1].split(".")[0]
            index = int(digits) if digits.isdigit() else None
        return index, response.text

    def scored(self, search_id: int, page: int = 1000) -> Iterator[tuple[int, dict[str, Any]]]:
        """(id, values) of every ``done`` candidate scored by a worker (what ``front -o x.png`` draws)."""
        offset = 0
        while True:
            items = self.json("GET", f"/searches/{search_id}/candidates",
                              params={"status": "done", "limit": page, "offset": offset})["items"]
            for item in items:
                if item.get("reused_from") is None:
                    yield item["id"], item["values"] or {}
            if len(items) < page:
                return
            offset += page


__all__ = ["Client", "DEFAULT_SERVER", "SERVER_ENV", "ServerError", "TOKEN_ENV"]
