"""Every file twins-deploy writes gets the mode an ordinary write would give, atomically, and an
interrupted write (an exception, SIGTERM) leaves the earlier file and no temp file behind."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import DATA, tiny_config, tiny_weights
from twins_deploy.cli import app
from twins_deploy.files import atomic_output

runner = CliRunner()


@contextlib.contextmanager
def umask(mask: int):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".tmp" in p.name)


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> Path:
    from twins_deploy.exporters import export_onnx

    path = tmp_path_factory.mktemp("export") / "tiny.onnx"
    export_onnx(tiny_config("tiny-svt"), path, weights=tiny_weights("tiny-svt"), verify=False)
    return path


def write_every_output(folder: Path, tiny_onnx: Path) -> list[Path]:
    """Each writer of the package, once, into ``folder``: what a user's commands leave on disk."""
    from twins_deploy.engines.predict import write_predictions
    from twins_deploy.engines.quantize import convert_fp16, quantize_int8, synthetic_images
    from twins_deploy.engines.artifacts import onnx_metadata
    from twins_deploy.engines.openvino_backend import build_ir
    from twins_deploy.engines.resolve import Builds, ModelSource
    from twins_deploy.exporters import export_onnx
    from twins_deploy.triton import build_repository

    export_onnx(tiny_config("tiny-pcpvt"), folder / "export.onnx", weights="random", verify=False)
    images = synthetic_images(onnx_metadata(tiny_onnx), 2)
    quantize_int8(tiny_onnx, folder / "int8.onnx", images, target="cpu", calibration_source="synthetic")
    convert_fp16(tiny_onnx, folder / "fp16.onnx")
    build_ir(tiny_onnx, folder / "ir.xml", "fp32")
    records = [{"input": "a.jpg", "predictions": [{"class_id": 1, "name": "class_1", "prob": 0.9}]}]
    write_predictions(records, folder / "predictions.jsonl")
    write_predictions(records, folder / "predictions.csv")
    build_repository(tiny_onnx, folder / "repository", name="tiny", device="cpu")
    cached = Builds(ModelSource(tiny_config("tiny-svt"), "random"), folder / "cache", lambda message: None).fp32_onnx()
    result = runner.invoke(app, ["bench", "-e", str(tiny_onnx), "--batch", "1", "--iters", "2", "--rounds", "1",
                                 "--warmup", "0", "--json", str(folder / "bench.json"), "--csv", str(folder / "bench.csv")])
    assert result.exit_code == 0, result.output
    repository = folder / "repository" / "tiny"
    outputs = ("export.onnx", "int8.onnx", "fp16.onnx", "ir.xml", "ir.bin", "predictions.jsonl", "predictions.csv",
               "bench.json", "bench.csv")
    return [folder / name for name in outputs] + [cached] + \
        [repository / "config.pbtxt", repository / "labels.txt", repository / "1" / "model.onnx"]


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600)])
def test_every_writer_honours_the_umask(tmp_path, tiny_onnx, mask, expected):
    with umask(mask):
        written = write_every_output(tmp_path, tiny_onnx)
    assert {str(p.relative_to(tmp_path)): oct(mode(p)) for p in written} == \
        {str(p.relative_to(tmp_path)): oct(expected) for p in written}
    assert leftovers(tmp_path) == []


def test_an_overwritten_file_keeps_the_mode_its_owner_set(tmp_path, tiny_onnx):
    from twins_deploy.engines.quantize import convert_fp16

    path = tmp_path / "served.onnx"
    path.write_text("old")
    path.chmod(0o640)
    with umask(0o022):
        convert_fp16(tiny_onnx, path)
    assert mode(path) == 0o640 and path.stat().st_size > 1000


def test_an_exception_mid_write_keeps_the_earlier_file_and_no_temp_file(tmp_path):
    path = tmp_path / "report.json"
    path.write_text('{"good": true}')
    with pytest.raises(RuntimeError):
        with atomic_output(path) as tmp:
            tmp.write_text('{"half')
            raise RuntimeError("interrupted")
    assert json.loads(path.read_text()) == {"good": True} and leftovers(tmp_path) == []


def test_sigterm_in_the_middle_of_an_export_leaves_the_earlier_file_intact(tmp_path):
    config = json.loads((DATA / "index.json").read_text())["tiny-svt"]["config"]
    (tmp_path / "tiny.json").write_text(json.dumps(config))
    earlier = tmp_path / "model.onnx"
    earlier.write_bytes(b"an earlier good export")
    command = [sys.executable, "-m", "twins_deploy.cli", "export", "--model", "svt-s", "--config", "tiny.json",
               "--weights", "random", "-o", "model.onnx"]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not leftovers(tmp_path) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert leftovers(tmp_path), "the export never reserved its temporary file"
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == -signal.SIGTERM, stderr.decode()  # ended as SIGTERM ends a process
    assert earlier.read_bytes() == b"an earlier good export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "tiny.json"]


def _terminated_when_ready(script: str, folder: Path) -> subprocess.CompletedProcess:
    """Run ``script`` in a new Python, SIGTERM it once it prints "ready", and wait (bounded) for its end."""
    process = subprocess.Popen([sys.executable, "-c", script], cwd=folder, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "ready", process.stderr.read()
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    return subprocess.CompletedProcess(process.args, process.returncode, "", stderr)


def test_sigterm_inside_a_weakref_callback_still_ends_the_write_and_keeps_the_earlier_file(tmp_path):
    """Python swallows an exception raised in a weakref callback: SIGTERM raising SystemExit there let an
    export run on and replace the file. The handler undoes the write itself and ends the process."""
    (tmp_path / "out.txt").write_text("earlier")
    script = """
import time, weakref
from twins_deploy.files import atomic_output

class Node:
    pass

def collected(ref):
    time.sleep(0.05)  # where the signal lands: nearly all the time is spent here

with atomic_output("out.txt") as tmp:
    tmp.write_text("half")
    print("ready", flush=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        node = Node()
        watch = weakref.ref(node, collected)
        del node
    tmp.write_text("whole")
"""
    ended = _terminated_when_ready(script, tmp_path)
    assert ended.returncode == -signal.SIGTERM, ended.stderr
    assert (tmp_path / "out.txt").read_text() == "earlier" and leftovers(tmp_path) == []


def test_sigterm_between_the_folder_swaps_renames_puts_the_earlier_folder_back(tmp_path):
    """``atomic_folder`` moves the earlier folder aside, then renames the new one in: SIGTERM between the two
    (the rename made to wait here) leaves the earlier folder in place, whole, and nothing else."""
    earlier = tmp_path / "parts"
    earlier.mkdir()
    (earlier / "part-0.parquet").write_text("earlier")
    script = """
import os, time
from twins_deploy.files import atomic_folder

rename = os.replace

def slow_second_rename(source, target):
    rename(source, target)
    if str(source).endswith("parts"):  # the earlier folder has just been moved aside
        print("ready", flush=True)
        time.sleep(20)

os.replace = slow_second_rename
with atomic_folder("parts") as folder:
    (folder / "sub").mkdir()
    (folder / "sub" / "part-0.parquet").write_text("new")
"""
    ended = _terminated_when_ready(script, tmp_path)
    assert ended.returncode == -signal.SIGTERM, ended.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["parts"]
    assert [p.name for p in earlier.iterdir()] == ["part-0.parquet"]
    assert (earlier / "part-0.parquet").read_text() == "earlier"


def test_an_error_after_the_earlier_folder_moved_aside_puts_it_back(tmp_path, monkeypatch):
    from twins_deploy import files

    earlier = tmp_path / "parts"
    earlier.mkdir()
    (earlier / "part-0.parquet").write_text("earlier")
    rename = os.replace
    failed = []

    def failing_second_rename(source, target):
        if Path(target) == earlier and not failed:  # the new folder's rename, not the undo's
            failed.append(source)
            raise OSError(28, "No space left on device")
        rename(source, target)

    monkeypatch.setattr(files.os, "replace", failing_second_rename)
    with pytest.raises(OSError, match="No space left"):
        with files.atomic_folder(earlier) as folder:
            (folder / "part-0.parquet").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["parts"]
    assert (earlier / "part-0.parquet").read_text() == "earlier"
