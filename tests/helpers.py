"""The tests' support module: test doubles (importable by worker processes: conftest puts tests/ on
sys.path), builders of pools and tars, and shared asserts. Tests import from here, never from another
test module or from conftest (which holds fixtures only)."""

import hashlib
import io
import json
import os
import shutil
import socket
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unparrot.imaging.decode import open_image
from unparrot.ops.base import Operator, column, map_rows
from unparrot.pool import Pool
from unparrot.rewrite.backends import Backend, Completion


class SlowDigest(Operator):
    """Deterministic per-sample output, slow enough to be killed mid-run."""

    needs = ("image",)

    def __init__(self, delay: float = 0.02):
        self.delay = delay

    def __call__(self, batch):
        time.sleep(self.delay * len(batch["uid"]))
        images = column(batch, "image")

        def row(i):
            im = open_image(images[i])
            return {"digest": hashlib.sha256(images[i]).hexdigest()[:16], "w": im.width}

        return map_rows(row, len(images), ["digest", "w"])


class HeldDigest(SlowDigest):
    """SlowDigest that, while the file `hold` exists, stops in every shard not named in `free` after
    announcing itself (touches `<hold>.<shard>.waiting`). A test that waits for the announcements knows
    exactly which shards are finished when it kills a worker, on a fast machine or a slow one."""

    def __init__(self, hold: str = "", free: tuple = (), delay: float = 0.0):
        super().__init__(delay)
        self.hold, self.free = hold, tuple(free)

    def __call__(self, batch):
        import os
        from pathlib import Path

        shard = batch["shard"][0]
        if self.hold and shard not in self.free and os.path.exists(self.hold):
            Path(f"{self.hold}.{shard}.waiting").touch()
            while os.path.exists(self.hold):
                time.sleep(0.02)
        return super().__call__(batch)


def assert_close_scaled(a, b, rel: float = 1e-5, what: str = ""):
    """|a - b| <= rel * max|a|, computed in float64: a tolerance that scales with the values compared.

    Float32 results differ between machines in the last bits (summation order of threads and CPU kernels);
    an absolute tolerance holds for values of one size only. A real difference (a resumed run that lost its
    optimizer state, one step more or less) is orders of magnitude above `rel`."""
    a = np.asarray(a.detach().double() if hasattr(a, "detach") else a, np.float64)
    b = np.asarray(b.detach().double() if hasattr(b, "detach") else b, np.float64)
    assert a.shape == b.shape, (what, a.shape, b.shape)
    scale = float(np.abs(a).max()) if a.size else 0.0
    diff = float(np.abs(a - b).max()) if a.size else 0.0
    assert diff <= rel * scale, f"{what}: largest difference {diff:.3g} > {rel:g} x largest value {scale:.3g}"


KILLED = 137  # the exit code of a child killed by run_killed (as a shell reports SIGKILL)


def count_renames(fn) -> int:
    """How many os.replace calls fn() makes (each one the moment a finished temp file becomes visible)."""
    import os

    real, n = os.replace, [0]

    def counting(*a, **k):
        n[0] += 1
        return real(*a, **k)

    os.replace = counting
    try:
        fn()
    finally:
        os.replace = real
    return n[0]


def count_temp_files(fn) -> int:
    """How many temp files (tempfile.mkstemp, what every atomic writer starts with) fn() creates."""
    import tempfile

    real, n = tempfile.mkstemp, [0]

    def counting(*a, **k):
        n[0] += 1
        return real(*a, **k)

    tempfile.mkstemp = counting
    try:
        fn()
    finally:
        tempfile.mkstemp = real
    return n[0]


def run_killed(fn, n: int, at: str = "replace") -> int:
    """Run fn() in a forked child that dies just before its n-th os.replace (at="replace"), or just after
    creating its n-th temp file, before a byte is in it (at="mkstemp": in the middle of a write), by
    os._exit: no `finally`, no `except BaseException` cleanup, no atexit, like a SIGKILL landing there.
    Returns the child's exit code: KILLED, or 0 when fn finished first (1: it raised)."""
    import os
    import tempfile
    import traceback

    pid = os.fork()
    if pid == 0:  # the child never returns into the test
        import signal
        import sys

        code = 0
        signal.alarm(600)  # a hang fails the test (as a SIGALRM exit) instead of stopping the suite
        # OpenMP thread pools do not survive fork: the child runs single-threaded
        if "faiss" in sys.modules:
            sys.modules["faiss"].omp_set_num_threads(1)
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(1)
        try:
            real, seen = (os.replace if at == "replace" else tempfile.mkstemp), [0]

            def dying(*a, **k):
                seen[0] += 1
                if seen[0] == n and at == "replace":
                    os._exit(KILLED)
                out = real(*a, **k)
                if seen[0] == n:
                    os._exit(KILLED)
                return out

            if at == "replace":
                os.replace = dying
            else:
                tempfile.mkstemp = dying
            fn()
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def kill_points(total: int, k: int, seed: int) -> list[int]:
    """k distinct rename numbers in 1..total, seeded: where run_killed strikes."""
    rng = np.random.default_rng(seed)
    return sorted(int(x) + 1 for x in rng.choice(total, size=min(k, total), replace=False))


def tree_bytes(root, skip=()) -> dict:
    """{relative path: content} of every file under root (skipping paths that start with an entry of skip):
    the bytes, or for a tar shard its members' names and bytes in order (header mtimes are the time of
    writing, so two equal reshards differ there only)."""
    import tarfile
    from pathlib import Path

    def content(p):
        if p.suffix != ".tar":
            return p.read_bytes()
        with tarfile.open(p) as tf:
            return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]

    root = Path(root)
    return {
        str(p.relative_to(root)): content(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and not str(p.relative_to(root)).startswith(tuple(skip))
    }


class HidesShard(SlowDigest):
    """SlowDigest that, at its first batch, moves the file `victim` aside (to `victim + ".aside"`), once
    (`victim + ".once"` remembers it): a shard that disappears while the stage runs."""

    def __init__(self, victim: str = "", delay: float = 0.0):
        super().__init__(delay)
        self.victim = victim

    def __call__(self, batch):
        import os

        if self.victim and not os.path.exists(self.victim + ".once"):
            open(self.victim + ".once", "w").close()
            os.replace(self.victim, self.victim + ".aside")
        return super().__call__(batch)


class GatedDigest(SlowDigest):
    """SlowDigest that, on shard `block_shard`, touches `marker` and waits for the file `gate` to exist:
    a run can be killed at a known point (the earlier shards done, this one in flight)."""

    def __init__(self, block_shard: str, marker: str, gate: str, delay: float = 0.0):
        super().__init__(delay)
        self.block_shard, self.marker, self.gate = block_shard, marker, gate

    def __call__(self, batch):
        import os

        if self.block_shard in set(column(batch, "shard")) and not os.path.exists(self.gate):
            open(self.marker, "w").close()
            for _ in range(6000):  # bounded: the test kills this run long before
                if os.path.exists(self.gate):
                    break
                time.sleep(0.1)
            else:
                raise RuntimeError("gate never opened")
        return super().__call__(batch)


class DiesOnce(SlowDigest):
    """SlowDigest whose process exits (as if killed) the first time it sees shard `die_shard`; `marker`
    records that it did, so the retried shard goes through."""

    def __init__(self, die_shard: str, marker: str, delay: float = 0.0):
        super().__init__(delay)
        self.die_shard, self.marker = die_shard, marker

    def __call__(self, batch):
        import os

        if self.die_shard in set(column(batch, "shard")) and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)
        return super().__call__(batch)


# ---- images and tars, as the tests write them ---------------------------------------------------
def jpeg_bytes(color=(200, 30, 30), size=(32, 24), fmt="JPEG", mode="RGB", **kw) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format=fmt, **kw)
    return buf.getvalue()


def write_tar(path, members):
    """members: list of (name, bytes) written in order, exactly as given (names unchecked)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return str(path)


# ---- the HTML report in a real browser --------------------------------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def browser_or_skip():
    if CHROMIUM is None:
        if os.environ.get("UNPARROT_REQUIRE_BROWSER"):
            pytest.fail("chromium is required (make test installs Debian's chromium package)")
        pytest.skip("chromium not installed (make test installs it)")
    from playwright.sync_api import sync_playwright

    return sync_playwright, CHROMIUM


def open_in_chromium(html_path, screenshot):
    """Load a page in headless Chromium; return console errors/page errors and per-image load state."""
    sync_playwright, exe = browser_or_skip()
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=exe,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        problems = []
        page.on(
            "console",
            lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None,
        )
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
        page.goto(f"file://{html_path}")
        page.wait_for_load_state("load")
        images = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
        headings = page.evaluate("Array.from(document.querySelectorAll('h2,h3')).map(h => h.textContent)")
        page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    return problems, images, headings


# ---- an OpenAI-style completions server that fails on a plan ------------------------------------
SECRET = "sk-unparrot-test-secret-0042"


class FaultServer(ThreadingHTTPServer):
    """An OpenAI-style /v1/completions endpoint whose answers follow a per-caption plan of faults:
    caption -> list of modes for its successive requests, then "ok"."""

    daemon_threads = True

    def __init__(self, plan, sleep_ok=0.0, hang=3.0, barrier=None):
        super().__init__(("127.0.0.1", 0), FaultHandler)
        self.plan, self.sleep_ok, self.hang, self.barrier = plan, sleep_ok, hang, barrier
        self.dripped: list[int] = []  # body bytes each "drip" answer got out before the client hung up
        self.lock = threading.Lock()
        self.seen: dict[str, list[float]] = {}
        self.auth: set[str] = set()
        self.inflight = self.max_inflight = 0
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()


class FaultHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _send(self, status, body: bytes, headers=()):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/v1/models":
            self._send(200, json.dumps({"data": [{"id": "fault-model"}]}).encode())
        else:
            self._send(404, b'{"error": "not found"}')

    def do_POST(self):
        s: FaultServer = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        s.auth.add(self.headers.get("Authorization", ""))
        cap = body["prompt"].rsplit("\n\n", 1)[1][: -len(" =>")]
        with s.lock:
            n = len(s.seen.setdefault(cap, []))
            s.seen[cap].append(time.monotonic())
            s.inflight += 1
            s.max_inflight = max(s.max_inflight, s.inflight)
        plan = s.plan.get(cap, [])
        mode = plan[n] if n < len(plan) else plan[-1] if plan and plan[-1].startswith("always") else "ok"
        try:
            if mode in ("500", "always500"):
                self._send(500, b'{"error": {"message": "internal error"}}')
            elif mode == "garbage":
                self._send(200, b'{"choices": [ {"text": "unterminated')
            elif mode == "wrongshape":
                self._send(200, b'{"result": "nothing here"}')
            elif mode == "timeout":
                time.sleep(s.hang)
                self._send(200, b"{}")
            elif mode == "trickle":  # headers at once, then a byte now and then: only a deadline stops it
                self.send_response(200)
                self.send_header("Content-Length", "100000")
                self.end_headers()
                for _ in range(int(s.hang / 0.2)):
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(0.2)
            elif mode in ("drip", "alwaysdrip"):  # a complete-looking answer, one byte per DRIP_SECONDS
                body = json.dumps({"choices": [{"text": " " * DRIP_BYTES, "finish_reason": "stop"}]}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                sent = 0
                try:
                    for b in body:
                        self.wfile.write(bytes([b]))
                        self.wfile.flush()
                        sent += 1
                        time.sleep(DRIP_SECONDS)
                finally:
                    with s.lock:
                        s.dripped.append(sent)
            elif mode == "empty":
                self._send(200, json.dumps({"choices": [{"text": "", "finish_reason": "stop"}]}).encode())
            elif mode == "drop":
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
            elif mode == "429":
                self._send(429, b'{"error": "slow down"}', [("Retry-After", "1")])
            elif mode in ("400", "always400"):
                self._send(400, b'{"error": {"message": "prompt too long"}}')
            else:
                time.sleep(s.sleep_ok)
                if s.barrier is not None:  # answers only once `parties` requests are in flight together
                    s.barrier.wait()
                text = f" a rewritten {cap} for testing\n" if cap != "runaway" else " on and on and on"
                reason = "length" if cap == "runaway" else "stop"
                self._send(200, json.dumps({"choices": [{"text": text, "finish_reason": reason}]}).encode())
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass
        finally:
            with s.lock:
                s.inflight -= 1


DRIP_BYTES, DRIP_SECONDS = 200, 0.05  # a dripped answer takes 10 s to arrive whole


# ---- a counting rewrite backend, and a pool of captions ------------------------------------------
class Counting(Backend):
    """Test double: a deterministic "rewrite" that counts calls; captions containing 'copy' come back
    unchanged (a failure); 'boom' raises after `explode_after` results (a killed run)."""

    name = "counting"
    model_id = "count-1"
    default_styles = ("chat", "bard", "human", "coco")
    calls = 0
    explode_after = None

    def __init__(self, **opts):
        self.opts = opts

    def params(self):
        return {"temperature": self.opts.get("temperature")}

    def generate(self, requests):
        for i, r in enumerate(requests):
            if Counting.explode_after is not None and Counting.calls >= Counting.explode_after:
                raise KeyboardInterrupt
            Counting.calls += 1
            cap = r.prompt.rsplit("\n\n", 1)[1][: -len(" =>")]
            yield i, Completion(f" {cap}" if "copy" in cap else f" a {r.style} view of {cap}\n", "stop")


def make_pool(root, captions, shards=2):
    """captions: list of str (None = no .txt member, b'...' = raw bytes)."""
    root.mkdir(parents=True, exist_ok=True)
    per = -(-len(captions) // shards)
    for s in range(shards):
        members = []
        for i in range(s * per, min(len(captions), (s + 1) * per)):
            key = f"{i:06d}"
            members.append((f"{key}.jpg", jpeg_bytes()))
            c = captions[i]
            if c is not None:
                members.append((f"{key}.txt", c if isinstance(c, bytes) else c.encode()))
            members.append((f"{key}.json", json.dumps({"uid": f"{i:032x}"}).encode()))
        write_tar(root / "shards" / f"{s:05d}.tar", members)
    return root


# ---- samples and a pool with every kind of broken input -----------------------------------------
def tar_sample(key, caption=b"a red square", uid=None, image=None, ext="jpg"):
    members = [(f"{key}.{ext}", jpeg_bytes() if image is None else image), (f"{key}.txt", caption)]
    if uid is not None:
        members.append((f"{key}.json", json.dumps({"uid": uid}).encode()))
    return members


def bad_input_pool(tmp_path):
    """One shard per kind of breakage the issue names, plus a good one."""
    u = lambda i: f"{i:032x}"  # noqa: E731
    sh = tmp_path / "shards"
    write_tar(sh / "00-good.tar", tar_sample("g0", uid=u(1)) + tar_sample("g1", uid=u(2)))
    png = io.BytesIO()
    Image.new("L", (10000, 10000), 128).save(png, format="PNG", compress_level=1)  # 100 megapixels
    write_tar(
        sh / "01-bad.tar",
        tar_sample("zero", image=b"", uid=u(3))
        + tar_sample("nonimg", image=b"<html>not an image</html>", uid=u(4))
        + tar_sample("trunc", image=jpeg_bytes(size=(200, 200))[:300], uid=u(5))
        + tar_sample("huge", image=png.getvalue(), ext="png", uid=u(6))
        + tar_sample("../evil", uid=u(7))
        + tar_sample("badutf", caption=b"caf\xe9 \xff", uid=u(8))
        + [("nocap.jpg", jpeg_bytes()), ("nocap.json", json.dumps({"uid": u(9)}).encode())]
        + tar_sample("dup1", uid=u(10))
        + tar_sample("dup2", uid=u(10))
        + tar_sample("ok", uid=u(11)),
    )
    full = write_tar(
        tmp_path / "tmp.tar",
        sum((tar_sample(f"t{i}", uid=u(100 + i), image=jpeg_bytes(size=(120, 120))) for i in range(6)), []),
    )
    data = open(full, "rb").read()
    (sh / "02-truncated.tar").write_bytes(data[: int(len(data) * 0.6)])
    os.unlink(full)
    write_tar(sh / "03-crossdup.tar", tar_sample("x", uid=u(1)) + tar_sample("y", uid=u(12)))
    return Pool(tmp_path)
