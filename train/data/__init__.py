"""Data: the user's text (sources -> tokenizer -> prepared tokens -> packed sequences ->
Grain -> per-host rows -> global batches), or the embedded stdlib corpus.

`resolve_data(cfg)` settles where the tokens come from and the vocabulary size;
`make_batches(...)` gives the train loop `batch(step)` and `eval_batch(i)`.
"""

from __future__ import annotations

import logging

from train.config import Config, with_vocab
from train.data.batches import PackedBatches, WindowBatches, to_global
from train.data.prepared import ensure_prepared, prepare, read_meta
from train.data.sources import DataError
from train.data.stdlib import (Corpus, load_stdlib_corpus, local_rows, synthetic_batch,
                               window_batch)
from train.data.tokenizer import load_tokenizer

log = logging.getLogger("train")


def padded_vocab(tokenizer_vocab: int, multiple: int) -> int:
    return -(-tokenizer_vocab // multiple) * multiple


def resolve_vocab(cfg: Config, tokenizer_vocab: int, where: str) -> Config:
    """model.vocab_size=null takes the tokenizer's size rounded up to
    data.vocab_multiple; a fixed size must hold every token."""
    fixed = cfg.model.vocab_size
    padded = padded_vocab(tokenizer_vocab, cfg.data.vocab_multiple)
    if fixed is None:
        return with_vocab(cfg, padded)
    if fixed < tokenizer_vocab:
        raise DataError(f"the tokenizer of {where} has {tokenizer_vocab:,} tokens but "
                        f"model.vocab_size={fixed:,}; set model.vocab_size=null (the "
                        f"tokenizer's size, padded to {padded:,}) or at least {tokenizer_vocab:,}")
    return cfg


def resolve_data(cfg: Config) -> tuple[Config, str | None]:
    """(config with the vocabulary size settled, prepared directory or None for the
    embedded data). Raw inputs are prepared on the fly, once, into data.cache_dir."""
    d = cfg.data
    if d.path is None:
        return cfg, None
    path = ensure_prepared(d.path, d.cache_dir, d.tokenizer, d.text_field, d.val_fraction,
                           d.eos_token, log=log.info)
    meta = read_meta(path)
    return resolve_vocab(cfg, meta["vocab_size"], path), path


def make_batches(cfg: Config, sharding, path: str | None):
    """The train loop's batches: PackedBatches over a prepared directory, else the
    embedded stdlib corpus or synthetic tokens."""
    if path is not None:
        batches = PackedBatches(cfg, sharding, path)
        meta = batches.meta
        log.info("data: %s, %s tokenizer (%d tokens, EOS %d), %s train / %s val tokens, "
                 "%d sequences of %d per epoch%s", path, meta["tokenizer_kind"],
                 meta["vocab_size"], meta["eos_id"], f"{meta['splits']['train']['tokens']:,}",
                 f"{meta['splits']['val']['tokens']:,}", batches.num_sequences,
                 cfg.train.seq_len, ", documents masked" if cfg.data.mask_documents else "")
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


# The stdlib/synthetic batches under their first name.
Batches = WindowBatches

__all__ = ["Batches", "Corpus", "DataError", "PackedBatches", "WindowBatches", "load_stdlib_corpus",
           "load_tokenizer", "local_rows", "make_batches", "padded_vocab", "prepare",
           "resolve_data", "resolve_vocab", "synthetic_batch", "to_global", "tokens_per_step",
           "window_batch"]
