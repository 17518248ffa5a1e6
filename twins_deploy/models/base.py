"""What every family's model shares: which output ``forward`` returns, and the attention path."""
from __future__ import annotations

import torch
from torch import nn


def trunc_normal_(tensor: torch.Tensor, generator: torch.Generator, std: float = 0.02) -> torch.Tensor:
    """N(0, std) truncated at 2 std by redrawing what falls outside: the distribution of
    ``nn.init.trunc_normal_``, ten times faster on CPU for the seeds' 50M-parameter models."""
    with torch.no_grad():
        flat = tensor.view(-1).normal_(0.0, std, generator=generator)
        redraw = (flat.abs() > 2 * std).nonzero().squeeze(1)
        while redraw.numel():
            values = torch.empty(redraw.numel(), dtype=flat.dtype).normal_(0.0, std, generator=generator)
            flat[redraw] = values
            redraw = redraw[values.abs() > 2 * std]
    return tensor


class DeployableModel(nn.Module):
    """Base of every registered model class. ``outputs`` lists what ``forward`` can return; each
    attention module carries ``fused_attn`` (SDPA when True, the explicit pattern when False)."""

    outputs: tuple[str, ...] = ("logits", "embedding")

    def __init__(self, config, img_size, output: str, spec, family: str, stride: int = 1):
        """What every model carries: its config, its spec, the input size fixed at build time, its classes."""
        from twins_deploy.models.registry import ModelSpec, to_size

        super().__init__()
        self.config = config
        self.spec = spec or ModelSpec("custom", config, family=family)
        self.img_size = to_size(img_size, stride)
        self.num_classes = config.num_classes
        self.output = output

    @property
    def output(self) -> str:
        return self._output

    @output.setter
    def output(self, value: str) -> None:
        if value not in self.outputs:
            raise ValueError(f"output must be one of {', '.join(self.outputs)}, got {value!r}")
        self._output = value

    def set_fused_attn(self, fused: bool) -> None:
        """SDPA (fastest in PyTorch) or explicit (Q * scale) @ K^T -> Softmax -> @ V (what exporters want)."""
        for module in self.modules():
            if module is not self and hasattr(module, "fused_attn"):
                module.fused_attn = fused

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        embedding = self.forward_embedding(pixels)
        return embedding if self.output == "embedding" else self.head(embedding)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Seeded: truncated-normal Linear and Conv weights (std 0.02), zero biases, unit LayerNorms."""
        generator = torch.Generator().manual_seed(seed)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                trunc_normal_(module.weight, generator)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
