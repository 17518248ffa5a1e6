"""`twins-deploy serve` in a subprocess for the serving tests: loopback only, bounded waits, and only
processes this test started are ever signalled."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from PIL import Image

from twins_deploy.raylocal import port_ray_leaves_free

HOST = "127.0.0.1"
START_SECONDS = 180  # a local Ray and Serve start in about 20 s on two busy cores


def free_port() -> int:
    """A port for the server, its direct ingress's second port free too, where Ray's own processes do not bind."""
    return port_ray_leaves_free(HOST, pairs=True)


@dataclass
class Server:
    """A running ``twins-deploy serve`` and what it printed."""

    process: subprocess.Popen
    port: int
    metrics_port: int
    log: Path
    name: str = "custom"
    descendants: list[psutil.Process] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def request(self, path: str, data: bytes | None = None, headers: dict | None = None,
                method: str | None = None, timeout: float = 60) -> tuple[int, dict, bytes]:
        """(status, headers, body) of one HTTP request to the server; an HTTP error is returned, not raised."""
        req = urllib.request.Request(self.url + path, data=data, headers=headers or {}, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read()

    def predict(self, image: bytes, content_type: str = "image/jpeg", query: str = "") -> tuple[int, dict, dict]:
        status, headers, body = self.request(f"/v1/models/{self.name}/predict{query}", image,
                                             {"content-type": content_type})
        return status, {k.lower(): v for k, v in headers.items()}, json.loads(body)

    def replica_processes(self) -> list[psutil.Process]:
        """The model replicas' processes: descendants of this server whose title Ray set to the replica's."""
        found = []
        for child in psutil.Process(self.process.pid).children(recursive=True):
            try:
                if any("ServeReplica:twins-deploy:model" in part for part in child.cmdline()):
                    found.append(child)
            except psutil.Error:
                continue
        return found

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(model: Path, tmp: Path, *args: str) -> Server:
    """Start the CLI on free loopback ports and wait (bounded) until it answers ``/v2/health/ready``."""
    port, metrics_port = free_port(), free_port()
    log = tmp / f"serve-{port}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "twins_deploy.cli", "serve", str(model), "--host", HOST, "--port", str(port),
             "--metrics-port", str(metrics_port), *args], stdout=sink, stderr=subprocess.STDOUT, env=env,
            start_new_session=True)
    server = Server(process, port, metrics_port, log)
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"serve exited with {process.returncode}:\n{server.output()}")
        try:
            if server.request("/v2/health/ready", timeout=5)[0] == 200:
                server.descendants = psutil.Process(process.pid).children(recursive=True)
                return server
        except OSError:
            pass
        time.sleep(0.5)
    stop_server(server)
    raise AssertionError(f"serve was not ready in {START_SECONDS} s:\n{server.output()}")


def stop_server(server: Server, sig: int = signal.SIGTERM, timeout: float = 90) -> int:
    """Signal the server (only it), wait for it to exit, and return its exit code."""
    if server.process.poll() is None:
        server.process.send_signal(sig)
    try:
        return server.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(server.process.pid, signal.SIGKILL)  # its own session: only what this test started
        server.process.wait(timeout=30)
        raise AssertionError(f"serve did not exit within {timeout} s of signal {sig}:\n{server.output()}")


def leftovers(server: Server) -> list[str]:
    """Processes the server started that are still alive after it exited."""
    alive = []
    for process in server.descendants:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{process.pid} {process.name()}")
        except psutil.NoSuchProcess:
            continue
    return alive


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()
