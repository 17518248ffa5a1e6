"""No size a user types crashes the tool or gets it killed: every dimension is checked, and what the
machine cannot hold is refused from the configuration alone, before anything is allocated.

The command lines run in one child process whose address space is capped at a few GB, so a guard
that failed would end that child with a MemoryError instead of bringing the OOM killer to this
shared machine.
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import textwrap

import pytest

from conftest import DATA, tiny_config, tiny_weights
from twins_deploy.errors import UsageError
from twins_deploy.memory import cgroup_room, footprint
from twins_deploy.models import create_model, resolve_spec, with_classes

TINY_SVT = json.loads((DATA / "index.json").read_text())["tiny-svt"]["config"]
CAP_BYTES = 4 * 2**30  # the child's address space: a guard that failed could not allocate more

# name: (arguments, what the one line says); {dir} is a temporary folder, written by the fixture
ROWS = {
    # the table
    "negative dim": (["export", "-m", "vit-flax/ViT", "--config", "{dir}/negative.json", "--weights", "random"],
                     "config {dir}/negative.json: dim must be a positive integer, got -5"),
    "negative classes": (["export", "-m", "svt-s", "--num-classes", "-3", "--weights", "random"],
                         "num_classes must be a positive integer or 0 (no head: logits are the pooled embedding), "
                         "got -3"),
    "huge ViT": (["export", "-m", "vit-flax/ViT", "--config", "{dir}/huge.json", "--weights", "random"],
                 "export of vit-flax/ViT at 256x256 needs about 554.4 TB of memory"),
    "img-size 32000": (["export", "-m", "svt-s", "--img-size", "32000", "--weights", "random"],
                       "export of svt-s at 32000x32000 needs about 3.1 PB of memory"),
    # and others
    "zero heads": (["export", "-m", "svt-s", "--config", "{dir}/zero_heads.json", "--weights", "random"],
                   "num_heads must be positive integers, got (2, 0, 8, 16)"),  # was a ZeroDivisionError
    "fractional dim": (["build", "--precision", "int8", "--backend", "onnxruntime", "-m", "vit-flax/ViT", "--config",
                        "{dir}/fraction.json", "--weights", "random"], "dim must be a positive integer, got 64.5"),
    "classes 0 for ViT": (["export", "-m", "vit-flax/ViT", "--num-classes", "0", "--weights", "random"],
                          "num_classes must be a positive integer, got 0"),
    "deep ViT": (["export", "-m", "vit-flax/ViT", "--config", "{dir}/deep.json", "--weights", "random"],
                 "vit-flax/ViT with this configuration builds more than 5,000 modules: use a smaller depth"),
    "img-size beyond 64 bits": (["export", "-m", "svt-s", "--img-size", "99999999999999999968", "--weights",
                                 "random"], "its tensors would exceed 2^63 bytes"),
    "bench batch": (["bench", "-e", "{dir}/tiny.onnx", "--batch", "1000000", "--iters", "1", "--rounds", "1"],
                    "bench of svt-s at 224x224 needs about"),
    "verify samples": (["verify", "-e", "{dir}/tiny.onnx", "--samples", "10000000"],
                       "preparing 10,000,000 images at 224x224 needs about 6.0 TB"),
    "calibration images": (["build", "--onnx", "{dir}/tiny.onnx", "--precision", "int8", "--backend", "onnxruntime",
                            "--calib-images", "10000000"], "preparing 10,000,000 images at 224x224 needs about"),
    "torch engine at 4096": (["infer", "{dir}/cat.png", "-e", "torch", "-m", "svt-s", "--config", "{dir}/tiny.json",
                            "--weights", "random", "--img-size", "4096"], "infer of svt-s at 4096x4096 needs about"),
}
CONFIGS = {"negative": {"dim": -5}, "huge": {"dim": 200000, "mlp_dim": 800000, "depth": 48},
           "zero_heads": {"num_heads": [2, 0, 8, 16]}, "fraction": {"dim": 64.5}, "deep": {"depth": 100000},
           "tiny": TINY_SVT}

CHILD = textwrap.dedent("""
    import json, sys, time
    from typer.testing import CliRunner
    from twins_deploy.cli import app

    rows = json.loads(sys.argv[1])
    runner, results = CliRunner(), {}
    for name, args in rows.items():
        start = time.perf_counter()
        result = runner.invoke(app, args)
        results[name] = {"exit_code": result.exit_code, "stderr": result.stderr, "stdout": result.stdout,
                         "seconds": time.perf_counter() - start}
    print(json.dumps(results))
""")


def _capped() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (CAP_BYTES, CAP_BYTES))


def _run_rows(rows: dict[str, list[str]], timeout: int = 600) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(rows)], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=_capped)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def commands(tmp_path_factory):
    """Every row run once, in one capped child; first a normal export (under the same cap) the others read."""
    folder = tmp_path_factory.mktemp("sizes")
    for name, config in CONFIGS.items():
        (folder / f"{name}.json").write_text(json.dumps(config))
    from PIL import Image

    Image.new("RGB", (32, 32), (120, 60, 30)).save(folder / "cat.png")
    rows = {"tiny export": ["export", "-m", "svt-s", "--config", f"{folder}/tiny.json", "--weights",
                            str(tiny_weights("tiny-svt")), "-o", f"{folder}/tiny.onnx", "--json"],
            "unwritable output": ["export", "-m", "svt-s", "--config", f"{folder}/tiny.json", "--weights", "random",
                                  "-o", "/proc/tiny.onnx"],
            "unwritable output --verbose": ["export", "-m", "svt-s", "--config", f"{folder}/tiny.json", "--weights",
                                            "random", "-o", "/proc/tiny.onnx", "--verbose"]}
    rows.update({name: [arg.format(dir=folder) for arg in args] for name, (args, _) in ROWS.items()})
    return folder, _run_rows(rows)


@pytest.mark.parametrize("name", list(ROWS))
def test_a_size_too_big_or_wrong_is_one_line_exit_2_in_seconds(commands, name):
    folder, results = commands
    result, expected = results[name], ROWS[name][1].format(dir=folder)
    assert result["exit_code"] == 2, result
    assert "Traceback" not in result["stderr"] + result["stdout"]
    lines = result["stderr"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert result["seconds"] < 60, result


def test_a_refusal_says_what_it_needs_what_the_machine_has_and_what_to_change(commands):
    _, results = commands
    line = results["img-size 32000"]["stderr"]
    assert "3.1 PB of activations at batch 3" in line and "866.2 MB of weights" in line
    assert "is available (address-space limit, ulimit -v 4194304)" in line  # the child's cap is the tightest limit
    assert line.strip().endswith("use a smaller --img-size")
    assert results["huge ViT"]["stderr"].strip().endswith("a smaller configuration (dims, depth, mlp sizes, classes)")


def test_a_normal_export_passes_the_guard_and_records_its_footprint(commands):
    import onnx

    folder, results = commands
    assert results["tiny export"]["exit_code"] == 0, results["tiny export"]["stderr"]
    assert json.loads(results["tiny export"]["stdout"])["passed"] is True
    props = {p.key: p.value for p in onnx.load(folder / "tiny.onnx").metadata_props}
    recorded = json.loads(props["memory_footprint"])
    assert recorded == {key: getattr(footprint(resolve_spec("svt-s", TINY_SVT), 224), key)
                        for key in ("weight_bytes", "input_bytes", "activation_bytes", "intermediate_bytes")}


def test_an_unforeseen_library_error_is_one_line_and_verbose_shows_the_traceback(commands):
    _, results = commands
    plain, verbose = results["unwritable output"], results["unwritable output --verbose"]
    assert plain["exit_code"] == verbose["exit_code"] == 1
    assert "Traceback" not in plain["stderr"]
    (line,) = plain["stderr"].strip().splitlines()
    assert line.startswith("error: export failed on -m svt-s --config ") and "-o /proc/tiny.onnx: " in line
    assert "FileNotFoundError" in line and line.endswith("(--verbose shows the traceback)")
    assert "Traceback (most recent call last)" in verbose["stderr"]  # --verbose after the command works too
    last = verbose["stderr"].strip().splitlines()[-1]
    assert last.startswith("error: export failed on ") and "--verbose" not in last


@pytest.mark.parametrize("name, config, message", [
    ("svt-s", {"embed_dims": [64, 128, 256, "512"]}, "embed_dims must be positive integers, got (64, 128, 256, '512')"),
    ("svt-s", {"mlp_ratios": [4, 4, 0, 4]}, "mlp_ratios must be positive numbers, got (4, 4, 0, 4)"),
    ("svt-s", {"patch_size": True}, "patch_size must be a positive integer, got True"),
    ("vit-pytorch/TwinsSVT", {"s2_global_k": 0}, "s2_global_k must be a positive integer, got 0"),
    ("vit-flax/ViT", {"image_size": [256, -1]}, "image_size must be positive integers, got (256, -1)"),
    ("vit-flax/ViT", {"depth": [1, 2]}, "depth takes one value, got (1, 2)"),
    ("vit-flax/ViT", {"mlp_dim": 2**40}, "mlp_dim must be a positive integer up to 2147483647, got 1099511627776"),
    ("vit-flax/CaiT", {"dropout": 1.5}, "dropout must be a rate in [0, 1), got 1.5"),
    ("vit-flax/CrossFormer", {"cross_embed_kernel_sizes": [[4, 8], [0, 2], [2, 4], [2, 4]]},
     "cross_embed_kernel_sizes must be positive integers, got ((4, 8), (0, 2), (2, 4), (2, 4))"),
    ("vit-flax/CrossViT", {"sm_dim": None}, "sm_dim must be set, got None"),
])
def test_every_dimension_is_checked_and_named_before_the_constructor(name, config, message):
    with pytest.raises(UsageError) as error:
        resolve_spec(name, config)
    assert str(error.value) == f"config: {message}"


def test_num_classes_0_builds_twins_without_a_head_and_is_refused_elsewhere():
    import torch

    model = create_model(tiny_config("tiny-svt"), weights="random", num_classes=0)
    with torch.no_grad():
        logits = model(torch.zeros(1, 3, 224, 224))
    model.output = "embedding"
    with torch.no_grad():
        assert torch.equal(logits, model(torch.zeros(1, 3, 224, 224))) and logits.shape == (1, 64)
    with pytest.raises(UsageError, match="num_classes must be a positive integer, got 0"):
        with_classes(resolve_spec("vit-flax/CaiT"), 0)


def test_the_footprint_counts_the_weights_the_model_allocates():
    for name, config, size in (("svt-s", TINY_SVT, 224), ("vit-flax/ViT", {"dim": 128, "depth": 2}, 256)):
        spec = resolve_spec(name, config)
        model = create_model(spec, weights="random", img_size=size)
        allocated = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        assert footprint(spec, size).weight_bytes == allocated


def test_cgroup_limits_v2_and_v1_are_read(tmp_path):
    v2 = tmp_path / "v2"
    (v2 / "job").mkdir(parents=True)
    (v2 / "job" / "memory.max").write_text("4000000000\n")
    (v2 / "job" / "memory.current").write_text("3000000000\n")
    (v2 / "job" / "memory.stat").write_text("anon 2500000000\ninactive_file 500000000\n")
    (v2 / "memory.max").write_text("max\n")
    (tmp_path / "cgroup2").write_text("0::/job\n")
    assert cgroup_room(v2, tmp_path / "cgroup2") == (1_500_000_000, "cgroup memory limit 4.0 GB")
    v1 = tmp_path / "v1" / "memory"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text("2000000000\n")
    (v1 / "memory.usage_in_bytes").write_text("1500000000\n")
    (v1 / "memory.stat").write_text("cache 10\ntotal_inactive_file 100000000\n")
    (tmp_path / "cgroup1").write_text("12:cpu,cpuacct:/\n7:memory:/docker/abc\n")  # a container sees its own root
    assert cgroup_room(tmp_path / "v1", tmp_path / "cgroup1") == (600_000_000, "cgroup memory limit 2.0 GB")
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    assert cgroup_room(tmp_path / "v1", tmp_path / "cgroup1") is None


# ----------------------------------------------------------------------------------------------
# The estimate against the measured peak of real exports

MEASURE = textwrap.dedent("""
    import json, sys
    from twins_deploy.exporters import export_onnx
    from twins_deploy.memory import _resident_bytes, export_estimate
    from twins_deploy.models import resolve_spec

    name, size, config, output = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
    estimate = export_estimate(resolve_spec(name, config), size, "logits", trace_batch=2, verify_batch=3)
    predicted = _resident_bytes() + estimate.total  # what the guard compares, as a peak of this process
    report = export_onnx(name, output, weights="random", img_size=size, config=config)
    with open("/proc/self/status") as status:
        peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    print(json.dumps({"predicted": predicted, "peak": peak, "passed": report.passed, "parts": estimate.parts}))
""")


@pytest.mark.slow
@pytest.mark.parametrize("name, size, config", [
    ("svt-s", 896, TINY_SVT),  # activations dominate: 3 x 318 MB at verification's batch 3
    ("vit-flax/ViT", 256, {"dim": 512, "depth": 4, "heads": 8, "mlp_dim": 2048}),  # weights dominate: 59 MB x 9
])
def test_the_export_estimate_is_within_2x_of_the_measured_peak(tmp_path, name, size, config):
    arguments = [name, str(size), json.dumps(config), str(tmp_path / "m.onnx")]
    done = subprocess.run([sys.executable, "-c", MEASURE, *arguments], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    ratio = figures["peak"] / figures["predicted"]
    print(f"{name} at {size}: predicted {figures['predicted'] / 1e6:.0f} MB, measured peak "
          f"{figures['peak'] / 1e6:.0f} MB (peak / estimate {ratio:.2f}); parts {figures['parts']}")
    assert figures["passed"] and 0.5 <= ratio <= 2.0, figures
