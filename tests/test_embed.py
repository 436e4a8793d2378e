import shutil

import numpy as np
import pytest
import torch

from helpers import assert_close_scaled
from unparrot.engine import run_stage
from unparrot.curate.reshard import reshard
from unparrot.models import load_clip
from unparrot.ops.aesthetic import aesthetic_mlp
from unparrot.imaging.mask import Masker
from unparrot.pool import Pool, write_subset


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    clip = load_clip("unparrot-rn-tiny")
    path = tmp_path_factory.mktemp("ck") / "tiny.pt"
    torch.save({"state_dict": clip.model.state_dict(), "epoch": 0}, path)
    return str(path)


def test_open_clip_loads_unparrot_configs(tiny_ckpt):
    import open_clip

    from unparrot.models import register_configs

    register_configs()
    model, _, pre = open_clip.create_model_and_transforms("unparrot-rn-tiny", pretrained=tiny_ckpt)
    ref = torch.load(tiny_ckpt, weights_only=True)["state_dict"]
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())


def test_mismatched_checkpoint_is_clear(tiny_ckpt):
    with pytest.raises(ValueError, match="does not match architecture unparrot-vit-tiny"):
        load_clip("unparrot-vit-tiny", tiny_ckpt)
    with pytest.raises(FileNotFoundError, match="neither a file nor a known tag"):
        load_clip("unparrot-rn-tiny", "/no/such/file.pt")
    with pytest.raises(KeyError, match="unknown model"):
        load_clip("ViT-Z-99")


def test_embed_stage(synth_pool, tmp_path, tiny_ckpt):
    pool = Pool(shutil.copytree(synth_pool, tmp_path / "p"))
    run_stage(pool, "spot", {"backend": "oracle"}, progress=False)
    s = run_stage(
        pool, "embed", {"model": "unparrot-rn-tiny", "pretrained": tiny_ckpt, "masked": True}, workers=2, progress=False
    )
    assert s.n_ok == 300 and s.n_err == 0
    df = pool.load(["embed", "spot"])
    uids, img = pool.embeddings("embed", "image")
    _, txt = pool.embeddings("embed", "text")
    img, txt = np.concatenate(img).astype(np.float32), np.concatenate(txt).astype(np.float32)
    assert uids == df["uid"].tolist()
    # unit vectors stored as float16 (relative precision 2**-11): norms and dot products are off by ~1e-3
    assert np.allclose(np.linalg.norm(img, axis=1), 1, atol=2e-3)
    assert np.allclose((img * txt).sum(1), df["clip_score"], atol=3e-3)
    no_text = ~df["has_text"].to_numpy(bool)
    score, masked = df["clip_score"].to_numpy(), df["masked_clip_score"].to_numpy()
    # float32 results of other batches / thread counts: a tolerance scaled to the scores' size
    tol = 1e-4 * np.abs(score).max()
    assert_close_scaled(score[no_text], masked[no_text], 1e-4, "no text: masking changes nothing")
    assert (np.abs(masked - score)[~no_text] > tol).mean() > 0.5  # masking text changes the score
    # the same numbers from one worker, other threads (determinism across engines)
    run_stage(pool, "embed", {"model": "unparrot-rn-tiny", "pretrained": tiny_ckpt}, stage="embed1", progress=False)
    assert_close_scaled(score, pool.load("embed1")["clip_score"].to_numpy(), 1e-4, "one worker")


def test_masks():
    img = np.zeros((20, 20, 3), np.uint8)
    img[5:10, 5:15] = [200, 0, 0]
    img[5:10, 5:8] = [0, 0, 200]
    q = [[5, 5], [15, 5], [15, 10], [5, 10]]
    mean = Masker("mean").mask_array(img, [q])
    region = mean[6:9, 6:14].reshape(-1, 3)
    assert (region == region[0]).all() and region[0][0] > 0 and region[0][2] > 0  # one mixed colour
    assert (mean[0:4] == 0).all()  # outside untouched
    solid = Masker("solid", color=(1, 2, 3)).mask_array(img, [q])
    assert (solid[7, 7] == [1, 2, 3]).all()
    inp = Masker("inpaint").mask_array(img, [q])
    assert inp.shape == img.shape and (inp[0:3] == 0).all()
    assert (Masker("mean").mask_array(img, []) == img).all()
    with pytest.raises(ValueError):
        Masker("blur")


def test_reshard_mask_text(synth_pool, tmp_path):
    pool = Pool(shutil.copytree(synth_pool, tmp_path / "p"))
    run_stage(pool, "spot", {"backend": "oracle"}, progress=False)
    df = pool.load("spot")
    with_text = df[df["has_text"]]["uid"].tolist()[:10]
    write_subset(pool.subset_path("t"), with_text)
    reshard(pool, pool.subset_path("t"), tmp_path / "out", mask_text=True, progress=False)
    orig = {r["uid"]: r for r in pool.samples()}
    for r in Pool(tmp_path / "out").samples():
        assert r["meta"]["masked"] is True and r["image"] != orig[r["uid"]]["image"]


def test_aesthetic_released_format(tmp_path, synth_pool):
    torch.manual_seed(0)
    mlp = aesthetic_mlp(128)
    torch.save(mlp.state_dict(), tmp_path / "aes.pth")
    pool = Pool(shutil.copytree(synth_pool, tmp_path / "p"))
    run_stage(pool, "embed", {"model": "unparrot-rn-tiny"}, progress=False)
    run_stage(pool, "aesthetic", {"weights": str(tmp_path / "aes.pth")}, progress=False)
    _, emb = pool.embeddings("embed", "image")
    x = torch.from_numpy(np.concatenate(emb).astype(np.float32))
    x = x / x.norm(dim=1, keepdim=True)
    with torch.no_grad():
        want = mlp.eval()(x).squeeze(-1).numpy()
    assert_close_scaled(want, pool.load("aesthetic")["aesthetic"].to_numpy(), 1e-4, "aesthetic")
    big = aesthetic_mlp(768)
    torch.save(big.state_dict(), tmp_path / "l14.pth")
    with pytest.raises(ValueError, match="expects 768-d"):
        run_stage(pool, "aesthetic", {"weights": str(tmp_path / "l14.pth")}, stage="aes768", progress=False)
