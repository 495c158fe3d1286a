"""The dense Qwen3 family (Qwen3ForCausalLM): Llama with a per-head RMSNorm of queries
and keys before RoPE (self_attn.q_norm / k_norm (H,): our model.qk_norm), and usually
a head size of its own (head_dim, not hidden_size / heads). Window settings as Qwen2's.
"""

from __future__ import annotations

from train.hf import llama, qwen2
from train.hf.llama import LAYER
from train.hf.tensors import Mapping, same

ARCHITECTURE = "Qwen3ForCausalLM"


def exports(m) -> bool:
    """Whether this family writes our ModelConfig `m` (dense, q/k norms)."""
    return m.style == "llama" and not m.moe.enabled and m.qk_norm and not m.qkv_bias


def model_config(hf: dict, vocab_size: int) -> dict:
    """Our model.* keys from an HF config.json (vocabulary padded to `vocab_size`)."""
    qwen2.check_window(hf, "Qwen3")
    return dict(llama.common_config(hf, vocab_size, "Qwen3"), qk_norm=True,
                mlp_dim=hf["intermediate_size"])


def hf_config(m, vocab_size: int, eos_id, bos_id) -> dict:
    """An HF config.json for our ModelConfig `m`, with the unpadded vocabulary."""
    return dict(llama.common_hf_config(m, ARCHITECTURE, "qwen3", vocab_size, eos_id, bos_id),
                intermediate_size=m.mlp_dim, attention_bias=False, use_sliding_window=False,
                max_window_layers=m.num_layers)


def qk_norm_mapping(stacks: tuple[str, ...]) -> Mapping:
    """Each stack's per-head query and key norm scales."""
    out = {}
    for s in stacks:
        out[s + "q_norm_scale"] = (LAYER + "self_attn.q_norm.weight", same, same)
        out[s + "k_norm_scale"] = (LAYER + "self_attn.k_norm.weight", same, same)
    return out


def mapping(m) -> Mapping:
    return {**llama.mapping(m), **qk_norm_mapping(("blocks/",))}


def joined_tensors(m, gather):
    """Tensors HF stores joined that we keep apart: none for Qwen3."""
    return iter(())
