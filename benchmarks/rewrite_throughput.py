"""Throughput of the rewrite backends: captions/s (K=4 rewrites each), model loading excluded.

1. `openai` backend against a local `llama_cpp.server` (Gemma-3-270M): `--concurrency` requests in
   flight, against one request at a time (ratio). llama_cpp.server runs one request at a time behind a
   lock, so here concurrency can only hide the HTTP round trip; servers that batch (vLLM, TGI, llama.cpp's
   native `llama-server -np N`) turn it into parallel decoding.
2. The same client against a local stand-in for such a server (a threaded HTTP server that answers
   every request after a fixed latency, in parallel): shows that the client keeps `--concurrency`
   requests busy (target: ratio >= 0.8 x concurrency).
3. `llama-cpp` in-process, same model and threads as the server.

Every run starts from an empty rewrite cache.

Run: .venv/bin/python benchmarks/rewrite_throughput.py [--n 50] [--concurrency 4] [--threads 1]
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import argparse

from _util import synthetic_pool


class _Latency(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    latency = 0.2

    def log_message(self, *a):
        pass

    def _send(self, obj):
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send({"data": [{"id": "latency-stub"}]})

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        cap = req["prompt"].rsplit("\n\n", 1)[1][:-3]
        time.sleep(self.latency)
        self._send({"choices": [{"text": f" a stand-in rewrite of {cap}\n", "finish_reason": "stop"}]})


def run(pool, **kw):
    from unparrot.rewrite import rewrite

    stage = kw.pop("stage")
    shutil.rmtree(pool / "cache" / "rewrite", ignore_errors=True)
    for sub in ("columns", "errors"):
        shutil.rmtree(pool / sub / stage, ignore_errors=True)
    s = rewrite(pool, stage=stage, progress=False, **kw)
    work = s.seconds - s.setup_seconds
    print(f"  {s.line()}")
    return s.captions / work, s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50, help="samples in the synthetic pool (unique captions fewer)")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads (server and in-process)")
    ap.add_argument("--latency", type=float, default=0.2, help="seconds per request of the stand-in server")
    a = ap.parse_args()
    from unparrot.rewrite.server import LlamaServer

    pool = synthetic_pool(f"rewrite-tp-{a.n}", a.n, preset="learnable", shard_size=a.n)
    ok = True

    print(f"1. openai backend -> llama_cpp.server (Gemma-3-270M, {a.threads} thread(s))")
    with LlamaServer(threads=a.threads) as srv:
        seq, _ = run(pool, backend="openai", base_url=srv.url, concurrency=1, stage="tp_openai_1")
        par, _ = run(pool, backend="openai", base_url=srv.url, concurrency=a.concurrency, stage="tp_openai_c")
    print(
        f"   concurrency {a.concurrency}: {par:.3f} captions/s; one at a time: {seq:.3f} captions/s; "
        f"ratio {par / seq:.2f} (llama_cpp.server decodes one request at a time)"
    )

    print(f"2. openai backend -> parallel stand-in server ({a.latency * 1000:.0f} ms per request)")
    _Latency.latency = a.latency
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Latency)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    try:
        seq2, _ = run(pool, backend="openai", base_url=url, concurrency=1, stage="tp_stub_1")
        par2, _ = run(pool, backend="openai", base_url=url, concurrency=a.concurrency, stage="tp_stub_c")
    finally:
        httpd.shutdown()
        httpd.server_close()
    ratio = par2 / seq2
    target = 0.8 * a.concurrency
    ok &= ratio >= target
    print(
        f"   concurrency {a.concurrency}: {par2:.2f} captions/s; one at a time: {seq2:.2f} captions/s; ratio "
        f"{ratio:.2f} (target >= {target:.1f}) {'OK' if ratio >= target else 'MISSED'}"
    )

    print(f"3. llama-cpp in-process (Gemma-3-270M, {a.threads} thread(s))")
    inproc, _ = run(pool, backend="llama-cpp", threads=a.threads, stage="tp_llama")
    print(
        f"   {inproc:.3f} captions/s ({1 / inproc:.2f} s/caption); server with concurrency "
        f"{a.concurrency} / in-process: {par / inproc:.2f}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
