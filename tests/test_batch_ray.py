"""infer --ray on Ray Data: same rows as infer, every input exactly once (bad files, a killed worker),
two nodes, the Python API, outputs, errors.

One real Ray for the module: a simulated cluster of two nodes with one CPU each, on 127.0.0.1 only,
with its own temporary folder (so its address file names no one else's cluster and no one else's
``ray.init`` finds it). Jobs are small and every wait is bounded.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import tiny_config, tiny_weights
from twins_deploy.batch.inputs import list_inputs
from twins_deploy.cli import app
from twins_deploy.engines.predict import write_predictions
from twins_deploy.errors import UsageError

pytest.importorskip("ray.data")
pyarrow_parquet = pytest.importorskip("pyarrow.parquet")

runner = CliRunner()
HOST = "127.0.0.1"
TEST_SECONDS = 300  # each test, the subprocess job included, ends within this (two busy cores)


def _picture(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.BICUBIC)


def _png16_rgb(pixels: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG, written by hand (Pillow cannot write one)."""
    height, width, _ = pixels.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Good pictures (enough for several batches) and every awkward kind of file."""
    folder = tmp_path_factory.mktemp("photos")
    for i in range(14):
        _picture(160 + 8 * i, 120, i).save(folder / f"good_{i:02d}.jpg", quality=90)
    rgba = _picture(180, 300, 20).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    rgba.save(folder / "rgba.png")
    _picture(256, 256, 21).convert("L").save(folder / "gray.png")
    grey16 = (np.linspace(0, 65535, 96 * 128).reshape(96, 128)).astype(np.uint16)
    Image.fromarray(grey16).save(folder / "grey16.png")
    rgb16 = np.random.default_rng(22).integers(0, 65536, (80, 100, 3)).astype(np.uint16)
    (folder / "rgb16.png").write_bytes(_png16_rgb(rgb16))
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    whole = io.BytesIO()
    _picture(300, 200, 23).save(whole, "JPEG", quality=90)
    (folder / "truncated.jpg").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    (folder / "not_an_image.png").write_text("plain text with an image's name")
    (folder / "nested").mkdir()
    _picture(200, 120, 24).save(folder / "nested" / "deep.png")
    return folder


BAD = {"corrupt.jpg", "truncated.jpg", "not_an_image.png"}


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> Path:
    from twins_deploy.exporters import export_onnx
    from twins_deploy.models import create_model

    model = create_model(tiny_config("tiny-svt"), weights=tiny_weights("tiny-svt"))
    return export_onnx(model, tmp_path_factory.mktemp("engine") / "tiny.onnx").path


@pytest.fixture(scope="module")
def cluster():
    """Two simulated nodes of one CPU each, loopback only, in a private Ray folder; not connected."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    ray_constants.ENABLE_RAY_CLUSTER = False  # as the variable sets it, should Ray have been imported before
    folder = tempfile.mkdtemp(prefix="tdray-", dir="/tmp")  # short: Ray's socket paths live under it
    saved = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = folder
    nodes = None
    try:
        node = {"num_cpus": 1, "node_ip_address": HOST, "object_store_memory": 100 * 1024 ** 2}
        nodes = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
        nodes.add_node(**node)
        yield nodes
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if nodes is not None:
            nodes.shutdown()
        if saved is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def driver(cluster):
    """This process connected to the cluster, for the Python API; disconnected after."""
    import ray

    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(autouse=True)
def bounded():
    """Every test here ends within TEST_SECONDS, even if a job waits for resources it will never get."""
    def overrun(signum, frame):
        raise TimeoutError(f"the test ran past {TEST_SECONDS} s")

    previous = signal.signal(signal.SIGALRM, overrun)
    signal.alarm(TEST_SECONDS)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _engine_workers(alive: bool = True) -> list[dict]:
    """The actors of our jobs as Ray's control store lists them (pid, node, restarts); called while connected."""
    from ray._private import state

    return [a for a in state.actors().values()
            if "EngineWorker" in a["ActorClassName"] and (a["State"] == "ALIVE" or not alive)]


def _plain(tiny_onnx: Path, inputs: list[str], out: Path, *extra: str):
    return runner.invoke(app, ["infer", "-e", str(tiny_onnx), *inputs, "--topk", "3", "--batch-size", "4",
                               "-o", str(out), *extra])


def _rows(path: Path) -> list[dict]:
    """An output as one dict per input: ``{"input", "ids", "names", "probs"}`` or ``{"input", "error"}``."""
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in path.read_text().splitlines()]
        return [{"input": r["input"], "error": r["error"]} if "error" in r else
                {"input": r["input"], "ids": [p["class_id"] for p in r["predictions"]],
                 "names": [p["name"] for p in r["predictions"]], "probs": [p["prob"] for p in r["predictions"]]}
                for r in records]
    if path.suffix == ".csv":
        rows: dict[str, dict] = {}
        for line in csv.DictReader(path.open()):
            row = rows.setdefault(line["input"], {"input": line["input"]})
            if line["error"]:
                row["error"] = line["error"]
            else:
                for key, value in (("ids", int(line["class_id"])), ("names", line["name"]),
                                   ("probs", float(line["prob"]))):
                    row.setdefault(key, []).append(value)
        return list(rows.values())
    table = pyarrow_parquet.read_table(path).to_pylist()
    return [{"input": r["input"], "error": r["error"]} if r["error"] is not None else
            {"input": r["input"], "ids": r["class_ids"], "names": r["names"], "probs": r["probs"]} for r in table]


def _assert_same_rows(plain: list[dict], ray_rows: list[dict]) -> None:
    assert [r["input"] for r in ray_rows] == [r["input"] for r in plain]  # every input once, in input order
    for a, b in zip(plain, ray_rows):
        assert ("error" in a) == ("error" in b), (a, b)
        if "error" not in a:
            assert a["ids"] == b["ids"] and a["names"] == b["names"]
            assert b["probs"] == pytest.approx(a["probs"], abs=1e-5)


# --- without Ray: listing and writing ----------------------------------------------------------------

def test_inputs_folders_globs_lists_and_uris(photos, tmp_path):
    listing = tmp_path / "inputs.txt"
    listing.write_text(f"# photos to score\n{photos / 'good_00.jpg'}\n\n{photos / 'missing.jpg'}\n")
    items = list_inputs([str(photos / "good_0*.jpg"), str(listing), f"file://{photos}/nested",
                         f"file://{photos}/good_1*.jpg", f"file://{photos}/nothing_here.jpg", str(photos / "gone")])
    assert [Path(i.path).name for i in items[:10]] == [f"good_{i:02d}.jpg" for i in range(10)]
    assert [(i.path, i.error) for i in items[10:12]] == [(str(photos / "good_00.jpg"), None),
                                                        (str(photos / "missing.jpg"), None)]  # read by the workers
    assert [(i.path, i.error) for i in items[12:]] == [
        (f"file://{photos}/nested/deep.png", None),
        *[(f"file://{photos}/good_{i:02d}.jpg", None) for i in range(10, 14)],
        (f"file://{photos}/nothing_here.jpg", "file not found"), (str(photos / "gone"), "file not found")]


def test_parquet_file_and_folder_of_parts_written_whole(tmp_path, monkeypatch):
    import twins_deploy.engines.predict as predict

    records = [{"input": f"{i}.jpg", "predictions": [{"class_id": i, "name": f"class_{i}", "prob": 0.5}]}
               for i in range(5)] + [{"input": "bad.jpg", "error": "cannot decode image bad.jpg"}]
    write_predictions(iter(records), tmp_path / "p.parquet")
    table = pyarrow_parquet.read_table(tmp_path / "p.parquet")
    assert table.column_names == ["input", "class_ids", "names", "probs", "error"]
    assert table.to_pylist()[-1] == {"input": "bad.jpg", "class_ids": None, "names": None, "probs": None,
                                     "error": "cannot decode image bad.jpg"}
    monkeypatch.setattr(predict, "PARQUET_ROWS_PER_PART", 4)
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "part-00009.parquet").write_text("an earlier job's part: replaced whole")
    write_predictions(iter(records), tmp_path / "parts")
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    assert pyarrow_parquet.read_table(tmp_path / "parts").column("input").to_pylist() == [r["input"] for r in records]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.parquet", "parts"]  # no temporary folder left
    (tmp_path / "parts" / "notes.md").write_text("someone's notes")
    with pytest.raises(UsageError, match="folder with other files"):
        write_predictions(iter(records), tmp_path / "parts")
    with pytest.raises(UsageError, match="CSV holds top-k classes"):
        write_predictions([{"input": "a.jpg", "embedding": [0.5]}], tmp_path / "e.csv", head="embedding")


def test_a_missing_input_and_an_unreachable_address_are_one_line_errors(photos, tiny_onnx, tmp_path):
    out = tmp_path / "p.jsonl"
    result = runner.invoke(app, ["infer", "-e", str(tiny_onnx), str(tmp_path / "nowhere.jpg"), "--ray", "-o", str(out)])
    assert result.exit_code == 1 and "1 of 1 inputs failed" in result.output and "file not found" in result.output
    assert [json.loads(line) for line in out.read_text().splitlines()] == [
        {"input": str(tmp_path / "nowhere.jpg"), "error": "file not found"}]  # written; no Ray was started
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    result = runner.invoke(app, ["infer", "-e", str(tiny_onnx), str(photos), "--address", f"{HOST}:{port}"])
    assert result.exit_code == 2 and f"cannot reach a Ray cluster at {HOST}:{port}" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    result = runner.invoke(app, ["infer", "-e", str(tiny_onnx), str(photos), "--workers", "2"])
    assert result.exit_code == 2 and "add --ray" in result.output


# --- on the two-node cluster ------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_ray_gives_the_rows_of_plain_infer(cluster, photos, tiny_onnx, tmp_path, suffix):
    plain, on_ray = tmp_path / f"plain{suffix}", tmp_path / f"ray{suffix}"
    expected = _plain(tiny_onnx, [str(photos)], plain)
    result = _plain(tiny_onnx, [str(photos)], on_ray, "--address", cluster.address)
    assert (expected.exit_code, result.exit_code) == (1, 1), result.output
    assert f"3 of {len(list_inputs([str(photos)]))} inputs failed" in result.output
    plain_rows, ray_rows = _rows(plain), _rows(on_ray)
    _assert_same_rows(plain_rows, ray_rows)
    failed = {Path(r["input"]).name: r["error"] for r in ray_rows if "error" in r}
    assert set(failed) == BAD  # 16-bit grey and 16-bit RGB PNGs are answered
    assert "cannot decode image" in failed["corrupt.jpg"] and "truncated" in failed["truncated.jpg"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([plain.name, on_ray.name])  # no temp files


def test_an_openvino_ir_is_shipped_whole_and_gives_the_rows_of_plain_infer(cluster, photos, tiny_onnx, tmp_path):
    from twins_deploy.engines.openvino_backend import build_ir

    ir = tmp_path / "engine" / "tiny.xml"
    build_ir(tiny_onnx, ir, "fp32")  # an .xml and its .bin: both travel to the workers
    inputs = [str(photos / "good_0*.jpg"), str(photos / "grey16.png")]
    plain, on_ray = tmp_path / "plain.jsonl", tmp_path / "ray.jsonl"
    assert runner.invoke(app, ["infer", "-e", str(ir), *inputs, "--topk", "3", "-o", str(plain)]).exit_code == 0
    result = runner.invoke(app, ["infer", "-e", str(ir), *inputs, "--topk", "3", "-o", str(on_ray),
                                 "--address", cluster.address])
    assert result.exit_code == 0, result.output
    _assert_same_rows(_rows(plain), _rows(on_ray))


def test_python_api_on_bytes_and_decoded_images(driver, photos, tiny_onnx, tmp_path):
    from twins_deploy.batch import infer_dataset

    good = sorted(str(p) for p in photos.glob("good_*.jpg"))
    expected = {Path(r["input"]).name: r for r in _rows_of_plain(tiny_onnx, good, tmp_path)}
    encoded = driver.data.read_binary_files(good, include_paths=True)  # "bytes" and "path"
    decoded = driver.data.read_images(good, include_paths=True, mode="RGB")  # "image" arrays and "path"
    for dataset in (encoded, decoded):
        rows = infer_dataset(tiny_onnx, dataset, topk=3, batch_size=4).take_all()  # leaves a CPU to the reads
        assert sorted(Path(r["path"]).name for r in rows) == sorted(expected)
        for row in rows:
            want = expected[Path(row["path"]).name]
            assert row["error"] is None and "bytes" not in row and "image" not in row
            assert row["class_ids"] == want["ids"] and row["names"] == want["names"]
            assert row["probs"] == pytest.approx(want["probs"], abs=1e-5)
    # Ray Data's usage poller thread, started by the jobs, logs its failed polls with no traceback to format:
    # on Python 3.11 that formatting raced torch.export's ast.parse on the main thread (a flaky export failure)
    assert not logging.getLogger("ray.data._internal.usage.util").isEnabledFor(logging.DEBUG)


def _rows_of_plain(tiny_onnx: Path, inputs: list[str], tmp_path: Path) -> list[dict]:
    out = tmp_path / "plain.jsonl"
    assert _plain(tiny_onnx, inputs, out).exit_code == 0
    return _rows(out)


def test_two_nodes_each_run_an_engine_actor(driver, photos, tiny_onnx):
    """The job's own actors (those new since it started, alive or finished) ran on both nodes."""
    from twins_deploy.batch import run_job

    before = {a["ActorID"] for a in _engine_workers(alive=False)}
    report = run_job(tiny_onnx, [str(photos / "good_*.jpg")], workers=2, batch_size=2)
    assert report.failed == 0 and len(report.records) == 14
    ours = [a for a in _engine_workers(alive=False) if a["ActorID"] not in before]
    assert len({a["Address"]["NodeID"] for a in ours}) == 2, ours


@pytest.fixture(scope="module")
def big_photos(tmp_path_factory) -> Path:
    """Pictures large enough that decoding them keeps both workers busy for seconds."""
    folder = tmp_path_factory.mktemp("big")
    for i in range(BIG):
        _picture(1600, 1200, i).save(folder / f"{i:03d}.jpg", quality=85)
    return folder


BIG = 80


def test_a_worker_killed_mid_job_is_replaced_and_every_input_is_answered_once(cluster, big_photos, tmp_path,
                                                                                tiny_onnx):
    from twins_deploy.batch import run_job

    folder = big_photos
    killed: dict = {}

    def kill_one_worker(done: int, total: int) -> None:
        if not killed:
            victim = _engine_workers()[0]
            killed.update(pid=victim["Pid"], actor=victim["ActorID"], done=done)
            os.kill(victim["Pid"], signal.SIGKILL)  # a process of the job this test started
        elif done == total:
            (actor,) = [a for a in _engine_workers(alive=False) if a["ActorID"] == killed["actor"]]
            killed["restarts"] = actor["NumRestarts"]

    out = tmp_path / "preds.parquet"
    report = run_job(tiny_onnx, [str(folder)], address=cluster.address, workers=2, batch_size=4, output=out,
                     progress=kill_one_worker)
    assert killed["done"] < BIG / 2, "the worker was killed too late to test anything"
    assert killed["restarts"] >= 1  # Ray restarted the actor and reran the batches it held
    rows = pyarrow_parquet.read_table(out).to_pylist()
    assert sorted(r["input"] for r in rows) == sorted(str(p) for p in folder.iterdir())  # each exactly once
    assert report.failed == 0 and report.lost == 0 and all(r["error"] is None for r in rows)


def test_a_batch_out_of_retries_is_answered_with_an_error_not_dropped(cluster, big_photos, tiny_onnx):
    """With no retries, the batches a killed worker held fail; the job goes on and answers them."""
    from twins_deploy.batch import run_job

    def kill_one_worker(done: int, total: int) -> None:
        if done and not killed:
            killed.append(_engine_workers()[0]["Pid"])
            os.kill(killed[0], signal.SIGKILL)  # a process of the job this test started

    killed: list[int] = []
    report = run_job(tiny_onnx, [str(big_photos)], address=cluster.address, workers=2, batch_size=4, retries=0,
                     progress=kill_one_worker)
    assert sorted(r["input"] for r in report.records) == sorted(str(p) for p in big_photos.iterdir())
    lost = [r for r in report.records if "error" in r]
    assert report.lost == len(lost) == report.failed >= 1  # the batches in flight on the killed worker
    assert all(r["error"].startswith("not answered: the worker running its batch died on every attempt (1)") for r in lost)


def test_the_command_starts_and_stops_its_own_local_ray(photos, tiny_onnx, tmp_path):
    """In a process of its own, as a user runs it: a private Ray on 127.0.0.1 that ends with the command."""
    out = tmp_path / "preds.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR")}
    command = [sys.executable, "-c", "from twins_deploy.cli import app; app()", "infer", "-e", str(tiny_onnx),
               str(photos / "good_0*.jpg"), "--ray", "--workers", "1", "-o", str(out)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=TEST_SECONDS - 30, env=env)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert f"wrote 10 predictions to {out}" in finished.stderr
    assert len(out.read_text().splitlines()) == 10
