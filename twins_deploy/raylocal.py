"""Ray for one command: a private local Ray on the loopback interface, or an existing cluster.

``_node_ip_address="127.0.0.1"`` alone is not enough: Ray's workers would still bind every interface
and talk over the host's address. ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` in the environment before
``ray.init`` makes every Ray socket of a local cluster listen on 127.0.0.1 (checked with ``ss``).
Token authentication is left as Ray sets it (on by default for local clusters since Ray 2.59).
"""
from __future__ import annotations

import contextlib
import os
import random
import socket
from typing import Iterator

from twins_deploy.errors import UsageError

LOOPBACK = "127.0.0.1"
PROBE_SECONDS = 5  # a Ray address that does not answer a TCP connection in this long is refused at once
RAY_WORKER_PORTS_END = 20000  # Ray's workers take ports 10002-19999 by default


def require_ray(extra: str, local: bool = False):
    """``ray``, or a one-line error naming the extra that installs it. ``local``: for a private local Ray,
    whose processes (and this driver: Ray reads the variable when it is imported) must stay on loopback."""
    if local:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        # Ray starts its workers at nice 15; on a machine whose work they are, that lets any other process
        # (a load generator, the shell) take their cores first. Measured: svt-s ran 47 ms in-process and 65-78 ms
        # in a Serve replica at nice 15.
        os.environ.setdefault("RAY_worker_niceness", "0")
    try:
        import ray
    except ImportError:
        raise UsageError(f"Ray is not installed: pip install 'twins-deploy[{extra}]'") from None
    return ray


def check_reachable(address: str) -> None:
    """Refuse an address nothing answers on, in seconds (``ray.init`` retries a dead one for minutes)."""
    if address == "auto":
        return
    host, _, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--address takes auto, HOST:PORT or ray://HOST:PORT; got {address}")
    try:
        socket.create_connection((host, int(port)), timeout=PROBE_SECONDS).close()
    except OSError as exc:
        raise UsageError(f"cannot reach a Ray cluster at {address}: {exc.strerror or exc}; start one with "
                         "'ray start --head', or leave out --address to run on a local Ray") from None


@contextlib.contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None, extra: str = "serve",
                **init_kwargs) -> Iterator[object]:
    """Connected to ``address`` (``auto``, ``host:port``, ``ray://...``), or to a private local Ray on
    127.0.0.1 with no dashboard and ``num_cpus`` CPUs (default: the machine's), shut down at the end."""
    ray = require_ray(extra, local=not address)
    if address:
        check_reachable(address)
        try:
            ray.init(address=address, logging_level="ERROR", log_to_driver=False, **init_kwargs)
        except Exception as exc:
            raise UsageError(f"cannot connect to the Ray cluster at {address}: {str(exc).splitlines()[0]}") from None
    else:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False  # what the variable sets, should Ray have been imported before it
        # address="local": a new instance, never one RAY_ADDRESS or /tmp/ray/ray_current_cluster names
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, _node_ip_address=LOOPBACK,
                 include_dashboard=False, logging_level="ERROR", log_to_driver=False, **init_kwargs)
    try:
        yield ray
    finally:
        ray.shutdown()


def port_ray_leaves_free(host: str = LOOPBACK, *, pairs: bool = False) -> int:
    """A free port on ``host`` that a starting Ray will not take: between Ray's worker ports and the kernel's
    ephemeral range, where Ray's other processes bind (port 0). A probe bound to port 0 returns an ephemeral
    port, and Ray once took one such port before Serve's proxy could bind it ("Address already in use").
    ``pairs``: the next port is free too (a direct ingress is given ``port`` and ``port + 1``)."""
    ephemeral_start = 32768
    with contextlib.suppress(OSError, ValueError):  # Linux says where its range starts; elsewhere it is higher
        ephemeral_start = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    candidates = list(range(RAY_WORKER_PORTS_END, ephemeral_start - 1))
    start = random.randrange(len(candidates))  # two servers starting at once rarely probe the same port first
    for port in candidates[start:] + candidates[:start]:
        if not any(bind_error(host, p) for p in ((port, port + 1) if pairs else (port,))):
            return port
    raise UsageError(f"no free port on {host} between {RAY_WORKER_PORTS_END} and {ephemeral_start}")


def bind_error(host: str, port: int) -> OSError | None:
    """Why ``host:port`` cannot be listened on now, or None when it can."""
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc
    return None


def keep_replica_on_loopback() -> None:
    """In a replica of a loopback-only local Ray, bind Serve's inter-deployment gRPC server to 127.0.0.1.

    Serve 2.60 binds it to ``[::]:0`` whatever the node's address; replicas advertise it at the node's
    address, 127.0.0.1 here, so nothing else changes. Called from the deployments' constructors, which
    run before Serve starts that server; a cluster's replicas (the variable unset) are left alone.
    """
    if os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0":
        return
    from ray.serve._private import replica

    bind = replica.add_port_to_grpc_server
    if getattr(bind, "loopback_only", False):
        return

    def bind_loopback(server, address: str):
        return bind(server, address.replace("[::]", LOOPBACK, 1))

    bind_loopback.loopback_only = True
    replica.add_port_to_grpc_server = bind_loopback
