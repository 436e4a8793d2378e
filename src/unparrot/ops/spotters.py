"""Text spotters behind one interface. A spotter is a class with

    needs_image: bool                      # False: it reads `meta` only (the oracle)
    def spot(self, images, metas) -> list[list[Instance]]

`images` are HxWx3 uint8 RGB arrays (None when `needs_image` is False), `metas` the samples' .json
dicts. An `Instance` is (quad, text, score): quad = 4 [x, y] points in image pixels, clockwise from the
text's top-left. An exception for one image is that image's error row; a spotter should raise rather
than guess.

Adapters for heavier spotters (DeepSolo, FAST, PaddleOCR server models, ...) implement the same class and
are selected with `backend="package.module:Class"`; parameters after `backend` are passed to it.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

Instance = tuple  # (quad: list[list[float]], text: str, score: float)

SPOTTERS: dict[str, str] = {
    "rapidocr": "unparrot.ops.spotters:RapidOCRSpotter",
    "oracle": "unparrot.ops.spotters:OracleSpotter",
}


def get_spotter(name: str, **params):
    import importlib

    target = SPOTTERS.get(name, name)
    if ":" not in target:
        raise KeyError(f"unknown OCR backend {name!r}; known: {', '.join(SPOTTERS)} (or 'module:Class')")
    mod, _, cls = target.partition(":")
    return getattr(importlib.import_module(mod), cls)(**params)


class OracleSpotter:
    """The synthetic world's ground truth (each sample's .json `synth.texts`): exact, for tests and for
    measuring real spotters. Samples without ground truth are errors, never silently 'no text'."""

    needs_image = False

    def spot(self, images, metas) -> list[list[Instance]]:
        out = []
        for meta in metas:
            truth = (meta or {}).get("synth")
            if truth is None:
                raise ValueError("oracle OCR needs synthetic ground truth (.json 'synth'); use backend=rapidocr")
            out.append([(t["quad"], t["text"], 1.0) for t in truth["texts"]])
        return out


class RapidOCRSpotter:
    """PP-OCR (detection + recognition ONNX models bundled in the rapidocr wheel) on the CPU.

    The detector runs on every image; recognition only on the boxes it found, with the crops of a whole
    batch recognised together. Images are detected at their own size, downscaled when the long side is
    over `det_max_side` and upscaled when it is under `det_min_side` (rapidocr's default upscales every
    image to a 736 px short side, which is 5-25x slower on web-sized images; see docs/profile.md for the
    measured speed/recall trade-off).
    """

    needs_image = True

    def __init__(
        self,
        det_max_side: int = 960,
        det_min_side: int = 0,
        box_thresh: float = 0.5,
        unclip_ratio: float = 1.6,
        use_cls: bool = False,
        threads: int | None = None,
    ):
        try:
            from rapidocr import RapidOCR
        except ImportError as e:  # pragma: no cover - depends on the install
            raise ImportError(
                "the rapidocr OCR backend needs `pip install unparrot[ocr]` (rapidocr, onnxruntime)"
            ) from e
        if det_max_side < 32 or det_min_side < 0:
            raise ValueError("det_max_side must be >= 32 and det_min_side >= 0")
        threads = threads or int(os.environ.get("OMP_NUM_THREADS", 0)) or -1
        self.det_max_side, self.det_min_side, self.use_cls = int(det_max_side), int(det_min_side), bool(use_cls)
        self.engine = RapidOCR(
            params={
                "Global.log_level": "error",
                "Global.use_cls": self.use_cls,
                "Global.max_side_len": self.det_max_side,
                "Global.min_side_len": 30,
                "Det.limit_type": "max",
                "Det.limit_side_len": self.det_max_side,
                "Det.box_thresh": float(box_thresh),
                "Det.unclip_ratio": float(unclip_ratio),
                "EngineConfig.onnxruntime.intra_op_num_threads": threads,
                "EngineConfig.onnxruntime.inter_op_num_threads": 1,
            }
        )

    def detect(self, image: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Boxes (N x 4 x 2, image pixels) and the perspective-corrected crops to recognise."""
        import cv2
        from rapidocr.utils.process_img import get_rotate_crop_image

        bgr = np.ascontiguousarray(image[:, :, ::-1])
        scale = 1.0
        long_side = max(bgr.shape[:2])
        if self.det_min_side and long_side < self.det_min_side:
            scale = self.det_min_side / long_side
            bgr = cv2.resize(bgr, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
        det = self.engine(bgr, use_det=True, use_cls=False, use_rec=False)
        boxes = getattr(det, "boxes", None)
        if boxes is None or len(boxes) == 0:
            return np.zeros((0, 4, 2), np.float32), []
        boxes = np.asarray(boxes, np.float32)
        crops = [get_rotate_crop_image(bgr, b.copy()) for b in boxes]
        return boxes / scale, crops

    def recognize(self, crops: Sequence[np.ndarray]) -> list[tuple[str, float]]:
        if not crops:
            return []
        from rapidocr.ch_ppocr_rec import TextRecInput

        crops = list(crops)
        if self.use_cls:
            crops = self.engine._load_cls_model()(crops).img_list
        res = self.engine._load_rec_model()(TextRecInput(img=crops))
        return list(zip(res.txts, (float(s) for s in res.scores)))

    def spot(self, images, metas) -> list[list[Instance]]:
        per_image, all_crops = [], []
        for im in images:
            boxes, crops = self.detect(im)
            per_image.append((boxes, len(all_crops), len(crops)))
            all_crops.extend(crops)
        texts = self.recognize(all_crops)  # one batched recognition for the whole batch
        out = []
        for boxes, start, n in per_image:
            out.append([(boxes[i].round(2).tolist(), texts[start + i][0], texts[start + i][1]) for i in range(n)])
        return out
