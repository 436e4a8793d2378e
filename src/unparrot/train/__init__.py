"""CLIP training on curated shards: `train(TrainConfig | dict)`."""

from .trainer import TrainConfig, train

__all__ = ["TrainConfig", "train"]
