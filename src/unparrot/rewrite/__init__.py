"""`unparrot rewrite`: LaCLIP caption rewrites (docs/methods.md §3) as a whole-pool stage.

Every caption of the pool is read from the shards; each *unique* caption gets K rewrites, one per
style (chat, bard, human, coco by default); the results go to `columns/<stage>/<shard>.parquet`
(`rewrites`, `rewrite_styles`, `rewrite_failures` per sample), and training samples among the original
and its rewrites. All generation goes through a cache under `POOL/cache/rewrite/`, so a rerun or a
resumed run repeats no finished rewrite; failed rewrites are kept with their reason and tried again only
with `retry_failed=True`. With `caption_column` (e.g. `deparrot_caption`) the captions rewritten are that
column's values instead of the shards' (LaCLIP rewrites of de-parroted captions); a null value gets no
rewrites, noted in `rewrite_failures`.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import pyarrow as pa

from ..engine.stage import claim_stage, select_shards, shards_to_do, stage_counts
from ..pool import FirstSeen, Pool, Shard
from ..flags import key_values, option
from ..progress import progress_bar
from .backends import BACKENDS, Backend, Completion, Request, get_backend
from .cache import RewriteCache, task_key
from .prompt import (
    PROMPT_VERSION,
    STYLES,
    Parsed,
    build_prompt,
    check_rewrite,
    clean_caption,
    draw_pairs,
    load_style,
    parse_completion,
)

BLOCK = 2048  # tasks generated per round of retries: bounds memory, keeps results flowing to the cache

# the stage's columns, typed: a shard without captions (an empty or corrupt tar) still gets all of them
REWRITE_SCHEMA = {c: pa.list_(pa.string()) for c in ("rewrites", "rewrite_styles", "rewrite_failures")}


@dataclass
class RewriteSummary:
    stage: str
    backend: str
    model: str
    shards: int
    skipped: int
    n_in: int = 0
    n_ok: int = 0
    n_err: int = 0
    captions: int = 0
    tasks: int = 0
    cached: int = 0
    generated: int = 0
    failed: int = 0
    calls: int = 0
    seconds: float = 0.0
    setup_seconds: float = 0.0
    error_dir: str = ""
    failure_reasons: dict = field(default_factory=dict)

    def line(self) -> str:
        work = self.seconds - self.setup_seconds
        if self.shards and self.skipped == self.shards:
            if self.failed:  # earlier failures are what a rerun is usually for
                return (
                    f"{self.stage}: {self.shards} shards already done ({self.n_in} samples), {self.failed} "
                    "rewrites failed: retry_failed=True (--retry-failed) tries them again"
                )
            return (
                f"{self.stage}: {self.shards} shards already done ({self.n_in} samples); "
                "nothing to rewrite (delete columns/rewrite to redo)"
            )
        rate = self.generated / work if work > 0 and self.generated else 0.0
        s = (
            f"{self.stage}: {self.shards} shards ({self.skipped} already done), {self.n_in} samples: "
            f"{self.n_ok} rows, {self.n_err} errors; {self.captions} unique captions, {self.tasks} rewrites "
            f"({self.cached} cached, {self.generated} new from {self.calls} {self.backend} calls, "
            f"{self.failed} failed) in {self.seconds:.1f}s ({rate:.2f} new rewrites/s)"
        )
        if self.failed:
            top = sorted(self.failure_reasons.items(), key=lambda kv: -kv[1])[:3]
            s += (
                "; failures: "
                + ", ".join(f"{r} ({n})" for r, n in top)
                + " — retry_failed=True (--retry-failed) tries them again"
            )
        if self.n_err:
            s += f"; errors in {self.error_dir}"
        return s


@dataclass(frozen=True)
class Task:
    caption: str
    style: str  # a style name (LLM backends) or an EDA operation
    slot: int  # which repeat of the style, when n_rewrites exceeds the number of styles
    key: str

    @property
    def label(self) -> str:
        return self.style if self.slot == 0 else f"{self.style}#{self.slot}"


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256("\0".join(map(str, parts)).encode("utf-8")).digest()[:4], "big") & 0x7FFFFFFF


def make_request(task: Task, attempt: int, seed: int, backend: Backend, draws: int | None) -> Request:
    """Attempt `attempt` of a task: its own sampling seed and (for LLMs) its own in-context draw, both
    fixed by (caption, style, slot, seed, attempt), so a rerun asks exactly the same questions."""
    s = _seed(task.caption, task.style, task.slot, seed, attempt)
    if not backend.needs_prompt:
        return Request(task.caption, task.style, s)
    pool = load_style(task.style)
    return Request(task.caption, task.style, s, build_prompt(task.caption, draw_pairs(pool, s, draws)))


def run_tasks(
    backend: Backend,
    tasks: Sequence[Task],
    *,
    seed: int = 0,
    retries: int = 2,
    draws: int | None = None,
    on_final=None,
    starts: dict | None = None,
    block: int = BLOCK,
) -> int:
    """Generate every task, retrying unusable rewrites up to `retries` times with fresh seeds; each
    final outcome goes to `on_final(task, entry)` as soon as it is known. `starts[key]` is the first
    attempt number of a task (a failure tried again continues with new seeds rather than repeating
    the old ones). Returns the number of backend calls."""
    calls = 0
    starts = starts or {}
    for b in range(0, len(tasks), block):
        pending = [(t, starts.get(t.key, 0)) for t in tasks[b : b + block]]
        while pending:
            reqs = [make_request(t, a, seed, backend, draws) for t, a in pending]
            again = []
            for i, comp in backend.generate(reqs):
                calls += 1
                t, a = pending[i]
                first = starts.get(t.key, 0)
                if comp.error:  # the request failed as such: a model retry cannot help
                    on_final(t, {"ok": False, "reason": comp.error, "attempts": a + 1})
                    continue
                if backend.needs_prompt:
                    parsed = parse_completion(comp.text, comp.finish_reason, t.caption)
                else:
                    text = clean_caption(comp.text or "")
                    parsed = Parsed(text or None, None if text else "empty output")
                reason = parsed.reason or check_rewrite(t.caption, parsed.text)
                if reason is None:
                    on_final(t, {"ok": True, "text": parsed.text, "attempts": a + 1})
                elif a - first < retries:
                    again.append((t, a + 1))
                else:
                    on_final(
                        t,
                        {
                            "ok": False,
                            "reason": f"{reason} (after {a + 1 - first} attempts)",
                            "attempts": a + 1,
                            "last": parsed.text,
                        },
                    )
            pending = again
    return calls


@dataclass
class RewriteConfig:
    """The options of `rewrite()` (its signature defaults read these; the CLI's flags are made from them,
    and deparrot's rewrite mode shares the server defaults)."""

    backend: str = option(
        "llama-cpp",
        "llama-cpp (in-process GGUF), openai (any OpenAI-compatible "
        "/v1/completions server) or eda (WordNet EDA baseline)",
    )
    n_rewrites: int = option(4, "rewrites per caption, LaCLIP's K (style i mod the number of styles)", aliases=("-k",))
    styles: list | None = option(None, "styles to use (LLMs: chat bard human coco; EDA: sr ri rs rd)", nargs="*")
    model: str | None = option(None, "GGUF path (llama-cpp; default: bundled Gemma-3-270M) or the server's model name")
    seed: int = option(0, "sampling seed")
    temperature: float = option(0.9, "sampling temperature")
    top_p: float = option(0.95, "nucleus sampling")
    max_tokens: int = option(77, "tokens per rewrite")
    retries: int = option(2, "extra attempts for an unusable rewrite or a failed call")
    retry_failed: bool = option(False, "try again the rewrites that failed in a previous run")
    concurrency: int = option(4, "openai backend: requests in flight")
    timeout: float = option(120.0, "openai backend: seconds per request")
    base_url: str | None = option(None, "openai backend: the server, e.g. http://host:8000/v1")
    api_key_env: str = option("OPENAI_API_KEY", "environment variable holding the API key")
    workers: int = option(1, "llama-cpp: model copies in worker processes")
    threads: int | None = option(None, "llama-cpp threads per worker")
    draws: int | None = option(None, "fixed in-context draws per style (reuses the KV cache; faster on CPU)")
    max_caption_chars: int = option(1000, "longer captions are error rows")
    max_captions: int | None = option(None, "rewrite only the N most frequent unique captions (a budget)")
    overwrite: bool = option(False, "redo a stage made with other parameters")
    stage: str = option("rewrite", "output stage name")
    backend_options: dict | None = key_values("extra backend option (repeatable)", aliases=("--param",))
    caption_column: str | None = option(
        None,
        "rewrite this column's captions instead of the shards' (e.g. "
        "deparrot_caption: LaCLIP rewrites of de-parroted captions)",
    )


_C = RewriteConfig


def rewrite(
    pool: Pool | str,
    backend: str = _C.backend,
    n_rewrites: int = _C.n_rewrites,
    styles: Sequence[str] | None = _C.styles,
    model: str | None = _C.model,
    seed: int = _C.seed,
    temperature: float = _C.temperature,
    top_p: float = _C.top_p,
    max_tokens: int = _C.max_tokens,
    retries: int = _C.retries,
    retry_failed: bool = _C.retry_failed,
    concurrency: int = _C.concurrency,
    timeout: float = _C.timeout,
    base_url: str | None = _C.base_url,
    api_key_env: str = _C.api_key_env,
    workers: int = _C.workers,
    threads: int | None = _C.threads,
    draws: int | None = _C.draws,
    max_caption_chars: int = _C.max_caption_chars,
    max_captions: int | None = _C.max_captions,
    overwrite: bool = _C.overwrite,
    progress: bool = True,
    stage: str = _C.stage,
    backend_options: dict | None = _C.backend_options,
    caption_column: str | None = _C.caption_column,
) -> RewriteSummary:
    """Add `n_rewrites` rewrites per caption to a pool (resumable; unique captions only; cached).

    `styles` defaults to the backend's (chat, bard, human, coco for LLMs; sr, ri, rs, rd for EDA);
    rewrite i uses style i mod len(styles). `draws=N` fixes N in-context draws per style so a local
    model reuses its KV cache (faster on CPU; default: a fresh draw per caption, as in LaCLIP).
    Captions longer than `max_caption_chars`, empty or unreadable are error rows. `max_captions=N`
    rewrites only the N most frequent unique captions (a budget for slow local models: the rest get no
    rewrites, noted in `rewrite_failures`, and train on their original caption).
    """
    t0 = time.time()
    pool = pool if isinstance(pool, Pool) else Pool(pool)
    _check_arguments(backend, n_rewrites, retries, max_tokens, top_p, temperature)
    all_shards = select_shards(pool)
    source = _caption_source(pool, caption_column)
    cls = BACKENDS[backend]
    styles = tuple(dict.fromkeys(styles or cls.default_styles))
    style_ids = _style_ids(cls, styles)
    opts = dict(
        model=model,
        temperature=temperature,
        top_p=top_p,
        max_tokens=max_tokens,
        concurrency=concurrency,
        timeout=timeout,
        base_url=base_url,
        api_key_env=api_key_env,
        workers=workers,
        threads=threads,
        **(backend_options or {}),
    )
    t_setup = time.time()
    be = get_backend(backend, **opts)
    setup = time.time() - t_setup
    try:
        params = be.params()
        if be.needs_prompt:
            params["draws"] = draws
        record = _stage_record(
            backend, be.model_id, n_rewrites, style_ids, seed, max_caption_chars, max_captions, params, source
        )
        claim_stage(pool, stage, record, overwrite)
        todo = list(all_shards) if retry_failed else shards_to_do(pool, stage, all_shards)
        summary = RewriteSummary(
            stage=stage,
            backend=backend,
            model=be.model_id,
            shards=len(all_shards),
            skipped=len(all_shards) - len(todo),
            error_dir=str(pool.root / "errors" / stage),
        )
        rows, errors = _read_captions(pool, todo, max_caption_chars, progress, source)
        slots = [(styles[i % len(styles)], i // len(styles)) for i in range(n_rewrites)]
        captions = _captions_to_rewrite(rows, max_captions)
        cache = RewriteCache(pool.root / "cache" / "rewrite" / "rewrites.jsonl")
        try:
            tasks = _make_tasks(captions, slots, style_ids, backend, be.model_id, seed, params)
            todo_tasks, starts = _tasks_to_run(tasks, cache, retry_failed, summary)
            summary.calls = _generate(
                be,
                todo_tasks,
                cache,
                summary,
                starts=starts,
                seed=seed,
                retries=retries,
                draws=draws,
                progress=progress,
            )
            for sh in todo:
                cols = _shard_columns(rows[sh.id], slots, tasks, cache, source, max_captions)
                pool.write_columns(stage, sh.id, cols, errors[sh.id], schema=REWRITE_SCHEMA, source=sh.path)
            summary.failed, summary.failure_reasons = _failures(tasks, cache)
            summary.captions, summary.tasks = len(captions), len(tasks)
        finally:
            cache.close()
    finally:
        be.close()
    counts = stage_counts(pool, stage, [s.id for s in all_shards])
    summary.n_in, summary.n_ok, summary.n_err = counts["n_in"], counts["n_ok"], counts["n_err"]
    if summary.shards and summary.skipped == summary.shards:  # nothing ran: the failures on record
        summary.failed = _failures_on_record(pool, stage)
    summary.seconds, summary.setup_seconds = time.time() - t0, setup
    return summary


def _check_arguments(backend: str, n_rewrites: int, retries: int, max_tokens: int, top_p: float, temperature: float):
    """Refuse bad arguments before a model loads or a file is written."""
    if backend not in BACKENDS:
        raise KeyError(f"unknown rewrite backend {backend!r}; known: {', '.join(BACKENDS)}")
    if n_rewrites < 1:
        raise ValueError("rewrite: n_rewrites must be at least 1")
    if retries < 0 or max_tokens < 1 or not 0 < top_p <= 1 or temperature < 0:
        raise ValueError("rewrite: need retries >= 0, max_tokens >= 1, 0 < top_p <= 1, temperature >= 0")


def _caption_source(pool: Pool, caption_column: str | None) -> tuple[str, str] | None:
    """(stage, column) whose values are rewritten instead of the shards' captions, or None."""
    if not caption_column:
        return None
    from ..curate.reshard import parse_columns

    ((cst, (ccol,)),) = parse_columns([caption_column], pool).items()
    return cst, ccol


def _stage_record(
    backend: str,
    model_id: str,
    n_rewrites: int,
    style_ids: dict,
    seed: int,
    max_caption_chars: int,
    max_captions: int | None,
    params: dict,
    source: tuple[str, str] | None,
) -> dict:
    """The stage's `_stage.json`: everything that changes the rewrites (a rerun with other values is a
    `StageConflict`, never a stage that mixes two settings)."""
    record = {
        "op": "rewrite",
        "version": PROMPT_VERSION,
        "params": {
            "backend": backend,
            "model": model_id,
            "k": n_rewrites,
            "styles": list(style_ids.values()),
            "seed": seed,
            "max_caption_chars": max_caption_chars,
            "max_captions": max_captions,
            **params,
        },
    }
    if source is not None:  # recorded only when used, so existing stages keep their record
        record["params"]["caption_column"] = ".".join(source)
    return record


def _make_tasks(
    captions: list[str], slots: list, style_ids: dict, backend: str, model_id: str, seed: int, params: dict
) -> dict[tuple[str, int, str], Task]:
    """(caption, slot, style) -> its task, keyed in the cache by everything that decides its output."""
    tasks: dict[tuple[str, int, str], Task] = {}
    for cap in captions:
        for style, slot in slots:
            label = style_ids[style] + (f"#{slot}" if slot else "")
            key = task_key(cap, backend, model_id, PROMPT_VERSION, label, seed, params)
            tasks[(cap, slot, style)] = Task(cap, style, slot, key)
    return tasks


def _captions_to_rewrite(rows: dict, max_captions: int | None) -> list[str]:
    """The unique captions in first-appearance order; with `max_captions`, the most frequent first (ties
    keep their first appearance), cut to that many."""
    captions = list(dict.fromkeys(r["caption"] for rs in rows.values() for r in rs if r["caption"] is not None))
    if max_captions is not None:
        freq = Counter(r["caption"] for rs in rows.values() for r in rs if r["caption"] is not None)
        captions = sorted(captions, key=lambda c: -freq[c])[: max(0, int(max_captions))]
    return captions


def _tasks_to_run(tasks: dict, cache: RewriteCache, retry_failed: bool, summary: RewriteSummary):
    """The tasks the cache does not answer (failures too, with `retry_failed`), and for a failure tried
    again the attempt it continues from (so it gets new seeds). Counts the cached ones in `summary`."""
    todo_tasks, starts = [], {}
    for t in tasks.values():
        hit = cache.get(t.key)
        if hit is not None and (hit["ok"] or not retry_failed):
            summary.cached += 1
        else:
            todo_tasks.append(t)
            if hit is not None:
                starts[t.key] = int(hit.get("attempts") or 0)
    return todo_tasks, starts


def _generate(
    be: Backend,
    tasks: list[Task],
    cache: RewriteCache,
    summary: RewriteSummary,
    *,
    starts: dict,
    seed: int,
    retries: int,
    draws: int | None,
    progress: bool,
) -> int:
    """Run the tasks with a progress bar, each final outcome written to the cache the moment it is known
    (a killed run loses no finished rewrite). Returns the number of backend calls."""
    bar = progress_bar(total=len(tasks), desc=summary.stage, unit="rewrite", disable=not progress)

    def on_final(t: Task, entry: dict):
        cache.put(t.key, {**entry, "style": t.label, "backend": summary.backend, "model": summary.model})
        if entry["ok"]:
            summary.generated += 1
        bar.update(1)

    try:
        return run_tasks(be, tasks, seed=seed, retries=retries, draws=draws, on_final=on_final, starts=starts)
    finally:
        bar.close()


def _shard_columns(
    rows: list[dict],
    slots: list,
    tasks: dict,
    cache: RewriteCache,
    source: tuple[str, str] | None,
    max_captions: int | None,
) -> dict:
    """One shard's columns: per sample its rewrites, their style labels, and why the others are missing."""
    cols = {"uid": [], "key": [], "rewrites": [], "rewrite_styles": [], "rewrite_failures": []}
    for r in rows:
        texts, labels, fails = [], [], []
        if r["caption"] is None:
            fails.append(f"no caption to rewrite: {'.'.join(source)} is null")
        for style, slot in slots if r["caption"] is not None else ():
            t = tasks.get((r["caption"], slot, style))
            if t is None:
                fails.append(f"{style}: not selected (max_captions={max_captions})")
                continue
            e = cache.get(t.key)
            if e is not None and e["ok"]:
                texts.append(e["text"])
                labels.append(t.label)
            else:
                reason = e["reason"] if e is not None else "not generated"
                fails.append(f"{t.label}: {reason}")
        for c, v in (
            ("uid", r["uid"]),
            ("key", r["key"]),
            ("rewrites", texts),
            ("rewrite_styles", labels),
            ("rewrite_failures", fails),
        ):
            cols[c].append(v)
    return cols


def _failures(tasks: dict, cache: RewriteCache) -> tuple[int, dict[str, int]]:
    """How many tasks have no usable rewrite, and how often each reason (without its attempt count)."""
    reasons: dict[str, int] = {}
    for t in tasks.values():
        e = cache.get(t.key)
        if e is None or not e["ok"]:
            r = (e or {}).get("reason", "not generated").split(" (after")[0]
            reasons[r] = reasons.get(r, 0) + 1
    return sum(reasons.values()), reasons


def _failures_on_record(pool: Pool, stage: str) -> int:
    """The failed rewrites the stage's files hold (those cut by `max_captions` are not failures)."""
    return sum(
        1
        for sid in pool.done_shards(stage)
        for fs in pool.read_columns(stage, sid, ["rewrite_failures"]).column("rewrite_failures").to_pylist()
        for f in fs or ()
        if "not selected (max_captions" not in f
    )


def _style_ids(cls, styles: Sequence[str]) -> dict[str, str]:
    """style -> the id that goes into cache keys: name@content-digest for prompt styles."""
    if not styles:
        raise ValueError("rewrite: no styles")
    if cls.needs_prompt:
        return {s: f"{load_style(s).name}@{load_style(s).digest}" for s in styles}
    from .eda import OPS

    bad = [s for s in styles if s not in OPS]
    if bad:
        raise KeyError(f"EDA styles are its operations {', '.join(OPS)}; got {bad}")
    return {s: s for s in styles}


def _read_captions(
    pool: Pool,
    shards: list[Shard],
    max_caption_chars: int,
    progress: bool = False,
    source: tuple[str, str] | None = None,
) -> tuple[dict, dict]:
    """Per shard: rows (uid, key, caption) to rewrite, and error rows for samples without a usable caption.
    With `source` (stage, column), the caption is that column's value (None when it is null). The shards
    are read as the engines read them (`Pool.rows`), one uid kept once across all of them."""
    rows: dict[str, list] = {}
    errors: dict[str, list] = {}
    seen = FirstSeen()
    inputs = {source[0]: [source[1]]} if source is not None else {}

    def caption(row: dict) -> str | None:
        """The caption to rewrite, cleaned, into row["caption"]; or why there is none."""
        if source is not None and row[source[1]] is None:
            row["caption"] = None  # nothing to rewrite: a row that says so
            return None
        text = row[source[1]] if source is not None else row["caption"]
        cap = clean_caption(text) if text is not None else None
        if not cap:
            return "empty caption"
        if len(cap) > max_caption_chars:
            return f"caption too long to rewrite: {len(cap)} characters (max_caption_chars={max_caption_chars})"
        row["caption"] = cap
        return None

    bar = progress_bar(total=len(shards), desc="reading captions", unit="shard", disable=not progress)
    for sh in shards:
        bar.update(1)
        rs, errs = [], []
        for row, reason, problem in pool.rows(sh, inputs, ("caption",), check=caption, seen=seen):
            if row is None:
                errs.append({"uid": None, "key": problem.after_key, "reason": reason})
            elif reason is not None:
                errs.append({"uid": row["uid"], "key": row["key"], "reason": reason})
            else:
                rs.append({"uid": row["uid"], "key": row["key"], "caption": row["caption"]})
        rows[sh.id], errors[sh.id] = rs, errs
    bar.close()
    return rows, errors


__all__ = ["rewrite", "RewriteSummary", "Task", "run_tasks", "BACKENDS", "STYLES", "PROMPT_VERSION", "Completion"]
