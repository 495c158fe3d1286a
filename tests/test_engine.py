"""The continuous-batching engine against static-batch generation (train.inference
Generator) on a 2x2x2 mesh: each request's tokens as if it ran alone, seeds that make
sampling reproducible whatever else is in the batch, slots freed at once, no compile
after the engine is built; streamed text (UTF-8 and stop strings)."""

import collections

import jax
import jax.monitoring
import numpy as np
import pytest
from test_generate import built

from models.sampling import allowed, sample_rows
from train.config import ConfigError, load_config
from train.errors import InputError
from train.inference import Generator
from train.inference.engine import Engine, Request, Sampling
from train.inference.text import TextStream

from helpers import REPO

EOS = 127  # outside the vocabulary the model may produce (vocab_limit 127): no EOS
rng = np.random.default_rng(3)
# lengths that vary 20x, more requests than slots, prompts longer than a chunk
PROMPTS = [rng.integers(0, 127, n).tolist() for n in (1, 20, 3, 13, 7, 2, 17, 5, 9, 11)]
MAX_TOKENS = [12, 3, 16, 5, 1, 9, 14, 2, 7, 10]


@pytest.fixture(scope="module")
def mesh_model():
    return built("llama", (2, 2, 2))


@pytest.fixture(scope="module", params=[(1, None, 4), (3, 8, 16)], ids=["1-step", "3-steps"])
def engine(mesh_model, request):
    """One decode step per call, 4 prefill rows (the batch ways), 4-token chunks; or up
    to 3 steps per call (fewer where a request reaches its limit sooner), 8 rows, chunks
    of 16 or 8 tokens (the shortest that holds what is left)."""
    model, mesh, rules = mesh_model
    steps, rows, chunk = request.param
    return Engine(model, mesh, rules, eos_id=EOS, vocab_limit=127, max_batch=4, max_len=40,
                  chunk=chunk, decode_steps=steps, prefill_rows=rows)


@pytest.fixture(scope="module")
def static(mesh_model):
    """Each prompt's greedy continuation by the static batch of all of them."""
    model, mesh, rules = mesh_model
    gen = Generator(model, mesh, rules, eos_id=EOS, vocab_limit=127)
    return gen.generate(PROMPTS, max(MAX_TOKENS)).tokens


def count_compiles():
    seen = []

    def listen(event, seconds, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            seen.append(event)
    jax.monitoring.register_event_duration_secs_listener(listen)
    return seen, lambda: jax.monitoring.unregister_event_duration_listener(listen)


def spans_used(engine):
    """The engine's programs wrapped to count the attention spans they are called
    with and the steps of decode calls: {"decode": Counter((span, rows)), "prefill":
    Counter((chunk, span)), "steps": Counter(steps)}, and a restore."""
    used = {kind: collections.Counter() for kind in ("decode", "prefill", "steps")}
    kept = engine._decode_fns, engine._prefill_fns

    def counted(kind, key, fn):
        def call(*args):
            used[kind].update([key])
            if kind == "decode":
                used["steps"].update([int(np.asarray(args[-1]))])
            return fn(*args)
        return call
    engine._decode_fns = {k: counted("decode", k, f) for k, f in kept[0].items()}
    engine._prefill_fns = {k: counted("prefill", k, f) for k, f in kept[1].items()}

    def restore():
        engine._decode_fns, engine._prefill_fns = kept
    return used, restore


def test_continuous_batching_gives_each_request_what_it_gets_alone(engine, static):
    """Ten requests of 1 to 20 prompt tokens and 1 to 16 new ones through 4 slots:
    each gets the static batch's greedy tokens, cut to its own limit; none compiles.
    Attention reads the shortest span of the cache that holds every row (20 or 30 of
    the 40 slots here; a first chunk within itself, later ones all the prefill cache).
    With 3 steps per call, calls are cut short where a request reaches its limit."""
    assert (engine.B, engine.S) == (4, 40)
    assert (engine.P, engine.buckets) in ((4, [4]), (8, [8, 16]))
    assert engine.spans == [20, 30, 40]
    seen, stop = count_compiles()
    used, restore = spans_used(engine)
    try:
        done = engine.generate(PROMPTS, [Sampling(max_tokens=n) for n in MAX_TOKENS])
    finally:
        stop()
        restore()
    assert seen == []
    for r, want, n in zip(done, static, MAX_TOKENS):
        assert r.tokens == want[:n] and r.finish_reason == "length"
    assert {20, 30} <= {span for span, _ in used["decode"]}
    assert {span == chunk for chunk, span in used["prefill"]} == {True, False}
    assert set(used["steps"]) == ({1} if engine.K == 1 else {1, 2, 3})
    assert engine.busy == 0 and all(r is None for r in engine.slot_req)


def test_eos_ends_a_request_and_is_not_one_of_its_tokens(mesh_model, static):
    model, mesh, rules = mesh_model
    eos = static[0][4]  # the fifth token of the first prompt's continuation
    eng = Engine(model, mesh, rules, eos_id=eos, vocab_limit=127, max_batch=4, max_len=40,
                 chunk=4, decode_steps=3)  # EOS ends the first request inside a call
    want = Generator(model, mesh, rules, eos_id=eos, vocab_limit=127).generate(
        PROMPTS[:4], 12)
    done = eng.generate(PROMPTS[:4], Sampling(max_tokens=12))
    assert [r.tokens for r in done] == want.tokens
    assert [r.finish_reason == "stop" for r in done] == want.finished
    assert done[0].tokens == static[0][:4] and done[0].finish_reason == "stop"


def test_a_seed_gives_the_same_draws_whatever_else_is_in_the_batch(engine):
    hot = Sampling(max_tokens=10, temperature=1.5, top_k=50, top_p=0.9, seed=7)
    alone = engine.generate([PROMPTS[1]], hot)[0].tokens
    others = [Sampling(max_tokens=8, temperature=1.0, seed=i) for i in range(5)]
    crowd = engine.generate(PROMPTS[:6], others[:1] + [hot] + others[1:])
    assert crowd[1].tokens == alone
    other = engine.generate([PROMPTS[1]], Sampling(max_tokens=10, temperature=1.5, top_k=50,
                                                   top_p=0.9, seed=8))[0].tokens
    assert other != alone  # the seed matters
    assert len({tuple(r.tokens) for r in crowd}) == 6


def test_a_cancelled_request_frees_its_slot_for_the_next(engine):
    """Four long requests fill the four slots, a fifth waits; cancelling one lets the
    fifth in at once and it completes as it would alone."""
    longs = [engine.submit(Request(p, Sampling(max_tokens=25))) for p in PROMPTS[2:6]]
    fifth = engine.submit(Request(PROMPTS[0], Sampling(max_tokens=12)))
    for _ in range(6):
        engine.step()
    assert all(r.tokens for r in longs) and not fifth.tokens and len(engine.waiting) == 1
    longs[1].cancel()
    engine.step()
    assert longs[1].finish_reason == "cancelled" and len(engine.waiting) == 0
    assert fifth.tokens  # admitted and prefilled in the step that freed the slot
    assert not any(r.done.is_set() for r in (longs[0], longs[2], longs[3]))
    while not fifth.done.is_set():
        engine.step()
    for r in longs:
        r.cancel()
    engine.step()
    assert engine.busy == 0
    assert fifth.tokens == engine.generate([PROMPTS[0]], Sampling(max_tokens=12))[0].tokens


def test_requests_over_the_cache_or_with_bad_settings_are_refused(engine):
    with pytest.raises(InputError, match="above serve.max_len=40"):
        engine.submit(Request(PROMPTS[1], Sampling(max_tokens=21)))
    with pytest.raises(InputError, match="top_p in"):
        engine.submit(Request(PROMPTS[1], Sampling(top_p=0)))
    with pytest.raises(InputError, match="below 2..31"):
        engine.submit(Request(PROMPTS[1], Sampling(seed=2**31)))
    with pytest.raises(InputError, match="no tokens"):
        engine.submit(Request([], Sampling()))
    model, mesh, rules = built("llama")
    with pytest.raises(InputError, match="serve.max_len=999 is above the model's"):
        Engine(model, mesh, rules, eos_id=EOS, max_len=999)


def test_each_rows_draws_keep_to_its_own_top_k_and_top_p():
    """sample_rows with a different setting per row: the greedy row gives the argmax; a
    sampled row draws only from the set `allowed` gives it, and every token of that set
    with 5% or more of its (tempered, cut) probability turns up in 300 draws."""
    logits = jax.random.normal(jax.random.key(0), (1, 12)) * 2
    settings = [(0.0, 0, 1.0), (1.0, 3, 1.0), (0.7, 0, 0.6), (1.3, 5, 0.8), (2.0, 0, 1.0)]
    R = len(settings)
    temps, top_k, top_p = (np.array(col) for col in zip(*settings))
    draw = jax.jit(lambda key: sample_rows(
        np.repeat(logits, R, 0), jax.random.split(key, R), temps.astype(np.float32),
        top_k.astype(np.int32), top_p.astype(np.float32)))
    draws = np.stack([np.asarray(draw(jax.random.key(i))) for i in range(300)])
    assert set(draws[:, 0].tolist()) == {int(np.argmax(logits))}
    for r, (t, k, p) in enumerate(settings[1:], 1):
        keep = np.asarray(allowed(logits / t, k, p))[0]
        probs = np.asarray(jax.nn.softmax(np.where(keep, logits[0] / t, -np.inf)))
        got = set(draws[:, r].tolist())
        assert got <= set(np.flatnonzero(keep).tolist()), (r, got)
        assert set(np.flatnonzero(probs >= 0.05).tolist()) <= got, (r, got)


def test_streamed_text_never_splits_a_character_nor_shows_a_stop_string():
    """Byte tokens: a 3-byte character arrives whole; a stop string spanning three
    tokens is found, and nothing of it, nor of a near miss that turns out not to be it,
    is sent early."""
    decode = lambda ids: bytes(ids).decode("utf-8", errors="replace")
    stream = TextStream(decode, stops=["END"])
    pieces = [stream.push(b) for b in "a€bEN".encode() + b"x" + "ENEND!".encode()]
    assert pieces[:5] == ["a", "", "", "€", "b"]  # € is 3 bytes
    assert "".join(pieces) == "a€bENxEN" and stream.stopped
    assert stream.push(ord("z")) == "" and stream.finish() == ""
    plain = TextStream(decode)
    text = "".join(plain.push(b) for b in "naï".encode()[:-1]) + plain.finish()
    assert text == "na\ufffd"  # cut short inside a character: sent as it decodes
    tail = TextStream(decode, stops=["\n\n"])
    assert [tail.push(b) for b in b"hi\n"] == ["h", "i", ""]
    assert tail.finish() == "\n"  # held back, then flushed at the end


@pytest.fixture(scope="module")
def paged(mesh_model):
    """8 decode rows sharing 24 pages of 4 slots (96 tokens): the ten requests need 45
    pages, so some wait for pages with rows free."""
    model, mesh, rules = mesh_model
    return Engine(model, mesh, rules, eos_id=EOS, vocab_limit=127, max_batch=8, max_len=40,
                  chunk=8, decode_steps=3, kv_pages=24, page_size=4)


def test_a_paged_cache_gives_each_request_what_it_gets_alone(paged, static):
    """Through a paged cache each request gets the static batch's greedy tokens; the
    decode calls run the first 4 rows when the decoding requests fit in them (packed
    there as others finish), else all 8; every page comes back; none compiles."""
    assert (paged.B, paged.row_buckets, paged.spans) == (8, [4, 8], [20, 32, 40])
    seen, stop = count_compiles()
    used, restore = spans_used(paged)
    most = [0]
    taken = paged._plan

    def plan():  # the pages held never exceed the pool's
        most[0] = max(most[0], 24 - len(paged.free_pages))
        return taken()
    paged._plan = plan
    try:
        done = paged.generate(PROMPTS, [Sampling(max_tokens=n) for n in MAX_TOKENS])
    finally:
        stop()
        restore()
        del paged._plan
    assert seen == []
    for r, want, n in zip(done, static, MAX_TOKENS):
        assert r.tokens == want[:n] and r.finish_reason == "length"
    assert {rows for _, rows in used["decode"]} == {4, 8}
    assert 20 <= most[0] <= 24
    assert paged.free_pages == list(range(1, 25)) and not paged.pages_of
    assert not paged.table.any() and paged.busy == 0


def test_a_request_waits_for_pages_and_a_cancel_gives_them_back(paged):
    """Two requests of 36 tokens take 18 of the 24 pages; a third of 36 waits with rows
    free, is admitted when one of them is cancelled, and gets what it gets alone."""
    first, second = (paged.submit(Request(p, Sampling(max_tokens=36 - len(p))))
                     for p in PROMPTS[1:3])
    third = paged.submit(Request(PROMPTS[3], Sampling(max_tokens=23)))
    for _ in range(3):
        paged.step()
    assert first.tokens and second.tokens and not third.tokens
    assert len(paged.waiting) == 1 and len(paged.free_pages) == 6
    first.cancel()
    paged.step()
    assert first.finish_reason == "cancelled" and not paged.waiting  # admitted
    while not third.done.is_set():
        paged.step()
    second.cancel()
    paged.step()
    assert paged.busy == 0 and len(paged.free_pages) == 24
    alone = paged.generate([PROMPTS[3]], Sampling(max_tokens=23))[0].tokens
    assert third.tokens == alone


def test_kv_pages_must_hold_one_longest_request(mesh_model):
    model, mesh, rules = mesh_model
    with pytest.raises(InputError, match="hold 36 tokens, fewer than one request of "
                                         "serve.max_len=40; raise serve.kv_pages"):
        Engine(model, mesh, rules, eos_id=EOS, max_len=40, kv_pages=9, page_size=4)
    for bad in ("serve.kv_pages=-1", "serve.page_size=0"):
        with pytest.raises(ConfigError, match="use kv_pages >= 0 .0: no pages. and "
                                              "page_size >= 1"):
            load_config(str(REPO / "configs" / "tiny.yaml"), [bad])


@pytest.mark.once
def test_a_bf16_paged_cache_on_a_cpu_answers_as_rows_of_their_own_do():
    """bf16 on one CPU device: the pool holds the bits (uint16, as the row cache does)
    and every request gets the tokens it gets from an engine without pages."""
    model, mesh, rules = built("gpt2", (1, 1, 1), "fsdp_tp", "model.dtype=bfloat16")
    kw = dict(eos_id=EOS, vocab_limit=127, max_batch=4, max_len=40, chunk=8, decode_steps=2)
    rows = Engine(model, mesh, rules, **kw)
    paged = Engine(model, mesh, rules, **kw, kv_pages=12, page_size=8)
    assert paged.cache.k_LNPKH.dtype == rows.cache.k_LBSKH.dtype == np.uint16
    each = [Sampling(max_tokens=n) for n in MAX_TOKENS]
    assert ([r.tokens for r in paged.generate(PROMPTS, each)]
            == [r.tokens for r in rows.generate(PROMPTS, each)])


@pytest.mark.parametrize("scatter", [False, True], ids=["row-by-row", "scatter"])
def test_pages_hold_what_rows_of_their_own_hold(scatter, monkeypatch):
    """Keys and values written at each row's own slots, 3 tokens a call, read back the
    same from a PagedKVCache (pages handed out shuffled) as from a KVCache, written one
    token at a time or (over UNROLL_ROWS tokens) by one scatter."""
    from models import cache as kv
    monkeypatch.setattr(kv, "UNROLL_ROWS", 0 if scatter else 64)
    L, B, M, P, K, H = 2, 3, 4, 4, 2, 5
    rows = kv.KVCache(*[jax.numpy.zeros((L, B, M * P, K, H))] * 2,
                      np.zeros(B, np.int32), np.zeros(B, np.int32))
    table = np.random.default_rng(0).permutation(np.arange(1, B * M + 1)).reshape(B, M)
    pages = kv.PagedKVCache(*[jax.numpy.zeros((L, B * M + 1, P, K, H))] * 2,
                            table.astype(np.int32), np.zeros(B, np.int32),
                            np.zeros(B, np.int32))
    start = np.array([0, 5, 7], np.int32)  # 9 tokens each: the last row fills its 16
    keep = lambda x, axes: x  # noqa: E731 (no mesh)
    for call in range(1, 4):
        x = jax.random.normal(jax.random.key(call), (2, B, 3, K, H))
        rows = rows.at(start).write(call % L, x[0], x[1], keep)
        pages = pages.at(start).write(call % L, x[0], x[1], keep)
        start = start + 3
    for layer in range(L):
        for got, want in zip(pages.layer(layer), rows.layer(layer)):
            np.testing.assert_array_equal(got, want)
    assert not np.asarray(pages.k_LNPKH[:, 0]).any()  # page 0: no row's
