"""benchmarks/serve_load.py's closed loop measures the steady state: every measured answer comes while all clients
are busy, every answer of the run is checked, and the count of requests sent is bounded (an aiohttp server on
127.0.0.1 that answers after a fixed pause and counts how many requests it holds at once)."""
from __future__ import annotations

import asyncio
import json
import time

from aiohttp import web

from conftest import load_benchmark
from servers import HOST

PAUSE_S = 0.02


async def _run_against_a_counting_server(concurrency: int, requests: int, warmup: int) -> tuple[dict, dict]:
    seen = {"at_once": 0, "most_at_once": 0, "received": 0, "received_at": [], "answered_at": []}

    async def predict(request: web.Request) -> web.Response:
        await request.read()
        seen["received"] += 1
        seen["received_at"].append(time.perf_counter())
        wrong = seen["received"] == 3  # one wrong answer, during the warm-up: still counted against the run
        seen["at_once"] += 1
        seen["most_at_once"] = max(seen["most_at_once"], seen["at_once"])
        await asyncio.sleep(PAUSE_S)
        seen["answered_at"].append(time.perf_counter())
        seen["at_once"] -= 1
        return web.json_response({"predictions": [{"class_ids": [7 if wrong else 5]}]})

    app = web.Application()
    app.router.add_post("/predict", predict)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        row = await load_benchmark("serve_load").closed_loop(f"http://{HOST}:{port}/predict", b"jpeg", concurrency, requests,
                                              warmup, deadline_s=30)
    finally:
        await runner.cleanup()
    return row, seen


def test_the_closed_loop_measures_only_answers_that_came_while_every_client_was_busy():
    concurrency, requests, warmup = 4, 24, 8
    row, seen = asyncio.run(_run_against_a_counting_server(concurrency, requests, warmup))
    assert seen["received"] == row["sent"] == warmup + requests + concurrency  # bounded: C more, no ramp-down
    assert seen["most_at_once"] == concurrency
    # the last measured answer came before the last request was sent: no client had stopped yet
    assert seen["answered_at"][warmup + requests - 1] <= seen["received_at"][-1]
    assert row["requests"] == row["answered"] == requests and not row["timed_out"]
    assert row["top1_classes"] == {"5": warmup + requests + concurrency - 1, "7": 1}  # every answer checked
    # throughput over the measured window: about C requests every PAUSE_S, well above a drained run's
    assert 0.5 * concurrency / PAUSE_S < row["throughput_img_per_s"] < 1.1 * concurrency / PAUSE_S
    assert row["latency_ms_p50"] >= PAUSE_S * 1000
    json.dumps(row)  # the report is JSON
