"""Model behaviour checked against hand computations: causality, attention, layer
loops vs scan, remat, parameter counts of the presets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import ModelConfig, Transformer, count_params
from models.attention import blocked_attention, num_blocks
from models.layers import attention_impl
from train.config import load_config

from helpers import REPO, small_config


def make(cfg: ModelConfig, seed: int = 0) -> Transformer:
    return Transformer(cfg, rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_causality(style):
    cfg = small_config(f"model.style={style}").model
    model = make(cfg)
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
    changed = tokens.at[:, 9].set((tokens[:, 9] + 1) % cfg.vocab_size)
    a, b = model(tokens), model(changed)
    np.testing.assert_array_equal(a[:, :9], b[:, :9])  # earlier positions untouched
    assert not np.allclose(a[:, 9:], b[:, 9:])  # later ones do see the change


def naive_attention(q, k, v):
    """Softmax attention written out by hand; kv heads repeated for GQA."""
    B, T, N, H = q.shape
    group = N // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    scores = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H)
    scores = jnp.where(jnp.tril(jnp.ones((T, T), bool)), scores, -jnp.inf)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(scores, axis=-1), v)


def test_grouped_query_attention_matches_hand_written():
    key = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(key[0], (2, 7, 8, 16))
    k = jax.random.normal(key[1], (2, 7, 2, 16))
    v = jax.random.normal(key[2], (2, 7, 2, 16))
    xla = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    np.testing.assert_allclose(xla, naive_attention(q, k, v), rtol=1e-5, atol=1e-5)
    blocked = blocked_attention(q, k, v, block=3)
    np.testing.assert_allclose(blocked, naive_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_attention_auto_by_platform():
    auto = ModelConfig(attention="auto")
    assert attention_impl(auto, "cpu", 2048) == "blocked"
    assert attention_impl(auto, "tpu", 2048) == "splash"
    assert attention_impl(auto, "tpu", 200) == "blocked"  # the kernel tiles by 128
    assert attention_impl(auto, "gpu", 2048) == "cudnn"
    assert attention_impl(ModelConfig(attention="auto", dtype="float32"), "gpu", 64) == "blocked"
    assert attention_impl(ModelConfig(attention="cudnn"), "cpu", 64) == "cudnn"


@pytest.mark.parametrize("segments", [pytest.param(False, marks=pytest.mark.once), True])
def test_splash_kernel_matches_blocked_attention(segments):
    """The Pallas TPU kernel, interpreted on the CPU: values and gradients equal blocked
    attention's, with grouped kv heads and document masks."""
    key = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(key[0], (2, 256, 4, 64))
    k = jax.random.normal(key[1], (2, 256, 2, 64))
    v = jax.random.normal(key[2], (2, 256, 2, 64))
    seg = jnp.cumsum(jax.random.uniform(key[3], (2, 256)) < 0.02, axis=1) if segments else None
    probe = jax.random.normal(jax.random.key(5), q.shape)

    def loss(fn):
        return lambda *a: jnp.sum(fn(*a) * probe)

    from models.splash import splash_attention

    def splash(q, k, v):
        return splash_attention(q, k, v, seg, interpret=True)

    def blocked(q, k, v):
        return blocked_attention(q, k, v, 64, seg)

    np.testing.assert_allclose(splash(q, k, v), blocked(q, k, v), rtol=1e-5, atol=1e-5)
    g_splash = jax.grad(loss(splash), argnums=(0, 1, 2))(q, k, v)
    g_blocked = jax.grad(loss(blocked), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_splash, g_blocked):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_num_blocks():
    assert num_blocks(2048, 512) == 4
    assert num_blocks(16, 512) == 1
    assert num_blocks(24, 5) == 6  # fewest blocks of at most 5 that divide 24 evenly
    assert num_blocks(7, 2) == 7


@pytest.mark.parametrize("block,segments", [(5, True)] + [
    pytest.param(*p, marks=pytest.mark.once) for p in ((4, False), (64, True))])
def test_blocked_attention_matches_dot_product_attention(block, segments):
    """Values and gradients equal jax.nn.dot_product_attention (XLA), with grouped kv
    heads and, with segments, a document mask."""
    key = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(key[0], (2, 24, 8, 16))
    k = jax.random.normal(key[1], (2, 24, 2, 16))
    v = jax.random.normal(key[2], (2, 24, 2, 16))
    seg = jnp.cumsum(jax.random.uniform(key[3], (2, 24)) < 0.2, axis=1) if segments else None
    mask = None if seg is None else seg[:, None, :, None] == seg[:, None, None, :]

    def ref(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True,
                                            implementation="xla")

    def ours(q, k, v):
        return blocked_attention(q, k, v, block, seg)

    np.testing.assert_allclose(ours(q, k, v), ref(q, k, v), rtol=1e-5, atol=1e-6)
    probe = jax.random.normal(jax.random.key(5), q.shape)
    g_ref = jax.grad(lambda *a: jnp.sum(ref(*a) * probe), argnums=(0, 1, 2))(q, k, v)
    g_ours = jax.grad(lambda *a: jnp.sum(ours(*a) * probe), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_ours, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", ["model.scan_layers=false", "model.remat=full",
                                     "model.remat=save_dots"])
def test_layer_loop_and_remat_match_scan(variant):
    base = small_config().model
    other = small_config(variant).model

    def loss_and_grads(cfg):
        graphdef, params = nnx.split(make(cfg))
        tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)

        def loss(p):
            return jnp.mean(nnx.merge(graphdef, p)(tokens) ** 2)

        return jax.jit(jax.value_and_grad(loss))(params)

    (l0, g0), (l1, g1) = loss_and_grads(base), loss_and_grads(other)
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bf16_compute_keeps_fp32_params():
    cfg = small_config("model.dtype=bfloat16").model
    model = make(cfg)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model)))
    logits = model(jnp.zeros((1, 8), jnp.int32))
    assert logits.dtype == jnp.float32  # head accumulates in fp32 for the loss
    assert np.isfinite(np.asarray(logits)).all()


def test_tied_and_untied_heads():
    for style in ("gpt2", "llama"):
        tied = nnx.state(make(small_config(f"model.style={style}").model))
        untied = nnx.state(make(small_config(f"model.style={style}",
                                             "model.tie_embeddings=false").model))
        assert "head" not in tied and untied["head"].get_value().shape == (64, 256)


# Independent figures: GPT-2 small as nanoGPT reports it (123.69M without the position
# table); GPT-2 medium's Hugging Face total 354,823,168 less its 1024x1024 position table,
# with vocab padded 50257 -> 50304; the published Llama model sizes.
PRESET_PARAMS = {
    "gpt2-124m.yaml": 123_689_472,
    "gpt2-350m.yaml": 354_823_168 - 1024 * 1024 + 47 * 1024,
    "llama-1b.yaml": 1_235_814_400,
    "llama2-7b.yaml": 6_738_415_616,
    "llama-8b.yaml": 8_030_261_248,
    # by hand: per layer 12 d^2 + 13 d (GPT-2 block with biases and LayerNorms), tied
    # embedding V d, final LayerNorm 2 d
    "gpt2-1.3b.yaml": 24 * (12 * 2048 ** 2 + 13 * 2048) + 50304 * 2048 + 2 * 2048,
}


@pytest.mark.parametrize("name", sorted(PRESET_PARAMS))
def test_preset_parameter_counts(name):
    cfg = load_config(str(REPO / "configs" / name))
    assert count_params(cfg.model) == PRESET_PARAMS[name]


def test_gpt2_parameter_count_by_hand():
    d, f, v, L = 64, 128, 256, 2
    per_layer = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)
    expected = v * d + L * per_layer + 2 * d
    cfg = small_config("model.style=gpt2", "model.num_kv_heads=8").model
    assert count_params(cfg) == expected
    assert count_params(cfg, exclude_positions=False) == expected + 64 * d


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_embed_equals_take_then_cast_with_its_gradient(dtype):
    """layers.embed only moves the communication: values and gradients are those of
    jnp.take followed by a cast (repeated ids included)."""
    from models.layers import embed, no_constraint
    table_VD = jax.random.normal(jax.random.key(0), (50, 16))
    ids_BT = jax.random.randint(jax.random.key(1), (4, 9), 0, 10)  # many repeats
    w_BTD = jax.random.normal(jax.random.key(2), (4, 9, 16)).astype(dtype)

    def ours(t):
        return jnp.sum((embed(t, ids_BT, jnp.dtype(dtype), no_constraint) * w_BTD)
                       .astype(jnp.float32))

    def plain(t):
        return jnp.sum((jnp.take(t, ids_BT, axis=0).astype(dtype) * w_BTD).astype(jnp.float32))

    np.testing.assert_array_equal(jax.jit(ours)(table_VD), jax.jit(plain)(table_VD))
    np.testing.assert_array_equal(jax.jit(jax.grad(ours))(table_VD),
                                  jax.jit(jax.grad(plain))(table_VD))


def test_norms_apply_their_weights_as_hugging_face_does():
    """RMSNorm (Llama): statistics in fp32, then `weight * hidden.to(bf16)` in bf16, as
    transformers' LlamaRMSNorm; LayerNorm (GPT-2): the affine part in fp32, rounded once.
    Against numpy, bit for bit in bf16; the scale's gradient keeps the parameter's dtype."""
    from models.layers import norm
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 64)).astype(np.float32)
    scale, bias = (1 + 0.1 * rng.normal(size=64)).astype(np.float32), rng.normal(size=64)
    bias = bias.astype(np.float32)
    bf16 = jnp.bfloat16
    x16 = np.asarray(jnp.asarray(x, bf16)).astype(np.float32)  # the bf16 input, exactly
    eps = 1e-5

    rms = (x16 / np.sqrt(np.mean(x16 ** 2, -1, keepdims=True) + eps)).astype(np.float32)
    want = np.asarray(jnp.asarray(rms, bf16)) * np.asarray(jnp.asarray(scale, bf16))
    got = norm(jnp.asarray(x, bf16), jnp.asarray(scale), None, eps)
    assert got.dtype == bf16
    np.testing.assert_array_equal(np.asarray(got), want)  # bf16 * bf16, rounded once
    applied_in_fp32 = np.asarray(jnp.asarray(rms * scale, bf16))
    assert (np.asarray(got) != applied_in_fp32).any()  # the test tells the two apart

    centred = x16 - x16.mean(-1, keepdims=True)
    ln = centred / np.sqrt(np.mean(centred ** 2, -1, keepdims=True) + eps)
    want = np.asarray(jnp.asarray(ln * scale + bias, bf16)).astype(np.float32)
    got = norm(jnp.asarray(x, bf16), jnp.asarray(scale), jnp.asarray(bias), eps)
    np.testing.assert_allclose(np.asarray(got).astype(np.float32), want, rtol=1e-2, atol=1e-2)
    assert (np.asarray(got).astype(np.float32) == want).mean() > 0.95

    g = jax.grad(lambda s: norm(jnp.asarray(x, bf16), s, None, eps).astype(
        jnp.float32).sum())(jnp.asarray(scale))
    assert g.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(g), np.asarray(jnp.asarray(rms, bf16)).astype(
        np.float32).sum((0, 1)), rtol=2e-2, atol=5e-2)  # summed in bf16: 10 terms


def test_rope_is_the_rotation_exactly_in_fp32_and_within_rounding_in_bf16():
    """x * cos + rotate_half(x) * sin (transformers' form) against the explicit rotation
    of each (i, i + H/2) pair by position * theta^(-2i/H), computed in float64."""
    from models.layers import rope
    rng = np.random.default_rng(0)
    B, T, N, H = 2, 11, 3, 16
    x = rng.normal(size=(B, T, N, H)).astype(np.float32)
    positions = rng.integers(0, 4096, size=(B, T)).astype(np.int32)
    inv = (1.0 / 10000.0 ** (np.arange(H // 2) / (H // 2))).astype(np.float32)
    angle = positions[..., None, None].astype(np.float64) * inv.astype(np.float64)
    x1, x2 = x[..., :H // 2].astype(np.float64), x[..., H // 2:].astype(np.float64)
    want = np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle),
                           x2 * np.cos(angle) + x1 * np.sin(angle)], -1)
    got = rope(jnp.asarray(x), jnp.asarray(positions), jnp.asarray(inv))
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-3)  # fp32 angles
    a32 = jnp.asarray(positions)[..., None, None].astype(jnp.float32) * jnp.asarray(inv)
    c, s = jnp.cos(a32), jnp.sin(a32)
    explicit = jnp.concatenate([x1.astype(np.float32) * c - x2.astype(np.float32) * s,
                                x2.astype(np.float32) * c + x1.astype(np.float32) * s], -1)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(explicit))  # fp32: exact
    got16 = rope(jnp.asarray(x, jnp.bfloat16), jnp.asarray(positions), jnp.asarray(inv))
    assert got16.dtype == jnp.bfloat16
    err = np.abs(np.asarray(got16).astype(np.float64) - want)
    assert err.max() < 0.05 and err.mean() < 0.01  # bf16: 8 bits of mantissa
    # the two halves are rotated as pairs: the norm of each (i, i + H/2) pair is kept
    pair = lambda a: np.hypot(a[..., :H // 2], a[..., H // 2:])
    np.testing.assert_allclose(pair(np.asarray(got)), pair(x), rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mlp_activations_and_their_gradients_in_fp32(dtype):
    """swiglu_f32 / gelu_f32 (hand-written backward / recomputed forward) against
    autodiff of the plain fp32 formulas: equal in fp32, one rounding off in bf16."""
    from models.layers import gelu_f32, swiglu_f32
    k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
    gate, up, d = (4 * jax.random.normal(k, (2, 8, 64)) for k in (k1, k2, k3))
    gate, up, d = (x.astype(dtype).astype(jnp.float32) for x in (gate, up, d))
    want = {"swiglu": lambda g, u: jax.nn.silu(g) * u,
            "gelu": lambda g, u: jax.nn.gelu(g, approximate=True)}
    got = {"swiglu": swiglu_f32, "gelu": lambda g, u: gelu_f32(g)}
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == jnp.float32 else dict(rtol=1e-2, atol=1e-2)
    for name in want:
        out, vjp = jax.vjp(want[name], gate, up)
        out_c, vjp_c = jax.vjp(got[name], gate.astype(dtype), up.astype(dtype))
        assert out_c.dtype == dtype
        np.testing.assert_allclose(np.float32(out_c), out, **tol)
        grads, grads_c = vjp(d), vjp_c(d.astype(dtype))
        for g, g_c in zip(grads[: 2 if name == "swiglu" else 1], grads_c):
            assert g_c.dtype == dtype
            np.testing.assert_allclose(np.float32(g_c), g, **tol)
