"""KV-cache decoding and generation against the full-sequence forward pass, on one
device and on a 2x2x2 mesh; sampling's top-k / top-p sets; EOS per sequence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sharding
from models.sampling import allowed, sample
from train.inference import Generator, inference_params
from train.plan import build_state

from helpers import padded_spec, small_config


def built(style: str, mesh_axes=(1, 1, 1), rules="fsdp_tp", *extra):
    cfg = small_config(f"model.style={style}", "model.vocab_size=128", "model.init_std=0.2",
                       f"mesh.data={mesh_axes[0]}", f"mesh.fsdp={mesh_axes[1]}",
                       f"mesh.model={mesh_axes[2]}", f"sharding.rules={rules}", *extra)
    devices = np.array(jax.devices()[:int(np.prod(mesh_axes))])
    mesh = sharding.make_mesh(cfg.mesh.axes(), devices=devices)
    rules_table = sharding.make_rules(cfg.sharding.rules, mesh.axis_names)
    state, _ = build_state(cfg, mesh, rules_table)
    return state.model(), mesh, rules_table


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_cache_decoding_equals_full_forward_at_every_step(style, devices):
    model, _, _ = built(style)
    tokens_BT = jax.random.randint(jax.random.key(1), (2, 12), 0, 128)
    full_BTV = model(tokens_BT)
    cache = model.init_cache(2, 12)
    prefix_BTV, cache = model.extend(tokens_BT[:, :5], cache.at(0), all_logits=True)
    np.testing.assert_allclose(prefix_BTV, full_BTV[:, :5], rtol=1e-5, atol=1e-5)
    for t in range(5, 12):
        step_BV, cache = model.extend(tokens_BT[:, t:t + 1], cache.at(t))
        np.testing.assert_allclose(step_BV, full_BTV[:, t], rtol=1e-5, atol=1e-5)


def test_left_padding_does_not_change_a_prompts_logits(devices):
    model, _, _ = built("gpt2")
    tokens_T = jax.random.randint(jax.random.key(2), (7,), 0, 128)
    alone_TV = model(tokens_T[None])[0]
    padded_BT = jnp.concatenate([jnp.full((1, 4), 3), tokens_T[None]], axis=1)
    cache = model.init_cache(1, 11, jnp.array([4], jnp.int32))
    logits_BTV, _ = model.extend(padded_BT, cache, all_logits=True)
    np.testing.assert_allclose(logits_BTV[0, 4:], alone_TV, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [pytest.param(False, marks=pytest.mark.once), True],
                         ids=["batch-index", "row-index"])
def test_a_bf16_cache_on_a_cpu_is_held_as_its_bits_and_decodes_as_a_bf16_one(rows, devices):
    """On CPUs a 16-bit cache is uint16 bits (XLA:CPU writes bf16 arrays by whole-array
    conversions): every logit and every stored key equals a cache held as bf16, for a
    batch written at one index (generation) and rows at their own (the engine)."""
    from models.cache import KVCache
    model, _, _ = built("llama", (1, 1, 1), "fsdp_tp", "model.dtype=bfloat16")
    bits = model.init_cache(2, 12)
    assert bits.k_LBSKH.dtype == jnp.uint16 and bits.bits_of == "bfloat16"
    zeros = jnp.zeros(bits.k_LBSKH.shape, jnp.bfloat16)
    held = KVCache(zeros, zeros, bits.index, bits.pad_B)
    tokens_BT = jax.random.randint(jax.random.key(1), (2, 12), 0, 128)
    at = (lambda t: jnp.full((2,), t, jnp.int32)) if rows else (lambda t: t)
    for t0, t1 in ((0, 5), *((t, t + 1) for t in range(5, 12))):
        got_BV, bits = model.extend(tokens_BT[:, t0:t1], bits.at(at(t0)))
        want_BV, held = model.extend(tokens_BT[:, t0:t1], held.at(at(t0)))
        np.testing.assert_array_equal(got_BV, want_BV)
    np.testing.assert_array_equal(jax.lax.bitcast_convert_type(bits.v_LBSKH, jnp.bfloat16),
                                  held.v_LBSKH)
    assert np.abs(np.asarray(held.v_LBSKH, np.float32)).max() > 0


PROMPTS = [[5, 9, 2, 77, 31, 8, 8], [100], [42, 7, 19]]


@pytest.mark.parametrize("style", ["llama", pytest.param("gpt2", marks=pytest.mark.once)])
def test_mixed_length_batch_equals_one_by_one(style, devices):
    model, mesh, rules = built(style)
    gen = Generator(model, mesh, rules, eos_id=127, vocab_limit=127)  # no EOS: 20 tokens
    batch = gen.generate(PROMPTS, 20).tokens
    alone = [gen.generate([p], 20).tokens[0] for p in PROMPTS]
    assert batch == alone
    assert all(len(t) == 20 for t in batch)


def test_chunked_prefill_equals_one_chunk(devices):
    model, mesh, rules = built("llama")
    whole = Generator(model, mesh, rules, eos_id=127, vocab_limit=127)
    chunked = Generator(model, mesh, rules, eos_id=127, vocab_limit=127, prefill_chunk=3)
    assert chunked.generate(PROMPTS, 12).tokens == whole.generate(PROMPTS, 12).tokens


def test_sharded_generation_equals_single_device(devices):
    one = Generator(*built("llama"), eos_id=127).generate(PROMPTS, 20)
    model, mesh, rules = built("llama", (2, 2, 2))
    gen = Generator(model, mesh, rules, eos_id=127)
    wq = gen.params["blocks"]["wq"].get_value()
    assert padded_spec(wq) == (None, "fsdp", "model", None)
    cache = jax.jit(lambda: model.init_cache(4, 16))()
    # batch over data x fsdp, kv heads over model
    assert padded_spec(cache.k_LBSKH) == (None, ("data", "fsdp"), None, "model", None)
    eight = gen.generate(PROMPTS, 20)
    assert eight.tokens == one.tokens


def test_eos_stops_each_sequence_on_its_own(devices):
    model, mesh, rules = built("llama")
    free = Generator(model, mesh, rules, eos_id=127).generate(PROMPTS[:2], 12).tokens
    eos = free[0][2]  # the third token the first prompt produces
    assert eos != 127
    out = Generator(model, mesh, rules, eos_id=eos).generate(PROMPTS[:2], 12)
    for new, finished, before in zip(out.tokens, out.finished, free):
        end = before.index(eos) if eos in before else len(before)
        assert new == before[:end]
        assert finished == (eos in before)
    assert out.tokens[0] == free[0][:2] and out.finished[0]


def test_padded_vocabulary_is_never_generated(devices):
    model, mesh, rules = built("llama")
    out = Generator(model, mesh, rules, eos_id=0, vocab_limit=10).generate(
        PROMPTS, 10, temperature=1.0, seed=3)
    assert all(0 < t < 10 for seq in out.tokens for t in seq)


def _reference_allowed(logits_V, top_k, top_p):
    """numpy: the k largest, then the smallest prefix of the sorted tokens whose
    probability reaches top_p."""
    order = np.argsort(-logits_V, kind="stable")
    keep = np.zeros(logits_V.shape, bool)
    keep[order[:top_k] if top_k else order] = True
    kept = order[keep[order]]
    probs = np.exp(logits_V[kept] - logits_V[kept].max())
    probs /= probs.sum()
    n = int(np.searchsorted(np.cumsum(probs), top_p - 1e-7) + 1) if top_p < 1 else len(kept)
    out = np.zeros(logits_V.shape, bool)
    out[kept[:n]] = True
    return out


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.5), (8, 0.9), (0, 0.999), (1, 1.0)])
def test_top_k_top_p_sets(top_k, top_p):
    logits_BV = jax.random.normal(jax.random.key(0), (16, 64)) * 3
    keep_BV = np.asarray(allowed(logits_BV, top_k, top_p))
    for b in range(16):
        np.testing.assert_array_equal(keep_BV[b], _reference_allowed(np.asarray(
            logits_BV[b], np.float64), top_k, top_p))
    # sampling at temperature 1.5 keeps the set of the tempered logits
    keep_BV = np.asarray(allowed(logits_BV / 1.5, top_k, top_p))
    picks = jax.vmap(lambda k: sample(logits_BV, k, 1.5, top_k, top_p))(
        jax.random.split(jax.random.key(1), 200))
    picked = np.zeros_like(keep_BV)
    for row in np.asarray(picks):
        picked[np.arange(16), row] = True
    assert not (picked & ~keep_BV).any(), "a token outside the top-k/top-p set was sampled"
    if top_k != 1:
        assert picked.sum() > 16  # not always the same token


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (0.6, 0, 0.9), (1.7, 20, 0.8), (0.5, 5, 1.0), (2.5, 0, 0.5), (1.0, 0, 1.0)])
def test_sampling_distribution_is_that_of_transformers_logits_processors(
        temperature, top_k, top_p):
    """Temperature, then top-k, then top-p on the tempered probabilities: the logits we
    draw from equal those transformers' warpers leave (the same tokens cut, the same
    log-probabilities for the rest)."""
    torch = pytest.importorskip("torch", reason="torch is not installed (Python 3.12 CI run)")
    pytest.importorskip("transformers")
    from transformers.generation import logits_process as lp

    from models.sampling import processed
    logits_BV = np.asarray(jax.random.normal(jax.random.key(3), (32, 96)) * 3)
    warpers = lp.LogitsProcessorList(
        [lp.TemperatureLogitsWarper(temperature)]
        + ([lp.TopKLogitsWarper(top_k)] if top_k else [])
        + ([lp.TopPLogitsWarper(top_p)] if top_p < 1 else []))
    theirs = warpers(None, torch.tensor(logits_BV, dtype=torch.float64)).numpy()
    ours = np.asarray(processed(jnp.asarray(logits_BV), temperature, top_k, top_p), np.float64)
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(theirs))
    log_softmax = lambda x: x - np.logaddexp.reduce(x, axis=-1, keepdims=True)
    kept = np.isfinite(theirs)
    np.testing.assert_allclose(log_softmax(ours)[kept], log_softmax(theirs)[kept],
                               rtol=1e-5, atol=1e-5)


def test_greedy_is_argmax():
    logits_BV = jax.random.normal(jax.random.key(0), (4, 50))
    np.testing.assert_array_equal(sample(logits_BV, jax.random.key(0), 0.0),
                                  np.argmax(logits_BV, axis=-1))


def test_inference_params_change_nothing_in_bf16(devices):
    model, _, _ = built("gpt2", (1, 1, 1), "fsdp_tp", "model.dtype=bfloat16")
    graphdef, params = nnx.split(model)
    cast = nnx.merge(graphdef, inference_params(params, jnp.bfloat16))
    assert cast.blocks.wq.get_value().dtype == jnp.bfloat16
    assert cast.blocks.attn_norm_scale.get_value().dtype == jnp.float32
    tokens_BT = jax.random.randint(jax.random.key(1), (2, 9), 0, 128)
    run = jax.jit(lambda m: m.extend(tokens_BT, m.init_cache(2, 9), all_logits=True)[0])
    np.testing.assert_array_equal(run(cast), run(model))
