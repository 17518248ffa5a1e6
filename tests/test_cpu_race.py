"""benchmarks/cpu_race.py's handling of jax2onnx's exports: which files it races, and a file OpenVINO refuses
reported in one line for every by-hand route (real OpenVINO on a training-mode Dropout, as jax2onnx writes
vit-flax's ``deterministic=False`` dropout)."""
from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper

from conftest import load_benchmark


def load_race():
    return load_benchmark("cpu_race")


def test_a_training_mode_dropout_is_refused_for_every_route_in_one_line(tmp_path):
    race = load_race()
    graph = helper.make_graph(
        [helper.make_node("Dropout", ["x", "ratio", "training"], ["y"])], "dropout",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4, 4, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 4, 4, 3])],
        [helper.make_tensor("ratio", TensorProto.FLOAT, [], [0.0]),
         helper.make_tensor("training", TensorProto.BOOL, [], [True])])
    path = tmp_path / "dropout.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))

    routes = race.hand_routes(path, np.zeros((2, 4, 4, 3), np.float32), threads=1)

    assert set(routes) == {race.HAND_FP, race.HAND_INT8, race.HAND_INT8_STATIC}
    for why in routes.values():
        assert "\n" not in why
        assert why.startswith("OpConversionFailure: Conversion is failed for: Dropout"), why
        assert "Training mode is not supported" in why


def test_which_jax2onnx_export_a_model_races(tmp_path):
    race = load_race()
    (tmp_path / "exports.json").write_text(json.dumps({
        "vit-flax/ViT": {"weights": "ViT.msgpack", "onnx": "ViT.onnx"},
        "vit-flax/CrossFormer": {"weights": "CrossFormer.msgpack", "error": "conversion failed: ValueError: x"}}))

    assert race.jax2onnx_export("svt-s", tmp_path) == (None, None, None)  # not a Flax model: nothing to race
    assert race.jax2onnx_export("vit-flax/ViT", tmp_path) == (tmp_path / "ViT.msgpack", tmp_path / "ViT.onnx", None)
    weights, theirs, why = race.jax2onnx_export("flax-crossformer", tmp_path)  # an alias resolves
    assert (weights, theirs) == (tmp_path / "CrossFormer.msgpack", None)
    assert why == "jax2onnx failed: conversion failed: ValueError: x"
    assert race.jax2onnx_export("vit-flax/ViT", None)[2].startswith("skipped: no --jax2onnx DIR")
    assert "is not in" in race.jax2onnx_export("vit-flax/CaiT", tmp_path)[2]
    nhwc = race.ChannelsLast(lambda batch: batch)
    assert race.fed(nhwc, np.zeros((2, 3, 5, 7), np.float32)).shape == (2, 5, 7, 3)
