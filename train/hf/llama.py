"""The Llama family (LlamaForCausalLM): config translation and parameter names, and
what the Llama-like families (Mixtral, Qwen3-MoE) share with it: the config keys they
spell as Llama does, RoPE, and the embedding, norm and attention names.

HF Linear weights are (out, in); ours are (in, ...): q (D, N, H), k/v (D, K, H),
o (N, H, D), MLP in (D, F), out (F, D), head (D, V). Both use the half-split RoPE
layout, so no permutation of q/k is needed.
"""

from __future__ import annotations

from train.errors import ConversionError
from train.hf.tensors import Mapping, same, transposed

ARCHITECTURE = "LlamaForCausalLM"
LAYER = "model.layers.{l}."


def exports(m) -> bool:
    """Whether this family writes our ModelConfig `m`."""
    return m.style == "llama" and not m.moe.enabled and not m.qk_norm and not m.qkv_bias


def rope_keys(hf: dict, default_theta: float = 10000.0) -> dict:
    """Our RoPE keys from HF's rope_theta / rope_scaling (transformers 4) or
    rope_parameters (transformers 5)."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = hf.get("rope_theta") or params.get("rope_theta") or default_theta
    kind = params.get("rope_type", params.get("type", "default"))
    out = {"rope_theta": float(theta)}
    if kind == "llama3":
        out.update(rope_scaling="llama3", rope_factor=float(params["factor"]),
                   rope_low_freq_factor=float(params["low_freq_factor"]),
                   rope_high_freq_factor=float(params["high_freq_factor"]),
                   rope_original_max_len=int(params["original_max_position_embeddings"]))
    elif kind != "default":
        raise ConversionError(f"RoPE scaling {kind!r} is not supported (supported: none, "
                              "llama3)")
    return out


def common_config(hf: dict, vocab_size: int, family: str, eps: float = 1e-6,
                  theta: float = 10000.0) -> dict:
    """Our model.* keys (all but the MLP's) from the config.json keys a Llama-like
    family spells as Llama does; `eps` and `theta`: the family's defaults."""
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ConversionError(f"{family} with {key}=true is not supported (false only)")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{family} hidden_act={hf['hidden_act']!r} is not supported "
                              "(silu only)")
    D, N = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or D // N
    return dict(style="llama", vocab_size=vocab_size, num_layers=hf["num_hidden_layers"],
                d_model=D, num_heads=N, num_kv_heads=hf.get("num_key_value_heads") or N,
                head_dim=None if head_dim == D // N else head_dim,
                max_seq_len=hf["max_position_embeddings"],
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                norm_eps=hf.get("rms_norm_eps", eps), **rope_keys(hf, theta))


def common_hf_config(m, architecture: str, model_type: str, vocab_size: int, eos_id,
                     bos_id) -> dict:
    """The config.json keys a Llama-like family spells as Llama does (no MLP sizes)."""
    out = {"architectures": [architecture], "model_type": model_type,
           "vocab_size": vocab_size, "hidden_size": m.d_model,
           "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads,
           "num_key_value_heads": m.kv_heads, "head_dim": m.head_size,
           "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm_eps,
           "hidden_act": "silu", "rope_theta": m.rope_theta,
           "tie_word_embeddings": m.tie_embeddings,
           "bos_token_id": bos_id, "eos_token_id": eos_id, "torch_dtype": "float32"}
    if m.rope_scaling == "llama3":
        out["rope_scaling"] = {"rope_type": "llama3", "factor": m.rope_factor,
                               "low_freq_factor": m.rope_low_freq_factor,
                               "high_freq_factor": m.rope_high_freq_factor,
                               "original_max_position_embeddings": m.rope_original_max_len}
    return out


def model_config(hf: dict, vocab_size: int) -> dict:
    """Our model.* keys from an HF config.json (vocabulary padded to `vocab_size`)."""
    return dict(common_config(hf, vocab_size, "Llama"), mlp_dim=hf["intermediate_size"])


def hf_config(m, vocab_size: int, eos_id, bos_id) -> dict:
    """An HF config.json for our ModelConfig `m`, with the unpadded vocabulary."""
    return dict(common_hf_config(m, ARCHITECTURE, "llama", vocab_size, eos_id, bos_id),
                intermediate_size=m.mlp_dim, attention_bias=False, mlp_bias=False)


def common_mapping(m, stacks: tuple[str, ...]) -> Mapping:
    """The names a Llama-like family shares with Llama: the embedding, the final norm,
    an untied head, and in each of our layer stacks (`stacks`: "blocks/",
    "moe_blocks/") the two norms and the attention projections."""
    N, K, H, D = m.num_heads, m.kv_heads, m.head_size, m.d_model
    at = LAYER + "self_attn."
    out = {"embedding": ("model.embed_tokens.weight", same, same),
           "final_norm_scale": ("model.norm.weight", same, same)}
    if not m.tie_embeddings:
        out["head"] = ("lm_head.weight", transposed, transposed)
    for s in stacks:
        out.update({
            s + "attn_norm_scale": (LAYER + "input_layernorm.weight", same, same),
            s + "mlp_norm_scale": (LAYER + "post_attention_layernorm.weight", same, same),
            s + "wq": (at + "q_proj.weight", lambda x, m: x.T.reshape(D, N, H),
                       lambda x, m: x.reshape(D, N * H).T),
            s + "wk": (at + "k_proj.weight", lambda x, m: x.T.reshape(D, K, H),
                       lambda x, m: x.reshape(D, K * H).T),
            s + "wv": (at + "v_proj.weight", lambda x, m: x.T.reshape(D, K, H),
                       lambda x, m: x.reshape(D, K * H).T),
            s + "wo": (at + "o_proj.weight", lambda x, m: x.T.reshape(N, H, D),
                       lambda x, m: x.reshape(N * H, D).T),
        })
    return out


def mlp_mapping(stack: str = "blocks/") -> Mapping:
    """A stack's dense SwiGLU MLP under Llama's names."""
    return {stack + "w_gate": (LAYER + "mlp.gate_proj.weight", transposed, transposed),
            stack + "w_up": (LAYER + "mlp.up_proj.weight", transposed, transposed),
            stack + "w_out": (LAYER + "mlp.down_proj.weight", transposed, transposed)}


def mapping(m) -> Mapping:
    return {**common_mapping(m, ("blocks/",)), **mlp_mapping()}


def joined_tensors(m, gather):
    """Tensors HF stores joined that we keep apart: none for Llama."""
    return iter(())
