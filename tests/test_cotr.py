import pytest

from unparrot.cotr import CotrOptions, co_embedded, edit_distance_le1, tokens


def test_normalisation():
    assert tokens("Ｈｅｌｌｏ, WORLD! café-42") == ["hello", "world", "caf", "42"]  # NFKC + lowercase + [a-z0-9]+
    assert tokens("café ÄÖ 東京", keep_non_latin=True) == ["café", "äö", "東京"]


def test_cotr_hand_computed():
    # caption tokens C = [big, sale, sale, today, at, the, shop] (7), spotted O = {sale, shop, now}
    m = co_embedded("Big SALE sale today at the shop", ["SALE now", "shop"])
    assert m["co_emb"] == ["sale", "sale", "shop"]
    assert m["cotr"] == pytest.approx(3 / 7)
    # set IoU: caption set {big, sale, today, at, the, shop} (6) vs {sale, shop, now}: 2 / 7
    assert m["iou"] == pytest.approx(2 / 7)
    assert m["ocr_coverage"] == pytest.approx(2 / 3)  # 'now' is not in the caption
    assert m["is_parrot"]


def test_variants():
    cap, ocr = "the shop at the corner of Main street", ["THE SHOP", "streat"]
    plain = co_embedded(cap, ocr)
    assert plain["co_emb"] == ["the", "shop", "the"] and plain["cotr"] == pytest.approx(3 / 8)
    sw = co_embedded(cap, ocr, CotrOptions(stopwords=True))  # C = [shop, corner, main, street]
    assert sw["co_emb"] == ["shop"] and sw["cotr"] == pytest.approx(1 / 4)
    fz = co_embedded(cap, ocr, CotrOptions(stopwords=True, fuzzy=True))  # street ~ streat (distance 1, len 6)
    assert fz["co_emb"] == ["shop", "street"] and fz["cotr"] == pytest.approx(2 / 4)
    ml = co_embedded("a b cd", ["a b cd"], CotrOptions(min_len=2))
    assert ml["caption_tokens"] == ["cd"] and ml["cotr"] == 1.0
    short = co_embedded("cat", ["cut"], CotrOptions(fuzzy=True))  # fuzzy only for tokens of length >= 5
    assert short["cotr"] == 0.0


def test_edges():
    assert co_embedded("", ["x"])["cotr"] == 0.0
    assert co_embedded("hello", [])["iou"] == 0.0 and not co_embedded("hello", [])["is_parrot"]
    assert co_embedded("!!!", ["!!!"])["cotr"] == 0.0
    assert (
        edit_distance_le1("kitten", "sitten") and edit_distance_le1("abc", "abcd") and edit_distance_le1("abcd", "acd")
    )
    assert not edit_distance_le1("kitten", "sitting") and not edit_distance_le1("ab", "ba")
