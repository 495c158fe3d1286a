"""Tokenizers: byte-level (the default), a Hugging Face `tokenizers` JSON file, or a
SentencePiece model file; and training a byte-level BPE on the user's own text.

Every tokenizer gives `vocab_size`, `eos_id` (the token put between documents),
`encode_batch(texts) -> list of int lists` and `decode(ids)`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterable, Protocol

import sentencepiece as spm
import tokenizers

from train.data.sources import documents
from train.errors import DataError

# Tried in this order when data.eos_token is not set.
EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>")


class Tokenizer(Protocol):
    kind: str
    vocab_size: int
    eos_id: int

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are tokens 0-255; token 256 is the end of a document."""

    kind, vocab_size, eos_id = "byte", 257, 256

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    kind = "hf"

    def __init__(self, path: str, eos_token: str | None):
        try:
            self.tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # noqa: BLE001 - a missing or malformed file
            raise DataError(f"data.tokenizer={path!r} is not a readable Hugging Face "
                            f"tokenizer.json ({type(e).__name__}: {str(e)[:200]})") from None
        self.path, self.vocab_size = path, self.tok.get_vocab_size(with_added_tokens=True)
        names = [eos_token] if eos_token else list(EOS_CANDIDATES)
        ids = [self.tok.token_to_id(n) for n in names]
        found = [(n, i) for n, i in zip(names, ids) if i is not None]
        if not found:
            raise DataError(f"tokenizer {path} has no end-of-document token "
                            f"({', '.join(names)}); set data.eos_token to one it has")
        self.eos_token, self.eos_id = found[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def encode_prompts(self, texts: list[str]) -> list[list[int]]:
        """Prompts for generation get the tokenizer's own special tokens (Llama's BOS)."""
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=True)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids))


class SentencePieceTokenizer:
    kind = "sentencepiece"

    def __init__(self, path: str, eos_token: str | None):
        try:
            self.sp = spm.SentencePieceProcessor(model_file=path)
        except Exception as e:  # noqa: BLE001 - a missing or malformed file
            raise DataError(f"data.tokenizer={path!r} is not a readable SentencePiece "
                            f"model ({type(e).__name__}: {str(e)[:200]})") from None
        self.path, self.vocab_size = path, self.sp.get_piece_size()
        self.eos_id = self.sp.piece_to_id(eos_token) if eos_token else self.sp.eos_id()
        if self.eos_id < 0 or (eos_token and self.sp.id_to_piece(self.eos_id) != eos_token):
            raise DataError(f"tokenizer {path} has no end-of-document token "
                            f"{eos_token or '(eos_id)'}; set data.eos_token to one it has")

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def encode_prompts(self, texts: list[str]) -> list[list[int]]:
        """Prompts for generation start with BOS when the model has one."""
        return self.sp.encode(texts, add_bos=self.sp.bos_id() >= 0)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode(list(ids))


def load_tokenizer(spec: str = "byte", eos_token: str | None = None) -> Tokenizer:
    """"byte", a tokenizer.json file, or a SentencePiece .model file."""
    if spec == "byte":
        return ByteTokenizer()
    if not Path(spec).is_file():
        raise DataError(f"data.tokenizer={spec!r}: no such file (use 'byte', a Hugging Face "
                        "tokenizer.json, a SentencePiece .model, or train one with "
                        "python -m train.tokenizer)")
    if spec.endswith(".json"):
        return HFTokenizer(spec, eos_token)
    return SentencePieceTokenizer(spec, eos_token)


def save_tokenizer(tok: Tokenizer, directory: Path) -> str:
    """Copy the tokenizer's file into `directory`; returns the spec to load it again
    (relative to the directory)."""
    if tok.kind == "byte":
        return "byte"
    name = "tokenizer.json" if tok.kind == "hf" else "tokenizer.model"
    shutil.copyfile(tok.path, directory / name)
    return name


def train_bpe(texts: Iterable[str], vocab_size: int, output: str,
              eos_token: str = "<|endoftext|>") -> int:
    """Train a byte-level BPE (GPT-2 style: no unknown tokens, any text round-trips) with
    `eos_token` as its one special token; writes a tokenizer.json, returns its size."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[eos_token], show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    tok.save(output)
    return tok.get_vocab_size(with_added_tokens=True)


def train_tokenizer(inputs: str, output: str, vocab_size: int, text_field: str = "text") -> str:
    """A byte-level BPE trained on the documents of `inputs` (as data.path reads them),
    written to `output`; returns the line that says so."""
    if vocab_size < 257:
        raise DataError(f"--vocab-size={vocab_size}: a byte-level BPE needs at least 257 "
                        "(256 bytes and the end-of-document token)")
    size = train_bpe((text for _, text in documents(inputs, text_field)), vocab_size, output)
    return (f"trained a byte-level BPE tokenizer with {size:,} tokens on {inputs}; wrote "
            f"{output}; use it with data.tokenizer={output}")
