"""`aesthetic`: LAION's improved aesthetic predictor (docs/methods.md §6) over the embed stage's image embeddings.

The released weights (e.g. `sac+logos+ava1-l14-linearMSE.pth`, a plain state dict) fit an MLP on
L2-normalised CLIP ViT-L/14 image embeddings (768-d): 768 -> 1024 -> 128 -> 64 -> 16 -> 1, dropout between
the first layers, no activations. The user supplies the file; the module names below match it, so it
loads as released. Embeddings of another width are a clear error, not a silent garbage score.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ..flags import option
from .base import Operator, column


def aesthetic_mlp(input_size: int = 768):
    import torch.nn as nn

    class AestheticMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.input_size = input_size
            self.layers = nn.Sequential(
                nn.Linear(input_size, 1024),
                nn.Dropout(0.2),
                nn.Linear(1024, 128),
                nn.Dropout(0.2),
                nn.Linear(128, 64),
                nn.Dropout(0.1),
                nn.Linear(64, 16),
                nn.Linear(16, 1),
            )

        def forward(self, x):
            return self.layers(x)

    return AestheticMLP()


def load_aesthetic(weights: str):
    """The MLP with the released weights (a state dict, optionally wrapped in {"state_dict": ...})."""
    import torch

    sd = torch.load(weights, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or "layers.0.weight" not in sd:
        raise ValueError(f"{weights}: not an aesthetic-predictor state dict (expected keys layers.0.weight, ...)")
    mlp = aesthetic_mlp(int(sd["layers.0.weight"].shape[1]))
    try:
        mlp.load_state_dict(sd)
    except RuntimeError as e:
        raise ValueError(f"{weights}: does not match the aesthetic MLP (768-1024-128-64-16-1): {e}") from None
    return mlp.eval()


@dataclass
class AestheticConfig:
    """The aesthetic operator's options (its `__init__` defaults read these)."""

    weights: str = option(help="the predictor's weight file (e.g. sac+logos+ava1-l14-linearMSE.pth)")
    embed_stage: str = option("embed", "stage with the ViT-L/14 image embeddings")


class Aesthetic(Operator):
    needs = ()
    version = 1
    schema = {"aesthetic": pa.float32()}

    def __init__(self, weights: str, embed_stage: str = AestheticConfig.embed_stage):
        self.mlp = load_aesthetic(weights)
        self.inputs = {embed_stage: ["image"]}
        self.embed_stage = embed_stage

    @classmethod
    def inputs_for(cls, params: dict) -> dict[str, list[str]]:
        return {params.get("embed_stage", "embed"): ["image"]}

    def __call__(self, batch):
        import torch

        emb = np.asarray(batch["image"], dtype=np.float32)
        if emb.ndim != 2 or emb.shape[1] != self.mlp.input_size:
            raise ValueError(
                f"the aesthetic predictor expects {self.mlp.input_size}-d image embeddings (CLIP ViT-L/14 for "
                f"LAION's released weights); stage {self.embed_stage!r} has {emb.shape[-1]}-d embeddings: run "
                f"`unparrot run POOL embed --param model=ViT-L-14 ... --stage embed_l14` and pass embed_stage=embed_l14"
            )
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        with torch.inference_mode():
            score = self.mlp(torch.from_numpy(emb)).squeeze(-1).numpy()
        return {"aesthetic": score.astype(np.float32), "error": [None] * len(column(batch, "uid"))}
