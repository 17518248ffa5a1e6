"""vit-pytorch's ``TwinsSVT`` (lucidrains/vit-pytorch, ``vit_pytorch/twins_svt.py``) with static shapes.

The architecture differs from timm's Twins: every stage runs a Transformer of depth 1, a PEG and a
Transformer of the stage's depth; a layer is local attention in 7x7 windows, a feed-forward, global
attention whose keys/values come from a k x k strided conv, and a second feed-forward (the last
stage has no local half); attention is always 8 heads x 64 with no q/kv bias; patch embeddings and
every block carry channel LayerNorms (eps 1e-5, written as mean/var); GELU is exact; no final norm.

As in ``twins.py`` the input size is fixed when the model is built: every reshape target is a
Python int, the batch is the only size read at run time, and the tokens travel as one
(batch * tokens, channels) matrix so each projection is one Gemm. Inside, the weights are kept in
that fast layout (1x1 convs as Linear weights, q and kv as one qkv matrix, k x k convs as patch
Gemms); ``state_dict()`` and ``load_state_dict()`` speak vit-pytorch's keys and shapes, so a
vit-pytorch state_dict loads as it is. ``StaticTwinsSVT`` is shared with vit-flax's port.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from twins_deploy.models.base import DeployableModel
from twins_deploy.models.registry import Family, ModelSpec, register
from twins_deploy.models.weights import load_torch_file, unwrap_state_dict

HEADS, DIM_HEAD, MLP_MULT = 8, 64, 4  # fixed by both libraries' TwinsSVT
NORM_EPS = 1e-5
STAGES = 4


@dataclass(frozen=True)
class TwinsSVTArgs:
    """The constructor arguments both libraries' ``TwinsSVT`` take (each family subclasses it)."""

    num_classes: int = 1000
    s1_emb_dim: int = 64
    s1_patch_size: int = 4
    s1_local_patch_size: int = 7
    s1_global_k: int = 7
    s1_depth: int = 1
    s2_emb_dim: int = 128
    s2_patch_size: int = 2
    s2_local_patch_size: int = 7
    s2_global_k: int = 7
    s2_depth: int = 1
    s3_emb_dim: int = 256
    s3_patch_size: int = 2
    s3_local_patch_size: int = 7
    s3_global_k: int = 7
    s3_depth: int = 5
    s4_emb_dim: int = 512
    s4_patch_size: int = 2
    s4_local_patch_size: int = 7
    s4_global_k: int = 7
    s4_depth: int = 4
    peg_kernel_size: int = 3
    dropout: float = 0.0  # inference runs without dropout

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "dropout":
                if not isinstance(value, (int, float)) or not 0 <= value < 1:
                    raise ValueError(f"dropout must be a rate in [0, 1), got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{f.name} must be a positive integer, got {value!r}")

    def stage(self, index: int, key: str) -> int:
        """One per-stage argument: ``stage(0, "emb_dim")`` is ``s1_emb_dim``."""
        return getattr(self, f"s{index + 1}_{key}")


@dataclass(frozen=True)
class TwinsSVTConfig(TwinsSVTArgs):
    """vit-pytorch's ``TwinsSVT`` constructor arguments, with its defaults (num_classes: ImageNet's 1000)."""


@dataclass(frozen=True)
class Flavour:
    """What differs between the libraries' TwinsSVT, beyond their weight files."""

    gelu: str  # "none" (exact erf) or "tanh"
    norm_bias: bool  # LayerNorm with a bias
    embed_norms: bool  # LayerNorms before and after the patch projection
    first_depth_is_one: bool  # the Transformer before the PEG has depth 1 (else the stage's depth)
    peg_same_padding: bool  # XLA's SAME (even kernels pad more at the end) rather than k // 2


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fused: bool) -> torch.Tensor:
    """(batch, heads, tokens, d) attention; unfused: Q scaled first, the pattern TensorRT fuses."""
    if fused:
        return F.scaled_dot_product_attention(q, k, v)
    q = q * (q.shape[-1] ** -0.5)
    return torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v


class LocalAttention(nn.Module):
    """Pre-norm attention inside ws x ws windows, windows folded into the batch axis."""

    def __init__(self, dim: int, ws: int, size: tuple[int, int], norm_bias: bool):
        super().__init__()
        self.dim, self.ws, self.size = dim, ws, size
        self.fused_attn = True
        self.norm = nn.LayerNorm(dim, eps=NORM_EPS, bias=norm_bias)
        self.qkv = nn.Linear(dim, 3 * HEADS * DIM_HEAD, bias=False)
        self.proj = nn.Linear(HEADS * DIM_HEAD, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B*h*w, C) tokens in, the residual branch's (B*h*w, C) out."""
        (h, w), ws = self.size, self.ws
        qkv = self.qkv(self.norm(x)).reshape(-1, h // ws, ws, w // ws, ws, 3, HEADS, DIM_HEAD)
        # (windows, 3 * heads, ws*ws, d): q, k and v come out of one Split on the head axis
        qkv = qkv.permute(0, 1, 3, 5, 6, 2, 4, 7).reshape(-1, 3 * HEADS, ws * ws, DIM_HEAD)
        x = _attend(*qkv.split(HEADS, dim=1), self.fused_attn)
        x = x.reshape(-1, h // ws, w // ws, HEADS, ws, ws, DIM_HEAD).permute(0, 1, 4, 2, 5, 3, 6)
        return self.proj(x.reshape(-1, HEADS * DIM_HEAD))


class GlobalAttention(nn.Module):
    """Pre-norm attention of every token to keys/values of a k x k strided conv, run as a patch Gemm."""

    def __init__(self, dim: int, k: int, size: tuple[int, int], norm_bias: bool):
        super().__init__()
        self.dim, self.k, self.size = dim, k, size
        self.fused_attn = True
        self.norm = nn.LayerNorm(dim, eps=NORM_EPS, bias=norm_bias)
        self.q = nn.Linear(dim, HEADS * DIM_HEAD, bias=False)
        self.kv = nn.Linear(k * k * dim, 2 * HEADS * DIM_HEAD, bias=False)  # columns in (kh, kw, c) order
        self.proj = nn.Linear(HEADS * DIM_HEAD, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (h, w), k, c = self.size, self.k, self.dim
        x = self.norm(x)
        q = self.q(x).reshape(-1, h * w, HEADS, DIM_HEAD).transpose(1, 2)
        if k > 1:
            x = x.reshape(-1, h // k, k, w // k, k * c).permute(0, 1, 3, 2, 4).reshape(-1, k * k * c)
        kv = self.kv(x).reshape(-1, (h // k) * (w // k), 2 * HEADS, DIM_HEAD).transpose(1, 2)
        x = _attend(q, *kv.split(HEADS, dim=1), self.fused_attn)
        return self.proj(x.transpose(1, 2).reshape(-1, HEADS * DIM_HEAD))


class FeedForward(nn.Module):
    def __init__(self, dim: int, norm_bias: bool, gelu: str):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=NORM_EPS, bias=norm_bias)
        self.fc1 = nn.Linear(dim, dim * MLP_MULT)
        self.act = nn.GELU(approximate=gelu)
        self.fc2 = nn.Linear(dim * MLP_MULT, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class Layer(nn.Module):
    """local attention -> feed-forward -> global attention -> feed-forward, each a residual branch."""

    def __init__(self, dim: int, ws: int, k: int, size: tuple[int, int], has_local: bool, flavour: Flavour):
        super().__init__()
        bias, gelu = flavour.norm_bias, flavour.gelu
        self.local_attn = LocalAttention(dim, ws, size, bias) if has_local else None
        self.local_mlp = FeedForward(dim, bias, gelu) if has_local else None
        self.global_attn = GlobalAttention(dim, k, size, bias)
        self.global_mlp = FeedForward(dim, bias, gelu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.local_attn is not None:
            x = x + self.local_attn(x)
            x = x + self.local_mlp(x)
        x = x + self.global_attn(x)
        return x + self.global_mlp(x)


class PatchEmbedding(nn.Module):
    """p x p patches as (p1, p2, c) vectors -> [LayerNorm] -> Linear -> [LayerNorm], tokens out.

    The libraries flatten a patch as (c, p1, p2); (p1, p2, c) moves whole channel rows instead of
    single values, and the weights are permuted to match when they are loaded.
    """

    def __init__(self, dim_in: int, dim: int, patch: int, size: tuple[int, int], flavour: Flavour):
        super().__init__()
        self.dim_in, self.dim, self.patch, self.size = dim_in, dim, patch, size  # size: the output map
        vector = patch * patch * dim_in
        self.norm_in = nn.LayerNorm(vector, eps=NORM_EPS) if flavour.embed_norms else None
        self.proj = nn.Linear(vector, dim)
        self.norm = nn.LayerNorm(dim, eps=NORM_EPS) if flavour.embed_norms else None

    def forward(self, x: torch.Tensor, image: bool) -> torch.Tensor:
        """An NCHW image or (B*H*W, C) tokens in, (B*h*w, dim) tokens out."""
        (h, w), p, c = self.size, self.patch, self.dim_in
        if image:
            x = x.reshape(-1, c, h, p, w, p).permute(0, 2, 4, 3, 5, 1)
        else:
            x = x.reshape(-1, h, p, w, p * c).permute(0, 1, 3, 2, 4)
        x = x.reshape(-1, p * p * c)
        if self.norm_in is not None:
            x = self.norm_in(x)
        x = self.proj(x)
        return self.norm(x) if self.norm is not None else x


class PEG(nn.Module):
    """Depthwise conv over the token map plus a residual."""

    def __init__(self, dim: int, kernel: int, size: tuple[int, int], same_padding: bool):
        super().__init__()
        self.dim, self.size = dim, size
        self.proj = nn.Conv2d(dim, dim, kernel, padding="same" if same_padding else kernel // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (h, w), c = self.size, self.dim
        feat = x.reshape(-1, h, w, c).permute(0, 3, 1, 2)
        return (self.proj(feat) + feat).permute(0, 2, 3, 1).reshape(-1, c)


class Stage(nn.Module):
    def __init__(self, embed: PatchEmbedding, before: list[Layer], peg: PEG, after: list[Layer]):
        super().__init__()
        self.embed, self.peg = embed, peg
        self.before, self.after = nn.ModuleList(before), nn.ModuleList(after)

    def forward(self, x: torch.Tensor, image: bool) -> torch.Tensor:
        x = self.embed(x, image)
        for layer in self.before:
            x = layer(x)
        x = self.peg(x)
        for layer in self.after:
            x = layer(x)
        return x


def stage_sizes(config: TwinsSVTArgs, img_size: tuple[int, int], flavour: Flavour) -> list[tuple[int, int]]:
    """Each stage's map, or a ValueError naming the argument whose size does not divide."""
    if flavour.peg_same_padding is False and config.peg_kernel_size % 2 == 0:
        raise ValueError(f"peg_kernel_size {config.peg_kernel_size} must be odd: vit-pytorch pads k // 2, so an "
                         "even kernel changes the map size")
    sizes, size = [], img_size
    where = f"at --img-size {img_size[0]}x{img_size[1]}"
    for i in range(STAGES):
        patch = config.stage(i, "patch_size")
        if size[0] % patch or size[1] % patch:
            raise ValueError(f"s{i + 1}_patch_size {patch} does not divide the stage-{i + 1} input "
                             f"{size[0]}x{size[1]} {where}")
        size = (size[0] // patch, size[1] // patch)
        for key in ("local_patch_size", "global_k") if i < STAGES - 1 else ("global_k",):
            value = config.stage(i, key)
            if size[0] % value or size[1] % value:
                raise ValueError(f"s{i + 1}_{key} {value} does not divide the stage-{i + 1} map "
                                 f"{size[0]}x{size[1]} {where}")
        sizes.append(size)
    return sizes


class StaticTwinsSVT(DeployableModel):
    """The TwinsSVT of both libraries for one fixed input size; ``output``: logits or the pooled embedding."""

    flavour: Flavour
    outputs = ("logits", "embedding")

    def __init__(self, config: TwinsSVTArgs, img_size: int | tuple[int, int] | str = 224,
                 output: str = "logits", spec: ModelSpec | None = None):
        super().__init__(config, img_size, output, spec, self.family_name)
        self.stage_sizes = stage_sizes(config, self.img_size, self.flavour)
        self.num_features = config.s4_emb_dim
        stages, dim_in = [], 3
        for i, size in enumerate(self.stage_sizes):
            dim, has_local = config.stage(i, "emb_dim"), i < STAGES - 1
            ws, k, depth = config.stage(i, "local_patch_size"), config.stage(i, "global_k"), config.stage(i, "depth")

            def layers(count: int) -> list[Layer]:
                return [Layer(dim, ws, k, size, has_local, self.flavour) for _ in range(count)]
            stages.append(Stage(PatchEmbedding(dim_in, dim, config.stage(i, "patch_size"), size, self.flavour),
                                layers(1 if self.flavour.first_depth_is_one else depth),
                                PEG(dim, config.peg_kernel_size, size, self.flavour.peg_same_padding), layers(depth)))
            dim_in = dim
        self.stages = nn.ModuleList(stages)
        self.head = nn.Linear(self.num_features, config.num_classes)

    def forward_embedding(self, x: torch.Tensor) -> torch.Tensor:
        for i, stage in enumerate(self.stages):
            x = stage(x, image=i == 0)
        h, w = self.stage_sizes[-1]
        return x.reshape(-1, h * w, self.num_features).mean(dim=1)


def patch_columns_to_ours(weight: torch.Tensor, dim_in: int, patch: int) -> torch.Tensor:
    """Patch-vector axis (last) from the libraries' (c, p1, p2) order to ours (p1, p2, c)."""
    lead = weight.shape[:-1]
    return weight.reshape(*lead, dim_in, patch, patch).movedim(-3, -1).reshape(*lead, -1)


def patch_columns_to_theirs(weight: torch.Tensor, dim_in: int, patch: int) -> torch.Tensor:
    lead = weight.shape[:-1]
    return weight.reshape(*lead, patch, patch, dim_in).movedim(-1, -3).reshape(*lead, -1)


# ----------------------------------------------------------------------------------------------
# vit-pytorch's keys: state_dict() and load_state_dict() speak them


@dataclass(frozen=True)
class KeyRule:
    """One of our parameters and the vit-pytorch tensors it is made of."""

    ours: str
    theirs: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]  # vit-pytorch's shapes of ``theirs``
    to_ours: Callable[..., torch.Tensor]
    to_theirs: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]


def _reshaped(ours: str, theirs: str, shape: tuple[int, ...], our_shape: tuple[int, ...]) -> KeyRule:
    """A 1x1 conv as a Linear, a (1, C, 1, 1) channel-norm gain as a LayerNorm's (C,)."""
    return KeyRule(ours, (theirs,), (shape,), lambda t: t.reshape(our_shape), lambda t: (t.reshape(shape),))


def vit_pytorch_rules(model: StaticTwinsSVT) -> list[KeyRule]:
    """Every parameter of ``model`` against vit-pytorch's ``TwinsSVT`` keys for the same config."""
    rules: list[KeyRule] = []
    inner = HEADS * DIM_HEAD
    for i, stage in enumerate(model.stages):
        embed, ours, theirs = stage.embed, f"stages.{i}.", f"layers.{i}."
        c, p, dim = embed.dim_in, embed.patch, embed.dim
        vector = p * p * c
        for leaf, key in (("weight", "g"), ("bias", "b")):
            rules.append(KeyRule(f"{ours}embed.norm_in.{leaf}", (f"{theirs}0.proj.0.{key}",), ((1, vector, 1, 1),),
                                 lambda t, c=c, p=p: patch_columns_to_ours(t.reshape(-1), c, p),
                                 lambda t, c=c, p=p: (patch_columns_to_theirs(t, c, p).reshape(1, -1, 1, 1),)))
        rules.append(KeyRule(f"{ours}embed.proj.weight", (f"{theirs}0.proj.1.weight",), ((dim, vector, 1, 1),),
                             lambda t, c=c, p=p: patch_columns_to_ours(t.flatten(1), c, p),
                             lambda t, c=c, p=p, s=(dim, vector, 1, 1): (patch_columns_to_theirs(t, c, p).reshape(s),)))
        rules.append(_reshaped(f"{ours}embed.proj.bias", f"{theirs}0.proj.1.bias", (dim,), (dim,)))
        for leaf, key in (("weight", "g"), ("bias", "b")):
            rules.append(_reshaped(f"{ours}embed.norm.{leaf}", f"{theirs}0.proj.2.{key}", (1, dim, 1, 1), (dim,)))
        for j, layer in enumerate(stage.before):
            rules += _layer_rules(f"{ours}before.{j}.", f"{theirs}1.layers.{j}.", layer, dim, inner)
        peg = tuple(stage.peg.proj.weight.shape)
        rules.append(_reshaped(f"{ours}peg.proj.weight", f"{theirs}2.proj.fn.weight", peg, peg))
        rules.append(_reshaped(f"{ours}peg.proj.bias", f"{theirs}2.proj.fn.bias", (dim,), (dim,)))
        for j, layer in enumerate(stage.after):
            rules += _layer_rules(f"{ours}after.{j}.", f"{theirs}3.layers.{j}.", layer, dim, inner)
    head = (model.num_classes, model.num_features)
    rules.append(_reshaped("head.weight", f"layers.{STAGES + 2}.weight", head, head))
    rules.append(_reshaped("head.bias", f"layers.{STAGES + 2}.bias", head[:1], head[:1]))
    return rules


def _layer_rules(ours: str, theirs: str, layer: Layer, dim: int, inner: int) -> list[KeyRule]:
    rules = []
    branches = (("local_attn", 0), ("local_mlp", 1)) if layer.local_attn is not None else ()
    for name, index in (*branches, ("global_attn", 2), ("global_mlp", 3)):
        mine, fn = f"{ours}{name}.", f"{theirs}{index}.fn."
        norm = f"{fn}norm." if name.endswith("attn") else f"{fn}net.0."
        for leaf, key in (("weight", "g"), ("bias", "b")):
            rules.append(_reshaped(f"{mine}norm.{leaf}", f"{norm}{key}", (1, dim, 1, 1), (dim,)))
        if name.endswith("mlp"):
            hidden = dim * MLP_MULT
            rules += [_reshaped(f"{mine}fc1.weight", f"{fn}net.1.weight", (hidden, dim, 1, 1), (hidden, dim)),
                      _reshaped(f"{mine}fc1.bias", f"{fn}net.1.bias", (hidden,), (hidden,)),
                      _reshaped(f"{mine}fc2.weight", f"{fn}net.4.weight", (dim, hidden, 1, 1), (dim, hidden)),
                      _reshaped(f"{mine}fc2.bias", f"{fn}net.4.bias", (dim,), (dim,))]
            continue
        if name == "local_attn":
            rules.append(KeyRule(f"{mine}qkv.weight", (f"{fn}to_q.weight", f"{fn}to_kv.weight"),
                                 ((inner, dim, 1, 1), (2 * inner, dim, 1, 1)),
                                 lambda q, kv: torch.cat([q.flatten(1), kv.flatten(1)]),
                                 lambda t: (t[:inner, :, None, None], t[inner:, :, None, None])))
        else:
            k = layer.global_attn.k
            rules.append(_reshaped(f"{mine}q.weight", f"{fn}to_q.weight", (inner, dim, 1, 1), (inner, dim)))
            rules.append(KeyRule(f"{mine}kv.weight", (f"{fn}to_kv.weight",), ((2 * inner, dim, k, k),),
                                 lambda t: t.permute(0, 2, 3, 1).flatten(1),
                                 lambda t, k=k: (t.reshape(2 * inner, k, k, dim).permute(0, 3, 1, 2),)))
        rules += [_reshaped(f"{mine}proj.weight", f"{fn}to_out.0.weight", (dim, inner, 1, 1), (dim, inner)),
                  _reshaped(f"{mine}proj.bias", f"{fn}to_out.0.bias", (dim,), (dim,))]
    return rules


class VitPytorchTwinsSVT(StaticTwinsSVT):
    """vit-pytorch's TwinsSVT: its state_dict keys and shapes outside, the fast layout inside."""

    family_name = "vit-pytorch/TwinsSVT"
    flavour = Flavour(gelu="none", norm_bias=True, embed_norms=True, first_depth_is_one=True,
                      peg_same_padding=False)

    def __init__(self, config: TwinsSVTConfig, img_size: int | tuple[int, int] | str = 224,
                 output: str = "logits", spec: ModelSpec | None = None):
        super().__init__(config, img_size, output, spec)
        self.key_rules = vit_pytorch_rules(self)
        self.register_state_dict_post_hook(_state_dict_to_vit_pytorch)
        self.register_load_state_dict_pre_hook(_state_dict_from_vit_pytorch)


def _state_dict_to_vit_pytorch(model: VitPytorchTwinsSVT, state_dict: dict, prefix: str, local_metadata) -> None:
    """Ours out, vit-pytorch's in, in the order vit-pytorch's modules list them."""
    converted = [rule.to_theirs(state_dict.pop(prefix + rule.ours)) for rule in model.key_rules]
    for rule, tensors in zip(model.key_rules, converted):
        for key, tensor in zip(rule.theirs, tensors):
            state_dict[prefix + key] = tensor.contiguous()


def _state_dict_from_vit_pytorch(model: VitPytorchTwinsSVT, state_dict: dict, prefix: str, *args) -> None:
    """vit-pytorch's keys in place of ours (a key absent or of another shape is left for strict loading)."""
    for rule in model.key_rules:
        keys = [prefix + key for key in rule.theirs]
        if all(key in state_dict and tuple(state_dict[key].shape) == shape for key, shape in zip(keys, rule.shapes)):
            state_dict[prefix + rule.ours] = rule.to_ours(*(state_dict.pop(key) for key in keys))


# ----------------------------------------------------------------------------------------------
# Checkpoints


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A vit-pytorch TwinsSVT state_dict (plain, nested under model/state_dict, DDP's ``module.``)."""
    return unwrap_state_dict(load_torch_file(path))


def implied_config(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[int, str]]:
    """The constructor arguments a vit-pytorch TwinsSVT state_dict implies, each with the key that says so."""
    found: dict[str, tuple[int, str]] = {}
    dim_in = 3
    for i in range(STAGES):
        proj = f"layers.{i}.0.proj.1.weight"
        if proj not in state_dict:
            break
        dim, vector = state_dict[proj].shape[:2]
        found[f"s{i + 1}_emb_dim"] = (dim, proj)
        found[f"s{i + 1}_patch_size"] = (math.isqrt(vector // dim_in), proj)
        kv = f"layers.{i}.1.layers.0.2.fn.to_kv.weight"
        if kv in state_dict:
            found[f"s{i + 1}_global_k"] = (state_dict[kv].shape[-1], kv)
        layers = {int(key.split(".")[4]) for key in state_dict if key.startswith(f"layers.{i}.3.layers.")}
        found[f"s{i + 1}_depth"] = (max(layers) + 1 if layers else 0, f"layers.{i}.3.layers.*")
        dim_in = dim
    if "layers.0.2.proj.fn.weight" in state_dict:
        found["peg_kernel_size"] = (state_dict["layers.0.2.proj.fn.weight"].shape[-1], "layers.0.2.proj.fn.weight")
    head = f"layers.{STAGES + 2}.weight"
    if head in state_dict:
        found["num_classes"] = (state_dict[head].shape[0], head)
    return found


def explain_config_mismatch(config, found: dict[str, tuple[int, str]], shape_of: Callable[[str], str],
                            origin: str, family: str) -> str | None:
    """The first constructor argument a checkpoint contradicts, the key that says so, and what to pass."""
    for key, (value, evidence) in found.items():
        if getattr(config, key) == value:
            continue
        fix = f"pass --num-classes {value}" if key == "num_classes" else f"pass --config with {key} {value}"
        return (f"{origin} has {key} {value} ({evidence}{shape_of(evidence)}), the config says "
                f"{getattr(config, key)}: {fix} to load it as {family}")
    return None


def explain_mismatch(model: VitPytorchTwinsSVT, state_dict: dict[str, torch.Tensor], origin: str) -> str | None:
    """Name the parameter and the constructor argument it implies when a file does not fit the config."""
    if not any(key.startswith("layers.") for key in state_dict):
        first = next(iter(state_dict), "nothing")
        return (f"{origin} is no vit-pytorch TwinsSVT state_dict (its first key is {first!r}, "
                "vit-pytorch's are layers.*)")

    def shape_of(key: str) -> str:
        return f" is {tuple(state_dict[key].shape)}" if key in state_dict else ""
    return explain_config_mismatch(model.config, implied_config(state_dict), shape_of, origin, model.spec.name)


SPEC = ModelSpec("vit-pytorch/TwinsSVT", TwinsSVTConfig(), aliases=("vit-pytorch-twins-svt",),
                 family=VitPytorchTwinsSVT.family_name)

register(Family(VitPytorchTwinsSVT.family_name, "vit-pytorch", VitPytorchTwinsSVT, TwinsSVTConfig, read_checkpoint,
                "vit-pytorch TwinsSVT state_dict (.pt, .pth, .bin, .safetensors)", StaticTwinsSVT.outputs,
                explain_mismatch),
         SPEC)
