"""The Mistral family (MistralForCausalLM): Llama's layers and names, with
sliding-window attention. A window shorter than max_position_embeddings
(Mistral-7B-v0.1: 4,096 of 32,768) is taken as the model's longest sequence
(model.max_seq_len): every sequence then fits in the window, where sliding-window
attention is plain causal attention, so the model computes exactly what transformers
does. Exports write no window (null).
"""

from __future__ import annotations

from train.hf import llama
from train.hf.tensors import Mapping

ARCHITECTURE = "MistralForCausalLM"


def exports(m) -> bool:
    """Whether this family writes our ModelConfig `m` (a Llama-shaped model: exported
    as Mistral when it was imported from Mistral, else as Llama)."""
    return llama.exports(m)


def model_config(hf: dict, vocab_size: int) -> dict:
    """Our model.* keys from an HF config.json (vocabulary padded to `vocab_size`)."""
    out = dict(llama.common_config(hf, vocab_size, "Mistral"), mlp_dim=hf["intermediate_size"])
    window = hf.get("sliding_window")
    if window is not None and window < out["max_seq_len"]:
        out["max_seq_len"] = window
    return out


def hf_config(m, vocab_size: int, eos_id, bos_id) -> dict:
    """An HF config.json for our ModelConfig `m`, with the unpadded vocabulary."""
    return dict(llama.common_hf_config(m, ARCHITECTURE, "mistral", vocab_size, eos_id, bos_id),
                intermediate_size=m.mlp_dim, sliding_window=None)


def mapping(m) -> Mapping:
    return llama.mapping(m)


def joined_tensors(m, gather):
    """Tensors HF stores joined that we keep apart: none for Mistral."""
    return iter(())
