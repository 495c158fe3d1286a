"""Flax NNX decoder-only Transformers with logical axis names. No mesh, no training code."""

from models.cache import KVCache
from models.config import ModelConfig
from models.transformer import StackedBlocks, Transformer, count_matmul_params, count_params

__all__ = ["KVCache", "ModelConfig", "StackedBlocks", "Transformer", "count_matmul_params",
           "count_params"]
