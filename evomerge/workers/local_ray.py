"""Starting or joining Ray: the embedded local Ray (loopback only, quiet, no dashboard) or an existing cluster.

The embedded default must open no port to the network. ``ray.init(_node_ip_address="127.0.0.1")`` alone does
not do it in Ray 2.60: ``ray.init`` turns a loopback address back into the machine's routable address
(``services.resolve_ip_for_localhost``) unless Ray believes it runs without cluster support, and every gRPC server
then listens on all interfaces. :func:`init_local_ray` therefore clears ``ray_constants.ENABLE_RAY_CLUSTER`` for
the duration of ``ray.init`` (the switch Ray uses on macOS/Windows for the same purpose), so the node's address
stays 127.0.0.1 and Ray's servers bind to loopback; it then checks the node's address and refuses to go on
otherwise.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from evomerge.errors import UserError

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
    this process does.
    """
    import ray

    if ray.is_initialized():
        return
    import ray._private.ray_constants as ray_constants

    kwargs: dict = {}
    if log_dir is not None:
        kwargs["_temp_dir"] = str(session_root(Path(log_dir)))
    cluster_support = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    ray_constants.ENABLE_RAY_CLUSTER = False  # keep the node on loopback (see the module docstring)
    try:
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, _node_ip_address=LOOPBACK,
                 log_to_driver=False, configure_logging=True, logging_level=logging.ERROR,
                 namespace="evomerge", **kwargs)
    finally:
        if cluster_support is not None:
            ray_constants.ENABLE_RAY_CLUSTER = cluster_support
    address = ray._private.worker.global_worker.node_ip_address
    if address != LOOPBACK:
        ray.shutdown()
        raise RuntimeError(f"the embedded Ray bound to {address}, not {LOOPBACK}; refusing to open ports to the "
                           "network (this Ray version needs another way to stay on loopback)")


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


def connect_ray(address: str) -> None:
    """Join an existing Ray cluster (``ray start --head``, KubeRay) at ``address`` (``ray://…`` or ``host:port``);
    reuses Ray if this process is already connected."""
    import ray

    if ray.is_initialized():
        return
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING, namespace="evomerge")
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise UserError(f"cannot join the Ray cluster at {address!r}: {str(e).splitlines()[0] if str(e) else e}; "
                        f"check --ray-address / {ADDRESS_ENV}", where="ray_address") from None


def ray_address_from_env(address: str | None) -> str | None:
    """The cluster to join: ``address`` if given, else ``$EVOMERGE_RAY_ADDRESS``, else None (embedded Ray)."""
    return address or os.environ.get(ADDRESS_ENV) or None
