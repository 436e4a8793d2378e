"""`deparrot`: keep the images with text, take the words they spell out of their captions (issue 17).

Every other recipe drops a parroting pair; this stage keeps the image and removes the shortcut from the
caption instead. Inputs: the caption, the spot stage's texts and the parrot stage's co-embedded words.
Output columns per sample:

- `deparrot_caption`: the new caption, or null when nothing describable is left (a pure-text image);
- `deparrot_mode`: `none` (the caption spells none of the spotted text, including images without text:
  the caption passes unchanged), `strip` (the spelled words were removed), `rewrite` (an LLM rewrote the
  caption without them) or `strip-fallback` (rewrite mode, but no rewrite passed the checks: the strip
  result is used);
- `removed_words`: the caption tokens that were spelled in the image and taken out (with repeats);
- `residual_cotr`: the new caption's CoTR against the same spotted text, computed exactly as the parrot
  stage computes CoTR (same options): 0 by construction for `strip`, checked to be 0 for `rewrite`.

`mode="strip"` (default) is deterministic and fast: the co-embedded words are removed together with the
function words they leave dangling (articles, prepositions, "that says", "the word", quotes and brackets
around the span); if fewer than `min_words` content words remain (words other than stop words and words
that only name text, such as "sign" or "logo"), the caption is null.

`mode="rewrite"` asks an LLM (the rewrite backends: a local GGUF model through llama.cpp or an
OpenAI-compatible server) for a caption of the image that does not spell the listed words, LaCLIP-style.
Every output is checked (residual CoTR 0, length, no prompt echo); a failed check retries with a new
seed, then falls back to strip. A caption whose strip result is null is never sent to the model: the model
cannot see the image, so all it could add to a pure-text image's caption is invented content.
Results are cached (append-only JSONL, shared by processes) when `cache` names a file.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass

from ..cotr import STOPWORDS, CotrOptions, co_embedded, cotr_options, normalize, tokens
from ..deparrot import DeparrotConfig as C
from .base import Operator, column, map_rows

DEPARROT_COLUMNS = ("deparrot_caption", "deparrot_mode", "removed_words", "residual_cotr")
MODES = ("strip", "rewrite")

# Words that only say "there is text here": they describe nothing but the text itself, so a caption left
# with nothing else is null (a caption "logo" on every logo would keep a text shortcut of its own).
TEXT_WORDS = frozenset(
    """sign signs logo logos word words text texts letter letters lettering writing written caption captions
label labels sticker stickers title titles quote quotes font fonts typography wordmark inscription
message slogan banner""".split()
)
# Function words a removed span leaves dangling on its left ("a mug with the word X", "a sign that says X")
_SAYING = frozenset("says say saying reads read reading spells spelling titled named called printed".split())
DANGLING = STOPWORDS | _SAYING | frozenset(("word", "words", "text", "letters", "lettering", "caption", "reads"))
_ARTICLES = frozenset(("a", "an", "the"))
_UNIT = re.compile(r"[^\W_]+")
_EMPTY_PAIR = re.compile(r"\(\s*\)|\[\s*\]|\{\s*\}|\"\s*\"|\u201c\s*\u201d|\u2018\s*\u2019|\u00ab\s*\u00bb|'\s*'")
_WS = re.compile(r"\s+")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?])")
_REPEATED_SEP = re.compile(r"([,;:/|&+\-\u2013\u2014])(?:\s*[,;:/|&+\-\u2013\u2014])+")
_LEAD = " \t,.;:!?/|&+*#~-\u2013\u2014)]}"
_TRAIL = " \t,;:/|&+*#~-\u2013\u2014([{"
_BREAK = re.compile(r"[,.;:!?()\[\]{}|/\u2013\u2014]")


@dataclass
class Stripped:
    caption: str | None  # None: nothing describable left
    removed: list[str]  # spelled tokens taken out, with repeats
    changed: bool  # False: the caption spells none of the spotted text


def content_words(text: str) -> list[str]:
    """Tokens that describe something other than text: not stop words, not words like "sign", "logo"."""
    return [t for t in tokens(text, keep_non_latin=True) if t not in STOPWORDS and t not in TEXT_WORDS]


def _unit_tokens(word: str, opt: CotrOptions) -> list[str]:
    """The CoTR tokens of one run of letters/digits of the original caption (NFKC may split it)."""
    return [t for t in tokens(word, opt.keep_non_latin) if len(t) >= opt.min_len]


def _clean(text: str) -> str:
    """Whitespace and punctuation after removal: empty quote/bracket pairs, doubled separators, ends."""
    prev = None
    while prev != text:
        prev = text
        text = _EMPTY_PAIR.sub(" ", text)
        text = _WS.sub(" ", text)
        text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
        text = _REPEATED_SEP.sub(r"\1", text)
        text = text.lstrip(_LEAD).rstrip(_TRAIL).strip()
    return text


def strip_caption(caption: str, spelled, opt: CotrOptions = CotrOptions(), min_words: int = 1) -> Stripped:
    """Remove from `caption` every word whose CoTR tokens are in `spelled`, and what it leaves dangling.

    A word is a run of letters/digits of the original caption (so "coca-cola" is two words, and "category"
    is never touched by a spotted "cat"); it goes when any of its tokens is spelled. On the left of a
    removed word, function words ("a", "with", "the word", "that says") go too, up to the first content
    word or punctuation; leading function words (not articles) and trailing ones go as well.
    """
    spelled = set(spelled)
    units = list(_UNIT.finditer(caption))
    if not spelled or not units:
        return Stripped(caption, [], False)
    n = len(units)
    drop = [False] * n
    removed: list[str] = []
    words = [m.group() for m in units]
    # ASCII words (most) are one token each, their lowercase; others go through NFKC (may split them)
    norm = [w.lower() if w.isascii() else normalize(w) for w in words]
    for i, w in enumerate(words):
        if w.isascii():
            hit = [norm[i]] if norm[i] in spelled and len(w) >= opt.min_len else ()
        else:
            hit = [t for t in _unit_tokens(w, opt) if t in spelled]
        if hit:
            drop[i] = True
            removed.extend(hit)
    if not removed:
        return Stripped(caption, [], False)
    # punctuation between word j and word j + 1 ends a dangling walk
    brk = [
        bool(_BREAK.search(caption, units[j].end(), units[j + 1].start() if j + 1 < n else len(caption)))
        for j in range(n)
    ]
    # function words left dangling on the left of each removed run, up to a content word or punctuation
    for i in range(n):
        if not drop[i] or (i + 1 < n and drop[i + 1] and not brk[i]):
            continue
        j = i - 1
        while j >= 0 and not brk[j]:
            if drop[j]:
                j -= 1
                continue
            if norm[j] in DANGLING:
                drop[j] = True
                j -= 1
            else:
                break
    kept = [i for i in range(len(units)) if not drop[i]]
    if drop[0]:  # the removal reached the start: "X and a red ball" -> "a red ball"
        while kept and norm[kept[0]] in DANGLING and norm[kept[0]] not in _ARTICLES:
            drop[kept.pop(0)] = True
    if drop[-1]:  # ... or the end: "a red ball, the X" -> "a red ball"
        while kept and norm[kept[-1]] in DANGLING:
            drop[kept.pop()] = True
    pieces, pos = [], 0
    for i, m in enumerate(units):
        if drop[i]:
            pieces.append(caption[pos : m.start()])
            pos = m.end()
    pieces.append(caption[pos:])
    out = _clean(" ".join(p for p in pieces))
    if len(content_words(out)) < max(1, min_words) or not out:
        return Stripped(None, removed, True)
    return Stripped(out, removed, True)


def deparrot_strip(caption: str, texts, co_emb, opt: CotrOptions = CotrOptions(), min_words: int = 1) -> dict:
    """One sample in strip mode: the four output columns.

    `co_emb` is the parrot stage's list for this sample (computed on the same texts with the same
    options, so an empty list means CoTR 0; None: computed here). The result is checked again and any
    word still spelled is removed too (Unicode normalisation can make new tokens meet), so residual CoTR
    is 0 by construction."""
    texts = [] if texts is None else [t for t in texts if t]
    unchanged = {"deparrot_caption": caption, "deparrot_mode": "none", "removed_words": [], "residual_cotr": 0.0}
    if not texts or not caption:
        return unchanged
    spelled = set(co_embedded(caption, texts, opt)["co_emb"] if co_emb is None else co_emb)
    if not spelled:
        return unchanged
    s = strip_caption(caption, spelled, opt, min_words)
    if not s.changed:  # spelled tokens that are no word of the caption: co_emb came from other texts
        again = co_embedded(caption, texts, opt)["co_emb"]
        if not again:
            return unchanged
        s = strip_caption(caption, set(again), opt, min_words)
    out, removed, residual = s.caption, list(s.removed), 0.0
    for _ in range(4):
        if out is None:
            break
        m = co_embedded(out, texts, opt)
        residual = m["cotr"]
        if not m["co_emb"]:
            break
        s = strip_caption(out, set(m["co_emb"]), opt, min_words)
        out = s.caption
        removed.extend(s.removed)
    if out is None or residual:  # residual: cannot happen with the rules above; never let a spelled word through
        out, residual = None, 0.0
    return {"deparrot_caption": out, "deparrot_mode": "strip", "removed_words": removed, "residual_cotr": residual}


# ---- rewrite mode: the OCR-aware LaCLIP prompt ------------------------------------------------------
DEPARROT_PROMPT_VERSION = "deparrot-2"
INSTRUCTION = "describe each image again without any of the words written in it,"
# Hand-written pairs (ours): caption, the words written in the image, a caption that does not spell them.
EXAMPLES = (
    ("a blue bicycle with the word speed on its frame", "speed", "a blue bicycle with lettering on its frame"),
    ("coffee shop sign that says open", "open", "a sign hanging outside a coffee shop"),
    ("mountain at sunrise poster never give up", "never give up", "a poster of a mountain at sunrise"),
    ("nike running shoes on a wooden floor", "nike", "a pair of running shoes on a wooden floor"),
    ("happy birthday cake with candles", "happy birthday", "a cake with lit candles on a table"),
)
_SHOTS = tuple((strip_caption(s, set(tokens(w))).caption, w, t) for s, w, t in EXAMPLES)
_ECHO = re.compile(r"=>|\bwritten:|" + re.escape(INSTRUCTION[:24]), re.I)
_CLAIMS_TEXT = re.compile(
    r"[\"\u201c\u201d]|\b(?:says|saying|reads|reading|spells?|spelling|titled|"
    r"that\s+say|the\s+words?|written\s+(?:on|in)\s+it)\b",
    re.I,
)


def build_deparrot_prompt(stripped: str, words) -> str:
    """A completion prompt: the instruction, the examples, then `stripped caption (written: w1 w2) =>`.

    The caption is shown with the spelled words already taken out (its strip result), the words after
    it: shown the full caption, Gemma-3-270M copied the spelled words back in 57% of 30 captions, shown
    the stripped one 17% (benchmarks/deparrot_quality.py's pool, 2026-12)."""
    blocks = [INSTRUCTION] + [f"{s} (written: {w}) => {t}" for s, w, t in _SHOTS]
    blocks.append(f"{_WS.sub(' ', stripped).strip()} (written: {' '.join(words)}) =>")
    return "\n\n".join(blocks)


def check_deparrot(source: str, text: str | None, texts, opt: CotrOptions) -> str | None:
    """Why a rewrite is unusable (None when usable): it spells the image's text, has fewer than 2 words or
    runs far longer than the source, describes nothing, or echoes the prompt."""
    if not text:
        return "empty output"
    if _ECHO.search(text) or any(text.lower() in (s, t) for s, _, t in EXAMPLES + _SHOTS):
        return "echoes the prompt"
    n, n_src = len(tokens(text, keep_non_latin=True)), len(tokens(source, keep_non_latin=True))
    if n < 2:
        return "fewer than 2 words"
    if n > max(24, 3 * n_src):
        return f"too long ({n} words for a {n_src}-word caption)"
    spelled = co_embedded(text, texts, opt)["co_emb"]
    if spelled:
        return "spells the image's text: " + " ".join(sorted(set(spelled)))[:80]
    if not content_words(text):
        return "describes nothing but text"
    return None


def claims_text(text: str | None) -> bool:
    """Whether a caption says what is written (quotes, "that says", "the word"): the invented-text test of
    rewrite outputs (a rewrite must not spell the real text, and should not make up other text)."""
    return bool(text) and bool(_CLAIMS_TEXT.search(text))


def rewrite_key(caption: str, words, backend: str, model: str, seed: int, params: dict) -> str:
    from ..rewrite.cache import task_key

    return task_key(caption + "\0" + " ".join(words), backend, model, DEPARROT_PROMPT_VERSION, "deparrot", seed, params)


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256("\0".join(map(str, parts)).encode()).digest()[:4], "big") & 0x7FFFFFFF


class Deparrot(Operator):
    """The stage's operator: strip every row, then (rewrite mode) rewrite the rows strip changed and left
    describable, through the backend and the cache; parameters are recorded with the stage."""

    needs = ("caption",)
    version = 1

    def __init__(
        self,
        mode: str = C.mode,
        min_words: int = C.min_words,
        spot_stage: str = C.spot_stage,
        parrot_stage: str = C.parrot_stage,
        stopwords: bool = CotrOptions.stopwords,
        min_len: int = CotrOptions.min_len,
        fuzzy: bool = CotrOptions.fuzzy,
        fuzzy_min_len: int = CotrOptions.fuzzy_min_len,
        keep_non_latin: bool = CotrOptions.keep_non_latin,
        backend: str = C.backend,
        model: str | None = C.model,
        base_url: str | None = C.base_url,
        api_key_env: str = C.api_key_env,
        concurrency: int = C.concurrency,
        timeout: float = C.timeout,
        temperature: float = C.temperature,
        top_p: float = C.top_p,
        max_tokens: int = C.max_tokens,
        retries: int = C.retries,
        seed: int = C.seed,
        threads: int | None = C.threads,
        max_rewrite_chars: int = C.max_rewrite_chars,
        cache: str | None = None,
        backend_options: dict | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"deparrot: mode must be one of {', '.join(MODES)}, got {mode!r}")
        if min_words < 1 or retries < 0:
            raise ValueError("deparrot: need min_words >= 1 and retries >= 0")
        self.mode, self.min_words, self.retries, self.seed = mode, int(min_words), int(retries), int(seed)
        self.max_rewrite_chars = int(max_rewrite_chars)
        # the parrot stage's CoTR options, so residual_cotr is its CoTR of the new caption
        self.opt = cotr_options(stopwords, min_len, fuzzy, fuzzy_min_len, keep_non_latin)
        self.inputs = {spot_stage: ["texts"], parrot_stage: ["co_emb"]}
        self.backend = self.cache = None
        self.backend_name = backend
        if mode == "rewrite":
            from ..rewrite.backends import get_backend

            self.backend = get_backend(
                backend,
                model=model,
                base_url=base_url,
                api_key_env=api_key_env,
                concurrency=concurrency,
                timeout=timeout,
                temperature=temperature,
                top_p=top_p,
                max_tokens=max_tokens,
                threads=threads,
                **(backend_options or {}),
            )
            if not self.backend.needs_prompt:
                raise ValueError(f"deparrot: rewrite mode needs an LLM backend (llama-cpp or openai), not {backend!r}")
            self.params = self.backend.params()
            if cache:
                from ..rewrite.cache import RewriteCache

                self.cache = RewriteCache(cache)
        # what this operator instance did (the benchmark reads it): model calls, cache hits, outcomes and
        # why the rewrites that fell back to strip were rejected
        self.stats = {"calls": 0, "cached": 0, "rewritten": 0, "fallback": 0, "reasons": Counter()}

    @classmethod
    def inputs_for(cls, params: dict) -> dict[str, list[str]]:
        return {params.get("spot_stage", "spot"): ["texts"], params.get("parrot_stage", "parrot"): ["co_emb"]}

    def __call__(self, batch):
        captions, texts = column(batch, "caption"), column(batch, "texts")
        co = column(batch, "co_emb") if "co_emb" in batch else [None] * len(captions)  # None: computed here
        strips: dict[int, dict] = {}

        def strip_row(i):
            words = None if co[i] is None else _as_list(co[i])
            r = deparrot_strip(captions[i], _as_list(texts[i]), words, self.opt, self.min_words)
            strips[i] = r
            return r

        out = map_rows(strip_row, len(captions), DEPARROT_COLUMNS)
        if self.mode == "rewrite":
            self._rewrite(captions, texts, strips, out)
        return out

    # ---- rewrite mode -------------------------------------------------------------------------------
    def _rewrite(self, captions, texts, strips: dict, out: dict):
        """Rewrite the rows that strip changed and left describable; each unique (caption, words) once."""
        todo: dict[str, list[int]] = {}
        words_of: dict[str, tuple] = {}
        for i, r in strips.items():
            if out["error"][i] or r["deparrot_mode"] != "strip" or r["deparrot_caption"] is None:
                continue
            words = tuple(dict.fromkeys(r["removed_words"]))
            key = rewrite_key(captions[i], words, self.backend_name, self.backend.model_id, self.seed, self.params)
            todo.setdefault(key, []).append(i)
            words_of[key] = (captions[i], words, _as_list(texts[i]), r["deparrot_caption"])
        results: dict[str, dict] = {}
        pending = []
        for key in todo:
            hit = self.cache.get(key) if self.cache is not None else None
            if hit is not None:
                results[key] = hit
                self.stats["cached"] += 1
            elif len(words_of[key][0]) > self.max_rewrite_chars:
                results[key] = {
                    "ok": False,
                    "reason": f"caption longer than max_rewrite_chars={self.max_rewrite_chars}",
                }
            else:
                pending.append(key)
        try:
            for key, entry in self._generate(pending, words_of):
                results[key] = entry
                if self.cache is not None:
                    self.cache.put(key, {**entry, "backend": self.backend_name, "model": self.backend.model_id})
        except Exception as e:  # noqa: BLE001 - a backend that breaks costs this batch its rewrites, not the run
            self.stats["reasons"][f"backend failed: {type(e).__name__}"] += 1
        for key, rows in todo.items():
            e = results.get(key, {"ok": False})  # not cached: the next run asks again
            for i in rows:
                if e.get("ok"):
                    out["deparrot_caption"][i] = e["text"]
                    out["deparrot_mode"][i] = "rewrite"
                    out["residual_cotr"][i] = co_embedded(e["text"], words_of[key][2], self.opt)["cotr"]
                    self.stats["rewritten"] += 1
                else:
                    out["deparrot_mode"][i] = "strip-fallback"
                    self.stats["fallback"] += 1

    def _generate(self, keys, words_of):
        """(key, cache entry) for each key: attempt a, a fresh seed each, up to `retries` retries."""
        from ..rewrite.backends import Request
        from ..rewrite.prompt import parse_completion

        pending = [(k, 0) for k in keys]
        while pending:
            reqs = []
            for k, a in pending:
                cap, words, _, stripped = words_of[k]
                reqs.append(
                    Request(cap, "deparrot", _seed(cap, words, self.seed, a), build_deparrot_prompt(stripped, words))
                )
            again = []
            for i, comp in self.backend.generate(reqs):
                self.stats["calls"] += 1
                k, a = pending[i]
                cap, words, texts, _ = words_of[k]
                if comp.error:  # the request itself failed (server down, prompt too long): no model retry
                    self.stats["reasons"]["request failed"] += 1
                    yield k, {"ok": False, "reason": comp.error, "attempts": a + 1}
                    continue
                parsed = parse_completion(comp.text, comp.finish_reason, cap)
                reason = parsed.reason or check_deparrot(cap, parsed.text, texts, self.opt)
                if reason is None:
                    yield k, {"ok": True, "text": parsed.text, "attempts": a + 1}
                elif a < self.retries:
                    again.append((k, a + 1))
                else:
                    self.stats["reasons"][reason.split(":")[0]] += 1
                    yield (
                        k,
                        {
                            "ok": False,
                            "reason": f"{reason} (after {a + 1} attempts)",
                            "attempts": a + 1,
                            "last": parsed.text,
                        },
                    )
            pending = again

    def close(self):
        if self.backend is not None:
            self.backend.close()
        if self.cache is not None:
            self.cache.close()


def _as_list(v) -> list:
    if v is None:
        return []
    return v.tolist() if hasattr(v, "tolist") else list(v)


__all__ = [
    "Deparrot",
    "deparrot_strip",
    "strip_caption",
    "check_deparrot",
    "build_deparrot_prompt",
    "claims_text",
    "content_words",
    "DEPARROT_COLUMNS",
    "TEXT_WORDS",
    "MODES",
]
