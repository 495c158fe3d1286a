"""The Qwen2 family (Qwen2ForCausalLM, the architecture of Qwen2 and Qwen2.5): Llama
with biases on the query, key and value projections (our model.qkv_bias). Its configs
carry `sliding_window` with `use_sliding_window: false` (the window unused); a window
in use is accepted only where it holds every position.
"""

from __future__ import annotations

from train.hf import llama, mixtral
from train.hf.llama import LAYER
from train.hf.tensors import Mapping

ARCHITECTURE = "Qwen2ForCausalLM"


def exports(m) -> bool:
    """Whether this family writes our ModelConfig `m` (q/k/v biases)."""
    return m.style == "llama" and not m.moe.enabled and not m.qk_norm and m.qkv_bias


def check_window(hf: dict, family: str) -> None:
    """Qwen's window settings: `use_sliding_window: false` turns the window off."""
    if hf.get("use_sliding_window"):
        mixtral.check_window(hf, f"{family} with use_sliding_window=true:")


def model_config(hf: dict, vocab_size: int) -> dict:
    """Our model.* keys from an HF config.json (vocabulary padded to `vocab_size`)."""
    check_window(hf, "Qwen2")
    return dict(llama.common_config(hf, vocab_size, "Qwen2"), qkv_bias=True,
                mlp_dim=hf["intermediate_size"])


def hf_config(m, vocab_size: int, eos_id, bos_id) -> dict:
    """An HF config.json for our ModelConfig `m`, with the unpadded vocabulary."""
    return dict(llama.common_hf_config(m, ARCHITECTURE, "qwen2", vocab_size, eos_id, bos_id),
                intermediate_size=m.mlp_dim, use_sliding_window=False,
                max_window_layers=m.num_layers)


def bias_mapping(m, stack: str = "blocks/") -> Mapping:
    """A stack's query, key and value biases, (N x H) and (K x H) in HF, (N, H) and
    (K, H) here."""
    N, K, H = m.num_heads, m.kv_heads, m.head_size
    at = LAYER + "self_attn."
    return {stack + f"{x}_bias": (at + f"{x}_proj.bias", lambda a, m, n=n: a.reshape(n, H),
                                  lambda a, m: a.reshape(-1))
            for x, n in (("q", N), ("k", K), ("v", K))}


def mapping(m) -> Mapping:
    return {**llama.mapping(m), **bias_mapping(m)}


def joined_tensors(m, gather):
    """Tensors HF stores joined that we keep apart: none for Qwen2."""
    return iter(())
