"""The torch-free runtime predicts what onnxruntime and the PyTorch model compute, from any thread."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata as dist
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

import twins_deploy
from conftest import golden, tiny_config, tiny_weights
from twins_deploy.errors import TwinsDeployError, UsageError
from twins_deploy.exporters import export_onnx
from twins_deploy.models import create_model
from twins_deploy.preprocess import load_image, preprocess
from twins_deploy.runtime import Prediction, Predictor, default_providers
from twins_deploy.runtime.session import PROVIDER_PREFERENCE

REPO = Path(twins_deploy.__file__).resolve().parents[1]  # the checkout the venv imports from
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runtime")


@pytest.fixture(scope="module")
def torch_model():
    return create_model(tiny_config("tiny-svt"), weights=tiny_weights("tiny-svt"))


@pytest.fixture(scope="module")
def onnx_path(folder, torch_model) -> Path:
    return export_onnx(torch_model, folder / "tiny-svt.onnx", verify=False).path  # the tests check parity


@pytest.fixture(scope="module")
def predictor(onnx_path) -> Predictor:
    return Predictor(onnx_path)


@pytest.fixture(scope="module")
def images(folder) -> list[Path]:
    """Photos in the shapes services get: landscape JPEG, portrait PNG with alpha, grayscale, tiny."""
    rng = np.random.default_rng(0)
    files = []
    for name, size, mode in (("wide.jpg", (320, 240), "RGB"), ("tall.png", (180, 300), "RGBA"),
                             ("gray.png", (256, 256), "L"), ("small.bmp", (40, 30), "RGB")):
        channels = len(mode)
        pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
        pixels = (pixels * 0.5 + np.linspace(0, 127, size[0])[None, :, None]).astype(np.uint8)  # noise on a gradient
        Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(folder / name)
        files.append(folder / name)
    return files


def onnxruntime_logits(path: Path, batch: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: batch})[0]


def test_predictions_equal_onnxruntime_and_pytorch(predictor, onnx_path, torch_model, images):
    predictions = predictor.predict(images)
    assert isinstance(predictions, list) and all(isinstance(p, Prediction) for p in predictions)
    logits = np.stack([p.logits for p in predictions])
    batch = np.stack([preprocess(load_image(path), predictor.metadata) for path in images])
    np.testing.assert_allclose(logits, onnxruntime_logits(onnx_path, batch), atol=1e-6, rtol=0)
    with torch.no_grad():
        reference = torch_model(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(logits, reference, atol=TOLERANCE, rtol=0)
    for prediction, row in zip(predictions, reference):
        assert prediction.class_ids == tuple(np.argsort(-row, kind="stable")[:5])
        assert prediction.names == tuple(predictor.class_names[i] for i in prediction.class_ids)
        probs = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
        np.testing.assert_allclose(prediction.probs, probs[list(prediction.class_ids)], atol=TOLERANCE)
        assert list(prediction.probs) == sorted(prediction.probs, reverse=True)


def test_golden_vector_from_the_reference_implementation(predictor):
    vectors = golden("tiny-svt")
    np.testing.assert_allclose(predictor.run(vectors["input_224x224"]), vectors["logits_224x224"],
                               atol=TOLERANCE, rtol=0)


def test_every_input_kind_gives_the_same_prediction(predictor, images):
    path = images[0]
    expected = predictor.predict(path)
    rgb = load_image(path)
    same = [str(path), path.read_bytes(), bytearray(path.read_bytes()), rgb, np.asarray(rgb),
            predictor.preprocess(path)[0], predictor.preprocess(path)[0].astype(np.float64)]
    for image in same:
        result = predictor.predict(image)
        assert result.class_ids == expected.class_ids, type(image)
        np.testing.assert_allclose(result.logits, expected.logits, atol=1e-6, rtol=0)
    batch = predictor.predict(np.stack([np.asarray(rgb), np.asarray(rgb)]), top_k=2)
    assert len(batch) == 2 and batch[0].class_ids == expected.class_ids[:2]
    assert predictor.predict(predictor.preprocess([path, path]))[1].class_ids == expected.class_ids
    assert json.loads(json.dumps(expected.as_dict()))["names"] == list(expected.names)


def test_concurrent_requests_from_8_threads_equal_serial(predictor, images):
    requests = [images[i % len(images)] for i in range(16)] + [images[:3]] * 8  # singles and batches of 3
    serial = [predictor.predict(request) for request in requests]
    start = threading.Barrier(8)

    def worker(index: int) -> list:
        start.wait()  # all 8 threads call the one Predictor at once
        return [predictor.predict(request) for request in requests[index::8] * 2]

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(worker, range(8)))
    for index, got in enumerate(results):
        want = serial[index::8] * 2
        assert len(got) == len(want)
        for a, b in zip(got, want):
            a, b = (a, b) if isinstance(a, list) else ([a], [b])
            assert [p.class_ids for p in a] == [p.class_ids for p in b]
            for pa, pb in zip(a, b):
                np.testing.assert_array_equal(pa.logits, pb.logits)


def test_fixed_batch_export_runs_any_number_of_images(folder, torch_model, predictor, images):
    fixed = Predictor(export_onnx(torch_model, folder / "tiny-svt-b2.onnx", batch=2, verify=False).path)
    batch = predictor.preprocess(images[:3])  # 3 images through a batch-2 graph: one full chunk, one padded
    np.testing.assert_allclose(fixed.run(batch), predictor.run(batch), atol=1e-5, rtol=0)


def test_embedding_export_returns_embeddings(folder, images):
    model = create_model(tiny_config("tiny-svt"), weights=tiny_weights("tiny-svt"), output="embedding")
    embedder = Predictor(export_onnx(model, folder / "tiny-svt-embedding.onnx", head="embedding", verify=False).path)
    batch = embedder.preprocess(images)
    with torch.no_grad():
        reference = model(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(embedder.embed(images), reference, atol=TOLERANCE, rtol=0)
    assert embedder.embed(images[0]).shape == reference[0].shape
    with pytest.raises(TwinsDeployError, match="outputs embeddings, not classes: use embed"):
        embedder.predict(images[0])


def test_providers_default_fastest_first_and_can_be_overridden(onnx_path, predictor):
    available = ort.get_available_providers()
    defaults = default_providers()
    assert defaults[-1] == "CPUExecutionProvider" and set(defaults) <= set(PROVIDER_PREFERENCE) & set(available)
    assert predictor.providers[-1] == "CPUExecutionProvider"
    assert Predictor(onnx_path, providers=["cpu"], threads=1).providers == ["CPUExecutionProvider"]
    assert Predictor(onnx_path, providers=[("CPUExecutionProvider", {})]).providers == ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in available:
        with pytest.raises(UsageError, match="CUDAExecutionProvider is not installed here"):
            Predictor(onnx_path, providers=["cuda"])


@pytest.mark.parametrize("bad, error, message", [
    (b"this is not an image", TwinsDeployError, "cannot decode image bytes"),
    ("missing.jpg", TwinsDeployError, "image not found: missing.jpg"),
    (np.zeros((224, 224, 3), np.float32), UsageError,
     r"shape \(3, 224, 224\) or uint8 RGB .* got float32 \(224, 224, 3\)"),
    (np.zeros((3, 100, 100), np.float32), UsageError, r"shape \(3, 224, 224\)"),
    (np.zeros((2, 3, 100, 100), np.float32), UsageError, r"shape \(N, 3, 224, 224\)"),
    (np.zeros((64, 64), np.uint8), UsageError, r"uint8 image array must be RGB of shape \(H, W, 3\), got \(64, 64\)"),
    (np.zeros((3, 224, 224), np.int32), UsageError, "got int32"),
    ([], UsageError, "the list is empty"),
    (42, UsageError, "cannot predict on int"),
])
def test_bad_inputs_give_clear_errors(predictor, bad, error, message):
    with pytest.raises(error, match=message):
        predictor.predict(bad)


def test_a_text_file_is_not_an_image(predictor, folder):
    (folder / "notes.jpg").write_text("hello")
    with pytest.raises(TwinsDeployError, match="cannot decode image .*notes.jpg"):
        predictor.predict(folder / "notes.jpg")


def test_bad_model_files_give_clear_errors(folder, onnx_path):
    (folder / "not-a-model.onnx").write_text("definitely not protobuf")
    with pytest.raises(TwinsDeployError, match="onnxruntime cannot load .*not-a-model.onnx.*is it an ONNX file"):
        Predictor(folder / "not-a-model.onnx")
    with pytest.raises(UsageError, match="ONNX file not found"):
        Predictor(folder / "missing.onnx")
    proto = onnx.load(str(onnx_path))
    del proto.metadata_props[:]
    bare = folder / "no-metadata.onnx"
    onnx.save(proto, str(bare))
    with pytest.raises(TwinsDeployError, match="no-metadata.onnx has no twins-deploy metadata: export it"):
        Predictor(bare)
    with pytest.raises(TwinsDeployError, match="the model bytes has no twins-deploy metadata"):
        Predictor(bare.read_bytes())
    with pytest.raises(UsageError, match="top_k must be at least 1"):
        Predictor(onnx_path, top_k=0)


def test_predictor_from_bytes_and_its_description(onnx_path, predictor, images):
    from_bytes = Predictor(onnx_path.read_bytes())
    assert from_bytes.predict(images[0]).class_ids == predictor.predict(images[0]).class_ids
    assert predictor.input_shape == (3, 224, 224)
    assert len(predictor.class_names) == 10
    assert "CPUExecutionProvider" in repr(predictor)
    with pytest.raises(TwinsDeployError, match="outputs logits; export it with head 'embedding'"):
        predictor.embed(images[0])


# --- the runtime in a fresh virtual environment with only numpy, pillow and onnxruntime -----------------

RUNTIME_DEPENDENCIES = ("numpy", "pillow", "onnxruntime")


@pytest.fixture(scope="session")
def runtime_venv(request, tmp_path_factory) -> Path:
    """A venv without system site packages, kept in pytest's cache between runs (30 s to build)."""
    pins = [f"{name}=={dist.version(name)}" for name in RUNTIME_DEPENDENCIES]
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    venv = cache.mkdir("twins-runtime-venv") if cache else tmp_path_factory.mktemp("twins-runtime-venv")
    python, ready = venv / "bin" / "python", venv / "ready.json"
    if python.exists() and ready.exists() and json.loads(ready.read_text()) == pins:
        return python
    shutil.rmtree(venv)
    created = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
    if created.returncode:
        pytest.skip(f"cannot create a virtual environment: {created.stderr.strip().splitlines()[-1:]}")
    installed = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *pins],
                               capture_output=True, text=True, timeout=600)
    if installed.returncode:
        pytest.skip(f"pip cannot install {', '.join(pins)} from the package index: "
                    f"{(installed.stderr.strip().splitlines() or ['no output'])[-1]}")
    ready.write_text(json.dumps(pins))
    return python


def test_runtime_imports_and_predicts_without_torch(runtime_venv, onnx_path, predictor, images, tmp_path):
    script = f"""
import importlib.util, json, sys
sys.path.insert(0, {str(REPO)!r})
import twins_deploy.runtime as runtime
prediction = runtime.Predictor({str(onnx_path)!r}).predict({str(images[0])!r})
print(json.dumps({{
    "loaded": sorted({{m.split(".")[0] for m in sys.modules}} & {{"torch", "onnx", "onnxscript", "typer", "rich"}}),
    "installed": [m for m in ("torch", "onnx", "typer") if importlib.util.find_spec(m)],
    "class_ids": prediction.class_ids, "logits": prediction.logits.tolist()}}))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    result = subprocess.run([str(runtime_venv), "-I", "-c", script], capture_output=True, text=True, cwd=tmp_path,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["installed"] == [], "the venv must not see torch, onnx or typer"
    assert report["loaded"] == []
    expected = predictor.predict(images[0])
    assert tuple(report["class_ids"]) == expected.class_ids
    np.testing.assert_allclose(report["logits"], expected.logits, atol=1e-6, rtol=0)


def test_streams_split_the_threads_and_run_calls_at_once_with_equal_answers(onnx_path, predictor, images):
    """``streams=2``: each onnxruntime call gets half the threads, and two calls at once answer exactly
    what one session with every thread answers (what a served replica's streams rely on)."""
    streamed = Predictor(onnx_path, threads=2, streams=2)
    assert streamed.session.get_session_options().intra_op_num_threads == 1
    batch = predictor.preprocess(images[:3])
    want = predictor.run(batch)
    with ThreadPoolExecutor(2) as pool:
        for got in pool.map(lambda _: streamed.run(batch), range(4)):
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    with pytest.raises(UsageError, match="streams must be at least 1"):
        Predictor(onnx_path, streams=0)
