"""jax2onnx's exports of vit-flax's seed models, with their Flax weights: the input of ``cpu_race.py --jax2onnx DIR``.

The project never imports jax or flax; run this where they are installed, e.g. a venv that also sees the
project and torch installed in the system python:

    python3 -m venv --system-site-packages /tmp/jaxvenv
    /tmp/jaxvenv/bin/pip install jax jaxlib flax jax2onnx einops        # measured with jax 0.10.2, jax2onnx 0.17.1
    git clone https://github.com/conceptofmind/vit-flax /tmp/vit-flax
    /tmp/jaxvenv/bin/python benchmarks/jax2onnx_exports.py --vit-flax /tmp/vit-flax --output /tmp/jax2onnx

Per model, at the seed's configuration (``MODELS[name]``, dropout off; vit-flax's own module, as in
``flax_vs_jax2onnx.py``): ``<Class>.msgpack``, the same seeded weights ``flax_vs_jax2onnx.py`` makes (our port
loads this file, so our export and jax2onnx's compute the same function), and ``<Class>.onnx``, jax2onnx's
``to_onnx`` of the Flax ``apply`` with a dynamic batch (NHWC input, logits out). ``exports.json`` records the
versions and each model's files or, where jax2onnx fails, the first line of its error. Whether OpenVINO or
onnxruntime loads a file is for the benchmark that uses it to find out.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flax_vs_jax2onnx import SEEDS, export_with_jax2onnx, flax_model, missing_tools, seeded_variables  # noqa: E402

from twins_deploy.files import atomic_output  # noqa: E402

DEFAULT_MODELS = ("vit-flax/ViT", "vit-flax/CrossFormer")


def export(name: str, vit_flax: Path, folder: Path) -> dict:
    """``<Class>.msgpack`` and ``<Class>.onnx`` of one seed model in ``folder``; what was written, or why not."""
    import flax.serialization
    import jax

    from twins_deploy.models import MODELS

    spec = MODELS[name]
    stem = SEEDS[name][1]
    module = flax_model(spec, vit_flax)
    image = np.random.default_rng(0).standard_normal((1, *spec.input_size, 3), dtype=np.float32)
    variables = seeded_variables(module, image)  # the image only gives init its shape
    with atomic_output(folder / f"{stem}.msgpack") as tmp:
        tmp.write_bytes(flax.serialization.to_bytes(variables))
    entry = {"model": name, "weights": f"{stem}.msgpack", "input_layout": "NHWC", "batch": "dynamic",
             "jax": jax.__version__, "jax2onnx": version("jax2onnx")}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=folder) as scratch:  # jax2onnx puts large weights in a .data file beside
        exported = Path(scratch) / f"{stem}.onnx"
        error = export_with_jax2onnx(lambda x: module.apply(variables, x), spec.input_size, "B", exported)
        if error:
            raise RuntimeError(error)
        entry["convert_s"] = round(time.perf_counter() - started, 1)
        with atomic_output(folder / f"{stem}.onnx") as tmp:  # one self-contained file (all these are under 2 GB)
            onnx.save_model(onnx.load(str(exported)), str(tmp))
    entry["onnx"] = f"{stem}.onnx"
    return entry


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vit-flax", type=Path, required=True, help="root of a vit-flax checkout (vit_flax/*.py)")
    parser.add_argument("--output", type=Path, required=True, help="folder for the .msgpack, .onnx and exports.json")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"any of {', '.join(SEEDS)}")
    args = parser.parse_args()
    why = missing_tools(args.vit_flax)
    if why:
        parser.error(why)
    names = args.models.split(",")
    unknown = [name for name in names if name not in SEEDS]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}: use {', '.join(SEEDS)}")
    manifest_path = args.output / "exports.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    for name in names:
        print(f"{name}: seeded Flax weights and jax2onnx's export ...", file=sys.stderr, flush=True)
        try:
            manifest[name] = export(name, args.vit_flax, args.output)
        except RuntimeError as exc:  # jax2onnx's failure is a finding: recorded, the other models still run
            manifest[name] = {"model": name, "weights": f"{SEEDS[name][1]}.msgpack", "error": str(exc)}
        print(f"  {json.dumps(manifest[name])}", file=sys.stderr, flush=True)
        with atomic_output(manifest_path) as tmp:
            tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {manifest_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
