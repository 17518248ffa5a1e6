"""``--engine`` to a runner: a file, a row of the engine table, or a precision resolved for this machine.

Engines named by precision or row are built on first use into the cache folder
(``$TWINS_DEPLOY_CACHE`` or ``~/.cache/twins-deploy``), one folder per build fingerprint, then per
model, input size, weights and head, so the second ``bench --engine int8`` starts at once.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from twins_deploy.engines.artifacts import cache_dir
from twins_deploy.engines.base import Runner
from twins_deploy.engines.table import (
    PLAN_SUFFIXES, PRECISIONS, Capabilities, EngineFormat, best_for_precision, detect_capabilities,
    device_for, engine_format, missing, runnable,
)
from twins_deploy.files import CHECKPOINT_SUFFIXES
from twins_deploy.errors import TwinsDeployError, UsageError

CALIBRATION_IMAGES = 32  # synthetic, seeded: what on-the-fly int8 builds calibrate on
FILE_SUFFIXES = (".onnx", ".xml", *PLAN_SUFFIXES, *CHECKPOINT_SUFFIXES)


@dataclass(frozen=True)
class ModelSource:
    """The model a name-resolved engine is made from: what ``--model/--weights/--img-size/--num-classes`` say."""

    model: object  # a registry name, a family's config object or a ModelSpec
    weights: str = "pretrained"
    img_size: object = None
    num_classes: int | None = None
    config: object = None  # constructor arguments replacing the named variant's (a file or a dict)

    @property
    def label(self) -> str:
        return self.model if isinstance(self.model, str) else getattr(self.model, "name", "a custom model")

    def create(self):
        from twins_deploy.models import create_model

        return create_model(self.model, weights=self.weights, img_size=self.img_size, num_classes=self.num_classes,
                            config=self.config)

    def cache_key(self) -> str:
        """Folder name for this model's artifacts: name (and configuration), size, weights identity, head size."""
        from twins_deploy.models import MODELS, resolve_spec, to_size, with_classes
        from twins_deploy.models.weights import sha256_of

        spec = with_classes(resolve_spec(self.model, self.config), self.num_classes)
        name = spec.name.replace("/", "-")
        registered = MODELS.get(spec.name)
        if registered is None or with_classes(registered, spec.config.num_classes).config != spec.config:
            name += "-" + hashlib.sha256(repr(spec.config).encode()).hexdigest()[:10]
        try:
            height, width = to_size(self.img_size or spec.input_size)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        weights = str(self.weights)
        if weights not in ("pretrained", "random"):
            path = Path(weights)
            if not path.is_file():
                raise UsageError(f"checkpoint not found: {path}")
            weights = f"{path.stem}-{sha256_of(path)[:12]}"
        return f"{name}-{height}x{width}-{weights}-{spec.config.num_classes}cls"


@dataclass
class Builds:
    """Makes the artifacts of one model in its cache folder, each once, from the fp32 export."""

    source: ModelSource
    folder: Path
    log: Callable[[str], None]

    def fp32_onnx(self) -> Path:
        from twins_deploy.files import atomic_output
        from twins_deploy.exporters import export_onnx

        path = self.folder / "fp32.onnx"
        if not path.is_file():
            self.log(f"exporting {self.source.label} to ONNX in {self.folder} (first use)")
            with atomic_output(path) as tmp:
                report = export_onnx(self.source.create(), tmp, batch="dynamic")
                if not report.passed:
                    raise TwinsDeployError(f"the ONNX export of {self.source.label} failed its parity check")
        return path

    def int8_onnx(self, target: str) -> Path:
        from twins_deploy.engines.artifacts import onnx_metadata
        from twins_deploy.engines.quantize import quantize_int8, synthetic_images

        path = self.folder / ("int8.onnx" if target == "cpu" else "int8-tensorrt.onnx")
        if not path.is_file():
            fp32 = self.fp32_onnx()
            self.log(f"quantizing to int8 for {target} ({CALIBRATION_IMAGES} synthetic calibration images, seed 0)")
            images = synthetic_images(onnx_metadata(fp32), CALIBRATION_IMAGES, seed=0)
            quantize_int8(fp32, path, images, target=target,
                          calibration_source=f"synthetic, seed 0 ({CALIBRATION_IMAGES} images)")
        return path

    def fp16_onnx(self) -> Path:
        from twins_deploy.engines.quantize import convert_fp16

        path = self.folder / "fp16.onnx"
        if not path.is_file():
            fp32 = self.fp32_onnx()
            self.log(f"converting to fp16 in {self.folder} (first use)")
            convert_fp16(fp32, path)
        return path

    def openvino_ir(self, precision: str) -> Path:
        """An OpenVINO IR (``.xml`` + ``.bin``) of ``precision`` made from the fp32 export."""
        from twins_deploy.engines.artifacts import onnx_metadata
        from twins_deploy.engines.openvino_backend import build_ir
        from twins_deploy.engines.quantize import synthetic_images

        path = self.folder / f"openvino-{precision}.xml"
        if not (path.is_file() and path.with_suffix(".bin").is_file()):
            fp32 = self.fp32_onnx()
            images = described = None
            if precision == "int8":
                described = f"synthetic, seed 0 ({CALIBRATION_IMAGES} images)"
                self.log(f"quantizing to int8 for OpenVINO with NNCF ({described})")
                images = synthetic_images(onnx_metadata(fp32), CALIBRATION_IMAGES, seed=0)
            else:
                self.log(f"converting to an OpenVINO {precision} IR in {self.folder} (first use)")
            build_ir(fp32, path, precision, calibration=images, calibration_source=described or "")
        return path

    def tensorrt_plan(self, precision: str, max_batch: int) -> Path:
        from twins_deploy.engines.tensorrt_backend import QDQ_PRECISIONS, build_engine, gpu_identity, require_tensorrt

        trt = require_tensorrt()
        gpu_name, capability = gpu_identity()
        opt = min(8, max_batch)
        path = self.folder / f"trt-{precision}-b1-{opt}-{max_batch}-trt{trt.__version__}-sm{capability}.plan"
        if not path.is_file():
            onnx = self.int8_onnx("tensorrt") if precision in QDQ_PRECISIONS else self.fp32_onnx()
            self.log(f"building a TensorRT {precision} engine for {gpu_name} (first use, minutes)")
            build_engine(onnx, path, precision, min_batch=1, opt_batch=opt, max_batch=max_batch,
                         timing_cache=self.folder.parent / f"timing-trt{trt.__version__}-sm{capability}.cache")
        return path


def build_fingerprint() -> str:
    """``<version>-<hash of the code that makes artifacts>``: a changed model, exporter or quantizer,
    even within one version (a source checkout), never reuses files an older one built."""
    import twins_deploy
    from twins_deploy import models
    from twins_deploy.engines import openvino_backend, quantize
    from twins_deploy.exporters import onnx as exporter

    digest = hashlib.sha256()
    files = sorted(Path(models.__file__).parent.glob("*.py")) + [Path(exporter.__file__), Path(quantize.__file__),
                                                                Path(openvino_backend.__file__)]
    for path in files:
        digest.update(path.read_bytes())
    return f"{twins_deploy.__version__}-{digest.hexdigest()[:8]}"


def model_folder(source: ModelSource, cache: Path | None = None) -> Path:
    """Where ``source``'s artifacts live: one folder per build fingerprint, then per model."""
    return (cache or cache_dir()) / build_fingerprint() / source.cache_key()


def engine_kind(engine: str) -> str:
    """'file' for a path to an engine file, otherwise 'name' (a table row or a precision)."""
    return "file" if Path(engine).suffix.lower() in FILE_SUFFIXES or Path(engine).is_file() else "name"


def resolve_name(engine: str, caps: Capabilities) -> tuple[EngineFormat, str]:
    """The table row and device for a row name or a precision, on a machine with ``caps``."""
    if engine.lower().strip() in PRECISIONS:
        return best_for_precision(engine.lower().strip(), caps)
    fmt = engine_format(engine)
    device = device_for(fmt, caps)
    if device is None:
        can = ", ".join(f"{f.name} ({d})" for f, d in runnable(caps))
        raise UsageError(f"{missing(fmt, caps)}; this machine can run: {can}")
    return fmt, device


def open_engine(engine: str, source: ModelSource | None = None, *, caps: Capabilities | None = None,
                threads: int | None = None, compile: bool = False, cuda_graph: bool = False, max_batch: int = 32,
                cache: Path | None = None, log: Callable[[str], None] = lambda message: None) -> Runner:
    """A runner (not yet active) for ``--engine``: a file, a table row or a precision."""
    if engine_kind(engine) == "file":
        return _open_file(Path(engine), source, threads=threads, compile=compile, cuda_graph=cuda_graph)
    caps = caps or detect_capabilities()
    fmt, device = resolve_name(engine, caps)
    if source is None:
        raise UsageError(f"--engine {engine} is built from a model: pass --model NAME (and --weights)")
    if fmt.backend == "torch":
        from twins_deploy.engines.torch_backend import TorchRunner

        return TorchRunner(source.create, device=device, precision=fmt.precision, compile=compile, threads=threads,
                           name=fmt.name)
    builds = Builds(source, model_folder(source, cache), log)
    if fmt.backend == "openvino":
        from twins_deploy.engines.openvino_backend import OpenVinoRunner

        return OpenVinoRunner(builds.openvino_ir(fmt.precision), threads=threads, precision=fmt.precision,
                              name=fmt.name)
    if fmt.backend == "onnxruntime":
        from twins_deploy.engines.onnxruntime_backend import OnnxRuntimeRunner

        make = {"fp32": builds.fp32_onnx, "fp16": builds.fp16_onnx, "int8": lambda: builds.int8_onnx("cpu")}
        path = make[fmt.precision]()
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        return OnnxRuntimeRunner(path, providers=providers, threads=threads, name=fmt.name)
    from twins_deploy.engines.tensorrt_backend import TensorRTRunner

    return TensorRTRunner(builds.tensorrt_plan(fmt.precision, max(32, max_batch)), cuda_graph=cuda_graph, name=fmt.name)


def _open_file(path: Path, source: ModelSource | None, *, threads, compile, cuda_graph) -> Runner:
    if not path.is_file():
        raise UsageError(f"engine file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".xml":
        from twins_deploy.engines.openvino_backend import OpenVinoRunner

        return OpenVinoRunner(path, threads=threads)
    if suffix == ".onnx":
        from twins_deploy.engines.onnxruntime_backend import OnnxRuntimeRunner

        return OnnxRuntimeRunner(path, threads=threads)
    if suffix in PLAN_SUFFIXES:
        from twins_deploy.engines.tensorrt_backend import TensorRTRunner

        return TensorRTRunner(path, cuda_graph=cuda_graph)
    if suffix in CHECKPOINT_SUFFIXES:
        import torch

        from twins_deploy.engines.torch_backend import TorchRunner

        model = source.model if source else _guess_model(path)
        checkpoint = ModelSource(model, str(path), source.img_size if source else None,
                                 source.num_classes if source else None, source.config if source else None)
        return TorchRunner(checkpoint.create, device="cuda" if torch.cuda.is_available() else "cpu",
                           compile=compile, threads=threads)
    raise UsageError(f"{path} is not an engine file: use .onnx, .xml (OpenVINO IR), {', '.join(PLAN_SUFFIXES)} or a checkpoint "
                     f"({', '.join(CHECKPOINT_SUFFIXES)})")


def _guess_model(path: Path) -> str:
    from twins_deploy.models.twins import describe_state_dict, guess_variant, read_checkpoint

    try:
        spec = guess_variant(describe_state_dict(read_checkpoint(path)))
    except ValueError:
        spec = None
    if spec is None:
        raise UsageError(f"cannot tell which Twins variant {path.name} holds: pass --model NAME")
    return spec.name
