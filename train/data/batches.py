"""Batches for the train loop: `batch(step)` and `eval_batch(i)` give global arrays
(M, B/M, T) (microbatches first, the batch dimension sharded), built from this process's
rows with `jax.make_array_from_process_local_data`.

Global batch `step` is a pure function of (data, seed, step): each process computes only
its own rows of it, so a resumed run continues the same stream, on any number of hosts.

- WindowBatches: the embedded stdlib byte corpus (random windows) or synthetic tokens.
- PackedBatches: a prepared directory (data.path), read by a Grain pipeline: packed
  sequences shuffled per epoch by seed, rows of the batch for this host, worker
  processes and prefetch; its position (next batch) goes into every checkpoint.

`make_batches(cfg, sharding, path)` picks one for the train loop.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING

import grain
import jax
import numpy as np
from absl import flags
from jax.sharding import NamedSharding

from models.context import balanced_rows
from train.config import Config
from train.data.packing import HostRows, PackedExamples, PackedSequences
from train.data.poisson import PoissonRows
from train.data.prepared import read_meta
from train.data.stdlib import Corpus, load_stdlib_corpus, local_rows, synthetic_batch, window_batch
from train.errors import DataError

if TYPE_CHECKING:
    from train.privacy import Privacy

log = logging.getLogger("train")


def to_global(rows: dict[str, np.ndarray], cfg: Config, sharding: NamedSharding
              ) -> dict[str, jax.Array]:
    """This process's (b, T) rows -> global (M, B/M, T) arrays. With the length split
    over a context axis, every entry is laid out in the load-balanced order
    (models/context.py) and the positions are given explicitly."""
    m, B, T = cfg.train.microbatches, cfg.train.batch_size, cfg.train.seq_len
    rows = balanced_rows(rows, T // sharding.shard_shape((m, B // m, T))[2])
    out = {}
    for key, x_bT in rows.items():
        x_MbT = x_bT.reshape(m, x_bT.shape[0] // m, T)
        out[key] = jax.make_array_from_process_local_data(sharding, x_MbT, (m, B // m, T))
    return out


class WindowBatches:
    """The stdlib corpus (random windows by (seed, step)) or synthetic tokens."""

    def __init__(self, cfg: Config, sharding: NamedSharding, corpus: Corpus | None):
        self.cfg, self.sharding, self.corpus = cfg, sharding, corpus

    def local(self, step: int, split: str = "train") -> np.ndarray:
        t = self.cfg.train
        if self.cfg.data.source == "synthetic":
            seed = t.seed if split == "train" else t.seed + 1_000_003
            return synthetic_batch(self.cfg.model.vocab_size, t.batch_size, t.seq_len,
                                   seed, step)
        tokens = self.corpus.train_BYTES if split == "train" else self.corpus.val_BYTES
        return window_batch(tokens, t.batch_size, t.seq_len, t.seed, step)

    def batch(self, step: int, split: str = "train") -> dict[str, jax.Array]:
        rows_bT1 = self.local(step, split)
        return to_global({"inputs": rows_bT1[:, :-1], "targets": rows_bT1[:, 1:]},
                         self.cfg, self.sharding)

    def eval_batch(self, i: int) -> dict[str, jax.Array]:
        return self.batch(i, "val")

    def position(self, step: int) -> dict:
        return {"kind": self.cfg.data.source, "seed": self.cfg.train.seed, "next_batch": step}

    def check_resume(self, saved: dict | None) -> None:
        pass

    def close(self) -> None:
        pass


def grain_flags_parsed() -> None:
    """Grain's worker processes read an absl flag, which raises when the program did not
    parse absl flags (as plain scripts don't): mark them parsed, keeping their defaults
    (google/grain#1355)."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def open_split(cfg: Config, path: str, split: str):
    """A prepared split as packed sequences: text documents back to back in windows, chat
    examples (or preference pairs) packed whole."""
    kind = read_meta(path).get("kind", "text")
    d, T = cfg.data, cfg.train.seq_len
    if kind in ("chat", "preference"):
        return PackedExamples(path, split, T, d.overlong, kind == "preference")
    return PackedSequences(path, split, T, d.mask_documents)


class PackedBatches:
    """A prepared directory through Grain: sequences of the train split shuffled per
    epoch by train.seed (data.shuffle), or with DP-SGD (`privacy`) Poisson-sampled per
    step (train/data/poisson.py); this process's rows of each global batch,
    data.num_workers worker processes, data.prefetch batches read ahead."""

    def __init__(self, cfg: Config, sharding: NamedSharding, path: str, *,
                 privacy: Privacy | None = None, process_index: int | None = None,
                 process_count: int | None = None):
        self.cfg, self.sharding, self.path = cfg, sharding, path
        self.meta = read_meta(path)
        d, t = cfg.data, cfg.train
        rows = local_rows(t.batch_size, process_index, process_count)
        self.rows = range(rows.start, rows.stop)
        kind = self.meta.get("kind", "text")
        self.chat, self.pairs = kind in ("chat", "preference"), kind == "preference"
        if self.pairs != (t.objective == "dpo"):
            raise DataError(f"{path} holds preference pairs (prompt, chosen, rejected), DPO's "
                            "data: set train.objective=dpo" if self.pairs else
                            f"train.objective=dpo trains on preference pairs, and {path} holds "
                            f"{kind} data: give rows of prompt, chosen and rejected")
        train = open_split(cfg, path, "train")
        if not len(train):
            raise DataError(f"{path}: the train split has fewer than 2 tokens" if not self.chat
                            else f"{path}: no chat example of the train split fits "
                            f"train.seq_len={t.seq_len} (data.overlong=drop)")
        self.num_sequences, self.packed = len(train), train
        sequences = grain.MapDataset.source(train)
        if d.shuffle:
            sequences = sequences.shuffle(seed=t.seed)
        self.train = sequences.repeat()
        self.poisson = None if privacy is None else PoissonRows(
            train, t.batch_size, self.rows, t.seed, privacy.sampling_rate)
        val = open_split(cfg, path, "val")
        self.val = grain.MapDataset.source(val).repeat() if len(val) else None
        self.iterator, self.next_step, self.cached = None, None, None

    def _start(self, step: int) -> None:
        """A Grain iterator over batches step, step + 1, ... of this process."""
        self.close()
        d = self.cfg.data
        rows = self.poisson or HostRows(self.train, self.cfg.train.batch_size, self.rows)
        ds = grain.MapDataset.range(step, sys.maxsize).map(rows)
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=d.num_threads,
                                                  prefetch_buffer_size=d.prefetch))
        if d.num_workers:
            grain_flags_parsed()
            # Rows travel from workers pickled, not in shared memory blocks (which an
            # iterator closed mid-stream leaves behind); a host's rows are small.
            it = grain.experimental.WithOptionsIterDataset(
                it, grain.experimental.DatasetOptions(min_shm_size=1 << 26))
            it = it.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=d.num_workers, per_worker_buffer_size=d.prefetch))
        self.iterator, self.next_step = iter(it), step

    def local(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of batch `step`; consecutive steps come from the iterator
        (read ahead by its threads and workers), any other step restarts it there."""
        if self.cached is not None and self.cached[0] == step:
            return self.cached[1]
        if self.poisson is not None:
            self.poisson.indices(step)  # an overflowing sample fails here, in one line
        if self.next_step != step:
            self._start(step)
        rows = next(self.iterator)
        self.next_step = step + 1
        self.cached = (step, rows)
        return rows

    def batch(self, step: int) -> dict[str, jax.Array]:
        return to_global(self.local(step), self.cfg, self.sharding)

    def eval_batch(self, i: int) -> dict[str, jax.Array]:
        """Batch i of the validation split, in order (no shuffling)."""
        if self.val is None:
            raise DataError(f"{self.path}: the validation split is empty; set eval.every_steps=0"
                            " or prepare the data with a larger val_fraction")
        rows = HostRows(self.val, self.cfg.train.batch_size, self.rows)(i)
        return to_global(rows, self.cfg, self.sharding)

    def position(self, step: int) -> dict:
        """What a checkpoint records about the data: the next batch and what it came from."""
        return {"kind": "prepared", "path": self.path, "seed": self.cfg.train.seed,
                "next_batch": step, "seq_len": self.cfg.train.seq_len,
                "shuffle": "poisson" if self.poisson else self.cfg.data.shuffle,
                "mask_documents": self.cfg.data.mask_documents,
                "train_tokens": self.meta["splits"]["train"]["tokens"]}

    def check_resume(self, saved: dict | None) -> None:
        """Say so when the data differs from what the checkpoint was trained on: the
        batches after the resume then differ from an uninterrupted run's."""
        if not saved:
            return
        now = self.position(saved.get("next_batch", 0))
        changed = [k for k in ("kind", "seed", "seq_len", "shuffle", "mask_documents",
                               "train_tokens") if saved.get(k) != now[k]]
        if changed:
            log.warning("data differs from the checkpoint's (%s): batches after the resume "
                        "are not those of an uninterrupted run",
                        ", ".join(f"{k} {saved.get(k)} -> {now[k]}" for k in changed))
        else:
            log.info("data: continuing at batch %d of %s", saved["next_batch"], self.path)

    def close(self) -> None:
        if self.iterator is not None and hasattr(self.iterator, "close"):
            self.iterator.close()
        self.iterator, self.next_step, self.cached = None, None, None


def make_batches(cfg: Config, sharding, path: str | None, privacy: Privacy | None = None):
    """The train loop's batches: PackedBatches over a prepared directory (Poisson-sampled
    with DP-SGD), else the embedded stdlib corpus or synthetic tokens."""
    if path is not None:
        batches = PackedBatches(cfg, sharding, path, privacy=privacy)
        meta = batches.meta
        log.info("data: %s, %s tokenizer (%d tokens, EOS %d), %s train / %s val tokens, "
                 "%d sequences of %d per epoch%s", path, meta["tokenizer_kind"],
                 meta["vocab_size"], meta["eos_id"], f"{meta['splits']['train']['tokens']:,}",
                 f"{meta['splits']['val']['tokens']:,}", batches.num_sequences,
                 cfg.train.seq_len, ", documents masked" if cfg.data.mask_documents else "")
        if batches.chat:
            p = batches.packed
            unit = "preference pairs" if batches.pairs else "examples"
            log.info("data: chat %s packed whole, examples masked from each other: "
                     "%d train %s in %d sequences (%.0f%% of their tokens used), %s "
                     "tokens trained on per epoch%s", unit,
                     len(p.kept_K) // (2 if batches.pairs else 1), unit, len(p),
                     100 * p.used_tokens / max(len(p) * cfg.train.seq_len, 1),
                     f"{meta['splits']['train']['trained_tokens']:,}",
                     f"; {p.overlong} longer than train.seq_len={cfg.train.seq_len} "
                     f"({'cut to it' if cfg.data.overlong == 'truncate' else 'left out'})"
                     + (f", {p.lost} of them cut before any assistant token: raise "
                        "train.seq_len or set data.overlong=drop" if p.lost else "")
                     if p.overlong else "")
        return batches
    corpus = None
    if cfg.data.source == "stdlib":
        corpus = load_stdlib_corpus(cfg.data.max_bytes, cfg.data.val_fraction)
        log.info("data: stdlib corpus, %d files, %.1fM train / %.2fM val bytes; reference: "
                 "unigram entropy %.3f nats/token", corpus.num_files,
                 corpus.train_BYTES.size / 1e6, corpus.val_BYTES.size / 1e6,
                 corpus.unigram_entropy())
    return WindowBatches(cfg, sharding, corpus)


def tokens_per_step(cfg: Config) -> int:
    return cfg.train.batch_size * cfg.train.seq_len
