"""REST API under load: 20 clients polling status and candidates while 2 searches run on the same machine.

For each configuration (executor × database × poll interval) the benchmark

1. starts ``evomerge serve`` as a subprocess (its own session, free port on 127.0.0.1, no API tokens, a fresh
   database: SQLite in a temporary folder, or a fresh PostgreSQL schema, or a URL you give), ``--max-concurrent 2``
   and ``--no-access-log`` by default;
2. submits 2 NSGA-II searches over the digits test bed (size ``full``; two accuracy objectives with holdout; one
   worker with 1 CPU each, a budget far larger than the window can use, and a ``wall_time_s`` safety stop), and
   waits until both are ``running`` and have scored candidates;
3. runs ``--clients`` threads (one ``httpx.Client`` each) for ``--duration`` seconds. Each loops: ``GET
   /api/v1/searches/{id}`` (the status document: counts, best, front, references, spec) of one of the two
   searches, then ``GET /api/v1/searches/{id}/candidates?limit=50`` (cycling through sort by index, by each
   objective best first, and a random page), then sleeps ``--interval`` seconds ±10% (0: as fast as possible;
   each client starts at a random phase of the interval, so they do not fire in bursts of 20). Every request's
   latency (send to body read) and status are recorded; a non-2xx answer or an exception is an error. A
   monitor thread (not counted) reads the searches' counts every second;
4. cancels the searches, SIGTERMs the server and kills its process group (the embedded Ray's processes).

Reported per endpoint and overall: requests, requests/s, p50/p90/p99/max latency in ms, errors, mean body size;
the candidates the searches completed during the window; latency per 5-second slice of the window (the status
document grows with the search); the CPU used by the server process, by this (client) process and by the whole
machine. The clients run on the same cores as the server and the searches, so their own time is part of what is
measured (it is small: ~0.1 core).

    .venv/bin/python benchmarks/api_load.py                                  # ray, SQLite, 0.25 s (~1 minute)
    .venv/bin/python benchmarks/api_load.py --executor ray,inline --interval 0.25,0 --db sqlite --db postgresql
    .venv/bin/python benchmarks/api_load.py --bed /tmp/evomerge-bench/testbeds  # keep the bed between runs

``--db`` (repeatable): ``sqlite``, ``postgresql`` (a fresh schema on the local test server, dropped afterwards) or
a SQLAlchemy URL (used as is: the searches stay in that database, cancelled). Target (issue): 0 errors and p99 <
200 ms at the default settings. Results go to ``benchmarks/results/api_load.json`` (settings, machine, results;
percentiles and a latency histogram, not every sample).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for folder in (ROOT, HERE):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from machine import machine_info, say  # noqa: E402

API = "/api/v1"
_SCRIPT = Path(sys.executable).parent / "evomerge"
EVOMERGE = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "evomerge.cli"]
ENDPOINTS = ("status", "candidates")
OBJECTIVES = ("acc_0_4", "acc_5_9")
HISTOGRAM_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)  # upper edges; the last bucket is open
SLICE_S = 5.0
JITTER = 0.1  # each pause is interval × U(0.9, 1.1); each client starts at a random phase of the interval
TARGET_P99_MS = 200.0


# -- the searches ----------------------------------------------------------------------------------------------


def digits_spec(bed: str, *, name: str, seed: int, pop_size: int, budget: int, wall_time_s: float) -> dict[str, Any]:
    """NSGA-II over a TIES space of the digits experts 0-4 and 5-9 (paths relative to the model root), two
    accuracy objectives with holdout, one worker of 1 CPU."""
    objectives = [{"name": f"acc_{t}", "task": {"kind": "classification", "data": f"{bed}/search_{t}.npz",
                                                "holdout": f"{bed}/test_{t}.npz"}} for t in ("0_4", "5_9")]
    return {"name": name, "seed": seed,
            "models": {"base": f"{bed}/base", "experts": [{"name": "low", "path": f"{bed}/expert_0_4"},
                                                          {"name": "high", "path": f"{bed}/expert_5_9"}]},
            "space": {"kind": "parameter", "method": "ties", "layer_groups": 2,
                      "search": {"weight": [0.0, 1.5], "density": [0.1, 1.0]}},
            "objectives": objectives, "algorithm": {"name": "nsga2", "options": {"pop_size": pop_size}},
            "budget": {"evaluations": budget, "wall_time_s": wall_time_s},
            "resources": {"workers": 1, "cpus_per_worker": 1}}


# -- the server ------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of one process (Linux ``/proc``; ``None`` elsewhere or once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def machine_cpu_busy() -> tuple[float, float] | None:
    """(busy, total) jiffies of all CPUs since boot (``/proc/stat``), for the machine's utilisation."""
    try:
        numbers = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = numbers[3] + (numbers[4] if len(numbers) > 4 else 0)
    return float(sum(numbers) - idle), float(sum(numbers))


class Server:
    """``evomerge serve`` in a subprocess of its own session; ``stop()`` SIGTERMs it, then kills the group."""

    def __init__(self, workdir: Path, *, db: str, model_root: Path, executor: str, max_concurrent: int,
                 access_log: bool) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"server-{self.port}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("EVOMERGE_")}
        env.update({"EVOMERGE_DATA_DIR": str(workdir / "data"), "RAY_AUTH_MODE": "disabled"})
        self.env = env
        self.command = [*EVOMERGE, "serve", "--port", str(self.port), "--db", db, "--executor", executor,
                        "--model-root", str(model_root), "--max-concurrent", str(max_concurrent),
                        "--access-log" if access_log else "--no-access-log"]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         cwd=self.workdir, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server did not become healthy in {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def log_problems(self) -> int:
        """Lines of the server log at ERROR level or with a traceback."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return sum(1 for line in text.splitlines() if line.startswith("ERROR") or "Traceback" in line)

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (the server checkpoints its searches), then SIGKILL whatever is left of its session."""
        if self.proc is None:
            return None
        code: int | None = self.proc.poll()
        if code is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                code = None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if code is None:
            self.proc.wait(30)
        return code


# -- the load --------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    start: float  # seconds since the window opened
    endpoint: str
    latency: float  # seconds
    ok: bool
    size: int
    error: str | None = None


@dataclass
class ClientLog:
    samples: list[Sample] = field(default_factory=list)


def poll(client: httpx.Client, endpoint: str, path: str, params: dict[str, Any] | None, t0: float,
         out: ClientLog) -> httpx.Response | None:
    """One request, timed from send to the last byte of the body."""
    start = time.perf_counter()
    try:
        response = client.get(path, params=params)
    except httpx.HTTPError as e:
        out.samples.append(Sample(start - t0, endpoint, time.perf_counter() - start, False, 0, type(e).__name__))
        return None
    latency = time.perf_counter() - start
    ok = response.is_success
    out.samples.append(Sample(start - t0, endpoint, latency, ok, len(response.content),
                              None if ok else f"HTTP {response.status_code}"))
    return response


def client_loop(number: int, base_url: str, search_ids: list[int], *, interval: float, page: int, barrier:
                threading.Barrier, clock: dict[str, float], out: ClientLog) -> None:
    """One client: status, then a page of candidates (sort orders and offsets in turn), then sleep."""
    rng = random.Random(number)
    search_id = search_ids[number % len(search_ids)]
    orders = itertools.cycle([("index", False), *[(o, None) for o in OBJECTIVES], ("random", False)])
    total = 0
    with httpx.Client(base_url=base_url, timeout=30.0) as client:
        client.get("/healthz")  # the connection is open before the window starts
        barrier.wait()
        t0, deadline = clock["t0"], clock["deadline"]
        if interval > 0:  # clients poll out of phase, as independent dashboards do, not in bursts of 20
            time.sleep(rng.uniform(0.0, interval))
        while time.perf_counter() < deadline:
            poll(client, "status", f"{API}/searches/{search_id}", None, t0, out)
            order, descending = next(orders)
            params: dict[str, Any] = {"limit": page, "offset": 0, "order_by": order}
            if order == "random":
                params.update(order_by="index", offset=rng.randrange(max(1, total - page + 1)))
            if descending is not None:
                params["descending"] = str(descending).lower()
            response = poll(client, "candidates", f"{API}/searches/{search_id}/candidates", params, t0, out)
            if response is not None and response.is_success:
                total = int(response.json().get("total", total))
            if interval > 0:  # ±10% so that they do not fall into step again
                pause = interval * rng.uniform(1.0 - JITTER, 1.0 + JITTER)
                time.sleep(max(0.0, min(pause, deadline - time.perf_counter())))


def monitor_loop(base_url: str, search_ids: list[int], stop: threading.Event, t0: float,
                 out: list[dict[str, Any]]) -> None:
    """Every second: the searches' statuses and evaluated counts (cheap list endpoint; not part of the load)."""
    with httpx.Client(base_url=base_url, timeout=30.0) as client:
        while not stop.is_set():
            try:
                items = client.get(f"{API}/searches", params={"limit": 50}).json()["items"]
                wanted = {i["id"]: i for i in items if i["id"] in search_ids}
                out.append({"t": round(time.perf_counter() - t0, 2),
                            "evaluated": {str(k): v["evaluated"] for k, v in wanted.items()},
                            "status": {str(k): v["status"] for k, v in wanted.items()}})
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            stop.wait(1.0)


# -- statistics ------------------------------------------------------------------------------------------------


def stats(samples: list[Sample], seconds: float) -> dict[str, Any]:
    """Count, rate, percentiles (ms, over every request, failed ones included), errors, mean body, histogram."""
    if not samples:
        return {"requests": 0, "per_second": 0.0, "errors": 0}
    ms = np.array([s.latency for s in samples]) * 1000.0
    errors: dict[str, int] = {}
    for s in samples:
        if not s.ok:
            errors[s.error or "?"] = errors.get(s.error or "?", 0) + 1
    edges = [0.0, *HISTOGRAM_MS, float("inf")]
    counts, _ = np.histogram(ms, bins=edges)
    labels = [f"<{hi:g}" for hi in HISTOGRAM_MS] + [f">={HISTOGRAM_MS[-1]:g}"]
    return {"requests": len(samples), "per_second": round(len(samples) / seconds, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 1), "p90_ms": round(float(np.percentile(ms, 90)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1), "max_ms": round(float(ms.max()), 1),
            "mean_ms": round(float(ms.mean()), 1), "errors": sum(errors.values()), "error_kinds": errors,
            "mean_body_bytes": int(np.mean([s.size for s in samples if s.ok] or [0])),
            "histogram_ms": {label: int(c) for label, c in zip(labels, counts)}}


def slices(samples: list[Sample], monitor: list[dict[str, Any]], duration: float) -> list[dict[str, Any]]:
    """p50/p99 per endpoint in consecutive ``SLICE_S`` slices of the window, with the searches' progress."""
    out = []
    for k in range(max(1, int(np.ceil(duration / SLICE_S - 1e-9)))):
        lo, hi = k * SLICE_S, min((k + 1) * SLICE_S, duration)
        row: dict[str, Any] = {"from_s": round(lo, 1), "to_s": round(hi, 1)}
        for endpoint in ENDPOINTS:
            ms = [s.latency * 1000 for s in samples if s.endpoint == endpoint and lo <= s.start < hi]
            row[endpoint] = ({"requests": len(ms), "p50_ms": round(float(np.percentile(ms, 50)), 1),
                              "p99_ms": round(float(np.percentile(ms, 99)), 1)} if ms else {"requests": 0})
        seen = [m for m in monitor if m["t"] < hi]
        row["evaluated"] = sum(seen[-1]["evaluated"].values()) if seen else None
        out.append(row)
    return out


# -- one configuration -----------------------------------------------------------------------------------------



@contextmanager
def database(choice: str) -> Iterator[tuple[str, str]]:
    """(URL, label) of ``sqlite`` (a file in a temporary folder), ``postgresql`` (a fresh schema, dropped on exit)
    or a URL used as it is."""
    from evomerge.storage.database import mask_url
    from evomerge.storage.testing import temporary_database

    if choice in ("sqlite", "postgresql"):
        with temporary_database(choice) as url:
            yield url, choice
    else:
        yield choice, mask_url(choice)


def wait_running(client: httpx.Client, search_ids: list[int], scored: int, timeout: float) -> None:
    """Until every search is ``running`` with at least ``scored`` candidates evaluated (workers warm)."""
    deadline = time.monotonic() + timeout
    documents: dict[int, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        for search_id in search_ids:
            response = client.get(f"{API}/searches/{search_id}")
            response.raise_for_status()
            documents[search_id] = response.json()
            if documents[search_id]["status"] in ("done", "failed", "cancelled"):
                raise RuntimeError(f"search {search_id} ended before the window: {documents[search_id]['status']} "
                                   f"({documents[search_id].get('error') or documents[search_id].get('stop_reason')})")
        if all(d["status"] == "running" and d["evaluated"] >= scored for d in documents.values()):
            return
        time.sleep(0.25)
    states = {k: (d["status"], d["evaluated"]) for k, d in documents.items()}
    raise RuntimeError(f"the searches are not running after {timeout:.0f} s: {states}")


def evaluated(client: httpx.Client, search_ids: list[int]) -> dict[int, tuple[str, int]]:
    """(status, evaluated) of each search, from the list endpoint."""
    items = client.get(f"{API}/searches", params={"limit": 50}).raise_for_status().json()["items"]
    return {i["id"]: (i["status"], int(i["evaluated"])) for i in items if i["id"] in search_ids}


def cancel(client: httpx.Client, search_ids: list[int]) -> None:
    """Cancel the searches (they would otherwise wait queued in a shared database); quiet if the server is gone."""
    for search_id in search_ids:
        try:
            client.post(f"{API}/searches/{search_id}/cancel")
        except httpx.HTTPError:
            return


def run_config(args: argparse.Namespace, bed_root: Path, *, executor: str, db: str,
               interval: float) -> dict[str, Any]:
    """One server, two searches, ``args.clients`` clients for ``args.duration`` seconds: the results row."""
    setting = {"executor": executor, "interval_s": interval}
    with ExitStack() as stack:
        url, label = stack.enter_context(database(db))
        setting["database"] = label
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="evomerge-api-load-")))
        server = Server(workdir, db=url, model_root=bed_root, executor=executor,
                        max_concurrent=args.max_concurrent, access_log=args.access_log)
        stack.callback(server.stop)
        say(f"[{executor}, {label}, interval {interval:g} s] starting the server on port {server.port}")
        server.start(args.startup_timeout)
        control = stack.enter_context(httpx.Client(base_url=server.url, timeout=60.0))
        wall = args.settle + args.duration + args.startup_timeout + 120.0  # a safety stop, never reached
        search_ids = []
        for k in range(args.searches):
            spec = digits_spec("digits", name=f"api-load-{k}", seed=k, pop_size=args.pop_size, budget=args.budget,
                               wall_time_s=wall)
            response = control.post(f"{API}/searches", json=spec)
            if response.status_code != 201:
                raise RuntimeError(f"submitting a search failed: {response.status_code} {response.text}")
            search_ids.append(int(response.json()["id"]))
        stack.callback(cancel, control, search_ids)  # before the server stops (an error's way out)
        wait_running(control, search_ids, args.pop_size, args.startup_timeout)
        time.sleep(args.settle)
        before = evaluated(control, search_ids)
        say(f"  searches {search_ids} running ({', '.join(str(n) for _, n in before.values())} evaluated); "
            f"{args.clients} clients for {args.duration:g} s")

        logs = [ClientLog() for _ in range(args.clients)]
        clock: dict[str, float] = {}

        def open_window() -> None:
            clock["t0"] = time.perf_counter()
            clock["deadline"] = clock["t0"] + args.duration

        barrier = threading.Barrier(args.clients + 1, action=open_window)
        threads = [threading.Thread(target=client_loop, name=f"client-{n}", daemon=True,
                                    args=(n, server.url, search_ids),
                                    kwargs={"interval": interval, "page": args.page, "barrier": barrier,
                                            "clock": clock, "out": logs[n]})
                   for n in range(args.clients)]
        for thread in threads:
            thread.start()
        assert server.proc is not None
        cpu_before, busy_before = process_cpu_seconds(server.proc.pid), machine_cpu_busy()
        own_before = time.process_time()
        barrier.wait()
        progress: list[dict[str, Any]] = []
        stop = threading.Event()
        monitor = threading.Thread(target=monitor_loop, args=(server.url, search_ids, stop, clock["t0"], progress),
                                   daemon=True)
        monitor.start()
        for thread in threads:
            thread.join(args.duration + 120.0)
        elapsed = time.perf_counter() - clock["t0"]
        cpu_after, busy_after = process_cpu_seconds(server.proc.pid), machine_cpu_busy()
        own = (time.process_time() - own_before) / elapsed
        stop.set()
        monitor.join(10.0)
        after = evaluated(control, search_ids)
        cancel(control, search_ids)

        samples = [s for log in logs for s in log.samples]
        result: dict[str, Any] = {"setting": setting, "window_s": round(elapsed, 2),
                                  "overall": stats(samples, elapsed)}
        for endpoint in ENDPOINTS:
            result[endpoint] = stats([s for s in samples if s.endpoint == endpoint], elapsed)
        result["searches"] = [{"id": i, "evaluated_before": before[i][1], "evaluated_after": after[i][1],
                               "completed_in_window": after[i][1] - before[i][1],
                               "status_after": after[i][0]} for i in search_ids]
        result["searches_ran_whole_window"] = all(after[i][0] == "running" for i in search_ids)
        result["slices"] = slices(samples, progress, args.duration)
        cpu = None if cpu_before is None or cpu_after is None else (cpu_after - cpu_before) / elapsed
        machine = None
        if busy_before is not None and busy_after is not None and busy_after[1] > busy_before[1]:
            machine = (busy_after[0] - busy_before[0]) / (busy_after[1] - busy_before[1])
        result["server_process_cpu_cores"] = None if cpu is None else round(cpu, 2)
        result["client_process_cpu_cores"] = round(own, 2)
        result["machine_cpu_busy"] = None if machine is None else round(machine, 2)
        result["server_exit_code"] = server.stop()
        result["server_log_problems"] = server.log_problems()
        overall = result["overall"]
        result["target_ok"] = bool(overall["errors"] == 0 and overall.get("p99_ms", float("inf")) < TARGET_P99_MS)
        say(f"  {overall['requests']} requests, p50 {overall.get('p50_ms')} ms, p99 {overall.get('p99_ms')} ms, "
            f"{overall['errors']} errors")
        return result


# -- report ----------------------------------------------------------------------------------------------------


def print_report(rows: list[dict[str, Any]]) -> None:
    header = (f"{'executor':<8} {'database':<10} {'interval':>8} {'endpoint':<10} {'requests':>8} {'req/s':>7} "
              f"{'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'max ms':>7} {'errors':>6}")
    print(header)
    print("-" * len(header))
    for row in rows:
        s = row["setting"]
        if "skipped" in row:
            print(f"{s['executor']:<8} {s['database']:<10} {s['interval_s']:>8g} skipped: {row['skipped']}")
            continue
        for endpoint in (*ENDPOINTS, "overall"):
            r = row[endpoint]
            print(f"{s['executor']:<8} {s['database']:<10} {s['interval_s']:>8g} {endpoint:<10} {r['requests']:>8} "
                  f"{r['per_second']:>7.1f} {r.get('p50_ms', 0):>7.1f} {r.get('p90_ms', 0):>7.1f} "
                  f"{r.get('p99_ms', 0):>7.1f} {r.get('max_ms', 0):>7.1f} {r['errors']:>6}")
    for row in rows:
        if "skipped" in row:
            continue
        s = row["setting"]
        done = ", ".join(f"#{x['id']} {x['evaluated_before']}->{x['evaluated_after']}" for x in row["searches"])
        print(f"\n[{s['executor']}, {s['database']}, interval {s['interval_s']:g} s] window {row['window_s']} s; "
              f"candidates evaluated {done} (still running: {row['searches_ran_whole_window']}); server process "
              f"{row['server_process_cpu_cores']} cores, clients {row['client_process_cpu_cores']} cores, machine "
              f"{row['machine_cpu_busy']} busy; target "
              f"{'met' if row['target_ok'] else 'MISSED'} (0 errors, p99 < {TARGET_P99_MS:g} ms)")
        print(f"  {'slice s':<9} {'status p50/p99':>16} {'cand. p50/p99':>16} {'evaluated':>9}")
        for sl in row["slices"]:
            cells = [f"{sl[e].get('p50_ms', 0):.0f}/{sl[e].get('p99_ms', 0):.0f}" for e in ENDPOINTS]
            print(f"  {sl['from_s']:>3.0f}-{sl['to_s']:<5.0f} {cells[0]:>16} {cells[1]:>16} "
                  f"{sl['evaluated'] if sl['evaluated'] is not None else '-':>9}")


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    from evomerge.storage.testing import DatabaseMisconfigured, DatabaseUnavailable
    from evomerge.testbeds import build

    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--executor", default="ray", help="ray, inline, or both comma-separated (default ray)")
    parser.add_argument("--db", action="append", default=None,
                        help="sqlite (default), postgresql (a fresh schema) or a database URL; repeatable")
    parser.add_argument("--interval", default="0.25",
                        help="seconds each client sleeps after status+candidates; 0 = as fast as possible; "
                             "comma-separated for several runs (default 0.25)")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load per run")
    parser.add_argument("--searches", type=int, default=2, help="searches running during the load")
    parser.add_argument("--max-concurrent", type=int, default=2, help="the server's --max-concurrent")
    parser.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=False,
                        help="the server logs every request (default: --no-access-log)")
    parser.add_argument("--page", type=int, default=50, help="candidates per page")
    parser.add_argument("--pop-size", type=int, default=8, help="NSGA-II population (candidates per batch)")
    parser.add_argument("--budget", type=int, default=1_000_000, help="evaluations per search (never reached)")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds between the searches running and the load")
    parser.add_argument("--startup-timeout", type=float, default=180.0)
    parser.add_argument("--bed", type=Path, default=None,
                        help="model root holding (or to hold) the digits bed in digits/ (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "api_load.json")
    args = parser.parse_args(argv)
    executors = [e.strip() for e in args.executor.split(",") if e.strip()]
    databases = args.db or ["sqlite"]
    intervals = floats(args.interval)
    if not set(executors) <= {"ray", "inline"} or not intervals or min(intervals) < 0 or args.clients < 1:
        parser.error("--executor takes ray and/or inline, --interval numbers >= 0, --clients >= 1")

    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    with ExitStack() as stack:
        bed_root = args.bed or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="evomerge-api-bed-")))
        bed_root = bed_root.resolve()
        bed_root.mkdir(parents=True, exist_ok=True)
        say(f"digits bed (full) in {bed_root / 'digits'}")
        build("digits", bed_root / "digits", seed=0, size="full", progress=lambda m: say(f"  [digits] {m}"))
        for executor, db, interval in itertools.product(executors, databases, intervals):
            try:
                rows.append(run_config(args, bed_root, executor=executor, db=db, interval=interval))
            except (DatabaseUnavailable, DatabaseMisconfigured) as e:
                say(f"{db}: skipped ({e})")
                rows.append({"setting": {"executor": executor, "database": db, "interval_s": interval},
                             "skipped": str(e)})
    load_after = os.getloadavg()

    measured = [r for r in rows if "skipped" not in r]
    report = {
        "benchmark": "api_load",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(1, load_before, load_after),
        "setup": {"clients": args.clients, "duration_s": args.duration, "searches": args.searches,
                  "max_concurrent": args.max_concurrent, "access_log": args.access_log, "page": args.page,
                  "executors": executors, "databases": list(dict.fromkeys(r["setting"]["database"] for r in rows)),
                  "intervals_s": intervals, "settle_s": args.settle,
                  "search": f"nsga2 (pop_size {args.pop_size}) over parameter/ties of the digits experts (full bed), "
                            f"2 accuracy objectives with holdout, 1 worker x 1 CPU, budget {args.budget} evaluations",
                  "client_loop": "GET /api/v1/searches/{id}; GET /api/v1/searches/{id}/candidates?limit=PAGE "
                                 "(order_by index, acc_0_4, acc_5_9, random offset in turn); sleep interval "
                                 "x U(0.9, 1.1); clients start at a random phase of the interval",
                  "latency": "send to last body byte, in the client (httpx, one Client per thread)",
                  "percentiles": "over every request of the window, failed ones included",
                  "server": "evomerge serve (uvicorn), 127.0.0.1, no tokens"},
        "targets": {"errors": 0, "p99_ms_below": TARGET_P99_MS,
                    "ok": bool(measured) and all(r["target_ok"] for r in measured)},
        "runs": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_report(rows)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
