"""The training loop's parts, checked against what they promise: schedule, weight-decay groups, exact
gradient accumulation, random resized crops and text-region masking."""

import json
import math

import numpy as np
import pytest
import torch

from unparrot.io.tar import RawSample
from unparrot.train.data import SampleMaker, crop_params
from unparrot.train.trainer import accumulated, lr_at, param_groups


def test_warmup_then_cosine_to_zero():
    base, warm, steps = 1e-3, 10, 110
    assert lr_at(0, base, warm, steps) == pytest.approx(base / warm)
    assert lr_at(9, base, warm, steps) == pytest.approx(base)
    assert lr_at(10, base, warm, steps) == pytest.approx(base)  # cosine starts at the peak
    assert lr_at(60, base, warm, steps) == pytest.approx(base / 2)  # half way through the cosine
    assert lr_at(109, base, warm, steps) < base * 1e-3
    lrs = [lr_at(s, base, warm, steps) for s in range(warm, steps)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_no_weight_decay_on_biases_norms_embeddings_and_logit_scale():
    from unparrot.models import load_clip

    model = load_clip("unparrot-vit-tiny").model
    groups = param_groups(model, 0.1)
    no_decay = {id(p) for p in groups[0]["params"]}
    names = {n: id(p) in no_decay for n, p in model.named_parameters()}
    assert groups[0]["weight_decay"] == 0.0 and groups[1]["weight_decay"] == 0.1
    assert names["logit_scale"] and names["token_embedding.weight"]
    assert all(v for n, v in names.items() if n.endswith(".bias") or ".ln_" in n)
    assert not names["visual.conv1.weight"]
    decayed = [n for n, v in names.items() if not v]
    assert decayed and all(model.get_parameter(n).ndim >= 2 for n in decayed)


def test_accumulation_gives_the_full_batch_gradient():
    from open_clip.loss import ClipLoss

    from unparrot.models import load_clip

    torch.manual_seed(0)
    model = load_clip("unparrot-vit-tiny").model.eval()  # no batch statistics: the gradient must match
    images = torch.randn(8, 3, 64, 64)
    texts = torch.randint(1, 400, (8, 32))
    loss_fn = ClipLoss()

    model.zero_grad()
    fi, ft, scale = model(images, texts)[:3]
    full = loss_fn(fi, ft, scale)
    full.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    got_loss = accumulated(model, model, loss_fn, images, texts, 2, None)
    assert got_loss == pytest.approx(float(full.detach()), rel=1e-5)
    # float32 sums in a different order per micro-batch (and per machine and thread count): the tolerance scales
    # with each tensor's largest gradient, so it holds anywhere, while a gradient counted once per micro-batch (the
    # bug this guards: off by the number of micro-batches) is off by 50-100% of its size.
    for n, p in model.named_parameters():
        if n in want:
            err = float((p.grad.double() - want[n].double()).abs().max())
            size = float(want[n].double().abs().max())
            assert err <= 1e-4 * size + 1e-12, f"{n}: max error {err:.3g} against largest gradient {size:.3g}"
    assert want["logit_scale"].abs().item() > 0


def test_random_resized_crop_stays_inside_and_in_range():
    rng = np.random.default_rng(0)
    areas = []
    for _ in range(500):
        w = int(rng.integers(20, 400))
        h = max(8, int(w * rng.uniform(0.8, 1.25)))  # within the ratio range, so the crop is random, not the fallback
        top, left, ch, cw = crop_params(rng, w, h, (0.5, 1.0))
        assert 0 <= top and 0 <= left and top + ch <= h and left + cw <= w and ch > 0 and cw > 0
        areas.append(ch * cw / (w * h))
    assert min(areas) >= 0.4 and max(areas) <= 1.0 and 0.6 < np.mean(areas) < 0.9
    top, left, ch, cw = crop_params(rng, 400, 20, (0.5, 1.0))  # extreme shape: the central fallback crop
    assert (ch, top) == (20, 0) and cw <= 27


def _sample_with_text(tmp_path):
    from PIL import Image

    from unparrot.imaging.decode import encode_image

    a = np.zeros((64, 64, 3), np.uint8)
    a[:, :] = (0, 0, 200)
    a[10:30, 10:50] = np.where(np.indices((20, 40)).sum(0)[..., None] % 2 == 0, 255, 0)  # "text": a pattern
    meta = {"uid": "u", "boxes": [[[10, 10], [50, 10], [50, 30], [10, 30]]]}
    return RawSample(
        "k", {"png": encode_image(Image.fromarray(a), "png"), "txt": b"a sign", "json": json.dumps(meta).encode()}
    )


def test_text_mask_augmentation_masks_the_boxes_with_the_given_probability(tmp_path):
    raw = _sample_with_text(tmp_path)
    always = SampleMaker(64, None, rrc_scale=None, mask_text_prob=1.0)
    never = SampleMaker(64, None, rrc_scale=None, mask_text_prob=0.0)
    im_masked, cap = always(raw, (0, 0))
    im_plain, _ = never(raw, (0, 0))
    assert cap == "a sign"
    box_m, box_p = im_masked[12:28, 12:48].astype(int), im_plain[12:28, 12:48].astype(int)
    assert box_p.std() > 50  # the pattern is there without masking
    assert box_m.reshape(-1, 3).std(0).max() < 3  # one fill colour where the text was
    assert np.abs(im_masked[40:, :].astype(int) - im_plain[40:, :].astype(int)).max() <= 2  # rest unchanged
    half = SampleMaker(64, None, rrc_scale=None, mask_text_prob=0.5)
    masked = sum(half(raw, (i, 0))[0][12:28, 12:48].reshape(-1, 3).std(0).max() < 3 for i in range(200))
    assert abs(masked / 200 - 0.5) < 0.12
    assert not math.isnan(float(masked))


def _batches(shards, order, workers, steps=8, start=0, rank=0, world=1):
    import torch.utils.data as tud

    from unparrot.train.data import TrainStream

    def tok(texts):  # a test double that keeps the caption's first bytes, so batches can be compared
        return torch.tensor([list(t.encode()[:12].ljust(12, b" ")) for t in texts])

    maker = SampleMaker(32, tok, seed=0, rrc_scale=None)
    ds = TrainStream(
        shards, maker, 8, steps, start_step=start, rank=rank, world=world, seed=0, shuffle_buffer=50, order=order
    )
    dl = tud.DataLoader(ds, batch_size=None, num_workers=workers)
    return {int(s): (x.numpy(), t.numpy()) for s, x, t in dl}


@pytest.mark.parametrize("order", ["global", "sharded"])
def test_loader_workers_split_the_steps_exactly_and_resume(synth_pool, order):
    from unparrot.train.data import resolve_shards

    shards = resolve_shards(str(synth_pool / "shards"))
    two = _batches(shards, order, 2)
    assert sorted(two) == list(range(8))  # every step once, split over the two workers
    assert all(x.shape == (8, 3, 32, 32) and t.shape == (8, 12) for x, t in two.values())
    again = _batches(shards, order, 2)
    assert all(np.array_equal(two[s][1], again[s][1]) for s in two)  # deterministic
    tail = _batches(shards, order, 2, start=3)
    assert sorted(tail) == list(range(3, 8))
    assert all(np.array_equal(tail[s][0], two[s][0]) and np.array_equal(tail[s][1], two[s][1]) for s in tail)
    if order == "global":  # one global order: the number of workers does not change the data
        one = _batches(shards, order, 0)
        assert all(np.array_equal(one[s][1], two[s][1]) for s in one)
        # two ranks of a global batch of 8 see disjoint halves of the single-process batch
        r0, r1 = (_batches(shards, order, 0, rank=r, world=2) for r in (0, 1))
        assert all(np.array_equal(np.concatenate([r0[s][1], r1[s][1]]), one[s][1]) for s in one)
    else:  # each worker reads its own stream: the workers' batches differ from each other
        assert not np.array_equal(two[0][1], two[1][1])
