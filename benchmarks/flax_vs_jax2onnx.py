"""onnxruntime CPU latency of our export of vit-flax's seed models against jax2onnx's export.

For each of the four configurations the seed documents (ViT, CaiT, CrossFormer at 224, CrossViT;
dropout off, as at inference), vit-flax's own Flax module (from a checkout, ``--vit-flax DIR``) is
initialised with seeded random weights and saved as a msgpack file, which our port loads. Then:

- ours: ``export_onnx`` of the port, dynamic batch, as ``twins-deploy export`` writes it;
- jax2onnx: ``to_onnx`` of the Flax ``apply`` function, the route a JAX user has today. It is
  tried with a dynamic batch ('B') and at a fixed batch 1; what fails to convert, or converts to a
  file onnxruntime rejects, is reported with the first line of its error.

Both run on onnxruntime (CPU provider, ORT_ENABLE_ALL, ``--threads`` intra-op threads) at batch 1
on the same image (NCHW for ours, NHWC for Flax's). Each round times ``--runs`` runs of one engine
(after one untimed run) before switching to the next, alternating which goes first; a round's
latency is the median of its runs, the figure is the median over rounds of the per-round ratio
ours / jax2onnx. Goal: <= 0.8, never above 1. Results go to
``benchmarks/results/flax-vs-jax2onnx.json``.

    pip install jax jaxlib flax jax2onnx einops    # for this script only (a separate venv is best)
    git clone https://github.com/conceptofmind/vit-flax /tmp/vit-flax
    python benchmarks/flax_vs_jax2onnx.py --vit-flax /tmp/vit-flax [--rounds 10] [--runs 10] [--threads 2]

Without jax, flax or jax2onnx, or without the checkout, it says what it skipped and exits 0.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import os
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from twins_deploy.runtime.session import create_session  # noqa: E402  (after the repo is on the path)

CPU = ["CPUExecutionProvider"]

GOAL_RATIO = 0.8
SEEDS = {  # our spec name -> (vit-flax module, class)
    "vit-flax/ViT": ("vit", "ViT"),
    "vit-flax/CaiT": ("cait", "CaiT"),
    "vit-flax/CrossFormer": ("crossformer", "CrossFormer"),
    "vit-flax/CrossViT": ("cross_vit", "CrossViT"),
}
RESULTS = REPO / "benchmarks" / "results" / "flax-vs-jax2onnx.json"


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".strip()


def missing_tools(vit_flax: Path | None) -> str | None:
    """Why the comparison cannot run here, or None."""
    for module in ("jax", "flax", "jax2onnx", "einops"):
        if importlib.util.find_spec(module) is None:
            return f"jax2onnx not installed ({module} is missing)"
    if vit_flax is None:
        return "no vit-flax checkout: pass --vit-flax DIR (git clone https://github.com/conceptofmind/vit-flax)"
    if not (vit_flax / "vit_flax" / "vit.py").is_file():
        return f"{vit_flax} holds no vit_flax/vit.py: pass the root of a vit-flax checkout"
    return None


def graph_stats(proto: onnx.ModelProto) -> dict:
    ops = Counter(node.op_type for node in proto.graph.node)
    return {"nodes": len(proto.graph.node), "shape_nodes": ops["Shape"],
            "layernorm_nodes": ops["LayerNormalization"], "softmax_nodes": ops["Softmax"],
            "opset": next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))}


def flax_model(spec, vit_flax: Path):
    """vit-flax's module for ``spec``'s configuration, every dropout rate 0 (inference)."""
    sys.path.insert(0, str(vit_flax))
    module_name, class_name = SEEDS[spec.name]
    module = importlib.import_module(f"vit_flax.{module_name}")
    arguments = {f.name: getattr(spec.config, f.name) for f in dataclasses.fields(spec.config)}
    arguments = {k: (0.0 if "dropout" in k else v) for k, v in arguments.items()}
    return getattr(module, class_name)(**arguments)


def seeded_variables(module, image: np.ndarray):
    """``module``'s variables, seeded: Flax's initialisation plus 0.05 N(0, 1) on every array (its zero-initialised
    tokens and CaiT's zero head mixing give all-zero logits otherwise; the golden vectors do the same)."""
    import jax

    variables = module.init(jax.random.PRNGKey(0), image)
    leaves, tree = jax.tree_util.tree_flatten(variables)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    return jax.tree_util.tree_unflatten(
        tree, [leaf + 0.05 * jax.random.normal(key, leaf.shape, leaf.dtype) for leaf, key in zip(leaves, keys)])


def export_with_jax2onnx(apply, size: tuple[int, int], batch, path: Path) -> str | None:
    """Write jax2onnx's ``to_onnx`` of ``apply`` for NHWC images of ``size`` to ``path``; None, or why it failed."""
    from jax2onnx import to_onnx

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            to_onnx(apply, [(batch, *size, 3)], return_mode="file", output_path=str(path))
    except Exception as exc:  # whatever jax2onnx raises is the finding
        return f"conversion failed: {first_line(exc)}"
    return None


def convert_with_jax2onnx(apply, size: tuple[int, int], batch, path: Path) -> tuple[str | None, str | None]:
    """(path, None) when jax2onnx converts and onnxruntime loads the file, else (None, why)."""
    error = export_with_jax2onnx(apply, size, batch, path)
    if error:
        return None, error
    try:
        create_session(path, providers=CPU, threads=1)
    except Exception as exc:  # onnxruntime refuses the file
        return None, f"converted, but onnxruntime rejects the file: {first_line(exc)}"
    return str(path), None


def time_rounds(engines: dict[str, tuple[ort.InferenceSession, dict]], rounds: int, runs: int) -> dict[str, list]:
    """Per engine, the per-round lists of latencies in ms; engines alternate who goes first."""
    names = list(engines)
    timings = {name: [] for name in names}
    for index in range(rounds):
        for name in names if index % 2 == 0 else reversed(names):
            sess, feed = engines[name]
            sess.run(None, feed)  # untimed: lets the other session's threads go idle
            latencies = []
            for _ in range(runs):
                start = time.perf_counter()
                sess.run(None, feed)
                latencies.append((time.perf_counter() - start) * 1e3)
            timings[name].append(latencies)
    return timings


def compare(name: str, vit_flax: Path, folder: Path, args) -> dict:
    import flax.serialization
    import torch

    from twins_deploy.exporters import export_onnx
    from twins_deploy.models import MODELS, create_model

    spec = MODELS[name]
    height, width = spec.input_size
    module = flax_model(spec, vit_flax)
    rng = np.random.default_rng(0)
    image = rng.standard_normal((1, height, width, 3), dtype=np.float32)
    variables = seeded_variables(module, image)
    weights = folder / f"{name.split('/')[1]}.msgpack"
    weights.write_bytes(flax.serialization.to_bytes(variables))

    def apply(x):
        return module.apply(variables, x)

    flax_logits = np.asarray(apply(image))
    result = {"model": name, "input_size": [height, width], "config": json.loads(json.dumps(
        dataclasses.asdict(spec.config)))}

    started = time.perf_counter()
    port = create_model(name, weights=weights)
    ours = export_onnx(port, folder / "ours.onnx", verify=False)
    result["ours"] = {"export_s": round(time.perf_counter() - started, 1), "batch": "dynamic",
                      **graph_stats(onnx.load(str(ours.path), load_external_data=False))}
    del port
    torch.set_num_threads(args.threads)

    result["jax2onnx"] = {}
    for mode, batch in (("dynamic", "B"), ("fixed", 1)):
        started = time.perf_counter()
        path, error = convert_with_jax2onnx(apply, (height, width), batch, folder / f"jax2onnx-{mode}.onnx")
        entry = {"batch": batch, "converted": path is not None, "convert_s": round(time.perf_counter() - started, 1)}
        if error:
            entry["error"] = error
        else:
            entry.update(graph_stats(onnx.load(path, load_external_data=False)))
        result["jax2onnx"][mode] = entry

    ours_session = create_session(ours.path, providers=CPU, threads=args.threads)
    ours_feed = {"pixel_values": np.ascontiguousarray(image.transpose(0, 3, 1, 2))}
    ours_logits = ours_session.run(None, ours_feed)[0]
    scale = float(np.abs(flax_logits).max())
    result["ours"]["max_rel_vs_flax"] = float(np.abs(ours_logits - flax_logits).max() / scale)
    engines = {"ours": (ours_session, ours_feed)}
    fixed = result["jax2onnx"]["fixed"]
    if fixed["converted"]:
        theirs = create_session(folder / "jax2onnx-fixed.onnx", providers=CPU, threads=args.threads)
        feed = {theirs.get_inputs()[0].name: image}
        fixed["max_rel_vs_flax"] = float(np.abs(theirs.run(None, feed)[0] - flax_logits).max() / scale)
        engines["jax2onnx"] = (theirs, feed)
    timings = time_rounds(engines, args.rounds, args.runs)
    for engine, rounds in timings.items():
        flat = np.concatenate(rounds)
        entry = result["ours"] if engine == "ours" else fixed
        entry["latency_ms_median"] = float(np.median(flat))
        entry["latency_ms_p90"] = float(np.percentile(flat, 90))
    if "jax2onnx" in timings:
        ratios = [float(np.median(a) / np.median(b)) for a, b in zip(timings["ours"], timings["jax2onnx"])]
        result["ratio_median"] = float(np.median(ratios))
        result["ratio_range"] = [float(min(ratios)), float(max(ratios))]
        result["goal_met"] = result["ratio_median"] <= GOAL_RATIO
        result["never_slower"] = max(ratios) <= 1.0
    return result


def machine(threads: int) -> dict:
    import jax
    import jax2onnx
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "threads": threads, "python": platform.python_version(),
            "onnxruntime": ort.__version__, "onnx": onnx.__version__, "torch": torch.__version__,
            "jax": jax.__version__, "jax2onnx": getattr(jax2onnx, "__version__", "unknown")}


def print_table(results: list[dict]) -> None:
    print(f"{'model':22} {'ours ms':>9} {'jax2onnx ms':>12} {'ratio':>7}  {'ours nodes/Shape/LN':>20}  "
          f"{'jax2onnx nodes/Shape/LN':>24}")
    for r in results:
        fixed, ours = r["jax2onnx"]["fixed"], r["ours"]
        theirs = f"{fixed['latency_ms_median']:12.2f}" if "latency_ms_median" in fixed else f"{'-':>12}"
        ratio = f"{r['ratio_median']:7.3f}" if "ratio_median" in r else f"{'-':>7}"
        stats = f"{ours['nodes']}/{ours['shape_nodes']}/{ours['layernorm_nodes']}"
        their_stats = (f"{fixed['nodes']}/{fixed['shape_nodes']}/{fixed['layernorm_nodes']}" if fixed["converted"]
                       else "-")
        print(f"{r['model']:22} {ours['latency_ms_median']:9.2f} {theirs} {ratio}  {stats:>20}  {their_stats:>24}")
    print("\njax2onnx failures:")
    for r in results:
        for mode, entry in r["jax2onnx"].items():
            if "error" in entry:
                print(f"  {r['model']} ({mode} batch): {entry['error']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vit-flax", type=Path, help="root of a vit-flax checkout (holds vit_flax/*.py)")
    parser.add_argument("--models", nargs="*", default=list(SEEDS), choices=list(SEEDS))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--runs", type=int, default=10, help="timed runs per engine per round (at least 10)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.runs < 10 or args.rounds < 1:
        parser.error("--runs must be at least 10 and --rounds at least 1")
    why = missing_tools(args.vit_flax)
    if why:
        print(f"skipped: {why}")
        return 0
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            folder = Path(tmp) / name.split("/")[1]
            folder.mkdir()
            print(f"{name}: exporting and timing ...", file=sys.stderr, flush=True)
            results.append(compare(name, args.vit_flax, folder, args))
    report = {"schema_version": 1, "goal_ratio": GOAL_RATIO, "batch": 1, "rounds": args.rounds, "runs": args.runs,
              "machine": machine(args.threads), "results": results}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print_table(results)
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
