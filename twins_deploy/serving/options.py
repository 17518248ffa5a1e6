"""Every setting of a served model in one place: the CLI, ``app()`` and a Serve config YAML fill the same object."""
from __future__ import annotations

from dataclasses import dataclass

from twins_deploy.errors import UsageError

MAX_IMAGES_PER_REQUEST = 64  # one request may carry several images (multipart, or a v2 batch); this many at most
AUTO_BATCHES = (1, 2, 4, 8)  # what a replica times at start when --max-batch is not given (EngineCalls.default_batch)


@dataclass(frozen=True)
class ServeOptions:
    """How the model deployment batches and queues, and what the ingress accepts.

    ``replicas`` is a fixed replica count; ``min_replicas``/``max_replicas`` turn on Serve's autoscaling
    instead. ``threads`` is each replica's engine threads (default: the CPUs a replica reserves;
    ``twins-deploy serve`` on a local Ray shares the machine's CPUs between the replicas). ``streams`` is
    how many batches a replica runs at once, sharing those threads (default: one thread each, the most
    images per second on a CPU, and a batch that starts while none runs gets every thread; ``streams=1``
    gives every batch every thread).
    """

    name: str | None = None  # the model name in URLs; default: the file's model name
    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    threads: int | None = None
    streams: int | None = None
    max_batch: int | None = None  # images per engine call (None: chosen by the replica, EngineCalls.default_batch)
    batch_wait_ms: float = 2.0
    max_queued: int = 64  # requests each replica queues beyond a batch, and again in front of the replicas; then 503
    max_body_mb: float = 16.0  # request bodies over this: 413, refused from the Content-Length header
    top_k: int = 5
    replica_cpus: float = 1.0  # Ray CPUs each model replica reserves

    def __post_init__(self) -> None:
        for key in ("replicas", "max_batch", "max_queued", "top_k", "threads", "streams"):
            value = getattr(self, key)
            if value is None and key in ("max_batch", "threads", "streams"):  # None: chosen for the replica
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UsageError(f"{_flag(key)} must be a whole number of at least 1, got {value!r}")
        if self.streams and self.threads and self.streams > self.threads:
            raise UsageError(f"--streams ({self.streams}) cannot exceed --threads ({self.threads}): each stream "
                             "needs a thread")
        if self.batch_wait_ms < 0:
            raise UsageError(f"--batch-wait-ms must be 0 or more, got {self.batch_wait_ms}")
        if self.max_body_mb <= 0:
            raise UsageError(f"--max-body-mb must be above 0, got {self.max_body_mb}")
        if self.replica_cpus < 0:
            raise UsageError(f"replica_cpus must be 0 or more, got {self.replica_cpus}")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise UsageError("--min-replicas and --max-replicas go together (Serve's autoscaling between them)")
        if self.min_replicas is not None and not 1 <= self.min_replicas <= self.max_replicas:
            raise UsageError(f"need 1 <= --min-replicas <= --max-replicas, got {self.min_replicas} and "
                             f"{self.max_replicas}")
        if self.name is not None and (not self.name or not all(c.isalnum() or c in "-_." for c in self.name)):
            raise UsageError(f"--name may hold letters, digits, '-', '_' and '.', got {self.name!r}")

    @property
    def engine_threads(self) -> int:
        return self.threads or max(1, int(self.replica_cpus))

    @property
    def engine_streams(self) -> int:
        return min(self.streams or self.engine_threads, self.engine_threads)

    @property
    def largest_batch(self) -> int:
        """The most images one engine call may take."""
        return self.max_batch or max(AUTO_BATCHES)

    @property
    def running_at_once(self) -> int:
        """The most images a replica runs at once: a batch on every stream."""
        return self.largest_batch * self.engine_streams

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    def autoscaling_config(self) -> dict | None:
        if self.min_replicas is None:
            return None
        return {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.running_at_once}


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")
