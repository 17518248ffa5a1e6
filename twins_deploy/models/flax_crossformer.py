"""vit-flax's CrossFormer (``vit_flax/crossformer.py``) with static shapes, read from Flax msgpack weights.

Four stages, each a cross-scale embedding (convolutions of several kernel sizes with Flax's 'SAME'
padding, concatenated on channels) and layers of short-distance attention (inside local windows),
MLP, long-distance attention (over tokens a stride apart), MLP. Between the embeddings the tokens
travel as one (batch * h * w, channels) matrix: the 1x1 convolutions are Gemms.

The dynamic position bias is an MLP over relative positions that does not depend on the input: at
a fixed window size it is a (window^2, window^2) table, computed once when the weights are set
(``init_weights`` and after every ``load_state_dict``) and exported as a constant added to the
attention scores. The MLP's parameters stay in the model, so Flax files load strictly and the
state_dict round-trips. Change them in place only through ``load_state_dict`` (or call
``refresh_position_bias``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from twins_deploy.models.base import DeployableModel
from twins_deploy.models.flax_blocks import (
    attend, count_indexed, explain_config_mismatch, gelu_tanh, read_flax_file, rename_flax, shape_of,
)
from twins_deploy.models.registry import Family, ModelSpec, register

NORM_EPS = 1e-5
DIM_HEAD = 32  # fixed by vit-flax's CrossFormer
FAMILY = "vit-flax/CrossFormer"
OUTPUTS = ("logits", "embedding")


@dataclass(frozen=True)
class FlaxCrossFormerConfig:
    """vit-flax ``CrossFormer``'s constructor arguments, with its defaults. An int where a per-stage
    tuple is expected means the same value for all four stages (vit-flax's ``cast_tuple``)."""

    dim: int | tuple[int, ...] = (64, 128, 256, 512)
    depth: int | tuple[int, ...] = (2, 2, 8, 2)
    global_window_size: int | tuple[int, ...] = (8, 4, 2, 1)
    local_window_size: int | tuple[int, ...] = 7
    cross_embed_kernel_sizes: tuple[tuple[int, ...], ...] = ((4, 8, 16, 32), (2, 4), (2, 4), (2, 4))
    cross_embed_strides: int | tuple[int, ...] = (4, 2, 2, 2)
    num_classes: int = 1000
    attn_dropout: float = 0.0
    ff_dropout: float = 0.0

    def stages(self) -> list[dict]:
        """The four stages' settings, as vit-flax casts them."""
        def per_stage(value, key):
            value = value if isinstance(value, tuple) else (value,) * 4
            if len(value) != 4:
                raise ValueError(f"{key} needs one value per stage (4), got {list(value)}")
            return value
        keys = ("dim", "depth", "global_window_size", "local_window_size", "cross_embed_kernel_sizes",
                "cross_embed_strides")
        columns = [per_stage(getattr(self, key), key) for key in keys]
        return [dict(zip(keys, row)) for row in zip(*columns)]


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """Flax/XLA 'SAME' padding (before, after) of one axis: the smaller half before."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class CrossEmbedLayer(nn.Module):
    """Convolutions of every kernel size (sorted), one stride, 'SAME' padding, outputs concatenated:
    the widths halve with each larger kernel, the last takes the rest. NCHW in and out."""

    def __init__(self, in_dim: int, dim: int, kernel_sizes: tuple[int, ...], stride: int, size: tuple[int, int]):
        super().__init__()
        kernels = sorted(kernel_sizes)
        widths = [int(dim / 2 ** i) for i in range(1, len(kernels))]
        widths.append(dim - sum(widths))
        self.convs = nn.ModuleList()
        self.pads = []
        for kernel, width in zip(kernels, widths):
            (top, bottom), (left, right) = (same_padding(s, kernel, stride) for s in size)
            symmetric = top == bottom and left == right
            self.convs.append(nn.Conv2d(in_dim, width, kernel, stride, padding=(top, left) if symmetric else 0))
            self.pads.append(None if symmetric else (left, right, top, bottom))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([conv(x if pad is None else F.pad(x, pad)) for conv, pad in zip(self.convs, self.pads)],
                         dim=1)


class DynamicPositionBias(nn.Module):
    """The bias MLP over (dy, dx) positions: 3 x (Dense, LayerNorm without bias, ReLU), Dense to 1."""

    def __init__(self, dim: int):
        super().__init__()
        layers = []
        for in_dim in (2, dim, dim):
            layers += [nn.Linear(in_dim, dim), nn.LayerNorm(dim, eps=NORM_EPS, bias=False), nn.ReLU()]
        self.mlp = nn.Sequential(*layers, nn.Linear(dim, 1))

    def table(self, window: int) -> torch.Tensor:
        """(window^2, window^2) score bias, indexed as vit-flax indexes it (its positions run from
        -window to window, its index strides by 2 * window - 1: kept as is)."""
        weight = self.mlp[0].weight
        pos = torch.arange(-window, window + 1, device=weight.device)
        positions = torch.stack(torch.meshgrid(pos, pos, indexing="ij")).reshape(2, -1).t()
        biases = self.mlp(positions.to(weight.dtype)).reshape(-1)
        steps = torch.arange(window, device=weight.device)
        grid = torch.stack(torch.meshgrid(steps, steps, indexing="ij")).reshape(2, -1).t()
        rel = grid[:, None] - grid[None, :] + window - 1
        return biases[rel[..., 0] * (2 * window - 1) + rel[..., 1]]


def _refresh_after_load(module: "CrossFormerAttention", incompatible_keys) -> None:
    module.refresh_position_bias()


class CrossFormerAttention(nn.Module):
    """Short ('short': inside window x window tiles) or long ('long': over the window x window
    tokens h/window apart) distance attention with the constant position bias; pre-LayerNorm."""

    def __init__(self, dim: int, kind: str, window: int, size: tuple[int, int]):
        super().__init__()
        self.dim, self.kind, self.window, self.size = dim, kind, window, size
        self.heads = dim // DIM_HEAD
        self.fused_attn = True
        inner = self.heads * DIM_HEAD
        self.norm = nn.LayerNorm(dim, eps=NORM_EPS)
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Linear(inner, dim)
        self.dpb = DynamicPositionBias(dim // 4)
        self.register_buffer("position_bias", torch.zeros(window * window, window * window), persistent=False)
        self.refresh_position_bias()
        self.register_load_state_dict_post_hook(_refresh_after_load)

    @torch.no_grad()
    def refresh_position_bias(self) -> None:
        """Recompute the bias table from the MLP's current weights (not on the meta device)."""
        if self.position_bias.is_meta or self.dpb.mlp[0].weight.is_meta:
            return
        self.position_bias.copy_(self.dpb.table(self.window))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B*h*w, C) in and out."""
        (h, w), ws, heads = self.size, self.window, self.heads
        qkv = self.to_qkv(self.norm(x))
        if self.kind == "short":  # (h s1) (w s2) -> windows (h w), tokens (s1 s2)
            qkv = qkv.reshape(-1, h // ws, ws, w // ws, ws, 3 * heads, DIM_HEAD).permute(0, 1, 3, 5, 2, 4, 6)
        else:  # (l1 h) (l2 w) -> windows (h w), tokens (l1 l2)
            qkv = qkv.reshape(-1, ws, h // ws, ws, w // ws, 3 * heads, DIM_HEAD).permute(0, 2, 4, 5, 1, 3, 6)
        q, k, v = qkv.reshape(-1, 3 * heads, ws * ws, DIM_HEAD).split(heads, dim=1)
        out = attend(q, k, v, self.fused_attn, self.position_bias)
        out = out.reshape(-1, h // ws, w // ws, heads, ws, ws, DIM_HEAD)
        out = out.permute(0, 1, 4, 2, 5, 3, 6) if self.kind == "short" else out.permute(0, 4, 1, 5, 2, 3, 6)
        return self.to_out(out.reshape(-1, heads * DIM_HEAD))


class MLP(nn.Module):
    """Channel LayerNorm, 1x1 conv to 4x, tanh GELU, 1x1 conv back (as Dense layers)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=NORM_EPS)
        self.fc1 = nn.Linear(dim, dim * mult)
        self.fc2 = nn.Linear(dim * mult, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu_tanh(self.fc1(self.norm(x))))


class CrossFormerLayer(nn.Module):
    def __init__(self, dim: int, local_window: int, global_window: int, size: tuple[int, int]):
        super().__init__()
        self.short_attn = CrossFormerAttention(dim, "short", local_window, size)
        self.short_mlp = MLP(dim)
        self.long_attn = CrossFormerAttention(dim, "long", global_window, size)
        self.long_mlp = MLP(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.short_attn(x) + x
        x = self.short_mlp(x) + x
        x = self.long_attn(x) + x
        return self.long_mlp(x) + x


class CrossFormerStage(nn.Module):
    def __init__(self, in_dim: int, stage: dict, in_size: tuple[int, int], index: int, img_size: tuple[int, int]):
        super().__init__()
        stride, dim = stage["cross_embed_strides"], stage["dim"]
        self.dim = dim
        self.size = (math.ceil(in_size[0] / stride), math.ceil(in_size[1] / stride))
        for key in ("local_window_size", "global_window_size"):
            window = stage[key]
            if self.size[0] % window or self.size[1] % window:
                raise ValueError(f"{key} {window} does not divide the stage-{index + 1} map "
                                 f"{self.size[0]}x{self.size[1]} at --img-size {img_size[0]}x{img_size[1]}")
        if dim % DIM_HEAD:
            raise ValueError(f"dim {dim} of stage {index + 1} is not a multiple of the head width {DIM_HEAD}")
        self.embed = CrossEmbedLayer(in_dim, dim, stage["cross_embed_kernel_sizes"], stride, in_size)
        self.layers = nn.ModuleList(CrossFormerLayer(dim, stage["local_window_size"], stage["global_window_size"],
                                                     self.size) for _ in range(stage["depth"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """NCHW in and out."""
        (h, w), c = self.size, self.dim
        x = self.embed(x).permute(0, 2, 3, 1).reshape(-1, c)
        for layer in self.layers:
            x = layer(x)
        return x.reshape(-1, h, w, c).permute(0, 3, 1, 2)


class FlaxCrossFormer(DeployableModel):
    """CrossFormer for one fixed input size; ``output`` is ``logits`` or ``embedding`` (mean-pooled)."""

    def __init__(self, config: FlaxCrossFormerConfig, img_size: int | tuple[int, int] = 224,
                 output: str = "logits", spec: ModelSpec | None = None):
        super().__init__(config, img_size, output, spec, FAMILY)
        stages, size, in_dim = config.stages(), self.img_size, 3
        self.stages = nn.ModuleList()
        for index, stage in enumerate(stages):
            self.stages.append(CrossFormerStage(in_dim, stage, size, index, self.img_size))
            size, in_dim = self.stages[-1].size, stage["dim"]
        self.num_features = in_dim
        self.head = nn.Linear(in_dim, config.num_classes)

    def forward_embedding(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels
        for stage in self.stages:
            x = stage(x)
        (h, w), c = self.stages[-1].size, self.num_features
        return x.permute(0, 2, 3, 1).reshape(-1, h * w, c).mean(dim=1)

    def init_weights(self, seed: int = 0) -> None:
        """The shared seeded initialisation, then the position-bias tables from the new MLP weights."""
        super().init_weights(seed)
        for module in self.modules():
            if isinstance(module, CrossFormerAttention):
                module.refresh_position_bias()


# ----------------------------------------------------------------------------------------------
# Flax checkpoints. In Transformer_s, Attention_{2i}/MLP_{2i} are layer i's short-distance pair and
# _{2i+1} its long-distance pair; 1x1 Conv kernels become Dense weights, the channel LayerNorm's
# (1, 1, 1, C) ``g``/``b`` plain vectors.


def _param(leaf: str) -> str:
    return "bias" if leaf in ("bias", "b") else "weight"


def _block(m, kind: str) -> str:
    return f"stages.{m[1]}.layers.{int(m[2]) // 2}.{'long' if int(m[2]) % 2 else 'short'}_{kind}"


_ATTN = r"Transformer_(\d)/Attention_(\d+)"
_MLP = r"Transformer_(\d)/MLP_(\d+)"

RULES = [
    (r"CrossEmbedLayer_(\d)/Conv_(\d+)/(kernel|bias)", lambda m: f"stages.{m[1]}.embed.convs.{m[2]}.{_param(m[3])}"),
    (r"Dense_0/(kernel|bias)", lambda m: f"head.{_param(m[1])}"),
    (_ATTN + r"/Conv_0/kernel", lambda m: f"{_block(m, 'attn')}.to_qkv.weight"),
    (_ATTN + r"/Conv_1/(kernel|bias)", lambda m: f"{_block(m, 'attn')}.to_out.{_param(m[3])}"),
    (_ATTN + r"/LayerNorm_0/(g|b)", lambda m: f"{_block(m, 'attn')}.norm.{_param(m[3])}"),
    (_ATTN + r"/DynamicPositionBias_0/Dense_(\d)/(kernel|bias)",
     lambda m: f"{_block(m, 'attn')}.dpb.mlp.{3 * int(m[3])}.{_param(m[4])}"),
    (_ATTN + r"/DynamicPositionBias_0/LayerNorm_(\d)/scale",
     lambda m: f"{_block(m, 'attn')}.dpb.mlp.{3 * int(m[3]) + 1}.weight"),
    (_MLP + r"/Conv_([01])/(kernel|bias)", lambda m: f"{_block(m, 'mlp')}.fc{int(m[3]) + 1}.{_param(m[4])}"),
    (_MLP + r"/LayerNorm_0/(g|b)", lambda m: f"{_block(m, 'mlp')}.norm.{_param(m[3])}"),
]


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A CrossFormer Flax msgpack file in our keys."""
    state_dict = rename_flax(read_flax_file(path, FAMILY), RULES)
    for key, tensor in state_dict.items():
        if key.startswith("stages.") and ".layers." in key:
            if key.endswith(("to_qkv.weight", "to_out.weight", "fc1.weight", "fc2.weight")) and tensor.ndim == 4:
                state_dict[key] = tensor.flatten(1)
            elif ".norm." in key and ".dpb." not in key:
                state_dict[key] = tensor.reshape(-1)
    return state_dict


def explain_mismatch(model: FlaxCrossFormer, state_dict: dict, origin: str) -> str | None:
    """Name the config key a Flax CrossFormer file contradicts (per-stage dims and depths, classes)."""
    dims, depths = [], []
    for stage in range(4):
        widths = [state_dict[k].shape[0] for k in sorted(state_dict)
                  if k.startswith(f"stages.{stage}.embed.convs.") and k.endswith(".weight")]
        dims.append(sum(widths) if widths else None)
        depths.append(count_indexed(state_dict, rf"stages\.{stage}\.layers\.(\d+)\."))
    head = shape_of(state_dict, "head.weight")
    ours_dims = tuple(s["dim"] for s in model.config.stages())
    ours_depths = tuple(s["depth"] for s in model.config.stages())
    found = {
        "dim": (tuple(dims) if None not in dims and tuple(dims) != ours_dims else None,
                "the widths of each CrossEmbedLayer's convolutions"),
        "depth": (tuple(depths) if tuple(depths) != ours_depths else None, "the Attention pairs of each Transformer"),
        "num_classes": (head and head[0], f"Dense_0/kernel has {head and head[0]} outputs"),
    }
    return explain_config_mismatch(model, state_dict, origin, found)


SPECS = (
    ModelSpec(FAMILY, FlaxCrossFormerConfig(), aliases=("flax-crossformer",), input_size=(224, 224), family=FAMILY),
)

register(Family(FAMILY, "vit-flax", FlaxCrossFormer, FlaxCrossFormerConfig, read_checkpoint,
                "Flax msgpack (flax.serialization.to_bytes of the variables)", OUTPUTS, explain_mismatch),
         *SPECS)
