"""infer: every input gets a line (predictions or error), timm preprocessing of awkward images, outputs."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import tiny_config, tiny_weights
from twins_deploy.cli import app
from twins_deploy.engines.onnxruntime_backend import OnnxRuntimeRunner
from twins_deploy.engines.predict import check_output, collect_inputs, predict, write_predictions
from twins_deploy.engines.torch_backend import TorchRunner
from twins_deploy.errors import UsageError
from twins_deploy.metadata import imagenet_class_names
from twins_deploy.models import create_model

runner = CliRunner()
EXIF_ORIENTATION = 0x0112


def _picture(width: int, height: int, seed: int) -> Image.Image:
    """An asymmetric picture: rotating it changes what the model sees."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    image.paste((255, 0, 0), (0, 0, width // 3, height // 4))
    return image


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    _picture(320, 240, 0).save(folder / "a_rgb.jpg", quality=95)
    rgba = _picture(180, 300, 1).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    rgba.save(folder / "b_rgba.png")
    _picture(256, 256, 2).convert("L").save(folder / "c_gray.png")
    (folder / "d_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    upright = _picture(200, 120, 3)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # stored turned; viewers rotate it 90 degrees clockwise
    upright.transpose(Image.Transpose.ROTATE_90).save(folder / "e_exif_rotated.png", exif=exif)
    (folder / "nested").mkdir()
    upright.save(folder / "nested" / "f_upright.png")
    (folder / "notes.txt").write_text("not an image: skipped when walking the folder")
    return folder


@pytest.fixture(scope="module")
def tiny_runner():
    model = create_model(tiny_config("tiny-svt"), weights=tiny_weights("tiny-svt"))
    with TorchRunner(model) as r:
        yield r


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> Path:
    from twins_deploy.exporters import export_onnx

    model = create_model(tiny_config("tiny-svt"), weights=tiny_weights("tiny-svt"))
    return export_onnx(model, tmp_path_factory.mktemp("infer") / "tiny.onnx").path


def test_collect_walks_folders_expands_globs_and_keeps_misses(photos):
    items = collect_inputs([str(photos), str(photos / "*.png"), str(photos / "missing.jpg"), str(photos / "*.webp"),
                            str(photos / "notes.txt")])
    names = [Path(i.path).name for i in items]
    assert names[:6] == ["a_rgb.jpg", "b_rgba.png", "c_gray.png", "d_corrupt.jpg", "e_exif_rotated.png",
                         "f_upright.png"]  # recursive, sorted, text file skipped
    assert names[6:9] == ["b_rgba.png", "c_gray.png", "e_exif_rotated.png"]
    assert [(Path(i.path).name, i.error) for i in items[9:]] == [
        ("missing.jpg", "file not found"), ("*.webp", "no file matches this pattern"), ("notes.txt", None)]


def test_every_input_is_in_the_output_in_order(photos, tiny_runner):
    items = collect_inputs([str(photos), str(photos / "missing.jpg")])
    records = list(predict(tiny_runner, items, topk=3, batch_size=4))  # 7 inputs: batches of 4 and 3
    assert [r["input"] for r in records] == [i.path for i in items]
    errors = {Path(r["input"]).name: r["error"] for r in records if "error" in r}
    assert set(errors) == {"d_corrupt.jpg", "missing.jpg"}
    assert "cannot decode image" in errors["d_corrupt.jpg"] and errors["missing.jpg"] == "file not found"
    for record in records:
        if "predictions" in record:
            probs = [p["prob"] for p in record["predictions"]]
            assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1
            assert all(p["name"] == f"class_{p['class_id']}" for p in record["predictions"])  # 10 unnamed classes


def test_exif_rotation_is_applied(photos, tiny_runner):
    rotated, upright, raw = (collect_inputs([str(p)])[0] for p in (
        photos / "e_exif_rotated.png", photos / "nested" / "f_upright.png", photos / "a_rgb.jpg"))
    by_path = {r["input"]: r["predictions"] for r in predict(tiny_runner, [rotated, upright, raw], topk=10)}
    probs = {path: [p["prob"] for p in sorted(preds, key=lambda p: p["class_id"])] for path, preds in by_path.items()}
    assert probs[rotated.path] == pytest.approx(probs[upright.path], abs=1e-6)
    assert probs[rotated.path] != pytest.approx(probs[raw.path], abs=1e-6)


def test_class_names_come_from_the_model(photos):
    model = create_model(tiny_config("tiny-svt"), weights="random", num_classes=1000)
    with TorchRunner(model) as r:
        (record,) = predict(r, collect_inputs([str(photos / "a_rgb.jpg")]), topk=2)
    names = imagenet_class_names()
    assert [p["name"] for p in record["predictions"]] == [names[p["class_id"]] for p in record["predictions"]]


def test_onnx_and_torch_predict_the_same(photos, tiny_runner, tiny_onnx):
    items = collect_inputs([str(photos)])
    with OnnxRuntimeRunner(tiny_onnx) as onnx_runner:
        from_onnx = list(predict(onnx_runner, items, topk=10, batch_size=3))
    from_torch = list(predict(tiny_runner, items, topk=10, batch_size=5))
    for a, b in zip(from_onnx, from_torch):
        assert a.keys() == b.keys()
        if "predictions" in a:
            assert [p["class_id"] for p in a["predictions"]][:1] == [p["class_id"] for p in b["predictions"]][:1]
            assert [p["prob"] for p in a["predictions"]] == pytest.approx([p["prob"] for p in b["predictions"]],
                                                                          abs=1e-4)


def test_outputs_are_jsonl_or_csv_written_whole(tmp_path):
    records = [{"input": "a.jpg", "predictions": [{"class_id": 3, "name": "cat", "prob": 0.75},
                                                  {"class_id": 1, "name": "dog", "prob": 0.25}]},
               {"input": "b.jpg", "error": "cannot decode image b.jpg"}]
    write_predictions(records, tmp_path / "p.jsonl")
    assert [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()] == records
    write_predictions(records, tmp_path / "p.csv")
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert [(r["input"], r["rank"], r["name"], r["error"]) for r in rows] == [
        ("a.jpg", "1", "cat", ""), ("a.jpg", "2", "dog", ""), ("b.jpg", "", "", "cannot decode image b.jpg")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.csv", "p.jsonl"]  # no temporary files left
    with pytest.raises(UsageError, match=r".jsonl, .csv or .parquet"):
        check_output(tmp_path / "p.txt")


def test_infer_command_writes_every_input_and_fails_on_errors(photos, tiny_onnx, tmp_path):
    out = tmp_path / "preds.jsonl"
    result = runner.invoke(app, ["infer", "--engine", str(tiny_onnx), str(photos), "--topk", "2", "--batch-size", "2",
                                 "--output", str(out)])
    assert result.exit_code == 1
    assert "1 of 6 inputs failed" in result.output and "d_corrupt.jpg" in result.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 6 and sum("error" in line for line in lines) == 1
    assert all(len(line["predictions"]) == 2 for line in lines if "predictions" in line)


def test_infer_command_table_and_clean_exit(photos, tiny_onnx):
    result = runner.invoke(app, ["infer", "-e", str(tiny_onnx), str(photos / "a_rgb.jpg"), str(photos / "c_gray.png")],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "a_rgb.jpg" in result.stdout and "c_gray.png" in result.stdout and "error" not in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--output", "preds.txt"], ".jsonl, .csv or .parquet"),
    (["--topk", "0"], "at least 1"),
])
def test_infer_command_usage_errors(photos, tiny_onnx, args, message):
    result = runner.invoke(app, ["infer", "-e", str(tiny_onnx), str(photos), *args])
    assert result.exit_code == 2 and message in result.output


def test_infer_command_with_a_missing_engine_file(photos):
    result = runner.invoke(app, ["infer", "-e", "nowhere.onnx", str(photos)])
    assert result.exit_code == 2 and "engine file not found: nowhere.onnx" in result.output
