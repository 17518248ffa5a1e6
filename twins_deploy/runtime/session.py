"""onnxruntime sessions made one way for the runtime and the onnxruntime engine."""
from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort

from twins_deploy.errors import TwinsDeployError, UsageError
from twins_deploy.metadata import ModelMetadata

# Fastest first: what ``default_providers`` picks from when the user does not choose.
PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def default_providers() -> list[str]:
    """The installed execution providers, fastest first (CUDA/TensorRT when present, CPU always)."""
    available = ort.get_available_providers()
    return [p for p in PROVIDER_PREFERENCE if p in available] or available


def create_session(model: str | Path | bytes, providers: list[str] | None = None,
                   threads: int | None = None) -> ort.InferenceSession:
    """An ``InferenceSession`` with full graph optimisation; ``threads`` caps intra-op threads."""
    if isinstance(model, (str, Path)) and not Path(model).is_file():
        raise UsageError(f"ONNX file not found: {model}")
    providers = providers or default_providers()
    missing = [p for p in providers if p not in ort.get_available_providers()]
    if missing:
        raise UsageError(f"execution provider {missing[0]} is not installed here; available: "
                         f"{', '.join(ort.get_available_providers())}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options, providers=providers)
    except Exception as exc:
        name = "the model bytes" if isinstance(model, bytes) else str(model)
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TwinsDeployError(f"onnxruntime cannot load {name} (is it an ONNX file?): {first_line}") from None


def session_metadata(session: ort.InferenceSession, source: str = "the model") -> ModelMetadata:
    """The twins-deploy metadata an exported file carries (preprocessing, class names)."""
    return ModelMetadata.from_props(dict(session.get_modelmeta().custom_metadata_map), source)
