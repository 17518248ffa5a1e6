"""The model zoo computes exactly what timm computes, from every published checkpoint layout."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import LAYOUTS, SIZES, TINY, golden, tiny_config, tiny_weights
from twins_deploy.errors import UsageError
from twins_deploy.models import MODELS, count_parameters, create_model, resolve_spec, to_size

TIMM_PARAMS = {"pcpvt-s": 24_106_216, "pcpvt-b": 43_828_456, "pcpvt-l": 60_989_672,
               "svt-s": 24_060_776, "svt-b": 56_070_952, "svt-l": 99_271_400}
TOLERANCE = 1e-5


@pytest.mark.parametrize("name", list(TIMM_PARAMS))
def test_parameter_counts_equal_timm(name):
    with torch.device("meta"):
        from twins_deploy.models import Twins

        model = Twins(MODELS[name].config)
    assert count_parameters(model) == TIMM_PARAMS[name]


@pytest.mark.parametrize("alias, name", [
    ("svt-s", "svt-s"), ("twins_svt_small", "svt-s"), ("alt_gvt_small", "svt-s"), ("ALT_GVT_BASE", "svt-b"),
    ("twins_pcpvt_large", "pcpvt-l"), ("pcpvt_base_v0", "pcpvt-b"), ("pcpvt-s", "pcpvt-s"), ("twins_svt_large", "svt-l"),
])
def test_aliases_resolve(alias, name):
    assert resolve_spec(alias).name == name


def test_unknown_model_suggests_close_match():
    with pytest.raises(UsageError, match="did you mean svt-s"):
        resolve_spec("svt-small")


def test_hub_ids_follow_timm():
    assert MODELS["svt-s"].hub_id == "timm/twins_svt_small.in1k"
    assert MODELS["pcpvt-l"].hub_id == "timm/twins_pcpvt_large.in1k"


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("size", SIZES)
def test_golden_vectors(name, layout, size):
    """Logits, embedding and the four stage maps equal timm's within 1e-5, from every layout."""
    arrays = golden(name)
    model = create_model(tiny_config(name), weights=tiny_weights(name, layout), img_size=size)
    x = torch.from_numpy(arrays[f"input_{size}"])
    with torch.no_grad():
        stages, _ = model.forward_stages(x)
        results = {"logits": model(x), "embedding": model.forward_embedding(x)}
        results.update({f"stage{i}": stage for i, stage in enumerate(stages)})
    for key, value in results.items():
        expected = arrays[f"{key}_{size}"]
        assert value.shape == expected.shape, key
        np.testing.assert_allclose(value.numpy(), expected, rtol=0, atol=TOLERANCE, err_msg=key)


@pytest.mark.parametrize("name", TINY)
def test_explicit_attention_equals_sdpa(name):
    """The exporters' MatMul-Softmax-MatMul path computes what SDPA computes."""
    arrays = golden(name)
    model = create_model(tiny_config(name), weights=tiny_weights(name), img_size="256x256")
    x = torch.from_numpy(arrays["input_256x256"])
    model.set_fused_attn(False)
    with torch.no_grad():
        logits = model(x).numpy()
    np.testing.assert_allclose(logits, arrays["logits_256x256"], rtol=0, atol=TOLERANCE)


def test_outputs_select_what_forward_returns():
    arrays = golden("tiny-svt")
    x = torch.from_numpy(arrays["input_224x320"])
    model = create_model(tiny_config("tiny-svt"), weights=tiny_weights("tiny-svt"), img_size=(224, 320),
                         output="features")
    with torch.no_grad():
        features = model(x)
        model.output = "embedding"
        embedding = model(x)
    assert [tuple(f.shape) for f in features] == [(2, 16, 56, 80), (2, 32, 28, 40), (2, 48, 14, 20), (2, 64, 7, 10)]
    np.testing.assert_allclose(embedding.numpy(), arrays["embedding_224x320"], atol=TOLERANCE)
    with pytest.raises(ValueError, match="output must be one of"):
        model.output = "boxes"


def test_batch_is_the_only_dynamic_size():
    model = create_model("svt-s", img_size=64 * 3 + 32)  # 224
    with torch.no_grad():
        for batch in (1, 3):
            assert model(torch.zeros(batch, 3, 224, 224)).shape == (batch, 1000)


def test_random_weights_are_seeded():
    a = create_model(tiny_config("tiny-svt"), weights="random", seed=3).state_dict()
    b = create_model(tiny_config("tiny-svt"), weights="random", seed=3).state_dict()
    c = create_model(tiny_config("tiny-svt"), weights="random", seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["head.weight"], c["head.weight"])


@pytest.mark.parametrize("text, size", [("224", (224, 224)), ("224x320", (224, 320)), (288, (288, 288)),
                                        ((256, 512), (256, 512))])
def test_sizes_parse(text, size):
    assert to_size(text) == size


@pytest.mark.parametrize("bad", ["225", "224x", "abc", "0", (224, 100)])
def test_bad_sizes_are_usage_errors(bad):
    with pytest.raises(UsageError, match="multiples of 32|look like"):
        create_model(tiny_config("tiny-svt"), img_size=bad)


@pytest.mark.parametrize("size, dim", [((8, 8), 32), ((8, 8), 8)])
def test_peg_residual_order_is_exact(size, dim):
    """The PEG adds its residual in token order where h < C and on the NCHW map otherwise: the same sums bit for bit."""
    from twins_deploy.models.twins import PosConv

    torch.manual_seed(0)
    peg = PosConv(dim, size).eval()
    x = torch.randn(2 * size[0] * size[1], dim)
    feat = x.reshape(-1, *size, dim).permute(0, 3, 1, 2)
    with torch.no_grad():
        expected = (peg.proj(feat) + feat).permute(0, 2, 3, 1).reshape(-1, dim)
        assert torch.equal(peg(x), expected)
