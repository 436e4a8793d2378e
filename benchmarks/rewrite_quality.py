"""Quality of LaCLIP rewrites per backend on the synthetic pool (METHODS.md §3).

For every sample of a `learnable` pool and each of its K rewrites (after retries; a rewrite that still
failed counts as missing every criterion): the share that differs from the source (lowercase words,
articles ignored), that keeps the class word (of the rewrites whose source caption names the class;
plural allowed), that has >= 2 words, and that passed the validity check (usable by training); and
seconds per unique caption (all K rewrites, model loading excluded). Targets for the default local
model (Gemma-3-270M through llama.cpp): >= 90% differ, >= 80% keep the class word.

On `--captions` (500) unique captions of a pool of `--n` samples. The `openai` backend runs against a
local `llama_cpp.server` with the same Gemma model started here
(or against --base-url). Each run starts from an empty rewrite cache, so the timings are real.

Run: .venv/bin/python benchmarks/rewrite_quality.py [--captions 500 --n 700] [--backends llama-cpp,openai,eda]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time

from _util import OUT, synthetic_pool

TARGET_DIFFER, TARGET_KEEP = 0.90, 0.80


def measure(pool, stage: str, meta: dict) -> dict:
    from unparrot.pool import Pool
    from unparrot.rewrite.prompt import normalized
    from unparrot.cotr import tokens

    p = Pool(pool)
    df = p.load(stage)
    n = differ = two = usable = keep = keep_n = samples = 0
    examples = []
    for uid, rewrites, styles, fails in zip(df["uid"], df["rewrites"], df["rewrite_styles"], df["rewrite_failures"]):
        src, cls = meta[uid]
        fails = [f for f in fails if "not selected" not in f]  # outside the caption budget: not measured
        if not len(rewrites) and not fails:
            continue
        samples += 1
        for text in list(rewrites) + [None] * len(fails):
            n += 1
            words = tokens(text or "")
            differ += bool(text) and normalized(text) != normalized(src)
            two += len(words) >= 2
            if cls and cls in tokens(src):
                keep_n += 1
                keep += any(w in (cls, cls + "s", cls + "es") for w in words)
        usable += len(rewrites)
        if len(examples) < 12 and len(rewrites):
            examples.append((src, list(zip(styles, rewrites))))
    return {
        "rewrites": n,
        "samples": samples,
        "differ": differ / n,
        "keep_class": keep / keep_n if keep_n else float("nan"),
        "keep_n": keep_n,
        "two_words": two / n,
        "usable": usable / n,
        "examples": examples,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--captions", type=int, default=500, help="unique captions to rewrite")
    ap.add_argument("--n", type=int, default=700, help="pool size (enough samples for --captions unique ones)")
    ap.add_argument("--backends", default="llama-cpp,openai,eda")
    ap.add_argument("--model", default=None, help="GGUF path (llama-cpp) / served model (openai)")
    ap.add_argument("--base-url", default=None, help="openai backend: a running server (default: start one)")
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads (in-process and server)")
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--draws", type=int, default=None)
    ap.add_argument("--keep-cache", action="store_true", help="reuse earlier rewrites (no timing)")
    a = ap.parse_args()
    from unparrot.pool import Pool
    from unparrot.rewrite import rewrite
    from unparrot.rewrite.server import LlamaServer

    pool = synthetic_pool(f"rewrite-{a.n}", a.n, preset="learnable", shard_size=max(1, a.n // 2))
    meta = {r["uid"]: (r["caption"], r["meta"]["synth"]["class"]) for r in Pool(pool).samples()}
    print(f"pool {pool}: {len(meta)} samples, {len(set(c for c, _ in meta.values()))} unique captions")
    ok = True
    rows = []
    for backend in a.backends.split(","):
        stage = f"rewrite_{backend.replace('-', '_')}"
        if not a.keep_cache:
            shutil.rmtree(pool / "cache" / "rewrite", ignore_errors=True)
        for sub in ("columns", "errors"):
            shutil.rmtree(pool / sub / stage, ignore_errors=True)
        kw = dict(backend=backend, stage=stage, progress=False, draws=a.draws, max_captions=a.captions)
        server = None
        if backend == "llama-cpp":
            kw.update(model=a.model, threads=a.threads)
        elif backend == "openai":
            if a.base_url:
                kw.update(base_url=a.base_url, model=a.model)
            else:
                server = LlamaServer(a.model, threads=a.threads).start()
                kw.update(base_url=server.url)
            kw.update(concurrency=a.concurrency)
        try:
            t0 = time.time()
            s = rewrite(pool, **kw)
            wall = time.time() - t0
        finally:
            if server:
                server.stop()
        print(s.line())
        m = measure(pool, stage, meta)
        per_caption = (s.seconds - s.setup_seconds) / max(1, s.captions)
        rows.append((backend, m, per_caption))
        print(
            f"== {backend} ({s.model}): {m['rewrites']} rewrites of {s.captions} unique captions "
            f"({m['samples']} samples), {wall:.0f}s"
        )
        print(f"  differ from the source     {100 * m['differ']:5.1f}%" + _verdict(backend, m["differ"], TARGET_DIFFER))
        print(
            f"  keep the class word        {100 * m['keep_class']:5.1f}% (of {m['keep_n']} rewrites whose "
            f"source names its class)" + _verdict(backend, m["keep_class"], TARGET_KEEP)
        )
        print(f"  >= 2 words                 {100 * m['two_words']:5.1f}%")
        print(f"  usable (passed the check)  {100 * m['usable']:5.1f}%")
        print(
            f"  seconds per unique caption {per_caption:.2f} (K={s.tasks // max(1, s.captions)} rewrites, "
            f"{s.calls} calls)"
        )
        for src, rw in m["examples"][:6]:
            print(f"    {src!r}: " + " | ".join(f"{st}: {t}" for st, t in rw))
        if backend == "llama-cpp":
            ok &= m["differ"] >= TARGET_DIFFER and m["keep_class"] >= TARGET_KEEP
    print("\nbackend     differ  keep-class  >=2 words  usable  s/caption")
    for backend, m, pc in rows:
        print(
            f"{backend:<10} {100 * m['differ']:6.1f}% {100 * m['keep_class']:9.1f}% {100 * m['two_words']:9.1f}% "
            f"{100 * m['usable']:6.1f}% {pc:9.2f}"
        )
    out = OUT / "rewrite_quality.json"  # one entry per backend; a run of some backends keeps the others
    results = {r["backend"]: r for r in (json.loads(out.read_text()) if out.exists() else [])}
    for b, m, pc in rows:
        results[b] = {
            "backend": b,
            "n": a.n,
            "captions": a.captions,
            "seconds_per_caption": pc,
            **{k: v for k, v in m.items() if k != "examples"},
        }
    out.write_text(json.dumps(list(results.values()), indent=1))
    return 0 if ok else 1


def _verdict(backend: str, value: float, target: float) -> str:
    if backend != "llama-cpp":
        return ""
    return f" (target >= {100 * target:.0f}%) {'OK' if value >= target else 'MISSED'}"


if __name__ == "__main__":
    sys.exit(main())
