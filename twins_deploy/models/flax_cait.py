"""vit-flax's CaiT (``vit_flax/cait.py``) with static shapes, read from Flax msgpack weights.

Patch tokens run through ``depth`` self-attention layers; then the class token alone runs
``cls_depth`` layers whose keys and values are itself followed by the (un-normed) patch tokens.
Every residual branch is multiplied by LayerScale's constant (0.1 up to layer 18, 1e-5 to 24, then
1e-6: vit-flax makes it a constant, not a parameter, chosen by the layer's index). Attention has
talking heads: learned (heads, heads) mixes before and after the softmax. LayerNorms have no bias,
eps 1e-5. Layer dropout, like every dropout, is off at inference.

The class token takes the batch size from the patch tokens (``x[:, :1] * 0 + cls``), so no
``Shape`` is read for it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from twins_deploy.models.base import DeployableModel
from twins_deploy.models.flax_blocks import (
    Attention, FeedForward, check_patches, count_indexed, embed_patches, explain_config_mismatch,
    init_vit_weights, read_flax_file, rename_flax, shape_of,
)
from twins_deploy.models.registry import Family, ModelSpec, register, to_size

NORM_EPS = 1e-5
FAMILY = "vit-flax/CaiT"
OUTPUTS = ("logits", "embedding")


@dataclass(frozen=True)
class FlaxCaiTConfig:
    """vit-flax ``CaiT``'s constructor arguments (defaults: the seed's usage)."""

    image_size: int = 256
    patch_size: int = 32
    num_classes: int = 1000
    dim: int = 1024
    depth: int = 12
    cls_depth: int = 2
    heads: int = 16
    mlp_dim: int = 2048
    dim_head: int = 64
    dropout: float = 0.0
    emb_dropout: float = 0.0
    layer_dropout: float = 0.0


def layer_scale(index: int) -> float:
    """LayerScale's constant for the layer at 1-based ``index`` (CaiT paper, section 2)."""
    return 0.1 if index <= 18 else 1e-5 if index <= 24 else 1e-6


class CaiTLayer(nn.Module):
    """x + scale * Attention(LN(x), context) then x + scale * FeedForward(LN(x))."""

    def __init__(self, config: FlaxCaiTConfig, index: int, tokens: int, context_tokens: int = 0):
        super().__init__()
        dim = config.dim
        self.scale = layer_scale(index)
        self.attn_norm = nn.LayerNorm(dim, eps=NORM_EPS, bias=False)
        self.attn = Attention(dim, config.heads, config.dim_head, tokens, context_tokens, talking_heads=True)
        self.ff_norm = nn.LayerNorm(dim, eps=NORM_EPS, bias=False)
        self.ff = FeedForward(dim, config.mlp_dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attn(self.attn_norm(x), context) * self.scale + x
        return self.ff(self.ff_norm(x)) * self.scale + x


class FlaxCaiT(DeployableModel):
    """CaiT for one fixed input size; ``output`` is ``logits`` or ``embedding`` (normed class token)."""

    def __init__(self, config: FlaxCaiTConfig, img_size: int | tuple[int, int] = 256,
                 output: str = "logits", spec: ModelSpec | None = None):
        super().__init__(config, img_size, output, spec, FAMILY)
        self.patch = to_size(config.patch_size)
        image_size = to_size(config.image_size)
        self.num_patches = n = check_patches(image_size, self.patch, self.img_size)
        self.num_features = dim = config.dim
        allotted = (image_size[0] // self.patch[0]) * (image_size[1] // self.patch[1])
        self.patch_embed = nn.Linear(self.patch[0] * self.patch[1] * 3, dim)
        self.pos_embedding = nn.Parameter(torch.zeros(1, allotted, dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.layers = nn.ModuleList(CaiTLayer(config, i + 1, n) for i in range(config.depth))
        self.cls_layers = nn.ModuleList(CaiTLayer(config, i + 1, 1, n) for i in range(config.cls_depth))
        self.norm = nn.LayerNorm(dim, eps=NORM_EPS, bias=False)
        self.head = nn.Linear(dim, config.num_classes)

    def set_fused_attn(self, fused: bool) -> None:
        """Talking heads sit between the attention's MatMuls, so CaiT always runs them explicitly."""

    def forward_embedding(self, pixels: torch.Tensor) -> torch.Tensor:
        n, dim = self.num_patches, self.num_features
        x = embed_patches(pixels, self.patch_embed, self.patch, self.img_size).reshape(-1, n, dim)
        x = x + self.pos_embedding[:, :n]
        cls = x[:, :1] * 0 + self.cls_token  # (B, 1, dim): the batch size comes with the tokens
        x = x.reshape(-1, dim)
        for layer in self.layers:
            x = layer(x)
        cls = cls.reshape(-1, dim)
        for layer in self.cls_layers:
            cls = layer(cls, context=x)
        return self.norm(cls)

    def init_weights(self, seed: int = 0) -> None:
        init_vit_weights(self, seed)


# ----------------------------------------------------------------------------------------------
# Flax checkpoints: Transformer_0 is the patch transformer, Transformer_1 the class-token one;
# in each, PreNorm_{2i} belongs to layer i's attention and PreNorm_{2i+1} to its feed-forward.

_LAYERS = {"0": "layers", "1": "cls_layers"}
_ATTN = {"0": "to_q", "1": "to_kv", "2": "to_out"}


def _param(leaf: str) -> str:
    return "bias" if leaf == "bias" else "weight"


RULES = [
    (r"Dense_0/(kernel|bias)", lambda m: f"patch_embed.{_param(m[1])}"),
    (r"Dense_1/(kernel|bias)", lambda m: f"head.{_param(m[1])}"),
    (r"LayerNorm_0/scale", lambda m: "norm.weight"),
    (r"cls", lambda m: "cls_token"),
    (r"pos_embedding", lambda m: "pos_embedding"),
    (r"Transformer_([01])/Attention_(\d+)/Dense_([012])/(kernel|bias)",
     lambda m: f"{_LAYERS[m[1]]}.{m[2]}.attn.{_ATTN[m[3]]}.{_param(m[4])}"),
    (r"Transformer_([01])/Attention_(\d+)/(mix_heads_pre_attn|mix_heads_post_attn)",
     lambda m: f"{_LAYERS[m[1]]}.{m[2]}.attn.{m[3]}"),
    (r"Transformer_([01])/FeedForward_(\d+)/Dense_(\d)/(kernel|bias)",
     lambda m: f"{_LAYERS[m[1]]}.{m[2]}.ff.fc{int(m[3]) + 1}.{_param(m[4])}"),
    (r"Transformer_([01])/PreNorm_(\d+)/LayerNorm_0/scale",
     lambda m: f"{_LAYERS[m[1]]}.{int(m[2]) // 2}.{'ff' if int(m[2]) % 2 else 'attn'}_norm.weight"),
]


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A CaiT Flax msgpack file in our keys. ``mix_heads_*`` are used as stored: (h, g)."""
    return rename_flax(read_flax_file(path, FAMILY), RULES)


def explain_mismatch(model: FlaxCaiT, state_dict: dict, origin: str) -> str | None:
    """Name the config key a Flax CaiT file contradicts."""
    embed, q = shape_of(state_dict, "patch_embed.weight"), shape_of(state_dict, "layers.0.attn.to_q.weight")
    mix, fc1 = shape_of(state_dict, "layers.0.attn.mix_heads_pre_attn"), shape_of(state_dict, "layers.0.ff.fc1.weight")
    head, pos = shape_of(state_dict, "head.weight"), shape_of(state_dict, "pos_embedding")
    found = {
        "dim": (embed and embed[0], f"Dense_0/kernel has {embed and embed[0]} outputs"),
        "patch_size": (embed and int(round((embed[1] / 3) ** 0.5)),
                       f"Dense_0/kernel takes {embed and embed[1]} values per patch"),
        "depth": (count_indexed(state_dict, r"layers\.(\d+)\.") or None, "Transformer_0 has that many layers"),
        "cls_depth": (count_indexed(state_dict, r"cls_layers\.(\d+)\.") or None, "Transformer_1 has that many layers"),
        "heads": (mix and mix[0], f"mix_heads_pre_attn is {mix}"),
        "dim_head": (q and mix and q[0] // mix[0], f"Attention_0/Dense_0/kernel has {q and q[0]} outputs"),
        "mlp_dim": (fc1 and fc1[0], f"FeedForward_0/Dense_0/kernel has {fc1 and fc1[0]} outputs"),
        "num_classes": (head and head[0], f"Dense_1/kernel has {head and head[0]} outputs"),
    }
    message = explain_config_mismatch(model, state_dict, origin, found)
    if message is None and pos and pos[1] != model.pos_embedding.shape[1]:
        return (f"{origin} has {pos[1]} position embeddings (pos_embedding is {pos}), the config's image_size "
                f"{model.config.image_size} gives {model.pos_embedding.shape[1]}: pass --config with the "
                "image_size the file was made for")
    return message


SPECS = (
    ModelSpec(FAMILY, FlaxCaiTConfig(dropout=0.1, emb_dropout=0.1, layer_dropout=0.05), aliases=("flax-cait",),
              input_size=(256, 256), family=FAMILY),
)

register(Family(FAMILY, "vit-flax", FlaxCaiT, FlaxCaiTConfig, read_checkpoint,
                "Flax msgpack (flax.serialization.to_bytes of the variables)", OUTPUTS, explain_mismatch),
         *SPECS)
