import csv
import shutil

import pytest

from unparrot.profile import profile, read_vocab, summarize, vocab
from unparrot.synth.stats import truth_stats


def test_profile_with_oracle_matches_ground_truth(synth_pool, tmp_path):
    pool = shutil.copytree(synth_pool, tmp_path / "p")
    s = profile(pool, backend="oracle", workers=2, progress=False)
    t = truth_stats(pool)
    assert s.samples == 300 and s.errors == 0
    assert s.share_with_text == pytest.approx(t["share_with_text"])
    assert s.mean_cotr == pytest.approx(t["mean_cotr"])
    assert s.share_parrot == pytest.approx(t["share_parrot_captions"])
    assert s.share_fully_parroted == pytest.approx(t["share_fully_parroted"])
    assert s.top_co_emb[:5] == t["top_co_emb_words"][:5]
    line = s.line()
    assert "images with text" in line and "top co-embedded words" in line
    assert summarize(pool).samples == 300  # summarize reads the columns again


def test_vocab_csv(synth_pool, tmp_path):
    pool = shutil.copytree(synth_pool, tmp_path / "p")
    profile(pool, backend="oracle", workers=1, progress=False)
    v = vocab(pool, top=15, stopwords=True)
    rows = list(csv.reader(open(pool / "vocab" / "caption_1gram.csv")))
    assert rows[0] == ["ngram", "count"] and len(rows) == 16
    counts = [int(c) for _, c in rows[1:]]
    assert counts == sorted(counts, reverse=True)
    assert all(" " in g for g, _ in v["caption_2gram"])
    assert "a" not in [g for g, _ in v["caption_1gram"]]  # stop word
    assert read_vocab(pool / "vocab" / "co_emb_1gram.csv", top=3) == [g for g, _ in v["co_emb_1gram"][:3]]
