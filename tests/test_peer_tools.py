"""unparrot inside a pipeline of the peers' own tools (issue 16), each the real package from the `test` extra:
img2dataset downloading from a local HTTP server, open_clip's own API and trainer (`open_clip_train.main`),
and CLIP_benchmark's zero-shot classification."""

import io
import json
import os
import subprocess
import sys
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unparrot.curate.reshard import reshard
from unparrot.pool import Pool, write_subset

ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.slow  # a few steps of training first, then the peers' own processes
ENV = {
    **os.environ,
    "PYTHONPATH": str(ROOT / "src"),
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "NO_ALBUMENTATIONS_UPDATE": "1",
}  # albumentations (imported by img2dataset) checks for updates online


# ---- open_clip's API, open_clip_train, CLIP_benchmark ----------------------------------------------
@pytest.fixture(scope="module")
def trained(synth_pool, tmp_path_factory):
    """A few steps of `unparrot train` with the default model on reshard output: (reshard folder, run)."""
    from unparrot.train import TrainConfig, train

    tmp = tmp_path_factory.mktemp("peers")
    pool = Pool(synth_pool)
    write_subset(tmp / "all.npy", [r["uid"] for r in pool.samples()])
    reshard(pool, tmp / "all.npy", tmp / "rs", shard_size=100, progress=False)
    cfg = TrainConfig(
        train_data=str(tmp / "rs"),
        out=str(tmp / "run"),
        samples=64,
        batch_size=16,
        loader_workers=0,
        threads=1,
        warmup=1,
        vocab_texts=[str(synth_pool / "eval" / "clean" / "classnames.txt")],
        progress=False,
    )
    assert cfg.model == "unparrot-rn-tiny-v1k"  # the default model, with its 1,024-row token table
    summary = train(cfg)
    assert summary["open_clip"] == str(tmp / "run" / "open_clip")
    return tmp / "rs", tmp / "run"


def test_open_clip_train_on_reshard_output_then_unparrot_evaluate(trained, synth_pool, tmp_path):
    """open_clip_train.main fine-tunes the exported default model on reshard output, with the epoch size
    from sizes.json (no --train-num-samples); `unparrot evaluate` reads its checkpoint."""
    from unparrot.cli import main as cli

    rs, run = trained
    tars = sorted((rs / "shards").glob("*.tar"))
    cmd = [
        sys.executable,
        "-m",
        "open_clip_train.main",
        "--model",
        f"local-dir:{run / 'open_clip'}",
        "--train-data",
        str(rs / "shards") + "/{%s..%s}.tar" % (tars[0].stem, tars[-1].stem),
        "--dataset-type",
        "webdataset",
        "--batch-size",
        "16",
        "--epochs",
        "1",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--lr",
        "1e-4",
        "--warmup",
        "1",
        "--logs",
        str(tmp_path / "logs"),
        "--name",
        "oc",
        "--log-every-n-steps",
        "1",
    ]
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    log = (tmp_path / "logs" / "oc" / "out.log").read_text()
    n = sum(json.loads((rs / "shards" / "sizes.json").read_text()).values())
    epoch = -(-n // 16) * 16  # open_clip_train's epoch: whole batches of the sizes.json total, rounded up
    assert n == 300 and "Contrastive_loss" in log and f"/{epoch} (" in log
    ck = tmp_path / "logs" / "oc" / "checkpoints" / "epoch_1.pt"
    assert ck.exists()
    rc = cli(
        [
            "evaluate",
            "--model",
            f"local-dir:{run / 'open_clip'}",
            "--pretrained",
            str(ck),
            "--name",
            "oc",
            "--dataset",
            f"clean={synth_pool / 'eval' / 'clean'}",
            "--out",
            str(tmp_path / "res"),
        ]
    )
    assert rc == 0
    res = json.loads((tmp_path / "res" / "oc" / "zeroshot__clean.json").read_text())
    assert res["metrics"]["n"] > 0 and 0 <= res["metrics"]["acc1"] <= 1


def _accuracy_numpy2(output, target, topk=(1,)):
    """clip_benchmark 1.6.2's `accuracy`, with `.item()` where it calls float() on a 1-element array
    (an error under numpy 2)."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [float(correct[:k].reshape(-1).float().sum().item()) / len(target) for k in topk]


def test_clip_benchmark_zero_shot_equals_unparrot_evaluate(trained, synth_pool, tmp_path, monkeypatch):
    pytest.importorskip("clip_benchmark")
    import torch
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import zeroshot_classification as zsc
    from clip_benchmark.models import load_clip as cb_load_clip

    from unparrot.evaluate import evaluate
    from unparrot.evaluate.datasets import load_set
    from unparrot.evaluate.zeroshot import class_embeddings, encode_images
    from unparrot.models import load_clip

    _, run = trained
    clean = synth_pool / "eval" / "clean"
    monkeypatch.setattr(zsc, "accuracy", _accuracy_numpy2)
    # CLIP_benchmark's own open_clip loader on the exported folder
    model, transform, tokenizer = cb_load_clip("open_clip", f"local-dir:{run / 'open_clip'}", None, None, "cpu")
    model.eval()
    ds = build_dataset("wds/clean", root=str(clean), transform=transform, split="test")
    dl = torch.utils.data.DataLoader(ds.batched(64), batch_size=None, shuffle=False, num_workers=0)
    theirs = zsc.evaluate(model, dl, tokenizer, ds.classes, ds.templates, "cpu", amp=False)  # fp32
    ours = evaluate(
        "unparrot-rn-tiny-v1k",
        str(run / "checkpoints" / "final.pt"),
        datasets={"clean": str(clean)},
        out=tmp_path / "res",
        name="ours",
        progress=False,
    )[0]["metrics"]
    assert ours["n"] == len(list(iter(ds)))
    assert theirs["acc1"] == ours["acc1"]
    assert theirs["mean_per_class_recall"] == pytest.approx(ours["mean_per_class_recall"], rel=1e-12)
    # and image by image (a model this short-trained guesses one class, so compare the logits): the same
    # class embeddings, the same logits and the same prediction for every image
    classifier = zsc.zero_shot_classifier(model, tokenizer, ds.classes, ds.templates, "cpu", amp=False)
    logits, target = zsc.run_classification(model, classifier, dl, "cpu", amp=False)
    clip = load_clip("unparrot-rn-tiny-v1k", str(run / "checkpoints" / "final.pt"))
    s = load_set(clean)
    rows = list(s.samples())
    feats, ok = encode_images(clip, [r["image"] for r in rows])
    W = class_embeddings(clip, s.classnames, s.templates)
    assert ok.all() and (target.numpy() == [r["label"] for r in rows]).all()
    assert np.allclose(classifier.numpy().T, W, rtol=0, atol=1e-5)
    mine = 100.0 * feats @ W.T
    assert np.allclose(logits.numpy(), mine, rtol=0, atol=1e-4 * np.abs(mine).max())
    assert (logits.argmax(1).numpy() == mine.argmax(1)).all()
    assert logits.numpy().std(0).max() > 1e-3  # the images do differ


# ---- img2dataset -----------------------------------------------------------------------------------
class _Images(BaseHTTPRequestHandler):
    """/img/N.jpg: a JPEG; /missing/N: 404; /page/N: an HTML page (not an image)."""

    def do_GET(self):  # noqa: N802 - http.server's name
        kind, _, name = self.path.strip("/").partition("/")
        if kind == "img":
            i = int(name.split(".")[0])
            buf = io.BytesIO()
            Image.new("RGB", (40 + i % 7, 32), ((i * 37) % 256, (i * 91) % 256, 128)).save(buf, format="JPEG")
            body, ctype, code = buf.getvalue(), "image/jpeg", 200
        elif kind == "page":
            body, ctype, code = b"<html><body>not an image</body></html>", "text/html", 200
        else:
            body, ctype, code = b"not found", "text/plain", 404
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def image_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        t.join(timeout=10)


def _members(path) -> dict:
    """key -> {ext: bytes} of a tar, read with the standard library."""
    out: dict = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            if m.isfile():
                key, _, ext = m.name.partition(".")
                out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


def test_img2dataset_output_through_ingest_profile_select_reshard(image_server, tmp_path):
    pytest.importorskip("img2dataset")
    from unparrot.curate.select import select
    from unparrot.ingest import ingest
    from unparrot.profile import profile

    rows = []
    for i in range(100):
        # the last 25 rows (img2dataset's shard 00003) all fail: a 404 or a page that is not an image
        kind = ("missing" if i % 2 else "page") if i >= 75 else ("missing" if i % 10 == 3 else "img")
        rows.append({"url": f"{image_server}/{kind}/{i}.jpg", "caption": f"a shape number {i}"})
    rows[11]["url"] = f"{image_server}/page/11.jpg"  # a non-image among the good rows too
    urls = tmp_path / "urls.csv"
    with open(urls, "w") as f:
        f.write("url,caption\n" + "".join(f"{r['url']},{r['caption']}\n" for r in rows))
    dl = tmp_path / "dl"
    code = (
        "from img2dataset import download; download(url_list=%r, input_format='csv', url_col='url', "
        "caption_col='caption', output_format='webdataset', output_folder=%r, processes_count=1, "
        "thread_count=4, image_size=32, resize_mode='border', number_sample_per_shard=25, timeout=10, "
        "retries=0, enable_wandb=False, distributor='multiprocessing')" % (str(urls), str(dl))
    )
    p = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    tars = sorted(dl.glob("*.tar"))
    got = {t.stem: _members(t) for t in tars}
    assert [t.stem for t in tars] == ["00000", "00001", "00002", "00003"]
    assert len(got["00003"]) == 0  # every URL of the last shard failed: a 0-sample tar
    ok = [i for i, r in enumerate(rows) if "/img/" in r["url"]]
    assert sum(len(v) for v in got.values()) == len(ok)

    pool = tmp_path / "pool"
    s = ingest(str(dl), pool, progress=False)  # in place
    assert s.in_place and s.shards == 4
    prof = profile(pool, workers=1, progress=False)
    assert prof.samples == len(ok)
    sel = select(pool, "less-is-more")
    assert sel.pool_rows == len(ok)
    out = reshard(pool, pool / "subsets" / "less-is-more.npy", tmp_path / "rs", columns=["has_text"], progress=False)
    assert out.written == len(sel.uids) > 0
    # uids, keys, captions and image bytes survive
    source = {k: m for v in got.values() for k, m in v.items()}
    pool_rows = {r["key"]: r for r in Pool(pool).samples()}
    written = {k: m for t in sorted((tmp_path / "rs" / "shards").glob("*.tar")) for k, m in _members(t).items()}
    assert set(written) <= set(source)
    for key, m in written.items():
        assert m["jpg"] == source[key]["jpg"] and m["txt"] == source[key]["txt"]
        meta = json.loads(m["json"])
        assert meta["uid"] == pool_rows[key]["uid"] and meta["url"] == json.loads(source[key]["json"])["url"]
        assert meta["has_text"] is False
    assert np.isin(sorted(sel.uids), [pool_rows[k]["uid"] for k in written]).all()
