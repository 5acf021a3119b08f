"""``polar-train serve``: a trained POLAR reward model behind the HTTP protocols POLAR's client speaks.

POLAR's ``RewardModelClient`` (InternLM/POLAR ``src/polar/reward_func.py``, SPEC 13) encodes each
row itself into one text (``prompt + reference <|reward|> prompt + output [UNUSED_TOKEN_130]``)
and posts a list of them:

    server_type  request                                   score read from the response
    sglang       POST /classify {"model", "text": [...]}   a list: e["embedding"][0]
    vllm         POST /pooling  {"input": [...]}           res["data"]: e["data"][-1][0]
    lmdeploy     POST /pooling  {"input": [...]}           res["data"]: e["data"] (a number)

vLLM and LMDeploy send the same body to the same path and read different shapes, so the
server is told which to answer (``--pooling-format vllm|lmdeploy``). Each text is tokenized as
those servers do (BOS added) and its reward is the value at its last token, exactly as
``polar-train score`` computes it (``evaluate.group_rewards``). Also: ``POST /score`` takes our
score rows (``prompt``, ``reference``, ``output`` / ``chosen`` + ``rejected`` / ``candidates``)
and answers them as ``polar-train score`` writes them; ``GET /health``; ``GET /metrics``.

Batching: requests that arrive within ``--max-batch-delay-ms`` of the first waiting one form one
batch (up to ``--max-tokens`` tokens sent); its texts are grouped by their ids up to the
``<|reward|>`` separator (the same prompt and reference: a GRPO rollout group, across requests
too), and each group's common prefix runs once in packed forwards of ``--max-tokens``. The
model runs on one worker thread, off the event loop. The queue holds ``--max-queue`` requests;
beyond that a request gets 503 at once (never unbounded memory).

Why aiohttp: one well-kept dependency that is the asyncio HTTP server, its graceful SIGTERM
shutdown (in-flight requests finish) and the client the tests use; no ASGI stack on top.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from polar_train.evaluate import InferenceStats, group_rewards
from polar_train.tokenizer import encode_texts, special_token_ids

logger = logging.getLogger("polar_train")

POOLING_FORMATS = ("vllm", "lmdeploy")
REWARD_TEXT = "[UNUSED_TOKEN_130]"


class BadRequest(Exception):
    """A 4xx answer: ``field`` names the part of the request that is wrong."""

    def __init__(self, field_name: str, message: str, status: int = 400):
        super().__init__(f"{field_name}: {message}")
        self.field, self.message, self.status = field_name, message, status

    def body(self) -> dict[str, Any]:
        return {"error": {"field": self.field, "message": f"{self.field}: {self.message}", "code": self.status}}


def model_max_length(config: Any) -> int:
    """The longest sequence the model takes: its positions, times a dynamic / linear RoPE factor."""
    return int(config.max_position_embeddings * (config.rope_factor if config.rope_scaling else 1.0))


class Scorer:
    """Texts -> ids -> rewards with the packed, shared-prefix inference of ``polar-train score``."""

    def __init__(self, model: Any, tokenizer: Any, *, max_tokens: int, max_length: int, shared_prefix: bool = True):
        self.model, self.tokenizer, self.shared_prefix = model, tokenizer, shared_prefix
        self.max_tokens, self.max_length = max_tokens, min(max_length, model_max_length(model.config))
        self.sep_id, self.reward_id = special_token_ids(tokenizer, model.config.reward_token_id)

    def encode(self, texts: Any, name: str) -> list[list[int]]:
        """Validate the request's list of texts (``name``: its JSON field) and tokenize it."""
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list):
            raise BadRequest(name, f"expected a list of strings, got {type(texts).__name__}")
        if not texts:
            raise BadRequest(name, "is an empty list; send at least one text")
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text:
                raise BadRequest(f"{name}[{i}]", "expected a non-empty string (POLAR's client encodes each row)")
        seqs = encode_texts(self.tokenizer, texts)
        for i, ids in enumerate(seqs):
            if len(ids) > self.max_length:
                raise BadRequest(f"{name}[{i}]", f"is {len(ids)} tokens, over the limit of {self.max_length}",
                                 status=413)
            if ids[-1] != self.reward_id:
                raise BadRequest(f"{name}[{i}]", f"does not end with {REWARD_TEXT}, the token whose value is the "
                                 "reward (encode the row with POLAR's RewardModelClient.encode)")
        return seqs

    def rewards(self, seqs: Sequence[Sequence[int]]) -> tuple[list[float], InferenceStats]:
        """One reward per sequence; sequences with the same ids up to ``<|reward|>`` share their prefix."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for k, ids in enumerate(seqs):
            key = tuple(ids[:ids.index(self.sep_id) + 1]) if self.sep_id in ids else (-1 - k,)
            groups.setdefault(key, []).append(k)
        members = list(groups.values())
        stats = InferenceStats()
        out = group_rewards(self.model, [[seqs[k] for k in m] for m in members], max_tokens=self.max_tokens,
                            shared_prefix=self.shared_prefix, share_max_len=self.model.config.share_max_len,
                            stats=stats)
        rewards = [0.0] * len(seqs)
        for m, values in zip(members, out):
            for k, value in zip(m, values):
                rewards[k] = value
        return rewards, stats


def _percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Metrics:
    """What ``GET /metrics`` reports (since the server started)."""

    requests: int = 0
    rejected_full: int = 0  # 503: the queue was full
    bad_requests: int = 0  # 4xx
    sequences: int = 0
    tokens_sent: int = 0  # summed lengths of the scored texts
    tokens_computed: int = 0  # tokens the model ran (shared prefixes once)
    batches: int = 0
    batch_requests: deque = field(default_factory=lambda: deque(maxlen=10_000))
    latencies_ms: deque = field(default_factory=lambda: deque(maxlen=10_000))

    def snapshot(self) -> dict[str, Any]:
        lat, sizes = list(self.latencies_ms), list(self.batch_requests)
        return {
            "requests": self.requests, "rejected_queue_full": self.rejected_full, "bad_requests": self.bad_requests,
            "sequences": self.sequences, "tokens_sent": self.tokens_sent, "tokens_computed": self.tokens_computed,
            "tokens_saved_by_shared_prefix": self.tokens_sent - self.tokens_computed, "batches": self.batches,
            "requests_per_batch_mean": sum(sizes) / len(sizes) if sizes else None,
            "requests_per_batch_max": max(sizes) if sizes else None,
            "latency_ms": {f"p{int(q * 100)}": _percentile(lat, q) for q in (0.5, 0.9, 0.99)},
        }


class QueueFull(Exception):
    pass


class Batcher:
    """Collects requests for ``delay_s`` after the first, runs them as one batch on the worker thread."""

    def __init__(self, scorer: Scorer, metrics: Metrics, *, delay_s: float, max_queue: int):
        self.scorer, self.metrics, self.delay_s = scorer, metrics, delay_s
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=max_queue)
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="polar-serve")

    async def submit(self, seqs: list[list[int]]) -> list[float]:
        future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait((seqs, future))
        except asyncio.QueueFull:
            raise QueueFull from None
        return await future

    async def run_in_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

    async def loop(self) -> None:
        while True:
            batch = [await self.queue.get()]
            tokens = sum(len(s) for s in batch[0][0])
            deadline = time.monotonic() + self.delay_s
            while tokens < self.scorer.max_tokens and (left := deadline - time.monotonic()) > 0:
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
                tokens += sum(len(s) for s in batch[-1][0])
            seqs = [s for item, _ in batch for s in item]
            try:
                rewards, stats = await self.run_in_worker(self.scorer.rewards, seqs)
            except Exception as error:  # a model failure answers the batch with 500, the server stays up
                logger.exception("serve: a batch of %d requests failed", len(batch))
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            self.metrics.batches += 1
            self.metrics.batch_requests.append(len(batch))
            self.metrics.sequences += stats.num_sequences
            self.metrics.tokens_sent += stats.num_sequence_tokens
            self.metrics.tokens_computed += stats.num_packed_tokens
            start = 0
            for item, future in batch:
                if not future.done():  # the client may have gone
                    future.set_result(rewards[start:start + len(item)])
                start += len(item)
