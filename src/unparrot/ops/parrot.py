"""`parrot`: how much of each caption is spelled in its image (docs/methods.md §1), from the spot columns.

Writes `co_emb` (the caption tokens found in the spotted text, with repeats), `n_caption_tokens`, `cotr`
(= |co_emb| / |caption tokens|), `iou` (set IoU of caption and spotted tokens), `ocr_coverage` (share
of spotted tokens in the caption) and `is_parrot` (cotr > 0). Options are the variants of text.CotrOptions.
"""

from __future__ import annotations

import pyarrow as pa

from dataclasses import dataclass

from ..cotr import CotrOptions, co_embedded, cotr_options
from ..flags import option
from .base import Operator, column, map_rows

PARROT_COLUMNS = ("co_emb", "n_caption_tokens", "cotr", "iou", "ocr_coverage", "is_parrot")


@dataclass
class ParrotConfig:
    """The parrot operator's options (its `__init__` defaults read these; the CoTR variants' defaults are
    text.CotrOptions's)."""

    spot_stage: str = option("spot", "stage with the spotted texts")
    stopwords: bool = option(CotrOptions.stopwords, "CoTR variant: drop stop words from both sides")
    min_len: int = option(CotrOptions.min_len, "CoTR variant: drop tokens shorter than this")
    fuzzy: bool = option(CotrOptions.fuzzy, "CoTR variant: edit distance <= 1 for long caption tokens")
    fuzzy_min_len: int = option(CotrOptions.fuzzy_min_len, "shortest caption token matched fuzzily")
    keep_non_latin: bool = option(CotrOptions.keep_non_latin, "CoTR variant: keep non-Latin tokens")


class Parrot(Operator):
    needs = ("caption",)
    version = 1
    schema = {
        "co_emb": pa.list_(pa.string()),
        "n_caption_tokens": pa.int64(),
        "cotr": pa.float64(),
        "iou": pa.float64(),
        "ocr_coverage": pa.float64(),
        "is_parrot": pa.bool_(),
    }

    def __init__(
        self,
        spot_stage: str = ParrotConfig.spot_stage,
        stopwords: bool = ParrotConfig.stopwords,
        min_len: int = ParrotConfig.min_len,
        fuzzy: bool = ParrotConfig.fuzzy,
        fuzzy_min_len: int = ParrotConfig.fuzzy_min_len,
        keep_non_latin: bool = ParrotConfig.keep_non_latin,
    ):
        self.opt = cotr_options(stopwords, min_len, fuzzy, fuzzy_min_len, keep_non_latin)
        self.inputs = {spot_stage: ["texts"]}

    @classmethod
    def inputs_for(cls, params: dict) -> dict[str, list[str]]:
        return {params.get("spot_stage", "spot"): ["texts"]}

    def __call__(self, batch):
        captions, texts = column(batch, "caption"), column(batch, "texts")

        def row(i):
            m = co_embedded(captions[i], [] if texts[i] is None else list(texts[i]), self.opt)
            return {
                "co_emb": m["co_emb"],
                "n_caption_tokens": len(m["caption_tokens"]),
                "cotr": m["cotr"],
                "iou": m["iou"],
                "ocr_coverage": m["ocr_coverage"],
                "is_parrot": m["is_parrot"],
            }

        return map_rows(row, len(captions), PARROT_COLUMNS)
