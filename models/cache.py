"""The key/value cache that lets the Transformer run incrementally (prefill, then decode).

A batch of prompts is left-padded to a common length: every sequence writes its next
tokens into the same cache slots, so one scalar `index` says where the new tokens go. A
sequence's `pad_B` leading slots are padding: no query attends to them, and its
positions count from its first real token, so a padded prompt produces what it would
alone. The serving engine's rows are independent sequences, each at its own length:
there `index` is (B,), each row's first slot of this call (no padding); slots past a
row's own are never attended to, so whatever an earlier sequence left there is inert.
Keys and values of all layers are held in the compute dtype, (L, B, S, K, H)
each, with logical axes (batch over the batch mesh axes, kv heads like the weights). On
CPUs a 16-bit float cache is held as its bits (uint16) and read as the float: XLA:CPU
updates a bf16 array by converting all of it to fp32 and back (a serving engine's
per-row writes of one decode step, 8 rows x 12 layers: 2.4 s), a uint16 one in place
(0.09 ms).

Shapes: L layers, B batch, T new tokens, S cache length, K kv heads, H head size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from models.config import ModelConfig
from models.layers import Constrain

CACHE_AXES = ("layers", "batch", "act_length", "act_kv_heads", None)
UNROLL_ROWS = 64  # rows written one by one up to this many (XLA:CPU's scatter is slow)


@struct.dataclass
class KVCache:
    k_LBSKH: jax.Array
    v_LBSKH: jax.Array
    index: jax.Array  # int32 scalar, or (B,) per row: the slot of this call's first token
    pad_B: jax.Array  # int32 (B,): each sequence's leading padding slots
    # attention reads only the first `span` slots (None: all S); a static number
    span: int | None = struct.field(pytree_node=False, default=None)
    # the float dtype whose bits the arrays hold (uint16 on CPUs); None: they hold it
    bits_of: str | None = struct.field(pytree_node=False, default=None)

    def at(self, index) -> "KVCache":
        """The cache with the next call's tokens placed from slot `index` on."""
        return self.replace(index=jnp.asarray(index, jnp.int32))

    def within(self, span: int | None) -> "KVCache":
        """The cache with attention reading only its first `span` slots (every slot
        this call's tokens attend to must be among them; None: all): what lies past a
        serving engine's longest row is neither read nor scored."""
        return self.replace(span=span)

    def slots(self, length: int) -> jax.Array:
        """(B, T) cache slots of the `length` tokens of this call."""
        B = self.pad_B.shape[0]
        first_B1 = jnp.reshape(self.index, (-1, 1))  # (1, 1) for a scalar index
        return first_B1 + jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (B, length))

    def positions(self, length: int) -> jax.Array:
        """(B, T) positions of this call's tokens, counted from each sequence's first
        real token."""
        return jnp.maximum(self.slots(length) - self.pad_B[:, None], 0)

    def write(self, layer, k_BTKH: jax.Array, v_BTKH: jax.Array,
              constrain: Constrain) -> "KVCache":
        """The cache with layer `layer`'s keys and values of this call's tokens written
        in (in place, when the caller donates the cache)."""
        k_BTKH, v_BTKH = self._stored(k_BTKH), self._stored(v_BTKH)
        if self.index.ndim == 0:
            at = (layer, 0, self.index, 0, 0)
            k_LBSKH = jax.lax.dynamic_update_slice(self.k_LBSKH, k_BTKH[None], at)
            v_LBSKH = jax.lax.dynamic_update_slice(self.v_LBSKH, v_BTKH[None], at)
        else:  # each row at its own slot (the caller keeps index_B + T within the cache)
            k_LBSKH, v_LBSKH = (_write_rows(c, x, layer, self.index)
                                for c, x in ((self.k_LBSKH, k_BTKH), (self.v_LBSKH, v_BTKH)))
        return self.replace(k_LBSKH=constrain(k_LBSKH, CACHE_AXES),
                            v_LBSKH=constrain(v_LBSKH, CACHE_AXES))

    def layer(self, layer) -> tuple[jax.Array, jax.Array]:
        """(B, S, K, H) keys and values of one layer (S: the span, if one is set)."""
        k_BSKH, v_BSKH = self.k_LBSKH[layer], self.v_LBSKH[layer]
        if self.span is not None:
            k_BSKH, v_BSKH = k_BSKH[:, :self.span], v_BSKH[:, :self.span]
        if self.bits_of is None:
            return k_BSKH, v_BSKH
        return (jax.lax.bitcast_convert_type(k_BSKH, jnp.dtype(self.bits_of)),
                jax.lax.bitcast_convert_type(v_BSKH, jnp.dtype(self.bits_of)))

    def _stored(self, x: jax.Array) -> jax.Array:
        """Keys or values as the arrays hold them."""
        if self.bits_of is None:
            return x.astype(self.k_LBSKH.dtype)
        return jax.lax.bitcast_convert_type(x.astype(self.bits_of), self.k_LBSKH.dtype)


def _write_rows(c_LBSKH: jax.Array, x_BTKH: jax.Array, layer, index_B: jax.Array
                ) -> jax.Array:
    """c with layer `layer` of row b written from slot index_B[b] on, for every b."""
    if x_BTKH.shape[0] <= UNROLL_ROWS:  # one in-place update per row (no scatter)
        for b in range(x_BTKH.shape[0]):
            c_LBSKH = jax.lax.dynamic_update_slice(
                c_LBSKH, x_BTKH[b][None, None], (layer, b, index_B[b], 0, 0))
        return c_LBSKH

    def row(c_LSKH, x_TKH, first):
        return jax.lax.dynamic_update_slice(c_LSKH, x_TKH[None], (layer, first, 0, 0))
    return jax.vmap(row, in_axes=(1, 0, 0), out_axes=1)(c_LBSKH, x_BTKH, index_B)


def copy_row(into: KVCache, row, source: KVCache, source_row) -> KVCache:
    """`into` with row `row` replaced by row `source_row` of `source` (its keys and
    values of all layers, in as many slots as `into` has)."""
    def put(c_LBSKH, s_LBSKH):
        one_L1SKH = jax.lax.dynamic_index_in_dim(s_LBSKH, source_row, axis=1, keepdims=True)
        one_L1SKH = one_L1SKH[:, :, :c_LBSKH.shape[2]]
        return jax.lax.dynamic_update_slice(c_LBSKH, one_L1SKH.astype(c_LBSKH.dtype),
                                            (0, row, 0, 0, 0))
    return into.replace(k_LBSKH=put(into.k_LBSKH, source.k_LBSKH),
                        v_LBSKH=put(into.v_LBSKH, source.v_LBSKH))


def init_cache(cfg: ModelConfig, batch: int, length: int, constrain: Constrain,
               pad_B: jax.Array | None = None) -> KVCache:
    """Zero keys and values for `batch` sequences of up to `length` tokens; `pad_B`
    leading slots of each sequence are padding (default none)."""
    shape = (cfg.num_layers, batch, length, cfg.kv_heads, cfg.head_size)
    dt = jnp.dtype(cfg.dtype)
    platform = getattr(constrain, "platform", jax.default_backend())
    bits = platform == "cpu" and dt.itemsize == 2  # bf16 or fp16 on a CPU: as uint16
    zeros = constrain(jnp.zeros(shape, jnp.uint16 if bits else dt), CACHE_AXES)
    pad_B = jnp.zeros((batch,), jnp.int32) if pad_B is None else pad_B.astype(jnp.int32)
    return KVCache(zeros, zeros, jnp.zeros((), jnp.int32), pad_B,
                   bits_of=dt.name if bits else None)

