"""ONNX export of Twins: the cleanest graph we can ship, checked against PyTorch before it is called done.

The pipeline follows optimum: an export spec (input, outputs, dynamic axes for the head), then
trace (torch.onnx, dynamo) -> simplify (onnxscript optimizer) -> lower to the requested opset ->
put GELU in the order onnxruntime fuses -> ``onnx.checker`` and shape inference -> metadata ->
atomic write -> ``validate_model_outputs`` against the PyTorch model on onnxruntime (CPU).

The model itself does the heavy lifting: its reshape targets are Python ints with -1 only for the
batch, tokens travel as a (batch * tokens, channels) matrix so every Linear is one Gemm, and the
attention is exported as (Q * scale) @ K^T -> Softmax -> @ V. So the graph has no Shape node and
every LayerNorm is one LayerNormalization node.

torch and onnx are imported inside functions: ``save_onnx_atomic`` is shared with light modules.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from twins_deploy import __version__
from twins_deploy.errors import TwinsDeployError, UsageError
from twins_deploy.files import atomic_output
from twins_deploy.metadata import ModelMetadata, imagenet_class_names

if TYPE_CHECKING:
    import onnx

    import torch

    from twins_deploy.models import ModelSpec

INPUT_NAME = "pixel_values"
HEAD_OUTPUTS = {"logits": ("logits",), "embedding": ("embedding",),
                "features": ("stage0", "stage1", "stage2", "stage3")}
MIN_OPSET = 17  # the lowest with LayerNormalization as one node (TensorRT keeps it accurate in fp16)
DEFAULT_OPSET = MIN_OPSET  # 20 (one Gelu node) and 23 (one Attention node) measured no faster on onnxruntime
MAX_OPSET = 23  # the highest torch.onnx and onnxruntime both handle here
TORCH_OPSET = 18  # torch.onnx translates to 18 at least; 17 is reached by _lower_to_opset_17
TRACE_BATCH = 2  # torch.export specialises a batch of 1, so a dynamic batch is traced at 2
VERIFY_BATCH = 3  # the batch > 1 that verification runs for a dynamic-batch graph
PARITY_MAX_REL = 1e-4  # an export fails above this max-abs difference relative to the output's scale
SIMPLIFIER = "onnxscript optimizer"
SCHEMA_VERSION = 1
_PROTOBUF_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class OnnxExportSpec:
    """What the graph looks like from outside: one input, the head's outputs, the batch axis, the opset."""

    head: str
    img_size: tuple[int, int]
    batch: str | int  # "dynamic" or a fixed batch size
    opset: int

    @property
    def output_names(self) -> tuple[str, ...]:
        return HEAD_OUTPUTS[self.head]

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        if self.batch != "dynamic":
            return {}
        return {name: {0: "batch"} for name in (INPUT_NAME, *self.output_names)}

    @property
    def trace_batch(self) -> int:
        return TRACE_BATCH if self.batch == "dynamic" else self.batch

    @property
    def verify_batches(self) -> tuple[int, ...]:
        return (1, VERIFY_BATCH) if self.batch == "dynamic" else (self.batch,)


@dataclass
class ExportReport:
    """What an export produced and how close it is to PyTorch (``as_dict`` for ``--json``)."""

    path: Path
    metadata: ModelMetadata
    spec: OnnxExportSpec
    num_nodes: int
    nodes_by_op: dict[str, int]
    params: int
    file_bytes: int
    simplified: bool
    parity: list[dict] = field(default_factory=list)  # one row per (batch, output); empty when not verified
    seconds: float = 0.0

    @property
    def opset(self) -> int:
        return self.spec.opset

    @property
    def verified(self) -> bool:
        return bool(self.parity)

    @property
    def passed(self) -> bool:
        """False only when verification ran and an output was further than PARITY_MAX_REL from PyTorch."""
        return all(row["passed"] for row in self.parity)

    def as_dict(self) -> dict:
        spec = self.spec
        return {
            "schema_version": SCHEMA_VERSION,
            "path": str(self.path),
            "model": self.metadata.model,
            "input_size": list(spec.img_size),
            "head": spec.head,
            "batch": spec.batch,
            "opset": spec.opset,
            "input_name": INPUT_NAME,
            "output_names": list(spec.output_names),
            "num_nodes": self.num_nodes,
            "nodes_by_op": self.nodes_by_op,
            "params": self.params,
            "file_bytes": self.file_bytes,
            "simplifier": SIMPLIFIER if self.simplified else None,
            "weights": self.metadata.weights,
            "weights_sha256": self.metadata.weights_sha256,
            "verified": self.verified,
            "tolerance_max_rel": PARITY_MAX_REL,
            "parity": self.parity,
            "passed": self.passed,
            "seconds": round(self.seconds, 3),
        }


def export_onnx(model: str | ModelSpec | torch.nn.Module, output: str | Path | None = None, *,
                weights: str | Path = "pretrained", img_size: int | tuple[int, int] | str | None = None,
                batch: str | int = "dynamic", opset: int = DEFAULT_OPSET, head: str = "logits",
                simplify: bool = True, verify: bool = True, num_classes: int | None = None,
                config: str | Path | dict | None = None, preprocessing: dict | None = None,
                progress: Callable[[str], None] | None = None) -> ExportReport:
    """Export a model of any registered family to ONNX, write it atomically and check it against PyTorch.

    ``model`` is a name, a config or ModelSpec (built with ``weights``, ``img_size``, ``num_classes``
    and ``config``) or a built model (used as it is). ``preprocessing`` overrides what the metadata
    says of ``mean``, ``std``, ``interpolation`` and ``crop_pct``. ``output`` defaults to
    ``<name>-<H>x<W>.onnx`` in the current folder. The report's ``passed`` is False when an
    output is further than ``PARITY_MAX_REL`` from PyTorch; the file is written either way.
    ``progress`` receives a short line before each step (for a spinner).
    """
    from twins_deploy.memory import footprint

    start = time.perf_counter()
    step = progress or (lambda message: None)
    batch, opset, head = check_export_args(batch, opset, head)
    _check_memory(model, img_size, num_classes, config, head, batch, verify)
    twins = _load_model(model, weights, img_size, num_classes, config)
    spec = OnnxExportSpec(head, twins.img_size, batch, opset)
    path = Path(output) if output is not None else default_output(twins.spec.name, twins.img_size)
    if path.is_dir():
        raise UsageError(f"output {path} is a folder: give a file name ending in .onnx")

    with atomic_output(path) as tmp:  # reserved from the start: an interrupted export leaves nothing behind
        step(f"tracing {twins.spec.name} with torch.onnx (opset {max(opset, TORCH_OPSET)})")
        with _as_head(twins, head, fused_attn=False):
            proto = _trace(twins, spec)
        if simplify:
            step(f"simplifying with the {SIMPLIFIER}")
            proto = _simplify(proto)
        if opset < TORCH_OPSET:
            proto = _lower_to_opset_17(proto)
        _gelu_in_fusable_order(proto)
        _strip_trace_info(proto)
        step("checking the graph and inferring shapes")
        proto = _check_and_infer_shapes(proto)
        metadata = export_metadata(twins, head, preprocessing)
        recorded = footprint(twins.spec, twins.img_size, head).to_metadata()  # engines run on the file need no replay
        metadata = replace(metadata, extra={**metadata.extra, **recorded})
        _set_metadata(proto, metadata)
        step(f"writing {path}")
        file_bytes = save_onnx_atomic(proto, tmp)

    from twins_deploy.models import count_parameters

    report = ExportReport(path=path, metadata=metadata, spec=spec, num_nodes=len(proto.graph.node),
                          nodes_by_op=dict(Counter(node.op_type for node in proto.graph.node).most_common()),
                          params=count_parameters(twins), file_bytes=file_bytes, simplified=simplify)
    if verify:
        step(f"verifying on onnxruntime (CPU) at batch {' and '.join(map(str, spec.verify_batches))}")
        with _as_head(twins, head):
            report.parity = validate_model_outputs(twins, path, spec)
    report.seconds = time.perf_counter() - start
    return report


def check_export_args(batch: str | int, opset: int, head: str) -> tuple[str | int, int, str]:
    """Usage errors before any work: the batch ("dynamic" or N >= 1), the opset and the head."""
    if head not in HEAD_OUTPUTS:
        raise UsageError(f"unknown head {head!r}: choose one of {', '.join(HEAD_OUTPUTS)}")
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise UsageError(f"opset {opset} is not supported: choose {MIN_OPSET} to {MAX_OPSET} "
                         f"({MIN_OPSET} is the lowest with LayerNormalization as one node)")
    return parse_batch(batch), opset, head


def parse_batch(batch: str | int) -> str | int:
    """'dynamic' or a positive batch size (an int or its digits)."""
    text = str(batch).strip().lower()
    if text == "dynamic":
        return "dynamic"
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise UsageError(f"batch must be 'dynamic' or a positive integer, got {batch!r}")


def default_output(name: str, img_size: tuple[int, int]) -> Path:
    """``svt-s-224x224.onnx``; a family prefix becomes part of the name (``vit-flax-TwinsSVT-...``)."""
    return Path(f"{name.replace('/', '-')}-{img_size[0]}x{img_size[1]}.onnx")


PREPROCESSING_KEYS = ("mean", "std", "interpolation", "crop_pct")


def export_metadata(model, head: str, preprocessing: dict | None = None) -> ModelMetadata:
    """The preprocessing, classes and provenance the ONNX file carries for engines and the runtime.

    The family and its configuration go along too (``model_family``, ``model_config``), so
    ``verify`` rebuilds the reference from the file alone."""
    import dataclasses
    import json

    import torch

    from twins_deploy.models import config_dict

    unknown = set(preprocessing or {}) - set(PREPROCESSING_KEYS)
    if unknown:
        raise UsageError(f"unknown preprocessing key {sorted(unknown)[0]!r}: use {', '.join(PREPROCESSING_KEYS)}")
    spec = dataclasses.replace(model.spec, **{k: v for k, v in (preprocessing or {}).items() if v is not None})
    classes = model.num_classes
    if head != "logits" or not classes:
        class_names: tuple[str, ...] = ()
    elif classes == 1000:
        class_names = tuple(imagenet_class_names())
    else:
        class_names = tuple(f"class_{i}" for i in range(classes))
    source = getattr(model, "weights_source", None)
    return ModelMetadata(
        model=spec.name, input_size=tuple(model.img_size), mean=tuple(spec.mean), std=tuple(spec.std),
        interpolation=spec.interpolation, crop_pct=spec.crop_pct, output=head, class_names=class_names,
        weights=str(source) if source else "", weights_sha256=(source.sha256 or "") if source else "",
        twins_deploy_version=__version__, torch_version=torch.__version__,
        extra={"model_family": spec.family, "model_config": json.dumps(config_dict(model.config))})


def save_onnx_atomic(model: onnx.ModelProto, path: str | Path) -> int:
    """Write ``model`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    A failure leaves neither a truncated file nor a damaged earlier one. Returns the file size.
    """
    path = Path(path)
    if model.ByteSize() > _PROTOBUF_LIMIT:
        raise TwinsDeployError(f"cannot write {path}: the model is over 2 GiB, the limit of a single ONNX file")
    data = model.SerializeToString()
    try:
        with atomic_output(path) as tmp:
            tmp.write_bytes(data)
    except OSError as exc:
        raise TwinsDeployError(f"cannot write {path}: {exc.strerror or exc}") from None
    return len(data)


def validate_model_outputs(model, path: str | Path, spec: OnnxExportSpec, seed: int = 0) -> list[dict]:
    """Run the file on onnxruntime (CPU) and the PyTorch model on the same seeded inputs.

    One row per (batch, output): max abs/rel difference, cosine, top-1/top-5 agreement for logits,
    and ``passed`` (max rel <= PARITY_MAX_REL).
    """
    import numpy as np
    import torch

    from twins_deploy.parity import compare
    from twins_deploy.runtime.session import create_session

    session = create_session(path, providers=["CPUExecutionProvider"])
    rows = []
    for batch in spec.verify_batches:
        pixels = np.random.default_rng(seed + batch).standard_normal((batch, 3, *spec.img_size), dtype=np.float32)
        with torch.no_grad():
            reference = model(torch.from_numpy(pixels))
        references = reference if isinstance(reference, tuple) else (reference,)
        outputs = session.run(list(spec.output_names), {INPUT_NAME: pixels})
        for name, expected, got in zip(spec.output_names, references, outputs):
            parity = compare(expected.numpy(), got, classify=name == "logits")
            rows.append({"batch": batch, "output": name, **parity.as_dict(),
                         "passed": parity.max_rel <= PARITY_MAX_REL})
    return rows


# ----------------------------------------------------------------------------------------------
# Steps


def _check_memory(model, img_size, num_classes, config, head: str, batch: str | int, verify: bool) -> None:
    """Refuse an export this process cannot hold, from the configuration alone: before a weight is allocated."""
    import torch

    from twins_deploy.memory import check_export
    from twins_deploy.models import resolve_spec, with_classes

    if isinstance(model, torch.nn.Module):
        spec, size = model.spec, model.img_size
    else:
        spec = with_classes(resolve_spec(model, config), num_classes)
        size = img_size or spec.input_size
    outline = OnnxExportSpec(head, size, batch, DEFAULT_OPSET)
    check_export(spec, size, head, outline.trace_batch, max(outline.verify_batches) if verify else 0)


def _load_model(model, weights, img_size, num_classes, config):
    import torch

    from twins_deploy.models import create_model, to_size

    if not isinstance(model, torch.nn.Module):
        return create_model(model, weights=weights, img_size=img_size, num_classes=num_classes, config=config)
    try:
        size = None if img_size is None else to_size(img_size)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if size is not None and size != tuple(model.img_size):
        raise UsageError(f"this model is built for {model.img_size[0]}x{model.img_size[1]}: build it again "
                         f"with img_size={img_size!r} to export that size")
    if num_classes is not None and num_classes != model.num_classes:
        raise UsageError(f"this model has {model.num_classes} classes: build it again with "
                         f"num_classes={num_classes} to export that head")
    return model.eval()


@contextlib.contextmanager
def _as_head(model, head: str, fused_attn: bool | None = None):
    """Temporarily set what forward returns (and the attention path); the caller's model is restored."""
    attention = {m: m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")}
    before = model.output
    model.output = head
    if fused_attn is not None:
        model.set_fused_attn(fused_attn)
    try:
        yield model
    finally:
        model.output = before
        for module, fused in attention.items():
            module.fused_attn = fused


def _trace(model, spec: OnnxExportSpec) -> onnx.ModelProto:
    import torch

    example = torch.zeros(spec.trace_batch, 3, *spec.img_size)
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1)},) if spec.batch == "dynamic" else None
    torch_onnx_log = logging.getLogger("torch.onnx")  # says torchvision ops are skipped: noise here
    level = torch_onnx_log.level
    try:
        torch_onnx_log.setLevel(logging.ERROR)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model, (example,), dynamo=True, opset_version=max(spec.opset, TORCH_OPSET),
                input_names=[INPUT_NAME], output_names=list(spec.output_names), dynamic_shapes=dynamic_shapes,
                optimize=False, verbose=False)
    except Exception as exc:  # torch.export/onnx translation errors are long; their first line says what
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TwinsDeployError(f"torch.onnx could not export {model.spec.name}: {first_line}") from None
    finally:
        torch_onnx_log.setLevel(level)
    return program.model_proto


def _simplify(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Constant folding, dead code and duplicate-constant removal.

    The onnxscript optimizer (the one torch.onnx itself uses) over onnxslim: on svt-s both reach
    the same nodes, it takes half the time and leaves fewer initializers (duplicates merged).
    """
    from onnxscript import optimizer

    return optimizer.optimize(proto)


def _lower_to_opset_17(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Opset 18 -> 17 for the ops our graphs hold.

    Between 17 and 18 only where Reduce* ops take their axes and how Split takes its sizes changed
    (Pad gained an optional input). onnx's version converter has no Split adapter and leaves
    ReduceMean with an attribute 17 does not know, hence this local rewrite.
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    graph = proto.graph
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    constants.update({node.output[0]: numpy_helper.to_array(node.attribute[0].t) for node in graph.node
                      if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value"})
    shapes = {}
    for info in onnx.shape_inference.infer_shapes(proto).graph.value_info:
        shapes[info.name] = [d.dim_value if d.HasField("dim_value") else None for d in info.type.tensor_type.shape.dim]
    for node in graph.node:
        if node.domain not in ("", "ai.onnx") or onnx.defs.get_schema(node.op_type, 18).since_version < 18:
            continue
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type.startswith("Reduce") and not attributes.get("noop_with_empty_axes", 0) \
                and (len(node.input) == 1 or node.input[1] in constants):
            keep = [a for a in node.attribute if a.name != "noop_with_empty_axes"]
            if len(node.input) > 1:
                keep.append(helper.make_attribute("axes", [int(a) for a in constants[node.input[1]]]))
                del node.input[1:]
            del node.attribute[:]
            node.attribute.extend(keep)
        elif node.op_type == "Split" and "num_outputs" in attributes and len(node.input) == 1:
            axis, parts = attributes.get("axis", 0), attributes["num_outputs"]
            size = (shapes.get(node.input[0]) or [None] * (axis + 1))[axis]
            if size is None or size % parts:
                raise TwinsDeployError(f"cannot lower Split {node.name} to opset 17 (its input size is unknown): "
                                       "export with --opset 18")
            sizes = numpy_helper.from_array(np.full(parts, size // parts, dtype=np.int64), f"{node.name}_sizes")
            graph.initializer.append(sizes)
            node.input.append(sizes.name)
            del node.attribute[:]
            node.attribute.append(helper.make_attribute("axis", axis))
        elif node.op_type == "Pad" and len(node.input) <= 3:
            continue  # Pad-18 without its new axes input is Pad-13
        else:  # e.g. Reduce* axes still computed, as in an export without --simplify
            raise TwinsDeployError(f"cannot lower {node.op_type} {node.name} to opset 17 (its inputs are not "
                                   "constants): keep --simplify or export with --opset 18")
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = 17
    used = {name for node in graph.node for name in node.input}  # axes that became attributes
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return proto


def _gelu_in_fusable_order(proto: onnx.ModelProto) -> int:
    """x * (0.5 * (1 + erf(x / sqrt2))) -> (x * (1 + erf(x / sqrt2))) * 0.5, bit for bit the same.

    torch.onnx writes GELU in the first order; onnxruntime fuses only the second into one Gelu
    kernel (about 5% of svt-s's CPU latency). TensorRT fuses both. Returns how many it reordered.
    """
    from onnx import numpy_helper

    graph = proto.graph
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def scalar(name: str, value: float) -> bool:
        array = constants.get(name)
        return array is not None and array.size == 1 and math.isclose(float(array.reshape(())), value, rel_tol=1e-6)

    def only_consumer(node, op_type: str):
        users = consumers.get(node.output[0], [])
        return users[0] if len(users) == 1 and users[0].op_type == op_type else None

    reordered = 0
    for erf in [node for node in graph.node if node.op_type == "Erf"]:
        div = producer.get(erf.input[0])
        add = only_consumer(erf, "Add")
        half = add and only_consumer(add, "Mul")
        outer = half and only_consumer(half, "Mul")
        if not (div and div.op_type == "Div" and outer and scalar(div.input[1], math.sqrt(2))):
            continue
        x, one = div.input[0], next((i for i in add.input if i != erf.output[0]), "")
        half_const = next((i for i in half.input if i != add.output[0]), "")
        if not (scalar(one, 1.0) and scalar(half_const, 0.5) and set(outer.input) == {x, half.output[0]}):
            continue
        half.input[:] = [x, add.output[0]]
        outer.input[:] = [half.output[0], half_const]
        reordered += 1
    return reordered


def _strip_trace_info(proto: onnx.ModelProto) -> None:
    """Drop torch's per-node stack traces and class paths: they name local files and bloat the graph."""
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del proto.metadata_props[:]
    proto.graph.doc_string = ""


def _check_and_infer_shapes(proto: onnx.ModelProto) -> onnx.ModelProto:
    import onnx

    try:
        onnx.checker.check_model(proto, full_check=True)
        return onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TwinsDeployError(f"the exported graph is not valid ONNX: {first_line}") from None


def _set_metadata(proto: onnx.ModelProto, metadata: ModelMetadata) -> None:
    from onnx import helper

    helper.set_model_props(proto, metadata.to_props())
    proto.producer_name, proto.producer_version = "twins-deploy", __version__
    proto.doc_string = (f"{metadata.model} at {metadata.input_size[0]}x{metadata.input_size[1]}, "
                        f"head {metadata.output}, exported by twins-deploy {__version__}")
