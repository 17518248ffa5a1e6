"""The Open Inference Protocol codec against tritonclient.http itself: requests built by the client are
parsed, responses we encode are decoded by the client's own InferResult. No server, no Ray."""
from __future__ import annotations

import json

import numpy as np
import pytest
from tritonclient.http import InferenceServerClient, InferInput, InferRequestedOutput, InferResult

from twins_deploy.serving.protocol import (
    HEADER_LENGTH,
    InferRequest,
    ProtocolError,
    RequestedOutput,
    encode_infer_response,
    model_metadata,
    parse_infer_request,
    server_metadata,
)

IMAGE = (3, 8, 8)  # the codec is size-agnostic; small images keep JSON tensors short
CLASSES = tuple(f"class {i}" for i in range(10))
MODEL = dict(input_name="pixel_values", image_shape=IMAGE, output_names=("logits",), max_batch=4)


def client_request(batch: np.ndarray, binary: bool = True, outputs=None, request_id: str = "",
                   datatype: str = "FP32", name: str = "pixel_values") -> tuple[bytes, int | None]:
    """The body and Inference-Header-Content-Length that tritonclient.http sends for ``batch``."""
    tensor = InferInput(name, list(batch.shape), datatype)
    tensor.set_data_from_numpy(batch, binary_data=binary)
    return InferenceServerClient.generate_request_body([tensor], outputs=outputs, request_id=request_id)


def client_result(body: bytes, headers: dict[str, str]) -> InferResult:
    """What tritonclient.http makes of our response (the header lookup as the client does it)."""
    length = headers.get(HEADER_LENGTH.lower())
    return InferResult.from_response_body(body, header_length=None if length is None else int(length))


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *IMAGE)).astype(np.float32)


def logits_for(batch: np.ndarray) -> np.ndarray:
    """Stand-in model outputs: one distinct row per image, all classes apart."""
    rng = np.random.default_rng(len(batch))
    return rng.permutation(len(CLASSES) * len(batch)).reshape(len(batch), len(CLASSES)).astype(np.float32) / 7


def top_k_strings(logits: np.ndarray, k: int, labels=CLASSES) -> list[list[str]]:
    """Triton's classification strings, written independently: value with %f, index, label."""
    rows = []
    for row in logits:
        order = sorted(range(len(row)), key=lambda i: -row[i])[:k]
        rows.append([f"{'%f' % row[i]}:{i}" + (f":{labels[i]}" if labels else "") for i in order])
    return rows


@pytest.mark.parametrize("binary_in", [True, False], ids=["binary-input", "json-input"])
@pytest.mark.parametrize("binary_out", [True, False], ids=["binary-output", "json-output"])
def test_tritonclient_round_trip(binary_in, binary_out):
    batch = images(3)
    body, header_length = client_request(batch, binary_in, [InferRequestedOutput("logits", binary_data=binary_out)],
                                         request_id="req-7")
    assert (header_length is not None) == binary_in  # the client's own framing, not ours
    request = parse_infer_request(body, header_length, **MODEL)
    assert request.id == "req-7" and request.batch.dtype == np.float32
    np.testing.assert_array_equal(request.batch, batch)
    assert request.outputs == (RequestedOutput("logits", binary_out, 0),)

    logits = logits_for(batch)
    response, headers = encode_infer_response("tiny", "1", request, {"logits": logits}, CLASSES)
    assert (HEADER_LENGTH.lower() in headers) == binary_out
    assert headers["content-type"] == ("application/octet-stream" if binary_out else "application/json")
    result = client_result(response, headers)
    np.testing.assert_array_equal(result.as_numpy("logits"), logits)  # float32 survives JSON exactly
    assert result.as_numpy("logits").dtype == np.float32
    assert result.get_response()["model_name"] == "tiny" and result.get_response()["model_version"] == "1"
    assert result.get_response()["id"] == "req-7"


def test_client_defaults_ask_for_every_output_in_binary():
    """tritonclient with no outputs sets binary_data_output: every model output comes back binary."""
    batch = images(2)
    request = parse_infer_request(*client_request(batch), **MODEL)
    assert request.binary_output_default and request.outputs == (RequestedOutput("logits", True, 0),)
    response, headers = encode_infer_response("tiny", None, request, {"logits": logits_for(batch)})
    result = client_result(response, headers)
    np.testing.assert_array_equal(result.as_numpy("logits"), logits_for(batch))
    assert "model_version" not in result.get_response() and "id" not in result.get_response()


@pytest.mark.parametrize("binary_out", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("k", [1, 3, 25], ids=["top1", "top3", "more-than-classes"])
def test_classification_extension(binary_out, k):
    batch = images(2)
    outputs = [InferRequestedOutput("logits", binary_data=binary_out, class_count=k)]
    request = parse_infer_request(*client_request(batch, outputs=outputs), **MODEL)
    assert request.outputs == (RequestedOutput("logits", binary_out, k),)
    logits = logits_for(batch)
    result = client_result(*encode_infer_response("tiny", "1", request, {"logits": logits}, CLASSES))
    output = result.get_output("logits")
    assert output["datatype"] == "BYTES" and output["shape"] == [2, min(k, len(CLASSES))]  # Triton clamps k
    strings = [[s.decode() if isinstance(s, bytes) else s for s in row] for row in result.as_numpy("logits")]
    assert strings == top_k_strings(logits, k)


def test_classification_without_labels_gives_value_and_index():
    """Labels only when there is one per class (an embedding output has none): "value:index" as Triton."""
    batch = images(1)
    outputs = [InferRequestedOutput("logits", binary_data=False, class_count=2)]
    request = parse_infer_request(*client_request(batch, outputs=outputs), **MODEL)
    logits = logits_for(batch)
    result = client_result(*encode_infer_response("tiny", "1", request, {"logits": logits}, class_names=()))
    assert result.as_numpy("logits").tolist() == top_k_strings(logits, 2, labels=None)


def test_full_size_image_in_binary():
    """A real model's input (3, 224, 224) at batch 8, as the client sends it by default."""
    shape = (3, 224, 224)
    batch = np.random.default_rng(1).standard_normal((8, *shape)).astype(np.float32)
    request = parse_infer_request(*client_request(batch), input_name="pixel_values", image_shape=shape,
                                  output_names=("logits",), max_batch=32)
    np.testing.assert_array_equal(request.batch, batch)


def test_json_data_nested_as_the_shape():
    """The protocol lets JSON tensors be flat or nested; tritonclient sends flat, curl users often nest."""
    batch = images(2)
    body = json.dumps({"inputs": [{"name": "pixel_values", "shape": [2, *IMAGE], "datatype": "FP32",
                                   "data": batch.tolist()}]}).encode()
    request = parse_infer_request(body, None, **MODEL)
    np.testing.assert_array_equal(request.batch, batch)
    assert request.outputs == (RequestedOutput("logits", False, 0),)  # no binary_data_output: JSON


def test_integer_json_data_is_accepted_as_fp32():
    body = json.dumps({"inputs": [{"name": "pixel_values", "shape": [1, *IMAGE], "datatype": "FP32",
                                   "data": [1] * int(np.prod(IMAGE))}]}).encode()
    request = parse_infer_request(body, None, **MODEL)
    assert request.batch.dtype == np.float32 and (request.batch == 1).all()


def test_header_length_as_the_http_header_string():
    batch = images(1)
    body, length = client_request(batch)
    np.testing.assert_array_equal(parse_infer_request(body, str(length), **MODEL).batch, batch)


def test_nan_output_cannot_go_as_json_but_can_as_binary():
    batch = images(1)
    logits = logits_for(batch)
    logits[0, 3] = np.nan
    json_request = parse_infer_request(*client_request(batch, outputs=[InferRequestedOutput("logits", False)]),
                                       **MODEL)
    with pytest.raises(ProtocolError) as error:
        encode_infer_response("tiny", "1", json_request, {"logits": logits})
    assert error.value.status == 500 and "binary_data=true" in error.value.message
    binary_request = parse_infer_request(*client_request(batch), **MODEL)
    result = client_result(*encode_infer_response("tiny", "1", binary_request, {"logits": logits}))
    np.testing.assert_array_equal(result.as_numpy("logits"), logits)


def test_metadata():
    metadata = model_metadata("tiny", ["1"], "onnxruntime_onnx", "pixel_values", (3, 224, 224), {"logits": (1000,)})
    assert metadata == {"name": "tiny", "versions": ["1"], "platform": "onnxruntime_onnx",
                        "inputs": [{"name": "pixel_values", "datatype": "FP32", "shape": [-1, 3, 224, 224]}],
                        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 1000]}]}
    server = server_metadata()
    assert server["name"] == "twins-deploy" and server["version"]
    assert {"binary_tensor_data", "classification"} <= set(server["extensions"])


def _json_request(**changes) -> bytes:
    """A valid JSON request for one image, with fields of the input (or of the request) changed."""
    tensor = {"name": "pixel_values", "shape": [1, *IMAGE], "datatype": "FP32",
              "data": [0.5] * int(np.prod(IMAGE))}
    request = {"inputs": [tensor]}
    for key, value in changes.items():
        if key.startswith("request_"):
            request[key.removeprefix("request_")] = value
        elif value is None:
            tensor.pop(key)
        else:
            tensor[key] = value
    return json.dumps(request).encode()


def _binary_request(batch=None, size=None, trailing=b"", cut=0, **tensor_changes) -> tuple[bytes, int]:
    batch = images(1) if batch is None else batch
    raw = batch.tobytes()
    tensor = {"name": "pixel_values", "shape": list(batch.shape), "datatype": "FP32",
              "parameters": {"binary_data_size": len(raw) if size is None else size}, **tensor_changes}
    header = json.dumps({"inputs": [tensor]}).encode()
    body = header + raw + trailing
    return body[:len(body) - cut], len(header)


N = int(np.prod(IMAGE))
BAD_REQUESTS = {
    # name: (body, header length, words the one-line message must hold)
    "not-json": (b"{not json", None, "not valid JSON"),
    "not-utf8": (b'{"inputs": "\xff\xfe"}', None, "not valid JSON"),
    "json-list": (b"[1, 2]", None, "must be a JSON object, got a list"),
    "empty-body": (b"", None, "not valid JSON"),
    "deeply-nested": (b"[" * 100_000 + b"]" * 100_000, None, "nested too deeply"),
    "huge-integer": (b'{"inputs": ' + b"9" * 5000 + b"}", None, "a number too long to read"),
    "no-inputs": (b'{"outputs": []}', None, "needs 'inputs'"),
    "two-inputs": (json.dumps({"inputs": [json.loads(_json_request())["inputs"][0]] * 2}).encode(), None,
                   "has 2 inputs; this model takes one, 'pixel_values'"),
    "wrong-name": (_json_request(name="images"), None, "unknown input 'images'"),
    "fp16": (_json_request(datatype="FP16"), None, "datatype 'FP16'; this model takes FP32"),
    "uint8": (_json_request(datatype="UINT8"), None, "datatype 'UINT8'"),
    "no-datatype": (_json_request(datatype=None), None, "datatype None"),
    "wrong-size": (_json_request(shape=[1, 3, 16, 16]), None, "has shape [1, 3, 16, 16]; this model takes [N, 3, 8, 8]"),
    "wrong-rank": (_json_request(shape=[3, 8, 8]), None, "has shape [3, 8, 8]"),
    "batch-zero": (_json_request(shape=[0, *IMAGE], data=[]), None, "has shape [0, 3, 8, 8]"),
    "batch-over-max": (_json_request(shape=[5, *IMAGE], data=[0.5] * 5 * N), None, "with N from 1 to 4"),
    "shape-not-list": (_json_request(shape="1,3,8,8"), None, "needs 'shape', a list of integers"),
    "shape-floats": (_json_request(shape=[1.0, 3, 8, 8]), None, "needs 'shape', a list of integers"),
    "shape-bools": (_json_request(shape=[True, 3, 8, 8]), None, "needs 'shape', a list of integers"),
    "no-data": (_json_request(data=None), None, "has no 'data' and no binary_data_size"),
    "data-short": (_json_request(data=[0.5] * (N - 1)), None, f"'data' has {N - 1} values but shape [1, 3, 8, 8] "
                                                              f"takes {N}"),
    "data-long": (_json_request(data=[0.5] * (N + 1)), None, f"'data' has {N + 1} values"),
    "data-not-list": (_json_request(data="0.5"), None, "'data' must be a list of numbers, got a string"),
    "data-strings": (_json_request(data=["0.5"] * N), None, "numbers only"),
    "data-mixed": (_json_request(data=[0.5] * (N - 1) + ["x"]), None, "numbers only"),
    "data-nulls": (_json_request(data=[None] * N), None, "numbers only"),
    "data-bools": (_json_request(data=[True] * N), None, "numbers only"),
    "data-ragged": (_json_request(data=[[[[0.5] * 8] * 8, [[0.5] * 8] * 8, [[0.5] * 7] * 8]]), None,
                    "nested as shape"),
    "data-nested-wrong": (_json_request(data=[[[0.5] * 64] * 3]), None, "192 values nested as [1, 3, 64]"),
    "data-nan": (_json_request(request_parameters={}, data=[float("nan")] * N), None, "NaN or infinity"),
    "data-overflow": (_json_request(data=[1e39] * N), None, "NaN or infinity"),
    "id-not-string": (_json_request(request_id=7), None, "'id' must be a string"),
    "parameters-not-object": (_json_request(request_parameters=[1]), None, "'parameters' of the request must be"),
    "binary-output-not-bool": (_json_request(request_parameters={"binary_data_output": "yes"}), None,
                               "binary_data_output of the request must be true or false"),
    "unknown-output": (_json_request(request_outputs=[{"name": "probs"}]), None,
                       "unknown output 'probs': this model answers 'logits'"),
    "output-twice": (_json_request(request_outputs=[{"name": "logits"}] * 2), None, "requested twice"),
    "outputs-empty": (_json_request(request_outputs=[]), None, "'outputs' is empty"),
    "outputs-not-list": (_json_request(request_outputs={"name": "logits"}), None, "'outputs' must be a list"),
    "binary-data-not-bool": (_json_request(request_outputs=[{"name": "logits", "parameters": {"binary_data": 1}}]),
                             None, "binary_data must be true or false"),
    "classification-negative": (
        _json_request(request_outputs=[{"name": "logits", "parameters": {"classification": -1}}]), None,
        "classification must be a class count"),
    "classification-string": (
        _json_request(request_outputs=[{"name": "logits", "parameters": {"classification": "3"}}]), None,
        "classification must be a class count"),
    "output-shared-memory": (
        _json_request(request_outputs=[{"name": "logits", "parameters": {"shared_memory_region": "r"}}]), None,
        "shared memory"),
    "input-shared-memory": (_json_request(data=None, parameters={"shared_memory_region": "r",
                                                                 "shared_memory_byte_size": 4 * N}), None,
                            "uses shared memory"),
    "binary-size-wrong": (*_binary_request(size=4 * N - 4), f"binary_data_size is {4 * N - 4} bytes but shape "
                                                            f"[1, 3, 8, 8] of FP32 takes {4 * N}"),
    "binary-size-string": (*_binary_request(size="768"), "binary_data_size must be a byte count"),
    "binary-truncated": (*_binary_request(cut=10), f"the body holds {4 * N - 10} bytes after the JSON header"),
    "binary-trailing": (*_binary_request(trailing=b"\0" * 4), f"the body holds {4 * N + 4} bytes"),
    "binary-and-data": (*_binary_request(data=[0.5] * N), "has both 'data' and binary_data_size"),
    "binary-without-header": (_binary_request()[0], None, "no Inference-Header-Content-Length header says where"),
    "binary-but-no-size": (_json_request() + b"\0" * 8, len(_json_request()), "no input gives a binary_data_size"),
    "binary-nan": (*_binary_request(batch=np.full((1, *IMAGE), np.inf, np.float32)), "NaN or infinity"),
    "header-length-too-big": (_binary_request()[0], 10 ** 9, "Inference-Header-Content-Length must be from 1"),
    "header-length-zero": (_binary_request()[0], 0, "Inference-Header-Content-Length must be from 1"),
    "header-length-text": (_binary_request()[0], "ten", "Inference-Header-Content-Length must be a byte count"),
    "header-length-cuts-json": (_binary_request()[0], 20, "not valid JSON"),
    # a huge declared batch is refused from the numbers alone, before any memory is taken for it
    "huge-declared-batch": (*_binary_request(shape=[10 ** 12, *IMAGE]), "has shape [1000000000000, 3, 8, 8]"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=list(BAD_REQUESTS))
def test_bad_request_is_a_400_with_one_line(case):
    body, header_length, words = BAD_REQUESTS[case]
    with pytest.raises(ProtocolError) as error:
        parse_infer_request(body, header_length, **MODEL)
    assert error.value.status == 400
    message = error.value.message
    assert words in message, message
    assert "\n" not in message and len(message) < 300 and error.value.as_dict() == {"error": message}


def test_without_a_batch_limit_the_body_still_bounds_the_work():
    """max_batch=None: a declared batch far beyond the body is refused by the byte count, not allocated."""
    body, length = _binary_request(shape=[10 ** 12, *IMAGE])
    with pytest.raises(ProtocolError, match=r"binary_data_size is 768 bytes but shape \[1000000000000"):
        parse_infer_request(body, length, **{**MODEL, "max_batch": None})


def test_encode_refuses_outputs_of_another_batch():
    """A server bug (rows that do not match the request), not the client's: a ValueError, never a 400."""
    request = InferRequest(id=None, batch=images(2), outputs=(RequestedOutput("logits", False),),
                           binary_output_default=False)
    with pytest.raises(ValueError, match="expected 2 rows"):
        encode_infer_response("tiny", "1", request, {"logits": logits_for(images(3))})
