"""Continuous batching: many requests decoded together, each joining and leaving the
batch on its own.

The engine holds `max_batch` decode slots, each one request's KV cache rows of `max_len`
slots, sharded over the mesh as generation shards its batch (rows over the batch mesh
axes, kv heads over `model`). A waiting request is prefilled `chunk` tokens per engine
step (up to one request per batch way at once, each in its own row of a small prefill
cache, so a long prompt never stalls decoding for long), then its rows are copied into a
free slot and it decodes with the others, one token per step; a request that ends (EOS,
its token limit, a cancel) frees its slot at once. Each request samples with its own
settings and seed: token i of a request is drawn with key fold_in(key(seed), i), so what
it gets does not depend on what else is in the batch.

With `kv_pages` the rows share a pool of pages instead (models/cache.py PagedKVCache):
a request is admitted when a row and the pages its prompt plus max_tokens need are free
(first come, first served), its prefilled row is copied into its pages, and its pages
come back when it ends. Decoding requests are kept in the first rows (a finished one's
row takes the last one's request: its table row and settings move, its keys and values
stay in their pages), and a decode call runs only the first quarter, half, three
quarters or all of the rows, whichever holds them.

Programs of fixed shapes, compiled when the engine is built (prefill a chunk, one per
chunk length bucket; copy a row; decode up to `decode_steps` steps, fewer when a request
reaches its max_tokens sooner): serving never compiles again. Attention reads only the
first cache slots that hold anything: a prompt's first chunk attends within the chunk,
and decoding over the shortest of a few spans (a quarter, a half, three quarters or all
of the cache) that holds every decoding row's slots; each span (and, paged, each row
count) is a program of its own.

Shapes: B decode slots, P prefill rows, C chunk, S cache slots, K decode steps per
call, V vocab, R decode rows run by a call, M pages per row.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import threading
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import sharding
from models.cache import copy_pages, copy_row, init_paged_cache
from models.sampling import NEG, sample_rows
from train.errors import InputError
from train.inference.generate import inference_params

log = logging.getLogger("train")


@dataclasses.dataclass(frozen=True)
class Sampling:
    """One request's settings: at most `max_tokens` new tokens (exactly that many with
    `ignore_eos`, for benchmarks); temperature 0 is greedy, else top-k (0: all) and
    top-p cut the tempered distribution; `seed` fixes the draws."""
    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    ignore_eos: bool = False

    def check(self) -> None:
        if self.max_tokens < 1:
            raise InputError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise InputError("temperature must be >= 0, top_k >= 0 and top_p in (0, 1]")
        if not 0 <= self.seed < 2**31 or self.top_k >= 2**31:
            raise InputError(f"seed={self.seed} and top_k={self.top_k} must be below 2**31 "
                             "(int32 on the device)")


@dataclasses.dataclass
class Plan:
    """An engine step's changes, decided by process 0: requests cancelled (ids), and
    (decode slot, request) admitted; `stop`: the server is done."""
    cancel: list = dataclasses.field(default_factory=list)
    admit: list = dataclasses.field(default_factory=list)
    stop: bool = False


class QueueFull(Exception):
    """submit() while max_queue requests are waiting already."""


class Request:
    """A prompt being served. Its new tokens go to `on_tokens(ids)` as they come, those
    of one engine call together (EOS and the `stop_ids` that end it, e.g. a chat
    template's end of turn, are not among them), and its end to `on_finish(reason)`:
    "stop" (EOS, a stop id), "length" (max_tokens) or "cancelled". Both are called from
    the engine's thread."""

    def __init__(self, prompt: list[int], sampling: Sampling,
                 on_tokens: Callable[[list[int]], None] | None = None,
                 on_finish: Callable[[str], None] | None = None,
                 stop_ids: frozenset[int] = frozenset()):
        self.prompt, self.sampling = list(prompt), sampling
        self.on_tokens, self.on_finish = on_tokens, on_finish
        self.stop_ids = frozenset(stop_ids)
        self.id = -1  # set by Engine.submit (process 0's numbering)
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.done = threading.Event()
        self._cancel = False

    def cancel(self) -> None:
        """Stop it at the engine's next step (thread-safe); its slot is freed then."""
        self._cancel = True

    def _emit(self, tokens: list[int]) -> None:
        self.tokens += tokens
        if self.on_tokens is not None:
            self.on_tokens(tokens)

    def _finish(self, reason: str) -> None:
        self.finish_reason = reason
        if self.on_finish is not None:
            self.on_finish(reason)
        self.done.set()


class Engine:
    """Continuous-batching generation with a sharded model (see the module's text)."""

    @classmethod
    def of_config(cls, model, mesh, rules, serve, **kwargs) -> "Engine":
        """An engine with the config's serve.* slots, cache length, queue limit, steps
        per call and prefill rows (`serve`: a ServeConfig); kwargs as for Engine."""
        return cls(model, mesh, rules, max_batch=serve.max_batch, max_len=serve.max_len,
                   max_queue=serve.max_queue, decode_steps=serve.decode_steps,
                   prefill_rows=serve.prefill_rows, kv_pages=serve.kv_pages,
                   page_size=serve.page_size, **kwargs)

    def __init__(self, model, mesh, rules, *, eos_id: int, vocab_limit: int | None = None,
                 max_batch: int = 8, max_len: int | None = None, chunk: int | None = None,
                 max_queue: int | None = None, decode_steps: int = 1,
                 prefill_rows: int | None = None, kv_pages: int = 0, page_size: int = 16,
                 peers=None):
        cfg = model.cfg
        max_len = max_len or cfg.max_seq_len
        if max_len > cfg.max_seq_len:
            raise InputError(f"serve.max_len={max_len} is above the model's max_seq_len="
                             f"{cfg.max_seq_len}; lower it")
        self.graphdef, params = nnx.split(model)
        self.params = jax.jit(lambda p: inference_params(p, jnp.dtype(cfg.dtype)))(params)
        self.cfg, self.mesh, self.eos_id = cfg, mesh, eos_id
        self.vocab_limit = vocab_limit or cfg.vocab_size
        ways = sharding.batch_ways(mesh, rules)
        self.max_len, self.max_queue = max_len, max_queue
        self.B = -(-max_batch // ways) * ways  # whole rows per batch shard
        self.P = -(-(prefill_rows or ways) // ways) * ways
        self.K = decode_steps
        self.C = min(chunk or cfg.attention_block, max_len)
        # prefill chunk lengths: C, C/2, C/4, ... down to 8 tokens (or C); a step
        # prefills its rows by the shortest that holds what the longest of them has left
        self.buckets = sorted({self.C} | {self.C >> k for k in range(1, 32)
                                          if self.C >> k >= 8})
        # paged: a pool of kv_pages pages of `page_size` slots that the B rows share,
        # each request holding the pages its prompt and max_tokens need (else each of
        # the B rows has its own S slots)
        self.paged, self.page = kv_pages > 0, page_size if kv_pages > 0 else 1
        self.kv_pages = kv_pages
        if self.paged and kv_pages * page_size < max_len:
            raise InputError(f"serve.kv_pages={kv_pages} pages of serve.page_size="
                             f"{page_size} hold {kv_pages * page_size} tokens, fewer than "
                             f"one request of serve.max_len={max_len}; raise serve.kv_pages")
        self.S = -(-max_len // self.page) * self.page
        # the prefill rows' cache has room for a last chunk that runs past the prompt
        self.S_prefill = max(max_len + self.C, self.S)
        # decode spans: the cache's first S/4, S/2, 3S/4 or all S slots (16 at least),
        # whole pages
        self.spans = sorted({self.S} | {-(-self.S * j // 4 // self.page) * self.page
                                        for j in (1, 2, 3) if self.S * j // 4 >= max(16, self.K)})
        # decode rows: paged, the first B/4, B/2, 3B/4 or all B rows, whichever holds the
        # decoding requests (packed into the first rows); else all B
        self.row_buckets = sorted({self.B} | ({-(-self.B * j // 4 // ways) * ways
                                               for j in (1, 2, 3)} if self.paged else set()))
        self.free_pages = list(range(1, kv_pages + 1))  # page 0: the discard page
        self.pages_of: dict[int, list[int]] = {}  # request id: its pages
        self.table = np.zeros((self.B, self.S // self.page), np.int32)  # rows' pages
        self._table_on_device = None
        self.waiting: collections.deque[Request] = collections.deque()
        self.peers = peers  # lockstep.Peers with several processes, else None
        self._ids = itertools.count()
        self.lock = threading.Lock()
        self.wake = threading.Event()
        # decode slots: the request, the next cache slot to write, the token to feed, the
        # draws so far, its sampling settings; kept on the device between decode calls
        # and uploaded again only when a slot gets a new request
        self.slot_req: list[Request | None] = [None] * self.B
        self.slot_state = np.zeros((3, self.B), np.int32)  # token to feed, slot, draws
        self.slot_ints = np.zeros((2, self.B), np.int32)  # seed, top_k
        self.slot_floats = np.zeros((2, self.B), np.float32)  # temperature, top_p
        self._slots_on_device = None  # (state, ints, floats)
        # prefill rows: the request, its prompt tokens prefilled so far, its reserved slot
        self.row_req: list[Request | None] = [None] * self.P
        # admitted requests (each with its decode slot) waiting for a prefill row
        self.pending: collections.deque[tuple[Request, int]] = collections.deque()
        self.row_done = np.zeros(self.P, np.int32)
        self.row_slot = np.zeros(self.P, np.int32)
        if mesh.devices.flat[0].platform == "cpu" and jnp.dtype(cfg.dtype).itemsize == 2:
            log.warning("serving in %s on CPUs: XLA:CPU converts the weights to fp32 on "
                        "every engine call (docs/benchmarks.md); model.dtype=float32 is "
                        "faster here", cfg.dtype)
        self._compile(model)

    # ------------------------------------------------------------------ device code

    def _pick(self, logits_BV, counts_B, ints_2B, floats_2B):
        """Each row's next token by its settings: ints_2B (seed, top_k), floats_2B
        (temperature, top_p)."""
        (seeds_B, top_k_B), (temps_B, top_p_B) = ints_2B, floats_2B
        real_V = jnp.arange(logits_BV.shape[-1]) < self.vocab_limit
        keys_B = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(
            seeds_B, counts_B)
        logits_BV = jnp.where(real_V, logits_BV, NEG)
        return jax.lax.cond(  # all greedy (the common case): no sorting for top-k/top-p
            jnp.all(temps_B == 0),
            lambda: jnp.argmax(logits_BV.astype(jnp.float32), axis=-1).astype(jnp.int32),
            lambda: sample_rows(logits_BV, keys_B, temps_B, top_k_B, top_p_B))

    def _replicated(self, x):
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, PartitionSpec()))

    def _prefill(self, params, cache, tokens_PC, ints_4P, floats_2P, *, span):
        """Chunk tokens_PC into rows from slots start_P on, attending to the cache's
        first `span` slots; the first new token of each row whose prompt ends at last_P
        in this chunk. ints_4P: start_P, last_P, seed, top_k; floats_2P: temperature,
        top_p (one upload each)."""
        model = nnx.merge(self.graphdef, params)
        start_P, last_P = ints_4P[0], ints_4P[1]
        x_PCD, cache = model.hidden(tokens_PC, cache=cache.at(start_P).within(span))
        x_P1D = jnp.take_along_axis(x_PCD, last_P[:, None, None], axis=1)
        logits_PV = model.logits(x_P1D)[:, 0]
        first_P = self._pick(logits_PV, jnp.zeros_like(start_P), ints_4P[2:], floats_2P)
        return self._replicated(first_P), cache.within(None)

    def _decode(self, params, cache, slots_3B, ints_2B, floats_2B, steps, *, span, rows):
        """`steps` (1 to K) decode steps of the first `rows` rows (R), each step feeding
        the token it picks to the next, attending to the cache's first `span` slots.
        slots_3B: each slot's token to feed, next cache slot, draws so far; ints_2B,
        floats_2B: its sampling settings. Returns tokens_KR (rows past `steps` are 0),
        the cache and slots_3B after them."""
        model = nnx.merge(self.graphdef, params)
        whole, R = cache, rows
        if R < self.B:  # paged: the pool is shared, the rows past R are not run
            cache = cache.first_rows(R)
        ints_2B, floats_2B = ints_2B[:, :R], floats_2B[:, :R]

        def step(k, carry):
            cache, (tokens_B, pos_B, counts_B), tokens_KB = carry
            logits_BV, cache = model.extend(tokens_B[:, None], cache.at(pos_B))
            next_B = self._pick(logits_BV, counts_B, ints_2B, floats_2B)
            tokens_KB = jax.lax.dynamic_update_index_in_dim(tokens_KB, next_B, k, axis=0)
            return cache, jnp.stack([next_B, pos_B + 1, counts_B + 1]), tokens_KB

        tokens_KR = jnp.zeros((self.K, R), jnp.int32)
        cache, slots_3R, tokens_KR = jax.lax.fori_loop(
            0, steps, step, (cache.within(span), slots_3B[:, :R], tokens_KR))
        if R < self.B:
            cache = whole.replace(k_LNPKH=cache.k_LNPKH, v_LNPKH=cache.v_LNPKH)
        return tokens_KR, cache.within(None), slots_3B.at[:, :R].set(slots_3R)

    def _compile(self, model) -> None:
        """The programs (prefill per chunk length and span, decode per span, copy a
        row), compiled now for their only shapes."""
        def empty(rows, length):  # a slot index per row, as the programs leave it
            return jax.jit(lambda: model.init_cache(rows, length).at(
                jnp.zeros(rows, jnp.int32)))()
        self.prefill_cache = empty(self.P, self.S_prefill)
        if self.paged:  # its table: a replicated array, as every upload of it
            self.cache = jax.jit(lambda: init_paged_cache(
                self.cfg, self.B, self.kv_pages, self.page, self.S, model.constrain))()
            self.cache = self.cache.replace(table_BM=self._global(self.table))
        else:
            self.cache = empty(self.B, self.S)
        i32, f32 = np.int32, np.float32
        P, B = self.P, self.B
        prefill = jax.jit(self._prefill, donate_argnums=(1,), static_argnames=("span",))
        # per chunk length: a program for first chunks (attending within the chunk) and
        # one for later ones (the whole cache)
        self._prefill_fns = {(C, span): prefill.lower(
            self.params, self.prefill_cache, self._global(np.zeros((P, C), i32)),
            self._global(np.zeros((4, P), i32)), self._global(np.zeros((2, P), f32)),
            span=span).compile() for C in self.buckets for span in (C, self.S_prefill)}
        rep = NamedSharding(self.mesh, PartitionSpec())
        cache_shardings = jax.tree.map(lambda x: x.sharding, self.cache)
        decode = jax.jit(  # outputs laid out as the inputs they become next
            self._decode, donate_argnums=(1, 2), static_argnames=("span", "rows"),
            out_shardings=(rep, cache_shardings, rep))
        # a call's step count, 1 to K, uploaded once here rather than on every call
        self._steps_on_device = {k: self._global(np.int32(k)) for k in range(1, self.K + 1)}
        self._decode_fns = {(span, rows): decode.lower(
            self.params, self.cache, self._global(np.zeros((3, B), i32)),
            self._global(np.zeros((2, B), i32)), self._global(np.zeros((2, B), f32)),
            self._steps_on_device[1], span=span, rows=rows).compile()
            for span in self.spans for rows in self.row_buckets}
        # copy a prefilled row into its decode slot (ints: the slot, the prefill row) or,
        # paged, into its pages (ints: the prefill row, then the M pages)
        copy = ((lambda into, ints, source: copy_pages(into, ints[1:], source, ints[0]))
                if self.paged else
                (lambda into, ints, source: copy_row(into, ints[0], source, ints[1])))
        self._copy_fn = jax.jit(copy, donate_argnums=(0,), out_shardings=cache_shardings).lower(
            self.cache, self._global(np.zeros(1 + self.table.shape[1] if self.paged else 2, i32)),
            self.prefill_cache).compile()

    # ------------------------------------------------------------------ host side

    def _global(self, x: np.ndarray):
        """A host array every process holds, as a replicated global array."""
        x = np.asarray(x)
        return jax.make_array_from_callback(
            x.shape, NamedSharding(self.mesh, PartitionSpec()), lambda idx: x[idx])

    def submit(self, request: Request) -> Request:
        """Queue a request (thread-safe); the engine's steps serve it. QueueFull when
        max_queue requests are waiting."""
        request.sampling.check()
        if not request.prompt:
            raise InputError("the prompt has no tokens; give some text")
        total = len(request.prompt) + request.sampling.max_tokens
        if total > self.max_len:
            raise InputError(f"the prompt's {len(request.prompt)} tokens plus max_tokens="
                             f"{request.sampling.max_tokens} is {total}, above serve.max_len="
                             f"{self.max_len}; shorten the prompt or ask for fewer tokens")
        with self.lock:
            if self.max_queue is not None and len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (serve.max_queue="
                                f"{self.max_queue}); retry later")
            request.id = next(self._ids)
            self.waiting.append(request)
        self.wake.set()
        return request

    @property
    def queued(self) -> int:
        """Requests waiting for a slot."""
        return len(self.waiting)

    @property
    def slots_busy(self) -> int:
        """Decode slots held (prefilling or decoding)."""
        return (sum(r is not None for r in self.slot_req)
                + sum(r is not None for r in self.row_req) + len(self.pending))

    @property
    def busy(self) -> int:
        """Requests waiting, prefilling or decoding."""
        return self.queued + self.slots_busy

    def step(self) -> bool:
        """One engine step: drop cancelled requests, admit waiting ones, prefill one chunk
        of each prefilling request, decode `decode_steps` tokens of each decoding one.
        False: there was nothing to do. With several processes (process 0 calls it), the
        step's plan (cancels, admissions) goes to the others first (`follow`)."""
        plan = self._plan()
        if self.peers is not None:
            if not plan.cancel and not plan.admit and not self.slots_busy:
                return False  # idle: nothing to tell the others
            self.peers.send(plan)
        return self._advance(plan)

    def follow(self) -> None:
        """A process other than 0: run process 0's steps, plan by plan, until it stops."""
        while (plan := self.peers.receive()) is None or not plan.stop:
            if plan is not None:
                self._advance(plan)

    def stop_followers(self) -> None:
        if self.peers is not None:
            self.peers.send(Plan(stop=True))

    def run(self, stop: threading.Event) -> None:
        """Serve until `stop` is set (the server's engine thread)."""
        while not stop.is_set():
            if not self.step():
                self.wake.wait(0.05)
                self.wake.clear()

    def generate(self, prompts: list[list[int]], sampling: Sampling | list[Sampling]
                 ) -> list[Request]:
        """Serve these prompts to the end from this thread (Python use, tests)."""
        each = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        requests = [self.submit(Request(p, s)) for p, s in zip(prompts, each)]
        while not all(r.done.is_set() for r in requests):
            self.step()
        return requests

    def cancel_all(self) -> None:
        """Cancel every request waiting, prefilling or decoding (thread-safe)."""
        with self.lock:
            requests = list(self.waiting)
        for r in requests + [r for r in self._held() if r is not None]:
            r.cancel()

    def _held(self) -> list[Request | None]:
        """The requests that hold a slot: pending, prefilling, decoding."""
        return [r for r, _ in self.pending] + self.row_req + self.slot_req

    def _plan(self) -> Plan:
        """What this step changes: the requests holding a slot that are cancelled, and
        the waiting ones that take a free slot, and paged the pages they need, in the
        order they came (their prefill comes first)."""
        with self.lock:
            dropped = [r for r in self.waiting if r._cancel]
            self.waiting = collections.deque(r for r in self.waiting if not r._cancel)
        for r in dropped:
            r._finish("cancelled")
        # one reading of the cancel flags (other threads set them): a slot is free here
        # only if its request is in this plan's cancels
        cancel = [r.id for r in self._held() if r is not None and r._cancel]
        kept = {r.id for r in self._held() if r is not None} - set(cancel)
        held = ({b for b, r in enumerate(self.slot_req) if r is not None and r.id in kept}
                | {int(self.row_slot[i]) for i, r in enumerate(self.row_req)
                   if r is not None and r.id in kept}
                | {b for r, b in self.pending if r.id in kept})
        free = [b for b in range(self.B) if b not in held]
        # paged: the pages free once this plan's cancels give theirs back
        pages = len(self.free_pages) + sum(len(self.pages_of.get(i, ())) for i in cancel)
        admit = []
        with self.lock:  # first come, first served: the next waits for a slot and pages
            while free and self.waiting and (need := self._pages_needed(self.waiting[0])
                                             ) <= pages:
                pages -= need
                admit.append((free.pop(0), self.waiting.popleft()))
        return Plan(cancel, admit)

    def _pages_needed(self, request: Request) -> int:
        """Pages for a request's prompt and max_tokens (taken when it is admitted; none
        without pages)."""
        if not self.paged:
            return 0
        return -(-(len(request.prompt) + request.sampling.max_tokens) // self.page)

    def _release(self, request: Request, slot: int | None = None) -> None:
        """A request that holds a slot is done: its pages go back, and its decode row
        (`slot`) is pointed at the discard page before any other request gets them."""
        self.free_pages = sorted(self.free_pages + self.pages_of.pop(request.id, []))
        if slot is not None and self.paged:
            self.table[slot] = 0
            self._table_on_device = None

    def _advance(self, plan: Plan) -> bool:
        """Apply the plan, then prefill and decode (every process, in step). Prefill
        runs call after call, rows refilled from the pending requests, until a full
        call's worth of tokens (P x C) is spent: many short prompts join at once, a long
        one takes a chunk per step."""
        gone = set(plan.cancel)
        for requests in (self.row_req, self.slot_req):
            for k, r in enumerate(requests):
                if r is not None and r.id in gone:
                    requests[k] = None
                    self._release(r, k if requests is self.slot_req else None)
                    r._finish("cancelled")
        for r, _ in [p for p in self.pending if p[0].id in gone]:
            self._release(r)
            r._finish("cancelled")
        self.pending = collections.deque(p for p in self.pending if p[0].id not in gone)
        for b, request in plan.admit:  # the lowest free pages (as on every process)
            n = self._pages_needed(request)
            self.pages_of[request.id], self.free_pages = (self.free_pages[:n],
                                                          self.free_pages[n:])
            self.pending.append((request, b))
        worked, spent = False, 0
        while spent < self.P * self.C:
            for i in range(self.P):
                if self.row_req[i] is None and self.pending:
                    request, b = self.pending.popleft()
                    self.row_req[i], self.row_done[i], self.row_slot[i] = request, 0, b
            if all(r is None for r in self.row_req):
                break
            spent += self._prefill_step()
            worked = True
        if any(r is not None for r in self.slot_req):
            self._decode_step()
            worked = True
        return worked

    def _prefill_step(self) -> int:
        """One chunk of each prefilling row; rows whose prompt ends move to their slot.
        Returns the tokens the call computed (P x its chunk)."""
        P = self.P
        left = max(len(r.prompt) - self.row_done[i] for i, r in enumerate(self.row_req)
                   if r is not None)
        C = next((c for c in self.buckets if c >= left), self.C)
        tokens = np.zeros((P, C), np.int32)
        ints = np.zeros((4, P), np.int32)  # first slot, last token's place, seed, top_k
        floats = np.zeros((2, P), np.float32)  # temperature, top_p
        ints[0] = self.row_done
        ends = []
        for i, r in enumerate(self.row_req):
            if r is None:
                continue
            piece = r.prompt[self.row_done[i]:self.row_done[i] + C]
            tokens[i, :len(piece)] = piece
            ints[1:, i] = len(piece) - 1, r.sampling.seed, r.sampling.top_k
            floats[:, i] = r.sampling.temperature, r.sampling.top_p
            if self.row_done[i] + len(piece) == len(r.prompt):
                ends.append(i)
        first_chunks = all(self.row_done[i] == 0 for i, r in enumerate(self.row_req)
                           if r is not None)
        span = C if first_chunks else self.S_prefill
        first, self.prefill_cache = self._prefill_fns[C, span](
            self.params, self.prefill_cache, self._global(tokens), self._global(ints),
            self._global(floats))
        first = np.asarray(first.addressable_data(0))
        for i, r in enumerate(self.row_req):
            if r is not None:
                self.row_done[i] += C
        for i in ends:
            r, b = self.row_req[i], int(self.row_slot[i])
            self.row_req[i] = None
            if self.paged:  # the row's table is all page 0 until now
                self.table[b, :len(self.pages_of[r.id])] = self.pages_of[r.id]
                self._table_on_device = None
                where = np.concatenate([[i], self.table[b]])
            else:
                where = np.array([b, i])
            self.cache = self._copy_fn(self.cache, self._global(where.astype(np.int32)),
                                       self.prefill_cache)
            self.slot_req[b] = r
            self.slot_state[:, b] = first[i], len(r.prompt), 1
            self.slot_ints[:, b] = r.sampling.seed, r.sampling.top_k
            self.slot_floats[:, b] = r.sampling.temperature, r.sampling.top_p
            self._slots_on_device = None
            self._take(b, [int(first[i])])
        return P * C

    def _decode_step(self) -> None:
        if self.paged:
            self._pack()
        if self._slots_on_device is None:  # a slot has a new request: upload the slots
            self._slots_on_device = tuple(map(self._global, (
                self.slot_state, self.slot_ints, self.slot_floats)))
        if self.paged and self._table_on_device is None:
            self._table_on_device = self._global(self.table)
            self.cache = self.cache.replace(table_BM=self._table_on_device)
        state, ints, floats = self._slots_on_device
        decoding = [(b, r) for b, r in enumerate(self.slot_req) if r is not None]
        # K steps, or fewer when a request reaches its max_tokens sooner: its slot is
        # not left idle for the rest of the call
        steps = min([self.K] + [r.sampling.max_tokens - len(r.tokens) for _, r in decoding])
        # the shortest span that holds the slots every decoding row writes in this call
        need = max(int(self.slot_state[1, b]) for b, _ in decoding) + steps
        span = next((s for s in self.spans if s >= need), self.S)
        rows = next(n for n in self.row_buckets if n > decoding[-1][0])
        tokens_KR, self.cache, state = self._decode_fns[span, rows](
            self.params, self.cache, state, ints, floats, self._steps_on_device[steps])
        self._slots_on_device = (state, ints, floats)
        tokens_KR = np.asarray(tokens_KR.addressable_data(0))[:steps]
        self.slot_state[0, :rows] = tokens_KR[-1]
        self.slot_state[1:, :rows] += steps
        for b, _ in decoding:
            self._take(b, tokens_KR[:, b].tolist())

    def _pack(self) -> None:
        """Paged: move the decoding requests of the last rows into free rows before
        them (a row's keys and values stay in its pages; only the table row and the
        slot's settings move), so that a decode call runs as few rows as hold them."""
        reserved = {b for _, b in self.pending} | {
            int(self.row_slot[i]) for i, r in enumerate(self.row_req) if r is not None}
        free = [b for b in range(self.B) if self.slot_req[b] is None and b not in reserved]
        while free and (last := max((b for b, r in enumerate(self.slot_req)
                                     if r is not None), default=-1)) > free[0]:
            to = free.pop(0)
            for a in (self.slot_state, self.slot_ints, self.slot_floats):
                a[:, to] = a[:, last]
            self.table[to], self.table[last] = self.table[last], 0
            self.slot_req[to], self.slot_req[last] = self.slot_req[last], None
            free.append(last)
            free.sort()
            self._slots_on_device = self._table_on_device = None

    def _take(self, b: int, tokens: list[int]) -> None:
        """Slot b's request got `tokens` (one call's): pass on those before its end (EOS,
        a stop id, max_tokens), and if it ended, finish it and free the slot."""
        r, kept, reason = self.slot_req[b], [], None
        for token in tokens:
            if (token == self.eos_id and not r.sampling.ignore_eos) or token in r.stop_ids:
                reason = "stop"
                break
            kept.append(token)
            if len(r.tokens) + len(kept) >= r.sampling.max_tokens:
                reason = "length"
                break
        if kept:
            r._emit(kept)
        if reason is not None:
            self.slot_req[b] = None
            self._release(r, b)
            r._finish(reason)
