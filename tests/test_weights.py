"""Checkpoints in every layout load strictly; anything else fails with a message a user can act on."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_config, tiny_weights
from twins_deploy.errors import TwinsDeployError, UsageError
from twins_deploy.models import create_model
from twins_deploy.models.weights import sha256_of


def _timm_state_dict(name="tiny-svt"):
    return load_file(tiny_weights(name))


@pytest.mark.parametrize("wrap", [
    lambda sd: sd,
    lambda sd: {"model": sd},
    lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3},
], ids=["plain", "model", "state_dict+module", "model+module"])
@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin"])
def test_nested_and_prefixed_checkpoints_load(tmp_path, wrap, suffix):
    reference = _timm_state_dict()
    path = tmp_path / f"ckpt{suffix}"
    torch.save(wrap(reference), path)
    model = create_model(tiny_config("tiny-svt"), weights=path)
    assert all(torch.equal(model.state_dict()[k], reference[k]) for k in reference)
    assert model.weights_source.sha256 == sha256_of(path)


def test_wrong_variant_names_what_it_looks_like(tmp_path):
    svt_b = create_model("svt-b", weights="random").state_dict()
    path = tmp_path / "svt_b.safetensors"
    save_file(svt_b, path)
    with pytest.raises(TwinsDeployError, match="embed dim 96 in stage 1: it looks like svt-b, not svt-s"):
        create_model("svt-s", weights=path)


def test_family_mismatch(tmp_path):
    path = tmp_path / "pcpvt.safetensors"
    save_file(_timm_state_dict("tiny-pcpvt"), path)
    with pytest.raises(TwinsDeployError, match="is a pcpvt with depths"):
        create_model(tiny_config("tiny-svt"), weights=path)


def test_other_class_count_needs_num_classes(tmp_path):
    state = create_model("svt-s", weights="random", num_classes=7).state_dict()
    path = tmp_path / "finetuned.pth"
    torch.save({"state_dict": state}, path)
    with pytest.raises(TwinsDeployError, match="7-class head .* pass --num-classes 7"):
        create_model("svt-s", weights=path)
    model = create_model("svt-s", weights=path, num_classes=7)
    assert model.head.out_features == 7


def test_missing_key_is_reported(tmp_path):
    state = _timm_state_dict()
    del state["blocks.2.1.attn.kv.bias"]
    path = tmp_path / "partial.safetensors"
    save_file(state, path)
    with pytest.raises(TwinsDeployError, match="1 missing keys \\(first: blocks.2.1.attn.kv.bias\\)"):
        create_model(tiny_config("tiny-svt"), weights=path)


def test_not_a_twins_checkpoint(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, path)
    with pytest.raises(TwinsDeployError, match="not a Twins checkpoint"):
        create_model(tiny_config("tiny-svt"), weights=path)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_corrupt_file(tmp_path, suffix):
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(tiny_weights("tiny-svt", "safetensors").read_bytes()[:5000])
    with pytest.raises(TwinsDeployError, match=f"cannot read checkpoint .*broken{suffix}"):
        create_model(tiny_config("tiny-svt"), weights=path)


def test_missing_file_and_bad_suffix(tmp_path):
    with pytest.raises(UsageError, match="checkpoint not found"):
        create_model("svt-s", weights=tmp_path / "nope.pth")
    (tmp_path / "weights.txt").write_text("hello")
    with pytest.raises(UsageError, match="not a checkpoint"):
        create_model("svt-s", weights=tmp_path / "weights.txt")


def test_torch_load_refuses_pickled_code(tmp_path):
    """weights_only=True: a checkpoint holding arbitrary objects is refused, not executed."""
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": Path("/")}}, path)
    with pytest.raises(TwinsDeployError, match="cannot read checkpoint"):
        create_model("svt-s", weights=path)


# ---------------------------------------------------------------------------------------------
# The hub path, against a hub cache the test builds itself (no network here).

def _run_offline(cache: Path, code: str) -> subprocess.CompletedProcess:
    """A fresh interpreter: huggingface_hub reads HF_HUB_OFFLINE and the cache path at import."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(cache.parent)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def _seed_hub_cache(cache: Path, repo_id: str, state: dict) -> Path:
    """The layout huggingface_hub writes: blobs, a snapshot per commit, refs/main naming it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    blob = repo / "blobs" / "a1b2c3"
    blob.parent.mkdir(parents=True)
    save_file(state, blob)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return blob


def test_pretrained_loads_from_hub_cache_offline(tmp_path):
    state = create_model("svt-s", weights="random", seed=11).state_dict()
    blob = _seed_hub_cache(tmp_path / "hub", "timm/twins_svt_small.in1k", state)
    result = _run_offline(tmp_path / "hub", (
        "import torch; from twins_deploy.models import create_model\n"
        "m = create_model('twins_svt_small', weights='pretrained')\n"
        "print(m.weights_source)\nprint(m.weights_source.sha256)\n"
        "print(float(m.state_dict()['head.weight'].double().sum()))"))
    assert result.returncode == 0, result.stderr
    source, sha, head_sum = result.stdout.split()
    assert source == "pretrained:timm/twins_svt_small.in1k"
    assert sha == sha256_of(blob)
    assert float(head_sum) == pytest.approx(float(state["head.weight"].double().sum()), abs=1e-9)


def test_pretrained_missing_from_cache_offline_is_clear(tmp_path):
    (tmp_path / "hub").mkdir()
    result = _run_offline(tmp_path / "hub", (
        "from twins_deploy.models import create_model\n"
        "try:\n    create_model('svt-b', weights='pretrained')\n"
        "except Exception as exc:\n    print(type(exc).__name__, exc)"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("TwinsDeployError pretrained weights for svt-b (timm/twins_svt_base.in1k)")
    assert "HF_HUB_OFFLINE is set" in result.stdout and "--weights PATH" in result.stdout
