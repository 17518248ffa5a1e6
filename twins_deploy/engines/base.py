"""The one interface every backend implements, Polygraphy style.

A runner is built cheaply from an artifact (or a callable that makes one), does its heavy work in
``activate`` and frees it in ``deactivate``; ``with runner:`` does both. ``infer`` takes a float32
NCHW batch and returns float32 numpy outputs by name ("logits", "embedding" or "stage0".."stage3"),
so bench, infer and verify never care which backend they drive.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field

import numpy as np

from twins_deploy.errors import TwinsDeployError, UsageError
from twins_deploy.metadata import ModelMetadata


@dataclass(frozen=True)
class EngineInfo:
    """What a runner is: enough to label a bench row and to preprocess images for it."""

    name: str  # the engine's table name, e.g. "onnx-int8"
    backend: str  # "torch", "onnxruntime" or "tensorrt"
    device: str  # "cpu" or "cuda"
    precision: str  # "fp32", "fp16", "bf16", "int8" or "best"
    input_name: str
    input_shape: tuple[int, ...]  # (batch, 3, H, W); batch -1 when any batch is accepted
    output_names: tuple[str, ...]
    metadata: ModelMetadata
    artifact: str | None = None  # the file it runs, when it runs one
    max_batch: int | None = None  # a TensorRT profile's limit; None when unbounded
    details: dict = field(default_factory=dict)  # backend specifics: providers, threads, TensorRT version

    def as_dict(self) -> dict:
        info = asdict(self)
        info["metadata"] = {"model": self.metadata.model, "input_size": list(self.metadata.input_size),
                            "output": self.metadata.output, "weights": self.metadata.weights,
                            "num_classes": len(self.metadata.class_names)}
        return info


class Runner(ABC):
    """Load lazily, run many batches, release. Subclasses fill ``_activate``, ``_infer``, ``_describe``."""

    def __init__(self) -> None:
        self.active = False
        self.last_compute_ms: float | None = None  # device compute time of the last infer (GPU backends)

    def __enter__(self) -> Runner:
        self.activate()
        return self

    def __exit__(self, *exc_info) -> None:
        self.deactivate()

    def activate(self) -> None:
        if not self.active:
            self._activate()
            self.active = True

    def deactivate(self) -> None:
        if self.active:
            self._deactivate()
            self.active = False

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs for a (B, 3, H, W) float32 batch, as float32 arrays keyed by output name."""
        if not self.active:
            raise TwinsDeployError(f"{type(self).__name__} is not active: use 'with runner:' or call activate()")
        info = self.describe()
        expected = info.input_shape[1:]
        if batch.ndim != 4 or tuple(batch.shape[1:]) != tuple(expected):
            raise UsageError(f"input has shape {tuple(batch.shape)}, "
                             f"the engine takes (B, {', '.join(map(str, expected))})")
        if info.max_batch is not None and batch.shape[0] > info.max_batch:
            raise UsageError(f"batch {batch.shape[0]} is larger than the engine's maximum {info.max_batch}: "
                             "rebuild it with a larger --max-batch or use a smaller batch")
        return self._infer(np.ascontiguousarray(batch, dtype=np.float32))

    def describe(self) -> EngineInfo:
        if not self.active:
            raise TwinsDeployError(f"{type(self).__name__} must be activated before it can describe itself")
        return self._describe()

    @abstractmethod
    def _activate(self) -> None: ...

    def _deactivate(self) -> None:
        """Drop references so the backend frees its memory."""

    @abstractmethod
    def _infer(self, batch: np.ndarray) -> dict[str, np.ndarray]: ...

    @abstractmethod
    def _describe(self) -> EngineInfo: ...
