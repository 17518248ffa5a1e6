"""``twins-deploy serve``: start (or join) Ray, run the app until Ctrl-C or SIGTERM, then shut down cleanly.

On a stop signal the app is deleted first, which lets every replica finish the requests it holds
(Serve's graceful shutdown), then Serve and the private local Ray stop, leaving no Ray process.
"""
from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from twins_deploy.errors import UsageError
from twins_deploy.serving.options import ServeOptions

APP_NAME = "twins-deploy"


@dataclass(frozen=True)
class Listen:
    """Where the app listens: Serve's HTTP proxy and, on a private local Ray, Prometheus metrics."""

    host: str = "127.0.0.1"
    port: int = 8000
    metrics_port: int = 8080


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def check_cpus(options: ServeOptions, cpus: int) -> None:
    """A fixed or minimum replica count that a local Ray cannot place would hang the start: refuse it."""
    replicas = options.min_replicas or options.replicas
    if replicas * options.replica_cpus > cpus:
        raise UsageError(f"{replicas} replicas x {options.replica_cpus:g} CPUs need {replicas * options.replica_cpus:g} "
                         f"CPUs; this Ray has {cpus}: lower --replicas (or --min-replicas)")


def run_server(model: str | Path, options: ServeOptions, listen: Listen, *, address: str | None = None,
               num_cpus: int | None = None, log: Callable[[str], None] = print,
               stop: threading.Event | None = None) -> None:
    """Serve ``model`` until ``stop`` is set (SIGINT and SIGTERM set it when called from the main thread)."""
    from twins_deploy.raylocal import ray_session
    from twins_deploy.serving.model_file import ModelFile

    files = ModelFile.read(model)  # read and checked before Ray starts
    served = files.describe(options.name)
    cpus = num_cpus or os.cpu_count() or 1
    if address is None:
        check_cpus(options, cpus)
        if options.threads is None:  # a local Ray's cores, shared by its replicas
            options = dataclasses.replace(options, threads=max(1, cpus // (options.min_replicas or options.replicas)))
    if not is_loopback(listen.host):
        log(f"warning: listening on {listen.host}, not a loopback address: anyone who can reach this host can "
            "send requests (no authentication on the HTTP port)")
    stop = stop or threading.Event()
    for name in ("ray", "ray.serve"):  # Serve's INFO lines on our stderr; its logs stay in Ray's log folder
        logging.getLogger(name).setLevel(logging.WARNING)
    init = {} if address else {"_metrics_export_port": listen.metrics_port}
    with ray_session(address, num_cpus=cpus, **init), _stop_signals(stop):
        from ray import serve

        from twins_deploy.serving.deployments import application

        serve.start(http_options={"host": listen.host, "port": listen.port})
        try:
            serve.run(application(files, served, options), name=APP_NAME, route_prefix="/")
            engine = serve.get_deployment_handle("model", APP_NAME).describe.remote().result()
            chosen = "" if options.max_batch else " (timed at start)"
            log(f"model replicas: {options.min_replicas or options.replicas} x {', '.join(engine['providers'])}, "
                f"{engine['threads']} threads, up to {engine['max_batch']} images per call{chosen}")
            base = f"http://{listen.host}:{listen.port}"
            log(f"serving {served.name} from {Path(model).name}: {base}/v1/models/{served.name}/predict "
                f"(v2: {base}/v2/models/{served.name}/infer)")
            if address:
                log(f"deployed into the Ray cluster at {address}; the app is deleted when this command exits. "
                    "Metrics: the cluster's own Prometheus endpoint")
            else:
                log(f"metrics: http://{listen.host if is_loopback(listen.host) else '127.0.0.1'}:"
                    f"{listen.metrics_port}/metrics; Ctrl-C or SIGTERM stops the server")
            while not stop.wait(0.5):
                pass
            log("stopping: answering the requests in flight, then shutting down")
            unanswered = serve.get_app_handle(APP_NAME).drain.remote().result()
            if unanswered:
                log(f"warning: {unanswered} requests were still running after 60 s and are cut off")
        finally:
            serve.delete(APP_NAME)  # replicas finish what they hold; ray.shutdown ends the local Ray


@contextlib.contextmanager
def _stop_signals(stop: threading.Event) -> Iterator[None]:
    """Ctrl-C and SIGTERM set ``stop``, so requests in flight are answered before the app goes, even when
    the signal comes while Serve is still starting (the app may already be answering). A second signal
    before ``stop`` is handled aborts at once. Installed after ``ray.init``, whose own SIGTERM handler would
    end the process on the spot; only from the main thread (elsewhere the caller sets ``stop``)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
