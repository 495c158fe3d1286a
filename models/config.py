"""Hyperparameters of the decoder-only Transformer family."""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    """Mixture-of-experts MLPs (Llama style only). num_experts=0: a dense model."""

    num_experts: int = 0
    experts_per_token: int = 2  # top-k
    expert_mlp_dim: Optional[int] = None  # each expert's width; None: model.mlp_dim
    # Renormalise the chosen experts' softmax weights to sum to 1 (Mixtral always;
    # Qwen3-MoE by its norm_topk_prob).
    norm_topk_prob: bool = True
    # Always-on experts (DeepSeek style, ungated): one dense SwiGLU MLP this many
    # experts wide beside the routed ones; 0: none.
    shared_experts: int = 0
    first_dense_layers: int = 0  # the first K layers keep a dense MLP (model.mlp_dim)
    # The grouped matmul: auto = the megablox Pallas kernel on TPUs (its backward pass
    # is grouped too; XLA's ragged_dot gradient is computed densely per expert there),
    # jax.lax.ragged_dot elsewhere; megablox off TPUs runs interpreted (tests only).
    kernel: Literal["auto", "ragged_dot", "megablox"] = "auto"
    # Run the experts over the sorted (token, expert) rows in this many chunks, forward
    # and backward (models/experts.py): a layer's expert transients (gate, up and their
    # gradients, rows x expert width) shrink by this factor; the backward pass
    # recomputes the experts' outputs, which under remat=full replaces remat's own
    # recomputation. 1: all rows at once.
    row_chunks: int = 1
    aux_loss_coef: float = 0.0  # Mixtral's load-balancing loss (transformers' form)
    router_z_loss_coef: float = 0.0  # mean over tokens of logsumexp(router logits)^2

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0


# LoRA targets: attention's query, key, value and output projections and the dense
# MLP's (Llama's gate, up and down; GPT-2's up and down)
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters on the layers' projections, the base weights frozen
    (models/lora.py). rank=0: off, full fine-tuning."""

    rank: int = 0
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on the adapters' input, in training
    targets: list = dataclasses.field(default_factory=lambda: list(LORA_TARGETS))
    # the frozen base weights' dtype (bfloat16 halves their memory); null: param_dtype
    base_dtype: Optional[Literal["float32", "bfloat16"]] = None

    @property
    def enabled(self) -> bool:
        return self.rank > 0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """One decoder-only Transformer. `style` picks the GPT-2 or the Llama recipe.

    gpt2:  learned positions, LayerNorm (with bias), GELU MLP, biases on projections.
    llama: RoPE, RMSNorm, SwiGLU MLP, grouped-query attention, no biases.
    """

    style: Literal["gpt2", "llama"] = "llama"
    # Where the initial weights come from (hf:DIR, an export or a run; None: a fresh
    # init). Read by the trainer (train/init_from.py), which also takes the shapes below
    # from there; the model itself never looks at it.
    init_from: Optional[str] = None
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
    remat: Literal["none", "full", "save_dots", "save_ring"] = "none"
    # auto: cuDNN on GPUs (bf16/fp16), splash on TPUs, blocked elsewhere. blocked: exact
    # attention a block of `attention_block` queries at a time (scores held: B x N x block
    # x T, not x T). splash: the Pallas TPU kernel (interpreted, slowly, off TPUs).
    attention: Literal["auto", "xla", "cudnn", "blocked", "splash"] = "auto"
    attention_block: int = 512
    # With the length split over a context axis (fsdp_cp rules): all_gather (every
    # shard gathers all keys and values) or ring (key/value blocks passed around the
    # shards, none holding all of them); models/context.py.
    context_attention: Literal["all_gather", "ring"] = "all_gather"
    # The training loss computes the logits this many vocabulary slices at a time (the
    # largest divisor of vocab_size up to this), so B x T x V fp32 logits never exist at
    # once; 1: all at once.
    vocab_chunks: int = 8
    qk_norm: bool = False  # per-head RMSNorm of queries and keys before RoPE (Qwen3)
    qkv_bias: bool = False  # biases on the query, key and value projections (Qwen2)
    moe: MoeConfig = dataclasses.field(default_factory=MoeConfig)
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)

    @property
    def base_param_dtype(self) -> str:
        """The dtype of every parameter but the LoRA adapters."""
        return (self.lora.base_dtype or self.param_dtype) if self.lora.enabled \
            else self.param_dtype

    @property
    def expert_width(self) -> int:
        return self.moe.expert_mlp_dim or self.mlp_dim

    @property
    def moe_layers(self) -> int:
        """How many layers have a mixture-of-experts MLP (the last ones)."""
        return self.num_layers - self.moe.first_dense_layers if self.moe.enabled else 0

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
        self._check_moe()
        self._check_lora()
        for key in ("vocab_size", "vocab_chunks", "attention_block", "num_layers", "d_model",
                    "num_heads", "mlp_dim", "max_seq_len"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise ValueError(f"model.{key} must be positive, got {getattr(self, key)}")

    def _check_moe(self) -> None:
        m = self.moe
        if self.style == "gpt2":
            set_keys = [f"model.moe.{f.name}" for f in dataclasses.fields(m)
                        if getattr(m, f.name) != f.default] + ["model.qk_norm"] * self.qk_norm
            set_keys += ["model.qkv_bias"] * self.qkv_bias
            if set_keys:
                raise ValueError(f"{set_keys[0]} is for model.style=llama only (GPT-2 models "
                                 "are dense, without q/k norms, with biases everywhere)")
        if m.num_experts < 0:
            raise ValueError(f"model.moe.num_experts must be >= 0 (0: dense), got "
                             f"{m.num_experts}")
        if not m.enabled:
            return
        if not 1 <= m.experts_per_token <= m.num_experts:
            raise ValueError(f"model.moe.experts_per_token={m.experts_per_token} must be "
                             f"between 1 and model.moe.num_experts={m.num_experts}")
        if not 0 <= m.first_dense_layers < self.num_layers:
            raise ValueError(f"model.moe.first_dense_layers={m.first_dense_layers} must be "
                             f"in [0, model.num_layers={self.num_layers})")
        if m.row_chunks < 1:
            raise ValueError(f"model.moe.row_chunks must be >= 1 (1: no chunks), got "
                             f"{m.row_chunks}")
        for key in ("shared_experts", "aux_loss_coef", "router_z_loss_coef"):
            if getattr(m, key) < 0:
                raise ValueError(f"model.moe.{key} must be >= 0, got {getattr(m, key)}")
        if m.expert_mlp_dim is not None and m.expert_mlp_dim <= 0:
            raise ValueError(f"model.moe.expert_mlp_dim must be positive, got "
                             f"{m.expert_mlp_dim}")

    def _check_lora(self) -> None:
        lo = self.lora
        if lo.rank < 0:
            raise ValueError(f"model.lora.rank must be >= 0 (0: off), got {lo.rank}")
        if not lo.enabled:
            return
        unknown = [t for t in lo.targets if t not in LORA_TARGETS]
        if unknown or not lo.targets:
            raise ValueError(f"model.lora.targets has {unknown or 'nothing'}; allowed: "
                             f"{', '.join(LORA_TARGETS)}")
        if self.style == "gpt2" and "gate" in lo.targets:
            raise ValueError("model.lora.targets names 'gate', which a GPT-2 model has not "
                             "(its MLP is up and down); leave it out")
        if not 0.0 <= lo.dropout < 1.0:
            raise ValueError(f"model.lora.dropout={lo.dropout} must be in [0, 1)")
        if lo.alpha <= 0:
            raise ValueError(f"model.lora.alpha must be positive, got {lo.alpha}")
