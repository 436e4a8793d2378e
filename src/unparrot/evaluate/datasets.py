"""Labelled evaluation sets: CLIP_benchmark's webdataset layout (DataComp's evaluation sets, and what
`unparrot synth` writes) and ImageFolder-style folders.

webdataset layout: `SET/test/*.tar` (samples `{key}.webp|png|jpg` + `{key}.cls`, optional `.txt` captions and
`.json`), `SET/classnames.txt`, `SET/zeroshot_classification_templates.txt`.
ImageFolder: `SET/<class>/*.jpg` (class = folder name, '_' read as a space; `classnames.txt` overrides).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..imaging.decode import IMAGE_EXTS
from ..io.samples import parse_sample
from ..io.tar import RawSample, iter_samples

BUILTIN_TEMPLATES = ("openai", "simple", "plain")


def builtin_templates(name: str) -> list[str]:
    """OpenAI's 80 ImageNet templates or open_clip's short list (from open_clip's package), or '{c}'."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    if name == "openai":
        return [t("{c}") for t in OPENAI_IMAGENET_TEMPLATES]
    if name == "simple":
        return [t("{c}") for t in SIMPLE_IMAGENET_TEMPLATES]
    if name == "plain":
        return ["{c}"]
    raise KeyError(f"unknown templates {name!r}: {', '.join(BUILTIN_TEMPLATES)}, or a file of templates")


@dataclass
class LabelledSet:
    name: str
    path: str
    classnames: list[str]
    templates: list[str]
    kind: str = "wds"  # wds or folder
    tars: list[str] = field(default_factory=list)
    files: list[tuple[str, int]] = field(default_factory=list)

    def samples(self) -> Iterator[dict]:
        """Rows: key, image (bytes), label (int or None), captions (list), meta (dict)."""
        if self.kind == "folder":
            for path, label in self.files:
                yield {
                    "key": os.path.relpath(path, self.path),
                    "image": Path(path).read_bytes(),
                    "label": label,
                    "captions": [],
                    "meta": {},
                }
            return
        for t in self.tars:
            for item in iter_samples(t):
                if not isinstance(item, RawSample):
                    continue
                row = parse_sample(item, "")
                cls = item.members.get("cls")
                label = int(cls.decode().strip()) if cls else None
                caps = [c for c in (row["caption"] or "").split("\n") if c.strip()] if "txt" in item.members else []
                caps = row["meta"].get("captions", caps) if isinstance(row["meta"].get("captions"), list) else caps
                yield {
                    "key": row["key"],
                    "image": row["image"],
                    "label": label,
                    "captions": caps,
                    "meta": row["meta"],
                    "problem": row["problems"].get("sample") or row["problems"].get("image"),
                }


def load_set(path: str | os.PathLike, name: str | None = None, templates: str | None = None) -> LabelledSet:
    """Open a labelled set; `templates` is a built-in name or a file (default: the set's own file, else simple)."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"evaluation set {path} is not a folder")
    name = name or p.name
    classnames_file = p / "classnames.txt"
    tars = next(
        (sorted(str(t) for t in d.glob("*.tar")) for d in (p / "test", p / "shards", p) if any(d.glob("*.tar"))), []
    )
    if tars:
        # without classnames.txt (any captioned shards, e.g. a pool or a reshard): retrieval only
        classnames = (
            [ln.strip() for ln in classnames_file.read_text().splitlines() if ln.strip()]
            if classnames_file.exists()
            else []
        )
        ds = LabelledSet(name, str(p), classnames, [], "wds", tars=tars)
    else:
        dirs = sorted(d for d in p.iterdir() if d.is_dir())
        if not dirs:
            raise FileNotFoundError(f"{p}: neither test/*.tar shards nor class folders")
        classnames = (
            [ln.strip() for ln in classnames_file.read_text().splitlines() if ln.strip()]
            if classnames_file.exists()
            else [d.name.replace("_", " ") for d in dirs]
        )
        if len(classnames) != len(dirs):
            raise ValueError(f"{p}: {len(dirs)} class folders but {len(classnames)} class names")
        files = [
            (str(f), i)
            for i, d in enumerate(dirs)
            for f in sorted(d.rglob("*"))
            if f.suffix.lower().lstrip(".") in IMAGE_EXTS
        ]
        ds = LabelledSet(name, str(p), classnames, [], "folder", files=files)
    tfile = p / "zeroshot_classification_templates.txt"
    if templates and os.path.isfile(templates):
        ds.templates = [t for t in Path(templates).read_text().splitlines() if t.strip()]
    elif templates:
        ds.templates = builtin_templates(templates)
    elif tfile.exists():
        ds.templates = [t for t in tfile.read_text().splitlines() if t.strip()]
    else:
        ds.templates = builtin_templates("simple")
    bad = [t for t in ds.templates if "{c}" not in t]
    if bad:
        raise ValueError(f"templates must contain {{c}}: {bad[:2]}")
    return ds


def write_set(out: str | os.PathLike, rows, classnames, templates, fmt: str = "png") -> int:
    """Write rows (key, image bytes or PIL, label, meta) as a set in the webdataset layout."""
    from ..imaging.decode import encode_image
    from ..io.tar import ShardWriter

    out = Path(out)
    n = 0
    with ShardWriter(str(out / "test" / "{}.tar"), max_count=10**12) as w:
        for r in rows:
            img = r["image"] if isinstance(r["image"], bytes) else encode_image(r["image"], fmt)
            members = {fmt if not isinstance(r["image"], bytes) else r.get("ext", fmt): img, "cls": str(r["label"])}
            if r.get("meta"):
                members["json"] = json.dumps(r["meta"])
            w.write(re.sub(r"[^\w\-]", "_", r["key"]), members)  # folder paths become flat, dot-free keys
            n += 1
    (out / "test" / "nshards.txt").write_text("1\n")
    (out / "classnames.txt").write_text("\n".join(classnames) + "\n")
    (out / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    return n
