"""Engines: one runner interface over torch, onnxruntime, OpenVINO and TensorRT, and the table ``--engine`` reads.

    from twins_deploy.engines import ModelSource, open_engine
    with open_engine("int8", ModelSource("svt-s", weights="random")) as runner:   # built into the cache once
        logits = runner.infer(batch)["logits"]                                     # (B, 3, 224, 224) float32 in
        print(runner.describe())                                                   # backend, device, precision, ...

Backends import their libraries only when a runner is activated.
"""
from twins_deploy.engines.base import EngineInfo, Runner
from twins_deploy.engines.resolve import ModelSource, open_engine, resolve_name
from twins_deploy.engines.table import ENGINES, PRECISIONS, Capabilities, EngineFormat, detect_capabilities

__all__ = ["ENGINES", "PRECISIONS", "Capabilities", "EngineFormat", "EngineInfo", "ModelSource", "Runner",
           "detect_capabilities", "open_engine", "resolve_name"]
