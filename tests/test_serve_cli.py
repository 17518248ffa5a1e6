"""`twins-deploy serve` as users meet it: the Serve builder and the README's config YAML, usage errors before Ray
starts, a full queue (503 + Retry-After), and Ctrl-C with requests in flight (one server on 127.0.0.1)."""
from __future__ import annotations

import re
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

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
])
def test_usage_errors_are_one_line_before_ray_starts(tiny_svt_onnx, tmp_path, monkeypatch, args, words):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("not a model")
    result = runner.invoke(cli, ["serve", *[str(tiny_svt_onnx) if a == "MODEL" else a for a in args]])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], result.output


@pytest.fixture(scope="module")
def small_server(tiny_svt_onnx, tmp_path_factory):
    """One replica taking one image at a time, one request queued: easy to fill."""
    server = start_server(tiny_svt_onnx, tmp_path_factory.mktemp("serve-cli"), "--replicas", "1", "--threads", "1",
                          "--max-batch", "1", "--max-queued", "1", "--num-cpus", "2", "--name", "tiny")
    server.name = "tiny"
    yield server
    stop_server(server)


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
