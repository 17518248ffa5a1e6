"""The CPU race, in one process: our best CPU engine vs onnxruntime vs OpenVINO by hand on our export.

    python benchmarks/cpu_race.py                          # svt-s and pcpvt-s, batch 1 and 8, 2 threads
    python benchmarks/cpu_race.py --models svt-s --rounds 20

Engines (all from the same fp32 export of timm-initialised weights, ``--weights random``):

- ours, ``--engine best`` / ``--engine int8`` resolved on this host (OpenVINO installed: ``ov-int8``,
  our IR, our NNCF settings and our runner settings);
- ours, ``--engine onnx`` (onnxruntime fp32), and with ``--ours onnx-int8,onnx`` onnxruntime int8 too;
- OpenVINO by hand: ``core.compile_model(ov.convert_model(export), "CPU")`` at its default precision,
  and NNCF int8 as OpenVINO documents it, ``nncf.quantize(model, dataset, model_type=TRANSFORMER)``
  on the same calibration images, compiled with a dynamic batch (per batch size when that fails);
  only ``INFERENCE_NUM_THREADS`` is set on both. For reference, that int8 model reshaped to each
  batch size too (``model.reshape``), which OpenVINO's documentation does not do.

Each engine runs a whole round of ``--runs`` inferences before the next one starts (on 2 cores a
thread pool that just ran keeps spinning and steals the next engine's cores, so alternating single
runs would measure the contention). Ratios are taken within each round; the median over rounds is
reported with its range. Accuracy: cosine (lowest per image), top-1 and top-5 agreement with the
onnxruntime fp32 export on 16 seeded synthetic images that are not the calibration images.
JSON in benchmarks/results/cpu-race.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
CALIBRATION = 32  # synthetic images, seed 0: what our on-the-fly int8 builds use too
HAND_INT8, HAND_FP = "OpenVINO by hand, NNCF int8", "OpenVINO by hand, default precision"
HAND_INT8_STATIC = "OpenVINO by hand, NNCF int8, reshaped to each batch"  # not documented: for reference


class HandRunner:
    """OpenVINO as its documentation shows it: convert, (quantize), compile with a thread count only."""

    def __init__(self, model, threads: int, static: bool = False):
        import openvino as ov

        self.core, self.model, self.config = ov.Core(), model, {"INFERENCE_NUM_THREADS": str(threads)}
        self.static, self.requests = static, {}
        if static:
            return
        try:
            self.requests = {0: self.core.compile_model(model, "CPU", self.config).create_infer_request()}
        except RuntimeError as exc:  # the int8 path rejected a dynamic batch: compile per batch size
            print(f"  dynamic batch failed ({str(exc).splitlines()[2][:120]}...): static per batch", file=sys.stderr)
            self.static, self.requests = True, {}

    def infer(self, batch: np.ndarray) -> np.ndarray:
        key = len(batch) if self.static else 0
        if key not in self.requests:
            model = self.model.clone()
            model.reshape([len(batch), *batch.shape[1:]])
            self.requests[key] = self.core.compile_model(model, "CPU", self.config).create_infer_request()
        request = self.requests[key]
        request.infer({0: batch}, share_inputs=True)
        return request.get_output_tensor(0).data.copy()


def engines_for(name: str, threads: int, log, engines: tuple[str, ...]) -> tuple[dict, dict, Path]:
    """Every engine of the race for one model, ready to ``infer``; their descriptions; the fp32 export."""
    import nncf
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
    runners, described = {}, {}
    for engine in engines:
        runner = open_engine(str(files[best if engine == "best" else engine]()), threads=threads)
        runner.activate()
        info = runner.describe()
        label = f"ours: --engine {engine}" + (f" ({info.name})" if engine == "best" else "")
        runners[label] = lambda batch, r=runner, out=info.output_names[0]: r.infer(batch)[out]
        described[label] = {"engine": info.name, "backend": info.backend, "precision": info.precision,
                            "artifact": info.artifact, "details": info.details}
    log("OpenVINO by hand: nncf.quantize(model, dataset, model_type=TRANSFORMER) on the same calibration images")
    hand = nncf.quantize(ov.convert_model(str(fp32)), nncf.Dataset([calibration[i:i + 1] for i in range(CALIBRATION)]),
                         model_type=nncf.ModelType.TRANSFORMER)
    for label, model, static in ((HAND_FP, ov.convert_model(str(fp32)), False), (HAND_INT8, hand, False),
                                 (HAND_INT8_STATIC, hand, True)):
        runner = HandRunner(model, threads, static)
        runners[label] = runner.infer
        described[label] = {"config": runner.config, "batch": "static per size" if runner.static else "dynamic"}
    return runners, described, fp32


def accuracy(runners: dict, fp32: Path, samples: int = 16) -> dict:
    from twins_deploy.engines.artifacts import onnx_metadata
    from twins_deploy.engines.quantize import synthetic_images
    from twins_deploy.parity import compare

    images = synthetic_images(onnx_metadata(fp32), samples, seed=1)
    reference = runners["ours: --engine onnx"](images)
    return {label: compare(reference, np.concatenate([run(images[i:i + 8]) for i in range(0, samples, 8)])).as_dict()
            for label, run in runners.items()}


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
        for base in (HAND_INT8, HAND_FP, "ours: --engine onnx"):
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
    parser.add_argument("--output", type=Path, default=RESULTS / "cpu-race.json")
    args = parser.parse_args()

    import openvino as ov
    import onnxruntime as ort

    from twins_deploy.engines.bench import describe_machine

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    report = {"schema_version": 1, "machine": describe_machine(), "openvino": ov.__version__,
              "onnxruntime": ort.__version__, "settings": vars(args) | {"output": str(args.output)}, "models": {}}
    lines = []
    for name in args.models.split(","):
        log(f"== {name}")
        runners, described, fp32 = engines_for(name, args.threads, log, ("best", *args.ours.split(",")))
        parity = accuracy(runners, fp32)
        timings = {}
        for batch in (int(b) for b in args.batch.split(",")):
            log(f"racing batch {batch}: {args.rounds} rounds x {args.runs} runs per engine")
            timings[batch] = race(runners, batch, args.rounds, args.runs)
        report["models"][name] = {"engines": described, "parity_vs_onnx_fp32": parity, "batches": timings}
        for label in runners:
            cells = [name, label]
            for batch, rows in timings.items():
                row = rows[label]
                ratio = row[f"speedup_vs {HAND_INT8}"]
                cells += [f"{row['latency_ms_median']:.1f}", f"{ratio[0]:.2f}x ({ratio[1]:.2f}-{ratio[2]:.2f})",
                          f"{row[f'speedup_vs {HAND_FP}'][0]:.2f}x"]
            p = parity[label]
            cells += [f"{p['cosine']:.4f}", f"{p['top1_agreement']:.0%}", f"{p['top5_agreement']:.0%}"]
            lines.append("| " + " | ".join(cells) + " |")
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2))  # after each model: a long run keeps what it measured
        print("\n".join(lines[-len(runners):]), file=sys.stderr, flush=True)
    batches = args.batch.split(",")
    header = ["model", "engine"] + [f"b{b} {c}" for b in batches for c in ("ms", "vs OV int8 by hand", "vs OV by hand")]
    header += ["cosine (min)", "top-1", "top-5"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * 2 + "---:|" * (len(header) - 2))
    print("\n".join(lines))
    print(f"\n{report['machine']['cpu']}, {args.threads} threads, OpenVINO {ov.__version__}, "
          f"onnxruntime {ort.__version__}; {args.rounds} rounds x {args.runs} runs; JSON: {args.output}")


if __name__ == "__main__":
    main()
