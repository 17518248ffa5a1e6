"""`twins-deploy serve` as users meet it: the Serve builder and the README's config YAML, usage errors before Ray
starts, a full queue (503 + Retry-After), and Ctrl-C with requests in flight (one server on 127.0.0.1)."""
from __future__ import annotations

import json
import re
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from conftest import tiny_config, tiny_weights
from servers import HOST, leftovers, start_server, stop_server
from test_serving import JPEGS
from twins_deploy.cli import app as cli
from twins_deploy.errors import UsageError

pytest.importorskip("ray.serve", reason="the serve extra (ray[serve]) is part of [test]")
README = Path(__file__).parents[1] / "README.md"
runner = CliRunner()


def test_builder_takes_serve_run_strings_and_names_unknown_options(tiny_svt_onnx):
    from ray.serve import Application

    from twins_deploy.serving import app

    application = app({"model": str(tiny_svt_onnx), "max_batch": "4", "batch_wait_ms": "1.5", "name": "tiny"})
    assert isinstance(application, Application)
    with pytest.raises(UsageError, match="unknown option 'max_batch_size'"):
        app({"model": str(tiny_svt_onnx), "max_batch_size": 4})
    with pytest.raises(UsageError, match="needs 'model'"):
        app({"max_batch": 4})
    with pytest.raises(UsageError, match="max_batch must be a number"):
        app({"model": str(tiny_svt_onnx), "max_batch": "eight"})


def test_readme_config_yaml_is_a_valid_serve_config_for_our_builder(tiny_svt_onnx):
    from ray.serve.schema import ServeDeploySchema

    from twins_deploy.serving import app

    block = re.search(r"```yaml\n(# serve_config.yaml.*?)```", README.read_text(), re.S)
    assert block, "the README has no Serve config YAML"
    config = ServeDeploySchema.model_validate(yaml.safe_load(block.group(1)))
    (application,) = config.applications
    assert application.import_path == "twins_deploy.serving:app"
    module, name = application.import_path.split(":")
    assert getattr(__import__(module, fromlist=[name]), name) is app
    app({**application.args, "model": str(tiny_svt_onnx)})  # every option the README sets is one we take


@pytest.mark.parametrize("args, words", [
    ([], "pass a model file"),
    (["notes.txt"], "serve runs an exported .onnx file or an OpenVINO IR"),
    (["missing.onnx"], "model file not found"),
    (["MODEL", "--replicas", "3", "--num-cpus", "2"], "3 replicas x 1 CPUs need 3 CPUs"),
    (["MODEL", "--min-replicas", "2"], "--min-replicas and --max-replicas go together"),
    (["MODEL", "--max-batch", "0"], "--max-batch must be a whole number of at least 1"),
    (["MODEL", "--name", "a/b"], "--name may hold"),
    (["MODEL", "--threads", "2", "--streams", "3"], "--streams (3) cannot exceed --threads (2)"),
    (["MODEL", "--address", "127.0.0.1:1"], "cannot reach a Ray cluster at 127.0.0.1:1"),
])
def test_usage_errors_are_one_line_before_ray_starts(tiny_svt_onnx, tmp_path, monkeypatch, args, words):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("not a model")
    result = runner.invoke(cli, ["serve", *[str(tiny_svt_onnx) if a == "MODEL" else a for a in args]])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], result.output


def test_a_busy_port_is_one_line_before_ray_starts(tiny_svt_onnx):
    """The ingress replica listens on --port itself (direct ingress): a port in use is refused up front."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runner.invoke(cli, ["serve", str(tiny_svt_onnx), "--port", str(port)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and f"cannot listen on 127.0.0.1:{port}: Address already in use" in lines[0], lines


def test_ports_we_pick_are_outside_the_ranges_a_starting_ray_binds(monkeypatch):
    """Serve's fallback proxy once lost the port a bind-to-0 probe returned to a Ray process starting beside it:
    ports we pick lie between Ray's worker ports and the kernel's ephemeral range, and are free (both, for pairs)."""
    from twins_deploy import raylocal

    ephemeral_start = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(20):
        port = raylocal.port_ray_leaves_free(pairs=True)
        assert raylocal.RAY_WORKER_PORTS_END <= port < port + 1 < ephemeral_start
        assert raylocal.bind_error(HOST, port) is None and raylocal.bind_error(HOST, port + 1) is None
    monkeypatch.setattr(raylocal.random, "randrange", lambda n: 0)  # probe from the range's first port
    with socket.socket() as taken:
        taken.bind((HOST, raylocal.RAY_WORKER_PORTS_END))
        assert raylocal.port_ray_leaves_free() == raylocal.RAY_WORKER_PORTS_END + 1


def test_an_openvino_ir_ships_as_bytes_and_runs_from_them(tiny_svt_onnx, tmp_path):
    """Replicas get the IR's .xml and .bin as bytes; the Predictor made from them equals the one on the files."""
    from twins_deploy.engines.openvino_backend import build_ir
    from twins_deploy.runtime import Predictor
    from twins_deploy.serving.model_file import ModelFile

    xml = tmp_path / "tiny.xml"
    build_ir(tiny_svt_onnx, xml, "fp32")
    shipped = ModelFile.read(xml)
    assert sorted(shipped.files) == ["tiny.bin", "tiny.xml"]
    described = shipped.describe("tiny")
    assert (described.platform, described.output_name, described.output_dim) == ("openvino", "logits", 10)
    batch = np.random.default_rng(0).standard_normal((3, 3, 224, 224)).astype(np.float32)
    np.testing.assert_allclose(shipped.predictor(threads=1).run(batch), Predictor(xml, threads=1).run(batch),
                               atol=1e-6)


def test_an_engine_call_alone_gets_every_thread_and_calls_at_once_share_them(tiny_svt_onnx):
    """A replica's first call at low load runs on a session with every thread; one that starts while another
    runs takes a stream's share. Answers equal the Predictor's either way."""
    import asyncio

    from twins_deploy.runtime import Predictor
    from twins_deploy.serving.deployments import EngineCalls
    from twins_deploy.serving.model_file import ModelFile

    engine = EngineCalls(ModelFile.read(tiny_svt_onnx), threads=2, streams=2)
    threads = {name: predictor.session.get_session_options().intra_op_num_threads
               for name, predictor in (("alone", engine.alone), ("sharing", engine.sharing))}
    assert threads == {"alone": 2, "sharing": 1}
    images = np.random.default_rng(0).standard_normal((3, *engine.sharing.input_shape)).astype(np.float32)

    async def calls():
        first = await engine.run(images[:1])  # nothing else running: alone
        return [first, *await asyncio.gather(engine.run(images[1:2]), engine.run(images[2:]))]  # alone, sharing

    outputs = asyncio.run(calls())
    assert engine.calls == {"alone": 2, "sharing": 1}
    np.testing.assert_allclose(np.concatenate(outputs), Predictor(tiny_svt_onnx, threads=1).run(images), atol=1e-5)
    single = EngineCalls(ModelFile.read(tiny_svt_onnx), threads=2, streams=1)
    assert single.alone is single.sharing


def test_the_default_batch_is_one_image_on_openvino_streams_and_timed_otherwise(tiny_svt_onnx, tmp_path):
    from twins_deploy.engines.openvino_backend import build_ir
    from twins_deploy.serving.deployments import EngineCalls
    from twins_deploy.serving.model_file import ModelFile
    from twins_deploy.serving.options import AUTO_BATCHES

    ir = tmp_path / "tiny.xml"
    build_ir(tiny_svt_onnx, ir, "fp32")
    assert EngineCalls(ModelFile.read(ir), threads=2, streams=2).default_batch() == \
        (1, "one image per call on OpenVINO's streams")
    for model, streams in ((ir, 1), (tiny_svt_onnx, 2)):
        size, how = EngineCalls(ModelFile.read(model), threads=2, streams=streams).default_batch()
        assert size in AUTO_BATCHES and how == "timed at start"


def test_only_loopback_hosts_pass_without_a_warning():
    from twins_deploy.serving.server import is_loopback

    assert all(is_loopback(host) for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"))
    assert not any(is_loopback(host) for host in ("0.0.0.0", "::", "10.1.2.3", "example.com"))


@pytest.fixture(scope="module")
def embedding_onnx(tmp_path_factory) -> Path:
    from twins_deploy.exporters import export_onnx
    from twins_deploy.models import create_model

    model = create_model(tiny_config("tiny-svt"), weights=tiny_weights("tiny-svt"))
    return export_onnx(model, tmp_path_factory.mktemp("embedding") / "tiny-embedding.onnx", head="embedding").path


@pytest.fixture(scope="module")
def small_server(embedding_onnx, tmp_path_factory):
    """An embedding export; one replica taking one request at a time, one request queued: easy to fill."""
    server = start_server(embedding_onnx, tmp_path_factory.mktemp("serve-cli"), "--replicas", "1", "--threads", "1",
                          "--max-batch", "1", "--max-queued", "1", "--num-cpus", "2", "--name", "tiny")
    server.name = "tiny"
    yield server
    stop_server(server)


def test_an_embedding_export_answers_vectors_equal_to_the_predictor(small_server, embedding_onnx):
    from twins_deploy.runtime import Predictor

    status, _, answer = small_server.predict(_form(JPEGS[:2]), "multipart/form-data; boundary=b")
    assert status == 200 and "predictions" not in answer, answer
    expected = Predictor(embedding_onnx, providers=["cpu"], threads=1).embed(JPEGS[:2])
    np.testing.assert_allclose(answer["embeddings"], expected, atol=1e-5)
    status, _, body = small_server.request("/v2/models/tiny")
    assert json.loads(body)["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, expected.shape[1]]}]


def test_a_full_queue_is_503_with_retry_after_and_the_server_keeps_serving(small_server):
    form = _form(JPEGS * 4)  # 16 images a request: slow enough to queue behind
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: small_server.predict(form, "multipart/form-data; boundary=b"), range(16)))
    busy = [(headers, answer) for status, headers, answer in answers if status == 503]
    assert busy, f"no request was refused: statuses {[a[0] for a in answers]}"
    assert all(headers.get("retry-after") and "queue is full" in answer["error"] for headers, answer in busy)
    assert {status for status, _, _ in answers} <= {200, 503}
    assert small_server.predict(JPEGS[0])[0] == 200


def test_ctrl_c_answers_requests_in_flight_then_exits_0_and_leaves_no_ray_process(small_server):
    """A request whose body is still being sent when Ctrl-C comes is in flight for sure: it is answered."""
    jpeg = JPEGS[1]
    head = (f"POST /v1/models/tiny/predict HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: image/jpeg\r\n"
            f"Content-Length: {len(jpeg)}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection((HOST, small_server.port), timeout=60) as conn:
        conn.sendall(head + jpeg[:100])
        time.sleep(1.0)  # the ingress has the request and waits for the rest of its body
        small_server.process.send_signal(signal.SIGINT)
        time.sleep(1.0)
        conn.sendall(jpeg[100:])
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert small_server.process.wait(timeout=90) == 0, small_server.output()
    assert not leftovers(small_server), leftovers(small_server)
    assert "Traceback" not in small_server.output()


def _form(images: list[bytes]) -> bytes:
    return b"".join(b'--b\r\nContent-Disposition: form-data; name="file"\r\n\r\n' + data + b"\r\n"
                    for data in images) + b"--b--\r\n"
