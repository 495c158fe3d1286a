"""`python -m train.generate --checkpoint PATH --prompt "..." [--config X.yaml key=value ...]`

Sharded generation with a KV cache. PATH is a run's output_dir (its latest checkpoint),
a checkpoints dir, one step's dir, or an export (`python -m train.export`,
`python -m train.convert hf-to-ckpt`); the model config is the one saved beside it, the
mesh and rules come from --config and overrides (default: configs/default.yaml's).

Prompts of different lengths are left-padded to the longest (padding masked, positions
counted from each prompt's first token, so each continues as it would alone); the batch
is padded up to a multiple of the mesh's data x fsdp ways. One jitted prefill runs the
prompts, model.attention_block (512) tokens at a time so long prompts never hold all
their attention scores at once, and picks the first new token; one jitted `while_loop`
decodes the rest on the device (stopping when every sequence has produced EOS or
--max-new-tokens tokens).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from train.cli import guarded, parse, parser, start_tool


@dataclasses.dataclass
class Generated:
    tokens: list[list[int]]  # each prompt's new tokens, without the EOS that ended it
    finished: list[bool]  # ended by EOS (else by the token limit)
    prefill_tokens: int  # real prompt tokens processed (padding excluded)
    prefill_s: float
    decode_tokens: int  # new tokens produced after the first (one decode step each)
    decode_s: float
    compile_s: float


class Generator:
    """Greedy or sampled continuation of token prompts by a sharded model.

    `vocab_limit`: token ids at and above it (vocabulary padding) are never produced.
    """

    def __init__(self, model, mesh, rules, *, eos_id: int, vocab_limit: int | None = None,
                 prefill_chunk: int | None = None):
        import jax
        import jax.numpy as jnp
        from flax import nnx
        from models.decode import inference_params
        self.graphdef, params = nnx.split(model)
        self.params = jax.jit(lambda p: inference_params(p, jnp.dtype(model.cfg.dtype)))(params)
        self.cfg, self.mesh, self.rules = model.cfg, mesh, rules
        self.eos_id = eos_id
        self.vocab_limit = vocab_limit or self.cfg.vocab_size
        self.ways = mesh.shape["data"] * mesh.shape["fsdp"]
        self.prefill_chunk = prefill_chunk or self.cfg.attention_block
        self._compiled: dict = {}

    # ------------------------------------------------------------------ device code

    def _prefill(self, params, tokens_BP, pad_B, key, *, max_len, temperature, top_k, top_p):
        """The prompts, `prefill_chunk` tokens at a time (a scan over chunks: the scores
        held at once are B x N x chunk x S), then the first new token."""
        import jax
        import jax.numpy as jnp
        from flax import nnx
        from models import decode
        model = nnx.merge(self.graphdef, params)
        B, P = tokens_BP.shape
        C = min(self.prefill_chunk, P)  # the caller pads P to a multiple of C
        cache = decode.init_cache(model, B, max_len)
        tokens_nBC = tokens_BP.reshape(B, P // C, C).transpose(1, 0, 2)

        def chunk(cache, xs):
            tokens_BC, start = xs
            logits_BV, cache = decode.forward(model, tokens_BC, cache, start, pad_B)
            return cache, logits_BV

        starts_n = jnp.arange(P // C, dtype=jnp.int32) * C
        cache, logits_nBV = jax.lax.scan(chunk, cache, (tokens_nBC, starts_n))
        logits_BV = logits_nBV[-1]
        key, sub = jax.random.split(key)
        return self._pick(logits_BV, sub, temperature, top_k, top_p), cache, key

    def _pick(self, logits_BV, key, temperature, top_k, top_p):
        import jax.numpy as jnp
        from models.sampling import NEG, sample
        real_V = jnp.arange(logits_BV.shape[-1]) < self.vocab_limit
        return sample(jnp.where(real_V, logits_BV, NEG), key, temperature, top_k, top_p)

    def _decode(self, params, first_B, cache, pad_B, key, *, prompt_len, max_new,
                temperature, top_k, top_p):
        import jax
        import jax.numpy as jnp
        from flax import nnx
        from models import decode
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
            logits_BV, cache = decode.forward(model, prev_B[:, None], cache,
                                              prompt_len + i - 1, pad_B)
            key, sub = jax.random.split(key)
            tok_B = jnp.where(done_B, self.eos_id,
                              self._pick(logits_BV, sub, temperature, top_k, top_p))
            out_BN = jax.lax.dynamic_update_index_in_dim(out_BN, tok_B, i, axis=1)
            return i + 1, cache, out_BN, done_B | (tok_B == self.eos_id), key

        steps, cache, out_BN, _, _ = jax.lax.while_loop(
            cond, body, (jnp.int32(1), cache, out_BN, done_B, key))
        from jax.sharding import NamedSharding, PartitionSpec
        # replicated, so every process reads all rows from its own devices
        out_BN = jax.lax.with_sharding_constraint(out_BN, NamedSharding(self.mesh,
                                                                        PartitionSpec()))
        return out_BN, steps, cache  # the cache returned, so it is updated in place

    # ------------------------------------------------------------------ host side

    def _global(self, x: np.ndarray):
        """A host array every process holds, as a replicated global array."""
        import jax
        from jax.sharding import NamedSharding, PartitionSpec
        return jax.make_array_from_callback(
            x.shape, NamedSharding(self.mesh, PartitionSpec()), lambda idx: x[idx])

    def generate(self, prompts: list[list[int]], max_new_tokens: int, *,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int = 0) -> Generated:
        import jax
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.cfg.max_seq_len:
            raise ValueError(f"the longest prompt has {longest} tokens; with --max-new-tokens "
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
            lambda p, f, c, s, k: self._decode(p, f, c, s, k, prompt_len=P,
                                               max_new=max_new_tokens, **sampling),
            donate_argnums=(2,)).lower(self.params, first, cache, pad, key).compile())
        compile_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        out_BN, steps, _ = decode_fn(self.params, first, cache, pad, key)
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
        """Batch rows generated for n prompts: whole rows per data x fsdp shard."""
        return -(-n // self.ways) * self.ways

    def _compile(self, name, key, build):
        if (name, key) not in self._compiled:
            self._compiled[(name, key)] = build()
        return self._compiled[(name, key)]


def main(argv=None) -> None:
    p = parser("Generate text with a trained (or converted) model.")
    p.add_argument("--checkpoint", required=True,
                   help="run output_dir, checkpoints dir, one step's dir, or an export")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="a text file, one prompt per line (a literal \\n "
                   "in a line stands for a newline)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="0: no top-k cut")
    p.add_argument("--top-p", type=float, default=1.0, help="1: no nucleus cut")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", help="tokenizer file (default: the one the model came with)")
    user, args = parse(p, argv)
    from train.cli import fail
    prompts = list(args.prompt)
    if args.prompts_file:
        try:
            with open(args.prompts_file, encoding="utf-8") as f:
                prompts += [line.rstrip("\n").replace("\\n", "\n") for line in f if line.strip()]
        except OSError as e:
            fail(f"--prompts-file {args.prompts_file!r}: {e.strerror}")
    if not prompts:
        fail("give a prompt: --prompt TEXT (repeatable) or --prompts-file FILE")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        fail("--temperature must be >= 0, --top-k >= 0 and --top-p in (0, 1]")

    def go():
        is_main = start_tool(user)
        from train.load import find_tokenizer, load
        loaded = load(args.checkpoint, user, args.overrides)
        tok = find_tokenizer(loaded, args.tokenizer)
        encode = getattr(tok, "encode_prompts", tok.encode_batch)
        ids = encode(prompts)
        if any(not x for x in ids):
            fail("a prompt encodes to no tokens; give some text")
        gen = Generator(loaded.model, loaded.mesh, loaded.rules, eos_id=tok.eos_id,
                        vocab_limit=min(tok.vocab_size, loaded.cfg.model.vocab_size))
        try:
            out = gen.generate(ids, args.max_new_tokens, temperature=args.temperature,
                               top_k=args.top_k, top_p=args.top_p, seed=args.seed)
        except ValueError as e:
            fail(str(e))
        if not is_main:
            return
        for i, (text, new, done) in enumerate(zip(prompts, out.tokens, out.finished)):
            print(f"--- {i}: {len(new)} new tokens{' (EOS)' if done else ''}")
            print(text + tok.decode(new))
        print(f"prefill {out.prefill_tokens} tokens in {out.prefill_s:.3f} s "
              f"({out.prefill_tokens / max(out.prefill_s, 1e-9):,.0f} tokens/s) | decode "
              f"{out.decode_tokens} tokens in {out.decode_s:.3f} s "
              f"({out.decode_tokens / max(out.decode_s, 1e-9):,.0f} tokens/s) | compile "
              f"{out.compile_s:.1f} s | {loaded.where}")

    guarded(go)


if __name__ == "__main__":
    main()
