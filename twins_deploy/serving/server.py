"""``twins-deploy serve``: start (or join) Ray, run the app until Ctrl-C or SIGTERM, then shut down cleanly.

On a stop signal the app is deleted first, which lets every replica finish the requests it holds
(Serve's graceful shutdown), then Serve and the private local Ray stop, leaving no Ray process.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import math
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from twins_deploy.errors import UsageError
from twins_deploy.serving.options import MAX_IMAGES_PER_REQUEST, ServeOptions

if TYPE_CHECKING:
    from twins_deploy.serving.model_file import ServedModel

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
    proxy_port = listen.port
    if address is None:
        proxy_port = throughput_optimized(listen, largest_message(served, options))
    with ray_session(address, num_cpus=cpus, **init), _stop_signals(stop):
        from ray import serve

        from twins_deploy.serving.deployments import application

        serve.start(http_options={"host": listen.host, "port": proxy_port})
        try:
            serve.run(application(files, served, options), name=APP_NAME, route_prefix="/")
            handles = _DriverHandles()
            engine = handles.call(lambda: serve.get_deployment_handle("model", APP_NAME).describe.remote())
            chosen = "" if options.max_batch else f" ({engine['batch_chosen']})"
            log(f"model replicas: {options.min_replicas or options.replicas} x {', '.join(engine['providers'])}, "
                f"{engine['threads']} threads, {engine['streams']} batches at once of up to {engine['max_batch']} "
                f"images{chosen}" + ("; a batch alone gets every thread" if engine["streams"] > 1 else ""))
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
            unanswered = handles.call(lambda: serve.get_app_handle(APP_NAME).drain.remote())
            if unanswered:
                log(f"warning: {unanswered} requests were still running after 60 s and are cut off")
        finally:
            serve.delete(APP_NAME)  # replicas finish what they hold; ray.shutdown ends the local Ray


def throughput_optimized(listen: Listen, message_bytes: int) -> int:
    """Run Serve in its documented throughput-optimized mode (``RAY_SERVE_THROUGHPUT_OPTIMIZED``): the
    ingress replica itself listens on ``listen.port`` (direct ingress: no proxy process on the way),
    deployments talk over gRPC (no object store for a batch), user code and the router run on the
    replica's own event loop. Measured on 2 vCPUs: svt-s fp32 went from 12.7 to 17-19 img/s at concurrency 32.
    Serve keeps its proxy on the head node as a fallback; it gets a free port Ray leaves alone, returned here.
    ``message_bytes``: the largest call the ingress makes to the model (gRPC's default limit is 4 MB).
    Only for a private local Ray: set in the environment its processes inherit."""
    from twins_deploy.raylocal import port_ray_leaves_free

    check_port_free(listen.host, listen.port)
    os.environ.update({
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(listen.port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(listen.port + 1),
        "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(message_bytes),
        # Serve holds a stopping ingress open 30 s for a load balancer to deregister it; none is in front
        # here, and the ingress has already drained (503 to new requests, those in flight answered)
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
    })
    return port_ray_leaves_free(listen.host)


def largest_message(served: ServedModel, options: ServeOptions) -> int:
    """Bytes of the largest request the ingress sends the model: a full request of float images."""
    return MAX_IMAGES_PER_REQUEST * 4 * math.prod(served.image_shape) + options.max_body_bytes + (1 << 20)


class _DriverHandles:
    """Handle calls from this synchronous driver. In throughput-optimized mode a handle's router runs on
    the event loop it is first used on, and must keep it running while the handle lives: one loop, on a
    daemon thread of its own for the rest of the process."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="serve-handles", daemon=True).start()

    def call(self, request: Callable[[], object]):
        async def call():
            return await request()

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result()


def check_port_free(host: str, port: int) -> None:
    from twins_deploy.raylocal import bind_error

    if exc := bind_error(host, port):
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port")


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
