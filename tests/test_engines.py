"""Engines: the table and its resolution, each backend that runs here, int8/fp16 ONNX, the cache, verify, build."""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

import twins_deploy
from conftest import golden, tiny_config, tiny_weights
from twins_deploy.cli import app
from twins_deploy.engines import ENGINES, Capabilities, ModelSource, open_engine, resolve_name
from twins_deploy.engines.onnxruntime_backend import OnnxRuntimeRunner
from twins_deploy.engines.quantize import convert_fp16, quantize_int8, synthetic_images
from twins_deploy.engines.resolve import build_fingerprint, engine_kind
from twins_deploy.engines.table import format_table
from twins_deploy.engines.torch_backend import TorchRunner
from twins_deploy.engines.verify import THRESHOLDS, verification_inputs, verify
from twins_deploy.errors import TwinsDeployError, UsageError
from twins_deploy.models import create_model
from twins_deploy.parity import compare

runner = CliRunner()
CPU = Capabilities(cuda=False, tensorrt=None, ort_providers=("CPUExecutionProvider",))
GPU_TRT = Capabilities(cuda=True, tensorrt="10.7.0", ort_providers=("CUDAExecutionProvider", "CPUExecutionProvider"))
GPU_ORT = Capabilities(cuda=True, tensorrt=None, ort_providers=("CUDAExecutionProvider", "CPUExecutionProvider"))
GPU_TORCH = Capabilities(cuda=True, tensorrt=None, ort_providers=("CPUExecutionProvider",))
GOLDEN = golden("tiny-svt")


def tiny_source() -> ModelSource:
    return ModelSource(tiny_config("tiny-svt"), weights=str(tiny_weights("tiny-svt")))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("engines")


@pytest.fixture(scope="module")
def fp32_onnx(folder) -> Path:
    from twins_deploy.exporters import export_onnx

    return export_onnx(tiny_source().create(), folder / "tiny.onnx").path


@pytest.fixture(scope="module")
def int8_onnx(folder, fp32_onnx) -> Path:
    with OnnxRuntimeRunner(fp32_onnx) as r:
        meta = r.describe().metadata
    quantize_int8(fp32_onnx, folder / "tiny.int8.onnx", synthetic_images(meta, 16), calibration_source="synthetic")
    return folder / "tiny.int8.onnx"


# ----------------------------------------------------------------------------------------------
# The table and --engine resolution


def test_table_names_are_unique_and_cover_every_backend_and_precision():
    names = [name for fmt in ENGINES for name in fmt.names]
    assert len(names) == len(set(names))
    assert {f.backend for f in ENGINES} == {"torch", "onnxruntime", "openvino", "tensorrt"}
    assert {f.precision for f in ENGINES if f.backend == "openvino"} == {"fp32", "bf16", "int8"}
    assert {f.precision for f in ENGINES if f.backend == "tensorrt"} == {"fp32", "fp16", "bf16", "int8", "best"}
    rows = {row["name"]: row for row in format_table(CPU)}
    assert rows["onnx-int8"]["runs_here_on"] == "cpu" and rows["trt-fp16"]["runs_here_on"] is None


@pytest.mark.parametrize("caps, engine, expected", [
    (CPU, "fp32", ("onnx", "cpu")), (CPU, "int8", ("onnx-int8", "cpu")), (CPU, "bf16", ("torch-bf16", "cpu")),
    (CPU, "torch", ("torch", "cpu")), (CPU, "ORT", ("onnx", "cpu")), (CPU, "onnxruntime", ("onnx", "cpu")),
    (GPU_TRT, "fp16", ("trt-fp16", "cuda")), (GPU_TRT, "fp32", ("trt-fp32", "cuda")),
    (GPU_TRT, "int8", ("trt-int8", "cuda")), (GPU_TRT, "best", ("trt-best", "cuda")),
    (GPU_TRT, "onnx", ("onnx", "cuda")), (GPU_TRT, "torch", ("torch", "cuda")),
    (GPU_ORT, "fp16", ("onnx-fp16", "cuda")), (GPU_ORT, "int8", ("onnx-int8", "cpu")),
    (GPU_TORCH, "fp16", ("torch-fp16", "cuda")), (GPU_TORCH, "fp32", ("torch", "cuda")),
    (GPU_TORCH, "onnx", ("onnx", "cpu")),
])
def test_names_and_precisions_resolve_to_the_best_engine_here(caps, engine, expected):
    fmt, device = resolve_name(engine, caps)
    assert (fmt.name, device) == expected


def test_a_precision_nothing_here_can_run_lists_what_can():
    with pytest.raises(UsageError) as error:
        resolve_name("fp16", CPU)
    message = str(error.value)
    assert "no fp16 engine runs on this machine" in message and "trt-fp16 needs TensorRT and a CUDA GPU" in message
    assert message.endswith("it can run: torch (cpu), torch-bf16 (cpu), onnx (cpu), onnx-int8 (cpu)")
    with pytest.raises(UsageError, match="no best engine"):
        resolve_name("best", GPU_ORT)


def test_a_named_engine_that_cannot_run_here_says_why():
    with pytest.raises(UsageError, match=r"trt-int8 needs TensorRT \(pip install.*can run: torch \(cuda\)"):
        resolve_name("trt-int8", GPU_ORT)
    with pytest.raises(UsageError, match="trt-fp16 needs TensorRT and a CUDA GPU"):
        resolve_name("tensorrt-fp16", CPU)


def test_unknown_engine_names_the_choices():
    with pytest.raises(UsageError, match="unknown engine 'fp8'.*fp32, fp16, bf16, int8, best.*trt-best"):
        resolve_name("fp8", CPU)


def test_files_are_told_apart_from_names(tmp_path):
    for name in ("model.onnx", "model.plan", "model.engine", "ckpt.pth", "w.safetensors", "x.PT"):
        assert engine_kind(name) == "file"
    for name in ("fp16", "torch", "trt-fp16", "onnx"):
        assert engine_kind(name) == "name"
    with pytest.raises(UsageError, match="engine file not found: nowhere.plan"):
        open_engine("nowhere.plan")
    (tmp_path / "weird").write_text("x")
    with pytest.raises(UsageError, match="not an engine file"):
        open_engine(str(tmp_path / "weird"))


def test_a_named_engine_needs_a_model():
    with pytest.raises(UsageError, match="pass --model NAME"):
        open_engine("onnx", None, caps=CPU)


# ----------------------------------------------------------------------------------------------
# Backends


def test_runner_lifecycle_and_input_checks():
    r = TorchRunner(tiny_source().create)
    with pytest.raises(TwinsDeployError, match="not active"):
        r.infer(GOLDEN["input_224x224"])
    with r:
        with pytest.raises(UsageError, match=r"shape \(2, 3, 256, 256\), the engine takes \(B, 3, 224, 224\)"):
            r.infer(np.zeros((2, 3, 256, 256), np.float32))
    assert not r.active


def test_torch_fp32_matches_the_golden_logits():
    with TorchRunner(tiny_source().create) as r:
        info = r.describe()
        logits = r.infer(GOLDEN["input_224x224"])["logits"]
    assert (info.name, info.backend, info.device, info.precision) == ("torch", "torch", "cpu", "fp32")
    assert info.input_shape == (-1, 3, 224, 224) and info.output_names == ("logits",)
    assert info.metadata.input_size == (224, 224) and info.metadata.weights.endswith("tiny-svt.safetensors")
    np.testing.assert_allclose(logits, GOLDEN["logits_224x224"], atol=1e-5)


@pytest.mark.parametrize("precision, cosine", [("bf16", 0.99), ("fp16", 0.999)])
def test_torch_reduced_precision_on_cpu(precision, cosine):
    with TorchRunner(tiny_source().create, precision=precision) as r:
        logits = r.infer(GOLDEN["input_224x224"])["logits"]
    assert logits.dtype == np.float32
    assert compare(GOLDEN["logits_224x224"], logits).cosine >= cosine


def test_torch_features_output_names_the_stages():
    model = create_model(tiny_config("tiny-pcpvt"), weights=tiny_weights("tiny-pcpvt"), output="features")
    data = golden("tiny-pcpvt")
    with TorchRunner(model) as r:
        outputs = r.infer(data["input_224x224"])
    assert list(outputs) == ["stage0", "stage1", "stage2", "stage3"]
    np.testing.assert_allclose(outputs["stage3"], data["stage3_224x224"], atol=1e-5)


def test_a_checkpoint_file_is_a_torch_engine():
    r = open_engine(str(tiny_weights("tiny-svt")), ModelSource(tiny_config("tiny-svt")))
    with r:
        np.testing.assert_allclose(r.infer(GOLDEN["input_224x224"])["logits"], GOLDEN["logits_224x224"], atol=1e-5)
    with pytest.raises(UsageError, match="cannot tell which Twins variant tiny-svt.safetensors holds"):
        open_engine(str(tiny_weights("tiny-svt")))


def test_onnxruntime_fp32_matches_the_golden_logits(fp32_onnx):
    with open_engine(str(fp32_onnx), threads=1) as r:
        info = r.describe()
        logits = r.infer(GOLDEN["input_224x224"])["logits"]
    assert (info.name, info.backend, info.device, info.precision) == ("onnx", "onnxruntime", "cpu", "fp32")
    assert info.details["threads"] == 1 and info.artifact == str(fp32_onnx)
    np.testing.assert_allclose(logits, GOLDEN["logits_224x224"], atol=1e-4)


def test_int8_is_qdq_with_per_channel_weights_and_keeps_its_metadata(int8_onnx):
    model = onnx.load(int8_onnx)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > 0
    props = {p.key: p.value for p in model.metadata_props}
    assert props["precision"] == "int8" and props["model"] == "custom"
    report = json.loads(props["quantization"])
    assert report["format"] == "QDQ" and report["calibration_images"] == 16
    weights = {i.name: i for i in model.graph.initializer}
    dequantized = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights
                   and weights[n.input[0]].data_type == onnx.TensorProto.INT8]
    scales = [onnx.numpy_helper.to_array(weights[n.input[1]]) for n in dequantized]
    assert dequantized and all(s.ndim == 1 and s.size > 1 for s in scales)  # one scale per output channel


def test_int8_for_cpu_quantizes_strided_convs_and_keeps_peg_and_attention_products_fp32(int8_onnx):
    model = onnx.load(int8_onnx)
    producers = {out: node for node in model.graph.node for out in node.output}

    def quantized(node) -> bool:
        return all(name in producers and producers[name].op_type == "DequantizeLinear" for name in node.input[:2])

    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    depthwise = [n for n in convs if any(a.name == "group" and a.i > 1 for a in n.attribute)]
    strided = [n for n in convs if n not in depthwise]
    assert len(depthwise) == 4 and len(strided) == 4 + 3  # 4 PEGs; 4 patch embeds + 3 GSA sub-samplings
    assert all(quantized(n) for n in strided) and not any(quantized(n) for n in depthwise)
    attention = [n for n in model.graph.node if n.op_type == "MatMul" and not quantized(n)]
    assert len(attention) == 2 * 8  # Q@K^T and attention@V in each of tiny-svt's 8 blocks
    report = json.loads({p.key: p.value for p in model.metadata_props}["quantization"])
    assert report["op_types"] == ["MatMul", "Gemm", "Conv"] and report["kept_fp32"] == len(depthwise) + len(attention)


def test_int8_runs_close_to_fp32(int8_onnx, fp32_onnx):
    with open_engine(str(int8_onnx)) as r:
        info = r.describe()
        logits = r.infer(GOLDEN["input_224x224"])["logits"]
    assert (info.name, info.precision) == ("onnx-int8", "int8")
    parity = compare(GOLDEN["logits_224x224"], logits)
    assert parity.cosine >= THRESHOLDS["int8"].cosine and parity.top1_agreement == 1.0


def test_int8_for_tensorrt_puts_symmetric_qdq_before_every_matmul(folder, fp32_onnx):
    meta = OnnxRuntimeRunner(fp32_onnx)
    with meta:
        images = synthetic_images(meta.describe().metadata, 8)
    quantize_int8(fp32_onnx, folder / "tiny.qdq.onnx", images, target="tensorrt")
    model = onnx.load(folder / "tiny.qdq.onnx")
    producers = {o: n for n in model.graph.node for o in n.output}
    weights = {i.name: i for i in model.graph.initializer}
    matmuls = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]
    assert matmuls
    for node in matmuls:
        for name in node.input[:2]:
            assert producers[name].op_type == "DequantizeLinear", f"{node.name} input {name} is not dequantized"
    zero_points = [onnx.numpy_helper.to_array(weights[n.input[2]]) for n in model.graph.node
                   if n.op_type == "QuantizeLinear" and len(n.input) > 2]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)  # symmetric int8


def test_quantizing_twice_is_refused(int8_onnx, folder):
    with pytest.raises(UsageError, match="already int8"):
        quantize_int8(int8_onnx, folder / "again.onnx", np.zeros((1, 3, 224, 224), np.float32))
    with pytest.raises(UsageError, match="already int8"):
        convert_fp16(int8_onnx, folder / "again.onnx")


def test_fp16_onnx_keeps_layernorm_and_softmax_in_fp32_and_runs_on_cpu(folder, fp32_onnx):
    convert_fp16(fp32_onnx, folder / "tiny.fp16.onnx")
    model = onnx.load(folder / "tiny.fp16.onnx")
    halves = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    assert halves and model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    casts_to_float = {o for n in model.graph.node if n.op_type == "Cast" for o in n.output}
    for node in model.graph.node:
        if node.op_type in ("LayerNormalization", "Softmax"):
            assert node.input[0] in casts_to_float or node.input[0] in {i.name for i in model.graph.input} \
                or not node.input[0].endswith("fp16"), f"{node.name} runs in fp16"
    try:
        r = OnnxRuntimeRunner(folder / "tiny.fp16.onnx", providers=["CPUExecutionProvider"])
        r.activate()
    except TwinsDeployError as exc:
        pytest.skip(f"onnxruntime's CPU provider cannot run this fp16 graph: {exc}")
    with r:
        assert r.describe().precision == "fp16"
        parity = compare(GOLDEN["logits_224x224"], r.infer(GOLDEN["input_224x224"])["logits"])
    assert parity.cosine >= THRESHOLDS["fp16"].cosine and parity.max_rel <= THRESHOLDS["fp16"].max_rel


# ----------------------------------------------------------------------------------------------
# Engines built on the fly into the cache


def test_named_engines_are_built_once_into_the_cache(tmp_path):
    logs = []
    r = open_engine("int8", tiny_source(), caps=CPU, cache=tmp_path, log=logs.append)
    (version,) = tmp_path.iterdir()
    (model_folder,) = version.iterdir()
    assert version.name == build_fingerprint() and version.name.startswith(twins_deploy.__version__ + "-")
    assert re.fullmatch(r"custom-[0-9a-f]{10}-224x224-tiny-svt-[0-9a-f]{12}-10cls", model_folder.name)
    assert sorted(p.name for p in model_folder.iterdir()) == ["fp32.onnx", "int8.onnx"]
    built = (model_folder / "int8.onnx").stat().st_mtime_ns
    with r:
        assert r.describe().name == "onnx-int8"
        parity = compare(GOLDEN["logits_224x224"], r.infer(GOLDEN["input_224x224"])["logits"])
    assert parity.cosine >= 0.99
    assert any("quantizing to int8" in line for line in logs)
    logs.clear()
    open_engine("onnx-int8", tiny_source(), caps=CPU, cache=tmp_path, log=logs.append)
    assert logs == [] and (model_folder / "int8.onnx").stat().st_mtime_ns == built


def test_a_changed_quantizer_gets_a_new_cache_folder(tmp_path, monkeypatch):
    from twins_deploy.engines import quantize

    before = build_fingerprint()
    assert build_fingerprint() == before
    edited = tmp_path / "quantize.py"
    edited.write_text(Path(quantize.__file__).read_text() + "\n# a recipe change\n")
    monkeypatch.setattr(quantize, "__file__", str(edited))
    assert build_fingerprint() != before


def test_cache_keys_tell_weights_sizes_and_heads_apart():
    keys = {ModelSource("svt-s", "random").cache_key(), ModelSource("svt-s", "pretrained").cache_key(),
            ModelSource("svt-s", "random", img_size="224x320").cache_key(),
            ModelSource("twins_svt_small", "random", num_classes=7).cache_key()}
    assert len(keys) == 4
    assert ModelSource("alt_gvt_small", "random").cache_key() == "svt-s-224x224-random-1000cls"
    with pytest.raises(UsageError, match="checkpoint not found"):
        ModelSource("svt-s", "nowhere.pth").cache_key()


# ----------------------------------------------------------------------------------------------
# verify


@pytest.mark.parametrize("engine, precision", [("fp32", "fp32"), ("int8", "int8")])
def test_verify_onnx_against_torch(engine, precision, fp32_onnx, int8_onnx):
    path = fp32_onnx if engine == "fp32" else int8_onnx
    with OnnxRuntimeRunner(path) as candidate, TorchRunner(tiny_source().create) as reference:
        inputs, described = verification_inputs(candidate.describe().metadata, None, 8)
        # the tiny weights are random, so their logits on smooth images are near ties: top-1 agreement is
        # enforced for fp32 (exact) and checked for int8 on the golden inputs in test_int8_runs_close_to_fp32
        report = verify(candidate, reference, inputs, source=described, trained=precision == "fp32", batch_size=3)
    assert report.passed, report
    assert report.precision == precision and report.samples == 8 and described == "synthetic, seed 1"
    assert set(report.checks) == ({"cosine", "max_rel", "top1_agreement"} if precision == "fp32" else {"cosine"})
    assert report.as_dict()["parity"]["cosine"] >= THRESHOLDS[precision].cosine


def test_verify_fails_an_engine_of_other_weights(fp32_onnx):
    other = ModelSource(tiny_config("tiny-svt"), weights="random")
    with OnnxRuntimeRunner(fp32_onnx) as candidate, TorchRunner(other.create) as reference:
        report = verify(candidate, reference, GOLDEN["input_224x224"], source="golden", trained=False)
    assert not report.passed and not report.checks["cosine"] and "top1_agreement" not in report.checks


@pytest.mark.slow
def test_verify_and_build_commands_on_svt_s(tmp_path, monkeypatch):
    """The daily path end to end: int8 named engine built on the fly, verified; build writes the same kind of file."""
    monkeypatch.setenv("TWINS_DEPLOY_CACHE", str(tmp_path / "cache"))
    result = runner.invoke(app, ["verify", "--engine", "int8", "--model", "svt-s", "--weights", "random",
                                 "--samples", "4", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    expected = "ov-int8" if importlib.util.find_spec("openvino") else "onnx-int8"  # the fastest CPU int8 installed
    assert report["engine"] == expected and report["passed"] and report["parity"]["cosine"] >= 0.99
    fp32 = next((tmp_path / "cache").glob("*/svt-s-224x224-random-1000cls/fp32.onnx"))
    result = runner.invoke(app, ["build", "--onnx", str(fp32), "--backend", "onnxruntime", "--precision", "int8",
                                 "--calib-images", "4", "--output", str(tmp_path / "svt-s.int8.onnx"), "--json"])
    assert result.exit_code == 0, result.output
    built = json.loads(result.stdout)
    assert built["quantization"]["calibration"] == "synthetic, seed 0 (4 images)"
    assert built["parity_vs_fp32"]["cosine"] >= 0.99 and (tmp_path / "svt-s.int8.onnx").is_file()


def test_build_command_usage_errors(fp32_onnx):
    cases = [(["--precision", "fp32", "--backend", "onnxruntime"], "onnxruntime builds int8 and fp16"),
             (["--precision", "int4"], "--precision must be one of"),
             (["--precision", "int8", "--backend", "coreml"], "--backend must be one of")]
    for args, message in cases:
        result = runner.invoke(app, ["build", "--onnx", str(fp32_onnx), *args])
        assert result.exit_code == 2 and message in result.output, result.output
    result = runner.invoke(app, ["build", "--precision", "int8", "--backend", "onnxruntime"])
    assert result.exit_code == 2 and "pass --onnx PATH (an fp32 export) or --model NAME" in result.output


def test_build_command_on_a_file_that_is_not_onnx(tmp_path):
    (tmp_path / "model.onnx").write_text("garbage")
    result = runner.invoke(app, ["build", "--onnx", str(tmp_path / "model.onnx"), "--backend", "onnxruntime",
                                 "--precision", "int8"])
    assert result.exit_code == 1 and "cannot read" in result.output and "as ONNX" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_build_command_int8_from_an_image_folder(fp32_onnx, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "broken.jpg").write_bytes(b"nope")
    out = tmp_path / "tiny.int8.onnx"
    result = runner.invoke(app, ["build", "--onnx", str(fp32_onnx), "--backend", "onnxruntime", "--precision", "int8",
                                 "--calib", str(tmp_path), "--output", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "skipped 1 unreadable" in result.output and "cosine" in result.stdout
    props = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert json.loads(props["quantization"])["calibration"] == f"{tmp_path} (3 images)"
