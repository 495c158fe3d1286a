"""The Grain loader over prepared data: determinism, packing, document masking,
per-host shares, resume; checked against the prepared tokens themselves."""

from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sharding
from train.data.batches import PackedBatches, to_global
from train.data.prepared import open_split, prepare
from train.data.resolve import resolve_data
from train.plan import build_state
from train.step import compute_grads

from helpers import small_config

# Random words: no two packed sequences are alike, so shares can be compared by content.
_rng = np.random.default_rng(0)
TEXTS = [" ".join("".join(_rng.choice(list("abcdefghij"), 4)) for _ in range(5 + i % 13))
         for i in range(60)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    for i, text in enumerate(TEXTS):
        (root / f"{i:03d}.txt").write_text(text)
    prepare(str(root / "*.txt"), root / "prep", val_fraction=0.1, progress=False)
    return str(root / "prep")


def loader(path, *overrides, index=None, count=None):
    cfg = small_config(f"data.path={path}", "model.vocab_size=384", *overrides)
    return PackedBatches(cfg, None, path, process_index=index, process_count=count)


def test_same_seed_same_batches_other_seed_others(prepared):
    a, b, c = loader(prepared), loader(prepared), loader(prepared, "train.seed=1")
    for step in (0, 3, 17):
        rows = a.local(step)
        np.testing.assert_array_equal(rows["inputs"], b.local(step)["inputs"])
        assert not np.array_equal(rows["inputs"], c.local(step)["inputs"])
    assert not np.array_equal(a.local(0)["inputs"], a.local(1)["inputs"])
    for x in (a, b, c):
        x.close()


@pytest.mark.parametrize("mask", [False, True])
def test_an_epoch_holds_every_token_once(prepared, mask):
    """Over one (shuffled) epoch, the (input, target) pairs with weight are exactly the
    split's consecutive token pairs, minus those crossing a document end when masking."""
    batches = loader(prepared, f"data.mask_documents={mask}", "train.seq_len=16")
    tokens = np.asarray(open_split(prepared, "train").tokens_N, np.int64)
    eos = 256
    expected = Counter(zip(tokens[:-1].tolist(), tokens[1:].tolist()))
    if mask:  # the token after an EOS starts another document: not predicted
        expected = Counter({pair: n for pair, n in expected.items() if pair[0] != eos})
    seen, inputs_seen = Counter(), 0
    for i in range(batches.num_sequences):  # the first epoch of the shuffled stream
        item = batches.train[i]
        w = item["weights"] > 0
        seen.update(zip(item["inputs"][w].tolist(), item["targets"][w].tolist()))
        inputs_seen += int(w.sum())
    assert seen == expected
    # The next epoch is the same sequences in another order.
    first = [batches.train[i]["inputs"].tobytes() for i in range(batches.num_sequences)]
    second = [batches.train[batches.num_sequences + i]["inputs"].tobytes()
              for i in range(batches.num_sequences)]
    assert sorted(first) == sorted(second) and first != second
    batches.close()


def test_document_masking_segments_positions_and_weights(prepared):
    batches = loader(prepared, "data.mask_documents=true", "train.seq_len=64")
    item = batches.train[3]
    seg, pos, w = item["segment_ids"], item["positions"], item["weights"]
    inputs, targets = item["inputs"], item["targets"]
    starts = np.flatnonzero(np.diff(seg)) + 1
    assert len(starts) >= 1  # this window spans a document boundary
    for s in starts:
        assert inputs[s - 1] == 256 and pos[s] == 0  # an EOS ends the previous document
        assert w[s - 1] == 0  # EOS -> first token of the next document: not predicted
    assert (pos[1:][np.diff(seg) == 0] == pos[:-1][np.diff(seg) == 0] + 1).all()
    assert (w[np.flatnonzero(targets == 256)] == 1).all()  # predicting EOS is trained
    batches.close()


def test_masked_attention_never_crosses_a_document(devices):
    """Logits of two documents packed with segment ids equal each one run alone."""
    from models import Transformer
    cfg = small_config("model.vocab_size=384").model
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 256, 9), rng.integers(0, 256, 7)
    packed = jnp.asarray(np.concatenate([a, b]))[None]
    seg = jnp.asarray([1] * 9 + [2] * 7)[None]
    pos = jnp.asarray(list(range(9)) + list(range(7)))[None]
    logits = model(packed, positions_BT=pos, segment_ids_BT=seg)
    np.testing.assert_allclose(logits[0, :9], model(jnp.asarray(a)[None])[0], atol=1e-5)
    np.testing.assert_allclose(logits[0, 9:], model(jnp.asarray(b)[None])[0], atol=1e-5)
    unmasked = model(packed)  # without segments the second document sees the first
    assert not np.allclose(unmasked[0, 9:], model(jnp.asarray(b)[None])[0], atol=1e-3)


def test_two_hosts_read_disjoint_shares_of_the_global_batch(prepared):
    whole = loader(prepared, "train.batch_size=8")
    hosts = [loader(prepared, "train.batch_size=8", index=i, count=2) for i in range(2)]
    assert list(hosts[0].rows) == [0, 1, 2, 3] and list(hosts[1].rows) == [4, 5, 6, 7]
    for step in (0, 5):
        parts = [h.local(step)["inputs"] for h in hosts]
        np.testing.assert_array_equal(np.concatenate(parts), whole.local(step)["inputs"])
        assert not {r.tobytes() for r in parts[0]} & {r.tobytes() for r in parts[1]}
    for x in (whole, *hosts):
        x.close()


def test_resumed_stream_equals_the_uninterrupted_one_with_workers(prepared):
    cfg = ("data.num_workers=2", "data.mask_documents=true")
    straight = loader(prepared, *cfg)
    stream = [straight.local(step) for step in range(10)]
    straight.close()
    resumed = loader(prepared, *cfg)
    for step in range(6, 10):  # a new process picks up at batch 6
        for key, value in stream[step].items():
            np.testing.assert_array_equal(resumed.local(step)[key], value)
    resumed.close()


def test_weighted_loss_with_microbatches_equals_one_batch(prepared, devices):
    """Packed batches (weights, segments, positions) split into microbatches give the
    loss and gradients of the whole batch."""
    extra = ("train.batch_size=16", "data.mask_documents=true", "train.seq_len=32")
    extra += (f"data.path={prepared}",)
    big = resolve_data(small_config(*extra))[0]
    micro = resolve_data(small_config(*extra, "train.microbatches=4"))[0]
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "model": 2}, devices=devices)
    state, _ = build_state(big, mesh)
    spec = NamedSharding(mesh, P(None, ("data", "fsdp"), None))
    rows = PackedBatches(big, spec, prepared).local(0)
    assert rows["weights"].min() == 0  # some targets are masked
    terms_big, g_big = jax.jit(compute_grads)(state, to_global(rows, big, spec))
    ce_big = terms_big["loss"]
    terms_micro, g_micro = jax.jit(compute_grads)(state, to_global(rows, micro, spec))
    ce_micro = terms_micro["loss"]
    np.testing.assert_allclose(ce_micro, ce_big, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_micro), jax.tree.leaves(g_big)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(jnp.abs(b).max()))
    # By hand: the mean cross-entropy over the tokens with weight only.
    model = nnx.merge(state.graphdef, state.params)
    logits = np.asarray(model(jnp.asarray(rows["inputs"]), positions_BT=jnp.asarray(
        rows["positions"]), segment_ids_BT=jnp.asarray(rows["segment_ids"])), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, rows["targets"][..., None], -1)[..., 0]
    w = rows["weights"]
    np.testing.assert_allclose(ce_big, (nll * w).sum() / w.sum(), rtol=1e-5)

