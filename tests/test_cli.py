"""The command line: tables and JSON for people and machines, one-line errors, no tracebacks."""
from __future__ import annotations

import json

from typer.testing import CliRunner

from twins_deploy import __version__
from twins_deploy.cli import app

runner = CliRunner()


def test_models_json_lists_the_six_twins_first_then_the_other_families():
    result = runner.invoke(app, ["models", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["schema_version"] == 2
    rows = {row["name"]: row for row in report["models"]}
    assert list(rows)[:6] == ["pcpvt-s", "pcpvt-b", "pcpvt-l", "svt-s", "svt-b", "svt-l"]
    assert {row["family"] for row in report["models"][:6]} == {"twins"}
    assert rows["svt-s"]["params"] == 24_060_776
    assert abs(rows["svt-s"]["gflops"] - 5.85) < 0.01
    assert rows["svt-b"]["aliases"] == ["twins_svt_base", "alt_gvt_base"]
    assert rows["pcpvt-b"]["hub_id"] == "timm/twins_pcpvt_base.in1k"
    assert rows["pcpvt-l"]["input_size"] == [224, 224]


def test_models_table_for_people():
    result = runner.invoke(app, ["models"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "24,060,776" in result.stdout and "alt_gvt_small" in result.stdout


def test_version_and_help():
    assert runner.invoke(app, ["--version"]).stdout.strip() == f"twins-deploy {__version__}"
    result = runner.invoke(app, [])
    assert "models" in result.output
