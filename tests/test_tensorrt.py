"""TensorRT: the decisions (profiles, flags, sidecar checks, what is missing) everywhere; execution on GPU hosts."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import golden, tiny_config, tiny_weights
from twins_deploy.cli import app
from twins_deploy.engines.tensorrt_backend import (
    BUILDER_FLAGS, Profile, Sidecar, build_plan, check_sidecar, missing_for_tensorrt, profile_shapes, read_sidecar,
    sidecar_path, write_sidecar,
)
from twins_deploy.errors import TwinsDeployError, UsageError

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
HAS_CUDA = torch.cuda.is_available()
needs_tensorrt = pytest.mark.skipif(not (HAS_TENSORRT and HAS_CUDA),
                                    reason=missing_for_tensorrt(HAS_TENSORRT, HAS_CUDA) or "")


def test_profile_shapes_cover_the_batch_range_at_the_model_size():
    assert profile_shapes("pixel_values", (224, 320), 1, 8, 32) == Profile(
        "pixel_values", (1, 3, 224, 320), (8, 3, 224, 320), (32, 3, 224, 320))
    assert profile_shapes("x", (224, 224), 4, 4, 4).max == (4, 3, 224, 224)


@pytest.mark.parametrize("batches", [(0, 8, 32), (1, 64, 32), (8, 1, 32), (1, 8, 4)])
def test_profile_rejects_a_range_out_of_order(batches):
    with pytest.raises(UsageError, match="1 <= min <= opt <= max"):
        profile_shapes("pixel_values", (224, 224), *batches)


@pytest.mark.parametrize("precision, flags", [("fp32", ()), ("fp16", ("FP16",)), ("bf16", ("BF16",))])
def test_flags_for_plain_precisions_from_the_fp32_export(precision, flags):
    plan = build_plan(precision, "fp32", compute_capability=(9, 0))
    assert plan.flags == flags and not plan.strongly_typed


@pytest.mark.parametrize("precision, flags", [("int8", ("INT8",)), ("best", ("INT8", "FP16"))])
def test_int8_is_explicit_quantization_from_the_qdq_onnx(precision, flags):
    assert build_plan(precision, "int8").flags == flags
    with pytest.raises(UsageError, match="int8 Q/DQ ONNX"):
        build_plan(precision, "fp32")


def test_plain_precisions_refuse_the_qdq_onnx():
    with pytest.raises(UsageError, match="fp32 export"):
        build_plan("fp16", "int8")


def test_an_fp16_onnx_builds_strongly_typed_without_flags():
    plan = build_plan("fp16", "fp16")
    assert plan.strongly_typed and plan.flags == ()
    with pytest.raises(UsageError, match="already fp16"):
        build_plan("fp32", "fp16")


def test_bf16_needs_ampere_or_newer():
    with pytest.raises(UsageError, match="compute capability 8.0.*7.5"):
        build_plan("bf16", "fp32", compute_capability=(7, 5))
    assert build_plan("bf16", "fp32", compute_capability=(8, 0)).flags == ("BF16",)


def test_unknown_precision_is_a_usage_error():
    with pytest.raises(UsageError, match="fp32, fp16, bf16, int8, best"):
        build_plan("int4")
    assert set(BUILDER_FLAGS) == {"fp32", "fp16", "bf16", "int8", "best"}


def test_missing_says_what_and_how_to_install():
    assert missing_for_tensorrt(True, True) is None
    both = missing_for_tensorrt(False, False)
    assert "TensorRT" in both and "CUDA GPU" in both and "pip install" in both
    assert "CUDA GPU" not in missing_for_tensorrt(False, True)
    assert "'tensorrt' Python package" not in missing_for_tensorrt(True, False)


def _sidecar(**changes) -> Sidecar:
    values = dict(tensorrt_version="10.7.0", gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0",
                  precision="fp16", flags=("FP16",), strongly_typed=False,
                  profile={"input_name": "pixel_values", "min": [1, 3, 224, 224], "opt": [8, 3, 224, 224],
                           "max": [32, 3, 224, 224]},
                  onnx_sha256="ab" * 32, onnx_path="svt-s.onnx", workspace_gb=4.0, metadata={"model": "svt-s"})
    values.update(changes)
    return Sidecar(**values)


def test_sidecar_round_trips_next_to_the_engine(tmp_path):
    engine = tmp_path / "svt-s.fp16.plan"
    path = write_sidecar(engine, _sidecar())
    assert path == sidecar_path(engine) == tmp_path / "svt-s.fp16.plan.json"
    assert read_sidecar(engine) == _sidecar()
    assert json.loads(path.read_text())["schema_version"] == 1
    assert not list(tmp_path.glob(".*tmp*"))  # written through a temporary file, nothing left behind


def test_sidecar_accepts_the_same_tensorrt_and_gpu():
    assert check_sidecar(_sidecar(), "10.7.0", "NVIDIA H100 80GB HBM3", "9.0") == []


def test_sidecar_refuses_another_tensorrt_version():
    with pytest.raises(TwinsDeployError, match=r"built with TensorRT 10\.7\.0 .*this machine has TensorRT 10\.8\.0.*"
                                               r"twins-deploy build --onnx svt-s.onnx --precision fp16"):
        check_sidecar(_sidecar(), "10.8.0", "NVIDIA H100 80GB HBM3", "9.0")


def test_sidecar_refuses_another_gpu_architecture():
    with pytest.raises(TwinsDeployError, match=r"sm 9\.0.*NVIDIA A100.*sm 8\.0"):
        check_sidecar(_sidecar(), "10.7.0", "NVIDIA A100-SXM4-80GB", "8.0")


def test_sidecar_warns_on_another_gpu_of_the_same_architecture():
    (warning,) = check_sidecar(_sidecar(), "10.7.0", "NVIDIA H200", "9.0")
    assert "NVIDIA H100 80GB HBM3" in warning and "NVIDIA H200" in warning


def test_engine_without_or_with_a_broken_sidecar(tmp_path):
    engine = tmp_path / "model.plan"
    with pytest.raises(TwinsDeployError, match="no sidecar model.plan.json.*twins-deploy build"):
        read_sidecar(engine)
    sidecar_path(engine).write_text("{not json")
    with pytest.raises(TwinsDeployError, match="not a twins-deploy engine sidecar"):
        read_sidecar(engine)
    sidecar_path(engine).write_text(json.dumps({**_sidecar().as_dict(), "schema_version": 99}))
    with pytest.raises(TwinsDeployError, match="schema_version 99"):
        read_sidecar(engine)


@pytest.mark.skipif(HAS_TENSORRT and HAS_CUDA, reason="this host can build TensorRT engines")
def test_build_says_what_this_host_lacks(tmp_path):
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"not needed: the check comes first")
    result = CliRunner().invoke(app, ["build", "--onnx", str(onnx), "--precision", "fp16"])
    assert result.exit_code == 2
    message = result.output.strip()
    assert "TensorRT engines need" in message and "pip install 'tensorrt>=10'" in message
    assert ("CUDA GPU" in message) == (not HAS_CUDA) and ("'tensorrt' Python package" in message) == (not HAS_TENSORRT)
    assert not (tmp_path / "model.fp16.plan").exists()


@needs_tensorrt
@pytest.mark.parametrize("precision, cosine", [("fp32", 0.99999), ("fp16", 0.999)])
def test_engine_builds_runs_and_matches_the_golden_logits(tmp_path, precision, cosine):
    from twins_deploy.engines.tensorrt_backend import TensorRTRunner, build_engine
    from twins_deploy.exporters import export_onnx
    from twins_deploy.models import create_model
    from twins_deploy.parity import compare

    model = create_model(tiny_config("tiny-svt"), weights=tiny_weights("tiny-svt"))
    onnx = export_onnx(model, tmp_path / "tiny.onnx").path
    sidecar = build_engine(onnx, tmp_path / f"tiny.{precision}.plan", precision, min_batch=1, opt_batch=2, max_batch=4)
    assert sidecar.profile["max"] == [4, 3, 224, 224]
    data = golden("tiny-svt")
    with TensorRTRunner(tmp_path / f"tiny.{precision}.plan", cuda_graph=True) as runner:
        info = runner.describe()
        assert (info.backend, info.precision, info.max_batch) == ("tensorrt", precision, 4)
        for batch in (2, 1, 2):  # switching batch sizes rebinds the buffers
            logits = runner.infer(data["input_224x224"][:batch])["logits"]
            assert compare(data["logits_224x224"][:batch], logits).cosine >= cosine
        assert runner.last_compute_ms > 0
        with pytest.raises(UsageError, match="maximum 4"):
            runner.infer(np.zeros((5, 3, 224, 224), np.float32))
