"""Flax NNX decoder-only Transformers with logical axis names. No mesh, no training code."""

from models.config import ModelConfig
from models.transformer import StackedBlocks, Transformer, count_params

__all__ = ["ModelConfig", "StackedBlocks", "Transformer", "count_params"]
