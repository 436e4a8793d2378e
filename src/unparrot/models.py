"""CLIP models by name: any open_clip architecture and weights, plus unparrot's small CPU configs.

unparrot's configs (`unparrot-rn-tiny`, `unparrot-rn-tiny-v1k`, `unparrot-vit-tiny`, in model_configs/)
are registered with open_clip on import, so `open_clip.create_model_and_transforms(name, pretrained=path)`
loads checkpoints written by `unparrot train`. The `-v1k` config has a 1,024-entry token table: its
tokenizer maps open_clip's BPE ids to a dense vocabulary built from the training captions and
evaluation texts (stored in the checkpoint as `unparrot_vocab`), which makes a tiny model 4x smaller
and its optimizer step much cheaper; BPE ids outside that vocabulary map to one unknown id.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

CONFIG_DIR = Path(__file__).parent / "model_configs"
_REGISTERED = False
PAD_ID, UNK_ID = 0, 1


def register_configs():
    """Make unparrot's model configs known to open_clip (idempotent)."""
    global _REGISTERED
    if not _REGISTERED:
        import open_clip

        open_clip.add_model_config(CONFIG_DIR)
        _REGISTERED = True


def is_unparrot_model(name: str) -> bool:
    return (CONFIG_DIR / f"{name}.json").exists()


def model_config(name: str) -> dict:
    register_configs()
    import open_clip

    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise KeyError(
            f"unknown model {name!r}; open_clip knows {len(open_clip.list_models())} "
            f"architectures (e.g. ViT-B-32, RN50) and unparrot adds "
            f"{', '.join(p.stem for p in sorted(CONFIG_DIR.glob('*.json')))}"
        )
    return cfg


class DenseTokenizer:
    """open_clip's BPE tokenizer followed by a map of BPE ids to a dense vocabulary.

    Order is kept (dense id = rank of the BPE id, after the reserved pad=0 and unk=1), so end-of-text,
    the largest BPE id, stays the largest dense id: open_clip finds the text's end by argmax.
    """

    def __init__(self, vocab_ids: Sequence[int], context_length: int = 32):
        from open_clip.tokenizer import SimpleTokenizer

        self.base = SimpleTokenizer(context_length=context_length)
        self.context_length = context_length
        ids = sorted(set(int(i) for i in vocab_ids) - {0})
        self.vocab_ids = ids
        table = np.full(max(ids + [self.base.eot_token_id]) + 1, UNK_ID, dtype=np.int64)
        table[0] = PAD_ID
        table[ids] = np.arange(2, len(ids) + 2)
        self.table = table
        self.vocab_size = len(ids) + 2

    def __call__(self, texts, context_length: int | None = None):
        import torch

        toks = self.base(texts, context_length=context_length or self.context_length)
        return torch.from_numpy(self.table[toks.numpy()])


def build_vocab(texts, context_length: int = 32) -> list[int]:
    """BPE ids used by `texts` (plus start/end of text): the dense vocabulary of a DenseTokenizer."""
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer(context_length=context_length)
    ids = {tok.sot_token_id, tok.eot_token_id}
    batch = list(texts)
    for i in range(0, len(batch), 4096):
        ids.update(np.unique(tok(batch[i : i + 4096]).numpy()).tolist())
    ids.discard(0)
    return sorted(ids)


@dataclass
class Clip:
    """A loaded CLIP model with its image transform and tokenizer."""

    name: str
    model: object
    preprocess: object
    tokenizer: object
    image_size: int
    pretrained: str | None = None


def _checkpoint_vocab(path: str) -> list[int] | None:
    import torch

    ck = torch.load(path, map_location="cpu", weights_only=True)
    return list(ck["unparrot_vocab"]) if isinstance(ck, dict) and "unparrot_vocab" in ck else None


def load_clip(
    name: str,
    pretrained: str | None = None,
    device: str = "cpu",
    vocab: Sequence[int] | None = None,
    train: bool = False,
) -> Clip:
    """Create an open_clip model (random init when `pretrained` is None) with its transform and tokenizer.

    `pretrained` is an open_clip tag (needs the hub, unreachable offline), a local checkpoint file, or
    omitted for `hf-hub:`/`local-dir:` names. A checkpoint that does not fit the architecture is a
    ValueError naming the mismatching tensors.
    """
    register_configs()
    import open_clip

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    schema = name.split(":", 1)[0] + ":" if name.startswith(("hf-hub:", "local-dir:")) else None
    cfg = model_config(name) if schema is None else None
    if pretrained and schema is None and not os.path.exists(pretrained):
        tags = open_clip.list_pretrained_tags_by_model(name) if not is_unparrot_model(name) else []
        if pretrained not in tags:
            raise FileNotFoundError(
                f"pretrained {pretrained!r} is neither a file nor a known tag of {name} ({', '.join(tags) or 'none'})"
            )
    if pretrained and os.path.exists(pretrained) and vocab is None:
        vocab = _checkpoint_vocab(pretrained)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, device=device, weights_only=True
        )
    except RuntimeError as e:
        msg = str(e)
        if "state_dict" in msg or "size mismatch" in msg or "Missing key" in msg or "Unexpected key" in msg:
            lines = [ln.strip() for ln in msg.splitlines() if ln.strip()][:4]
            raise ValueError(
                f"checkpoint {pretrained} does not match architecture {name}: " + " | ".join(lines)[:600]
            ) from None
        raise
    except Exception as e:  # hub lookups fail offline with many exception types
        if pretrained and not os.path.exists(str(pretrained)) or schema == "hf-hub:":
            raise RuntimeError(
                f"cannot load {name} {pretrained or ''}: the weights need a download from a model "
                f"hub, which is not reachable here ({type(e).__name__}); pass a local checkpoint "
                f"file as pretrained"
            ) from e
        raise
    model.train(train)
    ctx = (cfg or {}).get("text_cfg", {}).get("context_length", 77)
    vocab_size = (cfg or {}).get("text_cfg", {}).get("vocab_size", 49408)
    if vocab_size < 49408:
        if vocab is None:
            raise ValueError(
                f"{name} has a {vocab_size}-entry token table and needs a dense vocabulary: pass "
                f"vocab= (build_vocab(texts)) or a checkpoint written by unparrot train"
            )
        tokenizer = DenseTokenizer(vocab, ctx)
        if tokenizer.vocab_size > vocab_size:
            raise ValueError(f"the dense vocabulary has {tokenizer.vocab_size} ids; {name} holds {vocab_size}")
    else:
        tokenizer = open_clip.get_tokenizer(name)
    size = preprocess.transforms[0].size if hasattr(preprocess, "transforms") else 224
    size = size[0] if isinstance(size, (tuple, list)) else size
    return Clip(name, model, preprocess, tokenizer, int(size), pretrained)
