"""``Predictor``: an exported ONNX file (or an OpenVINO IR, ``.xml``) in, class ids, names and probabilities out.

Preprocessing and class names come from the file's own metadata, so a service needs nothing but the
file. Each call keeps its state on the stack and onnxruntime's ``run`` is thread-safe, so one
Predictor serves concurrent requests.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, Union

import numpy as np
from PIL import Image

from twins_deploy.errors import TwinsDeployError, UsageError
from twins_deploy.metadata import ModelMetadata
from twins_deploy.preprocess import load_image, preprocess
from twins_deploy.preprocess import top_k as top_k_classes
from twins_deploy.runtime.session import Provider, create_session, session_metadata

# One image: a path, encoded bytes, a PIL image, a uint8 (H, W, 3) RGB array or a preprocessed
# float (3, H, W) array. A batch: a list of those, or a (N, H, W, 3) uint8 / (N, 3, H, W) float array.
ImageInput = Union[str, Path, bytes, bytearray, Image.Image, np.ndarray]
Images = Union[ImageInput, Sequence[ImageInput]]

_SINGLE = (str, Path, bytes, bytearray, Image.Image)
_INPUT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass(frozen=True)
class Prediction:
    """One image's top-k classes, best first, and the model's raw output row."""

    class_ids: tuple[int, ...]
    names: tuple[str, ...]
    probs: tuple[float, ...]  # softmax probabilities of those classes
    logits: np.ndarray = field(repr=False)  # (num_classes,) float32, all classes

    def as_dict(self) -> dict:
        """JSON-ready: ``{"class_ids": [...], "names": [...], "probs": [...]}``."""
        return {"class_ids": list(self.class_ids), "names": list(self.names), "probs": list(self.probs)}


class Predictor:
    """Loads an exported Twins ONNX file (onnxruntime) or OpenVINO IR (``.xml`` + ``.bin``: openvino, CPU)
    once; ``predict`` / ``embed`` from any thread.

    ``providers``: onnxruntime execution providers in order of preference, full names or
    ``"tensorrt"``, ``"cuda"``, ``"cpu"`` (default: TensorRT, CUDA, CPU, whichever are installed).
    ``threads`` caps onnxruntime's intra-op threads (default: all cores); ``spin=False`` lets them sleep
    between ops instead of busy-waiting, for cores shared with other processes (a server's).
    ``streams``: how many calls run at once, sharing the ``threads`` (see ``create_session``).
    """

    def __init__(self, model: str | Path | bytes, *, providers: list[Provider] | None = None,
                 threads: int | None = None, top_k: int = 5, spin: bool = True, streams: int = 1):
        if top_k < 1:
            raise UsageError(f"top_k must be at least 1, got {top_k}")
        self.source = "the model bytes" if isinstance(model, bytes) else str(model)
        self.session = create_session(model, providers, threads, spin, streams)
        self.metadata: ModelMetadata = session_metadata(self.session, self.source)
        self.top_k = top_k
        if self.metadata.output not in ("logits", "embedding"):
            raise TwinsDeployError(f"{self.source} outputs {self.metadata.output!r}; the Predictor serves models "
                                   "exported with head 'logits' or 'embedding'")
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise TwinsDeployError(f"{self.source} has {len(inputs)} inputs and {len(outputs)} outputs; "
                                   "expected one image input and one output")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        self._input_dtype = _INPUT_DTYPES.get(inputs[0].type)
        if self._input_dtype is None:
            raise TwinsDeployError(f"{self.source} takes {inputs[0].type}; expected a float image tensor")
        batch, *image_dims = inputs[0].shape
        if len(image_dims) != 3 or tuple(image_dims[1:]) != tuple(self.metadata.input_size):
            raise TwinsDeployError(f"{self.source}: input shape {inputs[0].shape} does not match its metadata "
                                   f"input size {self.metadata.input_size}")
        # A file exported with a fixed batch runs in chunks of that size (the last one padded).
        self._fixed_batch = batch if isinstance(batch, int) and batch > 0 else None

    @property
    def providers(self) -> list[str]:
        """The execution providers onnxruntime actually uses, in order."""
        return self.session.get_providers()

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.metadata.class_names

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """One preprocessed image: (3, height, width)."""
        return (3, *self.metadata.input_size)

    def __repr__(self) -> str:
        return f"Predictor({self.source!r}, model={self.metadata.model!r}, providers={self.providers})"

    def predict(self, images: Images, top_k: int | None = None) -> Prediction | list[Prediction]:
        """Top-k classes for one image (a ``Prediction``) or a batch (a list of them)."""
        if self.metadata.output != "logits":
            raise TwinsDeployError(f"{self.source} outputs {self.metadata.output}s, not classes: use embed()")
        batch, single = self._to_batch(images)
        logits = self.run(batch)
        rows = top_k_classes(logits, self.class_names, top_k or self.top_k)
        predictions = [Prediction(tuple(r["class_id"] for r in row), tuple(r["name"] for r in row),
                                  tuple(r["prob"] for r in row), out) for row, out in zip(rows, logits)]
        return predictions[0] if single else predictions

    def embed(self, images: Images) -> np.ndarray:
        """Image embeddings: (C,) for one image, (N, C) for a batch (models exported with head 'embedding')."""
        if self.metadata.output != "embedding":
            raise TwinsDeployError(f"{self.source} outputs {self.metadata.output}; export it with head "
                                   "'embedding' for embeddings, or use predict()")
        batch, single = self._to_batch(images)
        embeddings = self.run(batch)
        return embeddings[0] if single else embeddings

    def preprocess(self, images: Images) -> np.ndarray:
        """The (N, 3, H, W) float32 batch ``run`` takes, preprocessed as the model was trained."""
        return self._to_batch(images)[0]

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Raw model outputs (logits or embeddings) as float32 for a preprocessed (N, 3, H, W) batch."""
        batch = self._check_preprocessed(np.asarray(batch), batched=True)
        if self._fixed_batch is None:
            return self._run(batch)
        size = self._fixed_batch
        chunks = []
        for start in range(0, len(batch), size):
            chunk = batch[start:start + size]
            padded = np.concatenate([chunk, np.zeros((size - len(chunk), *chunk.shape[1:]), chunk.dtype)])
            chunks.append(self._run(padded)[:len(chunk)])
        return np.concatenate(chunks)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        feed = {self.input_name: np.ascontiguousarray(batch, dtype=self._input_dtype)}
        return np.asarray(self.session.run([self.output_name], feed)[0], dtype=np.float32)

    def _to_batch(self, images: Images) -> tuple[np.ndarray, bool]:
        """A float32 (N, 3, H, W) batch, and whether the caller passed a single image."""
        if isinstance(images, np.ndarray) and images.ndim == 4:
            if images.dtype == np.uint8:
                return np.stack([self._one(image) for image in images]), False
            return self._check_preprocessed(images, batched=True).astype(np.float32, copy=False), False
        if isinstance(images, _SINGLE) or isinstance(images, np.ndarray):
            return self._one(images)[None], True
        if isinstance(images, (list, tuple)):
            if not images:
                raise UsageError("no images to predict on: the list is empty")
            return np.stack([self._one(image) for image in images]), False
        raise UsageError(f"cannot predict on {type(images).__name__}: pass a path, bytes, a PIL image, "
                         "a numpy array, or a list of them")

    def _one(self, image: ImageInput) -> np.ndarray:
        """One image as a float32 (3, H, W) array."""
        if isinstance(image, np.ndarray):
            if image.dtype == np.uint8:
                if image.ndim != 3 or image.shape[2] != 3:
                    raise UsageError(f"a uint8 image array must be RGB of shape (H, W, 3), got {image.shape}")
                return preprocess(Image.fromarray(image, "RGB"), self.metadata)
            return self._check_preprocessed(image, batched=False).astype(np.float32, copy=False)
        if isinstance(image, _SINGLE):
            return preprocess(load_image(image), self.metadata)
        raise UsageError(f"cannot predict on {type(image).__name__}: pass a path, bytes, a PIL image or a numpy array")

    def _check_preprocessed(self, array: np.ndarray, batched: bool) -> np.ndarray:
        expected = ("N", *self.input_shape) if batched else self.input_shape
        wrong_shape = array.ndim != len(expected) or array.shape[-3:] != self.input_shape
        if not np.issubdtype(array.dtype, np.floating) or wrong_shape or (batched and len(array) == 0):
            raise UsageError(f"expected a preprocessed float array of shape {_shape(expected)} or uint8 RGB "
                             f"images of shape (H, W, 3), got {array.dtype} {_shape(array.shape)}")
        return array


def _shape(dims: tuple) -> str:
    return "(" + ", ".join(map(str, dims)) + ")"
