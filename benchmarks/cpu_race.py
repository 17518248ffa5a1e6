"""The CPU race, in one process: our best CPU engine vs onnxruntime vs OpenVINO by hand on our export.

    python benchmarks/cpu_race.py                          # svt-s and pcpvt-s, batch 1 and 8, 2 threads
    python benchmarks/cpu_race.py --models svt-s --rounds 20
    python benchmarks/cpu_race.py --models svt-s --batch 1 --rounds 3 --profile   # + where the time goes

Engines (all from the same fp32 export of timm-initialised weights, ``--weights random``):

- ours, ``--engine best`` / ``--engine int8`` resolved on this host (OpenVINO installed: ``ov-int8``,
  our IR, our NNCF settings and our runner settings);
- ours, ``--engine onnx`` (onnxruntime fp32), and with ``--ours onnx-int8,onnx`` onnxruntime int8 too;
- OpenVINO by hand: ``core.compile_model(ov.convert_model(export), "CPU")`` at its default precision,
  and NNCF int8 as OpenVINO documents it, ``nncf.quantize(model, dataset, model_type=TRANSFORMER)``
  on the same calibration images, compiled with a dynamic batch; and the fairest by-hand int8, what a
  careful user does: per batch size, ``model.reshape`` to that static batch, then ``nncf.quantize``
  on the same calibration images (in chunks of that batch). Only ``INFERENCE_NUM_THREADS`` is set.

``--profile`` adds OpenVINO's performance counters (``PERF_COUNT``) of our best engine and of the
static by-hand int8 at each batch size: milliseconds per inference and share for each node type and
kernel (exec type), summed over ``--runs`` inferences.

Each engine runs a whole round of ``--runs`` inferences before the next one starts (on 2 cores a
thread pool that just ran keeps spinning and steals the next engine's cores, so alternating single
runs would measure the contention). Ratios are taken within each round; the median over rounds is
reported with its range. Accuracy, at each batch size (a static-batch int8 is quantized per size):
cosine (lowest per image), top-1 and top-5 agreement with the onnxruntime fp32 export (within 1e-4 of
PyTorch fp32) on 16 seeded synthetic images that are not the calibration images.
JSON in benchmarks/results/cpu-race.json.
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


def engines_for(name: str, threads: int, log, engines: tuple[str, ...]) -> tuple[dict, dict, Path, dict]:
    """Every engine of the race for one model, ready to ``infer``; their descriptions; the fp32 export; what
    ``--profile`` compiles with performance counters: ``(model, config)`` per batch for our best engine (when
    OpenVINO runs it) and the static by-hand int8."""
    import openvino as ov

    from twins_deploy.engines import ModelSource, detect_capabilities, open_engine, resolve_name
    from twins_deploy.engines.artifacts import onnx_metadata
    from twins_deploy.engines.quantize import synthetic_images
    from twins_deploy.engines.resolve import Builds, model_folder

    source = ModelSource(name, weights="random")
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
    static = HandRunner(threads, make=static_hand_int8(fp32, calibration))
    for label, runner in ((HAND_FP, HandRunner(threads, ov.convert_model(str(fp32)))),
                          (HAND_INT8, HandRunner(threads, hand_int8(ov.convert_model(str(fp32)), calibration))),
                          (HAND_INT8_STATIC, static)):
        runners[label] = runner.infer
        described[label] = {"config": runner.config, "batch": "dynamic" if runner.make is None else "static per size"}
    profiled[HAND_INT8_STATIC] = lambda batch: (static.models[static.model_for(batch)], static.config)
    return runners, described, fp32, profiled


def accuracy(runners: dict, fp32: Path, batch: int, samples: int = 16) -> dict:
    """Each engine against the fp32 export on ``samples`` images run in batches of ``batch`` (a static-batch
    int8 is quantized per batch size, so its accuracy is too); cosine is the lowest per image."""
    from twins_deploy.engines.artifacts import onnx_metadata
    from twins_deploy.engines.quantize import synthetic_images
    from twins_deploy.parity import compare

    images = synthetic_images(onnx_metadata(fp32), samples, seed=1)
    reference = runners["ours: --engine onnx"](images)
    return {label: compare(reference, np.concatenate([run(images[i:i + batch]) for i in range(0, samples, batch)]))
            .as_dict() for label, run in runners.items()}


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


def race(runners: dict, batch: int, rounds: int, runs: int, warmup: int = 3) -> dict:
    data = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    for run in runners.values():
        for _ in range(warmup):
            run(data)
    medians = {label: [] for label in runners}
    for _ in range(rounds):
        for label, run in runners.items():  # a whole round of one engine, then the next
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                run(data)
                times.append(time.perf_counter() - start)
            medians[label].append(float(np.median(times)) * 1e3)
    rows = {}
    for label, values in medians.items():
        values = np.asarray(values)
        row = {"latency_ms_median": float(np.median(values)), "latency_ms_round_medians": values.round(2).tolist()}
        for base in BASES:
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
    parser.add_argument("--output", type=Path, default=RESULTS / "cpu-race.json")
    args = parser.parse_args()

    import openvino as ov
    import onnxruntime as ort

    from twins_deploy.engines.bench import describe_machine

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    report = {"schema_version": 1, "machine": describe_machine(), "openvino": ov.__version__,
              "onnxruntime": ort.__version__, "settings": vars(args) | {"output": str(args.output)}, "models": {}}
    lines, profile_tables = [], []
    for name in args.models.split(","):
        log(f"== {name}")
        runners, described, fp32, profiled = engines_for(name, args.threads, log, ("best", *args.ours.split(",")))
        timings, parity, profiles = {}, {}, {}
        for batch in (int(b) for b in args.batch.split(",")):
            parity[batch] = accuracy(runners, fp32, batch)
            log(f"racing batch {batch}: {args.rounds} rounds x {args.runs} runs per engine")
            timings[batch] = race(runners, batch, args.rounds, args.runs)
            if args.profile:
                log(f"performance counters at batch {batch}")
                for label, compiled in profiled.items():
                    profiles[f"{label}, batch {batch}"] = perf_counters(*compiled(batch), batch, args.runs)
        report["models"][name] = {"engines": described, "parity_vs_onnx_fp32": parity, "batches": timings,
                                  "perf_counters": profiles}
        for label in runners:
            cells = [name, label]
            for batch, rows in timings.items():
                row = rows[label]
                ratio = row[f"speedup_vs {HAND_INT8_STATIC}"]
                cells += [f"{row['latency_ms_median']:.1f}", f"{ratio[0]:.2f}x ({ratio[1]:.2f}-{ratio[2]:.2f})",
                          f"{row[f'speedup_vs {HAND_INT8}'][0]:.2f}x", f"{row[f'speedup_vs {HAND_FP}'][0]:.2f}x"]
            for key, form in (("cosine", "{:.4f}"), ("top1_agreement", "{:.0%}"), ("top5_agreement", "{:.0%}")):
                cells.append(" / ".join(form.format(parity[batch][label][key]) for batch in timings))
            lines.append("| " + " | ".join(cells) + " |")
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2))  # after each model: a long run keeps what it measured
        print("\n".join(lines[-len(runners):]), file=sys.stderr, flush=True)
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
