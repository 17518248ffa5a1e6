"""CPU engines for one model, measured in one run: torch fp32 vs onnxruntime fp32 vs onnxruntime int8.

    python benchmarks/bench_engines.py --model svt-s --weights random --seconds 30

Runs ``twins-deploy bench`` (interleaved rounds, so every engine sees the same machine noise) and
``twins-deploy verify --engine int8``, then prints a markdown table of medians and ratios and writes
both JSON reports under benchmarks/results/. Engines are built into the cache on first use.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def run(args: list[str]) -> None:
    print("$ twins-deploy " + " ".join(args), file=sys.stderr)
    subprocess.run(["twins-deploy", *args], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="svt-s")
    parser.add_argument("--weights", default="pretrained")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--seconds", type=float, default=30.0, help="timed seconds per engine and batch size")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--engines", default="onnx,int8,torch", help="the first is the baseline of the ratios")
    parser.add_argument("--threads", type=int, help="CPU threads per engine (default: all cores)")
    parser.add_argument("--clock", default="wall", help="wall, or cpu (process CPU time) for a shared machine")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    suffix = (f"-{args.threads}thread" if args.threads else "") + ("-cputime" if args.clock == "cpu" else "")
    bench_json = RESULTS / f"bench-{args.model}-cpu{suffix}.json"
    verify_json = RESULTS / f"verify-{args.model}-int8.json"
    common = ["--model", args.model, "--weights", args.weights]
    engines = [flag for engine in args.engines.split(",") for flag in ("--engine", engine)]
    threads = ["--threads", str(args.threads)] if args.threads else []
    run(["bench", *common, *engines, *threads, "--clock", args.clock, "--batch", args.batch, "--seconds",
         str(args.seconds), "--rounds", str(args.rounds), "--json", str(bench_json)])
    with open(verify_json, "w") as handle:
        subprocess.run(["twins-deploy", "verify", *common, "--engine", "int8", "--samples",
                        "32", "--json"], check=False, stdout=handle)
    bench, verify = json.loads(bench_json.read_text()), json.loads(verify_json.read_text())
    machine = bench["machine"]
    print(f"\n{machine['cpu']}, {machine['cpu_threads']} threads, engines on {args.threads or 'all'}, "
          f"{args.clock} clock; "
          + ", ".join(f"{k} {v}" for k, v in machine["libraries"].items()))
    print("\n| engine | batch | p50 ms | p90 ms | p99 ms | img/s | speed-up vs " + bench["results"][0]["engine"]
          + " | range over rounds |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in bench["results"]:
        print(f"| {row['engine']} | {row['batch']} | {row['latency_ms_p50']:.1f} | {row['latency_ms_p90']:.1f} | "
              f"{row['latency_ms_p99']:.1f} | {row['throughput_img_per_s']:.1f} | {row['speedup_vs_first']:.2f}x | "
              f"{row['speedup_min']:.2f}-{row['speedup_max']:.2f} |")
    p = verify["parity"]
    print(f"\nint8 vs PyTorch fp32 on {verify['samples']} images ({verify['inputs']}): max abs {p['max_abs']:.3e}, "
          f"cosine {p['cosine']:.5f}, top-1 agreement {p['top1_agreement']:.1%}, "
          f"top-5 agreement {p['top5_agreement']:.1%}: {'pass' if verify['passed'] else 'FAIL'}")


if __name__ == "__main__":
    main()
