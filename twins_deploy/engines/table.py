"""The single table of engines: what ``--engine`` accepts, what each needs, where each runs.

Resolution, on-the-fly builds and bench all read this table (Ultralytics style). A precision name
(``fp16``) picks the best row this machine can run; a row name (``trt-fp16``) or a file picks one.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache

from twins_deploy.errors import UsageError

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "best")
# GPU engines: fastest backend first where several can run a precision (CPU engines: CPU_SPEED_ORDER).
BACKENDS = ("tensorrt", "openvino", "onnxruntime", "torch")
# CPU engines fastest first: what a precision and ``--engine best`` resolve to on a host without a GPU.
# Measured on svt-s, 2 threads (README, "The CPU race"): ov-int8 about 1.1x over ov-bf16, which ran 2.0-2.5x
# over onnxruntime fp32 (onnxruntime int8: 1.8x); OpenVINO f32 1.17x over onnxruntime fp32; torch last.
CPU_SPEED_ORDER = ("ov-int8", "ov-bf16", "onnx-int8", "ov", "onnx", "torch-bf16", "torch")
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
PLAN_SUFFIXES = (".plan", ".engine")


@dataclass(frozen=True)
class EngineFormat:
    name: str
    aliases: tuple[str, ...]
    backend: str
    precision: str
    suffix: str  # the artifact an on-the-fly build writes ("" for torch: the model is built in memory)
    cpu: bool  # worth running on a CPU
    gpu: bool  # runs on a CUDA GPU
    requires: str  # what to install, for messages

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


_OV = "openvino (pip install openvino)"
_TRT = "TensorRT 10+ and a CUDA GPU (pip install 'twins-deploy[gpu]' on a GPU host)"
ENGINES: tuple[EngineFormat, ...] = (
    EngineFormat("torch", ("pytorch", "torch-fp32"), "torch", "fp32", "", True, True, "torch"),
    EngineFormat("torch-fp16", (), "torch", "fp16", "", False, True, "a CUDA build of torch and a GPU"),
    EngineFormat("torch-bf16", (), "torch", "bf16", "", True, True, "torch"),
    EngineFormat("onnx", ("onnxruntime", "ort", "onnx-fp32"), "onnxruntime", "fp32", ".onnx", True, True,
                 "onnxruntime"),
    EngineFormat("onnx-fp16", ("ort-fp16",), "onnxruntime", "fp16", ".fp16.onnx", False, True,
                 "onnxruntime-gpu (CUDA execution provider)"),
    EngineFormat("onnx-int8", ("ort-int8",), "onnxruntime", "int8", ".int8.onnx", True, False, "onnxruntime"),
    EngineFormat("ov", ("openvino", "ov-fp32", "openvino-fp32"), "openvino", "fp32", ".xml", True, False, _OV),
    EngineFormat("ov-bf16", ("openvino-bf16",), "openvino", "bf16", ".xml", True, False, _OV),
    EngineFormat("ov-int8", ("openvino-int8",), "openvino", "int8", ".xml", True, False, _OV + " and nncf"),
    EngineFormat("trt-fp32", ("tensorrt-fp32",), "tensorrt", "fp32", ".plan", False, True, _TRT),
    EngineFormat("trt-fp16", ("tensorrt-fp16",), "tensorrt", "fp16", ".plan", False, True, _TRT),
    EngineFormat("trt-bf16", ("tensorrt-bf16",), "tensorrt", "bf16", ".plan", False, True, _TRT),
    EngineFormat("trt-int8", ("tensorrt-int8",), "tensorrt", "int8", ".plan", False, True, _TRT),
    EngineFormat("trt-best", ("tensorrt-best",), "tensorrt", "best", ".plan", False, True, _TRT),
)
_BY_NAME = {name: fmt for fmt in ENGINES for name in fmt.names}


def engine_format(name: str) -> EngineFormat:
    fmt = _BY_NAME.get(name.lower().strip())
    if fmt is None:
        raise UsageError(f"unknown engine {name!r}: use a file (.onnx, .xml, .plan/.engine, .pt/.pth/.safetensors), "
                         f"a precision ({', '.join(PRECISIONS)}) or one of {', '.join(f.name for f in ENGINES)}")
    return fmt


@dataclass(frozen=True)
class Capabilities:
    """What this machine can run; a plain value so resolution is testable for any machine."""

    cuda: bool
    tensorrt: str | None  # the installed TensorRT version, None when absent
    ort_providers: tuple[str, ...]
    openvino: bool = False  # OpenVINO (and its CPU plugin) installed

    @property
    def ort_gpu(self) -> bool:
        return any(p in self.ort_providers for p in GPU_PROVIDERS)


@lru_cache(maxsize=1)
def detect_capabilities() -> Capabilities:
    import onnxruntime as ort
    import torch

    version = None
    if importlib.util.find_spec("tensorrt") is not None:
        from importlib.metadata import PackageNotFoundError, version as package_version

        for package in ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt_cu12_libs"):
            try:
                version = package_version(package)
                break
            except PackageNotFoundError:
                continue
        version = version or "unknown"
    openvino = importlib.util.find_spec("openvino") is not None
    return Capabilities(torch.cuda.is_available(), version, tuple(ort.get_available_providers()), openvino)


def device_for(fmt: EngineFormat, caps: Capabilities) -> str | None:
    """Where ``fmt`` runs on this machine ("cuda" preferred, then "cpu"), or None when it cannot."""
    if fmt.backend == "tensorrt":
        return "cuda" if caps.cuda and caps.tensorrt else None
    if fmt.backend == "openvino":
        return "cpu" if caps.openvino else None
    gpu_ok = caps.cuda if fmt.backend == "torch" else caps.ort_gpu
    if fmt.gpu and gpu_ok:
        return "cuda"
    return "cpu" if fmt.cpu else None


def missing(fmt: EngineFormat, caps: Capabilities) -> str:
    """Why ``fmt`` cannot run here, in words."""
    if fmt.backend == "tensorrt":
        lacks = [what for what, ok in (("TensorRT", caps.tensorrt), ("a CUDA GPU", caps.cuda)) if not ok]
        return f"{fmt.name} needs {' and '.join(lacks)} (pip install 'twins-deploy[gpu]' on a GPU host)"
    return f"{fmt.name} needs {fmt.requires}"


def runnable(caps: Capabilities) -> list[tuple[EngineFormat, str]]:
    """Every engine this machine can run, with its device."""
    return [(fmt, device) for fmt in ENGINES if (device := device_for(fmt, caps))]


def best_for_precision(precision: str, caps: Capabilities) -> tuple[EngineFormat, str]:
    """The fastest engine for ``precision`` here: GPU before CPU, then TensorRT, OpenVINO, onnxruntime,
    torch. ``best`` on a host without a GPU: the fastest CPU engine installed (``CPU_SPEED_ORDER``)."""
    candidates = [(fmt, device) for fmt, device in runnable(caps) if fmt.precision == precision]
    if precision == "best" and not candidates and not caps.cuda:
        cpu = [(fmt, device) for fmt, device in runnable(caps) if device == "cpu" and fmt.name in CPU_SPEED_ORDER]
        return min(cpu, key=_speed_rank)
    if not candidates:
        can = ", ".join(f"{fmt.name} ({device})" for fmt, device in runnable(caps))
        why = "; ".join(missing(fmt, caps) for fmt in ENGINES if fmt.precision == precision)
        raise UsageError(f"no {precision} engine runs on this machine ({why}); it can run: {can}")
    return min(candidates, key=_speed_rank)


def _speed_rank(candidate: tuple[EngineFormat, str]) -> tuple:
    """GPU engines by backend order, then CPU engines by the measured ``CPU_SPEED_ORDER``."""
    fmt, device = candidate
    if device == "cuda":
        return (0, BACKENDS.index(fmt.backend))
    order = CPU_SPEED_ORDER.index(fmt.name) if fmt.name in CPU_SPEED_ORDER else len(CPU_SPEED_ORDER)
    return (1, order, BACKENDS.index(fmt.backend))


def format_table(caps: Capabilities) -> list[dict]:
    """Rows for people: every engine, its aliases, and whether/where it runs here."""
    return [{"name": fmt.name, "aliases": list(fmt.aliases), "backend": fmt.backend, "precision": fmt.precision,
             "artifact": fmt.suffix or "(in memory)", "cpu": fmt.cpu, "gpu": fmt.gpu, "requires": fmt.requires,
             "runs_here_on": device_for(fmt, caps)} for fmt in ENGINES]
