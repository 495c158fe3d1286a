"""Hugging Face checkpoints in and out. One module per model family holds everything
that family's checkpoints need (config translation both ways, parameter names and
layouts); `tensors` reads and writes the safetensors files for any family, and
`convert` ties them to our export directories. A new family is one new module, listed
in FAMILIES."""

from __future__ import annotations

from types import ModuleType

from train.errors import ConversionError
from train.hf import gpt2, llama

FAMILIES: tuple[ModuleType, ...] = (llama, gpt2)
# model.* keys about how to compute, not shapes: an import takes them from --config
COMPUTE_KEYS = ("dtype", "param_dtype", "scan_layers", "remat", "attention", "attention_block",
                "vocab_chunks")


def family_of(hf: dict) -> ModuleType:
    """The family module of an HF config.json (by its architecture)."""
    arch = (hf.get("architectures") or [hf.get("model_type", "?")])[0]
    for family in FAMILIES:
        if family.ARCHITECTURE == arch:
            return family
    raise ConversionError(f"HF architecture {arch!r} is not supported; supported: "
                          f"{', '.join(f.ARCHITECTURE for f in FAMILIES)}")


def family_for(style: str) -> ModuleType:
    """The family module that exports our model.style."""
    return next(f for f in FAMILIES if f.STYLE == style)


def model_config(hf: dict, vocab_multiple: int = 128) -> dict:
    """Our model.* keys from an HF config.json, the vocabulary padded to a multiple."""
    padded = -(-hf["vocab_size"] // vocab_multiple) * vocab_multiple
    return family_of(hf).model_config(hf, padded)


__all__ = ["COMPUTE_KEYS", "FAMILIES", "family_for", "family_of", "model_config"]
