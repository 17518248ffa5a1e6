"""OpenVINO: the runner against onnxruntime, int8 IRs, the dynamic-batch int8 path, resolution, IR files."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from conftest import golden, tiny_config, tiny_weights
from twins_deploy.cli import app
from twins_deploy.engines import Capabilities, ModelSource, open_engine, resolve_name
from twins_deploy.engines.artifacts import onnx_metadata
from twins_deploy.engines.onnxruntime_backend import OnnxRuntimeRunner
from twins_deploy.engines.openvino_backend import OpenVinoRunner, build_ir, ir_metadata, save_ir_atomic
from twins_deploy.engines.quantize import synthetic_images
from twins_deploy.errors import UsageError
from twins_deploy.models import create_model
from twins_deploy.parity import compare

ov = pytest.importorskip("openvino")
nncf = pytest.importorskip("nncf")

TINY = ("tiny-svt", "tiny-pcpvt")
CPU = Capabilities(cuda=False, tensorrt=None, ort_providers=("CPUExecutionProvider",))
CPU_OV = Capabilities(cuda=False, tensorrt=None, ort_providers=("CPUExecutionProvider",), openvino=True)
GPU_TRT_OV = Capabilities(cuda=True, tensorrt="10.7.0", ort_providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
                          openvino=True)
CALIBRATION = 4  # seeded synthetic images: enough for the tiny models, and seconds to quantize
cli = CliRunner()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("openvino")


@pytest.fixture(scope="module", params=TINY)
def tiny(request, folder) -> dict:
    """A tiny model's fp32 export, its fp32 and int8 IRs, and the golden inputs."""
    from twins_deploy.exporters import export_onnx

    name = request.param
    model = create_model(tiny_config(name), weights=str(tiny_weights(name)))
    onnx_path = export_onnx(model, folder / f"{name}.onnx").path
    images = synthetic_images(onnx_metadata(onnx_path), CALIBRATION, seed=0)
    fp32 = folder / f"{name}.fp32.xml"
    build_ir(onnx_path, fp32, "fp32")
    int8 = folder / f"{name}.int8.xml"
    report = build_ir(onnx_path, int8, "int8", calibration=images, calibration_source="synthetic, seed 0")
    return {"name": name, "onnx": onnx_path, "fp32": fp32, "int8": int8, "int8_report": report,
            "inputs": golden(name)["input_224x224"]}


def logits(runner, batch: np.ndarray) -> np.ndarray:
    with runner:
        return runner.infer(batch)["logits"]


def test_openvino_fp32_equals_onnxruntime_fp32(tiny):
    batch = np.concatenate([tiny["inputs"], tiny["inputs"][:1]])  # batch 3
    reference = logits(OnnxRuntimeRunner(tiny["onnx"]), batch)
    for path in (tiny["fp32"], tiny["onnx"]):  # our IR, and the ONNX file read by OpenVINO directly
        runner = OpenVinoRunner(path, precision="fp32")
        np.testing.assert_allclose(logits(runner, batch), reference, atol=1e-4, rtol=0)
        np.testing.assert_allclose(logits(OpenVinoRunner(path, precision="fp32"), batch[:1]), reference[:1],
                                   atol=1e-4, rtol=0)


def test_int8_ir_stays_close_to_fp32_and_agrees_on_top1(tiny):
    reference = logits(OnnxRuntimeRunner(tiny["onnx"]), tiny["inputs"])
    runner = OpenVinoRunner(tiny["int8"])
    parity = compare(reference, logits(runner, tiny["inputs"]))
    assert parity.cosine >= 0.99 and parity.top1_agreement == 1.0, parity
    report = tiny["int8_report"]["quantization"]
    assert report["fake_quantize_nodes"] > 0 and report["calibration"] == "synthetic, seed 0"
    assert len(report["kept_in_higher_precision"]) == 2  # the pixel-reading patch embedding and the classifier


def test_int8_layer_norm_quantizers_fuse_into_the_layer_norms(tiny):
    """Every LayerNorm NNCF quantizes runs on a 3-D view, where OpenVINO's CPU plugin fuses the quantizer
    into the MVN: the compiled model keeps no FakeQuantize of its own (before: one per such LayerNorm)."""
    assert tiny["int8_report"]["quantization"]["layer_norms_on_3d_view"] > 0
    model = ov.Core().read_model(tiny["int8"])
    model.reshape([1, 3, 224, 224])
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": "1"})
    kinds = [op.get_rt_info()["layerType"].astype(str) for op in compiled.get_runtime_model().get_ops()]
    assert "MVN" in kinds and "FakeQuantize" not in kinds


def test_int8_attention_quantizers_sit_below_the_head_merging_transposes(tiny):
    """The quantizer of each attention output is moved below the Transposes that merge the heads, so no
    Transpose runs on int8 (OpenVINO has no fast int8 Transpose); the numbers stay those of NNCF's graph."""
    assert tiny["int8_report"]["quantization"]["attention_quantizers_after_transpose"] > 0
    model = ov.Core().read_model(tiny["int8"])
    model.reshape([1, 3, 224, 224])
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": "1"})
    transposes = [op.get_rt_info()["runtimePrecision"].astype(str) for op in compiled.get_runtime_model().get_ops()
                  if op.get_rt_info()["layerType"].astype(str) == "Transpose"]
    assert transposes and not {"i8", "u8"} & set(transposes), transposes


def test_a_batch_that_divides_among_the_threads_runs_as_parallel_parts_with_the_same_numbers(tiny):
    """Two threads: a batch of 4 runs as two streams of 2 images at once, a batch of 3 as one request;
    both give exactly what one request on both threads gives."""
    batch = np.concatenate([tiny["inputs"]] * 4)[:4]
    with OpenVinoRunner(tiny["int8"], threads=2) as split, \
            OpenVinoRunner(tiny["int8"], threads=2, split_batch=False) as whole:
        assert split.describe().details["split_batch"] and not whole.describe().details["split_batch"]
        assert (split._split_parts(4), split._split_parts(3), whole._split_parts(4)) == (2, 1, 1)
        for size in (4, 3, 1):
            np.testing.assert_array_equal(split.infer(batch[:size])["logits"], whole.infer(batch[:size])["logits"])


def test_nncf_int8_of_the_default_export_compiles_with_a_dynamic_batch(tiny):
    """OpenVINO's own int8 path, as its documentation shows it, on our export: no static batch needed."""
    model = ov.convert_model(str(tiny["onnx"]))
    assert model.inputs[0].get_partial_shape()[0].is_dynamic
    images = synthetic_images(onnx_metadata(tiny["onnx"]), 2, seed=0)
    quantized = nncf.quantize(model, nncf.Dataset([images[:1], images[1:]]), model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=2)
    compiled = ov.Core().compile_model(quantized, "CPU", {"INFERENCE_NUM_THREADS": "1"})
    for batch in (1, 3):
        assert compiled(np.zeros((batch, 3, 224, 224), np.float32))[0].shape == (batch, 10)


def check_reshapes_after_gemms(model) -> None:
    """The layout rule behind the dynamic batch, checked on the full-size exports in test_export.py:
    OpenVINO's int8 ReshapeTransformation moves a Gemm's per-channel dequantization through a
    batch-dynamic Reshape whose dim 1 is at least the channels (svt-s: (?, 128) -> (-1, 784, 4, 32))
    and throws unless the channels divide it; with dim 1 below the channels it leaves it alone."""
    constants = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    gemms = {n.output[0]: constants[n.input[1]].shape[0] for n in model.graph.node if n.op_type == "Gemm"}
    checked = 0
    for node in model.graph.node:
        if node.op_type == "Reshape" and node.input[0] in gemms:
            target, channels = constants[node.input[1]], gemms[node.input[0]]
            assert target[0] == -1 and (target[1] < channels or (len(target) > 2 and target[1] == channels)), \
                f"{node.name} reshapes a Gemm's (?, {channels}) output to {target.tolist()}"
            checked += 1
    assert checked


def test_ir_metadata_round_trip(tiny):
    exported = onnx_metadata(tiny["onnx"])
    for path, precision in ((tiny["fp32"], "fp32"), (tiny["int8"], "int8")):
        meta = ir_metadata(path)
        assert meta.extra.pop("precision") == precision and json.loads(meta.extra.pop("openvino"))
        assert meta == exported
    with OpenVinoRunner(tiny["int8"]) as runner:
        info = runner.describe()
    assert (info.name, info.backend, info.precision, info.device) == ("ov-int8", "openvino", "int8", "cpu")
    assert info.input_shape == (-1, 3, 224, 224) and info.output_names == ("logits",)
    assert info.details["settings"]["NUM_STREAMS"] == "1" and info.details["settings"]["PERFORMANCE_HINT"] == "LATENCY"
    assert info.details["settings"]["INFERENCE_PRECISION_HINT"] == "bf16"


def test_ir_files_are_written_atomically(tiny, tmp_path, monkeypatch):
    model = ov.Core().read_model(str(tiny["fp32"]))
    target = tmp_path / "model.xml"
    assert save_ir_atomic(model, target) > 0 and target.with_suffix(".bin").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin", "model.xml"]

    def broken(model, path, **kwargs):
        Path(path).write_text("half")
        Path(path).with_suffix(".bin").write_text("half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(ov, "save_model", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        save_ir_atomic(model, tmp_path / "other.xml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin", "model.xml"]  # no temp files, no half IR


@pytest.mark.parametrize("caps, engine, expected", [
    (CPU_OV, "int8", "ov-int8"), (CPU_OV, "best", "ov-int8"), (CPU_OV, "fp32", "ov"), (CPU_OV, "bf16", "ov-bf16"),
    (CPU_OV, "openvino", "ov"), (CPU_OV, "onnx", "onnx"), (CPU_OV, "onnx-int8", "onnx-int8"),
    (CPU, "int8", "onnx-int8"), (CPU, "best", "onnx-int8"), (CPU, "fp32", "onnx"),
    (GPU_TRT_OV, "best", "trt-best"), (GPU_TRT_OV, "int8", "trt-int8"),
])
def test_resolution_picks_the_fastest_engine_by_the_benchmarked_order(caps, engine, expected):
    assert resolve_name(engine, caps)[0].name == expected


def test_openvino_engines_need_openvino():
    with pytest.raises(UsageError, match="ov-int8 needs openvino"):
        resolve_name("ov-int8", CPU)


def test_named_openvino_engine_is_built_into_the_cache(tmp_path):
    source = ModelSource(tiny_config("tiny-svt"), weights=str(tiny_weights("tiny-svt")))
    logs = []
    with open_engine("ov", source, caps=CPU_OV, cache=tmp_path, log=logs.append) as runner:
        info = runner.describe()
        out = runner.infer(golden("tiny-svt")["input_224x224"])["logits"]
    assert (info.name, info.precision) == ("ov", "fp32")
    np.testing.assert_allclose(out, golden("tiny-svt")["logits_224x224"], atol=1e-4, rtol=0)
    (model_folder,) = [p for version in tmp_path.iterdir() for p in version.iterdir()]
    assert sorted(p.name for p in model_folder.iterdir()) == ["fp32.onnx", "openvino-fp32.bin", "openvino-fp32.xml"]


def test_cli_builds_an_ir_and_opens_it_as_an_engine_file(tiny, tmp_path):
    output = tmp_path / "tiny.bf16.xml"
    result = cli.invoke(app, ["build", "--onnx", str(tiny["onnx"]), "--backend", "openvino", "--precision", "bf16",
                              "-o", str(output), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["backend"] == "openvino" and report["output"] == str(output) and output.with_suffix(".bin").is_file()
    assert report["openvino"]["inference_precision"] == "bf16" and report["parity_vs_fp32"]["cosine"] >= 0.99
    assert report["bytes"] == output.stat().st_size + output.with_suffix(".bin").stat().st_size
    with open_engine(str(output)) as runner:
        assert runner.describe().name == "ov-bf16"
    result = cli.invoke(app, ["build", "--onnx", str(tiny["onnx"]), "--backend", "openvino", "--precision", "fp16"])
    assert result.exit_code == 2 and "fp32, bf16, int8" in result.output


def test_triton_openvino_repository_parses_with_tritons_schema(tiny, tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from twins_deploy.triton import build_repository

    report = build_repository(tiny["int8"], tmp_path, name="tiny", max_batch=8)
    assert report.schema == "tritonclient model_config_pb2"
    assert report.files == ("tiny/1/model.bin", "tiny/1/model.xml", "tiny/config.pbtxt", "tiny/labels.txt")
    config = text_format.Parse((tmp_path / "tiny" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.backend == "openvino" and not config.platform and config.max_batch_size == 8
    assert [(t.name, list(t.dims)) for t in config.input] == [("pixel_values", [3, 224, 224])]
    assert [(t.name, list(t.dims)) for t in config.output] == [("logits", [10])]
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert config.parameters["PERFORMANCE_HINT"].string_value == "LATENCY"
    with pytest.raises(UsageError, match="runs on the CPU"):
        build_repository(tiny["int8"], tmp_path, device="gpu")


def test_predictor_runs_an_ir_without_onnxruntime(tiny, tmp_path):
    from twins_deploy.runtime import Predictor

    predictor = Predictor(tiny["fp32"])
    reference = logits(OnnxRuntimeRunner(tiny["onnx"]), tiny["inputs"])
    np.testing.assert_allclose(predictor.run(tiny["inputs"]), reference, atol=1e-4, rtol=0)
    assert predictor.providers == ["OpenVINO CPU"] and predictor.class_names == tuple(f"class_{i}" for i in range(10))
    script = f"""
import sys, json, numpy as np
sys.modules["onnxruntime"] = None  # importing it now fails: the IR path must not need it
from twins_deploy.runtime import Predictor
prediction = Predictor({str(tiny['int8'])!r}).predict(np.load({str(tmp_path / 'x.npy')!r})[0])
print(json.dumps(prediction.as_dict()))
"""
    np.save(tmp_path / "x.npy", tiny["inputs"])
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["class_ids"][0] == int(reference[0].argmax())


def test_an_ir_with_two_streams_answers_concurrent_calls_exactly(tiny):
    """Two OpenVINO streams (``Predictor(streams=2)``): calls from two threads at once answer as one stream."""
    from concurrent.futures import ThreadPoolExecutor

    from twins_deploy.runtime import Predictor

    one = Predictor(tiny["int8"], threads=2).run(tiny["inputs"])
    streamed = Predictor(tiny["int8"], threads=2, streams=2)
    with ThreadPoolExecutor(2) as pool:
        for got in pool.map(lambda _: streamed.run(tiny["inputs"]), range(4)):
            np.testing.assert_allclose(got, one, atol=1e-5, rtol=0)
