import json

import numpy as np
import pytest

from unparrot.curate.cluster import cluster, semdedup
from unparrot.curate.expr import ExprError
from unparrot.curate.select import RecipeError, load_recipe, select
from unparrot.pool import Pool, read_subset, u8_to_uids


def _norm(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force_dedup(emb, order, eps):
    """Reference: the rule written out directly, pair by pair."""
    kept, keep, dup = [], [], []
    for i in order:
        best, best_j = -2.0, -1
        for j in kept:
            s = float(np.dot(emb[i], emb[j]))
            if s > best:
                best, best_j = s, j
        if best > 1 - eps:
            keep.append(False)
            dup.append(best_j)
        else:
            keep.append(True)
            dup.append(-1)
            kept.append(i)
    return np.array(keep), np.array(dup)


@pytest.mark.parametrize("block", [7, 1024])
def test_semdedup_matches_brute_force(block):
    rng = np.random.default_rng(0)
    base = _norm(rng.normal(size=(60, 16)))
    near = _norm(base[rng.integers(0, 60, 90)] + rng.normal(scale=0.08, size=(90, 16)))
    emb = _norm(np.concatenate([base, near])).astype(np.float32)
    order = rng.permutation(len(emb))
    for eps in (0.01, 0.05, 0.2):
        k1, d1 = semdedup(emb, order, eps, block=block)
        k2, d2 = brute_force_dedup(emb, order, eps)
        assert (k1 == k2).all() and (d1 == d2).all()
    assert 0 < k1.sum() < len(emb)


def test_max_sim_to_earlier_and_dedup_fraction(tmp_path):
    from unparrot.curate.cluster import max_sim_to_earlier

    rng = np.random.default_rng(1)
    emb = _norm(rng.normal(size=(300, 8))).astype(np.float32)
    order = rng.permutation(300)
    got = max_sim_to_earlier(emb, order, block=64)
    want = [-1.0] + [max(float(emb[order[i]] @ emb[order[j]]) for j in range(i)) for i in range(1, 300)]
    assert np.allclose(got, want, atol=1e-5)
    pool, _, _ = _pool_with_embeddings(tmp_path / "p", n_groups=60, copies=1)
    s = cluster(pool, k=3, dedup_fraction=0.2, niter=5)
    assert 0 < s.duplicates <= 0.2 * s.samples + 1


def _pool_with_embeddings(tmp_path, n_groups=30, copies=3, d=32, seed=0):
    """A pool folder with an embed stage whose vectors contain planted near-duplicate groups."""
    rng = np.random.default_rng(seed)
    centers = _norm(rng.normal(size=(n_groups, d)))
    vecs, group = [], []
    for g in range(n_groups):
        for c in range(copies):
            vecs.append(centers[g] + rng.normal(scale=0.01 if c else 0.0, size=d))
            group.append(g)
    vecs = _norm(np.array(vecs)).astype(np.float32)
    perm = rng.permutation(len(vecs))
    vecs, group = vecs[perm], np.array(group)[perm]
    (tmp_path / "shards").mkdir(parents=True)
    pool = Pool(tmp_path)
    uids = [f"{i:032x}" for i in range(len(vecs))]
    half = len(vecs) // 2
    for sid, sl in (("a", slice(0, half)), ("b", slice(half, None))):
        pool.write_columns(
            "embed",
            sid,
            {"uid": uids[sl], "key": uids[sl], "clip_score": np.linspace(0, 1, len(uids[sl])), "image": vecs[sl]},
        )
    return pool, uids, group


def test_cluster_finds_planted_duplicates_and_reuses_centroids(tmp_path):
    pool, uids, group = _pool_with_embeddings(tmp_path / "p")
    s = cluster(pool, k=5, eps=0.02, pca_dim=16, niter=10)
    assert s.samples == 90 and s.k == 5
    df = pool.load("cluster")
    assert set(df.columns) >= {"cluster", "dist_to_centroid", "dup_of", "keep_dedup"}
    kept = df[df["keep_dedup"]]
    g = dict(zip(uids, group))
    assert sorted(g[u] for u in kept["uid"]) == list(range(30))  # exactly one per planted group
    dups = df[~df["keep_dedup"]]
    assert all(g[u] == g[d] for u, d in zip(dups["uid"], dups["dup_of"]))
    assert (pool.root / "cluster" / "cluster" / "centroids.npy").exists()
    # assign another pool with the saved PCA and centroids
    other, _, _ = _pool_with_embeddings(tmp_path / "q", seed=0)
    s2 = cluster(other, centroids=str(pool.root / "cluster" / "cluster"), eps=0.02)
    assert s2.k == 5 and (other.load("cluster")["cluster"].to_numpy() == df["cluster"].to_numpy()).all()


def _curation_pool(tmp_path):
    pool, uids, _ = _pool_with_embeddings(tmp_path)
    n = len(uids)
    has = np.arange(n) % 3 == 0
    for sid, sl in (("a", slice(0, n // 2)), ("b", slice(n // 2, None))):
        u = uids[sl]
        pool.write_columns("spot", sid, {"uid": u, "key": u, "has_text": has[sl], "text_area": has[sl] * 0.2})
        pool.write_columns(
            "parrot", sid, {"uid": u, "key": u, "cotr": np.where(has[sl], 0.5, 0.0), "is_parrot": has[sl]}
        )
    for st in ("spot", "parrot", "embed"):
        (pool.root / "columns" / st / "_stage.json").write_text(json.dumps({"op": st}))
    cluster(pool, k=5, eps=0.02, niter=5)
    return pool


def test_builtin_recipes_and_funnel(tmp_path):
    pool = _curation_pool(tmp_path)
    sel = select(pool, "less-is-more")
    assert len(sel.uids) == 60 and sel.funnel[0]["removed"] == 30
    arr = read_subset(pool.subset_path("less-is-more"))
    assert arr.dtype == np.dtype("u8,u8") and sorted(u8_to_uids(arr)) == sorted(sel.uids)
    cs = select(pool, "clip-score", overrides={"fraction": 0.2})
    assert len(cs.uids) == 18
    deb = select(pool, "parrot-debiased", overrides={"min_clip_score": 0.1})
    steps = [f["step"] for f in deb.funnel]
    assert steps[0] == "has_text == false" and any("aesthetic" in s for s in steps)
    assert next(f for f in deb.funnel if "aesthetic" in f["step"])["skipped"] == "column absent"
    assert "aesthetic > 4.5: skipped (column absent)" in deb.line()
    rnd = select(pool, "random")
    assert len(rnd.uids) == len(deb.uids)  # same-size control
    stats = json.loads(pool.subset_path("parrot-debiased").with_suffix(".json").read_text())
    assert stats["kept"] == len(deb.uids) and stats["share_with_text_subset"] == 0.0
    custom = select(pool, {"name": "mine", "where": ["top(clip_score, 0.5)", "not is_parrot"]})
    assert custom.funnel[0]["after"] == 45 and custom.name == "mine"


def test_recipe_errors_before_any_work(tmp_path):
    pool = _curation_pool(tmp_path)
    with pytest.raises(ExprError, match="unknown column 'nope'"):
        select(pool, {"name": "x", "where": ["nope > 1"]})
    with pytest.raises(ExprError, match="cannot compare"):
        select(pool, {"name": "x", "where": ["has_text > 0.5"]})
    with pytest.raises(ExprError):
        select(pool, {"name": "x", "where": ["has_text =="]})
    with pytest.raises(RecipeError, match="no parameter"):
        load_recipe("clip-score", {"nope": 1})
    with pytest.raises(RecipeError, match="unknown recipe keys"):
        load_recipe({"name": "x", "wher": []})
    with pytest.raises(RecipeError, match="size"):
        load_recipe({"name": "x", "size": {"fraction": 3}})
    with pytest.raises(RecipeError, match="not a file"):
        load_recipe("no-such-recipe")
    assert not (pool.root / "subsets" / "x.npy").exists()


def test_t_mars_and_cotr_recipes(tmp_path):
    pool = _curation_pool(tmp_path)
    df = pool.load(["spot", "parrot"])
    rng = np.random.default_rng(0)
    masked = rng.random(len(df))
    for sid, part in (("a", df.iloc[: len(df) // 2]), ("b", df.iloc[len(df) // 2 :])):
        idx = part.index.to_numpy()
        pool.write_columns(
            "masked",
            sid,
            {"uid": part["uid"].to_numpy(), "key": part["key"].to_numpy(), "masked_clip_score": masked[idx]},
        )
    (pool.root / "columns" / "masked" / "_stage.json").write_text(json.dumps({"op": "embed"}))
    tm = select(pool, "t-mars")
    want = set(df["uid"].to_numpy()[np.argsort(-masked)[: len(df) // 2]])
    assert set(tm.uids) == want  # the top half by masked CLIP score, text-bearing or not
    assert tm.funnel[-1]["step"].startswith("size 45 (top by masked_clip_score)")
    select(pool, "less-is-more")
    eq = select(pool, "t-mars", size_like="less-is-more", name="t-mars-eq")
    assert len(eq.uids) == 60 and set(eq.uids) == set(df["uid"].to_numpy()[np.argsort(-masked)[:60]])
    co = select(pool, "cotr")
    assert set(co.uids) == set(df.loc[df["cotr"] <= 0, "uid"]) and len(co.uids) == 60
    loose = select(pool, "cotr", overrides={"max_cotr": 0.6}, name="cotr-loose")
    assert len(loose.uids) == 90


def test_kmeans_settings_by_name(tmp_path):
    pool, _, _ = _pool_with_embeddings(tmp_path)
    s = cluster(pool, k=5, eps=0.02, kmeans="parrot")
    rec = json.loads((pool.root / "columns" / "cluster" / "_stage.json").read_text())
    got = rec.get("params", rec)
    assert (got["niter"], got["nredo"], got["seed"]) == (300, 10, 42)
    assert (got["min_points_per_centroid"], got["max_points_per_centroid"]) == (10000, 200000)
    assert s.k == 5
    s2 = cluster(pool, k=5, eps=0.02, kmeans="parrot", niter=7)  # an explicit setting overrides the named set
    rec = json.loads((pool.root / "columns" / "cluster" / "_stage.json").read_text())
    assert (rec.get("params", rec)["niter"], rec.get("params", rec)["nredo"]) == (7, 10) and s2.k == 5
    with pytest.raises(KeyError, match="k-means settings"):
        cluster(pool, k=5, kmeans="slow")
