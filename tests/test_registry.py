"""One registry for every family: names, --config arguments, metadata that rebuilds the model, and
the hub's offline error in seconds."""
from __future__ import annotations

import json
import re
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from conftest import DATA, tiny_weights
from twins_deploy.cli import app
from twins_deploy.errors import UsageError
from twins_deploy.models import FAMILIES, MODELS, TwinsConfig, create_model, resolve_spec

runner = CliRunner()
TINY_SVT = json.loads((DATA / "index.json").read_text())["tiny-svt"]["config"]


def test_every_registered_name_resolves_case_insensitively_to_its_family():
    for name, spec in MODELS.items():
        assert resolve_spec(name.upper()) is spec and spec.family in FAMILIES
    assert {"twins"} < set(FAMILIES)


def test_config_file_replaces_the_variant_configuration(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps({"config": TINY_SVT}))
    spec = resolve_spec("svt-s", path)
    assert spec.name == "svt-s" and spec.config == TwinsConfig(**{k: tuple(v) if isinstance(v, list) else v
                                                                    for k, v in TINY_SVT.items()})
    model = create_model("svt-s", config=path, weights=tiny_weights("tiny-svt"))
    assert model.config.embed_dims == (16, 32, 48, 64)


@pytest.mark.parametrize("config, message", [
    ({"embed_dim": [16, 32, 48, 64]}, "unknown key 'embed_dim' for twins (did you mean 'embed_dims'?)"),
    ({"embed_dims": [16, 30, 48, 64], "num_heads": [1, 4, 3, 4]}, "embed dim 30 is not divisible by 4 heads"),
])
def test_config_errors_name_the_key(config, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        resolve_spec("svt-s", config)


def test_cli_config_error_is_one_line_with_exit_2(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"depth": 3}))
    result = runner.invoke(app, ["export", "-m", "svt-s", "--config", str(tmp_path / "bad.json"), "--weights", "random"])
    assert result.exit_code == 2 and "unknown key 'depth'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    (tmp_path / "broken.json").write_text("{not json")
    result = runner.invoke(app, ["verify", "-e", "onnx", "-m", "svt-s", "--config", str(tmp_path / "broken.json")])
    assert result.exit_code == 2 and "cannot parse config" in result.stderr


def test_export_metadata_rebuilds_the_reference_and_stores_preprocessing(tmp_path):
    from twins_deploy.engines.artifacts import onnx_metadata
    from twins_deploy.engines.verify import reference_model

    (tmp_path / "tiny.json").write_text(json.dumps(TINY_SVT))
    result = runner.invoke(app, ["export", "-m", "svt-s", "--config", str(tmp_path / "tiny.json"), "--weights",
                                 str(tiny_weights("tiny-svt")), "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25",
                                 "--interpolation", "bilinear", "--crop-pct", "1", "-o", str(tmp_path / "t.onnx")])
    assert result.exit_code == 0, result.output
    meta = onnx_metadata(tmp_path / "t.onnx")
    assert (meta.mean, meta.std, meta.interpolation, meta.crop_pct) == ((0.5,) * 3, (0.25,) * 3, "bilinear", 1.0)
    name, arguments = reference_model(meta)
    assert name == "svt-s" and resolve_spec(name, arguments).config.embed_dims == (16, 32, 48, 64)
    result = runner.invoke(app, ["verify", "-e", str(tmp_path / "t.onnx"), "--samples", "4"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("args, message", [
    (["--mean", "0.5,0.5"], "--mean takes three comma-separated numbers"),
    (["--std", "0,1,1"], "above 0"),
    (["--interpolation", "lanczos"], "--interpolation must be one of"),
    (["--crop-pct", "1.5"], "--crop-pct must be in (0, 1]"),
])
def test_preprocessing_options_are_checked(args, message):
    result = runner.invoke(app, ["export", "-m", "svt-s", "--weights", "random", *args])
    assert result.exit_code == 2 and message in result.stderr


def test_pretrained_without_network_fails_within_3_seconds_with_one_line(tmp_path):
    """A closed local port stands for a hub that cannot be reached; nothing here reaches the network."""
    code = ("import time\nfrom twins_deploy.models import create_model\nfrom twins_deploy.errors import TwinsDeployError\n"
            "start = time.perf_counter()\ntry:\n    create_model('svt-s', weights='pretrained')\n"
            "except TwinsDeployError as exc:\n    print(round(time.perf_counter() - start, 2))\n    print(exc)\n")
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": str(tmp_path)}
    env.pop("HF_HUB_OFFLINE", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    seconds, message = done.stdout.strip().splitlines()
    assert float(seconds) < 3.0, done.stdout
    assert "not in the hub cache and the hub (http://127.0.0.1:9) cannot be reached" in message
    assert done.stderr == ""  # no retry noise from huggingface_hub
