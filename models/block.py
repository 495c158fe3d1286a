"""One Transformer layer, dense or mixture-of-experts: the block every forward runs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import jax

from models import layers
from models.config import ModelConfig
from models.layers import Constrain
from models.moe import moe_mlp

if TYPE_CHECKING:
    from models.cache import KVCache


def block(cfg: ModelConfig, constrain: Constrain, p: Mapping[str, jax.Array],
          x_BTD: jax.Array, positions_BT: jax.Array,
          segment_ids_BT: jax.Array | None = None, cache: KVCache | None = None,
          layer: int | jax.Array = 0, key: jax.Array | None = None
          ) -> tuple[jax.Array, KVCache | None, dict[str, jax.Array]]:
    """One pre-norm Transformer layer; `p` holds this layer's parameters (with a
    "router": a mixture-of-experts layer). Training, evaluation, prefill and decode all
    run it; with a KV cache (the last two) it also returns the cache with this layer's
    keys and values written in. Last, the MoE router's sums (models/moe.py; {} if dense).
    `key` draws the LoRA adapters' dropout (training only)."""
    with jax.named_scope("attention"):
        h_BTD = layers.norm(x_BTD, p["attn_norm_scale"], p.get("attn_norm_bias"), cfg.norm_eps)
        out_BTD, cache = layers.attention(cfg, p, h_BTD, positions_BT, constrain,
                                          segment_ids_BT, cache, layer,
                                          None if key is None else jax.random.fold_in(key, 0))
        x_BTD = constrain(x_BTD + out_BTD, ("batch", "act_length", "act_embed"))
    with jax.named_scope("mlp"):
        h_BTD = layers.norm(x_BTD, p["mlp_norm_scale"], p.get("mlp_norm_bias"), cfg.norm_eps)
        stats: dict[str, jax.Array] = {}
        if "router" in p:
            out_BTD, stats = moe_mlp(cfg, p, h_BTD, constrain)
        else:
            out_BTD = layers.mlp(cfg, p, h_BTD, constrain,
                                 None if key is None else jax.random.fold_in(key, 1))
        x_BTD = constrain(x_BTD + out_BTD, ("batch", "act_length", "act_embed"))
    return x_BTD, cache, stats
