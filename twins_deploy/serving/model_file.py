"""The served engine file: read once where the app is built, shipped to every replica as bytes.

A replica on another node of a cluster needs the package, not the file on its disk. What the
file says of itself (name, preprocessing, input and output) is read once here too, so the ingress
knows it without loading an engine.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from twins_deploy.errors import UsageError
from twins_deploy.metadata import ModelMetadata

SERVABLE_SUFFIXES = (".onnx", ".xml")


@dataclass(frozen=True)
class ServedModel:
    """What the ingress answers about the model and needs to preprocess for it."""

    name: str
    platform: str  # as Triton names it: "onnxruntime_onnx" or "openvino"
    metadata: ModelMetadata
    input_name: str
    output_name: str
    output_dim: int  # classes for logits, channels for an embedding

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, *self.metadata.input_size)


@dataclass(frozen=True)
class ModelFile:
    """An ONNX file, or an OpenVINO IR's ``.xml`` and ``.bin``, as bytes."""

    name: str
    files: dict[str, bytes] = field(repr=False)

    @classmethod
    def read(cls, path: str | Path) -> ModelFile:
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in SERVABLE_SUFFIXES:
            raise UsageError(f"serve runs an exported .onnx file or an OpenVINO IR (.xml), got {path.name}")
        parts = [path] if suffix == ".onnx" else [path, path.with_suffix(".bin")]
        for part in parts:
            if not part.is_file():
                raise UsageError(f"model file not found: {part}")
        return cls(path.name, {part.name: part.read_bytes() for part in parts})

    def predictor(self, threads: int | None = None, spin: bool = True, streams: int = 1):
        """A ``Predictor`` on these bytes. An IR is written to a private temporary folder that is removed
        once OpenVINO has read it (it maps the weights; the mapping outlives the file on Linux)."""
        from twins_deploy.runtime import Predictor

        if len(self.files) == 1:
            return Predictor(self.files[self.name], providers=["cpu"], threads=threads, spin=spin, streams=streams)
        with tempfile.TemporaryDirectory(prefix="twins-deploy-ir-") as folder:
            for name, data in self.files.items():
                (Path(folder) / name).write_bytes(data)
            return Predictor(Path(folder) / self.name, providers=["cpu"], threads=threads, streams=streams)

    def describe(self, name: str | None = None) -> ServedModel:
        """Load the file once (one thread) to check that it serves, and say what it is."""
        predictor = self.predictor(threads=1)
        output = predictor.session.get_outputs()[0]
        return ServedModel(name=name or predictor.metadata.model.replace("/", "-"),
                           platform="openvino" if self.name.lower().endswith(".xml") else "onnxruntime_onnx",
                           metadata=predictor.metadata, input_name=predictor.input_name,
                           output_name=predictor.output_name, output_dim=int(output.shape[-1]))
