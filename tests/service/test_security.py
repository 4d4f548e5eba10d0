"""Settings, tokens and model roots: what keeps a server from exposing itself or reading what it should not."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from evomerge.errors import UserError
from evomerge.service.app import create_app
from evomerge.service.auth import token_ok
from evomerge.service.settings import Settings, parse_roots, parse_tokens
from evomerge.service.submission import confine, resolve_in_roots
from evomerge.spec import JobSpec, SpecError

from service_helpers import digits_spec


def test_settings_come_from_the_environment_and_refuse_what_would_expose_the_server(tmp_path: Path) -> None:
    assert parse_tokens(" a , b,,c ") == ("a", "b", "c") and parse_tokens(None) == ()
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    assert parse_roots(f"{tmp_path / 'x'}:{tmp_path / 'y'}, {tmp_path}") == (tmp_path / "x", tmp_path / "y", tmp_path)
    settings = Settings.from_env({"EVOMERGE_API_TOKENS": "t1,t2", "EVOMERGE_MODEL_ROOTS": str(tmp_path),
                                  "EVOMERGE_MAX_CONCURRENT_SEARCHES": "3", "EVOMERGE_ALLOW_PYTHON_SCORERS": "yes",
                                  "EVOMERGE_EXECUTOR": "inline"})
    assert (settings.tokens, settings.model_roots, settings.max_concurrent) == (("t1", "t2"), (tmp_path,), 3)
    assert settings.allow_python_scorers and settings.executor == "inline"
    assert all("t1" not in line and "t2" not in line for line in settings.describe())
    # with tokens any address; without, loopback only
    assert settings.with_overrides(host="0.0.0.0").host == "0.0.0.0"
    with pytest.raises(UserError, match="127.0.0.1 only; set EVOMERGE_API_TOKENS") as info:
        Settings(model_roots=(tmp_path,)).with_overrides(host="0.0.0.0")
    assert info.value.where == "--host"
    for env, where in [({"EVOMERGE_MAX_CONCURRENT_SEARCHES": "many"}, "EVOMERGE_MAX_CONCURRENT_SEARCHES"),
                       ({"EVOMERGE_MAX_CONCURRENT_SEARCHES": "0"}, "EVOMERGE_MAX_CONCURRENT_SEARCHES"),
                       ({"EVOMERGE_MODEL_ROOTS": str(tmp_path / "nope")}, "EVOMERGE_MODEL_ROOTS"),
                       ({"EVOMERGE_EXECUTOR": "dask"}, "executor")]:
        with pytest.raises(UserError) as info:
            Settings.from_env(env)
        assert info.value.where == where


def test_tokens_match_exactly() -> None:
    tokens = ("alpha-token", "beta")
    assert token_ok("alpha-token", tokens) and token_ok("beta", tokens)
    for wrong in ("alpha", "alpha-token ", "betax", "", None, "ALPHA-TOKEN"):
        assert not token_ok(wrong, tokens), wrong
    assert not token_ok("anything", ())


def test_spec_paths_resolve_inside_the_model_roots_and_nowhere_else(tmp_path: Path) -> None:
    first, second, outside = tmp_path / "first", tmp_path / "second", tmp_path / "outside"
    for folder in (first, second / "digits" / "base", outside / "secret"):
        folder.mkdir(parents=True)
    (first / "escape").symlink_to(outside / "secret")
    roots = (first, second)
    # relative: the first root that has it
    assert resolve_in_roots("digits/base", roots, "models.base") == str(second / "digits" / "base")
    # relative and missing everywhere: under the first root (prepare then says it does not exist)
    assert resolve_in_roots("nothing", roots, "models.base") == str(first / "nothing")
    assert resolve_in_roots(str(second / "digits"), roots, "x") == str(second / "digits")
    for escape in ("escape", str(first / "escape"), "../outside/secret", str(outside), "/"):
        with pytest.raises(SpecError, match="outside the server's model roots") as info:
            resolve_in_roots(escape, roots, "models.experts.0.path")
        assert info.value.where == "models.experts.0.path"
    # names no file system holds are the user's mistake too, not a server error
    (first / "loop").symlink_to(first / "loop")
    for odd, why in (("digits/ba\0se", "NUL"), ("a" * 5000, "cannot resolve"), ("loop", "cannot resolve")):
        with pytest.raises(SpecError, match=why) as info:
            resolve_in_roots(odd, roots, "objectives.acc.task.data")
        assert info.value.where == "objectives.acc.task.data"


def test_confine_rewrites_every_path_and_refuses_python_objectives_unless_allowed(tmp_path: Path) -> None:
    (tmp_path / "digits").mkdir()
    spec = JobSpec.from_dict(digits_spec(pause={"seconds": 0}))
    with pytest.raises(SpecError, match="EVOMERGE_ALLOW_PYTHON_SCORERS=1") as info:
        confine(spec, (tmp_path,), allow_python=False)
    assert info.value.where == "objectives.pause.task.kind"
    confined = confine(spec, (tmp_path,), allow_python=True)
    assert confined.models.base == str(tmp_path / "digits" / "base")
    assert [e.path for e in confined.models.experts] == [str(tmp_path / "digits" / "expert_0_4"),
                                                         str(tmp_path / "digits" / "expert_5_9")]
    assert confined.objectives[0].task.holdout == str(tmp_path / "digits" / "test_0_4.npz")
    data = digits_spec()
    data["objectives"][1]["task"]["data"] = "/etc/passwd"
    with pytest.raises(SpecError) as info:
        confine(JobSpec.from_dict(data), (tmp_path,), allow_python=True)
    assert info.value.where == "objectives.acc_5_9.task.data"


def test_an_app_without_tokens_answers_on_loopback_and_still_refuses_python_scorers(tmp_path: Path) -> None:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'db.sqlite'}", model_roots=(tmp_path,),
                        executor="inline")
    with TestClient(create_app(settings), base_url="http://127.0.0.1:8000") as client:
        assert client.get("/api/v1/searches").json()["total"] == 0  # no token needed
        assert client.get("/").status_code == 200 and client.get("/login", follow_redirects=False).status_code == 303
        refused = client.post("/api/v1/searches", json=digits_spec(pause={"seconds": 0}))
        assert refused.status_code == 422 and refused.json()["field"] == "objectives.pause.task.kind"
        wrong_method = client.request("OPTIONS", "/api/v1/searches")
        assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "GET, POST"
        assert client.delete("/api/v1/searches/1").headers["allow"] == "GET"
        assert client.get("/api/v1/searches/0").status_code == 422
        assert client.get(f"/api/v1/searches/{2**63}").status_code == 422
        assert client.get("/api/v1/searches", params={"status": "sleeping"}).json()["field"] == "status"


def test_browsers_cannot_be_turned_against_the_server(tmp_path: Path) -> None:
    """DNS rebinding (a foreign Host) against a server without tokens, and cross-origin POSTs against any."""
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'db.sqlite'}", model_roots=(tmp_path,),
                        executor="inline")
    with TestClient(create_app(settings), base_url="http://127.0.0.1:8000") as client:
        for host in ("127.0.0.1:8000", "localhost:8000", "[::1]:8000", "LOCALHOST"):
            assert client.get("/api/v1/searches", headers={"Host": host}).status_code == 200, host
        for host in ("rebind.attacker.example:8000", "127.0.0.1.nip.io:8000", "0.0.0.0:8000"):
            refused = client.get("/api/v1/searches", headers={"Host": host})
            assert refused.status_code == 421 and refused.json()["field"] == "Host", host
            assert "EVOMERGE_API_TOKENS" in refused.json()["detail"]
        for origin in ("http://evil.example", "http://127.0.0.1:9999", "null", "http://localhost:8000"):
            forged = client.post("/api/v1/searches/1/cancel", headers={"Origin": origin})
            assert forged.status_code == 403 and forged.json()["field"] == "Origin", origin
        # the dashboard's own page (same origin) and programs (no Origin) pass: 404, there is no search 1
        assert client.post("/api/v1/searches/1/cancel", headers={"Origin": "http://127.0.0.1:8000"}).status_code == 404
        assert client.post("/api/v1/searches/1/cancel").status_code == 404
        assert client.get("/api/v1/searches", headers={"Origin": "http://evil.example"}).status_code == 200  # reads
    tokened = Settings(database_url=f"sqlite:///{tmp_path / 'db2.sqlite'}", model_roots=(tmp_path,),
                       executor="inline", tokens=("secret-token-1",), host="0.0.0.0")
    with TestClient(create_app(tokened), base_url="http://evomerge.example.org") as client:
        headers = {"Authorization": "Bearer secret-token-1"}
        assert client.get("/api/v1/searches", headers=headers).status_code == 200  # any host name with tokens
        # behind a proxy that rewrites Host, X-Forwarded-Host names what the browser sent to
        proxied = {**headers, "Host": "upstream:8000", "X-Forwarded-Host": "evomerge.example.org",
                   "Origin": "https://evomerge.example.org"}
        assert client.post("/api/v1/searches/1/cancel", headers=proxied).status_code == 404
        assert client.post("/api/v1/searches/1/cancel",
                           headers={**headers, "Origin": "https://evomerge.example.org:8443"}).status_code == 403


def test_an_unexpected_error_is_one_logged_traceback_and_a_json_500(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'db.sqlite'}", model_roots=(tmp_path,),
                        executor="inline")
    app = create_app(settings)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("a bug")

    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=True) as client:
        for _ in range(2):  # the app answers instead of raising, so the connection would stay usable
            response = client.get("/boom")
            assert response.status_code == 500
            assert response.json() == {"detail": "internal error; the server log has the details", "field": None}
        assert client.get("/healthz").status_code == 200
    failures = [r for r in caplog.records if r.getMessage() == "GET /boom failed"]
    assert len(failures) == 2 and all(r.exc_info and r.exc_info[0] is RuntimeError for r in failures)


def test_serve_refuses_to_listen_beyond_loopback_without_tokens(tmp_path: Path) -> None:
    from service_helpers import base_env, evomerge

    exposed = evomerge("serve", "--host", "0.0.0.0", "--db", f"sqlite:///{tmp_path / 'db.sqlite'}",
                       env=base_env(), timeout=60)
    assert exposed.returncode == 2 and "Traceback" not in exposed.stderr
    assert exposed.stderr.strip().splitlines() == [
        "error: --host: without API tokens the server answers on 127.0.0.1 only; set EVOMERGE_API_TOKENS "
        "(comma-separated) to serve on 0.0.0.0"]
    bad_db = evomerge("serve", "--db", "mysql://nowhere", env=base_env(), timeout=60)
    assert bad_db.returncode == 2 and bad_db.stderr.startswith("error: database") and "Traceback" not in bad_db.stderr
