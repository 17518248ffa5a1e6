"""Reduced-precision ONNX files made from the fp32 export with onnxruntime's own tools.

int8: static quantization in QDQ format (per-channel int8 weights, calibrated activations), for
onnxruntime's CPU kernels ("cpu": uint8 activations, the strided patch and sub-sampling convolutions
quantized too, attention's activation-by-activation MatMuls and the depthwise PEG convolutions left
in fp32) or for TensorRT's explicit quantization ("tensorrt": symmetric int8 everywhere, Q/DQ
before every MatMul and Gemm). TensorRT deprecated its implicit calibrators in 10.1, so its int8
engines are built from this file. fp16: float16 weights and compute with LayerNormalization and
Softmax kept in fp32 and fp32 inputs/outputs, for the CUDA provider.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from twins_deploy.files import atomic_output
from twins_deploy.errors import UsageError
from twins_deploy.memory import check_calibration, check_images
from twins_deploy.metadata import ModelMetadata

INT8_TARGETS = ("cpu", "tensorrt")
FP16_KEEP_FP32 = ("LayerNormalization", "Softmax")


def synthetic_images(meta: ModelMetadata, count: int, seed: int = 0) -> np.ndarray:
    """Seeded smooth colour fields with a little noise, normalised like real images: (count, 3, H, W)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    height, width = meta.input_size
    check_images(count, meta.input_size)
    mean, std = np.asarray(meta.mean, np.float32), np.asarray(meta.std, np.float32)
    images = np.empty((count, 3, height, width), np.float32)
    for i in range(count):
        coarse = rng.integers(0, 256, (int(rng.integers(2, 9)), int(rng.integers(2, 9)), 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.float32) / 255.0
        pixels = np.clip(smooth + rng.normal(0.0, 0.03, smooth.shape), 0.0, 1.0)
        images[i] = ((pixels - mean) / std).transpose(2, 0, 1)
    return images


def folder_images(folder: str | Path, meta: ModelMetadata, count: int) -> tuple[np.ndarray, list[str]]:
    """Up to ``count`` images from ``folder`` (recursive), preprocessed as the model expects; skipped files named."""
    from twins_deploy.preprocess import IMAGE_SUFFIXES, load_image, preprocess
    from twins_deploy.errors import TwinsDeployError

    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    check_images(min(count, len(files)), meta.input_size)
    arrays, skipped = [], []
    for path in files:
        if len(arrays) == count:
            break
        try:
            arrays.append(preprocess(load_image(path), meta))
        except TwinsDeployError:
            skipped.append(str(path))
    if not arrays:
        raise UsageError(f"no readable images in {folder} (looked for {', '.join(IMAGE_SUFFIXES)})")
    return np.stack(arrays), skipped


def _kept_fp32_on_cpu(model) -> list[str]:
    """Nodes the CPU target leaves in fp32, where int8 costs accuracy and buys no speed.

    The MatMuls whose two inputs are both activations (Q@K^T and attention@V: onnxruntime's int8
    kernels for these small batched products are slower than fp32) and the depthwise 3x3 PEG
    convolutions (measured on svt-s: int8 there is slower, and the lowest cosine to fp32 over 64
    synthetic images drops from 0.9973 to 0.9964).
    """
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in model.graph.node
            if (n.op_type == "MatMul" and not any(i in constants for i in n.input))
            or (n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute))]


def _unshare_initializers(model) -> None:
    """Give every node its own copy of the constants it reads.

    Exporters deduplicate equal tensors (all-zero biases of a seeded model, LayerNorm ones); once
    the quantizer turns a Gemm's bias into int32 + DequantizeLinear, a Conv sharing that bias loses
    its constant bias and onnxruntime's fast NCHWc convolution with it (measured: 1.78x -> 1.94x).
    """
    import copy

    initializers = {i.name: i for i in model.graph.initializer}
    claimed = set()
    for node in model.graph.node:
        for slot, name in enumerate(node.input):
            if name not in initializers:
                continue
            if name in claimed:
                duplicate = copy.deepcopy(initializers[name])
                duplicate.name = f"{name}.{node.name or node.output[0]}.{slot}"
                model.graph.initializer.append(duplicate)
                node.input[slot] = duplicate.name
            claimed.add(name)


def _set_props(model, props: dict[str, str]) -> None:
    existing = {p.key: p for p in model.metadata_props}
    for key, value in props.items():
        if key in existing:
            existing[key].value = value
        else:
            model.metadata_props.add(key=key, value=value)


def quantize_int8(fp32_onnx: str | Path, output: str | Path, calibration: np.ndarray, *, target: str = "cpu",
                  calibration_source: str = "synthetic", batch: int = 8) -> dict:
    """Write a QDQ int8 ONNX calibrated on ``calibration`` (N, 3, H, W); returns what was done."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    if target not in INT8_TARGETS:
        raise UsageError(f"int8 target must be one of {', '.join(INT8_TARGETS)}, got {target!r}")
    fp32_onnx, output = Path(fp32_onnx), Path(output)
    model = onnx.load(fp32_onnx)
    props = {p.key: p.value for p in model.metadata_props}
    meta = ModelMetadata.from_props(props, str(fp32_onnx))
    if meta.extra.get("precision", "fp32") != "fp32":
        raise UsageError(f"{fp32_onnx} is already {meta.extra['precision']}: quantize the fp32 export")
    check_calibration(meta, len(calibration), batch)
    (input_name,) = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]

    class Batches(CalibrationDataReader):
        def __init__(self):
            self._chunks = iter(np.array_split(calibration, max(1, -(-len(calibration) // batch))))

        def get_next(self):
            chunk = next(self._chunks, None)
            return None if chunk is None else {input_name: np.ascontiguousarray(chunk, np.float32)}

    cpu = target == "cpu"
    _unshare_initializers(model)
    op_types = ["MatMul", "Gemm", "Conv"] if cpu else ["MatMul", "Gemm"]
    excluded = _kept_fp32_on_cpu(model) if cpu else []
    extra = {"OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"],  # fp32 out: bias and GELU stay exact
             "ActivationSymmetric": not cpu, "WeightSymmetric": True}
    settings = dict(quant_format=QuantFormat.QDQ, per_channel=True, op_types_to_quantize=op_types,
                    activation_type=QuantType.QUInt8 if cpu else QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=excluded, extra_options=extra)
    start = time.perf_counter()
    previous_disable = logging.root.manager.disable  # the command line's own setting (twins_deploy.logs)
    logging.disable(max(previous_disable, logging.WARNING))  # the quantizer logs advice on the root logger at every call
    ort.set_default_logger_severity(3)  # and its calibration sessions warn about every unused initializer
    try:
        with atomic_output(output) as tmp:
            quantize_static(model, tmp, Batches(), **settings)
            quantized = onnx.load(tmp)
            report = {"format": "QDQ", "target": target, "weights": "int8 symmetric, per output channel",
                      "activations": "uint8 asymmetric" if cpu else "int8 symmetric",
                      "op_types": op_types, "kept_fp32": len(excluded),
                      "calibration": calibration_source, "calibration_images": int(len(calibration)),
                      "calibration_method": "minmax", "seconds": round(time.perf_counter() - start, 1)}
            _set_props(quantized, {"precision": "int8", "quantization": json.dumps(report)})
            onnx.save(quantized, tmp)
    finally:
        logging.disable(previous_disable)
    return report


def convert_fp16(fp32_onnx: str | Path, output: str | Path) -> dict:
    """Write an fp16 ONNX (LayerNormalization and Softmax in fp32, fp32 inputs and outputs)."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    fp32_onnx = Path(fp32_onnx)
    model = onnx.load(fp32_onnx)
    meta = ModelMetadata.from_props({p.key: p.value for p in model.metadata_props}, str(fp32_onnx))
    if meta.extra.get("precision", "fp32") != "fp32":
        raise UsageError(f"{fp32_onnx} is already {meta.extra['precision']}: convert the fp32 export")
    converted = convert_float_to_float16(model, keep_io_types=True,
                                         op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FP16_KEEP_FP32])
    report = {"kept_fp32": list(FP16_KEEP_FP32), "io": "float32"}
    _set_props(converted, {"precision": "fp16", "fp16": json.dumps(report)})
    with atomic_output(output) as tmp:
        onnx.save(converted, tmp)
    return report
