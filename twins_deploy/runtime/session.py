"""onnxruntime sessions made one way for the runtime and the onnxruntime engine."""
from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort

from twins_deploy.errors import TwinsDeployError, UsageError
from twins_deploy.metadata import ModelMetadata

# Fastest first: what ``default_providers`` picks from when the user does not choose.
PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
# Short spellings for people: ``providers=["cuda", "cpu"]``.
PROVIDER_ALIASES = {"tensorrt": "TensorrtExecutionProvider", "trt": "TensorrtExecutionProvider",
                    "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}

Provider = str | tuple[str, dict]  # a name, or (name, provider options) as onnxruntime takes them


def default_providers() -> list[str]:
    """The installed execution providers, fastest first (CUDA/TensorRT when present, CPU always)."""
    available = ort.get_available_providers()
    return [p for p in PROVIDER_PREFERENCE if p in available] or available


def resolve_providers(providers: list[Provider] | None) -> list[Provider]:
    """Full provider names (aliases expanded), each checked to be installed; ``None`` means the defaults."""
    if not providers:
        return default_providers()
    available = ort.get_available_providers()
    resolved = []
    for provider in providers:
        name, options = provider if isinstance(provider, tuple) else (provider, None)
        name = PROVIDER_ALIASES.get(name.lower(), name)
        if name not in available:
            raise UsageError(f"execution provider {name} is not installed here; available: {', '.join(available)}")
        resolved.append((name, options) if options is not None else name)
    return resolved


def create_session(model: str | Path | bytes, providers: list[Provider] | None = None,
                   threads: int | None = None) -> ort.InferenceSession:
    """An ``InferenceSession`` with full graph optimisation; ``threads`` caps intra-op threads."""
    if isinstance(model, (str, Path)) and not Path(model).is_file():
        raise UsageError(f"ONNX file not found: {model}")
    providers = resolve_providers(providers)
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
