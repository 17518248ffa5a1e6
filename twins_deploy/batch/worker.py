"""The Ray Data actor that classifies (or embeds) a batch: the engine loaded once, shipped from the driver.

The engine's files travel through Ray's object store, so a worker needs the package but not the file
on its disk. Each actor writes them to a private temporary folder, opens them with the same runner
``infer`` uses (onnxruntime or OpenVINO, same settings: identical numbers), and deletes the folder
once the engine is loaded. Every row comes back: a decode failure is that row's error, an engine
failure the error of the rows of that batch; nothing is raised for bad data.

Ray Data runs two calls per actor at once (``max_concurrent_calls_per_actor=2``): one reads and
decodes its batch while the other holds the engine, which runs one batch at a time.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from twins_deploy.engines.predict import HEADS, prediction_schema
from twins_deploy.errors import TwinsDeployError, UsageError

SOURCE_COLUMNS = ("bytes", "image", "path")  # what a row's image is read from, first found wins
ENGINE_SUFFIXES = (".onnx", ".xml")


@dataclass(frozen=True)
class EnginePackage:
    """An engine's files by name (``.onnx``, or an IR's ``.xml`` and ``.bin``) and the one to open."""

    files: dict[str, bytes]
    entry: str
    head: str  # "logits" or "embedding": which columns the rows get

    @classmethod
    def from_engine(cls, engine: str, source=None, log=lambda message: None) -> EnginePackage:
        """``--engine`` as ``infer`` takes it: a file, or a name (``onnx``, ``int8``, ``ov``...) resolved and
        built on the driver, as long as it resolves to an ONNX file or an OpenVINO IR."""
        from twins_deploy.engines.resolve import engine_kind, open_engine

        if engine_kind(engine) == "file":
            return cls.from_path(engine)
        runner = open_engine(engine, source, log=log)  # builds into the cache on first use; not activated
        path = getattr(runner, "path", None)
        if path is None or Path(path).suffix.lower() not in ENGINE_SUFFIXES:
            raise UsageError(f"--engine {engine} runs on {type(runner).__name__}; --ray runs ONNX files and OpenVINO "
                             "IRs: pick onnx, onnx-int8, ov, ov-bf16 or ov-int8, or an .onnx/.xml file")
        return cls.from_path(path)

    @classmethod
    def from_path(cls, path: str | Path) -> EnginePackage:
        """Read an engine file (and an IR's weights) on the driver, checked before any worker starts."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in ENGINE_SUFFIXES:
            raise UsageError(f"--ray runs ONNX files and OpenVINO IRs (.onnx, .xml), got {path.name}: export one "
                             "with 'twins-deploy export' or 'build --backend openvino'")
        if not path.is_file():
            raise UsageError(f"engine file not found: {path}")
        if suffix == ".xml":
            from twins_deploy.engines.openvino_backend import ir_metadata

            metadata = ir_metadata(path)
            files = {path.name: path.read_bytes(), path.with_suffix(".bin").name: path.with_suffix(".bin").read_bytes()}
        else:
            from twins_deploy.engines.artifacts import onnx_metadata

            metadata = onnx_metadata(path)
            files = {path.name: path.read_bytes()}
        if metadata.output not in HEADS:
            raise UsageError(f"{path.name} outputs {metadata.output}: batch inference writes classes (an export "
                             "with head 'logits') or embeddings (head 'embedding')")
        return cls(files, path.name, metadata.output)


def answer_fields(head: str) -> list:
    """The Arrow fields a worker adds to each row: the prediction columns of ``infer``'s Parquet
    output, without ``input`` (the dataset's own columns say which input a row is)."""
    return [f for f in prediction_schema(head) if f.name != "input"]


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class EngineWorker:
    """Ray Data callable class: a ``pyarrow.Table`` batch in, the same rows with predictions out."""

    def __init__(self, engine: list, threads: int | None, topk: int):
        import ray

        from twins_deploy.engines import open_engine

        package: EnginePackage = ray.get(engine[0])  # wrapped in a list so that Ray hands the reference over
        folder = Path(tempfile.mkdtemp(prefix="twins-deploy-engine-"))
        try:
            for name, data in package.files.items():
                (folder / name).write_bytes(data)
            self.runner = open_engine(str(folder / package.entry), threads=threads)
            self.runner.activate()  # reads the files: they can go (an IR's weights stay mapped)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        info = self.runner.describe()
        self.metadata, self.output_name, self.head = info.metadata, info.output_names[0], package.head
        self.topk = topk
        self.fields = answer_fields(self.head)
        self._engine_lock = threading.Lock()
        self._decoders = ThreadPoolExecutor(max_workers=max(1, threads or os.cpu_count() or 1))

    def _pixels(self, source) -> np.ndarray:
        """One row's image, preprocessed as the model was trained."""
        from PIL import Image

        from twins_deploy.batch.inputs import is_uri, read_bytes
        from twins_deploy.preprocess import load_image, preprocess

        if isinstance(source, np.ndarray):
            if source.dtype != np.uint8 or source.ndim != 3 or source.shape[2] != 3:
                raise TwinsDeployError(f"an image array must be uint8 RGB (H, W, 3), got {source.dtype} {source.shape}")
            return preprocess(Image.fromarray(source, "RGB"), self.metadata)
        if isinstance(source, str) and is_uri(source):
            try:
                return preprocess(load_image(read_bytes(source)), self.metadata)
            except TwinsDeployError as exc:  # load_image calls encoded bytes "bytes": name the URI instead
                raise TwinsDeployError(str(exc).replace("image bytes", f"image {source}", 1)) from None
        return preprocess(load_image(source), self.metadata)  # a local path: what infer reads, as infer does

    def _load(self, source) -> np.ndarray | str:
        """Preprocessed pixels, or the error message for this row."""
        try:
            return self._pixels(source)
        except TwinsDeployError as exc:
            return str(exc)
        except Exception as exc:  # a decoder bug must not lose the other rows
            return f"{type(exc).__name__}: {_first_line(exc)}"

    def __call__(self, batch):
        import pyarrow as pa

        from twins_deploy.preprocess import top_k

        rows = batch.num_rows
        source = next((name for name in SOURCE_COLUMNS if name in batch.column_names), None)
        errors = batch.column("error").to_pylist() if "error" in batch.column_names else [None] * rows
        if source is None:
            errors = [error or "the dataset has no 'bytes', 'image' or 'path' column" for error in errors]
            sources = [None] * rows
        elif source == "image":
            sources = list(_tensor_rows(batch.column("image")))
        else:
            sources = batch.column(source).to_pylist()
        wanted = [i for i in range(rows) if errors[i] is None and sources[i] is not None]
        for i in range(rows):
            if errors[i] is None and sources[i] is None:
                errors[i] = f"no {source} in this row"
        loaded = dict(zip(wanted, self._decoders.map(self._load, [sources[i] for i in wanted])))
        good = [i for i in wanted if not isinstance(loaded[i], str)]
        for i in wanted:
            if isinstance(loaded[i], str):
                errors[i] = loaded[i]
        results: dict[int, object] = {}
        if good:
            try:
                with self._engine_lock:  # one batch on the engine at a time; the other call decodes meanwhile
                    outputs = self.runner.infer(np.stack([loaded[i] for i in good]))[self.output_name]
                if self.head == "embedding":
                    results = {i: row.astype(np.float32).tolist() for i, row in zip(good, outputs)}
                else:
                    results = dict(zip(good, top_k(outputs, self.metadata.class_names, self.topk)))
            except Exception as exc:  # the engine failed on this batch: its rows say so, the job goes on
                message = str(exc) if isinstance(exc, TwinsDeployError) else f"{type(exc).__name__}: {_first_line(exc)}"
                for i in good:
                    errors[i] = f"the engine failed on this batch: {message}"
        if self.head == "embedding":
            columns = [[results.get(i) for i in range(rows)]]
        else:
            picks = [results.get(i) for i in range(rows)]
            columns = [[None if p is None else [c["class_id"] for c in p] for p in picks],
                       [None if p is None else [c["name"] for c in p] for p in picks],
                       [None if p is None else [c["prob"] for c in p] for p in picks]]
        replaced = {"bytes", "image", *(f.name for f in self.fields)}
        kept = batch.drop_columns([name for name in batch.column_names if name in replaced])
        for field, values in zip(self.fields, columns + [errors]):
            kept = kept.append_column(field, pa.array(values, field.type))
        return kept


def _tensor_rows(column):
    """The arrays of an ``image`` column as Ray Data's ``read_images`` makes it (a tensor extension type)."""
    for chunk in column.chunks:
        yield from chunk.to_numpy(zero_copy_only=False)
