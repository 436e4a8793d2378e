"""A local llama.cpp server (`python -m llama_cpp.server`) for the `openai` backend, as a context manager.

For tests, benchmarks and single-machine runs: it picks a free port on 127.0.0.1, waits until
`/v1/models` answers, and always stops the process. Production servers (vLLM, TGI, Ollama) are started
by their own tools; point `base_url` at them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """`with LlamaServer() as srv: rewrite(pool, backend="openai", base_url=srv.url)`."""

    def __init__(
        self,
        model: str | None = None,
        alias: str = "gemma-3-270m",
        threads: int = 1,
        n_ctx: int = 2048,
        port: int | None = None,
        ready_timeout: float = 180.0,
        log: str | os.PathLike | None = None,
    ):
        if model is None:
            from .backends import default_gguf

            model = str(default_gguf())
        self.model, self.alias, self.threads, self.n_ctx = model, alias, threads, n_ctx
        self.port = port or free_port()
        self.ready_timeout = ready_timeout
        self._own_log = log is None  # a temporary log is removed after a clean run
        if log is None:
            fd, log = tempfile.mkstemp(prefix="llama-server-", suffix=".log")
            os.close(fd)
        self.log_path = Path(log)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "LlamaServer":
        env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
        cmd = [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            self.model,
            "--model_alias",
            self.alias,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--n_threads",
            str(self.threads),
            "--n_threads_batch",
            str(self.threads),
            "--n_ctx",
            str(self.n_ctx),
            # the server computes logits for every prompt token by default (for logprobs): ~2x
            # slower prompts, and rewrites need only the last token's
            "--logits_all",
            "False",
        ]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.ready_timeout
        while True:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"llama_cpp.server exited with {self.proc.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(self.url + "/models", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"llama_cpp.server not ready after {self.ready_timeout:.0f}s (log: {self.log_path})")
            time.sleep(0.3)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, exc_type, *exc):
        self.stop()
        if self._own_log and exc_type is None:
            self.log_path.unlink(missing_ok=True)
