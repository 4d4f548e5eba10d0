"""A real Ray cluster of two node processes on this machine, driven by ``evomerge run`` and ``evomerge serve``.

``ray start --head`` runs on 127.0.0.3 and ``ray start --address`` adds a worker node on 127.0.0.2: Linux routes all
of 127.0.0.0/8 to loopback, so each node has an address of its own, as two machines would, and a candidate's
``worker`` column (``ray:<node ip>:<pid>``) tells which node scored it. Each node offers one CPU and each evaluator
actor takes 0.99 of one, so a two-worker search can only run with one actor on each node.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from evomerge.storage import Store
from evomerge.storage.testing import database_for_tests

sys.path.insert(0, str(Path(__file__).parents[1] / "service"))
from service_helpers import LiveServer, base_env, digits_spec, evomerge, wait_for  # noqa: E402

HEAD_IP, WORKER_IP = "127.0.0.3", "127.0.0.2"
RAY = str(Path(sys.executable).parent / "ray")


def _port() -> int:
    with socket.socket() as s:  # the head's GCS listens on every interface: the port must be free on all
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


class Cluster:
    """Two ``ray start --block`` processes, each in a session of its own so that stopping one stops its node."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = _port()
        self.address = f"{HEAD_IP}:{self.port}"
        self.env = base_env(RAY_USAGE_STATS_ENABLED="0")
        self.nodes: dict[str, subprocess.Popen[bytes]] = {}

    def _start(self, name: str, *args: str) -> None:
        with open(self.folder / f"{name}.log", "ab") as log:
            self.nodes[name] = subprocess.Popen([RAY, "start", "--block", "--num-cpus", "1", *args], stdout=log,
                                                stderr=subprocess.STDOUT, env=self.env, start_new_session=True)

    def log(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in self.folder.glob("*.log"))

    def start(self, timeout: float = 120.0) -> None:
        # the session files' root must be short: Ray's socket paths are limited to 107 bytes
        self._start("head", "--head", "--port", str(self.port), "--node-ip-address", HEAD_IP,
                    "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", str(self.folder / "r"))
        self._wait(lambda: _answers(HEAD_IP, self.port), timeout, "the head's GCS port")
        self._start("worker", "--address", self.address, "--node-ip-address", WORKER_IP)
        self._wait(lambda: self.alive_nodes() == 2, timeout, "two alive nodes")

    def alive_nodes(self) -> int:
        status = subprocess.run([RAY, "status", "--address", self.address], capture_output=True, text=True,
                                env=self.env, timeout=60)
        active = status.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
        return sum(1 for line in active.splitlines() if "node_" in line)

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.nodes.items():
                if proc.poll() is not None:
                    raise AssertionError(f"ray {name} exited with {proc.returncode}:\n{self.log()}")
            if ready():
                return
            time.sleep(0.5)
        raise AssertionError(f"no {what} after {timeout} s:\n{self.log()}")

    def stop(self, timeout: float = 60.0) -> dict[str, int | None]:
        """SIGTERM each node (the worker first), as ``ray stop`` would; their exit codes."""
        codes: dict[str, int | None] = {}
        for name in ("worker", "head"):
            proc = self.nodes.get(name)
            if proc is None:
                continue
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                codes[name] = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                codes[name] = None
        return codes

    def leftovers(self) -> list[int]:
        """Process groups of the nodes that still hold a process (raylet, GCS, workers); killed on the way."""
        left = []
        for proc in self.nodes.values():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
                left.append(proc.pid)
            except (ProcessLookupError, PermissionError):
                pass
        return left


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    folder = Path(tempfile.mkdtemp(prefix="emrc-"))
    nodes = Cluster(folder)
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.stop()
        nodes.leftovers()
        shutil.rmtree(folder, ignore_errors=True)


def _spec_file(folder: Path, bed: Path) -> Path:
    """digits_spec over ``bed`` with absolute paths: two workers of one CPU, CMA-ES, 24 evaluations."""
    spec = digits_spec(str(bed), name="cluster", algorithm="cmaes", budget=24, workers=2)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _nodes(workers: list[str | None]) -> Counter[str]:
    """Candidates per node address, from ``ray:<node ip>:<pid>`` labels."""
    return Counter(label.split(":")[1] for label in workers if label)


def _run(spec: Path, data: Path, *args: str) -> tuple[dict, list]:
    env = base_env(EVOMERGE_DATA_DIR=str(data))
    done = evomerge("run", spec, "--json", *args, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    document = json.loads(done.stdout)
    store = Store(f"sqlite:///{data / 'evomerge.db'}")
    try:
        return document, store.candidates(document["id"])
    finally:
        store.close()


def test_a_cli_search_on_a_two_node_cluster_uses_both_nodes_and_asks_what_an_inline_run_asks(cluster, workers_bed,
                                                                                              tmp_path):
    spec = _spec_file(tmp_path, workers_bed)
    document, rows = _run(spec, tmp_path / "cluster", "--ray-address", cluster.address)
    assert document["status"] == "done"
    assert [r.status for r in rows] == ["done"] * 24
    per_node = _nodes([r.worker for r in rows])
    assert set(per_node) == {HEAD_IP, WORKER_IP}, (per_node, cluster.log())

    _, inline = _run(spec, tmp_path / "inline", "--executor", "inline")
    assert [r.genome.tolist() for r in rows] == [r.genome.tolist() for r in inline]
    assert [r.values for r in rows] == [r.values for r in inline]


def test_a_server_on_postgresql_runs_a_submitted_search_on_both_nodes(cluster, workers_bed, tmp_path):
    with database_for_tests("postgresql") as url, \
            LiveServer(tmp_path / "server", db=url, roots=[workers_bed.parent], executor="ray",
                       ray_address=cluster.address) as server, server.client() as client:
        response = client.post("/api/v1/searches", json=digits_spec(workers_bed.name, name="served", budget=16,
                                                                       workers=2))
        assert response.status_code == 201, response.text
        search = response.json()["id"]
        document = wait_for(client, search, server=server)
        assert document["status"] == "done", server.log()[-3000:]
        page = client.get(f"/api/v1/searches/{search}/candidates", params={"limit": 100}).json()
        workers = [c["worker"] for c in page["items"]]
        assert len(workers) == 16
        assert set(_nodes(workers)) == {HEAD_IP, WORKER_IP}, (workers, server.log()[-3000:])
        store = Store(url)
        try:  # the rows are in PostgreSQL, not in a SQLite file beside the server
            assert store.count_candidates(search)["done"] == 16
        finally:
            store.close()


def test_both_nodes_stop_on_sigterm_and_leave_no_process_or_port(cluster):
    codes = cluster.stop()
    # Ray's SIGTERM handler kills the node's processes, then exits 1 on purpose (ray/_private/node.py)
    assert codes == {"worker": 1, "head": 1}, cluster.log()
    assert cluster.leftovers() == []
    assert not _answers(HEAD_IP, cluster.port)
