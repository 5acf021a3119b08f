"""Load benchmark of ``polar-train serve`` on loopback, in one process: the same GRPO-like requests
against (a) batching + shared prefixes and (b) one request at a time with no sharing.

Each request is one rollout group: a prompt and its reference with ``--group`` outputs, sent
as POLAR's client sends them (SPEC 13). ``--clients`` threads each send ``--requests`` requests
back to back; latency is measured at the client. A fresh model of shape ``cpu`` (bench.py's
shapes) with the demo tokenizer; everything stays on 127.0.0.1 and the run is bounded by the
request count.

    OMP_NUM_THREADS=1 python scripts/bench_serve.py --clients 8 --requests 10 --group 8
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from bench import build_model  # noqa: E402  (scripts/bench.py)
from test_serve import Server, client_text  # noqa: E402

from polar_train.serve import Scorer  # noqa: E402
from polar_train.tokenizer import load_tokenizer, special_token_ids  # noqa: E402


def workload(num: int, group: int, seed: int) -> list[list[str]]:
    """``num`` requests, each ``group`` outputs of one prompt and reference (~100-token prompts)."""
    rng = random.Random(seed)
    words = "the a answer is number city river of and to in value step first then so".split()
    requests = []
    for _ in range(num):
        prompt = " ".join(rng.choice(words) for _ in range(60)) + "?"
        reference = " ".join(rng.choice(words) for _ in range(30))
        outputs = [" ".join(rng.choice(words) for _ in range(rng.randint(10, 40))) for _ in range(group)]
        requests.append([client_text({"prompt": prompt, "reference": reference, "output": o}) for o in outputs])
    return requests


def load(server: Server, requests: list[list[str]], clients: int) -> dict[str, float]:
    latencies: list[float] = []
    lock = threading.Lock()

    def client(mine: list[list[str]]) -> None:
        for texts in mine:
            body = json.dumps({"input": texts}).encode()
            start = time.perf_counter()
            req = urllib.request.Request(f"http://127.0.0.1:{server.port}/pooling", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=300) as answer:
                assert answer.status == 200
                answer.read()
            with lock:
                latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=client, args=(requests[c::clients],)) for c in range(clients)]
    before = server.get("/metrics")
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    after = server.get("/metrics")
    delta = {k: after[k] - before[k] for k in ("requests", "batches", "tokens_sent", "tokens_computed")}
    cuts = statistics.quantiles(latencies, n=100)
    return {"requests_per_s": len(requests) / wall, "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * cuts[98], "wall_s": wall, "tokens_sent": delta["tokens_sent"],
            "tokens_computed": delta["tokens_computed"], "requests_per_batch": delta["requests"] / delta["batches"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=10, help="per client")
    p.add_argument("--group", type=int, default=8, help="outputs per request (a GRPO group)")
    p.add_argument("--delay-ms", type=float, default=10.0, help="batching window of the batched server")
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--json", help="write the figures here too")
    args = p.parse_args()

    import torch

    torch.manual_seed(0)
    tokenizer = load_tokenizer(REPO / "data" / "tokenizer")
    _, reward_id = special_token_ids(tokenizer, None)
    model = build_model("cpu", len(tokenizer), reward_id, "sdpa", torch.device("cpu"), torch.float32).eval()
    requests = workload(args.clients * args.requests, args.group, seed=0)
    results = {}
    for name, shared, delay in (("one at a time, no sharing", False, 0.0),
                                ("batched + shared prefix", True, args.delay_ms)):
        scorer = Scorer(model, tokenizer, max_tokens=args.max_tokens, max_length=16384, shared_prefix=shared)
        server = Server(scorer, delay_ms=delay)
        try:
            load(server, requests[:args.clients], args.clients)  # warm-up, not counted
            results[name] = load(server, requests, args.clients)
        finally:
            server.close()
    base, fast = results["one at a time, no sharing"], results["batched + shared prefix"]
    for name, r in results.items():
        print(f"{name:28s} {r['requests_per_s']:7.2f} req/s  p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  "
              f"tokens computed {r['tokens_computed']} of {r['tokens_sent']} sent, "
              f"{r['requests_per_batch']:.2f} requests per batch")
    print(f"ratio batched/one-at-a-time: {fast['requests_per_s'] / base['requests_per_s']:.2f}x req/s, "
          f"p50 {fast['p50_ms'] / base['p50_ms']:.2f}x, p99 {fast['p99_ms'] / base['p99_ms']:.2f}x, "
          f"tokens computed {fast['tokens_computed'] / base['tokens_computed']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
