"""Batch inference on one machine: plain ``infer`` against ``infer --ray`` (Ray Data), same images, same engine.

Images: ``--images`` JPEGs generated with a seed in four sizes (320x240, 500x375, 640x480, 1024x768),
as photo folders hold them; the engine: svt-s exported to ONNX with seeded random weights (or
``--engine``). Each configuration runs the whole job as a user would, through the code the command
runs: plain is ``predict`` over an onnxruntime runner with ``--threads`` threads (decoding one batch
ahead on a thread pool); ``--ray`` is ``run_job``, which starts a private local Ray on 127.0.0.1,
ships the engine to ``workers`` actors of ``threads`` threads, streams the rows back and stops Ray.
Configurations alternate in rounds, so each sees the same neighbours.

Each configuration runs two jobs, on the first half of the images and on all of them: the second half
costs only running time, so the throughput once running is half the images divided by the difference
of the two wall times (start-up excluded, however the rows arrive), and the fixed cost is what the
whole job took beyond that. Also reported: the time to start Ray and to the first result (from the
start of the job: engine load, Ray start, actors) of the whole job. The floor: ``--ray`` throughput
once running >= 0.8x plain's; the goal 0.95x. ``--ray, 1 worker x 1 thread`` is one single-threaded
worker: the unit a cluster multiplies.

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
    """When the first rows of a job arrive."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None

    def __call__(self, done: int, total: int) -> None:
        if self.first is None and done:
            self.first = time.perf_counter() - self.start


def run_plain(engine: Path, folders: list[Path], threads: int, batch_size: int) -> dict:
    """``infer``'s code path: the engine loaded, then predictions decoded one batch ahead."""
    arrivals = Arrivals()
    items = collect_inputs([str(folder) for folder in folders])
    with OnnxRuntimeRunner(engine, threads=threads) as runner:
        for done, record in enumerate(predict(runner, items, batch_size=batch_size), start=1):
            assert "error" not in record, record
            arrivals(done, len(items))
    return {"images": len(items), "ray_start_s": 0.0, "first_result_s": arrivals.first,
            "wall_s": time.perf_counter() - arrivals.start}


def run_ray(engine: Path, folders: list[Path], workers: int, threads: int, batch_size: int) -> dict:
    """``infer --ray``'s code path: a private local Ray started, the job run, Ray stopped."""
    arrivals = Arrivals()
    report = run_job(engine, [str(folder) for folder in folders], workers=workers, threads=threads,
                     batch_size=batch_size, progress=arrivals)
    assert report.failed == 0 and len(report.records) == report.total
    return {"images": report.total, "ray_start_s": report.seconds_to_ray, "first_result_s": arrivals.first,
            "wall_s": time.perf_counter() - arrivals.start}


def pair(run, halves: list[Path]) -> dict:
    """The job on the first half and on all images: throughput once running and the fixed cost."""
    half, whole = run(halves[:1]), run(halves)
    running = whole["wall_s"] - half["wall_s"]
    rate = (whole["images"] - half["images"]) / running if running > 0 else float("nan")
    return {"img_per_s_running": round(rate, 2), "fixed_cost_s": round(whole["wall_s"] - whole["images"] / rate, 2),
            "ray_start_s": round(whole["ray_start_s"], 2), "first_result_s": round(whole["first_result_s"], 2),
            "wall_s": round(whole["wall_s"], 2), "wall_half_s": round(half["wall_s"], 2)}


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
    halves = [folder / "first-half", folder / "second-half"]
    for index, half in enumerate(halves):
        if len(list(half.glob("*.jpg"))) != args.images // 2:
            make_images(half, args.images // 2, seed=index)
    engine = args.engine or folder / "svt-s-224x224.onnx"
    if not engine.is_file():
        from twins_deploy.exporters import export_onnx

        export_onnx("svt-s", engine, weights="random")
    cpus = os.cpu_count() or 1
    configs = {f"plain, {args.threads} threads": lambda h: run_plain(engine, h, args.threads, args.batch_size),
               f"--ray, {cpus} workers x 1 thread": lambda h: run_ray(engine, h, cpus, 1, args.batch_size),
               f"--ray, 1 worker x {cpus} threads": lambda h: run_ray(engine, h, 1, cpus, args.batch_size),
               "--ray, 1 worker x 1 thread": lambda h: run_ray(engine, h, 1, 1, args.batch_size)}
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    for round_index in range(args.rounds):
        for name, run in configs.items():
            result = pair(run, halves)
            runs[name].append(result)
            print(f"round {round_index + 1} {name}: {result}", file=sys.stderr, flush=True)

    plain_name = next(iter(configs))
    plain_rate = statistics.median(r["img_per_s_running"] for r in runs[plain_name])
    rows = []
    for name, results in runs.items():
        rate = statistics.median(r["img_per_s_running"] for r in results)
        rows.append({"config": name, "img_per_s_running": rate, "vs_plain": round(rate / plain_rate, 3),
                     **{key: statistics.median(r[key] for r in results)
                        for key in ("fixed_cost_s", "ray_start_s", "first_result_s", "wall_s")}})
    print(f"\n{args.images} images ({', '.join(f'{w}x{h}' for w, h in SIZES)}), batch {args.batch_size}, "
          f"{cpus} CPUs; medians of {args.rounds} rounds")
    print(f"{'config':<32} {'img/s running':>13} {'vs plain':>8} {'fixed cost s':>12} {'Ray start s':>11} "
          f"{'first result s':>14} {'whole job s':>11}")
    for row in rows:
        print(f"{row['config']:<32} {row['img_per_s_running']:>13.2f} {row['vs_plain']:>8.3f} "
              f"{row['fixed_cost_s']:>12.2f} {row['ray_start_s']:>11.2f} {row['first_result_s']:>14.2f} "
              f"{row['wall_s']:>11.2f}")
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
