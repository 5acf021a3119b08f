"""The aiohttp application of ``polar-train serve`` (protocols and batching: ``polar_train.serve``).

Every answer is JSON. Errors: ``{"error": {"field", "message", "code"}}`` with 400 (bad JSON, a
wrong or missing field, an empty list, a text that does not end with the reward token), 413 (a
text over the model's limit), 503 (the queue is full: retry later) or 500 (the model failed;
the server stays up).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from polar_train.errors import UserError
from polar_train.scoring import score_rows
from polar_train.serve import Batcher, BadRequest, Metrics, QueueFull, Scorer

logger = logging.getLogger("polar_train")

SCORER, BATCHER, METRICS, SETTINGS = (web.AppKey(n, t) for n, t in (
    ("scorer", Scorer), ("batcher", Batcher), ("metrics", Metrics), ("settings", dict)))


def _error(error: BadRequest) -> web.Response:
    return web.json_response(error.body(), status=error.status)


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json(loads=json.loads)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest("body", f"is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise BadRequest("body", f"expected a JSON object, got {type(body).__name__}")
    return body


async def _texts_rewards(request: web.Request, name: str) -> tuple[dict[str, Any], list[float], list[int]]:
    """The request's texts (field ``name``) scored through the batcher; counts and logs the request."""
    app = request.app
    metrics = app[METRICS]
    start = time.perf_counter()
    body = await _json_object(request)
    if name not in body:
        raise BadRequest(name, f"is missing; expected {{\"{name}\": [text, ...]}}")
    seqs = app[SCORER].encode(body[name], name)
    try:
        rewards = await app[BATCHER].submit(seqs)
    except QueueFull:
        metrics.rejected_full += 1
        raise BadRequest("queue", f"is full ({app[BATCHER].queue.maxsize} requests waiting); retry later",
                         status=503) from None
    _count(app, start)
    return body, rewards, [len(s) for s in seqs]


def _count(app: web.Application, start: float) -> None:
    metrics = app[METRICS]
    metrics.requests += 1
    metrics.latencies_ms.append(1000 * (time.perf_counter() - start))
    every = app[SETTINGS]["log_every"]
    if every and metrics.requests % every == 0:
        m = metrics.snapshot()
        logger.info("serve: %d requests, %d sequences, %d tokens sent, %d computed (%d saved by shared prefixes), "
                    "p50 %.1f ms, p99 %.1f ms", m["requests"], m["sequences"], m["tokens_sent"], m["tokens_computed"],
                    m["tokens_saved_by_shared_prefix"], m["latency_ms"]["p50"], m["latency_ms"]["p99"])


async def classify(request: web.Request) -> web.Response:
    """SGLang's ``/classify``: one object per text, the reward in ``embedding[0]``."""
    _, rewards, lengths = await _texts_rewards(request, "text")
    return web.json_response([{"index": i, "embedding": [r], "meta_info": {"prompt_tokens": n}}
                              for i, (r, n) in enumerate(zip(rewards, lengths))])


async def pooling(request: web.Request) -> web.Response:
    """``/pooling``: vLLM's shape (``data`` per token; only the last token's, which is the reward) or
    LMDeploy's (``data`` the number), as ``--pooling-format`` says."""
    _, rewards, lengths = await _texts_rewards(request, "input")
    vllm = request.app[SETTINGS]["pooling_format"] == "vllm"
    data = [{"index": i, "object": "pooling", "data": [[r]] if vllm else r} for i, r in enumerate(rewards)]
    usage = {"prompt_tokens": sum(lengths), "total_tokens": sum(lengths)}
    return web.json_response({"object": "list", "data": data, "usage": usage})


async def score(request: web.Request) -> web.Response:
    """Our score rows (``{"rows": [...]}``) answered as ``polar-train score`` writes them."""
    start = time.perf_counter()
    body = await _json_object(request)
    rows = body.get("rows")
    if not isinstance(rows, list) or not rows:
        raise BadRequest("rows", "expected a non-empty list of score rows (prompt, reference, output | "
                         "chosen + rejected | candidates)")
    app = request.app
    scorer, settings = app[SCORER], app[SETTINGS]
    try:
        scored = await app[BATCHER].run_in_worker(lambda: score_rows(
            scorer.model, scorer.tokenizer, rows, max_length=settings["max_length"],
            max_response_length=settings["max_response_length"], max_tokens=scorer.max_tokens))
    except UserError as e:  # names the row: "row 3: field 'reference' ..."
        raise BadRequest(f"rows{e.where.removeprefix('row')}" if e.where.startswith("row ") else "rows",
                         f"{e.what}" + (f" ({e.fix})" if e.fix else "")) from None
    _count(app, start)
    return web.json_response({"rows": scored})


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    return web.json_response(request.app[METRICS].snapshot())


@web.middleware
async def json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every failure is a JSON answer; nothing a client sends takes the server down."""
    try:
        return await handler(request)
    except BadRequest as e:
        if e.status != 503:
            request.app[METRICS].bad_requests += 1
        return _error(e)
    except web.HTTPException as e:  # 404, 405 from routing
        message = (f"path: {request.method} {request.path}: {e.reason} "
                   "(POST /classify, /pooling, /score; GET /health, /metrics)")
        return web.json_response({"error": {"field": "path", "message": message, "code": e.status}}, status=e.status)
    except Exception as e:  # noqa: BLE001 - logged with its traceback, answered 500
        logger.exception("serve: %s %s failed", request.method, request.path)
        return web.json_response({"error": {"field": "server", "message": f"{type(e).__name__}: {e}",
                                            "code": 500}}, status=500)


def build_app(scorer: Scorer, *, delay_ms: float = 5.0, max_queue: int = 256, pooling_format: str = "vllm",
              max_length: int = 16384, max_response_length: int = 4096, log_every: int = 100) -> web.Application:
    app = web.Application(middlewares=[json_errors], client_max_size=256 * 2**20)
    app[SCORER], app[METRICS] = scorer, Metrics()
    app[SETTINGS] = {"pooling_format": pooling_format, "max_length": max_length,
                     "max_response_length": max_response_length, "log_every": log_every}

    async def batching(app: web.Application) -> AsyncIterator[None]:
        app[BATCHER] = Batcher(scorer, app[METRICS], delay_s=delay_ms / 1000, max_queue=max_queue)
        task = asyncio.create_task(app[BATCHER].loop())
        yield  # the handlers of in-flight requests have finished when cleanup runs
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        app[BATCHER].worker.shutdown(wait=True)

    app.cleanup_ctx.append(batching)
    app.add_routes([web.post("/classify", classify), web.post("/pooling", pooling), web.post("/score", score),
                    web.get("/health", health), web.get("/metrics", metrics)])
    return app


def serve(app: web.Application, host: str, port: int) -> None:
    """Run until SIGTERM / SIGINT; in-flight requests are answered before the process exits."""
    logger.info("serve: listening on http://%s:%d (POST /classify, /pooling, /score; GET /health, /metrics)",
                host, port)
    web.run_app(app, host=host, port=port, print=None, shutdown_timeout=60.0, access_log=None)
    logger.info("serve: stopped")
