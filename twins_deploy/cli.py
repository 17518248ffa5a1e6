"""The ``twins-deploy`` command line: a thin layer over the Python API.

Every user-facing failure is a ``TwinsDeployError``: it is printed as one line on stderr and the
command exits with its code (1 failure, 2 usage), never with a traceback.
"""
from __future__ import annotations

import json
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from twins_deploy import __version__
from twins_deploy.errors import TwinsDeployError

console = Console()
err_console = Console(stderr=True, soft_wrap=True)


class _Group(TyperGroup):
    """Turns ``TwinsDeployError`` into one line on stderr and its exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except TwinsDeployError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
            raise typer.Exit(exc.exit_code) from None


app = typer.Typer(cls=_Group, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Deploy Twins-PCPVT and Twins-SVT: export to ONNX, build engines, bench, infer, serve.")

# Options shared by several commands: one spelling, one help text.
ModelOption = Annotated[str, typer.Option("--model", "-m", help="Model name or alias (see 'twins-deploy models').")]
WeightsOption = Annotated[str, typer.Option(
    help="'pretrained' (Hugging Face hub, cached), 'random' (seeded) or a checkpoint path (.pth/.pt/.bin/.safetensors).")]
ImgSizeOption = Annotated[Optional[str], typer.Option(
    "--img-size", help="Input size, 224 or HxW (multiples of 32). Default: the model's own.")]
NumClassesOption = Annotated[Optional[int], typer.Option(
    help="Build the head for this many classes, to load a fine-tuned checkpoint with its own head.")]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout instead of a table.")]


def _version(value: bool) -> None:
    if value:
        console.print(f"twins-deploy {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                               help="Show the version and exit.")] = False) -> None:
    """Deploy Twins-PCPVT and Twins-SVT: export to ONNX, build engines, bench, infer, serve."""


@app.command()
def models(as_json: JsonFlag = False) -> None:
    """List the published Twins variants: names, aliases, parameters, GFLOPs, input size, hub id."""
    from twins_deploy.models import model_table

    rows = model_table()
    if as_json:
        print(json.dumps({"schema_version": 1, "models": rows}, indent=2))
        return
    table = Table(title="Twins models")
    for column in ("name", "aliases", "params", "GFLOPs @224", "input", "hub id"):
        table.add_column(column, justify="right" if column in ("params", "GFLOPs @224") else "left")
    for row in rows:
        table.add_row(row["name"], ", ".join(row["aliases"]), f"{row['params']:,}", f"{row['gflops_224']:.2f}",
                      "x".join(map(str, row["input_size"])), row["hub_id"])
    console.print(table)
