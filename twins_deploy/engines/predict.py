"""Batch prediction over files, folders and globs: every input gets a line, with predictions or an error.

Decoding and preprocessing run on a thread pool one batch ahead of the engine, so the CPU decodes
batch i+1 while the engine runs batch i. Output lines come in input order, and are written as they
come (JSON lines, CSV, Parquet or a folder of Parquet parts), atomically.
"""
from __future__ import annotations

import csv
import glob
import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from twins_deploy.files import atomic_folder, atomic_output
from twins_deploy.engines.base import Runner
from twins_deploy.errors import TwinsDeployError, UsageError
from twins_deploy.memory import check_batch

OUTPUT_SUFFIXES = (".jsonl", ".csv", ".parquet")  # an output without a suffix is a folder of Parquet parts
CSV_COLUMNS = ("input", "rank", "class_id", "name", "prob", "error")
PARQUET_ROWS_PER_GROUP = 10_000
PARQUET_ROWS_PER_PART = 100_000  # a folder output gets part-00000.parquet, part-00001.parquet, ...
HEADS = ("logits", "embedding")  # what infer writes: top-k classes, or the embedding vector


@dataclass(frozen=True)
class InputItem:
    path: str
    error: str | None = None  # set when the input cannot even be found


def collect_inputs(patterns: Sequence[str]) -> list[InputItem]:
    """Files as given, folders walked recursively for images, globs expanded; misses become error items."""
    from twins_deploy.preprocess import IMAGE_SUFFIXES

    items: list[InputItem] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            found = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            items += [InputItem(p) for p in found] or [InputItem(pattern, "folder holds no images")]
        elif path.is_file():
            items.append(InputItem(pattern))
        elif glob.has_magic(pattern):
            found = sorted(p for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
            items += [InputItem(p) for p in found] or [InputItem(pattern, "no file matches this pattern")]
        else:
            items.append(InputItem(pattern, "file not found"))
    return items


def _load(path: str, meta) -> np.ndarray:
    from twins_deploy.preprocess import load_image, preprocess

    return preprocess(load_image(path), meta)


def predict(runner: Runner, items: Sequence[InputItem], *, topk: int = 5, batch_size: int = 32,
            workers: int | None = None, on_item: Callable[[], None] | None = None) -> Iterator[dict]:
    """One record per input, in order: ``{"input", "predictions": [...]}`` or ``{"input", "error"}``."""
    from twins_deploy.preprocess import top_k

    info = runner.describe()
    if info.metadata.output not in HEADS:
        raise UsageError(f"infer needs a classifier or an embedding export: this engine outputs {info.metadata.output}")
    batch_size = max(1, min(batch_size, info.max_batch or batch_size, len(items)))
    check_batch("infer", [info.metadata], batch_size)
    output = info.output_names[0]
    chunks = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        def submit(chunk) -> list[Future | None]:
            return [None if item.error else pool.submit(_load, item.path, info.metadata) for item in chunk]

        pending = submit(chunks[0]) if chunks else []
        for index, chunk in enumerate(chunks):
            futures = pending
            if index + 1 < len(chunks):
                pending = submit(chunks[index + 1])  # decode ahead while this batch runs
            arrays, records = [], []
            for item, future in zip(chunk, futures):
                if future is None:
                    records.append({"input": item.path, "error": item.error})
                    continue
                try:
                    arrays.append(future.result())
                    records.append(None)
                except TwinsDeployError as exc:
                    records.append({"input": item.path, "error": str(exc)})
                except Exception as exc:  # a preprocessing bug must not lose the other inputs
                    records.append({"input": item.path, "error": f"{type(exc).__name__}: {exc}"})
            if arrays:
                outputs = runner.infer(np.stack(arrays))[output]
                answers = iter([{"embedding": row.astype(np.float32).tolist()} for row in outputs]
                               if info.metadata.output == "embedding"
                               else [{"predictions": best} for best in top_k(outputs, info.metadata.class_names, topk)])
            for item, record in zip(chunk, records):
                yield record if record is not None else {"input": item.path, **next(answers)}
                if on_item:
                    on_item()


def check_output(output: str | Path, head: str = "logits") -> Path:
    """The output path, refused before any work when its format is unknown or cannot hold ``head``."""
    output = Path(output)
    suffix = output.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES and (suffix or output.is_file()):
        raise UsageError(f"--output must end in .jsonl, .csv or .parquet, or name a folder for Parquet parts; "
                         f"got {output.name}")
    if head == "embedding" and suffix == ".csv":
        raise UsageError("CSV holds top-k classes: write embeddings to .jsonl or .parquet")
    if not suffix and output.is_dir() and any(not _is_part(p) for p in output.iterdir()):
        raise UsageError(f"--output {output} is a folder with other files in it: name a new folder for the "
                         "Parquet parts (an earlier folder of parts is replaced)")
    return output


def _is_part(path: Path) -> bool:
    return path.is_file() and path.name.startswith("part-") and path.suffix == ".parquet"


def prediction_schema(head: str = "logits"):
    """The Arrow columns of a Parquet output (and of ``twins_deploy.batch``'s rows): ``input``, then
    ``class_ids``/``names``/``probs`` (best first) or ``embedding``, then ``error`` (null when answered)."""
    try:
        import pyarrow as pa
    except ImportError:
        raise UsageError("Parquet output needs pyarrow: pip install pyarrow") from None
    answer = [("embedding", pa.list_(pa.float32()))] if head == "embedding" else \
        [("class_ids", pa.list_(pa.int64())), ("names", pa.list_(pa.string())), ("probs", pa.list_(pa.float64()))]
    return pa.schema([("input", pa.string()), *answer, ("error", pa.string())])


def _columns(records: Sequence[dict], head: str) -> dict[str, list]:
    """Records as Parquet columns: one row per input."""
    columns = {"input": [r["input"] for r in records], "error": [r.get("error") for r in records]}
    if head == "embedding":
        columns["embedding"] = [r.get("embedding") for r in records]
    else:
        predictions = [r.get("predictions") for r in records]
        for column, key in (("class_ids", "class_id"), ("names", "name"), ("probs", "prob")):
            columns[column] = [None if p is None else [c[key] for c in p] for p in predictions]
    return columns


def _chunks(records: Iterable[dict], size: int) -> Iterator[list[dict]]:
    chunk: list[dict] = []
    for record in records:
        chunk.append(record)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _write_parquet(records: Iterable[dict], path: Path, head: str, rows: int | None = None) -> int:
    """Up to ``rows`` records (all when None) into one Parquet file; how many were written."""
    import itertools

    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = prediction_schema(head)
    written = 0
    with pq.ParquetWriter(path, schema) as writer:
        for chunk in _chunks(records if rows is None else itertools.islice(records, rows), PARQUET_ROWS_PER_GROUP):
            writer.write_table(pa.Table.from_pydict(_columns(chunk, head), schema=schema))
            written += len(chunk)
    return written


def write_predictions(records: Iterable[dict], output: str | Path, head: str = "logits") -> Path:
    """Write records as they come, atomically: JSON lines, CSV (one row per prediction, or one error
    row), Parquet (one row per input), or, for a path without a suffix, a folder of Parquet parts."""
    output = check_output(output, head)
    suffix = output.suffix.lower()
    if not suffix:
        prediction_schema(head)  # pyarrow present, before any record is consumed
        records = iter(records)
        with atomic_folder(output) as folder:
            part = 0  # a part short of PARQUET_ROWS_PER_PART is the last one
            while _write_parquet(records, folder / f"part-{part:05d}.parquet", head, PARQUET_ROWS_PER_PART) \
                    == PARQUET_ROWS_PER_PART:
                part += 1
        return output
    with atomic_output(output) as tmp:
        if suffix == ".parquet":
            _write_parquet(records, tmp, head)
        elif suffix == ".jsonl":
            with open(tmp, "w") as handle:
                for record in records:
                    handle.write(json.dumps(record) + "\n")
        else:
            with open(tmp, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, lineterminator="\n")
                writer.writeheader()
                for record in records:
                    if "error" in record:
                        writer.writerow({"input": record["input"], "error": record["error"]})
                    for rank, p in enumerate(record.get("predictions", []), start=1):
                        writer.writerow({"input": record["input"], "rank": rank, "class_id": p["class_id"],
                                         "name": p["name"], "prob": f"{p['prob']:.6f}"})
    return output
