"""Twins-PCPVT and Twins-SVT (Chu et al., NeurIPS 2021) with static shapes for deployment.

The state_dict is key-for-key the one of timm and of the official checkpoints. Unlike timm, the
input resolution is fixed when the model is built: every reshape target is a Python int computed
in ``__init__`` and the batch is the only size read at run time (as -1), so an exported graph has
no shape arithmetic at all. Between the stages' convolutions the tokens travel as one
(batch * tokens, channels) matrix, so every Linear exports as a single Gemm with its bias inside.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from twins_deploy.models.base import DeployableModel
from twins_deploy.models.registry import OUTPUTS, Family, ModelSpec, register
from twins_deploy.models.weights import load_torch_file, unwrap_state_dict

BLOCK_NORM_EPS = 1e-6  # block and final LayerNorm; patch-embed and GSA sub-sample norms use 1e-5


@dataclass(frozen=True)
class TwinsConfig:
    """Architecture of one Twins network (timm's constructor arguments)."""

    ZERO_MEANING: ClassVar[dict[str, str]] = {"num_classes": "no head: logits are the pooled embedding"}

    embed_dims: tuple[int, ...] = (64, 128, 256, 512)
    num_heads: tuple[int, ...] = (1, 2, 4, 8)
    mlp_ratios: tuple[float, ...] = (4, 4, 4, 4)
    depths: tuple[int, ...] = (3, 4, 6, 3)
    sr_ratios: tuple[int, ...] = (8, 4, 2, 1)
    wss: tuple[int, ...] | None = None  # window sizes; None = PCPVT (every block global)
    num_classes: int = 1000
    patch_size: int = 4
    in_chans: int = 3

    def __post_init__(self):
        lengths = {len(self.embed_dims), len(self.num_heads), len(self.mlp_ratios), len(self.depths),
                   len(self.sr_ratios), len(self.wss or self.depths)}
        if len(lengths) != 1:
            raise ValueError(f"every per-stage list needs one value per stage, got lengths {sorted(lengths)}")
        for dim, heads in zip(self.embed_dims, self.num_heads):
            if dim % heads:
                raise ValueError(f"embed dim {dim} is not divisible by {heads} heads")

    @property
    def family(self) -> str:
        return "pcpvt" if self.wss is None else "svt"

    @property
    def total_stride(self) -> int:
        return self.patch_size * 2 ** (len(self.depths) - 1)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fused: bool) -> torch.Tensor:
    """Softmax attention over 4-D (batch, heads, tokens, head_dim) tensors.

    The unfused form scales Q before the first MatMul: the MatMul-Softmax-MatMul pattern that
    TensorRT's fused multi-head attention recognises in an ONNX graph.
    """
    if fused:
        return F.scaled_dot_product_attention(q, k, v)
    q = q * (q.shape[-1] ** -0.5)
    return torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v


class LocallyGroupedAttn(nn.Module):
    """LSA: attention inside non-overlapping ws x ws windows, windows folded into the batch axis."""

    def __init__(self, dim: int, num_heads: int, ws: int, size: tuple[int, int]):
        super().__init__()
        self.dim, self.num_heads, self.ws = dim, num_heads, ws
        self.size = size
        self.padded = (math.ceil(size[0] / ws) * ws, math.ceil(size[1] / ws) * ws)
        self.fused_attn = True
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B*h*w, C) tokens in, (B*h*w, C) out."""
        (h, w), (hp, wp), ws, c = self.size, self.padded, self.ws, self.dim
        heads, padded = self.num_heads, (hp, wp) != (h, w)
        if padded:  # zero pad right/bottom, no mask, as timm and the official code
            x = F.pad(x.reshape(-1, h, w, c), (0, 0, 0, wp - w, 0, hp - h)).reshape(-1, c)
        qkv = self.qkv(x).reshape(-1, hp // ws, ws, wp // ws, ws, 3, heads, c // heads)
        # (windows, 3 * heads, ws*ws, head_dim): q, k and v come out of one Split on the head axis
        qkv = qkv.permute(0, 1, 3, 5, 6, 2, 4, 7).reshape(-1, 3 * heads, ws * ws, c // heads)
        x = _attend(*qkv.split(heads, dim=1), self.fused_attn)
        x = x.reshape(-1, hp // ws, wp // ws, heads, ws, ws, c // heads).permute(0, 1, 4, 2, 5, 3, 6)
        if padded:
            x = x.reshape(-1, hp, wp, c)[:, :h, :w, :]
        return self.proj(x.reshape(-1, c))


class GlobalSubSampleAttn(nn.Module):
    """GSA: every token attends to keys sub-sampled by a strided conv (sr_ratio x sr_ratio)."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, size: tuple[int, int]):
        super().__init__()
        self.dim, self.num_heads, self.size = dim, num_heads, size
        self.fused_attn = True
        self.q = nn.Linear(dim, dim, bias=True)
        self.kv = nn.Linear(dim, dim * 2, bias=True)
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)
            self.kv_tokens = (size[0] // sr_ratio) * (size[1] // sr_ratio)
        else:
            self.sr = None
            self.norm = None
            self.kv_tokens = size[0] * size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B*h*w, C) tokens in, (B*h*w, C) out."""
        (h, w), c, heads = self.size, self.dim, self.num_heads
        # (B, h, w, heads, head_dim) first, not (B, h*w, ...): OpenVINO's int8 ReshapeTransformation moves a
        # Gemm's per-channel dequantization through a dynamic-batch Reshape whose dim 1 exceeds the channels
        # (784 tokens > 128) and throws; with h < C at dim 1 it leaves it in place. Numerics are identical.
        q = self.q(x).reshape(-1, h, w, heads, c // heads).permute(0, 3, 1, 2, 4).reshape(-1, heads, h * w, c // heads)
        if self.sr is not None:
            x = self.sr(x.reshape(-1, h, w, c).permute(0, 3, 1, 2))
            x = self.norm(x.permute(0, 2, 3, 1).reshape(-1, c))
        kv = self.kv(x).reshape(-1, self.kv_tokens, 2 * heads, c // heads).transpose(1, 2)
        x = _attend(q, *kv.split(heads, dim=1), self.fused_attn)
        return self.proj(x.transpose(1, 2).reshape(-1, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf) GELU, as trained
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, sr_ratio: int, ws: int,
                 size: tuple[int, int]):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        if ws == 1:
            self.attn = GlobalSubSampleAttn(dim, num_heads, sr_ratio, size)
        else:
            self.attn = LocallyGroupedAttn(dim, num_heads, ws, size)
        self.norm2 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PosConv(nn.Module):
    """PEG: depthwise 3x3 conv over the token map plus a residual, after a stage's first block.

    The residual is added to the tokens after the conv's output is turned back into them, not to the NCHW
    map before: the same sums, but OpenVINO then writes the conv's output straight in token order instead of
    running a bf16 Add and a Transpose of the whole map on their own (svt-s int8, batch 1, ``PERF_COUNT``: bf16
    Transposes 1.07 -> 0.48 ms, four Reorders (0.36 ms) gone, of 19.4 ms). Only where the map's height is below
    its channels, as at every stage of the published models at 224: NNCF then quantizes the tokens before the
    (-1, h, w, C) view, and with a dynamic batch OpenVINO's int8 ReshapeTransformation throws on such a view
    when h >= C (the GSA query's rule, ``check_reshapes_after_gemms`` in the tests); there the sum stays NCHW."""

    def __init__(self, dim: int, size: tuple[int, int]):
        super().__init__()
        self.dim, self.size = dim, size
        self.proj = nn.Sequential(nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (h, w), c = self.size, self.dim
        feat = x.reshape(-1, h, w, c).permute(0, 3, 1, 2)
        if h < c:
            return x + self.proj(feat).permute(0, 2, 3, 1).reshape(-1, c)
        return (self.proj(feat) + feat).permute(0, 2, 3, 1).reshape(-1, c)


class PatchEmbed(nn.Module):
    """NCHW map in, (B*h*w, C) normalised tokens out."""

    def __init__(self, in_chans: int, dim: int, patch_size: int):
        super().__init__()
        self.dim = dim
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1).reshape(-1, self.dim))


class Twins(DeployableModel):
    """Twins for one fixed input size. ``output`` picks what forward returns:

    ``logits`` (B, classes), ``embedding`` (B, C) pooled before the head, or ``features``: the
    four stage maps (B, C_i, H_i, W_i) before the final norm, for detection/segmentation necks.
    """

    outputs = OUTPUTS

    def __init__(self, config: TwinsConfig, img_size: int | tuple[int, int] = 224,
                 output: str = "logits", spec: ModelSpec | None = None):
        super().__init__(config, img_size, output, spec, "twins", config.total_stride)
        self.num_features = config.embed_dims[-1]
        self.stage_sizes = []
        size = self.img_size
        prev_dim, patch = config.in_chans, config.patch_size
        self.patch_embeds = nn.ModuleList()
        self.blocks = nn.ModuleList()
        self.pos_block = nn.ModuleList()
        for k, dim in enumerate(config.embed_dims):
            size = (size[0] // patch, size[1] // patch)
            self.stage_sizes.append(size)
            self.patch_embeds.append(PatchEmbed(prev_dim, dim, patch))
            self.blocks.append(nn.ModuleList([
                Block(dim, config.num_heads[k], config.mlp_ratios[k], config.sr_ratios[k],
                      1 if config.wss is None or i % 2 == 1 else config.wss[k], size)
                for i in range(config.depths[k])]))
            self.pos_block.append(PosConv(dim, size))
            prev_dim, patch = dim, 2
        self.norm = nn.LayerNorm(self.num_features, eps=BLOCK_NORM_EPS)
        self.head = nn.Linear(self.num_features, config.num_classes) if config.num_classes else nn.Identity()

    def forward_stages(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The four NCHW stage maps, and the last stage's tokens after the final norm."""
        stages = []
        for embed, blocks, peg, (h, w) in zip(self.patch_embeds, self.blocks, self.pos_block, self.stage_sizes):
            tokens = embed(x)
            for j, blk in enumerate(blocks):
                tokens = blk(tokens)
                if j == 0:
                    tokens = peg(tokens)
            x = tokens.reshape(-1, h, w, embed.dim).permute(0, 3, 1, 2)
            stages.append(x)
        h, w = self.stage_sizes[-1]
        return stages, self.norm(tokens).reshape(-1, h * w, self.num_features)

    def forward_embedding(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_stages(x)[1].mean(dim=1)

    def forward(self, x: torch.Tensor):
        if self.output == "features":
            return tuple(self.forward_stages(x)[0])
        embedding = self.forward_embedding(x)
        return embedding if self.output == "embedding" else self.head(embedding)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Seeded initialisation as in timm (truncated normal linears, fan-out convs)."""
        generator = torch.Generator().manual_seed(seed)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02, a=-0.04, b=0.04, generator=generator)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
                module.weight.normal_(0.0, math.sqrt(2.0 / fan_out), generator=generator)
                nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------------------------
# Checkpoint layouts


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bring any published layout to timm's keys: unwraps ``model``/``state_dict`` nesting, strips
    ``module.`` (DDP), and renames mmpretrain/mmcls keys (``backbone.stages.`` ...)."""
    state_dict = unwrap_state_dict(state_dict)
    if not any(k.startswith("backbone.") for k in state_dict):
        return state_dict
    renames = (
        ("backbone.", ""), ("stages.", "blocks."), ("position_encodings.", "pos_block."),
        ("norm_after_stage3.", "norm."), ("ffn.layers.0.0.", "mlp.fc1."), ("ffn.layers.1.", "mlp.fc2."),
        ("head.fc.", "head."), (".projection.", ".proj."),
    )
    out = {}
    for key, value in state_dict.items():
        for old, new in renames:
            key = key.replace(old, new)
        if key.startswith("pos_block.") and ".proj.0." not in key:
            key = key.replace(".proj.", ".proj.0.")
        out[key] = value
    return out


def describe_state_dict(state_dict: dict[str, torch.Tensor]) -> dict:
    """What a timm-layout state_dict looks like: family, embed dims, depths and classes.

    Heads leave no trace in the weights, so this is enough to name a variant, not to build one.
    """
    stages = sorted({int(k.split(".")[1]) for k in state_dict if k.startswith("patch_embeds.")})
    if not stages or any(f"patch_embeds.{k}.proj.weight" not in state_dict for k in stages):
        raise ValueError("it has no 'patch_embeds.*.proj' weights, so it is not a Twins checkpoint")
    depths = []
    for k in stages:
        blocks = {int(key.split(".")[2]) for key in state_dict if key.startswith(f"blocks.{k}.")}
        depths.append(max(blocks) + 1 if blocks else 0)
    head = state_dict.get("head.weight")
    return {
        "family": "svt" if f"blocks.{stages[0]}.0.attn.qkv.weight" in state_dict else "pcpvt",
        "embed_dims": tuple(state_dict[f"patch_embeds.{k}.proj.weight"].shape[0] for k in stages),
        "depths": tuple(depths),
        "num_classes": head.shape[0] if head is not None else 0,
    }


def guess_variant(description: dict) -> ModelSpec | None:
    """The published variant whose architecture matches ``describe_state_dict``'s answer."""
    for spec in SPECS:
        cfg = spec.config
        if (cfg.family, cfg.embed_dims, cfg.depths) == (description["family"], description["embed_dims"],
                                                        description["depths"]):
            return spec
    return None


# ----------------------------------------------------------------------------------------------
# Published variants

_PCPVT = dict(embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4), sr_ratios=(8, 4, 2, 1))
_SVT = dict(mlp_ratios=(4, 4, 4, 4), sr_ratios=(8, 4, 2, 1), wss=(7, 7, 7, 7))
_SIZES = {"s": "small", "b": "base", "l": "large"}


def _spec(name: str, official: str, **config) -> ModelSpec:
    family, size = name.split("-")
    timm_name = f"twins_{family}_{_SIZES[size]}"
    return ModelSpec(name, TwinsConfig(**config), aliases=(timm_name, official), hub_id=f"timm/{timm_name}.in1k")


SPECS = (
    _spec("pcpvt-s", "pcpvt_small_v0", depths=(3, 4, 6, 3), **_PCPVT),
    _spec("pcpvt-b", "pcpvt_base_v0", depths=(3, 4, 18, 3), **_PCPVT),
    _spec("pcpvt-l", "pcpvt_large_v0", depths=(3, 8, 27, 3), **_PCPVT),
    _spec("svt-s", "alt_gvt_small", embed_dims=(64, 128, 256, 512), num_heads=(2, 4, 8, 16), depths=(2, 2, 10, 4), **_SVT),
    _spec("svt-b", "alt_gvt_base", embed_dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24), depths=(2, 2, 18, 2), **_SVT),
    _spec("svt-l", "alt_gvt_large", embed_dims=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32), depths=(2, 2, 18, 2), **_SVT),
)


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A Twins checkpoint in any published layout, in timm's keys."""
    return checkpoint_filter_fn(load_torch_file(path))


def explain_mismatch(model: Twins, state_dict: dict[str, torch.Tensor], origin: str) -> str | None:
    """Name what a checkpoint that does not fit is: another variant, another head, not Twins at all."""
    name, ours = model.spec.name, model.config
    try:
        found = describe_state_dict(state_dict)
    except ValueError as exc:
        return f"{origin} does not fit {name}: {exc}"
    expected = model.state_dict()
    mismatched = [k for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    if mismatched == ["head.weight", "head.bias"] and set(expected) == set(state_dict):
        return (f"{origin} has a {found['num_classes']}-class head but {name} is built with {ours.num_classes}: "
                f"pass --num-classes {found['num_classes']} to load it with its own head")
    if found["family"] != ours.family or found["embed_dims"] != ours.embed_dims or found["depths"] != ours.depths:
        for stage, (theirs, mine) in enumerate(zip(found["embed_dims"], ours.embed_dims), start=1):
            if theirs != mine:
                detail = f"has embed dim {theirs} in stage {stage}"
                break
        else:
            detail = f"is a {found['family']} with depths {found['depths']}"
        guess = guess_variant(found)
        looks = f"it looks like {guess.name}, not {name}" if guess else f"it is no published variant, not {name}"
        return f"{origin} {detail}: {looks}"
    return None


register(Family("twins", "timm", Twins, TwinsConfig, read_checkpoint,
                "timm/official/mmpretrain state_dict (.safetensors, .pth, .pt, .bin)", OUTPUTS, explain_mismatch),
         *SPECS)
