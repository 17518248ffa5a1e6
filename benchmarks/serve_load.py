"""Serving under load: ``twins-deploy serve`` against a hand-written server and the engine's own limit.

    python benchmarks/serve_load.py --model svt-s --weights random                 # fp32 ONNX, exported once
    python benchmarks/serve_load.py --model svt-s --weights random --engine best   # our best CPU engine
    python benchmarks/serve_load.py --engine svt-s-224x224.onnx --requests 300 --levels 1,8,32

On one engine file, in each of ``--rounds`` rounds: every server in turn, alone on the machine
(started here as a subprocess on 127.0.0.1, run at each level, stopped with SIGTERM), then (d)'s
sweep; so a host whose speed drifts moves every server alike. Figures are medians over rounds, and
ratios are taken per round:

- (a) ``serve``: ``twins-deploy serve ENGINE`` with its dynamic batching (its defaults);
- (b) ``serve-b1``: the same with ``--max-batch 1`` (no batching);
- (c) ``hand``: the server a user writes by hand: FastAPI + uvicorn, a sync endpoint (FastAPI's
  thread pool) calling one ``twins_deploy.runtime.Predictor`` per request;
- (d) ``engine``: the engine in-process with no HTTP, ``Predictor.run`` on preprocessed batches of
  1 to 32, one call at a time on every thread and as many calls at once as threads, one thread each
  (``Predictor(streams=)``, what serve's replicas run by default): the best images/s is the limit a
  server approaches.

Load: a closed loop of C clients (asyncio, aiohttp, keep-alive) at each concurrency of ``--levels``;
each POSTs one JPEG to ``/v1/models/NAME/predict`` (``content-type: image/jpeg``), waits for its
JSON 200 and sends the next, without a pause: ``2*C`` warm-up answers (at least 8), then
``--requests`` measured ones, then C more so that every measured answer comes while all C clients
are busy (the steady state; the ramp and the drain are not measured); each level also stops at
``--level-timeout`` seconds. Every answer's top-1 class is checked against the Predictor's on the
same image. Throughput counts the measured answers (200) over the time from the last warm-up answer
to the last measured one; p50/p99 are client-side latencies of the measured requests.

Threads: each serve replica runs ``--threads`` engine threads (``--replicas`` of them); the hand
server and the in-process engine get ``replicas x threads``, the same engine threads in total.
The load generator runs in this process and shares the CPUs with the server: on a small machine
its cost is part of every HTTP figure (and not of (d)).

Checks (issue 16), on the median of the per-round ratios: floor: (a) > (c) in images/s at
concurrency 32, and (a) >= 0.8x (d); goal: (a) >= 0.9x (d) at concurrency 32, and (a)'s p99 at concurrency 1 within 10 ms of the
engine's own batch-1 p99. JSON (``--out``) and a Markdown table beside it (``.md``).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
SERVERS = {
    "serve": "(a) twins-deploy serve, dynamic batching",
    "serve-b1": "(b) twins-deploy serve --max-batch 1",
    "hand": "(c) FastAPI + uvicorn by hand, Predictor per request",
    "engine": "(d) engine in-process, no HTTP",
}
ENGINE_BATCHES = (1, 2, 4, 8, 16, 32)
REQUEST_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 90.0  # a server's clean exit after SIGTERM; past it, its process group is killed
FLOOR_VS_ENGINE, GOAL_VS_ENGINE, GOAL_P99_MARGIN_MS = 0.8, 0.9, 10.0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- the engine file and the request image ----------------------------------------------------------

def engine_file(engine: str | None, model: str | None, weights: str) -> Path:
    """``--engine`` as a file: a path as it is, or an engine name (``onnx``, ``best``, ``ov-int8`` ...)
    built from ``--model/--weights`` into the twins-deploy cache, as ``bench --engine`` does."""
    from twins_deploy.engines.resolve import Builds, ModelSource, engine_kind, model_folder, resolve_name
    from twins_deploy.engines.table import detect_capabilities
    from twins_deploy.errors import UsageError

    engine = engine or "onnx"
    if engine_kind(engine) == "file":
        path = Path(engine)
        if path.suffix.lower() not in (".onnx", ".xml") or not path.is_file():
            raise UsageError(f"--engine must be an existing .onnx file or OpenVINO IR (.xml), got {engine}")
        return path
    if not model:
        raise UsageError(f"--engine {engine} is built from a model: pass --model NAME (and --weights)")
    fmt, device = resolve_name(engine, detect_capabilities())
    source = ModelSource(model, weights=weights)
    builds = Builds(source, model_folder(source), log)
    files = {("onnxruntime", "fp32"): builds.fp32_onnx, ("onnxruntime", "int8"): lambda: builds.int8_onnx("cpu"),
             ("openvino", "fp32"): lambda: builds.openvino_ir("fp32"),
             ("openvino", "bf16"): lambda: builds.openvino_ir("bf16"),
             ("openvino", "int8"): lambda: builds.openvino_ir("int8")}
    make = files.get((fmt.backend, fmt.precision))
    if make is None or device != "cpu":
        raise UsageError(f"--engine {engine} resolves to {fmt.name} on {device}; serve runs CPU .onnx and .xml "
                         "files: name one of onnx, onnx-int8, ov, ov-bf16, ov-int8, or pass a file")
    return make()


def request_image(path: Path | None) -> bytes:
    """The JPEG every request sends: ``--image``, or a seeded 500x375 photo-like picture (ImageNet's
    typical size), so decoding and resizing cost what they cost on real traffic."""
    if path is not None:
        return path.read_bytes()
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:375, 0:500]
    smooth = np.stack([(x / 2) % 256, (y / 1.5) % 256, ((x + y) / 3.5) % 256], axis=-1)
    pixels = np.clip(smooth + rng.normal(0, 24, smooth.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


# --- servers: started here, on 127.0.0.1, stopped with SIGTERM ------------------------------------

def free_port() -> int:
    """A loopback port that a starting Ray does not take (its processes bind ephemeral ports)."""
    from twins_deploy.raylocal import port_ray_leaves_free

    return port_ray_leaves_free(pairs=True)


def twins_deploy_command() -> list[str]:
    exe = shutil.which("twins-deploy")
    return [exe] if exe else [sys.executable, "-c", "from twins_deploy.cli import app; app()"]


class Server:
    """A server subprocess in its own process group, its output in a log file, ready when
    ``GET /v2/health/ready`` on its port answers 200."""

    def __init__(self, label: str, command: list[str], port: int, logs: Path):
        self.label, self.command, self.port = label, command, port
        self.log_path = logs / f"{label}.log"
        self.process: subprocess.Popen | None = None
        self.exit_code: int | None = None

    def start(self, timeout_s: float) -> float:
        """Start and wait until ready; the seconds it took. Raises RuntimeError with the log's tail."""
        env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PYTHONUNBUFFERED="1")
        started = time.perf_counter()
        with open(self.log_path, "wb") as output:
            self.process = subprocess.Popen(self.command, stdout=output, stderr=subprocess.STDOUT, env=env,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        url = f"http://127.0.0.1:{self.port}/v2/health/ready"
        while time.perf_counter() - started < timeout_s:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.label} exited with code {self.process.returncode} before it was ready: "
                                   f"{self.tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return time.perf_counter() - started
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.label} was not ready within {timeout_s:.0f} s: {self.tail()}")

    def stop(self) -> None:
        """SIGTERM to the server; if it has not exited after ``STOP_TIMEOUT_S``, SIGKILL to its process
        group (the group this script created for it: nothing else is in it)."""
        if self.process is None or self.process.poll() is not None:
            self.exit_code = None if self.process is None else self.process.returncode
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.exit_code = self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log(f"  {self.label} did not exit within {STOP_TIMEOUT_S:.0f} s of SIGTERM: killing its process group")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.exit_code = self.process.wait()

    def tail(self, lines: int = 6) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:]) or "(empty log)"


def hand_server(engine: str, port: int, threads: int, name: str) -> None:
    """(c): what a user writes by hand around the runtime: one Predictor, a sync FastAPI endpoint
    (FastAPI runs it in its thread pool), uvicorn on 127.0.0.1."""
    import uvicorn
    from fastapi import Body, FastAPI

    from twins_deploy.runtime import Predictor

    predictor = Predictor(engine, threads=threads)
    app = FastAPI()

    @app.get("/v2/health/ready")
    def ready() -> dict:
        return {"ready": True}

    @app.post(f"/v1/models/{name}/predict")
    def predict(image: bytes = Body(..., media_type="image/jpeg")) -> dict:
        started = time.perf_counter()
        prediction = predictor.predict(image)
        return {"model": name, "predictions": [prediction.as_dict()],
                "server_ms": round((time.perf_counter() - started) * 1000, 3)}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# --- load: a closed loop of C clients ----------------------------------------------------------------

async def closed_loop(url: str, image: bytes, concurrency: int, requests: int, warmup: int,
                      deadline_s: float) -> dict:
    """``concurrency`` clients that each send the next request when the last one is answered, without a pause:
    the first ``warmup`` answers are not measured, the next ``requests`` are, and ``concurrency`` more are sent
    so that every measured answer comes while all clients are busy (the steady state: a run that drained
    before and after its measured requests counted the ramp and the tail of a batching server). Stops early
    at ``deadline_s``; every answer of the run is checked, the measured ones give throughput and latency."""
    import aiohttp

    headers = {"content-type": "image/jpeg"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) \
            as session:

        async def one() -> tuple[float, float, object, bytes]:
            started = time.perf_counter()
            try:
                async with session.post(url, data=image, headers=headers) as response:
                    body = await response.read()
                    status = response.status
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                status, body = type(exc).__name__, b""
            finished = time.perf_counter()
            return finished, finished - started, status, body

        tickets, results = iter(range(warmup + requests + concurrency)), []
        stop_at = time.perf_counter() + deadline_s

        async def client() -> None:
            for _ in tickets:
                if time.perf_counter() > stop_at:
                    return
                results.append(await one())

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))

    results.sort(key=lambda result: result[0])
    window_start = results[warmup - 1][0] if 0 < warmup <= len(results) else started
    measured = results[warmup:warmup + requests]
    wall = (measured[-1][0] - window_start) if measured else 0.0
    answered = [(latency, body) for _, latency, status, body in measured if status == 200]
    failures: dict[str, int] = {}
    top1: dict[str, int] = {}
    for _, _, status, body in results:  # every answer of the run, measured or not, must be right
        if status != 200:
            failures[str(status)] = failures.get(str(status), 0) + 1
        else:
            key = _top1(body)
            top1[key] = top1.get(key, 0) + 1
    latencies = np.asarray([latency for latency, _ in answered]) * 1e3
    return {"concurrency": concurrency, "requests": len(measured), "answered": len(answered), "failures": failures,
            "sent": len(results), "timed_out": len(measured) < requests, "wall_s": round(wall, 3),
            "throughput_img_per_s": len(answered) / wall if wall > 0 else 0.0,
            **_latency_stats(latencies), "top1_classes": top1}


def _top1(body: bytes) -> str:
    """The top-1 class id of a ``/v1`` answer, or what was wrong with it."""
    try:
        return str(json.loads(body)["predictions"][0]["class_ids"][0])
    except (ValueError, KeyError, IndexError, TypeError):
        return "unreadable answer"


def _latency_stats(latencies_ms: np.ndarray) -> dict:
    if len(latencies_ms) == 0:
        return {"latency_ms_p50": None, "latency_ms_p99": None, "latency_ms_mean": None, "latency_ms_max": None}
    p50, p99 = np.percentile(latencies_ms, [50, 99])
    return {"latency_ms_p50": float(p50), "latency_ms_p99": float(p99),
            "latency_ms_mean": float(latencies_ms.mean()), "latency_ms_max": float(latencies_ms.max())}


def load_level(url: str, image: bytes, concurrency: int, requests: int, deadline_s: float, expected_top1: int,
               label: str) -> dict:
    row = asyncio.run(closed_loop(url, image, concurrency, requests, max(8, 2 * concurrency), deadline_s))
    row["wrong_top1"] = sum(count for key, count in row["top1_classes"].items() if key != str(expected_top1))
    log(f"  {label:<9} c={concurrency:<3} {row['throughput_img_per_s']:7.1f} img/s  p50 {_ms(row['latency_ms_p50'])}"
        f"  p99 {_ms(row['latency_ms_p99'])}  answered {row['answered']}/{row['requests']}"
        + (f"  failures {row['failures']}" if row["failures"] else "")
        + (f"  wrong top-1 {row['wrong_top1']}" if row["wrong_top1"] else "")
        + ("  (stopped at --level-timeout)" if row["timed_out"] else ""))
    return row


def combine_rounds(rows: list[dict]) -> dict:
    """One level over its rounds: the median round's throughput and latencies, every round's throughput, and the
    answers, failures and wrong classes of all rounds together."""
    def median(key: str) -> float | None:
        values = [row[key] for row in rows if row[key] is not None]
        return float(np.median(values)) if values else None

    failures: dict[str, int] = {}
    for row in rows:
        for status, count in row["failures"].items():
            failures[status] = failures.get(status, 0) + count
    return {"concurrency": rows[0]["concurrency"], "rounds": len(rows),
            "round_throughputs": [round(row["throughput_img_per_s"], 2) for row in rows],
            "throughput_img_per_s": median("throughput_img_per_s"), "latency_ms_p50": median("latency_ms_p50"),
            "latency_ms_p99": median("latency_ms_p99"), "requests": sum(row["requests"] for row in rows),
            "answered": sum(row["answered"] for row in rows), "sent": sum(row["sent"] for row in rows),
            "failures": failures, "wrong_top1": sum(row["wrong_top1"] for row in rows),
            "timed_out": any(row["timed_out"] for row in rows)}


# --- (d): the engine in-process --------------------------------------------------------------------

def engine_limit(engine: Path, image: bytes, threads: int, requests: int, deadline_s: float) -> dict:
    """Images/s of ``Predictor.run`` on preprocessed batches of 1 to 32, with one call at a time on every
    thread and, when ``threads`` > 1, ``threads`` calls at once on one thread each (each setting a whole
    round before the next); and what decoding and preprocessing one JPEG costs (in every HTTP figure, not
    here). The best row is the limit a server on this engine approaches."""
    from concurrent.futures import ThreadPoolExecutor

    from twins_deploy.runtime import Predictor

    rows, preprocess_ms = [], []
    for streams in sorted({1, threads}):
        predictor = Predictor(engine, threads=threads, streams=streams)
        one = predictor.preprocess(image)
        for _ in range(20 if streams == 1 else 0):
            started = time.perf_counter()
            predictor.preprocess(image)
            preprocess_ms.append((time.perf_counter() - started) * 1e3)
        with ThreadPoolExecutor(streams) as pool:
            for batch_size in ENGINE_BATCHES:
                batch = np.repeat(one, batch_size, axis=0)
                calls = max(10, math.ceil(requests / batch_size))
                stop_at = time.perf_counter() + deadline_s

                def stream(count: int) -> list[float]:
                    times = []
                    for _ in range(count):
                        started = time.perf_counter()
                        predictor.run(batch)
                        times.append((time.perf_counter() - started) * 1e3)
                        if time.perf_counter() > stop_at:
                            break
                    return times

                list(pool.map(lambda _: [predictor.run(batch) for _ in range(2)], range(streams)))  # warm-up
                started = time.perf_counter()
                times = np.concatenate(list(pool.map(stream, [math.ceil(calls / streams)] * streams)))
                wall = time.perf_counter() - started
                row = {"batch": batch_size, "streams": streams, "runs": len(times),
                       "throughput_img_per_s": batch_size * len(times) / wall,
                       **_latency_stats(times)}
                rows.append(row)
                log(f"  batch {batch_size:<3} x {streams} at once {row['throughput_img_per_s']:7.1f} img/s  "
                    f"p50 {_ms(row['latency_ms_p50'])}  p99 {_ms(row['latency_ms_p99'])}  ({len(times)} runs)")
        del predictor
    best = max(rows, key=lambda r: r["throughput_img_per_s"])
    return {"threads": threads, "batches": rows, "best_batch": best["batch"], "best_streams": best["streams"],
            "best_throughput_img_per_s": best["throughput_img_per_s"],
            "preprocess_ms_median": float(np.median(preprocess_ms))}


def combine_engine_rounds(rounds: list[dict]) -> dict:
    """(d) over its rounds: each setting's median images/s and latencies; the limit of a round is its best
    setting, and the limit reported is the median of those."""
    rows = []
    for settings in zip(*(result["batches"] for result in rounds)):
        rows.append({"batch": settings[0]["batch"], "streams": settings[0]["streams"],
                     "runs": sum(row["runs"] for row in settings),
                     "round_throughputs": [round(row["throughput_img_per_s"], 2) for row in settings],
                     **{key: float(np.median([row[key] for row in settings]))
                        for key in ("throughput_img_per_s", "latency_ms_p50", "latency_ms_p99")}})
    best = max(rows, key=lambda row: row["throughput_img_per_s"])
    limits = [result["best_throughput_img_per_s"] for result in rounds]
    return {"threads": rounds[0]["threads"], "batches": rows, "best_batch": best["batch"],
            "best_streams": best["streams"], "round_limits": [round(limit, 2) for limit in limits],
            "best_throughput_img_per_s": float(np.median(limits)),
            "preprocess_ms_median": float(np.median([result["preprocess_ms_median"] for result in rounds]))}


# --- report ------------------------------------------------------------------------------------------

def checks(results: dict, levels: list[int]) -> list[dict]:
    """The floor and goal of issue 16, each with the figures it compares (or why it was not measured)."""
    serve, hand, engine = (results.get(key) for key in ("serve", "hand", "engine"))

    def level(result: dict | None, concurrency: int) -> dict | None:
        if not result or "levels" not in result:
            return None
        return next((row for row in result["levels"] if row["concurrency"] == concurrency), None)

    serve32, hand32, serve1 = level(serve, 32), level(hand, 32), level(serve, 1)
    limit = engine["best_throughput_img_per_s"] if engine and "batches" in engine else None
    engine_p99_b1 = engine["batches"][0]["latency_ms_p99"] if engine and "batches" in engine else None  # 1 at once
    out = []

    def add(kind: str, what: str, measured: bool, passed: bool, figures: str) -> None:
        out.append({"kind": kind, "check": what, "passed": passed if measured else None,
                    "figures": figures if measured else "not measured"})

    def ratios(ours: list[float], theirs: list[float]) -> tuple[float, str]:
        """The median of per-round ratios, and how it reads with its range (rounds run back to back)."""
        per_round = np.asarray(ours) / np.asarray(theirs)
        median = float(np.median(per_round))
        return median, f"{median:.2f}x (rounds {per_round.min():.2f}-{per_round.max():.2f})"

    a32 = serve32["round_throughputs"] if serve32 else None
    if serve32 and hand32:
        versus_hand, said = ratios(a32, hand32["round_throughputs"])
        add("floor", "(a) > (c) at concurrency 32", True, versus_hand > 1,
            f"{serve32['throughput_img_per_s']:.1f} vs {hand32['throughput_img_per_s']:.1f} img/s; (a)/(c) {said}")
    else:
        add("floor", "(a) > (c) at concurrency 32", False, False, "")
    versus_engine = ratios(a32, engine["round_limits"]) if serve32 and limit else None
    for kind, ratio in (("floor", FLOOR_VS_ENGINE), ("goal", GOAL_VS_ENGINE)):
        add(kind, f"(a) at concurrency 32 >= {ratio}x (d)", versus_engine is not None,
            bool(versus_engine and versus_engine[0] >= ratio),
            f"{serve32['throughput_img_per_s']:.1f} / {limit:.1f} img/s; (a)/(d) {versus_engine[1]}"
            if versus_engine else "")
    p99 = serve1["latency_ms_p99"] if serve1 else None
    add("goal", f"(a) p99 at concurrency 1 <= engine batch-1 p99 + {GOAL_P99_MARGIN_MS:g} ms",
        p99 is not None and engine_p99_b1 is not None,
        p99 is not None and engine_p99_b1 is not None and p99 <= engine_p99_b1 + GOAL_P99_MARGIN_MS,
        f"{p99:.1f} vs {engine_p99_b1:.1f} + {GOAL_P99_MARGIN_MS:g} ms" if p99 is not None and engine_p99_b1 else "")
    if 32 not in levels:
        for check in out:
            if "concurrency 32" in check["check"] and check["passed"] is None:
                check["figures"] = "not measured (32 is not in --levels)"
    return out


def markdown(report: dict) -> str:
    lines = ["| server | concurrency / batch | img/s | p50 ms | p99 ms | answered | notes |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for key, result in report["servers"].items():
        label = SERVERS[key]
        if "error" in result:
            lines.append(f"| {label} | - | - | - | - | - | {result['error'][:160]} |")
            continue
        if key == "engine":
            for row in result["batches"]:
                best = " best" if (row["batch"], row["streams"]) == (result["best_batch"], result["best_streams"]) \
                    else ""
                rounds = ", ".join(f"{value:.1f}" for value in row["round_throughputs"])
                lines.append(f"| {label} | batch {row['batch']} x {row['streams']} at once{best} | "
                             f"{row['throughput_img_per_s']:.1f} | {_ms(row['latency_ms_p50'])} | "
                             f"{_ms(row['latency_ms_p99'])} | {row['runs']} runs | rounds: {rounds} |")
            continue
        for row in result["levels"]:
            notes = []
            if row["failures"]:
                notes.append("failures " + ", ".join(f"{k}: {v}" for k, v in row["failures"].items()))
            if row["wrong_top1"]:
                notes.append(f"wrong top-1: {row['wrong_top1']}")
            if row["timed_out"]:
                notes.append("stopped at --level-timeout")
            notes.append("rounds: " + ", ".join(f"{value:.1f}" for value in row["round_throughputs"]))
            lines.append(f"| {label} | {row['concurrency']} | {row['throughput_img_per_s']:.1f} | "
                         f"{_ms(row['latency_ms_p50'])} | {_ms(row['latency_ms_p99'])} | "
                         f"{row['answered']}/{row['requests']} | {'; '.join(notes)} |")
    lines += ["", "| check | | result | figures |", "|---|---|---|---|"]
    for check in report["checks"]:
        verdict = {True: "**met**", False: "**not met**", None: "-"}[check["passed"]]
        lines.append(f"| {check['kind']} | {check['check']} | {verdict} | {check['figures']} |")
    settings = report["settings"]
    preprocess = report["servers"].get("engine", {}).get("preprocess_ms_median")
    footer = (f"{Path(report['engine']).name}; {report['machine'].get('cpu', '?')}; serve: {settings['replicas']} "
              f"replica(s) x {settings['threads']} threads; hand server and engine: {report['engine_threads']} "
              f"threads; {settings['rounds']} rounds of {settings['requests']} measured requests per level; one {report['image_bytes'] // 1024} KiB JPEG "
              "per request")
    lines += ["", footer + (f" (decode + preprocess: {preprocess:.1f} ms per image, in every HTTP figure and not "
                            "in (d))." if preprocess is not None else ".")]
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def write(report: dict, out: Path) -> str:
    from twins_deploy.files import atomic_output

    table = markdown(report)
    with atomic_output(out) as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    with atomic_output(out.with_suffix(".md")) as tmp:
        tmp.write_text(table + "\n")
    return table


# --- main --------------------------------------------------------------------------------------------

def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "hand-server":  # (c), started by this script as a subprocess
        engine, port, threads, name = sys.argv[2:6]
        hand_server(engine, int(port), int(threads), name)
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", help="an .onnx file or OpenVINO IR (.xml), or an engine name built from --model "
                                         "(onnx, best, int8, ov-int8, ...); default: onnx")
    parser.add_argument("--model", help="the model an engine name is built from, e.g. svt-s")
    parser.add_argument("--weights", default="pretrained", help="with --model: pretrained, random or a checkpoint")
    parser.add_argument("--servers", default=",".join(SERVERS), help=f"which to run, of {', '.join(SERVERS)}")
    parser.add_argument("--levels", default="1,8,32", help="client concurrencies")
    parser.add_argument("--requests", type=int, default=200, help="measured requests per level and round (and "
                                                                   "images per engine batch size, at least 10 runs)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds: in each, every server runs each level in turn "
                                                              "and (d) its sweep; medians and per-round ratios")
    parser.add_argument("--replicas", type=int, default=1, help="serve's model replicas")
    parser.add_argument("--threads", type=int, help="engine threads per serve replica (default: CPUs / replicas)")
    parser.add_argument("--serve-args", default="", help="more options for both serve runs, e.g. '--batch-wait-ms 5'")
    parser.add_argument("--image", type=Path, help="the JPEG to send (default: a seeded 500x375 picture)")
    parser.add_argument("--level-timeout", type=float, default=300.0, help="seconds a level (or batch size) may run")
    parser.add_argument("--start-timeout", type=float, default=240.0, help="seconds a server may take to be ready")
    parser.add_argument("--out", type=Path, help="JSON report (Markdown beside it, .md); default: "
                                                 "benchmarks/results/serve-load-<engine>.json")
    args = parser.parse_args()

    from twins_deploy.engines.bench import describe_machine
    from twins_deploy.errors import TwinsDeployError
    from twins_deploy.runtime import Predictor

    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    levels = [int(c) for c in args.levels.split(",")]
    unknown = [s for s in servers if s not in SERVERS]
    if unknown or min(args.requests, args.rounds, args.replicas, *levels) < 1:
        parser.error(f"unknown server {unknown[0]!r} (of {', '.join(SERVERS)})" if unknown
                     else "--requests, --rounds, --levels and --replicas must be 1 or more")
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.replicas)
    engine_threads = threads * args.replicas
    try:
        engine = engine_file(args.engine, args.model, args.weights)
    except TwinsDeployError as exc:
        sys.exit(f"error: {exc}")
    image = request_image(args.image)
    reference = Predictor(engine, threads=1)
    name = reference.metadata.model.replace("/", "-")
    expected_top1 = reference.predict(image).class_ids[0]
    del reference
    out = args.out or RESULTS / f"serve-load-{engine.stem}.json"
    log(f"engine {engine} ({name}); one {len(image) // 1024} KiB JPEG per request, expected top-1 class "
        f"{expected_top1}; levels {levels}, {args.requests} requests each")

    report = {"schema_version": 1, "machine": describe_machine(), "engine": str(engine), "model": name,
              "image_bytes": len(image), "expected_top1": expected_top1, "engine_threads": engine_threads,
              "settings": {**vars(args), "threads": threads, "out": str(out), "image": str(args.image or "")},
              "servers": {}, "checks": []}
    serve_base = twins_deploy_command() + ["serve", str(engine), "--host", "127.0.0.1", "--replicas",
                                           str(args.replicas), "--threads", str(threads), "--name", name]
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a SIGTERM stops the server running, as Ctrl-C
    http = [key for key in servers if key != "engine"]
    rows: dict[str, dict[int, list[dict]]] = {key: {c: [] for c in levels} for key in http}
    engine_rounds = []
    with tempfile.TemporaryDirectory(prefix="serve-load-") as logs:
        for round_number in range(1, args.rounds + 1):  # each server alone on the machine, then the next
            log(f"== round {round_number} of {args.rounds}")
            for key in http:
                if "error" in report["servers"].get(key, {}):
                    continue
                port = free_port()
                if key == "hand":
                    command = [sys.executable, str(Path(__file__).resolve()), "hand-server", str(engine), str(port),
                               str(engine_threads), name]
                else:
                    command = serve_base + ["--port", str(port), "--metrics-port", str(free_port())]
                    command += (["--max-batch", "1"] if key == "serve-b1" else []) + shlex.split(args.serve_args)
                result = report["servers"].setdefault(key, {"command": shlex.join(command), "start_s": []})
                server = Server(key, command, port, Path(logs))
                try:
                    result["start_s"].append(round(server.start(args.start_timeout), 1))
                    log(f"  {key}: ready in {result['start_s'][-1]} s on 127.0.0.1:{port}")
                    url = f"http://127.0.0.1:{port}/v1/models/{name}/predict"
                    for concurrency in levels:
                        rows[key][concurrency].append(load_level(url, image, concurrency, args.requests,
                                                                 args.level_timeout, expected_top1, key))
                    # what serve chose (threads, streams, the batch size timed at start): printed once the app
                    # is ready, which can be after the health check first answers, so read after the load
                    said = [line for line in server.tail(40).split(" | ") if line.startswith("model replicas:")]
                    if said:
                        result.setdefault("replicas", []).append(said[0])
                        log(f"  {key}: {said[0]}")
                except RuntimeError as exc:
                    result["error"] = str(exc)
                    log(f"  {exc}")
                finally:
                    server.stop()
                    result.setdefault("exit_codes_after_sigterm", []).append(server.exit_code)
            if "engine" in servers:
                log("  engine in-process")
                engine_rounds.append(engine_limit(engine, image, engine_threads, args.requests, args.level_timeout))
    for key in http:
        if all(rows[key][c] for c in levels):
            report["servers"][key]["levels"] = [combine_rounds(rows[key][c]) for c in levels]
    if engine_rounds:
        report["servers"]["engine"] = combine_engine_rounds(engine_rounds)
    report["checks"] = checks(report["servers"], levels)
    print(write(report, out))
    log(f"JSON: {out}; Markdown: {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
