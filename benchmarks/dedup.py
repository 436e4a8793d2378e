"""Cluster + dedup of 1M x 512 embeddings (clustered random data plus planted near-duplicates): time and
peak memory of `unparrot cluster` against scikit-learn MiniBatchKMeans + brute-force per-cluster dedup
(SemDeDup's public rule: full cosine matrix per cluster, drop a row whose similarity to any earlier row
exceeds 1 - eps), each in its own process, in the same run. Planted duplicates must be recovered with
recall >= 0.99.

Run: .venv/bin/python benchmarks/dedup.py [--n 1000000] [--dim 512] [--k 1000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np

from _util import OUT, peak_rss_mb


def make_data(root, n: int, d: int, n_dups: int, seed: int = 0):
    """n unit vectors from 4,000 Gaussian blobs (random centres, spread 0.6 per dimension); the last n_dups
    rows are near copies (noise 0.01 per dimension, cosine ~0.9999) of random earlier rows. Written as an
    embed stage in 100 shards; truth.npy holds each copy's source row (-1 for originals)."""
    from unparrot.pool import Pool

    if (root / "truth.npy").exists():
        return
    rng = np.random.default_rng(seed)
    (root / "shards").mkdir(parents=True, exist_ok=True)
    centres = rng.normal(size=(4000, d)).astype(np.float32)
    base_n = n - n_dups
    x = np.empty((n, d), np.float32)
    for i in range(0, base_n, 100_000):
        m = min(100_000, base_n - i)
        x[i : i + m] = centres[rng.integers(0, 4000, m)] + rng.normal(scale=0.6, size=(m, d)).astype(np.float32)
    truth = np.full(n, -1, np.int64)
    truth[base_n:] = rng.choice(base_n, n_dups, replace=False)
    x[base_n:] = x[truth[base_n:]] + rng.normal(scale=0.01, size=(n_dups, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    perm = rng.permutation(n)  # copies spread over all shards
    x, inv = x[perm], np.argsort(perm)
    truth = np.where(truth[perm] >= 0, inv[np.maximum(truth[perm], 0)], -1)
    pool = Pool(root)
    per = (n + 99) // 100
    for s in range(100):
        lo, hi = s * per, min(n, (s + 1) * per)
        uids = [f"{i:032x}" for i in range(lo, hi)]
        pool.write_columns("embed", f"{s:03d}", {"uid": uids, "key": uids, "image": x[lo:hi]})
    np.save(root / "truth.npy", truth)


def ours(root, k: int) -> dict:
    from unparrot.curate.cluster import cluster
    from unparrot.pool import Pool

    t0 = time.time()
    s = cluster(root, k=k, niter=20, eps=0.02, pca_dim=256, max_points_per_centroid=256, progress=False)
    dt = time.time() - t0
    df = Pool(root).load("cluster", columns=["keep_dedup"])
    dropped = np.array([int(u, 16) for u in df["uid"][~df["keep_dedup"].to_numpy()]])
    return {"seconds": dt, "dropped": dropped.tolist(), "line": s.line()}


def baseline(root, k: int) -> dict:
    from sklearn.cluster import MiniBatchKMeans

    from unparrot.pool import Pool

    uids, arrays = Pool(root).embeddings("embed", "image", mmap=False)
    x = np.concatenate(arrays).astype(np.float32)
    t0 = time.time()
    km = MiniBatchKMeans(n_clusters=k, batch_size=4096, max_iter=20, n_init=1, random_state=0)
    labels = km.fit_predict(x)
    dropped = []
    thr = 1 - 0.02
    sizes = np.bincount(labels, minlength=k)
    for c in range(k):
        idx = np.flatnonzero(labels == c)
        if len(idx) < 2:
            continue
        X = x[idx]
        # M[j] = max over earlier rows r < j of cos(X[r], X[j]): the full matrix, in row blocks of 4096 so a
        # big cluster does not need n_c^2 floats at once
        M = np.full(len(idx), -np.inf, np.float32)
        for r0 in range(0, len(idx), 4096):
            S = X[r0 : r0 + 4096] @ X[r0:].T
            S[np.tril_indices(S.shape[0], 0, S.shape[1])] = -np.inf
            M[r0:] = np.maximum(M[r0:], S.max(axis=0))
        dropped.extend(idx[M > thr].tolist())
    return {
        "seconds": time.time() - t0,
        "dropped": [int(uids[i], 16) for i in dropped],
        "line": f"baseline: MiniBatchKMeans k={k}, largest cluster {sizes.max()}",
    }


def child(which: str, root: str, k: int):
    out = (ours if which == "ours" else baseline)(OUT / root, k)
    out["peak_mb"] = peak_rss_mb()
    print(json.dumps(out))


def recall(dropped, truth) -> float:
    """A planted pair counts as found when its copy (or its source) is marked a duplicate."""
    dropped = set(dropped)
    planted = np.flatnonzero(truth >= 0)
    found = sum((int(i) in dropped) or (int(truth[i]) in dropped) for i in planted)
    return found / len(planted)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--dups", type=int, default=10_000)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    name = f"dedup-{a.n}-{a.dim}"
    if a.child:
        return child(a.child[0], a.child[1], a.k)
    make_data(OUT / name, a.n, a.dim, a.dups)
    truth = np.load(OUT / name / "truth.npy")
    res = {}
    for which in ("ours", "baseline"):
        p = subprocess.run(
            [sys.executable, __file__, "--child", which, name, "--k", str(a.k)], capture_output=True, text=True
        )
        if p.returncode:
            print(f"{which} failed with exit code {p.returncode}: {p.stderr[-2000:]}")
            return 1
        res[which] = json.loads(p.stdout.strip().splitlines()[-1])
    o, b = res["ours"], res["baseline"]
    print(o["line"])
    print(b["line"])
    r_o, r_b = recall(o["dropped"], truth), recall(b["dropped"], truth)
    print(f"time: ours {o['seconds']:.1f}s, baseline {b['seconds']:.1f}s, speed-up {b['seconds'] / o['seconds']:.2f}x")
    print(
        f"peak memory: ours {o['peak_mb']:.0f} MB, baseline {b['peak_mb']:.0f} MB, "
        f"ratio {o['peak_mb'] / b['peak_mb']:.2f}"
    )
    print(
        f"planted duplicates recovered: ours {r_o:.4f}, baseline {r_b:.4f} (target >= 0.99) "
        f"{'OK' if r_o >= 0.99 else 'MISSED'}; dropped in all: ours {len(o['dropped'])}, baseline {len(b['dropped'])}"
    )
    return 0 if r_o >= 0.99 else 1


if __name__ == "__main__":
    sys.exit(main())
