"""The GPU path's one command (benchmarks/gpu_run.sh), run end to end as its CPU dry run; its clock, its
error handling, and the torch engine's compile backend and CUDA-graph options that it drives."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import golden, load_benchmark, tiny_config, tiny_weights
from twins_deploy.engines.torch_backend import TorchRunner
from twins_deploy.errors import UsageError
from twins_deploy.models import create_model

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_run.sh"


def load_driver():
    return load_benchmark("gpu_run")


def dry_run(out: Path, **env) -> tuple[subprocess.CompletedProcess, dict, str]:
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "DRY_RUN": "1", "OUT": str(out), "PYTHON": sys.executable, **env})
    record = json.loads((out / "gpu-run.json").read_text())
    return done, record, (out / "gpu-run.md").read_text()


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    return dry_run(tmp_path_factory.mktemp("gpu-run"))


def test_the_dry_run_runs_every_step(full):
    done, record, _ = full
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert record["status"] == "finished" and record["dry_run"] and record["current"] is None
    assert record["install"].startswith("skipped (dry run)")
    assert record["settings"]["device"] == "cpu" and record["settings"]["batches"] == [1]
    assert [step["status"] for step in record["steps"]] == ["ok"] * len(record["steps"])
    names = [step["step"] for step in record["steps"]]
    for expected in ("describe the machine", "verify tiny-svt: fp16 cpu vs fp32 cpu",
                     "export tiny-svt to ONNX and verify it", "bench tiny-svt bf16 eager + compile, batch 1"):
        assert expected in names
    assert record["machine"]["libraries"]["torch"] == __import__("torch").__version__
    for found in record["packages"].values():  # every package has a version or the error its import raised
        assert found["version"] if found["loaded"] else found["error"]
    assert record["packages"]["twins_deploy"]["loaded"] and (SCRIPT.parents[1] / "twins_deploy").samefile(
        record["packages"]["twins_deploy"]["path"])  # the dry run installs nothing: the source tree runs


def test_the_dry_run_verifies_fp16_and_bf16_against_fp32(full):
    _, record, _ = full
    rows = {row["precision"]: row for row in record["verify"]}
    assert sorted(rows) == ["bf16", "fp16"]
    for precision, row in rows.items():
        assert row["comparison"] == f"{precision} cpu vs fp32 cpu" and row["samples"] == 8
        assert row["passed"] and 0.99 <= row["parity"]["cosine"] <= 1.0 + 1e-9
        assert 0 < row["parity"]["max_abs"] < 0.1 and row["parity"]["top1_agreement"] is not None


def test_the_dry_run_benches_every_precision_and_mode(full):
    _, record, _ = full
    rows = {(row["phase"], row["precision"], row["mode"]): row for row in record["bench"]}
    assert len(rows) == len(record["bench"]) == 3 * 4  # (eager + cuda-graph) and (eager + compile) per precision
    for precision in ("fp32", "fp16", "bf16"):
        graph = rows["bench", precision, "cuda-graph"]
        assert graph["status"] == "skipped" and "need a CUDA device" in graph["note"]
        for phase, mode in (("bench", "eager"), ("compile", "eager"), ("compile", "compile")):
            row = rows[phase, precision, mode]
            assert row["status"] == "ok" and row["batch"] == 1 and row["device"] == "cpu"
            assert row["throughput_img_per_s"] > 0 and row["first_call_s"] > 0 and row["iterations"] >= 2
            assert row["gpu_compute_ms_p50"] is None and row["gpu_throughput_img_per_s"] is None
        assert rows["compile", precision, "compile"]["speedup_vs_first"] > 0  # against eager, same rounds


def test_the_dry_run_exports_and_verifies_onnx(full):
    _, record, _ = full
    (row,) = record["export"]
    assert row["model"] == "tiny-svt" and row["passed"] and row["wall_s"] > 0
    assert row["max_rel"] < 1e-4 and row["num_nodes"] > 100 and row["file_bytes"] > 100_000


def test_the_markdown_has_every_section_and_figure(full):
    _, record, markdown = full
    assert markdown.startswith("# twins-deploy GPU run: CPU dry run\n")
    for heading in ("## Packages", "## Verify", "## Bench", "## ONNX export", "## Steps"):
        assert heading in markdown
    assert "- status: **finished**" in markdown and "fastest tiny-svt: **" in markdown
    assert "| tiny-svt | fp16 cpu vs fp32 cpu |" in markdown
    assert markdown.count("| tiny-svt | bf16 | compile | 1 |") == 1  # the compile phase's eager rows stay in the JSON
    assert markdown.count("skipped: not offered: CUDA graphs need a CUDA device") == 3
    assert len([line for line in markdown.splitlines() if line.startswith("| tiny-svt |")]) == 2 + 9 + 1


def test_a_spent_budget_skips_every_step_and_says_so(tmp_path):
    done, record, markdown = dry_run(tmp_path, BUDGET_S="0")
    assert done.returncode == 0, done.stderr[-2000:]
    assert record["status"] == "finished" and record["steps"]
    for step in record["steps"]:
        assert step["status"] == "skipped" and step["note"].startswith("out of time: needs ~")
    assert "| describe the machine | skipped | - | out of time: needs ~30 s, 0 s left |" in markdown


def test_a_failing_step_is_reported_and_the_run_goes_on(tmp_path):
    driver = load_driver()
    run = driver.Run(tmp_path, time.time(), 600, driver.dry_run_plan(), True, "not run")

    def cuda_error():
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be ...")

    assert run.step("bench something", cuda_error, 1) == ("failed", None)
    assert run.step("the next step", lambda: 42, 1) == ("ok", 42)
    assert run.failed
    steps = json.loads((tmp_path / "gpu-run.json").read_text())["steps"]
    assert [(s["step"], s["status"]) for s in steps] == [("bench something", "failed"), ("the next step", "ok")]
    assert steps[0]["note"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert "| bench something | failed |" in (tmp_path / "gpu-run.md").read_text()


def test_the_alarm_stops_a_step_that_outlives_the_deadline(tmp_path):
    driver = load_driver()
    run = driver.Run(tmp_path, time.time(), 600, driver.dry_run_plan(), True, "not run")
    previous = signal.signal(signal.SIGALRM, driver._out_of_time)
    try:
        signal.alarm(1)
        with pytest.raises(driver.OutOfTime):
            run.step("a compile that takes too long", lambda: time.sleep(10), 1)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    (step,) = run.record["steps"]
    assert step["status"] == "stopped" and 0.5 < step["seconds"] < 5


def test_torch_runner_cuda_graph_options_are_checked():
    with pytest.raises(UsageError, match="CUDA graphs need device cuda, not cpu"):
        TorchRunner(lambda: None, cuda_graph=True)
    with pytest.raises(UsageError, match="compile or cuda_graph, not both"):
        TorchRunner(lambda: None, device="cuda", compile=True, cuda_graph=True)


def test_torch_runner_compiled_with_the_eager_backend_matches_the_golden_logits():
    model = create_model(tiny_config("tiny-svt"), weights=tiny_weights("tiny-svt"))
    data = golden("tiny-svt")
    with TorchRunner(model, compile=True, compile_backend="eager") as runner:
        logits = runner.infer(data["input_224x224"])["logits"]
        assert runner.describe().details["compile"] == "eager"
    np.testing.assert_allclose(logits, data["logits_224x224"], atol=1e-5)
