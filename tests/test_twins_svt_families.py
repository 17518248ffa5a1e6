"""vit-pytorch's and vit-flax's TwinsSVT: exact against the libraries' own outputs, a static ONNX graph,
and loading/config errors that name what is wrong.

The golden arrays (tests/data/vit-pytorch, tests/data/vit-flax) were made by the libraries themselves;
neither library is imported here.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from twins_deploy.errors import TwinsDeployError, UsageError
from twins_deploy.exporters import export_onnx
from twins_deploy.models import create_model, resolve_spec
from twins_deploy.runtime.session import create_session

DATA = Path(__file__).parent / "data"
FAMILIES = {  # spec name -> (golden folder, weights file, input layout of the golden arrays)
    "vit-pytorch/TwinsSVT": ("vit-pytorch", "twins_svt.pt", "NCHW"),
    "vit-flax/TwinsSVT": ("vit-flax", "twins_svt.msgpack", "NHWC"),
}
GOLDEN_REL = 1e-4  # of the largest |logit|: XLA and PyTorch order float32 reductions differently
# a 224 configuration with the libraries' default 7x7 windows and global k 7, small enough for tests
SMALL_224 = dict(s1_emb_dim=32, s2_emb_dim=64, s3_emb_dim=96, s4_emb_dim=128, s3_depth=1, s4_depth=1)
SHAPE_OPS = {"Shape", "Size", "ConstantOfShape", "Gather", "Concat", "Unsqueeze", "Squeeze", "Range", "Expand"}


def golden(name: str) -> tuple[dict, np.ndarray, np.ndarray, Path]:
    """(config, NCHW input, logits, weights file) of a family's golden vectors."""
    folder, weights, layout = FAMILIES[name]
    meta = json.loads((DATA / folder / "twins_svt.json").read_text())
    with np.load(DATA / folder / "twins_svt.npz") as arrays:
        pixels, logits = arrays["input"], arrays["logits"]
    if layout == "NHWC":
        pixels = pixels.transpose(0, 3, 1, 2)
    meta["input_size"] = tuple(meta["input_size"])
    return meta, np.ascontiguousarray(pixels), logits, DATA / folder / weights


def golden_model(name: str, **overrides):
    meta, _, _, weights = golden(name)
    return create_model(name, weights=weights, config={**meta["config"], **overrides}, img_size=meta["input_size"])


def max_rel(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(got - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "matmul-softmax"])
def test_port_loaded_from_the_library_file_matches_its_logits(name, fused):
    _, pixels, logits, _ = golden(name)
    model = golden_model(name)
    model.set_fused_attn(fused)
    with torch.no_grad():
        ours = model(torch.from_numpy(pixels)).numpy()
    assert ours.shape == logits.shape and max_rel(ours, logits) <= GOLDEN_REL


def test_vit_pytorch_state_dict_is_the_library_one_key_for_key():
    """``load_state_dict(torch.load(file))`` works as it is, and ``state_dict()`` gives the file back."""
    meta, _, _, weights = golden("vit-pytorch/TwinsSVT")
    reference = torch.load(weights, weights_only=True)
    model = create_model("vit-pytorch/TwinsSVT", weights="random", config=meta["config"], img_size=meta["input_size"])
    model.load_state_dict(reference)
    state = model.state_dict()
    assert list(state) == list(reference)
    assert all(torch.equal(state[key], reference[key]) for key in reference)


@pytest.fixture(scope="module", params=list(FAMILIES))
def golden_export(request, tmp_path_factory):
    model = golden_model(request.param)
    path = tmp_path_factory.mktemp("golden") / "twins_svt.onnx"
    return request.param, export_onnx(model, path)


def test_onnx_export_verifies_and_matches_the_library_at_batch_1_and_2(golden_export):
    name, report = golden_export
    assert report.passed and sorted({row["batch"] for row in report.parity}) == [1, 3]
    _, pixels, logits, _ = golden(name)
    session = create_session(report.path, providers=["CPUExecutionProvider"])
    for batch in (1, 2):
        ours = session.run(["logits"], {"pixel_values": pixels[:batch]})[0]
        assert ours.shape == logits[:batch].shape and max_rel(ours, logits[:batch]) <= GOLDEN_REL


@pytest.fixture(scope="module", params=list(FAMILIES))
def export_224(request, tmp_path_factory):
    """A 224 configuration with the libraries' default 7x7 windows and global k 7 (small dims, random weights)."""
    model = create_model(request.param, weights="random", config=SMALL_224)
    report = export_onnx(model, tmp_path_factory.mktemp("svt224") / "model.onnx")
    return model, report, onnx.load(report.path).graph


@pytest.mark.slow
def test_224_graph_is_static_with_one_node_per_layernorm_and_linear(export_224):
    model, report, graph = export_224
    assert report.passed
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, 224, 224]
    assert [d.dim_param or d.dim_value for d in graph.output[0].type.tensor_type.shape.dim] == ["batch", 1000]
    ops = Counter(node.op_type for node in graph.node)
    assert not SHAPE_OPS & set(ops), ops
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    reshapes = [node for node in graph.node if node.op_type == "Reshape"]
    assert reshapes and all(node.input[1] in constants for node in reshapes)
    assert all(list(constants[node.input[1]]).count(-1) <= 1 for node in reshapes)
    modules = Counter(type(m).__name__ for m in model.modules())
    assert ops["LayerNormalization"] == modules["LayerNorm"] > 0
    assert not {"Sqrt", "ReduceVariance"} & set(ops) and ops["ReduceMean"] == 1  # only the token pooling
    assert ops["Gemm"] == modules["Linear"]
    assert not [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in constants]
    gelu = "Tanh" if model.flavour.gelu == "tanh" else "Erf"  # Flax's nn.gelu is the tanh approximation
    assert ops[gelu] == modules["FeedForward"] and not {"Tanh", "Erf"} - {gelu} & set(ops)


@pytest.mark.slow
def test_224_attention_is_scaled_q_then_matmul_softmax_matmul(export_224):
    model, _, graph = export_224
    producer = {out: node for node in graph.node for out in node.output}
    uses = Counter(name for node in graph.node for name in node.input)
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    softmaxes = [node for node in graph.node if node.op_type == "Softmax"]
    modules = Counter(type(m).__name__ for m in model.modules())
    assert len(softmaxes) == modules["LocalAttention"] + modules["GlobalAttention"]
    for softmax in softmaxes:
        scores = producer[softmax.input[0]]
        scale = producer[scores.input[0]]
        assert scores.op_type == "MatMul" and scale.op_type == "Mul"
        factor = next(constants[name] for name in scale.input if name in constants)
        assert factor.size == 1 and np.isclose(float(factor), 64 ** -0.5)
        assert producer[scores.input[1]].op_type == "Transpose"  # K^T
        assert uses[softmax.output[0]] == 1
        assert any(node.op_type == "MatMul" and node.input[0] == softmax.output[0] for node in graph.node)


# ----------------------------------------------------------------------------------------------
# Names, configs and weights


@pytest.mark.parametrize("given", ["VIT-FLAX/twinssvt", "flax-twins-svt"])
def test_names_resolve_case_insensitively_and_random_weights_are_seeded(given):
    meta = golden("vit-flax/TwinsSVT")[0]
    one, two = (create_model(given, weights="random", config=meta["config"], img_size=128) for _ in range(2))
    assert one.spec.name == "vit-flax/TwinsSVT" and one.img_size == (128, 128)
    assert str(one.weights_source) == "random:seed=0"
    assert all(torch.equal(a, b) for a, b in zip(one.state_dict().values(), two.state_dict().values()))


@pytest.mark.parametrize("name", FAMILIES)
def test_library_defaults_and_no_pretrained_weights(name):
    spec = resolve_spec(name)
    assert spec.input_size == (224, 224) and spec.hub_id is None
    assert (spec.config.s1_emb_dim, spec.config.s3_depth, spec.config.s4_global_k, spec.config.num_classes) == \
        (64, 5, 7, 1000)
    with pytest.raises(UsageError, match="no pretrained weights"):
        create_model(name, weights="pretrained", config=SMALL_224)


@pytest.mark.parametrize("name", FAMILIES)
def test_unknown_config_key_is_named(name, tmp_path):
    with pytest.raises(UsageError, match="unknown key 's1_emb_dims'.*did you mean 's1_emb_dim'"):
        resolve_spec(name, {"s1_emb_dims": 32})
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"config": {"heads": 4}}))
    with pytest.raises(UsageError, match=f"config {path}: unknown key 'heads'"):
        create_model(name, config=path)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("key, value, img_size", [
    ("s2_local_patch_size", 5, 224),  # the stage-2 map is 28x28
    ("s3_global_k", 4, 224),  # the stage-3 map is 14x14
    ("s1_patch_size", 3, 224),
    ("s1_local_patch_size", 7, 128),  # the library default window on a 32x32 map
])
def test_a_size_that_does_not_divide_names_the_key(name, key, value, img_size):
    with pytest.raises(UsageError, match=rf"^{key} {value} does not divide the stage-\d .* at --img-size "):
        create_model(name, config={**SMALL_224, key: value}, img_size=img_size)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_even_peg_kernel_pads_like_xla_in_flax_and_is_refused_by_vit_pytorch():
    model = create_model("vit-flax/TwinsSVT", config={**SMALL_224, "peg_kernel_size": 4}, img_size=224)
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 1000)
    with pytest.raises(UsageError, match="peg_kernel_size 4 must be odd"):
        create_model("vit-pytorch/TwinsSVT", config={**SMALL_224, "peg_kernel_size": 4})


@pytest.mark.parametrize("name", FAMILIES)
def test_dropout_is_accepted_with_a_note(name):
    notes: list[str] = []
    spec = resolve_spec(name, {"dropout": 0.1}, notes)
    assert spec.config.dropout == 0.1 and notes == ["dropout=0.1 is ignored: inference runs without dropout"]
    meta, pixels, logits, weights = golden(name)
    model = golden_model(name, dropout=0.1)
    with torch.no_grad():
        assert max_rel(model(torch.from_numpy(pixels)).numpy(), logits) <= GOLDEN_REL


@pytest.mark.parametrize("name, key, message", [
    ("vit-pytorch/TwinsSVT", "s1_emb_dim", r"has s1_emb_dim 16 \(layers\.0\.0\.proj\.1\.weight is \(16, 48, 1, 1\)\), "
                                           r"the config says 24: pass --config with s1_emb_dim 16"),
    ("vit-pytorch/TwinsSVT", "s3_depth", r"has s3_depth 2 \(layers\.2\.3\.layers\.\*\), the config says 1"),
    ("vit-pytorch/TwinsSVT", "s2_global_k", r"has s2_global_k 4 \(layers\.1\.1\.layers\.0\.2\.fn\.to_kv\.weight is "
                                            r"\(1024, 32, 4, 4\)\), the config says 2"),
    ("vit-flax/TwinsSVT", "s1_emb_dim", r"has s1_emb_dim 16 \(PatchEmbedding_0/Conv_0/kernel is \(1, 1, 48, 16\)\), "
                                        r"the config says 24: pass --config with s1_emb_dim 16"),
    ("vit-flax/TwinsSVT", "s4_depth", r"has s4_depth 1 \(Transformer_7 has 1 GlobalAttention layers\), "
                                      r"the config says 2"),
    ("vit-flax/TwinsSVT", "num_classes", r"has num_classes 10 \(Dense_0/kernel is \(64, 10\)\), the config says 7: "
                                         r"pass --num-classes 10"),
])
def test_a_file_of_another_config_names_the_parameter_and_the_key(name, key, message):
    wrong = {"s1_emb_dim": 24, "s3_depth": 1, "s2_global_k": 2, "s4_depth": 2, "num_classes": 7}[key]
    with pytest.raises(TwinsDeployError, match=message):
        golden_model(name, **{key: wrong})


def test_a_flax_file_of_another_model_is_refused_by_name():
    with pytest.raises(TwinsDeployError, match=r"holds \S+ \(.*\), which no vit-flax TwinsSVT parameter takes"):
        create_model("vit-flax/TwinsSVT", weights=DATA / "vit-flax" / "cait.msgpack", config=SMALL_224)


def test_a_file_of_the_other_library_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="is a Flax msgpack checkpoint, not a PyTorch one"):
        create_model("vit-pytorch/TwinsSVT", weights=golden("vit-flax/TwinsSVT")[3], config=SMALL_224)
    with pytest.raises(UsageError, match="is a PyTorch checkpoint.*--model vit-pytorch/TwinsSVT"):
        create_model("vit-flax/TwinsSVT", weights=golden("vit-pytorch/TwinsSVT")[3], config=SMALL_224)


@pytest.mark.parametrize("wrap", [
    lambda sd: {"model": sd},
    lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
], ids=["model", "state_dict+module"])
def test_nested_vit_pytorch_checkpoints_load(tmp_path, wrap):
    _, pixels, logits, weights = golden("vit-pytorch/TwinsSVT")
    path = tmp_path / "nested.pth"
    torch.save(wrap(torch.load(weights, weights_only=True)), path)
    meta = golden("vit-pytorch/TwinsSVT")[0]
    model = create_model("vit-pytorch/TwinsSVT", weights=path, config=meta["config"], img_size=meta["input_size"])
    with torch.no_grad():
        assert max_rel(model(torch.from_numpy(pixels)).numpy(), logits) <= GOLDEN_REL


@pytest.mark.parametrize("name", FAMILIES)
def test_builds_on_the_meta_device_at_the_library_defaults(name):
    spec = resolve_spec(name)
    from twins_deploy.models import family_of

    with torch.device("meta"):
        model = family_of(spec).model_class(spec.config, spec.input_size, spec=spec)
        assert model(torch.empty(1, 3, 224, 224)).shape == (1, 1000)
