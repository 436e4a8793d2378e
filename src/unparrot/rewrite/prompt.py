"""The LaCLIP rewrite prompt (docs/methods.md §3): style pools, prompt building, output parsing, validity.

The prompt is a plain completion prompt, not a chat: an instruction line, three in-context
`source => target` pairs drawn without replacement from one style's pool, then `caption =>`. A base
model continues the pattern; the parser keeps the first line of what it wrote.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files
from pathlib import Path

from ..cotr import tokens

# Bump when the prompt format, the parser or the built-in style pools change: it is part of every
# cache key, so old results are not reused for a different prompt.
PROMPT_VERSION = "laclip-1"
INSTRUCTION = "write image captions differently,"
STYLES = ("chat", "bard", "human", "coco")
N_SHOTS = 3

# Special tokens a base model may emit as text instead of a newline (Gemma's <start_of_image> runs,
# <eos>, ChatML/Llama-3 markers, </s>): everything from the first one on is not part of the rewrite.
_SPECIAL = re.compile(
    r"<(?:start_of_\w+|end_of_\w+|eos|bos|pad|unk|mask|image_soft_token)>"
    r"|<\|[^|<>]{1,40}\|>|</s>|\[/?INST\]"
)
_QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d", "\u2018": "\u2019", "`": "`", "\u00ab": "\u00bb"}
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
_WS = re.compile(r"\s+")


@dataclass(frozen=True)
class StylePool:
    """One style's in-context pairs; `digest` identifies their content (a cache-key part)."""

    name: str
    pairs: tuple[tuple[str, str], ...]

    @property
    def digest(self) -> str:
        h = hashlib.sha256("\n".join(f"{s}\t{t}" for s, t in self.pairs).encode()).hexdigest()
        return h[:12]


def parse_style_tsv(text: str, name: str) -> StylePool:
    """`source<TAB>target` lines; '#' lines and blank lines are comments."""
    pairs = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
            raise ValueError(f"style {name!r} line {i}: expected 'source<TAB>target', got {line!r}")
        src, tgt = (clean_caption(p) for p in parts)
        if "=>" in src or "=>" in tgt:
            raise ValueError(f"style {name!r} line {i}: '=>' would break the prompt format")
        pairs.append((src, tgt))
    if len(pairs) < N_SHOTS:
        raise ValueError(f"style {name!r} has {len(pairs)} pairs; the prompt needs at least {N_SHOTS}")
    return StylePool(name, tuple(pairs))


@lru_cache(maxsize=32)
def load_style(style: str) -> StylePool:
    """A built-in style by name (chat, bard, human, coco) or a path to your own .tsv pool."""
    if style in STYLES:
        text = files("unparrot").joinpath("rewrite_styles", f"{style}.tsv").read_text(encoding="utf-8")
        return parse_style_tsv(text, style)
    p = Path(style)
    if p.suffix == ".tsv" and p.is_file():
        return parse_style_tsv(p.read_text(encoding="utf-8"), p.stem)
    raise KeyError(
        f"unknown rewrite style {style!r}; built-in: {', '.join(STYLES)} (or a path to a .tsv "
        f"file of 'source<TAB>target' lines)"
    )


def clean_caption(caption: str) -> str:
    """One line, single spaces: a newline inside a caption would end the prompt's last line early."""
    return _WS.sub(" ", caption).strip()


def draw_pairs(pool: StylePool, seed: int, draws: int | None = None) -> list[tuple[str, str]]:
    """Three pairs without replacement, chosen by `seed`.

    With `draws=N`, the seed picks one of N fixed draws per style (the same N for every caption), so
    prompts repeat their first ~55 tokens and a local model reuses its KV cache across captions.
    """
    if draws:
        base = int.from_bytes(hashlib.sha256(f"{pool.digest}:{seed % draws}".encode()).digest()[:8], "big")
        return random.Random(base).sample(pool.pairs, N_SHOTS)
    return random.Random(seed).sample(pool.pairs, N_SHOTS)


def build_prompt(caption: str, pairs: list[tuple[str, str]]) -> str:
    blocks = [INSTRUCTION] + [f"{s} => {t}" for s, t in pairs] + [f"{clean_caption(caption)} =>"]
    return "\n\n".join(blocks)


@dataclass(frozen=True)
class Parsed:
    text: str | None
    reason: str | None = None  # why there is no text


def parse_completion(completion: str | None, finish_reason: str | None = None, source: str | None = None) -> Parsed:
    """The rewrite in a model's continuation of `... caption =>`.

    The first line (ending at a newline or a special token), then the text after its last `=>` (a
    model that echoes `caption => rewrite` on one line) unless the source caption itself contains `=>`
    (then a rewrite may keep it), unquoted and single-spaced. A continuation that hit the token limit
    without ending its line is cut back to its last full sentence, or rejected.
    """
    if completion is None:
        return Parsed(None, "no output")
    text = completion
    ended = False
    m = _SPECIAL.search(text)
    if m:
        text, ended = text[: m.start()], True
    for nl in ("\n", "\r"):
        if nl in text:
            text, ended = text.split(nl, 1)[0], True
    if "=>" in text and not (source and "=>" in source):
        text = text.rsplit("=>", 1)[1]
    text = _WS.sub(" ", text).strip()
    text = _unquote(text)
    if not ended and finish_reason == "length":
        ends = list(_SENTENCE_END.finditer(text))
        if not ends:
            return Parsed(None, "cut off at the token limit")
        text = text[: ends[-1].end()].strip()
    if not text:
        return Parsed(None, "empty output")
    return Parsed(text)


def _unquote(text: str) -> str:
    while len(text) >= 1 and text[0] in _QUOTES:
        close = _QUOTES[text[0]]
        if len(text) >= 2 and text.endswith(close) and close not in text[1:-1]:
            text = text[1:-1].strip()
        elif close not in text[1:]:  # an opening quote whose end was cut off
            text = text[1:].strip()
        else:
            break
    return text


_ARTICLES = frozenset(("a", "an", "the"))


def normalized(text: str) -> list[str]:
    """Lowercase word tokens without articles: "A red ball." and "red ball" are the same caption."""
    return [w for w in tokens(text, keep_non_latin=True) if w not in _ARTICLES]


def check_rewrite(source: str, rewrite: str) -> str | None:
    """Why a rewrite is unusable (None when usable): LaCLIP's training falls back to the original for
    picks under 2 words, and a copy of the source adds nothing."""
    if len(tokens(rewrite, keep_non_latin=True)) < 2:
        return "fewer than 2 words"
    if normalized(rewrite) == normalized(source):
        return "same as the source"
    return None
