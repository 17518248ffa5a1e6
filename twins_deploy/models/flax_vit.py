"""vit-flax's ViT (``vit_flax/vit.py``) with static shapes, read from Flax msgpack weights.

The class token joins the patch tokens without reading the batch size: the tokens
are padded with one zero row in front and the (class token + position) table is added, one Pad and
one Add with a constant, where a concat with a repeated class token would need a ``Shape``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from twins_deploy.models.base import DeployableModel
from twins_deploy.models.flax_blocks import (
    FLAX_LAYERNORM_EPS, FeedForward, SelfAttention, check_patches, count_indexed, embed_patches,
    explain_config_mismatch, init_vit_weights, read_flax_file, rename_flax, shape_of,
)
from twins_deploy.models.registry import Family, ModelSpec, register, to_size

DIM_HEAD = 64  # a class attribute of vit-flax's ViT, not a constructor argument
FAMILY = "vit-flax/ViT"
OUTPUTS = ("logits", "embedding")


@dataclass(frozen=True)
class FlaxViTConfig:
    """vit-flax ``ViT``'s constructor arguments (defaults: the seed's usage)."""

    image_size: int | tuple[int, int] = 256
    patch_size: int | tuple[int, int] = 32
    num_classes: int = 1000
    dim: int = 1024
    depth: int = 6
    heads: int = 16
    mlp_dim: int = 2048
    pool: str = "cls"
    dropout: float = 0.0
    emb_dropout: float = 0.0

    def __post_init__(self):
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {self.pool!r}")


class ViTLayer(nn.Module):
    """Residual(PreNorm(Attention)) then Residual(PreNorm(FeedForward)); Flax LayerNorms with bias."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, tokens: int):
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim, eps=FLAX_LAYERNORM_EPS)
        self.attn = SelfAttention(dim, heads, DIM_HEAD, tokens)
        self.ff_norm = nn.LayerNorm(dim, eps=FLAX_LAYERNORM_EPS)
        self.ff = FeedForward(dim, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(self.attn_norm(x)) + x
        return self.ff(self.ff_norm(x)) + x


class FlaxViT(DeployableModel):
    """ViT for one fixed input size; ``output`` is ``logits`` or ``embedding`` (pooled, normed)."""

    def __init__(self, config: FlaxViTConfig, img_size: int | tuple[int, int] = 256,
                 output: str = "logits", spec: ModelSpec | None = None):
        super().__init__(config, img_size, output, spec, FAMILY)
        self.patch = to_size(config.patch_size)
        image_size = to_size(config.image_size)
        self.num_patches = check_patches(image_size, self.patch, self.img_size)
        self.num_features = dim = config.dim
        allotted = (image_size[0] // self.patch[0]) * (image_size[1] // self.patch[1])
        self.patch_embed = nn.Linear(self.patch[0] * self.patch[1] * 3, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.zeros(1, allotted + 1, dim))
        self.layers = nn.ModuleList(ViTLayer(dim, config.heads, config.mlp_dim, self.num_patches + 1)
                                    for _ in range(config.depth))
        self.norm = nn.LayerNorm(dim, eps=FLAX_LAYERNORM_EPS)
        self.head = nn.Linear(dim, config.num_classes)

    def forward_embedding(self, pixels: torch.Tensor) -> torch.Tensor:
        n, dim = self.num_patches, self.num_features
        x = embed_patches(pixels, self.patch_embed, self.patch, self.img_size).reshape(-1, n, dim)
        # [cls, patches] + pos, as a zero row padded in front plus a (cls + pos) table: no batch size read
        table = self.pos_embedding[:, :n + 1] + F.pad(self.cls_token, (0, 0, 0, n))
        x = (F.pad(x, (0, 0, 1, 0)) + table).reshape(-1, dim)
        for layer in self.layers:
            x = layer(x)
        x = x.reshape(-1, n + 1, dim)
        x = x.mean(dim=1) if self.config.pool == "mean" else x[:, 0]
        return self.norm(x)

    def init_weights(self, seed: int = 0) -> None:
        init_vit_weights(self, seed)


# ----------------------------------------------------------------------------------------------
# Flax checkpoints

RULES = [
    (r"Dense_0/(kernel|bias)", lambda m: f"patch_embed.{'weight' if m[1] == 'kernel' else 'bias'}"),
    (r"Dense_1/(kernel|bias)", lambda m: f"head.{'weight' if m[1] == 'kernel' else 'bias'}"),
    (r"LayerNorm_0/(scale|bias)", lambda m: f"norm.{'weight' if m[1] == 'scale' else 'bias'}"),
    (r"cls", lambda m: "cls_token"),
    (r"pos_embedding", lambda m: "pos_embedding"),
    (r"Transformer_0/Attention_(\d+)/Dense_0/kernel", lambda m: f"layers.{m[1]}.attn.to_qkv.weight"),
    (r"Transformer_0/Attention_(\d+)/Dense_1/(kernel|bias)",
     lambda m: f"layers.{m[1]}.attn.to_out.{'weight' if m[2] == 'kernel' else 'bias'}"),
    (r"Transformer_0/FeedForward_(\d+)/Dense_(\d)/(kernel|bias)",
     lambda m: f"layers.{m[1]}.ff.fc{int(m[2]) + 1}.{'weight' if m[3] == 'kernel' else 'bias'}"),
    (r"Transformer_0/PreNorm_(\d+)/LayerNorm_0/(scale|bias)",
     lambda m: f"layers.{int(m[1]) // 2}.{'ff' if int(m[1]) % 2 else 'attn'}_norm."
               f"{'weight' if m[2] == 'scale' else 'bias'}"),
]


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A ViT Flax msgpack file in our keys."""
    return rename_flax(read_flax_file(path, FAMILY), RULES)


def explain_mismatch(model: FlaxViT, state_dict: dict, origin: str) -> str | None:
    """Name the config key a Flax ViT file contradicts (dim, patch size, depth, heads, ...)."""
    embed, pos = shape_of(state_dict, "patch_embed.weight"), shape_of(state_dict, "pos_embedding")
    qkv, fc1 = shape_of(state_dict, "layers.0.attn.to_qkv.weight"), shape_of(state_dict, "layers.0.ff.fc1.weight")
    head = shape_of(state_dict, "head.weight")
    found = {
        "dim": (embed and embed[0], f"Dense_0/kernel has {embed and embed[0]} outputs"),
        "patch_size": (embed and int(round((embed[1] / 3) ** 0.5)), f"Dense_0/kernel takes {embed and embed[1]} "
                       "values per patch"),
        "depth": (count_indexed(state_dict, r"layers\.(\d+)\.") or None, "Transformer_0 has that many layers"),
        "heads": (qkv and qkv[0] // (3 * DIM_HEAD), f"Attention_0/Dense_0/kernel has {qkv and qkv[0]} outputs"),
        "mlp_dim": (fc1 and fc1[0], f"FeedForward_0/Dense_0/kernel has {fc1 and fc1[0]} outputs"),
        "num_classes": (head and head[0], f"Dense_1/kernel has {head and head[0]} outputs"),
    }
    message = explain_config_mismatch(model, state_dict, origin, found)
    if message is None and pos and pos[1] != model.pos_embedding.shape[1]:
        return (f"{origin} has {pos[1] - 1} position embeddings (pos_embedding is {pos}), the config's image_size "
                f"{model.config.image_size} gives {model.pos_embedding.shape[1] - 1}: pass --config with the "
                "image_size the file was made for")
    return message


SPECS = (
    ModelSpec(FAMILY, FlaxViTConfig(dropout=0.1, emb_dropout=0.1), aliases=("flax-vit",), input_size=(256, 256),
              family=FAMILY),
)

register(Family(FAMILY, "vit-flax", FlaxViT, FlaxViTConfig, read_checkpoint,
                "Flax msgpack (flax.serialization.to_bytes of the variables)", OUTPUTS, explain_mismatch),
         *SPECS)
