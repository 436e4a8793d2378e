"""From raw tar members to samples: image bytes, caption, metadata and a stable uid.

The uid rule (DataComp compatible, 128 bits as 32 lowercase hex digits):
- a `uid` in the sample's `.json` that is 32 hex digits is kept as is;
- any other `uid` value (an int, a UUID with dashes, ...) becomes the first 32 hex digits of
  sha256("uid:" + str(value)), and the original is kept in the row as `source_uid`;
- without a `uid`, the first 32 hex digits of sha256(image bytes + b"\\0" + caption UTF-8 bytes):
  content-addressed, so it survives resharding and re-ingesting, and exact duplicate pairs collide
  (and are then reported as duplicate uids rather than silently counted twice).
"""

from __future__ import annotations

import hashlib
import json
import re

from ..imaging.decode import IMAGE_EXTS
from .tar import RawSample

_HEX32 = re.compile(r"^[0-9a-fA-F]{32}$")
MAX_CAPTION_CHARS = 65536
SAMPLE_FIELDS = ("uid", "key", "shard", "image", "image_ext", "caption", "meta", "problems")


def content_uid(image: bytes | None, caption: str | None) -> str:
    h = hashlib.sha256()
    h.update(image or b"")
    h.update(b"\0")
    h.update((caption or "").encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:32]


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def normalize_uid(value) -> tuple[str, str | None]:
    """Return (uid, source_uid): DataComp-style uids pass through, other ids are hashed to 128 bits.
    (A lone surrogate from a JSON escape is hashed as such; the kept source_uid is made printable.)"""
    s = str(value).strip()
    if _HEX32.match(s):
        return s.lower(), None
    uid = hashlib.sha256(("uid:" + s).encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return uid, s if _encodable(s) else s.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def parse_sample(raw: RawSample, shard: str, max_caption_chars: int = MAX_CAPTION_CHARS) -> dict:
    """Turn a RawSample into a sample row. Field-level problems are recorded, never raised.

    `problems` maps a field ("image", "caption", "meta", "sample") to a reason; a stage that needs that
    field sends the row to its errors table with the reason.
    """
    problems: dict[str, str] = {}
    if raw.problem:
        problems["sample"] = raw.problem
    m = raw.members
    image, image_ext = None, None
    for ext in IMAGE_EXTS:
        if ext in m:
            image, image_ext = m[ext], ext
            break
    if image is None:
        problems["image"] = "no image member (" + ", ".join(sorted(m)) + ")" if m else "no image member"
    meta: dict = {}
    if "json" in m:
        try:
            meta = json.loads(m["json"].decode("utf-8"))
            if not isinstance(meta, dict):
                problems["meta"] = f".json is a {type(meta).__name__}, not an object"
                meta = {}
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            problems["meta"] = f"invalid .json: {e}"
        except RecursionError:  # [[[[...]]]] deeper than Python's stack
            problems["meta"] = "invalid .json: nested too deeply"
    caption = None
    if "txt" in m:
        try:
            caption = m["txt"].decode("utf-8")
        except UnicodeDecodeError as e:
            problems["caption"] = f"caption is not valid UTF-8 ({e.reason} at byte {e.start})"
    elif isinstance(meta.get("caption"), str):
        caption = meta["caption"]
    else:
        problems["caption"] = "missing caption (no .txt member and no 'caption' in .json)"
    if caption is not None and not _encodable(caption):  # a .json "\ud800" escape: no UTF-8 form
        problems["caption"] = "caption is not valid Unicode (a lone surrogate)"
        caption = None
    if caption is not None:
        caption = caption.strip()
        if len(caption) > max_caption_chars:
            problems["caption"] = f"caption too long: {len(caption)} characters (limit {max_caption_chars})"
            caption = None
    source_uid = None
    if "uid" in meta and meta["uid"] not in (None, ""):
        uid, source_uid = normalize_uid(meta["uid"])
    else:
        uid = content_uid(image, caption)
    row = {
        "uid": uid,
        "key": raw.key,
        "shard": shard,
        "image": image,
        "image_ext": image_ext,
        "caption": caption,
        "meta": meta,
        "problems": problems,
    }
    if source_uid is not None:
        row["source_uid"] = source_uid
    return row
