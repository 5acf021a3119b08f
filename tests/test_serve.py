"""``polar-train serve``: POLAR's client protocols answer what ``polar-train score`` computes (SPEC 13)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from aiohttp import web

from polar_train.scoring import load_scorer, score_rows
from polar_train.serve import Scorer
from polar_train.serve_http import BATCHER, METRICS, build_app
from test_errors import assert_one_error, run_cli
from test_scoring import build_checkpoint

REPO = Path(__file__).resolve().parents[1]
MIRROR = Path("/work/.mirror/InternLM+POLAR/repo")
PROMPTS = ["What is the capital of China?", "What is 7 + 5?", "Name a fruit."]
REFERENCES = ["Beijing.", "12", "apple"]
OUTPUTS = ["Beijing.", "Shanghai.", "It is Beijing.", "12", "13", "apple", "pear", "I do not know."]
ROWS = [{"prompt": p, "reference": r, "output": o} for p, r in zip(PROMPTS, REFERENCES) for o in OUTPUTS]
ROWS += [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."}],
          "reference": [{"role": "assistant", "content": "apple"}], "output": "pear"},
         {"prompt": "What is the capital of China?", "reference": "Beijing.", "output": "Beijing.",
          "wrapper": "pretrain"}]


def client_text(row: dict) -> str:
    """POLAR's client text for a row with no truncation (SPEC 13; reward_func.py ``_encode``)."""
    def join(x):
        return "\n".join(m["content"] for m in x) if isinstance(x, list) else x
    p, r, o = join(row["prompt"]), join(row["reference"]), join(row["output"])
    sep = "" if row.get("wrapper") == "pretrain" else "\n"
    return f"{p}{sep}{r}<|reward|>{p}{sep}{o}[UNUSED_TOKEN_130]"


class Server:
    """The app on an ephemeral loopback port, its event loop on a thread."""

    def __init__(self, scorer: Scorer, **options):
        self.loop = asyncio.new_event_loop()
        self.app = build_app(scorer, **options)
        self.runner = web.AppRunner(self.app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def post(self, path: str, body, raw: bytes | None = None) -> tuple[int, object]:
        data = raw if raw is not None else json.dumps(body).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=30) as answer:
            return json.loads(answer.read())

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, repo_root, sharp_tiny_model) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("serve") / "ckpt", repo_root / "data" / "tokenizer",
                            sharp_tiny_model(seed=3))


@pytest.fixture(scope="module")
def scorer(checkpoint) -> Scorer:
    model, tokenizer = load_scorer(checkpoint, device="cpu")
    return Scorer(model, tokenizer, max_tokens=512, max_length=16384)


@pytest.fixture(scope="module")
def expected(scorer) -> list[float]:
    rewards = [row["reward"] for row in score_rows(scorer.model, scorer.tokenizer, ROWS)]
    assert len(set(rewards)) == len(rewards)  # the rows are told apart: a mix-up cannot pass
    return rewards


@pytest.fixture(scope="module")
def servers(scorer):
    both = {fmt: Server(scorer, pooling_format=fmt, delay_ms=2) for fmt in ("vllm", "lmdeploy")}
    yield both
    for server in both.values():
        server.close()


def published_client() -> types.ModuleType:
    """POLAR's ``reward_func.py`` as published: $POLAR_CLIENT_SRC, or the local InternLM/POLAR mirror."""
    source = os.environ.get("POLAR_CLIENT_SRC")
    if source:
        text = Path(source).read_text()
    elif MIRROR.is_dir():
        done = subprocess.run(["git", "-C", str(MIRROR), "show", "HEAD:src/polar/reward_func.py"],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot read reward_func.py from {MIRROR}: {done.stderr.strip()}")
        text = done.stdout
    else:
        pytest.skip("POLAR's client not available: set POLAR_CLIENT_SRC to InternLM/POLAR src/polar/reward_func.py")
    pytest.importorskip("requests")
    module = types.ModuleType("polar_reward_func")
    exec(compile(text, "reward_func.py", "exec"), module.__dict__)
    return module


@pytest.mark.parametrize("server_type", ["sglang", "vllm", "lmdeploy"])
def test_polars_published_client_gets_the_rewards_of_score(server_type, servers, checkpoint, expected):
    module = published_client()
    server = servers["lmdeploy" if server_type == "lmdeploy" else "vllm"]
    client = module.RewardModelClient(str(checkpoint), server_type=server_type,
                                      server_address=f"127.0.0.1:{server.port}")
    assert client.encode(ROWS) == [client_text(row) for row in ROWS]  # what the always-on test sends
    rewards = client(ROWS)
    assert rewards == pytest.approx(expected, abs=1e-5)


def test_each_protocol_answers_the_rewards_of_score_over_plain_http(servers, expected):
    texts = [client_text(row) for row in ROWS]
    code, answer = servers["vllm"].post("/classify", {"model": "ckpt", "text": texts})
    assert code == 200 and [e["embedding"][0] for e in answer] == pytest.approx(expected, abs=1e-5)
    code, answer = servers["vllm"].post("/pooling", {"input": texts})
    assert code == 200 and [e["data"][-1][0] for e in answer["data"]] == pytest.approx(expected, abs=1e-5)
    code, answer = servers["lmdeploy"].post("/pooling", {"input": texts})
    assert code == 200 and [e["data"] for e in answer["data"]] == pytest.approx(expected, abs=1e-5)
    code, answer = servers["vllm"].post("/score", {"rows": ROWS})
    assert code == 200 and [r["reward"] for r in answer["rows"]] == pytest.approx(expected, abs=1e-6)


def test_a_rollout_group_computes_its_prefix_once(scorer, expected):
    server = Server(scorer, delay_ms=0)
    try:
        group = [k for k, row in enumerate(ROWS[:len(OUTPUTS)])]  # one prompt and reference, 8 outputs
        seqs = scorer.encode([client_text(ROWS[k]) for k in group], "text")
        common = next(i for i in range(min(map(len, seqs))) if len({s[i] for s in seqs}) > 1)
        code, answer = server.post("/classify", {"text": [client_text(ROWS[k]) for k in group]})
        assert code == 200 and [e["embedding"][0] for e in answer] == pytest.approx(expected[:8], abs=1e-5)
        m = server.get("/metrics")
        assert (m["requests"], m["sequences"], m["tokens_sent"]) == (1, 8, sum(map(len, seqs)))
        assert m["tokens_saved_by_shared_prefix"] == (len(seqs) - 1) * common  # the prefix ran once, not 8 times
    finally:
        server.close()


def test_concurrent_clients_are_all_answered_and_share_prefixes_across_requests(scorer, expected):
    server = Server(scorer, delay_ms=20)
    texts = [client_text(row) for row in ROWS]
    failures: list[str] = []

    def client(c: int) -> None:
        for k in range(50):
            start = (c * 7 + k * 3) % len(ROWS)
            picked = [(start + j) % len(ROWS) for j in range(1 + (c + k) % 4)]
            code, answer = server.post("/pooling", {"input": [texts[i] for i in picked]})
            got = [e["data"][-1][0] for e in answer["data"]] if code == 200 else answer
            if got != pytest.approx([expected[i] for i in picked], abs=1e-5):
                failures.append(f"client {c} request {k}: {got}")

    try:
        threads = [threading.Thread(target=client, args=(c,)) for c in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert failures == []
        m = server.get("/metrics")
        assert m["requests"] == 400 and m["requests_per_batch_max"] > 1  # requests were batched together
        assert 0 < m["tokens_computed"] < m["tokens_sent"]
    finally:
        server.close()


@pytest.mark.parametrize("path, body, raw, code, field", [
    ("/classify", None, b"{not json", 400, "body"),
    ("/classify", [1, 2], None, 400, "body"),
    ("/classify", {"model": "m"}, None, 400, "text"),
    ("/classify", {"text": []}, None, 400, "text"),
    ("/classify", {"text": {"a": 1}}, None, 400, "text"),
    ("/pooling", {"input": ["ok[UNUSED_TOKEN_130]", 7]}, None, 400, "input[1]"),
    ("/pooling", {"input": ["no reward token at the end"]}, None, 400, "input[0]"),
    ("/pooling", {"input": ["a " * 3000 + "[UNUSED_TOKEN_130]"]}, None, 413, "input[0]"),
    ("/score", {"rows": []}, None, 400, "rows"),
    ("/score", {"rows": [{"prompt": "p", "reference": "r", "output": "o"}, {"prompt": "p"}]}, None, 400, "rows 2"),
    ("/nowhere", {}, None, 404, "path"),
])
def test_each_bad_request_is_a_4xx_json_naming_the_field(scorer, path, body, raw, code, field):
    server = Server(Scorer(scorer.model, scorer.tokenizer, max_tokens=512, max_length=4096))
    try:
        status, answer = server.post(path, body, raw)
        assert status == code and answer["error"]["field"] == field, answer
        assert answer["error"]["message"].startswith(f"{field}: ")
        assert server.post("/pooling", {"input": [client_text(ROWS[0])]})[0] == 200  # still serving
    finally:
        server.close()


def test_a_full_queue_answers_503_at_once(scorer, expected):
    entered, release = threading.Event(), threading.Event()

    class Blocking(Scorer):
        def rewards(self, seqs):
            entered.set()
            release.wait(60)
            return super().rewards(seqs)

    server = Server(Blocking(scorer.model, scorer.tokenizer, max_tokens=512, max_length=16384), delay_ms=0,
                    max_queue=1)
    body = {"input": [client_text(ROWS[0])]}
    answers: list = []
    try:
        first = threading.Thread(target=lambda: answers.append(server.post("/pooling", body)))
        first.start()
        assert entered.wait(30)  # the worker holds the first request
        second = threading.Thread(target=lambda: answers.append(server.post("/pooling", body)))
        second.start()
        deadline = time.monotonic() + 30
        while server.app[BATCHER].queue.qsize() < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        status, answer = server.post("/pooling", body)
        assert status == 503 and answer["error"]["field"] == "queue", answer
        release.set()
        first.join(60)
        second.join(60)
        assert [a[0] for a in answers] == [200, 200]
        assert all(a[1]["data"][0]["data"][-1][0] == pytest.approx(expected[0], abs=1e-5) for a in answers)
        assert server.app[METRICS].rejected_full == 1
    finally:
        release.set()
        server.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_answers_the_request_in_flight_and_exits_0(checkpoint):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "polar_train", "serve", "--model", str(checkpoint),
                                "--port", str(port), "--device", "cpu", "--max-batch-delay-ms", "1500"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=5).read()
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
                time.sleep(0.2)
        answers: list = []
        request = urllib.request.Request(f"{url}/classify", data=json.dumps({"text": [client_text(ROWS[0])]}).encode(),
                                         headers={"Content-Type": "application/json"})
        in_flight = threading.Thread(target=lambda: answers.append(json.loads(urllib.request.urlopen(
            request, timeout=60).read())))
        in_flight.start()
        time.sleep(0.5)  # the request waits in its 1.5 s batching window
        process.send_signal(signal.SIGTERM)
        in_flight.join(60)
        assert process.wait(60) == 0
        assert len(answers) == 1 and isinstance(answers[0][0]["embedding"][0], float)
        assert "serve: stopped" in process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.parametrize("flag, value", [("--port", "-1"), ("--max-queue", "0"), ("--max-batch-delay-ms", "-5")])
def test_bad_serve_arguments_are_one_line(flag, value, checkpoint, capsys):
    code, err = run_cli(capsys, "serve", "--model", checkpoint, flag, value)
    assert_one_error(code, err, 2, flag, f"is {value}" if flag != "--max-batch-delay-ms" else "is -5.0")
