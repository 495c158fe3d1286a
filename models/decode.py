"""The Transformer run incrementally with a KV cache, for generation.

A batch of prompts is left-padded to a common length P: every sequence writes its next
token into the same cache slot, so one scalar `index` says where the new tokens go. A
sequence's `pad_B` leading slots are padding: no query attends to them, and its
positions count from its first real token, so a padded prompt produces what it would
alone. The cache holds keys and values for all layers, (L, B, S, K, H) each, in the
compute dtype; activations and the cache carry logical axes (batch over data/fsdp,
kv heads over model, as in training).

Shapes: L layers, B batch, T new tokens, S cache length, N query heads, K kv heads,
G = N / K, H head size, D d_model, V vocab.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from models import layers
from models.attention import dot_f32
from models.transformer import Transformer

CACHE_AXES = ("layers", "batch", "act_length", "act_kv_heads", None)


def init_cache(model: Transformer, batch: int, length: int) -> dict[str, jax.Array]:
    """Zero keys and values for `batch` sequences of up to `length` tokens."""
    cfg = model.cfg
    shape = (cfg.num_layers, batch, length, cfg.kv_heads, cfg.head_size)
    zeros = jnp.zeros(shape, jnp.dtype(cfg.dtype))
    return {"k": model.constrain(zeros, CACHE_AXES), "v": model.constrain(zeros, CACHE_AXES)}


def cached_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
                     slots_BT: jax.Array, pad_B: jax.Array) -> jax.Array:
    """Each query (at cache slot slots_BT) attends to the slots from its sequence's first
    real one (pad_B) up to its own; fp32 scores, output in q's dtype."""
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    scores_BKGTS = dot_f32("btkgh,bskh->bkgts", q_BTKGH, k_BSKH) / jnp.sqrt(jnp.float32(H))
    slot_S = jnp.arange(S, dtype=jnp.int32)
    keep_BTS = ((slot_S[None, None, :] <= slots_BT[:, :, None])
                & (slot_S[None, None, :] >= pad_B[:, None, None]))
    scores_BKGTS = jnp.where(keep_BTS[:, None, None], scores_BKGTS, jnp.finfo(jnp.float32).min)
    probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(v_BSKH.dtype)
    out_BTKGH = jnp.einsum("bkgts,bskh->btkgh", probs_BKGTS, v_BSKH)
    return out_BTKGH.reshape(B, T, N, H)


def forward(model: Transformer, tokens_BT: jax.Array, cache: dict[str, jax.Array],
            index: jax.Array, pad_B: jax.Array, *, all_logits: bool = False
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Run tokens_BT, which occupy cache slots [index, index + T), through the model.

    Returns the fp32 logits of the last position (B, V) (of every position (B, T, V)
    with all_logits) and the cache with these tokens' keys and values written in.
    """
    cfg, constrain = model.cfg, model.constrain
    dt = jnp.dtype(cfg.dtype)
    B, T = tokens_BT.shape
    slots_BT = index + jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    positions_BT = jnp.maximum(slots_BT - pad_B[:, None], 0)
    x_BTD = layers.embed(model.embedding.get_value(), tokens_BT, dt, constrain)
    if cfg.style == "gpt2":
        x_BTD = x_BTD + layers.embed(model.pos_embedding.get_value(), positions_BT, dt,
                                     constrain, ("length", "embed"))
    x_BTD = constrain(x_BTD, ("batch", "act_length", "act_embed"))
    axes = model.blocks.layer_axes()

    def layer(carry, xs):
        x_BTD, k_LBSKH, v_LBSKH = carry
        p, i = xs
        p = {k: layers.for_compute(v, axes[k], dt, constrain) if v.ndim >= 2 else v
             for k, v in p.items()}
        h_BTD = layers.norm(x_BTD, p["attn_norm_scale"], p.get("attn_norm_bias"), cfg.norm_eps)
        q_BTNH, k_BTKH, v_BTKH = layers.qkv(cfg, p, h_BTD, positions_BT, constrain)
        at = (i, 0, index, 0, 0)
        k_LBSKH = jax.lax.dynamic_update_slice(k_LBSKH, k_BTKH.astype(dt)[None], at)
        v_LBSKH = jax.lax.dynamic_update_slice(v_LBSKH, v_BTKH.astype(dt)[None], at)
        k_LBSKH, v_LBSKH = constrain(k_LBSKH, CACHE_AXES), constrain(v_LBSKH, CACHE_AXES)
        out_BTNH = cached_attention(q_BTNH, k_LBSKH[i], v_LBSKH[i], slots_BT, pad_B)
        x_BTD = x_BTD + layers.attention_out(p, out_BTNH, constrain)
        x_BTD = constrain(x_BTD, ("batch", "act_length", "act_embed"))
        h_BTD = layers.norm(x_BTD, p["mlp_norm_scale"], p.get("mlp_norm_bias"), cfg.norm_eps)
        x_BTD = x_BTD + layers.mlp(cfg, p, h_BTD, constrain)
        x_BTD = constrain(x_BTD, ("batch", "act_length", "act_embed"))
        return (x_BTD, k_LBSKH, v_LBSKH), None

    params_L = model.blocks.stacked()
    layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
    (x_BTD, k, v), _ = jax.lax.scan(layer, (x_BTD, cache["k"], cache["v"]),
                                    (params_L, layer_ids))
    if not all_logits:
        x_BTD = x_BTD[:, -1:]
    bias = model.final_norm_bias.get_value() if cfg.style == "gpt2" else None
    x_BTD = layers.norm(x_BTD, model.final_norm_scale.get_value(), bias, cfg.norm_eps)
    w_DV = model.head_weight().astype(dt)
    logits_BTV = jnp.einsum("btd,dv->btv", x_BTD, w_DV, preferred_element_type=jnp.float32)
    logits_BTV = constrain(logits_BTV, ("batch", "act_length", "act_vocab"))
    return (logits_BTV if all_logits else logits_BTV[:, 0]), {"k": k, "v": v}


def inference_params(params: Any, dtype) -> Any:
    """The params (nnx.State) with every matrix cast once to the compute dtype, as the
    forward pass casts them on each use (so the results are the same): per-token decode
    then reads bf16 weights instead of reading fp32 and casting. Matrices are the
    stacked layer arrays of rank >= 3 and the other arrays of rank >= 2; norm scales
    and biases keep their dtype."""
    def cast(path, x):
        layered = any(getattr(k, "key", None) == "blocks" for k in path)
        if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim >= (3 if layered else 2):
            return x.astype(dtype)
        return x
    return jax.tree_util.tree_map_with_path(cast, params)


def cache_bytes(cache: Any) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
