"""The output head fused with the loss's softmax statistics, a slice of the vocabulary
at a time, so the fp32 logits of the whole batch (B x T x V) never exist at once.

Shapes: B batch, T length, D d_model, V vocab, n chunks, C = V / n vocab ids per chunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from models.attention import dot_f32
from models.layers import Constrain, for_compute

HEAD_AXES = ("embed", "vocab")  # the (D, V) head weight, tied or not


def num_chunks(vocab_size: int, requested: int) -> int:
    """The chunk count used: the largest divisor of the vocabulary not above `requested`
    (a vocabulary padded to a multiple of 128 divides by every power of two up to 128)."""
    return max(d for d in range(1, max(1, requested) + 1) if vocab_size % d == 0)


def logsumexp_and_target(x_BTD: jax.Array, w_DV: jax.Array, targets_BT: jax.Array,
                         chunks: int, constrain: Constrain, dtype
                         ) -> tuple[jax.Array, jax.Array]:
    """logsumexp over the vocabulary of `x_BTD @ w_DV` and the logit of each target, both
    (B, T) fp32, computed over `chunks` vocabulary slices in a loop.

    Each slice's weights are cast to `dtype` while still sharded (FSDP gathers them in
    bf16), its logits are fp32, and the backward pass recomputes the logits slice by slice
    (jax.checkpoint), so the largest live logits array is B x T x V / chunks. Slice j holds
    the ids j, j + n, j + 2n, ...: a strided split keeps every slice spread over the
    vocabulary's shards under tensor parallelism. The gathered bf16 weights of the slices
    are kept for the backward pass (one bf16 copy of the head in all, as an unchunked
    head keeps), so FSDP gathers the head once per step.
    """
    D, V = w_DV.shape
    n = num_chunks(V, chunks)
    C = V // n
    w_nDC = jnp.moveaxis(w_DV.reshape(D, C, n), -1, 0)
    ids_nC = jnp.arange(V, dtype=jnp.int32).reshape(C, n).T
    # x in fp32 so its gradient adds the slices' contributions in fp32
    x32_BTD = x_BTD.astype(jnp.float32)

    # the backward pass keeps each slice's gathered bf16 weights rather than gather again
    @functools.partial(jax.checkpoint,
                       policy=jax.checkpoint_policies.save_only_these_names("head_weight"))
    def slice_stats(carry, xs):
        max_BT, sumexp_BT, target_BT = carry
        w_DC, ids_C = xs
        w_DC = checkpoint_name(for_compute(w_DC, HEAD_AXES, dtype, constrain), "head_weight")
        logits_BTC = dot_f32("btd,dc->btc", x32_BTD.astype(dtype), w_DC)
        logits_BTC = constrain(logits_BTC, ("batch", "act_length", "act_vocab"))
        # running logsumexp; the max only keeps exp() in range (its gradient cancels)
        new_max_BT = jax.lax.stop_gradient(jnp.maximum(max_BT, logits_BTC.max(axis=-1)))
        sumexp_BT = (sumexp_BT * jnp.exp(max_BT - new_max_BT)
                     + jnp.sum(jnp.exp(logits_BTC - new_max_BT[..., None]), axis=-1))
        hit_BTC = targets_BT[..., None] == ids_C
        target_BT = target_BT + jnp.sum(jnp.where(hit_BTC, logits_BTC, 0.0), axis=-1)
        return (new_max_BT, sumexp_BT, target_BT), None

    B, T = targets_BT.shape
    zeros_BT = jnp.zeros((B, T), jnp.float32)
    init = (jnp.full((B, T), -jnp.inf, jnp.float32), zeros_BT, zeros_BT)
    if n == 1:  # a single slice needs no loop
        (max_BT, sumexp_BT, target_BT), _ = slice_stats(init, (w_nDC[0], ids_nC[0]))
    else:
        (max_BT, sumexp_BT, target_BT), _ = jax.lax.scan(slice_stats, init, (w_nDC, ids_nC))
    return max_BT + jnp.log(sumexp_BT), target_BT
