"""PyTorch runner: the reference model itself, on CPU or CUDA, in fp32, fp16 or bf16, optionally compiled."""
from __future__ import annotations

from typing import Callable

import numpy as np

from twins_deploy.engines.base import EngineInfo, Runner
from twins_deploy.errors import UsageError

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class TorchRunner(Runner):
    """Runs a ``Twins`` model (or a callable that builds one) with ``torch.inference_mode``."""

    def __init__(self, model: object | Callable[[], object], *, device: str = "cpu", precision: str = "fp32",
                 compile: bool = False, threads: int | None = None, name: str | None = None):
        super().__init__()
        if precision not in DTYPES:
            raise UsageError(f"the torch backend runs {', '.join(DTYPES)}, not {precision}")
        self._source, self.device, self.precision = model, device, precision
        self.compile, self.threads = compile, threads
        self.name = name or ("torch" if precision == "fp32" else f"torch-{precision}")

    def _activate(self) -> None:
        import torch

        from twins_deploy.exporters.onnx import HEAD_OUTPUTS, export_metadata

        if self.device == "cuda" and not torch.cuda.is_available():
            raise UsageError("the torch engine was asked for CUDA but torch sees no CUDA GPU")
        if self.threads:
            torch.set_num_threads(self.threads)
        model = self._source if isinstance(self._source, torch.nn.Module) else self._source()
        self._dtype = getattr(torch, DTYPES[self.precision])
        self._model = model.to(self.device, self._dtype).eval()
        self._forward = torch.compile(self._model) if self.compile else self._model
        self._outputs = HEAD_OUTPUTS[model.output]  # the names an export of this head has
        self._info = EngineInfo(  # the metadata an export would carry, so preprocessing is identical
            name=self.name, backend="torch", device=self.device, precision=self.precision, input_name="pixel_values",
            input_shape=(-1, 3, *model.img_size), output_names=self._outputs,
            metadata=export_metadata(model, model.output),
            details={"torch": torch.__version__, "compile": self.compile, "threads": torch.get_num_threads()})

    def _deactivate(self) -> None:
        del self._model, self._forward

    def _infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device, self._dtype, non_blocking=True)
            if self.device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            out = self._forward(x)
            if self.device == "cuda":
                end.record()
            out = out if isinstance(out, (tuple, list)) else (out,)
            arrays = {name: t.float().cpu().numpy() for name, t in zip(self._outputs, out)}
        if self.device == "cuda":
            self.last_compute_ms = start.elapsed_time(end)
        return arrays

    def _describe(self) -> EngineInfo:
        return self._info
