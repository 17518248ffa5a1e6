"""vit-flax's ViT, CaiT, CrossFormer and CrossViT: static ports read from Flax msgpack files.

The golden vectors (tests/data/vit-flax, made by the Flax modules themselves) judge the ports and
their ONNX exports; the graphs are checked for what the exporter promises (dynamic batch, no shape
arithmetic, one LayerNormalization per LayerNorm, Q-scaled MatMul-Softmax-MatMul attention).
The seeds' full-size configurations export, verify and run in the slow tests.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from PIL import Image
from typer.testing import CliRunner

from twins_deploy.cli import app
from twins_deploy.errors import TwinsDeployError, UsageError
from twins_deploy.exporters import export_onnx
from twins_deploy.models import MODELS, create_model, family_of, model_table, resolve_spec
from twins_deploy.models.flax_crossformer import CrossFormerAttention
from twins_deploy.runtime import Predictor

DATA = Path(__file__).parent / "data" / "vit-flax"
GOLDEN = {"vit": "vit-flax/ViT", "vit_mean": "vit-flax/ViT", "cait": "vit-flax/CaiT",
          "crossformer": "vit-flax/CrossFormer", "cross_vit": "vit-flax/CrossViT"}
SEEDS = ("vit-flax/ViT", "vit-flax/CaiT", "vit-flax/CrossFormer", "vit-flax/CrossViT")
GOLDEN_REL = 1e-4  # of the largest |logit|: XLA and PyTorch order float32 sums differently
SHAPE_OPS = {"Shape", "Size", "ConstantOfShape", "Range", "Expand"}
runner = CliRunner()


def golden_arrays(name: str) -> tuple[np.ndarray, np.ndarray]:
    """The Flax input as NCHW, and the Flax logits."""
    with np.load(DATA / f"{name}.npz") as arrays:
        return np.ascontiguousarray(arrays["input"].transpose(0, 3, 1, 2)), arrays["logits"]


def golden_model(name: str):
    meta = json.loads((DATA / f"{name}.json").read_text())
    return create_model(GOLDEN[name], weights=DATA / f"{name}.msgpack", img_size=tuple(meta["input_size"]),
                        config=meta["config"])


def assert_close_to_golden(ours: np.ndarray, golden: np.ndarray) -> None:
    assert ours.shape == golden.shape
    assert np.abs(ours - golden).max() <= GOLDEN_REL * np.abs(golden).max()


@pytest.fixture(scope="module")
def golden_exports(tmp_path_factory) -> dict[str, dict]:
    """Each golden model exported once (dynamic batch, verified against PyTorch at batch 1 and 3)."""
    folder = tmp_path_factory.mktemp("flax-golden")
    return {name: export_onnx(golden_model(name), folder / f"{name}.onnx").as_dict() for name in GOLDEN}


def used_layernorms(model: torch.nn.Module) -> int:
    """LayerNorms that run in forward (CrossFormer's bias-MLP norms are folded into its tables)."""
    return sum(isinstance(m, torch.nn.LayerNorm) for name, m in model.named_modules() if ".dpb." not in name)


# ----------------------------------------------------------------------------------------------
# Exactness


@pytest.mark.parametrize("name", GOLDEN)
@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "explicit"])
def test_port_matches_flax_golden_logits(name, fused):
    model = golden_model(name)
    model.set_fused_attn(fused)
    pixels, logits = golden_arrays(name)
    with torch.no_grad():
        assert_close_to_golden(model(torch.from_numpy(pixels)).numpy(), logits)


@pytest.mark.parametrize("name", GOLDEN)
def test_onnx_export_matches_flax_golden_at_batch_1_and_3(golden_exports, name):
    report = golden_exports[name]
    assert report["passed"] and sorted(row["batch"] for row in report["parity"]) == [1, 3]
    pixels, logits = golden_arrays(name)
    session = ort.InferenceSession(report["path"], providers=["CPUExecutionProvider"])
    for order in ([0], [1, 0, 1]):
        got = session.run(["logits"], {"pixel_values": pixels[order]})[0]
        assert_close_to_golden(got, logits[order])


def test_embedding_is_what_the_head_reads():
    for name in ("vit_mean", "cross_vit"):
        model = golden_model(name)
        pixels = torch.from_numpy(golden_arrays(name)[0])
        with torch.no_grad():
            logits = model(pixels)
            model.output = "embedding"
            embedding = model(pixels)
        assert embedding.shape == (2, model.num_features)
        if name == "vit_mean":
            torch.testing.assert_close(model.head(embedding), logits)
        else:
            sm, lg = embedding.split([model.config.sm_dim, model.config.lg_dim], dim=1)
            torch.testing.assert_close(model.sm_head(sm) + model.lg_head(lg), logits)


# ----------------------------------------------------------------------------------------------
# Graphs


def fused_ops(path: str) -> Counter:
    """The ops onnxruntime runs after its own graph fusions."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(Path(path).with_suffix(".ort.onnx"))
    ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)


def _graph_facts(path: str):
    graph = onnx.load(path).graph
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    return graph, constants, producer


def assert_static_graph(path: str, model: torch.nn.Module, classes: int) -> Counter:
    """Dynamic batch, no shape arithmetic, constant reshape targets, one LayerNormalization per
    LayerNorm that runs, no decomposed LayerNorm. Returns the op counts."""
    graph, constants, _ = _graph_facts(path)
    ops = Counter(node.op_type for node in graph.node)
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, *model.img_size]
    assert [d.dim_param or d.dim_value for d in graph.output[0].type.tensor_type.shape.dim] == ["batch", classes]
    assert not SHAPE_OPS & set(ops), ops
    for node in (n for n in graph.node if n.op_type == "Reshape"):
        assert node.input[1] in constants, f"{node.name} reshapes to a computed shape"
        assert list(constants[node.input[1]]).count(-1) <= 1, node.name
    for node in (n for n in graph.node if n.op_type in ("Gather", "Slice", "Pad")):
        assert all(name in constants for name in node.input[1:] if name), f"{node.name} takes a computed index"
    assert ops["LayerNormalization"] == used_layernorms(model)
    assert not {"Sqrt", "ReduceVariance", "Div"} & set(ops)  # no decomposed LayerNorm
    return ops


@pytest.mark.parametrize("name", GOLDEN)
def test_graph_is_static_with_one_layernorm_node_per_layernorm(golden_exports, name):
    model = golden_model(name)
    ops = assert_static_graph(golden_exports[name]["path"], model, model.num_classes)
    linears = sum(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if ".dpb." not in n)
    assert ops["Gemm"] == linears  # every Dense, the patch embeddings' too, is one Gemm
    assert ops["Tanh"] == ops["Pow"] == sum(m.__class__.__name__ in ("FeedForward", "MLP") for m in model.modules())
    assert fused_ops(golden_exports[name]["path"])["FastGelu"] == ops["Tanh"]  # onnxruntime fuses every GELU
    assert ops["ReduceMean"] == (name in ("vit_mean", "crossformer"))  # token pooling only


@pytest.mark.parametrize("name", GOLDEN)
def test_attention_is_scaled_q_matmul_softmax_matmul(golden_exports, name):
    """ViT/CrossViT: Mul(Q, d^-0.5) -> MatMul -> Softmax -> MatMul. CrossFormer: a constant bias
    table added after the first MatMul. CaiT: its talking-head mixes (a constant (h, h) MatMul)
    sit on either side of the Softmax."""
    graph, constants, producer = _graph_facts(golden_exports[name]["path"])
    model = golden_model(name)
    consumers = Counter(i for node in graph.node for i in node.input)
    softmaxes = [node for node in graph.node if node.op_type == "Softmax"]
    attentions = [m for m in model.modules() if hasattr(m, "fused_attn")]
    assert len(softmaxes) == len(attentions) > 0
    for softmax in softmaxes:
        if name == "cait":  # Softmax <- Reshape <- MatMul(mix, Reshape(scores))
            mix = producer[producer[softmax.input[0]].input[0]]
            assert mix.op_type == "MatMul" and constants[mix.input[0]].shape == (4, 4)
            scores = producer[producer[mix.input[1]].input[0]]
            after = [n for n in graph.node if softmax.output[0] in n.input]
            assert [n.op_type for n in after] == ["Reshape"]  # then the post-softmax mix, then MatMul(., V)
        elif name == "crossformer":
            add = producer[softmax.input[0]]
            assert add.op_type == "Add"
            bias = next(constants[i] for i in add.input if i in constants)
            assert bias.ndim == 2 and bias.shape[0] == bias.shape[1] in (1, 4, 16, 49, 64)
            scores = producer[next(i for i in add.input if i not in constants)]
        else:
            scores = producer[softmax.input[0]]
        assert scores.op_type == "MatMul"
        scale = producer[scores.input[0]]
        assert scale.op_type == "Mul"
        factor = next(constants[i] for i in scale.input if i in constants)
        assert factor.size == 1 and 0 < float(factor) < 1
        assert producer[scores.input[1]].op_type == "Transpose"  # K^T
        assert consumers[softmax.output[0]] == 1


def test_crossformer_position_bias_is_a_constant_not_an_mlp(golden_exports):
    """The bias MLP is evaluated once: the graph adds its tables, each equal to the model's buffer."""
    model = golden_model("crossformer")
    graph, constants, producer = _graph_facts(golden_exports["crossformer"]["path"])
    ops = Counter(node.op_type for node in graph.node)
    assert "Relu" not in ops
    tables = [constants[i] for node in graph.node if node.op_type == "Add" for i in node.input
              if i in constants and constants[i].ndim == 2 and producer.get(i) is None
              and any(n.op_type == "Softmax" and n.input[0] == node.output[0] for n in graph.node)]
    buffers = [m.position_bias.numpy() for m in model.modules() if isinstance(m, CrossFormerAttention)]
    assert len(tables) == len(buffers) == 10
    for buffer in buffers:
        assert any(table.shape == buffer.shape and np.array_equal(table, buffer) for table in tables)
    grids = {((2 * m.window + 1) ** 2, 2) for m in model.modules() if isinstance(m, CrossFormerAttention)}
    assert not [t.shape for t in constants.values() if t.shape in grids]  # no relative-position grid left


# ----------------------------------------------------------------------------------------------
# Weights


def test_crossformer_bias_follows_loaded_weights_and_state_dict_round_trips():
    loaded = golden_model("crossformer")
    fresh = create_model("vit-flax/CrossFormer", weights="random", config=loaded.config, img_size=224)
    before = [m.position_bias.clone() for m in fresh.modules() if isinstance(m, CrossFormerAttention)]
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    after = [m.position_bias for m in fresh.modules() if isinstance(m, CrossFormerAttention)]
    expected = [m.position_bias for m in loaded.modules() if isinstance(m, CrossFormerAttention)]
    assert all(not torch.equal(b, a) for b, a in zip(before, after))
    assert all(torch.equal(a, e) for a, e in zip(after, expected))
    assert not any("position_bias" in key for key in loaded.state_dict())  # computed, never stored
    pixels = torch.from_numpy(golden_arrays("crossformer")[0])
    with torch.no_grad():
        torch.testing.assert_close(fresh(pixels), loaded(pixels), rtol=0, atol=0)


def test_random_weights_are_seeded():
    spec = resolve_spec("vit-flax/CrossFormer", json.loads((DATA / "crossformer.json").read_text())["config"])
    first, second = (create_model(spec, weights="random", seed=3) for _ in range(2))
    for (key, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), key
    tables = [m.position_bias for m in first.modules() if isinstance(m, CrossFormerAttention)]
    assert all(t.abs().sum() > 0 for t in tables)  # computed from the initialised MLP


@pytest.mark.parametrize("name, change, message", [
    ("vit", {"dim": 32}, "has dim 64"),
    ("vit", {"depth": 3}, "has depth 2"),
    ("cait", {"heads": 2}, "has heads 4"),
    ("crossformer", {"dim": [32, 64, 96, 160]}, "has dim [32, 64, 96, 128]"),
    ("cross_vit", {"sm_enc_depth": 2}, "has sm_enc_depth 1"),
    ("cross_vit", {"num_classes": 5}, "has num_classes 10"),
])
def test_a_file_that_does_not_fit_names_the_config_key(name, change, message):
    meta = json.loads((DATA / f"{name}.json").read_text())
    with pytest.raises(TwinsDeployError, match=re.escape(message)) as info:
        create_model(GOLDEN[name], weights=DATA / f"{name}.msgpack", img_size=tuple(meta["input_size"]),
                     config={**meta["config"], **change})
    assert "pass --config with" in str(info.value)


def test_a_pytorch_file_is_a_usage_error(tmp_path):
    path = tmp_path / "vit.pt"
    torch.save(golden_model("vit").state_dict(), path)
    with pytest.raises(UsageError, match="is a PyTorch checkpoint"):
        family_of(MODELS["vit-flax/ViT"]).read_checkpoint(path)


def test_sizes_that_do_not_fit_name_the_key():
    crossformer = json.loads((DATA / "crossformer.json").read_text())["config"]
    with pytest.raises(UsageError, match="local_window_size 7 does not divide the stage-1 map 32x32 at --img-size 128"):
        create_model("vit-flax/CrossFormer", config=crossformer, img_size=128)
    with pytest.raises(UsageError, match="patch_size 16x16 does not divide --img-size 72x72"):
        create_model("vit-flax/ViT", config=json.loads((DATA / "vit.json").read_text())["config"], img_size=72)
    with pytest.raises(UsageError, match="has position embeddings for 16: pass --img-size 64x64"):
        create_model("vit-flax/CaiT", config=json.loads((DATA / "cait.json").read_text())["config"], img_size=128)


def test_a_smaller_image_uses_the_first_position_embeddings_as_flax_does():
    """Flax slices its position table to the patches the image has; so does the port."""
    model = create_model("vit-flax/ViT", weights=DATA / "vit.msgpack", img_size=(32, 64),
                         config=json.loads((DATA / "vit.json").read_text())["config"])
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 64)).shape == (2, 10)
    assert model.num_patches == 8 and model.pos_embedding.shape[1] == 17


def test_models_table_lists_the_four_families():
    """``twins-deploy models`` builds every model on the meta device: the bias tables wait for weights."""
    rows = {row["name"]: row for row in model_table()}
    for name in SEEDS:
        assert rows[name]["library"] == "vit-flax" and rows[name]["params"] > 1_000_000 and rows[name]["gflops"] > 0


# ----------------------------------------------------------------------------------------------
# Downstream: verify, build (onnxruntime int8), bench, infer, runtime, triton


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("flax-photos")
    rng = np.random.default_rng(0)
    for index in range(3):
        Image.fromarray(rng.integers(0, 256, (96, 120, 3), dtype=np.uint8)).save(folder / f"photo{index}.png")
    return folder


@pytest.mark.parametrize("name", ["vit", "cait", "crossformer", "cross_vit"])
def test_downstream_commands_run_on_the_export(golden_exports, photos, tmp_path, name):
    path = golden_exports[name]["path"]
    verified = runner.invoke(app, ["verify", "-e", path, "--samples", "4", "--json"])
    assert verified.exit_code == 0, verified.output
    assert json.loads(verified.stdout)["parity"]["max_rel"] <= 1e-4

    built = runner.invoke(app, ["build", "--onnx", path, "--backend", "onnxruntime", "--precision", "int8",
                                "--calib-images", "4", "-o", str(tmp_path / "int8.onnx"), "--json"])
    assert built.exit_code == 0, built.output
    assert json.loads(built.stdout)["parity_vs_fp32"]["cosine"] > 0.9

    bench_json = tmp_path / "bench.json"
    benched = runner.invoke(app, ["bench", "-e", path, "-e", str(tmp_path / "int8.onnx"), "--batch", "1,3",
                                  "--iters", "2", "--warmup", "1", "--rounds", "1", "--json", str(bench_json)])
    assert benched.exit_code == 0, benched.output
    rows = json.loads(bench_json.read_text())["results"]
    assert sorted((r["batch"], r["iterations"]) for r in rows) == [(1, 2), (1, 2), (3, 2), (3, 2)]
    assert all(r["latency_ms_p50"] > 0 for r in rows)

    predictions = tmp_path / "predictions.jsonl"
    inferred = runner.invoke(app, ["infer", "-e", path, str(photos), "--topk", "2", "-o", str(predictions)])
    assert inferred.exit_code == 0, inferred.output
    assert len(predictions.read_text().splitlines()) == 3

    records = {Path(r["input"]).name: r for r in map(json.loads, predictions.read_text().splitlines())}
    files = sorted(photos.iterdir())
    served = Predictor(path, top_k=3).predict(files)
    assert [p.logits.shape for p in served] == [(golden_model(name).num_classes,)] * 3
    assert [p.class_ids[0] for p in served] == [records[f.name]["predictions"][0]["class_id"] for f in files]

    repository = runner.invoke(app, ["triton", "--onnx", path, "--output", str(tmp_path / "repo"), "--device", "cpu",
                                     "--json"])
    assert repository.exit_code == 0, repository.output
    assert (tmp_path / "repo" / Path(path).stem / "1" / "model.onnx").is_file()


# ----------------------------------------------------------------------------------------------
# The seeds' usage configurations (random weights)


@pytest.mark.slow
@pytest.mark.parametrize("name", SEEDS)
def test_seed_configuration_exports_verifies_and_runs(tmp_path, name):
    model = create_model(name, weights="random")
    report = export_onnx(model, tmp_path / "seed.onnx").as_dict()
    assert report["passed"] and sorted(row["batch"] for row in report["parity"]) == [1, 3]
    assert all(row["max_rel"] <= 1e-4 for row in report["parity"])
    assert_static_graph(report["path"], model, 1000)  # the export ran it on onnxruntime at batch 1 and 3
