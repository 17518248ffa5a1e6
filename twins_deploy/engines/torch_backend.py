"""PyTorch runner: the reference model itself, on CPU or CUDA, in fp32, fp16 or bf16, optionally compiled
or, on CUDA, replayed as one CUDA graph per batch size (a launch-bound batch 1 pays one launch, not hundreds)."""
from __future__ import annotations

from typing import Callable

import numpy as np

from twins_deploy.engines.base import EngineInfo, Runner
from twins_deploy.errors import UsageError

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class TorchRunner(Runner):
    """Runs a ``Twins`` model (or a callable that builds one) with ``torch.inference_mode``."""

    def __init__(self, model: object | Callable[[], object], *, device: str = "cpu", precision: str = "fp32",
                 compile: bool = False, compile_backend: str = "inductor", cuda_graph: bool = False,
                 threads: int | None = None, name: str | None = None):
        """``compile_backend`` is torch.compile's backend: "eager" checks that the model traces without
        generating code (minutes on a small CPU). ``cuda_graph`` captures the eager model once per batch size."""
        super().__init__()
        if precision not in DTYPES:
            raise UsageError(f"the torch backend runs {', '.join(DTYPES)}, not {precision}")
        if cuda_graph and device != "cuda":
            raise UsageError(f"CUDA graphs need device cuda, not {device}")
        if cuda_graph and compile:
            raise UsageError("use compile or cuda_graph, not both")
        self._source, self.device, self.precision = model, device, precision
        self.compile, self.compile_backend, self.cuda_graph = compile, compile_backend, cuda_graph
        self.threads = threads
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
        self._forward = torch.compile(self._model, backend=self.compile_backend) if self.compile else self._model
        self._graphs = {}  # batch size -> (graph, static input, static outputs)
        self._outputs = HEAD_OUTPUTS[model.output]  # the names an export of this head has
        self._info = EngineInfo(  # the metadata an export would carry, so preprocessing is identical
            name=self.name, backend="torch", device=self.device, precision=self.precision, input_name="pixel_values",
            input_shape=(-1, 3, *model.img_size), output_names=self._outputs,
            metadata=export_metadata(model, model.output),
            details={"torch": torch.__version__, "compile": self.compile and self.compile_backend,
                     "cuda_graph": self.cuda_graph, "threads": torch.get_num_threads()})

    def _deactivate(self) -> None:
        del self._model, self._forward, self._graphs

    def _infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device, self._dtype, non_blocking=True)
            if self.device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            out = self._replay(x) if self.cuda_graph else self._forward(x)
            if self.device == "cuda":
                end.record()
            out = out if isinstance(out, (tuple, list)) else (out,)
            arrays = {name: t.float().cpu().numpy() for name, t in zip(self._outputs, out)}
        if self.device == "cuda":
            self.last_compute_ms = start.elapsed_time(end)
        return arrays

    def _replay(self, x):
        """Outputs of the CUDA graph for this batch size, captured on its first use (PyTorch's recipe:
        warm up on a side stream, capture, then copy each input into the captured one and replay)."""
        import torch

        if x.shape[0] not in self._graphs:
            static_input = x.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    self._forward(static_input)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_output = self._forward(static_input)
            self._graphs[x.shape[0]] = (graph, static_input, static_output)
        graph, static_input, static_output = self._graphs[x.shape[0]]
        static_input.copy_(x)
        graph.replay()
        return static_output

    def _describe(self) -> EngineInfo:
        return self._info
