"""onnxruntime CPU latency of our TwinsSVT exports against the direct route of the same weights.

The direct route is what a user of the library would do: ``torch.onnx.export`` of vit-pytorch's own
``TwinsSVT`` (its einops rearranges, channel LayerNorms written as mean/var, conv projections) with
a dynamic batch axis and torch's defaults; for vit-flax, jax2onnx of the Flax module. Both need the
library: ``pip install --no-deps vit-pytorch einops`` (imported from its ``twins_svt.py`` file, as
the package's ``__init__`` wants torchvision); jax, flax and jax2onnx for the Flax route. A route
whose library is missing is reported as skipped, and our export of that family is still timed.

Same seeded weights (vit-pytorch's own initialisation, loaded into our model with
``load_state_dict``) and input, same SessionOptions (ORT_ENABLE_ALL, CPU, ``--threads`` intra-op
threads). Each round times ``--runs`` runs of one engine as a whole (after one untimed run, so the
other session's spinning threads have gone idle) before switching to the next; reported are the
per-run medians and the median over rounds of the per-round ratio ours / direct, with its range.
Goal: ratio <= 0.80 at batch 1, and never slower.

    python benchmarks/twins_svt_direct.py [--rounds 15] [--runs 10] [--threads 2] [--keep DIR]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
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

GOAL_RATIO = 0.80
CONFIG = dict(num_classes=1000, s1_emb_dim=32, s2_emb_dim=64, s3_emb_dim=96, s4_emb_dim=128)  # 7x7 windows, k 7
IMG_SIZE = 224
RESULTS = Path(__file__).parent / "results" / "twins-svt-direct.json"


def vit_pytorch_twins_svt():
    """vit-pytorch's twins_svt module, loaded from its file; None when vit-pytorch is not installed."""
    spec = importlib.util.find_spec("vit_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "twins_svt.py"
    module_spec = importlib.util.spec_from_file_location("vit_pytorch_twins_svt_file", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def direct_export(model: torch.nn.Module, path: Path) -> str:
    """What a user types: torch.onnx.export with a dynamic batch axis, torch's defaults otherwise."""
    example = torch.randn(2, 3, IMG_SIZE, IMG_SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), input_names=["pixel_values"], output_names=["logits"],
                          dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}})
    return f"torch.onnx.export (torch {torch.__version__} defaults), dynamic batch"


def graph_facts(path: Path) -> dict:
    ops = Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node)
    return {"nodes": sum(ops.values()), "shape_nodes": ops.get("Shape", 0),
            "layernorm_nodes": ops.get("LayerNormalization", 0), "file_mb": round(path.stat().st_size / 2**20, 1)}


def time_rounds(sessions: dict[str, ort.InferenceSession], pixels: np.ndarray, rounds: int, runs: int,
                warmup: int) -> dict[str, list[float]]:
    """Per-run latency (ms) of each round, one engine's whole round at a time."""
    feed = {"pixel_values": pixels}
    for s in sessions.values():
        for _ in range(warmup):
            s.run(None, feed)
    per_round: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, s in sessions.items():
            s.run(None, feed)  # untimed: lets the other session's threads go idle
            start = time.perf_counter()
            for _ in range(runs):
                s.run(None, feed)
            per_round[name].append((time.perf_counter() - start) * 1e3 / runs)
    return per_round


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--runs", type=int, default=10, help="timed runs per engine per round (at least 10)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="keep the ONNX files in this folder")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.runs < 10:
        parser.error("--runs must be at least 10")

    folder = args.keep or Path(tempfile.mkdtemp(prefix="twins-svt-direct-"))
    folder.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).standard_normal((1, 3, IMG_SIZE, IMG_SIZE), dtype=np.float32)
    paths: dict[str, Path] = {}
    routes: dict[str, str] = {}
    skipped: dict[str, str] = {}

    library = vit_pytorch_twins_svt()
    ours_pt = create_model("vit-pytorch/TwinsSVT", weights="random", config=CONFIG, img_size=IMG_SIZE)
    if library is None:
        skipped["vit-pytorch direct"] = "vit-pytorch is not installed (pip install --no-deps vit-pytorch einops)"
    else:
        torch.manual_seed(0)
        reference = library.TwinsSVT(**CONFIG).eval()
        ours_pt.load_state_dict(reference.state_dict())
        paths["vit-pytorch direct"] = folder / "vit-pytorch-direct.onnx"
        print("exporting vit-pytorch's TwinsSVT directly ...", file=sys.stderr)
        routes["vit-pytorch direct"] = direct_export(reference, paths["vit-pytorch direct"])
    paths["vit-pytorch ours"] = folder / "vit-pytorch-ours.onnx"
    print("exporting ours (vit-pytorch/TwinsSVT) ...", file=sys.stderr)
    report = export_onnx(ours_pt, paths["vit-pytorch ours"])
    routes["vit-pytorch ours"] = "twins-deploy export_onnx, dynamic batch, opset 17"
    if not report.passed:
        print("our vit-pytorch export failed its parity check", file=sys.stderr)
        return 1

    missing = [m for m in ("jax", "flax", "jax2onnx") if importlib.util.find_spec(m) is None]
    skipped["vit-flax direct"] = (f"jax2onnx route not run: {', '.join(missing)} not installed" if missing
                                  else "jax2onnx route not run: not implemented in this script")
    ours_flax = create_model("vit-flax/TwinsSVT", weights="random", config=CONFIG, img_size=IMG_SIZE)
    paths["vit-flax ours"] = folder / "vit-flax-ours.onnx"
    print("exporting ours (vit-flax/TwinsSVT) ...", file=sys.stderr)
    if not export_onnx(ours_flax, paths["vit-flax ours"]).passed:
        print("our vit-flax export failed its parity check", file=sys.stderr)
        return 1
    routes["vit-flax ours"] = "twins-deploy export_onnx, dynamic batch, opset 17"

    sessions = {name: create_session(path, providers=["CPUExecutionProvider"], threads=args.threads)
                for name, path in paths.items()}
    outputs = {name: s.run(None, {"pixel_values": pixels})[0] for name, s in sessions.items()}
    print(f"timing {len(sessions)} engines: {args.rounds} rounds x {args.runs} runs ...", file=sys.stderr)
    per_round = time_rounds(sessions, pixels, args.rounds, args.runs, args.warmup)

    result = {"schema_version": 1, "config": CONFIG, "img_size": IMG_SIZE, "batch": 1, "threads": args.threads,
              "rounds": args.rounds, "runs_per_round": args.runs, "machine": platform.processor() or platform.machine(),
              "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__, "onnx": onnx.__version__},
              "engines": {}, "skipped": skipped}
    for name, path in paths.items():
        ms = np.array(per_round[name])
        result["engines"][name] = {"route": routes[name], **graph_facts(path),
                                   "latency_ms_median": round(float(np.median(ms)), 2),
                                   "latency_ms_min_round": round(float(ms.min()), 2),
                                   "latency_ms_max_round": round(float(ms.max()), 2)}
    if "vit-pytorch direct" in per_round:
        ratios = np.array(per_round["vit-pytorch ours"]) / np.array(per_round["vit-pytorch direct"])
        result["outputs_max_abs_diff"] = float(np.abs(outputs["vit-pytorch ours"] - outputs["vit-pytorch direct"]).max())
        result["ratio_median"] = round(float(np.median(ratios)), 3)
        result["ratio_min"], result["ratio_max"] = round(float(ratios.min()), 3), round(float(ratios.max()), 3)
        result["goal_ratio"], result["goal_met"] = GOAL_RATIO, result["ratio_median"] <= GOAL_RATIO
        result["never_slower"] = bool(ratios.max() < 1.0)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")

    print(f"TwinsSVT dims 32/64/96/128 at {IMG_SIZE}, 7x7 windows, batch 1, {args.threads} threads, "
          f"{args.rounds} rounds x {args.runs} runs (onnxruntime {ort.__version__})")
    print(f"{'engine':20s} {'nodes':>6s} {'Shape':>6s} {'LayerNorm':>9s} {'median ms':>10s} {'rounds min-max ms':>18s}")
    for name, r in result["engines"].items():
        print(f"{name:20s} {r['nodes']:6d} {r['shape_nodes']:6d} {r['layernorm_nodes']:9d} {r['latency_ms_median']:10.2f} "
              f"{r['latency_ms_min_round']:8.2f}-{r['latency_ms_max_round']:.2f}")
    for name, why in skipped.items():
        print(f"{name:20s} skipped: {why}")
    if "ratio_median" in result:
        print(f"ratio ours / direct (vit-pytorch, median of per-round ratios): {result['ratio_median']:.3f} "
              f"[{result['ratio_min']:.3f}-{result['ratio_max']:.3f}]; goal <= {GOAL_RATIO}: "
              f"{'met' if result['goal_met'] else 'NOT met'}; never slower: {result['never_slower']}; "
              f"outputs differ by {result['outputs_max_abs_diff']:.1e}")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
