"""The rewrite cache: an append-only JSONL file of finished rewrites and failures, keyed by task.

Append-only so a killed run loses at most the line being written (a torn last line is skipped on
load), and so two runs over the same pool never rewrite each other's results. The last line for a key
wins: a failure retried with `retry_failed=True` and then rewritten shadows the failure.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path


def task_key(
    caption: str, backend: str, model: str, prompt_version: str, style: str, seed: int, params: dict | None = None
) -> str:
    """sha256 of everything that decides a rewrite; `params` holds the sampling parameters, so a
    different temperature is a different result rather than a stale hit."""
    blob = json.dumps(
        [caption, backend, model, prompt_version, style, seed, params or {}], sort_keys=True, ensure_ascii=False
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class RewriteCache:
    """`get(key)` -> {"ok": bool, "text" | "reason", "attempts", ...} or None; `put` appends a line."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._entries: dict[str, dict] = {}
        self.torn_lines = 0
        if self.path.exists():
            with open(self.path, "rb") as f:
                for raw in f:
                    try:
                        e = json.loads(raw)
                        self._entries[e["key"]] = e
                    except (ValueError, KeyError, TypeError):
                        self.torn_lines += 1  # a line cut by a kill mid-write
        # O_APPEND: each line lands whole at the end even if another process appends too
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        if self.path.stat().st_size:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # close a torn line, so the next entry starts on its own line
                    os.write(self._fd, b"\n")

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> dict | None:
        return self._entries.get(key)

    def put(self, key: str, entry: dict):
        e = {"key": key, **entry}
        line = (json.dumps(e, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
        with self._lock:
            view = memoryview(line)
            while view:
                view = view[os.write(self._fd, view) :]
            self._entries[key] = e

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
