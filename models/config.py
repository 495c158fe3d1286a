"""Hyperparameters of the decoder-only Transformer family."""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """One decoder-only Transformer. `style` picks the GPT-2 or the Llama recipe.

    gpt2:  learned positions, LayerNorm (with bias), GELU MLP, biases on projections.
    llama: RoPE, RMSNorm, SwiGLU MLP, grouped-query attention, no biases.
    """

    style: Literal["gpt2", "llama"] = "llama"
    vocab_size: Optional[int] = None  # None: the data's tokenizer sets it (train config)
    num_layers: int = 4
    d_model: int = 128
    num_heads: int = 4
    num_kv_heads: Optional[int] = None  # None: = num_heads (multi-head attention)
    head_dim: Optional[int] = None  # None: d_model // num_heads
    mlp_dim: int = 512
    max_seq_len: int = 256
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Llama-3.1 frequency scaling of RoPE for long contexts ("llama3", as Hugging Face's
    # rope_scaling {rope_type: llama3, factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings}); "none": plain RoPE.
    rope_scaling: Literal["none", "llama3"] = "none"
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    init_std: float = 0.02
    dtype: Literal["bfloat16", "float32", "float16"] = "bfloat16"  # compute
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    scan_layers: bool = True
    remat: Literal["none", "full", "save_dots"] = "none"
    # auto: cuDNN on GPUs (bf16/fp16), splash on TPUs, blocked elsewhere. blocked: exact
    # attention a block of `attention_block` queries at a time (scores held: B x N x block
    # x T, not x T). splash: the Pallas TPU kernel (interpreted, slowly, off TPUs).
    attention: Literal["auto", "xla", "cudnn", "blocked", "splash"] = "auto"
    attention_block: int = 512
    # The training loss computes the logits this many vocabulary slices at a time (the
    # largest divisor of vocab_size up to this), so B x T x V fp32 logits never exist at
    # once; 1: all at once.
    vocab_chunks: int = 8

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    def check(self) -> None:
        """Raise ValueError naming the key when sizes are inconsistent."""
        if not self.head_dim and self.d_model % self.num_heads:
            raise ValueError(f"model.d_model={self.d_model} does not divide by "
                             f"model.num_heads={self.num_heads}; set model.head_dim")
        if self.num_heads % self.kv_heads:
            raise ValueError(f"model.num_heads={self.num_heads} does not divide by "
                             f"model.num_kv_heads={self.kv_heads}")
        if self.style == "llama" and self.head_size % 2:
            raise ValueError(f"RoPE needs an even head size, got {self.head_size}")
        if self.rope_scaling == "llama3" and not (
                0 < self.rope_low_freq_factor < self.rope_high_freq_factor):
            raise ValueError("model.rope_low_freq_factor must be positive and below "
                             "model.rope_high_freq_factor")
        for key in ("vocab_size", "vocab_chunks", "attention_block", "num_layers", "d_model",
                    "num_heads", "mlp_dim", "max_seq_len"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise ValueError(f"model.{key} must be positive, got {getattr(self, key)}")
