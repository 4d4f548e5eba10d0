"""Starting or joining Ray: the embedded local Ray (loopback only, quiet, no dashboard) or an existing cluster.

The embedded default must open no port to the network. ``ray.init(_node_ip_address="127.0.0.1")`` alone does
not do it in Ray 2.60: ``ray.init`` turns a loopback address back into the machine's routable address
(``services.resolve_ip_for_localhost``) unless Ray believes it runs without cluster support, and every gRPC server
then listens on all interfaces. :func:`init_local_ray` therefore clears ``ray_constants.ENABLE_RAY_CLUSTER`` for
the duration of ``ray.init`` (the switch Ray uses on macOS/Windows for the same purpose), so the node's address
stays 127.0.0.1 and Ray's servers bind to loopback; it then checks the node's address and refuses to go on
otherwise. A Ray without that switch is refused before it starts (join a cluster you started instead).

Joining a cluster (:func:`connect_ray`) is another matter: its nodes do not share this machine's files or Python
path, so :func:`cluster_runtime_env` ships the modules of the job's ``python`` objectives to the workers.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import site
import sys
import sysconfig
from pathlib import Path
from typing import Any

from evomerge.errors import UserError
from evomerge.spec import JobSpec

ADDRESS_ENV = "EVOMERGE_RAY_ADDRESS"
LOOPBACK = "127.0.0.1"
MAX_ROOT_CHARS = 40  # of Ray's session root: its socket paths must stay under 107 bytes


def ray_is_running() -> bool:
    import ray

    return ray.is_initialized()


def init_local_ray(num_cpus: int, num_gpus: int = 0, log_dir: Path | None = None) -> None:
    """Start the embedded local Ray with ``num_cpus`` logical CPUs and ``num_gpus`` GPUs, bound to 127.0.0.1.

    No dashboard, worker output not forwarded to this process, Ray's own logging quiet. Session files and logs go
    under ``log_dir`` when given (see :func:`session_root`), else under Ray's default temp folder. Reuses Ray if
    it is already initialized in this process. Workers are started by this interpreter (the venv's), with this
    process's working directory and environment, so they import evomerge and the user's Python objectives as
    this process does. ``address="local"`` makes it a new local Ray even when ``$RAY_ADDRESS`` names a cluster
    (joining one is :func:`connect_ray`'s business).

    Raises :class:`UserError` when this Ray version cannot be kept on loopback (checked before Ray starts, and
    again on the address the node got).
    """
    import ray

    if ray.is_initialized():
        return
    import ray._private.ray_constants as ray_constants

    if not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):
        raise UserError(f"the embedded Ray cannot be kept on loopback with Ray {ray.__version__} (it lacks "
                        "ray_constants.ENABLE_RAY_CLUSTER), and a local search must open no port to the network; "
                        "start a Ray cluster yourself (`ray start --head`, firewalled as you need) and pass its "
                        f"address with --ray-address / {ADDRESS_ENV}, or install the Ray version evomerge pins",
                        where="ray_address")
    kwargs: dict = {}
    if log_dir is not None:
        kwargs["_temp_dir"] = str(session_root(Path(log_dir)))
    cluster_support = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False  # keep the node on loopback (see the module docstring)
    try:
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                 _node_ip_address=LOOPBACK, log_to_driver=False, configure_logging=True,
                 logging_level=logging.ERROR, namespace="evomerge", **kwargs)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster_support
    address = ray._private.worker.global_worker.node_ip_address
    try:
        require_loopback(address)
    except UserError:
        ray.shutdown()
        raise


def require_loopback(address: str) -> None:
    """Raise :class:`UserError` unless the embedded Ray's node ``address`` is 127.0.0.1."""
    if address != LOOPBACK:
        raise UserError(f"the embedded Ray bound to {address}, not {LOOPBACK}, so it would open ports to the "
                        "network; this Ray version cannot be kept on loopback: start a Ray cluster yourself (`ray "
                        f"start --head`, firewalled as you need) and pass its address with --ray-address / "
                        f"{ADDRESS_ENV}", where="ray_address")


def session_root(log_dir: Path) -> Path:
    """The folder Ray keeps its sessions in for ``log_dir``: ``log_dir`` itself when its path is short enough,
    else a short folder under the system temp dir, linked from ``log_dir/ray-session``.

    Ray's unix sockets live in ``<root>/session_<date>_<pid>/sockets/`` and socket paths are limited to 107 bytes,
    so the root may have at most ~40 characters; a data dir deep in a home folder or a test's tmp path is longer.
    """
    import tempfile

    root = log_dir.expanduser().absolute()
    root.mkdir(parents=True, exist_ok=True)
    if len(str(root)) <= MAX_ROOT_CHARS:
        return root
    short = Path(tempfile.mkdtemp(prefix="evomerge-ray-"))
    link = root / "ray-session"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(short, target_is_directory=True)
    return short


def connect_ray(address: str, runtime_env: dict[str, Any] | None = None) -> None:
    """Join an existing Ray cluster (``ray start --head``, KubeRay) at ``address`` (``ray://…`` or ``host:port``);
    reuses Ray if this process is already connected. ``runtime_env`` is the job's (Ray uploads local
    ``py_modules``/``working_dir`` only at this level, see :func:`cluster_runtime_env`)."""
    import ray

    if ray.is_initialized():
        return
    probe_address(address)
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING, namespace="evomerge",
                 **({"runtime_env": runtime_env} if runtime_env else {}))
    except (ConnectionError, ValueError, RuntimeError) as e:
        # A host:port driver attaches to a Ray node on its own machine: without one, Ray's error reads as if the
        # cluster were down.
        node = "" if address.startswith("ray://") else (f"; evomerge must run on a node of the cluster (`ray start "
                                                         f"--address={address}` on this machine first)")
        raise UserError(f"cannot join the Ray cluster at {address!r}: {str(e).splitlines()[0] if str(e) else e}"
                        f"{node}; check --ray-address / {ADDRESS_ENV}", where="ray_address") from None


def probe_address(address: str, timeout: float = 5.0) -> None:
    """Fail fast, in one line, when nothing listens at a ``host:port`` or ``ray://host:port`` address: Ray itself
    retries for minutes. Other forms (``auto``, ``local``) are left to Ray."""
    target = address[len("ray://"):] if address.startswith("ray://") else address
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise UserError(f"nothing answers at {address!r} ({e.strerror or e}); start the cluster (`ray start --head`) "
                        f"or fix --ray-address / {ADDRESS_ENV}", where="ray_address") from None


def ray_address_from_env(address: str | None) -> str | None:
    """The cluster to join: ``address`` if given, else ``$EVOMERGE_RAY_ADDRESS``, else None (embedded Ray)."""
    return address or os.environ.get(ADDRESS_ENV) or None


def cluster_runtime_env(spec: JobSpec) -> dict[str, Any] | None:
    """Ray's runtime environment that lets a cluster's workers import the job's ``python`` objectives.

    Workers on other nodes see neither this machine's working directory nor its ``PYTHONPATH``. Each objective's
    top-level module, found as the scorer finds it (working directory first), is shipped as ``py_modules`` (a
    package's folder or a single ``.py`` file) unless it is installed (site-packages or the standard library),
    which the cluster's image is expected to provide. None when there is nothing to ship. Only what the objectives
    import is sent, never the whole working directory (which may hold models).
    """
    modules: list[str] = []
    for objective in spec.objectives:
        if objective.task.kind != "python" or not objective.task.function:
            continue
        path = module_source(objective.task.function.partition(":")[0].split(".")[0])
        if path is not None and path not in modules:
            modules.append(path)
    return {"py_modules": modules} if modules else None


def module_source(name: str) -> str | None:
    """The file (``.py``) or package folder of top-level module ``name`` as this process would import it with
    the working directory on the path; None when it is not found or is installed (site-packages, stdlib)."""
    cwd = str(Path.cwd())
    added = "" not in sys.path and cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        found = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        found = None
    finally:
        if added:
            sys.path.remove(cwd)
    if found is None or name == "evomerge":  # evomerge itself must be installed on the cluster already
        return None
    if found.submodule_search_locations:
        source = Path(next(iter(found.submodule_search_locations)))
    elif found.origin and found.origin.endswith(".py"):
        source = Path(found.origin)
    else:
        return None  # built-in or compiled: nothing a runtime env could ship
    paths = sysconfig.get_paths()
    installed = {Path(p).resolve() for p in (*(paths.get(k) for k in ("purelib", "platlib", "stdlib", "platstdlib")),
                                             *site.getsitepackages(), site.getusersitepackages()) if p}
    resolved = source.resolve()
    if any(resolved.is_relative_to(root) for root in installed):
        return None
    return str(resolved)
