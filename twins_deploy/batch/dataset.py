"""``infer_dataset``: a ``ray.data.Dataset`` of images in, the same rows with predictions out, lazily.

For users who already have a Ray pipeline. The engine runs in a fixed pool of actors; Ray Data
restarts an actor that dies (``max_restarts=-1``) and reruns the batches it held, up to ``retries``
times each, so an input poisonous enough to kill its worker cannot loop for ever. A batch whose
retries run out is an errored block: Ray Data fails the job unless ``DataContext.max_errored_blocks``
allows it, and then its rows are missing from the result (``twins-deploy infer --ray`` allows it and
answers such rows with an error, so that every input is still there once).
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

from twins_deploy.batch.worker import EnginePackage, EngineWorker
from twins_deploy.errors import UsageError

TASK_RETRIES = 3  # reruns of a batch whose worker died, before it counts as an errored block
# Ray Data's usage poller, a thread that outlives the job, asks a Prometheus that a plain Ray lacks every 10 s
# and logs each failure at DEBUG with its traceback into ray-data.log. On Python 3.11 formatting a traceback
# calls ast.parse, whose state CPython shares between threads: an ast.parse on the main thread at that moment
# (torch.export does one per export) fails with "AST constructor recursion depth mismatch". Its DEBUG lines go.
RAY_DATA_USAGE_LOGGER = "ray.data._internal.usage"


def require_ray_data():
    """``ray`` with Ray Data, or a one-line error naming the extra that installs them."""
    try:
        import ray
        import ray.data  # noqa: F401  (pandas and pyarrow come with ray[data])
    except ImportError:
        raise UsageError("batch inference on Ray needs Ray Data: pip install 'twins-deploy[batch]'") from None
    logging.getLogger(RAY_DATA_USAGE_LOGGER).setLevel(logging.INFO)
    return ray


def pool_size(workers: int | None, threads: int | None, spare_cpus: float) -> tuple[int, int, float]:
    """(actors, engine threads each, CPUs each reserves) on the connected cluster.

    By default one single-threaded worker per CPU the pool may use: independent processes scale without
    sharing a thread pool. The pool leaves ``spare_cpus`` of the cluster's CPUs (at most half) to the steps
    before it: Ray Data waits for ever when the actors hold every CPU and a read task needs one. Actors
    reserve fractions of a CPU when more are asked for than fit; Ray Data spreads them over the nodes.
    """
    ray = require_ray_data()
    if (workers is not None and workers < 1) or (threads is not None and threads < 1):
        raise UsageError("--workers and --threads must be at least 1")
    cpus = ray.cluster_resources().get("CPU", 1.0)
    usable = max(cpus - spare_cpus, cpus / 2)
    threads = threads or 1
    workers = workers or max(1, int(usable // threads))
    return workers, threads, min(float(threads), usable / workers)


def infer_dataset(engine: str | Path | EnginePackage, dataset, *, topk: int = 5, batch_size: int = 32,
                  workers: int | None = None, threads: int | None = None, spare_cpus: float = 1.0,
                  retries: int = TASK_RETRIES):
    """Predictions for every row of ``dataset``, as a new (lazy) ``ray.data.Dataset``.

    ``engine``: an ONNX file or an OpenVINO IR (``.xml``), read here and shipped to the workers.
    ``dataset``: rows with the image in a ``bytes`` column (encoded, e.g. ``read_binary_files``), an
    ``image`` column (uint8 RGB arrays, e.g. ``read_images``) or a ``path`` column (local paths or URIs,
    read by the workers); a row whose ``error`` column is set passes through untouched.
    Returns the rows without their ``bytes``/``image``, with ``class_ids``, ``names`` and ``probs``
    (top ``topk``, best first) or ``embedding``, and ``error`` (null when the row was answered).
    ``workers`` actors each run the engine with ``threads`` threads on batches of ``batch_size``; by
    default as many single-threaded ones as fit the cluster's CPUs less ``spare_cpus``, which the steps
    before the pool (reading, decoding) need.
    """
    ray = require_ray_data()
    if not ray.is_initialized():
        raise UsageError("connect to Ray first: ray.init(address=...) (or run 'twins-deploy infer --ray')")
    if topk < 1 or batch_size < 1 or retries < 0:
        raise UsageError("topk and batch_size must be at least 1, retries at least 0")
    package = engine if isinstance(engine, EnginePackage) else EnginePackage.from_path(engine)
    schema = dataset.schema(fetch_if_missing=False)
    if schema is not None and not {"bytes", "image", "path"} & set(schema.names):
        raise UsageError(f"the dataset has columns {', '.join(schema.names)}: infer_dataset reads images from "
                         "a 'bytes', 'image' or 'path' column")
    workers, threads, cpus = pool_size(workers, threads, spare_cpus)
    from ray.data import ActorPoolStrategy

    with warnings.catch_warnings():  # Ray 2.60 takes an actor pool's retries only as (deprecated) remote args
        warnings.simplefilter("ignore", DeprecationWarning)
        return dataset.map_batches(
            EngineWorker, batch_size=batch_size, batch_format="pyarrow", zero_copy_batch=True,
            fn_constructor_kwargs={"engine": [ray.put(package)], "threads": threads, "topk": topk},
            compute=ActorPoolStrategy(size=workers, max_concurrent_calls_per_actor=2, enable_true_multi_threading=True),
            num_cpus=cpus, max_restarts=-1, max_task_retries=retries)

