"""The Qwen3-MoE family (Qwen3MoeForCausalLM): config translation and parameter names.

Qwen3-MoE is Mixtral (train/hf/mixtral.py: router and experts, Hub and fused layouts)
with Qwen3's per-head RMSNorm of queries and keys (self_attn.q_norm / k_norm (H,),
before RoPE: our model.qk_norm), the top-k renormalised only with norm_topk_prob, the
experts of width moe_intermediate_size, and optionally dense layers (mlp_only_layers,
width intermediate_size, Llama's MLP names): we hold the first K layers dense
(model.moe.first_dense_layers), so only a prefix 0..K-1 of dense layers converts.
"""

from __future__ import annotations

from train.errors import ConversionError
from train.hf import llama, mixtral, qwen3
from train.hf.llama import LAYER
from train.hf.tensors import Mapping

ARCHITECTURE = "Qwen3MoeForCausalLM"
MLP = LAYER + "mlp."  # the experts' names, Hub and fused layouts alike


def exports(m) -> bool:
    """Whether this family writes our ModelConfig `m` (experts and q/k norms)."""
    return m.style == "llama" and m.moe.enabled and m.qk_norm and not m.qkv_bias


def _dense_layers(hf: dict) -> int:
    """K, when the dense layers are exactly the first K (fewer than all)."""
    L, step = hf["num_hidden_layers"], hf.get("decoder_sparse_step", 1)
    only = set(hf.get("mlp_only_layers") or [])
    if step < 1:
        raise ConversionError(f"Qwen3-MoE decoder_sparse_step={step} is not supported "
                              "(allowed: 1, or a step whose dense layers come first)")
    dense = [i for i in range(L) if i in only or (i + 1) % step]
    if dense != list(range(len(dense))) or len(dense) == L:
        raise ConversionError(
            f"Qwen3-MoE with dense layers {dense} (mlp_only_layers="
            f"{hf.get('mlp_only_layers')}, decoder_sparse_step={step}) is not supported; "
            "allowed: the first K < num_hidden_layers layers dense (mlp_only_layers="
            "[0, ..., K-1], decoder_sparse_step=1)")
    return len(dense)


def model_config(hf: dict, vocab_size: int) -> dict:
    """Our model.* keys from an HF config.json (vocabulary padded to `vocab_size`)."""
    if hf.get("use_sliding_window"):
        mixtral.check_window(hf, "Qwen3-MoE with use_sliding_window=true:")
    mixtral.check_no_shared_experts(hf, "Qwen3-MoE")
    moe = mixtral.moe_keys(hf, "Qwen3-MoE", bool(hf.get("norm_topk_prob", False)),
                           hf["moe_intermediate_size"], defaults=(128, 8))
    return dict(llama.common_config(hf, vocab_size, "Qwen3-MoE"), qk_norm=True,
                mlp_dim=hf["intermediate_size"],
                moe=dict(moe, first_dense_layers=_dense_layers(hf)))


def hf_config(m, vocab_size: int, eos_id, bos_id) -> dict:
    """An HF config.json for our ModelConfig `m`, with the unpadded vocabulary."""
    mixtral.check_export(m, "Qwen3-MoE")
    return dict(llama.common_hf_config(m, ARCHITECTURE, "qwen3_moe", vocab_size, eos_id,
                                       bos_id),
                intermediate_size=m.mlp_dim, moe_intermediate_size=m.expert_width,
                num_experts=m.moe.num_experts, norm_topk_prob=m.moe.norm_topk_prob,
                mlp_only_layers=list(range(m.moe.first_dense_layers)), decoder_sparse_step=1,
                attention_bias=False, use_sliding_window=False,
                **mixtral.router_hf_config(m))


def mapping(m) -> Mapping:
    dense = m.moe.first_dense_layers > 0  # the first layers: blocks/, Llama's MLP names
    stacks = ("blocks/", "moe_blocks/") if dense else ("moe_blocks/",)
    return {**llama.common_mapping(m, stacks), **(llama.mlp_mapping() if dense else {}),
            **mixtral.expert_mapping(MLP, ("gate_proj", "up_proj", "down_proj"), MLP),
            **qwen3.qk_norm_mapping(stacks)}


def joined_tensors(m, gather):
    """Tensors HF stores joined that we keep apart: none in the Hub layout."""
    return iter(())
