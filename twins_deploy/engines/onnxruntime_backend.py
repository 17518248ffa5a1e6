"""onnxruntime runner: fp32, fp16 and int8 (QDQ) ONNX files on the CPU, CUDA or TensorRT providers."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from twins_deploy.engines.base import EngineInfo, Runner

_DEVICE = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda"}


def onnx_precision(metadata) -> str:
    """What an exported file holds: our int8/fp16 builders say so in the metadata; exports are fp32."""
    return metadata.extra.get("precision", "fp32")


class OnnxRuntimeRunner(Runner):
    """An ``InferenceSession`` made by ``create_session`` (full graph optimisation, thread cap)."""

    def __init__(self, path: str | Path, *, providers: list | None = None, threads: int | None = None,
                 name: str | None = None):
        super().__init__()
        self.path, self.providers, self.threads, self._name = Path(path), providers, threads, name

    def _activate(self) -> None:
        import onnxruntime as ort

        from twins_deploy.runtime.session import create_session, session_metadata

        self._session = create_session(self.path, providers=self.providers, threads=self.threads)
        metadata = session_metadata(self._session, str(self.path))
        (inp,) = self._session.get_inputs()
        self._input = inp.name
        self._outputs = tuple(o.name for o in self._session.get_outputs())
        providers = self._session.get_providers()
        precision = onnx_precision(metadata)
        self._info = EngineInfo(
            name=self._name or ("onnx" if precision == "fp32" else f"onnx-{precision}"), backend="onnxruntime",
            device=_DEVICE.get(providers[0], "cpu"), precision=precision, input_name=inp.name,
            input_shape=(-1, *inp.shape[1:]), output_names=self._outputs, metadata=metadata, artifact=str(self.path),
            details={"onnxruntime": ort.__version__, "providers": providers,
                     "threads": self._session.get_session_options().intra_op_num_threads})

    def _deactivate(self) -> None:
        del self._session

    def _infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        arrays = self._session.run(None, {self._input: batch})
        return {name: np.asarray(a, dtype=np.float32) for name, a in zip(self._outputs, arrays)}

    def _describe(self) -> EngineInfo:
        return self._info
