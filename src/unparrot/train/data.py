"""The training data pipeline: resampled shard streams, a shuffle buffer, decode, augment, tokenize.

Shards are drawn with replacement (DataComp's resampling), so every subset is trained for the same number
of samples seen whatever its size. Two data orders:

- `global` (default): one stream defines the order of every sample of the run; global step b takes
  samples [b*B, (b+1)*B) and each process/loader worker decodes only its own slice of the steps it owns.
  The batches are therefore identical for any number of processes or loader workers (a 2-process DDP run
  sees exactly the data of a 1-process run with the same global batch), and resuming at step s is exact.
  Every consumer reads (not decodes) the whole stream: right for CPU-scale runs.
- `sharded`: each (process, worker) owns an independent stream, like open_clip's trainer: no redundant
  reading, for large runs; the batches then depend on the process layout.

Per-sample randomness (crop, caption choice, text masking) comes from a generator seeded by the sample's
position in its stream, so skipping (resume) and re-running give identical samples.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.utils.data as tud

from ..imaging.decode import DecodeError, open_image
from ..io.samples import parse_sample
from ..io.tar import RawSample, iter_samples

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def resolve_shards(spec: str | Sequence[str]) -> list[str]:
    """Tar paths from a pool/reshard folder, a folder of tars, a glob or a brace pattern (or a list)."""
    from ..curate.reshard import unfinished
    from ..pool import Pool, list_source

    specs = [spec] if isinstance(spec, str) else list(spec)
    out = []
    for s in specs:
        if os.path.isdir(s) and unfinished(s):
            raise RuntimeError(f"{s}: its reshard did not finish (no completion record); rerun the reshard command")
        if os.path.isdir(s) and (
            os.path.isdir(os.path.join(s, "shards")) or os.path.exists(os.path.join(s, "pool.yaml"))
        ):
            out.extend(sh.path for sh in Pool(s).shards())
        else:
            out.extend(p for p, _ in list_source(s))
    if not out:
        raise FileNotFoundError(f"no training shards found in {spec}")
    return out


def raw_stream(shards: Sequence[str], seed: int, lane: int, shuffle_buffer: int) -> Iterator[RawSample]:
    """An endless stream of raw samples: shards drawn with replacement, mixed through a shuffle buffer."""
    rng = np.random.default_rng([seed, 7, lane])
    buf: list[RawSample] = []
    empty_draws = 0
    while True:
        got = 0
        for item in iter_samples(shards[int(rng.integers(len(shards)))]):
            if not isinstance(item, RawSample) or item.problem or not _trainable(item):
                continue
            got += 1
            if shuffle_buffer <= 1:
                yield item
                continue
            if len(buf) < shuffle_buffer:
                buf.append(item)
                continue
            j = int(rng.integers(len(buf)))
            buf[j], item = item, buf[j]
            yield item
        empty_draws = 0 if got else empty_draws + 1
        if empty_draws > 10 * len(shards) + 10:
            raise RuntimeError(f"no readable samples in the training shards ({len(shards)} shards)")


def _trainable(raw: RawSample) -> bool:
    """A cheap check every consumer makes identically: an image member and a caption are present."""
    m = raw.members
    return any(e in m for e in ("jpg", "jpeg", "png", "webp")) and ("txt" in m or "json" in m)


def crop_params(rng: np.random.Generator, w: int, h: int, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop parameters, drawn from `rng` (reproducible per sample)."""
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ar = math.exp(rng.uniform(*log_ratio))
        cw, ch = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


@dataclass
class SampleMaker:
    """Turns a raw sample into (image tensor, token ids) with the training augmentations."""

    image_size: int
    tokenizer: object
    seed: int = 0
    rrc_scale: tuple | None = (0.5, 1.0)  # None: resize + centre crop (no augmentation)
    use_rewrites: bool = False
    original_weight: float = 1.0  # relative weight of the original caption among the rewrites
    rewrite_weights: tuple = ()  # weights of rewrite 1, 2, ... (missing: 1.0)
    mask_text_prob: float = 0.0
    caption_key: str = "txt"

    def caption(self, row: dict, rng: np.random.Generator) -> str:
        """LaCLIP: pick among the original and its rewrites; a pick of fewer than 2 words -> the original."""
        cap = row["caption"] or ""
        rewrites = (row["meta"] or {}).get("rewrites") if self.use_rewrites else None
        if not rewrites:
            return cap
        options = [cap] + [r for r in rewrites if isinstance(r, str)]
        rw = self.rewrite_weights
        w = np.array([self.original_weight] + [rw[i] if i < len(rw) else 1.0 for i in range(len(options) - 1)], float)
        if w.sum() <= 0:
            return cap
        pick = options[int(rng.choice(len(options), p=w / w.sum()))]
        return pick if len(pick.split()) >= 2 else cap

    def __call__(self, raw: RawSample, position: tuple) -> tuple | None:
        """(HxWx3 uint8 image after augmentation, caption) or None when the sample cannot be used."""
        from PIL import Image
        from torchvision.transforms import functional as F

        row = parse_sample(raw, "")
        if row["image"] is None or row["caption"] is None:
            return None
        rng = np.random.default_rng([self.seed, 11, *position])
        try:
            im = open_image(row["image"])
        except DecodeError:
            return None
        if self.mask_text_prob > 0 and rng.random() < self.mask_text_prob:
            boxes = (row["meta"] or {}).get("boxes")
            if boxes:
                from ..imaging.mask import Masker

                im = Masker().mask_pil(im, boxes)
        if self.rrc_scale:
            top, left, ch, cw = crop_params(rng, im.width, im.height, tuple(self.rrc_scale))
            im = im.crop((left, top, left + cw, top + ch)).resize((self.image_size, self.image_size), Image.BICUBIC)
        else:
            im = F.center_crop(
                F.resize(im, self.image_size, interpolation=F.InterpolationMode.BICUBIC), self.image_size
            )
        return np.asarray(im, dtype=np.uint8), self.caption(row, rng)

    def collate(self, items: list) -> tuple:
        """uint8 images and texts of a batch -> normalised float tensor and token ids, batched (cheap)."""
        x = np.stack([it[0] for it in items]).transpose(0, 3, 1, 2).astype(np.float32)
        x *= _SCALE[None, :, None, None]
        x += _SHIFT[None, :, None, None]
        tok = self.tokenizer([it[1] for it in items])
        return torch.from_numpy(x), tok if isinstance(tok, torch.Tensor) else torch.as_tensor(tok)


_SCALE = (1.0 / (255.0 * np.array(STD))).astype(np.float32)  # (x / 255 - mean) / std as one multiply-add
_SHIFT = (-np.array(MEAN) / np.array(STD)).astype(np.float32)


class TrainStream(tud.IterableDataset):
    """An IterableDataset of per-process batches for steps [start_step, steps). See the module docstring."""

    def __init__(
        self,
        shards,
        maker: SampleMaker,
        global_batch: int,
        steps: int,
        start_step: int = 0,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        order: str = "global",
    ):
        if global_batch % world:
            raise ValueError(f"the global batch ({global_batch}) must divide by the number of processes ({world})")
        if order not in ("global", "sharded"):
            raise ValueError("data order is 'global' or 'sharded'")
        self.shards, self.maker = list(shards), maker
        self.B, self.steps, self.start = global_batch, steps, start_step
        self.rank, self.world, self.seed, self.buffer, self.order = rank, world, seed, shuffle_buffer, order
        self.skipped = 0

    def _worker(self):
        info = tud.get_worker_info()
        return (info.id, info.num_workers) if info else (0, 1)

    def __iter__(self):
        k, K = self._worker()
        local = self.B // self.world
        lo = self.rank * local
        owned = [s for s in range(0, self.steps) if s % K == k]
        lane = self.rank * K + k
        if self.order == "global":  # one stream for the run; position = global sample index
            stream = raw_stream(self.shards, self.seed, 0, self.buffer)
        else:  # one stream per (process, worker); position = index within that stream
            stream = raw_stream(self.shards, self.seed, 1000 + lane, self.buffer)

        def base(s: int) -> int:
            return s * self.B + lo if self.order == "global" else (s // K) * local

        pos = 0
        for s in owned:
            if s < self.start:
                continue
            first = base(s)
            while pos < first:  # read, never decode, what is not ours (other ranks, or before a resume)
                next(stream)
                pos += 1
            items = []
            for j in range(local):
                items.append(self.maker(next(stream), (0 if self.order == "global" else lane + 1, first + j)))
                pos += 1
            good = [it for it in items if it is not None]
            if not good:
                raise RuntimeError(f"step {s}: no sample of the batch could be decoded")
            self.skipped += len(items) - len(good)
            # an undecodable sample is replaced by a valid one of the same batch: positions (and so every
            # other batch and the resume point) stay where they are for every consumer
            items = [it if it is not None else good[j % len(good)] for j, it in enumerate(items)]
            yield (s, *self.maker.collate(items))
