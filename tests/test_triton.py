"""Triton model repositories: config.pbtxt parses with Triton's own schema and matches the model."""
from __future__ import annotations

import filecmp
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from typer.testing import CliRunner

from conftest import tiny_config, tiny_weights
from twins_deploy.cli import app
from twins_deploy.errors import TwinsDeployError, UsageError
from twins_deploy.exporters import export_onnx
from twins_deploy.models import create_model
from twins_deploy.runtime import session_metadata
from twins_deploy.triton import build_repository, check_plan_io, describe_model, preferred_batch_sizes

runner = CliRunner()


def has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("triton")


@pytest.fixture(scope="module")
def torch_model():
    return create_model(tiny_config("tiny-svt"), weights=tiny_weights("tiny-svt"))


@pytest.fixture(scope="module")
def onnx_path(folder, torch_model):
    return export_onnx(torch_model, folder / "tiny-svt.onnx", verify=False).path  # parity: test_runtime


def parse_config(model_dir) -> model_config_pb2.ModelConfig:
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def test_onnx_repository_matches_the_model(onnx_path, tmp_path):
    report = build_repository(onnx_path, tmp_path / "repo", name="twins", max_batch=16, instances=2, device="cpu")
    model_dir = tmp_path / "repo" / "twins"
    assert report.model_dir == model_dir and report.schema == "tritonclient model_config_pb2"
    assert report.files == ("twins/1/model.onnx", "twins/config.pbtxt", "twins/labels.txt")
    assert filecmp.cmp(model_dir / "1" / "model.onnx", onnx_path, shallow=False)

    config = parse_config(model_dir)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (model_input,), (model_output,) = session.get_inputs(), session.get_outputs()
    assert config.name == model_dir.name and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 16
    assert isinstance(model_input.shape[0], str) and isinstance(model_output.shape[0], str), "batch axis is dynamic"
    assert [(t.name, list(t.dims)) for t in config.input] == [(model_input.name, model_input.shape[1:])]
    assert [(t.name, list(t.dims)) for t in config.output] == [(model_output.name, model_output.shape[1:])]
    assert config.input[0].data_type == config.output[0].data_type == model_config_pb2.TYPE_FP32
    assert config.input[0].format == model_config_pb2.ModelInput.FORMAT_NCHW
    assert config.output[0].label_filename == "labels.txt"
    labels = (model_dir / "labels.txt").read_text().splitlines()
    assert labels == list(session_metadata(session).class_names) and len(labels) == model_output.shape[1] == 10
    assert [(g.count, g.kind) for g in config.instance_group] == [(2, model_config_pb2.ModelInstanceGroup.KIND_CPU)]
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8, 16]
    assert config.dynamic_batching.max_queue_delay_microseconds == 100
    assert not list(tmp_path.joinpath("repo").glob(".*")), "no staging folder left behind"


def test_a_full_batch_runs_with_the_configured_names_and_dims(onnx_path, tmp_path):
    build_repository(onnx_path, tmp_path, max_batch=8)
    model_dir = tmp_path / "tiny-svt"
    config = parse_config(model_dir)
    session = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    batch = np.random.default_rng(0).standard_normal((config.max_batch_size, *config.input[0].dims), np.float32)
    (logits,) = session.run([config.output[0].name], {config.input[0].name: batch})
    assert logits.shape == (config.max_batch_size, *config.output[0].dims)
    assert config.name == "tiny-svt" and config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU


def test_tensorrt_plan_uses_the_tensorrt_backend_with_fp32_io(onnx_path, tmp_path):
    if has_tensorrt():
        pytest.skip("TensorRT is installed: a plan is deserialised and checked, so it must be a real engine")
    plan = tmp_path / "tiny-svt-fp16.plan"
    plan.write_bytes(b"engine bytes are copied as they are")  # the generator reads names and dims from the ONNX
    report = build_repository(onnx_path, tmp_path / "repo", plan=plan, max_batch=32)
    model_dir = tmp_path / "repo" / "tiny-svt-fp16"
    config = parse_config(model_dir)
    assert config.name == "tiny-svt-fp16" and config.platform == "tensorrt_plan"
    assert (model_dir / "1" / "model.plan").read_bytes() == plan.read_bytes()
    assert not (model_dir / "1" / "model.onnx").exists()
    assert config.input[0].data_type == config.output[0].data_type == model_config_pb2.TYPE_FP32
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 16, 32]
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert report.plan_checked is False
    with pytest.raises(UsageError, match="runs on the GPU only"):
        build_repository(onnx_path, tmp_path / "repo", plan=plan, device="cpu")


def test_plan_tensors_and_batch_profile_are_checked(onnx_path):
    model = describe_model(onnx_path, max_batch=16)
    check_plan_io(model, ["logits", "pixel_values"], 16)
    check_plan_io(model, ["logits", "pixel_values"], None)
    with pytest.raises(UsageError, match="differ from the ONNX file's"):
        check_plan_io(model, ["input", "output"], 16)
    with pytest.raises(UsageError, match="accepts batches up to 8: pass --max-batch 8"):
        check_plan_io(model, ["pixel_values", "logits"], 8)


@pytest.mark.skipif(not (has_tensorrt() and torch.cuda.is_available()), reason="needs TensorRT and a CUDA device")
def test_real_tensorrt_plan_is_checked(onnx_path, tmp_path):
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(onnx_path.read_bytes()), parser.get_error(0)
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("pixel_values", (1, 3, 224, 224), (4, 3, 224, 224), (8, 3, 224, 224))
    config.add_optimization_profile(profile)
    plan = tmp_path / "tiny-svt.plan"
    plan.write_bytes(bytes(builder.build_serialized_network(network, config)))
    assert build_repository(onnx_path, tmp_path / "repo", plan=plan, max_batch=8).plan_checked is True
    with pytest.raises(UsageError, match="accepts batches up to 8"):
        build_repository(onnx_path, tmp_path / "repo", plan=plan, max_batch=16)


@pytest.mark.parametrize("max_batch, preferred", [(1, (1,)), (6, (2, 4, 6)), (32, (8, 16, 32)), (100, (32, 64, 100))])
def test_preferred_batch_sizes(max_batch, preferred):
    assert preferred_batch_sizes(max_batch) == preferred


def test_no_batching_keeps_the_full_shape(folder, torch_model, tmp_path):
    fixed = export_onnx(torch_model, folder / "tiny-svt-b1.onnx", batch=1, verify=False).path
    with pytest.raises(UsageError, match="fixed batch of 1 .* or pass --max-batch 0"):
        build_repository(fixed, tmp_path, max_batch=32)
    build_repository(fixed, tmp_path, max_batch=0)
    config = parse_config(tmp_path / "tiny-svt-b1")
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert list(config.input[0].dims) == [1, 3, 224, 224] and list(config.output[0].dims) == [1, 10]


def test_embedding_model_has_no_labels(folder, tmp_path):
    model = create_model(tiny_config("tiny-pcpvt"), weights=tiny_weights("tiny-pcpvt"), output="embedding")
    path = export_onnx(model, folder / "tiny-pcpvt-embedding.onnx", head="embedding", verify=False).path
    report = build_repository(path, tmp_path)
    config = parse_config(report.model_dir)
    width = model.config.embed_dims[-1]
    assert [(t.name, list(t.dims), t.label_filename) for t in config.output] == [("embedding", [width], "")]
    assert not (report.model_dir / "labels.txt").exists()


def test_existing_model_is_replaced_only_on_success(onnx_path, folder, tmp_path):
    build_repository(onnx_path, tmp_path, name="twins", max_batch=8)
    (tmp_path / "twins" / "stale.txt").write_text("from an older build")
    before = (tmp_path / "twins" / "config.pbtxt").read_text()
    proto = onnx.load(str(onnx_path))
    del proto.metadata_props[:]
    onnx.save(proto, str(folder / "bare.onnx"))
    with pytest.raises(TwinsDeployError, match="no twins-deploy metadata"):
        build_repository(folder / "bare.onnx", tmp_path, name="twins")
    assert (tmp_path / "twins" / "config.pbtxt").read_text() == before and (tmp_path / "twins" / "stale.txt").exists()
    build_repository(onnx_path, tmp_path, name="twins", max_batch=4)
    assert parse_config(tmp_path / "twins").max_batch_size == 4
    assert not (tmp_path / "twins" / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["twins"]


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "bad/name"}, "model name 'bad/name' must be"),
    ({"instances": 0}, "--instances must be at least 1"),
    ({"max_batch": -1}, "--max-batch must be 0"),
    ({"device": "tpu"}, "--device must be one of gpu, cpu"),
    ({"plan": "missing.plan"}, "TensorRT plan not found"),
])
def test_bad_options_are_usage_errors(onnx_path, tmp_path, kwargs, message):
    with pytest.raises(UsageError, match=message):
        build_repository(onnx_path, tmp_path, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_not_an_onnx_file(tmp_path):
    (tmp_path / "model.onnx").write_text("not protobuf at all")
    with pytest.raises(TwinsDeployError, match="model.onnx"):
        build_repository(tmp_path / "model.onnx", tmp_path / "repo")


def test_cli_writes_the_repository_and_reports_json(onnx_path, tmp_path):
    result = runner.invoke(app, ["triton", "--onnx", str(onnx_path), "--output", str(tmp_path), "--max-batch", "8",
                                 "--instances", "3", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["schema_version"] == 1 and report["validated_with"] == "tritonclient model_config_pb2"
    assert report["name"] == "tiny-svt" and report["max_batch_size"] == 8 and report["instances"] == 3
    assert report["labels"] == 10 and report["inputs"] == [{"name": "pixel_values", "data_type": "TYPE_FP32",
                                                             "dims": [3, 224, 224]}]
    assert parse_config(tmp_path / "tiny-svt").instance_group[0].count == 3
    human = runner.invoke(app, ["triton", "--onnx", str(onnx_path), "--output", str(tmp_path)], env={"COLUMNS": "200"})
    assert human.exit_code == 0 and "tritonserver --model-repository=/models" in human.stdout


def test_cli_errors_are_one_line(onnx_path, tmp_path):
    missing = runner.invoke(app, ["triton", "--onnx", str(tmp_path / "missing.onnx"), "--output", str(tmp_path)])
    assert missing.exit_code == 2 and "ONNX file not found" in missing.output and "Traceback" not in missing.output
    (tmp_path / "tiny.plan").write_bytes(b"engine")
    plan_on_cpu = runner.invoke(app, ["triton", "--onnx", str(onnx_path), "--plan", str(tmp_path / "tiny.plan"),
                                      "--device", "cpu", "--output", str(tmp_path)])
    assert plan_on_cpu.exit_code == 2 and "GPU only" in plan_on_cpu.output
    onnx_as_plan = runner.invoke(app, ["triton", "--onnx", str(onnx_path), "--plan", str(onnx_path),
                                       "--output", str(tmp_path)])
    assert onnx_as_plan.exit_code == 2 and "not an ONNX file" in onnx_as_plan.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.plan"], "nothing written on errors"
