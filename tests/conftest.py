"""Shared fixtures: the golden vectors copied from the reference (tests never reach outside the repo)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from twins_deploy.models import TwinsConfig

DATA = Path(__file__).parent / "data"
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = ("tiny-pcpvt", "tiny-svt")
SIZES = ("224x224", "256x256", "224x320")
LAYOUTS = ("safetensors", "official.pth", "mmpretrain.pth")


def load_benchmark(name: str):
    """benchmarks/NAME.py as a module, loaded once (registered first: a script's dataclasses look themselves up
    in ``sys.modules``)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def tiny_config(name: str) -> TwinsConfig:
    """The architecture of a golden-vector model, from the reference's index.json."""
    config = json.loads((DATA / "index.json").read_text())[name]["config"]
    return TwinsConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})


def tiny_weights(name: str, layout: str = "safetensors") -> Path:
    return DATA / f"{name}.{layout}"


def golden(name: str) -> dict[str, np.ndarray]:
    with np.load(DATA / f"{name}.npz") as arrays:
        return dict(arrays)


@pytest.fixture(scope="session")
def tiny_svt_onnx(tmp_path_factory) -> Path:
    """The tiny golden SVT exported once per test session (dynamic batch, 10 classes)."""
    from twins_deploy.exporters import export_onnx
    from twins_deploy.models import create_model

    model = create_model(tiny_config("tiny-svt"), weights=tiny_weights("tiny-svt"))
    return export_onnx(model, tmp_path_factory.mktemp("tiny-svt") / "tiny-svt.onnx").path
