"""Building blocks of the self-contained HTML report: inline images, figures, tables, grids."""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass

from PIL import Image, ImageDraw

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1180px;
color:#222;padding:0 1rem}
h1{font-size:1.6rem} h2{font-size:1.25rem;border-bottom:1px solid #ddd;padding-bottom:.3rem;margin-top:2.2rem}
h3{font-size:1.05rem;margin-top:1.4rem} table{border-collapse:collapse;margin:.6rem 0;font-size:.92rem}
td,th{border:1px solid #ddd;padding:.25rem .6rem;text-align:right} th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}
.grid{display:flex;flex-wrap:wrap;gap:8px} .cell{width:176px;font-size:.78rem;line-height:1.2}
.cell img{width:176px;height:auto;display:block;border:1px solid #ccc;image-rendering:auto}
.figs{display:flex;flex-wrap:wrap;gap:12px} .figs img{max-width:560px;height:auto}
.note{color:#666;font-size:.9rem} code{background:#f4f4f4;padding:0 .2rem}
nav a{margin-right:1rem}
"""


@dataclass
class Section:
    id: str
    title: str
    body: str


def esc(s) -> str:
    return html.escape(str(s))


def img_tag(im: Image.Image, alt: str = "", fmt: str = "JPEG") -> str:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format=fmt, quality=85)
    mime = "image/jpeg" if fmt == "JPEG" else "image/png"
    return f'<img alt="{esc(alt)}" src="data:{mime};base64,{base64.b64encode(buf.getvalue()).decode()}">'


def fig_tag(fig, alt: str = "") -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def table(header, rows) -> str:
    h = "".join(f"<th>{esc(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{body}</table>"


def draw_boxes(im: Image.Image, boxes, texts=(), color=(0, 230, 0), size: int = 176) -> Image.Image:
    """Thumbnail with OCR quads and their read text drawn on."""
    scale = size / max(im.size)
    im = im.convert("RGB").resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))))
    d = ImageDraw.Draw(im)
    boxes = [] if boxes is None else list(boxes)
    texts = [] if texts is None else list(texts)
    for i, q in enumerate(boxes):
        pts = [(x * scale, y * scale) for x, y in q]
        d.polygon(pts, outline=color)
        if i < len(texts):
            x, y = min(p[0] for p in pts), max(0, min(p[1] for p in pts) - 11)
            d.rectangle([x, y, x + 6 * len(texts[i]) + 2, y + 10], fill=(0, 0, 0))
            d.text((x + 1, y - 1), texts[i], fill=color)
    return im


def grid(cells) -> str:
    """cells: (PIL image, caption html) pairs."""
    items = "".join(f'<div class="cell">{img_tag(im)}{cap}</div>' for im, cap in cells)
    return f'<div class="grid">{items}</div>'


def page(title: str, sections: list[Section], subtitle: str = "") -> str:
    nav = "".join(f'<a href="#{s.id}">{esc(s.title)}</a>' for s in sections)
    body = "".join(f'<section id="{s.id}"><h2>{esc(s.title)}</h2>{s.body}</section>' for s in sections)
    return (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>"
        f"<style>{CSS}</style></head><body><h1>{esc(title)}</h1><p class='note'>{esc(subtitle)}</p>"
        f"<nav>{nav}</nav>{body}</body></html>"
    )
