"""Sessions made one way for the runtime and the engines: onnxruntime for ONNX files, OpenVINO for IRs.

Each library is imported when a session needs it, so a service that runs an OpenVINO IR needs
numpy, pillow and openvino only, and one that runs ONNX numpy, pillow and onnxruntime.
"""
from __future__ import annotations

import functools
import os
import threading
from pathlib import Path

from twins_deploy.errors import TwinsDeployError, UsageError
from twins_deploy.metadata import ModelMetadata

# Fastest first: what ``default_providers`` picks from when the user does not choose.
PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
# Short spellings for people: ``providers=["cuda", "cpu"]``.
PROVIDER_ALIASES = {"tensorrt": "TensorrtExecutionProvider", "trt": "TensorrtExecutionProvider",
                    "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}

Provider = str | tuple[str, dict]  # a name, or (name, provider options) as onnxruntime takes them


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise UsageError("onnxruntime is not installed: pip install onnxruntime (or run an OpenVINO IR, .xml, "
                         "with openvino)") from None
    return onnxruntime


def default_providers() -> list[str]:
    """The installed execution providers, fastest first (CUDA/TensorRT when present, CPU always)."""
    ort = _onnxruntime()
    available = ort.get_available_providers()
    return [p for p in PROVIDER_PREFERENCE if p in available] or available


def resolve_providers(providers: list[Provider] | None) -> list[Provider]:
    """Full provider names (aliases expanded), each checked to be installed; ``None`` means the defaults."""
    if not providers:
        return default_providers()
    available = _onnxruntime().get_available_providers()
    resolved = []
    for provider in providers:
        name, options = provider if isinstance(provider, tuple) else (provider, None)
        name = PROVIDER_ALIASES.get(name.lower(), name)
        if name not in available:
            raise UsageError(f"execution provider {name} is not installed here; available: {', '.join(available)}")
        resolved.append((name, options) if options is not None else name)
    return resolved


def create_session(model: str | Path | bytes, providers: list[Provider] | None = None,
                   threads: int | None = None, spin: bool = True, streams: int = 1):
    """An ``InferenceSession`` with full graph optimisation; ``threads`` caps intra-op threads.
    An OpenVINO IR (a ``.xml`` path) gets an ``OpenVinoSession``, which answers the same calls.

    ``streams``: calls meant to run at once (from as many threads), sharing ``threads``: each onnxruntime
    call gets ``threads // streams`` of them, OpenVINO runs that many streams. On a small CPU, one
    thread per call does more images per second than calls that each spread over every core (svt-s fp32,
    2 vCPUs: 1.1-1.3x), at the cost of each call's latency."""
    if streams < 1:
        raise UsageError(f"streams must be at least 1, got {streams}")
    if isinstance(model, (str, Path)) and Path(model).suffix.lower() == ".xml":
        if providers and any((p[0] if isinstance(p, tuple) else p).lower() not in ("cpu", "openvino")
                             for p in providers):
            raise UsageError(f"{model} is an OpenVINO IR: it runs on OpenVINO's CPU plugin (providers=['cpu'])")
        return OpenVinoSession(model, threads, streams)
    if isinstance(model, (str, Path)) and not Path(model).is_file():
        raise UsageError(f"ONNX file not found: {model}")
    ort = _onnxruntime()
    providers = resolve_providers(providers)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = max(1, (threads or os.cpu_count() or 1) // streams)
    if not spin:  # threads sleep between ops instead of busy-waiting: for cores shared with other processes
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options, providers=providers)
    except Exception as exc:
        name = "the model bytes" if isinstance(model, bytes) else str(model)
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TwinsDeployError(f"onnxruntime cannot load {name} (is it an ONNX file?): {first_line}") from None


def session_metadata(session, source: str = "the model") -> ModelMetadata:
    """The twins-deploy metadata an exported file carries (preprocessing, class names)."""
    return ModelMetadata.from_props(dict(session.get_modelmeta().custom_metadata_map), source)


class _Port:
    """An input or output as onnxruntime describes it: name, shape (a str for a dynamic axis), type."""

    def __init__(self, port):
        self.name = port.get_any_name()
        self.shape = [d.get_length() if d.is_static else "batch" for d in port.get_partial_shape()]
        self.type = {"f32": "tensor(float)", "f16": "tensor(float16)"}.get(port.get_element_type().get_type_name(),
                                                                          str(port.get_element_type()))


@functools.lru_cache(maxsize=None)
def openvino_core():
    """One ``ov.Core`` for the process, as OpenVINO advises: with two made and freed, the next signal the process
    took (a SIGALRM) crashed it in OpenVINO 2026.4."""
    import openvino as ov

    return ov.Core()


class OpenVinoSession:
    """An OpenVINO IR behind the part of onnxruntime's ``InferenceSession`` API the runtime uses.

    Compiled for the CPU with the latency hint, ``streams`` streams, ``threads`` inference threads, and the
    precision the IR was built for (bf16 for ``bf16`` and ``int8`` IRs, f32 otherwise). A dynamic-batch
    IR is compiled once per batch size, on that size's first use (the ``STATIC_MODELS`` latest kept), as
    the engines' runner does: on svt-s int8 a static batch ran 1.5-1.7x faster. Each thread gets its own
    infer request, so one session serves concurrent calls.
    """

    STATIC_MODELS = 8

    def __init__(self, path: str | Path, threads: int | None = None, streams: int = 1):
        try:
            self._core = openvino_core()
        except ImportError:
            raise UsageError("OpenVINO is not installed: pip install openvino (an .xml file is an OpenVINO IR)") from None
        path = Path(path)
        if not path.is_file() or not path.with_suffix(".bin").is_file():
            raise UsageError(f"OpenVINO IR not found: {path} (with {path.with_suffix('.bin').name} beside it)")
        try:
            self._model = self._core.read_model(str(path))
        except Exception as exc:
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise TwinsDeployError(f"OpenVINO cannot read {path}: {first_line}") from None
        model = self._model
        section = model.get_rt_info()["twins_deploy"] if model.has_rt_info(["twins_deploy"]) else {}
        self._props = {key: value.astype(str) for key, value in section.items()}
        precision = "bf16" if self._props.get("precision") in ("bf16", "int8") else "f32"
        self._config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": str(streams),
                        "INFERENCE_PRECISION_HINT": precision,
                        "INFERENCE_NUM_THREADS": str(threads or os.cpu_count() or 1)}
        self._inputs = [_Port(p) for p in model.inputs]
        self._outputs = [_Port(p) for p in model.outputs]
        self._per_batch = model.inputs[0].get_partial_shape()[0].is_dynamic
        self._compiled: dict[int, object] = {}  # batch size (0: the IR as read) -> compiled model, oldest first
        self._lock = threading.Lock()
        self._local = threading.local()
        self._compiled_for(1)  # a model the plugin rejects fails here, not at the first request

    def get_inputs(self) -> list:
        return self._inputs

    def get_outputs(self) -> list:
        return self._outputs

    def get_providers(self) -> list[str]:
        return ["OpenVINO CPU"]

    def get_modelmeta(self):
        return type("ModelMeta", (), {"custom_metadata_map": dict(self._props)})()

    def run(self, output_names, feed: dict) -> list:
        compiled = self._compiled_for(len(next(iter(feed.values()))))
        requests = self._local.__dict__.setdefault("requests", {})
        request = requests.get(id(compiled))
        if request is None or request[0] is not compiled:
            request = requests[id(compiled)] = (compiled, compiled.create_infer_request())
        request[1].infer(feed)
        names = output_names or [o.name for o in self._outputs]
        index = {o.name: i for i, o in enumerate(self._outputs)}
        return [request[1].get_output_tensor(index[name]).data.copy() for name in names]

    def _compiled_for(self, batch: int):
        key = batch if self._per_batch else 0
        with self._lock:
            compiled = self._compiled.get(key)
            if compiled is None:
                model = self._model
                if key:
                    model = model.clone()
                    model.reshape([key, *(d.get_length() for d in model.inputs[0].get_partial_shape()[1:])])
                compiled = self._compiled[key] = self._core.compile_model(model, "CPU", self._config)
                while len(self._compiled) > self.STATIC_MODELS:
                    self._compiled.pop(next(iter(self._compiled)))
            return compiled
