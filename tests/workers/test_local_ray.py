"""Starting the embedded Ray and refusing what this machine cannot give, each in a fresh process (the session's
Ray, already running, would otherwise be reused and hide what a first start does). Also the pool's one-line
error messages."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from evomerge.errors import UserError
from evomerge.workers.local_ray import probe_address, require_loopback
from evomerge.workers.ray_pool import died_message, error_line

HERE = Path(__file__).parent
ROOT = HERE.parent.parent


def run_fresh(code: str, env: dict[str, str] | None = None, cwd: Path = ROOT, timeout: float = 120) -> list[dict]:
    """Run ``code`` in a new interpreter in ``cwd`` (tests/workers importable); the JSON lines it prints."""
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)]), **(env or {})}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks a machine without CUDA")
def test_gpus_on_a_machine_without_cuda_are_refused_before_ray_starts(workers_bed):
    results = run_fresh(f"""
        import json, sys
        from pathlib import Path
        from worker_helpers import digits_spec
        from evomerge.errors import UserError
        from evomerge.workers import make_executor
        bed = Path({str(workers_bed)!r})
        for kind, resources in [("ray", {{"gpus_per_worker": 1}}), ("inline", {{"gpus_per_worker": 0.5}}),
                                ("inline", {{"device": "cuda"}}), ("ray", {{"device": "cuda:0"}})]:
            try:
                make_executor(digits_spec(bed, workers=1, **resources), kind=kind)
                print(json.dumps({{"error": None}}))
            except UserError as e:
                print(json.dumps({{"where": e.where, "error": str(e), "ray": "ray" in sys.modules and
                                  sys.modules["ray"].is_initialized()}}))
    """)
    assert [r.get("where") for r in results] == ["resources.gpus_per_worker", "resources.gpus_per_worker",
                                                 "resources.device", "resources.device"]
    assert results[0]["error"] == ("resources.gpus_per_worker: the workers need 1 CUDA GPU but this machine has no "
                                   "CUDA GPU; set gpus_per_worker: 0 to run on CPUs, or join a cluster with GPUs "
                                   "(--ray-address)")
    assert results[2]["error"].startswith("resources.device: cuda needs a CUDA GPU but this machine has no CUDA GPU")
    assert results[3]["error"].startswith("resources.device: cuda:0 on Ray needs GPUs for the workers")
    assert not any(r["ray"] for r in results)  # refused before any Ray was started


def test_the_embedded_ray_ignores_ray_address_and_refuses_a_ray_it_cannot_keep_on_loopback(tmp_path):
    results = run_fresh(f"""
        import json
        import ray
        import ray._private.ray_constants as ray_constants
        from evomerge.errors import UserError
        from evomerge.workers import init_local_ray
        switch = ray_constants.ENABLE_RAY_CLUSTER
        del ray_constants.ENABLE_RAY_CLUSTER  # a Ray version without the loopback switch
        try:
            init_local_ray(1)
        except UserError as e:
            print(json.dumps({{"where": e.where, "error": str(e), "ray": ray.is_initialized()}}))
        ray_constants.ENABLE_RAY_CLUSTER = switch
        init_local_ray(1, log_dir={str(tmp_path / "ray")!r})  # with RAY_ADDRESS naming a cluster
        print(json.dumps({{"node": ray._private.worker.global_worker.node_ip_address,
                          "cpus": ray.cluster_resources()["CPU"]}}))
        ray.shutdown()
    """, env={"RAY_ADDRESS": "10.255.255.1:6379"})
    refused, started = results
    assert refused["where"] == "ray_address" and refused["ray"] is False
    assert "the embedded Ray cannot be kept on loopback with Ray" in refused["error"]
    assert "--ray-address" in refused["error"]
    assert started == {"node": "127.0.0.1", "cpus": 1.0}


def test_a_node_off_loopback_is_the_users_error():
    require_loopback("127.0.0.1")
    with pytest.raises(UserError, match=r"ray_address: the embedded Ray bound to 10.0.0.5, not 127.0.0.1.*"
                                        r"--ray-address"):
        require_loopback("10.0.0.5")


def test_ray_errors_read_as_one_clean_line():
    from ray.exceptions import RayTaskError

    raised = RayTaskError("run", "Traceback (most recent call last):\n  ...\nValueError: bad", ValueError("bad\nx"),
                          proctitle="ray::RayCandidateWorker.run()", pid=4242, ip="127.0.0.1")
    header = str(raised)
    assert "\x1b[" in header or "RayCandidateWorker" in header  # what used to be reported
    assert error_line(raised) == "ValueError: bad"
    assert error_line(raised.as_instanceof_cause()) == "ValueError: bad"
    assert error_line(RuntimeError("\x1b[36mray::Actor\x1b[39m died\nmore")) == "RuntimeError: ray::Actor died"
    assert died_message(1, OSError("gone")) == "the worker died once running this candidate (last: OSError: gone)"
    assert died_message(3, OSError("gone")).startswith("the worker died 3 times running this candidate")


def test_python_objectives_importable_here_are_shipped_to_a_joined_cluster(workers_bed, tmp_path, monkeypatch):
    import evomerge.workers as workers
    from evomerge.spec import JobSpec
    from evomerge.workers import cluster_runtime_env
    from evomerge.workers.local_ray import module_source
    from worker_helpers import digits_spec

    (tmp_path / "em_cwd_objective.py").write_text("def score(model, tokenizer, data, **_):\n    return [0.25]\n")
    monkeypatch.chdir(tmp_path)  # importable from the working directory only
    data = digits_spec(workers_bed, workers=1).model_dump(mode="json", exclude_none=True)
    data["objectives"].append({"name": "here", "task": {"kind": "python", "function": "em_cwd_objective:score"}})
    spec = JobSpec.from_dict(data)
    shipped = {"py_modules": [str((tmp_path / "em_cwd_objective.py").resolve())]}
    assert cluster_runtime_env(spec) == shipped
    assert cluster_runtime_env(digits_spec(workers_bed)) is None  # nothing to ship
    assert module_source("numpy") is None and module_source("json") is None  # installed: the cluster has them
    # Joining from a process not yet connected: the modules go to ray.init as the job's runtime env (Ray uploads
    # local code only there). Ray's side is stubbed: this machine's loopback-only Ray cannot be joined.
    joined: list = []
    monkeypatch.setattr(workers, "ray_is_running", lambda: False)
    monkeypatch.setattr(workers, "connect_ray", lambda address, runtime_env=None: joined.append((address, runtime_env)))
    monkeypatch.setattr(workers, "RayExecutor", lambda spec, **kwargs: kwargs)
    kwargs = workers.make_executor(spec, kind="ray", ray_address="10.0.0.7:6379")
    assert joined == [("10.0.0.7:6379", shipped)] and kwargs["runtime_env"] is None
    workers.make_executor(spec, kind="ray", ray_address="10.0.0.7:6379", runtime_env={"pip": ["x"]})
    workers.make_executor(spec, kind="ray", ray_address="10.0.0.7:6379", allow_python=False)
    assert joined[1:] == [("10.0.0.7:6379", None)] * 2  # the caller's own env, or no python objectives: nothing


def test_an_address_where_nothing_listens_fails_at_once_in_one_line() -> None:
    """Ray retries an unreachable address for minutes; evomerge probes it first."""
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        with pytest.raises(UserError) as e:
            probe_address(address, timeout=2)
        assert e.value.where == "ray_address" and "nothing answers" in str(e.value)
    with socket.socket() as server:  # something listens: no error
        server.bind(("127.0.0.1", 0))
        server.listen()
        probe_address(f"127.0.0.1:{server.getsockname()[1]}", timeout=2)
    probe_address("auto")  # left to Ray
