"""`unparrot cluster`: PCA + k-means over a pool's image embeddings, then SemDeDup within each cluster.

Parrot-caption curation (docs/methods.md §1): embeddings -> PCA (256) -> faiss k-means; centroids and PCA are
saved and can assign new data. Dedup (ours, SemDeDup style): within each cluster, members are visited in
order of distance to the centroid (farthest first by default, SemDeDup's "keep hard"), and a member whose
cosine similarity to an already *kept* member exceeds 1 - eps is dropped as a duplicate of the most
similar one. Similarities use the full embeddings, not the PCA projection.

Columns written (columns/<stage>/<shard>.parquet): `cluster`, `dist_to_centroid` (1 - cosine in PCA
space), `dup_of` (uid of the kept near-duplicate, or None) and `keep_dedup`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..flags import option
from ..pool import Pool, atomic_save_npy, atomic_write_bytes, atomic_write_table, stage_aside, to_arrow


@dataclass
class ClusterSummary:
    stage: str
    samples: int
    k: int
    kept: int
    duplicates: int
    seconds: float
    largest_cluster: int

    def line(self) -> str:
        return (
            f"{self.stage}: {self.samples} samples in {self.k} clusters (largest {self.largest_cluster}); "
            f"SemDeDup keeps {self.kept}, drops {self.duplicates} near-duplicates ({self.seconds:.1f}s)"
        )


def default_k(n: int) -> int:
    """k scaled to the pool (ours): about sqrt(n) clusters, capped at LAION's 4,000."""
    return int(min(4000, max(1, round(math.sqrt(n)))))


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class Projector:
    """PCA (exact, from the covariance accumulated over chunks: incremental) followed by L2 normalisation;
    identity when the embeddings are no wider than the target dimension."""

    def __init__(self, mean=None, matrix=None):
        self.mean, self.matrix = mean, matrix

    @classmethod
    def fit(cls, x: np.ndarray, dim: int, chunk: int = 16384) -> "Projector":
        d = x.shape[1]
        if dim <= 0 or dim >= d:
            return cls()
        s = np.zeros(d, np.float64)
        ss = np.zeros((d, d), np.float64)
        for i in range(0, len(x), chunk):  # float32 products per chunk, float64 sums across chunks
            c = _normalize(x[i : i + chunk])
            s += c.sum(0, dtype=np.float64)
            ss += c.T @ c
        mean = s / len(x)
        cov = ss / len(x) - np.outer(mean, mean)
        w, v = np.linalg.eigh(cov)
        top = v[:, np.argsort(w)[::-1][:dim]]
        return cls(mean.astype(np.float32), top.astype(np.float32))

    def __call__(self, x: np.ndarray, chunk: int = 16384) -> np.ndarray:
        out = np.empty((len(x), x.shape[1] if self.matrix is None else self.matrix.shape[1]), np.float32)
        for i in range(0, len(x), chunk):
            c = _normalize(x[i : i + chunk])
            out[i : i + chunk] = c if self.matrix is None else _normalize((c - self.mean) @ self.matrix)
        return out

    def save(self, path: Path):
        np.savez(
            path,
            mean=self.mean if self.mean is not None else np.zeros(0),
            matrix=self.matrix if self.matrix is not None else np.zeros((0, 0)),
        )

    @classmethod
    def load(cls, path: Path) -> "Projector":
        z = np.load(path)
        return cls() if z["matrix"].size == 0 else cls(z["mean"], z["matrix"])


def train_kmeans(x: np.ndarray, k: int, niter: int, nredo: int, seed: int, min_points: int, max_points: int):
    """Spherical faiss k-means; faiss subsamples to k * max_points training points."""
    import faiss

    km = faiss.Kmeans(
        x.shape[1],
        k,
        niter=niter,
        nredo=nredo,
        seed=seed,
        spherical=True,
        verbose=False,
        min_points_per_centroid=min_points,
        max_points_per_centroid=max_points,
    )
    km.train(np.ascontiguousarray(x))
    return _normalize(km.centroids)


def assign(x: np.ndarray, centroids: np.ndarray, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (cosine) and 1 - cosine to it, in chunks."""
    import faiss

    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    labels = np.empty(len(x), np.int64)
    dist = np.empty(len(x), np.float32)
    for i in range(0, len(x), chunk):
        s, l = index.search(np.ascontiguousarray(x[i : i + chunk], dtype=np.float32), 1)
        labels[i : i + chunk], dist[i : i + chunk] = l[:, 0], 1.0 - s[:, 0]
    return labels, dist


def semdedup(emb: np.ndarray, order: np.ndarray, eps: float, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Greedy dedup of the rows `order` of L2-normalised `emb` (visited in that order).

    Returns (keep mask over `order`, index into `emb` of the kept duplicate each dropped row matches, -1
    for kept rows). A row is dropped when its cosine to an earlier kept row exceeds 1 - eps.
    """
    thr = 1.0 - eps
    n = len(order)
    keep = np.zeros(n, bool)
    dup = np.full(n, -1, np.int64)
    kept_rows: list[int] = []  # indices into emb
    kept_mat = np.zeros((0, emb.shape[1]), np.float32)
    for b0 in range(0, n, block):
        idx = order[b0 : b0 + block]
        X = _normalize(emb[idx])
        if len(kept_mat):
            S = X @ kept_mat.T
            prev_best = S.argmax(1)
            prev_max = S[np.arange(len(idx)), prev_best]
        else:
            prev_best = np.zeros(len(idx), np.int64)
            prev_max = np.full(len(idx), -np.inf, np.float32)
        G = X @ X.T
        kept_here: list[int] = []  # positions within the block
        for j in range(len(idx)):
            best_val, best_row = prev_max[j], kept_rows[prev_best[j]] if len(kept_rows) else -1
            if kept_here:
                g = G[j, kept_here]
                m = int(g.argmax())
                if g[m] > best_val:
                    best_val, best_row = g[m], int(idx[kept_here[m]])
            if best_val > thr:
                dup[b0 + j] = best_row
            else:
                keep[b0 + j] = True
                kept_here.append(j)
        if kept_here:
            kept_rows.extend(int(idx[j]) for j in kept_here)
            kept_mat = np.concatenate([kept_mat, X[kept_here]])
    return keep, dup


def max_sim_to_earlier(emb: np.ndarray, order: np.ndarray, block: int = 2048) -> np.ndarray:
    """For rows visited in `order`: the highest cosine to any row visited before it (-1 for the first)."""
    out = np.full(len(order), -1.0, np.float32)
    for b0 in range(0, len(order), block):
        X = _normalize(emb[order[b0 : b0 + block]])
        for p0 in range(0, b0 + len(X), block):
            P = _normalize(emb[order[p0 : min(p0 + block, b0 + len(X))]])
            S = X @ P.T
            rows = np.arange(b0, b0 + len(X))[:, None]
            cols = np.arange(p0, p0 + len(P))[None, :]
            S[cols >= rows] = -1.0
            out[b0 : b0 + len(X)] = np.maximum(out[b0 : b0 + len(X)], S.max(axis=1))
    return out


# the stage's columns, typed: a shard of the embed stage without rows still gets all of them
CLUSTER_SCHEMA = {
    "uid": pa.string(),
    "key": pa.string(),
    "cluster": pa.int32(),
    "dist_to_centroid": pa.float32(),
    "dup_of": pa.string(),
    "keep_dedup": pa.bool_(),
}

# faiss k-means settings by name: `fast` (ours, the defaults) or the Parrot paper's LAION run (docs/methods.md §1)
KMEANS = {
    "fast": dict(niter=20, nredo=1, seed=42, min_points_per_centroid=1, max_points_per_centroid=256),
    "parrot": dict(niter=300, nredo=10, seed=42, min_points_per_centroid=10000, max_points_per_centroid=200000),
}


@dataclass
class ClusterConfig:
    """The options of `cluster()` (its signature defaults read these; the CLI's flags are made from them).
    The k-means settings left None come from `KMEANS[kmeans]`."""

    embed_stage: str = option("embed", "stage with the embeddings")
    embedding: str = option("image", "which embeddings: image or text")
    k: int | None = option(None, "k-means clusters (default: about sqrt(n), at most 4000)", short="-k")
    pca_dim: int = option(256, "PCA dimensions before k-means")
    niter: int | None = option(None, "k-means iterations (default: the --kmeans settings')")
    nredo: int | None = option(None, "k-means restarts (default: the --kmeans settings')")
    seed: int | None = option(None, "k-means seed (default: the --kmeans settings')")
    min_points_per_centroid: int | None = option(None, "faiss min points per centroid", aliases=("--min-points",))
    max_points_per_centroid: int | None = option(
        None, "faiss max points per centroid (training subsample)", aliases=("--max-points",)
    )
    eps: float = option(0.05, "duplicates: cosine similarity > 1 - eps")
    keep: str = option("far", "far (SemDeDup: least typical first) or near")
    centroids: str | None = option(None, "folder of a previous run (POOL/cluster/<stage>) to assign with")
    stage: str = option("cluster", "output stage name")
    dedup_fraction: float | None = option(None, "instead of eps: drop about this share of the pool")
    kmeans: str = option(
        "fast",
        "named k-means settings: fast (ours: niter 20, nredo 1, seed 42, 1/256 points "
        "per centroid) or parrot (the Parrot paper's: 300, 10, 42, 10000/200000); the flags above "
        "override",
        choices=tuple(KMEANS),
    )


def cluster(
    pool: Pool | str,
    embed_stage: str = ClusterConfig.embed_stage,
    embedding: str = ClusterConfig.embedding,
    k: int | None = ClusterConfig.k,
    pca_dim: int = ClusterConfig.pca_dim,
    niter: int | None = ClusterConfig.niter,
    nredo: int | None = ClusterConfig.nredo,
    seed: int | None = ClusterConfig.seed,
    min_points_per_centroid: int | None = ClusterConfig.min_points_per_centroid,
    max_points_per_centroid: int | None = ClusterConfig.max_points_per_centroid,
    eps: float = ClusterConfig.eps,
    keep: str = ClusterConfig.keep,
    centroids: str | None = ClusterConfig.centroids,
    stage: str = ClusterConfig.stage,
    dedup_fraction: float | None = ClusterConfig.dedup_fraction,
    progress: bool = True,
    kmeans: str = ClusterConfig.kmeans,
) -> ClusterSummary:
    """Cluster the pool's `embedding` vectors of `embed_stage` and mark near-duplicates.

    The k-means settings come from `KMEANS[kmeans]` ("fast", ours, for speed; "parrot", the Parrot paper's
    LAION run: niter 300, nredo 10, seed 42, min/max points per centroid 10k/200k; k stays scaled to the
    pool unless given: 4000 there); an explicit `niter`, `nredo`, ... overrides its entry.
    `dedup_fraction` (ours) replaces `eps` by the threshold at which
    about that share of the pool has a closer earlier neighbour in its cluster (the greedy rule then drops
    at most that share): useful when the scale of cosines is unknown (small models trained from scratch).
    `centroids` names a folder written by an earlier run (its PCA
    and centroids are reused to assign this pool instead of training). Re-running replaces the stage and,
    at the same step, POOL/cluster/<stage> (the PCA and centroids the stage was assigned with, copied
    there also when they came from `centroids`).
    """
    km = kmeans_settings(
        kmeans,
        niter=niter,
        nredo=nredo,
        seed=seed,
        min_points_per_centroid=min_points_per_centroid,
        max_points_per_centroid=max_points_per_centroid,
    )
    if keep not in ("far", "near"):
        raise ValueError("keep must be 'far' (SemDeDup: keep the least typical first) or 'near'")
    if not 0 <= eps < 1:
        raise ValueError("eps must be in [0, 1)")
    pool = pool if isinstance(pool, Pool) else Pool(pool)
    t0 = time.time()
    shard_ids, uids, sizes, emb = _load_embeddings(pool, embed_stage, embedding)
    if centroids:
        proj, cents = _load_clustering(Path(centroids), emb.shape[1])
        x = proj(emb)
    else:
        proj, cents, x = _fit_clustering(emb, pca_dim, k, km)
    labels, dist = assign(x, cents)
    del x
    order, bounds = _visit_order(labels, dist, keep, len(cents))
    if dedup_fraction is not None:
        eps = _eps_for_fraction(emb, order, bounds, dedup_fraction)
    keep_mask, dup_idx = _dedup_clusters(emb, order, bounds, eps)
    uid_arr = np.array(uids, dtype=object)
    dup_of = np.where(dup_idx >= 0, uid_arr[np.maximum(dup_idx, 0)], None)
    params = {
        "dedup_fraction": dedup_fraction,
        "embed_stage": embed_stage,
        "embedding": embedding,
        "k": int(len(cents)),
        "pca_dim": pca_dim,
        "kmeans": kmeans,
        **km,
        "eps": eps,
        "keep": keep,
        "centroids": centroids,
    }
    columns = {"cluster": labels, "dist_to_centroid": dist, "dup_of": dup_of, "keep_dedup": keep_mask}
    with _stage_and_model_aside(pool, stage) as (new_stage, new_model):
        proj.save(new_model / "pca.npz")  # the model of this stage, also when it was reused (--centroids)
        atomic_save_npy(new_model / "centroids.npy", cents)
        _write_stage(pool, new_stage, embed_stage, shard_ids, sizes, uids, columns, params)
    n = len(emb)
    counts = np.bincount(labels, minlength=len(cents))
    return ClusterSummary(
        stage, n, len(cents), int(keep_mask.sum()), int(n - keep_mask.sum()), time.time() - t0, int(counts.max())
    )


def kmeans_settings(kmeans: str, **given) -> dict:
    """The faiss k-means settings: the named set `KMEANS[kmeans]`, then every setting given explicitly (not
    None), so `--kmeans parrot --niter 7` is the paper's run with fewer iterations."""
    if kmeans not in KMEANS:
        raise KeyError(f"unknown k-means settings {kmeans!r}; known: {', '.join(KMEANS)}")
    return {**KMEANS[kmeans], **{key: v for key, v in given.items() if v is not None}}


def _load_embeddings(pool: Pool, embed_stage: str, embedding: str):
    """(shard ids, uids, rows per shard, embeddings) of the embed stage. The embeddings stay float16 as
    stored (n x d x 2 bytes in RAM): rows are normalised chunk by chunk where they are used."""
    shard_ids = pool.done_shards(embed_stage)
    if not shard_ids:
        raise FileNotFoundError(f"no {embed_stage!r} stage in {pool.root}: run `unparrot embed` first")
    uids, arrays = pool.embeddings(embed_stage, embedding)
    emb = np.concatenate(arrays) if arrays else np.zeros((0, 1), np.float16)
    if len(emb) == 0:
        raise ValueError(f"stage {embed_stage!r} has no embeddings")
    return shard_ids, uids, [len(a) for a in arrays], emb


def _load_clustering(folder: Path, dim: int) -> tuple[Projector, np.ndarray]:
    """The PCA and centroids an earlier run saved in `folder`, refused when they were made for embeddings of
    another width (another model): assigning with them would be meaningless, not an error."""
    proj = Projector.load(folder / "pca.npz")
    cents = np.load(folder / "centroids.npy")
    want = proj.matrix.shape[0] if proj.matrix is not None else cents.shape[1]
    if want != dim:
        raise ValueError(f"the saved clustering expects {want}-d embeddings, the pool has {dim}-d")
    return proj, cents


def _fit_clustering(emb: np.ndarray, pca_dim: int, k: int | None, km: dict):
    """Fit the PCA and k-means on this pool: (projector, centroids, projected embeddings). k defaults to
    `default_k` of the pool size."""
    n = len(emb)
    proj = Projector.fit(emb, pca_dim)
    k = int(k or default_k(n))
    if k > n:
        raise ValueError(f"k={k} clusters for {n} samples")
    x = proj(emb)
    cents = train_kmeans(
        x, k, km["niter"], km["nredo"], km["seed"], km["min_points_per_centroid"], km["max_points_per_centroid"]
    )
    return proj, cents, x


def _visit_order(labels: np.ndarray, dist: np.ndarray, keep: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    """All rows sorted by cluster, then by distance to the centroid (farthest first for keep="far"), and the
    bounds of each cluster in that order: SemDeDup keeps the first of a group of near-duplicates it visits."""
    order = np.lexsort((-dist if keep == "far" else dist, labels))
    return order, np.searchsorted(labels[order], np.arange(k + 1))


def _eps_for_fraction(emb: np.ndarray, order: np.ndarray, bounds: np.ndarray, dedup_fraction: float) -> float:
    """The eps at which `dedup_fraction` of the pool has a closer earlier neighbour in its cluster, for
    models whose scale of cosines is unknown (the greedy rule then drops at most that share)."""
    if not 0 <= dedup_fraction < 1:
        raise ValueError("dedup_fraction must be in [0, 1)")
    clusters = (order[bounds[c] : bounds[c + 1]] for c in range(len(bounds) - 1))
    earlier = np.concatenate([max_sim_to_earlier(emb, members) for members in clusters])
    return float(1.0 - np.quantile(earlier, 1.0 - dedup_fraction)) if dedup_fraction > 0 else 1.0 - 1e-9


def _dedup_clusters(emb: np.ndarray, order: np.ndarray, bounds: np.ndarray, eps: float):
    """SemDeDup within each cluster separately (near-duplicates across clusters are rare and the cost is
    quadratic in the cluster size): (keep mask, index of the kept duplicate or -1), over all rows."""
    keep_mask = np.zeros(len(emb), bool)
    dup_idx = np.full(len(emb), -1, np.int64)
    for c in range(len(bounds) - 1):
        members = order[bounds[c] : bounds[c + 1]]
        if len(members) == 0:
            continue
        kmask, dups = semdedup(emb, members, eps)
        keep_mask[members] = kmask
        dup_idx[members] = dups
    return keep_mask, dup_idx


@contextmanager
def _stage_and_model_aside(pool: Pool, stage: str):
    """Yield (column folder, model folder), both built aside, and swap them in together: the PCA and
    centroids in POOL/cluster/<stage> always belong to the stage in columns/<stage>.

    Two folders cannot be renamed at once, so the swap goes: old model away, old stage away, new stage
    in, new model in. A kill between two of these leaves one of the two missing (rerun `cluster` to finish),
    never the centroids of one run beside the stage of another (`--centroids` would assign with a model
    of another k)."""
    model = pool.root / "cluster" / stage
    new_model, old_model = model.parent / f".{stage}.new", model.parent / f".{stage}.old"
    for d in (new_model, old_model):  # leftovers of a killed run
        shutil.rmtree(d, ignore_errors=True)
    new_model.mkdir(parents=True)
    try:
        with stage_aside(pool.root, stage) as new_stage:
            yield new_stage, new_model
            if model.exists():
                os.replace(model, old_model)
    except BaseException:
        shutil.rmtree(new_model, ignore_errors=True)
        raise
    os.replace(new_model, model)
    shutil.rmtree(old_model, ignore_errors=True)


def _write_stage(pool: Pool, new: Path, embed_stage: str, shard_ids, sizes, uids, columns: dict, params: dict):
    """One parquet file per shard of the embed stage (rows in its order, its keys) and the stage record,
    into the folder `new` that `_stage_and_model_aside` swaps in whole: a killed run leaves the previous
    stage, never half of a new one."""
    start = 0
    for sid, size in zip(shard_ids, sizes):
        sl = slice(start, start + size)
        keys = pool.read_columns(embed_stage, sid, ["key"]).column("key").to_pylist()
        atomic_write_table(
            new / f"{sid}.parquet",
            to_arrow(
                {
                    "uid": uids[sl],
                    "key": keys,
                    "cluster": columns["cluster"][sl].astype(np.int32),
                    "dist_to_centroid": columns["dist_to_centroid"][sl].astype(np.float32),
                    "dup_of": list(columns["dup_of"][sl]),
                    "keep_dedup": columns["keep_dedup"][sl],
                },
                CLUSTER_SCHEMA,
            ),
        )
        start += size
    atomic_write_bytes(
        new / "_stage.json", json.dumps({"op": "cluster", "version": 1, "params": params}, indent=1).encode()
    )
