import numpy as np
import pytest

from unparrot.curate.expr import ExprError, check, columns_of, evaluate, parse, rank_mask

TYPES = {
    "has_text": "bool",
    "clip_score": "num",
    "cotr": "num",
    "texts": "list",
    "caption": "str",
    "keep_dedup": "bool",
    "spot.has_text": "bool",
}


def ev(text, cols, n):
    tree = parse(text)
    assert check(tree, TYPES, text) == "bool"
    return evaluate(tree, cols, n)


def test_conditions_combine():
    cols = {
        "has_text": np.array([True, False, False, True]),
        "clip_score": np.array([0.1, 0.35, 0.5, 0.4]),
        "cotr": np.array([1.0, 0.0, 0.0, 0.5]),
        "keep_dedup": np.array([True, True, False, True]),
    }
    assert ev("has_text == false and clip_score > 0.3", cols, 4).tolist() == [False, True, True, False]
    assert ev("not has_text and keep_dedup", cols, 4).tolist() == [False, True, False, False]
    assert ev("has_text or (cotr < 0.5 and not keep_dedup)", cols, 4).tolist() == [True, False, True, True]
    assert ev("clip_score - cotr * 0.1 >= 0.35", cols, 4).tolist() == [False, True, True, True]
    assert ev("top(clip_score, 0.5)", cols, 4).tolist() == [False, False, True, True]
    assert ev("bottom(clip_score, 0.25)", cols, 4).tolist() == [True, False, False, False]
    assert ev("abs(cotr - 0.5) < 0.1", cols, 4).tolist() == [False, False, False, True]
    assert ev("spot.has_text", {"spot.has_text": np.array([True, False])}, 2).tolist() == [True, False]


def test_missing_values_never_pass():
    cols = {"has_text": np.array([True, None, False], dtype=object), "clip_score": np.array([0.5, np.nan, 0.5])}
    assert ev("has_text == false", cols, 3).tolist() == [False, False, True]
    assert ev("clip_score > 0.1", cols, 3).tolist() == [True, False, True]
    assert ev("clip_score != 0.5", cols, 3).tolist() == [False, False, False]
    assert ev("is_null(clip_score)", cols, 3).tolist() == [False, True, False]
    assert ev("has_text == null", cols, 3).tolist() == [False, True, False]
    assert rank_mask(np.array([np.nan, 1.0, 2.0, 3.0]), 0.5).tolist() == [False, False, True, True]


def test_list_and_string_columns():
    cols = {
        "texts": np.array([["a", "b"], [], ["c"]], dtype=object),
        "caption": np.array(["x", "y", "x"], dtype=object),
    }
    assert ev("len(texts) >= 1", cols, 3).tolist() == [True, False, True]
    assert ev("caption == 'x'", cols, 3).tolist() == [True, False, True]


@pytest.mark.parametrize(
    "text,msg",
    [
        ("clip_score >", "expected"),
        ("clip_score > > 1", "unexpected"),
        ("(has_text", "expected '\\)'"),
        ("has_text == false and", "unexpected the end"),
        ("", "empty"),
        ("clip_score $ 3", "unexpected character"),
        ("__import__('os')", "unknown function"),
        ("0 < clip_score < 1", "chained"),
    ],
)
def test_malformed(text, msg):
    with pytest.raises(ExprError, match=msg):
        check(parse(text), TYPES, text)


@pytest.mark.parametrize(
    "text,msg",
    [
        ("aesthetic > 4.5", "unknown column 'aesthetic'"),
        ("clip_score", "num"),  # a number is not a condition
        ("has_text > 1", "cannot compare"),
        ("clip_score == 'a'", "cannot compare"),
        ("has_text < true", "does not apply"),
        ("has_text and clip_score", "needs true/false"),
        ("top(clip_score, 2)", "fraction"),
        ("top(has_text, 0.5)", "numeric"),
        ("texts == 'a'", "cannot compare"),
        ("len(clip_score) > 1", "list or text"),
        ("not clip_score", "'not' needs"),
    ],
)
def test_type_errors(text, msg):
    with pytest.raises(ExprError, match=msg):
        t = check(parse(text), TYPES, text)
        if t != "bool":
            raise ExprError(f"condition is a {t}")


def test_no_eval_ever():
    tree = parse("has_text == false or clip_score > 0.3")
    assert columns_of(tree) == {"has_text", "clip_score"}
    assert "lambda" not in repr(tree) and all(isinstance(x, (tuple, str, float, bool, list, type(None))) for x in tree)


def test_string_literals_keep_their_unicode():
    """Regression: literals were decoded with unicode_escape, so "café" became 'cafÃ©' and never matched."""
    cols = {"caption": np.array(["café", "naïve", 'say "hi"\\n'], dtype=object)}
    assert ev('caption == "café"', cols, 3).tolist() == [True, False, False]
    assert ev("caption == 'naïve'", cols, 3).tolist() == [False, True, False]
    assert ev(r'caption == "say \"hi\"\\n"', cols, 3).tolist() == [False, False, True]
    assert parse(r'"a\tb"') == ("lit", "a\tb", "str")
    with pytest.raises(ExprError, match=r"unknown escape \\x"):
        parse(r'caption == "\x41"')
