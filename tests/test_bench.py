"""Bench: statistics on known numbers, the timing loop on a fake clock, the command's JSON/CSV and errors."""
from __future__ import annotations

import csv
import json
import time
from importlib.metadata import version

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_config, tiny_weights
from twins_deploy.cli import app
from twins_deploy.engines.base import EngineInfo, Runner
from twins_deploy.engines.bench import CpuClock, PerfClock, bench, describe_machine, measure, summarize
from twins_deploy.engines.torch_backend import TorchRunner
from twins_deploy.errors import UsageError
from twins_deploy.models import create_model

runner = CliRunner()


class FakeClock:
    """Time moves only when told to: latencies are exactly what the test says."""

    def __init__(self) -> None:
        self.t = 100.0

    def now(self) -> float:
        return self.t


class Takes(Runner):
    """Wraps a real runner and makes every call take ``seconds`` on the fake clock; records the call order."""

    def __init__(self, inner: Runner, clock: FakeClock, seconds: float, name: str, calls: list):
        super().__init__()
        self.inner, self.clock, self.seconds, self.name, self.calls = inner, clock, seconds, name, calls
        self.slowdown = 1.0  # the machine's state: a test changes it between rounds

    def _activate(self) -> None:
        self.inner.activate()
        info = self.inner.describe()
        self._info = EngineInfo(**{**info.__dict__, "name": self.name})

    def _infer(self, batch):
        self.calls.append((self.name, len(batch)))
        self.clock.t += self.seconds * self.slowdown
        return self.inner.infer(batch)

    def _describe(self):
        return self._info


@pytest.fixture(scope="module")
def tiny():
    model = create_model(tiny_config("tiny-svt"), weights=tiny_weights("tiny-svt"), img_size=64)
    with TorchRunner(model) as r:
        yield r


def test_summary_of_known_latencies():
    stats = summarize([i / 1000 for i in range(1, 101)], batch=8)  # 1..100 ms
    assert stats.iterations == 100
    assert stats.latency_ms_min == pytest.approx(1.0) and stats.latency_ms_max == pytest.approx(100.0)
    assert stats.latency_ms_mean == pytest.approx(50.5)
    assert stats.latency_ms_p50 == pytest.approx(50.5)
    assert stats.latency_ms_p90 == pytest.approx(90.1)
    assert stats.latency_ms_p95 == pytest.approx(95.05)
    assert stats.latency_ms_p99 == pytest.approx(99.01)
    assert stats.latency_ms_std == pytest.approx(np.std(np.arange(1, 101)))
    assert stats.throughput_img_per_s == pytest.approx(8 * 1000 / 50.5)


def test_summary_properties_on_random_latencies():
    rng = np.random.default_rng(0)
    for _ in range(20):
        latencies = rng.lognormal(-4, 0.5, size=int(rng.integers(1, 200)))
        s = summarize(latencies, batch=4)
        assert s.latency_ms_min <= s.latency_ms_p50 <= s.latency_ms_p90 <= s.latency_ms_p95 <= s.latency_ms_p99 \
            <= s.latency_ms_max
        assert s.latency_ms_min <= s.latency_ms_mean <= s.latency_ms_max
    single = summarize([0.002], batch=1)
    assert single.latency_ms_p99 == single.latency_ms_min == pytest.approx(2.0) and single.latency_ms_std == 0
    with pytest.raises(ValueError):
        summarize([], batch=1)


def test_measure_counts_iterations_or_stops_at_the_deadline(tiny):
    clock, calls = FakeClock(), []
    timed = Takes(tiny, clock, 0.004, "a", calls)
    batch = np.zeros((2, 3, 64, 64), np.float32)
    with timed:
        latencies, gpu = measure(timed, batch, iters=7, clock=clock)
        assert latencies == pytest.approx([0.004] * 7) and gpu == []
        latencies, _ = measure(timed, batch, seconds=0.01, clock=clock)  # 4 ms each: done after the third
        assert len(latencies) == 3
        latencies, _ = measure(timed, batch, seconds=0.0, clock=clock)  # always at least one
        assert len(latencies) == 1
    with pytest.raises(ValueError):
        measure(timed, batch, clock=clock)


def test_bench_interleaves_rounds_and_reports_ratios(tiny):
    clock, calls = FakeClock(), []
    slow, fast = Takes(tiny, clock, 0.010, "slow", calls), Takes(tiny, clock, 0.004, "fast", calls)
    with slow, fast:
        rows = bench([slow, fast], [1, 2], warmup=1, iters=6, rounds=3, clock=clock)
    timed = [c for c in calls if c[1] == 1][2:]  # after one warm-up call each
    assert [name for name, _ in timed] == ["slow", "slow", "fast", "fast"] * 3  # 6 iterations in 3 rounds
    assert [(r.engine, r.batch) for r in rows] == [("slow", 1), ("fast", 1), ("slow", 2), ("fast", 2)]
    by = {(r.engine, r.batch): r for r in rows}
    assert by["slow", 1].stats.latency_ms_p50 == pytest.approx(10.0)
    assert by["fast", 2].stats.throughput_img_per_s == pytest.approx(2 / 0.004)
    assert by["slow", 2].speedup_vs_first == pytest.approx(1.0)
    assert by["fast", 1].speedup_vs_first == pytest.approx(2.5)
    assert (by["fast", 1].speedup_min, by["fast", 1].speedup_max) == pytest.approx((2.5, 2.5))
    assert by["fast", 1].backend == "torch" and by["fast", 1].device == "cpu"
    assert set(by["fast", 1].as_dict()) >= {"engine", "batch", "latency_ms_p99", "throughput_img_per_s",
                                            "speedup_vs_first", "gpu_compute_ms_p50"}


def test_ratios_are_taken_within_rounds_and_their_range_shows_how_steady_they_were(tiny):
    clock, calls = FakeClock(), []
    base, int8 = Takes(tiny, clock, 0.010, "base", calls), Takes(tiny, clock, 0.005, "int8", calls)
    machine = iter([(3.0, 3.0), (1.2, 1.5), (1.0, 1.0), (1.0, 1.0)])  # (base, int8) slowdowns in rounds 2 to 5

    def next_round():  # 20 iterations in 5 rounds: 4 per engine, 8 calls a round
        if len(calls) % 8 == 0 and len(calls) < 40:
            base.slowdown, int8.slowdown = next(machine)

    with base, int8:
        rows = bench([base, int8], [1], warmup=0, iters=20, rounds=5, clock=clock, on_step=next_round)
    row = rows[1]  # round ratios 2, 2, 1.6, 2, 2
    assert row.speedup_vs_first == pytest.approx(2.0)
    assert (row.speedup_min, row.speedup_max) == pytest.approx((1.6, 2.0))
    assert rows[0].speedup_vs_first == rows[0].speedup_min == rows[0].speedup_max == 1.0


def test_cpu_clock_does_not_count_time_spent_waiting(tiny):
    class Sleeps(Runner):
        def _activate(self):
            tiny.activate()

        def _infer(self, batch):  # no onnxruntime call: its spinning thread pool would count as CPU time
            time.sleep(0.05)  # descheduled, as under a noisy neighbour
            return {"logits": np.zeros((len(batch), 10), np.float32)}

        def _describe(self):
            return tiny.describe()

    batch = np.zeros((1, 3, 64, 64), np.float32)
    with Sleeps() as sleeper:
        (wall,), _ = measure(sleeper, batch, iters=1, clock=PerfClock())
        (cpu,), _ = measure(sleeper, batch, iters=1, clock=CpuClock())
    assert wall >= 0.05 and cpu < 0.04


def test_bench_refuses_bad_settings(tiny):
    with pytest.raises(UsageError):
        bench([tiny], [1], iters=2, rounds=3)


def test_machine_description_names_cpu_threads_and_versions():
    machine = describe_machine()
    assert machine["cpu"] and machine["cpu_threads"] >= 1
    assert machine["libraries"]["torch"] == version("torch")
    assert {"onnxruntime", "onnx", "numpy", "twins-deploy"} <= set(machine["libraries"])
    assert machine["gpu"] is None or machine["gpu"]["name"]


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    from twins_deploy.exporters import export_onnx

    folder = tmp_path_factory.mktemp("bench")
    model = create_model(tiny_config("tiny-pcpvt"), weights=tiny_weights("tiny-pcpvt"))
    return export_onnx(model, folder / "tiny.onnx").path


def test_bench_command_writes_json_and_csv_with_ratios(tiny_onnx, tmp_path):
    result = runner.invoke(app, ["bench", "--engine", str(tiny_onnx), "--engine", str(tiny_onnx), "--batch", "1,2",
                                 "--iters", "3", "--warmup", "1", "--json", str(tmp_path / "b.json"),
                                 "--csv", str(tmp_path / "b.csv")], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["schema_version"] == 2 and report["machine"]["cpu"]
    assert [(r["engine"], r["batch"], r["iterations"]) for r in report["results"]] == [
        ("onnx", 1, 3), ("onnx", 1, 3), ("onnx", 2, 3), ("onnx", 2, 3)]
    assert report["results"][0]["speedup_vs_first"] == 1.0
    rows = list(csv.DictReader((tmp_path / "b.csv").open()))
    assert len(rows) == 4 and float(rows[3]["latency_ms_p50"]) > 0 and "throughput_img_per_s" in rows[0]
    assert "vs first" in result.stdout and "onnxruntime" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--batch", "1,x"], "comma-separated integers"),
    (["--batch", "0"], "positive sizes"),
    (["--iters", "5", "--seconds", "1"], "not both"),
    (["--clock", "sundial"], "--clock must be one of wall, cpu"),
])
def test_bench_command_usage_errors(tiny_onnx, args, message):
    result = runner.invoke(app, ["bench", "--engine", str(tiny_onnx), *args])
    assert result.exit_code == 2 and message in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a GPU")
def test_bench_fp16_on_a_cpu_host_lists_what_it_can_run():
    result = runner.invoke(app, ["bench", "--engine", "fp16", "--model", "svt-s", "--weights", "random"])
    assert result.exit_code == 2
    assert "no fp16 engine runs on this machine" in result.output
    assert "it can run: torch (cpu), torch-bf16 (cpu), onnx (cpu), onnx-int8 (cpu)" in result.output
