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
(0.09 ms). The engine may instead hold its rows in pages (PagedKVCache, serve.kv_pages):
each request takes only the pages its prompt and new tokens need.

Shapes: L layers, B batch, T new tokens, S cache length, K kv heads, H head size; for
pages, N pages of P slots, M pages per row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from models.config import ModelConfig
from models.layers import Constrain

CACHE_AXES = ("layers", "batch", "act_length", "act_kv_heads", None)
PAGED_AXES = ("layers", None, None, "act_kv_heads", None)  # a pool of pages
UNROLL_ROWS = 64  # rows written one by one up to this many (XLA:CPU's scatter is slow)


class _Placed:
    """What both caches share: where a call's tokens go (`index`, a scalar or (B,) per
    row; `pad_B`; the `span` read) and how keys and values are held (`bits_of`)."""

    def at(self, index):
        """The cache with the next call's tokens placed from slot `index` on."""
        return self.replace(index=jnp.asarray(index, jnp.int32))

    def within(self, span: int | None):
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

    def _stored(self, x: jax.Array) -> jax.Array:
        """Keys or values as the arrays hold them."""
        if self.bits_of is None:
            return x.astype(self.held_dtype)
        return jax.lax.bitcast_convert_type(x.astype(self.bits_of), self.held_dtype)

    def _read(self, x: jax.Array) -> jax.Array:
        """Keys or values as the arrays hold them, as the float they are."""
        if self.bits_of is None:
            return x
        return jax.lax.bitcast_convert_type(x, jnp.dtype(self.bits_of))


@struct.dataclass
class KVCache(_Placed):
    k_LBSKH: jax.Array
    v_LBSKH: jax.Array
    index: jax.Array  # int32 scalar, or (B,) per row: the slot of this call's first token
    pad_B: jax.Array  # int32 (B,): each sequence's leading padding slots
    # attention reads only the first `span` slots (None: all S); a static number
    span: int | None = struct.field(pytree_node=False, default=None)
    # the float dtype whose bits the arrays hold (uint16 on CPUs); None: they hold it
    bits_of: str | None = struct.field(pytree_node=False, default=None)

    @property
    def held_dtype(self):
        return self.k_LBSKH.dtype

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
        return self._read(k_BSKH), self._read(v_BSKH)


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


@struct.dataclass
class PagedKVCache(_Placed):
    """A serving engine's cache in pages: keys and values of all rows in one pool of N
    pages of `P` slots each, (L, N, P, K, H); row b's slot s is slot s % P of page
    table_BM[b, s // P]. A request holds only the pages its prompt and max_tokens need,
    so the same memory serves more requests at once than rows of max_len slots would.
    Page 0 is handed to no one: a table's unused entries point to it, so rows without a
    request write there harmlessly, and what it holds is never attended to (the slots
    past a row's own are masked). The pool is replicated over the batch mesh axes (a
    row may use any page) and its kv heads sharded as the weights'; rows, as index_B
    and table_BM, are the engine's decode rows. No padding (pad_B is zeros)."""
    k_LNPKH: jax.Array
    v_LNPKH: jax.Array
    table_BM: jax.Array  # int32 (B, M): each row's pages in order, M x P slots in all
    index: jax.Array  # int32 (B,): the slot of this call's first token, per row
    pad_B: jax.Array  # int32 (B,) zeros
    span: int | None = struct.field(pytree_node=False, default=None)  # a multiple of P
    bits_of: str | None = struct.field(pytree_node=False, default=None)

    @property
    def held_dtype(self):
        return self.k_LNPKH.dtype

    def first_rows(self, rows: int) -> "PagedKVCache":
        """The cache as seen by its first `rows` rows (the pool is shared)."""
        return self.replace(table_BM=self.table_BM[:rows], index=self.index[:rows],
                            pad_B=self.pad_B[:rows])

    def write(self, layer, k_BTKH: jax.Array, v_BTKH: jax.Array,
              constrain: Constrain) -> "PagedKVCache":
        """The cache with layer `layer`'s keys and values of this call's tokens written
        into their rows' pages (in place, when the caller donates the cache)."""
        B, T = k_BTKH.shape[:2]
        P = self.k_LNPKH.shape[2]
        slots_BT = self.slots(T)
        pages_BT = jnp.take_along_axis(self.table_BM, slots_BT // P, axis=1, mode="clip")
        offsets_BT = slots_BT % P

        def put(pool_LNPKH, x_BTKH):
            x_BTKH = self._stored(x_BTKH)
            if B * T > UNROLL_ROWS:
                return pool_LNPKH.at[layer, pages_BT, offsets_BT].set(x_BTKH)
            for b in range(B):  # one in-place update per token (no scatter)
                for t in range(T):
                    pool_LNPKH = jax.lax.dynamic_update_slice(
                        pool_LNPKH, x_BTKH[b, t][None, None, None],
                        (layer, pages_BT[b, t], offsets_BT[b, t], 0, 0))
            return pool_LNPKH
        return self.replace(k_LNPKH=constrain(put(self.k_LNPKH, k_BTKH), PAGED_AXES),
                            v_LNPKH=constrain(put(self.v_LNPKH, v_BTKH), PAGED_AXES))

    def layer(self, layer) -> tuple[jax.Array, jax.Array]:
        """(B, S, K, H) keys and values of one layer, each row's pages gathered in
        order (S: the span if one is set, else M x P)."""
        B, M = self.table_BM.shape
        P = self.k_LNPKH.shape[2]
        pages_BM = self.table_BM[:, :(self.span or M * P) // P]

        def read(pool_LNPKH):
            x_BMPKH = pool_LNPKH[layer, pages_BM]
            return self._read(x_BMPKH.reshape(B, -1, *x_BMPKH.shape[3:]))
        return read(self.k_LNPKH), read(self.v_LNPKH)


def copy_pages(into: PagedKVCache, pages_M: jax.Array, source: KVCache, source_row
               ) -> PagedKVCache:
    """`into` with row `source_row` of `source` (all layers, its first M x P slots)
    written into pages pages_M (0 where the row needs no more: the discard page)."""
    P = into.k_LNPKH.shape[2]

    def put(pool_LNPKH, s_LBSKH):
        row_LSKH = jax.lax.dynamic_index_in_dim(s_LBSKH, source_row, axis=1, keepdims=False)
        for m in range(pages_M.shape[0]):
            page_L1PKH = row_LSKH[:, None, m * P:(m + 1) * P].astype(pool_LNPKH.dtype)
            pool_LNPKH = jax.lax.dynamic_update_slice(pool_LNPKH, page_L1PKH,
                                                      (0, pages_M[m], 0, 0, 0))
        return pool_LNPKH
    return into.replace(k_LNPKH=put(into.k_LNPKH, source.k_LBSKH),
                        v_LNPKH=put(into.v_LNPKH, source.v_LBSKH))


def _held(cfg: ModelConfig, constrain: Constrain) -> tuple[jnp.dtype, str | None]:
    """The dtype the cache's arrays have, and the float whose bits they hold (uint16 for
    a 16-bit float on a CPU) or None."""
    dt = jnp.dtype(cfg.dtype)
    platform = getattr(constrain, "platform", jax.default_backend())
    if platform == "cpu" and dt.itemsize == 2:
        return jnp.dtype(jnp.uint16), dt.name
    return dt, None


def init_cache(cfg: ModelConfig, batch: int, length: int, constrain: Constrain,
               pad_B: jax.Array | None = None) -> KVCache:
    """Zero keys and values for `batch` sequences of up to `length` tokens; `pad_B`
    leading slots of each sequence are padding (default none)."""
    shape = (cfg.num_layers, batch, length, cfg.kv_heads, cfg.head_size)
    held, bits_of = _held(cfg, constrain)
    zeros = constrain(jnp.zeros(shape, held), CACHE_AXES)
    pad_B = jnp.zeros((batch,), jnp.int32) if pad_B is None else pad_B.astype(jnp.int32)
    return KVCache(zeros, zeros, jnp.zeros((), jnp.int32), pad_B, bits_of=bits_of)


def init_paged_cache(cfg: ModelConfig, rows: int, pages: int, page: int, length: int,
                     constrain: Constrain) -> PagedKVCache:
    """Zero keys and values in `pages` pages of `page` slots (and the discard page 0),
    for `rows` rows of up to `length` slots each, every table entry at page 0."""
    shape = (cfg.num_layers, pages + 1, page, cfg.kv_heads, cfg.head_size)
    held, bits_of = _held(cfg, constrain)
    zeros = constrain(jnp.zeros(shape, held), PAGED_AXES)
    table_BM = jnp.zeros((rows, -(-length // page)), jnp.int32)
    return PagedKVCache(zeros, zeros, table_BM, jnp.zeros((rows,), jnp.int32),
                        jnp.zeros((rows,), jnp.int32), bits_of=bits_of)
