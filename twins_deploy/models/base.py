"""What every family's model shares: which output ``forward`` returns, and the attention path."""
from __future__ import annotations

from torch import nn


class DeployableModel(nn.Module):
    """Base of every registered model class. ``outputs`` lists what ``forward`` can return; each
    attention module carries ``fused_attn`` (SDPA when True, the explicit pattern when False)."""

    outputs: tuple[str, ...] = ("logits", "embedding")

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
