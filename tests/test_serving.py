"""`twins-deploy serve` for real: Ray Serve on 127.0.0.1 (2 CPUs, one server for the module, 2 model replicas),
real HTTP, answers equal to the Predictor, tritonclient, bad inputs, a replica SIGKILLed under load, SIGTERM."""
from __future__ import annotations

import ipaddress
import json
import signal
import socket
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psutil
import pytest
from PIL import Image

from servers import HOST, encoded, leftovers, start_server, stop_server
from twins_deploy.runtime import Predictor

pytest.importorskip("ray.serve", reason="the serve extra (ray[serve]) is part of [test]")


def _picture(seed: int, size=(260, 200)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)


PICTURES = [_picture(seed) for seed in range(4)]
JPEGS = [encoded(picture, "JPEG", quality=92) for picture in PICTURES]


@pytest.fixture(scope="module")
def predictor(tiny_svt_onnx) -> Predictor:
    return Predictor(tiny_svt_onnx, providers=["cpu"], threads=1)


@pytest.fixture(scope="module")
def server(tiny_svt_onnx, tmp_path_factory):
    server = start_server(tiny_svt_onnx, tmp_path_factory.mktemp("serve"), "--replicas", "2", "--threads", "1",
                          "--max-body-mb", "8", "--top-k", "3", "--num-cpus", "2")
    yield server
    stop_server(server)


def test_v1_predict_equals_the_predictor_for_each_format(server, predictor):
    image = PICTURES[0]
    for fmt, content_type in (("JPEG", "image/jpeg"), ("PNG", "image/png"), ("WEBP", "image/webp")):
        data = encoded(image, fmt)
        status, headers, answer = server.predict(data, content_type)
        assert status == 200, answer
        expected = predictor.predict(data, top_k=3)
        (got,) = answer["predictions"]
        assert got["class_ids"] == list(expected.class_ids) and got["names"] == list(expected.names)
        np.testing.assert_allclose(got["probs"], expected.probs, atol=1e-5)
        assert answer["model"] == "custom" and answer["server_ms"] > 0 and headers["twins-deploy-replica"]


def test_v1_multipart_form_answers_every_file_in_order(server, predictor):
    boundary = "twinsboundary"
    parts = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{i}.jpg"\r\n'
        f"Content-Type: image/jpeg\r\n\r\n".encode() + data + b"\r\n" for i, data in enumerate(JPEGS))
    body = parts + f"--{boundary}--\r\n".encode()
    status, _, answer = server.predict(body, f"multipart/form-data; boundary={boundary}", "?top_k=2")
    assert status == 200, answer
    expected = predictor.predict(JPEGS, top_k=2)
    assert [p["class_ids"] for p in answer["predictions"]] == [list(e.class_ids) for e in expected]
    np.testing.assert_allclose([p["probs"] for p in answer["predictions"]], [e.probs for e in expected], atol=1e-5)


def test_v2_health_metadata_and_ready(server):
    assert server.request("/v2/health/live")[0] == 200
    assert server.request("/v2/health/ready")[0] == 200
    assert server.request("/v2/models/custom/ready")[0] == 200
    status, _, body = server.request("/v2/models/custom")
    meta = json.loads(body)
    assert status == 200
    assert meta["inputs"] == [{"name": "pixel_values", "datatype": "FP32", "shape": [-1, 3, 224, 224]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    assert "binary_tensor_data" in json.loads(server.request("/v2")[2])["extensions"]


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_http_infer(server, predictor, binary):
    import tritonclient.http as triton

    client = triton.InferenceServerClient(f"{HOST}:{server.port}")
    assert client.is_server_live() and client.is_model_ready("custom")
    assert client.get_model_metadata("custom")["inputs"][0]["name"] == "pixel_values"
    batch = predictor.preprocess(JPEGS[:2])
    pixels = triton.InferInput("pixel_values", list(batch.shape), "FP32")
    pixels.set_data_from_numpy(batch, binary_data=binary)
    logits = triton.InferRequestedOutput("logits", binary_data=binary)
    result = client.infer("custom", [pixels], outputs=[logits])
    np.testing.assert_allclose(result.as_numpy("logits"), predictor.run(batch), atol=1e-5)
    gzipped = client.infer("custom", [pixels], outputs=[logits], request_compression_algorithm="gzip")
    np.testing.assert_allclose(gzipped.as_numpy("logits"), result.as_numpy("logits"), atol=1e-6)
    top2 = client.infer("custom", [pixels], outputs=[triton.InferRequestedOutput("logits", binary_data=binary,
                                                                                  class_count=2)])
    best = [int(_text(row[0]).split(":")[1]) for row in top2.as_numpy("logits")]  # "score:index:name"
    assert best == [p.class_ids[0] for p in predictor.predict(list(batch))]


def _text(value) -> str:
    """tritonclient gives BYTES as bytes from binary data and as str from JSON, as with Triton itself."""
    return value.decode() if isinstance(value, bytes) else value


def _v2(server, tensor: dict) -> tuple[int, dict]:
    status, _, body = server.request("/v2/models/custom/infer", json.dumps({"inputs": [tensor]}).encode(),
                                     {"content-type": "application/json"})
    return status, json.loads(body)


def _raw_request(port: int, head: bytes, body: bytes = b"", wait: float = 20) -> bytes:
    """Send a request by hand (to promise a body and not send it) and read what comes back."""
    with socket.create_connection((HOST, port), timeout=wait) as conn:
        conn.sendall(head + body)
        received = b""
        while b"\r\n\r\n" not in received or len(received) < 12:
            chunk = conn.recv(65536)
            if not chunk:
                break
            received += chunk
        return received


def test_bad_inputs_get_one_line_errors_and_the_next_request_is_answered(server, predictor):
    jpeg = JPEGS[1]
    bomb = encoded(Image.new("1", (10000, 10000)), "PNG")  # 12 kB that decode to 100 Mpx
    cases = [
        (server.predict(b"plain text, not an image", "text/plain"), 400, "cannot be decoded"),
        (server.predict(jpeg[: len(jpeg) // 2]), 400, "cannot be decoded"),
        (server.predict(b""), 400, "empty"),
        (server.predict(bomb, "image/png"), 413, "pixels"),
        (server.predict(jpeg, query="?top_k=0"), 400, "top_k"),
        (server.predict(b"--x\r\n\r\n", "multipart/form-data; boundary=x"), 400, "file"),
    ]
    for (status, _, answer), expected_status, words in cases:
        assert status == expected_status and words in answer["error"], answer
        assert "\n" not in answer["error"] and "Traceback" not in answer["error"]
    status, _, body = server.request("/v1/models/nope/predict", jpeg, {"content-type": "image/jpeg"})
    assert status == 404 and "nope" in json.loads(body)["error"]
    ok = [1.0] * (3 * 224 * 224)
    v2_cases = [
        ({"name": "image", "shape": [1, 3, 224, 224], "datatype": "FP32", "data": ok}, "pixel_values"),
        ({"name": "pixel_values", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": ok[:3072]}, "shape"),
        ({"name": "pixel_values", "shape": [1, 3, 224, 224], "datatype": "INT64", "data": ok}, "FP32"),
        ({"name": "pixel_values", "shape": [1, 3, 224, 224], "datatype": "FP32", "data": ok[:-1]}, "data"),
    ]
    for tensor, words in v2_cases:
        status, answer = _v2(server, tensor)
        assert status == 400 and words in answer["error"], answer
    status, _, body = server.request("/v2/models/custom/infer", b"{not json", {"content-type": "application/json"})
    assert status == 400 and "error" in json.loads(body)
    # Over --max-body-mb (8 MB): refused from the header while the body is still unsent.
    answer = _raw_request(server.port, b"POST /v1/models/custom/predict HTTP/1.1\r\nHost: x\r\n"
                                       b"Content-Type: image/jpeg\r\nContent-Length: 50000000\r\n\r\n", b"\xff\xd8")
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    status, _, good = server.predict(jpeg)
    assert status == 200 and good["predictions"][0]["class_ids"] == list(predictor.predict(jpeg, top_k=3).class_ids)


def test_metrics_port_serves_serves_prometheus_metrics(server):
    """Serve's request counts, latency histograms and queue lengths (exported every few seconds)."""
    wanted = ("ray_serve_num_http_requests_total", "ray_serve_http_request_latency_ms_bucket",
              "ray_serve_deployment_processing_latency_ms_bucket", "ray_serve_deployment_queued_queries")
    deadline = time.monotonic() + 90
    missing = wanted
    while missing and time.monotonic() < deadline:
        server.predict(JPEGS[0])
        with urllib.request.urlopen(f"http://{HOST}:{server.metrics_port}/metrics", timeout=10) as response:
            text = response.read().decode()
        missing = [name for name in wanted if name not in text]
        time.sleep(2)
    assert not missing, f"not exported within 90 s: {missing}"


def test_every_ray_socket_listens_on_loopback(server):
    ours = {server.process.pid, *(p.pid for p in psutil.Process(server.process.pid).children(recursive=True))}
    listening = [c for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN and c.pid in ours]
    assert listening, "no listening socket found for the server's processes"
    exposed = sorted({(c.laddr.ip, c.laddr.port) for c in listening if not _loopback(c.laddr.ip)})
    assert not exposed, f"listening beyond loopback: {exposed}"


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return address.is_loopback or bool(getattr(address, "ipv4_mapped", None) and address.ipv4_mapped.is_loopback)


def test_a_replica_killed_under_load_loses_no_request(server, predictor):
    """32 clients in a loop; one model replica SIGKILLed mid-load: every request is answered 200 with the right
    class, and a replacement replica (a new replica id) answers within 15 s of the kill."""
    expected = [predictor.predict(jpeg, top_k=3).class_ids[0] for jpeg in JPEGS]
    replicas = server.replica_processes()
    assert len(replicas) == 2
    before: set[str] = set()
    for _ in range(100):
        before.add(server.predict(JPEGS[0])[1]["twins-deploy-replica"])
        if len(before) == 2:
            break
    assert len(before) == 2, "requests never reached the second replica"
    results: list[tuple[int, int, int | None, str | None, float]] = []
    killed_at: list[float] = []
    replaced = threading.Event()
    stop_at = time.monotonic() + 45  # bounded in time, and in count below

    def client(worker: int) -> None:
        for i in range(400):
            if time.monotonic() > stop_at or (replaced.is_set() and time.monotonic() > killed_at[0] + 16):
                return
            index = (worker + i) % len(JPEGS)
            status, headers, answer = server.predict(JPEGS[index])
            replica = headers.get("twins-deploy-replica")
            best = answer["predictions"][0]["class_ids"][0] if status == 200 else None
            results.append((index, status, best, replica, time.monotonic()))
            if killed_at and replica not in before:
                replaced.set()

    with ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(client, worker) for worker in range(32)]
        deadline = time.monotonic() + 60
        while len(results) < 64 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(results) >= 64, "the load did not start"
        killed_at.append(time.monotonic())
        replicas[0].send_signal(signal.SIGKILL)  # one of this server's own replicas
        for future in futures:
            future.result()
    failures = [(i, status) for i, status, best, _, _ in results if status != 200 or best != expected[i]]
    assert not failures, f"{len(failures)} of {len(results)} requests failed: {failures[:5]}"
    after_kill = [t for _, _, _, _, t in results if t > killed_at[0]]
    assert len(after_kill) >= 32, "too few requests were in flight or sent after the kill"
    replacement = [t for _, _, _, replica, t in results if replica not in before]
    assert replacement, "no replacement replica answered"
    assert replacement[0] - killed_at[0] < 15, f"the replacement answered {replacement[0] - killed_at[0]:.1f} s after"
    assert len(server.replica_processes()) == 2


def test_sigterm_answers_requests_in_flight_then_exits_0_and_leaves_no_ray_process(server, predictor):
    """The module's last test: it stops the module's server while 8 requests of 16 images each are in flight."""
    boundary = "b"
    form = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="file"\r\n\r\n'.encode() + JPEGS[i % 4]
                    + b"\r\n" for i in range(16)) + f"--{boundary}--\r\n".encode()
    finished: list[float] = []

    def request():
        answer = server.predict(form, f"multipart/form-data; boundary={boundary}")
        finished.append(time.monotonic())
        return answer

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(request) for _ in range(8)]
        time.sleep(0.3)
        signalled = time.monotonic()
        code = stop_server(server, signal.SIGTERM)
        answers = [future.result() for future in futures]
    assert code == 0, server.output()
    assert all(status == 200 and len(answer["predictions"]) == 16 for status, _, answer in answers), answers[0]
    assert max(finished) > signalled, "every request finished before the signal: none was in flight"
    assert not leftovers(server), leftovers(server)
