"""Caption/OCR text normalisation and CoTR, the co-embedded-text rate of the Parrot paper (docs/methods.md §1): the
project's central metric, named for it.

Caption and spotted text are normalised the same way: Unicode NFKC, lowercase, tokens = runs of
[a-z0-9] (or of any letters/digits with `keep_non_latin`). Caption tokens C are a list (repeats count),
spotted tokens O a set. Co-emb words are the tokens of C found in O, and CoTR = |co-emb| / |C|.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Iterable, Sequence

_LATIN = re.compile(r"[a-z0-9]+")
_ANY = re.compile(r"[^\W_]+")

# A short English stop-word list (ours): function words that match by chance and say nothing of parroting.
STOPWORDS = frozenset(
    """a an the of and or to in on at by for with from as is are was were be been it its this
that these those into over under up down out off so no not but if then than too very can will just our your
their his her my me we you they he she i us them do does did has have had""".split()
)


def normalize(text: str) -> str:
    return unicodedata.normalize("NFKC", text or "").lower()


def tokens(text: str, keep_non_latin: bool = False) -> list[str]:
    """Normalised tokens of a caption or of spotted text."""
    return (_ANY if keep_non_latin else _LATIN).findall(normalize(text))


def edit_distance_le1(a: str, b: str) -> bool:
    """True when a and b differ by at most one insertion, deletion or substitution."""
    if a == b:
        return True
    la, lb = len(a), len(b)
    if abs(la - lb) > 1:
        return False
    if la > lb:
        a, b, la, lb = b, a, lb, la
    i = 0
    while i < la and a[i] == b[i]:
        i += 1
    if la == lb:
        return a[i + 1 :] == b[i + 1 :]
    return a[i:] == b[i + 1 :]


@dataclass(frozen=True)
class CotrOptions:
    """Variants of the co-embedded-text match (all off by default = the plain definition)."""

    stopwords: bool = False  # drop stop words from both sides
    min_len: int = 1  # drop tokens shorter than this (2 is a common choice)
    fuzzy: bool = False  # allow edit distance <= 1 for caption tokens of length >= fuzzy_min_len
    fuzzy_min_len: int = 5
    keep_non_latin: bool = False


def cotr_options(stopwords, min_len, fuzzy, fuzzy_min_len, keep_non_latin) -> CotrOptions:
    """The CoTR variant from a stage's recorded parameters (YAML/JSON values, cast to the fields' types)."""
    return CotrOptions(bool(stopwords), int(min_len), bool(fuzzy), int(fuzzy_min_len), bool(keep_non_latin))


def _filter(toks: Iterable[str], opt: CotrOptions) -> list[str]:
    return [t for t in toks if len(t) >= opt.min_len and not (opt.stopwords and t in STOPWORDS)]


def co_embedded(caption: str, spotted: Sequence[str] | str, opt: CotrOptions = CotrOptions()) -> dict:
    """All co-embedded-text measures of one sample.

    Returns caption tokens, spotted tokens, co-emb words (caption tokens found in the spotted text, with
    repeats), `cotr` = |co-emb| / |C|, `iou` = set IoU of caption and spotted tokens, `ocr_coverage` =
    share of spotted tokens that the caption contains, and `is_parrot` = cotr > 0.
    """
    if isinstance(spotted, str):
        spotted = [spotted]
    C = _filter(tokens(caption, opt.keep_non_latin), opt)
    O = set(_filter((t for s in spotted for t in tokens(s, opt.keep_non_latin)), opt))

    def found(c: str) -> str | None:
        if c in O:
            return c
        if opt.fuzzy and len(c) >= opt.fuzzy_min_len:
            for o in O:
                if edit_distance_le1(c, o):
                    return o
        return None

    matches = [(c, found(c)) for c in C]
    co = [c for c, m in matches if m is not None]
    matched_o = {m for _, m in matches if m is not None}
    cset = set(C)
    inter_c = {c for c in cset if found(c) is not None}
    union = len(cset) + len(O) - len(inter_c)
    return {
        "caption_tokens": C,
        "spotted_tokens": sorted(O),
        "co_emb": co,
        "cotr": len(co) / len(C) if C else 0.0,
        "iou": len(inter_c) / union if union else 0.0,
        "ocr_coverage": len(matched_o) / len(O) if O else 0.0,
        "is_parrot": bool(co),
    }
