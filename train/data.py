"""Data, first version: the embedded stdlib byte corpus and synthetic tokens.

Each process builds only its own rows of the global batch and JAX assembles the global
array with `jax.make_array_from_process_local_data`. Batch `step` is a pure function of
(seed, step), so a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import sysconfig
import zlib
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding

from train.config import Config

DOC_SEPARATOR = 0  # byte 0 between files; it never occurs in Python source text


@dataclasses.dataclass
class Corpus:
    train_BYTES: np.ndarray  # uint8 (N,)
    val_BYTES: np.ndarray
    num_files: int

    def unigram_entropy(self) -> float:
        """Entropy of the train split's byte distribution, in nats per token: the loss
        of the best model that ignores context."""
        counts = np.bincount(self.train_BYTES, minlength=256).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())


def stdlib_files() -> list[Path]:
    """The Python standard library's .py files, in a fixed order (third-party
    site-packages excluded, so the corpus does not depend on what is installed)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py")
             if not {"site-packages", "dist-packages", "__pycache__"} & set(p.parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def load_stdlib_corpus(max_bytes: int, val_fraction: float) -> Corpus:
    """Byte-level corpus from stdlib sources. A file goes to validation when a hash of
    its relative path falls under val_fraction: deterministic, and independent of the
    file order and of max_bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, val, total, count = [], [], 0, 0
    for path in stdlib_files():
        data = path.read_bytes()
        if not data or total >= max_bytes:
            continue
        rel = path.relative_to(root).as_posix().encode()
        bucket = (zlib.crc32(rel) % 10_000) / 10_000
        (val if bucket < val_fraction else train).append(data + bytes([DOC_SEPARATOR]))
        total += len(data) + 1
        count += 1
    if not train or not val:
        raise FileNotFoundError(f"stdlib corpus under {root} is too small to split "
                                f"({count} files); use data.source=synthetic")
    as_array = lambda parts: np.frombuffer(b"".join(parts), dtype=np.uint8)
    return Corpus(as_array(train), as_array(val), count)


def local_rows(global_batch: int) -> slice:
    """This process's rows of the global batch (processes own equal contiguous blocks)."""
    per = global_batch // jax.process_count()
    start = jax.process_index() * per
    return slice(start, start + per)


def window_batch(tokens_N: np.ndarray, global_batch: int, seq_len: int, seed: int, step: int
                 ) -> np.ndarray:
    """This process's rows of batch `step`: random windows of seq_len + 1 tokens, (b, T+1)."""
    rng = np.random.default_rng([seed, step])
    starts_B = rng.integers(0, len(tokens_N) - seq_len - 1, size=global_batch)
    starts_b = starts_B[local_rows(global_batch)]
    return tokens_N[starts_b[:, None] + np.arange(seq_len + 1)].astype(np.int32)


def synthetic_batch(vocab_size: int, global_batch: int, seq_len: int, seed: int, step: int
                    ) -> np.ndarray:
    rng = np.random.default_rng([seed, step, 1])
    rows = rng.integers(0, vocab_size, size=(global_batch, seq_len + 1), dtype=np.int32)
    return rows[local_rows(global_batch)]


class Batches:
    """batch(step) -> {"inputs", "targets"}: global int32 arrays (M, B/M, T), the
    microbatch dimension M first and the batch dimension sharded per `sharding`."""

    def __init__(self, cfg: Config, sharding: NamedSharding, corpus: Corpus | None):
        self.cfg, self.sharding, self.corpus = cfg, sharding, corpus

    def local(self, step: int) -> np.ndarray:
        t = self.cfg.train
        if self.cfg.data.source == "synthetic":
            return synthetic_batch(self.cfg.model.vocab_size, t.batch_size, t.seq_len,
                                   t.seed, step)
        return window_batch(self.corpus.train_BYTES, t.batch_size, t.seq_len, t.seed, step)

    def batch(self, step: int) -> dict[str, jax.Array]:
        rows_bT1 = self.local(step)
        m = self.cfg.train.microbatches
        rows_MbT1 = rows_bT1.reshape(m, rows_bT1.shape[0] // m, -1)
        global_shape = (m, self.cfg.train.batch_size // m, self.cfg.train.seq_len)
        make = lambda x: jax.make_array_from_process_local_data(self.sharding, x, global_shape)
        return {"inputs": make(rows_MbT1[..., :-1]), "targets": make(rows_MbT1[..., 1:])}


def tokens_per_step(cfg: Config) -> int:
    return cfg.train.batch_size * cfg.train.seq_len


__all__ = ["Corpus", "Batches", "load_stdlib_corpus", "window_batch", "synthetic_batch",
           "tokens_per_step"]
