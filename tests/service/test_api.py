"""The REST API against a real ``evomerge serve`` process on 127.0.0.1: submit → run → front → recipes that
mergekit accepts and that materialize into the model the search scored; tokens, 404s, 422s naming the field with
nothing stored, paging and sorting, the event stream, cancel and resume, metrics and health, the dashboard's
pages, and the CLI's ``--server`` commands.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import yaml

from evomerge.merging import Recipe, load_merged

from service_helpers import TOKEN, LiveServer, base_env, digits_spec, evomerge, wait_for


def _done_search(server: LiveServer, **kwargs) -> tuple[int, dict]:
    with server.client() as client:
        response = client.post("/api/v1/searches", json=digits_spec(**kwargs))
        assert response.status_code == 201, response.text
        search_id = response.json()["id"]
        document = wait_for(client, search_id, server=server)
    assert document["status"] == "done", document
    return search_id, document


@pytest.fixture(scope="module")
def finished(api_server: LiveServer) -> tuple[int, dict]:
    """One finished NSGA-II search (24 candidates) on the shared server."""
    return _done_search(api_server, name="finished")


# ------------------------------------------------------------------------------------ the whole journey


def test_a_search_submitted_over_rest_runs_on_ray_and_its_recipe_materializes_as_scored(
        tmp_path: Path, model_root: Path) -> None:
    db = f"sqlite:///{tmp_path / 'ray.db'}"
    with LiveServer(tmp_path / "srv", db=db, roots=[model_root], executor="ray") as server, server.client() as api:
        spec = digits_spec(name="on-ray", budget=32, workers=2)
        created = api.post("/api/v1/searches", json=spec)
        assert created.status_code == 201, created.text
        search_id = created.json()["id"]
        assert created.headers["location"] == f"/api/v1/searches/{search_id}"
        document = wait_for(api, search_id, server=server)
        assert document["status"] == "done", document
        assert document["counts"] == {"pending": 0, "done": 32, "failed": 0, "total": 32}
        # relative paths resolved inside the model root
        assert document["spec"]["models"]["base"] == str(model_root / "digits" / "base")

        front = api.get(f"/api/v1/searches/{search_id}/front").json()
        assert front["front"] and front["best"]["id"] == front["front"][0]["id"]
        assert {r["name"] for r in front["references"]} == {"low", "high"}  # the experts, scored alone
        low = next(r for r in front["references"] if r["name"] == "low")
        assert low["values"]["acc_0_4"] > 0.8 and low["values"]["acc_5_9"] < 0.2
        assert set(front["best"]["holdout"]) == {"acc_0_4", "acc_5_9"}  # holdout beside the search scores
        workers = {c["worker"] for c in api.get(f"/api/v1/searches/{search_id}/candidates",
                                                params={"limit": 100}).json()["items"]}
        assert workers and all(w.startswith("ray:") for w in workers) and len(workers) == 2, workers

        download = api.get(f"/api/v1/searches/{search_id}/best/recipe", params={"format": "mergekit"})
        assert download.status_code == 200
        assert download.headers["content-disposition"] == (
            f'attachment; filename="evomerge-search-{search_id}-candidate-{front["best"]["id"]}.yml"')
        text = download.text

    from mergekit.config import MergeConfiguration

    config = MergeConfiguration.model_validate(yaml.safe_load(text))  # mergekit takes it unchanged
    assert config.merge_method == "ties" and len(config.models) == 2
    recipe_file = tmp_path / "best.yml"
    recipe_file.write_text(text)
    out = tmp_path / "merged"
    done = evomerge("materialize", recipe_file, out)
    assert done.returncode == 0, done.stderr
    # the written model scores what the search scored
    model = load_merged(out).eval()
    for task in ("0_4", "5_9"):
        arrays = np.load(model_root / "digits" / f"search_{task}.npz")
        with torch.no_grad():
            output = model(torch.as_tensor(arrays["x"], dtype=torch.float32))
        logits = getattr(output, "logits", output)
        accuracy = float((logits.argmax(-1).numpy() == arrays["y"]).mean())
        assert accuracy == pytest.approx(front["best"]["values"][f"acc_{task}"], abs=1e-9)
    assert Recipe.from_mergekit_yaml(text).merge_method == "ties"


# ------------------------------------------------------------------------------------------------ auth


def test_every_api_route_needs_a_token_and_the_dashboard_keeps_it_in_a_strict_cookie(
        api_server: LiveServer, finished: tuple[int, dict]) -> None:
    search_id, _ = finished
    routes = [("GET", "/searches"), ("POST", "/searches"), ("GET", f"/searches/{search_id}"),
              ("GET", f"/searches/{search_id}/candidates"), ("GET", f"/searches/{search_id}/candidates/0"),
              ("GET", f"/searches/{search_id}/front"), ("GET", f"/searches/{search_id}/events"),
              ("GET", f"/searches/{search_id}/best/recipe"), ("GET", f"/searches/{search_id}/candidates/0/recipe"),
              ("POST", f"/searches/{search_id}/cancel"), ("POST", f"/searches/{search_id}/resume")]
    for token in (None, "wrong-token", TOKEN[:-1]):
        with api_server.client(token) as client:
            for method, path in routes:
                response = client.request(method, "/api/v1" + path, json={} if method == "POST" else None)
                assert response.status_code == 401, (method, path, token, response.text)
                assert response.headers["www-authenticate"] == "Bearer"
                assert "detail" in response.json()
    with api_server.client(None) as anonymous:
        assert anonymous.get("/healthz").status_code == 200
        assert anonymous.get("/metrics").status_code == 200
        page = anonymous.get("/", follow_redirects=False)
        assert page.status_code == 303 and page.headers["location"] == "/login?next=/"
        assert anonymous.get("/login").status_code == 200
        refused = anonymous.post("/login", data={"token": "nope", "next": "/"}, follow_redirects=False)
        assert refused.status_code == 401 and "not valid" in refused.text
        accepted = anonymous.post("/login", data={"token": TOKEN, "next": f"/searches/{search_id}"},
                                  follow_redirects=False)
        assert accepted.status_code == 303 and accepted.headers["location"] == f"/searches/{search_id}"
        cookie = accepted.headers["set-cookie"]
        assert "evomerge_token=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
        # the cookie opens the dashboard and its API calls
        assert anonymous.get(f"/searches/{search_id}").status_code == 200
        assert anonymous.get("/api/v1/searches").status_code == 200
        # an open redirect it is not
        elsewhere = anonymous.post("/login", data={"token": TOKEN, "next": "//evil.example/x"},
                                   follow_redirects=False)
        assert elsewhere.headers["location"] == "/"
    assert TOKEN not in api_server.log()


def test_unknown_searches_and_candidates_are_404(api_server: LiveServer, finished: tuple[int, dict]) -> None:
    search_id, _ = finished
    with api_server.client() as client:
        for path in ("/searches/987654", "/searches/987654/front", "/searches/987654/candidates",
                     f"/searches/{search_id}/candidates/99999", f"/searches/{search_id}/candidates/99999/recipe",
                     "/searches/987654/best/recipe", "/searches/987654/events"):
            response = client.get("/api/v1" + path)
            assert response.status_code == 404, (path, response.text)
            assert "987654" in response.json()["detail"] or "99999" in response.json()["detail"]
        for action in ("cancel", "resume"):
            assert client.post(f"/api/v1/searches/987654/{action}").status_code == 404
        assert client.get(f"/api/v1/searches/{search_id}/candidates/-1").status_code == 422
        done = client.post(f"/api/v1/searches/{search_id}/cancel")
        assert done.status_code == 409 and "done" in done.json()["detail"]
        assert client.post(f"/api/v1/searches/{search_id}/resume").status_code == 409


# ------------------------------------------------------------------------------------------ bad specs


def _outside(model_root: Path) -> Path:
    """A model folder outside the root, reached through a symlink inside it."""
    import shutil

    target = model_root.parent / "outside-the-root"
    if not target.exists():
        shutil.copytree(model_root / "digits" / "expert_0_4", target)
    link = model_root / "sneaky-link"
    if not link.is_symlink():
        link.symlink_to(target)
    return link


BAD_SPECS = {
    "unknown method": (lambda s, r: s["space"].update(method="frankenmerge"), "space.method", "unknown merge method"),
    "reversed bounds": (lambda s, r: s["space"]["search"].update(weight=[1.5, 0.0]), "space.search.weight",
                        "low < high"),
    "absolute path outside the roots": (lambda s, r: s["models"].update(base="/etc"), "models.base",
                                        "outside the server's model roots"),
    "symlink out of the roots": (lambda s, r: s["models"]["experts"][0].update(path=str(_outside(r).name)),
                                 "models.experts.0.path", "outside the server's model roots"),
    "dot-dot out of the roots": (lambda s, r: s["models"]["experts"][1].update(path="../../etc"),
                                 "models.experts.1.path", "outside the server's model roots"),
    "missing model": (lambda s, r: s["models"]["experts"][1].update(path="digits/expert_9_9"),
                      "models.experts.1.path", "does not exist"),
    "missing data file": (lambda s, r: s["objectives"][0]["task"].update(data="digits/search_x.npz"),
                          "objectives.acc_0_4.task.data", "does not exist"),
    "unknown algorithm": (lambda s, r: s["algorithm"].update(name="annealing"), "algorithm.name",
                          "unknown algorithm"),
    "zero budget": (lambda s, r: s["budget"].update(evaluations=0), "budget.evaluations", "greater than or equal"),
    "unknown field": (lambda s, r: s.update(colour="blue"), "colour", "unknown field 'colour' (known: version, name"),
}


@pytest.mark.parametrize("case", list(BAD_SPECS))
def test_a_wrong_spec_is_422_naming_the_field_and_stores_nothing(api_server: LiveServer, model_root: Path,
                                                                  case: str) -> None:
    change, field, words = BAD_SPECS[case]
    spec = digits_spec(name=f"bad-{case}")
    change(spec, model_root)
    with api_server.client() as client:
        before = client.get("/api/v1/searches").json()["total"]
        response = client.post("/api/v1/searches", json=spec)
        assert response.status_code == 422, response.text
        body = response.json()
        assert body["field"] == field, body
        assert words in body["detail"] and body["detail"].startswith(field), body
        assert client.get("/api/v1/searches").json()["total"] == before


def test_malformed_and_oversized_bodies_are_refused(api_server: LiveServer) -> None:
    with api_server.client() as client:
        before = client.get("/api/v1/searches").json()["total"]
        broken = client.post("/api/v1/searches", content=b"{not json", headers={"content-type": "application/json"})
        assert broken.status_code == 422 and "JSON" in broken.json()["detail"]
        huge = client.post("/api/v1/searches", content=b"x" * (2 << 20), headers={"content-type": "application/json"})
        assert huge.status_code == 413 and "larger than" in huge.json()["detail"]

        def chunks():  # no Content-Length: the limit counts what arrives
            for _ in range(40):
                yield b" " * 65536

        streamed = client.post("/api/v1/searches", content=chunks(), headers={"content-type": "application/json"})
        assert streamed.status_code == 413
        assert client.get("/api/v1/searches").json()["total"] == before


# ------------------------------------------------------------------------------- candidates and recipes


def test_candidates_page_filter_and_sort_and_each_recipe_downloads(api_server: LiveServer,
                                                                    finished: tuple[int, dict]) -> None:
    search_id, document = finished
    with api_server.client() as client:
        base = f"/api/v1/searches/{search_id}/candidates"
        page = client.get(base, params={"limit": 5, "offset": 5}).json()
        assert [c["id"] for c in page["items"]] == [5, 6, 7, 8, 9] and page["total"] == 24
        best_first = client.get(base, params={"order_by": "acc_0_4", "limit": 24}).json()["items"]
        values = [c["values"]["acc_0_4"] for c in best_first]
        assert values == sorted(values, reverse=True)
        worst_first = client.get(base, params={"order_by": "acc_5_9", "descending": False, "limit": 24}).json()
        values = [c["values"]["acc_5_9"] for c in worst_first["items"]]
        assert values == sorted(values)
        assert client.get(base, params={"status": "failed"}).json() == {"items": [], "total": 0, "limit": 50,
                                                                       "offset": 0}
        wrong = client.get(base, params={"order_by": "loss"})
        assert wrong.status_code == 422 and wrong.json()["field"] == "order_by"
        assert client.get(base, params={"limit": 5000}).status_code == 422

        best = document["best"]["id"]
        one = client.get(f"{base}/{best}", params={"per_example": True}).json()
        assert one["values"] == document["best"]["values"] and len(one["genome"]) == 8
        assert one["recipe"]["merge_method"] == "ties" and one["examples"]["acc_0_4"] == len(
            one["per_example"]["acc_0_4"]) > 100
        assert np.mean(one["per_example"]["acc_0_4"]) == pytest.approx(one["values"]["acc_0_4"])

        as_json = client.get(f"{base}/{best}/recipe", params={"format": "json"})
        assert as_json.headers["content-type"].startswith("application/json")
        assert as_json.headers["content-disposition"].endswith(f'candidate-{best}.json"')
        stored = Recipe.model_validate(one["recipe"])
        assert Recipe.model_validate_json(as_json.text).fingerprint() == stored.fingerprint()
        as_yaml = client.get(f"{base}/{best}/recipe")
        assert as_yaml.headers["content-type"].startswith("application/yaml")
        _same_weights(Recipe.from_mergekit_yaml(as_yaml.text), stored)
        assert client.get(f"/api/v1/searches/{search_id}/best/recipe").text == as_yaml.text
        assert client.get(f"{base}/{best}/recipe", params={"format": "toml"}).json()["field"] == "format"


def _same_weights(a: Recipe, b: Recipe) -> None:
    """Two recipes that merge into the same weights (a mergekit YAML names models by path, ours by name)."""
    from evomerge.merging.modelset import load_for

    merged_a, merged_b = load_for(a).merge(a), load_for(b).merge(b)
    assert merged_a.keys() == merged_b.keys()
    for name, tensor in merged_a.items():
        assert torch.equal(tensor, merged_b[name]), name


# --------------------------------------------------------------------------------- live: events, cancel


def _events(text: str) -> list[tuple[str | None, str, dict]]:
    out = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(":"))
        if "event" in fields:
            out.append((fields.get("id"), fields["event"], json.loads(fields["data"])))
    return out


def test_the_event_stream_replays_a_finished_search_and_resumes_after_the_last_event_id(
        api_server: LiveServer, finished: tuple[int, dict]) -> None:
    search_id, document = finished
    with api_server.client() as client:
        response = client.get(f"/api/v1/searches/{search_id}/events")
        assert response.headers["content-type"].startswith("text/event-stream")
        events = _events(response.text)
    kinds = [kind for _, kind, _ in events]
    # the experts are scored alone before the search starts; `end` comes last, after `finished`
    assert kinds[:2] == ["reference", "reference"] and kinds[-1] == "end"
    assert kinds.index("started") < kinds.index("best") < kinds.index("finished") and "progress" in kinds
    ids = [int(i) for i, _, _ in events if i is not None]
    assert ids == sorted(ids)
    last_best = [d for _, k, d in events if k == "best"][-1]
    assert last_best["index"] == document["best"]["id"]
    assert events[-1][2]["status"] == "done" and events[-1][2]["evaluated"] == 24
    started_id = next(i for i, k, _ in events if k == "started")
    with api_server.client(headers={"Last-Event-ID": started_id}) as client:
        again = _events(client.get(f"/api/v1/searches/{search_id}/events").text)
    assert "started" not in [k for _, k, _ in again] and all(int(i) > int(started_id) for i, _, _ in again if i is not None)


def test_a_running_search_streams_progress_and_can_be_cancelled_and_resumed(api_server: LiveServer) -> None:
    spec = digits_spec(name="slow", algorithm="cmaes", budget=24, pause={"seconds": 0.15})
    with api_server.client() as client:
        search_id = client.post("/api/v1/searches", json=spec).json()["id"]
        seen: list[dict] = []
        with client.stream("GET", f"/api/v1/searches/{search_id}/events") as stream:
            buffer = ""
            for chunk in stream.iter_text():
                buffer += chunk
                events = _events(buffer)
                seen = [d for _, k, d in events if k == "progress"]
                if any(d["status"] == "running" and d["counts"].get("done", 0) >= 6 for d in seen):
                    cancel = client.post(f"/api/v1/searches/{search_id}/cancel")
                    assert cancel.status_code == 200 and cancel.json()["status"] in ("cancelling", "cancelled")
                    break
        cancelled = wait_for(client, search_id, server=api_server)
        assert cancelled["status"] == "cancelled" and cancelled["evaluated"] < 24
        assert [d["evaluated"] for d in seen] == sorted(d["evaluated"] for d in seen)  # progress only grows
        resumed = client.post(f"/api/v1/searches/{search_id}/resume")
        assert resumed.status_code == 202 and resumed.json()["status"] == "queued"
        done = wait_for(client, search_id, server=api_server)
        assert done["status"] == "done" and done["counts"] == {"pending": 0, "done": 24, "failed": 0, "total": 24}
        events = _events(client.get(f"/api/v1/searches/{search_id}/events").text)
        assert [d["reason"] for _, k, d in events if k == "requeued"] == ["resume requested"]
        assert [k for _, k, _ in events].count("reference") == 2  # the experts are scored once per search


# ----------------------------------------------------------------------------- metrics, health, pages


def test_metrics_and_health(api_server: LiveServer, finished: tuple[int, dict]) -> None:
    with api_server.client(None) as client:
        text = client.get("/metrics").text
        health = client.get("/healthz").json()
    assert 'evomerge_searches{status="done"}' in text and "evomerge_queue_depth" in text
    assert "evomerge_candidates_per_second" in text and "evomerge_workers" in text
    done = float(next(line.split()[-1] for line in text.splitlines()
                      if line.startswith('evomerge_searches{status="done"}')))
    assert done >= 1
    assert health["status"] == "ok" and health["database"] == "postgresql" and health["queued"] >= 0


def test_the_dashboard_serves_its_pages_figures_and_plotly_offline(api_server: LiveServer,
                                                                   finished: tuple[int, dict]) -> None:
    search_id, document = finished
    with api_server.client() as client:
        client.post("/login", data={"token": TOKEN})
        listing = client.get("/")
        assert listing.status_code == 200 and "Searches" in listing.text
        page = client.get(f"/searches/{search_id}")
        assert page.status_code == 200 and 'id="front-plot"' in page.text and "/vendor/plotly.min.js" in page.text
        assert "cdn" not in page.text.lower()
        figures = client.get(f"/ui/searches/{search_id}/figures").json()
        names = [trace.get("name") for trace in figures["front"]["data"]]
        assert names == ["candidates", "front", f"best (#{document['best']['id']})", "experts alone"]
        front_trace = figures["front"]["data"][1]
        assert sorted(front_trace["customdata"]) == sorted(p["id"] for p in document["front"])
        assert figures["map"] is None and figures["progress"]["data"][1]["name"] == "best so far"
        bundle = client.get("/vendor/plotly.min.js")
        assert bundle.status_code == 200 and len(bundle.content) > 1_000_000
        assert client.get("/searches/987654").status_code == 404


def test_a_map_search_shows_its_predicted_front_beside_the_evaluated_one(api_server: LiveServer) -> None:
    spec = digits_spec(name="map", algorithm="map", budget=28, options={}, method="task_arithmetic")
    spec["space"] = {"kind": "coefficients", "search": {"weight": [0.0, 1.0]}}
    with api_server.client() as client:
        created = client.post("/api/v1/searches", json=spec)
        assert created.status_code == 201, created.text
        search_id = created.json()["id"]
        assert wait_for(client, search_id, server=api_server)["status"] == "done"
        report = client.get(f"/api/v1/searches/{search_id}/front").json()["report"]["optimizer"]
        figures = client.get(f"/ui/searches/{search_id}/figures").json()
        page = client.get(f"/searches/{search_id}").text
    assert report["mode"] == "map" and len(report["predicted_front"]["values"]) > 1
    assert 'id="map-plot"' in page
    names = [trace["name"] for trace in figures["map"]["data"]]
    assert names == ["predicted by the surrogates", "prediction → evaluation", "evaluated"]
    evaluated = figures["map"]["data"][2]
    assert list(evaluated["x"]) == [v[0] for v in report["evaluated_front"]["values"]]
    assert "R²" in figures["map"]["layout"]["title"]["text"]


# ---------------------------------------------------------------------------------------------- the CLI


def test_the_cli_submits_waits_and_manages_searches_on_the_server(api_server: LiveServer, tmp_path: Path,
                                                                  model_root: Path) -> None:
    spec = digits_spec(name="from-the-cli", budget=16)
    # the spec's paths are relative to its own folder on this machine: the CLI resolves them (server on loopback)
    folder = tmp_path / "job"
    folder.mkdir()
    (folder / "digits").symlink_to(model_root / "digits")
    spec_file = folder / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    env = base_env(EVOMERGE_SERVER=api_server.url, EVOMERGE_TOKEN=TOKEN)
    submitted = evomerge("submit", spec_file, "--wait", "--json", env=env)
    assert submitted.returncode == 0, submitted.stderr
    document = json.loads(submitted.stdout)
    search_id = document["id"]
    assert document["status"] == "done" and document["best"] is not None
    listed = json.loads(evomerge("list", "--json", env=env).stdout)
    assert search_id in [s["id"] for s in listed]
    status = json.loads(evomerge("status", search_id, "--json", env=env).stdout)
    assert status["front"] == document["front"] and status["best"] == document["best"]
    table = evomerge("status", search_id, env=env)
    assert table.returncode == 0 and "Pareto front" in table.stdout
    recipe = evomerge("recipe", search_id, "-o", tmp_path / "best.yml", env=env)
    assert recipe.returncode == 0 and f"candidate {document['best']['id']}" in recipe.stdout
    assert Recipe.from_mergekit_yaml((tmp_path / "best.yml").read_text()).merge_method == "ties"
    front_csv = evomerge("front", search_id, "-o", tmp_path / "front.csv", env=env)
    assert front_csv.returncode == 0 and (tmp_path / "front.csv").read_text().startswith("candidate,kind,acc_0_4")
    assert "expert:low" in (tmp_path / "front.csv").read_text()
    front_png = evomerge("front", search_id, "-o", tmp_path / "front.png", env=env)
    assert front_png.returncode == 0 and (tmp_path / "front.png").read_bytes()[:4] == b"\x89PNG"
    already = evomerge("cancel", search_id, env=env)
    assert already.returncode == 0 and "already done" in already.stdout

    # mistakes: one line, exit 2
    no_token = evomerge("list", env=base_env(EVOMERGE_SERVER=api_server.url))
    assert no_token.returncode == 2 and "needs an API token" in no_token.stderr
    assert len(no_token.stderr.strip().splitlines()) == 1
    wrong = evomerge("list", "--token", "wrong", env=base_env(EVOMERGE_SERVER=api_server.url))
    assert wrong.returncode == 2 and "refused this token" in wrong.stderr
    nobody = evomerge("list", "--server", "http://127.0.0.1:9", env=base_env())
    assert nobody.returncode == 2 and "no evomerge server answers" in nobody.stderr
    bad = digits_spec(name="bad")
    bad["models"]["base"] = str(tmp_path)  # exists here, but outside the server's model roots
    bad_file = tmp_path / "bad.yaml"
    bad_file.write_text(yaml.safe_dump(bad))
    refused = evomerge("submit", bad_file, env=env)
    assert refused.returncode == 2 and "models.base" in refused.stderr and "outside" in refused.stderr
    assert "Traceback" not in refused.stderr
    missing = evomerge("status", 987654, env=env)
    assert missing.returncode == 2 and "no search 987654" in missing.stderr
