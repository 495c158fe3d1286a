"""Pre-tokenized data on disk: tokenize a corpus once, read it memory-mapped.

A prepared directory holds, per split (train, val):
  <split>.tokens        every document's tokens followed by EOS, back to back (uint16
                        when the vocabulary fits, else uint32), read with np.memmap;
  <split>.offsets.npy   int64 (documents + 1,): where each document starts, then the end;
and meta.json (tokenizer, vocabulary size, EOS id, counts) plus a copy of the tokenizer
file. A document goes to val when a hash of its id (file, line or row) falls under
val_fraction: deterministic and independent of file order.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import shutil
import time
import zlib
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from tqdm import tqdm

from train.data.chat import ChatEncoder, load_template, row_kind, save_template
from train.data.sources import documents, expand, first_record, records
from train.data.tokenizer import Tokenizer, load_tokenizer, save_tokenizer
from train.errors import DataError

FORMAT = "shardlm-tokens/1"
SPLITS = ("train", "val")
BATCH_DOCS = 512  # documents tokenized per call (HF/SentencePiece use their threads)


def is_prepared(path: str | Path) -> bool:
    return (Path(path) / "meta.json").is_file()


@dataclasses.dataclass
class Split:
    """One split, memory-mapped: tokens_N (N,) and offsets_D1 (documents + 1,)."""
    tokens_N: np.ndarray
    offsets_D1: np.ndarray


def open_split(path: str | Path, split: str) -> Split:
    path = Path(path)
    meta = read_meta(path)
    if not meta["splits"][split]["tokens"]:
        return Split(np.zeros((0,), np.uint16), np.zeros((1,), np.int64))
    tokens = np.memmap(path / f"{split}.tokens", dtype=meta["dtype"], mode="r")
    return Split(tokens, np.load(path / f"{split}.offsets.npy"))


def read_meta(path: str | Path) -> dict:
    meta_path = Path(path) / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{meta_path}: not a prepared data directory ({type(e).__name__}); "
                        "make one with python -m train.prepare") from None
    if meta.get("format") != FORMAT:
        raise DataError(f"{meta_path}: format {meta.get('format')!r}, this version reads "
                        f"{FORMAT!r}; prepare the data again")
    return meta


def load_prepared_tokenizer(path: str | Path) -> Tokenizer:
    meta = read_meta(path)
    spec = meta["tokenizer"]
    return load_tokenizer(spec if spec == "byte" else str(Path(path) / spec),
                          meta.get("eos_token"))


def in_val(doc_id: str, val_fraction: float) -> bool:
    return (zlib.crc32(doc_id.encode()) % 10_000) / 10_000 < val_fraction


class _SplitWriter:
    """One split's files; with `weights` (chat data) also <split>.weights, a uint8 loss
    weight per token (1: trained on)."""

    def __init__(self, directory: Path, split: str, dtype, weights: bool = False):
        self.file = (directory / f"{split}.tokens").open("wb")
        self.weights = (directory / f"{split}.weights").open("wb") if weights else None
        self.directory, self.split, self.dtype = directory, split, dtype
        self.offsets, self.count, self.nbytes, self.trained = [0], 0, 0, 0

    def add(self, ids: list[int], eos_id: int | None, text_bytes: int,
            weights: np.ndarray | None = None) -> None:
        array = np.asarray(list(ids) + ([] if eos_id is None else [eos_id]), dtype=self.dtype)
        array.tofile(self.file)
        if self.weights is not None:
            np.asarray(weights, np.uint8).tofile(self.weights)
            self.trained += int(np.sum(weights))
        self.count += len(array)
        self.offsets.append(self.count)
        self.nbytes += text_bytes

    def close(self) -> dict:
        self.file.close()
        if self.weights is not None:
            self.weights.close()
        np.save(self.directory / f"{self.split}.offsets.npy", np.asarray(self.offsets, np.int64))
        out = {"documents": len(self.offsets) - 1, "tokens": self.count, "bytes": self.nbytes}
        return out | ({"trained_tokens": self.trained} if self.weights is not None else {})


def data_kind(inputs: str, data_format: str, text_field: str) -> str:
    """'text', 'chat' or 'preference': data.format, or for `auto` the fields of the
    first row (messages, or prompt and completion: chat; chosen and rejected:
    preference pairs, DPO's data)."""
    row = first_record(inputs)
    found = row_kind(row) if row is not None else None
    if data_format == "text":
        return "text"
    if data_format == "chat" and found not in ("chat", "preference"):
        fields = ", ".join(row) if row else "no rows of fields"
        raise DataError(f"data.format=chat but the rows of {expand(inputs)[0][0]} have no "
                        f"'messages' nor 'prompt' and 'completion' nor 'chosen' and "
                        f"'rejected' (has: {fields})")
    if found and (data_format == "chat" or text_field not in row):
        return found
    return "text"


def prepare(inputs: str, output: str | Path, tokenizer: str = "byte", *,
            text_field: str = "text", val_fraction: float = 0.05,
            eos_token: str | None = None, data_format: str = "auto",
            seq_len: int | None = None, progress: bool = True, replace: bool = True,
            log: Callable[[str], None] = print) -> dict:
    """Tokenize `inputs` (a path, directory or glob) into the prepared directory `output`,
    written under a temporary name and renamed when complete (an earlier prepared
    directory there is replaced when `replace`). Returns its meta. Chat data (see
    data_kind) is rendered with the tokenizer's chat template (train/data/chat.py);
    `seq_len` only counts, in the summary, the examples longer than a sequence."""
    output = Path(output)
    if output.exists() and not is_prepared(output) and any(output.iterdir()):
        raise DataError(f"--output {output} exists and is not a prepared data directory; "
                        "choose another path or remove it")
    tok = load_tokenizer(tokenizer, eos_token)
    expand(inputs)  # a missing input fails here, before any work
    kind = data_kind(inputs, data_format, text_field)
    encoder = ChatEncoder(tok, load_template(tok.path)) if kind != "text" else None
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dtype = np.uint16 if tok.vocab_size <= 2 ** 16 else np.uint32
    writers = {s: _SplitWriter(tmp, s, dtype, weights=kind != "text") for s in SPLITS}
    start = time.perf_counter()
    bar = None  # shown once the first batch is read: an unreadable input fails first
    skipped: list[str] = []
    lengths: list[int] = []
    try:
        if kind != "text":  # chat, or preference pairs (chosen then rejected)
            for doc_id, where, row in records(inputs):
                if bar is None:
                    bar = tqdm(desc="prepare", unit=" rows", disable=not progress,
                               dynamic_ncols=True)
                if kind == "chat" and row_kind(row) != "chat":
                    raise DataError(f"{where}: no 'messages' nor 'prompt' and 'completion' "
                                    f"(has: {', '.join(row)})")
                split = "val" if in_val(doc_id, val_fraction) else "train"
                pair = encoder.encode_pair(row, where) if kind == "preference" else None
                for ex in pair or encoder.encode(row, where):
                    writers[split].add(ex.ids, None, 0, ex.weights)
                    lengths.append(len(ex.ids))
                bar.update(1)
        for batch in _batches(documents(inputs, text_field, skipped) if kind == "text" else ()):
            if bar is None:
                bar = tqdm(desc="prepare", unit=" docs", disable=not progress,
                           dynamic_ncols=True)
            ids = tok.encode_batch([text for _, text in batch])
            for (doc_id, text), doc_ids in zip(batch, ids):
                split = "val" if in_val(doc_id, val_fraction) else "train"
                writers[split].add(doc_ids, tok.eos_id, len(text.encode("utf-8")))
            bar.update(len(batch))
        counts = {s: w.close() for s, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.file.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    if not counts["train"]["documents"]:
        shutil.rmtree(tmp, ignore_errors=True)
        if not counts["val"]["documents"]:
            raise DataError(f"data input {inputs!r} holds no documents ({len(skipped)} empty "
                            "files skipped)")
        raise DataError(f"data input {inputs!r}: every document went to validation; lower "
                        "data.val_fraction or add documents")
    meta = {"format": FORMAT, "kind": kind, "inputs": inputs,
            "tokenizer": save_tokenizer(tok, tmp),
            "tokenizer_kind": tok.kind, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
            "eos_token": getattr(tok, "eos_token", None), "dtype": np.dtype(dtype).name,
            "text_field": text_field, "val_fraction": val_fraction, "splits": counts}
    if encoder is not None:
        meta["chat_template"] = save_template(encoder.template, tmp)
        meta["per_turn_conversations"] = encoder.per_turn
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    if output.exists() and replace:
        shutil.rmtree(output)
    try:
        os.replace(tmp, output)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - start
    total = {k: sum(c[k] for c in counts.values()) for k in ("documents", "tokens", "bytes")}
    if kind != "text":
        trained = sum(c["trained_tokens"] for c in counts.values())
        pairs = kind == "preference"
        if pairs:  # a pair is longer than a sequence when its two examples together are
            lengths = [a + b for a, b in zip(lengths[::2], lengths[1::2])]
        longer = sum(n > seq_len for n in lengths) if seq_len else 0
        n = {s: c["documents"] // (2 if pairs else 1) for s, c in counts.items()}
        what = "preference pairs" if pairs else "chat examples"
        whose = "the responses" if pairs else "the assistant's"
        log(f"prepared {output}: {sum(n.values()):,} {what} "
            f"({n['train']:,} train / {n['val']:,} val), "
            f"{total['tokens']:,} tokens of which "
            f"{trained:,} trained on ({whose}), {tok.kind} tokenizer "
            f"({tok.vocab_size:,} tokens), {seconds:.1f} s"
            + (f"; {encoder.per_turn:,} conversations as one example per assistant turn (the "
               "template rewrites earlier turns)" if encoder.per_turn else "")
            + (f"; {longer:,} {what} longer than train.seq_len={seq_len} (data.overlong "
               "says what training does with them)" if longer else ""))
        return meta
    log(f"prepared {output}: {total['documents']:,} documents, {total['tokens']:,} tokens "
        f"({counts['train']['tokens']:,} train / {counts['val']['tokens']:,} val), "
        f"{total['bytes']:,} bytes of text, {total['bytes'] / max(total['tokens'], 1):.2f} "
        f"bytes/token, {tok.kind} tokenizer ({tok.vocab_size:,} tokens), {seconds:.1f} s"
        + (f"; skipped {len(skipped)} empty files (first: {skipped[0]})" if skipped else ""))
    return meta


def _batches(docs: Iterable[tuple[str, str]]) -> Iterable[list[tuple[str, str]]]:
    batch = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == BATCH_DOCS:
            yield batch
            batch = []
    if batch:
        yield batch


def fingerprint(inputs: str, tokenizer: str, text_field: str, val_fraction: float,
                eos_token: str | None, data_format: str = "auto") -> str:
    """Names the cache of raw inputs prepared on the fly: changes when a file, the
    tokenizer (and the chat template beside it) or a setting changes."""
    h = hashlib.sha256(json.dumps([FORMAT, inputs, tokenizer, text_field, val_fraction,
                                   eos_token] + ([data_format] if data_format != "auto"
                                                 else [])).encode())
    for path, name in expand(inputs):
        for f in ([path] if path.is_file() else sorted(path.rglob("*"))):
            if f.is_file():
                st = f.stat()
                h.update(f"{name}/{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    if tokenizer != "byte" and Path(tokenizer).is_file():
        h.update(Path(tokenizer).read_bytes())
        for beside in ("chat_template.jinja", "tokenizer_config.json"):
            if (Path(tokenizer).parent / beside).is_file():
                h.update((Path(tokenizer).parent / beside).read_bytes())
    return h.hexdigest()[:16]


def ensure_prepared(path: str, cache_dir: str, tokenizer: str, text_field: str,
                    val_fraction: float, eos_token: str | None, data_format: str = "auto",
                    seq_len: int | None = None, log: Callable[[str], None] = print) -> str:
    """`path` itself when it is a prepared directory; otherwise raw inputs, prepared
    once into cache_dir/<fingerprint> (concurrent processes each write a temporary
    directory; the first rename wins)."""
    if is_prepared(path):
        return path
    target = Path(os.path.expanduser(cache_dir)) / fingerprint(
        path, tokenizer, text_field, val_fraction, eos_token, data_format)
    if is_prepared(target):
        log(f"data: {path} already prepared in {target}")
        return str(target)
    log(f"data: preparing {path} into {target}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        prepare(path, target, tokenizer, text_field=text_field, val_fraction=val_fraction,
                eos_token=eos_token, data_format=data_format, seq_len=seq_len,
                progress=False, replace=False, log=log)
    except OSError as e:
        if is_prepared(target):  # lost a race to another process: theirs is complete
            return str(target)
        if isinstance(e, (PermissionError, IsADirectoryError, NotADirectoryError)) or \
                e.errno in (errno.EROFS, errno.ENOSPC, errno.EACCES):
            raise DataError(f"data.cache_dir={cache_dir!r} cannot be written ({e.strerror}: "
                            f"{e.filename}); set data.cache_dir to a writable directory, or "
                            "prepare the data with python -m train.prepare") from None
        raise
    return str(target)
