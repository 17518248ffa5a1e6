"""Blocks shared by the static ports of vit-flax's ViT, CaiT and CrossViT, and their weight plumbing.

As in ``twins.py``, tokens travel between blocks as one 2-D (batch * tokens, dim) matrix, so every
Flax ``Dense`` exports as one Gemm, and every token count is a Python int fixed when the model is
built (the batch, as -1, is the only size read at run time). Flax's ``nn.gelu`` is the tanh
approximation (``gelu_tanh``).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from twins_deploy.errors import UsageError
from twins_deploy.models.base import trunc_normal_
from twins_deploy.models.flax_msgpack import flax_to_torch, is_flax_file, read_flax_msgpack

FLAX_LAYERNORM_EPS = 1e-6  # flax.linen.LayerNorm's default; vit-flax's CaiT and CrossViT pass 1e-5


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fused: bool,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention over (batch, heads, tokens, head_dim) with an optional additive score bias.

    The unfused form scales Q before the first MatMul (TensorRT's fused-MHA pattern); a bias is
    added to the scores between that MatMul and the Softmax.
    """
    if fused:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    scores = (q * (q.shape[-1] ** -0.5)) @ k.transpose(-2, -1)
    if bias is not None:
        scores = scores + bias
    return torch.softmax(scores, dim=-1) @ v


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """Flax's ``nn.gelu`` (the tanh approximation). Exported as ``(x * 0.5) * (1 + tanh(...))`` with
    ``x ** 3``: the form onnxruntime fuses into one FastGelu kernel; ``F.gelu`` exports as
    ``x * (0.5 * (1 + tanh(...)))``, which it leaves as eight nodes."""
    if not torch.onnx.is_in_onnx_export():
        return F.gelu(x, approximate="tanh")
    return (x * 0.5) * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


class FeedForward(nn.Module):
    """Dense -> tanh GELU -> Dense (vit-flax's ``FeedForward``; dropout is off at inference)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu_tanh(self.fc1(x)))


class SelfAttention(nn.Module):
    """ViT's attention: one bias-free qkv Dense, an output Dense unless one head of ``dim`` width."""

    def __init__(self, dim: int, heads: int, dim_head: int, tokens: int):
        super().__init__()
        self.heads, self.dim_head, self.tokens = heads, dim_head, tokens
        self.fused_attn = True
        inner = heads * dim_head
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Linear(inner, dim) if not (heads == 1 and dim_head == dim) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B*T, dim) in and out; q, k and v come out of one Split on the head axis."""
        heads = self.heads
        qkv = self.to_qkv(x).reshape(-1, self.tokens, 3 * heads, self.dim_head).transpose(1, 2)
        x = attend(*qkv.split(heads, dim=1), self.fused_attn)
        return self.to_out(x.transpose(1, 2).reshape(-1, heads * self.dim_head))


class Attention(nn.Module):
    """CaiT's and CrossViT's attention: bias-free q and kv Dense layers; keys and values come from
    ``x`` itself, or from ``x`` followed by a context (``kv_include_self``). ``talking_heads`` adds
    CaiT's head-mixing matrices before and after the softmax."""

    def __init__(self, dim: int, heads: int, dim_head: int, tokens: int, context_tokens: int = 0,
                 talking_heads: bool = False):
        super().__init__()
        self.dim, self.heads, self.dim_head = dim, heads, dim_head
        self.tokens, self.kv_tokens = tokens, tokens + context_tokens
        self.fused_attn = True
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim)
        if talking_heads:
            self.mix_heads_pre_attn = nn.Parameter(torch.zeros(heads, heads))
            self.mix_heads_post_attn = nn.Parameter(torch.zeros(heads, heads))
        else:
            self.mix_heads_pre_attn = self.mix_heads_post_attn = None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """(B*T, dim) queries, optional (B*T_context, dim) context; (B*T, dim) out."""
        heads, dim_head, tokens, kv_tokens = self.heads, self.dim_head, self.tokens, self.kv_tokens
        q = self.to_q(x).reshape(-1, tokens, heads, dim_head).transpose(1, 2)
        if context is not None:
            x = torch.cat([x.reshape(-1, tokens, self.dim),
                           context.reshape(-1, kv_tokens - tokens, self.dim)], dim=1).reshape(-1, self.dim)
        kv = self.to_kv(x).reshape(-1, kv_tokens, 2 * heads, dim_head).transpose(1, 2)
        k, v = kv.split(heads, dim=1)
        if self.mix_heads_pre_attn is None:
            x = attend(q, k, v, self.fused_attn)
        else:
            scores = (q * (dim_head ** -0.5)) @ k.transpose(-2, -1)
            scores = self._mix_heads(scores, self.mix_heads_pre_attn)
            x = self._mix_heads(torch.softmax(scores, dim=-1), self.mix_heads_post_attn) @ v
        return self.to_out(x.transpose(1, 2).reshape(-1, heads * dim_head))

    def _mix_heads(self, scores: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
        """einsum('b h i j, h g -> b g i j') as one MatMul with a constant (g, h) left operand."""
        shape = (-1, self.heads, self.tokens, self.kv_tokens)
        return (mix.t() @ scores.reshape(-1, self.heads, self.tokens * self.kv_tokens)).reshape(shape)


def embed_patches(pixels: torch.Tensor, dense: nn.Linear, patch: tuple[int, int],
                  img_size: tuple[int, int]) -> torch.Tensor:
    """Flax's ``rearrange('b (h p1) (w p2) c -> b (h w) (p1 p2 c)')`` then its Dense, from NCHW
    pixels: one Transpose and one Gemm with the kernel as stored. Returns (B * patches, dim)."""
    (height, width), (ph, pw), channels = img_size, patch, pixels.shape[1]
    x = pixels.reshape(-1, channels, height // ph, ph, width // pw, pw).permute(0, 2, 4, 3, 5, 1)
    return dense(x.reshape(-1, ph * pw * channels))


def check_patches(image_size: tuple[int, int], patch: tuple[int, int], img_size: tuple[int, int],
                  image_key: str = "image_size", patch_key: str = "patch_size") -> int:
    """How many patches ``img_size`` gives; Flax slices its position table to that many, so it may
    not exceed what ``image_size`` allots. Raises ValueError naming the config key."""
    for name, size in ((image_key, image_size), ("--img-size", img_size)):
        if size[0] % patch[0] or size[1] % patch[1]:
            shown = f"{size[0]}x{size[1]}"
            raise ValueError(f"{patch_key} {patch[0]}x{patch[1]} does not divide {name} {shown}")
    allotted = (image_size[0] // patch[0]) * (image_size[1] // patch[1])
    patches = (img_size[0] // patch[0]) * (img_size[1] // patch[1])
    if patches > allotted:
        raise ValueError(f"--img-size {img_size[0]}x{img_size[1]} gives {patches} patches of {patch[0]}x{patch[1]} "
                         f"but {image_key} {image_size[0]}x{image_size[1]} has position embeddings for {allotted}: "
                         f"pass --img-size {image_size[0]}x{image_size[1]} or a config with a larger {image_key}")
    return patches


def init_vit_weights(model: nn.Module, seed: int) -> None:
    """Seeded initialisation: truncated-normal kernels, position embeddings and class tokens (std 0.02),
    zero biases, unit LayerNorm gains, identity head mixing (CaiT's talking heads)."""
    generator = torch.Generator().manual_seed(seed)
    norm_gains = {id(m.weight) for m in model.modules() if isinstance(m, nn.LayerNorm) and m.weight is not None}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1].startswith("mix_heads"):
                param.copy_(torch.eye(param.shape[0]))
            elif id(param) in norm_gains:
                nn.init.ones_(param)
            elif param.ndim >= 2:
                trunc_normal_(param, generator)
            else:
                nn.init.zeros_(param)


# ----------------------------------------------------------------------------------------------
# Flax files


def read_flax_file(path: Path, family: str) -> dict:
    """The arrays of a Flax msgpack file; a PyTorch file is a usage error that says so."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint not found: {path}")
    if not is_flax_file(path):
        raise UsageError(f"{path} is a PyTorch checkpoint: {family} reads Flax msgpack files "
                         "(flax.serialization.to_bytes of the model's variables)")
    return read_flax_msgpack(path)


Rule = tuple[str, Callable[[re.Match], str]]  # (pattern for a Flax path, our key from the match)


def rename_flax(arrays: dict, rules: list[Rule]) -> dict:
    """Flax paths to our keys by the first matching regular expression, arrays in torch layout
    (``flax_to_torch``); a path no rule matches keeps its name, so strict loading reports it."""
    state_dict = {}
    for name, array in arrays.items():
        key = name
        for pattern, target in rules:
            match = re.fullmatch(pattern, name)
            if match:
                key = target(match)
                break
        state_dict[key] = flax_to_torch(name, array)
    return state_dict


def explain_config_mismatch(model: nn.Module, state_dict: dict, origin: str,
                            found: dict[str, tuple[object, str]]) -> str | None:
    """The first config key whose value the checkpoint contradicts, with the array that shows it.

    ``found`` maps config keys to (value in the file, the evidence) as a family reads them.
    """
    for key, (value, evidence) in found.items():
        ours = getattr(model.config, key)
        if value is not None and value != ours:
            shown = value if not isinstance(value, tuple) else list(value)
            return (f"{origin} has {key} {shown} ({evidence}), the config of {model.spec.name} says "
                    f"{ours if not isinstance(ours, tuple) else list(ours)}: pass --config with {key} {shown}")
    return None


def shape_of(state_dict: dict, key: str) -> tuple[int, ...] | None:
    tensor = state_dict.get(key)
    return None if tensor is None else tuple(tensor.shape)


def count_indexed(state_dict: dict, pattern: str) -> int:
    """How many distinct indices ``pattern`` (one ``(\\d+)`` group) matches among the keys."""
    return len({m.group(1) for k in state_dict for m in [re.match(pattern, k)] if m})
