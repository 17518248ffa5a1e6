"""The first five minutes of a new user: help in pipeline order, an instant ``models``, no library log
lines, both spellings of a list, one table style, and ``bench --plot``."""
from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from conftest import tiny_config, tiny_weights
from twins_deploy.cli import PIPELINE_ORDER, _Group, _split_list, app
from twins_deploy.logs import library_logs

runner = CliRunner()
# How the libraries' log lines look: torch's glog-style logging and C++ log ("W1130 12:00:00.1 123
# torch/utils/cpp_extension.py:183]"), Python's default format (NNCF: "INFO:nncf:..."), the warnings
# module ("x.py:12: UserWarning: ..."), onnxruntime's C++ log and OpenVINO's.
FOREIGN_LOG_LINE = re.compile(r"^\[?[IWEF]\d{4} \d\d:\d\d:\d\d|^(DEBUG|INFO|WARNING|ERROR|CRITICAL):[\w.]+:"
                              r"|:\d+: \w*Warning: |\[[VIWEF]:onnxruntime:|^\[ ?(DEBUG|INFO|WARNING|ERROR) ?\]")
CUDA_HOME_WARNING = "No CUDA runtime is found, using CUDA_HOME='/usr/local'"  # the line the issue saw


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """The tiny Twins-SVT exported to ONNX, and the folder it lives in."""
    from twins_deploy.exporters import export_onnx
    from twins_deploy.models import create_model

    folder = tmp_path_factory.mktemp("first-minutes")
    model = create_model(tiny_config("tiny-svt"), weights=str(tiny_weights("tiny-svt")))
    return {"folder": folder, "onnx": export_onnx(model, folder / "tiny-svt.onnx").path}


@pytest.fixture(scope="module")
def int8_build(tiny) -> dict:
    """``build --backend openvino --precision int8 --json`` in a fresh process: what it printed, and the IR."""
    ir = tiny["folder"] / "tiny-svt.int8.xml"
    run = _cli("build", "--onnx", str(tiny["onnx"]), "--backend", "openvino", "--precision", "int8",
               "--calib-images", "4", "-o", str(ir), "--json")
    return {"run": run, "ir": ir}


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The command line in a fresh process, so that what libraries log while they are imported is seen too."""
    return subprocess.run([sys.executable, "-m", "twins_deploy.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def _foreign_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if FOREIGN_LOG_LINE.search(line)]


# 1. help order -----------------------------------------------------------------------------------

def test_help_lists_the_commands_in_pipeline_order():
    result = runner.invoke(app, ["--help"], env={"COLUMNS": "120"})
    assert result.exit_code == 0
    commands = typer.main.get_command(app).commands
    listed = [name for name in re.findall(r"^│ (\w+) ", result.stdout, flags=re.M) if name in commands]
    expected = [name for name in PIPELINE_ORDER if name in commands]
    assert listed[:len(expected)] == expected
    assert listed[:4] == ["models", "export", "verify", "build"] and set(listed) == set(commands)


def test_commands_missing_from_the_order_follow_it_in_registration_order():
    extra = typer.Typer(cls=_Group)
    for name in ("zeta", "triton", "alpha", "bench", "models"):
        extra.command(name)(lambda: None)
    group = typer.main.get_command(extra)
    assert group.list_commands(typer.Context(group)) == ["models", "bench", "triton", "zeta", "alpha"]


# 2. an instant models listing --------------------------------------------------------------------

def test_models_listing_imports_no_torch():
    """No torch import, so no torch module is built: the listing reads the catalogue."""
    script = ("import json, sys\nfrom typer.testing import CliRunner\nfrom twins_deploy.cli import app\n"
              "runner = CliRunner()\nlisted = runner.invoke(app, ['models', '--json'])\n"
              "table = runner.invoke(app, ['models'], env={'COLUMNS': '200'})\n"
              "print(json.dumps({'codes': [listed.exit_code, table.exit_code], 'torch': 'torch' in sys.modules, "
              "'rows': len(json.loads(listed.stdout)['models']), 'table': 'svt-s' in table.stdout}))")
    report = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                       check=True).stdout)
    assert report == {"codes": [0, 0], "torch": False, "rows": report["rows"], "table": True}
    from twins_deploy.models import MODELS

    assert report["rows"] == len(MODELS)


def test_models_listing_constructs_no_torch_module(monkeypatch):
    import torch

    constructed = []
    original = torch.nn.Module.__init__

    def counting_init(self, *args, **kwargs):
        constructed.append(type(self).__name__)
        original(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "__init__", counting_init)
    for args in (["models"], ["models", "--json"]):
        assert runner.invoke(app, args).exit_code == 0
    assert constructed == []
    torch.nn.Linear(2, 2)  # the counter counts
    assert constructed == ["Linear"]


def test_catalogue_equals_a_fresh_count_of_every_registered_model():
    """Parameters and FLOPs counted the slow way (every model built on the meta device); after a model
    changes, ``python -m twins_deploy.catalogue`` writes the file again."""
    from twins_deploy.catalogue import model_rows
    from twins_deploy.models import model_table

    stored = {row["name"]: row for row in model_rows()}
    counted = {row["name"]: row for row in model_table()}
    assert list(stored) == list(counted), "run: python -m twins_deploy.catalogue"
    stale = [name for name in counted if stored[name] != counted[name]]
    assert not stale, f"{stale} changed since the catalogue was written: run python -m twins_deploy.catalogue"
    assert stored["svt-s"]["params"] == 24_060_776  # timm's count (tests/test_models.py)


# 3. no library log lines -------------------------------------------------------------------------

def test_openvino_int8_build_prints_no_library_log_line(int8_build):
    run = int8_build["run"]
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)  # stdout is the JSON document and nothing else
    assert report["precision"] == "int8" and int8_build["ir"].is_file()
    assert _foreign_lines(run.stdout + run.stderr) == []
    assert "quantizing" in run.stderr  # our own progress line is still there


@pytest.mark.parametrize("engine, json_flag", [("onnx", False), ("int8", True)])
def test_verify_prints_no_library_log_line(tiny, int8_build, engine, json_flag):
    path = tiny["onnx"] if engine == "onnx" else int8_build["ir"]
    # 16 images: on 4, one near tie between the tiny model's two best logits is already 25% of top-1 agreement
    run = _cli("verify", "-e", str(path), "--samples", "16", *(["--json"] if json_flag else []))
    assert run.returncode == 0, run.stderr
    if json_flag:
        assert json.loads(run.stdout)["passed"] is True
    else:
        assert "cosine" in run.stdout
    assert _foreign_lines(run.stdout + run.stderr) == []


NOISY_COMMAND = f"""
import logging, sys, warnings
import torch  # torch's own logging set-up: the glog-style handler on stderr
import nncf  # NNCF's logger: INFO, on stdout
from twins_deploy.cli import app

@app.command()
def noisy() -> None:
    logging.getLogger("torch.utils.cpp_extension").warning("{CUDA_HOME_WARNING}")
    logging.getLogger("nncf").info("Statistics collection")
    warnings.warn("a library's deprecation", FutureWarning)
    print("our output")

app(sys.argv[1:])
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_library_log_lines_show_only_with_verbose(verbose):
    """The issue's line through torch's own logger, NNCF's INFO line and a Python warning, emitted inside
    a command: gone without --verbose, shown with it."""
    run = subprocess.run([sys.executable, "-c", NOISY_COMMAND, *(["--verbose"] if verbose else []), "noisy"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    if verbose:
        assert CUDA_HOME_WARNING in run.stderr and "FutureWarning" in run.stderr
        assert "Statistics collection" in run.stdout
        assert len(_foreign_lines(run.stdout + run.stderr)) == 3  # the pattern the quiet runs are checked with
    else:
        assert run.stdout == "our output\n" and run.stderr == ""


def test_library_logs_restores_the_process_settings(monkeypatch):
    monkeypatch.setenv("TORCH_CPP_LOG_LEVEL", "INFO")  # a user's own setting wins
    before = logging.root.manager.disable
    with library_logs(verbose=False):
        assert logging.root.manager.disable >= logging.WARNING
        assert not logging.getLogger("nncf").isEnabledFor(logging.INFO)
        import os

        assert os.environ["TORCH_CPP_LOG_LEVEL"] == "INFO"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # a library's own filter still works inside
            warnings.warn("inner", UserWarning)
        assert len(caught) == 1
    assert logging.root.manager.disable == before


# 4. lists: both spellings ------------------------------------------------------------------------

def test_split_list_takes_commas_repeats_and_a_mix():
    assert _split_list(["a,b"]) == _split_list(["a", "b"]) == _split_list(["a, b,"]) == ["a", "b"]
    assert _split_list(["onnx,int8", "torch"]) == ["onnx", "int8", "torch"]
    assert _split_list(None) == []


def test_bench_engines_and_batches_take_both_spellings(tiny, tmp_path):
    onnx = str(tiny["onnx"])
    spellings = {"commas": ["-e", f"{onnx},{onnx}", "--batch", "1,2"],
                 "repeats": ["-e", onnx, "-e", onnx, "--batch", "1", "--batch", "2"]}
    seen = {}
    for name, args in spellings.items():
        out = tmp_path / f"{name}.json"
        result = runner.invoke(app, ["bench", *args, "--iters", "1", "--warmup", "0", "--rounds", "1",
                                     "--json", str(out)])
        assert result.exit_code == 0, result.output
        report = json.loads(out.read_text())
        seen[name] = (report["settings"]["engines"], report["settings"]["batches"],
                      [(row["engine"], row["batch"]) for row in report["results"]])
    assert seen["commas"] == seen["repeats"] == ([onnx, onnx], [1, 2], [("onnx", 1), ("onnx", 1), ("onnx", 2),
                                                                        ("onnx", 2)])


def test_export_mean_and_std_take_both_spellings_and_print_a_light_table(tmp_path):
    """svt-s's family with the tiny configuration: a real export in seconds."""
    from twins_deploy.engines.artifacts import onnx_metadata
    from twins_deploy.models import config_dict

    (tmp_path / "tiny.json").write_text(json.dumps(config_dict(tiny_config("tiny-svt"))))
    result = runner.invoke(app, ["export", "-m", "svt-s", "--config", str(tmp_path / "tiny.json"), "--weights",
                                 str(tiny_weights("tiny-svt")), "--mean", "0.5", "--mean", "0.5,0.5", "--std",
                                 "0.25,0.25,0.25", "-o", str(tmp_path / "t.onnx")], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    meta = onnx_metadata(tmp_path / "t.onnx")
    assert (meta.mean, meta.std) == ((0.5,) * 3, (0.25,) * 3)
    _assert_light_table(result.stdout.split("\nwrote ")[0], header=False)  # the table, then what to run next
    result = runner.invoke(app, ["export", "-m", "svt-s", "--mean", "0.5", "--mean", "0.5"])  # joined, then checked
    assert result.exit_code == 2 and "--mean takes three" in result.output and "'0.5,0.5'" in result.output


# 5. one table style ------------------------------------------------------------------------------

HEAVY_OR_BOXED = set("┏┓┗┛┃━│┌┐└┘╭╮╰╯")


def _assert_light_table(output: str, header: bool = True) -> None:
    assert ("─" in output) == header, output  # the light rule under the header
    assert not HEAVY_OR_BOXED & set(output), output
    assert max(map(len, output.splitlines())) <= 80, output


def test_every_table_is_light_and_fits_80_columns(tiny, tmp_path):
    onnx = str(tiny["onnx"])
    image = tmp_path / "photo.png"
    Image.new("RGB", (40, 30), (200, 100, 50)).save(image)
    commands = {
        "models": ["models"],
        "verify": ["verify", "-e", onnx, "--samples", "2"],
        "triton": ["triton", "--onnx", onnx, "-o", str(tmp_path / "repository")],
        "infer": ["infer", "-e", onnx, str(image), "--topk", "2"],
        "bench": ["bench", "-e", f"{onnx},{onnx}", "--batch", "1", "--iters", "1", "--warmup", "0", "--rounds", "1"],
    }
    for name, args in commands.items():
        result = runner.invoke(app, args, env={"COLUMNS": "80"})
        assert result.exit_code == 0, (name, result.output)
        table = result.stdout.split("\nmax batch")[0] if name == "triton" else result.stdout  # then its notes
        _assert_light_table(table)


# 6. bench --plot ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plotted(tiny, int8_build, tmp_path_factory) -> dict:
    """One bench of two engines at batches 2 and 1, drawn as SVG; the same report drawn as PNG."""
    from twins_deploy.engines.plot import plot_bench

    folder = tmp_path_factory.mktemp("plot")
    result = runner.invoke(app, ["bench", "-e", f"{tiny['onnx']},{int8_build['ir']}", "--batch", "2,1", "--iters", "2",
                                 "--warmup", "0", "--rounds", "1", "--json", str(folder / "bench.json"),
                                 "--plot", str(folder / "bench.svg")])
    assert result.exit_code == 0, result.output
    report = json.loads((folder / "bench.json").read_text())
    return {"report": report, "svg": folder / "bench.svg", "png": plot_bench(report, folder / "bench.png"),
            "stderr": result.stderr}


def test_plot_svg_shows_every_engine_at_every_batch_of_the_run(plotted):
    results = plotted["report"]["results"]
    engines = list(dict.fromkeys(row["engine"] for row in results))
    batches = sorted({row["batch"] for row in results})
    assert engines == ["onnx", "ov-int8"] and batches == [1, 2]
    root = ET.parse(plotted["svg"]).getroot()  # well-formed SVG
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    texts = {"".join(node.itertext()).strip() for node in root.iter("{http://www.w3.org/2000/svg}text")}
    assert {*engines, "batch 1", "batch 2", "images per second"} <= texts
    description = "".join(root.find(".//{http://purl.org/dc/elements/1.1/}description").itertext())
    assert description == "engines: onnx, ov-int8; batches: 1, 2"
    assert f"wrote the plot to {plotted['svg']}" in plotted["stderr"]


def test_plot_png_is_a_png_that_says_what_it_shows(plotted):
    assert plotted["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(plotted["png"]) as image:
        image.load()
        assert image.format == "PNG" and image.width > 1000 and image.height > 400
        assert image.text["Description"] == "engines: onnx, ov-int8; batches: 1, 2"


def test_plot_series_tells_engines_of_one_name_apart():
    from twins_deploy.engines.plot import plot_series

    row = {"latency_ms_p50": 1.0, "latency_ms_p90": 2.0, "latency_ms_p99": 3.0, "throughput_img_per_s": 9.0}
    report = {"settings": {"engines": ["a.onnx", "b.onnx", "a.onnx"]},
              "results": [{**row, "engine": "onnx", "batch": batch} for batch in (8, 1) for _ in range(3)]}
    batches, series = plot_series(report)
    assert batches == [1, 8]
    assert [label for label, _ in series] == ["onnx (a.onnx) #1", "onnx (b.onnx)", "onnx (a.onnx) #2"]
    assert all([r["batch"] for r in rows] == [1, 8] for _, rows in series)


@pytest.mark.parametrize("name, message", [("bench.pdf", "writes a .png or .svg"), ("bench.png", "pip install")])
def test_plot_errors_come_before_the_bench_runs(tiny, tmp_path, monkeypatch, name, message):
    if name.endswith(".png"):
        monkeypatch.setitem(sys.modules, "matplotlib", None)  # as on a machine without the [plot] extra
    result = runner.invoke(app, ["bench", "-e", "no-such-engine.onnx", "--plot", str(tmp_path / name)])
    assert result.exit_code == 2 and message in result.output  # not the missing engine: the plot is checked first
    assert not (tmp_path / name).exists()
