"""Overlap CPU-side preparation (decode, transform) with model compute: one chunk ahead, in a thread.

PIL decoding and torch both release the GIL, so a single helper thread hides decoding behind a forward
pass without the cost of extra processes.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(1, thread_name_prefix="unparrot-prefetch")
    return _POOL


def _forget_pool():
    """In a forked child the helper thread is gone while the executor still counts it (it would never
    start another one, and every `prefetch` would wait forever): the child makes its own."""
    global _POOL
    _POOL = None


os.register_at_fork(after_in_child=_forget_pool)


def prefetch(fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
    """Yield fn(item) for each item, computing the next one while the caller works on the current one."""
    it = iter(items)
    try:
        first = next(it)
    except StopIteration:
        return
    fut = _pool().submit(fn, first)
    for nxt in it:
        cur = fut.result()
        fut = _pool().submit(fn, nxt)
        yield cur
    yield fut.result()
