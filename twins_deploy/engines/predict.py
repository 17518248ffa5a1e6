"""Batch prediction over files, folders and globs: every input gets a line, with predictions or an error.

Decoding and preprocessing run on a thread pool one batch ahead of the engine, so the CPU decodes
batch i+1 while the engine runs batch i. Output lines come in input order.
"""
from __future__ import annotations

import csv
import glob
import io
import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from twins_deploy.files import atomic_output
from twins_deploy.engines.base import Runner
from twins_deploy.errors import TwinsDeployError, UsageError

OUTPUT_SUFFIXES = (".jsonl", ".csv")
CSV_COLUMNS = ("input", "rank", "class_id", "name", "prob", "error")


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
    if info.metadata.output != "logits":
        raise UsageError(f"infer needs a classifier: this engine outputs {info.metadata.output}")
    batch_size = max(1, min(batch_size, info.max_batch or batch_size))
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
                logits = runner.infer(np.stack(arrays))[output]
                best = iter(top_k(logits, info.metadata.class_names, topk))
            for item, record in zip(chunk, records):
                yield record if record is not None else {"input": item.path, "predictions": next(best)}
                if on_item:
                    on_item()


def check_output(output: str | Path) -> Path:
    """The output path, refused before any work when its format is unknown."""
    output = Path(output)
    if output.suffix.lower() not in OUTPUT_SUFFIXES:
        raise UsageError(f"--output must end in {' or '.join(OUTPUT_SUFFIXES)}, got {output.name}")
    return output


def write_predictions(records: Sequence[dict], output: str | Path) -> Path:
    """Write JSON lines or CSV (one row per prediction, or one error row) atomically."""
    output = check_output(output)
    if output.suffix.lower() == ".jsonl":
        text = "".join(json.dumps(record) + "\n" for record in records)
    else:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for record in records:
            if "error" in record:
                writer.writerow({"input": record["input"], "error": record["error"]})
            for rank, p in enumerate(record.get("predictions", []), start=1):
                writer.writerow({"input": record["input"], "rank": rank, "class_id": p["class_id"], "name": p["name"],
                                 "prob": f"{p['prob']:.6f}"})
        text = buffer.getvalue()
    with atomic_output(output) as tmp:
        tmp.write_text(text)
    return output
