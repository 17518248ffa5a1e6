"""OpenVINO: IR files (fp32, bf16, int8 through NNCF) built from the fp32 export, and their runner.

An IR is ``model.xml`` + ``model.bin``; our metadata (the same flat key/values an ONNX export keeps in
``metadata_props``) lives in the IR's ``rt_info`` under ``twins_deploy``, so infer, verify, the runtime
and Triton need nothing else. ``bf16`` is an fp32 IR that the runner compiles with
``INFERENCE_PRECISION_HINT=bf16``; ``int8`` is NNCF's post-training quantization (FakeQuantize
nodes) calibrated with the model's own preprocessing. Threads, streams, the performance hint, CPU
pinning and the precision of the parts left unquantized are settings of the runner, reported by
``describe()`` (and so by ``bench``).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from twins_deploy.engines.base import EngineInfo, Runner
from twins_deploy.errors import TwinsDeployError, UsageError
from twins_deploy.metadata import ModelMetadata
from twins_deploy.files import atomic_output
from twins_deploy.runtime.session import openvino_core

RT_KEY = "twins_deploy"  # rt_info section that holds our metadata
IR_PRECISIONS = ("fp32", "bf16", "int8")
IR_SUFFIX = ".xml"
# What the runner asks the CPU plugin for, per IR precision. int8: the ops NNCF leaves unquantized
# (LayerNorm, Softmax, GELU, residual adds) in bf16, as OpenVINO's own default does on a CPU with
# bf16: measured on svt-s it is faster and its cosine to fp32 stays above 0.999 (benchmarks/cpu_race.py).
INFERENCE_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": "bf16"}
PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT")
STATIC_MODELS = 4  # compiled batch sizes a static-batch runner keeps


def require_openvino():
    try:
        import openvino
    except ImportError:
        raise UsageError("OpenVINO is not installed: pip install openvino (and nncf to build int8)") from None
    return openvino


# ---------------------------------------------------------------------------------------------
# IR files: metadata, atomic writes, conversion and quantization


def set_ir_metadata(model, props: dict[str, str]) -> None:
    """Store flat string key/values (``ModelMetadata.to_props()``) in the model's ``rt_info``."""
    for key, value in props.items():
        model.set_rt_info(str(value), [RT_KEY, key])


def ir_props(model) -> dict[str, str]:
    """Our key/values from an ``ov.Model``'s ``rt_info`` (empty when it has none)."""
    if not model.has_rt_info([RT_KEY]):
        return {}
    section = model.get_rt_info()[RT_KEY]
    return {key: value.astype(str) for key, value in section.items()}


def ir_metadata(path: str | Path) -> ModelMetadata:
    """The ``ModelMetadata`` an IR (``.xml`` with its ``.bin``) carries."""
    require_openvino()
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"OpenVINO IR not found: {path}")
    return ModelMetadata.from_props(ir_props(read_model(openvino_core(), path)), str(path))


def read_model(core, path: Path):
    if path.suffix.lower() == IR_SUFFIX and not path.with_suffix(".bin").is_file():
        raise UsageError(f"{path} has no weights file {path.with_suffix('.bin').name} beside it")
    try:
        return core.read_model(str(path))
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TwinsDeployError(f"OpenVINO cannot read {path}: {first}") from None


def save_ir_atomic(model, path: str | Path) -> int:
    """Write ``path`` (.xml) and its .bin atomically, the .bin renamed in first, so a reader never sees an
    .xml without its weights; nothing left on error."""
    ov = require_openvino()
    path = Path(path)
    if path.suffix.lower() != IR_SUFFIX:
        raise UsageError(f"an OpenVINO IR is written to a .xml file, got {path}")
    try:
        with atomic_output(path, companions=(".bin",)) as tmp:
            ov.save_model(model, str(tmp), compress_to_fp16=False)
    except OSError as exc:
        raise TwinsDeployError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path.stat().st_size + path.with_suffix(".bin").stat().st_size


def convert_onnx(onnx: str | Path):
    """An ``ov.Model`` of an fp32 export, with its metadata moved into ``rt_info``; and that metadata."""
    from twins_deploy.engines.artifacts import onnx_metadata

    ov = require_openvino()
    meta = onnx_metadata(onnx)
    if meta.extra.get("precision", "fp32") != "fp32":
        raise UsageError(f"{onnx} is already {meta.extra['precision']}: build OpenVINO IRs from the fp32 export")
    model = ov.convert_model(str(onnx))
    set_ir_metadata(model, meta.to_props())
    return model, meta


def quantize_ir(model, calibration: np.ndarray, *, calibration_source: str, preset: str = "transformer",
                smooth_quant: bool = False, keep_first_last: bool = True, fast_bias_correction: bool = True,
                batch: int = 1) -> tuple[object, dict]:
    """NNCF post-training int8 of an ``ov.Model`` calibrated on ``calibration`` (N, 3, H, W).

    Chosen by measurement on svt-s (timm initialisation, 32 synthetic calibration images, lowest
    cosine to fp32 over 16 others): NNCF's defaults for transformers (mixed preset, SmoothQuant 0.95,
    everything quantized) 0.870; the performance preset (symmetric activations, per-channel
    weights) without SmoothQuant 0.990; the same with the patch embedding that reads the pixels and
    the classifier kept in higher precision 0.9994 at the same speed (SmoothQuant on top: 0.9993 and
    slower). Fast bias correction, as NNCF's default.
    """
    try:
        import nncf
    except ImportError:
        raise UsageError("int8 OpenVINO IRs are built with NNCF: pip install nncf") from None
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    chunks = [np.ascontiguousarray(calibration[i:i + batch], np.float32) for i in range(0, len(calibration), batch)]
    ignored = ignored_names(model) if keep_first_last else []
    advanced = AdvancedQuantizationParameters(
        smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=0.95 if smooth_quant else -1))
    start = time.perf_counter()
    nncf_logger = logging.getLogger("nncf")
    level = nncf_logger.level
    nncf_logger.setLevel(logging.ERROR)
    try:  # NNCF draws progress bars on stdout: send them to stderr, stdout may carry --json
        with contextlib.redirect_stdout(sys.stderr):
            quantized = nncf.quantize(
                model, nncf.Dataset(chunks), subset_size=len(calibration),
                model_type=nncf.ModelType.TRANSFORMER if preset == "transformer" else None,
                preset=nncf.QuantizationPreset.PERFORMANCE, fast_bias_correction=fast_bias_correction,
                ignored_scope=nncf.IgnoredScope(names=ignored) if ignored else None, advanced_parameters=advanced)
    finally:
        nncf_logger.setLevel(level)
    fake_quantize = sum(op.get_type_name() == "FakeQuantize" for op in quantized.get_ops())
    lifted = lift_quantized_layer_norms(quantized)
    sunk = sink_attention_output_quantizers(quantized)
    report = {"quantizer": f"nncf {nncf.__version__}", "model_type": preset,
              "layer_norms_on_3d_view": lifted, "attention_quantizers_after_transpose": sunk,
              "preset": "performance (symmetric int8 activations, per-channel int8 weights)",
              "smooth_quant": smooth_quant, "fast_bias_correction": fast_bias_correction,
              "kept_in_higher_precision": ignored, "fake_quantize_nodes": fake_quantize,
              "calibration": calibration_source, "calibration_images": int(len(calibration)),
              "seconds": round(time.perf_counter() - start, 1)}
    return quantized, report


def lift_quantized_layer_norms(model) -> int:
    """Run each LayerNorm whose output NNCF quantizes on a free (1, tokens, C) view of its (tokens, C) input.

    OpenVINO's CPU plugin fuses a FakeQuantize into an MVN only when the MVN is not "across channels",
    which a 2-D MVN always is; so every LayerNorm before a quantized Linear ran as MVN (bf16), a Reorder
    and a FakeQuantize (f32) on its own: 14% of svt-s int8 at batch 1 (``PERF_COUNT``). On the 3-D view
    the scale, shift and quantizer fuse into the MVN; a Reshape after the quantizer restores (tokens, C).
    The arithmetic is the same; svt-s ran 1.10x faster at batch 1 and 8, pcpvt-s 1.15x and 1.13x
    (interleaved A/B, benchmarks/cpu_race.py). Returns how many LayerNorms were lifted.
    """
    from openvino import opset13 as ops

    lifted = 0
    for mvn in [op for op in model.get_ordered_ops() if op.get_type_name() == "MVN"]:
        source = mvn.input_value(0)
        shape = source.get_partial_shape()
        axes = mvn.input_value(1).get_node()
        if shape.rank.is_dynamic or shape.rank.get_length() != 2 or shape[1].is_dynamic or \
                axes.get_type_name() != "Constant" or axes.get_vector().tolist() not in ([1], [-1]):
            continue
        tail = mvn.output(0)  # walk the LayerNorm's scale and shift to the quantizer that ends it
        while len(targets := list(tail.get_target_inputs())) == 1 and \
                targets[0].get_node().get_type_name() in ("Multiply", "Add", "FakeQuantize") and \
                tail.get_node().get_type_name() != "FakeQuantize":
            tail = targets[0].get_node().output(0)
        if tail.get_node().get_type_name() != "FakeQuantize":
            continue
        channels = shape[1].get_length()
        restored = ops.reshape(tail, ops.constant(np.array([-1, channels], np.int64)), special_zero=False)
        for target in targets:
            target.replace_source_output(restored.output(0))
        view = ops.reshape(source, ops.constant(np.array([1, -1, channels], np.int64)), special_zero=False)
        mvn.input(0).replace_source_output(view.output(0))
        mvn.input(1).replace_source_output(ops.constant(np.array([2], np.int64)).output(0))
        lifted += 1
    model.validate_nodes_and_infer_types()
    return lifted


def sink_attention_output_quantizers(model) -> int:
    """Move the quantizer of each attention output below the Reshapes and Transposes that merge its heads.

    NNCF puts the quantizer of the projection's input right after the attention, above the head-merging
    Transpose; OpenVINO's CPU plugin then fuses it into the attention kernel and runs that Transpose on
    int8, which has no fast kernel here: 5x the time of the same Transpose on bf16 (svt-s stage 1, LSA:
    0.107 against 0.019 ms, ``PERF_COUNT``). Below the Transposes the quantizer runs as its own small
    element-wise kernel. A per-tensor quantizer commutes with any Reshape or Transpose, so the arithmetic
    is the same. svt-s int8 ran 1.03x faster at batch 1 and 1.04x at batch 8 (interleaved A/B, 10
    rounds); pcpvt-s, whose stage-1 attention has one head, the same. Returns how many were moved.
    """
    moved = 0
    for quantizer in [op for op in model.get_ordered_ops() if op.get_type_name() == "FakeQuantize"]:
        source = quantizer.input_value(0)
        attention = source.get_node()
        if attention.get_type_name() != "ScaledDotProductAttention" and not (
                attention.get_type_name() == "MatMul"
                and all(v.get_node().get_type_name() != "Constant" for v in attention.input_values())):
            continue
        ranges = [quantizer.input_value(i).get_node() for i in range(1, 5)]
        if any(r.get_type_name() != "Constant" or r.get_vector().size != 1 for r in ranges):
            continue  # per-channel ranges do not commute with a Transpose
        chain, tail = [], quantizer.output(0)
        while len(targets := list(tail.get_target_inputs())) == 1 and \
                targets[0].get_node().get_type_name() in ("Reshape", "Transpose"):
            chain.append(targets[0].get_node())
            tail = chain[-1].output(0)
        if not any(op.get_type_name() == "Transpose" for op in chain):
            continue
        consumers = list(tail.get_target_inputs())
        chain[0].input(0).replace_source_output(source)
        quantizer.input(0).replace_source_output(tail)
        for consumer in consumers:
            consumer.replace_source_output(quantizer.output(0))
        moved += 1
    model.validate_nodes_and_infer_types()
    return moved


def ignored_names(model) -> list[str]:
    """The first and last layers of an ``ov.Model``: the convolution that reads the pixels (the
    4x4 patch embedding, 3 input channels) and the classifier MatMul that writes the output."""
    first = [op.get_friendly_name() for op in model.get_ordered_ops()
             if op.get_type_name() == "Convolution" and op.input(0).get_partial_shape()[1] == 3]
    result = model.outputs[0].get_node().input_value(0).get_node()
    last = []
    for _ in range(4):  # Result <- Add(bias) <- MatMul: walk back to the classifier's MatMul
        if result.get_type_name() == "MatMul":
            last = [result.get_friendly_name()]
            break
        if result.get_input_size() == 0:
            break
        result = result.input_value(0).get_node()
    return first + last


def build_ir(onnx: str | Path, output: str | Path, precision: str, *, calibration: np.ndarray | None = None,
             calibration_source: str = "", **quantize_options) -> dict:
    """Write an IR of ``precision`` from an fp32 ONNX export; returns what was done."""
    if precision not in IR_PRECISIONS:
        raise UsageError(f"OpenVINO IRs are {', '.join(IR_PRECISIONS)}, got {precision!r}")
    model, meta = convert_onnx(onnx)
    report: dict = {"format": "OpenVINO IR", "inference_precision": INFERENCE_PRECISION[precision]}
    if precision == "int8":
        if calibration is None:
            raise UsageError("int8 needs calibration images")
        model, report["quantization"] = quantize_ir(model, calibration, calibration_source=calibration_source,
                                                    **quantize_options)
    extra = {"precision": precision, "openvino": json.dumps(report)}
    set_ir_metadata(model, extra)
    report["bytes"] = save_ir_atomic(model, output)
    return report


# ---------------------------------------------------------------------------------------------
# Runner


class OpenVinoRunner(Runner):
    """An IR (or an ONNX export) compiled for OpenVINO's CPU plugin.

    ``threads``: ``INFERENCE_NUM_THREADS`` (default: all cores); ``streams``: ``NUM_STREAMS`` (1: one
    request at a time uses every thread, the lowest latency); ``hint``: ``PERFORMANCE_HINT``;
    ``pinning``: ``ENABLE_CPU_PINNING``; ``inference_precision``: ``INFERENCE_PRECISION_HINT`` for
    what is not int8 (default per precision, see ``INFERENCE_PRECISION``); ``static_batch``: compile
    one model per batch size on its first use (``model.reshape``; the last ``STATIC_MODELS`` kept)
    instead of one with a dynamic batch. Static is the default: on svt-s int8 it ran 1.7x (batch 1)
    and 1.5x (batch 8) faster than the same IR compiled with a dynamic batch (one interleaved A/B, 2 threads).
    ``split_batch``: with one stream and a static batch, a batch that divides evenly among the threads runs
    as that many equal parts at once, one stream of one thread each (the same numbers, bit for bit): every
    thread runs whole layers instead of all threads meeting after each of some 300 small ones. svt-s int8 at
    batch 8 ran 1.06x faster as two streams of 4 than as one request on 2 threads, pcpvt-s 1.03x (interleaved
    A/B, 8-10 rounds).
    """

    def __init__(self, path: str | Path, *, threads: int | None = None, streams: int = 1, hint: str = "LATENCY",
                 pinning: bool | None = None, inference_precision: str | None = None, precision: str | None = None,
                 static_batch: bool = True, split_batch: bool = True, name: str | None = None):
        super().__init__()
        if hint not in PERFORMANCE_HINTS:
            raise UsageError(f"performance hint must be one of {', '.join(PERFORMANCE_HINTS)}, got {hint!r}")
        self.path, self.threads, self.streams, self.hint = Path(path), threads, streams, hint
        self.pinning, self.inference_precision, self.static_batch = pinning, inference_precision, static_batch
        self.split_batch = split_batch
        self._precision, self._name = precision, name

    def _activate(self) -> None:
        ov = require_openvino()
        if not self.path.is_file():
            raise UsageError(f"engine file not found: {self.path}")
        self._core = openvino_core()
        self._model = read_model(self._core, self.path)
        if self.path.suffix.lower() == ".onnx":
            from twins_deploy.engines.artifacts import onnx_metadata

            metadata = onnx_metadata(self.path)
        else:
            metadata = ModelMetadata.from_props(ir_props(self._model), str(self.path))
        stored = metadata.extra.get("precision", "fp32")
        precision = self._precision or stored
        if stored == "int8" and precision != "int8":
            raise UsageError(f"{self.path} is an int8 IR; run it as int8")
        self._threads = self.threads or os.cpu_count() or 1
        self._config = {"PERFORMANCE_HINT": self.hint, "NUM_STREAMS": str(self.streams),
                        "INFERENCE_NUM_THREADS": str(self._threads),
                        "INFERENCE_PRECISION_HINT": self.inference_precision or INFERENCE_PRECISION[precision]}
        if self.pinning is not None:
            self._config["ENABLE_CPU_PINNING"] = "YES" if self.pinning else "NO"
        self._compiled: dict[int, tuple] = {}
        inp = self._model.inputs[0]
        self._input = inp.get_any_name()
        self._outputs = tuple(o.get_any_name() for o in self._model.outputs)
        shape = inp.get_partial_shape()
        dims = tuple(-1 if d.is_dynamic else d.get_length() for d in shape)
        self._fixed = None if dims[0] == -1 else dims[0]
        if not self.static_batch or self._fixed:
            self._compiled[0] = self._compile(self._model)
        else:
            self._requests(1)  # compile batch 1 now: a model the plugin rejects fails here, not at the first infer
        compiled = next(iter(self._compiled.values()))
        self._info = EngineInfo(
            name=self._name or ("ov" if precision == "fp32" else f"ov-{precision}"), backend="openvino",
            device="cpu", precision=precision, input_name=self._input, input_shape=(dims[0], *dims[1:]),
            output_names=self._outputs, metadata=metadata, artifact=str(self.path),
            max_batch=self._fixed, details=self._details(ov, compiled[0]))

    def _compile(self, model, parts: int = 1) -> tuple:
        """The compiled model and one infer request per part (``parts`` streams of one thread each)."""
        config = self._config if parts == 1 else {**self._config, "PERFORMANCE_HINT": "THROUGHPUT",
                                                  "NUM_STREAMS": str(parts), "INFERENCE_NUM_THREADS": str(parts)}
        try:
            compiled = self._core.compile_model(model, "CPU", config)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise TwinsDeployError(f"OpenVINO cannot compile {self.path}: {first}") from None
        return compiled, [compiled.create_infer_request() for _ in range(parts)]

    def _details(self, ov, compiled) -> dict:
        actual = {}
        for key in ("INFERENCE_NUM_THREADS", "NUM_STREAMS", "PERFORMANCE_HINT", "INFERENCE_PRECISION_HINT",
                    "ENABLE_CPU_PINNING", "ENABLE_HYPER_THREADING"):
            try:
                value = compiled.get_property(key)
                actual[key] = value.get_type_name() if hasattr(value, "get_type_name") else str(value)
            except Exception:  # a property this OpenVINO version does not report
                continue
        return {"openvino": ov.__version__, "device": "CPU", "static_batch": self.static_batch,
                "split_batch": self._split_parts(self._threads) > 1, "settings": actual}

    def _deactivate(self) -> None:
        self._compiled.clear()
        del self._model, self._core

    def _split_parts(self, batch: int) -> int:
        """How many equal parts a batch runs as: one per thread where ``split_batch`` applies, else 1."""
        usable = self.split_batch and self.static_batch and not self._fixed and self.streams == 1
        return self._threads if usable and self._threads > 1 and batch % self._threads == 0 else 1

    def _requests(self, batch: int) -> list:
        parts = self._split_parts(batch)
        key = (batch, parts) if self.static_batch and not self._fixed else 0
        if key not in self._compiled:
            while len(self._compiled) >= STATIC_MODELS:  # forget the oldest batch size
                del self._compiled[next(iter(self._compiled))]
            model = self._model.clone()
            shape = list(self._model.inputs[0].get_partial_shape())
            shape[0] = batch // parts
            model.reshape({self._input: shape})
            self._compiled[key] = self._compile(model, parts)
        return self._compiled[key][1]

    def _infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        if self._fixed is not None and len(batch) != self._fixed:
            raise UsageError(f"{self.path} takes batches of exactly {self._fixed}, got {len(batch)}")
        requests = self._requests(len(batch))
        if len(requests) == 1:
            requests[0].infer({0: batch}, share_inputs=True)
        else:
            parts = [np.ascontiguousarray(part) for part in np.split(batch, len(requests))]  # alive until waited on
            for request, part in zip(requests, parts):
                request.start_async({0: part}, share_inputs=True)
            for request in requests:
                request.wait()
        return {name: np.concatenate([r.get_output_tensor(i).data for r in requests]).astype(np.float32, copy=False)
                for i, name in enumerate(self._outputs)}  # one copy out of OpenVINO's buffers, split or not

    def _describe(self) -> EngineInfo:
        return self._info
