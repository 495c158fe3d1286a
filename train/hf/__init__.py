"""Hugging Face checkpoints in and out. One module per model family holds everything
that family's checkpoints need (config translation both ways, parameter names and
layouts); `tensors` reads and writes the safetensors files for any family, and
`convert` ties them to our export directories. A new family is one new module, listed
in FAMILIES: ARCHITECTURE, exports(m), model_config, hf_config, mapping, joined_tensors."""

from __future__ import annotations

from types import ModuleType

from train.errors import ConversionError
from train.hf import gpt2, llama, mistral, mixtral, qwen2, qwen3, qwen3_moe

FAMILIES: tuple[ModuleType, ...] = (llama, gpt2, mixtral, qwen3_moe, qwen2, qwen3, mistral)
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


def family_for(m, architecture: str | None = None) -> ModuleType:
    """The family module that exports our ModelConfig `m`: the one it was imported from
    (`architecture`) where that family holds it, else the first that does."""
    for family in sorted(FAMILIES, key=lambda f: f.ARCHITECTURE != architecture):
        if family.exports(m):
            return family
    raise ConversionError(f"no Hugging Face family holds a model.style={m.style} model with "
                          f"model.qk_norm={str(m.qk_norm).lower()}, model.qkv_bias="
                          f"{str(m.qkv_bias).lower()} and {m.moe.num_experts} experts "
                          "(exported: Llama, Mistral and GPT-2 without q/k norms, Qwen2: "
                          "q/k/v biases, Qwen3: q/k norms, Mixtral: experts without q/k "
                          "norms, Qwen3-MoE: experts with q/k norms)")


def model_config(hf: dict, vocab_multiple: int = 128) -> dict:
    """Our model.* keys from an HF config.json, the vocabulary padded to a multiple."""
    padded = -(-hf["vocab_size"] // vocab_multiple) * vocab_multiple
    return family_of(hf).model_config(hf, padded)


__all__ = ["COMPUTE_KEYS", "FAMILIES", "family_for", "family_of", "model_config"]
