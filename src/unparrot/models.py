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

from .flags import option

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


class _RegisterOnImport:
    """A one-shot import hook: when open_clip is imported after unparrot, register unparrot's configs
    right after open_clip's own module has run, so `import unparrot` is enough (and stays as cheap as
    before: torch and open_clip are not imported until someone imports them)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "open_clip":
            return None
        import importlib.util
        import sys

        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            register_configs()

        spec.loader.exec_module = exec_module
        return spec


def register_on_import():
    """Register unparrot's configs with open_clip now if it is imported, else as soon as it is."""
    import sys

    if "open_clip" in sys.modules:
        register_configs()
    elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())


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


def embed_dim(name: str) -> int:
    """The width of a model's embeddings from its config alone (no weights), for the embed stage's
    declared outputs: a named architecture, a `local-dir:` folder or an `hf-hub:` repository."""
    import json

    if name.startswith("local-dir:"):
        cfg = json.loads((Path(name[len("local-dir:") :]) / "open_clip_config.json").read_text())["model_cfg"]
    elif name.startswith("hf-hub:"):
        from huggingface_hub import hf_hub_download

        cfg = json.loads(Path(hf_hub_download(name[len("hf-hub:") :], "open_clip_config.json")).read_text())
        cfg = cfg["model_cfg"]
    else:
        cfg = model_config(name)
    return int(cfg["embed_dim"])


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


def _causal_eot_tower(model) -> bool:
    """Whether `model`'s text tower is open_clip's plain one: causal attention (position i sees only
    positions <= i) and features pooled at the end-of-text token. For such a tower the features of a text
    do not depend on the padding after its end."""
    import open_clip
    import torch

    mask = getattr(model, "attn_mask", None)
    if type(model) is not open_clip.CLIP or getattr(model, "text_pool_type", None) not in ("argmax", "eos"):
        return False
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return False
    return bool((torch.isinf(mask) == torch.ones_like(mask, dtype=torch.bool).triu(1)).all())


def encode_text(model, tokens):
    """`model.encode_text(tokens)`, over the tokens' used length where that is the same computation.

    CLIP's text context has 77 positions, while a class prompt or a word takes 5-15 and a caption 20-30;
    the rest is padding (id 0). In a causal tower pooled at the end-of-text token no used position
    attends to a later one, so cutting the trailing padding columns leaves every feature the same (up to
    float summation order) and saves most of the text tower's work. Any other tower (a Hugging Face text
    model, a non-causal mask, 'first'/'last' pooling) runs as open_clip runs it."""
    import torch
    from open_clip.transformer import text_global_pool

    used = (tokens != 0).any(0).nonzero()
    n = int(used.max()) + 1 if len(used) else tokens.shape[1]
    if n >= tokens.shape[1] or not _causal_eot_tower(model):
        return model.encode_text(tokens)
    tokens = tokens[:, :n]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast) + model.positional_embedding[:n].to(cast)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:n, :n]))
    x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    proj = model.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
    return x


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
    omitted for `hf-hub:`/`local-dir:` names (a checkpoint file given with them, e.g. open_clip_train's
    `epoch_N.pt` after fine-tuning an exported folder, is loaded over the folder's weights). A checkpoint
    that does not fit the architecture is a ValueError naming the mismatching tensors.
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
    if pretrained and schema is not None and not os.path.isfile(pretrained):
        raise FileNotFoundError(f"pretrained {pretrained!r} is not a file (with {name} it must be a checkpoint file)")
    if pretrained and os.path.exists(pretrained) and vocab is None:
        vocab = _checkpoint_vocab(pretrained)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained if schema is None else None, device=device, weights_only=True
        )
        if schema is not None and pretrained:  # open_clip ignores `pretrained` for a folder: weights on top
            open_clip.load_checkpoint(model, pretrained, weights_only=True)
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


# ---- open_clip export -----------------------------------------------------------------------------
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"


def expand_token_table(weight, vocab: Sequence[int], context_length: int, full_size: int | None = None):
    """A dense-vocabulary token table (one row per dense id) as open_clip's full BPE table: row `i` is
    the row of BPE id i's dense id (the unknown id's row for BPE ids outside the vocabulary), so the
    model computes exactly the same embeddings from open_clip's own tokenizer's ids."""
    import torch

    tok = DenseTokenizer(vocab, context_length)
    n = full_size or tok.base.vocab_size
    index = np.full(n, UNK_ID, dtype=np.int64)
    index[: len(tok.table)] = tok.table[:n]
    return weight[torch.from_numpy(index)].clone()


@dataclass
class ExportConfig:
    """The options of `export_open_clip()` (its signature defaults read these; the CLI's flags too)."""

    checkpoint: str = option(help="checkpoint file (unparrot train's or open_clip_train's)", positional=True)
    out: str = option(help="output folder", positional=True)
    model: str | None = option(None, "architecture (default: the checkpoint's `name`)")


def export_open_clip(
    checkpoint: str | os.PathLike, out: str | os.PathLike, model: str | None = ExportConfig.model
) -> Path:
    """Write `out/open_clip_config.json` and `out/open_clip_model.safetensors` from a checkpoint of
    `unparrot train` (or any open_clip checkpoint of a config open_clip or unparrot knows).

    open_clip's own loaders rebuild model, transform and tokenizer from that folder, with no unparrot
    import: `open_clip.create_model_and_transforms("local-dir:OUT")`, `open_clip.get_tokenizer("local-dir:OUT")`
    (and `hf-hub:` once the folder is uploaded), so open_clip_train and CLIP_benchmark take it as it is.
    A dense-vocabulary model (`-v1k`) is written with open_clip's full 49,408-row token table
    (`expand_token_table`), because those tools always tokenize with open_clip's BPE tokenizer.
    """
    import copy
    import json

    import torch

    ck = torch.load(checkpoint, map_location="cpu", weights_only=True)
    sd = ck.get("state_dict", ck) if isinstance(ck, dict) else None
    if not isinstance(sd, dict) or not sd:
        raise ValueError(f"{checkpoint}: not an open_clip checkpoint (no state_dict)")
    sd = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in sd.items()}
    name = model or ck.get("name")
    if not name:
        raise ValueError(f"{checkpoint}: the checkpoint does not name its model; pass model=")
    cfg = copy.deepcopy(model_config(name))
    text = cfg.setdefault("text_cfg", {})
    size = int(text.get("vocab_size", 49408))
    full = 49408
    if size < full:
        if "unparrot_vocab" not in ck:
            raise ValueError(f"{checkpoint}: {name} has a {size}-entry token table but no unparrot_vocab")
        keys = [k for k, v in sd.items() if k.endswith("token_embedding.weight") and v.shape[0] == size]
        if len(keys) != 1:
            raise ValueError(f"{checkpoint}: cannot find the {size}-row token table ({keys})")
        sd[keys[0]] = expand_token_table(sd[keys[0]], ck["unparrot_vocab"], int(text.get("context_length", 77)), full)
        text["vocab_size"] = full
    import open_clip

    # the transform open_clip gives the named model (size, mean, std, resize mode): the same in the folder
    preprocess = dict(getattr(open_clip.create_model(name, pretrained=None).visual, "preprocess_cfg", {}) or {})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    from .pool import atomic_write_bytes

    tmp = out / (OPEN_CLIP_WEIGHTS + ".tmp")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp))
    os.replace(tmp, out / OPEN_CLIP_WEIGHTS)
    info = {"model_cfg": cfg, "preprocess_cfg": preprocess, "unparrot": {"model": name, "checkpoint": str(checkpoint)}}
    atomic_write_bytes(out / OPEN_CLIP_CONFIG, json.dumps(info, indent=1, default=list).encode())
    return out
