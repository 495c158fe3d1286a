"""The embedded stdlib corpus and batch construction."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sharding
from train.data import stdlib
from train.data.batches import WindowBatches

from helpers import small_config


@pytest.fixture(scope="module")
def corpus():
    return stdlib.load_stdlib_corpus(2_000_000, 0.1)


def test_stdlib_corpus_split_is_deterministic_and_disjoint(corpus):
    again = stdlib.load_stdlib_corpus(2_000_000, 0.1)
    np.testing.assert_array_equal(corpus.train_BYTES, again.train_BYTES)
    np.testing.assert_array_equal(corpus.val_BYTES, again.val_BYTES)
    assert corpus.val_BYTES.size > 0.02 * corpus.train_BYTES.size
    # Documents end with the separator, and no validation file also appears in train.
    train_docs = set(corpus.train_BYTES.tobytes().split(b"\0"))
    val_docs = [d for d in corpus.val_BYTES.tobytes().split(b"\0") if len(d) > 200]
    assert val_docs and not any(d in train_docs for d in val_docs)


def test_unigram_entropy_by_hand():
    c = stdlib.Corpus(np.array([1, 1, 2, 3], np.uint8), np.array([0], np.uint8), 1)
    expected = -(0.5 * np.log(0.5) + 2 * 0.25 * np.log(0.25))
    np.testing.assert_allclose(c.unigram_entropy(), expected)


def test_windows_are_deterministic_per_seed_and_step(corpus):
    a = stdlib.window_batch(corpus.train_BYTES, 8, 32, seed=0, step=5)
    assert a.shape == (8, 33) and a.dtype == np.int32
    np.testing.assert_array_equal(a, stdlib.window_batch(corpus.train_BYTES, 8, 32, 0, 5))
    assert not np.array_equal(a, stdlib.window_batch(corpus.train_BYTES, 8, 32, 1, 5))
    assert not np.array_equal(a, stdlib.window_batch(corpus.train_BYTES, 8, 32, 0, 6))


def test_processes_read_disjoint_rows_that_cover_the_batch(corpus, monkeypatch):
    full = stdlib.window_batch(corpus.train_BYTES, 8, 16, seed=3, step=2)
    parts = []
    for pid in range(2):
        monkeypatch.setattr(jax, "process_count", lambda: 2)
        monkeypatch.setattr(jax, "process_index", lambda pid=pid: pid)
        parts.append(stdlib.window_batch(corpus.train_BYTES, 8, 16, seed=3, step=2))
    np.testing.assert_array_equal(np.concatenate(parts), full)


def test_global_batch_is_sharded_and_shifted(corpus, devices):
    cfg = small_config("data.source=stdlib", "train.microbatches=2")
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "model": 2})
    batch_sharding = NamedSharding(mesh, P(None, ("data", "fsdp"), None))
    batch = WindowBatches(cfg, batch_sharding, corpus).batch(0)
    assert batch["inputs"].shape == (2, 4, 16)
    assert batch["inputs"].sharding == batch_sharding
    inputs, targets = np.asarray(batch["inputs"]), np.asarray(batch["targets"])
    np.testing.assert_array_equal(inputs[..., 1:], targets[..., :-1])
    rows = stdlib.window_batch(corpus.train_BYTES, 8, 16, cfg.train.seed, 0)
    np.testing.assert_array_equal(inputs.reshape(8, 16), rows[:, :-1])
