"""Inference: loading a trained model onto a mesh, generation with a KV cache, export."""

from train.inference.export import export, load_exported, write_export
from train.inference.generate import Generated, Generator, inference_params
from train.inference.load import Loaded, find_tokenizer, is_export, load

__all__ = ["Generated", "Generator", "Loaded", "export", "find_tokenizer", "inference_params",
           "is_export", "load", "load_exported", "write_export"]
