"""Mixture-of-experts MLP: a softmax router picks each token's top-k experts; every
routed token is computed (dropless): the (token, expert) pairs are sorted by expert and
run through the experts' grouped matmuls (models/experts.py: `jax.lax.ragged_dot`, or on
TPUs the megablox kernels), each row scaled there by its routing weight.

With experts split over mesh axes (expert parallelism), each device sorts its own
tokens by the device holding their expert and exchanges them with an all-to-all. The
exchange is padded so that nothing is dropped: a device sends each peer a buffer big
enough for all of its (token, expert) pairs, of which only the real rows are computed.
The layer never sees a mesh: it is handed the mesh axes of the "experts" and "mlp"
names by its caller (`constrain.mesh_axes`) and runs per device through
`layers.per_shard`.

Shapes: B batch, T length, D d_model, E experts, k experts per token, F expert width,
n tokens of one device (B T there), m = n k (token, expert) pairs, s peers.
"""

from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp

from models.config import ModelConfig
from models.experts import GroupedOps, grouped_ops, swiglu_rows
from models.layers import Constrain, per_shard, swiglu_mlp


def route(cfg: ModelConfig, w_router_DE: jax.Array, h_BTD: jax.Array, constrain: Constrain
          ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Softmax over the experts in fp32, then the top k; their weights renormalised to
    sum to 1 with moe.norm_topk_prob. Returns the weights (B, T, k) fp32, the experts
    (B, T, k) int32, and this layer's sums: routed pairs per expert counts_E, router
    probabilities per expert probs_E, z_sum (logsumexp^2 over tokens) and tokens."""
    E, k = cfg.moe.num_experts, cfg.moe.experts_per_token
    logits_BTE = jnp.einsum("btd,de->bte", h_BTD, w_router_DE.astype(h_BTD.dtype),
                            preferred_element_type=jnp.float32)
    logits_BTE = constrain(logits_BTE, ("batch", "act_length", None))
    probs_BTE = jax.nn.softmax(logits_BTE, axis=-1)
    weights_BTk, experts_BTk = jax.lax.top_k(probs_BTE, k)
    if cfg.moe.norm_topk_prob:
        weights_BTk = weights_BTk / jnp.sum(weights_BTk, axis=-1, keepdims=True)
    chosen_E = jnp.sum(jax.nn.one_hot(experts_BTk, E, dtype=jnp.float32), axis=(0, 1, 2))
    lse_BT = jax.nn.logsumexp(logits_BTE, axis=-1)
    stats = {"counts_E": jax.lax.stop_gradient(chosen_E),
             "probs_E": jnp.sum(probs_BTE, axis=(0, 1)),
             "z_sum": jnp.sum(jnp.square(lse_BT)),
             "tokens": jnp.asarray(h_BTD.shape[0] * h_BTD.shape[1], jnp.float32)}
    return weights_BTk, experts_BTk, stats


def _count(ids_m: jax.Array, size: int) -> jax.Array:
    """How many of ids_m fall on each of 0..size-1 (others ignored), int32 (size,)."""
    return jnp.zeros((size,), jnp.int32).at[ids_m].add(1, mode="drop")


# The (token, expert) pairs' rows and back: `spread` takes each token's row k times in
# sorted order, `collect` sums each token's k rows; each is the other's gradient, so both
# directions are gathers (a gather's own transpose is a scatter-add: slow on TPUs).
# order_m sorts the pairs (pair p = token p // k), unorder_m = argsort(order_m).

def _spread(x_nX: jax.Array, order_m: jax.Array, unorder_m: jax.Array, k: int) -> jax.Array:
    return x_nX[order_m // k]  # (m, X): sorted pair j is token order_m[j] // k's row


def _collect(y_mX: jax.Array, order_m: jax.Array, unorder_m: jax.Array, k: int) -> jax.Array:
    if k == 1:
        return y_mX[unorder_m]
    unorder_nk = unorder_m.reshape(-1, k)  # where each token's k pairs sit; summed in
    # fp32 one gather at a time, so no (m, X) copy is held
    return sum(y_mX[unorder_nk[:, i]].astype(jnp.float32) for i in range(k)).astype(y_mX.dtype)


spread = jax.custom_vjp(_spread, nondiff_argnums=(3,))
collect = jax.custom_vjp(_collect, nondiff_argnums=(3,))
spread.defvjp(lambda x, o, u, k: (_spread(x, o, u, k), (o, u)),
              lambda k, ou, dy: (collect(dy, *ou, k), None, None))
collect.defvjp(lambda y, o, u, k: (_collect(y, o, u, k), (o, u)),
               lambda k, ou, dx: (spread(dx, *ou, k), None, None))


def _experts_local(x_BTD, experts_BTk, weights_BTk, w_gate_EDF, w_up_EDF, w_out_EFD, *,
                   num_experts: int, expert_axes: tuple[str, ...],
                   model_axes: tuple[str, ...], fsdp_axes: tuple[str, ...],
                   kernel: str, platform: str, row_chunks: int) -> jax.Array:
    """The routed experts' weighted sum for one device's tokens (B, T, D), holding
    experts [j E/s, (j+1) E/s) of the weights (and, with model_axes, a slice of F; with
    fsdp_axes, a slice of D, gathered here: the gradient is then reduce-scattered
    straight back to the slices, not all-reduced whole)."""
    if fsdp_axes:
        w_gate_EDF, w_up_EDF = (jax.lax.all_gather(w, fsdp_axes, axis=1, tiled=True)
                                for w in (w_gate_EDF, w_up_EDF))
        w_out_EFD = jax.lax.all_gather(w_out_EFD, fsdp_axes, axis=2, tiled=True)
    B, T, D = x_BTD.shape
    k = experts_BTk.shape[-1]
    E_here = w_gate_EDF.shape[0]
    peers = num_experts // E_here
    x_nD = x_BTD.reshape(B * T, D)
    expert_m = experts_BTk.reshape(-1)
    order_m = jnp.argsort(expert_m, stable=True)  # pairs sorted by expert
    unorder_m = jnp.argsort(order_m)  # and back
    expert_sorted_m = expert_m[order_m]
    x_sorted_mD = spread(x_nD, order_m, unorder_m, k)
    # each pair's routing weight, fp32
    w_sorted_m = spread(weights_BTk.reshape(-1), order_m, unorder_m, 1)
    weights = (w_gate_EDF, w_up_EDF, w_out_EFD)
    ops: GroupedOps = grouped_ops(kernel, platform, *w_gate_EDF.shape[1:])
    swiglu = functools.partial(swiglu_rows, ops, row_chunks)  # the rows come weighted
    if peers == 1:
        y_sorted_mD = swiglu(x_sorted_mD, _count(expert_sorted_m, E_here), w_sorted_m,
                             *weights)
    else:
        m = expert_m.shape[0]
        # the peer holding each pair's expert, and the pair's row in the buffer to it
        peer_m = expert_sorted_m // E_here
        sent_s = _count(peer_m, peers)
        starts_s = jnp.cumsum(sent_s) - sent_s
        row_m = jnp.arange(m) - starts_s[peer_m]

        def send(fill, a_m):
            return jnp.full((peers, m, *a_m.shape[1:]), fill, a_m.dtype).at[
                peer_m, row_m].set(a_m)

        a2a = functools.partial(jax.lax.all_to_all, axis_name=expert_axes, split_axis=0,
                                concat_axis=0, tiled=True)
        # rows, their routing weights, and their experts as the holder numbers them
        # (E_here marks padding)
        got_rD = a2a(send(0, x_sorted_mD)).reshape(peers * m, D)
        got_w_r = a2a(send(0, w_sorted_m)).reshape(-1)
        got_r = a2a(send(E_here, expert_sorted_m % E_here)).reshape(-1)
        by_expert_r = jnp.argsort(got_r, stable=True)  # padding (E_here) last
        received_r = jnp.argsort(by_expert_r)
        y_rD = swiglu(spread(got_rD, by_expert_r, received_r, 1), _count(got_r, E_here),
                      spread(got_w_r, by_expert_r, received_r, 1), *weights)
        y_rD = collect(y_rD, by_expert_r, received_r, 1)  # back to the order received
        back_smD = a2a(y_rD.reshape(peers, m, D))
        y_sorted_mD = back_smD[peer_m, row_m]
    out_nD = collect(y_sorted_mD, order_m, unorder_m, k)  # each token's k weighted rows
    if model_axes:  # each device summed over its slice of the experts' width
        out_nD = jax.lax.psum(out_nD, model_axes)
    return out_nD.reshape(B, T, D)


def moe_mlp(cfg: ModelConfig, p: Mapping[str, jax.Array], h_BTD: jax.Array,
            constrain: Constrain) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The mixture-of-experts MLP of one layer on h_BTD (B, T, D): the routed experts'
    weighted sum, plus the shared experts' dense MLP when there are any; and the layer's
    router sums (`route`)."""
    weights_BTk, experts_BTk, stats = route(cfg, p["router"], h_BTD, constrain)
    axes_of = getattr(constrain, "mesh_axes", lambda name: ())
    platform = getattr(constrain, "platform", jax.default_backend())
    local = functools.partial(_experts_local, num_experts=cfg.moe.num_experts,
                              expert_axes=axes_of("experts"), model_axes=axes_of("mlp"),
                              fsdp_axes=axes_of("expert_embed"), kernel=cfg.moe.kernel,
                              platform=platform, row_chunks=cfg.moe.row_chunks)
    tokens = ("batch", "act_length", None)
    out_BTD = per_shard(constrain, local,
                        [h_BTD, experts_BTk, weights_BTk, p["w_gate"], p["w_up"], p["w_out"]],
                        [tokens, tokens, tokens, ("experts", "expert_embed", "mlp"),
                         ("experts", "expert_embed", "mlp"), ("experts", "mlp", "expert_embed")])
    if cfg.moe.shared_experts:
        out_BTD = out_BTD + swiglu_mlp(h_BTD, p["shared_gate"], p["shared_up"],
                                       p["shared_out"], constrain)
    return constrain(out_BTD, ("batch", "act_length", "act_embed")), stats


def aux_losses(cfg: ModelConfig, stats_L: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """From the MoE layers' stacked sums (L, ...): the load-balancing loss in Mixtral's
    form (transformers' load_balancing_loss_func: E times the dot product of the routed
    fraction per expert and the mean router probability per expert, both over every
    layer's tokens), the router z-loss (mean over layers and tokens of logsumexp^2),
    and expert_load: the most loaded expert's routed pairs over the mean, at the most
    unbalanced layer (1: perfectly balanced; E / k: every token to the same k)."""
    E = cfg.moe.num_experts
    rows = jnp.sum(stats_L["tokens"])
    balance = E * jnp.sum(jnp.sum(stats_L["counts_E"], 0) / rows
                          * jnp.sum(stats_L["probs_E"], 0) / rows)
    counts_LE = stats_L["counts_E"]
    load_L = jnp.max(counts_LE, -1) / jnp.maximum(jnp.mean(counts_LE, -1), 1e-9)
    return {"moe_aux_loss": balance, "moe_z_loss": jnp.sum(stats_L["z_sum"]) / rows,
            "expert_load": jnp.max(load_L)}
