"""`embed`: CLIP image and text embeddings and the CLIP score of each pair (docs/methods.md §1, §4).

Writes `clip_score` (cosine of the L2-normalised embeddings) and the embeddings `image` and `text`
(float16 .npy beside the columns). With `masked=True` it also writes `masked_clip_score`: the score of
the image with its spotted text boxes filled (T-MARS) against the original caption.

Images are decoded and preprocessed in a helper thread while the model runs on the previous chunk, so
decoding hides behind compute (PIL and torch both release the GIL).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..imaging.decode import MAX_PIXELS, DecodeError, open_image
from ..prefetch import prefetch
from .base import Operator, Outputs, column
from ..flags import option
from ..imaging.mask import DEFAULT_FILL, FILLS, Masker


@dataclass
class EmbedConfig:
    """The embed operator's options (its `__init__` defaults read these; `unparrot embed`'s flags too)."""

    model: str = option("ViT-B-32", "open_clip architecture or an unparrot config")
    pretrained: str | None = option(None, "checkpoint file, or an open_clip tag (needs the hub)")
    masked: bool = option(False, "also score the text-masked image (masked_clip_score; needs spot)")
    spot_stage: str = option("spot", "stage with the text boxes (masked)")
    mask_fill: str = option(DEFAULT_FILL, "mean (T-MARS), inpaint or solid", choices=FILLS)
    chunk: int = option(32, "images per model call")
    device: str = option("cpu", "cpu, cuda or cuda:N")


class Embed(Operator):
    needs = ("image", "caption")
    version = 1

    def __init__(
        self,
        model: str = EmbedConfig.model,
        pretrained: str | None = EmbedConfig.pretrained,
        masked: bool = EmbedConfig.masked,
        spot_stage: str = EmbedConfig.spot_stage,
        mask_fill: str = EmbedConfig.mask_fill,
        chunk: int = EmbedConfig.chunk,
        device: str = EmbedConfig.device,
        max_pixels: int = MAX_PIXELS,
    ):
        from ..models import load_clip

        self.clip = load_clip(model, pretrained, device=device)
        self.device, self.chunk, self.max_pixels = device, int(chunk), int(max_pixels)
        self.masker = Masker(mask_fill) if masked else None
        self.inputs = {spot_stage: ["boxes"]} if masked else {}

    @classmethod
    def inputs_for(cls, params: dict) -> dict[str, list[str]]:
        return {params.get("spot_stage", "spot"): ["boxes"]} if params.get("masked") else {}

    @classmethod
    def outputs(cls, params: dict) -> Outputs:
        import pyarrow as pa

        from ..models import embed_dim

        cols = {"clip_score": pa.float32(), **({"masked_clip_score": pa.float32()} if params.get("masked") else {})}
        d = embed_dim(params.get("model", "ViT-B-32"))
        return Outputs(cols, {"image": d, "text": d})

    def _prepare(self, images, boxes, rows):
        """Decode and transform `rows`; returns (ok rows, image tensor, masked tensor or None, errors)."""
        import torch

        ok, tens, masked, errs = [], [], [], {}
        draft = self.clip.image_size * 2
        for i in rows:
            try:
                im = open_image(images[i], max_pixels=self.max_pixels, draft=None if self.masker else draft)
                t = self.clip.preprocess(im)
                m = self.clip.preprocess(self.masker.mask_pil(im, boxes[i])) if self.masker is not None else None
            except DecodeError as e:
                errs[i] = str(e)
                continue
            except Exception as e:  # noqa: BLE001
                errs[i] = f"{type(e).__name__}: {e}"
                continue
            ok.append(i)
            tens.append(t)
            if m is not None:
                masked.append(m)

        def stack(xs):
            return torch.stack(xs).to(self.device) if xs else None

        return ok, stack(tens), stack(masked) if self.masker else None, errs

    def __call__(self, batch):
        import torch

        from ..models import encode_text

        images, captions = column(batch, "image"), column(batch, "caption")
        boxes = column(batch, "boxes") if self.masker is not None else [None] * len(images)
        n = len(images)
        model = self.clip.model
        img_emb = None
        txt_emb = None
        scores = np.zeros(n, np.float32)
        mscores = np.zeros(n, np.float32) if self.masker is not None else None
        errors: list = [None] * n
        chunks = [list(range(i, min(n, i + self.chunk))) for i in range(0, n, self.chunk)]
        for ok, x, xm, errs in prefetch(lambda rows: self._prepare(images, boxes, rows), chunks):
            for i, e in errs.items():
                errors[i] = e
            if not ok:
                continue
            with torch.inference_mode():
                tok = self.clip.tokenizer([captions[i] for i in ok]).to(self.device)
                fi = torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1)
                ft = torch.nn.functional.normalize(encode_text(model, tok).float(), dim=-1)
                if img_emb is None:
                    img_emb = np.zeros((n, fi.shape[1]), np.float32)
                    txt_emb = np.zeros((n, ft.shape[1]), np.float32)
                img_emb[ok], txt_emb[ok] = fi.cpu().numpy(), ft.cpu().numpy()
                scores[ok] = (fi * ft).sum(-1).cpu().numpy()
                if xm is not None:
                    fm = torch.nn.functional.normalize(model.encode_image(xm).float(), dim=-1)
                    mscores[ok] = (fm * ft).sum(-1).cpu().numpy()
        if img_emb is None:  # every row failed
            d = int(getattr(model, "embed_dim", 0) or model.text_projection.shape[-1])
            img_emb, txt_emb = np.zeros((n, d), np.float32), np.zeros((n, d), np.float32)
        out = {"clip_score": scores, "image": img_emb, "text": txt_emb, "error": errors}
        if mscores is not None:
            out["masked_clip_score"] = mscores
        return out
