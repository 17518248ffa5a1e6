"""Latency and throughput of engines, measured fairly and stated with the machine they ran on.

Engines are measured in interleaved rounds (A, B, C, A, B, C, ...) so that a noisy neighbour or a
thermal drift hits all of them alike. Ratios are taken within each round and reported as the median
over rounds with its range: the range says how steady the ratio was on this machine. Each ``infer``
is timed end to end (host array in, host array out) with a monotonic clock; GPU backends also
report their device compute time from CUDA events.
Statistics are a pure function of the latencies, so they are tested on known numbers.
"""
from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass
from typing import Callable, Protocol, Sequence

import numpy as np

from twins_deploy.engines.base import Runner
from twins_deploy.errors import UsageError
from twins_deploy.memory import check_batch

SCHEMA_VERSION = 2  # 2: speedup_vs_first is the median of per-round ratios; speedup_min/max added


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic clock."""


class PerfClock:
    """Wall-clock time: what a caller waits."""

    def now(self) -> float:
        return time.perf_counter()


class CpuClock:
    """CPU time of this process, all threads: on a shared machine, with one thread per engine, the
    compute an inference costs whatever the neighbours do (time spent descheduled is not counted)."""

    def now(self) -> float:
        return time.process_time()


CLOCKS = {"wall": PerfClock, "cpu": CpuClock}


@dataclass(frozen=True)
class LatencyStats:
    iterations: int
    latency_ms_min: float
    latency_ms_mean: float
    latency_ms_p50: float
    latency_ms_p90: float
    latency_ms_p95: float
    latency_ms_p99: float
    latency_ms_max: float
    latency_ms_std: float
    throughput_img_per_s: float  # batch / mean latency

    def as_dict(self) -> dict:
        return asdict(self)


def summarize(latencies_s: Sequence[float], batch: int) -> LatencyStats:
    """Statistics of per-iteration latencies (seconds) for a batch size; percentiles interpolate linearly."""
    if len(latencies_s) == 0:
        raise ValueError("no latencies to summarize")
    ms = np.asarray(latencies_s, dtype=np.float64) * 1e3
    p50, p90, p95, p99 = np.percentile(ms, [50, 90, 95, 99])
    mean = float(ms.mean())
    return LatencyStats(len(ms), float(ms.min()), mean, float(p50), float(p90), float(p95), float(p99),
                        float(ms.max()), float(ms.std()), batch * 1e3 / mean if mean > 0 else float("inf"))


def measure(runner: Runner, batch: np.ndarray, *, iters: int | None = None, seconds: float | None = None,
            clock: Clock | None = None, on_step: Callable[[], None] | None = None) -> tuple[list[float], list[float]]:
    """Run ``batch`` ``iters`` times, or until ``seconds`` have passed (at least once).

    Returns end-to-end latencies (s) and, for GPU backends, device compute times (ms).
    """
    if (iters is None) == (seconds is None):
        raise ValueError("give iters or seconds")
    clock = clock or PerfClock()
    latencies, compute = [], []
    deadline = None if seconds is None else clock.now() + seconds
    while True:
        start = clock.now()
        runner.infer(batch)
        end = clock.now()
        latencies.append(end - start)
        if runner.last_compute_ms is not None:
            compute.append(runner.last_compute_ms)
        if on_step:
            on_step()
        if (iters is not None and len(latencies) >= iters) or (deadline is not None and end >= deadline):
            return latencies, compute


@dataclass
class BenchRow:
    engine: str
    backend: str
    device: str
    precision: str
    batch: int
    stats: LatencyStats
    gpu_compute_ms_p50: float | None = None
    speedup_vs_first: float | None = None  # median over rounds of (first engine's round p50 / this one's)
    speedup_min: float | None = None  # the lowest and highest of those per-round ratios
    speedup_max: float | None = None

    def as_dict(self) -> dict:
        row = {k: v for k, v in asdict(self).items() if k != "stats"}
        row.update(self.stats.as_dict())
        return row


def bench(runners: Sequence[Runner], batches: Sequence[int], *, warmup: int = 5, iters: int | None = None,
          seconds: float | None = None, rounds: int = 3, seed: int = 0, clock: Clock | None = None,
          on_step: Callable[[], None] | None = None) -> list[BenchRow]:
    """Bench active runners at each batch size in interleaved rounds; per-round ratios against the first runner."""
    if rounds < 1 or warmup < 0 or (iters is not None and iters < rounds):
        raise UsageError("need rounds >= 1, warmup >= 0 and iters >= rounds")
    infos = [r.describe() for r in runners]
    for info in infos:
        if info.input_shape[1:] != infos[0].input_shape[1:]:
            raise UsageError(f"{info.name} takes {info.input_shape[1:]} but {infos[0].name} takes "
                             f"{infos[0].input_shape[1:]}: bench engines of one input size together")
        too_big = [b for b in batches if info.max_batch is not None and b > info.max_batch]
        if too_big:
            raise UsageError(f"batch {too_big[0]} is larger than {info.name}'s maximum {info.max_batch}")
    check_batch("bench", [info.metadata for info in infos], max(batches))  # every runner keeps its activations
    rng = np.random.default_rng(seed)
    rows = []
    for batch in batches:
        data = rng.standard_normal((batch, *infos[0].input_shape[1:])).astype(np.float32)
        for runner in runners:
            for _ in range(warmup):
                runner.infer(data)
        latencies = [[] for _ in runners]
        compute = [[] for _ in runners]
        round_p50 = [[] for _ in runners]
        for round_index in range(rounds):
            for i, runner in enumerate(runners):
                chunk = None if iters is None else iters // rounds + (round_index < iters % rounds)
                lat, gpu = measure(runner, data, iters=chunk, seconds=None if seconds is None else seconds / rounds,
                                   clock=clock, on_step=on_step)
                latencies[i] += lat
                compute[i] += gpu
                round_p50[i].append(float(np.median(lat)))
        for info, lat, gpu in zip(infos, latencies, compute):
            rows.append(BenchRow(info.name, info.backend, info.device, info.precision, batch, summarize(lat, batch),
                                 float(np.median(gpu)) if gpu else None))
        first = np.asarray(round_p50[0])
        for row, p50s in zip(rows[-len(runners):], round_p50):
            p50s = np.asarray(p50s)
            if p50s.min() > 0:
                ratios = first / p50s
                row.speedup_vs_first = float(np.median(ratios))
                row.speedup_min, row.speedup_max = float(ratios.min()), float(ratios.max())
    return rows


def describe_machine() -> dict:
    """CPU, threads, GPU and library versions: what a bench figure depends on."""
    from importlib.metadata import PackageNotFoundError, version

    from twins_deploy import __version__

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    libraries = {"twins-deploy": __version__}
    for package in ("torch", "onnxruntime", "onnxruntime-gpu", "openvino", "nncf", "onnx", "numpy", "tensorrt"):
        try:
            libraries[package] = version(package)
        except PackageNotFoundError:
            continue
    import onnxruntime as ort
    import torch

    gpu = None
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        gpu = {"name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}",
               "cuda": torch.version.cuda}
    return {"cpu": cpu, "cpu_threads": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": gpu, "onnxruntime_providers": ort.get_available_providers(), "python": platform.python_version(),
            "platform": platform.platform(), "libraries": libraries}


def bench_report(rows: Sequence[BenchRow], machine: dict, settings: dict) -> dict:
    return {"schema_version": SCHEMA_VERSION, "machine": machine, "settings": settings,
            "results": [row.as_dict() for row in rows]}
