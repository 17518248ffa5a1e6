"""onnxruntime CPU latency of our svt-s export against the export a user would make by hand.

"By hand" means ``torch.onnx.export`` of the same PyTorch model with a dynamic batch axis and
nothing else: torch's defaults (the dynamo exporter, its default opset and its built-in
optimizer), PyTorch's fused SDPA attention (``model.set_fused_attn(True)``, how the model runs in
eager), no simplifier, no rewrites. timm cannot be installed here, so the hand export is of our own
Twins; it has the same static reshapes, which makes the comparison harder for us, not easier.
Both are traced at batch 2: with a batch-1 example torch.export specialises the batch to 1.

Fair timing: the same seeded weights and input, the same onnxruntime SessionOptions (ORT_ENABLE_ALL,
CPU provider, ``--threads`` intra-op threads). Rounds alternate between the two models; each round
starts with one untimed run (so the other session's spinning pool threads have gone idle), then
``--runs`` timed runs with ``time.perf_counter``. Warm-up runs are excluded. Reported: median and
p90 per model and the ratio of medians (ours / hand). The goal is ratio <= 0.90 at batch 1.

    python benchmarks/export_vs_naive.py [--model svt-s] [--batch 1] [--rounds 30] [--runs 5] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from twins_deploy.exporters import export_onnx
from twins_deploy.runtime.session import create_session
from twins_deploy.models import create_model

GOAL_RATIO = 0.90


def hand_export(model, path: Path) -> None:
    """What a user types: torch.onnx.export with a dynamic batch axis, defaults for everything else."""
    model.set_fused_attn(True)
    example = torch.randn(2, 3, *model.img_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), input_names=["pixel_values"], output_names=["logits"],
                          dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}}, verbose=False)


def graph_facts(path: Path) -> dict:
    """Node counts in the file and in the graph onnxruntime actually runs after its own fusions."""
    graph_model = onnx.load(str(path), load_external_data=False)
    ops = Counter(node.op_type for node in graph_model.graph.node)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(path.with_suffix(".ort-optimized.onnx"))
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ort_nodes = len(onnx.load(options.optimized_model_filepath, load_external_data=False).graph.node)
    return {"opset": graph_model.opset_import[0].version, "nodes": sum(ops.values()), "ort_nodes": ort_nodes,
            "shape_nodes": ops.get("Shape", 0), "layernorm_nodes": ops.get("LayerNormalization", 0)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="svt-s")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=30, help="alternating rounds")
    parser.add_argument("--runs", type=int, default=10, help="timed runs per model per round (10+: a whole round per engine)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--keep", type=Path, help="keep both ONNX files in this folder")
    parser.add_argument("--json", action="store_true", help="print JSON on stdout")
    args = parser.parse_args()

    model = create_model(args.model, weights="random")
    folder = args.keep or Path(tempfile.mkdtemp(prefix="twins-export-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"ours": folder / f"{args.model}-ours.onnx", "hand": folder / f"{args.model}-hand.onnx"}
    print(f"exporting {args.model} twice into {folder} ...", file=sys.stderr)
    report = export_onnx(model, paths["ours"])
    if not report.passed:
        print("our export failed its parity check", file=sys.stderr)
        return 1
    hand_export(model, paths["hand"])

    sessions = {name: create_session(path, providers=["CPUExecutionProvider"], threads=args.threads)
                for name, path in paths.items()}
    pixels = np.random.default_rng(0).standard_normal((args.batch, 3, *model.img_size), dtype=np.float32)
    outputs = {name: s.run(None, {"pixel_values": pixels})[0] for name, s in sessions.items()}
    for s in sessions.values():
        for _ in range(args.warmup):
            s.run(None, {"pixel_values": pixels})
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(args.rounds):
        for name, s in sessions.items():
            s.run(None, {"pixel_values": pixels})  # untimed: lets the other session's threads go idle
            for _ in range(args.runs):
                start = time.perf_counter()
                s.run(None, {"pixel_values": pixels})
                times[name].append(time.perf_counter() - start)

    result = {"schema_version": 1, "model": args.model, "batch": args.batch, "threads": args.threads,
              "rounds": args.rounds, "runs_per_round": args.runs,
              "outputs_max_abs_diff": float(np.abs(outputs["ours"] - outputs["hand"]).max())}
    for name, path in paths.items():
        ms = np.array(times[name]) * 1e3
        result[name] = {"path": str(path), **graph_facts(path), "latency_ms_median": round(float(np.median(ms)), 2),
                        "latency_ms_p90": round(float(np.percentile(ms, 90)), 2), "samples": len(ms)}
    result["ratio_median"] = round(result["ours"]["latency_ms_median"] / result["hand"]["latency_ms_median"], 3)
    result["goal_ratio"], result["goal_met"] = GOAL_RATIO, result["ratio_median"] <= GOAL_RATIO

    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.model}, batch {args.batch}, {args.threads} threads, {args.rounds} rounds x {args.runs} runs; "
              f"outputs differ by {result['outputs_max_abs_diff']:.1e}")
        print(f"{'export':6s} {'opset':>5s} {'nodes':>6s} {'ORT nodes':>9s} {'Shape':>6s} {'LayerNorm':>9s} "
              f"{'median ms':>10s} {'p90 ms':>8s}")
        for name in paths:
            r = result[name]
            print(f"{name:6s} {r['opset']:5d} {r['nodes']:6d} {r['ort_nodes']:9d} {r['shape_nodes']:6d} "
                  f"{r['layernorm_nodes']:9d} {r['latency_ms_median']:10.2f} {r['latency_ms_p90']:8.2f}")
        print(f"ratio (ours / hand, medians): {result['ratio_median']:.3f}  goal <= {GOAL_RATIO}: "
              f"{'met' if result['goal_met'] else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
