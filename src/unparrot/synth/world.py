"""The synthetic parrot world: a small "web" of shape images and captions, some with embedded text that
their captions parrot, with the ground truth recorded; plus labelled evaluation sets.

Every choice is a parameter of `WorldConfig`; presets name useful combinations:
- `laion`: LAION-like statistics for profiling (about half the images carry text, several words of mixed
  size and rotation, about 30% of caption words spelled in the image), 256 px.
- `learnable`: easy enough for a tiny CPU-trained CLIP to learn both the shapes and the reading
  (64 px, large shapes, big short words, a quarter pure-parrot samples; see docs/synth.md for why).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..imaging import typography
from . import render
from .render import COLORS, SHAPES

TRAIN_BACKGROUNDS = ("plain", "stripes", "checker", "dots", "gradient")
SHIFT_BACKGROUNDS = ("noise", "waves", "bricks")  # in no training pool unless `backgrounds` lists them
FONTS = ("DejaVuSans-Bold.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSans.ttf", "DejaVuSansMono-Bold.ttf")

OBJECT_TEMPLATES = (
    "a {color} {cls}",
    "a photo of a {color} {cls}",
    "{color} {cls} on a {bg} background",
    "a {size} {color} {cls}",
    "a {tex} {color} {cls}",
    "{cls}",
    "the {cls} icon",
    "a {cls} drawn in {color}",
    "{color} {cls} clip art",
    "a simple {cls} shape",
    "a {cls} on a {bg} background",
    "{size} {cls}",
)
PARROT_TEMPLATES = (  # object images whose caption spells the written text
    "{text}",
    "{text} {cls}",
    "a {color} {cls} with the word {text}",
    "{text} - {color} {cls}",
    "{cls} sign that says {text}",
    "{text} {color} {cls} logo",
    "{text}",
    "{text} sticker",
)
PURE_TEMPLATES = ("{text}", "{text}", "{text}", "{text} logo", "{text} sign", "the word {text}")
CAPTION_MODES = ("full", "classname")  # classname: a stand-in for label supervision (Fang et al.)
# Parameters added after pools were made: left out of the config digest while at their defaults, so a pool
# made before they existed keeps its uids and resumes.
LATE_DEFAULTS = {"backgrounds": TRAIN_BACKGROUNDS, "p_outline": 0.0, "caption_mode": "full"}
ZEROSHOT_TEMPLATES = ("a {c}", "a photo of a {c}", "{c}", "a {c} shape", "the {c} icon", "{c} clip art")


@lru_cache(maxsize=1)
def vocabulary() -> tuple[str, ...]:
    text = (Path(__file__).parent / "words.txt").read_text()
    return tuple(w for line in text.splitlines() if not line.startswith("#") for w in line.split())


@dataclass
class WorldConfig:
    """Parameters of the world. Fractions are of the whole pool unless said otherwise."""

    image_size: int = 256
    classes: tuple[str, ...] = SHAPES
    # objects
    object_scale: tuple[float, float] = (0.18, 0.40)  # shape half-extent / image side
    rotation: float = 30.0  # max |angle| of shapes, degrees
    plain_background: float = 0.4  # share of plain backgrounds
    pattern_contrast: tuple[float, float] = (0.1, 0.5)
    textured_objects: float = 0.2  # share of striped / dotted fills
    backgrounds: tuple[str, ...] = TRAIN_BACKGROUNDS  # pattern kinds of the pool and in-distribution sets
    p_outline: float = 0.0  # object images drawn as outline sketches (a second style, as in shift-sketch)
    caption_mode: str = "full"  # full (templates), or classname: object captions are the class name only
    # text
    p_text: float = 0.4  # object images that also carry text
    p_pure_parrot: float = 0.1  # images with only text on a background, captioned by that text
    p_caption_parrots: float = 0.9  # of text-bearing object images, captions that spell the text
    p_class_word: float = 0.2  # written words that are class names (the typographic-attack lever)
    words_per_image: tuple[int, int] = (1, 3)
    vocab_size: int = 0  # 0 = the whole word list; else its first N words (plus class names)
    max_word_len: int = 8
    font_scale: tuple[float, float] = (0.06, 0.30)  # font size / image side, before fitting
    max_text_width: float = 0.92  # text is shrunk to fit this share of the width
    text_rotation: float = 15.0
    p_sign: float = 0.3  # text on a plate (sign, label)
    fonts: tuple[str, ...] = FONTS[:2]
    # encoding
    image_format: str = "jpg"
    jpeg_quality: int = 90
    eval_format: str = "png"

    def validate(self) -> "WorldConfig":
        def frac(name):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"synth: {name} must be in [0, 1], got {v}")

        for n in (
            "plain_background",
            "textured_objects",
            "p_text",
            "p_pure_parrot",
            "p_caption_parrots",
            "p_class_word",
            "p_sign",
            "max_text_width",
            "p_outline",
        ):
            frac(n)
        unknown_bg = [b for b in self.backgrounds if b not in TRAIN_BACKGROUNDS + SHIFT_BACKGROUNDS]
        if not self.backgrounds or unknown_bg:
            raise ValueError(
                f"synth: backgrounds must be a non-empty list of {', '.join(TRAIN_BACKGROUNDS + SHIFT_BACKGROUNDS)}"
            )
        if self.caption_mode not in CAPTION_MODES:
            raise ValueError(f"synth: caption_mode is one of {', '.join(CAPTION_MODES)}, not {self.caption_mode!r}")
        if self.p_text + self.p_pure_parrot > 1:
            raise ValueError("synth: p_text + p_pure_parrot must be <= 1")
        if self.image_size < 16 or self.image_size > 2048:
            raise ValueError(f"synth: image_size must be in [16, 2048], got {self.image_size}")
        for n in ("object_scale", "pattern_contrast", "font_scale", "words_per_image"):
            lo, hi = getattr(self, n)
            if lo > hi or lo < 0:
                raise ValueError(f"synth: {n} must be (low, high) with 0 <= low <= high, got {(lo, hi)}")
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ValueError("synth: need at least 2 distinct classes")
        unknown = [c for c in self.classes if c not in SHAPES]
        if unknown:
            raise ValueError(f"synth: unknown classes {unknown}; available: {', '.join(SHAPES)}")
        for f in self.fonts:
            typography.get_font(f, 12)
        if self.image_format not in ("jpg", "png", "webp") or self.eval_format not in ("jpg", "png", "webp"):
            raise ValueError("synth: image formats are jpg, png or webp")
        return self

    def words(self) -> tuple[str, ...]:
        """Non-class words that may be written on images."""
        ws = [w for w in vocabulary() if len(w) <= self.max_word_len and w not in self.classes]
        return tuple(ws[: self.vocab_size] if self.vocab_size else ws)


PRESETS: dict[str, dict] = {
    "laion": {},
    "learnable": dict(
        image_size=64,
        object_scale=(0.24, 0.40),
        rotation=20.0,
        plain_background=0.4,
        pattern_contrast=(0.08, 0.25),
        textured_objects=0.0,
        p_text=0.25,
        p_pure_parrot=0.25,
        p_caption_parrots=0.9,
        p_class_word=0.5,
        words_per_image=(1, 1),
        vocab_size=120,
        max_word_len=5,
        font_scale=(0.35, 0.60),
        text_rotation=0.0,
        p_sign=0.2,
    ),
}


def make_config(preset: str = "laion", **overrides) -> WorldConfig:
    if preset not in PRESETS:
        raise KeyError(f"unknown synth preset {preset!r}; known: {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(WorldConfig)}
    bad = set(overrides) - fields
    if bad:
        raise TypeError(f"unknown synth parameters {sorted(bad)}; known: {', '.join(sorted(fields))}")
    kw = {**PRESETS[preset], **overrides}
    for k, v in kw.items():  # YAML/CLI give lists where the dataclass wants tuples
        if isinstance(v, list):
            kw[k] = tuple(v)
    return WorldConfig(**kw).validate()


# ---- one sample ----------------------------------------------------------------------------------
@dataclass
class Scene:
    """What a sample shows; rendering it is deterministic, so evaluation variants share one scene."""

    kind: str  # "object", "text" (object + text) or "parrot" (text only)
    label: int = -1
    color: str = ""
    bg_kind: str = "plain"
    bg_color: str = ""
    bg_other: tuple = (0, 0, 0)
    bg_base: tuple = (0, 0, 0)
    cx: float = 0.0
    cy: float = 0.0
    radius: float = 0.0
    angle: float = 0.0
    texture: str = "solid"
    outline: bool = False  # drawn as an outline sketch (p_outline)
    texts: list = field(default_factory=list)  # dicts: text, font, size, x, y, angle, color, plate
    seed: int = 0


def _mix(c, target, t):
    return tuple(int(round(a * (1 - t) + b * t)) for a, b in zip(c, target))


def sample_scene(
    cfg: WorldConfig,
    rng: np.random.Generator,
    kind: str,
    label: int = -1,
    backgrounds: tuple[str, ...] = TRAIN_BACKGROUNDS,
) -> Scene:
    S = cfg.image_size
    bg_color = str(rng.choice(list(COLORS)))
    base = COLORS[bg_color]
    if rng.random() < cfg.plain_background:
        bg_kind = "plain"
    else:
        bg_kind = str(rng.choice([b for b in backgrounds if b != "plain"] or ["plain"]))
    t = rng.uniform(*cfg.pattern_contrast)
    other = _mix(base, (255, 255, 255) if render.luminance(base) < 128 else (0, 0, 0), t)
    sc = Scene(
        kind=kind,
        label=label,
        bg_kind=bg_kind,
        bg_color=bg_color,
        bg_base=base,
        bg_other=other,
        seed=int(rng.integers(2**31)),
    )
    if kind != "parrot":
        choices = [c for c in COLORS if _color_dist(COLORS[c], base) > 120]
        sc.color = str(rng.choice(choices))
        sc.radius = rng.uniform(*cfg.object_scale) * S
        m = sc.radius * 1.02
        sc.cx, sc.cy = rng.uniform(m, S - m), rng.uniform(m, S - m)
        sc.angle = rng.uniform(-cfg.rotation, cfg.rotation)
        sc.texture = str(rng.choice(["striped", "dotted"])) if rng.random() < cfg.textured_objects else "solid"
    return sc


def _color_dist(a, b):
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))


def place_text(
    cfg: WorldConfig,
    sc: Scene,
    rng: np.random.Generator,
    word: str,
    avoid: list | None = None,
    size_frac: float | None = None,
    at: tuple[float, float] | None = None,
    color: tuple | None = None,
    angle: float | None = None,
    plate: bool | None = None,
) -> dict:
    """Choose font, size, position, colour and rotation for `word` so it fits in the image."""
    S = cfg.image_size
    font = str(rng.choice(cfg.fonts))
    frac = size_frac if size_frac is not None else rng.uniform(*cfg.font_scale)
    ang = (
        angle
        if angle is not None
        else (rng.uniform(-cfg.text_rotation, cfg.text_rotation) if cfg.text_rotation else 0.0)
    )
    size = typography.fit_font_size(word, font, max(6, int(frac * S)), cfg.max_text_width * S, 0.9 * S)
    while size > 6:
        w, h = typography.rotated_extent(word, font, size, ang)
        if w < S - 4 and h < S - 4:
            break
        size = int(size * 0.9)
    w, h = typography.rotated_extent(word, font, size, ang)
    if at is not None:
        x, y = at
    else:
        x, y = rng.uniform(1, max(1.5, S - w - 1)), rng.uniform(1, max(1.5, S - h - 1))
    use_plate = plate if plate is not None else bool(rng.random() < cfg.p_sign)
    plate_rgb = None
    if use_plate:
        plate_rgb = COLORS[str(rng.choice(["white", "yellow", "black"]))]
        under = plate_rgb
    else:
        under = sc.bg_base
    if color is None:
        ok = [c for c in COLORS if abs(render.luminance(COLORS[c]) - render.luminance(under)) > 90]
        color = COLORS[str(rng.choice(ok))]
    return {
        "text": word,
        "font": font,
        "size": int(size),
        "x": float(x),
        "y": float(y),
        "angle": float(ang),
        "color": tuple(color),
        "plate": plate_rgb,
    }


def _text_box(spec: dict) -> tuple[float, float, float, float]:
    w, h = typography.rotated_extent(spec["text"], spec["font"], spec["size"], spec["angle"])
    return spec["x"], spec["y"], spec["x"] + w, spec["y"] + h


def _overlap(a: dict, cfg: WorldConfig, b: dict) -> bool:
    ax0, ay0, ax1, ay1 = _text_box(a)
    bx0, by0, bx1, by1 = _text_box(b)
    m = 0.02 * cfg.image_size
    return ax0 < bx1 + m and bx0 < ax1 + m and ay0 < by1 + m and by0 < ay1 + m


def render_scene(cfg: WorldConfig, sc: Scene, outline: bool = False, invert: bool = False) -> tuple[Image.Image, list]:
    """Draw a scene; returns the image and the text ground truth (text, quad, height px, angle, font)."""
    S = cfg.image_size
    outline = outline or sc.outline
    rng = np.random.default_rng(sc.seed)
    if outline:
        img = Image.new("RGB", (S, S), (250, 250, 250))
    else:
        img = render.background(S, sc.bg_kind, sc.bg_base, sc.bg_other, rng)
    if sc.kind != "parrot":
        cls = cfg.classes[sc.label]
        if outline:
            mask = render.shape_mask(cls, S, sc.cx, sc.cy, sc.radius, sc.angle, outline=max(1, S // 40))
            img = render.paint(img, mask, (20, 20, 20))
        else:
            mask = render.shape_mask(cls, S, sc.cx, sc.cy, sc.radius, sc.angle)
            img = render.paint(img, mask, COLORS[sc.color], sc.texture, rng)
    truth = []
    for t in sc.texts:
        quad = typography.draw_text(
            img, t["text"], t["font"], t["size"], t["x"], t["y"], t["color"], t["angle"], t["plate"]
        )
        truth.append(
            {"text": t["text"], "quad": quad, "height": _quad_height(quad), "angle": t["angle"], "font": t["font"]}
        )
    if invert:
        img = ImageOps.invert(img)
    return img, truth


def _quad_height(q) -> float:
    return round((math.dist(q[0], q[3]) + math.dist(q[1], q[2])) / 2, 2)


def _pick_word(cfg: WorldConfig, rng, words) -> str:
    if rng.random() < cfg.p_class_word:
        return str(rng.choice(cfg.classes))
    return str(rng.choice(words))


def make_pool_sample(cfg: WorldConfig, rng: np.random.Generator) -> tuple[Image.Image, str, dict]:
    """One training pair: image, caption and the ground truth recorded in its .json."""
    words = cfg.words()
    u = rng.random()
    if u < cfg.p_pure_parrot:
        kind = "parrot"
    elif u < cfg.p_pure_parrot + cfg.p_text:
        kind = "text"
    else:
        kind = "object"
    label = -1 if kind == "parrot" else int(rng.integers(len(cfg.classes)))
    sc = sample_scene(cfg, rng, kind, label, backgrounds=cfg.backgrounds)
    if cfg.p_outline and kind != "parrot":  # no draw at 0: the default world's samples stay as they were
        sc.outline = bool(rng.random() < cfg.p_outline)
    if kind != "object":
        n = int(rng.integers(cfg.words_per_image[0], cfg.words_per_image[1] + 1))
        for _ in range(max(1, n)):
            word = _pick_word(cfg, rng, words)
            for _attempt in range(8):  # written words never overlap: the ground truth stays readable
                spec = place_text(cfg, sc, rng, word)
                if not any(_overlap(spec, cfg, t) for t in sc.texts):
                    sc.texts.append(spec)
                    break
        if not sc.texts:
            sc.texts = [spec]
    img, truth = render_scene(cfg, sc)
    written = [t["text"] for t in truth]
    attrs = {
        "cls": cfg.classes[label] if label >= 0 else "",
        "color": sc.color,
        "bg": sc.bg_color,
        "size": "big" if sc.radius > 0.3 * cfg.image_size else "small",
        "tex": {"solid": "plain", "striped": "striped", "dotted": "dotted"}[sc.texture],
    }
    parroted: list[str] = []
    if kind == "parrot":
        k = int(rng.integers(1, len(written) + 1))
        parroted = written[:k]
        caption = str(rng.choice(PURE_TEMPLATES)).format(text=" ".join(parroted))
    elif kind == "text" and rng.random() < cfg.p_caption_parrots:
        k = int(rng.integers(1, len(written) + 1))
        parroted = written[:k]
        caption = str(rng.choice(PARROT_TEMPLATES)).format(text=" ".join(parroted), **attrs)
    else:
        caption = str(rng.choice(OBJECT_TEMPLATES)).format(**attrs)
    if cfg.caption_mode == "classname" and kind != "parrot":
        caption, parroted = attrs["cls"], []  # the label only: no description, no spelled text
    gt = {
        "kind": kind,
        "label": label,
        "class": attrs["cls"] or None,
        "color": sc.color or None,
        "background": sc.bg_kind,
        "style": "outline" if sc.outline else "filled",
        "texts": truth,
        "parroted": parroted,
    }
    return img, caption, gt


# ---- evaluation variants -------------------------------------------------------------------------
EVAL_SETS = ("clean", "attack", "attack-control", "shift-background", "shift-sketch", "shift-invert")


def attack_word_spec(cfg: WorldConfig, sc: Scene, word: str, rng, size_frac: float = 0.3) -> dict:
    """The ImageNet-Attr style attack: `word` in red, fixed place near the top-left, size ~ the image."""
    S = cfg.image_size
    return place_text(
        cfg, sc, rng, word, size_frac=size_frac, at=(0.04 * S, 0.04 * S), color=(220, 20, 20), angle=0.0, plate=False
    )


def make_eval_sample(
    cfg: WorldConfig, rng: np.random.Generator, label: int, variant: str, attack_size: float = 0.3
) -> tuple[Image.Image, dict]:
    """An evaluation image of class `label`; every variant of one rng state shows the same scene."""
    words = cfg.words()
    bgs = SHIFT_BACKGROUNDS if variant == "shift-background" else cfg.backgrounds
    sc = sample_scene(cfg, rng, "object", label, backgrounds=bgs)
    if variant == "shift-background" and sc.bg_kind == "plain":
        sc.bg_kind = str(rng.choice(SHIFT_BACKGROUNDS))
    wrong = int((label + 1 + rng.integers(len(cfg.classes) - 1)) % len(cfg.classes))
    control = str(rng.choice(words))
    info = {"label": label, "class": cfg.classes[label]}
    if variant == "attack":
        sc.texts = [attack_word_spec(cfg, sc, cfg.classes[wrong], rng, attack_size)]
        info["attack_label"], info["attack_text"] = wrong, cfg.classes[wrong]
    elif variant == "attack-control":
        sc.texts = [attack_word_spec(cfg, sc, control, rng, attack_size)]
        info["attack_text"] = control
    img, truth = render_scene(cfg, sc, outline=variant == "shift-sketch", invert=variant == "shift-invert")
    info["texts"] = truth
    return img, info


def sample_uid(namespace: str, index: int) -> str:
    return hashlib.sha256(f"{namespace}:{index}".encode()).hexdigest()[:32]


def config_digest(cfg: WorldConfig, seed: int) -> str:
    d = dataclasses.asdict(cfg)
    for k, v in LATE_DEFAULTS.items():
        same = tuple(d[k]) == v if isinstance(v, tuple) else d[k] == v
        if same:
            del d[k]
    blob = json.dumps({"cfg": d, "seed": seed}, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
