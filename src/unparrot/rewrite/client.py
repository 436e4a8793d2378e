"""A small, robust client for OpenAI-compatible `/completions` (standard library only).

Every failure mode of a remote server ends as a result, never as an exception or a hang: a request
has a total deadline (the socket timeout bounds each read, the deadline bounds a server that trickles
bytes); connection errors, timeouts, 5xx, 408, 429 and unparsable bodies are retried with exponential
backoff and full jitter (429 and 503 wait at least their Retry-After); other 4xx fail at once. The API
key is sent as a header and appears in no message.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import random
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


@dataclass
class HttpResult:
    data: dict | None = None
    error: str | None = None
    attempts: int = 0


class CompletionClient:
    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout: float = 120.0,
        retries: int = 4,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        max_retry_after: float = 120.0,
    ):
        u = urllib.parse.urlsplit(base_url.rstrip("/"))
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"base_url must be an http(s) URL such as http://127.0.0.1:8000/v1, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self._scheme, self._host, self._port, self._path = u.scheme, u.hostname, u.port, u.path
        self._api_key = api_key
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.max_retry_after = float(max_retry_after)
        self._local = threading.local()

    def __repr__(self):  # never shows the key
        return f"CompletionClient({self.base_url!r}, timeout={self.timeout}, retries={self.retries})"

    # ---- one HTTP exchange -----------------------------------------------------------------------
    def _conn(self):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
            conn = cls(self._host, self._port, timeout=self.timeout)
            self._local.conn = conn
        return conn

    def _drop_conn(self):
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass
        self._local.conn = None

    def _exchange(self, method: str, path: str, body: dict | None) -> tuple[int, dict, bytes]:
        """One request and its whole response within `timeout` seconds, however the server sends it.

        The socket timeout bounds each wait for a byte, but a server that drips a byte now and then never
        trips it (one buffered read() waits for the whole Content-Length). So a timer shuts the socket down
        at the deadline: the blocked read returns at once and the attempt ends as a timeout."""
        deadline = time.monotonic() + self.timeout
        headers = {"Accept": "application/json", "Connection": "keep-alive"}
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        conn = self._conn()
        expired = threading.Event()

        def cut():
            expired.set()
            sock = conn.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        timer = threading.Timer(self.timeout, cut)
        timer.daemon = True
        timer.start()
        try:
            conn.request(method, self._path + path, body=data, headers=headers)
            resp = conn.getresponse()
            chunks = []
            while True:
                if time.monotonic() > deadline:
                    expired.set()
                    break
                chunk = resp.read(65536)  # (read1 would leave the response open at its end: no keep-alive)
                if not chunk:
                    break
                chunks.append(chunk)
            if expired.is_set():
                raise TimeoutError(f"response not complete after {self.timeout:g}s")
            hdrs = {k.lower(): v for k, v in resp.getheaders()}
            if hdrs.get("connection", "").lower() == "close":
                self._drop_conn()
            return resp.status, hdrs, b"".join(chunks)
        except BaseException as e:
            self._drop_conn()  # a half-read connection cannot be reused
            if expired.is_set() and not isinstance(e, TimeoutError):
                raise TimeoutError(f"response not complete after {self.timeout:g}s") from e
            raise
        finally:
            timer.cancel()
            if expired.is_set():  # cut after the last byte: the socket is shut, do not reuse it
                self._drop_conn()

    # ---- with retries ----------------------------------------------------------------------------
    def request(
        self, method: str, path: str, body: dict | None = None, stop: threading.Event | None = None
    ) -> HttpResult:
        last = "no attempt"
        for attempt in range(self.retries + 1):
            if stop is not None and stop.is_set():
                return HttpResult(error=f"cancelled ({last})", attempts=attempt)
            wait_at_least = 0.0
            try:
                status, hdrs, raw = self._exchange(method, path, body)
            except (socket.timeout, TimeoutError) as e:
                detail = str(e) if str(e) and "timed out" not in str(e) else ""
                last = f"timeout after {self.timeout:.0f}s" + (f" ({detail})" if detail else "")
            except (ConnectionError, http.client.HTTPException, OSError) as e:
                last = f"connection error: {type(e).__name__}: {e}"[:300]
            else:
                if 200 <= status < 300:
                    try:
                        parsed = json.loads(raw.decode("utf-8"))
                        if not isinstance(parsed, dict):
                            raise ValueError(f"a JSON {type(parsed).__name__}, not an object")
                        return HttpResult(data=parsed, attempts=attempt + 1)
                    except (UnicodeDecodeError, ValueError) as e:
                        last = f"unparsable response body ({str(e)[:120]}): {raw[:80]!r}"
                else:
                    last = f"HTTP {status}: {_error_message(raw)}"
                    if status not in RETRY_STATUS:
                        return HttpResult(error=last, attempts=attempt + 1)
                    if status in (429, 503):
                        wait_at_least = min(_retry_after(hdrs.get("retry-after")), self.max_retry_after)
            if attempt < self.retries:
                delay = max(wait_at_least, random.uniform(0, min(self.max_backoff, self.backoff * 2**attempt)))
                if stop is not None:
                    if stop.wait(delay):
                        return HttpResult(error=f"cancelled ({last})", attempts=attempt + 1)
                else:
                    time.sleep(delay)
        return HttpResult(error=f"{last} (after {self.retries + 1} attempts)", attempts=self.retries + 1)

    def completion(self, body: dict, stop: threading.Event | None = None) -> tuple[str | None, str | None, str | None]:
        """(text, finish_reason, error) of one `/completions` request."""
        res = self.request("POST", "/completions", body, stop)
        if res.error:
            return None, None, res.error
        try:
            choice = res.data["choices"][0]
            text = choice["text"]
            if not isinstance(text, str):
                raise TypeError("text is not a string")
            return text, choice.get("finish_reason"), None
        except (KeyError, IndexError, TypeError) as e:
            return None, None, f"unexpected response shape ({type(e).__name__}: {e}): {json.dumps(res.data)[:120]}"

    def models(self) -> list[str]:
        res = self.request("GET", "/models")
        if res.error:
            raise ConnectionError(f"cannot list the models of {self.base_url}: {res.error}")
        try:
            return [m["id"] for m in res.data["data"]]
        except (KeyError, TypeError) as e:
            raise ConnectionError(f"{self.base_url}/models returned an unexpected shape: {e}") from None


def _retry_after(value: str | None) -> float:
    if not value:
        return 0.0
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError):
        return 0.0


def _error_message(raw: bytes) -> str:
    try:
        e = json.loads(raw)
        msg = e.get("error", e) if isinstance(e, dict) else e
        if isinstance(msg, dict):
            msg = msg.get("message", msg)
        return str(msg)[:200]
    except (ValueError, UnicodeDecodeError):
        return raw[:200].decode("utf-8", "replace")
