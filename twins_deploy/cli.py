"""The ``twins-deploy`` command line: a thin layer over the Python API.

Every user-facing failure is a ``TwinsDeployError``: it is printed as one line on stderr and the
command exits with its code (1 failure, 2 usage), never with a traceback. Any other exception a library
raises on the user's input is one line too, naming the command and what was typed (``--verbose`` adds
the traceback).
"""
from __future__ import annotations

import json
import shlex
import traceback
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup
from typer.exceptions import TyperException

from twins_deploy import __version__
from twins_deploy.errors import TwinsDeployError
from twins_deploy.logs import library_logs

console = Console()
err_console = Console(stderr=True, soft_wrap=True)


# The help lists the commands in the order a user walks the pipeline; a command not named here follows them.
PIPELINE_ORDER = ("models", "export", "verify", "build", "bench", "infer", "serve", "triton")


class _Group(TyperGroup):
    """Lists the commands in pipeline order; turns ``TwinsDeployError`` into one line on stderr and its exit code,
    and so any other exception a library raises on the user's input (the traceback only with ``--verbose``)."""

    def list_commands(self, ctx):
        unplaced = len(PIPELINE_ORDER)  # sorted() is stable: those keep their registration order
        return sorted(super().list_commands(ctx),
                      key=lambda name: PIPELINE_ORDER.index(name) if name in PIPELINE_ORDER else unplaced)

    def parse_args(self, ctx, args):
        """``--verbose``/``-v`` typed after the command (``twins-deploy export ... --verbose``) moves in front of it,
        where the option lives; the command's own arguments are kept to name the input in errors."""
        end = args.index("--") if "--" in args else len(args)
        command = next((i for i, arg in enumerate(args[:end]) if not arg.startswith("-")), end)  # the group: flags only
        if command < end:
            typed = [arg for arg in args[command + 1:end] if arg not in VERBOSE_FLAGS]
            verbose = ["--verbose"] if len(typed) < end - command - 1 else []
            ctx.meta[_ARGUMENTS] = typed + args[end:]
            args = verbose + args[:command + 1] + typed + args[end:]
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except TwinsDeployError as exc:
            _error(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except (typer.Exit, typer.Abort, TyperException):
            raise
        except Exception as exc:
            raise typer.Exit(_unexpected(ctx, exc)) from None


VERBOSE_FLAGS = ("--verbose", "-v")
OUT_OF_MEMORY = ("can't allocate memory", "cannot allocate memory", "out of memory", "bad_alloc", "failed to allocate")
_ARGUMENTS = "twins_deploy.arguments"


def _error(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False)


def _unexpected(ctx, exc: Exception) -> int:
    """One line for an exception no check foresaw: the command, what was typed, the library's first line; the
    traceback before it with ``--verbose``. Exit 2 when it ran out of memory (the input is too big), else 1."""
    if settings.verbose:
        traceback.print_exception(exc)
    typed = " ".join(shlex.quote(arg) for arg in ctx.meta.get(_ARGUMENTS, [])) or "its defaults"
    typed = typed if len(typed) <= 200 else typed[:197] + "..."
    first_line = (str(exc).strip().splitlines() or [""])[0]
    memory = isinstance(exc, MemoryError) or any(words in first_line.lower() for words in OUT_OF_MEMORY)
    advice = "; it needs more memory than this machine has: use a smaller size, batch or configuration" * memory
    more = "" if settings.verbose else " (--verbose shows the traceback)"
    _error(f"{ctx.invoked_subcommand or 'the command'} failed on {typed}: {type(exc).__name__}: {first_line}"
           f"{advice}{more}")
    return 2 if memory else 1


app = typer.Typer(cls=_Group, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Deploy Twins-PCPVT and Twins-SVT: export to ONNX, build engines, bench, infer, serve.")

# Options shared by several commands: one spelling, one help text.
ModelOption = Annotated[str, typer.Option("--model", "-m", help="Model name or alias (see 'twins-deploy models').")]
WeightsOption = Annotated[str, typer.Option(
    help="'pretrained' (Hugging Face hub, cached; Twins only), 'random' (seeded) or a weights file "
         "(.safetensors/.pth/.pt/.bin; Flax .msgpack for vit-flax models).")]
ImgSizeOption = Annotated[Optional[str], typer.Option(
    "--img-size", help="Input size, 224 or HxW (Twins: multiples of 32). Default: the model's own.")]
NumClassesOption = Annotated[Optional[int], typer.Option(
    help="Build the head for this many classes, to load a fine-tuned checkpoint with its own head. "
         "0 (Twins models only) builds no head: the logits are the pooled embedding.")]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout instead of a table.")]
ConfigOption = Annotated[Optional[Path], typer.Option(
    "--config", help="JSON/YAML file of the model class's constructor arguments (top level or under \"config\"); "
                     "missing keys take the library's defaults.")]


def _table(title: Optional[str] = None, **options) -> Table:
    """Every table the command line prints: a light rule under the header, one space between columns and
    none outside them, so that it fits 80 columns."""
    return Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 0), pad_edge=False,
                 **options)


def _split_list(values: Optional[list[str]]) -> list[str]:
    """A list option takes both spellings, ``-e a,b`` and ``-e a -e b`` (and a mix of them)."""
    return [item.strip() for value in values or () for item in value.split(",") if item.strip()]


def _version(value: bool) -> None:
    if value:
        console.print(f"twins-deploy {__version__}")
        raise typer.Exit()


class _Settings:
    """Options of the whole command line, read by the commands and by ``_Group``."""

    verbose = False  # --verbose: the libraries' log lines and full tracebacks


settings = _Settings()


@app.callback()
def main(ctx: typer.Context,
         version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                               help="Show the version and exit.")] = False,
         verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show the log lines of the libraries "
                                               "underneath and full tracebacks.")] = False) -> None:
    """Deploy Twins-PCPVT and Twins-SVT: export to ONNX, build engines, bench, infer, serve."""
    settings.verbose = verbose
    ctx.with_resource(library_logs(verbose))  # the libraries' log lines, for the command's whole run


@app.command()
def models(as_json: JsonFlag = False) -> None:
    """List every model: names, aliases, family, parameters, GFLOPs, input size, where weights come from."""
    from twins_deploy.catalogue import model_rows  # counted once from the registry: no torch, no model built

    rows = model_rows()
    if as_json:
        print(json.dumps({"schema_version": 2, "models": rows}, indent=2))
        return
    table = _table("Models (GFLOPs at the default input and configuration)",
                   caption="vit-pytorch and vit-flax models take --config (the class's arguments) "
                           "and --weights FILE or random")
    for column in ("name (aliases)", "params", "GFLOPs", "input", "weights"):
        table.add_column(column, justify="right" if column in ("params", "GFLOPs") else "left",
                         overflow="fold" if column == "weights" else "ellipsis")
    for row in rows:  # aliases under the name: the table fits 80 columns
        names = escape(row["name"]) + "".join(f"\n[dim]{escape(alias)}[/]" for alias in row["aliases"])
        table.add_row(names, f"{row['params']:,}", f"{row['gflops']:.2f}", "x".join(map(str, row["input_size"])),
                      escape(row["weights"]))
    console.print(table)


TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:25.01-py3"


@app.command()
def triton(
    onnx: Annotated[Optional[Path], typer.Option(
        "--onnx", help="Exported ONNX file: names, dims and class names come from it.")] = None,
    ir: Annotated[Optional[Path], typer.Option(
        "--ir", help="OpenVINO IR (.xml with its .bin, from 'build --backend openvino'): serve it with Triton's "
                     "OpenVINO backend instead of an ONNX file.")] = None,
    plan: Annotated[Optional[Path], typer.Option(
        help="TensorRT engine built from that ONNX file: serve it with the TensorRT backend instead.")] = None,
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="Model repository folder (created if missing).")] = Path("model_repository"),
    name: Annotated[Optional[str], typer.Option(help="Model name (default: the served file's stem).")] = None,
    max_batch: Annotated[int, typer.Option(help="max_batch_size; 0 turns batching off.")] = 32,
    instances: Annotated[int, typer.Option(help="Model instances Triton runs side by side.")] = 1,
    device: Annotated[Optional[str], typer.Option(
        help="Where the instances run: gpu or cpu (default: cpu for an IR, gpu otherwise).")] = None,
    max_queue_delay_us: Annotated[int, typer.Option(
        help="How long dynamic batching waits to fill a batch, in microseconds.")] = 100,
    as_json: JsonFlag = False,
) -> None:
    """Write a Triton Inference Server model repository (ONNX Runtime, TensorRT or OpenVINO backend) with class
    labels."""
    from twins_deploy.triton import build_repository

    if (onnx is None) == (ir is None):
        raise _usage("pass --onnx PATH (an exported ONNX file) or --ir PATH (an OpenVINO IR), one of them")
    report = build_repository(onnx or ir, output, plan=plan, name=name, max_batch=max_batch, instances=instances,
                              device=device, max_queue_delay_us=max_queue_delay_us)
    if report.schema is None:
        err_console.print("warning: config.pbtxt not checked against Triton's schema "
                          "(pip install 'tritonclient[grpc]' to check it)", highlight=False)
    if report.plan_checked is False:
        err_console.print("note: TensorRT is not usable here, so the plan's tensors and batch profile were not "
                          "checked; Triton checks them when it loads the model", highlight=False)
    if as_json:
        print(json.dumps(report.as_dict(), indent=2))
        return
    model = report.model
    table = _table(escape(f"Triton model {model.name} ({model.platform}) in {report.repository}"))
    for column in ("tensor", "name", "type", "dims", "labels"):
        table.add_column(column)
    for kind, tensors in (("input", model.inputs), ("output", model.outputs)):
        for tensor in tensors:
            labelled = kind == "output" and tensor.name == "logits" and model.labels
            table.add_row(kind, tensor.name, tensor.data_type, str(list(tensor.dims)),
                          f"{len(model.labels)} classes" if labelled else "")
    console.print(table)
    batching = (f"max batch {model.max_batch_size}, preferred {list(model.preferred_batch_sizes)}, "
                f"queue delay {model.max_queue_delay_us} us" if model.max_batch_size else "no batching")
    console.print(f"{batching}; {model.instances} x {model.kind}", highlight=False)
    console.print(f"files: {', '.join(report.files)}", highlight=False, soft_wrap=True)
    gpus = "--gpus all " if model.kind == "KIND_GPU" else ""
    console.print(f"serve: docker run {gpus}--rm -p 8000:8000 -p 8001:8001 -p 8002:8002 "
                  f"-v {report.repository.resolve()}:/models {TRITON_IMAGE} tritonserver --model-repository=/models",
                  highlight=False, soft_wrap=True)


# ---------------------------------------------------------------------------------------------
# Engines: build, bench, infer, verify

EngineHelp = ("A file (.onnx, .xml OpenVINO IR, .plan/.engine, .pt/.pth/.safetensors checkpoint), an engine name "
              "(torch, onnx, onnx-int8, ov-int8, trt-fp16, ...) or a precision (fp32, fp16, bf16, int8, best) resolved for this machine; "
              "names are built from --model on first use into $TWINS_DEPLOY_CACHE (~/.cache/twins-deploy).")
OptionalModelOption = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="Model name, for engines given by name or precision (see 'twins-deploy models').")]
ThreadsOption = Annotated[Optional[int], typer.Option(
    help="CPU threads for onnxruntime/OpenVINO/torch (default: all cores).")]


def _log(message: str) -> None:
    err_console.print(message, highlight=False, markup=False)


def _usage(message: str) -> Exception:
    from twins_deploy.errors import UsageError

    return UsageError(message)


def _checked_config(model: Optional[str], config: Optional[Path]) -> Optional[Path]:
    """Read ``--config`` against the model's family before any work: errors name the key; notes
    (a dropout that inference ignores) go to stderr."""
    if config is None:
        return None
    if model is None:
        raise _usage("--config needs --model: the configuration belongs to a model family")
    from twins_deploy.models import resolve_spec

    notes: list[str] = []
    resolve_spec(model, config, notes)
    for note in notes:
        _log(f"note: {note}")
    return config


def _source(model: Optional[str], weights: str, img_size: Optional[str], num_classes: Optional[int],
            config: Optional[Path] = None):
    from twins_deploy.engines import ModelSource

    config = _checked_config(model, config)
    return ModelSource(model, weights, img_size, num_classes, config) if model else None


@app.command()
def build(
    precision: Annotated[str, typer.Option(
        help="fp32, fp16, bf16, int8 or best (TensorRT); int8 or fp16 (onnxruntime); fp32, bf16 or int8 (openvino).")],
    onnx: Annotated[Optional[Path], typer.Option(
        help="The fp32 ONNX export (default: export --model into the cache).")] = None,
    backend: Annotated[str, typer.Option(
        help="tensorrt (an engine), onnxruntime (an int8/fp16 ONNX) or openvino (an IR: .xml + .bin).")] = "tensorrt",
    model: OptionalModelOption = None,
    weights: WeightsOption = "pretrained",
    img_size: ImgSizeOption = None,
    num_classes: NumClassesOption = None,
    config: ConfigOption = None,
    min_batch: Annotated[int, typer.Option(help="Smallest batch of the TensorRT profile.")] = 1,
    opt_batch: Annotated[int, typer.Option(help="Batch TensorRT tunes its kernels for.")] = 8,
    max_batch: Annotated[int, typer.Option(help="Largest batch of the TensorRT profile.")] = 32,
    calib: Annotated[Optional[Path], typer.Option(
        help="Folder of images to calibrate int8 on (default: seeded synthetic images).")] = None,
    calib_images: Annotated[int, typer.Option(help="How many calibration images to use.")] = 32,
    timing_cache: Annotated[Optional[Path], typer.Option(help="TensorRT timing cache file, read and updated.")] = None,
    workspace: Annotated[float, typer.Option(help="TensorRT workspace limit in GB.")] = 4.0,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="Output file (default: next to the ONNX).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Build a TensorRT engine (fp32/fp16/bf16/int8/best, batch profile, sidecar JSON), an int8/fp16 ONNX or an
    OpenVINO IR (fp32/bf16/int8 through NNCF, our metadata inside)."""
    from twins_deploy.engines.build import build as build_artifact

    if onnx is None:
        if model is None:
            raise _usage("pass --onnx PATH (an fp32 export) or --model NAME to export one first")
        from twins_deploy.engines.artifacts import onnx_metadata
        from twins_deploy.engines.build import default_output
        from twins_deploy.engines.resolve import Builds, model_folder

        source = _source(model, weights, img_size, num_classes, config)
        onnx = Builds(source, model_folder(source), _log).fp32_onnx()
        meta = onnx_metadata(onnx)  # the export lives in the cache; the result goes to the current folder
        output = output or default_output(Path(f"{meta.model}-{meta.input_size[0]}x{meta.input_size[1]}.onnx"),
                                          precision.lower(), backend.lower())
    report = build_artifact(onnx, precision.lower(), backend.lower(), output=output, calib=calib,
                            calib_images=calib_images, min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch,
                            workspace_gb=workspace, timing_cache=timing_cache, log=_log)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    console.print(f"wrote {report['output']} ({report['bytes'] / 1e6:.1f} MB, "
                  f"{report['backend']} {report['precision']})", highlight=False)
    parity = report.get("parity_vs_fp32")
    if isinstance(parity, dict):
        top1 = f", top-1 agreement {parity['top1_agreement']:.1%}" if parity["top1_agreement"] is not None else ""
        console.print(f"vs the fp32 ONNX on 8 synthetic images: cosine {parity['cosine']:.5f}, "
                      f"max abs {parity['max_abs']:.2e}{top1}", highlight=False)
    elif parity:
        console.print(parity, highlight=False)


@app.command()
def bench(
    engine: Annotated[list[str], typer.Option("--engine", "-e", help=EngineHelp + " Several to compare them: "
                                              "-e onnx,int8 or -e onnx -e int8.")],
    model: OptionalModelOption = None,
    weights: WeightsOption = "pretrained",
    img_size: ImgSizeOption = None,
    num_classes: NumClassesOption = None,
    config: ConfigOption = None,
    batch: Annotated[list[str], typer.Option(help="Batch sizes: --batch 1,8,32 or --batch 1 --batch 8.")] = ["1,8"],
    warmup: Annotated[int, typer.Option(help="Untimed runs per engine and batch size.")] = 5,
    iters: Annotated[Optional[int], typer.Option(help="Timed runs per engine and batch size.")] = None,
    seconds: Annotated[Optional[float], typer.Option(
        help="Timed seconds per engine and batch size (default 5 when --iters is not given).")] = None,
    rounds: Annotated[int, typer.Option(help="Interleaved rounds the timed runs are split into.")] = 3,
    clock: Annotated[str, typer.Option(
        help="wall (time a caller waits) or cpu (process CPU time: for shared machines, with --threads 1).")] = "wall",
    threads: ThreadsOption = None,
    compile: Annotated[bool, typer.Option("--compile", help="Wrap torch engines in torch.compile.")] = False,
    cuda_graph: Annotated[bool, typer.Option(help="Replay TensorRT engines as CUDA graphs.")] = True,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the results as JSON here.")] = None,
    csv_path: Annotated[Optional[Path], typer.Option("--csv", help="Write the results as CSV here.")] = None,
    plot: Annotated[Optional[Path], typer.Option(
        "--plot", help="Draw latency (p50, whiskers to p90 and p99) and images/s of every engine at every batch "
                       "into this .png or .svg (needs matplotlib: pip install 'twins-deploy[plot]').")] = None,
) -> None:
    """Latency (min/mean/p50/p90/p95/p99) and throughput of engines at several batch sizes, with ratios.

    Engines run in interleaved rounds; "vs first" is the median over rounds of the first engine's
    round p50 divided by this engine's, and "range" the lowest and highest of those round ratios.
    """
    import csv
    import io
    import time
    from contextlib import ExitStack

    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from twins_deploy.engines import open_engine
    from twins_deploy.files import atomic_output
    from twins_deploy.engines.bench import CLOCKS, bench as run_bench, bench_report, describe_machine

    engine = _split_list(engine)
    try:
        batches = [int(b) for b in _split_list(batch)]
    except ValueError:
        raise _usage(f"--batch takes comma-separated integers like 1,8,32 (or --batch 1 --batch 8), "
                     f"got {','.join(batch)!r}") from None
    if not batches or min(batches) < 1:
        raise _usage(f"--batch needs positive sizes, got {','.join(batch)!r}")
    if plot is not None:
        from twins_deploy.engines.plot import check_plot_path

        check_plot_path(plot)  # before the run, not after it
    if iters is not None and seconds is not None:
        raise _usage("give --iters or --seconds, not both")
    seconds = 5.0 if iters is None and seconds is None else seconds
    if clock not in CLOCKS:
        raise _usage(f"--clock must be one of {', '.join(CLOCKS)}, got {clock!r}")
    source = _source(model, weights, img_size, num_classes, config)
    with ExitStack() as stack:
        runners = [stack.enter_context(open_engine(e, source, threads=threads, compile=compile, cuda_graph=cuda_graph,
                                                   max_batch=max(batches), log=_log)) for e in engine]
        details = {}
        for runner in runners:
            for warning in getattr(runner, "warnings", []):
                _log(f"warning: {warning}")
            info = runner.describe()
            details[info.name] = info.details
            if "settings" in info.details:  # a runner with settings of its own (OpenVINO): say which
                split = ("; a batch that divides among the threads runs as one part per thread, one stream each"
                         if info.details.get("split_batch") else "")
                _log(f"{info.name}: " + ", ".join(f"{k}={v}" for k, v in info.details["settings"].items()) + split)
        total = len(runners) * len(batches) * (iters if iters is not None else seconds)
        with Progress(TextColumn("bench"), BarColumn(), TimeRemainingColumn(), console=err_console,
                      transient=True) as progress:
            task = progress.add_task("bench", total=total)
            last = [time.perf_counter()]

            def step() -> None:
                now = time.perf_counter()
                progress.advance(task, 1 if iters is not None else now - last[0])
                last[0] = now

            rows = run_bench(runners, batches, warmup=warmup, iters=iters, seconds=seconds, rounds=rounds,
                             clock=CLOCKS[clock](), on_step=step)
    machine = describe_machine()
    settings = {"model": model, "weights": weights, "engines": engine, "batches": batches, "warmup": warmup,
                "iters": iters, "seconds": seconds, "rounds": rounds, "threads": threads, "clock": clock,
                "engine_details": details}
    report = bench_report(rows, machine, settings)
    if json_path:
        with atomic_output(json_path) as tmp:
            tmp.write_text(json.dumps(report, indent=2))
    if csv_path:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(report["results"][0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(report["results"])
        with atomic_output(csv_path) as tmp:
            tmp.write_text(buffer.getvalue())
    if plot is not None:
        from twins_deploy.engines.plot import plot_bench

        _log(f"wrote the plot to {plot_bench(report, plot)}")
    gpu = machine["gpu"]["name"] if machine["gpu"] else "no GPU"
    libraries = ", ".join(f"{k} {v}" for k, v in machine["libraries"].items())
    table = _table(f"{machine['cpu']} ({machine['cpu_threads']} threads), {gpu}; {clock} clock; latency in ms",
                   caption=libraries)
    on_gpu = any(row.gpu_compute_ms_p50 is not None for row in rows)
    columns = ["engine", "device", "batch", "p50", "p90", "p99", "mean", "min", "img/s"]
    ratios = len(engine) > 1
    columns += ["GPU p50"] * on_gpu + ["vs first", "range"] * ratios
    for column in columns:
        table.add_column(column, justify="left" if column in ("engine", "device") else "right", no_wrap=True)
    for row in rows:
        s = row.stats
        cells = [row.engine, row.device, str(row.batch), f"{s.latency_ms_p50:.1f}", f"{s.latency_ms_p90:.1f}",
                 f"{s.latency_ms_p99:.1f}", f"{s.latency_ms_mean:.1f}", f"{s.latency_ms_min:.1f}",
                 f"{s.throughput_img_per_s:.1f}"]
        cells += ["" if row.gpu_compute_ms_p50 is None else f"{row.gpu_compute_ms_p50:.2f}"] * on_gpu
        if ratios:
            cells += [f"{row.speedup_vs_first:.2f}x", f"{row.speedup_min:.2f}-{row.speedup_max:.2f}"]
        table.add_row(*cells)
    console.print(table)


def _images_progress(label: str):
    """A transient progress bar on stderr and the ``show(done, total)`` that moves it: images done of the
    total, images per second, time elapsed."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                   TimeElapsedColumn(), console=err_console, transient=True)
    task = bar.add_task(label, total=None, rate="")

    def show(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)
        speed = bar.tasks[0].speed
        bar.update(task, rate=f"{speed:.1f} img/s" if speed else "")

    return bar, show


@app.command()
def infer(
    inputs: Annotated[list[str], typer.Argument(help="Image files, folders (recursive) or globs; with --ray also "
                                                "URIs (s3://, gs://, file://...) and .txt files listing one per line.")],
    engine: Annotated[str, typer.Option("--engine", "-e", help=EngineHelp)],
    model: OptionalModelOption = None,
    weights: WeightsOption = "pretrained",
    img_size: ImgSizeOption = None,
    num_classes: NumClassesOption = None,
    config: ConfigOption = None,
    topk: Annotated[int, typer.Option(help="Predictions per image.")] = 5,
    batch_size: Annotated[int, typer.Option(help="Images per engine call.")] = 32,
    threads: ThreadsOption = None,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="Write predictions to a .jsonl, .csv or .parquet file, or to a folder of Parquet "
                               "parts (a path without a suffix), instead of a table.")] = None,
    ray: Annotated[bool, typer.Option(
        "--ray", help="Run on Ray Data: a private local Ray on 127.0.0.1 (stopped at the end), or the cluster at "
                      "--address.", rich_help_panel="Ray")] = False,
    address: Annotated[Optional[str], typer.Option(
        help="The Ray cluster: auto, HOST:PORT or ray://HOST:PORT (implies --ray).", rich_help_panel="Ray")] = None,
    workers: Annotated[Optional[int], typer.Option(
        help="Engine actors, each with --threads threads (default: one per CPU of the cluster, 1 thread each).",
        rich_help_panel="Ray")] = None,
) -> None:
    """Classify (or embed) images: top-k classes with names and probabilities; exits 1 when any input failed.

    With --ray the job runs on Ray Data, here or on a cluster: every input is answered exactly once,
    even when a worker dies."""
    from twins_deploy.engines.predict import check_output, collect_inputs, predict, write_predictions

    if topk < 1 or batch_size < 1:
        raise _usage("--topk and --batch-size must be at least 1")
    if workers is not None and not (ray or address):
        raise _usage("--workers sets the engine actors of a Ray job: add --ray")
    source = _source(model, weights, img_size, num_classes, config)
    if ray or address:
        from twins_deploy.batch import run_job

        bar, show = _images_progress("infer --ray")
        with bar:
            report = run_job(engine, inputs, source=source, address=address, workers=workers, threads=threads,
                             batch_size=batch_size, topk=topk, output=output, progress=show, log=_log)
        records, total, failed, first = report.records, report.total, report.failed, report.first_failure
        if report.seconds_to_first_result is not None:
            _log(f"{total} inputs in {report.seconds:.1f} s on Ray: {report.seconds_to_ray:.1f} s to start or join "
                 f"it, the first result after {report.seconds_to_first_result:.1f} s")
    else:
        from twins_deploy.engines import open_engine

        if output is not None:
            check_output(output)
        items = collect_inputs(inputs)
        with open_engine(engine, source, threads=threads, log=_log) as runner:
            head = runner.describe().metadata.output
            if output is not None:
                check_output(output, head)
            bar, show = _images_progress("infer")
            with bar:
                records = []
                for record in predict(runner, items, topk=topk, batch_size=batch_size):
                    records.append(record)
                    show(len(records), len(items))
        if output is not None:
            write_predictions(records, output, head)
        failures = [r for r in records if "error" in r]
        total, failed, first = len(records), len(failures), (failures or [None])[0]
    if output is not None:
        _log(f"wrote {total} predictions to {output}")
    else:
        table = _table()
        for column in ("input", "top-1", "prob", f"top-{topk}" if topk > 1 else "class id"):
            table.add_column(column, justify="right" if column == "prob" else "left")
        for record in records:
            if "error" in record:
                table.add_row(record["input"], f"[red]error: {record['error']}[/]", "", "")
                continue
            if "embedding" in record:
                table.add_row(record["input"], f"embedding ({len(record['embedding'])} values)", "", "")
                continue
            best = record["predictions"]
            rest = ", ".join(p["name"] for p in best[1:]) if topk > 1 else str(best[0]["class_id"])
            table.add_row(record["input"], best[0]["name"], f"{best[0]['prob']:.3f}", rest)
        console.print(table)
    if failed:
        _log(f"{failed} of {total} inputs failed (first: {first['input']}: {first['error']})")
        raise typer.Exit(1)


@app.command()
def verify(
    engine: Annotated[str, typer.Option("--engine", "-e", help=EngineHelp)],
    model: Annotated[Optional[str], typer.Option(
        "--model", "-m", help="The reference model (default: the one the engine's metadata names).")] = None,
    weights: Annotated[Optional[str], typer.Option(
        help="The reference weights: 'pretrained', 'random' or a path "
             "(default: those the engine was exported from).")] = None,
    img_size: ImgSizeOption = None,
    num_classes: NumClassesOption = None,
    config: ConfigOption = None,
    images: Annotated[Optional[Path], typer.Option(
        help="Folder of images to compare on (default: seeded synthetic images).")] = None,
    samples: Annotated[int, typer.Option(help="How many images to compare on.")] = 16,
    batch_size: Annotated[int, typer.Option(help="Images per engine call.")] = 8,
    as_json: JsonFlag = False,
) -> None:
    """Compare an engine with PyTorch fp32: max abs diff, cosine, top-1/top-5 agreement; exits 1 on failure."""
    from twins_deploy.engines import ModelSource, open_engine
    from twins_deploy.engines.torch_backend import TorchRunner
    from twins_deploy.engines.verify import reference_model, reference_weights, verification_inputs, verify as run_verify

    if samples < 1 or batch_size < 1:
        raise _usage("--samples and --batch-size must be at least 1")
    source = _source(model, weights or "pretrained", img_size, num_classes, config)
    with open_engine(engine, source, log=_log) as runner:
        meta = runner.describe().metadata
        reference, reference_config = (model, config) if model else reference_model(meta)
        reference_source = ModelSource(reference, weights or reference_weights(meta),
                                       img_size or meta.input_size, num_classes, reference_config)
        data, described = verification_inputs(meta, images, samples)
        with TorchRunner(reference_source.create, device="cpu", precision="fp32") as reference:
            report = run_verify(runner, reference, data, source=described,
                                trained=str(reference_source.weights) != "random", batch_size=batch_size)
    if as_json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        p, t = report.parity, report.threshold
        table = _table(escape(f"{report.engine} ({report.backend}, {report.precision}, {report.device}) vs PyTorch "
                              f"fp32 on {report.samples} images ({report.inputs})"))
        for column in ("figure", "value", "limit", "result"):
            table.add_column(column)
        limits = {"cosine": f">= {t.cosine}", "max_rel": f"<= {t.max_rel}", "top1_agreement": f">= {t.top1:.0%}"}
        values = {"max_abs": f"{p.max_abs:.3e}", "max_rel": f"{p.max_rel:.3e}", "cosine": f"{p.cosine:.6f}",
                  "top1_agreement": "" if p.top1_agreement is None else f"{p.top1_agreement:.1%}",
                  "top5_agreement": "" if p.top5_agreement is None else f"{p.top5_agreement:.1%}"}
        for name, value in values.items():
            verdict = "" if name not in report.checks else ("[green]pass[/]" if report.checks[name] else "[red]FAIL[/]")
            table.add_row(name, value, limits.get(name, "") if name in report.checks else "", verdict)
        console.print(table)
        if "top1_agreement" not in report.checks and p.top1_agreement is not None:
            _log("note: top-1 agreement is not enforced with random weights (their logits are near ties)")
    if not report.passed:
        failed = ", ".join(k for k, ok in report.checks.items() if not ok)
        _log(f"verify failed: {failed} outside the {report.precision} limits")
        raise typer.Exit(1)


@app.command()
def export(
    model: ModelOption,
    weights: WeightsOption = "pretrained",
    img_size: ImgSizeOption = None,
    batch: Annotated[str, typer.Option(help="'dynamic' (any batch at run time) or a fixed batch size.")] = "dynamic",
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="ONNX file to write. Default: <model>-<H>x<W>.onnx in the current folder.")] = None,
    opset: Annotated[int, typer.Option(
        help="ONNX opset, 17 to 23. 17 is the lowest with LayerNormalization as one node.")] = 17,
    head: Annotated[str, typer.Option(
        help="logits (classes), embedding (pooled features) or features (the four NCHW stage maps).")] = "logits",
    simplify: Annotated[bool, typer.Option(
        "--simplify/--no-simplify", help="Fold constants and drop dead nodes (onnxscript optimizer).")] = True,
    verify: Annotated[bool, typer.Option(
        "--verify/--no-verify", help="Compare onnxruntime (CPU) with PyTorch at batch 1 and 3; exit 1 above 1e-4 relative.")] = True,
    num_classes: NumClassesOption = None,
    config: ConfigOption = None,
    mean: Annotated[Optional[list[str]], typer.Option(
        help="Per-channel mean the images are normalised with, e.g. 0.5,0.5,0.5 (default: the model's, ImageNet's).",
        rich_help_panel="Preprocessing stored in the file")] = None,
    std: Annotated[Optional[list[str]], typer.Option(
        help="Per-channel std, e.g. 0.5,0.5,0.5 (default: the model's).", rich_help_panel="Preprocessing stored in the file")] = None,
    interpolation: Annotated[Optional[str], typer.Option(
        help="Resize filter: bicubic, bilinear or nearest (default: the model's).",
        rich_help_panel="Preprocessing stored in the file")] = None,
    crop_pct: Annotated[Optional[float], typer.Option(
        help="Centre-crop fraction, 0 < crop_pct <= 1 (default: the model's).",
        rich_help_panel="Preprocessing stored in the file")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Export a model to ONNX: static reshapes, one node per LayerNorm, metadata, verified against PyTorch."""
    from twins_deploy.exporters.onnx import PARITY_MAX_REL, check_export_args, export_onnx
    from twins_deploy.preprocess import parse_preprocessing

    check_export_args(batch, opset, head)  # usage errors before the weights load
    config = _checked_config(model, config)
    mean, std = (",".join(_split_list(channels)) if channels else None for channels in (mean, std))
    preprocessing = parse_preprocessing(mean, std, interpolation, crop_pct)
    with err_console.status(f"exporting {model}", spinner="dots") as status:
        report = export_onnx(model, output, weights=weights, img_size=img_size, batch=batch, opset=opset,
                             head=head, simplify=simplify, verify=verify, num_classes=num_classes, config=config,
                             preprocessing=preprocessing, progress=lambda message: status.update(message))
    if as_json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        _print_export(report)
    if not report.passed:
        worst = max(report.parity, key=lambda row: row["max_rel"])
        err_console.print(f"error: the export differs from PyTorch by {worst['max_rel']:.2e} relative "
                          f"({worst['output']}, batch {worst['batch']}), above {PARITY_MAX_REL:.0e}; "
                          f"the file is kept for inspection: {report.path}", highlight=False)
        raise typer.Exit(1)


def _print_export(report) -> None:
    spec, meta = report.spec, report.metadata
    batch = "batch" if spec.batch == "dynamic" else str(spec.batch)
    table = _table(escape(f"{meta.model} {spec.img_size[0]}x{spec.img_size[1]} -> {report.path}"), show_header=False)
    table.add_column("property", style="bold")
    table.add_column("value")
    table.add_row("opset", str(report.opset))
    table.add_row("input", escape(f"pixel_values [{batch}, 3, {spec.img_size[0]}, {spec.img_size[1]}] float32"))
    table.add_row("outputs", ", ".join(spec.output_names) + f" (head {spec.head})")
    table.add_row("nodes", f"{report.num_nodes}: " + ", ".join(f"{op} {n}" for op, n in report.nodes_by_op.items()))
    table.add_row("parameters", f"{report.params:,}")
    table.add_row("file size", f"{report.file_bytes / 1e6:.1f} MB")
    table.add_row("weights", escape(meta.weights or "unknown"))
    for row in report.parity:
        top1 = f", top-1 {row['top1_agreement']:.0%}" if row["top1_agreement"] is not None else ""
        verdict = "ok" if row["passed"] else "FAILED"
        table.add_row(f"parity b={row['batch']} {row['output']}",
                      f"{verdict}: max abs {row['max_abs']:.2e}, rel {row['max_rel']:.2e}, "
                      f"cosine {row['cosine']:.6f}{top1}")
    if not report.verified:
        table.add_row("parity", "not verified (--no-verify)")
    table.add_row("time", f"{report.seconds:.1f} s")
    console.print(table)
    if report.passed:
        console.print(f"wrote {report.path} ({report.file_bytes / 1e6:.1f} MB) in {report.seconds:.1f} s; next: "
                      f"twins-deploy bench --engine {report.path} --batch 1,8", highlight=False, markup=False)


@app.command()
def serve(
    model_file: Annotated[Optional[Path], typer.Argument(
        metavar="[MODEL]", help="An exported .onnx (fp32, fp16 or int8) or an OpenVINO IR .xml; or leave it out and "
                                "name an engine with --model and --engine.")] = None,
    model: OptionalModelOption = None,
    engine: Annotated[Optional[str], typer.Option(
        "--engine", "-e", help="With --model: an engine name or precision resolved as 'bench --engine' does "
                               "(onnx, onnx-int8, ov-int8, int8, best, ...), built into the cache on first use.")] = None,
    weights: WeightsOption = "pretrained",
    img_size: ImgSizeOption = None,
    num_classes: NumClassesOption = None,
    config: ConfigOption = None,
    host: Annotated[str, typer.Option(help="Address the HTTP server listens on; anything but loopback is "
                                           "reachable by others (a warning says so).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8000,
    metrics_port: Annotated[int, typer.Option(help="Prometheus metrics port of the local Ray (Serve's request "
                                                   "counts, latency histograms, queue lengths).")] = 8080,
    address: Annotated[Optional[str], typer.Option(
        help="Deploy into this Ray cluster (auto, host:port, ray://...) instead of starting a local Ray; the app "
             "is deleted when the command exits.")] = None,
    num_cpus: Annotated[Optional[int], typer.Option(help="CPUs the local Ray offers (default: the machine's).")] = None,
    name: Annotated[Optional[str], typer.Option(help="Model name in URLs (default: the file's model name).")] = None,
    replicas: Annotated[int, typer.Option(help="Model replicas (fixed).")] = 1,
    min_replicas: Annotated[Optional[int], typer.Option(help="With --max-replicas: Serve's autoscaling.")] = None,
    max_replicas: Annotated[Optional[int], typer.Option(help="With --min-replicas: Serve's autoscaling.")] = None,
    threads: Annotated[Optional[int], typer.Option(help="Engine threads per replica (default: a local Ray's CPUs "
                                                        "shared by the replicas; on a cluster, --replica-cpus).")] = None,
    streams: Annotated[Optional[int], typer.Option(
        help="Batches a replica runs at once, sharing its threads (default: one thread each, the most images/s; "
             "a batch that starts while none runs gets every thread; 1: every batch gets every thread).")] = None,
    replica_cpus: Annotated[float, typer.Option(help="Ray CPUs each model replica reserves.")] = 1.0,
    max_batch: Annotated[Optional[int], typer.Option(
        help="Images per engine call: Serve's dynamic batching gathers concurrent requests up to this (default: "
             "1 for an OpenVINO IR on several streams, else the smallest of 1, 2, 4, 8 within 5% of the most "
             "images/s, timed when a replica starts).")] = None,
    batch_wait_ms: Annotated[float, typer.Option(help="How long a batch waits to fill, in ms.")] = 2.0,
    max_queued: Annotated[int, typer.Option(help="Requests each replica queues beyond a batch, and as many "
                                                 "again in front of the replicas; past that: 503 with "
                                                 "Retry-After.")] = 64,
    max_body_mb: Annotated[float, typer.Option(help="Largest request body; larger: 413, refused from its "
                                                    "Content-Length.")] = 16.0,
    top_k: Annotated[int, typer.Option(help="Classes per image in /v1 answers (a request may pass ?top_k=).")] = 5,
) -> None:
    """Serve a model over HTTP on Ray Serve, with dynamic batching and Triton's v2 protocol.

    /v1 takes encoded images, /v2 is the Open Inference Protocol (tritonclient works); a request whose
    replica dies is retried on another. Runs until Ctrl-C or SIGTERM, then answers the requests in flight
    and exits 0.
    """
    from twins_deploy.serving import ServeOptions
    from twins_deploy.serving.server import Listen, run_server

    options = ServeOptions(name=name, replicas=replicas, min_replicas=min_replicas, max_replicas=max_replicas,
                           threads=threads, streams=streams, replica_cpus=replica_cpus, max_batch=max_batch,
                           batch_wait_ms=batch_wait_ms, max_queued=max_queued, max_body_mb=max_body_mb, top_k=top_k)
    if (model_file is None) == (engine is None):
        raise _usage("pass a model file (.onnx or .xml), or --model NAME with --engine NAME, one of them")
    if engine is not None:
        from twins_deploy.engines import open_engine

        runner = open_engine(engine, _source(model, weights, img_size, num_classes, config), threads=threads, log=_log)
        model_file = getattr(runner, "path", None)
        if model_file is None:
            raise _usage(f"serve runs ONNX files and OpenVINO IRs; --engine {engine} resolves to "
                         f"{type(runner).__name__}: pick onnx, onnx-int8, ov, ov-bf16 or ov-int8")
    if num_cpus is not None and (num_cpus < 1 or address):
        raise _usage("--num-cpus sizes the local Ray: a whole number of at least 1, and not with --address")
    run_server(model_file, options, Listen(host, port, metrics_port), address=address, num_cpus=num_cpus, log=_log)


if __name__ == "__main__":  # python -m twins_deploy.cli, as the console script
    app()
