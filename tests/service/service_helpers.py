"""Helpers of the service tests: a real ``evomerge serve`` process on 127.0.0.1, job specs over the digits bed.

The server runs as a subprocess in a session of its own, so a test can SIGKILL it (and the Ray processes it
started) like a crash, or SIGTERM it like an orchestrator. Its output goes to a log file that failing
assertions print.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import httpx

HERE = Path(__file__).parent
RUNNER_TESTS = HERE.parent / "runner"  # runner_objective.pause: slow candidates on demand
_SCRIPT = Path(sys.executable).parent / "evomerge"
EVOMERGE = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "evomerge.cli"]
TOKEN = "s3cret-token-for-tests"
FINISHED = ("done", "failed", "cancelled")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVOMERGE_") and k not in ("FORCE_COLOR",)}
    env["PYTHONPATH"] = os.pathsep.join([str(RUNNER_TESTS), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["RAY_AUTH_MODE"] = env.get("RAY_AUTH_MODE", "disabled")
    env.update(extra)
    return env


class LiveServer:
    """``evomerge serve`` in a subprocess: ``with LiveServer(...) as server: server.client().get(...)``."""

    def __init__(self, workdir: Path, *, db: str, roots: Iterable[Path], tokens: str | None = TOKEN,
                 executor: str = "inline", max_concurrent: int | None = None, allow_python: bool = True,
                 ray_address: str | None = None, env: dict[str, str] | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.db = db
        self.roots = [Path(r) for r in roots]
        self.tokens = tokens
        self.executor = executor
        self.max_concurrent = max_concurrent
        self.ray_address = ray_address
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        extra = {"EVOMERGE_DATA_DIR": str(self.workdir / "data")}
        if tokens:
            extra["EVOMERGE_API_TOKENS"] = tokens
        if allow_python:
            extra["EVOMERGE_ALLOW_PYTHON_SCORERS"] = "1"
        self.env = base_env(**extra, **(env or {}))
        self.log_path = self.workdir / f"server-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        args = [*EVOMERGE, "serve", "--port", str(self.port), "--db", self.db, "--executor", self.executor]
        for root in self.roots:
            args += ["--model-root", str(root)]
        if self.max_concurrent:
            args += ["--max-concurrent", str(self.max_concurrent)]
        if self.ray_address:
            args += ["--ray-address", self.ray_address]
        return args

    def start(self, timeout: float = 120.0) -> "LiveServer":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         cwd=self.workdir, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"the server did not become healthy in {timeout} s:\n{self.log()}")

    def client(self, token: str | None = TOKEN, headers: dict[str, str] | None = None) -> httpx.Client:
        headers = {**({"Authorization": f"Bearer {token}"} if token else {}), **(headers or {})}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def terminate(self, timeout: float = 120.0) -> int:
        """SIGTERM, as an orchestrator stops a container; the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the server and everything it started (its embedded Ray): a crash."""
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)

    def __enter__(self) -> "LiveServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.terminate(60)
            except subprocess.TimeoutExpired:
                pass
        if self.proc is not None:
            try:  # whatever the server left behind (Ray's processes)
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def digits_spec(bed: str = "digits", *, name: str = "service-test", algorithm: str = "nsga2", budget: int = 24,
                options: dict | None = None, pause: dict | None = None, holdout: bool = True, workers: int = 1,
                seed: int = 0, method: str = "ties") -> dict[str, Any]:
    """A search over the digits experts 0-4 and 5-9 with paths relative to the model root (``bed``), two
    accuracy objectives (holdout on the test digits) and an optional slow ``pause`` objective."""
    objectives: list[dict[str, Any]] = [
        {"name": f"acc_{t}", "task": {"kind": "classification", "data": f"{bed}/search_{t}.npz",
                                      **({"holdout": f"{bed}/test_{t}.npz"} if holdout else {})}}
        for t in ("0_4", "5_9")]
    if pause is not None:
        objectives.append({"name": "pause", "task": {"kind": "python", "function": "runner_objective:pause",
                                                     "options": pause}, "direction": "maximize"})
    if options is None:
        options = {"pop_size": 8} if algorithm == "nsga2" else ({"popsize": 6} if algorithm == "cmaes" else {})
    search = {"weight": [0.0, 1.5], "density": [0.1, 1.0]} if method == "ties" else {"weight": [0.0, 1.5]}
    return {"name": name, "seed": seed,
            "models": {"base": f"{bed}/base", "experts": [{"name": "low", "path": f"{bed}/expert_0_4"},
                                                          {"name": "high", "path": f"{bed}/expert_5_9"}]},
            "space": {"kind": "parameter", "method": method, "layer_groups": 2, "search": search},
            "objectives": objectives, "algorithm": {"name": algorithm, "options": options},
            "budget": {"evaluations": budget}, "resources": {"workers": workers, "cpus_per_worker": 1}}


def wait_for(client: httpx.Client, search_id: int, statuses: Iterable[str] = FINISHED, timeout: float = 240.0,
             server: LiveServer | None = None) -> dict[str, Any]:
    """Poll a search until its status is one of ``statuses``; its document."""
    wanted = tuple(statuses)
    deadline = time.monotonic() + timeout
    document: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = client.get(f"/api/v1/searches/{search_id}")
        assert response.status_code == 200, response.text
        document = response.json()
        if document["status"] in wanted:
            return document
        time.sleep(0.2)
    raise AssertionError(f"search {search_id} is {document.get('status')} after {timeout} s, not one of "
                         f"{wanted}" + (f"\n{server.log()}" if server else ""))


def evomerge(*args: Any, env: dict[str, str] | None = None, timeout: float = 300,
             cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EVOMERGE, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=env or base_env(), cwd=cwd)
