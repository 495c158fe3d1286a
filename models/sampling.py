"""Choosing the next token from logits: greedy, or temperature, then top-k, then top-p
(nucleus) on the tempered distribution, in the order of Hugging Face's logits
processors.

Shapes: B batch, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG = jnp.finfo(jnp.float32).min


def allowed(logits_BV: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """(B, V) bool: the tokens sampling may pick. top_k > 0 keeps the k largest logits;
    top_p < 1 keeps the smallest set of the most likely tokens whose probability adds
    up to at least top_p (always at least the most likely one). Ties at a boundary are
    kept."""
    keep_BV = jnp.ones(logits_BV.shape, bool)
    if top_k > 0 and top_k < logits_BV.shape[-1]:
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        keep_BV = logits_BV >= kth_B1
    if top_p < 1.0:
        masked_BV = jnp.where(keep_BV, logits_BV, NEG)
        sorted_BV = jnp.sort(masked_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # mass of the likelier tokens
        count_B = jnp.maximum(jnp.sum(before_BV < top_p, axis=-1), 1)
        cutoff_B1 = jnp.take_along_axis(sorted_BV, count_B[:, None] - 1, axis=-1)
        keep_BV = keep_BV & (logits_BV >= cutoff_B1)
    return keep_BV


def processed(logits_BV: jax.Array, temperature: float, top_k: int = 0, top_p: float = 1.0
              ) -> jax.Array:
    """The logits sampling draws from (fp32, -inf where a token may not be picked):
    divided by the temperature first, then cut to the top-k, then to the top-p set of
    the tempered probabilities, as Hugging Face's TemperatureLogitsWarper,
    TopKLogitsWarper and TopPLogitsWarper process them in that order."""
    scaled_BV = logits_BV.astype(jnp.float32) / temperature
    return jnp.where(allowed(scaled_BV, top_k, top_p), scaled_BV, -jnp.inf)


def sample(logits_BV: jax.Array, key: jax.Array, temperature: float, top_k: int = 0,
           top_p: float = 1.0) -> jax.Array:
    """The next token (B,) int32. temperature 0: the most likely token (greedy)."""
    if temperature == 0.0:
        return jnp.argmax(logits_BV.astype(jnp.float32), axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, processed(logits_BV, temperature, top_k, top_p),
                                  axis=-1).astype(jnp.int32)


def sample_rows(logits_BV: jax.Array, keys_B: jax.Array, temperature_B: jax.Array,
                top_k_B: jax.Array, top_p_B: jax.Array) -> jax.Array:
    """The next token (B,) int32 with each row's own settings (arrays, so one compiled
    program serves any mix): greedy where its temperature is 0, else drawn with its own
    key from the tempered logits cut to its top-k (0: all) and top-p, as `sample` does."""
    V = logits_BV.shape[-1]

    def row(logits_V, key, temperature, top_k, top_p):
        logits_V = logits_V.astype(jnp.float32)
        scaled_V = logits_V / jnp.where(temperature > 0, temperature, 1.0)
        sorted_V = jnp.sort(scaled_V)[::-1]
        k = jnp.where((top_k > 0) & (top_k < V), top_k, V)
        keep_V = scaled_V >= sorted_V[k - 1]
        kept_V = jnp.sort(jnp.where(keep_V, scaled_V, NEG))[::-1]
        probs_V = jax.nn.softmax(kept_V)
        before_V = jnp.cumsum(probs_V) - probs_V  # mass of the likelier tokens
        count = jnp.maximum(jnp.sum(before_V < top_p), 1)
        keep_V = keep_V & ((top_p >= 1.0) | (scaled_V >= kept_V[count - 1]))
        drawn = jax.random.categorical(key, jnp.where(keep_V, scaled_V, -jnp.inf))
        return jnp.where(temperature > 0, drawn, jnp.argmax(logits_V)).astype(jnp.int32)

    return jax.vmap(row)(logits_BV, keys_B, temperature_B, top_k_B, top_p_B)
