"""TensorRT engines: build from ONNX with a batch profile, run with the TensorRT 10 tensor-name API.

Everything that decides something (profile shapes, builder flags per precision, the sidecar and its
compatibility check, what is missing on this host) is plain Python, tested everywhere. The calls
into ``tensorrt`` are thin and imported lazily; CUDA memory, streams and events come from torch.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from twins_deploy.engines.artifacts import onnx_metadata
from twins_deploy.files import atomic_output
from twins_deploy.engines.base import EngineInfo, Runner
from twins_deploy.errors import TwinsDeployError, UsageError
from twins_deploy.metadata import ModelMetadata

SIDECAR_SCHEMA = 1
# Builder flags per precision. int8 is explicit quantization: the ONNX carries Q/DQ, and layers
# outside them stay fp32; "best" also lets those layers run in fp16.
BUILDER_FLAGS = {"fp32": (), "fp16": ("FP16",), "bf16": ("BF16",), "int8": ("INT8",), "best": ("INT8", "FP16")}
QDQ_PRECISIONS = ("int8", "best")  # built from the Q/DQ ONNX (quantize_int8(target="tensorrt"))
INSTALL_HINT = "pip install 'tensorrt>=10' (or 'twins-deploy[gpu]') on a machine with an NVIDIA GPU and driver"


@dataclass(frozen=True)
class Profile:
    """One optimisation profile: the input's (B, 3, H, W) at its smallest, typical and largest batch."""

    input_name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


def profile_shapes(input_name: str, input_size: tuple[int, int], min_batch: int = 1, opt_batch: int = 8,
                   max_batch: int = 32) -> Profile:
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise UsageError(f"batch range must satisfy 1 <= min <= opt <= max, got {min_batch}, {opt_batch}, {max_batch}")
    height, width = input_size
    return Profile(input_name, *((b, 3, height, width) for b in (min_batch, opt_batch, max_batch)))


@dataclass(frozen=True)
class BuildPlan:
    flags: tuple[str, ...]  # names of tensorrt.BuilderFlag members
    strongly_typed: bool  # types come from the ONNX itself; no precision flags allowed then


def build_plan(precision: str, onnx_precision: str = "fp32",
               compute_capability: tuple[int, int] | None = None) -> BuildPlan:
    """Builder flags for ``precision`` from an ONNX holding ``onnx_precision``, checked against the GPU."""
    if precision not in BUILDER_FLAGS:
        raise UsageError(f"TensorRT precision must be one of {', '.join(BUILDER_FLAGS)}, got {precision!r}")
    if onnx_precision in ("fp16", "bf16"):
        if precision != onnx_precision:
            raise UsageError(f"the ONNX is already {onnx_precision}: build it as --precision {onnx_precision}, "
                             "or build other precisions from the fp32 export")
        return BuildPlan((), strongly_typed=True)
    if (precision in QDQ_PRECISIONS) != (onnx_precision == "int8"):
        need = ("the int8 Q/DQ ONNX ('twins-deploy build' makes it from the fp32 export)"
                if precision in QDQ_PRECISIONS else "the fp32 export")
        raise UsageError(f"a TensorRT {precision} engine is built from {need}, not from an {onnx_precision} ONNX")
    if "BF16" in BUILDER_FLAGS[precision] and compute_capability and compute_capability < (8, 0):
        major, minor = compute_capability
        raise UsageError(f"bf16 needs compute capability 8.0 or newer (Ampere); this GPU is {major}.{minor}: use fp16")
    return BuildPlan(BUILDER_FLAGS[precision], strongly_typed=False)


def missing_for_tensorrt(has_tensorrt: bool, has_cuda: bool) -> str | None:
    """What this host lacks to build or run TensorRT engines, as one actionable sentence."""
    lacks = [what for what, ok in (("TensorRT (the 'tensorrt' Python package)", has_tensorrt),
                                   ("a CUDA GPU visible to torch", has_cuda)) if not ok]
    if not lacks:
        return None
    return f"TensorRT engines need {' and '.join(lacks)}, which this machine lacks: {INSTALL_HINT}"


def require_tensorrt():
    """The ``tensorrt`` module, or a UsageError that names what is missing and what to install."""
    import importlib.util

    import torch

    problem = missing_for_tensorrt(importlib.util.find_spec("tensorrt") is not None, torch.cuda.is_available())
    if problem:
        raise UsageError(problem)
    import tensorrt as trt

    if int(trt.__version__.split(".")[0]) < 10:
        raise UsageError(f"TensorRT {trt.__version__} is too old: the tensor-name API needs TensorRT 10 or newer "
                         f"({INSTALL_HINT})")
    return trt


# ---------------------------------------------------------------------------------------------
# The sidecar: what an engine was built with and for, next to it as ENGINE.json


@dataclass(frozen=True)
class Sidecar:
    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "9.0"
    precision: str
    flags: tuple[str, ...]
    strongly_typed: bool
    profile: dict  # {"input_name", "min", "opt", "max"}
    onnx_sha256: str
    onnx_path: str
    workspace_gb: float
    metadata: dict[str, str]  # the ONNX's twins-deploy metadata, so infer can preprocess for the engine
    build_seconds: float = 0.0
    schema_version: int = SIDECAR_SCHEMA
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def sidecar_path(engine: str | Path) -> Path:
    engine = Path(engine)
    return engine.with_name(engine.name + ".json")


def write_sidecar(engine: str | Path, sidecar: Sidecar) -> Path:
    path = sidecar_path(engine)
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(sidecar.as_dict(), indent=2))
    return path


def read_sidecar(engine: str | Path) -> Sidecar:
    path = sidecar_path(engine)
    if not path.is_file():
        raise TwinsDeployError(f"{engine} has no sidecar {path.name}: build engines with 'twins-deploy build' "
                               "(it records the TensorRT version, GPU, profile and preprocessing)")
    try:
        data = json.loads(path.read_text())
        data["flags"] = tuple(data["flags"])
        if data.get("schema_version") != SIDECAR_SCHEMA:
            raise ValueError(f"schema_version {data.get('schema_version')} (expected {SIDECAR_SCHEMA})")
        return Sidecar(**data)
    except (ValueError, TypeError, KeyError) as exc:
        raise TwinsDeployError(f"{path} is not a twins-deploy engine sidecar: {exc}") from None


def check_sidecar(sidecar: Sidecar, tensorrt_version: str, gpu_name: str, compute_capability: str,
                  engine: str = "the engine") -> list[str]:
    """Refuse an engine another TensorRT version or GPU architecture made; warn on another GPU model."""
    built = f"TensorRT {sidecar.tensorrt_version} on {sidecar.gpu_name} (sm {sidecar.compute_capability})"
    here = f"TensorRT {tensorrt_version} and {gpu_name} (sm {compute_capability})"
    rebuild = f"rebuild it here: twins-deploy build --onnx {sidecar.onnx_path} --precision {sidecar.precision}"
    if sidecar.tensorrt_version != tensorrt_version or sidecar.compute_capability != compute_capability:
        raise TwinsDeployError(f"{engine} was built with {built}; this machine has {here}: engines are tied to "
                               f"both, {rebuild}")
    if sidecar.gpu_name != gpu_name:
        return [f"{engine} was built on {sidecar.gpu_name}, this GPU is {gpu_name} (same architecture): it runs, "
                f"but its kernels were tuned for the other GPU; {rebuild}"]
    return []


def gpu_identity() -> tuple[str, str]:
    """This GPU's name and compute capability ("9.0"), as the sidecar records them."""
    import torch

    major, minor = torch.cuda.get_device_capability()
    return torch.cuda.get_device_name(), f"{major}.{minor}"


# ---------------------------------------------------------------------------------------------
# Build


def build_engine(onnx_path: str | Path, output: str | Path, precision: str, *, min_batch: int = 1, opt_batch: int = 8,
                 max_batch: int = 32, workspace_gb: float = 4.0, timing_cache: str | Path | None = None) -> Sidecar:
    """Serialize a TensorRT engine for ``onnx_path`` with one batch profile; writes ENGINE and ENGINE.json."""
    from twins_deploy.models.weights import sha256_of

    trt = require_tensorrt()
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise UsageError(f"ONNX file not found: {onnx_path}")
    metadata = onnx_metadata(onnx_path)
    gpu_name, capability = gpu_identity()
    plan = build_plan(precision, metadata.extra.get("precision", "fp32"),
                      tuple(int(v) for v in capability.split(".")))
    profile = profile_shapes("pixel_values", metadata.input_size, min_batch, opt_batch, max_batch)
    start = time.perf_counter()

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network_flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if plan.strongly_typed else 0
    network = builder.create_network(network_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TwinsDeployError(f"TensorRT cannot parse {onnx_path}: {errors}")
    input_name = network.get_input(0).name
    profile = Profile(input_name, profile.min, profile.opt, profile.max)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    for flag in plan.flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    optimization_profile = builder.create_optimization_profile()
    optimization_profile.set_shape(input_name, profile.min, profile.opt, profile.max)
    config.add_optimization_profile(optimization_profile)
    cache_bytes = Path(timing_cache).read_bytes() if timing_cache and Path(timing_cache).is_file() else b""
    config.set_timing_cache(config.create_timing_cache(cache_bytes), False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TwinsDeployError(f"TensorRT could not build a {precision} engine from {onnx_path} (see its log above)")
    with atomic_output(output) as tmp:
        tmp.write_bytes(memoryview(serialized))
    if timing_cache:
        with atomic_output(timing_cache) as tmp:
            tmp.write_bytes(memoryview(config.get_timing_cache().serialize()))
    sidecar = Sidecar(
        tensorrt_version=trt.__version__, gpu_name=gpu_name, compute_capability=capability, precision=precision,
        flags=plan.flags, strongly_typed=plan.strongly_typed,
        profile={"input_name": input_name, "min": list(profile.min), "opt": list(profile.opt),
                 "max": list(profile.max)},
        onnx_sha256=sha256_of(onnx_path), onnx_path=str(onnx_path), workspace_gb=workspace_gb,
        metadata=metadata.to_props(), build_seconds=round(time.perf_counter() - start, 1))
    write_sidecar(output, sidecar)
    return sidecar


# ---------------------------------------------------------------------------------------------
# Run


class TensorRTRunner(Runner):
    """A deserialized engine run with ``execute_async_v3`` on its own CUDA stream.

    Device buffers are torch tensors reused per batch size; with ``cuda_graph`` each batch size's
    enqueue is captured once and replayed, which removes the per-launch CPU overhead.
    """

    def __init__(self, path: str | Path, *, cuda_graph: bool = False, name: str | None = None):
        super().__init__()
        self.path, self.cuda_graph, self._name = Path(path), cuda_graph, name
        self.warnings: list[str] = []

    def _activate(self) -> None:
        import torch

        trt = require_tensorrt()
        if not self.path.is_file():
            raise UsageError(f"engine file not found: {self.path}")
        sidecar = read_sidecar(self.path)
        gpu_name, capability = gpu_identity()
        self.warnings = check_sidecar(sidecar, trt.__version__, gpu_name, capability, str(self.path))
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self._engine is None:
            raise TwinsDeployError(f"TensorRT {trt.__version__} cannot load {self.path}: it was made by another "
                                   "TensorRT version or GPU, or is not an engine; rebuild it with 'twins-deploy build'")
        self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._input = inputs[0]
        self._outputs = tuple(n for n in names if n not in inputs)
        self._dtypes = {n: torch.from_numpy(np.empty(0, trt.nptype(self._engine.get_tensor_dtype(n)))).dtype
                        for n in names}
        self._stream = torch.cuda.Stream()
        self._buffers: dict[int, tuple] = {}  # batch -> (input tensor, {name: output tensor}, graph or None)
        low, _, high = self._engine.get_tensor_profile_shape(self._input, 0)
        self._info = EngineInfo(
            name=self._name or f"trt-{sidecar.precision}", backend="tensorrt", device="cuda",
            precision=sidecar.precision, input_name=self._input, input_shape=(-1, *tuple(high)[1:]),
            output_names=self._outputs, metadata=ModelMetadata.from_props(sidecar.metadata, str(self.path)),
            artifact=str(self.path), max_batch=int(high[0]),
            details={"tensorrt": trt.__version__, "gpu": gpu_name, "profile": sidecar.profile,
                     "min_batch": int(low[0]), "cuda_graph": self.cuda_graph})

    def _deactivate(self) -> None:
        self._buffers.clear()
        del self._context, self._engine, self._runtime

    def _bind(self, batch: int) -> tuple:
        """Buffers (and a captured CUDA graph) for one batch size, made on first use."""
        import torch

        if batch in self._buffers:
            return self._buffers[batch]
        self._context.set_input_shape(self._input, (batch, *self._info.input_shape[1:]))
        inp = torch.empty((batch, *self._info.input_shape[1:]), dtype=self._dtypes[self._input], device="cuda")
        outs = {n: torch.empty(tuple(self._context.get_tensor_shape(n)), dtype=self._dtypes[n], device="cuda")
                for n in self._outputs}
        for name, tensor in ((self._input, inp), *outs.items()):
            self._context.set_tensor_address(name, tensor.data_ptr())
        graph = None
        if self.cuda_graph:
            self._enqueue()  # TensorRT does its lazy set-up outside the capture
            self._stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self._stream):
                self._enqueue()
        self._buffers[batch] = (inp, outs, graph)
        return self._buffers[batch]

    def _enqueue(self) -> None:
        if not self._context.execute_async_v3(self._stream.cuda_stream):
            raise TwinsDeployError(f"TensorRT failed to run {self.path}")

    def _infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        inp, outs, graph = self._bind(batch.shape[0])
        if len(self._buffers) > 1:  # addresses are per context: point them at this batch size's buffers
            self._context.set_input_shape(self._input, tuple(inp.shape))
            for name, tensor in ((self._input, inp), *outs.items()):
                self._context.set_tensor_address(name, tensor.data_ptr())
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self._stream):
            inp.copy_(torch.from_numpy(batch), non_blocking=False)
            start.record(self._stream)
            graph.replay() if graph is not None else self._enqueue()
            end.record(self._stream)
            arrays = {name: t.float().cpu().numpy() for name, t in outs.items()}
        self.last_compute_ms = start.elapsed_time(end)
        return arrays

    def _describe(self) -> EngineInfo:
        return self._info
