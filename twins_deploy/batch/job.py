"""``twins-deploy infer --ray``: list the inputs, run them through ``infer_dataset``, write every input once.

The driver lists the inputs and numbers them; one block per engine batch goes to the actor pool; the
rows stream back in input order (``preserve_order``) and are written as they come, through the same
writers as ``infer`` (atomically: an interrupted job leaves no output). The driver keeps a bitmap of
the numbers it has written, so no input is written twice, and an input whose batch was dropped after
its retries ran out is written last with an error: every input exactly once.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from twins_deploy.batch.dataset import TASK_RETRIES, infer_dataset, require_ray_data
from twins_deploy.batch.inputs import list_inputs, worker_path
from twins_deploy.batch.worker import EnginePackage, answer_fields
from twins_deploy.engines.predict import InputItem, check_output, write_predictions

LOST = ("not answered: the worker running its batch died on every attempt ({tries}): an input that crashes "
        "the decoder, or a worker out of memory?")


@dataclass
class JobReport:
    """What a batch job did; ``records`` holds the rows only when no output file was asked for."""

    total: int
    failed: int = 0
    first_failure: dict | None = None
    lost: int = 0  # inputs whose batch ran out of retries
    records: list[dict] | None = None
    seconds_to_ray: float = 0.0  # starting or joining Ray
    seconds_to_first_result: float | None = None  # from the start of the job
    seconds: float = 0.0  # the whole job


@contextlib.contextmanager
def ray_for_job(address: str | None) -> Iterator[None]:
    """A connection for the job: the one this process already has, the cluster at ``address``, or a
    private local Ray on 127.0.0.1 (shut down at the end)."""
    ray = require_ray_data()
    if ray.is_initialized():
        yield
        return
    from twins_deploy.raylocal import ray_session

    with ray_session(address, extra="batch"):
        yield


@contextlib.contextmanager
def job_context() -> Iterator[None]:
    """Ray Data settings for the job, restored after: rows in input order, a batch out of retries
    dropped (and answered by the driver) rather than the job failed, our progress bar instead of Ray's."""
    from ray.data import DataContext

    context = DataContext.get_current()
    saved = (context.execution_options.preserve_order, context.max_errored_blocks, context.enable_progress_bars)
    context.execution_options.preserve_order = True
    context.max_errored_blocks = -1
    context.enable_progress_bars = False
    try:
        yield
    finally:
        (context.execution_options.preserve_order, context.max_errored_blocks, context.enable_progress_bars) = saved


def listing_dataset(items: Sequence[InputItem], batch_size: int):
    """The numbered inputs as a dataset of one block per engine batch: ``index``, ``input`` (as the user
    wrote it), ``path`` (where a worker reads it) and ``error`` (set when it could not even be listed)."""
    import pyarrow as pa
    import ray.data

    table = pa.table({
        "index": pa.array(range(len(items)), pa.int64()),
        "input": pa.array([item.path for item in items], pa.string()),
        "path": pa.array([None if item.error else worker_path(item.path) for item in items], pa.string()),
        "error": pa.array([item.error for item in items], pa.string()),
    })
    return ray.data.from_arrow([table.slice(start, batch_size) for start in range(0, len(items), batch_size)])


def to_record(name: str, row: dict, head: str) -> dict:
    """A worker's row as ``infer`` writes it: ``{"input", "predictions"}``, ``{"input", "embedding"}`` or
    ``{"input", "error"}``."""
    if row["error"] is not None:
        return {"input": name, "error": row["error"]}
    if head == "embedding":
        return {"input": name, "embedding": row["embedding"]}
    return {"input": name, "predictions": [{"class_id": c, "name": n, "prob": p}
                                           for c, n, p in zip(row["class_ids"], row["names"], row["probs"])]}


def run_job(engine: str | Path, inputs: Sequence[str], *, source=None, address: str | None = None,
            workers: int | None = None, threads: int | None = None, batch_size: int = 32, topk: int = 5,
            output: str | Path | None = None, retries: int = TASK_RETRIES,
            progress: Callable[[int, int], None] | None = None,
            log: Callable[[str], None] = lambda message: None) -> JobReport:
    """Every input of ``inputs`` through ``engine`` (a file, or a name built from ``source``, a
    ``ModelSource``) on Ray: written to ``output`` (.jsonl, .csv, .parquet, or a folder of Parquet
    parts), or returned in the report when ``output`` is None. ``progress(done, total)`` is called as
    rows arrive."""
    started = time.perf_counter()
    package = EnginePackage.from_engine(str(engine), source, log)
    if output is not None:
        output = check_output(output, package.head)
    items = list_inputs(inputs)
    report = JobReport(total=len(items))
    progress = progress or (lambda done, total: None)

    def rows() -> Iterator[dict]:
        written = bytearray(len(items))
        done = 0
        if any(item.error is None for item in items):
            connecting = time.perf_counter()
            with ray_for_job(address), job_context():
                report.seconds_to_ray = time.perf_counter() - connecting
                # the inputs are in memory already: no step before the pool needs a CPU
                dataset = infer_dataset(package, listing_dataset(items, batch_size), topk=topk, batch_size=batch_size,
                                        workers=workers, threads=threads, spare_cpus=0, retries=retries)
                for table in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
                    if report.seconds_to_first_result is None:
                        report.seconds_to_first_result = time.perf_counter() - started
                    for row in table.select(["index", *(f.name for f in answer_fields(package.head))]).to_pylist():
                        if written[row["index"]]:
                            continue  # a row Ray delivered twice is written once
                        written[row["index"]] = 1
                        done += 1
                        yield to_record(items[row["index"]].path, row, package.head)
                    progress(done, len(items))
        answered = done
        for index, item in enumerate(items):  # listed-only failures when Ray never ran; dropped batches
            if not written[index]:
                report.lost += item.error is None
                done += 1
                yield {"input": item.path, "error": item.error or LOST.format(tries=retries + 1)}
        if done > answered:
            progress(done, len(items))

    def counted(records: Iterator[dict]) -> Iterator[dict]:
        for record in records:
            if "error" in record:
                report.failed += 1
                report.first_failure = report.first_failure or record
            yield record

    if output is None:
        report.records = list(counted(rows()))
    else:
        write_predictions(counted(rows()), output, head=package.head)
    report.seconds = time.perf_counter() - started
    return report

