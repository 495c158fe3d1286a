"""Flax NNX decoder-only Transformer (GPT-2 and Llama styles).

Every parameter is an `nnx.Param` with `logical_axes` metadata; the layers' parameters
are stacked along a leading "layers" axis so one `lax.scan` runs them all (compile time
independent of depth). The model never sees a mesh: activations are passed through the
`constrain` callable the caller provides, with their logical axes. One forward path:
training and evaluation call it without a KV cache, prefill and decode (`extend`) with one.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from models import head, layers, lora, quantize
from models.block import block
from models.cache import KVCache, init_cache
from models.config import ModelConfig
from models.layers import Constrain
from models.moe import aux_losses

_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # as full, but keep ring attention's output and log-sum-exp (models/context.py): the
    # recomputed forward then sends no key/value blocks round the ring
    "save_ring": jax.checkpoint_policies.save_only_these_names("ring_out"),
}


def _param(key, shape, axes, std, dtype) -> nnx.Param:
    if std == 0.0:
        value = jnp.zeros(shape, dtype)
    elif std == 1.0 and key is None:
        value = jnp.ones(shape, dtype)
    else:
        value = std * jax.random.normal(key, shape, dtype)
    return nnx.Param(value, logical_axes=axes)


def _cast_here(w: jax.Array, dtype, layer) -> jax.Array:
    """A layer's weight that is about to be cast to `dtype`, scaled by a 1.0 made from the
    layer index: a cast that depends on the loop's step stays in the layer loop. XLA
    otherwise moves the cast in front of the weight's slicing and out of the loop, casting
    every layer's weights at once and keeping that copy through the backward loop too
    (docs/preflight.md, item 11). The scaling fuses into the cast; without a cast there is
    nothing to hoist and the weight is returned as it is."""
    if w.dtype == dtype:
        return w
    return w * (jnp.asarray(layer) >= 0).astype(w.dtype)


class StackedBlocks(nnx.Module):
    """Consecutive layers' parameters, each with a leading "layers" axis of size
    `num_layers`, starting at layer `first`; `moe`: mixture-of-experts MLPs."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, num_layers: int | None = None,
                 first: int = 0, moe: bool = False):
        L, D, N, K, H, F = (num_layers or cfg.num_layers, cfg.d_model, cfg.num_heads,
                            cfg.kv_heads, cfg.head_size, cfg.mlp_dim)
        self.num_layers, self.first, self.moe = L, first, moe
        pd, std = jnp.dtype(cfg.base_param_dtype), cfg.init_std
        # GPT-2: residual projections scaled by the whole model's depth
        out_std = std / math.sqrt(2 * cfg.num_layers)
        gpt2 = cfg.style == "gpt2"
        p = functools.partial(_param, dtype=pd)
        self.attn_norm_scale = p(None, (L, D), ("layers", "vector"), 1.0)
        self.mlp_norm_scale = p(None, (L, D), ("layers", "vector"), 1.0)
        self.wq = p(rngs.params(), (L, D, N, H), ("layers", "embed", "heads", "head_dim"), std)
        self.wk = p(rngs.params(), (L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), std)
        self.wv = p(rngs.params(), (L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), std)
        self.wo = p(rngs.params(), (L, N, H, D), ("layers", "heads", "head_dim", "embed"), out_std)
        if cfg.qk_norm:
            self.q_norm_scale = p(None, (L, H), ("layers", "head_dim"), 1.0)
            self.k_norm_scale = p(None, (L, H), ("layers", "head_dim"), 1.0)
        if moe:
            self._experts(cfg, rngs, p, out_std)
        else:
            self.w_out = p(rngs.params(), (L, F, D), ("layers", "mlp", "embed"), out_std)
        if gpt2 or cfg.qkv_bias:
            self.q_bias = p(None, (L, N, H), ("layers", "heads", "head_dim"), 0.0)
            self.k_bias = p(None, (L, K, H), ("layers", "kv_heads", "head_dim"), 0.0)
            self.v_bias = p(None, (L, K, H), ("layers", "kv_heads", "head_dim"), 0.0)
        if gpt2:
            self.attn_norm_bias = p(None, (L, D), ("layers", "vector"), 0.0)
            self.mlp_norm_bias = p(None, (L, D), ("layers", "vector"), 0.0)
            self.o_bias = p(None, (L, D), ("layers", "vector"), 0.0)
            self.w_in = p(rngs.params(), (L, D, F), ("layers", "embed", "mlp"), std)
            self.in_bias = p(None, (L, F), ("layers", "mlp"), 0.0)
            self.out_bias = p(None, (L, D), ("layers", "vector"), 0.0)
        elif not moe:
            self.w_gate = p(rngs.params(), (L, D, F), ("layers", "embed", "mlp"), std)
            self.w_up = p(rngs.params(), (L, D, F), ("layers", "embed", "mlp"), std)

    def _experts(self, cfg: ModelConfig, rngs: nnx.Rngs, p, out_std: float) -> None:
        """The router (L, D, E), the experts' SwiGLU weights (L, E, D, F) and (L, E, F, D),
        and the shared experts' dense MLP (width shared_experts x F)."""
        L, D, E, F, std = self.num_layers, cfg.d_model, cfg.moe.num_experts, cfg.expert_width, \
            cfg.init_std
        expert_in = ("layers", "experts", "expert_embed", "mlp")
        self.router = p(rngs.params(), (L, D, E), ("layers", "embed", None), std)
        self.w_gate = p(rngs.params(), (L, E, D, F), expert_in, std)
        self.w_up = p(rngs.params(), (L, E, D, F), expert_in, std)
        self.w_out = p(rngs.params(), (L, E, F, D), ("layers", "experts", "mlp", "expert_embed"),
                       out_std)
        if cfg.moe.shared_experts:
            S = cfg.moe.shared_experts * F
            self.shared_gate = p(rngs.params(), (L, D, S), ("layers", "embed", "mlp"), std)
            self.shared_up = p(rngs.params(), (L, D, S), ("layers", "embed", "mlp"), std)
            self.shared_out = p(rngs.params(), (L, S, D), ("layers", "mlp", "embed"), out_std)

    def add_adapters(self, cfg: ModelConfig, key: jax.Array) -> None:
        """LoRA adapters (A, B) beside the weights this stack adapts (models/lora.py)."""
        for i, name in enumerate(lora.adapted(cfg, self.moe)):
            a, b = lora.adapters(jax.random.fold_in(key, i), name, getattr(self, name),
                                 cfg.lora.rank, jnp.dtype(cfg.param_dtype))
            setattr(self, name + lora.A, a)
            setattr(self, name + lora.B, b)

    def stacked(self) -> dict[str, jax.Array]:
        return {name: var.get_value() for name, var in vars(self).items()
                if isinstance(var, nnx.Param)}

    def layer_axes(self) -> dict[str, tuple[str | None, ...]]:
        """Each parameter's logical axes without the leading "layers" axis."""
        return {name: tuple(var.get_metadata()["logical_axes"][1:])
                for name, var in vars(self).items() if isinstance(var, nnx.Param)}

    def __call__(self, cfg: ModelConfig, constrain: Constrain, x_BTD: jax.Array,
                 positions_BT: jax.Array, segment_ids_BT: jax.Array | None = None,
                 cache: KVCache | None = None, dropout_key: jax.Array | None = None
                 ) -> tuple[jax.Array, KVCache | None, dict[str, jax.Array]]:
        """These layers on x_BTD (one `lax.scan` over the stacked parameters, or a Python
        loop); with a KV cache, each layer writes its keys and values into it. Also
        returns each layer's MoE router sums, stacked (L, ...) ({} for dense layers).
        `dropout_key`: the LoRA adapters' dropout (training), folded with each layer."""
        axes, dt = self.layer_axes(), jnp.dtype(cfg.dtype)

        def body(p, x_BTD, layer, cache):
            # weight matrices in the compute dtype, gathered (the experts' inside their
            # layer, models/moe.py); norm scales stay fp32. An int8 weight moves as int8
            # and is turned into the compute dtype here, times its scales (quantize.py)
            p, scales = quantize.split_scales(p)
            p = {k: v if v.ndim < 2 else layers.for_compute(
                     _cast_here(v, dt, layer), axes[k], v.dtype if k in scales else dt,
                     constrain, gather="experts" not in axes[k])
                 for k, v in p.items()}
            p |= {k: quantize.dequantize(p[k], s, dt) for k, s in scales.items()}
            key = None if dropout_key is None else jax.random.fold_in(dropout_key, layer)
            return block(cfg, constrain, p, x_BTD, positions_BT, segment_ids_BT, cache, layer,
                         key)

        if cfg.remat != "none":
            body = jax.checkpoint(body, policy=_REMAT_POLICIES[cfg.remat],
                                  prevent_cse=not cfg.scan_layers)
        params_L = self.stacked()
        layer_L = self.first + jnp.arange(self.num_layers, dtype=jnp.int32)
        if cfg.scan_layers:
            def step(carry, xs):
                x_BTD, cache, stats = body(xs[0], carry[0], xs[1], carry[1])
                return (x_BTD, cache), stats

            (x_BTD, cache), stats_L = jax.lax.scan(step, (x_BTD, cache), (params_L, layer_L))
            return x_BTD, cache, stats_L
        per_layer = []
        for i in range(self.num_layers):
            x_BTD, cache, stats = body({k: v[i] for k, v in params_L.items()}, x_BTD,
                                       self.first + i, cache)
            per_layer.append(stats)
        return x_BTD, cache, jax.tree.map(lambda *s: jnp.stack(s), *per_layer)


class Transformer(nnx.Module):
    """tokens (B, T) int -> logits (B, T, V) float32. Packed batches also pass each
    token's position within its document and its segment (document) id, so attention
    stays inside documents."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, constrain: Constrain | None = None):
        cfg.check()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size is not set (the training config fills it in "
                             "from the data's tokenizer)")
        self.cfg = cfg
        self.constrain = constrain or layers.no_constraint
        pd, std = jnp.dtype(cfg.base_param_dtype), cfg.init_std
        V, D = cfg.vocab_size, cfg.d_model
        self.embedding = _param(rngs.params(), (V, D), ("vocab", "embed"), std, pd)
        if cfg.style == "gpt2":
            self.pos_embedding = _param(rngs.params(), (cfg.max_seq_len, D), ("length", "embed"),
                                        std / 2, pd)
        # dense layers in `blocks` (all of a dense model), then MoE layers in `moe_blocks`
        if cfg.moe_layers < cfg.num_layers:
            self.blocks = StackedBlocks(cfg, rngs, cfg.num_layers - cfg.moe_layers)
        if cfg.moe_layers:
            self.moe_blocks = StackedBlocks(cfg, rngs, cfg.moe_layers,
                                            cfg.num_layers - cfg.moe_layers, moe=True)
        self.final_norm_scale = _param(None, (D,), ("vector",), 1.0, pd)
        if cfg.style == "gpt2":
            self.final_norm_bias = _param(None, (D,), ("vector",), 0.0, pd)
        if not cfg.tie_embeddings:
            self.head = _param(rngs.params(), (D, V), ("embed", "vocab"), std, pd)
        if cfg.lora.enabled:  # drawn last: the base weights are those of the plain model
            key = rngs.params()
            for i, stack in enumerate(self.stacks()):
                stack.add_adapters(cfg, jax.random.fold_in(key, i))

    def hidden(self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None,
               segment_ids_BT: jax.Array | None = None, cache: KVCache | None = None
               ) -> tuple[jax.Array, KVCache | None]:
        """tokens (B, T) -> the final normalized hidden states (B, T, D) the head reads,
        and the KV cache with these tokens written in (None without a cache). Positions
        default to 0..T-1, or with a cache to the tokens' places in their sequences."""
        x_BTD, cache, _ = self.hidden_and_router(tokens_BT, positions_BT, segment_ids_BT,
                                                 cache)
        return x_BTD, cache

    def hidden_and_router(self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None,
                          segment_ids_BT: jax.Array | None = None,
                          cache: KVCache | None = None, dropout_key: jax.Array | None = None
                          ) -> tuple[jax.Array, KVCache | None, dict[str, jax.Array]]:
        """`hidden`, and the MoE layers' router sums stacked (L_moe, ...) (models/moe.py
        route; {} for a dense model). `dropout_key`: LoRA dropout (training)."""
        cfg, constrain = self.cfg, self.constrain
        dt = jnp.dtype(cfg.dtype)
        B, T = tokens_BT.shape
        if positions_BT is None:
            positions_BT = (cache.positions(T) if cache is not None else
                            jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)))
        with jax.named_scope("embed"):
            x_BTD = layers.embed(self.embedding.get_value(), tokens_BT, dt, constrain)
            if cfg.style == "gpt2":
                x_BTD = x_BTD + layers.embed(self.pos_embedding.get_value(), positions_BT,
                                             dt, constrain, ("length", "embed"))
            x_BTD = constrain(x_BTD, ("batch", "act_length", "act_embed"))
        stats_L: dict[str, jax.Array] = {}
        for i, stack in enumerate(self.stacks()):
            key = None if dropout_key is None else jax.random.fold_in(dropout_key, i)
            x_BTD, cache, stats = stack(cfg, constrain, x_BTD, positions_BT, segment_ids_BT,
                                        cache, key)
            stats_L = stats_L or stats
        bias = self.final_norm_bias.get_value() if cfg.style == "gpt2" else None
        x_BTD = layers.norm(x_BTD, self.final_norm_scale.get_value(), bias, cfg.norm_eps)
        return x_BTD, cache, stats_L

    def stacks(self) -> list[StackedBlocks]:
        """The layer stacks in order: the dense layers', then the MoE layers'."""
        return [s for s in (getattr(self, "blocks", None), getattr(self, "moe_blocks", None))
                if s is not None]

    def head_weight(self) -> jax.Array:
        """The output projection (D, V), logical axes ("embed", "vocab"), param dtype."""
        if self.cfg.tie_embeddings:
            return self.embedding.get_value().T
        return self.head.get_value()

    def logits(self, x_BTD: jax.Array) -> jax.Array:
        """Hidden states (B, T, D) -> fp32 logits (B, T, V)."""
        with jax.named_scope("head"):
            w_DV = self.head_weight().astype(x_BTD.dtype)
            logits_BTV = jnp.einsum("btd,dv->btv", x_BTD, w_DV,
                                    preferred_element_type=jnp.float32)
            return self.constrain(logits_BTV, ("batch", "act_length", "act_vocab"))

    def __call__(self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None,
                 segment_ids_BT: jax.Array | None = None) -> jax.Array:
        """tokens (B, T) -> logits (B, T, V) fp32."""
        return self.logits(self.hidden(tokens_BT, positions_BT, segment_ids_BT)[0])

    def init_cache(self, batch: int, length: int, pad_B: jax.Array | None = None) -> KVCache:
        """An empty KV cache for `batch` sequences of up to `length` tokens, whose first
        pad_B slots are padding."""
        return init_cache(self.cfg, batch, length, self.constrain, pad_B)

    def extend(self, tokens_BT: jax.Array, cache: KVCache, *, all_logits: bool = False
               ) -> tuple[jax.Array, KVCache]:
        """Run tokens_BT, which go into cache slots [cache.index, cache.index + T):
        the fp32 logits of the last position (B, V) (of every position (B, T, V) with
        all_logits) and the cache with these tokens' keys and values written in."""
        x_BTD, cache = self.hidden(tokens_BT, cache=cache)
        if all_logits:
            return self.logits(x_BTD), cache
        return self.logits(x_BTD[:, -1:])[:, 0], cache

    def logsumexp_and_target(self, tokens_BT: jax.Array, targets_BT: jax.Array,
                             positions_BT: jax.Array | None = None,
                             segment_ids_BT: jax.Array | None = None,
                             dropout_key: jax.Array | None = None
                             ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """What the loss needs without the full logits: logsumexp over the vocabulary and
        the target's logit, (B, T) fp32 each, computed `cfg.vocab_chunks` slices at a time;
        and the MoE auxiliary terms (models/moe.py aux_losses; {} for a dense model).
        `dropout_key` draws the LoRA adapters' dropout (training)."""
        x_BTD, _, stats_L = self.hidden_and_router(tokens_BT, positions_BT, segment_ids_BT,
                                                   dropout_key=dropout_key)
        with jax.named_scope("head"):
            lse_BT, target_BT = head.logsumexp_and_target(
                x_BTD, self.head_weight(), targets_BT, self.cfg.vocab_chunks, self.constrain,
                jnp.dtype(self.cfg.dtype))
        moe = aux_losses(self.cfg, stats_L) if stats_L else {}
        return lse_BT, target_BT, moe


def count_params(cfg: ModelConfig, *, exclude_positions: bool = True) -> int:
    """Parameter count from shapes alone (a tied head counted once).

    With exclude_positions, the learned position table is left out, as nanoGPT counts
    for its FLOPs estimate.
    """
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    total = 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if exclude_positions and path[-1] == "pos_embedding":
            continue
        total += math.prod(var.get_value().shape)
    return total


def count_matmul_params(cfg: ModelConfig) -> int:
    """The weights that multiply activations in a forward pass: every layer's
    projection matrices (those with an "embed" axis) and the output head (D x V; tied
    or not); of an MoE layer's experts, the experts_per_token a token goes through. Not
    counted: an untied model's input embedding (a lookup), the position table, norm
    scales and biases."""
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    total = cfg.d_model * cfg.vocab_size
    for stack in model.stacks():
        axes = stack.layer_axes()
        for k, v in stack.stacked().items():
            if "experts" in axes[k]:  # a token passes through k of the E experts
                total += math.prod(v.shape) * cfg.moe.experts_per_token // cfg.moe.num_experts
            elif "embed" in axes[k]:
                total += math.prod(v.shape)
    return total
