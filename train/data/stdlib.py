"""The embedded default data: the Python standard library's sources as a byte corpus
(no download), and synthetic tokens. Batch `step` is a pure function of (seed, step)."""

from __future__ import annotations

import dataclasses
import sysconfig
import zlib
from pathlib import Path

import jax
import numpy as np

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


def local_rows(global_batch: int, process_index: int | None = None,
               process_count: int | None = None) -> slice:
    """This process's rows of the global batch (processes own equal contiguous blocks)."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    per = global_batch // count
    return slice(index * per, (index + 1) * per)


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
