"""Streaming, defensive reading and writing of webdataset tar shards.

Shards come from the web (img2dataset, DataComp): a member name is untrusted, a tar may be cut short, a
member may be huge. Nothing here extracts to disk; members are read into memory one sample at a time.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator

# webdataset's rule: the key is everything up to the first dot of the last path component.
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")

MAX_MEMBER_BYTES = 256 * 1024 * 1024


def split_key(name: str) -> tuple[str, str] | None:
    """Split a member name into (key, extension) the way webdataset does ("a/b.c.jpg" -> ("a/b", "c.jpg"))."""
    m = _KEY_EXT.match(name)
    return (m.group(1), m.group(2).lower()) if m else None


def unsafe_name(name: str) -> str | None:
    """Why a member name must not be trusted, or None. We never extract, but reshard writes names back."""
    if not name:
        return "empty member name"
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return f"absolute member name {name!r}"
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        return f"path traversal in member name {name!r}"
    if "\x00" in name:
        return "NUL byte in member name"
    return None


@dataclass
class RawSample:
    """The members of one sample, by extension, as bytes; `problem` is set when the sample is unusable."""

    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    problem: str | None = None
    broke_shard: bool = False  # the tar ended inside this sample (truncated or corrupt)


@dataclass
class ShardProblem:
    """Something wrong with a shard that is not tied to one sample (a cut-off tar after the last sample)."""

    reason: str
    after_key: str | None = None


class TarFormatError(ValueError):
    """A tar that is cut short or corrupt; `name` is the member being read when it broke, if known."""

    def __init__(self, msg: str, name: str | None = None):
        super().__init__(msg)
        self.name = name


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    field = field.split(b"\0", 1)[0].strip()
    return int(field, 8) if field else 0


def _members(f, limit: int = MAX_MEMBER_BYTES) -> Iterator[tuple[str, bytes | None, int]]:
    """Yield (name, data, size) of the regular files of an (uncompressed) tar stream.

    A small, strict ustar/GNU/pax reader: tarfile's pure-Python header parsing costs as much as decoding a
    small JPEG, and it silently stops at a cut-off header. `data` is None for members over the size limit
    (their bytes are skipped). Raises TarFormatError on a bad checksum or a short read.
    """
    long_name = None
    pax: dict[str, str] = {}
    while True:
        hdr = f.read(512)
        if len(hdr) == 0:
            raise TarFormatError("truncated tar: no end-of-archive marker after the last complete member")
        if len(hdr) < 512:
            raise TarFormatError("truncated tar: cut off inside a header")
        if hdr == _ZERO_BLOCK:
            return
        chk = _octal(hdr[148:156])
        if chk != sum(hdr[:148]) + 256 + sum(hdr[156:]):
            raise TarFormatError("corrupt tar: bad header checksum")
        size = _octal(hdr[124:136])
        flag = hdr[156:157]
        padded = (size + 511) & ~511
        short = long_name or pax.get("path") or hdr[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        if flag in (b"L", b"x") or (flag == b"0" or flag == b"\0" or flag == b"7") and size <= limit:
            data = f.read(padded)
            if len(data) < padded:
                raise TarFormatError("truncated tar: unexpected end of data in a member", short)
            data = data[:size]
        else:
            data = None
            _skip(f, padded, short)
        if flag == b"L":
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue
        if flag == b"x":
            pax = _parse_pax(data)
            continue
        if flag not in (b"0", b"\0", b"7"):
            long_name, pax = None, {}
            continue  # directories, links, devices, global headers: never followed
        name = long_name or pax.get("path")
        if name is None:
            name = hdr[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if hdr[257:262] == b"ustar":
                prefix = hdr[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                if prefix:
                    name = prefix + "/" + name
        if "size" in pax:
            raise TarFormatError("pax size records are not supported")
        long_name, pax = None, {}
        yield name, data, size


_ZERO_BLOCK = bytes(512)


def _skip(f, n: int, name: str | None = None):
    try:
        f.seek(n, 1)
    except (OSError, AttributeError, io.UnsupportedOperation):
        while n > 0:
            chunk = f.read(min(n, 1 << 20))
            if not chunk:
                raise TarFormatError("truncated tar: unexpected end of data in a member", name) from None
            n -= len(chunk)


def _parse_pax(data: bytes) -> dict[str, str]:
    out, i = {}, 0
    while i < len(data):
        sp = data.find(b" ", i)
        if sp < 0:
            break
        length = int(data[i:sp])
        if length <= sp - i:  # a record shorter than its own length field: would loop forever
            raise TarFormatError(f"corrupt tar: bad pax record length {length}")
        rec = data[sp + 1 : i + length - 1]
        k, _, v = rec.partition(b"=")
        out[k.decode()] = v.decode("utf-8", "surrogateescape")
        i += length
    return out


def _open_stream(path):
    f = open(path, "rb")
    magic = f.read(3)
    f.seek(0)
    if magic[:2] == b"\x1f\x8b":
        import gzip

        return gzip.GzipFile(fileobj=f)
    if magic == b"BZh":
        import bz2

        return bz2.BZ2File(f)
    if magic == b"\xfd7z":
        import lzma

        return lzma.LZMAFile(f)
    return io.BufferedReader(f, buffer_size=1 << 20) if not isinstance(f, io.BufferedReader) else f


def iter_samples(
    path: str | os.PathLike | IO[bytes], max_member_bytes: int = MAX_MEMBER_BYTES
) -> Iterator[RawSample | ShardProblem]:
    """Yield the samples of a tar shard in order, grouping consecutive members by key.

    A truncated or corrupt tar ends the iteration with a `RawSample` marked with the problem (when it
    broke inside a sample) or a `ShardProblem` (when it broke between samples). Unsafe or oversized
    members mark their sample instead of being read.
    """
    current: RawSample | None = None
    last_key: str | None = None
    f = _open_stream(path) if isinstance(path, (str, os.PathLike)) else path
    try:
        for name, data, size in _members(f, max_member_bytes):
            kx = split_key(name)
            if kx is None:
                if name.split("/")[-1].startswith("__"):
                    continue  # webdataset metadata such as __index__
                kx = (name, "")
            key, ext = kx
            if current is not None and key != current.key:
                yield current
                last_key = current.key
                current = None
            if current is None:
                current = RawSample(key=key)
            bad = unsafe_name(name)
            if bad:
                current.problem = bad
                continue
            if data is None:
                current.problem = f"member {name!r} is {size} bytes (limit {max_member_bytes})"
                continue
            if ext in current.members:
                current.problem = f"duplicate member {name!r} in one sample"
            current.members[ext] = data
    except (TarFormatError, EOFError, OSError, ValueError) as e:
        reason = str(e) if isinstance(e, TarFormatError) else f"corrupt or truncated tar: {type(e).__name__}: {e}"
        # a cut inside a member's data breaks that member's sample; a cut header breaks no known sample
        broken = split_key(e.name) if isinstance(e, TarFormatError) and e.name else None
        if current is not None and (broken is None or broken[0] != current.key):
            yield current
            last_key, current = current.key, None
        if broken is not None and current is None:
            current = RawSample(key=broken[0])
        if current is not None:
            current.problem, current.broke_shard = reason, True
            yield current
        else:
            yield ShardProblem(reason=reason, after_key=last_key)
    else:
        if current is not None:
            yield current
    finally:
        if isinstance(path, (str, os.PathLike)):
            f.close()


def count_samples(path: str | os.PathLike) -> int:
    """Count samples by reading headers only (member data is skipped): cheap, used for progress ETA."""
    n, last = 0, None
    try:
        with _open_stream(path) as f:
            for name, _, _ in _members(f, limit=-1):  # skip every member's data
                kx = split_key(name)
                if kx and kx[0] != last:
                    n, last = n + 1, kx[0]
    except (TarFormatError, OSError, ValueError):
        pass  # the reader reports the problem; a partial count only affects the ETA
    return n


class ShardWriter:
    """Write samples (dict ext -> bytes/str) into numbered tar shards, each renamed into place when complete.

    `pattern` is a format string with one integer field, e.g. "out/{:05d}.tar".
    """

    def __init__(self, pattern: str, max_count: int = 10000, start: int = 0):
        self.pattern, self.max_count, self.index = pattern, max_count, start
        self.tf: tarfile.TarFile | None = None
        self.count = 0
        self.total = 0
        self.written: list[str] = []
        self._tmp: str | None = None

    def _open(self):
        final = self.pattern.format(self.index)
        Path(final).parent.mkdir(parents=True, exist_ok=True)
        self._tmp = final + ".tmp"
        self.tf = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self.count = 0

    def _close(self):
        if self.tf is None:
            return
        self.tf.close()
        final = self.pattern.format(self.index)
        os.replace(self._tmp, final)
        self.written.append(final)
        self.tf, self.index = None, self.index + 1

    def write(self, key: str, members: dict[str, bytes | str]):
        bad = unsafe_name(key)
        if bad or "." in key.split("/")[-1]:
            raise ValueError(f"cannot write sample key {key!r}: {bad or 'dots are not allowed in keys'}")
        if self.tf is None:
            self._open()
        now = time.time()
        for ext, data in members.items():
            if isinstance(data, str):
                data = data.encode("utf-8")
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), now, 0o644
            self.tf.addfile(info, io.BytesIO(data))
        self.count += 1
        self.total += 1
        if self.count >= self.max_count:
            self._close()

    def close(self):
        self._close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        elif self.tf is not None:
            self.tf.close()
            os.unlink(self._tmp)
