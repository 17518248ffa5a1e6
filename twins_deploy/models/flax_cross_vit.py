"""vit-flax's CrossViT (``vit_flax/cross_vit.py``) with static shapes, read from Flax msgpack weights.

Two ViT branches (small and large patches) run their own transformers; after each, the branches
exchange only their class tokens: each class token, projected to the other branch's width, attends
to itself followed by the other branch's patch tokens, and is projected back. The logits are the
sum of both branches' heads on their normed class tokens. LayerNorms have no bias, eps 1e-5; every
dropout is off at inference. Class tokens join the patch tokens as in ``flax_vit`` (a zero row
padded in front plus a constant table), so no ``Shape`` is read.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from twins_deploy.models.base import DeployableModel
from twins_deploy.models.flax_blocks import (
    Attention, FeedForward, check_patches, count_indexed, embed_patches, explain_config_mismatch,
    init_vit_weights, read_flax_file, rename_flax, shape_of,
)
from twins_deploy.models.registry import Family, ModelSpec, register, to_size

NORM_EPS = 1e-5
FAMILY = "vit-flax/CrossViT"
OUTPUTS = ("logits", "embedding")


@dataclass(frozen=True)
class FlaxCrossViTConfig:
    """vit-flax ``CrossViT``'s constructor arguments (its defaults; the required ones: the seed's usage)."""

    image_size: int = 256
    num_classes: int = 1000
    sm_dim: int = 192
    lg_dim: int = 384
    sm_patch_size: int = 12
    sm_enc_depth: int = 1
    sm_enc_heads: int = 8
    sm_enc_mlp_dim: int = 2048
    sm_enc_dim_head: int = 64
    lg_patch_size: int = 16
    lg_enc_depth: int = 4
    lg_enc_heads: int = 8
    lg_enc_mlp_dim: int = 2048
    lg_enc_dim_head: int = 64
    cross_attn_depth: int = 2
    cross_attn_heads: int = 8
    cross_attn_dim_head: int = 64
    depth: int = 3
    dropout: float = 0.1
    emb_dropout: float = 0.1


class ImageEmbedder(nn.Module):
    """Patches -> Dense, the class token in front, plus position embeddings: (B*(1+n), dim)."""

    def __init__(self, dim: int, image_size: int, patch_size: int, img_size: tuple[int, int], branch: str):
        super().__init__()
        self.dim, self.patch, self.img_size = dim, (patch_size, patch_size), img_size
        self.num_patches = check_patches(to_size(image_size), self.patch, img_size,
                                         patch_key=f"{branch}_patch_size")
        allotted = (image_size // patch_size) ** 2
        self.patch_embed = nn.Linear(patch_size * patch_size * 3, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.zeros(1, allotted + 1, dim))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        n, dim = self.num_patches, self.dim
        x = embed_patches(pixels, self.patch_embed, self.patch, self.img_size).reshape(-1, n, dim)
        table = self.pos_embedding[:, :n + 1] + F.pad(self.cls_token, (0, 0, 0, n))
        return (F.pad(x, (0, 0, 1, 0)) + table).reshape(-1, dim)


class EncoderLayer(nn.Module):
    """x + Attention(LN(x)) then x + FeedForward(LN(x))."""

    def __init__(self, dim: int, heads: int, dim_head: int, mlp_dim: int, tokens: int):
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim, eps=NORM_EPS, bias=False)
        self.attn = Attention(dim, heads, dim_head, tokens)
        self.ff_norm = nn.LayerNorm(dim, eps=NORM_EPS, bias=False)
        self.ff = FeedForward(dim, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(self.attn_norm(x)) + x
        return self.ff(self.ff_norm(x)) + x


class Encoder(nn.Module):
    """One branch's transformer: its layers, then a LayerNorm."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int, tokens: int):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, dim_head, mlp_dim, tokens) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=NORM_EPS, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class ClassTokenAttention(nn.Module):
    """A class token (projected to the other branch's width when it differs) attends to itself
    followed by the other branch's patch tokens, and is projected back."""

    def __init__(self, dim: int, other_dim: int, heads: int, dim_head: int, other_patches: int):
        super().__init__()
        self.proj_in = nn.Linear(dim, other_dim) if dim != other_dim else nn.Identity()
        self.norm = nn.LayerNorm(other_dim, eps=NORM_EPS, bias=False)
        self.attn = Attention(other_dim, heads, dim_head, 1, other_patches)
        self.proj_out = nn.Linear(other_dim, dim) if dim != other_dim else nn.Identity()

    def forward(self, cls: torch.Tensor, other_patches: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.attn(self.norm(self.proj_in(cls)), other_patches))


class CrossLayer(nn.Module):
    def __init__(self, config: FlaxCrossViTConfig, sm_patches: int, lg_patches: int):
        super().__init__()
        heads, dim_head = config.cross_attn_heads, config.cross_attn_dim_head
        self.sm_attend_lg = ClassTokenAttention(config.sm_dim, config.lg_dim, heads, dim_head, lg_patches)
        self.lg_attend_sm = ClassTokenAttention(config.lg_dim, config.sm_dim, heads, dim_head, sm_patches)


class CrossTransformer(nn.Module):
    """``cross_attn_depth`` rounds of class-token exchange; patch tokens pass through unchanged."""

    def __init__(self, config: FlaxCrossViTConfig, sm_patches: int, lg_patches: int):
        super().__init__()
        self.dims = (config.sm_dim, config.lg_dim)
        self.patches = (sm_patches, lg_patches)
        self.layers = nn.ModuleList(CrossLayer(config, sm_patches, lg_patches)
                                    for _ in range(config.cross_attn_depth))

    def forward(self, sm: torch.Tensor, lg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (sm_dim, lg_dim), (sm_n, lg_n) = self.dims, self.patches
        sm, lg = sm.reshape(-1, 1 + sm_n, sm_dim), lg.reshape(-1, 1 + lg_n, lg_dim)
        sm_cls, sm_patches = sm[:, 0], sm[:, 1:].reshape(-1, sm_dim)
        lg_cls, lg_patches = lg[:, 0], lg[:, 1:].reshape(-1, lg_dim)
        for layer in self.layers:
            sm_cls = layer.sm_attend_lg(sm_cls, lg_patches) + sm_cls
            lg_cls = layer.lg_attend_sm(lg_cls, sm_patches) + lg_cls
        sm = torch.cat([sm_cls.reshape(-1, 1, sm_dim), sm[:, 1:]], dim=1).reshape(-1, sm_dim)
        lg = torch.cat([lg_cls.reshape(-1, 1, lg_dim), lg[:, 1:]], dim=1).reshape(-1, lg_dim)
        return sm, lg


class MultiScaleLayer(nn.Module):
    def __init__(self, config: FlaxCrossViTConfig, sm_patches: int, lg_patches: int):
        super().__init__()
        c = config
        self.sm_encoder = Encoder(c.sm_dim, c.sm_enc_depth, c.sm_enc_heads, c.sm_enc_dim_head, c.sm_enc_mlp_dim,
                                  1 + sm_patches)
        self.lg_encoder = Encoder(c.lg_dim, c.lg_enc_depth, c.lg_enc_heads, c.lg_enc_dim_head, c.lg_enc_mlp_dim,
                                  1 + lg_patches)
        self.cross = CrossTransformer(config, sm_patches, lg_patches)

    def forward(self, sm: torch.Tensor, lg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cross(self.sm_encoder(sm), self.lg_encoder(lg))


class FlaxCrossViT(DeployableModel):
    """CrossViT for one fixed input size; ``output`` is ``logits`` or ``embedding`` (both branches'
    normed class tokens, small then large, concatenated)."""

    def __init__(self, config: FlaxCrossViTConfig, img_size: int | tuple[int, int] = 256,
                 output: str = "logits", spec: ModelSpec | None = None):
        super().__init__(config, img_size, output, spec, FAMILY)
        self.num_features = config.sm_dim + config.lg_dim
        self.sm_embed = ImageEmbedder(config.sm_dim, config.image_size, config.sm_patch_size, self.img_size, "sm")
        self.lg_embed = ImageEmbedder(config.lg_dim, config.image_size, config.lg_patch_size, self.img_size, "lg")
        patches = (self.sm_embed.num_patches, self.lg_embed.num_patches)
        self.layers = nn.ModuleList(MultiScaleLayer(config, *patches) for _ in range(config.depth))
        self.sm_norm = nn.LayerNorm(config.sm_dim, eps=NORM_EPS, bias=False)
        self.sm_head = nn.Linear(config.sm_dim, config.num_classes)
        self.lg_norm = nn.LayerNorm(config.lg_dim, eps=NORM_EPS, bias=False)
        self.lg_head = nn.Linear(config.lg_dim, config.num_classes)

    def forward_class_tokens(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sm, lg = self.sm_embed(pixels), self.lg_embed(pixels)
        for layer in self.layers:
            sm, lg = layer(sm, lg)
        sm_cls = sm.reshape(-1, 1 + self.sm_embed.num_patches, self.config.sm_dim)[:, 0]
        lg_cls = lg.reshape(-1, 1 + self.lg_embed.num_patches, self.config.lg_dim)[:, 0]
        return self.sm_norm(sm_cls), self.lg_norm(lg_cls)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        sm_cls, lg_cls = self.forward_class_tokens(pixels)
        if self.output == "embedding":
            return torch.cat([sm_cls, lg_cls], dim=-1)
        return self.sm_head(sm_cls) + self.lg_head(lg_cls)

    def init_weights(self, seed: int = 0) -> None:
        init_vit_weights(self, seed)


# ----------------------------------------------------------------------------------------------
# Flax checkpoints. MultiScaleEncoder_0 holds, per layer d, Transformer_{2d} (small branch),
# Transformer_{2d+1} (large) and CrossTransformer_d; in a CrossTransformer, Attention/PreNorm/
# ProjectInOut_{2j} are round j's small-attends-large and _{2j+1} its large-attends-small.


def _param(leaf: str) -> str:
    return "bias" if leaf == "bias" else "weight"


def _encoder(m) -> str:
    return f"layers.{int(m[1]) // 2}.{'lg' if int(m[1]) % 2 else 'sm'}_encoder"


def _cross(m) -> str:
    return f"layers.{m[1]}.cross.layers.{int(m[2]) // 2}.{'lg_attend_sm' if int(m[2]) % 2 else 'sm_attend_lg'}"


_ENC = r"MultiScaleEncoder_0/Transformer_(\d+)"
_CROSS = r"MultiScaleEncoder_0/CrossTransformer_(\d+)"
_ATTN = {"0": "to_q", "1": "to_kv", "2": "to_out"}
_BRANCH = {"0": "sm", "1": "lg"}

RULES = [
    (r"ImageEmbedder_([01])/Dense_0/(kernel|bias)", lambda m: f"{_BRANCH[m[1]]}_embed.patch_embed.{_param(m[2])}"),
    (r"ImageEmbedder_([01])/cls", lambda m: f"{_BRANCH[m[1]]}_embed.cls_token"),
    (r"ImageEmbedder_([01])/pos_embedding", lambda m: f"{_BRANCH[m[1]]}_embed.pos_embedding"),
    (r"LayerNorm_([01])/scale", lambda m: f"{_BRANCH[m[1]]}_norm.weight"),
    (r"Dense_([01])/(kernel|bias)", lambda m: f"{_BRANCH[m[1]]}_head.{_param(m[2])}"),
    (_ENC + r"/Attention_(\d+)/Dense_([012])/kernel",
     lambda m: f"{_encoder(m)}.layers.{m[2]}.attn.{_ATTN[m[3]]}.weight"),
    (_ENC + r"/Attention_(\d+)/Dense_2/bias", lambda m: f"{_encoder(m)}.layers.{m[2]}.attn.to_out.bias"),
    (_ENC + r"/FeedForward_(\d+)/Dense_(\d)/(kernel|bias)",
     lambda m: f"{_encoder(m)}.layers.{m[2]}.ff.fc{int(m[3]) + 1}.{_param(m[4])}"),
    (_ENC + r"/PreNorm_(\d+)/LayerNorm_0/scale",
     lambda m: f"{_encoder(m)}.layers.{int(m[2]) // 2}.{'ff' if int(m[2]) % 2 else 'attn'}_norm.weight"),
    (_ENC + r"/LayerNorm_0/scale", lambda m: f"{_encoder(m)}.norm.weight"),
    (_CROSS + r"/Attention_(\d+)/Dense_([012])/kernel", lambda m: f"{_cross(m)}.attn.{_ATTN[m[3]]}.weight"),
    (_CROSS + r"/Attention_(\d+)/Dense_2/bias", lambda m: f"{_cross(m)}.attn.to_out.bias"),
    (_CROSS + r"/PreNorm_(\d+)/LayerNorm_0/scale", lambda m: f"{_cross(m)}.norm.weight"),
    (_CROSS + r"/ProjectInOut_(\d+)/Dense_([01])/(kernel|bias)",
     lambda m: f"{_cross(m)}.proj_{'out' if m[3] == '1' else 'in'}.{_param(m[4])}"),
]


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A CrossViT Flax msgpack file in our keys."""
    return rename_flax(read_flax_file(path, FAMILY), RULES)


def explain_mismatch(model: FlaxCrossViT, state_dict: dict, origin: str) -> str | None:
    """Name the config key a Flax CrossViT file contradicts."""
    found: dict[str, tuple[object, str]] = {}
    for branch, index in (("sm", 0), ("lg", 1)):
        embed = shape_of(state_dict, f"{branch}_embed.patch_embed.weight")
        prefix = f"layers.0.{branch}_encoder.layers"
        q, fc1 = shape_of(state_dict, f"{prefix}.0.attn.to_q.weight"), shape_of(state_dict, f"{prefix}.0.ff.fc1.weight")
        dense = f"ImageEmbedder_{index}/Dense_0/kernel"
        found[f"{branch}_dim"] = (embed and embed[0], f"{dense} has {embed and embed[0]} outputs")
        found[f"{branch}_patch_size"] = (embed and int(round((embed[1] / 3) ** 0.5)),
                                         f"{dense} takes {embed and embed[1]} values per patch")
        found[f"{branch}_enc_depth"] = (count_indexed(state_dict, prefix.replace(".", r"\.") + r"\.(\d+)\.") or None,
                                        f"MultiScaleEncoder_0/Transformer_{index} has that many layers")
        found[f"{branch}_enc_mlp_dim"] = (fc1 and fc1[0],
                                          f"its FeedForward_0/Dense_0/kernel has {fc1 and fc1[0]} outputs")
        inner = q and q[0]
        ours = getattr(model.config, f"{branch}_enc_heads") * getattr(model.config, f"{branch}_enc_dim_head")
        if inner and inner != ours:
            return (f"{origin} has {branch} attention width {inner} (heads x dim_head; Transformer_{index}/Attention_0/"
                    f"Dense_0/kernel), the config of {model.spec.name} gives {ours}: pass --config with "
                    f"{branch}_enc_heads and {branch}_enc_dim_head that multiply to {inner}")
    found["depth"] = (count_indexed(state_dict, r"layers\.(\d+)\.sm_encoder") or None,
                      "MultiScaleEncoder_0 has that many Transformer pairs")
    found["cross_attn_depth"] = (count_indexed(state_dict, r"layers\.0\.cross\.layers\.(\d+)\.") or None,
                                 "CrossTransformer_0 has that many rounds")
    head = shape_of(state_dict, "sm_head.weight")
    found["num_classes"] = (head and head[0], f"Dense_0/kernel has {head and head[0]} outputs")
    return explain_config_mismatch(model, state_dict, origin, found)


SPECS = (
    ModelSpec(FAMILY, FlaxCrossViTConfig(image_size=256, num_classes=1000, depth=4, sm_dim=192, sm_patch_size=16,
                                         sm_enc_depth=2, sm_enc_heads=8, sm_enc_mlp_dim=2048, lg_dim=384,
                                         lg_patch_size=64, lg_enc_depth=3, lg_enc_heads=8, lg_enc_mlp_dim=2048,
                                         cross_attn_depth=2, cross_attn_heads=8, dropout=0.1, emb_dropout=0.1),
              aliases=("flax-cross-vit", "flax-crossvit"), input_size=(256, 256), family=FAMILY),
)

register(Family(FAMILY, "vit-flax", FlaxCrossViT, FlaxCrossViTConfig, read_checkpoint,
                "Flax msgpack (flax.serialization.to_bytes of the variables)", OUTPUTS, explain_mismatch),
         *SPECS)
