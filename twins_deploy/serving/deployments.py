"""The two Serve deployments: an HTTP ingress (FastAPI, no model) and the model, composed by a handle.

The ingress reads and bounds bodies, decodes and preprocesses images with the file's own metadata,
speaks our ``/v1`` JSON and the Open Inference Protocol (``/v2``, Triton's binary tensors included),
and retries a call whose model replica died on another replica. The model deployment only runs float
batches: ``@serve.batch`` gathers concurrent requests into one engine call, made on a worker thread
so the replica's event loop keeps taking requests.
"""

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.exceptions import HTTPException

from twins_deploy.raylocal import keep_replica_on_loopback
from twins_deploy.serving import protocol
from twins_deploy.serving.bodies import BadRequest, images_from_body, preprocess_images, read_body
from twins_deploy.serving.model_file import ModelFile, ServedModel
from twins_deploy.serving.options import AUTO_BATCHES, MAX_IMAGES_PER_REQUEST, ServeOptions

MODEL_VERSION = "1"
RETRY_SECONDS = 30.0  # how long the ingress keeps retrying a request whose replica died
RETRY_PAUSE_SECONDS = 0.2
REPLICA_HEADER = "twins-deploy-replica"  # which model replica answered: for logs and for tracing a failover


def _images(batches: list[np.ndarray]) -> int:
    """How many images a list of batches holds: what ``--max-batch`` counts."""
    return sum(len(batch) for batch in batches)


class EngineCalls:
    """One replica's engine calls: ``streams`` at once on a pool of as many threads, sharing ``threads``.
    A call that starts while no other runs gets a predictor with every thread instead: at low load a
    request then waits for one call on the whole machine, not on one stream's share (svt-s int8 at batch 1,
    2 threads: 17 ms rather than 34), for a second copy of the model in memory."""

    def __init__(self, model: ModelFile, threads: int, streams: int):
        self.threads, self.streams = threads, streams
        self.openvino = model.name.lower().endswith(".xml")
        # spin=False: the cores are the HTTP path's too; a call alone spins, its threads wait on each other
        self.sharing = model.predictor(threads=threads, spin=False, streams=streams)
        self.alone = model.predictor(threads=threads) if streams > 1 else self.sharing
        self.calls = {"alone": 0, "sharing": 0}
        self._running = 0  # calls in flight; read and written on the caller's event loop only
        self._pool = ThreadPoolExecutor(streams, thread_name_prefix="engine")

    async def run(self, batch: np.ndarray) -> np.ndarray:
        alone = self._running == 0
        self.calls["alone" if alone else "sharing"] += 1
        self._running += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._pool, (self.alone if alone else self.sharing).run, batch)
        finally:
            self._running -= 1

    def warm_up(self, largest_batch: int) -> None:
        """Every batch size once on each predictor, before traffic: an OpenVINO IR compiles once per size."""
        for size in range(1, largest_batch + 1):
            for predictor in (self.alone, self.sharing):  # the same one twice when streams is 1
                predictor.run(self._zeros(size))

    def default_batch(self) -> tuple[int, str]:
        """The batch size a replica takes when ``--max-batch`` is not given, and how it was chosen.

        An OpenVINO IR with several streams takes one image per call: its streams are its parallelism, and
        served batches of mixed sizes ran slower than single images in every interleaved round (svt-s int8,
        2 vCPUs, 3 rounds: 34.5-37.5 against 38.5-43.8 img/s at concurrency 32, and behind at 1 and 8 too).
        Otherwise the smallest of ``AUTO_BATCHES`` within 5% of the most images per second with every stream
        busy (3 calls each): a bigger batch only adds latency unless it pays."""
        if self.openvino and self.streams > 1:
            return 1, "one image per call on OpenVINO's streams"
        rates = {}
        for size in AUTO_BATCHES:
            batch = self._zeros(size)
            self.sharing.run(batch)
            started = time.perf_counter()
            list(self._pool.map(lambda _: [self.sharing.run(batch) for _ in range(3)], range(self.streams)))
            rates[size] = 3 * self.streams * size / (time.perf_counter() - started)
        return min(size for size, rate in rates.items() if rate >= 0.95 * max(rates.values())), "timed at start"

    def _zeros(self, size: int) -> np.ndarray:
        return np.zeros((size, *self.sharing.input_shape), np.float32)


# no access log: a line per call for what the ingress's own log already says
@serve.deployment(name="model", health_check_period_s=2.0, health_check_timeout_s=10.0,
                  logging_config={"enable_access_log": False})
class TwinsModel:
    """One engine (onnxruntime or OpenVINO) behind Serve's dynamic batching: ``streams`` batches at once,
    sharing ``threads`` threads (``EngineCalls``)."""

    def __init__(self, model: ModelFile, options: ServeOptions):
        keep_replica_on_loopback()
        self.replica_id = serve.get_replica_context().replica_id.unique_id  # answered in a response header
        self.engine = EngineCalls(model, options.engine_threads, options.engine_streams)
        self.max_batch, self.batch_chosen = ((options.max_batch, "--max-batch") if options.max_batch
                                             else self.engine.default_batch())
        # a batch counts images, not requests
        self.run_batch = serve.batch(self._run_batch, max_batch_size=self.max_batch,
                                     batch_wait_timeout_s=options.batch_wait_ms / 1000,
                                     max_concurrent_batches=self.engine.streams, batch_size_fn=_images)
        self.engine.warm_up(self.max_batch)

    def describe(self) -> dict:
        """What this replica runs: the engine, its threads and the batch size it takes; how many engine calls
        ran alone on every thread and how many shared them."""
        return {"providers": self.engine.sharing.providers, "threads": self.engine.threads,
                "streams": self.engine.streams, "max_batch": self.max_batch, "batch_chosen": self.batch_chosen,
                "calls": dict(self.engine.calls)}

    def ready(self) -> bool:
        """Answers once the engine is loaded: the ingress's readiness probe, without an inference."""
        return True

    async def infer(self, batch: np.ndarray) -> tuple[np.ndarray, str]:
        """The model's output rows for a preprocessed (N, 3, H, W) batch, and which replica ran them.
        A request of more images than an engine call takes is split; Serve batches the pieces."""
        pieces = [batch[start:start + self.max_batch] for start in range(0, len(batch), self.max_batch)]
        outputs = await asyncio.gather(*(self.run_batch(piece) for piece in pieces))
        return (outputs[0] if len(outputs) == 1 else np.concatenate(outputs)), self.replica_id

    async def _run_batch(self, batches: list[np.ndarray]) -> list[np.ndarray]:
        """The engine on requests Serve gathered (``self.run_batch``, batched in ``__init__``)."""
        sizes = np.cumsum([len(batch) for batch in batches])[:-1]
        joined = batches[0] if len(batches) == 1 else np.concatenate(batches)
        return np.split(await self.engine.run(joined), sizes)


api = FastAPI(title="twins-deploy", docs_url=None, redoc_url=None, openapi_url=None)


class _Traffic:
    """Requests this ingress process is answering, and whether it is draining (refusing new ones) for a stop."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.draining = False


_traffic = _Traffic()


class _CountRequests:
    """Counts the requests in flight and refuses new ones (503) while draining. Plain ASGI: Starlette's
    ``@app.middleware("http")`` runs every response through a stream of its own."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if _traffic.draining:
            refused = JSONResponse({"error": "the server is shutting down"}, status_code=503,
                                   headers={"Retry-After": "5", "Connection": "close"})
            return await refused(scope, receive, send)
        _traffic.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            _traffic.in_flight -= 1


api.add_middleware(_CountRequests)


async def _drain(timeout_s: float) -> int:
    """Module-level, like ``_traffic``'s other users: Serve ships the ingress class by value, and a method
    naming ``_traffic`` itself would carry a copy of it."""
    _traffic.draining = True
    deadline = time.monotonic() + timeout_s
    while _traffic.in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return _traffic.in_flight


@api.exception_handler(BadRequest)
async def _bad_request(request: Request, exc: BadRequest) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=exc.status, headers=exc.headers)


@api.exception_handler(protocol.ProtocolError)
async def _protocol_error(request: Request, exc: protocol.ProtocolError) -> JSONResponse:
    return JSONResponse(exc.as_dict(), status_code=exc.status)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:  # unknown route, wrong method
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)


@serve.deployment(name="ingress", max_ongoing_requests=1024)
@serve.ingress(api)
class Ingress:
    """HTTP in front of the model deployment: ``/v1`` (images in, classes out) and ``/v2`` (tensors)."""

    def __init__(self, model, served: ServedModel, options: ServeOptions):
        keep_replica_on_loopback()
        self.model = model
        self.served = served
        self.options = options

    # --- /v1: encoded images in, classes (or embeddings) out ------------------------------------

    @api.post("/v1/models/{name}/predict")
    async def predict(self, name: str, request: Request, top_k: int | None = None) -> JSONResponse:
        """One encoded image as the body, or a multipart form of ``file`` parts."""
        started = time.perf_counter()
        self._check_name(name)
        k = self._top_k(top_k)
        body = await read_body(request.headers, request.stream(), self.options.max_body_bytes)
        images = images_from_body(body, request.headers.get("content-type"))
        batch = await asyncio.to_thread(preprocess_images, images, self.served.metadata)
        outputs, replica = await self._infer(batch)
        answer: dict = {"model": self.served.name}
        if self.served.metadata.output == "logits":
            from twins_deploy.preprocess import top_k as top_classes

            rows = top_classes(outputs, self.served.metadata.class_names, k)
            answer["predictions"] = [{"class_ids": [c["class_id"] for c in row], "names": [c["name"] for c in row],
                                      "probs": [c["prob"] for c in row]} for row in rows]
        else:
            answer["embeddings"] = outputs.tolist()
        answer["server_ms"] = round((time.perf_counter() - started) * 1000, 3)
        return JSONResponse(answer, headers={REPLICA_HEADER: replica})

    # --- /v2: the Open Inference Protocol (KServe v2, Triton's HTTP API) ------------------------

    @api.get("/v2")
    async def server_metadata(self) -> JSONResponse:
        return JSONResponse(protocol.server_metadata())

    @api.get("/v2/health/live")
    async def live(self) -> Response:
        return Response(status_code=200)

    @api.get("/v2/health/ready")
    async def ready(self) -> Response:
        return Response(status_code=200 if await self._model_ready() else 503)

    @api.get("/v2/models/{name}")
    @api.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(self, name: str, version: str = MODEL_VERSION) -> JSONResponse:
        self._check_name(name, version)
        served = self.served
        return JSONResponse(protocol.model_metadata(served.name, [MODEL_VERSION], served.platform, served.input_name,
                                                    served.image_shape, {served.output_name: [served.output_dim]}))

    @api.get("/v2/models/{name}/ready")
    @api.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(self, name: str, version: str = MODEL_VERSION) -> Response:
        self._check_name(name, version)
        return Response(status_code=200 if await self._model_ready() else 503)

    @api.post("/v2/models/{name}/infer")
    @api.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(self, name: str, request: Request, version: str = MODEL_VERSION) -> Response:
        self._check_name(name, version)
        body = await read_body(request.headers, request.stream(), self.options.max_body_bytes)
        parsed = protocol.parse_infer_request(
            body, request.headers.get(protocol.HEADER_LENGTH), input_name=self.served.input_name,
            image_shape=self.served.image_shape, output_names=(self.served.output_name,),
            max_batch=MAX_IMAGES_PER_REQUEST)
        outputs, replica = await self._infer(parsed.batch)
        content, headers = protocol.encode_infer_response(self.served.name, MODEL_VERSION, parsed,
                                                          {self.served.output_name: outputs},
                                                          self.served.metadata.class_names)
        return Response(content, headers={**headers, REPLICA_HEADER: replica})

    async def drain(self, timeout_s: float = 60.0) -> int:
        """Refuse new requests (503) and wait until those in flight are answered, ``timeout_s`` at most;
        returns how many were still running then. The server calls it before deleting the app."""
        return await _drain(timeout_s)

    # --- shared --------------------------------------------------------------------------------

    def _check_name(self, name: str, version: str = MODEL_VERSION) -> None:
        if name != self.served.name:
            raise BadRequest(404, f"unknown model {name!r}; this server serves {self.served.name!r}")
        if version != MODEL_VERSION:
            raise BadRequest(404, f"model {name!r} has no version {version!r}; it has version {MODEL_VERSION}")

    def _top_k(self, top_k: int | None) -> int:
        k = self.options.top_k if top_k is None else top_k
        if not 1 <= k <= max(1, self.served.output_dim):
            raise BadRequest(400, f"top_k must be from 1 to {self.served.output_dim}, got {k}")
        return k

    async def _model_ready(self) -> bool:
        try:
            return await asyncio.wait_for(self.model.ready.remote(), timeout=10)
        except Exception:
            return False

    async def _infer(self, batch: np.ndarray) -> tuple[np.ndarray, str]:
        """The model's outputs and the replica that ran them. A call whose replica died is sent again
        (to a live replica) until ``RETRY_SECONDS`` have passed. A full queue is 503 with ``Retry-After``."""
        deadline = time.monotonic() + RETRY_SECONDS
        while True:
            try:
                return await self.model.infer.remote(batch)
            except BackPressureError:
                raise BadRequest(503, f"the model's queue is full ({self.options.max_queued} requests waiting); "
                                      "retry shortly", headers={"Retry-After": "1"}) from None
            except (ActorDiedError, ActorUnavailableError, RayActorError, DeploymentUnavailableError):
                if time.monotonic() > deadline:
                    raise BadRequest(503, "no model replica answered: they died or are restarting; retry shortly",
                                     headers={"Retry-After": "5"}) from None
                await asyncio.sleep(RETRY_PAUSE_SECONDS)


def application(model: ModelFile, served: ServedModel, options: ServeOptions):
    """The ingress bound to the model deployment, scaled and queued as ``options`` say."""
    scaling = ({"autoscaling_config": options.autoscaling_config()} if options.min_replicas is not None
               else {"num_replicas": options.replicas})
    engine = TwinsModel.options(
        max_ongoing_requests=options.running_at_once + options.max_queued, max_queued_requests=options.max_queued,
        ray_actor_options={"num_cpus": options.replica_cpus}, **scaling).bind(model, options)
    return Ingress.options(ray_actor_options={"num_cpus": 0}).bind(engine, served, options)
