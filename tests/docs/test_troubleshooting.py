"""docs/troubleshooting.md quotes what evomerge really prints: each entry's error is produced here and compared
with the ```text block under the entry's heading.

Every entry listed in ``CASES`` is reproduced for real, in a workspace laid out as the page describes (the digits
bed in ``testbeds/digits``, the spec in ``job.yaml``): command-line mistakes through ``evomerge.cli:main`` (the
console script's entry point) in this process, with stderr captured, and REST answers through the FastAPI app
with its controller stopped, so nothing is ever searched and no Ray starts. Variable parts are substituted before
comparing: the workspace becomes ``/home/me/evomerge`` as on the page, and ports, process ids and ages take the
page's values. A message that changes in the code, or a page line that drifts, fails the test of that heading.
One test also runs the real console script once, to show that the in-process runs print what a user sees.

Entries not in ``CASES`` (Ray workers dying, a port already in use, mergekit's own errors...) need Ray, a second
server or the network; the page quotes them from real runs.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "troubleshooting.md"
HOME = "/home/me/evomerge"  # the page's workspace
TOKEN = "s3cret-token"

# The page's job.yaml: a copy of examples/cmaes-digits.yaml as it is when the page was written (a snapshot, so
# that line numbers in the malformed-YAML entry stay put when the example's comments change).
SPEC = """\
# CMA-ES searches a TIES merge of two digits experts (0-4 and 5-9): one weight and one density per expert and
# layer (8 numbers). The two accuracies are averaged into the one score CMA-ES climbs (scalarize: mean); the
# holdout files are scored for the best candidate and the front only, to show overfitting to the search set.
# Each expert alone scores ~0.48 on the mean of the two tasks; merges reach ~0.8 and more.
#
# Build the offline test bed first (a few seconds; paths below are relative to this file's folder):
#   evomerge testbed build digits examples/testbeds/digits
# then:
#   evomerge run examples/cmaes-digits.yaml              # a local Ray with 2 workers; --executor inline for one
#   evomerge front <ID> -o front.png                       # the trade-off between the two tasks
#   evomerge recipe <ID> --candidate best                  # the best merge as a mergekit YAML
name: cmaes-digits
seed: 0
models:
  base: testbeds/digits/base
  experts:
    - {name: low, path: testbeds/digits/expert_0_4}
    - {name: high, path: testbeds/digits/expert_5_9}
space:
  kind: parameter
  method: ties
  layer_groups: 2                      # the MLP has two layers: one value per expert and layer
  search: {weight: [0.0, 1.5], density: [0.1, 1.0]}
  fixed: {normalize: false}
objectives:
  - name: acc_0_4
    task: {kind: classification, data: testbeds/digits/search_0_4.npz, holdout: testbeds/digits/test_0_4.npz}
    metric: accuracy
    direction: maximize
  - name: acc_5_9
    task: {kind: classification, data: testbeds/digits/search_5_9.npz, holdout: testbeds/digits/test_5_9.npz}
    metric: accuracy
    direction: maximize
algorithm:
  name: cmaes
  options: {popsize: 8, sigma0: 0.17}
  scalarize: mean
budget: {evaluations: 200, wall_time_s: 600}
resources: {workers: 2, gpus_per_worker: 0, cpus_per_worker: 1}
"""

# A mergekit YAML that `evomerge recipe` could have written for this workspace (paths relative to the file).
MERGEKIT = """\
merge_method: ties
base_model: testbeds/digits/base
models:
- model: testbeds/digits/expert_0_4
  parameters: {weight: [0.55, 0.63], density: [0.79, 0.70]}
- model: testbeds/digits/expert_5_9
  parameters: {weight: [0.80, 0.49], density: [0.73, 0.99]}
parameters: {normalize: false}
"""

# The user's scorer of the "every candidate failed" entry: it expects JSONL columns, but .npz data has x and y.
SCORER = '''\
def score(model, tokenizer, data):
    return [float(label) for label in data["label"]]
'''


# ------------------------------------------------------------------------------------------------ the page


def quoted(heading: str) -> list[str]:
    """The lines of the first ```text block under ``### heading`` (before the next heading)."""
    text = PAGE.read_text(encoding="utf-8")
    match = re.search(rf"^###\s+{re.escape(heading)}\s*$(.*?)(?=^#{{1,3}}\s|\Z)", text, re.M | re.S)
    assert match, f"docs/troubleshooting.md has no heading '### {heading}'"
    block = re.search(r"^```text\n(.*?)^```", match[1], re.M | re.S)
    assert block, f"'### {heading}' quotes no ```text block"
    return [line for line in block[1].splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------- workspace


@dataclass
class Workspace:
    root: Path

    def spec(self, *edits: tuple[str, str], name: str = "job.yaml") -> str:
        """Write the page's job.yaml with each (old, new) replaced once; returns the file name."""
        text = SPEC
        for old, new in edits:
            assert old in text, old
            text = text.replace(old, new, 1)
        (self.root / name).write_text(text)
        return name

    def home(self, text: str) -> str:
        """The workspace's path written as the page's."""
        return text.replace(str(self.root), HOME)


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    from evomerge.testbeds import build

    root = tmp_path_factory.mktemp("troubleshooting").resolve()
    bed = Path(build("digits", root / "testbeds" / "digits", seed=0, size="ci"))
    expert = bed / "expert_5_9"
    weights = load_file(expert / "model.safetensors")
    # an expert with a narrower hidden layer (128 instead of 256): same names, other shapes
    narrow = {k: (v[:128] if v.shape[0] == 256 else v[:, :128] if v.dim() == 2 and v.shape[1] == 256 else v)
              for k, v in weights.items()}
    # an expert with one NaN weight; another whose tensors have other names (another architecture)
    with_nan = {k: v.clone() for k, v in weights.items()}
    with_nan["0.bias"][7] = float("nan")
    other = {f"encoder.{k}": v for k, v in weights.items()}
    for name, tensors in (("narrow", narrow), ("nan", with_nan), ("other_model", other)):
        shutil.copytree(expert, root / name)
        save_file({k: v.contiguous() for k, v in tensors.items()}, root / name / "model.safetensors")
    (root / "empty").mkdir()
    (root / "best.yml").write_text(MERGEKIT)
    (root / "myscore.py").write_text(SCORER)
    return Workspace(root)


# ---------------------------------------------------------------------------------------------------- CLI

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@contextlib.contextmanager
def _environment(env: dict[str, str | None]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in env}
    try:
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def cli(ws: Workspace, *args: str, data: str = "data") -> tuple[int, list[str]]:
    """``evomerge ARGS`` run as the console script runs it (``evomerge.cli:main``), in the workspace, with the
    data folder ``data`` and no evomerge settings from the caller's environment; returns the exit code and the
    ``error:`` lines it printed, workspace paths written as the page's. A traceback propagates: it is a bug."""
    from evomerge.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    environment = {"EVOMERGE_DATA_DIR": str(ws.root / data), "EVOMERGE_DATABASE_URL": None,
                   "EVOMERGE_RAY_ADDRESS": None, "EVOMERGE_SERVER": None, "EVOMERGE_TOKEN": None,
                   "EVOMERGE_API_TOKENS": None, "EVOMERGE_MODEL_ROOTS": None}
    argv, cwd = sys.argv, Path.cwd()
    sys.argv = ["evomerge", *args]
    os.chdir(ws.root)
    code = 0
    try:
        with _environment(environment), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
        os.chdir(cwd)
    printed = _ANSI.sub("", stderr.getvalue())
    return code, [ws.home(line) for line in printed.splitlines() if line.startswith("error:")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_spec(*edits: tuple[str, str]) -> Callable[[Workspace], tuple[int, list[str]]]:
    """`evomerge run job.yaml --executor inline` on the page's spec with ``edits``."""
    def produce(ws: Workspace) -> tuple[int, list[str]]:
        return cli(ws, "run", ws.spec(*edits), "--executor", "inline")
    return produce


def command(*args: str) -> Callable[[Workspace], tuple[int, list[str]]]:
    """`evomerge ARGS` as given."""
    def produce(ws: Workspace) -> tuple[int, list[str]]:
        return cli(ws, *args)
    return produce


def _database(ws: Workspace, name: str) -> str:
    folder = ws.root / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    return f"sqlite:///{folder / 'evomerge.db'}"


def _create(store: Any, status: str = "queued") -> int:
    """A search row in ``status`` (enough for the commands that only read its state)."""
    return store.create_search(name="cmaes-digits", spec={}, algorithm="cmaes", seed=0, budget=200,
                               objectives=[{"name": "acc_0_4", "direction": "maximize"}], status=status)


def resume_live_runner(ws: Workspace) -> tuple[int, list[str]]:
    """Searches 1 and 2, whose runners look alive: one is this live process (on this host), the other runs on
    another host and has just written its heartbeat. The page shows another process id and older heartbeats."""
    from evomerge.storage import Store

    url = _database(ws, "busy")
    with Store(url) as store:
        here, there = _create(store), _create(store)
        store.start_search(here, owner=f"{socket.gethostname()}:{os.getpid()}:0f3a")
        store.start_search(there, owner="gpu-node-2:4242:9c1e")
    lines = []
    for search_id in (here, there):
        code, printed = cli(ws, "resume", str(search_id), "--db", url, "--executor", "inline")
        assert code == 1, printed
        lines += [re.sub(r"\d+ s (ago|old)", lambda m: {"ago": "2 s ago", "old": "12 s old"}[m[1]],
                         line.replace(f"process {os.getpid()}", "process 48213")) for line in printed]
    return 1, lines


def resume_done(ws: Workspace) -> tuple[int, list[str]]:
    from evomerge.storage import Store

    url = _database(ws, "done")
    with Store(url) as store:
        search_id = _create(store, "done")
    return cli(ws, "resume", str(search_id), "--db", url, "--executor", "inline")


def weights_have_no_recipe(ws: Workspace) -> tuple[int, list[str]]:
    from evomerge.storage import Store
    from evomerge.storage.repository import NewCandidate

    url = _database(ws, "weights")
    with Store(url) as store:
        search_id = _create(store, "done")
        store.add_candidates(search_id, [NewCandidate(index=22, genome=np.zeros(4))])
    return cli(ws, "recipe", str(search_id), "--candidate", "22", "--db", url)


def every_candidate_failed(ws: Workspace) -> tuple[int, list[str]]:
    edits = (("    metric: accuracy\n    direction: maximize\nalgorithm:",
              "    metric: accuracy\n    direction: maximize\n  - name: mine\n"
              "    task: {kind: python, function: 'myscore:score', data: testbeds/digits/search_0_4.npz}\n"
              "algorithm:"),
             ("  name: cmaes\n  options: {popsize: 8, sigma0: 0.17}", "  name: random\n  options: {batch: 2}"),
             ("evaluations: 200", "evaluations: 2"))
    try:
        return cli(ws, "run", ws.spec(*edits), "--executor", "inline", data="failing")
    finally:
        sys.modules.pop("myscore", None)


def nothing_answers_at_ray_address(ws: Workspace) -> tuple[int, list[str]]:
    """In a process of its own: a Ray that another test started in this process would be joined instead."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVOMERGE_") and k != "FORCE_COLOR"}
    done = subprocess.run([str(Path(sys.executable).parent / "evomerge"), "run", ws.spec(), "--ray-address",
                           f"127.0.0.1:{port}"], cwd=ws.root, capture_output=True, text=True, timeout=120,
                          env={**env, "EVOMERGE_DATA_DIR": str(ws.root / "data")})
    lines = [ws.home(line) for line in _ANSI.sub("", done.stderr).splitlines() if line.startswith("error:")]
    return done.returncode, [line.replace(f":{port}", ":6379") for line in lines]


def postgres_refuses(ws: Workspace) -> tuple[int, list[str]]:
    port = free_port()
    code, lines = cli(ws, "list", "--db", f"postgresql://me@127.0.0.1:{port}/evomerge")
    return code, [line.replace(f":{port}", ":5432").replace(f"port {port}", "port 5432") for line in lines]


def postgres_has_no_such_database(ws: Workspace) -> tuple[int, list[str]]:
    """The suite's PostgreSQL (127.0.0.1:5432, trust auth) asked for a database it does not have."""
    from evomerge.storage.testing import database_for_tests

    with database_for_tests("postgresql"):  # skips or fails (CI) like every PostgreSQL test when none answers
        pass
    name = f"evomerge_missing_{os.getpid()}"
    code, lines = cli(ws, "list", "--db", f"postgresql://postgres@127.0.0.1:5432/{name}")
    return code, [line.replace(name, "evomerge") for line in lines]


def psycopg2_driver(ws: Workspace) -> tuple[int, list[str]]:
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return cli(ws, "list", "--db", "postgresql+psycopg2://me@db-host:5432/evomerge")
    pytest.skip("psycopg2 is installed here")


def no_server_answers(ws: Workspace) -> tuple[int, list[str]]:
    port = free_port()
    code, lines = cli(ws, "list", "--server", f"http://127.0.0.1:{port}")
    return code, [line.replace(f":{port}", ":8000") for line in lines]


def gpus_on_cpu(ws: Workspace) -> tuple[int, list[str]]:
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    return run_spec(("gpus_per_worker: 0", "gpus_per_worker: 1"))(ws)


def recipe_file(name: str, text: str, *args: str) -> Callable[[Workspace], tuple[int, list[str]]]:
    """Write ``text`` to ``name`` in the workspace, then run `evomerge ARGS`."""
    def produce(ws: Workspace) -> tuple[int, list[str]]:
        (ws.root / name).write_text(text)
        return cli(ws, *args)
    return produce


def _piecewise_recipe() -> str:
    """The JSON recipe of an M2N2 `fields` member (element granularity): a method mergekit does not have."""
    from evomerge.merging import Recipe

    return Recipe.model_validate({
        "merge_method": "piecewise_linear", "base_model": "base",
        "models": [{"model": "seed_0_4", "parameters": {"weights": [0.01, 0.02, 0.67]}},
                   {"model": "seed_5_9", "parameters": {"weights": [1.24, 1.24, 0.59]}}],
        "parameters": {"breaks": [1715, 5913]},
        "sources": {"base": "testbeds/digits/base", "seed_0_4": "testbeds/digits/seeds/seed_0_4",
                    "seed_5_9": "testbeds/digits/seeds/seed_5_9"}}).to_json()


def out_dir_taken(ws: Workspace) -> tuple[int, list[str]]:
    merged = ws.root / "merged"
    merged.mkdir()
    (merged / "model.safetensors").write_text("")
    try:
        return cli(ws, "materialize", "best.yml", "merged")
    finally:
        shutil.rmtree(merged)


# --------------------------------------------------------------------------------------------------- REST


@contextlib.contextmanager
def app(ws: Workspace, base_url: str = "http://127.0.0.1:8000", **settings: Any) -> Iterator[Any]:
    """A TestClient on the server's app with its controller stopped (nothing runs), model root testbeds/."""
    from fastapi.testclient import TestClient

    from evomerge.service.app import create_app
    from evomerge.service.settings import Settings

    options = {"database_url": _database(ws, "server"), "model_roots": (ws.root / "testbeds",), "executor": "inline",
               "tokens": (TOKEN,), **settings}
    with TestClient(create_app(Settings(**options), start_controller=False), base_url=base_url) as client:
        yield client


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def body(*edits: tuple[str, str]) -> dict:
    """The page's spec as a REST body: paths relative to the server's model root (testbeds/)."""
    import yaml

    text = SPEC.replace("testbeds/digits", "digits")
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new, 1)
    return yaml.safe_load(text)


def answer(response: Any, status: int) -> list[str]:
    """The body of a response that must have ``status``, as curl prints it."""
    assert response.status_code == status, response.text
    return [response.text]


def rest_401(ws: Workspace) -> tuple[int, list[str]]:
    with app(ws) as client:
        missing = client.get("/api/v1/searches")
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = client.get("/api/v1/searches", headers={"Authorization": "Bearer s3cret-tokn"})
        return 401, answer(missing, 401) + answer(wrong, 401)


def rest_421(ws: Workspace) -> tuple[int, list[str]]:
    with app(ws, tokens=(), base_url="http://evomerge.lab.example:8000") as client:
        return 421, answer(client.get("/api/v1/searches"), 421)


def rest_403(ws: Workspace) -> tuple[int, list[str]]:
    with app(ws) as client:
        forged = client.post("/api/v1/searches/1/cancel", headers={**AUTH, "Origin": "http://evil.example"})
        return 403, answer(forged, 403)


def rest_outside_roots(ws: Workspace) -> tuple[int, list[str]]:
    with app(ws) as client:
        spec = body(("path: digits/expert_5_9", "path: ../narrow"))
        return 422, [ws.home(line) for line in answer(client.post("/api/v1/searches", json=spec, headers=AUTH), 422)]


def rest_python(ws: Workspace) -> tuple[int, list[str]]:
    with app(ws) as client:
        spec = body()
        spec["objectives"].append({"name": "mine", "task": {"kind": "python", "function": "myscore:score",
                                                            "data": "digits/search_0_4.npz"}})
        return 422, answer(client.post("/api/v1/searches", json=spec, headers=AUTH), 422)


def rest_413(ws: Workspace) -> tuple[int, list[str]]:
    with app(ws) as client:
        big = json.dumps({**body(), "name": "x" * (1 << 20)})
        return 413, answer(client.post("/api/v1/searches", content=big, headers={**AUTH, "Content-Type":
                                                                               "application/json"}), 413)


def rest_503(ws: Workspace) -> tuple[int, list[str]]:
    from evomerge.service import api

    with app(ws) as client:
        checking = client.app.state.checking
        held = [checking.acquire(blocking=False) for _ in range(2)]  # two other submissions are being checked
        assert all(held)
        wait, api.CHECK_WAIT_S = api.CHECK_WAIT_S, 0.05
        try:
            busy = client.post("/api/v1/searches", json=body(), headers=AUTH)
        finally:
            api.CHECK_WAIT_S = wait
            for _ in held:
                checking.release()
        assert busy.headers["retry-after"] == "30"
        return 503, answer(busy, 503)


def rest_too_big_for_ray(ws: Workspace) -> tuple[int, list[str]]:
    with app(ws, executor="ray", ray_cpus=2) as client:  # the controller is stopped: no Ray starts
        spec = body(("workers: 2", "workers: 8"))
        return 422, answer(client.post("/api/v1/searches", json=spec, headers=AUTH), 422)


def rest_cancel_done(ws: Workspace) -> tuple[int, list[str]]:
    with app(ws) as client:
        search_id = _create(client.app.state.store, "done")
        return 409, answer(client.post(f"/api/v1/searches/{search_id}/cancel", headers=AUTH), 409)


def rest_recipe_not_mergekit(ws: Workspace) -> tuple[int, list[str]]:
    from evomerge.storage.repository import NewCandidate

    with app(ws) as client:
        store = client.app.state.store
        search_id = _create(store, "done")
        store.add_candidates(search_id, [NewCandidate(index=6, genome=np.zeros(4), recipe=_piecewise_recipe())])
        response = client.get(f"/api/v1/searches/{search_id}/candidates/6/recipe", headers=AUTH)
        return 409, answer(response, 409)


# ------------------------------------------------------------------------------------------------ the table

Produce = Callable[[Workspace], tuple[int, list[str]]]

# heading on the page -> (the exit code or HTTP status it states, how to produce each line of its text block)
CASES: dict[str, tuple[int, list[Produce]]] = {
    # the job spec
    "A misspelled field": (2, [run_spec(("  layer_groups: 2 ", "  layer_group: 2 "))]),
    "A misspelled merge parameter": (2, [run_spec(("density: [0.1, 1.0]", "densty: [0.1, 1.0]"))]),
    "An unknown merge method": (2, [run_spec(("method: ties", "method: tie"))]),
    "An unknown algorithm": (2, [run_spec(("  name: cmaes\n", "  name: cma-es\n"))]),
    "An unknown algorithm option": (2, [run_spec(("popsize: 8", "pop_size: 8"))]),
    "Reversed bounds": (2, [run_spec(("weight: [0.0, 1.5]", "weight: [1.5, 0.0]")),
                            run_spec(("weight: [0.0, 1.5]", "weight: 0.5"))]),
    "A bound outside the parameter's range": (2, [run_spec(("density: [0.1, 1.0]", "density: [0.1, 1.5]"))]),
    "A value of the wrong type or out of range": (2, [run_spec(("evaluations: 200", "evaluations: 0")),
                                                      run_spec(("layer_groups: 2 ", "layer_groups: two "))]),
    "Malformed YAML": (2, [run_spec(("weight: [0.0, 1.5], density", "weight: [0.0, 1.5, density"))]),
    "An M2N2 space with another algorithm, or the reverse": (2, [
        run_spec(("kind: parameter", "kind: fields"), ("  search: {weight: [0.0, 1.5], density: [0.1, 1.0]}\n", ""),
                 ("  fixed: {normalize: false}\n", "")),
        run_spec(("  name: cmaes\n", "  name: m2n2\n"), ("{popsize: 8, sigma0: 0.17}", "{archive_size: 20}")),
        run_spec(("  name: cmaes\n", "  name: map\n"), ("{popsize: 8, sigma0: 0.17}", "{}"))]),
    "A layer-path space on models without transformer layers": (2, [
        run_spec(("kind: parameter", "kind: dataflow"), ("  search: {weight: [0.0, 1.5], density: [0.1, 1.0]}\n", ""),
                 ("  fixed: {normalize: false}\n", ""))]),
    "The spec file does not exist": (2, [command("run", "job.yml", "--executor", "inline")]),
    # models and data
    "The test bed is not built": (2, [run_spec(("base: testbeds/digits/base", "base: examples/testbeds/digits/base"))]),
    "A model path that does not exist": (2, [run_spec(("path: testbeds/digits/expert_5_9",
                                                       "path: testbeds/digits/expert_5_8"))]),
    "A data file that does not exist": (2, [run_spec(("data: testbeds/digits/search_5_9.npz",
                                                      "data: testbeds/digits/search_5_9.npy"))]),
    "A folder without weights": (2, [run_spec(("path: testbeds/digits/expert_5_9", "path: empty"))]),
    "Experts whose shapes differ from the base": (2, [run_spec(("path: testbeds/digits/expert_5_9", "path: narrow"))]),
    "An expert of another architecture": (2, [run_spec(("path: testbeds/digits/expert_5_9", "path: other_model"))]),
    "NaN or Inf weights": (2, [run_spec(("path: testbeds/digits/expert_5_9", "path: nan"))]),
    # running
    "GPUs asked on a machine without one": (2, [gpus_on_cpu]),
    "Resume refused: the runner still looks alive": (1, [resume_live_runner]),
    "Resuming a finished search": (2, [resume_done]),
    "Every candidate failed": (1, [every_candidate_failed]),
    # Ray
    "Nothing answers at --ray-address": (2, [nothing_answers_at_ray_address]),
    # the database
    "PostgreSQL does not answer": (2, [postgres_refuses]),
    "The PostgreSQL database does not exist": (2, [postgres_has_no_such_database]),
    "A driver evomerge does not use": (2, [psycopg2_driver]),
    "An unsupported database": (2, [command("list", "--db", "mysql://me@db-host/evomerge")]),
    "The SQLite file's folder does not exist": (2, [command("list", "--db", "sqlite:///nowhere/evomerge.db")]),
    # the server
    "Serving beyond loopback without tokens": (2, [command("serve", "--host", "0.0.0.0")]),
    "No server answers at --server": (2, [no_server_answers]),
    "401: no token, or a wrong one": (401, [rest_401]),
    "421: a host name other than localhost": (421, [rest_421]),
    "403: a POST from another site": (403, [rest_403]),
    "422: a path outside the model roots": (422, [rest_outside_roots]),
    "422: a python objective": (422, [rest_python]),
    "422: more workers than the server's Ray has": (422, [rest_too_big_for_ray]),
    "413: the body is too large": (413, [rest_413]),
    "503: busy checking other submissions": (503, [rest_503]),
    "409: cancelling a finished search": (409, [rest_cancel_done]),
    # recipes
    "A recipe mergekit cannot express": (2, [
        recipe_file("member.json", _piecewise_recipe(), "recipe", "convert", "member.json", "--to", "mergekit")]),
    "A recipe mergekit cannot express over REST": (409, [rest_recipe_not_mergekit]),
    "A set of weights has no recipe": (2, [weights_have_no_recipe]),
    "A job spec given as a recipe, or a recipe as a job spec": (2, [command("materialize", "job.yaml", "merged"),
                                                                   command("run", "best.yml", "--executor", "inline")]),
    "A recipe value out of range": (2, [recipe_file("bad.yml", MERGEKIT.replace("density: [0.73", "density: [1.73"),
                                                    "recipe", "validate", "bad.yml")]),
    "The output folder is not empty": (2, [out_dir_taken]),
}


@pytest.mark.parametrize("heading", list(CASES))
def test_the_page_quotes_what_evomerge_prints(ws: Workspace, heading: str) -> None:
    status, producers = CASES[heading]
    expected = quoted(heading)
    produced: list[str] = []
    for produce in producers:
        code, lines = produce(ws)
        assert code == status, f"'{heading}': exit code or status {code}, the page says {status}: {lines}"
        produced += lines
    assert produced == expected, f"'{heading}': the program prints\n" + "\n".join(produced)


def test_the_console_script_prints_the_same_line(ws: Workspace) -> None:
    """The in-process runs above print what the installed `evomerge` prints, exit code included."""
    script = Path(sys.executable).parent / "evomerge"
    name = ws.spec(("density: [0.1, 1.0]", "densty: [0.1, 1.0]"), name="job.yaml")
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")}
    done = subprocess.run([str(script), "run", name, "--executor", "inline"], cwd=ws.root, capture_output=True,
                          text=True, timeout=120, env={**env, "EVOMERGE_DATA_DIR": str(ws.root / "data")})
    assert done.returncode == 2
    assert done.stderr.splitlines() == quoted("A misspelled merge parameter")
    assert done.stdout == ""
