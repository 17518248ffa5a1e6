"""Batch inference on one machine: plain ``infer`` against ``infer --ray`` (Ray Data), same images, same engine.

Images: ``--images`` JPEGs generated with a seed in four sizes (320x240, 500x375, 640x480, 1024x768),
as photo folders hold them; the engine: svt-s exported to ONNX with seeded random weights (or
``--engine``). Each configuration runs the whole job as a user would, through the code the command
runs: plain is ``predict`` over an onnxruntime runner with ``--threads`` threads (decoding one batch
ahead on a thread pool); ``--ray`` is ``run_job``, which starts a private local Ray on 127.0.0.1,
ships the engine to ``workers`` actors of ``threads`` threads, streams the rows back and stops Ray.
Configurations alternate in rounds, so each sees the same neighbours.

Reported per run: the fixed cost of starting Ray, the time to the first result (from the start of
the job: engine load, Ray start, actors), the steady throughput once running (rows after the first
arrival, divided by the time from the first arrival to the last: start-up excluded), and the whole
job's wall time. The floor: ``--ray`` steady throughput >= 0.8x plain's; the goal 0.95x.
``--ray, 1 worker x 1 thread`` is one single-threaded worker: the unit a cluster multiplies.

    python benchmarks/batch_infer.py [--images 1000] [--rounds 2] [--batch-size 32] [--json results.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from twins_deploy.batch import run_job
from twins_deploy.engines.onnxruntime_backend import OnnxRuntimeRunner
from twins_deploy.engines.predict import collect_inputs, predict
from twins_deploy.files import atomic_output

SIZES = ((320, 240), (500, 375), (640, 480), (1024, 768))
FLOOR, GOAL = 0.80, 0.95


def make_images(folder: Path, count: int, seed: int = 0) -> None:
    """Smooth random pictures (JPEG, quality 90) in the four sizes, as many of each."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        width, height = SIZES[i % len(SIZES)]
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((width, height), Image.BICUBIC).save(folder / f"{i:05d}.jpg", quality=90)


class Arrivals:
    """Times at which rows arrive: the first result and the steady rate after it."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: tuple[float, int] | None = None
        self.last: tuple[float, int] | None = None

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if self.first is None and done:
            self.first = (now, done)
        self.last = (now, done)

    def summary(self) -> dict:
        (t0, n0), (t1, n1) = self.first, self.last
        return {"first_result_s": round(t0 - self.start, 3), "wall_s": round(t1 - self.start, 3),
                "steady_img_per_s": round((n1 - n0) / (t1 - t0), 2) if t1 > t0 else None}


def run_plain(engine: Path, folder: Path, threads: int, batch_size: int) -> dict:
    arrivals = Arrivals()  # from before the engine loads, as for --ray
    items = collect_inputs([str(folder)])
    with OnnxRuntimeRunner(engine, threads=threads) as runner:
        for done, record in enumerate(predict(runner, items, batch_size=batch_size), start=1):
            assert "error" not in record, record
            if done % batch_size == 0 or done == len(items):
                arrivals(done, len(items))
    return {"ray_start_s": 0.0, **arrivals.summary()}


def run_ray(engine: Path, folder: Path, workers: int, threads: int, batch_size: int) -> dict:
    arrivals = Arrivals()
    report = run_job(engine, [str(folder)], workers=workers, threads=threads, batch_size=batch_size,
                     progress=arrivals)
    assert report.failed == 0 and len(report.records) == report.total
    return {"ray_start_s": round(report.seconds_to_ray, 3), **arrivals.summary()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of every configuration")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="plain infer's engine threads")
    parser.add_argument("--engine", type=Path, help="an ONNX file (default: svt-s, seeded random weights)")
    parser.add_argument("--folder", type=Path, help="keep the images (and the engine) here")
    parser.add_argument("--json", type=Path, help="write the runs and the summary here")
    args = parser.parse_args()

    folder = args.folder or Path(tempfile.mkdtemp(prefix="twins-batch-bench-"))
    images = folder / "images"
    if len(list(images.glob("*.jpg"))) != args.images:
        make_images(images, args.images)
    engine = args.engine or folder / "svt-s-224x224.onnx"
    if not engine.is_file():
        from twins_deploy.exporters import export_onnx

        export_onnx("svt-s", engine, weights="random")
    cpus = os.cpu_count() or 1
    configs = {f"plain, {args.threads} threads": lambda: run_plain(engine, images, args.threads, args.batch_size),
               f"--ray, {cpus} workers x 1 thread": lambda: run_ray(engine, images, cpus, 1, args.batch_size),
               f"--ray, 1 worker x {cpus} threads": lambda: run_ray(engine, images, 1, cpus, args.batch_size),
               "--ray, 1 worker x 1 thread": lambda: run_ray(engine, images, 1, 1, args.batch_size)}
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    for round_index in range(args.rounds):
        for name, run in configs.items():
            result = run()
            runs[name].append(result)
            print(f"round {round_index + 1} {name}: {result}", file=sys.stderr, flush=True)

    plain_name = next(iter(configs))
    plain_rate = statistics.median(r["steady_img_per_s"] for r in runs[plain_name])
    rows = []
    for name, results in runs.items():
        rate = statistics.median(r["steady_img_per_s"] for r in results)
        rows.append({"config": name, "steady_img_per_s": rate, "vs_plain": round(rate / plain_rate, 3),
                     "ray_start_s": statistics.median(r["ray_start_s"] for r in results),
                     "first_result_s": statistics.median(r["first_result_s"] for r in results),
                     "wall_s": statistics.median(r["wall_s"] for r in results)})
    print(f"\n{args.images} images ({', '.join(f'{w}x{h}' for w, h in SIZES)}), batch {args.batch_size}, "
          f"{cpus} CPUs; medians of {args.rounds} rounds")
    print(f"{'config':<34} {'img/s once running':>18} {'vs plain':>9} {'Ray start s':>12} {'first result s':>15} "
          f"{'whole job s':>12}")
    for row in rows:
        print(f"{row['config']:<34} {row['steady_img_per_s']:>18.2f} {row['vs_plain']:>9.3f} "
              f"{row['ray_start_s']:>12.2f} {row['first_result_s']:>15.2f} {row['wall_s']:>12.2f}")
    best = max(rows[1:3], key=lambda row: row["vs_plain"])
    print(f"best --ray: {best['config']} at {best['vs_plain']:.3f}x plain once running: floor {FLOOR} "
          f"{'met' if best['vs_plain'] >= FLOOR else 'NOT met'}, goal {GOAL} {'met' if best['vs_plain'] >= GOAL else 'not met'}")
    if args.json:
        with atomic_output(args.json) as tmp:
            tmp.write_text(json.dumps({"images": args.images, "sizes": SIZES, "batch_size": args.batch_size,
                                       "cpus": cpus, "rounds": args.rounds, "summary": rows, "runs": runs},
                                      indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
