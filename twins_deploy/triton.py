"""A Triton Inference Server model repository for an exported model, checked before it is written.

``NAME/config.pbtxt``, ``NAME/1/model.onnx`` (ONNX Runtime backend), ``NAME/1/model.plan``
(TensorRT backend) or ``NAME/1/model.xml`` + ``model.bin`` (OpenVINO backend, from an IR), and
``NAME/labels.txt`` so Triton's classification extension returns class names. Input/output names,
types and dims come from the ONNX file (or the IR), class names from its metadata.
The folder is built next to its final place and renamed in only after it passes the checks.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from twins_deploy.errors import TwinsDeployError, UsageError
from twins_deploy.files import atomic_folder
from twins_deploy.metadata import ModelMetadata

PLATFORMS = {"onnx": ("onnxruntime_onnx", "model.onnx"), "plan": ("tensorrt_plan", "model.plan"),
             "ir": ("openvino", "model.xml")}
BACKENDS = ("openvino",)  # served with ``backend:`` (a Triton backend), not ``platform:``
# The OpenVINO backend's own parameters: one request at a time on all the instance's threads.
OPENVINO_PARAMETERS = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
DEVICES = {"gpu": "KIND_GPU", "cpu": "KIND_CPU"}
LABELS_FILE = "labels.txt"
# ONNX element type names to Triton's data types.
_DATA_TYPES = {"FLOAT": "TYPE_FP32", "FLOAT16": "TYPE_FP16", "BFLOAT16": "TYPE_BF16", "DOUBLE": "TYPE_FP64",
               "INT64": "TYPE_INT64", "INT32": "TYPE_INT32", "INT8": "TYPE_INT8", "UINT8": "TYPE_UINT8",
               "BOOL": "TYPE_BOOL"}
_OV_TYPES = {"f32": "FLOAT", "f16": "FLOAT16", "bf16": "BFLOAT16", "f64": "DOUBLE", "i64": "INT64", "i32": "INT32",
             "i8": "INT8", "u8": "UINT8", "boolean": "BOOL"}  # OpenVINO element types to ONNX's names


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str  # Triton's, e.g. "TYPE_FP32"
    dims: tuple[int, ...]  # without the batch axis when the model batches; -1 for a dynamic axis


@dataclass(frozen=True)
class TritonModel:
    """Everything ``config.pbtxt`` says, plus the labels."""

    name: str
    platform: str  # "onnxruntime_onnx", "tensorrt_plan" or "openvino" (a backend)
    max_batch_size: int  # 0: no batching, dims carry the full shape
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    labels: tuple[str, ...]  # class names for the "logits" output, in class-id order
    instances: int
    kind: str  # "KIND_GPU" or "KIND_CPU"
    preferred_batch_sizes: tuple[int, ...]
    max_queue_delay_us: int

    @property
    def model_filename(self) -> str:
        return next(file for platform, file in PLATFORMS.values() if platform == self.platform)

    def config_text(self) -> str:
        """``config.pbtxt`` in Triton's protobuf text format."""
        key = "backend" if self.platform in BACKENDS else "platform"
        lines = [f"name: {_quote(self.name)}", f"{key}: {_quote(self.platform)}",
                 f"max_batch_size: {self.max_batch_size}"]
        for field, tensors in (("input", self.inputs), ("output", self.outputs)):
            lines.append(f"{field} [")
            for i, tensor in enumerate(tensors):
                lines += ["  {", f"    name: {_quote(tensor.name)}", f"    data_type: {tensor.data_type}"]
                if field == "input" and len(tensor.dims) == 3:
                    lines.append("    format: FORMAT_NCHW")
                lines.append(f"    dims: [ {', '.join(map(str, tensor.dims))} ]")
                if field == "output" and tensor.name == "logits" and self.labels:
                    lines.append(f"    label_filename: {_quote(LABELS_FILE)}")
                lines.append("  }," if i < len(tensors) - 1 else "  }")
            lines.append("]")
        lines += ["instance_group [", "  {", f"    count: {self.instances}", f"    kind: {self.kind}", "  }", "]"]
        if self.max_batch_size > 0:
            lines += ["dynamic_batching {",
                      f"  preferred_batch_size: [ {', '.join(map(str, self.preferred_batch_sizes))} ]",
                      f"  max_queue_delay_microseconds: {self.max_queue_delay_us}", "}"]
        if self.platform == PLATFORMS["ir"][0]:
            for name, value in OPENVINO_PARAMETERS.items():
                lines += ["parameters: {", f"  key: {_quote(name)}", f"  value: {{ string_value: {_quote(value)} }}", "}"]
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class TritonReport:
    repository: Path
    model_dir: Path
    model: TritonModel
    files: tuple[str, ...]  # relative to the repository
    schema: str | None  # what parsed config.pbtxt ("tritonclient model_config_pb2"), None if not installed
    plan_checked: bool | None  # the plan's I/O checked with TensorRT; None without a plan

    def as_dict(self) -> dict:
        model = asdict(self.model)
        model["labels"] = len(self.model.labels)
        return {"schema_version": 1, "repository": str(self.repository), "model_dir": str(self.model_dir),
                "files": list(self.files), "validated_with": self.schema, "plan_checked": self.plan_checked,
                **model}


def preferred_batch_sizes(max_batch: int) -> tuple[int, ...]:
    """The three largest of: the powers of two up to ``max_batch``, and ``max_batch`` itself."""
    powers = [2 ** i for i in range(max_batch.bit_length()) if 2 ** i <= max_batch]
    return tuple(sorted(set(powers[-3:]) | {max_batch}))[-3:]


def describe_model(onnx_path: str | Path, *, plan: str | Path | None = None, name: str | None = None,
                   max_batch: int = 32, instances: int = 1, device: str | None = None,
                   max_queue_delay_us: int = 100) -> TritonModel:
    """The Triton model for an exported ONNX file (served as is, or as the TensorRT ``plan`` built from it),
    or for an OpenVINO IR (``.xml``, served by Triton's OpenVINO backend)."""
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise UsageError(f"{'OpenVINO IR' if onnx_path.suffix == '.xml' else 'ONNX file'} not found: {onnx_path}")
    if plan is not None and not Path(plan).is_file():
        raise UsageError(f"TensorRT plan not found: {plan}")
    if plan is not None and Path(plan).suffix == ".onnx":
        raise UsageError(f"--plan takes a TensorRT engine built from the ONNX file, not an ONNX file: {plan}")
    if max_batch < 0:
        raise UsageError(f"--max-batch must be 0 (no batching) or more, got {max_batch}")
    if instances < 1:
        raise UsageError(f"--instances must be at least 1, got {instances}")
    is_ir = onnx_path.suffix.lower() == ".xml"
    device = device or ("cpu" if is_ir else "gpu")
    if is_ir and device != "cpu":
        raise UsageError("an OpenVINO IR runs on the CPU: use --device cpu (or serve the ONNX file on a GPU)")
    if device not in DEVICES:
        raise UsageError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if plan is not None and device != "gpu":
        raise UsageError("a TensorRT plan runs on the GPU only: drop --device cpu")
    if max_queue_delay_us < 0:
        raise UsageError(f"--max-queue-delay-us must be 0 or more, got {max_queue_delay_us}")
    name = name or Path(plan or onnx_path).stem
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise UsageError(f"model name {name!r} must be letters, digits, '_', '.' or '-': pass --name")
    if onnx_path.suffix.lower() == ".xml":
        if plan is not None:
            raise UsageError("--plan goes with an ONNX file; an OpenVINO IR is served by the OpenVINO backend")
        metadata, inputs, outputs = _ir_tensors(onnx_path, max_batch)
    else:
        metadata, inputs, outputs = _onnx_tensors(onnx_path, max_batch)
    logits = next((t for t in outputs if t.name == "logits"), None)
    labels = metadata.class_names if logits else ()
    if logits is not None and labels and logits.dims[-1] not in (-1, len(labels)):
        raise TwinsDeployError(f"{onnx_path} has {logits.dims[-1]} classes but {len(labels)} class names in its "
                               "metadata: export it again")
    if any("\n" in label for label in labels):
        raise TwinsDeployError(f"{onnx_path} has a class name with a line break; Triton's labels file cannot hold it")
    kind = "ir" if onnx_path.suffix.lower() == ".xml" else "plan" if plan else "onnx"
    return TritonModel(name=name, platform=PLATFORMS[kind][0], max_batch_size=max_batch,
                       inputs=tuple(inputs), outputs=tuple(outputs), labels=tuple(labels), instances=instances,
                       kind=DEVICES[device], max_queue_delay_us=max_queue_delay_us,
                       preferred_batch_sizes=preferred_batch_sizes(max_batch) if max_batch else ())


def build_repository(onnx_path: str | Path, output: str | Path = "model_repository", *,
                     plan: str | Path | None = None, name: str | None = None, max_batch: int = 32,
                     instances: int = 1, device: str | None = None, max_queue_delay_us: int = 100) -> TritonReport:
    """Write (or replace) ``output/NAME`` for Triton; an existing folder is replaced only on success."""
    model = describe_model(onnx_path, plan=plan, name=name, max_batch=max_batch, instances=instances,
                           device=device, max_queue_delay_us=max_queue_delay_us)
    plan_checked = None if plan is None else check_plan(plan, model)
    repository = Path(output)
    if repository.exists() and not repository.is_dir():
        raise UsageError(f"--output {repository} is a file; pass a folder for the model repository")
    target = repository / model.name
    schema = _write_model_dir(model, target, Path(plan or onnx_path))
    files = tuple(sorted(str(p.relative_to(repository)) for p in target.rglob("*") if p.is_file()))
    return TritonReport(repository, target, model, files, schema, plan_checked)


def _write_model_dir(model: TritonModel, target: Path, served: Path) -> str | None:
    """Build the model folder beside ``target``, check it, then swap it in (``atomic_folder``)."""
    try:
        with atomic_folder(target) as built:
            (built / "1").mkdir()
            shutil.copyfile(served, built / "1" / model.model_filename)
            if model.platform == PLATFORMS["ir"][0]:  # the IR's weights, beside model.xml
                shutil.copyfile(served.with_suffix(".bin"), built / "1" / "model.bin")
            (built / "config.pbtxt").write_text(model.config_text())
            if model.labels:
                (built / LABELS_FILE).write_text("\n".join(model.labels) + "\n")
            schema = validate_model_dir(built, model)
    except OSError as exc:
        raise TwinsDeployError(f"cannot write {target}: {exc.strerror or exc}") from None
    return schema


def validate_model_dir(folder: Path, model: TritonModel) -> str | None:
    """Check a model folder, to be renamed ``model.name``, as Triton will read it; returns the schema used,
    None if tritonclient is absent.

    With tritonclient installed, ``config.pbtxt`` is parsed with Triton's own ``ModelConfig`` protobuf
    and every field is compared with the model; the files are checked either way.
    """
    model_file = folder / "1" / model.model_filename
    if not model_file.is_file() or model_file.stat().st_size == 0:
        raise TwinsDeployError(f"{model_file} is missing or empty")
    if model.platform == PLATFORMS["ir"][0] and not model_file.with_suffix(".bin").is_file():
        raise TwinsDeployError(f"{model_file.with_suffix('.bin')} (the IR's weights) is missing")
    if model.labels:
        lines = (folder / LABELS_FILE).read_text().splitlines()
        if lines != list(model.labels):
            raise TwinsDeployError(f"{folder / LABELS_FILE} has {len(lines)} lines for {len(model.labels)} classes")
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        return None
    text = (folder / "config.pbtxt").read_text()
    try:
        config = text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise TwinsDeployError(f"{folder / 'config.pbtxt'} does not parse as Triton's ModelConfig: {exc}") from None
    data_type = model_config_pb2.DataType.Name
    found = {
        "name": config.name, "platform": config.platform or config.backend, "max_batch_size": config.max_batch_size,
        "inputs": [(t.name, data_type(t.data_type), tuple(t.dims)) for t in config.input],
        "outputs": [(t.name, data_type(t.data_type), tuple(t.dims)) for t in config.output],
        "labels": [t.label_filename for t in config.output if t.label_filename],
        "instances": [(g.count, model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind)) for g in config.instance_group],
        "batching": (tuple(config.dynamic_batching.preferred_batch_size),
                     config.dynamic_batching.max_queue_delay_microseconds),
    }
    expected = {
        "name": model.name, "platform": model.platform, "max_batch_size": model.max_batch_size,
        "inputs": [(t.name, t.data_type, t.dims) for t in model.inputs],
        "outputs": [(t.name, t.data_type, t.dims) for t in model.outputs],
        "labels": [LABELS_FILE] if model.labels else [],
        "instances": [(model.instances, model.kind)],
        "batching": (model.preferred_batch_sizes, model.max_queue_delay_us if model.max_batch_size else 0),
    }
    for key, value in expected.items():
        if found[key] != value:
            raise TwinsDeployError(f"{folder / 'config.pbtxt'}: {key} is {found[key]}, expected {value}")
    if model.max_batch_size and any(size > model.max_batch_size for size in found["batching"][0]):
        raise TwinsDeployError(f"{folder / 'config.pbtxt'}: a preferred batch size exceeds max_batch_size")
    return "tritonclient model_config_pb2"


def check_plan(plan: str | Path, model: TritonModel) -> bool:
    """Compare a TensorRT plan's tensors and batch profile with the model; False when TensorRT is absent."""
    try:
        import tensorrt as trt
    except ImportError:
        return False
    try:
        runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
    except Exception:  # no CUDA device here: the plan is checked where it runs
        return False
    engine = runtime.deserialize_cuda_engine(Path(plan).read_bytes())
    if engine is None:
        raise TwinsDeployError(f"{plan} is not a TensorRT engine this TensorRT ({trt.__version__}) can load")
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    first = model.inputs[0].name
    max_profile_batch = engine.get_tensor_profile_shape(first, 0)[2][0] if first in names else None
    check_plan_io(model, names, max_profile_batch)
    return True


def check_plan_io(model: TritonModel, plan_tensors: list[str], max_profile_batch: int | None) -> None:
    """The plan must have the ONNX file's tensors and accept batches of ``max_batch_size``."""
    expected = sorted(t.name for t in model.inputs + model.outputs)
    if sorted(plan_tensors) != expected:
        raise UsageError(f"the plan's tensors {sorted(plan_tensors)} differ from the ONNX file's {expected}: "
                         "pass the ONNX file the plan was built from")
    if max_profile_batch is not None and max_profile_batch < model.max_batch_size:
        raise UsageError(f"the plan accepts batches up to {max_profile_batch}: pass --max-batch "
                         f"{max_profile_batch} or build the engine for larger batches")


def _onnx_tensors(onnx_path: Path, max_batch: int) -> tuple[ModelMetadata, list[TensorSpec], list[TensorSpec]]:
    import onnx

    try:
        proto = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TwinsDeployError(f"cannot read {onnx_path} as ONNX: {reason}") from None
    if any(onnx.external_data_helper.uses_external_data(t) for t in proto.graph.initializer):
        raise UsageError(f"{onnx_path} keeps its weights in external data files; export it as a single file")
    metadata = ModelMetadata.from_props({p.key: p.value for p in proto.metadata_props}, str(onnx_path))
    initializers = {t.name for t in proto.graph.initializer}
    inputs = [_tensor(v, max_batch, onnx_path) for v in proto.graph.input if v.name not in initializers]
    outputs = [_tensor(v, max_batch, onnx_path) for v in proto.graph.output]
    if any(-1 in t.dims for t in outputs):  # an exporter left output dims symbolic: infer them from the graph
        graph = onnx.shape_inference.infer_shapes(proto).graph
        outputs = [_tensor(v, max_batch, onnx_path) for v in graph.output]
    return metadata, inputs, outputs


def _ir_tensors(ir_path: Path, max_batch: int) -> tuple[ModelMetadata, list[TensorSpec], list[TensorSpec]]:
    """Metadata and tensors of an OpenVINO IR (``.xml`` beside its ``.bin``)."""
    from twins_deploy.engines.openvino_backend import ir_props, read_model, require_openvino
    from twins_deploy.runtime.session import openvino_core

    require_openvino()
    model = read_model(openvino_core(), ir_path)
    metadata = ModelMetadata.from_props(ir_props(model), str(ir_path))

    def spec(port) -> TensorSpec:
        dims = tuple(-1 if d.is_dynamic else d.get_length() for d in port.get_partial_shape())
        element = _OV_TYPES.get(port.get_element_type().get_type_name())
        if element is None:
            raise TwinsDeployError(f"{ir_path}: tensor {port.get_any_name()!r} has type {port.get_element_type()}, "
                                   "which Triton cannot serve")
        if max_batch > 0:
            if not dims or dims[0] != -1:
                raise UsageError(f"{ir_path} has a fixed batch on {port.get_any_name()!r}: build the IR from an "
                                 "export with a dynamic batch, or pass --max-batch 0")
            dims = dims[1:]
        return TensorSpec(port.get_any_name(), _DATA_TYPES[element], dims)

    return metadata, [spec(p) for p in model.inputs], [spec(p) for p in model.outputs]


def _tensor(value, max_batch: int, source: Path) -> TensorSpec:
    import onnx

    kind = value.type.tensor_type
    dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in kind.shape.dim)
    element = onnx.TensorProto.DataType.Name(kind.elem_type)
    if element not in _DATA_TYPES:
        raise TwinsDeployError(f"{source}: tensor {value.name!r} has type {element}, which Triton cannot serve")
    if max_batch > 0:
        if not dims or dims[0] != -1:
            raise UsageError(f"{source} has a fixed batch of {dims[0] if dims else 'none'} on {value.name!r}: "
                             "export it with a dynamic batch to serve with dynamic batching, or pass --max-batch 0")
        dims = dims[1:]
    return TensorSpec(value.name, _DATA_TYPES[element], dims)


def _quote(text: str) -> str:
    return json.dumps(text)
