"""ONNX export: a static, compact graph TensorRT and onnxruntime digest best, equal to PyTorch and timm.

svt-s (through the CLI) and pcpvt-s (through the API) are exported once per session with random
weights; the tiny golden models check exactness at every size and head.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from typer.testing import CliRunner

from conftest import SIZES, TINY, golden, tiny_config, tiny_weights
from twins_deploy.cli import app
from twins_deploy.errors import TwinsDeployError, UsageError
from twins_deploy.exporters import export_onnx, save_onnx_atomic
from twins_deploy.exporters import onnx as exporter
from twins_deploy.metadata import ModelMetadata, imagenet_class_names
from twins_deploy.models import MODELS, Twins, create_model
from twins_deploy.runtime.session import create_session, session_metadata

runner = CliRunner()
GOLDEN_ATOL = 1e-5
LAYERNORMS = {"svt-s": 48, "pcpvt-s": 50}  # 2 per block, 4 patch embeds, GSA sub-sample norms, final norm
BLOCKS = {"svt-s": 18, "pcpvt-s": 16}
SHAPE_OPS = {"Shape", "Size", "ConstantOfShape", "Gather", "Concat", "Unsqueeze", "Squeeze", "Range", "Expand"}


@pytest.fixture(scope="session")
def svt_s(tmp_path_factory):
    """svt-s through ``twins-deploy export --json`` with no --output: the file lands in the current folder."""
    folder = tmp_path_factory.mktemp("svt-s")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        result = runner.invoke(app, ["export", "--model", "svt-s", "--weights", "random", "--json"])
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    report["path"] = str(folder / report["path"])
    return report


@pytest.fixture(scope="session")
def pcpvt_s(tmp_path_factory):
    return export_onnx("pcpvt-s", tmp_path_factory.mktemp("pcpvt-s") / "pcpvt-s.onnx", weights="random").as_dict()


@pytest.fixture(params=["svt-s", "pcpvt-s"])
def full(request):
    return request.getfixturevalue(request.param.replace("-", "_"))


def _graph(path) -> onnx.GraphProto:
    return onnx.load(path).graph


def test_graph_has_no_shape_arithmetic_and_constant_reshape_targets(full):
    graph = _graph(full["path"])
    ops = Counter(node.op_type for node in graph.node)
    assert not SHAPE_OPS & set(ops), ops
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    reshapes = [node for node in graph.node if node.op_type == "Reshape"]
    assert reshapes
    for node in reshapes:
        assert node.input[1] in constants, f"{node.name} reshapes to a computed shape"
        assert list(constants[node.input[1]]).count(-1) <= 1, node.name
    assert len(graph.node) == full["num_nodes"] <= 700


def test_layernorm_is_one_node_and_opset_is_17(full):
    model = onnx.load(full["path"], load_external_data=False)
    ops = Counter(node.op_type for node in model.graph.node)
    assert ops["LayerNormalization"] == LAYERNORMS[full["model"]]
    assert not {"Pow", "Sqrt", "ReduceVariance"} & set(ops)  # no decomposed LayerNorm
    assert ops["ReduceMean"] == 1  # the token pooling, nothing else
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)] and full["opset"] == 17


def test_attention_is_scaled_q_then_matmul_softmax_matmul(full):
    """The pattern TensorRT's fused multi-head attention recognises, once per block."""
    graph = _graph(full["path"])
    producer = {out: node for node in graph.node for out in node.output}
    consumers = Counter(name for node in graph.node for name in node.input)
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    softmaxes = [node for node in graph.node if node.op_type == "Softmax"]
    assert len(softmaxes) == BLOCKS[full["model"]]
    for softmax in softmaxes:
        scores = producer[softmax.input[0]]
        assert scores.op_type == "MatMul"
        scale = producer[scores.input[0]]
        assert scale.op_type == "Mul"
        factor = next(constants[name] for name in scale.input if name in constants)
        assert factor.size == 1 and 0 < float(factor) < 1  # head_dim ** -0.5 on Q, before the first MatMul
        assert producer[scores.input[1]].op_type == "Transpose"  # K^T
        assert consumers[softmax.output[0]] == 1
        assert any(node.op_type == "MatMul" and node.input[0] == softmax.output[0] for node in graph.node)


def test_reshapes_after_gemms_keep_openvino_int8_on_a_dynamic_batch(full):
    from test_openvino import check_reshapes_after_gemms

    check_reshapes_after_gemms(onnx.load(full["path"]))


def test_dynamic_batch_runs_at_1_and_3_and_matches_pytorch(full):
    graph = _graph(full["path"])
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert graph.input[0].name == "pixel_values" and dims == ["batch", 3, 224, 224]
    assert [d.dim_param or d.dim_value for d in graph.output[0].type.tensor_type.shape.dim] == ["batch", 1000]
    session = create_session(full["path"], providers=["cpu"])
    for batch in (1, 3):
        pixels = np.zeros((batch, 3, 224, 224), np.float32)
        assert session.run(["logits"], {"pixel_values": pixels})[0].shape == (batch, 1000)
    assert full["verified"] and full["passed"]
    assert sorted({row["batch"] for row in full["parity"]}) == [1, 3]
    for row in full["parity"]:
        assert row["max_rel"] <= 1e-4 and row["cosine"] > 0.99999 and row["top1_agreement"] == 1.0


def test_onnxruntime_fuses_every_gelu_and_every_linear_is_one_gemm(svt_s, tmp_path):
    with torch.device("meta"):
        linears = sum(isinstance(m, torch.nn.Linear) for m in Twins(MODELS["svt-s"].config).modules())
    graph = _graph(svt_s["path"])
    constants = {init.name for init in graph.initializer}
    ops = Counter(node.op_type for node in graph.node)
    assert ops["Gemm"] == linears == 82 and ops["Erf"] == 18
    assert not [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in constants]  # weights only in Gemm
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(svt_s["path"], options, providers=["CPUExecutionProvider"])
    optimized = Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)
    assert optimized["Gelu"] == 18 and "Erf" not in optimized


def test_cli_json_report_and_default_output_name(svt_s):
    assert svt_s["schema_version"] == 1
    assert os.path.basename(svt_s["path"]) == "svt-s-224x224.onnx"
    assert svt_s["file_bytes"] == os.path.getsize(svt_s["path"])
    assert svt_s["params"] == 24_060_776
    assert svt_s["input_size"] == [224, 224] and svt_s["batch"] == "dynamic" and svt_s["head"] == "logits"
    assert svt_s["simplifier"] == "onnxscript optimizer" and svt_s["tolerance_max_rel"] == 1e-4
    assert svt_s["nodes_by_op"]["LayerNormalization"] == 48 and "Shape" not in svt_s["nodes_by_op"]


def test_metadata_round_trip(svt_s):
    meta = ModelMetadata.from_props({p.key: p.value for p in onnx.load(svt_s["path"]).metadata_props})
    assert meta == session_metadata(create_session(svt_s["path"], providers=["cpu"]))
    assert meta.model == "svt-s" and meta.input_size == (224, 224) and meta.output == "logits"
    assert meta.mean == (0.485, 0.456, 0.406) and meta.std == (0.229, 0.224, 0.225)
    assert meta.interpolation == "bicubic" and meta.crop_pct == 0.9
    assert meta.class_names == tuple(imagenet_class_names()) and len(meta.class_names) == 1000
    assert meta.weights == "random:seed=0" and meta.weights_sha256 == ""
    assert meta.torch_version == torch.__version__ and meta.twins_deploy_version


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("size", SIZES)
def test_tiny_exports_equal_the_golden_vectors(tmp_path, name, size):
    """timm's logits within 1e-5 from onnxruntime, including sizes that need LSA padding (256)."""
    arrays = golden(name)
    report = export_onnx(tiny_config(name), tmp_path / "tiny.onnx", weights=tiny_weights(name), img_size=size,
                         batch=2, verify=False)
    logits = create_session(report.path, providers=["cpu"]).run(["logits"], {"pixel_values": arrays[f"input_{size}"]})[0]
    np.testing.assert_allclose(logits, arrays[f"logits_{size}"], rtol=0, atol=GOLDEN_ATOL)
    meta = ModelMetadata.from_props({p.key: p.value for p in onnx.load(report.path).metadata_props})
    assert meta.class_names == tuple(f"class_{i}" for i in range(10))
    assert meta.weights_sha256 and meta.weights.endswith(f"{name}.safetensors")


def test_features_head_outputs_the_four_stage_maps(tmp_path):
    arrays = golden("tiny-svt")
    model = create_model(tiny_config("tiny-svt"), weights=tiny_weights("tiny-svt"), img_size="224x320")
    report = export_onnx(model, tmp_path / "features.onnx", head="features")
    assert report.passed and {row["output"] for row in report.parity} == {"stage0", "stage1", "stage2", "stage3"}
    assert model.output == "logits" and all(m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))
    session = create_session(report.path, providers=["cpu"])
    assert [o.name for o in session.get_outputs()] == ["stage0", "stage1", "stage2", "stage3"]
    assert session_metadata(session).class_names == () and session_metadata(session).output == "features"
    outputs = session.run(None, {"pixel_values": arrays["input_224x320"]})
    for k, output in enumerate(outputs):
        np.testing.assert_allclose(output, arrays[f"stage{k}_224x320"], rtol=0, atol=GOLDEN_ATOL)


def test_failed_parity_is_reported_and_the_file_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(exporter, "PARITY_MAX_REL", 0.0)  # nothing is bit-exact across runtimes
    report = export_onnx(tiny_config("tiny-pcpvt"), tmp_path / "tiny.onnx", weights=tiny_weights("tiny-pcpvt"),
                         batch=1, opset=18, head="embedding")
    assert report.verified and not report.passed and report.path.is_file()
    assert [row["batch"] for row in report.parity] == [1] and report.parity[0]["top1_agreement"] is None
    assert onnx.load(report.path).opset_import[0].version == 18


def test_save_onnx_atomic_never_damages_an_earlier_file(tmp_path, monkeypatch):
    proto = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])]))
    path = tmp_path / "sub" / "model.onnx"
    assert save_onnx_atomic(proto, path) == path.stat().st_size
    before = path.read_bytes()

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(TwinsDeployError, match="cannot write .*model.onnx: No space left on device"):
        save_onnx_atomic(onnx.helper.make_model(proto.graph, producer_name="other"), path)
    assert path.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == ["model.onnx"]


@pytest.mark.parametrize("args, message", [
    (["--batch", "0"], "batch must be 'dynamic' or a positive integer"),
    (["--opset", "16"], "opset 16 is not supported"),
    (["--head", "pooled"], "unknown head 'pooled'"),
    (["--img-size", "100", "--weights", "random"], "multiples of 32"),
])
def test_cli_usage_errors_are_one_line_with_exit_2(args, message):
    result = runner.invoke(app, ["export", "--model", "svt-s", *args])
    assert result.exit_code == 2 and message in result.stderr
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1


def test_api_rejects_a_size_a_built_model_does_not_have():
    model = create_model(tiny_config("tiny-svt"), weights="random")
    with pytest.raises(UsageError, match="built for 224x224"):
        export_onnx(model, "never.onnx", img_size=256)


def test_package_import_stays_torch_free_and_exposes_export_onnx():
    code = ("import sys, twins_deploy; assert 'torch' not in sys.modules and 'onnx' not in sys.modules; "
            "from twins_deploy.exporters import export_onnx; assert twins_deploy.export_onnx is export_onnx")
    subprocess.run([sys.executable, "-c", code], check=True)
