"""``twins-deploy build``: a TensorRT engine, an int8/fp16 ONNX for onnxruntime or an OpenVINO IR, from the fp32 export."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from twins_deploy.errors import TwinsDeployError, UsageError

BUILD_BACKENDS = ("tensorrt", "onnxruntime", "openvino")
ONNXRUNTIME_PRECISIONS = ("int8", "fp16")
OPENVINO_PRECISIONS = ("fp32", "bf16", "int8")
CALIBRATION_SEED = 0


def default_output(onnx: Path, precision: str, backend: str) -> Path:
    stem = onnx.name[: -len(".onnx")] if onnx.name.endswith(".onnx") else onnx.stem
    suffix = {"onnxruntime": ".onnx", "openvino": ".xml"}.get(backend, ".plan")
    return onnx.with_name(f"{stem}.{precision}{suffix}")


def calibration_set(meta, calib: Path | None, count: int, log: Callable[[str], None]) -> tuple[np.ndarray, str]:
    """Preprocessed images from ``calib`` or, without it, seeded synthetic ones; and a description."""
    from twins_deploy.engines.quantize import folder_images, synthetic_images

    if calib is None:
        described = f"synthetic, seed {CALIBRATION_SEED} ({count} images)"
        return synthetic_images(meta, count, seed=CALIBRATION_SEED), described
    images, skipped = folder_images(calib, meta, count)
    if skipped:
        log(f"calibration skipped {len(skipped)} unreadable file(s), e.g. {skipped[0]}")
    return images, f"{calib} ({len(images)} images)"


def parity_vs_fp32(fp32: Path, candidate: Path, meta, samples: int = 8) -> dict:
    """How close the new ONNX is to the fp32 one on seeded synthetic images (onnxruntime, CPU)."""
    from twins_deploy.engines.onnxruntime_backend import OnnxRuntimeRunner
    from twins_deploy.engines.quantize import synthetic_images
    from twins_deploy.parity import compare

    inputs = synthetic_images(meta, samples, seed=1)
    outputs = []
    for path in (fp32, candidate):
        if path.suffix == ".xml":
            from twins_deploy.engines.openvino_backend import OpenVinoRunner

            runner = OpenVinoRunner(path)
        else:
            runner = OnnxRuntimeRunner(path, providers=["CPUExecutionProvider"])
        with runner:
            outputs.append(runner.infer(inputs)[runner.describe().output_names[0]])
    return compare(*outputs, classify=meta.output == "logits").as_dict()


def build(onnx: Path, precision: str, backend: str = "tensorrt", *, output: Path | None = None,
          calib: Path | None = None, calib_images: int = 32, min_batch: int = 1, opt_batch: int = 8,
          max_batch: int = 32, workspace_gb: float = 4.0, timing_cache: Path | None = None,
          log: Callable[[str], None] = lambda message: None) -> dict:
    """Build one artifact from an fp32 ONNX export; returns a report (paths, settings, parity)."""
    from twins_deploy.engines.artifacts import onnx_metadata
    from twins_deploy.engines.tensorrt_backend import BUILDER_FLAGS, QDQ_PRECISIONS, build_engine, require_tensorrt

    if backend not in BUILD_BACKENDS:
        raise UsageError(f"--backend must be one of {', '.join(BUILD_BACKENDS)}, got {backend!r}")
    if precision not in BUILDER_FLAGS:
        raise UsageError(f"--precision must be one of {', '.join(BUILDER_FLAGS)}, got {precision!r}")
    if backend == "onnxruntime" and precision not in ONNXRUNTIME_PRECISIONS:
        raise UsageError(f"onnxruntime builds {' and '.join(ONNXRUNTIME_PRECISIONS)} ONNX files; "
                         "for fp32 run the export itself")
    if backend == "openvino" and precision not in OPENVINO_PRECISIONS:
        raise UsageError(f"OpenVINO builds {', '.join(OPENVINO_PRECISIONS)} IRs, got {precision!r}")
    if not onnx.is_file():
        raise UsageError(f"ONNX file not found: {onnx}")
    if calib_images < 1:
        raise UsageError("--calib-images must be at least 1")
    if backend == "tensorrt":
        require_tensorrt()  # say what is missing before any long work
    meta = onnx_metadata(onnx)
    output = output or default_output(onnx, precision, backend)
    report = {"schema_version": 1, "backend": backend, "precision": precision, "onnx": str(onnx), "output": str(output)}

    if backend == "openvino":
        from twins_deploy.engines.openvino_backend import build_ir

        images = described = None
        if precision == "int8":
            images, described = calibration_set(meta, calib, calib_images, log)
            log(f"quantizing {onnx.name} to int8 with NNCF for OpenVINO, calibrated on {described}")
        else:
            log(f"converting {onnx.name} to an OpenVINO IR ({precision})")
        report["openvino"] = build_ir(onnx, output, precision, calibration=images, calibration_source=described or "")
        report["parity_vs_fp32"] = parity_vs_fp32(onnx, output, meta)
        report["bytes"] = report["openvino"].pop("bytes")
        return report
    if backend == "onnxruntime":
        from twins_deploy.engines.quantize import convert_fp16, quantize_int8

        if precision == "int8":
            images, described = calibration_set(meta, calib, calib_images, log)
            log(f"quantizing {onnx.name} to int8 (QDQ, per-channel weights) calibrated on {described}")
            report["quantization"] = quantize_int8(onnx, output, images, target="cpu", calibration_source=described)
        else:
            log(f"converting {onnx.name} to fp16 (LayerNormalization and Softmax kept in fp32)")
            report["fp16"] = convert_fp16(onnx, output)
        try:
            report["parity_vs_fp32"] = parity_vs_fp32(onnx, output, meta)
        except TwinsDeployError as exc:  # e.g. an fp16 graph the CPU provider cannot run
            report["parity_vs_fp32"] = f"not measured on this machine: {exc}"
    else:
        source = onnx
        if precision in QDQ_PRECISIONS and meta.extra.get("precision", "fp32") == "fp32":
            from twins_deploy.engines.quantize import quantize_int8

            source = output.with_name(output.name + ".qdq.onnx")
            images, described = calibration_set(meta, calib, calib_images, log)
            log(f"inserting Q/DQ before every MatMul/Gemm (symmetric int8), calibrated on {described}")
            report["quantization"] = quantize_int8(onnx, source, images, target="tensorrt",
                                                   calibration_source=described)
            report["qdq_onnx"] = str(source)
        log(f"building a TensorRT {precision} engine (batch {min_batch}/{opt_batch}/{max_batch}); this takes minutes")
        sidecar = build_engine(source, output, precision, min_batch=min_batch, opt_batch=opt_batch,
                               max_batch=max_batch, workspace_gb=workspace_gb, timing_cache=timing_cache)
        report["engine"] = {k: v for k, v in sidecar.as_dict().items() if k != "metadata"}
    report["bytes"] = output.stat().st_size
    return report
