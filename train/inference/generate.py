"""Sharded generation with a KV cache: the Transformer's own forward path (`extend`),
run on a batch of prompts.

Prompts of different lengths are left-padded to the longest (padding masked, positions
counted from each prompt's first token, so each continues as it would alone); the batch
is padded up to a multiple of the mesh's batch ways. One jitted prefill runs the
prompts, `prefill_chunk` (model.attention_block) tokens at a time so long prompts never
hold all their attention scores at once, and picks the first new token; one jitted
`while_loop` decodes the rest on the device (stopping when every sequence has produced
EOS or max_new_tokens tokens).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import sharding
from models.sampling import NEG, sample
from train.config import Config
from train.errors import InputError
from train.inference.load import find_tokenizer, load


@dataclasses.dataclass
class Generated:
    tokens: list[list[int]]  # each prompt's new tokens, without the EOS that ended it
    finished: list[bool]  # ended by EOS (else by the token limit)
    prefill_tokens: int  # real prompt tokens processed (padding excluded)
    prefill_s: float
    decode_tokens: int  # new tokens produced after the first (one decode step each)
    decode_s: float
    compile_s: float


def inference_params(params: Any, dtype) -> Any:
    """The params (nnx.State) with every matrix cast once to the compute dtype, as the
    forward pass casts them on each use (so the results are the same): per-token decode
    then reads weights in the compute dtype instead of reading fp32 and casting.
    Matrices are the stacked layer arrays of rank >= 3 and the other arrays of rank >= 2;
    norm scales and biases keep their dtype."""
    def cast(path, x):
        layered = any(getattr(k, "key", None) == "blocks" for k in path)
        if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim >= (3 if layered else 2):
            return x.astype(dtype)
        return x
    return jax.tree_util.tree_map_with_path(cast, params)


class Generator:
    """Greedy or sampled continuation of token prompts by a sharded model.

    `vocab_limit`: token ids at and above it (vocabulary padding) are never produced.
    """

    def __init__(self, model, mesh, rules, *, eos_id: int, vocab_limit: int | None = None,
                 prefill_chunk: int | None = None):
        self.graphdef, params = nnx.split(model)
        self.params = jax.jit(lambda p: inference_params(p, jnp.dtype(model.cfg.dtype)))(params)
        self.cfg, self.mesh, self.rules = model.cfg, mesh, rules
        self.eos_id = eos_id
        self.vocab_limit = vocab_limit or self.cfg.vocab_size
        self.ways = sharding.batch_ways(mesh, rules)
        self.prefill_chunk = prefill_chunk or self.cfg.attention_block
        self._compiled: dict = {}

    # ------------------------------------------------------------------ device code

    def _prefill(self, params, tokens_BP, pad_B, key, *, max_len, temperature, top_k, top_p):
        """The prompts, `prefill_chunk` tokens at a time (a scan over chunks: the scores
        held at once are B x N x chunk x S), then the first new token."""
        model = nnx.merge(self.graphdef, params)
        B, P = tokens_BP.shape
        C = min(self.prefill_chunk, P)  # the caller pads P to a multiple of C
        tokens_nBC = tokens_BP.reshape(B, P // C, C).transpose(1, 0, 2)

        def chunk(cache, xs):
            tokens_BC, start = xs
            logits_BV, cache = model.extend(tokens_BC, cache.at(start))
            return cache, logits_BV

        starts_n = jnp.arange(P // C, dtype=jnp.int32) * C
        cache, logits_nBV = jax.lax.scan(chunk, model.init_cache(B, max_len, pad_B),
                                         (tokens_nBC, starts_n))
        key, sub = jax.random.split(key)
        return self._pick(logits_nBV[-1], sub, temperature, top_k, top_p), cache, key

    def _pick(self, logits_BV, key, temperature, top_k, top_p):
        real_V = jnp.arange(logits_BV.shape[-1]) < self.vocab_limit
        return sample(jnp.where(real_V, logits_BV, NEG), key, temperature, top_k, top_p)

    def _decode(self, params, first_B, cache, key, *, prompt_len, max_new,
                temperature, top_k, top_p):
        model = nnx.merge(self.graphdef, params)
        B = first_B.shape[0]
        out_BN = jnp.full((B, max_new), self.eos_id, jnp.int32).at[:, 0].set(first_B)
        done_B = first_B == self.eos_id

        def cond(c):
            i, _, _, done_B, _ = c
            return (i < max_new) & ~jnp.all(done_B)

        def body(c):
            i, cache, out_BN, done_B, key = c
            prev_B = jax.lax.dynamic_index_in_dim(out_BN, i - 1, axis=1, keepdims=False)
            logits_BV, cache = model.extend(prev_B[:, None], cache.at(prompt_len + i - 1))
            key, sub = jax.random.split(key)
            tok_B = jnp.where(done_B, self.eos_id,
                              self._pick(logits_BV, sub, temperature, top_k, top_p))
            out_BN = jax.lax.dynamic_update_index_in_dim(out_BN, tok_B, i, axis=1)
            return i + 1, cache, out_BN, done_B | (tok_B == self.eos_id), key

        steps, cache, out_BN, _, _ = jax.lax.while_loop(
            cond, body, (jnp.int32(1), cache, out_BN, done_B, key))
        # replicated, so every process reads all rows from its own devices
        out_BN = jax.lax.with_sharding_constraint(out_BN, NamedSharding(self.mesh,
                                                                        PartitionSpec()))
        return out_BN, steps, cache  # the cache returned, so it is updated in place

    # ------------------------------------------------------------------ host side

    def _global(self, x: np.ndarray):
        """A host array every process holds, as a replicated global array."""
        return jax.make_array_from_callback(
            x.shape, NamedSharding(self.mesh, PartitionSpec()), lambda idx: x[idx])

    def generate(self, prompts: list[list[int]], max_new_tokens: int, *,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int = 0) -> Generated:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise InputError("every prompt needs at least one token")
        if max_new_tokens < 1:
            raise InputError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.cfg.max_seq_len:
            raise InputError(f"the longest prompt has {longest} tokens; with --max-new-tokens "
                             f"{max_new_tokens} that is {longest + max_new_tokens}, above the "
                             f"model's max_seq_len={self.cfg.max_seq_len}; shorten the prompt "
                             "or generate fewer tokens")
        # left padding up to whole prefill chunks (positions count from each prompt's
        # first token, so cache slots may run past max_seq_len; positions never do)
        C = min(self.prefill_chunk, longest)
        P = -(-longest // C) * C
        max_len = P + max_new_tokens
        n = len(prompts)
        B = self.padded(n)
        rows = prompts + [prompts[0]] * (B - n)
        tokens_BP = np.zeros((B, P), np.int32)
        pad_B = np.array([P - len(r) for r in rows], np.int32)
        for b, r in enumerate(rows):
            tokens_BP[b, pad_B[b]:] = r
        tokens, pad, key = (self._global(tokens_BP), self._global(pad_B),
                            jax.random.key(seed))
        sampling = dict(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))

        t0 = time.perf_counter()
        prefill = self._compile("prefill", (B, P, max_len, *sampling.values()), lambda: jax.jit(
            lambda p, t, s, k: self._prefill(p, t, s, k, max_len=max_len, **sampling)
        ).lower(self.params, tokens, pad, key).compile())
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        first, cache, key = prefill(self.params, tokens, pad, key)
        first.block_until_ready()
        prefill_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        decode_fn = self._compile("decode", (B, P, max_len, *sampling.values()), lambda: jax.jit(
            lambda p, f, c, k: self._decode(p, f, c, k, prompt_len=P, max_new=max_new_tokens,
                                            **sampling),
            donate_argnums=(2,)).lower(self.params, first, cache, key).compile())
        compile_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        out_BN, steps, _ = decode_fn(self.params, first, cache, key)
        out_BN = np.asarray(out_BN.addressable_data(0))  # replicated: the whole array
        decode_s = time.perf_counter() - t0

        steps = int(np.asarray(steps.addressable_data(0)))
        new, finished = [], []
        for row in out_BN[:n, :steps].tolist():
            end = row.index(self.eos_id) if self.eos_id in row else len(row)
            new.append(row[:end])
            finished.append(end < len(row))
        return Generated(new, finished, sum(map(len, prompts)), prefill_s,
                         n * (steps - 1), decode_s, compile_s)

    def padded(self, n: int) -> int:
        """Batch rows generated for n prompts: whole rows per batch shard."""
        return -(-n // self.ways) * self.ways

    def _compile(self, name, key, build):
        if (name, key) not in self._compiled:
            self._compiled[(name, key)] = build()
        return self._compiled[(name, key)]


def read_prompts(prompts: list[str], prompts_file: str | None = None) -> list[str]:
    """The prompts given one by one, then those of a file (one per line; a literal \\n
    in a line stands for a newline)."""
    prompts = list(prompts)
    if prompts_file:
        try:
            with open(prompts_file, encoding="utf-8") as f:
                prompts += [line.rstrip("\n").replace("\\n", "\n") for line in f if line.strip()]
        except OSError as e:
            raise InputError(f"--prompts-file {prompts_file!r}: {e.strerror}") from None
    if not prompts:
        raise InputError("give a prompt: --prompt TEXT (repeatable) or --prompts-file FILE")
    return prompts


def generate_text(user: Config, overrides: Sequence[str], checkpoint: str, prompts: list[str],
                  *, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                  top_p: float = 1.0, seed: int = 0, tokenizer: str | None = None) -> str:
    """Continue each text prompt with the model at `checkpoint` on the user's mesh: what
    `python -m train.generate` prints (each continuation, then the speeds)."""
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise InputError("--temperature must be >= 0, --top-k >= 0 and --top-p in (0, 1]")
    loaded = load(checkpoint, user, overrides)
    tok = find_tokenizer(loaded, tokenizer)
    ids = getattr(tok, "encode_prompts", tok.encode_batch)(prompts)
    if any(not x for x in ids):
        raise InputError("a prompt encodes to no tokens; give some text")
    gen = Generator(loaded.model, loaded.mesh, loaded.rules, eos_id=tok.eos_id,
                    vocab_limit=min(tok.vocab_size, loaded.cfg.model.vocab_size))
    out = gen.generate(ids, max_new_tokens, temperature=temperature, top_k=top_k,
                       top_p=top_p, seed=seed)
    lines = []
    for i, (text, new, done) in enumerate(zip(prompts, out.tokens, out.finished)):
        lines.append(f"--- {i}: {len(new)} new tokens{' (EOS)' if done else ''}")
        lines.append(text + tok.decode(new))
    lines.append(f"prefill {out.prefill_tokens} tokens in {out.prefill_s:.3f} s "
                 f"({out.prefill_tokens / max(out.prefill_s, 1e-9):,.0f} tokens/s) | decode "
                 f"{out.decode_tokens} tokens in {out.decode_s:.3f} s "
                 f"({out.decode_tokens / max(out.decode_s, 1e-9):,.0f} tokens/s) | compile "
                 f"{out.compile_s:.1f} s | {loaded.where}")
    return "\n".join(lines)
