"""The Mixtral family (MixtralForCausalLM): config translation and parameter names,
and the experts' layouts the mixture-of-experts families share (Qwen3-MoE too).

Mixtral is Llama (train/hf/llama.py: attention, norms, RoPE) with every MLP a mixture
of experts: a router (HF gate.weight (E, D); ours (D, E)), softmax over the experts,
the top k renormalised (always), and E SwiGLU experts of width Fe = intermediate_size.
The Hub layout (what transformers 5's save_pretrained writes) has one Linear per
expert: w1 gate and w3 up (Fe, D), w2 down (D, Fe); transformers 5 holds them fused in
memory (mlp.experts.gate_up_proj (E, 2 Fe, D), down_proj (E, D, Fe), router
mlp.gate.weight), which save_pretrained(save_original_format=False) writes: both import.
Ours: w_gate / w_up (E, D, Fe), w_out (E, Fe, D) per layer.
"""

from __future__ import annotations

import numpy as np

from train.errors import ConversionError
from train.hf import llama
from train.hf.llama import LAYER
from train.hf.tensors import Mapping, transposed

ARCHITECTURE = "MixtralForCausalLM"
HUB = LAYER + "block_sparse_moe."
FUSED = LAYER + "mlp."


def exports(m) -> bool:
    """Whether this family writes our ModelConfig `m` (experts, no q/k norms)."""
    return m.style == "llama" and m.moe.enabled and not m.qk_norm and not m.qkv_bias


def check_window(hf: dict, family: str) -> None:
    """Sliding-window attention only where the window holds every position (then it is
    plain causal attention)."""
    window, longest = hf.get("sliding_window"), hf["max_position_embeddings"]
    if window is not None and window < longest:
        raise ConversionError(f"{family} sliding_window={window} (sliding-window attention) "
                              "is not supported; allowed: null or >= "
                              f"max_position_embeddings={longest}")


def check_no_shared_experts(hf: dict, family: str) -> None:
    for key in ("n_shared_experts", "num_shared_experts", "shared_expert_intermediate_size"):
        if hf.get(key):
            raise ConversionError(f"{family} with {key}={hf[key]} (shared experts) is not "
                                  "supported; allowed: 0 or absent")


def moe_keys(hf: dict, family: str, norm_topk_prob: bool, expert_mlp_dim=None,
             defaults: tuple[int, int] = (8, 2)) -> dict:
    """Our model.moe keys from the router keys both families spell alike (the experts'
    count as num_experts or num_local_experts: transformers 5 takes either); `defaults`:
    the family's experts and top k where config.json leaves them out."""
    num_experts = hf.get("num_experts", hf.get("num_local_experts", defaults[0]))
    if num_experts < 1:
        raise ConversionError(f"{family} with {num_experts} experts is not supported "
                              "(allowed: 1 or more)")
    return dict(num_experts=num_experts,
                experts_per_token=hf.get("num_experts_per_tok", defaults[1]),
                expert_mlp_dim=expert_mlp_dim, norm_topk_prob=norm_topk_prob,
                aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)))


def model_config(hf: dict, vocab_size: int) -> dict:
    """Our model.* keys from an HF config.json (vocabulary padded to `vocab_size`)."""
    check_window(hf, "Mixtral")
    if hf.get("router_jitter_noise"):
        raise ConversionError(f"Mixtral router_jitter_noise={hf['router_jitter_noise']} is "
                              "not supported (our router has no noise; allowed: 0; set it "
                              "to 0 in config.json to import the weights without it)")
    check_no_shared_experts(hf, "Mixtral")
    return dict(llama.common_config(hf, vocab_size, "Mixtral", eps=1e-5, theta=1e6),
                mlp_dim=hf["intermediate_size"], moe=moe_keys(hf, "Mixtral", True))


def check_export(m, family: str) -> None:
    if m.moe.shared_experts:
        raise ConversionError(f"{family} has no shared experts; model.moe.shared_experts="
                              f"{m.moe.shared_experts} cannot be exported (0 only)")


def router_hf_config(m) -> dict:
    return {"num_experts_per_tok": m.moe.experts_per_token,
            "router_aux_loss_coef": m.moe.aux_loss_coef, "output_router_logits": False,
            "sliding_window": None}


def hf_config(m, vocab_size: int, eos_id, bos_id) -> dict:
    """An HF config.json for our ModelConfig `m`, with the unpadded vocabulary."""
    check_export(m, "Mixtral")
    if m.moe.first_dense_layers:
        raise ConversionError(f"Mixtral has no dense layers; model.moe.first_dense_layers="
                              f"{m.moe.first_dense_layers} cannot be exported (0 only)")
    if not m.moe.norm_topk_prob:
        raise ConversionError("Mixtral always renormalises the top-k weights; "
                              "model.moe.norm_topk_prob=false cannot be exported (true only)")
    return dict(llama.common_hf_config(m, ARCHITECTURE, "mixtral", vocab_size, eos_id, bos_id),
                intermediate_size=m.expert_width, num_local_experts=m.moe.num_experts,
                router_jitter_noise=0.0, **router_hf_config(m))


def _fused_half(i: int):
    """Gate (i=0) or up (i=1) of a fused gate_up_proj (E, 2 Fe, D) as ours (E, D, Fe)."""
    return lambda x, m: np.split(x, 2, axis=1)[i].transpose(0, 2, 1)


def expert_mapping(hub: str, names: tuple[str, str, str], fused: str) -> Mapping:
    """moe_blocks/ router and experts. The Hub layout (imported and exported): the
    router `hub`gate.weight and one expert's gate, up and down Linear weights
    `hub`experts.{e}.<names>.weight; the fused layout (imported only): the router
    `fused`gate.weight, `fused`experts.gate_up_proj and down_proj."""
    gate, up, down = (f"{hub}experts.{{e}}.{n}.weight" for n in names)
    router = [(hub + "gate.weight", transposed, transposed)]
    if fused != hub:
        router.append((fused + "gate.weight", transposed, None))
    return {
        "moe_blocks/router": router,
        "moe_blocks/w_gate": [(gate, transposed, transposed),
                              (fused + "experts.gate_up_proj", _fused_half(0), None)],
        "moe_blocks/w_up": [(up, transposed, transposed),
                            (fused + "experts.gate_up_proj", _fused_half(1), None)],
        "moe_blocks/w_out": [(down, transposed, transposed),
                             (fused + "experts.down_proj", lambda x, m: x.transpose(0, 2, 1),
                              None)],
    }


def mapping(m) -> Mapping:
    return {**llama.common_mapping(m, ("moe_blocks/",)),
            **expert_mapping(HUB, ("w1", "w3", "w2"), FUSED)}


def joined_tensors(m, gather):
    """Tensors HF stores joined that we keep apart: none in the Hub layout."""
    return iter(())
