"""The Open Inference Protocol (KServe v2, the protocol Triton speaks) for one image model: requests in,
responses out, with Triton's binary tensor data and classification extensions.

Pure Python and numpy (no web framework, no Ray), so the server's ingress only moves bytes and the codec
is tested against ``tritonclient.http`` itself. Nothing from a request reaches anything but ``json`` and
``numpy.frombuffer``; every size is checked against the declared shape before memory is taken for it.

What ``tritonclient.http`` sends by default, and what this accepts:

- ``POST /v2/models/NAME/infer``: a JSON object, then (when a tensor is sent as binary data) the raw
  tensor bytes; the ``Inference-Header-Content-Length`` header gives the length of the JSON part.
- one input, ``pixel_values``, datatype ``FP32``, shape ``[N, 3, H, W]``: either ``data`` in the JSON
  (flat, or nested as the shape) or ``parameters.binary_data_size`` bytes (little-endian float32,
  row-major) after the JSON.
- requested outputs with ``parameters.binary_data`` (bool) and ``parameters.classification`` (k: the
  top-k classes as BYTES ``"value:index:label"`` strings of shape ``[N, k]``, as Triton answers);
  the request's ``parameters.binary_data_output`` is the default for outputs that do not say. No
  ``outputs`` means every output of the model.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

import twins_deploy

SERVER_NAME = "twins-deploy"
EXTENSIONS = ("binary_tensor_data", "classification")
HEADER_LENGTH = "Inference-Header-Content-Length"  # the HTTP header that splits JSON from binary tensor data
INPUT_DATATYPE = "FP32"  # the only input datatype: what the exported graphs and our Triton configs take
OUTPUT_DATATYPE = "FP32"
_FLOAT32_LE = np.dtype("<f4")


class ProtocolError(Exception):
    """A request the protocol answers with an error: ``status`` (400 bad request, 404 unknown model or
    version, 413 too large, 500 an output JSON cannot carry) and a one-line message; the body is
    ``as_dict()``, ``{"error": message}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message

    def as_dict(self) -> dict[str, str]:
        return {"error": self.message}


@dataclass(frozen=True)
class RequestedOutput:
    """One output to answer: its name, whether its data goes after the JSON as binary, and
    ``class_count`` (0: the raw tensor; k > 0: the top-k classes as BYTES strings)."""

    name: str
    binary_data: bool
    class_count: int = 0


@dataclass(frozen=True)
class InferRequest:
    """A validated inference request. ``batch`` is a float32 (N, 3, H, W) array (read-only when it came
    as binary data: a view on the request body); ``outputs`` are resolved (every model output when the
    request named none, each with its binary flag decided)."""

    id: str | None
    batch: np.ndarray
    outputs: tuple[RequestedOutput, ...]
    binary_output_default: bool  # the request's "binary_data_output"


def parse_header_length(value: str | int | None) -> int | None:
    """The ``Inference-Header-Content-Length`` header as an int (``None`` when absent)."""
    if value is None or isinstance(value, int):
        return value
    try:
        return int(value.strip(), 10)
    except ValueError:
        raise ProtocolError(400, f"{HEADER_LENGTH} must be a byte count, got {_clip(value)!r}") from None


def parse_infer_request(body: bytes, header_length: int | str | None, *, input_name: str,
                        image_shape: tuple[int, int, int], output_names: Sequence[str],
                        max_batch: int | None = None) -> InferRequest:
    """Validate an inference request for a model with one image input ``input_name`` of
    ``image_shape`` (3, H, W) and the outputs ``output_names``; raises ``ProtocolError(400, ...)``
    naming the first problem found. ``header_length`` is the ``Inference-Header-Content-Length``
    header (``None`` when absent: the whole body is JSON). The body has already been decoded by the
    server (no ``Content-Encoding``) and bounded in size."""
    header_length = parse_header_length(header_length)
    if header_length is None:
        header, binary = body, b""
    elif not 0 < header_length <= len(body):
        raise ProtocolError(400, f"{HEADER_LENGTH} must be from 1 to the body's {len(body)} bytes, "
                                 f"got {header_length}")
    else:
        header, binary = body[:header_length], body[header_length:]
    try:
        request = _load_json(header)
    except ProtocolError:
        if header_length is None and b'"binary_data_size"' in body:  # raw tensor bytes sent without the header
            raise ProtocolError(400, f"the body holds binary tensor data (binary_data_size) but no {HEADER_LENGTH} "
                                     "header says where its JSON ends") from None
        raise

    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError(400, f"'id' must be a string, got {_json_type(request_id)}")
    parameters = _parameters(request, "the request")
    binary_output_default = _bool_parameter(parameters, "binary_data_output", "the request")

    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ProtocolError(400, f"the request needs 'inputs': a list with one tensor, {input_name!r}")
    if len(inputs) != 1:
        raise ProtocolError(400, f"the request has {len(inputs)} inputs; this model takes one, {input_name!r}")
    batch = _input_batch(inputs[0], binary, input_name, image_shape, max_batch)
    outputs = _requested_outputs(request.get("outputs"), output_names, binary_output_default)
    return InferRequest(id=request_id, batch=batch, outputs=outputs, binary_output_default=binary_output_default)


def encode_infer_response(model_name: str, model_version: str | None, request: InferRequest,
                          outputs: Mapping[str, np.ndarray],
                          class_names: Sequence[str] = ()) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers (``Content-Type``; ``Inference-Header-Content-Length`` when
    any output is binary) for the model's ``outputs`` (name -> (N, ...) array) on ``request``.

    A classification output (``class_count`` k) is BYTES of shape [N, min(k, classes)], each string
    ``"value:index:label"`` as Triton writes it: the raw output value (``%f``), the class index, and
    the label when ``class_names`` has one per class of that output."""
    entries, chunks = [], []
    for requested in request.outputs:
        array = np.asarray(outputs[requested.name])
        if array.ndim < 1 or len(array) != len(request.batch):
            raise ValueError(f"output {requested.name!r} has shape {array.shape}; expected "
                             f"{len(request.batch)} rows, one per image of the request")
        if requested.class_count:
            datatype, tensor = "BYTES", _classifications(array, requested.class_count, class_names)
        else:
            datatype, tensor = OUTPUT_DATATYPE, np.ascontiguousarray(array, dtype=_FLOAT32_LE)
        entry: dict[str, Any] = {"name": requested.name, "datatype": datatype, "shape": list(tensor.shape)}
        if requested.binary_data:
            raw = _bytes_tensor(tensor) if datatype == "BYTES" else tensor.tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            if datatype != "BYTES" and not np.isfinite(tensor).all():
                raise ProtocolError(500, f"output {requested.name!r} holds NaN or infinity, which JSON cannot "
                                         "carry; ask for it with binary_data=true")
            entry["data"] = tensor.reshape(-1).tolist()
        entries.append(entry)

    response: dict[str, Any] = {"model_name": model_name}
    if model_version:
        response["model_version"] = model_version
    if request.id is not None:
        response["id"] = request.id
    response["outputs"] = entries
    header = json.dumps(response, separators=(",", ":")).encode()
    if not chunks:
        return header, {"content-type": "application/json"}
    return b"".join([header, *chunks]), {"content-type": "application/octet-stream",
                                         HEADER_LENGTH.lower(): str(len(header))}


def model_metadata(name: str, versions: Sequence[str], platform: str, input_name: str,
                   image_shape: tuple[int, int, int], outputs: Mapping[str, Sequence[int]]) -> dict:
    """``GET /v2/models/{name}``: the input ``[-1, 3, H, W]`` FP32 and each output ``[-1, *shape]`` FP32
    (``outputs`` maps names to shapes without the batch), as Triton reports a batched model."""
    return {"name": name, "versions": list(versions), "platform": platform,
            "inputs": [{"name": input_name, "datatype": INPUT_DATATYPE, "shape": [-1, *image_shape]}],
            "outputs": [{"name": output, "datatype": OUTPUT_DATATYPE, "shape": [-1, *shape]}
                        for output, shape in outputs.items()]}


def server_metadata() -> dict:
    """``GET /v2``: the server's name, version and the protocol extensions it speaks."""
    return {"name": SERVER_NAME, "version": twins_deploy.__version__, "extensions": list(EXTENSIONS)}


def _load_json(header: bytes) -> dict:
    try:
        request = json.loads(header)
    except RecursionError:
        raise ProtocolError(400, "the request JSON is nested too deeply") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(400, f"the request is not valid JSON: {_first_line(exc)}") from None
    except ValueError:  # Python refuses integers of more than 4300 digits
        raise ProtocolError(400, "the request holds a number too long to read") from None
    if not isinstance(request, dict):
        raise ProtocolError(400, f"the request must be a JSON object, got {_json_type(request)}")
    return request


def _input_batch(tensor: Any, binary: bytes, input_name: str, image_shape: tuple[int, int, int],
                 max_batch: int | None) -> np.ndarray:
    """The input tensor as float32 (N, 3, H, W), after checking name, datatype, shape and size."""
    if not isinstance(tensor, dict):
        raise ProtocolError(400, f"each input must be a JSON object, got {_json_type(tensor)}")
    name = tensor.get("name")
    if name != input_name:
        raise ProtocolError(400, f"unknown input {_clip(name)!r}: this model takes one input, {input_name!r}")
    datatype = tensor.get("datatype")
    if datatype != INPUT_DATATYPE:
        raise ProtocolError(400, f"input {input_name!r} has datatype {_clip(datatype)!r}; this model takes "
                                 f"{INPUT_DATATYPE} only (float32 pixels, preprocessed)")
    shape = _shape(tensor.get("shape"), input_name, image_shape, max_batch)
    count = math.prod(shape)
    parameters = _parameters(tensor, f"input {input_name!r}")
    for key in ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset"):
        if key in parameters:
            raise ProtocolError(400, f"input {input_name!r} uses shared memory ({key}), which this server does "
                                     "not offer: send the data in the request")

    if "binary_data_size" in parameters:
        size = parameters["binary_data_size"]
        if not _is_int(size) or size < 0:
            raise ProtocolError(400, f"input {input_name!r}: binary_data_size must be a byte count, "
                                     f"got {_clip(size)!r}")
        if "data" in tensor:
            raise ProtocolError(400, f"input {input_name!r} has both 'data' and binary_data_size; send one")
        if size != count * _FLOAT32_LE.itemsize:
            raise ProtocolError(400, f"input {input_name!r}: binary_data_size is {size} bytes but shape "
                                     f"{shape} of {INPUT_DATATYPE} takes {count * _FLOAT32_LE.itemsize}")
        if len(binary) != size:
            raise ProtocolError(400, f"input {input_name!r}: binary_data_size is {size} bytes but the body "
                                     f"holds {len(binary)} bytes after the JSON header")
        batch = np.frombuffer(binary, dtype=_FLOAT32_LE).reshape(shape)
    else:
        if binary:
            raise ProtocolError(400, f"the body holds {len(binary)} bytes after the JSON header but no input "
                                     "gives a binary_data_size")
        if "data" not in tensor:
            raise ProtocolError(400, f"input {input_name!r} has no 'data' and no binary_data_size parameter")
        batch = _json_data(tensor["data"], shape, count, input_name)
    if not np.isfinite(batch).all():
        raise ProtocolError(400, f"input {input_name!r} holds NaN or infinity")
    return batch.astype(np.float32, copy=False)


def _shape(shape: Any, input_name: str, image_shape: tuple[int, int, int], max_batch: int | None) -> list[int]:
    expected = f"[N, {', '.join(map(str, image_shape))}]" + (f" with N from 1 to {max_batch}" if max_batch else "")
    if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
        raise ProtocolError(400, f"input {input_name!r} needs 'shape', a list of integers: {expected}")
    if len(shape) != 1 + len(image_shape) or tuple(shape[1:]) != tuple(image_shape) or shape[0] < 1 \
            or (max_batch is not None and shape[0] > max_batch):
        raise ProtocolError(400, f"input {input_name!r} has shape {shape}; this model takes {expected}")
    return shape


def _json_data(data: Any, shape: list[int], count: int, input_name: str) -> np.ndarray:
    """JSON numbers, flat or nested as ``shape``, as float32; strings, booleans and nulls are refused."""
    if not isinstance(data, list):
        raise ProtocolError(400, f"input {input_name!r}: 'data' must be a list of numbers, got {_json_type(data)}")
    if len(data) != count and len(data) != shape[0]:  # neither flat nor nested by the batch: wrong before numpy
        raise ProtocolError(400, f"input {input_name!r}: 'data' has {len(data)} values but shape {shape} takes "
                                 f"{count}")
    try:
        array = np.array(data)
    except (ValueError, OverflowError):  # ragged nesting; an integer beyond int64
        raise ProtocolError(400, f"input {input_name!r}: 'data' must be a flat list of {count} numbers or lists "
                                 f"nested as shape {shape}") from None
    if array.dtype.kind not in "iuf":
        raise ProtocolError(400, f"input {input_name!r}: 'data' must hold numbers only (FP32), not strings, "
                                 "booleans or nulls")
    if array.shape != (count,) and list(array.shape) != shape:
        raise ProtocolError(400, f"input {input_name!r}: 'data' has {array.size} values nested as "
                                 f"{list(array.shape)}; shape {shape} takes {count}, flat or nested as the shape")
    with np.errstate(over="ignore"):  # values beyond float32 become inf, refused by the caller
        return array.astype(np.float32).reshape(shape)


def _requested_outputs(requested: Any, output_names: Sequence[str],
                       binary_default: bool) -> tuple[RequestedOutput, ...]:
    if requested is None:
        return tuple(RequestedOutput(name, binary_default) for name in output_names)
    if not isinstance(requested, list):
        raise ProtocolError(400, f"'outputs' must be a list of requested outputs, got {_json_type(requested)}")
    resolved, seen = [], set()
    for output in requested:
        if not isinstance(output, dict):
            raise ProtocolError(400, f"each requested output must be a JSON object, got {_json_type(output)}")
        name = output.get("name")
        if name not in output_names:
            raise ProtocolError(400, f"unknown output {_clip(name)!r}: this model answers "
                                     f"{', '.join(map(repr, output_names))}")
        if name in seen:
            raise ProtocolError(400, f"output {name!r} is requested twice")
        seen.add(name)
        where = f"output {name!r}"
        parameters = _parameters(output, where)
        if "shared_memory_region" in parameters:
            raise ProtocolError(400, f"{where} asks for shared memory, which this server does not offer")
        binary = parameters.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise ProtocolError(400, f"{where}: binary_data must be true or false, got {_clip(binary)!r}")
        class_count = parameters.get("classification", 0)
        if not _is_int(class_count) or class_count < 0:
            raise ProtocolError(400, f"{where}: classification must be a class count (0 or more), "
                                     f"got {_clip(class_count)!r}")
        resolved.append(RequestedOutput(name, binary, class_count))
    if not resolved:
        raise ProtocolError(400, "'outputs' is empty: name at least one output, or leave 'outputs' out for all")
    return tuple(resolved)


def _classifications(array: np.ndarray, class_count: int, class_names: Sequence[str]) -> np.ndarray:
    """(N, min(k, C)) object array of ``"value:index[:label]"`` strings, highest value first, as Triton's
    classification extension answers (Triton formats the value with C++ ``std::to_string``: ``%f``)."""
    rows = array.reshape(len(array), -1).astype(np.float32, copy=False)
    classes = rows.shape[1]
    k = min(class_count, classes)
    labelled = len(class_names) == classes
    top = np.argsort(-rows, axis=1, kind="stable")[:, :k]
    strings = np.empty((len(rows), k), dtype=object)
    for i, (row, indices) in enumerate(zip(rows, top)):
        for j, index in enumerate(indices):
            text = f"{row[index]:f}:{index}"
            strings[i, j] = f"{text}:{class_names[index]}" if labelled else text
    return strings


def _bytes_tensor(strings: np.ndarray) -> bytes:
    """Triton's binary BYTES: each element as a 4-byte little-endian length, then its UTF-8 bytes."""
    parts = []
    for text in strings.reshape(-1):
        encoded = text.encode()
        parts.append(struct.pack("<I", len(encoded)))
        parts.append(encoded)
    return b"".join(parts)


def _parameters(obj: dict, where: str) -> dict:
    parameters = obj.get("parameters", {})
    if not isinstance(parameters, dict):
        raise ProtocolError(400, f"'parameters' of {where} must be a JSON object, got {_json_type(parameters)}")
    return parameters


def _bool_parameter(parameters: dict, key: str, where: str) -> bool:
    value = parameters.get(key, False)
    if not isinstance(value, bool):
        raise ProtocolError(400, f"{key} of {where} must be true or false, got {_clip(value)!r}")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _clip(value: Any, limit: int = 60) -> Any:
    """A value from a request, cut short for a one-line message."""
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + "..."
    if isinstance(value, (list, dict)):
        text = json.dumps(value)
        return text if len(text) <= limit else text[:limit] + "..."
    return value


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
