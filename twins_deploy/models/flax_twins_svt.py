"""vit-flax's ``TwinsSVT`` (conceptofmind/vit-flax, ``vit_flax/twins_svt.py``) with static shapes.

The Flax port of vit-pytorch's TwinsSVT, and not weight-compatible with it: every stage runs a
Transformer of the stage's full depth both before and after the PEG; the pre-norms are
``nn.LayerNorm(epsilon=1e-5, use_bias=False)``; the patch embedding is a bare 1x1 conv over
(c, p1, p2) patch vectors (no norms); ``nn.gelu`` is the tanh approximation; the PEG and the
k x k key/value conv pad XLA's way (SAME). The forward is ``StaticTwinsSVT``'s, shared with the
vit-pytorch family; this module holds the config and the reading of Flax msgpack files
(``flax.serialization.to_bytes(variables)``, read without jax or flax) into our keys.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from twins_deploy.errors import TwinsDeployError, UsageError
from twins_deploy.models.flax_msgpack import flax_to_torch, is_flax_file, read_flax_msgpack
from twins_deploy.models.registry import Family, ModelSpec, register
from twins_deploy.models.vit_pytorch_twins_svt import (
    STAGES, Flavour, StaticTwinsSVT, TwinsSVTArgs, explain_config_mismatch, patch_columns_to_ours,
)


@dataclass(frozen=True)
class FlaxTwinsSVTConfig(TwinsSVTArgs):
    """vit-flax's ``TwinsSVT`` fields, with its defaults (num_classes: ImageNet's 1000)."""


class FlaxTwinsSVT(StaticTwinsSVT):
    family_name = "vit-flax/TwinsSVT"
    flavour = Flavour(gelu="tanh", norm_bias=False, embed_norms=False, first_depth_is_one=False,
                      peg_same_padding=True)


# ----------------------------------------------------------------------------------------------
# Flax msgpack -> our keys


@dataclass(frozen=True)
class FlaxRule:
    ours: str
    flax: tuple[str, ...]
    convert: Callable[..., torch.Tensor]


def _dense(ours: str, flax: str) -> FlaxRule:
    """A Dense, or a 1x1 Conv used as one, (..., in, out) -> Linear weight (out, in)."""
    return FlaxRule(ours, (flax,), lambda a: torch.from_numpy(np.ascontiguousarray(a.reshape(-1, a.shape[-1]).T)))


def _same(ours: str, flax: str) -> FlaxRule:
    return FlaxRule(ours, (flax,), lambda a, name=flax: flax_to_torch(name, a))


def _layer_rules(ours: str, scope: str, j: int, has_local: bool) -> list[FlaxRule]:
    """One layer of a Flax ``Transformer``: modules are auto-named in the order they are built."""
    norms = 4 if has_local else 2
    branches = []
    if has_local:
        branches += [("local_attn", f"LocalAttention_{j}", f"PreNorm_{4 * j}"),
                     ("local_mlp", f"MLP_{2 * j}", f"PreNorm_{4 * j + 1}")]
    branches += [("global_attn", f"GlobalAttention_{j}", f"PreNorm_{norms * j + norms - 2}"),
                 ("global_mlp", f"MLP_{2 * j + 1 if has_local else j}", f"PreNorm_{norms * j + norms - 1}")]
    rules = []
    for name, module, norm in branches:
        mine, theirs = f"{ours}{name}.", f"{scope}/{module}/"
        rules.append(_same(f"{mine}norm.weight", f"{scope}/{norm}/LayerNorm_0/scale"))
        if name.endswith("mlp"):
            for index, fc in enumerate(("fc1", "fc2")):
                rules += [_dense(f"{mine}{fc}.weight", f"{theirs}Conv_{index}/kernel"),
                          _same(f"{mine}{fc}.bias", f"{theirs}Conv_{index}/bias")]
            continue
        if name == "local_attn":
            rules.append(FlaxRule(f"{mine}qkv.weight", (f"{theirs}Conv_0/kernel", f"{theirs}Conv_1/kernel"),
                                  lambda q, kv: torch.from_numpy(np.ascontiguousarray(np.concatenate(
                                      [q.reshape(-1, q.shape[-1]), kv.reshape(-1, kv.shape[-1])], axis=1).T))))
        else:  # the k x k conv as a patch Gemm: (kh, kw, c, out) -> (out, kh * kw * c)
            rules += [_dense(f"{mine}q.weight", f"{theirs}Conv_0/kernel"),
                      _dense(f"{mine}kv.weight", f"{theirs}Conv_1/kernel")]
        rules += [_dense(f"{mine}proj.weight", f"{theirs}Conv_2/kernel"),
                  _same(f"{mine}proj.bias", f"{theirs}Conv_2/bias")]
    return rules


def flax_rules(arrays: dict[str, np.ndarray]) -> list[FlaxRule]:
    """Our parameters against a vit-flax TwinsSVT file's paths; layer counts come from the file."""
    rules, dim_in = [], 3
    for i in range(STAGES):
        embed = f"PatchEmbedding_{i}/Conv_0/"
        rules.append(FlaxRule(f"stages.{i}.embed.proj.weight", (f"{embed}kernel",),
                              lambda a, c=dim_in: patch_columns_to_ours(
                                  torch.from_numpy(np.ascontiguousarray(a.reshape(-1, a.shape[-1]).T)), c,
                                  math.isqrt(a.shape[-2] // c))))
        rules += [_same(f"stages.{i}.embed.proj.bias", f"{embed}bias"),
                  _same(f"stages.{i}.peg.proj.weight", f"PEG_{i}/Conv_0/kernel"),
                  _same(f"stages.{i}.peg.proj.bias", f"PEG_{i}/Conv_0/bias")]
        for part, t in (("before", 2 * i), ("after", 2 * i + 1)):
            scope = f"Transformer_{t}"
            layers = {int(m.group(1)) for name in arrays if (m := re.match(rf"{scope}/GlobalAttention_(\d+)/", name))}
            for j in range(max(layers) + 1 if layers else 0):
                rules += _layer_rules(f"stages.{i}.{part}.{j}.", scope, j, has_local=i < STAGES - 1)
        if f"{embed}bias" in arrays:
            dim_in = arrays[f"{embed}bias"].shape[0]
    rules += [_dense("head.weight", "Dense_0/kernel"), _same("head.bias", "Dense_0/bias")]
    return rules


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A vit-flax TwinsSVT ``flax.serialization.to_bytes(variables)`` file, in our keys.

    Every array of the file must become a parameter: a path no rule takes is an error that names it.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint not found: {path}")
    if not is_flax_file(path):
        raise UsageError(f"{path} is a PyTorch checkpoint, not a Flax msgpack one: load it with "
                         "--model vit-pytorch/TwinsSVT (a vit-pytorch state_dict) or convert it")
    arrays = read_flax_msgpack(path)
    state_dict, used = {}, set()
    for rule in flax_rules(arrays):
        if all(name in arrays for name in rule.flax):
            state_dict[rule.ours] = rule.convert(*(arrays[name] for name in rule.flax))
            used.update(rule.flax)
    unused = sorted(set(arrays) - used)
    if unused:
        raise TwinsDeployError(f"checkpoint {path.name} holds {unused[0]} {tuple(arrays[unused[0]].shape)}, which no "
                               f"vit-flax TwinsSVT parameter takes ({len(unused)} such arrays): is it a TwinsSVT file?")
    return state_dict


def implied_config(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[int, str]]:
    """The constructor arguments a file (read into our keys) implies, each with the Flax path and shape that say so."""
    found: dict[str, tuple[int, str]] = {}
    dim_in = 3
    for i in range(STAGES):
        proj = state_dict.get(f"stages.{i}.embed.proj.weight")
        if proj is None:
            break
        dim, vector = proj.shape
        evidence = f"PatchEmbedding_{i}/Conv_0/kernel is {(1, 1, vector, dim)}"
        found[f"s{i + 1}_emb_dim"] = (dim, evidence)
        found[f"s{i + 1}_patch_size"] = (math.isqrt(vector // dim_in), evidence)
        kv = state_dict.get(f"stages.{i}.before.0.global_attn.kv.weight")
        if kv is not None:
            k = math.isqrt(kv.shape[1] // dim)
            found[f"s{i + 1}_global_k"] = (k, f"Transformer_{2 * i}/GlobalAttention_0/Conv_1/kernel is "
                                              f"{(k, k, dim, kv.shape[0])}")
        depth = len({key.split(".")[3] for key in state_dict if key.startswith(f"stages.{i}.after.")})
        found[f"s{i + 1}_depth"] = (depth, f"Transformer_{2 * i + 1} has {depth} GlobalAttention layers")
        dim_in = dim
    peg = state_dict.get("stages.0.peg.proj.weight")
    if peg is not None:
        k = peg.shape[-1]
        found["peg_kernel_size"] = (k, f"PEG_0/Conv_0/kernel is {(k, k, 1, peg.shape[0])}")
    head = state_dict.get("head.weight")
    if head is not None:
        found["num_classes"] = (head.shape[0], f"Dense_0/kernel is {(head.shape[1], head.shape[0])}")
    return found


def explain_mismatch(model: FlaxTwinsSVT, state_dict: dict[str, torch.Tensor], origin: str) -> str | None:
    """Name the Flax parameter and the constructor argument it implies when a file does not fit the config."""
    return explain_config_mismatch(model.config, implied_config(state_dict), lambda evidence: "", origin,
                                   model.spec.name)


SPEC = ModelSpec("vit-flax/TwinsSVT", FlaxTwinsSVTConfig(), aliases=("flax-twins-svt",),
                 family=FlaxTwinsSVT.family_name)

register(Family(FlaxTwinsSVT.family_name, "vit-flax", FlaxTwinsSVT, FlaxTwinsSVTConfig, read_checkpoint,
                "Flax msgpack (flax.serialization.to_bytes of the variables)", StaticTwinsSVT.outputs,
                explain_mismatch),
         SPEC)
