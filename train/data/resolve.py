"""Where a run's tokens come from: the prepared directory (raw inputs are prepared on
the fly), the vocabulary size the tokenizer settles, and the tokenizer itself."""

from __future__ import annotations

import logging
from pathlib import Path

from train.config import Config, with_vocab
from train.data.prepared import ensure_prepared, is_prepared, load_prepared_tokenizer, read_meta
from train.data.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer
from train.errors import DataError

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
                           d.eos_token, d.format, cfg.train.seq_len, log=log.info)
    meta = read_meta(path)
    return resolve_vocab(cfg, meta["vocab_size"], path), path


def tokenizer_files(path: str | None) -> list[Path]:
    """The tokenizer file a run's data (its prepared directory, or None for the
    embedded data) was tokenized with, and the chat template that rendered it (with its
    tokenizer_config.json) if any; none for the byte tokenizer."""
    if path is None or read_meta(path)["tokenizer"] == "byte":
        return []
    names = [read_meta(path)["tokenizer"], "chat_template.jinja", "tokenizer_config.json"]
    return [Path(path) / n for n in names if (Path(path) / n).is_file()]


def run_tokenizer(cfg: Config) -> Tokenizer:
    """The tokenizer a run's data was tokenized with, from its config: a prepared
    directory's own, data.tokenizer for raw inputs, bytes for the embedded data."""
    path = cfg.data.path
    if path is None:
        return ByteTokenizer()
    if is_prepared(path):
        return load_prepared_tokenizer(path)
    return load_tokenizer(cfg.data.tokenizer, cfg.data.eos_token)
