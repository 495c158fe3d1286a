"""The GPT-2 family (GPT2LMHeadModel): config translation and parameter names.

GPT-2's Conv1D weights are already (in, out), as ours; its c_attn holds q, k and v side
by side (split on import, joined on export). Names may carry a "transformer." prefix.
"""

from __future__ import annotations

import numpy as np

from train.errors import ConversionError
from train.hf.tensors import Mapping, same

ARCHITECTURE, STYLE = "GPT2LMHeadModel", "gpt2"


def exports(m) -> bool:
    """Whether this family writes our ModelConfig `m`."""
    return m.style == STYLE


def model_config(hf: dict, vocab_size: int) -> dict:
    """Our model.* keys from an HF config.json (vocabulary padded to `vocab_size`)."""
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ConversionError(f"GPT-2 activation {act!r} is not supported (gelu_new only)")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
        raise ConversionError("GPT-2 with scale_attn_by_inverse_layer_idx=true or "
                              "scale_attn_weights=false is not supported (1/sqrt(head size) "
                              "scaling only)")
    D = hf["n_embd"]
    return dict(style=STYLE, vocab_size=vocab_size, num_layers=hf["n_layer"], d_model=D,
                num_heads=hf["n_head"], mlp_dim=hf.get("n_inner") or 4 * D,
                max_seq_len=hf["n_positions"], tie_embeddings=True,
                norm_eps=hf.get("layer_norm_epsilon", 1e-5))


def hf_config(m, vocab_size: int, eos_id, bos_id) -> dict:
    """An HF config.json for our ModelConfig `m`, with the unpadded vocabulary."""
    return {"architectures": [ARCHITECTURE], "model_type": "gpt2",
            "vocab_size": vocab_size, "n_positions": m.max_seq_len, "n_embd": m.d_model,
            "n_layer": m.num_layers, "n_head": m.num_heads, "n_inner": m.mlp_dim,
            "activation_function": "gelu_new", "layer_norm_epsilon": m.norm_eps,
            "tie_word_embeddings": True, "bos_token_id": bos_id, "eos_token_id": eos_id,
            "torch_dtype": "float32"}


def mapping(m) -> Mapping:
    N, H, D = m.num_heads, m.head_size, m.d_model
    h = "h.{l}."

    def qkv(i, shape):  # slice i of c_attn's (in, 3 * out) weight or (3 * out,) bias
        return (lambda x, m: np.split(x, 3, axis=-1)[i].reshape(shape))

    out = {
        "embedding": ("wte.weight", same, same),
        "pos_embedding": ("wpe.weight", same, same),
        "final_norm_scale": ("ln_f.weight", same, same),
        "final_norm_bias": ("ln_f.bias", same, same),
        "blocks/attn_norm_scale": (h + "ln_1.weight", same, same),
        "blocks/attn_norm_bias": (h + "ln_1.bias", same, same),
        "blocks/mlp_norm_scale": (h + "ln_2.weight", same, same),
        "blocks/mlp_norm_bias": (h + "ln_2.bias", same, same),
        "blocks/wo": (h + "attn.c_proj.weight", lambda x, m: x.reshape(N, H, D),
                      lambda x, m: x.reshape(N * H, D)),
        "blocks/o_bias": (h + "attn.c_proj.bias", same, same),
        "blocks/w_in": (h + "mlp.c_fc.weight", same, same),
        "blocks/in_bias": (h + "mlp.c_fc.bias", same, same),
        "blocks/w_out": (h + "mlp.c_proj.weight", same, same),
        "blocks/out_bias": (h + "mlp.c_proj.bias", same, same),
    }
    for i, name in enumerate("qkv"):  # imports only: export joins them (joined_tensors)
        out[f"blocks/w{name}"] = (h + "attn.c_attn.weight", qkv(i, (D, N, H)), None)
        out[f"blocks/{name}_bias"] = (h + "attn.c_attn.bias", qkv(i, (N, H)), None)
    return out


def joined_tensors(m, gather):
    """c_attn: q, k and v side by side, per layer (`gather(name)` -> our host array)."""
    N, H, D, L = m.num_heads, m.head_size, m.d_model, m.num_layers
    w = [gather(f"blocks/w{c}").reshape(L, D, N * H) for c in "qkv"]
    b = [gather(f"blocks/{c}_bias").reshape(L, N * H) for c in "qkv"]
    for i in range(L):
        yield f"h.{i}.attn.c_attn.weight", np.concatenate([x[i] for x in w], axis=1)
        yield f"h.{i}.attn.c_attn.bias", np.concatenate([x[i] for x in b])
