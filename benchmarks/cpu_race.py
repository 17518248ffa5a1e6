"""The CPU race, in one process: our best CPU engine vs onnxruntime vs OpenVINO by hand on our export.

    python benchmarks/cpu_race.py                          # svt-s and pcpvt-s, batch 1 and 8, 2 threads
    python benchmarks/cpu_race.py --models svt-s --rounds 20
    python benchmarks/cpu_race.py --models svt-s --batch 1 --rounds 3 --profile   # + where the time goes
    python benchmarks/cpu_race.py --models vit-flax/ViT,vit-flax/CrossFormer --jax2onnx /tmp/jax2onnx

Engines (all from the same fp32 export of timm-initialised weights, ``--weights random``):

- ours, ``--engine best`` / ``--engine int8`` resolved on this host (OpenVINO installed: ``ov-int8``,
  our IR, our NNCF settings and our runner settings);
- ours, ``--engine onnx`` (onnxruntime fp32), and with ``--ours onnx-int8,onnx`` onnxruntime int8 too;
- OpenVINO by hand: ``core.compile_model(ov.convert_model(export), "CPU")`` at its default precision,
  and NNCF int8 as OpenVINO documents it, ``nncf.quantize(model, dataset, model_type=TRANSFORMER)``
  on the same calibration images, compiled with a dynamic batch; and the fairest by-hand int8, what a
  careful user does: per batch size, ``model.reshape`` to that static batch, then ``nncf.quantize``
  on the same calibration images (in chunks of that batch). Only ``INFERENCE_NUM_THREADS`` is set.

vit-flax's models run at their seed configurations. With ``--jax2onnx DIR`` (what
``benchmarks/jax2onnx_exports.py`` writes, in a venv with jax: see its docstring) our model loads the seeded Flax
weights ``DIR/<Class>.msgpack`` and the three by-hand routes also run on jax2onnx's export of the same Flax
model, ``DIR/<Class>.onnx`` (NHWC: its input is transposed once, untimed); a route OpenVINO refuses is reported
with the first line of its error instead of timed. Without it the vit-flax weights are our seeded ones and those
rows are skipped (the report says so).

``--profile`` adds OpenVINO's performance counters (``PERF_COUNT``) of our best engine and of the
static by-hand int8 at each batch size: milliseconds per inference and share for each node type and
kernel (exec type), summed over ``--runs`` inferences.

Each engine runs a whole round of ``--runs`` inferences before the next one starts (on 2 cores a
thread pool that just ran keeps spinning and steals the next engine's cores, so alternating single
runs would measure the contention). Ratios are taken within each round; the median over rounds is
reported with its range. Accuracy, at each batch size (a static-batch int8 is quantized per size):
cosine (lowest per image), top-1 and top-5 agreement with the onnxruntime fp32 export (within 1e-4 of
PyTorch fp32) on 16 seeded synthetic images that are not the calibration images.
JSON in benchmarks/results/cpu-race.json (``--output``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
CALIBRATION = 32  # synthetic images, seed 0: what our on-the-fly int8 builds use too
HAND_INT8, HAND_FP = "OpenVINO by hand, NNCF int8", "OpenVINO by hand, default precision"
HAND_INT8_STATIC = "OpenVINO by hand, NNCF int8, static batch (reshaped, then quantized)"
OURS_SETTINGS = ("INFERENCE_NUM_THREADS", "NUM_STREAMS", "PERFORMANCE_HINT", "INFERENCE_PRECISION_HINT")
BASES = (HAND_INT8_STATIC, HAND_INT8, HAND_FP, "ours: --engine onnx")  # every row's speed-up against these
ON_JAX2ONNX = " on jax2onnx's export"  # appended to a by-hand label: the same route on jax2onnx's file


def first_line(exc: BaseException) -> str:
    """One line of why: for OpenVINO's report of ONNX ops it could not convert, the ops and each one's cause."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    summary = next((line for line in lines if line.startswith("-- Conversion is failed for:")), None)
    if summary is None:
        return f"{type(exc).__name__}: {lines[0] if lines else ''}"
    causes = [lines[i + 1] for i, line in enumerate(lines[:-1]) if line.startswith("While validating ONNX node")]
    return f"{type(exc).__name__}: {summary[3:]} ({'; '.join(dict.fromkeys(causes))})"


class ChannelsLast:
    """A runner fed NHWC images (jax2onnx's export of a Flax model): ``prepare`` converts the race's NCHW batch."""

    def __init__(self, infer):
        self.infer = infer

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.infer(batch)

    @staticmethod
    def prepare(batch: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(batch.transpose(0, 2, 3, 1))


def fed(run, batch: np.ndarray) -> np.ndarray:
    """``batch`` (NCHW) in the layout ``run`` takes."""
    return run.prepare(batch) if isinstance(run, ChannelsLast) else batch


class HandRunner:
    """OpenVINO as its documentation shows it: compile with a thread count only. One dynamic-batch
    ``model``, or, given ``make(batch)`` instead, one static model per batch size made on first use."""

    def __init__(self, threads: int, model=None, make=None):
        import openvino as ov

        self.core, self.config = ov.Core(), {"INFERENCE_NUM_THREADS": str(threads)}
        self.make, self.models, self.requests = make, {}, {}
        if model is not None:
            self.models[0] = model
            self.requests[0] = self.core.compile_model(model, "CPU", self.config).create_infer_request()

    def model_for(self, batch: int):
        key = 0 if self.make is None else batch
        if key not in self.models:
            self.models[key] = self.make(batch)
            self.requests[key] = self.core.compile_model(self.models[key], "CPU", self.config).create_infer_request()
        return key

    def infer(self, batch: np.ndarray) -> np.ndarray:
        request = self.requests[self.model_for(len(batch))]
        request.infer({0: batch}, share_inputs=True)
        return request.get_output_tensor(0).data.copy()


def hand_int8(model, calibration: np.ndarray, batch: int = 1):
    """``nncf.quantize`` as OpenVINO documents it for a transformer, on ``calibration`` in chunks of ``batch``."""
    import nncf

    chunks = [calibration[i:i + batch] for i in range(0, len(calibration) - batch + 1, batch)]
    with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars: stdout carries the table
        return nncf.quantize(model, nncf.Dataset(chunks), model_type=nncf.ModelType.TRANSFORMER)


def static_hand_int8(fp32: Path, calibration: np.ndarray):
    """What a careful user does: reshape the converted export to the batch size, then quantize it."""
    import openvino as ov

    def make(batch: int):
        model = ov.convert_model(str(fp32))
        model.reshape([batch, *calibration.shape[1:]])
        return hand_int8(model, calibration, batch)
    return make


def hand_routes(path: Path, calibration: np.ndarray, threads: int) -> dict:
    """The three by-hand OpenVINO routes on the ONNX file at ``path``, by label: a ``HandRunner``, or why
    OpenVINO refused to convert, quantize or compile it."""
    import openvino as ov

    try:
        converted = ov.convert_model(str(path))
    except Exception as exc:  # a file OpenVINO cannot read: every route is refused for the same reason
        return dict.fromkeys((HAND_FP, HAND_INT8, HAND_INT8_STATIC), first_line(exc))
    routes = {HAND_FP: lambda: HandRunner(threads, converted),
              HAND_INT8: lambda: HandRunner(threads, hand_int8(ov.convert_model(str(path)), calibration)),
              HAND_INT8_STATIC: lambda: HandRunner(threads, make=static_hand_int8(path, calibration))}
    made = {}
    for label, make in routes.items():
        try:
            made[label] = make()
        except Exception as exc:  # OpenVINO's or NNCF's refusal is the finding
            made[label] = first_line(exc)
    return made


def jax2onnx_export(name: str, folder: Path | None) -> tuple[Path | None, Path | None, str | None]:
    """For a vit-flax model: the seeded Flax weights and jax2onnx's export in ``folder`` (``jax2onnx_exports.py``),
    or why there are none; other models (None, None, None)."""
    from twins_deploy.models import resolve_spec

    spec = resolve_spec(name, None)
    if not spec.name.startswith("vit-flax/"):
        return None, None, None
    if folder is None:
        return None, None, "skipped: no --jax2onnx DIR (benchmarks/jax2onnx_exports.py makes it)"
    manifest = folder / "exports.json"
    entry = json.loads(manifest.read_text()).get(spec.name) if manifest.is_file() else None
    if entry is None:
        return None, None, f"{spec.name} is not in {manifest}: run benchmarks/jax2onnx_exports.py --models {spec.name}"
    why = f"jax2onnx failed: {entry['error']}" if "error" in entry else None
    return folder / entry["weights"], (folder / entry["onnx"]) if "onnx" in entry else None, why


def engines_for(name: str, threads: int, log, engines: tuple[str, ...], weights: str = "random",
                theirs: Path | None = None) -> tuple[dict, dict, Path, dict, dict]:
    """Every engine of the race for one model (``weights``; ``theirs``: jax2onnx's export of the same model, for
    the by-hand routes on it), ready to ``infer``; their descriptions; the fp32 export; what ``--profile`` compiles
    with performance counters: ``(model, config)`` per batch for our best engine (when OpenVINO runs it) and the
    static by-hand int8; the by-hand routes OpenVINO refused, with why."""
    import openvino as ov

    from twins_deploy.engines import ModelSource, detect_capabilities, open_engine, resolve_name
    from twins_deploy.engines.artifacts import onnx_metadata
    from twins_deploy.engines.quantize import synthetic_images
    from twins_deploy.engines.resolve import Builds, model_folder

    source = ModelSource(name, weights=weights)
    builds = Builds(source, model_folder(source), log)  # the files --engine NAME builds and caches, made once here
    fp32 = builds.fp32_onnx()
    best = resolve_name("best", detect_capabilities())[0].name
    files = {"ov-int8": lambda: builds.openvino_ir("int8"), "onnx-int8": lambda: builds.int8_onnx("cpu"),
             "onnx": lambda: fp32}
    calibration = synthetic_images(onnx_metadata(fp32), CALIBRATION, seed=0)
    runners, described, profiled = {}, {}, {}
    for engine in engines:
        runner = open_engine(str(files[best if engine == "best" else engine]()), threads=threads)
        runner.activate()
        info = runner.describe()
        label = f"ours: --engine {engine}" + (f" ({info.name})" if engine == "best" else "")
        runners[label] = lambda batch, r=runner, out=info.output_names[0]: r.infer(batch)[out]
        described[label] = {"engine": info.name, "backend": info.backend, "precision": info.precision,
                            "artifact": info.artifact, "details": info.details}
        if engine == "best" and info.backend == "openvino":
            settings = {key: str(info.details["settings"][key]) for key in OURS_SETTINGS}
            profiled[label] = lambda batch, path=info.artifact, config=settings: (path, config)
    log("OpenVINO by hand: nncf.quantize(model, dataset, model_type=TRANSFORMER) on the same calibration images")
    routes = {label: (runner, fp32) for label, runner in hand_routes(fp32, calibration, threads).items()}
    if theirs is not None:
        log(f"the same by hand on jax2onnx's export {theirs}")
        routes |= {label + ON_JAX2ONNX: (runner, theirs) for label, runner in
                   hand_routes(theirs, ChannelsLast.prepare(calibration), threads).items()}
    not_raced = {}
    for label, (runner, path) in routes.items():
        if isinstance(runner, str):
            not_raced[label] = f"OpenVINO refuses it: {runner}"
            continue
        runners[label] = ChannelsLast(runner.infer) if path == theirs else runner.infer
        described[label] = {"config": runner.config, "batch": "dynamic" if runner.make is None else "static per size",
                            "onnx": str(path)}
    static = routes[HAND_INT8_STATIC][0]
    if isinstance(static, HandRunner):
        profiled[HAND_INT8_STATIC] = lambda batch: (static.models[static.model_for(batch)], static.config)
    return runners, described, fp32, profiled, not_raced


def accuracy(runners: dict, fp32: Path, batch: int, samples: int = 16) -> dict:
    """Each engine against the fp32 export on ``samples`` images run in batches of ``batch`` (a static-batch
    int8 is quantized per batch size, so its accuracy is too); cosine is the lowest per image."""
    from twins_deploy.engines.artifacts import onnx_metadata
    from twins_deploy.engines.quantize import synthetic_images
    from twins_deploy.parity import compare

    images = synthetic_images(onnx_metadata(fp32), samples, seed=1)
    reference = runners["ours: --engine onnx"](images)
    return {label: compare(reference, np.concatenate([run(fed(run, images[i:i + batch]))
                                                      for i in range(0, samples, batch)])).as_dict()
            for label, run in runners.items()}


def perf_counters(model, config: dict, batch: int, runs: int) -> dict:
    """OpenVINO's ``PERF_COUNT`` of ``model`` (an ``ov.Model`` or a path) compiled with ``config`` at a static
    ``batch``: milliseconds per inference by node type and kernel, the largest first."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(model) if isinstance(model, str) else model.clone()
    model.reshape([batch, *list(model.inputs[0].get_partial_shape())[1:]])
    request = core.compile_model(model, "CPU", {**config, "PERF_COUNT": "YES"}).create_infer_request()
    data = np.random.default_rng(0).standard_normal(tuple(model.inputs[0].get_shape())).astype(np.float32)
    for _ in range(3):
        request.infer({0: data})
    totals, nodes, wall = {}, {}, []
    for _ in range(runs):
        start = time.perf_counter()
        request.infer({0: data})
        wall.append(time.perf_counter() - start)
        for counter in request.profiling_info:
            if counter.status == counter.Status.EXECUTED:
                key = (counter.node_type, counter.exec_type)
                totals[key] = totals.get(key, 0.0) + counter.real_time.total_seconds() * 1e3 / runs
                nodes[key] = nodes.get(key, 0) + 1
    counted = sum(totals.values())
    rows = [{"node_type": node, "exec_type": kernel, "ms": round(ms, 3), "share": round(ms / counted, 4),
             "nodes": nodes[(node, kernel)] // runs} for (node, kernel), ms in sorted(totals.items(), key=lambda kv: -kv[1])]
    return {"batch": batch, "wall_ms_median": round(float(np.median(wall)) * 1e3, 2), "counted_ms": round(counted, 2),
            "by_exec_type": rows}


def profile_table(profiles: dict, top: int = 12) -> str:
    lines = []
    for label, profile in profiles.items():
        lines.append(f"\n{label}: {profile['counted_ms']:.1f} ms counted "
                     f"({profile['wall_ms_median']:.1f} ms wall, median)")
        lines.append("| node type | exec type | nodes | ms | share |\n|---|---|---:|---:|---:|")
        lines += [f"| {r['node_type']} | {r['exec_type']} | {r['nodes']} | {r['ms']:.2f} | {r['share']:.0%} |"
                  for r in profile["by_exec_type"][:top]]
    return "\n".join(lines)


def usable(runners: dict, batch: int, image: tuple[int, ...]) -> tuple[dict, dict]:
    """The engines that run a batch of ``batch`` images, and the by-hand ones OpenVINO refuses at that size, with
    why (a static int8 is reshaped, quantized and compiled for a size on its first batch of that size)."""
    images = np.zeros((batch, *image), np.float32)
    running, refused = {}, {}
    for label, run in runners.items():
        try:
            run(fed(run, images))
        except Exception as exc:
            if label.startswith("ours"):
                raise
            refused[label] = f"OpenVINO refuses it at batch {batch}: {first_line(exc)}"
            continue
        running[label] = run
    return running, refused


def race(runners: dict, batch: int, image: tuple[int, ...], rounds: int, runs: int, warmup: int = 3) -> dict:
    images = np.random.default_rng(0).standard_normal((batch, *image)).astype(np.float32)
    inputs = {label: fed(run, images) for label, run in runners.items()}
    for label, run in runners.items():
        for _ in range(warmup):
            run(inputs[label])
    medians = {label: [] for label in runners}
    for _ in range(rounds):
        for label, run in runners.items():  # a whole round of one engine, then the next
            data, times = inputs[label], []
            for _ in range(runs):
                start = time.perf_counter()
                run(data)
                times.append(time.perf_counter() - start)
            medians[label].append(float(np.median(times)) * 1e3)
    rows = {}
    for label, values in medians.items():
        values = np.asarray(values)
        row = {"latency_ms_median": float(np.median(values)), "latency_ms_round_medians": values.round(2).tolist()}
        for base in (base for base in BASES if base in medians):  # a base OpenVINO refused has no column
            ratios = np.asarray(medians[base]) / values
            row[f"speedup_vs {base}"] = [float(np.median(ratios)), float(ratios.min()), float(ratios.max())]
        rows[label] = row
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="svt-s,pcpvt-s")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--runs", type=int, default=10, help="inferences per engine per round (at least 10)")
    parser.add_argument("--ours", default="onnx", help="our engines besides --engine best, e.g. onnx-int8,onnx")
    parser.add_argument("--profile", action="store_true",
                        help="OpenVINO's PERF_COUNT breakdown of our best engine and the static by-hand int8")
    parser.add_argument("--jax2onnx", type=Path, help="folder benchmarks/jax2onnx_exports.py wrote: vit-flax models "
                        "load its Flax weights and the by-hand routes also run on its jax2onnx exports")
    parser.add_argument("--output", type=Path, default=RESULTS / "cpu-race.json")
    args = parser.parse_args()
    if args.jax2onnx is not None and not (args.jax2onnx / "exports.json").is_file():
        parser.error(f"{args.jax2onnx} holds no exports.json: make it with benchmarks/jax2onnx_exports.py")

    import openvino as ov
    import onnxruntime as ort

    from twins_deploy.engines.artifacts import onnx_metadata
    from twins_deploy.engines.bench import describe_machine
    from twins_deploy.files import atomic_output

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    settings = vars(args) | {"output": str(args.output), "jax2onnx": args.jax2onnx and str(args.jax2onnx)}
    report = {"schema_version": 1, "machine": describe_machine(), "openvino": ov.__version__,
              "onnxruntime": ort.__version__, "settings": settings, "models": {}}
    lines, profile_tables = [], []
    for name in args.models.split(","):
        log(f"== {name}")
        weights, theirs, why = jax2onnx_export(name, args.jax2onnx)
        runners, described, fp32, profiled, not_raced = engines_for(
            name, args.threads, log, ("best", *args.ours.split(",")), str(weights or "random"), theirs)
        if why:  # no jax2onnx export to race, or jax2onnx failed to write one
            not_raced |= {label + ON_JAX2ONNX: why for label in (HAND_FP, HAND_INT8, HAND_INT8_STATIC)}
        image = (3, *onnx_metadata(fp32).input_size)
        timings, parity, profiles, refused = {}, {}, {}, {}
        for batch in (int(b) for b in args.batch.split(",")):
            running, refused[batch] = usable(runners, batch, image)
            parity[batch] = accuracy(running, fp32, batch)
            log(f"racing batch {batch}: {args.rounds} rounds x {args.runs} runs per engine")
            timings[batch] = race(running, batch, image, args.rounds, args.runs)
            if args.profile:
                log(f"performance counters at batch {batch}")
                for label, compiled in profiled.items():
                    profiles[f"{label}, batch {batch}"] = perf_counters(*compiled(batch), batch, args.runs)
        report["models"][name] = {"weights": str(weights or "random"), "jax2onnx_export": theirs and str(theirs),
                                  "engines": described, "parity_vs_onnx_fp32": parity, "batches": timings,
                                  "perf_counters": profiles, "not_raced": not_raced | {
                                      f"{label}, batch {batch}": why for batch, whys in refused.items()
                                      for label, why in whys.items()}}
        rows_before = len(lines)
        for label in runners:
            cells = [name, label]
            for batch, rows in timings.items():
                if label not in rows:
                    cells += ["-", refused[batch][label], "-", "-"]
                    continue
                row = rows[label]
                ratios = [row.get(f"speedup_vs {base}") for base in (HAND_INT8_STATIC, HAND_INT8, HAND_FP)]
                cells += [f"{row['latency_ms_median']:.1f}"] + ["-" if ratio is None else f"{ratio[0]:.2f}x" + (
                    f" ({ratio[1]:.2f}-{ratio[2]:.2f})" if column == 0 else "") for column, ratio in enumerate(ratios)]
            for key, form in (("cosine", "{:.4f}"), ("top1_agreement", "{:.0%}"), ("top5_agreement", "{:.0%}")):
                cells.append(" / ".join(form.format(parity[batch][label][key]) if label in parity[batch] else "-"
                                        for batch in timings))
            lines.append("| " + " | ".join(cells) + " |")
        lines += [f"| {name} | {label} | {why} |" for label, why in not_raced.items()]
        with atomic_output(args.output) as tmp:  # after each model: a long run keeps what it measured
            tmp.write_text(json.dumps(report, indent=2))
        print("\n".join(lines[rows_before:]), file=sys.stderr, flush=True)
        profile_tables.append(profile_table(profiles) if profiles else "")
    batches = args.batch.split(",")
    columns = ("ms", "vs OV int8 static by hand", "vs OV int8 dynamic by hand", "vs OV by hand")
    header = ["model", "engine"] + [f"b{b} {c}" for b in batches for c in columns]
    header += [f"{c} (b{' / b'.join(batches)})" for c in ("cosine (min)", "top-1", "top-5")]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * 2 + "---:|" * (len(header) - 2))
    print("\n".join(lines))
    print("\n".join(profile_tables))
    print(f"\n{report['machine']['cpu']}, {args.threads} threads, OpenVINO {ov.__version__}, "
          f"onnxruntime {ort.__version__}; {args.rounds} rounds x {args.runs} runs; JSON: {args.output}")


if __name__ == "__main__":
    main()
